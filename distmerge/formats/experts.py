"""PEFT ``target_parameters`` LoRAs on Mixture-of-Experts tensors, as ``Delta`` values.

transformers ≥ 5 holds a MoE layer's experts as fused 3-D parameters (``mlp.experts.gate_up_proj``
``(E, 2I, H)``, ``down_proj`` ``(E, H, I)``) and PEFT adapts them with ``target_parameters``. The
adapter names neither the parameter nor the expert (``../shared/reference/roll-llm-lora.md``):

* ``….experts.base_layer.lora_A.weight`` is the first parameter the experts module registers
  (``gate_up_proj``), ``….experts.lora_A.weight`` the last (``down_proj``): one ``.base_layer`` per
  parameter registered after it;
* A ``(E·r, in)`` is grouped by expert (row ``e·r + k``), B ``(out, r·E)`` by rank (column ``k·E + e``).

The base decides where each expert's delta lands: a fused 3-D tensor (an ``experts`` delta), or the
per-expert keys ``save_pretrained`` writes (``experts.e.gate_proj``/``up_proj``/``down_proj``,
Mixtral ``block_sparse_moe.experts.e.w1``/``w3``/``w2``: plain LoRA pairs read as slices of A and
B). The expert count comes from the base's config and its whole key set, and must agree with the
adapter's ``A`` rows over the config's ``r``.

Example:
    >>> from distmerge.inputs.lorafile import TensorMeta
    >>> metas = {"model.layers.0.mlp.experts.lora_A.weight": TensorMeta("F32", (6, 4)),
    ...          "model.layers.0.mlp.experts.lora_B.weight": TensorMeta("F32", (8, 6))}
    >>> base = {f"model.layers.0.mlp.experts.{e}.down_proj.weight": TensorMeta("F32", (8, 4)) for e in range(3)}
    >>> w = ParamWrappers("a.safetensors", metas, ("mlp.experts.down_proj",))
    >>> cfg = AdapterConfig("a.json", r=2, alpha=2.0)
    >>> [(d.target[-18:], d.factors[1].pieces[0].cols) for d in w.deltas(base, {"num_experts": 3}, cfg, 1.0)][:2]
    [('0.down_proj.weight', (0, 6, 3)), ('1.down_proj.weight', (1, 6, 3))]
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from distmerge.errors import FormatError, MatchError
from distmerge.formats.deltas import Delta, FactorRef, Piece
from distmerge.formats.kinds import DeltaKind, Role
from distmerge.formats.scales import AdapterConfig
from distmerge.formats.shapes import TensorLike

__all__ = ["ParamWrappers", "expert_count", "EXPERT_PARTS", "wrapper_module", "warn_converted_expert_ranks"]

logger = logging.getLogger("distmerge.experts")  # the name users see in -v logs

#: the order MoE experts modules register their parameters (PEFT nests its wrappers in this order)
REGISTRATION = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")
#: a fused parameter -> its per-expert weights on disk, in row order: (transformers names, Mixtral names)
EXPERT_PARTS: dict[str, tuple[tuple[str, ...], ...]] = {
    "gate_up_proj": (("gate_proj", "up_proj"), ("w1", "w3")),
    "down_proj": (("down_proj",), ("w2",)),
}
#: config.json keys that hold a MoE model's expert count
_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_KEY = re.compile(r"^(.+?)((?:\.base_layer)*)\.lora_([AB])(?:\.[^.]+)?\.weight$")


_Meta = TensorLike


def wrapper_module(body: str, targets: Sequence[str]) -> str | None:
    """The experts module a ``target_parameters`` adapter key belongs to (None: not such a key).

    >>> wrapper_module("model.layers.0.mlp.experts.base_layer.lora_A.weight", ["mlp.experts.gate_up_proj"])
    'model.layers.0.mlp.experts'
    """
    m = _KEY.match(body)
    if not m:
        return None
    module = m.group(1)
    return module if any(_param_of(module, t) for t in targets) else None


def _param_of(module: str, target: str) -> str | None:
    """The parameter name ``target`` (``mlp.experts.gate_up_proj``) picks on ``module``, if any."""
    parent, _, param = target.rpartition(".")
    if not parent or module == parent or module.endswith("." + parent):
        return param
    return None


def configured_count(config: Mapping[str, Any] | None) -> int | None:
    """The expert count a ``config.json`` gives (``num_experts``, ``num_local_experts`` …), if any.

    >>> configured_count({"num_local_experts": 8}), configured_count(None)
    (8, None)
    """
    return next((int(config[k]) for k in _COUNT_KEYS if config and isinstance(config.get(k), int)), None)


def expert_count(base: Mapping[str, Any], config: Mapping[str, Any] | None, module: str) -> int | None:
    """How many experts ``module`` has in the base: its per-expert keys (over the whole key set),
    checked against ``config.json``'s count when it has one (the count alone without such keys).

    >>> expert_count({"m.experts.0.w1.weight": 0, "m.experts.1.w1.weight": 0}, {"num_local_experts": 2}, "m.experts")
    2
    """
    pattern = re.compile(re.escape(module) + r"\.(\d+)\.")
    found = {int(m.group(1)) for k in base for m in [pattern.match(k)] if m}
    counted = max(found) + 1 if found else None
    if counted is not None and len(found) != counted:
        missing = sorted(set(range(counted)) - found)[:3]
        raise MatchError(f"the base has experts 0…{counted - 1} of '{module}' but lacks {missing}: an incomplete base")
    configured = configured_count(config)
    if counted is not None and configured is not None and counted != configured:
        raise MatchError(
            f"the base's config.json says {configured} experts but its weights hold {counted} for '{module}'"
        )
    return counted if counted is not None else configured


@dataclass(frozen=True)
class _Pair:
    module: str
    param: str
    a: str
    b: str


class ParamWrappers:
    """The ``target_parameters`` part of one PEFT adapter: keys (prefixes stripped) -> metas."""

    def __init__(
        self, path: str, metas: Mapping[str, _Meta], targets: Sequence[str], file_keys: Mapping[str, str] | None = None
    ) -> None:
        self.path, self.metas, self.targets = path, metas, tuple(targets)
        self.file_keys = dict(file_keys or {})  #: a stripped key -> the key in the file (default: the same)

    def pairs(self) -> list[_Pair]:
        """Every (module, parameter) LoRA pair, the parameter told by the nesting depth."""
        found: dict[str, dict[tuple[int, str], str]] = {}
        for key in self.metas:
            m = _KEY.match(key)
            if m and wrapper_module(key, self.targets):
                found.setdefault(m.group(1), {})[(m.group(2).count(".base_layer"), m.group(3))] = key
        pairs = []
        for module, keys in sorted(found.items()):
            params = self._params(module)
            depths = sorted({d for d, _ in keys})
            if depths != list(range(len(params))):
                raise FormatError(
                    f"{self.path}: '{module}' has LoRA pairs at {len(depths)} nesting depths but "
                    f"target_parameters names {len(params)} of its parameters ({', '.join(params)})"
                )
            for depth, param in zip(range(len(params) - 1, -1, -1), params):
                if (depth, "A") not in keys or (depth, "B") not in keys:
                    half = "B" if (depth, "A") in keys else "A"
                    raise MatchError(f"{self.path}: '{module}' has no lora_{half} for parameter '{param}'")
                pairs.append(_Pair(module, param, keys[(depth, "A")], keys[(depth, "B")]))
        return pairs

    def _params(self, module: str) -> list[str]:
        """The parameters of ``module`` the adapter targets, in registration order."""
        params = sorted({p for t in self.targets if (p := _param_of(module, t))}, key=_registration)
        unknown = [p for p in params if p not in REGISTRATION]
        if unknown and len(params) > 1:
            raise FormatError(
                f"{self.path}: target_parameters names {', '.join(params)} on '{module}'; the nesting "
                f"order of {', '.join(unknown)} is not known, so which LoRA pair is which parameter is ambiguous"
            )
        return params

    def deltas(
        self,
        base: Mapping[str, _Meta] | None,
        config: Mapping[str, Any] | None,
        adapter: AdapterConfig,
        strength: float,
    ) -> list[Delta]:
        """The deltas of every pair, scaled as ``adapter`` says for ``<module>.<parameter>``."""
        on = _Target(base, config, adapter, strength)
        out: list[Delta] = []
        for pair in self.pairs():
            out += _PairPlan(self, pair, on).deltas()
        return out


def _registration(param: str) -> tuple[int, str]:
    return (REGISTRATION.index(param) if param in REGISTRATION else len(REGISTRATION), param)


@dataclass(frozen=True)
class _Target:
    """What every pair of an adapter is placed on: the base (None: the adapter described alone),
    its ``config.json``, the adapter's config (ranks and α) and the strength."""

    base: Mapping[str, _Meta] | None
    config: Mapping[str, Any] | None
    adapter: AdapterConfig
    strength: float


