"""The storage role: chunks on disk behind the cluster protocol."""

from dstore.storage.chunkstore import ChunkStore
from dstore.storage.node import StorageNode, run_storage

__all__ = ["ChunkStore", "StorageNode", "run_storage"]
