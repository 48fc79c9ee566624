"""``Content-Encoding: aws-chunked`` bodies, decoded as they stream.

Each chunk is ``hex-size[;chunk-signature=SIG]\\r\\n`` then its bytes then ``\\r\\n``; a
chunk of size 0 ends the body, followed by trailer lines (``x-amz-checksum-crc32:…``)
and an empty line. With ``STREAMING-AWS4-HMAC-SHA256-PAYLOAD`` every chunk's signature
is checked, chained from the request's seed signature (``sigv4.chunk_signature``); with
``STREAMING-UNSIGNED-PAYLOAD-TRAILER`` chunks carry no signature. A chunk's bytes are
passed on as they arrive and its signature checked at its end: a mismatch raises before
the body ends, so the upload it feeds is never committed.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from dstore.s3.sigv4 import S3Error, Verified, chunk_signature

MAX_LINE = 4096  # a chunk header or trailer line, at most
MAX_CHUNK = 64 << 20  # a chunk's announced size, at most (clients send 8 KiB to 8 MiB)


def _bad(message: str) -> S3Error:
    return S3Error("IncompleteBody", message, 400)


@dataclass
class Decoded:
    """What the decoder saw besides the bytes: the trailer headers (lower-case)."""

    trailers: dict[str, str] = field(default_factory=dict)
    size: int = 0


async def decode(
    source: AsyncIterator[bytes],
    *,
    signed: Verified | None,
    decoded_length: int | None,
    out: Decoded | None = None,
    on_piece: Callable[[bytes], None] | None = None,
) -> AsyncIterator[bytes]:
    """The body's bytes. ``signed``: the request's verified signature, when chunks are
    signed; ``decoded_length``: ``x-amz-decoded-content-length`` if sent (checked)."""
    out = out if out is not None else Decoded()
    buffer = bytearray()
    previous = signed.signature if signed is not None else ""
    pieces = aiter(source)

    async def more() -> bool:
        try:
            buffer.extend(await anext(pieces))
        except StopAsyncIteration:
            return False
        return True

    async def line() -> bytes:
        while True:
            end = buffer.find(b"\r\n")
            if end >= 0:
                text = bytes(buffer[:end])
                del buffer[: end + 2]
                return text
            if len(buffer) > MAX_LINE:
                raise _bad("an aws-chunked header line is too long")
            if not await more():
                raise _bad("the body ended inside an aws-chunked header")

    while True:
        header = (await line()).decode("latin-1")
        size_text, _, extension = header.partition(";")
        try:
            size = int(size_text, 16)
        except ValueError:
            raise _bad(f"a malformed aws-chunked header: {header[:80]!r}") from None
        if not 0 <= size <= MAX_CHUNK:
            raise _bad(f"an aws-chunked chunk of {size} bytes")
        claimed = ""
        if signed is not None:
            name, _, claimed = extension.partition("=")
            if name.strip() != "chunk-signature" or not claimed:
                raise S3Error("SignatureDoesNotMatch", "a chunk has no signature")
        digest = hashlib.sha256() if signed is not None else None
        left = size
        while left:
            if not buffer and not await more():
                raise _bad("the body ended inside an aws-chunked chunk")
            piece = bytes(buffer[:left])
            del buffer[: len(piece)]
            left -= len(piece)
            if digest is not None:
                digest.update(piece)
            out.size += len(piece)
            if on_piece is not None:
                on_piece(piece)
            yield piece
        if signed is not None and digest is not None:
            expected = chunk_signature(
                signed.key, signed.amz_date, signed.scope, previous, digest.hexdigest()
            )
            if not hmac.compare_digest(expected, claimed.strip()):
                raise S3Error("SignatureDoesNotMatch", "a chunk's signature is wrong")
            previous = expected
        if size == 0:
            break
        if await line() != b"":
            raise _bad("an aws-chunked chunk is longer than announced")
    while True:  # trailers, up to an empty line (or the end of the body)
        if not buffer and not await more():
            break
        text = (await line()).decode("latin-1")
        if not text:
            break
        name, colon, value = text.partition(":")
        if not colon:
            raise _bad(f"a malformed trailer: {text[:80]!r}")
        out.trailers[name.strip().lower()] = value.strip()
    if decoded_length is not None and out.size != decoded_length:
        raise _bad(f"{out.size} bytes decoded; x-amz-decoded-content-length says {decoded_length}")
