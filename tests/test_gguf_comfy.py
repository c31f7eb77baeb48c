"""What ComfyUI-GGUF's loader needs of a Wan GGUF, one rule per test, on files distmerge writes.

ComfyUI and ComfyUI-GGUF cannot be installed here, so each rule is read from their source and checked
on the file with gguf-py's own ``GGUFReader`` (the reader ComfyUI-GGUF's ``loader.py`` uses). Sources:

* city96/ComfyUI-GGUF: ``loader.py`` (``gguf_sd_loader``, ``get_field``, ``get_orig_shape``),
  ``ops.py`` (``GGMLLayer``, ``GGMLOps``), ``dequant.py`` (``TORCH_COMPATIBLE_QTYPES``,
  ``dequantize_functions``, ``dequantize_blocks_Q8_0``), ``nodes.py`` (``UnetLoaderGGUF.load_unet``),
  ``tools/convert.py`` (``ModelWan``, ``handle_tensors``, ``convert_file``), ``tools/fix_5d_tensors.py``
  (``apply_5d_fix``), ``tools/lcpp.patch`` (``llama_model_quantize_internal``, ``img_tensor_get_type``);
* Comfy-Org/ComfyUI: ``comfy/model_detection.py`` (``detect_unet_config``' Wan branch,
  ``unet_prefix_from_state_dict``), ``comfy/sd.py`` (``load_diffusion_model_state_dict``),
  ``comfy/ldm/wan/model.py`` (``WanSelfAttention``, ``WanAttentionBlock``, ``Head``, ``MLPProj``, ``WanModel``).

The files: a bf16 safetensors Wan base merged to ``--dtype q8_0`` and ``bf16``, and GGUF bases (Q4_K,
Q5_K block linears, as city96's tools lay them out) merged to ``q8_0`` and ``q5_0``; one merge each,
shared by every test.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np
import pytest
import torch
from gguf import (
    GGML_QUANT_SIZES,
    GGML_QUANT_VERSION,
    GGMLQuantizationType,
    GGUFReader,
    GGUFValueType,
    LlamaFileType,
    quants,
)

from distmerge.app.synth import make_factors, write_lora, write_wan_base
from distmerge.tasks.ggml import decode

from .gguf_files import KQ, write_gguf_base
from .helpers import load_checkpoint
from .test_cli import run_cli

pytestmark = pytest.mark.ray  # the command line's merge

#: output name -> (base: "safetensors" or the GGUF base's block-linear type, --dtype, block-linear type,
#: general.file_type that convert.py / llama-quantize write for it)
OUTPUTS = {
    "st-q8_0": ("safetensors", "q8_0", "Q8_0", LlamaFileType.MOSTLY_Q8_0),
    "st-bf16": ("safetensors", "bf16", "BF16", LlamaFileType.MOSTLY_BF16),
    "gguf-Q4_K-q8_0": ("Q4_K", "q8_0", "Q8_0", LlamaFileType.MOSTLY_Q8_0),
    "gguf-Q5_K-q5_0": ("Q5_K", "q5_0", "Q5_0", LlamaFileType.MOSTLY_Q5_0),
}
NAMES = list(OUTPUTS)

#: loader.py: the diffusion-model architectures ``gguf_sd_loader`` accepts (any other string raises)
IMG_ARCH_LIST = {
    *("flux", "sd1", "sdxl", "sd3", "aura", "hidream", "cosmos", "ltxv", "hyvid", "wan", "lumina2", "qwen_image"),
}
#: dequant.py: TORCH_COMPATIBLE_QTYPES (used as torch tensors) and dequantize_functions (torch dequantizers)
TORCH_COMPATIBLE = {"F32", "F16"}
DEQUANTIZE_FUNCTIONS = {
    *("BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K", "IQ4_NL", "IQ4_XS"),
}
#: lcpp.patch, llama_model_quantize_internal: name parts LLM_ARCH_WAN never quantizes
WAN_NOT_QUANTIZED = (
    *("modulation.", "patch_embedding.", "text_embedding.", "time_projection.", "time_embedding.", "img_emb.", "head."),
)
#: lcpp.patch, img_tensor_get_type's sanity check: names that are "not a supported UNET model"
NOT_A_UNET = ("model.diffusion_model.", "first_stage_model.", "single_transformer_blocks.", "joint_transformer_blocks.")
#: comfy/ldm/wan/model.py: the tensors of Linear and LayerNorm modules, the layers GGMLOps replaces (ops.py);
#: everything else (nn.Parameter modulation/emb_pos, RMSNorm norm_q/norm_k/norm_k_img, the Conv3d
#: patch_embedding) is loaded by plain torch
GGMLOPS_TENSOR = re.compile(
    r"(text_embedding\.[02]|time_embedding\.[02]|time_projection\.1|head\.head|img_emb\.proj\.[0134]"
    r"|blocks\.\d+\.((self|cross)_attn\.(q|k|v|o|k_img|v_img)|ffn\.[02]|norm3))\.(weight|bias)"
)
#: comfy/model_detection.py detect_unet_config, Wan branch: keys that make a Wan model another type than t2v
WAN_VARIANT_KEYS = (
    "vace_patch_embedding.weight",
    "control_adapter.conv.weight",
    "casual_audio_encoder.encoder.final_linear.weight",
    "audio_proj.audio_proj_glob_1.layer.bias",
    "face_adapter.fuser_blocks.0.k_norm.weight",
    "patch_embedding_mask.weight",
    "patch_embedding_pose.weight",
    "patch_embedding_global.weight",
    "img_emb.proj.0.bias",
)
#: comfy/ldm/wan/model.py: the Linear layers of a block (WanSelfAttention q/k/v/o, WanI2VCrossAttention
#: k_img/v_img, WanAttentionBlock.ffn), whose weights are what city96's quantizer quantizes
BLOCK_LINEAR_WEIGHT = re.compile(r"blocks\.\d+\.((self|cross)_attn\.(q|k|v|o|k_img|v_img)|ffn\.[02])\.weight")


class Written(NamedTuple):
    path: str
    reader: GGUFReader
    base: dict[str, tuple[int, ...]]  #: the base's tensor names and torch shapes
    linears: str  #: the block linears' type asked for
    file_type: int


def torch_shape(t) -> tuple[int, ...]:
    """loader.py gguf_sd_loader: ``torch.Size(tuple(int(v) for v in reversed(tensor.shape)))``."""
    return tuple(int(v) for v in reversed(t.shape.tolist()))


def by_name(reader: GGUFReader) -> dict:
    return {t.name: t for t in reader.tensors}


def ggml_n_dims(t) -> int:
    """ggml's ``ggml_n_dims``: dimensions up to the last one above 1, in ggml order (lcpp.patch uses it)."""
    ne = [int(v) for v in t.shape.tolist()]
    return max([i + 1 for i, n in enumerate(ne) if n > 1], default=1)


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, Written]:
    d = tmp_path_factory.mktemp("comfy")
    st_base = str(d / "wan")
    write_wan_base(st_base, KQ, num_shards=2)
    lora = str(d / "wan_lora.safetensors")
    write_lora(lora, make_factors(KQ, rank=4, dtype=torch.bfloat16), layout="diffusion_model", alpha=4.0)
    st_shapes = {k: tuple(v.shape) for k, v in load_checkpoint(st_base).items()}
    out = {}
    for name, (kind, dtype, linears, ftype) in OUTPUTS.items():
        base, shapes = st_base, st_shapes
        if kind != "safetensors":
            base = str(d / f"wan-{kind}.gguf")
            write_gguf_base(base, KQ, kind)
            shapes = {t.name: torch_shape(t) for t in GGUFReader(base).tensors}
        path = str(d / f"{name}.gguf")
        r = run_cli("merge", "--base", base, "--lora", lora, "-o", path, "--dtype", dtype)
        assert r.returncode == 0, r.stderr
        out[name] = Written(path, GGUFReader(path), shapes, linears, int(ftype))
    return out


