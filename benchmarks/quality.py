"""Quality: every method through `svfit train`'s own runner (same loop, data and budget), with learning rates tuned
on a validation split under one grid budget per method, then several seeds on the test split; plus the threshold
ablation and the learning curves.

Every experiment is one `svfit train` run; its result.json is copied to
`<results>/quality/<task>/<kind>/<name>.json` and the run directory (adapter, or whole model for full fine-tuning)
is deleted. An experiment whose JSON exists is skipped, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from svfit.errors import SVFitUserError
from svfit.methods import MethodOptions
from svfit.train.results import held_out, write_json
from svfit.train.run import RunConfig, train_run


@dataclass(frozen=True)
class Variant:
    """A row of the quality table: a method and its options; it uses its method's tuned learning rate."""

    name: str
    method: str
    options: MethodOptions = field(default_factory=MethodOptions)
    label: str = ""


VARIANTS = {
    v.name: v
    for v in [
        Variant("svfit", "svfit", MethodOptions(), "SVFit, energy 0.99 (default)"),
        Variant("svfit-nuclear", "svfit", MethodOptions(information="nuclear"), "SVFit, nuclear 0.99"),
        Variant("svfit-full", "svfit", MethodOptions(rank="full"), "SVFit, full spectrum (SVFT-Plain)"),
        Variant("svfit-r4", "svfit", MethodOptions(rank=4), "SVFit, fixed r=4"),
        Variant("lora", "lora", MethodOptions(), "LoRA r=8"),
        Variant("pissa", "pissa", MethodOptions(), "PiSSA r=8"),
        Variant("ia3", "ia3", MethodOptions(), "IA³"),
        Variant("full", "full", MethodOptions(), "full fine-tuning"),
    ]
}
ABLATION = {  # threshold -> variant; 0.99 and the full spectrum come from the main table
    0.9: Variant("svfit-t0.90", "svfit", MethodOptions(threshold=0.9), "SVFit, energy 0.90"),
    0.95: Variant("svfit-t0.95", "svfit", MethodOptions(threshold=0.95), "SVFit, energy 0.95"),
}
CURVE_VARIANTS = ("svfit", "lora", "pissa")  # "rapid adaptation": scored during training


@dataclass(frozen=True)
class TaskBudget:
    train_limit: int
    eval_limit: int  # test examples scored
    val_examples: int  # validation examples (from the training data) for tuning and curves
    epochs: float = 1.0
    eval_every: int = 10


@dataclass(frozen=True)
class Profile:
    budgets: dict[str, TaskBudget]
    seeds: tuple[int, ...]
    variants: tuple[str, ...]
    grid: tuple[float, ...]  # factors applied to each method's default lr: the same budget for every method
    ablation_tasks: tuple[str, ...]


FULL = Profile(
    budgets={
        # ordered cheapest-first, so that an interrupted run has the most tasks complete
        "sentiment": TaskBudget(600, 400, 200, eval_every=4),
        "fashion": TaskBudget(400, 300, 200, eval_every=4),
        "vit-fashion": TaskBudget(400, 300, 200, eval_every=4),
        "subjectivity": TaskBudget(600, 400, 200, eval_every=4),
        "lm-sentiment": TaskBudget(96, 48, 48, eval_every=2),
    },
    seeds=(1, 2, 3),
    variants=tuple(VARIANTS),
    grid=(1 / 3, 1.0, 3.0),
    ablation_tasks=("sentiment", "vit-fashion"),
)
QUICK = Profile(
    budgets={"sentiment": TaskBudget(16, 8, 8, eval_every=1)},
    seeds=(1,),
    variants=("svfit", "lora"),
    grid=(1.0,),
    ablation_tasks=("sentiment",),
)


