"""The storage role: a protocol server in front of a ChunkStore.

Each request gets exactly one final reply (or, for a get, a data header, the body and then
``Done`` or an ``Error``). Request-level failures become error frames and the connection
goes on; transport and protocol failures close the connection.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog

from dstore.config import StorageConfig
from dstore.errors import ChunkCorrupt, DstoreError, Fenced, NodeUnavailable, ProtocolError
from dstore.protocol import (
    ChunkData,
    ChunkList,
    CorruptList,
    DeleteChunk,
    Deleted,
    Done,
    Error,
    GetChunk,
    ListChunks,
    Ping,
    Pong,
    PutChunk,
    Request,
    Stat,
    StatReply,
    Stored,
    TakeCorrupt,
)
from dstore.rpc.server import BodyReader, RpcServer
from dstore.rpc.transport import CORK_LIMIT, FramedStream
from dstore.storage.chunkstore import ChunkStore
from dstore.storage.scrub import Scrubber

log = structlog.get_logger("dstore.storage")

MAX_LIST_PAGE = 5000


def load_node_id(data_dir: Path) -> str:
    """A node's identity survives restarts; an empty data dir means a new node."""
    path = data_dir / "node_id"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        node_id = "n-" + secrets.token_hex(6)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as file:  # durable before it is used: the replicas name it
            file.write(node_id + "\n")
            file.flush()
            os.fsync(file.fileno())
        tmp.replace(path)
        folder = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
        return node_id


