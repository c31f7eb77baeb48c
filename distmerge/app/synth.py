"""Generate Wan2.2-shaped checkpoints and LoRAs in every supported layout (demo, tests, benchmarks).

The key set and shape pattern follow the Wan2.2 A14B DiT (``blocks.N.self_attn.q.weight`` …,
``patch_embedding`` Conv3d, ``modulation`` parameters); the sizes are parameters, so the same code
makes a 2 MB test model, the demo, and a full-width benchmark base. Everything is written tensor by
tensor, so generating a base larger than RAM is fine.

Example:
    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> cfg = WanConfig(dim=32, ffn=64, blocks=2, text_dim=16, freq_dim=8)
    >>> files = write_wan_base(d, cfg, num_shards=2)
    >>> [os.path.basename(f) for f in files]
    ['diffusion_pytorch_model-00001-of-00002.safetensors', 'diffusion_pytorch_model-00002-of-00002.safetensors']
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from safetensors.torch import save_file

from distmerge.inputs.torch_dtypes import to_torch
from distmerge.tasks.writer import write_safetensors

__all__ = ["WanConfig", "wan_shapes", "lora_modules", "write_wan_base", "make_factors", "write_lora", "LORA_LAYOUTS"]

#: the 10 Linear layers per block that ROLL/DiffSynth/musubi LoRAs target
BLOCK_LINEARS = (
    "self_attn.q",
    "self_attn.k",
    "self_attn.v",
    "self_attn.o",
    "cross_attn.q",
    "cross_attn.k",
    "cross_attn.v",
    "cross_attn.o",
    "ffn.0",
    "ffn.2",
)


@dataclass(frozen=True)
class WanConfig:
    dim: int = 5120
    ffn: int = 13824
    blocks: int = 40
    in_dim: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    out_dim: int = 16
    dtype: str = "F32"  #: safetensors code of every tensor


def wan_shapes(c: WanConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Every Wan DiT key with its shape, in the official file order."""
    d = c.dim
    out: list[tuple[str, tuple[int, ...]]] = [
        ("patch_embedding.weight", (d, c.in_dim, 1, 2, 2)),
        ("patch_embedding.bias", (d,)),
        ("text_embedding.0.weight", (d, c.text_dim)),
        ("text_embedding.0.bias", (d,)),
        ("text_embedding.2.weight", (d, d)),
        ("text_embedding.2.bias", (d,)),
        ("time_embedding.0.weight", (d, c.freq_dim)),
        ("time_embedding.0.bias", (d,)),
        ("time_embedding.2.weight", (d, d)),
        ("time_embedding.2.bias", (d,)),
        ("time_projection.1.weight", (6 * d, d)),
        ("time_projection.1.bias", (6 * d,)),
    ]
    for n in range(c.blocks):
        b = f"blocks.{n}"
        out.append((f"{b}.modulation", (1, 6, d)))
        for attn in ("self_attn", "cross_attn"):
            for p in ("q", "k", "v", "o"):
                out += [(f"{b}.{attn}.{p}.weight", (d, d)), (f"{b}.{attn}.{p}.bias", (d,))]
            out += [(f"{b}.{attn}.norm_q.weight", (d,)), (f"{b}.{attn}.norm_k.weight", (d,))]
            if attn == "self_attn":
                out += [(f"{b}.norm3.weight", (d,)), (f"{b}.norm3.bias", (d,))]
        out += [
            (f"{b}.ffn.0.weight", (c.ffn, d)),
            (f"{b}.ffn.0.bias", (c.ffn,)),
            (f"{b}.ffn.2.weight", (d, c.ffn)),
            (f"{b}.ffn.2.bias", (d,)),
        ]
    out += [
        ("head.head.weight", (c.out_dim * 4, d)),
        ("head.head.bias", (c.out_dim * 4,)),
        ("head.modulation", (1, 2, d)),
    ]
    return out


def lora_modules(c: WanConfig) -> list[str]:
    """The modules a ROLL LoRA targets: 10 Linear layers per block."""
    return [f"blocks.{n}.{m}" for n in range(c.blocks) for m in BLOCK_LINEARS]


def _rand(key: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int, std: float) -> torch.Tensor:
    g = torch.Generator().manual_seed((seed * 1_000_003 + sum(map(ord, key)) * 7919 + len(key)) % 2**63)
    return (torch.randn(shape, generator=g) * std).to(dtype)


