"""Frame encoding: a 4-byte big-endian length, then a msgpack map of that many bytes."""

from __future__ import annotations

import struct
from typing import Any

import msgpack

from dstore.errors import LocalProtocolError, RemoteProtocolError

FRAME_PREFIX = struct.Struct(">I")
PREFIX_SIZE = FRAME_PREFIX.size
DEFAULT_MAX_FRAME = 1 << 20  # 1 MiB of header; chunk bytes never travel inside a frame


def encode_frame(header: dict[str, Any], max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    payload: bytes = msgpack.packb(header, use_bin_type=True)
    if len(payload) > max_frame:
        raise LocalProtocolError(f"frame of {len(payload)} bytes exceeds limit {max_frame}")
    return FRAME_PREFIX.pack(len(payload)) + payload


def decode_payload(payload: bytes | bytearray | memoryview) -> Any:
    """Decode one frame's msgpack payload; any malformation is the peer's protocol error."""
    try:
        return msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            use_list=True,
        )
    except (
        ValueError,
        TypeError,
        msgpack.ExtraData,
        msgpack.FormatError,
        msgpack.StackError,
        UnicodeDecodeError,
    ) as exc:
        raise RemoteProtocolError(f"malformed frame: {exc}") from exc
