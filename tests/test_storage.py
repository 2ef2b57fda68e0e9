"""How SVFit stores its frozen bases (issue: memory at LLM scale): one basis per Linear where the other follows from
W0, in the model's dtype, as frozen parameters that FSDP2 can shard; and the error each storage mode adds."""

import pytest
import torch
from peft import get_peft_model
from torch import nn

import svfit
from svfit.tuner import SVFitLayer

# Stated in README ("Memory"): the error each storage mode adds to Delta W and to the singular-value gradient,
# relative to float32 two-basis storage of the same weight.
ONE_BASIS_FP32_TOL = 1e-5
BF16_BASES_TOL = 5e-3


class _MLP(nn.Module):
    def __init__(self, dtype=torch.float32, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.up = nn.Linear(48, 96, dtype=dtype)  # d_in < d_out: keeps V
        self.down = nn.Linear(96, 48, dtype=dtype)  # d_out < d_in: keeps U
        with torch.no_grad():  # a decaying spectrum, like a pre-trained weight
            for lin in (self.up, self.down):
                U, _, Vh = torch.linalg.svd(torch.randn(lin.weight.shape), full_matrices=False)
                S = torch.logspace(0.5, -0.8, U.shape[1])
                lin.weight.copy_(((U * S) @ Vh).to(dtype))

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def _layers(model):
    return {n.rsplit(".", 1)[-1]: m for n, m in model.named_modules() if isinstance(m, SVFitLayer)}


def _shift(model, seed=3, scale=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in _layers(model).values():
            sigma = layer.svfit_sigma["default"]
            layer.svfit_vector["default"].copy_(scale * sigma * torch.randn(sigma.shape, generator=g)
                                                / layer.svfit_unit["default"])


def test_a_linear_keeps_only_the_basis_of_its_smaller_side():
    model = get_peft_model(_MLP(), svfit.SVFitConfig(target_modules=["up", "down"]))
    up, down = _layers(model)["up"], _layers(model)["down"]
    assert up.stored_bases("default") == "V" and "default" not in up.basis_U
    assert down.stored_bases("default") == "U" and "default" not in down.basis_V
    both = get_peft_model(_MLP(), svfit.SVFitConfig(target_modules=["up", "down"], bases="both"))
    bytes_one = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".basis_U." in n or
                    ".basis_V." in n)
    bytes_both = sum(p.numel() * p.element_size() for n, p in both.named_parameters() if ".basis_U." in n or
                     ".basis_V." in n)
    assert bytes_one * 3 == bytes_both  # r*48 instead of r*(48+96) per layer
    for p in (*up.basis_V.values(), *down.basis_U.values()):
        assert isinstance(p, nn.Parameter) and not p.requires_grad  # frozen parameters: FSDP2 shards them


def test_an_ill_conditioned_spectrum_keeps_both_bases():
    base = _MLP()
    with torch.no_grad():
        U, S, Vh = torch.linalg.svd(base.up.weight, full_matrices=False)
        S[-1] = S[0] * 1e-5  # dividing by it would amplify round-off
        base.up.weight.copy_((U * S) @ Vh)
    model = get_peft_model(base, svfit.SVFitConfig(target_modules=["up"], r="full"))
    assert _layers(model)["up"].stored_bases("default") == "both"


@pytest.mark.parametrize("path", ["auto", "reference", "merged", "input", "output"])
def test_one_basis_gives_the_two_basis_model(path):
    x = torch.randn(5, 48)
    results = {}
    for bases in ("both", "auto"):
        model = get_peft_model(_MLP(), svfit.SVFitConfig(target_modules=["up", "down"], bases=bases,
                                                       compute_path=path))
        _shift(model)
        y = model(x)
        y.square().sum().backward()
        grads = [layer.svfit_vector["default"].grad.clone() for layer in _layers(model).values()]
        results[bases] = (y.detach(), grads)
    (y2, g2), (y1, g1) = results["both"], results["auto"]
    assert (y1 - y2).norm() <= ONE_BASIS_FP32_TOL * y2.norm()
    for a, b in zip(g1, g2):
        assert (a - b).norm() <= ONE_BASIS_FP32_TOL * b.norm()


def test_bf16_bases_stay_within_the_stated_tolerance_of_float32_bases():
    """Delta W and the singular-value gradient with the default storage of a bf16 model (one basis, bf16) against
    float32 bases of the same bf16 weight, for a weight gradient G."""
    model = get_peft_model(_MLP(torch.bfloat16), svfit.SVFitConfig(target_modules=["up", "down"]))
    ref = get_peft_model(_MLP(torch.bfloat16), svfit.SVFitConfig(target_modules=["up", "down"], bases="both",
                                                                   bases_dtype="float32"))
    _shift(model)
    _shift(ref)
    g = torch.Generator().manual_seed(0)
    for name, layer in _layers(model).items():
        other = _layers(ref)[name]
        assert {p.dtype for p in (*layer.basis_U.values(), *layer.basis_V.values())} == {torch.bfloat16}
        d1, d2 = layer._delta_matrix("default"), other._delta_matrix("default")
        assert (d1 - d2).norm() <= BF16_BASES_TOL * d2.norm(), name
        G = torch.randn(d2.shape, generator=g)
        (U1, V1), (U2, V2) = layer.dense_bases("default"), other.dense_bases("default")
        g1, g2 = ((U1.T @ G) * V1.T).sum(1), ((U2.T @ G) * V2.T).sum(1)
        assert (g1 - g2).norm() <= BF16_BASES_TOL * g2.norm(), name


def test_merging_a_one_basis_adapter_is_exact_and_reversible():
    model = get_peft_model(_MLP(), svfit.SVFitConfig(target_modules=["up", "down"]))
    _shift(model)
    x = torch.randn(4, 48)
    before = {n: m.get_base_layer().weight.detach().clone() for n, m in _layers(model).items()}
    with torch.no_grad():
        unmerged = model(x)
        model.merge_adapter()
        torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)
    for n, m in _layers(model).items():
        torch.testing.assert_close(m.get_base_layer().weight, before[n], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("is_trainable", [False, True])
def test_loading_sets_requires_grad_on_the_singular_values_only(is_trainable, tmp_path):
    from peft import PeftModel

    model = get_peft_model(_MLP(), svfit.SVFitConfig(target_modules=["up", "down"]))
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(_MLP(), tmp_path, is_trainable=is_trainable)
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    vectors = {n for n, _ in loaded.named_parameters() if ".svfit_vector." in n}
    assert trainable == (vectors if is_trainable else set()) and len(vectors) == 2
    # PEFT's rule for a loaded, not activated adapter: its vectors follow is_trainable; bases stay frozen
    loaded.load_adapter(tmp_path, adapter_name="other", is_trainable=is_trainable)
    others = {n for n, _ in loaded.named_parameters() if ".svfit_vector.other" in n}
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == (trainable | others if is_trainable
                                                                             else set())
    loaded.load_adapter(tmp_path, adapter_name="opposite", is_trainable=not is_trainable)
    opposite = {n for n, _ in loaded.named_parameters() if ".svfit_vector.opposite" in n}
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == (trainable | others if is_trainable
                                                                             else opposite)
