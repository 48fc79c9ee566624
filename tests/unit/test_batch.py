"""The batcher the PostgreSQL engine sends lookups and small commits through: calls that
arrive while a batch runs go together in the next one, each gets its own outcome, and
no call goes in a batch sent before it arrived."""

from __future__ import annotations

import asyncio

import pytest

from dstore.errors import FileNotFound, MetadataUnavailable
from dstore.master.metadata.batch import Batcher


async def test_calls_that_arrive_together_go_together_each_with_its_outcome() -> None:
    sent: list[list[int]] = []
    gate = asyncio.Event()

    async def run(items: list[int]) -> list[int | BaseException]:
        sent.append(list(items))
        await gate.wait()
        return [FileNotFound(str(i)) if i < 0 else i * 10 for i in items]

    batcher: Batcher[int, int] = Batcher(run, lanes=1, limit=3)
    first = asyncio.create_task(batcher.submit(1))
    await _turns()
    assert sent == [[1]]  # an idle batcher sends at once
    rest = [asyncio.create_task(batcher.submit(i)) for i in (2, -3, 4, 5)]
    await _turns()
    assert sent == [[1]]  # they wait for the batch in flight: none joins it late
    gate.set()
    assert await first == 10
    results = await asyncio.gather(*rest, return_exceptions=True)
    assert results[0] == 20 and isinstance(results[1], FileNotFound) and results[2:] == [40, 50]
    assert sent == [[1], [2, -3, 4], [5]]  # (at most ``limit`` a batch)
    assert (batcher.calls, batcher.batches) == (5, 3)


async def test_a_failed_batch_fails_each_of_its_calls_and_the_next_batch_runs() -> None:
    attempts = 0

    async def run(items: list[str]) -> list[str | BaseException]:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise MetadataUnavailable("away")
        return [item.upper() for item in items]

    batcher: Batcher[str, str] = Batcher(run)
    results = await asyncio.gather(batcher.submit("a"), batcher.submit("b"), return_exceptions=True)
    assert any(isinstance(r, MetadataUnavailable) for r in results)
    assert await batcher.submit("c") == "C"


async def test_a_caller_that_gives_up_leaves_the_others_their_answers() -> None:
    gate = asyncio.Event()

    async def run(items: list[int]) -> list[int | BaseException]:
        await gate.wait()
        return items

    batcher: Batcher[int, int] = Batcher(run, lanes=1)
    blocker = asyncio.create_task(batcher.submit(0))
    await _turns()
    quitter = asyncio.create_task(batcher.submit(1))
    stayer = asyncio.create_task(batcher.submit(2))
    await _turns()
    quitter.cancel()
    gate.set()
    assert await blocker == 0 and await stayer == 2
    with pytest.raises(asyncio.CancelledError):
        await quitter


async def test_closing_fails_the_waiting_calls_and_refuses_new_ones() -> None:
    async def run(items: list[int]) -> list[int | BaseException]:
        await asyncio.sleep(60)
        return items

    batcher: Batcher[int, int] = Batcher(run, lanes=1)
    calls = [asyncio.create_task(batcher.submit(i)) for i in range(3)]
    await _turns()
    await batcher.close()
    for call in calls:
        with pytest.raises(MetadataUnavailable):
            await call
    with pytest.raises(MetadataUnavailable):
        await batcher.submit(9)


async def _turns() -> None:
    """Let every task that can run, run."""
    for _ in range(5):
        await asyncio.sleep(0)
