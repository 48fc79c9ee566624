"""Security checks do not live in ``assert`` statements: a storage node run under
``python -O`` (asserts removed) still refuses every request without the secret."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.conftest import ROOT

ATTACK = textwrap.dedent(
    """
    import asyncio, os, socket, sys, tempfile
    from pathlib import Path
    import msgpack
    from dstore.config import StorageConfig
    from dstore.protocol.codec import encode_frame
    from dstore.protocol.messages import Error, Hello, Stat, to_header
    from dstore.storage.node import StorageNode

    def frames(sock):
        data = b""
        while True:
            while len(data) >= 4:
                size = int.from_bytes(data[:4], "big")
                if len(data) < 4 + size:
                    break
                yield msgpack.unpackb(data[4 : 4 + size])
                data = data[4 + size :]
            try:
                more = sock.recv(65536)
            except ConnectionResetError:  # refused: closed with our frames unread
                return
            if not more:
                return
            data += more

    async def main():
        if not sys.flags.optimize:
            sys.exit("not optimized")
        with tempfile.TemporaryDirectory() as tmp:
            node = StorageNode(StorageConfig(port=0, data_dir=Path(tmp), cluster_secret="s" * 16))
            await node.start()
            def attack():
                sock = socket.create_connection(("127.0.0.1", node.port), timeout=5)
                sock.sendall(encode_frame(to_header(Hello(nonce=os.urandom(32)))))
                sock.sendall(encode_frame(to_header(Error(code="x", message="let me in"))))
                sock.sendall(encode_frame(to_header(Stat(rid=1))))
                got = [f.get("op") for f in frames(sock)]
                sock.close()
                return got
            got = await asyncio.to_thread(attack)
            await node.stop(grace=0)
        print(got)
        if "welcome" in got or "stat_reply" in got:
            sys.exit("the node let an unauthenticated client in")

    asyncio.run(main())
    """
)


def test_a_node_under_python_O_refuses_an_error_frame_in_place_of_auth() -> None:
    done = subprocess.run(
        [sys.executable, "-O", "-c", ATTACK],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:] + done.stdout
    assert "challenge" in done.stdout  # the handshake went as far as the node's proof


# every test of the handshake, its phases and what a node does before a peer is verified
HANDSHAKE_SUITE = [
    "tests/unit/test_protocol.py",
    "tests/cluster/test_storage_node.py::test_wrong_secret_gets_nothing_done",
    "tests/cluster/test_storage_node.py::test_unauthenticated_connection_can_do_nothing",
    "tests/cluster/test_storage_node.py::test_garbage_closes_that_connection_only",
    "tests/cluster/test_storage_node.py::test_an_unauthenticated_peer_gets_no_big_frame_buffered",
    "tests/cluster/test_storage_node.py::test_peers_that_never_authenticate_are_capped",
    "tests/cluster/test_tls.py::test_a_node_talks_only_to_holders_of_a_cluster_certificate",
]
RUN_OPTIMIZED = (
    "import sys, pytest\n"
    "if not sys.flags.optimize:\n"
    "    sys.exit('not optimized')\n"
    "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', *sys.argv[1:]]))\n"
)


def test_the_handshake_suite_passes_under_python_O() -> None:
    """The same tests, with every ``assert`` in dstore removed (pytest keeps its own)."""
    done = subprocess.run(
        [sys.executable, "-O", "-c", RUN_OPTIMIZED, *HANDSHAKE_SUITE],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    summary = done.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary and "deselected" not in summary
