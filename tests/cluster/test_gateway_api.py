"""Ranges, listing, names, placement and space on an in-process cluster."""

from __future__ import annotations

import asyncio
import os
import random
from urllib.parse import quote

import aiohttp
import pytest

from dstore.errors import RangeNotSatisfiable
from dstore.gateway import handlers, keys
from dstore.gateway.ranges import parse_range
from tests.conftest import LocalCluster, chunk_files, tmp_files, wait_for

CHUNK = 64 * 1024


async def test_ranges_against_a_reference(cluster: LocalCluster) -> None:
    data = os.urandom(7 * CHUNK + 321)
    await cluster.put("ranged", data)
    rng = random.Random(5)
    size = len(data)
    cases = [
        "bytes=0-0",
        f"bytes={CHUNK - 1}-{CHUNK}",
        f"bytes={size - 1}-",
        "bytes=-1",
        f"bytes=-{size + 5}",
        f"bytes={CHUNK}-{2 * CHUNK - 1}",
        "bytes=0-",
    ]
    await check_ranges(cluster, "ranged", data, cases + random_ranges(rng, size, 25))


def random_ranges(rng: random.Random, size: int, count: int) -> list[str]:
    """``count`` ranges from a random byte on, and ``count`` suffix ranges."""
    cases = []
    for _ in range(count):
        a = rng.randrange(size)
        cases.append(f"bytes={a}-{rng.randrange(a, size + 100)}")
        cases.append(f"bytes=-{rng.randrange(1, size)}")
    return cases


async def check_ranges(cluster: LocalCluster, name: str, data: bytes, cases: list[str]) -> None:
    """Each range of the file ``name`` (whose bytes are ``data``) against the reference."""
    size = len(data)
    for header in cases:
        response, body = await cluster.get(name, headers={"Range": header})
        start, end = parse_range(header, size)  # type: ignore[misc]
        assert response.status == 206, header
        assert body == data[start:end], header
        assert response.headers["Content-Range"] == f"bytes {start}-{end - 1}/{size}"
        assert response.headers["Content-Length"] == str(end - start)


