"""Membership: the storage nodes the gateway knows, their state and their load.

The gateway asks every node for its ``stat`` about once a second (the heartbeat, which
also refreshes capacity and used bytes). A node that misses ``suspect_after`` beats in a
row is ``suspect``, after ``down_after`` it is ``down``; one good answer makes it ``up``
again. Placement only picks ``up`` nodes. Space reserved for chunks in flight is
accounted here, so concurrent uploads never overfill a node.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog

from dstore.errors import DstoreError, IllegalTransition, NodeUnavailable
from dstore.histogram import BUCKETS, Histogram
from dstore.master.placement import NodeView, place
from dstore.protocol import handshake
from dstore.rpc.client import NodeClient
from dstore.rpc.transport import Connector as Connector
from dstore.rpc.transport import open_tcp as open_tcp
from dstore.rpc.transport import open_tls as open_tls

log = structlog.get_logger("dstore.cluster")

T = TypeVar("T")

# connections per node: chunk traffic (puts, reads copied through the gateway, deletes,
# lists), and relays (see ``StorageMember.relays``; each waiting relay also holds a
# chunk-sized buffer on its node)
DATA_CONNECTIONS = 8
RELAY_CONNECTIONS = 32
# what a waiting relay may hold in the gateway: the rest of its chunk stays in the kernel
RELAY_READ_LIMIT = 64 << 10


class NodeState(enum.Enum):
    UP = "up"
    SUSPECT = "suspect"
    DOWN = "down"
    DRAINING = "draining"


class NodeEvent(enum.Enum):
    """What a heartbeat round (or an operator) says of a node."""

    ANSWERED = "answered"  # its stat came back
    MISSED = "missed"  # it missed ``suspect_after`` beats in a row (not yet ``down_after``)
    SILENT = "silent"  # it missed ``down_after`` beats in a row
    DRAIN = "drain"  # an operator asked for its chunks to move away


_UP, _SUSPECT, _DOWN, _DRAINING = NodeState
# The node state machine: every (state, event) pair and the state after. A draining node
# stays draining whatever its heartbeats say: it leaves once its chunks have moved.
NODE_MOVES: dict[tuple[NodeState, NodeEvent], NodeState] = {
    (_UP, NodeEvent.ANSWERED): _UP,
    (_UP, NodeEvent.MISSED): _SUSPECT,
    (_UP, NodeEvent.SILENT): _DOWN,
    (_UP, NodeEvent.DRAIN): _DRAINING,
    (_SUSPECT, NodeEvent.ANSWERED): _UP,
    (_SUSPECT, NodeEvent.MISSED): _SUSPECT,
    (_SUSPECT, NodeEvent.SILENT): _DOWN,
    (_SUSPECT, NodeEvent.DRAIN): _DRAINING,
    (_DOWN, NodeEvent.ANSWERED): _UP,
    (_DOWN, NodeEvent.MISSED): _DOWN,
    (_DOWN, NodeEvent.SILENT): _DOWN,
    (_DOWN, NodeEvent.DRAIN): _DRAINING,
    (_DRAINING, NodeEvent.ANSWERED): _DRAINING,
    (_DRAINING, NodeEvent.MISSED): _DRAINING,
    (_DRAINING, NodeEvent.SILENT): _DRAINING,
    (_DRAINING, NodeEvent.DRAIN): _DRAINING,
}


def next_state(state: NodeState, event: NodeEvent) -> NodeState:
    """The state a node in ``state`` moves to on ``event``; ``IllegalTransition`` for a
    pair the table does not have."""
    try:
        return NODE_MOVES[state, event]
    except KeyError:
        raise IllegalTransition(f"a {state.value} node cannot take {event.value}") from None


class LostSignal:
    """Set once, when a node stops being up; calls its watchers then (synchronously)."""

    __slots__ = ("_set", "_watchers")

    def __init__(self) -> None:
        self._set = False
        self._watchers: set[Callable[[], None]] = set()

    def __repr__(self) -> str:
        return f"<LostSignal {'set' if self._set else 'clear'}, {len(self._watchers)} watching>"

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        if not self._set:
            self._set = True
            for watcher in list(self._watchers):
                watcher()

    def watch(self, watcher: Callable[[], None]) -> None:
        self._watchers.add(watcher)

    def unwatch(self, watcher: Callable[[], None]) -> None:
        self._watchers.discard(watcher)


class _Abandon:
    """Cancels a task waiting on a node once the node is lost (at most once)."""

    __slots__ = ("fired", "task")

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task = task
        self.fired = False

    def __call__(self) -> None:
        if not self.fired:
            self.fired = True
            self.task.cancel()


@dataclass
class StorageMember:
    """One storage node as the gateway sees it."""

    addr: str
    client: NodeClient  # chunk traffic, through the door
    # heartbeats and scrub reports, on a connection of their own: a node whose data
    # connections are all held (slow clients, big reads) still answers its heartbeat,
    # and node-state decisions never wait behind data traffic
    control: NodeClient
    # chunks relayed node to client (a download's whole chunks, waiting for their turn
    # and then spliced): their own connections, so that downloads whose clients stall
    # hold these, never the data pool's; taken only when free (else the chunk is copied)
    relays: NodeClient
    node_id: str = ""
    zone: str = "default"
    state: NodeState = NodeState.DOWN
    capacity: int = 0
    used: int = 0
    chunks: int = 0
    usage_seq: int = 0  # the node's report that ``used`` was last taken from
    reserved: int = 0
    last_seen: float | None = None
    # monotonic time it went down; a member starts down (until its first heartbeat), so
    # a node that never answers after a gateway start is repaired after the delay too
    down_since: float | None = field(default_factory=time.monotonic)
    scrub: dict[str, object] = field(default_factory=dict)
    fsyncs: Histogram | None = None  # the node's write-durability latency, as it reports
    volumes: dict[str, int] = field(default_factory=dict)
    missed: int = 0
    # identities this address had before: a node that came back empty has lost the
    # replicas recorded under them (repair brings them back)
    replaced_ids: list[str] = field(default_factory=list)
    # set when the node stops being up: requests in flight to it are abandoned at once
    # instead of waiting for their I/O timeout
    lost: LostSignal = field(default_factory=LostSignal)

    @property
    def clients(self) -> tuple[NodeClient, ...]:
        return (self.client, self.control, self.relays)

    def __repr__(self) -> str:
        return (
            f"<StorageMember {self.node_id or '?'} {self.addr} {self.state.value}"
            f" {self.used}+{self.reserved}/{self.capacity}>"
        )

    def view(self) -> NodeView:
        return NodeView(
            node_id=self.node_id,
            zone=self.zone,
            capacity=self.capacity,
            used=self.used,
            reserved=self.reserved,
            up=self.state is NodeState.UP,
            accepts_writes=self.state is not NodeState.DRAINING,
        )

    def as_json(self) -> dict[str, object]:
        return {
            "id": self.node_id,
            "addr": self.addr,
            "zone": self.zone,
            "state": self.state.value,
            "capacity": self.capacity,
            "used": self.used,
            "chunks": self.chunks,
            "last_seen": self.last_seen,
            "replaced_ids": self.replaced_ids,
            "scrub": self.scrub,
            "volumes": self.volumes,
            "fsync": None
            if self.fsyncs is None
            else {
                "count": self.fsyncs.count,
                "mean": self.fsyncs.mean(),
                "p99": self.fsyncs.quantile(0.99),
            },
        }


class Cluster:
    def __init__(
        self,
        addrs: Iterable[str],
        secret: bytes,
        *,
        heartbeat: float = 1.0,
        suspect_after: int = 1,
        down_after: int = 3,
        io_timeout: float = 10.0,
        connector: Connector = open_tcp,
    ) -> None:
        self.heartbeat = heartbeat
        self.suspect_after = suspect_after
        self.down_after = down_after
        self._secret = secret
        self._io_timeout = io_timeout
        self._connector = connector
        self.members: dict[str, StorageMember] = {}
        # this gateway's leadership epoch while it leads (0: it does not): sent with every
        # heartbeat and every delete, so nodes refuse the deletes of a deposed leader
        self.epoch = 0
        # told of every chunk a node's scrubber found corrupt: (chunk id, node id, reason)
        self.on_corrupt: Callable[[str, str, str], None] | None = None
        # told when an address shows a node id not seen there before: (addr, node id)
        self.on_identity: Callable[[str, str], Awaitable[None]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._joins: dict[str, float] = {}  # join proofs used, until they expire anyway
        for addr in addrs:
            self.add(addr)

    def __repr__(self) -> str:
        states = ", ".join(f"{m.addr} {m.state.value}" for m in self.members.values())
        return f"<Cluster {len(self.members)} nodes: {states}>"

    def add(self, addr: str) -> StorageMember:
        if addr in self.members:
            return self.members[addr]
        host, _, port = addr.rpartition(":")
        data, control, relays = (
            NodeClient(
                host,
                int(port),
                self._secret,
                connect_timeout=min(2.0, self._io_timeout),
                io_timeout=self._io_timeout,
                connector=self._connector,
                max_connections=size,
                read_limit=RELAY_READ_LIMIT if size == RELAY_CONNECTIONS else None,
            )
            for size in (DATA_CONNECTIONS, 1, RELAY_CONNECTIONS)
        )
        member = StorageMember(addr, data, control, relays)
        self.members[addr] = member
        return member

    async def remove(self, addr: str) -> None:
        member = self.members.pop(addr, None)
        if member is not None:
            for client in member.clients:
                await client.aclose()

    def drain(self, member: StorageMember) -> None:
        log.info("node_draining", node_id=member.node_id, addr=member.addr)
        self._move(member, NodeEvent.DRAIN)

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._heartbeats(), name="dstore-heartbeats")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for member in self.members.values():
            for client in member.clients:
                await client.aclose()

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat)
            await self.refresh()

    async def refresh(self) -> None:
        """One round of heartbeats to every node, in parallel."""
        await asyncio.gather(*(self._beat(m) for m in list(self.members.values())))

    async def _beat(self, member: StorageMember) -> None:
        try:
            async with asyncio.timeout(max(self.heartbeat, 0.5)):
                stat = await member.control.stat(epoch=self.epoch, trace="heartbeat")
        except (TimeoutError, NodeUnavailable, DstoreError) as exc:
            member.missed += 1
            if member.missed >= self.down_after:
                self._move(member, NodeEvent.SILENT, error=str(exc))
            elif member.missed >= self.suspect_after:
                self._move(member, NodeEvent.MISSED, error=str(exc))
            return
        if member.node_id and stat.node_id != member.node_id:
            # the node came back without its data (a new identity): every replica
            # recorded for the old id is lost
            log.warning(
                "node_came_back_empty", addr=member.addr, old=member.node_id, new=stat.node_id
            )
            member.replaced_ids.append(member.node_id)
        # the new id with the old one's loss, before any await: nobody sees one without the other
        changed, member.node_id = stat.node_id != member.node_id, stat.node_id
        if changed and self.on_identity is not None:
            await self.on_identity(member.addr, stat.node_id)
        member.zone = stat.zone or "default"
        member.capacity = stat.capacity
        if not self._take_usage(member) and not stat.usage_seq:
            member.used = stat.used  # a node that does not order its reports
        member.chunks = stat.chunks
        member.scrub = {
            "bytes_scanned": stat.scrub_bytes,
            "passes": stat.scrub_passes,
            "last_full_pass": stat.scrub_last_pass,
            "corrupt_found": stat.corrupt_found,
        }
        member.volumes = {
            "files": stat.volumes,
            "bytes": stat.volume_bytes,
            "garbage": stat.volume_garbage,
            "compactions": stat.compactions,
            "punched": stat.punched,
        }
        if len(stat.fsync_counts) == len(BUCKETS) + 1:  # (a node from before: none)
            member.fsyncs = Histogram(stat.fsync_counts, stat.fsync_seconds)
        member.last_seen = time.time()
        if stat.corrupt_pending and self.epoch:  # (what the scrubber found: for the leader)
            await self._take_corrupt(member)
        member.missed = 0
        self._move(member, NodeEvent.ANSWERED)

    async def _take_corrupt(self, member: StorageMember) -> None:
        try:
            chunks = await member.control.take_corrupt(trace="heartbeat")
        except DstoreError as exc:
            log.warning("take_corrupt_failed", node=member.node_id, error=str(exc))
            return
        for chunk_id in chunks:
            if self.on_corrupt is not None:
                self.on_corrupt(chunk_id, member.node_id, "scrub")

    def _move(self, member: StorageMember, event: NodeEvent, error: str = "") -> None:
        """Take a node through its state machine; requests in flight to a node that stops
        being up are abandoned (its ``lost`` signal), and a node that comes back up gets
        a fresh one."""
        state = next_state(member.state, event)
        if state is member.state:
            return
        if member.state is NodeState.UP:
            member.lost.set()
        elif state is NodeState.UP:
            member.lost = LostSignal()
        member.down_since = time.monotonic() if state is NodeState.DOWN else None
        log.info(
            "node_state",
            addr=member.addr,
            node_id=member.node_id,
            old=member.state.value,
            new=state.value,
            error=error or None,
        )
        member.state = state

    async def call(self, member: StorageMember, request: Awaitable[T]) -> T:
        """Run a request to a node, abandoning it (``NodeUnavailable``) as soon as the
        node stops answering heartbeats: a hung node costs about a heartbeat or two, not
        a whole I/O timeout."""
        lost = member.lost
        if lost.is_set():
            if asyncio.iscoroutine(request):
                request.close()  # never started
            raise NodeUnavailable(f"{member.addr} is {member.state.value}")
        # no extra task: the node's loss cancels this one, and the cancellation is turned
        # into NodeUnavailable here (as asyncio.timeout turns its own into TimeoutError)
        task = asyncio.current_task()
        assert task is not None
        abandon = _Abandon(task)
        lost.watch(abandon)
        try:
            return await request
        except asyncio.CancelledError:
            if abandon.fired and task.uncancel() == 0:
                raise NodeUnavailable(f"{member.addr} stopped answering heartbeats") from None
            raise
        finally:
            lost.unwatch(abandon)

    def verify_join(self, addr: str, stamp: int, proof: str) -> bool:
        """Whether a storage node's join request proves it knows the cluster secret. A
        proof is good once: one seen before within its validity window (a replay by
        someone who captured it) is refused."""
        now = time.time()
        for seen, until in list(self._joins.items()):
            if until < now:
                del self._joins[seen]
        if proof in self._joins or not handshake.verify_join(self._secret, addr, stamp, proof, now):
            return False
        self._joins[proof] = stamp + handshake.JOIN_WINDOW
        return True

    # --- queries --------------------------------------------------------------------------

    def by_id(self, node_id: str) -> StorageMember | None:
        for member in self.members.values():
            if member.node_id == node_id:
                return member
        return None

    def up_count(self) -> int:
        return sum(1 for m in self.members.values() if m.state is NodeState.UP)

    def views(self) -> list[NodeView]:
        return [m.view() for m in self.members.values() if m.node_id]

    # --- placement and space --------------------------------------------------------------

    def place(self, size: int, replicas: int, exclude: Collection[str] = ()) -> list[str]:
        """Pick nodes for a chunk and reserve its space on them."""
        node_ids = place(self.views(), size, replicas, exclude=exclude)
        for node_id in node_ids:
            member = self.by_id(node_id)
            assert member is not None
            member.reserved += size
        return node_ids

    @staticmethod
    def _take_usage(member: StorageMember) -> bool:
        """Take the node's newest report of its used bytes, if it is newer than the one
        ``used`` came from. Replies race (a heartbeat's against a put's on another
        connection), so only the order the node gave its reports counts: a heartbeat
        never undoes a newer put's figure, nor a put's a newer heartbeat's."""
        seq, used = max(member.client.usage, member.control.usage)
        if seq <= member.usage_seq:
            return False
        member.usage_seq, member.used = seq, used
        return True

    def release(self, node_id: str, size: int, *, stored: bool) -> None:
        """Give back a reservation; a stored chunk now counts as used."""
        member = self.by_id(node_id)
        if member is None:
            return
        member.reserved = max(0, member.reserved - size)
        if stored:
            # the node's own figure, newer than any taken before, includes this chunk; a
            # node that does not report one: count it here until the next heartbeat
            reported = max(member.client.usage, member.control.usage)[0]
            if not self._take_usage(member) and not reported:
                member.used += size
            member.chunks += 1
