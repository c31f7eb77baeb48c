#!/usr/bin/env python
"""Benchmark distmerge against the disk's floor (``dd`` direct read || direct write), ``cp -r && sync``
and one-process merge scripts.

What it does:

1. Generates once (cached in ``--workdir``) a Wan2.2-A14B-shaped sharded base at full width
   (``WanConfig(dim=5120, ffn=13824, blocks=--blocks, in_dim=16, text_dim=4096, freq_dim=256)``,
   ``--dtype bf16|fp32``, ``--shards`` shards) and a rank-``--rank`` ROLL-layout LoRA (``.pth``,
   bf16) on the 10 linear layers of every block. 8 blocks in bf16 is about 6.1 GB.
2. For ``--repeats`` rounds, runs each method once, interleaved (floor, cp, distmerge, seed,
   seed-fp32, floor, cp, ...):

   * ``floor``     — the disk's floor (the default's first method with ``--cold``, else only when
     named in ``--methods``): one ``sh -c`` that starts at once (a) ``dd if=FILE of=/dev/null
     bs=64M iflag=direct`` for every file of the base, one after another, and (b) ``dd if=/dev/zero
     of=DEST/floor.bin bs=64M count=N oflag=direct`` with N = ceil(base bytes / 64 MiB), and waits
     for both: the base's bytes read from the disk while as many are written (rounded up to whole
     64 MiB blocks), with no page cache and no CPU work. O_DIRECT is probed first (4 KiB, not
     timed) on the base and on ``DEST``; where a file system refuses it, that ``dd`` runs without
     the flag and the run's output says so. The run's ``extra`` records the files, bytes read and
     written and which side was direct;
   * ``cp``        — ``sh -c 'cp -r BASE DEST && sync'``: a durable copy, the I/O floor of a copy
     through the page cache (distmerge fsyncs what it writes, so the copy has to reach the disk too);
   * ``distmerge`` — ``distmerge merge --base BASE --lora LORA --output DEST -q --report FILE
     [--distmerge-args]``;
   * ``seed``      — ``benchmarks/seed_merge.py`` (whole-model load, bf16 merge, one ``save_file``);
   * ``seed-fp32`` — ``benchmarks/seed_merge.py --math fp32``: the same one-process algorithm with
     float32 math and one rounding (what a careful one-process script does);
   * ``distmerge-q8_0`` — ``distmerge merge ... --output DEST/merged.gguf --dtype q8_0 [--distmerge-args]``
     (a ComfyUI-GGUF file: block linears Q8_0, the rest F32/BF16 by city96's rules);
   * ``peer-q8_0`` — ``benchmarks/gguf_peer.py``: the same GGUF made the one-process way (whole-model
     load, float32 merge, ``gguf.quants.quantize`` and gguf-py's ``GGUFWriter``). Its file is
     byte-identical to distmerge's: each run's output sha256 is taken (not timed) and the report says
     whether the two methods' files matched in every round.

   Only ``--methods`` selects the two GGUF methods (not run by default).

   Every command is a subprocess writing into a fresh ``DEST`` on the same file system as the
   base. Before each command the previous output is removed (``rm -rf``), ``sync`` is run, and with
   ``--drop-caches`` the page cache is dropped (``echo 3 > /proc/sys/vm/drop_caches``; failure is
   recorded, not fatal). ``--cold`` implies ``--drop-caches`` and makes it a requirement: it exits 2
   with a one-line message where ``/proc/sys/vm/drop_caches`` cannot be written (not root, a
   container), so every run, the floor's too, reads the base from the disk. The timed wall
   includes a trailing ``sync`` (reported separately as ``sync_s``), because distmerge fsyncs its
   output while the seeds do not (``cp`` syncs in its own command and the floor writes with
   O_DIRECT, so their trailing sync is ~0); pass ``--no-sync-in-timing`` to time the command alone.
3. Reads each distmerge run's ``--report`` JSON and puts its timeline beside the benchmark's own
   clock (``time.time()`` just before the subprocess starts = "command start"; the moment its exit
   is reaped = "exit"): when ``merge()`` started (import + startup), when each driver phase ended,
   the first unit running (``started_at + min(units.started_s)``), the last unit done
   (``started_at + max(started_s + seconds)``), the units phase (first start -> last done) with
   its GB/s (unit bytes / units phase) against the ``cp -r && sync`` GB/s of the same round, and
   the tail (last unit done -> exit).
4. Prints medians per method with GB/s of base bytes (base bytes / median wall), the ratios of
   every method's wall to the ``floor`` wall and to the ``cp`` wall (when they ran), distmerge/cp,
   seed/distmerge and seed-fp32/distmerge (time and RSS), peer-q8_0/distmerge-q8_0 (time and RSS)
   and distmerge-q8_0/distmerge (time) -- each computed within one round, then
   the median over rounds -- the distmerge timeline per round with medians, machine facts, and
   last a markdown table to paste in a README::

       | method | median wall s | GB/s | × floor | × cp | peak tree RSS GB |

   (a ``× floor`` / ``× cp`` column only when that method ran). ``--json FILE`` gets the same
   (``summary[m]`` with ``throughput_gb_s``, ``over_floor_time``, ``over_cp_time``; ``ratios`` with
   ``<method>_over_floor_time``, ``<method>_over_cp_time``, ``floor_gb_s``; ``table_md``) plus every
   run (each distmerge run with its ``extra["timeline"]``, the floor's with its bytes).

Your own checkpoint instead of the generated one: ``--base PATH --lora PATH`` (any base and LoRA
``distmerge merge`` accepts: a sharded folder or one ``.safetensors``; a LoRA file or PEFT adapter
folder). Nothing is generated then, and the methods default to ``cp,distmerge`` (``floor,cp,distmerge``
with ``--cold``) because the seeds only understand ROLL's ``….lora_B.default.weight`` keys (add them
with ``--methods cp,distmerge,seed,seed-fp32``; they fail with "no LoRA pair matched" on other layouts).
``--generate-only`` writes (or finds in the cache) the generated base and LoRA, prints
``base=PATH`` and ``lora=PATH`` and exits (``benchmarks/gpu_check.sh`` uses it).

Peak RSS rule (the number reported as "peak RSS"):
    Every 50 ms the benchmark sums the RSS of the *measured set* and keeps the maximum sum seen
    while the command's main process is alive. The measured set is the main process plus all its
    descendants (``psutil.Process(pid).children(recursive=True)``) -- for distmerge that already
    contains the Ray GCS, raylet, agents and the ``ray::`` workers (workers are children of the
    raylet, which is a child of the driver). As a safety net for processes that escape the tree
    (e.g. reparented to init), about once a second every process is scanned and one that (a) was
    created after the command started, (b) has ``ray`` in its command line and (c) carries this
    run's unique Ray temp dir (each distmerge run gets ``RAY_TMPDIR=/tmp/dmb-XXXX``) in its command
    line or this run's ``DISTMERGE_BENCH_TOKEN`` in its environment, is added as an extra root
    (with its descendants). How many such escaped processes were found is reported per run
    (``escaped``); 0 means the plain tree was complete. The unique temp dir keeps concurrent Ray
    sessions of other programs out of the measurement. Note that summing RSS counts pages shared
    between processes (shared libraries, the plasma store, mmapped files) once per process, so
    the sum is an upper bound on the physical memory the tree needs.

Example (the full-size 6 GB run):
    .venv/bin/python benchmarks/bench.py --blocks 8 --dtype bf16 --shards 2 --repeats 3 \\
        --json bench-out/results.json

A checkpoint you already have:
    .venv/bin/python benchmarks/bench.py --base /data/Qwen2.5-3B --lora /data/my-adapter --repeats 3

Cold, against the disk's floor (root; methods floor,cp,distmerge,seed,seed-fp32):
    .venv/bin/python benchmarks/bench.py --blocks 8 --repeats 3 --cold --json bench-out/cold.json

Smoke test (tiny, hidden width overrides):
    .venv/bin/python benchmarks/bench.py --dim 512 --ffn 1384 --text-dim 512 --blocks 2 \\
        --repeats 1 --workdir /tmp/bench-smoke --json /tmp/bench-smoke/results.json
    (add --cold for the floor and cold caches)
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field

try:
    import psutil
except ImportError:  # pragma: no cover - main() says so; --generate-only and timeline() need none
    psutil = None  # type: ignore[assignment]

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
METHODS = ("floor", "cp", "distmerge", "seed", "seed-fp32", "distmerge-q8_0", "peer-q8_0")
SEEDS = ("seed", "seed-fp32")
#: the one-process scripts: each holds the whole base in RAM (--skip-seed leaves them out)
WHOLE_MODEL = (*SEEDS, "peer-q8_0")
#: the methods that write a GGUF file, DEST/merged.gguf (not run by default)
GGUF_METHODS = ("distmerge-q8_0", "peer-q8_0")
GGUF_NAME = "merged.gguf"
#: the methods that run ``distmerge merge`` (with a --report)
DISTMERGES = ("distmerge", "distmerge-q8_0")
#: table names where the method name is terse
LABEL = {"floor": "disk floor", "cp": "cp -r && sync", "seed": "seed (bf16)"}
FLOOR_BS = 64 << 20  #: dd block size of the floor (bs=64M)
DROP_CACHES = "/proc/sys/vm/drop_caches"
POLL_S = 0.05
SCAN_EVERY = 20  # polls between full process-table scans for escaped Ray processes (~1 s)
GB = 1e9


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Inputs:
    base: str
    lora: str
    base_bytes: int
    lora_bytes: int
    config: dict


def _tag(a: argparse.Namespace) -> str:
    return f"d{a.dim}-f{a.ffn}-b{a.blocks}-t{a.text_dim}-{a.dtype}"


def given_inputs(a: argparse.Namespace) -> Inputs:
    """The user's own ``--base``/``--lora`` (nothing generated)."""
    for flag, path in (("--base", a.base), ("--lora", a.lora)):
        if not os.path.exists(path):
            sys.exit(f"bench: {flag} {path} does not exist")
    return Inputs(a.base, a.lora, _du(a.base), _du(a.lora), {"given": True})


