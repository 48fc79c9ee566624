"""A gateway killed with SIGKILL mid-upload, as a real process, then restarted."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import ROOT, SECRET, NodeFactory, chunk_files, wait_for

CHUNK = 64 * 1024


class GatewayProcess:
    def __init__(self, data_dir: Path, storage: list[str], *extra: str) -> None:
        self.args = [
            sys.executable,
            "-m",
            "dstore",
            "serve",
            "--role",
            "gateway",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            str(data_dir),
            "--chunk-size",
            str(CHUNK),
            "--lease",
            "2s",
            "--reaper-interval",
            "0.2s",
            "--heartbeat",
            "0.2s",
            "--log-format",
            "json",
        ]
        for addr in storage:
            self.args += ["--storage", addr]
        self.args += extra
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""

    def start(self) -> GatewayProcess:
        env = dict(os.environ, PYTHONPATH=str(ROOT), DSTORE_CLUSTER_SECRET=SECRET)
        self.proc = subprocess.Popen(
            self.args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert "listening on" in line, line
        self.url = line.split()[-1]
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(15)


async def test_gateway_sigkill_mid_upload_loses_nothing_acknowledged(
    start_node: NodeFactory, tmp_path: Path
) -> None:
    nodes = [await start_node(f"n{i}") for i in range(3)]
    gateway = GatewayProcess(tmp_path / "gw", [n.addr for n in nodes]).start()
    all_files = lambda: sum(len(chunk_files(n.config.data_dir)) for n in nodes)  # noqa: E731
    try:
        async with aiohttp.ClientSession() as session:
            await wait_for_ready(session, gateway.url)
            kept = os.urandom(5 * CHUNK + 3)
            async with session.put(f"{gateway.url}/v1/files/kept", data=kept) as r:
                assert r.status == 201
            kept_files = all_files()
            assert kept_files == 6 * 2

            async def slow() -> Any:
                for _ in range(200):
                    yield os.urandom(CHUNK // 2)
                    await asyncio.sleep(0.01)

            upload = asyncio.create_task(session.put(f"{gateway.url}/v1/files/torn", data=slow()))
            await wait_for(lambda: all_files() >= kept_files + 10)
            gateway.kill()
            try:
                response = await upload
                assert response.status != 201
            except aiohttp.ClientError:
                pass  # the connection died with the gateway, as it should
            assert all_files() > kept_files  # the torn upload left chunks behind...

            gateway.start()
            await wait_for_ready(session, gateway.url)
            async with session.get(f"{gateway.url}/v1/files/kept") as r:
                assert r.status == 200 and await r.read() == kept
            async with session.get(f"{gateway.url}/v1/files/torn") as r:
                assert r.status == 404
            async with session.get(f"{gateway.url}/v1/files") as r:
                assert [f["name"] for f in (await r.json())["files"]] == ["kept"]
            # ...which the reaper deletes once the lease (2 s) has expired
            await wait_for(lambda: all_files() == kept_files, timeout=20)
        assert gateway.stop() == 0  # and SIGTERM is a clean exit
    finally:
        gateway.kill()


async def test_gateway_sigkill_amid_small_writes_keeps_every_acknowledged_one(
    start_node: NodeFactory, tmp_path: Path
) -> None:
    """Files kept inline are committed with their bytes in one transaction: after a
    SIGKILL, every acknowledged one reads back whole, and a file is either all there or
    not there at all."""
    nodes = [await start_node(f"n{i}") for i in range(3)]
    gateway = GatewayProcess(tmp_path / "gw", [n.addr for n in nodes]).start()
    sent: dict[str, bytes] = {}
    acked: set[str] = set()
    try:
        async with aiohttp.ClientSession() as session:
            await wait_for_ready(session, gateway.url)

            async def writer(w: int) -> None:
                for i in range(2000):
                    name = f"w{w}/{i}"
                    sent[name] = os.urandom(1 + (w * 997 + i * 131) % 4096)
                    try:
                        async with session.put(
                            f"{gateway.url}/v1/files/{name}", data=sent[name]
                        ) as r:
                            if r.status == 201:
                                acked.add(name)
                    except aiohttp.ClientError:
                        return  # the gateway is gone

            writers = [asyncio.create_task(writer(w)) for w in range(8)]
            await wait_for(lambda: len(acked) >= 200, timeout=30)
            gateway.kill()
            await asyncio.wait_for(asyncio.gather(*writers), 30)

            gateway.start()
            await wait_for_ready(session, gateway.url)
            async with session.get(f"{gateway.url}/v1/files?limit=10000") as r:
                listed = {f["name"]: f["size"] for f in (await r.json())["files"]}
            assert acked <= set(listed)  # every acknowledged write survived
            for name in listed:  # and each file there is whole: one that was sent
                async with session.get(f"{gateway.url}/v1/files/{name}") as r:
                    assert r.status == 200 and await r.read() == sent[name], name
            assert sum(len(chunk_files(n.config.data_dir)) for n in nodes) == 0
        assert gateway.stop() == 0
    finally:
        gateway.kill()


async def wait_for_ready(session: aiohttp.ClientSession, url: str) -> None:
    for _ in range(200):
        try:
            async with session.get(f"{url}/readyz") as r:
                if r.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError("gateway never became ready")
