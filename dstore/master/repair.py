"""Re-replication: every chunk back to ``replicas`` healthy copies, without an operator.

A replica needs repair when its node has been ``down`` longer than ``repair_delay``, when
its node came back empty (a new identity at the same address), when a read or the
node's scrubber found it missing or corrupt, or when its node is draining. Chunks with
the fewest healthy copies go first. A copy is read from a healthy replica (or the
draining node), verified against the checksum in the metadata, and written to a node
chosen by placement (least loaded, not already holding the chunk, another zone where
possible), throttled to ``bandwidth`` bytes per second so client requests keep their
latency. Then the metadata moves the replica, and a bad or drained copy is deleted.

A node that returns after its chunks were re-replicated holds surplus copies that no
version expects there any more: the reconciler trims them (right away for such a node).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import structlog

from dstore.errors import DstoreError, NoReplica, NotEnoughNodes, OutOfSpace
from dstore.master.cluster import NodeState, StorageMember
from dstore.master.jobs import PeriodicJob
from dstore.master.metadata import ChunkReplicas, MemberState, MetadataStore, WorkRequest
from dstore.master.reconcile import Reconciler
from dstore.master.replicas import REPAIR_READ, Replicas

log = structlog.get_logger("dstore.repair")


@dataclass
class RepairItem:
    chunk: ChunkReplicas
    healthy: list[str]  # copies that count
    leaving: list[str]  # copies on draining nodes: readable, to be moved
    drop: list[str] = field(default_factory=list)  # copies lost or bad: to be forgotten


class Repairer(PeriodicJob):
    NAME = "repair"

    def __init__(
        self,
        meta: MetadataStore,
        door: Replicas,
        reconciler: Reconciler,
        *,
        replicas: int,
        repair_delay: float,
        bandwidth: float,
        interval: float = 1.0,
        batch: int = 256,
    ) -> None:
        super().__init__(interval)
        self.meta = meta
        self.door = door
        self.cluster = door.cluster
        self.reconciler = reconciler
        self.replicas = replicas
        self.repair_delay = repair_delay
        self.bandwidth = bandwidth
        self.batch = batch
        self.bad: dict[str, set[str]] = {}  # chunk id -> nodes whose copy is missing/corrupt
        self.queue = 0
        self.queue_bytes = 0
        self.chunks_repaired = 0
        self.bytes_repaired = 0
        self.unrecoverable = 0
        self._rate = 0.0  # bytes/s of recent repairs, for the ETA
        self._lost: set[str] = set()  # nodes whose replicas were given up on
        self._rebalance: asyncio.Task[None] | None = None
        self._stalled = ""  # why the last chunk could not be repaired, if it could not
        self._started = time.monotonic()
        self._stall_logged = 0.0
        self.rebalance_moved = 0
        self.rebalance_state = "idle"
        self._asking: set[asyncio.Task[None]] = set()  # work requests being written

    def __repr__(self) -> str:
        return (
            f"<Repairer queue={self.queue}, {self.chunks_repaired} chunks /"
            f" {self.bytes_repaired} bytes repaired>"
        )

    async def stop(self) -> None:
        if self._asking:  # (each bounded by the engine's timeout)
            await asyncio.gather(*self._asking, return_exceptions=True)
        if self._rebalance is not None:
            self._rebalance.cancel()
            await asyncio.gather(self._rebalance, return_exceptions=True)
            self._rebalance = None
        await super().stop()

    # --- rebalance ------------------------------------------------------------------------

    def start_rebalance(self, tolerance: float = 0.03) -> bool:
        """Start moving chunks from the fullest nodes to the emptiest; False if a
        rebalance is already running."""
        if self._rebalance is not None and not self._rebalance.done():
            return False
        self.rebalance_state = "running"
        self._rebalance = asyncio.create_task(
            self._run_rebalance(tolerance), name="dstore-rebalance"
        )
        return True

    async def _run_rebalance(self, tolerance: float) -> None:
        try:
            while await self._rebalance_step(tolerance):
                pass
            self.rebalance_state = "balanced"
        except Exception:
            self.rebalance_state = "failed"
            log.exception("rebalance_failed")
            return
        log.info("rebalanced", moved=self.rebalance_moved)

    async def _rebalance_step(self, tolerance: float) -> bool:
        """Move one chunk from the fullest up node to the emptiest; False when the used
        fractions are within ``tolerance`` or nothing can move."""
        nodes = [
            m
            for m in self.cluster.members.values()
            if m.state is NodeState.UP and m.capacity > 0 and m.node_id
        ]
        if len(nodes) < 2:
            return False

        def load(member: StorageMember) -> float:
            return (member.used + member.reserved) / member.capacity

        nodes.sort(key=load)
        emptiest, fullest = nodes[0], nodes[-1]
        if load(fullest) - load(emptiest) <= tolerance:
            return False
        for chunk in await self.meta.chunks_on([fullest.node_id], self.batch):
            if emptiest.node_id in chunk.nodes or chunk.size == 0:
                continue
            # moving must not leave the chunk fuller than before on the target side
            if load(emptiest) + chunk.size / emptiest.capacity > load(fullest):
                continue
            data = await self._read(chunk, [fullest.node_id])
            if data is None:
                continue
            emptiest.reserved += chunk.size
            await self._record(chunk, emptiest.node_id)
            if not await self._write(chunk, data, emptiest.node_id):
                await self.meta.forget_replica(chunk.chunk_id, emptiest.node_id)
                return False
            # durable before the source copy goes (see MetadataStore.forget_replica)
            await self.meta.forget_replica(chunk.chunk_id, fullest.node_id, durable=True)
            await self._delete(chunk.chunk_id, fullest.node_id)
            fullest.used -= chunk.size
            fullest.chunks -= 1
            self.rebalance_moved += 1
            await asyncio.sleep(chunk.size / self.bandwidth)
            return True
        return False

    def report_bad(self, chunk_id: str, node_id: str, reason: str) -> None:
        """Read-repair and the scrubber: this copy is missing or corrupt. On an engine
        several gateways share, the report goes to the database, for whichever leads."""
        log.warning("replica_bad", chunk=chunk_id, node=node_id, reason=reason)
        if self.meta.shared:
            self._ask(WorkRequest("bad_replica", chunk_id, node_id, reason))
            return
        self.bad.setdefault(chunk_id, set()).add(node_id)
        self.wake()

    def request_rebalance(self) -> bool:
        """``start_rebalance`` here, or on a shared engine asked of the leader; False if
        a rebalance already runs here."""
        if not self.meta.shared:
            return self.start_rebalance()
        self._ask(WorkRequest("rebalance"))
        self.rebalance_state = "requested"
        return True

    def _ask(self, request: WorkRequest) -> None:
        task = asyncio.create_task(self._request(request), name="dstore-work-request")
        self._asking.add(task)
        task.add_done_callback(self._asking.discard)

    async def _request(self, request: WorkRequest) -> None:
        try:
            await self.meta.request_work(request)
        except DstoreError as exc:  # a scrub pass or a later read reports it again
            log.warning("work_request_lost", kind=request.kind, error=str(exc))

    async def _take_work(self) -> None:
        """The leader takes what any gateway asked for."""
        for request in await self.meta.take_work(self.batch):
            if request.kind == "bad_replica":
                self.bad.setdefault(request.chunk_id, set()).add(request.node_id)
            elif request.kind == "rebalance":
                self.start_rebalance()
            else:
                log.warning("work_unknown", kind=request.kind)

    def stats(self) -> dict[str, object]:
        eta = self.queue_bytes / self._rate if self._rate > 0 and self.queue_bytes else 0.0
        return {
            "queue": self.queue,
            "queue_bytes": self.queue_bytes,
            "chunks_repaired": self.chunks_repaired,
            "bytes_repaired": self.bytes_repaired,
            "unrecoverable": self.unrecoverable,
            "eta_seconds": round(eta, 1),
            "rebalance": {"state": self.rebalance_state, "moved": self.rebalance_moved},
        }

    async def cycle(self) -> None:
        if self.meta.shared:
            await self._take_work()
        while await self.run_once():
            pass  # more work queued behind the batch just done

    def lost_nodes(self) -> set[str]:
        now = time.monotonic()
        lost: set[str] = set()
        for member in self.cluster.members.values():
            lost.update(member.replaced_ids)
            if (
                member.state is NodeState.DOWN
                and member.node_id
                and member.down_since is not None
                and now - member.down_since >= self.repair_delay
            ):
                lost.add(member.node_id)
        return lost

    async def run_once(self) -> int:
        """One batch; returns how many chunks were repaired."""
        await self._trim_returned()
        lost = self.lost_nodes()
        if time.monotonic() - self._started >= self.repair_delay:
            # replicas on ids no member has (a node dropped from the configuration
            # without a drain) are as good as lost once the delay has passed
            known = {m.node_id for m in self.cluster.members.values() if m.node_id}
            lost |= await self.meta.replica_node_ids() - known
        self._lost |= lost
        draining = {
            m.node_id
            for m in self.cluster.members.values()
            if m.state is NodeState.DRAINING and m.node_id
        }
        chunks = {
            c.chunk_id: c for c in await self.meta.chunks_on(sorted(lost | draining), self.batch)
        }
        for chunk_id in list(self.bad):
            found = await self.meta.chunk_replicas(chunk_id)
            if found is None:
                del self.bad[chunk_id]  # the chunk itself is gone: nothing to repair
            else:
                chunks[chunk_id] = found
        items = [self._assess(c, lost, draining) for c in chunks.values()]
        items = [i for i in items if i.drop or i.leaving or len(i.healthy) < self.replicas]
        items.sort(key=lambda i: len(i.healthy))  # least redundant first
        self.queue = len(items)
        self.queue_bytes = sum(i.chunk.size for i in items)
        done = 0
        for item in items:
            if await self._repair(item):
                done += 1
            self.queue -= 1
            self.queue_bytes -= item.chunk.size
        await self._finish_drains(draining)
        if done < len(items) and self._stalled and time.monotonic() - self._stall_logged > 60:
            self._stall_logged = time.monotonic()  # say it once a minute, not once a chunk
            log.warning("repair_stalled", waiting=len(items) - done, reason=self._stalled)
        self._stalled = ""
        return done

    def _assess(self, chunk: ChunkReplicas, lost: set[str], draining: set[str]) -> RepairItem:
        bad = self.bad.get(chunk.chunk_id, set())
        item = RepairItem(chunk, healthy=[], leaving=[])
        for node_id in chunk.nodes:
            if node_id in lost or node_id in bad:
                item.drop.append(node_id)
            elif node_id in draining:
                item.leaving.append(node_id)
            else:
                item.healthy.append(node_id)
        return item

    async def _repair(self, item: RepairItem) -> bool:
        chunk = item.chunk
        sources = [n for n in item.healthy + item.leaving if self._usable(n)]
        missing = self.replicas - len(item.healthy)
        data: list[memoryview] | None = None
        started = time.monotonic()
        if missing > 0:
            data = await self._read(chunk, sources)
            if data is None:
                if not any(self._usable(n) for n in item.healthy + item.leaving):
                    self.unrecoverable += 1
                    log.error("chunk_unrecoverable", chunk=chunk.chunk_id, nodes=chunk.nodes)
                return False
            exclude = set(chunk.nodes)
            for _ in range(missing):
                try:
                    (target,) = self.cluster.place(chunk.size, 1, exclude=exclude)
                except (NotEnoughNodes, OutOfSpace) as exc:
                    self._stalled = str(exc)
                    return False
                exclude.add(target)
                # the intent first, as for uploads: a copy on a node is always known
                await self._record(chunk, target)
                if await self._write(chunk, data, target):
                    item.healthy.append(target)
                    self.bytes_repaired += chunk.size
                else:
                    await self.meta.forget_replica(chunk.chunk_id, target)
        if len(item.healthy) < self.replicas:
            return False
        for node_id in item.drop + item.leaving:
            # durable before the copy goes (see MetadataStore.forget_replica)
            await self.meta.forget_replica(chunk.chunk_id, node_id, durable=True)
            await self._delete(chunk.chunk_id, node_id)
        self.bad.pop(chunk.chunk_id, None)
        self.chunks_repaired += 1
        if data is not None:
            elapsed = time.monotonic() - started
            self._rate = 0.8 * self._rate + 0.2 * (chunk.size / max(elapsed, 1e-6))
            # throttle: at most `bandwidth` bytes per second of repair traffic
            await asyncio.sleep(max(0.0, chunk.size / self.bandwidth - elapsed))
        return True

    def _usable(self, node_id: str) -> bool:
        member = self.cluster.by_id(node_id)
        return member is not None and member.state in (NodeState.UP, NodeState.DRAINING)

    async def _read(self, chunk: ChunkReplicas, sources: list[str]) -> list[memoryview] | None:
        try:
            return await self.door.read(chunk, trace="repair", nodes=sources, strategy=REPAIR_READ)
        except NoReplica as exc:
            log.warning("repair_sources_failed", chunk=chunk.chunk_id, error=str(exc))
            return None

    async def _record(self, chunk: ChunkReplicas, node_id: str) -> None:
        """Record the intent for a copy whose space is reserved on ``node_id``; if that
        fails (or is cancelled), the reservation is given back."""
        try:
            await self.meta.add_replicas(chunk.chunk_id, [node_id])
        except BaseException:
            self.cluster.release(node_id, chunk.size, stored=False)
            raise

    async def _write(self, chunk: ChunkReplicas, data: list[memoryview], node_id: str) -> bool:
        try:
            await self.door.put(
                node_id,
                chunk.chunk_id,
                data,
                length=chunk.size,
                checksum=chunk.checksum,
                trace="repair",
            )
        except DstoreError as exc:
            log.warning("repair_write_failed", chunk=chunk.chunk_id, node=node_id, error=str(exc))
            return False
        return True

    async def _delete(self, chunk_id: str, node_id: str) -> None:
        await self.door.delete(chunk_id, node_id, trace="repair")

    async def _trim_returned(self) -> None:
        """A node given up on that is back: its surplus copies go now, not at the next
        reconciliation."""
        for member in list(self.cluster.members.values()):
            if member.node_id in self._lost and member.state is NodeState.UP:
                self._lost.discard(member.node_id)
                log.info("trimming_returned_node", node=member.node_id)
                try:
                    await self.reconciler.reconcile_member(member, grace=0.0)
                except DstoreError as exc:
                    log.warning("trim_failed", node=member.node_id, error=str(exc))
                    self._lost.add(member.node_id)  # tried again on the next pass

    async def _finish_drains(self, draining: set[str]) -> None:
        for node_id in draining:
            member = self.cluster.by_id(node_id)
            if member is None or await self.meta.replica_count(node_id):
                continue
            await self.meta.set_member(member.addr, MemberState.REMOVED)
            await self.cluster.remove(member.addr)
            log.info("node_drained_and_removed", node=node_id, addr=member.addr)
