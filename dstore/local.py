"""``dstore up``: a whole cluster on this machine. Storage nodes run as child processes
(so they use the other cores), the gateway in this process. Data lives under one folder,
with the generated cluster secret kept beside it.

With ``--gateways N`` (N > 1) the gateways are child processes too, on one PostgreSQL
database (``--metadata``, or a private server under ``data/pg``), behind haproxy on
``--port``."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import string
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import structlog

from dstore.auth import AuthToken, S3Key, Scope
from dstore.balancer import haproxy_binary, start_haproxy
from dstore.config import GatewayConfig, load
from dstore.errors import DstoreError
from dstore.follow import Follower
from dstore.gateway.app import s3_runner, start_gateway
from dstore.log import configure
from dstore.master.metadata.postgres import redacted
from dstore.pgserver import PostgresServer, free_port
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


def s3_key(data_dir: Path) -> S3Key:
    """The S3 key pair kept in ``data_dir/s3-credentials`` (``ACCESS:SECRET``, 0600),
    made on first use; it may read and write."""
    path = data_dir / "s3-credentials"
    try:
        access, _, secret = path.read_text().strip().partition(":")
    except FileNotFoundError:
        data_dir.mkdir(parents=True, exist_ok=True)
        access = "DS" + "".join(
            secrets.choice(string.ascii_uppercase + string.digits) for _ in range(18)
        )
        secret = secrets.token_urlsafe(30)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"{access}:{secret}\n")
    return S3Key(access, secret, frozenset({Scope.READ, Scope.WRITE}))


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
    argv = storage_argv(
        data_dir / f"storage-{index}",
        "--log-format",
        "json",
        *(_tls_flags(tls) if tls is not None else []),
    )
    env = dict(os.environ, DSTORE_CLUSTER_SECRET=secret)
    proc, line = await _spawn(argv, env, data_dir / "logs" / f"storage-{index}.log", 30)
    return proc, line.rsplit(" ", 1)[1]


async def _spawn(
    argv: list[str], env: dict[str, str], log: Path, timeout: float
) -> tuple[asyncio.subprocess.Process, str]:
    """A server process, its stderr to ``log``; returns once it printed the line that
    says where it listens (and that line)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as log_file:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=log_file, env=env
        )
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), timeout)).decode().strip()
    if "listening on" not in line:
        proc.kill()
        raise DstoreError(f"{log.stem} did not start; see {log}")
    return proc, line


