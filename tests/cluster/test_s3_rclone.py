"""rclone from Debian, as its users run it, against the S3 API of an in-process cluster:
a tree synced up, checked (by MD5, against the ETags) and synced back byte for byte."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from dstore.auth import S3Key, Scope
from dstore.gateway.app import s3_runner
from tests.conftest import LocalCluster

ACCESS, SECRET = "RCLONEKEY1", "rclone-secret-rclone-secret"


def _rclone() -> str:
    found = shutil.which("rclone")
    if found is None:
        reason = "rclone is not installed (Debian: apt-get install rclone)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return found


async def test_rclone_syncs_a_tree_up_and_back(
    make_cluster: Callable[..., Awaitable[LocalCluster]], tmp_path: Path
) -> None:
    rclone = _rclone()
    keys = [S3Key(ACCESS, SECRET, frozenset({Scope.READ, Scope.WRITE}))]
    cluster = await make_cluster(s3_listen="127.0.0.1:0", s3_keys=keys)
    runner = s3_runner(cluster.runner)  # type: ignore[arg-type]
    assert runner is not None
    env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
    env |= {
        "RCLONE_CONFIG_DS_TYPE": "s3",
        "RCLONE_CONFIG_DS_PROVIDER": "Other",
        "RCLONE_CONFIG_DS_ENDPOINT": f"http://127.0.0.1:{runner.addresses[0][1]}",
        "RCLONE_CONFIG_DS_ACCESS_KEY_ID": ACCESS,
        "RCLONE_CONFIG_DS_SECRET_ACCESS_KEY": SECRET,
        "RCLONE_CONFIG_DS_FORCE_PATH_STYLE": "true",
        "RCLONE_CONFIG": str(tmp_path / "rclone.conf"),
    }

    async def run(*args: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            rclone, *args, env=env, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 0, err.decode()
        return out.decode() + err.decode()  # (rclone says what it checked on stderr)

    up = tmp_path / "up"
    for name, size in [("a/f1.bin", 70_000), ("a/f2.bin", 300_000), ("a/b/x.txt", 6),
                       ("top.txt", 0), ("ü/名前.txt", 1000)]:  # fmt: skip
        (up / name).parent.mkdir(parents=True, exist_ok=True)
        (up / name).write_bytes(os.urandom(size))
    await run("mkdir", "ds:tree")
    await run("sync", str(up), "ds:tree")
    checked = await run("check", str(up), "ds:tree")
    assert "0 differences found" in checked and "5 matching files" in checked
    listed = [line for line in (await run("lsf", "-R", "--files-only", "ds:tree")).split("\n")
              if line and "NOTICE" not in line]  # fmt: skip
    assert sorted(listed) == sorted(["a/f1.bin", "a/f2.bin", "a/b/x.txt", "top.txt", "ü/名前.txt"])
    back = tmp_path / "back"
    await run("sync", "ds:tree", str(back))
    for path in up.rglob("*"):
        if path.is_file():
            assert (back / path.relative_to(up)).read_bytes() == path.read_bytes(), path
    # a file changed and one removed upstream: the next sync follows
    (up / "top.txt").write_bytes(b"changed")
    (up / "a/f1.bin").unlink()
    await run("sync", str(up), "ds:tree")
    assert "0 differences found" in await run("check", str(up), "ds:tree")