def run(out: Path, quick: bool, tasks: Optional[list[str]] = None, log: Callable[[str], None] = print) -> None:
    profile = QUICK if quick else FULL
    unknown = sorted(set(tasks or ()) - set(profile.budgets))
    if unknown:
        raise ValueError(f"no benchmark budget for task(s) {unknown}; choose from {', '.join(profile.budgets)}")
    budgets = {t: b for t, b in profile.budgets.items() if tasks is None or t in tasks}
    scratch = Path(tempfile.mkdtemp(prefix="svfit-bench-"))
    try:
        for task, budget in budgets.items():
            root = out / "quality" / task
            lrs = tune(root, task, budget, profile, scratch, log)
            for seed in profile.seeds:
                for name in profile.variants:
                    v = VARIANTS[name]
                    if lrs[v.method] is None:
                        continue
                    curves = budget.eval_every if name in CURVE_VARIANTS else None
                    experiment(root / "test" / f"{name}-seed{seed}.json", task, v, lrs[v.method], seed, budget,
                               scratch, log, eval_every=curves)
                if task in profile.ablation_tasks:
                    for threshold, v in ABLATION.items():
                        if quick and threshold != 0.9:
                            continue
                        experiment(root / "ablation" / f"{v.name}-seed{seed}.json", task, v, lrs["svfit"], seed,
                                   budget, scratch, log)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def tune(root: Path, task: str, budget: TaskBudget, profile: Profile, scratch: Path, log) -> dict[str, float]:
    """Each method's lr: the best validation accuracy over ``grid`` x its default (ties: lower validation loss)."""
    from svfit.tasks import get_task

    defaults = get_task(task).defaults
    methods = sorted({VARIANTS[name].method for name in profile.variants})
    best = {}
    for method in methods:
        scores = []
        for factor in profile.grid:
            lr = float(f"{defaults.lr[method] * factor:.3g}")
            path = root / "tune" / f"{method}-lr{lr:g}.json"
            result = experiment(path, task, Variant(method, method), lr, 0, budget, scratch, log, validation=True)
            final = held_out(result["train_info"]["metrics"][-1])
            if result["train_info"].get("status") == "success":
                scores.append((final["accuracy"], -final["loss"], lr))
        best[method] = max(scores)[2] if scores else None  # None: unsupported here, or every point diverged
    write_json(root / "tuned_lr.json", {"grid_factors": list(profile.grid), "lr": best})
    return best


def experiment(path: Path, task: str, v: Variant, lr: float, seed: int, budget: TaskBudget, scratch: Path, log,
               validation: bool = False, eval_every: Optional[int] = None) -> dict:
    config = RunConfig(
        task=task,
        method=v.method,
        out=scratch / path.stem,
        seed=seed,
        epochs=budget.epochs,
        lr=lr,
        train_limit=budget.train_limit,
        eval_limit=budget.val_examples if validation else budget.eval_limit,
        validation=validation,
        eval_every=eval_every,
        curve_examples=budget.val_examples,
        options=v.options,
        overwrite=True,
        progress=False,
    )
    if path.is_file():
        done = json.loads(path.read_text())
        if _same_setting(done["run_info"]["train_config"], config):
            return done  # resume: this exact experiment is already measured
    started = time.perf_counter()
    try:
        result = train_run(config, echo=lambda _: None)
    except FloatingPointError as exc:  # a diverging grid point is a result (it loses), not a crash
        result = _failed(config, str(exc), "diverged")
    except SVFitUserError as exc:  # e.g. PEFT's PiSSA on a task whose targets are Conv2d
        result = _failed(config, str(exc), "unsupported")
    finally:
        shutil.rmtree(config.out, ignore_errors=True)  # run dirs can hold a whole model; the JSON is the record
    result["run_info"]["benchmark"] = {"variant": v.name, "label": v.label or v.name, "lr": lr, "seed": seed,
                                       "validation": validation}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, result)
    final = held_out(result["train_info"]["metrics"][-1])
    log(f"{task:13s} {path.parent.name:8s} {v.name:14s} seed {seed} lr {lr:<8g} {final['split']} accuracy "
        f"{final['accuracy']:.4f}  ({time.perf_counter() - started:.0f} s)")
    return result


def _same_setting(recorded: dict, config: RunConfig) -> bool:
    wanted = config.resolved().to_json()
    keys = ("task", "method", "seed", "epochs", "lr", "train_limit", "eval_limit", "validation", "options",
            "batch_size", "head_lr")
    return all(json.loads(json.dumps(recorded.get(k))) == json.loads(json.dumps(wanted.get(k))) for k in keys)


