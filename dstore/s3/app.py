"""The S3 listener (``--s3-listen``): a second aiohttp application in the gateway's process
over the same metadata, pipelines and memory budget. Path-style addressing: ``/`` lists
buckets, ``/B`` is bucket B, ``/B/K`` its object K, which is the file named ``B/K``.

Every request is signed (``sigv4.verify``); errors are S3's XML with S3's codes. Served:
ListBuckets; Create/Head/Delete bucket and GetBucketLocation; Put/Get/Head/Delete object
(ranges and conditional headers as the native API, ``response-*`` overrides, the content
headers and ``x-amz-meta-*`` kept, a signed payload's SHA-256, ``Content-MD5`` and
``x-amz-checksum-*`` checked as the body streams, aws-chunked bodies, signed or with an
unsigned trailer); CopyObject; ListObjects v1 and v2 with prefix, delimiter, markers,
continuation, ``max-keys`` and ``encoding-type=url``; DeleteObjects; and multipart
uploads (``dstore.s3.multipart``).
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import re
import time
from urllib.parse import unquote

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from dstore.auth import S3Key, Scope
from dstore.errors import (
    BadName,
    BodyTimeout,
    BucketNotEmpty,
    ChecksumMismatch,
    ClientGone,
    Conflict,
    DstoreError,
    EntityTooSmall,
    FileNotFound,
    InvalidPart,
    MetadataTooLarge,
    MetadataUnavailable,
    NoSuchBucket,
    NoSuchUpload,
    NotEnoughNodes,
    OutOfSpace,
    Overloaded,
    PreconditionFailed,
    RangeNotSatisfiable,
    TooLarge,
)
from dstore.gateway import content, handlers, keys
from dstore.gateway.listing import BEYOND, walk
from dstore.s3 import multipart, xml
from dstore.s3.request import (
    BUCKETS,
    VERIFIED,
    KnownBuckets,
    body_of,
    content_headers,
    copy_source,
    object_name,
    read_version,
    require_bucket,
    xml_reply,
)
from dstore.s3.sigv4 import S3Error, verify

log = structlog.get_logger("dstore.s3")

GATEWAY = web.AppKey("s3_gateway", web.Application)
KEYS = web.AppKey("s3_keys", dict[str, S3Key])
MAX_KEYS = 1000
# GetObject's query parameters that set a response header (``response-cache-control``…)
_OVERRIDES = frozenset(f"response-{h}" for h in ("content-type", *content.KEPT))
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")

# our errors in S3's words: (code, status)
S3_ERRORS: dict[type[DstoreError], tuple[str, int]] = {
    FileNotFound: ("NoSuchKey", 404),
    NoSuchBucket: ("NoSuchBucket", 404),
    BucketNotEmpty: ("BucketNotEmpty", 409),
    NoSuchUpload: ("NoSuchUpload", 404),
    InvalidPart: ("InvalidPart", 400),
    EntityTooSmall: ("EntityTooSmall", 400),
    MetadataTooLarge: ("MetadataTooLarge", 400),
    PreconditionFailed: ("PreconditionFailed", 412),
    RangeNotSatisfiable: ("InvalidRange", 416),
    ChecksumMismatch: ("BadDigest", 400),
    TooLarge: ("EntityTooLarge", 400),
    BadName: ("InvalidArgument", 400),
    BodyTimeout: ("RequestTimeout", 400),
    ClientGone: ("IncompleteBody", 400),
    Conflict: ("OperationAborted", 409),
    OutOfSpace: ("ServiceUnavailable", 503),
    NotEnoughNodes: ("ServiceUnavailable", 503),
    MetadataUnavailable: ("ServiceUnavailable", 503),
    Overloaded: ("SlowDown", 503),
}


def create_s3_app(gateway: web.Application) -> web.Application:
    """The S3 application over a running gateway's services."""
    config = gateway[keys.CONFIG]
    app = web.Application(middlewares=[errors, authenticate])
    app[GATEWAY] = gateway
    app[KEYS] = {k.access_key: k for k in config.s3_keys or []}
    app[BUCKETS] = KnownBuckets()
    app[keys.CONFIG] = config
    app[keys.HTTP] = gateway[keys.HTTP]
    app[keys.META] = gateway[keys.META]
    app[keys.UPLOADER] = gateway[keys.UPLOADER]
    app[keys.DOWNLOADER] = gateway[keys.DOWNLOADER]
    app[keys.PINS] = gateway[keys.PINS]
    app.on_response_prepare.append(_request_id)
    app.router.add_route("*", "/{path:.*}", dispatch)
    return app


