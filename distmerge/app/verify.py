"""``distmerge verify``: check a merged checkpoint against its base and LoRA(s), as Ray tasks.

``distmerge verify OUTPUT`` re-checks an output against the recipe it records (``distmerge.json``
in an output folder, ``<file>.distmerge.json`` beside a single-file output, or the index's
``metadata.distmerge.recipe``): the base, the LoRAs with their weights, ``alpha`` and ``dtype``.
``--base``/``--lora``/``--weight``/``--alpha``/``--dtype`` given by hand replace the recorded values.
Before any work the recorded inputs must still exist, and each LoRA whose SHA-256 is recorded must
still have it.

What is checked:

* structure (headers only, on the driver): the same key set, shapes and dtypes as the base (float
  tensors in the expected output ``dtype`` when one is given); tensors in another dtype than
  expected get a hint naming the ``--dtype`` the output was written with;
* untouched tensors: byte-identical to the base (or to the base converted to ``dtype``);
* merged tensors: every value finite, and a seeded random sample of rows (all rows with
  ``full=True``) recomputed in float64 from the base and the LoRA factors, rounded once to the output
  dtype, and compared in ulps. A value passes if it is within 1 ulp (bf16/fp16/fp8) or 16 ulp
  (fp32/fp64) of that reference, or within ``1e-6 · max|ref|`` of it (the near-cancellation
  allowance, where W and ΔW cancel and few bits of the result are left);
* scaled-fp8 tensors (``fp8``): merged ones are dequantized from the base with its scale, the
  reference is divided by the output's scale and compared in fp8 ulps (≤ 1: e4m3fn has 3 mantissa
  bits), and the largest output code must be ±fp8_max (a fresh scale ``amax/448``); tensors
  ``--dtype fp8_*`` quantized without deltas must equal the base quantized (bytes of weight and
  scale);
* checksums: when the index records ``metadata.distmerge.crc32`` or ``.sha256`` (a single-file
  output: a ``<file>.crc32`` or ``<file>.sha256`` sidecar, ``HEX  NAME``), every shard's checksum
  must match, which catches a changed byte outside the sampled rows too. Missing checksums are
  noted, not a failure.

The verdict reports what was seen, not what was allowed: the worst ulp distance of any compared
value (those that passed by the allowance included), how many values needed the allowance, and the
worst error relative to its tensor's largest value. Values in failure messages carry enough digits
to differ and their bits in hex.

The work runs as Ray tasks through ``cluster.run_calls``: one task per shard to hash, and
byte-balanced groups of tensors to compare; each task returns small metadata only.

Example (needs a merge output, so not run here):
``verify_output("merged/low_noise_model").verdict`` re-checks an output against its recorded
recipe; ``verify("Wan2.2/low_noise_model", ["diffusion_module.pth"], "merged/low_noise_model",
dtype="bf16")`` checks it against inputs given by hand.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from distmerge.app.flags import add_verify_parser
from distmerge.app.preflight import collect_deltas, lora_specs, resolve_dtype
from distmerge.app.recipe import (
    Recipe,
    RecordedLora,
    _by_hand,
    _code,
    _dtype_flag,
    _recorded_dtype,
    merged_arg,
    recorded_inputs,
)
from distmerge.app.recipe import read_recipe as read_recipe  # public here too, as before
from distmerge.errors import FormatError, PlanError
from distmerge.formats.normalize import Delta
from distmerge.inputs.checkpoint import INDEX_SUFFIX, BaseCheckpoint, open_base
from distmerge.inputs.hub import local_path
from distmerge.plan.fp8 import ScaledLayout, scaled_layout
from distmerge.plan.merge_plan import partition_units
from distmerge.tasks.checks import (
    _CHECKSUM,
    _CHUNK,
    _NEAR,
    _STRUCTURE,
    CheckGroup,
    TensorCheck,
    ValueStats,
    check_group,
)
from distmerge.tasks.checksum import ALGORITHMS

__all__ = [
    "Recipe",
    "RecordedLora",
    "VerifyReport",
    "add_verify_parser",
    "cmd_verify",
    "read_recipe",
    "verify",
    "verify_output",
]

logger = logging.getLogger("distmerge.verify")  # the name users see in -v logs

Finding = tuple[int, int, str]  #: (rank, ulp, one-line message); lower ranks are more serious

# ----------------------------------------------------------------------------------------------
# Driver side


@dataclass
class VerifyReport:
    """The outcome of ``verify``: ``ok`` and the one-line ``verdict`` (what the CLI prints)."""

    ok: bool
    verdict: str
    worst_ulp: int = 0  #: the largest ulp distance of any compared value, allowance or not
    worst_key: str = ""
    near: int = 0  #: values beyond the ulp tolerance that passed by the near-cancellation allowance
    worst_rel: float = 0.0  #: the largest ``|out - ref|`` relative to its tensor's ``max|ref|``
    worst_rel_key: str = ""
    values: int = 0  #: values recomputed and compared
    tensors: int = 0  #: tensors of the base
    merged: int = 0  #: tensors with deltas (recomputed)
    failures: list[str] = field(default_factory=list)  #: most serious first
    checksums: str = "missing"  #: ``match``, ``missing`` or ``mismatch``
    shards: int = 0  #: files of the merged checkpoint
    rows_compared: int = 0

    def add_stats(self, s: ValueStats) -> None:
        """Fold one task's statistics into the report."""
        mine = ValueStats(
            self.values, self.worst_ulp, self.worst_key, self.near, self.worst_rel, self.worst_rel_key
        ).merge(s)
        self.values, self.worst_ulp, self.worst_key = mine.values, mine.worst_ulp, mine.worst_key
        self.near, self.worst_rel, self.worst_rel_key = mine.near, mine.worst_rel, mine.worst_rel_key


