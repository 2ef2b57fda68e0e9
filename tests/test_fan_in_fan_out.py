"""fan_in_fan_out means what it means for LoRA (issue 16, part 5): it states that a layer stores its weight as
(in, out), like GPT-2's Conv1D. SVFit reads the layout from the layer class; an explicit flag that contradicts it warns
with LoRA's message and is corrected in the config, exactly where and as LoRA does, so a LoraConfig recipe switched to
SVFitConfig behaves the same. Left at its default (None) it is silent on every layer type."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import svfit
from svfit.tuner.layer import SVFitLayer

import tiny_models as tm

MODELS = {"gpt2": (tm.gpt2, ["c_attn", "c_proj"]), "llama": (tm.llama, ["q_proj", "v_proj"])}


def adapt(config_cls, model_name, flag, **kwargs):
    build, targets = MODELS[model_name]
    if flag is not None:
        kwargs["fan_in_fan_out"] = flag
    config = config_cls(target_modules=targets, **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = get_peft_model(build(0), config)
    messages = [str(w.message) for w in caught if "fan_in_fan_out" in str(w.message)]
    return model, config, messages


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("flag", [False, True])
def test_warnings_and_corrected_flag_match_lora(model_name, flag):
    _, lora_config, lora_messages = adapt(LoraConfig, model_name, flag)
    _, svfit_config, svfit_messages = adapt(svfit.SVFitConfig, model_name, flag)
    assert svfit_messages == lora_messages  # same text, same count (once: the corrected config stops repeats)
    assert svfit_config.fan_in_fan_out == lora_config.fan_in_fan_out == (model_name == "gpt2")
    contradicts = flag != (model_name == "gpt2")
    assert len(svfit_messages) == (1 if contradicts else 0)


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_the_default_reads_the_layout_from_the_layer_silently(model_name):
    model, config, messages = adapt(svfit.SVFitConfig, model_name, None, init_weights=False)
    assert messages == [] and config.fan_in_fan_out is None
    conv1d = [layer.is_conv1d for _, layer in model.named_modules() if isinstance(layer, SVFitLayer)]
    assert conv1d and all(c == (model_name == "gpt2") for c in conv1d)


@pytest.mark.parametrize("flag", [None, False, True])
def test_the_flag_never_changes_what_a_conv1d_adapter_computes(flag):
    model, _, _ = adapt(svfit.SVFitConfig, "gpt2", flag, init_weights=False)
    reference, _, _ = adapt(svfit.SVFitConfig, "gpt2", True, init_weights=False)
    for (_, a), (_, b) in zip(
        [x for x in model.named_modules() if isinstance(x[1], SVFitLayer)],
        [x for x in reference.named_modules() if isinstance(x[1], SVFitLayer)],
    ):
        assert a.is_conv1d
        delta = a.get_delta_weight("default")
        assert delta.shape == a.get_base_layer().weight.shape  # Conv1D layout: (in, out)
        assert torch.equal(a.dense_bases("default")[0], b.dense_bases("default")[0])


def test_the_saved_config_states_the_layout_used_and_reloads(tmp_path):
    model, _, _ = adapt(svfit.SVFitConfig, "gpt2", False, init_weights=False)
    ids = tm.token_batch()
    expected = model.eval()(ids).logits
    model.save_pretrained(tmp_path)
    assert svfit.SVFitConfig.from_pretrained(tmp_path).fan_in_fan_out is True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(tm.gpt2(0), tmp_path).eval()
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message)]  # the corrected config reloads silently
    assert torch.equal(loaded(ids).logits, expected)
