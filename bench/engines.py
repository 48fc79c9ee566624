"""The metadata engines and the number of gateways, side by side in one run: SQLite with one
gateway (the default), PostgreSQL with one gateway, and PostgreSQL with two gateways
behind haproxy (``dstore up --gateways 2``).

Three `dstore up` clusters (3 storage nodes each, replicas 2) run at once and take the
same load in turns, so a drift of the host hits all alike:

- single-stream PUT, then GET, of DSTORE_BENCH_GIB GiB (default 1), in the orders
  S P H and H P S, DSTORE_ENGINES_ROUNDS times (default 2);
- 4 KiB objects at 16 in flight: windows of 1.5 s in the order S P H H P S, as many
  rounds, for PUT and then GET.

It prints each side's rates and the ratios P ÷ S (what PostgreSQL costs) and H ÷ P (what
a second gateway behind haproxy brings).

    python -m bench engines
"""

from __future__ import annotations

import asyncio
import itertools
import os
import statistics
import subprocess
import tempfile
from pathlib import Path

import aiohttp

from bench.ab import HERE, OBJECTS, Side, per_request
from bench.gateway import GIB, MB, SIZE, Up, get, put
from bench.smallcpu import CLIENTS

ROUNDS = int(os.environ.get("DSTORE_ENGINES_ROUNDS", "2"))
SIDES = {
    "S": "",  # SQLite, one gateway
    "P": ":DSTORE_METADATA=postgres",  # PostgreSQL, one gateway
    "H": ":DSTORE_GATEWAYS=2",  # PostgreSQL, two gateways behind haproxy
}


async def main() -> None:
    print(
        f"engines: S = SQLite, one gateway; P = PostgreSQL, one gateway; H = PostgreSQL, two"
        f" gateways behind haproxy. {SIZE / GIB:g} GiB single stream, and 4 KiB objects with"
        f" {CLIENTS} in flight; replicas 2, {ROUNDS} rounds"
    )
    sides = [Side.parse(label, HERE + spec) for label, spec in SIDES.items()]
    root = Path(tempfile.mkdtemp(prefix="dstore-bench-engines-"))
    root.chmod(0o755)  # (PostgreSQL's own user enters it)
    try:
        ups = [Up(root / side.label, 2, env=dict(side.env)) for side in sides]
        async with ups[0] as s, ups[1] as p, ups[2] as h:
            for side, up in zip(sides, (s, p, h), strict=True):
                assert up.proc is not None
                side.url, side.pids = up.url, [up.proc.pid]  # (rates only: CPU is in ab)
                side.session = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=CLIENTS, ssl=False)
                )
            try:
                await large(sides)
                await small(sides)
            finally:
                for side in sides:
                    if side.session is not None:
                        await side.session.close()
    finally:
        subprocess.run(["rm", "-rf", str(root)], check=False)


async def large(sides: list[Side]) -> None:
    rates: dict[tuple[str, str], list[float]] = {}
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=None), connector=aiohttp.TCPConnector(ssl=False)
    ) as session:
        for op in ("PUT", "GET"):
            order = itertools.islice(itertools.cycle(sides + sides[::-1]), len(sides) * ROUNDS)
            for side in order:
                url = f"{side.url}/v1/files/large"
                if op == "PUT":
                    rate = await put(session, url, SIZE)
                else:
                    rate, _ = await get(session, url)
                rates.setdefault((op, side.label), []).append(rate)
    for op in ("PUT", "GET"):
        mean = {side.label: statistics.mean(rates[(op, side.label)]) for side in sides}
        each = "   ".join(
            f"{label} {mean[label] / MB:6.0f} MB/s"
            f" ({', '.join(f'{r / MB:.0f}' for r in rates[(op, label)])})"
            for label in mean
        )
        print(
            f"  {SIZE / GIB:g} GiB {op}: {each}   P ÷ S {mean['P'] / mean['S']:.3f}"
            f"   H ÷ P {mean['H'] / mean['P']:.3f}"
        )


async def small(sides: list[Side]) -> None:
    for side in sides:  # every GET reads an object written first
        await asyncio.gather(
            *(side.request("PUT", f"ab/{c}/{i}") for c in range(CLIENTS) for i in range(OBJECTS))
        )
    for op in ("PUT", "GET"):
        order = itertools.islice(itertools.cycle(sides + sides[::-1]), len(sides) * ROUNDS * 2)
        for side in order:
            await side.window(op)
        rate = {side.label: per_request(side.windows[op])[0] for side in sides}
        each = "   ".join(f"{label} {r:6.0f}/s" for label, r in rate.items())
        print(
            f"  4 KiB {op}: {each}   P ÷ S {rate['P'] / rate['S']:.3f}"
            f"   H ÷ P {rate['H'] / rate['P']:.3f}   H ÷ S {rate['H'] / rate['S']:.3f}"
        )
