"""aws-cli (``pip install awscli``), as its users run it, against the S3 API of an
in-process cluster: ``aws s3 mb``, ``cp`` up and down (a file large enough for its
multipart upload and its ranged, parallel download), ``sync`` of a tree both ways, ``ls``
and ``rm --recursive``; and ``aws s3api`` for a head with the metadata it set."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from dstore.auth import S3Key, Scope
from dstore.gateway.app import s3_runner
from tests.conftest import LocalCluster

ACCESS, SECRET = "AWSCLIKEY1", "awscli-secret-awscli-secret"
AWS = Path(sys.executable).parent / "aws"


async def test_aws_s3_cp_and_sync_up_and_back(
    make_cluster: Callable[..., Awaitable[LocalCluster]], tmp_path: Path
) -> None:
    if not AWS.exists():
        reason = "aws-cli is not installed (pip install awscli: the test extra has it)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    keys = [S3Key(ACCESS, SECRET, frozenset({Scope.READ, Scope.WRITE}))]
    cluster = await make_cluster(s3_listen="127.0.0.1:0", s3_keys=keys, chunk_size=1 << 20)
    runner = s3_runner(cluster.runner)  # type: ignore[arg-type]
    assert runner is not None
    endpoint = f"http://127.0.0.1:{runner.addresses[0][1]}"
    config = tmp_path / "aws-config"
    config.write_text("[default]\nregion = us-east-1\ns3 =\n    addressing_style = path\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env |= {
        "AWS_ACCESS_KEY_ID": ACCESS,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_CONFIG_FILE": str(config),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
    }

    async def aws(*args: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            str(AWS), "--endpoint-url", endpoint, *args, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 0, (args, err.decode())
        return out.decode()

    await aws("s3", "mb", "s3://cli")
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(20 << 20))  # (over aws-cli's 8 MiB multipart threshold)
    await aws("s3", "cp", str(big), "s3://cli/dir/big.bin", "--content-type", "video/mp4")
    await aws("s3", "cp", "s3://cli/dir/big.bin", str(tmp_path / "down.bin"))
    assert (tmp_path / "down.bin").read_bytes() == big.read_bytes()
    head = json.loads(await aws("s3api", "head-object", "--bucket", "cli", "--key", "dir/big.bin"))
    assert head["ContentType"] == "video/mp4" and head["ContentLength"] == 20 << 20
    assert head["ETag"].endswith('-3"')  # (8 MiB parts: an S3 multipart ETag)
    tree = tmp_path / "tree"
    for name, size in [("a/one.txt", 5), ("a/b/two.bin", 200_000), ("名前 ü.txt", 10)]:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_bytes(os.urandom(size))
    await aws("s3", "sync", str(tree), "s3://cli/tree")
    listed = await aws("s3", "ls", "--recursive", "s3://cli/tree/")
    keys = sorted(line.split(None, 3)[3] for line in listed.splitlines())  # (date time size key)
    assert keys == ["tree/a/b/two.bin", "tree/a/one.txt", "tree/名前 ü.txt"]
    back = tmp_path / "back"
    await aws("s3", "sync", "s3://cli/tree", str(back))
    for path in tree.rglob("*"):
        if path.is_file():
            assert (back / path.relative_to(tree)).read_bytes() == path.read_bytes(), path
    # a second sync has nothing to do; a file removed upstream goes with --delete
    assert (await aws("s3", "sync", str(tree), "s3://cli/tree")).strip() == ""
    (tree / "a/one.txt").unlink()
    removed = await aws("s3", "sync", "--delete", str(tree), "s3://cli/tree")
    assert "delete: s3://cli/tree/a/one.txt" in removed
    await aws("s3", "rm", "--recursive", "s3://cli/")
    assert (await aws("s3", "ls", "--recursive", "s3://cli/")).strip() == ""
    await aws("s3", "rb", "s3://cli")
    await cluster.wait_reaped()