@pytest.mark.parametrize("name", NAMES)
def test_architecture_is_the_string_wan_that_the_loader_accepts(written, name):
    """loader.py ``gguf_sd_loader`` reads ``general.architecture`` with ``get_field(reader, ..., str)``, which
    raises TypeError unless the field is one STRING; ``None`` (missing) or ``"pig"`` means compatibility
    mode (key detection), and a string outside ``IMG_ARCH_LIST`` raises "Unexpected architecture type".
    tools/convert.py ``ModelWan.arch = "wan"`` (``GGUFWriter(path=None, arch=model_arch.arch)``)."""
    field = written[name].reader.get_field("general.architecture")
    assert field is not None
    assert field.types == [GGUFValueType.STRING]
    arch = str(field.parts[field.data[-1]], encoding="utf-8")  # get_field's own read
    assert arch == "wan" and arch in IMG_ARCH_LIST


@pytest.mark.parametrize("name", NAMES)
def test_key_values_are_the_ones_convert_py_writes(written, name):
    """tools/convert.py ``convert_file``: ``add_quantization_version(gguf.GGML_QUANT_VERSION)`` and
    ``add_file_type(LlamaFileType.MOSTLY_BF16 / MOSTLY_F16)`` (both UINT32), nothing else; llama-quantize
    (llama.cpp's ``llama_model_quantize_internal``, patched by lcpp.patch) sets ``general.file_type`` to the
    ftype asked (MOSTLY_Q8_0 7, MOSTLY_Q5_0 8). tools/fix_5d_tensors.py ``get_file_type`` reads it back as
    ``gguf.LlamaFileType(ft)`` (ValueError when not one) and ``apply_5d_fix`` writes both keys again.
    loader.py ``get_orig_shape``: a ``comfy.gguf.orig_shape.<name>`` key replaces that tensor's shape;
    convert.py writes it only for ``shape_fix`` models (SD1/SDXL), never for Wan; and the loader reads
    ``general.type`` as a string (absent here)."""
    w = written[name]
    keys = {k for k in w.reader.fields if not k.startswith("GGUF.")}  # GGUF.* are the reader's header parts
    assert keys == {"general.architecture", "general.quantization_version", "general.file_type"}
    for key in ("general.quantization_version", "general.file_type"):
        assert w.reader.get_field(key).types == [GGUFValueType.UINT32], key
    qv = w.reader.get_field("general.quantization_version")
    assert int(qv.parts[qv.data[-1]][0]) == GGML_QUANT_VERSION == 2
    ft = w.reader.get_field("general.file_type")
    assert LlamaFileType(int(ft.parts[ft.data[-1]][0])) == w.file_type


