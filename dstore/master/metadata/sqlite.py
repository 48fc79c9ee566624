"""The embedded metadata engine: SQLite in WAL mode, driven from one dedicated thread, so
the event loop never blocks and the database is never held across network I/O.

Group commit: operations queued while a transaction commits run together in the next
one, each inside its own savepoint (so each stays atomic and a failing one rolls back
alone), and share one commit, one fsync for those that must be durable. Every change is
guarded by the state it expects, as the interface asks, although SQLite's one writer
would forgive an unguarded one. Times are SQLite's clock (``_NOW``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from dstore.errors import (
    BucketNotEmpty,
    Conflict,
    DstoreError,
    FileNotFound,
    NoSuchBucket,
    NoSuchUpload,
    OutOfSpace,
    PreconditionFailed,
)
from dstore.master.metadata.interface import MetadataStore
from dstore.master.metadata.model import (
    ChunkIntent,
    ChunkRef,
    ChunkReplicas,
    CommitResult,
    DeadChunk,
    EngineStats,
    FileInfo,
    FileVersion,
    InlineBody,
    Leadership,
    MemberRecord,
    MemberState,
    MultipartUpload,
    Part,
    Purged,
    VersionState,
    WorkRequest,
)
from dstore.master.metadata.schema import migrate
from dstore.master.metadata.sql import (
    BUCKET_HOLDS,
    CHECK_IN,
    CREATE_BUCKET,
    FORGET_GATEWAYS,
    PINNED,
    REQUEST_WORK,
    SAVE_JOB,
    SEEN,
    TAKE_WORK,
    check_etag,
    chosen_parts,
    lead_statement,
    match_needs_etag,
    pin_statement,
    prefix_end,
    renew_pins_statement,
    split_node_ids,
)
from dstore.threads import Call, Outcome, WorkerThread

T = TypeVar("T")

# seconds since the epoch on the database's clock (julianday: millisecond resolution)
_NOW = "((julianday('now') - 2440587.5) * 86400.0)"

PENDING, LIVE, DEAD = (s.value for s in VersionState)


class SQLiteMetadataStore(MetadataStore):
    MAX_GROUP = 128

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._db: sqlite3.Connection | None = None
        self._thread = WorkerThread("dstore-sqlite", max_group=self.MAX_GROUP, run_group=self._run)

    def __repr__(self) -> str:
        state = "open" if self._db else "closed"
        stats = self.stats()
        return (
            f"<SQLiteMetadataStore {self.path} {state},"
            f" {stats.operations} ops in {stats.transactions} commits>"
        )

    def stats(self) -> EngineStats:
        return EngineStats(self._thread.calls, self._thread.groups)

    # --- lifecycle ------------------------------------------------------------------------

    async def open(self) -> None:
        self._db = await asyncio.to_thread(self._open)
        self._thread.start()

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode = WAL")
            # NORMAL: a commit survives a crash of the process (kill -9); a group holding a
            # write that must survive power loss too (commit, delete) commits with FULL.
            db.execute("PRAGMA synchronous = NORMAL")
            db.execute("PRAGMA foreign_keys = ON")
            db.execute("PRAGMA busy_timeout = 5000")
            migrate(db)
        except BaseException:
            db.close()
            raise
        return db

    async def close(self) -> None:
        db, self._db = self._db, None
        await self._thread.stop()
        if db is not None:
            db.close()

    async def raw(self, fn: Callable[[sqlite3.Connection], T], *, durable: bool = False) -> T:
        """Run ``fn`` on the database in a transaction of its own group: for fault
        injection in tests and for operators' repairs, never for the gateway's work."""
        return await self._submit(fn, durable=durable)

    async def _submit(self, fn: Callable[[sqlite3.Connection], T], *, durable: bool = False) -> T:
        if self._db is None:
            raise DstoreError("metadata store is closed", code="unavailable")
        try:
            return await self._thread.run(fn, durable)
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode == sqlite3.SQLITE_FULL:
                raise OutOfSpace("the metadata store's disk is full") from exc
            raise

    def _run(self, group: list[Call]) -> list[Outcome]:
        """Run a group of calls (each ``fn(db)``, ``args`` = (durable,)) in one
        transaction. SQLite rolls a whole transaction back on some errors (a full disk,
        an I/O error): then only the call that hit it has failed, and the others run
        again once, in a new one."""
        outcomes, again = self._transact(group)
        if again:
            retried, _ = self._transact([group[i] for i in again], retry=False)
            for i, outcome in zip(again, retried, strict=True):
                outcomes[i] = outcome
        return outcomes

    def _transact(
        self, group: list[Call], *, retry: bool = True
    ) -> tuple[list[Outcome], list[int]]:
        db = self._db
        if db is None:
            return [(False, DstoreError("metadata store is closed", code="unavailable"))] * len(
                group
            ), []
        outcomes: list[Outcome] = []
        durable = any(call.args[0] for call in group)
        try:
            if durable:
                db.execute("PRAGMA synchronous = FULL")
            db.execute("BEGIN IMMEDIATE")
            for i, call in enumerate(group):
                db.execute("SAVEPOINT op")
                try:
                    value = call.fn(db)
                except Exception as exc:
                    if not db.in_transaction:  # SQLite gave the whole transaction up
                        if not retry:
                            raise
                        failed: list[Outcome] = [(False, None)] * len(group)
                        failed[i] = (False, exc)
                        return failed, [j for j in range(len(group)) if j != i]
                    db.execute("ROLLBACK TO op")
                    db.execute("RELEASE op")
                    outcomes.append((False, exc))
                else:
                    db.execute("RELEASE op")
                    outcomes.append((True, value))
            db.execute("COMMIT")
        except Exception as exc:  # the commit itself failed: every op in the group fails
            if db.in_transaction:
                db.execute("ROLLBACK")
            outcomes = [(False, exc)] * len(group)
        finally:
            if durable:
                db.execute("PRAGMA synchronous = NORMAL")
        return outcomes, []

    # --- uploads --------------------------------------------------------------------------

    async def begin_upload(
        self, name: str, content_type: str, lease: float, first: ChunkIntent | None = None
    ) -> int:
        def tx(db: sqlite3.Connection) -> int:
            (version_id,) = db.execute(
                "INSERT INTO versions (name, state, content_type, created, lease_expires)"
                f" VALUES (?, '{PENDING}', ?, {_NOW}, {_NOW} + ?) RETURNING id",
                (name, content_type, lease),
            ).fetchone()
            if first is not None:
                _insert_chunk(db, version_id, first)
            return int(version_id)

        return await self._submit(tx)

    async def renew_leases(self, version_ids: Sequence[int], lease: float) -> None:
        def tx(db: sqlite3.Connection) -> None:
            db.executemany(
                f"UPDATE versions SET lease_expires = MAX(lease_expires, {_NOW} + ?)"
                f" WHERE id = ? AND state = '{PENDING}'",
                [(lease, version_id) for version_id in version_ids],
            )

        await self._submit(tx)

    async def add_chunk(self, version_id: int, intent: ChunkIntent) -> None:
        await self._submit(lambda db: _insert_chunk(db, version_id, intent))

    async def add_replicas(self, chunk_id: str, nodes: Sequence[str]) -> None:
        def tx(db: sqlite3.Connection) -> None:
            (last,) = db.execute(
                "SELECT COALESCE(MAX(pos), -1) FROM replicas WHERE chunk_id = ?", (chunk_id,)
            ).fetchone()
            db.executemany(
                "INSERT INTO replicas (chunk_id, node_id, pos) VALUES (?, ?, ?)"
                " ON CONFLICT (chunk_id, node_id) DO NOTHING",
                [(chunk_id, node, last + 1 + i) for i, node in enumerate(nodes)],
            )

        await self._submit(tx)

    async def commit(
        self,
        version_id: int,
        size: int,
        etag: str,
        *,
        if_absent: bool = False,
        if_match: Sequence[str] | None = None,
        keep_chunks: int = 0,
    ) -> CommitResult:
        def tx(db: sqlite3.Connection) -> CommitResult:
            return _commit(db, version_id, size, etag, if_absent, if_match, keep_chunks)

        return await self._submit(tx, durable=True)

    async def commit_inline(
        self,
        name: str,
        content_type: str,
        body: InlineBody,
        etag: str,
        *,
        if_absent: bool = False,
        if_match: Sequence[str] | None = None,
    ) -> CommitResult:
        data = body.data
        if data is None:
            raise ValueError("an inline commit needs the file's bytes")

        kept = InlineBody(None, body.checksum)

        def tx(db: sqlite3.Connection) -> CommitResult:
            current = _current_pointer(db, name)
            if current is not None and if_absent:
                raise PreconditionFailed(f"{name!r} exists")
            _check_match(db, name, current, if_match)
            version_id, created = db.execute(
                "INSERT INTO versions (name, state, size, etag, content_type, created)"
                f" VALUES (?, '{LIVE}', ?, ?, ?, {_NOW}) RETURNING id, created",
                (name, len(data), etag, content_type),
            ).fetchone()
            db.execute(
                "INSERT INTO bodies (version_id, checksum, data) VALUES (?, ?, ?)",
                (version_id, body.checksum, data),
            )
            replaced = _point(db, name, version_id, current)
            version = FileVersion(  # without the bytes: they are the caller's
                name, version_id, len(data), etag, content_type, created, (), kept
            )
            return CommitResult(version, replaced, 0, True)

        return await self._submit(tx, durable=True)

    async def abort(self, version_id: int) -> None:
        await self._submit(lambda db: _kill(db, version_id, PENDING))

    # --- reads ----------------------------------------------------------------------------

    async def is_current(self, name: str, version_id: int) -> bool:
        sql = "SELECT 1 FROM files WHERE name = ? AND version_id = ?"
        return (
            await self._submit(lambda db: db.execute(sql, (name, version_id)).fetchone())
            is not None
        )

    async def head(self, name: str) -> FileVersion:
        return await self._submit(lambda db: _current(db, name, data=False))

    async def lookup(self, name: str, start: int = 0, limit: int | None = None) -> FileVersion:
        def tx(db: sqlite3.Connection) -> FileVersion:
            version = _current(db, name, data=True)
            if version.inline is not None:
                return version
            refs = _chunk_refs(db, version.version_id, limit=limit, start=start)
            return dataclasses.replace(version, chunks=refs)

        return await self._submit(tx)

    async def chunk_page(self, version_id: int, start: int, limit: int) -> tuple[ChunkRef, ...]:
        return await self._submit(lambda db: _chunk_refs(db, version_id, limit=limit, start=start))

    async def inline_data(self, version_id: int) -> bytes | None:
        def tx(db: sqlite3.Connection) -> bytes | None:
            row = db.execute("SELECT data FROM bodies WHERE version_id = ?", (version_id,))
            found = row.fetchone()
            return None if found is None else bytes(found[0])

        return await self._submit(tx)

    async def inline_bodies(self, after: int, limit: int) -> list[tuple[int, str, InlineBody]]:
        def tx(db: sqlite3.Connection) -> list[tuple[int, str, InlineBody]]:
            rows = db.execute(
                "SELECT b.version_id, v.name, b.checksum, b.data FROM bodies b"
                " JOIN versions v ON v.id = b.version_id"
                " WHERE b.version_id > ? AND v.state = ? ORDER BY b.version_id LIMIT ?",
                (after, LIVE, limit),
            ).fetchall()
            return [(vid, name, InlineBody(bytes(data), bytes(cs))) for vid, name, cs, data in rows]

        return await self._submit(tx)

    async def delete(self, name: str, *, if_match: Sequence[str] | None = None) -> int:
        def tx(db: sqlite3.Connection) -> int:
            current = _current_pointer(db, name)
            if current is None:
                raise FileNotFound(f"no file named {name!r}")
            _check_match(db, name, current, if_match)
            row = db.execute(
                "DELETE FROM files WHERE name = ? AND generation = ? RETURNING version_id",
                (name, current[1]),
            ).fetchone()
            if row is None:
                raise Conflict(f"{name!r} changed meanwhile")
            _kill(db, row[0], LIVE)
            return int(row[0])

        return await self._submit(tx, durable=True)

    async def list_files(
        self, prefix: str, start_after: str, limit: int
    ) -> tuple[list[FileInfo], str | None]:
        def tx(db: sqlite3.Connection) -> tuple[list[FileInfo], str | None]:
            lower = max(prefix, start_after)
            op = ">" if start_after and start_after >= prefix else ">="
            sql = (
                "SELECT f.name, v.size, v.etag, v.created FROM files f"
                f" JOIN versions v ON v.id = f.version_id WHERE f.name {op} ?"
            )
            args: list[Any] = [lower]
            if prefix:
                sql += " AND substr(f.name, 1, ?) = ?"
                args += [len(prefix), prefix]
                bound = prefix_end(prefix)
                if bound is not None:
                    # names with the prefix sort below the prefix with its last character
                    # bumped (SQLite's BINARY order is code point order, like Python's):
                    # this bound lets the scan stop at the end of the prefix's range
                    sql += " AND f.name < ?"
                    args.append(bound)
            rows = db.execute(sql + " ORDER BY f.name LIMIT ?", (*args, limit + 1)).fetchall()
            files = [FileInfo(*row) for row in rows[:limit]]
            return files, (files[-1].name if len(rows) > limit else None)

        return await self._submit(tx)

    async def totals(self) -> tuple[int, int]:
        def tx(db: sqlite3.Connection) -> tuple[int, int]:
            files, size = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(v.size), 0) FROM files f"
                " JOIN versions v ON v.id = f.version_id"
            ).fetchone()
            return int(files), int(size)

        return await self._submit(tx)

    async def chunk_ids(self, state: VersionState) -> set[str]:
        def tx(db: sqlite3.Connection) -> set[str]:
            rows = db.execute(
                "SELECT c.chunk_id FROM chunks c JOIN versions v ON v.id = c.version_id"
                " WHERE v.state = ?",
                (state.value,),
            )
            return {row[0] for row in rows}

        return await self._submit(tx)

    async def version_ids(
        self, *, name: str | None = None, state: VersionState | None = None
    ) -> list[int]:
        def tx(db: sqlite3.Connection) -> list[int]:
            rows = db.execute(
                "SELECT id FROM versions WHERE (? IS NULL OR name = ?) AND (? IS NULL OR state = ?)"
                " ORDER BY id",
                (name, name, state and state.value, state and state.value),
            )
            return [int(row[0]) for row in rows]

        return await self._submit(tx)

    async def inline_count(self) -> int:
        def tx(db: sqlite3.Connection) -> int:
            return int(db.execute("SELECT COUNT(*) FROM bodies").fetchone()[0])

        return await self._submit(tx)

    # --- reclaiming -----------------------------------------------------------------------

    async def expire_leases(self) -> list[int]:
        def tx(db: sqlite3.Connection) -> list[int]:
            rows = db.execute(
                f"UPDATE versions SET state = '{DEAD}', dead_since = {_NOW}, lease_expires = NULL"
                f" WHERE state = '{PENDING}' AND lease_expires < {_NOW} RETURNING id"
            ).fetchall()
            db.execute(
                "DELETE FROM parts WHERE upload_id IN"
                f" (SELECT id FROM uploads WHERE expires <= {_NOW})"
            )
            db.execute(f"DELETE FROM uploads WHERE expires <= {_NOW}")
            return sorted(int(row[0]) for row in rows)

        return await self._submit(tx)

    async def dead_chunks(self, settle: float, limit: int) -> list[DeadChunk]:
        def tx(db: sqlite3.Connection) -> list[DeadChunk]:
            rows = db.execute(
                "SELECT c.version_id, c.chunk_id,"
                f" {_REPLICA_LIST}, {_NOW} - v.dead_since, {PINNED.format(now=_NOW)}"
                " FROM versions v JOIN chunks c ON c.version_id = v.id"
                f" WHERE v.state = '{DEAD}' AND v.dead_since <= {_NOW} - ?"
                " ORDER BY v.dead_since LIMIT ?",
                (settle, limit),
            ).fetchall()
            return [
                DeadChunk(vid, cid, split_node_ids(nodes), age, bool(pinned))
                for vid, cid, nodes, age, pinned in rows
            ]

        return await self._submit(tx)

    async def check_in(self, holder: str) -> None:
        def tx(db: sqlite3.Connection) -> None:
            db.execute(CHECK_IN.format(holder="?", now=_NOW), (holder,))
            db.execute(FORGET_GATEWAYS.format(now=_NOW))

        await self._submit(tx)

    async def gateways(self, within: float) -> list[tuple[str, float]]:
        sql = SEEN.format(now=_NOW, within="?")
        rows = await self._submit(lambda db: db.execute(sql, (within,)).fetchall())
        return [(holder, float(ago)) for holder, ago in rows]

    async def save_job_state(self, name: str, state: str) -> None:
        sql = SAVE_JOB.format(name="?", state="?")
        await self._submit(lambda db: db.execute(sql, (name, state)))

    async def job_state(self, name: str) -> str | None:
        def tx(db: sqlite3.Connection) -> str | None:
            row = db.execute("SELECT state FROM jobs WHERE name = ?", (name,)).fetchone()
            return None if row is None else str(row[0])

        return await self._submit(tx)

    async def create_bucket(self, name: str) -> bool:
        sql = CREATE_BUCKET.format(name="?", now=_NOW)
        return (
            await self._submit(lambda db: db.execute(sql, (name,)).fetchone(), durable=True)
            is not None
        )

    async def delete_bucket(self, name: str) -> None:
        low, high = name + "/", name + "0"  # every "B/…" ("0" follows "/")

        def tx(db: sqlite3.Connection) -> None:
            if db.execute("SELECT 1 FROM buckets WHERE name = ?", (name,)).fetchone() is None:
                raise NoSuchBucket(f"no bucket named {name!r}")
            if db.execute(BUCKET_HOLDS.format(low="?", high="?"), (low, high)).fetchone():
                raise BucketNotEmpty(f"the bucket {name!r} is not empty")
            db.execute("DELETE FROM buckets WHERE name = ?", (name,))

        await self._submit(tx, durable=True)

    async def buckets(self) -> list[tuple[str, float]]:
        sql = "SELECT name, created FROM buckets ORDER BY name"
        rows = await self._submit(lambda db: db.execute(sql).fetchall())
        return [(str(name), float(created)) for name, created in rows]

    async def bucket_exists(self, name: str) -> bool:
        sql = "SELECT 1 FROM buckets WHERE name = ?"
        return await self._submit(lambda db: db.execute(sql, (name,)).fetchone()) is not None

    # --- S3 multipart uploads --------------------------------------------------------------

    async def create_multipart(
        self, upload_id: str, name: str, content_type: str, expiry: float
    ) -> MultipartUpload:
        def tx(db: sqlite3.Connection) -> MultipartUpload:
            (created,) = db.execute(
                "INSERT INTO uploads (id, name, content_type, created, expires)"
                f" VALUES (?, ?, ?, {_NOW}, {_NOW} + ?) RETURNING created",
                (upload_id, name, content_type, expiry),
            ).fetchone()
            return MultipartUpload(upload_id, name, content_type, created)

        return await self._submit(tx, durable=True)

    async def multipart(self, upload_id: str) -> MultipartUpload:
        return await self._submit(lambda db: _upload(db, upload_id)[0])

    async def seal_part(
        self, upload_id: str, number: int, version_id: int, size: int, etag: str
    ) -> None:
        def tx(db: sqlite3.Connection) -> None:
            _, expires = _upload(db, upload_id)
            sealed = db.execute(
                "UPDATE versions SET size = ?, etag = ?, lease_expires = ?"
                f" WHERE id = ? AND state = '{PENDING}' RETURNING id",
                (size, etag, expires, version_id),
            ).fetchone()
            if sealed is None:
                raise Conflict(f"part {number}'s version {version_id} is no longer pending")
            before = db.execute(
                "SELECT version_id FROM parts WHERE upload_id = ? AND number = ?",
                (upload_id, number),
            ).fetchone()
            if before is not None:
                _kill(db, before[0], PENDING)
            db.execute(
                "INSERT INTO parts (upload_id, number, version_id, size, etag, created)"
                f" VALUES (?, ?, ?, ?, ?, {_NOW}) ON CONFLICT (upload_id, number) DO UPDATE"
                " SET version_id = excluded.version_id, size = excluded.size,"
                " etag = excluded.etag, created = excluded.created",
                (upload_id, number, version_id, size, etag),
            )

        await self._submit(tx, durable=True)

    async def parts(self, upload_id: str, after: int, limit: int) -> list[Part]:
        def tx(db: sqlite3.Connection) -> list[Part]:
            _upload(db, upload_id)
            rows = db.execute(
                "SELECT number, version_id, size, etag, created FROM parts"
                " WHERE upload_id = ? AND number > ? ORDER BY number LIMIT ?",
                (upload_id, after, limit),
            ).fetchall()
            return [Part(*row) for row in rows]

        return await self._submit(tx)

    async def multipart_uploads(
        self, prefix: str, after: tuple[str, str], limit: int
    ) -> list[MultipartUpload]:
        end = prefix_end(prefix) if prefix else None

        def tx(db: sqlite3.Connection) -> list[MultipartUpload]:
            rows = db.execute(
                "SELECT id, name, content_type, created FROM uploads"
                f" WHERE name >= ? AND (? IS NULL OR name < ?) AND expires > {_NOW}"
                " AND (name > ? OR (name = ? AND id > ?)) ORDER BY name, id LIMIT ?",
                (prefix, end, end, after[0], after[0], after[1], limit),
            ).fetchall()
            return [MultipartUpload(*row) for row in rows]

        return await self._submit(tx)

    async def complete_multipart(
        self,
        upload_id: str,
        name: str,
        parts: Sequence[tuple[int, str]],
        etag: str,
        min_part: int,
    ) -> CommitResult:
        def tx(db: sqlite3.Connection) -> CommitResult:
            upload, _ = _upload(db, upload_id, name)
            stored = {
                number: (version_id, size, tag)
                for number, version_id, size, tag in db.execute(
                    "SELECT number, version_id, size, etag FROM parts WHERE upload_id = ?",
                    (upload_id,),
                )
            }
            chosen = chosen_parts(upload_id, stored, parts, min_part)
            (version_id,) = db.execute(
                "INSERT INTO versions (name, state, content_type, created, lease_expires)"
                f" VALUES (?, '{PENDING}', ?, {_NOW}, {_NOW} + 60) RETURNING id",
                (name, upload.content_type),
            ).fetchone()
            index = offset = 0
            for part_version, size in chosen:  # its chunks become the object's, in order
                index += db.execute(
                    "UPDATE chunks SET version_id = ?, idx = idx + ?, first_byte = first_byte + ?"
                    " WHERE version_id = ?",
                    (version_id, index, offset, part_version),
                ).rowcount
                offset += size
            for part_version, _, _ in stored.values():
                _kill(db, part_version, PENDING)  # (emptied, or not listed: reclaimed)
            _end_upload(db, upload_id)
            return _commit(db, version_id, offset, etag, False, None, 0)

        return await self._submit(tx, durable=True)

    async def abort_multipart(self, upload_id: str) -> None:
        def tx(db: sqlite3.Connection) -> None:
            _upload(db, upload_id)
            for (part_version,) in db.execute(
                "SELECT version_id FROM parts WHERE upload_id = ?", (upload_id,)
            ).fetchall():
                _kill(db, part_version, PENDING)
            _end_upload(db, upload_id)

        await self._submit(tx, durable=True)

    async def request_work(self, request: WorkRequest) -> None:
        sql = REQUEST_WORK.format(marks="?, ?, ?, ?")
        values = (request.kind, request.chunk_id, request.node_id, request.reason)
        await self._submit(lambda db: db.execute(sql, values), durable=True)

    async def take_work(self, limit: int) -> list[WorkRequest]:
        sql = TAKE_WORK.format(limit="?", skip="")
        rows = await self._submit(lambda db: db.execute(sql, (limit,)).fetchall(), durable=True)
        return [WorkRequest(*row[1:]) for row in sorted(rows)]

    async def pin(self, holder: str, version_id: int, ttl: float, settle: float) -> bool:
        sql = pin_statement(_NOW, "max", "?", "?", "?", "?")  # (marks: holder, ttl, id, settle)
        return await self._submit(
            lambda db: db.execute(sql, (holder, ttl, version_id, settle)).fetchone() is not None
        )

    async def renew_pins(self, holder: str, version_ids: Sequence[int], ttl: float) -> None:
        sql = renew_pins_statement("max", f"VALUES (?, ?, {_NOW} + ?)")
        rows = [(version_id, holder, ttl) for version_id in version_ids]
        if rows:
            await self._submit(lambda db: db.executemany(sql, rows))

    async def forget_replica(self, chunk_id: str, node_id: str, *, durable: bool = False) -> None:
        await self._submit(
            lambda db: db.execute(
                "DELETE FROM replicas WHERE chunk_id = ? AND node_id = ?", (chunk_id, node_id)
            ),
            durable=durable,
        )

    async def purge_dead(self) -> Purged:
        def tx(db: sqlite3.Connection) -> Purged:
            # an inline body has no reader to wait for: a GET holds its bytes from the lookup
            # (the state written out, not bound: only then is the partial index of dead
            # versions used, instead of a scan of every version each pass)
            inline = db.execute(
                "DELETE FROM bodies WHERE version_id IN"
                f" (SELECT id FROM versions WHERE state = '{DEAD}') RETURNING version_id"
            ).fetchall()
            db.execute(
                "DELETE FROM chunks WHERE version_id IN"
                f" (SELECT id FROM versions WHERE state = '{DEAD}')"
                " AND NOT EXISTS (SELECT 1 FROM replicas r WHERE r.chunk_id = chunks.chunk_id)"
            )
            purged = db.execute(
                f"DELETE FROM versions WHERE state = '{DEAD}' AND NOT EXISTS"
                " (SELECT 1 FROM chunks c WHERE c.version_id = versions.id) RETURNING id"
            ).fetchall()
            db.execute(f"DELETE FROM pins WHERE expires < {_NOW}")
            return Purged(len(purged), tuple(sorted(row[0] for row in inline)))

        return await self._submit(tx)

    # --- replicas and members -------------------------------------------------------------

    async def chunks_on(self, node_ids: Sequence[str], limit: int) -> list[ChunkReplicas]:
        ids = list(node_ids)
        if not ids:
            return []

        def tx(db: sqlite3.Connection) -> list[ChunkReplicas]:
            marks = ",".join("?" * len(ids))
            rows = db.execute(
                "SELECT c.chunk_id, c.size, c.checksum,"
                f" {_REPLICA_LIST}"
                " FROM chunks c JOIN versions v ON v.id = c.version_id"
                " WHERE v.state IN (?, ?) AND c.chunk_id IN"
                f" (SELECT chunk_id FROM replicas WHERE node_id IN ({marks}))"
                " LIMIT ?",
                (LIVE, PENDING, *ids, limit),
            ).fetchall()
            return [
                ChunkReplicas(cid, size, bytes(cs), split_node_ids(nodes))
                for cid, size, cs, nodes in rows
            ]

        return await self._submit(tx)

    async def chunk_replicas(self, chunk_id: str) -> ChunkReplicas | None:
        def tx(db: sqlite3.Connection) -> ChunkReplicas | None:
            row = db.execute(
                "SELECT c.chunk_id, c.size, c.checksum,"
                f" {_REPLICA_LIST}"
                " FROM chunks c JOIN versions v ON v.id = c.version_id"
                " WHERE c.chunk_id = ? AND v.state IN (?, ?)",
                (chunk_id, LIVE, PENDING),
            ).fetchone()
            if row is None:
                return None
            cid, size, cs, nodes = row
            return ChunkReplicas(cid, size, bytes(cs), split_node_ids(nodes))

        return await self._submit(tx)

    async def replica_count(self, node_id: str) -> int:
        def tx(db: sqlite3.Connection) -> int:
            (count,) = db.execute(
                "SELECT COUNT(*) FROM replicas WHERE node_id = ?", (node_id,)
            ).fetchone()
            return int(count)

        return await self._submit(tx)

    async def replica_node_ids(self) -> set[str]:
        def tx(db: sqlite3.Connection) -> set[str]:
            return {row[0] for row in db.execute("SELECT DISTINCT node_id FROM replicas")}

        return await self._submit(tx)

    async def known_replicas(self, node_id: str, chunk_ids: Sequence[str]) -> set[str]:
        def tx(db: sqlite3.Connection) -> set[str]:
            known: set[str] = set()
            ids = list(chunk_ids)
            for start in range(0, len(ids), 500):
                batch = ids[start : start + 500]
                marks = ",".join("?" * len(batch))
                known.update(
                    row[0]
                    for row in db.execute(
                        "SELECT chunk_id FROM replicas"
                        f" WHERE node_id = ? AND chunk_id IN ({marks})",
                        [node_id, *batch],
                    )
                )
            return known

        return await self._submit(tx)

    async def members(self) -> list[MemberRecord]:
        def tx(db: sqlite3.Connection) -> list[MemberRecord]:
            rows = db.execute("SELECT addr, state FROM members ORDER BY addr")
            return [MemberRecord(addr, MemberState(state)) for addr, state in rows]

        return await self._submit(tx)

    async def set_member(self, addr: str, state: MemberState | None) -> None:
        def tx(db: sqlite3.Connection) -> None:
            if state is None:
                db.execute("DELETE FROM members WHERE addr = ?", (addr,))
            else:
                db.execute(
                    "INSERT INTO members (addr, state) VALUES (?, ?)"
                    " ON CONFLICT (addr) DO UPDATE SET state = excluded.state",
                    (addr, state.value),
                )

        await self._submit(tx, durable=True)

    async def identities(self) -> dict[str, str]:
        def tx(db: sqlite3.Connection) -> dict[str, str]:
            return dict(db.execute("SELECT addr, node_id FROM identities").fetchall())

        return await self._submit(tx)

    async def remember_identity(self, addr: str, node_id: str) -> None:
        await self._submit(
            lambda db: db.execute(
                "INSERT INTO identities (addr, node_id) VALUES (?, ?)"
                " ON CONFLICT (addr) DO UPDATE SET node_id = excluded.node_id",
                (addr, node_id),
            )
        )

    # --- leadership -----------------------------------------------------------------------

    async def lead(self, holder: str, ttl: float) -> int | None:
        def tx(db: sqlite3.Connection) -> int | None:
            row = db.execute(
                lead_statement(_NOW, "?", "?", "max"),
                (holder, ttl),
            ).fetchone()
            return None if row is None else int(row[0])

        return await self._submit(tx)

    async def leadership(self) -> Leadership | None:
        def tx(db: sqlite3.Connection) -> Leadership | None:
            row = db.execute(f"SELECT holder, epoch, expires - {_NOW} FROM leader").fetchone()
            return None if row is None else Leadership(row[0], int(row[1]), float(row[2]))

        return await self._submit(tx)


# a chunk's replica node ids in placement order, comma-separated (chunk aliased as c)
_REPLICA_LIST = (
    "(SELECT group_concat(node_id, ',') FROM (SELECT node_id FROM replicas r"
    " WHERE r.chunk_id = c.chunk_id ORDER BY r.pos))"
)


def _current(db: sqlite3.Connection, name: str, *, data: bool) -> FileVersion:
    """The name's current version; an inline one with its bytes if ``data`` (else with
    their checksum only)."""
    row = db.execute(
        "SELECT v.id, v.size, v.etag, v.content_type, v.created, b.checksum,"
        f" {'b.data' if data else 'NULL'} FROM files f JOIN versions v ON v.id = f.version_id"
        " LEFT JOIN bodies b ON b.version_id = v.id WHERE f.name = ?",
        (name,),
    ).fetchone()
    if row is None:
        raise FileNotFound(f"no file named {name!r}")
    version_id, size, etag, content_type, created, checksum, body = row
    inline = None
    if checksum is not None:
        inline = InlineBody(None if body is None else bytes(body), bytes(checksum))
    return FileVersion(name, version_id, size, etag, content_type, created, inline=inline)


def _chunk_refs(
    db: sqlite3.Connection, version_id: int, limit: int | None = None, start: int = 0
) -> tuple[ChunkRef, ...]:
    """A version's chunks in order, from the one holding byte ``start`` on: the first
    ``limit`` of them (None: all)."""
    sql = (
        "SELECT c.idx, c.chunk_id, c.first_byte, c.size, c.checksum,"
        f" {_REPLICA_LIST}"
        " FROM chunks c WHERE c.version_id = ? AND c.first_byte + c.size > ?"
        " ORDER BY c.idx"
    )
    args: tuple[int, ...] = (version_id, start)
    if limit is not None:
        sql += " LIMIT ?"
        args += (limit,)
    return tuple(
        ChunkRef(idx, cid, first, size, bytes(cs), split_node_ids(nodes))
        for idx, cid, first, size, cs, nodes in db.execute(sql, args)
    )


def _commit(
    db: sqlite3.Connection,
    version_id: int,
    size: int,
    etag: str,
    if_absent: bool,
    if_match: Sequence[str] | None,
    keep_chunks: int,
) -> CommitResult:
    """``MetadataStore.commit`` inside a transaction."""
    row = db.execute(
        "SELECT name, content_type FROM versions WHERE id = ? AND state = ?",
        (version_id, PENDING),
    ).fetchone()
    if row is None:
        raise Conflict(f"upload {version_id} is no longer pending")
    name, content_type = row
    current = _current_pointer(db, name)
    if current is not None and if_absent:
        raise PreconditionFailed(f"{name!r} exists")
    _check_match(db, name, current, if_match)
    # pending -> live, guarded by the state read above
    moved = db.execute(
        f"UPDATE versions SET state = '{LIVE}', size = ?, etag = ?, created = {_NOW},"
        " lease_expires = NULL WHERE id = ? AND state = ? RETURNING created",
        (size, etag, version_id, PENDING),
    ).fetchone()
    if moved is None:
        raise Conflict(f"upload {version_id} is no longer pending")
    replaced = _point(db, name, version_id, current)
    version = FileVersion(name, version_id, size, etag, content_type, moved[0])
    # one read of the rows: a small file's chunk list (one more than asked for, at
    # most) also counts its chunks; only a larger file is counted apart
    refs = _chunk_refs(db, version_id, limit=keep_chunks + 1)
    chunks = len(refs)
    if chunks > keep_chunks:
        (chunks,) = db.execute(
            "SELECT COUNT(*) FROM chunks WHERE version_id = ?", (version_id,)
        ).fetchone()
        return CommitResult(version, replaced, chunks)
    return CommitResult(dataclasses.replace(version, chunks=refs), replaced, chunks, True)


def _current_pointer(db: sqlite3.Connection, name: str) -> tuple[int, int] | None:
    """(version id, generation) of the name's row, if it has one."""
    row = db.execute("SELECT version_id, generation FROM files WHERE name = ?", (name,)).fetchone()
    return None if row is None else (int(row[0]), int(row[1]))


