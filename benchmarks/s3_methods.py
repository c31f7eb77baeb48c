#!/usr/bin/env python
"""bench_s3.py's object-store side: the timed transfers, the request log, fetching and deleting.

* ``upload`` / ``download`` (run as ``s3_methods.py upload|download BUCKET PREFIX LOCAL CONCURRENCY``,
  the timed subprocess of those methods; the store from the ``AWS_*`` variables): boto3
  ``upload_file`` of every file with ``PIECE`` parts, or ranged GETs of ``PIECE`` written at their
  offsets and fsynced, ``CONCURRENCY`` at once;
* ``SITECUSTOMIZE``: the ``sitecustomize`` of the distmerge runs on the bucket; in every Python
  process (driver and Ray workers) it logs each ``GetObject``, ``UploadPart`` and ``PutObject`` as
  ``pid, operation, status, key, bytes`` (GET: the response's ``ContentLength``; UploadPart /
  PutObject: the request body's size) to ``$DISTMERGE_BENCH_IO_LOG``, one ``O_APPEND`` write each;
  ``io_counts`` reads that log back;
* ``fetch_prefix`` / ``delete_prefix`` (not timed): a distmerge-s3-s3 output downloaded for the
  comparison, and removed (objects and any upload left open).
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor

PIECE = 32 << 20  #: ranged GET / multipart part size (distmerge's CHUNK_BYTES)
IO_LOG_ENV = "DISTMERGE_BENCH_IO_LOG"

#: the ``sitecustomize`` of the distmerge runs on the bucket: it adds handlers to botocore's built-in
#: ones as ``botocore.handlers`` is imported (lazily: a process that never imports botocore pays
#: nothing); ``after-call`` runs once per call, after botocore's retries
SITECUSTOMIZE = """\
import os, sys
_OPS = ("GetObject", "UploadPart", "PutObject")
def _size(body):
    if body is None:
        return 0
    if isinstance(body, str):
        return len(body.encode())
    if isinstance(body, (bytes, bytearray, memoryview)):
        return len(body)
    pos = body.tell()
    end = body.seek(0, 2)
    body.seek(pos)
    return end - pos
def _before(params=None, context=None, **_):
    if context is not None and params:
        context["dmb_key"] = params.get("Key", "")
        n = params.get("ContentLength")
        context["dmb_sent"] = int(n) if n is not None else _size(params.get("Body"))
