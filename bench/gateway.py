"""Gateway benchmarks through a real `dstore up` (gateway + 3 storage node processes):

- single-stream PUT of 1 GiB, replicas 1 and 2, against min(discard-server ceiling,
  fsync'd disk write / replicas) measured in the same run;
- single-stream GET of 1 GiB against the generate-server ceiling, measured in turns
  with it (ceiling, GET, GET, ceiling, 3 rounds: the ceiling drifts 2x between runs),
  and the first read after the upload on its own (the one no page cache holds); against
  the disk's cold read (``O_DIRECT``, 4 readers), since nodes read chunks no cache holds;
- gateway peak RSS while uploading 1 GiB and 4 GiB;
- 4 KiB objects, 16 concurrent clients, replicas 2: PUT/s and GET/s as configured by
  default (kept inline in the metadata store), then on the nodes (``inline_max=0``)
  with the gateway's read cache on and off, and with every chunk in a file of its own
  (``small_chunk_max=0``, read cache off: the baseline for volume files), each on a
  fresh cluster; next to the same client against the do-nothing aiohttp server (the
  small-request ceiling of the Python front end, measured in the same run);
- time to first byte of a GET for a 1 MiB and a 1 GiB file.

    python -m bench gateway        DSTORE_BENCH_GIB=1 (file size), DSTORE_BENCH_BIG_GIB=4,
                                   DSTORE_BENCH_GET_ROUNDS=3
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp

from bench.protocol import disk_read, disk_write
from dstore.pgserver import PostgresServer

GIB = 1 << 30
SIZE = int(float(os.environ.get("DSTORE_BENCH_GIB", "1")) * GIB)
BIG = int(float(os.environ.get("DSTORE_BENCH_BIG_GIB", "4")) * GIB)
PIECE = os.urandom(1 << 20)
MB = 1e6
GET_ROUNDS = int(os.environ.get("DSTORE_BENCH_GET_ROUNDS", "3"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Up:
    """`dstore up` as a process: the gateway is that process (for its RSS)."""

    def __init__(
        self, data_dir: Path, replicas: int, *, env: dict[str, str] | None = None, **settings: str
    ) -> None:
        """``settings``: ``DSTORE_*`` variables by their short names; ``env``: any others.
        ``DSTORE_TLS=1`` among them starts it with ``--tls`` (HTTPS, mutual TLS node links;
        the benchmarks' clients encrypt but do not check the private CA).
        ``DSTORE_METADATA=postgres`` puts the gateway's metadata on a private PostgreSQL
        server started for it (``dstore.pgserver``, fsync on, in ``data_dir/pg``).
        ``DSTORE_GATEWAYS=N`` (N > 1) runs N gateways behind haproxy (``dstore up
        --gateways``, on its own private PostgreSQL); the RSS is then ``dstore up``'s own."""
        self.data_dir = data_dir
        self.replicas = replicas
        self.env = dict(env or {}, **{f"DSTORE_{k.upper()}": v for k, v in settings.items()})
        self.tls = self.env.pop("DSTORE_TLS", "0") not in ("0", "")
        self.gateways = int(self.env.pop("DSTORE_GATEWAYS", "1"))
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self.s3_url = ""  # (the S3 API's, when it is on)
        self.postgres: PostgresServer | None = None

    async def __aenter__(self) -> Up:
        pg = self.data_dir.resolve() / "pg"
        if self.gateways > 1 or self.env.get("DSTORE_METADATA") == "postgres":
            for folder in (pg.parent, pg.parent.parent):  # (the server's user enters)
                folder.mkdir(parents=True, exist_ok=True)
                folder.chmod(folder.stat().st_mode | 0o011)
        if self.env.get("DSTORE_METADATA") == "postgres":
            root = pg
            self.postgres = await asyncio.to_thread(PostgresServer(root).start)
            self.env["DSTORE_METADATA"] = await self.postgres.create_database("dstore")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dstore",
                "up",
                "--port",
                "0",
                "--replicas",
                str(self.replicas),
                "--data-dir",
                str(self.data_dir.resolve()),
                *(["--tls"] if self.tls else []),
                *(["--gateways", str(self.gateways)] if self.gateways > 1 else []),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=dict(os.environ, **self.env),  # default log level: canonical lines cost too
            # ``-m`` puts the working directory ahead of PYTHONPATH: run from the tree the
            # side names, or a run from a checkout would use that checkout's code for both
            cwd=self.env.get("PYTHONPATH", "").split(os.pathsep)[0] or None,
        )
        assert self.proc.stdout is not None
        line = await asyncio.to_thread(self.proc.stdout.readline)
        self.url = line.split()[3]
        while line and not line.startswith("try:"):  # (what else it says, up to its hint)
            line = await asyncio.to_thread(self.proc.stdout.readline)
            if line.startswith("S3 API:"):
                self.s3_url = line.split()[2]
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=False)) as session:
            for _ in range(100):
                async with session.get(f"{self.url}/readyz") as r:
                    if r.status == 200:
                        break
                await asyncio.sleep(0.1)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        await asyncio.to_thread(self.proc.wait, 30)
        if self.postgres is not None:
            await asyncio.to_thread(self.postgres.stop)

    def peak_rss(self) -> int:
        assert self.proc is not None
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        match = re.search(r"VmHWM:\s+(\d+) kB", status)
        return int(match.group(1)) * 1024 if match else 0

    def rss(self) -> int:
        assert self.proc is not None
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        match = re.search(r"VmRSS:\s+(\d+) kB", status)
        return int(match.group(1)) * 1024 if match else 0


