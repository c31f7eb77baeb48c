"""The ``distmerge`` command as users run it: exit codes, one-line errors, seed spellings, report."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

from distmerge.app.synth import write_lora

from .conftest import snapshot
from .helpers import assert_close_to_reference, load_checkpoint, lora_terms, reference_merge


def run_cli(*args: str, cwd: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run(
        [sys.executable, "-m", "distmerge", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


@pytest.mark.ray
def test_merge_with_seed_spellings_and_report(tiny_base, tiny_factors, tmp_path):
    lora = str(tmp_path / "diffusion_module.pth")
    write_lora(lora, tiny_factors)
    out, rep = str(tmp_path / "merged"), str(tmp_path / "report.json")
    r = run_cli(
        "merge",
        "--base_model_path",
        tiny_base,
        "--lora_path",
        lora,
        "--output_path",
        out,
        "--alpha",
        "0.5",
        "--dtype",
        "bf16",
        "--max-shard-size",
        "200KB",
        "--num-cpus",
        "2",
        "--report",
        rep,
        "-q",
    )
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith(f"merged {len(tiny_factors)} pairs into ") and out in last, last
    ref = reference_merge(load_checkpoint(tiny_base), lora_terms(tiny_factors, 0.5), out_dtype=torch.bfloat16)
    assert_close_to_reference(load_checkpoint(out), ref)
    report = json.load(open(rep))
    assert report["pairs_merged"] == len(tiny_factors)
    assert report["shards"] == sorted(n for n in os.listdir(out) if n.endswith(".safetensors"))
    assert all(u["device"] == "cpu" and u["node_id"] for u in report["units"])


def _truncated_base(tiny_base: str, tmp_path) -> str:
    d = str(tmp_path / "trunc_base")
    shutil.copytree(tiny_base, d)
    shard = os.path.join(d, sorted(n for n in os.listdir(d) if n.endswith(".safetensors"))[-1])
    os.truncate(shard, os.path.getsize(shard) - 100)
    return d


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/distmerge-pwned",))


def _bad_cases(tiny_base, tmp_path, lora):
    evil = str(tmp_path / "evil.pth")
    with open(evil, "wb") as f:
        pickle.dump({"x.lora_A.weight": _Evil()}, f)
    out = str(tmp_path / "out")
    nonempty = tmp_path / "nonempty"
    nonempty.mkdir()
    (nonempty / "keep.txt").write_text("x")
    return {
        "truncated shard": (
            ["--base", _truncated_base(tiny_base, tmp_path), "--lora", lora, "--output", out],
            r"-of-0000\d\.safetensors.*truncated",
        ),
        "missing lora": (
            ["--base", tiny_base, "--lora", str(tmp_path / "nope.pth"), "--output", out],
            "nope.pth: LoRA file not found",
        ),
        "pickle with code": (["--base", tiny_base, "--lora", evil, "--output", out], "evil.pth: refused to load"),
        "weights count": (
            ["--base", tiny_base, "--lora", lora, "--weight", "1", "--weight", "2", "--output", out],
            "1 --lora but 2 --weight",
        ),
        "output inside base": (
            ["--base", tiny_base, "--lora", lora, "--output", os.path.join(tiny_base, "m")],
            "inside its folder",
        ),
        "non-empty output": (
            ["--base", tiny_base, "--lora", lora, "--output", str(nonempty)],
            "not empty; pass --overwrite",
        ),
    }


@pytest.mark.ray
@pytest.mark.parametrize(
    "case",
    ["truncated shard", "missing lora", "pickle with code", "weights count", "output inside base", "non-empty output"],
)
def test_bad_input_is_one_line_nonzero_and_publishes_nothing(tiny_base, tiny_factors, tmp_path, case):
    lora = str(tmp_path / "l.pth")
    write_lora(lora, tiny_factors)
    if os.path.exists("/tmp/distmerge-pwned"):
        os.remove("/tmp/distmerge-pwned")
    args, pattern = _bad_cases(tiny_base, tmp_path, lora)[case]
    before = snapshot(tiny_base)
    r = run_cli("merge", *args)
    assert r.returncode == (2 if case == "weights count" else 1), (r.returncode, r.stderr)  # 2: usage
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("distmerge: error: ")
    import re

    assert re.search(pattern, lines[0]), lines[0]
    assert not os.path.exists(tmp_path / "out")
    assert not os.path.exists("/tmp/distmerge-pwned")
    assert snapshot(tiny_base) == before


def test_usage_errors_exit_2_and_help_lists_options():
    assert run_cli("merge", "--base", "x").returncode == 2
    h = run_cli("merge", "--help")
    assert h.returncode == 0
    for opt in (
        "--lora",
        "--weight",
        "--alpha",
        "--dtype",
        "--max-shard-size",
        "--skip-unmatched",
        "--overwrite",
        "--address",
        "--num-workers",
        "--device",
        "--report",
        "--save_dir",
    ):
        assert opt in h.stdout, opt


@pytest.mark.ray
def test_a_small_merge_is_done_by_the_driver_without_starting_ray(tiny_base, tiny_factors, tmp_path):
    """A base under ``DRIVER_ALONE_BYTES``: every unit on the driver, with all its cores, and no
    Ray process ever started; the bytes are those of a merge through Ray."""
    lora = str(tmp_path / "l.pth")
    write_lora(lora, tiny_factors)
    reps = {}
    for mode, env in (("alone", {}), ("ray", {"DISTMERGE_INLINE_UNITS": "0"})):
        out, rep = str(tmp_path / mode), str(tmp_path / f"{mode}.json")
        cmd = [sys.executable, "-m", "distmerge", "merge", "--base", tiny_base, "--lora", lora, "--output", out]
        full_env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **env}
        r = subprocess.run([*cmd, "--report", rep, "-q"], capture_output=True, text=True, env=full_env, timeout=300)
        assert r.returncode == 0, r.stderr
        reps[mode] = json.load(open(rep))
    assert reps["alone"]["ray"]["mode"] == "none" and "ray ready" not in reps["alone"]["phases"]
    assert {u["node_id"] for u in reps["alone"]["units"]} == {"driver"}
    assert reps["ray"]["ray"]["mode"] == "local" and "driver" not in {u["node_id"] for u in reps["ray"]["units"]}
    assert load_checkpoint(str(tmp_path / "alone")).keys() == load_checkpoint(str(tmp_path / "ray")).keys()
    for k, v in load_checkpoint(str(tmp_path / "alone")).items():
        assert torch.equal(v, load_checkpoint(str(tmp_path / "ray"))[k]), k


@pytest.mark.ray
@pytest.mark.parametrize("which, url", [("--base", "gs"), ("--lora", "gs"), ("--output", "gs"), ("--report", "gs")])
def test_a_url_that_cannot_be_used_is_refused_and_never_becomes_a_local_folder(tiny_base, lora, tmp_path, which, url):
    args = {"--base": tiny_base, "--lora": lora, "--output": "merged", "--report": "r.json"}
    args[which] = f"{url}://bucket/wan/x"
    r = run_cli("merge", *[x for kv in args.items() for x in kv], cwd=str(tmp_path))
    assert r.returncode == 2, r.stderr
    assert f"{url}://bucket/wan/x" in r.stderr and "mount" in r.stderr and "Traceback" not in r.stderr
    assert os.listdir(tmp_path) == []  # no "s3:" folder, no output, no lock
