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
    root = results / "quality" / "sentiment"
    probe = json.loads((root / "probe" / "probe.json").read_text())
    assert probe["train_info"]["probes"][0]["test accuracy"] > 0 and (root / "probe" / "head.safetensors").is_file()
    runs = sorted((root / "runs").glob("*.json"))
    assert {p.name for p in runs} == {f"{m}-lr{lr}-seed{s}.json" for m, lr in (("svfit", "0.0001"), ("lora", "0.001"))
                                      for s in (0, 1)}
    for path in runs:
        result = json.loads(path.read_text())
        final = result["train_info"]["metrics"][-1]
        assert final["step"] == 4 and "test accuracy" in final  # the optimizer-step count is recorded
        curve = result["train_info"]["eval curve"]
        assert [e["step"] for e in curve] == [0, 2, 4] and "valid accuracy" in curve[-1]
        assert set(result["train_info"]["test correct"]) <= {"0", "1"} and len(result["train_info"]["test correct"]) == 8
        assert result["run_info"]["train_config"]["head_init"] and result["run_info"]["train_config"]["split_seed"] == 0
    # LP-FT: every method starts from the probe, so each curve starts at the probe's validation accuracy
    start = probe["train_info"]["probes"][0]["valid accuracy"]
    assert all(json.loads(p.read_text())["train_info"]["eval curve"][0]["valid accuracy"] == start for p in runs)
    text = report.read_text()
    assert "| SVFit, energy 0.99 (default) |" in text and "| LoRA r=8 |" in text and "linear probe on" in text
    assert "Learning-rate grids" in text and "McNemar" in text and "| sentiment |" in text
    assert (tmp_path / "plots" / "quality-sentiment.png").stat().st_size > 1000
    assert json.loads((results / "run_log.json").read_text())["train_info"]["seconds_per_part"]["quality"] > 0

    # a second run skips what exists (resume), and the report is rebuilt from the JSON alone
    before = {p: p.stat().st_mtime_ns for p in [*runs, root / "probe" / "probe.json"]}
    out = CliRunner().invoke(app, ["run", "--quick", "--only", "quality", "--results", str(results),
                                   "--report", str(report)])
    assert out.exit_code == 0, out.output
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())

    # a report of other results never overwrites the committed BENCHMARKS.md and plots: it goes beside them
    committed = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
    stamp = committed.stat().st_mtime_ns if committed.exists() else None
    (results / "quality" / "NOTE.md").write_text("sentiment is being re-run with a larger validation split.\n")
    out = CliRunner().invoke(app, ["report", "--results", str(results)])
    assert out.exit_code == 0, out.output
    assert (results / "BENCHMARKS.md").is_file() and (results / "plots" / "quality-sentiment.png").is_file()
    assert "sentiment is being re-run with a larger validation split." in (results / "BENCHMARKS.md").read_text()
    assert (committed.stat().st_mtime_ns if committed.exists() else None) == stamp


def test_unknown_part_is_refused(tmp_path):
    out = CliRunner().invoke(app, ["run", "--only", "everything", "--results", str(tmp_path)])
    assert out.exit_code != 0 and "unknown part" in out.output


def test_verdict_pairs_seeds_and_calls_only_resolved_or_bounded_gaps():
    from benchmarks.quality import paired_interval, verdict

    def row(by_seed):
        return {"by_seed": by_seed, "correct": {}}

    lora = row({0: 0.70, 1: 0.60, 2: 0.80})
    # SVFit is 2 points ahead on every seed: the per-seed gaps have no spread, so it wins although the unpaired
    # stds (10 points) overlap
    ahead = verdict(row({0: 0.72, 1: 0.62, 2: 0.82}), lora)
    assert ahead["status"] == "wins" and abs(ahead["gap"] - 2.0) < 1e-9 and ahead["n"] == 3
    # gaps of +4, -4, +2: not resolved and not bounded
    assert verdict(row({0: 0.74, 1: 0.56, 2: 0.82}), lora)["status"] == "unresolved"
    # gaps of -0.2, +0.1, 0.0: the interval lies within +-1.5 points: a tie
    assert verdict(row({0: 0.698, 1: 0.601, 2: 0.80}), lora)["status"] == "ties"
    # gaps of -5, -1, -3 (mean -3, std 2): t(0.975, 2) = 4.303 gives -3 ± 4.97, which includes zero
    low, high = paired_interval([-5.0, -1.0, -3.0])
    assert abs(low - (-3 - 4.303 * 2 / 3**0.5)) < 1e-2 and abs(high - (-3 + 4.303 * 2 / 3**0.5)) < 1e-2
    assert verdict(row({0: 0.65, 1: 0.59, 2: 0.77}), lora)["status"] == "unresolved"
    assert verdict(row({0: 0.60, 1: 0.50, 2: 0.70}), lora)["status"] == "loses"
    # only the seeds both ran are compared
    assert verdict(row({0: 0.9, 4: 0.9, 5: 0.9}), lora)["n"] == 1


