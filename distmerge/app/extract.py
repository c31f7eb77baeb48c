"""``distmerge extract``: turn a fine-tune into a LoRA (``tuned − base`` reduced by SVD), as Ray tasks.

The inverse of ``merge``, on the same machinery: both checkpoints are opened header-only and
checked against each other (same keys, shapes, dtypes) before Ray starts; the plan cuts
byte-balanced units (``plan.extract_plan``); each Ray task (``tasks.extract_unit``) reads only its
tensors' byte ranges, reduces every ΔW (GPU when the task has one) and writes a small part file into
a hidden staging folder beside the output; the driver holds only statistics. When every unit is
done the parts are joined into the output (temp file, fsync, rename; for ``--layout peft`` a folder
with ``adapter_model.safetensors`` and ``adapter_config.json``), under the output's lock. Any error
or Ctrl-C removes the staging folder and publishes nothing; after a crash (``kill -9``), ``--resume``
reuses every finished part if the inputs and options are unchanged.

Example:
        from distmerge.app.extract import extract
        rep = extract("Wan2.2-T2V-A14B/low_noise_model", "my-finetune/low_noise_model",
                      "my-finetune-lora.safetensors", rank=64)
        print(rep.summary_line())
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, cast

from distmerge import __version__
from distmerge.app.flags import add_extract_parser  # the grammar lives with the other subcommands
from distmerge.app.report import save_report
from distmerge.app.validate import check_report_path
from distmerge.errors import OutputError, PlanError, UsageError
from distmerge.inputs.checkpoint import BaseCheckpoint, open_base
from distmerge.inputs.hub import local_path
from distmerge.output.atomic import write_atomic
from distmerge.output.lock import OutputLock
from distmerge.plan.extract_plan import (
    LAYOUTS,
    ExtractOptions,
    ExtractPlan,
    ExtractUnit,
    check_pair,
    make_extract_plan,
    peft_adapter_config,
    resolve_out_dtype,
)

if TYPE_CHECKING:  # torch loads only when there is work: ``add_extract_parser`` is the CLI's grammar
    from distmerge.tasks.extract_unit import TensorStats, UnitOutcome

__all__ = ["ExtractReport", "add_extract_parser", "cmd_extract", "extract"]

logger = logging.getLogger("distmerge.extract")  # the name users see in -v logs

ProgressFn = Callable[[int, int, int, int], None]  # units done, units total, bytes done, bytes total
MANIFEST_VERSION = 1
_PEFT_WEIGHTS, _PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"


# --------------------------------------------------------------------------------------------- report


@dataclass
class ExtractReport:
    """What an extraction did: the summary line and the ``--report`` JSON."""

    output: str
    layout: str
    dtype: str
    base: str = ""
    tuned: str = ""
    base_naming: str = ""
    rank: int | None = None
    energy: float | None = None
    exact: bool = False
    min_diff: float = 0.0
    output_bytes: int = 0
    input_bytes: int = 0
    seconds: float = 0.0
    tensors: list[dict[str, Any]] = field(default_factory=list)  #: one ``TensorStats`` per base tensor
    units: list[dict[str, Any]] = field(default_factory=list)
    units_reused: int = 0
    ray: dict[str, Any] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)
    #: keys of full differences a loader leaves out: ``diffusers`` (norms, modulation, conv kernels,
    #: as diffusers' Wan LoRA loader drops them) and ``peft`` (parameters PEFT cannot hold)
    not_loaded_by: dict[str, list[str]] = field(default_factory=dict)

    def count(self, kind: str) -> int:
        return sum(t["kind"] == kind for t in self.tensors)

    @property
    def ranks(self) -> list[int]:
        return [t["rank"] for t in self.tensors if t["kind"] == "lora"]

    @property
    def retained_energy(self) -> float:
        """Of ‖ΔW‖²_F summed over the LoRA matrices, the fraction their factors keep."""
        total = sum(t["norm"] ** 2 for t in self.tensors if t["kind"] == "lora")
        kept = sum(t["energy"] * t["norm"] ** 2 for t in self.tensors if t["kind"] == "lora")
        return kept / total if total > 0 else 1.0

    @property
    def predicted_error(self) -> float:
        """‖ΔW − B·A‖_F / ‖ΔW‖_F over all LoRA matrices together (float32 factors)."""
        return math.sqrt(max(0.0, 1.0 - self.retained_energy))

    def summary_line(self) -> str:
        ranks = self.ranks
        rk = (
            ""
            if not ranks
            else f" (rank {ranks[0]})"
            if min(ranks) == max(ranks)
            else f" (ranks {min(ranks)}-{max(ranks)})"
        )
        full = self.count("diff") + self.count("set")
        reused = f", {self.units_reused} units reused" if self.units_reused else ""
        return (
            f"extracted {len(ranks)} LoRA pairs{rk} and {full} full differences from {len(self.tensors)} tensors "
            f"({self.count('identical')} identical), retained energy {100 * self.retained_energy:.2f}%, "
            f"predicted error {self.predicted_error:.3g}, {self.output_bytes / 1e9:.3f} GB in {self.seconds:.1f} s"
            f"{reused} -> {self.output}"
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(
            lora_pairs=len(self.ranks),
            full_differences=self.count("diff"),
            replacements=self.count("set"),
            identical=self.count("identical"),
            retained_energy=self.retained_energy,
            predicted_error=self.predicted_error,
        )
        return d

    def write_json(self, path: str | os.PathLike[str]) -> bool:
        """``save_report`` of this report (a failure is a warning)."""
        return save_report(self.to_dict(), path)


# --------------------------------------------------------------------------------------------- checks


def _options(
    rank: int | None, energy: float | None, layout: str, dtype: str, min_diff: float, exact: bool
) -> ExtractOptions:
    """The extraction options, checked (``UsageError``: one line, before anything is read)."""
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise UsageError(f"--rank {rank!r} must be a whole number of at least 1")
    if energy is not None and not (isinstance(energy, (int, float)) and 0.0 < float(energy) <= 1.0):
        raise UsageError(f"--energy {energy!r} must be a fraction in (0, 1], e.g. 0.9")
    if rank is None and energy is None:
        raise UsageError("give --rank, --energy, or both (--energy picks the rank per tensor, --rank caps it)")
    if layout not in LAYOUTS:
        raise UsageError(f"--layout {layout!r} is not supported; use one of {', '.join(LAYOUTS)}")
    if not (isinstance(min_diff, (int, float)) and math.isfinite(min_diff) and min_diff >= 0):
        raise UsageError(f"--min-diff {min_diff!r} must be a finite number >= 0")
    return ExtractOptions(
        layout, rank, None if energy is None else float(energy), resolve_out_dtype(dtype), float(min_diff), bool(exact)
    )


@dataclass(frozen=True)
class _Target:
    """Where the result goes and where its parts are staged."""

    path: str  #: the output (a ``.safetensors`` file, or a folder for ``peft``)
    folder: bool
    staging: str  #: hidden folder beside the output holding the unit parts and the manifest

    def part(self, index: int) -> str:
        return os.path.join(self.staging, f"unit-{index:05d}.safetensors")

    @property
    def manifest(self) -> str:
        return os.path.join(self.staging, "manifest.json")


def _target(output: str, layout: str, base: BaseCheckpoint, tuned: BaseCheckpoint) -> _Target:
    """Check the output's form and that it is no input (``OutputError``/``UsageError``, before
    anything is written, even the lock file)."""
    from distmerge.output.publish import refuse_inputs_as_output

    out = refuse_inputs_as_output(output, base, [tuned.path, *tuned.files])
    folder = layout == "peft"
    if folder and out.endswith(".safetensors"):
        raise UsageError(f"{out}: --layout peft writes an adapter folder; give a folder path as --output")
    if not folder and not out.endswith(".safetensors"):
        raise UsageError(f"{out}: --layout {layout} writes one LoRA file; give a path ending in .safetensors")
    parent, name = os.path.split(out)
    t = _Target(out, folder, os.path.join(parent, f".{name}.distmerge-extract"))
    if folder and os.path.exists(out) and not os.path.isdir(out):
        raise OutputError(f"{out}: exists and is not a folder")
    if not folder and os.path.isdir(out):
        raise OutputError(f"{out}: is a folder; a .safetensors output must be a file path")
    return t


def _check_free(t: _Target, *, overwrite: bool, resume: bool) -> None:
    """Under the output's lock: an existing output or an unfinished run's parts need a flag."""
    taken = os.path.exists(t.path) and (not t.folder or bool(os.listdir(t.path)))
    if taken and not overwrite:
        raise OutputError(f"{t.path}: already exists; pass --overwrite to replace it")
    if os.path.exists(t.staging) and not (resume or overwrite):
        raise OutputError(
            f"{t.path}: an unfinished distmerge extract left parts in {t.staging}; pass --resume to continue it, "
            "or --overwrite to start over"
        )


# --------------------------------------------------------------------------------------------- resume


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _headers(c: BaseCheckpoint) -> list:
    """Each file of ``c`` by name and size, with every tensor's dtype, shape and offset."""
    return [
        [os.path.basename(h.path), h.file_size, {k: [t.dtype, list(t.shape), t.offset] for k, t in h.tensors.items()}]
        for h in c.headers
    ]


