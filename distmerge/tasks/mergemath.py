"""The merge arithmetic, pure: no files, no Ray.

``W' = round(W + Σ coef_i · ΔW_i)``, every term upcast to float32 (float64 for a float64 base),
one rounding to the output dtype at the end. ΔW per kind (roles in brackets):

* ``lora`` [down A, up B, optional mid]: ``B.flatten(1) @ A.flatten(1)`` reshaped to W — Linear,
  1×1 and k×k Conv2d/Conv3d alike (A is a conv with W's kernel, B a 1×1 conv); with ``mid`` (LoCon
  Tucker) ``ΔW[o,i,…] = Σ_ab B[o,a]·mid[a,b,…]·A[b,i]``;
* ``loha`` [hada_w1_a/b, hada_w2_a/b, optional hada_t1/t2]: ``(w1a@w1b) ⊙ (w2a@w2b)``;
* ``lokr`` [lokr_w1 or w1_a/w1_b, lokr_w2 or w2_a/w2_b, optional lokr_t2]: ``kron(w1, w2)``;
* ``experts`` [down A ``(E·r, in)``, up B ``(out, E·r)``, both grouped by expert]: a fused 3-D
  expert tensor, ``ΔW[e] = B[:, e·r:(e+1)·r] @ A[e·r:(e+1)·r]``;
* ``diff`` [the full ΔW]; ``set`` [a replacement: W' = T].

``transpose`` uses ΔWᵀ (PEFT embeddings and ``fan_in_fan_out``). A ``dora`` term rescales
``W + coef·ΔW`` by its magnitude: PEFT ``m / ‖W+coef·ΔW‖_row``; LyCORIS ``dora_scale / ‖·‖`` over
the output (shape ``[out,1,…]``) or input (``[1,in,…]``) axis, blended by strength.

Example:
    >>> import torch
    >>> w = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    >>> a = torch.tensor([[1.0, 0.0]])          # A: [r=1, in=2]
    >>> b = torch.tensor([[2.0], [0.0]])        # B: [out=2, r=1]
    >>> merge_tensor(w, [Term("lora", 0.5, (a, b), ("down", "up"))]).tolist()
    [[2.0, 2.0], [3.0, 4.0]]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from distmerge.formats.kinds import FULL_KINDS, DeltaKind, Role

__all__ = [
    "Term",
    "compute_dtype",
    "merge_tensor",
    "lora_delta",
    "experts_delta",
    "delta_weight",
    "NonFiniteError",
    "OutOfRangeError",
]


class NonFiniteError(ValueError):
    """The merged values contain NaN/Inf, or overflow the output dtype."""


class OutOfRangeError(NonFiniteError):
    """The merged values are finite but beyond the output dtype's largest value."""


@dataclass(frozen=True)
class Term:
    """One delta with its tensors loaded, ``factors[i]`` playing ``roles[i]``."""

    kind: str  #: a ``DeltaKind``
    coef: float
    factors: tuple[torch.Tensor, ...]
    roles: tuple[str, ...] = ()  #: ``Role`` values
    transpose: bool = False
    dora: str = ""
    strength: float = 1.0  #: the user's weight (LyCORIS DoRA blends its rescale by it)

    def get(self, role: str) -> torch.Tensor | None:
        if not self.roles:  # positional: lora (A, B), diff/set (D,)
            names = _POSITIONAL.get(self.kind, ())
            return dict(zip(names, self.factors)).get(role)
        return dict(zip(self.roles, self.factors)).get(role)

    def factor(self, role: str) -> torch.Tensor:
        """The factor of ``role``, which the term's kind requires (``KeyError`` if absent)."""
        f = self.get(role)
        if f is None:
            raise KeyError(role)
        return f


