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
from tests.conftest import LocalCluster, chunk_files, wait_for


async def test_background_work_waits_for_the_lease_and_takes_over_when_it_lapses(
    make_cluster: Callable[..., Awaitable[LocalCluster]], tmp_path: Path
) -> None:
    other = SQLiteMetadataStore(tmp_path / "gateway" / "meta.db")  # another gateway's view
    await other.open()
    try:
        assert await other.lead("another-gateway", 4.0) == 1
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
        assert leader.epoch == 2
        await cluster.wait_reaped()
        async with cluster.session.get(f"{cluster.url}/v1/cluster") as response:
            info = await response.json()
        assert info["gateway"]["leads"] is True
        assert (info["leader"]["id"], info["leader"]["epoch"]) == (info["gateway"]["id"], 2)
        assert await other.lead("another-gateway", 4.0) is None  # and it cannot come back
        # a gateway that stops hands its lease back: the next one leads at once
        await cluster.restart_gateway()
        assert cluster.app[keys.LEADER].leads and cluster.app[keys.LEADER].epoch == 3
    finally:
        await other.close()
