"""Normalize any supported LoRA layout into one type: ``Delta`` (what to add to which base tensor).

Two data tables drive everything:

* ``LAYOUTS``: how a file's keys are recognised and which prefixes are stripped;
* ``SUFFIXES``: which tensor role a key suffix names (``down``/``up`` factor, ``alpha``, full
  ``diff`` …) and which base parameter it targets.

Every layout feeds the same grouping step (module -> roles), which yields ``Delta`` values with
base keys, factor references and the scale ``c`` (``α/r`` when the file carries ``α``, else 1).
Keys that cannot be placed are returned as ``Unmatched`` with a reason; nothing is dropped
silently. Bad shapes are errors.

Example:
    >>> from distmerge.lorafile import LoraFile, TensorMeta
    >>> from distmerge.header import TensorInfo
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
from typing import Protocol

from .dtypes import is_float
from .errors import FormatError, MatchError
from .lorafile import LoraFile

__all__ = ["FactorRef", "Delta", "Unmatched", "NormalizedLora", "Layout", "LAYOUTS", "SUFFIXES",
           "normalize", "delta_shape_error"]


class _Meta(Protocol):
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class FactorRef:
    """One LoRA tensor a task must read: ``key`` in ``path``."""

    path: str
    key: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        from .dtypes import itemsize
        return math.prod(self.shape) * itemsize(self.dtype)


@dataclass(frozen=True)
class Delta:
    """``W[target] += coef · ΔW`` where ΔW comes from ``factors`` according to ``kind``.

    ``kind`` is ``lora`` (factors = (down/A, up/B); ΔW = B.flatten(1) @ A.flatten(1) reshaped to W)
    or ``diff`` (factors = (D,); ΔW = D). ``coef = scale · strength``: ``scale`` is the format's
    ``c`` (α/r, or 1), ``strength`` the user's per-LoRA weight times the global ``--alpha``.
    """

    target: str
    kind: str
    factors: tuple[FactorRef, ...]
    scale: float
    strength: float
    source: str
    module: str = ""

    @property
    def coef(self) -> float:
        return self.scale * self.strength

    @property
    def rank(self) -> int | None:
        return self.factors[0].shape[0] if self.kind == "lora" else None


@dataclass(frozen=True)
class Unmatched:
    key: str
    reason: str


@dataclass
class NormalizedLora:
    path: str
    layout: str
    deltas: list[Delta] = field(default_factory=list)
    unmatched: list[Unmatched] = field(default_factory=list)


@dataclass(frozen=True)
class Layout:
    """A family of LoRA key layouts: recognised by ``detect``; ``prefixes`` are stripped."""

    name: str
    description: str
    example: str
    detect: re.Pattern[str]
    prefixes: tuple[str, ...] = ()


_P = re.compile
#: Tried in order; the first layout whose ``detect`` matches any key names the file.
LAYOUTS: tuple[Layout, ...] = (
    Layout("roll", "ROLL diffusion_module.pth / PEFT model with the adapter name in the keys",
           "base_model.model.blocks.0.self_attn.q.lora_A.default.weight",
           _P(r"^(?:pipe\.dit2?\.)?base_model\.model\..+\.lora_[AB]\.[^.]+\.weight$"),
           ("pipe.dit2.", "pipe.dit.", "base_model.model.")),
    Layout("peft", "PEFT adapter (base_model.model.…lora_A.weight)",
           "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
           _P(r"^base_model\.model\..+\.lora_[AB]\.weight$"), ("base_model.model.",)),
    Layout("diffsynth", "DiffSynth-Studio (bare module names, adapter name kept)",
           "blocks.0.self_attn.q.lora_A.default.weight",
           _P(r"^(?!diffusion_model\.|base_model\.|lora_unet).+\.lora_[AB]\.default\.weight$"),
           ("pipe.dit2.", "pipe.dit.")),
    Layout("diffusion_model", "ComfyUI / native Wan / lightx2v / Wan2.2-Lightning (diffusion_model.…)",
           "diffusion_model.blocks.0.self_attn.q.lora_down.weight",
           _P(r"^(?:model\.)?diffusion_model\."), ("model.diffusion_model.", "diffusion_model.")),
    Layout("kohya", "kohya / musubi-tuner (lora_unet_<path with _>)",
           "lora_unet_blocks_0_self_attn_q.lora_down.weight", _P(r"^lora_unet_")),
    Layout("plain", "bare module names (…lora_A.weight)", "blocks.0.self_attn.q.lora_A.weight",
           _P(r".")),
)

#: (pattern, role). Group 1 is the module path. Roles ``down``/``up``/``alpha`` form a LoRA pair;
#: ``diff*`` are full deltas. First match wins.
SUFFIXES: tuple[tuple[re.Pattern[str], str], ...] = (
    (_P(r"^(.+)\.lora_A(?:\.[^.]+)?\.weight$"), "down"),
    (_P(r"^(.+)\.lora_B(?:\.[^.]+)?\.weight$"), "up"),
    (_P(r"^(.+)\.lora_down\.weight$"), "down"),
    (_P(r"^(.+)\.lora_up\.weight$"), "up"),
    (_P(r"^(.+)\.lora\.down\.weight$"), "down"),
    (_P(r"^(.+)\.lora\.up\.weight$"), "up"),
    (_P(r"^(.+)_lora\.down\.weight$"), "down"),
    (_P(r"^(.+)_lora\.up\.weight$"), "up"),
    (_P(r"^(.+)\.lora_linear_layer\.down\.weight$"), "down"),
    (_P(r"^(.+)\.lora_linear_layer\.up\.weight$"), "up"),
    (_P(r"^(.+)\.lora_A$"), "down"),
    (_P(r"^(.+)\.lora_B$"), "up"),
    (_P(r"^(.+)\.alpha$"), "alpha"),
    (_P(r"^(.+)\.diff$"), "diff"),
    (_P(r"^(.+)\.diff_b$"), "diff_b"),
    (_P(r"^(.+)\.diff_m$"), "diff_m"),
)
#: which base parameter each full-delta role targets
_DIFF_PARAM = {"diff": "weight", "diff_b": "bias", "diff_m": "modulation"}


def detect_layout(keys: list[str]) -> Layout:
    """The first layout in ``LAYOUTS`` that recognises any of ``keys``."""
    for layout in LAYOUTS:
        if any(layout.detect.search(k) for k in keys):
            return layout
    return LAYOUTS[-1]


def _strip(key: str, prefixes: tuple[str, ...]) -> str:
    changed = True
    while changed:
        changed = False
        for p in prefixes:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def _kohya_map(base: Mapping[str, _Meta]) -> dict[str, str]:
    """Forward map ``lora_unet_<P with . -> _>`` -> ``P`` built from the base's ``P.weight`` keys."""
    out: dict[str, str] = {}
    for k in base:
        if k.endswith(".weight"):
            p = k[: -len(".weight")]
            out["lora_unet_" + p.replace(".", "_")] = p
    return out


