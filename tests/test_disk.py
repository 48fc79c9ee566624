"""The volumes' writer thread (storage/disk.py): calls run in order, in one thread, to
their end even when a caller goes away; errors reach the caller."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from dstore.storage.disk import ALIGN, BufferPool, DiskThread


async def test_calls_run_in_order_on_one_thread_and_errors_reach_the_caller() -> None:
    worker = DiskThread("test-disk")
    seen: list[tuple[int, str]] = []

    def record(i: int) -> int:
        time.sleep(0.001 * (5 - i))  # later calls are quicker: order is not by luck
        seen.append((i, threading.current_thread().name))
        return i * i

    results = await asyncio.gather(*(worker.run(record, i) for i in range(5)))
    assert results == [0, 1, 4, 9, 16]
    assert seen == [(i, "test-disk") for i in range(5)]

    def fail() -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        await worker.run(fail)
    assert await worker.run(record, 3) == 9  # the thread outlives a failed call
    assert worker.calls == 7 and "running" in repr(worker)
    await worker.stop()
    assert "idle" in repr(worker)
    assert "test-disk" not in [t.name for t in threading.enumerate()]


async def test_a_call_whose_caller_is_cancelled_still_runs_to_its_end() -> None:
    worker = DiskThread("test-disk-cancel")
    started, finished = threading.Event(), threading.Event()

    def slow() -> None:
        started.set()
        time.sleep(0.1)
        finished.set()

    task = asyncio.create_task(worker.run(slow))
    await asyncio.to_thread(started.wait, 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not finished.is_set()
    await worker.stop()  # waits for the call handed over
    assert finished.is_set()


def test_a_pooled_buffer_is_reused_only_once_no_view_of_it_is_alive() -> None:
    pool = BufferPool(2 * ALIGN, keep=2)
    first = pool.take()
    assert len(first) == 2 * ALIGN
    address = id(first)
    pool.give(first)
    del first
    again = pool.take()
    assert id(again) == address  # touched memory is reused
    view = memoryview(again)[10:20]  # a transport may still hold a piece of it
    pool.give(again)
    del again
    other = pool.take()
    assert id(other) != address
    pool.give(other)
    del other, view
    assert id(pool.take()) == address  # free again once the view is gone
    for extra in [BufferPool(ALIGN, keep=0).take() for _ in range(5)]:
        pool.give(extra)
    assert len(pool._idle) == pool.keep  # the rest are let go
