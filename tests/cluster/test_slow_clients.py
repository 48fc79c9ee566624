"""Slow and stalled clients never hurt others: node-state decisions do not wait behind
data traffic."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack

import pytest

from dstore.gateway import keys
from dstore.master.cluster import NodeState
from tests.conftest import LocalCluster, wait_for

MakeCluster = Callable[..., Awaitable[LocalCluster]]
CHUNK = 64 * 1024


async def test_heartbeats_are_answered_while_every_data_connection_is_held(
    make_cluster: MakeCluster,
) -> None:
    """Eight reads that hold all eight of a node's data connections (as eight stalled
    downloads did) must not make the node look dead: heartbeats have their own."""
    cluster = await make_cluster(nodes=2, replicas=2, heartbeat=0.2, down_after=3)
    await cluster.put("f", os.urandom(CHUNK))
    gateway = cluster.app[keys.CLUSTER]
    member = next(iter(gateway.members.values()))
    chunk = (await cluster.app[keys.META].lookup("f")).chunks[0]
    assert member.node_id in chunk.nodes
    async with AsyncExitStack() as held:
        for _ in range(member.client.max_connections):
            await held.enter_async_context(member.client.open_chunk(chunk.chunk_id, verify=False))
        assert member.client.idle == 0
        seen = member.last_seen or 0.0
        # six heartbeats answered while the data pool has no connection to spare
        await wait_for(lambda: (member.last_seen or 0.0) > seen + 6 * gateway.heartbeat)
        assert member.state is NodeState.UP and member.missed == 0
    response, body = await cluster.get("f")
    assert response.status == 200 and len(body) == CHUNK


@pytest.mark.parametrize("splice", [True, False])
async def test_a_reader_that_stalls_is_dropped_after_the_send_timeout(
    make_cluster: MakeCluster, splice: bool
) -> None:
    """A client with a small receive buffer that reads nothing: after ``send_timeout`` the
    download is closed, logged as 499, and every node connection it held is free."""
    cluster = await make_cluster(send_timeout=1.0, splice=splice)
    await cluster.put("big", os.urandom(200 * CHUNK))  # far more than the sockets hold
    gateway = cluster.app[keys.CLUSTER]
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", cluster.port))
    await asyncio.get_running_loop().sock_sendall(
        sock, b"GET /v1/files/big HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    try:
        counts = cluster.app[keys.HTTP].requests
        await wait_for(lambda: counts[("GET", 499)] == 1, timeout=15)
        await wait_for(lambda: all(m.client.busy == 0 for m in gateway.members.values()))
    finally:
        sock.close()
    response, body = await cluster.get("big")  # and others are served as before
    assert response.status == 200 and len(body) == 200 * CHUNK


async def test_an_upload_that_stops_sending_is_a_408_and_leaves_nothing(
    make_cluster: MakeCluster,
) -> None:
    cluster = await make_cluster(body_timeout=0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", cluster.port)
    writer.write(b"PUT /v1/files/stall HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n")
    writer.write(os.urandom(CHUNK + 10))  # a chunk and a bit, then nothing
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 10)
    assert status_line.startswith(b"HTTP/1.1 408"), status_line
    writer.close()
    budget = cluster.app[keys.BUDGET]
    await wait_for(lambda: budget.in_use == 0)
    assert sum(m.reserved for m in cluster.app[keys.CLUSTER].members.values()) == 0
    assert (await cluster.get("stall"))[0].status == 404
    await cluster.wait_reaped()


async def test_uploads_that_declare_a_body_and_send_none_hold_no_memory(
    make_cluster: MakeCluster,
) -> None:
    cluster = await make_cluster(memory_budget=4 * CHUNK)
    stalled = []
    for i in range(8):  # each declares ten chunks' worth
        _, writer = await asyncio.open_connection("127.0.0.1", cluster.port)
        head = f"PUT /v1/files/s{i} HTTP/1.1\r\nHost: x\r\nContent-Length: {10 * CHUNK}\r\n\r\n"
        writer.write(head.encode())
        await writer.drain()
        stalled.append(writer)
    await wait_for(lambda: len(cluster.app[keys.UPLOADER].active) == 0)
    assert cluster.app[keys.BUDGET].in_use == 0
    data = os.urandom(3 * CHUNK)
    assert (await cluster.put("ordinary", data)).status == 201
    assert (await cluster.get("ordinary"))[1] == data
    for writer in stalled:
        writer.close()


async def test_headers_that_never_finish_are_cut_off(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster(header_timeout=0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", cluster.port)
    writer.write(b"GET /v1/files/x HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # and no more
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the gateway
    writer.close()


async def test_connections_past_the_cap_are_refused_with_a_503(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster(max_connections=4)
    idle = [await asyncio.open_connection("127.0.0.1", cluster.port) for _ in range(4)]
    reader, writer = await asyncio.open_connection("127.0.0.1", cluster.port)
    refusal = await asyncio.wait_for(reader.read(), 10)
    assert refusal.startswith(b"HTTP/1.1 503") and b"too_many_connections" in refusal
    writer.close()
    for _, w in idle:
        w.close()

    async def served() -> bool:
        response, _ = await cluster.get("anything")
        return response.status == 404

    await wait_for(served)
