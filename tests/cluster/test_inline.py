"""Small files kept inline in the metadata store: no chunk, no node, one transaction."""

from __future__ import annotations

import asyncio
import os
import random
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from dstore.chunk import checksum
from dstore.gateway import keys
from dstore.gateway.cache import inline_key
from dstore.gateway.upload import etag_of
from dstore.master.inline_scrub import InlineScrubber
from dstore.master.metadata import InlineBody, SQLiteMetadataStore
from tests.cluster.test_gateway_api import check_ranges, random_ranges
from tests.conftest import LocalCluster, chunk_files, sqlite_engine, tmp_leftovers, wait_for

MakeCluster = Callable[..., Awaitable[LocalCluster]]
LIMIT = 4096  # the default inline_max


def stored_chunks(cluster: LocalCluster) -> int:
    return sum(len(chunk_files(n.config.data_dir)) for n in cluster.nodes)


async def bodies(cluster: LocalCluster) -> int:
    return await cluster.app[keys.META].inline_count()


def reserved(cluster: LocalCluster) -> int:
    return sum(m.reserved for m in cluster.app[keys.CLUSTER].members.values())


@pytest.mark.parametrize("size", [0, 1, LIMIT - 1, LIMIT, LIMIT + 1])
async def test_files_up_to_inline_max_never_reach_a_node(cluster: LocalCluster, size: int) -> None:
    assert cluster.app[keys.CONFIG].inline_max == LIMIT
    data = os.urandom(size)
    response = await cluster.put("f", data)
    assert response.status == 201
    body = await response.json()
    inline = size <= LIMIT
    assert body["size"] == size and body["chunks"] == (0 if inline else 1)
    # the same ETag whether a file is kept inline or in a chunk
    assert body["etag"] == etag_of([checksum(data)] if size else [])
    assert stored_chunks(cluster) == (0 if inline else 2)
    assert await bodies(cluster) == (1 if inline else 0)
    assert reserved(cluster) == 0
    for attempt in range(2):  # from the store, then from the lookup cache
        got, read = await cluster.get("f")
        assert got.status == 200 and read == data, attempt
        assert got.headers["ETag"] == body["etag"]
        assert got.headers["Content-Length"] == str(size)
    cluster.app[keys.LOOKUP_CACHE].clear()
    assert (await cluster.get("f"))[1] == data


async def test_without_content_length_and_in_pieces(cluster: LocalCluster) -> None:
    data = os.urandom(3000)

    async def pieces() -> Any:
        for at in range(0, len(data), 700):
            yield data[at : at + 700]
            await asyncio.sleep(0)

    response = await cluster.put("p", pieces())
    assert response.status == 201 and (await response.json())["chunks"] == 0
    assert (await cluster.get("p"))[1] == data and stored_chunks(cluster) == 0
    assert (await cluster.put("q", os.urandom(LIMIT + 1))).status == 201
    assert cluster.session is not None
    async with cluster.session.get(f"{cluster.url}/metrics") as metrics:
        text = await metrics.text()
    assert 'dstore_files_stored_total{kind="inline"} 1' in text
    assert 'dstore_files_stored_total{kind="chunked"} 1' in text


