"""Repair benchmark: 4 storage node processes and a gateway in this process (replicas 2,
repair delay 0.5 s). One node is killed for good; we time how long re-replication takes
(MB/s re-replicated), next to a raw node-to-node chunk copy (get from one node, put to
another, same chunks, no metadata) measured in the same run; and the latency of small
GETs while repair runs, against the same GETs with no repair.

    python -m bench repair        (DSTORE_BENCH_REPAIR_MB=256, DSTORE_BENCH_REPAIR_BW=...)
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import aiohttp

from dstore.chunk import new_chunk_id
from dstore.config import GatewayConfig
from dstore.gateway import keys
from dstore.gateway.app import start_gateway
from dstore.local import storage_argv
from dstore.log import configure
from dstore.rpc.client import NodeClient

MB = 1e6
TOTAL = int(os.environ.get("DSTORE_BENCH_REPAIR_MB", "256")) << 20
BANDWIDTH = os.environ.get("DSTORE_BENCH_REPAIR_BW", "1GiB")
SECRET = "bench-cluster-secret"


def start_node(data_dir: Path) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        storage_argv(data_dir, "--log-level", "warning", "--scrub-rate", "0"),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=dict(os.environ, DSTORE_CLUSTER_SECRET=SECRET),
    )
    assert proc.stdout is not None
    port = int(proc.stdout.readline().rsplit(":", 1)[1])
    return proc, port


async def small_get_latencies(url: str, names: list[str], seconds: float) -> list[float]:
    out: list[float] = []
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            for name in names:
                start = time.perf_counter()
                async with session.get(f"{url}/v1/files/{name}") as r:
                    await r.read()
                    assert r.status == 200
                out.append(time.perf_counter() - start)
    return out


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000


async def raw_copy(ports: list[int], chunk_ids: list[str], size: int) -> float:
    """Bytes/s copying chunks node A -> node B with the plain client, one at a time."""
    async with (
        NodeClient("127.0.0.1", ports[0], SECRET.encode()) as a,
        NodeClient("127.0.0.1", ports[1], SECRET.encode()) as b,
    ):
        from dstore.chunk import checksum

        blob = os.urandom(size)
        digest = checksum(blob)
        for cid in chunk_ids:
            await a.put_chunk(cid, blob, length=size, checksum=digest)
        start = time.perf_counter()
        for cid in chunk_ids:
            async with a.open_chunk(cid) as body:
                pieces = [p async for p in body]
            await b.put_chunk(cid, pieces, length=size, checksum=digest)
        elapsed = time.perf_counter() - start
        for cid in chunk_ids:
            await a.delete_chunk(cid)
            await b.delete_chunk(cid)
    return len(chunk_ids) * size / elapsed


async def main() -> None:
    configure("console", "error")
    root = Path(tempfile.mkdtemp(prefix="dstore-bench-", dir=os.environ.get("DSTORE_BENCH_DIR")))
    nodes = [start_node(root / f"n{i}") for i in range(4)]
    config = GatewayConfig(
        listen="127.0.0.1:0",
        data_dir=root / "gw",
        cluster_secret=SECRET,
        storage=[f"127.0.0.1:{port}" for _, port in nodes],
        repair_delay=0.5,
        cache_size=0,  # the latency probe must read from the nodes, not the read cache
        repair_bandwidth=int(BANDWIDTH[:-3]) << 30
        if BANDWIDTH.endswith("GiB")
        else int(BANDWIDTH[:-3]) << 20,
    )
    config.validate()
    runner, port = await start_gateway(config)
    url = f"http://127.0.0.1:{port}"
    try:
        raw = await raw_copy([p for _, p in nodes], [new_chunk_id() for _ in range(32)], 4 << 20)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
            piece = os.urandom(1 << 20)
            for i in range(TOTAL // (64 << 20)):
                async with session.put(f"{url}/v1/files/big{i}", data=piece * 64) as r:
                    assert r.status == 201
            small = [f"small{i}" for i in range(20)]
            for name in small:
                async with session.put(f"{url}/v1/files/{name}", data=os.urandom(64 << 10)) as r:
                    assert r.status == 201
        idle = await small_get_latencies(url, small, 3.0)
        repairer = runner.app[keys.REPAIRER]
        victim, _ = nodes[0]
        victim.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        during_task: asyncio.Task[list[float]] | None = None
        first = 0.0
        while repairer.chunks_repaired == 0 or repairer.queue:
            if repairer.bytes_repaired and not first:
                first = time.monotonic()  # repair has begun: measure the GETs now
                during_task = asyncio.create_task(small_get_latencies(url, small, 3.0))
            await asyncio.sleep(0.01)
            if time.monotonic() - killed > 600:
                raise RuntimeError("repair did not finish")
        done = time.monotonic()
        took = done - killed
        repaired = repairer.bytes_repaired
        rate = repaired / max(done - first, 1e-6)
        during = await during_task if during_task else []
        print(
            f"repair: {TOTAL >> 20} MiB of files, replicas 2, 4 nodes, one SIGKILLed,"
            f" repair bandwidth limit {BANDWIDTH}"
        )
        print(f"  raw node-to-node copy (get + put, 4 MiB chunks)  {raw / MB:7.0f} MB/s")
        print(
            f"  re-replicated {repaired / MB:.0f} MB, done {took:.1f} s after the kill (node"
            f" down after 3 s, delay 0.5 s): {rate / MB:.0f} MB/s = {rate / raw:.2f} x raw copy"
        )
        print(
            f"  small GET latency idle   p50 {pct(idle, 0.5):6.1f} ms"
            f"  p99 {pct(idle, 0.99):6.1f} ms"
            f"  ({len(idle)} GETs)"
        )
        print(
            f"  small GET during repair  p50 {pct(during, 0.5):6.1f} ms  p99 "
            f"{pct(during, 0.99):6.1f} ms  ({len(during)} GETs)"
        )
    finally:
        await runner.cleanup()
        for proc, _ in nodes:
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
        subprocess.run(["rm", "-rf", str(root)], check=False)
