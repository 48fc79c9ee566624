"""Failure benchmarks through a real `dstore up` (default settings: heartbeat 1 s,
suspect after 1 missed beat, down after 3, io timeout 10 s):

- how long until a storage node killed with SIGKILL is shown not `up`, and `down`;
- how long an upload stalls when a node dies (SIGKILL) or hangs (SIGSTOP) under it,
  next to the same upload with no failure in the same run.

    python -m bench failures
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp

from bench.gateway import PIECE, Up

SIZE = 256 << 20


def node_pids(up: Up) -> list[int]:
    assert up.proc is not None
    out = subprocess.run(["pgrep", "-P", str(up.proc.pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


async def states(session: aiohttp.ClientSession, url: str) -> list[str]:
    async with session.get(f"{url}/v1/cluster") as r:
        return [n["state"] for n in (await r.json())["nodes"]]


async def detection(root: Path) -> tuple[float, float]:
    async with Up(root, 2) as up, aiohttp.ClientSession() as session:
        victim = node_pids(up)[0]
        before = await states(session, up.url)
        index = 0
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        not_up = down = 0.0
        while not down and time.monotonic() - killed < 30:
            now = await states(session, up.url)
            changed = [i for i, (a, b) in enumerate(zip(before, now, strict=True)) if a != b]
            if changed:
                index = changed[0]
            if not not_up and now[index] != "up" and changed:
                not_up = time.monotonic() - killed
            if changed and now[index] == "down":
                down = time.monotonic() - killed
            await asyncio.sleep(0.02)
        return not_up, down


async def upload_with_failure(root: Path, sig: int | None) -> tuple[float, float]:
    """(seconds for the upload, longest pause between two body pieces leaving)."""
    async with (
        Up(root, 2) as up,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session,
    ):
        pids = node_pids(up)
        gaps: list[float] = []

        async def body() -> AsyncIterator[bytes]:
            last = time.monotonic()
            for i in range(SIZE // len(PIECE)):
                if sig is not None and i == (SIZE // len(PIECE)) // 3:
                    os.kill(pids[0], sig)
                yield PIECE
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        start = time.monotonic()
        async with session.put(f"{up.url}/v1/files/f", data=body()) as r:
            assert r.status == 201, await r.text()
        elapsed = time.monotonic() - start
        if sig == signal.SIGSTOP:
            os.kill(pids[0], signal.SIGCONT)
        return elapsed, max(gaps)


async def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="dstore-bench-", dir=os.environ.get("DSTORE_BENCH_DIR")))
    not_up, down = await detection(root / "detect")
    print("failures: real `dstore up`, 3 nodes, replicas 2, default settings")
    print(f"  SIGKILLed node shown not up after {not_up:.2f} s, down after {down:.2f} s")
    base, base_gap = await upload_with_failure(root / "base", None)
    print(
        f"  upload {SIZE >> 20} MiB, no failure:     {base:5.2f} s, longest pause "
        f"{base_gap * 1000:6.0f} ms"
    )
    for name, sig in (("SIGKILL", signal.SIGKILL), ("SIGSTOP (hung)", signal.SIGSTOP)):
        took, gap = await upload_with_failure(root / name.split()[0], sig)
        print(
            f"  upload {SIZE >> 20} MiB, node {name:<14} {took:5.2f} s, longest pause "
            f"{gap * 1000:6.0f} ms  (+{took - base:.2f} s)"
        )
    subprocess.run(["rm", "-rf", str(root)], check=False)
