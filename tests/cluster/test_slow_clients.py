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
from dstore.gateway.upload import GRAIN
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
        await wait_for(
            lambda: all(c.busy == 0 for m in gateway.members.values() for c in m.clients)
        )
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


async def test_uploads_that_send_a_byte_and_stall_hold_a_grain_not_a_chunk(
    make_cluster: MakeCluster,
) -> None:
    """Twenty PUTs that declared 10 MiB, sent one byte (or a grain's worth) and stopped:
    each is charged what it sent, a grain, not a 1 MiB chunk's share; twenty chunks would
    be five budgets' worth. Others upload meanwhile, and each stalled one ends as a 408
    with its grain given back."""
    chunk = 1 << 20
    cluster = await make_cluster(chunk_size=chunk, memory_budget=4 * chunk, body_timeout=2.0)
    stalled = []
    for i in range(20):
        reader, writer = await asyncio.open_connection("127.0.0.1", cluster.port)
        head = f"PUT /v1/files/s{i} HTTP/1.1\r\nHost: x\r\nContent-Length: {10 * chunk}\r\n\r\n"
        writer.write(head.encode() + (b"x" if i % 2 else os.urandom(GRAIN)))
        await writer.drain()
        stalled.append((reader, writer))
    budget = cluster.app[keys.BUDGET]
    await wait_for(lambda: budget.in_use == 20 * GRAIN)
    data = os.urandom(3 * chunk + 5)
    assert (await cluster.put("ordinary", data)).status == 201
    assert (await cluster.get("ordinary"))[1] == data
    for reader, writer in stalled:
        status = await asyncio.wait_for(reader.readline(), 10)
        assert status.startswith(b"HTTP/1.1 408"), status
        writer.close()
    await wait_for(lambda: budget.in_use == 0)
    assert (await cluster.get("s1"))[0].status == 404


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


async def test_stalled_readers_uploads_and_headers_at_once_hurt_no_one(
    make_cluster: MakeCluster,
) -> None:
    """16 downloads whose clients read nothing, 80 uploads that sent a byte or a grain and
    stopped, and 40 requests whose headers never end, all at once: meanwhile the gateway
    stays ready, every node stays up, and ordinary 5 KB and 9 MiB round trips go through
    without waiting for any of them to time out. Then all of it is let go."""
    chunk = 1 << 20
    cluster = await make_cluster(
        replicas=2,
        chunk_size=chunk,
        memory_budget=32 * chunk,
        send_timeout=20.0,
        body_timeout=20.0,
        header_timeout=20.0,
    )
    big = os.urandom(24 * chunk)
    assert (await cluster.put("big", big)).status == 201
    loop = asyncio.get_running_loop()
    held: list[socket.socket] = []

    async def connect(first: bytes, rcvbuf: int | None = None) -> socket.socket:
        sock = socket.socket()
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        held.append(sock)
        await loop.sock_connect(sock, ("127.0.0.1", cluster.port))
        await loop.sock_sendall(sock, first)
        return sock

    gateway = cluster.app[keys.CLUSTER]
    budget = cluster.app[keys.BUDGET]
    try:
        for _ in range(16):
            await connect(b"GET /v1/files/big HTTP/1.1\r\nHost: x\r\n\r\n", rcvbuf=4096)
        for i in range(80):
            head = f"PUT /v1/files/u{i} HTTP/1.1\r\nHost: x\r\nContent-Length: {10 << 20}\r\n\r\n"
            await connect(head.encode() + (b"x" if i % 2 else os.urandom(GRAIN)))
        for i in range(40):
            await connect(f"PUT /v1/files/h{i} HTTP/1.1\r\nHost: x\r\nX-Slow: ".encode())
        await wait_for(lambda: budget.in_use >= 80 * GRAIN and len(held) == 136)
        relayed = sum(m.relays.busy for m in gateway.members.values())
        copying = sum(m.client.busy for m in gateway.members.values())
        small, large = os.urandom(5000), os.urandom(9 << 20)
        for round_ in range(3):
            async with asyncio.timeout(5):  # far less than any timeout a wait would end by
                async with cluster.session.get(f"{cluster.url}/readyz") as r:  # type: ignore[union-attr]
                    assert r.status == 200, await r.text()
                for name, data in ((f"small{round_}", small), (f"large{round_}", large)):
                    assert (await cluster.put(name, data)).status == 201
                    response, body = await cluster.get(name)
                    assert response.status == 200 and body == data
            assert all(m.state is NodeState.UP for m in gateway.members.values())
        # the stalled readers hold relay connections, a few each, and no data connection
        assert relayed >= 16 and copying == 0
        # and room is left: a budget's worth of chunks promised, a grain each charged
        assert budget.in_use < budget.limit * 3 // 4, budget
    finally:
        for sock in held:
            sock.close()
    await wait_for(lambda: budget.in_use == 0, timeout=30)
    await wait_for(
        lambda: all(c.busy == 0 for m in gateway.members.values() for c in m.clients), timeout=30
    )
    assert not cluster.app[keys.UPLOADER].active
