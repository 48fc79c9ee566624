"""Seeded random histories of concurrent PUT/GET/DELETE against a few names, checked
after the fact: every GET returns exactly one version that was written (byte for byte),
and never one that had already been replaced before the GET began."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pytest

from dstore.gateway import keys
from tests.conftest import LocalCluster

CHUNK = 64 * 1024
ABSENT = "absent"


@dataclass
class Write:
    name: str
    value: str  # the version's id, or ABSENT for a delete
    start: float
    end: float


@dataclass
class Read:
    name: str
    value: str
    start: float
    end: float


def payload(value: str, size: int, rng: random.Random) -> bytes:
    head = value.encode().ljust(32, b".")
    return (head + rng.randbytes(max(size - 32, 0)))[: max(size, 32)]


def violations(writes: list[Write], reads: list[Read]) -> list[str]:
    """A read of value v is justified by a write c of v (or the initial absence) that
    began before the read ended, unless another write certainly came after c (began
    after c ended) and finished before the read began."""
    problems = []
    for read in reads:
        same = [w for w in writes if w.name == read.name]
        candidates = [w for w in same if w.value == read.value]
        if read.value == ABSENT:
            candidates.append(Write(read.name, ABSENT, float("-inf"), float("-inf")))
        justified = any(
            c.start < read.end
            and not any(w.start > c.end and w.end < read.start for w in same if w is not c)
            for c in candidates
        )
        if not justified:
            problems.append(f"{read} is not justified by {candidates}")
    return problems


def test_checker_catches_stale_and_unknown_reads() -> None:
    w1 = Write("n", "v1", 0, 1)
    w2 = Write("n", "v2", 2, 3)
    assert violations([w1, w2], [Read("n", "v2", 3.5, 4)]) == []
    assert violations([w1, w2], [Read("n", "v1", 2.5, 4)]) == []  # w2 may not be done
    assert violations([w1, w2], [Read("n", "v1", 3.5, 4)])  # stale: w2 finished first
    assert violations([w1], [Read("n", "v9", 0, 9)])  # never written
    assert violations([w1], [Read("n", ABSENT, 2, 3)])  # w1 done before the read
    assert violations([w1], [Read("n", ABSENT, 0.5, 3)]) == []


@pytest.mark.parametrize("cache_size", [0, 1 << 20], ids=["no-cache", "read-cache"])
@pytest.mark.parametrize("seed", [1, 2])
async def test_random_concurrent_histories_are_consistent(
    make_cluster: Callable[..., Awaitable[LocalCluster]], seed: int, cache_size: int
) -> None:
    cluster = await make_cluster(cache_size=cache_size)
    names = ["alpha", "beta", "gamma"]
    writes: list[Write] = []
    reads: list[Read] = []
    contents: dict[str, bytes] = {}
    deadline = time.monotonic() + 30

    async def client(cid: int) -> None:
        rng = random.Random(seed * 100 + cid)
        assert cluster.session is not None
        for op_index in range(25):
            if time.monotonic() > deadline:
                return
            name = rng.choice(names)
            op = rng.choices(["put", "get", "delete"], weights=[4, 5, 1])[0]
            start = time.monotonic()
            if op == "put":
                value = f"c{cid}-{op_index}"
                data = payload(value, rng.choice([0, 1, CHUNK - 1, CHUNK + 1, 3 * CHUNK]), rng)
                contents[value] = data
                response = await cluster.put(name, data)
                if response.status == 201:
                    writes.append(Write(name, value, start, time.monotonic()))
            elif op == "delete":
                async with cluster.session.delete(cluster.file_url(name)) as response:
                    if response.status == 204:
                        writes.append(Write(name, ABSENT, start, time.monotonic()))
            else:
                response, body = await cluster.get(name)
                end = time.monotonic()
                if response.status == 404:
                    reads.append(Read(name, ABSENT, start, end))
                else:
                    assert response.status == 200
                    value = body[:32].rstrip(b".").decode()
                    assert contents.get(value) == body, "a GET returned a mix or a torn file"
                    reads.append(Read(name, value, start, end))

    await asyncio.gather(*(client(c) for c in range(5)))
    assert len(reads) > 20 and len(writes) > 20
    assert violations(writes, reads) == []
    if cache_size:  # reads went through the cache (hits depend on the interleaving)
        cache = cluster.app[keys.DOWNLOADER].cache
        assert cache.hits + cache.misses > 0
    await cluster.wait_reaped()
