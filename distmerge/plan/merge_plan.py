"""Plan the merge as plain data: output shards, tensor placement and byte-balanced work units.

Everything here is pure and deterministic: the same base, deltas and options always give the same
shards, headers and offsets, whatever the number of workers (only how tensors are grouped into
work units depends on it, and units never change the bytes written).

Example:
    >>> split_by_size([("a", 6), ("b", 6), ("c", 2), ("d", 6), ("e", 2), ("f", 2)], 8)
    [['a'], ['b', 'c'], ['d', 'e'], ['f']]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from distmerge.errors import PlanError
from distmerge.formats.kinds import TextEnum
from distmerge.formats.normalize import Delta
from distmerge.inputs.checkpoint import BaseCheckpoint
from distmerge.inputs.ggml import is_quant, tensor_nbytes
from distmerge.inputs.gguffile import ARCH_KEY, is_gguf_name
from distmerge.plan.fp8 import ScaledLayout, scaled_layout
from distmerge.plan.gguf import file_type, gguf_type, is_block_linear, layout_gguf
from distmerge.plan.layout import LaidTensor, ShardLayout, layout_shard
from distmerge.plan.sizes import parse_size
from distmerge.plan.units import MAX_UNIT_BYTES, TASK_OVERHEAD_BYTES, partition_units, target_unit_bytes

__all__ = [
    "Action",
    "PlannedTensor",
    "ShardPlan",
    "WorkUnit",
    "MergePlan",
    "parse_size",
    "split_by_size",
    "shard_names",
    "deltas_by_target",
    "make_plan",
    "partition_units",
]

#: float32 bytes of one row chunk when a task streams a big tensor (see ``pieces.row_chunks``)
CHUNK_BYTES = 32 << 20
#: bytes per piece of a tensor copied as it is (read and written like any other piece)
COPY_CHUNK = 16 << 20
#: reads a task keeps in flight (``tasks.pipeline``); each is a whole piece (~16-32 MB) that the
#: block layer splits into requests queued together, so three keep a disk's queue full while the
#: task computes a fourth
READ_DEPTH = 3
#: finished pieces a task may have queued for writing before it waits
WRITE_BACKLOG = 2
#: bytes per value a GGML block type's piece needs beside its buffers: the float32 values, and
#: gguf-py's block arrays while it decodes or encodes them
_PACKED_WORK = 24
#: what a task may hold of whole LoRA factors whose columns it slices (``LoraReader.CACHE_BYTES``)
_SLICED_SOURCES = 512 << 20


class Action(TextEnum):
    """What a task does with one planned tensor (``PlannedTensor.action``)."""

    MERGE = "merge"  #: add deltas
    CONVERT = "convert"  #: a dtype change only
    COPY = "copy"  #: the bytes as they are
    DERIVED = "derived"  #: a scale, computed with its weight

    @property
    def passthrough(self) -> bool:
        """No bytes of this tensor are computed on its own turn (copied, or written with its weight)."""
        return self in (Action.COPY, Action.DERIVED)


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor: where its base bytes are, where its output bytes go, what to add."""

    key: str
    shape: tuple[int, ...]
    src_path: str
    src_offset: int
    src_dtype: str
    src_nbytes: int
    out_dtype: str
    out_offset: int
    out_nbytes: int
    deltas: tuple[Delta, ...] = ()
    #: ``scaled``: the output is fp8 with a fresh per-tensor scale, written to ``scale_key``
    quant: str = ""
    scale_key: str = ""  #: the output scale of a ``scaled`` tensor: the next tensor of its unit
    #: the base's scale of a ``scaled`` tensor ((path, offset, dtype)), to dequantize it
    scale_src: tuple[str, int, str] | None = None
    derived_from: str = ""  #: a scale whose bytes the unit computes with this weight
    out_pad: int = 0  #: zero bytes after the tensor that its unit owns (GGUF's alignment)
    #: the new input scale of a ``scaled`` tensor (``fp8.INPUT_SCALE``), laid out after ``scale_key``
    input_key: str = ""

    @property
    def action(self) -> Action:
        """``merge`` (deltas to add), ``convert`` (dtype change only), ``copy`` (bytes as is) or
        ``derived`` (a scale computed with its weight)."""
        if self.derived_from:
            return Action.DERIVED
        if self.deltas:
            return Action.MERGE
        return Action.CONVERT if (self.out_dtype != self.src_dtype or self.quant) else Action.COPY

    @property
    def packed(self) -> bool:
        """Read or written in a GGML block type (decoded and encoded by gguf-py, ``tasks.ggml``)."""
        return is_quant(self.src_dtype) or is_quant(self.out_dtype)

    @property
    def whole(self) -> bool:
        """Computed in one piece: the fresh scale of a ``scaled`` tensor needs all of it."""
        return bool(self.quant) or not all(d.row_local for d in self.deltas)


