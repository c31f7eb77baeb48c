"""``distmerge demo``: generate a small Wan2.2-shaped checkpoint and a ROLL LoRA, merge, check.

Example:
        python -m distmerge demo --dir /tmp/distmerge-demo
"""

from __future__ import annotations

import math
import os

import torch
from safetensors import safe_open

from distmerge.app.api import merge
from distmerge.app.report import MergeReport
from distmerge.app.synth import WanConfig, make_factors, write_lora, write_wan_base
from distmerge.inputs.checkpoint import open_base

__all__ = ["run_demo", "DEMO_CONFIG"]

#: Wan2.2's structure at 1/10 width and 8 blocks: ~190 MB of fp32 in 6 shards, like the real expert
DEMO_CONFIG = WanConfig(dim=512, ffn=1384, blocks=8, in_dim=16, text_dim=410, freq_dim=256, dtype="F32")


def run_demo(
    directory: str = "distmerge-demo", *, num_workers: int | None = None, progress=None, log=print
) -> MergeReport:
    """Generate (once) base + LoRA under ``directory``, merge them, and check against float64."""
    base_dir = os.path.join(directory, "Wan2.2-T2V-A14B-mini", "low_noise_model")
    lora_path = os.path.join(directory, "roll_run", "diffusion_module.pth")
    out_dir = os.path.join(directory, "merged", "low_noise_model")
    cfg = DEMO_CONFIG
    factors = make_factors(cfg, rank=16, dtype=torch.bfloat16)
    if not os.path.exists(os.path.join(base_dir, "diffusion_pytorch_model.safetensors.index.json")):
        log(f"generating a Wan2.2-shaped base (dim {cfg.dim}, {cfg.blocks} blocks, fp32, 6 shards) in {base_dir}")
        write_wan_base(base_dir, cfg, num_shards=6)
    write_lora(lora_path, factors, layout="roll")
    log(f"wrote a ROLL-style LoRA (rank 16, bf16, {len(factors)} modules) to {lora_path}")
    report = merge(
        base_dir,
        [lora_path],
        out_dir,
        overwrite=True,
        max_shard_size="50MB",
        num_workers=num_workers,
        progress=progress,
    )
    if progress is not None and hasattr(progress, "close"):
        progress.close()  # the bar ends before the next line
    log(f"checking the {len(factors)} merged tensors against a float64 reference (a few seconds)…")
    worst = _check(base_dir, out_dir, factors)
    log(f"checked {len(factors)} merged tensors against a float64 reference: max |error| = {worst:.2e}")
    return report


def _check(base_dir: str, out_dir: str, factors: dict) -> float:
    base, out = open_base(base_dir), open_base(out_dir)
    worst = 0.0
    for m, (a, b) in factors.items():
        key = m + ".weight"
        with safe_open(base.tensors[key].path, "pt") as fb, safe_open(out.tensors[key].path, "pt") as fo:
            ref = fb.get_tensor(key).double() + b.double() @ a.double()
            err = (fo.get_tensor(key).double() - ref).abs().max().item()
        worst = max(worst, err)
    if not math.isfinite(worst) or worst > 1e-5:
        raise AssertionError(f"demo merge differs from the float64 reference by {worst}")
    return worst
