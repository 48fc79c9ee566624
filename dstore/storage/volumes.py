"""Small chunks in append-only volume files: the needle design of Facebook's Haystack and
SeaweedFS, with group commit.

A chunk in its own file costs a file creation, an fsync of the file and an fsync of its
folder: on our VMs ~0.8 ms of kernel time per chunk, whatever its size. Here small chunks
are appended as records to the active volume, and every write waiting at that moment goes
to disk with one ``pwritev`` and one ``fdatasync`` (group commit): a batch of 16 records
costs about what one record costs. Nothing is acknowledged before its batch is durable.

Layout under the data dir::

    volumes/00000001.vol   records, appended; a new volume once one reaches its size
    volumes/00000001.idx   a sealed volume's record headers, for a fast start-up

Record: a 40-byte header (magic ``DSVR``, kind, id length, flags, length, xxh3-128
checksum of the data, write time in µs), the chunk id, a CRC-32 of header and id, then the
data. A put record holds a chunk; a delete record (a tombstone, no data) ends an earlier
put when the volumes are replayed at start-up. The index (id → location) lives in memory
and is rebuilt at start by replaying the record headers of every volume in order. Once a
volume is sealed (a newer one started) it never changes until it is removed, so its
headers are also written to an index file beside it: at start a sealed volume's index file
is read instead of its headers scattered through the data (a small chunk's header is a
60-byte read out of every few KiB). An index file is a cache, checked whole (xxh3) and
against its volume's number and size; if it is missing or does not match, the volume is
scanned and the index file written again.

A crash can leave a torn batch at the end of the newest volume, never acknowledged: the
records of the last ``TAIL_CHECK`` bytes are verified at start and the volume is cut before
the first bad one. Elsewhere a record's data is checked on every read and by the scrubber.

Deleted records are garbage until their volume is compacted: once a sealed volume is at
least ``COMPACT_RATIO`` garbage, its live records are copied to the active volume (under
their id locks, so a racing delete or put is never undone) and the file is removed. Before
that, the whole blocks of a dead record's data in a sealed volume are given back to the
file system at once (``fallocate`` punching a hole; headers stay, so replay is unchanged):
on a full disk a delete frees room right away, and compaction then has room to copy into.
The active volume is sealed early (an empty new one takes the appends) once half of it
and at least ``SEAL_GARBAGE`` is garbage: a disk full of small files, most of them deleted,
is not left waiting for the volume to fill up.
"""

from __future__ import annotations

import asyncio
import os
import struct
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import structlog
from sortedcontainers import SortedDict  # type: ignore[import-untyped]

from dstore.chunk import CHECKSUM_SIZE
from dstore.chunk import checksum as digest
from dstore.histogram import Histogram
from dstore.storage import disk
from dstore.threads import WorkerThread

log = structlog.get_logger("dstore.volumes")

RECORD = struct.Struct(">4sBBHQ16sQ")  # magic, kind, id length, flags, length, checksum, µs
MAGIC = b"DSVR"
CRC = struct.Struct(">I")
PUT, DELETE = 1, 2
SMALL_MAX = 256 << 10  # chunks up to this size go to volumes
VOLUME_SIZE = 64 << 20  # a new volume is started past this size
BATCH_BYTES = 8 << 20  # at most this much data per group commit
BATCH_PIECES = disk.IOV_MAX  # and at most this many buffers
TAIL_CHECK = 2 * BATCH_BYTES  # bytes at the end of the newest volume verified at start
COMPACT_RATIO = 0.5  # a sealed volume this much garbage is compacted
COMPACT_GROUP = 256  # records moved per group commit while compacting
SEAL_GARBAGE = 1 << 20  # the active volume is sealed early once this much and half is garbage
NO_CHECKSUM = bytes(CHECKSUM_SIZE)  # (tombstones)
INDEX_HEAD = struct.Struct(">4sHHQQQ")  # magic, version, flags, volume number, size, records
INDEX_ENTRY = struct.Struct(">BBQQ16sQQ")  # kind, id length, offset, length, checksum, µs, size
INDEX_MAGIC = b"DSVI"
INDEX_VERSION = 1

Record = tuple[int, int, str, int, bytes, int, int]


