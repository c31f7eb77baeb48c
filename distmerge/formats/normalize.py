"""Normalize any supported LoRA layout into one type: ``Delta`` (what to add to which base tensor).

Three data tables drive everything:

* ``LAYOUTS``: how a file is recognised and which prefixes are stripped from its keys;
* ``SUFFIXES``: which role a key suffix names (``down``/``up`` factor, ``alpha``, ``diff``, LoHa and
  LoKr factors, DoRA magnitudes …); unsupported families (OFT/BOFT, GLoRA) are listed too, so they
  fail with their name instead of being skipped;
* ``keymap``: module paths -> base keys (diffusers names, kohya underscores).

Grouping by module turns roles (``Role``) into ``Delta`` values of a ``DeltaKind`` with the scale ``c``: ``α/r`` from a
``.alpha`` tensor, else from a PEFT/diffusers config, else 1. Keys that cannot be placed come back as
``Unmatched`` with a reason; shapes that cannot fit are errors. Nothing is dropped silently.

Example:
    >>> from distmerge.inputs.lorafile import LoraFile, TensorMeta
    >>> from distmerge.inputs.header import TensorInfo
    >>> base = {"blocks.0.self_attn.q.weight": TensorInfo("blocks.0.self_attn.q.weight", "F32",
    ...                                                  (8, 8), "base.safetensors", 8, 256)}
    >>> lf = LoraFile("lora.pth", "pickle", {
    ...     "base_model.model.blocks.0.self_attn.q.lora_A.default.weight": TensorMeta("BF16", (2, 8)),
    ...     "base_model.model.blocks.0.self_attn.q.lora_B.default.weight": TensorMeta("BF16", (8, 2))})
    >>> n = normalize(lf, base, strength=0.5)
    >>> n.layout, n.deltas[0].target, n.deltas[0].scale, n.deltas[0].coef
    ('roll', 'blocks.0.self_attn.q.weight', 1.0, 0.5)
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from distmerge.errors import FormatError, MatchError
from distmerge.formats.deltas import Delta, FactorRef, NormalizedLora, Piece, Unmatched, check_delta
from distmerge.formats.experts import ParamWrappers, warn_converted_expert_ranks, wrapper_module
from distmerge.formats.keymap import (
    UNDERSCORE_PREFIXES,
    decode_wan_underscore,
    diffusers_param_to_wan,
    strip_prefixes,
    underscore_map,
)
from distmerge.formats.kinds import DeltaKind, Role
from distmerge.formats.naming import BaseNames, first_detecting
from distmerge.formats.scales import AdapterConfig
from distmerge.formats.shapes import TensorLike, delta_shape_error

if TYPE_CHECKING:
    from distmerge.inputs.lorafile import LoraFile  # annotations only: normalizing needs no torch

__all__ = [
    "Piece",
    "FactorRef",
    "Delta",
    "Unmatched",
    "NormalizedLora",
    "Layout",
    "LAYOUTS",
    "SUFFIXES",
    "normalize",
    "detect_layout",
    "delta_shape_error",
    "check_delta",
]


_Meta = TensorLike


@dataclass(frozen=True)
class Layout:
    """A family of LoRA key layouts: recognised by ``detect``; ``prefixes`` are stripped."""

    name: str
    description: str
    example: str
    detect: re.Pattern[str]
    prefixes: tuple[str, ...] = ()
    diffusers_names: bool = False


_P = re.compile
_WRAPPERS = ("pipe.dit2.", "pipe.dit.", "base_model.model.")
#: Tried in order; the first layout whose ``detect`` matches any key names the file. A PEFT folder
#: (``adapter_config.json``) is always ``peft``.
LAYOUTS: tuple[Layout, ...] = (
    Layout(
        "roll",
        "ROLL diffusion_module.pth / PEFT model with the adapter name in the keys",
        "base_model.model.blocks.0.self_attn.q.lora_A.default.weight",
        _P(r"^(?:pipe\.dit2?\.)?base_model\.model\..+\.lora_[AB]\.[^.]+\.weight$"),
        _WRAPPERS,
    ),
    Layout(
        "peft",
        "PEFT adapter (base_model.model.…lora_A.weight)",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        _P(r"^base_model\.model\."),
        _WRAPPERS,
    ),
    Layout(
        "diffusers",
        "diffusers (transformer.blocks.N.attn1.to_q.lora_A.weight)",
        "transformer.blocks.0.attn1.to_q.lora_A.weight",
        _P(r"^transformer(?:_2)?\."),
        ("transformer.", "transformer_2."),
        diffusers_names=True,
    ),
    Layout(
        "diffsynth",
        "DiffSynth-Studio (bare module names, adapter name kept)",
        "blocks.0.self_attn.q.lora_A.default.weight",
        _P(r"^(?!diffusion_model\.|base_model\.|lora_unet|lycoris_).+\.lora_[AB]\.default\.weight$"),
        ("pipe.dit2.", "pipe.dit."),
    ),
    Layout(
        "diffusion_model",
        "ComfyUI / native Wan / lightx2v / Wan2.2-Lightning (diffusion_model.…)",
        "diffusion_model.blocks.0.self_attn.q.lora_down.weight",
        _P(r"^(?:model\.)?diffusion_model\."),
        ("model.diffusion_model.", "diffusion_model."),
    ),
    Layout(
        "kohya",
        "kohya / musubi-tuner / LyCORIS (lora_unet_<path with _>)",
        "lora_unet_blocks_0_self_attn_q.lora_down.weight",
        _P(r"^(?:lora_unet_|lycoris_)"),
    ),
    Layout(
        "megatron",
        "Megatron LoRA checkpoint (ROLL mcore_adapter: iter_…/mp_rank_…/model_optim_rng.pt)",
        "decoder.layers.0.self_attention.linear_qkv.lora_A.weight",
        _P(r"^iter_\d+/mp_rank_\d+"),  # rank files are read by ``formats.megatron``, never detected
    ),
    Layout("plain", "bare module names (…lora_A.weight)", "blocks.0.self_attn.q.lora_A.weight", _P(r".")),
)

_A = r"(?:\.[^.]+)?"  # an optional adapter-name token (``.default``)
#: (pattern, role): a ``Role``, or ``!<family>`` for a family distmerge refuses. Group 1 is the
#: module path. First match wins.
SUFFIXES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(p), role)
    for p, role in (
        (rf"^(.+)\.lora_A{_A}\.weight$", Role.DOWN),
        (rf"^(.+)\.lora_B{_A}\.weight$", Role.UP),
        (rf"^(.+)\.lora_B{_A}\.bias$", Role.UP_BIAS),
        (r"^(.+)\.lora_down\.weight$", Role.DOWN),
        (r"^(.+)\.lora_up\.weight$", Role.UP),
        (r"^(.+)\.lora_mid\.weight$", Role.MID),
        (r"^(.+)\.lora\.down\.weight$", Role.DOWN),
        (r"^(.+)\.lora\.up\.weight$", Role.UP),
        (r"^(.+)_lora\.down\.weight$", Role.DOWN),
        (r"^(.+)_lora\.up\.weight$", Role.UP),
        (r"^(.+)\.lora_linear_layer\.down\.weight$", Role.DOWN),
        (r"^(.+)\.lora_linear_layer\.up\.weight$", Role.UP),
        (rf"^(.+)\.lora_embedding_A{_A}$", Role.EMB_DOWN),
        (rf"^(.+)\.lora_embedding_B{_A}$", Role.EMB_UP),
        (rf"^(.+)\.lora_magnitude_vector{_A}(?:\.weight)?$", Role.MAGNITUDE),
        (r"^(.+)\.dora_scale$", Role.DORA_SCALE),
        (r"^(.+)\.lora_A$", Role.DOWN),
        (r"^(.+)\.lora_B$", Role.UP),
        *(
            (rf"^(.+)\.{r}{_A}$", r)
            for r in (
                Role.HADA_W1_A,
                Role.HADA_W1_B,
                Role.HADA_W2_A,
                Role.HADA_W2_B,
                Role.HADA_T1,
                Role.HADA_T2,
                Role.LOKR_W1_A,
                Role.LOKR_W1_B,
                Role.LOKR_W2_A,
                Role.LOKR_W2_B,
                Role.LOKR_W1,
                Role.LOKR_W2,
                Role.LOKR_T2,
            )
        ),
        (r"^(.+)\.alpha$", Role.ALPHA),
        (r"^(.+)\.diff$", Role.DIFF),
        (r"^(.+)\.diff_b$", Role.DIFF_B),
        (r"^(.+)\.diff_m$", Role.DIFF_M),
        (r"^(.+)\.w_norm$", Role.W_NORM),
        (r"^(.+)\.b_norm$", Role.B_NORM),
        (r"^(.+)\.set_weight$", Role.SET_WEIGHT),
        # families distmerge refuses by name rather than skip
        (rf"^(.+)\.(?:oft_blocks|oft_R{_A}(?:\.weight)?|boft_R{_A}|boft_s{_A})$", "!OFT/BOFT"),
        (r"^(.+)\.(?:a1|a2|b1|b2)\.weight$", "!GLoRA"),
        (r"^(.+)\.reshape_weight$", "!reshape_weight"),
    )
)
#: full-delta roles: role -> (kind, base parameter)
_FULL = {
    Role.DIFF: (DeltaKind.DIFF, "weight"),
    Role.DIFF_B: (DeltaKind.DIFF, "bias"),
    Role.DIFF_M: (DeltaKind.DIFF, "modulation"),
    Role.W_NORM: (DeltaKind.DIFF, "weight"),
    Role.B_NORM: (DeltaKind.DIFF, "bias"),
    Role.SET_WEIGHT: (DeltaKind.SET, "weight"),
}
_LOHA = (Role.HADA_W1_A, Role.HADA_W1_B, Role.HADA_W2_A, Role.HADA_W2_B)
_LOKR = (
    Role.LOKR_W1,
    Role.LOKR_W1_A,
    Role.LOKR_W1_B,
    Role.LOKR_W2,
    Role.LOKR_W2_A,
    Role.LOKR_W2_B,
    Role.LOKR_T2,
)


def detect_layout(keys: list[str], *, has_config: bool = False) -> Layout:
    """The first layout in ``LAYOUTS`` that recognises any of ``keys``."""
    if has_config:
        return next(lay for lay in LAYOUTS if lay.name == "peft")
    return first_detecting(LAYOUTS, keys)


class _Ctx:
    """Per-file state for grouping: the file, the base and its naming, the layout and its scale
    source."""

    def __init__(self, lf: LoraFile, base: Mapping[str, _Meta] | None, layout: Layout, strength: float) -> None:
        self.lf, self.base, self.layout, self.strength = lf, base, layout, strength
        self.out = NormalizedLora(lf.path, layout.name)
        self.config = (
            AdapterConfig.from_peft(lf.config, lf.path)
            if lf.config is not None
            else AdapterConfig.from_diffusers_metadata(lf.metadata, lf.path)
        )
        self.names = BaseNames(base) if base is not None else None
        self.underscore: dict[str, str] = {}
        if layout.name == "kohya" and self.names is not None:  # native module names first
            self.underscore = underscore_map(sorted(self.names.keys) + self.names.canonical_keys)

    def ref(self, key: str, role: str) -> FactorRef:
        m = self.lf.tensors[key]
        return FactorRef(self.lf.path, key, m.dtype, m.shape, role)

    def module_path(self, module: str) -> str | None:
        """``module`` as a dotted path (kohya names decoded through the base's modules, else through
        the Wan module table, so a missing target is still named), ``None`` for a kohya name that
        neither decodes."""
        if module.startswith(UNDERSCORE_PREFIXES) and self.layout.name == "kohya" and self.names is not None:
            return self.underscore.get(module) or decode_wan_underscore(module)
        return module

    def target(self, key: str) -> str:
        """The base key LoRA target ``key`` lands on; without a match (or a base), the key as the
        LoRA means it in the canonical naming, for ``_add`` to report."""
        found = self.names.find(key, diffusers_names=self.layout.diffusers_names) if self.names else None
        if found is not None:
            return found
        return diffusers_param_to_wan(key) if self.layout.diffusers_names else key

    def missing(self, target: str) -> str:
        """Why ``target`` is not in the base, in the base's own naming."""
        assert self.names is not None
        native = self.names.native(target)
        where = f"the base (named {self.names.naming.name}: {self.names.naming.description})"
        return (
            f"no base tensor '{native}' in {where}"
            if native == target
            else (f"no base tensor '{native}' ('{target}' in original Wan names) in {where}")
        )