def _dtype_message(path: str, key: str, got: str, want: str) -> str:
    return f"{path}: '{key}' has dtype {got}, expected {want}"


def _dtype_mismatches(base: BaseCheckpoint, out: BaseCheckpoint, fp8: ScaledLayout) -> list[tuple[str, str, str, str]]:
    """``(key, output dtype, expected dtype, base dtype)`` of every tensor in the wrong dtype."""
    found = []
    for k, b in base.tensors.items():
        o = out.tensors.get(k)
        if o is not None and o.dtype != fp8.out_code(k, b.dtype):
            found.append((k, o.dtype, fp8.out_code(k, b.dtype), b.dtype))
    return found


def _structure(base: BaseCheckpoint, out: BaseCheckpoint, fp8: ScaledLayout) -> list[Finding]:
    fails = []
    new = fp8.new_tensors()
    wrong = {k: (got, want) for k, got, want, _ in _dtype_mismatches(base, out, fp8)}
    for k, b in base.tensors.items():
        o = out.tensors.get(k)
        if o is None:
            fails.append((_STRUCTURE, 0, f"{out.path}: key '{k}' of the base is missing"))
            continue
        if o.shape != b.shape:
            fails.append(
                (_STRUCTURE, 0, (f"{o.path}: '{k}' has shape {list(o.shape)}, expected {list(b.shape)} as in the base"))
            )
        if k in wrong:
            fails.append((_STRUCTURE, 0, _dtype_message(o.path, k, *wrong[k])))
    for k, (code, shape) in new.items():
        o = out.tensors.get(k)
        if o is None:
            fails.append(
                (
                    _STRUCTURE,
                    0,
                    (
                        f"{out.path}: key '{k}' is missing (expected a new {code} "
                        f"{list(shape)} for --dtype {fp8.out_dtype})"
                    ),
                )
            )
        elif (o.dtype, o.shape) != (code, shape):
            fails.append(
                (_STRUCTURE, 0, (f"{o.path}: '{k}' is {o.dtype} {list(o.shape)}, expected {code} {list(shape)}"))
            )
    for k, o in out.tensors.items():
        if k not in base.tensors and k not in new:
            fails.append((_STRUCTURE, 0, f"{o.path}: extra key '{k}' is not in the base"))
    return fails


