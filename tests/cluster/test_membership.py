"""A gateway follows the membership the metadata records: a node joined, drained or
removed through another gateway on the same database is used, avoided or dropped here
within a heartbeat round or two."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from dstore.gateway import keys
from dstore.master.cluster import NodeState
from dstore.master.metadata import MemberState, SQLiteMetadataStore
from tests.conftest import LocalCluster, wait_for


async def test_members_recorded_by_another_gateway_are_followed(
    make_cluster: Callable[..., Awaitable[LocalCluster]], tmp_path: Path
) -> None:
    cluster = await make_cluster(nodes=2, replicas=2)
    newcomer = await cluster.add_node()  # known to no gateway yet
    members = cluster.app[keys.CLUSTER].members
    assert newcomer.addr not in members
    other = SQLiteMetadataStore(tmp_path / "gateway" / "meta.db")  # the other gateway's view
    await other.open()
    try:
        await other.set_member(newcomer.addr, MemberState.ACTIVE)  # joined over there
        await wait_for(
            lambda: newcomer.addr in members and members[newcomer.addr].state is NodeState.UP
        )
        assert members[newcomer.addr].node_id == newcomer.node_id
        await other.set_member(newcomer.addr, MemberState.DRAINING)  # drained over there
        await wait_for(lambda: members[newcomer.addr].state is NodeState.DRAINING)
        views = {v.node_id: v for v in cluster.app[keys.CLUSTER].views()}
        assert not views[newcomer.node_id].accepts_writes
        await other.set_member(newcomer.addr, MemberState.REMOVED)  # and removed
        await wait_for(lambda: newcomer.addr not in members)
        assert (await cluster.put("f", b"x" * 200_000)).status == 201  # on the two others
    finally:
        await other.close()
