"""Megatron (ROLL ``mcore_adapter``) LoRA checkpoints merged onto Hugging Face bases.

What is judged:

* the real example made by ROLL's own code (``/work/shared/examples/megatron_qwen3_tp2``, TP 2):
  merging its checkpoint root, its adapter folder and its ``iter_…`` folder gives
  ``expected.safetensors`` (bf16 rule: ≥ 99.9 % bit-exact, none beyond 1 ulp), and the merged folder
  loads with ``from_pretrained`` and reproduces the reference logits;
* a dense Qwen3 at TP 2 × PP 2 whose rank files are cut by this module's own splitter from a known
  PEFT adapter (q/k/v and gate/up sharing ``lora_A``, kv_channels ≠ hidden / heads, two query groups
  per TP rank, so the per-group qkv interleave is exercised): the merge equals
  a float64 merge of the adapter's factors and PEFT's own ``merge_and_unload``;
* a Qwen3-MoE at TP 2 × PP 2 × EP 2: the experts' rank is r // topk but their scale is α / r with the
  full r (as training used); the merge equals a float64 reference and loads with ``from_pretrained``;
* bad checkpoints (a missing rank file, replicated shards that differ, two adapters, router LoRA, an
  unmapped family) fail the CLI with one ``distmerge: error:`` line, publish nothing and leave the
  inputs as they were;
* ``distmerge inspect`` names the Megatron layout and the adapter folder.

The splitter below follows ``/work/shared/reference/roll-llm-lora.md`` ("Megatron (mcore_adapter) LoRA
on disk"), independently of ``distmerge.formats.megatron``: qkv rows interleaved per query group, each
fc1 shard ``[gate_t; up_t]``, row-parallel A split by columns, layers local to the pipeline stage,
experts local to the expert-parallel rank, ``_extra_state`` uint8 tensors beside every factor.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import distmerge

from .conftest import snapshot
from .helpers import assert_close_to_reference, load_checkpoint, reference_merge, shared_path

EXAMPLE = shared_path("examples", "megatron_qwen3_tp2")
ADAPTER = "default"
ITER = "iter_0000001"
RANK_FILE = "model_optim_rng.pt"
#: the Megatron module of each short kind, and the Hugging Face parts it holds
MCORE = {
    "qkv": "self_attention.linear_qkv",
    "proj": "self_attention.linear_proj",
    "fc1": "mlp.linear_fc1",
    "fc2": "mlp.linear_fc2",
}
HF_ATTN = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj"}
HF_MLP = {"gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


# --------------------------------------------------------------------------- the Megatron writer


def interleave_qkv(bq: torch.Tensor, bk: torch.Tensor, bv: torch.Tensor, heads: int, groups: int, d: int):
    """Megatron's fused qkv B: per query group, its heads/groups query heads, its K head, its V head."""
    q = heads // groups
    rows = []
    for g in range(groups):
        rows += [bq[g * q * d : (g + 1) * q * d], bk[g * d : (g + 1) * d], bv[g * d : (g + 1) * d]]
    return torch.cat(rows)