#: safetensors code -> its ``--dtype`` spelling
def _dtype_hint(
    mismatches: Sequence[tuple[str, str, str, str]], used: str | None, recorded: str | None, merged: str
) -> str:
    """What to add to a dtype mismatch: the ``--dtype`` the output was written with (``recorded``,
    from its recipe; else guessed from the dtypes it holds). Empty when there is no mismatch, or
    when the recorded ``--dtype`` is the one checked (``used``, a code): then the output
    contradicts its own recipe and no flag would help.

    >>> m = [("a.weight", "BF16", "F32", "F32")]
    >>> _dtype_hint(m, None, "bf16", "out")
    "(the output was written with --dtype bf16: pass --dtype bf16, or just run 'distmerge verify out')"
    >>> _dtype_hint(m, None, None, "out")
    '(the output holds BF16 where F32 was expected: was it written with --dtype bf16? then pass it)'
    >>> _dtype_hint(m, "BF16", "bf16", "out")
    ''
    """
    if not mismatches:
        return ""
    if recorded is not None:
        if _code(recorded) == used:
            return ""
        return (
            f"(the output was written with --dtype {recorded}: pass --dtype {recorded}, or just run "
            f"'distmerge verify {merged}')"
        )
    changed = Counter(got for _, got, _, base in mismatches if got != base)
    guess = _dtype_flag(changed.most_common(1)[0][0]) if changed else "keep"
    got, want = Counter((g, w) for _, g, w, _ in mismatches).most_common(1)[0][0]
    return f"(the output holds {got} where {want} was expected: was it written with --dtype {guess}? then pass it)"


def _with_hint(
    found: list[Finding], mismatches: Sequence[tuple[str, str, str, str]], out: BaseCheckpoint, hint: str
) -> list[Finding]:
    """``found`` with ``hint`` added to the first dtype mismatch, moved to the front."""
    if not hint or not mismatches:
        return found
    k, got, want, _ = mismatches[0]
    msg = _dtype_message(out.tensors[k].path, k, got, want)
    rest = [f for f in found if f[2] != msg]
    return [(_STRUCTURE, 0, f"{msg} {hint}")] + rest


def _tensor_checks(
    base: BaseCheckpoint, out: BaseCheckpoint, fp8: ScaledLayout, by_target: dict[str, list[Delta]]
) -> list[TensorCheck]:
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
        checks.append(
            TensorCheck(
                k,
                b,
                o,
                deltas,
                "scaled" if quant else "",
                scale,
                base.tensors.get(fp8.scales.get(k, "")) if quant else None,
            )
        )
    return checks


_SIDECAR_RE = re.compile(r"^([0-9a-fA-F]+) [ *](.+)$")
_HEX_LEN = {"crc32": 8, "sha256": 64}


