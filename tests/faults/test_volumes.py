"""Small chunks in volume files: group commit, replay after restarts and crashes, torn
tails, tombstones, compaction racing with reads, deletes and puts, failed writes."""

from __future__ import annotations

import asyncio
import errno
import os
import random
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

import dstore.storage.volumes as volumes
from dstore.chunk import checksum, new_chunk_id
from dstore.errors import ChunkCorrupt, ChunkNotFound, DstoreError
from dstore.gateway import keys
from dstore.rpc.client import NodeClient
from dstore.storage.chunkstore import ChunkStore
from dstore.storage.volumes import (
    INDEX_HEAD,
    RECORD,
    index_path,
    read_index,
    record_head,
    volume_numbers,
)
from tests.conftest import SECRET, LocalCluster, NodeFactory, NodeProcess, chunk_files, wait_for


async def one(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def store_put(store: ChunkStore, data: bytes, chunk_id: str | None = None) -> str:
    chunk_id = chunk_id or new_chunk_id()
    assert await store.write(chunk_id, len(data), checksum(data), one(data))
    return chunk_id


async def read(store: ChunkStore, chunk_id: str) -> bytes:
    async with store.reader(chunk_id) as reader:
        return b"".join([bytes(p) async for p in reader])


async def reopened(store: ChunkStore, **settings: int) -> ChunkStore:
    await store.close()
    again = ChunkStore(store.root, 1 << 30, **settings)
    await again.open()
    return again


def volume_files(root: Path) -> list[Path]:
    return [volumes.volume_path(root / "volumes", n) for n in volume_numbers(root / "volumes")]


async def test_small_chunks_share_a_volume_in_few_group_commits_and_survive_restart(
    start_node: NodeFactory,
) -> None:
    node = await start_node("vol")
    blobs = {new_chunk_id(): os.urandom(random.randrange(0, 20_000)) for _ in range(64)}
    big = os.urandom(1 << 20)
    async with NodeClient("127.0.0.1", node.port, SECRET.encode()) as c:
        big_id = new_chunk_id()
        await asyncio.gather(
            c.put_chunk(big_id, big, length=len(big), checksum=checksum(big)),
            *(c.put_chunk(k, v, length=len(v), checksum=checksum(v)) for k, v in blobs.items()),
        )
        assert node.store.volumes.batches < len(blobs)  # writes waiting together, synced once
        stat = await c.stat()
        assert (stat.chunks, stat.used) == (65, len(big) + sum(map(len, blobs.values())))
    data_dir = node.config.data_dir
    assert len(volume_files(data_dir)) == 1
    assert [c.name for c in chunk_files(data_dir) if c.path.parent.parent.name == "chunks"] == [
        big_id
    ]
    await node.stop()
    again = await start_node("vol")
    async with NodeClient("127.0.0.1", again.port, SECRET.encode()) as c:
        for chunk_id, data in blobs.items():
            assert await c.get_chunk(chunk_id) == data
        assert await c.get_chunk(big_id) == big
        assert (await c.stat()).chunks == 65
        listed: list[str] = []
        after = ""
        while True:  # small pages: the volume index and the chunk files merge in id order
            page = await c.list_chunks(after=after, limit=7)
            listed += [row[0] for row in page.chunks]
            if page.next is None:
                break
            after = page.next
        assert listed == sorted([*blobs, big_id])


async def test_volumes_can_be_turned_off_and_what_they_hold_stays_readable(
    start_node: NodeFactory,
) -> None:
    node = await start_node("switch")
    early = os.urandom(5000)
    async with NodeClient("127.0.0.1", node.port, SECRET.encode()) as c:
        early_id = new_chunk_id()
        await c.put_chunk(early_id, early, length=len(early), checksum=checksum(early))
    await node.stop()
    again = await start_node("switch", small_chunk_max=0)
    async with NodeClient("127.0.0.1", again.port, SECRET.encode()) as c:
        late_id = new_chunk_id()
        await c.put_chunk(late_id, early, length=len(early), checksum=checksum(early))
        assert await c.get_chunk(early_id) == early and await c.get_chunk(late_id) == early
        # a re-put of what a volume holds is found there, not stored a second time
        again_put = await c.put_chunk(early_id, early, length=len(early), checksum=checksum(early))
        assert again_put is False and (await c.stat()).chunks == 2
        assert await c.delete_chunk(early_id) is True
        assert (await c.stat()).chunks == 1
    (late,) = chunk_files(again.config.data_dir)
    assert late.name == late_id and late.path.parent.parent.name == "chunks"


async def test_volume_usage_and_garbage_are_reported_to_the_gateway(cluster: LocalCluster) -> None:
    for i in range(6):  # (over inline_max: these go to the nodes)
        assert (await cluster.put(f"small/{i}", os.urandom(6000))).status == 201
    assert cluster.session is not None
    async with cluster.session.delete(cluster.file_url("small/0")) as response:
        assert response.status == 204
    await cluster.wait_reaped()
    await cluster.app[keys.CLUSTER].refresh()
    async with cluster.session.get(f"{cluster.url}/v1/cluster") as response:
        nodes = (await response.json())["nodes"]
    assert sum(n["volumes"]["files"] for n in nodes) == 3  # one per node
    garbage = sum(n["volumes"]["garbage"] for n in nodes)
    assert garbage > 2 * 6000  # two replicas' records, and the tombstones
    live = sum(n["volumes"]["bytes"] for n in nodes) - garbage
    assert 10 * 6000 < live < 10 * 6200  # the five files left, twice, with record headers
    async with cluster.session.get(f"{cluster.url}/metrics") as response:
        text = await response.text()
    reported = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("dstore_node_volume_garbage_bytes{")
    ]
    assert sum(reported) == garbage


