"""HTTP byte ranges (RFC 9110 §14): one range of ``bytes=a-b``, ``a-`` or ``-n``."""

from __future__ import annotations

import re

from dstore.errors import RangeNotSatisfiable

_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


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
        n = int(last)
        if n == 0 or size == 0:
            raise RangeNotSatisfiable(f"range {header} of {size} bytes")
        return max(size - n, 0), size
    start = int(first)
    end = size if not last else min(int(last) + 1, size)
    if last and int(last) < start:
        return None  # invalid: ignore the header
    if start >= size:
        raise RangeNotSatisfiable(f"range {header} of {size} bytes")
    return start, end
