"""CPU per small request, per process: 4 KiB objects, 16 concurrent clients, replicas 2,
through a real `dstore up` (gateway + 3 storage node processes), next to the same client
against the do-nothing aiohttp server (`bench/ceiling.py`) in the same run. CPU time per
request is steadier than requests per second on a noisy 2-core machine, and says which
process the time goes to. Twice: as configured by default (4 KiB files kept inline in
the metadata store) and with every byte on the nodes (``inline_max=0``).

    python -m bench smallcpu        DSTORE_BENCH_SECONDS=6 (per figure)
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.gateway import Up, ceiling_server

SECONDS = float(os.environ.get("DSTORE_BENCH_SECONDS", "6"))
CLIENTS = 16
DATA = os.urandom(4096)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


async def load(url: str, op: str, pids: list[int]) -> tuple[float, list[float]]:
    """(requests/s, CPU seconds per request of each pid and then of this client)."""
    connector = aiohttp.TCPConnector(limit=CLIENTS)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(c: int, i: int, method: str) -> None:
            target = f"{url}/v1/files/small/{c}/{i}"
            async with session.request(method, target, data=DATA if method == "PUT" else None) as r:
                await r.read()
                assert r.status in (200, 201), r.status

        # every GET reads an object written here first
        await asyncio.gather(*(one(c, i, "PUT") for c in range(CLIENTS) for i in range(20)))
        done = 0
        deadline = time.perf_counter() + SECONDS

        async def client(c: int) -> None:
            nonlocal done
            i = 0
            while time.perf_counter() < deadline:
                await one(c, i % 20 if op == "GET" else 100 + i, op)
                i += 1
                done += 1

        before = [cpu_seconds(p) for p in pids] + [time.process_time()]
        start = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(CLIENTS)))
        elapsed = time.perf_counter() - start
        after = [cpu_seconds(p) for p in pids] + [time.process_time()]
    return done / elapsed, [(a - b) / done for a, b in zip(after, before, strict=True)]


async def ceiling() -> dict[str, tuple[float, list[float]]]:
    async with ceiling_server() as (url, pid):
        return {op: await load(url, op, [pid]) for op in ("PUT", "GET")}


async def main() -> None:
    print(f"small requests: 4 KiB, {CLIENTS} clients, replicas 2, CPU µs per request")
    floor = await ceiling()
    root = Path(tempfile.mkdtemp(prefix="dstore-bench-"))
    try:
        # as configured by default (4 KiB files kept inline), then with every byte on
        # the nodes
        for label, settings in (("inline", {}), ("on the nodes", {"inline_max": "0"})):
            print(f"  {label}:")
            await measure(root / label.replace(" ", "-"), settings, floor)
    finally:
        subprocess.run(["rm", "-rf", str(root)], check=False)


async def measure(root: Path, settings: dict[str, str], floor: dict[str, Any]) -> None:
    async with Up(root, 2, env={f"DSTORE_{k.upper()}": v for k, v in settings.items()}) as cluster:
        assert cluster.proc is not None
        pids = [cluster.proc.pid, *children(cluster.proc.pid)]
        for op in ("PUT", "GET"):
            rate, costs = await load(cluster.url, op, pids)
            base_rate, (base_server, _) = floor[op]
            gateway, *nodes, client = (c * 1e6 for c in costs)
            print(
                f"    {op}: {rate:5.0f}/s   gateway {gateway:5.0f}   nodes "
                f"{sum(nodes):5.0f} ({' + '.join(f'{n:.0f}' for n in nodes)})   client "
                f"{client:4.0f}   | do-nothing server {base_rate:5.0f}/s, "
                f"{base_server * 1e6:4.0f} µs   gateway {gateway / (base_server * 1e6):4.1f} x"
            )
