#!/usr/bin/env python
"""Benchmark distmerge's merge from object storage against the S3 server's own transfer speed.

The generated Wan base and ROLL LoRA (``bench.py --generate-only``, cached in ``--workdir``; default
``--blocks 4 --dtype bf16 --shards 2``, ~3.3 GB) are uploaded (not timed) to a SeaweedFS server on
loopback (``tests/s3server.py``'s ``S3Server``, its data in a scratch folder below ``--workdir``).
Then, for ``--repeats`` interleaved rounds, each method runs once as a subprocess whose wall (plus a
trailing ``sync``) and whole-process-tree peak RSS ``bench.measure`` records:

* ``upload``   — context: every base file ``upload_file``-d with boto3 (32 MiB parts,
  ``--concurrency`` at once) to a fresh prefix, deleted afterwards (not timed);
* ``download`` — the reference: every base object read with ranged GETs of 32 MiB (distmerge's
  ``CHUNK_BYTES``), ``--concurrency`` in flight (default ``READ_DEPTH`` x CPUs, what distmerge's
  tasks keep in flight), each written at its offset into a local file, fsynced;
* ``distmerge-s3``    — ``distmerge merge --base s3://B/base --lora s3://B/LORA --output DEST -q
  --report R``, the server's admin in the ``AWS_*`` variables, a fresh ``DISTMERGE_CACHE_DIR``;
* ``distmerge-local`` — the same merge from the local files.

GET bytes are counted client side: a distmerge-s3 run's ``PYTHONPATH`` starts with a
``sitecustomize`` that, in every Python process of the run (driver and Ray workers), hooks botocore's
``GetObject`` and appends ``pid, status, key, ContentLength`` to a file (one ``O_APPEND`` write per
GET). The two merges' outputs are compared (not timed): every file's sha256, the index without its
``metadata.distmerge`` recipe, and not ``distmerge.json`` (both record where the inputs were).

Reported: medians (wall s, GB/s = base bytes / wall, peak tree RSS), paired ratios (within a round,
median over rounds) to ``download`` and ``distmerge-local``, GET bytes / base bytes, a markdown
table; ``--json FILE`` gets it all. The server's RSS is in no tree. The server, its data and the
scratch files are removed at the end (the base cache stays).

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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
METHODS = ("upload", "download", "distmerge-s3", "distmerge-local")
PIECE = 32 << 20  #: ranged GET / multipart part size (distmerge's CHUNK_BYTES)
READ_DEPTH = 3  #: reads a distmerge task keeps in flight (distmerge.plan.merge_plan.READ_DEPTH)
GB = 1e9
GET_LOG_ENV = "DISTMERGE_BENCH_GET_LOG"

#: the ``sitecustomize`` of the distmerge-s3 runs: in every Python process (driver, Ray workers) it
#: adds two handlers to botocore's built-in ones as ``botocore.handlers`` is imported (lazily: a
#: process that never imports botocore pays nothing), which log every GetObject's key and bytes
SITECUSTOMIZE = """\
import os, sys
def _key(params=None, context=None, **_):
    if context is not None and params:
        context["dmb_key"] = params.get("Key", "")