def test_mcnemar_counts_discordant_pairs_and_pools_them_over_seeds():
    from benchmarks.quality import mcnemar, verdict

    b, c, p = mcnemar("1101100", "1000111")
    assert (b, c) == (2, 2) and p == 1.0
    b, c, p = mcnemar("1" * 20 + "0" * 5, "0" * 20 + "1" * 5)
    assert (b, c) == (20, 5) and p < 0.01  # exact two-sided binomial test on 25 discordant pairs
    svfit = {"by_seed": {0: 0.8, 1: 0.8}, "correct": {0: "1100", 1: "1010"}}
    lora = {"by_seed": {0: 0.5, 1: 0.5}, "correct": {0: "0100", 1: "0010"}}
    v = verdict(svfit, lora)
    assert (v["b"], v["c"]) == (2, 0) and len(v["p_per_seed"]) == 2


def test_a_run_that_ends_past_the_convergence_check_is_named_with_its_curve():
    from benchmarks.quality import VARIANTS, row
    from benchmarks.quality.report import _late_note

    def run(seed, accs, losses, test):
        curve = [{"step": 100 * i, "valid accuracy": a, "valid loss": l} for i, (a, l) in enumerate(zip(accs, losses))]
        return {"run_info": {"benchmark": {"seed": seed, "lr": 1e-4}},
                "train_info": {"status": "success", "eval curve": curve, "train_time": 1.0,
                               "metrics": [{"step": 200, "test accuracy": test}]}}

    steady = run(0, [0.80, 0.86, 0.865], [0.4, 0.3, 0.3], 0.84)  # 0.5 points below its best: within the check
    late = run(1, [0.80, 0.898, 0.880], [0.4, 0.278, 0.287], 0.853)
    r = row([steady, late], VARIANTS["svfit"])
    assert abs(r["end_gap"] - 0.018) < 1e-9 and set(r["late"]) == {1}
    note = _late_note(r, 500)
    assert "ends 1.8 points below" in note and "seed 1: 89.8 at step 100 → 88.0 at 200" in note
    assert "9 of 500 examples" in note and "validation loss 0.278 → 0.287" in note and "test 85.3" in note
    assert "seed 0" not in note


def test_grid_pick_and_edges():
    from benchmarks.quality import choose

    def pts(*accs, lrs=(1e-4, 2e-4, 4e-4, 8e-4, 1.6e-3)):
        return [(lr, acc, 1.0 - acc, "success") for lr, acc in zip(lrs, accs)]

    assert choose(pts(0.7, 0.8, 0.85, 0.82, 0.6)) == (4e-4, False)
    assert choose(pts(0.7, 0.8, 0.85, 0.86, 0.9)) == (1.6e-3, True)  # best at the top end: the grid must grow
    assert choose(pts(0.9, 0.8, 0.85, 0.86, 0.8)) == (1e-4, True)
    # ties go to the lower validation loss; diverged points never win
    tie = [(1e-4, 0.8, 0.5, "success"), (2e-4, 0.8, 0.4, "success"), (4e-4, float("nan"), float("nan"), "diverged")]
    assert choose(tie) == (2e-4, False)
    assert choose([(1e-4, 0.5, 0.5, "success")]) == (1e-4, False)  # one point has no ends


