"""Background jobs of the chunk master: each is one owned task with start/stop, that runs
a cycle every ``interval`` seconds or at once when woken, and logs (then survives) any
failure of a cycle."""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Callable
from typing import ClassVar

import structlog

log = structlog.get_logger("dstore.jobs")


class PeriodicJob(abc.ABC):
    NAME: ClassVar[str] = "job"

    def __init__(self, interval: float, *, after_wake: float = 0.0, run_at_start: bool = True):
        self.interval = interval
        self.after_wake = after_wake  # pause between a wake-up and the cycle it triggers
        self.run_at_start = run_at_start
        self.cycles = 0
        # asked before each cycle, if set: a job that runs on one gateway only (the
        # leader) skips its cycles while this says no
        self.gate: Callable[[], bool] | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"dstore-{self.NAME}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def wake(self) -> None:
        self._wake.set()

    @abc.abstractmethod
    async def cycle(self) -> None:
        """One round of work."""

    async def _loop(self) -> None:
        if not self.run_at_start:
            await self._sleep()
        while True:
            if self.gate is None or self.gate():
                try:
                    await self.cycle()
                except Exception:
                    log.exception("job_cycle_failed", job=self.NAME)  # the next cycle retries
                self.cycles += 1
            await self._sleep()

    async def _sleep(self) -> None:
        self._wake.clear()
        try:
            async with asyncio.timeout(self.interval):
                await self._wake.wait()
            await asyncio.sleep(self.after_wake)
        except TimeoutError:
            pass
