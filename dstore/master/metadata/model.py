"""The chunk master's metadata as values: files, versions, chunks and their replicas, and
the states a version or a member moves through.

A version moves ``pending`` → ``live`` → ``dead``, or ``pending`` → ``dead`` when its
upload is given up; no other move exists (``VersionState.move`` raises on one). A small
file's version is born ``live`` with its bytes inline. Engines store the states by their
values.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from dstore.errors import IllegalTransition


class VersionState(enum.Enum):
    PENDING = "pending"
    LIVE = "live"
    DEAD = "dead"

    def move(self, to: VersionState) -> VersionState:
        """``to``, if a version in this state may move there; else ``IllegalTransition``."""
        if to not in _VERSION_MOVES[self]:
            raise IllegalTransition(f"a {self.value} version cannot become {to.value}")
        return to


_VERSION_MOVES: dict[VersionState, frozenset[VersionState]] = {
    VersionState.PENDING: frozenset({VersionState.LIVE, VersionState.DEAD}),
    VersionState.LIVE: frozenset({VersionState.DEAD}),
    VersionState.DEAD: frozenset(),
}


class MemberState(enum.Enum):
    """A storage node the cluster was told about at run time (join, drain)."""

    ACTIVE = "active"
    DRAINING = "draining"
    REMOVED = "removed"


@dataclass(frozen=True, slots=True)
class ChunkIntent:
    """A chunk about to be sent: recorded before its bytes leave the gateway. ``offset``
    is the chunk's first byte within the file, known when it is cut (chunks of one file
    are recorded out of order, so the store cannot count it up)."""

    index: int
    chunk_id: str
    size: int
    checksum: bytes
    nodes: Sequence[str]
    offset: int


@dataclass(frozen=True, slots=True)
class ChunkRef:
    index: int
    chunk_id: str
    offset: int  # of the chunk's first byte within the file
    size: int
    checksum: bytes
    nodes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class InlineBody:
    """A small file's bytes, kept in the metadata store itself instead of on the nodes,
    with their checksum (verified before they are served, like a chunk's). ``data`` is
    None in a version from the lookup cache, which keeps no bytes: ``inline_data`` has
    them (and the gateway's read cache, usually)."""

    data: bytes | None
    checksum: bytes


@dataclass(frozen=True, slots=True)
class FileVersion:
    name: str
    version_id: int
    size: int
    etag: str
    content_type: str
    created: float
    chunks: tuple[ChunkRef, ...] = ()
    inline: InlineBody | None = None  # for a file kept inline (no chunks)


@dataclass(frozen=True, slots=True)
class FileInfo:
    name: str
    size: int
    etag: str
    created: float


@dataclass(frozen=True, slots=True)
class MultipartUpload:
    """An S3 multipart upload in progress: the name it completes, and the content headers
    its object will have (as ``FileVersion.content_type``)."""

    upload_id: str
    name: str
    content_type: str
    created: float


@dataclass(frozen=True, slots=True)
class Part:
    """A multipart upload's part: a pending version of the upload's name, stored whole,
    whose chunks become the object's when the upload completes."""

    number: int
    version_id: int
    size: int
    etag: str
    created: float


@dataclass(frozen=True, slots=True)
class DeadChunk:
    version_id: int
    chunk_id: str
    nodes: tuple[str, ...]
    dead_for: float  # seconds since its version died, on the engine's clock
    pinned: bool = False  # a download on some gateway still reads its version


@dataclass(frozen=True, slots=True)
class ChunkReplicas:
    """A chunk as repair sees it: where its copies are meant to be."""

    chunk_id: str
    size: int
    checksum: bytes
    nodes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class MemberRecord:
    """A storage node the gateway was told about at run time (join, drain)."""

    addr: str
    state: MemberState


@dataclass(frozen=True, slots=True)
class Leadership:
    """Who runs the background work (reaper, repair, reconciler, scrubbers) of the
    gateways sharing one database: ``holder`` until ``expires_in`` seconds from now,
    under ``epoch`` (higher for every new holder)."""

    holder: str
    epoch: int
    expires_in: float


@dataclass(frozen=True, slots=True)
class WorkRequest:
    """Work a gateway asks the leader for (``MetadataStore.request_work``): ``kind``
    ``bad_replica`` (``chunk_id`` on ``node_id`` is missing or corrupt: ``reason``) or
    ``rebalance``."""

    kind: str
    chunk_id: str = ""
    node_id: str = ""
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Purged:
    """What one ``purge_dead`` dropped."""

    versions: int  # dead versions forgotten
    inline: tuple[int, ...] = ()  # versions whose inline bytes were deleted


@dataclass(slots=True)
class CommitResult:
    """A commit's outcome. ``version`` carries its chunk list when the caller asked for
    lists of up to ``keep_chunks`` and the version has no more (a cache keeps it);
    ``chunks`` always counts them."""

    version: FileVersion
    replaced: int | None = None  # the version that was live before, now dead
    chunks: int = 0
    listed: bool = False  # ``version.chunks`` is the whole list


@dataclass(frozen=True, slots=True)
class EngineStats:
    """How hard an engine works: operations run and transactions committed for them."""

    operations: int
    transactions: int
