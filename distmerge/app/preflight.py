"""Everything checked before Ray starts: the options, the base, the LoRAs and the output location.

A merge that cannot succeed fails here, in well under a second and before the ~5 s Ray start-up or
any write: numbers that mean nothing (a NaN weight, an alpha that overflows float32), output rules
(the base itself, a LoRA input, a non-empty folder), unplaceable LoRA keys and shape mismatches, fp8
refusals (a plan is cut once with one worker to find them), the space the output needs, and the
base folder's files to copy. ``read_inputs`` returns what the rest of the merge works from.

Example:
    >>> validate_options(weights=[1.0, -0.5], alpha=2.0, dtype="bf16")
    'BF16'
    >>> try:
    ...     validate_options(weights=[float("nan")], alpha=1.0)
    ... except UsageError as e:
    ...     print(e)
    --weight nan is not a finite number; give each LoRA a weight like 1.0, 0.5 or -1.0
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from distmerge.errors import MatchError, OutputError, PlanError, UsageError
from distmerge.formats.normalize import Delta, Unmatched, normalize
from distmerge.inputs.checkpoint import BaseCheckpoint, open_base
from distmerge.inputs.dtypes import CLI_DTYPES
from distmerge.inputs.hub import Resolved
from distmerge.inputs.hub import resolve as resolve_reference
from distmerge.inputs.lorafile import open_lora
from distmerge.inputs.torch_dtypes import code_of
from distmerge.output.companions import Companions, find_companions
from distmerge.output.manifest import Manifest
from distmerge.output.publish import OutputTarget, manifest_path, part_path, refuse_inputs_as_output, resolve_output
from distmerge.plan.merge_plan import MergePlan, make_plan, parse_size
from distmerge.tasks.checksum import ALGORITHMS

__all__ = [
    "Gathered",
    "Inputs",
    "Located",
    "collect_deltas",
    "locate",
    "lora_specs",
    "read_inputs",
    "resolve_dtype",
    "validate_options",
]

logger = logging.getLogger("distmerge.preflight")  # the name users see in -v logs

#: the largest finite float32: every coefficient is applied in float32
_F32_MAX = float(torch.finfo(torch.float32).max)
_DEVICES = ("auto", "cpu", "cuda")


@dataclass
class Gathered:
    """The deltas of every LoRA against the base, what could not be placed, and a summary per file."""

    deltas: list[Delta]
    unmatched: list[tuple[str, Unmatched]]
    loras: list[dict]


def resolve_dtype(dtype: str | torch.dtype | None) -> str | None:
    """``None``/``keep`` -> None; ``bf16``/``fp16``/``fp32`` or a torch dtype -> safetensors code."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        code = code_of(dtype)
        if code not in ("BF16", "F16", "F32", "F8_E4M3", "F8_E5M2"):
            raise UsageError(f"--dtype {dtype} is not supported; use bf16, fp16, fp32, fp8_e4m3fn, fp8_e5m2 or keep")
        return code
    key = str(dtype).lower()
    if key not in CLI_DTYPES:
        raise UsageError(f"--dtype {dtype!r} is not supported; use keep, bf16, fp16, fp32, fp8_e4m3fn or fp8_e5m2")
    return CLI_DTYPES[key]


def lora_specs(loras: Sequence[object]) -> list[tuple[str, float]]:
    """``[path | (path, weight), …]`` -> ``[(path, weight), …]`` (weight 1.0 by default).

    >>> lora_specs(["a.pth", ("b.safetensors", -0.5)])
    [('a.pth', 1.0), ('b.safetensors', -0.5)]
    """
    out = []
    for item in loras:
        if isinstance(item, (tuple, list)):
            path, weight = item
            out.append((os.fspath(path), float(weight)))
        else:
            out.append((os.fspath(item), 1.0))  # type: ignore[call-overload]
    if not out:
        raise UsageError("no LoRA given; pass at least one --lora")
    return out


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
    for path, weight in loras:
        lf = open_lora(path)
        n = normalize(lf, base.tensors, strength=weight * alpha)
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
    if unmatched and not skip_unmatched:
        first = "; ".join(f"{os.path.basename(p)}: '{u.key}' ({u.reason})" for p, u in unmatched[:3])
        raise MatchError(
            f"{len(unmatched)} LoRA tensor(s) cannot be placed on the base "
            f"{base.path}: {first}{'; …' if len(unmatched) > 3 else ''}. "
            "Pass --skip-unmatched to merge the rest and list these in the report"
        )
    if not deltas:
        first = f" (first: '{unmatched[0][1].key}': {unmatched[0][1].reason})" if unmatched else ""
        raise MatchError(
            f"no LoRA tensor matched the base {base.path}: 0 pairs to merge from "
            f"{', '.join(p for p, _ in loras)}{first}"
        )
    return Gathered(deltas, unmatched, infos)


