"""Everything checked before Ray starts: the options, the base, the LoRAs and the output location.

A merge that cannot succeed fails here, in well under a second and before the ~5 s Ray start-up or
any write: numbers that mean nothing (a NaN weight, an alpha that overflows float32), output rules
(the base itself, a LoRA input, a non-empty folder), unplaceable LoRA keys and shape mismatches, fp8
refusals (a plan is cut once with one worker to find them), the space the output needs, and the
base folder's files to copy. ``read_inputs`` returns what the rest of the merge works from; the
numbers and choices themselves are checked by ``validate`` (re-exported here).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass

from distmerge.app.options import MergeOptions
from distmerge.app.validate import F32_MAX, check_options, lora_specs, resolve_dtype, validate_options
from distmerge.errors import MatchError, OutputError, UsageError
from distmerge.formats.deltas import moved
from distmerge.formats.normalize import Delta, Unmatched, normalize
from distmerge.inputs import objstore
from distmerge.inputs.checkpoint import BaseCheckpoint, open_base
from distmerge.inputs.ggml import is_quant
from distmerge.inputs.hub import Resolved
from distmerge.inputs.hub import resolve as resolve_reference
from distmerge.inputs.lorafile import open_lora
from distmerge.inputs.objstore import is_s3
from distmerge.inputs.paths import absolute
from distmerge.output.bucket import resolve_bucket_output
from distmerge.output.companions import Companions, find_companions
from distmerge.output.manifest import Manifest, load_previous
from distmerge.output.publish import OutputTarget, manifest_path, part_path, refuse_inputs_as_output, resolve_output
from distmerge.plan.merge_plan import MergePlan, make_plan
from distmerge.plan.parts import as_parts

__all__ = [
    "Gathered",
    "Inputs",
    "Located",
    "check_options",
    "collect_deltas",
    "fetched_roots",
    "locate",
    "lora_reference",
    "lora_specs",
    "read_inputs",
    "resolve_dtype",
    "validate_options",
]

logger = logging.getLogger("distmerge.preflight")  # the name users see in -v logs

#: the largest finite float32: every coefficient is applied in float32


@dataclass
class Gathered:
    """The deltas of every LoRA against the base, what could not be placed, and a summary per file."""

    deltas: list[Delta]
    unmatched: list[tuple[str, Unmatched]]
    loras: list[dict]


def collect_deltas(
    base: BaseCheckpoint, loras: Sequence[tuple[str, float]], *, alpha: float = 1.0, skip_unmatched: bool = False
) -> Gathered:
    """Open and normalize every LoRA against ``base``; enforce the strictness rules.

    Raises:
        MatchError: unplaceable LoRA tensors (unless ``skip_unmatched``), or nothing matched at all.
    """
    deltas: list[Delta] = []
    unmatched: list[tuple[str, Unmatched]] = []
    infos = []
    config = base.model_config()
    for path, weight in loras:
        lf = open_lora(path)
        n = normalize(lf, base.tensors, strength=weight * alpha, base_config=config)
        deltas += n.deltas
        unmatched += [(lf.path, u) for u in n.unmatched]
        infos.append(
            {
                "path": lf.path,
                "layout": n.layout,
                "weight": weight,
                "tensors": len(lf.tensors),
                "pairs": len(n.deltas),
                "unmatched": len(n.unmatched),
                "ranks": sorted({d.rank for d in n.deltas if d.rank is not None}),
                "scales": sorted({round(d.scale, 6) for d in n.deltas}),
            }
        )
        logger.info("%s: layout %s, %d deltas, %d unmatched", lf.path, n.layout, len(n.deltas), len(n.unmatched))
    if not deltas:  # nothing fits: another model's LoRA, and --skip-unmatched would not help
        first = f"; first: '{unmatched[0][1].key}': {unmatched[0][1].reason}" if unmatched else ""
        raise MatchError(
            f"no LoRA tensor matches the base {base.path}: is the LoRA for another model? "
            f"({len(unmatched)} tensor(s) of {', '.join(os.path.basename(p) for p, _ in loras)}, none placed{first})"
        )
    if unmatched and not skip_unmatched:
        p, u = unmatched[0]
        raise MatchError(
            f"{len(unmatched)} LoRA tensor(s) cannot be placed on the base {base.path} "
            f"({len(deltas)} delta(s) can); first: {os.path.basename(p)}: '{u.key}' ({u.reason}). "
            "Pass --skip-unmatched to merge the rest and list these in the report"
        )
    return Gathered(deltas, unmatched, infos)


@dataclass
class Located:
    """The inputs found (Hugging Face references resolved, the base's headers read) and the output
    known not to be one of them: what may be locked."""

    base_ref: Resolved
    base: BaseCheckpoint
    lora_refs: list[tuple[Resolved, float]]
    specs: list[tuple[str, float]]  #: (local path, weight) of each LoRA


@dataclass
class Inputs(Located):
    """What the merge works from, every part of it already checked."""

    gathered: Gathered
    target: OutputTarget
    previous: Manifest | None  #: the interrupted run ``--resume`` continues
    companions: Companions | None  #: the base folder's files to copy (None for a single-file output)
    opts: MergeOptions
    out_code: str | None  #: the output dtype's safetensors code (None: keep the base's)
    plan: MergePlan | None  #: cut for the workers known so far (None: not yet)
    workers: int = 0  #: the tasks in flight ``plan`` was cut for

    def plan_for(self, workers: int) -> MergePlan:
        """The plan for ``workers`` tasks in flight (re-cut only if that number changed); a
        resumed run re-cuts its units exactly as the interrupted one did."""
        if self.plan is None or self.workers != workers:
            self.plan = make_plan(
                self.base,
                self.gathered.deltas,
                out_dtype=self.out_code,
                max_shard_size=self.opts.max_shard_size,
                single_file=self.target.single_file,
                workers=workers,
                unit_size=self.previous.unit_size if self.previous else self.opts.unit_size,
            )
            if is_s3(self.target.directory):  # each unit one part of its shard's upload
                self.plan = as_parts(self.plan)
            self.workers = workers
        return self.plan


def locate(base: str | os.PathLike[str], specs: Sequence[tuple[str, float]], output: str | os.PathLike[str]) -> Located:
    """Resolve the inputs and refuse an output that is one of them, writing nothing anywhere.

    Raises:
        DistmergeError: a base that cannot be read or is one shard of several, a reference not in
            the cache, an output that is an input or inside one.
    """
    base_ref = resolve_reference(base)  # a Hugging Face cache reference becomes its snapshot path
    # absolute: Ray's workers (and a caller's later os.chdir) must read the same files
    base_ck = open_base(absolute(base_ref.local))
    lora_refs = [(lora_reference(p), w) for p, w in specs]
    local = [(os.path.abspath(r.local), w) for r, w in lora_refs]
    where = [str(r.reference) if _fetched(r) else p for (p, _), (r, _) in zip(local, lora_refs)]
    refuse_inputs_as_output(output, base_ck, where)
    return Located(base_ref, base_ck, lora_refs, local)


def lora_reference(path: str) -> Resolved:
    """Where a LoRA is read: an ``s3://`` LoRA (file or adapter folder) from this node's copy
    (``objstore.cached``: downloaded once, whole; LoRAs are small)."""
    if is_s3(path):
        return Resolved(objstore.cached(path), os.fspath(path))
    return resolve_reference(path)


def read_inputs(
    found: Located,
    output: str | os.PathLike[str],
    opts: MergeOptions,
    out_code: str | None,
    *,
    workers: int | None = None,
) -> Inputs:
    """Check the output location, then the LoRAs against the base, in the order a user fixes them,
    and cut the plan: for ``workers`` tasks in flight when that is known before Ray is up, else
    with one (enough for the fp8 refusals and the output's size; ``Inputs.plan_for`` re-cuts it).

    Raises:
        DistmergeError: the first problem found; nothing has been written.
    """
    base_ck, local = found.base, found.specs
    bucket = is_s3(output)
    if bucket:
        target = resolve_bucket_output(os.fspath(output), overwrite=opts.overwrite, resume=opts.resume)
    else:
        target = resolve_output(output, base_ck, [p for p, _ in local], overwrite=opts.overwrite, resume=opts.resume)
    gathered = collect_deltas(base_ck, local, alpha=opts.alpha, skip_unmatched=opts.skip_unmatched)
    _check_coefficients(gathered.deltas)
    gathered.deltas = moved(gathered.deltas, fetched_roots(found.specs, [r for r, _ in found.lora_refs]))
    previous = None if bucket else load_previous(manifest_path(target), opts.resume, target.directory)
    inputs = Inputs(
        found.base_ref, base_ck, found.lora_refs, local, gathered, target, previous, None, opts, out_code, None
    )
    inputs.plan_for(workers or 1)  # fp8 refusals and the output's size, before Ray
    assert inputs.plan is not None  # just cut
    if not bucket:
        check_free_space(inputs.plan, target, keep_parts=previous is not None)
    if out_code is None:
        _say_block_types(inputs.plan, base_ck.path)
    if workers is None:
        inputs.plan = None  # cut again once Ray says how many tasks run at once
    inputs.companions = find_companions(base_ck) if not target.single_file else None
    if out_code == "F8_E5M2":
        logger.warning(
            "--dtype fp8_e5m2: newer ComfyUI reads every scaled_fp8 file as float8_e4m3fn and loads e5m2 "
            "weights above 448 wrong; use --dtype fp8_e4m3fn for ComfyUI"
        )
    return inputs


def fetched_roots(specs: Sequence[tuple[str, float]], refs: Sequence[Resolved]) -> dict[str, str]:
    """The local copy of each ``s3://`` LoRA (``specs``' paths) -> its URL: tasks read the LoRA by
    URL (each node fetches its own copy), so no node needs the driver's."""
    return {path: str(r.reference) for (path, _), r in zip(specs, refs) if _fetched(r)}


def _fetched(ref: Resolved) -> bool:
    """A LoRA read from this node's copy of an ``s3://`` object (its URL is ``ref.reference``)."""
    return bool(ref.reference) and is_s3(str(ref.reference))


def _say_block_types(plan: MergePlan, base: str) -> None:
    """The block types of a GGUF base that ``--dtype keep`` cannot keep, as the plan writes them
    (a K-quant into a GGUF: Q8_0; any block type into safetensors: bf16), said once, before any work."""
    changed = {t.src_dtype: t.out_dtype for u in plan.units for t in u.tensors if is_quant(t.src_dtype)}
    for src, dst in sorted(changed.items()):
        if src == dst:
            continue
        why = "gguf-py cannot write it" if is_quant(dst) else "safetensors has no GGML block types"
        logger.warning(
            "%s: its %s tensors are written as %s (%s); choose another type with --dtype",
            base,
            src,
            dst,
            why,
        )


def _check_coefficients(deltas: Sequence[Delta]) -> None:
    """Every delta's coefficient (format scale x weight x alpha) must be a finite float32."""
    for d in deltas:
        if not math.isfinite(d.coef) or abs(d.coef) > F32_MAX:
            raise UsageError(
                f"{d.source}: the coefficient of '{d.target}' (scale {d.scale:g} x weight "
                f"{d.strength:g}) is {d.coef:g}, beyond float32; lower --weight or --alpha"
            )


def _existing_ancestor(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def check_free_space(plan: MergePlan, target: OutputTarget, *, keep_parts: bool = False) -> None:
    """Refuse an output that cannot fit: every shard is reserved in full before any task runs
    (parts a resumed run keeps already hold their space).

    Raises:
        OutputError: ``No space left on device``, with what is needed and what is free.
    """
    need = 0
    for s in plan.shards:
        part = part_path(target.directory, s.name)
        need += s.size - (os.path.getsize(part) if keep_parts and os.path.isfile(part) else 0)
    free = shutil.disk_usage(_existing_ancestor(target.directory)).free
    if need > free:
        raise OutputError(
            f"{target.directory}: No space left on device for the output: it needs "
            f"{need / 1e9:.3f} GB, {free / 1e9:.3f} GB are free"
        )
