"""A real storage node over real TCP: every operation, bad input, limits, concurrency."""

from __future__ import annotations

import asyncio
import errno
import gc
import os
import random
import struct
import sys
import time
import weakref
from pathlib import Path

import pytest

from dstore.chunk import checksum, new_chunk_id
from dstore.errors import (
    AuthenticationFailed,
    ChecksumMismatch,
    ChunkConflict,
    ChunkCorrupt,
    ChunkNotFound,
    ChunkRetired,
    DstoreError,
    InvalidChunkId,
    NodeUnavailable,
    OutOfSpace,
)
from dstore.protocol import Error, Ping
from dstore.protocol.codec import decode_payload, encode_frame
from dstore.protocol.messages import Hello, to_header
from dstore.rpc.client import NodeClient
from dstore.storage import disk
from dstore.storage.chunkstore import DIRECT_POOL
from dstore.storage.node import StorageNode
from tests.conftest import SECRET, NodeFactory, chunk_files, tmp_files, wait_for
from tests.faultkit import FaultProxy


async def put(client: NodeClient, data: bytes, chunk_id: str | None = None) -> str:
    chunk_id = chunk_id or new_chunk_id()
    await client.put_chunk(chunk_id, data, length=len(data), checksum=checksum(data))
    return chunk_id


async def test_put_get_delete_stat_round_trip(node: StorageNode, client: NodeClient) -> None:
    data = os.urandom(3 * (1 << 20) + 17)
    chunk_id = await put(client, data)
    assert await client.get_chunk(chunk_id) == data
    stat = await client.stat()
    assert (stat.used, stat.chunks, stat.node_id) == (len(data), 1, node.node_id)
    assert await client.delete_chunk(chunk_id) is True
    assert await client.delete_chunk(chunk_id) is False
    with pytest.raises(ChunkNotFound):
        await client.get_chunk(chunk_id)
    stat = await client.stat()
    assert (stat.used, stat.chunks) == (0, 0)
    assert chunk_files(node.config.data_dir) == []


async def test_empty_chunk(client: NodeClient) -> None:
    chunk_id = await put(client, b"")
    assert await client.get_chunk(chunk_id) == b""


async def test_ranges_of_a_chunk(client: NodeClient) -> None:
    data = os.urandom(2_500_000)
    chunk_id = await put(client, data)
    rng = random.Random(7)
    cases = [
        (0, None),
        (0, 1),
        (len(data) - 1, None),
        (len(data), None),
        (1 << 20, 1 << 20),
        (123, 10**9),
    ]
    cases += [(rng.randrange(len(data)), rng.randrange(1, 1 << 21)) for _ in range(20)]
    for offset, length in cases:
        expected = data[offset:] if length is None else data[offset : offset + length]
        assert await client.get_chunk(chunk_id, offset=offset, length=length) == expected
    with pytest.raises(DstoreError) as info:
        await client.get_chunk(chunk_id, offset=len(data) + 1)
    assert info.value.code == "bad_range"


async def test_streamed_get_yields_pieces_without_whole_copy(client: NodeClient) -> None:
    data = os.urandom(5 << 20)
    chunk_id = await put(client, data)
    async with client.open_chunk(chunk_id) as body:
        assert (body.length, body.size, body.checksum) == (len(data), len(data), checksum(data))
        sizes = [len(piece) async for piece in body]
    assert sum(sizes) == len(data) and max(sizes) <= 1 << 20


async def test_streamed_put_from_async_iterable(client: NodeClient) -> None:
    data = os.urandom(3_000_001)

    async def pieces():  # type: ignore[no-untyped-def]
        for start in range(0, len(data), 65_536):
            yield data[start : start + 65_536]

    chunk_id = new_chunk_id()
    assert await client.put_chunk(chunk_id, pieces(), length=len(data), checksum=checksum(data))
    assert await client.get_chunk(chunk_id) == data


async def test_list_chunks_paginates_in_id_order(node: StorageNode, client: NodeClient) -> None:
    ids = sorted([await put(client, os.urandom(i + 1)) for i in range(23)])
    seen: list[str] = []
    after = ""
    while True:
        page = await client.list_chunks(after=after, limit=5)
        assert len(page.chunks) <= 5
        seen += [row[0] for row in page.chunks]
        for chunk_id, size, mtime in page.chunks:
            assert size == ids.index(chunk_id) + 1 or size >= 1
            assert mtime > 0
        if page.next is None:
            break
        after = page.next
    assert seen == ids
    sizes = {row[0]: row[1] for row in (await client.list_chunks(limit=100)).chunks}
    assert sum(sizes.values()) == (await client.stat()).used


