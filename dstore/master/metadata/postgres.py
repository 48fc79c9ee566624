"""The PostgreSQL engine, for several gateways on one database: asyncpg with a pool of
connections, one transaction per operation (READ COMMITTED), every change guarded by the
state it expects (``UPDATE … WHERE state = … RETURNING``, compare-and-swap on the name's
``generation``), so two gateways racing on one name or one version cannot both win.
Times are the database's clock. Names sort by bytes (``COLLATE "C"``): the same order as
SQLite's and Python's.

Writes that must survive a crash of the database's machine (commits, deletes, members)
commit with ``synchronous_commit`` on; the rest (intents, leases, replica bookkeeping,
which the reconciler and the lease expiry repair) commit without waiting for the WAL
flush, as the SQLite engine's ``synchronous = NORMAL``.

asyncpg is imported only when a PostgreSQL URL is given (``pip install 'dstore[postgres]'``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import orjson

from dstore.errors import (
    BucketNotEmpty,
    ConfigError,
    Conflict,
    DstoreError,
    FileNotFound,
    MetadataUnavailable,
    NoSuchBucket,
    NoSuchUpload,
    OutOfSpace,
    PreconditionFailed,
)
from dstore.master.metadata.batch import Batcher
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
from dstore.master.metadata.sql import (
    BUCKET_HOLDS,
    CHECK_IN,
    CREATE_BUCKET,
    FORGET_GATEWAYS,
    MULTIPART_TABLES,
    PINNED,
    REQUEST_WORK,
    SAVE_JOB,
    SEEN,
    TAKE_WORK,
    chosen_parts,
    lead_statement,
    pin_statement,
    prefix_end,
    renew_pins_statement,
    split_node_ids,
)

T = TypeVar("T")
K = TypeVar("K")
R = TypeVar("R")
Tx = Any  # an asyncpg connection inside a transaction

_NOW = "extract(epoch from clock_timestamp())"
PENDING, LIVE, DEAD = (s.value for s in VersionState)
_BEGIN_DURABLE = "BEGIN ISOLATION LEVEL READ COMMITTED"
# (what the reconciler and lease expiry repair need not wait for the WAL flush)
_BEGIN = _BEGIN_DURABLE + "; SET LOCAL synchronous_commit TO off"
SCHEMA_LOCK = 0x64_73_74_6F_72_65  # advisory lock key: "dstore"

# What the functions share: the name's pointer read under a transaction-long advisory lock
# on the name (writers of one name, from any gateway, take turns; the compare-and-swap on
# the generation stays as the guard), and the If-None-Match / If-Match checks, answered
# as an outcome ('exists', 'missing', 'mismatch') rather than an error, so one refused
# write in a batch leaves the others be.
_NAME_FUNCTIONS = r"""
CREATE FUNCTION dstore_check(p_name TEXT, p_if_absent BOOLEAN, p_if_match JSONB,
                             OUT cur_id BIGINT, OUT cur_gen BIGINT, OUT outcome TEXT)
LANGUAGE plpgsql AS $fn$
DECLARE
    cur_etag TEXT;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended(p_name, 0));
    SELECT f.version_id, f.generation INTO cur_id, cur_gen FROM files f WHERE f.name = p_name;
    outcome := 'ok';
    IF cur_id IS NOT NULL AND p_if_absent THEN
        outcome := 'exists';
    ELSIF p_if_match IS NOT NULL AND cur_id IS NULL THEN
        outcome := 'missing';
    ELSIF p_if_match IS NOT NULL AND NOT p_if_match ? '*' THEN
        SELECT v.etag INTO cur_etag FROM versions v WHERE v.id = cur_id;
        IF NOT p_if_match ? cur_etag THEN
            outcome := 'mismatch';
        END IF;
    END IF;
END $fn$;

-- point the name at p_version (its pointer read at cur_id, cur_gen) and kill the old one
CREATE FUNCTION dstore_point(p_name TEXT, p_version BIGINT, cur_id BIGINT, cur_gen BIGINT)
RETURNS VOID LANGUAGE plpgsql AS $fn$
BEGIN
    IF cur_id IS NULL THEN
        INSERT INTO files (name, version_id, generation) VALUES (p_name, p_version, 1);
    ELSE
        UPDATE files SET version_id = p_version, generation = generation + 1
            WHERE name = p_name AND generation = cur_gen;
        IF NOT FOUND THEN
            RAISE EXCEPTION USING ERRCODE = 'serialization_failure',
                MESSAGE = 'the name changed meanwhile';
        END IF;
        UPDATE versions SET state = 'dead', dead_since = extract(epoch from clock_timestamp()),
            lease_expires = NULL WHERE id = cur_id AND state = 'live';
    END IF;
END $fn$;

CREATE FUNCTION dstore_put_inline(p_name TEXT, p_type TEXT, p_etag TEXT, p_checksum BYTEA,
                                  p_data BYTEA, p_if_absent BOOLEAN, p_if_match JSONB,
                                  OUT outcome TEXT, OUT new_id BIGINT,
                                  OUT new_created DOUBLE PRECISION, OUT replaced BIGINT)
LANGUAGE plpgsql AS $fn$
DECLARE
    cur_gen BIGINT;
BEGIN
    SELECT c.cur_id, c.cur_gen, c.outcome INTO replaced, cur_gen, outcome
        FROM dstore_check(p_name, p_if_absent, p_if_match) c;
    IF outcome <> 'ok' THEN
        RETURN;
    END IF;
    INSERT INTO versions (name, state, size, etag, content_type, created)
        VALUES (p_name, 'live', length(p_data), p_etag, p_type,
                extract(epoch from clock_timestamp()))
        RETURNING id, created INTO new_id, new_created;
    INSERT INTO bodies (version_id, checksum, data) VALUES (new_id, p_checksum, p_data);
    PERFORM dstore_point(p_name, new_id, replaced, cur_gen);
END $fn$;

CREATE FUNCTION dstore_commit(p_version BIGINT, p_size BIGINT, p_etag TEXT,
                              p_if_absent BOOLEAN, p_if_match JSONB,
                              OUT outcome TEXT, OUT name TEXT, OUT content_type TEXT,
                              OUT created DOUBLE PRECISION, OUT replaced BIGINT)
LANGUAGE plpgsql AS $fn$
DECLARE
    cur_gen BIGINT;
