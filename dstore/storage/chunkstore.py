"""Chunks on disk: atomic, verified, capacity-bounded. The only code that touches disk;
blocking calls run in the default executor, batched so a chunk costs few thread hops.

Layout under the data dir::

    chunks/ab/ab…        one file per chunk over ``small_max`` bytes, in 256 fan-out
                         folders made at start: a 32-byte header, then the chunk's bytes
    volumes/             chunks of up to ``small_max`` bytes, appended to volume files
                         with group commit (``volumes.py``)
    tmp/                 writes in progress (removed at start: a crash leaves nothing visible)
    corrupt/             chunks the scrubber found damaged, kept for a post-mortem

Header: magic ``DSCK``, format version (u16), flags (u16), length (u64), xxh3-128 (16 bytes).
A write streams into a temp file while hashing, verifies the checksum, fsyncs, renames into
place and fsyncs the folder before it is acknowledged.
"""

from __future__ import annotations

import asyncio
import errno
import mmap
import os
import secrets
import shutil
import struct
import time
from collections import OrderedDict
from collections.abc import AsyncIterable, AsyncIterator, Iterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import structlog

from dstore.chunk import CHECKSUM_SIZE, Hasher, is_valid_chunk_id
from dstore.errors import (
    ChecksumMismatch,
    ChunkConflict,
    ChunkCorrupt,
    ChunkNotFound,
    ChunkRetired,
    DstoreError,
    InvalidChunkId,
    OutOfSpace,
)
from dstore.histogram import Histogram
from dstore.storage import disk
from dstore.storage.volumes import SMALL_MAX, VOLUME_SIZE, Needle, Volumes

log = structlog.get_logger("dstore.chunkstore")

HEADER = struct.Struct(">4sHHQ16s")
HEADER_SIZE = HEADER.size
MAGIC = b"DSCK"
FORMAT_VERSION = 1
WRITE_SIZE = 4 << 20  # body bytes gathered per worker-thread write
READ_SIZE = 4 << 20  # bytes read and hashed per worker-thread hop (hops are costly)
SEND_SIZE = 1 << 20  # pieces handed to the network
RETIRE_FOR = 3600.0  # seconds a retired id is refused (a put is never delayed that long)
MAX_RETIRED = 200_000  # ids remembered at most (~30 MiB); the oldest go first
SENDFILE_MIN = 256 << 10  # smaller chunks are read in the open hop even when unverified


@dataclass(frozen=True, slots=True)
class ChunkInfo:
    chunk_id: str
    size: int
    mtime: float


@dataclass(frozen=True, slots=True)
class StoreStats:
    capacity: int
    used: int
    reserved: int
    chunks: int


class _IdLock:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


def _create(tmp: Path, header: bytes) -> int:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        disk.write_all(fd, [header])
    except BaseException:
        os.close(fd)
        raise
    return fd


def _finish(
    fd: int, pieces: list[bytes | memoryview], tmp: Path, path: Path, fsyncs: Histogram
) -> None:
    """Write the last pieces, make the chunk durable and visible under its name."""
    try:
        disk.write_all(fd, pieces)
        started = time.monotonic()
        os.fsync(fd)
        fsyncs.observe(time.monotonic() - started)
        # the bytes are on disk: drop them from the page cache, so it does not grow into
        # fresh memory (costly to touch, above all in a VM); OpenStack Swift does the same
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    parent = path.parent
    os.rename(tmp, path)
    try:
        disk.fsync_dir(parent)
    except BaseException:
        os.unlink(path)  # not known durable: not acknowledged, not kept
        raise


def _unlink_chunk(path: Path) -> int | None:
    """Remove a chunk durably; its size, or None if it was not there."""
    try:
        size = max(os.stat(path).st_size - HEADER_SIZE, 0)
        os.unlink(path)
    except FileNotFoundError:
        return None
    disk.fsync_dir(path.parent)
    return size


def _raise_if_full(exc: OSError, chunk_id: str) -> None:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise OutOfSpace(f"disk full while writing chunk {chunk_id}") from exc


def _check_body(chunk_id: str, received: int, length: int, hasher: Hasher, checksum: bytes) -> None:
    """A received body is the one announced: its length, then its checksum."""
    if received != length:
        raise DstoreError(f"body had {received} bytes, {length} announced")
    if hasher.digest() != checksum:
        raise ChecksumMismatch(f"chunk {chunk_id}: body does not match its checksum")


