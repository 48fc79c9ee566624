"""``fsck``: which files are at risk now, and are any lost? The metadata's files (under a
prefix) are walked against what the nodes hold: each node's chunk inventory is listed
once, a page at a time, and every chunk's recorded replicas are looked up in them. With
``verify`` every replica found is also read and checked against its checksum (and an
inline file's bytes against theirs), at most ``rate`` bytes a second, so a check does not
starve traffic.

Read-only: nothing is repaired, moved or reported to repair (the repairer and scrubbers
do that on their own schedule). A replica on a node that is down counts as missing: it
cannot be read now.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field

import structlog

from dstore.chunk import checksum
from dstore.errors import DstoreError
from dstore.master.cluster import Cluster, NodeState
from dstore.master.metadata import ChunkRef, FileVersion, MetadataStore
from dstore.master.replicas import ReadStrategy, Replicas

log = structlog.get_logger("dstore.fsck")

# a read that finds a bad replica says so to fsck only (repair hears of it otherwise)
_CHECK = ReadStrategy(try_suspect=False, bad_codes=frozenset())
PAGE = 1000  # names, and inventory entries, asked for at a time


@dataclass(slots=True)
class FileReport:
    """A file with a chunk short of replicas: ``state`` is ``under_replicated`` (every
    chunk still has a good copy) or ``unrecoverable`` (some chunk has none)."""

    name: str
    size: int
    chunks: int
    state: str = "healthy"
    missing_replicas: int = 0  # recorded copies not on their node (or the node is down)
    corrupt_replicas: int = 0  # copies read that failed their checksum (verify only)
    lost_chunks: int = 0  # chunks with no good copy at all


@dataclass(slots=True)
class Totals:
    files: int = 0
    bytes: int = 0
    chunks: int = 0
    healthy: int = 0
    under_replicated: int = 0
    unrecoverable: int = 0
    missing_replicas: int = 0
    corrupt_replicas: int = 0
    verified_bytes: int = 0
    seconds: float = 0.0
    nodes_down: list[str] = field(default_factory=list)


class Fsck:
    def __init__(
        self,
        meta: MetadataStore,
        door: Replicas,
        cluster: Cluster,
        replicas: int,
        *,
        verify: bool = False,
        rate: float = 50e6,
    ) -> None:
        self.meta = meta
        self.door = door
        self.cluster = cluster
        self.replicas = replicas
        self.verify = verify
        self.rate = rate
        self.totals = Totals()
        self._held: dict[str, set[str]] = {}  # node id -> the chunk ids it holds
        self._read_started = 0.0

    def __repr__(self) -> str:
        t = self.totals
        return f"<Fsck {t.files} files, {t.under_replicated} under, {t.unrecoverable} lost>"

    async def run(self, prefix: str = "") -> AsyncIterator[FileReport]:
        """The files at risk under ``prefix``, as they are found; ``totals`` at the end."""
        started = time.monotonic()
        await self._inventories()
        after = ""
        while True:
            page, more = await self.meta.list_files(prefix, after, PAGE)
            for info in page:
                try:
                    version = await self.meta.lookup(info.name)
                except DstoreError:
                    continue  # deleted meanwhile
                report = await self._check(version)
                if report.state != "healthy":
                    yield report
            if more is None or not page:
                break
            after = page[-1].name
        self.totals.seconds = round(time.monotonic() - started, 3)

    async def _inventories(self) -> None:
        for member in list(self.cluster.members.values()):
            if member.state is NodeState.DOWN or not member.node_id:
                self.totals.nodes_down.append(member.node_id or member.addr)
                continue
            held: set[str] = set()
            after = ""
            try:
                while True:
                    listed = await self.door.list_chunks(member, after, PAGE)
                    held.update(str(row[0]) for row in listed.chunks)
                    if listed.next is None:
                        break
                    after = listed.next
                    await asyncio.sleep(0)  # (other requests between pages)
            except DstoreError as exc:
                log.warning("fsck_inventory_failed", node=member.node_id, error=str(exc))
                self.totals.nodes_down.append(member.node_id)
                continue
            self._held[member.node_id] = held

    async def _check(self, version: FileVersion) -> FileReport:
        totals = self.totals
        report = FileReport(version.name, version.size, len(version.chunks))
        totals.files += 1
        totals.bytes += version.size
        if version.inline is not None:
            if self.verify:
                await self._check_inline(version, report)
        else:  # (a lookup without a limit lists every chunk)
            for chunk in version.chunks:
                await self._check_chunk(chunk, report)
        totals.chunks += report.chunks
        totals.missing_replicas += report.missing_replicas
        totals.corrupt_replicas += report.corrupt_replicas
        if report.lost_chunks:
            report.state = "unrecoverable"
            totals.unrecoverable += 1
        elif report.missing_replicas or report.corrupt_replicas:
            report.state = "under_replicated"
            totals.under_replicated += 1
        else:
            totals.healthy += 1
        return report

    async def _check_chunk(self, chunk: ChunkRef, report: FileReport) -> None:
        good = 0
        for node_id in chunk.nodes:
            if chunk.chunk_id not in self._held.get(node_id, ()):
                report.missing_replicas += 1
                continue
            if self.verify and not await self._reads_back(chunk, node_id):
                report.corrupt_replicas += 1
                continue
            good += 1
        if chunk.nodes and len(chunk.nodes) < self.replicas:
            report.missing_replicas += self.replicas - len(chunk.nodes)
        if good == 0:
            report.lost_chunks += 1

    async def _reads_back(self, chunk: ChunkRef, node_id: str) -> bool:
        started = time.monotonic()
        try:
            await self.door.read(chunk, trace="fsck", nodes=[node_id], strategy=_CHECK)
        except DstoreError as exc:
            log.info("fsck_bad_replica", chunk=chunk.chunk_id, node=node_id, error=str(exc))
            return False
        finally:
            self.totals.verified_bytes += chunk.size
            await asyncio.sleep(max(0.0, chunk.size / self.rate - (time.monotonic() - started)))
        return True

    async def _check_inline(self, version: FileVersion, report: FileReport) -> None:
        assert version.inline is not None
        data = version.inline.data
        if data is None:
            data = await self.meta.inline_data(version.version_id)
        if data is None:
            return  # replaced meanwhile
        self.totals.verified_bytes += len(data)
        if checksum(data) != version.inline.checksum:
            report.corrupt_replicas += 1
            report.lost_chunks += 1  # (the only copy)


def report_json(report: FileReport) -> dict[str, object]:
    return asdict(report)


def totals_json(totals: Totals) -> dict[str, object]:
    return asdict(totals)
