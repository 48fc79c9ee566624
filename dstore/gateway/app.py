"""The gateway's aiohttp application: factory, services as cleanup contexts, routes, and
the process runner with graceful shutdown."""

from __future__ import annotations

import asyncio
import signal
import ssl
from collections.abc import AsyncIterator

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from dstore.auth import TokenTable
from dstore.config import GatewayConfig, is_loopback
from dstore.gateway import handlers, keys
from dstore.gateway.budget import MemoryBudget
from dstore.gateway.cache import ChunkCache, inline_key
from dstore.gateway.counters import HttpCounters
from dstore.gateway.download import Downloader
from dstore.gateway.metrics import metrics
from dstore.gateway.traffic import Traffic
from dstore.gateway.upload import Uploader, UploadSettings
from dstore.master.cluster import Cluster, Connector, open_tcp, open_tls
from dstore.master.inline_scrub import InlineScrubber
from dstore.master.leader import Leader, holder_id
from dstore.master.membership import MembershipSync
from dstore.master.metadata import (
    CachedMetadataStore,
    LookupCache,
    MemberState,
    MetadataStore,
    SQLiteMetadataStore,
)
from dstore.master.metadata.postgres import PostgresMetadataStore
from dstore.master.reaper import PinKeeper, ReadPins, Reaper
from dstore.master.reconcile import Reconciler
from dstore.master.repair import Repairer
from dstore.master.replicas import Replicas

log = structlog.get_logger("dstore.gateway")


def node_connector(config: GatewayConfig) -> Connector:
    """How this gateway dials its nodes: mutual TLS against the cluster CA when one is
    configured, else plain TCP."""
    tls = config.tls
    if tls is None or tls.ca is None:
        return open_tcp
    return open_tls(tls.client(), handshake_timeout=config.io_timeout)


def metadata_engine(config: GatewayConfig) -> tuple[MetadataStore, LookupCache]:
    """The configured engine, and the lookup cache in front of it: SQLite in the data dir
    by default; PostgreSQL for a ``postgresql://`` URL. Other gateways write that
    database too, so there the cache keeps inline files only (no replica list to go
    stale) and every hit is checked against the name's current version, in a batch
    with other checks: a smaller trip than the lookup, and the bytes then come from the
    read cache (by version id, which never changes)."""
    if config.metadata is None:
        return SQLiteMetadataStore(config.data_dir / "meta.db"), LookupCache(config.lookup_cache)
    return PostgresMetadataStore(config.metadata), LookupCache(config.lookup_cache, max_chunks=0)


