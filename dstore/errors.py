"""One flat hierarchy of dstore's errors; library exceptions are translated at module edges.

Each error carries a stable snake_case ``code`` that travels in protocol error frames and
HTTP error bodies.
"""

from __future__ import annotations


class DstoreError(Exception):
    """Base of every error dstore raises on purpose."""

    code = "internal_error"

    def __init__(self, message: str = "", *, code: str | None = None) -> None:
        super().__init__(message or self.__class__.__name__)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self)


class ConfigError(DstoreError):
    code = "bad_config"


class ProtocolError(DstoreError):
    """The cluster protocol was violated."""

    code = "protocol_error"


class LocalProtocolError(ProtocolError):
    """We tried to send something the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow (garbage, bad lengths, bad order)."""


class AuthenticationFailed(RemoteProtocolError):
    code = "auth_failed"


class NodeUnavailable(DstoreError):
    """A storage node could not be reached or did not answer in time."""

    code = "node_unavailable"


class RemoteError(DstoreError):
    """A storage node answered a request with an error frame."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message, code=code)


class InvalidChunkId(DstoreError):
    code = "invalid_chunk_id"


class ChunkNotFound(DstoreError):
    code = "chunk_not_found"


class ChunkCorrupt(DstoreError):
    code = "chunk_corrupt"


class ChecksumMismatch(DstoreError):
    code = "checksum_mismatch"


class ChunkConflict(DstoreError):
    """A chunk with this id exists with other content."""

    code = "chunk_conflict"


class ChunkRetired(DstoreError):
    """A put of a chunk the gateway has deleted for good (its version is dead)."""

    code = "chunk_retired"


class NoSuchBucket(DstoreError):
    code = "no_such_bucket"


class BucketNotEmpty(DstoreError):
    code = "bucket_not_empty"


class NoSuchUpload(DstoreError):
    """An S3 multipart upload that was never begun, or is completed, aborted or expired."""

    code = "no_such_upload"


class InvalidPart(DstoreError):
    """A multipart completion names a part not uploaded, or with another ETag."""

    code = "invalid_part"


class EntityTooSmall(DstoreError):
    """A multipart upload's part, not its last, under the 5 MiB S3 asks for."""

    code = "entity_too_small"


class MetadataTooLarge(DstoreError):
    """More user metadata (``x-amz-meta-*``) than a version keeps."""

    code = "metadata_too_large"


class Fenced(DstoreError):
    """A delete under a leadership epoch older than the newest the node has heard of: the
    gateway asking no longer leads."""

    code = "fenced"


class OutOfSpace(DstoreError):
    code = "out_of_space"


class NotEnoughNodes(DstoreError):
    code = "not_enough_nodes"


class ShuttingDown(DstoreError):
    code = "shutting_down"


class IllegalTransition(DstoreError):
    """A state machine was asked for a move its table does not have."""

    code = "illegal_transition"


class RelayCut(NodeUnavailable):
    """The source failed part-way through a relay; every byte it delivered went out."""


class NoReplica(NodeUnavailable):
    """Every replica of a chunk failed."""


class InlineReclaimed(NodeUnavailable):
    """The bytes of an inline version were gone when they were read."""


class PeerGone(ConnectionResetError):
    """The destination of a relay stopped taking bytes (closed, reset, or silent past the
    timeout). An OS-level error, not a dstore one: it is the client's socket."""


# --- the metadata ---------------------------------------------------------------------------


class FileNotFound(DstoreError):
    code = "not_found"


class PreconditionFailed(DstoreError):
    code = "precondition_failed"


class Conflict(DstoreError):
    """A state change found another state than the one it expected (a version no
    longer pending, a name moved on by another writer)."""

    code = "conflict"


# --- the HTTP front ---------------------------------------------------------------------------


class BadName(DstoreError):
    code = "bad_name"


class RangeNotSatisfiable(DstoreError):
    code = "range_not_satisfiable"


class BodyTimeout(DstoreError):
    """An upload's client sent no byte for the body timeout (408)."""

    code = "request_timeout"


class TooLarge(DstoreError):
    code = "too_large"


class ClientGone(DstoreError):
    code = "client_gone"


class Overloaded(DstoreError):
    """No memory freed up for a request in time (503)."""

    code = "overloaded"


class MetadataUnavailable(DstoreError):
    """The metadata database cannot be reached, or did not answer in time (503)."""

    code = "metadata_unavailable"


class Unauthorized(DstoreError):
    """No token, or one that is not configured (401)."""

    code = "unauthorized"


class Forbidden(DstoreError):
    """A valid token without the scope the request needs (403)."""

    code = "forbidden"


class ApiError(DstoreError):
    """A gateway answered the CLI's client with an error."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{message} ({status} {code})", code=code)
        self.status = status


# Error codes that a node sends and the client turns back into the matching class.
REMOTE_ERRORS: dict[str, type[DstoreError]] = {
    cls.code: cls
    for cls in (
        InvalidChunkId,
        ChunkNotFound,
        ChunkCorrupt,
        ChecksumMismatch,
        ChunkConflict,
        ChunkRetired,
        OutOfSpace,
        ShuttingDown,
    )
}


def from_remote(code: str, message: str) -> DstoreError:
    """Rebuild the error a node reported, keeping its code."""
    cls = REMOTE_ERRORS.get(code)
    if cls is None:
        return RemoteError(code, message)
    return cls(message)
