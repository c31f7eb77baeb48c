"""``distmerge.inputs.objstore`` against a real S3 server (SeaweedFS, ``tests/s3server.py``); no Ray.

Look-ups, listings and ranged reads return exactly the stored bytes (from many threads at once);
``cached`` downloads each object version once per node, whole, even with several processes asking
at once; every refusal (missing bucket or key, refused or missing credentials, access denied, an
unreachable endpoint, boto3 missing) is one line naming the URL.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from distmerge.errors import FormatError, UsageError
from distmerge.inputs import objstore

pytest_plugins = ["tests.s3server"]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def bucket(s3, s3_env) -> str:
    """A fresh bucket, with the admin's environment set."""
    return s3.make_bucket()


@contextlib.contextmanager
def requests() -> Iterator[list[str]]:
    """The S3 operations the process's client sends meanwhile (``GetObject``, ``HeadObject`` …)."""
    sent: list[str] = []

    def hook(event_name: str, **_: object) -> None:
        sent.append(event_name.rsplit(".", 1)[-1])

    c = objstore.client()
    c.meta.events.register("before-send.s3", hook)
    try:
        yield sent
    finally:
        c.meta.events.unregister("before-send.s3", hook)


def payload(n: int, seed: int = 0) -> bytes:
    out, block = bytearray(), hashlib.sha256(str(seed).encode()).digest()
    while len(out) < n:
        block = hashlib.sha256(block).digest()
        out += block * 64
    return bytes(out[:n])


def refusal(call, *args) -> str:
    """The message of the ``FormatError`` that ``call(*args)`` raises, checked to be one line."""
    with pytest.raises(FormatError) as e:
        call(*args)
    message = str(e.value)
    assert "\n" not in message and message.startswith(args[0]), message
    return message


# --- URLs --------------------------------------------------------------------------------------------


def test_urls_are_recognised_and_split():
    assert objstore.is_s3("s3://b/k") and objstore.is_s3("S3://b/k") and not objstore.is_s3("/data/s3://x")
    assert objstore.split("s3://bkt/wan/high/") == ("bkt", "wan/high/")
    assert objstore.split("s3://bkt") == ("bkt", "")
    for bad in ("s3:///key", "s3://", "/local/path", "s3://bad bucket/k"):
        with pytest.raises(UsageError) as e:
            objstore.split(bad)
        assert str(e.value).startswith(bad) and "\n" not in str(e.value)


def test_the_module_loads_without_boto3_or_torch():
    code = "import sys, distmerge.inputs.objstore; print(sorted({'boto3', 'torch'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- stat, list, reads -------------------------------------------------------------------------------


def test_stat_gives_size_and_etag(s3, bucket):
    data = payload(1000)
    s3.put(f"s3://{bucket}/wan/a.bin", data)
    info = objstore.stat(f"s3://{bucket}/wan/a.bin")
    assert info == objstore.ObjectInfo(f"s3://{bucket}/wan/a.bin", 1000, hashlib.md5(data).hexdigest())
    assert "names a bucket or a folder" in refusal(objstore.stat, f"s3://{bucket}/wan/")


def test_list_treats_the_prefix_as_a_folder(s3, bucket):
    for key in ("model/b.bin", "model/a.bin", "model/sub/c.bin", "model.bak/x.bin", "modelx.bin", "model/empty/"):
        s3.put(f"s3://{bucket}/{key}", key.encode())
    expect = [f"s3://{bucket}/model/{k}" for k in ("a.bin", "b.bin", "sub/c.bin")]
    assert [o.url for o in objstore.list_objects(f"s3://{bucket}/model")] == expect
    assert [o.url for o in objstore.list_objects(f"s3://{bucket}/model/")] == expect
    assert [o.size for o in objstore.list_objects(f"s3://{bucket}/model")] == [11, 11, 15]
    assert len(objstore.list_objects(f"s3://{bucket}")) == 5  # the whole bucket, without the folder marker
    assert objstore.list_objects(f"s3://{bucket}/nothing") == []


def test_list_reads_every_page(s3, bucket):
    c = s3.client()
    keys = [f"many/{i:05d}" for i in range(1100)]  # more than one page of 1000
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: c.put_object(Bucket=bucket, Key=k, Body=b"x"), keys))
    with requests() as sent:
        listed = objstore.list_objects(f"s3://{bucket}/many")
    assert [o.url.rsplit("/", 2)[-2] + "/" + o.url.rsplit("/", 1)[-1] for o in listed] == keys
    assert sent.count("ListObjectsV2") == 2


