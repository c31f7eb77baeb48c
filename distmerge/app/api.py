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
from collections.abc import Callable, Sequence

import torch

from distmerge import __version__
from distmerge.app.preflight import (
    Gathered,
    Inputs,
    collect_deltas,
    locate,
    lora_specs,
    read_inputs,
    resolve_dtype,
    validate_options,
)
from distmerge.app.report import MergeReport, UnitReport
from distmerge.errors import PlanError
from distmerge.formats.naming import detect_naming
from distmerge.output.companions import RECIPE_NAME, config_for_dtype, make_recipe
from distmerge.output.lock import OutputLock
from distmerge.output.manifest import Manifest, fingerprint, fingerprint_changes
from distmerge.output.publish import (
    ShardHasher,
    Staging,
    Writeback,
    abort,
    fsync_files,
    part_path,
    prepare,
    publish,
    shard_crc32s,
)
from distmerge.plan.merge_plan import MergePlan, describe, make_plan
from distmerge.tasks.unit import unit_crc32

__all__ = ["check", "collect_deltas", "lora_specs", "merge", "resolve_dtype"]

logger = logging.getLogger("distmerge.api")  # the name users see in -v logs

ProgressFn = Callable[[int, int, int, int], None]  # units done, units total, bytes done, bytes total


class _Phases:
    """When each driver stage ended (seconds after the merge started), logged at debug level."""

    def __init__(self) -> None:
        self.t0 = time.time()
        self.ends: dict[str, float] = {}

    def mark(self, name: str) -> None:
        self.ends[name] = round(time.time() - self.t0, 3)
        logger.debug("%.2f s: %s", self.ends[name], name)


def merge(
    base: str | os.PathLike[str],
    loras: Sequence[object],
    output: str | os.PathLike[str],
    *,
    alpha: float = 1.0,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    skip_unmatched: bool = False,
    overwrite: bool = False,
    address: str | None = None,
    num_workers: int | None = None,
    device: str = "auto",
    report: str | os.PathLike[str] | None = None,
    unit_size: int | str | None = None,
    max_retries: int = 3,
    num_cpus: int | None = None,
    resume: bool = False,
    placement_groups: object = None,
    progress: ProgressFn | None = None,
    checksum: str = "crc32",
) -> MergeReport:
    """Merge LoRA(s) into a base checkpoint with Ray tasks and publish the result atomically.

    Args:
        base: ``.safetensors`` file, HF sharded folder (with ``*.safetensors.index.json``) or a
            folder with one ``.safetensors``.
        loras: paths, or ``(path, weight)`` pairs; each LoRA's deltas are multiplied by its weight.
        output: a folder (sharded output + index) or a path ending in ``.safetensors`` (one file).
        alpha: global multiplier on every delta (the seed script's ``--alpha``).
        dtype: output dtype for float tensors: ``None``/``keep``, ``bf16``, ``fp16``, ``fp32``.
        max_shard_size: e.g. ``5GB``; ignored for a single-file output.
        skip_unmatched: merge what matches and report the rest instead of failing.
        overwrite: write into a non-empty output folder / replace an output file.
        address: Ray address (``auto``, ``HOST:PORT``); default embedded local Ray.
        num_workers: tasks in flight (default: all CPUs, or all GPUs on a GPU cluster).
        device: ``auto``, ``cpu`` or ``cuda``.
        report: write the JSON report here.
        unit_size: target bytes per work unit (default: total / (4 · workers)).
        max_retries: Ray retries per task after a worker/node failure.
        num_cpus: CPUs for an embedded local Ray (default: all).
        resume: continue an interrupted run into ``output``: finished work units whose bytes still
            check out are kept; refused if the inputs or options changed.
        placement_groups: run every task inside these Ray placement groups (a list, or ROLL's
            ``pipeline.resource_manager.node2pg``), one task per GPU (or CPU) of each group's first
            bundle, with the GPU pinned explicitly; for merging inside a job that holds the GPUs.
        progress: ``f(units_done, units_total, bytes_done, bytes_total)`` called on the driver.
        checksum: recorded for every shard: ``crc32`` (computed by the tasks as they write, nearly
            free) or ``sha256`` (the Hub's LFS hash; one driver thread re-reads every shard).

    Returns:
        A ``MergeReport``.

    Raises:
        DistmergeError: any input, planning, output or task problem; nothing is published then.
    """
    start = time.perf_counter()
    phases = _Phases()
    # 1. Options, inputs and the output location, all checked before Ray starts or anything is
    #    written; the output stays locked until the result is published (or the run fails).
    specs = lora_specs(loras)
    out_code = validate_options(
        weights=[w for _, w in specs],
        alpha=alpha,
        dtype=dtype,
        max_shard_size=max_shard_size,
        unit_size=unit_size,
        max_retries=max_retries,
        num_workers=num_workers,
        num_cpus=num_cpus,
        checksum=checksum,
        device=device,
    )
    found = locate(base, specs, output)
    # a folder output's parents are created, as `mkdir -p` would; a file's folder must exist
    with OutputLock(output, create_parent=not os.fspath(output).endswith(".safetensors")):
        inputs = read_inputs(
            found,
            output,
            alpha=alpha,
            out_code=out_code,
            skip_unmatched=skip_unmatched,
            overwrite=overwrite,
            resume=resume,
            max_shard_size=max_shard_size,
        )
        return _merge_locked(
            inputs,
            start=start,
            phases=phases,
            alpha=alpha,
            out_code=out_code,
            max_shard_size=max_shard_size,
            address=address,
            num_workers=num_workers,
            device=device,
            report=report,
            unit_size=unit_size,
            max_retries=max_retries,
            num_cpus=num_cpus,
            placement_groups=placement_groups,
            progress=progress,
            checksum=checksum,
        )


