"""One long-lived worker thread that runs blocking calls in the order they were handed
over: the volumes' writer on a storage node, and the SQLite metadata engine (whose calls
it hands over in groups, to commit together).

Handing a call over costs about two thirds of an ``asyncio.to_thread`` hop (no executor
future, no condition variable, no executor bookkeeping: measured in
docs/benchmarks.md). As with ``to_thread``, a call runs to its end even if its caller is
cancelled meanwhile; its outcome is then dropped.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Call:
    """A call handed to the thread, and where its outcome goes."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]


Outcome = tuple[bool, Any]  # (ok, the result or the exception)
GroupRunner = Callable[[list[Call]], list[Outcome]]


def run_each(group: list[Call]) -> list[Outcome]:
    """Run a group's calls one after the other: a failure stays with its own call."""
    outcomes: list[Outcome] = []
    for call in group:
        try:
            outcomes.append((True, call.fn(*call.args)))
        except BaseException as exc:  # handed to the caller, whatever it is
            outcomes.append((False, exc))
    return outcomes


class WorkerThread:
    """Calls queued while the thread is busy are run together as one group of up to
    ``max_group`` by ``run_group`` (by default one by one); their callers are woken with
    one hop per event loop for the whole group."""

    def __init__(self, name: str, *, max_group: int = 1, run_group: GroupRunner = run_each):
        self.name = name
        self.max_group = max_group
        self.calls = 0
        self.groups = 0
        self._run_group = run_group
        self._queue: queue.SimpleQueue[Call | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        state = "running" if self._thread is not None else "idle"
        return f"<WorkerThread {self.name} {state}, {self.calls} calls in {self.groups} groups>"

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name=self.name, daemon=True)
            self._thread.start()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        self.start()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put(Call(fn, args, loop, future))
        return await future

    async def stop(self) -> None:
        """Let the calls handed over finish, then end the thread."""
        if self._thread is not None:
            self._queue.put(None)
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    def _work(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            group = [first]
            stop = False
            while len(group) < self.max_group:
                try:
                    call = self._queue.get_nowait()
                except queue.Empty:
                    break
                if call is None:
                    stop = True
                    break
                group.append(call)
            outcomes = self._run_group(group)
            self.calls += len(group)
            self.groups += 1
            by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Call, Outcome]]] = {}
            for call, outcome in zip(group, outcomes, strict=True):
                by_loop.setdefault(call.loop, []).append((call, outcome))
            for loop, settled in by_loop.items():
                loop.call_soon_threadsafe(_settle_all, settled)
            if stop:
                return


def _settle_all(settled: list[tuple[Call, Outcome]]) -> None:
    for call, (ok, value) in settled:
        if call.future.cancelled():
            continue  # the caller gave up waiting; the call stands as it was decided
        if ok:
            call.future.set_result(value)
        else:
            call.future.set_exception(value)
