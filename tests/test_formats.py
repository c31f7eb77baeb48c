"""End to end, one test per LoRA layout family of the spec (shared/reference/lora-formats.md §0, §5–§11).

Every LoRA file is written by hand, key by key, merged through Ray into the tiny sharded fp32 Wan
base, and ALL output tensors are compared with a float64 reference computed here from the spec's
formulas (no distmerge.mergemath in the reference), rounded once to the output dtype.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import distmerge
from distmerge.app.synth import BLOCK_LINEARS
from distmerge.errors import FormatError, MatchError

from .helpers import TINY, assert_close_to_reference, load_checkpoint, reference_merge

pytestmark = pytest.mark.ray

D = TINY.dim  # 64


# --------------------------------------------------------------------------------------------- helpers


class _Rng:
    def __init__(self, seed: int) -> None:
        self.g = torch.Generator().manual_seed(seed)

    def __call__(self, *shape: int, std: float = 0.05, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (torch.randn(shape, generator=self.g, dtype=torch.float64) * std).to(dtype).contiguous()


@pytest.fixture(scope="module")
def base_sd(tiny_base) -> dict[str, torch.Tensor]:
    return load_checkpoint(tiny_base)


def _save(path, sd: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    path = str(path)
    if path.endswith((".pth", ".pt")):
        torch.save(sd, path)
    else:
        save_file({k: v.contiguous() for k, v in sd.items()}, path, metadata=metadata)
    return path


def _merge(tiny_base, loras, out, **kw):
    rep = distmerge.merge(tiny_base, loras, str(out), **kw)
    return rep, load_checkpoint(str(out))


def _lora_dw(down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Plain LoRA ΔW = B @ A in float64 (2-D factors)."""
    assert down.dim() == 2 and up.dim() == 2
    return up.double() @ down.double()


def _add(terms: dict, key: str, coef: float, dw: torch.Tensor) -> None:
    terms.setdefault(key, []).append((coef, dw.double()))


def _shape(base_sd, module: str) -> tuple[int, ...]:
    return tuple(base_sd[module + ".weight"].shape)


LINEARS = [f"blocks.{n}.{m}" for n in range(TINY.blocks) for m in BLOCK_LINEARS]


# --------------------------------------------------------------------------------------------- 1. ROLL / DiffSynth


@pytest.mark.parametrize("layout", ["roll", "diffsynth"])
def test_roll_and_diffsynth_keys_scale_one(ray_local, tiny_base, base_sd, tmp_path, layout):
    rng = _Rng(11)
    pre = "base_model.model." if layout == "roll" else ""
    sd, terms = {}, {}
    for m in LINEARS[:6] + ["blocks.1.ffn.0", "blocks.1.ffn.2"]:
        out_f, in_f = _shape(base_sd, m)
        a, b = rng(4, in_f, dtype=torch.bfloat16), rng(out_f, 4, dtype=torch.bfloat16)
        sd[f"{pre}{m}.lora_A.default.weight"] = a
        sd[f"{pre}{m}.lora_B.default.weight"] = b
        _add(terms, m + ".weight", 1.0, _lora_dw(a, b))  # no α stored: c = 1
    path = _save(tmp_path / f"{layout}.safetensors", sd)
    rep, out = _merge(tiny_base, [path], tmp_path / "out")
    assert rep.loras[0]["layout"] == layout
    assert rep.pairs_merged == len(terms) == 8 and rep.unmatched == []
    assert rep.loras[0]["scales"] == [1.0]
    assert_close_to_reference(out, reference_merge(base_sd, terms))


# --------------------------------------------------------------------------------------------- 2. Seko