async def test_a_torn_tail_is_cut_at_start_and_what_was_acknowledged_stays(
    tmp_path: Path,
) -> None:
    store = ChunkStore(tmp_path / "s", 1 << 30)
    await store.open()
    kept = {await store_put(store, os.urandom(3000)): b"" for _ in range(5)}
    for chunk_id in kept:
        kept[chunk_id] = await read(store, chunk_id)
    await store.close()
    (path,) = volume_files(store.root)
    good_size = path.stat().st_size
    data = os.urandom(5000)
    torn_id = new_chunk_id()
    record = record_head(volumes.PUT, torn_id, len(data), checksum(data), 1) + data
    tails = [
        record[: RECORD.size - 3],  # a torn header
        record[:-100],  # a record cut short
        record[:-100] + bytes(100),  # its length on disk, its last bytes never written
    ]
    for tail in tails:
        with path.open("ab") as f:
            f.write(tail)
        store = ChunkStore(store.root, 1 << 30)
        await store.open()
        assert path.stat().st_size == good_size  # cut back to the last good record
        assert store.volumes.get(torn_id) is None and store.count == 5
        for chunk_id, expected in kept.items():
            assert await read(store, chunk_id) == expected
        await store.close()
    # and the volume takes new records where the torn one was
    store = ChunkStore(store.root, 1 << 30)
    await store.open()
    later = await store_put(store, data)
    store = await reopened(store)
    assert await read(store, later) == data and store.count == 6
    await store.close()


async def test_rot_in_a_volume_is_caught_on_read_and_by_the_scrubber(
    start_node: NodeFactory,
) -> None:
    node = await start_node("rot", scrub_rate=1 << 30, scrub_pause=3600)
    async with NodeClient("127.0.0.1", node.port, SECRET.encode()) as c:
        good, bad = os.urandom(10_000), os.urandom(10_000)
        good_id, bad_id = new_chunk_id(), new_chunk_id()
        for chunk_id, data in ((good_id, good), (bad_id, bad)):
            await c.put_chunk(chunk_id, data, length=len(data), checksum=checksum(data))
        (rotten,) = [x for x in chunk_files(node.config.data_dir) if x.name == bad_id]
        rotten.flip(1234)
        with pytest.raises(ChunkCorrupt):
            await c.get_chunk(bad_id)
        assert await c.get_chunk(good_id) == good
        await node.scrubber.run_pass()
        assert await c.take_corrupt() == [bad_id]
        with pytest.raises(ChunkNotFound):
            await c.get_chunk(bad_id)
        assert (await c.stat()).chunks == 1
    (kept,) = list((node.config.data_dir / "corrupt").iterdir())  # for the post-mortem
    assert kept.name.startswith(bad_id) and kept.stat().st_size == 32 + len(bad)
    await node.stop()
    again = await start_node("rot")
    async with NodeClient("127.0.0.1", again.port, SECRET.encode()) as c:
        with pytest.raises(ChunkNotFound):  # its tombstone outlives the restart
            await c.get_chunk(bad_id)
        assert await c.get_chunk(good_id) == good


