"""Latency histograms (buckets, quantiles, Prometheus lines) and the dashboard's ring
buffer of recent traffic, on a clock the test moves."""

from __future__ import annotations

import pytest

from dstore.gateway.traffic import Traffic
from dstore.histogram import BUCKETS, Histogram


def test_a_histogram_counts_in_buckets_and_estimates_quantiles() -> None:
    h = Histogram()
    assert h.quantile(0.5) is None
    for _ in range(90):
        h.observe(0.002)  # (0.001, 0.0025]
    for _ in range(10):
        h.observe(0.3)  # (0.25, 0.5]
    assert h.count == 100 and h.sum == pytest.approx(90 * 0.002 + 3.0)
    p50 = h.quantile(0.5)
    assert p50 is not None and 0.001 < p50 <= 0.0025
    p99 = h.quantile(0.99)
    assert p99 is not None and 0.25 < p99 <= 0.5
    h.observe(99.0)  # above the last bound
    assert h.counts[-1] == 1
    lines = h.exposition("d_seconds", 'method="GET"')
    assert lines[0] == f'd_seconds_bucket{{method="GET",le="{BUCKETS[0]!r}"}} 0'
    assert 'd_seconds_bucket{method="GET",le="0.0025"} 90' in lines
    assert 'd_seconds_bucket{method="GET",le="+Inf"} 101' in lines
    assert lines[-1] == 'd_seconds_count{method="GET"} 101'
    assert Histogram().exposition("x")[-1] == "x_count 0"


def test_traffic_keeps_one_sample_per_step_and_fills_the_quiet() -> None:
    now = [1000.0]
    traffic = Traffic(step=5.0, keep=4, clock=lambda: now[0])
    for _ in range(10):
        traffic.observe(0.01, 200, 100, 1000)
    traffic.observe(0.02, 503, 0, 50)
    now[0] = 1006.0  # the next step: the first closes
    traffic.observe(0.01, 200, 0, 0)
    samples = traffic.recent()["samples"]
    assert [s["t"] for s in samples] == [1000.0, 1005.0]
    first = samples[0]
    assert first["requests"] == pytest.approx(11 / 5) and first["errors"] == pytest.approx(1 / 5)
    assert first["bytes_out"] == pytest.approx(10_050 / 5)
    assert 0.005 < first["p50"] <= 0.01
    now[0] = 1031.0  # quiet for 25 s: zeros, and only the last `keep` closed samples kept
    samples = traffic.recent()["samples"]
    assert [s["t"] for s in samples] == [1010.0, 1015.0, 1020.0, 1025.0, 1030.0]
    assert all(s["requests"] == 0 and s["p99"] is None for s in samples)
    now[0] = 10_000.0  # a long sleep does not loop over every step missed
    assert len(traffic.recent()["samples"]) == 5
