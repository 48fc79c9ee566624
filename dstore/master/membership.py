"""Membership as the metadata records it, followed by this gateway: a node joined, drained
or removed through any gateway sharing the database is added, drained or dropped here
within a round (``interval``, the heartbeat's). Nodes given with ``--storage`` and not in
the table stay as they are. A database that does not answer leaves the membership as it
was (heartbeats go on regardless: this runs beside them, never before them)."""

from __future__ import annotations

import structlog

from dstore.errors import DstoreError
from dstore.master.cluster import Cluster, NodeState
from dstore.master.jobs import PeriodicJob
from dstore.master.metadata import MemberState, MetadataStore

log = structlog.get_logger("dstore.membership")


class MembershipSync(PeriodicJob):
    NAME = "membership"

    def __init__(self, meta: MetadataStore, cluster: Cluster, *, interval: float) -> None:
        super().__init__(interval, run_at_start=False)
        self.meta = meta
        self.cluster = cluster

    async def cycle(self) -> None:
        try:
            records = await self.meta.members()
        except DstoreError as exc:
            log.warning("membership_unknown", error=str(exc))
            return
        for record in records:
            member = self.cluster.members.get(record.addr)
            if record.state is MemberState.REMOVED:
                if member is not None:
                    log.info("member_removed_elsewhere", addr=record.addr)
                    await self.cluster.remove(record.addr)
            elif member is None:
                log.info("member_joined_elsewhere", addr=record.addr, state=record.state.value)
                member = self.cluster.add(record.addr)
                if record.state is MemberState.DRAINING:
                    self.cluster.drain(member)
            elif record.state is MemberState.DRAINING and member.state is not NodeState.DRAINING:
                log.info("member_drained_elsewhere", addr=record.addr)
                self.cluster.drain(member)
