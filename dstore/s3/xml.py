"""S3's XML, apart from the handlers: the documents the API answers with, and the few it
reads (a batch delete). Text is escaped here and nowhere else."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import quote
from xml.sax.saxutils import escape

NS = "http://s3.amazonaws.com/doc/2006-03-01/"
HEAD = '<?xml version="1.0" encoding="UTF-8"?>\n'
MAX_REQUEST_XML = 1 << 20  # a request document (DeleteObjects of 1000 keys) at most


def iso(ts: float) -> str:
    """S3's timestamps: ISO 8601 in UTC with milliseconds."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + (
        f"{int(ts * 1000) % 1000:03d}Z"
    )


def _el(name: str, value: object) -> str:
    return f"<{name}>{escape(str(value))}</{name}>"


def error(code: str, message: str, resource: str, request_id: str) -> bytes:
    return (
        HEAD
        + "<Error>"
        + _el("Code", code)
        + _el("Message", message)
        + _el("Resource", resource)
        + _el("RequestId", request_id)
        + "</Error>"
    ).encode()


def list_buckets(buckets: Iterable[tuple[str, float]], owner: str) -> bytes:
    items = "".join(
        f"<Bucket>{_el('Name', name)}{_el('CreationDate', iso(created))}</Bucket>"
        for name, created in buckets
    )
    return (
        f'{HEAD}<ListAllMyBucketsResult xmlns="{NS}">'
        f"<Owner>{_el('ID', owner)}{_el('DisplayName', owner)}</Owner>"
        f"<Buckets>{items}</Buckets></ListAllMyBucketsResult>"
    ).encode()


def location(region: str) -> bytes:
    # us-east-1 answers an empty constraint, as AWS does
    value = "" if region == "us-east-1" else escape(region)
    return f'{HEAD}<LocationConstraint xmlns="{NS}">{value}</LocationConstraint>'.encode()


@dataclass(frozen=True, slots=True)
class Entry:
    key: str
    size: int
    etag: str
    modified: float


@dataclass(frozen=True, slots=True)
class Listing:
    bucket: str
    prefix: str
    delimiter: str
    max_keys: int
    entries: Sequence[Entry]
    prefixes: Sequence[str]
    truncated: bool
    url: bool  # encoding-type=url: keys and prefixes %-encoded


def _key(text: str, url: bool) -> str:
    return quote(text, safe="/") if url else text


def _body(listing: Listing) -> str:
    url = listing.url
    out = [
        _el("Name", listing.bucket),
        _el("Prefix", _key(listing.prefix, url)),
        _el("MaxKeys", listing.max_keys),
        _el("IsTruncated", "true" if listing.truncated else "false"),
    ]
    if listing.delimiter:
        out.append(_el("Delimiter", _key(listing.delimiter, url)))
    if url:
        out.append(_el("EncodingType", "url"))
    for e in listing.entries:
        out.append(
            "<Contents>"
            + _el("Key", _key(e.key, url))
            + _el("LastModified", iso(e.modified))
            + _el("ETag", e.etag)
            + _el("Size", e.size)
            + _el("StorageClass", "STANDARD")
            + "</Contents>"
        )
    out.extend(
        f"<CommonPrefixes>{_el('Prefix', _key(p, url))}</CommonPrefixes>" for p in listing.prefixes
    )
    return "".join(out)


def list_objects_v2(
    listing: Listing, token: str | None, next_token: str | None, start_after: str | None
) -> bytes:
    extra = _el("KeyCount", len(listing.entries) + len(listing.prefixes))
    if token is not None:
        extra += _el("ContinuationToken", token)
    if next_token is not None:
        extra += _el("NextContinuationToken", next_token)
    if start_after:
        extra += _el("StartAfter", _key(start_after, listing.url))
    return (
        f'{HEAD}<ListBucketResult xmlns="{NS}">{_body(listing)}{extra}</ListBucketResult>'.encode()
    )


def list_objects_v1(listing: Listing, marker: str, next_marker: str | None) -> bytes:
    extra = _el("Marker", _key(marker, listing.url))
    if next_marker is not None:
        extra += _el("NextMarker", _key(next_marker, listing.url))
    return (
        f'{HEAD}<ListBucketResult xmlns="{NS}">{_body(listing)}{extra}</ListBucketResult>'.encode()
    )


def copy_result(etag: str, modified: float) -> bytes:
    return (
        f'{HEAD}<CopyObjectResult xmlns="{NS}">{_el("LastModified", iso(modified))}'
        f"{_el('ETag', etag)}</CopyObjectResult>"
    ).encode()


def delete_result(deleted: Iterable[str], errors: Iterable[tuple[str, str, str]]) -> bytes:
    items = "".join(f"<Deleted>{_el('Key', key)}</Deleted>" for key in deleted)
    items += "".join(
        f"<Error>{_el('Key', key)}{_el('Code', code)}{_el('Message', message)}</Error>"
        for key, code, message in errors
    )
    return f'{HEAD}<DeleteResult xmlns="{NS}">{items}</DeleteResult>'.encode()


def parse_delete(document: bytes) -> tuple[list[str], bool]:
    """A DeleteObjects request: its keys (at most 1000) and whether it is ``Quiet``."""
    root = _parse(document)
    keys = [
        (obj.findtext(_q("Key"), default="") or obj.findtext("Key", default=""))
        for obj in [*root.iter(_q("Object")), *root.iter("Object")]
    ]
    if not 1 <= len(keys) <= 1000:
        raise ValueError("a DeleteObjects request names 1 to 1000 keys")
    quiet = (root.findtext(_q("Quiet")) or root.findtext("Quiet") or "").lower() == "true"
    return keys, quiet


