"""What a hostile or careless HTTP client sends gets a clean 4xx (never a 500 with a
traceback), and the gateway says what it knows in its headers and log lines."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable

import pytest
import structlog

from dstore.auth import parse_tokens
from dstore.log import configure
from dstore.protocol.handshake import join_proof
from tests.conftest import LocalCluster

MakeCluster = Callable[..., Awaitable[LocalCluster]]
WRITER = "w" * 20


async def test_a_range_of_thousands_of_digits_is_answered_not_crashed(
    cluster: LocalCluster,
) -> None:
    await cluster.put("f", b"0123456789")
    huge = "9" * 4300
    for header, status in [
        (f"bytes={huge}-", 416),  # starts past the end
        (f"bytes=0-{huge}", 206),  # to the end
        (f"bytes=-{huge}", 206),  # the last (more than all) bytes: all of them
        (f"bytes={'9' * 4000}-{'9' * 4001}", 416),
    ]:
        response, body = await cluster.get("f", headers={"Range": header})
        assert response.status == status, (header[:20], response.status, body[:200])


async def test_a_prefix_ending_below_the_surrogates_lists_its_names(
    cluster: LocalCluster,
) -> None:
    """U+D7FF is the last code point before the surrogates: the listing's upper bound (the
    prefix with its last character bumped) must skip them, not bind one (a 500 before)."""
    for name in ("\ud7ff/a", "\ud7ffb", "\ue000"):
        assert (await cluster.put(name, b"x")).status == 201
    assert cluster.session is not None
    async with cluster.session.get(f"{cluster.url}/v1/files?prefix=%ED%9F%BF") as response:
        assert response.status == 200
        assert [f["name"] for f in (await response.json())["files"]] == ["\ud7ff/a", "\ud7ffb"]


async def test_absurd_join_bodies_are_a_400(cluster: LocalCluster) -> None:
    assert cluster.session is not None
    url = f"{cluster.url}/v1/cluster/nodes"
    addr = "127.0.0.1:1"
    bodies = [
        json.dumps({"addr": addr, "time": 10**400, "proof": join_proof(b"x", addr, 0)}),
        json.dumps({"addr": addr, "time": 1.5e308, "proof": "x"}),
        "[" * 100_000 + "]" * 100_000,
        '{"addr": ' + "[" * 50_000 + "]" * 50_000 + "}",
    ]
    for body in bodies:
        async with cluster.session.post(url, data=body) as response:
            assert response.status == 400, (body[:40], response.status)
            assert b"Traceback" not in await response.read()


async def test_two_authorization_headers_are_a_400(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster(auth_tokens=parse_tokens(f"{WRITER}=read+write"))
    assert cluster.session is not None
    headers = [("Authorization", f"Bearer {WRITER}"), ("Authorization", "Bearer nope")]
    async with cluster.session.get(cluster.file_url("f"), headers=headers) as response:
        assert response.status == 400


async def test_names_with_invisible_characters_are_refused(cluster: LocalCluster) -> None:
    for name in ["report\u202egpj.exe", "a\u200bb", "\ufeffname", "x\u2066y"]:
        response = await cluster.put(name, b"x")
        assert response.status == 400, name
        assert (await response.json())["error"]["code"] == "bad_name"


async def test_every_response_forbids_content_sniffing(cluster: LocalCluster) -> None:
    await cluster.put(
        "page.html", b"<script>alert(1)</script>", headers={"Content-Type": "text/html"}
    )
    for name in ("page.html", "missing"):
        response, _ = await cluster.get(name)
        assert response.headers["X-Content-Type-Options"] == "nosniff"


async def test_a_client_gone_mid_upload_is_a_499_in_the_log_and_the_token_is_named(
    make_cluster: MakeCluster,
) -> None:
    cluster = await make_cluster(auth_tokens=parse_tokens(f"{WRITER}=read+write"))
    configure("console", "info")  # the canonical line is an info line
    try:
        with structlog.testing.capture_logs() as logs:
            _, writer = await asyncio.open_connection("127.0.0.1", cluster.port)
            writer.write(
                b"PUT /v1/files/gone HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n"
                + f"Authorization: Bearer {WRITER}\r\n\r\n".encode()
                + os.urandom(70_000)
            )
            await writer.drain()
            await asyncio.sleep(0)
            writer.close()
            for _ in range(200):
                if any(e["event"] == "http_request" for e in logs):
                    break
                await asyncio.sleep(0.05)
    finally:
        configure("console", "warning")
    (line,) = [e for e in logs if e["event"] == "http_request"]
    assert line["status"] == 499 and line["token"] == "token-1"
    assert not [e for e in logs if e["event"] == "request_failed"]
    assert cluster.app is not None


async def test_an_unparsable_header_is_never_echoed_or_logged(
    cluster: LocalCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """aiohttp's own 400 quoted the offending bytes (here a token) in its body and log."""
    secret = "s3cr3t-" + "x" * 9000  # past aiohttp's 8190-byte field limit
    reader, writer = await asyncio.open_connection("127.0.0.1", cluster.port)
    with structlog.testing.capture_logs() as logs:
        head = f"GET /v1/files/f HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {secret}\r\n\r\n"
        writer.write(head.encode())
        await writer.drain()
        reply = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert reply.startswith(b"HTTP/1.") and b" 400 " in reply[:16] and b"bad_request" in reply
    assert b"s3cr3t" not in reply
    assert "s3cr3t" not in caplog.text and "s3cr3t" not in repr(logs)
    assert [e["event"] for e in logs] == ["http_unparsable"]
