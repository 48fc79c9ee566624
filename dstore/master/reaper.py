"""The reaper: gives back the space of dead versions (deleted, overwritten, or uploads that
were abandoned or whose lease ran out) by deleting their chunks from the nodes.

A dead version that a download still reads is pinned and kept until the download ends or
``grace`` passes. Versions younger than ``settle`` seconds are left alone, which closes the
window between a reader's lookup and its pin.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import structlog

from dstore.master.jobs import PeriodicJob
from dstore.master.metadata import DeadChunk, MetadataStore
from dstore.master.replicas import Replicas

log = structlog.get_logger("dstore.reaper")


class ReadPins:
    """Versions that downloads are reading right now."""

    def __init__(self) -> None:
        self._counts: Counter[int] = Counter()

    def __repr__(self) -> str:
        return f"<ReadPins {sum(self._counts.values())} readers of {len(self._counts)} versions>"

    @contextmanager
    def pin(self, version_id: int) -> Iterator[None]:
        self._counts[version_id] += 1
        try:
            yield
        finally:
            self._counts[version_id] -= 1
            if not self._counts[version_id]:
                del self._counts[version_id]

    def pinned(self, version_id: int) -> bool:
        return self._counts[version_id] > 0  # a Counter gives 0 for an unknown version


class Reaper(PeriodicJob):
    NAME = "reaper"

    def __init__(
        self,
        meta: MetadataStore,
        door: Replicas,
        pins: ReadPins,
        *,
        grace: float,
        interval: float = 1.0,
        settle: float = 2.0,
        batch: int = 500,
        on_reclaim: Callable[[str], None] | None = None,
        on_reclaim_inline: Callable[[int], None] | None = None,
    ) -> None:
        # woken (by a delete, an overwrite, an abort): let the dead version settle first
        super().__init__(interval, after_wake=settle)
        self.meta = meta
        self.door = door
        self.cluster = door.cluster
        self.pins = pins
        self.grace = grace
        self.settle = settle
        self.batch = batch
        # told each chunk id being reclaimed, and each version whose inline bytes were
        # (the read cache, which would otherwise keep them until evicted)
        self.on_reclaim = on_reclaim
        self.on_reclaim_inline = on_reclaim_inline
        self.deleted = 0
        self.leases_expired = 0
        self.runs = 0
        self.held_for_readers = 0  # dead replicas a pass left for a pinned reader

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<Reaper {state}, {self.deleted} chunks deleted, {self.runs} runs>"

    async def cycle(self) -> None:
        await self.run_once()

    async def run_once(self) -> int:
        """One pass; returns how many replicas were deleted."""
        self.runs += 1
        expired = await self.meta.expire_leases()
        if expired:
            self.leases_expired += len(expired)
            log.info("upload_leases_expired", versions=expired)
        dead = await self.meta.dead_chunks(self.settle, self.batch)
        ready = [c for c in dead if not self.pins.pinned(c.version_id) or c.dead_for > self.grace]
        self.held_for_readers += len(dead) - len(ready)
        if self.on_reclaim is not None:
            for chunk in ready:
                self.on_reclaim(chunk.chunk_id)
        results = await asyncio.gather(*(self._delete(c) for c in ready))
        removed = sum(results)
        purged = await self.meta.purge_dead()
        if self.on_reclaim_inline is not None:
            for version_id in purged.inline:
                self.on_reclaim_inline(version_id)
        if removed or purged.versions:
            self.deleted += removed
            log.info("chunks_reclaimed", replicas=removed, versions=purged.versions)
        return removed

    async def _delete(self, chunk: DeadChunk) -> int:
        removed = 0
        for node_id in chunk.nodes:
            if await self.door.delete(chunk.chunk_id, node_id, retire=True, trace="reaper"):
                await self.meta.forget_replica(chunk.chunk_id, node_id)
                removed += 1
        return removed
