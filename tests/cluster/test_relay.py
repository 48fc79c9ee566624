"""Chunks spliced from node sockets to the client's socket (the gateway's zero-copy GET):
the ``Splicer`` over real socket pairs, and whole GETs through an in-process cluster."""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

import aiohttp
import pytest

from dstore.errors import PeerGone, RelayCut
from dstore.gateway import keys
from dstore.gateway.download import Span, SpanFeed
from dstore.rpc import splice
from dstore.rpc.splice import Splicer
from tests.conftest import LocalCluster, chunk_files, read_all, socket_pair, wait_for

CHUNK = 64 * 1024

pytestmark = pytest.mark.skipif(not hasattr(os, "splice"), reason="splice is Linux's")


async def test_a_relay_moves_every_byte_in_order_after_the_owners_output() -> None:
    src_far, src = await socket_pair()
    dst, dst_far = await socket_pair()
    held = [3]  # the owner still holds output: nothing may overtake it
    splicer = Splicer(dst, lambda: held[0])
    assert splice.available(dst)
    data = os.urandom(5_000_001)  # more than the pipe holds, several times
    loop = asyncio.get_running_loop()
    try:
        sender = asyncio.create_task(loop.sock_sendall(src_far, data))
        relay = asyncio.create_task(splicer.relay(src.fileno(), len(data) - 1, timeout=5))
        await asyncio.sleep(0.05)
        assert not relay.done() and splicer.sent == 0
        held[0] = 0
        received = asyncio.create_task(read_all(dst_far, len(data) + 2))
        await relay
        await splicer.write(b"!!")
        await sender
        dst.shutdown(socket.SHUT_WR)
        assert await received == data[:-1] + b"!!"
        assert splicer.sent == len(data) + 1
        assert src.recv(10) == data[-1:]  # not one byte past the count was taken
    finally:
        splicer.close()
        for s in (src_far, src, dst, dst_far):
            s.close()


async def test_a_source_closing_early_is_a_cut_after_its_bytes_went_on() -> None:
    src_far, src = await socket_pair()
    dst, dst_far = await socket_pair()
    splicer = Splicer(dst, lambda: 0)
    try:
        src_far.sendall(b"x" * 100_000)
        src_far.close()
        with pytest.raises(RelayCut):
            await splicer.relay(src.fileno(), 200_000, timeout=5)
        assert splicer.sent == 100_000
        dst.shutdown(socket.SHUT_WR)
        assert await read_all(dst_far, 200_000) == b"x" * 100_000
        # a silent source times out, blamed on the source
        src_far, src = await socket_pair()
        with pytest.raises(RelayCut):
            await splicer.relay(src.fileno(), 10, timeout=0.2)
    finally:
        splicer.close()
        for s in (src_far, src, dst, dst_far):
            s.close()


async def test_a_destination_gone_or_stalled_is_peer_gone() -> None:
    src_far, src = await socket_pair()
    dst, dst_far = await socket_pair()
    splicer = Splicer(dst, lambda: 0, timeout=0.3)
    loop = asyncio.get_running_loop()
    try:
        sender = asyncio.create_task(loop.sock_sendall(src_far, os.urandom(20 << 20)))
        with pytest.raises(PeerGone):  # it reads nothing: the buffers fill, then the wait
            await splicer.relay(src.fileno(), 20 << 20, timeout=5)
        assert splicer.broken
        with pytest.raises(PeerGone):
            await splicer.write(b"more")  # and nothing more goes to it
        sender.cancel()
    finally:
        splicer.close()
        for s in (src_far, src, dst, dst_far):
            s.close()
    src_far, src = await socket_pair()
    dst, dst_far = await socket_pair()
    splicer = Splicer(dst, lambda: 0)
    try:
        dst_far.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        dst_far.close()  # a reset
        await asyncio.sleep(0.05)
        sender = asyncio.create_task(loop.sock_sendall(src_far, os.urandom(1 << 20)))
        with pytest.raises(PeerGone):
            await splicer.relay(src.fileno(), 1 << 20, timeout=5)
        sender.cancel()
    finally:
        splicer.close()
        for s in (src_far, src, dst):
            s.close()


@pytest.mark.parametrize("use_splice", [True, False])
async def test_gets_are_byte_exact_relayed_or_copied(make_cluster: Any, use_splice: bool) -> None:
    cluster: LocalCluster = await make_cluster(splice=use_splice)
    downloader = cluster.app[keys.DOWNLOADER]
    counters = cluster.app[keys.HTTP]
    files = {size: os.urandom(size) for size in (CHUNK + 1, 7 * CHUNK, 20 * CHUNK + 5)}
    for size, data in files.items():
        assert (await cluster.put(f"f{size}", data)).status == 201
    for size, data in files.items():
        before = counters.bytes_out
        response, body = await cluster.get(f"f{size}")
        assert response.status == 200 and body == data
        # relayed bytes are counted too (once the handler is done: the client may have
        # every byte a moment before)
        await wait_for(lambda: counters.bytes_out - before == size)  # noqa: B023
        for lo, hi in ((0, 0), (1, CHUNK + 1), (CHUNK - 3, size - 1), (size - 2, size - 1)):
            response, body = await cluster.get(f"f{size}", headers={"Range": f"bytes={lo}-{hi}"})
            assert response.status == 206 and body == data[lo : hi + 1], (size, lo, hi)
    assert (downloader.relays > 0) is use_splice


