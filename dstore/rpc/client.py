"""A client for one storage node: a bounded pool of authenticated connections, reconnects,
and timeouts on connect, on every read and write, and on every request.

Chunk bodies move in pieces both ways: a put takes bytes or an async iterable of pieces,
a get can be consumed as a stream (``open_chunk``), so no chunk is ever held twice.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any

from dstore.errors import (
    AuthenticationFailed,
    ChunkCorrupt,
    DstoreError,
    NodeUnavailable,
    PeerGone,
    ProtocolError,
    RelayCut,
    RemoteProtocolError,
    from_remote,
)
from dstore.protocol import (
    CLOSED,
    Body,
    BodyEnd,
    Challenge,
    ChunkData,
    ChunkList,
    Connection,
    CorruptList,
    DeleteChunk,
    Deleted,
    Done,
    Error,
    Event,
    GetChunk,
    ListChunks,
    Message,
    Ping,
    Pong,
    PutChunk,
    Request,
    Role,
    Stat,
    StatReply,
    Stored,
    TakeCorrupt,
    Welcome,
)
from dstore.rpc.splice import Splicer
from dstore.rpc.transport import CORK_LIMIT, Connector, FramedStream, open_tcp

BODY_PIECE = 1 << 20
# how often request deadlines are checked: a request may time out up to this late
SWEEP_TICK = 1.0


def _expect(event: Event, kind: type[Message]) -> Any:
    if isinstance(event, Error):
        raise from_remote(event.code, event.message)
    if event is CLOSED:
        raise NodeUnavailable("node closed the connection")
    if not isinstance(event, kind):
        raise RemoteProtocolError(f"expected {kind.OP!r}, got {event!r}")
    return event


class NodeClient:
    """Talks to one storage node at ``host:port``."""

    def __init__(
        self,
        host: str,
        port: int,
        secret: bytes,
        *,
        max_connections: int = 8,
        connect_timeout: float = 5.0,
        io_timeout: float = 30.0,
        request_timeout: float = 120.0,
        connector: Connector = open_tcp,
        read_limit: int | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.node_id = ""
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.io_timeout = io_timeout
        self.request_timeout = request_timeout
        self._secret = secret
        self._connector = connector
        # received bytes buffered per connection before reading pauses (None: the
        # transport's default); a pool for relays keeps bodies in the kernel with a low one
        self.read_limit = read_limit
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: deque[FramedStream] = deque()
        self._spares: set[asyncio.Task[None]] = set()  # connections opening in the background
        self._busy = 0
        self._rids = itertools.count(1)
        self._closed = False
        self._leases: set[_Lease] = set()  # requests in flight, for the deadline sweep
        # the newest (usage_seq, used) the node reported, in stored and stat_reply
        self.usage: tuple[int, int] = (0, 0)
        self._sweep: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        return (
            f"<NodeClient {self.addr} {self._busy}/{self.max_connections} connections busy,"
            f" {len(self._idle)} idle{', closed' if self._closed else ''}>"
        )

    @property
    def busy(self) -> int:
        """Requests in flight on this client's connections."""
        return self._busy

    @property
    def free(self) -> bool:
        """Whether a request would get a connection now, without waiting."""
        return not self._closed and not self._slots.locked()

    @property
    def idle(self) -> int:
        """Connections open and waiting for a request."""
        return len(self._idle)

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    async def __aenter__(self) -> NodeClient:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._closed = True
        if self._sweep is not None and not self._leases:
            self._sweep.cancel()
            self._sweep = None
        for task in list(self._spares):
            task.cancel()
        await asyncio.gather(*self._spares, return_exceptions=True)
        while self._idle:
            await self._idle.popleft().aclose()

    # --- connections ----------------------------------------------------------------------

    async def connect(self) -> FramedStream:
        """A new connection, handshake done, outside the pool: the caller closes it."""
        try:
            async with asyncio.timeout(self.connect_timeout):
                channel = await self._connector(self.host, self.port)
        except TimeoutError as exc:
            raise NodeUnavailable(f"connect to {self.addr} timed out") from exc
        except OSError as exc:
            raise NodeUnavailable(f"connect to {self.addr} failed: {exc}") from exc
        if self.read_limit is not None:
            channel.read_limit = self.read_limit
        stream = FramedStream(
            channel, Connection(Role.CLIENT, self._secret), io_timeout=self.io_timeout
        )
        try:
            async with asyncio.timeout(self.connect_timeout):
                await stream.write(stream.conn.start_handshake())
                _expect(await stream.next_event(), Challenge)
                await stream.write(stream.conn.answer_challenge())
                welcome: Welcome = _expect(await stream.next_event(), Welcome)
        except TimeoutError as exc:
            await stream.aclose()
            raise NodeUnavailable(f"handshake with {self.addr} timed out") from exc
        except BaseException:
            await stream.aclose()
            raise
        self.node_id = welcome.node_id
        return stream

    def _replace(self) -> None:
        """Open a connection in the background in place of one lost only because its
        request was given up (a client that left a GET: the node is fine), so that the
        next request finds one ready and does not wait for a connect and a handshake
        (two round trips, 2-3 ms on a loaded host)."""
        if not self._room(len(self._spares)):
            return
        task = asyncio.get_running_loop().create_task(self._open_spare())
        self._spares.add(task)
        task.add_done_callback(self._spares.discard)

    async def _open_spare(self) -> None:
        try:
            stream = await self.connect()
        except (DstoreError, OSError):
            return  # the next request will find out what is wrong, and say so
        if self._room():
            self._idle.append(stream)
        else:
            await stream.aclose()

    def _room(self, opening: int = 0) -> bool:
        """Whether one more connection fits besides those in use, idle and ``opening``."""
        return not self._closed and self._busy + len(self._idle) + opening < self.max_connections

    async def _take(self) -> FramedStream:
        """An idle pooled connection, else a new one; the caller holds a slot."""
        while self._idle:
            candidate = self._idle.popleft()
            if candidate.reusable:
                return candidate
            await candidate.aclose()
        return await self.connect()

    def _request(self) -> _Lease:
        """``async with client._request() as stream``: one request on a connection."""
        return _Lease(self)

    def _track(self, lease: _Lease) -> None:
        self._leases.add(lease)
        if self._sweep is None:
            self._arm_sweep()

    @property
    def sweep_tick(self) -> float:
        """How often request deadlines are checked (a waiting request touched this often
        stays alive)."""
        return min(SWEEP_TICK, self.request_timeout / 4)

    def _arm_sweep(self) -> None:
        self._sweep = asyncio.get_running_loop().call_later(self.sweep_tick, self._sweep_leases)

    def _sweep_leases(self) -> None:
        """Cancel the requests past their deadline; runs every tick while any are open."""
        self._sweep = None
        now = time.monotonic()
        for lease in list(self._leases):
            if lease.deadline <= now:
                lease.expire()
        if self._leases:
            self._arm_sweep()

    def _rid(self) -> int:
        return next(self._rids)

    async def _call(self, request: Request, reply: type[Message]) -> Any:
        async with self._request() as stream:
            await stream.send(request)
            return _expect(await stream.next_event(), reply)

    # --- operations -----------------------------------------------------------------------

    async def put_chunk(
        self,
        chunk_id: str,
        data: bytes | bytearray | memoryview | list[memoryview] | AsyncIterable[bytes | memoryview],
        *,
        length: int,
        checksum: bytes,
        trace: str = "",
    ) -> bool:
        """Store a chunk durably on the node; returns False if it was there already.
        ``data`` is the whole body, a list of its pieces, or an async iterable of them."""
        request = PutChunk(
            rid=self._rid(), trace=trace, chunk_id=chunk_id, length=length, checksum=checksum
        )
        async with self._request() as stream:
            if length <= CORK_LIMIT:
                stream.cork()
            await stream.send(request, flush=False)
            if isinstance(data, bytes | bytearray | memoryview):
                view = memoryview(data)
                for start in range(0, len(view), BODY_PIECE):
                    await stream.send_body(view[start : start + BODY_PIECE])
            elif isinstance(data, list):
                for piece in data:
                    await stream.send_body(piece)
            else:
                async for streamed in data:
                    await stream.send_body(streamed)
            if stream.conn.body_owed:
                raise DstoreError(f"chunk body ended {stream.conn.body_owed} bytes short")
            if length <= CORK_LIMIT:
                await stream.uncork()
            else:
                await stream.flush()
            stored: Stored = _expect(await stream.next_event(), Stored)
            self._note_usage(stored.usage_seq, stored.used)
            return stored.created

    @asynccontextmanager
    async def open_chunk(
        self,
        chunk_id: str,
        *,
        offset: int = 0,
        length: int | None = None,
        verify: bool = True,
        trace: str = "",
    ) -> AsyncIterator[ChunkStream]:
        """Stream (a range of) a chunk. Iterating yields pieces; the node's checksum verdict
        arrives after the last piece, and a corrupt chunk raises ``ChunkCorrupt`` then.
        ``verify=False`` when the caller hashes the whole chunk itself: the node then
        sends it without reading it first (and its verdict vouches for nothing)."""
        request = GetChunk(
            rid=self._rid(),
            trace=trace,
            chunk_id=chunk_id,
            offset=offset,
            length=length,
            verify=verify,
        )
        lease = self._request()
        async with lease as stream:
            await stream.send(request)
            header: ChunkData = _expect(await stream.next_event(), ChunkData)
            body = ChunkStream(stream, header, lease)
            yield body
            if not body.finished:
                await stream.aclose()  # abandoned mid-body: the connection cannot be reused

    async def get_chunk(
        self, chunk_id: str, *, offset: int = 0, length: int | None = None, trace: str = ""
    ) -> bytes:
        async with self.open_chunk(chunk_id, offset=offset, length=length, trace=trace) as body:
            pieces = [piece async for piece in body]
        return b"".join(pieces)

    async def delete_chunk(
        self, chunk_id: str, *, retire: bool = False, epoch: int = 0, trace: str = ""
    ) -> bool:
        """Delete a chunk; ``retire``: its id is dead for good, and a put of it that
        arrives later is refused (``ChunkRetired``). ``epoch``: the leadership this is
        done under (``Fenced`` if the node has heard of a newer one)."""
        request = DeleteChunk(
            rid=self._rid(), trace=trace, chunk_id=chunk_id, retire=retire, epoch=epoch
        )
        deleted: Deleted = await self._call(request, Deleted)
        return deleted.existed

    async def stat(self, *, epoch: int = 0, trace: str = "") -> StatReply:
        """The node's state; ``epoch``: this gateway's leadership, which the node then
        fences deletes with."""
        request = Stat(rid=self._rid(), trace=trace, epoch=epoch)
        reply: StatReply = await self._call(request, StatReply)
        self._note_usage(reply.usage_seq, reply.used)
        return reply

    def _note_usage(self, seq: int, used: int) -> None:
        if seq > self.usage[0] and used >= 0:
            self.usage = (seq, used)

    async def list_chunks(
        self, *, after: str = "", limit: int = 1000, trace: str = ""
    ) -> ChunkList:
        reply: ChunkList = await self._call(
            ListChunks(rid=self._rid(), trace=trace, after=after, limit=limit), ChunkList
        )
        return reply

    async def take_corrupt(self, *, trace: str = "") -> list[str]:
        """Chunks the node's scrubber found corrupt and moved aside since the last call."""
        reply: CorruptList = await self._call(
            TakeCorrupt(rid=self._rid(), trace=trace), CorruptList
        )
        return reply.chunks

    async def ping(self, *, trace: str = "") -> float:
        """Round-trip time in seconds."""
        start = time.monotonic()
        await self._call(Ping(rid=self._rid(), trace=trace), Pong)
        return time.monotonic() - start


