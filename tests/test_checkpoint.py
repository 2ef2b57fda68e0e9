"""What SVFit writes to disk and how it comes back: round trips, fingerprints, ranks, file size."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import SafetensorError
from safetensors.torch import load_file

import svfit
from svfit.core.fingerprint import ROW_BYTES
from svfit.tuner.checkpoint import FINGERPRINT_KEY
from svfit.tuner.layer import SVFitLayer

from cases import CASES
from test_tuner import layers, make, perturb

ADAPTER_FILE = "adapter_model.safetensors"


def trained(case, seed=0, **kw):
    base, config = make(case, seed=seed, **kw)
    model = get_peft_model(base, config)
    perturb(model)
    return model.eval()


@pytest.mark.parametrize("case_name", sorted(CASES))
@pytest.mark.parametrize("save_bases", [False, True])
@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_save_load_round_trip_is_bit_exact(case_name, save_bases, low_cpu_mem_usage, tmp_path):
    case = CASES[case_name]
    inputs = case.make_input()
    model = trained(case, save_bases=save_bases)
    expected = case.run(model, inputs)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(case.build(0), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage).eval()
    assert torch.equal(case.run(loaded, inputs), expected)
    for (_, a), (_, b) in zip(layers(model), layers(loaded)):
        assert a.svfit_info["default"].r == b.svfit_info["default"].r
        assert not any(t.device.type == "meta" for t in (*b.basis_U.values(), *b.basis_V.values()))


def test_the_file_holds_only_the_singular_values_by_default(tmp_path):
    case = CASES["llama"]
    model = trained(case)
    model.save_pretrained(tmp_path / "small")
    tensors = load_file(tmp_path / "small" / ADAPTER_FILE)
    table = tensors.pop(FINGERPRINT_KEY)  # one row per module: the base weight it was trained on
    assert table.dtype == torch.uint8 and tuple(table.shape) == (len(tensors), ROW_BYTES)
    assert tensors and all(k.endswith(".svfit_vector") for k in tensors)
    for name, layer in layers(model):
        key = name + ".svfit_vector"
        assert tensors[key].shape == (layer.svfit_info["default"].r,)
    model.peft_config["default"].save_bases = True
    model.save_pretrained(tmp_path / "big")
    big = load_file(tmp_path / "big" / ADAPTER_FILE)
    assert any(k.endswith(".svfit_U") for k in big) and any(k.endswith(".svfit_sigma") for k in big)


def test_config_records_ranks_and_fingerprints(tmp_path):
    case = CASES["bert"]
    model = trained(case)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "SVFIT"
    assert saved["svfit_version"] == svfit.__version__
    names = {n.removeprefix("base_model.model.") for n, _ in layers(model)}
    assert set(saved["resolved_ranks"]) == names == set(saved["base_fingerprints"])
    for name, layer in layers(model):
        assert saved["resolved_ranks"][name.removeprefix("base_model.model.")] == layer.svfit_info["default"].r


def test_reload_reuses_recorded_ranks_even_if_the_threshold_changed(tmp_path):
    case = CASES["bert"]
    model = trained(case, threshold=0.9)
    inputs = case.make_input()
    expected = case.run(model, inputs)
    model.save_pretrained(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    saved = json.loads(config_path.read_text())
    saved["threshold"] = 0.5  # would choose much smaller ranks if re-thresholded
    config_path.write_text(json.dumps(saved))
    loaded = PeftModel.from_pretrained(case.build(0), tmp_path).eval()
    assert torch.equal(case.run(loaded, inputs), expected)


def test_loading_onto_a_different_base_model_fails_and_leaves_it_untouched(tmp_path):
    case = CASES["llama"]
    trained(case).save_pretrained(tmp_path)
    other = case.build(seed=1)
    with pytest.raises(svfit.BaseWeightMismatchError, match=r"module 'model\.layers\.0\.self_attn\.q_proj'"):
        PeftModel.from_pretrained(other, tmp_path)
    assert not any(isinstance(m, SVFitLayer) for m in other.modules())
    assert not hasattr(other, "peft_config")


def test_load_adapter_onto_a_different_base_fails_without_leaving_a_half_adapter(tmp_path):
    case = CASES["llama"]
    trained(case, seed=1).save_pretrained(tmp_path)
    model = trained(case, seed=0)
    with pytest.raises(svfit.BaseWeightMismatchError, match="different base model"):
        model.load_adapter(tmp_path, adapter_name="wrong")
    assert set(model.peft_config) == {"default"}
    assert not any("wrong" in n for n, _ in model.named_parameters())


def test_loading_onto_a_model_without_the_module_fails_clearly(tmp_path):
    CASES["llama"].build  # noqa: B018 - documentation: a llama adapter onto a BERT
    trained(CASES["llama"]).save_pretrained(tmp_path)
    with pytest.raises(svfit.BaseWeightMismatchError, match="lacks"):
        PeftModel.from_pretrained(CASES["bert"].build(0), tmp_path)


def test_a_lower_precision_copy_of_the_right_base_is_refused_with_the_fix(tmp_path):
    """Bases recomputed from bf16-rounded weights move Delta W by percents: refuse, and say how to load instead."""
    case = CASES["llama"]
    trained(case).save_pretrained(tmp_path)
    copy = case.build(0).to(torch.bfloat16)
    with pytest.raises(svfit.BaseWeightMismatchError, match=r"float32.*bfloat16.*dtype=torch\.float32.*save_bases=True"):
        PeftModel.from_pretrained(copy, tmp_path)
    assert not any(isinstance(m, SVFitLayer) for m in copy.modules())  # refused before anything was touched
    # the advertised way: load in the training dtype, then cast
    loaded = PeftModel.from_pretrained(case.build(0), tmp_path).to(torch.bfloat16)
    assert {p.dtype for n, p in loaded.named_parameters() if "svfit_vector" not in n} == {torch.bfloat16}


def test_with_saved_bases_a_lower_precision_copy_loads_the_trained_update(tmp_path):
    case = CASES["llama"]
    model = trained(case, save_bases=True)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(case.build(0).to(torch.bfloat16), tmp_path)
    for (name, a), (_, b) in zip(layers(model), layers(loaded)):
        assert b.stored_bases("default") == "both"  # the saved bases, not ones recomputed from rounded weights
        d_a, d_b = a._delta_matrix("default"), b._delta_matrix("default")
        assert (d_b - d_a).norm() <= 5e-3 * d_a.norm(), name  # bf16 storage of the bases, nothing more


def test_a_config_passed_in_does_not_skip_the_base_check(tmp_path):
    """PeftModel.from_pretrained(..., config=...) never reads adapter_config.json's fingerprints: the weights file
    carries its own."""
    case = CASES["bert"]
    trained(case, r="full").save_pretrained(tmp_path)
    fresh = svfit.SVFitConfig(target_modules=case.targets, r="full", task_type="SEQ_CLS")
    with pytest.raises(svfit.BaseWeightMismatchError, match="different base model"):
        PeftModel.from_pretrained(case.build(seed=7), tmp_path, config=fresh)
    same = svfit.SVFitConfig(target_modules=case.targets, r="full", task_type="SEQ_CLS")
    PeftModel.from_pretrained(case.build(0), tmp_path, config=same)  # the right base loads


def test_load_adapter_as_second_adapter_and_switch(tmp_path):
    case = CASES["bert"]
    inputs = case.make_input()
    first = trained(case)
    expected = case.run(first, inputs)
    first.save_pretrained(tmp_path)
    model = trained(case)  # same base, different (random) default adapter
    model.load_adapter(tmp_path, adapter_name="loaded")
    model.set_adapter("loaded")
    assert torch.equal(case.run(model, inputs), expected)


def test_degenerate_spectra_save_their_bases_automatically(tmp_path):
    """An orthogonal weight has all singular values equal, so its singular vectors are not unique: the bases must be
    saved or the reloaded adapter could differ."""
    case = CASES["bert"]
    base, config = make(case, r=4)
    q = base.bert.encoder.layer[0].attention.self.query
    with torch.no_grad():
        q.weight.copy_(torch.linalg.qr(torch.randn(32, 32))[0])
    model = get_peft_model(base, config)
    perturb(model)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / ADAPTER_FILE)
    saved_bases = {k.rsplit(".", 1)[0] for k in tensors if k.endswith((".svfit_U", ".svfit_V"))}
    assert saved_bases == {"base_model.model.bert.encoder.layer.0.attention.self.query"}


def test_corrupt_adapter_file_raises(tmp_path):
    case = CASES["bert"]
    trained(case).save_pretrained(tmp_path)
    (tmp_path / ADAPTER_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(SafetensorError):
        PeftModel.from_pretrained(case.build(0), tmp_path)


def test_the_file_costs_four_bytes_per_singular_value_plus_a_header(tmp_path):
    """The on-disk size against LoRA is measured on real weights by benchmarks/cost; here we pin the
    accounting: the data is exactly the sum of r float32 values, and LoRA r=8 stores 16x more at full spectrum."""
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=50, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256)
    torch.manual_seed(0)
    model = get_peft_model(BertModel(cfg), svfit.SVFitConfig(target_modules=["query", "value"], r="full"))
    model.save_pretrained(tmp_path / "svfit")
    torch.manual_seed(0)
    get_peft_model(BertModel(cfg), LoraConfig(target_modules=["query", "value"], r=8)).save_pretrained(
        tmp_path / "lora"
    )
    tensors = load_file(tmp_path / "svfit" / ADAPTER_FILE)
    fingerprints = tensors.pop(FINGERPRINT_KEY).numel()
    assert fingerprints == 4 * ROW_BYTES  # one row per adapted module
    data = sum(t.numel() * t.element_size() for t in tensors.values())
    assert data == 4 * sum(model.peft_config["default"].resolved_ranks.values()) == 4 * 4 * 128
    lora = load_file(tmp_path / "lora" / ADAPTER_FILE)
    assert sum(t.numel() * t.element_size() for t in lora.values()) == 16 * data
    header = (tmp_path / "svfit" / ADAPTER_FILE).stat().st_size - data - fingerprints
    assert header < 150 * (len(tensors) + 1)


def test_one_config_object_can_adapt_several_models_without_mixing_their_records(tmp_path):
    case = CASES["bert"]
    base0, config = make(case, threshold=0.9)
    first = get_peft_model(base0, config)
    records = lambda cfg: json.dumps([cfg.resolved_ranks, cfg.base_fingerprints], sort_keys=True)  # noqa: E731
    recorded = records(first.peft_config["default"])
    # reused on the same base: the records hold, nothing to say
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        get_peft_model(case.build(seed=0), config)
    # reused on another model (normal with a LoraConfig): that model gets its own copy, the first keeps its records
    with pytest.warns(UserWarning, match="chooses its ranks afresh"):
        other = get_peft_model(case.build(seed=3), config)
    assert other.peft_config["default"] is not first.peft_config["default"]
    assert records(first.peft_config["default"]) == recorded
    perturb(first)
    first.save_pretrained(tmp_path)
    PeftModel.from_pretrained(case.build(seed=0), tmp_path)  # still loads where it was trained
    # ... but trained weights never load into such a re-chosen copy
    with pytest.raises(svfit.BaseWeightMismatchError, match="chosen afresh"):
        PeftModel.from_pretrained(case.build(seed=5), tmp_path, config=first.peft_config["default"])
    # another dtype of the same weights (its SVD differs), or more target modules: the first model's records stay
    with pytest.warns(UserWarning, match="chooses its ranks afresh"):
        get_peft_model(case.build(seed=0).to(torch.bfloat16), config)
    wider = svfit.SVFitConfig(target_modules=["query", "value"], threshold=0.9)
    get_peft_model(case.build(seed=0), wider)
    narrow_records = records(wider)
    wider.target_modules = {"query", "value", "key"}
    get_peft_model(case.build(seed=0), wider)
    assert records(wider) == narrow_records
    assert records(first.peft_config["default"]) == recorded
    # a config read from a checkpoint is never re-chosen: wrong base -> error, model untouched
    fresh = case.build(seed=4)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(svfit.BaseWeightMismatchError):
        get_peft_model(fresh, svfit.SVFitConfig.from_pretrained(tmp_path))
    assert not any(isinstance(m, SVFitLayer) for m in fresh.modules())
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


def test_bf16_model_round_trips_bit_exact(tmp_path):
    case = CASES["llama"]
    inputs = case.make_input()
    base, config = make(case)
    model = get_peft_model(base.to(torch.bfloat16), config)
    perturb(model)
    model.eval()
    expected = case.run(model, inputs)
    assert expected.dtype == torch.bfloat16
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(case.build(0).to(torch.bfloat16), tmp_path).eval()
    assert torch.equal(case.run(loaded, inputs), expected)


def test_loading_while_another_adapter_is_merged_is_refused(tmp_path):
    case = CASES["bert"]
    trained(case).save_pretrained(tmp_path)
    model = trained(case, seed=0)
    model.merge_adapter()
    with pytest.raises(ValueError, match="unmerge"):
        model.load_adapter(tmp_path, adapter_name="second")
    assert "second" not in model.peft_config


def test_transformers_load_adapter_checks_the_base_too(tmp_path):
    case = CASES["llama"]
    inputs = case.make_input()
    model = trained(case)
    expected = case.run(model, inputs)
    model.save_pretrained(tmp_path)
    right = case.build(0)
    right.load_adapter(str(tmp_path))
    assert torch.equal(case.run(right.eval(), inputs), expected)
    with pytest.raises(svfit.BaseWeightMismatchError, match="different base model"):
        case.build(5).load_adapter(str(tmp_path))
