"""Calls that arrive together go to the database together: the PostgreSQL engine's
answer to a round trip per small request (SQLite's group commit is the other engine's).

While ``lanes`` batches run, arriving calls wait; when one ends, the next batch takes all
that waited (at most ``limit``). Under load a batch holds as many calls as arrived during
one round trip, so the trips per call fall as load rises; an idle engine sends a call at
once. A batch is sent after each of its calls arrived, so what it reads is at least as
new as each call, as a call of its own would have read.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

K = TypeVar("K")
R = TypeVar("R")


class Batcher(Generic[K, R]):
    """``run(items)`` does a batch: one outcome per item, in order, each a result or the
    exception that item's caller gets; an exception from ``run`` itself goes to every
    caller of the batch."""

    def __init__(
        self,
        run: Callable[[list[K]], Awaitable[list[R | BaseException]]],
        *,
        limit: int = 64,
        lanes: int = 1,
    ) -> None:
        self.run = run
        self.limit = limit
        self.lanes = lanes
        self.batches = 0
        self.calls = 0
        self._waiting: list[tuple[K, asyncio.Future[R]]] = []
        # the batches being sent, with their calls
        self._running: dict[asyncio.Task[None], list[tuple[K, asyncio.Future[R]]]] = {}
        self._closed = False

    def __repr__(self) -> str:
        return f"<Batcher {self.calls} calls in {self.batches} batches>"

    async def submit(self, item: K) -> R:
        if self._closed:
            raise _closed()
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        self.calls += 1
        if len(self._running) < self.lanes:
            self._start()
        return await future

    def _start(self) -> None:
        batch, self._waiting = self._waiting[: self.limit], self._waiting[self.limit :]
        self.batches += 1
        task = asyncio.create_task(self._do(batch), name="dstore-metadata-batch")
        self._running[task] = batch

    async def _do(self, batch: list[tuple[K, asyncio.Future[R]]]) -> None:
        try:
            try:
                outcomes = await self.run([item for item, _ in batch])
            except Exception as exc:  # (each caller gets it)
                outcomes = [exc] * len(batch)
            for (_, future), outcome in zip(batch, outcomes, strict=True):
                if future.done():  # its caller gave up
                    continue
                if isinstance(outcome, BaseException):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)
        finally:
            task = asyncio.current_task()
            if task is not None:
                self._running.pop(task, None)
            if self._waiting and len(self._running) < self.lanes and not self._closed:
                self._start()

    async def close(self) -> None:
        """Stop the batches being sent; their calls, and those waiting, fail."""
        self._closed = True
        running = dict(self._running)
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        for _, future in [*(call for batch in running.values() for call in batch), *self._waiting]:
            if not future.done():
                future.set_exception(_closed())
        self._waiting = []


def _closed() -> Exception:
    from dstore.errors import MetadataUnavailable

    return MetadataUnavailable("metadata store is closed")