@pytest.fixture
def small_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunk-list pages of a few chunks, so files of a few dozen chunks span many."""
    monkeypatch.setattr(handlers, "FIRST_PAGE", 2)
    monkeypatch.setattr(handlers, "PAGE", 3)


async def test_a_chunk_list_read_a_page_at_a_time_gives_every_byte(
    cluster: LocalCluster, small_pages: None
) -> None:
    """Whole GETs and ranges that start anywhere (the first page found from the range's
    start, or not: a suffix range) against a reference, over many pages."""
    data = os.urandom(23 * CHUNK + 77)
    await cluster.put("paged", data)
    size = len(data)
    meta = cluster.app[keys.META]
    pages: list[int] = []
    chunk_page = meta.chunk_page

    async def counted(version_id: int, start: int, limit: int):  # type: ignore[no-untyped-def]
        pages.append(start)
        return await chunk_page(version_id, start, limit)

    meta.chunk_page = counted  # type: ignore[method-assign]
    response, body = await cluster.get("paged")
    assert response.status == 200 and body == data
    # the lookup brought 9 chunks (enough to tell the list is too long to cache), the
    # rest came 3 at a time, each page from where the one before ended
    assert pages == [c * CHUNK for c in range(9, 24, 3)]
    rng = random.Random(7)
    cases = [f"bytes={20 * CHUNK}-", f"bytes=-{CHUNK + 5}", f"bytes={size - 1}-", "bytes=0-"]
    await check_ranges(cluster, "paged", data, cases + random_ranges(rng, size, 12))
    response, _ = await cluster.get("paged", headers={"Range": "bytes=99999999999-"})
    assert response.status == 416
    # hostile starts: the chunk list then starts at 0, and the range is answered as
    # parse_range decides (whole file, part of it, or 416); never a 500
    for header in ("bytes=²-", "bytes=٣-5", "bytes=" + "9" * 40 + "-", "bytes= 7 -9", "bytes=--"):
        response, body = await cluster.get("paged", headers={"Range": header})
        try:
            wanted = parse_range(header, size)
        except RangeNotSatisfiable:
            assert response.status == 416, header
            continue
        if wanted is None:
            assert (response.status, body) == (200, data), header
        else:
            assert (response.status, body) == (206, data[wanted[0] : wanted[1]]), header


async def test_lookup_and_chunk_page_return_only_the_chunks_asked_for(
    cluster: LocalCluster,
) -> None:
    await cluster.put("long", os.urandom(20 * CHUNK))
    meta = cluster.app[keys.META]
    whole = await meta.lookup("long")
    assert len(whole.chunks) == 20
    first = await meta.lookup("long", 0, 2)
    assert first.chunks == whole.chunks[:9]
    deep = await meta.lookup("long", 10 * CHUNK + 5, 2)
    assert deep.chunks == whole.chunks[10:12] and deep.size == whole.size
    assert await meta.chunk_page(whole.version_id, 19 * CHUNK, 5) == whole.chunks[19:]
    assert await meta.chunk_page(whole.version_id, 20 * CHUNK, 5) == ()
    # a small file is kept whole in the lookup cache (its commit put it there): any
    # page of it is the whole list
    await cluster.put("short", os.urandom(3 * CHUNK))
    short = await meta.lookup("short", 2 * CHUNK, 1)
    assert len(short.chunks) == 3
    assert await meta.lookup("short", 0, 1) is short
    cluster.app[keys.LOOKUP_CACHE].clear()
    assert len((await meta.lookup("short", 2 * CHUNK, 1)).chunks) == 1  # not cached
    assert len((await meta.lookup("short", 0, 1)).chunks) == 3  # whole, so cached
    assert await meta.lookup("short", 2 * CHUNK, 1) is await meta.lookup("short")


async def test_a_chunk_list_that_ends_short_mid_download_cuts_the_response(
    cluster: LocalCluster, small_pages: None
) -> None:
    data = os.urandom(12 * CHUNK)
    await cluster.put("vanishing", data)
    meta = cluster.app[keys.META]

    async def gone(version_id: int, start: int, limit: int):  # type: ignore[no-untyped-def]
        return ()  # fault injection: the version's rows were reclaimed meanwhile

    meta.chunk_page = gone  # type: ignore[method-assign]
    assert cluster.session is not None
    async with cluster.session.get(cluster.file_url("vanishing")) as response:
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    # a range past the first page fails before its first byte: a clean 503
    response, _ = await cluster.get("vanishing", headers={"Range": "bytes=-10"})
    assert response.status == 503


async def test_unsatisfiable_range_is_416(cluster: LocalCluster) -> None:
    await cluster.put("small", b"12345")
    response, _ = await cluster.get("small", headers={"Range": "bytes=5-"})
    assert response.status == 416
    assert response.headers["Content-Range"] == "bytes */5"
    await cluster.put("empty", b"")
    response, _ = await cluster.get("empty", headers={"Range": "bytes=0-"})
    assert response.status == 416


async def test_range_reads_only_the_chunks_it_overlaps(cluster: LocalCluster) -> None:
    data = os.urandom(10 * CHUNK)
    await cluster.put("sparse", data)
    # corrupt every replica of chunk 0: a range inside chunk 5 must not touch it
    version = await cluster.app[keys.META].lookup("sparse")
    first = version.chunks[0].chunk_id
    for node in cluster.nodes:
        for chunk in chunk_files(node.config.data_dir):
            if chunk.name == first:
                chunk.flip(chunk.length - 1)
    response, body = await cluster.get(
        "sparse", headers={"Range": f"bytes={5 * CHUNK}-{5 * CHUNK + 99}"}
    )
    assert response.status == 206 and body == data[5 * CHUNK : 5 * CHUNK + 100]


async def test_list_pagination_and_prefixes(cluster: LocalCluster) -> None:
    names = [f"a/{i:03d}" for i in range(25)] + ["b/1", "b/2", "a", "ab", "é/x", "z"]
    await asyncio.gather(*(cluster.put(n, n.encode()) for n in names))
    assert cluster.session is not None

    async def listing(**params: str) -> dict:  # type: ignore[type-arg]
        async with cluster.session.get(f"{cluster.url}/v1/files", params=params) as r:  # type: ignore[union-attr]
            assert r.status == 200, await r.text()
            return await r.json()  # type: ignore[no-any-return]

    everything = await listing()
    assert [f["name"] for f in everything["files"]] == sorted(names)
    assert everything["next"] is None
    assert everything["files"][0].keys() == {"name", "size", "etag", "created"}
    seen, after = [], ""
    while True:
        page = await listing(prefix="a/", limit="7", start_after=after)
        assert len(page["files"]) <= 7
        seen += [f["name"] for f in page["files"]]
        if page["next"] is None:
            break
        after = page["next"]
    assert seen == sorted(n for n in names if n.startswith("a/"))
    assert [f["name"] for f in (await listing(prefix="b"))["files"]] == ["b/1", "b/2"]
    assert [f["name"] for f in (await listing(prefix="a", limit="2"))["files"]] == ["a", "a/000"]
    assert [f["name"] for f in (await listing(start_after="b/2"))["files"]] == ["z", "é/x"]
    assert (await listing(prefix="nothing"))["files"] == []
    for bad in ("0", "10001", "x"):
        async with cluster.session.get(f"{cluster.url}/v1/files", params={"limit": bad}) as r:
            assert r.status == 400


HOSTILE = [
    "../../etc/passwd",
    "a/../b",
    "..",
    ".",
    "/leading",
    "trailing/",
    "a//b",
    "spaces and\ttab",
    "%2e%2e",
    "?query#frag",
    "ünïcødé/名前",
    "x" * 1024,
    "back\\slash",
    "semi;colon",
    "\U0001f600",
]


@pytest.mark.parametrize("name", HOSTILE)
async def test_hostile_names_are_ordinary_names(cluster: LocalCluster, name: str) -> None:
    if "\t" in name:
        name = name.replace("\t", " ")
    data = name.encode() * 3
    response = await cluster.put(name, data)
    assert response.status == 201, (name, await response.text())
    assert (await response.json())["name"] == name
    got, body = await cluster.get(name)
    assert got.status == 200 and body == data
    for node in cluster.nodes:  # nothing a client sends becomes a path on a node
        for chunk in chunk_files(node.config.data_dir):
            assert chunk.path.parent == node.config.data_dir / "volumes"


@pytest.mark.parametrize(
    "raw", ["%00", "a%0Ab", "%7F", "a%1Fb", "%FF%FE", "x" * 1025, quote("é" * 513)]
)
async def test_bad_names_are_400(cluster: LocalCluster, raw: str) -> None:
    assert cluster.session is not None
    url = f"{cluster.url}/v1/files/{raw}"
    from yarl import URL

    async with cluster.session.put(URL(url, encoded=True), data=b"x") as response:
        assert response.status == 400
        assert (await response.json())["error"]["code"] == "bad_name"
    assert sum(len(chunk_files(n.config.data_dir)) for n in cluster.nodes) == 0


async def test_chunks_spread_in_proportion_to_free_capacity(make_cluster) -> None:  # type: ignore[no-untyped-def]
    caps = [4 << 20, 8 << 20, 12 << 20]
    cluster = await make_cluster(nodes=3, node_settings=[{"capacity": c} for c in caps], replicas=1)
    await asyncio.gather(*(cluster.put(f"f{i}", os.urandom(6 * CHUNK)) for i in range(30)))
    counts = [len(chunk_files(n.config.data_dir)) for n in cluster.nodes]
    assert sum(counts) == 180
    for count, cap in zip(counts, caps, strict=True):
        share = cap / sum(caps)
        assert abs(count / 180 - share) < 0.05, counts
    used = [n.store.used / n.store.capacity for n in cluster.nodes]
    assert max(used) - min(used) < 0.05


async def test_a_full_node_is_skipped(make_cluster) -> None:  # type: ignore[no-untyped-def]
    cluster = await make_cluster(
        nodes=3, node_settings=[{"capacity": 3 * CHUNK}, {}, {}], replicas=2
    )
    for i in range(10):
        assert (await cluster.put(f"f{i}", os.urandom(2 * CHUNK))).status == 201
    assert cluster.nodes[0].store.used <= 3 * CHUNK
    for i in range(10):
        assert (await cluster.get(f"f{i}"))[0].status == 200


async def test_a_full_cluster_gives_507_and_leaves_nothing(make_cluster) -> None:  # type: ignore[no-untyped-def]
    cluster = await make_cluster(nodes=3, node_settings=[{"capacity": 10 * CHUNK}] * 3, replicas=2)
    assert (await cluster.put("fits", os.urandom(5 * CHUNK))).status == 201
    before = {p.name for n in cluster.nodes for p in chunk_files(n.config.data_dir)}
    response = await cluster.put("too-big", os.urandom(40 * CHUNK))
    assert response.status == 507
    assert (await response.json())["error"]["code"] == "out_of_space"
    assert (await cluster.get("too-big"))[0].status == 404
    await cluster.wait_reaped()
    after = {p.name for n in cluster.nodes for p in chunk_files(n.config.data_dir)}
    assert after == before
    for node in cluster.nodes:
        assert tmp_files(node.config.data_dir) == []
    members = cluster.app[keys.CLUSTER].members.values()
    assert all(m.reserved == 0 for m in members)
    assert cluster.app[keys.BUDGET].in_use == 0


async def test_concurrent_uploads_never_overfill_nodes(make_cluster) -> None:  # type: ignore[no-untyped-def]
    cluster = await make_cluster(nodes=3, node_settings=[{"capacity": 20 * CHUNK}] * 3, replicas=2)
    blobs = {f"c{i}": os.urandom(5 * CHUNK) for i in range(10)}
    results = await asyncio.gather(*(cluster.put(name, data) for name, data in blobs.items()))
    statuses = dict(zip(blobs, (r.status for r in results), strict=True))
    assert set(statuses.values()) <= {201, 507} and 201 in statuses.values(), statuses
    for node in cluster.nodes:
        assert node.store.used <= node.store.capacity
    await cluster.wait_reaped()

    def counts_agree() -> bool:  # a delete in flight may have unlinked but not counted yet
        return all(
            node.store.used == sum(c.length for c in chunk_files(node.config.data_dir))
            for node in cluster.nodes
        )

    await wait_for(counts_agree, timeout=5)
    stored = sum(n.store.used for n in cluster.nodes)
    assert stored == sum(2 * len(blobs[n]) for n, s in statuses.items() if s == 201)
    for name, status in statuses.items():
        response, body = await cluster.get(name)
        assert (response.status, body == blobs[name]) == (
            (200, True) if status == 201 else (404, False)
        )


async def test_percent_encoded_names_round_trip_through_listing(cluster: LocalCluster) -> None:
    name = "dir/sub dir/файл?.txt"
    await cluster.put(name, b"x")
    assert cluster.session is not None
    async with cluster.session.get(
        f"{cluster.url}/v1/files", params={"prefix": "dir/"}
    ) as response:
        page = await response.json()
    assert [f["name"] for f in page["files"]] == [name]
    assert quote(name, safe="") in str(cluster.file_url(name))


async def test_a_heartbeat_figure_never_undoes_a_newer_put_figure(
    make_cluster,  # type: ignore[no-untyped-def]
) -> None:
    """A node's used bytes reach the gateway in put replies and in heartbeats, on different
    connections, in either order: the gateway keeps the figure the node reported last.
    (Taking every heartbeat's figure as it came miscounted chunks in flight and skewed
    placement in the test above.)"""
    cluster = await make_cluster(nodes=1, replicas=1, heartbeat=30.0)
    gateway = cluster.app[keys.CLUSTER]
    (member,) = gateway.members.values()
    stale = await member.client.stat()  # a heartbeat reply the puts below overtake
    for i in range(3):
        assert (await cluster.put(f"f{i}", os.urandom(3 * CHUNK))).status == 201
    assert member.used == cluster.nodes[0].store.used == 9 * CHUNK

    async def late_stat(*, epoch: int = 0, trace: str = "") -> object:
        return stale  # fault: the old reply arrives now

    member.control.stat = late_stat  # type: ignore[method-assign,assignment]
    await gateway.refresh()
    assert member.used == 9 * CHUNK and stale.used == 0
