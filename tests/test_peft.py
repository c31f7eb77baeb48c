"""distmerge against PEFT itself: real adapter folders written by ``PeftModel.save_pretrained`` on
tiny transformers models, merged by distmerge and by PEFT's ``merge_and_unload``.

Everything is built offline from configs with fixed seeds (no hub access). PEFT saves the adapter
keys as ``base_model.model.<module path>…`` and transformers saves the base as ``<module path>.weight``;
for LlamaForCausalLM and GPT2LMHeadModel (transformers 5.x) the in-memory module paths and the
checkpoint keys are the same (``model.layers.0.self_attn.q_proj.weight``,
``transformer.h.0.attn.c_attn.weight``), so no key conversion is involved.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from peft import LoraConfig, OFTConfig, get_peft_model
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import distmerge
from distmerge.errors import FormatError, MatchError

from .helpers import load_checkpoint, tiny_llm_config

pytestmark = pytest.mark.ray


def _llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(**tiny_llm_config(**overrides))
    return LlamaForCausalLM(cfg).eval()


def _gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_embd=32,
        n_layer=2,
        n_head=4,
        vocab_size=64,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=False,
    )
    return GPT2LMHeadModel(cfg).eval()


def _randomize(peft_model, seed: int) -> list[str]:
    """Overwrite every adapter parameter (LoRA factors, biases, DoRA magnitudes, modules_to_save
    copies) with randn·0.1: PEFT zero-initialises lora_B, which would make every merge a no-op."""
    g = torch.Generator().manual_seed(seed)
    names = []
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".lora_" in name or ".modules_to_save." in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
                names.append(name)
    assert names, "no adapter parameters found"
    return names


def _save_base(model, tmp_path) -> tuple[str, dict[str, torch.Tensor]]:
    base_dir = str(tmp_path / "base")
    model.save_pretrained(base_dir, safe_serialization=True)
    assert os.path.isfile(os.path.join(base_dir, "model.safetensors"))
    return base_dir, load_file(os.path.join(base_dir, "model.safetensors"))


def _make_adapter(model, lora_cfg, tmp_path, *, seed: int = 1, safe: bool = True):
    """Save the base, wrap it with PEFT, randomize and save the adapter; PEFT's merged state dict."""
    base_dir, base = _save_base(model, tmp_path)
    pm = get_peft_model(model, lora_cfg)
    _randomize(pm, seed)
    ad_dir = str(tmp_path / "adapter")
    pm.save_pretrained(ad_dir, safe_serialization=safe)
    merged = pm.merge_and_unload()
    ref = {k: v.detach().clone() for k, v in merged.state_dict().items()}
    return base_dir, base, ad_dir, ref


def _adapter_keys(ad_dir: str) -> dict[str, tuple[int, ...]]:
    st = os.path.join(ad_dir, "adapter_model.safetensors")
    if os.path.isfile(st):
        sd = load_file(st)
    else:
        sd = torch.load(os.path.join(ad_dir, "adapter_model.bin"), weights_only=True)
    return {k: tuple(v.shape) for k, v in sd.items()}


def _merge_and_compare(base_dir, base, ad_dir, ref, tmp_path, *, changed: set[str]) -> dict:
    """distmerge's output must equal PEFT's merge tensor by tensor; ``changed`` keys must differ
    from the base (the adapter really did something) and all other keys must be untouched."""
    out_dir = str(tmp_path / "out")
    rep = distmerge.merge(base_dir, [ad_dir], out_dir)
    out = load_checkpoint(out_dir)
    assert set(ref) == set(base), set(ref) ^ set(base)  # PEFT's merged model has the base's keys
    assert set(out) == set(base), set(out) ^ set(base)
    assert changed <= set(base), changed - set(base)
    for k, r in ref.items():
        o = out[k]
        assert o.dtype == r.dtype == base[k].dtype and o.shape == r.shape, (k, o.dtype, r.dtype, o.shape)
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
        if k in changed:
            assert not torch.allclose(r, base[k]), f"{k}: PEFT's merge left it unchanged"
        else:
            assert torch.equal(o, base[k]), f"{k}: not targeted but changed"
    assert rep.unmatched == []
    return rep


