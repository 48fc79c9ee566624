"""Typed configuration for both roles: flag > ``DSTORE_<FLAG>`` env > TOML file > default,
parsed and validated once at start-up. A bad value is a ``ConfigError`` with a one-line reason.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from dstore.auth import AuthToken, S3Key, parse_s3_keys, parse_tokens
from dstore.errors import ConfigError
from dstore.tls import TlsFiles

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgtp]?i?b?)?\s*", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "ki": 1024,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mi": 1024**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gi": 1024**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ti": 1024**4,
    "tib": 1024**4,
    "p": 1000**5,
    "pb": 1000**5,
    "pi": 1024**5,
    "pib": 1024**5,
}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_size(value: object) -> int:
    """``4MiB``, ``10GiB``, ``1.5G``, ``4096`` → bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        result = value
    else:
        match = _SIZE.fullmatch(str(value))
        if not match or (match.group(2) or "").lower() not in _UNITS:
            raise ValueError(f"not a size: {value!r} (try 4MiB, 10GiB)")
        result = int(float(match.group(1)) * _UNITS[(match.group(2) or "").lower()])
    if result < 0:
        raise ValueError(f"size must not be negative: {value!r}")
    return result


def parse_duration(value: object) -> float:
    """``10m``, ``30s``, ``1h30m``, ``250ms``, ``5`` (seconds) → seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        result = float(value)
    else:
        text = str(value).strip()
        try:
            result = float(text)
        except ValueError:
            parts = _DURATION.findall(text)
            if not parts or "".join(n + u for n, u in parts) != text:
                raise ValueError(f"not a duration: {value!r} (try 10m, 30s)") from None
            result = sum(float(n) * _SECONDS[u] for n, u in parts)
    if result < 0:
        raise ValueError(f"duration must not be negative: {value!r}")
    return result


def parse_hostport(value: object) -> tuple[str, int]:
    text = str(value)
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"not host:port: {value!r}")
    return host.strip("[]"), int(port)


def parse_bool(value: object) -> bool:
    """``true``/``false`` (also ``1``/``0``, ``yes``/``no``, ``on``/``off``)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {value!r} (try true or false)")


def parse_list(value: object) -> list[str]:
    if isinstance(value, list):
        return [str(v) for v in value]
    return [v.strip() for v in str(value).split(",") if v.strip()]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


MIN_SECRET_LENGTH = 16


def _secret(value: str, path: Path | None) -> str:
    """The cluster secret, from its value or its file (not both), at least
    ``MIN_SECRET_LENGTH`` characters."""
    if path is not None:
        if value:
            raise ConfigError("cluster secret given twice: both a file and a value")
        try:
            value = path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the cluster secret file: {exc}") from exc
    if not value:
        raise ConfigError(
            "cluster secret missing: set --cluster-secret-file, --cluster-secret or"
            " DSTORE_CLUSTER_SECRET"
        )
    if len(value) < MIN_SECRET_LENGTH:
        raise ConfigError(f"the cluster secret must be at least {MIN_SECRET_LENGTH} characters")
    return value


def _tls(cert: Path | None, key: Path | None, ca: Path | None) -> TlsFiles | None:
    """The TLS files given, checked to come as a set: a certificate with its key, and a
    CA only beside them (it is what the cluster's certificates are checked against)."""
    if cert is None and key is None:
        if ca is not None:
            raise ConfigError("--tls-ca needs --tls-cert and --tls-key as well")
        return None
    if cert is None or key is None:
        raise ConfigError("--tls-cert and --tls-key come together")
    for path in (cert, key, ca):
        if path is not None and not path.is_file():
            raise ConfigError(f"TLS file not found: {path}")
    return TlsFiles(cert, key, ca)


def _opt(default: Any, parse: Callable[[Any], Any], help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"parse": parse, "help": help, **kw})


