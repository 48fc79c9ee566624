"""The Python HTTP front end's ceiling: an aiohttp server that only discards PUT bodies
and only generates GET bodies (``?size=N``, 4 KiB without it), answering a PUT with a JSON
body the size of dstore's. Run as its own process by bench/gateway.py, for streams and for
small objects alike."""

from __future__ import annotations

import sys

from aiohttp import web

PIECE = bytes(1 << 20)


async def discard(request: web.Request) -> web.Response:
    total = 0
    while True:
        piece = await request.content.readany()
        if not piece:
            break
        total += len(piece)
    reply = {"name": request.match_info["name"], "size": total, "etag": '"' + "0" * 32 + '"'}
    return web.json_response(reply | {"chunks": 1, "created": 0.0}, status=201)


async def generate(request: web.Request) -> web.StreamResponse:
    size = int(request.query.get("size", 4096))
    response = web.StreamResponse()
    response.content_length = size
    await response.prepare(request)
    sent = 0
    while sent < size:
        n = min(len(PIECE), size - sent)
        await response.write(PIECE[:n] if n < len(PIECE) else PIECE)
        sent += n
    await response.write_eof()
    return response


def main() -> None:
    app = web.Application()
    app.router.add_put("/v1/files/{name:.+}", discard)
    app.router.add_get("/v1/files/{name:.+}", generate)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)


if __name__ == "__main__":
    main()
