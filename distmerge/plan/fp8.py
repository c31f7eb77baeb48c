"""fp8 layout decisions: which base tensors are scaled fp8, which ``--dtype fp8_*`` quantizes, and
which scale keys and marker the output gets (plain data; the rounding itself is ``tasks.fp8``).

ComfyUI's loader decides what a scaled-fp8 output must hold (the file and function each rule
comes from is cited where the rule is applied, and tested in ``tests/test_fp8_comfy.py``):

* a ``{prefix}scaled_fp8`` marker makes it build **every** ``Linear`` of the model with its scaled
  ops (``comfy/model_detection.py``: the marker's dtype becomes ``model_config.scaled_fp8``;
  ``comfy/model_base.py`` ``BaseModel.__init__`` passes it to ``comfy/ops.py``
  ``pick_operations``, which returns ``scaled_fp8_ops(..., override_dtype=<marker dtype>)``): a
  Linear weight left in bf16 is cast to fp8 as it loads, under the default ``scale_weight`` 1.0;
* every such Linear has a ``scale_weight`` parameter, and a ``scale_input`` one unless the marker
  has 2 elements (``scaled_fp8_ops(scale_input=fp8_optimizations)``; ``optimizations["fp8"]`` is
  ``nelement() != 2``): without the keys ``comfy/sd.py`` ``load_model_weights`` reports them
  missing;
* convolutions, norms, embedding tables (``nn.Embedding``) and bare parameters are not scaled
  ops: they keep their dtype.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from distmerge.errors import PlanError
from distmerge.inputs.dtypes import FP8_CODES, is_float, itemsize
from distmerge.inputs.header import TensorInfo

__all__ = [
    "EMBEDDING_TABLES",
    "INPUT_SCALE",
    "INPUT_SCALE_SUFFIXES",
    "MARKER",
    "SCALE_SUFFIXES",
    "ScaledLayout",
    "input_scale_key",
    "model_prefix",
    "quantizable",
    "scaled_layout",
]

MARKER = "scaled_fp8"
#: where ComfyUI looks for the marker (``{unet_prefix}scaled_fp8``; a text encoder's is bare,
#: ``comfy/text_encoders/*.py`` ``*_detect``), the most specific first
MARKER_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")
#: a weight's scale: legacy ComfyUI name first, then the newer one
SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
#: activation scales, in the same order as ``SCALE_SUFFIXES`` (one convention per position)
INPUT_SCALE_SUFFIXES = (".scale_input", ".input_scale")
#: the value of every new input scale: ComfyUI's own ``…_fp8_scaled`` files hold 1.0, and with
#: 1.0 its fp8 matmul (``comfy/ops.py`` ``fp8_linear``) only clamps the input to ±448
INPUT_SCALE = 1.0
#: modules that are token or position lookup tables (``nn.Embedding``, not Linear): never quantized
EMBEDDING_TABLES = frozenset(
    {
        "embed_tokens",
        "wte",
        "wpe",
        "word_embeddings",
        "position_embeddings",
        "token_type_embeddings",
        "embed_positions",
        "tok_embeddings",
        "shared",
    }
)
_CLI = {"F8_E4M3": "fp8_e4m3fn", "F8_E5M2": "fp8_e5m2", "BF16": "bf16", "F16": "fp16", "F32": "fp32"}


def quantizable(key: str, info: TensorInfo) -> bool:
    """Whether ``--dtype fp8_*`` quantizes this tensor: the weight of a Linear, i.e. a 2-D float
    ``.weight`` whose module is not a norm and not an embedding table (``EMBEDDING_TABLES``).
    Convolution weights have more dimensions, norm weights and biases one.

    >>> t = TensorInfo("text_embedding.0.weight", "BF16", (8, 4), "f", 0, 64)
    >>> [quantizable(k, t) for k in (t.key, "model.embed_tokens.weight", "blocks.0.norm.weight", "head.bias")]
    [True, False, False, False]
    """
    if not (key.endswith(".weight") and len(info.shape) == 2 and is_float(info.dtype)):
        return False
    module = key[: -len(".weight")].rsplit(".", 1)[-1]
    return "norm" not in module.lower() and module not in EMBEDDING_TABLES


def input_scale_key(scale_key: str) -> str:
    """The input-scale key that goes with the weight scale ``scale_key``, in its convention.

    >>> input_scale_key("blocks.0.q.scale_weight"), input_scale_key("blocks.0.q.weight_scale")
    ('blocks.0.q.scale_input', 'blocks.0.q.input_scale')
    """
    for s, i in zip(SCALE_SUFFIXES, INPUT_SCALE_SUFFIXES):
        if scale_key.endswith(s):
            return scale_key[: -len(s)] + i
    raise ValueError(f"'{scale_key}' is not a weight scale key ({', '.join(SCALE_SUFFIXES)})")


def _scale_key(tensors: Mapping[str, TensorInfo], weight: str) -> str | None:
    layer = weight[: -len(".weight")]
    return next((layer + s for s in SCALE_SUFFIXES if layer + s in tensors), None)


@dataclass(frozen=True)
class ScaledLayout:
    """How a base's fp8 tensors map to the output, for one ``--dtype`` choice (plain data).

    ``scales`` pairs each scaled fp8 weight of the base with its scale key; ``new_scales`` the
    weights ``--dtype fp8_*`` quantizes with the scale key to add, ``new_inputs`` the same weights
    with the input-scale key to add (``INPUT_SCALE``); ``attached`` the weights laid out with their
    scales right after them (weight, scale, new input scale) so that one task writes all of them.
    """

    path: str
    out_dtype: str | None
    marker: str | None = None  #: the base's marker key
    scales: Mapping[str, str] = field(default_factory=dict)
    new_scales: Mapping[str, str] = field(default_factory=dict)
    new_marker: str | None = None  #: a marker key to add
    attached: frozenset[str] = frozenset()  #: weight keys whose scale follows them in the layout
    new_inputs: Mapping[str, str] = field(default_factory=dict)

    @property
    def is_scaled(self) -> bool:
        return bool(self.scales or self.new_scales)

    @property
    def pairs(self) -> dict[str, str]:
        """weight -> scale for every attached pair (existing and new)."""
        both = {**self.scales, **self.new_scales}
        return {w: s for w, s in both.items() if w in self.attached}

    def followers(self) -> dict[str, str]:
        """follower -> weight for every key laid out right after an attached weight, in layout
        order: its scale, then its new input scale."""
        out: dict[str, str] = {}
        for w, s in self.pairs.items():
            out[s] = w
            if w in self.new_inputs:
                out[self.new_inputs[w]] = w
        return out

    def out_code(self, key: str, src: str) -> str:
        """The output dtype of base tensor ``key`` (of dtype ``src``)."""
        if key in self.new_scales:
            return self.out_dtype  # type: ignore[return-value]
        if self.out_dtype and self.out_dtype not in FP8_CODES and is_float(src):
            return self.out_dtype
        return src

    def new_tensors(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Output keys the base lacks: new scales and input scales (float32 scalars) and the
        marker (empty fp8)."""
        out: dict[str, tuple[str, tuple[int, ...]]] = {s: ("F32", ()) for s in self.new_scales.values()}
        out.update({i: ("F32", ()) for i in self.new_inputs.values()})
        if self.new_marker:
            out[self.new_marker] = (self.out_dtype or "F8_E4M3", (0,))
        return out

    def recomputed(self, merged: Sequence[str] | frozenset[str] | set[str]) -> dict[str, str]:
        """scale -> weight for every scale the task of its weight writes (its weight is merged, or
        quantized by ``--dtype``; new input scales included), given the merged keys."""
        out = {s: w for w, s in self.new_scales.items()}
        out.update({i: w for w, i in self.new_inputs.items()})
        out.update({s: w for w, s in self.scales.items() if w in merged})
        return out

    def blocks(self, keys: Sequence[str]) -> list[list[str]]:
        """Output keys in order, as blocks that must stay together (a weight and its attached
        scales); new keys follow their weight, a new marker comes last."""
        followers = self.followers()
        members: dict[str, list[str]] = {}
        for f, w in followers.items():
            members.setdefault(w, [w]).append(f)
        out = [members.get(k, [k]) for k in keys if k not in followers]
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


