"""Writing to S3-compatible stores: multipart uploads (a shard), small objects (an index), deletes.

The store, credentials and client are ``objstore``'s (the standard AWS environment). A shard is one
multipart upload: ``create_upload`` before any task runs, ``upload_part`` by the task that rendered
the part (every part but the last at least ``MIN_PART`` bytes, at most ``MAX_PARTS`` of them, each at
most ``MAX_PART``), ``complete_upload`` by the driver once every part is in: only then does the object
exist. ``abort_upload`` gives an upload's parts back (an open upload is billed storage); a killed
driver's are found with ``open_uploads``. Every failure is one line naming the URL and what the store
refused (``FormatError``), as for reads.

Example (prose: it needs a store)::

    uid = create_upload("s3://models/wan/out/model-00001-of-00002.safetensors")
    etag = upload_part("s3://models/wan/out/model-00001-of-00002.safetensors", uid, 1, "/tmp/part-1")
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from distmerge.errors import FormatError
from distmerge.inputs.s3client import (
    SCHEME,
    call,
    client,
    error_code,
    errors,
    folder_prefix,
    object_key,
    refusal,
    split,
)

__all__ = [
    "MAX_PART",
    "MAX_PARTS",
    "MIN_PART",
    "OpenUpload",
    "PartTarget",
    "abort_upload",
    "check_bucket",
    "check_writable",
    "complete_upload",
    "create_upload",
    "delete_objects",
    "open_uploads",
    "put_bytes",
    "put_file",
    "upload_part",
]

#: the smallest part S3 accepts, but for an upload's last (``EntityTooSmall`` on completion)
MIN_PART = 5 << 20
#: the largest part, and the most parts of one upload
MAX_PART, MAX_PARTS = 5 << 30, 10_000
#: the key below an output prefix whose upload (started, then aborted) proves the right to write
PROBE = ".distmerge-write-check"


@dataclass(frozen=True)
class OpenUpload:
    """A multipart upload neither completed nor aborted."""

    url: str
    upload_id: str


@dataclass(frozen=True)
class PartTarget:
    """Where a unit's bytes go: part ``number`` of the upload ``upload_id`` of the object ``url``,
    whose bytes start at byte ``start`` of that object (the first part: 0, with the ``header``)."""

    url: str
    upload_id: str
    number: int
    start: int
    header: bytes = b""


def check_bucket(url: str) -> None:
    """The bucket of ``url`` exists and these credentials may use it (one HEAD); a one-line
    ``FormatError`` naming the bucket and what was refused."""
    bucket, _ = split(url)
    try:
        client().head_bucket(Bucket=bucket)
    except errors() as e:
        if error_code(e) in ("404", "NoSuchBucket", "NotFound"):
            raise FormatError(f"{url}: bucket '{bucket}' does not exist at {client().meta.endpoint_url}") from None
        raise refusal(_list_error(bucket) or e, url, f"use bucket '{bucket}'") from None


def _list_error(bucket: str) -> Exception | None:
    """A HEAD answer has no body (a bare 403): a one-key listing says whether the key or the right failed."""
    try:
        client().list_objects_v2(Bucket=bucket, MaxKeys=1)
    except errors() as e:
        return e
    return None


def check_writable(prefix_url: str) -> None:
    """These credentials may write below ``prefix_url``: an upload is started there and aborted at
    once (nothing is stored); a one-line ``FormatError`` naming what was refused."""
    bucket, key = split(prefix_url)
    probe = f"{SCHEME}{bucket}/{folder_prefix(key)}{PROBE}-{uuid.uuid4().hex[:8]}"
    upload = call(prefix_url, "write below it", "create_multipart_upload", Bucket=bucket, Key=split(probe)[1])
    abort_upload(probe, str(upload["UploadId"]))


def create_upload(url: str) -> str:
    """Start the multipart upload of the object at ``url``; its upload id."""
    bucket, key = object_key(url)
    return str(call(url, "start its upload", "create_multipart_upload", Bucket=bucket, Key=key)["UploadId"])


def upload_part(url: str, upload_id: str, number: int, path: str) -> str:
    """Upload the whole file ``path`` as part ``number`` of the upload; the part's ETag (quoted, as
    the completion wants it)."""
    bucket, key = object_key(url)
    size = os.path.getsize(path)
    with open(path, "rb") as body:
        resp = call(
            url,
            f"upload part {number} ({size} bytes)",
            "upload_part",
            Bucket=bucket,
            Key=key,
            UploadId=upload_id,
            PartNumber=number,
            Body=body,
            ContentLength=size,
        )
    return str(resp["ETag"])


def complete_upload(url: str, upload_id: str, etags: Sequence[str]) -> None:
    """Join the parts (``etags[i]`` is part ``i + 1``) into the object: it appears now, whole."""
    bucket, key = object_key(url)
    parts = [{"PartNumber": n, "ETag": e} for n, e in enumerate(etags, 1)]
    call(
        url,
        f"complete its upload of {len(parts)} part(s)",
        "complete_multipart_upload",
        Bucket=bucket,
        Key=key,
        UploadId=upload_id,
        MultipartUpload={"Parts": parts},
    )


def abort_upload(url: str, upload_id: str) -> None:
    """Give back an upload's parts; an upload already gone is no error."""
    bucket, key = object_key(url)
    try:
        client().abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
    except errors() as e:
        if error_code(e) not in ("NoSuchUpload", "404"):
            raise refusal(e, url, f"abort its upload {upload_id}") from None


def open_uploads(prefix_url: str, *, exact: bool = False) -> list[OpenUpload]:
    """The uploads started below a folder URL (or, ``exact``, of that one object) and neither
    completed nor aborted."""
    bucket, key = split(prefix_url)
    prefix = key if exact else folder_prefix(key)
    out = []
    try:
        for page in client().get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=prefix):
            for u in page.get("Uploads", []):
                if not exact or u["Key"] == key:
                    out.append(OpenUpload(f"{SCHEME}{bucket}/{u['Key']}", str(u["UploadId"])))
    except errors() as e:
        raise refusal(e, prefix_url, "list the uploads open below it") from None
    return out


def put_bytes(url: str, data: bytes) -> None:
    """Store ``data`` as the object at ``url`` (one PUT: it appears whole)."""
    bucket, key = object_key(url)
    call(url, f"write it ({len(data)} bytes)", "put_object", Bucket=bucket, Key=key, Body=data)


def put_file(url: str, path: str) -> None:
    """Store the file ``path`` as the object at ``url`` (one PUT; companions are small)."""
    with open(path, "rb") as f:
        put_bytes(url, f.read())


def delete_objects(urls: Sequence[str]) -> None:
    """Delete the objects (one DELETE each; a missing one is no error)."""
    for url in urls:
        bucket, key = object_key(url)
        call(url, "delete it", "delete_object", Bucket=bucket, Key=key)
