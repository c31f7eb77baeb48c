#!/usr/bin/env python
"""The Python half of ``benchmarks/gpu_check.sh``: each subcommand does (or judges) one step and
prints ONE line, ``PASS|FAIL|SKIP figures``, which the shell script prefixes with ``STEP name:``.

Subcommands (all paths absolute or relative to the repo root):

* ``env --device D`` -- what this machine has: python, torch (+ CUDA build), GPUs, ray,
  safetensors, pytest, psutil, distmerge; FAIL if something the steps need is missing (CUDA only
  when ``D`` is ``cuda``).
* ``pytest-verdict LOG RC --device D`` -- judge ``pytest -q -m gpu tests/`` from its log and exit
  status: PASS if some test passed and none failed; SKIP (``D`` cpu) or FAIL (``D`` cuda) if all
  were skipped.
* ``merge BASE LORA OUT --device D --report FILE --log FILE`` -- run ``distmerge merge`` (``-q``),
  time it, and report the wall, the devices the units ran on, and the phases from the report.
* ``compare A B`` -- every tensor of merge output ``A`` against ``B``: bit-identical, or within
  the documented tolerance (≥ 99.9 % of the values bit-identical, the rest ≤ 1 ulp or within
  1e-6 × the tensor's largest value: the cancellation allowance); the max ulp difference.
* ``verify-verdict LOG RC`` -- the ``verify: …`` line of ``distmerge verify``.
* ``bench-verdict JSON RC`` -- cp -r && sync vs distmerge from ``benchmarks/bench.py --json``.
* ``plain-timing BASE LORA WORK --device D --log FILE`` -- the same timing without psutil (no RSS):
  ``cp -r BASE DEST && sync``, then ``distmerge merge --device D``, one round.

Example (what gpu_check.sh runs for one step):
    python benchmarks/gpu_check.py compare bench-out/gpu-check/out-cuda bench-out/gpu-check/out-cpu
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
GB = 1e9


def _line(status: str, figures: str) -> int:
    print(f"{status} {figures}", flush=True)
    return 0 if status != "FAIL" else 1


def _version(mod: str) -> str | None:
    try:
        m = __import__(mod)
    except Exception:  # noqa: BLE001 - an import that fails for any reason means "not usable"
        return None
    return str(getattr(m, "__version__", "?"))


# --------------------------------------------------------------------------- env


def cmd_env(a: argparse.Namespace) -> int:
    facts: list[str] = [f"python {sys.version.split()[0]} ({sys.executable})"]
    missing: list[str] = []
    try:
        import torch

        facts.append(f"torch {torch.__version__} (CUDA build {torch.version.cuda})")
        cuda = torch.cuda.is_available()
        if cuda:
            n = torch.cuda.device_count()
            p = torch.cuda.get_device_properties(0)
            facts.append(
                f"{n} GPU(s): {p.name} {p.total_memory / 2**30:.0f} GiB sm_{p.major}{p.minor}, "
                f"bf16 {torch.cuda.is_bf16_supported()}"
            )
        else:
            facts.append("CUDA not available")
            if a.device == "cuda":
                missing.append("CUDA")
    except Exception as e:  # noqa: BLE001
        facts.append(f"torch missing ({type(e).__name__}: {e})")
        missing.append("torch")
    for mod, needed in (("ray", True), ("safetensors", True), ("pytest", False), ("psutil", False)):
        v = _version(mod)
        facts.append(f"{mod} {v or 'missing'}")
        if needed and v is None:
            missing.append(mod)
    try:
        import distmerge

        facts.append(f"distmerge from {os.path.dirname(os.path.abspath(distmerge.__file__))}")
    except Exception as e:  # noqa: BLE001
        facts.append(f"distmerge not importable ({type(e).__name__}: {e})")
        missing.append("distmerge")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    free = shutil.disk_usage(a.workdir if os.path.isdir(a.workdir) else REPO).free
    facts.append(f"{cpus} CPUs, {free / GB:.0f} GB free disk; merge device {a.device}")
    if missing:
        return _line("FAIL", f"missing {', '.join(missing)}; found: " + "; ".join(facts))
    return _line("PASS", "; ".join(facts))


# --------------------------------------------------------------------------- pytest


def pytest_counts(text: str) -> dict[str, int]:
    """The counts of pytest's final summary line (``2 passed, 1 skipped, 641 deselected in 3.1s``).

    >>> pytest_counts("....\\n2 passed, 641 deselected in 13.07s\\n")
    {'passed': 2, 'deselected': 641}
    >>> pytest_counts("= 1 failed, 1 passed, 2 errors in 1.00s =")
    {'failed': 1, 'passed': 1, 'errors': 2}
    """
    found: dict[str, int] = {}
    for ln in reversed(text.strip().splitlines()):
        pairs = re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed|warnings?)\b", ln)
        if pairs and re.search(r"\bin [\d.]+s\b", ln):
            for n, what in pairs:
                found["errors" if what.startswith("error") else what] = int(n)
            return found
    return found


def cmd_pytest_verdict(a: argparse.Namespace) -> int:
    """Modules that fail to collect (a test dependency such as hypothesis missing on this
    machine) hold no gpu test today; they are named, and fail the step only if nothing passed."""
    text = open(a.log, errors="replace").read() if os.path.exists(a.log) else ""
    c = pytest_counts(text)
    secs = re.findall(r"\bin ([\d.]+)s\b", text)
    figs = ", ".join(f"{v} {k}" for k, v in c.items() if k != "deselected") or "no summary line"
    figs += f" in {secs[-1]} s" if secs else ""
    missing = sorted(set(re.findall(r"No module named '([\w.]+)'", text)))
    if c.get("errors"):
        figs += f" ({c['errors']} not collected" + (f": no {', '.join(missing)}" if missing else "") + ")"
    figs += f" (rc {a.rc}; log {a.log})"
    if c.get("failed"):
        return _line("FAIL", figs)
    if c.get("passed"):
        return _line("PASS" if a.rc == 0 or c.get("errors") else "FAIL", figs)
    if c.get("skipped") and not c.get("errors"):  # every gpu test skipped: no CUDA here
        return _line("SKIP" if a.device != "cuda" else "FAIL", figs + ": every gpu test skipped (no CUDA)")
    return _line("FAIL", figs)


# --------------------------------------------------------------------------- merge


def _distmerge_argv() -> list[str]:
    return [sys.executable, "-m", "distmerge"]


def _timed(argv: list[str], log: str, extra_env: dict[str, str] | None = None) -> tuple[int, float, float, float]:
    """(rc, command start, exit, wall) of ``argv`` with its output in ``log``."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(extra_env or {})
    with open(log, "a") as out:
        out.write("$ " + " ".join(argv) + "\n")
        out.flush()
        t0, p0 = time.time(), time.perf_counter()
        rc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, check=False).returncode
        return rc, t0, time.time(), time.perf_counter() - p0