def _abandon(fd: int, tmp: Path) -> None:
    if fd >= 0:
        os.close(fd)
    with suppress(FileNotFoundError):
        os.unlink(tmp)


class ChunkStore:
    """The chunks of one storage node."""

    def __init__(
        self,
        root: Path,
        capacity: int | None = None,
        *,
        small_max: int = SMALL_MAX,
        volume_size: int = VOLUME_SIZE,
    ) -> None:
        self.root = Path(root)
        self.chunk_dir = self.root / "chunks"
        self.tmp_dir = self.root / "tmp"
        self.corrupt_dir = self.root / "corrupt"
        self._capacity_setting = capacity
        self.capacity = capacity or 0
        self.small_max = small_max
        # how long making a write durable takes (a chunk file's fsync, a volume's
        # group-commit fdatasync): what a slow or failing disk shows first
        self.fsyncs = Histogram()
        self.volumes = Volumes(
            self.root / "volumes", self._locked, volume_size=volume_size, fsyncs=self.fsyncs
        )
        self._file_used = 0
        self._file_count = 0
        self.reserved = 0
        self._busy_ids: dict[str, _IdLock] = {}
        # ids deleted for good (``retire``), newest last: a put of one is refused
        self._retired: OrderedDict[str, float] = OrderedDict()

    def __repr__(self) -> str:
        return (
            f"<ChunkStore {self.root} {self.count} chunks, {self.used}+{self.reserved}"
            f"/{self.capacity} bytes>"
        )

    @property
    def used(self) -> int:
        """Bytes of the chunks stored (not counting volume garbage awaiting compaction)."""
        return self._file_used + self.volumes.live_bytes

    @property
    def count(self) -> int:
        return self._file_count + len(self.volumes.index)

    # --- start-up -------------------------------------------------------------------------

    async def open(self) -> None:
        """Create the layout, drop leftover temp files, and count what is stored from
        file sizes alone (no chunk is re-read)."""
        await asyncio.to_thread(self._open_sync)
        self.volumes.start()
        log.info(
            "chunk_store_open",
            root=str(self.root),
            chunks=self.count,
            used=self.used,
            capacity=self.capacity,
        )

    def _open_sync(self) -> None:
        self.chunk_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.corrupt_dir.mkdir(parents=True, exist_ok=True)
        made = False
        for i in range(256):
            folder = self.chunk_dir / f"{i:02x}"
            if not folder.is_dir():
                folder.mkdir()
                made = True
        if made:
            disk.fsync_dir(self.chunk_dir)
            disk.fsync_dir(self.root)
        probe = self.tmp_dir / f".probe-{secrets.token_hex(4)}"
        probe.write_bytes(b"")  # fail now, clearly, if the data dir is not writable
        probe.unlink()
        removed = 0
        for entry in os.scandir(self.tmp_dir):
            with suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed += 1
        if removed:
            log.info("temp_files_removed", count=removed)
        used = count = 0
        for info in self._walk(""):
            used += info.size
            count += 1
        self._file_used, self._file_count = used, count
        self.volumes.open_sync()
        if self._capacity_setting is None:
            self.capacity = shutil.disk_usage(self.root).free + self.used

    async def close(self) -> None:
        """Finish the writes under way (and stop compacting)."""
        await self.volumes.close()

    # --- paths and locks ------------------------------------------------------------------

    def path_of(self, chunk_id: str) -> Path:
        if not is_valid_chunk_id(chunk_id):
            raise InvalidChunkId(f"invalid chunk id {chunk_id!r}")
        return self.chunk_dir / chunk_id[:2] / chunk_id

    @asynccontextmanager
    async def _locked(self, chunk_id: str) -> AsyncIterator[None]:
        """Writes and deletes of one id are serialised (keeps ``used`` exact)."""
        entry = self._busy_ids.get(chunk_id)
        if entry is None:
            entry = self._busy_ids[chunk_id] = _IdLock()
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if not entry.users:
                del self._busy_ids[chunk_id]

    def stats(self) -> StoreStats:
        return StoreStats(self.capacity, self.used, self.reserved, self.count)

    # --- writes ---------------------------------------------------------------------------

    def _retire(self, chunk_id: str) -> None:
        now = time.monotonic()
        self._retired[chunk_id] = now
        self._retired.move_to_end(chunk_id)
        while self._retired and (
            len(self._retired) > MAX_RETIRED
            or next(iter(self._retired.values())) < now - RETIRE_FOR
        ):
            self._retired.popitem(last=False)

    def is_retired(self, chunk_id: str) -> bool:
        when = self._retired.get(chunk_id)
        return when is not None and when >= time.monotonic() - RETIRE_FOR

    async def write(
        self,
        chunk_id: str,
        length: int,
        checksum: bytes,
        pieces: AsyncIterable[bytes | memoryview],
    ) -> bool:
        """Store a chunk from its body pieces; True if created, False if an identical chunk
        was already stored. Raises before reading any piece if the id is invalid or there
        is no room; the caller drains the body in that case."""
        if not is_valid_chunk_id(chunk_id):
            raise InvalidChunkId(f"invalid chunk id {chunk_id!r}")
        if length < 0 or len(checksum) != CHECKSUM_SIZE:
            raise DstoreError("bad chunk length or checksum size", code="bad_request")
        async with self._locked(chunk_id):
            if self.is_retired(chunk_id):
                raise ChunkRetired(f"chunk {chunk_id} was deleted for good")
            in_volume = self.volumes.get(chunk_id) is not None
            no_room = self.used + self.reserved + length > self.capacity
            # (a re-put of a chunk already stored needs no room: the write finds it)
            if (
                no_room
                and not in_volume
                and not await asyncio.to_thread(self.path_of(chunk_id).exists)
            ):
                raise OutOfSpace(
                    f"{length} bytes do not fit: {self.used} used, {self.reserved} reserved"
                    f" of {self.capacity}"
                )
            self.reserved += length
            try:
                if in_volume or (self.small_max and length <= self.small_max):
                    # (a chunk a volume holds stays there, whatever small_max is now)
                    return await self._write_small(chunk_id, length, checksum, pieces)
                path = self.path_of(chunk_id)
                created = await self._write_new(path, chunk_id, length, checksum, pieces)
            finally:
                self.reserved -= length
            if created:
                self._file_used += length
                self._file_count += 1
            return created

    async def _write_small(
        self,
        chunk_id: str,
        length: int,
        checksum: bytes,
        pieces: AsyncIterable[bytes | memoryview],
    ) -> bool:
        """Gather the body (not copied), verify it, and append it to a volume."""
        hasher = Hasher()
        gathered: list[bytes | memoryview] = []
        received = 0
        async for piece in pieces:
            hasher.update(piece)
            received += len(piece)
            gathered.append(piece)
        _check_body(chunk_id, received, length, hasher, checksum)
        existing = self.volumes.get(chunk_id)
        if existing is not None:
            if (existing.length, existing.checksum) != (length, checksum):
                raise ChunkConflict(f"chunk {chunk_id} exists with other content")
            return False
        try:
            await self.volumes.put(chunk_id, length, checksum, gathered)
        except OSError as exc:
            _raise_if_full(exc, chunk_id)
            raise
        return True

    async def _write_new(
        self,
        path: Path,
        chunk_id: str,
        length: int,
        checksum: bytes,
        pieces: AsyncIterable[bytes | memoryview],
    ) -> bool:
        """Temp file → fsync → rename → fsync folder, in as few worker-thread hops as
        possible. Received pieces are gathered (not copied); a chunk of up to
        ``WRITE_SIZE`` (the default chunk size included) costs one hop that checks for it,
        writes it with ``writev``, fsyncs and renames it. A larger one is written
        ``WRITE_SIZE`` at a time as it arrives. False if an identical chunk was already
        stored."""
        tmp = self.tmp_dir / f"{chunk_id}.{secrets.token_hex(4)}.tmp"
        header = HEADER.pack(MAGIC, FORMAT_VERSION, 0, length, checksum)
        hasher = Hasher()
        received = 0
        gathered: list[bytes | memoryview] = []
        gathered_size = 0
        existing: tuple[int, bytes] | None = None
        fd = -1
        try:
            async for piece in pieces:
                hasher.update(piece)
                received += len(piece)
                if existing is not None:
                    continue  # already stored: only verify what is being re-sent
                gathered.append(piece)
                gathered_size += len(piece)
                if gathered_size >= WRITE_SIZE and received < length:
                    if fd < 0:
                        existing, fd = await disk.to_thread_whole(self._begin, path, tmp, header)
                        if existing is not None:
                            gathered, gathered_size = [], 0
                            continue
                    await disk.to_thread_whole(disk.write_all, fd, gathered)
                    gathered, gathered_size = [], 0
            _check_body(chunk_id, received, length, hasher, checksum)
            if fd < 0 and existing is None:
                existing = await disk.to_thread_whole(
                    self._store_whole, path, tmp, header, gathered
                )
            elif fd >= 0:
                closing, fd = fd, -1  # _finish closes it, whatever happens
                await disk.to_thread_whole(_finish, closing, gathered, tmp, path, self.fsyncs)
            if existing is not None:
                if existing != (length, checksum):
                    raise ChunkConflict(f"chunk {chunk_id} exists with other content")
                return False
            return True
        except OSError as exc:
            await disk.to_thread_whole(_abandon, fd, tmp)
            _raise_if_full(exc, chunk_id)
            raise
        except BaseException:
            await disk.to_thread_whole(_abandon, fd, tmp)
            raise

    def _store_whole(
        self, path: Path, tmp: Path, header: bytes, pieces: list[bytes | memoryview]
    ) -> tuple[int, bytes] | None:
        """One hop for a whole chunk: the stored chunk's header if there is one, else
        write, fsync, rename and fsync the folder."""
        existing, fd = self._begin(path, tmp, header)
        if existing is None:
            _finish(fd, pieces, tmp, path, self.fsyncs)
        return existing

    def _begin(self, path: Path, tmp: Path, header: bytes) -> tuple[tuple[int, bytes] | None, int]:
        """The stored chunk's (length, checksum) if there is one, else a new temp file."""
        try:
            with open(path, "rb") as f:
                return self._parse_header(f.read(HEADER_SIZE), path), -1
        except FileNotFoundError:
            return None, _create(tmp, header)

    @staticmethod
    def _parse_header(raw: bytes, path: Path) -> tuple[int, bytes]:
        if len(raw) != HEADER_SIZE:
            raise ChunkCorrupt(f"{path.name}: truncated header")
        magic, version, _flags, length, checksum = HEADER.unpack(raw)
        if magic != MAGIC or version != FORMAT_VERSION:
            raise ChunkCorrupt(f"{path.name}: bad header")
        return length, checksum

    # --- reads ----------------------------------------------------------------------------

    @asynccontextmanager
    async def reader(
        self, chunk_id: str, offset: int = 0, length: int | None = None, *, verify: bool = True
    ) -> AsyncIterator[ChunkReader]:
        """Open a chunk for streaming ``[offset, offset+length)``. With ``verify`` the whole
        chunk is hashed and a mismatch raises ``ChunkCorrupt``: here, before a byte is
        handed out, for a chunk of up to ``READ_SIZE`` (read whole at the open, and then
        ``reader.checked``), else after the last piece. Without it the caller checks the
        bytes itself, and if
        ``reader.sendfile`` it sends them with ``sendfile`` (``ChunkReader.file_range``)
        instead of iterating."""
        if offset < 0 or (length is not None and length < 0):
            raise DstoreError(f"bad range {offset}+{length}", code="bad_range")
        reader = await self._open(chunk_id, verify, check_first=verify)
        try:
            if offset > reader.size:
                raise DstoreError(
                    f"offset {offset} beyond chunk of {reader.size}", code="bad_range"
                )
            reader.offset = offset
            reader.length = (
                reader.size - offset if length is None else min(length, reader.size - offset)
            )
            yield reader
        finally:
            reader.close()

    async def _open(
        self, chunk_id: str, verify: bool = True, *, check_first: bool = False
    ) -> ChunkReader:
        """``check_first``: read and check a chunk of up to ``READ_SIZE`` whole at the open
        (a buffer for a direct read is taken here: the pool is the event loop's)."""
        if not is_valid_chunk_id(chunk_id):
            raise InvalidChunkId(f"invalid chunk id {chunk_id!r}")
        for _ in range(3):
            needle = self.volumes.get(chunk_id)
            if needle is None:
                path = self.path_of(chunk_id)
                buf = DIRECT_POOL.take() if check_first else None
                try:  # (whole: a reader opened as its caller is cancelled is closed)
                    reader = await disk.to_thread_whole(
                        ChunkReader.open, path, chunk_id, verify=verify, buf=buf
                    )
                except BaseException:
                    if buf is not None:
                        DIRECT_POOL.give(buf)
                    raise
                if buf is not None and reader._ready is not buf:
                    DIRECT_POOL.give(buf)  # not needed: a buffered read, or a big chunk
                return reader
            try:
                return await disk.to_thread_whole(
                    ChunkReader.open_needle, self.volumes.path(needle.volume), chunk_id, needle
                )
            except FileNotFoundError:
                continue  # its volume was compacted meanwhile: look again
        raise ChunkNotFound(f"chunk {chunk_id} not found")

    # --- scrubbing -----------------------------------------------------------------------

    async def verify(self, chunk_id: str) -> int | None:
        """Re-read a chunk and check it: its size if good, None if it is gone, and
        ``ChunkCorrupt`` if it is damaged."""
        try:
            reader = await self._open(chunk_id)
        except ChunkNotFound:
            return None

        try:
            buf = DIRECT_POOL.take() if reader.direct else None
        except BaseException:
            reader.close()
            raise

        def check() -> int | None:
            try:
                if buf is not None:
                    reader._hash_direct(buf)
                else:
                    pos = len(reader._first)
                    while pos < reader.size:
                        data = reader._read_and_hash(pos)
                        if not data:
                            break
                        pos += len(data)
                    if pos != reader.size or reader._hasher.digest() != reader.checksum:
                        raise ChunkCorrupt(f"chunk {chunk_id} failed its checksum")
                return reader.size
            finally:
                reader.close()

        try:
            return await disk.to_thread_whole(check)
        finally:
            if buf is not None:
                DIRECT_POOL.give(buf)

    async def quarantine(self, chunk_id: str) -> bool:
        """Move a corrupt chunk aside (``corrupt/``): never served again, kept for a
        post-mortem, no longer counted as used."""
        path = self.path_of(chunk_id)
        async with self._locked(chunk_id):
            needle = self.volumes.get(chunk_id)
            if needle is not None:
                await asyncio.to_thread(self._keep_corrupt, chunk_id, needle)
                return await self.volumes.delete(chunk_id) is not None

            def move() -> int | None:
                try:
                    size = max(os.stat(path).st_size - HEADER_SIZE, 0)
                    os.rename(path, self.corrupt_dir / f"{chunk_id}.{int(time.time())}")
                except FileNotFoundError:
                    return None
                disk.fsync_dir(path.parent)
                disk.fsync_dir(self.corrupt_dir)
                return size

            size = await disk.to_thread_whole(move)
            if size is None:
                return False
            self._file_used -= size
            self._file_count -= 1
            return True

    def _keep_corrupt(self, chunk_id: str, needle: Needle) -> None:
        """A copy of a damaged small chunk's bytes, for the post-mortem."""
        fd = os.open(self.volumes.path(needle.volume), os.O_RDONLY)
        try:
            data = os.pread(fd, needle.length, needle.offset)
        finally:
            os.close(fd)
        target = self.corrupt_dir / f"{chunk_id}.{int(time.time())}"
        target.write_bytes(
            HEADER.pack(MAGIC, FORMAT_VERSION, 0, needle.length, needle.checksum) + data
        )
        disk.fsync_dir(self.corrupt_dir)

    # --- deletes and listing --------------------------------------------------------------

    async def delete(self, chunk_id: str, *, retire: bool = False) -> bool:
        """Remove a chunk; False if it was not there. ``retire``: remember the id for
        ``RETIRE_FOR`` seconds and refuse puts of it, so a put overtaken by this delete
        (sent before the upload gave up, arriving after) cannot leave an orphan."""
        path = self.path_of(chunk_id)
        async with self._locked(chunk_id):
            if retire:
                self._retire(chunk_id)
            in_volume = await self.volumes.delete(chunk_id) is not None
            if in_volume and not self._file_count:
                return True
            # (a chunk stored as a file before small_max was raised may be in both)
            size = await disk.to_thread_whole(_unlink_chunk, path)
            if size is None:
                return in_volume
            self._file_used -= size
            self._file_count -= 1
            return True

    async def list(self, after: str = "", limit: int = 1000) -> list[ChunkInfo]:
        """Chunks with ids greater than ``after``, in id order, at most ``limit``."""

        def page() -> list[ChunkInfo]:
            rows: list[ChunkInfo] = []
            for info in self._walk(after):
                rows.append(info)
                if len(rows) >= limit:
                    break
            return rows

        # (a node holding only small chunks has no file to walk 256 folders for)
        files = await asyncio.to_thread(page) if self._file_count else []
        small = [
            ChunkInfo(chunk_id, needle.length, needle.mtime)
            for chunk_id, needle in self.volumes.ids_after(after, limit)
        ]
        merged = {info.chunk_id: info for info in files}
        merged.update((info.chunk_id, info) for info in small)
        return [merged[chunk_id] for chunk_id in sorted(merged)[:limit]]

    def _walk(self, after: str) -> Iterator[ChunkInfo]:
        """Chunk files in id order (the fan-out folders are id prefixes), after ``after``."""
        for top in _sorted_dirs(self.chunk_dir, after[:2]):
            try:
                entries = sorted(os.scandir(self.chunk_dir / top), key=lambda e: e.name)
            except FileNotFoundError:
                continue
            for entry in entries:
                if entry.name <= after or not is_valid_chunk_id(entry.name):
                    continue
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    continue
                yield ChunkInfo(entry.name, max(st.st_size - HEADER_SIZE, 0), st.st_mtime)


