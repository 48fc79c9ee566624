"""Gateway round trips on an in-process cluster: sizes, streaming, metadata, listing."""

from __future__ import annotations

import hashlib
import os

import pytest

from dstore.gateway import keys
from tests.conftest import LocalCluster, chunk_files, wait_for

CHUNK = 64 * 1024


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 10 * CHUNK + 123])
async def test_put_get_sizes_byte_exact(cluster: LocalCluster, size: int) -> None:
    data = os.urandom(size)
    response = await cluster.put("f.bin", data)
    assert response.status == 201
    body = await response.json()
    assert body["name"] == "f.bin" and body["size"] == size
    inline = size <= cluster.app[keys.CONFIG].inline_max  # kept in the metadata store
    assert body["chunks"] == (0 if inline else -(-size // CHUNK))
    got_response, got = await cluster.get("f.bin")
    assert got_response.status == 200
    assert got == data
    assert got_response.headers["Content-Length"] == str(size)
    assert got_response.headers["ETag"] == body["etag"]


async def _chunked(data: bytes, piece: int = 10_000):  # type: ignore[no-untyped-def]
    for start in range(0, len(data), piece):
        yield data[start : start + piece]


@pytest.mark.parametrize("size", [0, 1, CHUNK, 5 * CHUNK + 7])
async def test_chunked_transfer_without_content_length(cluster: LocalCluster, size: int) -> None:
    data = os.urandom(size)
    response = await cluster.put("chunked", _chunked(data))
    assert response.status == 201, await response.text()
    assert (await response.json())["size"] == size
    _, got = await cluster.get("chunked")
    assert got == data


async def test_every_chunk_has_replicas_on_distinct_nodes(cluster: LocalCluster) -> None:
    from dstore.gateway import keys

    await cluster.put("r", os.urandom(20 * CHUNK))
    version = await cluster.app[keys.META].lookup("r")
    assert len(version.chunks) == 20
    for chunk in version.chunks:
        assert len(set(chunk.nodes)) == 2
    on_disk = [c.name for n in cluster.nodes for c in chunk_files(n.config.data_dir)]
    assert sorted(on_disk) == sorted(c.chunk_id for c in version.chunks for _ in range(2))


async def test_content_type_and_metadata_headers(cluster: LocalCluster) -> None:
    response = await cluster.put("doc.json", b"{}", headers={"Content-Type": "application/json"})
    etag = (await response.json())["etag"]
    got_response, _ = await cluster.get("doc.json")
    assert got_response.headers["Content-Type"] == "application/json"
    assert got_response.headers["ETag"] == etag
    assert got_response.headers["Accept-Ranges"] == "bytes"
    assert got_response.headers["Last-Modified"].endswith("GMT")
    assert got_response.headers["X-Request-Id"]


async def test_head_matches_get_without_body(cluster: LocalCluster) -> None:
    data = os.urandom(3 * CHUNK)
    await cluster.put("h", data)
    assert cluster.session is not None
    async with cluster.session.head(cluster.file_url("h")) as head:
        assert head.status == 200
        assert head.headers["Content-Length"] == str(len(data))
        assert await head.read() == b""
        get_response, _ = await cluster.get("h")
        for header in ("ETag", "Last-Modified", "Content-Type", "Content-Length"):
            assert head.headers[header] == get_response.headers[header]


async def test_if_none_match_gives_304_and_412(cluster: LocalCluster) -> None:
    response = await cluster.put("c", b"one")
    etag = (await response.json())["etag"]
    got, body = await cluster.get("c", headers={"If-None-Match": etag})
    assert got.status == 304 and body == b""
    got, body = await cluster.get("c", headers={"If-None-Match": '"other"'})
    assert got.status == 200 and body == b"one"
    again = await cluster.put("c", b"two", headers={"If-None-Match": "*"})
    assert again.status == 412
    _, body = await cluster.get("c")
    assert body == b"one"
    fresh = await cluster.put("new", b"x", headers={"If-None-Match": "*"})
    assert fresh.status == 201


async def test_missing_file_is_404_with_json_error(cluster: LocalCluster) -> None:
    response, _ = await cluster.get("nope")
    assert response.status == 404
    assert (await response.json())["error"]["code"] == "not_found"
    assert cluster.session is not None
    async with cluster.session.delete(cluster.file_url("nope")) as deleted:
        assert deleted.status == 404


async def test_content_md5_and_sha256_are_verified(cluster: LocalCluster) -> None:
    import base64

    data = os.urandom(3 * CHUNK + 5)
    good_md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
    bad_md5 = base64.b64encode(hashlib.md5(b"x").digest()).decode()
    assert (await cluster.put("m", data, headers={"Content-MD5": good_md5})).status == 201
    bad = await cluster.put("m2", data, headers={"Content-MD5": bad_md5})
    assert bad.status == 400
    sha = hashlib.sha256(data).hexdigest()
    assert (await cluster.put("s", data, headers={"X-Checksum-Sha256": sha})).status == 201
    bad = await cluster.put("s2", data, headers={"X-Checksum-Sha256": "00" * 32})
    assert bad.status == 400
    malformed = await cluster.put("s3", data, headers={"X-Checksum-Sha256": "zz"})
    assert malformed.status == 400
    assert (await cluster.get("m2"))[0].status == 404
    assert (await cluster.get("s2"))[0].status == 404
    await cluster.wait_reaped()


async def test_overwrite_replaces_atomically_and_reclaims(cluster: LocalCluster) -> None:
    first, second = os.urandom(7 * CHUNK), os.urandom(2 * CHUNK + 3)
    await cluster.put("o", first)
    await cluster.put("o", second)
    _, got = await cluster.get("o")
    assert got == second
    await cluster.wait_reaped()
    on_disk = sum(len(chunk_files(n.config.data_dir)) for n in cluster.nodes)
    assert on_disk == 3 * 2


async def test_delete_makes_name_vanish_and_reclaims_space(cluster: LocalCluster) -> None:
    await cluster.put("d", os.urandom(9 * CHUNK))
    assert cluster.session is not None
    async with cluster.session.delete(cluster.file_url("d")) as response:
        assert response.status == 204
    assert (await cluster.get("d"))[0].status == 404
    await cluster.wait_reaped()
    assert sum(len(chunk_files(n.config.data_dir)) for n in cluster.nodes) == 0
    # (a node counts a delete once it is durable: just after the bytes left the disk)
    await wait_for(lambda: all(node.store.used == 0 for node in cluster.nodes))


async def test_gateway_restart_keeps_every_file(cluster: LocalCluster) -> None:
    files = {f"dir/file-{i}": os.urandom(i * 10_000) for i in range(8)}
    for name, data in files.items():
        assert (await cluster.put(name, data)).status == 201
    await cluster.restart_gateway()
    for name, data in files.items():
        response, got = await cluster.get(name)
        assert response.status == 200 and got == data
    assert cluster.session is not None
    async with cluster.session.get(f"{cluster.url}/v1/cluster") as response:
        info = await response.json()
    assert info["files"] == 8 and info["bytes"] == sum(map(len, files.values()))
    assert {n["state"] for n in info["nodes"]} == {"up"}


async def test_health_and_readiness(make_cluster) -> None:  # type: ignore[no-untyped-def]
    cluster = await make_cluster(nodes=1)
    assert cluster.session is not None
    async with cluster.session.get(f"{cluster.url}/healthz") as response:
        assert response.status == 200
    async with cluster.session.get(f"{cluster.url}/readyz") as response:
        assert response.status == 503  # 1 node up, 2 replicas wanted
    response = await cluster.put("x", b"data")
    assert response.status == 503
    assert (await response.json())["error"]["code"] == "not_enough_nodes"
    await cluster.add_node()
    await cluster.restart_gateway(storage=[n.addr for n in cluster.nodes])
    async with cluster.session.get(f"{cluster.url}/readyz") as response:
        assert response.status == 200


async def test_metrics_in_prometheus_text_format(cluster: LocalCluster) -> None:
    sent = 0  # response body bytes, streamed or sent in one piece (JSON, small files)
    for response in [await cluster.put("m1", os.urandom(3 * CHUNK)), await cluster.put("s", b"x")]:
        sent += int(response.headers["Content-Length"])
    for name in ("m1", "s", "s", "missing"):  # the second small GET is a cache hit
        _, body = await cluster.get(name)
        sent += len(body)
    assert cluster.session is not None
    async with cluster.session.get(f"{cluster.url}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await response.text()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    assert samples['dstore_http_requests_total{method="PUT",status="201"}'] == 2
    assert samples['dstore_http_requests_total{method="GET",status="404"}'] == 1
    assert samples["dstore_http_received_bytes_total"] == 3 * CHUNK + 1
    assert samples["dstore_http_sent_bytes_total"] == sent
    assert samples["dstore_files"] == 2 and samples["dstore_file_bytes"] == 3 * CHUNK + 1
    assert samples['dstore_storage_nodes{state="up"}'] == 3
    assert "dstore_repair_queue_chunks" in samples
    # every upload is at least a begin and a commit; groups never outnumber operations
    ops, transactions = (
        samples["dstore_metadata_operations_total"],
        samples["dstore_metadata_transactions_total"],
    )
    assert ops >= 4 and 0 < transactions <= ops


async def test_a_listing_with_a_delimiter_rolls_names_up_into_folders(
    cluster: LocalCluster,
) -> None:
    for name in ("a/1", "a/2", "a/b/3", "a/c/4", "a/c/5", "a/d", "a0", "top", "z/9"):
        assert (await cluster.put(name, b"x" * 10)).status == 201
    assert cluster.session is not None

    async def page(**params: str) -> dict[str, object]:
        async with cluster.session.get(f"{cluster.url}/v1/files", params=params) as r:  # type: ignore[union-attr]
            assert r.status == 200
            return dict(await r.json())

    top = await page(delimiter="/")
    assert [f["name"] for f in top["files"]] == ["a0", "top"]  # type: ignore[union-attr,index]
    assert top["prefixes"] == ["a/", "z/"] and top["next"] is None
    inside = await page(prefix="a/", delimiter="/")
    assert [f["name"] for f in inside["files"]] == ["a/1", "a/2", "a/d"]  # type: ignore[union-attr,index]
    assert inside["prefixes"] == ["a/b/", "a/c/"]
    # a page at a time: one entry each, a folder counted once, in name order
    seen: list[str] = []
    after = ""
    while True:
        one = await page(prefix="a/", delimiter="/", limit="1", start_after=after)
        seen += [f["name"] for f in one["files"]] + list(one["prefixes"])  # type: ignore[union-attr,call-overload]
        if one["next"] is None:
            break
        after = str(one["next"])
    assert seen == ["a/1", "a/2", "a/b/", "a/c/", "a/d"]
    flat = await page(prefix="a/c/")
    assert [f["name"] for f in flat["files"]] == ["a/c/4", "a/c/5"] and flat["prefixes"] == []  # type: ignore[union-attr,index]