def _timeline(report: str, start: float, end: float) -> dict:
    sys.path.insert(0, HERE)
    from bench import timeline  # noqa: PLC0415 - bench.py is a script beside this one

    with open(report) as f:
        return timeline(json.load(f), start, end)


def _phase_text(tl: dict) -> str:
    f = lambda v, spec=".2f": "n/a" if v is None else format(v, spec)  # noqa: E731
    return (
        f"first unit {f(tl.get('first_unit_s'))} s, units {f(tl.get('units_s'))} s at "
        f"{f(tl.get('units_gb_s'), '.2f')} GB/s, tail {f(tl.get('tail_s'))} s"
    )


def cmd_merge(a: argparse.Namespace) -> int:
    shutil.rmtree(a.out, ignore_errors=True)
    for p in (a.report, a.report + ".tmp"):
        if os.path.exists(p):
            os.remove(p)
    argv = [*_distmerge_argv(), "merge", "--base", a.base, "--lora", a.lora, "--output", a.out]
    argv += ["--device", a.device, "-q", "--report", a.report]
    # every unit in a Ray task on the device (no driver-thread units while Ray starts)
    rc, t0, t1, wall = _timed(argv, a.log, {"DISTMERGE_INLINE_UNITS": "0"} if a.no_inline else None)
    if rc != 0 or not os.path.exists(a.report):
        tail = open(a.log, errors="replace").read().strip().splitlines()[-1:] or [""]
        return _line("FAIL", f"rc {rc} after {wall:.1f} s: {tail[0][:300]} (log {a.log})")
    with open(a.report) as f:
        rep = json.load(f)
    units = rep.get("units", [])
    on: dict[str, int] = {}
    for u in units:
        where = f"the driver ({u.get('device', '?')})" if u.get("node_id") == "driver" else u.get("device", "?")
        on[where] = on.get(where, 0) + 1
    figs = (
        f"wall {wall:.2f} s, {rep.get('total_bytes', 0) / GB:.2f} GB, {len(units)} units on "
        + (", ".join(f"{k}: {v}" for k, v in sorted(on.items())) if len(on) > 1 else "".join(on) or "?")
        + f", {rep.get('pairs_merged')} pairs; "
        + _phase_text(_timeline(a.report, t0, t1))
    )
    elsewhere = [k for k in on if k != a.device and not k.startswith("the driver")]
    if elsewhere or not (on.get(a.device) or (a.device == "cpu" and on)):
        return _line("FAIL", figs + f": expected the units on {a.device}")
    return _line("PASS", figs)