def _shard(kind: str, a: torch.Tensor, b: torch.Tensor, tp: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """TP rank ``t``'s (A, B) of a module whose whole factors are ``a``, ``b`` (fc1's b = [gate; up])."""
    if kind == "qkv":  # column parallel; each rank holds whole query groups
        return a.clone(), b.chunk(tp)[t].clone()
    if kind == "fc1":  # column parallel; each shard is [gate_t; up_t]
        gate, up = b.chunk(2)
        return a.clone(), torch.cat([gate.chunk(tp)[t], up.chunk(tp)[t]])
    return a.chunk(tp, dim=1)[t].clone(), b.clone()  # row parallel: A by columns, B replicated


def write_megatron(
    root: str,
    modules: dict[tuple[int, str, int | None], tuple[torch.Tensor, torch.Tensor]],
    mca: dict[str, object],
    adapter_config: dict[str, object],
) -> str:
    """Write a ROLL checkpoint root holding one adapter ``default``; returns the root.

    ``modules[(global layer, kind, global expert or None)] = (A, B)`` with the factors whole (qkv's B
    already interleaved, fc1's B = ``[gate; up]``); kind is qkv/proj/fc1/fc2 (fc1/fc2 for experts).
    """
    tp = mca["tensor_model_parallel_size"]
    pp = mca["pipeline_model_parallel_size"]
    ep = mca["expert_model_parallel_size"]
    per_stage = mca["num_layers"] // pp
    per_ep = (mca["num_moe_experts"] or 0) // ep
    adapter = os.path.join(root, ADAPTER)
    os.makedirs(os.path.join(adapter, ITER))
    for folder in (root, adapter):
        with open(os.path.join(folder, "mca_config.json"), "w") as f:
            json.dump(mca, f, indent=2)
    with open(os.path.join(adapter, "adapter_config.json"), "w") as f:
        json.dump(adapter_config, f, indent=2)
    with open(os.path.join(adapter, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("1")
    for t in range(tp):
        for p in range(pp):
            for e in range(ep):
                sd: dict[str, torch.Tensor] = {}
                for (layer, kind, expert), (a, b) in sorted(modules.items(), key=lambda kv: str(kv[0])):
                    if layer // per_stage != p or (expert is not None and expert // per_ep != e):
                        continue
                    local = layer % per_stage
                    a_t, b_t = _shard(kind, a, b, tp, t)
                    if expert is None:
                        prefix, suffix = f"decoder.layers.{local}.{MCORE[kind]}", ""
                    else:
                        prefix, suffix = f"decoder.layers.{local}.mlp.experts.linear_{kind}", str(expert % per_ep)
                    for half, w in (("A", a_t), ("B", b_t)):
                        sd[f"{prefix}.lora_{half}.weight{suffix}"] = w.contiguous()
                        sd[f"{prefix}.lora_{half}._extra_state"] = torch.zeros(0, dtype=torch.uint8)
                name = f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else "") + (f"_{e:03d}" if ep > 1 else "")
                os.makedirs(os.path.join(adapter, ITER, name))
                torch.save({"model": sd}, os.path.join(adapter, ITER, name, RANK_FILE))
    return root


def mca_config(**overrides: object) -> dict[str, object]:
    """The ``mca_config.json`` fields distmerge reads (a real one holds ~300 more)."""
    return {
        "tensor_model_parallel_size": 2,
        "pipeline_model_parallel_size": 2,
        "expert_model_parallel_size": 1,
        "expert_tensor_parallel_size": None,
        "num_layers": 4,
        "hidden_size": 32,
        "num_attention_heads": 4,
        "num_query_groups": 2,
        "kv_channels": 16,
        "num_moe_experts": None,
        "moe_router_topk": 2,
        "hf_model_type": "qwen3",
    } | overrides


def megatron_adapter_config(r: int, alpha: float, targets: list[str]) -> dict[str, object]:
    return {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "use_rslora": False,
        "use_dora": False,
        "target_modules": targets,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
        "lora_dropout": 0.0,
        "bias": "none",
    }


def _bf16_randn(*shape: int, g: torch.Generator) -> torch.Tensor:
    return (torch.randn(*shape, generator=g) * 0.1).to(torch.bfloat16)


def _logits(model_dir: str, input_ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def _changed(out: dict[str, torch.Tensor], base: dict[str, torch.Tensor], targeted: set[str]) -> None:
    """Every targeted tensor moved; every other one is the base's, bit for bit."""
    assert set(out) == set(base)
    for k, w in base.items():
        if k in targeted:
            assert not torch.equal(out[k], w), f"{k} was not merged"
        else:
            assert torch.equal(out[k], w), f"{k} changed but no LoRA targets it"


# --------------------------------------------------------------------------- 1. the real example


@pytest.mark.ray
@pytest.mark.parametrize("where", ["root", "adapter", "iteration"])
def test_real_example_matches_expected(where, tmp_path, ray_local):
    lora = {
        "root": os.path.join(EXAMPLE, "roll_ckpt"),
        "adapter": os.path.join(EXAMPLE, "roll_ckpt", ADAPTER),
        "iteration": os.path.join(EXAMPLE, "roll_ckpt", ADAPTER, ITER),
    }[where]
    before = snapshot(EXAMPLE)
    out = str(tmp_path / "out")
    rep = distmerge.merge(os.path.join(EXAMPLE, "base"), [lora], out)
    assert rep.unmatched == []
    assert rep.pairs_merged == 4 * 7  # 4 layers × q, k, v, o, gate, up, down
    expected = load_file(os.path.join(EXAMPLE, "expected.safetensors"))
    merged = load_checkpoint(out)
    assert_close_to_reference(merged, expected)
    base = load_checkpoint(os.path.join(EXAMPLE, "base"))
    _changed(merged, base, {k for k in base if any(p in k for p in (*HF_ATTN.values(), *HF_MLP.values()))})
    assert snapshot(EXAMPLE) == before
    if where == "root":  # the forward check once: the merged folder is a loadable model
        fwd = load_file(os.path.join(EXAMPLE, "forward.safetensors"))
        logits = _logits(out, fwd["input_ids"])
        torch.testing.assert_close(logits, fwd["reference_logits"].float(), atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- 2. dense Qwen3, TP 2 × PP 2

DENSE = {"hidden": 32, "heads": 8, "groups": 4, "head_dim": 8, "ffn": 48, "layers": 4, "r": 4, "alpha": 8.0}


def _dense_peft(tmp_path) -> tuple[str, str, dict[str, torch.Tensor]]:
    """A bf16 Qwen3 base and a randomized PEFT adapter (q/k/v and gate/up sharing lora_A, every factor
    bf16-representable); returns (base dir, adapter dir, PEFT's float32 merge rounded to bf16)."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import Qwen3Config, Qwen3ForCausalLM

    c = DENSE
    torch.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=64,
        hidden_size=c["hidden"],
        intermediate_size=c["ffn"],
        num_hidden_layers=c["layers"],
        num_attention_heads=c["heads"],
        num_key_value_heads=c["groups"],
        head_dim=c["head_dim"],
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = Qwen3ForCausalLM(cfg).eval()
    base_dir = str(tmp_path / "base")
    model.to(torch.bfloat16).save_pretrained(base_dir)
    model = Qwen3ForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    pm = get_peft_model(model, LoraConfig(r=c["r"], lora_alpha=c["alpha"], target_modules=targets))
    g = torch.Generator().manual_seed(1)
    params = dict(pm.named_parameters())
    with torch.no_grad():
        for name, p in params.items():
            if ".lora_" in name:
                p.copy_(_bf16_randn(*p.shape, g=g).float())
        for name, p in params.items():  # a fused Megatron layer has one lora_A for all its parts
            for shared, owner in (("k_proj", "q_proj"), ("v_proj", "q_proj"), ("up_proj", "gate_proj")):
                if f".{shared}.lora_A." in name:
                    p.copy_(params[name.replace(shared, owner)])
    ad_dir = str(tmp_path / "adapter")
    pm.save_pretrained(ad_dir)
    fresh = Qwen3ForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(fresh, ad_dir).merge_and_unload()
    peft_ref = {k: v.detach().to(torch.bfloat16) for k, v in merged.state_dict().items()}
    return base_dir, ad_dir, peft_ref


def peft_to_megatron(adapter: dict[str, torch.Tensor], layers: int, heads: int, groups: int, d: int):
    """A PEFT adapter of a Qwen3/Llama-style model as Megatron modules (whole factors, bf16)."""

    def f(layer: int, part: str, half: str) -> torch.Tensor:
        return adapter[f"base_model.model.model.layers.{layer}.{part}.lora_{half}.weight"].to(torch.bfloat16)

    modules = {}
    for L in range(layers):
        qa, ka, va = (f(L, HF_ATTN[p], "A") for p in "qkv")
        assert torch.equal(qa, ka) and torch.equal(qa, va)
        bq, bk, bv = (f(L, HF_ATTN[p], "B") for p in "qkv")
        modules[(L, "qkv", None)] = (qa, interleave_qkv(bq, bk, bv, heads, groups, d))
        modules[(L, "proj", None)] = (f(L, HF_ATTN["o"], "A"), f(L, HF_ATTN["o"], "B"))
        assert torch.equal(f(L, HF_MLP["gate"], "A"), f(L, HF_MLP["up"], "A"))
        fc1_b = torch.cat([f(L, HF_MLP["gate"], "B"), f(L, HF_MLP["up"], "B")])
        modules[(L, "fc1", None)] = (f(L, HF_MLP["gate"], "A"), fc1_b)
        modules[(L, "fc2", None)] = (f(L, HF_MLP["down"], "A"), f(L, HF_MLP["down"], "B"))
    return modules


@pytest.mark.ray
def test_dense_qwen3_tp2_pp2_matches_peft(tmp_path, ray_local):
    c = DENSE
    base_dir, ad_dir, peft_ref = _dense_peft(tmp_path)
    adapter = load_file(os.path.join(ad_dir, "adapter_model.safetensors"))
    modules = peft_to_megatron(adapter, c["layers"], c["heads"], c["groups"], c["head_dim"])
    mca = mca_config(
        hidden_size=c["hidden"],
        num_attention_heads=c["heads"],
        num_query_groups=c["groups"],
        kv_channels=c["head_dim"],
        num_layers=c["layers"],
    )
    # kv_channels is not hidden / heads, and each TP rank holds two query groups: reading the fused
    # qkv B as per-rank [q; k; v] blocks (right only for one group per rank) would fail here
    assert mca["kv_channels"] != mca["hidden_size"] // mca["num_attention_heads"]
    assert mca["num_query_groups"] // mca["tensor_model_parallel_size"] == 2
    acfg = megatron_adapter_config(c["r"], c["alpha"], ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"])
    root = write_megatron(str(tmp_path / "checkpoint-1"), modules, mca, acfg)
    assert sorted(os.listdir(os.path.join(root, ADAPTER, ITER))) == [
        "mp_rank_00_000",
        "mp_rank_00_001",
        "mp_rank_01_000",
        "mp_rank_01_001",
    ]

    out = str(tmp_path / "out")
    rep = distmerge.merge(base_dir, [root], out)
    assert rep.unmatched == []
    assert rep.pairs_merged == c["layers"] * 7

    base = load_checkpoint(base_dir)
    s = c["alpha"] / c["r"]
    terms = {}
    for k, a in adapter.items():
        if ".lora_A." in k:
            module = k.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = adapter[k.replace(".lora_A.", ".lora_B.")]
            terms[module + ".weight"] = [(s, b.double() @ a.double())]
    assert len(terms) == c["layers"] * 7 and set(terms) <= set(base)
    merged = load_checkpoint(out)
    assert_close_to_reference(merged, reference_merge(base, terms))
    assert_close_to_reference(merged, {k: peft_ref[k] for k in base})
    _changed(merged, base, set(terms))


# --------------------------------------------------------------------------- 3. Qwen3-MoE, TP 2 × PP 2 × EP 2

MOE = {"hidden": 32, "heads": 8, "groups": 4, "head_dim": 8, "moe_ffn": 24, "layers": 4, "experts": 4, "topk": 2}


@pytest.mark.ray
def test_moe_qwen3_tp2_pp2_ep2_scales_experts_by_full_rank(tmp_path, ray_local):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    c, r, alpha = MOE, 4, 8.0
    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(
        vocab_size=64,
        hidden_size=c["hidden"],
        intermediate_size=48,
        num_hidden_layers=c["layers"],
        num_attention_heads=c["heads"],
        num_key_value_heads=c["groups"],
        head_dim=c["head_dim"],
        num_experts=c["experts"],
        num_experts_per_tok=c["topk"],
        moe_intermediate_size=c["moe_ffn"],
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    base_dir = str(tmp_path / "base")
    Qwen3MoeForCausalLM(cfg).to(torch.bfloat16).save_pretrained(base_dir)
    base = load_checkpoint(base_dir)
    assert "model.layers.3.mlp.experts.3.gate_proj.weight" in base  # per-expert keys on disk

    g = torch.Generator().manual_seed(2)
    H, d, F = c["hidden"], c["head_dim"], c["moe_ffn"]
    r_e = r // c["topk"]  # the experts' tensors have rank r // topk ...
    s = alpha / r  # ... but training scaled them by alpha / r with the full r
    modules, terms = {}, {}
    for L in range(c["layers"]):
        a = _bf16_randn(r, H, g=g)
        bq, bk, bv = (
            _bf16_randn(c["heads"] * d, r, g=g),
            _bf16_randn(c["groups"] * d, r, g=g),
            _bf16_randn(c["groups"] * d, r, g=g),
        )
        modules[(L, "qkv", None)] = (a, interleave_qkv(bq, bk, bv, c["heads"], c["groups"], d))
        for part, b in zip("qkv", (bq, bk, bv)):
            terms[f"model.layers.{L}.{HF_ATTN[part]}.weight"] = [(s, b.double() @ a.double())]
        a_o, b_o = _bf16_randn(r, c["heads"] * d, g=g), _bf16_randn(H, r, g=g)
        modules[(L, "proj", None)] = (a_o, b_o)
        terms[f"model.layers.{L}.{HF_ATTN['o']}.weight"] = [(s, b_o.double() @ a_o.double())]
        for E in range(c["experts"]):
            a1, gate, up = _bf16_randn(r_e, H, g=g), _bf16_randn(F, r_e, g=g), _bf16_randn(F, r_e, g=g)
            a2, b2 = _bf16_randn(r_e, F, g=g), _bf16_randn(H, r_e, g=g)
            modules[(L, "fc1", E)] = (a1, torch.cat([gate, up]))
            modules[(L, "fc2", E)] = (a2, b2)
            pre = f"model.layers.{L}.mlp.experts.{E}"
            terms[f"{pre}.gate_proj.weight"] = [(s, gate.double() @ a1.double())]
            terms[f"{pre}.up_proj.weight"] = [(s, up.double() @ a1.double())]
            terms[f"{pre}.down_proj.weight"] = [(s, b2.double() @ a2.double())]
    assert set(terms) <= set(base)
    mca = mca_config(
        expert_model_parallel_size=2,
        expert_tensor_parallel_size=2,
        hidden_size=H,
        num_attention_heads=c["heads"],
        num_query_groups=c["groups"],
        kv_channels=d,
        num_layers=c["layers"],
        num_moe_experts=c["experts"],
        moe_router_topk=c["topk"],
        hf_model_type="qwen3_moe",
    )
    acfg = megatron_adapter_config(r, alpha, ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"])
    root = write_megatron(str(tmp_path / "checkpoint-1"), modules, mca, acfg)
    assert len(os.listdir(os.path.join(root, ADAPTER, ITER))) == 8
    assert os.path.isdir(os.path.join(root, ADAPTER, ITER, "mp_rank_01_001_001"))

    out = str(tmp_path / "out")
    rep = distmerge.merge(base_dir, [os.path.join(root, ADAPTER)], out)
    assert rep.unmatched == []
    assert rep.pairs_merged == len(terms) == c["layers"] * (4 + 3 * c["experts"])
    merged = load_checkpoint(out)
    ref = reference_merge(base, terms)
    assert_close_to_reference(merged, ref)
    _changed(merged, base, set(terms))
    # the delta is alpha / r, not alpha / (r // topk) (PEFT's reading of ROLL's converted rank_pattern)
    k = "model.layers.2.mlp.experts.3.down_proj.weight"
    got = (merged[k].double() - base[k].double()).norm() / terms[k][0][1].norm()
    assert abs(got.item() - s) < 0.05 * s, got

    # the merged folder is a loadable model computing what the float64 reference weights compute
    ref_dir = str(tmp_path / "ref")
    shutil.copytree(base_dir, ref_dir)
    save_file(ref, os.path.join(ref_dir, "model.safetensors"), metadata={"format": "pt"})
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    logits = _logits(out, ids)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits, _logits(ref_dir, ids), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(logits, _logits(base_dir, ids), atol=1e-3)

    # the same checkpoint into a base that stores each layer's experts fused, (E, 2F, H) and (E, H, F):
    # one `experts` delta per fused tensor, assembled from all EP and TP ranks
    fused_dir, fused, fused_ref = str(tmp_path / "fused"), {}, {}
    os.makedirs(fused_dir)
    for key, w in base.items():
        if ".mlp.experts." not in key:
            fused[key], fused_ref[key] = w, ref[key]
    for L in range(c["layers"]):
        pre = f"model.layers.{L}.mlp.experts"
        for sd, src in ((fused, base), (fused_ref, ref)):
            sd[f"{pre}.gate_up_proj"] = torch.stack(
                [
                    torch.cat([src[f"{pre}.{E}.gate_proj.weight"], src[f"{pre}.{E}.up_proj.weight"]])
                    for E in range(c["experts"])
                ]
            )
            sd[f"{pre}.down_proj"] = torch.stack([src[f"{pre}.{E}.down_proj.weight"] for E in range(c["experts"])])
    save_file(fused, os.path.join(fused_dir, "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(os.path.join(base_dir, "config.json"), fused_dir)
    fused_out = str(tmp_path / "fused-out")
    rep = distmerge.merge(fused_dir, [os.path.join(root, ADAPTER)], fused_out)
    assert rep.unmatched == [] and rep.pairs_merged == c["layers"] * (4 + 2)
    merged_fused = load_checkpoint(fused_out)
    assert_close_to_reference(merged_fused, fused_ref)
    _changed(merged_fused, fused, {k for k in fused if k.endswith("_proj") or k in terms})


# --------------------------------------------------------------------------- 4. bad checkpoints, CLI


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run(
        [sys.executable, "-m", "distmerge", *args], capture_output=True, text=True, env=env, timeout=300
    )


def _rank_file(ck: str, rank: str) -> str:
    return os.path.join(ck, ADAPTER, ITER, rank, RANK_FILE)


def _edit_rank_file(path: str, edit) -> None:
    obj = torch.load(path, weights_only=True)
    edit(obj["model"])
    torch.save(obj, path)


def _set_family(folder: str, family: str, key: str) -> None:
    path = os.path.join(folder, "mca_config.json" if key == "hf_model_type" else "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg[key] = family
    with open(path, "w") as f:
        json.dump(cfg, f)


def _missing_rank(ck: str, base: str) -> list[str]:
    os.remove(_rank_file(ck, "mp_rank_01"))
    return [_rank_file(ck, "mp_rank_01"), "missing"]


def _replicas_differ(ck: str, base: str) -> list[str]:
    key = "decoder.layers.0.self_attention.linear_qkv.lora_A.weight"

    def perturb(sd):
        sd[key] = sd[key] + torch.ones_like(sd[key]) * 0.01

    _edit_rank_file(_rank_file(ck, "mp_rank_01"), perturb)
    return [_rank_file(ck, "mp_rank_01"), key, "differs"]


def _two_adapters(ck: str, base: str) -> list[str]:
    shutil.copytree(os.path.join(ck, ADAPTER), os.path.join(ck, "other"))
    return ["default", "other", "2 LoRA adapters"]


def _router_lora(ck: str, base: str) -> list[str]:
    key = "decoder.layers.0.mlp.router.lora_A.weight"
    for rank in ("mp_rank_00", "mp_rank_01"):
        _edit_rank_file(_rank_file(ck, rank), lambda sd: sd.update({key: torch.zeros(4, 64, dtype=torch.bfloat16)}))
    return [key, "router"]


def _unmapped_family(ck: str, base: str) -> list[str]:
    for folder in (ck, os.path.join(ck, ADAPTER)):
        _set_family(folder, "gpt_oss", "hf_model_type")
    return ["gpt_oss", "qwen3"]  # the base is still a qwen3: the mismatch is named first


def _unmapped_family_base_too(ck: str, base: str) -> list[str]:
    _unmapped_family(ck, base)
    _set_family(base, "gpt_oss", "model_type")
    return ["gpt_oss", "not mapped"]


@pytest.mark.ray
@pytest.mark.parametrize(
    "damage",
    [_missing_rank, _replicas_differ, _two_adapters, _router_lora, _unmapped_family, _unmapped_family_base_too],
    ids=lambda f: f.__name__.lstrip("_"),
)
def test_bad_checkpoint_fails_in_one_line(damage, tmp_path):
    ck = str(tmp_path / "roll_ckpt")
    shutil.copytree(os.path.join(EXAMPLE, "roll_ckpt"), ck)
    base = str(tmp_path / "base")
    shutil.copytree(os.path.join(EXAMPLE, "base"), base)
    needles = damage(ck, base)
    inputs = snapshot(ck) | snapshot(base)
    work = tmp_path / "work"
    work.mkdir()
    out = str(work / "merged")
    r = _cli("merge", "--base", base, "--lora", ck, "--output", out, "--num-cpus", "2")
    assert r.returncode != 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    last = [ln for ln in r.stderr.splitlines() if ln.strip()][-1]
    assert last.startswith("distmerge: error:"), r.stderr
    for needle in needles:
        assert needle in last, (needle, last)
    assert not os.path.exists(out)
    assert os.listdir(work) == [], os.listdir(work)  # no part files left beside the output either
    assert snapshot(ck) | snapshot(base) == inputs


# --------------------------------------------------------------------------- 5. inspect


def test_inspect_names_megatron_layout():
    ck = os.path.join(EXAMPLE, "roll_ckpt")
    r = _cli("inspect", "--lora", ck)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "megatron" in r.stdout.lower(), r.stdout
    assert os.path.join(ck, ADAPTER) in r.stdout, r.stdout
