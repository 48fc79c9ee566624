"""``dstore up --follow``: the log files of every process ``dstore up`` started (and the
gateway's own, which then goes to a file too), tailed and shown interleaved on stderr,
each line prefixed with its process and its JSON made readable:
``storage-2 | 12:04:01 warning  replica_read_failed chunk=… node=…``."""

from __future__ import annotations

import asyncio
import itertools
import sys
from pathlib import Path
from typing import IO

import orjson

POLL = 0.2  # seconds between looks at a quiet file
_SKIP = ("event", "level", "timestamp")


def readable(process: str, line: bytes, width: int) -> str:
    """One log line as people read it; a line that is not JSON as it is."""
    text = line.decode("utf-8", "replace").rstrip("\n")
    try:
        entry = orjson.loads(line)
    except orjson.JSONDecodeError:
        return f"{process:<{width}} | {text}"
    if not isinstance(entry, dict):
        return f"{process:<{width}} | {text}"
    stamp = str(entry.get("timestamp", ""))[11:19]
    fields = " ".join(f"{k}={v}" for k, v in entry.items() if k not in _SKIP and v is not None)
    level = str(entry.get("level", ""))
    return f"{process:<{width}} | {stamp} {level:<7} {entry.get('event', '')} {fields}".rstrip()


class Follower:
    """Tails ``logs`` (process name → file) from their ends at start, until cancelled."""

    def __init__(self, logs: dict[str, Path], out: IO[str] | None = None) -> None:
        self.logs = logs
        self.out = out if out is not None else sys.stderr
        self.width = max((len(name) for name in logs), default=0)

    def __repr__(self) -> str:
        return f"<Follower of {len(self.logs)} logs>"

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            for name, path in self.logs.items():
                group.create_task(self._tail(name, path))

    async def _tail(self, name: str, path: Path) -> None:
        for _ in itertools.count():  # (a process may not have made its log yet)
            if await asyncio.to_thread(path.exists):
                break
            await asyncio.sleep(POLL)
        f = await asyncio.to_thread(_open_at_end, path)
        try:
            partial = b""
            while True:
                lines = await asyncio.to_thread(_new_lines, f)
                if not lines:
                    await asyncio.sleep(POLL)
                    continue
                for line in lines:
                    partial += line
                    if not partial.endswith(b"\n"):
                        continue  # (a line still being written)
                    self.out.write(readable(name, partial, self.width) + "\n")
                    partial = b""
                self.out.flush()
        finally:
            f.close()


def _open_at_end(path: Path) -> IO[bytes]:
    f = path.open("rb")
    f.seek(0, 2)
    return f


def _new_lines(f: IO[bytes], limit: int = 1000) -> list[bytes]:
    lines: list[bytes] = []
    while len(lines) < limit and (line := f.readline()):
        lines.append(line)
    return lines
