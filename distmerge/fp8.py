"""fp8 bases and outputs: ComfyUI's scaled-fp8 convention, and the quantize/dequantize math.

A *scaled* fp8 weight is ``<layer>.weight`` in float8 (``F8_E4M3`` or ``F8_E5M2``) with a scalar
``<layer>.scale_weight`` (newer ComfyUI: ``<layer>.weight_scale``); its value is
``weight.float() * scale``. A ``scaled_fp8`` marker tensor (bare, ``model.diffusion_model.`` or
``diffusion_model.`` prefixed) tells ComfyUI the file uses the convention; its dtype names the
weights' fp8 type (a float32 marker means e4m3fn). A *plain* fp8 tensor has no scale.

Merging into a scaled weight dequantizes it, adds the deltas in float32 and rounds once to fp8
with round-to-nearest-even and a fresh per-tensor scale ``amax(|W'|) / fp8_max`` (448 for e4m3fn,
57344 for e5m2), so the largest value lands exactly on ±fp8_max and nothing saturates. Both the
new weight and its new scale are written; untouched weights, their scales, ``scale_input`` and
the marker are copied byte for byte. ``--dtype fp8_e4m3fn`` turns the 2-D ``.weight`` tensors of
the transformer blocks (``blocks.N.`` / ``layers.N.``, no norms or embeddings) into scaled fp8 with
new ``scale_weight`` keys and adds a marker; every other tensor keeps its dtype (on a base that
is already scaled fp8 it is the same as ``--dtype keep``).

Example:
    >>> import torch
    >>> q, s = quantize(torch.tensor([0.0, 1.0, -3.5, 7.0, 1.0625]), "F8_E4M3")
    >>> s.item(), q.float().tolist()           # 7 / 448 = 1/64; 1.0625 * 64 = 68 ties to even 64
    (0.015625, [0.0, 64.0, -224.0, 448.0, 64.0])
    >>> dequantize(q, s).tolist()
    [0.0, 1.0, -3.5, 7.0, 1.0]
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .dtypes import FP8_CODES, is_float, itemsize, to_torch
from .errors import PlanError
from .header import TensorInfo
from .mergemath import NonFiniteError

__all__ = ["FP8_MAX", "INPUT_SCALE_SUFFIXES", "MARKER", "SCALE_SUFFIXES", "ScaledLayout", "dequantize",
           "fresh_scale", "quantizable", "quantize", "scaled_layout"]

#: largest finite value of each fp8 code
FP8_MAX = {"F8_E4M3": 448.0, "F8_E5M2": 57344.0}
MARKER = "scaled_fp8"
#: where ComfyUI looks for the marker (``{unet_prefix}scaled_fp8``)
MARKER_PREFIXES = ("", "model.diffusion_model.", "diffusion_model.")
#: a weight's scale: legacy ComfyUI name first, then the newer one
SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
#: activation scales, copied untouched
INPUT_SCALE_SUFFIXES = (".scale_input", ".input_scale")
_CLI = {"F8_E4M3": "fp8_e4m3fn", "F8_E5M2": "fp8_e5m2", "BF16": "bf16", "F16": "fp16", "F32": "fp32"}
_BLOCK_RE = re.compile(r"(?:^|\.)(?:blocks|layers)\.\d+\.")


def fresh_scale(amax: float, code: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The per-tensor scale ``amax / fp8_max`` as a 0-d tensor of ``dtype`` (float32 division);
    1.0 for an all-zero tensor.

    >>> fresh_scale(7.0, "F8_E4M3").item(), fresh_scale(0.0, "F8_E4M3").item()
    (0.015625, 1.0)
    """
    if not math.isfinite(amax):
        raise NonFiniteError(f"max |value| {amax:.4g} is not finite")
    s = (torch.tensor(amax, dtype=torch.float32) / FP8_MAX[code]).to(dtype)
    return s if float(s) > 0 else torch.tensor(1.0, dtype=dtype)


