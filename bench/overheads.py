"""Per-request overheads, each next to the way it was done before, in the same run:

- a canonical JSON log line: orjson written as bytes, the time of day formatted once a
  second, loggers bound once (``dstore.log``), against structlog's time stamper and the
  standard library's encoder through a text stream, bound per call;
- a request's log context (its request id on every line): ``log_context`` against
  structlog's ``bound_contextvars``;
- handing a blocking call to the volumes' writer thread (``WorkerThread``) against
  ``asyncio.to_thread``;
- a request to a storage node (its own process; ping, 16 in flight): client CPU per
  request.

    python -m bench overheads
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog

from dstore.local import storage_argv
from dstore.log import UtcStamp, configure, log_context
from dstore.rpc.client import NodeClient
from dstore.threads import WorkerThread

LINES = 20_000
HOPS = 3_000


def _log_lines(n: int) -> float:
    """CPU seconds per canonical request line as ``dstore.log`` is configured now."""
    log = structlog.get_logger("bench")
    with structlog.contextvars.bound_contextvars(trace="bench-1"):
        start = time.process_time()
        for _ in range(n):
            log.info(
                "http_request",
                method="GET",
                path=None,
                name="small/1/2",
                status=200,
                bytes_in=0,
                bytes_out=4096,
                ms=0.42,
            )
    return (time.process_time() - start) / n


def context_costs(n: int = LINES) -> tuple[float, float]:
    """(before, now) CPU seconds to enter and leave a request's log context."""
    start = time.process_time()
    for i in range(n):
        with structlog.contextvars.bound_contextvars(req=f"bench-{i}"):
            pass
    before = (time.process_time() - start) / n
    start = time.process_time()
    for i in range(n):
        with log_context(req=f"bench-{i}"):
            pass
    return before, (time.process_time() - start) / n


def log_line_costs() -> tuple[float, float]:
    """(before, now) CPU seconds per canonical line."""
    saved = sys.stderr
    with open(os.devnull, "w") as devnull:
        sys.stderr = devnull
        try:
            configure("json", "info", cache=True)
            processors = structlog.get_config()["processors"]
            # the chain as it was: structlog's own time stamper, the standard encoder and a
            # text stream, loggers bound per call
            stamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
            structlog.configure(
                processors=[
                    *(stamper if isinstance(p, UtcStamp) else p for p in processors[:-1]),
                    structlog.processors.JSONRenderer(),
                ],
                logger_factory=structlog.PrintLoggerFactory(file=devnull),
                cache_logger_on_first_use=False,
            )
            before = _log_lines(LINES)
            configure("json", "info", cache=True)
            now = _log_lines(LINES)
        finally:
            sys.stderr = saved
            configure("console", "warning")
    return before, now


async def hop_costs() -> tuple[float, float]:
    """(to_thread, DiskThread): CPU seconds of both threads per call of a no-op."""

    def noop() -> None:
        return None

    async def measure(call: Callable[[Callable[[], None]], Awaitable[None]]) -> float:
        await call(noop)
        start = time.process_time()
        for _ in range(HOPS):
            await call(noop)
        return (time.process_time() - start) / HOPS

    worker = WorkerThread("bench-disk")
    try:
        before = await measure(asyncio.to_thread)
        now = await measure(worker.run)
    finally:
        await worker.stop()
    return before, now


async def request_cost(seconds: float = 3.0) -> tuple[float, float]:
    """(requests/s, client CPU seconds per request) of pings to a node process."""
    secret = "b" * 32
    with tempfile.TemporaryDirectory(prefix="dstore-bench-") as data_dir:
        proc = subprocess.Popen(
            storage_argv(Path(data_dir), "--log-level", "warning"),
            stdout=subprocess.PIPE,
            text=True,
            env=dict(os.environ, DSTORE_CLUSTER_SECRET=secret),
        )
        try:
            assert proc.stdout is not None
            port = int(proc.stdout.readline().strip().rsplit(":", 1)[1])
            async with NodeClient("127.0.0.1", port, secret.encode(), max_connections=16) as c:
                await c.ping()
                done = 0
                deadline = time.perf_counter() + seconds

                async def pinger() -> None:
                    nonlocal done
                    while time.perf_counter() < deadline:
                        await c.ping()
                        done += 1

                start, cpu = time.perf_counter(), time.process_time()
                await asyncio.gather(*(pinger() for _ in range(16)))
                return done / (time.perf_counter() - start), (time.process_time() - cpu) / done
        finally:
            proc.terminate()
            proc.wait()


async def main() -> None:
    print("overheads: CPU per operation, before and now, same run")
    before, now = log_line_costs()
    print(
        f"  canonical log line      {before * 1e6:6.1f} us (as before) -> "
        f"{now * 1e6:6.1f} us   {now / before:4.2f} x"
    )
    before, now = context_costs()
    print(
        f"  request log context     {before * 1e6:6.1f} us (bound_contextvars) -> "
        f"{now * 1e6:6.1f} us (log_context)   {now / before:4.2f} x"
    )
    before, now = await hop_costs()
    print(
        f"  call on a worker thread {before * 1e6:6.1f} us (to_thread) -> "
        f"{now * 1e6:6.1f} us (DiskThread)   {now / before:4.2f} x"
    )
    rate, cost = await request_cost()
    print(f"  node ping, 16 in flight {rate:6.0f}/s, client {cost * 1e6:5.1f} us CPU per request")
