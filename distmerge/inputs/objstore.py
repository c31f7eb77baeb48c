"""Objects in S3-compatible stores (``s3://bucket/key``): look-ups, listings, ranged reads, a local cache.

Any S3-compatible store works (AWS S3, Alibaba OSS, MinIO, Ceph RGW, SeaweedFS), configured only
as every AWS tool is (boto3 reads it): ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` for a store
that is not AWS, ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` or a profile (``AWS_PROFILE``,
``~/.aws``), ``AWS_DEFAULT_REGION`` (or ``AWS_REGION``, as the other SDKs read it). boto3 is optional
(``pip install 'distmerge[s3]'``), imported on first use; one client per process serves every thread.

Checkpoints are read where they are, by ranged GETs (``read_range``, ``read_into``); small inputs
(LoRAs, a model folder's companions) are fetched whole, once per node and version (``cached``).
Every failure is a one-line ``FormatError`` naming the URL, what was being done and what the store
refused; boto3 missing is a ``UsageError``.

Example:
    >>> is_s3("S3://models/wan/lora.safetensors"), is_s3("/data/lora.safetensors")
    (True, False)
    >>> split("s3://models/wan/high_noise_model/")
    ('models', 'wan/high_noise_model/')
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from distmerge.errors import FormatError
from distmerge.inputs.s3client import (
    SCHEME,
    call,
    client,
    endpoint,
    errors,
    folder_prefix,
    is_s3,
    object_key,
    refusal,
    reset,
    split,
)

__all__ = [
    "ObjectInfo",
    "cached",
    "cache_dir",
    "client",
    "exists",
    "is_s3",
    "list_objects",
    "read_into",
    "read_range",
    "reset",
    "split",
    "stat",
]

#: bytes read from a response body at a time (bounds the HTTP library's temporary copies)
CHUNK = 4 << 20
#: how often a response body that broke off is asked for again (the rest of it) before giving up
STREAM_TRIES = 3


@dataclass(frozen=True)
class ObjectInfo:
    """One object: where it is, how long, and its ETag (without quotes; changes with the content)."""

    url: str  #: ``s3://bucket/key``
    size: int  #: bytes
    etag: str


def _head(url: str, missing_ok: bool = False) -> dict[str, Any] | None:
    """HEAD of an object (None for a 404 when ``missing_ok``). A HEAD answer has no body, so a
    bare 403/404 is asked again as a one-byte GET, whose answer says which (bucket, key, secret)."""
    bucket, key = object_key(url)
    c = client()
    try:
        return dict(c.head_object(Bucket=bucket, Key=key))
    except errors() as e:
        status = getattr(e, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
        if missing_ok and status == 404:
            return None
        cause: Exception = e
        if status in (400, 403, 404):
            cause = _diagnose(bucket, key) or e
        raise refusal(cause, url, "look up the object") from None


def _diagnose(bucket: str, key: str) -> Exception | None:
    try:
        client().get_object(Bucket=bucket, Key=key, Range="bytes=0-0")["Body"].close()
    except errors() as e:
        return e
    return None


def _info(url: str, head: dict[str, Any]) -> ObjectInfo:
    return ObjectInfo(url, int(head["ContentLength"]), str(head.get("ETag", "")).strip('"'))


def stat(url: str) -> ObjectInfo:
    """Size and ETag of the object at ``url`` (one HEAD); a ``FormatError`` for a folder or bucket
    URL, a missing bucket or object, refused credentials, an unreachable endpoint, …"""
    head = _head(url)
    if head is None:  # only with missing_ok
        raise FormatError(f"{url}: cannot look up the object: no such object")
    return _info(url, head)


def exists(url: str) -> bool:
    """Whether an object is at ``url`` (one HEAD); a ``FormatError`` as ``stat`` for anything but
    a missing object."""
    return _head(url, missing_ok=True) is not None


def list_objects(prefix_url: str) -> list[ObjectInfo]:
    """Every object below a folder URL, sorted by key: ``s3://b/model`` lists ``model/…`` (not
    ``model.bak``), ``s3://b`` the bucket; folder markers (keys ending in ``/``) are left out. A
    ``FormatError`` for a missing bucket, refused credentials, an unreachable endpoint, …"""
    bucket, key = split(prefix_url)
    out = []
    try:
        pages = client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=folder_prefix(key))
        for page in pages:
            for o in page.get("Contents", []):
                if not o["Key"].endswith("/"):
                    out.append(ObjectInfo(f"{SCHEME}{bucket}/{o['Key']}", int(o["Size"]), o.get("ETag", "").strip('"')))
    except errors() as e:
        raise refusal(e, prefix_url, "list the objects below it") from None
    return sorted(out, key=lambda o: o.url)


def read_range(url: str, offset: int, n: int) -> bytes:
    """Bytes ``[offset, offset + n)`` of the object (one ranged GET; ``n == 0`` sends nothing); a
    ``FormatError`` for a range that ends past the object's end, or as ``stat``."""
    buf = bytearray(n)
    read_into(url, offset, memoryview(buf))
    return bytes(buf)


