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
    >>> try:
    ...     split("s3:///wan/lora.safetensors")
    ... except UsageError as e:
    ...     print(e)
    s3:///wan/lora.safetensors: no bucket in this URL (expected s3://bucket/key)
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from distmerge.errors import FormatError, UsageError

__all__ = [
    "ObjectInfo",
    "cached",
    "cache_dir",
    "client",
    "is_s3",
    "list_objects",
    "read_into",
    "read_range",
    "reset",
    "split",
    "stat",
]

SCHEME = "s3://"
#: bytes read from a response body at a time (bounds the HTTP library's temporary copies)
CHUNK = 4 << 20
#: connections the process's client keeps open (threads reading ranges at once)
POOL = max(16, 2 * (os.cpu_count() or 8))
#: how often a response body that broke off is asked for again (the rest of it) before giving up
STREAM_TRIES = 3
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*", re.ASCII)
#: error codes meaning the key or its signature was refused (not a permission: the identity itself)
_REFUSED = {"SignatureDoesNotMatch", "InvalidAccessKeyId", "InvalidToken", "ExpiredToken", "TokenRefreshRequired"}
_DENIED = {"AccessDenied", "403", "Forbidden", "AllAccessDisabled"}
_MISSING = {"NoSuchKey", "404", "NotFound"}

_lock = threading.Lock()
_state: tuple[int, Any, Any] | None = None  # (pid, session, client)


@dataclass(frozen=True)
class ObjectInfo:
    """One object: where it is, how long, and its ETag (without quotes; changes with the content)."""

    url: str  #: ``s3://bucket/key``
    size: int  #: bytes
    etag: str


def is_s3(path: str | os.PathLike[str]) -> bool:
    """``path`` is an ``s3://`` URL (the scheme in any case)."""
    p = os.fspath(path)
    return isinstance(p, str) and p[:5].lower() == SCHEME


def split(url: str) -> tuple[str, str]:
    """``(bucket, key)`` of an ``s3://bucket/key`` URL (the key may be empty or end in ``/``); a
    ``UsageError`` for another URL, no bucket (``s3:///key``) or a bucket name no store allows."""
    if not is_s3(url):
        raise UsageError(f"{url}: not an s3:// URL (expected s3://bucket/key)")
    bucket, _, key = url[len(SCHEME) :].partition("/")
    if not bucket:
        raise UsageError(f"{url}: no bucket in this URL (expected s3://bucket/key)")
    if not _BUCKET.fullmatch(bucket):
        raise UsageError(f"{url}: '{bucket}' is not a bucket name (letters, digits, '.', '-', '_')")
    return bucket, key


def client() -> Any:
    """The process's boto3 S3 client, made on first use from the environment (thread-safe; a forked
    child makes its own). ``reset()`` forgets it."""
    global _state
    with _lock:
        if _state is None or _state[0] != os.getpid():
            session, c = _make_client()
            _state = (os.getpid(), session, c)
        return _state[2]


def reset() -> None:
    """Forget the process's client: the next call makes one from the environment as it is then."""
    global _state
    with _lock:
        _state = None


def _make_client() -> tuple[Any, Any]:
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise UsageError("s3:// paths need boto3: pip install 'distmerge[s3]'") from None
    session = boto3.session.Session(region_name=os.environ.get("AWS_REGION") or None)
    config = Config(max_pool_connections=POOL, retries={"mode": "standard"}, connect_timeout=10, read_timeout=60)
    return session, session.client("s3", config=config)


def _errors() -> tuple[type[Exception], ...]:  # the store's answers, and transport failures
    from botocore.exceptions import BotoCoreError, ClientError

    return (BotoCoreError, ClientError)


def _endpoint() -> str:
    return str(client().meta.endpoint_url)


def _access_key() -> str:
    try:
        creds = _state[1].get_credentials() if _state else None
        return f"'{creds.access_key}'" if creds else "(none)"
    except Exception:  # naming the key is a courtesy; the message stands without it
        return "(unknown)"


