"""Several gateways as real processes on one PostgreSQL: one killed with SIGKILL while the
other serves, PostgreSQL stopped and started under traffic through both, and the whole of
``dstore up --gateways 2`` (PostgreSQL, gateways, haproxy) as a user starts it."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from dstore.balancer import haproxy_binary, haproxy_config
from dstore.errors import DstoreError
from dstore.storage.node import StorageNode
from tests.conftest import ROOT, NodeFactory, chunk_files, wait_for
from tests.faults.test_gateway_crash import CHUNK, GatewayProcess, wait_for_ready
from tests.pg import PostgresServer, require_postgres

FAST = ("--lease", "2s", "--pin-ttl", "2s", "--gc-grace", "20s", "--replicas", "2")


class Pair:
    def __init__(self, nodes: list[StorageNode], a: GatewayProcess, b: GatewayProcess) -> None:
        self.nodes, self.a, self.b = nodes, a, b

    def stored(self) -> int:
        return sum(len(chunk_files(n.config.data_dir)) for n in self.nodes)


@pytest.fixture
async def pair(start_node: NodeFactory, tmp_path: Path, pg_url: str) -> AsyncIterator[Pair]:
    nodes = [await start_node(f"n{i}") for i in range(3)]
    addrs = [n.addr for n in nodes]
    extra = ("--metadata", pg_url, *FAST)
    a = GatewayProcess(tmp_path / "a", addrs, "--gateway-id", "a", *extra).start()
    b = GatewayProcess(tmp_path / "b", addrs, "--gateway-id", "b", *extra)
    try:
        async with aiohttp.ClientSession() as session:
            await wait_for_ready(session, a.url)  # (a leads: it started first)
        b.start()
        yield Pair(nodes, a, b)
    finally:
        a.kill()
        b.kill()


async def _leads(session: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with session.get(f"{url}/v1/cluster") as response:
            return bool((await response.json())["gateway"]["leads"])
    except aiohttp.ClientError:
        return False


async def test_a_gateway_killed_mid_upload_while_the_other_serves(pair: Pair) -> None:
    async with aiohttp.ClientSession() as session:
        await wait_for_ready(session, pair.b.url)
        assert await _leads(session, pair.a.url) and not await _leads(session, pair.b.url)
        kept = os.urandom(5 * CHUNK + 3)
        async with session.put(f"{pair.a.url}/v1/files/kept", data=kept) as r:
            assert r.status == 201
        kept_files = pair.stored()
        assert kept_files == 6 * 2

        async def slow() -> Any:
            for _ in range(400):
                yield os.urandom(CHUNK // 2)
                await asyncio.sleep(0.01)

        reads, failures = 0, []
        reading = True

        async def reader() -> None:  # reads through b all along
            nonlocal reads
            while reading:
                try:
                    async with session.get(f"{pair.b.url}/v1/files/kept") as r:
                        if r.status != 200 or await r.read() != kept:
                            failures.append(r.status)
                except aiohttp.ClientError as exc:
                    failures.append(str(exc))
                reads += 1
                await asyncio.sleep(0.02)

        readers = asyncio.create_task(reader())
        upload = asyncio.create_task(session.put(f"{pair.a.url}/v1/files/torn", data=slow()))
        await wait_for(lambda: pair.stored() >= kept_files + 10)
        pair.a.kill()  # the leader, mid-upload
        killed = time.monotonic()
        try:
            assert (await upload).status != 201
        except aiohttp.ClientError:
            pass  # the connection died with the gateway
        assert pair.stored() > kept_files  # the torn upload's chunks are on the nodes
        await wait_for(lambda: _leads(session, pair.b.url), timeout=15)  # b takes over
        took_over = time.monotonic() - killed
        # and its reaper reclaims what a's upload left, once that upload's lease is out
        await wait_for(lambda: pair.stored() == kept_files, timeout=20)
        reading = False
        await readers
        assert failures == [] and reads > 20  # b answered every read meanwhile
        async with session.get(f"{pair.b.url}/v1/files") as r:
            assert [f["name"] for f in (await r.json())["files"]] == ["kept"]
        assert took_over < 15
    assert pair.b.stop() == 0


async def test_writes_through_both_processes_collide_and_settle(pair: Pair) -> None:
    """The same name written through both at once, If-None-Match through both at once,
    and a delete through one during a download through the other: one whole version,
    exactly one 201, a download that completes; then nothing left behind on the nodes."""
    urls = (pair.a.url, pair.b.url)
    async with aiohttp.ClientSession() as session:
        await wait_for_ready(session, pair.b.url)

        async def put(url: str, name: str, body: bytes, **headers: str) -> int:
            async with session.put(f"{url}/v1/files/{name}", data=body, headers=headers) as r:
                return r.status

        bodies = [os.urandom(3 * CHUNK + 1 + i) for i in range(6)]  # 4 chunks each
        statuses = await asyncio.gather(
            *(put(urls[i % 2], "hot", body) for i, body in enumerate(bodies))
        )
        assert statuses == [201] * 6
        finals = set()
        for url in urls:
            async with session.get(f"{url}/v1/files/hot") as r:
                finals.add(await r.read())
        assert len(finals) == 1 and finals.pop() in bodies
        for round_ in range(5):
            once = await asyncio.gather(
                *(put(url, f"once-{round_}", b"x" * 100, **{"If-None-Match": "*"}) for url in urls)
            )
            assert sorted(once) == [201, 412]
        big = os.urandom(16 << 20)  # more than the sockets between hold
        assert await put(pair.a.url, "big", big) == 201
        async with session.get(f"{pair.b.url}/v1/files/big") as download:
            first = await download.content.readexactly(CHUNK)
            async with session.delete(f"{pair.a.url}/v1/files/big") as r:
                assert r.status == 204
            await asyncio.sleep(5)  # past the settle time and a pin's lifetime (2 s)
            rest = await download.read()
        assert first + rest == big
        # what is left on the nodes: the one live version of "hot", 4 chunks, 2 replicas
        # each (the If-None-Match files are inline); the losers and "big" reclaimed
        await wait_for(lambda: pair.stored() == 4 * 2, timeout=30)


async def test_postgresql_stopped_under_traffic_through_both_gateways(
    pair: Pair, postgres_server: PostgresServer
) -> None:
    acked: dict[str, bytes] = {}
    outcomes: list[tuple[int, float]] = []  # (status, seconds) while the database is away
    away = False

    async def writer(session: aiohttp.ClientSession, url: str, w: int) -> None:
        for i in range(10_000):
            if stop.is_set():
                return
            name, body = f"w{w}/{i}", os.urandom(100 + (i * 7919) % (3 * CHUNK))
            started, during = time.monotonic(), away  # (begun while the database is away)
            try:
                async with session.put(f"{url}/v1/files/{name}", data=body) as r:
                    if r.status == 201:
                        acked[name] = body
                    if during and away:
                        outcomes.append((r.status, time.monotonic() - started))
            except aiohttp.ClientError:
                if during and away:
                    outcomes.append((0, time.monotonic() - started))
            await asyncio.sleep(0.01)

    stop = asyncio.Event()
    async with aiohttp.ClientSession() as session:
        await wait_for_ready(session, pair.b.url)
        writers = [
            asyncio.create_task(writer(session, url, w))
            for w, url in enumerate([pair.a.url, pair.b.url] * 2)
        ]
        await wait_for(lambda: len(acked) >= 40, timeout=30)
        postgres_server.stop()
        away = True
        try:
            await wait_for(lambda: len(outcomes) >= 8, timeout=30)
            for url in (pair.a.url, pair.b.url):
                async with session.get(f"{url}/readyz") as r:
                    assert r.status == 503
                    assert "metadata" in (await r.json())["error"]["message"]
        finally:
            postgres_server.start()
            away = False
        assert all(status == 503 for status, _ in outcomes), outcomes  # not a hang, not a 500
        assert max(seconds for _, seconds in outcomes) < 12  # within the engine's 10 s
        before = len(acked)
        for url in (pair.a.url, pair.b.url):  # both come back by themselves
            await wait_for_ready(session, url)
        await wait_for(lambda: len(acked) >= before + 40, timeout=30)
        stop.set()
        await asyncio.gather(*writers)
        for i, (name, body) in enumerate(sorted(acked.items())):  # nothing acknowledged lost
            url = (pair.a.url, pair.b.url)[i % 2]
            async with session.get(f"{url}/v1/files/{name}") as r:
                assert r.status == 200 and await r.read() == body, name


# --- dstore up --gateways 2 ----------------------------------------------------------------


class Up:
    """``dstore up --gateways 2`` as a user runs it, in a data dir PostgreSQL's own user can
    enter (not under pytest's private tmp dirs)."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="dstore-up-"))
        self.root.chmod(0o755)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.s3_port = _free_port()
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> Up:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        env.pop("DSTORE_METADATA", None)
        argv = [sys.executable, "-m", "dstore", "up", "--gateways", "2", "--nodes", "3"]
        argv += ["--port", str(self.port), "--data-dir", str(self.root / "data")]
        argv += ["--s3-port", str(self.s3_port)]
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert "dstore is up" in line and "2 gateways" in line, line
        while not line.startswith("S3 API:"):
            line = self.proc.stdout.readline()
            assert line, "dstore up said nothing of the S3 API"
        assert f"127.0.0.1:{self.s3_port}" in line, line
        return self

    def s3(self) -> Any:
        """A boto3 client of the S3 API haproxy serves, with the key ``dstore up`` made."""
        import boto3
        from botocore.config import Config

        access, secret = (self.root / "data" / "s3-credentials").read_text().strip().split(":")
        return boto3.client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{self.s3_port}",
            aws_access_key_id=access,
            aws_secret_access_key=secret,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
        )

    def gateway_pids(self) -> dict[str, int]:
        """gateway-N -> pid, from /proc (the processes ``dstore up`` started)."""
        found: dict[str, int] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if str(self.root).encode() in b" ".join(argv) and b"--gateway-id" in argv:
                found[argv[argv.index(b"--gateway-id") + 1].decode()] = int(entry.name)
        return found

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for pid in self.gateway_pids().values():
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def up() -> Iterator[Up]:
    require_postgres()
    _require_haproxy()
    running = Up()
    try:
        yield running
    finally:
        running.close()


