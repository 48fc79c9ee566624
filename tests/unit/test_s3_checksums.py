"""x-amz-checksum-* values checked as a body streams: from a header or from an
aws-chunked body's trailer; a wrong one raises at the end, before the body is done."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from dstore.s3.checksums import checked, wanted
from dstore.s3.sigv4 import S3Error

HELLO_CRC32 = "DUoRhQ=="  # CRC32 of b"hello world", base64 of its 4 big-endian bytes


async def pieces() -> AsyncIterator[bytes]:
    for piece in (b"hello", b" ", b"world"):
        yield piece


async def drain(body: AsyncIterator[bytes]) -> bytes:
    return b"".join([p async for p in body])


async def test_a_header_checksum_is_checked() -> None:
    assert wanted({"x-amz-checksum-crc32": HELLO_CRC32}) == ("crc32", HELLO_CRC32)
    assert await drain(checked(pieces(), "crc32", HELLO_CRC32)) == b"hello world"
    with pytest.raises(S3Error) as caught:
        await drain(checked(pieces(), "crc32", "AAAAAA=="))
    assert caught.value.code == "BadDigest"
    sha1 = "Kq5sNclPz7QV2+lfQIuc6R7oRu0="
    assert await drain(checked(pieces(), "sha1", sha1)) == b"hello world"


async def test_a_trailer_checksum_is_read_once_the_body_ends() -> None:
    announced = wanted({"x-amz-trailer": "x-amz-checksum-crc32"})
    assert announced == ("crc32", None)
    trailers: dict[str, str] = {}

    async def body_then_trailer() -> AsyncIterator[bytes]:
        async for piece in pieces():
            yield piece
        trailers["x-amz-checksum-crc32"] = HELLO_CRC32  # (as the decoder sets it)

    assert await drain(checked(body_then_trailer(), "crc32", None, trailers)) == b"hello world"
    with pytest.raises(S3Error, match="trailer is missing"):
        await drain(checked(pieces(), "crc32", None, {}))


def test_an_unknown_algorithm_is_refused_and_none_is_fine() -> None:
    with pytest.raises(S3Error):
        wanted({"x-amz-sdk-checksum-algorithm": "MD4"})
    assert wanted({}) is None
