"""The extraction math (``tasks/lowrank.py``) on small hand-made matrices: exact and randomized SVD,
rank and energy choice, the predicted error against the measured one. No Ray, no files."""

from __future__ import annotations

import math

import pytest
import torch

from distmerge.tasks import lowrank
from distmerge.tasks.lowrank import (
    choose_rank,
    low_rank,
    predicted_error,
    randomized_svd,
    relative_error,
    retained_energy,
    squared_norm,
    uses_exact,
)


def _spectrum(m: int, n: int, s: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """An ``m × n`` matrix with singular values ``s`` and random singular vectors."""
    g = torch.Generator().manual_seed(seed)
    k = len(s)
    u = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q
    return ((u * s.double()) @ v.T).float()


def _power_law(m: int, n: int, alpha: float, seed: int = 0) -> torch.Tensor:
    k = min(m, n)
    return _spectrum(m, n, torch.arange(1, k + 1, dtype=torch.float64) ** -alpha, seed)


@pytest.fixture
def randomized(monkeypatch):
    """Every matrix of these tests is small; make them go through the randomized SVD anyway."""
    monkeypatch.setattr(lowrank, "SMALL_EXACT", 0)


def test_hand_computed_diagonal():
    dw = torch.tensor([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0]])  # energies 9, 4, 1 of 14
    lr = low_rank(dw, rank=2)
    assert lr.rank == 2 and lr.method == "exact"
    torch.testing.assert_close(lr.up @ lr.down, torch.diag(torch.tensor([3.0, 2.0, 0.0])))
    assert lr.energy == pytest.approx(13 / 14) and lr.predicted_error == pytest.approx(math.sqrt(1 / 14))
    # √S in both factors: each column of B has the norm of the matching row of A
    torch.testing.assert_close(lr.up.norm(dim=0), lr.down.norm(dim=1))
    torch.testing.assert_close(lr.up.norm(dim=0) ** 2, torch.tensor([3.0, 2.0]))
    assert low_rank(dw, energy=0.9).rank == 2 and low_rank(dw, energy=0.6).rank == 1
    assert low_rank(dw, energy=0.99, rank=1).rank == 1  # the rank caps the energy


def test_choose_rank_and_energy_helpers():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])  # 16, 4, 1, 1 of 22
    assert [choose_rank(s, 22.0, rank=None, energy=e) for e in (0.5, 16 / 22, 0.9, 21 / 22, 1.0)] == [1, 1, 2, 3, 4]
    assert choose_rank(s, 22.0, rank=9, energy=None) == 4  # never beyond the values there are
    assert retained_energy(s, 2, 22.0) == pytest.approx(20 / 22)
    assert retained_energy(s, 2, 0.0) == 1.0
    assert predicted_error(0.96) == pytest.approx(0.2)
    assert squared_norm(torch.arange(6.0).reshape(3, 2)) == pytest.approx(55.0)


def test_exactly_low_rank_matrix_is_recovered_to_float32_precision(randomized):
    g = torch.Generator().manual_seed(1)
    b, a = torch.randn(300, 6, generator=g), torch.randn(6, 200, generator=g)
    dw = b @ a
    for exact in (False, True):
        lr = low_rank(dw, rank=6, exact=exact, seed=3)
        assert lr.method == ("exact" if exact else "randomized") and lr.rank == 6
        err = relative_error(dw, lr.up, lr.down)
        assert err < 2e-6, (exact, err)
        assert lr.predicted_error < 1e-3 and lr.energy > 1 - 1e-6


def test_randomized_retained_energy_within_one_percent_of_exact(randomized):
    """Power-law spectra σᵢ = i^-α from flat-ish (0.3) to steep (1.0), ranks 16 and 32."""
    for alpha in (0.3, 0.6, 1.0):
        dw = _power_law(600, 400, alpha, seed=int(alpha * 10))
        for rank in (16, 32):
            ex = low_rank(dw, rank=rank, exact=True)
            rn = low_rank(dw, rank=rank, seed=7)
            assert rn.method == "randomized" and ex.method == "exact"
            assert rn.energy <= ex.energy + 1e-5  # a projection never keeps more than the optimum
            assert (ex.energy - rn.energy) / ex.energy < 0.01, (alpha, rank, ex.energy, rn.energy, rn.iterations)
            assert rn.converged and rn.iterations >= 2


