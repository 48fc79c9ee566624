"""HTTP handlers of the gateway (SPEC §2), and the one place errors become responses."""

from __future__ import annotations

import asyncio
import functools
import itertools
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from email.utils import formatdate
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import structlog
from aiohttp import web
from multidict import CIMultiDict

from dstore.auth import Scope
from dstore.chunk import checksum
from dstore.config import parse_hostport
from dstore.errors import (
    BadName,
    BodyTimeout,
    ChecksumMismatch,
    ChunkCorrupt,
    ClientGone,
    Conflict,
    DstoreError,
    FileNotFound,
    Forbidden,
    InlineReclaimed,
    MetadataTooLarge,
    MetadataUnavailable,
    NodeUnavailable,
    NotEnoughNodes,
    OutOfSpace,
    Overloaded,
    PeerGone,
    PreconditionFailed,
    RangeNotSatisfiable,
    TooLarge,
    Unauthorized,
)
from dstore.gateway import content, keys
from dstore.gateway.cache import inline_key
from dstore.gateway.conditions import NONE as NO_CONDITIONS
from dstore.gateway.conditions import Outcome, Preconditions, Validators, strong_tags
from dstore.gateway.download import SpanFeed
from dstore.gateway.listing import walk
from dstore.gateway.names import name_from_raw_path
from dstore.gateway.ranges import parse_range
from dstore.gateway.upload import Expectations
from dstore.log import log_context
from dstore.master.cluster import NodeState
from dstore.master.fsck import Fsck, report_json, totals_json
from dstore.master.leader import REPAIR_STATE, SEEN
from dstore.master.metadata import FileVersion, MemberState
from dstore.master.replicas import Splicer, splicer_for, unsent

log = structlog.get_logger("dstore.http")

CLIENT_GONE = 499  # nginx's status for a client that closed before the reply: logs and metrics
STATUS: dict[type[DstoreError], int] = {
    BadName: 400,
    Unauthorized: 401,
    Forbidden: 403,
    ChecksumMismatch: 400,
    MetadataTooLarge: 400,
    FileNotFound: 404,
    PreconditionFailed: 412,
    TooLarge: 413,
    BodyTimeout: 408,
    ClientGone: CLIENT_GONE,  # not an error of ours; nobody reads the reply
    RangeNotSatisfiable: 416,
    NotEnoughNodes: 503,
    NodeUnavailable: 503,
    Overloaded: 503,
    MetadataUnavailable: 503,
    OutOfSpace: 507,
}
STATUS_BY_CODE = {"bad_header": 400, "bad_request": 400, "conflict": 409}
SMALL_RESPONSE = 256 << 10  # bodies up to this size are sent in one piece with the headers
PIN_ATTEMPTS = 3  # lookups of a name whose versions die faster than a GET can pin one
# a GET's lookup brings this many chunks of the list (16 × 4 MiB: 64 MiB), the download
# fetches the rest PAGE at a time while it streams
FIRST_PAGE = 16
PAGE = 128

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


_ID_PREFIX = secrets.token_hex(4)
_ids = itertools.count(1)


def new_trace() -> str:
    """Unique per process run (random prefix) and cheap (no system call per request)."""
    return f"{_ID_PREFIX}-{next(_ids):x}"


@functools.lru_cache(maxsize=4096)
def _http_date(timestamp: float) -> str:
    return formatdate(timestamp, usegmt=True)