def _sorted_dirs(folder: Path, start: str) -> list[str]:
    try:
        names = [e.name for e in os.scandir(folder) if e.is_dir() and len(e.name) == 2]
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n >= start)


# direct reads: a whole chunk of up to READ_SIZE and its header in one worker-thread hop
# (hops cost more than the bigger buffer saves); 4 kept idle at most (16 MiB)
DIRECT_POOL = disk.BufferPool(READ_SIZE + disk.ALIGN, keep=4)


class ChunkReader:
    """One open chunk being streamed: read (and hashed, when verifying) ``READ_SIZE`` at a
    time in worker threads, one read ahead, handed out in ``SEND_SIZE`` pieces.

    A chunk over ``SENDFILE_MIN`` that is not wholly in the page cache (the usual case:
    writes drop what they wrote from it) is read with ``O_DIRECT`` into reused aligned
    buffers. Through the page cache its bytes would land in freshly allocated pages, and
    the first touch of those costs ~2 s of CPU per GiB on our VMs, whichever process
    makes it (the node's ``read``, or the gateway's ``recv`` after a ``sendfile``): three
    times what the rest of a get costs. One that is cached is read from the cache, or,
    unverified, sent from it with ``sendfile``; so is every chunk on a filesystem without
    ``O_DIRECT``."""

    def __init__(
        self,
        fd: int,
        chunk_id: str,
        size: int,
        checksum: bytes,
        base: int = HEADER_SIZE,
        *,
        verify: bool = True,
    ) -> None:
        self.chunk_id = chunk_id
        self.size = size
        self.checksum = checksum
        self.offset = 0
        self.length = size
        self.verify = verify  # hash the whole chunk and raise ChunkCorrupt on a mismatch
        self._fd = fd
        self.direct = False  # the bytes are read with O_DIRECT (the fd is set so)
        self._base = base  # file offset of the chunk's first byte
        self._hasher = Hasher()
        self._first = b""
        self.prefetched = False  # the first piece was read (and hashed) at the open
        # the whole chunk was read and its checksum checked at the open: its bytes are in
        # memory (``_first``, or ``_ready`` for a direct read: a pool buffer, ``_got``
        # bytes from the aligned block holding its first byte)
        self.checked = False
        self._ready: mmap.mmap | None = None
        self._got = 0

    @property
    def sendfile(self) -> bool:
        """Whether the caller should send the bytes, unverified, with ``sendfile``
        (``file_range``) rather than iterate over them."""
        return not self.verify and not self.prefetched and not self.direct

    def __repr__(self) -> str:
        return f"<ChunkReader {self.chunk_id} {self.offset}+{self.length} of {self.size}>"

    @classmethod
    def open(
        cls, path: Path, chunk_id: str, *, verify: bool = True, buf: mmap.mmap | None = None
    ) -> ChunkReader:
        """Open, check the header and file length, and choose how to read: a chunk of up
        to ``SENDFILE_MIN`` (or a cached one, verified) has its first piece read here,
        and for chunks of up to ``READ_SIZE`` this one worker-thread hop is then all the
        disk work of a get. Verified, such a chunk is checked here too (``checked``);
        read directly, that takes ``buf`` (a ``DIRECT_POOL`` buffer), which the reader
        then keeps as ``_ready`` until its bytes are handed on or it is closed."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError as exc:
            raise ChunkNotFound(f"chunk {chunk_id} not found") from exc
        try:
            size, checksum = ChunkStore._parse_header(os.pread(fd, HEADER_SIZE, 0), path)
            on_disk = os.fstat(fd).st_size - HEADER_SIZE
            if on_disk != size:
                raise ChunkCorrupt(f"{chunk_id}: {on_disk} bytes on disk, header says {size}")
            reader = cls(fd, chunk_id, size, checksum, verify=verify)
            if size > SENDFILE_MIN and not disk.cached(fd, HEADER_SIZE, size):
                reader.direct = disk.set_direct(fd)  # (the header was read before)
            if not reader.direct and (verify or size <= SENDFILE_MIN):
                reader._prefetch()
            elif reader.direct and verify and buf is not None and size <= READ_SIZE:
                at = HEADER_SIZE - HEADER_SIZE % disk.ALIGN
                reader._got = reader._read_direct(buf, at, HEADER_SIZE + size)
                reader._check_direct(at, reader._got, HEADER_SIZE + size)
                reader._ready = buf
                reader.checked = True
        except BaseException:
            os.close(fd)
            raise
        return reader

    @classmethod
    def open_needle(cls, path: Path, chunk_id: str, needle: Needle) -> ChunkReader:
        """Open a small chunk in its volume and read it (one hop); FileNotFoundError if the
        volume is gone."""
        fd = os.open(path, os.O_RDONLY)
        try:
            if os.fstat(fd).st_size < needle.offset + needle.length:
                raise ChunkCorrupt(f"{chunk_id}: its volume {path.name} is cut short")
            reader = cls(fd, chunk_id, needle.length, needle.checksum, needle.offset)
            reader._prefetch()
        except BaseException:
            os.close(fd)
            raise
        return reader

    def _prefetch(self) -> None:
        self._first = self._read_and_hash(0)
        self.prefetched = True
        if self.verify and len(self._first) == self.size:
            if self._hasher.digest() != self.checksum:
                raise ChunkCorrupt(f"chunk {self.chunk_id} failed its checksum")
            self.checked = True

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._ready is not None:  # never handed on
            DIRECT_POOL.give(self._ready)
            self._ready = None

    def file_range(self) -> tuple[int, int, int]:
        """(fd, file offset, byte count) of the range being read, for ``sendfile``."""
        return self._fd, self._base + self.offset, self.length

    def _read_and_hash(self, at: int) -> bytes:
        data = os.pread(self._fd, min(READ_SIZE, self.size - at), self._base + at)
        self._hasher.update(data)
        return data

    def _read_direct(self, buf: mmap.mmap, at: int, end: int) -> int:
        """Read the aligned blocks from file offset ``at`` (aligned) that cover up to
        ``end``, at most a buffer's worth, and hash the chunk's bytes among them if
        verifying; fewer bytes only at the end of the file."""
        want = min(len(buf), -(-(end - at) // disk.ALIGN) * disk.ALIGN)
        view = memoryview(buf)[:want]
        try:
            got = os.preadv(self._fd, [view], at)
            lo, hi = max(self._base - at, 0), min(self._base + self.size - at, got)
            if self.verify and lo < hi:
                self._hasher.update(view[lo:hi])
            return got
        finally:
            view.release()

    def _direct_span(self) -> tuple[int, int]:
        """The file range direct reads cover: the whole chunk if verifying, else the range."""
        if self.verify:
            return self._base, self._base + self.size
        start = self._base + self.offset
        return start, start + self.length

    def _check_direct(self, at: int, got: int, end: int) -> None:
        if at + got < end and (got % disk.ALIGN or not got):
            raise ChunkCorrupt(f"chunk {self.chunk_id} was cut short on disk")
        if at + got >= end and self.verify and self._hasher.digest() != self.checksum:
            raise ChunkCorrupt(f"chunk {self.chunk_id} failed its checksum")

    def _hash_direct(self, buf: mmap.mmap) -> None:
        """Read and check the whole chunk (blocking: the scrubber's check)."""
        start, end = self._direct_span()
        at = start - start % disk.ALIGN
        while True:
            got = self._read_direct(buf, at, end)
            self._check_direct(at, got, end)
            at += got
            if at >= end:
                return

    def __aiter__(self) -> AsyncIterator[bytes | memoryview]:
        return self._direct_pieces() if self.direct else self._pieces()

    async def _direct_pieces(self) -> AsyncIterator[memoryview]:
        """The range, read with ``O_DIRECT`` into pooled buffers, one read ahead. When
        verifying, the whole chunk is read and hashed and the check raises after the
        range's last piece, as in ``_pieces``."""
        start = self._base + self.offset
        end = start + self.length
        read_from, read_to = self._direct_span()
        at = read_from - read_from % disk.ALIGN
        pending: asyncio.Future[int] | None
        buf: mmap.mmap | None
        if self._ready is not None:  # read and checked at the open
            buf, self._ready = self._ready, None
            pending = asyncio.get_running_loop().create_future()
            pending.set_result(self._got)
        else:
            buf = DIRECT_POOL.take()
            pending = asyncio.ensure_future(asyncio.to_thread(self._read_direct, buf, at, read_to))
        ahead: mmap.mmap | None = None
        try:
            while pending is not None:
                assert buf is not None
                got, pending = await pending, None
                if at + got < read_to:  # read ahead while this buffer goes out
                    self._check_direct(at, got, read_to)  # (not the checksum yet)
                    ahead = DIRECT_POOL.take()
                    pending = asyncio.ensure_future(
                        asyncio.to_thread(self._read_direct, ahead, at + got, read_to)
                    )
                view = memoryview(buf)
                lo, hi = max(start - at, 0), min(end - at, got)
                for piece in range(lo, hi, SEND_SIZE):
                    yield view[piece : min(piece + SEND_SIZE, hi)]
                del view
                DIRECT_POOL.give(buf)
                buf, ahead = ahead, None
                if pending is None:
                    self._check_direct(at, got, read_to)
                at += got
        finally:
            # back to the pool also when the consumer stops early (a client that left):
            # else each such read costs the pool its buffers, and the reads after take
            # fresh memory, costly to touch (a buffer a view still sees is not taken)
            reading = None  # the buffer a worker thread may still be reading into
            cancelled = None
            if pending is not None:
                reading = ahead if ahead is not None else buf
                try:
                    await asyncio.shield(pending)  # that read runs to its end anyway
                except asyncio.CancelledError as exc:
                    cancelled = exc  # (ours: the read goes on, into ``reading``)
                except Exception:
                    reading = None  # it ended, failing (the error that stopped us goes on)
                else:
                    reading = None
            for spare in (buf, ahead):
                if spare is not None and spare is not reading:
                    DIRECT_POOL.give(spare)
            if cancelled is not None:
                raise cancelled

    async def _pieces(self) -> AsyncIterator[bytes | memoryview]:
        start, end = self.offset, self.offset + self.length
        pos = 0
        data: bytes | None = self._first
        if not self.prefetched:
            data = await asyncio.to_thread(self._read_and_hash, 0)
        pending: asyncio.Future[bytes] | None = None
        try:
            while data:
                at = pos
                pos += len(data)
                if pos < self.size:  # read ahead while this piece goes out
                    pending = asyncio.ensure_future(asyncio.to_thread(self._read_and_hash, pos))
                lo, hi = max(start - at, 0), min(end - at, len(data))
                view = memoryview(data)
                for piece in range(lo, hi, SEND_SIZE):
                    yield view[piece : min(piece + SEND_SIZE, hi)]
                data = None
                if pending is not None:
                    data, pending = await pending, None
        finally:
            if pending is not None:
                pending.cancel()
                with suppress(asyncio.CancelledError, OSError):
                    await pending
        if pos != self.size or self._hasher.digest() != self.checksum:
            raise ChunkCorrupt(f"chunk {self.chunk_id} failed its checksum")
