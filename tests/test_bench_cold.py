"""benchmarks/bench.py's ``--cold`` and ``floor``: the disk's floor command (a direct read of the base
while as many bytes are written directly), its fallback where O_DIRECT is refused, every method's
wall against the floor and cp (paired within a round), the markdown table, and ``--cold``'s refusal
where the page cache cannot be dropped. (Speed itself is never asserted.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import BENCHMARKS, load_benchmark

TINY = ["--dim", "128", "--ffn", "256", "--text-dim", "64", "--blocks", "1", "--rank", "4"]


def _load(name: str):
    return load_benchmark(name, "_bench_cold")


def _base(tmp_path, sizes=(1000, 70 << 20)):
    base = tmp_path / "base"
    base.mkdir()
    for i, n in enumerate(sizes):
        (base / f"part-{i}.bin").write_bytes(b"\1" * n)
    total = sum(sizes)
    return _load("bench").Inputs(str(base), str(tmp_path / "lora"), total, 0, {}), total


def test_floor_reads_every_file_while_writing_as_many_bytes(tmp_path):
    bench = _load("bench")
    inp, total = _base(tmp_path)
    dest = tmp_path / "out-floor"
    plan = bench.floor_plan(inp, str(dest))
    assert dest.is_dir() and not list(dest.iterdir())  # created, the O_DIRECT probe removed
    assert plan.files == 2 and plan.read_bytes == total and plan.write_bytes == 2 * (64 << 20)  # ceil(total/64M)
    assert plan.argv[:2] == ["sh", "-c"] and plan.argv[-2:] == sorted(str(p) for p in (tmp_path / "base").iterdir())
    script = plan.argv[2]
    assert "dd if=/dev/zero" in script and "wait" in script and "of=/dev/null bs=64M" in script
    if plan.direct_read and plan.direct_write:  # ext4/xfs (and tmpfs on recent kernels)
        assert "iflag=direct" in script and "oflag=direct" in script and plan.note == ""
    proc = subprocess.run(plan.argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert (dest / "floor.bin").stat().st_size == plan.write_bytes


def test_floor_falls_back_without_direct_flags_and_says_so(tmp_path, monkeypatch):
    bench = _load("bench")
    monkeypatch.setattr(bench, "_dd_ok", lambda *args: False)  # as on a file system refusing O_DIRECT
    inp, _ = _base(tmp_path, sizes=(5000,))
    plan = bench.floor_plan(inp, str(tmp_path / "out-floor"))
    assert not plan.direct_read and not plan.direct_write and "direct" not in plan.argv[2]
    assert "iflag=direct" in plan.note and "oflag=direct" in plan.note and "page cache" in plan.note
    proc = subprocess.run(plan.argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    # a file that cannot be read fails the command
    bad = [*plan.argv[:-1], str(tmp_path / "missing")]
    assert subprocess.run(bad, capture_output=True, timeout=60).returncode != 0


def test_every_method_against_the_floor_within_a_round_and_the_table():
    bench = _load("bench")

    def run(method, rnd, wall, rss=1 << 30, rc=0):
        return bench.Run(method, rnd, rc, wall, wall, 0.0, rss, 1, 1, 0, True, "")

    runs = [run("floor", 1, 1.0), run("cp", 1, 2.0), run("distmerge", 1, 3.0), run("seed-fp32", 1, 8.0)]
    runs += [run("floor", 2, 2.0), run("cp", 2, 2.0), run("distmerge", 2, 8.0), run("seed-fp32", 2, 8.0, rc=1)]
    methods = ["floor", "cp", "distmerge", "seed-fp32"]
    summary, ratios, _ = bench.summarize(runs, methods, 4_000_000_000)
    assert [r["distmerge_over_floor_time"] for r in ratios["per_round"]] == [3.0, 4.0]
    assert ratios["distmerge_over_floor_time"] == 3.5 and ratios["cp_over_floor_time"] == 1.5
    assert ratios["floor_over_cp_time"] == 0.75 and ratios["seed_fp32_over_floor_time"] == 8.0  # round 2 failed
    assert ratios["distmerge_over_cp_time"] == 2.75 and [r["floor_gb_s"] for r in ratios["per_round"]] == [4.0, 2.0]
    assert summary["floor"]["over_floor_time"] == 1.0 and summary["cp"]["over_cp_time"] == 1.0
    assert summary["distmerge"]["over_floor_time"] == 3.5 and summary["distmerge"]["over_cp_time"] == 2.75
    assert summary["floor"]["throughput_gb_s"] == round(4 / 1.5, 3)  # base bytes / median wall
    table = bench.markdown_table(summary).splitlines()
    assert table[0] == "| method | median wall s | GB/s | × floor | × cp | peak tree RSS GB |"
    assert table[1] == "|---|---:|---:|---:|---:|---:|"
    assert table[2] == "| disk floor | 1.50 | 2.67 | 1.00 | 0.75 | 1.07 |"
    assert table[4] == "| distmerge | 5.50 | 0.73 | 3.50 | 2.75 | 1.07 |"
    # without a floor run, no floor column
    summary, _, _ = bench.summarize([r for r in runs if r.method != "floor"], methods[1:], 4_000_000_000)
    assert "floor" not in bench.markdown_table(summary).splitlines()[0]


def test_cold_puts_floor_first_and_implies_drop_caches():
    bench = _load("bench")
    a = bench.parse_args(["--cold"])
    assert a.method_list == ["floor", "cp", "distmerge", "seed", "seed-fp32"] and a.drop_caches
    a = bench.parse_args(["--cold", "--base", "b", "--lora", "l"])
    assert a.method_list == ["floor", "cp", "distmerge"]
    assert bench.parse_args([]).method_list == ["cp", "distmerge", "seed", "seed-fp32"]
    assert bench.parse_args(["--cold", "--methods", "cp"]).method_list == ["cp"]  # an explicit list is kept


def test_cold_without_a_writable_drop_caches_exits_2(tmp_path, monkeypatch, capsys):
    bench = _load("bench")
    monkeypatch.setattr(bench, "DROP_CACHES", str(tmp_path))  # a folder: cannot be written like the file
    assert bench.main(["--cold", "--workdir", str(tmp_path / "work"), *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("bench: --cold needs a writable") and str(tmp_path) in err
    assert not (tmp_path / "work").exists()  # refused before anything was generated


@pytest.mark.slow
@pytest.mark.ray  # test_markers counts every bench.py run as a Ray run; floor and cp start none
def test_cold_floor_and_cp_end_to_end(tmp_path):
    bench = _load("bench")
    if not bench.drop_caches():
        pytest.skip("the page cache cannot be dropped here (not root, or a container)")
    out = tmp_path / "r.json"
    argv = [sys.executable, os.path.join(BENCHMARKS, "bench.py"), "--cold", "--methods", "floor,cp"]
    argv += ["--repeats", "1", "--workdir", str(tmp_path / "work"), "--json", str(out), *TINY]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    floor = doc["runs"][0]
    assert floor["method"] == "floor" and floor["caches_dropped"]
    assert floor["extra"]["read_bytes"] == doc["inputs"]["base_bytes"] and floor["extra"]["files"] >= 2
    assert doc["summary"]["cp"]["over_floor_time"] > 0 and doc["summary"]["floor"]["throughput_gb_s"] > 0
    assert "cold: sync + page cache dropped before every run" in proc.stdout
    assert doc["table_md"] in proc.stdout and proc.stdout.rstrip().splitlines()[-2].startswith("| cp -r && sync |")
    assert "dd if=/dev/zero" in open(floor["log"]).read()
    assert not (tmp_path / "work" / "out-floor").exists()
