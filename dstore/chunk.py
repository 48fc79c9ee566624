"""Chunk identity and integrity: chunk ids and the per-chunk checksum (xxh3-128).

Why xxh3-128: it runs at well over 10 GB/s on one core (MD5 ~0.6, SHA-256 ~1.3 GB/s on our
machines), so it costs almost nothing on the write and read paths; 128 bits make an
undetected random corruption vanishingly unlikely. It is not a cryptographic hash: it
detects bit rot and torn writes, not a malicious node (nodes are authenticated peers).
"""

from __future__ import annotations

import re
import secrets
import threading

import xxhash

CHECKSUM_SIZE = 16
_CHUNK_ID = re.compile(r"[0-9a-f]{16,128}")


_POOL_SIZE = 4096  # random bytes fetched per system call (256 ids)
_pool = b""
_pool_lock = threading.Lock()


def new_chunk_id() -> str:
    """A fresh random chunk id (128 bits from the OS's CSPRNG, lowercase hex). The bytes
    are fetched 4 KiB at a time: one ``getrandom`` call costs ~25 µs on our VMs."""
    global _pool
    with _pool_lock:
        if len(_pool) < 16:
            _pool = secrets.token_bytes(_POOL_SIZE)
        raw, _pool = _pool[:16], _pool[16:]
    return raw.hex()


def is_valid_chunk_id(chunk_id: object) -> bool:
    """Only lowercase hex of bounded length: no path can ever be formed from a chunk id."""
    return isinstance(chunk_id, str) and _CHUNK_ID.fullmatch(chunk_id) is not None


class Hasher:
    """Incremental chunk checksum."""

    __slots__ = ("_h",)

    def __init__(self) -> None:
        self._h = xxhash.xxh3_128()

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._h.update(data)

    def digest(self) -> bytes:
        digest: bytes = self._h.digest()
        return digest


def checksum(data: bytes | bytearray | memoryview) -> bytes:
    digest: bytes = xxhash.xxh3_128_digest(data)
    return digest