@pytest.mark.parametrize("name", NAMES)
def test_tensor_names_are_wan_s_bare_names_as_in_the_base(written, name):
    """tools/convert.py ``strip_prefix`` drops ``model.diffusion_model.`` / ``model.``, and
    ``handle_tensors`` refuses names over ``MAX_TENSOR_NAME_LENGTH = 127`` (lcpp.patch: GGML_MAX_NAME 128
    with the NUL). loader.py ``gguf_sd_loader``: once any name starts with ``model.diffusion_model.``,
    every name without it is dropped. comfy/sd.py ``load_diffusion_model_state_dict`` with
    model_detection.py ``unet_prefix_from_state_dict``: bare Wan names give the fallback prefix
    ``model.``, and any name with it would make the rest disappear (``filter_keys=True``). lcpp.patch
    ``img_tensor_get_type`` refuses names holding ``NOT_A_UNET``'s parts."""
    w = written[name]
    names = [t.name for t in w.reader.tensors]
    assert len(names) == len(set(names))
    assert set(names) == set(w.base)  # every base tensor, each once, nothing added
    for n in names:
        assert len(n.encode("utf-8")) <= 127, n
        assert not n.startswith(("model.", "diffusion_model.", "net.")), n
        assert not any(p in n for p in NOT_A_UNET), n


@pytest.mark.parametrize("name", NAMES)
def test_comfyui_detects_the_wan_t2v_config_from_keys_and_shapes(written, name):
    """comfy/model_detection.py ``detect_unet_config`` (Wan branch): ``head.modulation`` present makes it
    ``wan2.1``; ``dim = head.modulation.shape[-1]``, ``out_dim = head.head.weight.shape[0] // 4``,
    ``ffn_dim = blocks.0.ffn.0.weight.shape[0]``, ``num_layers = count_blocks('blocks.{}.')``,
    ``in_dim = patch_embedding.weight.shape[1]``; none of the variant keys makes it ``t2v``. The shapes are
    the loader's (loader.py: gguf dims reversed). tools/convert.py ``ModelWan.keys_detect`` (used by the
    loader's compatibility mode, ``detect_arch``) must all be present too."""
    shapes = {t.name: torch_shape(t) for t in written[name].reader.tensors}
    assert {"blocks.0.self_attn.norm_q.weight", "text_embedding.2.weight", "head.modulation"} <= set(shapes)
    layers = 0
    while any(k.startswith(f"blocks.{layers}.") for k in shapes):
        layers += 1
    dim = shapes["head.modulation"][-1]
    config = {
        "dim": dim,
        "out_dim": shapes["head.head.weight"][0] // 4,
        "ffn_dim": shapes["blocks.0.ffn.0.weight"][0],
        "num_layers": layers,
        "in_dim": shapes["patch_embedding.weight"][1],
    }
    assert config == {"dim": KQ.dim, "out_dim": KQ.out_dim, "ffn_dim": KQ.ffn, "num_layers": KQ.blocks, "in_dim": 4}
    assert not any(k in shapes for k in WAN_VARIANT_KEYS)  # model_type "t2v"


