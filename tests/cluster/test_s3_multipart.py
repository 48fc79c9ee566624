"""S3 multipart uploads through boto3 against an in-process cluster: boto3's managed
transfers (parts uploaded in parallel, ranged parallel downloads), each operation by hand
(create, upload part, upload part copy, list parts, list uploads, complete, abort), the
errors S3 gives for wrong completions, and that nothing is left on the nodes after an
abort, a replaced part, a completion that leaves parts out, or an upload that expires."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from dstore.gateway import keys
from tests.cluster.test_s3_boto3 import KEYS, S3, _code
from tests.conftest import LocalCluster, chunk_files, live_chunk_ids, wait_for

boto3 = pytest.importorskip("boto3")
from boto3.s3.transfer import TransferConfig  # noqa: E402

MiB = 1 << 20


@pytest.fixture
async def s3(make_cluster: Callable[..., Awaitable[LocalCluster]]) -> AsyncIterator[S3]:
    cluster = await make_cluster(s3_listen="127.0.0.1:0", s3_keys=KEYS, chunk_size=1 << 20)
    yield S3(cluster)


def _md5_of_parts(parts: list[bytes]) -> str:
    digests = b"".join(hashlib.md5(p).digest() for p in parts)
    return f'"{hashlib.md5(digests).hexdigest()}-{len(parts)}"'


async def _stored_chunks(cluster: LocalCluster) -> set[str]:
    return {p.name for n in cluster.nodes for p in chunk_files(n.config.data_dir)}


async def test_managed_transfers_upload_in_parts_and_download_in_ranges(s3: S3) -> None:
    await s3("create_bucket", Bucket="big")
    data = os.urandom(23 * MiB + 12345)
    config = TransferConfig(
        multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_concurrency=4
    )

    def transfer() -> tuple[bytes, dict[str, Any]]:
        s3.client.upload_fileobj(io.BytesIO(data), "big", "data.bin", Config=config)
        out = io.BytesIO()
        s3.client.download_fileobj("big", "data.bin", out, Config=config)
        return out.getvalue(), s3.client.head_object(Bucket="big", Key="data.bin")

    got, head = await asyncio.to_thread(transfer)
    assert got == data
    pieces = [data[i : i + 5 * MiB] for i in range(0, len(data), 5 * MiB)]
    assert head["ETag"] == _md5_of_parts(pieces) and head["ContentLength"] == len(data)
    # the same bytes through the native API: one file, its chunks in order
    response, body = await s3.cluster.get("big/data.bin")
    assert response.status == 200 and body == data
    await s3.cluster.wait_reaped()  # (no part's chunks left over)


async def test_each_multipart_operation_by_hand(s3: S3) -> None:
    await s3("create_bucket", Bucket="mpu")
    await s3("put_object", Bucket="mpu", Key="source", Body=os.urandom(7 * MiB))
    source = (await s3("get_object", Bucket="mpu", Key="source"))["Body"]
    made = await s3(
        "create_multipart_upload",
        Bucket="mpu",
        Key="dir/obj",
        ContentType="video/mp4",
        Metadata={"camera": "x100"},
    )
    upload = made["UploadId"]
    other = (await s3("create_multipart_upload", Bucket="mpu", Key="dir/other"))["UploadId"]
    one, two = os.urandom(6 * MiB), os.urandom(1000)
    p1 = await s3(
        "upload_part", Bucket="mpu", Key="dir/obj", UploadId=upload, PartNumber=1, Body=one
    )
    copied = await s3(
        "upload_part_copy",
        Bucket="mpu",
        Key="dir/obj",
        UploadId=upload,
        PartNumber=2,
        CopySource={"Bucket": "mpu", "Key": "source"},
        CopySourceRange="bytes=1000-5243879",  # (5 MiB + 1000 bytes, from byte 1000)
    )
    p3 = await s3(
        "upload_part", Bucket="mpu", Key="dir/obj", UploadId=upload, PartNumber=3, Body=two
    )
    middle = source[1000:5243880]
    assert copied["CopyPartResult"]["ETag"] == f'"{hashlib.md5(middle).hexdigest()}"'
    listed = await s3("list_parts", Bucket="mpu", Key="dir/obj", UploadId=upload, MaxParts=2)
    assert [p["PartNumber"] for p in listed["Parts"]] == [1, 2] and listed["IsTruncated"]
    assert listed["Parts"][0]["Size"] == len(one)
    rest = await s3("list_parts", Bucket="mpu", Key="dir/obj", UploadId=upload, PartNumberMarker=2)
    assert [p["PartNumber"] for p in rest["Parts"]] == [3] and not rest["IsTruncated"]
    uploads = await s3("list_multipart_uploads", Bucket="mpu")
    assert [(u["Key"], u["UploadId"]) for u in uploads["Uploads"]] == sorted(
        [("dir/obj", upload), ("dir/other", other)]
    )
    folded = await s3("list_multipart_uploads", Bucket="mpu", Delimiter="/")
    assert [p["Prefix"] for p in folded["CommonPrefixes"]] == ["dir/"]
    assert "Uploads" not in folded
    # wrong completions change nothing
    tags = [p1["ETag"], copied["CopyPartResult"]["ETag"], p3["ETag"]]

    def completion(*numbers: int) -> dict[str, Any]:
        return {"Parts": [{"PartNumber": n, "ETag": tags[n - 1]} for n in numbers]}

    async def complete(parts: dict[str, Any], key: str = "dir/obj") -> Any:
        return await s3(
            "complete_multipart_upload",
            Bucket="mpu",
            Key=key,
            UploadId=upload,
            MultipartUpload=parts,
        )

    assert await _code(complete(completion(2, 1, 3))) == "InvalidPartOrder"
    assert await _code(complete(completion(1, 3, 2))) == "InvalidPartOrder"
    wrong = {"Parts": [{"PartNumber": 1, "ETag": tags[1]}]}
    assert await _code(complete(wrong)) == "InvalidPart"
    missing = {"Parts": [{"PartNumber": 3, "ETag": tags[2]}, {"PartNumber": 4, "ETag": tags[2]}]}
    assert await _code(complete(missing)) == "InvalidPart"  # (no part 4)
    assert await _code(complete(completion(1), key="dir/elsewhere")) == "NoSuchUpload"
    done = await complete(completion(1, 2, 3))
    assert done["ETag"] == _md5_of_parts([one, middle, two])
    got = await s3("get_object", Bucket="mpu", Key="dir/obj")
    assert got["Body"] == one + middle + two
    assert got["ContentType"] == "video/mp4" and got["Metadata"] == {"camera": "x100"}
    ranged = await s3("get_object", Bucket="mpu", Key="dir/obj", Range="bytes=6291450-6291460")
    assert ranged["Body"] == (one + middle)[6291450:6291461]
    assert await _code(complete(completion(1, 2, 3))) == "NoSuchUpload"  # (once only)
    assert await _code(s3("list_parts", Bucket="mpu", Key="dir/obj", UploadId=upload)) == (
        "NoSuchUpload"
    )
    await s3("abort_multipart_upload", Bucket="mpu", Key="dir/other", UploadId=other)
    assert "Uploads" not in await s3("list_multipart_uploads", Bucket="mpu")
    await s3.cluster.wait_reaped()


async def test_a_small_part_but_the_last_is_too_small(s3: S3) -> None:
    await s3("create_bucket", Bucket="small")
    upload = (await s3("create_multipart_upload", Bucket="small", Key="k"))["UploadId"]
    tags = []
    for number, size in ((1, 1 * MiB), (2, 5 * MiB)):
        part = await s3(
            "upload_part",
            Bucket="small",
            Key="k",
            UploadId=upload,
            PartNumber=number,
            Body=os.urandom(size),
        )
        tags.append({"PartNumber": number, "ETag": part["ETag"]})
    done = s3(
        "complete_multipart_upload",
        Bucket="small",
        Key="k",
        UploadId=upload,
        MultipartUpload={"Parts": tags},
    )
    assert await _code(done) == "EntityTooSmall"
    # the last part may be small: a completion of part 2 alone, or 2 then a small 3
    await s3(
        "complete_multipart_upload",
        Bucket="small",
        Key="k",
        UploadId=upload,
        MultipartUpload={"Parts": tags[1:]},
    )
    assert (await s3("head_object", Bucket="small", Key="k"))["ContentLength"] == 5 * MiB
    await s3.cluster.wait_reaped()  # (part 1, left out, reclaimed)


async def test_abandoned_and_replaced_parts_are_reclaimed(
    make_cluster: Callable[..., Awaitable[LocalCluster]],
) -> None:
    cluster = await make_cluster(
        s3_listen="127.0.0.1:0", s3_keys=KEYS, chunk_size=1 << 20, s3_multipart_expiry=2.0
    )
    s3 = S3(cluster)
    await s3("create_bucket", Bucket="gone")
    upload = (await s3("create_multipart_upload", Bucket="gone", Key="k"))["UploadId"]
    for _ in range(2):  # part 1 twice: the first is given up at once
        await s3(
            "upload_part",
            Bucket="gone",
            Key="k",
            UploadId=upload,
            PartNumber=1,
            Body=os.urandom(3 * MiB),
        )
    meta = cluster.app[keys.META]
    assert await _stored_chunks(cluster) - await live_chunk_ids(meta)  # (the parts')

    async def reclaimed() -> bool:
        return not await _stored_chunks(cluster)

    await wait_for(reclaimed, timeout=20)  # expired after 2 s, then reaped
    assert await _code(s3("list_parts", Bucket="gone", Key="k", UploadId=upload)) == (
        "NoSuchUpload"
    )
    part = s3("upload_part", Bucket="gone", Key="k", UploadId=upload, PartNumber=2, Body=b"x")
    assert await _code(part) == "NoSuchUpload"
