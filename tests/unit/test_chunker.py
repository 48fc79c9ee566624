"""The chunker, pure: exact-size chunks as bytes arrive, however they are cut."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dstore.chunk import checksum
from dstore.gateway.chunker import Chunk, Chunker


def cut(data: bytes, pieces: list[int], size: int) -> list[Chunk]:
    chunker = Chunker(size)
    chunks: list[Chunk] = []
    at = 0
    for length in pieces:
        chunks += chunker.feed(data[at : at + length])
        at += length
    chunks += chunker.feed(data[at:])
    last = chunker.finish()
    return chunks + ([last] if last is not None else [])


@given(st.binary(max_size=3000), st.lists(st.integers(0, 700)), st.integers(1, 512))
def test_chunks_are_exact_in_order_and_hashed_however_the_bytes_come(
    data: bytes, pieces: list[int], size: int
) -> None:
    chunks = cut(data, pieces, size)
    assert b"".join(b"".join(c.pieces) for c in chunks) == data
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert all(c.size == size for c in chunks[:-1])
    assert not chunks or 0 < chunks[-1].size <= size
    for chunk in chunks:
        body = b"".join(chunk.pieces)
        assert chunk.offset == chunk.index * size
        assert len(body) == chunk.size and chunk.checksum == checksum(body)


def test_a_chunk_is_complete_the_moment_its_last_byte_arrives() -> None:
    chunker = Chunker(4)
    assert chunker.feed(b"abc") == [] and chunker.pending == 3
    (done,) = chunker.feed(b"d")
    assert done.size == 4 and chunker.pending == 0
    assert chunker.finish() is None  # a stream that ends on a boundary has no short chunk
    assert chunker.total == 4


def test_pieces_are_views_of_the_bytes_given_not_copies() -> None:
    data = bytearray(b"abcdefgh")
    (first, second) = Chunker(4).feed(data)
    data[0:1] = b"X"
    assert bytes(first.pieces[0]) == b"Xbcd" and bytes(second.pieces[0]) == b"efgh"


def test_a_chunk_size_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Chunker(0)
