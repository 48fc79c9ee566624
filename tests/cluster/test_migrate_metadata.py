"""``dstore migrate-metadata``: a store that outgrew one gateway on SQLite moves to
PostgreSQL and keeps every file, byte for byte."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from dstore.gateway import keys
from dstore.master.metadata import MemberState, VersionState
from dstore.master.metadata.postgres import PostgresMetadataStore
from tests.conftest import ROOT, LocalCluster


def migrate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dstore", "migrate-metadata", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )


async def test_a_sqlite_store_moves_to_postgresql_and_serves_every_file(
    make_cluster: Callable[..., Awaitable[LocalCluster]], pg_url: str
) -> None:
    cluster = await make_cluster()
    files = {
        "large": os.urandom(5 * 64 * 1024 + 3),  # chunks on the nodes
        "small": b"inline bytes",  # kept in the metadata
        "dir/empty": b"",
    }
    for name, data in files.items():
        assert (await cluster.put(name, data)).status == 201
    assert (await cluster.put("gone", b"x" * 100_000)).status == 201
    assert cluster.session is not None
    async with cluster.session.delete(cluster.file_url("gone")) as response:
        assert response.status == 204
    await cluster.app[keys.META].set_member(cluster.nodes[0].addr, MemberState.DRAINING)
    data_dir = cluster.gateway_settings["data_dir"]
    await cluster.stop_gateway()

    done = migrate("--data-dir", str(data_dir), "--to", pg_url)
    assert done.returncode == 0, done.stderr
    assert '"files": 3' in done.stdout and '"members": 1' in done.stdout
    again = migrate("--data-dir", str(data_dir), "--to", pg_url)  # not over a full one
    assert again.returncode != 0 and "holds metadata already" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1

    await cluster.start_gateway(**(cluster.gateway_settings | {"metadata": pg_url}))
    for name, data in files.items():
        response, body = await cluster.get(name)
        assert response.status == 200 and body == data, name
    assert (await cluster.get("gone"))[0].status == 404
    meta = cluster.app[keys.META]
    assert await meta.totals() == (3, sum(map(len, files.values())))
    assert {m.addr: m.state for m in await meta.members()} == {
        cluster.nodes[0].addr: MemberState.DRAINING
    }
    # new versions get new ids, after the copied ones
    before = max(await meta.version_ids())
    assert (await cluster.put("new", b"after the move")).status == 201
    assert (await meta.version_ids(name="new", state=VersionState.LIVE))[0] > before
    await cluster.wait_reaped()  # the deleted file's chunks are reclaimed from PostgreSQL


async def test_migrate_metadata_says_what_is_missing_in_one_line(
    tmp_path: Path, pg_url: str
) -> None:
    no_url = migrate("--data-dir", str(tmp_path))
    assert no_url.returncode == 2 and "needs --to" in no_url.stderr
    no_db = migrate("--data-dir", str(tmp_path), "--to", pg_url)
    assert no_db.returncode == 1 and "no metadata database" in no_db.stderr
    engine = PostgresMetadataStore(pg_url)  # the target was left untouched
    await engine.open()
    try:
        assert await engine.totals() == (0, 0)
    finally:
        await engine.close()