class _PairPlan:
    """One (module, parameter) pair placed on the base."""

    def __init__(self, wrappers: ParamWrappers, pair: _Pair, on: _Target) -> None:
        self.path, self.metas, self.file_keys = wrappers.path, wrappers.metas, wrappers.file_keys
        self.pair, self.base, self.config = pair, on.base, on.config
        self.a, self.b = self.metas[pair.a], self.metas[pair.b]
        self.name = f"{pair.module}.{pair.param}"
        self.adapter, self.strength = on.adapter, on.strength

    def _ref(self, key: str, shape: tuple[int, ...], role: str, pieces: tuple[Piece, ...] = ()) -> FactorRef:
        real = self.file_keys.get(key, key)
        pieces = tuple(Piece(p.path, real, p.rows, p.cols, p.at) for p in pieces)
        return FactorRef(self.path, real, self.metas[key].dtype, shape, role, pieces)

    def _delta(
        self,
        target: str,
        kind: DeltaKind,
        factors: tuple[FactorRef, ...],
        c: float,
        *,
        experts: int = 0,
        transpose: bool = False,
    ) -> Delta:
        return Delta(
            target, kind, factors, c, self.strength, self.path, self.name, transpose=transpose, experts=experts
        )

    def deltas(self) -> list[Delta]:
        a, b = self.a.shape, self.b.shape
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            raise MatchError(
                f"{self.path}: '{self.pair.a}' {a} and '{self.pair.b}' {b} are not a LoRA pair "
                "(A's rows must equal B's columns: experts x rank)"
            )
        if self.base is None:  # inspect without a base: the fused parameter, E from the config's r
            return [self._fused(self.name, None)]
        fused = next((k for k in self._aliases(self.name) if k in self.base), None)
        if fused is not None:
            return [self._fused(fused, self.base[fused].shape)]
        return self._per_expert()

    @staticmethod
    def _aliases(name: str) -> list[str]:
        """``name`` and the on-disk spelling Mixtral keeps (``block_sparse_moe`` for ``mlp``)."""
        return [name] + ([name.replace(".mlp.experts", ".block_sparse_moe.experts")] if ".mlp.experts" in name else [])

    def _experts(self, count: int | None) -> tuple[int, float]:
        """(E, c): E from the base, checked against A's rows and the config's rank for the parameter."""
        rows = self.a.shape[0]
        r, _ = self.adapter.rank_alpha(self.name)
        if count is None and self.base is None:
            count = rows // r if rows % r == 0 else None
        if count is None:
            raise MatchError(
                f"{self.path}: '{self.name}': the base has no fused tensor and no per-expert weights for this "
                "parameter, and its config.json gives no expert count"
            )
        if rows != count * r:
            made = f"{rows // r} experts" if rows % r == 0 else "another model"
            raise MatchError(
                f"{self.path}: '{self.pair.a}' has {rows} rows, but the base has {count} experts and the adapter "
                f"config's rank for '{self.name}' is {r} ({count} x {r} = {count * r}): the adapter was made for {made}"
            )
        return count, self.adapter.scale(self.name, r)

    def _fused(self, target: str, shape: tuple[int, ...] | None) -> Delta:
        count = shape[0] if shape else configured_count(self.config)
        e, c = self._experts(count)
        transpose = False
        if shape is not None:
            transpose = self._orientation(target, shape)
        r = self.a.shape[0] // e
        by_expert = tuple(Piece(self.path, self.pair.b, cols=(x, e * r, e), at=(0, x * r)) for x in range(e))
        down = self._ref(self.pair.a, self.a.shape, Role.DOWN)
        up = self._ref(self.pair.b, self.b.shape, Role.UP, by_expert)
        return self._delta(target, DeltaKind.EXPERTS, (down, up), c, experts=e, transpose=transpose)

    def _orientation(self, target: str, shape: tuple[int, ...]) -> bool:
        """False for ``(E, out, in)`` (transformers' Qwen/Mixtral experts), True for ``(E, in, out)``;
        a square expert that fits both ways is refused."""
        out, inner = self.b.shape[0], self.a.shape[1]
        if len(shape) != 3:
            raise MatchError(
                f"{self.path}: '{self.pair.a}' targets '{target}' {shape}, which is not a 3-D expert tensor"
            )
        straight, turned = shape[1:] == (out, inner), shape[1:] == (inner, out)
        if straight and turned:
            raise MatchError(
                f"{self.path}: '{target}' {shape} has square experts: whether it is stored (E, out, in) or "
                "(E, in, out) cannot be told from its shape; refusing to guess"
            )
        if not (straight or turned):
            raise MatchError(
                f"{self.path}: '{self.pair.a}' {self.a.shape} and '{self.pair.b}' {self.b.shape} cannot merge "
                f"into '{target}' {shape}: each expert's delta is ({out}, {inner})"
            )
        return turned

    def _per_expert(self) -> list[Delta]:
        assert self.base is not None
        for module in self._aliases(self.pair.module):
            for parts in EXPERT_PARTS.get(self.pair.param, ()):
                if f"{module}.0.{parts[0]}.weight" in self.base:
                    return self._split(module, parts)
        raise MatchError(
            f"{self.path}: no base tensor for '{self.name}': neither a fused tensor nor per-expert "
            f"weights ('{self.pair.module}.0.…') are in the base"
        )

    def _split(self, module: str, parts: tuple[str, ...]) -> list[Delta]:
        """Per-expert LoRA pairs: A's rows of expert e, B's columns e, e+E, … and each part's rows."""
        assert self.base is not None
        e, c = self._experts(expert_count(self.base, self.config, module))
        r = self.a.shape[0] // e
        out: list[Delta] = []
        row = 0
        for part in parts:
            height = self.base[f"{module}.0.{part}.weight"].shape[0]
            for x in range(e):
                target = f"{module}.{x}.{part}.weight"
                w = self.base.get(target)
                if w is None or tuple(w.shape) != (height, self.a.shape[1]):
                    raise MatchError(
                        f"{self.path}: '{self.name}' expert {x} needs base '{target}' of shape "
                        f"({height}, {self.a.shape[1]}), found {None if w is None else tuple(w.shape)}"
                    )
                down = self._ref(
                    self.pair.a,
                    (r, self.a.shape[1]),
                    Role.DOWN,
                    (Piece(self.path, self.pair.a, rows=(x * r, (x + 1) * r, 1)),),
                )
                up_piece = Piece(self.path, self.pair.b, rows=(row, row + height, 1), cols=(x, e * r, e))
                up = self._ref(self.pair.b, (height, r), Role.UP, (up_piece,))
                out.append(self._delta(target, DeltaKind.LORA, (down, up), c))
            row += height
        if row != self.b.shape[0]:
            raise MatchError(
                f"{self.path}: '{self.pair.b}' has {self.b.shape[0]} rows but the base's "
                f"{'+'.join(parts)} weights of '{module}' have {row}"
            )
        return out


def warn_converted_expert_ranks(
    path: str, rank_pattern: Mapping[str, int], r: int, config: Mapping[str, Any] | None
) -> None:
    """Warn when a PEFT adapter's ``rank_pattern`` looks like ROLL's Megatron converter wrote it:
    expert modules at ``r // topk``, which PEFT scales by α/(r/topk), topk times what training used."""
    topk = config.get("num_experts_per_tok") if config else None
    if not isinstance(topk, int) or topk <= 1:
        return
    for pattern, rank in rank_pattern.items():
        if "experts" in pattern and isinstance(rank, int) and rank * topk == r:
            logger.warning(
                "%s: rank_pattern gives '%s' rank %d = r/topk (%d/%d), as ROLL's Megatron converter writes it; "
                "merged with PEFT's scale α/%d, these experts get %d× the delta the model was trained with "
                "(merge the Megatron checkpoint itself for the trained model)",
                path,
                pattern,
                rank,
                r,
                topk,
                rank,
                topk,
            )
            return