async def _request_id(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["x-amz-request-id"] = request.get(keys.TRACE, "")


# --- middlewares -------------------------------------------------------------------------


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id, S3's XML errors, one log line per request."""
    trace = handlers.new_trace()
    request[keys.TRACE] = trace
    started = time.monotonic()
    try:
        response = await handler(request)
    except S3Error as exc:
        response = _error(request, exc.code, exc.message, exc.status)
    except DstoreError as exc:
        code, status = next(
            (S3_ERRORS[cls] for cls in type(exc).__mro__ if cls in S3_ERRORS),
            ("InternalError", 500),
        )
        if status >= 500:
            log.warning("s3_request_failed", code=exc.code, error=str(exc), trace=trace)
        response = _error(request, code, str(exc), status)
    status = response.status
    bytes_in = request.get(keys.REQUEST_BYTES_IN, 0)
    bytes_out = handlers.body_bytes(request, response)
    seconds = time.monotonic() - started
    request.app[GATEWAY][keys.S3_HTTP].observe(request.method, status, bytes_in, bytes_out, seconds)
    log.info(
        "s3_request",
        method=request.method,
        path=request.path[:200],
        status=status,
        trace=trace,
        bytes_in=bytes_in,
        bytes_out=bytes_out,
        ms=round(seconds * 1000, 2),
    )
    return response


def _error(request: web.Request, code: str, message: str, status: int) -> web.Response:
    body = (
        b""
        if request.method == "HEAD"
        else xml.error(code, message, request.path, request[keys.TRACE])
    )
    return web.Response(status=status, body=body, content_type="application/xml")


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    app = request.app
    found = app[KEYS]
    headers: dict[str, list[str]] = {}
    for name, value in request.headers.items():
        headers.setdefault(name.lower(), []).append(value)
    query = [(k, v) for k, v in request.query.items()]
    verified = verify(
        request.method,
        request.raw_path.partition("?")[0],
        query,
        headers,
        lambda access: k.secret_key if (k := found.get(access)) is not None else None,
        now=time.time(),
        region=app[keys.CONFIG].s3_region,
    )
    request[VERIFIED] = verified
    scope = Scope.READ if request.method in ("GET", "HEAD") else Scope.WRITE
    if scope not in found[verified.access_key].scopes:
        raise S3Error("AccessDenied", f"the key may not {scope.value}", 403)
    return await handler(request)


# --- dispatch ----------------------------------------------------------------------------


def _addressed(request: web.Request) -> tuple[str, str]:
    """(bucket, key) a request names: ``/B/K`` (path style), or ``/K`` on host
    ``B.DOMAIN`` when ``--s3-domain`` is DOMAIN (virtual-hosted style)."""
    path = request.raw_path.partition("?")[0]
    domain = request.app[keys.CONFIG].s3_domain
    if domain:
        host = (request.host or "").lower().rpartition(":")[0] or (request.host or "").lower()
        if request.host and "]" in request.host:  # (an IPv6 literal: never a bucket)
            host = ""
        suffix = "." + domain.lower().strip(".")
        if host.endswith(suffix) and len(host) > len(suffix):
            return host[: -len(suffix)], unquote(path.lstrip("/"))
    bucket, _, key = path.lstrip("/").partition("/")
    return unquote(bucket), unquote(key)


async def dispatch(request: web.Request) -> web.StreamResponse:
    bucket, key = _addressed(request)
    method, query = request.method, request.query
    if not bucket:
        if method == "GET":
            return await list_buckets(request)
        raise S3Error("MethodNotAllowed", f"{method} / is not allowed", 405)
    if not key:
        if method == "PUT":
            return await create_bucket(request, bucket)
        if method == "HEAD":
            await require_bucket(request, bucket)
            return web.Response(status=200)
        if method == "DELETE":
            try:
                await request.app[keys.META].delete_bucket(bucket)
            finally:  # (a request that looked meanwhile saw it still there)
                request.app[BUCKETS].forget(bucket)
            return web.Response(status=204)
        if method == "POST" and "delete" in query:
            return await delete_objects(request, bucket)
        if method == "GET":
            if "uploads" in query:
                return await multipart.list_uploads(request, bucket)
            if "location" in query:
                await require_bucket(request, bucket)
                return xml_reply(xml.location(request.app[keys.CONFIG].s3_region))
            return await list_objects(request, bucket)
        raise S3Error("MethodNotAllowed", f"{method} of a bucket is not allowed", 405)
    if "uploadId" in query:
        if method == "PUT":
            return await multipart.upload_part(request, bucket, key)
        if method == "POST":
            return await multipart.complete(request, bucket, key)
        if method == "GET":
            return await multipart.list_parts(request, bucket, key)
        if method == "DELETE":
            return await multipart.abort(request, bucket, key)
    if method == "POST" and "uploads" in query:
        return await multipart.create(request, bucket, key)
    if method == "PUT":
        if "x-amz-copy-source" in request.headers:
            return await copy_object(request, bucket, key)
        return await put_object(request, bucket, key)
    if method in ("GET", "HEAD"):
        return await get_object(request, bucket, key)
    if method == "DELETE":
        await require_bucket(request, bucket)
        try:
            await request.app[keys.META].delete(object_name(bucket, key))
        except FileNotFound:
            pass  # S3 answers 204 whether the key was there or not
        return web.Response(status=204)
    raise S3Error("MethodNotAllowed", f"{method} of an object is not allowed", 405)


# --- buckets -----------------------------------------------------------------------------


def valid_bucket(name: str) -> bool:
    """S3's rules: 3-63 of lower-case letters, digits, dots and hyphens, beginning and
    ending with a letter or digit, no two dots together, not an IP address."""
    if not _BUCKET.match(name) or ".." in name or name.startswith("xn--"):
        return False
    try:
        ipaddress.IPv4Address(name)
    except ValueError:
        return True
    return False


async def list_buckets(request: web.Request) -> web.StreamResponse:
    buckets = await request.app[keys.META].buckets()
    return xml_reply(xml.list_buckets(buckets, request[VERIFIED].access_key))


async def create_bucket(request: web.Request, bucket: str) -> web.StreamResponse:
    if not valid_bucket(bucket):
        raise S3Error("InvalidBucketName", f"{bucket!r} is not a valid bucket name", 400)
    await request.read()  # (a CreateBucketConfiguration: the one region there is)
    # made now, or made before: 200 either way, as us-east-1 answers its owner
    await request.app[keys.META].create_bucket(bucket)
    return web.Response(status=200, headers={"Location": f"/{bucket}"})


# --- objects -----------------------------------------------------------------------------


async def put_object(request: web.Request, bucket: str, key: str) -> web.StreamResponse:
    await require_bucket(request, bucket)
    name = object_name(bucket, key)
    body = body_of(request)
    result = await request.app[keys.UPLOADER].upload(
        name,
        body.stream,
        content_type=content_headers(request),
        expect=body.expect,
        trace=request[keys.TRACE],
        length=body.length,
        md5_etag=True,  # (what S3 clients check an upload against)
    )
    return web.Response(status=200, headers={"ETag": result.version.etag})


async def copy_object(request: web.Request, bucket: str, key: str) -> web.StreamResponse:
    """CopyObject: the source's bytes read from its nodes and written as a new version
    by this gateway, never through the client; the content type kept unless
    ``x-amz-metadata-directive: REPLACE``."""
    await require_bucket(request, bucket)
    source_bucket, source = copy_source(request.headers["x-amz-copy-source"])
    await require_bucket(request, source_bucket)
    app = request.app
    meta, pins = app[keys.META], app[keys.PINS]
    version = await meta.lookup(source)
    directive = request.headers.get("x-amz-metadata-directive", "COPY").upper()
    if directive not in ("COPY", "REPLACE"):
        raise S3Error("InvalidArgument", "x-amz-metadata-directive is COPY or REPLACE", 400)
    content_type = version.content_type  # (the stored content headers, all of them)
    if directive == "REPLACE":
        content_type = content_headers(request)
    if version.inline is None and not await pins.take(version.version_id):
        raise S3Error("OperationAborted", "the source changed while it was read", 409)
    try:
        result = await app[keys.UPLOADER].upload(
            object_name(bucket, key),
            read_version(request, version),
            content_type=content_type,
            trace=request[keys.TRACE],
            length=version.size,
            md5_etag=True,
        )
    finally:
        if version.inline is None:
            pins.release(version.version_id)
    made = result.version
    return xml_reply(xml.copy_result(made.etag, made.created))


async def get_object(request: web.Request, bucket: str, key: str) -> web.StreamResponse:
    await require_bucket(request, bucket)
    overrides = {
        name[len("response-") :]: value
        for name, value in request.query.items()
        if name in _OVERRIDES
    }
    response = await handlers.serve_file(request, object_name(bucket, key), overrides)
    if response.status == 416:  # (the native answer is JSON)
        raise S3Error("InvalidRange", "the requested range is not satisfiable", 416)
    return response


async def delete_objects(request: web.Request, bucket: str) -> web.StreamResponse:
    await require_bucket(request, bucket)
    document = await request.content.read(xml.MAX_REQUEST_XML + 1)
    try:
        names, quiet = xml.parse_delete(document)
    except ValueError as exc:
        raise S3Error("MalformedXML", str(exc), 400) from None
    md5 = request.headers.get("Content-MD5")
    if md5 is not None:
        if base64.b64encode(hashlib.md5(document).digest()).decode() != md5.strip():
            raise S3Error("BadDigest", "the Content-MD5 does not match the body", 400)
    meta = request.app[keys.META]
    deleted: list[str] = []
    failed: list[tuple[str, str, str]] = []
    for key in names:
        try:
            await meta.delete(object_name(bucket, key))
        except FileNotFound:
            pass
        except S3Error as exc:
            failed.append((key, exc.code, exc.message))
            continue
        except DstoreError as exc:
            failed.append((key, "InternalError", str(exc)))
            continue
        deleted.append(key)
    return xml_reply(xml.delete_result([] if quiet else deleted, failed))


async def list_objects(request: web.Request, bucket: str) -> web.StreamResponse:
    await require_bucket(request, bucket)
    query = request.query
    v2 = query.get("list-type") == "2"
    prefix, delimiter = query.get("prefix", ""), query.get("delimiter", "")
    try:
        max_keys = min(MAX_KEYS, max(0, int(query.get("max-keys", MAX_KEYS))))
    except ValueError:
        raise S3Error("InvalidArgument", "max-keys must be a number", 400) from None
    url = query.get("encoding-type") == "url"
    token = query.get("continuation-token") if v2 else None
    rolled = False  # resuming after a common prefix: skip every key under it
    if token is not None:
        try:
            kind, after = base64.urlsafe_b64decode(token.encode()).decode().split(":", 1)
        except ValueError:
            raise S3Error("InvalidArgument", "the continuation token is not valid", 400) from None
        rolled = kind == "p"
    else:
        after = query.get("start-after", "") if v2 else query.get("marker", "")
        rolled = not v2 and bool(delimiter) and after.endswith(delimiter)
    base = f"{bucket}/"
    start = base + after + (BEYOND if rolled else "") if after else ""
    found = await walk(request.app[keys.META], base + prefix, delimiter, start, max_keys)
    entries = [xml.Entry(f.name[len(base) :], f.size, f.etag, f.created) for f in found.files]
    prefixes = [p[len(base) :] for p in found.prefixes]
    truncated, last = found.truncated, found.last[len(base) :]
    listing = xml.Listing(bucket, prefix, delimiter, max_keys, entries, prefixes, truncated, url)
    if v2:
        next_token = None
        if truncated and last:
            kind = "p" if found.last_is_prefix else "k"
            next_token = base64.urlsafe_b64encode(f"{kind}:{last}".encode()).decode()
        return xml_reply(xml.list_objects_v2(listing, token, next_token, query.get("start-after")))
    next_marker = last if truncated and delimiter else None
    return xml_reply(xml.list_objects_v1(listing, query.get("marker", ""), next_marker))
