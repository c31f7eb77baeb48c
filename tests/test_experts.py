"""MoE expert LoRAs (PEFT ``target_parameters``) against PEFT itself.

Tiny Qwen3-MoE and Mixtral models are built with transformers' own classes (transformers ≥ 5: fused
3-D expert parameters in memory, per-expert keys on disk) and adapted by PEFT's own ``ParamWrapper``
(``target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]``). The judge is PEFT's
``merge_and_unload`` (weights and the logits of ``from_pretrained(output)``), never our own reading
of the layout.
"""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

import distmerge
from distmerge.errors import DistmergeError, MatchError

from .helpers import assert_close_to_reference, load_checkpoint

pytestmark = [
    # PEFT 0.21 checks rank/alpha patterns against module names only, so a `<module>.<parameter>`
    # pattern (which it does apply to that parameter) is reported as unmatched
    pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys did not match"),
]

_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _qwen3_moe(seed: int = 0, *, experts: int = 4, moe_ffn: int = 24) -> Qwen3MoeForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=moe_ffn,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=experts,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return Qwen3MoeForCausalLM(cfg).eval()


def _mixtral(seed: int = 0) -> MixtralForCausalLM:
    torch.manual_seed(seed)
    cfg = MixtralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return MixtralForCausalLM(cfg).eval()


def _adapter(model, tmp_path, name: str, *, seed: int = 1, **lora) -> str:
    """A PEFT adapter of ``model`` (randomized: PEFT zero-initialises B) saved under ``name``."""
    cfg = LoraConfig(target_modules=lora.pop("target_modules", []), target_parameters=_TARGETS, **lora)
    pm = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in pm.named_parameters():
            if ".lora_" in pname:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    path = str(tmp_path / name)
    pm.save_pretrained(path)
    pm.unload()  # the model object goes back to plain for the next adapter
    return path


def _peft_merged(base_dir: str, adapter: str) -> dict[str, torch.Tensor]:
    """PEFT's own merge on the float32 base, as the on-disk (per-expert) state dict."""
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    out = str(os.path.join(os.path.dirname(adapter), f"peft-{os.path.basename(adapter)}"))
    merged.save_pretrained(out)
    return load_checkpoint(out)


def _logits(path: str, dtype=torch.float32) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    ids = torch.arange(1, 17).reshape(1, 16) % 60
    with torch.no_grad():
        return model(ids).logits.float()


def _expert_keys(sd: dict[str, torch.Tensor]) -> set[str]:
    return {k for k in sd if ".experts." in k}


