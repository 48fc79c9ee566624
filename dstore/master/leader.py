"""One gateway runs the background work (reaper, repair, reconciler, inline scrubber) of
all the gateways on one database: the one holding the leadership lease, a row taken and
renewed on the database's clock (``MetadataStore.lead``). The lease is renewed every
``interval``; this process counts itself leader only until a safe part of ``ttl`` after
it last asked, so a gateway cut off from the database stops its background work before
its lease can pass to another."""

from __future__ import annotations

import os
import secrets
import socket
import time
from collections.abc import Callable

import orjson
import structlog

from dstore.errors import DstoreError
from dstore.master.cluster import Cluster
from dstore.master.jobs import PeriodicJob
from dstore.master.metadata import MetadataStore

log = structlog.get_logger("dstore.leader")

LEASE = 10.0  # seconds a leader holds the lease without renewing it
SEEN = 3 * LEASE  # a gateway not checked in for this long is no longer shown
REPAIR_STATE = "repair"  # the job state the leader saves every round
TRUST = 0.8  # the part of the lease this process counts on, from when it asked


def holder_id(listen: str) -> str:
    """This gateway process, as leases name it: host, listen address, pid, and a few
    random bytes (a restarted process is another holder)."""
    return f"{socket.gethostname()}/{listen}/{os.getpid()}/{secrets.token_hex(3)}"


class Leader(PeriodicJob):
    NAME = "leader"

    def __init__(
        self,
        meta: MetadataStore,
        holder: str,
        cluster: Cluster | None = None,
        *,
        ttl: float = LEASE,
        interval: float = 1.0,
        report: Callable[[], dict[str, object]] | None = None,
    ) -> None:
        super().__init__(interval)
        self.meta = meta
        self.holder = holder
        self.cluster = cluster
        # the repair state this gateway shows while it leads, saved for the others to show
        self.report = report
        self.ttl = ttl
        self.epoch: int | None = None
        self._until = 0.0  # monotonic time up to which this process may count on the lease

    def __repr__(self) -> str:
        state = f"leads, epoch {self.epoch}" if self.leads else "follows"
        return f"<Leader {self.holder} {state}>"

    @property
    def leads(self) -> bool:
        return self.epoch is not None and time.monotonic() < self._until

    async def stop(self) -> None:
        """Stop renewing, and hand the lease back at once if this gateway holds it (the
        next leader need not wait for it to run out)."""
        await super().stop()
        if self.epoch is not None:
            self.epoch, self._until = None, 0.0
            self._fence(0)
            try:
                await self.meta.lead(self.holder, 0.0)  # (ends now: anyone may take it)
            except DstoreError as exc:
                log.warning("leadership_not_returned", holder=self.holder, error=str(exc))

    async def cycle(self) -> None:
        asked = time.monotonic()
        try:
            epoch = await self.meta.lead(self.holder, self.ttl)
        except DstoreError as exc:  # (the lease lapses here by itself, at ``_until``)
            log.warning("leadership_unknown", holder=self.holder, error=str(exc))
            return
        if epoch != self.epoch:
            log.info("leadership", holder=self.holder, epoch=epoch, leads=epoch is not None)
            self.epoch, self._until = None, 0.0
            self._fence(epoch or 0)
            if epoch is not None and self.cluster is not None:
                # every node hears of the new epoch before this gateway does any work:
                # from then on they refuse the deletes of the leader before
                await self.cluster.refresh()
        self.epoch = epoch
        self._until = asked + self.ttl * TRUST if epoch is not None else 0.0
        try:
            await self.meta.check_in(self.holder)
            if self.leads and self.report is not None:
                await self.meta.save_job_state(REPAIR_STATE, orjson.dumps(self.report()).decode())
        except DstoreError as exc:
            log.warning("check_in_failed", holder=self.holder, error=str(exc))

    def _fence(self, epoch: int) -> None:
        if self.cluster is not None:
            self.cluster.epoch = epoch