def quantize(w: torch.Tensor, code: str, *, scale_dtype: torch.dtype = torch.float32,
             out: torch.Tensor | None = None, inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Round the float32 tensor ``w`` to fp8 ``code`` with a fresh per-tensor scale.

    ``q = fp8(clamp(w / s, ±fp8_max))`` with ``s = fresh_scale(amax|w|)`` rounded to
    ``scale_dtype`` first (so ``q.float() * s`` is what a loader computes). Round-to-nearest-even,
    deterministic; the clamp only absorbs the last-bit excess of ``amax / s``.

    Args:
        w: float32 values (any device).
        code: ``F8_E4M3`` or ``F8_E5M2``.
        scale_dtype: dtype of the scale tensor to write (float32 in ComfyUI's files).
        out: an fp8 tensor of ``w``'s shape to round into.
        inplace: ``w`` may be overwritten by the quotient (saves a temporary).

    Returns:
        ``(q, scale)``: the fp8 tensor (``out`` when given) and the 0-d scale (CPU).

    Raises:
        NonFiniteError: a value of ``w`` is NaN or infinite.

    >>> q, s = quantize(torch.tensor([[7.0, 1.1], [1.1875, -0.01]]), "F8_E4M3")
    >>> q.float().tolist()                      # 70.4 -> 72; 76 ties to even 80; -0.64 -> -0.625
    [[448.0, 72.0], [80.0, -0.625]]
    """
    amax = 0.0
    if w.numel():
        lo, hi = torch.aminmax(w)  # NaN propagates into both
        amax = max(-float(lo), float(hi))
    scale = fresh_scale(amax, code, scale_dtype)
    s32 = scale.to(device=w.device, dtype=torch.float32)
    quot = w.div_(s32) if inplace else w / s32
    quot.clamp_(-FP8_MAX[code], FP8_MAX[code])
    q = out.copy_(quot) if out is not None else quot.to(to_torch(code))
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """``q.float() * scale`` in float32 (ComfyUI's dequantization); ``q.float()`` without a scale."""
    w = q.to(torch.float32)
    return w if scale is None else w * scale.to(device=w.device, dtype=torch.float32)


def quantizable(key: str, info: TensorInfo) -> bool:
    """Whether ``--dtype fp8_*`` quantizes this tensor: a 2-D float ``.weight`` inside a
    transformer block (``blocks.N.``/``layers.N.``), not a norm or an embedding.

    >>> t = TensorInfo("blocks.0.ffn.0.weight", "BF16", (8, 4), "f", 0, 64)
    >>> quantizable(t.key, t), quantizable("patch_embedding.weight", t), quantizable("blocks.0.ffn.0.bias", t)
    (True, False, False)
    """
    if not (key.endswith(".weight") and len(info.shape) == 2 and is_float(info.dtype)):
        return False
    if not _BLOCK_RE.search(key):
        return False
    return not any(w in part for part in key.split(".") for w in ("norm", "embed"))


def _scale_key(tensors: Mapping[str, TensorInfo], weight: str) -> str | None:
    layer = weight[: -len(".weight")]
    return next((layer + s for s in SCALE_SUFFIXES if layer + s in tensors), None)


@dataclass(frozen=True)
class ScaledLayout:
    """How a base's fp8 tensors map to the output, for one ``--dtype`` choice (plain data).

    ``scales`` pairs each scaled fp8 weight of the base with its scale key; ``new_scales`` the
    weights ``--dtype fp8_*`` quantizes with the scale key to add; ``attached`` the pairs laid out
    next to each other (weight then scale) so that one task writes both.
    """

    path: str
    out_dtype: str | None
    marker: str | None = None  #: the base's marker key
    scales: Mapping[str, str] = field(default_factory=dict)
    new_scales: Mapping[str, str] = field(default_factory=dict)
    new_marker: str | None = None  #: a marker key to add
    attached: frozenset[str] = frozenset()  #: weight keys whose scale follows them in the layout

    @property
    def is_scaled(self) -> bool:
        return bool(self.scales or self.new_scales)

    @property
    def pairs(self) -> dict[str, str]:
        """weight -> scale for every attached pair (existing and new)."""
        both = {**self.scales, **self.new_scales}
        return {w: s for w, s in both.items() if w in self.attached}

    def out_code(self, key: str, src: str) -> str:
        """The output dtype of base tensor ``key`` (of dtype ``src``)."""
        if key in self.new_scales:
            return self.out_dtype  # type: ignore[return-value]
        if self.out_dtype and self.out_dtype not in FP8_CODES and is_float(src):
            return self.out_dtype
        return src

    def new_tensors(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Output keys the base lacks: new scales (float32 scalars) and the marker (empty fp8)."""
        out: dict[str, tuple[str, tuple[int, ...]]] = {s: ("F32", ()) for s in self.new_scales.values()}
        if self.new_marker:
            out[self.new_marker] = (self.out_dtype or "F8_E4M3", (0,))
        return out

    def recomputed(self, merged: Sequence[str] | frozenset[str] | set[str]) -> dict[str, str]:
        """scale -> weight for every scale whose value is recomputed (its weight is merged, or
        quantized by ``--dtype``), given the merged keys."""
        out = {s: w for w, s in self.new_scales.items()}
        out.update({s: w for w, s in self.scales.items() if w in merged})
        return out

    def blocks(self, keys: Sequence[str]) -> list[list[str]]:
        """Output keys in order, as blocks that must stay together (a weight and its attached
        scale); new keys follow their weight, a new marker comes last."""
        pairs = self.pairs
        followers = set(pairs.values())
        out = [[k, pairs[k]] if k in pairs else [k] for k in keys if k not in followers]
        if self.new_marker:
            out.append([self.new_marker])
        return out

    def check_merge(self, key: str, tensors: Mapping[str, TensorInfo]) -> None:
        """Raise ``PlanError`` when deltas cannot be merged into ``key`` under this layout."""
        info = tensors[key]
        if key in self.scales:
            s = tensors[self.scales[key]]
            if s.numel != 1 or not is_float(s.dtype) or s.dtype in FP8_CODES:
                raise PlanError(f"{s.path}: '{s.key}' (the scale of '{key}') has dtype {s.dtype} and shape "
                                f"{list(s.shape)}; expected a float scalar (per-tensor scale)")
            if key not in self.attached:
                raise PlanError(f"{info.path}: cannot merge into fp8 '{key}': its {info.nbytes} bytes are not a "
                                f"multiple of {itemsize(s.dtype)}, so its scale '{s.key}' cannot be laid out "
                                "after it")
        elif info.dtype in FP8_CODES and self.marker:
            raise PlanError(f"{info.path}: '{key}' is {info.dtype} in a scaled-fp8 checkpoint (marker "
                            f"'{self.marker}') but has no '{key.removesuffix('.weight')}{SCALE_SUFFIXES[0]}'; "
                            "expected a scale to dequantize it (ComfyUI would silently use 1.0)")


def _marker(tensors: Mapping[str, TensorInfo]) -> str | None:
    return next((p + MARKER for p in MARKER_PREFIXES if p + MARKER in tensors), None)


def _marker_code(info: TensorInfo) -> str:
    return info.dtype if info.dtype in FP8_CODES else "F8_E4M3"


def scaled_layout(tensors: Mapping[str, TensorInfo], out_dtype: str | None, *, path: str = "") -> ScaledLayout:
    """Find the fp8 pairs and marker of a base and plan ``--dtype`` (``out_dtype``, a code or None).

    Raises:
        PlanError: a scaled-fp8 base with a non-fp8 ``--dtype`` (the scales would be lost), or
            with ``--dtype`` of the other fp8 type.

    >>> T = lambda k, d, s: TensorInfo(k, d, s, "b.safetensors", 0, math.prod(s) * itemsize(d))
    >>> base = {t.key: t for t in [T("blocks.0.q.weight", "BF16", (4, 4)), T("blocks.0.q.bias", "BF16", (4,))]}
    >>> lay = scaled_layout(base, "F8_E4M3")
    >>> lay.new_scales, lay.new_marker, lay.out_code("blocks.0.q.bias", "BF16")
    ({'blocks.0.q.weight': 'blocks.0.q.scale_weight'}, 'scaled_fp8', 'BF16')
    """
    marker = _marker(tensors)
    scales = {}
    for k, t in tensors.items():
        if k.endswith(".weight") and t.dtype in FP8_CODES:
            s = _scale_key(tensors, k)
            if s is not None:
                scales[k] = s
    codes = {tensors[w].dtype for w in scales} | ({_marker_code(tensors[marker])} if marker else set())
    what = f"'{marker}'" if marker else f"'{next(iter(scales.values()))}'" if scales else ""
    if what and out_dtype and out_dtype not in FP8_CODES:
        raise PlanError(f"{path}: a scaled-fp8 checkpoint ({what}); --dtype {_CLI.get(out_dtype, out_dtype)} "
                        "would need its weights dequantized and its scales dropped, which distmerge does not do; "
                        "use --dtype keep")
    if what and out_dtype in FP8_CODES and codes != {out_dtype}:
        raise PlanError(f"{path}: a scaled-fp8 checkpoint in {'/'.join(sorted(_CLI[c] for c in codes))} ({what}); "
                        f"--dtype {_CLI[out_dtype]} would mix fp8 types; use --dtype keep or "
                        f"{'/'.join(sorted(_CLI[c] for c in codes))}")
    new_scales: dict[str, str] = {}
    suffix = SCALE_SUFFIXES[1] if any(s.endswith(SCALE_SUFFIXES[1]) for s in scales.values()) else SCALE_SUFFIXES[0]
    if out_dtype in FP8_CODES and not what:  # an already scaled base: as --dtype keep
        for k, t in tensors.items():
            if k in scales or not quantizable(k, t) or _scale_key(tensors, k) is not None:
                continue
            if t.numel and t.numel % 4 == 0:  # the float32 scale must stay 4-byte aligned after it
                new_scales[k] = k[: -len(".weight")] + suffix
    attached = frozenset([w for w, s in scales.items()
                          if tensors[w].nbytes and tensors[w].nbytes % itemsize(tensors[s].dtype) == 0]
                         + list(new_scales))
    new_marker = None
    if new_scales:
        prefixes = {_prefix(k) for k in new_scales}
        new_marker = (prefixes.pop() if len(prefixes) == 1 else "") + MARKER
    return ScaledLayout(path, out_dtype, marker, scales, new_scales, new_marker, attached)


def _prefix(key: str) -> str:
    m = _BLOCK_RE.search(key)
    assert m is not None
    return key[: m.start() + (1 if m.group(0).startswith(".") else 0)]
