"""How the CLI shows things to people: aligned tables with human sizes and ages, one-line
summaries, and progress bars with rate and ETA, drawn by ``rich`` (on a terminal in
colour; in a pipe as plain text, with no progress bar). ``--json`` bypasses all of it.
Pure but for the console it writes to."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from email.utils import parsedate_to_datetime
from typing import Any

from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.progress import Progress as Bars
from rich.table import Table

STATE_STYLES = {"up": "green", "suspect": "yellow", "down": "bold red", "draining": "cyan"}


def console(stderr: bool = False) -> Console:
    """A terminal's own width; into a pipe or a file, as wide as the lines are (a
    script's ``grep`` must see whole names, not a cut at 80 columns)."""
    probe = Console(stderr=stderr)
    width = None if probe.is_terminal else 100_000
    return Console(stderr=stderr, highlight=False, soft_wrap=False, width=width)


def size(n: float | None) -> str:
    """1536 → '1.5 KiB'."""
    if n is None:
        return "-"
    value, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(value) < 1024 or unit == "PiB":
            break
        value /= 1024
    return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"


def age(seconds: float | None) -> str:
    """Seconds ago as people say it: 'now', '42 s ago', '3 min ago', '5 h ago', '2 d ago'."""
    if seconds is None:
        return "never"
    if seconds < 1:
        return "now"
    for limit, unit, per in ((90, "s", 1), (5400, "min", 60), (129600, "h", 3600)):
        if seconds < limit:
            return f"{seconds / per:.0f} {unit} ago"
    return f"{seconds / 86400:.0f} d ago"


def rate(bytes_per_second: float) -> str:
    return f"{bytes_per_second / 1e6:.1f} MB/s"


def put_line(result: Mapping[str, Any], seconds: float) -> str:
    """``put``'s one line: name, size, chunks, rate."""
    chunks = result.get("chunks", 0)
    where = "inline" if not chunks else f"{chunks} chunk{'s' if chunks != 1 else ''}"
    speed = rate(result["size"] / seconds) if seconds > 0 else "-"
    return f"put {result['name']}  {size(result['size'])}  {where}  {speed}"


def cluster_view(info: Mapping[str, Any], out: Console) -> None:
    now = time.time()
    nodes = info["nodes"]
    up = sum(n["state"] == "up" for n in nodes)
    gateway = info.get("gateway", {})
    out.print(
        f"[bold]{info['files']}[/] files, [bold]{size(info['bytes'])}[/] stored;"
        f" [bold]{up}/{len(nodes)}[/] nodes up; replicas {info['replicas']};"
        f" gateway {gateway.get('id', '?')}{' (leads)' if gateway.get('leads') else ''}"
    )
    zones = {n.get("zone") or "default" for n in nodes} != {"default"}
    wide = out.width >= 92 + 8 * zones  # (on a narrow terminal the addresses go first)
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    columns = ["node", *(["address"] if wide else []), *(["zone"] if zones else [])]
    columns += ["state", "used", "capacity"]
    columns += ["chunks", "scrubs", "last seen"]
    for column in columns:
        right = column in ("used", "capacity", "chunks", "scrubs", "last seen")
        table.add_column(column, justify="right" if right else "left", no_wrap=True)
    for n in nodes:
        fill = n["used"] / n["capacity"] if n["capacity"] else 0.0
        scrub = n.get("scrub") or {}
        scrubbed = str(scrub.get("passes", "-"))
        if scrub.get("corrupt_found"):
            scrubbed += f" [red]({scrub['corrupt_found']} corrupt)[/]"
        style = STATE_STYLES.get(n["state"], "")
        row = [
            n["id"] or "?",
            *([n["addr"]] if wide else []),
            *([n.get("zone") or "default"] if zones else []),
            f"[{style}]{n['state']}[/]" if style else n["state"],
            f"{size(n['used'])} ({fill * 100:.0f}%)",
            size(n["capacity"]),
            str(n["chunks"]),
            scrubbed,
            age(now - n["last_seen"]) if n.get("last_seen") else "never",
        ]
        table.add_row(*row)
    out.print(table)
    repair = info.get("repair") or {}
    rebalance = repair.get("rebalance") or {}
    line = (
        f"repair: {repair.get('queue', 0)} chunks queued ({size(repair.get('queue_bytes', 0))}),"
        f" {repair.get('chunks_repaired', 0)} repaired"
    )
    if repair.get("eta_seconds"):
        line += f", ETA {repair['eta_seconds']:.0f} s"
    if repair.get("unrecoverable"):
        line += f", [red]{repair['unrecoverable']} unrecoverable[/]"
    line += f"; rebalance {rebalance.get('state', 'idle')}"
    out.print(line)
    gateways = info.get("gateways") or []
    if len(gateways) > 1:
        out.print(
            "gateways: "
            + ", ".join(f"{g['id']}{' (leads)' if g['leads'] else ''}" for g in gateways)
        )