def wan_config(a: argparse.Namespace):
    """The generated base's ``WanConfig`` (full Wan2.2-A14B width unless overridden): ``--dim``,
    ``--ffn``, ``--blocks``, ``--text-dim``, ``--dtype``."""
    from distmerge.app.synth import WanConfig

    return WanConfig(
        dim=a.dim,
        ffn=a.ffn,
        blocks=a.blocks,
        in_dim=16,
        text_dim=a.text_dim,
        freq_dim=256,
        dtype={"bf16": "BF16", "fp32": "F32"}[a.dtype],
    )


def ensure_inputs(a: argparse.Namespace) -> Inputs:
    """Generate (or reuse from ``a.workdir``) the base folder and the ROLL LoRA."""
    from distmerge.app.synth import make_factors, write_lora, write_wan_base

    cfg = wan_config(a)
    base = os.path.join(a.workdir, f"base-{_tag(a)}-s{a.shards}")
    marker = os.path.join(a.workdir, f".base-{_tag(a)}-s{a.shards}.done")  # outside the base: cp copies the folder
    if not os.path.exists(marker):
        shutil.rmtree(base, ignore_errors=True)
        print(f"bench: generating base {base} ...", flush=True)
        t = time.perf_counter()
        write_wan_base(base, cfg, num_shards=a.shards)
        with open(marker, "w") as f:
            json.dump(asdict(cfg), f)
        print(f"bench: base generated in {time.perf_counter() - t:.1f}s", flush=True)
    lora = os.path.join(a.workdir, f"lora-{_tag(a)}-r{a.rank}.pth")
    if not os.path.exists(lora):
        print(f"bench: generating LoRA {lora} ...", flush=True)
        tmp = lora + ".tmp.pth"
        write_lora(tmp, make_factors(cfg, rank=a.rank), layout="roll")
        os.replace(tmp, lora)
    return Inputs(base, lora, _du(base), os.path.getsize(lora), {**asdict(cfg), "rank": a.rank, "shards": a.shards})