def json_response(
    data: Any, *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """A JSON reply (orjson: several times cheaper than the standard encoder, which was a
    few per cent of a small PUT's CPU)."""
    return web.Response(
        body=orjson.dumps(data), status=status, headers=headers, content_type="application/json"
    )


def error_response(status: int, code: str, message: str) -> web.Response:
    return json_response({"error": {"code": code, "message": message}}, status=status)


def status_of(exc: DstoreError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return STATUS_BY_CODE.get(exc.code, 500)


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id, errors to JSON, and one canonical log line per request."""
    trace = request.headers.get("X-Request-Id", "")[:64] or new_trace()
    request[keys.TRACE] = trace
    started = time.monotonic()
    status = 500
    response: web.StreamResponse | None = None
    with log_context(trace=trace):
        try:
            response = await handler(request)
            status = CLIENT_GONE if request.get(keys.CLIENT_LEFT) else response.status
        except DstoreError as exc:
            status = status_of(exc)
            if status >= 500:
                log.warning("request_failed", code=exc.code, error=str(exc))
            response = error_response(status, exc.code, str(exc))
            if isinstance(exc, Unauthorized):
                response.headers["WWW-Authenticate"] = 'Bearer realm="dstore"'
        except web.HTTPException as exc:
            status = exc.status
            code = exc.reason.lower().replace(" ", "_")
            response = error_response(status, code, exc.text or exc.reason)
        except ConnectionError:
            status = CLIENT_GONE  # the client's socket failed under a write
            raise
        finally:
            bytes_in = request.get(keys.REQUEST_BYTES_IN, 0)
            bytes_out = body_bytes(request, response)
            seconds = time.monotonic() - started
            request.app[keys.HTTP].observe(request.method, status, bytes_in, bytes_out, seconds)
            log.info(
                "http_request",
                method=request.method,
                path=request.path if not request.path.startswith("/v1/files/") else None,
                name=request.get(keys.REQUEST_NAME),
                status=status,
                token=token.name if (token := request.get(keys.REQUEST_TOKEN)) else None,
                bytes_in=bytes_in,
                bytes_out=bytes_out,
                ms=round((time.monotonic() - started) * 1000, 2),
            )
        return response


def body_bytes(request: web.Request, response: web.StreamResponse | None) -> int:
    """Response body bytes, never the status line and headers: as counted by the file
    handlers, else the whole body of a reply sent in one piece (JSON; not yet sent when
    the handler returns)."""
    counted = request.get(keys.REQUEST_BYTES_OUT)
    if counted is not None:
        return int(counted)
    if response is None or response.prepared or not isinstance(response, web.Response):
        return 0  # HEAD, an empty body, or a stream that sent nothing
    return response.content_length or 0


_OPEN = frozenset({"/healthz", "/readyz", "/ui", "/ui/", "/ui/{name}"})
_ADMIN = frozenset(
    {"/v1/cluster/nodes", "/v1/cluster/nodes/{node_id}", "/v1/cluster/rebalance", "/v1/fsck"}
)
_JOIN = "/v1/cluster/nodes"


def needed_scope(request: web.Request) -> Scope | None:
    """The scope a request needs, by its route; None for probes and unknown paths."""
    resource = request.match_info.route.resource
    if resource is None or resource.canonical in _OPEN:
        return None
    if resource.canonical in _ADMIN:
        return Scope.ADMIN
    return Scope.READ if request.method in ("GET", "HEAD") else Scope.WRITE


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bearer tokens with scopes, when tokens are configured (SPEC §2)."""
    tokens = request.app[keys.TOKENS]
    needed = needed_scope(request) if tokens.enabled else None
    if needed is not None:
        headers = request.headers.getall("Authorization", [])
        if len(headers) > 1:
            raise DstoreError("one Authorization header, not several", code="bad_header")
        header = headers[0] if headers else None
        resource = request.match_info.route.resource
        joining = header is None and request.method == "POST"
        if not (joining and resource is not None and resource.canonical == _JOIN):
            # (a node joining proves the cluster secret instead: add_node checks it)
            token = tokens.check(header, needed)
            if token is not None:
                request[keys.REQUEST_TOKEN] = token
    return await handler(request)


async def add_response_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Every response, streamed ones included, names its request id."""
    trace = request.get(keys.TRACE)
    if trace:
        response.headers["X-Request-Id"] = trace
    # a stored text/html is served as the type it was given, never sniffed into another
    response.headers["X-Content-Type-Options"] = "nosniff"


def _file_headers(version: FileVersion, overrides: Mapping[str, str] | None) -> CIMultiDict[str]:
    stored = version.content_type
    if overrides:
        stored = content.overridden(stored, overrides)
    content_type, kept = content.unpack(stored)
    headers = CIMultiDict(
        {
            "ETag": version.etag,
            "Last-Modified": _http_date(version.created),
            "Content-Type": content_type or "application/octet-stream",
            "Accept-Ranges": "bytes",
        }
    )
    headers.extend(kept)
    return headers


async def request_body(request: web.Request) -> AsyncIterator[bytes]:
    """The request body as it arrives; a client that goes away becomes ``ClientGone``,
    one that sends nothing for ``body_timeout`` while we wait for it ``BodyTimeout``
    (time the upload spends elsewhere, waiting for memory or nodes, does not count)."""
    content = request.content
    total = 0
    watch = _BodyWatch(request.app[keys.CONFIG].body_timeout)
    try:
        while True:
            try:
                piece = await watch.wait(content.readany())
            except (
                aiohttp.ClientError,
                aiohttp.http_exceptions.HttpProcessingError,
                ConnectionError,
                asyncio.IncompleteReadError,
            ) as exc:
                raise ClientGone(f"client went away after {total} bytes: {exc}") from exc
            if not piece:
                break
            total += len(piece)
            request[keys.REQUEST_BYTES_IN] = total
            yield piece
    finally:
        watch.close()
    if request.content_length is not None and total != request.content_length:
        raise ClientGone(f"body ended after {total} of {request.content_length} bytes")


class _BodyWatch:
    """One timer per upload, not one per read (an ``asyncio.timeout`` costs ~5 us, and a
    large body is a thousand reads): it looks at the read in progress, if any, every
    ``limit`` seconds, and cancels one that has waited that long."""

    __slots__ = ("_handle", "_limit", "_loop", "_since", "_task", "_timed_out")

    def __init__(self, limit: float) -> None:
        self._limit = limit
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._since: float | None = None  # when the read in progress began
        self._timed_out = False
        self._handle = self._loop.call_later(limit, self._check)

    def _check(self) -> None:
        since = self._since
        now = self._loop.time()
        if since is not None and now - since >= self._limit and self._task is not None:
            self._timed_out = True
            self._task.cancel()
            return
        start = now if since is None else since
        self._handle = self._loop.call_at(start + self._limit, self._check)

    async def wait(self, read: Awaitable[bytes]) -> bytes:
        self._since = self._loop.time()
        try:
            return await read
        except asyncio.CancelledError:
            if self._timed_out and self._task is not None and self._task.uncancel() == 0:
                raise BodyTimeout(f"no byte of the body for {self._limit:g} s") from None
            raise
        finally:
            self._since = None

    def close(self) -> None:
        self._handle.cancel()


BULK_READ = 1 << 20


def _read_in_bulk(request: web.Request) -> None:
    """asyncio's socket transport receives 256 KiB per call; a large body is read 1 MiB
    at a time instead: a quarter of the receive calls and HTTP parser callbacks
    (measured: about 15 % less gateway CPU per GiB uploaded)."""
    transport = request.transport
    if transport is not None and getattr(transport, "max_size", BULK_READ) < BULK_READ:
        transport.max_size = BULK_READ  # type: ignore[attr-defined]


async def put_file(request: web.Request) -> web.StreamResponse:
    name = name_from_raw_path(request.raw_path)
    request[keys.REQUEST_NAME] = name
    app = request.app
    config = app[keys.CONFIG]
    conditions = Preconditions.from_headers(request.headers)
    if_absent = (conditions.if_none_match or "").strip() == "*"
    if_match = None if conditions.if_match is None else strong_tags(conditions.if_match)
    limit = config.max_object_size
    if limit is not None and request.content_length is not None and request.content_length > limit:
        raise TooLarge(f"{request.content_length} bytes exceed the limit of {limit}")
    expect = Expectations.from_headers(
        request.headers.get("Content-MD5"), request.headers.get("X-Checksum-Sha256")
    )
    if request.content_length is None or request.content_length > BULK_READ:
        _read_in_bulk(request)
    if conditions.any:  # fail fast before reading the body; the commit re-checks what it can
        await _check_preconditions(request, name, conditions)
    result = await app[keys.UPLOADER].upload(
        name,
        request_body(request),
        content_type=request.headers.get("Content-Type", "application/octet-stream"),
        if_absent=if_absent,
        if_match=if_match,
        expect=expect,
        trace=request[keys.TRACE],
        length=request.content_length,
    )
    version = result.version
    return json_response(
        {
            "name": version.name,
            "size": version.size,
            "etag": version.etag,
            "chunks": result.chunks,
            "created": version.created,
        },
        status=201,
        headers={"ETag": version.etag},
    )


async def get_file(request: web.Request) -> web.StreamResponse:
    name = name_from_raw_path(request.raw_path)
    request[keys.REQUEST_NAME] = name
    return await serve_file(request, name)


async def serve_file(
    request: web.Request, name: str, overrides: Mapping[str, str] | None = None
) -> web.StreamResponse:
    """GET or HEAD of a file by its name: ranges, conditions, read pins (the S3 API's
    GetObject too). ``overrides``: content headers to send instead of the stored ones
    (lower-case names; S3's ``response-*``)."""
    app = request.app
    # the chunk list a page at a time, from where the range starts (if it says)
    start = 0  # (with If-Range the whole file may be sent: its list from the start)
    if request.method != "HEAD" and "If-Range" not in request.headers:
        start = _range_start(request.headers.get("Range"))
    limit = 0 if request.method == "HEAD" else FIRST_PAGE
    meta, pins = app[keys.META], app[keys.PINS]
    version = await meta.lookup(name, start, limit)
    if version.inline is not None:  # no chunks for the reaper to keep: nothing to pin
        try:
            return await _serve(request, version, overrides)
        except InlineReclaimed:
            # replaced and reclaimed between its lookup and the read of its bytes: the
            # name has moved on, so serve what it is now
            version = await meta.lookup(name, start, limit)
    for _ in range(PIN_ATTEMPTS):
        if version.inline is not None or request.method == "HEAD":  # (reads no chunk)
            return await _serve(request, version, overrides)
        # pinned before a byte is read, so the reaper (on any gateway) keeps its chunks
        if await pins.take(version.version_id):
            try:
                return await _serve(request, version, overrides)
            finally:
                pins.release(version.version_id)
        # dead for so long that the reaper may be deleting it: what is the name now?
        version = await meta.lookup(name, start, limit)
    raise Conflict(f"{name!r} changes faster than it can be read")


async def inline_bytes(app: web.Application, version: FileVersion) -> bytes:
    """An inline file's bytes, verified: from its lookup, the read cache (which holds
    verified bytes only) or the metadata store."""
    assert version.inline is not None
    cache, key = app[keys.DOWNLOADER].cache, inline_key(version.version_id)
    data = version.inline.data
    if data is None:  # the version came from the lookup cache
        data = cache.get(key)
        if data is not None:
            return data
        data = await app[keys.META].inline_data(version.version_id)
        if data is None:
            raise InlineReclaimed(f"version {version.version_id} of {version.name!r} is gone")
    if checksum(data) != version.inline.checksum:
        raise ChunkCorrupt(f"the stored bytes of {version.name!r} fail their checksum")
    cache.put(key, data)
    return data


def _range_start(header: str | None) -> int:
    """The first byte a ``bytes=a-...`` range asks for; 0 for anything else (the range
    is checked against the file later: this only says where to start the chunk list)."""
    if header is None or not header.startswith("bytes="):
        return 0
    first, _, _ = header[6:].partition("-")
    first = first.strip()
    # (ASCII digits only: "²".isdigit() holds, and int() refuses it)
    return int(first) if first.isascii() and first.isdigit() and len(first) < 20 else 0


async def _serve(
    request: web.Request, version: FileVersion, overrides: Mapping[str, str] | None
) -> web.StreamResponse:
    headers = _file_headers(version, overrides)
    conditions = Preconditions.from_headers(request.headers)
    range_header = request.headers.get("Range")
    if conditions is not NO_CONDITIONS:
        current = Validators(version.etag, version.created)
        outcome = conditions.evaluate(request.method, current)
        if outcome is Outcome.NOT_MODIFIED:
            kept = {k: headers[k] for k in ("ETag", "Last-Modified")}
            return web.Response(status=304, headers=kept)
        if outcome is Outcome.PRECONDITION_FAILED:
            raise PreconditionFailed(f"a precondition of this {request.method} failed")
        if not conditions.range_applies(current):
            range_header = None  # another version than the client holds: the whole file
    status, start, end = 200, 0, version.size
    try:
        wanted = parse_range(range_header, version.size)
    except RangeNotSatisfiable:
        refusal = error_response(
            416,
            "range_not_satisfiable",
            f"no byte of the range is in a file of {version.size} bytes",
        )
        refusal.headers["Content-Range"] = f"bytes */{version.size}"
        return refusal
    if wanted is not None:
        status, (start, end) = 206, wanted
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{version.size}"
    if request.method == "HEAD" or start == end:
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = end - start
        await response.prepare(request)
        await response.write_eof()
        return response
    if version.inline is not None:  # a small file kept in the metadata store
        data = await inline_bytes(request.app, version)
        part = data if end - start == len(data) else data[start:end]
        request[keys.REQUEST_BYTES_OUT] = len(part)
        return web.Response(status=status, headers=headers, body=part)
    downloader = request.app[keys.DOWNLOADER]
    trace = request[keys.TRACE]
    meta, version_id = request.app[keys.META], version.version_id
    feed = SpanFeed(version.chunks, start, end, lambda at: meta.chunk_page(version_id, at, PAGE))
    if feed.complete and len(feed) == 1 and end - start <= SMALL_RESPONSE:
        # small: fetched and verified first, then headers and body leave in one write
        pieces = await downloader.read_small(feed.peek(), trace)
        body = pieces[0] if len(pieces) == 1 else b"".join(pieces)  # a cache hit: no copy
        request[keys.REQUEST_BYTES_OUT] = len(body)
        return web.Response(status=status, headers=headers, body=body)
    response = web.StreamResponse(status=status, headers=headers)
    response.content_length = end - start

    send_timeout = request.app[keys.CONFIG].send_timeout
    splicer = _splicer(request, send_timeout) if downloader.splice else None

    async def send_status() -> None:
        # only once the first chunk is in hand and verified: a file that cannot be
        # read at all is a clean 503, not a broken 200
        await response.prepare(request)
        if splicer is not None:
            await response.write(b"")  # the status line and headers go out now

    written = 0

    async def write(piece: memoryview) -> None:
        nonlocal written
        try:
            async with asyncio.timeout(send_timeout):
                await response.write(piece)
        except TimeoutError:
            raise ClientGone(f"the client took no bytes for {send_timeout:g} s") from None
        written += len(piece)

    def sent() -> int:  # written through aiohttp, and relayed past it
        return written + (splicer.sent if splicer is not None else 0)

    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None

    def taken() -> int:  # what the client has acknowledged: the read-ahead grows with it
        held = transport.get_write_buffer_size() if transport is not None else 0
        return max(0, sent() - held - unsent(sock))

    try:
        await downloader.stream(
            feed,
            write,
            trace=trace,
            before_first_write=send_status,
            splicer=splicer,
            taken=taken,
        )
    except (DstoreError, PeerGone) as exc:
        gone = isinstance(exc, (ClientGone, PeerGone))
        if not response.prepared and not gone:
            raise
        # too late for a status: cut the connection so the client sees a short body
        request[keys.CLIENT_LEFT] = gone
        (log.info if gone else log.error)(
            "download_aborted",
            name=version.name,
            error=str(exc),
            code=exc.code if isinstance(exc, DstoreError) else "client_gone",
            sent=sent(),
        )
        if request.transport is not None:
            request.transport.abort()
        return response
    finally:
        request[keys.REQUEST_BYTES_OUT] = sent()
        if splicer is not None:
            splicer.close()
    await response.write_eof()
    return response


def _splicer(request: web.Request, timeout: float) -> Splicer | None:
    """A relay into the client's socket, where the kernel can do it (plain TCP, Linux)."""
    transport = request.transport
    if transport is None or transport.get_extra_info("sslcontext") is not None:
        return None
    sock = transport.get_extra_info("socket")
    return splicer_for(sock, transport.get_write_buffer_size, timeout=timeout)


async def delete_file(request: web.Request) -> web.StreamResponse:
    name = name_from_raw_path(request.raw_path)
    request[keys.REQUEST_NAME] = name
    conditions = Preconditions.from_headers(request.headers)
    if conditions.any:
        await _check_preconditions(request, name, conditions)
    if_match = None if conditions.if_match is None else strong_tags(conditions.if_match)
    await request.app[keys.META].delete(name, if_match=if_match)
    request.app[keys.REAPER].wake()
    return web.Response(status=204)


async def _check_preconditions(request: web.Request, name: str, conditions: Preconditions) -> None:
    """A write's preconditions against the current version, before any work: a 412 now
    rather than after the body (``If-Match`` is checked again in the commit)."""
    try:
        version = await request.app[keys.META].head(name)
        current: Validators | None = Validators(version.etag, version.created)
    except FileNotFound:
        current = None
    if conditions.evaluate(request.method, current) is not Outcome.PROCEED:
        raise PreconditionFailed(f"a precondition of this {request.method} failed")


def _int_param(request: web.Request, key: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(key)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise DstoreError(f"{key} must be an integer", code="bad_request") from None
    if not lo <= value <= hi:
        raise DstoreError(f"{key} must be between {lo} and {hi}", code="bad_request")
    return value


async def list_files(request: web.Request) -> web.StreamResponse:
    limit = _int_param(request, "limit", 1000, 1, 10000)
    prefix = request.query.get("prefix", "")
    start_after = request.query.get("start_after", "")
    delimiter = request.query.get("delimiter", "")
    prefixes: list[str] = []
    if delimiter:  # names past the delimiter rolled up into common prefixes (folders)
        found = await walk(request.app[keys.META], prefix, delimiter, start_after, limit)
        files, prefixes = found.files, found.prefixes
        next_name = found.resume if found.truncated else None
    else:
        files, next_name = await request.app[keys.META].list_files(prefix, start_after, limit)
    return json_response(
        {
            "files": [
                {"name": f.name, "size": f.size, "etag": f.etag, "created": f.created}
                for f in files
            ],
            "prefixes": prefixes,
            "next": next_name,
        }
    )


async def fsck(request: web.Request) -> web.StreamResponse:
    """``GET /v1/fsck?prefix=P&verify=1&rate=MB``: the files under P whose chunks are
    short of good replicas, one JSON line each as they are found, then a line of totals
    (``dstore.master.fsck``). Read-only; ``verify`` reads every replica (at most ``rate``
    MB/s)."""
    app = request.app
    verify = request.query.get("verify", "") in ("1", "true", "yes")
    rate = _int_param(request, "rate", 50, 1, 100_000) * 1e6
    checker = Fsck(
        app[keys.META],
        app[keys.UPLOADER].door,
        app[keys.CLUSTER],
        app[keys.CONFIG].replicas,
        verify=verify,
        rate=rate,
    )
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    async for report in checker.run(request.query.get("prefix", "")):
        await response.write(orjson.dumps({"file": report_json(report)}) + b"\n")
    await response.write(orjson.dumps({"totals": totals_json(checker.totals)}) + b"\n")
    await response.write_eof()
    return response


async def cluster_info(request: web.Request) -> web.StreamResponse:
    app = request.app
    files, size = await app[keys.META].totals()
    nodes: list[dict[str, Any]] = [m.as_json() for m in app[keys.CLUSTER].members.values()]
    meta, leader = app[keys.META], app[keys.LEADER]
    led = await meta.leadership()
    leading = led.holder if led is not None and led.expires_in > 0 else None
    repair = app[keys.REPAIRER].stats()
    if meta.shared and not leader.leads:  # the leader's, as it saved it
        saved = await meta.job_state(REPAIR_STATE)
        repair = repair if saved is None else orjson.loads(saved)
    return json_response(
        {
            "gateway": {"id": leader.holder, "leads": leader.leads},
            "leader": None
            if led is None
            else {"id": led.holder, "epoch": led.epoch, "expires_in": round(led.expires_in, 1)},
            "gateways": [
                {"id": holder, "leads": holder == leading, "seen": round(ago, 1)}
                for holder, ago in await meta.gateways(SEEN)
            ],
            "nodes": nodes,
            "replicas": app[keys.CONFIG].replicas,
            "files": files,
            "bytes": size,
            "repair": repair,
        }
    )


async def stats(request: web.Request) -> web.StreamResponse:
    """The dashboard's charts: this gateway's recent traffic (both APIs)."""
    return json_response({"traffic": request.app[keys.TRAFFIC].recent()})


_UI = Path(__file__).parent / "ui"
_UI_TYPES = {
    "index.html": "text/html",
    "dashboard.js": "text/javascript",
    "dashboard.css": "text/css",
}
# the page's own files only: no inline script, nothing from elsewhere
_UI_POLICY = (
    "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:;"
    " frame-ancestors 'none'"
)


@functools.cache
def _ui_file(name: str) -> bytes:
    return (_UI / name).read_bytes()


async def ui(request: web.Request) -> web.StreamResponse:
    """The dashboard (``/ui/``): three small files shipped in the package. They hold no
    data: the page asks ``/v1/cluster`` and ``/v1/stats``, with a token when auth is on."""
    name = request.match_info.get("name") or "index.html"
    if request.path == "/ui":
        return web.Response(status=302, headers={"Location": "/ui/"})
    if name not in _UI_TYPES:
        raise FileNotFound(f"no dashboard file {name!r}")
    headers = {
        "Content-Type": f"{_UI_TYPES[name]}; charset=utf-8",
        "Cache-Control": "no-cache",
        "Content-Security-Policy": _UI_POLICY,
    }
    return web.Response(body=_ui_file(name), headers=headers)


async def healthz(request: web.Request) -> web.StreamResponse:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.StreamResponse:
    app = request.app
    up, wanted = app[keys.CLUSTER].up_count(), app[keys.CONFIG].replicas
    if up < wanted:
        return error_response(503, "not_ready", f"{up} storage nodes up, {wanted} needed")
    try:  # the metadata engine answers (a shared database may be away)
        await app[keys.META].leadership()
    except MetadataUnavailable as exc:
        return error_response(503, "not_ready", f"metadata: {exc}")
    return json_response({"status": "ready", "nodes_up": up})


async def add_node(request: web.Request) -> web.StreamResponse:
    """A storage node registers itself (``--join``), proving it knows the cluster secret;
    or an operator adds one with an admin token (``{addr}`` is then enough)."""
    app = request.app
    admin = request.get(keys.REQUEST_TOKEN) is not None
    try:
        body = await request.json()
        addr = str(body["addr"])
        parse_hostport(addr)
        if not admin:
            stamp, proof = body["time"], str(body["proof"])
            if not isinstance(stamp, int) or not 0 <= stamp < 1 << 40:
                raise ValueError("time must be seconds since the epoch")
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        reason = "too deeply nested" if isinstance(exc, RecursionError) else str(exc)[:200]
        raise DstoreError(f"expected {{addr, time, proof}}: {reason}", code="bad_request") from None
    cluster = app[keys.CLUSTER]
    if not admin and not cluster.verify_join(addr, stamp, proof):
        raise Unauthorized("join proof does not match the cluster secret")
    member = cluster.add(addr)
    if member.state is NodeState.DRAINING:
        # a join never undoes a drain (a node restarted with --join, or a replay)
        log.info("join_of_draining_node", addr=addr, node_id=member.node_id)
        return json_response(member.as_json(), status=200)
    await app[keys.META].set_member(addr, MemberState.ACTIVE)
    await cluster.refresh()
    log.info("node_joined", addr=addr, node_id=member.node_id, state=member.state.value)
    return json_response(member.as_json(), status=201)


async def drain_node(request: web.Request) -> web.StreamResponse:
    """Stop placing chunks on a node, copy its chunks away, then remove it."""
    app = request.app
    node_id = request.match_info["node_id"]
    member = app[keys.CLUSTER].by_id(node_id)
    if member is None:
        raise FileNotFound(f"no storage node {node_id!r}")
    app[keys.CLUSTER].drain(member)
    await app[keys.META].set_member(member.addr, MemberState.DRAINING)
    app[keys.REPAIRER].wake()
    return json_response(member.as_json(), status=202)


async def rebalance(request: web.Request) -> web.StreamResponse:
    """Even out used space: chunks move from the fullest nodes to the emptiest."""
    started = request.app[keys.REPAIRER].request_rebalance()
    status = 202 if started else 409
    return json_response(request.app[keys.REPAIRER].stats()["rebalance"], status=status)