async def test_many_concurrent_puts_and_gets(node: StorageNode) -> None:
    rng = random.Random(42)
    blobs = {new_chunk_id(): rng.randbytes(rng.randrange(0, 600_000)) for _ in range(60)}
    async with NodeClient("127.0.0.1", node.port, SECRET.encode(), max_connections=6) as c:
        await asyncio.gather(*(put(c, data, cid) for cid, data in blobs.items()))
        results = await asyncio.gather(*(c.get_chunk(cid) for cid in blobs))
        assert results == list(blobs.values())
        stat = await c.stat()
    assert stat.chunks == len(blobs) and stat.used == sum(map(len, blobs.values()))


async def test_wrong_checksum_is_refused_and_nothing_kept(
    node: StorageNode, client: NodeClient
) -> None:
    data = os.urandom(1_500_000)
    chunk_id = new_chunk_id()
    with pytest.raises(ChecksumMismatch):
        await client.put_chunk(chunk_id, data, length=len(data), checksum=checksum(b"other"))
    assert chunk_files(node.config.data_dir) == []
    assert tmp_files(node.config.data_dir) == []
    assert (await client.stat()).used == 0
    with pytest.raises(ChunkNotFound):
        await client.get_chunk(chunk_id)
    assert await client.get_chunk(await put(client, b"still works")) == b"still works"


async def test_same_chunk_twice_is_idempotent_and_conflicts_are_refused(client: NodeClient) -> None:
    chunk_id = await put(client, b"first")
    assert (
        await client.put_chunk(chunk_id, b"first", length=5, checksum=checksum(b"first")) is False
    )
    with pytest.raises(ChunkConflict):
        await client.put_chunk(chunk_id, b"other", length=5, checksum=checksum(b"other"))
    assert await client.get_chunk(chunk_id) == b"first"
    assert (await client.stat()).used == 5


async def test_concurrent_puts_of_one_id_store_it_once(client: NodeClient) -> None:
    data = os.urandom(800_000)
    chunk_id = new_chunk_id()
    created = await asyncio.gather(
        *(
            client.put_chunk(chunk_id, data, length=len(data), checksum=checksum(data))
            for _ in range(5)
        )
    )
    assert sorted(created) == [False, False, False, False, True]
    stat = await client.stat()
    assert (stat.chunks, stat.used) == (1, len(data))


async def test_capacity_is_enforced_before_any_byte_is_kept(start_node: NodeFactory) -> None:
    node = await start_node(capacity=1_000_000)
    async with NodeClient("127.0.0.1", node.port, SECRET.encode()) as c:
        await put(c, os.urandom(600_000))
        with pytest.raises(OutOfSpace):
            await put(c, os.urandom(600_000))
        assert len(chunk_files(node.config.data_dir)) == 1
        assert tmp_files(node.config.data_dir) == []
        stat = await c.stat()
        assert (stat.used, stat.reserved, stat.capacity) == (600_000, 0, 1_000_000)
        await put(c, os.urandom(400_000))  # exactly full is fine


async def test_concurrent_puts_never_overfill_a_node(start_node: NodeFactory) -> None:
    node = await start_node(capacity=2_000_000)
    async with NodeClient("127.0.0.1", node.port, SECRET.encode(), max_connections=10) as c:
        results = await asyncio.gather(
            *(put(c, os.urandom(300_000)) for _ in range(10)), return_exceptions=True
        )
        stored = [r for r in results if isinstance(r, str)]
        assert len(stored) == 6
        assert all(isinstance(r, OutOfSpace) for r in results if not isinstance(r, str))
        assert (await c.stat()).used == 1_800_000