async def test_inline_max_zero_sends_every_byte_to_the_nodes(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster(inline_max=0)
    response = await cluster.put("one", b"x")
    assert (await response.json())["chunks"] == 1 and stored_chunks(cluster) == 2
    response = await cluster.put("empty", b"")  # an empty file has no bytes to send anyway
    assert (await response.json())["chunks"] == 0 and stored_chunks(cluster) == 2
    assert (await cluster.get("empty"))[1] == b"" and (await cluster.get("one"))[1] == b"x"


async def test_a_file_longer_than_a_chunk_is_never_inline(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster(chunk_size=1024)  # inline_max (4 KiB) is above the chunk
    data = os.urandom(3000)
    response = await cluster.put("f", data)
    assert (await response.json())["chunks"] == 3 and await bodies(cluster) == 0
    assert (await cluster.get("f"))[1] == data
    small = os.urandom(1000)
    assert (await (await cluster.put("s", small)).json())["chunks"] == 0
    assert (await cluster.get("s"))[1] == small


async def test_ranges_head_and_conditionals(cluster: LocalCluster) -> None:
    data = os.urandom(LIMIT)
    etag = (await (await cluster.put("r", data)).json())["etag"]
    await check_ranges(cluster, "r", data, random_ranges(random.Random(7), len(data), 20))
    response, body = await cluster.get("r", headers={"Range": f"bytes={LIMIT}-"})
    assert response.status == 416 and response.headers["Content-Range"] == f"bytes */{LIMIT}"
    assert cluster.session is not None
    async with cluster.session.head(cluster.file_url("r")) as head:
        assert head.status == 200 and head.headers["Content-Length"] == str(LIMIT)
        assert head.headers["ETag"] == etag and await head.read() == b""
    response, body = await cluster.get("r", headers={"If-None-Match": etag})
    assert response.status == 304 and body == b""
    response = await cluster.put("r", b"other", headers={"If-None-Match": "*"})
    assert response.status == 412
    assert (await cluster.get("r"))[1] == data


async def test_content_type_and_checksums(cluster: LocalCluster) -> None:
    data = b"hello, inline"
    response = await cluster.put(
        "t", data, headers={"Content-Type": "text/plain", "X-Checksum-Sha256": "00" * 32}
    )
    assert response.status == 400
    assert await bodies(cluster) == 0 and (await cluster.get("t"))[0].status == 404
    response = await cluster.put("t", data, headers={"Content-Type": "text/plain"})
    assert response.status == 201
    got, body = await cluster.get("t")
    assert body == data and got.headers["Content-Type"] == "text/plain"


async def test_overwrite_across_inline_and_chunks_and_delete_leave_nothing(
    make_cluster: MakeCluster,
) -> None:
    cluster = await make_cluster(cache_size=4 << 20)
    small, large, tiny = os.urandom(100), os.urandom(200_000), os.urandom(10)
    cache = cluster.app[keys.DOWNLOADER].cache
    for data in (small, large, tiny):
        assert (await cluster.put("f", data)).status == 201
        assert (await cluster.get("f"))[1] == data
    assert len(cache) >= 3  # the bytes of every version were read through it
    await cluster.wait_reaped()  # the large version's chunks are gone from the nodes
    assert stored_chunks(cluster) == 0
    await wait_bodies(cluster, 1)  # the replaced inline body is gone from the store
    current = cluster.app[keys.LOOKUP_CACHE].get("f")
    assert current is not None
    # and from the read cache: only the live version's bytes are kept
    assert cache.ids() == [inline_key(current.version_id)]
    assert cluster.session is not None
    async with cluster.session.get(f"{cluster.url}/v1/cluster") as response:
        totals = await response.json()
    assert (totals["files"], totals["bytes"]) == (1, 10)
    async with cluster.session.delete(cluster.file_url("f")) as response:
        assert response.status == 204
    assert (await cluster.get("f"))[0].status == 404
    await wait_bodies(cluster, 0)
    assert len(cache) == 0
    assert reserved(cluster) == 0 and not tmp_leftovers(cluster.nodes)


async def wait_bodies(cluster: LocalCluster, count: int) -> None:
    for _ in range(100):
        if await bodies(cluster) == count:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{await bodies(cluster)} inline bodies kept, {count} expected")


async def test_inline_files_survive_a_gateway_restart(cluster: LocalCluster) -> None:
    files = {f"dir/{i}": os.urandom(i * 100) for i in range(20)}
    for name, data in files.items():
        assert (await cluster.put(name, data)).status == 201
    await cluster.restart_gateway()
    for name, data in files.items():
        assert (await cluster.get(name))[1] == data
    assert cluster.session is not None
    async with cluster.session.get(f"{cluster.url}/v1/files?prefix=dir/") as response:
        listed = (await response.json())["files"]
    assert sorted(f["name"] for f in listed) == sorted(files)
    assert {f["name"]: f["size"] for f in listed} == {n: len(d) for n, d in files.items()}


async def test_a_corrupt_inline_body_is_never_served(cluster: LocalCluster) -> None:
    data = os.urandom(1000)
    await cluster.put("rot", data)
    await cluster.stop_gateway()
    db = sqlite3.connect(cluster.gateway_settings["data_dir"] / "meta.db")
    with db:
        (stored,) = db.execute("SELECT data FROM bodies").fetchone()
        flipped = bytes([stored[0] ^ 1]) + stored[1:]
        db.execute("UPDATE bodies SET data = ?", (flipped,))
    db.close()
    await cluster.start_gateway(inline_scrub_interval=0.05)
    scrubber = cluster.app[keys.INLINE_SCRUBBER]
    await wait_for(lambda: scrubber.passes >= 1)  # found before anyone asked for it
    assert list(scrubber.corrupt.values()) == ["rot"]
    assert cluster.session is not None
    async with cluster.session.get(f"{cluster.url}/metrics") as metrics:
        assert "dstore_inline_corrupt_files 1" in await metrics.text()
    response, body = await cluster.get("rot")
    assert response.status == 500 and b'"code":"chunk_corrupt"' in body
    assert data not in body and flipped not in body
    ranged, part = await cluster.get("rot", headers={"Range": "bytes=0-9"})
    assert ranged.status == 500 and part[:10] != flipped[:10]


async def test_a_full_metadata_disk_gives_507_and_keeps_nothing(cluster: LocalCluster) -> None:
    meta = cluster.app[keys.META]
    assert (await cluster.put("before", b"x" * 10)).status == 201

    def fill(db: sqlite3.Connection) -> None:  # the store may not grow by another page
        (pages,) = db.execute("PRAGMA page_count").fetchone()
        db.execute(f"PRAGMA max_page_count = {pages}")

    await sqlite_engine(meta).raw(fill)
    response = await cluster.put("big", os.urandom(LIMIT))
    assert response.status == 507
    assert (await response.json())["error"]["code"] == "out_of_space"
    await sqlite_engine(meta).raw(lambda db: db.execute("PRAGMA max_page_count = 1073741823"))
    assert (await cluster.get("big"))[0].status == 404
    assert (await cluster.get("before"))[1] == b"x" * 10
    assert await bodies(cluster) == 1 and reserved(cluster) == 0
    assert (await cluster.put("big", b"now it fits")).status == 201


async def test_concurrent_creates_of_one_name_if_absent_let_exactly_one_win(
    cluster: LocalCluster,
) -> None:
    payloads = [os.urandom(500) for _ in range(12)]
    responses = await asyncio.gather(
        *(cluster.put("once", p, headers={"If-None-Match": "*"}) for p in payloads)
    )
    statuses = sorted(r.status for r in responses)
    assert statuses == [201] + [412] * 11
    winner = payloads[[r.status for r in responses].index(201)]
    assert (await cluster.get("once"))[1] == winner
    assert await bodies(cluster) == 1


async def test_overwrites_while_readers_read_see_whole_versions(cluster: LocalCluster) -> None:
    """Writers overwrite a few names with inline and chunked versions while readers
    read them: every read is exactly one version that was written."""
    rng = random.Random(3)
    written: dict[str, set[bytes]] = {f"n{i}": set() for i in range(3)}
    for name in written:
        data = os.urandom(50)
        written[name].add(data)
        await cluster.put(name, data)

    async def writer(seed: int) -> None:
        local = random.Random(seed)
        for _ in range(25):
            name = local.choice(sorted(written))
            data = os.urandom(local.choice([1, 300, LIMIT, LIMIT + 1, 70_000]))
            written[name].add(data)
            assert (await cluster.put(name, data)).status == 201

    async def reader() -> int:
        reads = 0
        for _ in range(60):
            name = rng.choice(sorted(written))
            response, body = await cluster.get(name)
            assert response.status == 200 and body in written[name]
            reads += 1
        return reads

    results = await asyncio.gather(*(writer(i) for i in range(3)), *(reader() for _ in range(4)))
    assert sum(r for r in results if r) == 240
    await cluster.wait_reaped()
    live_inline = 0
    for name in written:
        version = await cluster.app[keys.META].lookup(name)
        live_inline += version.inline is not None
    await wait_bodies(cluster, live_inline)


async def test_bytes_come_from_the_read_cache_and_the_lookup_cache_keeps_none(
    make_cluster: MakeCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster = await make_cluster(cache_size=4 << 20)
    meta, cache = cluster.app[keys.META], cluster.app[keys.DOWNLOADER].cache
    lookups = cluster.app[keys.LOOKUP_CACHE]
    reads = 0
    read = meta.inline_data

    async def counted(version_id: int) -> bytes | None:
        nonlocal reads
        reads += 1
        return await read(version_id)

    monkeypatch.setattr(meta, "inline_data", counted)
    data = os.urandom(LIMIT)
    await cluster.put("c", data)
    cached = lookups.get("c")
    assert cached is not None and cached.inline is not None and cached.inline.data is None
    assert len(cache) == 1  # the upload offered the bytes to the read cache
    misses = lookups.misses
    for _ in range(3):
        assert (await cluster.get("c"))[1] == data
    assert (lookups.misses, reads) == (misses, 0)  # names and bytes from memory
    cache.discard(inline_key(cached.version_id))
    cache.capacity = 0  # (and keep it empty)
    assert (await cluster.get("c"))[1] == data
    assert (lookups.misses, reads) == (misses, 1)  # the bytes, from the store
    lookups.clear()
    assert (await cluster.get("c"))[1] == data
    assert (lookups.misses, reads) == (misses + 1, 1)  # the version, with its bytes


async def test_a_version_reclaimed_before_its_bytes_are_read_serves_the_new_one(
    make_cluster: MakeCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster = await make_cluster()
    meta = cluster.app[keys.META]
    await cluster.put("moving", b"old")
    read = meta.inline_data
    calls = 0

    async def overwritten_first(version_id: int) -> bytes | None:
        # fault injection: between the lookup (a cache hit) and the read of the bytes,
        # the file is overwritten and the old version reclaimed
        nonlocal calls
        calls += 1
        if calls == 1:
            assert (await cluster.put("moving", b"new")).status == 201
            await meta.purge_dead()
        return await read(version_id)

    monkeypatch.setattr(meta, "inline_data", overwritten_first)
    response, body = await cluster.get("moving")
    assert response.status == 200 and body == b"new"
    assert calls == 2  # the old bytes were gone; the name resolved again, to the new ones


async def test_the_inline_scrubber_checks_every_live_body_a_batch_at_a_time(
    tmp_path: Path,
) -> None:
    store = SQLiteMetadataStore(tmp_path / "meta.db")
    await store.open()
    try:
        sizes = {}
        for i in range(10):
            data = os.urandom(100 + i)
            result = await store.commit_inline(f"f{i}", "", InlineBody(data, checksum(data)), '"e"')
            sizes[result.version.version_id] = len(data)
        replaced = await store.commit_inline("f9", "", InlineBody(b"new", checksum(b"new")), '"e"')
        del sizes[replaced.replaced]  # dead: not scrubbed
        sizes[replaced.version.version_id] = 3
        victim = sorted(sizes)[4]

        def rot(db: sqlite3.Connection) -> None:
            db.execute("UPDATE bodies SET data = ? WHERE version_id = ?", (b"x" * 104, victim))

        await store.raw(rot)
        scrubber = InlineScrubber(store, batch=3)
        cycles = 0
        while scrubber.passes == 0:
            await scrubber.cycle()
            cycles += 1
        assert cycles == 4  # 10 live bodies, 3 at a time
        assert scrubber.corrupt == {victim: "f4"} and scrubber.bytes_scanned == sum(sizes.values())
        await store.delete("f4")  # gone: the next whole pass no longer reports it
        while scrubber.passes == 1:
            await scrubber.cycle()
        assert scrubber.corrupt == {}
    finally:
        await store.close()
