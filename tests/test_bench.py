"""benchmarks/bench.py end to end on tiny checkpoints: every method runs, and the JSON holds the
medians, ratios and whole-process-tree RSS the README's table is made from. (Speed itself is
measured by running the script, never asserted here.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from distmerge.app.synth import WanConfig, make_factors, write_lora, write_wan_base

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "bench.py")
TINY = ["--dim", "128", "--ffn", "256", "--text-dim", "64", "--blocks", "1", "--rank", "4"]


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


def test_generated_wan_checkpoint_runs_every_method(tmp_path):
    proc, doc = _bench([*TINY, "--shards", "2"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = doc["summary"]
    assert [s[m]["runs_ok"] for m in ("cp", "distmerge", "seed")] == [1, 1, 1]
    (dm,) = [r for r in doc["runs"] if r["method"] == "distmerge"]
    # the measured tree is the driver plus the embedded Ray session (GCS, raylet, workers)
    assert dm["peak_procs"] >= 4 and dm["peak_rss_bytes"] > 200 << 20
    assert dm["extra"]["pairs_merged"] == 10  # the 10 linear layers of the one block
    assert doc["ratios"]["distmerge_over_cp_time"] > 0 and doc["ratios"]["seed_over_distmerge_rss"] > 0
    assert "distmerge / cp   (time):" in proc.stdout
    assert doc["inputs"]["base_bytes"] == sum(
        os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(doc["inputs"]["base"]) for f in fs
    )


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


def test_base_without_lora_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, BENCH, "--base", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--base and --lora go together" in proc.stderr
