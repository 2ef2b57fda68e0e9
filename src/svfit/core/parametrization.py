"""How the trained vector maps to a change of the kept singular values.

Every parametrization is computed in additive form: the adapted weight is

    W = W0 + U_r diag(c) V_r^T,    c = new singular values - sigma_r,

so the frozen residual W_e = W0 - U_r diag(sigma_r) V_r^T is never formed and W0 is never written. Each option
starts from a vector that makes c exactly zero, in any dtype, so the adapted model is bit-identical to the base
model at init.

| name    | trained vector, init | new singular values  | Adam step on sigma_i | weight decay pulls toward  |
|---------|----------------------|----------------------|----------------------|----------------------------|
| delta   | delta = 0            | sigma + delta        | ~ lr (absolute)      | the pre-trained model      |
| sigma   | s = sigma            | s                    | ~ lr (absolute)      | 0 (shrinks the spectrum)   |
| scale   | z = 1                | sigma * z            | ~ lr * sigma_i       | z = 0 (collapses the layer)|

``delta`` is the default: it is the paper's mechanism in exact arithmetic, its init is exact, weight decay on it
means "stay near the pre-trained model", and the published learning-rate priors for singular-value tuning (SVFT,
SVDiff) come from an additive diagonal. ``nonneg`` clamps the new singular values at zero (SVDiff's ReLU).
"""

from __future__ import annotations

from typing import Literal

import torch

Parametrization = Literal["delta", "sigma", "scale"]
PARAMETRIZATIONS = ("delta", "sigma", "scale")


def initial_vector(
    sigma: torch.Tensor, parametrization: Parametrization, random: bool = False, unit: float = 1.0
) -> torch.Tensor:
    """The vector that leaves the model unchanged (or, with ``random``, a reproducible non-identity perturbation
    of relative size ~0.2 drawn from the global RNG, PEFT's ``init_weights=False`` test convention). ``unit`` is
    the delta vector's unit (see ``singular_value_shift``)."""
    sigma = sigma.float()
    eps = 0.2 * torch.randn(sigma.shape, device=sigma.device) if random else torch.zeros_like(sigma)
    if parametrization == "delta":
        return sigma * eps / unit
    if parametrization == "sigma":
        return sigma + sigma * eps
    if parametrization == "scale":
        return 1.0 + eps
    raise ValueError(f"parametrization must be one of {PARAMETRIZATIONS}, got {parametrization!r}")


def singular_value_shift(
    vector: torch.Tensor, sigma: torch.Tensor, parametrization: Parametrization, nonneg: bool = False,
    unit: float = 1.0,
) -> torch.Tensor:
    """c = (adapted singular values) - sigma_r, in the dtype of the trained vector.

    ``unit`` scales the ``delta`` vector: c = unit * delta (``SVFitConfig.scaling`` times the matrix's rms singular
    value), so that an optimiser step of a given size moves every matrix by the same share of its own spectrum, at
    the learning rates other PEFT methods use. The other parametrizations take ``unit`` = 1.

    ``sigma`` is cast to the vector's dtype first, so that ``s - sigma`` is exactly zero at init even when the vector
    was created from sigma at a lower precision.
    """
    sigma = sigma.to(vector.dtype)
    if parametrization == "delta":
        shift = vector * unit if unit != 1.0 else vector
        return torch.relu(sigma + shift) - sigma if nonneg else shift
    if parametrization == "sigma":
        new = torch.relu(vector) if nonneg else vector
        return new - sigma
    if parametrization == "scale":
        z = torch.relu(vector) if nonneg else vector
        return sigma * (z - 1.0)
    raise ValueError(f"parametrization must be one of {PARAMETRIZATIONS}, got {parametrization!r}")


def adapted_singular_values(
    vector: torch.Tensor, sigma: torch.Tensor, parametrization: Parametrization, nonneg: bool = False,
    unit: float = 1.0,
) -> torch.Tensor:
    """The singular values the adapted weight has on the kept subspace (for inspection and plots)."""
    return sigma.to(vector.dtype) + singular_value_shift(vector, sigma, parametrization, nonneg, unit)


def relative_shift(
    vector: torch.Tensor, sigma: torch.Tensor, parametrization: Parametrization, nonneg: bool = False,
    unit: float = 1.0,
) -> torch.Tensor:
    """c / sigma_r, what the one-basis compute paths scale by (U diag(c) V^T = U diag(c / sigma) U^T W0). Under
    ``scale`` this is z - 1 with no division; otherwise the caller checks that sigma_r is well conditioned."""
    if parametrization == "scale":
        z = torch.relu(vector) if nonneg else vector
        return z - 1.0
    return singular_value_shift(vector, sigma, parametrization, nonneg, unit) / sigma.to(vector.dtype)
