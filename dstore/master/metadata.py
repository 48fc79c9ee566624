"""The chunk master's memory: files, versions, chunks and their replicas.

``MetadataStore`` is the interface (a PostgreSQL engine can implement it later);
``SQLiteMetadataStore`` is the embedded engine: SQLite in WAL mode, driven from one
dedicated thread, so the event loop never blocks and the store is never held across
network I/O. All SQL lives in this module; every state change is one transaction.

Versions move ``pending`` → ``live`` → ``dead`` (or ``pending`` → ``dead`` when an upload
is abandoned). A small file's version is born ``live`` with its bytes inline (table
``bodies``): no chunk, no node, one transaction. A name points at its one live version;
a commit swaps that pointer in one transaction. Dead versions are reclaimed by the reaper,
which deletes their chunks from the nodes and then their rows.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import queue
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from dstore.errors import DstoreError, OutOfSpace

T = TypeVar("T")


class PreconditionFailed(DstoreError):
    code = "precondition_failed"


class FileNotFound(DstoreError):
    code = "not_found"


@dataclass(frozen=True, slots=True)
class ChunkIntent:
    """A chunk about to be sent: recorded before its bytes leave the gateway."""

    index: int
    chunk_id: str
    size: int
    checksum: bytes
    nodes: Sequence[str]


@dataclass(frozen=True, slots=True)
class ChunkRef:
    index: int
    chunk_id: str
    offset: int  # of the chunk's first byte within the file
    size: int
    checksum: bytes
    nodes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class InlineBody:
    """A small file's bytes, kept in the metadata store itself instead of on the nodes,
    with their checksum (verified before they are served, like a chunk's). ``data`` is
    None in a version from the lookup cache, which keeps no bytes: ``inline_data`` has
    them (and the gateway's read cache, usually)."""

    data: bytes | None
    checksum: bytes


@dataclass(frozen=True, slots=True)
class FileVersion:
    name: str
    version_id: int
    size: int
    etag: str
    content_type: str
    created: float
    chunks: tuple[ChunkRef, ...] = ()
    inline: InlineBody | None = None  # for a file kept inline (no chunks)


@dataclass(frozen=True, slots=True)
class FileInfo:
    name: str
    size: int
    etag: str
    created: float


@dataclass(frozen=True, slots=True)
class DeadChunk:
    version_id: int
    chunk_id: str
    nodes: tuple[str, ...]
    dead_since: float


@dataclass(frozen=True, slots=True)
class ChunkReplicas:
    """A chunk as repair sees it: where its copies are meant to be."""

    chunk_id: str
    size: int
    checksum: bytes
    nodes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class MemberRecord:
    """A storage node the gateway was told about at run time (join, drain)."""

    addr: str
    state: str  # "active", "draining" or "removed"


@dataclass(frozen=True, slots=True)
class Purged:
    """What one ``purge_dead`` dropped."""

    versions: int  # dead versions forgotten
    inline: tuple[int, ...] = ()  # versions whose inline bytes were deleted


@dataclass(slots=True)
class CommitResult:
    version: FileVersion
    replaced: int | None = None  # the version that was live before, now dead
    extra: dict[str, Any] = field(default_factory=dict)


class MetadataStore(abc.ABC):
    """What the gateway needs from its metadata, whatever the engine."""

    @abc.abstractmethod
    async def open(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def begin_upload(
        self, name: str, content_type: str, lease: float, first: ChunkIntent | None = None
    ) -> int:
        """A new pending version with a lease, and the intent for its first chunk in the
        same transaction (one round trip for a one-chunk file); returns its id."""

    @abc.abstractmethod
    async def renew_leases(self, version_ids: Sequence[int], lease: float) -> None:
        """Extend the leases of uploads still in progress."""

    @abc.abstractmethod
    async def add_chunk(self, version_id: int, intent: ChunkIntent) -> None:
        """Record a chunk intent before its bytes are sent: the reaper can always find it."""

    @abc.abstractmethod
    async def add_replicas(self, chunk_id: str, nodes: Sequence[str]) -> None:
        """Record more intended replicas of a chunk (a failed node was replaced)."""

    @abc.abstractmethod
    async def commit(
        self, version_id: int, size: int, etag: str, *, if_absent: bool = False
    ) -> CommitResult:
        """Make the version current for its name, atomically; the old one becomes dead.
        ``if_absent``: raise ``PreconditionFailed`` if the name exists (and abort)."""

    @abc.abstractmethod
    async def commit_inline(
        self,
        name: str,
        content_type: str,
        body: InlineBody,
        etag: str,
        *,
        if_absent: bool = False,
    ) -> CommitResult:
        """A whole small file in one transaction: a new version, live at once, holding
        its bytes; the name's old version becomes dead. ``if_absent`` as for ``commit``."""

    @abc.abstractmethod
    async def abort(self, version_id: int) -> None:
        """Give up a pending version; its chunks are reclaimed."""

    @abc.abstractmethod
    async def lookup(self, name: str, start: int = 0, limit: int | None = None) -> FileVersion:
        """The live version of a name with its chunks, or ``FileNotFound``. With
        ``limit``: only the chunks from the one holding byte ``start`` on, at most
        ``limit`` of them (or more: a version kept whole in a cache comes whole), so
        that the first byte of a large file waits for one page of its chunk list, not
        all of it; ``chunk_page`` gives the rest. An inline file's version has no chunks
        and comes with its bytes (from the lookup cache, with their checksum only)."""

    @abc.abstractmethod
    async def chunk_page(self, version_id: int, start: int, limit: int) -> tuple[ChunkRef, ...]:
        """A version's chunks from the one holding byte ``start`` on, at most ``limit``;
        fewer than asked for only at the end of the version (or if it is gone)."""

    @abc.abstractmethod
    async def inline_data(self, version_id: int) -> bytes | None:
        """The bytes of an inline file's version; None once the version is reclaimed."""

    @abc.abstractmethod
    async def inline_bodies(self, after: int, limit: int) -> list[tuple[int, str, InlineBody]]:
        """(version id, name, body) of live inline versions with ids above ``after``, in
        id order, at most ``limit``: what the inline scrubber reads, a batch at a time."""

    @abc.abstractmethod
    async def head(self, name: str) -> FileVersion:
        """Like ``lookup`` without the chunk list."""

    @abc.abstractmethod
    async def delete(self, name: str) -> int:
        """Remove a name at once; returns the version that became dead."""

    @abc.abstractmethod
    async def list_files(
        self, prefix: str, start_after: str, limit: int
    ) -> tuple[list[FileInfo], str | None]: ...

    @abc.abstractmethod
    async def totals(self) -> tuple[int, int]:
        """(files, bytes) of live versions."""

    @abc.abstractmethod
    async def expire_leases(self, now: float) -> list[int]:
        """Abort pending versions whose lease ran out; returns their ids."""

    @abc.abstractmethod
    async def dead_chunks(self, dead_before: float, limit: int) -> list[DeadChunk]:
        """Chunks of dead versions that died before ``dead_before``."""

    @abc.abstractmethod
    async def forget_replica(self, chunk_id: str, node_id: str) -> None:
        """A dead chunk's replica is gone from its node."""

    @abc.abstractmethod
    async def purge_dead(self) -> Purged:
        """Drop dead versions with no replica left, and the inline bytes of every dead
        version."""

    @abc.abstractmethod
    async def chunks_on(self, node_ids: Sequence[str], limit: int) -> list[ChunkReplicas]:
        """Chunks of live or pending versions with a replica on any of these nodes."""

    @abc.abstractmethod
    async def chunk_replicas(self, chunk_id: str) -> ChunkReplicas | None: ...

    @abc.abstractmethod
    async def replica_count(self, node_id: str) -> int:
        """How many replicas are recorded on a node."""

    @abc.abstractmethod
    async def members(self) -> list[MemberRecord]: ...

    @abc.abstractmethod
    async def identities(self) -> dict[str, str]:
        """The node id last seen at each storage address."""

    @abc.abstractmethod
    async def remember_identity(self, addr: str, node_id: str) -> None: ...

    @abc.abstractmethod
    async def replica_node_ids(self) -> set[str]:
        """Every node id some replica is recorded on."""

    @abc.abstractmethod
    async def set_member(self, addr: str, state: str | None) -> None:
        """Record a run-time member (state None: forget it)."""

    @abc.abstractmethod
    async def known_replicas(self, node_id: str, chunk_ids: Sequence[str]) -> set[str]:
        """Which of these chunk ids a version (live, pending or dead) expects on this node."""


SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    name          TEXT NOT NULL,
    state         TEXT NOT NULL CHECK (state IN ('pending', 'live', 'dead')),
    size          INTEGER NOT NULL DEFAULT 0,
    etag          TEXT NOT NULL DEFAULT '',
    content_type  TEXT NOT NULL DEFAULT '',
    created       REAL NOT NULL,
    lease_expires REAL,
    dead_since    REAL
);
CREATE INDEX IF NOT EXISTS versions_pending ON versions (lease_expires) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS versions_dead ON versions (dead_since) WHERE state = 'dead';
CREATE TABLE IF NOT EXISTS files (
    name        TEXT PRIMARY KEY,
    version_id  INTEGER NOT NULL REFERENCES versions (id),
    generation  INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS chunks (
    version_id  INTEGER NOT NULL REFERENCES versions (id),
    idx         INTEGER NOT NULL,
    chunk_id    TEXT NOT NULL UNIQUE,
    offset      INTEGER NOT NULL,
    size        INTEGER NOT NULL,
    checksum    BLOB NOT NULL,
    PRIMARY KEY (version_id, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS bodies (  -- the bytes of files kept inline (no chunks)
    version_id  INTEGER PRIMARY KEY REFERENCES versions (id),
    checksum    BLOB NOT NULL,
    data        BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS replicas (
    chunk_id    TEXT NOT NULL,
    node_id     TEXT NOT NULL,
    pos         INTEGER NOT NULL,  -- placement order: reads prefer the first
    PRIMARY KEY (chunk_id, node_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS replicas_node ON replicas (node_id);
CREATE TABLE IF NOT EXISTS identities (
    addr        TEXT PRIMARY KEY,
    node_id     TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS members (
    addr        TEXT PRIMARY KEY,
    state       TEXT NOT NULL CHECK (state IN ('active', 'draining', 'removed'))
) WITHOUT ROWID;
"""


class _Op:
    __slots__ = ("durable", "fn", "future", "loop")

    def __init__(
        self,
        fn: Callable[[sqlite3.Connection], Any],
        durable: bool,
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[Any],
    ) -> None:
        self.fn = fn
        self.durable = durable
        self.loop = loop
        self.future = future


class LookupCache:
    """The current version of recently read names, so that a `lookup` of a name read
    before needs no trip to the metadata thread (for a small file that trip was a third
    of the gateway's CPU per GET). Bounded: `entries` names, each of at most
    `max_chunks` chunks (a large file's lookup is nothing beside its transfer). It keeps
    no file bytes: an inline file's version goes in without them (the gateway's read
    cache holds bytes, under its own bound).

    Only the metadata thread fills or empties it, and only once the transaction that
    read or changed the rows has committed, in the order of the operations, and before
    its caller is answered: a commit puts the name's new version in (or drops the name,
    for a version too large to keep); a delete of the name, or a replica added to or
    forgotten for one of its chunks, drops the entry. So a hit is never older than a change
    anyone has been told of. This holds because the database belongs to this process
    alone; an engine shared by several gateways needs another way to hear of changes."""

    def __init__(self, entries: int = 4096, max_chunks: int = 8) -> None:
        self.entries = entries
        self.max_chunks = max_chunks
        self.hits = 0
        self.misses = 0
        self._versions: OrderedDict[str, FileVersion] = OrderedDict()
        self._by_chunk: dict[str, str] = {}  # chunk id -> name (chunk ids are unique)
        self._lock = threading.Lock()  # the loop reads while the metadata thread writes

    def __len__(self) -> int:
        return len(self._versions)

    def admits(self, chunks: int) -> bool:
        """Whether a version of ``chunks`` chunks would be kept."""
        return self.entries > 0 and chunks <= self.max_chunks

    def get(self, name: str) -> FileVersion | None:
        with self._lock:
            version = self._versions.get(name)
            if version is None:
                self.misses += 1
                return None
            self._versions.move_to_end(name)
            self.hits += 1
            return version

    def put(self, version: FileVersion) -> None:
        if not self.admits(len(version.chunks)):
            return
        if version.inline is not None and version.inline.data is not None:
            version = dataclasses.replace(version, inline=InlineBody(None, version.inline.checksum))
        with self._lock:
            self._forget(version.name)
            self._versions[version.name] = version
            for chunk in version.chunks:
                self._by_chunk[chunk.chunk_id] = version.name
            while len(self._versions) > self.entries:
                self._forget(next(iter(self._versions)))

    def drop(self, name: str) -> None:
        with self._lock:
            self._forget(name)

    def drop_chunk(self, chunk_id: str) -> None:
        with self._lock:
            name = self._by_chunk.get(chunk_id)
            if name is not None:
                self._forget(name)

    def clear(self) -> None:
        with self._lock:
            self._versions.clear()
            self._by_chunk.clear()

    def _forget(self, name: str) -> None:
        version = self._versions.pop(name, None)
        if version is not None:
            for chunk in version.chunks:
                self._by_chunk.pop(chunk.chunk_id, None)


class SQLiteMetadataStore(MetadataStore):
    """SQLite driven by one dedicated thread with group commit: operations queued while
    a transaction commits are run together in the next one, each inside its own
    savepoint (so each stays atomic and a failing one rolls back alone), and share one
    commit, one fsync for those that must be durable. Lookups are answered from a
    `LookupCache` where they can be."""

    MAX_GROUP = 128

    def __init__(self, path: Path, *, cache: LookupCache | None = None) -> None:
        self.path = Path(path)
        self.groups = 0
        self.ops = 0
        self.cache = cache if cache is not None else LookupCache()
        self._db: sqlite3.Connection | None = None
        self._queue: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        # what the committed group does to the cache, in op order (metadata thread only)
        self._after_commit: list[Callable[[], None]] = []

    def __repr__(self) -> str:
        state = "open" if self._db else "closed"
        return f"<SQLiteMetadataStore {self.path} {state}, {self.ops} ops in {self.groups} commits>"

    # --- lifecycle ------------------------------------------------------------------------

    async def open(self) -> None:
        await asyncio.to_thread(self._open)
        self._thread = threading.Thread(target=self._worker, name="dstore-sqlite", daemon=True)
        self._thread.start()

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode = WAL")
        # NORMAL: a commit survives a crash of the process (kill -9); a group holding a
        # write that must survive power loss too (commit, delete) commits with FULL.
        db.execute("PRAGMA synchronous = NORMAL")
        db.execute("PRAGMA foreign_keys = ON")
        db.execute("PRAGMA busy_timeout = 5000")
        db.executescript(SCHEMA)
        self._db = db

    async def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        if self._db is not None:
            self._db.close()
            self._db = None

    async def _submit(self, fn: Callable[[sqlite3.Connection], T], *, durable: bool = False) -> T:
        if self._thread is None:
            raise DstoreError("metadata store is closed", code="unavailable")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put(_Op(fn, durable, loop, future))
        try:
            return await future
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode == sqlite3.SQLITE_FULL:
                raise OutOfSpace("the metadata store's disk is full") from exc
            raise

    def _worker(self) -> None:
        db = self._db
        assert db is not None
        while True:
            first = self._queue.get()
            if first is None:
                return
            group = [first]
            stop = False
            while len(group) < self.MAX_GROUP:
                try:
                    op = self._queue.get_nowait()
                except queue.Empty:
                    break
                if op is None:
                    stop = True
                    break
                group.append(op)
            self._run_group(db, group)
            if stop:
                return

    def _run_group(self, db: sqlite3.Connection, group: list[_Op]) -> None:
        effects = self._after_commit
        results, again = self._transact(db, group, effects)
        if again:  # once: if SQLite gives up this one too, its ops all fail
            results += self._transact(db, again, effects, retry=False)[0]
        for effect in effects:  # before any caller hears of the group
            effect()
        effects.clear()
        self.groups += 1
        self.ops += len(group)
        # one wake-up per loop for the whole group, not one per op
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Op, bool, Any]]] = {}
        for result in results:
            by_loop.setdefault(result[0].loop, []).append(result)
        for loop, settled in by_loop.items():
            loop.call_soon_threadsafe(_settle_all, settled)

    def _transact(
        self,
        db: sqlite3.Connection,
        group: list[_Op],
        effects: list[Callable[[], None]],
        *,
        retry: bool = True,
    ) -> tuple[list[tuple[_Op, bool, Any]], list[_Op]]:
        """Run a group in one transaction; each op's result, and the ops to run again in
        a new one: SQLite rolls a whole transaction back on some errors (a full disk, an
        I/O error), and then only the op that hit it has failed."""
        results: list[tuple[_Op, bool, Any]] = []
        durable = any(op.durable for op in group)
        effects.clear()
        try:
            if durable:
                db.execute("PRAGMA synchronous = FULL")
            db.execute("BEGIN IMMEDIATE")
            for op in group:
                db.execute("SAVEPOINT op")
                mark = len(effects)
                try:
                    value = op.fn(db)
                except Exception as exc:
                    if not db.in_transaction:  # SQLite gave the whole transaction up
                        if not retry:
                            raise
                        effects.clear()
                        self.cache.clear()  # what the group read may never have been
                        return [(op, False, exc)], [o for o in group if o is not op]
                    db.execute("ROLLBACK TO op")
                    db.execute("RELEASE op")
                    del effects[mark:]
                    results.append((op, False, exc))
                else:
                    db.execute("RELEASE op")
                    results.append((op, True, value))
            db.execute("COMMIT")
        except Exception as exc:  # the commit itself failed: every op in the group fails
            if db.in_transaction:
                db.execute("ROLLBACK")
            results = [(op, False, exc) for op in group]
            effects.clear()
            self.cache.clear()  # what the group read may never have been
        finally:
            if durable:
                db.execute("PRAGMA synchronous = NORMAL")
        return results, []

    # --- uploads --------------------------------------------------------------------------

    async def begin_upload(
        self, name: str, content_type: str, lease: float, first: ChunkIntent | None = None
    ) -> int:
        now = time.time()

        def tx(db: sqlite3.Connection) -> int:
            cur = db.execute(
                "INSERT INTO versions (name, state, content_type, created, lease_expires)"
                " VALUES (?, 'pending', ?, ?, ?)",
                (name, content_type, now, now + lease),
            )
            assert cur.lastrowid is not None
            if first is not None:
                _insert_chunk(db, cur.lastrowid, first)
            return cur.lastrowid

        return await self._submit(tx)

    async def renew_leases(self, version_ids: Sequence[int], lease: float) -> None:
        expires = time.time() + lease

        def tx(db: sqlite3.Connection) -> None:
            db.executemany(
                "UPDATE versions SET lease_expires = ? WHERE id = ? AND state = 'pending'",
                [(expires, version_id) for version_id in version_ids],
            )

        await self._submit(tx)

    async def add_chunk(self, version_id: int, intent: ChunkIntent) -> None:
        def tx(db: sqlite3.Connection) -> None:
            _insert_chunk(db, version_id, intent)

        await self._submit(tx)

    async def add_replicas(self, chunk_id: str, nodes: Sequence[str]) -> None:
        def tx(db: sqlite3.Connection) -> None:
            (last,) = db.execute(
                "SELECT COALESCE(MAX(pos), -1) FROM replicas WHERE chunk_id = ?", (chunk_id,)
            ).fetchone()
            db.executemany(
                "INSERT OR IGNORE INTO replicas (chunk_id, node_id, pos) VALUES (?, ?, ?)",
                [(chunk_id, node, last + 1 + i) for i, node in enumerate(nodes)],
            )
            self._after_commit.append(lambda: self.cache.drop_chunk(chunk_id))

        await self._submit(tx)

    async def commit(
        self, version_id: int, size: int, etag: str, *, if_absent: bool = False
    ) -> CommitResult:
        now = time.time()

        def tx(db: sqlite3.Connection) -> CommitResult:
            row = db.execute(
                "SELECT name, state, content_type FROM versions WHERE id = ?", (version_id,)
            ).fetchone()
            if row is None or row[1] != "pending":
                raise DstoreError(f"upload {version_id} is no longer pending", code="conflict")
            name, _, content_type = row
            current = db.execute(
                "SELECT version_id, generation FROM files WHERE name = ?", (name,)
            ).fetchone()
            if current is not None and if_absent:
                raise PreconditionFailed(f"{name!r} exists")
            db.execute(
                "UPDATE versions SET state = 'live', size = ?, etag = ?, created = ?,"
                " lease_expires = NULL WHERE id = ?",
                (size, etag, now, version_id),
            )
            replaced = _point(db, name, version_id, current, now)
            version = FileVersion(name, version_id, size, etag, content_type, now)
            # one read of the rows: a small file's chunk list (one more than the cache
            # keeps, at most) also counts its chunks; only a larger file is counted apart
            refs = _chunk_refs(db, version_id, limit=self.cache.max_chunks + 1)
            chunks = len(refs)
            if chunks > self.cache.max_chunks:
                chunks = db.execute(
                    "SELECT COUNT(*) FROM chunks WHERE version_id = ?", (version_id,)
                ).fetchone()[0]
            if self.cache.admits(chunks):
                # the name's new current version, so that its first GET is a hit too
                cached = dataclasses.replace(version, chunks=refs)
                self._after_commit.append(lambda: self.cache.put(cached))
            else:
                self._after_commit.append(lambda: self.cache.drop(name))
            return CommitResult(version, replaced, {"chunks": chunks})

        return await self._submit(tx, durable=True)

    async def commit_inline(
        self,
        name: str,
        content_type: str,
        body: InlineBody,
        etag: str,
        *,
        if_absent: bool = False,
    ) -> CommitResult:
        now = time.time()
        data = body.data
        assert data is not None

        def tx(db: sqlite3.Connection) -> CommitResult:
            current = db.execute(
                "SELECT version_id, generation FROM files WHERE name = ?", (name,)
            ).fetchone()
            if current is not None and if_absent:
                raise PreconditionFailed(f"{name!r} exists")
            cur = db.execute(
                "INSERT INTO versions (name, state, size, etag, content_type, created)"
                " VALUES (?, 'live', ?, ?, ?, ?)",
                (name, len(data), etag, content_type, now),
            )
            version_id = cur.lastrowid
            assert version_id is not None
            db.execute(
                "INSERT INTO bodies (version_id, checksum, data) VALUES (?, ?, ?)",
                (version_id, body.checksum, data),
            )
            replaced = _point(db, name, version_id, current, now)
            version = FileVersion(name, version_id, len(data), etag, content_type, now, inline=body)
            self._after_commit.append(lambda: self.cache.put(version))
            return CommitResult(version, replaced, {"chunks": 0})

        return await self._submit(tx, durable=True)

    async def abort(self, version_id: int) -> None:
        def tx(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE versions SET state = 'dead', dead_since = ?, lease_expires = NULL"
                " WHERE id = ? AND state = 'pending'",
                (time.time(), version_id),
            )

        await self._submit(tx)

    # --- reads ----------------------------------------------------------------------------

    def _current(self, db: sqlite3.Connection, name: str, *, data: bool) -> FileVersion:
        """The name's current version; an inline one with its bytes if ``data`` (else
        with their checksum only, as the lookup cache keeps it)."""
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

    async def head(self, name: str) -> FileVersion:
        return await self._submit(lambda db: self._current(db, name, data=False))

    async def lookup(self, name: str, start: int = 0, limit: int | None = None) -> FileVersion:
        hit = self.cache.get(name)
        if hit is not None:
            return hit
        if limit is None:
            rows = -1
        elif start > 0:
            rows = limit
        else:  # enough to tell whether the whole list fits in the cache
            rows = max(limit, self.cache.max_chunks + 1)

        def tx(db: sqlite3.Connection) -> FileVersion:
            version = self._current(db, name, data=True)
            if version.inline is not None:
                self._after_commit.append(lambda: self.cache.put(version))
                return version
            refs = _chunk_refs(db, version.version_id, limit=rows, start=start)
            found = dataclasses.replace(version, chunks=refs)
            if start == 0 and (rows < 0 or len(refs) < rows):  # the whole list
                self._after_commit.append(lambda: self.cache.put(found))
            return found

        return await self._submit(tx)

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
                " WHERE b.version_id > ? AND v.state = 'live' ORDER BY b.version_id LIMIT ?",
                (after, limit),
            ).fetchall()
            return [(vid, name, InlineBody(bytes(data), bytes(cs))) for vid, name, cs, data in rows]

        return await self._submit(tx)

    async def chunk_page(self, version_id: int, start: int, limit: int) -> tuple[ChunkRef, ...]:
        return await self._submit(lambda db: _chunk_refs(db, version_id, limit=limit, start=start))

    async def delete(self, name: str) -> int:
        def tx(db: sqlite3.Connection) -> int:
            row = db.execute("SELECT version_id FROM files WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise FileNotFound(f"no file named {name!r}")
            db.execute("DELETE FROM files WHERE name = ?", (name,))
            self._after_commit.append(lambda: self.cache.drop(name))
            _kill(db, row[0], time.time())
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
                if ord(prefix[-1]) < 0x10FFFF:
                    # names with the prefix sort below the prefix with its last character
                    # bumped (SQLite's BINARY order is code point order, like Python's):
                    # this bound lets the scan stop at the end of the prefix's range
                    sql += " AND f.name < ?"
                    args.append(prefix[:-1] + chr(ord(prefix[-1]) + 1))
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

    # --- reclaiming -----------------------------------------------------------------------

    async def expire_leases(self, now: float) -> list[int]:
        def tx(db: sqlite3.Connection) -> list[int]:
            ids = [
                row[0]
                for row in db.execute(
                    "SELECT id FROM versions WHERE state = 'pending' AND lease_expires < ?",
                    (now,),
                )
            ]
            for version_id in ids:
                _kill(db, version_id, now)
            return ids

        return await self._submit(tx)

    async def dead_chunks(self, dead_before: float, limit: int) -> list[DeadChunk]:
        def tx(db: sqlite3.Connection) -> list[DeadChunk]:
            rows = db.execute(
                "SELECT c.version_id, c.chunk_id,"
                f" {_REPLICA_LIST}, v.dead_since"
                " FROM versions v JOIN chunks c ON c.version_id = v.id"
                " WHERE v.state = 'dead' AND v.dead_since < ? ORDER BY v.dead_since LIMIT ?",
                (dead_before, limit),
            ).fetchall()
            return [DeadChunk(vid, cid, _node_ids(nodes), since) for vid, cid, nodes, since in rows]

        return await self._submit(tx)

    async def forget_replica(self, chunk_id: str, node_id: str) -> None:
        def tx(db: sqlite3.Connection) -> None:
            db.execute(
                "DELETE FROM replicas WHERE chunk_id = ? AND node_id = ?", (chunk_id, node_id)
            )
            self._after_commit.append(lambda: self.cache.drop_chunk(chunk_id))

        await self._submit(tx)

    async def purge_dead(self) -> Purged:
        def tx(db: sqlite3.Connection) -> Purged:
            # an inline body has no reader to wait for: a GET holds its bytes from the lookup
            inline = db.execute(
                "DELETE FROM bodies WHERE version_id IN (SELECT id FROM versions WHERE state ="
                " 'dead') RETURNING version_id"
            ).fetchall()
            db.execute(
                "DELETE FROM chunks WHERE version_id IN (SELECT id FROM versions WHERE state ="
                " 'dead') AND NOT EXISTS (SELECT 1 FROM replicas r WHERE r.chunk_id ="
                " chunks.chunk_id)"
            )
            cur = db.execute(
                "DELETE FROM versions WHERE state = 'dead' AND NOT EXISTS"
                " (SELECT 1 FROM chunks c WHERE c.version_id = versions.id)"
            )
            return Purged(cur.rowcount, tuple(row[0] for row in inline))

        return await self._submit(tx)

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
                " WHERE v.state IN ('live', 'pending') AND c.chunk_id IN"
                f" (SELECT chunk_id FROM replicas WHERE node_id IN ({marks}))"
                " LIMIT ?",
                (*ids, limit),
            ).fetchall()
            return [
                ChunkReplicas(cid, size, bytes(cs), _node_ids(nodes))
                for cid, size, cs, nodes in rows
            ]

        return await self._submit(tx)

    async def chunk_replicas(self, chunk_id: str) -> ChunkReplicas | None:
        def tx(db: sqlite3.Connection) -> ChunkReplicas | None:
            row = db.execute(
                "SELECT c.chunk_id, c.size, c.checksum,"
                f" {_REPLICA_LIST}"
                " FROM chunks c JOIN versions v ON v.id = c.version_id"
                " WHERE c.chunk_id = ? AND v.state IN ('live', 'pending')",
                (chunk_id,),
            ).fetchone()
            if row is None:
                return None
            cid, size, cs, nodes = row
            return ChunkReplicas(cid, size, bytes(cs), _node_ids(nodes))

        return await self._submit(tx)

    async def replica_count(self, node_id: str) -> int:
        def tx(db: sqlite3.Connection) -> int:
            (count,) = db.execute(
                "SELECT COUNT(*) FROM replicas WHERE node_id = ?", (node_id,)
            ).fetchone()
            return int(count)

        return await self._submit(tx)

    async def members(self) -> list[MemberRecord]:
        def tx(db: sqlite3.Connection) -> list[MemberRecord]:
            return [MemberRecord(*row) for row in db.execute("SELECT addr, state FROM members")]

        return await self._submit(tx)

    async def identities(self) -> dict[str, str]:
        def tx(db: sqlite3.Connection) -> dict[str, str]:
            return dict(db.execute("SELECT addr, node_id FROM identities").fetchall())

        return await self._submit(tx)

    async def remember_identity(self, addr: str, node_id: str) -> None:
        def tx(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO identities (addr, node_id) VALUES (?, ?)"
                " ON CONFLICT (addr) DO UPDATE SET node_id = excluded.node_id",
                (addr, node_id),
            )

        await self._submit(tx)

    async def replica_node_ids(self) -> set[str]:
        def tx(db: sqlite3.Connection) -> set[str]:
            return {row[0] for row in db.execute("SELECT DISTINCT node_id FROM replicas")}

        return await self._submit(tx)

    async def set_member(self, addr: str, state: str | None) -> None:
        def tx(db: sqlite3.Connection) -> None:
            if state is None:
                db.execute("DELETE FROM members WHERE addr = ?", (addr,))
            else:
                db.execute(
                    "INSERT INTO members (addr, state) VALUES (?, ?)"
                    " ON CONFLICT (addr) DO UPDATE SET state = excluded.state",
                    (addr, state),
                )

        await self._submit(tx, durable=True)

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


# a chunk's replica node ids in placement order, comma-separated (chunk aliased as c)
_REPLICA_LIST = (
    "(SELECT group_concat(node_id, ',') FROM (SELECT node_id FROM replicas r"
    " WHERE r.chunk_id = c.chunk_id ORDER BY r.pos))"
)


def _chunk_refs(
    db: sqlite3.Connection, version_id: int, limit: int = -1, start: int = 0
) -> tuple[ChunkRef, ...]:
    """A version's chunks in order, from the one holding byte ``start`` on: the first
    ``limit`` of them (-1: all)."""
    rows = db.execute(
        "SELECT c.idx, c.chunk_id, c.offset, c.size, c.checksum,"
        f" {_REPLICA_LIST}"
        " FROM chunks c WHERE c.version_id = ? AND (? = 0 OR c.offset + c.size > ?)"
        " ORDER BY c.idx LIMIT ?",
        (version_id, start, start, limit),
    ).fetchall()
    return tuple(
        ChunkRef(idx, cid, off, size, bytes(cs), _node_ids(nodes))
        for idx, cid, off, size, cs, nodes in rows
    )


def _node_ids(joined: str | None) -> tuple[str, ...]:
    return tuple(n for n in (joined or "").split(",") if n)


def _settle_all(results: list[tuple[_Op, bool, Any]]) -> None:
    for op, ok, value in results:
        if op.future.cancelled():
            continue  # the caller gave up waiting; the transaction stands as it was decided
        if ok:
            op.future.set_result(value)
        else:
            op.future.set_exception(value)


def _point(
    db: sqlite3.Connection,
    name: str,
    version_id: int,
    current: tuple[int, int] | None,
    now: float,
) -> int | None:
    """Make ``version_id`` the name's current version, the compare-and-swap of a commit
    (``current``: the name's row as the same transaction read it); the version it
    replaces, now dead, is returned."""
    if current is None:
        db.execute(
            "INSERT INTO files (name, version_id, generation) VALUES (?, ?, 1)",
            (name, version_id),
        )
        return None
    replaced, generation = current
    db.execute(
        "UPDATE files SET version_id = ?, generation = ? WHERE name = ?",
        (version_id, generation + 1, name),
    )
    _kill(db, replaced, now)
    return int(replaced)


def _kill(db: sqlite3.Connection, version_id: int, now: float) -> None:
    db.execute(
        "UPDATE versions SET state = 'dead', dead_since = ?, lease_expires = NULL WHERE id = ?",
        (now, version_id),
    )


def _insert_chunk(db: sqlite3.Connection, version_id: int, intent: ChunkIntent) -> None:
    (offset,) = db.execute(
        "SELECT COALESCE(SUM(size), 0) FROM chunks WHERE version_id = ? AND idx < ?",
        (version_id, intent.index),
    ).fetchone()
    db.execute(
        "INSERT INTO chunks (version_id, idx, chunk_id, offset, size, checksum)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (version_id, intent.index, intent.chunk_id, offset, intent.size, intent.checksum),
    )
    db.executemany(
        "INSERT INTO replicas (chunk_id, node_id, pos) VALUES (?, ?, ?)",
        [(intent.chunk_id, node, pos) for pos, node in enumerate(intent.nodes)],
    )