async def test_compaction_reclaims_garbage_and_deletes_stay_deleted(tmp_path: Path) -> None:
    settings = {"volume_size": 64 << 10}
    store = ChunkStore(tmp_path / "s", 1 << 30, **settings)
    await store.open()
    blobs = {}
    for _ in range(120):  # ~8 volumes of ~15 records
        data = os.urandom(4000)
        blobs[await store_put(store, data)] = data
    before = sum(p.stat().st_size for p in volume_files(store.root))
    # delete most of the early chunks: their tombstones land in later volumes, so a
    # tombstone dropped too early would bring a chunk back at the next start
    doomed = [k for i, k in enumerate(blobs) if i < 90 and i % 5]
    for chunk_id in doomed:
        assert await store.delete(chunk_id)
    await store.volumes.compact()
    assert store.volumes.compactions >= 3
    after = sum(p.stat().st_size for p in volume_files(store.root))
    assert after < before * 0.7
    live = {k: v for k, v in blobs.items() if k not in set(doomed)}
    for _ in range(2):
        assert store.count == len(live) and store.used == sum(map(len, live.values()))
        for chunk_id, data in live.items():
            assert await read(store, chunk_id) == data
        for chunk_id in doomed:
            with pytest.raises(ChunkNotFound):
                await read(store, chunk_id)
        assert [i.chunk_id for i in await store.list("", 1000)] == sorted(live)
        store = await reopened(store, **settings)
    await store.close()


def index_files(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "volumes").glob("*.idx*"))


