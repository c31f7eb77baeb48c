"""``distmerge extract``: turn a fine-tune into a LoRA (``tuned − base`` reduced by SVD), as Ray tasks.

The inverse of ``merge``, run by the same driver (``app.driver``): both checkpoints are opened
header-only and checked against each other (same keys, shapes, dtypes) before Ray starts; the plan
cuts byte-balanced units (``plan.extract_plan``); each Ray task (``tasks.extract_unit``) reads only
its tensors' byte ranges, reduces every ΔW (GPU when the task has one) and writes a small part file
(``output.parts``); the driver holds only statistics. When every unit is done the parts are joined
into the output (one ``.safetensors``, or for ``--layout peft`` a folder with
``adapter_model.safetensors`` and ``adapter_config.json``), under the output's lock. Any error or
Ctrl-C publishes nothing; after a crash (``kill -9``), ``--resume`` reuses every finished part if
the inputs and options are unchanged.

Example:
        from distmerge.app.extract import extract
        rep = extract("Wan2.2-T2V-A14B/low_noise_model", "my-finetune/low_noise_model",
                      "my-finetune-lora.safetensors", rank=64)
        print(rep.summary_line())
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from distmerge import __version__
from distmerge.app.driver import Job, JobOutcome, RunOptions, run_job, with_keywords
from distmerge.app.flags import add_extract_parser  # the grammar lives with the other subcommands
from distmerge.app.report import ExtractReport
from distmerge.app.validate import check_report_path
from distmerge.errors import PlanError
from distmerge.formats.layouts import not_loaded
from distmerge.inputs.checkpoint import BaseCheckpoint, open_base
from distmerge.inputs.hub import local_path
from distmerge.inputs.paths import absolute, refuse_url
from distmerge.inputs.s3client import is_s3
from distmerge.output.ledger import ProgressFn
from distmerge.output.lock import OutputLock
from distmerge.output.manifest import checkpoint_headers, fingerprint, load_previous
from distmerge.output.parts import PartStaging
from distmerge.plan.extract_plan import (
    ExtractOptions,
    ExtractPlan,
    ExtractUnit,
    check_pair,
    make_extract_plan,
    peft_adapter_config,
)

if TYPE_CHECKING:  # torch loads only when there is work: ``add_extract_parser`` is the CLI's grammar
    from distmerge.cluster import Call, DispatchSettings
    from distmerge.tasks.extract_unit import UnitOutcome

__all__ = [
    "ExtractJob",
    "ExtractOptions",
    "ExtractReport",
    "RunOptions",
    "add_extract_parser",
    "cmd_extract",
    "extract",
]


def extract(
    base: str | os.PathLike[str],
    tuned: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    options: ExtractOptions | None = None,
    run: RunOptions | None = None,
    progress: ProgressFn | None = None,
    **kwargs: Any,
) -> ExtractReport:
    """Extract ``tuned − base`` as a LoRA and publish it atomically at ``output``.

    Args:
        base, tuned: checkpoints as ``merge`` takes a base (file, HF-indexed folder, HF cache
            reference), with the same keys, shapes and dtypes.
        output: a ``.safetensors`` path; for ``layout="peft"`` an adapter folder.
        options: an ``ExtractOptions`` (``layout``, ``rank``, ``energy``, ``out_dtype``, ``min_diff``,
            ``exact``: see its fields).
        run: a ``RunOptions`` (Ray, ``unit_size``, ``overwrite``: in a PEFT folder only the two
            adapter files are replaced, ``resume``, ``report``: see its fields).
        progress: ``f(units_done, units_total, bytes_done, bytes_total)`` on the driver.
        kwargs: fields of either options object by name (``rank=16``, ``resume=True``; ``dtype`` is
            ``out_dtype``), as the CLI flags give them.

    Raises:
        DistmergeError: bad options, mismatched checkpoints, output problems, task failures;
            nothing is published then.
        TypeError: a keyword that is no field of either options object.
    """
    if "dtype" in kwargs:
        kwargs["out_dtype"] = kwargs.pop("dtype")
    opts, how = with_keywords("extract", kwargs, options or ExtractOptions(), run or RunOptions())
    return run_job(ExtractJob(base, tuned, output, opts, how), progress=progress)


class ExtractJob(Job[ExtractReport]):
    """An extraction as the driver runs it: both checkpoints planned into units, one part per unit."""

    fingerprint_labels = {
        "base": "the base checkpoint",
        "tuned": "the tuned checkpoint",
        "options": "the options",
        "units": "the plan",
    }

    def __init__(
        self,
        base: str | os.PathLike[str],
        tuned: str | os.PathLike[str],
        output: str | os.PathLike[str],
        options: ExtractOptions,
        run: RunOptions,
    ) -> None:
        self.args, self.options, self.run = (base, tuned, output), options, run
        self.output = os.path.abspath(os.fspath(output))
        self.parts = PartStaging(self.output, layout=options.layout)
        self.base: BaseCheckpoint | None = None
        self.tuned: BaseCheckpoint | None = None
        self.planned_options = options

    def check(self) -> None:
        """The options, the counts and the device (``UsageError``: one line, before anything is read)."""
        self.options = self.options.checked()
        self.run.check()
        check_report_path(self.run.report)
        refuse_url(self.args[2], "--output")

    def open(self) -> None:
        """Both checkpoints, header-only, checked against each other and planned once (every plan
        error comes before Ray starts); the output's form, and that it is no input."""
        base, tuned = (  # absolute: the workers' working folder differs (an s3:// URL as it is)
            open_base(absolute(local_path(p))).require_safetensors("extract") for p in self.args[:2]
        )
        check_pair(base, tuned)
        make_extract_plan(base, tuned, self.options, unit_size=self.run.unit_size)
        self.base, self.tuned = base, tuned
        self.parts.check_form(base, [tuned.path, *tuned.files])

    def lock(self) -> OutputLock:
        return OutputLock(self.output, create_parent=self.parts.folder)

    def target(self, workers: int | None) -> None:
        self.parts.check_free(overwrite=self.run.overwrite, resume=self.run.resume)
        self.previous = load_previous(self.parts.manifest_path, self.run.resume, self.output)

    def pair(self) -> tuple[BaseCheckpoint, BaseCheckpoint]:
        assert self.base is not None and self.tuned is not None  # opened
        return self.base, self.tuned

    def plan(self, workers: int) -> ExtractPlan:
        unit_size = self.previous.unit_size if self.previous else self.run.unit_size
        plan = make_extract_plan(*self.pair(), self.options, workers=workers, unit_size=unit_size)
        self.planned_options = plan.options
        return plan

    def fingerprint(self, plan: ExtractPlan) -> dict[str, Any]:
        """Each checkpoint's headers, the options, the units."""
        base, tuned = self.pair()
        return fingerprint(
            base=checkpoint_headers(base),
            tuned=checkpoint_headers(tuned),
            options=plan.options.describe(),
            units=[[t.key for t in u.tensors] for u in plan.units],
        )

    def staging(self, plan: ExtractPlan, fingerprint: dict[str, Any] | None) -> PartStaging:
        recipe = {"distmerge_version": __version__, "kind": "extract", "base": plan.base, "tuned": plan.tuned}
        self.parts.metadata = {
            "format": "pt",
            "distmerge": json.dumps({**recipe, **plan.options.describe()}, sort_keys=True),
        }
        self.parts.config = lambda outcomes: _adapter_config(plan, outcomes)
        return self.parts

    def shared_paths(self) -> tuple[list[str], str]:
        """What every node must see at the same path (objects in a bucket are read by URL)."""
        base, tuned = self.pair()
        return [f for f in [*base.files, *tuned.files] if not is_s3(f)], self.parts.staging

    def task(self) -> Callable[..., UnitOutcome]:
        from distmerge.tasks import extract_unit  # torch: only when there is work

        return extract_unit.run_extract_unit

    def call(self, unit: ExtractUnit, dest: str, settings: DispatchSettings) -> Call:
        from distmerge.cluster import Call

        args = (unit, self.planned_options, dest, settings.device)
        return Call(args, f"extract-unit-{unit.index}", unit.memory, unit.nbytes)

    def check_results(self, results: Mapping[int, Any]) -> None:
        if all(s.kind == "identical" for o in results.values() for s in o.tensors):
            base, tuned = self.pair()
            raise PlanError(
                f"{tuned.path}: no tensor differs from the base {base.path} by more than --min-diff "
                f"{self.options.min_diff:g}; there is no LoRA to extract"
            )

    def report(self, outcome: JobOutcome) -> ExtractReport:
        plan: ExtractPlan = outcome.plan
        outcomes = [{**outcome.reused, **outcome.results}[u.index] for u in plan.units]
        stats, o = [s for u in outcomes for s in u.tensors], plan.options
        return ExtractReport(
            output=self.output,
            layout=o.layout,
            dtype=o.out_dtype,
            base=plan.base,
            tuned=plan.tuned,
            base_naming=plan.naming,
            rank=o.rank,
            energy=o.energy,
            exact=o.exact,
            min_diff=o.min_diff,
            output_bytes=self.parts.size,
            input_bytes=plan.total_bytes,
            seconds=outcome.phases.seconds,
            tensors=[asdict(s) for s in stats],
            units=[_unit_entry(u) for u in outcomes],
            units_reused=len(outcome.reused),
            ray=outcome.ray,
            phases=dict(outcome.phases.ends),
            not_loaded_by=not_loaded(stats, o.layout),
        )


