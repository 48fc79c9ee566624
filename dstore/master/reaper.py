"""The reaper: gives back the space of dead versions (deleted, overwritten, or uploads that
were abandoned or whose lease ran out) by deleting their chunks from the nodes.

A dead version that a download still reads is pinned and kept until the download ends or
``grace`` passes. Versions younger than ``settle`` seconds are left alone, which closes the
window between a reader's lookup and its pin.

With one gateway the pins are a counter in its memory. On an engine several gateways
share, a pin is also a row with an expiry (``MetadataStore.pin``), written before the
download reads a byte and renewed while it runs, so the leader's reaper, on whichever
gateway, sees it. A pin is refused for a version dead for longer than ``settle``: the
reader then looks the name up again.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable

import structlog

from dstore.errors import DstoreError
from dstore.master.jobs import PeriodicJob
from dstore.master.metadata import DeadChunk, MetadataStore
from dstore.master.replicas import Replicas

log = structlog.get_logger("dstore.reaper")

SETTLE = 2.0  # seconds a dead version is left alone (and may still be pinned)
PIN_TTL = 10.0  # seconds a pin row lasts unless renewed: how long a dead gateway's pins hold


class ReadPins:
    """Versions that downloads are reading right now. ``meta``: an engine several
    gateways share, where each pin is also a row of ``holder``'s (renewed by
    ``renew``); None: this gateway is the only one, and its memory is enough."""

    def __init__(
        self,
        meta: MetadataStore | None = None,
        holder: str = "",
        *,
        ttl: float = PIN_TTL,
        settle: float = SETTLE,
    ) -> None:
        self.meta = meta
        self.holder = holder
        self.ttl = ttl
        self.settle = settle
        self.refused = 0  # pins refused: the version had died too long before
        self._counts: Counter[int] = Counter()
        # versions with a row, to the monotonic time up to which it surely lasts
        self._rows: dict[int, float] = {}

    def __repr__(self) -> str:
        return f"<ReadPins {sum(self._counts.values())} readers of {len(self._counts)} versions>"

    async def take(self, version_id: int) -> bool:
        """Pin a version for a download (``release`` it after); False if it cannot be
        pinned any more (dead for longer than ``settle``): look the name up again."""
        self._counts[version_id] += 1  # at once: the local reaper sees it before any await
        if self.meta is None or self._rows.get(version_id, 0.0) > time.monotonic():
            return True
        asked = time.monotonic()
        try:
            pinned = await self.meta.pin(self.holder, version_id, self.ttl, self.settle)
        except BaseException:
            self.release(version_id)
            raise
        if not pinned:
            self.refused += 1
            self.release(version_id)
            return False
        self._rows[version_id] = max(self._rows.get(version_id, 0.0), asked + self.ttl / 2)
        return True

    def release(self, version_id: int) -> None:
        self._counts[version_id] -= 1
        if not self._counts[version_id]:
            del self._counts[version_id]

    def pinned(self, version_id: int) -> bool:
        return self._counts[version_id] > 0  # a Counter gives 0 for an unknown version

    async def renew(self) -> None:
        """Push the rows of the versions still read further out (a row of a version no
        longer read runs out by itself, ``ttl`` after its last renewal)."""
        if self.meta is None:
            return
        now = time.monotonic()
        self._rows = {v: until for v, until in self._rows.items() if until > now}
        reading = list(self._counts)
        if reading:
            await self.meta.renew_pins(self.holder, reading, self.ttl)
            for version_id in reading:
                self._rows[version_id] = now + self.ttl / 2


class PinKeeper(PeriodicJob):
    """Renews this gateway's pin rows, every quarter of their lifetime."""

    NAME = "pin-keeper"

    def __init__(self, pins: ReadPins) -> None:
        super().__init__(pins.ttl / 4)
        self.pins = pins

    async def cycle(self) -> None:
        try:
            await self.pins.renew()
        except DstoreError as exc:  # the next round tries again, well within the lifetime
            log.warning("read_pins_not_renewed", error=str(exc))


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
        settle: float = SETTLE,
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
        ready = [
            c
            for c in dead
            if not (c.pinned or self.pins.pinned(c.version_id)) or c.dead_for > self.grace
        ]
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