BEGIN
    SELECT v.name, v.content_type INTO name, content_type FROM versions v
        WHERE v.id = p_version AND v.state = 'pending';
    IF NOT FOUND THEN
        outcome := 'gone';
        RETURN;
    END IF;
    SELECT c.cur_id, c.cur_gen, c.outcome INTO replaced, cur_gen, outcome
        FROM dstore_check(name, p_if_absent, p_if_match) c;
    IF outcome <> 'ok' THEN
        RETURN;
    END IF;
    UPDATE versions v SET state = 'live', size = p_size, etag = p_etag,
            created = extract(epoch from clock_timestamp()), lease_expires = NULL
        WHERE v.id = p_version AND v.state = 'pending' RETURNING v.created INTO created;
    IF NOT FOUND THEN  -- (aborted or expired since it was read above)
        outcome := 'gone';
        RETURN;
    END IF;
    PERFORM dstore_point(name, p_version, replaced, cur_gen);
END $fn$;

CREATE FUNCTION dstore_delete(p_name TEXT, p_if_match JSONB,
                              OUT outcome TEXT, OUT replaced BIGINT)
LANGUAGE plpgsql AS $fn$
DECLARE
    cur_gen BIGINT;
BEGIN
    SELECT c.cur_id, c.cur_gen, c.outcome INTO replaced, cur_gen, outcome
        FROM dstore_check(p_name, FALSE, p_if_match) c;
    IF outcome = 'ok' AND replaced IS NULL THEN
        outcome := 'missing';
    END IF;
    IF outcome <> 'ok' THEN
        RETURN;
    END IF;
    DELETE FROM files f WHERE f.name = p_name AND f.generation = cur_gen;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'serialization_failure',
            MESSAGE = 'the name changed meanwhile';
    END IF;
    UPDATE versions SET state = 'dead', dead_since = extract(epoch from clock_timestamp()),
        lease_expires = NULL WHERE id = replaced AND state = 'live';
