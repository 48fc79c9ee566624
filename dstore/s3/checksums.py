"""The ``x-amz-checksum-*`` values current S3 SDKs send with a body (as a header, or as a
trailer of an aws-chunked body), checked as the bytes stream: a mismatch raises before
the body ends, so the upload it feeds is never committed."""

from __future__ import annotations

import base64
import hashlib
import zlib
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Protocol

import structlog

from dstore.s3.sigv4 import S3Error

log = structlog.get_logger("dstore.s3")


class _Hasher(Protocol):
    def update(self, data: bytes, /) -> None: ...
    def digest(self) -> bytes: ...


class _Crc32:
    def __init__(self) -> None:
        self.value = 0

    def update(self, data: bytes, /) -> None:
        self.value = zlib.crc32(data, self.value)

    def digest(self) -> bytes:
        return self.value.to_bytes(4, "big")


ALGORITHMS: dict[str, Callable[[], _Hasher]] = {
    "crc32": _Crc32,
    "sha1": hashlib.sha1,
    "sha256": hashlib.sha256,
}
# named by SDKs, not checked here (no implementation in the standard library)
UNCHECKED = ("crc32c", "crc64nvme")


def wanted(headers: Mapping[str, str]) -> tuple[str, str | None] | None:
    """(algorithm, expected base64 value, or None when it comes as a trailer) that a
    request announces; None when it names none."""
    for name in (*ALGORITHMS, *UNCHECKED):
        value = headers.get(f"x-amz-checksum-{name}")
        if value is not None:
            return name, value.strip()
    trailer = headers.get("x-amz-trailer", "").strip().lower()
    if trailer.startswith("x-amz-checksum-"):
        return trailer.removeprefix("x-amz-checksum-"), None
    algorithm = headers.get("x-amz-sdk-checksum-algorithm", "").strip().lower()
    if algorithm and algorithm not in (*ALGORITHMS, *UNCHECKED):
        raise S3Error("InvalidRequest", f"unknown checksum algorithm {algorithm!r}", 400)
    return None


async def checked(
    body: AsyncIterator[bytes],
    algorithm: str,
    expected: str | None,
    trailers: Mapping[str, str] | None = None,
) -> AsyncIterator[bytes]:
    """``body`` as it is, then a ``BadDigest`` if its checksum is not ``expected`` (or,
    with ``expected`` None, the trailer's value, read once the body has ended)."""
    make = ALGORITHMS.get(algorithm)
    if make is None:
        if algorithm not in UNCHECKED:
            raise S3Error("InvalidRequest", f"unknown checksum algorithm {algorithm!r}", 400)
        log.info("s3_checksum_not_checked", algorithm=algorithm)
        async for piece in body:
            yield piece
        return
    hasher = make()
    async for piece in body:
        hasher.update(piece)
        yield piece
    value = expected
    if value is None:
        value = (trailers or {}).get(f"x-amz-checksum-{algorithm}")
        if value is None:
            raise S3Error("InvalidRequest", "the announced checksum trailer is missing", 400)
    if base64.b64encode(hasher.digest()).decode() != value:
        raise S3Error(
            "BadDigest", f"the {algorithm.upper()} you specified did not match the body", 400
        )