def test_wan22_lightning_seko_alpha_over_rank(ray_local, tiny_base, base_sd, tmp_path):
    rng = _Rng(22)
    r, alpha = 64, 8.0  # the published Seko files: rank 64, α 8 ⇒ c = 0.125
    sd, terms = {}, {}
    for m in LINEARS:
        out_f, in_f = _shape(base_sd, m)
        down, up = rng(r, in_f), rng(out_f, r)
        sd[f"diffusion_model.{m}.lora_down.weight"] = down
        sd[f"diffusion_model.{m}.lora_up.weight"] = up
        sd[f"diffusion_model.{m}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
        _add(terms, m + ".weight", alpha / down.shape[0], _lora_dw(down, up))
    path = _save(tmp_path / "high_noise_model.safetensors", sd)
    rep, out = _merge(tiny_base, [path], tmp_path / "out")
    assert rep.loras[0]["layout"] == "diffusion_model"
    assert rep.pairs_merged == 20 and rep.loras[0]["scales"] == [0.125] and rep.loras[0]["ranks"] == [64]
    assert_close_to_reference(out, reference_merge(base_sd, terms))


# --------------------------------------------------------------------------------------------- 3. lightx2v


def test_lightx2v_extracted_lora_and_full_diffs(ray_local, tiny_base, base_sd, tmp_path):
    rng = _Rng(33)
    bf = torch.bfloat16  # the extractor's default output dtype
    sd, terms = {}, {}
    for m in ("blocks.0.self_attn.q", "blocks.1.ffn.0", "blocks.1.cross_attn.v"):
        out_f, in_f = _shape(base_sd, m)
        down, up = rng(8, in_f, dtype=bf), rng(out_f, 8, dtype=bf)
        sd[f"diffusion_model.{m}.lora_down.weight"] = down  # no alpha: c = 1
        sd[f"diffusion_model.{m}.lora_up.weight"] = up
        _add(terms, m + ".weight", 1.0, _lora_dw(down, up))
    # full differences: never α-scaled; .diff -> .weight, .diff_b -> .bias, .diff_m -> .modulation
    diffs = {
        "head.head.diff": "head.head.weight",
        "head.head.diff_b": "head.head.bias",
        "blocks.0.self_attn.q.diff_b": "blocks.0.self_attn.q.bias",
        "blocks.1.ffn.2.diff_b": "blocks.1.ffn.2.bias",
        "blocks.0.diff_m": "blocks.0.modulation",
        "blocks.1.diff_m": "blocks.1.modulation",
        "head.diff_m": "head.modulation",
        "blocks.0.norm3.diff": "blocks.0.norm3.weight",
        "blocks.0.norm3.diff_b": "blocks.0.norm3.bias",
        "blocks.1.self_attn.norm_q.diff": "blocks.1.self_attn.norm_q.weight",
        "patch_embedding.diff": "patch_embedding.weight",
    }
    for key, target in diffs.items():
        t = rng(*base_sd[target].shape, std=0.01, dtype=bf)
        sd["diffusion_model." + key] = t
        _add(terms, target, 1.0, t)
    path = _save(tmp_path / "wan22_lightx2v_4step.safetensors", sd)
    rep, out = _merge(tiny_base, [path], tmp_path / "out")
    assert rep.loras[0]["layout"] == "diffusion_model"
    assert rep.pairs_merged == 3 + len(diffs) and rep.unmatched == []
    assert rep.tensors_merged == len(terms)
    assert_close_to_reference(out, reference_merge(base_sd, terms))
    # a diff really moved the modulation (guards against a silently dropped .diff_m)
    assert not torch.equal(out["blocks.0.modulation"], base_sd["blocks.0.modulation"])


# --------------------------------------------------------------------------------------------- 4. kohya / Fun / LoCon


def test_kohya_underscore_fun_and_conv3d_locon(ray_local, tiny_base, base_sd, tmp_path):
    rng = _Rng(44)
    sd, terms = {}, {}
    # (file module name, base module, alpha or None)
    linear = [
        ("lora_unet_blocks_0_self_attn_q", "blocks.0.self_attn.q", 2.0),
        ("lora_unet_blocks_1_ffn_0", "blocks.1.ffn.0", 1.0),
        ("lora_unet_blocks_0_cross_attn_o", "blocks.0.cross_attn.o", None),  # α missing ⇒ α = dim
        ("lora_unet_time_embedding_0", "time_embedding.0", 6.0),
        ("lora_unet__blocks_1_cross_attn_k", "blocks.1.cross_attn.k", 8.0),
    ]  # Wan "Fun" double _
    for name, m, alpha in linear:
        out_f, in_f = _shape(base_sd, m)
        down, up = rng(4, in_f), rng(out_f, 4)
        sd[f"{name}.lora_down.weight"] = down
        sd[f"{name}.lora_up.weight"] = up
        if alpha is not None:
            sd[f"{name}.alpha"] = torch.tensor(alpha)
        _add(terms, m + ".weight", (alpha if alpha is not None else 4) / 4, _lora_dw(down, up))
    # LoCon on the Conv3d patch embedding: W [dim, 16, 1, 2, 2]
    r, alpha = 3, 1.5
    down = rng(r, TINY.in_dim, 1, 2, 2)
    up = rng(D, r, 1, 1, 1)
    sd["lora_unet_patch_embedding.lora_down.weight"] = down
    sd["lora_unet_patch_embedding.lora_up.weight"] = up
    sd["lora_unet_patch_embedding.alpha"] = torch.tensor(alpha)
    # kohya/musubi merge_to: conv3d(down.permute(1,0,…), up).permute(1,0,…), in float64
    dw = F.conv3d(down.double().permute(1, 0, 2, 3, 4), up.double()).permute(1, 0, 2, 3, 4)
    assert dw.shape == base_sd["patch_embedding.weight"].shape
    _add(terms, "patch_embedding.weight", alpha / r, dw)
    path = _save(tmp_path / "musubi_wan.safetensors", sd)
    rep, out = _merge(tiny_base, [path], tmp_path / "out")
    assert rep.loras[0]["layout"] == "kohya"
    assert rep.pairs_merged == 6 and rep.unmatched == []
    assert sorted(rep.loras[0]["ranks"]) == [3, 4]
    assert_close_to_reference(out, reference_merge(base_sd, terms))


# --------------------------------------------------------------------------------------------- 5. diffusers

DIFFUSERS = [
    ("blocks.0.attn1.to_q", "blocks.0.self_attn.q"),
    ("blocks.0.attn1.to_out.0", "blocks.0.self_attn.o"),
    ("blocks.0.attn2.to_k", "blocks.0.cross_attn.k"),
    ("blocks.1.ffn.net.0.proj", "blocks.1.ffn.0"),
    ("blocks.1.ffn.net.2", "blocks.1.ffn.2"),
    ("proj_out", "head.head"),
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
]


@pytest.mark.parametrize("with_metadata", [True, False], ids=["metadata-a-over-r", "no-metadata-c1"])
def test_diffusers_names_and_metadata_scale(ray_local, tiny_base, base_sd, tmp_path, with_metadata):
    rng = _Rng(55)
    r, a = 4, 12
    c = a / r if with_metadata else 1.0
    sd, terms = {}, {}
    for dname, m in DIFFUSERS:
        out_f, in_f = _shape(base_sd, m)
        down, up = rng(r, in_f), rng(out_f, r)
        sd[f"transformer.{dname}.lora_A.weight"] = down
        sd[f"transformer.{dname}.lora_B.weight"] = up
        _add(terms, m + ".weight", c, _lora_dw(down, up))
    # full-weight diff on diffusers norm2 == Wan's affine norm3 (swapped names); never α-scaled
    nd = rng(D, std=0.01)
    sd["transformer.blocks.0.norm2.diff"] = nd
    _add(terms, "blocks.0.norm3.weight", 1.0, nd)
    meta = {"lora_adapter_metadata": json.dumps({"transformer.r": r, "transformer.lora_alpha": a})}
    path = _save(tmp_path / "pytorch_lora_weights.safetensors", sd, meta if with_metadata else None)
    rep, out = _merge(tiny_base, [path], tmp_path / "out")
    assert rep.loras[0]["layout"] == "diffusers"
    assert rep.pairs_merged == len(DIFFUSERS) + 1 and rep.unmatched == []
    assert c in rep.loras[0]["scales"]
    assert_close_to_reference(out, reference_merge(base_sd, terms))
    # the swap: Wan has no norm2 parameters, norm3 moved
    assert not torch.equal(out["blocks.0.norm3.weight"], base_sd["blocks.0.norm3.weight"])


# --------------------------------------------------------------------------------------------- 6. LoHa / LoKr


def test_loha_diffusion_model_prefix(ray_local, tiny_base, base_sd, tmp_path):
    rng = _Rng(66)
    sd, terms = {}, {}
    for m, r, alpha in (("blocks.0.self_attn.q", 4, 2.0), ("blocks.1.ffn.2", 6, 3.0)):
        out_f, in_f = _shape(base_sd, m)
        w1a, w1b = rng(out_f, r, std=0.2), rng(r, in_f, std=0.2)
        w2a, w2b = rng(out_f, r, std=0.2), rng(r, in_f, std=0.2)
        p = f"diffusion_model.{m}"
        sd.update(
            {
                f"{p}.hada_w1_a": w1a,
                f"{p}.hada_w1_b": w1b,
                f"{p}.hada_w2_a": w2a,
                f"{p}.hada_w2_b": w2b,
                f"{p}.alpha": torch.tensor(alpha),
            }
        )
        dw = (w1a.double() @ w1b.double()) * (w2a.double() @ w2b.double())
        _add(terms, m + ".weight", alpha / w1b.shape[0], dw)
    path = _save(tmp_path / "loha.safetensors", sd)
    rep, out = _merge(tiny_base, [path], tmp_path / "out")
    assert rep.loras[0]["layout"] == "diffusion_model"
    assert rep.pairs_merged == 2 and rep.unmatched == []
    assert rep.loras[0]["scales"] == [0.5]
    assert_close_to_reference(out, reference_merge(base_sd, terms))


def test_lokr_lycoris_prefix_decomposed_and_full(ray_local, tiny_base, base_sd, tmp_path):
    rng = _Rng(67)
    sd, terms = {}, {}
    # blocks.0.ffn.0 [96, 64] = kron([4, 4], [24, 16]); w2 decomposed with dim 2 ⇒ scale α/2
    w1 = rng(4, 4, std=0.3)
    w2a, w2b = rng(24, 2, std=0.3), rng(2, 16, std=0.3)
    sd.update(
        {
            "lycoris_blocks_0_ffn_0.lokr_w1": w1,
            "lycoris_blocks_0_ffn_0.lokr_w2_a": w2a,
            "lycoris_blocks_0_ffn_0.lokr_w2_b": w2b,
            "lycoris_blocks_0_ffn_0.alpha": torch.tensor(1.0),
        }
    )
    _add(terms, "blocks.0.ffn.0.weight", 1.0 / w2b.shape[0], torch.kron(w1.double(), w2a.double() @ w2b.double()))
    # blocks.1.self_attn.v [64, 64] = kron([8, 4], [8, 16]) with both factors full ⇒ scale 1 (α ignored)
    f1, f2 = rng(8, 4, std=0.3), rng(8, 16, std=0.3)
    sd.update(
        {
            "lycoris_blocks_1_self_attn_v.lokr_w1": f1,
            "lycoris_blocks_1_self_attn_v.lokr_w2": f2,
            "lycoris_blocks_1_self_attn_v.alpha": torch.tensor(5.0),
        }
    )
    _add(terms, "blocks.1.self_attn.v.weight", 1.0, torch.kron(f1.double(), f2.double()))
    path = _save(tmp_path / "lokr.safetensors", sd)
    rep, out = _merge(tiny_base, [path], tmp_path / "out")
    assert rep.loras[0]["layout"] == "kohya"
    assert rep.pairs_merged == 2 and rep.unmatched == []
    assert rep.loras[0]["scales"] == [0.5, 1.0]
    assert_close_to_reference(out, reference_merge(base_sd, terms))


# --------------------------------------------------------------------------------------------- 7. two weighted LoRAs


def test_two_weighted_loras_into_bf16_one_rounding(ray_local, tiny_base, base_sd, tmp_path):
    rng = _Rng(77)
    sd1, sd2, terms = {}, {}, {}
    for m in LINEARS[:10]:  # block 0: both files
        out_f, in_f = _shape(base_sd, m)
        down, up = rng(4, in_f), rng(out_f, 4)
        sd1[f"diffusion_model.{m}.lora_down.weight"] = down
        sd1[f"diffusion_model.{m}.lora_up.weight"] = up
        sd1[f"diffusion_model.{m}.alpha"] = torch.tensor(2.0)
        _add(terms, m + ".weight", 0.7 * 2.0 / 4, _lora_dw(down, up))
    for m in LINEARS[5:]:  # overlap on block 0 cross_attn/ffn
        out_f, in_f = _shape(base_sd, m)
        a, b = rng(2, in_f, dtype=torch.bfloat16), rng(out_f, 2, dtype=torch.bfloat16)
        sd2[f"{m}.lora_A.default.weight"] = a
        sd2[f"{m}.lora_B.default.weight"] = b
        _add(terms, m + ".weight", -0.3, _lora_dw(a, b))
    p1 = _save(tmp_path / "seko.safetensors", sd1)
    p2 = _save(tmp_path / "epoch-3.safetensors", sd2)
    rep, out = _merge(tiny_base, [(p1, 0.7), (p2, -0.3)], tmp_path / "out", dtype="bf16")
    assert [x["layout"] for x in rep.loras] == ["diffusion_model", "diffsynth"]
    assert [x["weight"] for x in rep.loras] == [0.7, -0.3]
    assert rep.pairs_merged == 25 and rep.tensors_merged == 20
    assert all(t.dtype == torch.bfloat16 for t in out.values())
    assert_close_to_reference(out, reference_merge(base_sd, terms, out_dtype=torch.bfloat16))


# --------------------------------------------------------------------------------------------- 8. Wan2.1-I2V keys


def test_wan21_i2v_keys_unmatched_on_wan22(ray_local, tiny_base, base_sd, tmp_path):
    rng = _Rng(88)
    sd, terms = {}, {}
    m = "blocks.0.self_attn.q"
    down, up = rng(4, D), rng(D, 4)
    sd[f"diffusion_model.{m}.lora_down.weight"] = down
    sd[f"diffusion_model.{m}.lora_up.weight"] = up
    _add(terms, m + ".weight", 1.0, _lora_dw(down, up))
    i2v = {
        "diffusion_model.blocks.1.cross_attn.k_img.lora_down.weight": rng(4, D),
        "diffusion_model.blocks.1.cross_attn.k_img.lora_up.weight": rng(D, 4),
        "diffusion_model.blocks.1.cross_attn.v_img.lora_down.weight": rng(4, D),
        "diffusion_model.blocks.1.cross_attn.v_img.lora_up.weight": rng(D, 4),
        "diffusion_model.blocks.1.cross_attn.v_img.diff_b": rng(D),
        "diffusion_model.blocks.1.cross_attn.norm_k_img.diff": rng(D),
        "diffusion_model.img_emb.proj.1.lora_down.weight": rng(4, 32),
        "diffusion_model.img_emb.proj.1.lora_up.weight": rng(32, 4),
    }
    sd.update(i2v)
    path = _save(tmp_path / "wan21_i2v.safetensors", sd)
    msg = rf"{len(i2v)} LoRA tensor\(s\) cannot be placed.*k_img.*--skip-unmatched"
    with pytest.raises(MatchError, match=msg):
        distmerge.merge(tiny_base, [path], str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")
    rep, out = _merge(tiny_base, [path], tmp_path / "out", skip_unmatched=True)
    assert rep.loras[0]["layout"] == "diffusion_model"
    assert rep.pairs_merged == 1
    assert sorted(u["key"] for u in rep.unmatched) == sorted(i2v)
    assert all(u["file"] == path for u in rep.unmatched)
    assert_close_to_reference(out, reference_merge(base_sd, terms))


# --------------------------------------------------------------------------------------------- 9. unsupported


@pytest.mark.parametrize(
    "family,keys",
    [
        ("OFT", {"oft_blocks": (4, 16, 16), "alpha": ()}),
        ("GLoRA", {"a1.weight": (4, D), "a2.weight": (D, 4), "b1.weight": (4, D), "b2.weight": (D, 4), "alpha": ()}),
    ],
    ids=["oft", "glora"],
)
def test_unsupported_families_are_format_errors(ray_local, tiny_base, tmp_path, family, keys):
    rng = _Rng(99)
    sd = {f"diffusion_model.blocks.0.self_attn.q.{k}": (rng(*s) if s else torch.tensor(1.0)) for k, s in keys.items()}
    # a valid LoRA on another module must not make the file acceptable
    sd["diffusion_model.blocks.0.self_attn.k.lora_down.weight"] = rng(4, D)
    sd["diffusion_model.blocks.0.self_attn.k.lora_up.weight"] = rng(D, 4)
    path = _save(tmp_path / f"{family}.safetensors", sd)
    with pytest.raises(FormatError, match=rf"{family}"):
        distmerge.merge(tiny_base, [path], str(tmp_path / "out"))
    with pytest.raises(FormatError, match=rf"{family}"):  # not a skippable mismatch either
        distmerge.merge(tiny_base, [path], str(tmp_path / "out"), skip_unmatched=True)
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("qdtype", [torch.int8], ids=["int8"])  # fp8 bases merge: test_fp8.py
def test_quantized_base_target_is_match_error(ray_local, tmp_path, qdtype):
    rng = _Rng(98)
    base = tmp_path / "qbase"
    base.mkdir()
    w = rng(D, D, std=20.0).clamp(-127, 127).to(torch.int8) if qdtype == torch.int8 else rng(D, D).to(qdtype)
    save_file({"blocks.0.self_attn.q.weight": w, "blocks.0.self_attn.q.bias": rng(D)}, str(base / "model.safetensors"))
    path = _save(
        tmp_path / "l.safetensors",
        {
            "diffusion_model.blocks.0.self_attn.q.lora_down.weight": rng(4, D),
            "diffusion_model.blocks.0.self_attn.q.lora_up.weight": rng(D, 4),
        },
    )
    with pytest.raises(MatchError, match=r"blocks\.0\.self_attn\.q\.weight.*quantized"):
        distmerge.merge(str(base), [path], str(tmp_path / "out"))
    with pytest.raises(MatchError, match="quantized"):
        distmerge.merge(str(base), [path], str(tmp_path / "out"), skip_unmatched=True)
    assert not os.path.exists(tmp_path / "out")


# --------------------------------------------------------------------------------------------- 10. replacement


def test_set_weight_and_full_base_key_replace_exactly(ray_local, tiny_base, base_sd, tmp_path):
    rng = _Rng(100)
    new_q = rng(D, D, std=0.1)
    new_norm = 1.0 + rng(D, std=0.1)
    down, up = rng(4, D), rng(D, 4)
    sd = {
        "diffusion_model.blocks.0.self_attn.q.set_weight": new_q,
        "diffusion_model.blocks.0.norm3.weight": new_norm,  # equals a base key, same shape ⇒ replacement
        "diffusion_model.blocks.1.self_attn.k.lora_down.weight": down,
        "diffusion_model.blocks.1.self_attn.k.lora_up.weight": up,
    }
    path = _save(tmp_path / "replace.safetensors", sd)
    rep, out = _merge(tiny_base, [(path, 0.5)], tmp_path / "out")  # strength is ignored by replacements
    assert rep.loras[0]["layout"] == "diffusion_model"
    assert rep.pairs_merged == 3 and rep.unmatched == []
    assert torch.equal(out["blocks.0.self_attn.q.weight"], new_q)
    assert torch.equal(out["blocks.0.norm3.weight"], new_norm)
    ref = reference_merge(base_sd, {"blocks.1.self_attn.k.weight": [(0.5, _lora_dw(down, up))]})
    ref["blocks.0.self_attn.q.weight"] = new_q
    ref["blocks.0.norm3.weight"] = new_norm
    assert_close_to_reference(out, ref)


# --------------------------------------------------------------------------------------------- 11. LyCORIS DoRA


def test_lycoris_dora_scale_rows(ray_local, tiny_base, base_sd, tmp_path):
    rng = _Rng(111)
    sd, terms = {}, {}
    m, r, alpha = "blocks.0.cross_attn.o", 4, 2.0
    down, up = rng(r, D, std=0.2), rng(D, r, std=0.2)
    w = base_sd[m + ".weight"].double()
    dora_scale = (w.norm(dim=1, keepdim=True) * (1 + 0.2 * rng(D, 1, std=1.0).double())).float()
    assert dora_scale.shape == (D, 1)
    p = f"diffusion_model.{m}"
    sd.update(
        {
            f"{p}.lora_down.weight": down,
            f"{p}.lora_up.weight": up,
            f"{p}.alpha": torch.tensor(alpha),
            f"{p}.dora_scale": dora_scale,
        }
    )
    # a plain LoRA next to it is not rescaled
    d2, u2 = rng(r, D), rng(D, r)
    sd.update(
        {
            "diffusion_model.blocks.1.self_attn.q.lora_down.weight": d2,
            "diffusion_model.blocks.1.self_attn.q.lora_up.weight": u2,
        }
    )
    _add(terms, "blocks.1.self_attn.q.weight", 1.0, _lora_dw(d2, u2))
    wc = w + (alpha / r) * _lora_dw(down, up)
    w_new = wc * (dora_scale.double() / wc.norm(dim=1, keepdim=True))
    _add(terms, m + ".weight", 1.0, w_new - w)  # reference: W' = Wc · dora_scale / ‖Wc‖_row
    path = _save(tmp_path / "dora.safetensors", sd)
    rep, out = _merge(tiny_base, [path], tmp_path / "out")
    assert rep.loras[0]["layout"] == "diffusion_model"
    assert rep.pairs_merged == 2 and rep.unmatched == []
    assert_close_to_reference(out, reference_merge(base_sd, terms))
    # the merged rows carry the DoRA magnitudes
    torch.testing.assert_close(
        out[m + ".weight"].double().norm(dim=1), dora_scale.double().reshape(-1), rtol=1e-5, atol=1e-6
    )
