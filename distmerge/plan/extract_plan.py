"""Plan an extraction (fine-tune -> LoRA) as plain data: which tensors, under which LoRA keys, in which units.

Only headers are read. ``check_pair`` requires the tuned checkpoint to hold exactly the base's keys
with the same shapes and dtypes (one line naming the file and key otherwise). ``make_extract_plan``
lists every tensor with both byte ranges and the keys each layout writes for it (``layout_keys``),
groups the parameters of one module together (weight before bias: whether a bias becomes a
``lora_B.bias`` or a ``base_layer.bias`` depends on whether the module's weight became a LoRA) and
cuts byte-balanced work units. Whether a tensor differs, and its rank, are found by the task.

The keys each layout writes are ``formats.layouts``'s.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from distmerge.errors import PlanError, UsageError
from distmerge.formats.layouts import LAYOUTS, check_round_trip, layout_keys, peft_adapter_config
from distmerge.formats.naming import detect_naming
from distmerge.inputs.checkpoint import BaseCheckpoint
from distmerge.inputs.dtypes import FP8_CODES, dtype_code, is_float
from distmerge.plan.units import TASK_OVERHEAD_BYTES, partition_units, target_unit_bytes

if TYPE_CHECKING:
    pass

__all__ = [
    "LAYOUTS",
    "OUT_DTYPES",
    "ExtractOptions",
    "ExtractTensor",
    "ExtractUnit",
    "ExtractPlan",
    "check_pair",
    "check_round_trip",
    "layout_keys",
    "make_extract_plan",
    "peft_adapter_config",
]

#: raw bytes per row chunk a task reads from each checkpoint (``tasks.extract_unit``)
READ_CHUNK_BYTES = 16 << 20
#: ``--dtype`` choices of the factors and differences
OUT_DTYPES = ("bf16", "fp16", "fp32")
_OUT_CODES = ("BF16", "F16", "F32")


@dataclass(frozen=True)
class ExtractOptions:
    """What every task is asked to do (plain data, shipped to the workers)."""

    layout: str = "comfy"  #: ``comfy``, ``peft``, ``diffusers`` or ``roll`` (``formats.layouts``)
    rank: int | None = 64  #: the rank of every LoRA (the cap with ``energy``); ``None``: no cap
    energy: float | None = None  #: smallest rank per tensor keeping this fraction of ‖ΔW‖²_F
    out_dtype: str = "BF16"  #: of the factors and differences: ``bf16``, ``fp16``, ``fp32`` (or their codes)
    min_diff: float = 0.0  #: a tensor with max|Δ| <= this is identical (skipped)
    exact: bool = False  #: ``torch.linalg.svd`` for every matrix instead of the randomized SVD
    bias_lora: bool = False  #: diffusers layout: bias differences of LoRA modules as ``lora_B.bias``

    def checked(self) -> ExtractOptions:
        """These options checked (``UsageError``: one line, before anything is read), the dtype as its
        safetensors code (``bf16`` or ``BF16`` -> ``BF16``)."""
        rank, energy, min_diff = self.rank, self.energy, self.min_diff
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise UsageError(f"--rank {rank!r} must be a whole number of at least 1")
        if energy is not None and not (isinstance(energy, (int, float)) and 0.0 < float(energy) <= 1.0):
            raise UsageError(f"--energy {energy!r} must be a fraction in (0, 1], e.g. 0.9")
        if rank is None and energy is None:
            raise UsageError("give --rank, --energy, or both (--energy picks the rank per tensor, --rank caps it)")
        if self.layout not in LAYOUTS:
            raise UsageError(f"--layout {self.layout!r} is not supported; use one of {', '.join(LAYOUTS)}")
        if not (isinstance(min_diff, (int, float)) and math.isfinite(min_diff) and min_diff >= 0):
            raise UsageError(f"--min-diff {min_diff!r} must be a finite number >= 0")
        energy = None if energy is None else float(energy)
        code = str(dtype_code(self.out_dtype, allowed=_OUT_CODES, command="extract"))  # never keep (None)
        return replace(self, energy=energy, out_dtype=code, min_diff=float(min_diff), exact=bool(self.exact))

    def describe(self) -> dict[str, object]:
        return {
            "layout": self.layout,
            "rank": self.rank,
            "energy": self.energy,
            "dtype": self.out_dtype,
            "min_diff": self.min_diff,
            "exact": self.exact,
        }


@dataclass(frozen=True)
class ExtractTensor:
    """One base tensor and its tuned twin: where both byte ranges are, and the LoRA keys it may get."""

    key: str
    shape: tuple[int, ...]
    dtype: str
    base_path: str
    base_offset: int
    tuned_path: str
    tuned_offset: int
    nbytes: int  #: of one of the two (they are equal)
    keys: Mapping[str, str] = field(default_factory=dict)  #: role -> LoRA key (``layout_keys``)

    @property
    def numel(self) -> int:
        """Elements of either copy."""
        return math.prod(self.shape)

    @property
    def matrix(self) -> bool:
        """A 2-D float tensor: reduced to a LoRA pair (anything else becomes a full difference)."""
        return len(self.shape) == 2 and is_float(self.dtype) and min(self.shape) > 0


@dataclass(frozen=True)
class ExtractUnit:
    """Tensors one task extracts, one at a time."""

    index: int
    tensors: tuple[ExtractTensor, ...]
    memory: int  #: a bound on the task's working memory (Ray's ``memory=``)

    @property
    def nbytes(self) -> int:
        """Bytes read: both checkpoints' copies of every tensor."""
        return 2 * sum(t.nbytes for t in self.tensors)


