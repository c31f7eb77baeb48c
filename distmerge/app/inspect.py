"""``distmerge inspect``: what a LoRA file is and how it would merge, before any merge.

Reads headers (and ``.alpha`` scalars) only for safetensors; pickles are mapped, not read. Reports
the detected layout, module groups (digits folded to ``N``) with kind, rank, α and the resulting scale
``c``, and — given a base — matched/unmatched counts with every shape checked.

Example:
        distmerge inspect --lora high_noise_model.safetensors --base Wan2.2-I2V-A14B/high_noise_model
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from distmerge.errors import MatchError
from distmerge.formats.normalize import LAYOUTS, normalize
from distmerge.inputs.checkpoint import open_base
from distmerge.inputs.lorafile import open_lora

__all__ = ["inspect_lora", "LoraDescription", "format_description"]

#: the layer index of a module path: ``blocks.12.`` / ``layers.3.`` / ``lora_unet_blocks_12_``
_DIGITS = re.compile(r"(?<=blocks\.|layers\.)\d+(?=\.)|(?<=blocks_|layers_)\d+(?=_)|(?<=\.h\.)\d+(?=\.)")


@dataclass
class LoraDescription:
    path: str
    kind: str
    tensors: int
    nbytes: int
    layout: str
    layout_description: str
    groups: list[dict[str, Any]] = field(default_factory=list)
    deltas: int = 0
    base: str | None = None
    matched_targets: int = 0
    unmatched: list[dict[str, str]] = field(default_factory=list)
    error: str | None = None
    #: what a training checkpoint says about itself (a Megatron checkpoint: strategy, adapters,
    #: iteration, parallel sizes, model family, r and α)
    checkpoint: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None and not self.unmatched


def inspect_lora(lora: str | os.PathLike[str], base: str | os.PathLike[str] | None = None) -> LoraDescription:
    """Describe ``lora`` (and check it against ``base`` when given); raises only for unreadable input."""
    lf = open_lora(lora)
    base_ck = open_base(base) if base is not None else None
    import math

    from distmerge.inputs.dtypes import itemsize

    desc = LoraDescription(
        lf.path,
        lf.kind,
        len(lf.tensors),
        sum(math.prod(m.shape) * itemsize(m.dtype) for m in lf.tensors.values()),
        "",
        "",
        base=None if base_ck is None else base_ck.path,
    )
    try:
        n = normalize(lf, base_ck.tensors if base_ck else None, base_config=base_ck.model_config() if base_ck else None)
    except MatchError as e:
        desc.error = str(e)
        n = normalize(lf, None)
    if lf.megatron is not None:
        desc.checkpoint = _megatron_summary(lf.megatron)
    desc.layout = n.layout
    desc.layout_description = next(lay.description for lay in LAYOUTS if lay.name == n.layout)
    desc.deltas = len(n.deltas)
    groups: dict[tuple, dict[str, Any]] = defaultdict(lambda: {"modules": 0})
    for d in n.deltas:
        name = _DIGITS.sub("N", d.module or d.target)
        g = groups[(name, d.kind, d.rank, round(d.scale, 6), d.dora)]
        g.update(
            group=name,
            kind=d.kind + (f"+dora({d.dora})" if d.dora else ""),
            rank=d.rank,
            scale=d.scale,
            alpha=None if d.rank is None else round(d.scale * d.rank, 6),
        )
        g["modules"] += 1
    desc.groups = sorted(groups.values(), key=lambda g: g["group"])
    if base_ck is not None:
        desc.matched_targets = len({d.target for d in n.deltas})
        desc.unmatched = [{"key": u.key, "reason": u.reason} for u in n.unmatched]
    else:
        desc.unmatched = [
            {"key": u.key, "reason": u.reason} for u in n.unmatched if not u.reason.startswith("no base tensor")
        ]
    return desc


def _megatron_summary(ck: Any) -> dict[str, Any]:
    c, a = ck.config, ck.adapter_config
    return {
        "strategy": "megatron (ROLL mcore_adapter)",
        "adapter": ck.name,
        "adapters": ck.adapters,
        "iteration": ck.iteration,
        "tp": c.tp,
        "pp": c.pp,
        "ep": c.ep,
        "rank_files": len(ck.files),
        "family": c.model_type or "unknown",
        "experts": c.experts,
        "topk": c.topk,
        "r": a.get("r"),
        "lora_alpha": a.get("lora_alpha"),
        "use_rslora": bool(a.get("use_rslora")),
    }


def format_description(d: LoraDescription) -> str:
    """Human-readable multi-line text for the terminal."""
    lines = [
        f"{d.path}: {d.kind}, {d.tensors} tensors, {d.nbytes / 1e9:.3f} GB",
        f"  layout: {d.layout} — {d.layout_description}",
    ]
    if d.checkpoint:
        c = d.checkpoint
        moe = (
            f", {c['experts']} experts (top-{c['topk']}: expert tensors at rank r // {c['topk']})"
            if c["experts"]
            else ""
        )
        lines += [
            f"  strategy: {c['strategy']}; adapter '{c['adapter']}' (adapters here: {', '.join(c['adapters'])}), "
            f"{c['iteration']}",
            f"  parallel: TP {c['tp']} x PP {c['pp']} x EP {c['ep']} = {c['rank_files']} rank files; "
            f"model family {c['family']}{moe}",
            f"  r={c['r']} lora_alpha={c['lora_alpha']}{' rsLoRA' if c['use_rslora'] else ''}: every delta, experts "
            "included, is scaled by alpha/r with this r (as in training)",
        ]
    lines.append(f"  {d.deltas} deltas in {len(d.groups)} module groups:")
    for g in d.groups:
        rank = f"r={g['rank']}" if g["rank"] is not None else "full"
        alpha = f" α={g['alpha']:g}" if g["alpha"] is not None else ""
        lines.append(f"    {g['group']:<40} {g['modules']:>5} × {g['kind']:<6} {rank}{alpha} scale={g['scale']:g}")
    if d.base:
        lines.append(
            f"  base {d.base}: {d.matched_targets} target tensors matched, "
            f"{len(d.unmatched)} LoRA tensors unmatched, shapes "
            f"{'FAILED' if d.error else 'ok'}"
        )
    for u in d.unmatched[:10]:
        lines.append(f"    unmatched '{u['key']}': {u['reason']}")
    if len(d.unmatched) > 10:
        lines.append(f"    … and {len(d.unmatched) - 10} more")
    if d.error:
        lines.append(f"  error: {d.error}")
    return "\n".join(lines)
