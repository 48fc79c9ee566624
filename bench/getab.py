"""One large GET, two settings side by side: the splice relay against the copy through the
gateway (or any two environments), on one noisy host.

Two `dstore up` clusters (gateway + 3 nodes each, replicas 2) run at once, each holding one
file of DSTORE_BENCH_GIB GiB; then GETs in the order A B B A, DSTORE_GETAB_ROUNDS times
(default 3), so a drift of the host hits both alike. It prints each GET's rate and, per
round, B ÷ A.

    python -m bench getab
    DSTORE_GETAB_A=SPLICE=0 DSTORE_GETAB_B=SPLICE=1 python -m bench getab
    DSTORE_GETAB_OP=put DSTORE_GETAB_A=/tmp/old DSTORE_GETAB_B=. python -m bench getab
    DSTORE_GETAB_A=SPLICE=1 DSTORE_GETAB_B=TLS=1 python -m bench getab   # what TLS costs

A side is ``NAME=VALUE`` settings joined by ``:``, each set as ``DSTORE_NAME`` in that
cluster's environment, and optionally a source tree to run (an item without ``=``:
``DSTORE_GETAB_A=/tmp/old DSTORE_GETAB_B=.`` compares two builds). The defaults: A copies
(``SPLICE=0``), B splices.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import tempfile
from pathlib import Path

import aiohttp

from bench.gateway import GIB, MB, SIZE, Up, get, put

ROUNDS = int(os.environ.get("DSTORE_GETAB_ROUNDS", "3"))
OP = os.environ.get("DSTORE_GETAB_OP", "get")  # or "put": the PUTs in turns instead


def environment(spec: str) -> dict[str, str]:
    """A side's environment: ``NAME=VALUE`` items as ``DSTORE_NAME``; an item without
    ``=`` is a source tree to run (put first on ``PYTHONPATH``, as in ``bench ab``)."""
    env: dict[str, str] = {}
    for item in (i for i in spec.split(":") if i):
        name, equals, value = item.partition("=")
        if equals:
            env[f"DSTORE_{name.upper()}"] = value
        else:
            env["PYTHONPATH"] = str(Path(item).resolve())
    return env


async def main() -> None:
    a = os.environ.get("DSTORE_GETAB_A", "SPLICE=0")
    b = os.environ.get("DSTORE_GETAB_B", "SPLICE=1")
    root = Path(tempfile.mkdtemp(prefix="dstore-getab-", dir=os.environ.get("DSTORE_BENCH_DIR")))
    print(f"getab: one {OP.upper()} of {SIZE / GIB:.2f} GiB, A = {a}, B = {b}, A B B A x {ROUNDS}")
    timeout = aiohttp.ClientTimeout(total=None)
    try:
        async with (
            Up(root / "a", 2, env=environment(a)) as side_a,
            Up(root / "b", 2, env=environment(b)) as side_b,
            # (a side with TLS=1 serves HTTPS with a private CA: encrypted, not checked)
            aiohttp.ClientSession(
                timeout=timeout, connector=aiohttp.TCPConnector(ssl=False)
            ) as session,
        ):
            urls = {"A": f"{side_a.url}/v1/files/big", "B": f"{side_b.url}/v1/files/big"}
            for url in urls.values():
                await put(session, url, SIZE)
            ratios = []
            for round_ in range(ROUNDS):
                rates: dict[str, list[float]] = {"A": [], "B": []}
                for side in "ABBA":
                    if OP == "put":  # the same name written anew: an overwrite each time
                        rates[side].append(await put(session, urls[side], SIZE))
                    else:
                        rates[side].append((await get(session, urls[side]))[0])
                mean_a, mean_b = (statistics.mean(rates[s]) for s in "AB")
                ratios.append(mean_b / mean_a)
                print(
                    f"  round {round_ + 1}: A {' '.join(f'{r / MB:.0f}' for r in rates['A'])}"
                    f"  B {' '.join(f'{r / MB:.0f}' for r in rates['B'])} MB/s"
                    f"   B/A {mean_b / mean_a:.3f}"
                )
            print(
                f"  B/A median {statistics.median(ratios):.3f} "
                f"(from {min(ratios):.3f} to {max(ratios):.3f})"
            )
    finally:
        subprocess.run(["rm", "-rf", str(root)], check=False)
