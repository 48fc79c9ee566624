"""Blocking disk helpers shared by chunk files and volumes (called in worker threads), and
the one worker thread that runs the volumes' writes."""

from __future__ import annotations

import asyncio
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

IOV_MAX = 1024  # buffers per writev call


def write_all(fd: int, pieces: list[bytes | memoryview], offset: int | None = None) -> None:
    """Write every piece, in order, with as few ``writev`` calls as the kernel allows; at
    ``offset`` (``pwritev``) if given, else at the file position."""
    views = [memoryview(p).cast("B") for p in pieces if len(p)]
    while views:
        if offset is None:
            written = os.writev(fd, views[:IOV_MAX])
        else:
            written = os.pwritev(fd, views[:IOV_MAX], offset)
            offset += written
        while written and views:
            if written >= len(views[0]):
                written -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][written:]
                written = 0


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (creations, renames, removals) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DiskThread:
    """One long-lived worker thread that runs blocking calls in order, for a writer that
    hands it one call at a time (the volumes' group commits). Handing a call over costs
    about two thirds of an ``asyncio.to_thread`` hop (no executor future, no condition
    variable, no executor bookkeeping: measured in docs/benchmarks.md). As with
    ``to_thread``, a call runs to its end even if its caller is cancelled meanwhile."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls = 0
        self._queue: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        state = "running" if self._thread is not None else "idle"
        return f"<DiskThread {self.name} {state}, {self.calls} calls>"

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name=self.name, daemon=True)
            self._thread.start()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put(_Call(fn, args, loop, future))
        return await future

    async def stop(self) -> None:
        """Let the calls handed over finish, then end the thread."""
        if self._thread is not None:
            self._queue.put(None)
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    def _work(self) -> None:
        while (call := self._queue.get()) is not None:
            try:
                outcome, ok = call.fn(*call.args), True
            except BaseException as exc:  # handed to the caller, whatever it is
                outcome, ok = exc, False
            self.calls += 1
            call.loop.call_soon_threadsafe(_settle, call.future, ok, outcome)


@dataclass(frozen=True, slots=True)
class _Call:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]


def _settle(future: asyncio.Future[Any], ok: bool, outcome: Any) -> None:
    if future.cancelled():
        return
    if ok:
        future.set_result(outcome)
    else:
        future.set_exception(outcome)
