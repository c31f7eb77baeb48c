"""A Megatron (ROLL ``mcore_adapter``) LoRA checkpoint as ``Delta`` values on a Hugging Face base.

Each delta's factors are assembled from the rank files by the task that merges them (``Piece``
blocks): tensor-parallel shards joined (column-parallel B by rows, row-parallel A by columns, the
replicated halves read from rank 0), pipeline stages' local layer numbers and expert-parallel ranks'
local expert numbers made global, and Megatron's fused layers split into the base's tensors:

* ``linear_qkv`` → ``q_proj``/``k_proj``/``v_proj``: B's rows are interleaved per query group
  (``[nh/ng·d query rows, d key rows, d value rows]`` for each group, each TP rank holding whole groups);
* ``linear_fc1`` → ``gate_proj``/``up_proj``: each TP shard of B is ``[gate_t; up_t]``;
* ``linear_proj`` → ``o_proj``, ``linear_fc2`` → ``down_proj``; MoE experts ``experts.linear_fc1/2``
  (weight suffix = local expert) → ``mlp.experts.G.gate_proj/up_proj/down_proj`` (Mixtral
  ``block_sparse_moe.experts.G.w1/w3/w2``) or a fused ``(E, out, in)`` tensor.

The scale is the one training used: ``lora_alpha / r`` (``/ √r`` with rsLoRA) with the config's
full ``r``, also for experts, whose tensors have rank ``r // moe_router_topk``.

Example:
    >>> _qkv_rows(heads=4, groups=2, d=2, tp=2)["k"]
    [(0, 4, 6, 0), (1, 4, 6, 2)]
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from distmerge.errors import FormatError, MatchError
from distmerge.formats.deltas import Delta, FactorRef, NormalizedLora, Piece, check_delta
from distmerge.formats.experts import EXPERT_PARTS, expert_count
from distmerge.formats.kinds import DeltaKind, Role
from distmerge.formats.scales import AdapterConfig
from distmerge.formats.shapes import TensorLike

if TYPE_CHECKING:  # reading the checkpoint needs torch; mapping its names does not
    from distmerge.inputs.megatron import MegatronCheckpoint, MegatronConfig

__all__ = ["normalize_megatron", "FAMILIES"]

#: the Hugging Face model types whose Megatron names map as below
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mixtral")
_L = r"^decoder\.layers\.(\d+)\."
_DENSE = re.compile(
    _L
    + r"(self_attention\.linear_qkv|self_attention\.linear_proj|mlp\.linear_fc1|mlp\.linear_fc2)\.lora_([AB])\.weight$"
)
_GROUPED = re.compile(_L + r"mlp\.experts\.(linear_fc1|linear_fc2)\.lora_([AB])\.weight(\d+)$")
_SEQUENTIAL = re.compile(_L + r"mlp\.experts\.local_experts\.(\d+)\.(linear_fc1|linear_fc2)\.lora_([AB])\.weight$")
_HF_DENSE = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
#: a Megatron expert part -> (its fused parameter, its per-expert weight: transformers name, Mixtral name)
_EXPERT_NAMES = {
    part: (fused, names[i], mixtral[i])
    for fused, (names, mixtral) in EXPERT_PARTS.items()
    for i, part in enumerate(("gate", "up") if fused == "gate_up_proj" else ("down",))
}


_Meta = TensorLike


@dataclass
class _Module:
    """One Megatron LoRA module at a global layer (and global expert): its A and B per TP rank (each
    the rank file's whole tensor)."""

    layer: int
    kind: str  #: ``self_attention.linear_qkv`` … or ``linear_fc1``/``linear_fc2`` for an expert
    expert: int | None
    a: dict[int, FactorRef] = field(default_factory=dict)
    b: dict[int, FactorRef] = field(default_factory=dict)

    @property
    def name(self) -> str:
        if self.expert is None:
            return f"decoder.layers.{self.layer}.{self.kind}"
        return f"decoder.layers.{self.layer}.mlp.experts.{self.expert}.{self.kind}"


#: a part of a module: (base part, A shape, A pieces, B shape, B pieces)
_Part = tuple[str, tuple[int, int], tuple[Piece, ...], tuple[int, int], tuple[Piece, ...]]


def _qkv_rows(heads: int, groups: int, d: int, tp: int) -> dict[str, list[tuple[int, int, int, int]]]:
    """For q, k and v: (TP rank, first row, end row, row in the base tensor) of every block of B."""
    q = heads // groups
    per_rank = groups // tp
    out: dict[str, list[tuple[int, int, int, int]]] = {"q": [], "k": [], "v": []}
    for g in range(groups):
        t, local = divmod(g, per_rank)
        start = local * (q + 2) * d
        out["q"].append((t, start, start + q * d, g * q * d))
        out["k"].append((t, start + q * d, start + (q + 1) * d, g * d))
        out["v"].append((t, start + (q + 1) * d, start + (q + 2) * d, g * d))
    return out


def _replicated(srcs: dict[int, FactorRef]) -> tuple[tuple[int, int], tuple[Piece, ...]]:
    s = srcs[0]
    return (s.shape[0], s.shape[1]), (Piece(s.path, s.key),)


def _by_columns(srcs: dict[int, FactorRef]) -> tuple[tuple[int, int], tuple[Piece, ...]]:
    width = srcs[0].shape[1]
    pieces = tuple(Piece(s.path, s.key, at=(0, t * width)) for t, s in sorted(srcs.items()))
    return (srcs[0].shape[0], width * len(srcs)), pieces


def _parts(m: _Module, cfg: MegatronConfig) -> list[_Part]:
    """How module ``m``'s TP shards make each base tensor's A and B."""
    tp = len(m.b)
    kind = m.kind.rsplit(".", 1)[-1]
    if kind in ("linear_proj", "linear_fc2"):
        a_shape, a_pieces = _by_columns(m.a)
        b_shape, b_pieces = _replicated(m.b)
        return [("o" if kind == "linear_proj" else "down", a_shape, a_pieces, b_shape, b_pieces)]
    a_shape, a_pieces = _replicated(m.a)
    r = a_shape[0]
    rows = m.b[0].shape[0]
    if kind == "linear_fc1":
        if rows % 2:
            raise FormatError(f"{m.b[0].path}: '{m.b[0].key}' has {rows} rows; a SwiGLU fc1 shard holds [gate; up]")
        half = rows // 2
        out = []
        for i, part in enumerate(("gate", "up")):
            pieces = tuple(
                Piece(s.path, s.key, rows=(i * half, (i + 1) * half, 1), at=(t * half, 0))
                for t, s in sorted(m.b.items())
            )
            out.append((part, a_shape, a_pieces, (half * tp, r), pieces))
        return out
    need = (cfg.heads + 2 * cfg.groups) * cfg.kv_channels
    if rows * tp != need or cfg.groups % tp or cfg.heads % cfg.groups:
        raise FormatError(
            f"{m.b[0].path}: '{m.b[0].key}' has {rows} rows per TP rank; {cfg.heads} heads in {cfg.groups} groups "
            f"of kv_channels {cfg.kv_channels} over TP {tp} need {need // tp}"
        )
    out = []
    for part, blocks in _qkv_rows(cfg.heads, cfg.groups, cfg.kv_channels, tp).items():
        pieces = tuple(Piece(m.b[t].path, m.b[t].key, rows=(r0, r1, 1), at=(dest, 0)) for t, r0, r1, dest in blocks)
        height = cfg.heads * cfg.kv_channels if part == "q" else cfg.groups * cfg.kv_channels
        out.append((part, a_shape, a_pieces, (height, r), pieces))
    return out


def _modules(ck: MegatronCheckpoint) -> dict[tuple[int, str, int | None], _Module]:
    """Every LoRA module of the checkpoint, keyed by (global layer, kind, global expert)."""
    cfg = ck.config
    per_stage = cfg.num_layers // cfg.pp
    per_rank = cfg.experts // cfg.ep if cfg.experts else 0
    found: dict[tuple[int, str, int | None], _Module] = {}
    for f in ck.files:
        for key, meta in f.tensors.items():
            layer, kind, expert, half = _parse(key, f.path)
            if layer >= per_stage:
                raise FormatError(
                    f"{f.path}: '{key}' is local layer {layer}, but a stage of {cfg.num_layers} layers over "
                    f"PP {cfg.pp} has {per_stage}"
                )
            if expert is not None and expert >= per_rank:
                raise FormatError(f"{f.path}: '{key}' is local expert {expert}; EP rank {f.ep} holds {per_rank}")
            g_layer = layer + f.pp * per_stage
            g_expert = None if expert is None else expert + f.ep * per_rank
            if expert is None and f.ep > 0:
                continue  # dense tensors repeat on every EP rank (checked identical when read)
            m = found.setdefault((g_layer, kind, g_expert), _Module(g_layer, kind, g_expert))
            role = Role.DOWN if half == "A" else Role.UP
            (m.a if half == "A" else m.b)[f.tp] = FactorRef(f.path, key, meta.dtype, tuple(meta.shape), role)
    for m in found.values():
        if sorted(m.a) != list(range(cfg.tp)) or sorted(m.b) != list(range(cfg.tp)):
            raise FormatError(f"{ck.path}: '{m.name}' lacks lora_A or lora_B on some of the {cfg.tp} TP ranks")
        for shards in (m.a, m.b):
            odd = next((s for s in shards.values() if s.shape != shards[0].shape or len(s.shape) != 2), None)
            if odd is not None:
                raise FormatError(
                    f"{odd.path}: '{odd.key}' {odd.shape} differs in shape from TP rank 0's {shards[0].shape}"
                )
    return found


def _parse(key: str, path: str) -> tuple[int, str, int | None, str]:
    """(local layer, module kind, local expert, ``A``/``B``) of a rank file key."""
    if m := _DENSE.match(key):
        return int(m.group(1)), m.group(2), None, m.group(3)
    if m := _GROUPED.match(key):
        return int(m.group(1)), m.group(2), int(m.group(4)), m.group(3)
    if m := _SEQUENTIAL.match(key):
        return int(m.group(1)), m.group(3), int(m.group(2)), m.group(4)
    if ".router." in key:
        raise FormatError(f"{path}: '{key}' is a LoRA on the MoE router; distmerge does not merge router LoRA")
    raise FormatError(
        f"{path}: '{key}' is not a LoRA layer distmerge maps to Hugging Face names "
        "(mapped: linear_qkv, linear_proj, linear_fc1, linear_fc2 and routed experts)"
    )


def _family(ck: MegatronCheckpoint, base_config: Mapping[str, Any] | None) -> str:
    ours = ck.config.model_type
    theirs = str(base_config.get("model_type") or "") if base_config else ""
    if ours and theirs and ours != theirs:
        raise MatchError(f"{ck.path}: the checkpoint was trained on a {ours} model but the base is {theirs}")
    family = ours or theirs
    if family not in FAMILIES:
        raise FormatError(
            f"{ck.path}: model family '{family or 'unknown'}' is not mapped from Megatron names "
            f"(mapped: {', '.join(FAMILIES)})"
        )
    return family


class _Placer:
    """Turns modules into deltas on the base's tensors."""

    def __init__(
        self,
        ck: MegatronCheckpoint,
        base: Mapping[str, _Meta] | None,
        strength: float,
        config: Mapping[str, Any] | None,
    ) -> None:
        self.ck, self.base, self.strength, self.base_config = ck, base, strength, config
        self.adapter = AdapterConfig.from_peft(ck.adapter_config, f"{ck.path}/adapter_config.json")
        self.out = NormalizedLora(ck.path, "megatron")
        self.fused: dict[tuple[int, str], list[tuple[int, _Part, float]]] = {}

    def scale(self, m: _Module, rank: int) -> float:
        """α/r (α/√r) with the config's full r; experts' tensors have rank r // topk."""
        r, alpha = self.adapter.rank_alpha(m.name.replace(f".experts.{m.expert}.", ".experts."))
        want = r // self.ck.config.topk if m.expert is not None else r
        if rank != want:
            what = f"r // moe_router_topk = {r} // {self.ck.config.topk}" if m.expert is not None else f"r = {r}"
            raise MatchError(
                f"{self.ck.path}: '{m.name}' has rank {rank} in the weights; the adapter config gives {what} = {want}"
            )
        return alpha / math.sqrt(r) if self.adapter.rslora else alpha / r

    def delta(self, target: str, m: _Module, part: _Part, c: float) -> Delta:
        _, a_shape, a_pieces, b_shape, b_pieces = part
        a = FactorRef(a_pieces[0].path, a_pieces[0].key, m.a[0].dtype, a_shape, Role.DOWN, a_pieces)
        b = FactorRef(b_pieces[0].path, b_pieces[0].key, m.b[0].dtype, b_shape, Role.UP, b_pieces)
        return Delta(target, DeltaKind.LORA, (a, b), c, self.strength, self.ck.path, m.name)

    def place(self, m: _Module) -> None:
        c = self.scale(m, m.a[0].shape[0])
        for part in _parts(m, self.ck.config):
            if m.expert is None:
                self.add(self.delta(f"model.layers.{m.layer}.{_HF_DENSE[part[0]]}.weight", m, part, c))
                continue
            target = self.expert_target(m, part[0])
            if target is None:
                self.fused.setdefault((m.layer, _EXPERT_NAMES[part[0]][0]), []).append((m.expert, part, c))
            else:
                self.add(self.delta(target, m, part, c))

    def expert_target(self, m: _Module, part: str) -> str | None:
        """The per-expert base tensor of ``part``; None when the base holds the layer's experts fused."""
        fused, name, mixtral = _EXPERT_NAMES[part]
        candidates = [
            f"model.layers.{m.layer}.mlp.experts.{m.expert}.{name}.weight",
            f"model.layers.{m.layer}.block_sparse_moe.experts.{m.expert}.{mixtral}.weight",
        ]
        if self.base is None:
            return candidates[0]
        hit = next((t for t in candidates if t in self.base), None)
        if hit is None and f"model.layers.{m.layer}.mlp.experts.{fused}" in self.base:
            return None
        return hit or candidates[0]

    def add(self, d: Delta) -> None:
        self.out.place(d, self.base, lambda target: f"no base tensor '{target}' in the base")

    def place_fused(self) -> None:
        """Each fused expert tensor's experts as one ``experts`` delta (A rows and B columns by expert)."""
        E = self.ck.config.experts
        for (layer, param), items in sorted(self.fused.items()):
            target = f"model.layers.{layer}.mlp.experts.{param}"
            assert self.base is not None
            if self.base_config is not None:
                expert_count(self.base, self.base_config, f"model.layers.{layer}.mlp.experts")
            items.sort(key=lambda x: (x[0], ("gate", "up", "down").index(x[1][0])))
            experts = sorted({e for e, _, _ in items})
            if experts != list(range(E)) or tuple(self.base[target].shape)[0] != E:
                raise MatchError(
                    f"{self.ck.path}: '{target}' {tuple(self.base[target].shape)} needs all {E} experts' LoRA"
                )
            self.out.deltas.append(self._fused_delta(target, items, E))

    def _dtype(self, piece: Piece) -> str:
        """The dtype of the rank-file tensor ``piece`` is cut from."""
        return next(f for f in self.ck.files if f.path == piece.path).tensors[piece.key].dtype

    def _fused_delta(self, target: str, items: list[tuple[int, _Part, float]], E: int) -> Delta:
        a_pieces: list[Piece] = []
        b_pieces: list[Piece] = []
        row = {e: 0 for e in range(E)}
        r = items[0][1][1][0]
        width = items[0][1][1][1]
        for e, (part, _, ap, b_shape, bp), _c in items:
            if part != "up":  # gate and up share A
                a_pieces += [Piece(p.path, p.key, p.rows, p.cols, (p.at[0] + e * r, p.at[1])) for p in ap]
            b_pieces += [Piece(p.path, p.key, p.rows, p.cols, (p.at[0] + row[e], p.at[1] + e * r)) for p in bp]
            row[e] += b_shape[0]
        code = self._dtype(a_pieces[0])
        a = FactorRef(a_pieces[0].path, a_pieces[0].key, code, (E * r, width), Role.DOWN, tuple(a_pieces))
        b = FactorRef(b_pieces[0].path, b_pieces[0].key, code, (row[0], E * r), Role.UP, tuple(b_pieces))
        d = Delta(target, DeltaKind.EXPERTS, (a, b), items[0][2], self.strength, self.ck.path, target, experts=E)
        check_delta(self.ck.path, self.base, d)
        return d


def normalize_megatron(
    ck: MegatronCheckpoint, base: Mapping[str, _Meta] | None, *, strength: float, base_config: Mapping[str, Any] | None
) -> NormalizedLora:
    """The deltas of a Megatron checkpoint against ``base`` (``None``: described alone, in the
    Hugging Face names of its family); ``normalize`` hands a Megatron checkpoint here, with its
    ``strength`` and ``base_config``.

    Raises:
        FormatError: an unmapped family or layer, router LoRA, shards that do not fit together.
        MatchError: the base is another family, ranks disagree with the adapter config.
    """
    _family(ck, base_config)
    placer = _Placer(ck, base, strength, base_config)
    modules = _modules(ck)
    if not modules:
        raise FormatError(f"{ck.path}: the checkpoint's rank files hold no LoRA tensors")
    for key in sorted(modules, key=lambda k: (k[0], k[1], -1 if k[2] is None else k[2])):
        placer.place(modules[key])
    if placer.fused:
        placer.place_fused()
    return placer.out