class Needle(NamedTuple):
    """Where a chunk's data is: volume number, data offset, length, checksum, write time,
    and the size of its whole record (for garbage accounting)."""

    volume: int
    offset: int
    length: int
    checksum: bytes
    mtime: float
    record: int

    def pack(self) -> bytes:
        return _PACKED.pack(*self)

    @classmethod
    def unpack(cls, packed: bytes) -> Needle:
        return cls._make(_PACKED.unpack(packed))


# needles are kept packed in the index: ~75 bytes each instead of ~250 as a tuple of
# Python objects (the index holds one per small chunk)
_PACKED = struct.Struct("=IQI16sdI")


@dataclass(slots=True)
class _Volume:
    number: int
    path: Path
    size: int = 0  # bytes written (and durable, once the batch writing them returns)
    garbage: int = 0  # bytes of dead records
    # data spans of dead records whose blocks are still taken: punched once sealed
    holes: list[tuple[int, int]] = field(default_factory=list)


@dataclass(slots=True)
class _Append:
    chunk_id: str
    kind: int
    length: int
    checksum: bytes
    mtime_us: int
    pieces: Sequence[bytes | memoryview]
    done: asyncio.Future[Needle | None] = field(repr=False)

    @property
    def size(self) -> int:
        return RECORD.size + len(self.chunk_id) + CRC.size + self.length


def record_head(kind: int, chunk_id: str, length: int, checksum: bytes, mtime_us: int) -> bytes:
    head = RECORD.pack(MAGIC, kind, len(chunk_id), 0, length, checksum, mtime_us)
    head += chunk_id.encode("ascii")
    return head + CRC.pack(zlib.crc32(head))


def volume_path(folder: Path, number: int) -> Path:
    return folder / f"{number:08d}.vol"


def index_path(folder: Path, number: int) -> Path:
    return folder / f"{number:08d}.idx"


def volume_numbers(folder: Path) -> list[int]:
    numbers = []
    for entry in os.scandir(folder):
        stem, _, suffix = entry.name.partition(".")
        if suffix == "vol" and stem.isdigit():
            numbers.append(int(stem))
    return sorted(numbers)


def read_records(path: Path) -> Iterator[Record]:
    """(kind, data offset, chunk id, length, checksum, µs, record size) of each well-formed
    record, in order, stopping at the first torn or damaged one (whose start is then the
    end of the last record yielded)."""
    with open(path, "rb") as f:
        pos = 0
        end = os.fstat(f.fileno()).st_size
        while pos + RECORD.size <= end:
            raw = f.read(RECORD.size)
            magic, kind, id_len, _flags, length, checksum, mtime_us = RECORD.unpack(raw)
            if magic != MAGIC or kind not in (PUT, DELETE) or not 16 <= id_len <= 128:
                return
            rest = f.read(id_len + CRC.size)
            if len(rest) != id_len + CRC.size:
                return
            (crc,) = CRC.unpack(rest[id_len:])
            if crc != zlib.crc32(raw + rest[:id_len]):
                return
            data_at = pos + RECORD.size + id_len + CRC.size
            if kind == DELETE:
                length = 0
            if data_at + length > end:
                return
            chunk_id = rest[:id_len].decode("ascii")
            yield kind, data_at, chunk_id, length, checksum, mtime_us, data_at + length - pos
            pos = data_at + length
            f.seek(pos)


