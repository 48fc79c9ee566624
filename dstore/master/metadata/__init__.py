"""The chunk master's metadata: the interface every engine implements, its value types,
the embedded SQLite engine, and the lookup cache that goes in front of any engine."""

from dstore.errors import Conflict, FileNotFound, PreconditionFailed
from dstore.master.metadata.cache import CachedMetadataStore, LookupCache
from dstore.master.metadata.interface import MetadataStore
from dstore.master.metadata.model import (
    ChunkIntent,
    ChunkRef,
    ChunkReplicas,
    CommitResult,
    DeadChunk,
    EngineStats,
    FileInfo,
    FileVersion,
    InlineBody,
    Leadership,
    MemberRecord,
    MemberState,
    MultipartUpload,
    Part,
    Purged,
    VersionState,
    WorkRequest,
)
from dstore.master.metadata.sqlite import SQLiteMetadataStore

__all__ = [
    "CachedMetadataStore",
    "ChunkIntent",
    "ChunkRef",
    "ChunkReplicas",
    "CommitResult",
    "Conflict",
    "DeadChunk",
    "EngineStats",
    "FileInfo",
    "FileNotFound",
    "FileVersion",
    "InlineBody",
    "Leadership",
    "LookupCache",
    "MemberRecord",
    "MemberState",
    "MetadataStore",
    "MultipartUpload",
    "Part",
    "PreconditionFailed",
    "Purged",
    "SQLiteMetadataStore",
    "VersionState",
    "WorkRequest",
]
