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
  scale); the input scales ``--dtype fp8_*`` adds must be exactly 1.0;
* checksums: when the index records ``metadata.distmerge.crc32`` or ``.sha256`` (a single-file
  output: a ``<file>.crc32`` or ``<file>.sha256`` sidecar, ``HEX  NAME``), every shard's checksum
  must match, which catches a changed byte outside the sampled rows too. Missing checksums are
  noted, not a failure.

The verdict reports what was seen, not what was allowed: the worst ulp distance of any compared
value (those that passed by the allowance included), how many values needed the allowance, and the
worst error relative to its tensor's largest value. Values in failure messages carry enough digits
to differ and their bits in hex.

The work runs as Ray tasks on the job driver (``app.driver``): one task per shard to hash, and
byte-balanced groups of tensors to compare (``tasks.checks``); each returns small metadata only.

Example (needs a merge output, so not run here):
``verify_output("merged/low_noise_model").verdict`` re-checks an output against its recorded
recipe; ``verify("Wan2.2/low_noise_model", ["diffusion_module.pth"], "merged/low_noise_model",
dtype="bf16")`` checks it against inputs given by hand (``options=VerifyOptions(...)`` likewise).
"""

from __future__ import annotations

import argparse
import logging
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from distmerge.app.driver import Job, JobOutcome, RunOptions, run_job, with_keywords
from distmerge.app.flags import add_verify_parser
from distmerge.app.preflight import collect_deltas, fetched_roots, lora_reference, lora_specs, resolve_dtype
from distmerge.app.recipe import (
    Recipe,
    RecordedLora,
    by_hand,
    code_of_flag,
    flag_of_code,
    merged_arg,
    recorded_dtype,
    recorded_inputs,
)
from distmerge.app.recipe import read_recipe as read_recipe  # public here too, as before
from distmerge.app.report import VerifyReport
from distmerge.errors import FormatError, PlanError
from distmerge.formats.deltas import moved
from distmerge.formats.normalize import Delta
from distmerge.inputs.checkpoint import BaseCheckpoint, open_base
from distmerge.inputs.gguffile import is_gguf_name
from distmerge.inputs.header import Header
from distmerge.inputs.hub import local_path
from distmerge.inputs.paths import absolute
from distmerge.output.recorded import Recorded, checksum_mismatches, recorded_checksums
from distmerge.output.staging import NoStaging
from distmerge.plan.fp8 import ScaledLayout, scaled_layout
from distmerge.plan.merge_plan import deltas_by_target
from distmerge.plan.units import partition_units, target_unit_bytes
from distmerge.tasks.checks import CheckGroup, GroupResult, TensorCheck, check_group
from distmerge.tasks.compare import CHECKSUM, NEAR, STRUCTURE

if TYPE_CHECKING:
    from distmerge.cluster import Call, DispatchSettings

__all__ = [
    "Recipe",
    "RecordedLora",
    "VerifyJob",
    "VerifyOptions",
    "VerifyReport",
    "add_verify_parser",
    "cmd_verify",
    "read_recipe",
    "verify",
    "verify_output",
]

logger = logging.getLogger("distmerge.verify")  # the name users see in -v logs

Finding = tuple[int, int, str]  #: (rank, ulp, one-line message); lower ranks are more serious


@dataclass(frozen=True)
class VerifyOptions:
    """What to check an output against, and how closely (besides its base and LoRAs)."""

    alpha: float = 1.0  #: as given to ``merge``
    dtype: Any = None  #: the output dtype ``merge`` was given (``bf16``, a torch dtype; None: keep)
    full: bool = False  #: recompute every row of every merged tensor, not a sample
    rows: int = 32  #: rows sampled per merged tensor (seeded by ``seed`` and the key)
    seed: int = 0
    skip_unmatched: bool = False  #: as given to ``merge``
    group_size: int | str | None = None  #: target bytes read per check task (default: total / (4 · workers))


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
    """Keys, shapes and dtypes of ``out`` against the base (and the new tensors of scaled fp8)."""
    msgs, new = [], fp8.new_tensors()
    wrong = {k: (got, want) for k, got, want, _ in _dtype_mismatches(base, out, fp8)}
    for k, b in base.tensors.items():
        o = out.tensors.get(k)
        if o is None:
            msgs.append(f"{out.path}: key '{k}' of the base is missing")
            continue
        if o.shape != b.shape:
            msgs.append(f"{o.path}: '{k}' has shape {list(o.shape)}, expected {list(b.shape)} as in the base")
        if k in wrong:
            msgs.append(_dtype_message(o.path, k, *wrong[k]))
    for k, (code, shape) in new.items():
        o = out.tensors.get(k)
        if o is None:
            want = f"a new {code} {list(shape)} for --dtype {fp8.out_dtype}"
            msgs.append(f"{out.path}: key '{k}' is missing (expected {want})")
        elif (o.dtype, o.shape) != (code, shape):
            msgs.append(f"{o.path}: '{k}' is {o.dtype} {list(o.shape)}, expected {code} {list(shape)}")
    extra = [(k, o) for k, o in out.tensors.items() if k not in base.tensors and k not in new]
    msgs += [f"{o.path}: extra key '{k}' is not in the base" for k, o in extra]
    return [(STRUCTURE, 0, m) for m in msgs]


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
        if code_of_flag(recorded) == used:
            return ""
        return (
            f"(the output was written with --dtype {recorded}: pass --dtype {recorded}, or just run "
            f"'distmerge verify {merged}')"
        )
    changed = Counter(got for _, got, _, base in mismatches if got != base)
    guess = flag_of_code(changed.most_common(1)[0][0]) if changed else "keep"
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
    return [(STRUCTURE, 0, f"{msg} {hint}")] + rest


def _tensor_checks(
    base: BaseCheckpoint, out: BaseCheckpoint, fp8: ScaledLayout, by_target: Mapping[str, Sequence[Delta]]
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
        base_scale = base.tensors.get(fp8.scales.get(k, "")) if quant else None
        inp = out.tensors.get(fp8.new_inputs.get(k, ""))  # a new input scale: must be 1.0
        checks.append(TensorCheck(k, b, o, deltas, "scaled" if quant else "", scale, base_scale, inp))
    return checks


def _header_findings(
    base_ck: BaseCheckpoint, out_ck: BaseCheckpoint, fp8: ScaledLayout, out_code: str | None, merged: str
) -> list[Finding]:
    """What the headers alone show: structure, and dtypes other than asked (with a hint)."""
    found = _structure(base_ck, out_ck, fp8)
    mismatches = _dtype_mismatches(base_ck, out_ck, fp8)
    if mismatches:
        hint = _dtype_hint(mismatches, out_code, recorded_dtype(merged), merged)
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


def verify(
    base: str | os.PathLike[str],
    loras: Sequence[object],
    merged: str | os.PathLike[str],
    *,
    options: VerifyOptions | None = None,
    run: RunOptions | None = None,
    **kwargs: Any,
) -> VerifyReport:
    """Check that ``merged`` is ``base`` with ``loras`` merged in (see the module docstring).

    Args:
        base, loras: as given to ``distmerge.merge``.
        merged: the merge output (folder with an index, or a ``.safetensors`` file).
        options: a ``VerifyOptions`` (``alpha``, ``dtype``, ``skip_unmatched`` as for ``merge``;
            ``full``, ``rows``, ``seed``, ``group_size``).
        run: a ``RunOptions``: the Ray session and concurrency (``address``, ``num_workers``,
            ``num_cpus``), as for ``merge``; an initialized Ray session is reused and left running.
        kwargs: fields of either options object by name (``dtype="bf16"``, ``full=True``).

    Returns:
        A ``VerifyReport``; findings about ``merged`` (including a merged checkpoint that cannot be
        opened) make ``ok`` False, they are not raised. A tensor in another dtype than ``dtype``
        asks for gets a hint naming the ``--dtype`` in ``merged``'s recipe, when it has one.

    Raises:
        DistmergeError: the base or a LoRA cannot be read or matched, bad options, Ray problems.
    """
    opts, how = with_keywords("verify", kwargs, options or VerifyOptions(), run or RunOptions())
    if opts.rows < 0:
        raise PlanError(f"--rows must be >= 0, got {opts.rows}")
    # absolute paths: the check tasks run in Ray workers, whose working folder may differ
    base_ck = open_base(absolute(local_path(base))).require_safetensors("verify")
    if is_gguf_name(merged):
        raise FormatError(f"{os.fspath(merged)}: verify reads safetensors outputs, not GGUF")
    refs = [(lora_reference(p), w) for p, w in lora_specs(loras)]
    specs = [(os.path.abspath(r.local), w) for r, w in refs]
    gathered = collect_deltas(base_ck, specs, alpha=opts.alpha, skip_unmatched=opts.skip_unmatched)
    gathered.deltas = moved(gathered.deltas, fetched_roots(specs, [r for r, _ in refs]))
    out_code, report = resolve_dtype(opts.dtype), VerifyReport(output=os.fspath(merged), tensors=len(base_ck.tensors))
    try:
        out_ck = open_base(absolute(merged))
    except FormatError as e:
        return report.finish([(STRUCTURE, 0, str(e))], full=opts.full, rows=opts.rows, near=NEAR)
    report.shards = len(out_ck.files)
    fp8 = scaled_layout(base_ck.tensors, out_code, path=base_ck.path)
    found = _header_findings(base_ck, out_ck, fp8, out_code, os.fspath(merged))
    recorded, problem = recorded_checksums(out_ck)
    found += [(CHECKSUM, 0, problem)] if problem else []
    checks = _tensor_checks(base_ck, out_ck, fp8, deltas_by_target(base_ck, gathered.deltas))
    report.merged = sum(1 for c in checks if c.deltas)
    results = run_job(VerifyJob(checks, out_ck.headers, recorded, opts, replace(how, device="cpu")))
    found, extra = found + _tally(report, results), sum(max(0, r.n_failures - len(r.failures)) for r in results)
    if recorded is not None:
        digests = {os.path.basename(r.hashed): r.digest for r in results if r.hashed and r.digest}
        sum_fails = [(CHECKSUM, 0, m) for m in checksum_mismatches(out_ck, recorded, digests)]
        report.checksums = "mismatch" if (sum_fails or problem) else "match"
        found += sum_fails
    return report.finish(found, full=opts.full, rows=opts.rows, near=NEAR, extra=extra)


@dataclass(frozen=True)
class VerifyPlan:
    """The check tasks of one verify: shards to hash first, then groups of tensors to compare."""

    units: tuple[CheckGroup, ...]
    unit_size: int

    @property
    def total_bytes(self) -> int:
        return sum(g.nbytes for g in self.units)


class VerifyJob(Job[list[GroupResult]]):
    """A verify as the driver runs it: check tasks over the output, nothing written."""

    def __init__(
        self,
        checks: list[TensorCheck],
        files: Sequence[Header],
        recorded: Recorded | None,
        options: VerifyOptions,
        run: RunOptions,
    ) -> None:
        self.checks, self.files, self.recorded, self.options, self.run = checks, files, recorded, options, run

    def plan(self, workers: int) -> VerifyPlan:
        """Every shard hashed (when checksums are recorded); the tensors in groups of about
        ``group_size`` bytes read, consecutive in the merged files (each task reads forward)."""
        o, sizes = self.options, [c.out.nbytes + c.base.nbytes for c in self.checks]
        target = target_unit_bytes(sum(sizes), workers=workers, unit_size=o.group_size)
        algo = self.recorded[0] if self.recorded is not None else ""
        groups = [
            CheckGroup(i, hash_path=h.path, hash_algo=algo, hash_size=h.file_size) for i, h in enumerate(self.files)
        ]
        groups = groups if algo else []
        for start, end in partition_units(sizes, target):
            part = tuple(self.checks[start:end])
            groups.append(CheckGroup(len(groups), part, rows=o.rows, full=o.full, seed=o.seed))
        hashed = sum(1 for g in groups if g.hash_path)
        logger.info(
            "verify: %d tensors in %d check task(s), %d shard(s) to hash",
            len(self.checks),
            len(groups) - hashed,
            hashed,
        )
        return VerifyPlan(tuple(groups), target)

    def staging(self, plan: VerifyPlan, fingerprint: dict[str, Any] | None) -> NoStaging:
        return NoStaging()

    def task(self) -> Callable[[CheckGroup], GroupResult]:
        return check_group

    def call(self, unit: CheckGroup, dest: str, settings: DispatchSettings) -> Call:
        from distmerge.cluster import Call

        what = f"checksum of {os.path.basename(unit.hash_path)}" if unit.hash_path else f"verify group {unit.index}"
        return Call((unit,), what, unit.memory, unit.nbytes)

    def report(self, outcome: JobOutcome) -> list[GroupResult]:
        return [outcome.results[g.index] for g in outcome.plan.units]


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
        alpha = 1.0 if alpha is None else alpha
        return verify(
            base, by_hand(loras, weights), merged, alpha=alpha, dtype=dtype, skip_unmatched=skip_unmatched, **options
        )
    recipe, recorded = recorded_inputs(merged, base=base, loras=loras, weights=weights)
    assert recipe is not None  # base and loras were not both given
    specs = recorded if recorded is not None else by_hand(list(loras or ()), weights)
    given: dict[str, Any] = {
        "alpha": recipe.alpha if alpha is None else alpha,
        "dtype": recipe.dtype if dtype is None else dtype,
    }
    return verify(
        recipe.base if base is None else base,
        specs,
        merged,
        skip_unmatched=skip_unmatched or loras is None,
        **given,
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
    hand = {"base": args.base, "loras": args.lora, "weights": args.weight, "alpha": args.alpha, "dtype": args.dtype}
    how = {n: getattr(args, n) for n in ("full", "rows", "seed", "address", "num_workers", "num_cpus")}
    rep = verify_output(merged_arg(args), skip_unmatched=getattr(args, "skip_unmatched", False), **hand, **how)
    print(rep.verdict)
    return 0 if rep.ok else 1
