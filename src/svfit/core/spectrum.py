"""Thin SVD and rank selection: the numerical heart of SVFit, free of any PEFT machinery.

A weight W0 (d_out x d_in) is factored as W0 = U diag(sigma) V^T. SVFit keeps the top-r triplets, where r is the
smallest k whose singular values hold at least a share ``threshold`` of the spectrum ("information"):

* ``energy``  - f(sigma) = sigma^2: share of ||W0||_F^2 (default; optimal in Frobenius norm by Eckart-Young,
  and ||W_e||_F <= sqrt(1 - threshold) * ||W0||_F for the frozen residual).
* ``nuclear`` - f(sigma) = sigma:   share of the nuclear norm ||W0||_*.

The SVD always runs on a float32 (or float64) copy, whatever the storage dtype of the model: half-precision SVD is
either unsupported or inaccurate, and the base weight must never be touched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Union

import torch

Information = Literal["energy", "nuclear"]
RankSpec = Union[int, float, str]  # int: fixed r, float in (0, 1): threshold, "full": whole spectrum

INFORMATION_MEASURES = ("energy", "nuclear")
SVD_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class TruncatedSVD:
    """Top-r singular triplets of a (d_out, d_in) matrix, plus what is needed to describe the truncation."""

    U: torch.Tensor  # (d_out, r)
    S: torch.Tensor  # (r,) descending
    V: torch.Tensor  # (d_in, r)
    n: int  # min(d_out, d_in): the length of the full spectrum
    energy_kept: float  # sum of kept sigma^2 / ||W||_F^2
    nuclear_kept: float | None  # sum of kept sigma / ||W||_* (None if the full spectrum was not computed)
    min_gap: float  # smallest gap sigma_i - sigma_{i+1} around the kept block, relative to sigma_1
    spectrum: torch.Tensor | None = None  # the whole spectrum (CPU), when the SVD computed it: see svfit.core.drift

    @property
    def r(self) -> int:
        return self.S.numel()


def cumulative_share(S: torch.Tensor, information: Information = "energy") -> torch.Tensor:
    """c(k) = sum_{i<=k} f(sigma_i) / sum_i f(sigma_i), in float64 so that thresholds near 1 stay meaningful."""
    f = _information_weights(S, information)
    total = f.sum()
    if total <= 0:
        return torch.zeros_like(f)
    return torch.cumsum(f, 0) / total


def rank_for_threshold(S: torch.Tensor, threshold: float, information: Information = "energy") -> int:
    """Smallest k with c(k) >= threshold. Zero for an all-zero spectrum (nothing to adapt)."""
    _check_threshold(threshold)
    share = cumulative_share(S, information)
    if share.numel() == 0 or share[-1] <= 0:
        return 0
    # a tiny slack so that threshold=1.0 is met despite rounding in the cumulative sum
    target = torch.tensor(threshold - 1e-12, dtype=share.dtype, device=share.device)
    k = int(torch.searchsorted(share, target).item()) + 1
    return min(k, S.numel())


def resolve_rank(spec: RankSpec, S: torch.Tensor, information: Information = "energy") -> int:
    """Turn a rank specification into a concrete r for the given (full, descending) spectrum."""
    n = S.numel()
    if spec == "full":
        return n
    if isinstance(spec, bool):
        raise TypeError(f"rank must be an int, a float threshold in (0, 1] or 'full', got {spec!r}")
    if isinstance(spec, int):
        # 0 is valid here: it is what an all-zero weight records, and a checkpoint must reload it
        if spec < 0:
            raise ValueError(f"a fixed rank must be >= 0, got {spec}")
        return min(spec, n)
    if isinstance(spec, float):
        return rank_for_threshold(S, spec, information)
    raise TypeError(f"rank must be an int, a float threshold in (0, 1] or 'full', got {spec!r}")


def thin_svd(
    W: torch.Tensor,
    rank: RankSpec,
    information: Information = "energy",
    *,
    method: Literal["full", "lowrank"] = "full",
    dtype: torch.dtype = torch.float32,
    niter: int = 4,
    oversample: int = 8,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> TruncatedSVD:
    """Top-r thin SVD of ``W`` (which is copied, never modified), with r resolved from ``rank``.

    ``method="lowrank"`` uses a seeded randomized SVD (Halko et al.) with ``niter`` power iterations; it only pays off
    when r is much smaller than min(d_out, d_in). For a threshold it grows the sketch until the kept energy reaches the
    threshold, measured against ||W||_F^2, which is exact without the full spectrum. The nuclear share needs the whole
    spectrum, so ``information="nuclear"`` with a threshold requires ``method="full"``.
    """
    if W.dim() != 2:
        raise ValueError(f"thin_svd expects a matrix, got shape {tuple(W.shape)}")
    if information not in INFORMATION_MEASURES:
        raise ValueError(f"information must be one of {INFORMATION_MEASURES}, got {information!r}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"the SVD runs in float32 or float64, got {dtype}")
    if not (W.is_floating_point()):
        raise TypeError(f"cannot take the SVD of a {W.dtype} tensor; dequantize the weight first")
    # no copy when W already has the SVD's dtype and device: the SVD reads its input and never writes it, and a
    # second copy of the largest matrix is what makes init memory spike
    A = W.detach().to(device=device if device is not None else W.device, dtype=dtype)
    d_out, d_in = A.shape
    n = min(d_out, d_in)

    if method == "full" or rank == "full":
        U, S, Vh = torch.linalg.svd(A, full_matrices=False)
        r = resolve_rank(rank, S, information)
        fro2 = float(torch.sum(S.double() ** 2))  # = ||W||_F^2 given the whole spectrum
        return _truncate(U, S, Vh.mH, r, n, fro2, full_spectrum=True)
    fro2 = float(torch.linalg.vector_norm(A, dtype=torch.float64) ** 2)
    if method != "lowrank":
        raise ValueError(f"svd method must be 'full' or 'lowrank', got {method!r}")

    if isinstance(rank, float) and information == "nuclear":
        raise ValueError(
            "information='nuclear' needs the whole spectrum to measure a share of it; use svd='full' "
            "(or a fixed integer r with svd='lowrank')"
        )
    if isinstance(rank, float):
        _check_threshold(rank)
        q = min(n, max(16, n // 8))
    else:
        q = min(n, resolve_rank(rank, torch.zeros(n)) + oversample)  # a fixed r needs no spectrum to resolve
    while True:
        U, S, V = _seeded_svd_lowrank(A, q, niter, seed)
        if isinstance(rank, int):
            r = min(rank, S.numel())
            break
        if fro2 == 0.0:
            r = 0
            break
        share = torch.cumsum(S.double() ** 2, 0) / fro2
        hit = torch.nonzero(share >= rank - 1e-12)
        if hit.numel() > 0 and (int(hit[0]) + 1 + oversample <= q or q == n):
            r = int(hit[0]) + 1
            break
        if q == n:  # the sketch is the whole space: rounding kept us just below the threshold
            r = n
            break
        q = min(n, 2 * q)
    return _truncate(U, S, V, r, n, fro2, full_spectrum=(q == n))


def spectrum_shares(S: torch.Tensor, r: int) -> tuple[float, float]:
    """(energy share, nuclear share) held by the top r values of a full spectrum."""
    e = cumulative_share(S, "energy")
    c = cumulative_share(S, "nuclear")
    if r == 0 or e.numel() == 0:
        return 0.0, 0.0
    return float(e[r - 1]), float(c[r - 1])


def _truncate(U, S, V, r: int, n: int, fro2: float, *, full_spectrum: bool) -> TruncatedSVD:
    S64 = S.double()
    energy_kept = float((S64[:r] ** 2).sum() / fro2) if fro2 > 0 else 0.0
    nuclear_kept = None
    if full_spectrum:
        total = float(S64.sum())
        nuclear_kept = float(S64[:r].sum() / total) if total > 0 else 0.0
    # Singular vectors are defined only up to rotations inside blocks of equal singular values; the gaps around the
    # kept block say whether a recomputed SVD is guaranteed to give back the same delta weight (see save_bases).
    block = S64[: min(r + 1, S64.numel())]
    gaps = block[:-1] - block[1:]
    scale = float(S64[0]) if S64.numel() and S64[0] > 0 else 1.0
    min_gap = float(gaps.min() / scale) if gaps.numel() else math.inf
    return TruncatedSVD(
        U=U[:, :r].contiguous(),
        S=S[:r].contiguous(),
        V=V[:, :r].contiguous(),
        n=n,
        energy_kept=energy_kept,
        nuclear_kept=nuclear_kept,
        min_gap=min_gap,
        spectrum=S.detach().float().cpu().clone() if full_spectrum else None,
    )


def _seeded_svd_lowrank(A: torch.Tensor, q: int, niter: int, seed: int):
    # torch.svd_lowrank draws its sketch from the global RNG and takes no generator: fork the RNG so that the result
    # is reproducible and the caller's random stream is left untouched.
    devices = [A.device] if A.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        U, S, V = torch.svd_lowrank(A, q=q, niter=niter)
    return U, S, V


def _information_weights(S: torch.Tensor, information: Information) -> torch.Tensor:
    S = S.double().clamp_min(0)
    if information == "energy":
        return S**2
    if information == "nuclear":
        return S
    raise ValueError(f"information must be one of {INFORMATION_MEASURES}, got {information!r}")


def _check_threshold(threshold: float) -> None:
    if not (0.0 < threshold <= 1.0):
        raise ValueError(f"a spectrum threshold must lie in (0, 1], got {threshold}")