def delta_shape_error(kind: str, shapes: tuple[tuple[int, ...], ...], w_shape: tuple[int, ...]) -> str | None:
    """Why a delta with factor ``shapes`` cannot be added to a tensor of ``w_shape`` (None if it can).

    >>> delta_shape_error("lora", ((4, 16), (8, 4)), (8, 16)) is None
    True
    >>> delta_shape_error("lora", ((4, 16), (8, 2)), (8, 16))
    'A has rank 4 but B has rank 2'
    """
    if kind == "diff":
        (d,) = shapes
        if d != w_shape:
            return f"delta has shape {d}, base needs {w_shape}"
        return None
    a, b = shapes
    if len(a) < 2 or len(b) < 2:
        return f"factors must be at least 2-D, found A {a} and B {b}"
    r = a[0]
    if math.prod(b[1:]) != r:
        return f"A has rank {r} but B has rank {math.prod(b[1:])}" if len(b) == 2 else \
            f"B {b} does not match A's rank {r} (expected ({w_shape[0] if w_shape else '?'}, {r}, 1, …))"
    if not w_shape or b[0] != w_shape[0] or math.prod(a[1:]) != math.prod(w_shape[1:]):
        return (f"B @ A gives ({b[0]}, {math.prod(a[1:])}) but base needs "
                f"({w_shape[0] if w_shape else '?'}, {math.prod(w_shape[1:])}) for shape {w_shape}")
    return None


