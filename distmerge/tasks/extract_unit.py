"""Extract one work unit: read both checkpoints' byte ranges, reduce each ΔW, write a part file.

The body of every ``distmerge extract`` Ray task, with no Ray in it (tests call it directly). For
each tensor of the unit, one at a time: ``ΔW = tuned − base`` in float32, built from row chunks read
with ``pread`` (so only ΔW and two small buffers are held, on the GPU when the task has one), then

* identical (``max|ΔW| <= min_diff``): skipped;
* a 2-D matrix: reduced to LoRA factors (``lowrank.low_rank``), rounded to the output dtype; the
  report gets the rank, the retained energy, the predicted and the measured relative error;
* anything else (norms, biases, modulation, conv kernels): a full difference (``.diff``,
  ``.diff_b``, ``.diff_m``, or ``lora_B.bias`` for the bias of a LoRA module in the diffusers
  layout), or where the layout has no additive key for it (PEFT; a parameter with no diff suffix)
  the tuned tensor itself, in its own dtype (a replacement).

``run_extract_unit`` writes the unit's tensors into its own small safetensors part file (temp file,
fsync, rename; the per-tensor statistics go into its metadata) and returns only the statistics,
so nothing large crosses Ray and a resumed run can reuse finished parts (``output.parts`` joins them
into the output).

Example:
        plan = make_extract_plan(open_base(base), open_base(tuned), ExtractOptions(rank=16))
        tensors, outcome = compute_unit(plan.units[0], plan.options)
"""

from __future__ import annotations

import json
import math
import os
import time
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from distmerge.errors import DistmergeError, FormatError, ShardWriteError
from distmerge.inputs.dtypes import is_float
from distmerge.inputs.header import read_header
from distmerge.inputs.torch_dtypes import to_torch
from distmerge.plan.extract_plan import READ_CHUNK_BYTES, ExtractOptions, ExtractTensor, ExtractUnit
from distmerge.tasks.lowrank import low_rank, relative_error, squared_norm
from distmerge.tasks.reading import OpenFiles, read_placed
from distmerge.tasks.runtime import io_errors, task_device
from distmerge.tasks.writer import write_safetensors

__all__ = [
    "PART_META",
    "TensorStats",
    "UnitOutcome",
    "compute_unit",
    "read_part_outcome",
    "run_extract_unit",
]

#: the part file metadata key holding the unit's ``UnitOutcome`` as JSON
PART_META = "distmerge_extract_unit"


@dataclass(frozen=True)
class TensorStats:
    """What happened to one base tensor."""

    key: str
    kind: str  #: ``lora``, ``diff``, ``set`` (the tuned tensor, whole) or ``identical``
    shape: tuple[int, ...]
    module: str = ""  #: the module path in the layout's naming
    role: str = ""  #: peft: ``target``, ``base_bias``, ``save`` (modules_to_save) or ``ignored``
    rank: int = 0
    energy: float = 1.0  #: retained fraction of ‖ΔW‖²_F (float32 factors)
    predicted_error: float = 0.0  #: √(1 − energy)
    error: float = 0.0  #: ‖ΔW − stored‖_F / ‖ΔW‖_F measured with the factors as written
    max_abs: float = 0.0  #: max |ΔW|
    norm: float = 0.0  #: ‖ΔW‖_F
    method: str = ""  #: ``exact`` or ``randomized`` (LoRA pairs)
    iterations: int = 0
    converged: bool = True
    seconds: float = 0.0
    entries: tuple[str, ...] = ()  #: the keys written for it


@dataclass(frozen=True)
class UnitOutcome:
    """What a task sends back: statistics only."""

    index: int
    tensors: tuple[TensorStats, ...]
    nbytes_read: int
    nbytes_written: int
    seconds: float
    device: str
    started: float = 0.0  #: ``time.time()`` when the task began
    node_id: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> UnitOutcome:
        d = json.loads(text)
        stats = tuple(
            TensorStats(**{**s, "shape": tuple(s["shape"]), "entries": tuple(s["entries"])}) for s in d["tensors"]
        )
        return cls(**{**d, "tensors": stats})


