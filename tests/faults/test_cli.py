"""The CLI against a real `dstore up` (gateway + 3 storage node processes)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dstore.local import storage_argv
from tests.conftest import ROOT

ENV = dict(os.environ, PYTHONPATH=str(ROOT))


def dstore(
    *args: str, url: str, stdin: bytes | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "dstore", *args],
        input=stdin,
        capture_output=True,
        env=ENV | {"DSTORE_URL": url},
        timeout=60,
        cwd=cwd,
    )


@pytest.fixture
def local_cluster(tmp_path: Path) -> Iterator[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "dstore", "up", "--port", "0", "--data-dir", str(tmp_path / "data")],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=ENV,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert "dstore is up" in line, line
    url = line.split()[3]
    yield url
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 0
    # the storage node processes are gone too
    assert (tmp_path / "data" / "cluster-secret").stat().st_mode & 0o777 == 0o600


def test_cli_round_trips_a_file_through_dstore_up(local_cluster: str, tmp_path: Path) -> None:
    source = tmp_path / "source.bin"
    data = os.urandom(9 * 1024 * 1024 + 11)
    source.write_bytes(data)
    put = dstore("--json", "put", str(source), "dir/file.bin", url=local_cluster)
    assert put.returncode == 0, put.stderr
    assert json.loads(put.stdout)["size"] == len(data)
    out = tmp_path / "out.bin"
    got = dstore("get", "dir/file.bin", "-o", str(out), url=local_cluster)
    assert got.returncode == 0, got.stderr
    assert out.read_bytes() == data
    piped = dstore("put", "-", "piped", url=local_cluster, stdin=b"from stdin")
    assert piped.returncode == 0, piped.stderr
    to_stdout = dstore("get", "piped", "-o", "-", url=local_cluster)
    assert to_stdout.stdout == b"from stdin"
    listing = dstore("ls", "dir/", url=local_cluster)
    assert listing.stdout.decode().split() == [str(len(data)), "dir/file.bin"]
    stat = json.loads(dstore("stat", "piped", "--json", url=local_cluster).stdout)
    assert stat["Content-Length"] == "10" and stat["ETag"]
    cluster = json.loads(dstore("cluster", "--json", url=local_cluster).stdout)
    assert [n["state"] for n in cluster["nodes"]] == ["up"] * 3 and cluster["files"] == 2
    assert dstore("rm", "piped", url=local_cluster).returncode == 0
    missing = dstore("get", "piped", "-o", str(tmp_path / "x"), url=local_cluster)
    assert missing.returncode != 0
    lines = missing.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "404" in lines[0], missing.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.dstore-partial").exists()


def test_dstore_up_serves_s3_with_the_key_it_prints(tmp_path: Path) -> None:
    """As a new user sees it: the S3 line names the port and the key pair, kept 0600 in
    data/s3-credentials, and boto3 works with exactly what it printed."""
    boto3 = pytest.importorskip("boto3")
    data = tmp_path / "data"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dstore", "up", "--port", "0", "--data-dir", str(data)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=ENV,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        while line and not line.startswith("S3 API:"):
            line = proc.stdout.readline()
        said = dict(w.split("=", 1) for w in line.replace(";", " ").split() if "=" in w)
        s3 = boto3.client(
            "s3",
            endpoint_url=line.split()[2],
            aws_access_key_id=said["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=said["AWS_SECRET_ACCESS_KEY"],
            region_name="us-east-1",
        )
        s3.create_bucket(Bucket="first")
        s3.put_object(Bucket="first", Key="hello.txt", Body=b"hello")
        assert s3.get_object(Bucket="first", Key="hello.txt")["Body"].read() == b"hello"
        credentials = data / "s3-credentials"
        assert credentials.read_text().strip() == (
            f"{said['AWS_ACCESS_KEY_ID']}:{said['AWS_SECRET_ACCESS_KEY']}"
        )
        assert credentials.stat().st_mode & 0o777 == 0o600
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0


def test_the_cli_speaks_to_people_and_to_scripts(local_cluster: str, tmp_path: Path) -> None:
    """Tables and one-line summaries for people; --json for scripts; client options
    before or after the command; the type from the file's name; names as they are."""
    photo = tmp_path / "名前 ü.jpg"
    photo.write_bytes(os.urandom(5000))
    put = dstore("put", str(photo), url=local_cluster)
    assert put.returncode == 0, put.stderr
    line = put.stdout.decode().strip()
    assert re.fullmatch(r"put 名前 ü\.jpg  4\.9 KiB  (inline|1 chunk)  [\d.]+ MB/s", line), line
    stat = dstore("stat", "名前 ü.jpg", url=local_cluster).stdout.decode()
    assert "image/jpeg" in stat and "4.9 KiB (5,000 bytes)" in stat and "GMT (" in stat
    typed = dstore("put", str(photo), "raw", "--content-type", "text/plain", url=local_cluster)
    assert typed.returncode == 0, typed.stderr
    assert "text/plain" in dstore("stat", "raw", url=local_cluster).stdout.decode()
    # the options before the command, as aws --endpoint-url users type them
    before = subprocess.run(
        [sys.executable, "-m", "dstore", "--url", local_cluster, "--json", "stat", "raw"],
        capture_output=True,
        env={k: v for k, v in ENV.items() if k != "DSTORE_URL"},
        timeout=60,
    )
    assert before.returncode == 0, before.stderr
    assert json.loads(before.stdout)["Content-Type"] == "text/plain"
    table = dstore("cluster", url=local_cluster).stdout.decode()
    lines = table.splitlines()
    assert lines[0].startswith("2 files") and "3/3 nodes up" in lines[0]
    header = next(line for line in lines if "state" in line)
    assert all(word in header for word in ("node", "address", "used", "capacity", "last seen"))
    assert sum(" up " in line for line in lines) == 3
    long = dstore("ls", "-l", url=local_cluster).stdout.decode()
    assert "4.9 KiB" in long and "名前 ü.jpg" in long and "\\u" not in long
    listed = json.loads(dstore("ls", "--json", url=local_cluster).stdout)
    assert sorted(f["name"] for f in listed) == ["raw", "名前 ü.jpg"]