def test_read_range_returns_exactly_the_range(s3, bucket):
    data = payload(3 << 20, seed=1)
    url = f"s3://{bucket}/blob.bin"
    s3.put(url, data)
    for offset, n in [(0, 8), (8, 1000), (12345, 1 << 20), ((3 << 20) - 5, 5), (0, 3 << 20)]:
        with requests() as sent:
            assert objstore.read_range(url, offset, n) == data[offset : offset + n]
        assert sent == ["GetObject"]


def test_read_into_fills_buffers_from_many_threads(s3, bucket):
    data = payload(16 << 20, seed=2)
    url = f"s3://{bucket}/big.bin"
    s3.put(url, data)
    cuts = sorted({0, len(data), *(int(len(data) * f) for f in (0.01, 0.1, 0.11, 0.3, 0.5, 0.51, 0.77, 0.9))})
    spans = list(zip(cuts, cuts[1:])) * 4  # each span read by 4 threads into its own buffer
    bufs = [bytearray(b - a) for a, b in spans]
    with requests() as sent, ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: objstore.read_into(url, spans[i][0], memoryview(bufs[i])), range(len(spans))))
    assert all(bytes(buf) == data[a:b] for buf, (a, b) in zip(bufs, spans))
    assert sent.count("GetObject") == len(spans)
    whole = bytearray(len(data))
    view = memoryview(whole)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda ab: objstore.read_into(url, ab[0], view[ab[0] : ab[1]]), zip(cuts, cuts[1:])))
    assert whole == data


def test_a_range_past_the_end_is_refused_and_an_empty_one_sends_nothing(s3, bucket):
    url = f"s3://{bucket}/ten.bin"
    s3.put(url, b"0123456789")
    assert "the object is 10 bytes, the range ends past it" in refusal(objstore.read_range, url, 8, 5)
    assert "past the end of the object" in refusal(objstore.read_range, url, 20, 2)
    with pytest.raises(FormatError):
        objstore.read_into(url, 6, memoryview(bytearray(5)))
    with requests() as sent:
        assert objstore.read_range(url, 10, 0) == b"" and objstore.read_range(url, 99, 0) == b""
        objstore.read_into(url, 3, memoryview(bytearray(0)))
    assert sent == []


# --- the node-local cache ----------------------------------------------------------------------------


def test_cached_file_is_downloaded_once_and_again_when_it_changes(s3, bucket, s3_env):
    url = f"s3://{bucket}/loras/high.safetensors"
    s3.put(url, b"first version")
    with requests() as sent:
        path = objstore.cached(url)
    assert sent == ["HeadObject", "GetObject"]
    assert os.path.basename(path) == "high.safetensors" and open(path, "rb").read() == b"first version"
    assert path.startswith(s3_env["DISTMERGE_CACHE_DIR"] + os.sep)
    mtime = os.stat(path).st_mtime_ns
    with requests() as sent:
        assert objstore.cached(url) == path
    assert sent == ["HeadObject"] and os.stat(path).st_mtime_ns == mtime
    s3.put(url, b"second version!")
    with requests() as sent:
        changed = objstore.cached(url)
    assert changed != path and open(changed, "rb").read() == b"second version!"
    assert sent.count("GetObject") == 1
    assert not [n for _, _, names in os.walk(s3_env["DISTMERGE_CACHE_DIR"]) for n in names if n.startswith(".part")]