def stat_view(name: str, headers: Mapping[str, str], out: Console) -> None:
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    length = headers.get("Content-Length")
    table.add_row("name", name)
    if length is not None and length.isdigit():
        table.add_row("size", f"{size(int(length))} ({int(length):,} bytes)")
    modified = headers.get("Last-Modified")
    if modified:
        try:
            when = parsedate_to_datetime(modified).timestamp()
            table.add_row("modified", f"{modified} ({age(time.time() - when)})")
        except (TypeError, ValueError):
            table.add_row("modified", modified)
    for label, header in (("type", "Content-Type"), ("etag", "ETag")):
        if headers.get(header):
            table.add_row(label, headers[header])
    for header, value in headers.items():
        lower = header.lower()
        if lower.startswith("x-amz-meta-") or lower in (
            "cache-control",
            "content-disposition",
            "content-encoding",
            "content-language",
            "expires",
        ):
            table.add_row(lower, value)
    out.print(table)


def listing_view(rows: Iterable[Mapping[str, Any]], out: Console) -> None:
    """``ls -l``: size, age and name of each file; folders (common prefixes) as DIR."""
    now = time.time()
    table = Table(box=None, show_header=True, pad_edge=False, header_style="bold")
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("modified", justify="right", no_wrap=True)
    table.add_column("etag", no_wrap=True)
    table.add_column("name", overflow="fold")
    for row in rows:
        if "prefix" in row:
            table.add_row("DIR", "", "", row["prefix"])
        else:
            table.add_row(
                size(row["size"]), age(now - row["created"]), row["etag"].strip('"'), row["name"]
            )
    out.print(table)


def fsck_view(files: Sequence[Mapping[str, Any]], totals: Mapping[str, Any], out: Console) -> None:
    if files:
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
        for column in ("file", "state", "size", "chunks", "missing", "corrupt", "lost chunks"):
            table.add_column(column, justify="left" if column in ("file", "state") else "right")
        for f in files:
            style = "bold red" if f["state"] == "unrecoverable" else "yellow"
            table.add_row(
                f["name"],
                f"[{style}]{f['state']}[/]",
                size(f["size"]),
                str(f["chunks"]),
                str(f["missing_replicas"]),
                str(f["corrupt_replicas"]),
                str(f["lost_chunks"]),
            )
        out.print(table)
    lost = totals["unrecoverable"]
    out.print(
        f"{totals['files']} files ({size(totals['bytes'])}, {totals['chunks']} chunks):"
        f" {totals['healthy']} healthy, {totals['under_replicated']} under-replicated,"
        f" {'[bold red]' if lost else ''}{lost} unrecoverable{'[/]' if lost else ''};"
        f" {totals['missing_replicas']} replicas missing, {totals['corrupt_replicas']} corrupt"
        + (
            f"; {size(totals['verified_bytes'])} read and checked"
            if totals["verified_bytes"]
            else ""
        )
        + (
            f"; nodes not checked: {', '.join(totals['nodes_down'])}"
            if totals["nodes_down"]
            else ""
        )
        + f" ({totals['seconds']:.1f} s)"
    )


class Progress:
    """A transfer's progress bar on stderr (bytes, rate, ETA when the size is known),
    only when stderr is a terminal."""

    def __init__(self, label: str, total: int | None, enabled: bool | None = None) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.started = time.monotonic()
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._bars: Bars | None = None
        self._task: Any = None

    def _start(self) -> None:
        self._bars = Bars(
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console(stderr=True),
            transient=False,
        )
        self._bars.start()
        self._task = self._bars.add_task(self.label, total=self.total)

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        if self._bars is None:
            self._start()
        assert self._bars is not None
        self._bars.update(self._task, completed=self.done, total=self.total)

    def close(self) -> None:
        if self._bars is not None:
            self._bars.update(self._task, completed=self.done, total=self.total or self.done)
            self._bars.stop()
            self._bars = None
