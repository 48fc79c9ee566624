"""Counters the HTTP layer keeps for ``/metrics``, and the recent traffic the dashboard
charts."""

from __future__ import annotations

from collections import Counter

from dstore.gateway.traffic import Traffic
from dstore.histogram import Histogram


class HttpCounters:
    """Counted by the request middleware: requests by method and status, body bytes, and
    request durations by method and status class (``2xx`` …). ``traffic``: where every
    request is also sampled for the dashboard (the native and the S3 API share one)."""

    def __init__(self, traffic: Traffic | None = None) -> None:
        self.requests: Counter[tuple[str, int]] = Counter()
        self.durations: dict[tuple[str, str], Histogram] = {}
        self.bytes_in = 0
        self.bytes_out = 0
        self.traffic = traffic

    def observe(
        self, method: str, status: int, bytes_in: int, bytes_out: int, seconds: float = 0.0
    ) -> None:
        self.requests[(method, status)] += 1
        self.bytes_in += bytes_in
        self.bytes_out += bytes_out
        key = (method, f"{status // 100}xx")
        histogram = self.durations.get(key)
        if histogram is None:
            histogram = self.durations[key] = Histogram()
        histogram.observe(seconds)
        if self.traffic is not None:
            self.traffic.observe(seconds, status, bytes_in, bytes_out)
