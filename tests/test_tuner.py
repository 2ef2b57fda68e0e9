"""Behaviour of the SVFit tuner on tiny models: exactness, trainability, the span of the update, merging,
adapters, mixed batches and the PEFT API around them."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import convert_to_lora

import svfit
from svfit.tuner.layer import SVFitLayer

from cases import CASES

ALL = sorted(CASES)


def make(case, seed=0, **config_kwargs):
    base = case.build(seed)
    kwargs = {"target_modules": case.targets, **case.extra, **config_kwargs}
    return base, svfit.SVFitConfig(**kwargs)


def perturb(model, scale=0.5, seed=1, adapter="default"):
    """Move the trained vectors away from init (as training would), deterministically."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f"svfit_vector.{adapter}" in name:
                sigma = _sigma_for(model, name, adapter)
                unit = model.get_submodule(name.rsplit(".svfit_vector", 1)[0]).svfit_unit[adapter]
                noise = torch.randn(p.shape, generator=g).to(p.device)
                p.add_(scale * sigma.float() * noise / unit)  # a shift of ~scale * sigma


def stored(layer, adapter="default"):
    """The bases a layer keeps for an adapter (one or both)."""
    return [c[adapter] for c in (layer.basis_U, layer.basis_V) if adapter in c]


def _sigma_for(model, param_name, adapter):
    layer = model.get_submodule(param_name.rsplit(".svfit_vector", 1)[0])
    return layer.svfit_sigma[adapter].to(layer.svfit_vector[adapter].dtype)


def assert_differs(a, b):
    assert not torch.allclose(a, b, rtol=1e-3, atol=0), "outputs should differ"


def adapted_base_weights(model):
    """{base-model state-dict key: current base weight} for every adapted layer."""
    return {
        name.removeprefix("base_model.model.") + ".weight": layer.get_base_layer().weight for name, layer in layers(model)
    }


def layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SVFitLayer)]


# -- exactness at init -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case_name", ALL)
@pytest.mark.parametrize("parametrization", ["delta", "sigma", "scale"])
def test_output_at_init_is_bit_identical(case_name, parametrization):
    case = CASES[case_name]
    base, config = make(case, parametrization=parametrization)
    inputs = case.make_input()
    expected = case.run(base, inputs)
    model = get_peft_model(base, config)
    assert torch.equal(case.run(model, inputs), expected)


@pytest.mark.parametrize("parametrization", ["delta", "sigma", "scale"])
@pytest.mark.parametrize("autocast", [True, False])
@pytest.mark.parametrize("nonneg", [False, True])
def test_output_at_init_exact_for_bf16_base(parametrization, autocast, nonneg):
    case = CASES["llama"]
    base = case.build(0).to(torch.bfloat16)
    inputs = case.make_input()
    expected = case.run(base, inputs)
    config = svfit.SVFitConfig(target_modules=case.targets, parametrization=parametrization, nonneg=nonneg)
    model = get_peft_model(base, config, autocast_adapter_dtype=autocast)
    assert torch.equal(case.run(model, inputs), expected)
    layer = layers(model)[0][1]
    assert layer.svfit_vector["default"].dtype == (torch.float32 if autocast else torch.bfloat16)
    assert {t.dtype for t in stored(layer)} == {torch.bfloat16}  # bases in the model's dtype by default


def test_bases_dtype_float32_keeps_float32_bases_on_a_bf16_model():
    case = CASES["llama"]
    base = case.build(0).to(torch.bfloat16)
    inputs = case.make_input()
    expected = case.run(base, inputs)
    model = get_peft_model(base, svfit.SVFitConfig(target_modules=case.targets, bases_dtype="float32"))
    layer = layers(model)[0][1]
    assert {t.dtype for t in stored(layer)} == {torch.float32}
    assert layer.svfit_vector["default"].dtype == torch.float32
    assert torch.equal(case.run(model, inputs), expected)


def test_base_weights_are_never_written():
    case = CASES["llama"]
    base, config = make(case)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, config)
    perturb(model)
    case.run(model)
    for name, weight in adapted_base_weights(model).items():
        assert torch.equal(weight, before[name]), name


def test_init_weights_false_changes_the_output():
    case = CASES["bert"]
    base, config = make(case, init_weights=False)
    inputs = case.make_input()
    expected = case.run(base, inputs)
    model = get_peft_model(base, config)
    assert_differs(case.run(model, inputs), expected)