def _du(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


# --------------------------------------------------------------------------- measurement


@dataclass
class Run:
    method: str
    round: int
    rc: int
    wall_s: float  #: cmd_s + sync_s (or cmd_s alone with --no-sync-in-timing)
    cmd_s: float
    sync_s: float
    peak_rss_bytes: int
    peak_procs: int  #: processes in the measured set at the RSS peak
    max_procs: int
    escaped: int  #: Ray processes found outside the tree by the safety-net rule
    caches_dropped: bool
    log: str
    started_at: float = 0.0  #: Unix time just before the subprocess was started ("command start")
    exited_at: float = 0.0  #: Unix time its exit was reaped
    extra: dict = field(default_factory=dict)


class TreeSampler:
    """Peak of the summed RSS over a process, its descendants and escaped Ray processes."""

    def __init__(self, pid: int, t0: float, ray_tmp: str | None, token: str | None) -> None:
        self.root = psutil.Process(pid)
        self.t0 = t0
        self.ray_tmp = ray_tmp
        self.token = token
        self.extra_roots: dict[int, psutil.Process] = {}
        self.rejected: set[int] = set()
        self.peak = 0
        self.peak_procs = 0
        self.max_procs = 0
        self.polls = 0

    def _members(self) -> dict[int, psutil.Process]:
        out: dict[int, psutil.Process] = {}
        for r in [self.root, *self.extra_roots.values()]:
            try:
                procs = [r, *r.children(recursive=True)]
            except psutil.Error:
                continue
            out.update((p.pid, p) for p in procs)
        return out

    def _is_ours(self, p: psutil.Process, cmdline: list[str]) -> bool:
        line = " ".join(cmdline)
        if "ray" not in line.lower():
            return False
        if self.ray_tmp and self.ray_tmp in line:
            return True
        if self.token:
            try:
                return p.environ().get("DISTMERGE_BENCH_TOKEN") == self.token
            except psutil.Error:
                return False
        return False

    def _scan(self, members: dict[int, psutil.Process]) -> None:
        if not (self.ray_tmp or self.token):
            return
        for p in psutil.process_iter(["pid", "create_time", "cmdline"]):
            pid = p.info["pid"]
            if pid in members or pid in self.extra_roots or pid in self.rejected:
                continue
            if (p.info["create_time"] or 0) < self.t0 - 1.0:
                self.rejected.add(pid)
                continue
            if self._is_ours(p, p.info["cmdline"] or []):
                self.extra_roots[pid] = p
                members[pid] = p
            # a young process without the markers gets another look next scan (it may exec later)

    def sample(self) -> None:
        members = self._members()
        if self.polls % SCAN_EVERY == 0:
            self._scan(members)
            members = self._members()
        self.polls += 1
        total = 0
        for p in members.values():
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        self.max_procs = max(self.max_procs, len(members))
        if total > self.peak:
            self.peak, self.peak_procs = total, len(members)

    def leftovers(self) -> list[psutil.Process]:
        """Processes of this run still alive (after the main process exited)."""
        members = self._members()
        self._scan(members)
        alive = []
        for p in self._members().values():
            try:
                if p.pid != self.root.pid and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.Error:
                pass
        return alive


def sync() -> float:
    t = time.perf_counter()
    subprocess.run(["sync"], check=False)
    return time.perf_counter() - t


def drop_caches_error() -> str | None:
    """Drop the page cache (``echo 3 > /proc/sys/vm/drop_caches``); None, or why it failed."""
    try:
        with open(DROP_CACHES, "w") as f:
            f.write("3\n")
        return None
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror or e}"


def drop_caches() -> bool:
    """Drop the page cache; False where not permitted (containers, non-root)."""
    return drop_caches_error() is None


def measure(
    method: str,
    rnd: int,
    argv: list[str],
    log: str,
    *,
    env: dict[str, str] | None = None,
    ray_tmp: str | None = None,
    token: str | None = None,
    sync_in_timing: bool = True,
    caches_dropped: bool = False,
) -> Run:
    """Run ``argv`` as a subprocess; time it and track the peak RSS of its whole process tree."""
    with open(log, "w") as out:
        out.write("$ " + shlex.join(argv) + "\n")
        out.flush()
        t0_epoch = time.time()
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        ended: dict[str, float] = {}
        done = threading.Event()

        def reap() -> None:  # the exit time to the millisecond, however long a sample takes
            proc.wait()
            ended["perf"], ended["epoch"] = time.perf_counter(), time.time()
            done.set()

        sampler = TreeSampler(proc.pid, t0_epoch, ray_tmp, token)  # before the reap: a fast command is a zombie
        threading.Thread(target=reap, daemon=True).start()
        while not done.is_set():
            try:
                sampler.sample()
            except psutil.Error:
                pass
            done.wait(POLL_S)
        cmd_s = ended["perf"] - t0
    sync_s = sync() if sync_in_timing else 0.0
    deadline = time.time() + 30  # let Ray's helpers die before the next command (not timed)
    while (left := sampler.leftovers()) and time.time() < deadline:
        time.sleep(0.2)
    if left:
        print(
            f"bench: warning: {len(left)} process(es) of the {method} run still alive after 30s: "
            f"{[p.pid for p in left]}",
            flush=True,
        )
    return Run(
        method,
        rnd,
        proc.returncode,
        round(cmd_s + sync_s, 3),
        round(cmd_s, 3),
        round(sync_s, 3),
        sampler.peak,
        sampler.peak_procs,
        sampler.max_procs,
        len(sampler.extra_roots),
        caches_dropped,
        log,
        started_at=t0_epoch,
        exited_at=ended["epoch"],
    )