def read_into(url: str, offset: int, buf: memoryview) -> None:
    """Fill ``buf`` with bytes ``[offset, offset + len(buf))`` of the object: one ranged GET whose
    body is read straight into ``buf``, a chunk at a time; safe from many threads at once. Raises
    as ``read_range``."""
    view = memoryview(buf).cast("B")
    if offset < 0:
        raise ValueError(f"{url}: negative offset {offset}")
    if view.nbytes == 0:
        return
    _transfer(url, offset, view.nbytes, lambda body, done: _readinto(body, view[done : done + CHUNK]))


def _readinto(body: Any, view: memoryview) -> int:
    if hasattr(body, "readinto"):
        return int(body.readinto(view))
    data = body.read(len(view))
    view[: len(data)] = data
    return len(data)


def _transfer(url: str, offset: int, n: int, sink: Callable[[Any, int], int], etag: str = "") -> None:
    """GET ``[offset, offset + n)`` and hand the body to ``sink(body, done)`` (which consumes some
    of it and says how many bytes) until all ``n`` are in; a body that breaks off is asked for again
    from where it stopped (``etag``: only while the object still has it)."""
    client()  # boto3 missing: its UsageError, before botocore's names are imported
    from botocore.exceptions import HTTPClientError, IncompleteReadError

    bucket, key = object_key(url)
    doing, done, failures = f"read bytes [{offset}, {offset + n})", 0, 0
    while done < n:
        start = offset + done
        extra = {"IfMatch": f'"{etag}"'} if etag else {}
        resp = call(url, doing, "get_object", Bucket=bucket, Key=key, Range=f"bytes={start}-{offset + n - 1}", **extra)
        body = resp["Body"]
        try:
            _check_range(url, doing, resp, start, n - done)
            while done < n:
                got = sink(body, done)
                if got <= 0:
                    raise IncompleteReadError(actual_bytes=done, expected_bytes=n)
                done += got
        except (HTTPClientError, IncompleteReadError) as e:
            failures += 1
            if failures >= STREAM_TRIES:
                raise FormatError(f"{url}: cannot {doing}: the connection broke off {failures} times ({e})") from None
        finally:
            body.close()


def _check_range(url: str, doing: str, resp: dict[str, Any], start: int, want: int) -> None:
    """The answer is the range asked for: a range crossing the object's end comes back short."""
    got, content_range = int(resp.get("ContentLength", -1)), str(resp.get("ContentRange", ""))
    if got < want:
        total = content_range.rpartition("/")[2]
        raise FormatError(f"{url}: cannot {doing}: the object is {total or 'too few'} bytes, the range ends past it")
    if not content_range.startswith(f"bytes {start}-") and start > 0:
        raise FormatError(f"{url}: cannot {doing}: the store ignored the byte range (answered {content_range!r})")


def cache_dir() -> str:
    """The node-local cache of ``cached``: ``DISTMERGE_CACHE_DIR``, else ``~/.cache/distmerge/s3``."""
    where = os.environ.get("DISTMERGE_CACHE_DIR") or os.path.join("~", ".cache", "distmerge", "s3")
    return os.path.abspath(os.path.expanduser(where))


