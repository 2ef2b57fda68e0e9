"""A reloaded adapter is the trained adapter (issue: no silent drift): bit-exact on the same machine, within
RELOAD_DRIFT_BOUND after another LAPACK recomputes the bases, exact where the bases had to be saved."""

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

import svfit
from svfit.core import spectrum
from svfit.core.drift import RELOAD_DRIFT_BOUND, columns_to_save, reload_drift
from svfit.tuner.guards import BaseWeightMismatchError
from svfit.tuner import SVFitLayer
from test_tuner import perturb


def _matrix(d_out, d_in, seed, planted_gap=None):
    """A weight with a decaying spectrum, like a pre-trained one; ``planted_gap`` puts two kept singular values that
    close together (relative to sigma_1)."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(d_out, d_out, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=g, dtype=torch.float64))
    n = min(d_out, d_in)
    S = torch.logspace(0.6, -1.0, n, dtype=torch.float64) * (1 + 0.05 * torch.rand(n, generator=g, dtype=torch.float64))
    S = S.sort(descending=True).values
    if planted_gap is not None:
        S[5] = S[4] - planted_gap * S[0]
    return ((U[:, :n] * S) @ V[:, :n].T).float()


class _Net(nn.Module):
    def __init__(self, planted_gap=None):
        super().__init__()
        torch.manual_seed(0)  # the biases: every instance is the same base model
        self.a, self.b, self.c = nn.Linear(40, 56), nn.Linear(56, 40), nn.Linear(40, 40)
        with torch.no_grad():
            self.a.weight.copy_(_matrix(56, 40, 1))
            self.b.weight.copy_(_matrix(40, 56, 2, planted_gap))
            self.c.weight.copy_(_matrix(40, 40, 3))

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def _layers(model):
    return {n.rsplit(".", 1)[-1]: m for n, m in model.named_modules() if isinstance(m, SVFitLayer)}


def _trained(planted_gap=None, **kw):
    model = get_peft_model(_Net(planted_gap), svfit.SVFitConfig(target_modules=["a", "b", "c"], **kw))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # training moves the shifts apart, also across the planted pair
        for layer in _layers(model).values():
            sigma = layer.svfit_sigma["default"]
            layer.svfit_vector["default"].copy_(0.3 * sigma * torch.randn(sigma.shape, generator=g)
                                                / layer.svfit_unit["default"])
    return model


def _float64_svd(monkeypatch):
    """Stand-in for another machine's LAPACK: recompute every SVD in float64 (results cast back to float32)."""
    real = spectrum.thin_svd

    def other_lapack(W, rank, information="energy", **kw):
        kw["dtype"] = torch.float64
        out = real(W, rank, information, **kw)
        return type(out)(**{**out.__dict__, "U": out.U.float(), "S": out.S.float(), "V": out.V.float()})

    monkeypatch.setattr("svfit.tuner.factorization.thin_svd", other_lapack)


def _drifts(trained, loaded):
    out = {}
    for name, layer in _layers(trained).items():
        d0 = layer._delta_matrix("default").detach().double()
        d1 = _layers(loaded)[name]._delta_matrix("default").detach().double()
        out[name] = float((d1 - d0).norm() / d0.norm())
    return out


def test_same_machine_reload_is_bit_exact_at_any_thread_count(tmp_path):
    model = _trained().eval()
    x = torch.randn(6, 40)
    expected = model(x)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        model.save_pretrained(tmp_path)
        torch.set_num_threads(1)
        loaded = PeftModel.from_pretrained(_Net(), tmp_path).eval()
        assert torch.equal(loaded(x), expected)
    finally:
        torch.set_num_threads(old)


