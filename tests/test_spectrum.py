"""Rank selection and the thin SVD (svfit.core.spectrum)."""

from __future__ import annotations

import pytest
import torch

from svfit.core.spectrum import cumulative_share, rank_for_threshold, resolve_rank, spectrum_shares, thin_svd


def matrix_with_spectrum(sigma, d_out=None, d_in=None, seed=0):
    n = len(sigma)
    d_out, d_in = d_out or n, d_in or n
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(d_out, n, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(d_in, n, generator=g, dtype=torch.float64))
    return (U * torch.tensor(sigma, dtype=torch.float64)) @ V.T


# sigma = 4, 3, 2, 1: energy shares 16/30, 25/30, 29/30, 1; nuclear shares 4/10, 7/10, 9/10, 1
SIGMA = torch.tensor([4.0, 3.0, 2.0, 1.0])


@pytest.mark.parametrize(
    "threshold, information, r",
    [
        (0.5, "energy", 1),
        (0.54, "energy", 2),  # 16/30 = 0.533 falls short
        (0.83, "energy", 2),
        (0.9, "energy", 3),
        (0.97, "energy", 4),  # 29/30 = 0.9667 falls short
        (1.0, "energy", 4),
        (0.4, "nuclear", 1),
        (0.5, "nuclear", 2),
        (0.7, "nuclear", 2),
        (0.9, "nuclear", 3),
        (0.95, "nuclear", 4),
    ],
)
def test_threshold_picks_the_smallest_rank_holding_the_share(threshold, information, r):
    assert rank_for_threshold(SIGMA, threshold, information) == r


def test_nuclear_keeps_more_values_than_energy_at_the_same_threshold():
    sigma = torch.linspace(5, 0.1, 100) ** 2
    assert rank_for_threshold(sigma, 0.99, "nuclear") > rank_for_threshold(sigma, 0.99, "energy")


def test_resolve_rank_specs():
    assert resolve_rank("full", SIGMA) == 4
    assert resolve_rank(2, SIGMA) == 2
    assert resolve_rank(10, SIGMA) == 4  # clipped to n
    assert resolve_rank(0.9, SIGMA) == 3
    assert resolve_rank(0, SIGMA) == 0  # what an all-zero weight records; the config refuses r=0 from users
    for bad in (-1, True, "half", None):
        with pytest.raises((ValueError, TypeError)):
            resolve_rank(bad, SIGMA)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        rank_for_threshold(SIGMA, 1.5)


def test_zero_matrix_keeps_nothing():
    assert rank_for_threshold(torch.zeros(5), 0.99) == 0
    svd = thin_svd(torch.zeros(6, 4), 0.99)
    assert svd.r == 0 and svd.U.shape == (6, 0) and svd.V.shape == (4, 0)


@pytest.mark.parametrize("shape", [(12, 12), (20, 8), (8, 20)])
def test_full_spectrum_reconstructs_the_weight(shape):
    torch.manual_seed(0)
    W = torch.randn(*shape)
    svd = thin_svd(W, "full")
    assert svd.r == min(shape) == svd.n
    torch.testing.assert_close((svd.U * svd.S) @ svd.V.T, W, atol=1e-5, rtol=1e-5)
    assert svd.energy_kept == pytest.approx(1.0) and svd.nuclear_kept == pytest.approx(1.0)


def test_threshold_svd_reports_the_share_it_kept_and_bounds_the_residual():
    W = matrix_with_spectrum([4.0, 3.0, 2.0, 1.0, 0.5, 0.25], d_out=10, d_in=7).float()
    svd = thin_svd(W, 0.9, "energy")
    assert svd.r == 3
    energy, nuclear = spectrum_shares(torch.linalg.svdvals(W), 3)
    assert svd.energy_kept == pytest.approx(energy) and svd.nuclear_kept == pytest.approx(nuclear)
    residual = W - (svd.U * svd.S) @ svd.V.T
    assert residual.norm() <= (1 - 0.9) ** 0.5 * W.norm() + 1e-6  # ||W_e||_F <= sqrt(1 - tau) ||W0||_F


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_are_factored_in_float32(dtype):
    W = torch.randn(16, 24).to(dtype)
    svd = thin_svd(W, "full")
    assert svd.U.dtype == torch.float32 and svd.S.dtype == torch.float32
    torch.testing.assert_close((svd.U * svd.S) @ svd.V.T, W.float(), atol=1e-5, rtol=1e-5)
    assert W.dtype == dtype  # the input was not modified


def test_float64_option():
    W = torch.randn(10, 6)
    svd = thin_svd(W, "full", dtype=torch.float64)
    assert svd.U.dtype == torch.float64
    with pytest.raises(ValueError, match="float32 or float64"):
        thin_svd(W, "full", dtype=torch.float16)


def test_integer_weights_are_refused():
    with pytest.raises(TypeError, match="dequantize"):
        thin_svd(torch.ones(4, 4, dtype=torch.int8), "full")


def test_lowrank_is_seeded_accurate_and_leaves_the_global_rng_alone():
    W = matrix_with_spectrum([10.0 * 0.7**i for i in range(60)], d_out=80, d_in=60).float()
    exact = thin_svd(W, 8)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = thin_svd(W, 8, method="lowrank", seed=5, niter=4)
    assert torch.equal(torch.get_rng_state(), state)
    b = thin_svd(W, 8, method="lowrank", seed=5, niter=4)
    assert torch.equal(a.S, b.S) and torch.equal(a.U, b.U)
    torch.testing.assert_close(a.S, exact.S, rtol=1e-4, atol=1e-5)
    # singular vectors agree up to sign
    torch.testing.assert_close((a.U * exact.U).sum(0).abs(), torch.ones(8), atol=1e-3, rtol=0)


def test_lowrank_threshold_grows_the_sketch_until_the_energy_is_reached():
    W = matrix_with_spectrum([10.0 * 0.9**i for i in range(100)], d_out=120, d_in=100).float()
    exact = thin_svd(W, 0.99)
    fast = thin_svd(W, 0.99, method="lowrank", niter=6)
    assert abs(fast.r - exact.r) <= 1
    assert fast.energy_kept >= 0.99 - 1e-4
    with pytest.raises(ValueError, match="nuclear"):
        thin_svd(W, 0.99, "nuclear", method="lowrank")


def test_cumulative_share_is_monotone_and_ends_at_one():
    share = cumulative_share(torch.rand(50).sort(descending=True).values)
    assert torch.all(share[1:] >= share[:-1]) and share[-1] == pytest.approx(1.0)


def test_min_gap_flags_repeated_singular_values():
    Q, _ = torch.linalg.qr(torch.randn(8, 8))
    assert thin_svd(Q, 4).min_gap < 1e-5  # orthogonal: all sigma = 1
    assert thin_svd(matrix_with_spectrum([5, 4, 3, 2, 1.0]).float(), 3).min_gap > 0.1
