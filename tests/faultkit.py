"""Fault injection for tests: a TCP proxy that can delay, black-hole, cut or reset the
traffic between the gateway and a storage node, switchable while connections are open."""

from __future__ import annotations

import asyncio
import socket
import struct
from contextlib import suppress


class FaultProxy:
    """Listens on 127.0.0.1:<port> and forwards to ``target``. Modes:

    - ``ok``: forward everything;
    - ``delay``: forward, each piece after ``delay`` seconds;
    - ``blackhole``: accept and read everything, forward and answer nothing (a hung node);
    - ``cut``: forward ``cut_after`` more bytes towards the node, then close both sides;
    - ``cut_reply``: the same towards the client (a node that dies part-way through a reply);
    - ``reset``: close every connection at once with a TCP reset;
    - ``refuse``: stop listening (connection refused) until set back.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.mode = "ok"
        self.delay = 0.0
        self.cut_after = 0
        self.port = 0
        self.bytes_to_node = 0
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    def __repr__(self) -> str:
        return f"<FaultProxy :{self.port} -> {self.target[1]} {self.mode}>"

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def set(self, mode: str, *, delay: float = 0.0, cut_after: int = 0) -> None:
        self.mode, self.delay, self.cut_after = mode, delay, cut_after
        if mode == "reset":
            for writer in list(self._writers):
                _reset(writer)
        if mode == "refuse" and self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                _reset(writer)
            self._server = None
        elif mode != "refuse" and self._server is None:
            await self.start()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._pipes):
            task.cancel()
        for writer in list(self._writers):
            writer.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode in ("reset", "refuse"):
            _reset(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            _reset(writer)
            return
        self._writers.update((writer, up_writer))
        to_node = asyncio.create_task(self._pipe(reader, up_writer, towards_node=True))
        to_client = asyncio.create_task(self._pipe(up_reader, writer, towards_node=False))
        self._pipes.update((to_node, to_client))
        await asyncio.wait([to_node, to_client], return_when=asyncio.FIRST_COMPLETED)
        for task in (to_node, to_client):
            task.cancel()
            with suppress(asyncio.CancelledError, OSError):
                await task
            self._pipes.discard(task)
        for w in (writer, up_writer):
            self._writers.discard(w)
            if self.mode == "reset":
                _reset(w)
            else:
                w.close()

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, towards_node: bool
    ) -> None:
        while True:
            data = await reader.read(65536)
            if not data:
                return
            if self.mode == "blackhole":
                continue  # swallowed: the peer waits forever
            if self.mode == "delay":
                await asyncio.sleep(self.delay)
            if (self.mode == "cut" and towards_node) or (
                self.mode == "cut_reply" and not towards_node
            ):
                if self.cut_after <= 0:
                    return
                data = data[: self.cut_after]
                self.cut_after -= len(data)
            if self.mode in ("reset", "refuse"):
                return
            if towards_node:
                self.bytes_to_node += len(data)
            writer.write(data)
            await writer.drain()


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