@dataclass(frozen=True)
class ExtractPlan:
    base: str
    tuned: str
    naming: str  #: the base's naming (``naming.NAMINGS``)
    options: ExtractOptions
    units: tuple[ExtractUnit, ...]
    unit_size: int  #: target bytes per unit the units were cut with

    @property
    def tensors(self) -> list[ExtractTensor]:
        return [t for u in self.units for t in u.tensors]

    @property
    def total_bytes(self) -> int:
        return sum(u.nbytes for u in self.units)


def check_pair(base: BaseCheckpoint, tuned: BaseCheckpoint) -> None:
    """The tuned checkpoint must hold exactly the base's keys, shapes and dtypes.

    Raises:
        PlanError: one line naming the file and key, what was expected and what was found.
    """
    for key, b in base.tensors.items():
        t = tuned.tensors.get(key)
        if t is None:
            raise PlanError(
                f"{tuned.path}: no tensor '{key}' (the base {b.path} has it, {b.dtype} {b.shape}); "
                "extract needs a fine-tune of this base with the same keys"
            )
        if t.shape != b.shape:
            raise PlanError(f"{t.path}: '{key}' has shape {t.shape}, expected {b.shape} as in the base {b.path}")
        if t.dtype != b.dtype:
            raise PlanError(f"{t.path}: '{key}' has dtype {t.dtype}, expected {b.dtype} as in the base {b.path}")
        if b.dtype in FP8_CODES:
            raise PlanError(
                f"{b.path}: '{key}' is {b.dtype}; extract reads bf16/fp16/fp32 checkpoints (dequantize fp8 first)"
            )
    extra = [k for k in tuned.tensors if k not in base.tensors]
    if extra:
        raise PlanError(
            f"{tuned.tensors[extra[0]].path}: tensor '{extra[0]}' is not in the base {base.path}"
            f"{f' ({len(extra) - 1} more such keys)' if len(extra) > 1 else ''}; "
            "extract needs a fine-tune of this base with the same keys"
        )


def _module_order(keys: Iterable[str]) -> list[str]:
    """Keys with each module's parameters together, in order of first appearance, 2-D weights
    first (a module's bias is decided after its weight)."""
    groups: dict[str, list[str]] = {}
    for k in keys:
        groups.setdefault(k.rpartition(".")[0], []).append(k)
    return [k for g in groups.values() for k in sorted(g, key=lambda k: not k.endswith(".weight"))]


