"""What the SQL engines (SQLite, PostgreSQL) share: the bound that lets a prefix scan stop,
the replica lists they fold into one column, the leadership statement, and the rules of
an ``If-Match`` checked inside a commit."""

from __future__ import annotations

from collections.abc import Sequence

from dstore.errors import EntityTooSmall, InvalidPart, PreconditionFailed


def prefix_end(prefix: str) -> str | None:
    """The least string above every string that starts with ``prefix`` (its last code
    point bumped, over the surrogates, which no stored string holds); None past U+10FFFF.
    Both engines order names by code point (SQLite's BINARY, PostgreSQL's ``COLLATE "C"``
    on UTF-8), as Python does."""
    last = ord(prefix[-1]) + 1
    if 0xD800 <= last <= 0xDFFF:
        last = 0xE000
    return None if last > 0x10FFFF else prefix[:-1] + chr(last)


def split_node_ids(joined: str | None) -> tuple[str, ...]:
    """A replica list folded into one comma-separated column, as a tuple."""
    return tuple(n for n in (joined or "").split(",") if n)


def lead_statement(now: str, holder: str, ttl: str, greatest: str) -> str:
    """The one guarded statement that takes or keeps the leadership (``MetadataStore.lead``):
    a new row, or the row kept by its holder, or taken from a holder whose lease ran out
    (with the next epoch); it returns the epoch only if ``holder`` leads after it. ``now``
    is the engine's clock expression, ``holder`` and ``ttl`` its parameter marks,
    ``greatest`` the engine's name for the larger of two values.

    An epoch is the database clock in milliseconds when the leadership was taken, or the
    one before plus one if that is more: it only grows within a database, and a new or
    migrated database starts above what the nodes heard of under the one before (they
    fence deletes with it)."""
    taken = f"CAST({now} * 1000 AS BIGINT)"
    return (
        "INSERT INTO leader (id, holder, epoch, expires)"
        f" VALUES (1, {holder}, {taken}, {now} + {ttl})"
        " ON CONFLICT (id) DO UPDATE SET"
        " epoch = CASE WHEN leader.holder = excluded.holder"
        f" AND leader.expires >= {now} THEN leader.epoch"
        f" ELSE {greatest}(leader.epoch + 1, {taken}) END,"
        " holder = excluded.holder, expires = excluded.expires"
        f" WHERE leader.holder = excluded.holder OR leader.expires < {now}"
        " RETURNING epoch"
    )


CREATE_BUCKET = (
    "INSERT INTO buckets (name, created) VALUES ({name}, {now})"
    " ON CONFLICT (name) DO NOTHING RETURNING name"
)
# a live file in the bucket (names from "B/" up to the first name past every "B/…")
BUCKET_HOLDS = "SELECT 1 FROM files WHERE name >= {low} AND name < {high} LIMIT 1"

# S3 multipart uploads and their parts (a part is a pending version of the upload's name)
MULTIPART_TABLES = """
    CREATE TABLE uploads (
        id            TEXT PRIMARY KEY,
        name          TEXT {collate} NOT NULL,
        content_type  TEXT NOT NULL,
        created       {real} NOT NULL,
        expires       {real} NOT NULL
    ){rowid};
    CREATE INDEX uploads_name ON uploads (name, id);
    CREATE INDEX uploads_expires ON uploads (expires);
    CREATE TABLE parts (
        upload_id     TEXT NOT NULL,
        number        INTEGER NOT NULL,
        version_id    {integer} NOT NULL,
        size          {integer} NOT NULL,
        etag          TEXT NOT NULL,
        created       {real} NOT NULL,
        PRIMARY KEY (upload_id, number)
    ){rowid};
"""