def _after(http_response=None, parsed=None, context=None, event_name="", **_):
    op, context = event_name.rsplit(".", 1)[-1], context or {}
    n = (parsed or {}).get("ContentLength") if op == "GetObject" else context.get("dmb_sent")
    row = (os.getpid(), op, getattr(http_response, "status_code", 0), context.get("dmb_key", ""), int(n or 0))
    fd = os.open(os.environ["DISTMERGE_BENCH_IO_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, ("\\t".join(map(str, row)) + "\\n").encode())
    os.close(fd)
class _Finder:
    def find_spec(self, name, path=None, target=None):
        if name != "botocore.handlers":
            return None
        import importlib.util
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module
        def exec_module(m):
            run(m)
            for op in _OPS:
                m.BUILTIN_HANDLERS += [(f"before-parameter-build.s3.{op}", _before), (f"after-call.s3.{op}", _after)]
        spec.loader.exec_module = exec_module
        return spec
if os.environ.get("DISTMERGE_BENCH_IO_LOG"):
    sys.meta_path.insert(0, _Finder())
"""


def files(local: str) -> list[tuple[str, str]]:
    """(path, relative key) of every file below ``local``, sorted."""
    out = []
    for root, _, names in os.walk(local):
        out += [(os.path.join(root, n), os.path.relpath(os.path.join(root, n), local)) for n in names]
    return sorted(out)


def _client(concurrency: int):
    import boto3
    from botocore.config import Config

    session = boto3.session.Session(region_name=os.environ.get("AWS_REGION") or None)
    return session.client("s3", config=Config(max_pool_connections=max(10, concurrency), retries={"mode": "standard"}))


def _objects(c, bucket: str, prefix: str) -> list[dict]:
    """Every object below ``prefix/`` (its listing entries)."""
    pages = c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/")
    return [o for page in pages for o in page.get("Contents", [])]


def transfer_upload(local: str, bucket: str, prefix: str, concurrency: int) -> None:
    from boto3.s3.transfer import TransferConfig

    c = _client(concurrency)
    cfg = TransferConfig(multipart_threshold=PIECE, multipart_chunksize=PIECE, max_concurrency=concurrency)
    for path, rel in files(local):
        c.upload_file(path, bucket, f"{prefix}/{rel}", Config=cfg)


def transfer_download(bucket: str, prefix: str, dest: str, concurrency: int) -> None:
    """Every object below ``prefix`` by ranged GETs of ``PIECE``, ``concurrency`` in flight, each
    written at its offset into ``dest/<key>``; every file fsynced."""
    c = _client(concurrency)
    fds: dict[str, int] = {}
    jobs = []
    for o in _objects(c, bucket, prefix):
        path = os.path.join(dest, o["Key"][len(prefix) + 1 :])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fds[o["Key"]] = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(fds[o["Key"]], o["Size"])
        jobs += [(o["Key"], off, min(PIECE, o["Size"] - off)) for off in range(0, o["Size"], PIECE)]

    def get(job: tuple[str, int, int]) -> None:
        key, off, n = job
        body = c.get_object(Bucket=bucket, Key=key, Range=f"bytes={off}-{off + n - 1}")["Body"]
        done = 0
        while done < n:
            data = body.read(min(4 << 20, n - done))
            if not data:
                raise OSError(f"{key}: short read at {off + done}")
            os.pwrite(fds[key], data, off + done)
            done += len(data)
        body.close()

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(get, jobs))
    for fd in fds.values():
        os.fsync(fd)
        os.close(fd)


def fetch_prefix(c, bucket: str, prefix: str, dest: str) -> int:
    """Download every object below ``prefix/`` into ``dest/<relative key>`` (not timed); their bytes."""
    total = 0
    for o in _objects(c, bucket, prefix):
        path = os.path.join(dest, o["Key"][len(prefix.rstrip("/")) + 1 :])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        c.download_file(bucket, o["Key"], path)
        total += o["Size"]
    return total


def open_uploads(c, bucket: str, prefix: str) -> list[dict]:
    """The multipart uploads below ``prefix/`` neither completed nor aborted."""
    got = c.list_multipart_uploads(Bucket=bucket, Prefix=prefix.rstrip("/") + "/")
    return list(got.get("Uploads", []))


def delete_prefix(c, bucket: str, prefix: str) -> None:
    """Delete every object below ``prefix/`` and abort every upload left open there."""
    keys = [{"Key": o["Key"]} for o in _objects(c, bucket, prefix)]
    for i in range(0, len(keys), 1000):
        c.delete_objects(Bucket=bucket, Delete={"Objects": keys[i : i + 1000]})
    for u in open_uploads(c, bucket, prefix):
        c.abort_multipart_upload(Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"])


def _read_log(path: str) -> list[tuple[str, str, str, str, int]]:
    """(pid, operation, status, key, bytes) of every request the run logged."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [ln.rstrip("\n").split("\t") for ln in f if ln.count("\t") == 4]
    return [(pid, op, status, key, int(n)) for pid, op, status, key, n in rows]


def io_counts(path: str, base_keys: set[str], base_bytes: int) -> dict:
    """What the request log of a run says: ``gets`` (requests, bytes of the base and of the rest)
    and ``puts`` (UploadPart and PutObject requests and the bytes they sent)."""
    rows = _read_log(path)
    gets = [r for r in rows if r[1] == "GetObject"]
    base = [r[4] for r in gets if r[3] in base_keys]
    g = {"gets": len(gets), "gets_base": len(base), "processes": len({r[0] for r in gets})}
    g |= {"not_2xx": sum(not r[2].startswith("2") for r in gets), "base_get_bytes": sum(base)}
    g["other_get_bytes"] = sum(r[4] for r in gets if r[3] not in base_keys)
    g["base_get_over_base_bytes"] = round(sum(base) / base_bytes, 4) if base_bytes else None
    sent = [r for r in rows if r[1] in ("UploadPart", "PutObject")]
    p = {"parts": sum(r[1] == "UploadPart" for r in sent), "puts": sum(r[1] == "PutObject" for r in sent)}
    p |= {"processes": len({r[0] for r in sent}), "not_2xx": sum(not r[2].startswith("2") for r in sent)}
    p |= {"part_bytes": sum(r[4] for r in sent if r[1] == "UploadPart")}
    p["uploaded_bytes"] = sum(r[4] for r in sent)
    p["part_processes"] = len({r[0] for r in sent if r[1] == "UploadPart"})
    return {"gets": g, "puts": p}


def main(argv: list[str]) -> int:
    """``upload|download BUCKET PREFIX LOCAL CONCURRENCY`` (the timed subprocess)."""
    kind, bucket, prefix, local, concurrency = argv
    if kind == "upload":
        transfer_upload(local, bucket, prefix, int(concurrency))
    else:
        transfer_download(bucket, prefix, local, int(concurrency))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