def normalize(
    lf: LoraFile,
    base: Mapping[str, _Meta] | None,
    *,
    strength: float = 1.0,
    base_config: Mapping[str, Any] | None = None,
) -> NormalizedLora:
    """Turn one LoRA file into ``Delta`` values against ``base`` (key -> dtype/shape).

    Args:
        lf: the opened LoRA file.
        base: the base tensors (``TensorInfo`` or anything with a ``dtype`` code and ``shape``);
            ``None`` to describe the file alone (no target or shape checks; ``inspect``).
        strength: the user's weight for this LoRA times the global alpha.
        base_config: the base's ``config.json`` (MoE expert counts, the model family), if any.

    Raises:
        FormatError: an empty file, or a family distmerge does not merge (OFT/BOFT, GLoRA, …).
        MatchError: factors whose ranks or shapes do not fit their base tensor, a delta on a
            non-float (e.g. quantized) tensor, or a bad ``alpha`` value.
    """
    if lf.megatron is not None:
        from distmerge.formats.megatron import normalize_megatron

        return normalize_megatron(lf.megatron, base, strength=strength, base_config=base_config)
    keys = list(lf.tensors)
    if not keys:
        raise FormatError(f"{lf.path}: the LoRA file holds no tensors")
    ctx = _Ctx(lf, base, detect_layout(keys, has_config=lf.config is not None), strength)
    keys = _param_wrappers(ctx, keys, base_config)
    modules: dict[str, dict[str, str]] = {}
    for key in keys:
        body = strip_prefixes(key, ctx.layout.prefixes).replace(".base_layer.", ".")
        if body.startswith("lora_unet__"):  # Wan "Fun" double underscore
            body = "lora_unet_" + body[len("lora_unet__") :]
        role, module = _classify(body)
        if role is None:
            full = ctx.target(body)
            if base is not None and full in base and tuple(base[full].shape) == lf.tensors[key].shape:
                _add(ctx, Delta(full, DeltaKind.SET, (ctx.ref(key, Role.SET),), 1.0, 1.0, lf.path, full))
            else:
                ctx.out.unmatched.append(
                    Unmatched(key, "unknown key suffix (not a LoRA factor, alpha, diff or a full base tensor)")
                )
            continue
        if role.startswith("!"):
            raise FormatError(
                f"{lf.path}: '{key}' is a {role[1:]} tensor; distmerge does not merge "
                f"{role[1:]} adapters (they are not additive low-rank deltas)"
            )
        roles = modules.setdefault(module, {})
        if role in roles:
            ctx.out.unmatched.append(
                Unmatched(key, f"duplicate {role} tensor for module '{module}' (also '{roles[role]}')")
            )
        else:
            roles[role] = key
    for module, roles in modules.items():
        _group(ctx, module, roles)
    return ctx.out