def chosen_parts(
    upload_id: str,
    stored: dict[int, tuple[int, int, str]],
    listed: Sequence[tuple[int, str]],
    min_part: int,
) -> list[tuple[int, int]]:
    """(version id, size) of the parts a completion lists, in its order, checked against
    the parts stored (number → (version id, size, ETag)): ``InvalidPart`` for one not
    stored or stored with another ETag, ``EntityTooSmall`` for one but the last under
    ``min_part`` bytes. (ETags compare without their quotes, which clients may drop.)"""
    chosen: list[tuple[int, int]] = []
    for number, etag in listed:
        found = stored.get(number)
        if found is None or found[2].strip('"') != etag.strip().strip('"'):
            raise InvalidPart(f"part {number} of upload {upload_id} is not stored with that ETag")
        chosen.append((found[0], found[1]))
    for (number, _), (_, size) in zip(listed[:-1], chosen[:-1], strict=True):
        if size < min_part:
            raise EntityTooSmall(f"part {number} is {size} bytes; all but the last need {min_part}")
    return chosen


REQUEST_WORK = "INSERT INTO work (kind, chunk_id, node_id, reason) VALUES ({marks})"
# (SKIP LOCKED on PostgreSQL: two takers at once each get their own requests)
TAKE_WORK = (
    "DELETE FROM work WHERE id IN (SELECT id FROM work ORDER BY id LIMIT {limit}{skip})"
    " RETURNING id, kind, chunk_id, node_id, reason"
)

CHECK_IN = (
    "INSERT INTO gateways (holder, seen) VALUES ({holder}, {now})"
    " ON CONFLICT (holder) DO UPDATE SET seen = excluded.seen"
)
SEEN = "SELECT holder, {now} - seen FROM gateways WHERE seen > {now} - {within} ORDER BY holder"
FORGET_GATEWAYS = "DELETE FROM gateways WHERE seen < {now} - 86400"
SAVE_JOB = (
    "INSERT INTO jobs (name, state) VALUES ({name}, {state})"
    " ON CONFLICT (name) DO UPDATE SET state = excluded.state"
)

PINNED = "EXISTS (SELECT 1 FROM pins p WHERE p.version_id = v.id AND p.expires > {now})"


def pin_statement(now: str, greatest: str, version: str, holder: str, ttl: str, settle: str) -> str:
    """A read pin (``MetadataStore.pin``) in one statement: made, or its expiry pushed
    later, only while the version is not dead for more than ``settle``; it returns the
    version id if pinned. ``now`` and ``greatest`` as for ``lead_statement``, the rest
    parameter marks."""
    return (
        "INSERT INTO pins (version_id, holder, expires)"
        f" SELECT id, {holder}, {now} + {ttl} FROM versions WHERE id = {version}"
        f" AND (state <> 'dead' OR dead_since > {now} - {settle})"
        " ON CONFLICT (version_id, holder) DO UPDATE"
        f" SET expires = {greatest}(pins.expires, excluded.expires)"
        " RETURNING version_id"
    )


def renew_pins_statement(greatest: str, rows: str) -> str:
    """Keep (or make again) pins (``renew_pins``); ``rows``: a VALUES or SELECT of
    (version id, holder, expiry)."""
    return (
        f"INSERT INTO pins (version_id, holder, expires) {rows}"
        " ON CONFLICT (version_id, holder) DO UPDATE"
        f" SET expires = {greatest}(pins.expires, excluded.expires)"
    )


def match_needs_etag(
    name: str, current: tuple[int, int] | None, if_match: Sequence[str] | None
) -> bool:
    """Whether an ``If-Match`` list must be compared with the current version's ETag
    (``check_etag``): not when none was given or ``*`` matches any; ``PreconditionFailed``
    when the name has no current version."""
    if if_match is None:
        return False
    if current is None:
        raise PreconditionFailed(f"{name!r} does not exist")
    return "*" not in if_match


def check_etag(name: str, etag: str, if_match: Sequence[str]) -> None:
    if etag not in if_match:
        raise PreconditionFailed(f"{name!r} is at another version than If-Match names")
