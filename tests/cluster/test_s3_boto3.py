"""The S3 API through boto3, a real S3 client, against an in-process cluster: buckets,
objects written and read (whole, ranged, conditional), listings with folders and pages,
batch deletes, one namespace with the native API, and what a wrong key or signature
gets. boto3 is synchronous: each call runs in a thread, the gateway on the loop."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from dstore.auth import S3Key, Scope
from dstore.gateway.app import s3_runner
from tests.conftest import LocalCluster

boto3 = pytest.importorskip("boto3")
from botocore.config import Config  # noqa: E402
from botocore.exceptions import ClientError  # noqa: E402

ACCESS, SECRET = "DSTOREKEY1", "s3cret-s3cret-s3cret-s3cret"
KEYS = [S3Key(ACCESS, SECRET, frozenset({Scope.READ, Scope.WRITE}))]


class S3:
    def __init__(self, cluster: LocalCluster) -> None:
        runner = s3_runner(cluster.runner)  # type: ignore[arg-type]
        assert runner is not None
        self.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        self.cluster = cluster
        self.client = self.make(ACCESS, SECRET)

    def make(self, access: str, secret: str) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=access,
            aws_secret_access_key=secret,
            region_name="us-east-1",
            config=Config(
                signature_version="s3v4",
                s3={"addressing_style": "path"},
                retries={"max_attempts": 1},
            ),
        )

    async def __call__(self, method: str, **kw: Any) -> Any:
        def call() -> Any:
            result = getattr(self.client, method)(**kw)
            if isinstance(result, dict) and "Body" in result:  # read it here, not on the loop
                result["Body"] = result["Body"].read()
            return result

        return await asyncio.to_thread(call)


@pytest.fixture
async def s3(make_cluster: Callable[..., Awaitable[LocalCluster]]) -> AsyncIterator[S3]:
    cluster = await make_cluster(s3_listen="127.0.0.1:0", s3_keys=KEYS)
    yield S3(cluster)


async def _code(call: Awaitable[Any]) -> str:
    try:
        await call
    except ClientError as exc:
        return str(exc.response["Error"]["Code"])
    raise AssertionError("no error")


async def test_buckets_objects_and_listings_through_boto3(s3: S3) -> None:
    assert (await s3("list_buckets"))["Buckets"] == []
    await s3("create_bucket", Bucket="photos")
    await s3("create_bucket", Bucket="photos")  # (again, its owner: 200 in us-east-1)
    assert [b["Name"] for b in (await s3("list_buckets"))["Buckets"]] == ["photos"]
    assert await _code(s3("create_bucket", Bucket="Bad_Name")) == "InvalidBucketName"
    assert await _code(s3("put_object", Bucket="nope", Key="k", Body=b"x")) == "NoSuchBucket"

    small, big = b"hello s3", os.urandom(300_000)
    put = await s3("put_object", Bucket="photos", Key="a/small.txt", Body=small)
    assert put["ETag"]
    await s3("put_object", Bucket="photos", Key="a/big.bin", Body=big)
    await s3("put_object", Bucket="photos", Key="b/c/deep.txt", Body=b"deep")
    await s3("put_object", Bucket="photos", Key="top.txt", Body=b"top")
    got = await s3("get_object", Bucket="photos", Key="a/big.bin")
    assert got["Body"] == big and got["ContentLength"] == len(big)
    assert got["ResponseMetadata"]["RequestId"]  # (x-amz-request-id, streamed answers too)
    ranged = await s3("get_object", Bucket="photos", Key="a/big.bin", Range="bytes=10-19")
    assert ranged["Body"] == big[10:20]
    head = await s3("head_object", Bucket="photos", Key="a/small.txt")
    assert head["ContentLength"] == len(small) and head["ETag"] == put["ETag"]
    # a single-part object's ETag is the MD5 of its bytes, small or chunked
    assert put["ETag"] == f'"{hashlib.md5(small).hexdigest()}"'
    big_head = await s3("head_object", Bucket="photos", Key="a/big.bin")
    assert big_head["ETag"] == f'"{hashlib.md5(big).hexdigest()}"'
    assert await _code(s3("get_object", Bucket="photos", Key="missing")) == "NoSuchKey"
    assert (
        await _code(s3("get_object", Bucket="photos", Key="a/small.txt", IfMatch='"nope"'))
        == "PreconditionFailed"
    )

    folders = await s3("list_objects_v2", Bucket="photos", Delimiter="/")
    assert [c["Key"] for c in folders.get("Contents", [])] == ["top.txt"]
    assert [p["Prefix"] for p in folders["CommonPrefixes"]] == ["a/", "b/"]
    inside = await s3("list_objects_v2", Bucket="photos", Prefix="a/")
    assert [c["Key"] for c in inside["Contents"]] == ["a/big.bin", "a/small.txt"]
    keys: list[str] = []
    token: dict[str, str] = {}
    while True:  # a page of one at a time
        page = await s3("list_objects_v2", Bucket="photos", MaxKeys=1, **token)
        keys += [c["Key"] for c in page.get("Contents", [])]
        if not page["IsTruncated"]:
            break
        token = {"ContinuationToken": page["NextContinuationToken"]}
    assert keys == ["a/big.bin", "a/small.txt", "b/c/deep.txt", "top.txt"]
    v1 = await s3("list_objects", Bucket="photos", Marker="a/small.txt")
    assert [c["Key"] for c in v1["Contents"]] == ["b/c/deep.txt", "top.txt"]

    assert await _code(s3("delete_bucket", Bucket="photos")) == "BucketNotEmpty"
    deleted = await s3(
        "delete_objects",
        Bucket="photos",
        Delete={"Objects": [{"Key": k} for k in keys] + [{"Key": "never-there"}]},
    )
    assert len(deleted["Deleted"]) == 5
    await s3("delete_object", Bucket="photos", Key="never-there")  # (204 all the same)
    await s3("delete_bucket", Bucket="photos")
    assert (await s3("list_buckets"))["Buckets"] == []


async def test_one_namespace_with_the_native_api(s3: S3) -> None:
    """Object K in bucket B is the native file B/K, both ways."""
    await s3("create_bucket", Bucket="shared")
    await s3("put_object", Bucket="shared", Key="dir/file ü.txt", Body=b"from s3")
    response, body = await s3.cluster.get("shared/dir/file ü.txt")
    assert response.status == 200 and body == b"from s3"
    assert (await s3.cluster.put("shared/native.bin", b"from the native API")).status == 201
    got = await s3("get_object", Bucket="shared", Key="native.bin")
    assert got["Body"] == b"from the native API"
    listed = await s3("list_objects_v2", Bucket="shared")
    assert [c["Key"] for c in listed["Contents"]] == ["dir/file ü.txt", "native.bin"]


async def test_a_checksum_the_body_does_not_have_stores_nothing(s3: S3) -> None:
    import base64
    import hashlib

    await s3("create_bucket", Bucket="sums")
    body = os.urandom(200_000)
    good = base64.b64encode(hashlib.sha256(body).digest()).decode()
    await s3("put_object", Bucket="sums", Key="good", Body=body, ChecksumSHA256=good)
    wrong = base64.b64encode(hashlib.sha256(b"other").digest()).decode()
    code = await _code(s3("put_object", Bucket="sums", Key="bad", Body=body, ChecksumSHA256=wrong))
    assert code == "BadDigest"
    assert await _code(s3("head_object", Bucket="sums", Key="bad")) == "404"
    assert (await s3("get_object", Bucket="sums", Key="good"))["Body"] == body


async def test_copy_object_inside_the_cluster(s3: S3) -> None:
    await s3("create_bucket", Bucket="src")
    await s3("create_bucket", Bucket="dst")
    big, small = os.urandom(700_000), b"tiny"  # chunked (64 KiB chunks), and inline
    await s3("put_object", Bucket="src", Key="big.bin", Body=big, ContentType="image/png")
    await s3("put_object", Bucket="src", Key="small", Body=small)
    copied = await s3(
        "copy_object",
        Bucket="dst",
        Key="copy ü.bin",
        CopySource={"Bucket": "src", "Key": "big.bin"},
    )
    assert copied["CopyObjectResult"]["ETag"] == f'"{hashlib.md5(big).hexdigest()}"'
    got = await s3("get_object", Bucket="dst", Key="copy ü.bin")
    assert got["Body"] == big and got["ContentType"] == "image/png"  # (metadata copied)
    await s3(
        "copy_object",
        Bucket="dst",
        Key="small",
        CopySource="src/small",
        MetadataDirective="REPLACE",
        ContentType="text/plain",
    )
    got = await s3("get_object", Bucket="dst", Key="small")
    assert got["Body"] == small and got["ContentType"] == "text/plain"
    missing = s3("copy_object", Bucket="dst", Key="x", CopySource="src/none")
    assert await _code(missing) == "NoSuchKey"
    # the source is untouched, and deleting it leaves the copy whole
    await s3("delete_object", Bucket="src", Key="big.bin")
    assert (await s3("get_object", Bucket="dst", Key="copy ü.bin"))["Body"] == big


async def test_wrong_keys_and_signatures_are_refused(s3: S3) -> None:
    stranger = s3.make("NOBODY1", "whatever-whatever-whatever")
    with pytest.raises(ClientError) as caught:
        await asyncio.to_thread(stranger.list_buckets)
    assert caught.value.response["Error"]["Code"] == "InvalidAccessKeyId"
    forger = s3.make(ACCESS, "not-the-secret-not-the-secret")
    with pytest.raises(ClientError) as caught:
        await asyncio.to_thread(forger.list_buckets)
    assert caught.value.response["Error"]["Code"] == "SignatureDoesNotMatch"


async def test_a_presigned_url_reads_and_then_expires(s3: S3) -> None:
    import aiohttp

    await s3("create_bucket", Bucket="pub")
    await s3("put_object", Bucket="pub", Key="x.txt", Body=b"presigned")
    url = s3.client.generate_presigned_url(
        "get_object", Params={"Bucket": "pub", "Key": "x.txt"}, ExpiresIn=60
    )
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as response:
            assert response.status == 200 and await response.read() == b"presigned"
        async with session.get(url.replace("Signature=", "Signature=0")) as response:
            assert response.status == 403
            assert b"SignatureDoesNotMatch" in await response.read()


async def test_user_metadata_and_content_headers_are_kept(s3: S3) -> None:
    """x-amz-meta-* and the standard content headers come back from GET and HEAD, through
    S3 and the native API; response-* overrides them for one GET; a copy keeps them
    unless told to replace them."""
    await s3("create_bucket", Bucket="meta")
    await s3(
        "put_object",
        Bucket="meta",
        Key="page.html",
        Body=b"<p>hello</p>",
        ContentType="text/html",
        CacheControl="max-age=60",
        ContentDisposition='attachment; filename="page.html"',
        ContentLanguage="de",
        Metadata={"Owner": "ada", "colour": "green"},
    )
    head = await s3("head_object", Bucket="meta", Key="page.html")
    assert head["ContentType"] == "text/html" and head["CacheControl"] == "max-age=60"
    assert head["ContentDisposition"] == 'attachment; filename="page.html"'
    assert head["ContentLanguage"] == "de"
    assert head["Metadata"] == {"owner": "ada", "colour": "green"}
    response, _ = await s3.cluster.get("meta/page.html")
    assert response.headers["Cache-Control"] == "max-age=60"
    assert response.headers["x-amz-meta-owner"] == "ada"
    got = await s3(
        "get_object",
        Bucket="meta",
        Key="page.html",
        ResponseContentType="text/plain",
        ResponseCacheControl="no-store",
    )
    assert got["Body"] == b"<p>hello</p>"
    assert got["ContentType"] == "text/plain" and got["CacheControl"] == "no-store"
    assert got["Metadata"]["owner"] == "ada"
    await s3("copy_object", Bucket="meta", Key="kept", CopySource="meta/page.html")
    assert (await s3("head_object", Bucket="meta", Key="kept"))["Metadata"]["owner"] == "ada"
    await s3(
        "copy_object",
        Bucket="meta",
        Key="replaced",
        CopySource="meta/page.html",
        MetadataDirective="REPLACE",
        Metadata={"new": "1"},
    )
    replaced = await s3("head_object", Bucket="meta", Key="replaced")
    assert replaced["Metadata"] == {"new": "1"} and "CacheControl" not in replaced
    too_much = {f"k{i}": "v" * 100 for i in range(30)}
    put = s3("put_object", Bucket="meta", Key="big-meta", Body=b"x", Metadata=too_much)
    assert await _code(put) == "MetadataTooLarge"
    # the S3 listener's requests are counted apart from the native API's
    assert s3.cluster.session is not None
    async with s3.cluster.session.get(f"{s3.cluster.url}/metrics") as response:
        text = await response.text()
    assert 'dstore_s3_requests_total{method="PUT",status="400"} 1' in text
    assert 'dstore_s3_requests_total{method="HEAD",status="200"} 3' in text


async def test_virtual_hosted_style_with_an_s3_domain(
    make_cluster: Callable[..., Awaitable[LocalCluster]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``--s3-domain``, bucket B is also reached as host ``B.DOMAIN`` (boto3's default
    addressing); path style keeps working. (The test's resolver sends every name under
    the domain to 127.0.0.1, as a wildcard DNS record would.)"""
    import socket

    domain = "s3.dstore.test"
    resolve = socket.getaddrinfo

    def wildcard(host: Any, *args: Any, **kw: Any) -> Any:
        if isinstance(host, str) and (host == domain or host.endswith("." + domain)):
            host = "127.0.0.1"
        return resolve(host, *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", wildcard)
    cluster = await make_cluster(s3_listen="127.0.0.1:0", s3_keys=KEYS, s3_domain=domain)
    s3 = S3(cluster)
    port = s3.url.rpartition(":")[2]
    virtual = boto3.client(
        "s3",
        endpoint_url=f"http://{domain}:{port}",
        aws_access_key_id=ACCESS,
        aws_secret_access_key=SECRET,
        region_name="us-east-1",
        config=Config(signature_version="s3v4", s3={"addressing_style": "virtual"}),
    )

    def through_the_host() -> tuple[bytes, list[str]]:
        virtual.create_bucket(Bucket="vhost")
        virtual.put_object(Bucket="vhost", Key="a/b c.txt", Body=b"virtual")
        body = virtual.get_object(Bucket="vhost", Key="a/b c.txt")["Body"].read()
        listed = virtual.list_objects_v2(Bucket="vhost", Prefix="a/")
        return body, [c["Key"] for c in listed["Contents"]]

    body, keys_listed = await asyncio.to_thread(through_the_host)
    assert body == b"virtual" and keys_listed == ["a/b c.txt"]
    got = await s3("get_object", Bucket="vhost", Key="a/b c.txt")  # (path style still)
    assert got["Body"] == b"virtual"
    response, native = await cluster.get("vhost/a/b c.txt")
    assert response.status == 200 and native == b"virtual"
