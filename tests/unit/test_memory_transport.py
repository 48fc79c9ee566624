"""The node client and the protocol server joined in memory through the transport's
``connector=`` seam: the whole request path (framing, handshake, flow control, bodies)
with no socket in between, and faults injected by changing the bytes on the way."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dstore.chunk import checksum, new_chunk_id
from dstore.config import StorageConfig
from dstore.errors import AuthenticationFailed, ChunkNotFound, NodeUnavailable
from dstore.rpc.client import NodeClient
from dstore.storage.node import StorageNode
from tests.conftest import SECRET, wait_for
from tests.memory import MemoryTransport, memory_connector


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[StorageNode]:
    """A real storage node that listens on no port: reached in memory only."""
    config = StorageConfig(port=0, data_dir=tmp_path / "node", cluster_secret=SECRET, scrub_rate=0)
    node = StorageNode(config)
    await node.start(listen=False)
    yield node
    await node.stop(grace=1.0)


def client_of(node: StorageNode, secret: str = SECRET, **kw: object) -> NodeClient:
    return NodeClient("memory", 0, secret.encode(), connector=memory_connector(node.server, **kw))  # type: ignore[arg-type]


async def test_chunks_go_round_trip_over_memory_with_backpressure(node: StorageNode) -> None:
    async with client_of(node) as client:
        data = os.urandom(9 << 20)  # more than one flow-control window many times over
        chunk_id = new_chunk_id()
        await client.put_chunk(chunk_id, data, length=len(data), checksum=checksum(data))
        assert await client.get_chunk(chunk_id) == data
        stat = await client.stat()
        assert stat.chunks == 1 and stat.node_id == node.node_id
        assert await client.delete_chunk(chunk_id)
        with pytest.raises(ChunkNotFound):
            await client.get_chunk(chunk_id)


async def test_a_wrong_secret_is_refused_in_memory_too(node: StorageNode) -> None:
    async with client_of(node, secret="not-the-cluster-secret") as client:
        with pytest.raises((AuthenticationFailed, NodeUnavailable)):
            await client.stat()
    await wait_for(lambda: node.server.connections == 0)


async def test_a_flipped_body_byte_on_the_wire_is_refused_and_nothing_kept(
    node: StorageNode,
) -> None:
    data = os.urandom(1 << 20)
    flipped = False

    def flip(chunk: bytes) -> bytes:
        nonlocal flipped
        if not flipped and len(chunk) > 4096:  # a piece of the body, not a header
            flipped = True
            return bytes([chunk[0] ^ 1]) + chunk[1:]
        return chunk

    async with client_of(node, hook=flip) as client:
        chunk_id = new_chunk_id()
        with pytest.raises(Exception, match="checksum"):
            await client.put_chunk(chunk_id, data, length=len(data), checksum=checksum(data))
        assert flipped
        with pytest.raises(ChunkNotFound):
            await client.get_chunk(chunk_id)
    assert node.store.count == 0


async def test_a_reset_mid_body_costs_only_that_connection(node: StorageNode) -> None:
    made: list[MemoryTransport] = []
    sent = 0

    def reset_after_a_mebibyte(chunk: bytes) -> bytes | None:
        nonlocal sent
        sent += len(chunk)
        if sent > 1 << 20 and made and not made[0].is_closing():
            made[0].abort()  # the first connection, part-way through the body
            return None
        return chunk

    async with client_of(node, hook=reset_after_a_mebibyte, made=made) as client:
        data = os.urandom(4 << 20)
        with pytest.raises(NodeUnavailable):
            await client.put_chunk(new_chunk_id(), data, length=len(data), checksum=checksum(data))
        # the node goes on: a new connection works, and the half chunk was not kept
        again = new_chunk_id()
        await client.put_chunk(again, b"x" * 10, length=10, checksum=checksum(b"x" * 10))
        assert await client.get_chunk(again) == b"x" * 10
    assert len(made) == 2 and node.store.count == 1
