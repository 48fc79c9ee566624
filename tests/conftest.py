"""Fixtures that start real parts: storage nodes in-process on port 0, or as processes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dstore.config import StorageConfig
from dstore.log import configure
from dstore.rpc.client import NodeClient
from dstore.storage.node import StorageNode

SECRET = "test-cluster-secret"
ROOT = Path(__file__).resolve().parent.parent

configure("console", os.environ.get("DSTORE_TEST_LOG_LEVEL", "warning"))

NodeFactory = Callable[..., Awaitable[StorageNode]]


@pytest.fixture
async def start_node(tmp_path: Path) -> AsyncIterator[NodeFactory]:
    """Factory: start an in-process storage node on port 0; all are stopped at the end."""
    nodes: list[StorageNode] = []

    async def start(name: str = "node", **overrides: Any) -> StorageNode:
        settings: dict[str, Any] = {
            "port": 0,
            "data_dir": tmp_path / name,
            "cluster_secret": SECRET,
            "grace": 2.0,
        }
        settings.update(overrides)
        node = StorageNode(StorageConfig(**settings))
        await node.start()
        nodes.append(node)
        return node

    yield start
    for node in reversed(nodes):
        await node.stop(grace=1.0)


@pytest.fixture
async def node(start_node: NodeFactory) -> StorageNode:
    return await start_node()


@pytest.fixture
async def client(node: StorageNode) -> AsyncIterator[NodeClient]:
    async with NodeClient("127.0.0.1", node.port, SECRET.encode(), io_timeout=5.0) as c:
        yield c


class NodeProcess:
    """A storage node as a real process (for SIGKILL and SIGTERM tests)."""

    def __init__(self, data_dir: Path, *extra: str) -> None:
        self.data_dir = data_dir
        self.extra = extra
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0

    def start(self) -> NodeProcess:
        env = dict(os.environ, DSTORE_CLUSTER_SECRET=SECRET, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dstore",
                "serve",
                "--role",
                "storage",
                "--port",
                "0",
                "--data-dir",
                str(self.data_dir),
                "--log-format",
                "json",
                *self.extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            self.proc.kill()
            raise RuntimeError(f"node did not start: {line!r}")
        self.port = int(line.rsplit(":", 1)[1])
        return self

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
def node_process(tmp_path: Path) -> Iterator[Callable[..., NodeProcess]]:
    procs: list[NodeProcess] = []

    def start(name: str = "proc-node", *extra: str) -> NodeProcess:
        proc = NodeProcess(tmp_path / name, *extra).start()
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.kill()


def chunk_files(data_dir: Path) -> list[Path]:
    return sorted(p for p in (data_dir / "chunks").rglob("*") if p.is_file())


def tmp_files(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "tmp").iterdir()) if (data_dir / "tmp").exists() else []


async def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)