def _why(e: Exception, bucket: str) -> str:
    """What the store (or the way to it) refused, in words that say what to change."""
    from botocore import exceptions as bx

    if isinstance(e, (bx.NoCredentialsError, bx.PartialCredentialsError)):
        return "no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or a profile (AWS_PROFILE, ~/.aws)"
    if isinstance(e, bx.ConnectionError):
        return f"cannot reach the endpoint {_endpoint()} ({e}); check AWS_ENDPOINT_URL and that the store is up"
    if not isinstance(e, bx.ClientError):
        return f"{type(e).__name__}: {e}"
    code, meta = str(e.response.get("Error", {}).get("Code", "")), e.response.get("ResponseMetadata", {})
    if code == "NoSuchBucket":
        return f"bucket '{bucket}' does not exist at {_endpoint()}"
    if code in _MISSING:
        return "no such object"
    if code in _REFUSED:
        return (
            f"the credentials were refused ({code}: the access key {_access_key()} or its secret is wrong "
            "or expired); check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / the profile"
        )
    if code in _DENIED:
        return (
            f"access denied with these credentials (access key {_access_key()}); "
            "check AWS_ACCESS_KEY_ID / the bucket policy"
        )
    if code == "InvalidRange":
        total = meta.get("HTTPHeaders", {}).get("content-range", "").rpartition("/")[2]
        return f"the range lies past the end of the object{f' ({total} bytes)' if total.isdigit() else ''}"
    if code == "PreconditionFailed":
        return "the object changed while it was being read; try again"
    message = e.response.get("Error", {}).get("Message", "")
    return f"the store answered {meta.get('HTTPStatusCode', '?')} {code}: {message}"


def _refusal(e: Exception, url: str, doing: str) -> FormatError:
    return FormatError(" ".join(f"{url}: cannot {doing}: {_why(e, split(url)[0])}".split()))


def _call(url: str, doing: str, op: str, **kwargs: Any) -> Any:
    """``client().<op>(**kwargs)``, every failure a one-line ``FormatError``."""
    c = client()
    try:
        return getattr(c, op)(**kwargs)
    except _errors() as e:
        raise _refusal(e, url, doing) from None


def _object(url: str) -> tuple[str, str]:
    bucket, key = split(url)
    if not key or key.endswith("/"):
        raise FormatError(f"{url}: names a bucket or a folder, not an object")
    return bucket, key


def _head(url: str, missing_ok: bool = False) -> dict[str, Any] | None:
    """HEAD of an object (None for a 404 when ``missing_ok``). A HEAD answer has no body, so a
    bare 403/404 is asked again as a one-byte GET, whose answer says which (bucket, key, secret)."""
    bucket, key = _object(url)
    c = client()
    try:
        return dict(c.head_object(Bucket=bucket, Key=key))
    except _errors() as e:
        status = getattr(e, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
        if missing_ok and status == 404:
            return None
        cause: Exception = e
        if status in (400, 403, 404):
            cause = _diagnose(bucket, key) or e
        raise _refusal(cause, url, "look up the object") from None


def _diagnose(bucket: str, key: str) -> Exception | None:
    try:
        client().get_object(Bucket=bucket, Key=key, Range="bytes=0-0")["Body"].close()
    except _errors() as e:
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


def _folder_prefix(key: str) -> str:
    return key if not key or key.endswith("/") else key + "/"


def list_objects(prefix_url: str) -> list[ObjectInfo]:
    """Every object below a folder URL, sorted by key: ``s3://b/model`` lists ``model/…`` (not
    ``model.bak``), ``s3://b`` the bucket; folder markers (keys ending in ``/``) are left out. A
    ``FormatError`` for a missing bucket, refused credentials, an unreachable endpoint, …"""
    bucket, key = split(prefix_url)
    out = []
    try:
        pages = client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=_folder_prefix(key))
        for page in pages:
            for o in page.get("Contents", []):
                if not o["Key"].endswith("/"):
                    out.append(ObjectInfo(f"{SCHEME}{bucket}/{o['Key']}", int(o["Size"]), o.get("ETag", "").strip('"')))
    except _errors() as e:
        raise _refusal(e, prefix_url, "list the objects below it") from None
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
    from botocore.exceptions import HTTPClientError, IncompleteReadError

    bucket, key = _object(url)
    doing, done, failures = f"read bytes [{offset}, {offset + n})", 0, 0
    while done < n:
        start = offset + done
        extra = {"IfMatch": f'"{etag}"'} if etag else {}
        resp = _call(url, doing, "get_object", Bucket=bucket, Key=key, Range=f"bytes={start}-{offset + n - 1}", **extra)
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
            raise FormatError(f"{url}: no such object, and no objects below {SCHEME}{bucket}/{_folder_prefix(key)}")
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
    tag = _digest(_endpoint(), info.url, info.etag, str(info.size))
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
    prefix = _folder_prefix(key)
    rels = [(o, _relative(url, prefix, o)) for o in objects]
    tag = _digest(_endpoint(), f"{SCHEME}{bucket}/{prefix}", *(f"{'/'.join(r)}\0{o.etag}\0{o.size}" for o, r in rels))
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