def _require_haproxy() -> None:
    try:
        haproxy_binary()
    except DstoreError as exc:
        if os.environ.get("CI"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))


async def test_dstore_up_with_two_gateways_behind_haproxy(up: Up) -> None:
    up.start()
    body = os.urandom(9 << 20)
    async with aiohttp.ClientSession() as session:
        async with session.put(f"{up.url}/v1/files/big", data=body) as r:
            assert r.status == 201
        seen: set[str] = set()
        for _ in range(8):  # both gateways answer, one leads
            async with session.get(f"{up.url}/v1/cluster") as r:
                info = await r.json()
            seen.add(info["gateway"]["id"])
            assert sorted(g["id"] for g in info["gateways"]) == ["gateway-1", "gateway-2"]
            assert sum(g["leads"] for g in info["gateways"]) == 1
        assert seen == {"gateway-1", "gateway-2"}  # (least connections: each gets some)
        # the S3 API through haproxy too: each request to either gateway, the same bytes
        s3 = up.s3()
        await asyncio.to_thread(s3.create_bucket, Bucket="both")
        for i in range(4):
            await asyncio.to_thread(s3.put_object, Bucket="both", Key=f"k{i}", Body=body[:i])
        listed = await asyncio.to_thread(s3.list_objects_v2, Bucket="both")
        assert [c["Size"] for c in listed["Contents"]] == [0, 1, 2, 3]
        pids = up.gateway_pids()
        assert sorted(pids) == ["gateway-1", "gateway-2"]
        os.kill(pids["gateway-1"], signal.SIGKILL)
        # haproxy takes the dead one out (two failed checks a second apart); retried
        # connections go to the other meanwhile: every request gets its answer
        for _ in range(30):
            async with session.get(f"{up.url}/v1/files/big") as r:
                assert r.status == 200 and await r.read() == body
            await asyncio.sleep(0.1)
        async with session.get(f"{up.url}/v1/cluster") as r:
            assert (await r.json())["gateway"]["id"] == "gateway-2"
        got = await asyncio.to_thread(s3.get_object, Bucket="both", Key="k3")
        assert got["Body"].read() == body[:3]
    assert up.stop() == 0
    assert _none_running(up.root)  # nothing left: gateways, nodes, haproxy, PostgreSQL


