#!/usr/bin/env python
"""Faithful reimplementation of the ROLL "seed" LoRA merge script, used as the benchmark baseline.

The algorithm, deliberately unoptimized (this is what distmerge replaces):

1. load EVERY base tensor into one dict (``safe_open(...).get_tensor(k)`` for every key of every
   ``*.safetensors`` shard of the base folder, or of a single file);
2. load the whole LoRA (``torch.load`` of the ROLL ``.pth``);
3. for every pair ``base_model.model.X.lora_B.default.weight`` / ``...lora_A.default.weight`` whose
   target ``X.weight`` is in the base: ``W = W.to(bf16) + alpha * (B.to(bf16) @ A.to(bf16))``;
4. one ``safetensors.torch.save_file(whole_dict, out_file)``: a single unsharded file.

``--math fp32`` is what a careful one-process script does instead of step 3: the same whole-model
load and one save, but ``W = (W.float() + alpha * (B.float() @ A.float())).to(W.dtype)`` -- float32
math, one rounding, the base's dtype kept (the benchmark's ``seed-fp32`` method).

Peak memory is therefore at least the whole base plus the serialization buffers.

Example:
    python benchmarks/seed_merge.py --base bench-out/base-... --lora bench-out/lora-....pth \\
        --output /tmp/merged/diffusion_pytorch_model.safetensors --alpha 1.0 [--math fp32]
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time

import torch
from safetensors import safe_open
from safetensors.torch import save_file

A_SUFFIX = ".lora_A.default.weight"
B_SUFFIX = ".lora_B.default.weight"
PREFIX = "base_model.model."


def base_files(base: str) -> list[str]:
    """The ``.safetensors`` files of a base: the file itself, or every shard in the folder."""
    if os.path.isfile(base):
        return [base]
    files = sorted(glob.glob(os.path.join(base, "*.safetensors")))
    if not files:
        raise SystemExit(f"seed_merge: no .safetensors in {base}")
    return files


def load_base(base: str) -> dict[str, torch.Tensor]:
    """Every tensor of every shard, in one dict (the seed's whole-model load)."""
    state: dict[str, torch.Tensor] = {}
    for path in base_files(base):
        with safe_open(path, framework="pt", device="cpu") as f:
            for k in f.keys():  # noqa: SIM118  (a safe_open handle, not a dict)
                state[k] = f.get_tensor(k)
    return state


def load_lora(path: str) -> dict[str, torch.Tensor]:
    """The whole LoRA: ``torch.load`` of a ROLL ``.pth``, or a ``.safetensors`` file."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def merge_pairs(
    state: dict[str, torch.Tensor], lora: dict[str, torch.Tensor], alpha: float, math: str = "bf16"
) -> tuple[int, int]:
    """Merge every ROLL pair in place; return (merged, skipped-because-no-target).

    ``math="bf16"``: the seed's own arithmetic (everything cast to bf16, bf16 matmul, bf16 result).
    ``math="fp32"``: float32 matmul and sum, rounded once to the base tensor's dtype.
    """
    if math not in ("bf16", "fp32"):
        raise ValueError(f"math must be bf16 or fp32, not {math!r}")
    merged = skipped = 0
    for b_key in [k for k in lora if k.endswith(B_SUFFIX)]:
        module = b_key[: -len(B_SUFFIX)]
        a_key = module + A_SUFFIX
        target = (module[len(PREFIX) :] if module.startswith(PREFIX) else module) + ".weight"
        if a_key not in lora or target not in state:
            skipped += 1
            continue
        if math == "fp32":
            w = state[target]
            b = lora[b_key].to(torch.float32)
            a = lora[a_key].to(torch.float32)
            state[target] = (w.to(torch.float32) + alpha * (b @ a)).to(w.dtype)
        else:
            w = state[target].to(torch.bfloat16)
            b = lora[b_key].to(torch.bfloat16)
            a = lora[a_key].to(torch.bfloat16)
            state[target] = w + alpha * (b @ a)
        merged += 1
    return merged, skipped


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="base folder (shards) or .safetensors file")
    p.add_argument("--lora", required=True, help="ROLL LoRA .pth (or .safetensors)")
    p.add_argument("--output", required=True, help="output .safetensors FILE (one unsharded file)")
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument(
        "--math",
        choices=["bf16", "fp32"],
        default="bf16",
        help="bf16: the seed's arithmetic (default); fp32: float32 math, one rounding to the base's dtype",
    )
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    state = load_base(args.base)
    t1 = time.perf_counter()
    lora = load_lora(args.lora)
    merged, skipped = merge_pairs(state, lora, args.alpha, args.math)
    t2 = time.perf_counter()
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    save_file(state, args.output)
    t3 = time.perf_counter()
    print(
        f"seed_merge ({args.math} math): {len(state)} tensors, {merged} pairs merged, {skipped} skipped; "
        f"load {t1 - t0:.2f}s merge {t2 - t1:.2f}s save {t3 - t2:.2f}s"
    )
    if merged == 0:
        print("seed_merge: error: no LoRA pair matched the base", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
