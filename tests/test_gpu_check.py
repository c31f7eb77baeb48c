"""benchmarks/gpu_check.sh's CPU-only parts: run with ``GPU_CHECK_DEVICE=cpu`` on tiny widths, every
step prints one ``STEP name: STATUS …`` line, a failed step does not stop the others and makes the
exit status 1, and the comparison of two outputs reports bit-identity or the max ulp difference.
(The GPU itself is exercised only when the script runs on a machine with one.)"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
SCRIPT = os.path.join(BENCHMARKS, "gpu_check.sh")
TINY = {
    "GPU_CHECK_DIM": "128",
    "GPU_CHECK_FFN": "256",
    "GPU_CHECK_TEXT_DIM": "64",
    "GPU_CHECK_BLOCKS": "1",
    "GPU_CHECK_RANK": "4",
}
STEP = re.compile(r"^STEP ([\w-]+): (PASS|FAIL|SKIP) (.*)$")


def _helper():
    spec = importlib.util.spec_from_file_location("_gpu_check_helper", os.path.join(BENCHMARKS, "gpu_check.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _run(tmp_path, timeout: int = 240, **env: str) -> tuple[subprocess.CompletedProcess, dict[str, tuple[str, str]]]:
    full = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "OUT") and not k.startswith("GPU_CHECK_")}
    full.update(PY=sys.executable, GPU_CHECK_WORKDIR=str(tmp_path / "work"), GPU_CHECK_RESULTS=str(tmp_path / "res"))
    full.update(env)
    proc = subprocess.run(["bash", SCRIPT], capture_output=True, text=True, timeout=timeout, env=full)
    steps = {}
    for ln in proc.stdout.splitlines():
        if m := STEP.match(ln):
            assert m.group(1) not in steps, f"two lines for step {m.group(1)}"
            steps[m.group(1)] = (m.group(2), m.group(3))
    return proc, steps


@pytest.mark.slow
@pytest.mark.ray
def test_cpu_mode_merges_and_compares(tmp_path):
    steps_run = "env,generate,merge-gpu,merge-cpu,compare"
    proc, steps = _run(tmp_path, GPU_CHECK_DEVICE="cpu", GPU_CHECK_STEPS=steps_run, **TINY)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert list(steps) == steps_run.split(",")
    assert {s for s, _ in steps.values()} == {"PASS"}, steps
    assert "CUDA not available" in steps["env"][1] and "merge device cpu" in steps["env"][1]
    assert "10 units on cpu" in steps["merge-gpu"][1] and "first unit" in steps["merge-gpu"][1]
    assert steps["compare"][1].startswith("bit-identical:") and "max 0 ulp" in steps["compare"][1]
    res = tmp_path / "res"
    assert (res / "merge-gpu-report.json").exists() and (res / "merge-cpu-report.json").exists()
    summary = (res / "summary.txt").read_text()
    assert summary.count("STEP ") == 5 and "5 steps, 0 failed" in summary
    assert not (tmp_path / "work" / "out-gpu").exists() and not (tmp_path / "work" / "out-cpu").exists()


@pytest.mark.slow
@pytest.mark.ray
def test_cpu_mode_times_cp_against_distmerge(tmp_path):
    proc, steps = _run(tmp_path, GPU_CHECK_DEVICE="cpu", GPU_CHECK_STEPS="timing", **TINY)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert list(steps) == ["generate", "timing"] and steps["timing"][0] == "PASS", steps
    timing = steps["timing"][1]
    for part in ("cp -r && sync", "x cp", "first unit", "units", "% of cp", "tail", "peak RSS"):
        assert part in timing, part
    res = tmp_path / "res"
    assert "distmerge timeline" in (res / "timing.log").read_text() and (res / "timing.json").exists()


def test_a_failed_step_does_not_stop_the_others(tmp_path):
    # device cuda on this CPU-only machine: env fails (no CUDA), compare fails (nothing merged)
    proc, steps = _run(tmp_path, timeout=120, GPU_CHECK_DEVICE="cuda", GPU_CHECK_STEPS="env,compare,verify")
    assert proc.returncode == 1
    assert list(steps) == ["env", "compare", "verify"] and {s for s, _ in steps.values()} == {"FAIL"}
    if not torch.cuda.is_available():
        assert "missing CUDA" in steps["env"][1]
    assert "no output" in steps["compare"][1] and "out-gpu" in steps["verify"][1]
    assert "3 steps, 3 failed" in proc.stdout


def test_steps_past_the_budget_are_skipped(tmp_path):
    proc, steps = _run(tmp_path, timeout=60, GPU_CHECK_BUDGET_S="12", GPU_CHECK_STEPS="env,compare")
    assert steps["env"][0] == "SKIP" and "budget" in steps["env"][1]
    assert proc.returncode == (1 if steps["compare"][0] == "FAIL" else 0)


def test_missing_python_fails_every_step(tmp_path):
    proc, steps = _run(tmp_path, timeout=60, PY=str(tmp_path / "no-python"), GPU_CHECK_STEPS="env,generate")
    assert proc.returncode == 1 and [s for s, _ in steps.values()] == ["FAIL", "FAIL"]


def test_pytest_verdicts(tmp_path):
    h = _helper()
    log = tmp_path / "log"

    def verdict(text: str, rc: int, device: str = "cuda") -> str:
        log.write_text(text)
        out = subprocess.run(
            [sys.executable, os.path.join(BENCHMARKS, "gpu_check.py"), "pytest-verdict", str(log), str(rc)]
            + ["--device", device],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        return out.split()[0]

    assert h.pytest_counts("..\n2 passed, 641 deselected in 13.07s\n") == {"passed": 2, "deselected": 641}
    assert verdict("2 passed, 641 deselected in 13.07s", 0) == "PASS"
    assert verdict("2 skipped, 641 deselected in 3.0s", 0) == "FAIL"  # a GPU machine that ran none
    assert verdict("2 skipped, 641 deselected in 3.0s", 0, "cpu") == "SKIP"
    assert verdict("1 failed, 1 passed, 641 deselected in 3.0s", 1) == "FAIL"
    # a module that needs a test dependency this machine lacks does not hide passing gpu tests
    assert verdict("E   ModuleNotFoundError: No module named 'hypothesis'\n2 passed, 3 errors in 3.0s", 1) == "PASS"
    assert verdict("/usr/bin/python3: No module named pytest\n", 1) == "FAIL"


def _write(folder, tensors: dict[str, torch.Tensor]) -> str:
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "model.safetensors"))
    return str(folder)


def test_compare_reports_the_max_ulp(tmp_path):
    h = _helper()
    torch.manual_seed(0)
    w = torch.randn(1000, 100).to(torch.bfloat16)
    ref = _write(tmp_path / "ref", {"w": w, "b": torch.arange(4)})
    status, figs = h.compare(_write(tmp_path / "same", {"w": w.clone(), "b": torch.arange(4)}), ref)
    assert status == "PASS" and figs.startswith("bit-identical") and "max 0 ulp" in figs

    one = w.clone().view(torch.int16)
    one[0, :5] += 1  # 5 of 100 000 values one ulp off: the documented tolerance
    status, figs = h.compare(_write(tmp_path / "one", {"w": one.view(torch.bfloat16), "b": torch.arange(4)}), ref)
    assert status == "PASS" and "within 1 ulp" in figs and "max 1 ulp (w)" in figs and "5 values" in figs

    three = w.clone().view(torch.int16)
    three[0, 0] += 3
    status, figs = h.compare(_write(tmp_path / "three", {"w": three.view(torch.bfloat16), "b": torch.arange(4)}), ref)
    assert status == "FAIL" and "max 3 ulp" in figs

    many = w.clone().view(torch.int16)
    many[:2] += 1  # 0.2 % of the values differ: more than the 0.1 % allowed
    status, figs = h.compare(_write(tmp_path / "many", {"w": many.view(torch.bfloat16), "b": torch.arange(4)}), ref)
    assert status == "FAIL" and "99.9" in figs

    status, figs = h.compare(_write(tmp_path / "int", {"w": w, "b": torch.arange(4) + 1}), ref)
    assert status == "FAIL" and "b: " in figs
    status, figs = h.compare(_write(tmp_path / "keys", {"w": w}), ref)
    assert status == "FAIL" and "key sets differ" in figs


@pytest.mark.parametrize("text,rc,want", [("verify: OK — 42 tensors", 0, "PASS"), ("verify: FAILED — x", 1, "FAIL")])
def test_verify_verdict(tmp_path, text, rc, want):
    log = tmp_path / "v.log"
    log.write_text(f"$ distmerge verify out\n{text}\n")
    out = subprocess.run(
        [sys.executable, os.path.join(BENCHMARKS, "gpu_check.py"), "verify-verdict", str(log), str(rc)],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert out.split()[0] == want and text in out
