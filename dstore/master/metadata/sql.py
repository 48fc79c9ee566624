"""What the SQL engines (SQLite, PostgreSQL) share: the bound that lets a prefix scan stop,
the replica lists they fold into one column, the leadership statement, and the rules of
an ``If-Match`` checked inside a commit."""

from __future__ import annotations

from collections.abc import Sequence

from dstore.errors import PreconditionFailed


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


def lead_statement(now: str, holder: str, ttl: str) -> str:
    """The one guarded statement that takes or keeps the leadership (``MetadataStore.lead``):
    a new row, or the row kept by its holder, or taken from a holder whose lease ran out
    (with the next epoch); it returns the epoch only if ``holder`` leads after it. ``now``
    is the engine's clock expression, ``holder`` and ``ttl`` its parameter marks."""
    return (
        f"INSERT INTO leader (id, holder, epoch, expires) VALUES (1, {holder}, 1, {now} + {ttl})"
        " ON CONFLICT (id) DO UPDATE SET"
        " epoch = CASE WHEN leader.holder = excluded.holder"
        f" AND leader.expires >= {now} THEN leader.epoch ELSE leader.epoch + 1 END,"
        " holder = excluded.holder, expires = excluded.expires"
        f" WHERE leader.holder = excluded.holder OR leader.expires < {now}"
        " RETURNING epoch"
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
