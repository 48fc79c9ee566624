"""The gateway's recent traffic for its dashboard: requests, errors, bytes in and out and
latency quantiles, one sample per ``step`` seconds for the last 15 minutes, kept in a
ring buffer in memory (so the page works without Prometheus). Pure: the clock is given."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dstore.histogram import Histogram


@dataclass(slots=True)
class Sample:
    start: float  # seconds since the epoch
    requests: int = 0
    errors: int = 0  # answered 5xx
    bytes_in: int = 0
    bytes_out: int = 0
    latency: Histogram = field(default_factory=Histogram)


class Traffic:
    def __init__(
        self, step: float = 5.0, keep: int = 180, clock: Callable[[], float] = time.time
    ) -> None:
        self.step = step
        self.clock = clock
        self._closed: deque[Sample] = deque(maxlen=keep)
        self._current = Sample(self._floor(clock()))

    def __repr__(self) -> str:
        return f"<Traffic {len(self._closed)} samples of {self.step:g} s>"

    def _floor(self, now: float) -> float:
        return now - now % self.step

    def _roll(self) -> Sample:
        """The sample now open, after closing those whose time is up (quiet ones as
        zeros, so a chart shows the quiet)."""
        start = self._floor(self.clock())
        current = self._current
        if start > current.start:
            self._closed.append(current)
            keep = self._closed.maxlen or 0
            gap = max(current.start + self.step, start - self.step * keep)
            while gap < start:
                self._closed.append(Sample(gap))
                gap += self.step
            self._current = current = Sample(start)
        return current

    def observe(self, seconds: float, status: int, bytes_in: int, bytes_out: int) -> None:
        sample = self._roll()
        sample.requests += 1
        sample.errors += status >= 500
        sample.bytes_in += bytes_in
        sample.bytes_out += bytes_out
        sample.latency.observe(seconds)

    def recent(self) -> dict[str, Any]:
        """``{step, samples: [{t, requests, errors, bytes_in, bytes_out, p50, p99}]}``:
        rates per second, latencies in seconds (null with no request), oldest first; the
        last sample is the one still open (its rates over the time it has run)."""
        current = self._roll()
        now = self.clock()
        out = []
        for sample in [*self._closed, current]:
            span = self.step if sample is not current else max(now - sample.start, 1e-3)
            out.append(
                {
                    "t": sample.start,
                    "requests": sample.requests / span,
                    "errors": sample.errors / span,
                    "bytes_in": sample.bytes_in / span,
                    "bytes_out": sample.bytes_out / span,
                    "p50": sample.latency.quantile(0.5),
                    "p99": sample.latency.quantile(0.99),
                }
            )
        return {"step": self.step, "samples": out}
