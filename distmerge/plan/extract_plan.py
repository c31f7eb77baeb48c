"""Plan an extraction (fine-tune -> LoRA) as plain data: which tensors, under which LoRA keys, in which units.

Only headers are read. ``check_pair`` requires the tuned checkpoint to hold exactly the base's keys
with the same shapes and dtypes (one line naming the file and key otherwise). ``make_extract_plan``
lists every tensor with both byte ranges and the keys each layout writes for it (``layout_keys``),
groups the parameters of one module together (weight before bias: whether a bias becomes a
``lora_B.bias`` or a ``base_layer.bias`` depends on whether the module's weight became a LoRA) and
cuts byte-balanced work units. Whether a tensor differs, and its rank, are found by the task.

Key naming follows the base: every base key is read in its canonical name (``naming.NAMINGS``:
original Wan names for the Wan family, the key itself for anything else) and written the way the
chosen layout names it, so that ``distmerge merge``'s normalizer lands it back on the same key:

* ``comfy``: ``diffusion_model.<Wan path>.lora_down.weight`` / ``.lora_up.weight`` (+ ``.alpha``
  inside ``blocks.N``), ``.diff`` / ``.diff_b`` / ``.diff_m`` for full differences;
* ``diffusers``: ``transformer.<diffusers path>.lora_A.weight`` / ``.lora_B.weight``, a bias
  difference as ``lora_B.bias`` when every LoRA module has a bias, else ``.diff_b``;
* ``roll``: ``base_model.model.<Wan path>.lora_A.default.weight`` / ``.lora_B.default.weight``;
* ``peft``: ``base_model.model.<module as the base names it>.lora_A.weight`` / ``.lora_B.weight``
  (embeddings ``lora_embedding_A/B``), other changed parameters as full tensors of
  ``modules_to_save`` modules (or ``base_layer.bias`` of a LoRA module).

Example:
    >>> from distmerge.formats.naming import detect_naming
    >>> wan = detect_naming(["blocks.0.self_attn.q.weight"])
    >>> layout_keys("comfy", wan, "blocks.0.self_attn.q.weight")["down"]
    'diffusion_model.blocks.0.self_attn.q.lora_down.weight'
    >>> layout_keys("diffusers", wan, "blocks.0.self_attn.o.weight")["up"]
    'transformer.blocks.0.attn1.to_out.0.lora_B.weight'
    >>> layout_keys("roll", wan, "blocks.1.modulation")["diff"]
    'base_model.model.blocks.1.diff_m'
    >>> layout_keys("peft", detect_naming(["model.embed_tokens.weight"]), "model.embed_tokens.weight")["emb_down"]
    'base_model.model.model.embed_tokens.lora_embedding_A'
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from distmerge.errors import DistmergeError, PlanError, UsageError
from distmerge.formats.keymap import wan_param_to_diffusers
from distmerge.formats.naming import Naming, detect_naming
from distmerge.formats.normalize import normalize
from distmerge.inputs.checkpoint import BaseCheckpoint
from distmerge.inputs.dtypes import CLI_DTYPES, FP8_CODES, is_float
from distmerge.plan.merge_plan import parse_size, partition_units

if TYPE_CHECKING:
    from distmerge.inputs.lorafile import LoraFile

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
    "resolve_out_dtype",
]

#: ``--layout`` choices
LAYOUTS = ("comfy", "peft", "diffusers", "roll")
#: ``--dtype`` choices of the factors and differences
OUT_DTYPES = ("bf16", "fp16", "fp32")
#: module names a PEFT adapter treats as ``nn.Embedding`` (``lora_embedding_A/B``, ΔWᵀ)
EMBEDDING_NAMES = frozenset(
    {"embed_tokens", "wte", "wpe", "word_embeddings", "position_embeddings", "token_type_embeddings", "embed_positions"}
)
_WAN_FAMILY = ("wan", "comfy", "comfy-checkpoint", "diffusers")
_DIFF_SUFFIX = {"weight": "diff", "bias": "diff_b", "modulation": "diff_m"}
_PREFIX = {
    "comfy": "diffusion_model.",
    "diffusers": "transformer.",
    "roll": "base_model.model.",
    "peft": "base_model.model.",
}


def resolve_out_dtype(dtype: str) -> str:
    """``bf16``/``fp16``/``fp32`` (or their long spellings) -> safetensors code.

    >>> resolve_out_dtype("bf16"), resolve_out_dtype("float32")
    ('BF16', 'F32')
    """
    code = CLI_DTYPES.get(str(dtype).lower())
    if code not in ("BF16", "F16", "F32"):
        raise UsageError(f"--dtype {dtype!r} is not supported by extract; use bf16, fp16 or fp32")
    return code


@dataclass(frozen=True)
class ExtractOptions:
    """What every task is asked to do (plain data, shipped to the workers)."""

    layout: str = "comfy"
    rank: int | None = 64  #: the rank of every LoRA (the cap with ``energy``); ``None``: no cap
    energy: float | None = None  #: smallest rank per tensor keeping this fraction of ‖ΔW‖²_F
    out_dtype: str = "BF16"  #: safetensors code of the factors and differences
    min_diff: float = 0.0  #: a tensor with max|Δ| <= this is identical (skipped)
    exact: bool = False  #: ``torch.linalg.svd`` for every matrix instead of the randomized SVD
    bias_lora: bool = False  #: diffusers layout: bias differences of LoRA modules as ``lora_B.bias``

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
    def matrix(self) -> bool:
        """A 2-D float tensor: reduced to a LoRA pair (anything else becomes a full difference)."""
        return len(self.shape) == 2 and is_float(self.dtype) and min(self.shape) > 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


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


def _name(naming: Naming, key: str, layout: str) -> str:
    """``key`` as ``layout`` names it, without the layout's prefix."""
    if layout == "peft":  # the in-memory module path of the model the adapter is loaded on
        return key[len(naming.prefix) :] if naming.prefix and key.startswith(naming.prefix) else key
    canonical = naming.canonical(key) if naming.name in _WAN_FAMILY else key
    if canonical is None:  # outside the model's prefix (a ComfyUI checkpoint's VAE): as it is
        return key
    return wan_param_to_diffusers(canonical) if layout == "diffusers" and naming.name in _WAN_FAMILY else canonical


