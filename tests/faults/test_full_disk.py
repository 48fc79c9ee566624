"""A disk full of small chunks is freed by deleting them, on a real small file system: a
16 MiB ext4 image this test makes, loop-mounts and removes (root only; skipped, saying
why, where the machine does not allow it, and failed instead when ``CI`` is set)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from dstore.chunk import checksum, new_chunk_id
from dstore.errors import OutOfSpace
from dstore.rpc.client import NodeClient
from dstore.storage.node import StorageNode
from tests.conftest import SECRET, NodeFactory, wait_for

SIZE = 128 << 10  # a small chunk: it goes to a volume


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "mounting a file system image needs root"
    if not shutil.which("mkfs.ext4") or not Path("/dev/loop-control").exists():
        return "no mkfs.ext4 or no loop devices on this machine"
    return None


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    reason = _unavailable()
    image, mount = tmp_path / "fs.img", tmp_path / "mnt"
    if reason is None:
        mount.mkdir()
        with image.open("wb") as f:
            f.truncate(16 << 20)
        for command in (
            ["mkfs.ext4", "-q", "-F", "-m", "0", str(image)],
            ["mount", "-o", "loop", str(image), str(mount)],
        ):
            done = subprocess.run(command, capture_output=True, text=True, timeout=60)
            if done.returncode != 0:
                reason = f"{command[0]} failed: {done.stderr.strip()}"
                break
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the full-disk test: {reason}")
        pytest.skip(reason)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True, timeout=60)
        image.unlink(missing_ok=True)


def node_client(node: StorageNode) -> NodeClient:
    return NodeClient("127.0.0.1", node.port, SECRET.encode(), io_timeout=10.0)


async def test_a_node_at_100_percent_recovers_once_small_files_are_deleted(
    small_fs: Path, start_node: NodeFactory
) -> None:
    settings = {"data_dir": small_fs / "node", "scrub_rate": 0}
    node = await start_node("full", **settings)
    stored: dict[str, bytes] = {}
    async with node_client(node) as client:
        for _ in range(400):  # 16 MiB of 128 KiB chunks, and more
            data, chunk_id = os.urandom(SIZE), new_chunk_id()
            try:
                await client.put_chunk(chunk_id, data, length=SIZE, checksum=checksum(data))
            except OutOfSpace:
                break
            stored[chunk_id] = data
        else:
            pytest.fail("the file system never filled")
        assert len(stored) > 50
        free_when_full = shutil.disk_usage(small_fs).free
        assert free_when_full < 2 * SIZE
        # four files in five deleted: all of them in the one volume still being written
        doomed = [c for i, c in enumerate(stored) if i % 5]
        for chunk_id in doomed:
            assert await client.delete_chunk(chunk_id)
            del stored[chunk_id]
        used = (await client.stat()).used
        assert used == len(stored) * SIZE  # deleted bytes leave ``used`` at once

        async def room_again() -> bool:
            data, chunk_id = os.urandom(SIZE), new_chunk_id()
            try:
                await client.put_chunk(chunk_id, data, length=SIZE, checksum=checksum(data))
            except OutOfSpace:
                return False
            stored[chunk_id] = data
            return True

        await wait_for(room_again, timeout=20)
        big = os.urandom(1 << 20)  # and a chunk in a file of its own
        big_id = new_chunk_id()
        await client.put_chunk(big_id, big, length=len(big), checksum=checksum(big))
        stored[big_id] = big
        assert shutil.disk_usage(small_fs).free > 8 << 20
        assert node.store.volumes.punched > 0 or node.store.volumes.compactions > 0
        for chunk_id, data in stored.items():
            assert await client.get_chunk(chunk_id) == data
    await node.stop(grace=1.0)
    # what start-up replays of the punched, compacted volumes holds exactly the survivors
    again = await start_node("full", **settings)
    async with node_client(again) as client:
        for chunk_id, data in stored.items():
            assert await client.get_chunk(chunk_id) == data
        listed = {row[0] for row in (await client.list_chunks(limit=10_000)).chunks}
        assert listed == set(stored)
