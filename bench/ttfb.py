"""Time to first byte by file size, through a real `dstore up` (replicas 2): for each
size one file is put, then HEAD, a whole GET (to its first piece, then read to the end)
and a 100-byte range at its start, 5 times each, medians printed. The 4 MiB file (one
whole chunk, read cold like every first chunk) is the baseline measured in the same
run: the first byte must not grow with the file.

    python -m bench ttfb           DSTORE_TTFB_MIB=1,4,64,1024,4096 (file sizes in MiB)
"""

from __future__ import annotations

import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import aiohttp

from bench.gateway import Up, put

MIB = 1 << 20
SIZES = [int(s) for s in os.environ.get("DSTORE_TTFB_MIB", "1,4,64,1024,4096").split(",")]
SAMPLES = 5


async def first_byte(
    session: aiohttp.ClientSession,
    url: str,
    method: str = "GET",
    headers: dict[str, str] | None = None,
) -> float:
    start = time.perf_counter()
    async with session.request(method, url, headers=headers or {}) as r:
        assert r.status in (200, 206), r.status
        if method == "HEAD":
            return time.perf_counter() - start
        await r.content.readany()
        elapsed = time.perf_counter() - start
        while await r.content.readany():  # to the end: no read-ahead left running
            pass
    return elapsed


async def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="dstore-ttfb-"))
    timeout = aiohttp.ClientTimeout(total=None)
    try:
        async with Up(root / "c", 2) as cluster, aiohttp.ClientSession(timeout=timeout) as session:
            for mib in SIZES:
                await put(session, f"{cluster.url}/v1/files/f{mib}", mib * MIB)
            print("time to first byte, replicas 2, median of 5 (ms)")
            base = None  # the first file of at least one whole chunk
            for mib in SIZES:
                url = f"{cluster.url}/v1/files/f{mib}"
                heads = [await first_byte(session, url, "HEAD") for _ in range(SAMPLES)]
                gets = [await first_byte(session, url) for _ in range(SAMPLES)]
                ranges = [
                    await first_byte(session, url, headers={"Range": "bytes=0-99"})
                    for _ in range(SAMPLES)
                ]
                get = statistics.median(gets)
                if base is None and mib >= 4:
                    base = (get, mib)
                ratio = f" ({get / base[0]:4.2f} x the {base[1]} MiB file)" if base else ""
                print(
                    f"  {mib:6d} MiB  HEAD {statistics.median(heads) * 1e3:6.1f}"
                    f"   GET {get * 1e3:6.1f}{ratio}"
                    f"   100-byte range {statistics.median(ranges) * 1e3:6.1f}"
                )
    finally:
        subprocess.run(["rm", "-rf", str(root)], check=False)