def _q(name: str) -> str:
    return f"{{{NS}}}{name}"


def _parse(document: bytes) -> ET.Element:
    if len(document) > MAX_REQUEST_XML:
        raise ValueError("the XML document is too large")
    if b"<!DOCTYPE" in document or b"<!ENTITY" in document:
        raise ValueError("a document type or entity declaration is not accepted")
    try:
        return ET.fromstring(document)
    except ET.ParseError as exc:
        raise ValueError(f"malformed XML: {exc}") from None


# --- multipart uploads ---------------------------------------------------------------------


def _owner(tag: str, owner: str) -> str:
    return f"<{tag}>{_el('ID', owner)}{_el('DisplayName', owner)}</{tag}>"


def initiated(bucket: str, key: str, upload_id: str) -> bytes:
    return (
        f'{HEAD}<InitiateMultipartUploadResult xmlns="{NS}">{_el("Bucket", bucket)}'
        f"{_el('Key', key)}{_el('UploadId', upload_id)}</InitiateMultipartUploadResult>"
    ).encode()


def copy_part_result(etag: str, modified: float) -> bytes:
    return (
        f'{HEAD}<CopyPartResult xmlns="{NS}">{_el("LastModified", iso(modified))}'
        f"{_el('ETag', etag)}</CopyPartResult>"
    ).encode()


def completed(location: str, bucket: str, key: str, etag: str) -> bytes:
    return (
        f'{HEAD}<CompleteMultipartUploadResult xmlns="{NS}">{_el("Location", location)}'
        f"{_el('Bucket', bucket)}{_el('Key', key)}{_el('ETag', etag)}"
        "</CompleteMultipartUploadResult>"
    ).encode()


@dataclass(frozen=True, slots=True)
class PartEntry:
    number: int
    etag: str
    size: int
    modified: float


def list_parts(
    bucket: str,
    key: str,
    upload_id: str,
    owner: str,
    marker: int,
    max_parts: int,
    parts: Sequence[PartEntry],
    truncated: bool,
) -> bytes:
    items = "".join(
        "<Part>"
        + _el("PartNumber", p.number)
        + _el("LastModified", iso(p.modified))
        + _el("ETag", p.etag)
        + _el("Size", p.size)
        + "</Part>"
        for p in parts
    )
    following = _el("NextPartNumberMarker", parts[-1].number) if parts else ""
    return (
        f'{HEAD}<ListPartsResult xmlns="{NS}">{_el("Bucket", bucket)}{_el("Key", key)}'
        f"{_el('UploadId', upload_id)}{_owner('Initiator', owner)}{_owner('Owner', owner)}"
        f"{_el('StorageClass', 'STANDARD')}{_el('PartNumberMarker', marker)}{following}"
        f"{_el('MaxParts', max_parts)}{_el('IsTruncated', 'true' if truncated else 'false')}"
        f"{items}</ListPartsResult>"
    ).encode()


@dataclass(frozen=True, slots=True)
class UploadEntry:
    key: str
    upload_id: str
    initiated: float


@dataclass(frozen=True, slots=True)
class UploadListing:
    bucket: str
    prefix: str
    delimiter: str
    key_marker: str
    upload_id_marker: str
    max_uploads: int
    uploads: Sequence[UploadEntry]
    prefixes: Sequence[str]
    truncated: bool
    url: bool


def list_uploads(listing: UploadListing, owner: str) -> bytes:
    url = listing.url
    out = [
        _el("Bucket", listing.bucket),
        _el("KeyMarker", _key(listing.key_marker, url)),
        _el("UploadIdMarker", listing.upload_id_marker),
        _el("Prefix", _key(listing.prefix, url)),
        _el("MaxUploads", listing.max_uploads),
        _el("IsTruncated", "true" if listing.truncated else "false"),
    ]
    if listing.delimiter:
        out.append(_el("Delimiter", _key(listing.delimiter, url)))
    if url:
        out.append(_el("EncodingType", "url"))
    if listing.truncated and listing.uploads:
        last = listing.uploads[-1]
        out.append(_el("NextKeyMarker", _key(last.key, url)))
        out.append(_el("NextUploadIdMarker", last.upload_id))
    for u in listing.uploads:
        out.append(
            "<Upload>"
            + _el("Key", _key(u.key, url))
            + _el("UploadId", u.upload_id)
            + _owner("Initiator", owner)
            + _owner("Owner", owner)
            + _el("StorageClass", "STANDARD")
            + _el("Initiated", iso(u.initiated))
            + "</Upload>"
        )
    out.extend(
        f"<CommonPrefixes>{_el('Prefix', _key(p, url))}</CommonPrefixes>" for p in listing.prefixes
    )
    return (
        f'{HEAD}<ListMultipartUploadsResult xmlns="{NS}">{"".join(out)}'
        "</ListMultipartUploadsResult>"
    ).encode()


MAX_PARTS = 10_000


def parse_complete(document: bytes) -> list[tuple[int, str]]:
    """A CompleteMultipartUpload request: its (part number, ETag) pairs, in its order."""
    root = _parse(document)
    found: list[tuple[int, str]] = []
    for part in [*root.iter(_q("Part")), *root.iter("Part")]:
        number = part.findtext(_q("PartNumber")) or part.findtext("PartNumber") or ""
        etag = part.findtext(_q("ETag")) or part.findtext("ETag") or ""
        if not number.strip().isdigit() or not etag.strip():
            raise ValueError("every Part needs a PartNumber and an ETag")
        found.append((int(number), etag.strip()))
    if not 1 <= len(found) <= MAX_PARTS:
        raise ValueError(f"a completion lists 1 to {MAX_PARTS} parts")
    return found
