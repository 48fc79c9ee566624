"""One gateway of those sharing a database runs the background work: the holder of the
leadership lease. Another holder's lease keeps this gateway's reaper (and repair,
reconciler, inline scrubber) idle; when that lease runs out, this gateway takes over under
a higher epoch and the work is done."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from dstore.gateway import keys
from dstore.master.metadata import SQLiteMetadataStore
from dstore.storage.node import StorageNode
from tests.conftest import LocalCluster, chunk_files, wait_for


async def test_background_work_waits_for_the_lease_and_takes_over_when_it_lapses(
    make_cluster: Callable[..., Awaitable[LocalCluster]], tmp_path: Path
) -> None:
    other = SQLiteMetadataStore(tmp_path / "gateway" / "meta.db")  # another gateway's view
    await other.open()
    try:
        first = await other.lead("another-gateway", 4.0)
        assert first is not None
        cluster = await make_cluster()
        leader, reaper = cluster.app[keys.LEADER], cluster.app[keys.REAPER]
        assert not leader.leads
        assert (await cluster.put("f", os.urandom(200_000))).status == 201
        assert cluster.session is not None
        async with cluster.session.delete(cluster.file_url("f")) as response:
            assert response.status == 204
        async with cluster.session.get(f"{cluster.url}/v1/cluster") as response:
            info = await response.json()
        assert info["gateway"]["leads"] is False and info["leader"]["id"] == "another-gateway"
        stored = sum(len(chunk_files(n.config.data_dir)) for n in cluster.nodes)
        assert stored > 0 and reaper.cycles == 0  # nothing reclaimed by a follower
        await wait_for(lambda: leader.leads, timeout=15)  # the other lease ran out
        second = leader.epoch
        assert second is not None and second > first
        await cluster.wait_reaped()
        async with cluster.session.get(f"{cluster.url}/v1/cluster") as response:
            info = await response.json()
        assert info["gateway"]["leads"] is True
        assert (info["leader"]["id"], info["leader"]["epoch"]) == (info["gateway"]["id"], second)
        assert await other.lead("another-gateway", 4.0) is None  # and it cannot come back
        # a gateway that stops hands its lease back: the next one leads at once
        await cluster.restart_gateway()
        third = cluster.app[keys.LEADER].epoch
        assert cluster.app[keys.LEADER].leads and third is not None and third > second
    finally:
        await other.close()


async def test_a_deposed_leader_deletes_nothing(
    make_cluster: Callable[..., Awaitable[LocalCluster]],
) -> None:
    """Every node hears of a new leader's epoch before the leader works, and from then on
    refuses deletes under an older one: a leader paused past its lease, coming back with
    a delete it had already decided on, removes nothing."""
    cluster = await make_cluster()
    leader, gateway = cluster.app[keys.LEADER], cluster.app[keys.CLUSTER]
    assert leader.leads and leader.epoch is not None
    assert all(node.fence == leader.epoch for node in cluster.nodes)
    assert gateway.epoch == leader.epoch
    assert (await cluster.put("f", os.urandom(200_000))).status == 201
    held = {n.node_id: _ids(n) for n in cluster.nodes}
    node_id, chunk_id = next((i, c[0]) for i, c in held.items() if c)
    door = cluster.app[keys.REAPER].door
    gateway.epoch = leader.epoch - 1  # what a paused ex-leader still carries
    assert await door.delete(chunk_id, node_id, trace="test") is False
    assert {n.node_id: _ids(n) for n in cluster.nodes} == held
    gateway.epoch = 0  # or no epoch at all
    assert await door.delete(chunk_id, node_id, trace="test") is False
    gateway.epoch = leader.epoch  # the leader itself may
    assert await door.delete(chunk_id, node_id, trace="test") is True
    assert {n.node_id: _ids(n) for n in cluster.nodes} != held


def _ids(node: StorageNode) -> list[str]:
    return [c.name for c in chunk_files(node.config.data_dir)]