def _finite(name: str, value: float, hint: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise UsageError(f"{name} {value} is not a finite number; {hint}")
    if abs(value) > _F32_MAX:
        raise UsageError(
            f"{name} {value:g} overflows float32 (largest {_F32_MAX:.4g}), in which every delta "
            "is added; use a weight of ordinary size"
        )


def _count(name: str, value: int | None, low: int) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
        raise UsageError(f"{name} must be an integer >= {low}, got {value!r}")


def validate_options(
    *,
    weights: Sequence[float],
    alpha: float,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    unit_size: int | str | None = None,
    max_retries: int = 3,
    num_workers: int | None = None,
    num_cpus: int | None = None,
    checksum: str = "crc32",
    device: str = "auto",
) -> str | None:
    """Check every number and choice a user gives; return the output dtype's code (None: keep).

    Raises:
        UsageError: a NaN/Inf/overflowing weight or alpha (alone or multiplied), a bad size, count,
            dtype, checksum or device. One line each; the CLI exits 2.
    """
    _finite("--alpha", alpha, "the global multiplier is usually 1.0")
    for w in weights:
        _finite("--weight", w, "give each LoRA a weight like 1.0, 0.5 or -1.0")
        _finite(f"--weight {w:g} x --alpha", w * alpha, "lower one of them")
    out_code = resolve_dtype(dtype)
    for name, size in (("--max-shard-size", max_shard_size), ("--unit-size", unit_size)):
        if size is not None:
            try:
                parse_size(size)
            except PlanError as e:
                raise UsageError(f"{name}: {e}") from None
    _count("--max-retries", max_retries, 0)
    _count("--num-workers", num_workers, 1)
    _count("--num-cpus", num_cpus, 1)
    if checksum not in ALGORITHMS:
        raise UsageError(f"--checksum {checksum!r} is not supported; use {' or '.join(ALGORITHMS)}")
    if device not in _DEVICES:
        raise UsageError(f"--device {device!r} is not supported; use {', '.join(_DEVICES)}")
    return out_code


@dataclass
class Inputs:
    """What the merge works from, every part of it already checked."""

    base_ref: Resolved
    base: BaseCheckpoint
    lora_refs: list[tuple[Resolved, float]]
    specs: list[tuple[str, float]]  #: (local path, weight) of each LoRA
    gathered: Gathered
    target: OutputTarget
    previous: Manifest | None  #: the interrupted run ``--resume`` continues
    companions: Companions | None  #: the base folder's files to copy (None for a single-file output)


@dataclass
class Located:
    """The inputs found (Hugging Face references resolved, the base's headers read) and the output
    known not to be one of them: what may be locked."""

    base_ref: Resolved
    base: BaseCheckpoint
    lora_refs: list[tuple[Resolved, float]]
    specs: list[tuple[str, float]]  #: (local path, weight) of each LoRA


def locate(base: str | os.PathLike[str], specs: Sequence[tuple[str, float]], output: str | os.PathLike[str]) -> Located:
    """Resolve the inputs and refuse an output that is one of them, writing nothing anywhere.

    Raises:
        DistmergeError: a base that cannot be read or is one shard of several, a reference not in
            the cache, an output that is an input or inside one.
    """
    base_ref = resolve_reference(base)  # a Hugging Face cache reference becomes its snapshot path
    base_ck = open_base(base_ref.local)
    lora_refs = [(resolve_reference(p), w) for p, w in specs]
    local = [(r.local, w) for r, w in lora_refs]
    refuse_inputs_as_output(output, base_ck, [p for p, _ in local])
    return Located(base_ref, base_ck, lora_refs, local)


def read_inputs(
    found: Located,
    output: str | os.PathLike[str],
    *,
    alpha: float,
    out_code: str | None,
    skip_unmatched: bool = False,
    overwrite: bool = False,
    resume: bool = False,
    max_shard_size: int | str = "5GB",
) -> Inputs:
    """Check the output location, then the LoRAs against the base, in the order a user fixes them.

    Raises:
        DistmergeError: the first problem found; nothing has been written.
    """
    base_ck, local = found.base, found.specs
    target = resolve_output(output, base_ck, [p for p, _ in local], overwrite=overwrite, resume=resume)
    gathered = collect_deltas(base_ck, local, alpha=alpha, skip_unmatched=skip_unmatched)
    _check_coefficients(gathered.deltas)
    dry = make_plan(
        base_ck, gathered.deltas, out_dtype=out_code, max_shard_size=max_shard_size, single_file=target.single_file
    )  # fp8 refusals and the output's size, before Ray
    previous = Manifest.load(manifest_path(target)) if resume else None
    if resume and previous is None:
        logger.warning("--resume: no unfinished run in %s; starting from scratch", target.directory)
    check_free_space(dry, target, keep_parts=previous is not None)
    companions = find_companions(base_ck) if not target.single_file else None
    return Inputs(found.base_ref, base_ck, found.lora_refs, local, gathered, target, previous, companions)


def _check_coefficients(deltas: Sequence[Delta]) -> None:
    """Every delta's coefficient (format scale x weight x alpha) must be a finite float32."""
    for d in deltas:
        if not math.isfinite(d.coef) or abs(d.coef) > _F32_MAX:
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