def cached(url: str) -> str:
    """A local copy of the object at ``url``, or of every object below it (a folder URL, mirrored
    as a local folder named like its last part), in this node's ``cache_dir()``; returns its path.

    Each object is downloaded once per version (ETag, size), to a temporary name renamed into place
    under a file lock (a folder is assembled aside and renamed whole): processes asking at once all
    get the complete copy. A ``FormatError`` for nothing at ``url``, as ``stat``/``list_objects``,
    or a cache that cannot be written.
    """
    bucket, key = split(url)
    try:
        head = _head(url, missing_ok=True) if key and not key.endswith("/") else None
        if head is not None:
            return _cached_file(_info(url, head))
        objects = list_objects(url)
        if not objects:
            raise FormatError(f"{url}: no such object, and no objects below {SCHEME}{bucket}/{folder_prefix(key)}")
        return _cached_folder(url, objects)
    except OSError as e:
        raise FormatError(f"{url}: cannot keep a local copy under {cache_dir()}: {e}") from None


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()[:24]


def _safe(name: str) -> str:  # a key's last part as a file name ("/" cannot be in it)
    return "_" if name in ("", ".", "..") else name


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    """An exclusive lock on ``path`` (none without ``fcntl``: the atomic rename still keeps copies whole)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _cached_file(info: ObjectInfo) -> str:
    bucket, key = split(info.url)
    tag = _digest(endpoint(), info.url, info.etag, str(info.size))
    final = os.path.join(cache_dir(), bucket, "objects", tag, _safe(key.rsplit("/", 1)[-1]))
    if os.path.isfile(final) and os.path.getsize(final) == info.size:
        return final
    os.makedirs(os.path.dirname(final), exist_ok=True)
    with _locked(os.path.join(os.path.dirname(final), ".lock")):
        if not (os.path.isfile(final) and os.path.getsize(final) == info.size):
            _download(info, final)
    return final


def _download(info: ObjectInfo, final: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".part-", dir=os.path.dirname(final))
    try:
        with os.fdopen(fd, "wb") as f:
            chunk = memoryview(bytearray(max(1, min(CHUNK, info.size))))

            def sink(body: Any, done: int) -> int:
                got = _readinto(body, chunk[: min(len(chunk), info.size - done)])
                f.write(chunk[:got])
                return got

            _transfer(info.url, 0, info.size, sink, etag=info.etag)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _relative(url: str, prefix: str, info: ObjectInfo) -> list[str]:
    """The path parts of ``info`` below ``prefix``; an empty, ``.`` or ``..`` part is refused."""
    parts = split(info.url)[1][len(prefix) :].split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise FormatError(f"{info.url}: cannot mirror this key below {url} locally (an empty, '.' or '..' part)")
    return [_safe(p) for p in parts]


def _cached_folder(url: str, objects: list[ObjectInfo]) -> str:
    bucket, key = split(url)
    prefix = folder_prefix(key)
    rels = [(o, _relative(url, prefix, o)) for o in objects]
    tag = _digest(endpoint(), f"{SCHEME}{bucket}/{prefix}", *(f"{'/'.join(r)}\0{o.etag}\0{o.size}" for o, r in rels))
    name = _safe(prefix.rstrip("/").rsplit("/", 1)[-1] or bucket)
    top = os.path.join(cache_dir(), bucket, "folders", tag)
    if os.path.isdir(top):  # it only ever appears whole (the rename below)
        return os.path.join(top, name)
    files = [(_cached_file(o), r) for o, r in rels]
    os.makedirs(os.path.dirname(top), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".part-", dir=os.path.dirname(top))
    try:
        for src, rel in files:
            dst = os.path.join(tmp, name, *rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            try:
                os.link(src, dst)  # the object's cached copy, shared
            except OSError:
                shutil.copyfile(src, dst)
        try:
            os.rename(tmp, top)
        except OSError:
            if not os.path.isdir(top):  # not another process finishing first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return os.path.join(top, name)
