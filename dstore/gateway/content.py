"""The content headers a file keeps with each version: its ``Content-Type`` and, as S3
keeps them, ``Cache-Control``, ``Content-Disposition``, ``Content-Encoding``,
``Content-Language``, ``Expires`` and the user's ``x-amz-meta-*``. A GET through either
API returns them.

They are stored in the version's ``content_type`` column: the type on the first line,
then one ``name: value`` per line (a header value holds no line break, so the form is
unambiguous, and a file with no other header stores its type alone, as before).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from dstore.errors import MetadataTooLarge

KEPT = ("cache-control", "content-disposition", "content-encoding", "content-language", "expires")
USER = "x-amz-meta-"
MAX_USER = 2048  # bytes of user metadata (names and values), as S3 allows


def pack(content_type: str, headers: Sequence[tuple[str, str]] = ()) -> str:
    """A version's stored content headers."""
    lines = [content_type.replace("\n", " ").replace("\r", " ")]
    lines += [f"{name}: {value}" for name, value in headers]
    return "\n".join(lines)


def unpack(stored: str) -> tuple[str, list[tuple[str, str]]]:
    """(Content-Type, the other headers) of a version's stored content headers."""
    content_type, *lines = stored.split("\n")
    headers = []
    for line in lines:
        name, _, value = line.partition(": ")
        headers.append((name, value))
    return content_type, headers


def kept(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The headers of a request a version keeps (names in lower case, as S3 returns user
    metadata). ``aws-chunked`` is how the body was sent, not what it is: it is dropped
    from ``Content-Encoding``. ``MetadataTooLarge`` past 2 KiB of user metadata."""
    found: list[tuple[str, str]] = []
    user = 0
    for raw, value in headers:
        name = raw.lower()
        value = value.strip()
        if name == "content-encoding":
            value = ",".join(
                e.strip() for e in value.split(",") if e.strip() and e.strip() != "aws-chunked"
            )
            if not value:
                continue
        if name.startswith(USER) and len(name) > len(USER):
            user += len(name) - len(USER) + len(value.encode("utf-8", "surrogateescape"))
        elif name not in KEPT:
            continue
        found.append((name, value.replace("\n", " ").replace("\r", " ")))
    if user > MAX_USER:
        raise MetadataTooLarge(f"{user} bytes of x-amz-meta-* headers; at most {MAX_USER}")
    return found


def overridden(stored: str, overrides: Mapping[str, str]) -> str:
    """Stored content headers with some replaced (``response-*`` of an S3 GET)."""
    content_type, headers = unpack(stored)
    content_type = overrides.get("content-type", content_type)
    merged = dict(headers)
    merged.update((k, v) for k, v in overrides.items() if k != "content-type")
    return pack(content_type, list(merged.items()))