def _layers(fmt: str, n: int = 2) -> set[str]:
    return {fmt.format(i) for i in range(n)}


_QV = _layers("model.layers.{}.self_attn.q_proj.weight") | _layers("model.layers.{}.self_attn.v_proj.weight")

LLAMA_CASES = {
    # (a) plain LoRA, α != r  (c = 12/4 = 3)
    "plain": (dict(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj"]), {}, _QV),
    # (b) per-module rank and alpha: q_proj r=2 (α=12 → c=6), v_proj r=4 α=16 (c=4)
    "rank_alpha_pattern": (
        dict(
            r=4,
            lora_alpha=12,
            target_modules=["q_proj", "v_proj"],
            rank_pattern={"q_proj": 2},
            alpha_pattern={"v_proj": 16},
        ),
        {},
        _QV,
    ),
    # (c) rsLoRA: c = α/√r
    "rslora": (dict(r=4, lora_alpha=6, target_modules=["q_proj", "v_proj"], use_rslora=True), {}, _QV),
    # (d) DoRA: W' = m/‖W+cBA‖_row · (W+cBA)
    "dora": (dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True), {}, _QV),
    # (g) lora_bias: b' = b + c·lora_B.bias (needs a base bias: attention_bias=True)
    "lora_bias": (
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_bias=True),
        dict(attention_bias=True),
        _QV | _layers("model.layers.{}.self_attn.q_proj.bias") | _layers("model.layers.{}.self_attn.v_proj.bias"),
    ),
    # (h) an embedding target: lora_embedding_A [r, vocab], lora_embedding_B [dim, r], ΔW = (BA)ᵀ;
    # PEFT also saves ``embed_tokens.base_layer.weight`` whole (save_embedding_layers turns itself on)
    "embedding": (dict(r=4, lora_alpha=8, target_modules=["embed_tokens"]), {}, {"model.embed_tokens.weight"}),
    # (i) modules_to_save: lm_head saved whole → a full replacement (plus LoRA elsewhere)
    "modules_to_save": (
        dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]),
        {},
        _layers("model.layers.{}.self_attn.q_proj.weight") | {"lm_head.weight"},
    ),
}

#: adapter keys each case must produce (so a PEFT change that alters the layout is noticed)
LLAMA_KEYS = {
    "plain": [
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight",
    ],
    "rank_alpha_pattern": ["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"],
    "rslora": ["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"],
    "dora": ["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"],
    "lora_bias": ["base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias"],
    "embedding": [
        "base_model.model.model.embed_tokens.base_layer.weight",
        "base_model.model.model.embed_tokens.lora_embedding_A",
        "base_model.model.model.embed_tokens.lora_embedding_B",
    ],
    "modules_to_save": ["base_model.model.lm_head.weight"],
}


@pytest.mark.parametrize("case", list(LLAMA_CASES))
def test_llama_adapter_matches_peft_merge(case, tmp_path, ray_local):
    lora_kw, model_kw, changed = LLAMA_CASES[case]
    base_dir, base, ad_dir, ref = _make_adapter(_llama(**model_kw), LoraConfig(**lora_kw), tmp_path)
    keys = _adapter_keys(ad_dir)
    for k in LLAMA_KEYS[case]:
        assert k in keys, (k, sorted(keys))
    if case == "rank_alpha_pattern":
        assert keys["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] == (2, 32)
        assert keys["base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"] == (4, 32)
    if case == "embedding":
        assert keys["base_model.model.model.embed_tokens.lora_embedding_A"] == (4, 64)
        assert keys["base_model.model.model.embed_tokens.lora_embedding_B"] == (32, 4)
    rep = _merge_and_compare(base_dir, base, ad_dir, ref, tmp_path, changed=changed)
    assert rep.loras[0]["layout"] == "peft"
    # one delta per changed tensor, except the embedding: PEFT also saves the full base embedding
    # (``embed_tokens.base_layer.weight``, save_embedding_layers=True), a replacement applied first
    assert rep.pairs_merged == len(changed) + (case == "embedding")


def test_bin_adapter_matches_peft_merge(tmp_path, ray_local):
    """(e) ``adapter_model.bin`` (safe_serialization=False, as ROLL's LLM runs save)."""
    cfg = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])
    base_dir, base, ad_dir, ref = _make_adapter(_llama(), cfg, tmp_path, safe=False)
    assert os.path.isfile(os.path.join(ad_dir, "adapter_model.bin"))
    assert not os.path.exists(os.path.join(ad_dir, "adapter_model.safetensors"))
    changed = _QV | _layers("model.layers.{}.mlp.down_proj.weight")
    _merge_and_compare(base_dir, base, ad_dir, ref, tmp_path, changed=changed)