def _failed(config: RunConfig, message: str, status: str) -> dict:
    split = "valid" if config.validation else "test"
    nan = float("nan")
    return {
        "run_info": {"train_config": config.resolved().to_json(), "error_msg": message},
        "train_info": {"status": status, "metrics": [{f"{split} accuracy": nan, f"{split} loss": nan}]},
        "meta_info": {},
    }


# -- reading the results back ----------------------------------------------------------------------------------


def load(results: Path) -> dict[str, dict[str, list[dict]]]:
    """{task: {kind/name-without-seed: [result, ...]}} for kind in test, ablation, tune."""
    table: dict[str, dict[str, list[dict]]] = {}
    for path in sorted((results / "quality").glob("*/*/*.json")):
        task, kind = path.parent.parent.name, path.parent.name
        name = path.stem.rsplit("-seed", 1)[0]
        table.setdefault(task, {}).setdefault(f"{kind}/{name}", []).append(json.loads(path.read_text()))
    return table


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def row(results: list[dict]) -> dict:
    ok = [r for r in results if r["train_info"].get("status") == "success"]
    accs = {r["run_info"]["benchmark"]["seed"]: held_out(r["train_info"]["metrics"][-1])["accuracy"] for r in ok}
    m, s = mean_std(list(accs.values()))
    info = ok[0]["train_info"] if ok else {}
    bench = results[0]["run_info"]["benchmark"]
    return {
        "mean": m,
        "std": s,
        "n": len(accs),
        "diverged": len(results) - len(ok),
        "by_seed": accs,
        "adapter_params": info.get("num_trainable_params", 0) - info.get("num_head_params", 0),
        "head_params": info.get("num_head_params", 0),
        "file_bytes": info.get("file_size", 0),
        # the median: a seed that shared the cores with another job must not set the column
        "train_time": statistics.median(r["train_info"]["train_time"] for r in ok) if ok else float("nan"),
        "lr": bench["lr"],
        "label": bench["label"],
        "examples": held_out(ok[0]["train_info"]["metrics"][-1])["examples"] if ok else None,
    }


def paired_interval(gaps: list[float], level: float = 0.95) -> tuple[float, float]:
    """Student-t interval of the mean per-seed gap (a paired t-test: each seed fixes the data split and the init)."""
    from scipy import stats

    m, s = mean_std(gaps)
    if s == 0.0:  # identical gaps: the interval collapses (scipy would divide by zero)
        return m, m
    half = stats.t.ppf(0.5 + level / 2, len(gaps) - 1) * s / len(gaps) ** 0.5
    return m - half, m + half


def verdict(svfit: dict, lora: dict) -> str:
    """Paired over the seeds both have: the mean per-seed gap, and whether its 95% t-interval excludes zero."""
    seeds = sorted(set(svfit["by_seed"]) & set(lora["by_seed"]))
    if len(seeds) < 2:
        return f"not enough paired seeds ({len(seeds)}) to call"
    gaps = [100 * (svfit["by_seed"][k] - lora["by_seed"][k]) for k in seeds]
    m, s = mean_std(gaps)
    low, high = paired_interval(gaps)
    if low > 0 or high < 0:
        word = "beats LoRA r=8" if m > 0 else "loses to LoRA r=8"
    else:
        side = "ahead" if m > 0 else "behind" if m < 0 else "level"
        word = f"vs LoRA r=8: not resolved ({side} on average)"
    ratio = lora["adapter_params"] / max(svfit["adapter_params"], 1)
    size = f"{ratio:.1f}× fewer" if ratio >= 1 else f"{1 / ratio:.1f}× more"
    # how coarse the metric is: on a small test slice one example moves accuracy by several points
    n = svfit.get("examples")
    grain = f" on {n} test examples (one example = {100 / n:.1f} points)" if n else ""
    return (f"SVFit (energy 0.99) {word}: {m:+.1f} ± {s:.1f} points over {len(seeds)} paired seeds, 95% "
            f"interval {low:+.1f} to {high:+.1f}{grain}, with {size} adapter parameters")