def _check_match(
    db: sqlite3.Connection,
    name: str,
    current: tuple[int, int] | None,
    if_match: Sequence[str] | None,
) -> None:
    """``PreconditionFailed`` unless the name's current version has one of these ETags
    (``"*"``: any); None asks nothing."""
    if match_needs_etag(name, current, if_match):
        assert current is not None and if_match is not None
        (etag,) = db.execute("SELECT etag FROM versions WHERE id = ?", (current[0],)).fetchone()
        check_etag(name, etag, if_match)


def _point(
    db: sqlite3.Connection, name: str, version_id: int, current: tuple[int, int] | None
) -> int | None:
    """Make ``version_id`` the name's current version: a compare-and-swap on the pointer
    the same transaction read (``current``: its version and generation, or None). The
    version it replaces, now dead, is returned; ``Conflict`` if another writer moved the
    pointer in between."""
    if current is None:
        swapped = db.execute(
            "INSERT INTO files (name, version_id, generation) VALUES (?, ?, 1)"
            " ON CONFLICT (name) DO NOTHING RETURNING name",
            (name, version_id),
        ).fetchone()
        if swapped is None:
            raise Conflict(f"{name!r} was created meanwhile")
        return None
    replaced, generation = current
    swapped = db.execute(
        "UPDATE files SET version_id = ?, generation = generation + 1"
        " WHERE name = ? AND generation = ? RETURNING name",
        (version_id, name, generation),
    ).fetchone()
    if swapped is None:
        raise Conflict(f"{name!r} changed meanwhile")
    _kill(db, replaced, LIVE)
    return replaced


