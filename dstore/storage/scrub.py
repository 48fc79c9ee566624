"""The scrubber: re-reads every chunk of a node at a gentle rate, verifies its checksum,
moves corrupt chunks aside and keeps them for the gateway to take (and repair)."""

from __future__ import annotations

import asyncio
import time

import structlog

from dstore.errors import ChunkCorrupt
from dstore.storage.chunkstore import ChunkStore

log = structlog.get_logger("dstore.scrub")

MAX_PENDING = 100_000


class Scrubber:
    def __init__(self, store: ChunkStore, *, rate: float, idle: float = 60.0) -> None:
        self.store = store
        self.rate = rate  # bytes per second
        self.idle = idle  # pause between full passes
        self.bytes_scanned = 0
        self.passes = 0
        self.last_pass: float | None = None
        self.corrupt_found = 0
        self.pending: list[str] = []
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return (
            f"<Scrubber {self.rate:.0f} B/s, {self.passes} passes, {self.bytes_scanned}"
            f" bytes, {self.corrupt_found} corrupt>"
        )

    def start(self) -> None:
        if self.rate > 0:
            self._task = asyncio.create_task(self._loop(), name="dstore-scrubber")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def take(self) -> list[str]:
        taken, self.pending = self.pending, []
        return taken

    async def _loop(self) -> None:
        while True:
            try:
                await self.run_pass()
            except Exception:
                log.exception("scrub_failed")
            await asyncio.sleep(self.idle)

    async def run_pass(self) -> None:
        """One pass over every chunk, throttled to ``rate``."""
        after = ""
        while True:
            page = await self.store.list(after, 500)
            if not page:
                break
            for info in page:
                started = time.monotonic()
                try:
                    size = await self.store.verify(info.chunk_id)
                except ChunkCorrupt as exc:
                    await self._found_corrupt(info.chunk_id, str(exc))
                    size = info.size
                if size is None:
                    continue  # deleted meanwhile
                self.bytes_scanned += size
                await asyncio.sleep(max(0.0, size / self.rate - (time.monotonic() - started)))
            after = page[-1].chunk_id
        self.passes += 1
        self.last_pass = time.time()
        log.info(
            "scrub_pass_done",
            passes=self.passes,
            bytes=self.bytes_scanned,
            corrupt=self.corrupt_found,
        )

    async def _found_corrupt(self, chunk_id: str, why: str) -> None:
        if await self.store.quarantine(chunk_id):
            self.corrupt_found += 1
            if len(self.pending) < MAX_PENDING:
                self.pending.append(chunk_id)
            log.error("chunk_corrupt_moved_aside", chunk=chunk_id, error=why)
