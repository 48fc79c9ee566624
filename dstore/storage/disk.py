"""Blocking disk helpers shared by chunk files and volumes (called in worker threads)."""

from __future__ import annotations

import os
from pathlib import Path

IOV_MAX = 1024  # buffers per writev call


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


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (creations, renames, removals) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