def _recorded_checksums(out: BaseCheckpoint) -> tuple[tuple[str, dict[str, str]] | None, list[tuple[int, int, str]]]:
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
        if not isinstance(sums, dict) or not all(
            isinstance(v, str) and len(v) == _HEX_LEN[algo] for v in sums.values()
        ):
            return (algo, {}), [
                (
                    _CHECKSUM,
                    0,
                    (
                        f"{path}: metadata.distmerge.{algo} must map shard names "
                        f"to {_HEX_LEN[algo]}-digit hex {algo} values"
                    ),
                )
            ]
        return (algo, {k: v.lower() for k, v in sums.items()}), []
    sides = [(a, f"{out.files[0]}.{a}") for a in ALGORITHMS if os.path.isfile(f"{out.files[0]}.{a}")]
    if len(names) != 1 or not sides:
        return None, []
    algo, side = sides[0]
    try:
        with open(side, encoding="utf-8") as text:
            lines = [ln.strip() for ln in text if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        return (algo, {}), [(_CHECKSUM, 0, f"{side}: cannot read ({type(e).__name__})")]
    sums = {}
    for ln in lines:
        m = _SIDECAR_RE.match(ln)
        if not m or len(m.group(1)) != _HEX_LEN[algo]:
            return (algo, {}), [
                (
                    _CHECKSUM,
                    0,
                    (f"{side}: expected 'HEX  NAME' with a {_HEX_LEN[algo]}-digit {algo}, found {ln[:80]!r}"),
                )
            ]
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
        if (
            c.quant
            or c.deltas
            and not all(
                d.kind in ("diff", "set")
                or (d.kind == "lora" and not d.transpose and not d.dora and len(d.factors) == 2)
                for d in c.deltas
            )
        ):
            peak = max(peak, 4 * _CHUNK + 3 * 8 * c.base.numel)
    return (64 << 20) + peak


def verify(
    base: str | os.PathLike[str],
    loras: Sequence[object],
    merged: str | os.PathLike[str],
    *,
    alpha: float = 1.0,
    dtype: str | torch.dtype | None = None,
    full: bool = False,
    rows: int = 32,
    seed: int = 0,
    address: str | None = None,
    num_workers: int | None = None,
    num_cpus: int | None = None,
    skip_unmatched: bool = False,
    group_size: int | str | None = None,
) -> VerifyReport:
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
        opened) make ``ok`` False, they are not raised. A tensor in another dtype than ``dtype``
        asks for gets a hint naming the ``--dtype`` in ``merged``'s recipe, when it has one.

    Raises:
        DistmergeError: the base or a LoRA cannot be read or matched, bad options, Ray problems.
    """
    if rows < 0:
        raise PlanError(f"--rows must be >= 0, got {rows}")
    # absolute paths: the check tasks run in Ray workers, whose working folder may differ
    base_ck = open_base(os.path.abspath(local_path(base)))
    specs = [(os.path.abspath(local_path(p)), w) for p, w in lora_specs(loras)]
    gathered = collect_deltas(base_ck, specs, alpha=alpha, skip_unmatched=skip_unmatched)
    out_code, report = resolve_dtype(dtype), VerifyReport(ok=False, verdict="", tensors=len(base_ck.tensors))
    try:
        out_ck = open_base(os.path.abspath(os.fspath(merged)))
    except FormatError as e:
        return _finish(report, [(_STRUCTURE, 0, str(e))], full=full, rows=rows)
    report.shards = len(out_ck.files)
    fp8 = scaled_layout(base_ck.tensors, out_code, path=base_ck.path)
    found = _header_findings(base_ck, out_ck, fp8, out_code, os.fspath(merged))
    recorded_by, csum_fails = _recorded_checksums(out_ck)
    found += csum_fails
    checks = _tensor_checks(base_ck, out_ck, fp8, _by_target(gathered.deltas))
    report.merged = sum(1 for c in checks if c.deltas)
    ray_kw: dict[str, Any] = {"address": address, "num_workers": num_workers, "num_cpus": num_cpus}
    results = _run_checks(checks, out_ck, recorded_by, full=full, rows=rows, seed=seed, group_size=group_size, **ray_kw)
    found, extra = found + _tally(report, results), sum(max(0, r.n_failures - len(r.failures)) for r in results)
    if recorded_by is not None:
        sum_fails = _compare_checksums(out_ck, recorded_by, results)
        report.checksums = "mismatch" if (sum_fails or csum_fails) else "match"
        found += sum_fails
    return _finish(report, found, full=full, rows=rows, extra=extra)


def _by_target(deltas: Sequence[Delta]) -> dict[str, list[Delta]]:
    by_target: dict[str, list[Delta]] = {}
    for d in deltas:
        by_target.setdefault(d.target, []).append(d)
    return by_target


def _header_findings(
    base_ck: BaseCheckpoint, out_ck: BaseCheckpoint, fp8: ScaledLayout, out_code: str | None, merged: str
) -> list[Finding]:
    """What the headers alone show: structure, and dtypes other than asked (with a hint)."""
    found = _structure(base_ck, out_ck, fp8)
    mismatches = _dtype_mismatches(base_ck, out_ck, fp8)
    if mismatches:
        hint = _dtype_hint(mismatches, out_code, _recorded_dtype(merged), merged)
        found = _with_hint(found, mismatches, out_ck, hint)
    return found


def _tally(report: VerifyReport, results: list[Any]) -> list[Finding]:
    """Fold the check tasks' counts into ``report``; their findings."""
    found: list[Finding] = []
    for r in results:
        found += list(r.failures)
        report.rows_compared += r.rows_compared
        report.add_stats(r.stats)
    return found