def section(results: Path, plots: Path, link_prefix: str = "benchmarks/plots") -> str:
    table = load(results)
    if not table:
        return "## Quality\n\nNot run (`python -m benchmarks run --only quality`).\n"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots.mkdir(parents=True, exist_ok=True)
    lines = ["## Quality: accuracy over seeds, with parameters and file size", ""]
    lines += [
        "Every row went through the same training loop (`svfit train`'s runner) with the same data, epochs and batch "
        "size within a task; only the learning rate differs, tuned per method on a validation split carved from the "
        "training data (the grid is below). Accuracy is on the held-out test slice, mean ± std over seeds. "
        "*Adapter* counts trainable parameters outside the new task head (the head is the same for every method); "
        "*file* is the saved adapter file's bytes, which include the new task head where the task adds one (the "
        "parameter table above gives adapter-only sizes; the whole model for full fine-tuning). *train s* is the "
        "median over seeds. Δ vs LoRA is in accuracy points.",
        "",
    ]
    every = [r for groups in table.values() for runs in groups.values() for r in runs]
    compute = sum(r["run_info"].get("total_time", 0.0) for r in every)
    # a task counts as run once it has test-seed results; tuning points alone mean it was interrupted
    missing = [t for t in FULL.budgets if not any(k.startswith("test/") for k in table.get(t, {}))]
    # a task whose test runs were interrupted: fewer methods or seeds than the full profile asks for
    def _tuned_untested(groups) -> set:
        tuned = {r["run_info"]["benchmark"]["variant"] for k, rs in groups.items() if k.startswith("tune/")
                 for r in rs if r["train_info"].get("status") == "success"}
        return tuned - {k.split("/", 1)[1] for k in groups if k.startswith("test/")}

    partial = [t for t, groups in table.items() if t not in missing and (
        _tuned_untested(groups)
        or any(len(v) < len(FULL.seeds) for k, v in groups.items() if k.startswith("test/")))]
    lines += [f"{len(every)} experiments, {compute / 60:.0f} min of compute in all (sum of the runs' wall times)."
              + (f" **Not run yet: {', '.join(missing)}** (`python -m benchmarks run --only quality --task ...` "
                 "resumes)." if missing else "")
              + (f" **Incomplete (interrupted; the same command resumes): {', '.join(partial)}** — its table "
                 "has fewer methods or seeds than the others." if partial else ""), ""]
    verdicts = []
    for task, groups in table.items():
        rows = {k.split("/", 1)[1]: row(v) for k, v in groups.items() if k.startswith("test/")}
        if not rows:
            continue
        first = next(iter(groups.values()))[0]
        rtc = first["run_info"]["train_config"]
        lines += [f"### {task}", "",
                  f"{first['meta_info']['model_info']['name']} on {first['meta_info']['dataset_info']['name']}: "
                  f"{rtc['train_limit']} training examples, {rtc['epochs']:g} epoch(s), batch {rtc['batch_size']}; "
                  f"test slice of {held_out(first['train_info']['metrics'][-1])['examples'] or rtc['eval_limit']} examples.",
                  "", "| method | accuracy | Δ vs LoRA | seeds | adapter params | file bytes (incl. head) | lr | train s |",
                  "|---|---|---|---|---|---|---|---|"]
        lora = rows.get("lora")
        for name in [n for n in VARIANTS if n in rows]:
            r = rows[name]
            delta = f"{100 * (r['mean'] - lora['mean']):+.1f}" if lora else "–"
            seeds = f"{r['n']}" + (f" (+{r['diverged']} diverged)" if r["diverged"] else "")
            lines.append(f"| {r['label']} | {r['mean']:.3f} ± {r['std']:.3f} | {delta} | {seeds} | "
                         f"{r['adapter_params']:,} | {r['file_bytes']:,} | {r['lr']:g} | {r['train_time']:.0f} |")
        if lora and "svfit" in rows:
            verdicts.append(f"- **{task}**: {verdict(rows['svfit'], lora)}.")
        lines.append("")
        for method, reason in _unsupported(groups).items():
            if method not in rows:
                lines += [f"Not in this table: **{method}**: {reason}.", ""]
        _bar_plot(plt, task, rows, plots / f"quality-{task}.png")
        lines += [f"![accuracy per method on {task}]({link_prefix}/quality-{task}.png)", ""]
    if verdicts:
        lines[4:4] = ["**Does SVFit outperform LoRA?** (the paper's claim (b)). Each seed pairs the two methods on "
                      "the same data; 'beats' or 'loses to' only where the 95% Student-t interval of the mean "
                      "per-seed gap excludes zero, 'not resolved' otherwise.", "", *verdicts, ""]
    lines += _tuning_section(table, results)
    lines += _ablation_section(table, plt, plots, link_prefix)
    lines += _curves_section(table, plt, plots, link_prefix)
    return "\n".join(lines) + "\n"