def test_the_estimate_bounds_the_drift_of_a_float64_recomputation():
    for seed in range(3):
        W = _matrix(64, 48, 10 + seed)
        svd32 = spectrum.thin_svd(W, 0.99)
        svd64 = spectrum.thin_svd(W, svd32.r, dtype=torch.float64)
        c = 0.2 * svd32.S.double() * torch.randn(svd32.r, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        d32 = (svd32.U.double() * c) @ svd32.V.double().T
        d64 = (svd64.U * c) @ svd64.V.T
        measured = float((d64 - d32).norm() / d32.norm())
        estimate = reload_drift(svd32.spectrum, c)
        assert measured <= estimate, (seed, measured, estimate)
        assert estimate < 50 * measured + 1e-6  # and it tracks it, not a vacuous bound


def test_near_degenerate_pairs_save_their_bases_and_reload_exactly_elsewhere(tmp_path, monkeypatch):
    """A kept pair 3e-6 apart (relative to sigma_1) whose shifts training moved apart: recomputed elsewhere, its
    singular vectors would rotate and move Delta W by ~1e-2. That module carries those two singular vectors (not
    its whole basis); everything else recomputes within the bound."""
    model = _trained(planted_gap=3e-6)
    needs = {name: layer.needs_saved_bases("default") for name, layer in _layers(model).items()}
    assert needs == {"a": False, "b": True, "c": False}
    assert {name: layer.saved_columns("default") is not None for name, layer in _layers(model).items()} == needs
    assert _layers(model)["b"].saved_columns("default").tolist() == [4, 5]  # the planted pair
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    carried = {k: tuple(v.shape) for k, v in saved.items() if ".svfit_U" in k or ".svfit_V" in k}
    assert carried == {"base_model.model.b.svfit_U": (40, 2)}  # b (40 x 56) keeps U, its smaller side
    assert saved["base_model.model.b.svfit_columns"].tolist() == [4, 5]
    _float64_svd(monkeypatch)
    drifts = _drifts(model, PeftModel.from_pretrained(_Net(planted_gap=3e-6), tmp_path))
    assert max(drifts.values()) <= RELOAD_DRIFT_BOUND
    # without its bases, the planted module would have drifted past the bound: the test can fail
    monkeypatch.setattr(SVFitLayer, "saved_columns", lambda self, name: None)
    model.save_pretrained(tmp_path / "no-bases")
    assert _drifts(model, PeftModel.from_pretrained(_Net(planted_gap=3e-6), tmp_path / "no-bases"))["b"] > \
        RELOAD_DRIFT_BOUND


def test_every_recomputed_module_stays_within_the_bound_on_another_lapack(tmp_path, monkeypatch):
    model = _trained()
    assert not any(layer.needs_saved_bases("default") for layer in _layers(model).values())
    model.save_pretrained(tmp_path)
    _float64_svd(monkeypatch)
    drifts = _drifts(model, PeftModel.from_pretrained(_Net(), tmp_path))
    assert 0 < max(drifts.values()) <= RELOAD_DRIFT_BOUND  # recomputed (not bit-equal), and within the bound


@pytest.mark.parametrize("size", [1e-3, 1e-4])
@pytest.mark.parametrize("bases", ["auto", "both"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_autocast_keeps_a_small_update(size, bases, device):
    """Under bf16 autocast with float32 weights, a merged weight rounds W0 + Delta W to bf16 and loses an update
    smaller than W0's rounding; ``auto`` must keep it as well as the reference side branch does."""
    torch.manual_seed(0)
    base = nn.Linear(256, 256).to(device)
    x = torch.randn(64, 256).to(device)

    def update_error(path):
        model = get_peft_model(nn.Sequential(base), svfit.SVFitConfig(target_modules=["0"], compute_path=path,
                                                                     bases=bases))
        layer = _layers(model)["0"]
        with torch.no_grad():
            sigma = layer.svfit_sigma["default"]
            noise = torch.randn(sigma.shape).to(sigma.device)
            layer.svfit_vector["default"].copy_(size * sigma * noise / layer.svfit_unit["default"])
            exact = model(x) - base(x)
            with torch.autocast(device, dtype=torch.bfloat16):
                used = layer.compute_path_for(x)[0]
                got = model(x).float() - base(x).float()
        return float((got - exact).norm() / exact.norm()), used

    auto, used = update_error("auto")
    reference, _ = update_error("reference")
    merged, _ = update_error("merged")
    assert used != "merged"
    assert auto <= 1.5 * reference
    assert merged > 1.5 * reference  # what the old choice did: the test can tell them apart


@pytest.mark.parametrize("path", ["input", "output"])
def test_half_precision_weights_keep_the_update_on_the_one_basis_paths_as_the_reference_does(path):
    """A bf16 model: the activations are bf16 already. Adding the update after the matmul (output) loses as much of
    it as the reference side branch (the output's rounding); adding it before (input) also rounds the input plus
    update, which measured 1.7x the reference's error (0.28 vs 0.16 at a 1e-2 update): the price of keeping only the
    input-side basis. Bounded here at 2x; under autocast of float32 weights that rounding is far worse, and the input
    path is not used (test_autocast_keeps_a_small_update)."""
    torch.manual_seed(0)
    base = nn.Linear(256, 256).to(torch.bfloat16)
    x = torch.randn(64, 256).to(torch.bfloat16)
    errors = {}
    for p in (path, "reference"):
        model = get_peft_model(nn.Sequential(base), svfit.SVFitConfig(target_modules=["0"], compute_path=p,
                                                                     bases="both"))
        layer = _layers(model)["0"]
        with torch.no_grad():
            sigma = layer.svfit_sigma["default"]
            layer.svfit_vector["default"].copy_(1e-2 * sigma * torch.randn(sigma.shape) / layer.svfit_unit["default"])
            assert layer.compute_path_for(x)[0] == p
            exact = x.float() @ layer._delta_matrix("default").T
            errors[p] = float(((model(x).float() - base(x).float()) - exact).norm() / exact.norm())
    assert errors[path] <= (1.1 if path == "output" else 2.0) * errors["reference"]


class _ConvNet(nn.Module):
    """1x1 convolutions (two stored bases), one with a planted near-repeated pair."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Conv2d(16, 24, 1), nn.Conv2d(24, 16, 1)
        with torch.no_grad():
            self.a.weight.copy_(_matrix(24, 16, 4, planted_gap=3e-6)[:, :, None, None])
            self.b.weight.copy_(_matrix(16, 24, 5)[:, :, None, None])

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_a_convolution_carries_only_the_columns_it_needs_in_both_bases(tmp_path, monkeypatch):
    model = get_peft_model(_ConvNet(), svfit.SVFitConfig(target_modules=["a", "b"]))
    perturb(model, scale=0.3)
    cols = _layers(model)["a"].saved_columns("default")
    assert cols is not None and 0 < cols.numel() <= 4 and _layers(model)["b"].saved_columns("default") is None
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert tuple(saved["base_model.model.a.svfit_U"].shape) == (24, cols.numel())
    assert tuple(saved["base_model.model.a.svfit_V"].shape) == (16, cols.numel())
    _float64_svd(monkeypatch)
    loaded = PeftModel.from_pretrained(_ConvNet(), tmp_path)
    assert max(_drifts(model, loaded).values()) <= RELOAD_DRIFT_BOUND
    x = torch.randn(2, 16, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-4, atol=1e-5)
    # the control: without the carried vectors, the float64 recomputation moves 'a' past the bound
    monkeypatch.setattr(SVFitLayer, "saved_columns", lambda self, name: None)
    model.save_pretrained(tmp_path / "none")
    assert _drifts(model, PeftModel.from_pretrained(_ConvNet(), tmp_path / "none"))["a"] > RELOAD_DRIFT_BOUND


def test_a_layer_keeping_both_bases_derives_the_other_side_of_carried_vectors(tmp_path, monkeypatch):
    """The file carries the columns of U only (b stores its smaller side); loaded into layers that keep both bases,
    the matching columns of V come from W0 and the saved singular values."""
    model = _trained(planted_gap=3e-6)
    model.save_pretrained(tmp_path)
    _float64_svd(monkeypatch)
    config = svfit.SVFitConfig.from_pretrained(tmp_path)
    config.bases = "both"
    loaded = PeftModel.from_pretrained(_Net(planted_gap=3e-6), tmp_path, config=config)
    assert _layers(loaded)["b"].stored_bases("default") == "both"
    assert max(_drifts(model, loaded).values()) <= RELOAD_DRIFT_BOUND


def test_a_partial_file_is_refused_where_its_missing_vectors_cannot_be_recomputed(tmp_path):
    model = _trained(planted_gap=3e-6)
    model.save_pretrained(tmp_path)
    config = svfit.SVFitConfig.from_pretrained(tmp_path)
    config.save_bases = True  # claims whole bases: the load would skip the SVD
    with pytest.raises(ValueError, match="carries only some of its singular vectors"):
        PeftModel.from_pretrained(_Net(planted_gap=3e-6), tmp_path, config=config, low_cpu_mem_usage=True)
    with pytest.raises(BaseWeightMismatchError):  # a bf16 copy of the base needs whole saved bases
        PeftModel.from_pretrained(_Net(planted_gap=3e-6).to(torch.bfloat16), tmp_path)


def test_columns_to_save_falls_back_to_whole_bases():
    S = torch.tensor([3.0, 2.0, 2.0, 2.0, 1.0])  # exactly repeated values moved apart: no estimate can bound them
    assert columns_to_save(S, torch.tensor([0.0, 0.1, 0.1, -0.3])).tolist() == [0, 1, 2, 3]
    assert columns_to_save(S, torch.tensor([0.0, 0.1, 0.1, 0.1])) is None  # equal shifts: nothing moves
    g = torch.Generator().manual_seed(0)
    S = torch.logspace(0, -1, 40, dtype=torch.float64)
    S[10:30] = S[10] * (1 - 1e-9 * torch.arange(20))  # a cluster of 20 near-repeated values: over a quarter of r=36
    assert columns_to_save(S, torch.randn(36, generator=g, dtype=torch.float64)).tolist() == list(range(36))


def test_carried_columns_that_do_not_fit_are_a_corrupt_file(tmp_path):
    model = _trained(planted_gap=3e-6)
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    saved = load_file(path)
    saved["base_model.model.b.svfit_columns"] = torch.tensor([4, 99])
    save_file(saved, path)
    with pytest.raises(ValueError, match=r"carried singular vectors of '(base_model\.model\.)?b'.*corrupt file"):
        PeftModel.from_pretrained(_Net(planted_gap=3e-6), tmp_path)
