"""How far a recomputed SVD can move an adapter's update, so that a saved adapter knows which bases it must carry.

An SVFit file holds the trained shift c of the kept singular values, and U_r, V_r are recomputed from W0 at load.
On the same machine that recomputation is bit-exact (the SVD runs single-threaded, see ``svfit.core.factorize``).
Another LAPACK, CPU or GPU computes the SVD of W0 + E instead, with a backward error E of about eps * sigma_1 per
entry direction, and first-order perturbation theory says by how much each pair of singular vectors (i, j) rotates:

    theta_ij ~ eps * sigma_1 / |sigma_i - sigma_j|.

The update Delta W = sum_i c_i u_i v_i^T changes under that rotation by (c_i - c_j) theta_ij when both i and j are
kept, and by c_i theta_ij when j is dropped, so the relative drift of Delta W is about

    sqrt( sum_{i kept} sum_{j != i} (c_i - c_j [j kept])^2 theta_ij^2 ) / ||c||.

It is large only where a gap is small *and* the shift differs across it: near-repeated singular values matter only
if training moved them apart. Calibrated against a float64 recomputation (standing in for another LAPACK) of
MiniLM-L6's query/value weights at the 0.99 threshold: the measured drift was 4e-5 to 1.8e-4, and eps_eff =
drift / (estimate at eps = 1) ranged from 1.5e-8 to 9e-8 over 24 cases; ``EPS_FACTOR`` * float32 eps = 1.2e-7 bounds
all of them. The same formula covers one-basis storage (its measured drift was identical).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

RELOAD_DRIFT_BOUND = 1e-3  # ||Delta W_reloaded - Delta W|| / ||Delta W|| a recomputing module may have
EPS_FACTOR = 2.0  # eps_eff = EPS_FACTOR * machine eps of the SVD's dtype (see the calibration above)
_CHUNK = 1 << 22  # entries of the (r, n) pair matrix handled at once


def reload_drift(spectrum: torch.Tensor, shift: torch.Tensor, svd_dtype: torch.dtype = torch.float32,
                 exact: Optional[torch.Tensor] = None) -> float:
    """Estimated relative change of Delta W = U_r diag(shift) V_r^T when U_r, V_r are recomputed by another SVD.

    ``spectrum`` is the full descending spectrum of W0 (the kept values first), ``shift`` the r trained shifts,
    ``exact`` an optional bool mask over the kept values whose singular vectors the checkpoint carries (see
    ``columns_to_save``)."""
    rows = _row_drifts(spectrum, shift, svd_dtype, exact)
    norm2 = float((shift.detach().double() ** 2).sum())
    return 0.0 if rows is None or norm2 == 0.0 else math.sqrt(float(rows.sum()) / norm2)


def _row_drifts(spectrum: torch.Tensor, shift: torch.Tensor, svd_dtype: torch.dtype,
                exact: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Each kept value's squared contribution to ||Delta W_reloaded - Delta W||^2 (zero for carried ones); None when
    there is nothing to move. A recomputed pair i, j rotates into each other by theta_ij; the shifts cancel across
    the pair, (c_i - c_j) theta_ij, only when both are recomputed, and then each row counts the pair once. A carried
    vector stays put, so a recomputed neighbour moves Delta W by c_i theta_ij, counted twice here since the carried
    row counts nothing (a float64 check of one carried member of a close pair measured twice the once-counted
    square). Exactly repeated values with equal shifts move nothing (0, not 0 * inf)."""
    S = spectrum.detach().double().cpu()
    c = shift.detach().double().cpu()
    r, n = c.numel(), S.numel()
    if r == 0 or n == 0 or float(S[0]) == 0.0 or float((c**2).sum()) == 0.0:
        return None
    eps = EPS_FACTOR * torch.finfo(svd_dtype).eps
    carried = torch.zeros(r, dtype=torch.bool) if exact is None else exact.detach().cpu().bool()
    partner = torch.zeros(n, dtype=torch.float64)  # what cancels across a pair: the partner's shift if recomputed
    partner[:r] = torch.where(carried, torch.zeros_like(c), c)
    out = torch.zeros(r, dtype=torch.float64)
    rows = max(1, _CHUNK // n)
    for start in range(0, r, rows):
        i = torch.arange(start, min(r, start + rows))
        gap = (S[i, None] - S[None, :]).abs()
        gap[torch.arange(i.numel()), i] = math.inf  # a value does not rotate into itself
        theta = eps * float(S[0]) / gap
        coef = c[i, None] - partner[None, :]
        term = torch.where(coef == 0, torch.zeros_like(theta), (coef * theta) ** 2)
        term[:, :r][:, carried] *= 2.0
        out[i] = term.sum(1)
    out[carried] = 0.0
    return out


def columns_to_save(spectrum: torch.Tensor, shift: torch.Tensor, svd_dtype: torch.dtype = torch.float32,
                    bound: float = RELOAD_DRIFT_BOUND, max_share: float = 0.25) -> Optional[torch.Tensor]:
    """The kept singular vectors (indices, ascending) a checkpoint must carry so that the others, recomputed
    elsewhere, keep Delta W within ``bound``: None when none are needed, all r when more than ``max_share`` of them
    would be (then carrying whole bases is as cheap and simpler).

    Greedy: carry the largest contributors until the rest fit the bound, then re-estimate (carrying a vector takes
    away the cancellation its near-repeated partners had, so they may need carrying too)."""
    c = shift.detach().double().cpu()
    r = c.numel()
    norm2 = float((c**2).sum())
    budget = bound**2 * norm2
    carried = torch.zeros(r, dtype=torch.bool)
    for _ in range(8):
        rows = _row_drifts(spectrum, shift, svd_dtype, carried)
        if rows is None or float(rows.sum()) <= budget:
            break
        order = torch.argsort(rows, descending=True)
        remaining = float(rows.sum()) - torch.cumsum(rows[order], 0)
        take = int(torch.searchsorted(-remaining, torch.tensor(-budget, dtype=torch.float64))) + 1
        carried[order[:take]] = True
        if int(carried.sum()) > max_share * r:
            return torch.arange(r)
    else:
        return torch.arange(r)
    return torch.nonzero(carried).flatten() if bool(carried.any()) else None
