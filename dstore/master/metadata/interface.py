"""What the chunk master needs from its metadata, whatever the engine.

Every method is one transaction. Each state change is guarded by the state it expects
(a version moves only from the state its move starts in; a name's pointer is swapped
only at the generation it was read at), so an engine stays correct with several writers
at once, not only behind SQLite's single one. Times (``created``, leases, ``dead_since``)
come from the engine's clock, never the caller's: several gateways share one.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

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


class MetadataStore(abc.ABC):
    # whether several gateways may share this engine (their read pins must then be rows)
    shared: bool = False

    @abc.abstractmethod
    async def open(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    def stats(self) -> EngineStats: ...

    # --- uploads --------------------------------------------------------------------------

    @abc.abstractmethod
    async def begin_upload(
        self, name: str, content_type: str, lease: float, first: ChunkIntent | None = None
    ) -> int:
        """A new pending version with a lease of ``lease`` seconds, and the intent for its
        first chunk in the same transaction (one round trip for a one-chunk file);
        returns its id."""

    @abc.abstractmethod
    async def renew_leases(self, version_ids: Sequence[int], lease: float) -> None:
        """Extend the leases of uploads still pending to ``lease`` seconds from now (never
        shortening one: a multipart upload's part holds the upload's)."""

    @abc.abstractmethod
    async def add_chunk(self, version_id: int, intent: ChunkIntent) -> None:
        """Record a chunk intent before its bytes are sent: the reaper can always find it."""

    @abc.abstractmethod
    async def add_replicas(self, chunk_id: str, nodes: Sequence[str]) -> None:
        """Record more intended replicas of a chunk (a failed node was replaced); a node
        already recorded for it is left as it is."""

    @abc.abstractmethod
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
        """Make a pending version current for its name, atomically; the old one becomes
        dead. ``if_absent``: raise ``PreconditionFailed`` if the name exists (the version
        stays pending: the caller aborts it); ``if_match``: unless the current version's
        ETag is one of these (``"*"``: any version), checked in the same transaction.
        The result lists the chunks of a version of at most ``keep_chunks``.
        ``Conflict`` if the version is no longer pending."""

    @abc.abstractmethod
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
        """A whole small file in one transaction: a new version, live at once, holding
        its bytes; the name's old version becomes dead. ``if_absent`` as for ``commit``.
        The version returned carries the bytes' checksum, not the bytes (the caller has
        them), as a lookup cache keeps it."""

    @abc.abstractmethod
    async def abort(self, version_id: int) -> None:
        """Give up a pending version (no-op for any other); its chunks are reclaimed."""

    # --- reads ----------------------------------------------------------------------------

    @abc.abstractmethod
    async def lookup(self, name: str, start: int = 0, limit: int | None = None) -> FileVersion:
        """The live version of a name with its chunks, or ``FileNotFound``. With
        ``limit``: only the chunks from the one holding byte ``start`` on, at most
        ``limit`` of them, so that the first byte of a large file waits for one page of
        its chunk list, not all of it; ``chunk_page`` gives the rest. An inline file's
        version has no chunks and comes with its bytes."""

    @abc.abstractmethod
    async def is_current(self, name: str, version_id: int) -> bool:
        """Whether ``version_id`` is the name's current version: a cached lookup checked
        against the database, which other gateways write too."""

    @abc.abstractmethod
    async def head(self, name: str) -> FileVersion:
        """Like ``lookup`` without the chunk list (an inline body with its checksum only)."""

    @abc.abstractmethod
    async def chunk_page(self, version_id: int, start: int, limit: int) -> tuple[ChunkRef, ...]:
        """A version's chunks from the one holding byte ``start`` on, at most ``limit``;
        fewer than asked for only at the end of the version (or if it is gone)."""

    @abc.abstractmethod
    async def inline_data(self, version_id: int) -> bytes | None:
        """The bytes of an inline file's version; None once the version is reclaimed."""

    @abc.abstractmethod
    async def inline_bodies(self, after: int, limit: int) -> list[tuple[int, str, InlineBody]]:
        """(version id, name, body) of live inline versions with ids above ``after``, in
        id order, at most ``limit``: what the inline scrubber reads, a batch at a time."""

    @abc.abstractmethod
    async def delete(self, name: str, *, if_match: Sequence[str] | None = None) -> int:
        """Remove a name at once; returns the version that became dead. ``if_match`` as
        for ``commit``."""

    @abc.abstractmethod
    async def list_files(
        self, prefix: str, start_after: str, limit: int
    ) -> tuple[list[FileInfo], str | None]:
        """Live names with ``prefix`` after ``start_after``, in byte order of their
        UTF-8 (code point order), at most ``limit``; and the last one if more follow."""

    @abc.abstractmethod
    async def totals(self) -> tuple[int, int]:
        """(files, bytes) of live versions."""

    @abc.abstractmethod
    async def chunk_ids(self, state: VersionState) -> set[str]:
        """The ids of every chunk of versions in this state (where a check of the nodes
        against the metadata starts)."""

    @abc.abstractmethod
    async def version_ids(
        self, *, name: str | None = None, state: VersionState | None = None
    ) -> list[int]:
        """The ids of the versions of a name, or in a state, or both; in id order."""

    @abc.abstractmethod
    async def inline_count(self) -> int:
        """How many inline bodies are stored (live or not yet purged)."""

    # --- reclaiming -----------------------------------------------------------------------

    @abc.abstractmethod
    async def expire_leases(self) -> list[int]:
        """Abort pending versions whose lease ran out (on the engine's clock), and end
        the multipart uploads that expired (their parts' leases run out with them); the
        versions' ids."""

    @abc.abstractmethod
    async def dead_chunks(self, settle: float, limit: int) -> list[DeadChunk]:
        """Chunks of versions dead for more than ``settle`` seconds, longest dead first;
        ``pinned`` if a read pin of their version has not run out."""

    @abc.abstractmethod
    async def pin(self, holder: str, version_id: int, ttl: float, settle: float) -> bool:
        """A read pin: keep a version's chunks from the reaper for ``ttl`` seconds of the
        engine's clock, for downloads on ``holder`` (one row per version and holder; its
        expiry only ever moves later). False, and nothing pinned, if the version is gone
        or dead for more than ``settle`` seconds: the reaper may be deleting it already."""

    @abc.abstractmethod
    async def renew_pins(self, holder: str, version_ids: Sequence[int], ttl: float) -> None:
        """Keep ``holder``'s pins of these versions for ``ttl`` seconds from now (made
        again if one ran out meanwhile)."""

    @abc.abstractmethod
    async def forget_replica(self, chunk_id: str, node_id: str, *, durable: bool = False) -> None:
        """A chunk's replica is gone from its node (or never to be made). ``durable``:
        survives power loss before this returns, as it must when the copy is deleted
        next (a move: otherwise the metadata could come back naming the deleted copy,
        and the reconciler would then delete the new one as an orphan)."""

    @abc.abstractmethod
    async def purge_dead(self) -> Purged:
        """Drop dead versions with no replica left, the inline bytes of every dead
        version, and read pins that ran out."""

    # --- S3 buckets ------------------------------------------------------------------------

    @abc.abstractmethod
    async def create_bucket(self, name: str) -> bool:
        """Record a bucket; False if it exists already."""

    @abc.abstractmethod
    async def delete_bucket(self, name: str) -> None:
        """Forget a bucket: ``NoSuchBucket`` if there is none, ``BucketNotEmpty`` while
        a live file is named ``name/…``."""

    @abc.abstractmethod
    async def buckets(self) -> list[tuple[str, float]]:
        """(name, created) of every bucket, in name order."""

    @abc.abstractmethod
    async def bucket_exists(self, name: str) -> bool: ...

    # --- S3 multipart uploads --------------------------------------------------------------

    @abc.abstractmethod
    async def create_multipart(
        self, upload_id: str, name: str, content_type: str, expiry: float
    ) -> MultipartUpload:
        """Begin a multipart upload of ``name``, given up ``expiry`` seconds from now
        unless completed or aborted first."""

    @abc.abstractmethod
    async def multipart(self, upload_id: str) -> MultipartUpload:
        """An upload in progress, or ``NoSuchUpload`` (never begun, or completed, aborted
        or expired)."""

    @abc.abstractmethod
    async def seal_part(
        self, upload_id: str, number: int, version_id: int, size: int, etag: str
    ) -> None:
        """A pending version, stored whole, becomes part ``number`` of the upload: it
        stays pending until the upload completes or expires (its lease runs to the
        upload's expiry). A part stored before under that number is given up.
        ``NoSuchUpload`` if the upload is not in progress (the caller aborts the
        version); ``Conflict`` if the version is no longer pending."""

    @abc.abstractmethod
    async def parts(self, upload_id: str, after: int, limit: int) -> list[Part]:
        """An upload's parts numbered above ``after``, in order, at most ``limit``;
        ``NoSuchUpload`` as for ``multipart``."""

    @abc.abstractmethod
    async def multipart_uploads(
        self, prefix: str, after: tuple[str, str], limit: int
    ) -> list[MultipartUpload]:
        """Uploads in progress of names starting with ``prefix``, in (name, upload id)
        order after ``after``, at most ``limit``."""

    @abc.abstractmethod
    async def complete_multipart(
        self,
        upload_id: str,
        name: str,
        parts: Sequence[tuple[int, str]],
        etag: str,
        min_part: int,
    ) -> CommitResult:
        """Make the upload's object, in one transaction: a new version of ``name`` whose
        chunks are the chunks of the listed parts ((number, ETag), in ascending order),
        moved to it in that order, not copied; it becomes current as a commit does. The
        parts not listed are given up, and the upload ends. ``NoSuchUpload`` if it is not
        in progress for ``name``; ``InvalidPart`` for a part not stored or with another
        ETag; ``EntityTooSmall`` for a part but the last under ``min_part`` bytes."""

    @abc.abstractmethod
    async def abort_multipart(self, upload_id: str) -> None:
        """End an upload and give up its parts (their chunks are reclaimed);
        ``NoSuchUpload`` as for ``multipart``."""

    # --- work for the leader ---------------------------------------------------------------

    @abc.abstractmethod
    async def request_work(self, request: WorkRequest) -> None:
        """Queue work for whichever gateway leads (durably: it outlives this gateway)."""

    @abc.abstractmethod
    async def take_work(self, limit: int) -> list[WorkRequest]:
        """The oldest queued work, at most ``limit``, taken off the queue (each request
        goes to one taker)."""

    # --- the gateways sharing the engine ---------------------------------------------------

    @abc.abstractmethod
    async def check_in(self, holder: str) -> None:
        """``holder`` (a gateway) is alive now, on the engine's clock."""

    @abc.abstractmethod
    async def gateways(self, within: float) -> list[tuple[str, float]]:
        """(holder, seconds since it checked in) of the gateways seen ``within`` seconds."""

    @abc.abstractmethod
    async def save_job_state(self, name: str, state: str) -> None:
        """What the leader's job ``name`` reports (JSON), for every gateway to show."""

    @abc.abstractmethod
    async def job_state(self, name: str) -> str | None: ...

    # --- replicas and members -------------------------------------------------------------

    @abc.abstractmethod
    async def chunks_on(self, node_ids: Sequence[str], limit: int) -> list[ChunkReplicas]:
        """Chunks of live or pending versions with a replica on any of these nodes."""

    @abc.abstractmethod
    async def chunk_replicas(self, chunk_id: str) -> ChunkReplicas | None: ...

    @abc.abstractmethod
    async def replica_count(self, node_id: str) -> int:
        """How many replicas are recorded on a node."""

    @abc.abstractmethod
    async def replica_node_ids(self) -> set[str]:
        """Every node id some replica is recorded on."""

    @abc.abstractmethod
    async def known_replicas(self, node_id: str, chunk_ids: Sequence[str]) -> set[str]:
        """Which of these chunk ids a version (live, pending or dead) expects on this node."""

    @abc.abstractmethod
    async def members(self) -> list[MemberRecord]: ...

    @abc.abstractmethod
    async def set_member(self, addr: str, state: MemberState | None) -> None:
        """Record a run-time member (state None: forget it), durably."""

    @abc.abstractmethod
    async def identities(self) -> dict[str, str]:
        """The node id last seen at each storage address."""

    @abc.abstractmethod
    async def remember_identity(self, addr: str, node_id: str) -> None: ...

    @abc.abstractmethod
    async def lead(self, holder: str, ttl: float) -> int | None:
        """Take or keep the leadership for ``ttl`` seconds of the engine's clock, in one
        guarded statement: the epoch if ``holder`` leads now, None while another
        holder's lease runs. A holder taking over (or taking back a lease that ran out)
        gets an epoch higher than any before."""

    @abc.abstractmethod
    async def leadership(self) -> Leadership | None:
        """The current (or last) leader, if there ever was one."""