def _adapter_config(plan: ExtractPlan, outcomes: Sequence[UnitOutcome]) -> str:
    """The PEFT folder's ``adapter_config.json``, from what the units made of each module."""
    entries = [(s.module, s.role, s.rank) for o in outcomes for s in o.tensors if s.role]
    config = peft_adapter_config(entries, base_path=absolute(plan.base), rank=plan.options.rank)
    return json.dumps(config, indent=2) + "\n"


def _unit_entry(u: UnitOutcome) -> dict[str, Any]:
    return {
        "index": u.index,
        "node_id": u.node_id,
        "device": u.device,
        "bytes_read": u.nbytes_read,
        "bytes_written": u.nbytes_written,
        "seconds": u.seconds,
        "tensors": len(u.tensors),
    }


# --------------------------------------------------------------------------------------------- CLI


def cmd_extract(args: argparse.Namespace, progress: ProgressFn | None) -> int:
    """Run ``extract`` from parsed arguments; prints the summary line; returns the exit code."""
    rank = args.rank if args.rank is not None else (None if args.energy is not None else 64)
    names = ("layout", "energy", "min_diff", "exact")
    options = ExtractOptions(rank=rank, out_dtype=args.dtype, **{n: getattr(args, n) for n in names})
    fields = ("address", "num_workers", "device", "num_cpus", "report", "overwrite", "resume", "max_retries")
    rep = extract(
        args.base,
        args.tuned,
        args.output,
        options=options,
        run=RunOptions(**{n: getattr(args, n) for n in fields}),
        progress=progress,
    )
    print(rep.summary_line())
    return 0