@dataclass
class StorageConfig:
    host: str = _opt("127.0.0.1", str, "address to listen on")
    port: int = _opt(9000, int, "TCP port for the cluster protocol (0: any free port)")
    data_dir: Path = _opt(Path("./data/storage"), Path, "where chunks are kept")
    capacity: int | None = _opt(None, parse_size, "bytes this node may hold (default: free disk)")
    zone: str = _opt("default", str, "failure domain of this node")
    join: str | None = _opt(None, str, "gateway URL to register with at start")
    cluster_secret: str = _opt("", str, "shared secret between gateway and nodes")
    cluster_secret_file: Path | None = _opt(
        None, Path, "file holding the cluster secret (keeps it out of ps and the environment)"
    )
    grace: float = _opt(10.0, parse_duration, "time to finish in-flight requests on SIGTERM")
    io_timeout: float = _opt(30.0, parse_duration, "timeout on each network read or write")
    max_chunk_size: int = _opt(256 << 20, parse_size, "largest chunk this node accepts")
    scrub_rate: int = _opt(
        8 << 20, parse_size, "bytes per second the scrubber re-reads and verifies (0: off)"
    )
    scrub_pause: float = _opt(60.0, parse_duration, "rest between two full scrub passes")
    small_chunk_max: int = _opt(
        256 << 10, parse_size, "chunks up to this size go to volume files (0: none)"
    )
    volume_size: int = _opt(64 << 20, parse_size, "size at which a new volume file is started")
    tls_cert: Path | None = _opt(None, Path, "TLS certificate (PEM) for node links")
    tls_key: Path | None = _opt(None, Path, "private key of --tls-cert (PEM)")
    tls_ca: Path | None = _opt(
        None, Path, "CA that signs the cluster's certificates (links are mutual TLS)"
    )
    insecure_network: bool = _opt(
        False, parse_bool, "allow a non-loopback --host without TLS (trusted networks only)"
    )
    log_format: str = _opt("auto", str, "auto, json or console")
    log_level: str = _opt("info", str, "debug, info, warning, error")

    @property
    def tls(self) -> TlsFiles | None:
        return _tls(self.tls_cert, self.tls_key, self.tls_ca)

    def validate(self) -> None:
        self.cluster_secret = _secret(self.cluster_secret, self.cluster_secret_file)
        self.cluster_secret_file = None  # read: validating again finds the value alone
        tls = self.tls
        if tls is not None and tls.ca is None:
            raise ConfigError("node links are mutual TLS: --tls-ca is needed with --tls-cert")
        if tls is None and not is_loopback(self.host) and not self.insecure_network:
            raise ConfigError(
                f"refusing to listen on non-loopback {self.host} without TLS"
                " (give --tls-cert, --tls-key and --tls-ca, or --insecure-network)"
            )
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port {self.port} out of range")
        if self.capacity is not None and self.capacity <= 0:
            raise ConfigError("capacity must be positive")
        if not 0 <= self.small_chunk_max <= 16 << 20:
            raise ConfigError("small_chunk_max must be between 0 and 16 MiB")
        if self.volume_size < 1 << 20:
            raise ConfigError("volume_size must be at least 1 MiB")


