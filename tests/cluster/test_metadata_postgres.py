"""The engine conformance suite (tests/unit/test_metadata_engines.py) against the
PostgreSQL engine on a real, throw-away PostgreSQL, plus what only a database served to
several connections shows: engines on separate pools racing on one name."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from dstore.errors import ConfigError, MetadataUnavailable
from dstore.master.metadata import MetadataStore
from dstore.master.metadata.postgres import LATEST as PG_LATEST
from dstore.master.metadata.postgres import PostgresMetadataStore
from tests.conftest import wait_for
from tests.pg import PostgresServer
from tests.unit import test_metadata_engines as conformance
from tests.unit.test_metadata_engines import *  # noqa: F403  (the suite, collected here)
from tests.unit.test_metadata_engines import Engine, intent


@pytest.fixture
async def make_engine(pg_url: str) -> AsyncIterator[Engine]:  # the suite's, on PostgreSQL
    opened: list[MetadataStore] = []

    async def make() -> MetadataStore:
        engine = PostgresMetadataStore(pg_url, pool=4)
        await engine.open()
        opened.append(engine)
        return engine

    yield make
    for engine in reversed(opened):
        await engine.close()


# (SQLite files only)
globals().pop("test_a_database_from_before_schema_versions_is_migrated", None)
globals().pop("test_a_database_newer_than_the_code_is_refused", None)


async def test_gateways_opening_at_once_migrate_once(pg_url: str) -> None:
    engines = [PostgresMetadataStore(pg_url, pool=2) for _ in range(4)]
    await asyncio.gather(*(e.open() for e in engines))
    try:
        versions = [await e._pool.fetchval("SELECT version FROM schema_version") for e in engines]
        assert versions == [PG_LATEST] * 4
        assert await engines[0]._pool.fetchval("SELECT COUNT(*) FROM schema_version") == 1
    finally:
        for engine in engines:
            await engine.close()


async def test_a_database_newer_than_the_code_is_refused(pg_url: str) -> None:
    meta = PostgresMetadataStore(pg_url)
    await meta.open()
    await meta._pool.execute("UPDATE schema_version SET version = $1", PG_LATEST + 1)
    await meta.close()
    with pytest.raises(ConfigError, match="knows up to"):
        await PostgresMetadataStore(pg_url).open()


async def test_commits_through_separate_pools_leave_one_live_version(
    make_engine: Engine,
) -> None:
    """Eight engines (as eight gateways), each committing the same name at once, ten
    times over: one live version, every other dead, the pointer never lost."""
    engines = [await make_engine() for _ in range(8)]
    for round_ in range(10):
        uploads = [await e.begin_upload("shared", "", 60, intent(0)) for e in engines]
        results = await asyncio.gather(
            *(e.commit(v, 10, f"e{round_}") for e, v in zip(engines, uploads, strict=True)),
            return_exceptions=True,
        )
        won = [r for r in results if not isinstance(r, BaseException)]
        assert won, results
        for r in results:
            assert not isinstance(r, BaseException) or r.code == "conflict", r
        for e, v, r in zip(engines, uploads, results, strict=True):
            if isinstance(r, BaseException):
                await e.abort(v)
    live = await engines[0].version_ids(name="shared", state=conformance.VersionState.LIVE)
    assert len(live) == 1
    assert (await engines[0].lookup("shared")).version_id == live[0]


async def test_a_database_that_goes_away_is_a_503_error_and_comes_back(
    postgres_server: PostgresServer, pg_url: str
) -> None:
    """PostgreSQL stopped: operations fail within the engine's timeout as
    ``MetadataUnavailable`` (the gateway's 503), no hang; started again, the same engine
    object works on without a restart."""
    meta = PostgresMetadataStore(pg_url, timeout=2.0)
    await meta.open()
    try:
        await meta.set_member("127.0.0.1:1", conformance.MemberState.ACTIVE)
        postgres_server.stop()
        try:
            started = asyncio.get_running_loop().time()
            with pytest.raises(MetadataUnavailable):
                await meta.members()
            assert asyncio.get_running_loop().time() - started < 10
        finally:
            postgres_server.start()
        await wait_for(_answers(meta), timeout=20)
        assert [m.addr for m in await meta.members()] == ["127.0.0.1:1"]
    finally:
        await meta.close()


def _answers(meta: PostgresMetadataStore) -> Callable[[], Awaitable[bool]]:
    async def probe() -> bool:
        try:
            await meta.members()
        except MetadataUnavailable:
            return False
        return True

    return probe
