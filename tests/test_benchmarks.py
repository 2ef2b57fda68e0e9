"""The benchmark pipeline end to end at --quick size: real runs through the training loop, then the report."""

from __future__ import annotations

import json
from pathlib import Path

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

    # a report of other results never overwrites the committed BENCHMARKS.md and plots: it goes beside them
    committed = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
    stamp = committed.stat().st_mtime_ns if committed.exists() else None
    out = CliRunner().invoke(app, ["report", "--results", str(results)])
    assert out.exit_code == 0, out.output
    assert (results / "BENCHMARKS.md").is_file() and (results / "plots" / "quality-sentiment.png").is_file()
    assert (committed.stat().st_mtime_ns if committed.exists() else None) == stamp


def test_unknown_part_is_refused(tmp_path):
    out = CliRunner().invoke(app, ["run", "--only", "everything", "--results", str(tmp_path)])
    assert out.exit_code != 0 and "unknown part" in out.output


def test_verdict_pairs_seeds_and_calls_only_resolved_gaps():
    from benchmarks.quality import paired_interval, verdict

    def row(by_seed, params, examples=50):
        return {"by_seed": by_seed, "adapter_params": params, "examples": examples}

    lora = row({1: 0.70, 2: 0.60, 3: 0.80}, 1600)
    # SVFit is 2 points ahead on every seed: the per-seed gaps have no spread, so it beats LoRA although the
    # unpaired stds (10 points) overlap
    ahead = verdict(row({1: 0.72, 2: 0.62, 3: 0.82}, 100), lora)
    assert ahead.startswith("SVFit (energy 0.99) beats LoRA r=8: +2.0 ± 0.0 points over 3 paired seeds")
    assert "on 50 test examples (one example = 2.0 points)" in ahead and "16.0× fewer adapter parameters" in ahead
    # gaps of +4, -4, +2: not resolved, and the text says which side the mean falls on
    assert "vs LoRA r=8: not resolved (ahead on average): +0.7" in verdict(row({1: 0.74, 2: 0.56, 3: 0.82}, 100), lora)
    # gaps of -5, -1, -3 (mean -3, std 2): t(0.975, 2) = 4.303 gives -3 ± 4.97, which includes zero
    low, high = paired_interval([-5.0, -1.0, -3.0])
    assert abs(low - (-3 - 4.303 * 2 / 3**0.5)) < 1e-2 and abs(high - (-3 + 4.303 * 2 / 3**0.5)) < 1e-2
    assert "vs LoRA r=8: not resolved (behind on average): -3.0 ± 2.0" in verdict(row({1: 0.65, 2: 0.59, 3: 0.77}, 100), lora)
    assert "loses to" in verdict(row({1: 0.60, 2: 0.50, 3: 0.70}, 100), lora)
    # only the seeds both ran are compared
    assert "not enough paired seeds (1)" in verdict(row({1: 0.9, 4: 0.9, 5: 0.9}, 100), lora)