def _memory(t: ExtractTensor, options: ExtractOptions) -> int:
    """A bound on the bytes a task holds for ``t``: ΔW in float32 (+ the SVD's copies when it is
    exact, or when the rank is open), the raw row chunks, the factors."""
    dw = t.numel * 4
    if not t.matrix:
        return 3 * dw + 2 * t.nbytes
    m, n = t.shape
    rank = min(options.rank or min(m, n), min(m, n))
    whole = options.exact or options.rank is None or 4 * rank >= min(m, n)
    return dw * (4 if whole else 1) + 3 * (m + n) * (rank + 32) * 4 + 2 * min(2 * t.nbytes, 4 * READ_CHUNK_BYTES)


def _bias_lora(base: BaseCheckpoint, layout: str) -> bool:
    """diffusers: ``lora_B.bias`` (PEFT ``lora_bias``) only works when every LoRA module has a bias."""
    if layout != "diffusers":
        return False
    keys = base.tensors
    mods = [k[: -len(".weight")] for k, t in keys.items() if k.endswith(".weight") and len(t.shape) == 2]
    return bool(mods) and all(m + ".bias" in keys for m in mods)


def _check_unique(tensors: Sequence[ExtractTensor]) -> None:
    """Two base tensors must never be written under one LoRA key (a ComfyUI checkpoint holding both
    ``model.diffusion_model.x`` and a bare ``x`` would)."""
    owner: dict[str, str] = {}
    for t in tensors:
        for role, k in t.keys.items():
            if role != "module" and owner.setdefault(k, t.key) != t.key:
                raise PlanError(f"base tensors '{owner[k]}' and '{t.key}' would both be written as '{k}'")


def _written_keys(tensors: Sequence[ExtractTensor]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every key the plan may write, with its base tensor and a shape: a rank-1 LoRA pair for each
    matrix, the full-difference (or whole) key for everything else."""
    written: dict[str, tuple[str, tuple[int, ...]]] = {}
    for t in tensors:
        if not is_float(t.dtype) or t.numel == 0:
            continue
        if t.matrix and "up" in t.keys:
            m, n = t.shape
            roles = (("emb_down", (1, m)), ("emb_up", (n, 1))) if "emb_down" in t.keys else ()
            roles = roles or (("down", (1, n)), ("up", (m, 1)))
            written.update({t.keys[role]: (t.key, shape) for role, shape in roles})
        else:
            written[t.keys.get("diff", t.keys["set"])] = (t.key, t.shape)
    return written


def make_extract_plan(
    base: BaseCheckpoint,
    tuned: BaseCheckpoint,
    options: ExtractOptions,
    *,
    workers: int = 1,
    unit_size: int | str | None = None,
) -> ExtractPlan:
    """Plan the extraction of ``tuned - base`` (headers only, deterministic).

    Args:
        base, tuned: the two checkpoints (``check_pair`` is applied).
        options: the layout, rank/energy and output dtype.
        workers: tasks in flight; units are about total / (4 × workers) bytes.
        unit_size: target bytes per unit, overriding the workers-based choice.

    Raises:
        PlanError: mismatched checkpoints, an unknown layout, a bad unit size.
    """
    check_pair(base, tuned)
    naming = detect_naming(base.tensors)
    opts = replace(options, bias_lora=_bias_lora(base, options.layout))
    tensors = []
    for key in _module_order(base.tensors):
        b, t = base.tensors[key], tuned.tensors[key]
        tensors.append(
            ExtractTensor(
                key,
                b.shape,
                b.dtype,
                b.path,
                b.offset,
                t.path,
                t.offset,
                b.nbytes,
                layout_keys(opts.layout, naming, key),
            )
        )
    _check_unique(tensors)
    check_round_trip(_written_keys(tensors), base.tensors, opts.layout)
    total = 2 * sum(t.nbytes for t in tensors)
    target = target_unit_bytes(total, workers=workers, unit_size=unit_size)
    modules = [t.key.rpartition(".")[0] for t in tensors]
    joined = [i > 0 and modules[i] == modules[i - 1] for i in range(len(tensors))]
    units = tuple(
        ExtractUnit(i, tuple(tensors[s:e]), max(_memory(t, opts) for t in tensors[s:e]) + TASK_OVERHEAD_BYTES)
        for i, (s, e) in enumerate(partition_units([2 * t.nbytes for t in tensors], target, joined))
    )
    return ExtractPlan(base.path, tuned.path, naming.name, opts, units, target)
