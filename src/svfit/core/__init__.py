"""The method's mathematics: SVD and rank selection, parametrizations, base-weight fingerprints."""

from .fingerprint import Fingerprint, compare, fingerprint, hash_tensor
from .parametrization import PARAMETRIZATIONS, adapted_singular_values, initial_vector, singular_value_shift
from .spectrum import (
    INFORMATION_MEASURES,
    TruncatedSVD,
    cumulative_share,
    rank_for_threshold,
    resolve_rank,
    spectrum_shares,
    thin_svd,
)

__all__ = [
    "Fingerprint",
    "INFORMATION_MEASURES",
    "PARAMETRIZATIONS",
    "TruncatedSVD",
    "adapted_singular_values",
    "compare",
    "cumulative_share",
    "fingerprint",
    "hash_tensor",
    "initial_vector",
    "rank_for_threshold",
    "resolve_rank",
    "singular_value_shift",
    "spectrum_shares",
    "thin_svd",
]