def create_app(config: GatewayConfig, *, connector: Connector | None = None) -> web.Application:
    connector = node_connector(config) if connector is None else connector
    tokens = TokenTable(config.auth_tokens or [])
    # auth off (no tokens configured, loopback only): no request to check, no middleware
    middlewares = [handlers.observe] + ([handlers.authenticate] if tokens.enabled else [])
    app = web.Application(middlewares=middlewares)
    app[keys.CONFIG] = config
    app[keys.TOKENS] = tokens
    app[keys.TRAFFIC] = traffic = Traffic()
    app[keys.HTTP] = HttpCounters(traffic)
    app[keys.S3_HTTP] = HttpCounters(traffic)
    app.on_response_prepare.append(handlers.add_response_headers)
    app[keys.SIDE_RUNNERS] = []
    app.on_shutdown.append(_stop_side_runners)

    async def services(app: web.Application) -> AsyncIterator[None]:
        engine, lookups = metadata_engine(config)
        meta = CachedMetadataStore(engine, lookups)
        await meta.open()
        records = {r.addr: r.state for r in await meta.members()}
        gone = MemberState.REMOVED
        addrs = [a for a in config.storage or [] if records.get(a) is not gone]
        addrs += [a for a, state in records.items() if state is not gone and a not in addrs]
        cluster = Cluster(
            addrs,
            config.cluster_secret.encode(),
            heartbeat=config.heartbeat,
            suspect_after=config.suspect_after,
            down_after=config.down_after,
            io_timeout=config.io_timeout,
            connector=connector,
        )
        for addr, state in records.items():
            if state is MemberState.DRAINING and addr in cluster.members:
                cluster.drain(cluster.members[addr])
        # known before the first heartbeat: a node that never answers again is still
        # recognised as the holder of its replicas (and repaired after the delay)
        for addr, node_id in (await meta.identities()).items():
            if addr in cluster.members:
                cluster.members[addr].node_id = node_id
        cluster.on_identity = meta.remember_identity
        await cluster.start()
        holder = config.gateway_id or holder_id(config.listen)
        pins = ReadPins(meta if meta.shared else None, holder, ttl=config.pin_ttl)
        pin_keeper = PinKeeper(pins)
        cache = ChunkCache(config.cache_size)
        door = Replicas(cluster)
        reaper = Reaper(
            meta,
            door,
            pins,
            grace=config.gc_grace,
            interval=config.reaper_interval,
            on_reclaim=cache.discard,
            on_reclaim_inline=lambda version_id: cache.discard(inline_key(version_id)),
        )
        reconciler = Reconciler(
            meta, door, grace=config.gc_grace, interval=config.reconcile_interval
        )
        repairer = Repairer(
            meta,
            door,
            reconciler,
            replicas=config.replicas,
            repair_delay=config.repair_delay,
            bandwidth=config.repair_bandwidth,
        )
        cluster.on_corrupt = repairer.report_bad
        door.on_bad_replica = repairer.report_bad
        budget = MemoryBudget(config.memory_budget, config.budget_wait)
        settings = UploadSettings(
            config.chunk_size,
            config.replicas,
            config.window,
            config.lease,
            config.max_object_size,
            inline_max=config.inline_max,
        )
        app[keys.META] = meta
        app[keys.LOOKUP_CACHE] = lookups
        app[keys.CLUSTER] = cluster
        app[keys.PINS] = pins
        app[keys.REAPER] = reaper
        app[keys.RECONCILER] = reconciler
        app[keys.REPAIRER] = repairer
        app[keys.BUDGET] = budget
        uploader = Uploader(meta, door, budget, reaper, settings, cache=cache)
        app[keys.UPLOADER] = uploader
        app[keys.DOWNLOADER] = Downloader(
            door,
            budget,
            cache=cache,
            splice=config.splice,
        )
        inline_scrubber = InlineScrubber(meta, interval=config.inline_scrub_interval)
        app[keys.INLINE_SCRUBBER] = inline_scrubber
        leader = Leader(meta, holder, cluster, interval=config.heartbeat, report=repairer.stats)
        app[keys.LEADER] = leader
        await leader.cycle()  # (known before the first cycles of the jobs it gates)
        leader.start()
        for job in (reaper, inline_scrubber, reconciler, repairer):
            job.gate = lambda: leader.leads
            job.start()
        uploader.lease_keeper.start()
        membership = MembershipSync(meta, cluster, interval=config.heartbeat)
        membership.start()
        if pins.meta is not None:
            pin_keeper.start()
        log.info(
            "gateway_started",
            nodes=len(cluster.members),
            up=cluster.up_count(),
            replicas=config.replicas,
            chunk_size=config.chunk_size,
        )
        try:
            yield
        finally:
            await membership.stop()
            await pin_keeper.stop()
            await uploader.lease_keeper.stop()
            await repairer.stop()
            await reconciler.stop()
            await inline_scrubber.stop()
            await reaper.stop()
            await leader.stop()
            await cluster.stop()
            await meta.close()
            log.info("gateway_stopped")

    app.cleanup_ctx.append(services)
    files = r"/v1/files/{name:[\s\S]+}"  # any character: names are checked by the handler
    app.router.add_put(files, handlers.put_file)
    app.router.add_get(files, handlers.get_file)  # also answers HEAD
    app.router.add_delete(files, handlers.delete_file)
    app.router.add_get("/v1/files", handlers.list_files)
    app.router.add_get("/v1/cluster", handlers.cluster_info)
    app.router.add_post("/v1/cluster/nodes", handlers.add_node)
    app.router.add_delete("/v1/cluster/nodes/{node_id}", handlers.drain_node)
    app.router.add_post("/v1/cluster/rebalance", handlers.rebalance)
    app.router.add_get("/healthz", handlers.healthz)
    app.router.add_get("/readyz", handlers.readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/stats", handlers.stats)
    app.router.add_get("/v1/fsck", handlers.fsck)
    app.router.add_get("/ui", handlers.ui)
    app.router.add_get("/ui/", handlers.ui)
    app.router.add_get("/ui/{name}", handlers.ui)
    return app


_BUSY_BODY = b'{"error": {"code": "too_many_connections", "message": "too many open connections"}}'
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\n"
    b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
) % (len(_BUSY_BODY), _BUSY_BODY)