def _run_checks(
    checks: list[TensorCheck],
    out_ck: BaseCheckpoint,
    recorded_by: tuple[str, dict[str, str]] | None,
    *,
    full: bool,
    rows: int,
    seed: int,
    address: str | None,
    num_workers: int | None,
    num_cpus: int | None,
    group_size: int | str | None,
) -> list[Any]:
    """Hash the shards (when checksums are recorded) and compare ``checks``, as Ray tasks."""
    from distmerge.cluster import Call, RaySession, run_calls  # Ray is imported only when there is work

    with RaySession(address, num_cpus=num_cpus) as session:
        settings = session.settings(device="cpu", num_workers=num_workers)
        total = sum(c.out.nbytes + c.base.nbytes for c in checks)
        target = parse_group_size(group_size) if group_size else max(1, math.ceil(total / max(1, 4 * settings.workers)))
        groups: list[CheckGroup] = []
        if recorded_by is not None:
            for f in out_ck.files:
                groups.append(CheckGroup(len(groups), hash_path=f, hash_algo=recorded_by[0]))
        for part in _groups(checks, target):
            groups.append(CheckGroup(len(groups), tuple(part), rows=rows, full=full, seed=seed))
        calls = [
            Call(
                (g,),
                f"verify group {g.index}" if not g.hash_path else f"checksum of {os.path.basename(g.hash_path)}",
                memory=(64 << 20) if g.hash_path else _memory(g.checks),
                size=(
                    os.path.getsize(g.hash_path) if g.hash_path else sum(c.out.nbytes + c.base.nbytes for c in g.checks)
                ),
            )
            for g in groups
        ]
        logger.info(
            "verify: %d tensors in %d check task(s), %d shard(s) to hash on %s",
            len(checks),
            sum(1 for g in groups if not g.hash_path),
            sum(1 for g in groups if g.hash_path),
            session.mode,
        )
        return [res for _, res in run_calls(check_group, calls, settings=settings)]


def _compare_checksums(
    out_ck: BaseCheckpoint, recorded_by: tuple[str, dict[str, str]], results: Sequence[Any]
) -> list[Finding]:
    """Every shard's hash (from ``results``) against the recorded one."""
    algo, recorded = recorded_by
    digests = {os.path.basename(r.hashed): r.digest for r in results if r.hashed and r.digest}
    names = {os.path.basename(f) for f in out_ck.files}
    found: list[Finding] = []
    for f in out_ck.files:
        name = os.path.basename(f)
        want = recorded.get(name)
        if want is None:
            found.append((_CHECKSUM, 0, f"{f}: no {algo} recorded for this shard"))
        elif name in digests and digests[name] != want:
            found.append((_CHECKSUM, 0, (f"{f}: {algo} {digests[name][:12]} does not match the recorded {want[:12]}")))
    for name in recorded:
        if name not in names:
            found.append(
                (
                    _CHECKSUM,
                    0,
                    (f"{out_ck.path}: a {algo} is recorded for '{name}', which is not a shard of this checkpoint"),
                )
            )
    return found


def parse_group_size(size: int | str) -> int:
    """``64MB``, ``1GiB`` or a byte count, as ``--unit-size``."""
    from distmerge.plan.merge_plan import parse_size

    n = parse_size(size)
    if n <= 0:
        raise PlanError(f"group size must be positive, got {size!r}")
    return n


def _one_line(s: str) -> str:
    return " ".join(s.split())


def _values_part(report: VerifyReport) -> str:
    """The verdict's account of the recomputed values: the true worst ulp, the allowance, the worst
    error relative to its tensor's largest value."""
    if not report.worst_key:
        return ""
    near = report.near
    bound = f"{_NEAR:g}".replace("e-0", "e-")
    allowance = (
        f"{near} value{'s' if near != 1 else ''} passed only by the cancellation allowance "
        f"(|error| ≤ {bound} × the tensor's max)"
        if near
        else "no value needed the cancellation allowance"
    )
    return (
        f", worst {report.worst_ulp} ulp ({report.worst_key}), {allowance}, largest error "
        f"{report.worst_rel:.2g} × the tensor's max ({report.worst_rel_key})"
    )


