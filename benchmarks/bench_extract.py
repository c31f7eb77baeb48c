#!/usr/bin/env python
"""Benchmark ``distmerge extract`` against the I/O floor and a one-process extraction done the peers' way.

What it does:

1. Generates once (cached in ``--workdir``) a Wan2.2-A14B-shaped pair at full width
   (``WanConfig(dim=5120, ffn=13824, blocks=--blocks, text_dim=4096)``, ``--dtype`` bf16, ``--shards``
   shards each): the base from ``distmerge.app.synth``, and a "fine-tune" of it, written tensor by
   tensor (so RAM stays small), whose every matrix differs by a full-rank delta with a power-law
   spectrum (``σᵢ ∝ i^-alpha`` over ``--delta-rank`` directions, about 5% of the weight's norm) and
   every other tensor by small noise. 8 blocks in bf16 are ~6.1 GB per model.
2. For ``--repeats`` rounds, runs each method once, interleaved, as a subprocess measured with
   ``benchmarks/bench.py``'s ``measure`` (peak RSS summed over the whole process tree, Ray's GCS,
   raylet and workers included; wall time including a trailing ``sync``):

   * ``cp``        — ``cp -r BASE && cp -r TUNED && sync`` (the I/O floor: both models read, written once);
   * ``distmerge`` — ``distmerge extract --base BASE --tuned TUNED --output OUT --rank R -q``
     (``python -m distmerge`` when the console script has no ``extract`` yet);
   * ``peer``      — this script's ``_peer`` mode: what kohya's ``extract_lora_from_models.py`` and
     mergekit's ``mergekit-extract-lora`` do, in one process: load both models whole, then
     ``torch.linalg.svd`` of every ΔW in float32, factors ``U√S``/``√S·Vᴴ`` in bf16, one ``save_file``.
     The exact SVD of a 5120² matrix takes about a minute on a 2-core machine, so an 8-block run
     takes over an hour; ``--peer-max-svds N`` times only the first N SVDs of each matrix shape and
     extrapolates the rest (reported as ``svd_seconds_extrapolated``, the measured wall as is).

3. Prints medians per method, distmerge / cp and peer / distmerge ratios (time, RSS), the retained
   energy both got (the randomized SVD against the exact one), and machine facts; ``--json FILE``
   gets all of it plus every run.

Full run (the issue's target: 2 × 6 GB bf16, rank 64; memory ≤ 2.5 GB, wall ≤ 2 × cp):
    .venv/bin/python benchmarks/bench_extract.py --blocks 8 --rank 64 --repeats 1 \\
        --workdir bench-extract --json bench-extract/results.json

Smoke test (tiny, hidden width overrides):
    .venv/bin/python benchmarks/bench_extract.py --dim 128 --ffn 256 --text-dim 64 --blocks 1 --rank 8 \\
        --repeats 1 --workdir /tmp/bench-extract-smoke --json /tmp/bench-extract-smoke/results.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import statistics
import sys
import time
from dataclasses import asdict

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
METHODS = ("cp", "distmerge", "peer")
GB = 1e9


# --------------------------------------------------------------------------- inputs


def _tag(a: argparse.Namespace) -> str:
    return f"d{a.dim}-f{a.ffn}-b{a.blocks}-t{a.text_dim}-{a.dtype}-s{a.shards}"


def _delta(key: str, shape: tuple[int, ...], w, a: argparse.Namespace):
    """The fine-tune's change of one tensor (float32): power-law full-rank on matrices, noise elsewhere."""
    import torch

    g = torch.Generator().manual_seed(sum(map(ord, key)) * 7919 + len(key))
    if len(shape) == 2:
        m, n = shape
        k = min(a.delta_rank, m, n)
        s = torch.arange(1, k + 1, dtype=torch.float32) ** -a.alpha
        u = torch.randn(m, k, generator=g) / math.sqrt(m)
        v = torch.randn(k, n, generator=g) / math.sqrt(n)
        d = (u * s) @ v
        return d * (0.05 * float(w.float().norm()) / max(float(d.norm()), 1e-30))
    return torch.randn(shape, generator=g) * 0.01 * max(float(w.float().std()) if w.numel() > 1 else 0.02, 1e-3)


