"""A throw-away PostgreSQL for tests: ``initdb`` in a temp dir, ``fsync=off``, a random
port on 127.0.0.1, run as an unprivileged user when the tests run as root (PostgreSQL
refuses root), stopped and removed at the end. Each test gets a database of its own."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

USER = "dstore"


def binaries() -> Path | None:
    """The folder holding ``initdb`` and ``postgres`` (Debian keeps them off PATH)."""
    found = shutil.which("initdb")
    if found is not None:
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(versions[-1]).parent if versions else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgresServer:
    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="dstore-pg-"))
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        # PostgreSQL will not run as root: then as an unprivileged system user
        self.run_as = None
        if os.geteuid() == 0:
            self.run_as = "postgres" if _user_exists("postgres") else "nobody"
            shutil.chown(self.root, self.run_as)
        self.root.chmod(0o700)
        self._databases = 0

    @property
    def data(self) -> Path:
        return self.root / "data"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str) -> None:
        subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            check=True,
            capture_output=True,
            user=self.run_as,
            timeout=120,
        )

    def start(self) -> PostgresServer:
        if not self.data.exists():
            self._run(
                "initdb", "-D", str(self.data), "-U", USER, "--auth=trust", "-E", "UTF8",
                "--locale=C", "-N",
            )  # fmt: skip
        self.proc = subprocess.Popen(
            [
                str(self.bindir / "postgres"),
                *("-D", str(self.data), "-p", str(self.port), "-k", str(self.root)),
                *("-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"),
                *("-c", "full_page_writes=off", "-c", "max_connections=200"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(self.root / "postgres.log", "ab"),
            user=self.run_as,
        )
        deadline = time.monotonic() + 30
        while True:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = (self.root / "postgres.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"PostgreSQL did not start: {log}")
            time.sleep(0.05)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        while True:
            done = subprocess.run(
                [str(self.bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                capture_output=True,
            )
            if done.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError("PostgreSQL did not become ready")
            time.sleep(0.05)

    def stop(self, *, fast: bool = True) -> None:
        """Stop the server (its data stays, for ``start`` again)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(2 if fast else 15)  # SIGINT: fast shutdown
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    async def new_database(self) -> str:
        """A fresh, empty database; its URL."""
        import asyncpg

        self._databases += 1
        name = f"t{os.getpid()}_{self._databases}"
        con = await asyncpg.connect(self.url())
        try:
            await con.execute(f'CREATE DATABASE "{name}"')
        finally:
            await con.close()
        return self.url(name)


def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def require_postgres() -> Path:
    """The PostgreSQL binaries; a test without them is skipped, or failed under CI."""
    bindir = binaries()
    if bindir is None:
        reason = "PostgreSQL is not installed (Debian: apt-get install postgresql)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return bindir