#: the roles of a term's factors given without roles, by kind
_POSITIONAL: dict[str, tuple[str, ...]] = {
    DeltaKind.LORA: (Role.DOWN, Role.UP),
    DeltaKind.DIFF: (Role.DIFF,),
    DeltaKind.SET: (Role.SET,),
}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 tensors, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def lora_delta(
    a: torch.Tensor, b: torch.Tensor, shape: Sequence[int], *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """ΔW = B.flatten(1) @ A.flatten(1), reshaped to ``shape``, computed in ``dtype``.

    >>> a = torch.ones(2, 3, 1, 1); b = torch.ones(4, 2, 1, 1)
    >>> lora_delta(a, b, (4, 3, 1, 1))[0, 0].tolist()
    [[2.0]]
    """
    return (b.flatten(1).to(dtype) @ a.flatten(1).to(dtype)).reshape(tuple(shape))


def experts_delta(a: torch.Tensor, b: torch.Tensor, experts: int) -> torch.Tensor:
    """ΔW of a fused expert tensor, ``(E, out, in)``: expert ``e`` takes rows ``e·r…(e+1)·r`` of A
    and the same columns of B.

    >>> a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])   # E=2, r=1, in=2
    >>> b = torch.tensor([[1.0, 2.0]])               # out=1
    >>> experts_delta(a, b, 2).tolist()
    [[[1.0, 0.0]], [[0.0, 2.0]]]
    """
    r = a.shape[0] // experts
    return torch.einsum("oer,eri->eoi", b.reshape(b.shape[0], experts, r), a.reshape(experts, r, a.shape[1]))


def _mm(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x.flatten(1) @ y.flatten(1)


def delta_weight(
    t: Term, shape: Sequence[int], *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The full, unscaled ΔW of ``t`` for a base tensor of ``shape`` (transposed if ``t.transpose``)."""

    def f(role: str) -> torch.Tensor:
        x = t.get(role)
        assert x is not None, role
        return x.to(device=device, dtype=dtype)

    shape = tuple(shape)
    target = (shape[1], shape[0]) + shape[2:] if t.transpose else shape
    if t.kind in FULL_KINDS:
        d = f(t.kind) if t.get(t.kind) is not None else t.factors[0].to(device=device, dtype=dtype)
        return d.reshape(shape)
    if t.kind == DeltaKind.EXPERTS:
        d = experts_delta(f("down"), f("up"), shape[0])
        return d.transpose(1, 2).reshape(shape) if t.transpose else d.reshape(shape)
    if t.kind == DeltaKind.LORA:
        a, b = f("down"), f("up")
        if t.get("mid") is not None:
            mid = f("mid")
            d = torch.einsum("oa,ab...,bi->oi...", b.flatten(1), mid, a.flatten(1))
        else:
            d = _mm(b, a)
    elif t.kind == DeltaKind.LOHA:
        if t.get("hada_t1") is not None:
            m1 = torch.einsum("ijkl,jr,ip->prkl", f("hada_t1"), f("hada_w1_b"), f("hada_w1_a"))
            m2 = torch.einsum("ijkl,jr,ip->prkl", f("hada_t2"), f("hada_w2_b"), f("hada_w2_a"))
            d = m1 * m2
        else:
            d = _mm(f("hada_w1_a"), f("hada_w1_b")) * _mm(f("hada_w2_a"), f("hada_w2_b"))
    elif t.kind == DeltaKind.LOKR:
        w1 = f("lokr_w1") if t.get("lokr_w1") is not None else _mm(f("lokr_w1_a"), f("lokr_w1_b"))
        if t.get("lokr_w2") is not None:
            w2 = f("lokr_w2")
        elif t.get("lokr_t2") is not None:
            w2 = torch.einsum("ijkl,ip,jr->prkl", f("lokr_t2"), f("lokr_w2_a"), f("lokr_w2_b"))
        else:
            w2 = _mm(f("lokr_w2_a"), f("lokr_w2_b"))
        if len(target) > 2:  # conv: w1 [a, c] acts on channels only
            w1 = w1.reshape(w1.shape[0], w1.shape[1], *([1] * (len(target) - 2)))
            w2 = w2.reshape(w2.shape[0], -1, *target[2:]) if w2.dim() == 2 else w2
        d = torch.kron(w1, w2)
    else:
        raise ValueError(f"unknown delta kind {t.kind!r}")
    d = d.reshape(target)
    if t.transpose:
        d = d.transpose(0, 1)
    return d.reshape(shape)


def _apply_dora(acc: torch.Tensor, t: Term, d: torch.Tensor) -> None:
    wc = acc + t.coef * d
    cdt = acc.dtype
    if t.dora == "peft":  # norm per output feature: rows of W, or columns of a [in, out] Conv1D
        m = t.factor("magnitude").to(device=acc.device, dtype=cdt).reshape(-1)
        if t.transpose:
            scale = (m / wc.norm(dim=0)).reshape((1, -1) + (1,) * (acc.dim() - 2))
        else:
            scale = (m / wc.reshape(wc.shape[0], -1).norm(dim=1)).reshape((-1,) + (1,) * (acc.dim() - 1))
    else:  # lycoris dora_scale: [out, 1, …] (norm per output row) or [1, in, …] (per input column)
        ds = t.factor("dora_scale").to(device=acc.device, dtype=cdt)
        if ds.numel() == acc.shape[0] and (ds.dim() < 2 or ds.shape[0] == acc.shape[0]):
            norm = wc.reshape(wc.shape[0], -1).norm(dim=1).reshape((-1,) + (1,) * (acc.dim() - 1))
            scale = ds.reshape(norm.shape) / (norm + torch.finfo(cdt).eps)
        else:
            norm = wc.transpose(0, 1).reshape(wc.shape[1], -1).norm(dim=1)
            norm = norm.reshape((1, -1) + (1,) * (acc.dim() - 2))
            scale = ds.reshape(norm.shape) / (norm + torch.finfo(cdt).eps)
        scale = t.strength * (scale - 1) + 1
    acc.copy_(wc * scale)


def merge_tensor(
    w: torch.Tensor,
    terms: Sequence[Term],
    *,
    out_dtype: torch.dtype | None = None,
    inplace: bool = False,
    check_finite: bool = False,
    acc: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return ``W + Σ coef·ΔW`` accumulated in float32 and rounded once to ``out_dtype``.

    Args:
        w: the base tensor (any float dtype, any device).
        terms: the deltas, applied in order (``set`` terms replace the accumulator).
        out_dtype: result dtype; defaults to ``w.dtype``.
        inplace: allow writing into ``w`` when it already has the compute dtype (saves a copy).
        check_finite: raise ``NonFiniteError`` if a value is NaN/Inf or beyond the output dtype's
            range (one ``aminmax`` pass over the float32 accumulator, which NaN propagates through).
        acc: a preallocated accumulator (compute dtype, W's shape) to use instead of a new one.
        out: a preallocated result (``out_dtype``, W's shape) to round into instead of a new one.

    Plain LoRA terms go straight into the accumulator with ``addmm_`` (no ΔW temporary).
    """
    cdt = compute_dtype(w.dtype)
    if acc is not None:
        acc.copy_(w)
    elif inplace and w.dtype == cdt and w.is_contiguous():
        acc = w
    else:
        acc = w.to(cdt, copy=True).contiguous()
    flat = acc.view(acc.shape[0], -1) if acc.dim() >= 1 else acc.view(1, 1)
    for t in terms:
        if t.kind == DeltaKind.SET:
            acc.copy_(delta_weight(t, acc.shape, dtype=cdt, device=acc.device))
        elif t.kind == DeltaKind.LORA and not t.transpose and not t.dora and t.get("mid") is None:
            a2 = t.factor("down").flatten(1).to(device=acc.device, dtype=cdt)
            b2 = t.factor("up").flatten(1).to(device=acc.device, dtype=cdt)
            flat.addmm_(b2, a2, alpha=t.coef)
        else:
            d = delta_weight(t, acc.shape, dtype=cdt, device=acc.device)
            if t.dora:
                _apply_dora(acc, t, d)
            else:
                acc.add_(d, alpha=t.coef)
    out_dtype = out_dtype or w.dtype
    if check_finite and acc.numel():
        lo, hi = torch.aminmax(acc)  # no temporary; NaN propagates into both
        peak = max(-lo.item(), hi.item())
        if not math.isfinite(peak):
            raise NonFiniteError(f"max |value| {peak:.4g} is not finite in {out_dtype}")
        if out_dtype.is_floating_point and peak > torch.finfo(out_dtype).max:
            raise OutOfRangeError(
                f"max |value| {peak:.4g} is beyond the largest {out_dtype} value {torch.finfo(out_dtype).max:g}"
            )
    return out.copy_(acc) if out is not None else acc.to(out_dtype)