def _param_wrappers(ctx: _Ctx, keys: list[str], base_config: Mapping[str, Any] | None) -> list[str]:
    """Turn a PEFT adapter's ``target_parameters`` pairs (MoE experts) into deltas; the other keys
    are returned for the module path."""
    cfg = ctx.config
    if cfg is None:
        return keys
    if cfg.rank_pattern:
        warn_converted_expert_ranks(ctx.lf.path, cfg.rank_pattern, cfg.r, base_config)
    if not cfg.target_parameters:
        return keys
    bodies = {strip_prefixes(k, ctx.layout.prefixes): k for k in keys}
    wrapped = {b: k for b, k in bodies.items() if wrapper_module(b, cfg.target_parameters)}
    metas = {b: ctx.lf.tensors[k] for b, k in wrapped.items()}
    wrappers = ParamWrappers(ctx.lf.path, metas, cfg.target_parameters, wrapped)
    for d in wrappers.deltas(ctx.base, base_config, cfg, ctx.strength):
        _add(ctx, d)
    taken = set(wrapped.values())
    return [k for k in keys if k not in taken]


def _classify(body: str) -> tuple[str | None, str]:
    for pattern, role in SUFFIXES:
        m = pattern.match(body)
        if m:
            return role, m.group(1)
    return None, ""