# -- what trains ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case_name", ALL)
def test_gradients_only_reach_the_singular_values(case_name):
    case = CASES[case_name]
    base, config = make(case)
    model = get_peft_model(base, config)
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    head = {n for n in trainable if "modules_to_save" in n}
    assert trainable - head and all("svfit_vector.default" in n for n in trainable - head)
    for _, layer in layers(model):
        for container in (layer.basis_U, layer.basis_V, layer.svfit_sigma):
            assert not any(t.requires_grad for t in container.values())
    case.run(model).float().pow(2).mean().backward()
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert p.grad is None, name
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "svfit_vector" in n)


def test_trainable_parameter_counts_match_the_paper_arithmetic():
    """RoBERTa-base shape, q and v, full spectrum: 2*12*768 singular values vs LoRA r=8's 2*12*8*(768+768)."""
    from transformers import RobertaConfig, RobertaModel

    cfg = RobertaConfig(vocab_size=10, max_position_embeddings=16)  # base dims; tiny vocab to build fast
    torch.manual_seed(0)
    model = get_peft_model(RobertaModel(cfg), svfit.SVFitConfig(target_modules=["query", "value"], r="full"))
    n_svfit = sum(p.numel() for p in model.parameters() if p.requires_grad)
    torch.manual_seed(0)
    lora = get_peft_model(RobertaModel(cfg), LoraConfig(target_modules=["query", "value"], r=8))
    n_lora = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert n_svfit == 18_432
    assert n_lora == 294_912
    assert n_lora == 16 * n_svfit


@pytest.mark.parametrize("case_name", ["bert", "gpt2", "conv", "embed"])
def test_delta_weight_lies_in_the_kept_singular_subspaces(case_name):
    case = CASES[case_name]
    base, config = make(case, r=3)
    model = get_peft_model(base, config)
    perturb(model)
    for name, layer in layers(model):
        U, V = layer.dense_bases("default")
        r = U.shape[1]
        assert r == 3
        delta = layer._delta_matrix("default")
        # projecting onto span(U_r) on the left and span(V_r) on the right changes nothing
        projected = U @ (U.T @ delta @ V) @ V.T
        torch.testing.assert_close(projected, delta, atol=1e-6, rtol=1e-5)
        assert torch.linalg.matrix_rank(delta, rtol=1e-5) <= r
        # and in the stored layout it matches the base weight's shape
        assert layer.get_delta_weight("default").shape == layer.get_base_layer().weight.shape


@pytest.mark.parametrize("case_name", ["bert", "gpt2", "conv", "embed"])
def test_bases_are_the_singular_vectors_of_the_weight_in_its_stored_layout(case_name):
    """Per layer type (Linear, Conv1D's transposed weight, Conv2d's reshaped kernel, Embedding): U_r^T W0 V_r is
    diag(sigma_r), and the full spectrum rebuilds W0 exactly in the layout the base layer stores it."""
    case = CASES[case_name]
    base, config = make(case, r="full", bases="both")
    model = get_peft_model(base, config)
    for name, layer in layers(model):
        U, V = layer.basis_U["default"], layer.basis_V["default"]
        sigma = layer.svfit_sigma["default"]
        W = layer._weight_matrix().float()
        torch.testing.assert_close(U.T @ W @ V, torch.diag(sigma), atol=1e-5, rtol=1e-5)
        rebuilt = layer._to_weight_layout(U @ torch.diag(sigma) @ V.T)
        stored = layer.get_base_layer().weight
        assert rebuilt.shape == stored.shape, name
        torch.testing.assert_close(rebuilt, stored, atol=1e-5, rtol=1e-5)


# -- merging, unloading, disabling --------------------------------------------------------------------------------