class _Lease:
    """One request on a pooled connection, within the client's request timeout: a slot,
    then an idle connection or a new one; the connection goes back to the pool only if
    the request ended cleanly, otherwise it is closed. Timeouts, protocol errors and a
    closed connection become ``NodeUnavailable``.

    A class, not a generator-based context manager, and a deadline that the client's
    sweep checks about once a second instead of a timer armed per request (as
    ``asyncio.timeout`` does): this runs for every chunk put and get, and dropping the
    two took 10-20 % off the client's CPU per node request (measured, docs/benchmarks.md).
    Like ``asyncio.timeout``, it turns only its own cancellation into the timeout."""

    __slots__ = ("_cancelling", "_client", "_expired", "_stream", "_task", "deadline")

    def __init__(self, client: NodeClient) -> None:
        self._client = client
        self._stream: FramedStream | None = None
        self._expired = False
        self.deadline = 0.0

    @property
    def client(self) -> NodeClient:
        return self._client

    def touch(self) -> None:
        """Push the deadline back: the request is making progress (or waits its turn)."""
        self.deadline = time.monotonic() + self._client.request_timeout

    def expire(self) -> None:
        if not self._expired:
            self._expired = True
            self._task.cancel()

    async def __aenter__(self) -> FramedStream:
        client = self._client
        if client._closed:
            raise NodeUnavailable(f"client for {client.addr} is closed")
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._cancelling = task.cancelling()
        self.deadline = time.monotonic() + client.request_timeout
        client._track(self)
        try:
            await client._slots.acquire()
            try:
                self._stream = await client._take()
            except BaseException:
                client._slots.release()
                raise
        except BaseException as exc:
            client._leases.discard(self)
            if self._given_up(exc):
                client._replace()  # perhaps while connecting: one for the next request
            replacement = self._outcome(exc)
            if replacement is not None:
                raise replacement from exc
            raise
        client._busy += 1
        return self._stream

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        client, stream = self._client, self._stream
        assert stream is not None
        client._busy -= 1
        late: BaseException | None = None  # from closing the connection
        try:
            if (
                exc is None
                and stream.conn.body_owed == 0
                and not client._closed
                and not stream.closed
            ):
                client._idle.append(stream)
            else:
                await stream.aclose()
                if self._given_up(exc):
                    client._replace()
        except BaseException as error:
            late = error
        finally:
            client._slots.release()
            client._leases.discard(self)
        failure = late if late is not None else exc
        replacement = self._outcome(failure)
        if replacement is not None:
            raise replacement from failure
        if late is not None:
            raise late

    def _given_up(self, exc: BaseException | None) -> bool:
        """Whether the request ended because its caller gave it up (cancelled, or left
        mid-reply), not because the node failed it or it timed out."""
        return not self._expired and (exc is None or isinstance(exc, asyncio.CancelledError))

    def _outcome(self, exc: BaseException | None) -> BaseException | None:
        """What to raise instead of ``exc`` (None: ``exc`` itself, if any)."""
        addr = self._client.addr
        if self._expired:
            self._expired = False
            if self._task.uncancel() <= self._cancelling and isinstance(
                exc, asyncio.CancelledError
            ):
                return NodeUnavailable(f"request to {addr} timed out")
        if isinstance(exc, TimeoutError):
            return NodeUnavailable(f"request to {addr} timed out")
        if isinstance(exc, AuthenticationFailed):
            return None  # a wrong cluster secret is a configuration error, not a flaky node
        if isinstance(exc, ProtocolError):
            return NodeUnavailable(f"protocol error with {addr}: {exc}")
        return None


