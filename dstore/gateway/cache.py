"""The gateway's read cache of small chunks: a byte-bounded LRU of verified chunk bodies.

Chunk ids are never reused and a chunk never changes once stored, so a cached body can
never be stale: a name still resolves to its current version through the metadata on
every request, and only the bytes of that version's chunks may come from here. Only
bodies that passed the gateway's own checksum check go in, so what is served from the
cache is exactly what was written. Hot small files then cost no node round trip; large
chunks never enter (they would evict hundreds of small ones for one hit). The bytes of
files kept inline in the metadata store are cached here too, by version (`inline_key`),
so one bound holds every cached byte.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

MAX_ENTRY = 1 << 20  # largest chunk kept, at most; smaller for a small cache


def inline_key(version_id: int) -> str:
    """The cache key of an inline file's bytes: version ids are never reused either (and
    chunk ids are hex, so the two never meet)."""
    return f"inline/{version_id}"


class ChunkCache:
    def __init__(self, capacity: int, max_entry: int = MAX_ENTRY) -> None:
        self.capacity = max(capacity, 0)
        self.max_entry = min(max_entry, self.capacity // 16)
        self.used = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self._entries: OrderedDict[str, bytes] = OrderedDict()

    def __repr__(self) -> str:
        return (
            f"<ChunkCache {len(self._entries)} chunks, {self.used}/{self.capacity} bytes,"
            f" {self.hits} hits, {self.misses} misses>"
        )

    def __len__(self) -> int:
        return len(self._entries)

    def ids(self) -> list[str]:
        """The cached chunk ids (and inline keys), least recently used first."""
        return list(self._entries)

    def admits(self, size: int) -> bool:
        """Whether a chunk of ``size`` bytes would be kept."""
        return 0 < size <= self.max_entry

    def get(self, chunk_id: str) -> bytes | None:
        data = self._entries.get(chunk_id)
        if data is None:
            self.misses += 1
            return None
        self._entries.move_to_end(chunk_id)
        self.hits += 1
        return data

    def put(self, chunk_id: str, data: bytes) -> None:
        """Keep a verified chunk body (the whole chunk, never a part)."""
        if not self.admits(len(data)) or chunk_id in self._entries:
            return
        self._entries[chunk_id] = data
        self.used += len(data)
        while self.used > self.capacity:
            _, evicted = self._entries.popitem(last=False)
            self.used -= len(evicted)
            self.evictions += 1

    def offer(self, chunk_id: str, pieces: Sequence[bytes | memoryview]) -> None:
        """Keep a chunk just stored (its bytes are the ones its checksum was taken of),
        so that reading a file right after writing it is a hit; only while there is room
        to spare, so writes never push out a chunk that was read."""
        size = sum(len(piece) for piece in pieces)
        if not self.admits(size) or self.used + size > self.capacity or chunk_id in self._entries:
            return
        self._entries[chunk_id] = b"".join(pieces)
        self.used += size

    def discard(self, chunk_id: str) -> None:
        """Forget a chunk (it was deleted): frees its memory at once."""
        data = self._entries.pop(chunk_id, None)
        if data is not None:
            self.used -= len(data)