def write_index(volume: Path, number: int) -> None:
    """Write a sealed volume's index file (beside it) from its records; none if the volume
    does not scan clean to its end. Blocking."""
    size = os.path.getsize(volume)
    parts = []
    end = 0
    for kind, at, chunk_id, length, checksum, mtime_us, record in read_records(volume):
        raw_id = chunk_id.encode("ascii")
        parts.append(INDEX_ENTRY.pack(kind, len(raw_id), at, length, checksum, mtime_us, record))
        parts.append(raw_id)
        end = at + length
    if end != size:
        return
    head = INDEX_HEAD.pack(INDEX_MAGIC, INDEX_VERSION, 0, number, size, len(parts) // 2)
    body = head + b"".join(parts)
    index = volume.with_suffix(".idx")
    tmp = volume.with_suffix(".idx.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        disk.write_all(fd, [body, digest(body)])
        os.fdatasync(fd)  # (no folder fsync: an index file lost to a power cut is rebuilt)
    finally:
        os.close(fd)
    os.rename(tmp, index)


def read_index(index: Path, number: int, volume_size: int) -> list[Record] | None:
    """A volume's records from its index file; None if there is none, or it is damaged or
    was written for another volume or another volume size."""
    try:
        raw = index.read_bytes()
    except FileNotFoundError:
        return None
    body = memoryview(raw)[:-CHECKSUM_SIZE]
    if len(raw) < INDEX_HEAD.size + CHECKSUM_SIZE or digest(body) != raw[-CHECKSUM_SIZE:]:
        return None
    magic, version, _flags, of, size, count = INDEX_HEAD.unpack_from(raw)
    if (magic, version, of, size) != (INDEX_MAGIC, INDEX_VERSION, number, volume_size):
        return None
    records: list[Record] = []
    pos = INDEX_HEAD.size
    unpack = INDEX_ENTRY.unpack_from
    try:
        for _ in range(count):
            kind, id_len, at, length, checksum, mtime_us, record = unpack(raw, pos)
            pos += INDEX_ENTRY.size
            chunk_id = raw[pos : pos + id_len].decode("ascii")
            pos += id_len
            records.append((kind, at, chunk_id, length, checksum, mtime_us, record))
    except (struct.error, UnicodeDecodeError):
        return None
    return records if pos == len(body) else None


def live_needles(folder: Path) -> dict[str, tuple[Path, int, int]]:
    """Chunk id → (volume path, data offset, length) of every live small chunk, read from
    the files alone (for tools and tests; the store keeps its own index)."""
    live: dict[str, tuple[Path, int, int]] = {}
    if not folder.is_dir():
        return live
    for number in volume_numbers(folder):
        path = volume_path(folder, number)
        for kind, at, chunk_id, length, _c, _t, _r in read_records(path):
            if kind == PUT:
                live[chunk_id] = (path, at, length)
            else:
                live.pop(chunk_id, None)
    return live


def _punch_holes(path: Path, spans: list[tuple[int, int]]) -> int:
    """Punch the whole blocks of each data span out of a volume file; the bytes freed."""
    fd = os.open(path, os.O_WRONLY)
    try:
        return sum(disk.punch_hole(fd, at, length) for at, length in spans)
    finally:
        os.close(fd)


def _create_volume(folder: Path, path: Path, number: int) -> None:
    """An empty volume file, durable in its folder (no index file may describe it yet)."""
    with suppress(FileNotFoundError):
        os.unlink(index_path(folder, number))
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    disk.fsync_dir(folder)


class Volumes:
    """The small chunks of one store. Index changes happen on the event loop only, once
    the records behind them are durable."""

    def __init__(
        self,
        folder: Path,
        locked: Callable[[str], AbstractAsyncContextManager[None]],
        *,
        volume_size: int = VOLUME_SIZE,
        fsyncs: Histogram | None = None,
    ) -> None:
        self.folder = folder
        self.volume_size = volume_size
        self.fsyncs = fsyncs if fsyncs is not None else Histogram()  # (group commits')
        self._locked = locked
        self.index: SortedDict = SortedDict()  # chunk id -> packed Needle
        self.live_bytes = 0
        self.batches = 0  # group commits done (a put costs 1/n of one)
        self.compactions = 0
        self.from_index = 0  # volumes replayed from their index files at start
        self._indexing: dict[int, asyncio.Task[None]] = {}
        self._volumes: dict[int, _Volume] = {}
        self._active: _Volume | None = None
        self._queue: deque[_Append] = deque()
        self._writer: asyncio.Task[None] | None = None
        self._disk = WorkerThread("dstore-volume-disk")  # group commits, in order
        self._writing: dict[str, asyncio.Future[Needle | None]] = {}
        self._compactor: asyncio.Task[int] | None = None
        self._compacting = asyncio.Lock()
        self._puncher: asyncio.Task[None] | None = None
        self._started = False
        self.punched = 0  # bytes of dead records given back to the file system

    def __repr__(self) -> str:
        return f"<Volumes {self.folder} {len(self._volumes)} volumes, {len(self.index)} chunks>"

    # --- start-up -------------------------------------------------------------------------

    def open_sync(self) -> None:
        """Replay every volume in order (blocking: run in a worker thread before serving)."""
        if not self.folder.is_dir():
            self.folder.mkdir(parents=True)
            disk.fsync_dir(self.folder.parent)  # the folder itself outlives a power cut
        started = time.monotonic()
        numbers = volume_numbers(self.folder)
        self._remove_stray_indexes(numbers)
        # replayed into a plain dict, sorted once at the end: inserting into the sorted
        # index record by record cost twice as much as reading the records
        self.index = dict(self.index)
        for number in numbers:
            volume = self._volumes[number] = _Volume(number, volume_path(self.folder, number))
            on_disk = os.path.getsize(volume.path)
            newest = number == numbers[-1]
            records = (
                None if newest else read_index(index_path(self.folder, number), number, on_disk)
            )
            if records is not None:
                self.from_index += 1
            end = 0
            for kind, at, chunk_id, length, checksum, mtime_us, size in (
                read_records(volume.path) if records is None else records
            ):
                if newest and kind == PUT and at + length > on_disk - TAIL_CHECK:
                    if not _data_ok(volume.path, at, length, checksum):
                        break  # a torn batch: nothing from here on was acknowledged
                end = at + length
                if kind == PUT:
                    needle = Needle(number, at, length, checksum, mtime_us / 1e6, size)
                    self._index_put(chunk_id, needle)
                else:
                    self._index_delete(chunk_id)
                    volume.garbage += size
            volume.size = end
            if end < on_disk:
                if newest:
                    log.warning("volume_tail_cut", volume=str(volume.path), at=end, size=on_disk)
                    with open(volume.path, "r+b") as f:
                        f.truncate(end)
                        os.fsync(f.fileno())
                else:
                    log.error("volume_damaged", volume=str(volume.path), at=end, size=on_disk)
                    volume.garbage += on_disk - end
            elif records is None and not newest:
                # (a second, warm read of the headers; once per volume, not per start)
                try:
                    write_index(volume.path, number)
                except OSError as exc:  # (a full disk, say): only the next start is slower
                    log.warning("volume_index_failed", volume=number, error=str(exc))
        self.index = SortedDict(self.index)
        if numbers:
            self._active = self._volumes[numbers[-1]]
        log.info(
            "volumes_replayed",
            volumes=len(numbers),
            from_index_files=self.from_index,
            chunks=len(self.index),
            seconds=round(time.monotonic() - started, 3),
        )

    def _remove_stray_indexes(self, numbers: list[int]) -> None:
        """Index files of no sealed volume: of a volume compacted away, of the newest
        volume (its number may have been used before), half-written ones."""
        sealed = {index_path(self.folder, n).name for n in numbers[:-1]}
        for entry in os.scandir(self.folder):
            if entry.name.endswith((".idx", ".idx.tmp")) and entry.name not in sealed:
                with suppress(FileNotFoundError):
                    os.unlink(entry.path)

    def start(self) -> None:
        """On the event loop, after ``open_sync``: give back the blocks of the dead records
        start-up found, and compact what is mostly garbage."""
        self._started = True
        self._punch_soon()
        self._maybe_compact()

    def _index_put(self, chunk_id: str, needle: Needle) -> None:
        old = self.get(chunk_id)
        if old is not None:
            self._drop(old)
        self.index[chunk_id] = needle.pack()
        self.live_bytes += needle.length

    def _index_delete(self, chunk_id: str) -> Needle | None:
        packed = self.index.pop(chunk_id, None)
        if packed is None:
            return None
        old = Needle.unpack(packed)
        self._drop(old)
        return old

    def _drop(self, needle: Needle) -> None:
        self.live_bytes -= needle.length
        volume = self._volumes.get(needle.volume)
        if volume is not None:
            volume.garbage += needle.record
            volume.holes.append((needle.offset, needle.length))
            if volume is not self._active:
                self._punch_soon()

    # --- giving dead records' blocks back -------------------------------------------------

    def _punch_soon(self) -> None:
        """Punch the dead records' data out of the sealed volumes, in the background: on a
        full disk, deleting files must free room at once, before any compaction (which
        needs room to copy into). Only sealed volumes: the newest one's tail is checked
        record by record at start, and a punched record there would read as torn. A dead
        record's data is read by no one (a read racing its delete fails its checksum)."""
        if self._started and (self._puncher is None or self._puncher.done()):
            self._puncher = asyncio.create_task(self._punch(), name="dstore-volume-punch")

    async def _punch(self) -> None:
        while True:
            work = [v for v in self._volumes.values() if v.holes and v is not self._active]
            if not work:
                return
            for volume in work:
                holes, volume.holes = volume.holes, []
                try:
                    self.punched += await self._disk.run(_punch_holes, volume.path, holes)
                except FileNotFoundError:
                    pass  # compacted away meanwhile
                except OSError as exc:  # only room that stays taken until compaction
                    log.warning("volume_punch_failed", volume=volume.number, error=str(exc))

    async def _maybe_seal(self) -> None:
        """Seal the active volume early once it is mostly garbage (a disk full of small
        files, most of them deleted): a new, empty volume takes the appends, and the old
        one is then punched and compacted like any sealed one."""
        volume = self._active
        if volume is None or volume.garbage < max(SEAL_GARBAGE, COMPACT_RATIO * volume.size):
            return
        number = max(self._volumes) + 1
        path = self.path(number)
        try:
            await self._disk.run(_create_volume, self.folder, path, number)
        except OSError as exc:
            log.warning("volume_seal_failed", volume=volume.number, error=str(exc))
            return
        self._volumes[number] = self._active = _Volume(number, path)
        self._index_sealed(volume)
        self._punch_soon()

    # --- reads ----------------------------------------------------------------------------

    def usage(self) -> tuple[int, int, int]:
        """(volume files, their bytes, bytes of garbage in them)."""
        volumes = list(self._volumes.values())
        return len(volumes), sum(v.size for v in volumes), sum(v.garbage for v in volumes)

    def get(self, chunk_id: str) -> Needle | None:
        packed = self.index.get(chunk_id)
        return None if packed is None else Needle.unpack(packed)

    def path(self, number: int) -> Path:
        return volume_path(self.folder, number)

    def ids_after(self, after: str, limit: int) -> list[tuple[str, Needle]]:
        keys = self.index.irange(minimum=after, inclusive=(False, True))
        out = []
        for key in keys:
            out.append((key, Needle.unpack(self.index[key])))
            if len(out) >= limit:
                break
        return out

    # --- writes ---------------------------------------------------------------------------

    async def put(
        self,
        chunk_id: str,
        length: int,
        checksum: bytes,
        pieces: Sequence[bytes | memoryview],
    ) -> Needle:
        """Append a chunk; returns once it is durable and indexed. The caller holds the
        id's lock and has checked that it is not stored yet."""
        mtime_us = int(time.time() * 1e6)
        needle = await self._append(chunk_id, PUT, length, checksum, mtime_us, pieces)
        assert needle is not None
        return needle

    async def delete(self, chunk_id: str) -> Needle | None:
        """Append a tombstone for a stored chunk; its needle, or None if it was not here.
        The caller holds the id's lock."""
        writing = self._writing.get(chunk_id)
        if writing is not None:  # a put whose caller went away: let it land, then delete
            with suppress(Exception):
                await asyncio.shield(writing)
        if chunk_id not in self.index:
            return None
        return await self._append(chunk_id, DELETE, 0, NO_CHECKSUM, 0, ())

    async def _append(
        self,
        chunk_id: str,
        kind: int,
        length: int,
        checksum: bytes,
        mtime_us: int,
        pieces: Sequence[bytes | memoryview],
    ) -> Needle | None:
        done: asyncio.Future[Needle | None] = asyncio.get_running_loop().create_future()
        self._queue.append(_Append(chunk_id, kind, length, checksum, mtime_us, pieces, done))
        if kind == PUT:
            self._writing[chunk_id] = done
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_loop(), name="dstore-volume-writer")
        # the record's fate does not depend on its caller staying: the index follows the
        # disk either way
        return await asyncio.shield(done)

    async def _write_loop(self) -> None:
        while self._queue:
            previous = self._active
            batch, volume, start, new = self._next_batch()
            pieces: list[bytes | memoryview] = []
            for item in batch:
                pieces.append(
                    record_head(item.kind, item.chunk_id, item.length, item.checksum, item.mtime_us)
                )
                pieces.extend(item.pieces)
            try:
                await self._disk.run(self._write_batch, volume, start, pieces, new)
            except BaseException as exc:
                if new:
                    self._volumes.pop(volume.number, None)
                    self._active = self._volumes.get(max(self._volumes, default=-1))
                else:
                    volume.size = start  # the next batch writes over the failed one
                for item in batch:
                    self._settle(item, exc)
                if not isinstance(exc, Exception):
                    raise
                continue
            self.batches += 1
            if new and previous is not None:
                self._index_sealed(previous)
            at = start
            for item in batch:
                head = item.size - item.length
                needle = Needle(
                    volume.number,
                    at + head,
                    item.length,
                    item.checksum,
                    item.mtime_us / 1e6,
                    item.size,
                )
                at += item.size
                if item.kind == PUT:
                    self._index_put(item.chunk_id, needle)
                    self._settle(item, needle)
                else:
                    volume.garbage += item.size
                    self._settle(item, self._index_delete(item.chunk_id))
            await self._maybe_seal()
            self._maybe_compact()

    def _settle(self, item: _Append, outcome: Needle | BaseException | None) -> None:
        if item.kind == PUT and self._writing.get(item.chunk_id) is item.done:
            del self._writing[item.chunk_id]
        if item.done.done():
            return
        if isinstance(outcome, BaseException):
            item.done.set_exception(outcome)
            item.done.exception()  # a caller that went away must not leave it unretrieved
        else:
            item.done.set_result(outcome)

    def _next_batch(self) -> tuple[list[_Append], _Volume, int, bool]:
        """Take the records that fit one group commit into one volume, and say where."""
        volume, new = self._active, False
        first = self._queue[0].size
        if volume is None or (volume.size and volume.size + first > self.volume_size):
            number = max(self._volumes, default=0) + 1
            volume = self._volumes[number] = _Volume(number, self.path(number))
            self._active, new = volume, True
        start = volume.size
        taken = 0
        pieces = 0
        batch: list[_Append] = []
        while self._queue:
            item = self._queue[0]
            if batch and (
                taken + item.size > BATCH_BYTES
                or pieces + 1 + len(item.pieces) > BATCH_PIECES
                or volume.size + item.size > self.volume_size
            ):
                break
            batch.append(self._queue.popleft())
            taken += item.size
            pieces += 1 + len(item.pieces)
            volume.size += item.size
        return batch, volume, start, new

    def _write_batch(
        self, volume: _Volume, start: int, pieces: list[bytes | memoryview], new: bool
    ) -> None:
        flags = os.O_WRONLY | (os.O_CREAT | os.O_EXCL if new else 0)
        if new:  # an index file never outlives the volume it describes; be sure of it
            with suppress(FileNotFoundError):
                os.unlink(index_path(self.folder, volume.number))
        fd = os.open(volume.path, flags, 0o644)
        try:
            try:
                disk.write_all(fd, pieces, start)
                started = time.monotonic()
                os.fdatasync(fd)
                self.fsyncs.observe(time.monotonic() - started)
            except BaseException:
                with suppress(OSError):
                    os.ftruncate(fd, start)
                raise
            if new:
                disk.fsync_dir(self.folder)
        except BaseException:
            if new:
                with suppress(OSError):
                    os.unlink(volume.path)
            raise
        finally:
            os.close(fd)

    def _index_sealed(self, volume: _Volume) -> None:
        """Write a just-sealed volume's index file, in the background."""

        async def run() -> None:
            try:
                if self._volumes.get(volume.number) is not volume:
                    return  # compacted away already
                await asyncio.to_thread(write_index, volume.path, volume.number)
            except FileNotFoundError:
                pass  # compacted away meanwhile
            except OSError as exc:  # only start-up is slower without it
                log.warning("volume_index_failed", volume=volume.number, error=str(exc))
            finally:
                self._indexing.pop(volume.number, None)

        self._indexing[volume.number] = asyncio.create_task(run(), name="dstore-volume-index")

    # --- compaction -----------------------------------------------------------------------

    def _maybe_compact(self) -> None:
        if self._compactor is not None and not self._compactor.done():
            return
        if self._worth_compacting():
            self._compactor = asyncio.create_task(self.compact(), name="dstore-compactor")

    def _worth_compacting(self) -> list[int]:
        return [
            v.number
            for v in self._volumes.values()
            if v is not self._active and v.garbage >= COMPACT_RATIO * max(v.size, 1)
        ]

    async def compact(self) -> int:
        """Compact every sealed volume that is mostly garbage; the number compacted."""
        count = 0
        async with self._compacting:  # one at a time: the background task, or a caller
            for number in self._worth_compacting():
                try:
                    await self._compact(self._volumes[number])
                except OSError as exc:
                    log.error("compaction_failed", volume=number, error=str(exc))
                    break
                count += 1
        return count

    async def _compact(self, volume: _Volume) -> None:
        records = await asyncio.to_thread(lambda: list(read_records(volume.path)))
        keep_tombstones = min(self._volumes) < volume.number  # older puts may remain
        moved = 0
        for first in range(0, len(records), COMPACT_GROUP):
            group = records[first : first + COMPACT_GROUP]
            async with AsyncExitStack() as held:
                # nobody else holds two id locks, so taking several cannot deadlock
                for chunk_id in sorted({record[2] for record in group}):
                    await held.enter_async_context(self._locked(chunk_id))
                moves = []
                tombstones = []
                for kind, at, chunk_id, length, checksum, mtime_us, _size in group:
                    current = self.get(chunk_id)
                    if kind == DELETE:
                        # (a put in flight is newer than this tombstone: it must not die)
                        if keep_tombstones and current is None and chunk_id not in self._writing:
                            tombstones.append(chunk_id)
                    elif current is not None and (current.volume, current.offset) == (
                        volume.number,
                        at,
                    ):
                        moves.append((chunk_id, at, length, checksum, mtime_us))
                datas = await asyncio.to_thread(
                    _pread_many, volume.path, [(m[1], m[2]) for m in moves]
                )
                # copied as they are: a corrupt record stays detectably corrupt
                await asyncio.gather(
                    *(
                        self._append(chunk_id, PUT, length, checksum, mtime_us, (data,))
                        for (chunk_id, _at, length, checksum, mtime_us), data in zip(
                            moves, datas, strict=True
                        )
                    ),
                    *(self._append(t, DELETE, 0, NO_CHECKSUM, 0, ()) for t in tombstones),
                )
                moved += len(moves)

        indexing = self._indexing.get(volume.number)
        if indexing is not None:
            await asyncio.shield(indexing)  # no index file written after its volume went

        def remove() -> None:
            with suppress(FileNotFoundError):
                os.unlink(index_path(self.folder, volume.number))
            os.unlink(volume.path)
            disk.fsync_dir(self.folder)

        await asyncio.to_thread(remove)
        self._volumes.pop(volume.number, None)
        self.compactions += 1
        log.info("volume_compacted", volume=volume.number, moved=moved)

    async def close(self) -> None:
        for task in (self._compactor, self._puncher):
            if task is not None:
                task.cancel()
                with suppress(asyncio.CancelledError):
                    await task
        if self._writer is not None:
            with suppress(Exception):
                await self._writer
        for indexing in list(self._indexing.values()):
            await indexing
        await self._disk.stop()


def _pread_many(path: Path, ranges: list[tuple[int, int]]) -> list[bytes]:
    fd = os.open(path, os.O_RDONLY)
    try:
        out = [os.pread(fd, length, at) for at, length in ranges]
    finally:
        os.close(fd)
    for (at, length), data in zip(ranges, out, strict=True):
        if len(data) != length:
            raise OSError(f"{path}: short read at {at}")
    return out


def _data_ok(path: Path, at: int, length: int, checksum: bytes) -> bool:
    try:
        (data,) = _pread_many(path, [(at, length)])
    except OSError:
        return False
    return digest(data) == checksum
