"""A global bound on the chunk bytes the gateway holds for uploads in flight."""

from __future__ import annotations

import asyncio
from collections import deque

from dstore.errors import Overloaded


class MemoryBudget:
    """Bytes granted first-come first-served; a request that cannot be granted within
    ``wait`` seconds raises ``Overloaded`` (the HTTP layer answers 503)."""

    def __init__(self, limit: int, wait: float) -> None:
        self.limit = limit
        self.wait = wait
        self.in_use = 0
        self.peak = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    def __repr__(self) -> str:
        return f"<MemoryBudget {self.in_use}/{self.limit} bytes, {len(self._waiters)} waiting>"

    async def acquire(self, n: int) -> None:
        if n > self.limit:
            raise Overloaded(f"{n} bytes exceed the whole memory budget")
        if not self._waiters and self.in_use + n <= self.limit:
            self._take(n)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (n, future)
        self._waiters.append(entry)
        try:
            async with asyncio.timeout(self.wait):
                await future
        except BaseException as exc:
            if entry in self._waiters:
                self._waiters.remove(entry)
            if future.done() and not future.cancelled():
                self.release(n)  # granted just as we gave up: hand it on
            if isinstance(exc, TimeoutError):
                raise Overloaded("the gateway is busy: no memory for another chunk") from exc
            raise

    def try_acquire(self, n: int, *, keep_free: int = 0) -> bool:
        """Take ``n`` bytes only if they are free now, with ``keep_free`` more to spare,
        and nobody is waiting."""
        if self._waiters or self.in_use + n + keep_free > self.limit:
            return False
        self._take(n)
        return True

    def _take(self, n: int) -> None:
        self.in_use += n
        self.peak = max(self.peak, self.in_use)

    def release(self, n: int) -> None:
        self.in_use -= n
        assert self.in_use >= 0, "memory budget released more than it granted"
        while self._waiters:
            size, future = self._waiters[0]
            if future.done():
                self._waiters.popleft()
                continue
            if self.in_use + size > self.limit:
                break
            self._waiters.popleft()
            self._take(size)
            future.set_result(None)