async def body(size: int) -> AsyncIterator[bytes]:
    sent = 0
    while sent < size:
        n = min(len(PIECE), size - sent)
        yield PIECE if n == len(PIECE) else PIECE[:n]
        sent += n


async def put(session: aiohttp.ClientSession, url: str, size: int) -> float:
    start = time.perf_counter()
    async with session.put(url, data=body(size), headers={"Content-Length": str(size)}) as r:
        await r.read()
        assert r.status == 201, (r.status, await r.text())
    return size / (time.perf_counter() - start)


async def get(
    session: aiohttp.ClientSession, url: str, *, first_only: bool = False
) -> tuple[float, float]:
    """(bytes/s, seconds to first byte); ``first_only``: the connection is dropped after
    the first piece (the rate is then meaningless)."""
    start = time.perf_counter()
    got = 0
    first = 0.0
    async with session.get(url) as r:
        assert r.status == 200
        async for piece in r.content.iter_any():
            if not first:
                first = time.perf_counter() - start
            got += len(piece)
            if first_only:
                r.close()
                break
    return got / (time.perf_counter() - start), first


@asynccontextmanager
async def ceiling_server() -> AsyncIterator[tuple[str, int]]:
    """The do-nothing aiohttp server (``bench/ceiling.py``) in its own process, ready:
    (its URL, its pid)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bench.ceiling", str(port)])
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(100):
                try:
                    async with session.get(f"{url}/v1/files/x?size=1") as r:
                        await r.read()
                        break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.05)
        yield url, proc.pid
    finally:
        proc.terminate()
        proc.wait()


async def ceilings(size: int) -> tuple[float, float, float, float]:
    """(PUT, GET bytes/s of one stream; 4 KiB PUT/s, GET/s of ``small_objects``) against
    the do-nothing aiohttp server, with the same client as dstore gets."""
    async with ceiling_server() as (base, _), aiohttp.ClientSession() as session:
        url = f"{base}/v1/files/x"
        up = statistics.median([await put(session, url, size) for _ in range(3)])
        down = statistics.median([(await get(session, f"{url}?size={size}"))[0] for _ in range(3)])
        small_put, small_get = await small_objects(base)
    return up, down, small_put, small_get


async def get_in_turns(session: aiohttp.ClientSession, url: str) -> tuple[float, float]:
    """(median GET bytes/s, median ratio to the generate ceiling), the ceiling measured
    in turns with dstore's GET: ceiling, GET, GET, ceiling, ``GET_ROUNDS`` times, so
    the host's drift (which moves the ceiling by 2x from one run to the next) hits both
    alike. The ceiling server runs (idle) during dstore's GETs, as dstore's cluster
    runs (idle) during the ceiling's."""
    rates: list[float] = []
    ratios: list[float] = []
    async with ceiling_server() as (base, _):
        generate = f"{base}/v1/files/x?size={SIZE}"
        for _ in range(GET_ROUNDS):
            first = (await get(session, generate))[0]
            ours = [(await get(session, url))[0] for _ in range(2)]
            last = (await get(session, generate))[0]
            rates += ours
            ratios.append(sum(ours) / (first + last))
            print(
                f"    round: ceiling {first / MB:.0f}, GET {ours[0] / MB:.0f} {ours[1] / MB:.0f}, "
                f"ceiling {last / MB:.0f} MB/s: {ratios[-1]:.3f} x"
            )
    return statistics.median(rates), statistics.median(ratios)


