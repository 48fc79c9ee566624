"""Gateway round trips on an in-process cluster: sizes, streaming, metadata, listing."""

from __future__ import annotations

import os

import pytest

from tests.conftest import LocalCluster

CHUNK = 64 * 1024


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 10 * CHUNK + 123])
async def test_put_get_sizes_byte_exact(cluster: LocalCluster, size: int) -> None:
    data = os.urandom(size)
    response = await cluster.put("f.bin", data)
    assert response.status == 201
    body = await response.json()
    assert body["name"] == "f.bin" and body["size"] == size
    assert body["chunks"] == -(-size // CHUNK)
    got_response, got = await cluster.get("f.bin")
    assert got_response.status == 200
    assert got == data
    assert got_response.headers["Content-Length"] == str(size)
    assert got_response.headers["ETag"] == body["etag"]