def _write_tuned(base: str, tuned: str, a: argparse.Namespace) -> None:
    """Every shard of ``base`` again, tensor by tensor, with the fine-tune's deltas added."""
    from safetensors import safe_open

    from distmerge.inputs.checkpoint import open_base
    from distmerge.inputs.torch_dtypes import to_torch
    from distmerge.tasks.writer import write_safetensors

    ck = open_base(base)
    os.makedirs(tuned, exist_ok=True)
    for h in ck.headers:
        specs = [(k, t.dtype, t.shape) for k, t in sorted(h.tensors.items(), key=lambda kv: kv[1].offset)]

        def gen(path=h.path, specs=specs):
            with safe_open(path, framework="pt") as f:
                for k, code, shape in specs:
                    w = f.get_tensor(k)
                    yield k, (w.float() + _delta(k, shape, w, a)).to(to_torch(code))

        write_safetensors(os.path.join(tuned, os.path.basename(h.path)), gen(), specs=specs)
    for name in os.listdir(base):
        if not name.endswith(".safetensors"):
            shutil.copy(os.path.join(base, name), os.path.join(tuned, name))


def ensure_pair(a: argparse.Namespace) -> tuple[str, str]:
    """Generate (or reuse from ``a.workdir``) the base folder and its fine-tune."""
    from bench import wan_config  # the same generated shapes as the merge benchmark

    from distmerge.app.synth import write_wan_base

    cfg = wan_config(a)
    base, tuned = (os.path.join(a.workdir, f"{w}-{_tag(a)}") for w in ("base", f"tuned-a{a.alpha}-k{a.delta_rank}"))
    for path, make in (
        (base, lambda: write_wan_base(base, cfg, num_shards=a.shards)),
        (tuned, lambda: _write_tuned(base, tuned, a)),
    ):
        marker = os.path.join(a.workdir, f".{os.path.basename(path)}.done")  # outside: cp copies the folder
        if not os.path.exists(marker):
            shutil.rmtree(path, ignore_errors=True)
            print(f"bench: generating {path} ...", flush=True)
            t = time.perf_counter()
            make()
            with open(marker, "w") as f:
                json.dump(asdict(cfg), f)
            print(f"bench: generated in {time.perf_counter() - t:.1f}s", flush=True)
    return base, tuned


def _du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


# --------------------------------------------------------------------------- the peers' way


def peer_extract(base: str, tuned: str, output: str, rank: int, report: str, max_svds: int | None) -> None:
    """Load both models whole, ``torch.linalg.svd`` every ΔW, save the LoRA in one go."""
    import torch
    from safetensors.torch import load_file, save_file

    from distmerge.inputs.checkpoint import open_base

    def load(path: str) -> dict:
        out: dict = {}
        for f in open_base(path).files:
            out.update(load_file(f))
        return out

    b, t = load(base), load(tuned)
    lora, timed, energies = {}, {}, []
    skipped: list[tuple[int, ...]] = []
    for k in b:
        d = t[k].float() - b[k].float()
        if not bool(d.any()):
            continue
        module, _, param = k.rpartition(".")
        if d.dim() != 2:
            lora[f"diffusion_model.{module}.{ {'weight': 'diff', 'bias': 'diff_b'}.get(param, 'diff_m') }"] = (
                d.bfloat16()
            )
            continue
        if max_svds is not None and len(timed.get(d.shape, [])) >= max_svds:
            skipped.append(tuple(d.shape))
            continue
        t0 = time.perf_counter()
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        r = min(rank, len(s))
        root = s[:r].sqrt()
        lora[f"diffusion_model.{module}.lora_up.weight"] = (u[:, :r] * root).bfloat16().contiguous()
        lora[f"diffusion_model.{module}.lora_down.weight"] = (root[:, None] * vh[:r]).bfloat16().contiguous()
        timed.setdefault(tuple(d.shape), []).append(time.perf_counter() - t0)
        energies.append((float((s[:r].double() ** 2).sum()), float((s.double() ** 2).sum())))
    save_file(lora, output)
    measured = sum(sum(v) for v in timed.values())
    extra = sum(statistics.mean(timed[sh]) for sh in skipped)
    with open(report, "w") as f:
        json.dump(
            {
                "lora_pairs": len(energies) + len(skipped),
                "svds_timed": len(energies),
                "svds_skipped": len(skipped),
                "svd_seconds_measured": measured,
                "svd_seconds_extrapolated": measured + extra,
                "retained_energy": sum(e for e, _ in energies) / max(sum(tot for _, tot in energies), 1e-300),
            },
            f,
        )