# --------------------------------------------------------------------------- compare


def _tensor_files(out: str) -> dict[str, str]:
    """key -> file of a merge output (a folder with an index, a folder with one file, or a file)."""
    if os.path.isfile(out):
        files = [out]
    else:
        idx = [f for f in os.listdir(out) if f.endswith(".safetensors.index.json")]
        if idx:
            with open(os.path.join(out, idx[0])) as f:
                wmap = json.load(f)["weight_map"]
            return {k: os.path.join(out, v) for k, v in wmap.items()}
        files = sorted(os.path.join(out, f) for f in os.listdir(out) if f.endswith(".safetensors"))
    from safetensors import safe_open

    keys: dict[str, str] = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            keys.update(dict.fromkeys(f.keys(), path))
    return keys


_INT = {8: "int64", 4: "int32", 2: "int16", 1: "int8"}


def ulp_distance(a, b):  # type: ignore[no-untyped-def]
    """Elementwise ulp distance of two float tensors of one dtype (the monotonic integer line).

    >>> import torch
    >>> x = torch.tensor([1.0, -0.0, 2.0], dtype=torch.bfloat16)
    >>> ulp_distance(x, torch.tensor([1.0078125, 0.0, 2.0], dtype=torch.bfloat16)).tolist()
    [1, 0, 0]
    """
    import torch

    def ordered(t):  # type: ignore[no-untyped-def]
        i = t.contiguous().view(getattr(torch, _INT[t.element_size()])).to(torch.int64)
        return torch.where(i >= 0, i, -(1 << (8 * t.element_size() - 1)) - i)

    return (ordered(a) - ordered(b)).abs()


