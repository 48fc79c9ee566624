"""The metadata engines' conformance suite: what every engine behind ``MetadataStore``
must do, run against each (today SQLite on a real file), with the races a shared engine
must survive: commit against commit, commit against delete, lease expiry against commit."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from dstore.errors import (
    BucketNotEmpty,
    ConfigError,
    Conflict,
    EntityTooSmall,
    FileNotFound,
    IllegalTransition,
    InvalidPart,
    NoSuchBucket,
    NoSuchUpload,
    PreconditionFailed,
)
from dstore.master.metadata import (
    ChunkIntent,
    InlineBody,
    MemberRecord,
    MemberState,
    MetadataStore,
    SQLiteMetadataStore,
    VersionState,
    WorkRequest,
)
from dstore.master.metadata.schema import LATEST, MIGRATIONS
from tests.conftest import wait_for

Engine = Callable[[], Awaitable[MetadataStore]]


@pytest.fixture(params=["sqlite"])
async def make_engine(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Engine]:
    """Factory: an open engine; several made in one test share one database."""
    opened: list[MetadataStore] = []

    async def make() -> MetadataStore:
        assert request.param == "sqlite"
        engine = SQLiteMetadataStore(tmp_path / "meta.db")
        await engine.open()
        opened.append(engine)
        return engine

    yield make
    for engine in reversed(opened):
        await engine.close()


@pytest.fixture
async def meta(make_engine: Engine) -> MetadataStore:
    return await make_engine()


def intent(index: int, size: int = 10, nodes: tuple[str, ...] = ("n1",)) -> ChunkIntent:
    return ChunkIntent(index, os.urandom(8).hex(), size, b"c" * 16, nodes, index * size)


async def pending(meta: MetadataStore, name: str, chunks: int = 1, lease: float = 60.0) -> int:
    intents = [intent(i) for i in range(chunks)]
    version_id = await meta.begin_upload(name, "text/plain", lease, intents[0] if chunks else None)
    for later in intents[1:]:
        await meta.add_chunk(version_id, later)
    return version_id


async def put(meta: MetadataStore, name: str, chunks: int = 1) -> int:
    version_id = await pending(meta, name, chunks)
    await meta.commit(version_id, 10 * chunks, f'"{version_id}"')
    return version_id


async def live_without_a_name(meta: MetadataStore) -> set[int]:
    """Live versions no name points at: leaked for good (never reaped)."""
    live = set(await meta.version_ids(state=VersionState.LIVE))
    named = set()
    for info in (await meta.list_files("", "", 10_000))[0]:
        named.add((await meta.head(info.name)).version_id)
    return live - named


# --- one writer -----------------------------------------------------------------------------


async def test_a_committed_version_is_found_with_its_chunks_in_order(meta: MetadataStore) -> None:
    version_id = await meta.begin_upload("f", "text/plain", 60.0, intent(0))
    for index in (3, 1, 2):  # recorded out of order, as parallel puts finish
        await meta.add_chunk(version_id, intent(index))
    with pytest.raises(FileNotFound):
        await meta.lookup("f")  # pending: not visible
    result = await meta.commit(version_id, 40, '"e"', keep_chunks=8)
    assert result.listed and result.chunks == 4 and result.replaced is None
    found = await meta.lookup("f")
    assert [c.index for c in found.chunks] == [0, 1, 2, 3]
    assert [c.offset for c in found.chunks] == [0, 10, 20, 30]
    assert found == result.version
    assert (found.size, found.etag, found.content_type) == (40, '"e"', "text/plain")
    assert (await meta.lookup("f", start=25, limit=1)).chunks == found.chunks[2:3]
    assert await meta.chunk_page(version_id, 15, 10) == found.chunks[1:]
    head = await meta.head("f")
    assert head.chunks == () and head.version_id == version_id
    assert await meta.totals() == (1, 40)


async def test_a_large_commit_counts_its_chunks_without_listing_them(meta: MetadataStore) -> None:
    version_id = await pending(meta, "big", chunks=5)
    result = await meta.commit(version_id, 50, '"e"', keep_chunks=2)
    assert not result.listed and result.chunks == 5 and result.version.chunks == ()


async def test_an_overwrite_kills_the_old_version_and_a_delete_the_new(
    meta: MetadataStore,
) -> None:
    first = await put(meta, "f")
    second = await pending(meta, "f")
    result = await meta.commit(second, 10, '"2"')
    assert result.replaced == first
    assert await meta.version_ids(name="f", state=VersionState.DEAD) == [first]
    assert await meta.delete("f") == second
    with pytest.raises(FileNotFound):
        await meta.lookup("f")
    with pytest.raises(FileNotFound):
        await meta.delete("f")
    assert await meta.version_ids(name="f", state=VersionState.DEAD) == [first, second]
    assert await meta.totals() == (0, 0)


async def test_if_absent_refuses_an_existing_name_and_leaves_the_upload_to_abort(
    meta: MetadataStore,
) -> None:
    await put(meta, "f")
    late = await pending(meta, "f")
    with pytest.raises(PreconditionFailed):
        await meta.commit(late, 10, '"x"', if_absent=True)
    assert late in await meta.version_ids(state=VersionState.PENDING)
    await meta.abort(late)
    assert late in await meta.version_ids(state=VersionState.DEAD)
    with pytest.raises(PreconditionFailed):
        await meta.commit_inline("f", "", InlineBody(b"x", b"c" * 16), '"x"', if_absent=True)


async def test_only_a_pending_version_commits(meta: MetadataStore) -> None:
    version_id = await put(meta, "f")
    with pytest.raises(Conflict):
        await meta.commit(version_id, 10, '"again"')
    aborted = await pending(meta, "g")
    await meta.abort(aborted)
    with pytest.raises(Conflict):
        await meta.commit(aborted, 10, '"late"')
    await meta.abort(version_id)  # a live version is not aborted
    assert (await meta.lookup("f")).version_id == version_id


async def test_an_inline_file_keeps_its_bytes_until_it_is_purged(meta: MetadataStore) -> None:
    body = InlineBody(b"hello", b"c" * 16)
    result = await meta.commit_inline("s", "text/plain", body, '"h"')
    found = await meta.lookup("s")
    assert found.inline == body and found.chunks == ()
    assert (await meta.head("s")).inline == InlineBody(None, body.checksum)
    assert await meta.inline_data(result.version.version_id) == b"hello"
    assert await meta.inline_bodies(0, 10) == [(result.version.version_id, "s", body)]
    await meta.delete("s")
    assert await meta.inline_count() == 1
    purged = await meta.purge_dead()
    assert purged.inline == (result.version.version_id,) and purged.versions == 1
    assert await meta.inline_data(result.version.version_id) is None


async def test_leases_run_out_on_the_engines_clock_unless_renewed(meta: MetadataStore) -> None:
    short = await pending(meta, "a", lease=0.2)
    renewed = await pending(meta, "b", lease=0.2)
    kept = await pending(meta, "c", lease=60.0)
    await meta.renew_leases([renewed], 60.0)
    expired: list[int] = []

    async def run_out() -> bool:
        expired.extend(await meta.expire_leases())
        return bool(expired)

    await wait_for(run_out, timeout=10)
    assert expired == [short]
    assert set(await meta.version_ids(state=VersionState.PENDING)) == {renewed, kept}


async def test_dead_chunks_wait_out_their_settle_time_then_purge(meta: MetadataStore) -> None:
    version_id = await pending(meta, "f", chunks=2)
    await meta.abort(version_id)
    assert await meta.dead_chunks(3600.0, 10) == []
    dead = await meta.dead_chunks(0.0, 10)
    assert {d.version_id for d in dead} == {version_id} and len(dead) == 2
    assert all(d.nodes == ("n1",) and d.dead_for >= 0 for d in dead)
    assert (await meta.purge_dead()).versions == 0  # replicas still recorded
    for chunk in dead:
        await meta.forget_replica(chunk.chunk_id, "n1")
    assert (await meta.purge_dead()).versions == 1
    assert await meta.version_ids(name="f") == []


async def test_read_pins_hold_a_dead_version_until_they_run_out(meta: MetadataStore) -> None:
    version_id = await put(meta, "f", chunks=2)
    assert await meta.pin("gw-a", version_id, 60.0, 2.0)  # live: pinned
    assert await meta.pin("gw-a", version_id, 0.01, 2.0)  # (a shorter one never shortens it)
    await meta.delete("f")
    assert await meta.pin("gw-b", version_id, 0.05, 2.0)  # dead, but within its settle time
    dead = await meta.dead_chunks(0.0, 10)
    assert len(dead) == 2 and all(d.pinned for d in dead)
    await asyncio.sleep(0.1)
    # dead longer than the settle time: the reaper may be at it, so no new pin
    assert not await meta.pin("gw-b", version_id, 60.0, 0.05)
    assert not await meta.pin("gw-b", 10**9, 60.0, 60.0)  # nor of a version never seen
    assert all(d.pinned for d in await meta.dead_chunks(0.0, 10))  # gw-a's still runs
    await meta.renew_pins("gw-a", [version_id], 0.05)  # (renewing never shortens either)
    assert all(d.pinned for d in await meta.dead_chunks(0.0, 10))


async def test_read_pins_run_out_and_are_purged(meta: MetadataStore) -> None:
    version_id = await put(meta, "f")
    assert await meta.pin("gw-a", version_id, 0.05, 2.0)
    await meta.delete("f")
    assert all(d.pinned for d in await meta.dead_chunks(0.0, 10))
    await asyncio.sleep(0.1)
    assert not any(d.pinned for d in await meta.dead_chunks(0.0, 10))
    await meta.renew_pins("gw-a", [version_id], 60.0)  # a reader still at it: pinned again
    assert all(d.pinned for d in await meta.dead_chunks(0.0, 10))
    await meta.renew_pins("gw-a", [], 60.0)  # (nothing to renew: nothing done)
    await meta.purge_dead()  # (a pin that runs is kept)
    assert all(d.pinned for d in await meta.dead_chunks(0.0, 10))


async def test_replicas_are_kept_in_placement_order_and_added_once(meta: MetadataStore) -> None:
    version_id = await meta.begin_upload("f", "", 60.0, intent(0, nodes=("n1", "n2")))
    chunk_id = (await meta.chunk_page(version_id, 0, 1))[0].chunk_id
    await meta.add_replicas(chunk_id, ["n3", "n1"])
    replicas = await meta.chunk_replicas(chunk_id)
    assert replicas is not None and replicas.nodes == ("n1", "n2", "n3")
    assert [c.chunk_id for c in await meta.chunks_on(["n3"], 10)] == [chunk_id]
    assert await meta.known_replicas("n2", [chunk_id, "other"]) == {chunk_id}
    assert await meta.replica_count("n1") == 1
    assert await meta.replica_node_ids() == {"n1", "n2", "n3"}


async def test_names_list_in_code_point_order_by_prefix_and_page(meta: MetadataStore) -> None:
    names = ["a/1", "a/2", "a0", "b", "é", "名前", "\U0001f600", "a/\U0010ffff"]
    for name in names:
        await meta.commit_inline(name, "", InlineBody(b"x", b"c" * 16), '"x"')
    listed, more = await meta.list_files("", "", 100)
    assert [f.name for f in listed] == sorted(names) and more is None
    listed, more = await meta.list_files("a/", "", 2)
    assert [f.name for f in listed] == ["a/1", "a/2"] and more == "a/2"
    listed, more = await meta.list_files("a/", "a/2", 2)
    assert [f.name for f in listed] == ["a/\U0010ffff"] and more is None
    listed, _ = await meta.list_files("", "b", 100)
    assert [f.name for f in listed] == sorted(names)[sorted(names).index("b") + 1 :]


async def test_members_and_identities_are_remembered(make_engine: Engine) -> None:
    meta = await make_engine()
    await meta.set_member("h:1", MemberState.ACTIVE)
    await meta.set_member("h:2", MemberState.DRAINING)
    await meta.set_member("h:2", MemberState.REMOVED)
    await meta.set_member("h:3", MemberState.ACTIVE)
    await meta.set_member("h:3", None)
    await meta.remember_identity("h:1", "id-a")
    await meta.remember_identity("h:1", "id-b")
    assert await meta.members() == [
        MemberRecord("h:1", MemberState.ACTIVE),
        MemberRecord("h:2", MemberState.REMOVED),
    ]
    assert await meta.identities() == {"h:1": "id-b"}


def test_version_states_move_only_as_their_table_says() -> None:
    pending_, live, dead = VersionState.PENDING, VersionState.LIVE, VersionState.DEAD
    assert pending_.move(live) is live and pending_.move(dead) is dead and live.move(dead) is dead
    for start, end in [(live, pending_), (dead, live), (dead, pending_), (live, live)]:
        with pytest.raises(IllegalTransition):
            start.move(end)


# --- writers at once ------------------------------------------------------------------------


async def test_commits_of_one_name_at_once_leave_one_live_version(meta: MetadataStore) -> None:
    for round_ in range(5):
        uploads = [await pending(meta, "hot") for _ in range(6)]
        results = await asyncio.gather(
            *(meta.commit(v, 10, f'"{v}"') for v in uploads), return_exceptions=True
        )
        assert not [r for r in results if isinstance(r, BaseException)], results
        assert (await meta.lookup("hot")).version_id in uploads
        assert len(await meta.version_ids(name="hot", state=VersionState.LIVE)) == 1, round_
        assert await live_without_a_name(meta) == set()


async def test_if_absent_commits_at_once_let_exactly_one_through(meta: MetadataStore) -> None:
    uploads = [await pending(meta, "once") for _ in range(6)]
    results = await asyncio.gather(
        *(meta.commit(v, 10, '"e"', if_absent=True) for v in uploads), return_exceptions=True
    )
    assert sum(not isinstance(r, BaseException) for r in results) == 1
    assert all(isinstance(r, PreconditionFailed) for r in results if isinstance(r, BaseException))


async def test_commits_racing_deletes_leave_a_whole_state(meta: MetadataStore) -> None:
    for _ in range(10):
        await put(meta, "f")
        upload = await pending(meta, "f")
        results = await asyncio.gather(
            meta.commit(upload, 10, '"n"'), meta.delete("f"), return_exceptions=True
        )
        committed, deleted = results
        assert not isinstance(committed, BaseException)
        assert not isinstance(deleted, BaseException) or isinstance(deleted, FileNotFound)
        live = await meta.version_ids(name="f", state=VersionState.LIVE)
        try:
            current = (await meta.head("f")).version_id
        except FileNotFound:
            assert live == []
        else:
            assert live == [current] == [upload]
        assert await live_without_a_name(meta) == set()
        if live:
            await meta.delete("f")


async def test_a_lease_running_out_as_its_commit_lands_is_one_or_the_other(
    meta: MetadataStore,
) -> None:
    for _ in range(10):
        upload = await pending(meta, "f", lease=-1.0)  # already past on the engine's clock
        committed, expired = await asyncio.gather(
            meta.commit(upload, 10, '"e"'), meta.expire_leases(), return_exceptions=True
        )
        if isinstance(committed, Conflict):  # expired first: dead, and never live
            assert isinstance(expired, list) and upload in expired
            assert upload in await meta.version_ids(state=VersionState.DEAD)
        else:  # committed first: live, and not killed by the expiry
            assert not isinstance(committed, BaseException)
            assert isinstance(expired, list) and upload not in expired
            assert (await meta.lookup("f")).version_id == upload
            await meta.delete("f")


async def test_two_engines_on_one_database_see_each_others_commits(make_engine: Engine) -> None:
    one, two = await make_engine(), await make_engine()
    version_id = await put(one, "f")
    assert (await two.lookup("f")).version_id == version_id
    await two.delete("f")
    with pytest.raises(FileNotFound):
        await one.lookup("f")


# --- the SQLite engine's schema -------------------------------------------------------------


async def test_a_database_from_before_schema_versions_is_migrated(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "meta.db")
    db.executescript(MIGRATIONS[0])
    db.execute(
        "INSERT INTO versions (id, name, state, size, created) VALUES (1, 'old', 'live', 5, 0)"
    )
    db.execute("INSERT INTO files (name, version_id, generation) VALUES ('old', 1, 1)")
    db.execute(
        "INSERT INTO chunks (version_id, idx, chunk_id, offset, size, checksum)"
        " VALUES (1, 0, 'c0', 0, 5, x'00')"
    )
    db.commit()
    db.close()
    meta = SQLiteMetadataStore(tmp_path / "meta.db")
    await meta.open()
    try:
        found = await meta.lookup("old")
        assert [(c.chunk_id, c.offset, c.size) for c in found.chunks] == [("c0", 0, 5)]
        version = await meta.raw(
            lambda db: db.execute("SELECT version FROM schema_version").fetchone()
        )
        assert version == (LATEST,)
    finally:
        await meta.close()


async def test_a_database_newer_than_the_code_is_refused(tmp_path: Path) -> None:
    meta = SQLiteMetadataStore(tmp_path / "meta.db")
    await meta.open()
    await meta.raw(lambda db: db.execute("UPDATE schema_version SET version = 999"))
    await meta.close()
    with pytest.raises(ConfigError, match="version 999"):
        await SQLiteMetadataStore(tmp_path / "meta.db").open()


async def test_if_match_is_a_compare_and_swap_on_the_current_etag(meta: MetadataStore) -> None:
    first = await put(meta, "f")
    etag = (await meta.head("f")).etag
    stale = await pending(meta, "f")
    with pytest.raises(PreconditionFailed):
        await meta.commit(stale, 10, '"x"', if_match=['"other"'])
    uploads = [await pending(meta, "f") for _ in range(4)]
    results = await asyncio.gather(
        *(meta.commit(v, 10, f'"{v}"', if_match=[etag]) for v in uploads),
        return_exceptions=True,
    )
    assert sum(not isinstance(r, BaseException) for r in results) == 1
    assert all(isinstance(r, PreconditionFailed) for r in results if isinstance(r, BaseException))
    with pytest.raises(PreconditionFailed):
        await meta.delete("f", if_match=[etag])  # that version is gone
    winner = (await meta.head("f")).etag
    assert await meta.delete("f", if_match=["*"]) != first
    with pytest.raises(FileNotFound):
        await meta.delete("f", if_match=[winner])
    with pytest.raises(PreconditionFailed):
        await meta.commit_inline("f", "", InlineBody(b"x", b"c" * 16), '"i"', if_match=["*"])


async def test_one_leader_at_a_time_and_a_new_one_under_a_higher_epoch(
    make_engine: Engine,
) -> None:
    a, b = await make_engine(), await make_engine()
    assert await a.leadership() is None
    before = int(time.time() * 1000)
    first = await a.lead("gw-a", 60)
    # an epoch is the clock in ms when it began: a new database starts above an old one's
    assert first is not None and before - 5000 < first < before + 5000
    assert await a.lead("gw-a", 60) == first  # renewed: the same epoch
    assert await b.lead("gw-b", 60) is None  # a's lease runs
    led = await b.leadership()
    assert led is not None and (led.holder, led.epoch) == ("gw-a", first) and led.expires_in > 50
    assert await a.lead("gw-a", 0.05) == first  # (a renewal that runs out soon)
    await wait_for(lambda: b.lead("gw-b", 60), timeout=5)  # then b takes over
    second = await b.lead("gw-b", 60)
    assert second is not None and second > first
    assert await a.lead("gw-a", 60) is None  # and a, back, is refused
    led = await a.leadership()
    assert led is not None and (led.holder, led.epoch) == ("gw-b", second)
    # a lease handed back (ttl 0) and taken again within the same millisecond still
    # makes a higher epoch
    assert await b.lead("gw-b", 0.0) == second
    await wait_for(lambda: a.lead("gw-a", 60), timeout=5)
    third = await a.lead("gw-a", 60)
    assert third is not None and third > second


async def test_contenders_at_once_make_exactly_one_leader(make_engine: Engine) -> None:
    engines = [await make_engine() for _ in range(4)]
    for round_ in range(5):
        epochs = await asyncio.gather(
            *(e.lead(f"gw-{i}-{round_}", 0.05) for i, e in enumerate(engines))
        )
        assert len([x for x in epochs if x is not None]) == 1, epochs
        await wait_for(
            lambda: _expired(engines[0]), timeout=5
        )  # the lease runs out before the next round


async def _expired(meta: MetadataStore) -> bool:
    led = await meta.leadership()
    return led is not None and led.expires_in < 0


async def test_work_requests_go_to_one_taker_in_order(make_engine: Engine) -> None:
    a, b = await make_engine(), await make_engine()
    asked = [WorkRequest("bad_replica", f"c{i}", "n1", "scrub") for i in range(6)]
    for request in asked:
        await a.request_work(request)
    await a.request_work(WorkRequest("rebalance"))
    taken = await asyncio.gather(b.take_work(3), a.take_work(3))
    assert sorted(len(t) for t in taken) == [3, 3]
    got = [r for t in taken for r in t]
    assert sorted(got, key=lambda r: r.chunk_id) == asked  # each once, none lost
    assert all(t == sorted(t, key=lambda r: r.chunk_id) for t in taken)  # oldest first
    assert await a.take_work(10) == [WorkRequest("rebalance")]
    assert await b.take_work(10) == []


async def test_gateways_check_in_and_the_leader_saves_its_job_state(make_engine: Engine) -> None:
    a, b = await make_engine(), await make_engine()
    await a.check_in("gw-a")
    await b.check_in("gw-b")
    await a.check_in("gw-a")  # (again: one row)
    seen = await b.gateways(30.0)
    assert [holder for holder, _ in seen] == ["gw-a", "gw-b"]
    assert all(0 <= ago < 5 for _, ago in seen)
    await asyncio.sleep(0.1)
    assert await a.gateways(0.05) == []  # none seen that recently
    assert await b.job_state("repair") is None
    await a.save_job_state("repair", '{"queue": 1}')
    await a.save_job_state("repair", '{"queue": 2}')
    assert await b.job_state("repair") == '{"queue": 2}'


async def test_is_current_names_the_version_a_name_points_at(make_engine: Engine) -> None:
    a, b = await make_engine(), await make_engine()
    first = await put(a, "f")
    assert await b.is_current("f", first)
    second = await put(b, "f")  # overwritten through the other
    assert not await a.is_current("f", first) and await a.is_current("f", second)
    await b.delete("f")
    assert not await a.is_current("f", second)
    assert not await a.is_current("never", 1)
    # many at once (the PostgreSQL engine sends them together): each its own answer
    ids = {f"n{i}": await put(a, f"n{i}") for i in range(20)}
    answers = await asyncio.gather(
        *(b.is_current(name, vid + (i % 2)) for i, (name, vid) in enumerate(ids.items()))
    )
    assert answers == [i % 2 == 0 for i in range(20)]


async def test_buckets_are_made_once_and_deleted_only_empty(make_engine: Engine) -> None:
    a, b = await make_engine(), await make_engine()
    assert await a.create_bucket("photos") and not await b.create_bucket("photos")
    assert await a.create_bucket("a-first")
    assert [name for name, _ in await b.buckets()] == ["a-first", "photos"]
    assert await b.bucket_exists("photos") and not await b.bucket_exists("photo")
    await put(a, "photos/cat.jpg")
    await put(a, "photos0")  # (a name just past the bucket's: not in it)
    with pytest.raises(BucketNotEmpty):
        await b.delete_bucket("photos")
    await a.delete("photos/cat.jpg")
    await b.delete_bucket("photos")
    assert not await a.bucket_exists("photos")
    with pytest.raises(NoSuchBucket):
        await a.delete_bucket("photos")


async def _part(meta: MetadataStore, upload: str, number: int, chunks: int, etag: str) -> int:
    version_id = await pending(meta, "b/big", chunks)
    await meta.seal_part(upload, number, version_id, 10 * chunks, etag)
    return version_id


async def test_a_multipart_upload_completes_by_moving_its_parts_chunks(
    make_engine: Engine,
) -> None:
    a, b = await make_engine(), await make_engine()
    made = await a.create_multipart("u1", "b/big", "text/plain\nx-amz-meta-a: 1", 3600)
    assert (await b.multipart("u1")) == made
    await _part(a, "u1", 2, 2, '"p2"')
    replaced = await _part(b, "u1", 1, 1, '"old"')
    first = await _part(a, "u1", 1, 3, '"p1"')  # (uploaded again: the old part is dropped)
    skipped = await _part(b, "u1", 5, 1, '"p5"')
    assert [(p.number, p.size, p.etag) for p in await a.parts("u1", 0, 10)] == [
        (1, 30, '"p1"'),
        (2, 20, '"p2"'),
        (5, 10, '"p5"'),
    ]
    assert [p.number for p in await b.parts("u1", 1, 1)] == [2]
    assert {v for v in await a.version_ids(state=VersionState.DEAD)} == {replaced}
    result = await b.complete_multipart("u1", "b/big", [(1, "p1"), (2, '"p2"')], '"x-2"', 20)
    version = await a.lookup("b/big")
    assert version.version_id == result.version.version_id and result.chunks == 5
    assert version.size == 50 and version.etag == '"x-2"'
    assert version.content_type == "text/plain\nx-amz-meta-a: 1"
    assert [(c.index, c.offset) for c in version.chunks] == [(i, 10 * i) for i in range(5)]
    dead = set(await a.version_ids(state=VersionState.DEAD))
    assert {replaced, first, skipped} <= dead  # (the part not listed: its chunks reclaimed)
    assert [c.chunk_id for c in await a.dead_chunks(0, 10) if c.version_id == first] == []
    assert {c.version_id for c in await a.dead_chunks(0, 10)} == {replaced, skipped}
    with pytest.raises(NoSuchUpload):
        await a.multipart("u1")
    with pytest.raises(NoSuchUpload):
        await b.complete_multipart("u1", "b/big", [(1, "p1")], '"x-1"', 0)


async def test_a_completion_is_refused_for_wrong_or_small_parts(make_engine: Engine) -> None:
    a = await make_engine()
    await a.create_multipart("u2", "b/big", "", 3600)
    await _part(a, "u2", 1, 1, '"p1"')
    await _part(a, "u2", 2, 1, '"p2"')
    with pytest.raises(InvalidPart):
        await a.complete_multipart("u2", "b/big", [(1, "p1"), (3, "p3")], '"x"', 0)
    with pytest.raises(InvalidPart):
        await a.complete_multipart("u2", "b/big", [(1, "p1"), (2, "wrong")], '"x"', 0)
    with pytest.raises(EntityTooSmall):  # (10 bytes, not the last)
        await a.complete_multipart("u2", "b/big", [(1, "p1"), (2, "p2")], '"x"', 11)
    with pytest.raises(NoSuchUpload):  # (another name's upload)
        await a.complete_multipart("u2", "b/other", [(1, "p1")], '"x"', 0)
    with pytest.raises(FileNotFound):
        await a.lookup("b/big")
    # refused completions changed nothing: it still completes
    await a.complete_multipart("u2", "b/big", [(1, "p1"), (2, "p2")], '"x"', 10)
    assert (await a.lookup("b/big")).size == 20


async def test_abort_and_expiry_end_an_upload_and_reclaim_its_parts(make_engine: Engine) -> None:
    a, b = await make_engine(), await make_engine()
    await a.create_multipart("gone", "b/big", "", 3600)
    aborted = await _part(a, "gone", 1, 2, '"p"')
    await b.abort_multipart("gone")
    with pytest.raises(NoSuchUpload):
        await a.parts("gone", 0, 10)
    with pytest.raises(NoSuchUpload):
        await a.abort_multipart("gone")
    late = await pending(a, "b/big")
    with pytest.raises(NoSuchUpload):  # a part finished after the abort: its caller aborts it
        await a.seal_part("gone", 2, late, 10, '"late"')
    assert aborted in await a.version_ids(state=VersionState.DEAD)
    # an upload given 0.3 s: its part's lease ends with it, and the reaper's expiry takes both
    await a.create_multipart("short", "b/s", "", 0.3)
    await a.create_multipart("long", "b/l", "", 3600)
    part = await _part(a, "short", 1, 1, '"p"')
    assert [u.upload_id for u in await b.multipart_uploads("b/", ("", ""), 10)] == [
        "long",
        "short",
    ]
    assert [u.upload_id for u in await b.multipart_uploads("b/s", ("", ""), 10)] == ["short"]
    assert [u.upload_id for u in await b.multipart_uploads("", ("b/l", "long"), 10)] == ["short"]
    assert part not in await a.expire_leases()

    async def expired() -> bool:
        return part in await b.expire_leases()

    await wait_for(expired, timeout=5)
    with pytest.raises(NoSuchUpload):
        await a.multipart("short")
    assert [u.upload_id for u in await b.multipart_uploads("", ("", ""), 10)] == ["long"]


async def test_parts_sealed_at_once_leave_one_per_number(make_engine: Engine) -> None:
    """Two gateways storing part 1 at once, many times: one part stays per number, every
    other version is given up, and the completion has exactly the sealed part's chunks."""
    a, b = await make_engine(), await make_engine()
    await a.create_multipart("race", "b/big", "", 3600)
    versions = [await pending(x, "b/big", 2) for x in (a, b) * 4]
    await asyncio.gather(
        *((a, b)[i % 2].seal_part("race", 1, v, 20, f'"v{v}"') for i, v in enumerate(versions))
    )
    (kept,) = await a.parts("race", 0, 10)
    pending_now = set(await a.version_ids(state=VersionState.PENDING))
    assert pending_now & set(versions) == {kept.version_id}
    result = await b.complete_multipart("race", "b/big", [(1, kept.etag)], '"r"', 0)
    assert result.version.version_id in set(await a.version_ids(state=VersionState.LIVE))
    assert len((await a.lookup("b/big")).chunks) == 2