def test_randomized_beats_or_matches_torch_svd_lowrank_at_equal_passes(randomized):
    dw = _power_law(500, 400, 0.5, seed=4)
    rn = low_rank(dw, rank=16, seed=1)
    passes = 1 + 2 * rn.iterations  # ours; torch.svd_lowrank(niter=k) makes 2 + 2k passes
    torch.manual_seed(0)
    _, s, _ = torch.svd_lowrank(dw, q=16 + lowrank.oversampling(16), niter=max(0, (passes - 2) // 2))
    total = squared_norm(dw)
    assert rn.energy >= retained_energy(s, 16, total) - 2e-3


def test_predicted_error_is_the_measured_error_of_float32_factors(randomized):
    dw = _power_law(400, 300, 0.7, seed=2)
    for exact in (True, False):
        for rank in (4, 16, 64):
            lr = low_rank(dw, rank=rank, exact=exact, seed=5)
            measured = relative_error(dw, lr.up, lr.down)
            assert measured == pytest.approx(lr.predicted_error, rel=1e-3, abs=1e-5), (exact, rank)
    errs = [low_rank(dw, rank=r, exact=True).predicted_error for r in (2, 4, 8, 16, 32)]
    assert errs == sorted(errs, reverse=True) and errs[-1] < errs[0]


def test_energy_mode_picks_the_smallest_rank_and_widens_the_sketch(randomized):
    s = torch.tensor([2.0**-i for i in range(40)], dtype=torch.float64)  # energies 4^-i
    dw = _spectrum(700, 500, s, seed=6)
    total = float((s**2).sum())
    for e in (0.5, 0.9, 0.999, 0.99999):  # (float32 singular values resolve energies to ~1e-6)
        want = int(torch.searchsorted(torch.cumsum(s**2, 0) / total, torch.tensor(e - 1e-12)).item()) + 1
        lr = low_rank(dw, energy=e, seed=2)
        assert lr.rank == want and lr.energy >= e - 1e-6, (e, lr.rank, want)
    # a flat spectrum needs more than the first sketch holds: it widens (or goes exact), never stops short
    flat = _power_law(300, 260, 0.05, seed=8)
    lr = low_rank(flat, energy=0.8, seed=2)
    assert lr.energy >= 0.8 - 1e-6 and lr.rank > lowrank.ENERGY_START_RANK
    assert low_rank(flat, energy=0.8, rank=10).rank == 10


def test_deterministic_for_a_seed_and_zero_matrix(randomized):
    dw = _power_law(300, 250, 0.5, seed=9)
    a, b = low_rank(dw, rank=8, seed=11), low_rank(dw, rank=8, seed=11)
    assert torch.equal(a.up, b.up) and torch.equal(a.down, b.down)
    z = low_rank(torch.zeros(40, 30), rank=4)
    assert z.energy == 1.0 and z.predicted_error == 0.0 and float((z.up @ z.down).abs().max()) == 0.0
    assert relative_error(torch.zeros(3, 3), torch.zeros(3, 1), torch.zeros(1, 3)) == 0.0


def test_randomized_svd_factors_are_a_projection(randomized):
    dw = _power_law(200, 150, 0.4, seed=3)
    u, s, vh, it, _ = randomized_svd(dw, 24, rank=16, seed=0, max_iter=3, tol=0.0)
    assert it == 3 and u.shape == (200, 24) and vh.shape == (24, 150)
    torch.testing.assert_close(u.T @ u, torch.eye(24), atol=1e-5, rtol=0)
    torch.testing.assert_close(vh @ vh.T, torch.eye(24), atol=1e-5, rtol=0)
    approx = (u * s) @ vh
    resid = squared_norm(dw - approx)
    assert resid == pytest.approx(squared_norm(dw) - float((s.double() ** 2).sum()), rel=1e-3)


def test_exact_is_chosen_for_small_or_nearly_full_rank():
    assert uses_exact((64, 5120), 64) and uses_exact((5120, 128), 64) and uses_exact((300, 200), 8)
    assert not uses_exact((5120, 5120), 64) and not uses_exact((13824, 5120), 64)
    assert uses_exact((5120, 5120), 2048) and uses_exact((4096, 4096), 8, exact=True)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="2-D"):
        low_rank(torch.ones(5), rank=1)
    with pytest.raises(ValueError, match="rank, an energy"):
        low_rank(torch.ones(3, 3))
