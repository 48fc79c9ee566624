"""Blocking disk helpers shared by chunk files and volumes (called in worker threads), and
the aligned buffers of direct reads."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import mmap
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

IOV_MAX = 1024  # buffers per writev call
ALIGN = 4096  # O_DIRECT offsets, lengths and buffer addresses are multiples of this


def write_all(fd: int, pieces: list[bytes | memoryview], offset: int | None = None) -> None:
    """Write every piece, in order, with as few ``writev`` calls as the kernel allows; at
    ``offset`` (``pwritev``) if given, else at the file position."""
    views = [memoryview(p).cast("B") for p in pieces if len(p)]
    while views:
        if offset is None:
            written = os.writev(fd, views[:IOV_MAX])
        else:
            written = os.pwritev(fd, views[:IOV_MAX], offset)
            offset += written
        while written and views:
            if written >= len(views[0]):
                written -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][written:]
                written = 0


_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


def punch_hole(fd: int, offset: int, length: int) -> int:
    """Give the file system back the whole blocks inside ``[offset, offset + length)``
    (``fallocate`` with ``FALLOC_FL_PUNCH_HOLE``: they read as zeros after, the file keeps
    its size). Returns the bytes punched: 0 for a span within one block, or where the
    file system or the platform cannot do it."""
    start = -(-offset // ALIGN) * ALIGN
    end = (offset + length) // ALIGN * ALIGN
    if end <= start or _libc is None:
        return 0
    mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
    fallocate = _libc.fallocate
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if fallocate(fd, mode, start, end - start) != 0:
        err = ctypes.get_errno()
        if err in (errno.EOPNOTSUPP, errno.ENOSYS):
            return 0
        raise OSError(err, os.strerror(err))
    return end - start


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (creations, renames, removals) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def set_direct(fd: int) -> bool:
    """Make an open file read with ``O_DIRECT`` (from the disk straight into our buffer,
    around the page cache); False where the filesystem refuses it."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
    except OSError as exc:
        if exc.errno == errno.EINVAL:  # tmpfs (before Linux 6.6) and others have no O_DIRECT
            return False
        raise
    return True


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in ("cache", "dirty", "writeback", "evicted", "recently_evicted")
    ]


_SYS_CACHESTAT = 451  # Linux 6.5 and later; the same number on x86-64 and arm64
_libc: ctypes.CDLL | None
try:
    _libc = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None
except OSError:
    _libc = None


def cached(fd: int, offset: int, length: int) -> bool:
    """Whether every page of a file range is in the page cache. Asked with ``cachestat``,
    which looks without reading (a probing read would pull pages in); False where the
    kernel cannot tell (before Linux 6.5)."""
    if _libc is None or length <= 0:
        return False
    pages = (offset + length - 1) // mmap.PAGESIZE - offset // mmap.PAGESIZE + 1
    span, stat = _CachestatRange(offset, length), _Cachestat()
    call = (ctypes.c_long(_SYS_CACHESTAT), ctypes.c_long(fd), ctypes.byref(span))
    if _libc.syscall(*call, ctypes.byref(stat), ctypes.c_long(0)) != 0:
        return False
    return bool(stat.cache >= pages)


class BufferPool:
    """Page-aligned buffers of one size, kept for reuse. Fresh memory is costly to touch,
    above all in a VM (a page the guest freed may have gone back to the host, and the
    first touch of it again traps to the hypervisor), so direct reads go into buffers
    that were touched before. A buffer goes back to the pool when its reader has handed
    on its bytes, and is taken again only once no view of it is alive: a transport may
    still hold one (asyncio does from Python 3.12), and CPython counts those views as
    references to the buffer. For one event loop's thread: the pool has no lock."""

    def __init__(self, size: int, keep: int) -> None:
        self.size = size
        self.keep = keep
        self._idle: list[mmap.mmap] = []

    def __repr__(self) -> str:
        return f"<BufferPool {len(self._idle)} of {self.size} bytes idle>"

    @property
    def idle(self) -> tuple[mmap.mmap, ...]:
        """The buffers waiting to be taken, oldest first."""
        return tuple(self._idle)

    def take(self) -> mmap.mmap:
        for i in range(len(self._idle)):
            buf = self._idle[i]
            # references: the list, ``buf``, getrefcount's argument; any more are views
            if sys.getrefcount(buf) == 3:
                del self._idle[i]
                return buf
        return mmap.mmap(-1, self.size)

    def give(self, buf: mmap.mmap) -> None:
        if len(self._idle) < self.keep:
            self._idle.append(buf)


async def to_thread_whole(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """``asyncio.to_thread(fn, *args, **kwargs)``, but a cancel that comes while the call
    runs is held until it ends. A thread cannot be stopped: with a plain ``to_thread``
    the caller is gone by then, and what the call opened (an fd, a temp file) or did (a
    chunk stored) is left to no one. Here the caller gets the outcome, and the cancel is
    raised at its next ``await`` (counted once per ``cancel()``, as it would have been)."""
    task = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kwargs))
    held = False
    try:
        while True:
            try:
                return await asyncio.shield(task)
            except asyncio.CancelledError:
                if task.cancelled():  # (the loop is closing): nothing runs on to wait for
                    held = False
                    raise
                held = True
                if task.done():  # it ended as the cancel came
                    return task.result()
    finally:
        me = asyncio.current_task()
        if held and me is not None:
            me.uncancel()  # the cancel caught above, asked for once more
            me.cancel()
