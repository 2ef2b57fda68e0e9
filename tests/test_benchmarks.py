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
