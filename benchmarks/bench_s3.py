#!/usr/bin/env python
"""Benchmark distmerge's merge from and to object storage against the S3 server's own transfer speed.

The generated Wan base and ROLL LoRA (``bench.py --generate-only``, cached in ``--workdir``; default
``--blocks 4 --dtype bf16 --shards 2``, ~3.3 GB) are uploaded (not timed) to a SeaweedFS server on
loopback (``tests/s3server.py``'s ``S3Server``, its data in a scratch folder below ``--workdir``).
Then, for ``--repeats`` interleaved rounds, each method runs once as a subprocess whose wall (plus a
trailing ``sync``) and whole-process-tree peak RSS ``bench.measure`` records:

* ``upload``   — a reference: every base file ``upload_file``-d with boto3 (32 MiB parts,
  ``--concurrency`` at once) to a fresh prefix, deleted afterwards (not timed);
* ``download`` — the reference: every base object read with ranged GETs of 32 MiB (distmerge's
  ``CHUNK_BYTES``), ``--concurrency`` in flight (default ``READ_DEPTH`` x CPUs, what distmerge's
  tasks keep in flight), each written at its offset into a local file, fsynced;
* ``distmerge-s3``    — ``distmerge merge --base s3://B/base --lora s3://B/LORA --output DEST -q
  --report R``, the server's admin in the ``AWS_*`` variables, a fresh ``DISTMERGE_CACHE_DIR``;
* ``distmerge-s3-s3`` — the same with ``--output s3://B/out-s3-s3-rN`` (a fresh prefix each round),
  a fresh ``DISTMERGE_SCRATCH_DIR`` for the parts; afterwards (not timed) the output objects are
  downloaded for the comparison, then deleted;
* ``distmerge-local`` — the same merge from the local files to a local folder.

Requests are counted client side: the two bucket merges' ``PYTHONPATH`` starts with a
``sitecustomize`` (``s3_methods.SITECUSTOMIZE``) that, in every Python process of the run (driver
and Ray workers), hooks botocore's ``GetObject``, ``UploadPart`` and ``PutObject`` and appends
``pid, operation, status, key, bytes`` to a file (one ``O_APPEND`` write per request; GET: the
response's length, UploadPart / PutObject: the body's). The merges' outputs are compared with
distmerge-local's (not timed): every file's sha256, the index without its ``metadata.distmerge``
recipe, and not ``distmerge.json`` (both record where the inputs were).

Reported: medians (wall s, GB/s = base bytes / wall, peak tree RSS), paired ratios (within a round,
median over rounds) to ``upload``, ``download`` and ``distmerge-local``, GET bytes / base bytes,
uploaded bytes / output bytes (distmerge-s3-s3: every part and PUT body, against the objects' sizes),
a markdown table; ``--json FILE`` gets it all. The server's RSS is in no tree. The server, its data
and the scratch files are removed at the end (the base cache stays).

Example:
    .venv/bin/python benchmarks/bench_s3.py --blocks 4 --repeats 2 --json bench-out/s3.json
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import uuid
from dataclasses import asdict

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
METHODS = ("upload", "download", "distmerge-s3", "distmerge-s3-s3", "distmerge-local")
#: the methods that merge from the bucket (their requests counted, their output compared)
S3_MERGES = ("distmerge-s3", "distmerge-s3-s3")
READ_DEPTH = 3  #: reads a distmerge task keeps in flight (distmerge.plan.merge_plan.READ_DEPTH)
GB = 1e9


def _load(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up while the class is made
    spec.loader.exec_module(mod)
    return mod


bench = _load(os.path.join(HERE, "bench.py"), "_bench_s3_bench")
s3m = _load(os.path.join(HERE, "s3_methods.py"), "_bench_s3_methods")


# --------------------------------------------------------------------------- the benchmark


def generate(a: argparse.Namespace) -> dict:
    """``bench.py --generate-only``'s base, lora and base_bytes (generated once, cached); the options
    this script does not know (``--dtype``, ``--shards``, ``--rank``, the hidden widths) go to it."""
    argv = [sys.executable, os.path.join(HERE, "bench.py"), "--generate-only", "--workdir", a.workdir]
    argv += ["--blocks", str(a.blocks), *a.generate_args]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"bench_s3: bench.py --generate-only failed:\n{proc.stderr[-2000:]}")
    got = dict(ln.split("=", 1) for ln in proc.stdout.splitlines() if "=" in ln)
    return {"base": got["base"], "lora": got["lora"], "base_bytes": int(got["base_bytes"])}


def start_server(scratch: str, inp: dict):
    """A started SeaweedFS server with the base at ``s3://B/base/`` and the LoRA at ``s3://B/<name>``."""
    s3server = _load(os.path.join(REPO, "tests", "s3server.py"), "_bench_s3_server")
    server = s3server.S3Server(os.path.join(scratch, "server")).start()
    bucket = server.make_bucket("bench")
    print(f"bench_s3: SeaweedFS at {server.endpoint}; uploading the base ...", flush=True)
    server.upload_folder(inp["base"], f"s3://{bucket}/base")
    server.upload_file(inp["lora"], f"s3://{bucket}/{os.path.basename(inp['lora'])}")
    return server, bucket


