"""benchmarks/bench.py end to end on tiny checkpoints: every method runs, and the JSON holds the
medians, ratios, distmerge phase timeline and whole-process-tree RSS the README's table is made
from. (Speed itself is measured by running the script, never asserted here.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from distmerge.app.synth import WanConfig, make_factors, write_lora, write_wan_base
from tests.helpers import BENCHMARKS, load_benchmark

BENCH = os.path.join(BENCHMARKS, "bench.py")
TINY = ["--dim", "128", "--ffn", "256", "--text-dim", "64", "--blocks", "1", "--rank", "4"]


def _load(name: str):
    return load_benchmark(name, "_bench")


def _bench(args: list[str], tmp_path) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "results.json"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, BENCH, "--workdir", str(tmp_path / "work"), "--repeats", "1", "--json", str(out), *args],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    return proc, (json.loads(out.read_text()) if out.exists() else {})


@pytest.mark.slow
@pytest.mark.ray
def test_generated_wan_checkpoint_runs_every_method(tmp_path):
    proc, doc = _bench([*TINY, "--shards", "2"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = doc["summary"]
    assert [s[m]["runs_ok"] for m in ("cp", "distmerge", "seed", "seed-fp32")] == [1, 1, 1, 1]
    (dm,) = [r for r in doc["runs"] if r["method"] == "distmerge"]
    # the measured tree: a base this small is merged by the driver alone, with no Ray session
    assert dm["peak_procs"] >= 1 and dm["peak_rss_bytes"] > 200 << 20
    assert dm["extra"]["ray"]["mode"] == "none"
    assert dm["extra"]["pairs_merged"] == 10  # the 10 linear layers of the one block
    for key in ("distmerge_over_cp_time", "seed_over_distmerge_rss", "seed_fp32_over_distmerge_time"):
        assert doc["ratios"][key] > 0, key
    assert doc["ratios"]["per_round"][0]["round"] == 1
    assert "distmerge / cp -r && sync (time):" in proc.stdout and "seed-fp32 / distmerge (time):" in proc.stdout
    assert doc["inputs"]["base_bytes"] == sum(
        os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(doc["inputs"]["base"]) for f in fs
    )
    # cp is a durable copy
    (cp,) = [r for r in doc["runs"] if r["method"] == "cp"]
    assert "cp -r" in open(cp["log"]).readline() and "&& sync" in open(cp["log"]).readline()
    assert "cp -r && sync" in proc.stdout
    # the seeds: bf16 math vs float32 math
    (fp32,) = [r for r in doc["runs"] if r["method"] == "seed-fp32"]
    assert "(fp32 math)" in open(fp32["log"]).read() and fp32["peak_rss_bytes"] > 0
    # the phases, from the run's --report on the benchmark's clock
    tl = dm["extra"]["timeline"]
    assert 0 < tl["startup_s"] < tl["first_unit_s"] <= tl["last_unit_done_s"] <= tl["exit_s"] <= dm["cmd_s"] + 0.01
    assert tl["units"] == 10 and tl["units_bytes"] > 0 and tl["units_s"] >= 0
    assert abs(tl["tail_s"] - (tl["exit_s"] - tl["last_unit_done_s"])) < 0.01
    assert tl["phases_s"]["published"] > tl["startup_s"]  # ("ray ready" only when a unit waited for Ray)
    assert dm["started_at"] < dm["exited_at"]
    (rnd,) = doc["timeline"]["rounds"]
    assert rnd["cp_gb_s"] > 0 and rnd["to_first_unit_s"] == tl["first_unit_s"]
    assert "distmerge timeline: s from command start" in proc.stdout
    assert "first unit running" in proc.stdout and "tail s (last unit done -> exit)" in proc.stdout


@pytest.mark.slow
@pytest.mark.ray
def test_existing_checkpoint_with_base_and_lora(tmp_path):
    cfg = WanConfig(dim=128, ffn=256, blocks=1, text_dim=64, dtype="BF16")
    base = tmp_path / "mine"
    write_wan_base(str(base), cfg, num_shards=2)
    lora = tmp_path / "lora.safetensors"
    write_lora(str(lora), make_factors(cfg, rank=4), layout="diffusion_model", alpha=2.0)
    before = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in base.iterdir()}
    proc, doc = _bench(["--base", str(base), "--lora", str(lora)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list(doc["summary"]) == ["cp", "distmerge"]  # the seed only reads ROLL keys: not by default
    assert doc["inputs"]["lora_bytes"] == lora.stat().st_size
    assert doc["runs"][1]["extra"]["pairs_merged"] == 10
    assert "your checkpoint" in proc.stdout
    assert not (tmp_path / "work" / "out-distmerge").exists()  # outputs are removed after each run
    assert {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in base.iterdir()} == before


def test_timeline_from_a_report():
    bench = _load("bench")
    rep = {
        "started_at": 1000.0,
        "phases": {"inputs read": 0.5, "ray ready": 1.5, "a future phase": 9.0, "bad": "x"},
        "units": [
            {"started_s": 2.0, "seconds": 3.0, "bytes": 3_000_000_000},
            {"started_s": 2.5, "seconds": 3.5, "bytes": 1_000_000_000},
            {"started_s": 0.0, "seconds": 0.0, "bytes": 5},  # not timed (e.g. reused): bytes only
        ],
        "unknown": 1,
    }
    t = bench.timeline(rep, command_start=998.0, exited_at=1007.5)
    assert t["startup_s"] == 2.0
    assert t["phases_s"] == {"inputs read": 2.5, "ray ready": 3.5, "a future phase": 11.0}
    assert (t["first_unit_s"], t["last_unit_done_s"], t["units_s"]) == (4.0, 8.0, 4.0)
    assert t["units_gb_s"] == 1.0 and t["tail_s"] == 1.5 and t["exit_s"] == 9.5 and t["units"] == 3
    # a report without started_at (or units) leaves the figures it cannot compute None
    old = bench.timeline({"phases": {"ray ready": 1.0}}, 10.0, 20.0)
    assert old["startup_s"] is None and old["first_unit_s"] is None and old["exit_s"] == 10.0
    assert bench.timeline({"started_at": 11.0}, 10.0, 20.0)["tail_s"] is None


def test_paired_ratios_within_a_round():
    bench = _load("bench")

    def run(method, rnd, wall, rss=1, timeline=None):
        r = bench.Run(method, rnd, 0, wall, wall, 0.0, rss, 1, 1, 0, False, "")
        r.extra = {"timeline": timeline} if timeline else {}
        return r

    tl = {"units_gb_s": 0.5, "first_unit_s": 3.0, "last_unit_done_s": 5.0, "units_s": 2.0, "tail_s": 2.0}
    tl.update(exit_s=7.0, startup_s=1.0, phases_s={"ray ready": 2.0})
    runs = [run("cp", 1, 1.0), run("distmerge", 1, 3.0, timeline=tl)]
    runs += [run("cp", 2, 2.0), run("distmerge", 2, 4.0, timeline={**tl, "units_gb_s": 0.25})]
    summary, ratios, timeline = bench.summarize(runs, ["cp", "distmerge"], 2_000_000_000)
    assert [r["distmerge_over_cp_time"] for r in ratios["per_round"]] == [3.0, 2.0]
    assert ratios["distmerge_over_cp_time"] == 2.5  # median of the per-round ratios, not 3.5 / 1.5
    assert [r["cp_gb_s"] for r in ratios["per_round"]] == [2.0, 1.0]
    assert ratios["distmerge_units_over_cp_gb_s"] == 0.25
    assert ratios["seed_over_distmerge_time"] is None
    assert timeline["median"]["to_first_unit_s"] == 3.0 and len(timeline["rounds"]) == 2
    order = ["merge() starts", "ray ready", "first unit running", "last unit done", "process exit"]
    assert list(timeline["events_s_median"]) == order  # sorted by when they happened


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_seed_fp32_math_rounds_once(dtype):
    seed = _load("seed_merge")
    torch.manual_seed(0)
    w = torch.randn(64, 32).to(dtype)
    a, b = torch.randn(4, 32, dtype=torch.bfloat16), torch.randn(64, 4, dtype=torch.bfloat16)
    lora = {"base_model.model.m.lora_A.default.weight": a, "base_model.model.m.lora_B.default.weight": b}
    fp32, bf16 = {"m.weight": w.clone()}, {"m.weight": w.clone()}
    assert seed.merge_pairs(fp32, lora, 0.5, "fp32") == (1, 0)
    seed.merge_pairs(bf16, lora, 0.5)
    assert fp32["m.weight"].dtype == dtype and bf16["m.weight"].dtype == torch.bfloat16
    ref = (w.double() + 0.5 * (b.double() @ a.double())).to(dtype)
    assert torch.allclose(fp32["m.weight"].double(), ref.double(), rtol=1e-5, atol=1e-5)
    assert torch.equal(fp32["m.weight"], (w.float() + 0.5 * (b.float() @ a.float())).to(dtype))
    with pytest.raises(ValueError):
        seed.merge_pairs(fp32, lora, 0.5, "fp16")


def test_generate_only_prints_the_paths(tmp_path):
    proc = subprocess.run(
        [sys.executable, BENCH, "--workdir", str(tmp_path), "--generate-only", *TINY],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = dict(ln.split("=", 1) for ln in proc.stdout.splitlines() if "=" in ln)
    assert os.path.isdir(got["base"]) and os.path.isfile(got["lora"]) and int(got["base_bytes"]) > 0
    assert not (tmp_path / "logs").exists()  # nothing ran


def test_base_without_lora_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, BENCH, "--base", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--base and --lora go together" in proc.stderr
