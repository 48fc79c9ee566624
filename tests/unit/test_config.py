"""Configuration: precedence flag > env > file > default, parsing, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from dstore.config import (
    GatewayConfig,
    StorageConfig,
    load,
    parse_bool,
    parse_duration,
    parse_size,
)
from dstore.errors import ConfigError

S = "s" * 16  # a cluster secret of the least length allowed


def test_sizes_and_durations() -> None:
    assert parse_size("4MiB") == 4 << 20
    assert parse_size("10GiB") == 10 << 30
    assert parse_size("1.5G") == 1_500_000_000
    assert parse_size("4096") == 4096 and parse_size(7) == 7
    assert parse_duration("10m") == 600 and parse_duration("1h30m") == 5400
    assert parse_duration("250ms") == 0.25 and parse_duration("5") == 5
    for bad in ("lots", "4XB", "-1", ""):
        with pytest.raises(ValueError):
            parse_size(bad)
    for bad in ("soon", "10x", "m10", "-3s"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_booleans_from_flags_env_and_toml() -> None:
    for yes in (True, "true", "1", "YES", " on "):
        assert parse_bool(yes) is True
    for no in (False, "false", "0", "no", "Off"):
        assert parse_bool(no) is False
    for bad in ("maybe", "", "2"):
        with pytest.raises(ValueError):
            parse_bool(bad)
    config = load(GatewayConfig, {"cluster_secret": S}, env={"DSTORE_SPLICE": "false"})
    assert config.splice is False
    with pytest.raises(ConfigError, match="DSTORE_SPLICE"):
        load(GatewayConfig, {"cluster_secret": S}, env={"DSTORE_SPLICE": "perhaps"})


def test_precedence_flag_over_env_over_file_over_default(tmp_path: Path) -> None:
    toml = tmp_path / "storage.toml"
    toml.write_text(
        'zone = "file"\nport = 7001\ncapacity = "1GiB"\ncluster_secret = "ffffffffffffffff"\n'
    )
    env = {"DSTORE_ZONE": "env", "DSTORE_PORT": "7002"}
    config = load(StorageConfig, {"zone": "flag"}, env=env, config_file=toml)
    assert config.zone == "flag"  # flag beats env and file
    assert config.port == 7002  # env beats file
    assert config.capacity == 1 << 30  # file beats default
    assert config.host == "127.0.0.1"  # default


def test_list_settings_from_env_and_file(tmp_path: Path) -> None:
    env = {"DSTORE_CLUSTER_SECRET": S, "DSTORE_STORAGE": "a:1, b:2"}
    assert load(GatewayConfig, {}, env=env).storage == ["a:1", "b:2"]
    flags = {"storage": ["c:3"]}
    assert load(GatewayConfig, flags, env=env).storage == ["c:3"]


@pytest.mark.parametrize(
    ("cls", "flags", "message"),
    [
        (StorageConfig, {}, "cluster secret"),
        (StorageConfig, {"cluster_secret": S, "capacity": "lots"}, "--capacity"),
        (StorageConfig, {"cluster_secret": S, "port": "70000"}, "port"),
        (StorageConfig, {"cluster_secret": S, "small_chunk_max": "1GiB"}, "small_chunk_max"),
        (StorageConfig, {"cluster_secret": S, "volume_size": "64KiB"}, "volume_size"),
        (GatewayConfig, {"cluster_secret": S, "listen": "0.0.0.0:8080"}, "non-loopback"),
        (GatewayConfig, {"cluster_secret": S, "listen": "nonsense"}, "host:port"),
        (GatewayConfig, {"cluster_secret": S, "replicas": "0"}, "replicas"),
        (GatewayConfig, {"cluster_secret": S, "chunk_size": "1GiB"}, "chunk size"),
        (GatewayConfig, {"cluster_secret": S, "gc_grace": "soon"}, "--gc-grace"),
        (GatewayConfig, {"cluster_secret": S, "lookup_cache": "-1"}, "lookup_cache"),
        (GatewayConfig, {"cluster_secret": S, "inline_max": "1MiB"}, "inline_max"),
        (GatewayConfig, {"cluster_secret": S, "inline_scrub_interval": "0s"}, "more than 0"),
        (GatewayConfig, {"cluster_secret": S, "reaper_interval": "0"}, "reaper_interval"),
        (GatewayConfig, {"cluster_secret": S, "inline_max": "small"}, "--inline-max"),
    ],
)
def test_bad_values_are_refused_with_a_reason(cls: type, flags: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ConfigError, match=message):
        load(cls, flags, env={})


def test_unknown_file_setting_is_refused(tmp_path: Path) -> None:
    toml = tmp_path / "g.toml"
    toml.write_text('cluster_secret = "ssssssssssssssss"\nreplicaz = 3\n')
    with pytest.raises(ConfigError, match="replicaz"):
        load(GatewayConfig, {}, env={}, config_file=toml)


def test_example_configs_load() -> None:
    root = Path(__file__).resolve().parents[2] / "configs"
    env = {"DSTORE_CLUSTER_SECRET": S}
    assert load(GatewayConfig, {}, env=env, config_file=root / "gateway.toml").replicas == 2
    assert load(StorageConfig, {}, env=env, config_file=root / "storage.toml").port == 9001


@pytest.mark.parametrize("role", ["gateway", "storage"])
def test_the_example_configs_load(role: str) -> None:
    cls = GatewayConfig if role == "gateway" else StorageConfig
    path = Path(__file__).resolve().parents[2] / "configs" / f"{role}.toml"
    config: object = load(cls, {"cluster_secret": S}, env={}, config_file=path)  # type: ignore[arg-type]
    assert isinstance(config, cls)


def test_the_cluster_secret_comes_from_a_file_and_is_long_enough(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("s" * 32 + "\n")
    config = load(StorageConfig, {"cluster_secret_file": str(secret_file)}, env={})
    config.validate()
    assert config.cluster_secret == "s" * 32
    with pytest.raises(ConfigError, match="at least 16"):
        load(StorageConfig, {"cluster_secret": "x"}, env={})
    with pytest.raises(ConfigError, match="twice"):
        load(StorageConfig, {"cluster_secret": S, "cluster_secret_file": str(secret_file)}, env={})
    with pytest.raises(ConfigError, match="cannot read"):
        load(StorageConfig, {"cluster_secret_file": str(tmp_path / "nope")}, env={})


def test_auth_tokens_come_from_a_file(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{'r' * 20}=read\n\n{'w' * 20}=read+write\n")
    config = load(
        GatewayConfig,
        {"cluster_secret": S * 16, "auth_tokens_file": str(tokens)},
        env={},
    )
    config.validate()
    assert [sorted(s.value for s in t.scopes) for t in config.auth_tokens or []] == [
        ["read"],
        ["read", "write"],
    ]


def test_tls_files_come_as_a_set_and_a_node_off_loopback_needs_them(tmp_path: Path) -> None:
    cert, key, ca = (tmp_path / n for n in ("cert.pem", "key.pem", "ca.pem"))
    for path in (cert, key, ca):
        path.write_text("-----BEGIN nothing-----\n")
    tls = {"tls_cert": str(cert), "tls_key": str(key), "tls_ca": str(ca)}
    node = {"cluster_secret": S}
    with pytest.raises(ConfigError, match="refusing to listen on non-loopback"):
        load(StorageConfig, node | {"host": "0.0.0.0"}, env={})
    insecure = load(StorageConfig, node | {"host": "0.0.0.0", "insecure_network": "true"}, env={})
    assert insecure.tls is None
    secured = load(StorageConfig, node | {"host": "10.0.0.7"} | tls, env={})
    assert secured.tls is not None and secured.tls.ca == ca
    with pytest.raises(ConfigError, match="mutual TLS"):  # a node must check its clients
        load(StorageConfig, node | {"tls_cert": str(cert), "tls_key": str(key)}, env={})
    with pytest.raises(ConfigError, match="come together"):
        load(GatewayConfig, node | {"tls_cert": str(cert)}, env={})
    with pytest.raises(ConfigError, match="needs --tls-cert"):
        load(GatewayConfig, node | {"tls_ca": str(ca)}, env={})
    with pytest.raises(ConfigError, match="not found"):
        load(GatewayConfig, node | tls | {"tls_key": str(tmp_path / "gone")}, env={})
    https = load(GatewayConfig, node | {"tls_cert": str(cert), "tls_key": str(key)}, env={})
    assert https.scheme == "https" and load(GatewayConfig, node, env={}).scheme == "http"
    # the files are read when serving starts: a bad one is a one-line error then
    with pytest.raises(ConfigError, match="cannot load TLS certificate"):
        secured.tls.server()
