"""The gateway's own suites (basic round trips, conditional requests, inline files, races
of requests on one gateway) with its metadata on PostgreSQL instead of SQLite."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from tests.cluster.test_conditional import *  # noqa: F403
from tests.cluster.test_gateway_basic import *  # noqa: F403
from tests.cluster.test_gateway_races import *  # noqa: F403
from tests.cluster.test_inline import *  # noqa: F403
from tests.conftest import LocalCluster, NodeFactory, cluster_maker, wait_for
from tests.pg import PostgresServer


@pytest.fixture
async def make_cluster(
    tmp_path: Path, start_node: NodeFactory, pg_url: str
) -> AsyncIterator[Callable[..., Awaitable[LocalCluster]]]:
    """The suites' cluster factory, every gateway on one fresh PostgreSQL database."""
    async with cluster_maker(tmp_path, start_node, metadata=pg_url) as make:
        yield make


# not for this engine: fault injection through SQLite itself (a full disk, rotten bytes)
for _name in (
    "test_a_corrupt_inline_body_is_never_served",
    "test_a_full_metadata_disk_gives_507_and_keeps_nothing",
):
    globals().pop(_name)


async def test_postgresql_stopped_mid_traffic_is_a_quick_503_and_recovery_needs_no_restart(
    make_cluster: Callable[..., Awaitable[LocalCluster]], postgres_server: PostgresServer
) -> None:
    cluster = await make_cluster()
    kept = os.urandom(300_000)
    assert (await cluster.put("kept", kept)).status == 201
    assert cluster.session is not None
    postgres_server.stop()
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with cluster.session.get(f"{cluster.url}/readyz") as response:
            assert response.status == 503
            assert "metadata" in (await response.json())["error"]["message"]
        put = await cluster.put("during", b"x" * 10)
        assert put.status == 503 and (await put.json())["error"]["code"] == "metadata_unavailable"
        assert (await cluster.get("kept"))[0].status == 503
        assert loop.time() - started < 30  # each within the engine's 10 s, never a hang
    finally:
        postgres_server.start()

    async def ready() -> bool:
        async with cluster.session.get(f"{cluster.url}/readyz") as response:  # type: ignore[union-attr]
            return response.status == 200

    await wait_for(ready, timeout=30)
    response, body = await cluster.get("kept")  # nothing acknowledged was lost
    assert response.status == 200 and body == kept
    assert (await cluster.put("after", b"y" * 10)).status == 201
