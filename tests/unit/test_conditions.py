"""Conditional requests (RFC 9110 §13), pure: each header alone, and their order."""

from __future__ import annotations

import pytest

from dstore.gateway.conditions import Outcome, Preconditions, Validators

NOW = Validators('"abc"', 1_780_000_000.7)
DATE = "Thu, 28 May 2026 20:26:40 GMT"  # 1_780_000_000: the version's second
BEFORE = "Thu, 28 May 2026 20:26:39 GMT"
AFTER = "Thu, 28 May 2026 20:26:41 GMT"
P, NM, PF = Outcome.PROCEED, Outcome.NOT_MODIFIED, Outcome.PRECONDITION_FAILED


@pytest.mark.parametrize(
    ("headers", "get", "put"),
    [
        ({}, P, P),
        ({"If-Match": '"abc"'}, P, P),
        ({"If-Match": '"x", "abc"'}, P, P),
        ({"If-Match": "*"}, P, P),
        ({"If-Match": '"other"'}, PF, PF),
        ({"If-Match": 'W/"abc"'}, PF, PF),  # If-Match compares strongly
        ({"If-None-Match": '"abc"'}, NM, PF),
        ({"If-None-Match": 'W/"abc"'}, NM, PF),  # If-None-Match compares weakly
        ({"If-None-Match": "*"}, NM, PF),
        ({"If-None-Match": '"other"'}, P, P),
        ({"If-Modified-Since": DATE}, NM, P),  # equal: not modified since
        ({"If-Modified-Since": AFTER}, NM, P),
        ({"If-Modified-Since": BEFORE}, P, P),
        ({"If-Modified-Since": "yesterday"}, P, P),  # not a date: ignored
        ({"If-Unmodified-Since": BEFORE}, PF, PF),
        ({"If-Unmodified-Since": DATE}, P, P),
        ({"If-Unmodified-Since": "Thu, 01 Jan 1970 00:00:00 GMT"}, PF, PF),
        # §13.2.2: If-Match wins over If-Unmodified-Since, If-None-Match over IMS
        ({"If-Match": '"abc"', "If-Unmodified-Since": BEFORE}, P, P),
        ({"If-None-Match": '"other"', "If-Modified-Since": AFTER}, P, P),
    ],
)
def test_each_precondition_as_rfc_9110_orders_them(
    headers: dict[str, str], get: Outcome, put: Outcome
) -> None:
    conditions = Preconditions.from_headers(headers)
    assert conditions.evaluate("GET", NOW) is get
    assert conditions.evaluate("HEAD", NOW) is get
    assert conditions.evaluate("PUT", NOW) is put
    assert conditions.evaluate("DELETE", NOW) is put


def test_a_missing_file_fails_if_match_and_passes_if_none_match() -> None:
    assert Preconditions(if_match="*").evaluate("PUT", None) is PF
    assert Preconditions(if_match='"abc"').evaluate("GET", None) is PF
    assert Preconditions(if_none_match="*").evaluate("PUT", None) is P
    assert Preconditions(if_unmodified_since=BEFORE).evaluate("DELETE", None) is P


@pytest.mark.parametrize(
    ("if_range", "applies"),
    [
        (None, True),
        ('"abc"', True),
        ('"old"', False),
        ('W/"abc"', False),  # a weak tag never validates a range
        (DATE, True),
        (BEFORE, False),
        ("garbage", False),
    ],
)
def test_if_range_that_does_not_match_asks_for_the_whole_file(
    if_range: str | None, applies: bool
) -> None:
    assert Preconditions(if_range=if_range).range_applies(NOW) is applies
