"""Merging into object storage: ``--output s3://…`` against a real S3 server (SeaweedFS on 127.0.0.1,
``tests/s3server.py``: it checks signatures, refuses parts under 5 MiB but the last, hides an upload
until it is completed and lists open ones).

A ~28 MB Wan-shaped base in two shards is merged in 1 MB units, so each shard is a multipart upload
of several parts. What lands in the bucket is byte for byte the same merge written locally; the
index comes last; a NaN, a write refused mid-run, Ctrl-C and a killed driver leave no object and no
open upload (a killed driver's are aborted by the next run with ``--resume``); bad credentials,
a missing bucket and a model already there are one line before any work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import distmerge
from distmerge.app.synth import WanConfig, make_factors, write_lora, write_wan_base

from .s3server import child_env

pytest_plugins = ["tests.s3server"]
pytestmark = pytest.mark.ray  # merges run Ray tasks

MEDIUM = WanConfig(dim=256, ffn=512, blocks=8, in_dim=16, text_dim=256, freq_dim=64, dtype="F32")
UNITS = ["--unit-size", "1MB", "--max-shard-size", "16MB", "-q"]


def _merge(env: dict[str, str], *args: str, popen: bool = False):
    full = child_env(env)
    argv = [sys.executable, "-m", "distmerge", "merge", *args]
    if popen:
        return subprocess.Popen(argv, env=full, stderr=subprocess.PIPE, text=True, start_new_session=True)
    return subprocess.run(argv, capture_output=True, text=True, env=full, timeout=300)


@pytest.fixture(scope="module")
def medium(s3, tmp_path_factory):
    """The base and a LoRA on disk, the same in a bucket, and their local merge (every file's bytes)."""
    d = tmp_path_factory.mktemp("s3out")
    base, lora = str(d / "base"), str(d / "lora.safetensors")
    write_wan_base(base, MEDIUM, num_shards=2)
    write_lora(lora, make_factors(MEDIUM, rank=8, dtype=torch.bfloat16), layout="diffusion_model", alpha=8.0)
    bucket = s3.make_bucket()
    s3.upload_folder(base, f"s3://{bucket}/base")
    s3.upload_file(lora, f"s3://{bucket}/lora.safetensors")
    r = _merge({}, "--base", base, "--lora", lora, "-o", str(d / "local"), *UNITS)
    assert r.returncode == 0, r.stderr
    return {"bucket": bucket, "base": base, "lora": lora, "local": _folder(str(d / "local")), "root": d}


def _comparable(name: str, data: bytes) -> object:
    """A file as two merges of the same inputs must agree on it: the index without its recipe
    (which records where the inputs were), no recipe file."""
    if name.endswith(".index.json"):
        index = json.loads(data)
        index["metadata"]["distmerge"].pop("recipe")
        return index
    return data


def _folder(path: str) -> dict[str, object]:
    names = [n for n in sorted(os.listdir(path)) if n != "distmerge.json"]
    return {n: _comparable(n, open(os.path.join(path, n), "rb").read()) for n in names}


def _objects(s3, url: str) -> dict[str, bytes]:
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    c = s3.client()
    keys = [o["Key"] for o in c.list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", [])]
    return {k[len(prefix) + 1 :]: c.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def _no_trace(s3, bucket: str, prefix: str) -> None:
    """Nothing under ``prefix``: no object, no upload left open."""
    assert not s3.client().list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents"), "objects were left"
    assert not [u for u in s3.open_uploads(bucket) if u["Key"].startswith(prefix)], "uploads were left open"


def _one_line(r) -> str:
    lines = [x for x in r.stderr.splitlines() if x.strip() and " units, " not in x]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


@pytest.mark.parametrize("source", ["bucket", "local"])
def test_a_merge_into_a_bucket_is_the_local_merge_byte_for_byte(s3, medium, tmp_path, source):
    b = medium["bucket"]
    base, lora = (
        (f"s3://{b}/base", f"s3://{b}/lora.safetensors") if source == "bucket" else (medium["base"], medium["lora"])
    )
    out, report = f"s3://{b}/merged-{source}", f"s3://{b}/reports/{source}.json"
    env = {**s3.env("admin"), "DISTMERGE_CACHE_DIR": str(tmp_path / "cache")}
    r = _merge(env, "--base", base, "--lora", lora, "-o", out, "--report", report, *UNITS)
    assert r.returncode == 0, r.stderr
    got = _objects(s3, out)
    recipe = json.loads(got.pop("distmerge.json"))
    assert recipe["base"]["path"] == base
    assert {n: _comparable(n, v) for n, v in got.items()} == medium["local"]
    shards = [n for n in got if n.endswith(".safetensors")]
    assert len(shards) == 2
    for n in shards:  # each shard one multipart upload of several parts ("<md5 of the part md5s>-<parts>")
        etag = s3.client().head_object(Bucket=b, Key=f"merged-{source}/{n}")["ETag"].strip('"')
        assert int(etag.rsplit("-", 1)[1]) >= 2, etag
    rep = json.loads(_objects(s3, f"s3://{b}/reports")[f"{source}.json"])
    assert rep["output"] == out and rep["tensors_merged"] == 8 * 10
    assert not s3.open_uploads(b)


@pytest.mark.parametrize("name, extra", [("one.safetensors", []), ("wan-Q8_0.gguf", ["--dtype", "q8_0"])])
def test_a_single_file_output_and_its_checksum_land_in_the_bucket(s3, medium, tmp_path, name, extra):
    b = medium["bucket"]
    local = str(tmp_path / name)
    r = _merge({}, "--base", medium["base"], "--lora", medium["lora"], "-o", local, *UNITS, *extra)
    assert r.returncode == 0, r.stderr
    env = {**s3.env("admin"), "DISTMERGE_CACHE_DIR": str(tmp_path / "cache")}
    out = f"s3://{b}/single/{name}"
    r = _merge(env, "--base", f"s3://{b}/base", "--lora", f"s3://{b}/lora.safetensors", "-o", out, *UNITS, *extra)
    assert r.returncode == 0, r.stderr
    got = _objects(s3, f"s3://{b}/single")
    assert got[name] == open(local, "rb").read()
    assert got[f"{name}.crc32"] == open(local + ".crc32", "rb").read()


def test_the_driver_completes_every_shard_before_it_writes_the_index(s3, s3_env, medium):
    """The driver's own requests, in order (recorded by botocore's event hooks on the client
    distmerge uses; the tasks upload the parts from their processes)."""
    from distmerge.inputs import objstore

    b = medium["bucket"]
    seen: list[tuple[str, str]] = []
    objstore.client().meta.events.register(
        "before-parameter-build.s3", lambda model, params, **_: seen.append((model.name, params.get("Key", "")))
    )
    out = f"s3://{b}/ordered"
    distmerge.merge(f"s3://{b}/base", [f"s3://{b}/lora.safetensors"], out, unit_size="1MB", max_shard_size="16MB")
    writes = [(op, key.rsplit("/", 1)[-1]) for op, key in seen if op in ("CompleteMultipartUpload", "PutObject")]
    assert writes[-1] == ("PutObject", "diffusion_pytorch_model.safetensors.index.json")
    assert [op for op, _ in writes[:2]] == ["CompleteMultipartUpload"] * 2
    assert {k for op, k in seen if op == "UploadPart"} == set()  # the parts come from the tasks, not the driver
    assert not s3.open_uploads(b)


def test_a_nan_in_the_last_unit_leaves_no_object_and_no_open_upload(s3, medium, tmp_path):
    b = medium["bucket"]
    factors = make_factors(MEDIUM, rank=8, dtype=torch.bfloat16)
    a, up = factors["blocks.7.ffn.2"]
    up[0, 0] = float("nan")
    bad = str(tmp_path / "nan.safetensors")
    write_lora(bad, factors, layout="diffusion_model", alpha=8.0)
    env = {**s3.env("admin"), "DISTMERGE_CACHE_DIR": str(tmp_path / "cache")}
    r = _merge(env, "--base", f"s3://{b}/base", "--lora", bad, "-o", f"s3://{b}/nan", *UNITS)
    assert r.returncode == 1 and "blocks.7.ffn.2.weight" in _one_line(r), r.stderr
    _no_trace(s3, b, "nan/")


def test_a_write_refused_mid_run_leaves_no_object_and_no_open_upload(s3, s3_env, medium):
    """The driver may write (it starts the uploads), the tasks may only read: each task's upload of
    its part is refused, the run stops with that one line and aborts what it started."""
    import ray

    b = medium["bucket"]
    reader = {k: v for k, v in s3.env("reader").items() if k.startswith("AWS_ACCESS") or k.startswith("AWS_SECRET")}
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": reader})
    try:
        with pytest.raises(distmerge.DistmergeError) as e:
            distmerge.merge(f"s3://{b}/base", [f"s3://{b}/lora.safetensors"], f"s3://{b}/denied", unit_size="1MB")
    finally:
        ray.shutdown()
    assert "upload part" in str(e.value) and "denied" in str(e.value) and "\n" not in str(e.value)
    _no_trace(s3, b, "denied/")


def _wait_for_a_part(s3, bucket: str, prefix: str, proc, timeout: float = 120) -> None:
    """Until a part of an upload below ``prefix`` has been uploaded (the merge is under way)."""
    from botocore.exceptions import ClientError

    c, end = s3.client(), time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, proc.stderr.read()
        for u in s3.open_uploads(bucket):
            try:  # an upload may be gone by now (the write check's, aborted at once)
                parts = c.list_parts(Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"]).get("Parts")
            except ClientError:
                continue
            if u["Key"].startswith(prefix) and parts:
                return
        time.sleep(0.05)
    raise AssertionError(f"no part was uploaded below {prefix} in {timeout} s")


def _merge_under_way(s3, b: str, prefix: str, cache: str):
    """A bucket-to-bucket merge into ``prefix``, one task at a time, once its first part is up:
    the process, and the environment and arguments that start it again."""
    env = {**s3.env("admin"), "DISTMERGE_CACHE_DIR": cache}
    args = ["--base", f"s3://{b}/base", "--lora", f"s3://{b}/lora.safetensors", "-o", f"s3://{b}/{prefix}", *UNITS]
    p = _merge(env, *args, "--num-workers", "1", popen=True)
    _wait_for_a_part(s3, b, prefix + "/", p)
    return p, env, args


def test_ctrl_c_leaves_no_object_and_no_open_upload(s3, medium, tmp_path):
    b = medium["bucket"]
    p, _, _ = _merge_under_way(s3, b, "ctrlc", str(tmp_path / "cache"))
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "Traceback" not in err, err
    _no_trace(s3, b, "ctrlc/")


def test_a_killed_driver_s_uploads_are_refused_then_aborted_by_resume(s3, medium, tmp_path):
    b = medium["bucket"]
    p, env, args = _merge_under_way(s3, b, "killed", str(tmp_path / "cache"))
    os.killpg(p.pid, signal.SIGKILL)  # the driver and its Ray, as an OOM kill would
    p.communicate(timeout=60)
    assert [u for u in s3.open_uploads(b) if u["Key"].startswith("killed/")]  # what a killed driver leaves
    r = _merge(env, *args)
    assert r.returncode == 1 and "--resume" in _one_line(r) and "open" in _one_line(r)
    r = _merge(env, *args, "--resume")
    assert r.returncode == 0, r.stderr
    assert "aborted" in r.stderr
    got = _objects(s3, f"s3://{b}/killed")
    got.pop("distmerge.json")
    assert {n: _comparable(n, v) for n, v in got.items()} == medium["local"]
    assert not [u for u in s3.open_uploads(b) if u["Key"].startswith("killed/")]


def test_a_model_already_there_needs_overwrite_which_replaces_it_whole(s3, medium, tmp_path):
    b = medium["bucket"]
    env = {**s3.env("admin"), "DISTMERGE_CACHE_DIR": str(tmp_path / "cache")}
    args = ["--base", f"s3://{b}/base", "--lora", f"s3://{b}/lora.safetensors", "-o", f"s3://{b}/again", "-q"]
    r = _merge(env, *args, "--max-shard-size", "8MB")
    assert r.returncode == 0, r.stderr
    assert len([n for n in _objects(s3, f"s3://{b}/again") if n.endswith(".safetensors")]) >= 3
    r = _merge(env, *args)
    assert r.returncode == 1 and "--overwrite" in _one_line(r)
    r = _merge(env, *args, *UNITS, "--overwrite")
    assert r.returncode == 0, r.stderr
    got = _objects(s3, f"s3://{b}/again")
    got.pop("distmerge.json")
    assert {n: _comparable(n, v) for n, v in got.items()} == medium["local"]  # the 3-shard model's shards gone


@pytest.mark.parametrize(
    "what, words",
    [
        ("missing bucket", ["no-such-bucket-dm", "does not exist"]),
        ("read-only credentials", ["denied", "write below it"]),
        ("wrong secret", ["refused"]),
        ("a bucket, no folder", ["name a folder in the bucket"]),
    ],
)
def test_an_output_that_cannot_be_written_is_one_line_before_any_work(s3, medium, tmp_path, what, words):
    b = medium["bucket"]
    env = {**s3.env("admin"), "DISTMERGE_CACHE_DIR": str(tmp_path / "cache")}
    out = f"s3://{b}/refused"
    if what == "missing bucket":
        out = "s3://no-such-bucket-dm/out"
    elif what == "read-only credentials":
        env.update(s3.env("reader"))
    elif what == "wrong secret":
        env["AWS_SECRET_ACCESS_KEY"] = "not-the-secret"
    else:
        out = f"s3://{b}"
    r = _merge(env, "--base", medium["base"], "--lora", medium["lora"], "-o", out, "-q")
    line = _one_line(r)
    assert r.returncode == 1 and all(w in line for w in words), line
    assert "merging" not in r.stderr
    _no_trace(s3, b, "refused")


def test_extract_says_it_writes_local_files(s3, medium, tmp_path):
    base = medium["base"]
    r = subprocess.run(
        [sys.executable, "-m", "distmerge", "extract", "--base", base, "--tuned", base, "-o", "s3://b/l.safetensors"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "merge writes s3:// outputs" in _one_line(r)
    assert not os.path.exists("s3:")


def test_sha256_is_refused_for_a_bucket_output_before_anything_runs(tmp_path):
    r = _merge({}, "--base", "b", "--lora", "l.pth", "-o", "s3://bucket/out", "--checksum", "sha256")
    assert r.returncode == 2 and "records crc32" in _one_line(r)


def test_a_job_file_merges_from_and_into_a_bucket(s3, medium, tmp_path):
    b = medium["bucket"]
    job = tmp_path / "job.yaml"
    job.write_text(
        "merges:\n"
        f"  - {{name: low, base: 's3://{b}/base', loras: ['s3://{b}/lora.safetensors'], output: 's3://{b}/job/low',\n"
        f"     unit_size: 1MB, max_shard_size: 16MB, report: 's3://{b}/job/low-report.json'}}\n"
    )
    env = {**s3.env("admin"), "DISTMERGE_CACHE_DIR": str(tmp_path / "cache")}
    r = subprocess.run(
        [sys.executable, "-m", "distmerge", "run", str(job), "-q"], capture_output=True, text=True, env=child_env(env)
    )
    assert r.returncode == 0, r.stderr
    got = _objects(s3, f"s3://{b}/job/low")
    got.pop("distmerge.json")
    assert {n: _comparable(n, v) for n, v in got.items()} == medium["local"]
    assert json.loads(_objects(s3, f"s3://{b}/job")["low-report.json"])["output"] == f"s3://{b}/job/low"
    assert not os.path.exists(tmp_path / "s3:")