@pytest.mark.parametrize("case_name", ALL)
def test_merge_equals_unmerged_and_unmerge_restores(case_name):
    case = CASES[case_name]
    base, config = make(case)
    inputs = case.make_input()
    base_out = case.run(base, inputs)
    base_weights = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, config)
    perturb(model)
    unmerged = case.run(model, inputs)
    assert_differs(unmerged, base_out)
    model.merge_adapter()
    torch.testing.assert_close(case.run(model, inputs), unmerged, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(case.run(model, inputs), unmerged, atol=1e-5, rtol=1e-5)
    for name, weight in adapted_base_weights(model).items():
        torch.testing.assert_close(weight, base_weights[name], atol=1e-6, rtol=0)


@pytest.mark.parametrize("case_name", ALL)
def test_disable_adapter_gives_the_base_output(case_name):
    case = CASES[case_name]
    base, config = make(case)
    inputs = case.make_input()
    expected = case.run(base, inputs)
    model = get_peft_model(base, config)
    perturb(model)
    with model.disable_adapter():
        assert torch.equal(case.run(model, inputs), expected)
    assert_differs(case.run(model, inputs), expected)


def test_merge_and_unload_and_unload():
    case = CASES["llama"]
    base, config = make(case)
    inputs = case.make_input()
    expected = case.run(copy.deepcopy(base), inputs)
    model = get_peft_model(copy.deepcopy(base), config)
    perturb(model)
    adapted = case.run(model, inputs)
    merged = model.merge_and_unload(safe_merge=True)
    assert not layers(merged)
    assert not hasattr(merged, "peft_config")
    torch.testing.assert_close(case.run(merged, inputs), adapted, atol=1e-5, rtol=1e-5)

    model = get_peft_model(copy.deepcopy(base), copy.deepcopy(config))
    perturb(model)
    plain = model.unload()
    assert not layers(plain)
    assert torch.equal(case.run(plain, inputs), expected)


def test_safe_merge_refuses_non_finite_weights():
    case = CASES["bert"]
    base, config = make(case)
    model = get_peft_model(base, config)
    name, layer = layers(model)[0]
    with torch.no_grad():
        layer.svfit_vector["default"][0] = float("inf")
    with pytest.raises(ValueError, match="broken"):
        model.merge_adapter(safe_merge=True)
    assert not layer.merged


# -- several adapters ---------------------------------------------------------------------------------------------


def _two_adapter_model(case, seed=0):
    base, config = make(case, seed=seed)
    model = get_peft_model(base, config)
    perturb(model, seed=1)
    model.add_adapter("other", svfit.SVFitConfig(target_modules=case.targets, **case.extra, r=4))
    perturb(model, seed=2, adapter="other")
    return model.eval()


def test_add_set_delete_adapters():
    case = CASES["bert"]
    inputs = case.make_input()
    model = _two_adapter_model(case)
    assert model.active_adapter == "default"
    out_default = case.run(model, inputs)
    # the added adapter is not trainable until activated
    assert not any(p.requires_grad for n, p in model.named_parameters() if "svfit_vector.other" in n)
    model.set_adapter("other")
    out_other = case.run(model, inputs)
    assert_differs(out_default, out_other)
    assert all(p.requires_grad for n, p in model.named_parameters() if "svfit_vector.other" in n)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "svfit_vector.default" in n)
    model.delete_adapter("default")
    assert set(model.peft_config) == {"other"}
    assert not any("svfit_vector.default" in n for n, _ in model.named_parameters())
    assert torch.equal(case.run(model, inputs), out_other)


