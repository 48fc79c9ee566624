"""The dashboard (``/ui/``) in a real browser: Debian's headless Chromium, driven by
Playwright, against an in-process cluster. The page renders each node with its state,
the repair panel and the traffic charts; a node that stops turns ``down`` within the
page's own refresh; with auth on, the page asks for a read token and shows nothing
until it has one. Screenshots go to the test's tmp dir (``DSTORE_UI_SHOTS``: a folder to
keep them)."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from dstore.auth import parse_tokens
from tests.conftest import LocalCluster

CHROMIUM = "/usr/bin/chromium"
# as root, without a sandbox; nothing fetched from the (closed) network at start
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
READER = "dashboard-reader-token-0123"


def _need(what: str, found: bool) -> None:
    if not found:
        reason = f"{what} is not installed"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    _need("chromium (apt-get install chromium)", Path(CHROMIUM).exists())
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        _need("playwright (the test extra)", False)
        raise
    async with async_playwright() as p:
        launched = await p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            yield launched
        finally:
            await launched.close()


async def _shot(page: Any, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    keep = os.environ.get("DSTORE_UI_SHOTS")
    if keep:
        shutil.copy(path, Path(keep) / path.name)


async def test_the_dashboard_shows_nodes_and_charts_and_a_node_going_down(
    make_cluster: Callable[..., Awaitable[LocalCluster]], browser: Any, tmp_path: Path
) -> None:
    cluster = await make_cluster(down_after=3)
    for i in range(12):  # traffic for the charts: writes and reads
        assert (await cluster.put(f"photos/{i}.jpg", os.urandom(100_000 + i))).status == 201
        assert (await cluster.get(f"photos/{i}.jpg"))[0].status == 200
    assert cluster.session is not None
    async with cluster.session.get(f"{cluster.url}/ui", allow_redirects=False) as response:
        assert response.status == 302 and response.headers["Location"] == "/ui/"
    async with cluster.session.get(f"{cluster.url}/ui/app.py") as response:
        assert response.status == 404  # (the page's own three files, nothing else)
    page = await browser.new_page(viewport={"width": 1400, "height": 900})
    await page.goto(f"{cluster.url}/ui")
    await page.wait_for_selector("body[data-loaded=yes]", timeout=10_000)
    rows = page.locator("#nodes tbody tr")
    assert await rows.count() == 3
    ids = {n.node_id for n in cluster.nodes}
    shown = {await rows.nth(i).get_attribute("data-node") for i in range(3)}
    assert shown == ids
    for i in range(3):
        assert (await rows.nth(i).locator(".state").inner_text()) == "up"
    assert "12" in await page.locator("#summary").inner_text()  # files stored
    assert "3/3" in await page.locator("#summary").inner_text()
    assert "0 chunks" in await page.locator("#repair-queue").inner_text()
    # the charts are drawn from the gateway's own samples: a line with points in each
    # (at a refresh; a sample still young is drawn only when it is the only one)
    for chart in ("requests", "bytes", "latency"):
        await page.wait_for_function(
            f"(document.querySelector('#chart-{chart} polyline')"
            " ?.getAttribute('points') || '').trim().length > 0",
            timeout=15_000,
        )
    await _shot(page, tmp_path, "dashboard")
    # a node stops: its row turns down at one of the page's refreshes
    victim = cluster.nodes[0]
    await victim.stop()
    await page.wait_for_selector(f'tr[data-node="{victim.node_id}"].down', timeout=15_000)
    assert "2/3" in await page.locator("#summary").inner_text()
    await _shot(page, tmp_path, "dashboard-node-down")


async def test_with_auth_the_dashboard_asks_for_a_read_token(
    make_cluster: Callable[..., Awaitable[LocalCluster]], browser: Any, tmp_path: Path
) -> None:
    cluster = await make_cluster(auth_tokens=parse_tokens(f"{READER}=read"))
    page = await browser.new_page()
    await page.goto(f"{cluster.url}/ui/")
    await page.wait_for_selector("#login:not([hidden])", timeout=10_000)
    assert await page.locator("#content").is_hidden()
    assert await page.locator("#nodes tbody tr").count() == 0  # no data without a token
    await page.fill("#token", "not-a-token-not-a-token")
    await page.click("button[type=submit]")
    await page.wait_for_selector("#login-error:has-text('refused')", timeout=10_000)
    await page.fill("#token", READER)
    await page.click("button[type=submit]")
    await page.wait_for_selector("body[data-loaded=yes]", timeout=10_000)
    assert await page.locator("#nodes tbody tr").count() == 3
    # kept in this tab's session only
    assert await page.evaluate("sessionStorage.getItem('dstore-token')") == READER
    assert await page.evaluate("localStorage.length") == 0
    await _shot(page, tmp_path, "dashboard-login")
