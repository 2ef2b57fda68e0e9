"""The benchmark pipeline end to end at --quick size: real runs through the training loop, then the report."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from benchmarks.__main__ import app


def test_quick_quality_run_writes_results_and_a_report(tmp_path):
    results = tmp_path / "results"
    report = tmp_path / "BENCHMARKS.md"
    out = CliRunner().invoke(app, ["run", "--quick", "--only", "quality", "--results", str(results),
                                   "--report", str(report)])
    assert out.exit_code == 0, out.output
    runs = sorted((results / "quality" / "sentiment").glob("*/*.json"))
    kinds = {p.parent.name for p in runs}
    assert kinds == {"tune", "test", "ablation"}
    for path in runs:
        result = json.loads(path.read_text())
        assert {"run_info", "train_info", "meta_info"} <= set(result)
        assert result["run_info"]["benchmark"]["variant"]
    # tuning runs score the validation split, table runs the test split, curves are recorded for SVFit and LoRA
    tune = json.loads(next((results / "quality" / "sentiment" / "tune").glob("svfit-*.json")).read_text())
    assert "valid accuracy" in tune["train_info"]["metrics"][-1]
    test = json.loads((results / "quality" / "sentiment" / "test" / "svfit-seed1.json").read_text())
    assert "test accuracy" in test["train_info"]["metrics"][-1] and test["train_info"]["eval curve"]
    text = report.read_text()
    assert "| SVFit, energy 0.99 (default) |" in text and "| LoRA r=8 |" in text
    assert "Learning-rate tuning" in text and "Threshold ablation" in text and "Learning curves" in text
    for png in ("quality-sentiment.png", "curves-sentiment.png", "ablation-sentiment.png"):
        assert (tmp_path / "plots" / png).stat().st_size > 1000
    assert json.loads((results / "run_log.json").read_text())["train_info"]["seconds_per_part"]["quality"] > 0

    # a second run skips what exists (resume), and the report is rebuilt from the JSON alone
    before = {p: p.stat().st_mtime_ns for p in runs}
    out = CliRunner().invoke(app, ["run", "--quick", "--only", "quality", "--results", str(results),
                                   "--report", str(report)])
    assert out.exit_code == 0, out.output
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())


def test_unknown_part_is_refused(tmp_path):
    out = CliRunner().invoke(app, ["run", "--only", "everything", "--results", str(tmp_path)])
    assert out.exit_code != 0 and "unknown part" in out.output


def test_verdict_pairs_seeds_and_states_the_test_grain():
    from benchmarks.quality import verdict

    def row(by_seed, params, examples=50):
        return {"by_seed": by_seed, "adapter_params": params, "examples": examples}

    lora = row({1: 0.70, 2: 0.60, 3: 0.80}, 1600)
    # SVFit is 2 points ahead on every seed: the per-seed gaps have no spread, so it beats LoRA although the
    # unpaired stds (10 points) would overlap
    ahead = verdict(row({1: 0.72, 2: 0.62, 3: 0.82}, 100), lora)
    assert "beats LoRA r=8: +2.0 ± 0.0 points over 3 paired seeds on 50 test examples (one example = 2.0 points)" in ahead
    assert "16.0× fewer adapter parameters" in ahead
    # gaps of +4, -4, +2: the mean (0.7) sits within their std, a tie
    assert "ties with" in verdict(row({1: 0.74, 2: 0.56, 3: 0.82}, 100), lora)
    assert "loses to" in verdict(row({1: 0.60, 2: 0.50, 3: 0.70}, 100), lora)
    # only the seeds both ran are compared
    assert "not enough paired seeds (1)" in verdict(row({1: 0.9, 4: 0.9, 5: 0.9}, 100), lora)
