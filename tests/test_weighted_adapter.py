"""SVFitModel.add_weighted_adapter: adapters on one base share U_r, V_r, so a weighted sum of their singular-value
shifts is an exact combination, ΔW_new = Σ w_i ΔW_i (issue 16, part 4)."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.utils.other import ModulesToSaveWrapper

import svfit
from svfit.tuner.layer import SVFitLayer

from cases import CASES


def layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SVFitLayer)]


def build(case_name, configs, seed=0):
    """A model with adapters 'a', 'b', ... made from ``configs`` (kwargs dicts), each a random non-identity init."""
    case = CASES[case_name]
    base = case.build(seed)
    names = "abcdefg"
    model = None
    for i, kwargs in enumerate(configs):
        config = svfit.SVFitConfig(target_modules=kwargs.pop("target_modules", case.targets), init_weights=False,
                                   **case.extra, **kwargs)
        torch.manual_seed(100 + i)  # init_weights=False draws from the global RNG: a different vector per adapter
        if model is None:
            model = get_peft_model(base, config, adapter_name=names[i])
        else:
            model.add_adapter(names[i], config)
    return case, model.eval()


def merged_reference(model, adapter_weights, new):
    """A copy of the model with W0 + Σ w_i ΔW_i written into every adapted weight and the adapters switched off
    (modules_to_save copies: the new adapter's, checked separately): what the combined adapter must compute."""
    reference = copy.deepcopy(model.get_base_model())
    for module in reference.modules():
        if isinstance(module, ModulesToSaveWrapper) and new in module.modules_to_save:
            module.set_adapter(new)
    with torch.no_grad():
        for _, layer in layers(reference):
            present = {a: w for a, w in adapter_weights.items() if a in layer.svfit_vector}
            if present:
                weight = layer.get_base_layer().weight
                total = sum(w * layer.get_delta_weight(a).double() for a, w in present.items())
                weight.copy_((weight.double() + total).to(weight.dtype))
            layer.enable_adapters(False)
    return reference


def check_exact(case, model, adapter_weights, new="ab"):
    for name, layer in layers(model):
        present = {a: w for a, w in adapter_weights.items() if a in layer.svfit_vector}
        if not present:
            assert new not in layer.svfit_vector
            continue
        expected = sum(w * layer.get_delta_weight(a).double() for a, w in present.items())
        got = layer.get_delta_weight(new).double()
        assert torch.allclose(got, expected, atol=1e-6, rtol=1e-5), (name, (got - expected).abs().max())
    # and the model's output with the new adapter equals the base with the weighted updates merged in
    reference = merged_reference(model, adapter_weights, new)
    model.base_model.set_adapter(new)
    inputs = case.make_input()
    with torch.no_grad():
        got, want = case.run(model, inputs), case.run(reference, inputs)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()


@pytest.mark.parametrize("case_name", ["llama", "gpt2", "conv", "embed"])
def test_combination_is_the_weighted_sum_of_the_updates(case_name):
    case, model = build(case_name, [{}, {}, {}])
    weights = {"a": 0.7, "b": -0.3, "c": 1.5}
    model.add_weighted_adapter(list(weights), list(weights.values()), "ab")
    check_exact(case, model, weights)
    # added like add_adapter: present, inactive until set, then trainable
    assert "ab" in model.peft_config and not any(p.requires_grad for n, p in model.named_parameters() if ".a." in n)


def test_one_adapter_with_weight_minus_one_negates_it():
    case, model = build("llama", [{}])
    model.add_weighted_adapter(["a"], [-1.0], "ab")
    for _, layer in layers(model):
        assert torch.allclose(layer.get_delta_weight("ab"), -layer.get_delta_weight("a"), atol=1e-7)


def test_nested_ranks_combine_exactly_and_take_the_larger_rank():
    case, model = build("llama", [{"r": 4}, {"r": 9}])
    model.add_weighted_adapter(["a", "b"], [0.5, 0.5], "ab")
    check_exact(case, model, {"a": 0.5, "b": 0.5})
    for _, layer in layers(model):
        assert layer.svfit_vector["ab"].shape == layer.svfit_vector["b"].shape


def test_different_target_modules_combine_where_each_adapter_is():
    case, model = build("llama", [{"target_modules": ["q_proj"]}, {"target_modules": ["q_proj", "v_proj"]}])
    model.add_weighted_adapter(["a", "b"], [2.0, 1.0], "ab")
    check_exact(case, model, {"a": 2.0, "b": 1.0})
    adapted = {n.rsplit(".", 1)[-1] for n, layer in layers(model) if "ab" in layer.svfit_vector}
    assert adapted == {"q_proj", "v_proj"}


@pytest.mark.parametrize("parametrizations", [("delta", "scale"), ("sigma", "delta"), ("scale", "sigma")])
def test_mixed_parametrizations_combine_exactly(parametrizations):
    """The shifts c_i live in one σ space whatever vector produced them; the new adapter (parametrized like the
    first) is given the vector whose shift is Σ w_i c_i."""
    case, model = build("llama", [{"parametrization": p} for p in parametrizations])
    model.add_weighted_adapter(["a", "b"], [0.6, -1.2], "ab")
    check_exact(case, model, {"a": 0.6, "b": -1.2})
    assert all(layer.svfit_parametrization["ab"] == parametrizations[0] for _, layer in layers(model))


def test_nonneg_combination_is_exact_while_the_spectrum_stays_non_negative():
    case, model = build("llama", [{"nonneg": True}, {"nonneg": True}])
    model.add_weighted_adapter(["a", "b"], [0.5, 0.5], "ab")
    check_exact(case, model, {"a": 0.5, "b": 0.5})


def test_nonneg_combination_below_zero_is_refused_and_leaves_the_model_alone():
    case, model = build("llama", [{"nonneg": True}])
    with pytest.raises(ValueError, match="cannot represent the combined shift.*nonneg=True"):
        model.add_weighted_adapter(["a"], [-3.0], "ab")  # σ - 3c < 0 wherever c > σ/3
    assert "ab" not in model.peft_config
    assert not any("ab" in layer.svfit_vector for _, layer in layers(model))


def test_adapters_on_different_base_weights_are_refused():
    """An adapter added after the base weights changed has other singular vectors: no exact combination."""
    case = CASES["llama"]
    model = get_peft_model(case.build(0), svfit.SVFitConfig(target_modules=["q_proj"], init_weights=False),
                           adapter_name="a")
    with torch.no_grad():
        for _, layer in layers(model):
            layer.get_base_layer().weight.mul_(torch.linspace(0.5, 1.5, layer.get_base_layer().weight.shape[1]))
    model.add_adapter("b", svfit.SVFitConfig(target_modules=["q_proj"], init_weights=False))
    with pytest.raises(ValueError, match="singular vectors differ"):
        model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "ab")
    assert "ab" not in model.peft_config


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"combination_type": "ties"}, "not supported by SVFit"),
        ({"combination_type": "dare_linear"}, "not supported by SVFit"),
        ({"svd_rank": 4, "combination_type": "svd"}, "svd_rank=4 is not supported"),
        ({"density": 0.5}, "density=0.5 is not supported"),
        ({"adapters": ["a", "zzz"]}, "Adapter zzz does not exist"),
        ({"weights": [1.0]}, "got 1 weights for 2 adapters"),
        ({"weights": [1.0, float("nan")]}, "finite"),
        ({"adapter_name": "b"}, "already exists"),
        ({"adapter_name": "fit"}, "not allowed"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    case, model = build("llama", [{}, {}])
    args = {"adapters": ["a", "b"], "weights": [1.0, 1.0], "adapter_name": "ab", **kwargs}
    with pytest.raises(ValueError, match=match):
        model.add_weighted_adapter(**args)


@pytest.mark.parametrize("combination_type", ["cat", "svd"])
def test_loras_exact_combination_types_give_the_same_exact_sum(combination_type):
    case, model = build("llama", [{}, {}])
    model.add_weighted_adapter(["a", "b"], [1.0, 0.25], "ab", combination_type=combination_type)
    check_exact(case, model, {"a": 1.0, "b": 0.25})


def test_modules_to_save_combine_in_weight_space():
    """A SEQ_CLS head is trained in full per adapter: the new head is W0 + Σ w_i (W_i - W0)."""
    case, model = build("bert", [{}, {}])
    wrapper = model.base_model.model.classifier
    with torch.no_grad():
        for i, a in enumerate("ab"):
            for p in wrapper.modules_to_save[a].parameters():
                p.add_(0.1 * (i + 1) * torch.randn_like(p))
    weights = {"a": 0.25, "b": 0.5}
    model.add_weighted_adapter(list(weights), list(weights.values()), "ab")
    original = dict(wrapper.original_module.named_parameters())
    for name, p in wrapper.modules_to_save["ab"].named_parameters():
        expected = original[name] + sum(
            w * (dict(wrapper.modules_to_save[a].named_parameters())[name] - original[name]) for a, w in weights.items()
        )
        assert torch.allclose(p, expected, atol=1e-6), name
    check_exact(case, model, weights)


def test_the_combined_adapter_saves_and_loads(tmp_path):
    case, model = build("llama", [{}, {}])
    model.add_weighted_adapter(["a", "b"], [0.3, 0.9], "ab")
    model.base_model.set_adapter("ab")
    inputs = case.make_input()
    with torch.no_grad():
        expected = case.run(model, inputs)
    model.save_pretrained(tmp_path, selected_adapters=["ab"])
    loaded = PeftModel.from_pretrained(case.build(0), tmp_path / "ab", adapter_name="ab").eval()
    with torch.no_grad():
        assert torch.allclose(case.run(loaded, inputs), expected, atol=1e-6)
