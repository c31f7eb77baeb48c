"""The merge arithmetic, pure: no files, no Ray.

``W' = round(W + Σ coef_i · ΔW_i)``, with every term upcast to float32 (float64 for a float64
base) and one rounding to the output dtype at the end. For a LoRA pair ΔW = B.flatten(1) @
A.flatten(1) reshaped to W's shape, which covers Linear layers and 1×1 / k×k Conv2d/Conv3d kernels
(the LoRA's A is a conv with W's kernel, B a 1×1 conv).

Example:
    >>> import torch
    >>> w = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    >>> a = torch.tensor([[1.0, 0.0]])          # A: [r=1, in=2]
    >>> b = torch.tensor([[2.0], [0.0]])        # B: [out=2, r=1]
    >>> merge_tensor(w, [Term("lora", 0.5, (a, b))]).tolist()
    [[2.0, 2.0], [3.0, 4.0]]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["Term", "compute_dtype", "merge_tensor", "lora_delta"]


@dataclass(frozen=True)
class Term:
    """One delta with its tensors loaded: ``kind`` ``lora`` (factors A, B) or ``diff`` (D)."""

    kind: str
    coef: float
    factors: tuple[torch.Tensor, ...]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 tensors, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def lora_delta(a: torch.Tensor, b: torch.Tensor, shape: Sequence[int], *,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """ΔW = B.flatten(1) @ A.flatten(1), reshaped to ``shape``, computed in ``dtype``.

    >>> a = torch.ones(2, 3, 1, 1); b = torch.ones(4, 2, 1, 1)
    >>> lora_delta(a, b, (4, 3, 1, 1))[0, 0].tolist()
    [[2.0]]
    """
    return (b.flatten(1).to(dtype) @ a.flatten(1).to(dtype)).reshape(tuple(shape))


def merge_tensor(w: torch.Tensor, terms: Sequence[Term], *, out_dtype: torch.dtype | None = None,
                 inplace: bool = False) -> torch.Tensor:
    """Return ``W + Σ coef·ΔW`` accumulated in float32 and rounded once to ``out_dtype``.

    Args:
        w: the base tensor (any float dtype, any device).
        terms: the deltas, applied in order.
        out_dtype: result dtype; defaults to ``w.dtype``.
        inplace: allow writing into ``w`` when it already has the compute dtype (saves a copy).

    The GEMM goes straight into the accumulator (``addmm_``), so no ΔW temporary is allocated.
    """
    cdt = compute_dtype(w.dtype)
    acc = w if (inplace and w.dtype == cdt and w.is_contiguous()) else w.to(cdt, copy=True).contiguous()
    flat = acc.view(acc.shape[0], -1) if acc.dim() >= 1 else acc.view(1, 1)
    for t in terms:
        if t.kind == "lora":
            a, b = t.factors
            a2 = a.flatten(1).to(device=acc.device, dtype=cdt)
            b2 = b.flatten(1).to(device=acc.device, dtype=cdt)
            flat.addmm_(b2, a2, alpha=t.coef)
        elif t.kind == "diff":
            (d,) = t.factors
            acc.add_(d.to(device=acc.device, dtype=cdt).reshape(acc.shape), alpha=t.coef)
        else:
            raise ValueError(f"unknown delta kind {t.kind!r}")
    return acc.to(out_dtype or w.dtype)
