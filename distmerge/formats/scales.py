"""Where a module's scale ``c`` comes from when the file does not carry ``.alpha`` tensors.

PEFT adapter folders carry it in ``adapter_config.json`` (``lora_alpha``/``r``, ``use_rslora``,
``rank_pattern``/``alpha_pattern``); diffusers LoRAs may carry the same fields as JSON in the
safetensors metadata key ``lora_adapter_metadata``. Patterns resolve as PEFT does: the first pattern
``P`` (in dict order) with ``re.match(rf"(.*\\.)?({P})$", module)``.

Example:
    >>> cfg = AdapterConfig.from_peft({"peft_type": "LORA", "r": 8, "lora_alpha": 16,
    ...                                "rank_pattern": {"q_proj": 4}, "alpha_pattern": {}}, "cfg.json")
    >>> cfg.scale("model.layers.0.self_attn.q_proj", 4), cfg.scale("model.layers.0.mlp.up_proj", 8)
    (4.0, 2.0)
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from distmerge.errors import FormatError, MatchError

__all__ = ["AdapterConfig", "pattern_key"]

logger = logging.getLogger("distmerge.scales")  # the name users see in -v logs

_SUPPORTED_PEFT = {"LORA": ("lora_alpha", "r"), "LOHA": ("alpha", "r"), "LOKR": ("alpha", "r")}
_MUTATING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")


def pattern_key(patterns: Mapping[str, Any], module: str) -> str | None:
    """The first key of ``patterns`` that matches ``module`` the way PEFT matches it."""
    for p in patterns:
        if re.match(rf"(.*\.)?({p})$", module):
            return p
    return None


@dataclass(frozen=True)
class AdapterConfig:
    source: str
    peft_type: str = "LORA"
    r: int = 8
    alpha: float = 8.0
    rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_dora: bool = False
    fan_in_fan_out: bool = False
    #: PEFT ``target_parameters`` (``mlp.experts.gate_up_proj`` …): parameters adapted directly
    target_parameters: tuple[str, ...] = ()

    @classmethod
    def from_peft(cls, cfg: Mapping[str, Any], source: str) -> AdapterConfig:
        """Read an ``adapter_config.json`` dict; refuse adapter types distmerge does not merge."""
        ptype = str(cfg.get("peft_type", "LORA")).upper()
        if ptype not in _SUPPORTED_PEFT:
            raise FormatError(
                f"{source}: peft_type {ptype} is not supported (distmerge merges LORA, "
                "LOHA and LOKR adapters; OFT/BOFT rotate W instead of adding a delta)"
            )
        targets = cfg.get("target_parameters") or ()
        if not isinstance(targets, (list, tuple)) or not all(isinstance(t, str) for t in targets):
            raise FormatError(f"{source}: 'target_parameters' should be a list of parameter names, found {targets!r}")
        init = str(cfg.get("init_lora_weights", "")).lower()
        if init.startswith(_MUTATING_INITS):
            logger.warning(
                "%s: init_lora_weights=%s changes the base weights at init; the merge is "
                "only right against the converted base",
                source,
                init,
            )
        alpha_key, r_key = _SUPPORTED_PEFT[ptype]
        r = cfg.get(r_key, 8)
        alpha = cfg.get(alpha_key, r)
        if not isinstance(r, int) or r <= 0 or not isinstance(alpha, (int, float)):
            raise FormatError(
                f"{source}: expected a positive integer '{r_key}' and a number '{alpha_key}', found {r!r} and {alpha!r}"
            )
        return cls(
            source=source,
            peft_type=ptype,
            r=r,
            alpha=float(alpha),
            rslora=bool(cfg.get("use_rslora", False)),
            rank_pattern=dict(cfg.get("rank_pattern") or {}),
            alpha_pattern=dict(cfg.get("alpha_pattern") or {}),
            use_dora=bool(cfg.get("use_dora", False)),
            fan_in_fan_out=bool(cfg.get("fan_in_fan_out", False)),
            target_parameters=tuple(targets),
        )

    @classmethod
    def from_diffusers_metadata(cls, metadata: Mapping[str, str], source: str) -> AdapterConfig | None:
        """The LoraConfig diffusers stores in ``lora_adapter_metadata`` (keys ``transformer.*``)."""
        raw = metadata.get("lora_adapter_metadata")
        if not raw:
            return None
        try:
            meta = json.loads(raw)
        except ValueError:
            raise FormatError(f"{source}: metadata 'lora_adapter_metadata' is not JSON") from None
        if not isinstance(meta, dict):
            return None
        for comp in ("transformer", "transformer_2"):
            if isinstance(meta.get(comp), dict):
                return cls.from_peft({"peft_type": "LORA", **meta[comp]}, source)
            sub = {k[len(comp) + 1 :]: v for k, v in meta.items() if k.startswith(comp + ".")}
            if sub:
                return cls.from_peft({"peft_type": "LORA", **sub}, source)
        return cls.from_peft({"peft_type": "LORA", **meta}, source) if "r" in meta else None

    def rank_alpha(self, module: str) -> tuple[int, float]:
        rk = pattern_key(self.rank_pattern, module)
        ak = pattern_key(self.alpha_pattern, module)
        r = int(self.rank_pattern[rk]) if rk is not None else self.r
        alpha = float(self.alpha_pattern[ak]) if ak is not None else self.alpha
        return r, alpha

    def scale(self, module: str, rank: int) -> float:
        """``α/r`` (or ``α/√r`` with rsLoRA) for ``module``; the factor's rank must match the config."""
        r, alpha = self.rank_alpha(module)
        if r != rank:
            raise MatchError(
                f"{self.source}: module '{module}' has rank {rank} in the weights but the config says r={r}"
            )
        return alpha / math.sqrt(r) if self.rslora else alpha / r