def test_several_active_adapters_add_their_updates():
    case = CASES["llama"]
    inputs = case.make_input()
    model = _two_adapter_model(case)
    with model.disable_adapter():
        base_out = case.run(model, inputs)
    out_a = case.run(model, inputs)
    model.set_adapter("other")
    out_b = case.run(model, inputs)
    model.base_model.set_adapter(["default", "other"])
    both = case.run(model, inputs)
    # each branch is additive in W, so at the first adapted layer the updates add; end-to-end the combined model
    # differs from each single one and merging both equals running both
    assert_differs(both, out_a)
    assert_differs(both, out_b)
    model.merge_adapter()
    torch.testing.assert_close(case.run(model, inputs), both, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(case.run(model, inputs), base_out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case_name", ["bert", "llama", "gpt2", "conv", "embed"])
def test_mixed_adapter_batch_matches_per_adapter_runs(case_name):
    case = CASES[case_name]
    inputs = case.make_input()
    model = _two_adapter_model(case)
    model.eval()
    batch = inputs[next(iter(inputs))].shape[0]
    names = (["default", "other", "__base__"] * batch)[:batch]
    mixed = case.run(model, inputs, adapter_names=names)
    per = {}
    model.set_adapter("default")
    per["default"] = case.run(model, inputs)
    model.set_adapter("other")
    per["other"] = case.run(model, inputs)
    with model.disable_adapter():
        per["__base__"] = case.run(model, inputs)
    for row, name in enumerate(names):
        # mixed batches take the reference side branch, single-adapter runs a fast path: equal to fp32 round-off
        torch.testing.assert_close(mixed[row], per[name][row], atol=2e-5, rtol=1e-4)


def test_mixed_batch_rejects_unknown_names_and_training_mode():
    case = CASES["bert"]
    model = _two_adapter_model(case).eval()
    inputs = case.make_input()
    with pytest.raises(ValueError, match="non-existing adapter"):
        case.run(model, inputs, adapter_names=["default", "nope", "other", "__base__"])
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        case.run(model, inputs, adapter_names=["default"] * 4)
    # the hooks were removed even though forward raised
    model.eval()
    assert torch.isfinite(case.run(model, inputs)).all()


def test_mixed_batch_generate_with_beam_search():
    case = CASES["llama"]
    model = _two_adapter_model(case)
    ids = case.make_input()["input_ids"][:2]
    names = ["default", "other"]
    out = model.generate(input_ids=ids, adapter_names=names, num_beams=2, max_new_tokens=3, do_sample=False)
    for row, name in enumerate(names):
        model.set_adapter(name)
        single = model.generate(input_ids=ids[row : row + 1], num_beams=2, max_new_tokens=3, do_sample=False)
        assert torch.equal(out[row], single[0])


def test_adapter_names_colliding_with_the_prefix_are_refused():
    case = CASES["bert"]
    base, config = make(case)
    model = get_peft_model(base, config)
    for bad in ("fit", "svfit", "__base__"):
        with pytest.raises(ValueError, match="not allowed"):
            model.add_adapter(bad, svfit.SVFitConfig(target_modules=case.targets))
        assert bad not in model.peft_config


# -- LoRA export --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case_name", ["bert", "gpt2"])
def test_convert_to_lora_reproduces_outputs(case_name):
    case = CASES[case_name]
    base, config = make(case, r=5)
    inputs = case.make_input()
    model = get_peft_model(copy.deepcopy(base), config)
    perturb(model)
    expected = case.run(model, inputs)
    lora_config, state_dict = convert_to_lora(model, rank=5)
    lora_model = get_peft_model(copy.deepcopy(base), lora_config)
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(lora_model, state_dict)
    assert not [k for k in result.unexpected_keys if "lora" in k]
    torch.testing.assert_close(case.run(lora_model, inputs), expected, atol=1e-5, rtol=1e-4)


def test_conv_and_embedding_layers_refuse_lora_conversion():
    case = CASES["conv"]
    base, config = make(case)
    model = get_peft_model(base, config)
    with pytest.raises(TypeError, match="do not support LoRA conversion"):
        convert_to_lora(model, rank=2)


def test_adding_an_adapter_while_another_is_merged_is_refused():
    case = CASES["bert"]
    base, config = make(case)
    model = get_peft_model(base, config)
    perturb(model)
    model.merge_adapter()
    with pytest.raises(ValueError, match="unmerge_adapter"):
        model.add_adapter("second", svfit.SVFitConfig(target_modules=case.targets))
    assert "second" not in model.peft_config


def test_merging_a_tied_weight_is_refused_and_leaves_the_model_unmerged():
    """Embedding and LM head share one tensor: merging the embedding's update would also change the head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=True)
    base = LlamaForCausalLM(cfg).eval()
    assert base.lm_head.weight is base.model.embed_tokens.weight
    model = get_peft_model(base, svfit.SVFitConfig(target_modules=["embed_tokens", "q_proj"]))
    perturb(model)
    weight = base.model.embed_tokens.weight.detach().clone()
    with pytest.warns(UserWarning, match="tie_word_embeddings"), pytest.raises(ValueError, match="lm_head.weight"):
        model.merge_and_unload()
    assert torch.equal(base.model.embed_tokens.weight, weight)
    assert not any(m.merged for m in model.modules() if isinstance(m, SVFitLayer))


def test_a_weight_that_is_not_loaded_gets_a_clear_error():
    case = CASES["bert"]
    base, config = make(case)
    base.bert.encoder.layer[0].attention.self.query.to("meta")
    with pytest.raises(ValueError, match="meta device"):
        get_peft_model(base, config)