@dataclass
class _State:
    """Per-unit state: open files, reusable read buffers, modules whose weight became a LoRA."""

    device: torch.device
    files: OpenFiles = field(default_factory=OpenFiles)
    lora_modules: set[str] = field(default_factory=set)
    #: modules whose 2-D weight did not change (comfy/diffusers: a zero LoRA if their bias did)
    still: dict[str, ExtractTensor] = field(default_factory=dict)


def _read(state: _State, path: str, offset: int, nbytes: int, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    buf = torch.empty(max(nbytes, 1), dtype=torch.uint8)[:nbytes]
    if nbytes:  # a file, or an s3:// object (one ranged GET)
        read_placed(state.files, path, offset, buf, 0, nbytes, direct=False)
    return buf.view(to_torch(dtype)).reshape(shape)


def _delta(state: _State, t: ExtractTensor) -> torch.Tensor:
    """``tuned − base`` of a float tensor in float32 on the task's device, read in row chunks."""
    dw = torch.empty(t.shape, dtype=torch.float32, device=state.device)
    rows = t.shape[0] if t.shape else 1
    row_bytes = t.nbytes // rows if rows else 0
    step = max(1, READ_CHUNK_BYTES // max(row_bytes, 1)) if len(t.shape) >= 2 else rows
    flat = dw.reshape(rows, -1) if t.shape else dw.reshape(1, 1)
    for r0 in range(0, rows, step):
        n = min(step, rows - r0)
        shape = (n, flat.shape[1])
        tuned = _read(state, t.tuned_path, t.tuned_offset + r0 * row_bytes, n * row_bytes, t.dtype, shape)
        base = _read(state, t.base_path, t.base_offset + r0 * row_bytes, n * row_bytes, t.dtype, shape)
        flat[r0 : r0 + n].copy_(tuned.to(state.device, non_blocking=False))
        flat[r0 : r0 + n].sub_(base.to(state.device))
    return dw


def _tuned(state: _State, t: ExtractTensor) -> torch.Tensor:
    return _read(state, t.tuned_path, t.tuned_offset, t.nbytes, t.dtype, t.shape).clone()


def _stored(x: torch.Tensor, code: str, key: str, base_key: str) -> torch.Tensor:
    """``x`` in dtype ``code`` on the CPU; finite, or an error naming the key."""
    out = x.to(to_torch(code)).cpu().contiguous()
    if not bool(torch.isfinite(out).all()):
        raise ShardWriteError(
            f"'{key}' (for base tensor '{base_key}') has NaN/Inf values in {code}: the difference "
            "is out of the output dtype's range (try --dtype fp32 or bf16)"
        )
    return out


def _lora(t: ExtractTensor, dw: torch.Tensor, opts: ExtractOptions, state: _State, total: float) -> tuple[dict, dict]:
    seed = zlib.crc32(t.key.encode())
    lr = low_rank(dw, rank=opts.rank, energy=opts.energy, exact=opts.exact, seed=seed, total=total)
    up, down = (
        _stored(lr.up, opts.out_dtype, t.keys["up"], t.key),
        _stored(lr.down, opts.out_dtype, t.keys["down"], t.key),
    )
    entries: dict[str, torch.Tensor] = {}
    if opts.layout == "peft" and "emb_down" in t.keys:  # nn.Embedding: ΔW = (B_e @ A_e)ᵀ
        entries[t.keys["emb_down"]] = up.T.contiguous()
        entries[t.keys["emb_up"]] = down.T.contiguous()
    else:
        entries[t.keys["down"]] = down
        entries[t.keys["up"]] = up
        if "alpha" in t.keys:
            entries[t.keys["alpha"]] = torch.tensor(float(lr.rank), dtype=torch.float32)
    state.lora_modules.add(t.keys["module"])
    stats = {
        "kind": "lora",
        "role": "target" if opts.layout == "peft" else "",
        "rank": lr.rank,
        "energy": lr.energy,
        "predicted_error": lr.predicted_error,
        "error": relative_error(dw, up, down),
        "method": lr.method,
        "iterations": lr.iterations,
        "converged": lr.converged,
    }
    return entries, stats


def _peft_full(t: ExtractTensor, state: _State, total: float) -> tuple[dict, dict]:
    """PEFT has no additive full differences: the tuned tensor, as a LoRA module's
    ``base_layer.bias``, a ``modules_to_save`` module's parameter, or (a parameter PEFT cannot hold,
    e.g. Wan's bare ``modulation``) under its own key, which only distmerge reads."""
    param, module = t.key.rpartition(".")[2], t.keys["module"]
    role = "base_bias" if param == "bias" and module in state.lora_modules and "base_bias" in t.keys else ""
    role = role or ("save" if param in ("weight", "bias") and module else "ignored")
    tuned = _tuned(state, t)
    entries = {t.keys["base_bias" if role == "base_bias" else "set"]: tuned}
    return entries, {"kind": "set", "role": role, "error": _rounding(tuned.float(), tuned, total)}


def _zero_lora(w: ExtractTensor, opts: ExtractOptions) -> dict[str, torch.Tensor]:
    """A rank-1 LoRA of zeros for the unchanged weight ``w`` whose bias changed: diffusers' loaders
    take a bias difference only beside a LoRA pair (and crash on a lone one for the embedders)."""
    code = to_torch(opts.out_dtype)
    out = {w.keys["down"]: torch.zeros(1, w.shape[1], dtype=code), w.keys["up"]: torch.zeros(w.shape[0], 1, dtype=code)}
    if "alpha" in w.keys:
        out[w.keys["alpha"]] = torch.tensor(1.0, dtype=torch.float32)
    return out


def _full(t: ExtractTensor, dw: torch.Tensor, opts: ExtractOptions, state: _State, total: float) -> tuple[dict, dict]:
    """A changed tensor that is not a LoRA matrix: an additive difference, or the tuned tensor."""
    if opts.layout == "peft":
        return _peft_full(t, state, total)
    param, module = t.key.rpartition(".")[2], t.keys["module"]
    entries: dict[str, torch.Tensor] = {}
    if param == "bias" and opts.layout in ("comfy", "diffusers") and module in state.still:
        entries.update(_zero_lora(state.still.pop(module), opts))
        state.lora_modules.add(module)
    key = t.keys.get("diff")
    if param == "bias" and opts.bias_lora and module in state.lora_modules and "bias_up" in t.keys:
        key = t.keys["bias_up"]
    if key is None:  # no additive key for this parameter name: the tuned tensor, whole
        tuned = _tuned(state, t)
        return {t.keys["set"]: tuned}, {"kind": "set", "error": _rounding(tuned.float(), tuned, total)}
    d = _stored(dw, opts.out_dtype, key, t.key)
    return {**entries, key: d}, {"kind": "diff", "error": _rounding(dw, d, total)}


def _rounding(exact: torch.Tensor, stored: torch.Tensor, total: float) -> float:
    """‖exact − stored‖_F relative to ‖ΔW‖_F (``total`` = ‖ΔW‖²_F)."""
    if total <= 0:
        return 0.0
    return math.sqrt(squared_norm(exact.float().cpu() - stored.float()) / total)


def _identical(t: ExtractTensor, opts: ExtractOptions, state: _State) -> dict[str, torch.Tensor]:
    """Entries for an unchanged tensor: none, except a zero ``lora_B.bias`` for the bias of a LoRA
    module in the diffusers layout (PEFT's ``lora_bias`` expects one for every LoRA module)."""
    if opts.bias_lora and t.key.endswith(".bias") and t.keys["module"] in state.lora_modules and "bias_up" in t.keys:
        return {t.keys["bias_up"]: torch.zeros(t.shape, dtype=to_torch(opts.out_dtype))}
    return {}


def _compare_raw(state: _State, t: ExtractTensor) -> None:
    """Non-float tensors cannot be reduced: they must be equal, byte for byte."""
    a = _read(state, t.base_path, t.base_offset, t.nbytes, "U8", (t.nbytes,))
    b = _read(state, t.tuned_path, t.tuned_offset, t.nbytes, "U8", (t.nbytes,))
    if not torch.equal(a, b):
        raise FormatError(
            f"{t.tuned_path}: '{t.key}' ({t.dtype}) differs from the base {t.base_path}; a LoRA holds "
            "float differences only"
        )


def _one(t: ExtractTensor, opts: ExtractOptions, state: _State) -> tuple[dict[str, torch.Tensor], TensorStats]:
    start = time.perf_counter()
    if not is_float(t.dtype) or t.numel == 0:
        if t.numel:
            _compare_raw(state, t)
        return {}, TensorStats(t.key, "identical", t.shape, t.keys["module"])
    dw = _delta(state, t)
    lo, hi = torch.aminmax(dw.reshape(-1))
    max_abs, total = max(-float(lo), float(hi)), squared_norm(dw)
    if not (math.isfinite(max_abs) and math.isfinite(total)):
        raise ShardWriteError(
            f"{t.tuned_path}: '{t.key}' minus the base holds NaN/Inf (a damaged checkpoint, or one saved after a "
            "diverged step)"
        )
    if max_abs <= opts.min_diff:
        entries, extra = _identical(t, opts, state), {"kind": "identical"}
        if t.matrix and "up" in t.keys:
            state.still[t.keys["module"]] = t
    elif t.matrix and "up" in t.keys:
        entries, extra = _lora(t, dw, opts, state, total)
    else:
        entries, extra = _full(t, dw, opts, state, total)
    fields: dict[str, Any] = {"max_abs": max_abs, "norm": math.sqrt(total), **extra}
    stats = TensorStats(
        key=t.key,
        shape=t.shape,
        module=t.keys["module"],
        seconds=round(time.perf_counter() - start, 4),
        entries=tuple(entries),
        **fields,
    )
    return entries, stats


def compute_unit(
    unit: ExtractUnit, options: ExtractOptions, *, device: str = "cpu"
) -> tuple[dict[str, torch.Tensor], UnitOutcome]:
    """Extract every tensor of ``unit``; returns the LoRA tensors (CPU) and the statistics.

    Raises:
        ShardWriteError: an input could not be read, or a difference is not finite.
        FormatError: a non-float tensor differs between the checkpoints.
    """
    start, started = time.perf_counter(), time.time()
    state = _State(task_device(device))
    out: dict[str, torch.Tensor] = {}
    stats: list[TensorStats] = []

    def error(e: OSError) -> str:
        t = unit.tensors[len(stats)]  # the tensor in hand
        return f"{t.tuned_path} or {t.base_path}: '{t.key}': cannot read it ({e.strerror or e})"

    try:
        with io_errors(error):
            for t in unit.tensors:
                entries, s = _one(t, options, state)
                out.update(entries)
                stats.append(s)
    finally:
        state.files.close()
    written = sum(v.numel() * v.element_size() for v in out.values())
    outcome = UnitOutcome(
        unit.index,
        tuple(stats),
        unit.nbytes,
        written,
        round(time.perf_counter() - start, 4),
        state.device.type,
        started,
    )
    return out, outcome


def run_extract_unit(unit: ExtractUnit, options: ExtractOptions, dest: str, device: str = "cpu") -> UnitOutcome:
    """Extract ``unit`` and write its tensors to the part file ``dest`` (temp file + fsync + rename,
    so a part either is whole or is not there); the statistics go into its metadata.

    Raises:
        ShardWriteError: reading, the math or writing failed (the message names the key or file).
    """
    tensors, outcome = compute_unit(unit, options, device=device)
    tmp = f"{dest}.tmp{os.getpid()}"
    with io_errors(lambda e: f"{dest}: cannot write the unit's part file ({e.strerror or e})"):
        try:
            write_safetensors(tmp, tensors, metadata={"format": "pt", PART_META: outcome.to_json()})
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return outcome


def read_part_outcome(path: str) -> UnitOutcome | None:
    """The statistics recorded in a finished part file, or None when it is missing or unreadable."""
    try:
        return UnitOutcome.from_json(read_header(path).metadata[PART_META])
    except (DistmergeError, KeyError, ValueError, TypeError):
        return None