async def run_local_cluster(
    nodes: int,
    replicas: int,
    port: int,
    data_dir: str,
    *,
    auth: bool = False,
    tls: bool = False,
    gateways: int = 1,
    metadata: str | None = None,
    s3_port: int | None = None,
    follow: bool = False,
) -> int:
    """``follow``: every process's log (the gateway's too, then in a file) shown here,
    interleaved, each line prefixed with its process."""
    root = Path(data_dir).resolve()
    configure("auto", "info")
    secret = cluster_secret(root)
    certs = _tls_files(root) if tls else {}
    # --auth: an admin token with every scope, kept in data/admin-token
    admin_token = cluster_secret(root, "admin-token") if auth else None
    if gateways > 1:
        haproxy_binary()  # (missing: said before anything starts)
    procs: list[asyncio.subprocess.Process] = []
    try:
        started = await asyncio.gather(
            *(_start_node(i + 1, root, secret, certs.get("storage")) for i in range(nodes))
        )
        procs = [proc for proc, _ in started]
        if gateways > 1:
            return await _run_behind_haproxy(
                root,
                port,
                [addr for _, addr in started],
                Shared(secret, replicas, admin_token, certs.get("gateway")),
                gateways,
                metadata,
                procs,
                s3_port,
                follow,
            )
        # the rest of the gateway's settings come from DSTORE_* variables, as for serve
        config = load(
            GatewayConfig,
            {
                "listen": f"127.0.0.1:{port}",
                "data_dir": root / "gateway",
                "storage": [addr for _, addr in started],
                "replicas": replicas,
                "cluster_secret": secret,
                **({"metadata": metadata} if metadata else {}),
                **(
                    {"s3_listen": f"127.0.0.1:{s3_port}", "s3_keys": [s3_key(root)]}
                    if s3_port is not None
                    else {}
                ),
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
        logs = {f"storage-{i}": root / "logs" / f"storage-{i}.log" for i in range(1, nodes + 1)}
        gateway_log = None
        if follow:
            logs = {"gateway": root / "logs" / "gateway.log"} | logs
            gateway_log = open(logs["gateway"], "ab", buffering=0)  # (closed at the end)
        configure(config.log_format, config.log_level, cache=True, file=gateway_log)
        runner, bound = await start_gateway(config)
        print(
            f"dstore is up: {config.scheme}://127.0.0.1:{bound}  ({nodes} storage nodes, "
            f"replicas {replicas}, data in {root})",
            flush=True,
        )
        print(f"dashboard: {config.scheme}://127.0.0.1:{bound}/ui/", flush=True)
        if certs:
            print(
                f"TLS with a private CA: export DSTORE_URL=https://127.0.0.1:{bound}"
                f" DSTORE_CA={certs['gateway'].ca}",
                flush=True,
            )
        if admin_token:
            print(f"admin token (all scopes): export DSTORE_TOKEN={admin_token}", flush=True)
        s3 = s3_runner(runner)
        if s3 is not None:
            _say_s3(config.scheme, s3.addresses[0][1], root)
        _say_logs(logs, follow, gateway_here=not follow)
        print(TRY, flush=True)
        async with _following(logs if follow else None):
            await _until_stopped()
        await runner.cleanup()
        if gateway_log is not None:
            gateway_log.close()
        return 0
    finally:
        await _stop_all(procs)


def _say_logs(logs: dict[str, Path], follow: bool, *, gateway_here: bool) -> None:
    where = ", ".join(f"{name} {path}" for name, path in logs.items())
    here = "the gateway's here; " if gateway_here else ""
    more = (
        " (shown below as they come: --follow)"
        if follow
        else " (dstore up --follow shows them here)"
    )
    print(f"logs: {here}{where}{more}", flush=True)


@contextlib.asynccontextmanager
async def _following(logs: dict[str, Path] | None) -> AsyncIterator[None]:
    """With ``logs``, a ``Follower`` of them runs until the block ends."""
    if logs is None:
        yield
        return
    task = asyncio.create_task(Follower(logs).run(), name="dstore-follow")
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _say_s3(scheme: str, port: int, root: Path) -> None:
    key = s3_key(root)
    print(
        f"S3 API: {scheme}://127.0.0.1:{port}  (export AWS_ACCESS_KEY_ID={key.access_key}"
        f" AWS_SECRET_ACCESS_KEY={key.secret_key}; kept in {root / 's3-credentials'})",
        flush=True,
    )


TRY = "try: dstore put README.md && dstore ls && dstore get README.md -o -"


async def _until_stopped() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print("stopping", flush=True)


async def _stop_all(procs: list[asyncio.subprocess.Process]) -> None:
    """SIGTERM to each (in reverse: haproxy and gateways before the nodes they use),
    then SIGKILL for any still running 15 s later."""
    for proc in reversed(procs):
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
    for proc in reversed(procs):
        try:
            await asyncio.wait_for(proc.wait(), 15)
        except TimeoutError:
            proc.kill()


@dataclass(frozen=True)
class Shared:
    """What every gateway of a ``dstore up`` gets."""

    secret: str
    replicas: int
    admin_token: str | None
    tls: TlsFiles | None


async def _run_behind_haproxy(
    root: Path,
    port: int,
    storage: list[str],
    shared: Shared,
    gateways: int,
    metadata: str | None,
    procs: list[asyncio.subprocess.Process],
    s3_port: int | None = None,
    follow: bool = False,
) -> int:
    """N gateway processes on one PostgreSQL database and haproxy in front of them on
    ``port`` (and of their S3 listeners on ``s3_port``, unless None); runs until SIGTERM
    or SIGINT. ``procs``: the running children, which this adds to (the caller stops
    them)."""
    port = port or free_port()  # (haproxy would not say which port 0 gave it)
    if s3_port is not None:
        s3_port = s3_port or free_port()
    server: PostgresServer | None = None
    if metadata is None:
        if os.geteuid() == 0:
            # PostgreSQL runs as its own user, which must get through the data dir to
            # data/pg: it may enter it, not list it (everything in it stays 0600/0700)
            root.chmod(0o711)
        server = await asyncio.to_thread(PostgresServer(root / "pg").start)
        metadata = await server.ensure_database("dstore")
        where = f"a private PostgreSQL in {root / 'pg'} (127.0.0.1:{server.port})"
    else:
        where = "PostgreSQL at " + redacted(metadata)
    try:
        key = s3_key(root) if s3_port is not None else None
        started = await asyncio.gather(
            *(
                _start_gateway(i, root, storage, shared, metadata, key)
                for i in range(1, gateways + 1)
            )
        )
        procs.extend(proc for proc, _, _ in started)
        addrs = [addr for _, addr, _ in started]
        s3 = None if s3_port is None else (s3_port, [a for _, _, a in started if a is not None])
        procs.append(await start_haproxy(root, port, addrs, tls=shared.tls is not None, s3=s3))
        scheme = "https" if shared.tls is not None else "http"
        print(
            f"dstore is up: {scheme}://127.0.0.1:{port}  (haproxy in front of {gateways}"
            f" gateways, {len(storage)} storage nodes, replicas {shared.replicas},"
            f" data in {root})",
            flush=True,
        )
        print(f"dashboard: {scheme}://127.0.0.1:{port}/ui/", flush=True)
        print(f"metadata: {where}", flush=True)
        logs = {
            f"storage-{i}": root / "logs" / f"storage-{i}.log" for i in range(1, len(storage) + 1)
        }
        logs |= {f"gateway-{i}": root / "logs" / f"gateway-{i}.log" for i in range(1, gateways + 1)}
        logs["haproxy"] = root / "logs" / "haproxy.log"
        if shared.tls is not None:
            print(
                f"TLS with a private CA: export DSTORE_URL=https://127.0.0.1:{port}"
                f" DSTORE_CA={shared.tls.ca}",
                flush=True,
            )
        if shared.admin_token:
            print(f"admin token (all scopes): export DSTORE_TOKEN={shared.admin_token}", flush=True)
        if s3_port is not None:
            _say_s3(scheme, s3_port, root)
        _say_logs(logs, follow, gateway_here=False)
        print(TRY, flush=True)
        async with _following(logs if follow else None):
            await _until_stopped()
        return 0
    finally:
        await _stop_all(procs)
        if server is not None:
            await asyncio.to_thread(server.stop)


async def _start_gateway(
    index: int, root: Path, storage: list[str], shared: Shared, metadata: str, s3: S3Key | None
) -> tuple[asyncio.subprocess.Process, str, str | None]:
    """One gateway process on a port of its own (and its S3 listener on another, with
    key ``s3``); the addresses they listen on."""
    env = dict(
        os.environ,
        DSTORE_CLUSTER_SECRET=shared.secret,
        DSTORE_METADATA=metadata,
        PYTHONUNBUFFERED="1",
    )
    argv = [
        sys.executable, "-m", "dstore", "serve", "--role", "gateway",
        "--listen", "127.0.0.1:0",
        "--data-dir", str(root / f"gateway-{index}"),
        "--gateway-id", f"gateway-{index}",
        "--replicas", str(shared.replicas),
        "--log-format", "json",
        *(arg for addr in storage for arg in ("--storage", addr)),
    ]  # fmt: skip
    if shared.admin_token:
        env["DSTORE_AUTH_TOKENS"] = f"{shared.admin_token}=" + "+".join(s.value for s in Scope)
    if shared.tls is not None:
        argv += _tls_flags(shared.tls)
    if s3 is not None:
        argv += ["--s3-listen", "127.0.0.1:0"]
        env["DSTORE_S3_KEYS"] = f"{s3.access_key}:{s3.secret_key}=read+write"
    log = root / "logs" / f"gateway-{index}.log"
    proc, line = await _spawn(argv, env, log, 60)
    s3_addr = None
    if s3 is not None:
        assert proc.stdout is not None
        said = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode()
        if "S3 API listening on" not in said:
            proc.kill()
            raise DstoreError(f"gateway-{index} did not start its S3 API; see {log}")
        s3_addr = said.strip().rsplit("//", 1)[1]
    return proc, line.rsplit("//", 1)[1], s3_addr
