"""Cutting a byte stream into exact-size chunks as it arrives: pure, no I/O.

Pieces are kept as views (never joined) and hashed as they come; a chunk is complete
the moment its last byte arrives, and the last chunk of a stream may be short.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dstore.chunk import Hasher


@dataclass(slots=True)
class Chunk:
    index: int
    offset: int = 0  # of its first byte within the stream
    pieces: list[memoryview] = field(default_factory=list)
    size: int = 0
    checksum: bytes = b""


class Chunker:
    def __init__(self, chunk_size: int) -> None:
        if chunk_size <= 0:
            raise ValueError("chunk size must be positive")
        self.chunk_size = chunk_size
        self.total = 0
        self._index = 0
        self._current = Chunk(0)
        self._hasher = Hasher()

    def __repr__(self) -> str:
        return f"<Chunker {self.chunk_size} bytes, chunk {self._index} at {self._current.size}>"

    def feed(self, data: bytes | bytearray | memoryview) -> list[Chunk]:
        """Take a piece of the stream; return the chunks it completed."""
        done: list[Chunk] = []
        view = memoryview(data).cast("B")
        self.total += len(view)
        while view:
            room = self.chunk_size - self._current.size
            piece, view = view[:room], view[room:]
            self._hasher.update(piece)
            self._current.pieces.append(piece)
            self._current.size += len(piece)
            if self._current.size == self.chunk_size:
                done.append(self._cut())
        return done

    def finish(self) -> Chunk | None:
        """The last, short chunk, if the stream did not end on a chunk boundary."""
        return self._cut() if self._current.size else None

    @property
    def pending(self) -> int:
        """Bytes held for the chunk being filled."""
        return self._current.size

    def _cut(self) -> Chunk:
        chunk = self._current
        chunk.checksum = self._hasher.digest()
        self._index += 1
        self._current = Chunk(self._index, chunk.offset + chunk.size)
        self._hasher = Hasher()
        return chunk
