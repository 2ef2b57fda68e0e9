"""Base-weight fingerprints: exact identity, tolerance to a precision change, and nothing looser."""

from __future__ import annotations

import pytest
import torch

from svfit.core.fingerprint import Fingerprint, compare, fingerprint


def weight(seed, shape=(256, 256)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.05


def test_identical_weight_matches_by_hash():
    w = weight(0)
    fp = fingerprint(w)
    assert compare(fp, w.clone())[0] == "identical"
    assert Fingerprint.from_json(fp.to_json()) == fp


@pytest.mark.parametrize("shape", [(64, 64), (1024, 1024), (96, 32)])
def test_independent_weights_of_the_same_shape_are_different(shape):
    # norms and top singular values of such matrices nearly coincide: they must not decide
    assert compare(fingerprint(weight(0, shape)), weight(1, shape))[0] == "different"


def test_a_slightly_different_fine_tune_is_different():
    w = weight(0)
    other = w + 0.05 * w.abs() * torch.randn(w.shape, generator=torch.Generator().manual_seed(5))
    assert compare(fingerprint(w), other)[0] == "different"
    assert compare(fingerprint(w), other.to(torch.bfloat16))[0] == "different"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("change", [0.01, 0.002])
def test_a_small_real_change_is_not_mistaken_for_rounding(dtype, change):
    """A merged adapter or another fine-tune may move a weight by ~1%: still another weight, in any dtype."""
    w = weight(0)
    g = torch.Generator().manual_seed(7)
    other = w + change * w.norm() * torch.randn(w.shape, generator=g) / w.numel() ** 0.5
    if dtype == torch.bfloat16 and change < 0.005:
        pytest.skip("below bf16's own rounding: indistinguishable by construction")
    assert compare(fingerprint(w), other.to(dtype))[0] == "different"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_a_precision_change_of_the_same_weight_is_close(dtype):
    w = weight(0)
    assert compare(fingerprint(w), w.to(dtype))[0] == "close"
    assert compare(fingerprint(w.to(dtype)), w)[0] == "close"


def test_shape_change_is_different_and_conv_kernels_work():
    k = torch.randn(8, 3, 3, 3)
    assert compare(fingerprint(k), k.clone())[0] == "identical"
    assert compare(fingerprint(k), k.reshape(8, 27))[0] == "different"


def test_malformed_fingerprint_is_reported():
    with pytest.raises(ValueError, match="malformed"):
        Fingerprint.from_json({"hash": "x"})
