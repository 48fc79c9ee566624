"""``dstore up``: a whole cluster on this machine. Storage nodes run as child processes
(so they use the other cores), the gateway in this process. Data lives under one folder,
with the generated cluster secret kept beside it."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import sys
from pathlib import Path

import structlog

from dstore.auth import AuthToken, Scope
from dstore.config import GatewayConfig, load
from dstore.errors import DstoreError
from dstore.gateway.app import start_gateway
from dstore.log import configure
from dstore.tls import TlsFiles, make_cluster_ca

log = structlog.get_logger("dstore.up")


def cluster_secret(data_dir: Path, name: str = "cluster-secret") -> str:
    """The secret kept in ``data_dir/<name>``, made on first use (mode 0600)."""
    path = data_dir / name
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        data_dir.mkdir(parents=True, exist_ok=True)
        secret = secrets.token_hex(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secret + "\n")
        return secret


def storage_argv(data_dir: Path, *extra: str) -> list[str]:
    """The command that runs a storage node on a free port (it prints the port it got)."""
    return [
        sys.executable,
        "-m",
        "dstore",
        "serve",
        "--role",
        "storage",
        "--port",
        "0",
        "--data-dir",
        str(data_dir),
        *extra,
    ]


def _tls_files(root: Path) -> dict[str, TlsFiles]:
    """The private CA under ``root/tls`` and a certificate per role (``--tls``)."""
    try:
        return make_cluster_ca(root / "tls")
    except ImportError as exc:
        raise DstoreError(
            "dstore up --tls needs the cryptography package: pip install 'dstore[tls]'"
        ) from exc


def _tls_flags(files: TlsFiles) -> list[str]:
    return ["--tls-cert", str(files.cert), "--tls-key", str(files.key), "--tls-ca", str(files.ca)]


async def _start_node(
    index: int, data_dir: Path, secret: str, tls: TlsFiles | None = None
) -> tuple[asyncio.subprocess.Process, str]:
    logs = data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, DSTORE_CLUSTER_SECRET=secret)
    with open(logs / f"storage-{index}.log", "ab") as log_file:
        proc = await asyncio.create_subprocess_exec(
            *storage_argv(
                data_dir / f"storage-{index}",
                "--log-format",
                "json",
                *(_tls_flags(tls) if tls is not None else []),
            ),
            stdout=asyncio.subprocess.PIPE,
            stderr=log_file,
            env=env,
        )
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
    if "listening on" not in line:
        proc.kill()
        raise DstoreError(f"storage node {index} did not start; see {logs}/storage-{index}.log")
    return proc, line.strip().rsplit(" ", 1)[1]


async def run_local_cluster(
    nodes: int,
    replicas: int,
    port: int,
    data_dir: str,
    *,
    auth: bool = False,
    tls: bool = False,
) -> int:
    root = Path(data_dir).resolve()
    configure("auto", "info")
    secret = cluster_secret(root)
    certs = _tls_files(root) if tls else {}
    # --auth: an admin token with every scope, kept in data/admin-token
    admin_token = cluster_secret(root, "admin-token") if auth else None
    procs: list[asyncio.subprocess.Process] = []
    try:
        started = await asyncio.gather(
            *(_start_node(i + 1, root, secret, certs.get("storage")) for i in range(nodes))
        )
        procs = [proc for proc, _ in started]
        # the rest of the gateway's settings come from DSTORE_* variables, as for serve
        config = load(
            GatewayConfig,
            {
                "listen": f"127.0.0.1:{port}",
                "data_dir": root / "gateway",
                "storage": [addr for _, addr in started],
                "replicas": replicas,
                "cluster_secret": secret,
                "auth_tokens": [AuthToken.create(admin_token, [s.value for s in Scope], "admin")]
                if admin_token
                else None,
                **(
                    {
                        "tls_cert": certs["gateway"].cert,
                        "tls_key": certs["gateway"].key,
                        "tls_ca": certs["gateway"].ca,
                    }
                    if certs
                    else {}
                ),
            },
        )
        # the gateway's own log settings (DSTORE_LOG_LEVEL, DSTORE_LOG_FORMAT) from here on
        configure(config.log_format, config.log_level, cache=True)
        runner, bound = await start_gateway(config)
        print(
            f"dstore is up: {config.scheme}://127.0.0.1:{bound}  ({nodes} storage nodes, "
            f"replicas {replicas}, data in {root})",
            flush=True,
        )
        if certs:
            print(
                f"TLS with a private CA: export DSTORE_URL=https://127.0.0.1:{bound}"
                f" DSTORE_CA={certs['gateway'].ca}",
                flush=True,
            )
        if admin_token:
            print(f"admin token (all scopes): export DSTORE_TOKEN={admin_token}", flush=True)
        print("try: dstore put README.md && dstore ls && dstore get README.md -o -", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        print("stopping", flush=True)
        await runner.cleanup()
        return 0
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
