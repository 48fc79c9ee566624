"""Typed keys for what the gateway keeps on its aiohttp application and requests."""

from __future__ import annotations

from aiohttp import web

from dstore.auth import AuthToken, TokenTable
from dstore.config import GatewayConfig
from dstore.gateway.budget import MemoryBudget
from dstore.gateway.counters import HttpCounters
from dstore.gateway.download import Downloader
from dstore.gateway.traffic import Traffic
from dstore.gateway.upload import Uploader
from dstore.master.cluster import Cluster
from dstore.master.inline_scrub import InlineScrubber
from dstore.master.leader import Leader
from dstore.master.metadata import LookupCache, MetadataStore
from dstore.master.reaper import ReadPins, Reaper
from dstore.master.reconcile import Reconciler
from dstore.master.repair import Repairer

CONFIG = web.AppKey("config", GatewayConfig)
HTTP = web.AppKey("http_counters", HttpCounters)
S3_HTTP = web.AppKey("s3_http_counters", HttpCounters)  # (the S3 listener's requests)
TRAFFIC = web.AppKey("traffic", Traffic)  # both APIs' recent requests, for the dashboard
META = web.AppKey("meta", MetadataStore)
LOOKUP_CACHE = web.AppKey("lookup_cache", LookupCache)
CLUSTER = web.AppKey("cluster", Cluster)
BUDGET = web.AppKey("budget", MemoryBudget)
PINS = web.AppKey("pins", ReadPins)
REAPER = web.AppKey("reaper", Reaper)
INLINE_SCRUBBER = web.AppKey("inline_scrubber", InlineScrubber)
RECONCILER = web.AppKey("reconciler", Reconciler)
REPAIRER = web.AppKey("repairer", Repairer)
LEADER = web.AppKey("leader", Leader)
# runners of other listeners over this app's services (the S3 API), stopped before them
SIDE_RUNNERS = web.AppKey("side_runners", list[web.AppRunner])
UPLOADER = web.AppKey("uploader", Uploader)
DOWNLOADER = web.AppKey("downloader", Downloader)
TOKENS = web.AppKey("tokens", TokenTable)

# per-request values the canonical log line reports
CLIENT_LEFT = web.RequestKey("client_left", bool)  # the client went before the reply ended
TRACE = web.RequestKey("trace", str)  # the request id: X-Request-Id, and "trace" in logs and frames
REQUEST_NAME = web.RequestKey("name", str)
REQUEST_BYTES_IN = web.RequestKey("bytes_in", int)
REQUEST_BYTES_OUT = web.RequestKey("bytes_out", int)  # file body bytes, as the handlers send them
REQUEST_TOKEN = web.RequestKey("token", AuthToken)  # set when auth is on
