"""Counters the HTTP layer keeps for ``/metrics``."""

from __future__ import annotations

from collections import Counter


class HttpCounters:
    """Counted by the request middleware."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, int]] = Counter()
        self.bytes_in = 0
        self.bytes_out = 0

    def observe(self, method: str, status: int, bytes_in: int, bytes_out: int) -> None:
        self.requests[(method, status)] += 1
        self.bytes_in += bytes_in
        self.bytes_out += bytes_out
