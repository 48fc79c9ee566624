"""Conditional requests as RFC 9110 §13 says, pure: the preconditions a request carries
(``If-Match``, ``If-None-Match``, ``If-Modified-Since``, ``If-Unmodified-Since``,
``If-Range``) evaluated against the current version's validators, in the order §13.2.2
gives. One implementation for every API that serves files (the native one, and S3's).

A write's ``If-Match`` is also handed to the metadata commit, where it is checked again
inside the transaction (a compare-and-swap): of two writers holding the same ETag,
exactly one wins. The evaluation here only answers early, before a body is read.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime


class Outcome(enum.Enum):
    PROCEED = "proceed"
    NOT_MODIFIED = "not_modified"  # 304 (GET and HEAD only)
    PRECONDITION_FAILED = "precondition_failed"  # 412


@dataclass(frozen=True, slots=True)
class Validators:
    """What a version is compared by: its ETag (strong) and its modification time."""

    etag: str
    modified: float  # seconds since the epoch; HTTP dates have whole seconds


@dataclass(frozen=True, slots=True)
class Preconditions:
    """The conditional headers of one request, as sent (None when absent)."""

    if_match: str | None = None
    if_none_match: str | None = None
    if_modified_since: str | None = None
    if_unmodified_since: str | None = None
    if_range: str | None = None

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> Preconditions:
        """The request's preconditions; ``NONE`` (one shared value) when it has none, as
        most requests do."""
        values = [headers.get(name) for name in _HEADERS]
        return cls(*values) if any(v is not None for v in values) else NONE

    @property
    def any(self) -> bool:
        return any(
            h is not None
            for h in (
                self.if_match,
                self.if_none_match,
                self.if_modified_since,
                self.if_unmodified_since,
            )
        )

    def evaluate(self, method: str, current: Validators | None) -> Outcome:
        """RFC 9110 §13.2.2, for a resource that exists (``current``) or not (None)."""
        safe = method in ("GET", "HEAD")
        if self.if_match is not None:
            if current is None or not _matches(self.if_match, current.etag, weak=False):
                return Outcome.PRECONDITION_FAILED
        elif self.if_unmodified_since is not None and current is not None:
            date = _http_date(self.if_unmodified_since)
            if date is not None and int(current.modified) > date:
                return Outcome.PRECONDITION_FAILED
        if self.if_none_match is not None:
            if current is not None and _matches(self.if_none_match, current.etag, weak=True):
                return Outcome.NOT_MODIFIED if safe else Outcome.PRECONDITION_FAILED
        elif safe and self.if_modified_since is not None and current is not None:
            date = _http_date(self.if_modified_since)
            if date is not None and int(current.modified) <= date:
                return Outcome.NOT_MODIFIED
        return Outcome.PROCEED

    def range_applies(self, current: Validators) -> bool:
        """Whether a ``Range`` may be honoured: without ``If-Range``, or with one that
        still names this version (a strong ETag, or exactly its date); otherwise the
        whole current representation is sent, as a ``200``."""
        if self.if_range is None:
            return True
        value = self.if_range.strip()
        if value.startswith(('"', "W/")):
            return not value.startswith("W/") and value == current.etag
        date = _http_date(value)
        return date is not None and date == int(current.modified)


_HEADERS = ("If-Match", "If-None-Match", "If-Modified-Since", "If-Unmodified-Since", "If-Range")
NONE = Preconditions()


def strong_tags(header: str) -> tuple[str, ...]:
    """The ETags an ``If-Match`` names, for the metadata's compare-and-swap: ``("*",)``
    for any version; weak tags never match there, so they are left out."""
    value = header.strip()
    if value == "*":
        return ("*",)
    return tuple(t for t in (t.strip() for t in value.split(",")) if t and not t.startswith("W/"))


def _matches(header: str, etag: str, *, weak: bool) -> bool:
    """Whether a list of entity tags (or ``*``) names ``etag``: ``weak`` comparison
    ignores the ``W/`` prefix (If-None-Match), strong comparison needs two strong tags
    (If-Match). Our ETags are always strong."""
    value = header.strip()
    if value == "*":
        return True
    for tag in (t.strip() for t in value.split(",")):
        if tag.startswith("W/"):
            if weak and tag[2:] == etag:
                return True
        elif tag == etag:
            return True
    return False


def _http_date(value: str) -> int | None:
    """Seconds since the epoch of an HTTP date; None for one that is not (RFC 9110 says
    an invalid date makes the condition ignored)."""
    try:
        parsed = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if parsed.tzinfo is None:
        return None
    try:
        return int(parsed.timestamp())
    except (OverflowError, OSError, ValueError):
        return None
