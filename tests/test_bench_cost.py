"""The cost, scaling and params benchmarks at quick size: real measurements on tiny models, then their report
sections built from the JSON alone."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import cost, params, scaling

SCHEMA = {"run_info", "train_info", "meta_info"}


def _load(path):
    data = json.loads(path.read_text())
    assert SCHEMA <= set(data), path
    assert data["run_info"]["created_at"] and data["run_info"]["total_time"] > 0
    assert "system_info" in data["meta_info"] and "package_info" in data["meta_info"]
    return data


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _check_section(text: str, tmp_path, pngs):
    assert text.startswith("## ")
    assert "|---|" in text  # a markdown table
    for png in pngs:
        assert (tmp_path / "plots" / png).stat().st_size > 1000
        assert f"](benchmarks/plots/{png})" in text


def test_sections_say_not_run_without_results(tmp_path):
    for module in (cost, scaling, params):
        text = module.section(tmp_path, tmp_path / "plots")
        assert text.startswith("## ") and "Not run" in text


def test_cost_quick(tmp_path):
    cost.run(tmp_path, quick=True)
    files = sorted((tmp_path / "cost").glob("*.json"))
    assert [f.stem for f in files] == ["tiny-bert-qv", "tiny-llama-all"]
    for f in files:
        data = _load(f)
        methods = data["train_info"]["methods"]
        assert set(methods) == {"svfit", "svfit-reference", "svfit-full", "svft", "lora-r8"}
        svft = methods.pop("svft")  # time and memory only
        assert _positive(svft["step_time_median_s"]) and _positive(svft["init_s"])
        assert svft["trainable_params"] == sum(svft["ranks"]) == methods["svfit-full"]["trainable_params"]
        # SVFT keeps both full bases; SVFit keeps the r_kept columns of each
        assert svft["adapter_tensor_bytes"] > methods["svfit"]["adapter_tensor_bytes"]
        assert _positive(methods["svfit"]["cache_reinit_s"])
        for m, v in methods.items():
            assert len(v["step_times_s"]) == data["run_info"]["steps_timed"]
            assert _positive(v["step_time_median_s"]) and v["step_time_iqr_s"] >= 0
            assert _positive(v["saved_activation_bytes"])
            assert v["saved_for_backward_bytes"] >= v["saved_activation_bytes"]
            assert _positive(v["init_s"]) and _positive(v["load_s"])
            assert _positive(v["adapter_file_bytes"]) and _positive(v["trainable_params"])
            assert v["peak_train_memory_growth_bytes"] >= 0 and v["peak_reset_before_training"] in (True, False)
            # the saved adapter reloads to the trained model, and merging changes nothing
            assert v["load_max_abs_diff"] < 1e-4 and v["merge_max_abs_diff"] < 1e-4
            assert _positive(v["merged_forward_over_base"])
            if m.startswith("svfit"):
                assert _positive(v["svd_floor_s"]) and len(v["ranks"]) == v["svd_matrices"]
                assert sum(v["ranks"]) == v["trainable_params"]
        for m in ("svfit", "svfit-reference", "svfit-full"):
            ratios = data["train_info"]["ratios_vs_lora_r8"][m]
            for key in ("step_time_median_s", "saved_activation_bytes", "init_s", "load_s", "adapter_file_bytes",
                        "trainable_params", "init_over_svd_floor"):
                assert _positive(ratios[key]), (f.name, m, key, ratios[key])
            # singular values only: far fewer trainable parameters and a far smaller file than LoRA r=8
            assert ratios["trainable_params"] < 0.2 and ratios["adapter_file_bytes"] < 0.2
        assert methods["svfit-full"]["trainable_params"] >= methods["svfit"]["trainable_params"]
    text = cost.section(tmp_path, tmp_path / "plots")
    _check_section(text, tmp_path, ["cost_ratios.png"])
    assert "tiny-bert-qv" in text and "tiny-llama-all" in text and "Quick run" in text
    assert "Goals of the fast paths" in text and "SVFT-style" in text and "before (same run)" in text


def test_scaling_quick(tmp_path):
    scaling.run(tmp_path, quick=True)
    data = _load(tmp_path / "scaling" / scaling.FILE)
    rows = data["train_info"]["rows"]
    assert [r["width"] for r in rows] == [64, 128]
    for r in rows:
        n = r["width"]
        assert r["random"]["r_threshold"] > n // 2  # a flat spectrum needs most of its values for 99 %
        assert r["lowrank+noise"]["r_threshold"] <= n // scaling.RANK_DIVISOR  # a low-rank one does not
        low = r["lowrank+noise"]["lowrank"]
        assert low["r"] == r["lowrank+noise"]["r_threshold"] and low["top_r_max_rel_error"] < 1e-3
        for key in ("svd_s", "init_threshold_s", "init_full_s"):
            assert _positive(r["random"][key])
        assert set(r["step"]) == set(scaling.STEP_MODELS)
        assert r["step"]["svfit-full"]["trainable_params"] == n and r["step"]["lora-r8"]["trainable_params"] == 16 * n
        for ratio in r["step_over_lora"].values():
            assert _positive(ratio)
    text = scaling.section(tmp_path, tmp_path / "plots")
    _check_section(text, tmp_path, ["scaling_init.png", "scaling_step.png"])


def test_params_quick(tmp_path):
    params.run(tmp_path, quick=True)
    paper = _load(tmp_path / "params" / params.PAPER_FILE)["train_info"]
    base = paper["counts"]["RoBERTa-base"]
    assert (base["svfit_full"], base["lora_r8"]) == (18_432, 294_912)
    assert paper["counts"]["RoBERTa-large"]["svfit_full"] == 49_152
    assert paper["counts"]["ViT-B/16"]["lora_r8"] == 294_912
    for row in paper["counts"].values():
        assert row["ratio_lora_over_svfit_full"] == pytest.approx(16.0)
    check = paper["cross_check"]
    assert check["match"] and check["counted"] == check["get_peft_model"]

    real = _load(tmp_path / "params" / params.REAL_FILE)["train_info"]["models"]
    assert len(real) == 2
    for m in real.values():
        counts = {k: v["trainable_params"] for k, v in m["methods"].items()}
        assert counts["svfit-full"] == m["counted_from_shapes"]["svfit_full"]
        assert counts["lora-r8"] == m["counted_from_shapes"]["lora_r8"]
        assert 0 < counts["svfit"] <= counts["svfit-full"] < counts["lora-r8"]
        for ratios in m["ratios_lora_over_svfit"].values():
            assert all(_positive(x) and x > 1 for x in ratios.values())
    text = params.section(tmp_path, tmp_path / "plots")
    _check_section(text, tmp_path, ["params_counts.png"])
    assert "| RoBERTa-base | query, value | 24 × 768x768 | 18,432 | 294,912 | 16.0× |" in text


def test_cost_worker_failure_is_reported_not_hung():
    case = cost.cases(quick=True)[0]
    case.loader = "no-such-model"
    with pytest.raises(RuntimeError, match="no-such-model"):
        cost.measure_case(case, log=lambda msg: None)
