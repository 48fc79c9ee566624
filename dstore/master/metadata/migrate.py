"""``dstore migrate-metadata``: copy a gateway's SQLite metadata into PostgreSQL, so a store
that outgrew one gateway keeps every file. Rows are copied as they are (version ids too,
so chunk and replica rows keep pointing at them), in one PostgreSQL transaction: the
target ends up with all of it or none of it. The gateway must be stopped meanwhile."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

from dstore.errors import ConfigError
from dstore.master.metadata.postgres import PostgresMetadataStore
from dstore.master.metadata.sqlite import SQLiteMetadataStore

# tables in the order their references need, with the columns both engines share
TABLES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "versions",
        (
            "id",
            "name",
            "state",
            "size",
            "etag",
            "content_type",
            "created",
            "lease_expires",
            "dead_since",
        ),
    ),
    ("files", ("name", "version_id", "generation")),
    ("chunks", ("version_id", "idx", "chunk_id", "first_byte", "size", "checksum")),
    ("bodies", ("version_id", "checksum", "data")),
    ("replicas", ("chunk_id", "node_id", "pos")),
    ("identities", ("addr", "node_id")),
    ("members", ("addr", "state")),
    ("buckets", ("name", "created")),
    ("uploads", ("id", "name", "content_type", "created", "expires")),
    ("parts", ("upload_id", "number", "version_id", "size", "etag", "created")),
    # (repair requests not yet taken; pins, check-ins and job state are only ever fresh)
    ("work", ("kind", "chunk_id", "node_id", "reason")),
)
BATCH = 10_000  # rows read from SQLite and sent at a time


async def sqlite_to_postgres(source: Path, dsn: str) -> dict[str, int]:
    """Copy every row of the SQLite database ``source`` into the PostgreSQL database at
    ``dsn`` (its schema made if need be); the rows copied per table. Refuses a target
    that holds any version already."""
    if not await asyncio.to_thread(source.is_file):
        raise ConfigError(f"no metadata database at {source}")
    sqlite = SQLiteMetadataStore(source)  # brings the file's schema up to date first
    await sqlite.open()
    await sqlite.close()
    target = PostgresMetadataStore(dsn)
    await target.open()
    try:
        return await target.run(lambda con: _copy(source, con))
    finally:
        await target.close()


async def _copy(source: Path, pg: Any) -> dict[str, int]:
    if await pg.fetchval("SELECT EXISTS (SELECT 1 FROM versions)"):
        raise ConfigError("the PostgreSQL database holds metadata already: give an empty one")
    # (read on the event loop: the command has nothing else to serve meanwhile)
    db = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    counts: dict[str, int] = {}
    try:
        for table, columns in TABLES:
            rows = db.execute(f"SELECT {', '.join(columns)} FROM {table}")
            counts[table] = 0
            while batch := rows.fetchmany(BATCH):
                records = [tuple(_value(v) for v in row) for row in batch]
                await pg.copy_records_to_table(table, records=records, columns=list(columns))
                counts[table] += len(records)
    finally:
        db.close()
    await pg.execute(
        "SELECT setval(pg_get_serial_sequence('versions', 'id'),"
        " GREATEST((SELECT MAX(id) FROM versions), 1))"
    )
    return counts


def _value(value: object) -> object:
    return bytes(value) if isinstance(value, memoryview) else value