def model_prefix(keys: Iterable[str]) -> str:
    """The key prefix of the model ComfyUI builds with scaled ops, where the marker goes: the
    diffusion model of a full checkpoint (``model.diffusion_model.``), else the whole file. Its
    VAE and text encoder are built without the marker's ops, so nothing else is quantized.

    >>> model_prefix(["first_stage_model.a.weight", "model.diffusion_model.blocks.0.q.weight"])
    'model.diffusion_model.'
    >>> model_prefix(["model.layers.0.mlp.up_proj.weight", "lm_head.weight"])
    ''
    """
    keys = list(keys)
    return next(p for p in MARKER_PREFIXES if any(k.startswith(p) for k in keys))


def _new_scales(tensors: Mapping[str, TensorInfo], prefix: str, out_dtype: str) -> dict[str, str]:
    """weight -> new scale key for every Linear weight under ``prefix`` that ``--dtype`` quantizes.

    Raises:
        PlanError: a Linear weight whose element count is not a multiple of 4 (its float32 scale
            could not follow it aligned; left unquantized, ComfyUI would cast it with scale 1.0).
    """
    out = {}
    for k, t in tensors.items():
        if not k.startswith(prefix) or not quantizable(k, t) or _scale_key(tensors, k) is not None or not t.numel:
            continue
        if t.numel % 4:
            raise PlanError(
                f"{t.path}: cannot quantize Linear weight '{k}' {list(t.shape)} for --dtype "
                f"{_CLI[out_dtype]}: {t.numel} elements are not a multiple of 4, so its float32 scale "
                "cannot follow it aligned (left in its dtype, ComfyUI would cast it to fp8 with scale 1.0)"
            )
        out[k] = k[: -len(".weight")] + SCALE_SUFFIXES[0]
    return out


