"""TLS on every link: the gateway's port speaks HTTPS only, node links are mutual TLS
against the cluster CA, and nothing without a cluster certificate gets a node to talk."""

from __future__ import annotations

import asyncio
import hashlib
import os
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from dstore.chunk import checksum, new_chunk_id
from dstore.errors import NodeUnavailable
from dstore.gateway import keys
from dstore.rpc import NodeClient, open_tcp, open_tls
from dstore.rpc.splice import Splicer
from dstore.storage.node import StorageNode
from dstore.tls import TlsFiles, make_cluster_ca
from tests.conftest import SECRET, LocalCluster, NodeFactory, read_all, socket_pair, wait_for


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TlsFiles]:
    return make_cluster_ca(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def stranger(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TlsFiles]:
    """Certificates from another CA: well-formed, but not the cluster's."""
    return make_cluster_ca(tmp_path_factory.mktemp("other-tls"))


def tls_settings(files: TlsFiles) -> dict[str, Path | None]:
    return {"tls_cert": files.cert, "tls_key": files.key, "tls_ca": files.ca}


async def tls_cluster(
    make_cluster: Callable[..., Awaitable[LocalCluster]], certs: dict[str, TlsFiles], **kw: object
) -> LocalCluster:
    node = tls_settings(certs["storage"])
    return await make_cluster(3, [node] * 3, **tls_settings(certs["gateway"]), **kw)


def https(cluster: LocalCluster) -> str:
    return cluster.url.replace("http://", "https://")


async def test_a_tls_cluster_round_trips_files_of_every_size(
    make_cluster: Callable[..., Awaitable[LocalCluster]], certs: dict[str, TlsFiles]
) -> None:
    cluster = await tls_cluster(make_cluster, certs, replicas=2)
    trust = ssl.create_default_context(cafile=certs["gateway"].ca)
    files = {"tiny": b"x" * 10, "small": os.urandom(100_000), "big": os.urandom(3 << 20)}
    async with aiohttp.ClientSession(base_url=https(cluster)) as session:
        for name, data in files.items():
            async with session.put(f"/v1/files/{name}", data=data, ssl=trust) as r:
                assert r.status == 201, await r.text()
        for name, data in files.items():
            async with session.get(f"/v1/files/{name}", ssl=trust) as r:
                assert r.status == 200
                assert hashlib.sha256(await r.read()).digest() == hashlib.sha256(data).digest()
        # a range across chunk edges, through the copy that stands in for the splice relay
        headers = {"Range": "bytes=60000-2000000"}
        async with session.get("/v1/files/big", ssl=trust, headers=headers) as r:
            assert r.status == 206 and await r.read() == files["big"][60000:2000001]
        async with session.get("/readyz", ssl=trust) as r:
            assert r.status == 200
    # the client's socket carries TLS too: no splice relay was tried
    assert cluster.app[keys.DOWNLOADER].relays == 0


@pytest.mark.parametrize("size", [200_000, 3 << 20])  # in a volume; a file of its own
async def test_a_relay_from_a_tls_node_copies_every_byte_through_user_space(
    start_node: NodeFactory, certs: dict[str, TlsFiles], size: int
) -> None:
    node = await start_node(**tls_settings(certs["storage"]))
    data, chunk_id = os.urandom(size), new_chunk_id()
    dst, dst_far = await socket_pair()
    splicer = Splicer(dst, lambda: 0, timeout=5)
    try:
        async with await node_client(node, open_tls(certs["gateway"].client())) as client:
            await client.put_chunk(chunk_id, data, length=size, checksum=checksum(data))
            async with client.open_chunk(chunk_id) as body:
                assert body.checked
                body.hold()
                received = asyncio.create_task(read_all(dst_far, size))
                await body.relay(splicer)
            assert await received == data and splicer.sent == size
            assert (await client.stat()).node_id == node.node_id  # the connection is clean
    finally:
        splicer.close()
        dst.close()
        dst_far.close()


async def test_the_gateway_port_speaks_https_only(
    make_cluster: Callable[..., Awaitable[LocalCluster]], certs: dict[str, TlsFiles]
) -> None:
    cluster = await tls_cluster(make_cluster, certs)
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientError):  # plain HTTP to the HTTPS port
            async with session.get(f"{cluster.url}/healthz") as r:
                await r.read()
        with pytest.raises(aiohttp.ClientConnectorCertificateError):  # an unknown CA
            async with session.get(f"{https(cluster)}/healthz") as r:
                await r.read()


async def node_client(node: StorageNode, connector: object) -> NodeClient:
    return NodeClient("127.0.0.1", node.port, SECRET.encode(), io_timeout=5.0, connector=connector)  # type: ignore[arg-type]


async def test_a_node_talks_only_to_holders_of_a_cluster_certificate(
    start_node: NodeFactory, certs: dict[str, TlsFiles], stranger: dict[str, TlsFiles]
) -> None:
    node = await start_node(**tls_settings(certs["storage"]))
    no_cert = ssl.create_default_context(cafile=certs["storage"].ca)
    theirs = stranger["gateway"]
    refused = {
        "plain TCP": open_tcp,
        "TLS without a certificate": open_tls(no_cert),
        "a certificate from another CA": open_tls(
            TlsFiles(theirs.cert, theirs.key, certs["gateway"].ca).client()
        ),
        "a node that is not the cluster's": open_tls(stranger["gateway"].client()),
    }
    for why, connector in refused.items():
        async with await node_client(node, connector) as client:
            with pytest.raises(NodeUnavailable):
                await client.stat()
                pytest.fail(f"the node answered a client with {why}")
    async with await node_client(node, open_tls(certs["gateway"].client())) as client:
        stat = await client.stat()
        assert stat.node_id == node.node_id


async def test_a_gateway_with_another_ca_brings_no_node_up(
    make_cluster: Callable[..., Awaitable[LocalCluster]],
    certs: dict[str, TlsFiles],
    stranger: dict[str, TlsFiles],
) -> None:
    node = tls_settings(certs["storage"])
    cluster = await make_cluster(2, [node] * 2, **tls_settings(stranger["gateway"]), replicas=1)
    members = cluster.app[keys.CLUSTER].members.values()
    await wait_for(lambda: all(m.missed >= 5 for m in members))  # five heartbeats each
    assert all(m.state.value == "down" for m in members)
    trust = ssl.create_default_context(cafile=stranger["gateway"].ca)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{https(cluster)}/readyz", ssl=trust) as r:
            assert r.status == 503
