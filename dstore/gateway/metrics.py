"""Prometheus text exposition of the gateway's counters and gauges (``GET /metrics``).

Written by hand (the format is a few lines of text) rather than through a client
library: everything exported is already counted by the component that owns it."""

from __future__ import annotations

from collections import Counter

from aiohttp import web

from dstore.gateway import keys
from dstore.histogram import Histogram
from dstore.master.cluster import StorageMember

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


async def metrics(request: web.Request) -> web.StreamResponse:
    app = request.app
    http = app[keys.HTTP]
    cluster = app[keys.CLUSTER]
    repair = app[keys.REPAIRER]
    reaper = app[keys.REAPER]
    budget = app[keys.BUDGET]
    files, size = await app[keys.META].totals()
    lines: list[str] = []

    def metric(name: str, kind: str, help: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lines.append(f"{name}{labels} {value}")

    metric(
        "dstore_http_requests_total",
        "counter",
        "HTTP requests by method and status",
        [(f'{{method="{m}",status="{s}"}}', n) for (m, s), n in sorted(http.requests.items())],
    )
    metric(
        "dstore_http_received_bytes_total", "counter", "request body bytes", [("", http.bytes_in)]
    )
    metric("dstore_http_sent_bytes_total", "counter", "response body bytes", [("", http.bytes_out)])
    s3 = app[keys.S3_HTTP]
    metric(
        "dstore_s3_requests_total",
        "counter",
        "S3 API requests by method and status",
        [(f'{{method="{m}",status="{s}"}}', n) for (m, s), n in sorted(s3.requests.items())],
    )
    metric("dstore_s3_received_bytes_total", "counter", "S3 body bytes in", [("", s3.bytes_in)])
    metric("dstore_s3_sent_bytes_total", "counter", "S3 body bytes out", [("", s3.bytes_out)])
    metric("dstore_files", "gauge", "files stored", [("", files)])
    metric("dstore_file_bytes", "gauge", "bytes of files stored (one copy)", [("", size)])
    members = list(cluster.members.values())
    states = Counter(m.state.value for m in members)
    metric(
        "dstore_storage_nodes",
        "gauge",
        "storage nodes by state",
        [(f'{{state="{s}"}}', states.get(s, 0)) for s in ("up", "suspect", "down", "draining")],
    )

    def node(m: StorageMember) -> str:
        return f'{{node="{_label(m.node_id)}",addr="{_label(m.addr)}"}}'

    metric(
        "dstore_node_capacity_bytes",
        "gauge",
        "node capacity",
        [(node(m), m.capacity) for m in members],
    )
    metric(
        "dstore_node_used_bytes", "gauge", "node used bytes", [(node(m), m.used) for m in members]
    )
    metric(
        "dstore_node_volume_garbage_bytes",
        "gauge",
        "bytes of deleted small chunks awaiting compaction",
        [(node(m), m.volumes.get("garbage", 0)) for m in members],
    )
    metric("dstore_repair_queue_chunks", "gauge", "chunks waiting for repair", [("", repair.queue)])
    metric(
        "dstore_repaired_bytes_total",
        "counter",
        "bytes re-replicated",
        [("", repair.bytes_repaired)],
    )
    metric(
        "dstore_repaired_chunks_total", "counter", "chunks repaired", [("", repair.chunks_repaired)]
    )
    metric(
        "dstore_reclaimed_replicas_total",
        "counter",
        "replicas deleted by the reaper",
        [("", reaper.deleted)],
    )
    metric(
        "dstore_reaper_held_for_readers_total",
        "counter",
        "dead replicas a reaper pass kept for a download still reading them",
        [("", reaper.held_for_readers)],
    )
    metric("dstore_memory_budget_bytes", "gauge", "chunk memory in use", [("", budget.in_use)])
    cache = app[keys.DOWNLOADER].cache
    metric(
        "dstore_chunk_cache_bytes",
        "gauge",
        "small chunks held in the read cache",
        [("", cache.used)],
    )
    metric(
        "dstore_chunk_cache_lookups_total",
        "counter",
        "read cache lookups by result",
        [('{result="hit"}', cache.hits), ('{result="miss"}', cache.misses)],
    )
    scrubber = app[keys.INLINE_SCRUBBER]
    metric(
        "dstore_inline_scrub_bytes_total",
        "counter",
        "bytes of inline files checked against their checksums",
        [("", scrubber.bytes_scanned)],
    )
    metric(
        "dstore_inline_scrub_passes_total",
        "counter",
        "whole passes over the inline files",
        [("", scrubber.passes)],
    )
    metric(
        "dstore_inline_corrupt_files",
        "gauge",
        "inline files whose bytes fail their checksum",
        [("", len(scrubber.corrupt_now))],
    )
    uploader = app[keys.UPLOADER]
    metric(
        "dstore_files_stored_total",
        "counter",
        "files committed, by where their bytes went (inline: the metadata store)",
        [
            ('{kind="inline"}', uploader.stored_inline),
            ('{kind="chunked"}', uploader.stored_chunked),
        ],
    )
    lookups = app[keys.LOOKUP_CACHE]
    metric("dstore_lookup_cache_names", "gauge", "names in the lookup cache", [("", len(lookups))])
    metric(
        "dstore_lookup_cache_lookups_total",
        "counter",
        "file lookups by where they were answered",
        [('{result="hit"}', lookups.hits), ('{result="miss"}', lookups.misses)],
    )
    stats = app[keys.META].stats()
    # group commit: operations per transaction is how well it is grouping
    metric(
        "dstore_metadata_operations_total",
        "counter",
        "metadata operations run",
        [("", stats.operations)],
    )
    metric(
        "dstore_metadata_transactions_total",
        "counter",
        "metadata transactions committed (one per group of operations)",
        [("", stats.transactions)],
    )

    def histograms(name: str, help: str, found: list[tuple[str, Histogram]]) -> None:
        lines.append(f"# HELP {name} {help}")
        lines.append(f"# TYPE {name} histogram")
        for labels, histogram in found:
            lines.extend(histogram.exposition(name, labels))

    for api, counters in (("http", http), ("s3", s3)):
        histograms(
            f"dstore_{api}_request_duration_seconds",
            f"{'HTTP' if api == 'http' else 'S3 API'} request durations by method and status class",
            [(f'method="{m}",class="{c}"', h) for (m, c), h in sorted(counters.durations.items())],
        )
    addr_of = {m.node_id: m.addr for m in members}
    door = app[keys.UPLOADER].door
    histograms(
        "dstore_node_op_duration_seconds",
        "chunk operations on each node as this gateway sees them (put, get, delete)",
        [
            (f'node="{_label(n)}",addr="{_label(addr_of.get(n, ""))}",op="{op}"', h)
            for (n, op), h in sorted(door.latency.items())
        ],
    )
    histograms(
        "dstore_node_fsync_duration_seconds",
        "how long each node takes to make a write durable (fsync), as it reports",
        [(node(m)[1:-1], m.fsyncs) for m in members if m.fsyncs is not None],
    )
    body = ("\n".join(lines) + "\n").encode()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})