def _finish(report: VerifyReport, found: list[Finding], *, full: bool, rows: int, extra: int = 0) -> VerifyReport:
    found = sorted(found, key=lambda f: (f[0], -f[1]))
    report.failures = [_one_line(m) for _, _, m in found]
    report.ok = not found
    if report.ok:
        sample = "all rows" if full else f"sampled {rows} rows each"
        if report.checksums == "match":
            n = report.shards
            csum = f"{n} shard checksum{'s match' if n != 1 else ' matches'}"
        else:
            csum = (
                "no shard checksums recorded (values outside the compared rows not checked)"
                if not full
                else "no shard checksums recorded"
            )
        report.verdict = (
            f"verify: OK — {report.tensors} tensors, {report.merged} merged ({sample}, "
            f"{report.values} values){_values_part(report)}, {csum}"
        )
    else:
        more = len(found) - 3 + extra
        shown = "; ".join(report.failures[:3])
        report.verdict = f"verify: FAILED — {shown}" + (f"; … {more} more" if more > 0 else "")
    return report


# ----------------------------------------------------------------------------------------------
# The recorded recipe


def verify_output(
    merged: str | os.PathLike[str],
    *,
    base: str | os.PathLike[str] | None = None,
    loras: Sequence[str] | None = None,
    weights: Sequence[float] | None = None,
    alpha: float | None = None,
    dtype: str | None = None,
    skip_unmatched: bool = False,
    **options: Any,
) -> VerifyReport:
    """``verify`` ``merged`` against its recorded recipe, with the arguments given here replacing
    the recorded values (``weights`` alone re-weights the recorded LoRAs).

    With both ``base`` and ``loras`` given the recipe is not needed, and ``alpha``/``dtype`` default
    to 1.0/``keep`` as for ``verify``. Otherwise the recipe must be there and readable, its base and
    LoRAs must still exist, and each LoRA taken from it must still have its recorded SHA-256; the
    LoRAs taken from it imply ``skip_unmatched`` (they merged as they are, so any key without a
    target was skipped by that merge). ``options`` go to ``verify``.

    Raises:
        FormatError: no usable recipe, a recorded input gone or changed (one line each).
        UsageError: ``weights`` that do not match the LoRAs.
    """
    merged = os.fspath(merged)
    if base is not None and loras is not None:
        return verify(
            base,
            _by_hand(loras, weights),
            merged,
            alpha=1.0 if alpha is None else alpha,
            dtype=dtype,
            skip_unmatched=skip_unmatched,
            **options,
        )
    recipe, recorded = recorded_inputs(merged, base=base, loras=loras, weights=weights)
    assert recipe is not None  # base and loras were not both given
    specs = recorded if recorded is not None else _by_hand(list(loras or ()), weights)
    return verify(
        recipe.base if base is None else base,
        specs,
        merged,
        alpha=recipe.alpha if alpha is None else alpha,
        dtype=recipe.dtype if dtype is None else dtype,
        skip_unmatched=skip_unmatched or loras is None,
        **options,
    )


# ----------------------------------------------------------------------------------------------
# Command line


def cmd_verify(args: argparse.Namespace) -> int:
    """Run ``verify`` for parsed ``distmerge verify`` arguments; print the verdict line; 0 if OK, 1 if not.

    Raises:
        DistmergeError: bad inputs or options, no usable recipe (the CLI prints it as one line).

    Example (needs a merge output, so not run here): ``cmd_verify(parser.parse_args(["verify",
    "merged/low_noise_model"]))`` prints ``verify: OK — …`` and returns 0.
    """
    rep = verify_output(
        merged_arg(args),
        base=args.base,
        loras=args.lora,
        weights=args.weight,
        alpha=args.alpha,
        dtype=args.dtype,
        full=args.full,
        rows=args.rows,
        seed=args.seed,
        address=args.address,
        num_workers=args.num_workers,
        num_cpus=args.num_cpus,
        skip_unmatched=getattr(args, "skip_unmatched", False),
    )
    print(rep.verdict)
    return 0 if rep.ok else 1
