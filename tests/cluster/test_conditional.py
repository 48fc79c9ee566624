"""Conditional requests on the native API, as RFC 9110 says (resuming clients, caches and
careful writers rely on them); a write's If-Match is a compare-and-swap."""

from __future__ import annotations

import asyncio
import os
from email.utils import formatdate

from tests.conftest import LocalCluster

CHUNK = 64 * 1024
LONG_AGO = "Thu, 01 Jan 1970 00:00:01 GMT"


async def test_reads_honour_every_precondition(cluster: LocalCluster) -> None:
    data = os.urandom(3 * CHUNK)
    await cluster.put("f", data)
    head, _ = await cluster.get("f")
    etag, modified = head.headers["ETag"], head.headers["Last-Modified"]
    cases = [
        ({"If-Match": etag}, 200),
        ({"If-Match": '"another"'}, 412),
        ({"If-Unmodified-Since": LONG_AGO}, 412),
        ({"If-Unmodified-Since": modified}, 200),
        ({"If-None-Match": etag}, 304),
        ({"If-Modified-Since": modified}, 304),
        ({"If-Modified-Since": LONG_AGO}, 200),
        ({"If-Match": etag, "If-Unmodified-Since": LONG_AGO}, 200),  # If-Match decides
    ]
    assert cluster.session is not None
    for headers, status in cases:
        response, _ = await cluster.get("f", headers=headers)
        assert response.status == status, headers
        async with cluster.session.head(cluster.file_url("f"), headers=headers) as r:
            assert r.status == status, ("HEAD", headers)


async def test_if_range_with_a_stale_validator_sends_the_whole_new_file(
    cluster: LocalCluster,
) -> None:
    old = os.urandom(3 * CHUNK)
    await cluster.put("f", old)
    first, _ = await cluster.get("f")
    stale_etag, stale_date = first.headers["ETag"], first.headers["Last-Modified"]
    response, part = await cluster.get("f", headers={"Range": "bytes=100-", "If-Range": stale_etag})
    assert response.status == 206 and part == old[100:]  # still the same version
    new = os.urandom(3 * CHUNK + 5)
    await cluster.put("f", new)
    for validator in (stale_etag, formatdate(0, usegmt=True)):
        response, body = await cluster.get(
            "f", headers={"Range": f"bytes={2 * CHUNK}-", "If-Range": validator}
        )
        assert response.status == 200 and body == new  # whole and current, never spliced
    assert stale_date  # (a date If-Range of another second is stale the same way)


async def test_if_match_on_writes_lets_exactly_one_of_two_writers_win(
    cluster: LocalCluster,
) -> None:
    await cluster.put("doc", b"v1")
    head, _ = await cluster.get("doc")
    etag = head.headers["ETag"]
    refused = await cluster.put("doc", b"nope", headers={"If-Match": '"another"'})
    assert refused.status == 412
    assert (await cluster.get("doc"))[1] == b"v1"
    for size in (10, 3 * CHUNK):  # kept inline, and on the nodes
        head, _ = await cluster.get("doc")
        etag = head.headers["ETag"]
        results = await asyncio.gather(
            *(cluster.put("doc", os.urandom(size), headers={"If-Match": etag}) for _ in range(4))
        )
        assert sorted(r.status for r in results) == [201, 412, 412, 412]
    await cluster.wait_reaped()


async def test_if_match_on_delete(cluster: LocalCluster) -> None:
    await cluster.put("d", b"x")
    head, _ = await cluster.get("d")
    assert cluster.session is not None
    url = cluster.file_url("d")
    async with cluster.session.delete(url, headers={"If-Match": '"another"'}) as r:
        assert r.status == 412
    async with cluster.session.delete(url, headers={"If-Unmodified-Since": LONG_AGO}) as r:
        assert r.status == 412
    async with cluster.session.delete(url, headers={"If-Match": head.headers["ETag"]}) as r:
        assert r.status == 204
    async with cluster.session.delete(url, headers={"If-Match": "*"}) as r:
        assert r.status == 412  # no current version: If-Match fails (RFC 9110 §13.1.1)
