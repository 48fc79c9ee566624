"""A throw-away PostgreSQL for tests (``dstore.pgserver`` with ``fsync=off``, in a temp dir
a system user can enter), and the rule that a test needing one fails, never skips, when
``CI`` is set. Each test gets a database of its own."""

from __future__ import annotations

import itertools
import os
import tempfile
from pathlib import Path

import pytest

from dstore.pgserver import PostgresServer, binaries

_names = itertools.count(1)


def require_postgres() -> None:
    """A test without PostgreSQL's binaries is skipped, or failed under CI."""
    if binaries() is None:
        reason = "PostgreSQL is not installed (Debian: apt-get install postgresql)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


def throwaway_server() -> PostgresServer:
    require_postgres()
    # not under pytest's tmp dirs (0700, root's): the server may run as another user
    root = Path(tempfile.mkdtemp(prefix="dstore-pg-"))
    return PostgresServer(root, fast=True).start()


async def new_database(server: PostgresServer) -> str:
    return await server.create_database(f"t{os.getpid()}_{next(_names)}")


__all__ = ["PostgresServer", "new_database", "require_postgres", "throwaway_server"]
