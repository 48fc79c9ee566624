"""The HTTP client the CLI uses: streaming both ways, one-line errors."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any
from urllib.parse import quote

import aiohttp
import orjson
from yarl import URL

from dstore.errors import ApiError, DstoreError
from dstore.present import Progress
from dstore.tls import TlsFiles, client_context

PIECE = 1 << 20


def file_url(base: str, name: str) -> URL:
    """Every character but the unreserved ones is escaped, "/" included, so no dot segment
    or double slash can be normalised away on the way: the name arrives as given."""
    escaped = quote(name, safe="")
    if escaped in (".", ".."):
        escaped = escaped.replace(".", "%2E")
    return URL(f"{base.rstrip('/')}/v1/files/{escaped}", encoded=True)


class Client:
    """``ca``: the CA an HTTPS gateway's certificate is checked against (a private cluster
    CA, as ``dstore up --tls`` makes); none: the system's trusted roots."""

    def __init__(self, url: str, token: str | None = None, *, ca: Path | None = None) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        context = client_context(ca)
        self._session = aiohttp.ClientSession(
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            connector=aiohttp.TCPConnector(ssl=True if context is None else context),
        )

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._session.close()

    async def _check(self, response: aiohttp.ClientResponse) -> None:
        if response.status < 400:
            return
        try:
            body = await response.json(content_type=None)
            error = body["error"]
            raise ApiError(response.status, error["code"], error["message"])
        except (ValueError, KeyError, TypeError, aiohttp.ContentTypeError):
            raise ApiError(response.status, "http_error", response.reason or "error") from None

    async def _request(self, method: str, url: str | URL, **kw: Any) -> Any:
        try:
            async with self._session.request(method, url, **kw) as response:
                await self._check(response)
                if response.status == 204 or method == "HEAD":
                    return response.headers.copy()  # case-insensitive
                return await response.json()
        except aiohttp.ClientError as exc:
            raise self._unreachable(exc) from exc

    def _unreachable(self, exc: aiohttp.ClientError) -> DstoreError:
        if isinstance(exc, aiohttp.ClientConnectorCertificateError):
            why = getattr(exc.certificate_error, "verify_message", "not trusted")
            return DstoreError(
                f"{self.url} showed a certificate we do not trust ({why}): give its CA with"
                " --ca or DSTORE_CA",
                code="untrusted",
            )
        return DstoreError(f"cannot reach {self.url}: {exc}", code="unreachable")

    async def put(
        self,
        name: str,
        source: IO[bytes],
        *,
        size: int | None = None,
        progress: Progress | None = None,
        content_type: str | None = None,
    ) -> Any:
        async def body() -> AsyncIterator[bytes]:
            while True:
                piece = source.read(PIECE)
                if not piece:
                    return
                if progress is not None:
                    progress.update(len(piece))
                yield piece

        headers = {"Content-Length": str(size)} if size is not None else {}
        if content_type:
            headers["Content-Type"] = content_type
        return await self._request("PUT", file_url(self.url, name), data=body(), headers=headers)

    async def get(self, name: str, sink: IO[bytes], *, progress: Progress | None = None) -> int:
        try:
            async with self._session.get(file_url(self.url, name)) as response:
                await self._check(response)
                if progress is not None:
                    progress.total = response.content_length
                received = 0
                async for piece in response.content.iter_chunked(PIECE):
                    sink.write(piece)
                    received += len(piece)
                    if progress is not None:
                        progress.update(len(piece))
                if response.content_length is not None and received != response.content_length:
                    raise DstoreError(f"download cut short at {received} bytes", code="short_read")
                return received
        except aiohttp.ClientConnectorError as exc:
            raise self._unreachable(exc) from exc
        except aiohttp.ClientError as exc:
            raise DstoreError(f"download failed: {exc}", code="unreachable") from exc

    async def head(self, name: str) -> Mapping[str, str]:
        headers: Mapping[str, str] = await self._request("HEAD", file_url(self.url, name))
        return headers

    async def delete(self, name: str) -> None:
        await self._request("DELETE", file_url(self.url, name))

    async def list(
        self, prefix: str = "", start_after: str = "", limit: int = 1000, delimiter: str = ""
    ) -> Any:
        params = {"prefix": prefix, "start_after": start_after, "limit": str(limit)}
        if delimiter:
            params["delimiter"] = delimiter
        return await self._request("GET", f"{self.url}/v1/files", params=params)

    async def cluster(self) -> Any:
        return await self._request("GET", f"{self.url}/v1/cluster")

    async def fsck(self, prefix: str, *, verify: bool = False) -> AsyncIterator[Any]:
        """The gateway's fsck report, a JSON line at a time as it finds them."""
        params = {"prefix": prefix, "verify": "1" if verify else "0"}
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
        try:
            async with self._session.get(
                f"{self.url}/v1/fsck", params=params, timeout=timeout
            ) as response:
                await self._check(response)
                async for line in response.content:
                    if line.strip():
                        yield orjson.loads(line)
        except aiohttp.ClientConnectorError as exc:
            raise self._unreachable(exc) from exc
        except aiohttp.ClientError as exc:
            raise DstoreError(f"fsck failed: {exc}", code="unreachable") from exc


async def join_cluster(
    url: str, addr: str, secret: bytes, *, tls: TlsFiles | None = None, attempts: int = 10
) -> Any:
    """Register a storage node at ``addr`` with the gateway at ``url`` (``--join``); with
    ``tls``, an HTTPS gateway must show a certificate from the cluster CA, and the node
    shows its own."""
    from dstore.protocol.handshake import join_proof

    last: Exception | None = None
    context = tls.client() if tls is not None else None
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=30),
        connector=aiohttp.TCPConnector(ssl=True if context is None else context),
    ) as session:
        for attempt in range(attempts):
            stamp = int(time.time())
            body = {"addr": addr, "time": stamp, "proof": join_proof(secret, addr, stamp)}
            try:
                async with session.post(f"{url.rstrip('/')}/v1/cluster/nodes", json=body) as r:
                    if r.status in (200, 201):  # 200: known already (kept draining, if it was)
                        return await r.json()
                    text = await r.text()
                    if r.status in (400, 401, 403):
                        raise DstoreError(f"join refused: {r.status} {text}", code="join_refused")
                    last = DstoreError(f"join failed: {r.status} {text}")
            except aiohttp.ClientError as exc:
                last = exc
            await asyncio.sleep(min(0.5 * 2**attempt, 5.0))
    raise DstoreError(f"could not join {url}: {last}", code="join_failed")