END $fn$;
"""

MIGRATIONS: tuple[str, ...] = (
    # 1: the SQLite engine's tables after its migration 2, in PostgreSQL's types
    """
    CREATE TABLE versions (
        id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        name          TEXT COLLATE "C" NOT NULL,
        state         TEXT NOT NULL CHECK (state IN ('pending', 'live', 'dead')),
        size          BIGINT NOT NULL DEFAULT 0,
        etag          TEXT NOT NULL DEFAULT '',
        content_type  TEXT NOT NULL DEFAULT '',
        created       DOUBLE PRECISION NOT NULL,
        lease_expires DOUBLE PRECISION,
        dead_since    DOUBLE PRECISION
    );
    CREATE INDEX versions_pending ON versions (lease_expires) WHERE state = 'pending';
    CREATE INDEX versions_dead ON versions (dead_since) WHERE state = 'dead';
    CREATE INDEX versions_name ON versions (name);
    CREATE TABLE files (
        name        TEXT COLLATE "C" PRIMARY KEY,
        version_id  BIGINT NOT NULL REFERENCES versions (id),
        generation  BIGINT NOT NULL
    );
    CREATE TABLE chunks (
        version_id  BIGINT NOT NULL REFERENCES versions (id),
        idx         INTEGER NOT NULL,
        chunk_id    TEXT NOT NULL UNIQUE,
        first_byte  BIGINT NOT NULL,
        size        BIGINT NOT NULL,
        checksum    BYTEA NOT NULL,
        PRIMARY KEY (version_id, idx)
    );
    CREATE TABLE bodies (
        version_id  BIGINT PRIMARY KEY REFERENCES versions (id),
        checksum    BYTEA NOT NULL,
        data        BYTEA NOT NULL
    );
    CREATE TABLE replicas (
        chunk_id    TEXT NOT NULL,
        node_id     TEXT NOT NULL,
        pos         INTEGER NOT NULL,
        PRIMARY KEY (chunk_id, node_id)
    );
    CREATE INDEX replicas_node ON replicas (node_id);
    CREATE TABLE identities (
        addr        TEXT PRIMARY KEY,
        node_id     TEXT NOT NULL
    );
    CREATE TABLE members (
        addr        TEXT PRIMARY KEY,
        state       TEXT NOT NULL CHECK (state IN ('active', 'draining', 'removed'))
    );
    """,
    # 2: who runs the background work, under which epoch, until when
    """
    CREATE TABLE leader (
        id          INTEGER PRIMARY KEY CHECK (id = 1),
        holder      TEXT NOT NULL,
        epoch       BIGINT NOT NULL,
        expires     DOUBLE PRECISION NOT NULL
    );
    """,
    # 3: read pins: versions a download on some gateway reads, kept from the reaper until
    # ``expires``. Unlogged (no WAL: a pin costs a GET no flush); lost in a crash of the
    # database, as are the downloads that held them, and only until their next renewal.
    # And work any gateway asks the leader for; the gateways seen, and the leader's job
    # state (unlogged too: rewritten every second).
    """
    CREATE UNLOGGED TABLE pins (
        version_id  BIGINT NOT NULL,
        holder      TEXT NOT NULL,
        expires     DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (version_id, holder)
    );
    CREATE TABLE work (
        id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        kind        TEXT NOT NULL,
        chunk_id    TEXT NOT NULL,
        node_id     TEXT NOT NULL,
        reason      TEXT NOT NULL
    );
    CREATE UNLOGGED TABLE gateways (
        holder      TEXT PRIMARY KEY,
        seen        DOUBLE PRECISION NOT NULL
    );
    CREATE UNLOGGED TABLE jobs (
        name        TEXT PRIMARY KEY,
        state       TEXT NOT NULL
    );
    """,
    # 4: the writes of a name as functions, each one statement (one round trip, its own
    # transaction) instead of one per step; a batch of small files is one statement too
    _NAME_FUNCTIONS,
    # 5: S3 buckets (bucket B's object K is the file "B/K")
    """
    CREATE TABLE buckets (
        name        TEXT COLLATE "C" PRIMARY KEY,
        created     DOUBLE PRECISION NOT NULL
    );
    """,
    # 6: S3 multipart uploads and their parts
    MULTIPART_TABLES.format(
        collate='COLLATE "C"', real="DOUBLE PRECISION", integer="BIGINT", rowid=""
    ),
    # 7: files by version, for the foreign key check of each purged version (as SQLite's)
    "CREATE INDEX files_version ON files (version_id);",
)
LATEST = len(MIGRATIONS)

# a chunk's replica node ids in placement order, comma-separated (chunk aliased as c)
_REPLICA_LIST = (
    "(SELECT string_agg(r.node_id, ',' ORDER BY r.pos) FROM replicas r"
    " WHERE r.chunk_id = c.chunk_id)"
)


class PostgresMetadataStore(MetadataStore):
    """``dsn``: a ``postgresql://`` URL. ``pool``: connections at most (one operation
    holds one for a transaction, never across network I/O to the nodes)."""

    shared = True

    def __init__(self, dsn: str, *, pool: int = 10, timeout: float = 10.0) -> None:
        self.dsn = dsn
        self.max_connections = pool
        self.timeout = timeout  # a statement, or the wait for a connection, at most
        self._pool: Any = None
        # lookups and small files' commits that arrive together go in one statement
        self._lookups: Batcher[str, FileVersion] | None = None
        self._pointers: Batcher[str, int | None] | None = None
        self._inline_puts: Batcher[_InlinePut, CommitResult] | None = None
        self._operations = 0
        self._transactions = 0

    def __repr__(self) -> str:
        state = "open" if self._pool is not None else "closed"
        return (
            f"<PostgresMetadataStore {redacted(self.dsn)} {state},"
            f" {self._operations} ops in {self._transactions} commits>"
        )

    def stats(self) -> EngineStats:
        return EngineStats(self._operations, self._transactions)

    # --- lifecycle ------------------------------------------------------------------------

    async def open(self) -> None:
        try:
            import asyncpg
        except ImportError as exc:
            raise ConfigError(
                "a PostgreSQL metadata URL needs asyncpg: pip install 'dstore[postgres]'"
            ) from exc
        try:
            self._pool = await asyncpg.create_pool(
                self.dsn,
                min_size=1,
                max_size=self.max_connections,
                command_timeout=self.timeout,
                timeout=self.timeout,
            )
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            raise MetadataUnavailable(
                f"cannot reach PostgreSQL at {redacted(self.dsn)}: {exc}"
            ) from exc
        try:
            await self._migrate()
        except BaseException:
            await self.close()
            raise
        self._lookups = Batcher(self._lookup_batch)
        self._pointers = Batcher(self._pointer_batch)
        self._inline_puts = Batcher(self._put_inline_batch)

    async def _migrate(self) -> int:
        """Bring the schema to ``LATEST`` under an advisory lock (gateways starting
        together migrate one at a time); the version it was at."""
        async with self._pool.acquire() as con, con.transaction():
            await con.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK)
            await con.execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"
            )
            found = await con.fetchval("SELECT version FROM schema_version")
            if found is None:
                found = 0
                await con.execute("INSERT INTO schema_version (version) VALUES (0)")
            if found > LATEST:
                raise ConfigError(
                    f"the metadata schema is at version {found}; this dstore knows up to {LATEST}"
                )
            for number in range(found + 1, LATEST + 1):
                await con.execute(MIGRATIONS[number - 1])
            await con.execute("UPDATE schema_version SET version = $1", LATEST)
            return int(found)

    async def close(self) -> None:
        for batcher in (self._lookups, self._pointers, self._inline_puts):
            if batcher is not None:
                await batcher.close()
        self._lookups = self._pointers = self._inline_puts = None
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    def _batched(self, batcher: Batcher[K, R] | None) -> Batcher[K, R]:
        if batcher is None:
            raise MetadataUnavailable("metadata store is closed")
        return batcher

    async def run(self, fn: Callable[[Tx], Awaitable[T]]) -> T:
        """Run ``fn(connection)`` in a durable transaction of its own: for operators'
        tools (``dstore migrate-metadata``), never for the gateway's work."""
        return await self._tx(fn, durable=True)

    async def _tx(
        self, fn: Callable[[Tx], Awaitable[T]], *, durable: bool = False, read: bool = False
    ) -> T:
        """Run ``fn(connection)`` in a transaction of its own (its BEGIN and its commit
        setting in one round trip); ``read``: ``fn`` reads, one statement at a time, with
        no transaction around them. Library errors translated."""
        import asyncpg

        pool = self._pool
        if pool is None:
            raise MetadataUnavailable("metadata store is closed")
        self._operations += 1
        try:
            async with pool.acquire(timeout=self.timeout) as con:
                if read:
                    return await fn(con)
                await con.execute(_BEGIN_DURABLE if durable else _BEGIN)
                try:
                    result = await fn(con)
                except BaseException:
                    if not con.is_closed():
                        with contextlib.suppress(Exception):
                            await con.execute("ROLLBACK")
                    raise
                await con.execute("COMMIT")
            self._transactions += 1
            return result
        except DstoreError:
            raise
        except asyncpg.DiskFullError as exc:
            raise OutOfSpace("the metadata database's disk is full") from exc
        except (asyncpg.SerializationError, asyncpg.DeadlockDetectedError) as exc:
            raise Conflict(f"a concurrent change: {exc}") from exc
        except asyncpg.UniqueViolationError as exc:
            raise Conflict(f"a concurrent change: {exc}") from exc
        except (
            OSError,
            TimeoutError,
            asyncpg.InterfaceError,
            asyncpg.InternalClientError,  # (a connection a timed-out operation left unusable)
            asyncpg.PostgresConnectionError,
            asyncpg.CannotConnectNowError,
            asyncpg.AdminShutdownError,
        ) as exc:
            raise MetadataUnavailable(f"the metadata database is unavailable: {exc}") from exc

    # --- uploads --------------------------------------------------------------------------

    async def begin_upload(
        self, name: str, content_type: str, lease: float, first: ChunkIntent | None = None
    ) -> int:
        async def tx(con: Tx) -> int:
            version_id = await con.fetchval(
                "INSERT INTO versions (name, state, content_type, created, lease_expires)"
                f" VALUES ($1, '{PENDING}', $2, {_NOW}, {_NOW} + $3) RETURNING id",
                name,
                content_type,
                lease,
            )
            if first is not None:
                await _insert_chunk(con, version_id, first)
            return int(version_id)

        return await self._tx(tx)

    async def renew_leases(self, version_ids: Sequence[int], lease: float) -> None:
        async def tx(con: Tx) -> None:
            await con.execute(
                f"UPDATE versions SET lease_expires = GREATEST(lease_expires, {_NOW} + $1)"
                f" WHERE id = ANY($2::bigint[]) AND state = '{PENDING}'",
                lease,
                list(version_ids),
            )

        await self._tx(tx)

    async def add_chunk(self, version_id: int, intent: ChunkIntent) -> None:
        async def tx(con: Tx) -> None:
            await _insert_chunk(con, version_id, intent)

        await self._tx(tx)

    async def add_replicas(self, chunk_id: str, nodes: Sequence[str]) -> None:
        async def tx(con: Tx) -> None:
            # (the chunk's row, locked: two callers adding replicas take turns for ``pos``)
            await con.execute("SELECT 1 FROM chunks WHERE chunk_id = $1 FOR UPDATE", chunk_id)
            last = await con.fetchval(
                "SELECT COALESCE(MAX(pos), -1) FROM replicas WHERE chunk_id = $1", chunk_id
            )
            await con.executemany(
                "INSERT INTO replicas (chunk_id, node_id, pos) VALUES ($1, $2, $3)"
                " ON CONFLICT (chunk_id, node_id) DO NOTHING",
                [(chunk_id, node, last + 1 + i) for i, node in enumerate(nodes)],
            )

        await self._tx(tx)

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
        async def tx(con: Tx) -> Any:
            return await con.fetchrow(
                "SELECT * FROM dstore_commit($1, $2, $3, $4, $5)",
                version_id,
                size,
                etag,
                if_absent,
                _match_json(if_match),
            )

        row = await self._tx(tx, read=True)  # (one statement: its own durable transaction)
        if row["outcome"] == "gone":
            raise Conflict(f"upload {version_id} is no longer pending")
        name = row["name"]
        _refused(name, row["outcome"])
        version = FileVersion(name, version_id, size, etag, row["content_type"], row["created"])
        replaced = None if row["replaced"] is None else int(row["replaced"])

        async def chunks(con: Tx) -> CommitResult:
            # (read after the commit: a live version's chunk rows never change)
            refs = await _chunk_refs(con, version_id, limit=keep_chunks + 1)
            if len(refs) > keep_chunks:
                count = await con.fetchval(
                    "SELECT COUNT(*) FROM chunks WHERE version_id = $1", version_id
                )
                return CommitResult(version, replaced, int(count))
            return CommitResult(
                dataclasses.replace(version, chunks=refs), replaced, len(refs), True
            )

        return await self._tx(chunks, read=True)

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
        match = _match_json(if_match)
        put = _InlinePut(name, content_type, etag, body.checksum, bytes(data), if_absent, match)
        return await self._batched(self._inline_puts).submit(put)

    async def _put_inline_batch(self, puts: list[_InlinePut]) -> list[CommitResult | BaseException]:
        """Small files' commits in one statement (one transaction, one WAL flush), names
        locked in sorted order (two batches never wait for each other in a cycle)."""
        order = sorted(range(len(puts)), key=lambda i: puts[i].name)
        columns = list(zip(*(dataclasses.astuple(puts[i]) for i in order), strict=True))

        async def tx(con: Tx) -> list[Any]:
            return list(await con.fetch(_PUT_INLINE_BATCH, *map(list, columns)))

        rows = await self._tx(tx, read=True)
        outcomes: list[CommitResult | BaseException] = [Conflict("not committed")] * len(puts)
        for row in rows:
            at = order[int(row["i"]) - 1]
            put = puts[at]
            try:
                _refused(put.name, row["outcome"])
            except DstoreError as exc:  # (this one refused: the others stand)
                outcomes[at] = exc
                continue
            version = FileVersion(
                put.name,
                int(row["new_id"]),
                len(put.data),
                put.etag,
                put.content_type,
                row["new_created"],
                (),
                InlineBody(None, put.checksum),
            )
            replaced = None if row["replaced"] is None else int(row["replaced"])
            outcomes[at] = CommitResult(version, replaced, 0, True)
        return outcomes

    async def abort(self, version_id: int) -> None:
        async def tx(con: Tx) -> None:
            await _kill(con, version_id, PENDING)

        await self._tx(tx)

    # --- reads ----------------------------------------------------------------------------

    async def head(self, name: str) -> FileVersion:
        async def tx(con: Tx) -> Any:
            return await con.fetchrow(_CURRENT.format(data="NULL::bytea", where="= $1"), name)

        row = await self._tx(tx, read=True)
        if row is None:
            raise FileNotFound(f"no file named {name!r}")
        return _version(row)

    async def lookup(self, name: str, start: int = 0, limit: int | None = None) -> FileVersion:
        version = await self._batched(self._lookups).submit(name)
        if version.inline is not None:
            return version

        async def tx(con: Tx) -> tuple[ChunkRef, ...]:
            # (no transaction around the two: a version replaced in between keeps its
            # chunk rows until the reaper purges it, ``gc_grace`` after it died)
            return await _chunk_refs(con, version.version_id, limit=limit, start=start)

        return dataclasses.replace(version, chunks=await self._tx(tx, read=True))

    async def is_current(self, name: str, version_id: int) -> bool:
        return await self._batched(self._pointers).submit(name) == version_id

    async def _pointer_batch(self, names: list[str]) -> list[int | BaseException | None]:
        """The current version ids of several names in one statement."""

        async def tx(con: Tx) -> list[Any]:
            sql = "SELECT name, version_id FROM files WHERE name = ANY($1::text[])"
            return list(await con.fetch(sql, sorted(set(names))))

        found = {row["name"]: int(row["version_id"]) for row in await self._tx(tx, read=True)}
        return [found.get(name) for name in names]

    async def _lookup_batch(self, names: list[str]) -> list[FileVersion | BaseException]:
        """The current versions of several names in one statement (inline bytes with)."""

        async def tx(con: Tx) -> list[Any]:
            sql = _CURRENT.format(data="b.data", where="= ANY($1::text[])")
            return list(await con.fetch(sql, sorted(set(names))))

        found = {row["name"]: _version(row) for row in await self._tx(tx, read=True)}
        return [found.get(name) or FileNotFound(f"no file named {name!r}") for name in names]

    async def chunk_page(self, version_id: int, start: int, limit: int) -> tuple[ChunkRef, ...]:
        return await self._tx(
            lambda con: _chunk_refs(con, version_id, limit=limit, start=start), read=True
        )

    async def inline_data(self, version_id: int) -> bytes | None:
        async def tx(con: Tx) -> bytes | None:
            data = await con.fetchval("SELECT data FROM bodies WHERE version_id = $1", version_id)
            return None if data is None else bytes(data)

        return await self._tx(tx, read=True)

    async def inline_bodies(self, after: int, limit: int) -> list[tuple[int, str, InlineBody]]:
        async def tx(con: Tx) -> list[tuple[int, str, InlineBody]]:
            rows = await con.fetch(
                "SELECT b.version_id, v.name, b.checksum, b.data FROM bodies b"
                " JOIN versions v ON v.id = b.version_id"
                " WHERE b.version_id > $1 AND v.state = $2 ORDER BY b.version_id LIMIT $3",
                after,
                LIVE,
                limit,
            )
            return [
                (
                    int(r["version_id"]),
                    r["name"],
                    InlineBody(bytes(r["data"]), bytes(r["checksum"])),
                )
                for r in rows
            ]

        return await self._tx(tx, read=True)

    async def delete(self, name: str, *, if_match: Sequence[str] | None = None) -> int:
        async def tx(con: Tx) -> Any:
            return await con.fetchrow(
                "SELECT * FROM dstore_delete($1, $2)", name, _match_json(if_match)
            )

        row = await self._tx(tx, read=True)  # (one statement: its own durable transaction)
        if row["outcome"] == "missing":
            raise FileNotFound(f"no file named {name!r}")
        _refused(name, row["outcome"])
        return int(row["replaced"])

    async def list_files(
        self, prefix: str, start_after: str, limit: int
    ) -> tuple[list[FileInfo], str | None]:
        async def tx(con: Tx) -> tuple[list[FileInfo], str | None]:
            lower = max(prefix, start_after)
            op = ">" if start_after and start_after >= prefix else ">="
            sql = (
                "SELECT f.name, v.size, v.etag, v.created FROM files f"
                f" JOIN versions v ON v.id = f.version_id WHERE f.name {op} $1"
            )
            args: list[Any] = [lower]
            if prefix:
                args += [prefix]
                sql += f" AND left(f.name, {len(prefix)}) = ${len(args)}"
                bound = prefix_end(prefix)
                if bound is not None:
                    args.append(bound)
                    sql += f" AND f.name < ${len(args)}"
            args.append(limit + 1)
            rows = await con.fetch(sql + f" ORDER BY f.name LIMIT ${len(args)}", *args)
            files = [FileInfo(r["name"], r["size"], r["etag"], r["created"]) for r in rows[:limit]]
            return files, (files[-1].name if len(rows) > limit else None)

        return await self._tx(tx, read=True)

    async def totals(self) -> tuple[int, int]:
        async def tx(con: Tx) -> tuple[int, int]:
            row = await con.fetchrow(
                "SELECT COUNT(*) AS files, COALESCE(SUM(v.size), 0) AS bytes FROM files f"
                " JOIN versions v ON v.id = f.version_id"
            )
            return int(row["files"]), int(row["bytes"])

        return await self._tx(tx, read=True)

    async def chunk_ids(self, state: VersionState) -> set[str]:
        async def tx(con: Tx) -> set[str]:
            rows = await con.fetch(
                "SELECT c.chunk_id FROM chunks c JOIN versions v ON v.id = c.version_id"
                " WHERE v.state = $1",
                state.value,
            )
            return {r["chunk_id"] for r in rows}

        return await self._tx(tx, read=True)

    async def version_ids(
        self, *, name: str | None = None, state: VersionState | None = None
    ) -> list[int]:
        async def tx(con: Tx) -> list[int]:
            rows = await con.fetch(
                "SELECT id FROM versions WHERE ($1::text IS NULL OR name = $1)"
                " AND ($2::text IS NULL OR state = $2) ORDER BY id",
                name,
                state and state.value,
            )
            return [int(r["id"]) for r in rows]

        return await self._tx(tx, read=True)

    async def inline_count(self) -> int:
        async def tx(con: Tx) -> int:
            return int(await con.fetchval("SELECT COUNT(*) FROM bodies"))

        return await self._tx(tx, read=True)

    # --- reclaiming -----------------------------------------------------------------------

    async def expire_leases(self) -> list[int]:
        async def tx(con: Tx) -> list[int]:
            rows = await con.fetch(
                f"UPDATE versions SET state = '{DEAD}', dead_since = {_NOW}, lease_expires = NULL"
                f" WHERE state = '{PENDING}' AND lease_expires < {_NOW} RETURNING id"
            )
            await con.execute(
                "DELETE FROM parts WHERE upload_id IN"
                f" (SELECT id FROM uploads WHERE expires <= {_NOW})"
            )
            await con.execute(f"DELETE FROM uploads WHERE expires <= {_NOW}")
            return sorted(int(r["id"]) for r in rows)

        return await self._tx(tx)

    async def dead_chunks(self, settle: float, limit: int) -> list[DeadChunk]:
        async def tx(con: Tx) -> list[DeadChunk]:
            rows = await con.fetch(
                "SELECT c.version_id, c.chunk_id,"
                f" {_REPLICA_LIST} AS nodes, {_NOW} - v.dead_since AS age,"
                f" {PINNED.format(now=_NOW)} AS pinned"
                " FROM versions v JOIN chunks c ON c.version_id = v.id"
                f" WHERE v.state = '{DEAD}' AND v.dead_since <= {_NOW} - $1"
                " ORDER BY v.dead_since LIMIT $2",
                settle,
                limit,
            )
            return [
                DeadChunk(
                    int(r["version_id"]),
                    r["chunk_id"],
                    split_node_ids(r["nodes"]),
                    r["age"],
                    r["pinned"],
                )
                for r in rows
            ]

        return await self._tx(tx, read=True)

    async def check_in(self, holder: str) -> None:
        async def tx(con: Tx) -> None:
            await con.execute(CHECK_IN.format(holder="$1", now=_NOW), holder)
            await con.execute(FORGET_GATEWAYS.format(now=_NOW))

        await self._tx(tx)

    async def gateways(self, within: float) -> list[tuple[str, float]]:
        async def tx(con: Tx) -> list[tuple[str, float]]:
            rows = await con.fetch(SEEN.format(now=_NOW, within="$1"), within)
            return [(r[0], float(r[1])) for r in rows]

        return await self._tx(tx, read=True)

    async def save_job_state(self, name: str, state: str) -> None:
        async def tx(con: Tx) -> None:
            await con.execute(SAVE_JOB.format(name="$1", state="$2"), name, state)

        await self._tx(tx, read=True)

    async def job_state(self, name: str) -> str | None:
        async def tx(con: Tx) -> str | None:
            state = await con.fetchval("SELECT state FROM jobs WHERE name = $1", name)
            return None if state is None else str(state)

        return await self._tx(tx, read=True)

    async def create_bucket(self, name: str) -> bool:
        async def tx(con: Tx) -> bool:
            sql = CREATE_BUCKET.format(name="$1", now=_NOW)
            return await con.fetchval(sql, name) is not None

        return await self._tx(tx, durable=True)

    async def delete_bucket(self, name: str) -> None:
        low, high = name + "/", name + "0"  # every "B/…" ("0" follows "/")

        async def tx(con: Tx) -> None:
            if await con.fetchval("SELECT 1 FROM buckets WHERE name = $1 FOR UPDATE", name) is None:
                raise NoSuchBucket(f"no bucket named {name!r}")
            if await con.fetchval(BUCKET_HOLDS.format(low="$1", high="$2"), low, high):
                raise BucketNotEmpty(f"the bucket {name!r} is not empty")
            await con.execute("DELETE FROM buckets WHERE name = $1", name)

        await self._tx(tx, durable=True)

    async def buckets(self) -> list[tuple[str, float]]:
        async def tx(con: Tx) -> list[tuple[str, float]]:
            rows = await con.fetch("SELECT name, created FROM buckets ORDER BY name")
            return [(r[0], float(r[1])) for r in rows]

        return await self._tx(tx, read=True)

    async def bucket_exists(self, name: str) -> bool:
        async def tx(con: Tx) -> bool:
            return await con.fetchval("SELECT 1 FROM buckets WHERE name = $1", name) is not None

        return await self._tx(tx, read=True)

    # --- S3 multipart uploads --------------------------------------------------------------

    async def create_multipart(
        self, upload_id: str, name: str, content_type: str, expiry: float
    ) -> MultipartUpload:
        async def tx(con: Tx) -> MultipartUpload:
            created = await con.fetchval(
                "INSERT INTO uploads (id, name, content_type, created, expires)"
                f" VALUES ($1, $2, $3, {_NOW}, {_NOW} + $4) RETURNING created",
                upload_id,
                name,
                content_type,
                expiry,
            )
            return MultipartUpload(upload_id, name, content_type, float(created))

        return await self._tx(tx, durable=True)

    async def multipart(self, upload_id: str) -> MultipartUpload:
        async def tx(con: Tx) -> MultipartUpload:
            return (await _upload(con, upload_id))[0]

        return await self._tx(tx, read=True)

    async def seal_part(
        self, upload_id: str, number: int, version_id: int, size: int, etag: str
    ) -> None:
        async def tx(con: Tx) -> None:
            # (the upload's row locked: its seals, completion and abort take turns)
            _, expires = await _upload(con, upload_id, lock=True)
            sealed = await con.fetchval(
                "UPDATE versions SET size = $1, etag = $2, lease_expires = $3"
                f" WHERE id = $4 AND state = '{PENDING}' RETURNING id",
                size,
                etag,
                expires,
                version_id,
            )
            if sealed is None:
                raise Conflict(f"part {number}'s version {version_id} is no longer pending")
            before = await con.fetchval(
                "SELECT version_id FROM parts WHERE upload_id = $1 AND number = $2",
                upload_id,
                number,
            )
            if before is not None:
                await _kill(con, before, PENDING)
            await con.execute(
                "INSERT INTO parts (upload_id, number, version_id, size, etag, created)"
                f" VALUES ($1, $2, $3, $4, $5, {_NOW}) ON CONFLICT (upload_id, number) DO UPDATE"
                " SET version_id = excluded.version_id, size = excluded.size,"
                " etag = excluded.etag, created = excluded.created",
                upload_id,
                number,
                version_id,
                size,
                etag,
            )

        await self._tx(tx, durable=True)

    async def parts(self, upload_id: str, after: int, limit: int) -> list[Part]:
        async def tx(con: Tx) -> list[Part]:
            await _upload(con, upload_id)
            rows = await con.fetch(
                "SELECT number, version_id, size, etag, created FROM parts"
                " WHERE upload_id = $1 AND number > $2 ORDER BY number LIMIT $3",
                upload_id,
                after,
                limit,
            )
            return [Part(r[0], int(r[1]), int(r[2]), r[3], float(r[4])) for r in rows]

        return await self._tx(tx, read=True)

    async def multipart_uploads(
        self, prefix: str, after: tuple[str, str], limit: int
    ) -> list[MultipartUpload]:
        end = prefix_end(prefix) if prefix else None

        async def tx(con: Tx) -> list[MultipartUpload]:
            rows = await con.fetch(
                "SELECT id, name, content_type, created FROM uploads"
                f" WHERE name >= $1 AND ($2::text IS NULL OR name < $2) AND expires > {_NOW}"
                " AND (name, id) > ($3, $4) ORDER BY name, id LIMIT $5",
                prefix,
                end,
                after[0],
                after[1],
                limit,
            )
            return [MultipartUpload(r[0], r[1], r[2], float(r[3])) for r in rows]

        return await self._tx(tx, read=True)

    async def complete_multipart(
        self,
        upload_id: str,
        name: str,
        parts: Sequence[tuple[int, str]],
        etag: str,
        min_part: int,
    ) -> CommitResult:
        async def tx(con: Tx) -> CommitResult:
            upload, _ = await _upload(con, upload_id, name, lock=True)
            rows = await con.fetch(
                "SELECT number, version_id, size, etag FROM parts WHERE upload_id = $1",
                upload_id,
            )
            stored = {r[0]: (int(r[1]), int(r[2]), r[3]) for r in rows}
            chosen = chosen_parts(upload_id, stored, parts, min_part)
            version_id = await con.fetchval(
                "INSERT INTO versions (name, state, content_type, created, lease_expires)"
                f" VALUES ($1, '{PENDING}', $2, {_NOW}, {_NOW} + 60) RETURNING id",
                name,
                upload.content_type,
            )
            index = offset = 0
            for part_version, size in chosen:  # its chunks become the object's, in order
                moved = await con.execute(
                    "UPDATE chunks SET version_id = $1, idx = idx + $2,"
                    " first_byte = first_byte + $3 WHERE version_id = $4",
                    version_id,
                    index,
                    offset,
                    part_version,
                )
                index += int(moved.rpartition(" ")[2])
                offset += size
            await con.execute(
                f"UPDATE versions SET state = '{DEAD}', dead_since = {_NOW}, lease_expires = NULL"
                f" WHERE id = ANY($1::bigint[]) AND state = '{PENDING}'",
                [v for v, _, _ in stored.values()],
            )
            await _end_upload(con, upload_id)
            row = await con.fetchrow(
                "SELECT * FROM dstore_commit($1, $2, $3, FALSE, NULL)", version_id, offset, etag
            )
            _refused(name, row["outcome"])
            version = FileVersion(
                name, version_id, offset, etag, row["content_type"], row["created"]
            )
            replaced = None if row["replaced"] is None else int(row["replaced"])
            return CommitResult(version, replaced, index)

        return await self._tx(tx, durable=True)

    async def abort_multipart(self, upload_id: str) -> None:
        async def tx(con: Tx) -> None:
            await _upload(con, upload_id, lock=True)
            await con.execute(
                f"UPDATE versions SET state = '{DEAD}', dead_since = {_NOW}, lease_expires = NULL"
                f" WHERE id IN (SELECT version_id FROM parts WHERE upload_id = $1)"
                f" AND state = '{PENDING}'",
                upload_id,
            )
            await _end_upload(con, upload_id)

        await self._tx(tx, durable=True)

    async def request_work(self, request: WorkRequest) -> None:
        sql = REQUEST_WORK.format(marks="$1, $2, $3, $4")

        async def tx(con: Tx) -> None:
            await con.execute(sql, request.kind, request.chunk_id, request.node_id, request.reason)

        await self._tx(tx, durable=True)

    async def take_work(self, limit: int) -> list[WorkRequest]:
        sql = TAKE_WORK.format(limit="$1", skip=" FOR UPDATE SKIP LOCKED")

        async def tx(con: Tx) -> list[WorkRequest]:
            rows = await con.fetch(sql, limit)
            return [WorkRequest(*tuple(r)[1:]) for r in sorted(rows, key=lambda r: r["id"])]

        return await self._tx(tx, durable=True)

    async def pin(self, holder: str, version_id: int, ttl: float, settle: float) -> bool:
        sql = pin_statement(_NOW, "greatest", "$1", "$2", "$3", "$4")

        async def tx(con: Tx) -> bool:
            return await con.fetchval(sql, version_id, holder, ttl, settle) is not None

        return await self._tx(tx, read=True)  # (one statement: its own transaction)

    async def renew_pins(self, holder: str, version_ids: Sequence[int], ttl: float) -> None:
        sql = renew_pins_statement("greatest", f"SELECT unnest($1::bigint[]), $2, {_NOW} + $3")

        async def tx(con: Tx) -> None:
            await con.execute(sql, list(version_ids), holder, ttl)

        if version_ids:
            await self._tx(tx, read=True)

    async def forget_replica(self, chunk_id: str, node_id: str, *, durable: bool = False) -> None:
        async def tx(con: Tx) -> None:
            await con.execute(
                "DELETE FROM replicas WHERE chunk_id = $1 AND node_id = $2", chunk_id, node_id
            )

        await self._tx(tx, durable=durable)

    async def purge_dead(self) -> Purged:
        async def tx(con: Tx) -> Purged:
            inline = await con.fetch(
                "DELETE FROM bodies WHERE version_id IN"
                " (SELECT id FROM versions WHERE state = $1) RETURNING version_id",
                DEAD,
            )
            await con.execute(
                "DELETE FROM chunks WHERE version_id IN (SELECT id FROM versions WHERE state = $1)"
                " AND NOT EXISTS (SELECT 1 FROM replicas r WHERE r.chunk_id = chunks.chunk_id)",
                DEAD,
            )
            purged = await con.fetch(
                "DELETE FROM versions WHERE state = $1 AND NOT EXISTS"
                " (SELECT 1 FROM chunks c WHERE c.version_id = versions.id) RETURNING id",
                DEAD,
            )
            await con.execute(f"DELETE FROM pins WHERE expires < {_NOW}")
            return Purged(len(purged), tuple(sorted(int(r["version_id"]) for r in inline)))

        return await self._tx(tx)

    # --- replicas and members -------------------------------------------------------------

    async def chunks_on(self, node_ids: Sequence[str], limit: int) -> list[ChunkReplicas]:
        ids = list(node_ids)
        if not ids:
            return []

        async def tx(con: Tx) -> list[ChunkReplicas]:
            rows = await con.fetch(
                f"SELECT c.chunk_id, c.size, c.checksum, {_REPLICA_LIST} AS nodes"
                " FROM chunks c JOIN versions v ON v.id = c.version_id"
                " WHERE v.state IN ($1, $2) AND c.chunk_id IN"
                " (SELECT chunk_id FROM replicas WHERE node_id = ANY($3::text[]))"
                " LIMIT $4",
                LIVE,
                PENDING,
                ids,
                limit,
            )
            return [_replicas(r) for r in rows]

        return await self._tx(tx, read=True)

    async def chunk_replicas(self, chunk_id: str) -> ChunkReplicas | None:
        async def tx(con: Tx) -> ChunkReplicas | None:
            row = await con.fetchrow(
                f"SELECT c.chunk_id, c.size, c.checksum, {_REPLICA_LIST} AS nodes"
                " FROM chunks c JOIN versions v ON v.id = c.version_id"
                " WHERE c.chunk_id = $1 AND v.state IN ($2, $3)",
                chunk_id,
                LIVE,
                PENDING,
            )
            return None if row is None else _replicas(row)

        return await self._tx(tx, read=True)

    async def replica_count(self, node_id: str) -> int:
        async def tx(con: Tx) -> int:
            return int(
                await con.fetchval("SELECT COUNT(*) FROM replicas WHERE node_id = $1", node_id)
            )

        return await self._tx(tx, read=True)

    async def replica_node_ids(self) -> set[str]:
        async def tx(con: Tx) -> set[str]:
            return {r["node_id"] for r in await con.fetch("SELECT DISTINCT node_id FROM replicas")}

        return await self._tx(tx, read=True)

    async def known_replicas(self, node_id: str, chunk_ids: Sequence[str]) -> set[str]:
        async def tx(con: Tx) -> set[str]:
            rows = await con.fetch(
                "SELECT chunk_id FROM replicas WHERE node_id = $1 AND chunk_id = ANY($2::text[])",
                node_id,
                list(chunk_ids),
            )
            return {r["chunk_id"] for r in rows}

        return await self._tx(tx, read=True)

    async def members(self) -> list[MemberRecord]:
        async def tx(con: Tx) -> list[MemberRecord]:
            rows = await con.fetch("SELECT addr, state FROM members ORDER BY addr")
            return [MemberRecord(r["addr"], MemberState(r["state"])) for r in rows]

        return await self._tx(tx, read=True)

    async def set_member(self, addr: str, state: MemberState | None) -> None:
        async def tx(con: Tx) -> None:
            if state is None:
                await con.execute("DELETE FROM members WHERE addr = $1", addr)
            else:
                await con.execute(
                    "INSERT INTO members (addr, state) VALUES ($1, $2)"
                    " ON CONFLICT (addr) DO UPDATE SET state = excluded.state",
                    addr,
                    state.value,
                )

        await self._tx(tx, durable=True)

    async def identities(self) -> dict[str, str]:
        async def tx(con: Tx) -> dict[str, str]:
            rows = await con.fetch("SELECT addr, node_id FROM identities")
            return {r["addr"]: r["node_id"] for r in rows}

        return await self._tx(tx, read=True)

    async def remember_identity(self, addr: str, node_id: str) -> None:
        async def tx(con: Tx) -> None:
            await con.execute(
                "INSERT INTO identities (addr, node_id) VALUES ($1, $2)"
                " ON CONFLICT (addr) DO UPDATE SET node_id = excluded.node_id",
                addr,
                node_id,
            )

        await self._tx(tx)

    # --- leadership -----------------------------------------------------------------------

    async def lead(self, holder: str, ttl: float) -> int | None:
        async def tx(con: Tx) -> int | None:
            epoch = await con.fetchval(
                lead_statement(_NOW, "$1", "$2", "greatest"),
                holder,
                ttl,
            )
            return None if epoch is None else int(epoch)

        return await self._tx(tx)

    async def leadership(self) -> Leadership | None:
        async def tx(con: Tx) -> Leadership | None:
            row = await con.fetchrow(f"SELECT holder, epoch, expires - {_NOW} AS left FROM leader")
            if row is None:
                return None
            return Leadership(row["holder"], int(row["epoch"]), float(row["left"]))

        return await self._tx(tx, read=True)