def test_dstore_up_says_where_logs_go_and_follows_them(tmp_path: Path) -> None:
    import queue
    import threading

    data = tmp_path / "data"
    argv = [sys.executable, "-m", "dstore", "up", "--port", "0", "--s3-port", "-1"]
    proc = subprocess.Popen(
        [*argv, "--data-dir", str(data), "--follow"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        url = proc.stdout.readline().split()[3]
        assert proc.stdout.readline().strip() == f"dashboard: {url}/ui/"
        said = proc.stdout.readline()
        assert said.startswith("logs: gateway ") and "--follow" in said, said
        for name in ("gateway", "storage-1", "storage-2", "storage-3"):
            assert str(data / "logs" / f"{name}.log") in said
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(
            target=lambda: [lines.put(line) for line in proc.stderr],
            daemon=True,  # type: ignore[union-attr]
        ).start()
        time.sleep(0.5)  # (the tails start at the files' ends)
        body = os.urandom(100_000)  # (on the nodes: a small one stays inline)
        assert dstore("put", "-", "followed.txt", url=url, stdin=body).returncode == 0
        seen: set[str] = set()
        deadline = time.monotonic() + 20
        while not {"gateway", "storage"} <= seen and time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            if (
                line.startswith("gateway   | ")
                and "http_request" in line
                and "followed.txt" in line
            ):
                seen.add("gateway")
            if re.match(r"storage-\d \| .* request .*op=put", line):
                seen.add("storage")
        assert seen == {"gateway", "storage"}
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0


def test_get_into_a_pipe_or_device_writes_to_it_and_leaves_it_one(
    local_cluster: str, tmp_path: Path
) -> None:
    """``-o /dev/null`` or a FIFO: the bytes go into it, and it stays what it was (a
    partial file renamed over it once turned /dev/null into a plain file)."""
    import stat
    import threading

    data = os.urandom(300_000)
    assert dstore("put", "-", "pipe.bin", url=local_cluster, stdin=data).returncode == 0
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    result = dstore("get", "pipe.bin", "-o", str(fifo), url=local_cluster)
    reader.join(30)
    assert result.returncode == 0, result.stderr
    assert got == [data] and stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert not list(tmp_path.glob("*.dstore-partial"))


def test_a_reader_that_goes_away_ends_get_quietly(local_cluster: str, tmp_path: Path) -> None:
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(8 * 1024 * 1024))
    assert dstore("put", str(source), "big", url=local_cluster).returncode == 0
    get = subprocess.Popen(
        [sys.executable, "-m", "dstore", "get", "big", "-o", "-"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV | {"DSTORE_URL": local_cluster},
    )
    assert get.stdout is not None and get.stderr is not None
    assert len(get.stdout.read(1000)) == 1000
    get.stdout.close()  # as `| head -c 1000` does
    assert get.wait(30) == 128 + signal.SIGPIPE
    assert get.stderr.read() == b""


def test_cli_reports_an_unreachable_gateway_in_one_line(tmp_path: Path) -> None:
    result = dstore("ls", url="http://127.0.0.1:9")
    assert result.returncode != 0
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dstore: cannot reach"), result.stderr


def test_dstore_up_takes_gateway_settings_from_the_environment(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dstore", "up", "--port", "0", "--data-dir", str(tmp_path / "d")],
        capture_output=True,
        env=ENV | {"DSTORE_CACHE_SIZE": "lots"},
        timeout=60,
    )
    assert result.returncode != 0
    assert "DSTORE_CACHE_SIZE" in result.stderr.decode().strip().splitlines()[-1]
    # the storage node processes it started are stopped again
    out = subprocess.run(["pgrep", "-f", str(tmp_path / "d")], capture_output=True)
    assert out.stdout == b""


def _up_logs(tmp_path: Path, level: str) -> tuple[list[dict[str, object]], str]:
    """One PUT through a `dstore up` logging JSON at ``level``: the gateway's log lines
    and the storage nodes' log files."""
    data_dir = tmp_path / level
    proc = subprocess.Popen(
        [sys.executable, "-m", "dstore", "up", "--port", "0", "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV | {"DSTORE_LOG_FORMAT": "json", "DSTORE_LOG_LEVEL": level},
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert "dstore is up" in line, line
    # (over inline_max, so that the file goes to the nodes and they log the request)
    put = dstore("put", "-", "logged", url=line.split()[3], stdin=b"x" * 5000)
    assert put.returncode == 0, put.stderr
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    nodes = "".join(p.read_text() for p in sorted((data_dir / "logs").glob("storage-*.log")))
    return [json.loads(raw) for raw in stderr.splitlines() if raw.startswith("{")], nodes


def test_dstore_up_logs_json_lines_at_the_level_the_environment_sets(tmp_path: Path) -> None:
    lines, nodes = _up_logs(tmp_path, "info")
    (canonical,) = [e for e in lines if e.get("event") == "http_request"]
    assert canonical["method"] == "PUT" and canonical["name"] == "logged"
    assert canonical["status"] == 201 and canonical["bytes_in"] == 5000
    assert canonical["level"] == "info" and canonical["timestamp"]
    # the nodes' lines for that request carry its request id
    assert nodes.count(f'"trace":"{canonical["trace"]}"') == 2, nodes

    quiet, quiet_nodes = _up_logs(tmp_path, "warning")
    assert not [e for e in quiet if e.get("event") == "http_request"]
    assert '"event":"request"' not in quiet_nodes


def test_dstore_up_tls_makes_a_private_ca_and_serves_https_only(tmp_path: Path) -> None:
    data = tmp_path / "data"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dstore", "up", "--tls", "--port", "0", "--data-dir", str(data)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=ENV,
        text=True,
    )
    assert proc.stdout is not None
    try:
        line = proc.stdout.readline()
        assert "dstore is up: https://" in line, line
        url = line.split()[3]
        assert proc.stdout.readline().strip() == f"dashboard: {url}/ui/"
        assert f"DSTORE_CA={data / 'tls' / 'ca.pem'}" in proc.stdout.readline()
        tls = data / "tls"
        assert {p.name for p in tls.iterdir()} == {
            "ca.pem", "ca.key", "gateway.pem", "gateway.key", "storage.pem", "storage.key"
        }  # fmt: skip
        assert all(p.stat().st_mode & 0o777 == 0o600 for p in tls.iterdir())
        ca = ["--ca", str(tls / "ca.pem")]
        source = tmp_path / "source.bin"
        source.write_bytes(os.urandom(5 << 20))
        assert dstore("put", *ca, str(source), "f", url=url).returncode == 0
        got = dstore("get", *ca, "f", "-o", "-", url=url)
        assert got.returncode == 0 and got.stdout == source.read_bytes()
        # without the CA the certificate is not trusted: one line, no bytes
        untrusted = dstore("ls", url=url)
        assert untrusted.returncode != 0 and len(untrusted.stderr.splitlines()) == 1
        assert b"certificate" in untrusted.stderr, untrusted.stderr
        plain = dstore("ls", url=url.replace("https://", "http://"))
        assert plain.returncode != 0
        # a further node joins over HTTPS, showing its cluster certificate, and is used
        node = subprocess.Popen(
            [
                *storage_argv(tmp_path / "joiner"),
                *("--join", url),
                *("--tls-cert", str(tls / "storage.pem"), "--tls-key", str(tls / "storage.key")),
                *("--tls-ca", str(tls / "ca.pem")),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=ENV | {"DSTORE_CLUSTER_SECRET": (data / "cluster-secret").read_text().strip()},
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                cluster = json.loads(dstore("cluster", "--json", *ca, url=url).stdout)
                if [n["state"] for n in cluster["nodes"]] == ["up"] * 4:
                    break
                assert time.monotonic() < deadline, cluster
                time.sleep(0.2)
        finally:
            node.send_signal(signal.SIGTERM)
            assert node.wait(30) == 0
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
