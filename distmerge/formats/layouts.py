"""The LoRA key layouts an extraction writes, and the PEFT adapter config of the ``peft`` layout.

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

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from distmerge.errors import DistmergeError, PlanError, UsageError
from distmerge.formats.keymap import wan_param_to_diffusers
from distmerge.formats.naming import Naming
from distmerge.formats.normalize import normalize
from distmerge.formats.shapes import TensorLike

if TYPE_CHECKING:
    from distmerge.inputs.lorafile import LoraFile

__all__ = ["EMBEDDING_NAMES", "LAYOUTS", "check_round_trip", "layout_keys", "not_loaded", "peft_adapter_config"]

#: ``--layout`` choices
LAYOUTS = ("comfy", "peft", "diffusers", "roll")
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


def check_round_trip(
    written: Mapping[str, tuple[str, tuple[int, ...]]], base: Mapping[str, TensorLike], layout: str
) -> None:
    """``distmerge merge``'s normalizer must land every key an extraction may write (``written``:
    key -> its base tensor and a shape) back on the base tensor it came from, as names and shapes.

    Raises:
        PlanError: a key that lands elsewhere or nowhere (the layout cannot name that base).
    """
    if not written:
        return
    cfg = {"peft_type": "LORA", "r": 1, "lora_alpha": 1} if layout == "peft" else None
    names = {k: _Meta("F32", tuple(shape)) for k, (_, shape) in written.items()}
    try:
        got = normalize(cast("LoraFile", _KeysOnly(f"the {layout} layout", names, config=cfg)), base)
    except DistmergeError as e:
        raise PlanError(
            f"--layout {layout} cannot name this base's tensors so that merge reads them back: {e}"
        ) from None
    for d in got.deltas:
        for f in d.factors:
            if d.target != written[f.key][0]:
                raise PlanError(
                    f"--layout {layout}: '{f.key}' (for base tensor '{written[f.key][0]}') would merge into "
                    f"'{d.target}'; use --layout comfy"
                )
    if got.unmatched:
        u = got.unmatched[0]
        raise PlanError(
            f"--layout {layout}: '{u.key}' (for base tensor '{written.get(u.key, ('?',))[0]}') would not merge "
            f"back ({u.reason}); use --layout comfy"
        )


def not_loaded(stats: Sequence[Any], layout: str) -> dict[str, list[str]]:
    """The keys written for full differences (``stats``: an extraction's ``TensorStats``) that a loader
    leaves out: diffusers' Wan loader (``comfy``, ``diffusers`` layouts: norms, modulation, conv
    kernels) or PEFT (``peft``: parameters it cannot hold)."""
    pair = (".lora_down.weight", ".lora_A.weight")  # a LoRA, or the zero one beside a lone bias difference
    lora = {s.module for s in stats if s.kind == "lora" or any(e.endswith(pair) for e in s.entries)}
    if layout == "peft":
        return {"peft": [k for s in stats if s.role == "ignored" for k in s.entries]}
    if layout in ("comfy", "diffusers"):
        dropped = [
            k
            for s in stats
            if s.kind in ("diff", "set")
            for k in s.entries
            if not (s.key.endswith(".bias") and s.module in lora)
        ]
        return {"diffusers": dropped}
    return {}
