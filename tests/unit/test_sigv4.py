"""AWS Signature Version 4 against AWS's published examples: the SigV4 test suite's
vanilla requests and the S3 documentation's examples (GET with a range, PUT with a
payload, bucket sub-resources, a listing, a presigned URL, and a streaming upload's seed
and chunk signatures); then what ``verify`` refuses."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import pytest

from dstore.s3.sigv4 import (
    EMPTY_SHA256,
    MAX_SKEW,
    STREAMING,
    UNSIGNED,
    S3Error,
    canonical_request,
    chunk_signature,
    request_time,
    scope,
    signature,
    signing_key,
    string_to_sign,
    verify,
)

S3_KEY, S3_SECRET = "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
SUITE_SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"  # the test suite's (AKIDEXAMPLE)
S3_DATE = "20130524T000000Z"


def h(**headers: str) -> dict[str, list[str]]:
    return {k.replace("_", "-"): [v] for k, v in headers.items()}


def sign(
    secret: str,
    amz_date: str,
    region: str,
    service: str,
    method: str,
    path: str,
    query: Sequence[tuple[str, str]],
    headers: Mapping[str, Sequence[str]],
    payload: str,
) -> str:
    signed = sorted(headers)
    request = canonical_request(method, path, query, headers, signed, payload)
    text = string_to_sign(amz_date, scope(amz_date[:8], region, service), request)
    return signature(signing_key(secret, amz_date[:8], region, service), text)


def test_the_test_suites_vanilla_get() -> None:
    headers = h(host="example.amazonaws.com", x_amz_date="20150830T123600Z")
    request = canonical_request("GET", "/", [], headers, ["host", "x-amz-date"], EMPTY_SHA256)
    assert request == (
        "GET\n/\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\n"
        "host;x-amz-date\n" + EMPTY_SHA256
    )
    got = sign(SUITE_SECRET, "20150830T123600Z", "us-east-1", "service", "GET", "/", [],
               headers, EMPTY_SHA256)  # fmt: skip
    assert got == "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"


def test_the_2011_suites_query_order_and_date_header() -> None:
    headers = h(date="Mon, 09 Sep 2011 23:36:00 GMT", host="host.foo.com")
    request = canonical_request(
        "GET", "/", [("foo", "Zoo"), ("foo", "aha")], headers, ["date", "host"], EMPTY_SHA256
    )
    digest = hashlib.sha256(request.encode()).hexdigest()
    assert digest == "e25f777ba161a0f1baf778a87faf057187cf5987f17953320e3ca399feb5f00d"
    text = string_to_sign("20110909T233600Z", scope("20110909", "us-east-1", "host"), request)
    key = signing_key(SUITE_SECRET, "20110909", "us-east-1", "host")
    assert signature(key, text) == (
        "be7148d34ebccdc6423b19085378aa0bee970bdc61d144bd1a8c48c33079ab09"
    )


def test_s3_get_object_with_a_range() -> None:
    headers = h(host="examplebucket.s3.amazonaws.com", range="bytes=0-9",
                x_amz_content_sha256=EMPTY_SHA256, x_amz_date=S3_DATE)  # fmt: skip
    got = sign(S3_SECRET, S3_DATE, "us-east-1", "s3", "GET", "/test.txt", [], headers,
               EMPTY_SHA256)  # fmt: skip
    assert got == "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"


def test_s3_put_object_with_a_signed_payload() -> None:
    body = b"Welcome to Amazon S3."
    payload = hashlib.sha256(body).hexdigest()
    headers = h(date="Fri, 24 May 2013 00:00:00 GMT", host="examplebucket.s3.amazonaws.com",
                x_amz_content_sha256=payload, x_amz_date=S3_DATE,
                x_amz_storage_class="REDUCED_REDUNDANCY")  # fmt: skip
    got = sign(S3_SECRET, S3_DATE, "us-east-1", "s3", "PUT", "/test%24file.text", [], headers,
               payload)  # fmt: skip
    assert got == "98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd"


def test_s3_bucket_lifecycle_and_a_listing() -> None:
    headers = h(host="examplebucket.s3.amazonaws.com", x_amz_content_sha256=EMPTY_SHA256,
                x_amz_date=S3_DATE)  # fmt: skip
    lifecycle = sign(S3_SECRET, S3_DATE, "us-east-1", "s3", "GET", "/", [("lifecycle", "")],
                     headers, EMPTY_SHA256)  # fmt: skip
    assert lifecycle == "fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543"
    listing = sign(S3_SECRET, S3_DATE, "us-east-1", "s3", "GET", "/",
                   [("max-keys", "2"), ("prefix", "J")], headers, EMPTY_SHA256)  # fmt: skip
    assert listing == "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7"


PRESIGNED = [
    ("X-Amz-Algorithm", "AWS4-HMAC-SHA256"),
    ("X-Amz-Credential", f"{S3_KEY}/20130524/us-east-1/s3/aws4_request"),
    ("X-Amz-Date", S3_DATE),
    ("X-Amz-Expires", "86400"),
    ("X-Amz-SignedHeaders", "host"),
]
PRESIGNED_SIGNATURE = "aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404"


def test_s3_presigned_url() -> None:
    headers = h(host="examplebucket.s3.amazonaws.com")
    got = sign(S3_SECRET, S3_DATE, "us-east-1", "s3", "GET", "/test.txt", PRESIGNED, headers,
               UNSIGNED)  # fmt: skip
    assert got == PRESIGNED_SIGNATURE


STREAM_HEADERS = h(
    content_encoding="aws-chunked",
    content_length="66824",
    host="s3.amazonaws.com",
    x_amz_content_sha256=STREAMING,
    x_amz_date=S3_DATE,
    x_amz_decoded_content_length="66560",
    x_amz_storage_class="REDUCED_REDUNDANCY",
)
SEED = "4f232c4386841ef735655705268965c44a0e4690baa4adea153f7db9fa80a0a9"


def test_s3_streaming_upload_seed_and_chunk_signatures() -> None:
    seed = sign(S3_SECRET, S3_DATE, "us-east-1", "s3", "PUT", "/examplebucket/chunkObject.txt",
                [], STREAM_HEADERS, STREAMING)  # fmt: skip
    assert seed == SEED
    key, where = signing_key(S3_SECRET, "20130524", "us-east-1"), scope("20130524", "us-east-1")
    chunks = [b"a" * 65536, b"a" * 1024, b""]
    expected = [
        "ad80c730a21e5b8d04586a2213dd63b9a0e99e0e2307b0ade35a65485a288648",
        "0055627c9e194cb4542bae2aa5492e3c1575bbb81b612b7d234b86a503ef5497",
        "b6c6ea8a5354eaf15b3cb7646744f4275b71ea724fed81ceb9323e279d449df9",
    ]
    previous = seed
    for chunk, want in zip(chunks, expected, strict=True):
        previous = chunk_signature(key, S3_DATE, where, previous, hashlib.sha256(chunk).hexdigest())
        assert previous == want


# --- verify ------------------------------------------------------------------------------

NOW = request_time(S3_DATE)


def secrets(access_key: str) -> str | None:
    return S3_SECRET if access_key == S3_KEY else None


def authorization(signed: str, sig: str, key: str = S3_KEY) -> str:
    return (
        f"AWS4-HMAC-SHA256 Credential={key}/20130524/us-east-1/s3/aws4_request,"
        f"SignedHeaders={signed},Signature={sig}"
    )


def get_headers(sig: str = "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41",
                key: str = S3_KEY) -> dict[str, list[str]]:  # fmt: skip
    headers = h(host="examplebucket.s3.amazonaws.com", range="bytes=0-9",
                x_amz_content_sha256=EMPTY_SHA256, x_amz_date=S3_DATE)  # fmt: skip
    headers["authorization"] = [
        authorization("host;range;x-amz-content-sha256;x-amz-date", sig, key)
    ]
    return headers


def test_verify_accepts_the_examples_and_says_what_the_body_must_be() -> None:
    verified = verify("GET", "/test.txt", [], get_headers(), secrets, now=NOW, region="us-east-1")
    assert verified.access_key == S3_KEY and verified.payload == EMPTY_SHA256
    presigned = [*PRESIGNED, ("X-Amz-Signature", PRESIGNED_SIGNATURE)]
    headers = h(host="examplebucket.s3.amazonaws.com")
    verified = verify("GET", "/test.txt", presigned, headers, secrets, now=NOW + 3600,
                      region="us-east-1")  # fmt: skip
    assert verified.payload == UNSIGNED
    stream = dict(STREAM_HEADERS)
    stream["authorization"] = [authorization(";".join(sorted(STREAM_HEADERS)), SEED)]
    verified = verify("PUT", "/examplebucket/chunkObject.txt", [], stream, secrets, now=NOW,
                      region="us-east-1")  # fmt: skip
    assert verified.payload == STREAMING and verified.signature == SEED


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ("signature", "SignatureDoesNotMatch"),
        ("key", "InvalidAccessKeyId"),
        ("method", "SignatureDoesNotMatch"),
        ("header", "SignatureDoesNotMatch"),
        ("skew", "RequestTimeTooSkewed"),
        ("region", "AuthorizationHeaderMalformed"),
        ("unsigned", "AccessDenied"),
    ],
)
def test_verify_refuses(change: str, code: str) -> None:
    headers, method, now, region = get_headers(), "GET", NOW, "us-east-1"
    if change == "signature":
        headers = get_headers(sig="0" * 64)
    elif change == "key":
        headers = get_headers(key="AKIANOBODY")
    elif change == "method":
        method = "DELETE"
    elif change == "header":
        headers["range"] = ["bytes=0-99"]
    elif change == "skew":
        now = NOW + MAX_SKEW + 1
    elif change == "region":
        region = "eu-west-1"
    elif change == "unsigned":
        del headers["authorization"]
    with pytest.raises(S3Error) as caught:
        verify(method, "/test.txt", [], headers, secrets, now=now, region=region)
    assert caught.value.code == code


def test_a_presigned_url_expires_and_lives_at_most_a_week() -> None:
    presigned = [*PRESIGNED, ("X-Amz-Signature", PRESIGNED_SIGNATURE)]
    headers = h(host="examplebucket.s3.amazonaws.com")
    with pytest.raises(S3Error, match="expired"):
        verify("GET", "/test.txt", presigned, headers, secrets, now=NOW + 86401,
               region="us-east-1")  # fmt: skip
    week = [(k, "604801" if k == "X-Amz-Expires" else v) for k, v in presigned]
    with pytest.raises(S3Error) as caught:
        verify("GET", "/test.txt", week, headers, secrets, now=NOW, region="us-east-1")
    assert caught.value.code == "AuthorizationQueryParametersError"
