"""What the SQL engines (SQLite, PostgreSQL) share besides their statements: the bound
that lets a prefix scan stop, and the replica lists they fold into one column."""

from __future__ import annotations


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