async def test_sealed_volumes_replay_from_index_files_and_bad_ones_are_rebuilt(
    tmp_path: Path,
) -> None:
    settings = {"volume_size": 64 << 10}
    store = ChunkStore(tmp_path / "s", 1 << 30, **settings)
    await store.open()
    ids = [await store_put(store, os.urandom(4000)) for _ in range(80)]  # ~5 volumes
    for chunk_id in ids[::4]:  # tombstones in later volumes end puts in earlier ones
        assert await store.delete(chunk_id)
    folder = store.root / "volumes"
    numbers = volume_numbers(folder)
    assert len(numbers) >= 4
    await store.close()  # (waits for the index file of the volume sealed last)
    sealed = [index_path(folder, n).name for n in numbers[:-1]]
    assert index_files(store.root) == sealed  # every sealed volume, not the active one

    def state(s: ChunkStore) -> object:
        return dict(s.volumes.index), s.volumes.usage(), s.count, s.used

    expected = state(store)
    store = await reopened(store, **settings)
    assert store.volumes.from_index == len(sealed)
    assert state(store) == expected

    # damage: a flipped bit; the header of another size (checksum made to match); an
    # orphan, a half-written one and one for the newest volume
    first, second = index_path(folder, numbers[0]), index_path(folder, numbers[1])
    raw = bytearray(first.read_bytes())
    raw[len(raw) // 2] ^= 1
    first.write_bytes(raw)
    body = bytearray(second.read_bytes()[: -len(checksum(b""))])
    magic, version, flags, number, size, count = INDEX_HEAD.unpack_from(body)
    INDEX_HEAD.pack_into(body, 0, magic, version, flags, number, size + 1, count)
    second.write_bytes(bytes(body) + checksum(bytes(body)))
    assert read_index(second, numbers[1], size + 1) is not None  # well-formed, only stale
    index_path(folder, numbers[-1] + 5).write_bytes(b"orphan")
    (folder / f"{numbers[-1] + 6:08d}.idx.tmp").write_bytes(b"half")
    index_path(folder, numbers[-1]).write_bytes(second.read_bytes())
    await store.close()
    store = await reopened(store, **settings)
    assert store.volumes.from_index == len(sealed) - 2
    assert state(store) == expected
    assert index_files(store.root) == sealed  # the bad ones rewritten, strays removed
    await store.close()
    store = await reopened(store, **settings)
    assert store.volumes.from_index == len(sealed)
    assert state(store) == expected
    for chunk_id in ids:
        if chunk_id in ids[::4]:
            with pytest.raises(ChunkNotFound):
                await read(store, chunk_id)
        else:
            assert len(await read(store, chunk_id)) > 0
    await store.close()


async def test_a_node_starts_when_its_index_files_cannot_be_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = {"volume_size": 32 << 10}
    store = ChunkStore(tmp_path / "s", 1 << 30, **settings)
    await store.open()
    blobs = {}
    for _ in range(30):
        data = os.urandom(3000)
        blobs[await store_put(store, data)] = data
    await store.close()
    for path in (store.root / "volumes").glob("*.idx"):
        path.unlink()

    def disk_full(*_args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(volumes, "write_index", disk_full)
    store = await reopened(store, **settings)
    assert store.volumes.from_index == 0 and index_files(store.root) == []
    for chunk_id, data in blobs.items():
        assert await read(store, chunk_id) == data
    await store.close()


async def test_a_tombstone_outlives_the_compaction_of_its_volume(tmp_path: Path) -> None:
    """A chunk's put record in an old, mostly live volume; its tombstone in a later volume
    that is compacted: the tombstone must move on, or the chunk comes back at start."""
    settings = {"volume_size": 64 << 10}
    store = ChunkStore(tmp_path / "s", 1 << 30, **settings)
    await store.open()
    kept = [await store_put(store, os.urandom(4000)) for _ in range(10)]
    old_volume = store.volumes.get(kept[0])
    assert old_volume is not None
    fillers = [await store_put(store, os.urandom(4000)) for _ in range(20)]
    assert await store.delete(kept[0])  # its tombstone goes to the filler's volume
    tombstone_volume = max(volume_numbers(store.root / "volumes"))
    assert tombstone_volume > old_volume.volume
    for chunk_id in fillers:
        assert await store.delete(chunk_id)
    for _ in range(20):  # seal the tombstone's volume
        await store_put(store, os.urandom(4000))
    await store.volumes.compact()
    numbers = volume_numbers(store.root / "volumes")
    assert old_volume.volume in numbers and tombstone_volume not in numbers
    store = await reopened(store, **settings)
    assert store.volumes.get(kept[0]) is None
    with pytest.raises(ChunkNotFound):
        await read(store, kept[0])
    assert store.count == 9 + 20
    await store.close()


async def test_compaction_collides_with_reads_deletes_and_puts(tmp_path: Path) -> None:
    """Random work while volumes are compacted under it; then the store, and the store
    replayed from disk, hold exactly what a model says."""
    settings = {"volume_size": 32 << 10}
    store = ChunkStore(tmp_path / "s", 1 << 30, **settings)
    await store.open()
    rng = random.Random(11)
    model: dict[str, bytes] = {}
    for _ in range(150):
        data = rng.randbytes(rng.randrange(100, 3000))
        model[await store_put(store, data)] = data
    failures: list[BaseException] = []

    async def worker(seed: int) -> None:
        r = random.Random(seed)
        for _ in range(120):
            op = r.random()
            try:
                if op < 0.4 and model:
                    chunk_id = r.choice(sorted(model))
                    data = model.pop(chunk_id)
                    assert await store.delete(chunk_id)
                elif op < 0.7:
                    data = r.randbytes(r.randrange(100, 3000))
                    model[await store_put(store, data)] = data  # readable once acknowledged
                elif model:
                    chunk_id = r.choice(sorted(model))
                    data = model[chunk_id]
                    try:
                        assert await read(store, chunk_id) == data
                    except ChunkNotFound:
                        assert chunk_id not in model  # deleted meanwhile by another worker
            except BaseException as exc:
                failures.append(exc)
                raise

    async def compactor() -> None:
        for _ in range(40):
            await store.volumes.compact()
            await asyncio.sleep(0.005)

    await asyncio.gather(*(worker(s) for s in range(6)), compactor())
    assert not failures
    await store.volumes.compact()
    assert store.volumes.compactions > 0
    for _ in range(2):
        # index files only for sealed volumes still there (compaction removes its own)
        sealed = volume_numbers(store.root / "volumes")[:-1]
        assert set(index_files(store.root)) <= {index_path(Path(), n).name for n in sealed}
        assert store.count == len(model)
        for chunk_id, data in model.items():
            assert await read(store, chunk_id) == data
        assert [i.chunk_id for i in await store.list("", 10_000)] == sorted(model)
        store = await reopened(store, **settings)
    assert store.volumes.from_index == len(volume_numbers(store.root / "volumes")) - 1
    await store.close()


async def test_a_failed_group_commit_fails_its_writes_and_the_store_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ChunkStore(tmp_path / "s", 1 << 30)
    await store.open()
    first = await store_put(store, b"before")
    real = os.fdatasync
    broken = True

    def flaky(fd: int) -> None:
        if broken:
            raise OSError(errno.EIO, "I/O error")
        real(fd)

    monkeypatch.setattr(volumes.os, "fdatasync", flaky)
    results = await asyncio.gather(
        *(store_put(store, os.urandom(1000)) for _ in range(8)), return_exceptions=True
    )
    assert all(isinstance(r, OSError) for r in results)
    assert store.count == 1 and store.reserved == 0
    broken = False
    later = await store_put(store, b"after")
    store = await reopened(store)
    assert store.count == 2
    assert await read(store, first) == b"before" and await read(store, later) == b"after"
    await store.close()


async def test_a_delete_waits_for_a_put_whose_caller_went_away(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A put cancelled while its batch is on its way to disk still lands; a delete of the
    same id after it must see it and tombstone it, or the chunk would come back."""
    store = ChunkStore(tmp_path / "s", 1 << 30)
    await store.open()
    real = os.fdatasync

    syncing = threading.Event()

    def slow(fd: int) -> None:
        syncing.set()
        time.sleep(0.2)
        real(fd)

    monkeypatch.setattr(volumes.os, "fdatasync", slow)
    data = os.urandom(500)
    chunk_id = new_chunk_id()
    put = asyncio.create_task(store_put(store, data, chunk_id))
    await wait_for(syncing.is_set)  # its batch is in fdatasync now
    put.cancel()
    with pytest.raises(asyncio.CancelledError):
        await put
    assert await store.delete(chunk_id) is True
    store = await reopened(store)
    assert store.count == 0
    with pytest.raises(ChunkNotFound):
        await read(store, chunk_id)
    await store.close()


async def test_a_conflicting_or_repeated_small_put(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "s", 1 << 30)
    await store.open()
    chunk_id = await store_put(store, b"same")
    assert not await store.write(chunk_id, 4, checksum(b"same"), one(b"same"))  # idempotent
    with pytest.raises(DstoreError) as info:
        await store.write(chunk_id, 5, checksum(b"other"), one(b"other"))
    assert info.value.code == "chunk_conflict"
    assert store.count == 1 and store.volumes.batches == 1
    await store.close()


async def test_sigkill_during_small_puts_loses_nothing_acknowledged(
    node_process: Callable[..., NodeProcess],
) -> None:
    proc = node_process("crash-small")
    acked: dict[str, bytes] = {}
    stop = asyncio.Event()

    async def writer(c: NodeClient) -> None:
        while not stop.is_set():
            data = os.urandom(random.randrange(1, 8000))
            chunk_id = new_chunk_id()
            try:
                await c.put_chunk(chunk_id, data, length=len(data), checksum=checksum(data))
            except DstoreError:
                return
            acked[chunk_id] = data

    client = NodeClient("127.0.0.1", proc.port, SECRET.encode(), io_timeout=5.0)
    tasks = [asyncio.create_task(writer(client)) for _ in range(8)]
    deadline = asyncio.get_running_loop().time() + 10
    while len(acked) < 200 and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)
    proc.kill()  # mid-stream: batches are on their way
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    await client.aclose()
    assert len(acked) >= 50
    again = node_process("crash-small")
    async with NodeClient("127.0.0.1", again.port, SECRET.encode()) as c:
        for chunk_id, data in acked.items():
            assert await c.get_chunk(chunk_id) == data
        assert (await c.stat()).chunks >= len(acked)
