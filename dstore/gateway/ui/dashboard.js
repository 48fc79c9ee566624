// The dstore dashboard: /v1/cluster and /v1/stats every 2 s, drawn as tables and SVG
// charts. No library, nothing fetched from elsewhere. With auth on, a read token is asked
// for once and kept in this tab's session storage.
"use strict";

const REFRESH_MS = 2000;
const TOKEN_KEY = "dstore-token";
const $ = (id) => document.getElementById(id);

function esc(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({
    "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;",
  })[c]);
}

function size(bytes) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let n = bytes, i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n.toFixed(0) : n.toFixed(n < 10 ? 2 : 1)) + " " + units[i];
}

function age(seconds) {
  if (seconds === null || seconds === undefined) return "never";
  if (seconds < 1) return "now";
  if (seconds < 90) return Math.round(seconds) + " s ago";
  if (seconds < 5400) return Math.round(seconds / 60) + " min ago";
  if (seconds < 129600) return Math.round(seconds / 3600) + " h ago";
  return Math.round(seconds / 86400) + " d ago";
}

function duration(seconds) {
  if (!seconds) return "—";
  if (seconds < 90) return Math.round(seconds) + " s";
  if (seconds < 5400) return Math.round(seconds / 60) + " min";
  return (seconds / 3600).toFixed(1) + " h";
}

async function fetchJson(path) {
  const headers = {};
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers["Authorization"] = "Bearer " + token;
  const response = await fetch(path, { headers, cache: "no-store" });
  if (response.status === 401 || response.status === 403) {
    const error = new Error("unauthorized");
    error.unauthorized = true;
    throw error;
  }
  if (!response.ok) throw new Error(path + ": " + response.status + " " + response.statusText);
  return response.json();
}

function drawNodes(cluster) {
  const now = Date.now() / 1000;
  const rows = cluster.nodes.map((n) => {
    const fill = n.capacity ? n.used / n.capacity : 0;
    const level = fill > 0.95 ? "full" : fill > 0.8 ? "high" : "";
    const scrub = n.scrub && n.scrub.passes !== undefined
      ? `${n.scrub.passes} ${n.scrub.passes === 1 ? "pass" : "passes"}, ${size(n.scrub.bytes_scanned || 0)} read` +
        (n.scrub.corrupt_found ? `, <span class="error">${n.scrub.corrupt_found} corrupt</span>` : "")
      : "—";
    return `<tr class="${esc(n.state)}" data-node="${esc(n.id || n.addr)}">
      <td>${esc(n.id || "?")}</td><td>${esc(n.addr)}</td><td>${esc(n.zone || "default")}</td>
      <td><span class="state ${esc(n.state)}">${esc(n.state)}</span></td>
      <td><div class="bar ${level}" title="${(fill * 100).toFixed(1)} %"><div style="width:${(fill * 100).toFixed(1)}%"></div></div></td>
      <td class="num">${size(n.used)} / ${size(n.capacity)}</td>
      <td class="num">${n.chunks}</td><td>${scrub}</td>
      <td class="num">${n.last_seen ? age(now - n.last_seen) : "never"}</td></tr>`;
  });
  $("nodes").querySelector("tbody").innerHTML = rows.join("");
}

function drawSummary(cluster, stats) {
  const up = cluster.nodes.filter((n) => n.state === "up").length;
  const last = stats.traffic.samples[stats.traffic.samples.length - 1] || {};
  $("summary").innerHTML = [
    `<span><b>${cluster.files}</b> files</span>`,
    `<span><b>${size(cluster.bytes)}</b> stored</span>`,
    `<span><b>${up}/${cluster.nodes.length}</b> nodes up</span>`,
    `<span>replicas <b>${cluster.replicas}</b></span>`,
    `<span><b>${(last.requests || 0).toFixed(1)}</b> req/s</span>`,
  ].join("");
  $("updated").textContent = "gateway " + cluster.gateway.id + " · " + new Date().toLocaleTimeString();
}

function drawRepair(cluster) {
  const r = cluster.repair || {};
  const rebalance = r.rebalance || {};
  $("repair").querySelector(".body").innerHTML = `<dl>
    <dt>queue</dt><dd id="repair-queue">${r.queue || 0} chunks, ${size(r.queue_bytes || 0)}</dd>
    <dt>ETA</dt><dd>${duration(r.eta_seconds)}</dd>
    <dt>repaired</dt><dd>${r.chunks_repaired || 0} chunks, ${size(r.bytes_repaired || 0)}</dd>
    <dt>unrecoverable</dt><dd${r.unrecoverable ? ' class="error"' : ""}>${r.unrecoverable || 0}</dd>
    <dt>rebalance</dt><dd>${esc(rebalance.state || "idle")}${rebalance.moved ? ", " + rebalance.moved + " moved" : ""}</dd>
  </dl>`;
  const gateways = cluster.gateways && cluster.gateways.length ? cluster.gateways
    : [{ id: cluster.gateway.id, leads: cluster.gateway.leads, seen: 0 }];
  $("gateways").querySelector(".body").innerHTML = `<dl>` + gateways.map((g) =>
    `<dt>${esc(g.id)}</dt><dd>${g.leads ? "leads" : "follows"}, seen ${age(g.seen)}</dd>`).join("") +
    (cluster.leader ? `<dt>epoch</dt><dd>${cluster.leader.epoch}</dd>` : "") + `</dl>`;
}

