"""Replication that heals itself: lost nodes, rotten replicas, drains, joins, zones."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import pytest

from dstore.gateway import keys
from tests.conftest import LocalCluster, chunk_files, on_disk, wait_for

CHUNK = 64 * 1024


async def healthy_copies(cluster: LocalCluster, name: str) -> list[int]:
    """For each chunk of a file: how many up nodes really hold a good copy of it."""
    version = await cluster.app[keys.META].lookup(name)
    alive = {n.node_id: n for n in cluster.nodes if n.running}
    counts = []
    for chunk in version.chunks:
        good = 0
        for node_id in set(chunk.nodes):
            node = alive.get(node_id)
            if node is None:
                continue
            try:
                async with node.store.reader(chunk.chunk_id) as reader:
                    async for _ in reader:
                        pass
                good += 1
            except Exception:
                pass
        counts.append(good)
    return counts


async def repair_done(cluster: LocalCluster, names: list[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        counts = [c for name in names for c in await healthy_copies(cluster, name)]
        if all(c == 2 for c in counts):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"copies per chunk: {counts}")
        await asyncio.sleep(0.2)


async def test_a_node_lost_for_good_is_re_replicated(make_cluster: Any) -> None:
    cluster = await make_cluster(nodes=3, repair_delay=0.5)
    files = {f"f{i}": os.urandom(7 * CHUNK + i) for i in range(5)}
    for name, data in files.items():
        assert (await cluster.put(name, data)).status == 201
    victim = cluster.nodes[0]
    await victim.stop(grace=0)
    await repair_done(cluster, list(files))
    for name, data in files.items():
        response, got = await cluster.get(name)
        assert response.status == 200 and got == data
        version = await cluster.app[keys.META].lookup(name)
        assert all(victim.node_id not in c.nodes and len(c.nodes) == 2 for c in version.chunks)
    stats = cluster.app[keys.REPAIRER].stats()
    assert stats["chunks_repaired"] > 0 and stats["queue"] == 0
    assert cluster.session is not None
    async with cluster.session.get(f"{cluster.url}/v1/cluster") as r:
        assert (await r.json())["repair"]["bytes_repaired"] > 0


async def test_repair_that_cannot_record_a_copy_gives_its_space_back(make_cluster: Any) -> None:
    cluster = await make_cluster(nodes=3, repair_delay=0.3)
    files = {f"f{i}": os.urandom(3 * CHUNK + i) for i in range(3)}
    for name, data in files.items():
        assert (await cluster.put(name, data)).status == 201
    meta = cluster.app[keys.META]
    add_replicas, failures = meta.add_replicas, 0

    async def failing_add_replicas(chunk_id: str, nodes: Any) -> None:
        # fault injection: the first few intents cannot be recorded
        nonlocal failures
        if failures < 3:
            failures += 1
            raise OSError("disk I/O error")
        await add_replicas(chunk_id, nodes)

    meta.add_replicas = failing_add_replicas  # type: ignore[method-assign]
    victim = cluster.nodes[0]
    await victim.stop(grace=0)
    await repair_done(cluster, list(files))
    assert failures == 3
    members = cluster.app[keys.CLUSTER].members.values()
    assert [m.reserved for m in members] == [0] * len(members)


async def test_a_node_back_after_re_replication_is_trimmed(make_cluster: Any) -> None:
    cluster = await make_cluster(nodes=3, repair_delay=0.5)
    data = os.urandom(9 * CHUNK)
    await cluster.put("f", data)
    victim = cluster.nodes[0]
    port, data_dir = victim.port, victim.config.data_dir
    held = len(chunk_files(data_dir))
    assert held > 0
    await victim.stop(grace=0)
    await repair_done(cluster, ["f"])
    back = await cluster.add_node(port=port, data_dir=data_dir)
    assert back.node_id == victim.node_id
    await wait_for(lambda: len(chunk_files(data_dir)) == 0, timeout=20)  # surplus gone
    assert (await cluster.get("f"))[1] == data


@pytest.mark.parametrize(
    ("chunk_size", "chunks"),
    # small chunks: the node reads, hashes and refuses the rotten copy; 1 MiB chunks go by
    # sendfile unverified and the gateway's own hash catches them
    [(CHUNK, 12), (1 << 20, 3)],
    ids=["node-verifies", "gateway-verifies"],
)
async def test_rotten_replicas_are_never_served_and_are_repaired(
    make_cluster: Any, chunk_size: int, chunks: int
) -> None:
    cluster = await make_cluster(nodes=3, chunk_size=chunk_size, memory_budget=16 << 20)
    data = os.urandom(chunks * chunk_size)
    await cluster.put("rot", data)
    version = await cluster.app[keys.META].lookup("rot")
    # flip a byte in the first-choice replica of every chunk
    by_id = {n.node_id: n for n in cluster.nodes}
    for chunk in version.chunks:
        stored = on_disk(by_id[chunk.nodes[0]], chunk.chunk_id)
        stored.flip(stored.length // 3)
    response, got = await cluster.get("rot")
    assert response.status == 200 and got == data  # read from the good copies
    await repair_done(cluster, ["rot"])  # and the bad ones were replaced
    assert (await cluster.get("rot"))[1] == data


async def test_drain_under_concurrent_reads_empties_and_removes_the_node(
    make_cluster: Any,
) -> None:
    cluster = await make_cluster(nodes=4)
    files = {f"d{i}": os.urandom(6 * CHUNK + i) for i in range(6)}
    for name, data in files.items():
        await cluster.put(name, data)
    victim = cluster.nodes[0]
    assert victim.store.count > 0
    assert cluster.session is not None
    failures: list[str] = []
    stop = asyncio.Event()

    async def reader() -> None:
        while not stop.is_set():
            for name, data in files.items():
                response, got = await cluster.get(name)
                if response.status != 200 or got != data:
                    failures.append(name)

    readers = [asyncio.create_task(reader()) for _ in range(3)]
    async with cluster.session.delete(f"{cluster.url}/v1/cluster/nodes/{victim.node_id}") as r:
        assert r.status == 202 and (await r.json())["state"] == "draining"
    await wait_for(lambda: victim.addr not in cluster.app[keys.CLUSTER].members, timeout=30)
    stop.set()
    await asyncio.gather(*readers)
    assert failures == []
    assert victim.store.count == 0
    await repair_done(cluster, list(files))
    # a new upload avoids it; the drain survives a gateway restart
    await cluster.restart_gateway()
    assert victim.addr not in cluster.app[keys.CLUSTER].members


async def test_a_joining_node_takes_new_writes(make_cluster: Any) -> None:
    from dstore.client import join_cluster
    from tests.conftest import SECRET

    cluster = await make_cluster(nodes=2)
    newcomer = await cluster.add_node()
    joined = await join_cluster(cluster.url, newcomer.addr, SECRET.encode())
    assert joined["id"] == newcomer.node_id and joined["state"] == "up"
    await cluster.put("after-join", os.urandom(12 * CHUNK))
    assert newcomer.store.count > 0  # least loaded: it gets chunks at once
    # a wrong secret is refused
    import aiohttp
    import pytest

    with pytest.raises(Exception, match="join refused"):
        await join_cluster(cluster.url, "127.0.0.1:1", b"wrong", attempts=1)
    await cluster.restart_gateway()  # joined nodes are remembered
    assert newcomer.addr in cluster.app[keys.CLUSTER].members
    del aiohttp


async def test_replicas_go_to_distinct_zones(make_cluster: Any) -> None:
    zones = ["east", "east", "west", "west"]
    cluster = await make_cluster(nodes=4, node_settings=[{"zone": z} for z in zones])
    await wait_for(
        lambda: all(m.zone != "default" for m in cluster.app[keys.CLUSTER].members.values())
    )
    await cluster.put("z", os.urandom(20 * CHUNK))
    zone_of = {n.node_id: n.config.zone for n in cluster.nodes}
    version = await cluster.app[keys.META].lookup("z")
    for chunk in version.chunks:
        assert {zone_of[n] for n in chunk.nodes} == {"east", "west"}


async def test_scrubber_finds_rot_and_repair_heals_it(make_cluster: Any) -> None:
    cluster = await make_cluster(nodes=3, node_settings=[{"scrub_rate": 1 << 30}] * 3)
    data = os.urandom(10 * CHUNK)
    await cluster.put("scrubbed", data)
    version = await cluster.app[keys.META].lookup("scrubbed")
    by_id = {n.node_id: n for n in cluster.nodes}
    for chunk in version.chunks:  # rot the second replica: reads would never notice
        stored = on_disk(by_id[chunk.nodes[1]], chunk.chunk_id)
        stored.flip(stored.length - 1, 0x80)
    for node in cluster.nodes:
        await node.scrubber.run_pass()
    assert sum(n.scrubber.corrupt_found for n in cluster.nodes) == len(version.chunks)
    assert all(
        len(list((n.config.data_dir / "corrupt").iterdir())) == n.scrubber.corrupt_found
        for n in cluster.nodes
    )
    await repair_done(cluster, ["scrubbed"])
    assert (await cluster.get("scrubbed"))[1] == data
    assert cluster.session is not None
    async with cluster.session.get(f"{cluster.url}/v1/cluster") as r:
        nodes = (await r.json())["nodes"]
    assert sum(n["scrub"]["corrupt_found"] for n in nodes) == len(version.chunks)
    assert all(n["scrub"]["passes"] >= 1 for n in nodes)


async def test_rebalance_after_a_join_evens_out_used_space(make_cluster: Any) -> None:
    from dstore.client import join_cluster
    from tests.conftest import SECRET

    cap = 80 * CHUNK
    cluster = await make_cluster(nodes=2, node_settings=[{"capacity": cap}] * 2)
    for i in range(6):
        await cluster.put(f"r{i}", os.urandom(10 * CHUNK))
    newcomer = await cluster.add_node(capacity=cap)
    await join_cluster(cluster.url, newcomer.addr, SECRET.encode())
    assert newcomer.store.used == 0
    assert cluster.session is not None
    async with cluster.session.post(f"{cluster.url}/v1/cluster/rebalance") as r:
        assert r.status == 202
    repairer = cluster.app[keys.REPAIRER]
    await wait_for(lambda: repairer.rebalance_state == "balanced", timeout=30)
    fractions = [n.store.used / cap for n in cluster.nodes]
    assert max(fractions) - min(fractions) <= 0.05, fractions
    for i in range(6):  # every file still whole, every chunk still on 2 distinct nodes
        response, body = await cluster.get(f"r{i}")
        assert response.status == 200 and len(body) == 10 * CHUNK
        version = await cluster.app[keys.META].lookup(f"r{i}")
        assert all(len(set(c.nodes)) == 2 for c in version.chunks)
    await cluster.wait_reaped()  # and nothing was left behind on the nodes moved from


async def test_storage_process_joins_with_the_join_flag(
    make_cluster: Any, node_process: Any
) -> None:
    cluster = await make_cluster(nodes=2)
    proc = node_process("joiner", "--join", cluster.url)
    members = cluster.app[keys.CLUSTER].members
    await wait_for(lambda: f"127.0.0.1:{proc.port}" in members, timeout=20)
    await wait_for(lambda: members[f"127.0.0.1:{proc.port}"].state.value == "up", timeout=10)
    await cluster.put("to-three", os.urandom(12 * CHUNK))
    version = await cluster.app[keys.META].lookup("to-three")
    joined_id = members[f"127.0.0.1:{proc.port}"].node_id
    assert any(joined_id in c.nodes for c in version.chunks)


async def test_a_node_down_when_the_gateway_starts_is_repaired_too(make_cluster: Any) -> None:
    cluster = await make_cluster(nodes=3, repair_delay=0.5)
    data = os.urandom(8 * CHUNK)
    await cluster.put("early", data)
    await cluster.stop_gateway()
    victim = cluster.nodes[2]
    await victim.stop(grace=0)
    await cluster.start_gateway(**cluster.gateway_settings)  # the node never answers it
    await repair_done(cluster, ["early"])
    assert (await cluster.get("early"))[1] == data


async def test_a_join_proof_works_once_and_never_undoes_a_drain(make_cluster: Any) -> None:
    import time

    from dstore.protocol.handshake import join_proof
    from tests.conftest import SECRET

    cluster = await make_cluster(nodes=3, repair_delay=3600)
    assert cluster.session is not None
    url = f"{cluster.url}/v1/cluster/nodes"
    newcomer = await cluster.add_node()
    stamp = int(time.time())
    body = {
        "addr": newcomer.addr,
        "time": stamp,
        "proof": join_proof(SECRET.encode(), newcomer.addr, stamp),
    }
    async with cluster.session.post(url, json=body) as r:
        assert r.status == 201
    async with cluster.session.post(url, json=body) as r:  # the same proof again: a replay
        assert r.status == 401
    await cluster.put("f", os.urandom(4 * CHUNK))
    victim = cluster.nodes[0]
    async with cluster.session.delete(f"{url}/{victim.node_id}") as r:
        assert r.status == 202
    stamp = int(time.time())
    fresh = {
        "addr": victim.addr,
        "time": stamp,
        "proof": join_proof(SECRET.encode(), victim.addr, stamp),
    }
    async with cluster.session.post(url, json=fresh) as r:  # a good, new proof
        assert r.status == 200 and (await r.json())["state"] == "draining"
    await cluster.restart_gateway()  # and the drain was not undone in the metadata either
    member = cluster.app[keys.CLUSTER].members.get(victim.addr)
    assert member is None or member.state.value == "draining"


async def test_a_move_makes_the_new_replica_list_durable_before_the_source_goes(
    make_cluster: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Drain: every copy deleted from the draining node was first forgotten in the
    metadata durably (power loss between the two must not leave the metadata naming a
    deleted copy)."""
    cluster = await make_cluster(nodes=4, repair_delay=3600)
    await cluster.put("f", os.urandom(6 * CHUNK))
    meta, door = cluster.app[keys.META], cluster.app[keys.REPAIRER].door
    events: list[tuple[str, str, str, bool]] = []
    forget, delete = meta.forget_replica, door.delete

    async def spy_forget(chunk_id: str, node_id: str, *, durable: bool = False) -> None:
        await forget(chunk_id, node_id, durable=durable)
        events.append(("forget", chunk_id, node_id, durable))

    async def spy_delete(chunk_id: str, node_id: str, **kw: Any) -> bool:
        events.append(("delete", chunk_id, node_id, False))
        return await delete(chunk_id, node_id, **kw)

    monkeypatch.setattr(meta, "forget_replica", spy_forget)
    monkeypatch.setattr(door, "delete", spy_delete)
    victim = cluster.nodes[0]
    assert cluster.session is not None
    async with cluster.session.delete(f"{cluster.url}/v1/cluster/nodes/{victim.node_id}") as r:
        assert r.status == 202
    await wait_for(lambda: victim.addr not in cluster.app[keys.CLUSTER].members, timeout=30)
    deletes = [(c, n) for kind, c, n, _ in events if kind == "delete" and n == victim.node_id]
    assert deletes
    for chunk_id, node_id in deletes:
        before = events[: events.index(("delete", chunk_id, node_id, False))]
        assert ("forget", chunk_id, node_id, True) in before