def test_the_report_shows_the_accelerator_results_beside_the_cpu_ones(tmp_path):
    """benchmarks/results-cuda (what benchmarks/device/run.sh measured) is summarised in the committed report's
    quality and init sections, with its provenance; another results folder does not pick it up."""
    import shutil

    from benchmarks import ACCELERATOR_RESULTS, RESULTS, init, quality

    text = quality.section(RESULTS, tmp_path / "plots")
    assert "The same benchmark on an accelerator" in text and "carried there in float16" in text
    start = text.index("The same benchmark on an accelerator")
    sentiment = next(line for line in text[start:].splitlines() if line.startswith("| sentiment |"))
    assert sentiment.endswith("| loses |")
    assert "On an accelerator" in init.section(RESULTS, tmp_path / "plots")
    shutil.copytree(ACCELERATOR_RESULTS, tmp_path / "results-cuda")
    (tmp_path / "results").mkdir()  # a results folder that is not the committed one, with results-cuda beside it
    assert "accelerator" not in quality.section(tmp_path / "results", tmp_path / "plots")
    assert "On an accelerator" not in init.section(tmp_path / "results", tmp_path / "plots")


def test_a_task_whose_verdict_still_waits_for_runs_is_in_progress():
    from dataclasses import replace

    from benchmarks.quality import CPU, VARIANTS, row
    from benchmarks.quality.report import _summary

    profile = replace(CPU, tasks={"lm": CPU.tasks["lm-sentiment"]})  # grids centred on 4e-5 (SVFit), 1e-3 (LoRA)

    def run(seed, lr, test):
        curve = [{"step": 0, "valid accuracy": 0.8, "valid loss": 0.5}, {"step": 100, "valid accuracy": 0.9,
                                                                          "valid loss": 0.3}]
        return {"run_info": {"benchmark": {"seed": seed, "lr": lr}},
                "train_info": {"status": "success", "eval curve": curve, "train_time": 1.0,
                               "metrics": [{"step": 100, "test accuracy": test}], "test correct": "1101"}}

    def grid(centre, n, best):  # n points from the low end of the planned grid; ``best`` scores highest
        lrs = [centre * 2.0 ** (k - 2) for k in range(n)]
        return [(lr, 0.95 if lr == best else 0.9, 0.3, "success") for lr in lrs]

    def task(svfit_points, seeds, svfit_best=8e-5):
        rows = {"svfit": row([run(s, svfit_best, 0.9 - 0.01 * s) for s in seeds], VARIANTS["svfit"]),
                "lora": row([run(s, 2e-3, 0.7) for s in seeds], VARIANTS["lora"])}
        grids = {"svfit": grid(4e-5, svfit_points, svfit_best), "lora": grid(1e-3, 5, 2e-3)}
        picks = {"svfit": (svfit_best, svfit_best in (grids["svfit"][0][0], grids["svfit"][-1][0])),
                 "lora": (2e-3, False)}
        return {"runs": [{}], "rows": rows, "probe": None, "grids": grids, "picks": picks}

    def status(t):
        lines, verdicts = _summary({"lm": t}, profile)
        return verdicts["lm"][0], lines[-1]

    v, line = status(task(2, [0], svfit_best=2e-5))
    assert v["status"] == "in progress" and "SVFit's learning-rate grid (2 of 5 points run)" in v["text"]
    assert "LoRA" not in v["text"] and line.endswith("| in progress |")
    v, _ = status(task(5, [0, 1]))  # grids complete, seed 2 missing
    assert v["status"] == "in progress" and "SVFit's seed 2 and LoRA r=8's seed 2 at the picks" in v["text"]
    t = task(5, [0, 1, 2])
    t["rows"]["lora"] = row([run(0, 2e-3, 0.7)], VARIANTS["lora"])  # SVFit's seeds are in, LoRA's 1-2 are not
    v, _ = status(t)
    assert v["status"] == "in progress" and "LoRA r=8's seeds 1, 2 at the picks" in v["text"]
    assert "SVFit's seed" not in v["text"]
    v, _ = status(task(5, [0], svfit_best=1.6e-4))  # the pick sits at the upper end, which has not grown yet
    assert v["status"] == "in progress" and "grow past its upper end" in v["text"]
    v, _ = status(task(5, [0, 1, 2]))  # everything the verdict needs: it is called
    assert v["status"] == "wins" and "gap" in v
