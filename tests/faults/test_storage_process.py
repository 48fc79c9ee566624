"""Storage nodes as real processes: crashes and signals."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from dstore.chunk import checksum, new_chunk_id
from dstore.errors import ChunkNotFound
from dstore.protocol import PutChunk, Stored
from dstore.rpc.client import NodeClient
from tests.conftest import SECRET, NodeProcess, chunk_files, tmp_files, wait_for


async def test_sigkill_mid_write_leaves_no_partial_chunk(
    node_process: Callable[..., NodeProcess],
) -> None:
    proc = node_process("crash")
    client = NodeClient("127.0.0.1", proc.port, SECRET.encode())
    kept = os.urandom(1_000_000)
    kept_id = new_chunk_id()
    await client.put_chunk(kept_id, kept, length=len(kept), checksum=checksum(kept))

    data = os.urandom(8 << 20)
    chunk_id = new_chunk_id()
    stream = await client.connect()
    await stream.send(
        PutChunk(rid=1, chunk_id=chunk_id, length=len(data), checksum=checksum(data)), flush=False
    )
    await stream.send_body(memoryview(data)[: 5 << 20])
    await stream.flush()
    await wait_for(lambda: bool(tmp_files(proc.data_dir)))  # the write is under way
    proc.kill()
    await stream.aclose()
    await client.aclose()
    assert tmp_files(proc.data_dir)  # the crash left a temp file behind...

    again = node_process("crash")
    assert tmp_files(proc.data_dir) == []  # ...which start-up removes
    async with NodeClient("127.0.0.1", again.port, SECRET.encode()) as c:
        with pytest.raises(ChunkNotFound):
            await c.get_chunk(chunk_id)
        assert await c.get_chunk(kept_id) == kept
        stat = await c.stat()
        assert (stat.chunks, stat.used) == (1, len(kept))
    assert len(chunk_files(proc.data_dir)) == 1


async def test_sigterm_finishes_in_flight_request_and_exits_zero(
    node_process: Callable[..., NodeProcess],
) -> None:
    proc = node_process("term")
    client = NodeClient("127.0.0.1", proc.port, SECRET.encode())
    idle = NodeClient("127.0.0.1", proc.port, SECRET.encode())
    await idle.ping()  # an idle pooled connection must not hold up shutdown
    data = os.urandom(8 << 20)  # above the 4 MiB a node gathers before its temp file exists
    chunk_id = new_chunk_id()
    stream = await client.connect()
    await stream.send(
        PutChunk(rid=1, chunk_id=chunk_id, length=len(data), checksum=checksum(data)), flush=False
    )
    await stream.send_body(memoryview(data)[: 5 << 20])
    await stream.flush()
    await wait_for(lambda: bool(tmp_files(proc.data_dir)))
    proc.signal(signal.SIGTERM)
    await asyncio.sleep(0.3)
    await stream.send_body(memoryview(data)[5 << 20 :])
    await stream.flush()
    reply = await stream.next_event()
    assert isinstance(reply, Stored) and reply.created
    await stream.aclose()
    assert await asyncio.to_thread(proc.wait) == 0
    await client.aclose()
    await idle.aclose()
    assert len(chunk_files(proc.data_dir)) == 1 and tmp_files(proc.data_dir) == []


def test_bad_config_refuses_to_start_with_one_line(tmp_path: object) -> None:
    import subprocess
    import sys

    from tests.conftest import ROOT

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("DSTORE_CLUSTER_SECRET", None)
    cases = [
        (["--port", "0"], "cluster secret"),
        (["--port", "0", "--cluster-secret", "s"], "at least 16"),
        (["--port", "0", "--cluster-secret", "s" * 16, "--capacity", "lots"], "capacity"),
        (["--port", "99999", "--cluster-secret", "s" * 16], "port"),
    ]
    for args, word in cases:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "dstore",
                "serve",
                "--role",
                "storage",
                "--data-dir",
                str(tmp_path),
                *args,
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
        )
        assert out.returncode != 0
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and word in lines[0], out.stderr


def test_port_in_use_refuses_to_start(
    tmp_path: object, node_process: Callable[..., NodeProcess]
) -> None:
    import subprocess
    import sys

    from tests.conftest import ROOT

    proc = node_process("first")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "dstore",
            "serve",
            "--role",
            "storage",
            "--port",
            str(proc.port),
            "--cluster-secret",
            "s" * 16,
            "--data-dir",
            f"{tmp_path}/second",
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        timeout=30,
    )
    assert out.returncode != 0
    assert "address already in use" in out.stderr.lower().splitlines()[-1]


async def test_a_node_keeps_its_data_private_on_disk(
    node_process: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    """Folders 0700 and files 0600, the data dir too even if it was made 0755 before."""
    data_dir = tmp_path / "private"
    data_dir.mkdir(mode=0o755)
    data_dir.chmod(0o755)
    proc = node_process("private")
    async with NodeClient("127.0.0.1", proc.port, SECRET.encode()) as client:
        for size in (1000, 600_000):  # into a volume, and a chunk file of its own
            data = os.urandom(size)
            await client.put_chunk(new_chunk_id(), data, length=size, checksum=checksum(data))
    modes = {p: stat.S_IMODE(p.stat().st_mode) for p in [data_dir, *data_dir.rglob("*")]}
    assert len(modes) > 5
    loose = {str(p): oct(m) for p, m in modes.items() if m & 0o077}
    assert loose == {}
