"""``--dtype fp8_*`` outputs as ComfyUI loads them: no missing key, exactly the file's values.

ComfyUI cannot be installed here, so each loading rule is emulated from its source and cited where
it is used (Comfy-Org/ComfyUI, formerly comfyanonymous/ComfyUI, in the versions that load these
files with ``scaled_fp8_ops``; newer ones first convert them with ``comfy/utils.py``
``convert_old_quants``, which labels each layer that has a ``scale_weight`` ``float8_e4m3fn`` and
drops a ``scale_input`` of 1.0, and load the rest in the compute dtype):

* ``comfy/model_detection.py`` ``model_config_from_unet``: a ``{unet_prefix}scaled_fp8`` key sets
  ``model_config.scaled_fp8`` to its dtype (float32 means e4m3fn) and
  ``optimizations["fp8"] = nelement() != 2``;
* ``comfy/model_base.py`` ``BaseModel.__init__`` -> ``comfy/ops.py`` ``pick_operations``:
  ``scaled_fp8_ops(scale_input=fp8_optimizations, override_dtype=scaled_fp8)``, the ops of
  **every** ``operations.Linear`` of the model;
* ``comfy/ops.py`` ``scaled_fp8_ops`` ``Linear``: the weight parameter has the marker's dtype (a
  bf16 weight is cast to it as it is copied in), ``reset_parameters`` adds ``scale_weight`` (and,
  with ``scale_input``, ``scale_input``) parameters of 1.0 that the file's keys replace, and the
  weight computed with is ``weight * scale_weight`` (``forward_comfy_cast_weights``);
* ``comfy/sd.py`` ``load_model_weights``: ``load_state_dict(strict=False)``; missing keys are
  logged ("missing {...}") and keep their defaults;
* ``comfy/ldm/wan/model.py``: which Wan modules are ``operations.Linear`` (``wan_linears``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

import distmerge
from distmerge.app.synth import make_factors, write_lora, write_wan_base
from distmerge.app.verify import verify
from distmerge.errors import PlanError
from distmerge.inputs.checkpoint import open_base
from distmerge.inputs.dtypes import itemsize
from distmerge.inputs.header import TensorInfo
from distmerge.plan.fp8 import input_scale_key, scaled_layout

from .helpers import TINY, load_checkpoint

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
FMAX = {E4M3: 448.0, E5M2: 57344.0}
CODE = {E4M3: "F8_E4M3", E5M2: "F8_E5M2"}
#: the image embedder's width in the tiny I2V base (1280, CLIP's, in Wan)
CLIP_DIM = 48
#: modules the LoRA touches: a block Linear, an embedder, the head (quantized after merging)
MERGED = ["blocks.0.self_attn.q", "blocks.1.ffn.2", "text_embedding.2", "head.head"]
#: ``text_embedding.0.weight[0, 13]``: 0.1328125 in bf16; cast to e4m3fn with scale 1.0 it is 0.125
PROBE, PROBE_VALUE = (0, 13), 0.1328125


def wan_linears(keys) -> list[str]:
    """The ``operations.Linear`` modules of ComfyUI's Wan model for a state dict with ``keys``
    (``comfy/ldm/wan/model.py``: ``WanModel.__init__`` ``text_embedding`` 0/2, ``time_embedding``
    0/2, ``time_projection`` 1; ``WanSelfAttention`` q/k/v/o; ``WanI2VCrossAttention``
    k_img/v_img; ``WanAttentionBlock.ffn`` 0/2; ``Head.head``; ``MLPProj.proj`` 1/3 of ``img_emb``).
    ``patch_embedding`` is a Conv3d, the norms RMSNorm/LayerNorm, ``modulation`` a Parameter."""
    keys = set(keys)
    i2v = "img_emb.proj.1.weight" in keys
    blocks = 1 + max(int(k.split(".")[1]) for k in keys if k.startswith("blocks."))
    per = [f"{a}.{p}" for a in ("self_attn", "cross_attn") for p in "qkvo"]
    per += ["cross_attn.k_img", "cross_attn.v_img"] if i2v else []
    out = ["text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2", "time_projection.1"]
    out += [f"blocks.{b}.{m}" for b in range(blocks) for m in [*per, "ffn.0", "ffn.2"]]
    return out + ["head.head"] + (["img_emb.proj.1", "img_emb.proj.3"] if i2v else [])


@dataclasses.dataclass
class ComfyLoad:
    values: dict[str, torch.Tensor]  #: Linear -> the float32 weight ComfyUI computes with
    missing: list[str]  #: the keys ``load_model_weights`` would report missing


def comfy_load(sd: dict[str, torch.Tensor], linears: list[str], prefix: str = "") -> ComfyLoad:
    """Legacy ComfyUI loading the Linears of a scaled-fp8 file (the rules of the module docstring):
    the marker's dtype is every Linear weight's, ``scale_input`` is expected unless the marker has
    2 elements, an absent scale stays 1.0, a weight in another dtype is cast to the marker's."""
    marker = sd[prefix + "scaled_fp8"]
    fp8 = E4M3 if marker.dtype == torch.float32 else marker.dtype
    params = ["weight", "scale_weight"] + (["scale_input"] if marker.numel() != 2 else [])
    out = ComfyLoad({}, [])
    for m in linears:
        out.missing += [f"{prefix}{m}.{p}" for p in params if f"{prefix}{m}.{p}" not in sd]
        scale = sd.get(f"{prefix}{m}.scale_weight", torch.ones(()))
        out.values[m] = sd[f"{prefix}{m}.weight"].to(fp8).float() * scale.float()
    return out


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _requant(w32: torch.Tensor, dt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: fresh per-tensor scale amax/fp8_max (float32), round to nearest even, once."""
    s = w32.abs().amax() / FMAX[dt]
    return (w32 / s).clamp(-FMAX[dt], FMAX[dt]).to(dt), s


def _i2v_base(folder) -> str:
    """A single-file bf16 Wan I2V-shaped base (real Wan key names): TINY's T2V keys plus the image
    embedder ``img_emb.proj.{0,1,3,4}`` and ``cross_attn.{k_img,v_img,norm_k_img}``; the probe
    value planted in ``text_embedding.0`` (its amax 0.5: a fresh scale of 0.5/448)."""
    write_wan_base(str(folder / "t2v"), dataclasses.replace(TINY, dtype="BF16"), num_shards=1)
    sd = load_checkpoint(str(folder / "t2v"))
    g, d = torch.Generator().manual_seed(7), TINY.dim

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)

    sd |= {"img_emb.proj.0.weight": rand(CLIP_DIM), "img_emb.proj.0.bias": rand(CLIP_DIM)}
    sd |= {"img_emb.proj.1.weight": rand(CLIP_DIM, CLIP_DIM), "img_emb.proj.1.bias": rand(CLIP_DIM)}
    sd |= {"img_emb.proj.3.weight": rand(d, CLIP_DIM), "img_emb.proj.3.bias": rand(d)}
    sd |= {"img_emb.proj.4.weight": rand(d), "img_emb.proj.4.bias": rand(d)}
    for b in range(TINY.blocks):
        p = f"blocks.{b}.cross_attn."
        sd |= {p + "k_img.weight": rand(d, d), p + "k_img.bias": rand(d), p + "norm_k_img.weight": rand(d)}
        sd |= {p + "v_img.weight": rand(d, d), p + "v_img.bias": rand(d)}
    sd["text_embedding.0.weight"][0, 0] = 0.5
    sd["text_embedding.0.weight"][PROBE] = PROBE_VALUE
    os.makedirs(folder / "base")
    path = str(folder / "base" / "wan2.1_i2v_bf16.safetensors")
    save_file(sd, path)
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The I2V base (path, tensors) and a ComfyUI-style LoRA on ``MERGED`` (path, factors)."""
    root = tmp_path_factory.mktemp("comfy")
    base = _i2v_base(root)
    factors = make_factors(TINY, rank=4, dtype=torch.bfloat16, modules=MERGED)
    lora = str(root / "lora.safetensors")
    write_lora(lora, factors, layout="diffusion_model")
    return base, load_checkpoint(base), lora, factors


def _reference(base: dict, factors: dict, m: str) -> torch.Tensor:
    """The merged float32 value of Linear ``m`` (float64 sum, rounded to float32 once)."""
    w = base[m + ".weight"].double()
    if m in factors:
        a, b = factors[m]
        w = w + b.double() @ a.double()
    return w.float()


@pytest.fixture(scope="module", params=[E4M3, E5M2], ids=["e4m3fn", "e5m2"])
def merged(request, ray_local, inputs, tmp_path_factory):
    """The base merged with the LoRA through ``distmerge.merge`` and ``--dtype fp8_*``."""
    base, _, lora, _ = inputs
    dt = request.param
    out = str(tmp_path_factory.mktemp("out") / "wan_i2v_fp8_scaled.safetensors")
    distmerge.merge(base, [lora], out, dtype={E4M3: "fp8_e4m3fn", E5M2: "fp8_e5m2"}[dt], unit_size="4KB")
    return dt, out, load_checkpoint(out)


@pytest.mark.ray
def test_every_linear_is_scaled_fp8_with_an_input_scale(inputs, merged):
    _, base, _, _ = inputs
    dt, _, out = merged
    linears = wan_linears(base)
    assert len(linears) == 5 + TINY.blocks * 12 + 3 and "img_emb.proj.3" in linears
    new = {m + s for m in linears for s in (".scale_weight", ".scale_input")} | {"scaled_fp8"}
    assert set(out) == set(base) | new  # nothing else added, nothing dropped
    assert out["scaled_fp8"].dtype == dt and out["scaled_fp8"].shape == (0,)  # the output's fp8 type
    for m in linears:
        s, i = out[m + ".scale_weight"], out[m + ".scale_input"]
        assert out[m + ".weight"].dtype == dt, m
        assert (s.dtype, s.shape, i.dtype, i.shape) == (torch.float32, (), torch.float32, ()), m
        assert i.item() == 1.0, m
    others = set(base) - {m + ".weight" for m in linears}
    assert {"patch_embedding.weight", "img_emb.proj.0.weight", "img_emb.proj.4.bias", "head.modulation"} <= others
    for k in others:  # conv, norms, biases, modulation: dtype and bytes as in the base
        assert out[k].dtype == torch.bfloat16 and _raw(out[k]) == _raw(base[k]), k


@pytest.mark.ray
def test_comfyui_loads_it_with_no_missing_key_and_the_values_rounded_once(inputs, merged):
    """Emulated ComfyUI load: every Linear's weight, ``scale_weight`` and ``scale_input`` present,
    and ``weight.float() * scale_weight`` is the merged float32 value rounded once to fp8 with a
    fresh scale (the probe included: not re-rounded under a scale of 1.0)."""
    _, base, _, factors = inputs
    dt, _, out = merged
    loaded = comfy_load(out, wan_linears(base))
    assert loaded.missing == []
    for m, got in loaded.values.items():
        q, s = _requant(_reference(base, factors, m), dt)
        assert _raw(out[m + ".weight"]) == _raw(q) and out[m + ".scale_weight"].item() == s.item(), m
        assert torch.equal(got, q.float() * s), m
    if dt == E4M3:  # 0.1328125 / (0.5/448) = 119, in steps of 8 there: 120 (e5m2 has 0.125 either way)
        probe = loaded.values["text_embedding.0"][PROBE].item()
        assert probe == pytest.approx(120 * 0.5 / 448, rel=1e-6) and probe != 0.125


@pytest.mark.ray
def test_the_emulation_catches_the_old_block_only_layout(inputs, merged):
    """The old output (embedders, projection and head left in bf16, no ``scale_input``), loaded by
    the same emulation: the missing keys ComfyUI reported, and the probe re-rounded to 0.125."""
    _, base, _, _ = inputs
    _, _, out = merged  # either fp8 type: 0.1328125 cast under a scale of 1.0 is 0.125 in both
    old = {k: v for k, v in out.items() if not k.endswith(".scale_input")}
    outside = [m for m in wan_linears(base) if not m.startswith("blocks.")]
    for m in outside:
        old[m + ".weight"] = base[m + ".weight"]
        del old[m + ".scale_weight"]
    loaded = comfy_load(old, wan_linears(base))
    assert len(loaded.missing) == len(wan_linears(base)) + len(outside)
    assert "text_embedding.0.scale_input" in loaded.missing and "head.head.scale_weight" in loaded.missing
    assert loaded.values["text_embedding.0"][PROBE].item() == 0.125


@pytest.mark.ray
def test_scales_are_laid_out_aligned_after_their_weight(merged):
    _, path, out = merged
    header = open_base(path).tensors
    for k in out:
        if k.endswith(".scale_weight"):
            w, s, i = (
                header[k.removesuffix(".scale_weight") + x] for x in (".weight", ".scale_weight", ".scale_input")
            )
            assert s.offset == w.offset + w.nbytes and i.offset == s.offset + 4 and s.offset % 4 == 0, k


@pytest.mark.ray
def test_verify_passes_and_catches_a_wrong_input_scale(inputs, merged, tmp_path):
    base, _, lora, _ = inputs
    dt, path, _ = merged
    flag = {E4M3: "fp8_e4m3fn", E5M2: "fp8_e5m2"}[dt]
    res = verify(base, [lora], path, dtype=flag, full=True)
    assert res.ok, res.verdict
    bad = str(tmp_path / "bad.safetensors")
    shutil.copyfile(path, bad)
    info = open_base(bad).tensors["time_projection.1.scale_input"]
    with open(bad, "r+b") as f:
        f.seek(info.offset)
        f.write(_raw(torch.tensor([2.0])))
    res = verify(base, [lora], bad, dtype=flag, full=True)
    assert not res.ok and "time_projection.1.scale_input: 2" in res.verdict and "expected 1" in res.verdict


def _llm_base(folder) -> str:
    """A tiny Llama-shaped bf16 text encoder (token embedding table, 2 layers, norms, ``lm_head``)."""
    g = torch.Generator().manual_seed(3)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(shape, generator=g) * 0.05).to(torch.bfloat16)

    sd = {"model.embed_tokens.weight": rand(64, 32), "model.norm.weight": rand(32), "lm_head.weight": rand(64, 32)}
    shapes = {"q_proj": (32, 32), "k_proj": (16, 32), "v_proj": (16, 32), "o_proj": (32, 32)}
    for n in range(2):
        sd |= {f"model.layers.{n}.self_attn.{m}.weight": rand(*s) for m, s in shapes.items()}
        sd |= {f"model.layers.{n}.mlp.{m}.weight": rand(48, 32) for m in ("gate_proj", "up_proj")}
        sd[f"model.layers.{n}.mlp.down_proj.weight"] = rand(32, 48)
        sd |= {f"model.layers.{n}.{m}.weight": rand(32) for m in ("input_layernorm", "post_attention_layernorm")}
    os.makedirs(folder)
    save_file(sd, str(folder / "model.safetensors"))
    lora = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": rand(4, 32).float()}
    lora["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] = rand(32, 4).float()
    save_file(lora, str(folder / "adapter_model.safetensors"))
    return str(folder / "model.safetensors")


@pytest.mark.ray
def test_llm_base_quantizes_linears_not_the_embedding_table_or_norms(ray_local, tmp_path):
    """A text encoder is built with ``scaled_fp8_ops`` too (``comfy/sd1_clip.py`` ``SDClipModel``),
    whose ``Embedding`` and norms are not scaled ops; its marker is bare (``comfy/text_encoders/
    hunyuan_video.py`` ``llama_detect`` reads ``{prefix}scaled_fp8`` with prefix "")."""
    base = _llm_base(tmp_path / "llm")
    src = load_checkpoint(base)
    out = str(tmp_path / "fp8.safetensors")
    distmerge.merge(base, [str(tmp_path / "llm" / "adapter_model.safetensors")], out, dtype="fp8_e4m3fn")
    sd = load_checkpoint(out)
    linears = [k.removesuffix(".weight") for k, v in src.items() if v.dim() == 2 and "embed_tokens" not in k]
    assert len(linears) == 15 and "lm_head" in linears
    assert sd["scaled_fp8"].dtype == E4M3 and "model.scaled_fp8" not in sd
    assert comfy_load(sd, linears).missing == []
    for m in linears:
        assert sd[m + ".weight"].dtype == E4M3 and sd[m + ".scale_input"].item() == 1.0, m
    for k in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.1.input_layernorm.weight"):
        assert sd[k].dtype == torch.bfloat16 and _raw(sd[k]) == _raw(src[k]), k
    assert verify(base, [str(tmp_path / "llm" / "adapter_model.safetensors")], out, dtype="fp8_e4m3fn").ok


def _info(key: str, shape: tuple[int, ...], code: str = "BF16") -> TensorInfo:
    return TensorInfo(key, code, shape, "base.safetensors", 0, math.prod(shape) * itemsize(code))


def test_diffusers_named_wan_linears_are_quantized():
    """The same model under diffusers' names (``convert_wan_transformer_to_diffusers``, I2V keys
    included): every 2-D weight is a Linear; norms, ``scale_shift_table`` and the conv are not."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    from distmerge.app.synth import wan_shapes

    d = TINY.dim
    wan = {k: torch.zeros(s) for k, s in wan_shapes(TINY)}
    wan |= {"img_emb.proj.0.weight": torch.zeros(d), "img_emb.proj.1.weight": torch.zeros(d, d)}
    wan |= {"img_emb.proj.3.weight": torch.zeros(d, d), "img_emb.proj.4.weight": torch.zeros(d)}
    names = convert_wan_transformer_to_diffusers(wan)
    tensors = {k: _info(k, tuple(v.shape)) for k, v in names.items()}
    lay = scaled_layout(tensors, "F8_E4M3", path="b")
    two_d = {k for k, v in names.items() if v.dim() == 2}
    assert set(lay.new_scales) == two_d
    for k in ("condition_embedder.text_embedder.linear_1.weight", "condition_embedder.time_proj.weight"):
        assert k in two_d
    assert {"proj_out.weight", "condition_embedder.image_embedder.ff.net.2.weight"} <= two_d
    assert lay.new_inputs["proj_out.weight"] == "proj_out.scale_input" and lay.new_marker == "scaled_fp8"


def test_input_scale_key_follows_the_scale_convention():
    """Legacy ``scale_weight``/``scale_input`` and the newer ``weight_scale``/``input_scale``
    (``comfy/utils.py`` ``convert_old_quants`` renames one to the other). New outputs always use
    the legacy pair, the one the ``scaled_fp8`` marker announces: a base that already has
    ``weight_scale`` keys is scaled fp8, and ``--dtype fp8_*`` on it adds nothing."""
    assert input_scale_key("a.scale_weight") == "a.scale_input"
    assert input_scale_key("a.weight_scale") == "a.input_scale"
    with pytest.raises(ValueError, match="'a.weight' is not a weight scale key"):
        input_scale_key("a.weight")
    base = {t.key: t for t in [_info("a.weight", (4, 4), "F8_E4M3"), _info("a.weight_scale", (), "F32")]}
    base["b.weight"] = _info("b.weight", (4, 4))
    lay = scaled_layout(base, "F8_E4M3")
    assert lay.scales == {"a.weight": "a.weight_scale"} and lay.new_scales == {} and lay.new_inputs == {}


def test_a_linear_that_cannot_be_laid_out_is_refused():
    """Left in bf16 it would be cast to fp8 under a scale of 1.0: refused before anything is written."""
    base = {
        "blocks.0.q.weight": _info("blocks.0.q.weight", (3, 5)),
        "blocks.0.k.weight": _info("blocks.0.k.weight", (4, 4)),
    }
    with pytest.raises(
        PlanError, match=r"base\.safetensors: cannot quantize Linear weight 'blocks\.0\.q\.weight' \[3, 5\]"
    ):
        scaled_layout(base, "F8_E4M3")
    assert scaled_layout(base, None).new_scales == {}  # keep: nothing to lay out


def _scaled_base(base: dict[str, torch.Tensor], path: str) -> dict[str, torch.Tensor]:
    """A ComfyUI-style scaled-fp8 file as older tools wrote it: the block Linears in e4m3fn with
    ``scale_weight`` and ``scale_input`` (0.75, not 1.0: copied, never rewritten), the rest bf16."""
    sd: dict[str, torch.Tensor] = {"scaled_fp8": torch.empty(0, dtype=E4M3)}
    for k, v in base.items():
        m = k.removesuffix(".weight")
        if k.startswith("blocks.") and k.endswith(".weight") and v.dim() == 2:
            sd[k], s = _requant(v.float(), E4M3)
            sd[m + ".scale_weight"], sd[m + ".scale_input"] = s.reshape(()), torch.tensor(0.75)
        else:
            sd[k] = v
    save_file(sd, path)
    return sd


@pytest.mark.ray
@pytest.mark.parametrize("dtype", ["keep", "fp8_e4m3fn"])
def test_an_existing_scaled_base_is_merged_as_before(inputs, ray_local, tmp_path, dtype):
    """Merging into a scaled-fp8 base adds no key and copies every untouched tensor, its scales and
    ``scale_input`` byte for byte, with ``--dtype fp8_e4m3fn`` as with ``keep``."""
    _, base, lora, _ = inputs
    sd = _scaled_base(base, str(tmp_path / "wan_fp8_scaled.safetensors"))
    out = str(tmp_path / "out.safetensors")
    distmerge.merge(str(tmp_path / "wan_fp8_scaled.safetensors"), [lora], out, dtype=dtype)
    got = load_checkpoint(out)
    assert set(got) == set(sd)
    merged = {"blocks.0.self_attn.q", "blocks.1.ffn.2"}  # in blocks; the bf16 embedder and head merge as bf16
    changed = {k for k in sd if _raw(got[k]) != _raw(sd[k])}
    assert changed == {m + s for m in merged for s in (".weight", ".scale_weight")} | {
        "text_embedding.2.weight",
        "head.head.weight",
    }
    assert all(got[k].dtype == v.dtype for k, v in sd.items())
    assert got["blocks.0.self_attn.q.scale_input"].item() == 0.75
