"""Two builds of dstore side by side, on one noisy host: CPU per small request, A against B.

Runs after one another drift apart by more than most changes are worth (on our VMs the
same code gave 7.0–9.6 × the do-nothing server's CPU per PUT within an hour). Here two
`dstore up` clusters (gateway + 3 nodes each, replicas 2) run at once and take the same
load in turns: short windows in the order A B B A, repeated, so a drift of the host hits
both alike. Each window counts requests and the CPU time of the cluster's processes
(`/proc`); the idle cluster spends next to nothing meanwhile. It prints, per workload,
each side's mean CPU per request (gateway, nodes) and the ratio B ÷ A with its spread
over the rounds.

    python -m bench ab
    DSTORE_AB_A=/path/to/tree DSTORE_AB_B=/other/tree:DSTORE_LOOKUP_CACHE=0 python -m bench ab
    DSTORE_AB_B=:DSTORE_TLS=1 python -m bench ab      # what TLS costs per small request

A side is a source tree (put first on ``PYTHONPATH`` of its cluster), optionally followed
by ``:NAME=VALUE`` settings for its environment (as many as wanted). Both default to this
tree, which makes an A/A run: the harness's own noise floor. DSTORE_AB_ROUNDS=6 (of 4 windows),
DSTORE_AB_WINDOW=1.5 (seconds per window), DSTORE_AB_SIZE=4096 (bytes per object).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from bench.gateway import Up
from bench.smallcpu import CLIENTS, children, cpu_seconds

ROUNDS = int(os.environ.get("DSTORE_AB_ROUNDS", "6"))
WINDOW = float(os.environ.get("DSTORE_AB_WINDOW", "1.5"))
OBJECTS = 20  # per client, written first; the GETs read them
DATA = os.urandom(int(os.environ.get("DSTORE_AB_SIZE", "4096")))  # each object's bytes
HERE = str(Path(__file__).resolve().parent.parent)


@dataclass
class Side:
    label: str
    tree: str
    env: dict[str, str]
    url: str = ""
    pids: list[int] = field(default_factory=list)
    session: aiohttp.ClientSession | None = None
    written: int = 0  # PUT names used so far, per client
    # per workload: (requests, gateway CPU-s, nodes CPU-s, seconds) of each window
    windows: dict[str, list[tuple[int, float, float, float]]] = field(default_factory=dict)

    @classmethod
    def parse(cls, label: str, spec: str) -> Side:
        tree, *settings = spec.split(":")
        env = dict(item.split("=", 1) for item in settings if item)
        return cls(label, str(Path(tree or HERE).resolve()), env)

    def describe(self) -> str:
        extra = " ".join(f"{k}={v}" for k, v in self.env.items())
        return f"{self.label}: {self.tree} {extra}".rstrip()

    async def request(self, method: str, name: str) -> None:
        assert self.session is not None
        target = f"{self.url}/v1/files/{name}"
        async with self.session.request(
            method, target, data=DATA if method == "PUT" else None
        ) as r:
            await r.read()
            assert r.status in (200, 201), (method, r.status)

    async def window(self, op: str) -> None:
        """Load this side for one window; record what it cost."""
        deadline = time.perf_counter() + WINDOW
        done = 0
        first = self.written

        async def client(c: int) -> None:
            nonlocal done
            i = 0
            while time.perf_counter() < deadline:
                if op == "PUT":
                    await self.request("PUT", f"ab/{c}/{OBJECTS + first + i}")
                else:
                    await self.request("GET", f"ab/{c}/{i % OBJECTS}")
                i += 1
                done += 1
            if op == "PUT":
                self.written = max(self.written, first + i)

        before = [cpu_seconds(p) for p in self.pids]
        start = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(CLIENTS)))
        elapsed = time.perf_counter() - start
        after = [cpu_seconds(p) for p in self.pids]
        used = [a - b for a, b in zip(after, before, strict=True)]
        self.windows.setdefault(op, []).append((done, used[0], sum(used[1:]), elapsed))


def per_request(windows: list[tuple[int, float, float, float]]) -> tuple[float, float, float]:
    """(requests/s, gateway µs, nodes µs) over all windows."""
    n = sum(w[0] for w in windows)
    return (
        n / sum(w[3] for w in windows),
        sum(w[1] for w in windows) / n * 1e6,
        sum(w[2] for w in windows) / n * 1e6,
    )


def round_ratios(a: Side, b: Side, op: str) -> list[float]:
    """B ÷ A of gateway + nodes CPU per request, per round (each side's two windows)."""
    out = []
    wa, wb = a.windows[op], b.windows[op]
    for r in range(0, len(wa), 2):
        cost_a = sum(w[1] + w[2] for w in wa[r : r + 2]) / sum(w[0] for w in wa[r : r + 2])
        cost_b = sum(w[1] + w[2] for w in wb[r : r + 2]) / sum(w[0] for w in wb[r : r + 2])
        out.append(cost_b / cost_a)
    return out


async def main() -> None:
    a = Side.parse("A", os.environ.get("DSTORE_AB_A", HERE))
    b = Side.parse("B", os.environ.get("DSTORE_AB_B", HERE))
    print(
        f"A/B: {len(DATA)}-byte objects, {CLIENTS} clients, replicas 2,"
        f" {ROUNDS} rounds of A B B A, {WINDOW:g} s windows; CPU µs per request"
    )
    print(f"  {a.describe()}\n  {b.describe()}")
    root = Path(tempfile.mkdtemp(prefix="dstore-bench-ab-"))
    try:
        ups = []
        for side in (a, b):
            path = side.tree + os.pathsep + os.environ.get("PYTHONPATH", "")
            ups.append(Up(root / side.label, 2, env=dict(side.env, PYTHONPATH=path)))
        async with ups[0] as up_a, ups[1] as up_b:
            for side, up in ((a, up_a), (b, up_b)):
                assert up.proc is not None
                side.url, side.pids = up.url, [up.proc.pid, *children(up.proc.pid)]
                side.session = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=CLIENTS, ssl=False)
                )
            try:
                for side in (a, b):
                    await asyncio.gather(
                        *(
                            side.request("PUT", f"ab/{c}/{i}")
                            for c in range(CLIENTS)
                            for i in range(OBJECTS)
                        )
                    )
                for op in ("PUT", "GET"):
                    for side in itertools.islice(itertools.cycle((a, b, b, a)), 4 * ROUNDS):
                        await side.window(op)
                    report(a, b, op)
            finally:
                for side in (a, b):
                    if side.session is not None:
                        await side.session.close()
    finally:
        subprocess.run(["rm", "-rf", str(root)], check=False)


def ratio(b: float, a: float) -> str:
    """B ÷ A, or "-" where A spent nothing (a node that every request passed by)."""
    return f"{b / a:.3f}" if a else "-"


def report(a: Side, b: Side, op: str) -> None:
    rate_a, gw_a, nodes_a = per_request(a.windows[op])
    rate_b, gw_b, nodes_b = per_request(b.windows[op])
    ratios = round_ratios(a, b, op)
    print(
        f"  {op}: A {rate_a:5.0f}/s gateway {gw_a:5.0f} nodes {nodes_a:5.0f}   "
        f"B {rate_b:5.0f}/s gateway {gw_b:5.0f} nodes {nodes_b:5.0f}   "
        f"B ÷ A: gateway {ratio(gw_b, gw_a)} nodes {ratio(nodes_b, nodes_a)} "
        f"both {(gw_b + nodes_b) / (gw_a + nodes_a):.3f} "
        f"(rounds {min(ratios):.3f} to {max(ratios):.3f}, "
        f"median {statistics.median(ratios):.3f})"
    )