def write_wan_base(
    folder: str,
    c: WanConfig,
    *,
    num_shards: int = 3,
    seed: int = 0,
    stem: str = "diffusion_pytorch_model",
    std: float = 0.02,
) -> list[str]:
    """Write a sharded Wan-shaped base with an HF index into ``folder``; return the shard paths."""
    os.makedirs(folder, exist_ok=True)
    shapes = wan_shapes(c)
    dt = to_torch(c.dtype)
    item = dt.itemsize
    sizes = [(k, math.prod(s) * item) for k, s in shapes]
    total = sum(n for _, n in sizes)
    groups: list[list[str]] = [[] for _ in range(num_shards)]
    pos = 0
    for k, n in sizes:  # each tensor goes to the shard its midpoint falls in: exactly N shards
        groups[min(num_shards - 1, int((pos + n / 2) * num_shards / total))].append(k)
        pos += n
    groups = [g for g in groups if g]
    shape_of = dict(shapes)
    files, wmap = [], {}
    for i, keys in enumerate(groups, 1):
        name = f"{stem}-{i:05d}-of-{len(groups):05d}.safetensors"
        path = os.path.join(folder, name)
        specs = [(k, c.dtype, shape_of[k]) for k in keys]

        def gen(keys: list[str] = keys) -> Iterator[tuple[str, torch.Tensor]]:
            for k in keys:
                yield k, _rand(k, shape_of[k], dt, seed, std)

        write_safetensors(path, gen(), specs=specs)
        files.append(path)
        wmap.update({k: name for k in keys})
    with open(os.path.join(folder, f"{stem}.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": wmap}, f, indent=2)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(
            {
                "_class_name": "WanModel",
                "dim": c.dim,
                "ffn_dim": c.ffn,
                "num_layers": c.blocks,
                "in_dim": c.in_dim,
                "text_dim": c.text_dim,
                "freq_dim": c.freq_dim,
                "out_dim": c.out_dim,
            },
            f,
            indent=2,
        )
    return files


def make_factors(
    c: WanConfig,
    *,
    rank: int = 8,
    seed: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    modules: list[str] | None = None,
    std: float = 0.05,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Random (A, B) factors for ``modules`` (default: the 10 linears per block)."""
    shape_of = dict(wan_shapes(c))
    out = {}
    for m in modules or lora_modules(c):
        out_f, in_f = shape_of[m + ".weight"][0], math.prod(shape_of[m + ".weight"][1:])
        a = _rand(m + ".A", (rank, in_f), dtype, seed, std)
        b = _rand(m + ".B", (out_f, rank), dtype, seed, std)
        out[m] = (a, b)
    return out


#: layout name -> (A key template, B key template, alpha key template or None)
LORA_LAYOUTS: dict[str, tuple[str, str, str | None]] = {
    "roll": ("base_model.model.{m}.lora_A.default.weight", "base_model.model.{m}.lora_B.default.weight", None),
    "diffsynth": ("{m}.lora_A.default.weight", "{m}.lora_B.default.weight", None),
    "diffusion_model": (
        "diffusion_model.{m}.lora_A.weight",
        "diffusion_model.{m}.lora_B.weight",
        "diffusion_model.{m}.alpha",
    ),
    "seko": ("diffusion_model.{m}.lora_down.weight", "diffusion_model.{m}.lora_up.weight", "diffusion_model.{m}.alpha"),
}


def write_lora(
    path: str,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    layout: str = "roll",
    alpha: float | None = None,
) -> dict[str, torch.Tensor]:
    """Write ``factors`` in ``layout`` (``.pth`` -> torch.save, else safetensors); return the dict.

    ``alpha`` adds a per-module ``.alpha`` scalar where the layout has one (scale α/r).
    """
    a_t, b_t, alpha_t = LORA_LAYOUTS[layout]
    sd: dict[str, torch.Tensor] = {}
    for m, (a, b) in factors.items():
        sd[a_t.format(m=m)] = a.contiguous()
        sd[b_t.format(m=m)] = b.contiguous()
        if alpha is not None:
            if alpha_t is None:
                raise ValueError(f"layout {layout!r} has no alpha key")
            sd[alpha_t.format(m=m)] = torch.tensor(float(alpha), dtype=torch.float32)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith((".pth", ".pt", ".bin")):
        torch.save(sd, path)
    else:
        save_file(sd, path)
    return sd
