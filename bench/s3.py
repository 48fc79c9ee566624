"""The S3 API beside the native one, in one run on one cluster (`dstore up`, 3 storage
nodes, replicas 2), every S3 request signed (SigV4, by the signer here, which costs the
client little: a 1 MiB body piece's SHA-256 is computed once):

- single stream of DSTORE_BENCH_GIB GiB (default 1): native PUT, S3 PutObject with
  ``UNSIGNED-PAYLOAD`` and with ``STREAMING-AWS4-HMAC-SHA256-PAYLOAD`` (aws-chunked, every
  1 MiB chunk signed and checked), then native GET and S3 GetObject; in turns,
  DSTORE_S3_ROUNDS times (default 2), medians and ratios S3 ÷ native printed;
- 4 KiB objects at 16 in flight, PUT then GET, windows of 3 s in turns;
- MD5 on one core (what an S3 ETag costs; the native API's ETag is free);
- the gateway's RSS, on a fresh cluster: idle, peak after a 1 GiB PutObject (streaming
  signature), peak after a 1 GiB multipart upload with 8 parts of 16 MiB in flight.

    python -m bench s3
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote, urlsplit

import aiohttp

from bench.gateway import GIB, MB, PIECE, SIZE, Up, body, get, put
from dstore.s3.sigv4 import (
    ALGORITHM,
    STREAMING,
    UNSIGNED,
    canonical_request,
    chunk_signature,
    scope,
    signature,
    signing_key,
    string_to_sign,
)

ROUNDS = int(os.environ.get("DSTORE_S3_ROUNDS", "2"))
CLIENTS = 16
WINDOW = 3.0
PIECE_SHA = hashlib.sha256(PIECE).hexdigest()
PART = 16 << 20
WRITTEN = [0] * CLIENTS  # per client: small objects 0 .. n-1 exist (both APIs write them)


class Signer:
    """SigV4 for the benchmark's requests (the same steps as any SDK's)."""

    def __init__(self, url: str, access: str, secret: str, region: str = "us-east-1") -> None:
        self.url = url
        self.host = urlsplit(url).netloc
        self.access = access
        self.secret = secret
        self.region = region

    def headers(
        self,
        method: str,
        path: str,
        payload: str,
        query: list[tuple[str, str]] | None = None,
        extra: dict[str, str] | None = None,
    ) -> tuple[dict[str, str], str, bytes, str]:
        """(headers, x-amz-date, signing key, seed signature)."""
        amz_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        day = amz_date[:8]
        headers = {"host": self.host, "x-amz-date": amz_date, "x-amz-content-sha256": payload}
        headers |= {k.lower(): v for k, v in (extra or {}).items()}
        signed = sorted(headers)
        request = canonical_request(
            method, path, query or [], {k: [v] for k, v in headers.items()}, signed, payload
        )
        key = signing_key(self.secret, day, self.region)
        credential_scope = scope(day, self.region)
        seed = signature(key, string_to_sign(amz_date, credential_scope, request))
        headers["authorization"] = (
            f"{ALGORITHM} Credential={self.access}/{credential_scope},"
            f" SignedHeaders={';'.join(signed)}, Signature={seed}"
        )
        del headers["host"]
        return headers, amz_date, key, seed


async def chunked(
    size: int, amz_date: str, key: bytes, seed: str, day: str
) -> AsyncIterator[bytes]:
    """An aws-chunked body of ``size`` bytes in 1 MiB chunks, each signed."""
    credential_scope = scope(day, "us-east-1")
    previous = seed
    async for piece in body(size):
        digest = PIECE_SHA if len(piece) == len(PIECE) else hashlib.sha256(piece).hexdigest()
        previous = chunk_signature(key, amz_date, credential_scope, previous, digest)
        yield f"{len(piece):x};chunk-signature={previous}\r\n".encode()
        yield piece
        yield b"\r\n"
    last = chunk_signature(key, amz_date, credential_scope, previous, hashlib.sha256().hexdigest())
    yield f"0;chunk-signature={last}\r\n\r\n".encode()


def chunked_length(size: int) -> int:
    pieces = [len(PIECE)] * (size // len(PIECE)) + (
        [size % len(PIECE)] if size % len(PIECE) else []
    )
    return sum(len(f"{n:x};chunk-signature=".encode()) + 64 + 2 + n + 2 for n in pieces) + (
        len(b"0;chunk-signature=") + 64 + 4
    )


async def s3_put(
    session: aiohttp.ClientSession, signer: Signer, key: str, size: int, *, streaming: bool
) -> float:
    path = f"/bench/{quote(key)}"
    start = time.perf_counter()
    if streaming:
        extra = {
            "content-encoding": "aws-chunked",
            "x-amz-decoded-content-length": str(size),
            "content-length": str(chunked_length(size)),
        }
        headers, amz_date, signing, seed = signer.headers("PUT", path, STREAMING, extra=extra)
        data: AsyncIterator[bytes] = chunked(size, amz_date, signing, seed, amz_date[:8])
    else:
        headers, *_ = signer.headers("PUT", path, UNSIGNED, extra={"content-length": str(size)})
        data = body(size)
    async with session.put(signer.url + path, data=data, headers=headers) as r:
        assert r.status == 200, (r.status, await r.text())
        await r.read()
    return size / (time.perf_counter() - start)


async def s3_get(session: aiohttp.ClientSession, signer: Signer, key: str) -> float:
    path = f"/bench/{quote(key)}"
    headers, *_ = signer.headers("GET", path, UNSIGNED)
    start = time.perf_counter()
    got = 0
    async with session.get(signer.url + path, headers=headers) as r:
        assert r.status == 200, r.status
        async for piece in r.content.iter_any():
            got += len(piece)
    return got / (time.perf_counter() - start)


async def multipart(session: aiohttp.ClientSession, signer: Signer, key: str, size: int) -> float:
    """A multipart upload of ``size`` bytes in parts of 16 MiB, 8 in flight."""
    path = f"/bench/{quote(key)}"
    start = time.perf_counter()
    headers, *_ = signer.headers("POST", path, UNSIGNED, [("uploads", "")])
    async with session.post(signer.url + path + "?uploads=", headers=headers) as r:
        text = await r.text()
        assert r.status == 200, text
    upload = text.split("<UploadId>")[1].split("</UploadId>")[0]
    count = -(-size // PART)
    etags: dict[int, str] = {}
    window = asyncio.Semaphore(8)

    async def part(number: int) -> None:
        length = min(PART, size - (number - 1) * PART)
        query = [("partNumber", str(number)), ("uploadId", upload)]
        async with window:
            headers, *_ = signer.headers(
                "PUT", path, UNSIGNED, query, extra={"content-length": str(length)}
            )
            url = f"{signer.url}{path}?partNumber={number}&uploadId={upload}"
            async with session.put(url, data=body(length), headers=headers) as r:
                assert r.status == 200, await r.text()
                etags[number] = r.headers["ETag"]

    await asyncio.gather(*(part(n) for n in range(1, count + 1)))
    document = (
        "<CompleteMultipartUpload>"
        + "".join(
            f"<Part><PartNumber>{n}</PartNumber><ETag>{etags[n]}</ETag></Part>"
            for n in range(1, count + 1)
        )
        + "</CompleteMultipartUpload>"
    )
    payload = hashlib.sha256(document.encode()).hexdigest()
    headers, *_ = signer.headers("POST", path, payload, [("uploadId", upload)])
    async with session.post(
        f"{signer.url}{path}?uploadId={upload}", data=document.encode(), headers=headers
    ) as r:
        assert r.status == 200, await r.text()
    return size / (time.perf_counter() - start)


async def small(
    session: aiohttp.ClientSession, signer: Signer, native: str, op: str, s3: bool
) -> float:
    """4 KiB objects, ``CLIENTS`` in flight for ``WINDOW`` seconds: PUT or GET per second."""
    data = os.urandom(4096)
    done = 0
    written = WRITTEN
    deadline = time.perf_counter() + WINDOW
    start = time.perf_counter()

    async def client(c: int) -> None:
        nonlocal done
        i = 0
        while time.perf_counter() < deadline:
            key = f"small/{c}/{i % written[c] if op == 'get' else i}"
            if s3:
                path = f"/bench/{key}"
                payload = UNSIGNED if op == "get" else hashlib.sha256(data).hexdigest()
                headers, *_ = signer.headers(op.upper(), path, payload)
                url = signer.url + path
            else:
                headers, url = {}, f"{native}/v1/files/bench/{key}"
            if op == "put":
                async with session.put(url, data=data, headers=headers) as r:
                    assert r.status in (200, 201), await r.text()
            else:
                async with session.get(url, headers=headers) as r:
                    assert r.status == 200, r.status
                    await r.read()
            done += 1
            i += 1
            if op == "put":
                written[c] = max(written[c], i)

    await asyncio.gather(*(client(c) for c in range(CLIENTS)))
    return done / (time.perf_counter() - start)


def md5_rate() -> float:
    start = time.perf_counter()
    digest = hashlib.md5()
    for _ in range(256):
        digest.update(PIECE)
    return 256 * len(PIECE) / (time.perf_counter() - start)


async def main() -> None:
    print(
        f"s3: the S3 API beside the native one on one cluster (replicas 2); {SIZE / GIB:g} GiB"
        f" single stream and 4 KiB objects at {CLIENTS} in flight, {ROUNDS} rounds"
    )
    root = Path(tempfile.mkdtemp(prefix="dstore-bench-s3-"))
    try:
        async with Up(root / "rates", 2) as cluster:
            await rates(cluster)
        async with Up(root / "rss", 2) as cluster:
            await memory(cluster)
    finally:
        subprocess.run(["rm", "-rf", str(root)], check=False)
    print(f"  MD5 on one core: {md5_rate() / MB:.0f} MB/s (an S3 ETag; SHA-256 is the signature's)")


def _signer(cluster: Up) -> Signer:
    access, secret = (cluster.data_dir / "s3-credentials").read_text().strip().split(":", 1)
    assert cluster.s3_url, "dstore up printed no S3 API address"
    return Signer(cluster.s3_url, access, secret)


async def rates(cluster: Up) -> None:
    signer = _signer(cluster)
    connector = aiohttp.TCPConnector(limit=CLIENTS)
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        headers, *_ = signer.headers("PUT", "/bench", UNSIGNED)
        async with session.put(f"{signer.url}/bench", headers=headers) as r:
            assert r.status == 200, await r.text()
        found: dict[str, list[float]] = {}
        for _ in range(ROUNDS):
            found.setdefault("native PUT", []).append(
                await put(session, f"{cluster.url}/v1/files/bench/big", SIZE)
            )
            found.setdefault("S3 PUT unsigned payload", []).append(
                await s3_put(session, signer, "big", SIZE, streaming=False)
            )
            found.setdefault("S3 PUT streaming signed", []).append(
                await s3_put(session, signer, "big", SIZE, streaming=True)
            )
            found.setdefault("native GET", []).append(
                (await get(session, f"{cluster.url}/v1/files/bench/big"))[0]
            )
            found.setdefault("S3 GET", []).append(await s3_get(session, signer, "big"))
        for label, values in found.items():
            base = "native PUT" if "PUT" in label else "native GET"
            ratio = statistics.median(values) / statistics.median(found[base])
            print(
                f"  {label:26s} {statistics.median(values) / MB:6.0f} MB/s"
                f"  ({' '.join(f'{v / MB:.0f}' for v in values)})  {ratio:4.2f} x native"
            )
        for op in ("put", "get"):
            sides: dict[bool, list[float]] = {False: [], True: []}
            for s3 in itertools.islice(itertools.cycle((False, True, True, False)), 2 * ROUNDS):
                sides[s3].append(await small(session, signer, cluster.url, op, s3))
            native, ours = statistics.median(sides[False]), statistics.median(sides[True])
            print(
                f"  4 KiB {op.upper()} x{CLIENTS}: native {native:6.0f}/s, S3 {ours:6.0f}/s"
                f"  {ours / native:4.2f} x native"
            )


async def memory(cluster: Up) -> None:
    signer = _signer(cluster)
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        headers, *_ = signer.headers("PUT", "/bench", UNSIGNED)
        async with session.put(f"{signer.url}/bench", headers=headers) as r:
            assert r.status == 200, await r.text()
        idle = cluster.rss()
        put_rate = await s3_put(session, signer, "one", SIZE, streaming=True)
        after_put = cluster.peak_rss()
        parts_rate = await multipart(session, signer, "parts", SIZE)
        after_parts = cluster.peak_rss()
        check = await s3_get(session, signer, "parts")
    print(
        f"  gateway RSS: idle {idle / 2**20:.0f} MiB; peak after a {SIZE / GIB:g} GiB PutObject"
        f" {after_put / 2**20:.0f} MiB ({put_rate / MB:.0f} MB/s); after a {SIZE / GIB:g} GiB"
        f" multipart upload, 8 x {PART >> 20} MiB parts in flight, {after_parts / 2**20:.0f} MiB"
        f" ({parts_rate / MB:.0f} MB/s; read back at {check / MB:.0f} MB/s)"
    )