# --------------------------------------------------------------------------- methods


def _distmerge_argv(py: str) -> list[str]:
    """The console script when it has ``extract``; else this script's ``_distmerge`` mode."""
    try:
        from distmerge.app.flags import build_parser

        parser = build_parser()
        sub = next(x for x in parser._actions if isinstance(x, argparse._SubParsersAction))
        if "extract" in sub.choices:
            return [py, "-m", "distmerge", "extract"]
    except Exception:  # an older layout of the CLI: fall back
        pass
    return [py, os.path.abspath(__file__), "_distmerge"]


def command(method: str, base: str, tuned: str, dest: str, a: argparse.Namespace, log_dir: str, rnd: int):
    """(argv, env, ray temp dir, token) of one method run writing into ``dest``."""
    py = sys.executable
    os.makedirs(dest, exist_ok=True)
    if method == "cp":
        return (
            ["sh", "-c", 'cp -r -- "$1" "$3/b" && cp -r -- "$2" "$3/t" && sync', "cp", base, tuned, dest],
            None,
            None,
            None,
        )
    if method == "peer":
        argv = [
            py,
            os.path.abspath(__file__),
            "_peer",
            base,
            tuned,
            os.path.join(dest, "lora.safetensors"),
            str(a.rank),
            os.path.join(log_dir, f"peer-r{rnd}-report.json"),
        ]
        return argv + ([str(a.peer_max_svds)] if a.peer_max_svds else []), None, None, None
    argv = _distmerge_argv(py) + [
        "--base",
        base,
        "--tuned",
        tuned,
        "--output",
        os.path.join(dest, "lora.safetensors"),
        "--rank",
        str(a.rank),
        "-q",
        "--report",
        os.path.join(log_dir, f"distmerge-r{rnd}-report.json"),
        *shlex.split(a.distmerge_args),
    ]
    from bench import distmerge_env  # the RSS sampler finds the run's Ray processes by these

    return (argv, *distmerge_env())