def _group(ctx: _Ctx, module: str, roles: dict[str, str]) -> None:
    """Turn one module's tensors (role -> key) into deltas; leftovers become ``Unmatched``."""
    path = ctx.module_path(module)
    if path is None:
        for key in roles.values():
            ctx.out.unmatched.append(
                Unmatched(
                    key, f"no base tensor for kohya module '{module}' (no module of the base has that underscore name)"
                )
            )
        return
    group = _ModuleGroup(ctx, module, path, roles)
    group.full_deltas()
    group.lora()
    group.embedding()
    group.loha()
    group.lokr()
    group.leftovers()


@dataclass
class _ModuleGroup:
    """One module's LoRA tensors (role -> key) while they become deltas, in a fixed order of steps
    (full deltas, LoRA pair, embedding pair, LoHa, LoKr); ``used`` collects the roles consumed."""

    ctx: _Ctx
    module: str
    path: str  #: the module as a dotted path (``ctx.module_path``)
    roles: dict[str, str]
    used: set[str] = field(default_factory=set)

    def add(
        self,
        kind: DeltaKind,
        param: str,
        rs: tuple[str, ...],
        scale: float,
        *,
        strength: float | None = None,
        transpose: bool = False,
        dora: str = "",
    ) -> None:
        """A delta of ``kind`` from the tensors of roles ``rs`` on the module's parameter ``param``."""
        ctx = self.ctx
        self.used.update(rs)
        factors = tuple(ctx.ref(self.roles[r], r) for r in rs)
        strength = ctx.strength if strength is None else strength
        target = ctx.target(f"{self.path}.{param}")
        _add(ctx, Delta(target, kind, factors, scale, strength, ctx.lf.path, self.module, transpose, dora))

    def scale(self, rank_role: str) -> float:
        """The module's ``c`` for the rank of the factor of ``rank_role``."""
        rank = self.ctx.lf.tensors[self.roles[rank_role]].shape[0]
        return _scale(self.ctx, self.module, self.roles.get(Role.ALPHA), rank)

    def full_deltas(self) -> None:
        """Whole-tensor deltas: ``diff`` and the like, and ``set_weight`` (a replacement: strength 1)."""
        for role, (kind, param) in _FULL.items():
            if role in self.roles:
                self.add(kind, param, (role,), 1.0, strength=1.0 if kind == DeltaKind.SET else None)

    def lora(self) -> None:
        """A down/up pair (with a LoCon ``mid`` and a DoRA magnitude), and a B bias as a ``diff``."""
        roles, cfg = self.roles, self.ctx.config
        if Role.DOWN not in roles or Role.UP not in roles:
            return
        c = self.scale(Role.DOWN)
        rs = (Role.DOWN, Role.UP) + ((Role.MID,) if Role.MID in roles else ())
        dora = "peft" if Role.MAGNITUDE in roles else "lycoris" if Role.DORA_SCALE in roles else ""
        rs += (Role.MAGNITUDE,) if dora == "peft" else (Role.DORA_SCALE,) if dora == "lycoris" else ()
        self.add(DeltaKind.LORA, "weight", rs, c, transpose=bool(cfg and cfg.fan_in_fan_out), dora=dora)
        if Role.UP_BIAS in roles:
            self.add(DeltaKind.DIFF, "bias", (Role.UP_BIAS,), c)
        self.used.add(Role.ALPHA)

    def embedding(self) -> None:
        """A PEFT embedding pair: a LoRA pair applied transposed."""
        roles = self.roles
        if Role.EMB_DOWN not in roles or Role.EMB_UP not in roles:
            return
        c = self.scale(Role.EMB_DOWN)
        self.roles = {**roles, Role.DOWN: roles[Role.EMB_DOWN], Role.UP: roles[Role.EMB_UP]}
        self.used.update((Role.EMB_DOWN, Role.EMB_UP, Role.ALPHA))
        self.add(DeltaKind.LORA, "weight", (Role.DOWN, Role.UP), c, transpose=True)

    def loha(self) -> None:
        """A complete LoHa set (with Tucker cores when both are present)."""
        roles = self.roles
        if not all(r in roles for r in _LOHA):
            return
        tucker = (Role.HADA_T1, Role.HADA_T2) if Role.HADA_T1 in roles and Role.HADA_T2 in roles else ()
        dora = "lycoris" if Role.DORA_SCALE in roles else ""
        self.add(DeltaKind.LOHA, "weight", _LOHA + tucker, self.scale(Role.HADA_W1_B), dora=dora)
        self.used.update((Role.ALPHA, Role.DORA_SCALE))

    def lokr(self) -> None:
        """The LoKr factors present (which ones are needed is checked with the shapes)."""
        rs = tuple(r for r in _LOKR if r in self.roles)
        if rs:
            self.add(DeltaKind.LOKR, "weight", rs, _lokr_scale(self.ctx, self.module, self.roles))
            self.used.add(Role.ALPHA)

    def leftovers(self) -> None:
        """Every tensor no step used, as ``Unmatched`` with the reason."""
        for role, key in self.roles.items():
            if role not in self.used:
                self.ctx.out.unmatched.append(Unmatched(key, _leftover_reason(role)))


