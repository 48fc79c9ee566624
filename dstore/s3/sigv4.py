"""AWS Signature Version 4, as S3 uses it: a pure module (no I/O, no clock of its own).

- ``canonical_request`` and ``string_to_sign`` build what a signature covers; the signing
  key is derived from the secret, the date, the region and the service
  (``signing_key``); a signature is the hex HMAC-SHA256 of the string to sign.
- ``parse_authorization`` reads an ``Authorization`` header, ``parse_presigned`` the
  ``X-Amz-*`` query parameters of a presigned URL (expiry at most 7 days).
- ``verify`` checks a request's signature in constant time and returns what the body's
  check needs: the payload mode (a SHA-256 to compare as the body streams,
  ``UNSIGNED-PAYLOAD``, or ``STREAMING-AWS4-HMAC-SHA256-PAYLOAD`` with a seed signature
  that chains through ``chunk_signature``).

Errors are ``S3Error`` with S3's code and status, so the handlers answer in S3's
words. The test vectors are AWS's published examples (tests/unit/test_sigv4.py).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import quote, unquote

ALGORITHM = "AWS4-HMAC-SHA256"
UNSIGNED = "UNSIGNED-PAYLOAD"
STREAMING = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
MAX_SKEW = 15 * 60  # seconds a request's date may be off the server's clock
MAX_EXPIRES = 7 * 24 * 3600  # a presigned URL lives at most this long
_UNRESERVED = "-_.~"  # with letters and digits: the characters never %-encoded


class S3Error(Exception):
    """A request S3 refuses (for its signature, its body, its arguments): ``code`` and
    ``status`` as S3 answers. The one error of the S3 layer, from here up."""

    def __init__(self, code: str, message: str, status: int = 403) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


# --- what a signature covers -------------------------------------------------------------


def uri_encode(text: str, *, keep_slash: bool = False) -> str:
    """RFC 3986 percent-encoding of UTF-8, upper-case hex, as SigV4 asks: every byte but
    the unreserved characters (and ``/`` in a path)."""
    return quote(text, safe=_UNRESERVED + ("/" if keep_slash else ""))


def canonical_uri(raw_path: str) -> str:
    """The path as the client signed it: S3 encodes it once, so the raw path is decoded
    and encoded again (a client that left a safe character bare signs it encoded)."""
    return uri_encode(unquote(raw_path), keep_slash=True) or "/"


def canonical_query(pairs: Iterable[tuple[str, str]]) -> str:
    """Every (name, value) encoded, sorted by name then value, joined by ``&``."""
    encoded = sorted((uri_encode(k), uri_encode(v)) for k, v in pairs)
    return "&".join(f"{k}={v}" for k, v in encoded)


def canonical_headers(headers: Mapping[str, Sequence[str]], signed: Sequence[str]) -> str:
    """``name:value`` lines of the signed headers in order: names lower-case, values
    trimmed with inner runs of spaces made one, several values of a name joined by
    commas. ``headers``: lower-case name -> its values."""
    lines = []
    for name in signed:
        values = headers.get(name)
        if values is None:
            raise S3Error(
                "SignatureDoesNotMatch", f"the signed header {name!r} is not in the request"
            )
        lines.append(f"{name}:{','.join(' '.join(v.split()) for v in values)}\n")
    return "".join(lines)


def canonical_request(
    method: str,
    raw_path: str,
    query: Iterable[tuple[str, str]],
    headers: Mapping[str, Sequence[str]],
    signed: Sequence[str],
    payload: str,
) -> str:
    return "\n".join(
        (
            method,
            canonical_uri(raw_path),
            canonical_query(query),
            canonical_headers(headers, signed),
            ";".join(signed),
            payload,
        )
    )


def scope(date: str, region: str, service: str = "s3") -> str:
    return f"{date}/{region}/{service}/aws4_request"


def string_to_sign(amz_date: str, credential_scope: str, request: str) -> str:
    digest = hashlib.sha256(request.encode()).hexdigest()
    return f"{ALGORITHM}\n{amz_date}\n{credential_scope}\n{digest}"


@functools.lru_cache(maxsize=256)  # (one a day per key: four HMACs a request saved)
def signing_key(secret: str, date: str, region: str, service: str = "s3") -> bytes:
    key = _hmac(("AWS4" + secret).encode(), date)
    for part in (region, service, "aws4_request"):
        key = _hmac(key, part)
    return key


def signature(key: bytes, text: str) -> str:
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def chunk_signature(
    key: bytes, amz_date: str, credential_scope: str, previous: str, chunk_sha256: str
) -> str:
    """The signature of one chunk of a ``STREAMING-AWS4-HMAC-SHA256-PAYLOAD`` body: it
    chains the previous one (the seed, for the first chunk)."""
    text = "\n".join(
        (
            "AWS4-HMAC-SHA256-PAYLOAD",
            amz_date,
            credential_scope,
            previous,
            EMPTY_SHA256,
            chunk_sha256,
        )
    )
    return signature(key, text)


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


# --- what a request says about its signature ----------------------------------------------


@dataclass(frozen=True, slots=True)
class Credential:
    access_key: str
    date: str  # YYYYMMDD
    region: str
    service: str

    @property
    def scope(self) -> str:
        return scope(self.date, self.region, self.service)

    @classmethod
    def parse(cls, text: str) -> Credential:
        parts = text.split("/")
        if len(parts) != 5 or parts[4] != "aws4_request" or not parts[0]:
            raise S3Error("AuthorizationHeaderMalformed", f"a malformed credential: {text!r}", 400)
        access_key, date, region, service, _ = parts
        return cls(access_key, date, region, service)


@dataclass(frozen=True, slots=True)
class Claim:
    """What a request claims: who signed it, when, which headers, and the signature."""

    credential: Credential
    amz_date: str  # YYYYMMDDTHHMMSSZ
    signed_headers: tuple[str, ...]
    signature: str
    expires: int | None = None  # seconds, for a presigned URL


def parse_authorization(header: str, amz_date: str | None) -> Claim:
    """An ``Authorization: AWS4-HMAC-SHA256 Credential=…, SignedHeaders=…,
    Signature=…`` header, with the request's ``X-Amz-Date`` (or ``Date``)."""
    algorithm, _, rest = header.strip().partition(" ")
    if algorithm != ALGORITHM:
        raise S3Error("AuthorizationHeaderMalformed", f"unsupported algorithm {algorithm!r}", 400)
    fields: dict[str, str] = {}
    for item in rest.split(","):
        name, eq, value = item.strip().partition("=")
        if not eq:
            raise S3Error("AuthorizationHeaderMalformed", f"bad field {item!r}", 400)
        fields[name] = value
    try:
        credential = Credential.parse(fields["Credential"])
        signed = tuple(fields["SignedHeaders"].split(";"))
        sig = fields["Signature"]
    except KeyError as exc:
        raise S3Error(
            "AuthorizationHeaderMalformed", f"the Authorization header lacks {exc}", 400
        ) from None
    if amz_date is None:
        raise S3Error("AccessDenied", "the request has no X-Amz-Date")
    return Claim(credential, amz_date, signed, sig)


