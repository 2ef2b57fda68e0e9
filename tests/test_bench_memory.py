"""The memory benchmark at quick size (a tiny bf16 Llama, each row in its own process) and its arithmetic for big
models, checked against counts done by hand."""

from __future__ import annotations

import json

import pytest

from benchmarks import memory

# tiny Llama of memory._load(quick=True): hidden 64, MLP 160, 2 layers, 4 heads of 16, 2 KV heads (k/v width 32)
LORA_QV_PARAMS = 2 * (8 * (64 + 64) + 8 * (64 + 32))  # per layer: q (64->64), v (64->32); A and B of rank 8


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("memory")
    memory.run(out, quick=True)
    return out, json.loads((out / "memory" / "tiny-llama.json").read_text())["run_info"]


def test_rows_account_for_exactly_what_each_method_adds(quick):
    _, info = quick
    rows = {(r["targets"], r["method"]): r for r in info["rows"]}
    assert set(rows) == {(t, m) for t in memory.TARGETS for m in memory.METHODS}
    lora = rows["qv", "lora"]
    # PEFT keeps LoRA's A and B in float32 (autocast_adapter_dtype): 4 bytes a parameter, nothing else added
    assert lora["trainable"] == LORA_QV_PARAMS and lora["added_bytes"] == 4 * LORA_QV_PARAMS
    assert lora["target_weight_bytes"] == 2 * 2 * (64 * 64 + 64 * 32)  # bf16 q and v of both layers
    for targets in memory.TARGETS:
        svfit = rows[targets, "svfit"]
        # trainable: one fp32 shift per kept singular value; frozen: one bf16 basis of the smaller side + fp32 sigma
        # per matrix: at most min(d_in, d_out)^2 bf16 values, i.e. at most the bf16 weight itself
        assert svfit["trainable"] > 0 and svfit["modules"] == (4 if targets == "qv" else 14)
        assert 8 * svfit["trainable"] < svfit["added_bytes"] <= 8 * svfit["trainable"] + svfit["target_weight_bytes"]
        assert svfit["peak_reset"] and svfit["peak_over_model_bytes"] > 0
        assert set(svfit["rank_fraction"]) <= set(memory.PROJECTIONS)
        assert all(0 < f <= 1 for f in svfit["rank_fraction"].values())


def test_projected_bytes_match_a_count_by_hand():
    fractions = {p: 0.5 for p in memory.PROJECTIONS}
    shape = memory.SHAPES["Llama-3-8B"]  # hidden 4096, MLP 14336, 32 layers, k/v width 1024
    lora = memory.projected_bytes(shape, fractions, "qv", "lora")
    params = 32 * 8 * ((4096 + 4096) + (4096 + 1024))
    assert lora["trainable"] == 4 * params and lora["grads_and_adam"] == 12 * params and lora["frozen"] == 0
    svfit = memory.projected_bytes(shape, fractions, "qv", "svfit", ranks=8)
    r_q, r_v = 2048, 512  # half of min(d_in, d_out)
    frozen = 32 * ((r_q * 4096 + r_v * 1024) * 2 + (r_q + r_v) * 4)  # one bf16 basis + fp32 sigma
    assert svfit["frozen"] == frozen / 8 and svfit["trainable"] == 32 * (r_q + r_v) * 4 / 8
    assert svfit["total"] == svfit["frozen"] + svfit["trainable"] + svfit["grads_and_adam"]


def test_section_reports_the_goals_from_the_json_alone(quick, tmp_path):
    out, _ = quick
    (out / "memory" / "smollm2-bf16.json").write_text((out / "memory" / "tiny-llama.json").read_text())
    text = memory.section(out, tmp_path)
    assert text.startswith("## Memory") and "| qv | svfit |" in text and "| all-linear | lora |" in text
    assert ("✓" in text or "✗" in text) and "| Llama-3-70B | all-linear | 8 |" in text
    assert "Not run" in memory.section(tmp_path, tmp_path)
