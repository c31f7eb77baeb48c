"""GPU path: tasks merge on CUDA when they hold a GPU (skipped on machines without CUDA)."""

from __future__ import annotations

import pytest
import torch

import distmerge
from distmerge.app.synth import write_lora
from distmerge.tasks import mergemath

from .helpers import assert_close_to_reference, load_checkpoint, lora_terms, reference_merge

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
pytestmark = [pytest.mark.gpu, gpu]


def test_merge_tensor_on_cuda_matches_cpu():
    torch.manual_seed(0)
    w = torch.randn(256, 128, dtype=torch.bfloat16)
    a, b = torch.randn(8, 128), torch.randn(256, 8)
    t = [mergemath.Term("lora", 0.5, (a, b), ("down", "up"))]
    ref = (w.double() + 0.5 * (b.double() @ a.double())).to(torch.bfloat16)
    out = mergemath.merge_tensor(w.cuda(), t).cpu()
    assert (out.view(torch.int16) == ref.view(torch.int16)).float().mean() > 0.999


@pytest.mark.ray
def test_end_to_end_on_gpu(tiny_base, tiny_factors, tmp_path):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    lora = str(tmp_path / "l.pth")
    write_lora(lora, tiny_factors)
    rep = distmerge.merge(tiny_base, [lora], str(tmp_path / "out"), device="cuda", dtype="bf16", num_cpus=2)
    assert {u.device for u in rep.units} == {"cuda"}
    ref = reference_merge(load_checkpoint(tiny_base), lora_terms(tiny_factors, 1.0), out_dtype=torch.bfloat16)
    assert_close_to_reference(load_checkpoint(str(tmp_path / "out")), ref)