def test_gpt2_fan_in_fan_out_matches_peft_merge(tmp_path, ray_local):
    """(f) GPT-2 Conv1D stores W as [in, out]: PEFT needs fan_in_fan_out=True, ΔW = (BA)ᵀ."""
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
    base_dir, base, ad_dir, ref = _make_adapter(_gpt2(), cfg, tmp_path)
    assert base["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)
    keys = _adapter_keys(ad_dir)
    assert keys["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"] == (4, 32)
    assert keys["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"] == (96, 4)
    with open(os.path.join(ad_dir, "adapter_config.json")) as f:
        assert json.load(f)["fan_in_fan_out"] is True
    _merge_and_compare(base_dir, base, ad_dir, ref, tmp_path, changed=_layers("transformer.h.{}.attn.c_attn.weight"))


def test_gpt2_fan_in_fan_out_dora_matches_peft_merge(tmp_path, ray_local):
    """fan_in_fan_out with DoRA: PEFT takes the norm per output row of the transposed weight."""
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, use_dora=True)
    base_dir, base, ad_dir, ref = _make_adapter(_gpt2(), cfg, tmp_path)
    assert _adapter_keys(ad_dir)["base_model.model.transformer.h.0.attn.c_attn.lora_magnitude_vector"] == (96,)
    _merge_and_compare(base_dir, base, ad_dir, ref, tmp_path, changed=_layers("transformer.h.{}.attn.c_attn.weight"))


def test_gpt2_fan_in_fan_out_dora_square_matches_peft_merge(tmp_path, ray_local):
    """The same on a square Conv1D, where the wrong axis has the right length and nothing raises."""
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["attn.c_proj"], fan_in_fan_out=True, use_dora=True)
    base_dir, base, ad_dir, ref = _make_adapter(_gpt2(), cfg, tmp_path)
    assert base["transformer.h.0.attn.c_proj.weight"].shape == (32, 32)
    _merge_and_compare(base_dir, base, ad_dir, ref, tmp_path, changed=_layers("transformer.h.{}.attn.c_proj.weight"))


def test_config_rank_disagrees_with_weights(tmp_path, ray_local):
    """(j) adapter_config.json says r=8 but the factors have rank 4 → MatchError naming both."""
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])
    base_dir, _, ad_dir, _ = _make_adapter(_llama(), cfg, tmp_path)
    path = os.path.join(ad_dir, "adapter_config.json")
    with open(path) as f:
        conf = json.load(f)
    conf["r"] = 8
    with open(path, "w") as f:
        json.dump(conf, f)
    with pytest.raises(MatchError) as ei:
        distmerge.merge(base_dir, [ad_dir], str(tmp_path / "out"))
    msg = str(ei.value)
    assert "self_attn.q_proj" in msg and "rank 4" in msg and "r=8" in msg, msg
    assert not os.path.exists(tmp_path / "out") or not os.listdir(tmp_path / "out")


def test_oft_adapter_is_refused(tmp_path, ray_local):
    """(k) a real PEFT OFT adapter (peft_type "OFT") → FormatError, not a silent wrong merge."""
    base_dir, _ = _save_base(_llama(), tmp_path)
    pm = get_peft_model(_llama(), OFTConfig(r=0, oft_block_size=4, target_modules=["q_proj"]))
    ad_dir = str(tmp_path / "oft")
    pm.save_pretrained(ad_dir)
    with open(os.path.join(ad_dir, "adapter_config.json")) as f:
        assert json.load(f)["peft_type"] == "OFT"
    with pytest.raises(FormatError, match="OFT"):
        distmerge.merge(base_dir, [ad_dir], str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out") or not os.listdir(tmp_path / "out")
