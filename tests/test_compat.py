"""The ROLL-compatible functions: merge_lora_into_state_dict and load_state_dict_from_safetensors."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from distmerge.app.compat import load_state_dict_from_safetensors, merge_lora_into_state_dict
from distmerge.errors import MatchError

from .helpers import assert_close_to_reference, load_checkpoint, lora_terms, reference_merge

#: key templates without an adapter name (``…lora_B.weight``): the ROLL seed script merged none of these
TEMPLATES = {
    "diffusion_model": ("diffusion_model.{m}.lora_A.weight", "diffusion_model.{m}.lora_B.weight"),
    "peft": ("base_model.model.{m}.lora_A.weight", "base_model.model.{m}.lora_B.weight"),
    "plain": ("{m}.lora_A.weight", "{m}.lora_B.weight"),
}


def _lora(factors, layout: str) -> dict[str, torch.Tensor]:
    a_t, b_t = TEMPLATES[layout]
    sd = {}
    for m, (a, b) in factors.items():
        sd[a_t.format(m=m)] = a
        sd[b_t.format(m=m)] = b
    return sd


@pytest.fixture(scope="module")
def base_sd(tiny_base):
    return load_checkpoint(tiny_base)


def _clone(sd):
    return {k: v.clone() for k, v in sd.items()}


def _assert_same(a, b):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("layout", sorted(TEMPLATES))
def test_merge_bf16_default_against_reference(base_sd, tiny_factors, layout):
    lora = _lora(tiny_factors, layout)
    base_before, lora_before = _clone(base_sd), _clone(lora)
    out = merge_lora_into_state_dict(base_sd, lora, alpha=0.7)

    targets = {m + ".weight" for m in tiny_factors}
    assert len(targets) == 20
    ref = reference_merge({k: base_sd[k] for k in targets}, lora_terms(tiny_factors, 0.7), out_dtype=torch.bfloat16)
    assert_close_to_reference({k: out[k] for k in targets}, ref)  # every pair merged
    assert set(out) == set(base_sd)
    for k in set(base_sd) - targets:  # untouched tensors come back as they are
        assert out[k] is base_sd[k]
    # the merge really changed every target
    for k in targets:
        assert not torch.equal(out[k], base_sd[k].to(torch.bfloat16)), k
    # inputs untouched
    _assert_same(base_sd, base_before)
    _assert_same(lora, lora_before)


def test_merge_dtype_none_keeps_fp32(base_sd, tiny_factors):
    out = merge_lora_into_state_dict(base_sd, _lora(tiny_factors, "diffusion_model"), alpha=-1.5, dtype=None)
    targets = {m + ".weight" for m in tiny_factors}
    ref = reference_merge({k: base_sd[k] for k in targets}, lora_terms(tiny_factors, -1.5))
    assert all(out[k].dtype == torch.float32 for k in out)
    assert_close_to_reference({k: out[k] for k in targets}, ref)


def test_merge_honours_alpha_tensors(base_sd, tiny_factors):
    lora = _lora(tiny_factors, "diffusion_model")
    for m in tiny_factors:
        lora[f"diffusion_model.{m}.alpha"] = torch.tensor(2.0)  # rank 4 -> scale 0.5
    out = merge_lora_into_state_dict(base_sd, lora, alpha=1.0, dtype=None)
    targets = {m + ".weight" for m in tiny_factors}
    ref = reference_merge({k: base_sd[k] for k in targets}, lora_terms(tiny_factors, 0.5))
    assert_close_to_reference({k: out[k] for k in targets}, ref)


def test_merge_hand_computed():
    base = {
        "blocks.0.ffn.0.weight": torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
        "blocks.0.ffn.0.bias": torch.tensor([9.0, 9.0]),
    }
    lora = {
        "blocks.0.ffn.0.lora_A.weight": torch.tensor([[1.0, 2.0]]),
        "blocks.0.ffn.0.lora_B.weight": torch.tensor([[1.0], [3.0]]),
    }  # B@A = [[1,2],[3,6]]
    out = merge_lora_into_state_dict(base, lora, alpha=2.0, dtype=None)
    assert out["blocks.0.ffn.0.weight"].tolist() == [[3.0, 6.0], [9.0, 16.0]]
    assert out["blocks.0.ffn.0.bias"] is base["blocks.0.ffn.0.bias"]
    out16 = merge_lora_into_state_dict(base, lora, alpha=2.0)
    assert out16["blocks.0.ffn.0.weight"].dtype == torch.bfloat16
    assert out16["blocks.0.ffn.0.weight"].float().tolist() == [[3.0, 6.0], [9.0, 16.0]]


def test_merge_bf16_base_dtype_none_keeps_bf16():
    base = {"l.weight": torch.tensor([[1.0, 1.0]], dtype=torch.bfloat16)}
    lora = {"l.lora_A.weight": torch.tensor([[2.0**-5, 2.0**-5]]), "l.lora_B.weight": torch.tensor([[2.0**-4]])}
    # B@A = 2**-9; times 3 = 1.5 * 2**-8, above half a bf16 ulp at 1.0: rounds up to 1 + 2**-7
    out = merge_lora_into_state_dict(base, lora, alpha=3.0, dtype=None)
    assert out["l.weight"].dtype == torch.bfloat16
    assert out["l.weight"].float().tolist() == [[1.0 + 2.0**-7, 1.0 + 2.0**-7]]


def test_untouched_tensor_of_any_dtype_passes_through():
    base = {"l.weight": torch.zeros(2, 2), "freqs": torch.ones(3, dtype=torch.complex64)}
    lora = {"l.lora_A.weight": torch.ones(1, 2), "l.lora_B.weight": torch.ones(2, 1)}
    out = merge_lora_into_state_dict(base, lora, dtype=None)
    assert out["l.weight"].tolist() == [[1.0, 1.0], [1.0, 1.0]]
    assert out["freqs"] is base["freqs"]


@pytest.mark.parametrize(
    "extra",
    [
        {
            "diffusion_model.blocks.0.cross_attn.k_img.lora_A.weight": torch.zeros(4, 64),
            "diffusion_model.blocks.0.cross_attn.k_img.lora_B.weight": torch.zeros(64, 4),
        },
        {"diffusion_model.blocks.0.ffn.0.lora_A.weight.extra": torch.zeros(1)},
        {"diffusion_model.time_embedding.0.lora_A.weight": torch.zeros(4, 16)},
    ],
)
def test_unmatched_keys_raise(base_sd, tiny_factors, extra):
    lora = {**_lora(tiny_factors, "diffusion_model"), **extra}
    with pytest.raises(MatchError) as ei:
        merge_lora_into_state_dict(base_sd, lora)
    assert next(iter(extra)) in str(ei.value)


def test_shape_mismatch_raises(base_sd):
    lora = {
        "blocks.0.self_attn.q.lora_A.weight": torch.zeros(4, 63),
        "blocks.0.self_attn.q.lora_B.weight": torch.zeros(64, 4),
    }
    with pytest.raises(MatchError, match="blocks.0.self_attn.q.weight"):
        merge_lora_into_state_dict(base_sd, lora)


def test_nothing_matched_raises(base_sd):
    with pytest.raises(MatchError):
        merge_lora_into_state_dict(base_sd, {"foo.bar": torch.zeros(1)})


def test_load_folder(tiny_base):
    sd = load_state_dict_from_safetensors(tiny_base)
    ref = load_checkpoint(tiny_base)
    assert set(sd) == set(ref)
    for k in ref:
        assert sd[k].dtype == ref[k].dtype and torch.equal(sd[k], ref[k]), k
        assert sd[k].device.type == "cpu"


def test_load_single_file(tmp_path):
    p = str(tmp_path / "one.safetensors")
    tensors = {
        "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "b": torch.tensor([1, 2], dtype=torch.int64),
        "c": torch.tensor([0.5], dtype=torch.bfloat16),
    }
    save_file(tensors, p)
    sd = load_state_dict_from_safetensors(p)
    assert set(sd) == set(tensors)
    for k, t in tensors.items():
        assert sd[k].dtype == t.dtype and torch.equal(sd[k], t), k
    assert load_state_dict_from_safetensors(tmp_path).keys() == tensors.keys()  # folder with one file


def test_load_then_merge_round_trip(tmp_path, tiny_base, tiny_factors):
    sd = load_state_dict_from_safetensors(tiny_base)
    merged = merge_lora_into_state_dict(sd, _lora(tiny_factors, "peft"), alpha=1.0, dtype=None)
    p = os.path.join(tmp_path, "merged.safetensors")
    save_file(merged, p)
    back = load_file(p)
    ref = reference_merge(load_checkpoint(tiny_base), lora_terms(tiny_factors, 1.0))
    assert_close_to_reference(back, ref)