def compare(a_dir: str, b_dir: str) -> tuple[str, str]:
    """(status, figures) of output ``a_dir`` against ``b_dir``."""
    import torch
    from safetensors import safe_open

    fa, fb = _tensor_files(a_dir), _tensor_files(b_dir)
    if set(fa) != set(fb):
        diff = sorted(set(fa) ^ set(fb))
        return "FAIL", f"key sets differ: {len(diff)} keys only on one side, e.g. {diff[:3]}"
    n_values = n_diff = beyond = allowed = 0
    tensors_diff, worst, worst_key, nbytes, bad = 0, 0, "", 0, []
    handles: dict[str, object] = {}
    try:
        for path in {*fa.values(), *fb.values()}:
            handles[path] = safe_open(path, framework="pt")
        for k in sorted(fa):
            ta = handles[fa[k]].get_tensor(k)  # type: ignore[attr-defined]
            tb = handles[fb[k]].get_tensor(k)  # type: ignore[attr-defined]
            if ta.dtype != tb.dtype or ta.shape != tb.shape:
                bad.append(f"{k}: {ta.dtype}{tuple(ta.shape)} vs {tb.dtype}{tuple(tb.shape)}")
                continue
            n_values += ta.numel()
            nbytes += ta.numel() * ta.element_size()
            ia = ta.reshape(-1).view(torch.uint8) if ta.element_size() == 1 else None
            if ia is not None:
                mask = ia != tb.reshape(-1).view(torch.uint8)
            else:
                it = getattr(torch, _INT[ta.element_size()])
                mask = ta.reshape(-1).view(it) != tb.reshape(-1).view(it)
            d = int(mask.sum())
            if not d:
                continue
            tensors_diff += 1
            n_diff += d
            if not ta.is_floating_point() or ta.element_size() == 1:  # ints, fp8: exact or wrong
                bad.append(f"{k}: {d} values differ")
                continue
            xa, xb = ta.reshape(-1)[mask], tb.reshape(-1)[mask]
            u = ulp_distance(xa, xb)
            m = int(u.max())
            if m > worst:
                worst, worst_key = m, k
            far = u > 1
            if far.any():
                scale = tb.float().abs().max().item()
                near = (xa[far].double() - xb[far].double()).abs() <= 1e-6 * scale
                allowed += int(near.sum())
                beyond += int((~near).sum())
    finally:
        handles.clear()
    share = 1 - n_diff / n_values if n_values else 1.0
    figs = f"{len(fa)} tensors, {nbytes / GB:.2f} GB, {n_values:,} values"
    if bad:
        return "FAIL", f"{figs}; {len(bad)} tensors wrong, e.g. {bad[0]}"
    if not n_diff:
        return "PASS", f"bit-identical: {figs}, max 0 ulp"
    figs += (
        f"; {tensors_diff} tensors differ in {n_diff:,} values ({100 * (1 - share):.4f} %), "
        f"max {worst} ulp ({worst_key})"
    )
    if allowed:
        figs += f", {allowed} beyond 1 ulp within the cancellation allowance"
    if beyond or share < 0.999:
        why = f"{beyond} values beyond 1 ulp" if beyond else f"only {100 * share:.3f} % bit-identical (< 99.9 %)"
        return "FAIL", f"{figs}: {why}"
    return "PASS", f"within 1 ulp: {figs}"


def cmd_compare(a: argparse.Namespace) -> int:
    for d in (a.a, a.b):
        if not os.path.exists(d):
            return _line("FAIL", f"no output {d} (its merge step failed?)")
    return _line(*compare(a.a, a.b))


# --------------------------------------------------------------------------- verify, timing


def cmd_verify_verdict(a: argparse.Namespace) -> int:
    text = open(a.log, errors="replace").read() if os.path.exists(a.log) else ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("verify:")]
    msg = lines[-1] if lines else (text.strip().splitlines()[-1:] or ["no output"])[0]
    msg = msg[:400] + (" …" if len(msg) > 400 else "")
    ok = a.rc == 0 and bool(lines) and "OK" in lines[-1].split("—")[0]
    return _line("PASS" if ok else "FAIL", f"{msg} (rc {a.rc})")


def cmd_bench_verdict(a: argparse.Namespace) -> int:
    if not os.path.exists(a.json):
        return _line("FAIL", f"bench wrote no {a.json} (rc {a.rc})")
    with open(a.json) as f:
        doc = json.load(f)
    s, r, tl = doc.get("summary", {}), doc.get("ratios", {}), doc.get("timeline", {})
    cp, dm = s.get("cp", {}), s.get("distmerge", {})
    if not cp.get("runs_ok") or not dm.get("runs_ok"):
        return _line("FAIL", f"cp ok {cp.get('runs_ok', 0)}, distmerge ok {dm.get('runs_ok', 0)} (rc {a.rc})")
    f = lambda v, spec=".2f": "n/a" if v is None else format(v, spec)  # noqa: E731
    med = tl.get("median") or {}
    figs = (
        f"{doc.get('inputs', {}).get('base_gb')} GB, {dm['runs_ok']} round(s): "
        f"cp -r && sync {cp['wall_s_median']:.2f} s "
        f"({f(r.get('cp_gb_s'))} GB/s), distmerge {dm['wall_s_median']:.2f} s = "
        f"{f(r.get('distmerge_over_cp_time'))}x cp; first unit {f(med.get('to_first_unit_s'))} s, units "
        f"{f(med.get('units_s'))} s at {f(med.get('units_gb_s'))} GB/s = "
        f"{f(med.get('units_over_cp_gb_s'), '.0%')} of cp, tail {f(med.get('tail_s'))} s; "
        f"peak RSS {dm['peak_rss_gb_median']:.2f} GB"
    )
    return _line("PASS" if a.rc == 0 else "FAIL", figs)


