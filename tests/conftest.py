"""Fixtures that start real parts: storage nodes in-process on port 0, or as processes."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from dstore.config import StorageConfig
from dstore.local import storage_argv
from dstore.log import configure
from dstore.master.metadata import (
    CachedMetadataStore,
    MetadataStore,
    SQLiteMetadataStore,
    VersionState,
)
from dstore.rpc.client import NodeClient
from dstore.storage.chunkstore import HEADER_SIZE
from dstore.storage.node import StorageNode
from dstore.storage.volumes import live_needles

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
            storage_argv(self.data_dir, "--log-format", "json", *self.extra),
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


@dataclass(frozen=True)
class OnDisk:
    """A chunk as a node's data dir holds it: in its own file, or a record in a volume."""

    name: str  # the chunk id
    path: Path  # the file its bytes are in
    offset: int  # where they start in that file
    length: int

    def flip(self, at: int, bit: int = 0x01) -> None:
        """Rot: flip a bit of the chunk's byte ``at``."""
        with self.path.open("r+b") as f:
            f.seek(self.offset + at)
            byte = f.read(1)[0]
            f.seek(self.offset + at)
            f.write(bytes([byte ^ bit]))

    def cut(self, keep: int) -> None:
        """Truncate the file holding it after ``keep`` bytes of the chunk."""
        with self.path.open("r+b") as f:
            f.truncate(self.offset + keep)

    def remove(self) -> None:
        """Make it vanish (with the rest of its volume, if it is in one)."""
        self.path.unlink(missing_ok=True)


def chunk_files(data_dir: Path) -> list[OnDisk]:
    """Every chunk stored under a node's data dir, read from the files alone, by id."""
    found = {
        p.name: OnDisk(p.name, p, HEADER_SIZE, p.stat().st_size - HEADER_SIZE)
        for p in (data_dir / "chunks").rglob("*")
        if p.is_file()
    }
    for chunk_id, (path, at, length) in live_needles(data_dir / "volumes").items():
        found[chunk_id] = OnDisk(chunk_id, path, at, length)
    return [found[k] for k in sorted(found)]


def on_disk(node: StorageNode, chunk_id: str) -> OnDisk:
    (chunk,) = [c for c in chunk_files(node.config.data_dir) if c.name == chunk_id]
    return chunk


def tmp_files(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "tmp").iterdir()) if (data_dir / "tmp").exists() else []


