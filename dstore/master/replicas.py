"""The one door to chunks on storage nodes: put a chunk on a node, read a span of a chunk
from the first replica that delivers it verified, relay a whole chunk node to client,
delete or retire a replica, and list a node's chunks. The upload and download pipelines,
the repairer, the reaper and the reconciler all come through here; only this module and
membership (``cluster``) speak to the RPC client.

The failover policy is written once, in ``ReadStrategy`` (after garage's
``try_call_many`` with its ``RequestStrategy``): replicas are tried up nodes first, in
their placement order, then suspect ones as a last resort, never down ones; any dstore
error moves on to the next replica; corrupt or missing replicas are reported for read
repair. A request to an up node is abandoned as soon as the node stops answering
heartbeats (``Cluster.call``), so a hung node costs a heartbeat or two, not a whole I/O
timeout; a request to a node that is not up (suspect, draining) has only its own
timeouts, as it is already the last resort.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import structlog

from dstore.chunk import Hasher
from dstore.errors import ChunkCorrupt, DstoreError, NodeUnavailable, NoReplica
from dstore.histogram import Histogram
from dstore.master.cluster import Cluster, NodeState, StorageMember
from dstore.protocol import ChunkList
from dstore.rpc import splice
from dstore.rpc.splice import Splicer

__all__ = [
    "ReadStrategy",
    "Relay",
    "Replicas",
    "Splicer",
    "Target",
    "splicer_for",
    "unsent",
]

log = structlog.get_logger("dstore.replicas")

T = TypeVar("T")


class Target(Protocol):
    """What a read needs to know of a chunk (a file's ``ChunkRef``, repair's
    ``ChunkReplicas``)."""

    @property
    def chunk_id(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def checksum(self) -> bytes: ...
    @property
    def nodes(self) -> tuple[str, ...]: ...


@dataclass(frozen=True, slots=True)
class ReadStrategy:
    """Which replicas a read tries, and which failures are reported as a bad replica."""

    try_suspect: bool = True  # a suspect node is tried after every up one
    try_draining: bool = False  # a draining node still holds its chunks (repair reads them)
    bad_codes: frozenset[str] = frozenset({"chunk_corrupt", "chunk_not_found"})


READ = ReadStrategy()
REPAIR_READ = ReadStrategy(try_draining=True)


@dataclass(slots=True)
class Relay:
    """One chunk's relay to a client's socket: ``turn`` is set when every byte before it
    went out; ``on_sent`` is called once its first bytes are out; ``on_parked`` when the
    chunk waits for its turn in the kernel, with the bytes of it the gateway holds
    meanwhile (those received before reading stopped)."""

    splicer: Splicer
    turn: asyncio.Future[None]
    on_sent: Callable[[], None] | None = None
    on_parked: Callable[[int], None] | None = None
    start: int = -1  # the splicer's byte count when the relay began

    @property
    def relayed(self) -> int:
        """Bytes of this chunk that went out (0 until it began)."""
        return 0 if self.start < 0 else self.splicer.sent - self.start


def unsent(sock: socket.socket | None) -> int:
    """Bytes written to a client's socket it has not acknowledged (0 where unknown)."""
    return splice.unsent(sock)


def splicer_for(
    sock: socket.socket | None, pending: Callable[[], int], *, timeout: float
) -> Splicer | None:
    """A ``Splicer`` into a client's socket, where this host and the socket allow one
    (not for TLS, nor off Linux); ``pending``: bytes the socket's owner still buffers;
    ``timeout``: how long the client may take no byte before it counts as gone."""
    if sock is None or not splice.available(sock):
        return None
    return Splicer(sock, pending, timeout=timeout)


@dataclass(slots=True)
class _Read:
    """A span of one chunk as one replica read tries it."""

    target: Target
    offset: int
    length: int
    trace: str
    first_byte: Callable[[], None] | None = None
    relay: Relay | None = None
    ready: asyncio.Future[None] | None = None
    tried: list[str] = field(default_factory=list)

    @property
    def whole(self) -> bool:
        return self.offset == 0 and self.length == self.target.size


