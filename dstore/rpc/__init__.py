"""Transport for the cluster protocol: the only code that touches asyncio's network layer."""

from dstore.rpc.client import ChunkStream, NodeClient
from dstore.rpc.server import BodyReader, RpcServer
from dstore.rpc.transport import Channel, Connector, FramedStream, open_tcp, open_tls

__all__ = [
    "BodyReader",
    "Channel",
    "ChunkStream",
    "Connector",
    "FramedStream",
    "NodeClient",
    "RpcServer",
    "open_tcp",
    "open_tls",
]