class _Refused(asyncio.Protocol):
    """A connection past the cap: told so, and closed."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(_BUSY)
        transport.close()


class _QuietHandler(RequestHandler):
    """aiohttp's connection handler, but a request it cannot parse gets a short JSON 400
    that repeats nothing of it, and one warning line without it either: aiohttp's own
    answer quotes the offending bytes (an over-long ``Authorization`` header, say) in the
    body and logs them with a traceback."""

    __slots__ = ()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status < 500:  # the client's bytes: named, never quoted
            log.warning(
                "http_unparsable",
                status=status,
                error=type(exc).__name__ if exc is not None else None,
                peer=request.remote,
            )
        else:  # our own failure: with its traceback
            log.error("http_handler_error", status=status, peer=request.remote, exc_info=exc)
        if request.writer is not None and request.writer.output_size > 0:
            raise ConnectionError("the response has begun: no error response can follow")
        code = "bad_request" if status < 500 else "internal_error"
        text = "the request could not be parsed" if status < 500 else "internal error"
        response = web.json_response({"error": {"code": code, "message": text}}, status=status)
        response.force_close()
        return response


class CappedSite(web.BaseSite):
    """A TCP site that serves at most ``max_connections`` client connections at once (no
    limit keyed on the client's address: behind a load balancer every client has one)."""

    __slots__ = ("_host", "_port", "handshake_timeout", "max_connections", "refused")

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        max_connections: int,
        tls: ssl.SSLContext | None = None,
        handshake_timeout: float = 10.0,
    ) -> None:
        super().__init__(runner, ssl_context=tls)
        self._host, self._port = host, port
        self.max_connections = max_connections
        self.handshake_timeout = handshake_timeout
        self.refused = 0

    @property
    def name(self) -> str:
        scheme = "http" if self._ssl_context is None else "https"
        return f"{scheme}://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None

        def connection() -> asyncio.BaseProtocol:
            if len(server.connections) >= self.max_connections:
                self.refused += 1
                return _Refused()
            # (aiohttp's Server keeps its handler settings in ``_kwargs``; its __call__
            # makes a plain RequestHandler with them)
            return _QuietHandler(server, loop=server._loop, **server._kwargs)

        tls = self._ssl_context
        self._server = await asyncio.get_running_loop().create_server(
            connection,
            self._host,
            self._port,
            reuse_address=True,
            backlog=self._backlog,
            ssl=tls,
            ssl_handshake_timeout=self.handshake_timeout if tls is not None else None,
        )


async def _stop_side_runners(app: web.Application) -> None:
    for runner in app[keys.SIDE_RUNNERS]:
        await runner.cleanup()


async def _start_site(runner: web.AppRunner, config: GatewayConfig, host: str, port: int) -> None:
    tls = config.tls
    if tls is None and not is_loopback(host):
        log.warning("listening_without_tls", host=host, hint="give --tls-cert and --tls-key")
    site = CappedSite(
        runner,
        host,
        port,
        max_connections=config.max_connections,
        # a node joining shows its cluster certificate; other clients show none
        tls=None if tls is None else tls.server(clients="optional" if tls.ca else "none"),
        handshake_timeout=config.header_timeout,
    )
    await site.start()


def _runner(app: web.Application, config: GatewayConfig) -> web.AppRunner:
    return web.AppRunner(
        app,
        access_log=None,
        shutdown_timeout=config.grace,
        # aiohttp closes a connection that has no whole request within this, from its
        # start and between requests: the header timeout, and the idle one
        keepalive_timeout=config.header_timeout,
        handler_cancellation=False,
    )


async def start_gateway(
    config: GatewayConfig, *, connector: Connector | None = None
) -> tuple[web.AppRunner, int]:
    """Start serving (and the S3 API, with ``s3_listen``); returns the runner and the
    bound port (``listen`` may use port 0; the S3 runner is ``s3_runner(runner)``)."""
    runner = _runner(create_app(config, connector=connector), config)
    await runner.setup()
    try:
        await _start_site(runner, config, *config.host_port)
        if config.s3_listen is not None:
            from dstore.s3.app import create_s3_app

            s3 = _runner(create_s3_app(runner.app), config)
            await s3.setup()
            runner.app[keys.SIDE_RUNNERS].append(s3)
            host, _, port = config.s3_listen.rpartition(":")
            await _start_site(s3, config, host, int(port))
    except BaseException:
        await runner.cleanup()
        raise
    bound = runner.addresses[0][1]
    return runner, bound


def s3_runner(runner: web.AppRunner) -> web.AppRunner | None:
    """The S3 API's runner beside a gateway's, if it serves one."""
    side = runner.app[keys.SIDE_RUNNERS]
    return side[0] if side else None


async def run_gateway(config: GatewayConfig) -> None:
    """Run until SIGTERM/SIGINT, then stop within the grace period."""
    runner, port = await start_gateway(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    host, _ = config.host_port
    print(f"dstore gateway listening on {config.scheme}://{host}:{port}", flush=True)
    s3 = s3_runner(runner)
    if s3 is not None:
        s3_host, s3_port = s3.addresses[0][:2]
        print(f"dstore S3 API listening on {config.scheme}://{s3_host}:{s3_port}", flush=True)
    await stop.wait()
    await runner.cleanup()