def check(
    base: str | os.PathLike[str],
    loras: Sequence[object],
    output: str | os.PathLike[str],
    *,
    alpha: float = 1.0,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    skip_unmatched: bool = False,
    overwrite: bool = False,
    unit_size: int | str | None = None,
    max_retries: int = 3,
    resume: bool = False,
    checksum: str = "crc32",
    **_ignored: object,
) -> Inputs:
    """Everything ``merge`` checks before Ray starts, without Ray and without writing anything
    (``distmerge run --check``). Takes ``merge``'s options; those that only matter once Ray runs
    are ignored.

    Raises:
        DistmergeError: the first problem ``merge`` would stop at before any task runs.
    """
    specs = lora_specs(loras)
    out_code = validate_options(
        weights=[w for _, w in specs],
        alpha=alpha,
        dtype=dtype,
        max_shard_size=max_shard_size,
        unit_size=unit_size,
        max_retries=max_retries,
        checksum=checksum,
    )
    return read_inputs(
        locate(base, specs, output),
        output,
        alpha=alpha,
        out_code=out_code,
        skip_unmatched=skip_unmatched,
        overwrite=overwrite,
        resume=resume,
        max_shard_size=max_shard_size,
    )


def _merge_locked(
    inputs: Inputs,
    *,
    start: float,
    phases: _Phases,
    alpha: float,
    out_code: str | None,
    max_shard_size: int | str,
    address: str | None,
    num_workers: int | None,
    device: str,
    report: str | os.PathLike[str] | None,
    unit_size: int | str | None,
    max_retries: int,
    num_cpus: int | None,
    placement_groups: object,
    progress: ProgressFn | None,
    checksum: str,
) -> MergeReport:
    base_ref, base_ck, lora_refs, gathered = inputs.base_ref, inputs.base, inputs.lora_refs, inputs.gathered
    specs, target, previous, companions = inputs.specs, inputs.target, inputs.previous, inputs.companions
    phases.mark("inputs read")
    from distmerge.cluster import (  # Ray is imported only when there is work
        RaySession,
        check_shared_storage,
        run_units,
    )

    with RaySession(address, num_cpus=num_cpus) as session:
        phases.mark("ray ready")
        settings = session.settings(
            device=device, num_workers=num_workers, max_retries=max_retries, placement_groups=placement_groups
        )
        # 2. The plan: shards, offsets, units (a resumed run re-cuts the units exactly as before).
        plan = make_plan(
            base_ck,
            gathered.deltas,
            out_dtype=out_code,
            max_shard_size=max_shard_size,
            single_file=target.single_file,
            workers=settings.workers,
            unit_size=previous.unit_size if previous else unit_size,
        )
        fp = fingerprint(base_ck, specs, alpha=alpha, out_dtype=out_code, plan=plan)
        if previous is not None:
            changes = fingerprint_changes(previous.fingerprint, fp)
            if changes:
                raise PlanError(
                    f"{target.directory}: cannot resume: {'; '.join(changes)} changed since "
                    "the interrupted run; rerun with --overwrite to start over"
                )
        logger.info(
            "plan: %s on %s (%s, %d in flight)", describe(plan), session.mode, settings.device, settings.workers
        )
        dests = {s.name: part_path(target.directory, s.name) for s in plan.shards}
        phases.mark("planned")
        staging = Staging()
        try:
            # 3. Part files (kept when resuming), the manifest, Ray tasks, checksums, then the
            #    atomic publish (index last).
            recipe = make_recipe(
                base_ck,
                gathered.loras,
                fp,
                naming=detect_naming(base_ck.tensors).name,
                alpha=alpha,
                dtype=out_code,
                version=__version__,
                references=[base_ref] + [r for r, _ in lora_refs],
                skip_unmatched=bool(gathered.unmatched),
            )
            files = dict(companions.files) if companions else {}
            texts = {
                f"{target.single_file}.{RECIPE_NAME}" if target.single_file else RECIPE_NAME: json.dumps(
                    recipe, indent=2
                )
                + "\n"
            }
            config = config_for_dtype(files["config.json"], out_code) if "config.json" in files else None
            if config is not None:  # the config says the merged weights' dtype, not the base's
                texts["config.json"] = config
                del files["config.json"]
            prepare(plan, target, staging, keep_parts=previous is not None, files=files, texts=texts)
            for name, why in companions.skipped if companions else ():
                logger.warning("%s: not copied into the output: %s", os.path.join(base_ck.path, name), why)
            check_shared_storage(list(base_ck.files) + [p for p, _ in specs], target.directory)
            manifest = Manifest(fp, plan.unit_size, path=staging.manifest)
            if previous is not None:
                manifest.units.update(_reusable(plan, previous, dests, settings))
            manifest.save()
            phases.mark("output prepared")
            todo = [u for u in plan.units if u.index not in manifest.units]
            done = {"units": len(manifest.units), "bytes": sum(v["bytes"] for v in manifest.units.values())}
            hasher = ShardHasher(plan, dests) if checksum == "sha256" else None
            writeback = Writeback() if hasher is None else None  # the hasher fsyncs shard by shard
            start_of = {u.index: u.tensors[0].out_offset for u in plan.units if u.tensors}
            for index in manifest.units:
                if hasher:
                    hasher.unit_done(index)

            def on_done(res) -> None:
                manifest.record(res.index, crc32=res.crc32, nbytes=res.nbytes)
                manifest.save()
                if hasher:
                    hasher.unit_done(res.index)
                elif writeback and res.index in start_of:
                    writeback.unit_done(dests[res.shard], start_of[res.index], res.nbytes)
                done["units"] += 1
                done["bytes"] += res.nbytes
                if progress:
                    progress(done["units"], len(plan.units), done["bytes"], plan.total_size)

            if progress:
                progress(done["units"], len(plan.units), done["bytes"], plan.total_size)
            try:
                # O_DIRECT only while nothing reads the part files: the SHA-256 hasher reads shards
                # as units finish, and a resume has just read the kept units (cached pages over
                # blocks written directly could go stale if their invalidation raced a cached write)
                results = run_units(
                    todo, dests, settings=settings, on_done=on_done, direct_io=hasher is None and previous is None
                )
                phases.mark("units done")
                if hasher:
                    sums = hasher.digests()  # each shard fsynced once hashed
                else:
                    sums = shard_crc32s(plan, {i: v["crc32"] for i, v in manifest.units.items()})
                    assert writeback is not None  # always set without a hasher
                    writeback.close()
                    fsync_files(list(dests.values()))
                phases.mark("checksums done")
            finally:
                if hasher:
                    hasher.close()
                if writeback:
                    assert writeback is not None  # always set without a hasher
                    writeback.close()
            shards = publish(
                plan,
                target,
                staging,
                extra_metadata={"version": __version__, "recipe": recipe},
                checksums=(checksum, sums),
            )
            phases.mark("published")
        except BaseException:
            abort(plan, target, staging)
            raise
        ray_info = {"mode": session.mode, "device": settings.device, "workers": settings.workers}

    phases.mark("ray closed")
    rep = _report(plan, target, shards, results, gathered, time.perf_counter() - start, ray_info, phases)
    rep.units_reused = len(plan.units) - len(todo)
    rep.base_naming = recipe["base"]["naming"]
    if companions is not None:
        rep.files_copied = sorted(companions.files)
        rep.files_skipped = [{"name": n, "reason": why} for n, why in companions.skipped]
    if report:
        rep.write_json(report)
    return rep


def _reusable(plan: MergePlan, previous: Manifest, dests: dict[str, str], settings) -> dict[int, dict[str, int]]:
    """Units of the interrupted run whose bytes still check out (CRC of computed bytes, copies equal
    to the base), checked by Ray tasks."""
    from distmerge.cluster import Call, run_calls

    units = [u for u in plan.units if u.index in previous.units and previous.units[u.index]["bytes"] == u.nbytes]
    checks = run_calls(
        unit_crc32,
        [Call((u, dests[u.shard]), f"resume check of unit {u.index}", size=u.nbytes) for u in units],
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
    plan: MergePlan, target, shards, results, gathered: Gathered, seconds: float, ray_info: dict, phases: _Phases
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
    n_tensors = sum(len(s.keys) for s in plan.shards)
    return MergeReport(
        output=out,
        pairs_merged=len(gathered.deltas),
        tensors_written=n_tensors,
        tensors_merged=sum(r.merged for r in results),
        shards=shards,
        total_bytes=plan.total_size,
        seconds=round(seconds, 3),
        unmatched=[{"file": p, "key": u.key, "reason": u.reason} for p, u in gathered.unmatched],
        loras=gathered.loras,
        units=units,
        ray=ray_info,
        phases=dict(phases.ends),
    )