def _fingerprint(base: BaseCheckpoint, tuned: BaseCheckpoint, plan: ExtractPlan) -> dict[str, str]:
    """Hashes of what decides the output: each checkpoint's headers, the options, the units."""
    return {
        "base": _digest(_headers(base)),
        "tuned": _digest(_headers(tuned)),
        "options": _digest({**plan.options.describe(), "version": MANIFEST_VERSION}),
        "units": _digest([[t.key for t in u.tensors] for u in plan.units]),
    }


_WHAT = {"base": "the base checkpoint", "tuned": "the tuned checkpoint", "options": "the options", "units": "the plan"}


def _previous(t: _Target, resume: bool) -> dict | None:
    """The interrupted run's manifest (``--resume``), or None to start afresh."""
    if not os.path.exists(t.staging):
        return None
    if not resume:  # --overwrite: start over
        shutil.rmtree(t.staging, ignore_errors=True)
        return None
    try:
        with open(t.manifest, encoding="utf-8") as f:
            prev = json.load(f)
        if prev.get("version") != MANIFEST_VERSION:
            raise ValueError("another manifest version")
        return prev
    except (OSError, ValueError) as e:
        logger.warning("%s: cannot read the interrupted run's manifest (%s); starting over", t.manifest, e)
        shutil.rmtree(t.staging, ignore_errors=True)
        return None


