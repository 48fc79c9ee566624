"""The upload pipeline: body pieces in, chunks out to the nodes, one atomic commit.

1. A pending version with a lease (renewed while the upload runs).
2. The body is cut into chunks as it arrives. As a chunk's first byte arrives the upload
   takes a window slot and a grain (64 KiB) of the global memory budget, and the chunk's
   whole share once it holds more than that; so the body is read no faster than chunks
   are stored (backpressure), memory stays bounded, and what a client is charged is
   what it sent, not what it promised.
3. Each chunk: placement reserves space on ``replicas`` nodes, the intent (chunk id →
   nodes) is recorded, then the chunk goes to the nodes in parallel. A node that fails is
   replaced by another while any can take the chunk.
4. Body done and every chunk acknowledged: one transaction makes the version current.
Anything else aborts the version; the reaper then deletes whatever reached the nodes.

A file that ends before it fills a chunk and is at most ``inline_max`` bytes skips all
of that: its bytes go into the metadata store, with the version, in one transaction.

No aiohttp here: the body is any async iterator of byte pieces.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

import structlog

from dstore.chunk import checksum as checksum_of
from dstore.chunk import new_chunk_id
from dstore.errors import ChecksumMismatch, DstoreError, NotEnoughNodes, OutOfSpace, TooLarge
from dstore.gateway.budget import MemoryBudget
from dstore.gateway.cache import ChunkCache, inline_key
from dstore.gateway.chunker import Chunk, Chunker
from dstore.master.cluster import Cluster
from dstore.master.jobs import PeriodicJob
from dstore.master.metadata import ChunkIntent, CommitResult, InlineBody, MetadataStore
from dstore.master.reaper import Reaper
from dstore.master.replicas import Replicas

# the budget a chunk is charged from its first byte until it holds more than this
GRAIN = 64 << 10

log = structlog.get_logger("dstore.upload")


@dataclass(frozen=True, slots=True)
class UploadSettings:
    chunk_size: int
    replicas: int
    window: int
    lease: float
    max_object_size: int | None = None
    inline_max: int = 0  # files up to this size (and one chunk) are kept in the metadata


@dataclass(slots=True)
class Expectations:
    """Whole-body checksums the client asked us to verify (cost: a pass of MD5/SHA-256)."""

    md5: bytes | None = None
    sha256: bytes | None = None

    @classmethod
    def from_headers(cls, content_md5: str | None, sha256_hex: str | None) -> Expectations:
        try:
            md5 = base64.b64decode(content_md5, validate=True) if content_md5 else None
            sha = bytes.fromhex(sha256_hex) if sha256_hex else None
        except ValueError as exc:
            raise DstoreError(
                "malformed Content-MD5 or X-Checksum-Sha256", code="bad_header"
            ) from exc
        if (md5 is not None and len(md5) != 16) or (sha is not None and len(sha) != 32):
            raise DstoreError("malformed Content-MD5 or X-Checksum-Sha256", code="bad_header")
        return cls(md5, sha)


class Md5Chain:
    """The MD5 of a body, a chunk at a time, in order, in a worker thread: it runs while
    the next chunk is read and earlier ones are stored (hashlib lets go of the GIL for
    large buffers), instead of on the event loop. A chunk's pieces are views of the
    bytes received, which nothing changes."""

    def __init__(self) -> None:
        self.hasher = hashlib.md5()
        self._last: asyncio.Future[None] | None = None

    SMALL = 64 << 10  # a chunk this small is hashed at once, on the loop (no thread hop)

    def add(self, pieces: Sequence[memoryview | bytes]) -> asyncio.Future[None] | None:
        """Hash a chunk's pieces after those added before; the hashing, if it was not
        done at once (the chunk's pieces are held until it is: the caller keeps the
        chunk's share of the memory budget until then)."""
        if (self._last is None or self._last.done()) and sum(map(len, pieces)) <= self.SMALL:
            self._update(pieces)
            return None
        self._last = asyncio.ensure_future(self._after(self._last, list(pieces)))
        return self._last

    async def _after(
        self, previous: asyncio.Future[None] | None, pieces: list[memoryview | bytes]
    ) -> None:
        if previous is not None:
            await previous
        await asyncio.to_thread(self._update, pieces)

    def _update(self, pieces: Sequence[memoryview | bytes]) -> None:
        for piece in pieces:
            self.hasher.update(piece)

    async def digest(self) -> bytes:
        if self._last is not None:
            await self._last
        return self.hasher.digest()

    def discard(self) -> None:
        """Give up (the upload failed): nothing left waiting or unretrieved."""
        if self._last is not None:
            self._last.cancel()
            self._last.add_done_callback(lambda f: f.cancelled() or f.exception())


async def _then(first: Awaitable[None], second: asyncio.Future[None]) -> None:
    await first
    await second


def etag_of(checksums: list[bytes]) -> str:
    """A file's ETag: derived from its chunks' xxh3-128 checksums, so it costs nothing
    extra (a whole-file MD5 would halve upload throughput)."""
    return '"' + hashlib.blake2b(b"".join(checksums), digest_size=16).hexdigest() + '"'


class LeaseKeeper(PeriodicJob):
    """One task renews every upload's lease in one transaction, every lease/3."""

    NAME = "lease-keeper"

    def __init__(self, meta: MetadataStore, active: set[int], lease: float) -> None:
        super().__init__(lease / 3, run_at_start=False)
        self.meta = meta
        self.active = active
        self.lease = lease

    async def cycle(self) -> None:
        if self.active:
            await self.meta.renew_leases(sorted(self.active), self.lease)


@dataclass(slots=True)
class _Upload:
    name: str
    content_type: str
    version_id: int | None = None  # set once the version is begun
    inline: InlineBody | None = None  # set instead for a small file kept inline
    may_inline: bool = True  # (not a multipart upload's part: its chunks are moved later)


class Uploader:
    def __init__(
        self,
        meta: MetadataStore,
        door: Replicas,
        budget: MemoryBudget,
        reaper: Reaper,
        settings: UploadSettings,
        cache: ChunkCache | None = None,
    ) -> None:
        self.meta = meta
        self.door = door
        self.cluster = door.cluster
        self.budget = budget
        self.reaper = reaper
        self.settings = settings
        # the read cache: offered each small chunk once it is stored (size 0: keeps none)
        self.cache = cache if cache is not None else ChunkCache(0)
        self.active: set[int] = set()  # versions being uploaded, whose leases we renew
        self.stored_inline = 0  # files committed, kept in the metadata store
        self.stored_chunked = 0  # files committed, in chunks on the nodes
        self.lease_keeper = LeaseKeeper(meta, self.active, settings.lease)

    def __repr__(self) -> str:
        return f"<Uploader chunk={self.settings.chunk_size} replicas={self.settings.replicas}>"

    async def upload(
        self,
        name: str,
        body: AsyncIterator[bytes],
        *,
        content_type: str = "application/octet-stream",
        if_absent: bool = False,
        if_match: Sequence[str] | None = None,
        expect: Expectations | None = None,
        trace: str = "",
        length: int | None = None,
        md5_etag: bool = False,
    ) -> CommitResult:
        """Store ``body`` as the new version of ``name``. ``length``: the body's size if
        the client declared it (a small body then takes only its size of the memory
        budget while it is read, not a whole chunk's). ``md5_etag``: the ETag is the MD5
        of the bytes, as S3 clients expect (else it comes from the chunks' checksums, at
        no cost)."""
        if self.cluster.up_count() < self.settings.replicas:
            raise NotEnoughNodes(
                f"{self.cluster.up_count()} storage nodes up, {self.settings.replicas} needed"
            )
        # the version is begun with its first chunk's intent, once that chunk is cut
        upload = _Upload(name, content_type)
        started = time.monotonic()
        try:
            size, checksums, md5 = await self._store_body(
                upload, body, expect or Expectations(), trace, length, md5_etag
            )
            etag = f'"{md5.hex()}"' if md5 is not None and md5_etag else etag_of(checksums)
            if upload.inline is not None:
                result = await self.meta.commit_inline(
                    name, content_type, upload.inline, etag, if_absent=if_absent, if_match=if_match
                )
                if upload.inline.data:
                    self.cache.offer(inline_key(result.version.version_id), [upload.inline.data])
                self.stored_inline += 1
            else:
                assert upload.version_id is not None
                result = await self.meta.commit(
                    upload.version_id, size, etag, if_absent=if_absent, if_match=if_match
                )
                self.stored_chunked += 1
        except BaseException as exc:
            # shielded: a cancelled request must still give up its version
            await asyncio.shield(self._abort(upload.version_id, name, exc, started))
            raise
        finally:
            if upload.version_id is not None:
                self.active.discard(upload.version_id)
        if result.replaced is not None:
            self.reaper.wake()
        return result

    async def upload_part(
        self,
        name: str,
        body: AsyncIterator[bytes],
        seal: Callable[[int, int, str], Awaitable[None]],
        *,
        expect: Expectations | None = None,
        trace: str = "",
        length: int | None = None,
    ) -> tuple[int, str]:
        """Store ``body`` in chunks as a pending version of ``name`` and hand it to
        ``seal(version id, size, ETag)`` instead of committing it: an S3 multipart
        upload's part, whose chunks become the object's when the upload completes. The
        ETag is the MD5 of the bytes. (size, ETag); the version is given up if ``seal``
        fails."""
        if self.cluster.up_count() < self.settings.replicas:
            raise NotEnoughNodes(
                f"{self.cluster.up_count()} storage nodes up, {self.settings.replicas} needed"
            )
        upload = _Upload(name, "", may_inline=False)
        started = time.monotonic()
        try:
            size, _, md5 = await self._store_body(
                upload, body, expect or Expectations(), trace, length, md5_etag=True
            )
            if upload.version_id is None:  # an empty part: a version with no chunk
                upload.version_id = await self.meta.begin_upload(name, "", self.settings.lease)
            assert md5 is not None
            etag = f'"{md5.hex()}"'
            # no more renewals from here: its lease becomes the upload's
            self.active.discard(upload.version_id)
            await seal(upload.version_id, size, etag)
        except BaseException as exc:
            await asyncio.shield(self._abort(upload.version_id, name, exc, started))
            raise
        finally:
            if upload.version_id is not None:
                self.active.discard(upload.version_id)
        return size, etag

    async def _begin(self, upload: _Upload, first: Chunk, held: _Held) -> ChunkIntent:
        """Begin the version, with the intent for its first chunk (placed here; its
        reservations go in ``held``)."""
        intent = self._place(first, held)
        upload.version_id = await self.meta.begin_upload(
            upload.name, upload.content_type, self.settings.lease, first=intent
        )
        self.active.add(upload.version_id)
        return intent

    def _place(self, chunk: Chunk, held: _Held) -> ChunkIntent:
        """A fresh id and ``replicas`` nodes for a chunk, its space reserved on them."""
        intent = ChunkIntent(
            chunk.index,
            new_chunk_id(),
            chunk.size,
            chunk.checksum,
            self.cluster.place(chunk.size, self.settings.replicas),
            chunk.offset,
        )
        held.add(intent.chunk_id, intent.nodes, chunk.size)
        return intent

    async def _abort(
        self, version_id: int | None, name: str, why: BaseException, started: float
    ) -> None:
        """Give the version up (if it was begun); one log line says what happened."""
        try:
            if version_id is not None:
                await self.meta.abort(version_id)
        finally:
            code = why.code if isinstance(why, DstoreError) else type(why).__name__
            log.info(
                "upload_aborted",
                name=name,
                version=version_id,
                reason=code,
                error=str(why),
                seconds=round(time.monotonic() - started, 3),
            )
            self.reaper.wake()

    async def _store_body(
        self,
        upload: _Upload,
        body: AsyncIterator[bytes],
        expect: Expectations,
        trace: str,
        length: int | None,
        md5_etag: bool = False,
    ) -> tuple[int, list[bytes], bytes | None]:
        """(size, the chunks' checksums, the MD5 of the bytes if it was asked for or
        ``expect`` needs it)."""
        settings = self.settings
        # each chunk's share of the memory budget, taken before its first byte is read:
        # a whole chunk's, but for a first chunk the declared length says is smaller
        first = settings.chunk_size if length is None else min(settings.chunk_size, length)
        first = max(first, 1)

        def share(index: int) -> int:
            return first if index == 0 else settings.chunk_size

        chunker = Chunker(settings.chunk_size)
        md5 = Md5Chain() if expect.md5 is not None or md5_etag else None
        sha = hashlib.sha256() if expect.sha256 is not None else None
        window = asyncio.Semaphore(settings.window)
        checksums: dict[int, bytes] = {}
        held = _Held(self.cluster)
        holding = 0  # the budget of the slot taken for the chunk being filled, if any
        try:
            async with asyncio.TaskGroup() as group:

                async def hand_on(chunk: Chunk, *, here: bool = False) -> None:
                    nonlocal holding
                    slot = holding  # the chunk's share goes with it
                    intent = None
                    if upload.version_id is None:
                        intent = await self._begin(upload, chunk, held)
                    assert upload.version_id is not None
                    checksums[chunk.index] = chunk.checksum
                    hashed = md5.add(chunk.pieces) if md5 is not None else None
                    replicate = self._replicate(upload.version_id, chunk, trace, held, intent)
                    if hashed is not None:  # (its bytes held, and charged, until hashed)
                        replicate = _then(replicate, hashed)
                    if here:
                        holding = 0
                        try:
                            await replicate
                        finally:
                            self._give_slot(window, slot, chunk)
                        return
                    task = group.create_task(replicate)
                    # a done callback runs even if the task is cancelled before it starts
                    task.add_done_callback(lambda _: self._give_slot(window, slot, chunk))
                    holding = 0

                async def hold(index: int, buffered: int) -> None:
                    """Charge the chunk being filled for what it holds: a chunk's slot is
                    taken when its first byte has come, not before (a body that never
                    sends one holds nothing), as a ``GRAIN`` of the budget; past a grain
                    its whole share, at once. So a client that sends a byte and stalls
                    holds a grain until the body timeout, and a chunk once charged whole
                    never waits for memory again (grains cannot starve each other)."""
                    nonlocal holding
                    need = share(index) if buffered > GRAIN else min(GRAIN, share(index))
                    if not holding:
                        await self._take_slot(window, need)
                        holding = need
                    elif holding < need:
                        await self.budget.acquire(need - holding)
                        holding = need

                async for piece in body:
                    if not piece:
                        continue
                    if settings.max_object_size is not None and (
                        chunker.total + len(piece) > settings.max_object_size
                    ):
                        raise TooLarge(f"file exceeds {settings.max_object_size} bytes")
                    if sha is not None:
                        sha.update(piece)
                    for chunk in chunker.feed(piece):
                        await hold(chunk.index, chunk.size)
                        await hand_on(chunk)  # its slot goes with it
                    # the next chunk has begun (and is charged, unless it was whole already)
                    if chunker.pending and holding < settings.chunk_size:
                        await hold(chunker.total // settings.chunk_size, chunker.pending)
                last = chunker.finish()
                if (
                    upload.version_id is None
                    and upload.may_inline
                    and chunker.total <= settings.inline_max
                ):
                    # the whole file, and small: kept inline, with its version
                    if last is None:  # empty
                        upload.inline = InlineBody(b"", checksum_of(b""))
                    else:
                        upload.inline = InlineBody(b"".join(last.pieces), last.checksum)
                        checksums[0] = last.checksum
                        if md5 is not None:
                            md5.add(last.pieces)
                elif last is not None:
                    await hold(last.index, last.size)
                    # the only chunk (most small files) is stored right here, no task
                    await hand_on(last, here=upload.version_id is None)
        except BaseExceptionGroup as group_error:
            if md5 is not None:
                md5.discard()
            raise _first_error(group_error) from None
        except BaseException:
            if md5 is not None:
                md5.discard()
            raise
        finally:
            if holding:
                self._give_slot(window, holding)
            # every task is done: what no put took over (one cancelled before its first
            # step, an intent never recorded) is given back here
            held.release_all()
        digest = None if md5 is None else await md5.digest()
        if expect.md5 is not None and digest != expect.md5:
            raise ChecksumMismatch("body does not match Content-MD5")
        if sha is not None and sha.digest() != expect.sha256:
            raise ChecksumMismatch("body does not match X-Checksum-Sha256")
        return chunker.total, [checksums[i] for i in range(len(checksums))], digest

    async def _take_slot(self, window: asyncio.Semaphore, share: int) -> None:
        await window.acquire()
        try:
            await self.budget.acquire(share)
        except BaseException:
            window.release()
            raise

    def _give_slot(self, window: asyncio.Semaphore, share: int, chunk: Chunk | None = None) -> None:
        if chunk is not None:
            chunk.pieces.clear()  # the bytes go now, not when the task object does
        self.budget.release(share)
        window.release()

    async def _replicate(
        self,
        version_id: int,
        chunk: Chunk,
        trace: str,
        held: _Held,
        intent: ChunkIntent | None = None,
    ) -> None:
        """Put one chunk on ``replicas`` nodes, replacing nodes that fail. ``intent``: the
        chunk's id and nodes, already placed and recorded (the first chunk's). Every
        reservation made goes in ``held`` until a put takes it over."""
        cluster, meta, wanted = self.cluster, self.meta, self.settings.replicas
        if intent is None:
            intent = self._place(chunk, held)
            await meta.add_chunk(version_id, intent)
        chunk_id, targets = intent.chunk_id, list(intent.nodes)
        stored: list[str] = []
        tried: set[str] = set(targets)
        while True:
            results = await asyncio.gather(
                *(self._put_one(node_id, chunk_id, chunk, trace, held) for node_id in targets),
                return_exceptions=True,
            )
            failed = []
            for node_id, result in zip(targets, results, strict=True):
                if isinstance(result, BaseException):
                    if not isinstance(result, DstoreError):
                        raise result
                    failed.append((node_id, result))
                else:
                    stored.append(node_id)
            if not failed:
                self.cache.offer(chunk_id, chunk.pieces)
                return
            for node_id, error in failed:
                log.warning(
                    "chunk_put_failed",
                    chunk=chunk_id,
                    node=node_id,
                    error=str(error),
                    code=error.code,
                )
                await meta.forget_replica(chunk_id, node_id)
            try:
                targets = cluster.place(chunk.size, wanted - len(stored), exclude=tried)
            except (NotEnoughNodes, OutOfSpace) as exc:
                # no node left to take it. If every node that failed was full, the cluster
                # is out of space (507); otherwise nodes are missing (503)
                full = all(isinstance(e, OutOfSpace) for _, e in failed)
                cls = OutOfSpace if full else type(exc)
                raise cls(
                    f"chunk {chunk.index} could not be stored on {wanted} nodes: {exc}"
                ) from failed[0][1]
            held.add(chunk_id, targets, chunk.size)
            tried.update(targets)
            await meta.add_replicas(chunk_id, targets)

    async def _put_one(
        self, node_id: str, chunk_id: str, chunk: Chunk, trace: str, held: _Held
    ) -> None:
        held.take(chunk_id, node_id)  # store_chunk gives the reservation back from here on
        await self.door.put(
            node_id, chunk_id, chunk.pieces, length=chunk.size, checksum=chunk.checksum, trace=trace
        )


class _Held:
    """The node reservations an upload made that no put has taken over yet.

    A put's own clean-up gives its reservation back, but a put task cancelled before
    its first step never runs that clean-up (nor does a chunk whose intent was never
    recorded), so what is still here when the upload's tasks are done goes back then.
    """

    __slots__ = ("cluster", "sizes")

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.sizes: dict[tuple[str, str], int] = {}  # (chunk id, node id) -> bytes

    def add(self, chunk_id: str, node_ids: Sequence[str], size: int) -> None:
        for node_id in node_ids:
            self.sizes[chunk_id, node_id] = size

    def take(self, chunk_id: str, node_id: str) -> None:
        del self.sizes[chunk_id, node_id]

    def release_all(self) -> None:
        sizes, self.sizes = self.sizes, {}
        for (_, node_id), size in sizes.items():
            self.cluster.release(node_id, size, stored=False)


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The most telling error of a task group: our own errors before cancellations."""
    errors = list(_leaves(group))
    for error in errors:
        if isinstance(error, DstoreError):
            return error
    return errors[0]


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for sub in error.exceptions for leaf in _leaves(sub)]
    return [error]
