"""The memory budget: bytes granted first come first served, within a wait, and never
more than its limit; nothing leaks when a waiter gives up."""

from __future__ import annotations

import asyncio

import pytest

from dstore.errors import Overloaded
from dstore.gateway.budget import MemoryBudget


async def test_grants_wait_in_order_until_bytes_are_released() -> None:
    budget = MemoryBudget(100, wait=10.0)
    await budget.acquire(60)
    order: list[str] = []

    async def take(name: str, n: int) -> None:
        await budget.acquire(n)
        order.append(name)

    first = asyncio.create_task(take("first", 50))
    await asyncio.sleep(0)
    second = asyncio.create_task(take("second", 10))  # would fit, but waits its turn
    await asyncio.sleep(0)
    assert order == [] and budget.in_use == 60
    budget.release(60)
    await asyncio.gather(first, second)
    assert order == ["first", "second"] and budget.in_use == 60 and budget.peak == 60


async def test_a_waiter_that_runs_out_of_time_is_overloaded_and_takes_nothing() -> None:
    budget = MemoryBudget(10, wait=0.01)
    await budget.acquire(10)
    with pytest.raises(Overloaded):
        await budget.acquire(1)
    budget.release(10)
    assert budget.in_use == 0
    assert budget.try_acquire(10)


async def test_more_than_the_whole_budget_is_refused_at_once() -> None:
    with pytest.raises(Overloaded):
        await MemoryBudget(10, wait=60.0).acquire(11)


async def test_a_cancelled_waiter_granted_as_it_goes_hands_its_bytes_on() -> None:
    budget = MemoryBudget(10, wait=60.0)
    await budget.acquire(10)
    waiter = asyncio.create_task(budget.acquire(10))
    await asyncio.sleep(0)
    budget.release(10)  # granted: its future is set ...
    waiter.cancel()  # ... and it is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert budget.in_use == 0


async def test_try_acquire_keeps_room_and_never_jumps_the_queue() -> None:
    budget = MemoryBudget(100, wait=60.0)
    assert budget.try_acquire(40, keep_free=50)
    assert not budget.try_acquire(20, keep_free=50)
    await budget.acquire(60)
    waiter = asyncio.create_task(budget.acquire(10))
    await asyncio.sleep(0)
    budget.release(5)
    assert not budget.try_acquire(1)  # someone waits
    budget.release(10)
    await waiter
    assert budget.in_use == 95
