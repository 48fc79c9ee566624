"""S3 multipart uploads: create, upload part (and upload part copy), list parts, list
uploads, complete and abort.

A part is stored as any upload is, in chunks on the nodes, as a pending version of the
object's name that is never committed: the upload's row in the metadata keeps it (its
lease runs to the upload's expiry). Completing the upload is one metadata transaction
that moves the listed parts' chunks, in order, to a new version of the name and makes
it current: no byte is read or copied. Parts not listed, and every part of an upload
aborted or left to expire (``--s3-multipart-expiry``), are reclaimed by the reaper like
any aborted upload's chunks.
"""

from __future__ import annotations

import hashlib
import itertools
import secrets

from aiohttp import web

from dstore.gateway import keys
from dstore.gateway.listing import BEYOND
from dstore.s3 import xml
from dstore.s3.request import (
    VERIFIED,
    body_of,
    content_headers,
    copy_source,
    object_name,
    read_version,
    require_bucket,
    xml_reply,
)
from dstore.s3.sigv4 import S3Error

MIN_PART = 5 << 20  # every part but the last, at least (S3's rule)
MAX_PART = 5 << 30
MAX_LISTED = 1000  # parts or uploads in one listing


def _part_number(request: web.Request) -> int:
    raw = request.query.get("partNumber", "")
    if not raw.isascii() or not raw.isdigit() or not 1 <= int(raw) <= xml.MAX_PARTS:
        raise S3Error("InvalidArgument", "partNumber must be an integer from 1 to 10000", 400)
    return int(raw)


def _limit(request: web.Request, name: str) -> int:
    raw = request.query.get(name, str(MAX_LISTED))
    if not raw.isascii() or not raw.isdigit():
        raise S3Error("InvalidArgument", f"{name} must be a number", 400)
    return min(MAX_LISTED, int(raw))


async def _upload_of(request: web.Request, bucket: str, key: str, upload_id: str) -> None:
    """``NoSuchUpload`` unless the upload is in progress for this bucket's key."""
    upload = await request.app[keys.META].multipart(upload_id)
    if upload.name != object_name(bucket, key):
        raise S3Error("NoSuchUpload", "the upload is of another key", 404)


async def create(request: web.Request, bucket: str, key: str) -> web.StreamResponse:
    await require_bucket(request, bucket)
    name = object_name(bucket, key)
    upload_id = secrets.token_urlsafe(24)
    expiry = request.app[keys.CONFIG].s3_multipart_expiry
    await request.app[keys.META].create_multipart(upload_id, name, content_headers(request), expiry)
    return xml_reply(xml.initiated(bucket, key, upload_id))


async def upload_part(request: web.Request, bucket: str, key: str) -> web.StreamResponse:
    """UploadPart, and UploadPartCopy when ``x-amz-copy-source`` names the bytes."""
    await require_bucket(request, bucket)
    name = object_name(bucket, key)
    number = _part_number(request)
    upload_id = request.query["uploadId"]
    meta = request.app[keys.META]
    await meta.multipart(upload_id)  # (refused before a byte is stored if it is gone)
    if request.content_length is not None and request.content_length > MAX_PART:
        raise S3Error("EntityTooLarge", f"a part is at most {MAX_PART} bytes", 400)

    async def seal(version_id: int, size: int, etag: str) -> None:
        await meta.seal_part(upload_id, number, version_id, size, etag)

    uploader = request.app[keys.UPLOADER]
    source = request.headers.get("x-amz-copy-source")
    if source is None:
        body = body_of(request)
        _, etag = await uploader.upload_part(
            name,
            body.stream,
            seal,
            expect=body.expect,
            trace=request[keys.TRACE],
            length=body.length,
        )
        return web.Response(status=200, headers={"ETag": etag})
    source_bucket, source_name = copy_source(source)
    await require_bucket(request, source_bucket)
    version = await meta.lookup(source_name)
    start, end = _copy_range(request.headers.get("x-amz-copy-source-range"), version.size)
    pins = request.app[keys.PINS]
    if version.inline is None and not await pins.take(version.version_id):
        raise S3Error("OperationAborted", "the source changed while it was read", 409)
    try:
        _, etag = await uploader.upload_part(
            name,
            read_version(request, version, start, end),
            seal,
            trace=request[keys.TRACE],
            length=end - start,
        )
    finally:
        if version.inline is None:
            pins.release(version.version_id)
    return xml_reply(xml.copy_part_result(etag, version.created))