def _num(v: object) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def timeline(report: dict, command_start: float, exited_at: float) -> dict:
    """A distmerge run's phases in seconds from its command start, from its ``--report`` JSON.

    ``report["started_at"]`` (Unix time ``merge()`` began) anchors the report's relative times:
    ``phases`` (when each driver stage ended; any keys) and every unit's ``started_s`` and
    ``seconds``. Missing or extra keys are tolerated; a figure that cannot be computed is None.

    Example:
        >>> rep = {"started_at": 102.0, "phases": {"ray ready": 3.0},
        ...        "units": [{"started_s": 5.0, "seconds": 4.0, "bytes": 4e9},
        ...                  {"started_s": 6.0, "seconds": 5.0, "bytes": 4e9}]}
        >>> t = timeline(rep, command_start=100.0, exited_at=115.0)
        >>> t["startup_s"], t["phases_s"], t["first_unit_s"], t["last_unit_done_s"]
        (2.0, {'ray ready': 5.0}, 7.0, 13.0)
        >>> t["units_s"], t["units_gb_s"], t["tail_s"], t["exit_s"]
        (6.0, 1.333, 2.0, 15.0)
    """
    out: dict = {
        "startup_s": None,  #: command start -> merge() began (Python startup + imports + CLI)
        "phases_s": {},  #: driver stage -> when it ended, from command start
        "first_unit_s": None,  #: command start -> the first unit running
        "last_unit_done_s": None,  #: command start -> the last unit done
        "units_s": None,  #: the units phase: first unit start -> last unit done
        "units": 0,
        "units_on_driver": 0,  #: of ``units``, run by the driver itself (node_id "driver") while Ray started
        "units_bytes": 0,
        "units_gb_s": None,  #: units_bytes / units_s
        "tail_s": None,  #: last unit done -> process exit
        "exit_s": round(exited_at - command_start, 3),
    }
    started_at = _num(report.get("started_at"))
    if not started_at:  # a report from before started_at existed: nothing to anchor to
        return out
    out["startup_s"] = round(started_at - command_start, 3)
    phases = report.get("phases") or {}
    if isinstance(phases, dict):
        for k, v in phases.items():
            if (t := _num(v)) is not None:
                out["phases_s"][str(k)] = round(started_at + t - command_start, 3)
    units = [u for u in report.get("units") or [] if isinstance(u, dict)]
    out["units"] = len(units)
    out["units_on_driver"] = sum(u.get("node_id") == "driver" for u in units)
    out["units_bytes"] = int(sum(_num(u.get("bytes")) or 0 for u in units))
    timed = [
        (s, s + (_num(u.get("seconds")) or 0.0)) for u in units if (s := _num(u.get("started_s"))) is not None and s > 0
    ]  # started_s 0 = not recorded (e.g. a unit reused by --resume)
    if timed:
        first = started_at + min(s for s, _ in timed)
        last = started_at + max(e for _, e in timed)
        out["first_unit_s"] = round(first - command_start, 3)
        out["last_unit_done_s"] = round(last - command_start, 3)
        out["units_s"] = round(last - first, 3)
        out["tail_s"] = round(exited_at - last, 3)
        if last > first:
            out["units_gb_s"] = round(out["units_bytes"] / GB / (last - first), 3)
    return out


# --------------------------------------------------------------------------- methods


@dataclass
class FloorPlan:
    """The ``floor`` run: one ``sh -c`` reading every base file with ``dd`` (one after another)
    while another ``dd`` writes as many bytes (rounded up to whole 64 MiB blocks) into ``dest``."""

    argv: list[str]
    files: int
    read_bytes: int  #: the base's bytes, read once
    write_bytes: int  #: count x 64 MiB written to DEST/floor.bin
    direct_read: bool  #: iflag=direct (False: the file system refused O_DIRECT, e.g. tmpfs)
    direct_write: bool  #: oflag=direct
    note: str = ""  #: what fell back, for the run's output ("" when both are direct)


#: the floor's shell script: $1 = DEST/floor.bin, $2 = 64 MiB blocks to write, $3... = base files;
#: {iflag}/{oflag} are " iflag=direct"/" oflag=direct" or "" (the fallback)
FLOOR_SH = """\
out=$1; count=$2; shift 2
( for f in "$@"; do dd if="$f" of=/dev/null bs=64M{iflag} status=none || exit 1; done ) &
r=$!
dd if=/dev/zero of="$out" bs=64M count="$count"{oflag} status=none &
w=$!
wait "$r"; rr=$?
wait "$w"; rw=$?
[ "$rr" -eq 0 ] && [ "$rw" -eq 0 ]
"""


def base_files(base: str) -> list[str]:
    """Every file of the base (the file itself for a single ``.safetensors``), in a stable order."""
    if os.path.isfile(base):
        return [base]
    return sorted(os.path.join(r, f) for r, _, fs in os.walk(base) for f in fs)


def _dd_ok(*args: str) -> bool:
    return subprocess.run(["dd", *args, "status=none"], capture_output=True, check=False).returncode == 0


def floor_plan(inp: Inputs, dest: str) -> FloorPlan:
    """Create ``dest`` and build the floor command, probing O_DIRECT on the base and on ``dest``
    (4 KiB each; not timed): a file system that refuses it (tmpfs) gets dd without direct flags."""
    os.makedirs(dest)
    files = base_files(inp.base)
    count = -(-inp.base_bytes // FLOOR_BS)
    src = next((f for f in files if os.path.getsize(f) > 0), None)
    direct_read = src is None or _dd_ok(f"if={src}", "of=/dev/null", "bs=4096", "count=1", "iflag=direct")
    probe = os.path.join(dest, ".direct-probe")
    direct_write = _dd_ok("if=/dev/zero", f"of={probe}", "bs=4096", "count=1", "oflag=direct")
    if os.path.exists(probe):
        os.remove(probe)
    refused = [
        f"{flag} ({where})"
        for flag, where, ok in (
            ("iflag=direct", inp.base, direct_read),
            ("oflag=direct", dest, direct_write),
        )
        if not ok
    ]
    note = f"O_DIRECT refused: {', '.join(refused)}; dd without it, through the page cache (tmpfs?)" if refused else ""
    script = FLOOR_SH.format(
        iflag=" iflag=direct" if direct_read else "", oflag=" oflag=direct" if direct_write else ""
    )
    argv = ["sh", "-c", script, "floor", os.path.join(dest, "floor.bin"), str(count), *files]
    return FloorPlan(argv, len(files), inp.base_bytes, count * FLOOR_BS, direct_read, direct_write, note)


def command(
    method: str, inp: Inputs, dest: str, a: argparse.Namespace, log_dir: str, rnd: int
) -> tuple[list[str], dict[str, str] | None, str | None, str | None]:
    """(argv, env, ray temp dir, token) of one method run writing into ``dest``."""
    py = sys.executable
    if method == "floor":  # the disk's floor: a direct read of the base while as many bytes are written
        return floor_plan(inp, dest).argv, None, None, None
    if method == "cp":  # a durable copy: the data is on the disk when the command ends
        return ["sh", "-c", 'cp -r -- "$1" "$2" && sync', "cp", inp.base, dest], None, None, None
    if method == "peer-q8_0":
        os.makedirs(dest)
        script = os.path.join(HERE, "gguf_peer.py")
        out = os.path.join(dest, GGUF_NAME)
        return [py, script, "--base", inp.base, "--lora", inp.lora, "--output", out, "--alpha", "1.0"], None, None, None
    if method in SEEDS:
        out_file = os.path.join(dest, "diffusion_pytorch_model.safetensors")
        os.makedirs(dest)
        return (
            [
                py,
                os.path.join(HERE, "seed_merge.py"),
                "--base",
                inp.base,
                "--lora",
                inp.lora,
                "--output",
                out_file,
                "--alpha",
                "1.0",
                "--math",
                "fp32" if method == "seed-fp32" else "bf16",
            ],
            None,
            None,
            None,
        )
    exe = os.path.join(os.path.dirname(py), "distmerge")
    argv = [exe] if os.path.exists(exe) else [py, "-m", "distmerge"]
    gguf = method == "distmerge-q8_0"
    if gguf:
        os.makedirs(dest)
    argv += [
        "merge",
        "--base",
        inp.base,
        "--lora",
        inp.lora,
        "--output",
        os.path.join(dest, GGUF_NAME) if gguf else dest,
        "-q",
        "--report",
        report_path(log_dir, method, rnd),
        *shlex.split(a.distmerge_args),
        *(["--dtype", "q8_0"] if gguf else []),  # last: --distmerge-args cannot change the GGUF's type
    ]
    return (argv, *distmerge_env())


def report_path(log_dir: str, method: str, rnd: int) -> str:
    """The ``--report`` JSON of a distmerge run (``distmerge-r1-report.json``, ``distmerge-q8_0-r1-...``)."""
    return os.path.join(log_dir, f"{method}-r{rnd}-report.json")


def sha256_of(path: str) -> str | None:
    """The sha256 of a file (None where there is none), read in 16 MiB pieces; not timed."""
    import hashlib

    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(16 << 20):
                h.update(chunk)
    except OSError:
        return None
    return h.hexdigest()


def distmerge_env() -> tuple[dict[str, str], str, str]:
    """The environment of one distmerge run: always the embedded local Ray, in a Ray temp folder of
    its own and with a token, so the RSS sampler finds its processes (see the module docstring)."""
    ray_tmp = tempfile.mkdtemp(prefix="dmb-", dir="/tmp")  # short: Ray's socket paths must fit 107 chars
    token = uuid.uuid4().hex
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "DISTMERGE_BENCH_TOKEN": token}
    env.pop("RAY_ADDRESS", None)
    return env, ray_tmp, token


