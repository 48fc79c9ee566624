"""Client authentication for the HTTP API: bearer tokens, each with scopes.

Tokens come from the gateway config (``[[auth.tokens]]`` in TOML, or
``DSTORE_AUTH_TOKENS="TOKEN=read+write,OTHER=admin"``). Only their SHA-256 digests are
kept in memory, and a presented token is looked up by its digest, so comparing never
runs over the secret itself. With no tokens configured, auth is off (and the gateway
refuses to listen beyond loopback). Pure: no aiohttp here.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

from dstore.errors import Forbidden, Unauthorized

MIN_TOKEN_LENGTH = 16


class Scope(enum.Enum):
    READ = "read"  # GET/HEAD files, list, cluster state, metrics
    WRITE = "write"  # PUT/DELETE files
    ADMIN = "admin"  # add, drain and rebalance storage nodes


@dataclass(frozen=True, slots=True)
class AuthToken:
    name: str
    digest: bytes
    scopes: frozenset[Scope]

    def __repr__(self) -> str:  # never the secret, nor its digest
        return f"<AuthToken {self.name} {sorted(s.value for s in self.scopes)}>"

    @classmethod
    def create(cls, token: str, scopes: Iterable[str], name: str = "") -> AuthToken:
        if len(token) < MIN_TOKEN_LENGTH or token != token.strip():
            raise ValueError(
                f"token {name!r} must be at least {MIN_TOKEN_LENGTH} characters, no spaces"
            )
        try:
            parsed = frozenset(Scope(str(s).strip()) for s in scopes)
        except ValueError:
            raise ValueError(
                f"token {name!r}: scopes are {', '.join(s.value for s in Scope)}"
            ) from None
        if not parsed:
            raise ValueError(f"token {name!r} has no scopes")
        return cls(name, _digest(token), parsed)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def parse_tokens(value: object) -> list[AuthToken]:
    """``[[auth.tokens]]`` entries (``token``, ``scopes``, optional ``name``), or the
    string form ``TOKEN=read+write,OTHER=admin``."""
    if isinstance(value, str):
        entries: list[object] = []
        for i, item in enumerate(p.strip() for p in value.split(",") if p.strip()):
            token, sep, scopes = item.rpartition("=")
            if not sep:
                raise ValueError(f"token {i + 1}: expected TOKEN=SCOPE+SCOPE")
            entries.append({"token": token, "scopes": scopes.split("+"), "name": f"token-{i + 1}"})
    elif isinstance(value, list):
        entries = value
    else:
        raise ValueError("expected a list of {token, scopes} tables")
    tokens = []
    for i, entry in enumerate(entries):
        if isinstance(entry, AuthToken):
            tokens.append(entry)
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("token"), str):
            raise ValueError(f"token {i + 1}: expected a table with token and scopes")
        scopes = entry.get("scopes", [])
        if not isinstance(scopes, list):
            raise ValueError(f"token {i + 1}: scopes must be a list")
        tokens.append(
            AuthToken.create(entry["token"], scopes, str(entry.get("name") or f"token-{i + 1}"))
        )
    if len({t.digest for t in tokens}) != len(tokens):
        raise ValueError("the same token is configured twice")
    return tokens


class TokenTable:
    """The configured tokens; ``check`` is the whole of authentication."""

    def __init__(self, tokens: Iterable[AuthToken]) -> None:
        self._by_digest = {t.digest: t for t in tokens}

    def __repr__(self) -> str:
        return f"<TokenTable {len(self._by_digest)} tokens>"

    @property
    def enabled(self) -> bool:
        return bool(self._by_digest)

    def check(self, authorization: str | None, needed: Scope) -> AuthToken | None:
        """The token an ``Authorization`` header carries, if it grants ``needed``;
        None when auth is off. Raises ``Unauthorized`` or ``Forbidden``."""
        if not self._by_digest:
            return None
        scheme, _, presented = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise Unauthorized("missing bearer token (Authorization: Bearer <token>)")
        token = self._by_digest.get(_digest(presented.strip()))
        if token is None:
            raise Unauthorized("token not recognised")
        if needed not in token.scopes:
            raise Forbidden(f"token {token.name!r} lacks the {needed.value!r} scope")
        return token


@dataclass(frozen=True, slots=True)
class S3Key:
    """An S3 access key: its id, its secret (SigV4 needs the secret itself, not a
    digest) and what it may do."""

    access_key: str
    secret_key: str = field(repr=False)
    scopes: frozenset[Scope]

    def __repr__(self) -> str:  # never the secret
        return f"<S3Key {self.access_key} {sorted(s.value for s in self.scopes)}>"


def parse_s3_keys(value: object) -> list[S3Key]:
    """``[[s3.keys]]`` entries (``access_key``, ``secret_key``, ``scopes``), or the string
    form ``ACCESS:SECRET=read+write,OTHER:SECRET2=read``."""
    if isinstance(value, str):
        entries: list[object] = []
        for i, item in enumerate(p.strip() for p in value.split(",") if p.strip()):
            pair, sep, scopes = item.rpartition("=")
            access, colon, secret = pair.partition(":")
            if not sep or not colon:
                raise ValueError(f"S3 key {i + 1}: expected ACCESS:SECRET=SCOPE+SCOPE")
            entries.append(
                {"access_key": access, "secret_key": secret, "scopes": scopes.split("+")}
            )
    elif isinstance(value, list):
        entries = value
    else:
        raise ValueError("expected a list of {access_key, secret_key, scopes} tables")
    keys = []
    for i, entry in enumerate(entries):
        if isinstance(entry, S3Key):  # (made by the caller: dstore up)
            keys.append(entry)
            continue
        if not isinstance(entry, dict):
            raise ValueError(f"S3 key {i + 1}: expected a table")
        access, secret = str(entry.get("access_key", "")), str(entry.get("secret_key", ""))
        if not 3 <= len(access) <= 128 or not access.isascii() or not access.isalnum():
            raise ValueError(f"S3 key {i + 1}: the access key must be 3-128 letters and digits")
        if len(secret) < 16 or secret != secret.strip():
            raise ValueError(f"S3 key {access!r}: the secret must be 16 characters or more")
        try:
            granted = frozenset(Scope(str(s).strip()) for s in entry.get("scopes", []))
        except ValueError as exc:
            raise ValueError(f"S3 key {access!r}: {exc}") from None
        keys.append(S3Key(access, secret, granted))
    if len({k.access_key for k in keys}) != len(keys):
        raise ValueError("an S3 access key is given twice")
    return keys