def normalize(lf: LoraFile, base: Mapping[str, _Meta], *, strength: float = 1.0) -> NormalizedLora:
    """Turn one LoRA file into ``Delta`` values against ``base`` (key -> dtype/shape).

    Args:
        lf: the opened LoRA file.
        base: the base tensors (``TensorInfo`` or anything with ``dtype`` code and ``shape``).
        strength: the user's weight for this LoRA times the global alpha.

    Raises:
        MatchError: a factor pair whose ranks or shapes do not fit its base tensor, a delta on a
            non-float tensor, or a bad ``alpha`` value.
        FormatError: the file holds no tensors.
    """
    keys = list(lf.tensors)
    if not keys:
        raise FormatError(f"{lf.path}: the LoRA file holds no tensors")
    layout = detect_layout(keys)
    out = NormalizedLora(lf.path, layout.name)
    kohya = _kohya_map(base) if layout.name == "kohya" else {}
    modules: dict[str, dict[str, str]] = {}
    for key in keys:
        body = _strip(key, layout.prefixes)
        if body.startswith("lora_unet__"):  # Wan "Fun" double underscore
            body = "lora_unet_" + body[len("lora_unet__"):]
        for pattern, role in SUFFIXES:
            m = pattern.match(body)
            if m:
                roles = modules.setdefault(m.group(1), {})
                if role in roles:
                    out.unmatched.append(Unmatched(key, f"duplicate {role} tensor for module "
                                                        f"'{m.group(1)}' (also '{roles[role]}')"))
                else:
                    roles[role] = key
                break
        else:
            out.unmatched.append(Unmatched(key, "unknown key suffix (not a LoRA factor, alpha or diff)"))
    for module, roles in modules.items():
        path = kohya.get(module, module)
        for role in ("diff", "diff_b", "diff_m"):
            if role in roles:
                _add(out, lf, base, Delta(f"{path}.{_DIFF_PARAM[role]}", "diff",
                                          (_ref(lf, roles[role]),), 1.0, strength, lf.path, module))
        down, up = roles.get("down"), roles.get("up")
        if down and up:
            scale = _scale(lf, roles.get("alpha"), lf.tensors[down].shape[0])
            _add(out, lf, base, Delta(f"{path}.weight", "lora", (_ref(lf, down), _ref(lf, up)),
                                      scale, strength, lf.path, module))
        elif down or up:
            have, miss = ("A/down", "B/up") if down else ("B/up", "A/down")
            out.unmatched.append(Unmatched(down or up, f"{have} factor without its {miss} factor"))
        elif "alpha" in roles:
            out.unmatched.append(Unmatched(roles["alpha"], "alpha without LoRA factors"))
    return out


def _ref(lf: LoraFile, key: str) -> FactorRef:
    meta = lf.tensors[key]
    return FactorRef(lf.path, key, meta.dtype, meta.shape)


def _scale(lf: LoraFile, alpha_key: str | None, rank: int) -> float:
    if alpha_key is None:
        return 1.0
    t = lf.read(alpha_key)
    if t.numel() != 1:
        raise MatchError(f"{lf.path}: '{alpha_key}' should be a scalar, found shape {tuple(t.shape)}")
    alpha = float(t.float().item())
    if not math.isfinite(alpha) or rank <= 0:
        raise MatchError(f"{lf.path}: '{alpha_key}' = {alpha} with rank {rank}; expected a finite "
                         "alpha and a positive rank")
    return alpha / rank


def _add(out: NormalizedLora, lf: LoraFile, base: Mapping[str, _Meta], d: Delta) -> None:
    w = base.get(d.target)
    if w is None:
        for f in d.factors:
            out.unmatched.append(Unmatched(f.key, f"no base tensor '{d.target}'"))
        return
    if not is_float(w.dtype):
        raise MatchError(f"{lf.path}: '{d.factors[0].key}' targets '{d.target}', which is {w.dtype}; "
                         "deltas can only be added to floating-point tensors")
    for f in d.factors:
        if not is_float(f.dtype):
            raise MatchError(f"{lf.path}: '{f.key}' has dtype {f.dtype}, expected a float type")
    why = delta_shape_error(d.kind, tuple(f.shape for f in d.factors), tuple(w.shape))
    if why:
        names = " and ".join(f"'{f.key}' {f.shape}" for f in d.factors)
        raise MatchError(f"{lf.path}: {names} cannot merge into base '{d.target}' {tuple(w.shape)}: {why}")
    out.deltas.append(d)