@dataclass
class GatewayConfig:
    listen: str = _opt("127.0.0.1:8080", str, "HTTP address to listen on (host:port)")
    data_dir: Path = _opt(Path("./data/gateway"), Path, "where the metadata database lives")
    gateway_id: str | None = _opt(
        None, str, "this gateway's name among those sharing a database (default: host/listen/pid)"
    )
    metadata: str | None = _opt(
        None,
        str,
        "metadata engine: a postgresql:// URL (several gateways share it); default SQLite"
        " in the data dir",
    )
    storage: list[str] = _opt(None, str, "storage node host:port", many=True)
    replicas: int = _opt(2, int, "copies of every chunk")
    chunk_size: int = _opt(4 << 20, parse_size, "size of the chunks files are cut into")
    gc_grace: float = _opt(600.0, parse_duration, "how long unreferenced chunks may linger")
    cluster_secret: str = _opt("", str, "shared secret between gateway and nodes")
    cluster_secret_file: Path | None = _opt(
        None, Path, "file holding the cluster secret (keeps it out of ps and the environment)"
    )
    window: int = _opt(8, int, "chunks in flight per upload")
    memory_budget: int = _opt(256 << 20, parse_size, "chunk bytes all uploads may buffer")
    budget_wait: float = _opt(10.0, parse_duration, "how long an upload waits for memory")
    cache_size: int = _opt(64 << 20, parse_size, "read cache for small chunks (0: off)")
    splice: bool = _opt(
        True, parse_bool, "relay whole chunks node to client in the kernel (Linux, no TLS)"
    )
    lookup_cache: int = _opt(16384, int, "names whose current version is kept in memory (0: off)")
    inline_max: int = _opt(
        4 << 10,
        parse_size,
        "files up to this size are kept in the metadata store, not on the nodes (0: none)",
    )
    auth_tokens: list[AuthToken] | None = _opt(
        None,
        parse_tokens,
        "client tokens, TOKEN=read+write,... ([[auth.tokens]] in TOML; none: auth off)",
        toml="auth.tokens",
    )
    auth_tokens_file: Path | None = _opt(
        None, Path, "file of client tokens, one TOKEN=scope+scope per line (out of ps)"
    )
    s3_listen: str | None = _opt(None, str, "host:port of the S3-compatible API (default: off)")
    s3_region: str = _opt("us-east-1", str, "the region S3 clients sign for")
    s3_keys: list[S3Key] | None = _opt(
        None,
        parse_s3_keys,
        "S3 access keys, ACCESS:SECRET=read+write,... ([[s3.keys]] in TOML)",
        toml="s3.keys",
    )
    s3_domain: str | None = _opt(
        None, str, "serve virtual-hosted style too: BUCKET.DOMAIN (default: path style only)"
    )
    s3_multipart_expiry: float = _opt(
        86400.0, parse_duration, "how long an S3 multipart upload may stay unfinished"
    )
    max_object_size: int | None = _opt(None, parse_size, "largest file accepted (default none)")
    lease: float = _opt(60.0, parse_duration, "upload lease, renewed while bytes flow")
    heartbeat: float = _opt(1.0, parse_duration, "interval of node heartbeats")
    suspect_after: int = _opt(1, int, "missed heartbeats before a node is suspect")
    down_after: int = _opt(3, int, "missed heartbeats before a node is down")
    io_timeout: float = _opt(10.0, parse_duration, "timeout on each read/write to a node")
    send_timeout: float = _opt(
        60.0, parse_duration, "a download whose client takes no byte for this long is closed"
    )
    max_connections: int = _opt(
        1000, int, "open client connections at most; more are answered 503 and closed"
    )
    body_timeout: float = _opt(
        30.0, parse_duration, "an upload that sends no byte for this long is aborted (408)"
    )
    header_timeout: float = _opt(
        10.0,
        parse_duration,
        "a request's headers must arrive within this; also how long an idle connection stays",
    )
    reaper_interval: float = _opt(1.0, parse_duration, "how often dead chunks are reclaimed")
    pin_ttl: float = _opt(
        10.0,
        parse_duration,
        "with several gateways: how long a download's read pin outlives its last renewal",
    )
    repair_delay: float = _opt(
        300.0, parse_duration, "how long a node may be down before its chunks are re-replicated"
    )
    repair_bandwidth: int = _opt(
        50 << 20, parse_size, "bytes per second repair, drain and rebalance may copy"
    )
    inline_scrub_interval: float = _opt(
        1.0,
        parse_duration,
        "how often the next 256 inline files are checked against their checksums",
    )
    reconcile_interval: float = _opt(
        600.0, parse_duration, "how often node inventories are checked for orphaned chunks"
    )
    grace: float = _opt(10.0, parse_duration, "time to finish in-flight requests on SIGTERM")
    tls_cert: Path | None = _opt(None, Path, "TLS certificate (PEM): the HTTP port is HTTPS only")
    tls_key: Path | None = _opt(None, Path, "private key of --tls-cert (PEM)")
    tls_ca: Path | None = _opt(
        None, Path, "CA that signs the cluster's certificates (node links are mutual TLS)"
    )
    log_format: str = _opt("auto", str, "auto, json or console")
    log_level: str = _opt("info", str, "debug, info, warning, error")

    @property
    def tls(self) -> TlsFiles | None:
        return _tls(self.tls_cert, self.tls_key, self.tls_ca)

    @property
    def scheme(self) -> str:
        return "http" if self.tls_cert is None else "https"

    @property
    def host_port(self) -> tuple[str, int]:
        return parse_hostport(self.listen)

    def validate(self) -> None:
        if self.storage is None:
            self.storage = []
        try:
            host, _ = parse_hostport(self.listen)
            for addr in self.storage:
                parse_hostport(addr)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        self.cluster_secret = _secret(self.cluster_secret, self.cluster_secret_file)
        self.cluster_secret_file = None  # read: validating again finds the value alone
        if self.metadata is not None and not self.metadata.startswith(
            ("postgresql://", "postgres://")
        ):
            raise ConfigError("--metadata takes a postgresql:// URL (none: SQLite)")
        self.tls  # noqa: B018  (checked: the set is whole and the files are there)
        if self.auth_tokens_file is not None:
            if self.auth_tokens:
                raise ConfigError("auth tokens given twice: both a file and a value")
            try:
                text = self.auth_tokens_file.read_text()
            except OSError as exc:
                raise ConfigError(f"cannot read the auth tokens file: {exc}") from exc
            entries = ",".join(line.strip() for line in text.splitlines() if line.strip())
            try:
                self.auth_tokens = parse_tokens(entries)
            except ValueError as exc:
                raise ConfigError(f"{self.auth_tokens_file}: {exc}") from exc
            self.auth_tokens_file = None  # read, as for the secret
        if self.replicas < 1:
            raise ConfigError("replicas must be at least 1")
        if not 1 <= self.chunk_size <= 256 << 20:
            raise ConfigError("chunk size must be between 1 byte and 256MiB")
        if self.lookup_cache < 0:
            raise ConfigError("lookup_cache must be 0 or more")
        if not 0 <= self.inline_max <= 64 << 10:
            raise ConfigError("inline_max must be between 0 and 64KiB")
        for key in (
            "heartbeat",
            "reaper_interval",
            "pin_ttl",
            "reconcile_interval",
            "inline_scrub_interval",
            "send_timeout",
            "body_timeout",
            "header_timeout",
        ):
            if getattr(self, key) <= 0:  # a job run every 0 s would spin
                raise ConfigError(f"{key} must be more than 0")
        if self.window < 1:
            raise ConfigError("window must be at least 1")
        if self.max_connections < 1:
            raise ConfigError("max_connections must be at least 1")
        if self.memory_budget < self.chunk_size * 2:
            raise ConfigError("memory budget must hold at least two chunks")
        if self.s3_listen is not None:
            _, colon, s3_port = self.s3_listen.rpartition(":")
            if not colon or not s3_port.isdigit():
                raise ConfigError(f"s3_listen must be host:port, not {self.s3_listen!r}")
            if not self.s3_keys:
                raise ConfigError("the S3 API needs at least one key (s3_keys, [[s3.keys]])")
        if self.auth_tokens is None:
            self.auth_tokens = []
        if not is_loopback(host) and not self.auth_tokens:
            raise ConfigError(f"refusing to listen on non-loopback {host} with authentication off")