def test_cached_folder_mirrors_the_keys_and_fetches_only_what_changed(s3, bucket, tmp_path):
    src = tmp_path / "high_noise_model"
    files = {"config.json": b"{}", "model.safetensors": payload(5000), "sub/deep/notes.txt": b"n"}
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    s3.upload_folder(str(src), f"s3://{bucket}/wan/high_noise_model")
    s3.put(f"s3://{bucket}/wan/high_noise_model.bak/x", b"not in the folder")
    with requests() as sent:
        local = objstore.cached(f"s3://{bucket}/wan/high_noise_model")
    assert os.path.basename(local) == "high_noise_model" and sent.count("GetObject") == 3
    found = {os.path.relpath(os.path.join(r, n), local): open(os.path.join(r, n), "rb").read()
             for r, _, names in os.walk(local) for n in names}  # fmt: skip
    assert found == {rel.replace("/", os.sep): data for rel, data in files.items()}
    with requests() as sent:
        assert objstore.cached(f"s3://{bucket}/wan/high_noise_model/") == local
    assert "GetObject" not in sent
    s3.put(f"s3://{bucket}/wan/high_noise_model/config.json", b'{"changed": 1}')
    with requests() as sent:
        again = objstore.cached(f"s3://{bucket}/wan/high_noise_model")
    assert again != local and sent.count("GetObject") == 1
    assert open(os.path.join(again, "config.json"), "rb").read() == b'{"changed": 1}'
    assert open(os.path.join(again, "model.safetensors"), "rb").read() == files["model.safetensors"]
    assert open(os.path.join(local, "config.json"), "rb").read() == b"{}"  # the old copy stays whole


def test_threads_asking_at_once_download_once(s3, bucket):
    url = f"s3://{bucket}/lora.pth"
    s3.put(url, payload(6 << 20, seed=3))
    with requests() as sent, ThreadPoolExecutor(8) as pool:
        paths = list(pool.map(lambda _: objstore.cached(url), range(8)))
    assert len(set(paths)) == 1 and sent.count("GetObject") == 1
    assert open(paths[0], "rb").read() == payload(6 << 20, seed=3)


def test_processes_asking_at_once_all_get_the_complete_file(s3, bucket, tmp_path, s3_env):
    data = payload(24 << 20, seed=4)
    (tmp_path / "big.safetensors").write_bytes(data)
    url = f"s3://{bucket}/big.safetensors"
    s3.upload_file(str(tmp_path / "big.safetensors"), url)  # multipart: an ETag that is no MD5
    assert objstore.stat(url).etag.endswith("-3")
    code = "import sys\nfrom distmerge.inputs import objstore\nprint(objstore.cached(sys.argv[1]))"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, url], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err.decode() for _, err in outs]
    paths = {out.decode().strip() for out, _ in outs}
    assert len(paths) == 1
    with open(paths.pop(), "rb") as f:
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(data).digest()
    names = [n for _, _, names in os.walk(s3_env["DISTMERGE_CACHE_DIR"]) for n in names]
    assert sorted(names) == [".lock", "big.safetensors"]


def test_nothing_at_the_url_is_refused(bucket):
    message = refusal(objstore.cached, f"s3://{bucket}/no/such/thing")
    assert f"no such object, and no objects below s3://{bucket}/no/such/thing/" in message


# --- refusals ----------------------------------------------------------------------------------------


def test_a_missing_bucket_is_named(s3_env):
    url = "s3://no-such-bucket-here/wan/a.safetensors"
    for call, args in [(objstore.stat, ()), (objstore.read_range, (0, 8)), (objstore.list_objects, ())]:
        message = refusal(call, url, *args)
        assert f"bucket 'no-such-bucket-here' does not exist at {s3_env['AWS_ENDPOINT_URL']}" in message
    assert "does not exist" in refusal(objstore.cached, url)


def test_a_missing_key_is_no_such_object(bucket):
    url = f"s3://{bucket}/wan/missing.safetensors"
    assert refusal(objstore.stat, url) == f"{url}: cannot look up the object: no such object"
    assert refusal(objstore.read_range, url, 0, 8) == f"{url}: cannot read bytes [0, 8): no such object"
    with pytest.raises(FormatError, match="no such object"):
        objstore.read_into(url, 0, memoryview(bytearray(4)))


@pytest.mark.parametrize("variable, code", [("AWS_SECRET_ACCESS_KEY", "SignatureDoesNotMatch"),
                                            ("AWS_ACCESS_KEY_ID", "InvalidAccessKeyId")])  # fmt: skip
def test_wrong_credentials_are_refused(s3, bucket, monkeypatch, variable, code):
    url = f"s3://{bucket}/a.bin"
    s3.put(url, b"abc")
    monkeypatch.setenv(variable, "wrong-" + os.environ[variable])
    objstore.reset()
    for call, args in [(objstore.stat, ()), (objstore.read_range, (0, 1)), (objstore.list_objects, ())]:
        message = refusal(call, url, *args)
        assert f"the credentials were refused ({code}" in message
        assert "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY" in message


