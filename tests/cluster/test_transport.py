"""The transport's Channel over real TCP: bounded buffering both ways, EOF and resets."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import mmap
import os
import socket
import struct
import sys

import pytest

from dstore.errors import NodeUnavailable
from dstore.protocol import Connection, Role
from dstore.rpc.transport import STREAM_LIMIT, Channel, FramedStream, open_tcp


async def blaster(total: int) -> tuple[asyncio.Server, int, asyncio.Event]:
    """A server that writes ``total`` bytes as fast as the peer takes them, then closes."""
    done = asyncio.Event()
    payload = os.urandom(1 << 20)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sent = 0
        try:
            while sent < total:
                writer.write(payload[: total - sent])
                sent += min(len(payload), total - sent)
                await writer.drain()
            writer.close()
        finally:
            done.set()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], done


async def test_a_slow_reader_holds_the_sender_back() -> None:
    total = 64 << 20
    server, port, done = await blaster(total)
    channel = await open_tcp("127.0.0.1", port)
    received = 0
    most_buffered = 0
    while received < total:
        await asyncio.sleep(0.002)  # a slow consumer
        most_buffered = max(most_buffered, channel.buffered)
        pieces = await channel.read()
        if not pieces:
            break
        received += sum(len(p) for p in pieces)
    assert received == total
    # reading paused past the limit: never more than the limit plus one receive buffered
    assert most_buffered <= STREAM_LIMIT + (1 << 20)
    assert await channel.read() == []  # then a clean EOF
    assert done.is_set()
    assert channel.transport is not None
    channel.transport.close()
    server.close()
    await server.wait_closed()


async def test_a_reset_after_data_delivers_the_data_then_the_error() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"last words")
        await writer.drain()
        await asyncio.sleep(0.05)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # RST

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    channel = await open_tcp("127.0.0.1", server.sockets[0].getsockname()[1])
    await asyncio.wait_for(channel.wait_closed(), 5)  # the data, then the reset, are in
    assert b"".join(await channel.read()) == b"last words"
    with pytest.raises(OSError):
        await channel.read()
    # and through FramedStream it is a NodeUnavailable, as any lost node is
    stream = FramedStream(channel, Connection(Role.CLIENT, b"s"), io_timeout=1.0)
    with pytest.raises(NodeUnavailable):
        await stream.next_event()
    await stream.aclose()
    server.close()
    await server.wait_closed()


async def test_writes_wait_for_a_peer_that_does_not_read() -> None:
    stalled = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await stalled.wait()  # never reads
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    channel: Channel = await open_tcp("127.0.0.1", server.sockets[0].getsockname()[1])
    stream = FramedStream(channel, Connection(Role.CLIENT, b"s"), io_timeout=0.3)
    chunk = os.urandom(1 << 20)
    with pytest.raises(NodeUnavailable, match="timed out"):
        for _ in range(256):  # far beyond the socket buffers
            await stream.write(chunk)
    assert channel.transport is not None
    assert channel.transport.get_write_buffer_size() <= 2 * STREAM_LIMIT + len(chunk)
    stalled.set()
    await stream.aclose()
    server.close()
    await server.wait_closed()


async def test_a_read_times_out_on_a_silent_peer_and_data_after_it_still_arrives() -> None:
    """The read timeout is one timer on the wait: a silent peer is a ``TimeoutError``
    (``NodeUnavailable`` through ``FramedStream``), and a late byte is not lost."""
    writers: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await reader.read()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    channel = await open_tcp("127.0.0.1", server.sockets[0].getsockname()[1])
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        await channel.read(0.2)
    assert 0.2 <= loop.time() - started < 2
    stream = FramedStream(channel, Connection(Role.CLIENT, b"s" * 32), io_timeout=0.2)
    with pytest.raises(NodeUnavailable, match="timed out"):
        await stream.next_event()
    writers[0].write(b"late")
    assert b"".join(bytes(p) for p in await channel.read(5)) == b"late"
    writers[0].close()
    assert await channel.read(5) == []  # EOF, not a timeout
    server.close()


async def test_a_write_to_a_lost_peer_leaves_no_hold_on_the_bytes_it_was_given() -> None:
    """The error a lost connection keeps is kept without its traceback (and raised as a
    fresh copy): the traceback holds the failed write's frame, so its view of the
    caller's buffer, and the channel itself, in a cycle only the garbage collector
    breaks. On a node that buffer is a pooled direct-read buffer, reused only once no
    view of it is alive: while such garbage waited, every read took fresh memory (the
    first touch of which costs 7 ms for 4 MiB in a VM, docs/benchmarks.md)."""

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()  # a FIN at once: the writes that follow are refused with a reset

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    buf = mmap.mmap(-1, 1 << 16)
    baseline = sys.getrefcount(buf)
    gc.disable()  # a leak must show, not be collected in passing
    try:
        channel = await open_tcp("127.0.0.1", server.sockets[0].getsockname()[1])
        stream = FramedStream(channel, Connection(Role.CLIENT, b"s"), io_timeout=1.0)
        await asyncio.sleep(0.05)  # the FIN is in
        with contextlib.suppress(NodeUnavailable):
            await stream.write(memoryview(buf))  # taken by the kernel; the reset comes back
            await asyncio.sleep(0.05)
            for _ in range(3):  # the send fails now: the transport's write frame has the view
                await stream.write(memoryview(buf))
        await asyncio.wait_for(channel.wait_closed(), 2)
        with pytest.raises(NodeUnavailable, match="lost"):  # not dropped in silence
            await stream.write(b"more")
        for _ in range(2):  # raising the kept error, twice, attaches nothing to it
            with pytest.raises(OSError):
                await channel.read()
        await stream.aclose()
        assert sys.getrefcount(buf) == baseline
        del stream, channel
        assert sys.getrefcount(buf) == baseline
    finally:
        gc.enable()
    buf.close()  # (would raise BufferError with a view alive)
    server.close()
    await server.wait_closed()