class StorageNode:
    def __init__(self, config: StorageConfig) -> None:
        self.config = config
        self.store = ChunkStore(
            config.data_dir,
            config.capacity,
            small_max=config.small_chunk_max,
            volume_size=config.volume_size,
        )
        self.scrubber = Scrubber(self.store, rate=config.scrub_rate, idle=config.scrub_pause)
        self.node_id = ""
        self.fence = 0  # the newest leadership epoch heard of: older ones delete nothing
        self.server: RpcServer | None = None
        self.running = False  # from start to stop
        self._last_usage_seq = 0

    def _usage_seq(self) -> int:
        """The order of a report of ``used``: increasing, and past any of an earlier run of
        this node (wall-clock nanoseconds at least), so the gateway can keep the newest
        report however the replies that carry them race each other."""
        self._last_usage_seq = max(self._last_usage_seq + 1, time.time_ns())
        return self._last_usage_seq

    def __repr__(self) -> str:
        return f"<StorageNode {self.node_id} {self.config.host}:{self.port} {self.store!r}>"

    @property
    def port(self) -> int:
        return self.server.port if self.server else self.config.port

    @property
    def addr(self) -> str:
        return f"{self.config.host}:{self.port}"

    async def start(self, *, listen: bool = True) -> None:
        """Open the store and serve; ``listen=False`` binds no port (connections are
        then handed to ``server.accept`` by another backend, as tests do in memory)."""
        await self.store.open()
        self.node_id = await asyncio.to_thread(load_node_id, self.config.data_dir)
        tls = self.config.tls
        self.server = RpcServer(
            self.config.cluster_secret.encode(),
            self.handle,
            host=self.config.host,
            port=self.config.port,
            node_id=self.node_id,
            io_timeout=self.config.io_timeout,
            max_body=self.config.max_chunk_size,
            tls=None if tls is None else tls.server(clients="required"),
        )
        if listen:
            await self.server.start()
        self.scrubber.start()
        self.running = True
        log.info(
            "storage_node_started", node_id=self.node_id, addr=self.addr, zone=self.config.zone
        )

    async def stop(self, grace: float | None = None) -> None:
        self.running = False
        await self.scrubber.stop()
        if self.server is not None:
            await self.server.close(self.config.grace if grace is None else grace)
        await self.store.close()
        log.info("storage_node_stopped", node_id=self.node_id)

    async def handle(self, request: Request, stream: FramedStream) -> None:
        started = time.monotonic()
        body = BodyReader(stream) if isinstance(request, PutChunk) else None
        outcome = "ok"
        nbytes = 0
        try:
            nbytes = await self._dispatch(request, stream, body)
        except (NodeUnavailable, ProtocolError):
            outcome = "connection_lost"
            raise
        except DstoreError as exc:
            outcome = exc.code
            if body is not None:
                await body.drain()
            if stream.conn.body_owed:
                raise  # a reply body was cut short: only closing the connection is honest
            await stream.send(Error(rid=request.rid, code=exc.code, message=exc.message))
        finally:
            # heartbeats (stat) and pings every second would bury the lines that matter
            (log.debug if isinstance(request, Stat | Ping) else log.info)(
                "request",
                chunk=getattr(request, "chunk_id", None),
                bytes=nbytes,
                outcome=outcome,
                ms=round((time.monotonic() - started) * 1000, 2),
            )

    async def _dispatch(
        self, request: Request, stream: FramedStream, body: BodyReader | None
    ) -> int:
        rid = request.rid
        store = self.store
        if isinstance(request, PutChunk):
            assert body is not None
            created = await store.write(request.chunk_id, request.length, request.checksum, body)
            used, seq = store.used, self._usage_seq()
            await stream.send(Stored(rid=rid, created=created, used=used, usage_seq=seq))
            return request.length
        if isinstance(request, GetChunk):
            async with store.reader(
                request.chunk_id,
                request.offset,
                request.length,
                verify=request.verify,
            ) as reader:
                header = ChunkData(
                    rid=rid,
                    length=reader.length,
                    size=reader.size,
                    checksum=reader.checksum,
                    checked=reader.checked,
                )
                if reader.sendfile and stream.can_sendfile:
                    # the reader verifies: page cache to socket, no copy, no hashing here
                    await stream.send(header, flush=False)
                    await stream.send_file_body(*reader.file_range())
                    if stream.conn.body_owed:
                        raise NodeUnavailable(f"chunk {request.chunk_id} shrank while sent")
                    await stream.send(Done(rid=rid))
                    return reader.length
                small = reader.length <= CORK_LIMIT
                if small:
                    stream.cork()
                try:
                    await stream.send(header, flush=False)
                    try:
                        async for piece in reader:
                            await stream.send_body(piece)
                    except ChunkCorrupt:
                        log.error("chunk_corrupt", chunk=request.chunk_id)
                        raise
                    await stream.send(Done(rid=rid))
                finally:
                    if small:  # also on errors: what was written goes out before them
                        await stream.uncork()
                return reader.length
        if isinstance(request, DeleteChunk):
            if request.epoch < self.fence:
                raise Fenced(
                    f"a delete under leadership epoch {request.epoch};"
                    f" epoch {self.fence} has begun since"
                )
            existed = await store.delete(request.chunk_id, retire=request.retire)
            await stream.send(Deleted(rid=rid, existed=existed))
            return 0
        if isinstance(request, Stat):
            if request.epoch > self.fence:
                log.info("leadership_fence", epoch=request.epoch, was=self.fence)
                self.fence = request.epoch
            stats = store.stats()
            volumes, volume_bytes, garbage = store.volumes.usage()
            await stream.send(
                StatReply(
                    rid=rid,
                    node_id=self.node_id,
                    zone=self.config.zone,
                    capacity=stats.capacity,
                    used=stats.used,
                    reserved=stats.reserved,
                    chunks=stats.chunks,
                    scrub_bytes=self.scrubber.bytes_scanned,
                    scrub_passes=self.scrubber.passes,
                    scrub_last_pass=self.scrubber.last_pass,
                    corrupt_found=self.scrubber.corrupt_found,
                    corrupt_pending=len(self.scrubber.pending),
                    volumes=volumes,
                    volume_bytes=volume_bytes,
                    volume_garbage=garbage,
                    compactions=store.volumes.compactions,
                    punched=store.volumes.punched,
                    usage_seq=self._usage_seq(),
                    fence=self.fence,
                    fsync_counts=list(store.fsyncs.counts),
                    fsync_seconds=store.fsyncs.sum,
                )
            )
            return 0
        if isinstance(request, ListChunks):
            limit = max(1, min(request.limit, MAX_LIST_PAGE))
            rows = await store.list(request.after, limit + 1)
            page = rows[:limit]
            next_after = page[-1].chunk_id if len(rows) > limit else None
            await stream.send(
                ChunkList(
                    rid=rid, chunks=[[r.chunk_id, r.size, r.mtime] for r in page], next=next_after
                )
            )
            return 0
        if isinstance(request, TakeCorrupt):
            await stream.send(CorruptList(rid=rid, chunks=self.scrubber.take()))
            return 0
        if isinstance(request, Ping):
            await stream.send(Pong(rid=rid, time=time.time()))
            return 0
        raise DstoreError(f"unsupported op {request.OP!r}", code="unsupported_op")


Join = Callable[[str], Awaitable[dict[str, Any]]]


async def run_storage(config: StorageConfig, join: Join | None = None) -> None:
    """Run a storage node until SIGTERM/SIGINT, then stop within the grace period.
    ``join`` registers the node's address with a gateway (``--join``): the caller brings
    it, since the node itself speaks only its own protocol."""
    node = StorageNode(config)
    await node.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"dstore storage node {node.node_id} listening on {node.addr}", flush=True)
    if join is not None:
        try:
            joined = await join(node.addr)
            log.info("joined_cluster", gateway=config.join, state=joined.get("state"))
        except DstoreError:
            await node.stop(grace=0)
            raise
    await stop.wait()
    await node.stop()