def _unsupported(groups: dict) -> dict[str, str]:
    """{method: why} for the methods whose tuning runs all failed as unsupported on this task."""
    why: dict[str, str] = {}
    for key, runs in groups.items():
        if key.startswith("tune/"):
            for r in runs:
                if r["train_info"].get("status") == "unsupported":
                    why[r["run_info"]["benchmark"]["variant"]] = r["run_info"].get("error_msg", "").rstrip(".")
    return why


def _bar_plot(plt, task: str, rows: dict, path: Path) -> None:
    names = [n for n in VARIANTS if n in rows]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    colors = ["tab:blue" if n.startswith("svfit") else "tab:gray" for n in names]
    ax.bar(range(len(names)), [rows[n]["mean"] for n in names], yerr=[rows[n]["std"] for n in names],
           color=colors, capsize=3)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    low = min(rows[n]["mean"] - rows[n]["std"] for n in names)
    ax.set_ylim(max(0.0, low - 0.05), min(1.0, max(rows[n]["mean"] + rows[n]["std"] for n in names) + 0.03))
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{task}: mean ± std over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _tuning_section(table, results: Path) -> list[str]:
    lines = ["### Learning-rate tuning", "",
             "Each method got the same budget: its default learning rate times each grid factor, one run each on "
             "a validation split carved from the training data (seed 0); the best validation accuracy (ties: lower "
             "loss) was used for every seed. SVFit's variants use SVFit's tuned rate. (Text tasks draw their split "
             "per seed, so seed 0's validation texts may sit in another seed's test slice: this touches only the "
             "choice of learning rate.) *edge* marks a pick at the end of its grid: that method's best rate may "
             "lie beyond it, so its row may understate it.", "",
             "| task | method | grid (lr: validation accuracy) | chosen |", "|---|---|---|---|"]
    for task, groups in table.items():
        chosen_path = results / "quality" / task / "tuned_lr.json"
        chosen = json.loads(chosen_path.read_text())["lr"] if chosen_path.is_file() else {}
        per_method: dict[str, list[tuple[float, str]]] = {}
        for key, runs in groups.items():
            if key.startswith("tune/"):
                for r in runs:
                    b = r["run_info"]["benchmark"]
                    ok = r["train_info"].get("status") == "success"
                    acc = held_out(r["train_info"]["metrics"][-1])["accuracy"]
                    status = r["train_info"].get("status")
                    per_method.setdefault(b["variant"], []).append((b["lr"], f"{acc:.3f}" if ok else status))
        for method, points in sorted(per_method.items()):
            points.sort()
            grid = ", ".join(f"{lr:g}: {acc}" for lr, acc in points)
            pick = chosen.get(method)
            if pick is None:
                reason = next((r["run_info"].get("error_msg", "") for k, rs in groups.items() if k.startswith("tune/")
                               for r in rs if r["run_info"]["benchmark"]["variant"] == method), "")
                # no error: the task's tuning was interrupted before every method had its grid (it resumes)
                lines.append(f"| {task} | {method} | {grid} | "
                             f"{'not run: ' + reason if reason else 'pending: the tuning of this task is incomplete'} |")
            else:
                lrs = [lr for lr, _ in points]
                edge = " (edge)" if len(lrs) > 1 and pick in (min(lrs), max(lrs)) else ""
                lines.append(f"| {task} | {method} | {grid} | {pick:g}{edge} |")
    return lines + [""]


