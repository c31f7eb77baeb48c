"""merge_tensor / lora_delta on hand-computed tensors and against torch.nn.functional convolutions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distmerge.tasks.mergemath import Term, compute_dtype, lora_delta, merge_tensor

from .helpers import assert_close_to_reference, reference_merge

T = torch.tensor


def test_rank1_lora():
    w = T([[1.0, 2.0], [3.0, 4.0]])
    a = T([[1.0, 2.0]])  # [r=1, in=2]
    b = T([[1.0], [3.0]])  # [out=2, r=1]  -> B@A = [[1, 2], [3, 6]]
    out = merge_tensor(w, [Term("lora", 2.0, (a, b))])
    assert out.dtype == torch.float32
    assert out.tolist() == [[3.0, 6.0], [9.0, 16.0]]
    assert w.tolist() == [[1.0, 2.0], [3.0, 4.0]]  # not modified


def test_two_terms_summed():
    w = torch.zeros(2, 3)
    t1 = Term("lora", 1.0, (T([[1.0, 0.0, 1.0]]), T([[1.0], [2.0]])))  # [[1,0,1],[2,0,2]]
    t2 = Term("lora", 0.5, (T([[0.0, 1.0, 0.0]]), T([[3.0], [-1.0]])))  # [[0,3,0],[0,-1,0]]
    assert merge_tensor(w, [t1, t2]).tolist() == [[1.0, 1.5, 1.0], [2.0, -0.5, 2.0]]


def test_rank2_negative_coef():
    w = torch.eye(2)
    a = T([[1.0, 0.0], [0.0, 1.0]])
    b = T([[1.0, 2.0], [3.0, 4.0]])  # B@A = B
    assert merge_tensor(w, [Term("lora", -1.0, (a, b))]).tolist() == [[0.0, -2.0], [-3.0, -3.0]]


def test_rank2_2x3():
    w = T([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    a = T([[1.0, 2.0, 0.0], [0.0, 1.0, -1.0]])  # [2, 3]
    b = T([[1.0, 1.0], [2.0, -1.0]])  # [2, 2]
    # B@A = [[1, 3, -1], [2, 3, 1]]; coef -0.5 -> [[-0.5, -1.5, 0.5], [-1, -1.5, -0.5]]
    out = merge_tensor(w, [Term("lora", -0.5, (a, b))])
    assert out.tolist() == [[0.5, -0.5, 1.5], [-1.0, -1.5, -0.5]]


def test_diff_terms():
    w = T([[1.0, 2.0], [3.0, 4.0]])
    d = T([[0.5, 0.5], [-1.0, 0.0]])
    assert merge_tensor(w, [Term("diff", 2.0, (d,))]).tolist() == [[2.0, 3.0], [1.0, 4.0]]
    bias = T([1.0, 2.0, 3.0])
    assert merge_tensor(bias, [Term("diff", -1.0, (T([1.0, 1.0, 1.0]),))]).tolist() == [0.0, 1.0, 2.0]
    mod = torch.zeros(1, 2, 2)
    dm = T([[[1.0, 2.0], [3.0, 4.0]]])
    assert merge_tensor(mod, [Term("diff", 0.25, (dm,))]).tolist() == [[[0.25, 0.5], [0.75, 1.0]]]


def test_lora_and_diff_mixed():
    w = torch.zeros(2, 2)
    out = merge_tensor(
        w, [Term("lora", 1.0, (T([[1.0, 1.0]]), T([[1.0], [1.0]]))), Term("diff", 1.0, (T([[1.0, 0.0], [0.0, 1.0]]),))]
    )
    assert out.tolist() == [[2.0, 1.0], [1.0, 2.0]]


def test_no_terms_returns_copy_in_dtype():
    w = T([[1.5, -2.0]], dtype=torch.bfloat16)
    out = merge_tensor(w, [])
    assert out.dtype == torch.bfloat16 and torch.equal(out, w)
    assert merge_tensor(w, [], out_dtype=torch.float32).tolist() == [[1.5, -2.0]]


def test_unknown_kind():
    with pytest.raises(ValueError, match="bogus"):
        merge_tensor(torch.zeros(2, 2), [Term("bogus", 1.0, (torch.zeros(2, 2),))])


# --------------------------------------------------------------------------------------- rounding


def test_bf16_rounded_once_literal():
    # bf16 ulp at 1.0 is 2**-7. Three deltas of 2**-9 each: rounding after every term would stay
    # at 1.0 each time; the float32 sum 1.5 * 2**-8 is above half an ulp, so rounding once gives 1 + 2**-7.
    w = T([1.0, 1.0], dtype=torch.bfloat16).reshape(2, 1)
    d = torch.full((2, 1), 2.0**-9)
    out = merge_tensor(w, [Term("diff", 1.0, (d,))] * 3)
    assert out.dtype == torch.bfloat16
    assert out.float().flatten().tolist() == [1.0 + 2.0**-7] * 2
    # same with a rank-1 LoRA whose B@A is 2**-9 everywhere
    a, b = T([[2.0**-5]]), T([[2.0**-4], [2.0**-4]])
    out = merge_tensor(w, [Term("lora", 1.0, (a, b))] * 3)
    assert out.float().flatten().tolist() == [1.0 + 2.0**-7] * 2


def test_out_dtype_rounds_once_from_fp32():
    w = T([[1.0, 3.0]])  # fp32 base, bf16 output
    d = T([[2.0**-8 + 2.0**-12, 0.0]])  # just above half an ulp of bf16 at 1.0
    out = merge_tensor(w, [Term("diff", 1.0, (d,))], out_dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert out.float().tolist() == [[1.0 + 2.0**-7, 3.0]]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_random_against_float64_reference(dtype):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 40, generator=g).to(dtype)
    terms, ref_terms = [], []
    for coef, r in ((0.7, 4), (-1.3, 8)):
        a = (torch.randn(r, 40, generator=g) * 0.1).to(torch.bfloat16)
        b = (torch.randn(48, r, generator=g) * 0.1).to(torch.bfloat16)
        terms.append(Term("lora", coef, (a, b)))
        ref_terms.append((coef, b.double() @ a.double()))
    d = torch.randn(48, 40, generator=g) * 0.01
    terms.append(Term("diff", 0.5, (d,)))
    ref_terms.append((0.5, d.double()))
    out = merge_tensor(w, terms)
    ref = reference_merge({"w": w}, {"w": ref_terms})
    assert_close_to_reference({"w": out}, ref)


# ------------------------------------------------------------------------------------ convolutions


def test_conv1x1_literal():
    w = torch.zeros(2, 2, 1, 1)
    a = T([1.0, 2.0]).reshape(1, 2, 1, 1)  # [r=1, in=2, 1, 1]
    b = T([3.0, -1.0]).reshape(2, 1, 1, 1)  # [out=2, r=1, 1, 1]
    out = merge_tensor(w, [Term("lora", 1.0, (a, b))])
    assert out.shape == (2, 2, 1, 1)
    assert out.flatten(1).tolist() == [[3.0, 6.0], [-1.0, -2.0]]
    assert lora_delta(a, b, (2, 2, 1, 1)).flatten(1).tolist() == [[3.0, 6.0], [-1.0, -2.0]]


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("kernel,padding", [((1, 1), 0), ((3, 3), 1), ((3, 3), 0), ((1, 3), (0, 1))])
def test_conv2d_merged_kernel_equals_composition(kernel, padding):
    out_c, in_c, r = 5, 3, 2
    w = _rand(out_c, in_c, *kernel, seed=1)
    a = _rand(r, in_c, *kernel, seed=2)  # LoRA down: a conv with W's kernel
    b = _rand(out_c, r, 1, 1, seed=3)  # LoRA up: a 1x1 conv
    x = _rand(2, in_c, 7, 6, seed=4)
    coef = 0.75
    merged = merge_tensor(w, [Term("lora", coef, (a, b))])
    assert merged.dtype == torch.float64 and merged.shape == w.shape
    lhs = F.conv2d(x, merged, padding=padding)
    rhs = F.conv2d(x, w, padding=padding) + coef * F.conv2d(F.conv2d(x, a, padding=padding), b)
    torch.testing.assert_close(lhs, rhs, rtol=1e-10, atol=1e-10)
    # and the delta alone
    delta = lora_delta(a, b, w.shape, dtype=torch.float64)
    torch.testing.assert_close(
        F.conv2d(x, delta, padding=padding), F.conv2d(F.conv2d(x, a, padding=padding), b), rtol=1e-10, atol=1e-10
    )


def test_conv3d_wan_patch_embedding():
    out_c, in_c, r = 6, 4, 3
    w = _rand(out_c, in_c, 1, 2, 2, seed=5)  # Wan patch_embedding [dim, in_dim, 1, 2, 2]
    a = _rand(r, in_c, 1, 2, 2, seed=6)
    b = _rand(out_c, r, 1, 1, 1, seed=7)
    x = _rand(1, in_c, 3, 8, 6, seed=8)
    coef = -1.25
    merged = merge_tensor(w, [Term("lora", coef, (a, b))])
    stride = (1, 2, 2)
    lhs = F.conv3d(x, merged, stride=stride)
    rhs = F.conv3d(x, w, stride=stride) + coef * F.conv3d(F.conv3d(x, a, stride=stride), b)
    torch.testing.assert_close(lhs, rhs, rtol=1e-10, atol=1e-10)


def test_conv_fp32_with_2d_factors():
    # some files store conv LoRA factors flattened: A [r, in*k*k], B [out, r]
    w = _rand(4, 3, 3, 3, seed=9).float()
    a4 = _rand(2, 3, 3, 3, seed=10).float()
    b4 = _rand(4, 2, 1, 1, seed=11).float()
    x = _rand(1, 3, 5, 5, seed=12).float()
    m4 = merge_tensor(w, [Term("lora", 1.0, (a4, b4))])
    m2 = merge_tensor(w, [Term("lora", 1.0, (a4.flatten(1), b4.flatten(1)))])
    assert torch.equal(m4, m2)
    torch.testing.assert_close(F.conv2d(x, m4), F.conv2d(x, w) + F.conv2d(F.conv2d(x, a4), b4), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------- dtype / alias


def test_inplace_does_not_alias_when_dtype_differs():
    w = T([[1.0, 2.0], [3.0, 4.0]], dtype=torch.bfloat16)
    before = w.clone()
    out = merge_tensor(w, [Term("diff", 1.0, (torch.ones(2, 2),))], inplace=True)
    assert out.tolist() == [[2.0, 3.0], [4.0, 5.0]]
    assert torch.equal(w, before)
    assert out.data_ptr() != w.data_ptr()


def test_inplace_out_dtype_differs_from_fp32_base():
    w = T([[1.0, 2.0]])
    out = merge_tensor(w, [Term("diff", 1.0, (T([[1.0, 1.0]]),))], out_dtype=torch.bfloat16, inplace=True)
    assert out.dtype == torch.bfloat16 and out.float().tolist() == [[2.0, 3.0]]
    assert out.data_ptr() != w.data_ptr()


def test_inplace_fp32_result_correct():
    w = T([[1.0, 2.0], [3.0, 4.0]])
    out = merge_tensor(w, [Term("lora", 2.0, (T([[1.0, 2.0]]), T([[1.0], [3.0]])))], inplace=True)
    assert out.tolist() == [[3.0, 6.0], [9.0, 16.0]]


def test_inplace_noncontiguous_fp32():
    base = T([[1.0, 2.0], [3.0, 4.0]])
    w = base.t()  # [[1, 3], [2, 4]], non-contiguous
    out = merge_tensor(w, [Term("diff", 1.0, (T([[10.0, 20.0], [30.0, 40.0]]),))], inplace=True)
    assert out.tolist() == [[11.0, 23.0], [32.0, 44.0]]


def test_not_inplace_never_modifies_fp32_base():
    w = T([[1.0, 2.0]])
    merge_tensor(w, [Term("diff", 1.0, (T([[1.0, 1.0]]),))])
    assert w.tolist() == [[1.0, 2.0]]


def test_float64_base_computed_in_float64():
    assert compute_dtype(torch.float64) == torch.float64
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        assert compute_dtype(dt) == torch.float32
    w = torch.ones(1, 1, dtype=torch.float64)
    a = T([[1e-6]], dtype=torch.float64)
    b = T([[1e-6]], dtype=torch.float64)  # B@A = 1e-12: lost in float32 (ulp 1.2e-7), kept in float64
    out = merge_tensor(w, [Term("lora", 1.0, (a, b))])
    assert out.dtype == torch.float64
    assert out.item() == 1.0 + 1e-12
    out = merge_tensor(w, [Term("diff", 3.0, (T([[1e-13]], dtype=torch.float64),))])
    assert out.item() == 1.0 + 3e-13
    # a float32 base loses it (that is what float32 accumulation means)
    assert merge_tensor(w.float(), [Term("lora", 1.0, (a, b))]).item() == 1.0