def scaled_layout(tensors: Mapping[str, TensorInfo], out_dtype: str | None, *, path: str = "") -> ScaledLayout:
    """Find the fp8 pairs and marker of a base and plan ``--dtype`` (``out_dtype``, a code or None).

    ``--dtype fp8_*`` on a base that is not scaled fp8 quantizes every Linear weight of the model
    (``quantizable``, under ``model_prefix``) with a new ``.scale_weight`` and ``.scale_input``
    (ComfyUI's legacy convention, the one its marker announces) and adds the marker.

    Raises:
        PlanError: a scaled-fp8 base with a non-fp8 ``--dtype`` (the scales would be lost), or
            with ``--dtype`` of the other fp8 type; a Linear weight ``--dtype`` cannot quantize.

    >>> import math
    >>> T = lambda k, d, s: TensorInfo(k, d, s, "b.safetensors", 0, math.prod(s) * itemsize(d))
    >>> base = {t.key: t for t in [T("head.weight", "BF16", (4, 4)), T("head.bias", "BF16", (4,))]}
    >>> lay = scaled_layout(base, "F8_E4M3")
    >>> lay.new_scales, lay.new_inputs, lay.new_marker, lay.out_code("head.bias", "BF16")
    ({'head.weight': 'head.scale_weight'}, {'head.weight': 'head.scale_input'}, 'scaled_fp8', 'BF16')
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
    prefix = model_prefix(tensors)
    if out_dtype in FP8_CODES and not what:  # an already scaled base: as --dtype keep
        new_scales = _new_scales(tensors, prefix, out_dtype)
    attached = frozenset(
        [w for w, s in scales.items() if tensors[w].nbytes and tensors[w].nbytes % itemsize(tensors[s].dtype) == 0]
        + list(new_scales)
    )
    new_marker = prefix + MARKER if new_scales else None
    new_inputs = {w: input_scale_key(s) for w, s in new_scales.items()}
    return ScaledLayout(path, out_dtype, marker, scales, new_scales, new_marker, attached, new_inputs)
