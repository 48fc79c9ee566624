"""The gateway's read cache of small chunks: bounded, LRU, and never a stale byte."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable

import pytest

from dstore.gateway import keys
from dstore.gateway.cache import ChunkCache
from tests.conftest import LocalCluster, chunk_files, wait_for

CHUNK = 64 * 1024
MakeCluster = Callable[..., Awaitable[LocalCluster]]


def test_cache_evicts_least_recently_used_within_its_capacity() -> None:
    cache = ChunkCache(1600, max_entry=100)
    for i in range(16):
        cache.put(f"c{i}", bytes(100))
    assert cache.used == 1600 and len(cache) == 16
    assert cache.get("c0") is not None  # c0 is now the most recent
    cache.put("c16", bytes(100))
    assert cache.get("c1") is None and cache.get("c0") is not None
    assert cache.evictions == 1 and cache.used == 1600
    assert (cache.hits, cache.misses) == (2, 1)


def test_cache_refuses_empty_and_oversized_chunks_and_forgets_on_discard() -> None:
    cache = ChunkCache(1600, max_entry=100)
    cache.put("big", bytes(101))
    cache.put("empty", b"")
    assert len(cache) == 0 and not cache.admits(101) and not cache.admits(0)
    cache.put("a", b"x" * 10)
    cache.put("a", b"y" * 10)  # a chunk id always means the same bytes: first one kept
    assert cache.get("a") == b"x" * 10
    cache.discard("a")
    cache.discard("never")
    assert cache.used == 0 and cache.get("a") is None


def test_cache_of_size_zero_keeps_nothing() -> None:
    cache = ChunkCache(0)
    cache.put("a", b"x")
    assert len(cache) == 0 and not cache.admits(1)


def test_a_chunk_written_is_kept_only_while_there_is_room_to_spare() -> None:
    cache = ChunkCache(1600, max_entry=100)
    cache.offer("w1", [memoryview(b"a" * 60), memoryview(b"b" * 40)])
    assert cache.get("w1") == b"a" * 60 + b"b" * 40 and cache.used == 100
    for i in range(15):
        cache.put(f"r{i}", bytes(100))
    cache.offer("w2", [b"x" * 10])  # full: a write never pushes out what was read
    assert cache.get("w2") is None and cache.evictions == 0
    cache.offer("big", [bytes(101)])
    cache.offer("w1", [b"other"])  # a chunk id always means the same bytes
    assert cache.get("w1") == b"a" * 60 + b"b" * 40 and cache.used == 1600
    cache.put("r15", bytes(100))  # a read chunk does evict, the least recently used
    assert cache.get("r0") is None and cache.evictions == 1


async def test_a_small_file_written_or_read_comes_from_the_cache(
    make_cluster: MakeCluster,
) -> None:
    cluster = await make_cluster(cache_size=4 << 20)
    data = os.urandom(5000)
    await cluster.put("hot", data)
    cache = cluster.app[keys.DOWNLOADER].cache
    assert len(cache) == 1  # the upload offered its stored chunk
    assert (await cluster.get("hot"))[1] == data
    assert (cache.hits, len(cache)) == (1, 1)
    cache.discard(cluster.app[keys.LOOKUP_CACHE].get("hot").chunks[0].chunk_id)  # type: ignore[union-attr]
    assert (await cluster.get("hot"))[1] == data  # a miss, read from a node: kept again
    assert (cache.hits, len(cache)) == (1, 1)
    # the replicas vanish from the nodes: only the cache can still answer
    for node in cluster.nodes:
        for chunk in chunk_files(node.config.data_dir):
            chunk.remove()
    response, body = await cluster.get("hot")
    assert response.status == 200 and body == data and cache.hits == 2
    response, body = await cluster.get("hot", headers={"Range": "bytes=100-199"})
    assert response.status == 206 and body == data[100:200]


async def test_overwrite_and_delete_are_seen_at_once_with_the_cache(
    make_cluster: MakeCluster,
) -> None:
    # inline off: files this small would live in the metadata store, not the chunk cache
    cluster = await make_cluster(cache_size=4 << 20, inline_max=0)
    cache = cluster.app[keys.DOWNLOADER].cache
    await cluster.put("f", b"one" * 100)
    assert (await cluster.get("f"))[1] == b"one" * 100
    await cluster.put("f", b"two" * 100)
    assert (await cluster.get("f"))[1] == b"two" * 100
    assert len(cache) == 2
    assert cluster.session is not None
    async with cluster.session.delete(cluster.file_url("f")) as response:
        assert response.status == 204
    assert (await cluster.get("f"))[0].status == 404
    await cluster.wait_reaped()
    await wait_for(lambda: len(cache) == 0)  # reclaimed chunks leave the cache too
    assert cache.used == 0


async def test_large_chunks_bypass_a_small_cache(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster(cache_size=512 << 10)  # keeps chunks up to 32 KiB
    cache = cluster.app[keys.DOWNLOADER].cache
    data = os.urandom(3 * CHUNK)
    await cluster.put("big", data)
    for _ in range(2):
        assert (await cluster.get("big"))[1] == data
    assert len(cache) == 0 and cache.hits == 0


@pytest.mark.parametrize("size", [1, CHUNK - 1])
async def test_cached_reads_survive_a_gateway_restart_as_misses(
    make_cluster: MakeCluster, size: int
) -> None:
    cluster = await make_cluster(cache_size=4 << 20, inline_max=0)
    data = os.urandom(size)
    await cluster.put("r", data)
    assert (await cluster.get("r"))[1] == data
    await cluster.restart_gateway()
    cache = cluster.app[keys.DOWNLOADER].cache
    assert len(cache) == 0
    assert (await cluster.get("r"))[1] == data and len(cache) == 1