def parse_presigned(query: Mapping[str, str]) -> Claim:
    """The ``X-Amz-*`` parameters of a presigned URL."""
    if query.get("X-Amz-Algorithm") != ALGORITHM:
        raise S3Error(
            "AuthorizationQueryParametersError", "X-Amz-Algorithm must be AWS4-HMAC-SHA256", 400
        )
    try:
        credential = Credential.parse(query["X-Amz-Credential"])
        amz_date = query["X-Amz-Date"]
        signed = tuple(query["X-Amz-SignedHeaders"].split(";"))
        sig = query["X-Amz-Signature"]
        expires = int(query["X-Amz-Expires"])
    except (KeyError, ValueError) as exc:
        raise S3Error(
            "AuthorizationQueryParametersError", f"a presigned URL lacks or garbles {exc}", 400
        ) from None
    if not 0 < expires <= MAX_EXPIRES:
        raise S3Error(
            "AuthorizationQueryParametersError",
            f"X-Amz-Expires must be between 1 and {MAX_EXPIRES} seconds",
            400,
        )
    return Claim(credential, amz_date, signed, sig, expires)


def request_time(amz_date: str) -> float:
    """Seconds since the epoch of an ``X-Amz-Date`` (``YYYYMMDDTHHMMSSZ``), read by hand:
    ``strptime`` took a twentieth of a small GET's time."""
    if not (
        len(amz_date) == 16
        and amz_date[8] == "T"
        and amz_date[15] == "Z"
        and (digits := amz_date[:8] + amz_date[9:15]).isascii()
        and digits.isdigit()
    ):
        raise S3Error("AccessDenied", f"a malformed X-Amz-Date: {amz_date!r}")
    try:
        when = datetime(
            int(digits[0:4]),
            int(digits[4:6]),
            int(digits[6:8]),
            int(digits[8:10]),
            int(digits[10:12]),
            int(digits[12:14]),
            tzinfo=UTC,
        )
    except ValueError:
        raise S3Error("AccessDenied", f"a malformed X-Amz-Date: {amz_date!r}") from None
    return when.timestamp()


