"""What the S3 handlers share: the request's checked signature, the native name of an
object and the check that its bucket exists, the body as the client sent it (decoded
from aws-chunked, its digests and checksums checked as it streams), the content headers
a new version keeps, and a stored version's bytes read inside the cluster (a copy's
source)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import unquote

from aiohttp import web

from dstore.errors import BadName, DstoreError, NoSuchBucket
from dstore.gateway import content, handlers, keys
from dstore.gateway.download import SpanFeed
from dstore.gateway.names import validate_name
from dstore.gateway.upload import Expectations
from dstore.master.metadata import FileVersion
from dstore.s3 import checksums
from dstore.s3.chunked import Decoded, decode
from dstore.s3.sigv4 import STREAMING, UNSIGNED, S3Error, Verified


class KnownBuckets:
    """Buckets found to exist in the last ``ttl`` seconds. Nearly every request names a
    bucket that exists, and asking the metadata each time costs a round trip. A bucket
    deleted through another gateway may still be written here for ``ttl`` seconds (S3's
    own bucket operations are eventually consistent too); one deleted here is forgotten
    at once."""

    def __init__(self, ttl: float = 2.0, limit: int = 10_000) -> None:
        self.ttl = ttl
        self.limit = limit
        self._seen: dict[str, float] = {}

    def __repr__(self) -> str:
        return f"<KnownBuckets {len(self._seen)} within {self.ttl:g} s>"

    def known(self, name: str) -> bool:
        seen = self._seen.get(name)
        return seen is not None and time.monotonic() - seen < self.ttl

    def saw(self, name: str) -> None:
        if len(self._seen) >= self.limit:
            self._seen.clear()
        self._seen[name] = time.monotonic()

    def forget(self, name: str) -> None:
        self._seen.pop(name, None)


VERIFIED = web.RequestKey("s3_verified", Verified)  # the request's checked signature
BUCKETS = web.AppKey("s3_buckets", KnownBuckets)
UNSIGNED_TRAILER = "STREAMING-UNSIGNED-PAYLOAD-TRAILER"


def xml_reply(body: bytes, status: int = 200) -> web.Response:
    return web.Response(status=status, body=body, content_type="application/xml")


def object_name(bucket: str, key: str) -> str:
    """The native file name of object ``key`` in ``bucket``."""
    try:
        return validate_name(f"{bucket}/{key}")
    except BadName as exc:
        raise S3Error("InvalidArgument", f"an unusable key: {exc}", 400) from None


def copy_source(header: str) -> tuple[str, str]:
    """(bucket, native name) of an ``x-amz-copy-source``: ``[/]BUCKET/KEY``, %-encoded."""
    source = unquote(header.partition("?")[0]).lstrip("/")
    bucket, _, key = source.partition("/")
    if not bucket or not key:
        raise S3Error("InvalidArgument", "x-amz-copy-source must be BUCKET/KEY", 400)
    return bucket, object_name(bucket, key)


async def require_bucket(request: web.Request, bucket: str) -> None:
    known = request.app[BUCKETS]
    if known.known(bucket):
        return
    if not await request.app[keys.META].bucket_exists(bucket):
        raise NoSuchBucket(f"no bucket named {bucket!r}")
    known.saw(bucket)


@dataclass(slots=True)
class Body:
    """A request body as the uploader takes it: the bytes, what they must hash to, and
    their length if the client declared it."""

    stream: AsyncIterator[bytes]
    expect: Expectations
    length: int | None


def body_of(request: web.Request) -> Body:
    """The body the client means: decoded from aws-chunked (each chunk's signature
    checked), with a signed payload's SHA-256, ``Content-MD5`` and an
    ``x-amz-checksum-*`` checked as it streams (a mismatch fails the upload, which then
    stores nothing)."""
    verified = request[VERIFIED]
    md5 = request.headers.get("Content-MD5")
    sha = (
        verified.payload
        if verified.payload not in (UNSIGNED, STREAMING, UNSIGNED_TRAILER)
        else None
    )
    try:
        expect = Expectations.from_headers(md5, sha)
    except DstoreError:
        raise S3Error("InvalidDigest", "the Content-MD5 you specified was invalid", 400) from None
    announced = checksums.wanted(request.headers)
    stream: AsyncIterator[bytes] = handlers.request_body(request)
    length = request.content_length
    seen = Decoded()
    chunked = verified.payload in (STREAMING, UNSIGNED_TRAILER)
    if chunked or "aws-chunked" in request.headers.get("Content-Encoding", ""):
        decoded = request.headers.get("x-amz-decoded-content-length")
        length = int(decoded) if decoded and decoded.isdigit() else None
        signed = verified if verified.payload == STREAMING else None
        stream = decode(stream, signed=signed, decoded_length=length, out=seen)
    if announced is not None:
        stream = checksums.checked(stream, *announced, seen.trailers)
    return Body(stream, expect, length)


def content_headers(request: web.Request) -> str:
    """What a new version keeps of a request's headers: its type, the standard content
    headers and the user's ``x-amz-meta-*``."""
    kept = content.kept(request.headers.items())
    return content.pack(request.headers.get("Content-Type", "binary/octet-stream"), kept)


async def read_version(
    request: web.Request, version: FileVersion, start: int = 0, end: int | None = None
) -> AsyncIterator[bytes]:
    """Bytes ``start`` to ``end`` of a version, from its nodes through the download
    pipeline (its read-ahead and memory budget), one piece handed on at a time. The
    caller keeps the version pinned meanwhile."""
    end = version.size if end is None else end
    if version.inline is not None:
        yield (await handlers.inline_bytes(request.app, version))[start:end]
        return
    meta, version_id = request.app[keys.META], version.version_id
    feed = SpanFeed(
        version.chunks, start, end, lambda at: meta.chunk_page(version_id, at, handlers.PAGE)
    )
    pieces: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=1)

    async def write(piece: memoryview) -> None:
        await pieces.put(bytes(piece))  # (the pipeline's buffer is not ours to keep)

    async def produce() -> None:
        try:
            await request.app[keys.DOWNLOADER].stream(feed, write, trace=request[keys.TRACE])
        finally:
            await pieces.put(None)

    producer = asyncio.create_task(produce())
    try:
        while (piece := await pieces.get()) is not None:
            yield piece
        await producer  # (its failure is the body's: the copy is not committed)
    finally:
        producer.cancel()
        await asyncio.gather(producer, return_exceptions=True)
