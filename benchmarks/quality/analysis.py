"""Reading the quality results: grid picks, per-method rows over seeds, and the SVFit-vs-LoRA verdict (paired seed
interval and McNemar's exact test). Reads the JSON files alone; runs nothing."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Optional

from benchmarks.quality.plan import ALL, Variant, grid_lr


def ok(result: dict) -> bool:
    return result["train_info"].get("status") == "success"


def final_valid(result: dict) -> tuple[float, float]:
    """(accuracy, loss) on the validation split at the end of training: the last point of the curve."""
    curve = result["train_info"].get("eval curve") or []
    if not ok(result) or not curve:
        return float("nan"), float("nan")
    return curve[-1]["valid accuracy"], curve[-1]["valid loss"]


def test_accuracy(result: dict) -> float:
    return result["train_info"]["metrics"][-1].get("test accuracy", float("nan"))


def steps_of(result: dict) -> int:
    return result["train_info"]["metrics"][-1].get("step", 0)


def grid_points(runs: list[dict]) -> list[tuple[float, float, float, str]]:
    """(lr, final validation accuracy, loss, status) of a variant's seed-0 runs, by lr."""
    points = []
    for r in runs:
        b = r["run_info"]["benchmark"]
        if b["seed"] == 0:
            acc, loss = final_valid(r)
            points.append((b["lr"], acc, loss, r["train_info"].get("status")))
    return sorted(points)


def choose(grid) -> tuple[Optional[float], bool]:
    """The learning rate with the best final validation accuracy (ties: lower validation loss), and whether it is
    an end of the grid (only a grid of 3 or more points has ends)."""
    good = [(acc, -loss, lr) for lr, acc, loss, status in grid if status == "success" and not math.isnan(acc)]
    if not good:
        return None, False
    pick = max(good)[2]
    lrs = [lr for lr, *_ in grid]
    return pick, len(lrs) >= 3 and pick in (min(lrs), max(lrs))


def load(results: Path) -> dict:
    """{task: {"probe": probe.json, "runs": [...], "grids": {variant: points}, "picks": {variant: (lr, edge)},
    "rows": {variant: row}}} from the JSON files alone."""
    table = {}
    for task_dir in sorted(p for p in (results / "quality").glob("*") if p.is_dir()):
        probe_path = task_dir / "probe" / "probe.json"
        runs = [json.loads(p.read_text()) for p in sorted((task_dir / "runs").glob("*.json"))]
        if not runs and not probe_path.is_file():
            continue
        by_variant: dict[str, list[dict]] = {}
        for r in runs:
            by_variant.setdefault(r["run_info"]["benchmark"]["variant"], []).append(r)
        grids = {name: grid_points(rs) for name, rs in by_variant.items() if ALL.get(name, Variant(name, "")).tuned}
        picks = {name: choose(g) for name, g in grids.items()}
        rows = {}
        for name, rs in by_variant.items():
            v = ALL.get(name)
            if v is None:
                continue
            source = picks.get(v.source, (None, False))[0]
            if source is None:
                continue
            lr = grid_lr(source * v.lr_factor)
            at = [r for r in rs if r["run_info"]["benchmark"]["lr"] == lr]
            if at:
                rows[name] = row(at, v)
        table[task_dir.name] = {"probe": json.loads(probe_path.read_text()) if probe_path.is_file() else None,
                                "runs": runs, "grids": grids, "picks": picks, "rows": rows}
    return table


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


END_GAP_LIMIT = 0.01  # a converged run ends within 1 point of its best validation accuracy