# --- checking a request ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Verified:
    """A request whose signature holds. ``payload``: the SHA-256 (hex) the body must
    have, ``UNSIGNED-PAYLOAD``, or ``STREAMING-…`` (each chunk then signed, chained
    from ``signature``)."""

    access_key: str
    payload: str
    key: bytes
    amz_date: str
    scope: str
    signature: str


def verify(
    method: str,
    raw_path: str,
    query: Sequence[tuple[str, str]],
    headers: Mapping[str, Sequence[str]],
    secret_of: Callable[[str], str | None],
    *,
    now: float,
    region: str,
) -> Verified:
    """Check a request signed by header or by presigned URL, at server time ``now``.
    ``headers``: lower-case name -> values; ``secret_of``: the secret of an access key,
    None if unknown."""
    params = dict(query)
    presigned = "X-Amz-Signature" in params
    if presigned:
        claim = parse_presigned(params)
        signed_query = [(k, v) for k, v in query if k != "X-Amz-Signature"]
        payload = UNSIGNED
    else:
        auth = headers.get("authorization")
        if not auth:
            raise S3Error("AccessDenied", "the request is not signed")
        date = headers.get("x-amz-date") or headers.get("date")
        claim = parse_authorization(auth[0], date[0] if date else None)
        signed_query = list(query)
        sha = headers.get("x-amz-content-sha256")
        payload = sha[0] if sha else EMPTY_SHA256
        if payload not in (UNSIGNED, STREAMING) and not _is_sha256(payload):
            raise S3Error("InvalidArgument", "x-amz-content-sha256 must be a SHA-256 in hex", 400)
    credential = claim.credential
    if "host" not in claim.signed_headers:
        raise S3Error("AccessDenied", "the Host header must be signed")
    if credential.service != "s3" or credential.region != region:
        raise S3Error(
            "AuthorizationHeaderMalformed",
            f"the credential is for {credential.region}/{credential.service}; this is {region}/s3",
            400,
        )
    when = request_time(claim.amz_date)
    if claim.amz_date[:8] != credential.date:
        raise S3Error("SignatureDoesNotMatch", "the credential's date is not the request's")
    if claim.expires is None:
        if abs(now - when) > MAX_SKEW:
            raise S3Error(
                "RequestTimeTooSkewed",
                "the difference between the request time and the server's time is too large",
            )
    elif now > when + claim.expires:
        raise S3Error("AccessDenied", "Request has expired")
    elif when - now > MAX_SKEW:
        raise S3Error("AccessDenied", "the presigned URL is dated in the future")
    secret = secret_of(credential.access_key)
    if secret is None:
        raise S3Error(
            "InvalidAccessKeyId", "the access key ID you provided does not exist in our records"
        )
    key = signing_key(secret, credential.date, credential.region, credential.service)
    request = canonical_request(
        method, raw_path, signed_query, headers, claim.signed_headers, payload
    )
    expected = signature(key, string_to_sign(claim.amz_date, credential.scope, request))
    if not hmac.compare_digest(expected, claim.signature):
        raise S3Error(
            "SignatureDoesNotMatch",
            "the request signature we calculated does not match the signature you provided",
        )
    return Verified(
        credential.access_key, payload, key, claim.amz_date, credential.scope, claim.signature
    )


def _is_sha256(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)
