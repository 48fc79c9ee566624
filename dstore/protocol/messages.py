"""The messages of the cluster protocol, as typed values with their wire schema.

A message is a frozen dataclass; on the wire it is a msgpack map whose ``op`` key names the
class. Every field is type-checked on decode, unknown keys are ignored (forward
compatibility), and a message whose class has a ``length`` body field announces a raw body
of that many bytes that follows the header frame unframed.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from dstore.errors import RemoteProtocolError

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = (1,)
NONCE_SIZE = 32


@dataclass(frozen=True)
class Message:
    """Base of all protocol messages."""

    OP: ClassVar[str] = ""
    # Name of the int field that announces a raw body following the header, if any.
    BODY_FIELD: ClassVar[str | None] = None

    def body_length(self) -> int:
        if self.BODY_FIELD is None:
            return 0
        value = getattr(self, self.BODY_FIELD)
        assert isinstance(value, int)
        return value


@dataclass(frozen=True)
class Request(Message):
    """A message a client sends after the handshake; ``rid`` pairs it with its reply and
    ``trace`` is the caller's request id, bound into the node's log context."""

    rid: int = 0
    trace: str = ""


@dataclass(frozen=True)
class Reply(Message):
    rid: int = 0


# --- handshake ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Hello(Message):
    """Client → node: the versions the client speaks and its challenge to the node."""

    OP = "hello"
    versions: list[int] = field(default_factory=lambda: list(SUPPORTED_VERSIONS))
    nonce: bytes = b""


@dataclass(frozen=True)
class Challenge(Message):
    """Node → client: the chosen version, the node's proof of the secret and its own nonce."""

    OP = "challenge"
    version: int = PROTOCOL_VERSION
    nonce: bytes = b""
    proof: bytes = b""


@dataclass(frozen=True)
class Auth(Message):
    """Client → node: the client's proof of the secret."""

    OP = "auth"
    proof: bytes = b""


@dataclass(frozen=True)
class Welcome(Message):
    """Node → client: the handshake is complete."""

    OP = "welcome"
    node_id: str = ""


# --- requests ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PutChunk(Request):
    OP = "put"
    BODY_FIELD = "length"
    chunk_id: str = ""
    length: int = 0
    checksum: bytes = b""


@dataclass(frozen=True)
class GetChunk(Request):
    OP = "get"
    chunk_id: str = ""
    offset: int = 0
    length: int | None = None
    # False: the reader hashes the whole chunk itself, so the node may send it straight
    # from the page cache (sendfile) without reading and hashing it first
    verify: bool = True


@dataclass(frozen=True)
class DeleteChunk(Request):
    OP = "delete"
    chunk_id: str = ""
    # the id will never be wanted again (its version is dead): a put of it that arrives
    # later, having been overtaken by this delete, is refused instead of kept as an orphan
    retire: bool = False
    # the leadership epoch of the gateway asking (0: none): a node refuses a delete under
    # an epoch older than the newest it has heard of, so a deposed leader deletes nothing
    epoch: int = 0


@dataclass(frozen=True)
class Stat(Request):
    OP = "stat"
    # the asking gateway's leadership epoch (0: it does not lead): the node's fence rises
    # to it, and deletes under older epochs are refused from then on
    epoch: int = 0


@dataclass(frozen=True)
class ListChunks(Request):
    OP = "list"
    after: str = ""
    limit: int = 1000


@dataclass(frozen=True)
class Ping(Request):
    OP = "ping"


@dataclass(frozen=True)
class TakeCorrupt(Request):
    """Ask for the chunks the scrubber found corrupt since the last ask (and moved
    aside); the node forgets them once they are handed over."""

    OP = "take_corrupt"


# --- replies -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Stored(Reply):
    """Reply to PutChunk: the chunk is durable. ``created`` is false if it was there already."""

    OP = "stored"
    created: bool = True
    # the node's used bytes right after this put, and that report's place in the order of
    # the node's reports (0: not reported); see StatReply.usage_seq
    used: int = -1
    usage_seq: int = 0


@dataclass(frozen=True)
class ChunkData(Reply):
    """Reply to GetChunk, followed by ``length`` raw bytes, then ``Done`` (or an ``Error``
    with code ``chunk_corrupt`` if the checksum failed while streaming)."""

    OP = "data"
    BODY_FIELD = "length"
    length: int = 0
    size: int = 0
    checksum: bytes = b""
    # the node read the whole chunk and checked its checksum before sending this header
    # (a verified get of a chunk of up to 4 MiB): the body's bytes are good, and the
    # reader may pass them on before the final ``Done``
    checked: bool = False


@dataclass(frozen=True)
class Done(Reply):
    OP = "done"


@dataclass(frozen=True)
class Deleted(Reply):
    OP = "deleted"
    existed: bool = False


