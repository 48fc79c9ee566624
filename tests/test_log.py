"""Log set-up (dstore/log.py): the timestamp every line carries."""

from __future__ import annotations

import datetime
import re
import time

from dstore.log import UtcStamp


def test_timestamps_are_iso_utc_with_microseconds_and_follow_the_clock() -> None:
    stamp = UtcStamp()
    stamps = []
    for _ in range(3):
        before = datetime.datetime.now(datetime.UTC)
        value = stamp(None, "info", {})["timestamp"]
        after = datetime.datetime.now(datetime.UTC)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", value), value
        parsed = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        assert before - datetime.timedelta(microseconds=1) <= parsed <= after
        stamps.append(value)
        time.sleep(0.6)  # the cached second must roll over between some of them
    assert stamps == sorted(stamps) and len({s[:19] for s in stamps}) >= 2