async def wait_for(predicate: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0) -> None:
    """Poll a condition (a plain or an async one) until it holds, or fail after ``timeout``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        held = predicate()
        if inspect.isawaitable(held):
            held = await held
        if held:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def socket_pair() -> tuple[socket.socket, socket.socket]:
    """Two ends of a TCP connection on 127.0.0.1, non-blocking (as asyncio's are)."""
    server = socket.create_server(("127.0.0.1", 0))
    a = socket.create_connection(server.getsockname())
    b, _ = server.accept()
    server.close()
    for s in (a, b):
        s.setblocking(False)
    return a, b


async def read_all(sock: socket.socket, count: int, timeout: float = 10.0) -> bytes:
    loop = asyncio.get_running_loop()
    out = bytearray()
    async with asyncio.timeout(timeout):
        while len(out) < count:
            data = await loop.sock_recv(sock, 1 << 20)
            if not data:
                break
            out += data
    return bytes(out)


# --- whole clusters ----------------------------------------------------------------------

import aiohttp  # noqa: E402
from aiohttp import web  # noqa: E402

from dstore.config import GatewayConfig  # noqa: E402
from dstore.gateway import keys  # noqa: E402
from dstore.gateway.app import start_gateway  # noqa: E402


class LocalCluster:
    """N storage nodes and a gateway in this process, on port 0, with an HTTP session."""

    def __init__(self, tmp_path: Path, start_node: NodeFactory) -> None:
        self.tmp_path = tmp_path
        self._start_node = start_node
        self.nodes: list[StorageNode] = []
        self.runner: web.AppRunner | None = None
        self.port = 0
        self.session: aiohttp.ClientSession | None = None
        self.gateway_settings: dict[str, Any] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def app(self) -> web.Application:
        assert self.runner is not None
        return self.runner.app

    async def add_node(self, **overrides: Any) -> StorageNode:
        node = await self._start_node(f"node{len(self.nodes)}", **overrides)
        self.nodes.append(node)
        return node

    async def start_gateway(self, **settings: Any) -> None:
        self.gateway_settings = {
            "listen": "127.0.0.1:0",
            "data_dir": self.tmp_path / "gateway",
            "storage": [n.addr for n in self.nodes],
            "cluster_secret": SECRET,
            "chunk_size": 64 * 1024,
            "memory_budget": 8 << 20,
            "heartbeat": 0.2,
            "gc_grace": 3.0,
            "reaper_interval": 0.2,
            "grace": 2.0,
            # off by default, so that fault tests always reach the nodes; on in test_cache,
            # test_history and the overwrite race
            "cache_size": 0,
        } | settings
        config = GatewayConfig(**self.gateway_settings)
        config.validate()
        self.runner, self.port = await start_gateway(config)
        if self.session is None:
            self.session = aiohttp.ClientSession()

    async def stop_gateway(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def restart_gateway(self, **settings: Any) -> None:
        await self.stop_gateway()
        await self.start_gateway(**(self.gateway_settings | settings))

    async def close(self) -> None:
        await self.stop_gateway()
        if self.session is not None:
            await self.session.close()

    def file_url(self, name: str) -> Any:
        from dstore.client import file_url

        return file_url(self.url, name)

    async def put(self, name: str, data: bytes | Any, **kw: Any) -> aiohttp.ClientResponse:
        assert self.session is not None
        async with self.session.put(self.file_url(name), data=data, **kw) as response:
            await response.read()
            return response

    async def get(self, name: str, **kw: Any) -> tuple[aiohttp.ClientResponse, bytes]:
        assert self.session is not None
        async with self.session.get(self.file_url(name), **kw) as response:
            return response, await response.read()

    async def wait_reaped(self, timeout: float = 15.0) -> None:
        """Until every node holds exactly the chunks live versions reference."""
        meta = self.app[keys.META]

        def expected() -> set[str]:
            return set()

        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            referenced = await live_chunk_ids(meta)
            stored = {p.name for n in self.nodes for p in chunk_files(n.config.data_dir)}
            if stored <= referenced and not tmp_leftovers(self.nodes):
                return
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"{len(stored - referenced)} unreferenced chunks remain")
            await asyncio.sleep(0.1)


def sqlite_engine(meta: MetadataStore) -> SQLiteMetadataStore:
    """The SQLite engine under a gateway's metadata, for fault injection (a full disk,
    rotten bytes): what no public way can do."""
    engine = meta.engine if isinstance(meta, CachedMetadataStore) else meta
    assert isinstance(engine, SQLiteMetadataStore)
    return engine


async def live_chunk_ids(meta: MetadataStore) -> set[str]:
    return await meta.chunk_ids(VersionState.LIVE)


def tmp_leftovers(nodes: list[StorageNode]) -> list[Path]:
    return [p for n in nodes for p in tmp_files(n.config.data_dir)]


@pytest.fixture
async def make_cluster(
    tmp_path: Path, start_node: NodeFactory
) -> AsyncIterator[Callable[..., Awaitable[LocalCluster]]]:
    async with cluster_maker(tmp_path, start_node) as make:
        yield make


@contextlib.asynccontextmanager
async def cluster_maker(
    tmp_path: Path, start_node: NodeFactory, **always: Any
) -> AsyncIterator[Callable[..., Awaitable[LocalCluster]]]:
    """A factory of clusters (N nodes, one gateway with ``always`` among its settings),
    all closed at the end: ``make_cluster``, and its variants in other modules."""
    clusters: list[LocalCluster] = []

    async def make(
        nodes: int = 3, node_settings: list[dict[str, Any]] | None = None, **gateway: Any
    ) -> LocalCluster:
        cluster = LocalCluster(tmp_path, start_node)
        clusters.append(cluster)
        for i in range(nodes):
            await cluster.add_node(**((node_settings or [{}] * nodes)[i]))
        await cluster.start_gateway(**(always | gateway))
        return cluster

    try:
        yield make
    finally:
        for cluster in reversed(clusters):
            await cluster.close()


@pytest.fixture
async def cluster(make_cluster: Callable[..., Awaitable[LocalCluster]]) -> LocalCluster:
    return await make_cluster()


# --- PostgreSQL ----------------------------------------------------------------------------

from tests.pg import PostgresServer, new_database, throwaway_server  # noqa: E402


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One throw-away PostgreSQL for the whole run (tests/pg.py); each test that asks
    for ``pg_url`` gets a database of its own in it."""
    server = throwaway_server()
    yield server
    server.remove()


@pytest.fixture
async def pg_url(postgres_server: PostgresServer) -> str:
    return await new_database(postgres_server)