async def test_a_gateway_stopped_between_forget_and_delete_keeps_the_new_copy(
    make_cluster: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gateway goes (its repairer cancelled) after a move forgot the source and before
    it deleted it: after a restart the metadata names the new copy only, the file reads
    whole, and the old copy is surplus, never the other way round."""
    cluster = await make_cluster(nodes=4, repair_delay=3600)
    data = os.urandom(6 * CHUNK)
    await cluster.put("f", data)
    door = cluster.app[keys.REPAIRER].door
    victim = cluster.nodes[0]
    stuck = asyncio.Event()
    delete = door.delete

    async def never_deletes(chunk_id: str, node_id: str, **kw: Any) -> bool:
        if node_id == victim.node_id:
            stuck.set()
            await asyncio.Event().wait()  # the gateway goes before this delete happens
        return await delete(chunk_id, node_id, **kw)

    monkeypatch.setattr(door, "delete", never_deletes)
    assert cluster.session is not None
    async with cluster.session.delete(f"{cluster.url}/v1/cluster/nodes/{victim.node_id}") as r:
        assert r.status == 202
    await asyncio.wait_for(stuck.wait(), 30)
    held = len(chunk_files(victim.config.data_dir))
    await cluster.restart_gateway()
    version = await cluster.app[keys.META].lookup("f")
    on_victim = [c.chunk_id for c in version.chunks if victim.node_id in c.nodes]
    moved = {c.name for c in chunk_files(victim.config.data_dir)} - set(on_victim)
    assert len(moved) >= 1 and held == len(chunk_files(victim.config.data_dir))
    for chunk in version.chunks:  # every chunk still has its full count elsewhere
        assert (
            len([n for n in chunk.nodes if n != victim.node_id]) >= 2 or chunk.chunk_id in on_victim
        )
    assert (await cluster.get("f"))[1] == data