@pytest.mark.parametrize("name", NAMES)
def test_shapes_are_the_torch_shapes_reversed_and_modulation_keeps_three_dims(written, name):
    """loader.py ``gguf_sd_loader``: the torch shape is the gguf dims reversed, and F32/F16 data is
    ``torch_tensor.view(*shape)`` (so it must hold exactly that many values). comfy/ldm/wan/model.py:
    ``WanAttentionBlock.modulation = nn.Parameter(torch.empty(1, 6, dim))``, ``Head.modulation`` is
    ``(1, 2, dim)``; lcpp.patch (LLM_ARCH_WAN) keeps ``.modulation`` 3-D (``gguf_set_tensor_ndim(..., 3)``)."""
    w = written[name]
    ts = by_name(w.reader)
    for n, t in ts.items():
        assert torch_shape(t) == w.base[n], n
        assert int(t.n_elements) == int(np.prod(w.base[n])), n
        if t.tensor_type.name in TORCH_COMPATIBLE:
            assert np.asarray(t.data).reshape(torch_shape(t)).size == t.n_elements, n
    d = KQ.dim
    assert [int(v) for v in ts["blocks.0.modulation"].shape] == [d, 6, 1]  # ggml order: 3 dims kept
    assert [int(v) for v in ts["head.modulation"].shape] == [d, 2, 1]
    assert torch_shape(ts["blocks.0.modulation"]) == (1, 6, d)
    assert torch_shape(ts["head.modulation"]) == (1, 2, d)


@pytest.mark.parametrize("name", NAMES)
def test_patch_embedding_is_a_5d_float_tensor_for_conv3d(written, name):
    """tools/convert.py ``handle_tensors`` sets aside tensors over ``MAX_TENSOR_DIMS = 4``
    (``ModelHyVid.handle_nd_tensor``, which ``ModelWan`` inherits); tools/fix_5d_tensors.py
    ``apply_5d_fix`` adds them back as ``GGMLQuantizationType.F32`` with all their dims.
    comfy/ldm/wan/model.py ``WanModel``: ``patch_embedding = operations.Conv3d(..., dtype=torch.float32)``;
    ops.py ``GGMLOps`` has no Conv3d, so plain torch copies the tensor: only F32/F16 data is a real
    tensor of that shape (loader.py views only those)."""
    t = by_name(written[name].reader)["patch_embedding.weight"]
    assert t.tensor_type.name in TORCH_COMPATIBLE
    assert t.tensor_type.name == "F32"  # fix_5d_tensors.py's type
    assert len(t.shape) == 5
    assert torch_shape(t) == (KQ.dim, KQ.in_dim, 1, 2, 2)


@pytest.mark.parametrize("name", NAMES)
def test_tensors_outside_ggmlops_layers_are_torch_compatible(written, name):
    """ops.py: ``GGMLOps`` replaces Linear, Conv2d, Embedding, LayerNorm and GroupNorm only, so an
    ``nn.Parameter`` (model.py ``modulation``, ``emb_pos``), ComfyUI's RMSNorm (model.py ``norm_q``,
    ``norm_k``, ``norm_k_img``) and the Conv3d ``patch_embedding`` load through plain torch and need
    ``dequant.py``'s torch-compatible types (F32/F16). tools/convert.py ``handle_tensors``: from bf16/fp32,
    a 1-D tensor, one of at most ``QUANTIZATION_THRESHOLD = 1024`` values, or a ``keys_hiprec`` name
    (``ModelWan``: ``.modulation``, "nn.parameter, can't load from BF16") is F32. (A 1-D BF16 tensor is
    dequantized at load only by newer loader.py versions; F32 never needs it.)"""
    ts = by_name(written[name].reader)
    outside = [n for n in ts if not GGMLOPS_TENSOR.fullmatch(n)]
    assert {"blocks.0.modulation", "head.modulation", "blocks.0.self_attn.norm_q.weight"} <= set(outside)
    assert {"blocks.0.cross_attn.norm_k.weight", "patch_embedding.weight", "patch_embedding.bias"} <= set(outside)
    for n in outside:
        assert ts[n].tensor_type.name in TORCH_COMPATIBLE, n
    for n, t in ts.items():
        if len(t.shape) == 1 or int(t.n_elements) <= 1024 or ".modulation" in n:
            assert t.tensor_type.name == "F32", n