class ChunkStream:
    """The body of one GetChunk reply, consumed piece by piece, or relayed whole to a
    socket by a ``Splicer``."""

    def __init__(self, stream: FramedStream, header: ChunkData, lease: _Lease) -> None:
        self.length = header.length
        self.size = header.size
        self.checksum = header.checksum
        self.checked = header.checked  # the node checked the whole chunk before sending
        self.finished = False
        self._stream = stream
        self._lease = lease
        self._held: list[memoryview] = []  # body pieces received before a ``hold``

    def hold(self) -> None:
        """Stop reading the body from the socket (what arrives stays in the kernel, to be
        relayed from there); ``relay`` sends what was received before. Once relaying, do
        it early: what is read meanwhile is copied through user space."""
        self._held += self._stream.hold()

    @property
    def held_bytes(self) -> int:
        """Body bytes received and held for ``relay`` (the rest is in the kernel)."""
        return sum(map(len, self._held))

    def touch(self) -> None:
        """Keep the request alive past its deadline (it waits for its turn to be sent)."""
        self._lease.touch()

    @property
    def touch_every(self) -> float:
        """How often a waiting request must be touched to stay alive."""
        return self._lease.client.sweep_tick

    async def relay(self, splicer: Splicer, on_sent: Callable[[], None] | None = None) -> None:
        """Send the whole body on through ``splicer``: what was received already from
        user space, the rest spliced from the socket in the kernel. Only for a body the
        node ``checked`` (its verdict, after the body, is known to be good). ``on_sent``
        is called as bytes go out (and while the destination is slow to take them).
        Raises ``RelayCut`` (a ``NodeUnavailable``) when the node fails part-way, after
        every byte it sent went on; ``PeerGone`` when the destination fails."""
        assert self.checked, "only a body the node checked is passed on before its verdict"
        stream = self._stream

        def progress() -> None:
            self.touch()
            if on_sent is not None:
                on_sent()

        try:
            self.hold()
            pieces, self._held = self._held, []
            for piece in pieces:
                await splicer.write(piece, progress)
            left = stream.conn.body_pending
            if left and not stream.tls:
                await splicer.relay(
                    stream.fileno(), left, timeout=stream.io_timeout, on_progress=progress
                )
                stream.conn.body_received(left)
        finally:
            stream.release()
        if stream.tls:  # the socket carries ciphertext: the rest is copied on in user space
            try:
                async for piece in self._pieces():
                    await splicer.write(piece, progress)
            except (RelayCut, PeerGone):
                raise
            except NodeUnavailable as exc:
                raise RelayCut(str(exc)) from exc
            return
        async for _ in self._pieces():
            raise RemoteProtocolError("body bytes after a relayed body")

    def __aiter__(self) -> AsyncIterator[memoryview]:
        return self._pieces()

    async def _pieces(self) -> AsyncIterator[memoryview]:
        while True:
            event = await self._stream.next_event()
            if isinstance(event, Body):
                yield event.data
            elif isinstance(event, BodyEnd):
                break
            else:
                raise RemoteProtocolError(f"unexpected {event!r} inside a chunk body")
        verdict = await self._stream.next_event()
        if isinstance(verdict, Error):
            self.finished = True  # the connection is clean: the node sent its full reply
            if verdict.code == ChunkCorrupt.code:
                raise ChunkCorrupt(verdict.message)
            raise from_remote(verdict.code, verdict.message)
        _expect(verdict, Done)
        self.finished = True