def _check_unchanged(t: _Target, previous: dict | None, fp: dict[str, str]) -> None:
    """A resumed run must do the same job as the interrupted one (``PlanError`` naming what changed)."""
    changed = [_WHAT[k] for k, v in fp.items() if previous["fingerprint"].get(k) != v] if previous else []
    if changed:
        raise PlanError(
            f"{t.path}: cannot resume: {', '.join(changed)} changed since the interrupted run; "
            "rerun with --overwrite to start over"
        )


def _reusable(plan: ExtractPlan, t: _Target) -> dict[int, UnitOutcome]:
    """Finished parts of the interrupted run that hold exactly their unit's tensors."""
    from distmerge.tasks.extract_unit import read_part_outcome

    done = {}
    for u in plan.units:
        got = read_part_outcome(t.part(u.index))
        if got is not None and got.index == u.index and [s.key for s in got.tensors] == [x.key for x in u.tensors]:
            done[u.index] = got
    return done


# --------------------------------------------------------------------------------------------- publish


def _metadata(plan: ExtractPlan, base: str, tuned: str) -> dict[str, str]:
    recipe = {
        "distmerge_version": __version__,
        "kind": "extract",
        "base": base,
        "tuned": tuned,
        **plan.options.describe(),
    }
    return {"format": "pt", "distmerge": json.dumps(recipe, sort_keys=True)}


def _publish(plan: ExtractPlan, t: _Target, outcomes: list[UnitOutcome], meta: dict[str, str]) -> int:
    """Join the parts into the output, atomically; returns the bytes of the LoRA weights."""
    parts = [t.part(u.index) for u in plan.units]
    if not t.folder:
        return _publish_file(parts, t.path, meta)
    entries = [(s.module, s.role, s.rank) for o in outcomes for s in o.tensors if s.role]
    config = peft_adapter_config(entries, base_path=os.path.abspath(plan.base), rank=plan.options.rank)
    return _publish_folder(parts, t.path, meta, json.dumps(config, indent=2) + "\n")