def redacted(dsn: str) -> str:
    """The URL without its password (it goes into logs and reprs)."""
    head, at, host = dsn.rpartition("@")
    if not at:
        return dsn
    scheme, _, user = head.partition("://")
    name, colon, _ = user.partition(":")
    return f"{scheme}://{name}{':***' if colon else ''}@{host}"


def _replicas(row: Any) -> ChunkReplicas:
    return ChunkReplicas(
        row["chunk_id"], int(row["size"]), bytes(row["checksum"]), split_node_ids(row["nodes"])
    )


# the current version of names (``where``: a condition on ``f.name``), with ``data``: the
# inline bytes or NULL
_CURRENT = (
    "SELECT f.name, v.id, v.size, v.etag, v.content_type, v.created, b.checksum,"
    " {data} AS data FROM files f JOIN versions v ON v.id = f.version_id"
    " LEFT JOIN bodies b ON b.version_id = v.id WHERE f.name {where}"
)

# small files' commits, one row of arrays each, in the order given (``_put_inline_batch``)
_PUT_INLINE_BATCH = (
    "SELECT a.i, r.* FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[],"
    " $5::bytea[], $6::boolean[], $7::jsonb[]) WITH ORDINALITY"
    " AS a(name, content_type, etag, checksum, data, if_absent, if_match, i),"
    " LATERAL dstore_put_inline(a.name, a.content_type, a.etag, a.checksum, a.data,"
    " a.if_absent, a.if_match) r ORDER BY a.i"
)