def run_all(inp: Inputs, a: argparse.Namespace, methods: list[str]) -> list[Run]:
    log_dir = os.path.join(a.workdir, "logs")
    os.makedirs(log_dir, exist_ok=True)
    runs: list[Run] = []
    warned = False
    for rnd in range(1, a.repeats + 1):
        for m in methods:
            dest = os.path.join(a.workdir, f"out-{m}")
            shutil.rmtree(dest, ignore_errors=True)
            plan = floor_plan(inp, dest) if m == "floor" else None
            if plan:
                argv, env, ray_tmp, token = plan.argv, None, None, None
            else:
                argv, env, ray_tmp, token = command(m, inp, dest, a, log_dir, rnd)
            sync()  # then the cache is dropped: the command starts cold, with nothing dirty
            dropped = drop_caches() if a.drop_caches else False
            if a.drop_caches and not dropped and not warned:
                print(
                    "bench: warning: cannot write /proc/sys/vm/drop_caches (not root, or a container); "
                    "runs use a warm page cache",
                    flush=True,
                )
                warned = True
            if plan and plan.note:
                print(f"bench: floor: {plan.note}", flush=True)
            log = os.path.join(log_dir, f"{m}-r{rnd}.log")
            print(f"bench: round {rnd}/{a.repeats} {m:<9} ...", end=" ", flush=True)
            r = measure(
                m,
                rnd,
                argv,
                log,
                env=env,
                ray_tmp=ray_tmp,
                token=token,
                sync_in_timing=not a.no_sync_in_timing,
                caches_dropped=dropped,
            )
            phase_line = ""
            if plan:
                r.extra = {k: v for k, v in asdict(plan).items() if k != "argv"}
                phase_line = (
                    f"; read {plan.read_bytes / GB:.2f} GB ({plan.files} files"
                    f"{', direct' if plan.direct_read else ', NOT direct'}) while writing "
                    f"{plan.write_bytes / GB:.2f} GB{' direct' if plan.direct_write else ' NOT direct'}"
                )
            if m in DISTMERGES:
                rep = report_path(log_dir, m, rnd)
                try:
                    with open(rep) as f:
                        j = json.load(f)
                except (OSError, ValueError):
                    j = None
                if isinstance(j, dict):
                    tl = timeline(j, r.started_at, r.exited_at)
                    r.extra = {
                        "internal_seconds": j.get("seconds"),
                        "ray": j.get("ray"),
                        "pairs_merged": j.get("pairs_merged"),
                        "report": rep,
                        "timeline": tl,
                    }
                    phase_line = (
                        f"; first unit {_f(tl['first_unit_s'])}s, units {_f(tl['units_s'])}s at "
                        f"{_f(tl['units_gb_s'])} GB/s, tail {_f(tl['tail_s'])}s"
                    )
                shutil.rmtree(ray_tmp, ignore_errors=True)
            runs.append(r)
            print(
                f"rc={r.rc} wall {r.wall_s:.2f}s (sync {r.sync_s:.2f}s) peak RSS {r.peak_rss_bytes / GB:.2f} GB"
                f" ({r.peak_procs} procs{f', {r.escaped} escaped' if r.escaped else ''}){phase_line}",
                flush=True,
            )
            if m in GGUF_METHODS and r.rc == 0:
                r.extra["output_sha256"] = sha256_of(os.path.join(dest, GGUF_NAME))
            if r.rc != 0:
                with open(log) as f:
                    tail = f.read()[-2000:]
                print(f"bench: {m} failed (rc={r.rc}); log {log}:\n{tail}", file=sys.stderr, flush=True)
            shutil.rmtree(dest, ignore_errors=True)
            sync()
    return runs


# --------------------------------------------------------------------------- report


def machine_facts(workdir: str) -> dict:
    def ver(pkg: str) -> str | None:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    du = shutil.disk_usage(workdir)
    fs = next(
        (
            p.fstype
            for p in sorted(psutil.disk_partitions(all=True), key=lambda p: -len(p.mountpoint))
            if os.path.abspath(workdir).startswith(p.mountpoint)
        ),
        None,
    )
    return {
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu,
        "ram_total_gb": round(psutil.virtual_memory().total / GB, 2),
        "ram_available_gb": round(psutil.virtual_memory().available / GB, 2),
        "disk_free_gb": round(du.free / GB, 2),
        "disk_total_gb": round(du.total / GB, 2),
        "workdir_fs": fs,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "torch": ver("torch"),
        "ray": ver("ray"),
        "safetensors": ver("safetensors"),
        "distmerge": ver("distmerge"),
        "psutil": ver("psutil"),
    }


def _f(v: float | None, spec: str = ".2f") -> str:
    return "n/a" if v is None else format(v, spec)


