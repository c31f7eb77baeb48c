"""Base namings (naming.py) and the LoRA -> base key resolution on each, without Ray.

Each LoRA layout is normalized against the same tiny base in four namings (original Wan, ComfyUI
``diffusion_model.`` / ``model.diffusion_model.``, diffusers) and must land on the same tensors,
each written in the base's own naming. The end-to-end cells, judged by diffusers' loader, are in
``test_base_naming.py``.
"""

from __future__ import annotations

import pytest

from distmerge.formats.keymap import DIFFUSERS_WAN, diffusers_to_wan, wan_to_diffusers
from distmerge.formats.naming import BaseNames, detect_naming
from distmerge.formats.normalize import normalize
from distmerge.inputs.header import TensorInfo
from distmerge.inputs.lorafile import LoraFile, TensorMeta

D = 8
#: canonical (original Wan) key -> shape of a tiny 1-block Wan DiT
WAN = {
    "blocks.0.self_attn.q.weight": (D, D),
    "blocks.0.self_attn.q.bias": (D,),
    "blocks.0.self_attn.o.weight": (D, D),
    "blocks.0.cross_attn.k.weight": (D, D),
    "blocks.0.ffn.0.weight": (2 * D, D),
    "blocks.0.ffn.2.weight": (D, 2 * D),
    "blocks.0.norm3.weight": (D,),
    "blocks.0.modulation": (1, 6, D),
    "head.head.weight": (4, D),
    "head.modulation": (1, 2, D),
    "time_embedding.0.weight": (D, 4),
}
#: the same model in diffusers names
DIFFUSERS = {
    "blocks.0.self_attn.q.weight": "blocks.0.attn1.to_q.weight",
    "blocks.0.self_attn.q.bias": "blocks.0.attn1.to_q.bias",
    "blocks.0.self_attn.o.weight": "blocks.0.attn1.to_out.0.weight",
    "blocks.0.cross_attn.k.weight": "blocks.0.attn2.to_k.weight",
    "blocks.0.ffn.0.weight": "blocks.0.ffn.net.0.proj.weight",
    "blocks.0.ffn.2.weight": "blocks.0.ffn.net.2.weight",
    "blocks.0.norm3.weight": "blocks.0.norm2.weight",
    "blocks.0.modulation": "blocks.0.scale_shift_table",
    "head.head.weight": "proj_out.weight",
    "head.modulation": "scale_shift_table",
    "time_embedding.0.weight": "condition_embedder.time_embedder.linear_1.weight",
}
NAMINGS = {
    "wan": lambda k: k,
    "comfy": lambda k: "diffusion_model." + k,
    "comfy-checkpoint": lambda k: "model.diffusion_model." + k,
    "diffusers": lambda k: DIFFUSERS[k],
}


def _base(naming: str) -> dict[str, TensorInfo]:
    rename = NAMINGS[naming]
    return {rename(k): TensorInfo(rename(k), "F32", shape, "base.safetensors", 0, 4) for k, shape in WAN.items()}


def _lora(keys: dict[str, tuple[int, ...]], path: str = "lora.safetensors") -> LoraFile:
    return LoraFile(path, "safetensors", {k: TensorMeta("F32", s) for k, s in keys.items()})


def _pair(
    module: str, shape: tuple[int, int], down: str = "lora_A", up: str = "lora_B", r: int = 2, suffix: str = ".weight"
) -> dict[str, tuple[int, ...]]:
    out_f, in_f = shape
    return {f"{module}.{down}{suffix}": (r, in_f), f"{module}.{up}{suffix}": (out_f, r)}


