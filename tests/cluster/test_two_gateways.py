"""Two gateways on one PostgreSQL database and the same nodes, in this process: what one
answers, the other serves; conditional and concurrent writes through both at once settle
on one whole version with nothing leaked; a delete through one never breaks a download on
the other; background work runs on one of them and moves when it stops; work found by
the follower is done by the leader."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dstore.client import join_cluster
from dstore.gateway import keys
from dstore.master.cluster import NodeState
from dstore.master.metadata import VersionState
from tests.conftest import SECRET, LocalCluster, NodeFactory, cluster_maker, wait_for

# a pin outlives its renewals by 2 s; a reader may hold dead chunks for 20 s at most
FAST = {"pin_ttl": 2.0, "gc_grace": 20.0, "inline_max": 4096}


class Pair:
    def __init__(self, a: LocalCluster, b: LocalCluster) -> None:
        self.a, self.b = a, b

    @property
    def both(self) -> tuple[LocalCluster, LocalCluster]:
        return self.a, self.b

    def leader(self) -> LocalCluster | None:
        leading = [g for g in self.both if g.runner is not None and g.app[keys.LEADER].leads]
        assert len(leading) <= 1, "two leaders at once"
        return leading[0] if leading else None


@pytest.fixture
async def pair(tmp_path: Path, start_node: NodeFactory, pg_url: str) -> AsyncIterator[Pair]:
    async with cluster_maker(tmp_path, start_node, metadata=pg_url, **FAST) as make:
        a = await make(nodes=3, replicas=2)
        b = LocalCluster(tmp_path, start_node)
        b.nodes = a.nodes
        try:
            await b.start_gateway(**(a.gateway_settings | {"data_dir": tmp_path / "gateway-b"}))
            yield Pair(a, b)
        finally:
            await b.close()


async def test_what_one_gateway_answered_the_other_serves_at_once(pair: Pair) -> None:
    for round_ in range(12):
        writer, reader = pair.both if round_ % 2 else pair.both[::-1]
        body = os.urandom([100, 3000, 150_000][round_ % 3])  # inline, inline, chunked
        assert (await writer.put("f", body)).status == 201
        response, got = await reader.get("f")
        assert response.status == 200 and got == body, round_
    assert (await pair.a.put("gone", b"x" * 200_000)).status == 201
    assert (await pair.b.get("gone"))[0].status == 200
    assert pair.a.session is not None
    async with pair.a.session.delete(pair.a.file_url("gone")) as response:
        assert response.status == 204
    assert (await pair.b.get("gone"))[0].status == 404


async def test_if_none_match_through_both_at_once_makes_exactly_one_201(pair: Pair) -> None:
    for round_ in range(10):
        name = f"once-{round_}"
        sizes = (50, 120_000) if round_ % 2 else (120_000, 50)
        bodies = [os.urandom(size) for size in sizes]
        results = await asyncio.gather(
            *(
                g.put(name, body, headers={"If-None-Match": "*"})
                for g, body in zip(pair.both, bodies, strict=True)
            )
        )
        assert sorted(r.status for r in results) == [201, 412], round_
        winner = bodies[[r.status for r in results].index(201)]
        for gateway in pair.both:
            response, got = await gateway.get(name)
            assert response.status == 200 and got == winner


async def test_writes_of_one_name_through_both_leave_one_whole_version_and_nothing_else(
    pair: Pair,
) -> None:
    bodies = [os.urandom(150_000 + i) for i in range(8)]
    results = await asyncio.gather(
        *(pair.both[i % 2].put("hot", body) for i, body in enumerate(bodies))
    )
    assert all(r.status == 201 for r in results)
    final = {(await g.get("hot"))[1] for g in pair.both}
    assert len(final) == 1 and final.pop() in bodies
    meta = pair.a.app[keys.META]
    assert len(await meta.version_ids(name="hot", state=VersionState.LIVE)) == 1
    assert await meta.version_ids(state=VersionState.PENDING) == []
    await pair.a.wait_reaped()  # the nodes hold the live version's chunks and no other
    await wait_for(lambda: _no_dead(meta), timeout=15)


async def _no_dead(meta: object) -> bool:
    return await meta.version_ids(state=VersionState.DEAD) == []  # type: ignore[attr-defined]


async def test_a_delete_through_one_gateway_never_breaks_a_download_on_the_other(
    pair: Pair,
) -> None:
    body = os.urandom(16 << 20)  # 256 chunks: more than the sockets between can hold
    assert (await pair.a.put("big", body)).status == 201
    assert pair.b.session is not None and pair.a.session is not None
    async with pair.b.session.get(pair.b.file_url("big")) as download:
        assert download.status == 200
        first = await download.content.readexactly(64 * 1024)
        async with pair.a.session.delete(pair.a.file_url("big")) as response:
            assert response.status == 204
        assert (await pair.a.get("big"))[0].status == 404
        # the leader's reaper runs meanwhile, well past the settle time and a pin's
        # lifetime: the pin is renewed, so it keeps the chunks
        await asyncio.sleep(5.0)
        rest = await download.read()
    assert first + rest == body
    await pair.a.wait_reaped()  # and once the download is done, the space comes back


async def test_background_work_runs_on_one_gateway_and_moves_when_it_stops(
    pair: Pair,
) -> None:
    leader = pair.leader()
    assert leader is pair.a  # the first to start took it
    epoch = leader.app[keys.LEADER].epoch
    assert pair.b.app[keys.REAPER].cycles == 0  # the follower's jobs wait
    async with pair.b.session.get(f"{pair.b.url}/v1/cluster") as response:  # type: ignore[union-attr]
        info = await response.json()
    assert info["gateway"]["leads"] is False and info["leader"]["epoch"] == epoch
    # each gateway, and which one leads; the repair state is the leader's
    ids = {g.app[keys.LEADER].holder: g is leader for g in pair.both}
    assert {g["id"]: g["leads"] for g in info["gateways"]} == ids
    assert info["repair"] == leader.app[keys.REPAIRER].stats()
    await pair.a.stop_gateway()  # hands its lease back
    await wait_for(lambda: pair.b.app[keys.LEADER].leads, timeout=15)
    new_epoch = pair.b.app[keys.LEADER].epoch
    assert new_epoch is not None and epoch is not None and new_epoch > epoch
    assert all(node.fence == new_epoch for node in pair.b.nodes)
    assert (await pair.b.put("f", b"x" * 200_000)).status == 201
    async with pair.b.session.delete(pair.b.file_url("f")) as response:  # type: ignore[union-attr]
        assert response.status == 204
    await pair.b.wait_reaped()  # the new leader reclaims


async def test_a_bad_replica_read_through_the_follower_is_repaired_by_the_leader(
    pair: Pair,
) -> None:
    body = os.urandom(200_000)
    assert (await pair.a.put("f", body)).status == 201
    version = await pair.a.app[keys.META].lookup("f")
    chunk = version.chunks[0]
    holder = next(n for n in pair.a.nodes if n.node_id == chunk.nodes[0])
    assert await holder.store.delete(chunk.chunk_id)  # lost behind the gateways' backs
    response, got = await pair.b.get("f")  # the follower reads around it, and reports
    assert response.status == 200 and got == body
    repairer = pair.a.app[keys.REPAIRER]
    await wait_for(lambda: repairer.chunks_repaired >= 1, timeout=15)
    assert pair.b.app[keys.REPAIRER].chunks_repaired == 0

    async def whole() -> bool:
        replicas = await pair.a.app[keys.META].chunk_replicas(chunk.chunk_id)
        return replicas is not None and len(replicas.nodes) == 2

    await wait_for(whole, timeout=10)


async def test_a_rebalance_asked_of_the_follower_runs_on_the_leader(pair: Pair) -> None:
    assert pair.b.session is not None
    async with pair.b.session.post(f"{pair.b.url}/v1/cluster/rebalance") as response:
        assert response.status == 202
        assert (await response.json())["state"] == "requested"
    repairer = pair.a.app[keys.REPAIRER]
    await wait_for(lambda: repairer.rebalance_state in ("running", "balanced"), timeout=10)


async def test_a_node_joined_through_one_gateway_is_used_by_the_other(pair: Pair) -> None:
    newcomer = await pair.a.add_node()  # (pair.b.nodes is the same list)
    await join_cluster(pair.a.url, newcomer.addr, SECRET.encode())  # (its --join)
    members = pair.b.app[keys.CLUSTER].members
    await wait_for(lambda: newcomer.addr in members and members[newcomer.addr].node_id != "")
    # the emptiest node: b's next chunks go there
    assert (await pair.b.put("f", os.urandom(300_000))).status == 201
    version = await pair.b.app[keys.META].lookup("f")
    assert any(newcomer.node_id in chunk.nodes for chunk in version.chunks)
    # and drained through b, a stops using it
    async with pair.b.session.delete(  # type: ignore[union-attr]
        f"{pair.b.url}/v1/cluster/nodes/{newcomer.node_id}"
    ) as response:
        assert response.status == 202
    theirs = pair.a.app[keys.CLUSTER].members

    def avoided() -> bool:
        member = theirs.get(newcomer.addr)
        return member is None or member.state is NodeState.DRAINING

    await wait_for(avoided, timeout=10)