def _count(http_response=None, parsed=None, context=None, **_):
    row = (os.getpid(), getattr(http_response, "status_code", 0), (context or {}).get("dmb_key", ""),
           int((parsed or {}).get("ContentLength") or 0))
    fd = os.open(os.environ["DISTMERGE_BENCH_GET_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, ("\\t".join(map(str, row)) + "\\n").encode())
    os.close(fd)
class _Finder:
    def find_spec(self, name, path=None, target=None):
        if name != "botocore.handlers":
            return None
        import importlib.util
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module
        def exec_module(m):
            run(m)
            m.BUILTIN_HANDLERS += [("before-parameter-build.s3.GetObject", _key), ("after-call.s3.GetObject", _count)]
        spec.loader.exec_module = exec_module
        return spec
if os.environ.get("DISTMERGE_BENCH_GET_LOG"):
    sys.meta_path.insert(0, _Finder())
"""


def _load(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up while the class is made
    spec.loader.exec_module(mod)
    return mod


bench = _load(os.path.join(HERE, "bench.py"), "_bench_s3_bench")


# --------------------------------------------------------------------------- transfers (subprocess)


def _files(local: str) -> list[tuple[str, str]]:
    """(path, relative key) of every file below ``local``, sorted."""
    out = []
    for root, _, names in os.walk(local):
        out += [(os.path.join(root, n), os.path.relpath(os.path.join(root, n), local)) for n in names]
    return sorted(out)


def _client(concurrency: int):
    import boto3
    from botocore.config import Config

    session = boto3.session.Session(region_name=os.environ.get("AWS_REGION") or None)
    return session.client("s3", config=Config(max_pool_connections=max(10, concurrency), retries={"mode": "standard"}))


def transfer_upload(local: str, bucket: str, prefix: str, concurrency: int) -> None:
    from boto3.s3.transfer import TransferConfig

    c = _client(concurrency)
    cfg = TransferConfig(multipart_threshold=PIECE, multipart_chunksize=PIECE, max_concurrency=concurrency)
    for path, rel in _files(local):
        c.upload_file(path, bucket, f"{prefix}/{rel}", Config=cfg)


def transfer_download(bucket: str, prefix: str, dest: str, concurrency: int) -> None:
    """Every object below ``prefix`` by ranged GETs of ``PIECE``, ``concurrency`` in flight, each
    written at its offset into ``dest/<key>``; every file fsynced."""
    c = _client(concurrency)
    objs = [o for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
            for o in page.get("Contents", [])]  # fmt: skip
    fds: dict[str, int] = {}
    jobs = []
    for o in objs:
        path = os.path.join(dest, o["Key"][len(prefix) + 1 :])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fds[o["Key"]] = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(fds[o["Key"]], o["Size"])
        jobs += [(o["Key"], off, min(PIECE, o["Size"] - off)) for off in range(0, o["Size"], PIECE)]

    def get(job: tuple[str, int, int]) -> None:
        key, off, n = job
        body = c.get_object(Bucket=bucket, Key=key, Range=f"bytes={off}-{off + n - 1}")["Body"]
        done = 0
        while done < n:
            data = body.read(min(4 << 20, n - done))
            if not data:
                raise OSError(f"{key}: short read at {off + done}")
            os.pwrite(fds[key], data, off + done)
            done += len(data)
        body.close()

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(get, jobs))
    for fd in fds.values():
        os.fsync(fd)
        os.close(fd)


def transfer_main(argv: list[str]) -> int:
    """``_transfer upload|download BUCKET PREFIX LOCAL CONCURRENCY`` (the timed subprocess)."""
    kind, bucket, prefix, local, concurrency = argv
    if kind == "upload":
        transfer_upload(local, bucket, prefix, int(concurrency))
    else:
        transfer_download(bucket, prefix, local, int(concurrency))
    return 0


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


def command(m: str, ctx: dict, rnd: int) -> tuple[list[str], dict[str, str], str | None, str | None]:
    """(argv, env, Ray temp dir, token) of one run of method ``m`` in round ``rnd``."""
    a, inp, scratch, bucket = ctx["a"], ctx["inp"], ctx["scratch"], ctx["bucket"]
    dest = os.path.join(scratch, f"out-{m}")
    me, c = [sys.executable, os.path.abspath(__file__), "_transfer"], str(a.concurrency)
    if m == "upload":
        return [*me, "upload", bucket, f"upload-r{rnd}", inp["base"], c], ctx["env"], None, None
    if m == "download":
        return [*me, "download", bucket, "base", dest, c], ctx["env"], None, None
    exe = os.path.join(os.path.dirname(sys.executable), "distmerge")
    argv = [exe] if os.path.exists(exe) else [sys.executable, "-m", "distmerge"]
    s3 = m == "distmerge-s3"
    base = f"s3://{bucket}/base" if s3 else inp["base"]
    lora = f"s3://{bucket}/{os.path.basename(inp['lora'])}" if s3 else inp["lora"]
    report = os.path.join(scratch, "logs", f"{m}-r{rnd}-report.json")
    argv += ["merge", "--base", base, "--lora", lora, "--output", dest, "-q", "--report", report]
    env, ray_tmp, token = bench.distmerge_env()
    if s3:
        hook = os.path.join(scratch, "hook")
        env = {**env, **ctx["env"], "DISTMERGE_CACHE_DIR": os.path.join(scratch, f"cache-r{rnd}")}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (hook, env.get("PYTHONPATH")) if p)
        env[GET_LOG_ENV] = os.path.join(scratch, "logs", f"distmerge-s3-r{rnd}-gets.tsv")
    return [*argv, *a.distmerge_args.split()], env, ray_tmp, token


def get_counts(path: str, base_keys: set[str], inp: dict) -> dict:
    """What the GET log of a distmerge-s3 run says: requests, bytes of the base and of the rest."""
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            rows = [ln.rstrip("\n").split("\t") for ln in f if ln.count("\t") == 3]
    base = [int(r[3]) for r in rows if r[2] in base_keys]
    out = {"gets": len(rows), "gets_base": len(base), "processes": len({r[0] for r in rows})}
    out |= {"not_2xx": sum(not r[1].startswith("2") for r in rows), "base_get_bytes": sum(base)}
    out["other_get_bytes"] = sum(int(r[3]) for r in rows if r[2] not in base_keys)
    out["base_get_over_base_bytes"] = round(sum(base) / inp["base_bytes"], 4) if inp["base_bytes"] else None
    return out


def output_digest(folder: str) -> dict[str, str]:
    """sha256 of every output file; the index without its ``metadata.distmerge`` recipe, and no
    ``distmerge.json`` (both record where the inputs were, so an s3:// merge's differ by design)."""
    out = {}
    for path, rel in _files(folder):
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


def run_one(m: str, ctx: dict, rnd: int):
    """One measured run of ``m`` (its output removed before; digested and removed after)."""
    scratch = ctx["scratch"]
    dest = os.path.join(scratch, f"out-{m}")
    shutil.rmtree(dest, ignore_errors=True)
    argv, env, ray_tmp, token = command(m, ctx, rnd)
    bench.sync()
    print(f"bench_s3: round {rnd}/{ctx['a'].repeats} {m:<15} ...", end=" ", flush=True)
    log = os.path.join(scratch, "logs", f"{m}-r{rnd}.log")
    r = bench.measure(m, rnd, argv, log, env=env, ray_tmp=ray_tmp, token=token)
    r.extra["argv"] = argv
    if ray_tmp:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    if r.rc != 0:
        print(f"FAILED rc={r.rc}; log {log}:\n{open(log).read()[-3000:]}", file=sys.stderr, flush=True)
    elif m.startswith("distmerge"):
        r.extra["outputs"] = output_digest(dest)
        if ctx["a"].keep_outputs:
            shutil.copytree(dest, os.path.join(ctx["a"].keep_outputs, f"{m}-r{rnd}"))
    if m == "distmerge-s3":
        r.extra["gets"] = get_counts(env[GET_LOG_ENV], ctx["base_keys"], ctx["inp"])
        shutil.rmtree(os.path.join(scratch, f"cache-r{rnd}"), ignore_errors=True)
    if m == "upload":
        delete_prefix(ctx["server"].client(), ctx["bucket"], f"upload-r{rnd}/")
    shutil.rmtree(dest, ignore_errors=True)
    bench.sync()
    print(f"rc={r.rc} wall {r.wall_s:.2f}s peak RSS {r.peak_rss_bytes / GB:.2f} GB", flush=True)
    return r


def delete_prefix(c, bucket: str, prefix: str) -> None:
    for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            c.delete_objects(Bucket=bucket, Delete={"Objects": keys})


#: the methods every other method's wall is divided by, within each round
REFERENCES = ("download", "distmerge-local")


def ratio_key(m: str, ref: str) -> str:
    """``distmerge-s3``, ``download`` -> ``distmerge_s3_over_download_time``."""
    return f"{m.replace('-', '_')}_over_{ref.replace('-', '_')}_time"


#: the ratios printed by name: (numerator, denominator)
PAIRS = {
    ratio_key(x, y): (x, y)
    for x, y in (("distmerge-s3", "download"), ("distmerge-s3", "distmerge-local"), ("upload", "download"))
}


def _median(values) -> float | None:
    vs = [v for v in values if v is not None]
    return round(statistics.median(vs), 3) if vs else None


def _round_row(n: int, by: dict) -> dict:
    """One round's paired ratios (every method over each reference), outputs match and GET counts."""
    row: dict = {"round": n}
    for ref in REFERENCES:
        for m in METHODS:
            rx, ry = by.get((n, m)), by.get((n, ref))
            row[ratio_key(m, ref)] = round(rx.wall_s / ry.wall_s, 3) if rx and ry and ry.wall_s else None
    s3, local = by.get((n, "distmerge-s3")), by.get((n, "distmerge-local"))
    row["outputs_identical"] = s3.extra["outputs"] == local.extra["outputs"] if s3 and local else None
    row["gets"] = s3.extra.get("gets") if s3 else None
    return row


def summarize(runs: list, base_bytes: int) -> tuple[dict, dict]:
    """(per-method medians with paired ``over_<ref>_time``, ratios with GET counts and whether the
    two merges' outputs matched). Ratios are computed within a round, then the median over rounds."""
    by = {(r.round, r.method): r for r in runs if r.rc == 0}
    per_round = [_round_row(n, by) for n in sorted({r.round for r in runs})]
    ratios: dict = {k: _median(r[k] for r in per_round) for k in per_round[0] if k.endswith("_time")}
    same = [r["outputs_identical"] for r in per_round if r["outputs_identical"] is not None]
    ratios["outputs_identical"] = all(same) if same else None
    ratios["base_get_over_base_bytes"] = _median((r["gets"] or {}).get("base_get_over_base_bytes") for r in per_round)
    ratios["per_round"] = per_round
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
    """method | median wall s | GB/s (base bytes / median wall) | × download | × distmerge-local
    (paired: within a round, median over rounds) | peak tree RSS GB (median)."""
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


def print_report(summary: dict, ratios: dict, inp: dict, machine: dict) -> None:
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}x"  # noqa: E731
    print(f"\nbase {inp['base']} ({inp['base_bytes'] / GB:.2f} GB); LoRA {inp['lora']}")
    print("ratios, each within one round, median over rounds:")
    for key, (x, y) in PAIRS.items():
        print(f"  {x + ' / ' + y + ' (time):':<44}{fmt(ratios[key])}")
    for r in ratios["per_round"]:
        g = r["gets"] or {}
        print(
            f"  round {r['round']}: GETs {g.get('gets')} ({g.get('gets_base')} of the base, from "
            f"{g.get('processes')} processes); base GET bytes / base bytes {g.get('base_get_over_base_bytes')}; "
            f"other GET bytes {g.get('other_get_bytes')}; outputs identical {r['outputs_identical']}"
        )
    print(
        f"machine: {machine['nproc']} CPUs ({machine['cpu_model']}), {machine['ram_total_gb']} GB RAM, "
        f"{machine['workdir_fs']}; ray {machine['ray']}, python {machine['python']}\n"
    )
    print("(GB/s = base bytes / median wall; × columns: paired ratios, within a round, median over rounds)")
    print(markdown_table(summary))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="distmerge from S3 (SeaweedFS on loopback) against the server's own speed",
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
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_transfer"]:
        return transfer_main(argv[1:])
    a = parse_args(argv)
    os.makedirs(a.workdir, exist_ok=True)
    inp = generate(a)
    scratch = os.path.join(a.workdir, f"s3-scratch-{uuid.uuid4().hex[:8]}")
    for sub in ("logs", "hook"):
        os.makedirs(os.path.join(scratch, sub))
    with open(os.path.join(scratch, "hook", "sitecustomize.py"), "w") as f:
        f.write(SITECUSTOMIZE)
    server = None
    try:
        server, bucket = start_server(scratch, inp)
        keys = {f"base/{rel}" for _, rel in _files(inp["base"])}
        ctx = {"a": a, "inp": inp, "scratch": scratch, "bucket": bucket, "server": server, "base_keys": keys}
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