def _median(values) -> float | None:
    vs = [v for v in values if v is not None]
    return round(statistics.median(vs), 3) if vs else None


#: ratio key -> (numerator method, denominator method, Run attribute), each computed within a round
PAIRS = {
    "distmerge_over_cp_time": ("distmerge", "cp", "wall_s"),
    "seed_over_distmerge_time": ("seed", "distmerge", "wall_s"),
    "seed_fp32_over_distmerge_time": ("seed-fp32", "distmerge", "wall_s"),
    "seed_over_distmerge_rss": ("seed", "distmerge", "peak_rss_bytes"),
    "seed_fp32_over_distmerge_rss": ("seed-fp32", "distmerge", "peak_rss_bytes"),
    "peer_q8_0_over_distmerge_q8_0_time": ("peer-q8_0", "distmerge-q8_0", "wall_s"),
    "peer_q8_0_over_distmerge_q8_0_rss": ("peer-q8_0", "distmerge-q8_0", "peak_rss_bytes"),
    "distmerge_q8_0_over_distmerge_time": ("distmerge-q8_0", "distmerge", "wall_s"),
}


#: the methods every other method's wall is also divided by (when they ran), in table order
REFERENCES = ("floor", "cp")


def _key(method: str) -> str:
    return method.replace("-", "_")


def ratio_key(method: str, ref: str) -> str:
    """``seed-fp32``, ``floor`` -> ``seed_fp32_over_floor_time`` (the key in ``ratios``)."""
    return f"{_key(method)}_over_{_key(ref)}_time"


def summarize(runs: list[Run], methods: list[str], base_bytes: int) -> tuple[dict, dict, dict]:
    """(per-method medians, ratios, distmerge timeline).

    Ratios are paired: computed within each round from that round's two runs, then the median
    over the rounds (``ratios["per_round"]`` keeps every round's values). Besides ``PAIRS``, every
    method's wall is divided by the ``floor`` and the ``cp`` wall of its round (when they ran):
    ``ratios["<method>_over_floor_time"]`` / ``..._over_cp_time``, also in the method's summary as
    ``over_floor_time`` / ``over_cp_time`` (1.0 for the reference itself). The timeline has every
    round's events and phase figures and their medians.
    """
    summary = {}
    for m in methods:
        ok = [r for r in runs if r.method == m and r.rc == 0]
        if not ok:
            summary[m] = {"runs_ok": 0, "runs_failed": sum(r.method == m for r in runs)}
            continue
        walls = [r.wall_s for r in ok]
        med = statistics.median(walls)
        summary[m] = {
            "runs_ok": len(ok),
            "runs_failed": sum(r.method == m and r.rc != 0 for r in runs),
            "wall_s_median": round(med, 3),
            "wall_s_min": min(walls),
            "wall_s_max": max(walls),
            "sync_s_median": round(statistics.median(r.sync_s for r in ok), 3),
            "peak_rss_gb_median": round(statistics.median(r.peak_rss_bytes for r in ok) / GB, 3),
            "peak_rss_gb_max": round(max(r.peak_rss_bytes for r in ok) / GB, 3),
            "throughput_gb_s": round(base_bytes / GB / med, 3) if med > 0 else None,
        }

    ok_runs = {(r.round, r.method): r for r in runs if r.rc == 0}
    rounds = sorted({r.round for r in runs})
    refs = [b for b in REFERENCES if b in methods]
    pairs = dict(PAIRS)
    for b in refs:
        pairs.update({ratio_key(m, b): (m, b, "wall_s") for m in methods if m != b})
    per_round, tl_rounds = [], []
    for n in rounds:
        row: dict = {"round": n}
        for key, (x, y, attr) in pairs.items():
            rx, ry = ok_runs.get((n, x)), ok_runs.get((n, y))
            vx, vy = (getattr(rx, attr), getattr(ry, attr)) if rx and ry else (0, 0)
            row[key] = round(vx / vy, 3) if vx and vy else None
        if "floor" in methods:
            fl = ok_runs.get((n, "floor"))
            row["floor_gb_s"] = round(base_bytes / GB / fl.wall_s, 3) if fl and fl.wall_s > 0 else None
        cp, dm = ok_runs.get((n, "cp")), ok_runs.get((n, "distmerge"))
        cp_gb_s = round(base_bytes / GB / cp.wall_s, 3) if cp and cp.wall_s > 0 else None
        tl = (dm.extra.get("timeline") if dm else None) or None
        units_gb_s = tl.get("units_gb_s") if tl else None
        row["cp_gb_s"] = cp_gb_s
        row["distmerge_units_gb_s"] = units_gb_s
        row["distmerge_units_over_cp_gb_s"] = round(units_gb_s / cp_gb_s, 3) if units_gb_s and cp_gb_s else None
        per_round.append(row)
        if tl and dm:
            events = {"merge() starts": tl.get("startup_s"), **(tl.get("phases_s") or {})}
            events.update(
                {
                    "first unit running": tl.get("first_unit_s"),
                    "last unit done": tl.get("last_unit_done_s"),
                    "process exit": tl.get("exit_s"),
                }
            )
            tl_rounds.append(
                {
                    "round": n,
                    "events_s": events,
                    "to_first_unit_s": tl.get("first_unit_s"),
                    "units_s": tl.get("units_s"),
                    "units_gb_s": units_gb_s,
                    "cp_gb_s": cp_gb_s,
                    "units_over_cp_gb_s": row["distmerge_units_over_cp_gb_s"],
                    "tail_s": tl.get("tail_s"),
                    "wall_s": dm.wall_s,
                    "distmerge_over_cp_time": row["distmerge_over_cp_time"],
                }
            )
    ratios: dict = {k: _median(r[k] for r in per_round) for k in per_round[0] if k != "round"} if per_round else {}
    ratios["per_round"] = per_round
    if all(m in methods for m in GGUF_METHODS):
        ratios["gguf_outputs_identical"] = gguf_identical(ok_runs, rounds)
    for m, s in summary.items():
        for b in refs:
            if s.get("runs_ok"):
                s[f"over_{_key(b)}_time"] = 1.0 if m == b else ratios.get(ratio_key(m, b))
    names: list[str] = []
    for t in tl_rounds:
        names += [k for k in t["events_s"] if k not in names]
    timeline_doc: dict = {"rounds": tl_rounds}
    if tl_rounds:
        med_events = {k: _median(t["events_s"].get(k) for t in tl_rounds) for k in names}
        order = {k: i for i, k in enumerate(names)}
        timeline_doc["events_s_median"] = dict(
            sorted(med_events.items(), key=lambda kv: (kv[1] is None, kv[1] or 0.0, order[kv[0]]))
        )
        timeline_doc["median"] = {
            k: _median(t[k] for t in tl_rounds) for k in tl_rounds[0] if k not in ("round", "events_s")
        }
    return summary, ratios, timeline_doc


