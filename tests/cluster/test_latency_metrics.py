"""Latency where operators look for it: request duration histograms by method and status
class, each node's put/get/delete latency as the gateway sees it, the nodes' own fsync
latency (reported in their stat), the dashboard's ring buffer at /v1/stats, and the
Grafana dashboard in configs/ asking only for metrics that exist."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Awaitable, Callable

from tests.conftest import ROOT, LocalCluster, wait_for


async def _metrics(cluster: LocalCluster) -> str:
    assert cluster.session is not None
    async with cluster.session.get(f"{cluster.url}/metrics") as response:
        return await response.text()


async def test_latency_histograms_for_requests_nodes_and_fsyncs(
    make_cluster: Callable[..., Awaitable[LocalCluster]],
) -> None:
    cluster = await make_cluster(chunk_size=512 << 10)
    for i in range(5):
        assert (await cluster.put(f"f{i}", os.urandom(600_000))).status == 201
        assert (await cluster.get(f"f{i}"))[0].status == 200
    assert (await cluster.get("missing"))[0].status == 404
    assert cluster.session is not None
    async with cluster.session.delete(cluster.file_url("f0")) as response:
        assert response.status == 204

    async def fsyncs_reported() -> bool:  # (each node's, with its next heartbeat)
        assert cluster.session is not None
        async with cluster.session.get(f"{cluster.url}/v1/cluster") as response:
            nodes = (await response.json())["nodes"]
        return all(n["fsync"] and n["fsync"]["count"] > 0 for n in nodes)

    await wait_for(fsyncs_reported)
    text = await _metrics(cluster)
    assert "# TYPE dstore_http_request_duration_seconds histogram" in text
    assert re.search(
        r'dstore_http_request_duration_seconds_count\{method="PUT",class="2xx"\} 5', text
    )
    assert re.search(
        r'dstore_http_request_duration_seconds_count\{method="GET",class="4xx"\} 1', text
    )
    assert 'le="+Inf"' in text
    for node in cluster.nodes:
        assert re.search(
            rf'dstore_node_op_duration_seconds_count\{{node="{node.node_id}",[^}}]*op="put"\}} \d+',
            text,
        ), node.node_id
        match = re.search(
            rf'dstore_node_fsync_duration_seconds_count\{{node="{node.node_id}"[^}}]*\}} (\d+)',
            text,
        )
        assert match and int(match.group(1)) > 0
    assert re.search(r'dstore_node_op_duration_seconds_count\{[^}]*op="get"\} [1-9]', text)
    async with cluster.session.get(f"{cluster.url}/v1/cluster") as response:
        nodes = (await response.json())["nodes"]
    assert all(n["fsync"]["count"] > 0 and n["fsync"]["p99"] > 0 for n in nodes)
    async with cluster.session.get(f"{cluster.url}/v1/stats") as response:
        traffic = (await response.json())["traffic"]
    assert traffic["step"] > 0
    assert sum(s["requests"] for s in traffic["samples"]) > 0
    assert any(s["p99"] for s in traffic["samples"])


async def test_the_grafana_dashboard_asks_for_metrics_that_exist(
    make_cluster: Callable[..., Awaitable[LocalCluster]],
) -> None:
    cluster = await make_cluster()
    text = await _metrics(cluster)
    exported = set(re.findall(r"^# TYPE (\w+)", text, re.M))
    dashboard = json.loads((ROOT / "configs" / "grafana-dashboard.json").read_text())
    asked = {
        re.sub(r"_(bucket|count|sum)$", "", name)
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\bdstore_\w+", target["expr"])
    }
    assert asked and asked <= exported, asked - exported
    assert "127.0.0.1:8080" in (ROOT / "configs" / "prometheus.yml").read_text()