def _none_running(root: Path) -> bool:
    for cmdline in Path("/proc").glob("*/cmdline"):
        try:
            if str(root).encode() in cmdline.read_bytes():
                return False
        except OSError:
            continue
    return True


def test_the_haproxy_configuration_streams_and_checks_readiness() -> None:
    http = haproxy_config(8080, ["127.0.0.1:1", "127.0.0.1:2"])
    assert "bind 127.0.0.1:8080" in http and "mode http" in http
    assert "option httpchk GET /readyz" in http and "http-check expect status 200" in http
    assert "server gateway-2 127.0.0.1:2 check" in http
    assert "http-buffer-request" not in http  # bodies stream, never wait whole in haproxy
    tls = haproxy_config(8443, ["127.0.0.1:1"], tls=True)
    assert "mode tcp" in tls and "check-ssl verify none" in tls
    # the S3 listeners behind a port of their own, each checked on its gateway's /readyz
    s3 = haproxy_config(
        8080, ["127.0.0.1:1", "127.0.0.1:2"], s3=(9000, ["127.0.0.1:3", "127.0.0.1:4"])
    )
    assert "bind 127.0.0.1:9000" in s3 and "server s3-2 127.0.0.1:4 check port 2" in s3
    if shutil.which("haproxy") or Path("/usr/sbin/haproxy").exists():
        for text in (http, tls, s3):  # and haproxy itself accepts them
            with tempfile.NamedTemporaryFile("w", suffix=".cfg") as cfg:
                cfg.write(text)
                cfg.flush()
                done = subprocess.run(
                    [haproxy_binary(), "-c", "-f", cfg.name], capture_output=True, text=True
                )
                assert done.returncode == 0, done.stdout + done.stderr


def test_a_missing_haproxy_is_one_line_naming_the_package(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(shutil, "which", lambda *_a, **_k: None)
    with pytest.raises(DstoreError, match=r"^haproxy is not installed: apt-get install haproxy$"):
        haproxy_binary()