def _copy_range(header: str | None, size: int) -> tuple[int, int]:
    """The ``bytes=first-last`` of ``x-amz-copy-source-range`` as [start, end)."""
    if header is None:
        return 0, size
    first, dash, last = header.removeprefix("bytes=").partition("-")
    if not (dash and first.isdigit() and last.isdigit()) or int(first) > int(last):
        raise S3Error("InvalidArgument", "x-amz-copy-source-range must be bytes=first-last", 400)
    if int(last) >= size:
        raise S3Error("InvalidRange", f"the source is {size} bytes", 416)
    return int(first), int(last) + 1


async def list_parts(request: web.Request, bucket: str, key: str) -> web.StreamResponse:
    await require_bucket(request, bucket)
    upload_id = request.query["uploadId"]
    raw = request.query.get("part-number-marker", "0")
    marker = int(raw) if raw.isascii() and raw.isdigit() else 0
    limit = _limit(request, "max-parts")
    meta = request.app[keys.META]
    await _upload_of(request, bucket, key, upload_id)
    found = await meta.parts(upload_id, marker, limit + 1)
    entries = [xml.PartEntry(p.number, p.etag, p.size, p.created) for p in found[:limit]]
    owner = request[VERIFIED].access_key
    truncated = len(found) > limit
    return xml_reply(
        xml.list_parts(bucket, key, upload_id, owner, marker, limit, entries, truncated)
    )


async def list_uploads(request: web.Request, bucket: str) -> web.StreamResponse:
    """ListMultipartUploads: by key, then upload id; a delimiter folds keys into common
    prefixes, as a listing of objects does."""
    await require_bucket(request, bucket)
    query = request.query
    prefix, delimiter = query.get("prefix", ""), query.get("delimiter", "")
    key_marker, id_marker = query.get("key-marker", ""), query.get("upload-id-marker", "")
    limit = _limit(request, "max-uploads")
    base = f"{bucket}/"
    after = (base + key_marker, id_marker if key_marker else "")
    if key_marker and not id_marker:
        after = (base + key_marker + BEYOND, "")  # (every upload of the marker's key)
    meta = request.app[keys.META]
    uploads: list[xml.UploadEntry] = []
    prefixes: list[str] = []
    truncated = False
    while not truncated:
        page = await meta.multipart_uploads(base + prefix, after, MAX_LISTED)
        for upload in page:
            key = upload.name[len(base) :]
            if len(uploads) + len(prefixes) == limit:
                truncated = True
                break
            cut = key.find(delimiter, len(prefix)) if delimiter else -1
            if cut >= 0:
                folded = key[: cut + len(delimiter)]
                if not prefixes or prefixes[-1] != folded:
                    prefixes.append(folded)
                after = (base + folded + BEYOND, "")
                break  # (the next page starts past the folded prefix)
            uploads.append(xml.UploadEntry(key, upload.upload_id, upload.created))
            after = (upload.name, upload.upload_id)
        else:
            if len(page) < MAX_LISTED:
                break
    listing = xml.UploadListing(
        bucket,
        prefix,
        delimiter,
        key_marker,
        id_marker,
        limit,
        uploads,
        prefixes,
        truncated,
        query.get("encoding-type") == "url",
    )
    return xml_reply(xml.list_uploads(listing, request[VERIFIED].access_key))


async def complete(request: web.Request, bucket: str, key: str) -> web.StreamResponse:
    await require_bucket(request, bucket)
    name = object_name(bucket, key)
    upload_id = request.query["uploadId"]
    document = await request.content.read(xml.MAX_REQUEST_XML + 1)
    try:
        listed = xml.parse_complete(document)
    except ValueError as exc:
        raise S3Error("MalformedXML", str(exc), 400) from None
    numbers = [number for number, _ in listed]
    if any(b <= a for a, b in itertools.pairwise(numbers)):
        raise S3Error("InvalidPartOrder", "parts must be listed in ascending order", 400)
    digests = b""
    for number, etag in listed:
        try:
            digests += bytes.fromhex(etag.strip('"'))
        except ValueError:
            raise S3Error("InvalidPart", f"part {number}'s ETag is not one we gave", 400) from None
    etag = f'"{hashlib.md5(digests).hexdigest()}-{len(listed)}"'
    result = await request.app[keys.META].complete_multipart(
        upload_id, name, listed, etag, MIN_PART
    )
    if result.replaced is not None:
        request.app[keys.UPLOADER].reaper.wake()
    location = f"{request.scheme}://{request.host}/{bucket}/{key}"
    return xml_reply(xml.completed(location, bucket, key, etag))


async def abort(request: web.Request, bucket: str, key: str) -> web.StreamResponse:
    await require_bucket(request, bucket)
    upload_id = request.query["uploadId"]
    await _upload_of(request, bucket, key, upload_id)
    await request.app[keys.META].abort_multipart(upload_id)
    request.app[keys.UPLOADER].reaper.wake()
    return web.Response(status=204)
