"""The lookup cache in front of a real engine (SQLite, on a real file): it never answers
with anything older than a change its caller has been told of."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dstore.errors import FileNotFound, OutOfSpace
from dstore.master.metadata import (
    CachedMetadataStore,
    ChunkIntent,
    FileVersion,
    InlineBody,
    LookupCache,
    MetadataStore,
    SQLiteMetadataStore,
)
from tests.conftest import wait_for


def cached(path: Path, cache: LookupCache) -> CachedMetadataStore:
    return CachedMetadataStore(SQLiteMetadataStore(path), cache)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[CachedMetadataStore]:
    meta = cached(tmp_path / "meta.db", LookupCache(entries=64, max_chunks=2))
    await meta.open()
    yield meta
    await meta.close()


async def put(meta: MetadataStore, name: str, chunks: int = 1, nodes=("n1",)) -> int:  # type: ignore[no-untyped-def]
    intents = [
        ChunkIntent(i, os.urandom(8).hex(), 10, b"c" * 16, nodes, 10 * i) for i in range(chunks)
    ]
    version_id = await meta.begin_upload(name, "", 60.0, intents[0] if intents else None)
    for intent in intents[1:]:
        await meta.add_chunk(version_id, intent)
    await meta.commit(version_id, 10 * chunks, f"etag-{version_id}")
    return version_id


async def test_a_commit_fills_the_cache_with_what_the_database_says(
    store: CachedMetadataStore, tmp_path: Path
) -> None:
    vid = await put(store, "a", chunks=2)
    ops = store.stats().operations
    hit = await store.lookup("a")
    assert store.stats().operations == ops  # answered without the engine
    assert (store.cache.hits, store.cache.misses) == (1, 0)
    assert hit.version_id == vid and len(hit.chunks) == 2
    # a store on the same file with no cache reads the rows: the same answer
    plain = SQLiteMetadataStore(tmp_path / "meta.db")
    await plain.open()
    try:
        assert await plain.lookup("a") == hit
    finally:
        await plain.close()


async def test_a_lookup_fills_the_cache(tmp_path: Path) -> None:
    engine = SQLiteMetadataStore(tmp_path / "m.db")
    await engine.open()
    await put(engine, "a")
    await engine.close()
    meta = cached(tmp_path / "m.db", LookupCache())  # as after a restart
    await meta.open()
    try:
        first = await meta.lookup("a")
        assert await meta.lookup("a") == first
        assert (meta.cache.hits, meta.cache.misses) == (1, 1)
    finally:
        await meta.close()


async def test_large_versions_and_misses_are_not_kept(store: CachedMetadataStore) -> None:
    await put(store, "big", chunks=3)  # over max_chunks
    await store.lookup("big")
    await store.lookup("big")
    assert store.cache.hits == 0
    with pytest.raises(FileNotFound):
        await store.lookup("nothing")
    assert len(store.cache) == 0


async def test_overwrite_and_delete_are_seen_at_once(store: CachedMetadataStore) -> None:
    for _ in range(3):
        vid = await put(store, "a")
        assert (await store.lookup("a")).version_id == vid
        assert (await store.lookup("a")).version_id == vid  # a hit, and still the new one
    await store.delete("a")
    with pytest.raises(FileNotFound):
        await store.lookup("a")


async def test_replica_changes_are_seen_at_once(store: CachedMetadataStore) -> None:
    await put(store, "a", nodes=("n1", "n2"))
    chunk = (await store.lookup("a")).chunks[0]
    await store.add_replicas(chunk.chunk_id, ["n3"])
    assert (await store.lookup("a")).chunks[0].nodes == ("n1", "n2", "n3")
    await store.forget_replica(chunk.chunk_id, "n1")
    assert (await store.lookup("a")).chunks[0].nodes == ("n2", "n3")


async def test_a_failed_commit_changes_nothing_cached(store: CachedMetadataStore) -> None:
    vid = await put(store, "a")
    await store.lookup("a")
    pending = await store.begin_upload("a", "", 60.0)
    await store.abort(pending)
    with pytest.raises(Exception, match="no longer pending"):
        await store.commit(pending, 1, "x")
    assert (await store.lookup("a")).version_id == vid


async def test_the_cache_keeps_its_bound(tmp_path: Path) -> None:
    meta = cached(tmp_path / "m.db", LookupCache(entries=3))
    await meta.open()
    try:
        for i in range(6):
            await put(meta, f"f{i}")
            await meta.lookup(f"f{i}")
        assert len(meta.cache) == 3
        assert meta.cache.chunks_indexed == 3
        assert LookupCache(entries=0).get("f5") is None
    finally:
        await meta.close()


async def test_lookups_racing_overwrites_never_go_back(store: CachedMetadataStore) -> None:
    """Readers hammer one name (each answer lands in the cache) while a writer overwrites
    it: once a commit is acknowledged, no lookup may return an older version, and a
    lookup never returns a version older than one it returned before."""
    await put(store, "hot")
    acknowledged = 0
    writing = True

    async def writer() -> None:
        nonlocal acknowledged, writing
        for _ in range(40):
            acknowledged = await put(store, "hot")
            await asyncio.sleep(0)
        writing = False

    async def reader() -> int:
        newest = reads = 0
        while writing and reads < 20_000:
            floor = acknowledged
            version: FileVersion = await store.lookup("hot")
            assert version.version_id >= floor, (version.version_id, floor)
            assert version.version_id >= newest
            newest = version.version_id
            reads += 1
            await asyncio.sleep(0)  # a hit does not yield: let the writer and others in
        return reads

    reads = await asyncio.gather(writer(), *(reader() for _ in range(8)))
    assert store.cache.hits > 0 and sum(r for r in reads if r) > 40
    assert (await store.lookup("hot")).version_id == acknowledged


async def test_a_write_that_fills_the_disk_fails_alone_in_its_group(
    store: CachedMetadataStore,
) -> None:
    """SQLite rolls the whole transaction back when the disk is full; the other ops of
    the group run again in a new one, and only the one that did not fit fails."""
    await put(store, "kept")
    await store.commit_inline("small", "", InlineBody(b"s", b"c" * 16), '"e"')

    filling = threading.Event()

    def fill(db: sqlite3.Connection) -> None:
        filling.set()
        (pages,) = db.execute("PRAGMA page_count").fetchone()
        db.execute(f"PRAGMA max_page_count = {pages}")
        time.sleep(0.3)  # while this runs, the next ops queue up into one group

    store.cache.clear()  # so that the lookups go to the database
    busy = asyncio.ensure_future(store.engine.raw(fill))
    await wait_for(filling.is_set)
    groups = store.stats().transactions
    big = InlineBody(os.urandom(64 << 10), b"c" * 16)
    results = await asyncio.gather(
        store.lookup("kept"),
        store.commit_inline("big", "", big, '"b"'),
        store.lookup("small"),
        store.totals(),
        return_exceptions=True,
    )
    await busy
    assert store.stats().transactions - groups == 2  # the one that filled the disk, and this group
    kept, failed, small, totals = results
    assert isinstance(failed, OutOfSpace)
    assert isinstance(kept, FileVersion) and kept.name == "kept"
    assert isinstance(small, FileVersion) and small.inline is not None
    assert totals == (2, 11)
    with pytest.raises(FileNotFound):
        await store.lookup("big")


async def test_a_commit_given_up_while_the_engine_works_leaves_nothing_stale(
    store: CachedMetadataStore,
) -> None:
    """A lookup queued ahead of a commit reads the old version; the commit's caller is
    cancelled (its transaction still commits). Nothing may then keep the old version."""
    old = await put(store, "a")
    upload = await store.begin_upload(
        "a", "", 60.0, ChunkIntent(0, "c-new", 10, b"c" * 16, ["n1"], 0)
    )
    store.cache.clear()
    busy, go = threading.Event(), threading.Event()

    def block(db: sqlite3.Connection) -> None:
        busy.set()
        go.wait(5)

    blocker = asyncio.ensure_future(store.engine.raw(block))
    await wait_for(busy.is_set)
    lookup = asyncio.ensure_future(store.lookup("a"))  # queued first: it reads the old one
    commit = asyncio.ensure_future(store.commit(upload, 10, '"new"'))  # queued after it
    await asyncio.sleep(0)
    commit.cancel()  # the caller gives up; the engine will still commit
    with pytest.raises(asyncio.CancelledError):
        await commit
    go.set()
    await blocker
    assert (await lookup).version_id == old
    assert (await store.lookup("a")).version_id == upload  # the commit landed; no stale hit


async def test_what_the_layer_remembers_of_writes_stays_bounded(store: CachedMetadataStore) -> None:
    """Every name written is tracked while a lookup or commit that began before may still
    compare against it, and not for ever: a store that saw millions of names must not
    hold them all."""
    for i in range(600):  # the store keeps 64 names: it tracks at most 256, then prunes
        await store.commit_inline(f"n{i}", "", InlineBody(b"x", b"c" * 16), '"e"')
        await store.lookup(f"n{i}")
    assert store.tracked_names <= 512
    assert (await store.lookup("n599")).name == "n599"
