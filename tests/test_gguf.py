"""GGUF in and out, judged by gguf-py (llama.cpp's own Python package): its writer makes the
bases, its reader and dequantizer read what distmerge wrote, and its quantizer says what the
bytes must be.

* bf16 safetensors -> Q8_0 / BF16 GGUF: the file equals, byte for byte, the one gguf-py's
  ``GGUFWriter`` writes for the merged float32 values under city96's type rules (the header and
  key/values included).
* GGUF bases (Q8_0, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K block linears) -> Q8_0 GGUF: each merged tensor
  is gguf-py's Q8_0 of (gguf-py's exact float32 dequantization + the delta); untouched tensors
  keep their bytes.
* a GGUF base -> bf16 safetensors: bf16(dequantized + delta), read back by safetensors.
* refusals: one line, nothing published, inputs unchanged.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from safetensors.torch import load_file

from distmerge.app.synth import make_factors, wan_shapes, write_lora, write_wan_base

from .conftest import snapshot
from .gguf_files import KQ, encode, read_values, write_gguf_base, write_like_gguf_py
from .helpers import load_checkpoint
from .test_cli import run_cli

pytestmark = pytest.mark.ray  # the command line's merge (driver-only here: these bases are small)

#: city96's types besides the block linears, written out by hand from tools/convert.py:246-285 and
#: tools/fix_5d_tensors.py (F32: 1-D, <= 1024 values, ".modulation", the 5-D patch embedding)
F32_KEYS = ("patch_embedding.weight", ".modulation", "head.modulation")
BLOCK_LINEARS = (".self_attn.q.", ".self_attn.k.", ".self_attn.v.", ".self_attn.o.", ".cross_attn.q.")
BLOCK_LINEARS += (".cross_attn.k.", ".cross_attn.v.", ".cross_attn.o.", ".ffn.0.", ".ffn.2.")


def expected_type(key: str, shape: tuple[int, ...], linears: str, rest: str = "BF16") -> str:
    if key.startswith("blocks.") and key.endswith(".weight") and any(b in key for b in BLOCK_LINEARS):
        return linears
    if len(shape) == 1 or int(np.prod(shape)) <= 1024 or any(k in key for k in F32_KEYS):
        return "F32"
    return rest


@pytest.fixture(scope="module")
def kq_factors():
    return make_factors(KQ, rank=4, dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def kq_lora(kq_factors, tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("lora") / "wan_lora.safetensors")
    write_lora(path, kq_factors, layout="diffusion_model", alpha=4.0)  # alpha / rank = 1
    return path


@pytest.fixture(scope="module")
def kq_base(tmp_path_factory) -> str:
    d = str(tmp_path_factory.mktemp("kq") / "wan")
    write_wan_base(d, KQ, num_shards=2)
    return d


def merged(values: dict[str, np.ndarray], factors) -> dict[str, np.ndarray]:
    """float32 base values plus each LoRA's B @ A (scale 1), as distmerge's float32 ``addmm``."""
    out = {}
    for key, v in values.items():
        acc = torch.from_numpy(np.array(v, dtype=np.float32))
        f = factors.get(key.removesuffix(".weight"))
        if f is not None:
            a, b = f
            acc.view(acc.shape[0], -1).addmm_(b.float(), a.float(), alpha=1.0)
        out[key] = acc.numpy()
    return out


@pytest.mark.parametrize("dtype, linears", [("q8_0", "Q8_0"), ("bf16", "BF16"), ("q5_0", "Q5_0")])
def test_bf16_safetensors_to_gguf_is_the_file_gguf_py_writes(kq_base, kq_lora, kq_factors, tmp_path, dtype, linears):
    out = str(tmp_path / "wan.gguf")
    r = run_cli("merge", "--base", kq_base, "--lora", kq_lora, "-o", out, "--dtype", dtype)
    assert r.returncode == 0, r.stderr
    base = {k: v.float().numpy() for k, v in load_checkpoint(kq_base).items()}
    want = merged(base, kq_factors)
    types = {k: expected_type(k, s, linears) for k, s in wan_shapes(KQ)}
    if linears == "Q5_0":  # lcpp.patch's ffn_down rule: Wan's ffn.2 one step up
        types.update({k: "Q5_1" for k in types if k.endswith("ffn.2.weight")})
    ref = str(tmp_path / "gguf_py.gguf")
    file_type = {"Q8_0": 7, "BF16": 32, "Q5_0": 8}[linears]
    write_like_gguf_py(ref, [(k, types[k], want[k]) for k, _ in wan_shapes(KQ)], file_type)
    with open(out, "rb") as f, open(ref, "rb") as g:
        assert f.read() == g.read()


@pytest.mark.parametrize("linears", ["Q8_0", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"])
def test_gguf_bases_merge_to_q8_0(kq_lora, kq_factors, tmp_path, linears):
    base = str(tmp_path / f"wan-{linears}.gguf")
    write_gguf_base(base, KQ, linears)
    before = snapshot(str(tmp_path))
    out = str(tmp_path / "out" / "merged-Q8_0.gguf")
    r = run_cli("merge", "--base", base, "--lora", kq_lora, "-o", out, "--dtype", "q8_0")
    assert r.returncode == 0, r.stderr
    assert {k: v for k, v in snapshot(str(tmp_path)).items() if k in before} == before
    src = read_values(base)
    want = merged({k: v for k, (_, v) in src.items()}, kq_factors)
    got = GGUFReader(out)
    base_bytes = {t.name: np.asarray(t.data).tobytes() for t in GGUFReader(base).tensors}
    for t in got.tensors:
        code = "Q8_0" if t.name.removesuffix(".weight") in kq_factors else src[t.name][0]
        assert t.tensor_type.name == code, t.name
        if t.name.removesuffix(".weight") in kq_factors:
            assert np.asarray(t.data).tobytes() == encode(want[t.name], "Q8_0").tobytes(), t.name
        else:  # untouched: the base's own bytes
            assert np.asarray(t.data).tobytes() == base_bytes[t.name], t.name


def _merge_gguf_base(tmp_path, lora: str, linears: str, out_name: str, *flags: str):
    """A GGUF base with ``linears`` block linears merged by the command line into ``out_name``."""
    base = str(tmp_path / f"wan-{linears}.gguf")
    write_gguf_base(base, KQ, linears)
    out = str(tmp_path / out_name)
    r = run_cli("merge", "--base", base, "--lora", lora, "-o", out, *flags)
    assert r.returncode == 0, r.stderr
    return base, out, r


def test_a_k_quant_base_with_dtype_keep_says_what_it_re_encodes(kq_lora, tmp_path):
    _, out, r = _merge_gguf_base(tmp_path, kq_lora, "Q4_K", "merged.gguf")
    assert "Q4_K" in r.stderr and "Q8_0" in r.stderr, r.stderr
    types = {t.name: t.tensor_type.name for t in GGUFReader(out).tensors}
    assert types["blocks.0.ffn.0.weight"] == "Q8_0" and types["blocks.0.modulation"] == "F32"


def test_a_gguf_base_merges_to_bf16_safetensors(kq_lora, kq_factors, tmp_path):
    base, out, _ = _merge_gguf_base(tmp_path, kq_lora, "Q5_K", "merged.safetensors", "--dtype", "bf16")
    src = read_values(base)
    want = merged({k: v for k, (_, v) in src.items()}, kq_factors)
    got = load_file(out)
    assert set(got) == set(src)
    for k, v in got.items():
        assert v.dtype == torch.bfloat16, k
        assert torch.equal(v, torch.from_numpy(want[k]).bfloat16()), k


def test_a_quantized_gguf_base_with_dtype_keep_to_safetensors_is_bf16(kq_lora, tmp_path):
    _, out, _ = _merge_gguf_base(tmp_path, kq_lora, "Q8_0", "merged.safetensors")
    got = load_file(out)
    assert got["blocks.0.ffn.0.weight"].dtype == torch.bfloat16  # Q8_0 has no safetensors dtype
    assert got["blocks.0.modulation"].dtype == torch.float32  # F32 in the GGUF stays F32


def _refused(r, out: str, *words: str) -> None:
    assert r.returncode in (1, 2), r.stdout + r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip() and " units, " not in x]  # not progress
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert all(w in lines[0] for w in words), lines[0]
    assert not os.path.exists(out)


def test_a_gguf_of_another_architecture_is_one_line(kq_lora, tmp_path):
    base = str(tmp_path / "llm.gguf")
    write_gguf_base(base, KQ, "Q8_0", arch="llama")
    out = str(tmp_path / "merged.gguf")
    _refused(run_cli("merge", "--base", base, "--lora", kq_lora, "-o", out), out, base, "'llama'")


def test_a_lora_for_another_model_on_a_gguf_base_is_one_line(tiny_factors, tmp_path):
    base = str(tmp_path / "wan-Q8_0.gguf")
    write_gguf_base(base, KQ, "Q8_0")
    lora = str(tmp_path / "tiny_lora.safetensors")
    write_lora(lora, tiny_factors, layout="diffusion_model", alpha=4.0)  # dim 64 factors, a dim 256 base
    out = str(tmp_path / "merged.gguf")
    _refused(run_cli("merge", "--base", base, "--lora", lora, "-o", out, "--dtype", "q8_0"), out, "blocks.0.")


def test_output_and_dtype_that_do_not_fit_are_usage_errors(tiny_base, lora, tmp_path):
    out = str(tmp_path / "merged.safetensors")
    _refused(run_cli("merge", "--base", tiny_base, "--lora", lora, "-o", out, "--dtype", "q8_0"), out, ".gguf")
    out = str(tmp_path / "merged.gguf")
    _refused(run_cli("merge", "--base", tiny_base, "--lora", lora, "-o", out, "--dtype", "fp8_e4m3fn"), out, "q8_0")


def test_a_gguf_output_needs_wan_s_bare_names(kq_base, kq_lora, tmp_path):
    from safetensors.torch import save_file

    prefixed = str(tmp_path / "full_checkpoint.safetensors")  # ComfyUI's full-checkpoint naming
    save_file({f"model.diffusion_model.{k}": v for k, v in load_checkpoint(kq_base).items()}, prefixed)
    out = str(tmp_path / "merged.gguf")
    _refused(run_cli("merge", "--base", prefixed, "--lora", kq_lora, "-o", out), out, "model.diffusion_model.")


def test_verify_and_extract_refuse_gguf_in_one_line(kq_lora, tmp_path):
    base = str(tmp_path / "wan-Q8_0.gguf")
    write_gguf_base(base, KQ, "Q8_0")
    out = str(tmp_path / "lora.safetensors")
    _refused(run_cli("extract", "--base", base, "--tuned", base, "-o", out), out, base, "safetensors")
    r = run_cli("verify", str(tmp_path / "none.gguf"), "--base", base, "--lora", kq_lora)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "GGUF" in r.stderr.splitlines()[-1], r.stderr
