"""Failures on an in-process cluster: clients that vanish, nodes that die, hang or come
back empty, and the clean-up that follows. Each test checks what the client sees and
what is left on the nodes."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import Any

import aiohttp
import pytest
import structlog

from dstore.chunk import checksum, new_chunk_id
from dstore.config import GatewayConfig
from dstore.errors import NodeUnavailable
from dstore.gateway import keys
from dstore.gateway.app import start_gateway
from dstore.log import configure
from dstore.master.cluster import Cluster, NodeState
from dstore.rpc.client import NodeClient
from tests.conftest import SECRET, LocalCluster, NodeProcess, chunk_files, wait_for
from tests.faultkit import FaultProxy

CHUNK = 64 * 1024


async def proxied_cluster(
    make_cluster: Any, nodes: int = 3, **gateway: Any
) -> tuple[LocalCluster, list[FaultProxy]]:
    """A cluster whose gateway reaches every node through a fault proxy."""
    cluster = await make_cluster(nodes=nodes, storage=[], **gateway)
    proxies = [await FaultProxy("127.0.0.1", n.port).start() for n in cluster.nodes]
    await cluster.restart_gateway(storage=[p.addr for p in proxies])
    await wait_for(lambda: cluster.app[keys.CLUSTER].up_count() == nodes)
    return cluster, proxies


async def slow_body(data: bytes, piece: int = CHUNK // 2, pause: float = 0.02, on_half: Any = None):  # type: ignore[no-untyped-def]
    for i, start in enumerate(range(0, len(data), piece)):
        if on_half is not None and start >= len(data) // 2 and on_half:
            await on_half()
            on_half = None
        yield data[start : start + piece]
        await asyncio.sleep(pause)
        del i


def nothing_in_flight(cluster: LocalCluster) -> None:
    app = cluster.app
    assert all(m.reserved == 0 for m in app[keys.CLUSTER].members.values())
    assert app[keys.BUDGET].in_use == 0
    assert not app[keys.UPLOADER].active


# --- 1. client gone mid-upload -------------------------------------------------------------


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_client_gone_mid_upload_leaves_nothing(cluster: LocalCluster, framing: str) -> None:
    _, writer = await asyncio.open_connection("127.0.0.1", cluster.port)
    head = "PUT /v1/files/vanishing HTTP/1.1\r\nHost: x\r\n"
    body = os.urandom(5 * CHUNK)
    if framing == "content-length":
        writer.write(f"{head}Content-Length: {20 * CHUNK}\r\n\r\n".encode() + body)
    else:
        writer.write(
            f"{head}Transfer-Encoding: chunked\r\n\r\n".encode()
            + f"{len(body):x}\r\n".encode()
            + body
            + b"\r\n"
        )
    await writer.drain()
    await wait_for(lambda: sum(len(chunk_files(n.config.data_dir)) for n in cluster.nodes) >= 4)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    try:
        with structlog.testing.capture_logs() as logs:
            writer.close()  # gone, without finishing the body
            await wait_for(lambda: any(e["event"] == "upload_aborted" for e in logs))
    finally:
        configure("console", "warning")
    (line,) = [e for e in logs if e["event"] == "upload_aborted"]
    assert line["name"] == "vanishing" and line["reason"] == "client_gone"
    await cluster.wait_reaped(timeout=10)  # within seconds, not at the next gc grace
    assert (await cluster.get("vanishing"))[0].status == 404
    assert sum(len(chunk_files(n.config.data_dir)) for n in cluster.nodes) == 0
    await wait_for(lambda: not cluster.app[keys.UPLOADER].active)
    nothing_in_flight(cluster)


async def test_body_shorter_than_content_length_is_not_kept(cluster: LocalCluster) -> None:
    _, writer = await asyncio.open_connection("127.0.0.1", cluster.port)
    writer.write(
        b"PUT /v1/files/short HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000
    )
    await writer.drain()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    try:
        with structlog.testing.capture_logs() as logs:
            writer.write_eof()  # half-close: the body ends early
            await wait_for(lambda: any(e["event"] == "upload_aborted" for e in logs))
    finally:
        configure("console", "warning")
    writer.close()
    await cluster.wait_reaped()
    assert (await cluster.get("short"))[0].status == 404
    nothing_in_flight(cluster)
    # the body never filled its first chunk: no version was even begun
    assert await cluster.app[keys.META].version_ids(name="short") == []


# --- 2. membership --------------------------------------------------------------------------


async def test_killed_node_is_shown_not_up_within_3_seconds(make_cluster: Any) -> None:
    cluster = await make_cluster(heartbeat=1.0, suspect_after=1, down_after=3)
    assert cluster.session is not None

    async def states() -> list[str]:
        async with cluster.session.get(f"{cluster.url}/v1/cluster") as r:  # type: ignore[union-attr]
            return [n["state"] for n in (await r.json())["nodes"]]

    assert await states() == ["up"] * 3
    victim = cluster.nodes[1]
    port = victim.port
    await victim.stop(grace=0)

    async def victim_is(state: str) -> bool:
        return (await states())[1] == state

    await wait_for(lambda: victim_is("suspect"), timeout=3)  # a missed heartbeat or two
    await wait_for(lambda: victim_is("down"), timeout=10)
    # placement never picks it: every chunk of a new file avoids it
    await cluster.put("while-down", os.urandom(10 * CHUNK))
    version = await cluster.app[keys.META].lookup("while-down")
    assert all(victim.node_id not in c.nodes for c in version.chunks)
    # it comes back with its data: up again
    again = await cluster.add_node(port=port, data_dir=victim.config.data_dir)
    assert again.node_id == victim.node_id
    await wait_for(lambda: cluster.app[keys.CLUSTER].up_count() == 3, timeout=10)


async def test_node_back_empty_is_shown_as_having_lost_its_replicas(
    make_cluster: Any, tmp_path: Any
) -> None:
    cluster = await make_cluster()
    await cluster.put("f", os.urandom(6 * CHUNK))
    victim = cluster.nodes[0]
    old_id, port = victim.node_id, victim.port
    await victim.stop(grace=0)
    await cluster.add_node(port=port, data_dir=tmp_path / "empty-node")
    assert cluster.session is not None
    for _ in range(100):
        async with cluster.session.get(f"{cluster.url}/v1/cluster") as r:
            nodes = (await r.json())["nodes"]
        entry = next(n for n in nodes if n["addr"].endswith(f":{port}"))
        if entry["replaced_ids"]:
            break
        await asyncio.sleep(0.1)
    assert entry["replaced_ids"] == [old_id] and entry["id"] != old_id
    assert entry["state"] == "up"
    response, body = await cluster.get("f")  # the other replicas still serve every chunk
    assert response.status == 200 and len(body) == 6 * CHUNK


# --- 3. node lost during an upload ----------------------------------------------------------


@pytest.mark.parametrize("fault", ["refuse", "reset", "blackhole"])
async def test_upload_survives_node_loss_mid_upload(make_cluster: Any, fault: str) -> None:
    cluster, proxies = await proxied_cluster(make_cluster, nodes=4, io_timeout=1.0)
    data = os.urandom(24 * CHUNK)

    async def fail() -> None:
        await proxies[0].set(fault)

    response = await cluster.put("survivor", slow_body(data, on_half=fail))
    assert response.status == 201, await response.text()
    got_response, got = await cluster.get("survivor")
    assert got_response.status == 200 and got == data
    version = await cluster.app[keys.META].lookup("survivor")
    lost = cluster.nodes[0].node_id
    assert all(len(set(chunk.nodes)) == 2 for chunk in version.chunks)
    assert lost not in version.chunks[-1].nodes  # chunks after the loss went elsewhere
    await proxies[0].set("ok")
    await cluster.wait_reaped()
    nothing_in_flight(cluster)


async def test_upload_fails_cleanly_when_no_node_can_take_the_chunk(make_cluster: Any) -> None:
    # A put cut by the refusing proxy may have stored its chunk on the node, its reply
    # lost: the upload forgets that replica, and only inventory reconciliation (the
    # backstop, after the grace period) finds the chunk. Seen once in about twenty runs
    # under load; the reconciler runs every second here so that the test checks the
    # whole guarantee ("nothing left behind once the grace period has passed").
    cluster, proxies = await proxied_cluster(
        make_cluster, nodes=2, io_timeout=1.0, reconcile_interval=1.0
    )
    data = os.urandom(24 * CHUNK)

    async def fail() -> None:
        await proxies[1].set("refuse")

    response = await cluster.put("doomed", slow_body(data, on_half=fail))
    assert response.status == 503, await response.text()
    assert (await cluster.get("doomed"))[0].status == 404
    await proxies[1].set("ok")
    await wait_for(lambda: cluster.app[keys.CLUSTER].up_count() == 2, timeout=10)
    await cluster.wait_reaped()  # every chunk written for it, on both nodes, is gone
    assert sum(len(chunk_files(n.config.data_dir)) for n in cluster.nodes) == 0
    nothing_in_flight(cluster)


async def test_upload_with_a_node_cut_mid_chunk(make_cluster: Any) -> None:
    cluster, proxies = await proxied_cluster(make_cluster, nodes=3, io_timeout=1.0)
    data = os.urandom(16 * CHUNK)
    await proxies[2].set("cut", cut_after=CHUNK // 3)  # dies inside a chunk's body
    response = await cluster.put("cut", data)
    assert response.status == 201
    assert (await cluster.get("cut"))[1] == data
    await proxies[2].set("ok")
    await cluster.wait_reaped()


# --- 4. node lost during a download ---------------------------------------------------------


@pytest.mark.parametrize("fault", ["refuse", "reset", "blackhole"])
async def test_download_fails_over_mid_stream(make_cluster: Any, fault: str) -> None:
    cluster, proxies = await proxied_cluster(
        make_cluster, nodes=3, io_timeout=1.0, memory_budget=4 * CHUNK
    )
    data = os.urandom(40 * CHUNK)
    assert (await cluster.put("read-me", data)).status == 201
    version = await cluster.app[keys.META].lookup("read-me")
    # the node that serves the later chunks first
    first_choice = version.chunks[-1].nodes[0]
    victim = next(i for i, n in enumerate(cluster.nodes) if n.node_id == first_choice)
    assert cluster.session is not None
    async with cluster.session.get(cluster.file_url("read-me")) as response:
        assert response.status == 200
        head = await response.content.readexactly(8 * CHUNK)
        await proxies[victim].set(fault)
        rest = await response.content.read()
    assert head + rest == data
    assert cluster.app[keys.DOWNLOADER].failovers >= 1


@pytest.mark.parametrize("cut_after", [1, 20_000, 3 * CHUNK + 7_000])
async def test_a_relay_cut_part_way_resumes_from_another_replica(
    make_cluster: Any, cut_after: int
) -> None:
    """A node dies part-way through a chunk being spliced to the client: the client gets
    every byte once, in order, the rest of that chunk coming from the next replica."""
    cluster, proxies = await proxied_cluster(make_cluster, nodes=3, io_timeout=1.0)
    data = os.urandom(12 * CHUNK)
    assert (await cluster.put("relayed", data)).status == 201
    version = await cluster.app[keys.META].lookup("relayed")
    first_choice = version.chunks[0].nodes[0]
    victim = next(i for i, n in enumerate(cluster.nodes) if n.node_id == first_choice)
    await proxies[victim].set("cut_reply", cut_after=cut_after)
    downloader = cluster.app[keys.DOWNLOADER]
    response, body = await cluster.get("relayed")
    assert response.status == 200
    assert body == data
    assert downloader.failovers >= 1
    if cut_after > 1000:  # past the reply's header: into the body
        assert downloader.resumes >= 1
    assert downloader.relays >= 6  # the others went through the kernel
    await proxies[victim].set("ok")
    response, body = await cluster.get("relayed", headers={"Range": "bytes=100-"})
    assert response.status == 206 and body == data[100:]


async def test_download_without_any_replica_is_cut_not_a_short_200(make_cluster: Any) -> None:
    cluster, proxies = await proxied_cluster(
        make_cluster, nodes=2, replicas=1, memory_budget=4 * CHUNK
    )
    data = os.urandom(40 * CHUNK)
    assert (await cluster.put("fragile", data)).status == 201
    version = await cluster.app[keys.META].lookup("fragile")
    holder = version.chunks[-1].nodes[0]
    victim = next(i for i, n in enumerate(cluster.nodes) if n.node_id == holder)
    assert cluster.session is not None
    received = b""
    with pytest.raises(aiohttp.ClientPayloadError):
        async with cluster.session.get(cluster.file_url("fragile")) as response:
            assert response.status == 200
            assert response.headers["Content-Length"] == str(len(data))
            received = await response.content.readexactly(4 * CHUNK)
            await proxies[victim].set("refuse")
            received += await response.content.read()
    assert len(received) < len(data)


async def test_download_that_cannot_start_is_503(make_cluster: Any) -> None:
    cluster, proxies = await proxied_cluster(make_cluster, nodes=2, replicas=2)
    data = os.urandom(3 * CHUNK)
    assert (await cluster.put("gone", data)).status == 201
    for proxy in proxies:
        await proxy.set("refuse")
    response, _ = await cluster.get("gone")
    assert response.status == 503
    assert (await response.json())["error"]["code"] == "node_unavailable"
    for proxy in proxies:
        await proxy.set("ok")


# --- 6. inventory reconciliation ------------------------------------------------------------


async def test_reconciliation_deletes_old_orphans_only(make_cluster: Any) -> None:
    cluster = await make_cluster(gc_grace=1.0)
    data = os.urandom(5 * CHUNK)
    await cluster.put("keep", data)
    node = cluster.nodes[0]
    orphan = new_chunk_id()
    async with NodeClient("127.0.0.1", node.port, SECRET.encode()) as client:
        await client.put_chunk(orphan, b"stray", length=5, checksum=checksum(b"stray"))
        reconciler = cluster.app[keys.RECONCILER]
        counts = await reconciler.run_once()
        assert counts.orphans == 1 and counts.young == 1 and counts.deleted == 0
        await asyncio.sleep(1.2)
        counts = await reconciler.run_once()
        assert counts.deleted == 1
        assert (await client.stat()).chunks == len(chunk_files(node.config.data_dir))
    assert orphan not in {p.name for p in chunk_files(node.config.data_dir)}
    assert (await cluster.get("keep"))[1] == data  # live chunks are never touched


async def test_hung_node_is_abandoned_after_heartbeats_not_the_io_timeout(
    make_cluster: Any,
) -> None:
    cluster, proxies = await proxied_cluster(make_cluster, nodes=3, io_timeout=30.0)
    data = os.urandom(24 * CHUNK)

    async def hang() -> None:
        await proxies[0].set("blackhole")

    async with asyncio.timeout(10):  # far below the 30 s I/O timeout: abandoned on heartbeats
        response = await cluster.put("patient", slow_body(data, on_half=hang))
        assert response.status == 201
        got_response, got = await cluster.get("patient")
        assert got_response.status == 200 and got == data


async def test_node_processes_killed_with_sigkill_during_upload_and_download(
    node_process: Any, tmp_path: Any
) -> None:
    procs: list[NodeProcess] = [node_process(f"proc{i}") for i in range(4)]
    config = GatewayConfig(
        listen="127.0.0.1:0",
        data_dir=tmp_path / "gw",
        storage=[f"127.0.0.1:{p.port}" for p in procs],
        cluster_secret=SECRET,
        chunk_size=CHUNK,
        heartbeat=0.2,
        io_timeout=2.0,
    )
    config.validate()
    runner, port = await start_gateway(config)
    url = f"http://127.0.0.1:{port}/v1/files/"
    try:
        await wait_for(lambda: runner.app[keys.CLUSTER].up_count() == 4)
        data = os.urandom(40 * CHUNK)
        async with aiohttp.ClientSession() as session:

            async def kill_one() -> None:
                procs[0].signal(signal.SIGKILL)

            async with session.put(url + "k", data=slow_body(data, on_half=kill_one)) as r:
                assert r.status == 201, await r.text()
            version = await runner.app[keys.META].lookup("k")
            members = runner.app[keys.CLUSTER]
            ids = {
                p.port: m.node_id
                for m in members.members.values()
                for p in procs
                if m.addr.endswith(f":{p.port}")
            }
            # a second victim that serves later chunks first, while every chunk keeps a
            # replica on a node that is still alive
            victim = next(
                p
                for p in procs[1:]
                if any(c.nodes[0] == ids[p.port] for c in version.chunks[8:])
                and all(set(c.nodes) - {ids[p.port], ids[procs[0].port]} for c in version.chunks)
            )
            async with session.get(url + "k") as r:
                head = await r.content.readexactly(8 * CHUNK)
                victim.signal(signal.SIGKILL)
                rest = await r.content.read()
            assert head + rest == data
    finally:
        await runner.cleanup()


# --- abandoning requests to a lost node (Cluster.call) -------------------------------------


async def test_call_turns_a_node_loss_into_node_unavailable_and_cleans_up() -> None:
    cluster = Cluster(["127.0.0.1:9"], b"secret")
    member = cluster.members["127.0.0.1:9"]
    member.state = NodeState.UP
    cleaned = asyncio.Event()

    async def hung() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            cleaned.set()

    call = asyncio.create_task(cluster.call(member, hung()))
    await asyncio.sleep(0.01)
    member.lost.set()
    with pytest.raises(NodeUnavailable, match="stopped answering"):
        await call
    assert cleaned.is_set() and not call.cancelled()
    # lost already: refused at once, and the request is never started (nor left unawaited)
    with pytest.raises(NodeUnavailable):
        await cluster.call(member, hung())
    await cluster.stop()


async def test_call_lets_an_outside_cancellation_through() -> None:
    cluster = Cluster(["127.0.0.1:9"], b"secret")
    member = cluster.members["127.0.0.1:9"]
    member.state = NodeState.UP
    call = asyncio.create_task(cluster.call(member, asyncio.sleep(3600)))
    await asyncio.sleep(0.01)
    call.cancel()  # the client went away, say
    member.lost.set()  # and the node is lost in the same turn
    with pytest.raises(asyncio.CancelledError):
        await call
    assert call.cancelled()
    await cluster.stop()