def cmd_plain_timing(a: argparse.Namespace) -> int:
    """cp -r && sync, then distmerge, one round each, timed here (no psutil: no RSS)."""
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(a.base) for f in fs)
    dest_cp, dest_dm = os.path.join(a.work, "time-cp"), os.path.join(a.work, "time-distmerge")
    report = os.path.join(os.path.dirname(os.path.abspath(a.log)), "timing-report.json")
    shutil.rmtree(dest_cp, ignore_errors=True)
    subprocess.run(["sync"], check=False)
    rc_cp, _, _, cp_s = _timed(["sh", "-c", 'cp -r -- "$1" "$2" && sync', "cp", a.base, dest_cp], a.log)
    shutil.rmtree(dest_cp, ignore_errors=True)
    shutil.rmtree(dest_dm, ignore_errors=True)
    subprocess.run(["sync"], check=False)
    argv = [*_distmerge_argv(), "merge", "--base", a.base, "--lora", a.lora, "--output", dest_dm]
    rc_dm, t0, t1, dm_s = _timed([*argv, "--device", a.device, "-q", "--report", report], a.log)
    shutil.rmtree(dest_dm, ignore_errors=True)
    if rc_cp or rc_dm:
        return _line("FAIL", f"cp rc {rc_cp}, distmerge rc {rc_dm} (log {a.log})")
    tl = _timeline(report, t0, t1)
    cp_gb_s = size / GB / cp_s
    units = tl.get("units_gb_s")
    share = f"{units / cp_gb_s:.0%}" if units else "n/a"
    return _line(
        "PASS",
        f"{size / GB:.2f} GB, 1 round, plain timing (no RSS): cp -r && sync {cp_s:.2f} s ({cp_gb_s:.2f} GB/s), "
        f"distmerge {dm_s:.2f} s = {dm_s / cp_s:.2f}x cp; " + _phase_text(tl) + f"; units = {share} of cp",
    )


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("env")
    e.add_argument("--device", default="cuda")
    e.add_argument("--workdir", default=REPO)
    t = sub.add_parser("pytest-verdict")
    t.add_argument("log")
    t.add_argument("rc", type=int)
    t.add_argument("--device", default="cuda")
    m = sub.add_parser("merge")
    for x in ("base", "lora", "out"):
        m.add_argument(x)
    m.add_argument("--device", default="cuda")
    m.add_argument("--report", required=True)
    m.add_argument("--log", required=True)
    m.add_argument("--no-inline", action="store_true", help="DISTMERGE_INLINE_UNITS=0: every unit in a Ray task")
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    v = sub.add_parser("verify-verdict")
    v.add_argument("log")
    v.add_argument("rc", type=int)
    b = sub.add_parser("bench-verdict")
    b.add_argument("json")
    b.add_argument("rc", type=int)
    pt = sub.add_parser("plain-timing")
    for x in ("base", "lora", "work"):
        pt.add_argument(x)
    pt.add_argument("--device", default="cuda")
    pt.add_argument("--log", required=True)
    a = p.parse_args(argv)
    run = {
        "env": cmd_env,
        "pytest-verdict": cmd_pytest_verdict,
        "merge": cmd_merge,
        "compare": cmd_compare,
        "verify-verdict": cmd_verify_verdict,
        "bench-verdict": cmd_bench_verdict,
        "plain-timing": cmd_plain_timing,
    }[a.cmd]
    try:
        return run(a)
    except Exception as e:  # noqa: BLE001 - one line, whatever broke
        return _line("FAIL", f"{a.cmd}: {type(e).__name__}: {e}")


if __name__ == "__main__":
    sys.exit(main())
