#!/usr/bin/env python
"""A slice of a Qwen3-30B-A3B-shaped MoE checkpoint (bf16, per-expert keys as transformers 5's
``save_pretrained`` writes them: LAYERS x 128 experts x gate/up/down, hidden 2048, expert ffn 768,
one shard per layer + index, ~1.21 GB a layer) and a PEFT ``target_parameters`` adapter (r 8,
lora_alpha 16, on ``mlp.experts.gate_up_proj`` and ``mlp.experts.down_proj``: 13 MB a layer), written
with plain safetensors/torch and nothing from distmerge. README's LLM section benchmarks it with
``bench.py --base OUT/base --lora OUT/adapter``.

Usage: .venv/bin/python benchmarks/make_moe_like.py OUT [LAYERS=2]   (~20 s, 2.4 GB for 2 layers)
"""

import json
import os
import sys

import torch
from safetensors import safe_open
from safetensors.torch import save_file

out = sys.argv[1]
L = int(sys.argv[2]) if len(sys.argv) > 2 else 2
E, H, I, R = 128, 2048, 768, 8
g = torch.Generator().manual_seed(123)
os.makedirs(f"{out}/base", exist_ok=True)
os.makedirs(f"{out}/adapter", exist_ok=True)


def rnd(*shape: int, std: float = 0.02) -> torch.Tensor:
    return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)


weight_map = {}
for layer in range(L):
    name = f"model-{layer + 1:05d}-of-{L:05d}.safetensors"
    shard = {}
    for e in range(E):
        for part, shape in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
            shard[f"model.layers.{layer}.mlp.experts.{e}.{part}.weight"] = rnd(*shape)
    save_file(shard, f"{out}/base/{name}", metadata={"format": "pt"})
    with safe_open(f"{out}/base/{name}", "pt") as f:
        weight_map.update(dict.fromkeys(f.keys(), name))
with open(f"{out}/base/model.safetensors.index.json", "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)
with open(f"{out}/base/config.json", "w") as f:
    json.dump({"model_type": "qwen3_moe", "num_experts": E, "num_experts_per_tok": 8, "hidden_size": H}, f)

adapter = {}
for layer in range(L):
    p = f"base_model.model.model.layers.{layer}.mlp.experts"
    adapter[f"{p}.base_layer.lora_A.weight"] = rnd(E * R, H, std=0.01)  # gate_up_proj
    adapter[f"{p}.base_layer.lora_B.weight"] = rnd(2 * I, E * R, std=0.01)
    adapter[f"{p}.lora_A.weight"] = rnd(E * R, I, std=0.01)  # down_proj
    adapter[f"{p}.lora_B.weight"] = rnd(H, E * R, std=0.01)
save_file(adapter, f"{out}/adapter/adapter_model.safetensors")
config = {
    "peft_type": "LORA",
    "r": R,
    "lora_alpha": 2 * R,
    "target_modules": [],
    "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
}
with open(f"{out}/adapter/adapter_config.json", "w") as f:
    json.dump(config, f, indent=2)
print(f"base={out}/base lora={out}/adapter")