class Replicas:
    """Chunk operations on the nodes of one ``Cluster``. ``on_bad_replica`` hears of
    each replica a read found corrupt or missing: (chunk id, node id, reason)."""

    def __init__(
        self,
        cluster: Cluster,
        *,
        on_bad_replica: Callable[[str, str, str], None] | None = None,
    ) -> None:
        self.cluster = cluster
        self.on_bad_replica = on_bad_replica
        self.failovers = 0  # replica reads that failed and moved on
        self.relays = 0  # chunks spliced node to client whole
        self.resumes = 0  # relays cut part-way and finished from another replica
        # how long each node takes, as this gateway sees it: (node id, put|get|delete)
        self.latency: dict[tuple[str, str], Histogram] = {}

    def __repr__(self) -> str:
        return (
            f"<Replicas over {len(self.cluster.members)} nodes, {self.failovers} failovers,"
            f" {self.relays} relays>"
        )

    # --- the policy -----------------------------------------------------------------------

    def order(self, nodes: Sequence[str], strategy: ReadStrategy = READ) -> list[str]:
        """The replicas to try, in order: up nodes first, then the others the strategy
        allows; each group in the chunk's own placement order, so a chunk is read from
        the same replica every time (one copy warm in a page cache, not two), and since
        placement picked the least loaded nodes first, first replicas spread over them."""
        allowed = {NodeState.UP}
        if strategy.try_suspect:
            allowed.add(NodeState.SUSPECT)
        if strategy.try_draining:
            allowed.add(NodeState.DRAINING)
        ranked = []
        for position, node_id in enumerate(nodes):
            member = self.cluster.by_id(node_id)
            if member is None or member.state not in allowed:
                continue
            ranked.append((member.state is not NodeState.UP, position, node_id))
        return [entry[-1] for entry in sorted(ranked)]

    async def _on(self, member: StorageMember, request: Awaitable[T]) -> T:
        """A request to a node: abandoned when an up node stops answering heartbeats; a
        node that is not up has only the request's own timeouts (it is a last resort)."""
        if member.state is NodeState.UP:
            return await self.cluster.call(member, request)
        return await request

    def _timed(self, node_id: str, op: str, started: float) -> None:
        histogram = self.latency.get((node_id, op))
        if histogram is None:
            histogram = self.latency[(node_id, op)] = Histogram()
        histogram.observe(time.monotonic() - started)

    def _member(self, node_id: str) -> StorageMember:
        member = self.cluster.by_id(node_id)
        if member is None:
            raise NodeUnavailable(f"node {node_id} is no longer a member")
        return member

    # --- writes ---------------------------------------------------------------------------

    async def put(
        self,
        node_id: str,
        chunk_id: str,
        data: list[memoryview],
        *,
        length: int,
        checksum: bytes,
        trace: str = "",
    ) -> None:
        """Put a chunk on a node whose space ``Cluster.place`` reserved; the reservation
        is given back, as used space if the put succeeded."""
        ok = False
        started = time.monotonic()
        try:
            member = self._member(node_id)
            await self.cluster.call(
                member,
                member.client.put_chunk(
                    chunk_id, data, length=length, checksum=checksum, trace=trace
                ),
            )
            ok = True
        finally:
            self.cluster.release(node_id, length, stored=ok)
            self._timed(node_id, "put", started)

    async def delete(
        self, chunk_id: str, node_id: str, *, retire: bool = False, trace: str = ""
    ) -> bool:
        """Delete one replica (``retire``: for good, so a late put of it is refused).
        False, and logged, when the node is gone, down or failed: the caller tries again
        later (or the reconciler trims it when the node returns)."""
        member = self.cluster.by_id(node_id)
        if member is None or member.state is NodeState.DOWN:
            return False
        started = time.monotonic()
        try:
            deleting = member.client.delete_chunk(
                chunk_id, retire=retire, epoch=self.cluster.epoch, trace=trace
            )
            await self._on(member, deleting)
            self._timed(node_id, "delete", started)
        except DstoreError as exc:
            log.info(
                "chunk_delete_deferred", chunk=chunk_id, node=node_id, error=str(exc), trace=trace
            )
            return False
        return True

    async def list_chunks(self, member: StorageMember, after: str, limit: int) -> ChunkList:
        """One page of the chunks a node holds, in id order after ``after``."""
        return await self._on(
            member, member.client.list_chunks(after=after, limit=limit, trace="reconcile")
        )

    # --- reads ----------------------------------------------------------------------------

    async def read(
        self,
        target: Target,
        offset: int = 0,
        length: int | None = None,
        *,
        trace: str = "",
        nodes: Sequence[str] | None = None,
        strategy: ReadStrategy = READ,
        first_byte: Callable[[], None] | None = None,
        relay: Relay | None = None,
        ready: asyncio.Future[None] | None = None,
    ) -> list[memoryview]:
        """The verified bytes of a span of a chunk, from the first replica that delivers
        them; ``NoReplica`` when none does. A whole chunk is hashed here; a part is
        vouched for by the node (it hashes the whole chunk while reading it, and its
        stored checksum must match ours). ``first_byte`` is called when the first bytes
        arrive. With ``relay``, a node that checked the chunk before its header has it
        relayed to the client's socket once the relay's turn comes (``ready`` is set
        before the wait); a relay cut part-way goes on from where it stopped on the next
        replica, read into memory. What is returned is what was not relayed. ``nodes``:
        only these replicas, in this order (a move reads from the node it empties)."""
        span = _Read(
            target, offset, target.size - offset if length is None else length, trace, first_byte
        )
        span.relay, span.ready = relay, ready
        for node_id in self.order(target.nodes if nodes is None else nodes, strategy):
            member = self.cluster.by_id(node_id)
            if member is None:
                continue
            started = time.monotonic()
            try:
                pieces = await self._on(member, self._read_from(member, span))
                self._timed(node_id, "get", started)
                if span.relay is not None and span.relay.start >= 0:
                    self.relays += 1
                return pieces
            except DstoreError as exc:
                if span.relay is not None and span.relay.relayed:
                    # cut part-way: the rest from the next replica, read into memory
                    done = span.relay.relayed
                    span.offset, span.length, span.relay = (
                        span.offset + done,
                        span.length - done,
                        None,
                    )
                    self.resumes += 1
                self.failovers += 1
                span.tried.append(f"{node_id}: {exc.code}")
                if exc.code in strategy.bad_codes and self.on_bad_replica is not None:
                    self.on_bad_replica(target.chunk_id, node_id, exc.code)
                log.warning(
                    "replica_read_failed",
                    chunk=target.chunk_id,
                    node=node_id,
                    error=str(exc),
                    code=exc.code,
                    trace=trace,
                )
        tried = "; ".join(span.tried) or "none up"
        raise NoReplica(f"no replica of chunk {target.chunk_id} could be read ({tried})")

    @staticmethod
    async def _read_from(member: StorageMember, span: _Read) -> list[memoryview]:
        target, whole = span.target, span.whole
        # a relay waits on a connection of the relay pool, if one is free now; else the
        # chunk is read into memory on the data pool like any other (never a wait behind
        # relays whose clients stall)
        relay = span.relay if span.relay is not None and member.relays.free else None
        client = member.client if relay is None else member.relays
        async with client.open_chunk(
            target.chunk_id,
            offset=span.offset,
            length=None if whole else span.length,
            # a whole chunk is hashed here, unless it is to be relayed
            verify=not whole or relay is not None,
            trace=span.trace,
        ) as body:
            if body.checksum != target.checksum or body.size != target.size:
                raise ChunkCorrupt(f"chunk {target.chunk_id} differs from its metadata")
            if relay is not None and body.checked and body.length == span.length:
                body.hold()  # the rest stays in the kernel until it is relayed
                if relay.on_parked is not None:
                    relay.on_parked(body.held_bytes)
                if span.first_byte is not None:
                    span.first_byte()
                if span.ready is not None and not span.ready.done():
                    span.ready.set_result(None)
                while not relay.turn.done():
                    await asyncio.wait([relay.turn], timeout=body.touch_every)
                    body.touch()
                relay.start = relay.splicer.sent
                await body.relay(relay.splicer, relay.on_sent)
                return []
            # the node vouches for a verified read (its verdict comes after the body)
            hasher = Hasher() if whole and relay is None else None
            first_byte = span.first_byte
            pieces = []
            async for piece in body:
                if first_byte is not None:
                    first_byte()
                    first_byte = None
                if hasher is not None:
                    hasher.update(piece)
                pieces.append(piece)
        if sum(map(len, pieces)) != span.length:
            raise ChunkCorrupt(f"chunk {target.chunk_id}: short read")
        if hasher is not None and hasher.digest() != target.checksum:
            raise ChunkCorrupt(f"chunk {target.chunk_id} failed its checksum at the gateway")
        return pieces
