"""Pure request parsing: byte ranges (RFC 9110) and file names (SPEC §2)."""

from __future__ import annotations

from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dstore.errors import BadName, RangeNotSatisfiable
from dstore.gateway.names import INVISIBLE, MAX_NAME_BYTES, name_from_raw_path, validate_name
from dstore.gateway.ranges import parse_range


def test_parse_range_forms() -> None:
    assert parse_range(None, 10) is None
    assert parse_range("bytes=0-4", 10) == (0, 5)
    assert parse_range("bytes=5-", 10) == (5, 10)
    assert parse_range("bytes=-3", 10) == (7, 10)
    assert parse_range("bytes=-30", 10) == (0, 10)
    assert parse_range("bytes=8-100", 10) == (8, 10)
    assert parse_range("bytes=0-1,3-4", 10) is None  # several ranges: whole file
    assert parse_range("items=0-1", 10) is None
    assert parse_range("bytes=5-2", 10) is None
    for bad in ("bytes=10-", "bytes=10-20", "bytes=-0"):
        with pytest.raises(RangeNotSatisfiable):
            parse_range(bad, 10)
    with pytest.raises(RangeNotSatisfiable):
        parse_range("bytes=-5", 0)


@given(st.integers(0, 10_000), st.integers(0, 20_000), st.integers(0, 20_000))
def test_a_satisfiable_range_is_inside_the_file(size: int, first: int, last: int) -> None:
    try:
        found = parse_range(f"bytes={first}-{last}", size)
    except RangeNotSatisfiable:
        assert first >= size
        return
    if found is None:
        assert last < first
        return
    start, end = found
    assert start == first and 0 <= start < end <= size and end == min(last + 1, size)


@pytest.mark.parametrize(
    "name", ["a", "a/b/c.txt", "a/../b", "a//b", " lead", "ünïcødé/名前", "\U0001f600", "x" * 1024]
)
def test_ordinary_and_odd_looking_names_are_kept_as_they_are(name: str) -> None:
    assert validate_name(name) == name
    assert name_from_raw_path("/v1/files/" + quote(name, safe="")) == name


@pytest.mark.parametrize(
    "raw", ["", "%00", "a%0Ab", "%7F", "a%1Fb", "%FF%FE", "x" * 1025, quote("é" * 513)]
)
def test_bad_names_are_refused(raw: str) -> None:
    with pytest.raises(BadName):
        name_from_raw_path("/v1/files/" + raw)


def test_the_name_limit_is_in_bytes_of_utf8() -> None:
    assert validate_name("é" * (MAX_NAME_BYTES // 2))
    with pytest.raises(BadName):
        validate_name("é" * (MAX_NAME_BYTES // 2) + "x")


def test_only_file_paths_carry_names() -> None:
    with pytest.raises(BadName):
        name_from_raw_path("/v1/cluster")
    assert name_from_raw_path("/v1/files/a%3Fb?x=1") == "a?b"


@pytest.mark.parametrize("ch", sorted(INVISIBLE))
def test_invisible_formatting_characters_are_refused(ch: str) -> None:
    """Bidirectional and zero-width controls would let one name pass for another."""
    with pytest.raises(BadName, match="invisible"):
        validate_name(f"a{ch}b")
