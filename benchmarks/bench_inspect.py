#!/usr/bin/env python
"""Time ``distmerge inspect`` on a full-size Wan2.2-Lightning (Seko) LoRA: 400 modules, rank 64,
fp32, ``.alpha`` per module (1.23 GB), against a full-width base header set (40 blocks).

Only headers and the 400 ``alpha`` scalars are read, so the time should not depend on file size.

Example:
    .venv/bin/python benchmarks/bench_inspect.py --workdir bench-out
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from distmerge.app.inspect import inspect_lora
from distmerge.app.synth import WanConfig, lora_modules, wan_shapes
from distmerge.tasks.writer import write_safetensors


def _seko(path: str, cfg: WanConfig, rank: int) -> None:
    shapes = dict(wan_shapes(cfg))
    specs = []
    for m in lora_modules(cfg):
        out_f, in_f = shapes[m + ".weight"]
        specs += [
            (f"diffusion_model.{m}.lora_down.weight", "F32", (rank, in_f)),
            (f"diffusion_model.{m}.lora_up.weight", "F32", (out_f, rank)),
            (f"diffusion_model.{m}.alpha", "F32", ()),
        ]

    def gen():
        for key, _, shape in specs:
            yield key, (torch.full(shape, 8.0) if key.endswith("alpha") else torch.zeros(shape))

    write_safetensors(path, gen(), specs=specs)


def _header_only_base(folder: str, cfg: WanConfig) -> None:
    """A sparse base: real headers, data never written (inspect reads headers only)."""
    os.makedirs(folder, exist_ok=True)
    from distmerge.plan.layout import layout_shard
    from distmerge.tasks.writer import create_file

    lay = layout_shard([(k, "F32", s) for k, s in wan_shapes(cfg)], metadata={"format": "pt"})
    create_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"), lay.header, lay.size)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="bench-out")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    cfg = WanConfig(blocks=40)
    lora = os.path.join(a.workdir, "seko-high_noise_model.safetensors")
    base = os.path.join(a.workdir, "base-headers-40-blocks")
    if not os.path.exists(lora):
        _seko(lora, cfg, 64)
    if not os.path.exists(base):
        _header_only_base(base, cfg)
    times = []
    for _ in range(a.repeats):
        t = time.perf_counter()
        d = inspect_lora(lora, base)
        times.append(time.perf_counter() - t)
    times.sort()
    print(
        json.dumps(
            {
                "lora_gb": round(os.path.getsize(lora) / 1e9, 3),
                "deltas": d.deltas,
                "matched": d.matched_targets,
                "unmatched": len(d.unmatched),
                "median_s": round(times[len(times) // 2], 3),
                "min_s": round(times[0], 3),
            }
        )
    )


if __name__ == "__main__":
    main()