def s3_env(server, scratch: str) -> dict[str, str]:
    """This environment without the caller's ``AWS_*`` (no profile, no ``~/.aws``), the server's admin."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "RAY_ADDRESS"}
    aws = os.path.join(scratch, "aws")
    env |= {"AWS_CONFIG_FILE": os.path.join(aws, "config"), "AWS_SHARED_CREDENTIALS_FILE": os.path.join(aws, "creds")}
    return env | server.env("admin")


def out_prefix(rnd: int) -> str:
    """The bucket prefix distmerge-s3-s3 writes to in round ``rnd``."""
    return f"out-s3-s3-r{rnd}"


def bucket_env(env: dict[str, str], ctx: dict, m: str, rnd: int) -> dict[str, str]:
    """A bucket merge's environment: the server's admin, the request hook first on ``PYTHONPATH``,
    a fresh ``DISTMERGE_CACHE_DIR`` (and for distmerge-s3-s3 a fresh ``DISTMERGE_SCRATCH_DIR``)."""
    scratch = ctx["scratch"]
    env = {k: v for k, v in env.items() if not k.startswith("AWS_")} | ctx["env"]
    env["DISTMERGE_CACHE_DIR"] = os.path.join(scratch, f"cache-{m}-r{rnd}")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.join(scratch, "hook"), env.get("PYTHONPATH")) if p)
    env[s3m.IO_LOG_ENV] = os.path.join(scratch, "logs", f"{m}-r{rnd}-requests.tsv")
    if m == "distmerge-s3-s3":
        env["DISTMERGE_SCRATCH_DIR"] = os.path.join(scratch, f"parts-r{rnd}")
        os.makedirs(env["DISTMERGE_SCRATCH_DIR"], exist_ok=True)
    return env


def command(m: str, ctx: dict, rnd: int) -> tuple[list[str], dict[str, str], str | None, str | None]:
    """(argv, env, Ray temp dir, token) of one run of method ``m`` in round ``rnd``."""
    a, inp, scratch, bucket = ctx["a"], ctx["inp"], ctx["scratch"], ctx["bucket"]
    dest = os.path.join(scratch, f"out-{m}")
    me, c = [sys.executable, os.path.join(HERE, "s3_methods.py")], str(a.concurrency)
    if m == "upload":
        return [*me, "upload", bucket, f"upload-r{rnd}", inp["base"], c], ctx["env"], None, None
    if m == "download":
        return [*me, "download", bucket, "base", dest, c], ctx["env"], None, None
    exe = os.path.join(os.path.dirname(sys.executable), "distmerge")
    argv = [exe] if os.path.exists(exe) else [sys.executable, "-m", "distmerge"]
    s3 = m in S3_MERGES
    base = f"s3://{bucket}/base" if s3 else inp["base"]
    lora = f"s3://{bucket}/{os.path.basename(inp['lora'])}" if s3 else inp["lora"]
    output = f"s3://{bucket}/{out_prefix(rnd)}" if m == "distmerge-s3-s3" else dest
    report = os.path.join(scratch, "logs", f"{m}-r{rnd}-report.json")
    argv += ["merge", "--base", base, "--lora", lora, "--output", output, "-q", "--report", report]
    env, ray_tmp, token = bench.distmerge_env()
    if s3:
        env = bucket_env(env, ctx, m, rnd)
    return [*argv, *a.distmerge_args.split()], env, ray_tmp, token


def output_digest(folder: str) -> dict[str, str]:
    """sha256 of every output file; the index without its ``metadata.distmerge`` recipe, and no
    ``distmerge.json`` (both record where the inputs were, so an s3:// merge's differ by design)."""
    out = {}
    for path, rel in s3m.files(folder):
        if rel == "distmerge.json":
            continue
        if rel.endswith(".index.json"):
            with open(path) as f:
                index = json.load(f)
            index.get("metadata", {}).pop("distmerge", None)
            out[rel] = hashlib.sha256(json.dumps(index, sort_keys=True).encode()).hexdigest()
        else:
            out[rel] = bench.sha256_of(path) or ""
    return out


def fetch_output(ctx: dict, rnd: int, r, dest: str, parts: str) -> None:
    """After a distmerge-s3-s3 run (not timed): uploads left open, the output objects downloaded to
    ``dest`` (their bytes), then deleted; files left in the scratch folder ``parts``, removed."""
    c, bucket, prefix = ctx["client"], ctx["bucket"], out_prefix(rnd)
    if r.rc == 0:
        r.extra["open_uploads"] = len(s3m.open_uploads(c, bucket, prefix))
        r.extra["output_bytes"] = s3m.fetch_prefix(c, bucket, prefix, dest)
    s3m.delete_prefix(c, bucket, prefix)
    r.extra["scratch_files_left"] = sum(len(names) for _, _, names in os.walk(parts))
    shutil.rmtree(parts, ignore_errors=True)


def count_requests(r, env: dict[str, str], ctx: dict) -> None:
    """A bucket merge's GETs (and for distmerge-s3-s3 its uploads, against the output's bytes)."""
    io = s3m.io_counts(env[s3m.IO_LOG_ENV], ctx["base_keys"], ctx["inp"]["base_bytes"])
    r.extra["gets"] = io["gets"]
    if r.method == "distmerge-s3-s3":
        puts, out = io["puts"], r.extra.get("output_bytes")
        puts["output_bytes"] = out
        puts["uploaded_over_output_bytes"] = round(puts["uploaded_bytes"] / out, 4) if out else None
        r.extra["puts"] = puts


def run_one(m: str, ctx: dict, rnd: int):
    """One measured run of ``m`` (its output removed before; digested and removed after)."""
    scratch, a = ctx["scratch"], ctx["a"]
    dest = os.path.join(scratch, f"out-{m}")
    shutil.rmtree(dest, ignore_errors=True)
    argv, env, ray_tmp, token = command(m, ctx, rnd)
    bench.sync()
    print(f"bench_s3: round {rnd}/{a.repeats} {m:<15} ...", end=" ", flush=True)
    log = os.path.join(scratch, "logs", f"{m}-r{rnd}.log")
    r = bench.measure(m, rnd, argv, log, env=env, ray_tmp=ray_tmp, token=token)
    r.extra["argv"] = argv
    if ray_tmp:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    if r.rc != 0:
        print(f"FAILED rc={r.rc}; log {log}:\n{open(log).read()[-3000:]}", file=sys.stderr, flush=True)
    if m == "distmerge-s3-s3":
        fetch_output(ctx, rnd, r, dest, env["DISTMERGE_SCRATCH_DIR"])
    if r.rc == 0 and m.startswith("distmerge"):
        r.extra["outputs"] = output_digest(dest)
        if a.keep_outputs:
            shutil.copytree(dest, os.path.join(a.keep_outputs, f"{m}-r{rnd}"))
    if m in S3_MERGES:
        count_requests(r, env, ctx)
        shutil.rmtree(env["DISTMERGE_CACHE_DIR"], ignore_errors=True)
    if m == "upload":
        s3m.delete_prefix(ctx["client"], ctx["bucket"], f"upload-r{rnd}")
    shutil.rmtree(dest, ignore_errors=True)
    bench.sync()
    print(f"rc={r.rc} wall {r.wall_s:.2f}s peak RSS {r.peak_rss_bytes / GB:.2f} GB", flush=True)
    return r


#: the methods every other method's wall is divided by, within each round
REFERENCES = ("upload", "download", "distmerge-local")


def ratio_key(m: str, ref: str) -> str:
    """``distmerge-s3``, ``download`` -> ``distmerge_s3_over_download_time``."""
    return f"{m.replace('-', '_')}_over_{ref.replace('-', '_')}_time"


#: the ratios printed by name: (numerator, denominator)
PAIRS = {
    ratio_key(x, y): (x, y)
    for x, y in (
        ("distmerge-s3", "download"),
        ("distmerge-s3", "distmerge-local"),
        ("distmerge-s3-s3", "upload"),
        ("distmerge-s3-s3", "download"),
        ("distmerge-s3-s3", "distmerge-s3"),
        ("distmerge-s3-s3", "distmerge-local"),
        ("upload", "download"),
    )
}


def _median(values) -> float | None:
    vs = [v for v in values if v is not None]
    return round(statistics.median(vs), 3) if vs else None


def _round_row(n: int, by: dict) -> dict:
    """One round's paired ratios (every method over each reference, and ``PAIRS``), whether each
    bucket merge's output matched distmerge-local's, and the request counts."""
    row: dict = {"round": n}
    pairs = {ratio_key(m, ref): (m, ref) for ref in REFERENCES for m in METHODS} | PAIRS
    for key, (x, y) in pairs.items():
        rx, ry = by.get((n, x)), by.get((n, y))
        row[key] = round(rx.wall_s / ry.wall_s, 3) if rx and ry and ry.wall_s else None
    local = by.get((n, "distmerge-local"))
    ran = {m: by[(n, m)] for m in S3_MERGES if (n, m) in by}
    row["outputs_identical"] = {m: local and r.extra["outputs"] == local.extra["outputs"] for m, r in ran.items()}
    row["gets"] = {m: r.extra.get("gets") for m, r in ran.items()}
    row["puts"] = ran["distmerge-s3-s3"].extra.get("puts") if "distmerge-s3-s3" in ran else None
    return row


def _ratios(per_round: list[dict]) -> dict:
    """The medians over rounds of the paired ratios and of the byte counts; whether outputs matched."""
    ratios: dict = {k: _median(r[k] for r in per_round) for k in per_round[0] if k.endswith("_time")}
    by_method = {}
    for m in S3_MERGES:  # rounds where the method or distmerge-local failed compare nothing
        same = [r["outputs_identical"].get(m) for r in per_round if r["outputs_identical"].get(m) is not None]
        by_method[m] = all(same) if same else None
    seen = set(by_method.values())
    ratios["outputs_identical"] = False if False in seen else None if None in seen else True
    ratios["outputs_identical_by_method"] = by_method
    gets = lambda m: [(r["gets"].get(m) or {}).get("base_get_over_base_bytes") for r in per_round]  # noqa: E731
    ratios["base_get_over_base_bytes"] = _median(gets("distmerge-s3"))
    ratios["s3_s3_base_get_over_base_bytes"] = _median(gets("distmerge-s3-s3"))
    ratios["uploaded_over_output_bytes"] = _median(
        (r["puts"] or {}).get("uploaded_over_output_bytes") for r in per_round
    )
    ratios["per_round"] = per_round
    return ratios


def summarize(runs: list, base_bytes: int) -> tuple[dict, dict]:
    """(per-method medians with paired ``over_<ref>_time``, ratios with request counts and whether
    the merges' outputs matched). Ratios are computed within a round, then the median over rounds."""
    by = {(r.round, r.method): r for r in runs if r.rc == 0}
    ratios = _ratios([_round_row(n, by) for n in sorted({r.round for r in runs})])
    summary = {}
    for m in METHODS:
        ok = [r for r in runs if r.method == m and r.rc == 0]
        med = _median(r.wall_s for r in ok)
        summary[m] = {
            "runs_ok": len(ok),
            "runs_failed": sum(r.method == m and r.rc != 0 for r in runs),
            "wall_s_median": med,
            "wall_s_all": [r.wall_s for r in ok],
            "throughput_gb_s": round(base_bytes / GB / med, 3) if med else None,
            "peak_rss_gb_median": _median(r.peak_rss_bytes / GB for r in ok),
            **{f"over_{ref.replace('-', '_')}_time": ratios[ratio_key(m, ref)] for ref in REFERENCES},
        }
    return summary, ratios


def markdown_table(summary: dict) -> str:
    """method | median wall s | GB/s (base bytes / median wall) | × upload | × download |
    × distmerge-local (paired: within a round, median over rounds) | peak tree RSS GB (median)."""
    cols = ["method", "median wall s", "GB/s", *(f"× {b}" for b in REFERENCES), "peak tree RSS GB"]
    lines = ["| " + " | ".join(cols) + " |", "|---" + "|---:" * (len(cols) - 1) + "|"]
    for m, s in summary.items():
        if not s["wall_s_median"]:
            lines.append(f"| {m} |" + " failed |" * (len(cols) - 1))
            continue
        x = [bench._f(s[f"over_{b.replace('-', '_')}_time"]) for b in REFERENCES]
        cells = [f"{s['wall_s_median']:.2f}", f"{s['throughput_gb_s']:.3f}", *x, f"{s['peak_rss_gb_median']:.2f}"]
        lines.append("| " + " | ".join([m, *cells]) + " |")
    return "\n".join(lines)


def _round_lines(r: dict) -> list[str]:
    """A round's request counts and output comparisons, one line each."""
    out = []
    for m, g in r["gets"].items():
        g = g or {}
        out.append(
            f"  round {r['round']} {m}: GETs {g.get('gets')} ({g.get('gets_base')} of the base, from "
            f"{g.get('processes')} processes); base GET bytes / base bytes {g.get('base_get_over_base_bytes')}; "
            f"other GET bytes {g.get('other_get_bytes')}; output identical {r['outputs_identical'].get(m)}"
        )
    if r["puts"]:
        p = r["puts"]
        out.append(
            f"  round {r['round']} distmerge-s3-s3: {p['parts']} UploadParts from {p['part_processes']} processes, "
            f"{p['puts']} PutObjects; uploaded {p['uploaded_bytes']} bytes / output {p['output_bytes']} bytes = "
            f"{p['uploaded_over_output_bytes']}"
        )
    return out


def print_report(summary: dict, ratios: dict, inp: dict, machine: dict) -> None:
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}x"  # noqa: E731
    print(f"\nbase {inp['base']} ({inp['base_bytes'] / GB:.2f} GB); LoRA {inp['lora']}")
    print("ratios, each within one round, median over rounds:")
    for key, (x, y) in PAIRS.items():
        print(f"  {x + ' / ' + y + ' (time):':<44}{fmt(ratios[key])}")
    up = ratios["uploaded_over_output_bytes"]
    print(f"  {'distmerge-s3-s3 uploaded / output bytes:':<44}{'n/a' if up is None else f'{up:.4f}'}")
    for r in ratios["per_round"]:
        print("\n".join(_round_lines(r)))
    print(
        f"machine: {machine['nproc']} CPUs ({machine['cpu_model']}), {machine['ram_total_gb']} GB RAM, "
        f"{machine['workdir_fs']}; ray {machine['ray']}, python {machine['python']}\n"
    )
    print("(GB/s = base bytes / median wall; × columns: paired ratios, within a round, median over rounds)")
    print(markdown_table(summary))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="distmerge from and to S3 (SeaweedFS on loopback) against the server's own speed",
        epilog="Other options (--dtype, --shards, --rank) go to bench.py --generate-only (default: bf16, 2 shards).",
    )
    p.add_argument("--workdir", default="bench-out", help="base cache + scratch (default ./bench-out)")
    p.add_argument("--blocks", type=int, default=4, help="Wan blocks (default 4 = ~3.3 GB in bf16)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds (default 2)")
    p.add_argument("--concurrency", type=int, default=None, help="transfers in flight (default 3 x CPUs)")
    p.add_argument("--distmerge-args", default="", help="extra distmerge merge args, one string")
    p.add_argument("--keep-outputs", default=None, metavar="DIR", help="copy every merge output here")
    p.add_argument("--json", default=None, metavar="FILE")
    a, a.generate_args = p.parse_known_args(argv)
    a.workdir = os.path.abspath(a.workdir)
    a.concurrency = a.concurrency or READ_DEPTH * len(os.sched_getaffinity(0))
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(sys.argv[1:] if argv is None else argv)
    os.makedirs(a.workdir, exist_ok=True)
    inp = generate(a)
    scratch = os.path.join(a.workdir, f"s3-scratch-{uuid.uuid4().hex[:8]}")
    for sub in ("logs", "hook"):
        os.makedirs(os.path.join(scratch, sub))
    with open(os.path.join(scratch, "hook", "sitecustomize.py"), "w") as f:
        f.write(s3m.SITECUSTOMIZE)
    server = None
    try:
        server, bucket = start_server(scratch, inp)
        keys = {f"base/{rel}" for _, rel in s3m.files(inp["base"])}
        ctx = {"a": a, "inp": inp, "scratch": scratch, "bucket": bucket, "client": server.client(), "base_keys": keys}
        ctx["env"] = s3_env(server, scratch)
        runs = [run_one(m, ctx, rnd) for rnd in range(1, a.repeats + 1) for m in METHODS]
        machine = bench.machine_facts(a.workdir)
        summary, ratios = summarize(runs, inp["base_bytes"])
        print_report(summary, ratios, inp, machine)
        if a.json:
            os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
            doc = {"argv": sys.argv, "inputs": inp, "options": vars(a), "machine": machine, "summary": summary}
            doc |= {"ratios": ratios, "runs": [asdict(r) for r in runs], "table_md": markdown_table(summary)}
            with open(a.json, "w") as f:
                json.dump(doc, f, indent=2)
            print(f"bench_s3: wrote {a.json}")
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    return 0 if all(r.rc == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