def gguf_identical(ok_runs: dict[tuple[int, str], Run], rounds: list[int]) -> bool | None:
    """Whether ``distmerge-q8_0`` and ``peer-q8_0`` wrote the same bytes (output sha256) in every
    round where both succeeded; None where no round has both."""
    same = []
    for n in rounds:
        runs = [ok_runs.get((n, m)) for m in GGUF_METHODS]
        shas = [r.extra.get("output_sha256") if r else None for r in runs]
        if all(shas):
            same.append(shas[0] == shas[1])
    return all(same) if same else None


#: (label, key in a timeline round, format) of the phase rows under the event rows
PHASE_ROWS = (
    ("to first unit s", "to_first_unit_s", ".2f"),
    ("units phase s (first start -> last done)", "units_s", ".2f"),
    ("units GB/s", "units_gb_s", ".3f"),
    ("cp -r && sync GB/s (same round)", "cp_gb_s", ".3f"),
    ("units / cp -r && sync GB/s", "units_over_cp_gb_s", ".0%"),
    ("tail s (last unit done -> exit)", "tail_s", ".2f"),
    ("wall s (incl. trailing sync)", "wall_s", ".2f"),
    ("wall / cp -r && sync wall", "distmerge_over_cp_time", ".2f"),
)


def print_timeline(tl: dict) -> None:
    rounds = tl.get("rounds") or []
    if not rounds:
        return
    w = 42
    cols = "".join(f"{'r' + str(t['round']):>8}" for t in rounds)
    hdr = f"{'distmerge timeline: s from command start':<{w}}{cols}{'median':>8}"
    print(hdr)
    print("-" * len(hdr))
    for name, med in tl["events_s_median"].items():
        vals = "".join(f"{_f(t['events_s'].get(name)):>8}" for t in rounds)
        print(f"  {name:<{w - 2}}{vals}{_f(med):>8}")
    print("phases")
    for label, key, spec in PHASE_ROWS:
        vals = "".join(f"{_f(t.get(key), spec):>8}" for t in rounds)
        print(f"  {label:<{w - 2}}{vals}{_f(tl['median'].get(key), spec):>8}")


def print_report(
    summary: dict, ratios: dict, machine: dict, inp: Inputs, a: argparse.Namespace, tl: dict | None = None
) -> None:
    print()
    shape = (
        "your checkpoint"
        if inp.config.get("given")
        else f"{a.shards} shards, {a.dtype}, {a.blocks} blocks, dim {a.dim}"
    )
    lora = f"LoRA {inp.lora}" if inp.config.get("given") else f"LoRA rank {a.rank}"
    caches = "drop caches " + ("on" if a.drop_caches else "off")
    if getattr(a, "cold", False):
        caches = "cold: sync + page cache dropped before every run"
    print(
        f"base {inp.base} ({inp.base_bytes / GB:.2f} GB, {shape}); {lora} ({inp.lora_bytes / GB:.3f} GB); "
        f"repeats {a.repeats}; "
        f"{caches}; "
        f"wall {'incl.' if not a.no_sync_in_timing else 'excl.'}"
        " trailing sync"
    )
    hdr = f"{'method':<14} {'wall s (med)':>12} {'min':>8} {'max':>8} {'peak RSS GB (med)':>18} {'GB/s':>7} {'ok':>4}"
    print(hdr)
    print("-" * len(hdr))
    for m, s in summary.items():
        name = LABEL.get(m, m)
        if not s.get("runs_ok"):
            print(f"{name:<14} {'failed':>12}")
            continue
        print(
            f"{name:<14} {s['wall_s_median']:>12.2f} {s['wall_s_min']:>8.2f} {s['wall_s_max']:>8.2f} "
            f"{s['peak_rss_gb_median']:>18.2f} {s['throughput_gb_s'] or 0:>7.2f} {s['runs_ok']:>4}"
        )
    print()
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}x"  # noqa: E731
    print("ratios, each within one round, median over rounds:")
    if "floor" in summary:
        for m in summary:
            if m != "floor":
                print(f"{LABEL.get(m, m) + ' / floor (time):':<34}{fmt(ratios.get(ratio_key(m, 'floor')))}")
    if "distmerge" in summary and "cp" in summary:
        print(f"distmerge / cp -r && sync (time): {fmt(ratios.get('distmerge_over_cp_time'))}")
    for m, key in (("seed", "seed_over"), ("seed-fp32", "seed_fp32_over")):
        if m in summary:
            print(f"{m + ' / distmerge (time):':<34}{fmt(ratios.get(key + '_distmerge_time'))}")
            print(f"{m + ' / distmerge (RSS):':<34}{fmt(ratios.get(key + '_distmerge_rss'))}")
    if all(m in summary for m in GGUF_METHODS):
        print(f"{'peer-q8_0 / distmerge-q8_0 (time):':<35} {fmt(ratios.get('peer_q8_0_over_distmerge_q8_0_time'))}")
        print(f"{'peer-q8_0 / distmerge-q8_0 (RSS):':<35} {fmt(ratios.get('peer_q8_0_over_distmerge_q8_0_rss'))}")
        same = {True: "yes", False: "NO", None: "n/a"}[ratios.get("gguf_outputs_identical")]
        print(f"{'GGUF files identical (sha256):':<35} {same}")
    if "distmerge-q8_0" in summary and "distmerge" in summary:
        print(f"{'distmerge-q8_0 / distmerge (time):':<35} {fmt(ratios.get('distmerge_q8_0_over_distmerge_time'))}")
    print()
    if tl and tl.get("rounds"):
        print_timeline(tl)
        print()
    print(
        f"machine: {machine['nproc']} CPUs ({machine['cpu_model']}), {machine['ram_total_gb']} GB RAM, "
        f"{machine['disk_free_gb']} GB free on {machine['workdir_fs']}; torch {machine['torch']}, "
        f"ray {machine['ray']}, safetensors {machine['safetensors']}, python {machine['python']}"
    )
    print()
    print(markdown_table(summary))


