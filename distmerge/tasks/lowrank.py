"""The math of extraction: a float32 ΔW reduced to LoRA factors ``B @ A`` at a rank or an energy.

``low_rank(dw, rank=r)`` returns ``B = U·√S`` (``[out, r]``) and ``A = √S·Vᴴ`` (``[r, in]``), so
``B @ A`` is the best rank-``r`` approximation the SVD found and the scale rule ``alpha / rank``
with ``alpha = rank`` (scale 1) gives it back; the square roots keep both factors in the same range
(good for bf16). ``energy`` picks the smallest rank whose singular values keep that fraction of
``‖ΔW‖²_F`` (capped by ``rank`` when both are given).

The SVD is exact (``torch.linalg.svd``) for small matrices, when ``exact=True`` and when the rank
needed approaches the matrix's own; otherwise it is a randomized SVD (Halko, Martinsson & Tropp
2011, as in ``torch.svd_lowrank``): a Gaussian sketch of ``rank + oversample`` columns and power
iterations with re-orthonormalization, until the energy of the top ``rank`` singular values is
estimated to be within ``tol`` of where further iterations would take it (the increments shrink
about geometrically; at most ``max_iter``). The factors come from the last sketch ``Y = ΔW·Q``
itself (``ΔW ≈ Y·Qᵀ``), one pass over ΔW fewer than ``svd_lowrank``, and the random sketch comes
from a seeded generator, so a retried task computes the same factors.

Either way ``B @ A = ΔW·P`` for an orthogonal projector ``P``, so the retained energy is exactly
``Σ σᵢ² / ‖ΔW‖²_F`` over the kept singular values and the relative Frobenius error of the
approximation is ``√(1 − energy)`` (``predicted_error``), before the factors are rounded to the
output dtype (``relative_error`` measures it after).

Example:
    >>> import torch
    >>> dw = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    >>> lr = low_rank(dw, rank=1)
    >>> lr.rank, round(lr.energy, 4), round(lr.predicted_error, 4)
    (1, 0.9, 0.3162)
    >>> (lr.up @ lr.down).tolist()
    [[3.0, 0.0], [0.0, 0.0]]
    >>> low_rank(dw, energy=0.95).rank
    2
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "LowRank",
    "choose_rank",
    "low_rank",
    "predicted_error",
    "randomized_svd",
    "relative_error",
    "retained_energy",
    "uses_exact",
    "oversampling",
    "squared_norm",
]

#: power iterations of the randomized SVD at most, and the estimated relative energy still to gain
#: (``_remaining``) under which it stops
MAX_ITER = 8
TOL = 2.5e-3
#: matrices with ``m·n·min(m, n)`` at most this are decomposed exactly (it costs about as much)
SMALL_EXACT = 1 << 27
#: the first sketch of an ``energy`` extraction without a rank cap
ENERGY_START_RANK = 64


@dataclass(frozen=True)
class LowRank:
    """Factors of ``ΔW ≈ up @ down`` and how good they are."""

    up: torch.Tensor  #: ``B = U·√S``, ``[m, rank]``, float32
    down: torch.Tensor  #: ``A = √S·Vᴴ``, ``[rank, n]``, float32
    rank: int
    energy: float  #: retained fraction of ``‖ΔW‖²_F`` (1.0 for ΔW = 0)
    total: float  #: ``‖ΔW‖²_F``
    method: str  #: ``exact`` or ``randomized``
    iterations: int = 0  #: power iterations (randomized)
    converged: bool = True  #: the randomized energy settled within ``TOL`` (always True when exact)
    residual: float = 0.0  #: ``‖ΔW − B·A‖²_F`` the SVD predicts (exact: the tail Σ_{i>r} σᵢ², no cancellation)

    @property
    def predicted_error(self) -> float:
        """``‖ΔW − B·A‖_F / ‖ΔW‖_F`` of the float32 factors, as the singular values say."""
        return math.sqrt(self.residual / self.total) if self.total > 0 else 0.0


def predicted_error(energy: float) -> float:
    """The relative Frobenius error ``√(1 − energy)`` of a rank-r truncation keeping ``energy``.

    >>> predicted_error(0.75), predicted_error(1.0)
    (0.5, 0.0)
    """
    return math.sqrt(max(0.0, 1.0 - energy))


def retained_energy(s: torch.Tensor, rank: int, total: float) -> float:
    """``Σ_{i<rank} sᵢ² / total`` (1.0 when ``total`` is 0), clipped to [0, 1].

    >>> retained_energy(torch.tensor([3.0, 1.0]), 1, 10.0)
    0.9
    """
    if total <= 0:
        return 1.0
    return min(1.0, float(s[:rank].double().pow(2).sum()) / total)


def choose_rank(s: torch.Tensor, total: float, *, rank: int | None, energy: float | None) -> int:
    """The rank to keep from singular values ``s`` (descending) of a matrix with ``‖ΔW‖²_F = total``:
    ``rank`` (at most ``len(s)``), or the smallest one keeping ``energy`` of ``total`` (at most
    ``rank``); at least 1.

    >>> s = torch.tensor([4.0, 2.0, 1.0, 1.0])  # energies 16, 4, 1, 1 of 22
    >>> choose_rank(s, 22.0, rank=None, energy=0.9), choose_rank(s, 22.0, rank=1, energy=0.9)
    (2, 1)
    """
    cap = min(rank or len(s), len(s))
    if energy is None:
        return max(1, cap)
    if total <= 0:
        return 1
    cum = torch.cumsum(s.double().pow(2), 0) / total
    hit = int(torch.searchsorted(cum, torch.tensor(energy - 1e-12, dtype=torch.float64)).item()) + 1
    return max(1, min(cap, hit))


def oversampling(rank: int) -> int:
    """Extra sketch columns for a rank-``rank`` randomized SVD: ``max(16, rank // 4)``.

    >>> oversampling(64), oversampling(256)
    (16, 64)
    """
    return max(16, rank // 4)


def uses_exact(shape: tuple[int, int], rank: int, *, exact: bool = False) -> bool:
    """Whether a rank-``rank`` decomposition of a ``shape`` matrix is done exactly: asked for, a
    small matrix, or a sketch (rank + oversampling) of half the matrix's own rank or more.

    >>> uses_exact((5120, 5120), 64), uses_exact((64, 5120), 64), uses_exact((5120, 5120), 64, exact=True)
    (False, True, True)
    """
    m, n = shape
    k = min(m, n)
    return exact or m * n * k <= SMALL_EXACT or 2 * (rank + oversampling(rank)) >= k


def squared_norm(x: torch.Tensor, *, row: int = 4096) -> float:
    """``‖x‖²_F``: float32 norms of rows (of ``x``, or of ``row`` values for a 1-D ``x``) squared and
    summed in float64, accurate to ~1e-8 relative (one float32 reduction over millions of values
    drifts by 1e-3) and as fast as one pass.

    >>> squared_norm(torch.tensor([[3.0, 0.0], [0.0, 4.0]])), round(squared_norm(torch.arange(5.0), row=2), 5)
    (25.0, 30.0)
    """
    flat = x.reshape(-1)
    if x.dim() >= 2 and x.shape[0] > 0:
        rows = [x.reshape(x.shape[0], -1)]
    else:
        cut = flat.numel() - flat.numel() % row
        rows = [flat[:cut].reshape(-1, row), flat[cut:].reshape(1, -1)]
    return sum(float(torch.linalg.vector_norm(r.float(), dim=1).double().pow(2).sum()) for r in rows if r.numel())


def _seeded(n: int, q: int, seed: int, like: torch.Tensor) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(n, q, generator=g, dtype=torch.float32).to(like.device)


def _remaining(energies: list[float]) -> float:
    """The energy the power iterations still have to gain, estimated from the last increments
    (they shrink about geometrically: ``d_k·ρ/(1−ρ)`` with ``ρ = d_k/d_{k−1}``); the last increment
    itself until there are two.

    >>> round(_remaining([0.80, 0.88, 0.89]), 6)  # increments 0.08, 0.01: ρ = 1/8
    0.001429
    """
    d = [b - a for a, b in zip(energies, energies[1:])]
    if not d:
        return math.inf
    if len(d) == 1 or d[-2] <= 0:
        return max(d[-1], 0.0)
    rho = min(max(d[-1] / d[-2], 0.0), 0.95)
    return max(d[-1], 0.0) * rho / (1.0 - rho)


def randomized_svd(
    a: torch.Tensor, q: int, *, rank: int, seed: int = 0, max_iter: int = MAX_ITER, tol: float = TOL
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, bool]:
    """``U [m, q]``, ``S [q]``, ``Vᴴ [q, n]`` of ``a``'s projection on a ``q``-column sketch, with
    power iterations until the top ``rank`` values' energy is estimated to be within ``tol``
    (relative) of where more iterations would take it (``_remaining``), at most ``max_iter``.

    Returns ``(U, S, Vh, iterations, converged)``; ``U·diag(S)·Vh = a·Qz·Qzᵀ`` exactly (``Qz``
    orthonormal), so ``Σ S²`` over any prefix is energy the factors really keep.
    """
    m, n = a.shape
    q = min(q, m, n)
    qz = torch.linalg.qr(_seeded(n, q, seed, a)).Q
    y = a @ qz
    energies: list[float] = []
    converged = False
    while len(energies) < max_iter:
        q_left = torch.linalg.qr(y).Q
        qz = torch.linalg.qr(a.T @ q_left).Q
        y = a @ qz
        energies.append(float(torch.linalg.svdvals(y)[:rank].double().pow(2).sum()))
        if _remaining(energies) <= tol * max(energies[-1], 1e-300):
            converged = True
            break
    u, s, vh = torch.linalg.svd(y, full_matrices=False)
    return u, s, vh @ qz.T, len(energies), converged


def _exact(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.linalg.svd(a, full_matrices=False)


def low_rank(
    dw: torch.Tensor,
    *,
    rank: int | None = None,
    energy: float | None = None,
    exact: bool = False,
    seed: int = 0,
    max_iter: int = MAX_ITER,
    tol: float = TOL,
    total: float | None = None,
) -> LowRank:
    """Reduce the float32 matrix ``dw`` to ``B @ A`` at ``rank``, or at the smallest rank keeping
    ``energy`` of ``‖dw‖²_F`` (capped by ``rank``); see the module docstring for the SVD used.
    ``total`` is ``‖dw‖²_F`` when the caller has it already.

    Raises:
        ValueError: ``dw`` is not a 2-D float tensor, or neither/invalid ``rank``/``energy``.
    """
    if dw.dim() != 2 or not dw.is_floating_point():
        raise ValueError(f"expected a 2-D float matrix, got {tuple(dw.shape)} {dw.dtype}")
    if rank is None and energy is None:
        raise ValueError("give a rank, an energy, or both")
    dw = dw.float()
    total = squared_norm(dw) if total is None else total
    k = min(dw.shape)
    cap = min(rank or k, k)
    want = cap if energy is None or rank is not None else min(ENERGY_START_RANK, k)
    while True:
        if uses_exact((dw.shape[0], dw.shape[1]), want, exact=exact):
            u, s, vh = _exact(dw)
            method, it, converged = "exact", 0, True
            break
        u, s, vh, it, converged = randomized_svd(
            dw, want + oversampling(want), rank=want, seed=seed, max_iter=max_iter, tol=tol
        )
        method = "randomized"
        if energy is None or retained_energy(s, want, total) >= energy or want >= cap:
            break
        want = min(cap, 2 * want)  # the sketch holds too little of the energy asked for: a wider one
    if method == "exact":  # every singular value is known: the tail is exact, and so is the total
        total = float(s.double().pow(2).sum())
    r = min(choose_rank(s, total, rank=cap, energy=energy), len(s))
    kept = float(s[:r].double().pow(2).sum())
    residual = float(s[r:].double().pow(2).sum()) if method == "exact" else max(0.0, total - kept)
    root = s[:r].clamp_min(0).sqrt()
    return LowRank(
        up=(u[:, :r] * root).contiguous(),
        down=(root[:, None] * vh[:r]).contiguous(),
        rank=r,
        energy=1.0 - residual / total if total > 0 else 1.0,
        total=total,
        method=method,
        iterations=it,
        converged=converged,
        residual=residual,
    )


def relative_error(dw: torch.Tensor, up: torch.Tensor, down: torch.Tensor, *, chunk_rows: int = 512) -> float:
    """``‖dw − up @ down‖_F / ‖dw‖_F`` in float32 row chunks (0.0 when ``dw`` is 0), for factors
    as stored (e.g. rounded to bf16): the error a merge of them really makes.

    >>> dw = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    >>> round(relative_error(dw, torch.tensor([[3.0], [0.0]]), torch.tensor([[1.0, 0.0]])), 4)
    0.3162
    """
    up, down = up.to(dw.device, torch.float32), down.to(dw.device, torch.float32)
    num = 0.0
    for r0 in range(0, dw.shape[0], chunk_rows):
        block = torch.addmm(dw[r0 : r0 + chunk_rows].float(), up[r0 : r0 + chunk_rows], down, alpha=-1.0)
        num += squared_norm(block)
    total = squared_norm(dw)
    return math.sqrt(num / total) if total > 0 else 0.0
