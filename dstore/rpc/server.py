"""The protocol server: accepts connections, runs the handshake, and hands each request to
a handler, one at a time per connection. On shutdown it stops accepting, lets requests in
flight finish within a grace period, and closes idle connections at once.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import structlog

from dstore.errors import NodeUnavailable, ProtocolError, RemoteProtocolError
from dstore.log import log_context
from dstore.protocol import (
    CLOSED,
    Auth,
    Body,
    BodyEnd,
    Connection,
    Error,
    Hello,
    Request,
    Role,
)
from dstore.rpc.transport import Channel, FramedStream, serve_tcp

log = structlog.get_logger("dstore.rpc")

Handler = Callable[[Request, FramedStream], Awaitable[None]]


class BodyReader:
    """The raw body that follows a request, as an async iterable of pieces; ``drain``
    discards whatever the handler did not consume, keeping the connection usable."""

    def __init__(self, stream: FramedStream) -> None:
        self._stream = stream
        self.finished = False

    def __aiter__(self) -> AsyncIterator[memoryview]:
        return self._pieces()

    async def _pieces(self) -> AsyncIterator[memoryview]:
        while not self.finished:
            event = await self._stream.next_event()
            if isinstance(event, Body):
                yield event.data
            elif isinstance(event, BodyEnd):
                self.finished = True
            else:
                raise RemoteProtocolError(f"unexpected {event!r} inside a body")

    async def drain(self) -> None:
        async for _ in self:
            pass


class _ConnectionState:
    __slots__ = ("busy", "ready", "task")

    def __init__(self, task: asyncio.Task[None]) -> None:
        self.task = task
        self.busy = False
        self.ready = False  # past the handshake


class RpcServer:
    def __init__(
        self,
        secret: bytes,
        handler: Handler,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        node_id: str = "",
        io_timeout: float = 30.0,
        idle_timeout: float = 600.0,
        handshake_timeout: float = 10.0,
        max_body: int = 256 << 20,
        max_handshaking: int = 64,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.node_id = node_id
        self.io_timeout = io_timeout
        self.idle_timeout = idle_timeout
        self.handshake_timeout = handshake_timeout
        self.max_body = max_body
        self.max_handshaking = max_handshaking  # connections not yet authenticated, at most
        self.tls = tls  # with a context: TLS only (mutual, if it asks for certificates)
        self.refused = 0  # connections closed at once: too many were handshaking
        self._handshaking = 0
        self._secret = secret
        self._handler = handler
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[None], _ConnectionState] = {}
        self._stopping = False

    def __repr__(self) -> str:
        busy = sum(1 for c in self._connections.values() if c.busy)
        return (
            f"<RpcServer {self.host}:{self.port} {len(self._connections)} connections, {busy} busy>"
        )

    @property
    def connections(self) -> int:
        """Connections open now (handshaking, idle or busy)."""
        return len(self._connections)

    async def start(self) -> None:
        """Bind and listen; ``port`` 0 picks a free port, reported back in ``self.port``."""
        self._server = await serve_tcp(
            self.accept,
            self.host,
            self.port,
            tls=self.tls,
            handshake_timeout=self.handshake_timeout,
        )
        self.port = self._server.sockets[0].getsockname()[1]

    def accept(self, channel: Channel) -> None:
        """Serve a new connection: the TCP listener calls this, as can any other backend
        that makes a connected ``Channel`` (tests join one in memory)."""
        if self._stopping or self._handshaking >= self.max_handshaking:
            if not self._stopping:
                self.refused += 1
                if (
                    self.refused & (self.refused - 1) == 0
                ):  # 1, 2, 4, 8...: a flood, not a line each
                    log.warning(
                        "handshakes_refused", handshaking=self._handshaking, total=self.refused
                    )
            if channel.transport is not None:
                channel.transport.abort()
            return
        self._handshaking += 1
        task = asyncio.create_task(self._accept(channel))
        self._connections[task] = _ConnectionState(task)

    async def _accept(self, channel: Channel) -> None:
        task = asyncio.current_task()
        assert task is not None
        state = self._connections[task]
        conn = Connection(Role.NODE, self._secret, node_id=self.node_id, max_body=self.max_body)
        stream = FramedStream(channel, conn, io_timeout=self.io_timeout)
        try:
            await self._serve(stream, state)
        except RemoteProtocolError as exc:
            log.warning("protocol_error", peer=stream.peer, code=exc.code, error=str(exc))
            await self._send_error_and_close(stream, exc.code, str(exc))
        except (NodeUnavailable, ProtocolError) as exc:
            log.info("connection_lost", peer=stream.peer, error=str(exc))
        except asyncio.CancelledError:
            pass  # shutdown: the connection is closed below
        except Exception:
            log.exception("connection_failed", peer=stream.peer)
        finally:
            if not state.ready:
                self._handshaking -= 1
            del self._connections[task]
            stream.close()  # no waiting: this may run while shutdown cancels us

    async def _serve(self, stream: FramedStream, state: _ConnectionState) -> None:
        conn = stream.conn
        try:
            await self._handshake(stream)
        except TimeoutError:
            raise RemoteProtocolError(
                f"no handshake within {self.handshake_timeout:g} s", code="handshake_timeout"
            ) from None
        if not conn.ready:
            return
        state.ready = True
        self._handshaking -= 1
        while not self._stopping:
            request = await stream.next_event(timeout=self.idle_timeout)
            if request is CLOSED:
                return
            request = _expect(request, Request)
            state.busy = True
            try:
                with log_context(trace=request.trace or None, rid=request.rid, op=request.OP):
                    await self._handler(request, stream)
            finally:
                state.busy = False

    async def _handshake(self, stream: FramedStream) -> None:
        """Hello, challenge, verified auth, welcome, within ``handshake_timeout``; the
        connection is ready after it unless the peer left or had no common version."""
        conn = stream.conn
        async with asyncio.timeout(self.handshake_timeout):
            hello = await stream.next_event()
            if hello is CLOSED:
                return
            await stream.write(conn.answer_hello(_expect(hello, Hello)))
            if conn.version is None:
                return  # no common version: the error frame was sent
            auth = await stream.next_event()
            if auth is CLOSED:
                return
            _expect(auth, Auth)  # verified by the connection: only then may it welcome
            await stream.write(conn.welcome())

    async def _send_error_and_close(self, stream: FramedStream, code: str, message: str) -> None:
        if stream.closed or stream.conn.body_owed:
            return
        try:
            await stream.write(stream.conn.send(Error(code=code, message=message)))
            await stream.flush()
        except (NodeUnavailable, ProtocolError):
            pass  # the peer is gone already; closing is all that is left

    async def close(self, grace: float = 10.0) -> None:
        """Stop accepting, close idle connections, give busy ones ``grace`` seconds."""
        self._stopping = True
        if self._server is not None:
            self._server.close()
        for state in list(self._connections.values()):
            if not state.busy:
                state.task.cancel()
        tasks = [state.task for state in self._connections.values()]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                log.warning("requests_aborted_at_shutdown", count=len(pending))
                await asyncio.wait(pending, timeout=2.0)
        if self._server is not None:
            await self._server.wait_closed()


E = TypeVar("E")


def _expect(event: object, kind: type[E]) -> E:
    """The event, if it is what the protocol allows next; a protocol error otherwise.
    The connection's table already refuses anything else: this is not left to an
    ``assert``, which ``python -O`` removes."""
    if not isinstance(event, kind):
        raise RemoteProtocolError(f"expected {kind.__name__}, got {event!r}")
    return event
