"""The S3 client every ``s3://`` read and write goes through, and what a refusal says.

One boto3 client per process (made on first use from the standard AWS environment; a forked child
makes its own), serving every thread. ``call`` runs one request and turns any failure into a
one-line ``FormatError`` naming the URL, what was being done and what the store (or the way to it)
refused, in words that say what to change; boto3 missing is a ``UsageError``.

Example:
    >>> is_s3("S3://models/wan/lora.safetensors"), is_s3("/data/lora.safetensors")
    (True, False)
    >>> split("s3://models/wan/high_noise_model/")
    ('models', 'wan/high_noise_model/')
    >>> folder_prefix("wan/base"), folder_prefix("")
    ('wan/base/', '')
    >>> try:
    ...     split("s3:///wan/lora.safetensors")
    ... except UsageError as e:
    ...     print(e)
    s3:///wan/lora.safetensors: no bucket in this URL (expected s3://bucket/key)
"""

from __future__ import annotations

import os
import re
import threading
from typing import Any

from distmerge.errors import FormatError, UsageError

__all__ = [
    "SCHEME",
    "call",
    "client",
    "error_code",
    "errors",
    "folder_prefix",
    "is_s3",
    "object_key",
    "refusal",
    "reset",
    "split",
]

SCHEME = "s3://"
#: connections the process's client keeps open (threads reading ranges at once)
POOL = max(16, 2 * (os.cpu_count() or 8))
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*", re.ASCII)
#: error codes meaning the key or its signature was refused (not a permission: the identity itself)
_REFUSED = {"SignatureDoesNotMatch", "InvalidAccessKeyId", "InvalidToken", "ExpiredToken", "TokenRefreshRequired"}
_DENIED = {"AccessDenied", "403", "Forbidden", "AllAccessDisabled"}
_MISSING = {"NoSuchKey", "404", "NotFound"}

_lock = threading.Lock()
_state: tuple[int, Any, Any] | None = None  # (pid, session, client)


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


def errors() -> tuple[type[Exception], ...]:
    """The store's answers and transport failures, as ``except`` clauses name them; none without
    boto3 (then ``client()`` raises its ``UsageError``, which an ``except errors()`` must let through)."""
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        return ()
    return (BotoCoreError, ClientError)


def endpoint() -> str:
    return str(client().meta.endpoint_url)


def _access_key() -> str:
    try:
        creds = _state[1].get_credentials() if _state else None
        return f"'{creds.access_key}'" if creds else "(none)"
    except Exception:  # naming the key is a courtesy; the message stands without it
        return "(unknown)"


def why(e: Exception, bucket: str) -> str:
    """What the store (or the way to it) refused, in words that say what to change."""
    from botocore import exceptions as bx

    if isinstance(e, (bx.NoCredentialsError, bx.PartialCredentialsError)):
        return "no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or a profile (AWS_PROFILE, ~/.aws)"
    if isinstance(e, bx.ConnectionError):
        return f"cannot reach the endpoint {endpoint()} ({e}); check AWS_ENDPOINT_URL and that the store is up"
    if not isinstance(e, bx.ClientError):
        return f"{type(e).__name__}: {e}"
    code, meta = str(e.response.get("Error", {}).get("Code", "")), e.response.get("ResponseMetadata", {})
    if code == "NoSuchBucket":
        return f"bucket '{bucket}' does not exist at {endpoint()}"
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


def refusal(e: Exception, url: str, doing: str) -> FormatError:
    return FormatError(" ".join(f"{url}: cannot {doing}: {why(e, split(url)[0])}".split()))


def call(url: str, doing: str, op: str, **kwargs: Any) -> Any:
    """``client().<op>(**kwargs)``, every failure a one-line ``FormatError``."""
    c = client()
    try:
        return getattr(c, op)(**kwargs)
    except errors() as e:
        raise refusal(e, url, doing) from None


def object_key(url: str) -> tuple[str, str]:
    bucket, key = split(url)
    if not key or key.endswith("/"):
        raise FormatError(f"{url}: names a bucket or a folder, not an object")
    return bucket, key


def folder_prefix(key: str) -> str:
    return key if not key or key.endswith("/") else key + "/"


def error_code(e: Exception) -> str:
    """The store's error code of a failed request (``NoSuchUpload``, ``404``, …; "" for a transport failure)."""
    return str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))
