"""HTTP byte ranges (RFC 9110 §14): one range of ``bytes=a-b``, ``a-`` or ``-n``."""

from __future__ import annotations

import re

from dstore.errors import RangeNotSatisfiable

_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
_MAX_DIGITS = 19  # past any file size; a longer number is read as "beyond the end"
_BEYOND = 1 << 63


def _number(digits: str) -> int:
    """A range position, without parsing an unbounded number (Python refuses past 4,300
    digits, and the work grows with the length before that)."""
    return int(digits) if len(digits) <= _MAX_DIGITS else _BEYOND


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(start, end)`` (end exclusive) of the one range asked for, or None for the whole
    representation (no header, several ranges, or a header we do not understand, which
    RFC 9110 lets a server ignore). Raises ``RangeNotSatisfiable`` when nothing of the
    file is in range."""
    if not header:
        return None
    match = _RANGE.fullmatch(header.strip().replace(" ", ""))
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # suffix: the last n bytes
        n = _number(last)
        if n == 0 or size == 0:
            raise RangeNotSatisfiable(f"range {header} of {size} bytes")
        return max(size - n, 0), size
    start = _number(first)
    end = size if not last else min(_number(last) + 1, size)
    if last and _number(last) < start:
        return None  # invalid: ignore the header
    if start >= size:
        raise RangeNotSatisfiable(f"range {header} of {size} bytes")
    return start, end
