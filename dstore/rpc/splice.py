"""Relaying bytes from one socket to another inside the kernel (Linux ``splice``).

A chunk a storage node sends for an HTTP response otherwise crosses user space twice in
the gateway (``recv`` into a buffer, ``send`` out of it): on a 2-core machine that copy is
a quarter of the gateway's CPU in a GET. A ``Splicer`` moves it node socket -> pipe ->
client socket instead, the pages never mapped into the process (measured:
docs/benchmarks.md, 0.17 CPU-s per GiB against 0.70-0.76 for the copy).

A splicer works on duplicates of the sockets' descriptors, so it can wait on them with
the event loop while their transports (which own the originals) are paused. It never
reorders: the owner's own buffered output must be flushed first (``pending``), and when a
relay is cut on the source's side, what is in the pipe still goes out before the error.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
import sys
import termios
from collections.abc import Callable

from dstore.errors import PeerGone, RelayCut

PIPE_SIZE = 1 << 20
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
# the owner's buffered output is waited for in steps of this (it is empty almost always)
FLUSH_POLL = 0.0005
IDLE_TICK = 0.05  # how often a wait on the destination alone reports that it is alive


def available(sock: socket.socket | None) -> bool:
    """Whether ``splice`` can relay to this socket: Linux, and a plain TCP socket (TLS
    bytes are encrypted in user space)."""
    return (
        hasattr(os, "splice")
        and sock is not None
        and sock.family in (socket.AF_INET, socket.AF_INET6)
        and sock.type == socket.SOCK_STREAM
    )


def unsent(sock: socket.socket | None) -> int:
    """Bytes written to a TCP socket that its peer has not acknowledged yet (Linux's
    ``SIOCOUTQ``; 0 where it cannot be asked, or once the socket is closed)."""
    if sock is None or not hasattr(termios, "TIOCOUTQ") or sock.fileno() < 0:
        return 0
    try:
        packed = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except OSError:
        return 0
    return int.from_bytes(packed, sys.byteorder, signed=True)


class Splicer:
    """Relays into one destination socket. ``pending`` says how many bytes the socket's
    owner still holds buffered; ``timeout`` bounds each wait for the destination to take
    bytes (a client that stalls longer is dropped)."""

    def __init__(
        self, sock: socket.socket, pending: Callable[[], int], *, timeout: float = 120.0
    ) -> None:
        self._dst = os.dup(sock.fileno())
        try:
            self._rd, self._wr = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except BaseException:
            os.close(self._dst)
            raise
        with contextlib.suppress(OSError):  # a smaller pipe only means more calls
            fcntl.fcntl(self._wr, _F_SETPIPE_SZ, PIPE_SIZE)
        self._pending = pending
        self.timeout = timeout
        self.sent = 0  # bytes delivered to the destination
        self.broken = False  # the destination failed: nothing more may go to it
        self._loop = asyncio.get_running_loop()

    def __repr__(self) -> str:
        return f"<Splicer fd={self._dst} sent={self.sent}{' broken' if self.broken else ''}>"

    def close(self) -> None:
        for fd in (self._dst, self._rd, self._wr):
            if fd >= 0:
                os.close(fd)
        self._dst = self._rd = self._wr = -1

    async def _flushed(self) -> None:
        """Wait until the destination's owner has no output buffered (so ours follows it)."""
        waited = 0.0
        while self._pending():
            if waited >= self.timeout:
                self.broken = True
                raise PeerGone(f"the client took no bytes for {self.timeout:.0f} s")
            await asyncio.sleep(FLUSH_POLL)
            waited += FLUSH_POLL

    async def write(
        self, data: memoryview | bytes, on_progress: Callable[[], None] | None = None
    ) -> None:
        """Send bytes from user space (those received before a relay began)."""
        self._check()
        await self._flushed()
        view = memoryview(data)
        while view:
            try:
                n = os.write(self._dst, view)
            except BlockingIOError:
                await self._wait(None, self._dst, on_idle=on_progress)
                continue
            except OSError as exc:
                self.broken = True
                raise PeerGone(f"write to the client failed: {exc}") from exc
            self.sent += n
            view = view[n:]
            if on_progress is not None:
                on_progress()

    async def relay(
        self,
        src: int,
        count: int,
        *,
        timeout: float,
        on_progress: Callable[[], None] | None = None,
    ) -> None:
        """Move ``count`` bytes from socket ``src`` to the destination, waiting at most
        ``timeout`` for the source at a time. Raises ``RelayCut`` if the source fails,
        stalls or closes early (after sending on what it did deliver), ``PeerGone`` if
        the destination does."""
        self._check()
        await self._flushed()
        src = os.dup(src)
        try:
            await self._relay(src, count, timeout, on_progress)
        finally:
            os.close(src)

    async def _relay(
        self,
        src: int,
        count: int,
        source_timeout: float,
        on_progress: Callable[[], None] | None,
    ) -> None:
        left = count  # bytes still to take from the source
        in_pipe = 0
        cut: str | None = None
        while left or in_pipe:
            moved = False
            if left and in_pipe < PIPE_SIZE and cut is None:
                try:
                    n = os.splice(src, self._wr, min(left, PIPE_SIZE - in_pipe), flags=_FLAGS)
                except BlockingIOError:
                    n = -1
                except OSError as exc:
                    cut = f"read from the node failed: {exc}"
                    n = -1
                if n == 0:
                    cut = "the node closed the connection"
                elif n > 0:
                    left -= n
                    in_pipe += n
                    moved = True
            if in_pipe:
                try:
                    n = os.splice(self._rd, self._dst, in_pipe, flags=_FLAGS)
                except BlockingIOError:
                    n = 0
                except OSError as exc:
                    self.broken = True
                    raise PeerGone(f"write to the client failed: {exc}") from exc
                if n:
                    in_pipe -= n
                    self.sent += n
                    moved = True
            if cut is not None and not in_pipe:
                raise RelayCut(cut)
            if moved:
                if on_progress is not None:
                    on_progress()
                continue
            reading = left > 0 and in_pipe < PIPE_SIZE and cut is None
            await self._wait(
                src if reading else None,
                self._dst if in_pipe else None,
                source_timeout,
                on_progress,
            )

    async def _wait(
        self,
        readable: int | None,
        writable: int | None,
        source_timeout: float = 0.0,
        on_idle: Callable[[], None] | None = None,
    ) -> None:
        """Until ``readable`` can be read or ``writable`` written (whichever comes first).
        With bytes to write the destination's timeout applies and blames it, else the
        source's. ``on_idle`` is called every ``IDLE_TICK`` while the wait is on the
        destination alone (the source is not at fault meanwhile)."""
        waiter = self._loop.create_future()

        def wake() -> None:
            if not waiter.done():
                waiter.set_result(None)

        if readable is not None:
            self._loop.add_reader(readable, wake)
        if writable is not None:
            self._loop.add_writer(writable, wake)
        timeout = self.timeout if writable is not None else source_timeout
        deadline = self._loop.time() + timeout
        try:
            while not waiter.done():
                left = deadline - self._loop.time()
                if left <= 0:
                    break
                await asyncio.wait([waiter], timeout=min(left, IDLE_TICK))
                if on_idle is not None and readable is None:
                    on_idle()
        finally:
            if readable is not None:
                self._loop.remove_reader(readable)
            if writable is not None:
                self._loop.remove_writer(writable)
        if not waiter.done():
            if writable is None:
                raise RelayCut(f"the node sent nothing for {timeout:.0f} s")
            self.broken = True  # bytes waiting to go, and the client took none
            raise PeerGone(f"the client took no bytes for {timeout:.0f} s")

    def _check(self) -> None:
        if self.broken or self._dst < 0:
            raise PeerGone("the client connection is gone")