def _leftover_reason(role: str) -> str:
    if role in (Role.DOWN, Role.EMB_DOWN):
        return "A/down factor without its B/up factor"
    if role in (Role.UP, Role.EMB_UP):
        return "B/up factor without its A/down factor"
    if role.startswith(("hada_", "lokr_")):
        return f"incomplete {role.split('_')[0].upper()} factor set ({role} alone)"
    return f"{role} tensor without LoRA factors for its module"


def _scale(ctx: _Ctx, module: str, alpha_key: str | None, rank: int) -> float:
    if alpha_key is not None:
        shape, alpha = ctx.lf.scalar(alpha_key)
        if alpha is None:
            raise MatchError(f"{ctx.lf.path}: '{alpha_key}' should be a scalar, found shape {shape}")
        if not math.isfinite(alpha) or rank <= 0:
            raise MatchError(
                f"{ctx.lf.path}: '{alpha_key}' = {alpha} with rank {rank}; expected a finite alpha and a positive rank"
            )
        return alpha / rank
    if ctx.config is not None:
        return ctx.config.scale(module, rank)
    return 1.0


def _lokr_scale(ctx: _Ctx, module: str, roles: dict[str, str]) -> float:
    """α/dim where a factor is decomposed (dim = w2_b's rank, else w1_b's), else 1."""
    dim = None
    for r in (Role.LOKR_W1_B, Role.LOKR_W2_B):
        if r in roles:
            dim = ctx.lf.tensors[roles[r]].shape[0]
    if dim is None:
        return 1.0
    return _scale(ctx, module, roles.get(Role.ALPHA), dim)


def _add(ctx: _Ctx, d: Delta) -> None:
    ctx.out.place(d, ctx.base, ctx.missing)
