"""haproxy in front of several gateways (``dstore up --gateways N``), from Debian's
package ``haproxy``: one port, requests spread to the gateway with the fewest
connections, each gateway checked on ``/readyz`` every second (two failures take it out,
two successes bring it back), and bodies streamed both ways, never buffered.

Over HTTPS the connection passes through to a gateway unopened (TCP mode), so the client
checks the gateway's own certificate; the health check then speaks TLS to ``/readyz``.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from dstore.errors import DstoreError

# what a client or a gateway may leave a connection idle for (the gateway's own timeouts
# for slow clients are shorter and answer first)
IDLE = "10m"
# what only HTTP mode has: a whole request head within 15 s, idle keep-alive 15 s, a
# request whose connection failed sent again to another gateway, and connections to the
# gateways kept and shared between clients
HTTP_ONLY = """    timeout http-request 15s
    timeout http-keep-alive 15s
    option redispatch
    http-reuse always
"""


def haproxy_binary() -> str:
    found = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise DstoreError(
            "haproxy is not installed: apt-get install haproxy", code="missing_binary"
        )
    return found


def haproxy_config(
    port: int,
    gateways: list[str],
    *,
    tls: bool = False,
    s3: tuple[int, list[str]] | None = None,
) -> str:
    """The configuration: ``port`` on 127.0.0.1 in front of ``gateways`` (host:port);
    ``s3``: a port in front of the gateways' S3 listeners (host:port, in the same order),
    each checked on its gateway's ``/readyz``."""
    if tls:
        mode, check = "tcp", "check check-ssl verify none"
    else:
        mode, check = "http", "check"
    servers = "\n".join(
        f"    server gateway-{i} {addr} {check}" for i, addr in enumerate(gateways, 1)
    )
    s3_part = ""
    if s3 is not None:
        s3_port, listeners = s3
        s3_servers = "\n".join(
            f"    server s3-{i} {addr} {check} port {native.rpartition(':')[2]}"
            for i, (addr, native) in enumerate(zip(listeners, gateways, strict=True), 1)
        )
        s3_part = f"""
frontend s3
    bind 127.0.0.1:{s3_port}
    default_backend s3

backend s3
    balance leastconn
    option httpchk GET /readyz
    http-check expect status 200
    default-server inter 1s fall 2 rise 2
{s3_servers}
"""
    http_only = "" if tls else HTTP_ONLY
    # one thread (haproxy is a hop, not the work: on a small machine the gateways need
    # the cores); bodies moved by the kernel (splice), never copied through user space:
    # one GET of 1 GiB went at 0.86 x its rate without haproxy, 0.56 x with copies
    return f"""# made by dstore up; made again at every start
global
    maxconn 4096
    nbthread 1

defaults
    mode {mode}
    timeout connect 5s
    timeout client {IDLE}
    timeout server {IDLE}
    timeout queue 30s
{http_only}    retries 2
    option splice-request
    option splice-response

frontend dstore
    bind 127.0.0.1:{port}
    default_backend gateways

backend gateways
    balance leastconn
    option httpchk GET /readyz
    http-check expect status 200
    default-server inter 1s fall 2 rise 2
{servers}
{s3_part}"""


async def start_haproxy(
    folder: Path,
    port: int,
    gateways: list[str],
    *,
    tls: bool = False,
    s3: tuple[int, list[str]] | None = None,
) -> asyncio.subprocess.Process:
    """haproxy in the foreground as a child process, its configuration and log in
    ``folder`` (``haproxy_config``); returns once its port accepts connections."""
    binary = haproxy_binary()
    config = folder / "haproxy.cfg"
    config.write_text(haproxy_config(port, gateways, tls=tls, s3=s3))
    log_path = folder / "logs" / "haproxy.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log_file:
        proc = await asyncio.create_subprocess_exec(
            binary, "-db", "-f", str(config), stdout=log_file, stderr=log_file
        )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    while True:
        if proc.returncode is not None:
            tail = log_path.read_text(errors="replace")[-600:].strip()
            raise DstoreError(f"haproxy did not start: {tail}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if loop.time() > deadline:
                proc.kill()
                raise DstoreError(f"haproxy did not open port {port}; see {log_path}") from None
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return proc