@dataclasses.dataclass(frozen=True, slots=True)
class _InlinePut:
    """One small file's commit, as ``dstore_put_inline`` takes it (in this order)."""

    name: str
    content_type: str
    etag: str
    checksum: bytes
    data: bytes
    if_absent: bool
    if_match: str | None  # JSON: a list of ETags


def _version(row: Any) -> FileVersion:
    inline = None
    if row["checksum"] is not None:
        body = row["data"]
        inline = InlineBody(None if body is None else bytes(body), bytes(row["checksum"]))
    return FileVersion(
        row["name"],
        int(row["id"]),
        int(row["size"]),
        row["etag"],
        row["content_type"],
        row["created"],
        inline=inline,
    )


def _match_json(if_match: Sequence[str] | None) -> str | None:
    return None if if_match is None else orjson.dumps(list(if_match)).decode()


async def _upload(
    con: Tx, upload_id: str, name: str | None = None, *, lock: bool = False
) -> tuple[MultipartUpload, float]:
    """A multipart upload in progress (for ``name``, if given) and its expiry, or
    ``NoSuchUpload``; ``lock``: its row locked for the transaction."""
    row = await con.fetchrow(
        "SELECT id, name, content_type, created, expires FROM uploads"
        f" WHERE id = $1 AND expires > {_NOW}" + (" FOR UPDATE" if lock else ""),
        upload_id,
    )
    if row is None or (name is not None and row[1] != name):
        raise NoSuchUpload(f"no multipart upload {upload_id!r} in progress")
    return MultipartUpload(row[0], row[1], row[2], float(row[3])), float(row[4])