// one chart: series of [t, value] (null: no value), drawn as polylines on a time axis
function drawChart(svg, series, format) {
  const width = svg.clientWidth || 400, height = svg.clientHeight || 150;
  const left = 44, right = 8, top = 8, bottom = 18;
  const points = series.flatMap((s) => s.values.filter((p) => p[1] !== null));
  const t0 = Math.min(...series.flatMap((s) => s.values.map((p) => p[0])));
  const t1 = Math.max(...series.flatMap((s) => s.values.map((p) => p[0])));
  let max = Math.max(0, ...points.map((p) => p[1]));
  max = max > 0 ? max * 1.15 : 1;
  const x = (t) => left + (t1 > t0 ? (t - t0) / (t1 - t0) : 1) * (width - left - right);
  const y = (v) => top + (1 - v / max) * (height - top - bottom);
  let out = `<line class="axis" x1="${left}" y1="${y(0)}" x2="${width - right}" y2="${y(0)}"/>`;
  out += `<line class="axis" x1="${left}" y1="${y(max / 2)}" x2="${width - right}" y2="${y(max / 2)}" stroke-dasharray="3,3"/>`;
  out += `<text x="${left - 4}" y="${y(max / 2) + 3}" text-anchor="end">${format(max / 2)}</text>`;
  out += `<text x="${left - 4}" y="${y(0) + 3}" text-anchor="end">0</text>`;
  if (t1 > t0) {
    out += `<text x="${left}" y="${height - 4}">-${Math.round((t1 - t0) / 60)} min</text>`;
    out += `<text x="${width - right}" y="${height - 4}" text-anchor="end">now</text>`;
  }
  series.forEach((s, index) => {
    const i = s.cls || index;  // (a series may ask for its own colour: errors in red)
    let path = "", dots = "";
    for (const [t, v] of s.values) {
      if (v === null) continue;
      path += `${x(t).toFixed(1)},${y(v).toFixed(1)} `;
      dots += `<circle class="d${i}" cx="${x(t).toFixed(1)}" cy="${y(v).toFixed(1)}" r="2"/>`;
    }
    out += `<polyline class="s${i}" data-series="${esc(s.name)}" points="${path.trim()}"/>` + dots;
    out += `<text class="legend" x="${left + 6 + index * 70}" y="${top + 10}"><tspan class="k${i}">■</tspan> ${esc(s.name)}</text>`;
  });
  svg.innerHTML = out;
}

function drawCharts(stats) {
  // the sample still open is drawn once it has run half its time (a fresh one would dip),
  // or when it is the only one
  const all = stats.traffic.samples, step = stats.traffic.step;
  const open = all[all.length - 1];
  const young = open && all.length > 1 && Date.now() / 1000 - open.t < step / 2;
  const samples = young ? all.slice(0, -1) : all;
  const pick = (key, scale) => samples.map((s) => [s.t, s[key] === null ? null : s[key] * scale]);
  drawChart($("chart-requests"), [{ name: "requests", values: pick("requests", 1) }, { name: "errors", values: pick("errors", 1), cls: "e" }],
    (v) => v.toFixed(v < 10 ? 1 : 0));
  drawChart($("chart-bytes"), [{ name: "in", values: pick("bytes_in", 1e-6) }, { name: "out", values: pick("bytes_out", 1e-6) }],
    (v) => v.toFixed(v < 10 ? 1 : 0));
  drawChart($("chart-latency"), [{ name: "p50", values: pick("p50", 1000) }, { name: "p99", values: pick("p99", 1000) }],
    (v) => v.toFixed(v < 10 ? 1 : 0));
}

async function refresh() {
  try {
    const [cluster, stats] = await Promise.all([fetchJson("/v1/cluster"), fetchJson("/v1/stats")]);
    $("login").hidden = true;
    $("error").hidden = true;
    $("content").hidden = false;
    drawSummary(cluster, stats);
    drawNodes(cluster);
    drawRepair(cluster);
    drawCharts(stats);
    document.body.dataset.loaded = "yes";
  } catch (error) {
    if (error.unauthorized) {
      $("content").hidden = true;
      $("login").hidden = false;
      if (sessionStorage.getItem(TOKEN_KEY)) $("login-error").textContent = "That token was refused.";
    } else {
      $("error").hidden = false;
      $("error").textContent = "The gateway did not answer: " + error.message;
    }
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}

$("login-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
  $("login-error").textContent = "";
  $("token").value = "";
});

refresh();
