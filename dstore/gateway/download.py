"""The download pipeline: one resolved version, its chunks streamed in order.

The chunks a byte range overlaps are fetched ahead of the one being sent: up to
``read_ahead`` of them reading on the nodes at once, up to ``hold`` fetched or being
fetched, fewer until the client has taken some (``AHEAD_START`` plus one per chunk it
took: a client that reads nothing holds little). The next read starts when one that is
reading delivers its first byte (its node has read the chunk), not when the oldest has
been sent: reads launched together finish together (they share the disk), so a window
that refills only as chunks leave in order lets the disk idle while they cross the
network, and one chunk late on its node holds back every read behind it.

Each chunk is verified against the checksum in the metadata before a byte of it is
handed on (a full chunk is hashed here; a partial read is vouched for by the node, which
hashes the whole chunk while reading it, and by its stored checksum matching ours). A
replica that fails, times out, is missing or corrupt is skipped for the next one. With no
replica left the stream fails: before the first byte that is a 503, after it the caller
aborts the response (the client sees fewer bytes than announced, never a
complete-looking file).

Given a ``Splicer`` on the client's socket, a whole chunk of up to ``RELAY_MAX`` is not
copied through the gateway at all: the node reads and checks it before sending its header
(``checked``), the fetch then waits for its turn (every byte before it gone out) and the
chunk is spliced from the node's socket to the client's inside the kernel. A relay cut
part-way resumes where it stopped, from another replica (a verified ranged read).

No aiohttp here: bytes are handed to any async ``write`` callable.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from contextlib import suppress
from dataclasses import dataclass
from typing import NamedTuple

import structlog

from dstore.errors import DstoreError, NoReplica, PeerGone
from dstore.gateway.budget import MemoryBudget
from dstore.gateway.cache import ChunkCache
from dstore.master.metadata import ChunkRef
from dstore.master.replicas import Relay, Replicas, Splicer

log = structlog.get_logger("dstore.download")

Write = Callable[[memoryview], Awaitable[None]]

# chunks a node checks whole before sending (its READ_SIZE) may be relayed
RELAY_MAX = 4 << 20
# chunks a download may hold ahead of the one being sent before its client has taken a
# whole chunk; one more for each chunk it takes, up to ``hold``. A client that stalls from
# the start so holds a few chunks (in memory, or waiting relays with their connections),
# one that keeps up soon has the whole read-ahead
AHEAD_START = 2


class _Pending(NamedTuple):
    """A chunk being fetched for a stream: ``ready`` is set once its bytes are known good
    (it is being relayed, or the fetch ended); ``charge`` holds what of the memory budget
    it has (a relay waiting in the kernel gives back all but what the gateway holds)."""

    span: Span
    task: asyncio.Task[list[memoryview]]
    ready: asyncio.Future[None]
    relay: Relay | None
    charge: list[int]


@dataclass(frozen=True, slots=True)
class Span:
    """The part of one chunk a range needs."""

    chunk: ChunkRef
    offset: int
    length: int

    @property
    def whole(self) -> bool:
        return self.offset == 0 and self.length == self.chunk.size


def spans(chunks: Iterable[ChunkRef], start: int, end: int) -> list[Span]:
    """The pieces of these chunks (a version's, in order) covering ``[start, end)``."""
    out = []
    for chunk in chunks:
        lo = max(start, chunk.offset)
        hi = min(end, chunk.offset + chunk.size)
        if lo < hi:
            out.append(Span(chunk, lo - chunk.offset, hi - lo))
    return out


class SpanFeed:
    """The spans covering ``[start, end)`` of a version, a page of its chunk list at a
    time: the first page comes with the lookup, ``more(position)`` gives the chunks from
    the one holding byte ``position`` on. So the first byte of a large file does not
    wait for the whole chunk list, nor a small range of it for a list it does not need."""

    def __init__(
        self,
        chunks: Iterable[ChunkRef],
        start: int,
        end: int,
        more: Callable[[int], Awaitable[Iterable[ChunkRef]]] | None = None,
    ) -> None:
        self.end = end
        self.more = more
        self.pages = 1
        self._spans: deque[Span] = deque()
        self.position = start  # where the spans known so far end
        self._take(chunks)

    def __len__(self) -> int:
        """Spans known and not yet taken."""
        return len(self._spans)

    @property
    def complete(self) -> bool:
        """Every span of the range is known."""
        return self.position >= self.end

    @property
    def done(self) -> bool:
        return not self._spans and self.complete

    def peek(self) -> Span:
        return self._spans[0]

    def pop(self) -> Span:
        return self._spans.popleft()

    async def refill(self) -> None:
        """The next page. Raises ``NoReplica`` if the chunk list ends short of the range
        (the version was reclaimed meanwhile)."""
        if self.complete:
            return
        chunks = () if self.more is None else await self.more(self.position)
        self.pages += 1
        if not self._take(chunks):
            raise NoReplica(f"the chunk list ends at byte {self.position} of {self.end}")

    def _take(self, chunks: Iterable[ChunkRef]) -> bool:
        """Append the spans of a page that follow on from ``position``; False if none."""
        taken = False
        for span in spans(chunks, self.position, self.end):
            if span.chunk.offset + span.offset != self.position:
                break  # not where the known spans end (a page from elsewhere): ignored
            self._spans.append(span)
            self.position += span.length
            taken = True
        return taken


class Downloader:
    """Streams versions out of the cluster. Chunk buffers (the one being sent and the
    read-ahead) come from the gateway's memory budget, shared with uploads: the next
    chunk waits for room; read-ahead only happens while there is room to spare, and the
    chunks past the first ``read_ahead`` only while half the budget stays free. A GET
    holds ``hold`` + 1 chunks at most, however slow its client."""

    def __init__(
        self,
        replicas: Replicas,
        budget: MemoryBudget,
        *,
        read_ahead: int = 6,
        hold: int = 12,
        cache: ChunkCache | None = None,
        splice: bool = True,
    ) -> None:
        self.replicas = replicas
        self.splice = splice  # streams may relay whole chunks with a ``Splicer``
        self.budget = budget
        self.cache = cache if cache is not None else ChunkCache(0)
        self.read_ahead = read_ahead  # chunks reading on the nodes at once, at most
        self.hold = max(hold, read_ahead)  # chunks fetched or fetching ahead, at most

    @property
    def failovers(self) -> int:
        return self.replicas.failovers

    @property
    def relays(self) -> int:
        """Chunks spliced node to client whole."""
        return self.replicas.relays

    @property
    def resumes(self) -> int:
        """Relays cut part-way and finished from another replica."""
        return self.replicas.resumes

    def __repr__(self) -> str:
        return (
            f"<Downloader read_ahead={self.read_ahead} hold={self.hold},"
            f" {self.failovers} failovers, {self.relays} relays, {self.cache!r}>"
        )

    async def read_small(self, span: Span, trace: str = "") -> list[memoryview]:
        """One span, fetched within the budget, for a response sent in one piece."""
        await self.budget.acquire(span.length)
        try:
            return await self.fetch(span, trace)
        finally:
            self.budget.release(span.length)

    async def stream(
        self,
        feed: SpanFeed,
        write: Write,
        *,
        trace: str = "",
        before_first_write: Callable[[], Awaitable[None]] | None = None,
        splicer: Splicer | None = None,
        taken: Callable[[], int] | None = None,
    ) -> None:
        """Write the spans in order. ``before_first_write`` runs once the first chunk is
        in hand and verified (the HTTP layer sends its status line then); the read-ahead
        starts once the first bytes are out. With a
        ``splicer`` on the destination, whole chunks go to it instead, node to client in
        the kernel, and ``write`` gets the rest. Raises ``NoReplica`` when a chunk cannot
        be read from any replica, ``Overloaded`` when no memory frees up for the next
        chunk in time, ``PeerGone`` when the splicer's destination fails. ``taken``: the
        bytes the client has received so far (the read-ahead deepens with them; without
        it, with the chunks written)."""
        pending: deque[_Pending] = deque()
        held = 0
        reading = 0  # fetches in ``pending`` whose first byte has not come yet
        finished = 0  # chunks written whole
        ahead = False  # read-ahead may start: set once the first chunk is in hand

        def launch(span: Span) -> None:
            nonlocal held, reading
            held += span.length
            reading += 1
            arrived = False
            ready = asyncio.get_running_loop().create_future()

            def first_byte(_: object = None) -> None:  # also when the fetch ends anyhow
                nonlocal reading, arrived
                if not arrived:
                    arrived = True
                    reading -= 1
                    if ahead:
                        read_ahead()

            def done(_: object) -> None:
                first_byte()
                if not ready.done():
                    ready.set_result(None)

            charge = [span.length]

            def parked(holding: int) -> None:
                # waiting in the kernel: the gateway holds only what it had received
                nonlocal held
                give = charge[0] - min(holding, charge[0])
                if give and not closing:
                    charge[0] -= give
                    held -= give
                    self.budget.release(give)

            relay = None
            if splicer is not None and self._relayable(span):
                turn = asyncio.get_running_loop().create_future()
                relay = Relay(splicer, turn, start_ahead, parked)
            task = asyncio.create_task(self.fetch(span, trace, first_byte, relay, ready))
            task.add_done_callback(done)
            pending.append(_Pending(span, task, ready, relay, charge))

        def read_ahead() -> None:
            nonlocal ahead
            ahead = True
            if taken is None or not feed:
                took = finished
            else:
                took = taken() // max(feed.peek().length, 1)
            depth = min(self.hold, AHEAD_START + took)
            while reading < self.read_ahead and len(pending) < depth and feed:
                spare = self.budget.limit // 2 if len(pending) >= self.read_ahead else 0
                if not self.budget.try_acquire(feed.peek().length, keep_free=spare):
                    return
                launch(feed.pop())

        closing = False

        def start_ahead() -> None:
            # the read-ahead starts once the first bytes are out: before, it would only
            # compete with them for the nodes, their disks and the cores
            if not ahead and not closing:
                read_ahead()

        try:
            while pending or not feed.done:
                if not pending:
                    if not feed:
                        await feed.refill()
                    await self.budget.acquire(feed.peek().length)
                    launch(feed.pop())
                if before_first_write is None:
                    read_ahead()  # not before the first chunk: it alone sets time to first byte
                    if len(feed) < self.hold and not feed.complete:
                        await feed.refill()  # the next page, while the read-ahead reads
                _, task, ready, relay, charge = pending.popleft()
                await ready  # its bytes are known good (or the fetch is over)
                if task.done():
                    task.result()  # a failure: raised before anything is sent for it
                if before_first_write is not None:
                    await before_first_write()
                    before_first_write = None
                if relay is not None:
                    relay.turn.set_result(None)
                pieces = await task
                for piece in pieces:
                    await write(piece)
                    start_ahead()
                start_ahead()
                del pieces
                held -= charge[0]
                self.budget.release(charge[0])
                finished += 1
        finally:
            ahead, closing = False, True  # the fetches ending below launch no more
            for entry in pending:
                entry.task.cancel()
            for entry in pending:
                with suppress(asyncio.CancelledError, DstoreError, PeerGone):
                    await entry.task
            if held:
                self.budget.release(held)

    def _relayable(self, span: Span) -> bool:
        """A whole chunk the node checks before sending, and that the cache would not keep."""
        return span.whole and 0 < span.length <= RELAY_MAX and not self.cache.admits(span.length)

    async def fetch(
        self,
        span: Span,
        trace: str = "",
        first_byte: Callable[[], None] | None = None,
        relay: Relay | None = None,
        ready: asyncio.Future[None] | None = None,
    ) -> list[memoryview]:
        """The verified bytes of one span: from the read cache, or from the first replica
        that delivers them (a whole small chunk is then cached). ``first_byte`` is called
        when the first of them arrives from a node. With ``relay``, a node that checked
        the chunk first has it relayed (``ready`` is set then, and the relay waits for
        its turn); what is returned is what was not relayed."""
        if relay is not None:
            return await self._fetch_any(span, trace, first_byte, relay, ready)
        chunk = span.chunk
        if self.cache.admits(chunk.size):
            cached = self.cache.get(chunk.chunk_id)
            if cached is not None:
                return [memoryview(cached)[span.offset : span.offset + span.length]]
            if span.whole:
                pieces = await self._fetch_any(span, trace, first_byte)
                data = b"".join(pieces)  # off the receive buffers
                self.cache.put(chunk.chunk_id, data)
                return [memoryview(data)]
        return await self._fetch_any(span, trace, first_byte)

    async def _fetch_any(
        self,
        span: Span,
        trace: str,
        first_byte: Callable[[], None] | None,
        relay: Relay | None = None,
        ready: asyncio.Future[None] | None = None,
    ) -> list[memoryview]:
        return await self.replicas.read(
            span.chunk,
            span.offset,
            span.length,
            trace=trace,
            first_byte=first_byte,
            relay=relay,
            ready=ready,
        )