@pytest.mark.parametrize("name", NAMES)
def test_every_type_is_one_comfyui_gguf_dequantizes_in_torch(written, name):
    """dequant.py: ``TORCH_COMPATIBLE_QTYPES`` (F32, F16) are used as they are, ``dequantize_functions``
    has torch code for BF16, Q8_0, Q5_1, Q5_0, Q4_1, Q4_0, Q6_K … Q2_K, IQ4_NL, IQ4_XS; any other type
    falls back to "incredibly slow" numpy. ``dequantize`` cuts the raw rows into ``GGML_QUANT_SIZES``
    blocks and reshapes them to the tensor shape, so each row must be whole blocks."""
    for t in written[name].reader.tensors:
        code = t.tensor_type.name
        assert code in TORCH_COMPATIBLE | DEQUANTIZE_FUNCTIONS, (t.name, code)
        block, size = GGML_QUANT_SIZES[t.tensor_type]
        assert int(t.shape[0]) % block == 0, t.name
        assert int(t.n_bytes) == int(t.n_elements) // block * size, t.name


@pytest.mark.parametrize("name", NAMES)
def test_only_2d_block_linears_are_quantized(written, name):
    """tools/lcpp.patch ``llama_model_quantize_internal``: a tensor is quantized only if its name ends in
    ``weight`` (llama.cpp's own rule), ``ggml_n_dims(tensor) == 2`` for image models, and (LLM_ARCH_WAN)
    its name holds none of ``WAN_NOT_QUANTIZED``: embedders, ``time_projection`` and ``head.head`` keep
    convert.py's type (BF16 from a bf16 source). ``img_tensor_get_type``: in a Q5_0 file ``.ffn.2.weight``
    is Q5_1 (Q4_0: Q4_1). So the block linears carry the asked type and nothing else is a block type."""
    w = written[name]
    for t in w.reader.tensors:
        n, code = t.name, t.tensor_type.name
        quantizable = n.endswith("weight") and ggml_n_dims(t) == 2 and not any(p in n for p in WAN_NOT_QUANTIZED)
        assert quantizable == bool(BLOCK_LINEAR_WEIGHT.fullmatch(n)), n  # the two readings of the rule agree
        if quantizable:
            want = {"Q5_0": "Q5_1", "Q4_0": "Q4_1"}.get(w.linears, w.linears) if ".ffn.2." in n else w.linears
            assert code == want, (n, code)
        elif len(t.shape) == 2:  # the 2-D weights left alone: embedders, time_projection, head.head
            assert code == "BF16", (n, code)
        else:
            assert code in TORCH_COMPATIBLE, (n, code)


def test_the_runtime_q8_0_dequantization_rounds_each_value_to_fp16(written):
    """dequant.py ``dequantize_blocks_Q8_0``: ``d = d.view(torch.float16).to(dtype)``, ``return d * x`` with
    ``x`` int8; nodes.py ``UnetLoaderGGUF.load_unet`` leaves ``dequant_dtype`` None (ops.py
    ``GGMLLayer.get_weight`` passes it on), so ``.to(None)`` keeps ``d`` float16 and float16 × int8 is
    float16: every value ComfyUI computes with is the fp16 rounding of the exact product. gguf-py's
    dequantizer (and ComfyUI-GGUF with ``dequant_dtype`` float32) gives the exact float32 product, which
    distmerge decodes and merges from: it copies the file's meaning, not the runtime's rounding."""
    t = by_name(written["st-q8_0"].reader)["blocks.0.ffn.0.weight"]
    assert t.tensor_type == GGMLQuantizationType.Q8_0
    raw = np.array(t.data)  # (rows, bytes) as the loader hands it to dequant.py
    exact = torch.from_numpy(quants.dequantize(raw, GGMLQuantizationType.Q8_0).astype(np.float32))
    blocks = torch.from_numpy(raw).reshape(-1, 34)  # dequantize(): (n_blocks, type_size)
    d, x = torch.split(blocks, [2, 32], dim=1)  # split_block_dims(blocks, 2)
    runtime = (d.view(torch.float16).to(None) * x.view(torch.int8)).reshape(exact.shape)
    as_f32 = (d.view(torch.float16).to(torch.float32) * x.view(torch.int8)).reshape(exact.shape)
    assert runtime.dtype == torch.float16
    assert torch.equal(runtime, exact.half())  # the exact value, rounded to fp16
    diff = (runtime.float() - exact).abs()
    assert diff.max() > 0 and (diff > 0).float().mean() > 0.5  # most values move
    assert bool((diff <= torch.clamp(exact.abs() * 2.0**-11, min=2.0**-25)).all())  # by at most half an fp16 ulp
    assert torch.equal(as_f32, exact)  # dequant_dtype float32 is gguf-py's value, bit for bit
    assert torch.equal(decode(torch.from_numpy(raw), "Q8_0", torch_shape(t)), exact)  # what distmerge merges from
