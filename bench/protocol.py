"""Protocol benchmark: put and get of 4 MiB chunks over loopback to one storage node,
next to raw asyncio-streams loopback throughput measured in the same run; and 4 KiB puts
with 16 in flight, to volume files (the default) next to one file per chunk
(``small_chunk_max=0``) in the same run.

    python -m bench protocol            (DSTORE_BENCH_MB=512 to move more data)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import mmap
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

from dstore.chunk import checksum, new_chunk_id
from dstore.config import StorageConfig
from dstore.log import configure
from dstore.rpc.client import NodeClient
from dstore.rpc.transport import STREAM_LIMIT
from dstore.storage.node import StorageNode

CHUNK = 4 << 20
TOTAL = int(os.environ.get("DSTORE_BENCH_MB", "256")) << 20
ROUNDS = 5
SECRET = b"bench-cluster-secret"
READ_SIZE = 1 << 20


def tune_socket(writer: asyncio.StreamWriter) -> None:
    """The socket options and buffer limits the dstore transport uses."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    writer.transport.set_write_buffer_limits(high=STREAM_LIMIT)


async def raw_streams(total: int) -> tuple[float, float]:
    """Bytes/s for a raw asyncio-streams upload and download of ``total`` bytes in 1 MiB
    pieces, with the same buffer limits and socket options the transport uses."""
    payload = os.urandom(1 << 20)
    mode: dict[str, str] = {}
    done = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tune_socket(writer)
        if mode["m"] == "up":
            got = 0
            while got < total:
                data = await reader.read(READ_SIZE)
                if not data:
                    break
                got += len(data)
            writer.write(b"k")
        else:
            for _ in range(total // len(payload)):
                writer.write(payload)
                await writer.drain()
        await writer.drain()
        writer.close()
        done.set()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, limit=STREAM_LIMIT)
    port = server.sockets[0].getsockname()[1]

    async def once(direction: str) -> float:
        mode["m"] = direction
        done.clear()
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=STREAM_LIMIT)
        tune_socket(writer)
        start = time.perf_counter()
        if direction == "up":
            for _ in range(total // len(payload)):
                writer.write(payload)
                await writer.drain()
            await reader.read(1)
        else:
            got = 0
            while got < total:
                data = await reader.read(READ_SIZE)
                if not data:
                    break
                got += len(data)
        elapsed = time.perf_counter() - start
        writer.close()
        await done.wait()
        return total / elapsed

    up = statistics.median([await once("up") for _ in range(ROUNDS)])
    down = statistics.median([await once("down") for _ in range(ROUNDS)])
    server.close()
    await server.wait_closed()
    return up, down


def disk_write(total: int, folder: Path) -> float:
    """Bytes/s writing ``total`` bytes as 4 MiB files, each fsynced and renamed into place:
    what a chunk put must do at the least, with no network and no Python protocol."""
    blob = os.urandom(CHUNK)
    rates = []
    for r in range(ROUNDS):
        start = time.perf_counter()
        for i in range(total // CHUNK):
            tmp, final = folder / f"{r}-{i}.tmp", folder / f"{r}-{i}"
            with open(tmp, "wb", buffering=0) as f:
                f.write(blob)
                os.fsync(f.fileno())
            os.rename(tmp, final)
            dir_fd = os.open(folder, os.O_RDONLY)
            os.fsync(dir_fd)
            os.close(dir_fd)
        rates.append(total / (time.perf_counter() - start))
        for i in range(total // CHUNK):
            os.unlink(folder / f"{r}-{i}")
    return statistics.median(rates)


def disk_read(total: int, folder: Path, readers: int = 4) -> float:
    """Bytes/s reading ``total`` bytes of a file no cache holds, 4 MiB at a time with
    ``O_DIRECT`` by ``readers`` threads: what the nodes' cold reads can get at the most
    (where the filesystem has no ``O_DIRECT``, buffered reads after dropping the pages)."""
    path = folder / "read-baseline"
    blob = os.urandom(CHUNK)
    with open(path, "wb", buffering=0) as f:
        for _ in range(total // CHUNK):
            f.write(blob)
        os.fsync(f.fileno())
    rates = []
    try:
        for _ in range(3):
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
            start = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(readers) as pool:
                list(pool.map(lambda k: _read_every(path, k, readers, total), range(readers)))
            rates.append(total / (time.perf_counter() - start))
    finally:
        path.unlink()
    return statistics.median(rates)


def _read_every(path: Path, first: int, step: int, total: int) -> None:
    buf = mmap.mmap(-1, CHUNK)  # page-aligned, as O_DIRECT wants
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        fd = os.open(path, os.O_RDONLY)
    try:
        for offset in range(first * CHUNK, total, step * CHUNK):
            os.preadv(fd, [buf], offset)
    finally:
        os.close(fd)
        buf.close()


async def dstore_put_get(total: int, data_dir: Path, depth: int) -> tuple[float, float]:
    """Put then get ``total`` bytes in 4 MiB chunks with ``depth`` requests in flight."""
    node = StorageNode(StorageConfig(port=0, data_dir=data_dir, cluster_secret=SECRET.decode()))
    await node.start()
    blobs = [os.urandom(CHUNK) for _ in range(8)]
    sums = [checksum(b) for b in blobs]
    count = total // CHUNK
    ids: list[str] = []
    window = asyncio.Semaphore(depth)
    async with NodeClient("127.0.0.1", node.port, SECRET, max_connections=depth) as client:

        async def put(i: int, cid: str) -> None:
            async with window:
                await client.put_chunk(cid, blobs[i % 8], length=CHUNK, checksum=sums[i % 8])

        async def get(cid: str) -> None:
            async with window, client.open_chunk(cid) as body:
                async for _piece in body:
                    pass

        put_rates = []
        for _ in range(ROUNDS):
            for cid in ids:
                await client.delete_chunk(cid)
            ids = [new_chunk_id() for _ in range(count)]
            start = time.perf_counter()
            await asyncio.gather(*(put(i, cid) for i, cid in enumerate(ids)))
            put_rates.append(total / (time.perf_counter() - start))
        get_rates = []
        for _ in range(ROUNDS + 1):  # the first round warms the page cache and is dropped
            start = time.perf_counter()
            await asyncio.gather(*(get(cid) for cid in ids))
            get_rates.append(total / (time.perf_counter() - start))
        for cid in ids:
            await client.delete_chunk(cid)
    await node.stop()
    return statistics.median(put_rates), statistics.median(get_rates[1:])


async def small_puts(data_dir: Path, small_max: int, seconds: float = 3.0) -> float:
    """4 KiB puts per second to one node, 16 in flight, for ``seconds``."""
    config = StorageConfig(
        port=0, data_dir=data_dir, cluster_secret=SECRET.decode(), small_chunk_max=small_max
    )
    node = StorageNode(config)
    await node.start()
    data = os.urandom(4096)
    digest = checksum(data)
    done = 0
    async with NodeClient("127.0.0.1", node.port, SECRET, max_connections=16) as client:
        deadline = time.perf_counter() + seconds

        async def writer() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                await client.put_chunk(new_chunk_id(), data, length=len(data), checksum=digest)
                done += 1

        start = time.perf_counter()
        await asyncio.gather(*(writer() for _ in range(16)))
        rate = done / (time.perf_counter() - start)
    await node.stop()
    return rate


async def main() -> None:
    configure("console", "warning")
    raw_up, raw_down = await raw_streams(TOTAL)
    with tempfile.TemporaryDirectory(dir=os.environ.get("DSTORE_BENCH_DIR")) as tmp:
        disk = disk_write(TOTAL, Path(tmp))
        results = {
            depth: await dstore_put_get(TOTAL, Path(tmp) / f"node{depth}", depth)
            for depth in (1, 4)
        }
        as_files = await small_puts(Path(tmp) / "files", 0)
        in_volumes = await small_puts(Path(tmp) / "volumes", 256 << 10)
    mb = 1e6
    ceiling = min(raw_up, disk)
    print(f"protocol: {TOTAL >> 20} MiB in {CHUNK >> 20} MiB chunks, one node, median of {ROUNDS}")
    print(f"  raw asyncio streams   upload {raw_up / mb:6.0f} MB/s", end="")
    print(f"   download {raw_down / mb:6.0f} MB/s")
    print(f"  disk write+fsync+rename      {disk / mb:6.0f} MB/s")
    for depth, (put, get) in results.items():
        print(
            f"  dstore put, {depth} in flight  {put / mb:6.0f} MB/s   {put / ceiling:5.2f}"
            " x min(raw upload, disk)"
        )
        print(
            f"  dstore get, {depth} in flight  {get / mb:6.0f} MB/s   {get / raw_down:5.2f}"
            " x raw download (page cache warm)"
        )
    print(
        f"  4 KiB puts, 16 in flight: one file each {as_files:6.0f}/s, volumes"
        f" {in_volumes:6.0f}/s   {in_volumes / as_files:5.2f} x files"
    )