async def _slow_get(port: int, path: str, pace: float) -> bytes:
    """A GET from a client with a small receive buffer that reads 16 KiB every ``pace``
    seconds (aiohttp's client cannot shrink its buffers)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 10)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        raw = bytearray()
        async with asyncio.timeout(60):
            while b"\r\n\r\n" not in raw:
                raw += await loop.sock_recv(sock, 4096)
            head, _, body = bytes(raw).partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            got = bytearray(body)
            while len(got) < length:
                piece = await loop.sock_recv(sock, 16 << 10)
                if not piece:
                    break
                got += piece
                await asyncio.sleep(pace)
        return bytes(got)
    finally:
        sock.close()


async def test_a_slow_client_gets_every_byte_and_keeps_its_node_requests_alive(
    make_cluster: Any,
) -> None:
    cluster: LocalCluster = await make_cluster()
    for member in cluster.app[keys.CLUSTER].members.values():
        member.client.request_timeout = 0.3  # relays waiting their turn outlive this
    data = os.urandom(160 * CHUNK)  # past what the gateway's socket buffer takes at once
    assert (await cluster.put("slow", data)).status == 201
    got = await _slow_get(cluster.port, "/v1/files/slow", 0.006)  # ~2.7 MB/s at most
    assert got == data
    downloader = cluster.app[keys.DOWNLOADER]
    assert downloader.relays > 0 and downloader.failovers == 0


async def test_a_corrupt_replica_is_refused_before_a_byte_of_it_is_relayed(
    cluster: LocalCluster,
) -> None:
    data = os.urandom(6 * CHUNK)
    assert (await cluster.put("rotten", data)).status == 201
    version = await cluster.app[keys.META].lookup("rotten")
    for ref in version.chunks:  # rot in every chunk's first replica
        node = next(n for n in cluster.nodes if n.node_id == ref.nodes[0])
        (bad,) = [c for c in chunk_files(node.config.data_dir) if c.name == ref.chunk_id]
        bad.flip(CHUNK // 2, 0x08)
    response, body = await cluster.get("rotten")
    assert response.status == 200 and body == data
    downloader = cluster.app[keys.DOWNLOADER]
    # (a node a loaded host shows as suspect is tried last: its rotten replica may be
    # skipped, so at most one failover per chunk)
    assert 0 < downloader.failovers <= len(version.chunks)
    # every chunk relayed, from its good replica; the last one counted once its node's
    # verdict is in, which may be a moment after the client has every byte
    await wait_for(lambda: downloader.relays == len(version.chunks))
    assert downloader.resumes == 0


async def test_a_client_gone_mid_relay_leaves_nothing_held(cluster: LocalCluster) -> None:
    data = os.urandom(60 * CHUNK)
    assert (await cluster.put("big", data)).status == 201
    for _ in range(3):
        async with aiohttp.ClientSession() as session:
            async with session.get(cluster.file_url("big")) as response:
                assert response.status == 200
                await response.content.readexactly(3 * CHUNK)
            # closed here, mid-body
    budget = cluster.app[keys.BUDGET]
    await wait_for(lambda: budget.in_use == 0, timeout=15)  # (a loaded host takes a while)
    response, body = await cluster.get("big")  # and the gateway serves on
    assert body == data


async def test_the_read_ahead_waits_for_the_first_bytes_to_go_out(
    cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunk 0 alone is read until its first bytes are out: the read-ahead started
    with it would only compete with it for the nodes, their disks and the cores, and
    so put the first byte off (seen: 4-7 ms of 10-20 on two cores). Relayed, and
    copied (``Downloader.stream`` driven directly, to see what was written when)."""
    data = os.urandom(12 * CHUNK)
    assert (await cluster.put("ahead", data)).status == 201
    downloader = cluster.app[keys.DOWNLOADER]
    fetch = downloader.fetch
    launched: list[tuple[int, int]] = []  # (chunk index, bytes out when it was asked for)
    written = 0

    async def watched(span: Span, *args: Any) -> list[memoryview]:
        relay = args[2] if len(args) > 2 else None
        launched.append((span.chunk.index, relay.splicer.sent if relay else written))
        return await fetch(span, *args)

    monkeypatch.setattr(downloader, "fetch", watched)  # a spy: it changes nothing
    response, body = await cluster.get("ahead")
    assert response.status == 200 and body == data
    await wait_for(lambda: downloader.relays == 12)  # (see the corrupt-replica test)
    assert launched[0] == (0, 0) and len(launched) == 12
    assert all(out > 0 for _, out in launched[1:]), launched

    launched.clear()
    version = await cluster.app[keys.META].lookup("ahead")
    got = bytearray()
    status_sent = False

    async def write(piece: memoryview) -> None:
        nonlocal written
        assert status_sent
        got.extend(piece)
        written += len(piece)

    async def send_status() -> None:
        nonlocal status_sent
        assert len(launched) == 1  # the first chunk is in hand, and nothing else asked for
        status_sent = True

    feed = SpanFeed(version.chunks, 0, len(data))
    await downloader.stream(feed, write, before_first_write=send_status)
    assert bytes(got) == data
    assert launched[0] == (0, 0) and len(launched) == 12
    assert all(out > 0 for _, out in launched[1:]), launched