#: one LoRA per layout, each targeting q, the ffn output, the head and (where it can) a bias and a
#: modulation; -> the canonical keys it must land on
LAYOUTS = {
    "roll": (
        {
            **_pair("base_model.model.blocks.0.self_attn.q", (D, D), suffix=".default.weight"),
            **_pair("base_model.model.blocks.0.ffn.2", (D, 2 * D), suffix=".default.weight"),
        },
        ["blocks.0.self_attn.q.weight", "blocks.0.ffn.2.weight"],
    ),
    "diffusion_model": (
        {
            **_pair("diffusion_model.blocks.0.self_attn.q", (D, D), "lora_down", "lora_up"),
            "diffusion_model.blocks.0.self_attn.q.diff_b": (D,),
            "diffusion_model.blocks.0.diff_m": (1, 6, D),
            "diffusion_model.head.diff_m": (1, 2, D),
            **_pair("diffusion_model.head.head", (4, D), "lora_down", "lora_up"),
        },
        [
            "blocks.0.self_attn.q.weight",
            "blocks.0.self_attn.q.bias",
            "blocks.0.modulation",
            "head.modulation",
            "head.head.weight",
        ],
    ),
    "kohya": (
        {
            **_pair("lora_unet_blocks_0_cross_attn_k", (D, D), "lora_down", "lora_up"),
            **_pair("lora_unet_blocks_0_ffn_0", (2 * D, D), "lora_down", "lora_up"),
        },
        ["blocks.0.cross_attn.k.weight", "blocks.0.ffn.0.weight"],
    ),
    "diffusers": (
        {
            **_pair("transformer.blocks.0.attn1.to_out.0", (D, D)),
            **_pair("transformer.proj_out", (4, D)),
            "transformer.blocks.0.norm2.diff": (D,),
            **_pair("transformer.condition_embedder.time_embedder.linear_1", (D, 4)),
        },
        ["blocks.0.self_attn.o.weight", "head.head.weight", "blocks.0.norm3.weight", "time_embedding.0.weight"],
    ),
    # PEFT adapter trained on a diffusers transformer (diffusers names behind base_model.model.)
    "peft": ({**_pair("base_model.model.blocks.0.attn2.to_k", (D, D))}, ["blocks.0.cross_attn.k.weight"]),
}


@pytest.mark.parametrize("naming", list(NAMINGS))
def test_detect_naming(naming):
    assert detect_naming(_base(naming)).name == naming
    assert detect_naming(["model.layers.0.mlp.down_proj.weight", "lm_head.weight"]).name == "hf"


@pytest.mark.parametrize("naming", list(NAMINGS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_lands_on_every_base_naming(naming, layout):
    keys, canonical = LAYOUTS[layout]
    base = _base(naming)
    n = normalize(_lora(keys), base)
    assert n.unmatched == []
    assert sorted(d.target for d in n.deltas) == sorted(NAMINGS[naming](k) for k in canonical)
    assert all(d.target in base for d in n.deltas)


def test_missing_target_is_named_in_the_base_naming():
    keys = _pair("lora_unet_blocks_0_cross_attn_k_img", (D, D), "lora_down", "lora_up")
    n = normalize(_lora(keys), _base("diffusers"))
    assert len(n.unmatched) == 2 and "no base tensor 'blocks.0.attn2.add_k_proj.weight'" in n.unmatched[0].reason
    keys = _pair("lora_unet_blocks_0_cross_attn_zz", (D, D), "lora_down", "lora_up")
    n = normalize(_lora(keys), _base("diffusers"))
    assert len(n.unmatched) == 2 and "kohya module 'lora_unet_blocks_0_cross_attn_zz'" in n.unmatched[0].reason
    keys = _pair("diffusion_model.blocks.0.cross_attn.k_img", (D, D), "lora_down", "lora_up")
    (u, _) = normalize(_lora(keys), _base("diffusers")).unmatched
    assert "no base tensor 'blocks.0.attn2.add_k_proj.weight'" in u.reason
    assert "'blocks.0.cross_attn.k_img.weight' in original Wan names" in u.reason and "diffusers" in u.reason
    (u, _) = normalize(_lora(keys), _base("comfy-checkpoint")).unmatched
    assert "no base tensor 'model.diffusion_model.blocks.0.cross_attn.k_img.weight'" in u.reason


def test_full_replacement_lands_in_base_naming():
    n = normalize(_lora({"diffusion_model.blocks.0.self_attn.q.weight": (D, D)}), _base("diffusers"))
    assert [(d.kind, d.target) for d in n.deltas] == [("set", "blocks.0.attn1.to_q.weight")]


def test_llm_keys_pass_through():
    base = {
        k: TensorInfo(k, "F32", (D, D), "m.safetensors", 0, 4)
        for k in ("model.layers.0.self_attn.q_proj.weight", "proj_out.weight")
    }
    names = BaseNames(base)
    assert names.naming.name == "hf"
    assert names.find("model.layers.0.self_attn.q_proj.weight") == "model.layers.0.self_attn.q_proj.weight"
    assert names.find("head.head.weight") is None  # no Wan reading is forced onto another model


def test_rename_table_is_a_bijection_both_ways():
    for dname, wname in DIFFUSERS_WAN:
        d, w = dname.replace("{n}", "7"), wname.replace("{n}", "7")
        assert diffusers_to_wan(d) == w and wan_to_diffusers(w) == d
    assert len({d for d, _ in DIFFUSERS_WAN}) == len({w for _, w in DIFFUSERS_WAN}) == len(DIFFUSERS_WAN)
