"""Bearer tokens with scopes (SPEC §2): 401 without a good token, 403 without the scope."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from dstore.auth import Scope, TokenTable, parse_tokens
from dstore.config import GatewayConfig, load
from dstore.errors import ConfigError, Forbidden, Unauthorized
from tests.conftest import ROOT, LocalCluster

READER = "r" * 20
WRITER = "w" * 20
ADMIN = "a" * 20
TOKENS = parse_tokens(f"{READER}=read,{WRITER}=write,{ADMIN}=admin+read+write")
MakeCluster = Callable[..., Awaitable[LocalCluster]]


# --- the pure part ----------------------------------------------------------------------


def test_tokens_parse_from_toml_tables_and_from_the_string_form() -> None:
    tables = parse_tokens(
        [
            {"name": "ci", "token": "x" * 16, "scopes": ["read", "write"]},
            {"token": "y" * 16, "scopes": ["admin"]},
        ]
    )
    assert [(t.name, t.scopes) for t in tables] == [
        ("ci", frozenset({Scope.READ, Scope.WRITE})),
        ("token-2", frozenset({Scope.ADMIN})),
    ]
    assert [t.scopes for t in TOKENS] == [
        {Scope.READ},
        {Scope.WRITE},
        {Scope.ADMIN, Scope.READ, Scope.WRITE},
    ]
    assert "r" * 16 not in repr(TOKENS) and "digest" not in repr(TOKENS[0])


@pytest.mark.parametrize(
    "bad",
    [
        "short=read",  # under 16 characters
        f"{READER}=root",  # no such scope
        f"{READER}=",  # no scope
        f"{READER}=read,{READER}=write",  # the same token twice
        READER,  # no scopes at all
        [{"scopes": ["read"]}],  # no token
        [{"token": READER, "scopes": "read"}],  # scopes not a list
    ],
)
def test_bad_token_settings_are_refused(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_tokens(bad)


def test_token_table_checks_the_header_and_the_scope() -> None:
    table = TokenTable(TOKENS)
    assert table.check(f"Bearer {READER}", Scope.READ) == TOKENS[0]
    assert table.check(f"bearer  {ADMIN} ", Scope.ADMIN) == TOKENS[2]
    for header in (None, "", "Bearer", f"Basic {READER}", "Bearer " + "z" * 20):
        with pytest.raises(Unauthorized):
            table.check(header, Scope.READ)
    with pytest.raises(Forbidden):
        table.check(f"Bearer {READER}", Scope.WRITE)
    assert TokenTable([]).check(None, Scope.ADMIN) is None  # auth off


def test_tokens_come_from_a_toml_file_and_allow_a_public_listen(tmp_path: Path) -> None:
    config_file = tmp_path / "gw.toml"
    config_file.write_text(
        'listen = "0.0.0.0:8080"\ncluster_secret = "ssssssssssssssss"\n'
        f'[[auth.tokens]]\nname = "ops"\ntoken = "{ADMIN}"\nscopes = ["admin"]\n'
    )
    config = load(GatewayConfig, {}, env={}, config_file=config_file)
    assert config.auth_tokens is not None
    assert [t.name for t in config.auth_tokens] == ["ops"]
    with pytest.raises(ConfigError, match="non-loopback"):
        load(GatewayConfig, {"listen": "0.0.0.0:8080", "cluster_secret": "s" * 16}, env={})
    with pytest.raises(ConfigError, match="DSTORE_AUTH_TOKENS"):
        load(GatewayConfig, {"cluster_secret": "s" * 16}, env={"DSTORE_AUTH_TOKENS": "x=read"})


# --- the gateway --------------------------------------------------------------------------


async def status(
    cluster: LocalCluster, method: str, path: str, token: str | None, **kw: Any
) -> int:
    assert cluster.session is not None
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with cluster.session.request(method, cluster.url + path, headers=headers, **kw) as r:
        await r.read()
        if r.status == 401:
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
            assert (await r.json())["error"]["code"] == "unauthorized"
        if r.status == 403:
            assert (await r.json())["error"]["code"] == "forbidden"
        return r.status


async def test_each_route_needs_its_scope(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster(auth_tokens=TOKENS)
    f = "/v1/files/doc"
    assert await status(cluster, "PUT", f, None, data=b"x") == 401
    assert await status(cluster, "PUT", f, "not-a-configured-token!", data=b"x") == 401
    assert await status(cluster, "PUT", f, READER, data=b"x") == 403
    assert await status(cluster, "PUT", f, WRITER, data=b"x") == 201
    for path in (f, "/v1/files", "/v1/cluster", "/metrics"):
        assert await status(cluster, "GET", path, None) == 401
        assert await status(cluster, "GET", path, WRITER) == 403
        assert await status(cluster, "GET", path, READER) == 200
    assert await status(cluster, "HEAD", f, READER) == 200
    assert await status(cluster, "DELETE", f, READER) == 403
    assert await status(cluster, "DELETE", f, WRITER) == 204
    for path in ("/healthz", "/readyz"):
        assert await status(cluster, "GET", path, None) == 200
    assert await status(cluster, "POST", "/v1/cluster/rebalance", WRITER) == 403
    assert await status(cluster, "POST", "/v1/cluster/rebalance", ADMIN) in (200, 202)
    node_id = cluster.nodes[2].node_id
    assert await status(cluster, "DELETE", f"/v1/cluster/nodes/{node_id}", READER) == 403
    assert await status(cluster, "DELETE", f"/v1/cluster/nodes/{node_id}", ADMIN) == 202
    assert await status(cluster, "GET", "/nowhere", None) == 404


async def test_nodes_join_with_their_proof_and_operators_with_an_admin_token(
    make_cluster: MakeCluster, start_node: Any
) -> None:
    from dstore.client import join_cluster
    from tests.conftest import SECRET

    cluster = await make_cluster(auth_tokens=TOKENS)
    joiner = await start_node("joiner")
    joined = await join_cluster(cluster.url, joiner.addr, SECRET.encode(), attempts=1)
    assert joined["addr"] == joiner.addr  # no token: the cluster secret is its credential
    other = await start_node("other")
    body = {"addr": other.addr}
    assert await status(cluster, "POST", "/v1/cluster/nodes", WRITER, json=body) == 403
    assert await status(cluster, "POST", "/v1/cluster/nodes", None, json=body) == 400
    assert await status(cluster, "POST", "/v1/cluster/nodes", ADMIN, json=body) == 201


async def test_the_cli_sends_its_token(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster(auth_tokens=TOKENS)
    env = dict(os.environ, PYTHONPATH=str(ROOT), DSTORE_URL=cluster.url)

    def dstore(*args: str, token: str | None) -> subprocess.CompletedProcess[bytes]:
        extra = {"DSTORE_TOKEN": token} if token else {}
        return subprocess.run(
            [sys.executable, "-m", "dstore", *args], capture_output=True, env=env | extra
        )

    ok = await asyncio.to_thread(dstore, "ls", token=READER)
    assert ok.returncode == 0, ok.stderr
    refused = await asyncio.to_thread(dstore, "ls", token=None)
    assert refused.returncode != 0
    (line,) = refused.stderr.decode().strip().splitlines()
    assert "401" in line and "bearer token" in line
