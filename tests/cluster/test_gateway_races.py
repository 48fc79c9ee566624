"""Requests that collide on one name, and memory that stays bounded under load."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator

import pytest
import structlog

from dstore.chunk import checksum
from dstore.errors import ChunkRetired
from dstore.gateway import handlers, keys
from dstore.gateway.download import AHEAD_START
from dstore.log import configure
from dstore.master.cluster import RELAY_READ_LIMIT
from dstore.rpc.client import NodeClient
from tests.conftest import SECRET, LocalCluster, wait_for

CHUNK = 64 * 1024


@pytest.mark.parametrize(
    ("cache_size", "chunks", "paged"),
    [(0, 12, False), (1 << 20, 12, False), (1 << 20, 1, False), (0, 12, True)],
    ids=["no-cache", "read-cache", "small-files-both-caches", "chunk-list-in-pages"],
)
async def test_overwrite_while_readers_read_gives_whole_versions(
    make_cluster, monkeypatch: pytest.MonkeyPatch, cache_size: int, chunks: int, paged: bool
) -> None:  # type: ignore[no-untyped-def]
    """With `chunks` 1 every lookup after the first is answered by the lookup cache;
    with `paged` each read fetches its chunk list in pages of 2, the later ones while the
    version it read is being replaced."""
    if paged:
        monkeypatch.setattr(handlers, "FIRST_PAGE", 2)
        monkeypatch.setattr(handlers, "PAGE", 2)
    cluster = await make_cluster(cache_size=cache_size)
    versions = [bytes([i]) * ((chunks - 1) * CHUNK + 1000 + i * 1000) for i in range(6)]
    await cluster.put("hot", versions[0])
    seen: list[bytes] = []
    writing = True

    async def writer() -> None:
        nonlocal writing
        for data in versions[1:]:
            assert (await cluster.put("hot", data)).status == 201
            await asyncio.sleep(0.01)
        writing = False

    async def reader() -> None:
        # for as long as the writer writes (bounded): fast reads, from the read cache say,
        # must not all finish before the first overwrite
        for i in range(2000):
            if not writing and i >= 15:
                break
            response, body = await cluster.get("hot")
            assert response.status == 200
            seen.append(body)

    await asyncio.gather(writer(), *(reader() for _ in range(4)))
    for body in seen:
        assert body in versions  # one whole version, never a mix
    assert len(set(seen)) > 1
    await cluster.wait_reaped()


async def test_delete_does_not_break_a_download_in_progress(cluster: LocalCluster) -> None:
    data = os.urandom(400 * CHUNK)  # more than the sockets hold: the handler is still in it
    await cluster.put("big", data)
    assert cluster.session is not None
    async with cluster.session.get(cluster.file_url("big")) as response:
        first = await response.content.readexactly(CHUNK)
        async with cluster.session.delete(cluster.file_url("big")) as deleted:
            assert deleted.status == 204
        reaper = cluster.app[keys.REAPER]
        await wait_for(lambda: reaper.held_for_readers > 0)  # the reaper saw them, and waits
        rest = await response.content.read()
    assert first + rest == data
    assert (await cluster.get("big"))[0].status == 404
    await cluster.wait_reaped()


async def test_if_none_match_star_lets_exactly_one_creator_win(cluster: LocalCluster) -> None:
    for round_ in range(5):
        name = f"once-{round_}"
        payloads = [os.urandom(3 * CHUNK) for _ in range(4)]
        results = await asyncio.gather(
            *(cluster.put(name, p, headers={"If-None-Match": "*"}) for p in payloads)
        )
        statuses = sorted(r.status for r in results)
        assert statuses == [201, 412, 412, 412], statuses
        winner = payloads[[r.status for r in results].index(201)]
        assert (await cluster.get(name))[1] == winner
    await cluster.wait_reaped()


async def test_concurrent_put_and_delete_end_in_one_consistent_state(cluster: LocalCluster) -> None:
    assert cluster.session is not None
    for _ in range(10):
        data = os.urandom(4 * CHUNK)

        async def delete() -> int:
            async with cluster.session.delete(cluster.file_url("pd")) as r:  # type: ignore[union-attr]
                return r.status

        put, status = await asyncio.gather(cluster.put("pd", data), delete())
        assert put.status == 201 and status in (204, 404)
        response, body = await cluster.get("pd")
        assert (response.status == 200 and body == data) or response.status == 404
    await cluster.wait_reaped()


@pytest.mark.parametrize("clients", [12])
async def test_memory_budget_bounds_concurrent_uploads(make_cluster, clients: int) -> None:  # type: ignore[no-untyped-def]
    cluster = await make_cluster(memory_budget=4 * CHUNK, window=2, budget_wait=30.0)
    blobs = [os.urandom(20 * CHUNK + i) for i in range(clients)]
    results = await asyncio.gather(*(cluster.put(f"m{i}", b) for i, b in enumerate(blobs)))
    assert all(r.status == 201 for r in results)
    budget = cluster.app[keys.BUDGET]
    assert budget.peak <= 4 * CHUNK and budget.in_use == 0
    for i, data in enumerate(blobs):
        assert (await cluster.get(f"m{i}"))[1] == data


async def test_upload_that_cannot_get_memory_in_time_is_503(make_cluster) -> None:  # type: ignore[no-untyped-def]
    cluster = await make_cluster(memory_budget=2 * CHUNK, window=2, budget_wait=0.05)
    gate = asyncio.Event()

    async def slow_body():  # type: ignore[no-untyped-def]
        yield os.urandom(CHUNK + 1)  # fills one chunk and starts a second
        await gate.wait()
        yield b"end"

    # two slow uploads each hold the budget for the chunk they are filling: it is full
    slow = [asyncio.create_task(cluster.put(f"slow{i}", slow_body())) for i in range(2)]
    await wait_for(lambda: cluster.app[keys.BUDGET].in_use == 2 * CHUNK)
    blocked = await cluster.put("blocked", os.urandom(3 * CHUNK))
    assert blocked.status == 503
    assert (await blocked.json())["error"]["code"] == "overloaded"
    gate.set()
    assert [(await s).status for s in slow] == [201, 201]
    assert cluster.app[keys.BUDGET].in_use == 0


# inline, and a short chunk on the nodes: more at once than two whole chunks' shares allow
@pytest.mark.parametrize(("count", "size"), [(40, 1000), (5, 20_000)])
async def test_small_bodies_of_declared_length_take_only_their_size_of_the_budget(
    make_cluster, count: int, size: int
) -> None:  # type: ignore[no-untyped-def]
    """With a budget of two chunks, more than two uploads of a declared small length are
    all in the middle of their bodies at once; without a Content-Length each takes a whole chunk's
    share, so only two can, and the rest give up (503)."""
    cluster = await make_cluster(memory_budget=2 * CHUNK, window=2, budget_wait=0.5)
    budget = cluster.app[keys.BUDGET]
    bodies = [os.urandom(size) for _ in range(count)]
    streams = []
    for i, data in enumerate(bodies):  # each sends its headers and half its body, then waits
        reader, writer = await asyncio.open_connection("127.0.0.1", cluster.port)
        writer.write(
            f"PUT /v1/files/s{i} HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n".encode()
            + data[: size // 2]
        )
        await writer.drain()
        streams.append((reader, writer))
    await wait_for(lambda: budget.in_use == count * size)  # every one of them reading
    assert budget.peak <= 2 * CHUNK
    for (_, writer), data in zip(streams, bodies, strict=True):
        writer.write(data[size // 2 :])
        await writer.drain()
    for reader, writer in streams:
        status = await reader.readline()
        assert status.startswith(b"HTTP/1.1 201"), status
        writer.close()
    assert budget.in_use == 0
    for i, data in enumerate(bodies):
        assert (await cluster.get(f"s{i}"))[1] == data

    async def unsized(data: bytes):  # type: ignore[no-untyped-def]
        yield data[:10]
        await asyncio.sleep(1.0)  # past budget_wait, holding a whole chunk's share
        yield data[10:]

    results = await asyncio.gather(
        *(cluster.put(f"u{i}", unsized(d)) for i, d in enumerate(bodies[:4]))
    )
    assert sorted(r.status for r in results) == [201, 201, 503, 503]
    assert budget.in_use == 0


async def test_request_id_reaches_the_storage_nodes_logs(cluster: LocalCluster) -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    try:
        with structlog.testing.capture_logs(
            processors=[structlog.contextvars.merge_contextvars]
        ) as logs:
            await cluster.put(
                "traced", os.urandom(2 * CHUNK), headers={"X-Request-Id": "trace-me-42"}
            )
            await cluster.get("traced", headers={"X-Request-Id": "trace-me-43"})
    finally:
        configure("console", "warning")
    node_lines = [entry for entry in logs if entry.get("event") == "request"]
    puts = [e for e in node_lines if e.get("trace") == "trace-me-42" and e.get("op") == "put"]
    gets = [e for e in node_lines if e.get("trace") == "trace-me-43" and e.get("op") == "get"]
    assert len(puts) == 4 and len(gets) == 2  # 2 chunks x 2 replicas; 2 chunks read
    http = [e for e in logs if e.get("event") == "http_request" and e.get("trace") == "trace-me-42"]
    assert http and http[0]["status"] == 201 and http[0]["name"] == "traced"
    assert http[0]["bytes_in"] == 2 * CHUNK


async def test_downloads_share_the_memory_budget(make_cluster) -> None:  # type: ignore[no-untyped-def]
    cluster = await make_cluster(memory_budget=4 * CHUNK, window=2, budget_wait=30.0)
    data = os.urandom(30 * CHUNK + 17)
    await cluster.put("shared", data)
    budget = cluster.app[keys.BUDGET]
    budget.peak = 0
    results = await asyncio.gather(*(cluster.get("shared") for _ in range(10)))
    assert all(r.status == 200 and body == data for r, body in results)
    assert 0 < budget.peak <= 4 * CHUNK and budget.in_use == 0


async def test_a_stalled_download_holds_deleted_chunks_only_for_the_grace_period(
    make_cluster,  # type: ignore[no-untyped-def]
) -> None:
    # a grace longer than the reaper's settle time (2 s): a pass sees the chunks within it
    cluster = await make_cluster(gc_grace=3.0, memory_budget=4 * CHUNK)
    # more than the sockets hold between the gateway and a client that reads nothing
    await cluster.put("held", os.urandom(400 * CHUNK))
    assert cluster.session is not None
    async with cluster.session.get(cluster.file_url("held")) as response:
        await response.content.readexactly(CHUNK)  # started, then stalls
        async with cluster.session.delete(cluster.file_url("held")) as deleted:
            assert deleted.status == 204
        pins = cluster.app[keys.PINS]
        assert pins.pinned((await _version_ids(cluster))[0])
        reaper = cluster.app[keys.REAPER]
        await wait_for(lambda: reaper.held_for_readers > 0)  # a pass within the grace: kept
        assert sum(n.store.count for n in cluster.nodes) == 800
        assert pins.pinned((await _version_ids(cluster))[0])  # the reader is still there
        await cluster.wait_reaped(timeout=10)  # past it: reclaimed although still pinned
        response.close()


async def _version_ids(cluster: LocalCluster) -> list[int]:
    return await cluster.app[keys.META].version_ids()


async def test_the_reaper_retires_dead_chunks_so_a_late_put_cannot_resurrect_one(
    cluster: LocalCluster,
) -> None:
    await cluster.put("f", b"old" * 2000)  # (over inline_max: a chunk on the nodes)
    old = (await cluster.app[keys.META].lookup("f")).chunks[0]
    await cluster.put("f", b"new" * 2000)  # the old version is dead now
    await cluster.wait_reaped()
    node = next(n for n in cluster.nodes if n.node_id == old.nodes[0])
    async with NodeClient("127.0.0.1", node.port, SECRET.encode()) as client:
        with pytest.raises(ChunkRetired):  # a put of it still on its way would be refused
            await client.put_chunk(
                old.chunk_id, b"old" * 2000, length=6000, checksum=checksum(b"old" * 2000)
            )
    assert (await cluster.get("f"))[1] == b"new" * 2000


async def test_uploads_cancelled_at_any_point_give_back_every_reservation(make_cluster) -> None:  # type: ignore[no-untyped-def]
    """A client gone mid-upload cancels it wherever it is: placing a chunk, recording
    its intent, or between handing a chunk to its puts and their first step. Each point
    must give back the space reserved on the nodes and the memory budget."""
    cluster = await make_cluster(replicas=2, window=4)
    uploader, meta = cluster.app[keys.UPLOADER], cluster.app[keys.META]
    add_chunk = meta.add_chunk
    loop = asyncio.get_running_loop()
    victim: asyncio.Task[object] | None = None
    cancel_after = 0

    async def add_chunk_then_cancel(*args, **kwargs):  # type: ignore[no-untyped-def]
        # fault injection: the cancellation lands right after the intent is recorded,
        # before the chunk's puts have taken their first step
        nonlocal cancel_after
        await add_chunk(*args, **kwargs)
        cancel_after -= 1
        if cancel_after == 0 and victim is not None:
            loop.call_soon(victim.cancel)

    meta.add_chunk = add_chunk_then_cancel  # type: ignore[method-assign]

    async def body() -> AsyncIterator[bytes]:
        for _ in range(8):
            yield os.urandom(CHUNK)
            await asyncio.sleep(0)

    for point in range(1, 8):
        cancel_after = point
        victim = asyncio.create_task(uploader.upload(f"gone-{point}", body()))
        with pytest.raises(asyncio.CancelledError):
            await victim
    for delay in (0.0, 0.001, 0.003, 0.01):
        victim = None
        task = asyncio.create_task(uploader.upload("gone-late", body()))
        await asyncio.sleep(delay)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    members = cluster.app[keys.CLUSTER].members.values()
    assert [m.reserved for m in members] == [0] * len(members)
    assert cluster.app[keys.BUDGET].in_use == 0


@pytest.mark.parametrize(
    ("late", "budget_chunks", "expect_requested", "splice"),
    [
        ("one", 64, 3 + AHEAD_START, False),
        ("all", 64, 3, False),
        ("one", 8, 5, False),
        ("one", 64, 3 + AHEAD_START, True),
    ],
    ids=["one-late-chunk", "every-disk-slow", "half-the-budget-for-the-rest", "relays"],
)
async def test_reads_go_on_past_a_chunk_late_on_its_node(
    make_cluster,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
    late: str,
    budget_chunks: int,
    expect_requested: int,
    splice: bool,
) -> None:
    """Read-ahead 2, hold 6: while chunk 1 is stuck on its node, the chunks behind it are
    read as the ones reading deliver their first bytes, up to ``AHEAD_START`` + 1 ahead of
    the one being sent (the client took one chunk); with every read stuck, no more than 2
    read at once (3 in all, with chunk 0); past the read-ahead, chunks are held only while
    half the budget stays free (a budget of 8 chunks: 4 held, 5 requested). Relayed
    chunks wait on their nodes holding only what the gateway received of them. Then
    every byte arrives."""
    cluster = await make_cluster(memory_budget=budget_chunks * CHUNK, splice=splice)
    downloader = cluster.app[keys.DOWNLOADER]
    downloader.read_ahead, downloader.hold = 2, 6
    data = os.urandom(20 * CHUNK + 5)
    await cluster.put("late", data)
    ids = [c.chunk_id for c in (await cluster.app[keys.META].lookup("late")).chunks]
    stuck = {ids[1]} if late == "one" else set(ids[1:])
    release = asyncio.Event()
    requested: list[str] = []
    for node in cluster.nodes:

        def wrap(original):  # type: ignore[no-untyped-def]
            @contextlib.asynccontextmanager
            async def reader(chunk_id: str, *args, **kwargs):  # type: ignore[no-untyped-def]
                requested.append(chunk_id)
                if chunk_id in stuck:
                    await release.wait()
                async with original(chunk_id, *args, **kwargs) as opened:
                    yield opened

            return reader

        monkeypatch.setattr(node.store, "reader", wrap(node.store.reader))
    budget = cluster.app[keys.BUDGET]
    get = asyncio.create_task(cluster.get("late"))
    await wait_for(lambda: len(requested) >= expect_requested)
    await asyncio.sleep(0.3)  # time to over-reach, if it would
    assert requested == ids[:expect_requested], [ids.index(r) for r in requested]
    if splice:  # the late one is charged whole; the waiting relays, what they hold
        assert CHUNK < budget.in_use <= CHUNK + (expect_requested - 2) * RELAY_READ_LIMIT
    else:
        assert budget.in_use == (expect_requested - 1) * CHUNK  # chunk 0 sent and let go
    if budget_chunks == 8:
        assert budget.in_use <= budget.limit // 2
    release.set()
    response, body = await get
    assert response.status == 200 and body == data
    assert sorted(set(requested)) == sorted(ids) and budget.in_use == 0
