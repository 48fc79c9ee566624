"""fsck against real nodes: replicas deleted from a node's disk and bits flipped in
others; ``/v1/fsck`` names the files at risk (under-replicated, or unrecoverable when no
good copy of a chunk is left), with totals, and ``dstore fsck`` prints them and exits
non-zero when a file is lost. Nothing is repaired by looking."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from dstore.gateway import keys
from tests.conftest import ROOT, LocalCluster, on_disk

CHUNK = 512 << 10  # (above the nodes' small-chunk size: each chunk a file of its own)


async def _fsck(cluster: LocalCluster, **params: str) -> tuple[dict[str, Any], dict[str, Any]]:
    assert cluster.session is not None
    async with cluster.session.get(f"{cluster.url}/v1/fsck", params=params) as response:
        assert response.status == 200, await response.text()
        lines = [json.loads(line) for line in (await response.text()).splitlines()]
    files = {line["file"]["name"]: line["file"] for line in lines[:-1]}
    return files, lines[-1]["totals"]


async def test_fsck_names_files_at_risk_and_lost_ones(
    make_cluster: Callable[..., Awaitable[LocalCluster]],
) -> None:
    cluster = await make_cluster(chunk_size=CHUNK, repair_delay=3600.0, reconcile_interval=3600.0)
    for name in ("ok.bin", "short.bin", "rotten.bin", "lost.bin", "other/x.bin"):
        assert (await cluster.put(f"data/{name}", os.urandom(2 * CHUNK))).status == 201
    assert (await cluster.put("data/small.txt", b"inline")).status == 201
    meta = cluster.app[keys.META]
    by_id = {n.node_id: n for n in cluster.nodes}

    async def first_chunk(name: str) -> Any:
        return (await meta.lookup(f"data/{name}")).chunks[0]

    short = await first_chunk("short.bin")
    on_disk(by_id[short.nodes[0]], short.chunk_id).remove()
    rotten = await first_chunk("rotten.bin")
    stored = on_disk(by_id[rotten.nodes[1]], rotten.chunk_id)
    stored.flip(stored.length // 2)
    lost = await first_chunk("lost.bin")
    for node_id in lost.nodes:
        on_disk(by_id[node_id], lost.chunk_id).remove()

    files, totals = await _fsck(cluster, prefix="data/")
    assert set(files) == {"data/short.bin", "data/lost.bin"}  # (rot needs a read to show)
    assert files["data/short.bin"]["state"] == "under_replicated"
    assert files["data/short.bin"]["missing_replicas"] == 1
    assert files["data/lost.bin"]["state"] == "unrecoverable"
    assert files["data/lost.bin"]["lost_chunks"] == 1
    assert totals["files"] == 6 and totals["chunks"] == 10
    assert totals["healthy"] == 4 and totals["unrecoverable"] == 1

    files, totals = await _fsck(cluster, prefix="data/", verify="1")
    assert files["data/rotten.bin"]["state"] == "under_replicated"
    assert files["data/rotten.bin"]["corrupt_replicas"] == 1
    assert totals["under_replicated"] == 2 and totals["verified_bytes"] >= 8 * CHUNK
    files, totals = await _fsck(cluster, prefix="data/other/")
    assert files == {} and totals["files"] == 1
    # looking repaired nothing: the same findings a second time
    files, _ = await _fsck(cluster, prefix="data/", verify="1")
    assert set(files) == {"data/short.bin", "data/rotten.bin", "data/lost.bin"}

    # the command, as an operator runs it: a table, and exit status 2 for a lost file
    # (in a thread: the gateway it asks runs on this loop)
    async def run(*args: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "dstore", "fsck", *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=dict(os.environ, PYTHONPATH=str(ROOT), DSTORE_URL=cluster.url),
        )

    done = await run("data/", "--verify")
    assert done.returncode == 2, done.stderr
    assert "data/lost.bin" in done.stdout and "unrecoverable" in done.stdout
    assert "data/rotten.bin" in done.stdout and "1 unrecoverable" in done.stdout
    clean = await run("data/ok")
    assert clean.returncode == 0 and "1 files" in clean.stdout and "0 unrecoverable" in clean.stdout
    as_json = await run("--json", "data/")
    assert json.loads(as_json.stdout.splitlines()[-1])["totals"]["unrecoverable"] == 1
