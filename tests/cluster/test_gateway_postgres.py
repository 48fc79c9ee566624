"""The gateway's own suites (basic round trips, conditional requests, inline files, races
of requests on one gateway) with its metadata on PostgreSQL instead of SQLite."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from dstore.config import GatewayConfig
from dstore.errors import ConfigError
from dstore.gateway.app import start_gateway
from tests.cluster.test_conditional import *  # noqa: F403
from tests.cluster.test_gateway_basic import *  # noqa: F403
from tests.cluster.test_gateway_races import *  # noqa: F403
from tests.cluster.test_inline import *  # noqa: F403
from tests.conftest import SECRET, LocalCluster, NodeFactory


@pytest.fixture
async def make_cluster(
    tmp_path: Path, start_node: NodeFactory, pg_url: str
) -> AsyncIterator[Callable[..., Awaitable[LocalCluster]]]:
    """The suites' cluster factory, every gateway on one fresh PostgreSQL database."""
    clusters: list[LocalCluster] = []

    async def make(
        nodes: int = 3, node_settings: list[dict[str, Any]] | None = None, **gateway: Any
    ) -> LocalCluster:
        cluster = LocalCluster(tmp_path, start_node)
        clusters.append(cluster)
        for i in range(nodes):
            await cluster.add_node(**((node_settings or [{}] * nodes)[i]))
        await cluster.start_gateway(metadata=pg_url, **gateway)
        return cluster

    yield make
    for cluster in reversed(clusters):
        await cluster.close()


# not for this engine: fault injection through SQLite itself (a full disk, rotten bytes),
# and the lookup cache, which is off on PostgreSQL until its hits are validated
for _name in (
    "test_a_corrupt_inline_body_is_never_served",
    "test_a_full_metadata_disk_gives_507_and_keeps_nothing",
    "test_overwrite_across_inline_and_chunks_and_delete_leave_nothing",
    "test_bytes_come_from_the_read_cache_and_the_lookup_cache_keeps_none",
    "test_a_version_reclaimed_before_its_bytes_are_read_serves_the_new_one",
):
    globals().pop(_name)


async def test_a_second_gateway_on_the_same_database_is_refused(
    make_cluster: Callable[..., Awaitable[LocalCluster]], tmp_path: Path, pg_url: str
) -> None:
    """Until several gateways share one database safely (issue 28), the second one is
    refused at start in one line, and the first serves on; once the first stops, a new
    one starts on the same database and finds every file."""
    cluster = await make_cluster()
    assert (await cluster.put("kept", b"x" * 10_000)).status == 201
    second = GatewayConfig(
        listen="127.0.0.1:0",
        data_dir=tmp_path / "second",
        storage=[n.addr for n in cluster.nodes],
        cluster_secret=SECRET,
        metadata=pg_url,
    )
    second.validate()
    with pytest.raises(ConfigError, match="another gateway already uses"):
        await start_gateway(second)
    assert (await cluster.get("kept"))[0].status == 200
    await cluster.restart_gateway()
    response, body = await cluster.get("kept")
    assert response.status == 200 and body == b"x" * 10_000