@dataclass(frozen=True)
class ShardPlan:
    name: str  #: final file name
    header: bytes
    size: int
    keys: tuple[str, ...]  #: in data order


@dataclass(frozen=True)
class WorkUnit:
    """What one Ray task does: fill ``tensors`` of output shard ``shard``."""

    index: int
    shard: str
    tensors: tuple[PlannedTensor, ...]

    @property
    def nbytes(self) -> int:
        """The unit's contiguous output range: its tensors and the padding after each."""
        return sum(t.out_nbytes + t.out_pad for t in self.tensors)

    @property
    def memory(self) -> int:
        """A bound on the task's working memory, for Ray's ``memory=`` admission control: its
        buffer rings (``READ_DEPTH + 1`` source pieces, a float64-sized accumulator and
        ``WRITE_BACKLOG + 2`` output pieces, each as big as the unit's largest: a row chunk, a
        ``COPY_CHUNK`` of a copied tensor, or a whole tensor whose deltas cannot be chunked), plus
        the factors of the tensor being merged, plus a fixed allowance."""
        src = out = acc = extra = 0
        for t in self.tensors:
            if t.action == Action.DERIVED or not t.out_nbytes:
                continue
            if t.action == Action.COPY:
                src, out = max(src, min(t.src_nbytes, COPY_CHUNK)), max(out, min(t.src_nbytes, COPY_CHUNK))
                continue
            elems = math.prod(t.shape)
            row = math.prod(t.shape[1:]) if len(t.shape) >= 2 else elems
            piece = elems if (t.whole or len(t.shape) < 2) else min(elems, max(CHUNK_BYTES // 4, 16 * row))
            piece_shape = (piece // max(1, row),) + t.shape[1:] if len(t.shape) >= 2 else t.shape
            src = max(src, tensor_nbytes(t.src_dtype, piece_shape))
            out = max(out, tensor_nbytes(t.out_dtype, piece_shape))
            acc = max(acc, piece * (_PACKED_WORK if t.packed else 8))
            work = sum(2 * f.nbytes + math.prod(f.shape) * 4 for d in t.deltas for f in d.factors)
            work += 4 * elems if t.whole else 0  # a whole ΔW beside the accumulator
            if any(p.cols for d in t.deltas for f in d.factors for p in f.pieces):
                work += _SLICED_SOURCES  # whole factors kept for their strided columns (MoE experts)
            extra = max(extra, work)
        rings = (READ_DEPTH + 1) * src + acc + (WRITE_BACKLOG + 2) * out
        return rings + extra + TASK_OVERHEAD_BYTES


@dataclass(frozen=True)
class MergePlan:
    stem: str
    single_file: bool
    shards: tuple[ShardPlan, ...]
    units: tuple[WorkUnit, ...]
    unit_size: int = 0  #: the target bytes per unit this plan was cut with

    @property
    def total_size(self) -> int:
        """Sum of tensor bytes (the index's ``metadata.total_size``)."""
        return sum(u.nbytes for u in self.units)

    @property
    def total_bytes(self) -> int:
        """The bytes the units write (``total_size``)."""
        return self.total_size

    @property
    def weight_map(self) -> dict[str, str]:
        return {k: s.name for s in self.shards for k in sorted(s.keys)}


def split_by_size(sizes: Sequence[tuple[str, int]], max_size: int) -> list[list[str]]:
    """Greedy HF-style sharding: fill in order; start a new shard when the next tensor won't fit.

    A tensor larger than ``max_size`` gets a shard of its own. Greedy is not optimal
    ([6,6,2,6,2,2] with limit 8 gives 4 shards where 3 would do) but it keeps keys in order.
    """
    shards: list[list[str]] = []
    cur: list[str] = []
    used = 0
    for key, n in sizes:
        if cur and used + n > max_size:
            shards.append(cur)
            cur, used = [], 0
        cur.append(key)
        used += n
    if cur:
        shards.append(cur)
    return shards


def shard_names(stem: str, n: int) -> list[str]:
    """``<stem>-00001-of-0000N.safetensors`` names (always sharded names, with an index)."""
    return [f"{stem}-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def make_plan(
    base: BaseCheckpoint,
    deltas: Sequence[Delta],
    *,
    out_dtype: str | None = None,
    max_shard_size: int | str = "5GB",
    single_file: str | None = None,
    workers: int = 1,
    unit_size: int | str | None = None,
    metadata: Mapping[str, str] | None = None,
) -> MergePlan:
    """Plan the output of merging ``deltas`` into ``base``.

    Args:
        base: the base checkpoint (headers only).
        deltas: validated deltas; their targets must be base keys.
        out_dtype: safetensors code to convert every float tensor to, or None to keep dtypes.
        max_shard_size: shard size limit (ignored with ``single_file``).
        single_file: write one file with this name instead of shards + index.
        workers: how many tasks will run at once; the plan makes four times as many work units
            so that work stays balanced, at most ``MAX_UNIT_BYTES`` each, and the last
            ``workers`` units' worth of bytes in quarter-size units (``units.target_unit_bytes``).
        unit_size: target bytes per unit, overriding the workers-based choice.
    """
    by_target = deltas_by_target(base, deltas)
    gguf = is_gguf_name(single_file or "")
    fp8 = scaled_layout(base.tensors, None if gguf else out_dtype, path=base.path)
    for key in by_target:
        fp8.check_merge(key, base.tensors)
    specs = _gguf_specs(base, fp8, out_dtype) if gguf else _output_specs(base, fp8)
    groups, total = _shard_groups(base, fp8, specs, single_file, max_shard_size)
    names = [single_file] if single_file else shard_names(base.stem, len(groups))
    target = target_unit_bytes(total, workers=workers, unit_size=unit_size)
    builder = _ShardBuilder(
        base,
        specs,
        by_target,
        fp8,
        derived=fp8.recomputed(set(by_target)),
        attach=fp8.followers(),
        meta={"format": "pt", **(metadata or {})},
        unit_bytes=target,
        tail_at=total - workers * target if target == MAX_UNIT_BYTES and not unit_size else None,
        gguf_meta=_gguf_meta(base, specs) if gguf else None,
    )
    for name, keys in zip(names, groups):
        builder.add(name, keys)
    return MergePlan(base.stem, bool(single_file), tuple(builder.shards), tuple(builder.units), target)


def deltas_by_target(base: BaseCheckpoint, deltas: Sequence[Delta]) -> dict[str, tuple[Delta, ...]]:
    """The deltas of each target, in order; every target must be a base key."""
    by_target: dict[str, list[Delta]] = {}
    for d in deltas:
        if d.target not in base.tensors:
            raise PlanError(f"delta from {d.source} targets '{d.target}', which is not in the base")
        by_target.setdefault(d.target, []).append(d)
    return {k: tuple(v) for k, v in by_target.items()}


def _shard_groups(
    base: BaseCheckpoint,
    fp8: ScaledLayout,
    specs: Mapping[str, tuple[str, tuple[int, ...]]],
    single_file: str | None,
    max_shard_size: int | str,
) -> tuple[list[list[str]], int]:
    """The output keys of each shard (a weight and its attached scale never apart), and the
    total output bytes."""
    blocks = fp8.blocks(list(base.tensors))
    sizes = [(b[0], sum(tensor_nbytes(*specs[k]) for k in b)) for b in blocks]
    limit = math.inf if single_file else parse_size(max_shard_size)
    members = {b[0]: b for b in blocks}
    cut = [[k for k, _ in sizes]] if single_file else split_by_size(sizes, limit)  # type: ignore[arg-type]
    groups = [[k for lead in g for k in members[lead]] for g in cut]
    return groups, sum(n for _, n in sizes)


@dataclass
class _ShardBuilder:
    """Lays out the shards one at a time and cuts each into work units (numbered across shards)."""

    base: BaseCheckpoint
    specs: Mapping[str, tuple[str, tuple[int, ...]]]
    by_target: Mapping[str, tuple[Delta, ...]]
    fp8: ScaledLayout
    derived: Mapping[str, str]  #: scale -> weight, for scales computed with their weight
    attach: Mapping[str, str]  #: follower -> weight: scales laid out right after their weight
    meta: Mapping[str, str]
    unit_bytes: int  #: the target bytes per work unit
    tail_at: int | None = None  #: output bytes from which units are a quarter of ``unit_bytes``
    gguf_meta: Mapping[str, object] | None = None  #: a GGUF file's key/values (None: safetensors)
    shards: list[ShardPlan] = field(default_factory=list)
    units: list[WorkUnit] = field(default_factory=list)
    done: int = 0  #: tensor bytes of the shards laid out so far

    def add(self, name: str, keys: Sequence[str]) -> None:
        """Plan shard ``name`` holding output ``keys``."""
        attach = self.attach
        layout = self._layout(keys)
        planned = [
            _planned(self.base, e, self.by_target.get(e.key, ()), self.fp8, self.derived) for e in layout.entries
        ]
        self.shards.append(ShardPlan(name, layout.header, layout.size, tuple(e.key for e in layout.entries)))
        joined = [bool(attach) and p.key in attach for p in planned]
        sizes = [p.out_nbytes + p.out_pad for p in planned]
        tail = None if self.tail_at is None else (self.tail_at - self.done, max(1, self.unit_bytes // 4))
        for start, end in partition_units(sizes, self.unit_bytes, joined, tail):
            self.units.append(WorkUnit(len(self.units), name, tuple(planned[start:end])))
        self.done += sum(sizes)

    def _layout(self, keys: Sequence[str]) -> ShardLayout:
        entries = [(k, *self.specs[k]) for k in keys]
        if self.gguf_meta is not None:
            return layout_gguf(entries, self.gguf_meta)
        attach = {s: w for s, w in self.attach.items() if s in keys} if self.attach else None
        return layout_shard(entries, metadata=self.meta, attach=attach)


def _output_specs(base: BaseCheckpoint, fp8: ScaledLayout) -> dict[str, tuple[str, tuple[int, ...]]]:
    """(dtype code, shape) of every output tensor: the base's, converted, plus new fp8 keys."""
    specs = {k: (fp8.out_code(k, t.dtype), t.shape) for k, t in base.tensors.items()}
    specs = {k: ("BF16" if is_quant(c) else c, shape) for k, (c, shape) in specs.items()}  # GGUF blocks
    specs.update(fp8.new_tensors())
    return specs


def _gguf_specs(base: BaseCheckpoint, fp8: ScaledLayout, want: str | None) -> dict[str, tuple[str, tuple[int, ...]]]:
    """(GGML type, shape) of every tensor of a GGUF output (``plan.gguf``'s rules)."""
    if fp8.is_scaled or fp8.marker:
        what = fp8.marker or next(iter(fp8.scales.values()))
        raise PlanError(
            f"{base.path}: a scaled-fp8 checkpoint ('{what}') cannot be written as GGUF; merge into "
            "its bf16 original (or write safetensors)"
        )
    if not base.is_gguf:
        _check_wan_names(base)
    return {k: (gguf_type(t, want, from_gguf=base.is_gguf), t.shape) for k, t in base.tensors.items()}


def _check_wan_names(base: BaseCheckpoint) -> None:
    """A GGUF output holds a Wan model under its original, bare names (ComfyUI-GGUF's contract)."""
    if "head.modulation" in base.tensors:
        return
    prefixed = next((k for k in base.tensors if k.endswith(".head.modulation")), None)
    if prefixed:
        raise PlanError(
            f"{base.path}: '{prefixed}': a GGUF output holds Wan's bare names (head.modulation), as "
            f"ComfyUI-GGUF loads them; this base's keys carry a prefix ('{prefixed[: -len('head.modulation')]}')"
        )
    raise PlanError(
        f"{base.path}: a GGUF output is a Wan diffusion model in Wan's own names (ComfyUI-GGUF); this base "
        "has no 'head.modulation' (a diffusers-named or non-Wan checkpoint); write safetensors instead"
    )


def _gguf_meta(base: BaseCheckpoint, specs: Mapping[str, tuple[str, tuple[int, ...]]]) -> dict[str, object]:
    """What city96's tools write: the architecture, the quantization version and the file type."""
    from gguf.constants import GGML_QUANT_VERSION

    linears = [specs[k][0] for k, t in base.tensors.items() if is_block_linear(k, t.shape)]
    return {
        ARCH_KEY: "wan",
        "general.quantization_version": GGML_QUANT_VERSION,
        "general.file_type": file_type(linears),
    }


def _planned(
    base: BaseCheckpoint, e: LaidTensor, deltas: tuple[Delta, ...], fp8: ScaledLayout, derived: Mapping[str, str]
) -> PlannedTensor:
    """The plan of laid-out tensor ``e``: a base tensor, or a new scale / marker (no source)."""
    src = base.tensors.get(e.key)
    if src is None:
        return PlannedTensor(
            e.key,
            e.shape,
            "",
            0,
            e.dtype,
            0,
            e.dtype,
            e.offset,
            e.nbytes,
            derived_from=derived.get(e.key, ""),
            out_pad=e.pad,
        )
    quant, scale_key, scale_src = "", "", None
    if e.key in fp8.new_scales or (e.key in fp8.pairs and deltas):
        quant, scale_key = "scaled", fp8.pairs[e.key]
        old = base.tensors.get(scale_key)
        scale_src = (old.path, old.offset, old.dtype) if old is not None else None
    return PlannedTensor(
        e.key,
        src.shape,
        src.path,
        src.offset,
        src.dtype,
        src.nbytes,
        e.dtype,
        e.offset,
        e.nbytes,
        deltas,
        quant,
        scale_key,
        scale_src,
        derived.get(e.key, ""),
        out_pad=e.pad,
        input_key=fp8.new_inputs.get(e.key, ""),
    )


def describe(plan: MergePlan) -> str:
    """One line: shards, units, bytes (for logs)."""
    return f"{len(plan.shards)} shard(s), {len(plan.units)} work unit(s), {plan.total_size / 1e9:.2f} GB"
