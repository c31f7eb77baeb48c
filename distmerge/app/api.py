"""The driver: ``merge()`` runs the whole job (headers -> deltas -> plan -> Ray tasks -> publish).

Example:
        import distmerge
        report = distmerge.merge("Wan2.2-T2V-A14B/low_noise_model", ["diffusion_module.pth"],
                                 "merged/low_noise_model", dtype="bf16")
        print(report.summary_line())
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from distmerge import __version__
from distmerge.app.options import MergeOptions
from distmerge.app.preflight import (
    Gathered,
    Inputs,
    check_options,
    collect_deltas,
    locate,
    lora_specs,
    read_inputs,
    resolve_dtype,
)
from distmerge.app.report import MergeReport, UnitReport
from distmerge.app.validate import check_output_name
from distmerge.errors import PlanError
from distmerge.formats.naming import detect_naming
from distmerge.output.companions import HIDDEN, RECIPE_NAME, config_for_dtype, make_recipe
from distmerge.output.ledger import ProgressFn, UnitLedger
from distmerge.output.lock import OutputLock
from distmerge.output.manifest import Manifest, fingerprint, fingerprint_changes
from distmerge.output.publish import Staging, abort, part_path, prepare, publish
from distmerge.plan.merge_plan import TASK_OVERHEAD_BYTES, MergePlan, describe
from distmerge.tasks.inline import InlineRunner, UnitClaims
from distmerge.tasks.unit import unit_crc32

if TYPE_CHECKING:
    from distmerge.cluster import DispatchSettings, RaySession
    from distmerge.tasks.unit import UnitResult

__all__ = ["check", "collect_deltas", "lora_specs", "merge", "resolve_dtype"]

logger = logging.getLogger("distmerge.api")  # the name users see in -v logs


class _Phases:
    """When each driver stage ended (seconds after the merge started), logged at debug level."""

    def __init__(self) -> None:
        self.t0 = time.time()
        self.start = time.perf_counter()
        self.ends: dict[str, float] = {}

    def mark(self, name: str) -> None:
        self.ends[name] = round(time.time() - self.t0, 3)
        logger.debug("%.2f s: %s", self.ends[name], name)


def _options(options: MergeOptions | None, kwargs: dict[str, Any]) -> MergeOptions:
    """``options`` with ``kwargs`` applied (``merge(..., dtype="bf16")``); unknown names are a
    ``TypeError``, as for any Python call."""
    try:
        return (options or MergeOptions()).replace(**kwargs)
    except TypeError:
        known = {f for f in MergeOptions.__dataclass_fields__}
        bad = sorted(set(kwargs) - known)
        raise TypeError(f"merge() got an unexpected keyword argument {bad[0]!r}") from None


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
    opts, phases = _options(options, kwargs), _Phases()
    specs = lora_specs(loras)
    out_code = check_options(opts, specs)  # a usage error answers before Ray is even started
    check_output_name(output)
    own = session is None
    if session is None:
        from distmerge.cluster import RaySession

        session = RaySession(opts.address, num_cpus=opts.num_cpus)
    session.start()  # Ray comes up while the inputs are read and the plan is cut
    try:
        found = locate(base, specs, output)
        # the output's parent folders are created, as `mkdir -p` would (a file's as a folder's)
        with OutputLock(output, create_parent=True):
            workers = session.expected_workers(opts.num_workers, opts.device) if not placement_groups else None
            inputs = read_inputs(found, output, opts, out_code, workers=workers)
            phases.mark("inputs read")
            return _Merge(inputs, session, phases, placement_groups, progress).run()
    finally:
        if own:
            session.close()


def check(
    base: str | os.PathLike[str],
    loras: Sequence[object],
    output: str | os.PathLike[str],
    *,
    options: MergeOptions | None = None,
    **kwargs: Any,
) -> Inputs:
    """Everything ``merge`` checks before Ray starts, without Ray and without writing anything
    (``distmerge run --check``). Takes ``merge``'s options; those that only matter once Ray runs
    are ignored.

    Raises:
        DistmergeError: the first problem ``merge`` would stop at before any task runs.
    """
    opts = _options(options, kwargs)
    specs = lora_specs(loras)
    out_code = check_options(opts, specs)
    check_output_name(output)
    return read_inputs(locate(base, specs, output), output, opts, out_code)


class _Merge:
    """One merge once its inputs are read and its output locked: plan, parts, units, publish."""

    def __init__(
        self,
        inputs: Inputs,
        session: RaySession,
        phases: _Phases,
        placement_groups: object,
        progress: ProgressFn | None,
    ) -> None:
        self.inputs, self.opts, self.session, self.phases = inputs, inputs.opts, session, phases
        self.placement_groups, self.progress = placement_groups, progress
        self.staging = Staging()
        self.settings: DispatchSettings | None = None

    def run(self) -> MergeReport:
        plan = self.inputs.plan or self.inputs.plan_for(self._settings().workers)
        fp = self._fingerprint(plan)
        dests = {s.name: part_path(self.inputs.target.directory, s.name) for s in plan.shards}
        self.phases.mark("planned")
        try:
            recipe = self._prepare(plan, fp)
            ledger = self._ledger(plan, fp, dests)
            try:
                results = self._units(plan, dests, ledger)
                sums = ledger.checksums()
                self.phases.mark("checksums done")
            finally:
                ledger.close()
            shards = publish(
                plan,
                self.inputs.target,
                self.staging,
                extra_metadata={"version": __version__, "recipe": recipe},
                checksums=(self.opts.checksum, sums),
            )
            self.phases.mark("published")
        except BaseException:
            abort(plan, self.inputs.target, self.staging)
            raise
        if self.settings is not None:
            ray_info = {"mode": self.session.mode, "device": self.settings.device, "workers": self.settings.workers}
        else:  # every unit was merged on the driver before Ray came up
            ray_info = {"mode": self.session.mode, "device": "cpu", "workers": self.inputs.workers}
        return self._report(plan, shards, results, ray_info, recipe)

    def _settings(self) -> DispatchSettings:
        """Device and concurrency, from the cluster once Ray is up (waits for it, the first time)."""
        if self.settings is None:
            self.settings = self.session.settings(
                device=self.opts.device,
                num_workers=self.opts.num_workers,
                max_retries=self.opts.max_retries,
                placement_groups=self.placement_groups,
            )
            self.phases.mark("ray ready")
            logger.info("plan on %s (%s, %d in flight)", self.session.mode, self.settings.device, self.settings.workers)
        return self.settings

    def _fingerprint(self, plan: MergePlan) -> dict[str, Any]:
        """What decides the output bytes; a resumed run must find the same."""
        i = self.inputs
        fp = fingerprint(i.base, i.specs, alpha=self.opts.alpha, out_dtype=i.out_code, plan=plan)
        changes = fingerprint_changes(i.previous.fingerprint, fp) if i.previous is not None else []
        if changes:
            raise PlanError(
                f"{i.target.directory}: cannot resume: {'; '.join(changes)} changed since "
                "the interrupted run; rerun with --overwrite to start over"
            )
        return fp

    def _prepare(self, plan: MergePlan, fp: dict[str, Any]) -> dict[str, Any]:
        """Part files (kept when resuming), the recipe and the base folder's files, staged."""
        i = self.inputs
        recipe = make_recipe(
            i.base,
            i.gathered.loras,
            fp,
            naming=detect_naming(i.base.tensors).name,
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
        prepare(plan, i.target, self.staging, keep_parts=i.previous is not None, files=files, texts=texts)
        for skipped, why in i.companions.skipped if i.companions else ():
            log = logger.info if why == HIDDEN else logger.warning  # listed in the report either way
            log("%s: not copied into the output: %s", os.path.join(i.base.path, skipped), why)
        return recipe

    def _ledger(self, plan: MergePlan, fp: dict[str, Any], dests: dict[str, str]) -> UnitLedger:
        """The manifest (with the units a resumed run keeps) and the ledger that records units.
        Every node must see the inputs and the output (an embedded session is one node: this one)."""
        from distmerge.cluster import check_shared_storage

        logger.info("plan: %s", describe(plan))
        if not self.session.local:
            self._settings()
            check_shared_storage(
                list(self.inputs.base.files) + [p for p, _ in self.inputs.specs], self.inputs.target.directory
            )
        manifest = Manifest(fp, plan.unit_size, path=self.staging.manifest)
        if self.inputs.previous is not None:
            manifest.units.update(_reusable(plan, self.inputs.previous, dests, self._settings()))
        manifest.save()
        self.phases.mark("output prepared")
        return UnitLedger(plan, dests, manifest, checksum=self.opts.checksum, progress=self.progress)

    def _units(self, plan: MergePlan, dests: dict[str, str], ledger: UnitLedger) -> list[UnitResult]:
        """Every unit not yet done: on the driver while Ray starts (``tasks.inline``), then as Ray
        tasks. O_DIRECT only while nothing reads the part files (a resume has just read the kept
        units: cached pages over blocks written directly could go stale if their invalidation raced
        a cached write)."""
        from distmerge.app.units import run_units, unit_order

        todo = unit_order([u for u in plan.units if u.index not in ledger.manifest.units], dests)
        direct_io = ledger.direct_io_safe and self.inputs.previous is None
        claims = UnitClaims()
        inline = self._inline(todo, dests, claims, ledger, direct_io)
        try:
            if inline is not None and not self.session.wait_or(inline.finished):
                return self._all_inline(inline)
            settings = self._settings()
            if inline is not None:
                inline.stop()  # Ray is up: its tasks take the units not yet taken
                if inline.failed:
                    inline.join()
            results = run_units(
                todo,
                dests,
                settings=settings,
                on_done=lambda r: ledger.unit_done(r.index, r.shard, r.crc32, r.nbytes),
                direct_io=direct_io,
                claim=claims.claim,
            )
        except BaseException:
            if inline is not None:
                inline.stop()  # an error or Ctrl-C: the driver takes no further unit either
            raise
        done_inline = inline.join() if inline is not None else []
        self.phases.mark("units done")
        return sorted(results + done_inline, key=lambda r: r.index)

    def _all_inline(self, inline: InlineRunner) -> list[UnitResult]:
        """Every unit merged on the driver before Ray's workers were ready: no task needed."""
        done = inline.join()  # raises the error that stopped it
        self.phases.mark("units done")
        return done

    def _inline(
        self, todo: list, dests: dict[str, str], claims: UnitClaims, ledger: UnitLedger, direct_io: bool
    ) -> InlineRunner | None:
        """Start merging units on the driver when Ray is not up yet and will run CPU tasks on this
        machine (an embedded session without GPUs, the plan already cut): bytes are the same.
        Never with ``--device cuda``: every unit then runs on a GPU, or the merge fails saying none is there."""
        if self.session.ready or not self.session.local or self.inputs.previous is not None or self.inputs.plan is None:
            return None
        if self.opts.device == "cuda":
            return None
        if os.environ.get("DISTMERGE_INLINE_UNITS", "1") == "0":
            return None
        on_done = lambda r: ledger.unit_done(r.index, r.shard, r.crc32, r.nbytes)  # noqa: E731
        return InlineRunner(todo, dests, claims, on_done=on_done, direct_io=direct_io).start()

    def _report(
        self, plan: MergePlan, shards: list[str], results: list[UnitResult], ray_info: dict, recipe: dict
    ) -> MergeReport:
        i = self.inputs
        rep = _report(plan, i.target, shards, results, i.gathered, ray_info, self.phases)
        rep.units_reused = len(plan.units) - len(results)
        rep.base_naming = recipe["base"]["naming"]
        if i.companions is not None:
            rep.files_copied = sorted(i.companions.files)
            rep.files_skipped = [{"name": n, "reason": why} for n, why in i.companions.skipped]
        if self.opts.report:
            rep.write_json(self.opts.report)
        return rep


def _reusable(
    plan: MergePlan, previous: Manifest, dests: dict[str, str], settings: DispatchSettings
) -> dict[int, dict[str, int]]:
    """Units of the interrupted run whose bytes still check out (CRC of computed bytes, copies equal
    to the base), checked by Ray tasks."""
    from distmerge.cluster import Call, run_calls

    units = [u for u in plan.units if u.index in previous.units and previous.units[u.index]["bytes"] == u.nbytes]
    checks = run_calls(
        unit_crc32,
        [
            Call((u, dests[u.shard]), f"resume check of unit {u.index}", memory=TASK_OVERHEAD_BYTES, size=u.nbytes)
            for u in units
        ],
        settings=settings,
    )
    ok = {
        u.index: previous.units[u.index]
        for u, (_, crc) in zip(units, checks)
        if crc == previous.units[u.index]["crc32"]
    }
    logger.info("resume: %d of %d units already done", len(ok), len(plan.units))
    return ok


def _report(
    plan: MergePlan, target, shards, results, gathered: Gathered, ray_info: dict, phases: _Phases
) -> MergeReport:
    out = os.path.join(target.directory, target.single_file) if target.single_file else target.directory
    units = [
        UnitReport(
            r.index,
            r.shard,
            r.node_id,
            r.device,
            r.nbytes,
            round(r.seconds, 4),
            r.merged,
            round(r.started - phases.t0, 3) if r.started else 0.0,
            r.direct_bytes,
        )
        for r in results
    ]
    return MergeReport(
        output=out,
        pairs_merged=len(gathered.deltas),
        tensors_written=sum(len(s.keys) for s in plan.shards),
        tensors_merged=sum(r.merged for r in results),
        shards=shards,
        total_bytes=plan.total_size,
        seconds=round(time.perf_counter() - phases.start, 3),
        unmatched=[{"file": p, "key": u.key, "reason": u.reason} for p, u in gathered.unmatched],
        loras=gathered.loras,
        units=units,
        ray=ray_info,
        phases=dict(phases.ends),
        started_at=phases.t0,
    )
