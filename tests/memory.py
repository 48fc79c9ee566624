"""An in-memory network backend for the transport's ``connector=`` seam (after httpcore's
mock backends and trio's memory streams): two ``Channel``s joined by a pair of
``MemoryTransport``s, with the flow control of a real socket (a paused reader stops
delivery; a writer whose peer holds more than its high-water mark is paused) and an
optional hook that sees, and may change or drop, every write. No sockets, no ports."""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Callable
from typing import Any

from dstore.rpc.server import RpcServer
from dstore.rpc.transport import Channel, Connector

Hook = Callable[[bytes], bytes | None]  # a write as sent -> what is delivered (None: drop)

_ports = itertools.count(40000)


class MemoryTransport(asyncio.Transport):
    """One end: ``write`` delivers to the other end's protocol, in order, on the loop."""

    def __init__(self, protocol: Channel, name: tuple[str, int]) -> None:
        super().__init__()
        self._protocol = protocol
        self._name = name
        self.peer: MemoryTransport | None = None
        self.hook: Hook | None = None  # applied to what this end writes
        self._inbox: deque[bytes] = deque()  # bytes for our protocol, not yet delivered
        self._queued = 0
        self._paused = False
        self._closing = False
        self._lost = False
        self._eof_pending = False
        self._high = 64 << 10
        self._writing_paused = False

    # --- what the protocol on this end calls ---------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self.peer is None:
            return
        chunk: bytes | None = bytes(data)
        if self.hook is not None:
            chunk = self.hook(chunk)
        if chunk:
            self.peer._receive(chunk)
        if self.peer._queued > self._high and not self._writing_paused:
            self._writing_paused = True
            self._protocol.pause_writing()

    def writelines(self, pieces: Any) -> None:
        for piece in pieces:
            self.write(piece)

    def can_write_eof(self) -> bool:
        return False

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """A clean close: what was written still arrives, then the peer sees the end."""
        if self._closing:
            return
        self._closing = True
        if self.peer is not None:
            self.peer._end()
        asyncio.get_running_loop().call_soon(self._connection_lost, None)

    def abort(self) -> None:
        """A reset: the peer loses whatever it had not read yet."""
        if self._lost:
            return
        self._closing = True
        if self.peer is not None and not self.peer._lost:
            self.peer._inbox.clear()
            self.peer._queued = 0
            self.peer._closing = True
            asyncio.get_running_loop().call_soon(
                self.peer._connection_lost, ConnectionResetError("reset by peer")
            )
        asyncio.get_running_loop().call_soon(self._connection_lost, None)

    def pause_reading(self) -> None:
        self._paused = True

    def resume_reading(self) -> None:
        if self._paused:
            self._paused = False
            asyncio.get_running_loop().call_soon(self._pump)

    def is_reading(self) -> bool:
        return not self._paused

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high = high if high is not None else self._high

    def get_write_buffer_size(self) -> int:
        return 0 if self.peer is None else self.peer._queued

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name in ("peername", "sockname"):
            return self._name
        return default  # no socket (so no splice), no TLS

    # --- delivery ----------------------------------------------------------------------------

    def _receive(self, data: bytes) -> None:
        self._inbox.append(data)
        self._queued += len(data)
        asyncio.get_running_loop().call_soon(self._pump)

    def _end(self) -> None:
        self._eof_pending = True
        asyncio.get_running_loop().call_soon(self._pump)

    def _pump(self) -> None:
        while self._inbox and not self._paused and not self._lost:
            data = self._inbox.popleft()
            view = memoryview(data)
            while view:
                buffer = self._protocol.get_buffer(len(view))
                n = min(len(buffer), len(view))
                buffer[:n] = view[:n]
                view = view[n:]
                self._protocol.buffer_updated(n)
            self._queued -= len(data)
        if self.peer is not None and self.peer._writing_paused and self._queued <= self._high // 4:
            self.peer._writing_paused = False
            self.peer._protocol.resume_writing()
        if self._eof_pending and not self._inbox and not self._lost:
            self._eof_pending = False
            self._protocol.eof_received()
            self._closing = True
            self._connection_lost(None)

    def _connection_lost(self, exc: Exception | None) -> None:
        if not self._lost:
            self._lost = True
            self._protocol.connection_lost(exc)


def memory_pair(
    on_server: Callable[[Channel], object],
) -> tuple[Channel, MemoryTransport, MemoryTransport]:
    """A client ``Channel`` joined in memory to a server one handed to ``on_server``; and
    the client's and the server's transports (to set hooks on)."""
    port = next(_ports)
    client, server = Channel(), Channel(on_server)
    to_server = MemoryTransport(client, ("memory-client", port))
    to_client = MemoryTransport(server, ("memory-node", port))
    to_server.peer, to_client.peer = to_client, to_server
    server.connection_made(to_client)
    client.connection_made(to_server)
    return client, to_server, to_client


def memory_connector(
    server: RpcServer, *, hook: Hook | None = None, made: list[MemoryTransport] | None = None
) -> Connector:
    """A connector for ``NodeClient`` that reaches ``server`` in memory; ``hook`` sees what
    the client writes; ``made`` collects each connection's client-side transport."""

    async def connect(host: str, port: int) -> Channel:
        client, to_server, _ = memory_pair(server.accept)
        to_server.hook = hook
        if made is not None:
            made.append(to_server)
        return client

    return connect
