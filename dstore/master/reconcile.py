"""Inventory reconciliation, the last backstop against leaked space.

Every ``interval`` the gateway lists each up node's chunks, a page at a time, and deletes
those that no version (live, pending or dead) expects on that node and that are older
than ``grace``: chunks whose intent was lost (a node that finished a write after its
upload gave up, a replica forgotten after a failed put, metadata restored from an older
backup). Deletes are rate-limited so a large cleanup never crowds out client traffic.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import structlog

from dstore.errors import DstoreError
from dstore.master.cluster import NodeState, StorageMember
from dstore.master.jobs import PeriodicJob
from dstore.master.metadata import MetadataStore
from dstore.master.replicas import Replicas

log = structlog.get_logger("dstore.reconcile")


@dataclass
class ReconcileCounts:
    listed: int = 0
    orphans: int = 0
    deleted: int = 0
    young: int = 0  # orphans kept because they are younger than the grace period


class Reconciler(PeriodicJob):
    NAME = "reconciler"

    def __init__(
        self,
        meta: MetadataStore,
        door: Replicas,
        *,
        grace: float,
        interval: float = 600.0,
        deletes_per_second: float = 50.0,
        page: int = 1000,
    ) -> None:
        super().__init__(interval, run_at_start=False)
        self.meta = meta
        self.door = door
        self.cluster = door.cluster
        self.grace = grace
        self.deletes_per_second = deletes_per_second
        self.page = page
        self.passes = 0
        self.deleted = 0

    def __repr__(self) -> str:
        return f"<Reconciler {self.passes} passes, {self.deleted} orphans deleted>"

    async def cycle(self) -> None:
        await self.run_once()

    async def run_once(self) -> ReconcileCounts:
        total = ReconcileCounts()
        for member in list(self.cluster.members.values()):
            if member.state is not NodeState.UP or not member.node_id:
                continue
            try:
                counts = await self.reconcile_member(member)
            except DstoreError as exc:
                log.warning("reconcile_node_failed", node=member.node_id, error=str(exc))
                continue
            for field in ("listed", "orphans", "deleted", "young"):
                setattr(total, field, getattr(total, field) + getattr(counts, field))
            log.info(
                "reconciled",
                node=member.node_id,
                listed=counts.listed,
                orphans=counts.orphans,
                deleted=counts.deleted,
                young=counts.young,
            )
        self.passes += 1
        self.deleted += total.deleted
        return total

    async def reconcile_member(
        self, member: StorageMember, *, grace: float | None = None
    ) -> ReconcileCounts:
        """One node's pass; ``grace`` overrides the age below which orphans are kept."""
        grace = self.grace if grace is None else grace
        counts = ReconcileCounts()
        after = ""
        while True:
            page = await self.door.list_chunks(member, after, self.page)
            rows = page.chunks
            counts.listed += len(rows)
            known = await self.meta.known_replicas(member.node_id, [r[0] for r in rows])
            cutoff = time.time() - grace
            for chunk_id, _size, mtime in rows:
                if chunk_id in known:
                    continue
                counts.orphans += 1
                if mtime > cutoff:
                    counts.young += 1
                    continue
                # re-checked one by one: an upload may have recorded it since the page
                if await self.meta.known_replicas(member.node_id, [chunk_id]):
                    continue
                if await self.door.delete(chunk_id, member.node_id, trace="reconcile"):
                    counts.deleted += 1
                await asyncio.sleep(1.0 / self.deletes_per_second)
            if page.next is None:
                return counts
            after = page.next
