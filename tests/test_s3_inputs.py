"""Merging from object storage: ``--base s3://…`` and ``--lora s3://…`` against a real S3 server
(SeaweedFS on 127.0.0.1, ``tests/s3server.py``). A merge from a bucket writes exactly the bytes the
same merge from local files writes; the base is read with ranged GETs by the tasks (no download),
the LoRA once per node; a bucket or key that is missing, or credentials that are refused, are one
line before any work."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from distmerge.app.synth import write_lora

from .s3server import child_env
from .test_cli import run_cli

pytest_plugins = ["tests.s3server"]
pytestmark = pytest.mark.ray  # the command line's merge


def _files(folder: str) -> dict[str, object]:
    """Every output file's bytes, but the recipe, which records where the inputs were (the
    ``distmerge.json`` file, the index's ``metadata.distmerge``): the index without it."""
    out: dict[str, object] = {}
    for n in sorted(os.listdir(folder)):
        data = open(os.path.join(folder, n), "rb").read()
        if n.endswith(".index.json"):
            index = json.loads(data)
            index["metadata"].pop("distmerge")
            out[n] = index
        elif n != "distmerge.json":
            out[n] = data
    return out


def _merge(base: str, lora: str, out: str, env: dict[str, str], *extra: str):
    full = child_env(env)
    return subprocess.run(
        [sys.executable, "-m", "distmerge", "merge", "--base", base, "--lora", lora, "-o", out, *extra],
        capture_output=True,
        text=True,
        env=full,
        timeout=300,
    )


@pytest.fixture(scope="module")
def bucket(s3, tiny_base, tiny_factors, tmp_path_factory):
    """The tiny base (3 shards, index, config.json) and a LoRA (safetensors, .pth) in a bucket."""
    name = s3.make_bucket()
    s3.upload_folder(tiny_base, f"s3://{name}/wan/low_noise_model")
    root = tmp_path_factory.mktemp("s3lora")
    st, pth = str(root / "lora.safetensors"), str(root / "diffusion_module.pth")
    write_lora(st, tiny_factors, layout="diffusion_model", alpha=4.0)
    write_lora(pth, tiny_factors)
    s3.upload_file(st, f"s3://{name}/loras/lora.safetensors")
    s3.upload_file(pth, f"s3://{name}/loras/diffusion_module.pth")
    return name, st, pth


@pytest.mark.parametrize("runner", ["driver", "ray"])
def test_a_merge_from_a_bucket_writes_the_local_merge_s_bytes(s3, bucket, tiny_base, tmp_path, runner):
    name, st, _ = bucket
    env = {**s3.env("admin"), "DISTMERGE_CACHE_DIR": str(tmp_path / "cache")}
    if runner == "ray":
        env["DISTMERGE_INLINE_UNITS"] = "0"  # every unit a Ray task (the driver merges none)
    local = run_cli("merge", "--base", tiny_base, "--lora", st, "-o", str(tmp_path / "local"))
    assert local.returncode == 0, local.stderr
    r = _merge(f"s3://{name}/wan/low_noise_model", f"s3://{name}/loras/lora.safetensors", str(tmp_path / "s3"), env)
    assert r.returncode == 0, r.stderr
    got, want = _files(str(tmp_path / "s3")), _files(str(tmp_path / "local"))
    assert "config.json" in got and got == want
    recipe = json.load(open(os.path.join(tmp_path / "s3", "distmerge.json")))
    assert recipe["base"]["path"] == f"s3://{name}/wan/low_noise_model"  # the URL, not a local path
    assert recipe["loras"][0]["reference"] == f"s3://{name}/loras/lora.safetensors"
    cached = [f for _, _, fs in os.walk(tmp_path / "cache") for f in fs]
    assert "lora.safetensors" in cached and not any(f.startswith("diffusion_pytorch_model-") for f in cached)


def test_mixed_sources_a_local_base_and_a_lora_in_a_bucket(s3, bucket, tiny_base, tmp_path):
    name, _, pth = bucket
    env = {**s3.env("reader"), "DISTMERGE_CACHE_DIR": str(tmp_path / "cache")}  # reading needs no more
    local = run_cli("merge", "--base", tiny_base, "--lora", pth, "-o", str(tmp_path / "local.safetensors"))
    assert local.returncode == 0, local.stderr
    out = str(tmp_path / "mixed.safetensors")
    r = _merge(tiny_base, f"s3://{name}/loras/diffusion_module.pth", out, env)
    assert r.returncode == 0, r.stderr
    assert open(out, "rb").read() == open(str(tmp_path / "local.safetensors"), "rb").read()


