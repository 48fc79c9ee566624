"""The lookup cache: recently read names' current versions, kept in the gateway's memory,
as a layer over any engine (``CachedMetadataStore``).

A ``lookup`` of a name read before then needs no trip to the engine (for a small file
that trip was a third of the gateway's CPU per GET). Bounded: ``entries`` names, each of
at most ``max_chunks`` chunks (a large file's lookup is nothing beside its transfer). It
keeps no file bytes: an inline file's version goes in without them (the gateway's read
cache holds bytes, under its own bound).

A hit is never older than a change anyone has been told of. Every write through this
layer drops what it touches before it starts; when it ends, it puts in the state it made
(a commit's new version) only if no other write of that name overlapped it, and a lookup
puts in what it read only if no write of that name began meanwhile and none is still
running. Replica changes, and writes whose outcome is unknown (failed, or given up by a
cancelled caller while the engine may still commit), raise a barrier: lookups begun
before it put nothing.
This is exact while this process is the only writer. On an engine several gateways
share (``MetadataStore.shared``), every hit is checked against the name's current version
in the engine (``is_current``) before it is used, and the gateway keeps inline files
only (a chunked version's replica list could change behind its back).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Awaitable, Sequence
from typing import TypeVar

from dstore.master.metadata.interface import MetadataStore
from dstore.master.metadata.model import (
    ChunkIntent,
    ChunkRef,
    ChunkReplicas,
    CommitResult,
    DeadChunk,
    EngineStats,
    FileInfo,
    FileVersion,
    InlineBody,
    Leadership,
    MemberRecord,
    MemberState,
    MultipartUpload,
    Part,
    Purged,
    VersionState,
    WorkRequest,
)

T = TypeVar("T")


class LookupCache:
    """Names' current versions, least recently used out first; only the event loop
    touches it."""

    def __init__(self, entries: int = 4096, max_chunks: int = 8) -> None:
        self.entries = entries
        self.max_chunks = max_chunks
        self.hits = 0
        self.misses = 0
        self._versions: OrderedDict[str, FileVersion] = OrderedDict()
        self._by_chunk: dict[str, str] = {}  # chunk id -> name (chunk ids are unique)

    def __repr__(self) -> str:
        return f"<LookupCache {len(self)}/{self.entries} names, {self.hits} hits>"

    def __len__(self) -> int:
        return len(self._versions)

    @property
    def chunks_indexed(self) -> int:
        return len(self._by_chunk)

    def admits(self, chunks: int) -> bool:
        """Whether a version of ``chunks`` chunks would be kept."""
        return self.entries > 0 and chunks <= self.max_chunks

    def get(self, name: str) -> FileVersion | None:
        version = self._versions.get(name)
        if version is None:
            self.misses += 1
            return None
        self._versions.move_to_end(name)
        self.hits += 1
        return version

    def put(self, version: FileVersion) -> None:
        if not self.admits(len(version.chunks)):
            return
        inline = version.inline
        if inline is not None and inline.data is not None:  # never the bytes
            version = FileVersion(
                version.name,
                version.version_id,
                version.size,
                version.etag,
                version.content_type,
                version.created,
                (),
                InlineBody(None, inline.checksum),
            )
        self._forget(version.name)
        self._versions[version.name] = version
        for chunk in version.chunks:
            self._by_chunk[chunk.chunk_id] = version.name
        while len(self._versions) > self.entries:
            self._forget(next(iter(self._versions)))

    def drop(self, name: str) -> None:
        self._forget(name)

    def drop_chunk(self, chunk_id: str) -> None:
        name = self._by_chunk.get(chunk_id)
        if name is not None:
            self._forget(name)

    def clear(self) -> None:
        self._versions.clear()
        self._by_chunk.clear()

    def _forget(self, name: str) -> None:
        version = self._versions.pop(name, None)
        if version is not None:
            for chunk in version.chunks:
                self._by_chunk.pop(chunk.chunk_id, None)


class _Write:
    """One write of a name in flight; ``contended`` once another overlaps it."""

    __slots__ = ("contended",)

    def __init__(self) -> None:
        self.contended = False


class CachedMetadataStore(MetadataStore):
    """``engine`` with a ``LookupCache`` in front of its lookups."""

    def __init__(self, engine: MetadataStore, cache: LookupCache | None = None) -> None:
        self.engine = engine
        self.cache = cache if cache is not None else LookupCache()
        self._writes: dict[str, list[_Write]] = {}  # names with writes in flight
        self._epoch = 0  # counts writes begun, of names and of replicas
        self._touched: dict[str, int] = {}  # name -> epoch of its last write's start
        # start epochs of the lookups and commits in flight: a name touched before the
        # oldest of them concerns none, so its entry can go (``_forget_old_touches``)
        self._open: Counter[int] = Counter()
        self._touched_bound = max(4 * self.cache.entries, 256)
        self._barrier = 0  # lookups begun before this epoch do not fill the cache

    def __repr__(self) -> str:
        return f"<CachedMetadataStore {self.cache!r} over {self.engine!r}>"

    def stats(self) -> EngineStats:
        return self.engine.stats()

    @property
    def shared(self) -> bool:  # type: ignore[override]
        return self.engine.shared

    @property
    def tracked_names(self) -> int:
        """Names whose last write the layer remembers (bounded, whatever is written)."""
        return len(self._touched)

    async def open(self) -> None:
        await self.engine.open()

    async def close(self) -> None:
        self.cache.clear()
        await self.engine.close()

    # --- the writes that change what a lookup answers ----------------------------------
    #
    # A write settles the cache when its engine call returns. A caller cancelled while
    # the engine still works (its transaction may yet commit) raises the barrier: no
    # lookup begun before then may fill the cache. Engines run one caller's operations
    # in the order they were handed over (SQLite's one thread does), so any lookup begun
    # after the barrier reads what that write left.

    def _mark(self, name: str) -> int:
        """A write of ``name`` happened now; the epoch it was at before."""
        last = self._touched.get(name, 0)
        self._epoch += 1
        self._touched[name] = self._epoch
        if len(self._touched) > self._touched_bound:
            self._forget_old_touches()
        return last

    def _open_at(self) -> int:
        """A lookup or commit begins: the epoch it compares later changes against."""
        epoch = self._epoch
        self._open[epoch] += 1
        return epoch

    def _close_at(self, epoch: int) -> None:
        self._open[epoch] -= 1
        if not self._open[epoch]:
            del self._open[epoch]

    def _forget_old_touches(self) -> None:
        """Keep ``_touched`` bounded: every name written would stay in it otherwise."""
        floor = min(self._open, default=self._epoch + 1)
        self._touched = {name: at for name, at in self._touched.items() if at >= floor}
        base = max(4 * self.cache.entries, 256)
        self._touched_bound = max(base, 2 * len(self._touched))  # (no prune per close)

    def _raise_barrier(self) -> None:
        self._epoch += 1
        self._barrier = self._epoch

    def _begin(self, name: str) -> tuple[_Write, int]:
        self._mark(name)
        self.cache.drop(name)
        write = _Write()
        others = self._writes.setdefault(name, [])
        if others:
            write.contended = True
            for other in others:
                other.contended = True
        others.append(write)
        return write, self._epoch

    def _end(self, name: str, write: _Write, mark: int, version: FileVersion | None) -> None:
        others = self._writes[name]
        others.remove(write)
        if not others:
            del self._writes[name]
        fresh = (
            version is not None
            and not write.contended
            and self._touched.get(name) == mark
            and self._barrier < mark
        )
        if fresh and version is not None:
            self.cache.put(version)
        else:
            self.cache.drop(name)

    async def _write_of(self, name: str, call: Awaitable[T], keeps: bool) -> T:
        write, mark = self._begin(name)
        try:
            result = await call
        except BaseException:
            self._raise_barrier()  # failed or given up: what the engine did is not known
            self._end(name, write, mark, None)
            raise
        version = (
            result.version if keeps and isinstance(result, CommitResult) and result.listed else None
        )
        self._end(name, write, mark, version)
        return result

    async def commit(
        self,
        version_id: int,
        size: int,
        etag: str,
        *,
        if_absent: bool = False,
        if_match: Sequence[str] | None = None,
        keep_chunks: int = 0,
    ) -> CommitResult:
        # which name this commits is known only once it has: it is settled then, and a
        # version goes in only if nothing else touched the name meanwhile
        epoch = self._open_at()
        try:
            result = await self.engine.commit(
                version_id,
                size,
                etag,
                if_absent=if_absent,
                if_match=if_match,
                keep_chunks=max(keep_chunks, self.cache.max_chunks),
            )
        except BaseException:
            self._raise_barrier()
            self._close_at(epoch)
            raise
        name = result.version.name
        last = self._mark(name)
        if result.listed and last <= epoch and name not in self._writes and self._barrier <= epoch:
            self.cache.put(result.version)
        else:
            self.cache.drop(name)
        self._close_at(epoch)
        return result

    async def commit_inline(
        self,
        name: str,
        content_type: str,
        body: InlineBody,
        etag: str,
        *,
        if_absent: bool = False,
        if_match: Sequence[str] | None = None,
    ) -> CommitResult:
        call = self.engine.commit_inline(
            name, content_type, body, etag, if_absent=if_absent, if_match=if_match
        )
        return await self._write_of(name, call, keeps=True)

    async def delete(self, name: str, *, if_match: Sequence[str] | None = None) -> int:
        return await self._write_of(name, self.engine.delete(name, if_match=if_match), keeps=False)

    async def add_replicas(self, chunk_id: str, nodes: Sequence[str]) -> None:
        self._replica_change(chunk_id)
        try:
            await self.engine.add_replicas(chunk_id, nodes)
        finally:
            self.cache.drop_chunk(chunk_id)

    async def forget_replica(self, chunk_id: str, node_id: str, *, durable: bool = False) -> None:
        self._replica_change(chunk_id)
        try:
            await self.engine.forget_replica(chunk_id, node_id, durable=durable)
        finally:
            self.cache.drop_chunk(chunk_id)

    def _replica_change(self, chunk_id: str) -> None:
        self._epoch += 1
        self._barrier = self._epoch
        self.cache.drop_chunk(chunk_id)

    # --- lookups --------------------------------------------------------------------------

    async def lookup(self, name: str, start: int = 0, limit: int | None = None) -> FileVersion:
        hit = self.cache.get(name)
        if hit is not None:
            # other gateways write a shared engine: a hit is checked against it (the
            # version's own fields never change, so the version id is enough)
            if not self.engine.shared or await self.engine.is_current(name, hit.version_id):
                return hit
            self.cache.drop(name)
        asked = limit
        if limit is not None and start == 0:  # enough to tell whether the whole list fits
            asked = max(limit, self.cache.max_chunks + 1)
        epoch = self._open_at()
        try:
            version = await self.engine.lookup(name, start, asked)
            whole = version.inline is not None or (
                start == 0 and (asked is None or len(version.chunks) < asked)
            )
            if (
                whole
                and name not in self._writes
                and self._touched.get(name, 0) <= epoch
                and self._barrier <= epoch
            ):
                self.cache.put(version)
        finally:
            self._close_at(epoch)
        return version

    # --- the rest, as the engine answers -------------------------------------------------

    async def begin_upload(
        self, name: str, content_type: str, lease: float, first: ChunkIntent | None = None
    ) -> int:
        return await self.engine.begin_upload(name, content_type, lease, first)

    async def renew_leases(self, version_ids: Sequence[int], lease: float) -> None:
        await self.engine.renew_leases(version_ids, lease)

    async def add_chunk(self, version_id: int, intent: ChunkIntent) -> None:
        await self.engine.add_chunk(version_id, intent)

    async def abort(self, version_id: int) -> None:
        await self.engine.abort(version_id)

    async def head(self, name: str) -> FileVersion:
        return await self.engine.head(name)

    async def is_current(self, name: str, version_id: int) -> bool:
        return await self.engine.is_current(name, version_id)

    async def chunk_page(self, version_id: int, start: int, limit: int) -> tuple[ChunkRef, ...]:
        return await self.engine.chunk_page(version_id, start, limit)

    async def inline_data(self, version_id: int) -> bytes | None:
        return await self.engine.inline_data(version_id)

    async def inline_bodies(self, after: int, limit: int) -> list[tuple[int, str, InlineBody]]:
        return await self.engine.inline_bodies(after, limit)

    async def list_files(
        self, prefix: str, start_after: str, limit: int
    ) -> tuple[list[FileInfo], str | None]:
        return await self.engine.list_files(prefix, start_after, limit)

    async def totals(self) -> tuple[int, int]:
        return await self.engine.totals()

    async def chunk_ids(self, state: VersionState) -> set[str]:
        return await self.engine.chunk_ids(state)

    async def version_ids(
        self, *, name: str | None = None, state: VersionState | None = None
    ) -> list[int]:
        return await self.engine.version_ids(name=name, state=state)

    async def inline_count(self) -> int:
        return await self.engine.inline_count()

    async def expire_leases(self) -> list[int]:
        return await self.engine.expire_leases()

    async def dead_chunks(self, settle: float, limit: int) -> list[DeadChunk]:
        return await self.engine.dead_chunks(settle, limit)

    async def check_in(self, holder: str) -> None:
        await self.engine.check_in(holder)

    async def gateways(self, within: float) -> list[tuple[str, float]]:
        return await self.engine.gateways(within)

    async def save_job_state(self, name: str, state: str) -> None:
        await self.engine.save_job_state(name, state)

    async def job_state(self, name: str) -> str | None:
        return await self.engine.job_state(name)

    async def create_bucket(self, name: str) -> bool:
        return await self.engine.create_bucket(name)

    async def delete_bucket(self, name: str) -> None:
        await self.engine.delete_bucket(name)

    async def buckets(self) -> list[tuple[str, float]]:
        return await self.engine.buckets()

    async def bucket_exists(self, name: str) -> bool:
        return await self.engine.bucket_exists(name)

    async def create_multipart(
        self, upload_id: str, name: str, content_type: str, expiry: float
    ) -> MultipartUpload:
        return await self.engine.create_multipart(upload_id, name, content_type, expiry)

    async def multipart(self, upload_id: str) -> MultipartUpload:
        return await self.engine.multipart(upload_id)

    async def seal_part(
        self, upload_id: str, number: int, version_id: int, size: int, etag: str
    ) -> None:
        await self.engine.seal_part(upload_id, number, version_id, size, etag)

    async def parts(self, upload_id: str, after: int, limit: int) -> list[Part]:
        return await self.engine.parts(upload_id, after, limit)

    async def multipart_uploads(
        self, prefix: str, after: tuple[str, str], limit: int
    ) -> list[MultipartUpload]:
        return await self.engine.multipart_uploads(prefix, after, limit)

    async def complete_multipart(
        self,
        upload_id: str,
        name: str,
        parts: Sequence[tuple[int, str]],
        etag: str,
        min_part: int,
    ) -> CommitResult:
        call = self.engine.complete_multipart(upload_id, name, parts, etag, min_part)
        return await self._write_of(name, call, keeps=False)

    async def abort_multipart(self, upload_id: str) -> None:
        await self.engine.abort_multipart(upload_id)

    async def request_work(self, request: WorkRequest) -> None:
        await self.engine.request_work(request)

    async def take_work(self, limit: int) -> list[WorkRequest]:
        return await self.engine.take_work(limit)

    async def pin(self, holder: str, version_id: int, ttl: float, settle: float) -> bool:
        return await self.engine.pin(holder, version_id, ttl, settle)

    async def renew_pins(self, holder: str, version_ids: Sequence[int], ttl: float) -> None:
        await self.engine.renew_pins(holder, version_ids, ttl)

    async def purge_dead(self) -> Purged:
        return await self.engine.purge_dead()

    async def chunks_on(self, node_ids: Sequence[str], limit: int) -> list[ChunkReplicas]:
        return await self.engine.chunks_on(node_ids, limit)

    async def chunk_replicas(self, chunk_id: str) -> ChunkReplicas | None:
        return await self.engine.chunk_replicas(chunk_id)

    async def replica_count(self, node_id: str) -> int:
        return await self.engine.replica_count(node_id)

    async def replica_node_ids(self) -> set[str]:
        return await self.engine.replica_node_ids()

    async def known_replicas(self, node_id: str, chunk_ids: Sequence[str]) -> set[str]:
        return await self.engine.known_replicas(node_id, chunk_ids)

    async def members(self) -> list[MemberRecord]:
        return await self.engine.members()

    async def set_member(self, addr: str, state: MemberState | None) -> None:
        await self.engine.set_member(addr, state)

    async def identities(self) -> dict[str, str]:
        return await self.engine.identities()

    async def remember_identity(self, addr: str, node_id: str) -> None:
        await self.engine.remember_identity(addr, node_id)

    async def lead(self, holder: str, ttl: float) -> int | None:
        return await self.engine.lead(holder, ttl)

    async def leadership(self) -> Leadership | None:
        return await self.engine.leadership()
