"""fp8 layout decisions: which base tensors are scaled fp8, which ``--dtype fp8_*`` quantizes, and
which scale keys and marker the output gets (plain data; the rounding itself is ``tasks.fp8``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from distmerge.errors import PlanError
from distmerge.inputs.dtypes import FP8_CODES, is_float, itemsize
from distmerge.inputs.header import TensorInfo

__all__ = ["INPUT_SCALE_SUFFIXES", "MARKER", "SCALE_SUFFIXES", "ScaledLayout", "quantizable", "scaled_layout"]

MARKER = "scaled_fp8"
#: where ComfyUI looks for the marker (``{unet_prefix}scaled_fp8``)
MARKER_PREFIXES = ("", "model.diffusion_model.", "diffusion_model.")
#: a weight's scale: legacy ComfyUI name first, then the newer one
SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
#: activation scales, copied untouched
INPUT_SCALE_SUFFIXES = (".scale_input", ".input_scale")
_CLI = {"F8_E4M3": "fp8_e4m3fn", "F8_E5M2": "fp8_e5m2", "BF16": "bf16", "F16": "fp16", "F32": "fp32"}
_BLOCK_RE = re.compile(r"(?:^|\.)(?:blocks|layers)\.\d+\.")


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
                raise PlanError(
                    f"{s.path}: '{s.key}' (the scale of '{key}') has dtype {s.dtype} and shape "
                    f"{list(s.shape)}; expected a float scalar (per-tensor scale)"
                )
            if key not in self.attached:
                raise PlanError(
                    f"{info.path}: cannot merge into fp8 '{key}': its {info.nbytes} bytes are not a "
                    f"multiple of {itemsize(s.dtype)}, so its scale '{s.key}' cannot be laid out "
                    "after it"
                )
        elif info.dtype in FP8_CODES and self.marker:
            raise PlanError(
                f"{info.path}: '{key}' is {info.dtype} in a scaled-fp8 checkpoint (marker "
                f"'{self.marker}') but has no '{key.removesuffix('.weight')}{SCALE_SUFFIXES[0]}'; "
                "expected a scale to dequantize it (ComfyUI would silently use 1.0)"
            )


def _marker(tensors: Mapping[str, TensorInfo]) -> str | None:
    return next((p + MARKER for p in MARKER_PREFIXES if p + MARKER in tensors), None)


def _marker_code(info: TensorInfo) -> str:
    return info.dtype if info.dtype in FP8_CODES else "F8_E4M3"


def scaled_layout(tensors: Mapping[str, TensorInfo], out_dtype: str | None, *, path: str = "") -> ScaledLayout:
    """Find the fp8 pairs and marker of a base and plan ``--dtype`` (``out_dtype``, a code or None).

    Raises:
        PlanError: a scaled-fp8 base with a non-fp8 ``--dtype`` (the scales would be lost), or
            with ``--dtype`` of the other fp8 type.

    >>> import math
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
        raise PlanError(
            f"{path}: a scaled-fp8 checkpoint ({what}); --dtype {_CLI.get(out_dtype, out_dtype)} "
            "would need its weights dequantized and its scales dropped, which distmerge does not do; "
            "use --dtype keep"
        )
    if what and out_dtype in FP8_CODES and codes != {out_dtype}:
        raise PlanError(
            f"{path}: a scaled-fp8 checkpoint in {'/'.join(sorted(_CLI[c] for c in codes))} ({what}); "
            f"--dtype {_CLI[out_dtype]} would mix fp8 types; use --dtype keep or "
            f"{'/'.join(sorted(_CLI[c] for c in codes))}"
        )
    new_scales: dict[str, str] = {}
    suffix = SCALE_SUFFIXES[1] if any(s.endswith(SCALE_SUFFIXES[1]) for s in scales.values()) else SCALE_SUFFIXES[0]
    if out_dtype in FP8_CODES and not what:  # an already scaled base: as --dtype keep
        for k, t in tensors.items():
            if k in scales or not quantizable(k, t) or _scale_key(tensors, k) is not None:
                continue
            if t.numel and t.numel % 4 == 0:  # the float32 scale must stay 4-byte aligned after it
                new_scales[k] = k[: -len(".weight")] + suffix
    attached = frozenset(
        [w for w, s in scales.items() if tensors[w].nbytes and tensors[w].nbytes % itemsize(tensors[s].dtype) == 0]
        + list(new_scales)
    )
    new_marker = None
    if new_scales:
        prefixes = {_prefix(k) for k in new_scales}
        new_marker = (prefixes.pop() if len(prefixes) == 1 else "") + MARKER
    return ScaledLayout(path, out_dtype, marker, scales, new_scales, new_marker, attached)


def _prefix(key: str) -> str:
    m = _BLOCK_RE.search(key)
    assert m is not None
    return key[: m.start() + (1 if m.group(0).startswith(".") else 0)]
