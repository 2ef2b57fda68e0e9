"""Config validation, input guards, rank overrides and integration with transformers (Trainer, checkpointing)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from peft import get_peft_model
from torch import nn

import svfit
from svfit.tuner.layer import SVFitLayer

import tiny_models as tm
from cases import CASES
from test_tuner import layers, make, perturb

# -- config validation ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"r": 0}, ">= 1"),
        ({"r": 0.5}, "threshold="),
        ({"r": "half"}, "None, an int or 'full'"),
        ({"threshold": 0.0}, r"\(0, 1\]"),
        ({"threshold": 1.5}, r"\(0, 1\]"),
        ({"information": "entropy"}, "information must be one of"),
        ({"parametrization": "lora"}, "parametrization must be one of"),
        ({"bias": "lora_only"}, "bias must be one of"),
        ({"svd": "qr"}, "svd must be one of"),
        ({"svd_dtype": "float16"}, "svd_dtype must be one of"),
        ({"svd_niter": -1}, "non-negative"),
        ({"rank_pattern": {"query": 1.5}}, "threshold must lie"),
        ({"rank_pattern": {"query": 0}}, ">= 1"),
        ({"svd": "lowrank", "information": "nuclear"}, "randomized SVD"),
        ({"layers_pattern": "layer"}, "layers_to_transform"),
    ],
)
def test_bad_config_values_raise_clear_errors(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        svfit.SVFitConfig(target_modules=["query"], **kwargs)


def test_config_round_trips_through_json(tmp_path):
    config = svfit.SVFitConfig(
        target_modules=["query", "value"], r="full", rank_pattern={"layer.0.attention.self.query": 3},
        parametrization="scale", nonneg=True, save_bases=True,
    )
    config.save_pretrained(tmp_path)
    loaded = svfit.SVFitConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()


def test_rank_pattern_overrides_per_module():
    case = CASES["bert"]
    base, config = make(case, r=4, rank_pattern={"layer.0.attention.self.query": "full", "value": 2})
    model = get_peft_model(base, config)
    ranks = {n.removeprefix("base_model.model.bert.encoder."): l.svfit_info["default"].r for n, l in layers(model)}
    assert ranks == {
        "layer.0.attention.self.query": 32,
        "layer.0.attention.self.value": 2,
        "layer.1.attention.self.query": 4,
        "layer.1.attention.self.value": 2,
    }


def test_threshold_and_information_drive_the_rank():
    case = CASES["bert"]
    energy = get_peft_model(*make(case, threshold=0.9, information="energy"))
    nuclear = get_peft_model(*make(case, threshold=0.9, information="nuclear"))
    r_e = [l.svfit_info["default"].r for _, l in layers(energy)]
    r_n = [l.svfit_info["default"].r for _, l in layers(nuclear)]
    assert all(a < b for a, b in zip(r_e, r_n))
    assert all(l.svfit_info["default"].energy_kept >= 0.9 for _, l in layers(energy))
    assert all(l.svfit_info["default"].nuclear_kept >= 0.9 for _, l in layers(nuclear))


def test_lowrank_svd_through_the_tuner_is_exact_at_init_and_reproducible(tmp_path):
    case = CASES["llama"]
    inputs = case.make_input()
    base, config = make(case, r=4, svd="lowrank", svd_seed=3)
    expected = case.run(base, inputs)
    model = get_peft_model(base, config).eval()
    assert torch.equal(case.run(model, inputs), expected)
    perturb(model)
    adapted = case.run(model, inputs)
    model.save_pretrained(tmp_path)
    # a randomized SVD need not come out the same on another device or BLAS: its bases travel with the adapter
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert any("svfit_U" in k for k in saved) and any("svfit_V" in k for k in saved)
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(case.build(0), tmp_path).eval()
    assert torch.equal(case.run(loaded, inputs), adapted)
    lazy = PeftModel.from_pretrained(case.build(0), tmp_path, low_cpu_mem_usage=True).eval()
    assert torch.equal(case.run(lazy, inputs), adapted)


def test_an_all_zero_weight_keeps_r0_and_its_adapter_round_trips(tmp_path):
    case = CASES["bert"]
    inputs = case.make_input()
    base, config = make(case)
    with torch.no_grad():
        base.bert.encoder.layer[0].attention.self.query.weight.zero_()
    with pytest.warns(UserWarning, match="all zeros"):
        model = get_peft_model(base, config)
    key = "bert.encoder.layer.0.attention.self.query"
    assert model.peft_config["default"].resolved_ranks[key] == 0
    perturb(model)
    model.eval()
    expected = case.run(model, inputs)
    model.save_pretrained(tmp_path)
    fresh = case.build(0)
    with torch.no_grad():
        fresh.bert.encoder.layer[0].attention.self.query.weight.zero_()
    from peft import PeftModel

    with pytest.warns(UserWarning, match="all zeros"):
        loaded = PeftModel.from_pretrained(fresh, tmp_path).eval()
    assert torch.equal(case.run(loaded, inputs), expected)


def test_summary_lists_every_module():
    case = CASES["gpt2"]
    model = get_peft_model(*make(case))
    rows = model.svfit_summary()
    assert [r.module for r in rows] == [n.removeprefix("base_model.model.") for n, _ in layers(model)]
    assert {r.layer_type for r in rows} == {"Conv1D"}
    c_attn = next(r for r in rows if r.module.endswith("c_attn"))
    assert c_attn.shape == (96, 32) and c_attn.n == 32
    text = svfit.format_summary(rows)
    assert "c_attn" in text and "total" in text


# -- guards ----------------------------------------------------------------------------------------------------------


def _fake_quantized_linear():
    cls = type("Linear4bit", (nn.Linear,), {"__module__": "bitsandbytes.nn.modules"})
    return cls(8, 8)


class Wrapper(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


@pytest.mark.parametrize(
    "layer, match",
    [
        (_fake_quantized_linear(), "bitsandbytes"),
        (nn.Linear(8, 8).to(torch.float16).requires_grad_(False), None),  # fp16 is fine
    ],
)
def test_quantized_layers_are_refused_by_class(layer, match):
    model = Wrapper(layer)
    config = svfit.SVFitConfig(target_modules=["inner"])
    if match is None:
        get_peft_model(model, config)
        return
    with pytest.raises(TypeError, match=match) as info:
        get_peft_model(model, config)
    assert "dequantize" in str(info.value)


def test_integer_weights_are_refused():
    layer = nn.Linear(8, 8)
    layer.weight = nn.Parameter(torch.ones(8, 8, dtype=torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match="int8"):
        get_peft_model(Wrapper(layer), svfit.SVFitConfig(target_modules=["inner"]))


def test_grouped_conv_and_unsupported_layers_are_refused():
    with pytest.raises(ValueError, match="groups=1"):
        get_peft_model(tm.conv_net(), svfit.SVFitConfig(target_modules=["depthwise"]))
    model = Wrapper(nn.LayerNorm(8))
    with pytest.raises(TypeError, match="supported are"):
        get_peft_model(model, svfit.SVFitConfig(target_modules=["inner"]))


def test_unknown_target_modules_raise():
    with pytest.raises(ValueError, match="not found"):
        get_peft_model(tm.bert(), svfit.SVFitConfig(target_modules=["no_such_layer"]))


def test_embed_scale_is_honoured():
    base = tm.embed_net(embed_scale=3.0)
    ids = tm.token_batch(vocab=50)
    model = get_peft_model(base, svfit.SVFitConfig(target_modules=["emb"]))
    perturb(model)
    adapted = model(ids)
    model.merge_adapter()
    torch.testing.assert_close(model(ids), adapted, atol=1e-5, rtol=1e-5)


# -- integration -------------------------------------------------------------------------------------------------------


def test_gradient_checkpointing_gives_the_same_gradients():
    case = CASES["llama"]
    inputs = case.make_input()

    def grads(checkpointing):
        base = case.build(0)
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model = get_peft_model(base, svfit.SVFitConfig(target_modules=case.targets))
        perturb(model)
        model.train()
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)


def test_transformers_trainer_trains_only_the_singular_values(tmp_path):
    from transformers import Trainer, TrainingArguments

    case = CASES["bert"]
    base, config = make(case)
    model = get_peft_model(base, config)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 100, (32, 8), generator=g)
    labels = (ids[:, 0] > 50).long()
    data = [{"input_ids": i, "labels": y} for i, y in zip(ids, labels)]  # any map-style dataset will do
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, num_train_epochs=2, learning_rate=5e-2,
        report_to=[], save_strategy="no", logging_steps=1, use_cpu=True,
    )
    Trainer(model=model, args=args, train_dataset=data).train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all(("svfit_vector" in n) or ("modules_to_save" in n) for n in changed)
    assert any("svfit_vector" in n for n in changed)
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


def test_loading_without_importing_svfit_fails_with_peft_key_error(tmp_path):
    """Documents PEFT's limitation (no plug-in discovery): with the start-up hook turned off (SVFIT_AUTOLOAD=0; see
    test_autoload.py for the hook), a process must import svfit before loading."""
    model = get_peft_model(*make(CASES["bert"]))
    model.save_pretrained(tmp_path)
    code = (
        "import sys; from peft import PeftConfig\n"
        "try:\n    PeftConfig.from_pretrained(sys.argv[1])\nexcept KeyError as e:\n    print('KeyError', e)\n"
        "import svfit\nprint(type(PeftConfig.from_pretrained(sys.argv[1])).__name__)\n"
    )
    env = {**os.environ, "SVFIT_AUTOLOAD": "0"}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True,
                         env=env)
    assert "KeyError 'SVFIT'" in out.stdout and "SVFitConfig" in out.stdout


def test_all_linear_targets_every_linear_layer():
    model = get_peft_model(tm.llama(), svfit.SVFitConfig(target_modules="all-linear"))
    adapted = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, SVFitLayer)}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_default_targets_come_from_the_architecture():
    model = get_peft_model(tm.llama(), svfit.SVFitConfig())
    adapted = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, SVFitLayer)}
    assert adapted == {"q_proj", "v_proj"}
