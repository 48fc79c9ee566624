"""Log set-up (dstore/log.py): the timestamp every line carries."""

from __future__ import annotations

import datetime
import re

import pytest

from dstore import log
from dstore.log import UtcStamp


def test_timestamps_are_iso_utc_with_microseconds_and_follow_the_clock(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The formatted second is cached: it must roll over with the clock, and the fraction
    must always be the clock's own."""
    clock = iter([1_780_000_000.25, 1_780_000_000.999999, 1_780_000_001.0, 1_780_000_061.5])
    monkeypatch.setattr(log.time, "time", lambda: next(clock))
    stamp = UtcStamp()
    stamps = [stamp(None, "info", {})["timestamp"] for _ in range(4)]
    for value in stamps:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", value), value
    parsed = [datetime.datetime.fromisoformat(v.replace("Z", "+00:00")) for v in stamps]
    start = datetime.datetime.fromtimestamp(1_780_000_000, datetime.UTC)
    assert [p - start for p in parsed] == [
        datetime.timedelta(microseconds=250_000),
        datetime.timedelta(microseconds=999_999),
        datetime.timedelta(seconds=1),
        datetime.timedelta(seconds=61, microseconds=500_000),
    ]


def test_a_timestamp_is_now() -> None:
    before = datetime.datetime.now(datetime.UTC)
    value = UtcStamp()(None, "info", {})["timestamp"]
    after = datetime.datetime.now(datetime.UTC)
    parsed = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    assert before - datetime.timedelta(microseconds=1) <= parsed <= after
