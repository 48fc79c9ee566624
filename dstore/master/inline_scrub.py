"""The scrubber of files kept inline in the metadata store.

The nodes' scrubbers read every chunk; an inline file's bytes live in the metadata store
instead, so this job reads them there, a batch of versions per cycle in version order,
and checks each against its checksum. A GET checks them too before serving a byte, so
a rotten body is never served either way; this finds one before anyone asks for it, in
the log (``inline_body_corrupt``) and the metrics. There is no second copy to repair it
from: the file's bytes are as safe as its metadata, which a backup of ``meta.db`` keeps.
"""

from __future__ import annotations

import structlog

from dstore.chunk import checksum
from dstore.master.jobs import PeriodicJob
from dstore.master.metadata import MetadataStore

log = structlog.get_logger("dstore.inline_scrub")


class InlineScrubber(PeriodicJob):
    NAME = "inline-scrubber"

    def __init__(self, meta: MetadataStore, *, interval: float = 1.0, batch: int = 256) -> None:
        super().__init__(interval)
        self.meta = meta
        self.batch = batch  # versions per cycle: 256 of 4 KiB is 1 MiB a second by default
        self.cursor = 0  # the last version id checked in this pass
        self.passes = 0
        self.bytes_scanned = 0
        self.corrupt: dict[int, str] = {}  # version id -> name, as of the last whole pass
        self._found: dict[int, str] = {}  # in this pass so far

    def __repr__(self) -> str:
        return f"<InlineScrubber {self.passes} passes, {len(self.corrupt_now)} corrupt>"

    @property
    def corrupt_now(self) -> dict[int, str]:
        """Versions found corrupt in the last whole pass or in this one."""
        return self.corrupt | self._found

    async def cycle(self) -> None:
        rows = await self.meta.inline_bodies(self.cursor, self.batch)
        for version_id, name, body in rows:
            assert body.data is not None
            self.bytes_scanned += len(body.data)
            if checksum(body.data) != body.checksum:
                if version_id not in self.corrupt:
                    log.error("inline_body_corrupt", name=name, version=version_id)
                self._found[version_id] = name
        if len(rows) < self.batch:  # the end: the next cycle starts a new pass
            self.corrupt, self._found = self._found, {}
            self.cursor = 0
            self.passes += 1
        else:
            self.cursor = rows[-1][0]