def _quality(method: str, log_dir: str, rnd: int) -> dict:
    path = os.path.join(log_dir, f"{method}-r{rnd}-report.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        j = json.load(f)
    if method == "peer":
        return j
    return {
        "lora_pairs": j.get("lora_pairs"),
        "retained_energy": j.get("retained_energy"),
        "predicted_error": j.get("predicted_error"),
        "internal_seconds": j.get("seconds"),
        "ray": j.get("ray"),
        "phases": j.get("phases"),
    }


def run_all(base: str, tuned: str, a: argparse.Namespace, methods: list[str], bench) -> list:
    log_dir = os.path.join(a.workdir, "logs")
    os.makedirs(log_dir, exist_ok=True)
    runs = []
    for rnd in range(1, a.repeats + 1):
        for m in methods:
            dest = os.path.join(a.workdir, f"out-{m}")
            shutil.rmtree(dest, ignore_errors=True)
            bench.sync()
            dropped = bench.drop_caches() if a.drop_caches else False
            argv, env, ray_tmp, token = command(m, base, tuned, dest, a, log_dir, rnd)
            print(f"bench: round {rnd}/{a.repeats} {m:<9} ...", end=" ", flush=True)
            r = bench.measure(
                m,
                rnd,
                argv,
                os.path.join(log_dir, f"{m}-r{rnd}.log"),
                env=env,
                ray_tmp=ray_tmp,
                token=token,
                caches_dropped=dropped,
            )
            r.extra = _quality(m, log_dir, rnd)
            if ray_tmp:
                shutil.rmtree(ray_tmp, ignore_errors=True)
            runs.append(r)
            print(
                f"rc={r.rc} wall {r.wall_s:.2f}s peak RSS {r.peak_rss_bytes / GB:.2f} GB ({r.peak_procs} procs)",
                flush=True,
            )
            if r.rc != 0:
                with open(r.log) as f:
                    print(f"bench: {m} failed; {r.log}:\n{f.read()[-2000:]}", file=sys.stderr, flush=True)
            shutil.rmtree(dest, ignore_errors=True)
    return runs


# --------------------------------------------------------------------------- report


def summarize(runs: list, methods: list[str]) -> tuple[dict, dict, dict]:
    summary, quality = {}, {}
    for m in methods:
        ok = [r for r in runs if r.method == m and r.rc == 0]
        summary[m] = {"runs_ok": len(ok), "runs_failed": sum(r.method == m and r.rc != 0 for r in runs)}
        if ok:
            walls = [r.wall_s for r in ok]
            summary[m].update(
                wall_s_median=round(statistics.median(walls), 3),
                wall_s_min=min(walls),
                wall_s_max=max(walls),
                peak_rss_gb_median=round(statistics.median(r.peak_rss_bytes for r in ok) / GB, 3),
            )
            quality[m] = ok[-1].extra
    if "peer" in quality and quality["peer"].get("svds_skipped"):  # the wall the whole peer run would take
        q = quality["peer"]
        summary["peer"]["wall_s_extrapolated"] = round(
            summary["peer"]["wall_s_median"] + q["svd_seconds_extrapolated"] - q["svd_seconds_measured"], 3
        )

    def ratio(x: str, y: str, key: str, key_x: str | None = None) -> float | None:
        vx, vy = summary.get(x, {}).get(key_x or key), summary.get(y, {}).get(key)
        return round(vx / vy, 3) if vx and vy else None

    ratios = {
        "distmerge_over_cp_time": ratio("distmerge", "cp", "wall_s_median"),
        "peer_over_distmerge_time": ratio(
            "peer",
            "distmerge",
            "wall_s_median",
            "wall_s_extrapolated" if "wall_s_extrapolated" in summary.get("peer", {}) else None,
        ),
        "peer_over_distmerge_rss": ratio("peer", "distmerge", "peak_rss_gb_median"),
    }
    return summary, ratios, quality


def print_report(summary: dict, ratios: dict, quality: dict, machine: dict, sizes: tuple[int, int], a) -> None:
    print(
        f"\nbase {sizes[0] / GB:.2f} GB + tuned {sizes[1] / GB:.2f} GB ({a.blocks} blocks, dim {a.dim}, {a.dtype}); "
        f"rank {a.rank}; repeats {a.repeats}; wall incl. trailing sync"
    )
    print(f"{'method':<10} {'wall s (med)':>12} {'peak RSS GB':>12} {'retained energy':>16}")
    for m, s in summary.items():
        if not s.get("runs_ok"):
            print(f"{m:<10} {'failed':>12}")
            continue
        wall = f"{s['wall_s_median']:.2f}" + (
            f" (~{s['wall_s_extrapolated']:.0f})" if "wall_s_extrapolated" in s else ""
        )
        e = quality.get(m, {}).get("retained_energy")
        print(f"{m:<10} {wall:>12} {s['peak_rss_gb_median']:>12.2f} {'' if e is None else f'{100 * e:.3f}%':>16}")
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}x"  # noqa: E731
    print(f"\ndistmerge / cp    (time): {fmt(ratios['distmerge_over_cp_time'])}   (target <= 2x)")
    print(f"peer / distmerge  (time): {fmt(ratios['peer_over_distmerge_time'])}")
    print(f"peer / distmerge  (RSS):  {fmt(ratios['peer_over_distmerge_rss'])}")
    print(
        f"machine: {machine.get('nproc')} CPUs ({machine.get('cpu_model')}), {machine.get('ram_total_gb')} GB RAM; "
        f"torch {machine.get('torch')}, ray {machine.get('ray')}"
    )


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark distmerge extract vs cp -r and a one-process exact-SVD extraction."
    )
    p.add_argument("--workdir", default="bench-extract", help="cache + scratch folder (default ./bench-extract)")
    p.add_argument("--blocks", type=int, default=8, help="Wan blocks (default 8 = ~6.1 GB per model in bf16)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--alpha", type=float, default=0.6, help="power-law exponent of each delta's spectrum (default 0.6)")
    p.add_argument("--delta-rank", type=int, default=256, help="directions in each matrix delta (default 256)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--methods", default=",".join(METHODS), help="comma list of cp,distmerge,peer")
    p.add_argument(
        "--peer-max-svds",
        type=int,
        default=None,
        metavar="N",
        help="time only N exact SVDs per matrix shape in the peer run and extrapolate the rest",
    )
    p.add_argument("--distmerge-args", default="", help="extra distmerge extract args, one string")
    p.add_argument("--drop-caches", action="store_true", help="drop the page cache before each command (root)")
    p.add_argument("--json", default=None, metavar="FILE")
    p.add_argument("--dim", type=int, default=5120, help=argparse.SUPPRESS)
    p.add_argument("--ffn", type=int, default=13824, help=argparse.SUPPRESS)
    p.add_argument("--text-dim", type=int, default=4096, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.method_list = [m.strip() for m in a.methods.split(",") if m.strip()]
    bad = [m for m in a.method_list if m not in METHODS]
    if bad:
        p.error(f"unknown method(s) {bad}; choose from {','.join(METHODS)}")
    a.workdir = os.path.abspath(a.workdir)
    return a


def _modes(argv: list[str]) -> int | None:
    """The subprocess modes: ``_peer BASE TUNED OUT RANK REPORT [MAX]`` and ``_distmerge ARGS…``."""
    if argv[:1] == ["_peer"]:
        base, tuned, out, rank, report, *rest = argv[1:]
        peer_extract(base, tuned, out, int(rank), report, int(rest[0]) if rest else None)
        return 0
    if argv[:1] == ["_distmerge"]:
        from distmerge.app.extract import add_extract_parser, cmd_extract

        parser = argparse.ArgumentParser(prog="distmerge")
        sub = parser.add_subparsers(dest="command")
        common = argparse.ArgumentParser(add_help=False)
        common.add_argument("-q", "--quiet", action="store_true")
        common.add_argument("-v", "--verbose", action="count", default=0)
        add_extract_parser(sub, common)
        return cmd_extract(parser.parse_args(["extract", *argv[1:]]), None)
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    sys.path.insert(0, REPO)
    mode = _modes(argv)
    if mode is not None:
        return mode
    a = parse_args(argv)
    sys.path.insert(0, HERE)
    import bench  # the process-tree RSS sampler, sync, machine facts

    os.makedirs(a.workdir, exist_ok=True)
    base, tuned = ensure_pair(a)
    machine = bench.machine_facts(a.workdir)
    runs = run_all(base, tuned, a, a.method_list, bench)
    summary, ratios, quality = summarize(runs, a.method_list)
    sizes = (_du(base), _du(tuned))
    print_report(summary, ratios, quality, machine, sizes, a)
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        doc = {
            "argv": sys.argv,
            "inputs": {"base": base, "tuned": tuned, "base_bytes": sizes[0], "tuned_bytes": sizes[1]},
            "options": {k: v for k, v in vars(a).items()},
            "machine": machine,
            "summary": summary,
            "ratios": ratios,
            "quality": quality,
            "runs": [asdict(r) for r in runs],
        }
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=2, default=str)
        print(f"bench: wrote {a.json}")
    return 0 if all(r.rc == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
