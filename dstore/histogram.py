"""Latency histograms: counts of durations in fixed buckets, as Prometheus keeps them
(so a dashboard can graph any quantile, summed over gateways), and a quantile estimated
from them for the gateway's own charts. Pure: no clock, no I/O; safe to observe from
worker threads (a lock per observation: they come at most every few microseconds)."""

from __future__ import annotations

import bisect
import threading
from collections.abc import Sequence

# upper bounds in seconds: 0.5 ms (a cached small GET) to 30 s (a large body)
BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


class Histogram:
    """Durations in ``BUCKETS`` (one more count for those above the last bound)."""

    __slots__ = ("_lock", "count", "counts", "sum")

    def __init__(self, counts: Sequence[int] | None = None, total: float = 0.0) -> None:
        self.counts = list(counts) if counts is not None else [0] * (len(BUCKETS) + 1)
        if len(self.counts) != len(BUCKETS) + 1:
            raise ValueError(f"a histogram has {len(BUCKETS) + 1} counts, not {len(self.counts)}")
        self.count = sum(self.counts)
        self.sum = total
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<Histogram {self.count} observed, mean {self.mean() * 1000:.2f} ms>"

    def observe(self, seconds: float) -> None:
        at = bisect.bisect_left(BUCKETS, seconds)
        with self._lock:
            self.counts[at] += 1
            self.count += 1
            self.sum += seconds

    def mean(self) -> float:
        return self.sum / self.count if self.count else 0.0

    def quantile(self, q: float) -> float | None:
        """The ``q`` quantile (0..1), interpolated inside its bucket as Prometheus's
        ``histogram_quantile`` does; None with nothing observed."""
        if not self.count:
            return None
        rank = q * self.count
        seen = 0
        for i, n in enumerate(self.counts):
            if n and seen + n >= rank:
                low = BUCKETS[i - 1] if i > 0 else 0.0
                high = BUCKETS[i] if i < len(BUCKETS) else BUCKETS[-1]
                return low + (high - low) * ((rank - seen) / n)
            seen += n
        return BUCKETS[-1]

    def exposition(self, name: str, labels: str = "") -> list[str]:
        """Prometheus text lines: cumulative ``_bucket``s, ``_sum`` and ``_count``.
        ``labels``: ``a="x",b="y"`` (without braces), or empty."""
        sep = "," if labels else ""
        lines = []
        running = 0
        for bound, n in zip((*BUCKETS, float("inf")), self.counts, strict=True):
            running += n
            le = "+Inf" if bound == float("inf") else repr(bound)
            lines.append(f'{name}_bucket{{{labels}{sep}le="{le}"}} {running}')
        braces = f"{{{labels}}}" if labels else ""
        lines.append(f"{name}_sum{braces} {self.sum}")
        lines.append(f"{name}_count{braces} {self.count}")
        return lines