async def small_objects(url: str, clients: int = 16, seconds: float = 5.0) -> tuple[float, float]:
    data = os.urandom(4096)
    names = [f"small/{c}/{i}" for c in range(clients) for i in range(100_000)]

    written = [0] * clients

    async def run(op: str, session: aiohttp.ClientSession) -> float:
        done = 0
        deadline = time.perf_counter() + seconds
        start = time.perf_counter()

        async def client(c: int) -> None:
            nonlocal done
            i = 0
            while time.perf_counter() < deadline:
                name = names[c * 100_000 + (i % written[c] if op == "get" else i)]
                if op == "put":
                    async with session.put(f"{url}/v1/files/{name}", data=data) as r:
                        assert r.status == 201, await r.text()
                else:
                    async with session.get(f"{url}/v1/files/{name}") as r:
                        assert r.status == 200
                        await r.read()
                done += 1
                i += 1
                if op == "put":
                    written[c] = i

        await asyncio.gather(*(client(c) for c in range(clients)))
        return done / (time.perf_counter() - start)

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        puts = await run("put", session)
        gets = await run("get", session)
    return puts, gets


async def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="dstore-bench-", dir=os.environ.get("DSTORE_BENCH_DIR")))
    print(f"gateway: 1 file of {SIZE / GIB:.2f} GiB, 3 storage nodes, one host")
    disk = disk_write(256 << 20, root)
    disk_in = disk_read(512 << 20, root)
    up_ceiling, down_ceiling, small_put_ceiling, small_get_ceiling = await ceilings(SIZE)
    print(f"  aiohttp discard-server ceiling (PUT)   {up_ceiling / MB:7.0f} MB/s")
    print(f"  aiohttp generate-server ceiling (GET)  {down_ceiling / MB:7.0f} MB/s")
    print(
        f"  same server, 4 KiB objects, 16 clients {small_put_ceiling:7.0f} PUT/s "
        f"{small_get_ceiling:6.0f} GET/s   (the small-request ceiling)"
    )
    print(f"  disk write+fsync+rename                {disk / MB:7.0f} MB/s")
    print(f"  disk read, O_DIRECT, 4 readers         {disk_in / MB:7.0f} MB/s   (GET reads cold)")
    timeout = aiohttp.ClientTimeout(total=None)
    for replicas in (1, 2):
        async with (
            Up(root / f"r{replicas}", replicas) as cluster,
            aiohttp.ClientSession(timeout=timeout) as session,
        ):
            url = f"{cluster.url}/v1/files/big"
            rate = await put(session, url, SIZE)
            ceiling = min(up_ceiling, disk / replicas)
            print(
                f"  PUT replicas={replicas}  {rate / MB:7.0f} MB/s   {rate / ceiling:5.2f} x "
                f"min(discard ceiling, disk/{replicas})   gateway peak RSS "
                f"{cluster.peak_rss() / 2**20:.0f} MiB"
            )
            if replicas == 2:
                cold = (await get(session, url))[0]  # the first read: no page cache has it
                grate, turns = await get_in_turns(session, url)
                print(
                    f"  GET                {grate / MB:7.0f} MB/s   {turns:5.2f} x "
                    f"generate ceiling (in turns: {GET_ROUNDS} rounds of ceiling, GET, GET, "
                    f"ceiling; median of the rounds' ratios)"
                )
                print(
                    f"                     the first GET {cold / MB:.0f} MB/s = "
                    f"{cold / down_ceiling:.2f} x the ceiling above; {grate / disk_in:.2f} x "
                    "disk read"
                )
                async with session.put(f"{cluster.url}/v1/files/one-mib", data=PIECE) as r:
                    assert r.status == 201
                ttfb_small = statistics.median(
                    [(await get(session, f"{cluster.url}/v1/files/one-mib"))[1] for _ in range(9)]
                )
                ttfb_big = statistics.median([(await get(session, url))[1] for _ in range(5)])
                print(
                    f"  TTFB  1 MiB file {ttfb_small * 1000:6.1f} ms   1 GiB file "
                    f"{ttfb_big * 1000:6.1f} ms"
                )
    # each small-object run on a cluster of its own: in the cluster above, the nodes'
    # scrubbers are still verifying the GiB just uploaded
    async with Up(root / "small", 2) as cluster:
        small_put, small_get = await small_objects(cluster.url)
        print(
            f"  4 KiB objects, 16 clients: {small_put:6.0f} PUT/s  {small_get:6.0f} GET/s"
            f"   ({small_put / small_put_ceiling:4.2f} x, {small_get / small_get_ceiling:4.2f} x"
            " the small-request ceiling; kept inline)"
        )
    async with Up(root / "chunked", 2, inline_max="0") as cluster:
        small_put, small_get = await small_objects(cluster.url)
        print(
            f"  same, on the nodes:        {small_put:6.0f} PUT/s  {small_get:6.0f} GET/s"
            f"   (inline_max 0: two replicas each; {small_put / small_put_ceiling:4.2f} x,"
            f" {small_get / small_get_ceiling:4.2f} x)"
        )
    async with Up(root / "nocache", 2, cache_size="0", inline_max="0") as cluster:
        small_put, small_get = await small_objects(cluster.url)
        print(
            f"  same, read cache off too:  {small_put:6.0f} PUT/s  {small_get:6.0f} GET/s"
            "   (every GET reads a node)"
        )
    # the baseline for the volume files: every chunk in a file of its own, as before them
    async with Up(
        root / "files", 2, cache_size="0", small_chunk_max="0", inline_max="0"
    ) as cluster:
        files_put, files_get = await small_objects(cluster.url)
        print(
            f"  same, one file per chunk:  {files_put:6.0f} PUT/s  {files_get:6.0f} GET/s"
            f"   (cache off too; volumes: {small_put / files_put:4.2f} x the PUT/s)"
        )
    async with Up(root / "rss", 2) as cluster, aiohttp.ClientSession(timeout=timeout) as session:
        base = cluster.rss()
        await put(session, f"{cluster.url}/v1/files/one", SIZE)
        after_one = cluster.peak_rss()
        await put(session, f"{cluster.url}/v1/files/big", BIG)
        after_big = cluster.peak_rss()
        print(
            f"  gateway RSS: idle {base / 2**20:.0f} MiB, peak after {SIZE / GIB:.0f} GiB "
            f"{after_one / 2**20:.0f} MiB, after {BIG / GIB:.0f} GiB {after_big / 2**20:.0f} MiB"
        )
        # the first byte must not wait for a long chunk list: the same as for 1 GiB. Each
        # GET is dropped after its first piece; the pause lets the one before stop
        # reading ahead (and the scrubbers get on with the upload) before the next
        firsts = []
        for _ in range(5):
            await asyncio.sleep(0.5)
            big_url = f"{cluster.url}/v1/files/big"
            firsts.append((await get(session, big_url, first_only=True))[1])
        ttfb_huge = statistics.median(firsts)
        print(f"  TTFB  {BIG / GIB:.0f} GiB file {ttfb_huge * 1000:6.1f} ms")
    subprocess.run(["rm", "-rf", str(root)], check=False)
