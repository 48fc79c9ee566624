"""The only code that touches asyncio streams: it drives a sans-IO protocol ``Connection``
from a ``StreamReader``/``StreamWriter`` pair, with a timeout on every read and write.

Library exceptions (resets, EOFs, timeouts) are translated here into ``NodeUnavailable``.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

from dstore.errors import NodeUnavailable
from dstore.protocol import NEED_DATA, Connection, Event, Message

READ_SIZE = 1 << 20
STREAM_LIMIT = 1 << 20  # asyncio buffers up to 2x this before pausing the socket
CORK_LIMIT = 256 << 10  # messages up to this size are sent with one system call

StreamPair = tuple[asyncio.StreamReader, asyncio.StreamWriter]
Connector = Callable[[str, int], Awaitable[StreamPair]]


async def open_tcp(host: str, port: int) -> StreamPair:
    """The default network backend; tests inject their own to add faults."""
    reader, writer = await asyncio.open_connection(host, port, limit=STREAM_LIMIT)
    tune_socket(writer)
    return reader, writer


def tune_socket(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    writer.transport.set_write_buffer_limits(high=STREAM_LIMIT)


class FramedStream:
    """A protocol connection over one asyncio stream pair."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        conn: Connection,
        *,
        io_timeout: float,
    ) -> None:
        self.conn = conn
        self.io_timeout = io_timeout
        self._reader = reader
        self._writer = writer
        self._closed = False
        self._corked: list[bytes | bytearray | memoryview] | None = None
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)

    def __repr__(self) -> str:
        state = "closed" if self._closed else self.conn.phase.value
        return f"<FramedStream {self.peer} {state}>"

    @property
    def closed(self) -> bool:
        return self._closed or self._writer.is_closing()

    async def next_event(self, timeout: float | None = None) -> Event:
        """The next protocol event; reads from the socket only when the connection needs
        data, so the peer is held back by TCP when we consume slowly (backpressure)."""
        while True:
            event = self.conn.next_event()
            if event is not NEED_DATA:
                return event
            self.conn.receive_data(await self._read(timeout))
            timeout = None  # an idle wait applies to the first byte of a frame only

    async def _read(self, timeout: float | None) -> bytes:
        try:
            async with asyncio.timeout(self.io_timeout if timeout is None else timeout):
                return await self._reader.read(READ_SIZE)
        except TimeoutError as exc:
            raise NodeUnavailable(f"read from {self.peer} timed out") from exc
        except OSError as exc:
            raise NodeUnavailable(f"read from {self.peer} failed: {exc}") from exc

    def cork(self) -> None:
        """Hold writes back until ``uncork``: a small request or reply (header, body and
        trailer) then leaves in one system call instead of several."""
        self._corked = []

    async def uncork(self) -> None:
        pieces, self._corked = self._corked, None
        if pieces:
            try:
                self._writer.writelines(pieces)
            except (OSError, RuntimeError) as exc:
                raise NodeUnavailable(f"write to {self.peer} failed: {exc}") from exc
        await self.flush()

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise NodeUnavailable(f"connection to {self.peer} is closed")
        if self._corked is not None:
            self._corked.append(data)
            return
        try:
            self._writer.write(data)
            if self._writer.transport.get_write_buffer_size() > STREAM_LIMIT:
                async with asyncio.timeout(self.io_timeout):
                    await self._writer.drain()
        except TimeoutError as exc:
            raise NodeUnavailable(f"write to {self.peer} timed out") from exc
        except (OSError, RuntimeError) as exc:
            raise NodeUnavailable(f"write to {self.peer} failed: {exc}") from exc

    async def flush(self) -> None:
        try:
            async with asyncio.timeout(self.io_timeout):
                await self._writer.drain()
        except TimeoutError as exc:
            raise NodeUnavailable(f"write to {self.peer} timed out") from exc
        except (OSError, RuntimeError) as exc:
            raise NodeUnavailable(f"write to {self.peer} failed: {exc}") from exc

    async def send(self, message: Message, *, flush: bool = True) -> None:
        await self.write(self.conn.send(message))
        if flush and self._corked is None:
            await self.flush()

    async def send_body(self, data: bytes | bytearray | memoryview) -> None:
        await self.write(self.conn.send_body(data))

    def close(self) -> None:
        """Close without waiting: buffered bytes still go out, then the socket closes."""
        if not self._closed:
            self._closed = True
            self._writer.close()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._writer.close()
        try:
            async with asyncio.timeout(1.0):
                await self._writer.wait_closed()
        except (TimeoutError, OSError):
            pass