def _ablation_section(table, plt, plots: Path, link_prefix: str) -> list[str]:
    rows, images = [], []
    for task, groups in table.items():
        points = []
        for key, label in [("ablation/svfit-t0.90", 0.90), ("ablation/svfit-t0.95", 0.95), ("test/svfit", 0.99),
                           ("test/svfit-full", 1.0)]:
            if key in groups:
                points.append((label, row(groups[key])))
        if not any(key.startswith("ablation/") for key in groups) or len(points) < 2:
            continue
        for t, r in points:
            rows.append(f"| {task} | {t:g} | {r['mean']:.3f} ± {r['std']:.3f} | {r['adapter_params']:,} |")
        fig, ax = plt.subplots(figsize=(4.5, 3))
        ax.errorbar([r["adapter_params"] for _, r in points], [r["mean"] for _, r in points],
                    yerr=[r["std"] for _, r in points], marker="o", capsize=3)
        for t, r in points:
            ax.annotate(f"{t:g}", (r["adapter_params"], r["mean"]), textcoords="offset points", xytext=(4, 4))
        ax.set_xlabel("trainable singular values")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{task}: threshold ablation")
        fig.tight_layout()
        fig.savefig(plots / f"ablation-{task}.png", dpi=110)
        plt.close(fig)
        images.append(f"![threshold ablation on {task}]({link_prefix}/ablation-{task}.png)")
    if not rows:
        return []
    return ["### Threshold ablation (claim (d))", "",
            "Share of the spectrum's energy kept vs accuracy and trainable singular values (1 = the full spectrum), "
            "mean ± std over the same seeds.", "", "| task | threshold | accuracy | adapter params |",
            "|---|---|---|---|", *rows, "", *images, ""]


def _curves_section(table, plt, plots: Path, link_prefix: str) -> list[str]:
    out = []
    for task, groups in table.items():
        curves = {}
        for name in CURVE_VARIANTS:
            runs = [r["train_info"].get("eval curve") or [] for r in groups.get(f"test/{name}", [])]
            runs = [c for c in runs if c]
            if runs:
                steps = [e["step"] for e in runs[0]]
                acc = [statistics.fmean(c[i]["valid accuracy"] for c in runs if i < len(c)) for i in range(len(steps))]
                loss = [statistics.fmean(c[i]["valid loss"] for c in runs if i < len(c)) for i in range(len(steps))]
                curves[name] = (steps, acc, loss)
        if len(curves) < 2:
            continue
        if not out:
            out = ["### Learning curves (claim (c), 'rapid domain adaptation')", "",
                   "Validation accuracy and loss during training (a slice of the training data never trained on), "
                   "mean over seeds, at each method's tuned learning rate.", ""]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3))
        for name, (steps, acc, loss) in curves.items():
            a1.plot(steps, acc, marker=".", label=name)
            a2.plot(steps, loss, marker=".", label=name)
        a1.set_xlabel("step")
        a1.set_ylabel("validation accuracy")
        a2.set_xlabel("step")
        a2.set_ylabel("validation loss")
        a1.legend()
        fig.suptitle(task)
        fig.tight_layout()
        fig.savefig(plots / f"curves-{task}.png", dpi=110)
        plt.close(fig)
        # one target for every method (halfway from the common start to the best accuracy any method reached),
        # so a method that learns less cannot look faster by reaching its own smaller half-gain
        start = statistics.fmean(c[1][0] for c in curves.values())
        target = start + 0.5 * (max(max(c[1]) for c in curves.values()) - start)
        half = {n: next((f"{s}" for s, a in zip(c[0], c[1]) if a >= target), "not reached") for n, c in curves.items()}
        gaps = [b - a for c in curves.values() for a, b in zip(c[0], c[0][1:])]
        every = max(set(gaps), key=gaps.count) if gaps else 0  # the last interval may be shorter (the final step)
        out.append(f"![learning curves on {task}]({link_prefix}/curves-{task}.png)")
        out.append("")
        out.append(f"{task}: steps to reach validation accuracy {target:.3f} (halfway from the start to the best "
                   f"any method reached; scored every {every} steps): "
                   + ", ".join(f"{n} {s}" for n, s in half.items()) + ".")
        out.append("")
    return out


