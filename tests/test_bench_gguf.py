"""benchmarks/bench.py's GGUF methods: ``distmerge-q8_0`` (``distmerge merge --output DEST/merged.gguf
--dtype q8_0``) against ``peer-q8_0`` (``benchmarks/gguf_peer.py``, the one-process gguf-py way), end
to end on a tiny checkpoint: both run, their files are byte-identical (a strong check of both), and
the paired ratios are made. (Speed itself is never asserted.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from distmerge.app.synth import WanConfig, make_factors, write_lora, write_wan_base
from tests.helpers import BENCHMARKS, load_benchmark

BENCH = os.path.join(BENCHMARKS, "bench.py")
TINY = ["--dim", "128", "--ffn", "256", "--text-dim", "64", "--blocks", "1", "--rank", "4"]
GGUF = "distmerge-q8_0,peer-q8_0"


def _load(name: str):
    return load_benchmark(name, "_bench_gguf")


@pytest.mark.slow
@pytest.mark.ray
def test_gguf_methods_run_through_bench_and_write_the_same_bytes(tmp_path):
    out = tmp_path / "results.json"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    argv = [sys.executable, BENCH, "--workdir", str(tmp_path / "work"), "--repeats", "1", "--json", str(out)]
    proc = subprocess.run([*argv, *TINY, "--methods", GGUF], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert list(doc["summary"]) == ["distmerge-q8_0", "peer-q8_0"]
    assert [doc["summary"][m]["runs_ok"] for m in ("distmerge-q8_0", "peer-q8_0")] == [1, 1]
    dm, peer = doc["runs"]
    assert dm["extra"]["pairs_merged"] == 10 and dm["extra"]["timeline"]["units"] > 0
    assert "--dtype q8_0" in open(dm["log"]).readline() and "merged.gguf" in open(dm["log"]).readline()
    assert "10 pairs merged" in open(peer["log"]).read() and peer["peak_rss_bytes"] > 0
    # the same bytes: distmerge's parallel GGUF and the one-process gguf-py file
    assert dm["extra"]["output_sha256"] == peer["extra"]["output_sha256"] is not None
    assert doc["ratios"]["gguf_outputs_identical"] is True
    for key in ("peer_q8_0_over_distmerge_q8_0_time", "peer_q8_0_over_distmerge_q8_0_rss"):
        assert doc["ratios"][key] > 0, key
    assert "peer-q8_0 / distmerge-q8_0 (time):" in proc.stdout
    (same,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("GGUF files identical (sha256):")]
    assert same.split()[-1] == "yes"
    assert "| distmerge-q8_0 |" in doc["table_md"] and "| peer-q8_0 |" in doc["table_md"]
    assert not (tmp_path / "work" / "out-peer-q8_0").exists()  # outputs are removed after each run


def _tiny_inputs(tmp_path):
    cfg = WanConfig(dim=128, ffn=256, blocks=1, text_dim=64, dtype="BF16")
    base = tmp_path / "base"
    write_wan_base(str(base), cfg, num_shards=2)
    factors = make_factors(cfg, rank=4)
    lora = tmp_path / "lora.pth"
    write_lora(str(lora), factors, layout="roll")
    return base, lora


def test_peer_writes_city96_types_and_the_fp32_merge_rounded_once(tmp_path):
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFReader
    from gguf.quants import quantize

    peer = _load("gguf_peer")
    base, lora = _tiny_inputs(tmp_path)
    out = tmp_path / "peer.gguf"
    assert peer.main(["--base", str(base), "--lora", str(lora), "--output", str(out), "--alpha", "0.5"]) == 0
    state = peer.load_base(str(base))
    r = GGUFReader(str(out))
    assert [t.name for t in r.tensors] == list(state)  # the base's own order, shard by shard
    assert r.fields["general.architecture"].contents() == "wan"
    assert r.fields["general.file_type"].contents() == 7 and r.fields["general.quantization_version"].contents() == 2
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["blocks.0.ffn.0.weight"] == "Q8_0" and types["blocks.0.ffn.0.bias"] == "F32"
    assert types["blocks.0.modulation"] == "F32" and types["text_embedding.0.weight"] == "BF16"
    assert types["patch_embedding.weight"] == "F32"
    data = {t.name: np.asarray(t.data).tobytes() for t in r.tensors}
    pairs = peer.lora_pairs(torch.load(str(lora), weights_only=True))
    b, a = pairs["blocks.0.ffn.0.weight"]
    ref = state["blocks.0.ffn.0.weight"].float() + 0.5 * (b.float() @ a.float())
    assert data["blocks.0.ffn.0.weight"] == quantize(ref.numpy(), Q.Q8_0).tobytes()
    emb = state["text_embedding.0.weight"]  # not merged: the bf16 bits as they were
    assert data["text_embedding.0.weight"] == emb.view(torch.int16).numpy().tobytes()


def test_gguf_methods_are_chosen_by_name_only(tmp_path):
    bench = _load("bench")
    assert not set(bench.GGUF_METHODS) & set(bench.parse_args([]).method_list)
    a = bench.parse_args(["--methods", f"cp,{GGUF}", "--workdir", str(tmp_path)])
    assert a.method_list == ["cp", "distmerge-q8_0", "peer-q8_0"]
    assert bench.parse_args(["--methods", f"cp,{GGUF}", "--skip-seed"]).method_list == ["cp", "distmerge-q8_0"]
    # --distmerge-args come first: they cannot change the GGUF's type
    a = bench.parse_args(["--methods", GGUF, "--workdir", str(tmp_path), "--distmerge-args=--dtype bf16"])
    inp = bench.Inputs(str(tmp_path / "b"), str(tmp_path / "l.pth"), 1, 1, {})
    argv, env, ray_tmp, _ = bench.command("distmerge-q8_0", inp, str(tmp_path / "o"), a, str(tmp_path), 1)
    assert argv[-4:] == ["--dtype", "bf16", "--dtype", "q8_0"]  # the last --dtype wins
    assert str(tmp_path / "o" / "merged.gguf") in argv and argv[argv.index("--report") + 1].endswith(
        "distmerge-q8_0-r1-report.json"
    )
    os.rmdir(ray_tmp)
    argv, env, *_ = bench.command("peer-q8_0", inp, str(tmp_path / "p"), a, str(tmp_path), 1)
    assert argv[1].endswith("gguf_peer.py") and argv[argv.index("--output") + 1].endswith("merged.gguf")
    assert env is None


def test_identical_only_when_every_round_wrote_the_same_bytes():
    bench = _load("bench")

    def run(method, rnd, wall, sha, rc=0):
        r = bench.Run(method, rnd, rc, wall, wall, 0.0, wall * 10, 1, 1, 0, False, "")
        r.extra = {"output_sha256": sha}
        return r

    runs = [run("distmerge-q8_0", 1, 2.0, "a"), run("peer-q8_0", 1, 6.0, "a")]
    runs += [run("distmerge-q8_0", 2, 4.0, "b"), run("peer-q8_0", 2, 4.0, "b")]
    _, ratios, _ = bench.summarize(runs, list(bench.GGUF_METHODS), 10**9)
    assert [r["peer_q8_0_over_distmerge_q8_0_time"] for r in ratios["per_round"]] == [3.0, 1.0]
    assert ratios["peer_q8_0_over_distmerge_q8_0_time"] == 2.0 and ratios["peer_q8_0_over_distmerge_q8_0_rss"] == 2.0
    assert ratios["gguf_outputs_identical"] is True
    runs[3].extra["output_sha256"] = "c"
    assert bench.summarize(runs, list(bench.GGUF_METHODS), 10**9)[1]["gguf_outputs_identical"] is False
    failed = [runs[0], run("peer-q8_0", 1, 6.0, None, rc=1)]
    assert bench.summarize(failed, list(bench.GGUF_METHODS), 10**9)[1]["gguf_outputs_identical"] is None
    assert "gguf_outputs_identical" not in bench.summarize(runs[:1], ["distmerge-q8_0"], 10**9)[1]
