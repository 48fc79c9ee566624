"""A private PostgreSQL server run from Debian's binaries (package ``postgresql``): made
with ``initdb`` in a folder of its own, listening on 127.0.0.1 and a port of its own,
stopped with the process that started it. The benchmarks and the tests start one; so
will ``dstore up`` for several gateways. PostgreSQL refuses to run as root: started as
root, it runs as the ``postgres`` system user (or ``nobody``)."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from dstore.errors import DstoreError

USER = "dstore"  # the database superuser initdb makes (trust auth, loopback only)


def binaries() -> Path | None:
    """The folder holding ``initdb`` and ``postgres`` (Debian keeps them off PATH)."""
    found = shutil.which("initdb")
    if found is not None:
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(versions[-1]).parent if versions else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgresServer:
    """``root``: its folder (data in ``root/data``, socket and log beside it). ``fast``:
    ``fsync=off`` and no full-page writes, for throw-away servers (tests), never for
    data anyone keeps."""

    def __init__(self, root: Path, *, port: int | None = None, fast: bool = False) -> None:
        bindir = binaries()
        if bindir is None:
            raise DstoreError(
                "PostgreSQL is not installed: apt-get install postgresql", code="missing_binary"
            )
        self.bindir = bindir
        self.root = root
        self.port = port or free_port()
        self.fast = fast
        self.proc: subprocess.Popen[bytes] | None = None
        self.run_as: str | None = None
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            self.run_as = "postgres" if _user_exists("postgres") else "nobody"
            shutil.chown(self.root, self.run_as)
            uid = pwd.getpwnam(self.run_as).pw_uid
            for parent in self.root.resolve().parents:
                info = parent.stat()
                if info.st_uid != uid and not info.st_mode & 0o001:
                    raise DstoreError(
                        f"PostgreSQL runs as {self.run_as} here and cannot enter {parent}"
                        " (make it enterable: chmod o+x)"
                    )
        self.root.chmod(0o700)

    def __repr__(self) -> str:
        running = self.proc is not None and self.proc.poll() is None
        return f"<PostgresServer {self.root} 127.0.0.1:{self.port} {'up' if running else 'down'}>"

    @property
    def data(self) -> Path:
        return self.root / "data"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str) -> None:
        done = subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            capture_output=True,
            text=True,
            user=self.run_as,
            timeout=120,
        )
        if done.returncode != 0:
            raise DstoreError(f"{args[0]} failed: {done.stderr.strip()[-500:]}")

    def start(self) -> PostgresServer:
        """Make the cluster if it is new, start the server and wait until it answers."""
        if not self.data.exists():
            self._run(
                "initdb", "-D", str(self.data), "-U", USER, "--auth=trust", "-E", "UTF8",
                "--locale=C", *(["-N"] if self.fast else []),
            )  # fmt: skip
        settings = ["listen_addresses=127.0.0.1", "max_connections=200"]
        if self.fast:
            settings += ["fsync=off", "full_page_writes=off"]
        log = (self.root / "postgres.log").open("ab")
        try:
            self.proc = subprocess.Popen(
                [
                    str(self.bindir / "postgres"),
                    *("-D", str(self.data), "-p", str(self.port), "-k", str(self.root)),
                    *(arg for setting in settings for arg in ("-c", setting)),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                user=self.run_as,
            )
        finally:
            log.close()
        deadline = time.monotonic() + 60
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = (self.root / "postgres.log").read_text(errors="replace")[-800:]
                self.stop()
                raise DstoreError(f"PostgreSQL did not start: {tail.strip()}")
            time.sleep(0.05)
        return self

    def _ready(self) -> bool:
        done = subprocess.run(
            [str(self.bindir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)],
            capture_output=True,
        )
        return done.returncode == 0

    def stop(self) -> None:
        """Stop the server (a fast shutdown: sessions are ended); its data stays."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def remove(self) -> None:
        """Stop and delete everything (throw-away servers)."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    async def ensure_database(self, name: str) -> str:
        """The database ``name``, made if it does not exist yet; its URL."""
        import asyncpg

        con = await asyncpg.connect(self.url())
        try:
            found = await con.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        finally:
            await con.close()
        return self.url(name) if found else await self.create_database(name)

    async def create_database(self, name: str) -> str:
        """A new, empty database; its URL."""
        import asyncpg

        con = await asyncpg.connect(self.url())
        try:
            await con.execute(f'CREATE DATABASE "{name}"')
        finally:
            await con.close()
        return self.url(name)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True