def layout_keys(layout: str, naming: Naming, key: str) -> dict[str, str]:
    """The keys ``layout`` writes base tensor ``key`` under, by role: ``down``/``up`` (+ ``alpha``)
    for a LoRA pair, ``emb_down``/``emb_up`` (PEFT embeddings), ``diff`` for an additive full
    difference, ``set`` for a full tensor (a replacement), ``bias_up`` (``lora_B.bias``) and
    ``base_bias`` (PEFT ``base_layer.bias``) for a bias, and ``module`` (the module path in the
    layout's naming). Roles a layout lacks are absent."""
    if layout not in LAYOUTS:
        raise UsageError(f"--layout {layout!r} is not supported; use one of {', '.join(LAYOUTS)}")
    pre, name = _PREFIX[layout], _name(naming, key, layout)
    module, _, param = name.rpartition(".")
    wan_module, _, wan_param = _name(naming, key, "comfy").rpartition(".")  # modulation: Wan names only
    out = {"module": module, "set": pre + name}
    a, b = {
        "comfy": ("lora_down.weight", "lora_up.weight"),
        "roll": ("lora_A.default.weight", "lora_B.default.weight"),
    }.get(layout, ("lora_A.weight", "lora_B.weight"))
    if param == "weight" and module:
        out.update(down=f"{pre}{module}.{a}", up=f"{pre}{module}.{b}")
        if layout == "comfy" and (naming.name not in _WAN_FAMILY or re.match(r"blocks\.\d+\.", module)):
            out["alpha"] = f"{pre}{module}.alpha"  # diffusers' converter refuses .alpha outside blocks
        if layout == "peft" and module.rpartition(".")[2] in EMBEDDING_NAMES:
            out.update(emb_down=f"{pre}{module}.lora_embedding_A", emb_up=f"{pre}{module}.lora_embedding_B")
    if layout != "peft" and wan_param in _DIFF_SUFFIX:
        where = wan_module if wan_param == "modulation" else module
        if where:
            out["diff"] = f"{pre}{where}.{_DIFF_SUFFIX[wan_param]}"
    if param == "bias" and module:
        if layout == "diffusers":
            out["bias_up"] = f"{pre}{module}.lora_B.bias"
        if layout == "peft":
            out["base_bias"] = f"{pre}{module}.base_layer.bias"
    return out


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
    return dw * (4 if whole else 1) + 3 * (m + n) * (rank + 32) * 4 + 2 * min(2 * t.nbytes, 64 << 20)


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


@dataclass(frozen=True)
class _Meta:
    dtype: str
    shape: tuple[int, ...]


@dataclass
class _KeysOnly:
    """What ``normalize`` reads of a LoRA file, for a file that exists only as names and shapes."""

    path: str
    tensors: dict[str, _Meta]
    metadata: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] | None = None
    megatron: None = None  #: never a Megatron checkpoint

    def read(self, key: str) -> Any:  # only .alpha tensors are read, and none is listed
        raise KeyError(key)