@dataclass(frozen=True)
class StatReply(Reply):
    OP = "stat_reply"
    node_id: str = ""
    zone: str = ""
    capacity: int = 0
    used: int = 0
    reserved: int = 0
    chunks: int = 0
    scrub_bytes: int = 0  # bytes verified by the scrubber since start
    scrub_passes: int = 0  # full passes over every chunk since start
    scrub_last_pass: float | None = None  # when the last full pass ended (unix time)
    corrupt_found: int = 0  # corrupt chunks the scrubber moved aside since start
    corrupt_pending: int = 0  # of those, not yet taken by the gateway
    volumes: int = 0  # volume files holding small chunks
    volume_bytes: int = 0  # their size on disk
    volume_garbage: int = 0  # bytes of deleted records in them, awaiting compaction
    compactions: int = 0  # volumes compacted since start
    punched: int = 0  # bytes of deleted small chunks given back to the file system since start
    # increases with every report of ``used`` (here and in ``stored``), across restarts
    # too: the gateway keeps the newest and never lets an older one undo it
    usage_seq: int = 0
    fence: int = 0  # the newest leadership epoch this node has heard of (since start)
    # how long making writes durable took since start: counts per bucket of
    # ``dstore.histogram.BUCKETS`` (one more above the last) and their sum in seconds
    fsync_counts: list[int] = field(default_factory=list)
    fsync_seconds: float = 0.0


@dataclass(frozen=True)
class ChunkList(Reply):
    """One page of a node's inventory: ``chunks`` holds ``[chunk_id, size, mtime]`` rows."""

    OP = "chunk_list"
    chunks: list[list[Any]] = field(default_factory=list)
    next: str | None = None


@dataclass(frozen=True)
class CorruptList(Reply):
    OP = "corrupt_list"
    chunks: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Pong(Reply):
    OP = "pong"
    time: float = 0.0


@dataclass(frozen=True)
class Error(Reply):
    """Any request may be answered by an error; so may a broken frame (``rid`` 0)."""

    OP = "error"
    code: str = "internal_error"
    message: str = ""


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.OP: cls
    for cls in (
        Hello,
        Challenge,
        Auth,
        Welcome,
        PutChunk,
        GetChunk,
        DeleteChunk,
        Stat,
        ListChunks,
        Ping,
        TakeCorrupt,
        Stored,
        ChunkData,
        Done,
        Deleted,
        StatReply,
        ChunkList,
        CorruptList,
        Pong,
        Error,
    )
}


def _checker(annotation: Any) -> Callable[[Any], bool]:
    """A type check for one field, built once from its annotation (decoding a frame then
    costs no typing introspection)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [_checker(arg) for arg in typing.get_args(annotation)]
        return lambda value: any(check(value) for check in options)
    if annotation is type(None):
        return lambda value: value is None
    if annotation is Any:
        return lambda value: True
    if origin is list:
        (item,) = typing.get_args(annotation)
        check_item = _checker(item)
        return lambda value: isinstance(value, list) and all(check_item(v) for v in value)
    if annotation is float:
        return lambda value: isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is int:
        return lambda value: isinstance(value, int) and not isinstance(value, bool)
    if annotation is str:
        return lambda value: isinstance(value, str)
    return lambda value: isinstance(value, annotation)


_SCHEMAS: dict[type[Message], list[tuple[str, Callable[[Any], bool]]]] = {}


def _schema(cls: type[Message]) -> list[tuple[str, Callable[[Any], bool]]]:
    schema = _SCHEMAS.get(cls)
    if schema is None:
        hints = typing.get_type_hints(cls)
        schema = [(f.name, _checker(hints[f.name])) for f in dataclasses.fields(cls)]
        _SCHEMAS[cls] = schema
    return schema


def to_header(message: Message) -> dict[str, Any]:
    """The msgpack map for a message."""
    header: dict[str, Any] = {"op": message.OP}
    for name, _ in _schema(type(message)):
        header[name] = getattr(message, name)
    return header


def from_header(header: Any) -> Message:
    """Build a message from a decoded msgpack map, checking every field's type."""
    if not isinstance(header, dict):
        raise RemoteProtocolError("frame header is not a map")
    op = header.get("op")
    cls = MESSAGE_TYPES.get(op) if isinstance(op, str) else None
    if cls is None:
        raise RemoteProtocolError(f"unknown op {op!r}")
    values: dict[str, Any] = {}
    for name, check in _schema(cls):
        if name not in header:
            continue
        value = header[name]
        if not check(value):
            raise RemoteProtocolError(f"{op}: field {name!r} has the wrong type")
        values[name] = value
    message = cls(**values)
    if message.body_length() < 0:
        raise RemoteProtocolError(f"{op}: negative body length")
    return message