@pytest.mark.parametrize(
    "what, words",
    [
        ("missing bucket", ["no-such-bucket-dm", "does not exist"]),
        ("missing key", ["wan/nothing_here", "no"]),
        ("wrong secret", ["refused"]),
        ("no access", ["denied"]),
    ],
)
def test_bad_buckets_and_credentials_are_one_line_before_any_work(s3, bucket, tmp_path, what, words):
    name, st, _ = bucket
    base = f"s3://{name}/wan/low_noise_model"
    env = {**s3.env("admin"), "DISTMERGE_CACHE_DIR": str(tmp_path / "cache")}
    if what == "missing bucket":
        base = "s3://no-such-bucket-dm/wan/low_noise_model"
    elif what == "missing key":
        base = f"s3://{name}/wan/nothing_here"
    elif what == "wrong secret":
        env["AWS_SECRET_ACCESS_KEY"] = "not-the-secret"
    else:
        env = {**s3.env("outsider"), "DISTMERGE_CACHE_DIR": str(tmp_path / "cache")}
    out = str(tmp_path / "out")
    r = _merge(base, st, out, env)
    lines = [x for x in r.stderr.splitlines() if x.strip() and " units, " not in x]
    assert r.returncode == 1 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert all(w in lines[0] for w in words), lines[0]
    assert not os.path.exists(out)


def test_extract_from_a_bucket_writes_the_local_extraction_s_bytes(s3, bucket, tiny_base, tmp_path):
    """``--base`` and ``--tuned`` in a bucket: the same LoRA file as from the local checkpoints."""
    name, st, _ = bucket
    tuned = str(tmp_path / "tuned")
    r = run_cli("merge", "--base", tiny_base, "--lora", st, "-o", tuned)
    assert r.returncode == 0, r.stderr
    s3.upload_folder(tuned, f"s3://{name}/extract/tuned")
    env = {**s3.env("reader"), "DISTMERGE_CACHE_DIR": str(tmp_path / "cache")}
    outs = {}
    for where, base, tuned_in in [
        ("local", tiny_base, tuned),
        ("s3", f"s3://{name}/wan/low_noise_model", f"s3://{name}/extract/tuned"),
    ]:
        outs[where] = str(tmp_path / f"{where}.safetensors")
        args = ["extract", "--base", base, "--tuned", tuned_in, "-o", outs[where], "--rank", "4", "-q"]
        r = subprocess.run(
            [sys.executable, "-m", "distmerge", *args], capture_output=True, text=True, env=child_env(env)
        )
        assert r.returncode == 0, r.stderr
    local, remote = (safe_open(outs[w], "pt") for w in ("local", "s3"))
    assert (
        sorted(local.keys()) == sorted(remote.keys()) and len(local.keys()) == 3 * 20
    )  # down, up, alpha of each module
    for k in local.keys():  # noqa: SIM118  (a safe_open handle, not a dict)
        assert torch.equal(local.get_tensor(k), remote.get_tensor(k)), k


def test_verify_reads_a_merged_model_in_a_bucket_and_finds_a_damaged_shard(s3, bucket, tmp_path):
    """A merge into the bucket verifies from the bucket (base, LoRA and output by URL; every shard's
    recorded CRC checked by reading it back); one flipped byte in a shard is found."""
    name, st, _ = bucket
    base, lora, out = (
        f"s3://{name}/wan/low_noise_model",
        f"s3://{name}/loras/lora.safetensors",
        f"s3://{name}/verify/out",
    )
    env = {**s3.env("admin"), "DISTMERGE_CACHE_DIR": str(tmp_path / "cache")}
    assert _merge(base, lora, out, env, "-q").returncode == 0

    def verify():
        args = ["verify", out, "--base", base, "--lora", lora, "-q"]
        return subprocess.run(
            [sys.executable, "-m", "distmerge", *args], capture_output=True, text=True, env=child_env(env)
        )

    r = verify()
    assert r.returncode == 0 and r.stdout.startswith("verify: OK"), r.stdout + r.stderr
    assert "20 merged" in r.stdout and "1 shard checksum matches" in r.stdout, r.stdout
    c = s3.client()
    key = "verify/out/diffusion_pytorch_model-00001-of-00001.safetensors"
    data = bytearray(c.get_object(Bucket=name, Key=key)["Body"].read())
    data[-1] ^= 0xFF
    c.put_object(Bucket=name, Key=key, Body=bytes(data))
    r = verify()
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "FAILED" in r.stdout and "does not match the recorded" in r.stdout, r.stdout