def test_the_read_only_identity_reads_and_one_without_rights_is_denied(s3, bucket, monkeypatch):
    url = f"s3://{bucket}/m/a.bin"
    s3.put(url, b"0123456789")
    for k, v in s3.env("reader").items():
        monkeypatch.setenv(k, v)
    objstore.reset()
    assert objstore.stat(url).size == 10 and objstore.read_range(url, 2, 3) == b"234"
    assert [o.url for o in objstore.list_objects(f"s3://{bucket}/m")] == [url]
    assert open(objstore.cached(url), "rb").read() == b"0123456789"
    for k, v in s3.env("outsider").items():
        monkeypatch.setenv(k, v)
    objstore.reset()
    for call, args in [(objstore.stat, ()), (objstore.read_range, (0, 1)), (objstore.list_objects, ())]:
        message = refusal(call, url, *args)
        assert f"access denied with these credentials (access key '{s3.creds['outsider'].access_key}')" in message
        assert "check AWS_ACCESS_KEY_ID / the bucket policy" in message


def test_no_credentials_says_which_to_set(bucket, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    objstore.reset()
    for call, args in [(objstore.stat, ()), (objstore.read_range, (0, 1)), (objstore.cached, ())]:
        message = refusal(call, f"s3://{bucket}/a.bin", *args)
        assert "no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or a profile" in message


def test_an_unreachable_endpoint_is_named(s3, s3_env, monkeypatch):
    port = s3.unused_port()  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    objstore.reset()
    start = time.monotonic()
    message = refusal(objstore.read_range, "s3://bkt/a.bin", 0, 1)
    assert f"cannot reach the endpoint http://127.0.0.1:{port}" in message and "AWS_ENDPOINT_URL" in message
    assert time.monotonic() - start < 30  # a few standard retries, then the refusal


def test_boto3_missing_is_a_usage_error(monkeypatch):
    from distmerge.inputs import objwrite

    for name in ("boto3", "botocore", "botocore.exceptions"):  # not installed: neither imports
        monkeypatch.setitem(sys.modules, name, None)
    objstore.reset()
    url = "s3://bkt/a.bin"
    try:
        calls = [
            (objstore.stat, (url,)),
            (objstore.list_objects, ("s3://bkt/base",)),
            (objstore.read_range, (url, 0, 1)),
        ]
        calls += [(objstore.cached, (url,)), (objwrite.check_bucket, (url,)), (objwrite.create_upload, (url,))]
        calls += [(objwrite.open_uploads, ("s3://bkt/out",)), (objwrite.abort_upload, (url, "id"))]
        for call, args in calls:
            with pytest.raises(UsageError) as e:
                call(*args)
            assert str(e.value) == "s3:// paths need boto3: pip install 'distmerge[s3]'", call.__name__
        assert objstore.is_s3("s3://bkt/a.bin") and objstore.split("s3://bkt/a.bin") == ("bkt", "a.bin")
    finally:
        objstore.reset()


# --- the test server itself (what later tests rely on) ------------------------------------------------


def test_the_server_checks_writes_and_multipart_uploads(s3, bucket):
    from botocore.exceptions import ClientError

    with pytest.raises(ClientError, match="AccessDenied"):
        s3.client("reader").put_object(Bucket=bucket, Key="w", Body=b"1")
    c = s3.client()
    up = c.create_multipart_upload(Bucket=bucket, Key="out.bin")["UploadId"]
    parts = [c.upload_part(Bucket=bucket, Key="out.bin", UploadId=up, PartNumber=i, Body=b"x" * 10) for i in (1, 2)]
    assert [u["UploadId"] for u in s3.open_uploads(bucket)] == [up]
    assert objstore.list_objects(f"s3://{bucket}") == []  # hidden until completed
    done = {"Parts": [{"ETag": p["ETag"], "PartNumber": i} for i, p in enumerate(parts, 1)]}
    with pytest.raises(ClientError, match="EntityTooSmall"):
        c.complete_multipart_upload(Bucket=bucket, Key="out.bin", UploadId=up, MultipartUpload=done)
    c.abort_multipart_upload(Bucket=bucket, Key="out.bin", UploadId=up)
    assert s3.open_uploads(bucket) == []
