"""The only code that touches asyncio's network layer: a ``Channel`` (a buffered protocol
on one TCP connection) and ``FramedStream``, which drives a sans-IO protocol
``Connection`` over it with a timeout on every read and write.

Received bytes go from the kernel straight into arena buffers (``recv_into``: one copy)
and travel on as views, so a 4 MiB chunk body reaches the chunk store's ``writev`` or the
gateway's checksum without being copied again in user space (asyncio's ``StreamReader``
copies every byte twice more). Library exceptions (resets, EOFs, timeouts) are translated
here into ``NodeUnavailable``.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections import deque
from collections.abc import Awaitable, Callable
from typing import cast

from dstore.errors import NodeUnavailable
from dstore.protocol import NEED_DATA, Body, Connection, Event, Message

STREAM_LIMIT = 1 << 20  # bytes buffered each way before the sender is held back
# Receive buffers are carved from arenas: 1 MiB ones while bulk data flows (fewer, larger
# reads), 64 KiB ones for request/reply traffic, so an idle connection holds little.
ARENA_SIZE = 1 << 20
SMALL_ARENA = 64 << 10
ARENA_MIN_FREE = 16 << 10  # a fresh arena is started when less than this is left
CORK_LIMIT = 256 << 10  # messages up to this size are sent with one system call

Connector = Callable[[str, int], Awaitable["Channel"]]


class Channel(asyncio.BufferedProtocol):
    """One TCP connection: received pieces queued as views into arenas, with flow control
    both ways (reading pauses past ``STREAM_LIMIT`` unconsumed bytes; writers wait while
    the transport's buffer is over its high-water mark)."""

    def __init__(self, on_connect: Callable[[Channel], object] | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        # bytes received and not yet taken before reading pauses (and at most this per
        # read): lowered on connections whose bodies mostly stay in the kernel (relays)
        self.read_limit = STREAM_LIMIT
        self._on_connect = on_connect
        self._arena = memoryview(bytearray(0))
        self._pos = 0
        self._last_read = 0
        self._pieces: deque[memoryview] = deque()
        self._buffered = 0
        self._eof = False
        self._error: OSError | None = None  # why the connection was lost, if not a clean close
        self._reading_paused = False
        self._held = False  # reading paused by ``hold`` (the socket is being spliced)
        self._writing_paused = False
        self._data_waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def __repr__(self) -> str:
        state = "lost" if self._closed.done() else "eof" if self._eof else "open"
        return f"<Channel {state}, {self._buffered} bytes buffered>"

    @property
    def buffered(self) -> int:
        """Bytes received and not yet taken."""
        return self._buffered

    @property
    def at_eof(self) -> bool:
        """The peer closed its side (what it sent before may still be unread)."""
        return self._eof

    # --- protocol callbacks (the event loop calls these) ----------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = self.transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.transport.set_write_buffer_limits(high=STREAM_LIMIT)
        if self._on_connect is not None:
            self._on_connect(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        if len(self._arena) - self._pos < ARENA_MIN_FREE:
            bulk = self._last_read >= ARENA_MIN_FREE
            self._arena = memoryview(bytearray(ARENA_SIZE if bulk else SMALL_ARENA))
            self._pos = 0
        return self._arena[self._pos : self._pos + self.read_limit]

    def buffer_updated(self, nbytes: int) -> None:
        start = self._pos
        self._pos += nbytes
        self._last_read = nbytes
        self._pieces.append(self._arena[start : self._pos])
        self._buffered += nbytes
        if self._buffered > self.read_limit and not self._reading_paused and self.transport:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake(self._data_waiter)

    def eof_received(self) -> bool:
        self._eof = True
        self._wake(self._data_waiter)
        # we close the transport ourselves (a TLS transport closes itself at EOF: asyncio
        # warns if asked otherwise)
        return self.transport is None or self.transport.get_extra_info("sslcontext") is None

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        if exc is not None:
            error = exc if isinstance(exc, OSError) else ConnectionResetError(str(exc))
            # kept without its traceback: that holds the frame that failed (a transport's
            # write, with the view it was given) and, through it, this channel: a cycle
            # only the garbage collector breaks, late, and until then the buffer behind
            # that view (a node's pooled read buffer) stays taken
            self._error = error.with_traceback(None)
        self._wake(self._data_waiter)
        self._wake(self._drain_waiter)
        if not self._closed.done():
            self._closed.set_result(None)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._wake(self._drain_waiter)

    @staticmethod
    def _wake(waiter: asyncio.Future[None] | None) -> None:
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- used by FramedStream -------------------------------------------------------------

    def writable(self) -> bool:
        """Whether ``drain`` returns at once (no timer needed around it)."""
        return not self._writing_paused or self._closed.done()

    async def read(self, timeout: float | None = None) -> list[memoryview]:
        """Everything received so far (waiting for at least one byte, at most ``timeout``
        seconds: then ``TimeoutError``); ``[]`` at EOF. A connection lost to an error
        raises it once everything before it was read. The timeout is one timer on the
        wait itself, not an ``asyncio.timeout`` around it: every reply and every next
        request is waited for here."""
        if not self._pieces and not self._eof:
            loop = asyncio.get_running_loop()
            deadline = None if timeout is None else loop.time() + timeout
            while not self._pieces and not self._eof:
                waiter = self._data_waiter = loop.create_future()
                timer = None if deadline is None else loop.call_at(deadline, _expire, waiter)
                try:
                    await waiter
                finally:
                    self._data_waiter = None
                    if timer is not None:
                        timer.cancel()
        if not self._pieces and self._error is not None:
            raise self._lost()
        return self.take()

    def take(self) -> list[memoryview]:
        """Everything received so far, without waiting."""
        pieces = list(self._pieces)
        self._pieces.clear()
        self._buffered = 0
        if self._reading_paused and self.transport is not None and not self._held:
            self._reading_paused = False
            self.transport.resume_reading()
        return pieces

    def hold(self) -> None:
        """Stop reading from the socket (until ``release``): what arrives stays in the
        kernel, for someone else to read straight from the socket."""
        if not self._held and self.transport is not None:
            self._held = True
            if not self._reading_paused:
                self._reading_paused = True
                self.transport.pause_reading()

    def release(self) -> None:
        if self._held and self.transport is not None:
            self._held = False
            if self._reading_paused and not self.transport.is_closing():
                self._reading_paused = False
                self.transport.resume_reading()

    async def drain(self) -> None:
        """Wait until the transport's buffer is below its low-water mark."""
        while self._writing_paused and not self._closed.done():
            self._drain_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None
        if self._closed.done():
            raise self._lost()

    def _lost(self) -> OSError:
        """A fresh error saying why the connection was lost, to raise: the stored one,
        raised, would take on the raiser's frames (and their locals) for good."""
        error = self._error
        if error is None:
            return ConnectionResetError("connection lost")
        try:
            return type(error)(*error.args)
        except Exception:  # a subclass with a constructor of its own
            return ConnectionResetError(str(error))

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


async def open_tcp(host: str, port: int) -> Channel:
    """The default network backend; tests inject their own (tests/memory.py joins a client
    to a server in memory, with a hook to change the bytes on the way)."""
    _, channel = await asyncio.get_running_loop().create_connection(Channel, host, port)
    return channel


def open_tls(context: ssl.SSLContext, *, handshake_timeout: float = 10.0) -> Connector:
    """A network backend that dials over TLS with ``context`` (which checks the peer's
    certificate against the address dialled). A failed handshake is ``NodeUnavailable``."""

    async def connect(host: str, port: int) -> Channel:
        try:
            _, channel = await asyncio.get_running_loop().create_connection(
                Channel,
                host,
                port,
                ssl=context,
                server_hostname=host,
                ssl_handshake_timeout=handshake_timeout,
            )
        except ssl.SSLError as exc:
            raise NodeUnavailable(f"TLS to {host}:{port} failed: {exc.reason or exc}") from exc
        return channel

    return connect


async def serve_tcp(
    on_connect: Callable[[Channel], object],
    host: str,
    port: int,
    *,
    tls: ssl.SSLContext | None = None,
    handshake_timeout: float = 10.0,
) -> asyncio.Server:
    """Listen on ``host:port``; ``on_connect`` is called with each new ``Channel`` (with
    ``tls``, once its TLS handshake is done, within ``handshake_timeout``)."""
    return await asyncio.get_running_loop().create_server(
        lambda: Channel(on_connect),
        host,
        port,
        reuse_address=True,
        ssl=tls,
        ssl_handshake_timeout=handshake_timeout if tls is not None else None,
    )


class FramedStream:
    """A protocol connection over one ``Channel``."""

    def __init__(self, channel: Channel, conn: Connection, *, io_timeout: float) -> None:
        assert channel.transport is not None, "the channel is not connected"
        self.conn = conn
        self.io_timeout = io_timeout
        self._channel = channel
        self._transport = channel.transport
        self._closed = False
        self._corked: list[bytes | bytearray | memoryview] | None = None
        # over TLS the socket carries ciphertext: no sendfile or splice from it
        self.tls = self._transport.get_extra_info("sslcontext") is not None
        peer = self._transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)

    def __repr__(self) -> str:
        state = "closed" if self._closed else self.conn.phase.value
        return f"<FramedStream {self.peer} {state}>"

    @property
    def closed(self) -> bool:
        return self._closed or self._transport.is_closing()

    @property
    def reusable(self) -> bool:
        """Fit for another request: open, and the peer has not closed its side (a node
        that stopped closes its idle connections; that is only seen when read)."""
        return not self.closed and not self._channel.at_eof and not self._channel.buffered

    @property
    def can_sendfile(self) -> bool:
        """Whether ``send_file_body`` works here: asyncio's own loops send files from the
        kernel; uvloop has no ``sendfile``; TLS must encrypt in user space."""
        return not self.tls and isinstance(asyncio.get_running_loop(), asyncio.BaseEventLoop)

    async def next_event(self, timeout: float | None = None) -> Event:
        """The next protocol event; reads from the socket only when the connection needs
        data, so the peer is held back by TCP when we consume slowly (backpressure)."""
        while True:
            event = self.conn.next_event()
            if event is not NEED_DATA:
                return event
            pieces = await self._read(timeout)
            if not pieces:
                self.conn.receive_data(b"")
            for piece in pieces:
                self.conn.receive_data(piece)
            timeout = None  # an idle wait applies to the first byte of a frame only

    async def _read(self, timeout: float | None) -> list[memoryview]:
        try:
            # (bytes already here: the channel arms no timer)
            return await self._channel.read(self.io_timeout if timeout is None else timeout)
        except TimeoutError as exc:
            raise NodeUnavailable(f"read from {self.peer} timed out") from exc
        except OSError as exc:
            raise NodeUnavailable(f"read from {self.peer} failed: {exc}") from exc

    def hold(self) -> list[memoryview]:
        """Stop reading from the socket and hand over the body bytes already received
        (at most the body's pending length): the rest of the body is then in the kernel,
        for the caller to splice straight from ``fileno`` and account for with
        ``conn.body_received``. ``release`` reads on."""
        self._channel.hold()
        pieces = []
        while True:
            while self.conn.body_pending:
                event = self.conn.next_event()
                if event is NEED_DATA:
                    break
                assert isinstance(event, Body)
                pieces.append(event.data)
            if not self.conn.body_pending:
                return pieces
            more = self._channel.take()
            if not more:
                return pieces
            for piece in more:
                self.conn.receive_data(piece)

    def release(self) -> None:
        self._channel.release()

    def fileno(self) -> int:
        """The socket's file descriptor (-1 if it has none, or carries TLS)."""
        sock = None if self.tls else self._transport.get_extra_info("socket")
        return -1 if sock is None else int(sock.fileno())

    def cork(self) -> None:
        """Hold writes back until ``uncork``: a small request or reply (header, body and
        trailer) then leaves in one system call instead of several."""
        self._corked = []

    async def uncork(self) -> None:
        pieces, self._corked = self._corked, None
        if pieces:
            await self.write(b"".join(pieces) if len(pieces) > 1 else pieces[0])
        await self.flush()

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise NodeUnavailable(f"connection to {self.peer} is closed")
        if self._transport.is_closing():  # lost: the transport drops writes silently
            raise NodeUnavailable(f"connection to {self.peer} is lost")
        if self._corked is not None:
            self._corked.append(data)
            return
        try:
            self._transport.write(data)
        except (OSError, RuntimeError) as exc:
            raise NodeUnavailable(f"write to {self.peer} failed: {exc}") from exc
        if self._transport.get_write_buffer_size() > STREAM_LIMIT:
            await self.flush()

    async def flush(self) -> None:
        try:
            if self._channel.writable():  # the usual case: no timer to arm
                await self._channel.drain()
                return
            async with asyncio.timeout(self.io_timeout):
                await self._channel.drain()
        except TimeoutError as exc:
            raise NodeUnavailable(f"write to {self.peer} timed out") from exc
        except OSError as exc:
            raise NodeUnavailable(f"write to {self.peer} failed: {exc}") from exc

    async def send(self, message: Message, *, flush: bool = True) -> None:
        await self.write(self.conn.send(message))
        if flush and self._corked is None:
            await self.flush()

    async def send_body(self, data: bytes | bytearray | memoryview) -> None:
        await self.write(self.conn.send_body(data))

    async def send_file_body(self, fd: int, offset: int, count: int) -> None:
        """Send ``count`` body bytes of an open file from ``offset`` with ``sendfile``:
        from the page cache to the socket, never through user space. Fewer bytes than
        that (the file shrank underneath) leave the body owed: the caller must close."""
        if self._closed or self._corked is not None:
            raise NodeUnavailable(f"connection to {self.peer} cannot send a file now")
        loop = asyncio.get_running_loop()
        # wraps an fd already open (no blocking open): loop.sendfile wants a file object
        with open(fd, "rb", buffering=0, closefd=False) as file:  # noqa: ASYNC230
            try:
                # the I/O timeout applies per 4 MiB, as it does to each write
                async with asyncio.timeout(self.io_timeout * max(1.0, count / (4 << 20))):
                    sent = await loop.sendfile(self._transport, file, offset, count)
            except TimeoutError as exc:
                raise NodeUnavailable(f"sendfile to {self.peer} timed out") from exc
            except (OSError, RuntimeError) as exc:
                raise NodeUnavailable(f"sendfile to {self.peer} failed: {exc}") from exc
        self.conn.body_sent(sent)

    def close(self) -> None:
        """Close without waiting: buffered bytes still go out, then the socket closes."""
        if not self._closed:
            self._closed = True
            self._transport.close()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._transport.close()
        try:
            async with asyncio.timeout(1.0):
                await self._channel.wait_closed()
        except TimeoutError:
            pass
