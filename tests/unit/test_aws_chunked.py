"""aws-chunked bodies decoded as they stream: AWS's streaming example (two chunks of 'a'
and the final one, each with its published signature) in pieces of every size; a flipped
byte, a wrong signature or a cut body refused; unsigned chunks with a checksum trailer."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator

import pytest

from dstore.s3.chunked import Decoded, decode
from dstore.s3.sigv4 import S3Error, Verified, scope, signing_key

SEED = "4f232c4386841ef735655705268965c44a0e4690baa4adea153f7db9fa80a0a9"
SIGNATURES = [
    "ad80c730a21e5b8d04586a2213dd63b9a0e99e0e2307b0ade35a65485a288648",
    "0055627c9e194cb4542bae2aa5492e3c1575bbb81b612b7d234b86a503ef5497",
    "b6c6ea8a5354eaf15b3cb7646744f4275b71ea724fed81ceb9323e279d449df9",
]
CHUNKS = [b"a" * 65536, b"a" * 1024, b""]
SIGNED = Verified(
    "AKIAIOSFODNN7EXAMPLE",
    "STREAMING-AWS4-HMAC-SHA256-PAYLOAD",
    signing_key("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "20130524", "us-east-1"),
    "20130524T000000Z",
    scope("20130524", "us-east-1"),
    SEED,
)


def body(signatures: list[str] = SIGNATURES, chunks: list[bytes] = CHUNKS) -> bytes:
    out = b""
    for data, sig in zip(chunks, signatures, strict=True):
        out += f"{len(data):x};chunk-signature={sig}\r\n".encode() + data + b"\r\n"
    return out


async def pieces(data: bytes, seed: int) -> AsyncIterator[bytes]:
    rng = random.Random(seed)
    at = 0
    while at < len(data):
        n = rng.choice([1, 2, 7, 100, 4096, 70000])
        yield data[at : at + n]
        at += n


async def collect(source: AsyncIterator[bytes], **kw: object) -> bytes:
    return b"".join([p async for p in decode(source, **kw)])  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", range(6))
async def test_awss_streaming_example_decodes_in_pieces_of_any_size(seed: int) -> None:
    got = await collect(pieces(body(), seed), signed=SIGNED, decoded_length=66560)
    assert got == b"a" * 66560
    assert len(body()) == 66824  # the example's Content-Length


async def test_a_flipped_byte_or_a_wrong_signature_is_refused() -> None:
    data = bytearray(body())
    data[100] = ord("b")
    with pytest.raises(S3Error) as caught:
        await collect(pieces(bytes(data), 1), signed=SIGNED, decoded_length=None)
    assert caught.value.code == "SignatureDoesNotMatch"
    wrong = body([SIGNATURES[0], "0" * 64, SIGNATURES[2]])
    with pytest.raises(S3Error, match="signature"):
        await collect(pieces(wrong, 2), signed=SIGNED, decoded_length=None)


async def test_a_cut_or_overlong_body_is_refused() -> None:
    with pytest.raises(S3Error) as caught:
        await collect(pieces(body()[:40000], 3), signed=SIGNED, decoded_length=None)
    assert caught.value.code == "IncompleteBody"
    with pytest.raises(S3Error, match="decoded"):
        await collect(pieces(body(), 3), signed=SIGNED, decoded_length=66561)
    with pytest.raises(S3Error, match="malformed"):
        await collect(pieces(b"zz;chunk-signature=x\r\n", 3), signed=SIGNED, decoded_length=None)


async def test_unsigned_chunks_with_a_checksum_trailer() -> None:
    raw = b"5\r\nhello\r\n6\r\n world\r\n0\r\nx-amz-checksum-crc32:DUoRhQ==\r\n\r\n"
    seen = Decoded()
    got = await collect(pieces(raw, 4), signed=None, decoded_length=11, out=seen)
    assert got == b"hello world" and seen.trailers == {"x-amz-checksum-crc32": "DUoRhQ=="}