@pytest.mark.ray
def test_qwen3_moe_experts_match_peft(tmp_path, ray_local):
    """Qwen3-MoE, float32: rsLoRA and a rank/alpha pattern on one layer's gate_up_proj; every expert
    weight PEFT changes, distmerge changes the same way, and the logits agree."""
    model = _qwen3_moe()
    base_dir = str(tmp_path / "base")
    model.save_pretrained(base_dir)
    adapter = _adapter(
        model,
        tmp_path,
        "ad",
        r=4,
        lora_alpha=8,
        use_rslora=True,
        rank_pattern={"model.layers.0.mlp.experts.gate_up_proj": 2},
        alpha_pattern={"model.layers.0.mlp.experts.gate_up_proj": 3},
    )
    factors = load_checkpoint(os.path.join(adapter, "adapter_model.safetensors"))
    assert factors["base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"].shape == (4 * 2, 32)
    assert factors["base_model.model.model.layers.1.mlp.experts.base_layer.lora_A.weight"].shape == (4 * 4, 32)
    ref = _peft_merged(base_dir, adapter)
    base = load_checkpoint(base_dir)
    out_dir = str(tmp_path / "out")
    rep = distmerge.merge(base_dir, [adapter], out_dir)
    out = load_checkpoint(out_dir)
    assert set(out) == set(base) == set(ref)
    experts = _expert_keys(base)
    assert len(experts) == 2 * 4 * 3
    for k in base:
        torch.testing.assert_close(out[k], ref[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
        assert torch.equal(out[k], base[k]) == (k not in experts), k
    assert rep.pairs_merged == 2 * (4 * 2 + 4)  # per layer: gate and up of 4 experts, down of 4
    torch.testing.assert_close(_logits(out_dir), _logits(os.path.join(tmp_path, "peft-ad")), rtol=1e-4, atol=1e-5)


@pytest.mark.ray
def test_mixtral_bf16_experts_within_one_ulp(tmp_path, ray_local):
    """Mixtral keeps ``block_sparse_moe.experts.e.w1/w3/w2`` on disk while PEFT names the module
    ``mlp.experts``: a bf16 base merges to PEFT's float32 merge rounded once, within 1 bf16 ulp."""
    model = _mixtral()
    base_dir = str(tmp_path / "base")
    model.to(torch.bfloat16).save_pretrained(base_dir)
    model.float()
    adapter = _adapter(model, tmp_path, "ad", r=2, lora_alpha=4)
    ref = {k: v.to(torch.bfloat16) for k, v in _peft_merged(base_dir, adapter).items()}
    out_dir = str(tmp_path / "out")
    distmerge.merge(base_dir, [adapter], out_dir)
    out, base = load_checkpoint(out_dir), load_checkpoint(base_dir)
    assert any(".block_sparse_moe.experts.0.w1.weight" in k for k in base)
    assert_close_to_reference(out, ref)
    changed = {k for k in base if not torch.equal(out[k], base[k])}
    assert changed == _expert_keys(base)
    assert torch.isfinite(_logits(out_dir, torch.bfloat16)).all()


@pytest.mark.ray
def test_two_adapters_with_weights(tmp_path, ray_local):
    """``--weight`` on expert adapters: W + 0.7·ΔW₁ − 0.3·ΔW₂, each ΔW as PEFT merges it."""
    model = _qwen3_moe(seed=3)
    base_dir = str(tmp_path / "base")
    model.save_pretrained(base_dir)
    one = _adapter(model, tmp_path, "one", seed=4, r=2, lora_alpha=4)
    two = _adapter(model, tmp_path, "two", seed=5, r=3, lora_alpha=3, target_modules=["q_proj"])
    base = load_checkpoint(base_dir)
    r1, r2 = _peft_merged(base_dir, one), _peft_merged(base_dir, two)
    expected = {
        k: (b.double() + 0.7 * (r1[k].double() - b) - 0.3 * (r2[k].double() - b)).float() for k, b in base.items()
    }
    out_dir = str(tmp_path / "out")
    distmerge.merge(base_dir, [(one, 0.7), (two, -0.3)], out_dir)
    out = load_checkpoint(out_dir)
    for k in base:
        torch.testing.assert_close(out[k], expected[k], rtol=1e-5, atol=2e-6, msg=lambda m, k=k: f"{k}: {m}")
    assert not torch.equal(
        out["model.layers.1.self_attn.q_proj.weight"], base["model.layers.1.self_attn.q_proj.weight"]
    )


def _fused_base(model, folder: str) -> dict[str, torch.Tensor]:
    """The model's in-memory state dict (fused 3-D experts) written as a safetensors base folder."""
    os.makedirs(folder)
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    model.config.to_json_file(os.path.join(folder, "config.json"))
    return sd


@pytest.mark.ray
def test_fused_expert_tensors_on_disk(tmp_path, ray_local):
    """A base storing ``mlp.experts.gate_up_proj`` ``(E, 2I, H)`` as one 3-D tensor merges into it
    (one ``experts`` delta per tensor) exactly as PEFT merges the in-memory parameter."""
    model = _qwen3_moe(seed=6)
    base = _fused_base(model, str(tmp_path / "base"))
    assert base["model.layers.0.mlp.experts.gate_up_proj"].dim() == 3
    adapter = _adapter(model, tmp_path, "ad", seed=7, r=2, lora_alpha=6)
    fresh = _qwen3_moe(seed=6)
    merged = PeftModel.from_pretrained(fresh, adapter).merge_and_unload()
    ref = merged.state_dict()
    out_dir = str(tmp_path / "out")
    rep = distmerge.merge(str(tmp_path / "base"), [adapter], out_dir)
    out = load_checkpoint(out_dir)
    assert rep.pairs_merged == 4  # two fused tensors per layer
    for k, b in base.items():
        torch.testing.assert_close(out[k], ref[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
        assert torch.equal(out[k], b) == (".experts." not in k), k


@pytest.mark.ray
def test_adapter_for_other_expert_count_is_refused(tmp_path, ray_local):
    """An adapter made for 8 experts on a base with 4 (same widths): E·r divides either way, only
    the config's r exposes it; one error naming both counts, nothing written."""
    big = _qwen3_moe(experts=8)
    adapter = _adapter(big, tmp_path, "ad8", r=2, lora_alpha=4)
    small = _qwen3_moe(experts=4)
    base_dir = str(tmp_path / "base")
    small.save_pretrained(base_dir)
    out_dir = str(tmp_path / "out")
    with pytest.raises(MatchError, match=r"16 rows, but the base has 4 experts .* made for 8 experts"):
        distmerge.merge(base_dir, [adapter], out_dir)
    assert not os.path.exists(out_dir)


@pytest.mark.ray
def test_square_fused_experts_are_refused(tmp_path, ray_local):
    """Fused experts whose (out, in) is square could be stored either way round: refused, not guessed."""
    model = _qwen3_moe(moe_ffn=16)  # gate_up_proj (E, 32, 32) with hidden 32
    _fused_base(model, str(tmp_path / "base"))
    adapter = _adapter(model, tmp_path, "ad", r=2, lora_alpha=4)
    with pytest.raises(MatchError, match="square experts"):
        distmerge.merge(str(tmp_path / "base"), [adapter], str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.ray
def test_old_per_expert_adapter_layout(tmp_path, ray_local):
    """Adapters made before transformers 5 name each expert's Linear: they merge as plain pairs."""
    model = _qwen3_moe(seed=8)
    base_dir = str(tmp_path / "base")
    model.save_pretrained(base_dir)
    base = load_checkpoint(base_dir)
    g = torch.Generator().manual_seed(9)
    factors, sd = {}, {}
    for e in range(4):
        m = f"model.layers.1.mlp.experts.{e}.up_proj"
        a, b = torch.randn(2, 32, generator=g), torch.randn(24, 2, generator=g)
        factors[m] = (a, b)
        sd[f"base_model.model.{m}.lora_A.weight"], sd[f"base_model.model.{m}.lora_B.weight"] = a, b
    ad = tmp_path / "old"
    ad.mkdir()
    save_file(sd, str(ad / "adapter_model.safetensors"))
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 3}))
    out_dir = str(tmp_path / "out")
    distmerge.merge(base_dir, [str(ad)], out_dir)
    out = load_checkpoint(out_dir)
    for m, (a, b) in factors.items():
        want = (base[m + ".weight"].double() + 1.5 * (b.double() @ a.double())).float()
        torch.testing.assert_close(out[m + ".weight"], want, rtol=1e-5, atol=1e-6)


@pytest.mark.ray
def test_converter_rank_pattern_warns(tmp_path, ray_local, caplog):
    """A PEFT adapter whose rank_pattern puts experts at r // topk (what ROLL's Megatron converter
    writes) merges with PEFT's semantics and a warning saying the trained delta was 1/topk of it."""
    model = _qwen3_moe(seed=10)
    base_dir = str(tmp_path / "base")
    model.save_pretrained(base_dir)
    g = torch.Generator().manual_seed(11)
    sd = {}
    for e in range(4):
        m = f"base_model.model.model.layers.0.mlp.experts.{e}.down_proj"
        sd[m + ".lora_A.weight"], sd[m + ".lora_B.weight"] = (
            torch.randn(2, 24, generator=g),
            torch.randn(32, 2, generator=g),
        )
    ad = tmp_path / "conv"
    ad.mkdir()
    save_file(sd, str(ad / "adapter_model.safetensors"))
    cfg = {
        "peft_type": "LORA",
        "r": 4,
        "lora_alpha": 8,
        "rank_pattern": {
            "experts.0.down_proj": 2,
            "experts.1.down_proj": 2,
            "experts.2.down_proj": 2,
            "experts.3.down_proj": 2,
        },
    }
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    with caplog.at_level(logging.WARNING, logger="distmerge"):
        rep = distmerge.merge(base_dir, [str(ad)], str(tmp_path / "out"))
    assert rep.pairs_merged == 4
    assert any("r/topk" in r.getMessage() and "2×" in r.getMessage() for r in caplog.records), caplog.text


def test_inspect_names_expert_parameters(tmp_path):
    """``inspect`` of a target_parameters adapter alone shows the fused parameters and their rank."""
    model = _qwen3_moe(seed=12)
    adapter = _adapter(model, tmp_path, "ad", r=2, lora_alpha=4)
    from distmerge.app.inspect import inspect_lora

    desc = inspect_lora(adapter)
    groups = {g["group"]: g for g in desc.groups}
    assert groups["model.layers.N.mlp.experts.gate_up_proj"]["rank"] == 2
    assert groups["model.layers.N.mlp.experts.down_proj"]["kind"] == "experts"
    assert not isinstance(desc.error, DistmergeError)


def test_no_peft_at_run_time(tmp_path):
    """ROLL's images pin PEFT 0.12 (older than target_parameters): reading and placing an expert
    adapter imports neither PEFT nor transformers."""
    import subprocess
    import sys

    model = _qwen3_moe(seed=13)
    base_dir = str(tmp_path / "base")
    model.save_pretrained(base_dir)
    adapter = _adapter(model, tmp_path, "ad", r=2, lora_alpha=4)
    code = (
        "import sys\n"
        "from distmerge.app.preflight import collect_deltas\n"
        "from distmerge.inputs.checkpoint import open_base\n"
        f"g = collect_deltas(open_base({base_dir!r}), [({adapter!r}, 1.0)])\n"
        "assert len(g.deltas) == 24, len(g.deltas)\n"
        "print(sorted(m for m in ('peft', 'transformers') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