T = TypeVar("T")


def load(
    cls: type[T],
    flags: Mapping[str, Any],
    *,
    env: Mapping[str, str] | None = None,
    config_file: str | os.PathLike[str] | None = None,
) -> T:
    """Build a config from flags (None means not given), env and a TOML file."""
    env = os.environ if env is None else env
    file_values: dict[str, Any] = {}
    if config_file is not None:
        try:
            with open(config_file, "rb") as fh:
                file_values = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {config_file}: {exc}") from exc
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in file_values:
        if key.replace("-", "_") not in known and not isinstance(file_values[key], dict):
            raise ConfigError(f"unknown setting {key!r} in {config_file}")
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        parse = f.metadata["parse"]
        raw: Any = flags.get(f.name)
        source = f"--{f.name.replace('_', '-')}"
        if raw is None:
            env_name = "DSTORE_" + f.name.upper()
            raw, source = env.get(env_name), env_name
        if raw is None:
            raw = file_values.get(f.name, file_values.get(f.name.replace("_", "-")))
            source = f"{f.name} in {config_file}"
        if raw is None and "toml" in f.metadata:  # a nested table, e.g. [[auth.tokens]]
            nested: Any = file_values
            for part in f.metadata["toml"].split("."):
                nested = nested.get(part) if isinstance(nested, dict) else None
            if nested is not None:
                raw, source = nested, f"[[{f.metadata['toml']}]] in {config_file}"
        if raw is None:
            continue
        try:
            if f.metadata.get("many"):
                values[f.name] = (
                    [parse(v) for v in parse_list(raw)]
                    if not isinstance(raw, list)
                    else [parse(v) for v in raw]
                )
            else:
                values[f.name] = parse(raw)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"bad value for {source}: {exc}") from exc
    config = cls(**values)
    validate = getattr(config, "validate", None)
    if validate is not None:
        validate()
    return config
