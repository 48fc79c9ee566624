"""The volumes' writer thread (storage/disk.py): calls run in order, in one thread, to
their end even when a caller goes away; errors reach the caller."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

import dstore.storage.chunkstore as chunkstore
from dstore.chunk import checksum, new_chunk_id
from dstore.storage.chunkstore import ChunkReader, ChunkStore
from dstore.storage.disk import ALIGN, BufferPool, to_thread_whole
from dstore.threads import WorkerThread


async def test_calls_run_in_order_on_one_thread_and_errors_reach_the_caller() -> None:
    worker = WorkerThread("test-disk")
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
    worker = WorkerThread("test-disk-cancel")
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
    assert len(pool.idle) == pool.keep  # the rest are let go


T = TypeVar("T")


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


async def test_a_cancel_during_a_whole_hop_is_held_until_the_call_ends_then_raised() -> None:
    started, go = threading.Event(), threading.Event()
    after: list[str] = []

    def slow() -> str:
        started.set()
        go.wait(5)
        return "done"

    async def caller() -> None:
        after.append(await to_thread_whole(slow))
        after.append("ran on to the next await")
        await asyncio.sleep(5)
        after.append("never")

    task = asyncio.create_task(caller())
    await asyncio.to_thread(started.wait, 5)
    task.cancel()
    task.cancel()  # twice: still one cancel raised, and counted twice
    await asyncio.sleep(0.05)
    assert not task.done()  # held while the call runs
    go.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert after == ["done", "ran on to the next await"]
    assert task.cancelling() == 2


async def test_a_timeout_around_a_whole_hop_is_still_a_timeout() -> None:
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.02):
            await to_thread_whole(time.sleep, 0.2)
            await asyncio.sleep(5)
    assert 0.2 <= time.monotonic() - start < 2
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0


async def test_an_error_in_a_whole_hop_reaches_its_caller() -> None:
    with pytest.raises(ZeroDivisionError):
        await to_thread_whole(lambda: 1 // 0)


def blocked(
    fn: Callable[..., T], started: threading.Event, go: threading.Event
) -> Callable[..., T]:
    """``fn``, made to wait in its worker thread until ``go`` (fault injection)."""

    def wrapper(*args: Any, **kwargs: Any) -> T:
        started.set()
        go.wait(5)
        return fn(*args, **kwargs)

    return wrapper


async def one(data: bytes) -> AsyncIterator[bytes]:
    yield data


@pytest.mark.parametrize("size", [3000, 1 << 20, 9 << 20])
async def test_a_reader_cancelled_while_its_chunk_opens_leaves_no_fd_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    """Volume needles, chunk files read through the cache and chunk files read direct
    (and checked at the open, into a pooled buffer)."""
    store = ChunkStore(tmp_path / "s", 1 << 30)
    await store.open()
    data = os.urandom(size)
    chunk_id = new_chunk_id()
    assert await store.write(chunk_id, size, checksum(data), one(data))
    started, go = threading.Event(), threading.Event()
    monkeypatch.setattr(ChunkReader, "open", blocked(ChunkReader.open, started, go))
    monkeypatch.setattr(ChunkReader, "open_needle", blocked(ChunkReader.open_needle, started, go))
    before = open_fds()

    async def read() -> None:
        async with store.reader(chunk_id) as reader:
            async for _ in reader:
                pass

    task = asyncio.create_task(read())
    await asyncio.to_thread(started.wait, 5)
    task.cancel()
    go.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.05)  # (were it left to run on, the thread would be done by now)
    assert open_fds() <= before
    monkeypatch.undo()
    async with store.reader(chunk_id) as reader:  # and the pooled buffer is sound
        assert b"".join([bytes(p) async for p in reader]) == data
    await store.close()


async def test_a_write_cancelled_while_its_chunk_is_stored_is_counted_as_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ChunkStore(tmp_path / "s", 1 << 30)
    await store.open()
    data = os.urandom(1 << 20)
    chunk_id = new_chunk_id()
    started, go = threading.Event(), threading.Event()
    monkeypatch.setattr(chunkstore, "_finish", blocked(chunkstore._finish, started, go))
    before = open_fds()
    task = asyncio.create_task(store.write(chunk_id, len(data), checksum(data), one(data)))
    await asyncio.to_thread(started.wait, 5)
    task.cancel()
    go.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert open_fds() <= before
    # the thread stored it: the store counts it, as a restart would
    assert store.path_of(chunk_id).exists()
    assert (store.used, store.count, store.reserved) == (len(data), 1, 0)
    await store.close()
    again = ChunkStore(store.root, 1 << 30)
    await again.open()
    assert (again.used, again.count) == (len(data), 1)
    assert not list(again.tmp_dir.iterdir())
    await again.close()
