"""The driver: ``merge()`` runs the whole job (headers -> deltas -> plan -> Ray tasks -> publish).

Example:
        import distmerge
        report = distmerge.merge("Wan2.2-T2V-A14B/low_noise_model", ["diffusion_module.pth"],
                                 "merged/low_noise_model", dtype="bf16")
        print(report.summary_line())
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

from distmerge import __version__
from distmerge.app.driver import Job, JobOutcome, RunOptions, run_job, with_keywords
from distmerge.app.options import MergeOptions
from distmerge.app.preflight import (
    Inputs,
    Located,
    check_options,
    collect_deltas,
    fetched_roots,
    locate,
    lora_specs,
    read_inputs,
)
from distmerge.app.preflight import resolve_dtype as resolve_dtype
from distmerge.app.report import MergeReport, UnitReport
from distmerge.app.validate import check_output_name
from distmerge.formats.naming import detect_naming
from distmerge.inputs.objstore import is_s3
from distmerge.output.bucket import BucketStaging
from distmerge.output.companions import HIDDEN, RECIPE_NAME, config_for_dtype, make_recipe
from distmerge.output.ledger import ProgressFn, UnitLedger
from distmerge.output.lock import OutputLock
from distmerge.output.manifest import checkpoint_headers, fingerprint, lora_sha256
from distmerge.output.staging import ShardStaging
from distmerge.plan.merge_plan import MergePlan, WorkUnit, describe

if TYPE_CHECKING:
    from distmerge.cluster import Call, DispatchSettings, RaySession
    from distmerge.tasks.inline import InlineRunner
    from distmerge.tasks.unit import UnitResult

__all__ = ["MergeJob", "check", "collect_deltas", "lora_specs", "merge", "resolve_dtype"]

Path = str | os.PathLike[str]

logger = logging.getLogger("distmerge.api")  # the name users see in -v logs


def merge(
    base: str | os.PathLike[str],
    loras: Sequence[object],
    output: str | os.PathLike[str],
    *,
    options: MergeOptions | None = None,
    session: RaySession | None = None,
    placement_groups: object = None,
    progress: ProgressFn | None = None,
    **kwargs: Any,
) -> MergeReport:
    """Merge LoRA(s) into a base checkpoint with Ray tasks and publish the result atomically.

    Args:
        base: ``.safetensors`` file, HF sharded folder (with ``*.safetensors.index.json``), a
            folder with one ``.safetensors``, or a Hugging Face cache reference.
        loras: paths, or ``(path, weight)`` pairs; each LoRA's deltas are multiplied by its weight.
        output: a folder (sharded output + index) or a path ending in ``.safetensors`` (one file).
        options: a ``MergeOptions``; keywords (``dtype="bf16"``, ``num_workers=4``, …: every field
            of ``MergeOptions``, the same as the CLI flags) replace its fields.
        session: a ``cluster.RaySession`` the caller owns (``distmerge run`` passes its own); by
            default the merge starts (or joins, or reuses) one and ends it.
        placement_groups: run every task inside these Ray placement groups (a list, or ROLL's
            ``pipeline.resource_manager.node2pg``), one task per GPU (or CPU) of each group's first
            bundle, with the GPU pinned explicitly; for merging inside a job that holds the GPUs.
        progress: ``f(units_done, units_total, bytes_done, bytes_total)`` called on the driver.

    Returns:
        A ``MergeReport``.

    Raises:
        DistmergeError: any input, planning, output or task problem; nothing is published then.
        TypeError: a keyword that is not a ``MergeOptions`` field.
    """
    (opts,) = with_keywords("merge", kwargs, options or MergeOptions())
    job = MergeJob(base, lora_specs(loras), output, opts, placement_groups=placement_groups)
    return run_job(job, session=session, progress=progress)


def check(
    base: Path, loras: Sequence[object], output: Path, *, options: MergeOptions | None = None, **kwargs: Any
) -> Inputs:
    """Everything ``merge`` checks before Ray starts, without Ray and without writing anything
    (``distmerge run --check``). Takes ``merge``'s options; those that only matter once Ray runs
    are ignored.

    Raises:
        DistmergeError: the first problem ``merge`` would stop at before any task runs.
    """
    (opts,) = with_keywords("merge", kwargs, options or MergeOptions())
    specs = lora_specs(loras)
    out_code = check_options(opts, specs)
    check_output_name(output, out_code=out_code, checksum=opts.checksum)
    return read_inputs(locate(base, specs, output), output, opts, out_code)


class MergeJob(Job[MergeReport]):
    """A merge as the driver runs it: ``preflight`` reads and checks the inputs, the plan cuts
    byte-balanced units over output shards, ``ShardStaging`` stages and publishes them."""

    start_ray_first = True  # Ray comes up while the inputs are read and the plan is cut
    fingerprint_labels = {
        "base": "the base checkpoint's headers",
        "loras": "the LoRA files (their list or contents)",
        "weights": "--weight",
        "alpha": "--alpha",
        "dtype": "--dtype",
        "plan": "the output plan (--max-shard-size or output path)",
    }

    def __init__(
        self,
        base: str | os.PathLike[str],
        specs: list[tuple[str, float]],
        output: str | os.PathLike[str],
        opts: MergeOptions,
        *,
        placement_groups: object = None,
    ) -> None:
        self.base_arg, self.specs, self.output_arg, self.opts = base, specs, output, opts
        self.output = os.fspath(output)
        names = ("address", "num_workers", "device", "num_cpus", "max_retries", "unit_size", "overwrite", "resume")
        fields = {n: getattr(opts, n) for n in names}
        self.run = RunOptions(**fields, report=opts.report, placement_groups=placement_groups)
        self.out_code: str | None = None
        self.found: Located | None = None
        self.inputs: Inputs | None = None
        self.lora_hashes: list[dict[str, str]] = []
        self.shards: ShardStaging | None = None
        self.bucket: BucketStaging | None = None
        self.shard_order: dict[str, int] = {}
        self.naming = ""  #: how the base names its tensors (``naming.NAMINGS``), found once the plan is staged

    def check(self) -> None:
        """A usage error answers before Ray is even started."""
        self.out_code = check_options(self.opts, self.specs)
        check_output_name(self.output_arg, out_code=self.out_code, checksum=self.opts.checksum)

    def open(self) -> None:
        self.found = locate(self.base_arg, self.specs, self.output_arg)

    @property
    def to_bucket(self) -> bool:
        """The output is an ``s3://`` URL: written by multipart uploads (``output.bucket``)."""
        return is_s3(self.output_arg)

    def lock(self) -> AbstractContextManager[object]:
        if self.to_bucket:
            return nullcontext()  # a bucket has no lock files: one run per output prefix is the user's to keep
        # the output's parent folders are created, as `mkdir -p` would (a file's as a folder's)
        return OutputLock(self.output_arg, create_parent=True)

    def target(self, workers: int | None) -> None:
        assert self.found is not None  # opened
        self.inputs = read_inputs(self.found, self.output_arg, self.opts, self.out_code, workers=workers)
        self.previous, self.output = self.inputs.previous, self.inputs.target.directory

    @property
    def i(self) -> Inputs:
        assert self.inputs is not None  # target() ran
        return self.inputs

    @property
    def workers(self) -> int:
        return self.i.workers

    def planned(self) -> MergePlan | None:
        return self.i.plan

    def plan(self, workers: int) -> MergePlan:
        return self.i.plan_for(workers)

    def fingerprint(self, plan: MergePlan) -> dict[str, Any] | None:
        """What decides the output bytes; a resumed run must find the same (None for a bucket:
        its uploads are not resumed)."""
        i = self.i
        self.lora_hashes = [{"path": os.path.abspath(p), "sha256": lora_sha256(p)} for p, _ in i.specs]
        if self.to_bucket:
            return None
        shards = [[s.name, hashlib.sha256(s.header).hexdigest()] for s in plan.shards]
        units = [[u.index, u.shard, u.tensors[0].key, u.tensors[-1].key] for u in plan.units]
        return fingerprint(
            base=checkpoint_headers(i.base),
            loras=self.lora_hashes,
            weights=[w for _, w in i.specs],
            alpha=self.opts.alpha,
            dtype=i.out_code or "keep",
            plan=[shards, units],
        )

    def staging(self, plan: MergePlan, fingerprint: dict[str, Any] | None) -> ShardStaging | BucketStaging:
        """Part files (kept when resuming), the recipe and the base folder's files, staged."""
        i = self.i
        logger.info("plan: %s", describe(plan))
        self.shard_order = {s.name: n for n, s in enumerate(plan.shards)}
        self.naming = detect_naming(i.base.tensors).name
        recipe = make_recipe(
            i.base,
            [{**summary, **hashed} for summary, hashed in zip(i.gathered.loras, self.lora_hashes)],
            naming=self.naming,
            alpha=self.opts.alpha,
            dtype=i.out_code,
            version=__version__,
            references=[i.base_ref] + [r for r, _ in i.lora_refs],
            skip_unmatched=bool(i.gathered.unmatched),
        )
        files = dict(i.companions.files) if i.companions else {}
        name = f"{i.target.single_file}.{RECIPE_NAME}" if i.target.single_file else RECIPE_NAME
        texts = {name: json.dumps(recipe, indent=2) + "\n"}
        config = config_for_dtype(files["config.json"], i.out_code) if "config.json" in files else None
        if config is not None:  # the config says the merged weights' dtype, not the base's
            texts["config.json"] = config
            del files["config.json"]
        for skipped, why in i.companions.skipped if i.companions else ():
            log = logger.info if why == HIDDEN else logger.warning  # listed in the report either way
            log("%s: not copied into the output: %s", os.path.join(i.base.path, skipped), why)
        meta = {"version": __version__, "recipe": recipe}
        if self.to_bucket:
            self.bucket = BucketStaging(i.target, files=files, texts=texts, metadata=meta)
            return self.bucket
        self.shards = ShardStaging(i.target, files=files, texts=texts, metadata=meta, checksum=self.opts.checksum)
        return self.shards

    def shared_paths(self) -> tuple[list[str], str] | None:
        """What every node must see at the same path (objects in a bucket are read and written by
        URL, LoRAs from a bucket fetched by each node)."""
        fetched = fetched_roots(self.i.specs, [r for r, _ in self.i.lora_refs])
        files = [f for f in self.i.base.files if not is_s3(f)] + [p for p, _ in self.i.specs if p not in fetched]
        out = "" if self.to_bucket else self.i.target.directory
        return (files, out) if files or out else None

    @property
    def direct_io(self) -> bool:
        """O_DIRECT only while nothing reads the part files (a resume has just read the kept units:
        cached pages over blocks written directly could go stale if their invalidation raced a
        cached write; the SHA-256 hasher reads shards as units finish)."""
        return self.shards is not None and self.shards.direct_io and self.previous is None

    def task(self) -> Callable[..., UnitResult]:
        if self.to_bucket:
            from distmerge.tasks.upload import upload_unit_task

            return upload_unit_task
        from distmerge.tasks.unit import run_unit_task  # torch: where there is work (a worker imports only it)

        return run_unit_task

    def order(self, units: Sequence[WorkUnit]) -> list[WorkUnit]:
        """Shard by shard and front to back, so each shard's bytes are finished in order (and can be
        checksummed while later ones run)."""
        return sorted(units, key=lambda u: (self.shard_order[u.shard], u.index))

    def call(self, unit: WorkUnit, dest: str, settings: DispatchSettings) -> Call:
        from distmerge.cluster import Call

        args = (
            (unit, self.bucket.part(unit), settings.device)
            if self.bucket
            else (unit, dest, settings.device, self.direct_io)
        )
        where = (self.shard_order[unit.shard], unit.index)
        return Call(args, f"unit-{unit.index} ({unit.shard})", unit.memory, unit.nbytes, order=where)

    def inline(
        self, todo: Sequence[WorkUnit], staging: Any, claim: Callable[[int], bool], ledger: UnitLedger, threads: int = 1
    ) -> InlineRunner | None:
        """Merge units on the driver while Ray starts: the bytes are the same (not into a bucket:
        each unit is a part its task uploads)."""
        from distmerge.tasks.inline import InlineRunner

        if self.to_bucket:
            return None
        of = {u.index: u for u in todo}
        on_done = lambda r: ledger.unit_done(of[r.index], r)  # noqa: E731
        runner = InlineRunner(todo, staging.dests, claim, on_done=on_done, direct_io=self.direct_io, threads=threads)
        return runner.start()

    def report(self, outcome: JobOutcome) -> MergeReport:
        i, plan, phases = self.i, outcome.plan, outcome.phases
        results = sorted(outcome.results.values(), key=lambda r: r.index)
        out = os.path.join(i.target.directory, i.target.single_file) if i.target.single_file else i.target.directory
        rep = MergeReport(
            output=out,
            pairs_merged=len(i.gathered.deltas),
            tensors_written=sum(len(s.keys) for s in plan.shards),
            tensors_merged=sum(r.merged for r in results),
            shards=outcome.published,
            total_bytes=plan.total_size,
            seconds=phases.seconds,
            unmatched=[{"file": p, "key": u.key, "reason": u.reason} for p, u in i.gathered.unmatched],
            loras=i.gathered.loras,
            units=[_unit_report(r, phases.t0) for r in results],
            ray=outcome.ray,
            phases=dict(phases.ends),
            started_at=phases.t0,
            units_reused=len(plan.units) - len(results),
            base_naming=self.naming,
        )
        if i.companions is not None:
            rep.files_copied = sorted(i.companions.files)
            rep.files_skipped = [{"name": n, "reason": why} for n, why in i.companions.skipped]
        return rep


def _unit_report(r: UnitResult, t0: float) -> UnitReport:
    started = round(r.started - t0, 3) if r.started else 0.0
    return UnitReport(
        r.index,
        r.shard,
        r.node_id,
        r.device,
        r.nbytes,
        round(r.seconds, 4),
        r.merged,
        started,
        r.direct_bytes,
        r.direct_read_bytes,
        r.waits,
    )
