"""``distmerge verify``: check a merged checkpoint against its base and LoRA(s), as Ray tasks.

What is checked:

* structure (headers only, on the driver): the same key set, shapes and dtypes as the base (float
  tensors in the expected output ``dtype`` when one is given);
* untouched tensors: byte-identical to the base (or to the base converted to ``dtype``);
* merged tensors: every value finite, and a seeded random sample of rows (all rows with
  ``full=True``) recomputed in float64 from the base and the LoRA factors, rounded once to the output
  dtype, and compared in ulps. An element passes if it is within 1 ulp (bf16/fp16/fp8) or 16 ulp
  (fp32/fp64) of that reference, or within ``1e-6 · max|ref|`` of it (where W and ΔW cancel; such
  elements do not count toward the reported worst ulp);
* scaled-fp8 tensors (``fp8``): merged ones are dequantized from the base with its scale, the
  reference is divided by the output's scale and compared in fp8 ulps (≤ 1: e4m3fn has 3 mantissa
  bits), and the largest output code must be ±fp8_max (a fresh scale ``amax/448``); tensors
  ``--dtype fp8_*`` quantized without deltas must equal the base quantized (bytes of weight and
  scale);
* checksums: when the index records ``metadata.distmerge.crc32`` or ``.sha256`` (a single-file
  output: a ``<file>.crc32`` or ``<file>.sha256`` sidecar, ``HEX  NAME``), every shard's checksum
  must match, which catches
  a changed byte outside the sampled rows too. Missing checksums are noted, not a failure.

The work runs as Ray tasks through ``cluster.run_calls``: one task per shard to hash, and
byte-balanced groups of tensors to compare; each task returns small metadata only.

Example:
    >>> # import distmerge.verify as v
    >>> # rep = v.verify("Wan2.2/low_noise_model", ["diffusion_module.pth"], "merged/low_noise_model",
    >>> #                dtype="bf16")
    >>> # print(rep.verdict)   # verify: OK — 1095 tensors, 400 merged (sampled 32 rows each), …
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .checkpoint import INDEX_SUFFIX, BaseCheckpoint, open_base
from .checksum import ALGORITHMS
from .errors import DistmergeError, FormatError, PlanError
from .checks import _CHECKSUM, _CHUNK, _STRUCTURE, CheckGroup, TensorCheck, check_group
from .api import collect_deltas, lora_specs, resolve_dtype
from .fp8 import ScaledLayout, scaled_layout
from .lora import Delta
from .plan import partition_units

__all__ = ["VerifyReport", "verify", "add_verify_parser", "cmd_verify"]

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------
# Driver side


@dataclass
class VerifyReport:
    """The outcome of ``verify``: ``ok`` and the one-line ``verdict`` (what the CLI prints)."""

    ok: bool
    verdict: str
    worst_ulp: int = 0
    worst_key: str = ""
    tensors: int = 0  #: tensors of the base
    merged: int = 0  #: tensors with deltas (recomputed)
    failures: list[str] = field(default_factory=list)  #: most serious first
    checksums: str = "missing"  #: ``match``, ``missing`` or ``mismatch``
    shards: int = 0  #: files of the merged checkpoint
    rows_compared: int = 0


def _structure(base: BaseCheckpoint, out: BaseCheckpoint, fp8: ScaledLayout) -> list[tuple[int, int, str]]:
    fails = []
    new = fp8.new_tensors()
    for k, b in base.tensors.items():
        o = out.tensors.get(k)
        if o is None:
            fails.append((_STRUCTURE, 0, f"{out.path}: key '{k}' of the base is missing"))
            continue
        if o.shape != b.shape:
            fails.append((_STRUCTURE, 0, f"{o.path}: '{k}' has shape {list(o.shape)}, expected "
                                         f"{list(b.shape)} as in the base"))
        want = fp8.out_code(k, b.dtype)
        if o.dtype != want:
            fails.append((_STRUCTURE, 0, f"{o.path}: '{k}' has dtype {o.dtype}, expected {want}"))
    for k, (code, shape) in new.items():
        o = out.tensors.get(k)
        if o is None:
            fails.append((_STRUCTURE, 0, (f"{out.path}: key '{k}' is missing (expected a new {code} "
                                          f"{list(shape)} for --dtype {fp8.out_dtype})")))
        elif (o.dtype, o.shape) != (code, shape):
            fails.append((_STRUCTURE, 0, f"{o.path}: '{k}' is {o.dtype} {list(o.shape)}, expected {code} {list(shape)}"))
    for k, o in out.tensors.items():
        if k not in base.tensors and k not in new:
            fails.append((_STRUCTURE, 0, f"{o.path}: extra key '{k}' is not in the base"))
    return fails


def _tensor_checks(base: BaseCheckpoint, out: BaseCheckpoint, fp8: ScaledLayout,
                   by_target: dict[str, list[Delta]]) -> list[TensorCheck]:
    """What to compare, in merged-file order (each task reads forward). Scales recomputed with
    their weight are checked with it; new markers only structurally."""
    derived = fp8.recomputed(set(by_target))
    checks = []
    for k, o in out.tensors.items():
        b = base.tensors.get(k)
        if b is None or k in derived or o.shape != b.shape or o.dtype != fp8.out_code(k, b.dtype):
            continue
        deltas = tuple(by_target.get(k, ()))
        quant = k in fp8.new_scales or (k in fp8.scales and bool(deltas))
        scale = out.tensors.get(fp8.pairs.get(k, "")) if quant else None
        if quant and scale is None:
            continue  # reported as a missing key by the structure check
        checks.append(TensorCheck(k, b, o, deltas, "scaled" if quant else "", scale,
                                  base.tensors.get(fp8.scales.get(k, "")) if quant else None))
    return checks


_SIDECAR_RE = re.compile(r"^([0-9a-fA-F]+) [ *](.+)$")
_HEX_LEN = {"crc32": 8, "sha256": 64}


def _recorded_checksums(out: BaseCheckpoint
                        ) -> tuple[tuple[str, dict[str, str]] | None, list[tuple[int, int, str]]]:
    """``(algorithm, {shard name: hex})`` recorded with the merged checkpoint (the index's
    ``metadata.distmerge.crc32`` / ``.sha256``, or a ``<file>.crc32`` / ``<file>.sha256`` sidecar),
    or None when nothing is recorded."""
    names = [os.path.basename(f) for f in out.files]
    folder = out.path if os.path.isdir(out.path) else os.path.dirname(out.path)
    index = [n for n in sorted(os.listdir(folder)) if n.endswith(INDEX_SUFFIX)] if os.path.isdir(out.path) else []
    if index:
        path = os.path.join(folder, index[0])
        try:
            with open(path, "rb") as f:
                meta = json.loads(f.read().decode("utf-8")).get("metadata") or {}
        except (OSError, ValueError, AttributeError) as e:
            return None, [(_CHECKSUM, 0, f"{path}: cannot read the index ({type(e).__name__})")]
        ours = meta.get("distmerge") if isinstance(meta, dict) else None
        ours = ours if isinstance(ours, dict) else {}
        algo = next((a for a in ALGORITHMS if a in ours), None)
        if algo is None:
            return None, []
        sums = ours[algo]
        if not isinstance(sums, dict) or not all(isinstance(v, str) and len(v) == _HEX_LEN[algo]
                                                 for v in sums.values()):
            return (algo, {}), [(_CHECKSUM, 0, f"{path}: metadata.distmerge.{algo} must map shard names "
                                               f"to {_HEX_LEN[algo]}-digit hex {algo} values")]
        return (algo, {k: v.lower() for k, v in sums.items()}), []
    sides = [(a, f"{out.files[0]}.{a}") for a in ALGORITHMS if os.path.isfile(f"{out.files[0]}.{a}")]
    if len(names) != 1 or not sides:
        return None, []
    algo, side = sides[0]
    try:
        with open(side, encoding="utf-8") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        return (algo, {}), [(_CHECKSUM, 0, f"{side}: cannot read ({type(e).__name__})")]
    sums = {}
    for ln in lines:
        m = _SIDECAR_RE.match(ln)
        if not m or len(m.group(1)) != _HEX_LEN[algo]:
            return (algo, {}), [(_CHECKSUM, 0, f"{side}: expected 'HEX  NAME' with a {_HEX_LEN[algo]}-digit "
                                               f"{algo}, found {ln[:80]!r}")]
        sums[os.path.basename(m.group(2))] = m.group(1).lower()
    return (algo, sums), []


def _groups(checks: list[TensorCheck], target: int) -> list[list[TensorCheck]]:
    """Consecutive tensors in groups of about ``target`` bytes read (the planner's unit cut)."""
    spans = partition_units([c.out.nbytes + c.base.nbytes for c in checks], target)
    return [checks[i:j] for i, j in spans]


def _memory(checks: Sequence[TensorCheck]) -> int:
    """Ray memory to ask for: a few chunks, or a whole float64 tensor for non-row-local deltas."""
    peak = 4 * _CHUNK
    for c in checks:  # scaled fp8: the whole tensor (its largest value, the converted bytes)
        if c.quant or c.deltas and not all(d.kind in ("diff", "set") or (d.kind == "lora" and not d.transpose
                                                                and not d.dora and len(d.factors) == 2)
                                for d in c.deltas):
            peak = max(peak, 4 * _CHUNK + 3 * 8 * c.base.numel)
    return (64 << 20) + peak


def verify(base: str | os.PathLike[str], loras: Sequence[object], merged: str | os.PathLike[str], *,
           alpha: float = 1.0, dtype: str | torch.dtype | None = None, full: bool = False, rows: int = 32,
           seed: int = 0, address: str | None = None, num_workers: int | None = None,
           num_cpus: int | None = None, skip_unmatched: bool = False,
           group_size: int | str | None = None) -> VerifyReport:
    """Check that ``merged`` is ``base`` with ``loras`` merged in (see the module docstring).

    Args:
        base, loras, alpha, dtype, skip_unmatched: as given to ``distmerge.merge``.
        merged: the merge output (folder with an index, or a ``.safetensors`` file).
        full: recompute every row of every merged tensor, not a sample.
        rows: rows sampled per merged tensor (seeded by ``seed`` and the key).
        address, num_workers, num_cpus: Ray session and concurrency, as for ``merge``; an
            initialized Ray session is reused and left running.
        group_size: target bytes read per check task (default: total / (4 · workers)).

    Returns:
        A ``VerifyReport``; findings about ``merged`` (including a merged checkpoint that cannot be
        opened) make ``ok`` False, they are not raised.

    Raises:
        DistmergeError: the base or a LoRA cannot be read or matched, bad options, Ray problems.

    Example:
        >>> # rep = verify("base_dir", [("a.pth", 0.7)], "merged_dir", dtype="bf16")
        >>> # rep.ok, rep.verdict
    """
    if rows < 0:
        raise PlanError(f"--rows must be >= 0, got {rows}")
    base_ck = open_base(base)
    specs = lora_specs(loras)
    gathered = collect_deltas(base_ck, specs, alpha=alpha, skip_unmatched=skip_unmatched)
    out_code = resolve_dtype(dtype)
    report = VerifyReport(ok=False, verdict="", tensors=len(base_ck.tensors))
    try:
        out_ck = open_base(merged)
    except FormatError as e:
        return _finish(report, [(_STRUCTURE, 0, str(e))], full=full, rows=rows)
    report.shards = len(out_ck.files)
    fp8 = scaled_layout(base_ck.tensors, out_code, path=base_ck.path)
    found = _structure(base_ck, out_ck, fp8)
    recorded_by, csum_fails = _recorded_checksums(out_ck)
    algo, recorded = recorded_by if recorded_by else ("", None)
    found += csum_fails
    by_target: dict[str, list[Delta]] = {}
    for d in gathered.deltas:
        by_target.setdefault(d.target, []).append(d)
    checks = _tensor_checks(base_ck, out_ck, fp8, by_target)
    report.merged = sum(1 for c in checks if c.deltas)

    from .cluster import Call, RaySession, run_calls  # Ray is imported only when there is work

    with RaySession(address, num_cpus=num_cpus) as session:
        settings = session.settings(device="cpu", num_workers=num_workers)
        total = sum(c.out.nbytes + c.base.nbytes for c in checks)
        target = (parse_group_size(group_size) if group_size else
                  max(1, math.ceil(total / max(1, 4 * settings.workers))))
        groups: list[CheckGroup] = []
        if recorded is not None:
            for f in out_ck.files:
                groups.append(CheckGroup(len(groups), hash_path=f, hash_algo=algo))
        for part in _groups(checks, target):
            groups.append(CheckGroup(len(groups), tuple(part), rows=rows, full=full, seed=seed))
        calls = [Call((g,), f"verify group {g.index}" if not g.hash_path else
                      f"checksum of {os.path.basename(g.hash_path)}",
                      memory=(64 << 20) if g.hash_path else _memory(g.checks),
                      size=(os.path.getsize(g.hash_path) if g.hash_path else
                            sum(c.out.nbytes + c.base.nbytes for c in g.checks)))
                 for g in groups]
        logger.info("verify: %d tensors in %d check task(s), %d shard(s) to hash on %s",
                    len(checks), sum(1 for g in groups if not g.hash_path),
                    sum(1 for g in groups if g.hash_path), session.mode)
        results = [res for _, res in run_calls(check_group, calls, settings=settings)]

    extra = 0
    for r in results:
        found += list(r.failures)
        extra += max(0, r.n_failures - len(r.failures))
        report.rows_compared += r.rows_compared
        if r.worst_key and (r.worst_ulp > report.worst_ulp or not report.worst_key):
            report.worst_ulp, report.worst_key = r.worst_ulp, r.worst_key
    if recorded is None:
        report.checksums = "missing"
    else:
        digests = {os.path.basename(r.hashed): r.digest for r in results if r.hashed and r.digest}
        bad = False
        for f in out_ck.files:
            name = os.path.basename(f)
            want = recorded.get(name)
            if want is None:
                bad = True
                found.append((_CHECKSUM, 0, f"{f}: no {algo} recorded for this shard"))
            elif name in digests and digests[name] != want:
                bad = True
                found.append((_CHECKSUM, 0, f"{f}: {algo} {digests[name][:12]} does not match the "
                                            f"recorded {want[:12]}"))
        for name in recorded:
            if name not in {os.path.basename(f) for f in out_ck.files}:
                bad = True
                found.append((_CHECKSUM, 0, f"{out_ck.path}: a {algo} is recorded for '{name}', which "
                                            "is not a shard of this checkpoint"))
        report.checksums = "mismatch" if (bad or csum_fails) else "match"
    return _finish(report, found, full=full, rows=rows, extra=extra)


def parse_group_size(size: int | str) -> int:
    """``64MB``, ``1GiB`` or a byte count, as ``--unit-size``."""
    from .plan import parse_size

    n = parse_size(size)
    if n <= 0:
        raise PlanError(f"group size must be positive, got {size!r}")
    return n


def _one_line(s: str) -> str:
    return " ".join(s.split())


def _finish(report: VerifyReport, found: list[tuple[int, int, str]], *, full: bool, rows: int,
            extra: int = 0) -> VerifyReport:
    found = sorted(found, key=lambda f: (f[0], -f[1]))
    report.failures = [_one_line(m) for _, _, m in found]
    report.ok = not found
    if report.ok:
        sample = "all rows" if full else f"sampled {rows} rows each"
        worst = (f", worst {report.worst_ulp} ulp ({report.worst_key})" if report.worst_key else "")
        if report.checksums == "match":
            n = report.shards
            csum = f"{n} shard checksum{'s match' if n != 1 else ' matches'}"
        else:
            csum = ("no shard checksums recorded (values outside the compared rows not checked)"
                    if not full else "no shard checksums recorded")
        report.verdict = (f"verify: OK — {report.tensors} tensors, {report.merged} merged ({sample})"
                          f"{worst}, {csum}")
    else:
        more = len(found) - 3 + extra
        shown = "; ".join(report.failures[:3])
        report.verdict = f"verify: FAILED — {shown}" + (f"; … {more} more" if more > 0 else "")
    return report


# ----------------------------------------------------------------------------------------------
# Command line


def add_verify_parser(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser
                      ) -> argparse.ArgumentParser:
    """Add ``distmerge verify`` to ``subparsers`` (with the ``common`` -q/-v options).

    >>> p = argparse.ArgumentParser(); sub = p.add_subparsers(dest="command")
    >>> _ = add_verify_parser(sub, argparse.ArgumentParser(add_help=False))
    >>> a = p.parse_args(["verify", "--base", "b", "--lora", "l.pth", "--merged", "m", "--full"])
    >>> a.command, a.lora, a.full, a.rows, a.dtype
    ('verify', ['l.pth'], True, 32, 'keep')
    """
    p = subparsers.add_parser(
        "verify", parents=[common],
        help="check a merged checkpoint against its base and LoRA(s): structure, untouched bytes, "
             "recomputed rows, finiteness, shard checksums")
    p.add_argument("--base", "--base_model_path", "--base-model-path", dest="base", required=True,
                   metavar="PATH", help="the base checkpoint the merge started from")
    p.add_argument("--lora", "--lora_path", "--lora-path", dest="lora", action="append", required=True,
                   metavar="PATH", help="LoRA file as given to merge; repeat for several LoRAs")
    p.add_argument("--weight", dest="weight", action="append", type=float, metavar="W",
                   help="weight of each --lora, in order, as given to merge (default 1.0 each)")
    p.add_argument("--merged", required=True, metavar="PATH",
                   help="the merge output: folder with an index, or a .safetensors file")
    p.add_argument("--alpha", type=float, default=1.0, help="global multiplier given to merge (default 1.0)")
    p.add_argument("--dtype", choices=["keep", "bf16", "fp16", "fp32", "fp8_e4m3fn", "fp8_e5m2"], default="keep",
                   help="output dtype given to merge (default: keep the base's)")
    p.add_argument("--full", action="store_true",
                   help="recompute every row of every merged tensor (default: a sample of rows)")
    p.add_argument("--rows", type=int, default=32, metavar="N",
                   help="rows sampled per merged tensor (default 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the row sample (default 0)")
    p.add_argument("--skip-unmatched", action="store_true",
                   help="as given to merge: ignore LoRA keys that have no target in the base")
    p.add_argument("--address", default=None, metavar="ADDR",
                   help="join a Ray cluster: 'auto' or HOST:PORT (default: embedded local Ray, "
                        "or RAY_ADDRESS if set)")
    p.add_argument("--num-workers", type=int, default=None, metavar="N",
                   help="Ray tasks in flight (default: all CPUs)")
    p.add_argument("--num-cpus", type=int, default=None, metavar="N",
                   help="CPUs for the embedded local Ray (default: all)")
    return p


def cmd_verify(args: argparse.Namespace) -> int:
    """Run ``verify`` for parsed ``distmerge verify`` arguments; print the verdict line; 0 if OK, 1 if not.

    Raises:
        DistmergeError: bad inputs or options (the CLI prints it as one line and exits 1).

    Example:
        >>> # code = cmd_verify(parser.parse_args(["verify", "--base", "b", "--lora", "l", "--merged", "m"]))
    """
    weights = args.weight or []
    if weights and len(weights) != len(args.lora):
        raise DistmergeError(f"got {len(args.lora)} --lora but {len(weights)} --weight; give one "
                             "--weight per --lora, in the same order, or none")
    loras = list(zip(args.lora, weights or [1.0] * len(args.lora)))
    rep = verify(args.base, loras, args.merged, alpha=args.alpha, dtype=args.dtype, full=args.full,
                 rows=args.rows, seed=args.seed, address=args.address, num_workers=args.num_workers,
                 num_cpus=args.num_cpus, skip_unmatched=getattr(args, "skip_unmatched", False))
    print(rep.verdict)
    return 0 if rep.ok else 1