def markdown_table(summary: dict) -> str:
    """The medians as a markdown table to paste in a README: method | median wall s | GB/s (base
    bytes / median wall) | × floor | × cp (paired ratios; a column only when that method ran) |
    peak tree RSS GB (median)."""
    refs = [b for b in REFERENCES if b in summary]
    cols = ["method", "median wall s", "GB/s", *(f"× {b}" for b in refs), "peak tree RSS GB"]
    lines = ["| " + " | ".join(cols) + " |", "|---" + "|---:" * (len(cols) - 1) + "|"]
    for m, s in summary.items():
        if not s.get("runs_ok"):
            cells = ["failed"] * (len(cols) - 1)
        else:
            cells = [
                f"{s['wall_s_median']:.2f}",
                _f(s.get("throughput_gb_s")),
                *(_f(s.get(f"over_{_key(b)}_time")) for b in refs),
                f"{s['peak_rss_gb_median']:.2f}",
            ]
        lines.append("| " + " | ".join([LABEL.get(m, m), *cells]) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark distmerge vs cp -r && sync and one-process merge scripts (the ROLL seed).",
        epilog="Pass --distmerge-args with '=': --distmerge-args='--num-workers 2'",
    )
    p.add_argument("--workdir", default="bench-out", help="cache + scratch folder (default ./bench-out)")
    p.add_argument(
        "--base",
        default=None,
        help="benchmark this existing base (folder or .safetensors) instead of generating one; needs --lora",
    )
    p.add_argument("--lora", default=None, help="the LoRA file or PEFT adapter folder for --base")
    p.add_argument("--blocks", type=int, default=8, help="Wan blocks (default 8 = ~6.1 GB in bf16)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="base dtype (default bf16)")
    p.add_argument("--shards", type=int, default=2, help="base shards (default 2)")
    p.add_argument("--rank", type=int, default=64, help="LoRA rank (default 64)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument(
        "--methods",
        default=None,
        help="comma list of floor,cp,distmerge,seed,seed-fp32,distmerge-q8_0,peer-q8_0 (default "
        "cp,distmerge,seed,seed-fp32; cp,distmerge with --base; --cold puts floor first)",
    )
    p.add_argument(
        "--skip-seed",
        action="store_true",
        help="leave out seed, seed-fp32 and peer-q8_0 (when the base does not fit in RAM)",
    )
    p.add_argument(
        "--generate-only",
        action="store_true",
        help="write (or reuse) the generated base and LoRA, print base=PATH and lora=PATH, and exit",
    )
    p.add_argument("--distmerge-args", default="", help="extra distmerge CLI args, one string")
    p.add_argument(
        "--drop-caches",
        action="store_true",
        help="drop the page cache before each command (needs root; failure is recorded)",
    )
    p.add_argument(
        "--cold",
        action="store_true",
        help="sync and drop the page cache before every run (implies --drop-caches; exits 2 if "
        f"{DROP_CACHES} is not writable) and run the disk's floor first by default",
    )
    p.add_argument("--no-sync-in-timing", action="store_true", help="do not time a trailing sync")
    p.add_argument("--json", default=None, metavar="FILE", help="write summary + every run as JSON")
    # hidden width overrides, for smoke tests only
    p.add_argument("--dim", type=int, default=5120, help=argparse.SUPPRESS)
    p.add_argument("--ffn", type=int, default=13824, help=argparse.SUPPRESS)
    p.add_argument("--text-dim", type=int, default=4096, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if (a.base is None) != (a.lora is None):
        p.error("--base and --lora go together")
    if a.generate_only and a.base:
        p.error("--generate-only makes the generated checkpoint; it takes no --base/--lora")
    if a.base:
        a.base, a.lora = os.path.abspath(a.base), os.path.abspath(a.lora)
    default = "cp,distmerge" if a.base else ",".join(m for m in METHODS if m != "floor" and m not in GGUF_METHODS)
    if a.cold:
        default = "floor," + default
        a.drop_caches = True
    methods = [m.strip() for m in (a.methods or default).split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        p.error(f"unknown method(s) {bad}; choose from {','.join(METHODS)}")
    if a.skip_seed:
        methods = [m for m in methods if m not in WHOLE_MODEL]
    if not methods:
        p.error("no method left to run")
    a.method_list = methods
    a.workdir = os.path.abspath(a.workdir)
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if psutil is None and not a.generate_only:
        sys.exit("bench.py needs psutil: .venv/bin/pip install psutil")
    if a.cold and not a.generate_only and (err := drop_caches_error()):
        print(f"bench: --cold needs a writable {DROP_CACHES} (root, not a container): {err}", file=sys.stderr)
        return 2
    os.makedirs(a.workdir, exist_ok=True)
    sys.path.insert(0, REPO)
    inp = given_inputs(a) if a.base else ensure_inputs(a)
    if a.generate_only:
        print(f"base={inp.base}\nlora={inp.lora}\nbase_bytes={inp.base_bytes}", flush=True)
        return 0
    machine = machine_facts(a.workdir)
    if set(WHOLE_MODEL) & set(a.method_list) and inp.base_bytes * 2.5 > psutil.virtual_memory().total:
        print(
            f"bench: warning: the one-process scripts hold the whole {inp.base_bytes / GB:.1f} GB base plus save "
            f"buffers in RAM ({machine['ram_total_gb']} GB total); consider --skip-seed",
            flush=True,
        )
    if machine["disk_free_gb"] * GB < inp.base_bytes * 1.2:
        print("bench: warning: little free disk for one output copy of the base", flush=True)
    runs = run_all(inp, a, a.method_list)
    summary, ratios, tl = summarize(runs, a.method_list, inp.base_bytes)
    print_report(summary, ratios, machine, inp, a, tl)
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        doc = {
            "argv": sys.argv,
            "inputs": {**asdict(inp), "base_gb": round(inp.base_bytes / GB, 3)},
            "options": {k: v for k, v in vars(a).items()},
            "machine": machine,
            "summary": summary,
            "ratios": ratios,
            "timeline": tl,
            "runs": [asdict(r) for r in runs],
            "table_md": markdown_table(summary),
            "rss_rule": "max over 50 ms polls of sum(RSS) over the main process + descendants, plus "
            "escaped Ray processes (created after start, 'ray' in cmdline, this run's "
            "RAY_TMPDIR in cmdline or DISTMERGE_BENCH_TOKEN in environ) + their descendants",
        }
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=2)
        print(f"bench: wrote {a.json}")
    return 0 if all(r.rc == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