def check_round_trip(tensors: Sequence[ExtractTensor], base: BaseCheckpoint, layout: str) -> None:
    """``distmerge merge``'s normalizer must land every key the plan may write back on the base
    tensor it came from: a rank-1 LoRA pair for each matrix and the full-difference (or whole)
    key for everything else, as names and shapes only.

    Raises:
        PlanError: a key that lands elsewhere or nowhere (the layout cannot name that base).
    """
    owner: dict[str, str] = {}
    names: dict[str, _Meta] = {}
    for t in tensors:
        if not is_float(t.dtype) or t.numel == 0:
            continue
        pairs: list[tuple[str, tuple[int, ...]]]
        if t.matrix and "up" in t.keys:
            emb = "emb_down" in t.keys
            m, n = t.shape
            pairs = [(t.keys["emb_down"], (1, m)), (t.keys["emb_up"], (n, 1))] if emb else []
            pairs = pairs or [(t.keys["down"], (1, n)), (t.keys["up"], (m, 1))]
        else:
            pairs = [(t.keys.get("diff", t.keys["set"]), t.shape)]
        for k, shape in pairs:
            owner[k], names[k] = t.key, _Meta("F32", tuple(shape))
    if not names:
        return
    cfg = {"peft_type": "LORA", "r": 1, "lora_alpha": 1} if layout == "peft" else None
    fake = _KeysOnly(f"the {layout} layout", names, config=cfg)
    try:
        got = normalize(cast("LoraFile", fake), base.tensors)
    except DistmergeError as e:
        raise PlanError(
            f"--layout {layout} cannot name this base's tensors so that merge reads them back: {e}"
        ) from None
    for d in got.deltas:
        for f in d.factors:
            if d.target != owner[f.key]:
                raise PlanError(
                    f"--layout {layout}: '{f.key}' (for base tensor '{owner[f.key]}') would merge into "
                    f"'{d.target}'; use --layout comfy"
                )
    if got.unmatched:
        u = got.unmatched[0]
        raise PlanError(
            f"--layout {layout}: '{u.key}' (for base tensor '{owner.get(u.key, '?')}') would not merge back "
            f"({u.reason}); use --layout comfy"
        )


def make_extract_plan(
    base: BaseCheckpoint,
    tuned: BaseCheckpoint,
    options: ExtractOptions,
    *,
    workers: int = 1,
    units_per_worker: int = 4,
    unit_size: int | str | None = None,
) -> ExtractPlan:
    """Plan the extraction of ``tuned - base`` (headers only, deterministic).

    Args:
        base, tuned: the two checkpoints (``check_pair`` is applied).
        options: the layout, rank/energy and output dtype.
        workers: tasks in flight; units are about total / (``units_per_worker`` × workers) bytes.
        unit_size: target bytes per unit, overriding the workers-based choice.

    Raises:
        PlanError: mismatched checkpoints, an unknown layout, a bad unit size.
    """
    check_pair(base, tuned)
    naming = detect_naming(base.tensors)
    opts = ExtractOptions(**{**options.__dict__, "bias_lora": _bias_lora(base, options.layout)})
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
    check_round_trip(tensors, base, opts.layout)
    total = 2 * sum(t.nbytes for t in tensors)
    target = parse_size(unit_size) if unit_size else max(1, math.ceil(total / max(1, workers * units_per_worker)))
    modules = [t.key.rpartition(".")[0] for t in tensors]
    joined = [i > 0 and modules[i] == modules[i - 1] for i in range(len(tensors))]
    units = tuple(
        ExtractUnit(i, tuple(tensors[s:e]), max(_memory(t, opts) for t in tensors[s:e]) + (64 << 20))
        for i, (s, e) in enumerate(partition_units([2 * t.nbytes for t in tensors], target, joined))
    )
    return ExtractPlan(base.path, tuned.path, naming.name, opts, units, target)


def peft_adapter_config(
    entries: Sequence[tuple[str, str, int]], *, base_path: str, rank: int | None
) -> dict[str, object]:
    """The ``adapter_config.json`` of a ``peft`` layout extraction.

    ``entries`` are ``(module, role, rank)`` as the tasks report them: role ``target`` (a LoRA
    module, at ``rank``), ``base_bias`` (a LoRA module's bias written whole), ``save`` (a module
    whose changed parameters are written whole: ``modules_to_save``). Every module is named by
    its full path, so nothing else matches it; ranks that differ from the most common one go to
    ``rank_pattern`` (escaped), with ``alpha_pattern`` equal to it: every scale is 1.

    >>> cfg = peft_adapter_config([("m.q", "target", 8), ("m.k", "target", 4), ("m.norm", "save", 0)],
    ...                           base_path="/b", rank=8)
    >>> cfg["r"], cfg["rank_pattern"], cfg["modules_to_save"], cfg["bias"]
    (8, {'m\\\\.k': 4}, ['m.norm'], 'none')
    """
    ranks = {m: r for m, role, r in entries if role == "target"}
    counts: dict[int, int] = {}
    for r in ranks.values():
        counts[r] = counts.get(r, 0) + 1
    common = max(counts, key=lambda r: (counts[r], r)) if counts else (rank or 8)
    pattern = {re.escape(m): r for m, r in sorted(ranks.items()) if r != common}
    saved = sorted({m for m, role, _ in entries if role == "save"} - set(ranks))
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_path,
        "r": common,
        "lora_alpha": common,
        "target_modules": sorted(ranks),
        "modules_to_save": saved or None,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "bias": "lora_only" if any(role == "base_bias" for _, role, _ in entries) else "none",
        "lora_bias": False,
        "lora_dropout": 0.0,
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