async def _end_upload(con: Tx, upload_id: str) -> None:
    await con.execute("DELETE FROM parts WHERE upload_id = $1", upload_id)
    await con.execute("DELETE FROM uploads WHERE id = $1", upload_id)


def _refused(name: str, outcome: str) -> None:
    """``PreconditionFailed`` for the outcome of a refused conditional write."""
    if outcome == "exists":
        raise PreconditionFailed(f"{name!r} exists")
    if outcome == "missing":
        raise PreconditionFailed(f"{name!r} does not exist")
    if outcome == "mismatch":
        raise PreconditionFailed(f"{name!r} is at another version than If-Match names")
    if outcome != "ok":
        raise Conflict(f"{name!r}: {outcome}")


async def _chunk_refs(
    con: Tx, version_id: int, limit: int | None = None, start: int = 0
) -> tuple[ChunkRef, ...]:
    sql = (
        f"SELECT c.idx, c.chunk_id, c.first_byte, c.size, c.checksum, {_REPLICA_LIST} AS nodes"
        " FROM chunks c WHERE c.version_id = $1 AND c.first_byte + c.size > $2"
        " ORDER BY c.idx"
    )
    args: list[int] = [version_id, start]
    if limit is not None:
        sql += " LIMIT $3"
        args.append(limit)
    return tuple(
        ChunkRef(
            int(r["idx"]),
            r["chunk_id"],
            int(r["first_byte"]),
            int(r["size"]),
            bytes(r["checksum"]),
            split_node_ids(r["nodes"]),
        )
        for r in await con.fetch(sql, *args)
    )


async def _kill(con: Tx, version_id: int, expected: str) -> bool:
    VersionState(expected).move(VersionState.DEAD)
    moved = await con.fetchval(
        f"UPDATE versions SET state = '{DEAD}', dead_since = {_NOW}, lease_expires = NULL"
        " WHERE id = $1 AND state = $2 RETURNING id",
        version_id,
        expected,
    )
    return moved is not None


async def _insert_chunk(con: Tx, version_id: int, intent: ChunkIntent) -> None:
    await con.execute(
        "INSERT INTO chunks (version_id, idx, chunk_id, first_byte, size, checksum)"
        " VALUES ($1, $2, $3, $4, $5, $6)",
        version_id,
        intent.index,
        intent.chunk_id,
        intent.offset,
        intent.size,
        intent.checksum,
    )
    await con.executemany(
        "INSERT INTO replicas (chunk_id, node_id, pos) VALUES ($1, $2, $3)",
        [(intent.chunk_id, node, pos) for pos, node in enumerate(intent.nodes)],
    )
