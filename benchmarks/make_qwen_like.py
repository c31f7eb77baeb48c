#!/usr/bin/env python
"""A Qwen2.5-3B-shaped HF checkpoint (bf16, 2 shards + index, 6.17 GB) and a PEFT adapter folder
(r=64, lora_alpha=128, all 7 projections), written with plain safetensors/torch and nothing from
distmerge: the "checkpoint not in this repo" that README's Performance section benchmarks with
``bench.py --base OUT/Qwen2.5-3B-like --lora OUT/qwen-adapter``.

Usage: .venv/bin/python benchmarks/make_qwen_like.py OUT   (~1 min, 6.4 GB on disk)
"""

import json
import os
import sys

import torch
from safetensors.torch import save_file

out = sys.argv[1]
H, I, L, KV, V = 2048, 11008, 36, 256, 151936
g = torch.Generator().manual_seed(123)


def rnd(*shape, std=0.02):
    return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)


shapes = [("model.embed_tokens.weight", (V, H))]
for l in range(L):
    p = f"model.layers.{l}."
    shapes += [
        (p + "input_layernorm.weight", (H,)),
        (p + "self_attn.q_proj.weight", (H, H)),
        (p + "self_attn.q_proj.bias", (H,)),
        (p + "self_attn.k_proj.weight", (KV, H)),
        (p + "self_attn.k_proj.bias", (KV,)),
        (p + "self_attn.v_proj.weight", (KV, H)),
        (p + "self_attn.v_proj.bias", (KV,)),
        (p + "self_attn.o_proj.weight", (H, H)),
        (p + "post_attention_layernorm.weight", (H,)),
        (p + "mlp.gate_proj.weight", (I, H)),
        (p + "mlp.up_proj.weight", (I, H)),
        (p + "mlp.down_proj.weight", (H, I)),
    ]
shapes.append(("model.norm.weight", (H,)))
base = os.path.join(out, "Qwen2.5-3B-like")
os.makedirs(base, exist_ok=True)
total = sum(torch.Size(s).numel() * 2 for _, s in shapes)
half = total / 2
cur, used, n, wmap = {}, 0, 1, {}


def flush(last=False):
    global cur, n
    name = f"model-{n:05d}-of-00002.safetensors"
    save_file(cur, os.path.join(base, name), metadata={"format": "pt"})
    for k in cur:
        wmap[k] = name
    cur = {}
    n += 1


for k, s in shapes:
    cur[k] = rnd(*s)
    used += torch.Size(s).numel() * 2
    if n == 1 and used >= half:
        flush()
flush()
json.dump(
    {"metadata": {"total_size": total}, "weight_map": wmap},
    open(os.path.join(base, "model.safetensors.index.json"), "w"),
    indent=2,
)
json.dump(
    {
        "architectures": ["Qwen2ForCausalLM"],
        "hidden_size": H,
        "intermediate_size": I,
        "num_hidden_layers": L,
        "num_key_value_heads": 2,
        "num_attention_heads": 16,
        "vocab_size": V,
        "torch_dtype": "bfloat16",
    },
    open(os.path.join(base, "config.json"), "w"),
)
ad = os.path.join(out, "qwen-adapter")
os.makedirs(ad, exist_ok=True)
r = 64
sd = {}
mods = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]
dims = dict(shapes)
for l in range(L):
    for m in mods:
        o, i = dims[f"model.layers.{l}.{m}.weight"]
        k = f"base_model.model.model.layers.{l}.{m}"
        sd[k + ".lora_A.weight"] = rnd(r, i, std=0.01)
        sd[k + ".lora_B.weight"] = rnd(o, r, std=0.01)
save_file(sd, os.path.join(ad, "adapter_model.safetensors"), metadata={"format": "pt"})
json.dump(
    {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": 128,
        "lora_dropout": 0.05,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "base_model_name_or_path": "Qwen/Qwen2.5-3B",
        "modules_to_save": None,
    },
    open(os.path.join(ad, "adapter_config.json"), "w"),
    indent=2,
)
print("total GB", total / 1e9)