def row(results: list[dict], v: Variant) -> dict:
    good = [r for r in results if ok(r)]
    accs = {r["run_info"]["benchmark"]["seed"]: test_accuracy(r) for r in good}
    m, s = mean_std(list(accs.values()))
    info = good[0]["train_info"] if good else {}
    gaps, late = [], {}  # best validation accuracy on the curve minus the final one, per seed; the seeds past 1 point
    for r in good:
        curve = r["train_info"].get("eval curve", [])
        if curve:
            best = max(curve, key=lambda e: e["valid accuracy"])
            gaps.append(best["valid accuracy"] - curve[-1]["valid accuracy"])
            if gaps[-1] > END_GAP_LIMIT:
                late[r["run_info"]["benchmark"]["seed"]] = (best, curve[-1])
    final = good[0]["train_info"]["metrics"][-1] if good else {}
    return {
        "label": v.label or v.name,
        "lr": results[0]["run_info"]["benchmark"]["lr"],
        "mean": m,
        "std": s,
        "n": len(accs),
        "diverged": len(results) - len(good),
        "by_seed": accs,
        "correct": {r["run_info"]["benchmark"]["seed"]: r["train_info"].get("test correct") for r in good},
        "steps": sorted({steps_of(r) for r in good}),
        "epochs": max((e.get("epoch", 0.0) for r in good for e in r["train_info"]["metrics"][:-1]), default=0.0),
        "end_gap": max(gaps) if gaps else float("nan"),
        "late": late,
        "valid": statistics.fmean(final_valid(r)[0] for r in good) if good else float("nan"),
        "adapter_params": info.get("num_trainable_params", 0) - info.get("num_head_params", 0),
        "head_params": info.get("num_head_params", 0),
        "file_bytes": info.get("file_size", 0),
        "train_time": statistics.median(r["train_info"]["train_time"] for r in good) if good else float("nan"),
        "examples": final.get("test examples"),
        "curves": [r["train_info"].get("eval curve", []) for r in good],
    }


def paired_interval(gaps: list[float], level: float = 0.95) -> tuple[float, float]:
    """Student-t interval of the mean per-seed gap (a paired t-test: each seed fixes the init and data order; the
    test set is the same for every seed)."""
    from scipy import stats

    m, s = mean_std(gaps)
    if s == 0.0:  # identical gaps: the interval collapses (scipy would divide by zero)
        return m, m
    half = stats.t.ppf(0.5 + level / 2, len(gaps) - 1) * s / len(gaps) ** 0.5
    return m - half, m + half


def mcnemar(a: str, b: str) -> tuple[int, int, float]:
    """(a right and b wrong, a wrong and b right, exact two-sided McNemar p) over the same test examples."""
    from scipy import stats

    if len(a) != len(b):
        raise ValueError("McNemar needs both runs on the same test examples")
    only_a = sum(1 for x, y in zip(a, b) if x == "1" and y == "0")
    only_b = sum(1 for x, y in zip(a, b) if x == "0" and y == "1")
    p = stats.binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    return only_a, only_b, float(p)


BOUND = 1.5  # points: an interval inside +-BOUND bounds the gap (a tie)


def verdict(svfit: dict, lora: dict) -> dict:
    """SVFit vs LoRA over the seeds both have: the mean per-seed gap in points, its paired 95% t-interval, McNemar's
    exact test on the pooled discordant pairs (each seed's SVFit run against the same seed's LoRA run), and
    the status: 'wins' / 'loses' (the interval excludes zero), 'ties' (it lies within +-1.5 points) or
    'unresolved'."""
    seeds = sorted(set(svfit["by_seed"]) & set(lora["by_seed"]))
    out = {"seeds": seeds, "n": len(seeds)}
    if len(seeds) < 2:
        return {**out, "status": "unresolved", "text": f"not enough paired seeds ({len(seeds)}) to call"}
    gaps = [100 * (svfit["by_seed"][k] - lora["by_seed"][k]) for k in seeds]
    m, s = mean_std(gaps)
    low, high = paired_interval(gaps)
    if low > 0 or high < 0:
        status = "wins" if m > 0 else "loses"
    elif -BOUND <= low and high <= BOUND:
        status = "ties"
    else:
        status = "unresolved"
    b = c = 0
    per_seed = []
    for k in seeds:
        x, y = svfit.get("correct", {}).get(k), lora.get("correct", {}).get(k)
        if x and y:
            bk, ck, pk = mcnemar(x, y)
            b, c = b + bk, c + ck
            per_seed.append(pk)
    p = mcnemar("1" * b + "0" * c, "0" * b + "1" * c)[2] if per_seed else float("nan")
    return {**out, "status": status, "gap": m, "std": s, "low": low, "high": high, "b": b, "c": c, "p": p,
            "p_per_seed": per_seed}