async def test_full_disk_is_out_of_space_and_leaves_no_temp(
    node: StorageNode, client: NodeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dstore.storage.disk as disk

    def full(fd: int, pieces: object, offset: int | None = None) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(disk, "write_all", full)
    with pytest.raises(OutOfSpace):
        await put(client, os.urandom(100_000))  # a small chunk, for a volume
    with pytest.raises(OutOfSpace):
        await put(client, os.urandom(1_000_000))  # a chunk of its own
    with pytest.raises(OutOfSpace):
        await put(client, os.urandom(9 << 20))  # fails mid-body, not only at the end
    assert tmp_files(node.config.data_dir) == [] and chunk_files(node.config.data_dir) == []
    assert (await client.stat()).used == 0


@pytest.mark.parametrize(
    "bad_id",
    [
        "../../etc/passwd",
        "ABCDEF0123456789",
        "ab",
        "",
        "a" * 129,
        "0123456789abcdef/..",
        "0123456789abcdeg",
    ],
)
async def test_invalid_chunk_ids_never_become_paths(
    node: StorageNode, client: NodeClient, bad_id: str
) -> None:
    with pytest.raises(InvalidChunkId):
        await client.put_chunk(bad_id, b"x", length=1, checksum=checksum(b"x"))
    with pytest.raises(InvalidChunkId):
        await client.get_chunk(bad_id)
    with pytest.raises(InvalidChunkId):
        await client.delete_chunk(bad_id)
    assert chunk_files(node.config.data_dir) == []


async def test_corrupt_chunk_is_reported_never_served(
    node: StorageNode, client: NodeClient
) -> None:
    data = os.urandom(2_000_000)
    chunk_id = await put(client, data)
    (chunk,) = chunk_files(node.config.data_dir)
    chunk.flip(1_500_000, 0x40)
    with pytest.raises(ChunkCorrupt):
        await client.get_chunk(chunk_id)
    with pytest.raises(ChunkCorrupt):
        await client.get_chunk(chunk_id, offset=0, length=10)  # the range is fine, the chunk not
    with pytest.raises(ChunkCorrupt):
        async with client.open_chunk(chunk_id) as body:
            async for _ in body:
                pass
    assert await client.ping() >= 0  # and the connection pool is still healthy


async def test_unverified_get_sends_a_large_chunk_as_stored(
    node: StorageNode, client: NodeClient
) -> None:
    data = os.urandom(3_000_000)
    chunk_id = await put(client, data)
    async with client.open_chunk(chunk_id, verify=False) as body:
        assert b"".join([bytes(p) async for p in body]) == data
    got = await client.get_chunk(chunk_id, offset=1_000_000, length=5)
    assert got == data[1_000_000:1_000_005]
    # unverified means the reader's hash is the check: rot goes out as it is on disk,
    # while a verified get of the same chunk refuses it
    (chunk,) = chunk_files(node.config.data_dir)
    chunk.flip(2_000_000, 0x40)
    async with client.open_chunk(chunk_id, verify=False) as body:
        sent = b"".join([bytes(p) async for p in body])
    rotten = bytearray(data)
    rotten[2_000_000] ^= 0x40
    assert sent == rotten
    with pytest.raises(ChunkCorrupt):
        await client.get_chunk(chunk_id)
    assert await client.ping() >= 0


DIRECT_RANGES = [(0, None), (1, 4095), (4095, 2), (4096, 4096), (123_457, 3_000_001), (-1, 1)]


@pytest.mark.parametrize("size", [4 << 20, 9_000_001])  # one direct read; several, read ahead
async def test_unverified_gets_of_a_chunk_not_in_the_page_cache_read_the_disk_directly(
    node: StorageNode, client: NodeClient, size: int
) -> None:
    data = os.urandom(size)
    chunk_id = await put(client, data)
    async with node.store.reader(chunk_id, verify=False) as reader:
        if not reader.direct:
            pytest.skip("this filesystem has no O_DIRECT")
        assert not reader.sendfile  # a put drops what it wrote from the page cache
    async with node.store.reader(chunk_id) as reader:
        assert reader.direct and not reader.prefetched  # verified too
    for offset, length in DIRECT_RANGES:  # every alignment of start and end
        offset %= size
        for verify in (False, True):
            async with client.open_chunk(
                chunk_id, offset=offset, length=length, verify=verify
            ) as body:
                got = b"".join([bytes(p) async for p in body])
            want = data[offset : None if length is None else offset + length]
            assert got == want, (offset, length, verify)
    assert await node.store.verify(chunk_id) == size  # the scrubber's check, direct too


@pytest.mark.parametrize("at", [0, 4_000_000, (4 << 20) + 5, 8_999_999])
async def test_rot_anywhere_in_a_chunk_read_directly_fails_every_verified_read(
    node: StorageNode, client: NodeClient, at: int
) -> None:
    chunk_id = await put(client, os.urandom(9_000_000))
    (chunk,) = chunk_files(node.config.data_dir)
    chunk.flip(at, 0x10)
    async with node.store.reader(chunk_id) as reader:
        if not reader.direct:
            pytest.skip("this filesystem has no O_DIRECT")
    with pytest.raises(ChunkCorrupt):
        await client.get_chunk(chunk_id, offset=100, length=10)  # the range is fine
    with pytest.raises(ChunkCorrupt):
        await node.store.verify(chunk_id)
    assert await client.ping() >= 0


@pytest.mark.parametrize("direct", [True, False])  # a cold chunk; one without O_DIRECT
@pytest.mark.parametrize("size", [100_000, 3_000_000, 4 << 20])  # in a volume; own files
async def test_a_verified_get_of_a_chunk_up_to_4_mib_is_checked_before_its_header(
    node: StorageNode,
    client: NodeClient,
    monkeypatch: pytest.MonkeyPatch,
    size: int,
    direct: bool,
) -> None:
    if not direct:
        monkeypatch.setattr(disk, "set_direct", lambda fd: False)
    data = os.urandom(size)
    chunk_id = await put(client, data)
    async with client.open_chunk(chunk_id, offset=5, length=size - 9) as body:
        assert body.checked
        assert b"".join([bytes(p) async for p in body]) == data[5:-4]
    async with client.open_chunk(chunk_id, verify=False) as body:
        # unverified: nothing vouched for, except a small chunk in a volume, which is
        # always read whole and checked
        assert body.checked is (size == 100_000)
        assert b"".join([bytes(p) async for p in body]) == data
    (chunk,) = chunk_files(node.config.data_dir)
    chunk.flip(size - 1, 0x02)
    opened = False
    with pytest.raises(ChunkCorrupt):
        async with client.open_chunk(chunk_id):
            opened = True  # never: the refusal comes instead of the header
    assert not opened
    assert await client.ping() >= 0


async def test_a_verified_get_of_a_bigger_chunk_is_checked_after_its_body(
    node: StorageNode, client: NodeClient
) -> None:
    data = os.urandom((4 << 20) + 1)
    chunk_id = await put(client, data)
    async with client.open_chunk(chunk_id) as body:
        assert not body.checked
        assert b"".join([bytes(p) async for p in body]) == data
    (chunk,) = chunk_files(node.config.data_dir)
    chunk.flip(0, 0x02)
    async with client.open_chunk(chunk_id) as body:
        with pytest.raises(ChunkCorrupt):  # the verdict after the body
            async for _ in body:
                pass


async def test_concurrent_direct_reads_never_share_a_buffer(node: StorageNode) -> None:
    blobs = [os.urandom(5_000_000 + i) for i in range(6)]
    async with NodeClient("127.0.0.1", node.port, SECRET.encode(), max_connections=8) as c:
        ids = await asyncio.gather(*(put(c, blob) for blob in blobs))

        async def read(i: int) -> None:
            async with c.open_chunk(ids[i], verify=False) as body:
                pieces = [p async for p in body]
                await asyncio.sleep(0)  # hold the views while the others read
                assert b"".join(bytes(p) for p in pieces) == blobs[i]

        for _ in range(3):
            await asyncio.gather(*(read(i % len(blobs)) for i in range(12)))


async def test_gets_their_clients_abandon_leave_the_direct_read_buffers_reusable(
    start_node: NodeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that hangs up mid-body makes the node's next send fail. The read's
    buffers still go back to the pool, and usable (no garbage keeps a view of them),
    so the reads after take no fresh memory (costly to touch: docs/benchmarks.md). A
    chunk over 4 MiB, read and sent in pieces, one read ahead: a client that keeps up
    finds a send going straight out when it leaves (a smaller chunk is often in the
    socket whole by then)."""
    node = await start_node(scrub_rate=0)  # no other reader of the pool meanwhile
    size = 9_000_000
    async with NodeClient("127.0.0.1", node.port, SECRET.encode()) as client:
        chunk_id = await put(client, os.urandom(size))
        async with node.store.reader(chunk_id) as reader:
            if not reader.direct:
                pytest.skip("this filesystem has no O_DIRECT")
        gc.collect()  # what earlier tests left may still see pooled buffers
        assert await client.get_chunk(chunk_id)  # the pool warm ...
        await wait_for(lambda: len(DIRECT_POOL.idle) >= 2)  # ... once its read ahead ends
        warm = [weakref.ref(buf) for buf in DIRECT_POOL.idle]  # (weak: no count added)
        gc.disable()  # a leak must show, not be collected in passing
        try:
            for _ in range(2 * DIRECT_POOL.keep):
                async with NodeClient("127.0.0.1", node.port, SECRET.encode()) as quitter:
                    async with quitter.open_chunk(chunk_id, verify=False) as body:
                        got = 0
                        async for piece in body:  # kept up with: sends go straight out
                            got += len(piece)
                            if got > size // 2:
                                break  # and go: unread bytes in the socket, so a reset
                await wait_for(lambda: node.server.connections == 1, timeout=5)
                # every buffer back before the next read (a read ahead ends a moment
                # after its connection): a lost one never comes back, and this fails
                await wait_for(lambda: len(DIRECT_POOL.idle) >= len(warm), timeout=5)
            # the same buffers, every one back (none lost, none made anew) ...
            assert sorted(map(id, DIRECT_POOL.idle)) == sorted(id(ref()) for ref in warm)
            # ... and free: references are the pool's, the ``idle`` tuple's, ``buf`` and
            # the argument; any more would be views
            assert [sys.getrefcount(buf) - 4 for buf in DIRECT_POOL.idle] == [0] * len(warm)
        finally:
            gc.enable()
        # and the node stopped at the first failed send (asyncio warns from the fifth)
        assert "socket.send() raised exception" not in caplog.text
        assert await client.get_chunk(chunk_id, length=10)


async def test_a_connection_lost_to_a_given_up_request_is_replaced_in_the_background(
    node: StorageNode,
) -> None:
    """A request given up mid-reply (a GET whose client left) costs its connection; a
    new one opens in the background, so the next request does not wait for a connect
    and a handshake."""
    async with NodeClient("127.0.0.1", node.port, SECRET.encode()) as client:
        chunk_id = await put(client, os.urandom(9_000_000))
        assert client.idle == 1
        async with client.open_chunk(chunk_id, verify=False) as body:
            async for _ in body:
                break  # given up: the connection cannot be reused
        await wait_for(lambda: client.idle == 1 and node.server.connections == 1)
        started = asyncio.Event()

        async def read_and_stall() -> None:
            async with client.open_chunk(chunk_id, verify=False) as body:
                async for _ in body:
                    started.set()
                    await asyncio.Event().wait()  # until cancelled

        reading = asyncio.create_task(read_and_stall())
        await asyncio.wait_for(started.wait(), 5)
        reading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reading
        await wait_for(lambda: client.idle == 1 and node.server.connections == 1)
        assert len(await client.get_chunk(chunk_id, length=10)) == 10
        assert node.server.connections == 1  # the spare, used
    await wait_for(lambda: node.server.connections == 0)  # and closed with the client


async def test_a_chunk_in_the_page_cache_is_sent_from_there(
    node: StorageNode, client: NodeClient
) -> None:
    data = os.urandom(3_000_000)
    chunk_id = await put(client, data)
    path = node.store.path_of(chunk_id)
    path.read_bytes()  # now every page of it is cached
    with path.open("rb") as f:
        if not disk.cached(f.fileno(), 0, len(data)):
            pytest.skip("the kernel cannot tell what is cached (cachestat: Linux 6.5)")
    async with node.store.reader(chunk_id, verify=False) as reader:
        assert reader.sendfile
    async with client.open_chunk(chunk_id, offset=7, verify=False) as body:
        assert b"".join([bytes(p) async for p in body]) == data[7:]


async def test_without_o_direct_unverified_gets_use_sendfile(
    node: StorageNode, client: NodeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(disk, "set_direct", lambda fd: False)  # tmpfs, say
    data = os.urandom(3_000_000)
    chunk_id = await put(client, data)
    async with node.store.reader(chunk_id, verify=False) as reader:
        assert reader.sendfile
    async with client.open_chunk(chunk_id, verify=False) as body:
        assert b"".join([bytes(p) async for p in body]) == data


async def test_a_chunk_cut_short_under_a_direct_read_is_corrupt(
    node: StorageNode, client: NodeClient
) -> None:
    chunk_id = await put(client, os.urandom(6_000_000))
    (chunk,) = chunk_files(node.config.data_dir)
    async with node.store.reader(chunk_id, verify=False) as reader:
        if reader.sendfile:
            pytest.skip("this filesystem has no O_DIRECT")
        chunk.cut(1_000_000)  # after the open checked its length
        with pytest.raises(ChunkCorrupt):
            async for _ in reader:
                pass


@pytest.mark.parametrize("size", [100_000, 1_000_000])  # in a volume; in its own file
async def test_truncated_chunk_file_is_corrupt(
    node: StorageNode, client: NodeClient, size: int
) -> None:
    chunk_id = await put(client, os.urandom(size))
    (chunk,) = chunk_files(node.config.data_dir)
    chunk.cut(size // 2)
    with pytest.raises(ChunkCorrupt):
        await client.get_chunk(chunk_id)


async def test_wrong_secret_gets_nothing_done(node: StorageNode) -> None:
    async with NodeClient("127.0.0.1", node.port, b"not-the-secret") as c:
        with pytest.raises(AuthenticationFailed):
            await c.ping()


async def _raw(node: StorageNode) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", node.port)


async def _read_frame(reader: asyncio.StreamReader) -> object:
    (size,) = struct.unpack(">I", await reader.readexactly(4))
    return decode_payload(await reader.readexactly(size))


async def test_unauthenticated_connection_can_do_nothing(
    node: StorageNode, client: NodeClient
) -> None:
    data = b"secret data"
    chunk_id = await put(client, data)
    for request in (
        to_header(Ping(rid=1)),
        {"op": "get", "rid": 1, "chunk_id": chunk_id},
        {"op": "delete", "rid": 1, "chunk_id": chunk_id},
    ):
        reader, writer = await _raw(node)
        writer.write(encode_frame(request))
        reply = await asyncio.wait_for(_read_frame(reader), 5)
        assert isinstance(reply, dict) and reply["op"] == "error" and reply["code"] == "auth_failed"
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed
        writer.close()
    # hello, then a request without auth
    reader, writer = await _raw(node)
    writer.write(encode_frame(to_header(Hello(nonce=b"\1" * 32))))
    challenge = await _read_frame(reader)
    assert isinstance(challenge, dict) and challenge["op"] == "challenge"
    writer.write(encode_frame({"op": "auth", "proof": b"\0" * 32}))
    reply = await _read_frame(reader)
    assert isinstance(reply, dict) and reply["code"] == "auth_failed"
    writer.close()
    assert await client.get_chunk(chunk_id) == data


async def test_garbage_closes_that_connection_only(node: StorageNode, client: NodeClient) -> None:
    data = os.urandom(4 << 20)
    chunk_id = await put(client, data)
    rng = random.Random(99)

    async def hostile(i: int) -> None:
        reader, writer = await _raw(node)
        writer.write(rng.randbytes(rng.randrange(1, 5000)) if i % 2 else b"\xff\xff\xff\xff")
        try:
            await asyncio.wait_for(reader.read(), 5)  # the node closes, maybe after an error
        except ConnectionResetError:
            pass
        writer.close()

    async def reads() -> list[bytes]:
        return [await client.get_chunk(chunk_id) for _ in range(5)]

    results, *_ = await asyncio.gather(reads(), *(hostile(i) for i in range(20)))
    assert all(r == data for r in results)
    reader, writer = await _raw(node)
    writer.write(b"\x00\x00\x00\x05\xc1\xc1\xc1\xc1\xc1")
    reply = await asyncio.wait_for(_read_frame(reader), 5)
    assert isinstance(reply, dict) and reply["op"] == "error" and reply["code"] == "protocol_error"
    writer.close()
    assert (await client.stat()).chunks == 1


async def test_client_gone_mid_body_leaves_nothing(node: StorageNode, client: NodeClient) -> None:
    c = NodeClient("127.0.0.1", node.port, SECRET.encode())
    stream = await c.connect()  # a raw authenticated connection, then a cut body
    from dstore.protocol import PutChunk

    await stream.send(
        PutChunk(rid=1, chunk_id=new_chunk_id(), length=3_000_000, checksum=b"\0" * 16), flush=False
    )
    await stream.send_body(os.urandom(1_000_000))
    await stream.flush()

    async def taken_in() -> bool:
        return (await client.stat()).reserved > 0

    async def given_back() -> bool:
        return (await client.stat()).reserved == 0

    await wait_for(taken_in)  # the node has the put in hand, its space reserved
    await stream.aclose()
    await wait_for(given_back)  # the node sees the cut when it reads on
    assert tmp_files(node.config.data_dir) == [] and chunk_files(node.config.data_dir) == []


async def test_restart_keeps_chunks_and_counts_them_without_rereading(
    start_node: NodeFactory, tmp_path: Path
) -> None:
    node = await start_node("restart")
    async with NodeClient("127.0.0.1", node.port, SECRET.encode()) as c:
        ids = [await put(c, os.urandom(10_000 * (i + 1))) for i in range(5)]
    node_id = node.node_id
    await node.stop()
    (tmp_path / "restart" / "tmp" / "leftover.tmp").write_bytes(b"partial")
    again = await start_node("restart")
    assert again.node_id == node_id
    assert tmp_files(again.config.data_dir) == []
    async with NodeClient("127.0.0.1", again.port, SECRET.encode()) as c:
        stat = await c.stat()
        assert (stat.chunks, stat.used) == (5, sum(10_000 * (i + 1) for i in range(5)))
        assert len(await c.get_chunk(ids[2])) == 30_000


async def test_silent_node_times_out() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accept bytes, never answer

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with NodeClient(
        "127.0.0.1", port, SECRET.encode(), connect_timeout=0.3, io_timeout=0.3
    ) as c:
        with pytest.raises(NodeUnavailable, match="timed out"):
            await c.ping()
    server.close()


async def test_refused_connection_is_node_unavailable() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    async with NodeClient("127.0.0.1", port, SECRET.encode()) as c:
        with pytest.raises(NodeUnavailable):
            await c.ping()


async def test_client_reconnects_after_node_restart(start_node: NodeFactory) -> None:
    node = await start_node("bounce")
    port = node.port
    c = NodeClient("127.0.0.1", port, SECRET.encode())
    chunk_id = await put(c, b"persisted")
    await node.stop()
    with pytest.raises(NodeUnavailable):
        await c.ping()
    await start_node("bounce", port=port)
    assert await c.get_chunk(chunk_id) == b"persisted"
    assert "0/8 connections busy" in repr(c)
    await c.aclose()


async def test_pool_is_bounded(node: StorageNode) -> None:
    async with NodeClient("127.0.0.1", node.port, SECRET.encode(), max_connections=3) as c:
        await asyncio.gather(*(c.ping() for _ in range(30)))
        assert c.idle <= 3


async def test_error_reply_is_an_error_frame(node: StorageNode) -> None:
    async with NodeClient("127.0.0.1", node.port, SECRET.encode()) as c:
        with pytest.raises(ChunkNotFound) as info:
            await c.get_chunk(new_chunk_id())
        assert info.value.code == "chunk_not_found"
    assert Error.OP == "error"


async def test_identical_reput_on_a_full_node_succeeds(start_node: NodeFactory) -> None:
    node = await start_node(capacity=100_000)
    async with NodeClient("127.0.0.1", node.port, SECRET.encode()) as c:
        data = os.urandom(100_000)
        chunk_id = await put(c, data)
        assert await c.put_chunk(chunk_id, data, length=len(data), checksum=checksum(data)) is False
        with pytest.raises(OutOfSpace):
            await put(c, b"x")
        assert (await c.stat()).used == 100_000


async def test_receive_arenas_are_small_for_replies_and_large_for_bulk(
    node: StorageNode, client: NodeClient
) -> None:
    from dstore.rpc.transport import ARENA_SIZE, SMALL_ARENA

    for _ in range(50):
        await client.ping()
    (stream,) = client._idle
    assert len(stream._channel._arena) == SMALL_ARENA  # an idle connection holds little
    data = os.urandom(3_000_000)
    chunk_id = await put(client, data)
    assert await client.get_chunk(chunk_id) == data
    assert any(len(s._channel._arena) == ARENA_SIZE for s in client._idle)


async def test_a_put_overtaken_by_its_retiring_delete_is_refused(
    node: StorageNode, client: NodeClient
) -> None:
    late = new_chunk_id()
    # the reaper's delete arrives first (the upload gave up), the put after it
    assert await client.delete_chunk(late, retire=True) is False
    with pytest.raises(ChunkRetired):
        await put(client, os.urandom(300_000), late)
    assert chunk_files(node.config.data_dir) == [] and tmp_files(node.config.data_dir) == []
    assert (await client.stat()).reserved == 0 and await client.ping() >= 0
    # a stored chunk retired is gone and stays gone
    kept = await put(client, b"kept")
    assert await client.delete_chunk(kept, retire=True) is True
    with pytest.raises(ChunkRetired):
        await put(client, b"kept", kept)
    # a plain delete (trim, drain, rebalance) retires nothing: the id may come back
    moved = await put(client, b"moved")
    assert await client.delete_chunk(moved) is True
    assert await put(client, b"moved", moved) == moved
    assert await client.get_chunk(moved) == b"moved"


async def test_the_scrubber_goes_pass_after_pass_and_catches_later_rot(
    start_node: NodeFactory,
) -> None:
    node = await start_node("scrubbing", scrub_rate=1 << 30, scrub_pause=0.05)
    async with NodeClient("127.0.0.1", node.port, SECRET.encode()) as c:
        chunk_id = await put(c, os.urandom(100_000))
        passes = node.scrubber.passes
        await wait_for(lambda: node.scrubber.passes >= passes + 2)
        assert node.scrubber.corrupt_found == 0
        (chunk,) = chunk_files(node.config.data_dir)
        chunk.flip(5)
        await wait_for(lambda: node.scrubber.corrupt_found == 1)
        assert await c.take_corrupt() == [chunk_id]


async def test_a_hung_request_times_out_at_the_request_deadline(node: StorageNode) -> None:
    """The io timeout is long; the request deadline (checked by the client's sweep) ends
    the request, frees its slot, and the client goes on with a new connection."""
    proxy = await FaultProxy("127.0.0.1", node.port).start()
    async with NodeClient(
        "127.0.0.1",
        proxy.port,
        SECRET.encode(),
        io_timeout=30.0,
        request_timeout=0.4,
        max_connections=1,
    ) as c:
        await c.ping()  # handshake done, connection pooled
        await proxy.set("blackhole")
        started = time.monotonic()
        with pytest.raises(NodeUnavailable, match=r"request to .* timed out"):
            await c.put_chunk(new_chunk_id(), b"x" * 100, length=100, checksum=checksum(b"x" * 100))
        assert 0.4 <= time.monotonic() - started < 5
        assert c.busy == 0
        await proxy.set("ok")
        assert await c.ping() >= 0  # the one slot was given back; a fresh connection
        # a cancellation from elsewhere passes through as itself, not as a timeout
        await proxy.set("blackhole")
        task = asyncio.create_task(c.ping())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    await proxy.close()


async def test_usage_reports_are_ordered_and_outlive_a_restart(
    start_node: NodeFactory, tmp_path: Path
) -> None:
    """Every put's reply and every stat carry the node's used bytes with a sequence
    number that only grows, across a restart of the node too."""
    node = await start_node("usage")
    seqs = []
    async with NodeClient("127.0.0.1", node.port, SECRET.encode()) as c:
        for size in (1000, 300_000):  # one small chunk (a volume), one chunk file
            await put(c, os.urandom(size))
            seqs.append(c.usage[0])
            assert c.usage[1] == node.store.used  # the figure right after the put
        assert c.usage[1] == 301_000
        stat = await c.stat()
        seqs.append(stat.usage_seq)
        assert c.usage == (stat.usage_seq, stat.used) == (seqs[-1], 301_000)
    await node.stop()
    again = await start_node("usage")
    async with NodeClient("127.0.0.1", again.port, SECRET.encode()) as c:
        seqs.append((await c.stat()).usage_seq)
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


# --- before the handshake ------------------------------------------------------------------


async def test_an_unauthenticated_peer_gets_no_big_frame_buffered(node: StorageNode) -> None:
    """A frame announced larger than a handshake message is refused at its prefix."""
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
    writer.write(struct.pack(">I", 1 << 20) + b"\0" * 1000)  # 1 MiB announced, before hello
    await writer.drain()
    reply = await asyncio.wait_for(reader.read(), 5)  # an error frame, then the close
    assert decode_payload(reply[4:])["code"] == "protocol_error"
    writer.close()


async def test_a_silent_peer_times_out_with_one_warning_and_no_traceback(
    node: StorageNode,
) -> None:
    import structlog

    assert node.server is not None
    node.server.handshake_timeout = 0.3
    with structlog.testing.capture_logs() as logs:
        reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
        reply = await asyncio.wait_for(reader.read(), 5)
        writer.close()
    assert decode_payload(reply[4:])["code"] == "handshake_timeout"
    lines = [e for e in logs if e["log_level"] in ("warning", "error")]
    assert [(e["event"], e.get("code")) for e in lines] == [("protocol_error", "handshake_timeout")]
    assert not any("exc_info" in e for e in logs)


async def test_peers_that_never_authenticate_are_capped(node: StorageNode) -> None:
    assert node.server is not None
    node.server.max_handshaking = 8
    idle = [await asyncio.open_connection("127.0.0.1", node.port) for _ in range(8)]
    await wait_for(lambda: node.server is not None and node.server.connections == 8)
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed at once
    assert node.server.refused == 1 and node.server.connections == 8
    writer.close()
    for _, w in idle:  # once they go, authenticated clients are served again
        w.close()
    await wait_for(lambda: node.server is not None and node.server.connections == 0)
    async with NodeClient("127.0.0.1", node.port, SECRET.encode()) as client:
        assert (await client.stat()).node_id == node.node_id