def _upload(
    db: sqlite3.Connection, upload_id: str, name: str | None = None
) -> tuple[MultipartUpload, float]:
    """A multipart upload in progress (for ``name``, if given) and its expiry, or
    ``NoSuchUpload``."""
    row = db.execute(
        "SELECT id, name, content_type, created, expires FROM uploads"
        f" WHERE id = ? AND expires > {_NOW}",
        (upload_id,),
    ).fetchone()
    if row is None or (name is not None and row[1] != name):
        raise NoSuchUpload(f"no multipart upload {upload_id!r} in progress")
    return MultipartUpload(*row[:4]), float(row[4])


def _end_upload(db: sqlite3.Connection, upload_id: str) -> None:
    db.execute("DELETE FROM parts WHERE upload_id = ?", (upload_id,))
    db.execute("DELETE FROM uploads WHERE id = ?", (upload_id,))


def _kill(db: sqlite3.Connection, version_id: int, expected: str) -> bool:
    """Move a version from ``expected`` (pending or live) to dead; whether it moved."""
    VersionState(expected).move(VersionState.DEAD)
    moved = db.execute(
        f"UPDATE versions SET state = '{DEAD}', dead_since = {_NOW}, lease_expires = NULL"
        " WHERE id = ? AND state = ? RETURNING id",
        (version_id, expected),
    ).fetchone()
    return moved is not None


def _insert_chunk(db: sqlite3.Connection, version_id: int, intent: ChunkIntent) -> None:
    db.execute(
        "INSERT INTO chunks (version_id, idx, chunk_id, first_byte, size, checksum)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (version_id, intent.index, intent.chunk_id, intent.offset, intent.size, intent.checksum),
    )
    db.executemany(
        "INSERT INTO replicas (chunk_id, node_id, pos) VALUES (?, ?, ?)",
        [(intent.chunk_id, node, pos) for pos, node in enumerate(intent.nodes)],
    )