def _publish_file(parts: list[str], path: str, meta: dict[str, str]) -> int:
    """The parts joined into the one ``.safetensors`` file ``path`` (temp file, fsync, rename)."""
    from distmerge.output.publish import fsync_dir, part_path  # torch: only when there is work
    from distmerge.tasks.extract_unit import assemble

    directory, name = os.path.split(path)
    tmp = part_path(directory, name)
    try:
        size = assemble(parts, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fsync_dir(directory)
    return size


def _publish_folder(parts: list[str], path: str, meta: dict[str, str], config: str) -> int:
    """The PEFT adapter folder ``path``: a new one appears whole (built beside it, then renamed);
    in an existing one only the two adapter files are replaced, each atomically."""
    from distmerge.output.publish import fsync_dir, part_path
    from distmerge.tasks.extract_unit import assemble

    parent, name = os.path.split(path)
    fresh = not os.path.exists(path)
    where = os.path.join(parent, f".{name}.distmerge-tmp") if fresh else path
    os.makedirs(where, exist_ok=True)
    try:
        weights = part_path(where, _PEFT_WEIGHTS)
        size = assemble(parts, weights, metadata=meta)
        os.replace(weights, os.path.join(where, _PEFT_WEIGHTS))
        write_atomic(os.path.join(where, _PEFT_CONFIG), config, tmp=part_path(where, _PEFT_CONFIG))
        fsync_dir(where)
        if fresh:
            os.rename(where, path)
    except BaseException:
        if fresh:
            shutil.rmtree(where, ignore_errors=True)
        raise
    fsync_dir(parent)
    return size


# --------------------------------------------------------------------------------------------- driver


def extract(
    base: str | os.PathLike[str],
    tuned: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    rank: int | None = 64,
    energy: float | None = None,
    layout: str = "comfy",
    dtype: str = "bf16",
    min_diff: float = 0.0,
    exact: bool = False,
    address: str | None = None,
    num_workers: int | None = None,
    device: str = "auto",
    num_cpus: int | None = None,
    report: str | os.PathLike[str] | None = None,
    progress: ProgressFn | None = None,
    overwrite: bool = False,
    resume: bool = False,
    unit_size: int | str | None = None,
    max_retries: int = 3,
) -> ExtractReport:
    """Extract ``tuned − base`` as a LoRA in ``layout`` and publish it atomically at ``output``.

    Args:
        base, tuned: checkpoints as ``merge`` takes a base (file, HF-indexed folder, HF cache
            reference), with the same keys, shapes and dtypes.
        output: a ``.safetensors`` path; for ``layout="peft"`` an adapter folder.
        rank: the LoRA rank (the cap when ``energy`` is given; ``None``: no cap).
        energy: pick the smallest rank per matrix keeping this fraction of ‖ΔW‖²_F.
        layout: ``comfy``, ``peft``, ``diffusers`` or ``roll`` (see ``plan.extract_plan``).
        dtype: ``bf16``, ``fp16`` or ``fp32`` for the factors and differences.
        min_diff: tensors with max|tuned − base| at most this are identical and skipped.
        exact: ``torch.linalg.svd`` for every matrix instead of the randomized SVD.
        address, num_workers, device, num_cpus, max_retries: Ray, as for ``merge``.
        report: write the JSON report here.
        progress: ``f(units_done, units_total, bytes_done, bytes_total)`` on the driver.
        overwrite: replace an existing output (in a PEFT folder only the two adapter files).
        resume: continue a crashed run into ``output``, reusing its finished units.
        unit_size: target bytes (of both checkpoints) per work unit.

    Raises:
        DistmergeError: bad options, mismatched checkpoints, output problems, task failures;
            nothing is published then.
    """
    start = time.perf_counter()
    opts = _options(rank, energy, layout, dtype, min_diff, exact)
    run = _Run(address, num_workers, device, num_cpus, max_retries, unit_size, resume)
    run.check()
    check_report_path(report)
    base_ck, tuned_ck = _open_pair(base, tuned, opts, unit_size)
    target = _target(os.path.abspath(os.fspath(output)), layout, base_ck, tuned_ck)
    with OutputLock(target.path, create_parent=target.folder):
        _check_free(target, overwrite=overwrite, resume=resume)
        rep = _locked(base_ck, tuned_ck, opts, target, run, start=start, progress=progress)
    if report:
        rep.write_json(report)
    return rep


@dataclass(frozen=True)
class _Run:
    """How the work runs (Ray options, unit size, resume), as ``extract`` got them."""

    address: str | None
    num_workers: int | None
    device: str
    num_cpus: int | None
    max_retries: int
    unit_size: int | str | None
    resume: bool

    def check(self) -> None:
        """The counts and the device (``UsageError``: one line, before anything is read)."""
        for name, value, low in (
            ("--num-workers", self.num_workers, 1),
            ("--num-cpus", self.num_cpus, 1),
            ("--max-retries", self.max_retries, 0),
        ):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise UsageError(f"{name} {value!r} must be a whole number of at least {low}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise UsageError(f"--device {self.device!r} is not supported; use auto, cpu or cuda")


def _open_pair(
    base: str | os.PathLike[str], tuned: str | os.PathLike[str], opts: ExtractOptions, unit_size: int | str | None
) -> tuple[BaseCheckpoint, BaseCheckpoint]:
    """Both checkpoints, header-only, checked against each other and planned once, so that every
    plan error comes before Ray starts."""
    # absolute paths: the tasks run in Ray workers, whose working folder may differ
    base_ck, tuned_ck = open_base(os.path.abspath(local_path(base))), open_base(os.path.abspath(local_path(tuned)))
    check_pair(base_ck, tuned_ck)
    make_extract_plan(base_ck, tuned_ck, opts, unit_size=unit_size)
    return base_ck, tuned_ck


def _locked(
    base: BaseCheckpoint,
    tuned: BaseCheckpoint,
    opts: ExtractOptions,
    target: _Target,
    run: _Run,
    *,
    start: float,
    progress: ProgressFn | None,
) -> ExtractReport:
    from distmerge.cluster import RaySession, check_shared_storage  # Ray only when there is work

    t0 = time.time()
    phases: dict[str, float] = {}
    previous = _previous(target, run.resume)
    with RaySession(run.address, num_cpus=run.num_cpus) as session:
        phases["ray ready"] = round(time.time() - t0, 3)
        settings = session.settings(device=run.device, num_workers=run.num_workers, max_retries=run.max_retries)
        plan = make_extract_plan(
            base, tuned, opts, workers=settings.workers, unit_size=previous["unit_size"] if previous else run.unit_size
        )
        fp = _fingerprint(base, tuned, plan)
        _check_unchanged(target, previous, fp)
        phases["planned"] = round(time.time() - t0, 3)
        try:
            os.makedirs(target.staging, exist_ok=True)
            write_atomic(
                target.manifest,
                json.dumps({"version": MANIFEST_VERSION, "fingerprint": fp, "unit_size": plan.unit_size}) + "\n",
            )
            check_shared_storage(list(base.files) + list(tuned.files), target.staging)
            done = _reusable(plan, target) if previous else {}
            outcomes = _run_units(plan, target, settings, done, progress)
            phases["units done"] = round(time.time() - t0, 3)
            if all(s.kind == "identical" for o in outcomes for s in o.tensors):
                raise PlanError(
                    f"{tuned.path}: no tensor differs from the base {base.path} by more than --min-diff "
                    f"{opts.min_diff:g}; there is no LoRA to extract"
                )
            size = _publish(plan, target, outcomes, _metadata(plan, base.path, tuned.path))
            phases["published"] = round(time.time() - t0, 3)
        except BaseException:
            shutil.rmtree(target.staging, ignore_errors=True)
            raise
        shutil.rmtree(target.staging, ignore_errors=True)
        ray_info = {"mode": session.mode, "device": settings.device, "workers": settings.workers}
    return _report(plan, target, outcomes, size, time.perf_counter() - start, ray_info, phases, len(done))


@dataclass
class _Tally:
    """The outcomes of a run's units as they arrive, and the progress they add up to."""

    plan: ExtractPlan
    todo: list[ExtractUnit]
    got: dict[int, UnitOutcome]  #: unit index -> outcome (the reused units from the start)
    progress: ProgressFn | None = None
    units: int = 0
    nbytes: int = 0

    def __post_init__(self) -> None:
        self.units = len(self.got)
        self.nbytes = sum(u.nbytes for u in self.plan.units if u.index in self.got)
        self.tell()

    def tell(self) -> None:
        if self.progress:
            self.progress(self.units, len(self.plan.units), self.nbytes, self.plan.total_bytes)

    def on_done(self, i: int, node: str, res: object) -> None:
        """``run_calls``' callback: call ``i`` of ``todo`` finished on ``node``."""
        self.got[self.todo[i].index] = replace(cast("UnitOutcome", res), node_id=node)
        self.units += 1
        self.nbytes += self.todo[i].nbytes
        self.tell()

    def outcomes(self) -> list[UnitOutcome]:
        return [self.got[u.index] for u in self.plan.units]


def _run_units(
    plan: ExtractPlan, target: _Target, settings, done: dict[int, UnitOutcome], progress
) -> list[UnitOutcome]:
    """Every unit not already done, as Ray tasks; outcomes in unit order."""
    from distmerge.cluster import Call, run_calls
    from distmerge.tasks import extract_unit

    todo = [u for u in plan.units if u.index not in done]
    tally = _Tally(plan, todo, dict(done), progress)
    calls = [
        Call((u, plan.options, target.part(u.index), settings.device), f"extract-unit-{u.index}", u.memory, u.nbytes)
        for u in todo
    ]
    run_calls(extract_unit.run_extract_unit, calls, settings=settings, on_done=tally.on_done)
    return tally.outcomes()


def _not_loaded(stats: list[TensorStats], layout: str) -> dict[str, list[str]]:
    """Entries diffusers' Wan loader (comfy, diffusers layouts) or PEFT (peft layout) leaves out."""
    pair = (".lora_down.weight", ".lora_A.weight")  # a LoRA, or the zero one beside a lone bias difference
    lora = {s.module for s in stats if s.kind == "lora" or any(e.endswith(pair) for e in s.entries)}
    if layout == "peft":
        return {"peft": [k for s in stats if s.role == "ignored" for k in s.entries]}
    if layout in ("comfy", "diffusers"):
        dropped = [
            k
            for s in stats
            if s.kind in ("diff", "set")
            for k in s.entries
            if not (s.key.endswith(".bias") and s.module in lora)
        ]
        return {"diffusers": dropped}
    return {}


def _report(
    plan: ExtractPlan,
    target: _Target,
    outcomes: list[UnitOutcome],
    size: int,
    seconds: float,
    ray_info: dict,
    phases: dict,
    reused: int,
) -> ExtractReport:
    stats = [s for o in outcomes for s in o.tensors]
    o = plan.options
    units = [
        {
            "index": u.index,
            "node_id": u.node_id,
            "device": u.device,
            "bytes_read": u.nbytes_read,
            "bytes_written": u.nbytes_written,
            "seconds": u.seconds,
            "tensors": len(u.tensors),
        }
        for u in outcomes
    ]
    return ExtractReport(
        output=target.path,
        layout=o.layout,
        dtype=o.out_dtype,
        base=plan.base,
        tuned=plan.tuned,
        base_naming=plan.naming,
        rank=o.rank,
        energy=o.energy,
        exact=o.exact,
        min_diff=o.min_diff,
        output_bytes=size,
        input_bytes=plan.total_bytes,
        seconds=round(seconds, 3),
        tensors=[asdict(s) for s in stats],
        units=units,
        units_reused=reused,
        ray=ray_info,
        phases=phases,
        not_loaded_by=_not_loaded(stats, o.layout),
    )


# --------------------------------------------------------------------------------------------- CLI


#: ``extract`` keywords that the flags of the same name give as they are
_PASSED = (
    "energy",
    "layout",
    "dtype",
    "min_diff",
    "exact",
    "address",
    "num_workers",
    "device",
    "num_cpus",
    "report",
    "overwrite",
    "resume",
    "max_retries",
)


def cmd_extract(args: argparse.Namespace, progress: ProgressFn | None) -> int:
    """Run ``extract`` from parsed arguments; prints the summary line; returns the exit code."""
    rank = args.rank if args.rank is not None else (None if args.energy is not None else 64)
    passed = {name: getattr(args, name) for name in _PASSED}
    rep = extract(args.base, args.tuned, args.output, rank=rank, progress=progress, **passed)
    print(rep.summary_line())
    return 0
