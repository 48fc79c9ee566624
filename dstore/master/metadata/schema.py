"""The SQLite engine's schema: numbered migrations, applied in order in one transaction,
and the version reached kept in ``schema_version``.

A database made before the version table existed holds the tables of migration 1; it
is recognised by its ``versions`` table and taken on from there. A database newer than
this code knows is refused rather than guessed at.
"""

from __future__ import annotations

import sqlite3

from dstore.errors import ConfigError
from dstore.master.metadata.sql import MULTIPART_TABLES

MIGRATIONS: tuple[str, ...] = (
    # 1: files, versions, chunks, inline bodies, replicas, node identities and members
    """
    CREATE TABLE versions (
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
    CREATE INDEX versions_pending ON versions (lease_expires) WHERE state = 'pending';
    CREATE INDEX versions_dead ON versions (dead_since) WHERE state = 'dead';
    CREATE TABLE files (
        name        TEXT PRIMARY KEY,
        version_id  INTEGER NOT NULL REFERENCES versions (id),
        generation  INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE chunks (
        version_id  INTEGER NOT NULL REFERENCES versions (id),
        idx         INTEGER NOT NULL,
        chunk_id    TEXT NOT NULL UNIQUE,
        offset      INTEGER NOT NULL,
        size        INTEGER NOT NULL,
        checksum    BLOB NOT NULL,
        PRIMARY KEY (version_id, idx)
    ) WITHOUT ROWID;
    CREATE TABLE bodies (
        version_id  INTEGER PRIMARY KEY REFERENCES versions (id),
        checksum    BLOB NOT NULL,
        data        BLOB NOT NULL
    );
    CREATE TABLE replicas (
        chunk_id    TEXT NOT NULL,
        node_id     TEXT NOT NULL,
        pos         INTEGER NOT NULL,
        PRIMARY KEY (chunk_id, node_id)
    ) WITHOUT ROWID;
    CREATE INDEX replicas_node ON replicas (node_id);
    CREATE TABLE identities (
        addr        TEXT PRIMARY KEY,
        node_id     TEXT NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE members (
        addr        TEXT PRIMARY KEY,
        state       TEXT NOT NULL CHECK (state IN ('active', 'draining', 'removed'))
    ) WITHOUT ROWID;
    """,
    # 2: no column named after a reserved word (``offset``), so the same statements
    # serve every engine
    "ALTER TABLE chunks RENAME COLUMN offset TO first_byte;",
    # 3: who runs the background work, under which epoch, until when
    """
    CREATE TABLE leader (
        id          INTEGER PRIMARY KEY CHECK (id = 1),
        holder      TEXT NOT NULL,
        epoch       INTEGER NOT NULL,
        expires     REAL NOT NULL
    );
    """,
    # 4: read pins: versions a download reads, kept from the reaper until ``expires``;
    # work any gateway asks the leader for; the gateways seen, and the leader's job state
    """
    CREATE TABLE pins (
        version_id  INTEGER NOT NULL,
        holder      TEXT NOT NULL,
        expires     REAL NOT NULL,
        PRIMARY KEY (version_id, holder)
    ) WITHOUT ROWID;
    CREATE TABLE work (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        kind        TEXT NOT NULL,
        chunk_id    TEXT NOT NULL,
        node_id     TEXT NOT NULL,
        reason      TEXT NOT NULL
    );
    CREATE TABLE gateways (
        holder      TEXT PRIMARY KEY,
        seen        REAL NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE jobs (
        name        TEXT PRIMARY KEY,
        state       TEXT NOT NULL
    ) WITHOUT ROWID;
    """,
    # 5: S3 buckets (bucket B's object K is the file "B/K")
    """
    CREATE TABLE buckets (
        name        TEXT PRIMARY KEY,
        created     REAL NOT NULL
    ) WITHOUT ROWID;
    """,
    # 6: S3 multipart uploads and their parts
    MULTIPART_TABLES.format(collate="", real="REAL", integer="INTEGER", rowid=" WITHOUT ROWID"),
    # 7: files by version: the foreign key check of every purged version looked for a
    # file naming it by scanning all of them (20 000 overwritten files took 12 s to purge)
    "CREATE INDEX files_version ON files (version_id);",
)

LATEST = len(MIGRATIONS)


def migrate(db: sqlite3.Connection) -> int:
    """Bring the schema to ``LATEST`` in one transaction (a second opener waits for it);
    the version it was at before."""
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = db.execute("SELECT version FROM schema_version").fetchone()
        if row is not None:
            found = int(row[0])
        else:
            legacy = db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'versions'"
            ).fetchone()
            found = 1 if legacy else 0
            db.execute("INSERT INTO schema_version (version) VALUES (?)", (found,))
        if found > LATEST:
            raise ConfigError(
                f"the metadata schema is at version {found}; this dstore knows up to {LATEST}"
            )
        for number in range(found + 1, LATEST + 1):
            for statement in MIGRATIONS[number - 1].split(";"):
                if statement.strip():
                    db.execute(statement)
        db.execute("UPDATE schema_version SET version = ?", (LATEST,))
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return found
