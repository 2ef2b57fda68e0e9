"""The quality section of BENCHMARKS.md, and its plots: written from the JSON results alone."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Optional

from benchmarks import ACCELERATOR_RESULTS, RESULTS
from benchmarks.quality.analysis import load, ok, verdict
from benchmarks.quality.plan import ABLATIONS, ALL, CPU, CUDA, EVERYTHING, QUICK, VARIANTS, Profile, planned_grid

TASK_TITLES = {
    "sentiment": "MiniLM-L6 (BERT) on Rotten Tomatoes sentiment",
    "fashion": "EfficientNet-Lite0 (convolutions) on Fashion-MNIST",
    "vit-fashion": "DINOv2 ViT-S/14 on Fashion-MNIST",
    "lm-sentiment": "SmolLM2-135M-Instruct (causal LM) on Rotten Tomatoes sentiment",
    "subjectivity": "MiniLM-L6 on Rotten Tomatoes subjectivity",
}
PAPER_CLAIM = ("The paper (abstract): SVFit \"outperforms LoRA while requiring 16 times fewer trainable "
               "parameters\" (RoBERTa on GLUE, ViT image classification; its tables were not read, see SVFIT.md).")
WORDS = {"wins": "SVFit beats LoRA r=8", "loses": "SVFit loses to LoRA r=8", "ties": "SVFit ties LoRA r=8",
         "unresolved": "SVFit vs LoRA r=8 is not resolved"}


def _cpu_hours(runs: list[dict]) -> float:
    return sum(r["run_info"]["benchmark"].get("cpu_time", 0.0) for r in runs) / 3600


def _load_range(runs: list[dict]) -> str:
    loads = [x for r in runs for x in r["run_info"]["benchmark"].get("load_average", [])]
    return f"{min(loads):.1f}–{max(loads):.1f}" if loads else "not recorded"


def _pct(x: float) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB" if n >= 1e4 else f"{n:,} B"


def verdict_text(v: dict, svfit: dict, lora: dict) -> str:
    if "gap" not in v:
        return v.get("text", "not run")
    ratio = lora["adapter_params"] / max(svfit["adapter_params"], 1)
    return (f"**{WORDS[v['status']]}**: {v['gap']:+.1f} ± {v['std']:.1f} points over {v['n']} paired seeds, 95% "
            f"interval {v['low']:+.1f} to {v['high']:+.1f}; McNemar (pooled over seeds, {svfit['examples']} test "
            f"examples each): SVFit alone right {v['b']}×, LoRA alone right {v['c']}×, exact p = {v['p']:.2g} "
            f"(per seed: {', '.join(f'{p:.2g}' for p in v['p_per_seed'])}); {ratio:.1f}× fewer adapter parameters "
            f"({svfit['adapter_params']:,} vs {lora['adapter_params']:,}), adapter file "
            f"{_size(svfit['file_bytes'])} vs {_size(lora['file_bytes'])}.")


PROVENANCE = "PROVENANCE.md"  # in <results>/quality: how a run outside this machine got its model and data
NOTE = "NOTE.md"  # in <results>/quality: what a reader must know first (e.g. a task being re-run in a new setting)


def _recipe(profile: str) -> str:
    length = ("a fixed number of epochs over the whole training split" if profile == "cuda"
              else "a fixed number of optimizer steps")
    return (
        "Every run went through `svfit train`'s runner with one recipe (SVFIT.md §6, SVFT-Plain's): AdamW, 10% "
        f"linear warm-up then linear decay, gradient clipping at 1, no weight decay, {length}, and every method "
        "starting from the same probe-initialised head (LP-FT: the linear probe below, head lr 1e-3 for every "
        "method) where the task adds a head. Each task has **one fixed test set**, the same for every seed and "
        "method, and a validation split taken from its training data (disjoint from the test set) that is scored "
        "every 10% of the steps. Learning rates: 5 points at ×2 spacing per tuned method, run to full length on "
        "seed 0 (these runs are also seed 0), picked by final validation accuracy; a grid whose best point sat at "
        "an end grew past it. Seeds 1 and 2 ran at the pick, and seeds 3 and 4 of SVFit and LoRA where three seeds "
        "neither resolved the verdict nor bounded it within ±1.5 points. SVFit's variants use SVFit's pick and PiSSA uses "
        "LoRA's (its paper's protocol), for budget. Accuracy is on the test set, mean ± std over seeds; *end gap* "
        "is the largest drop from a run's best validation accuracy to its final one (converged runs: < 1 point); "
        "*adapter* counts trainable parameters outside the head; *file* is the saved adapter (with the head where "
        "there is one; the whole model for full fine-tuning), as saved by the code of its run: runs older than "
        "commit 9b468f7 carried a module's whole bases where the few singular vectors that a recomputation could "
        "rotate now suffice, so their SVFit files are larger than today's (README, \"another machine or LAPACK\")."
    )


def _compute(table: dict, every: list[dict], profile: str) -> str:
    wall = sum(r["run_info"].get("total_time", 0.0) for r in every)
    wall += sum((t["probe"] or {}).get("run_info", {}).get("total_time", 0.0) for t in table.values())
    head = f"{len(every)} training runs and {sum(1 for t in table.values() if t['probe'])} probes: "
    if profile == "cuda":
        system = every[0]["meta_info"].get("system_info", {}) if every else {}
        threads = sorted({r["run_info"]["benchmark"].get("torch_threads") for r in every} - {None})
        return head + (f"{wall / 3600:.2f} h of summed wall time on one {system.get('accelerator', 'accelerator')} "
                       f"(experiments sharing it, {'/'.join(map(str, threads)) or '?'} CPU threads each).")
    return head + (f"{_cpu_hours(every):.1f} CPU-hours (the runs' own CPU seconds, single-threaded: about half that "
                   f"in wall time on an idle 2-core machine, whose two workers run side by side), {wall / 3600:.1f} h "
                   f"of summed wall time on this shared machine (load average {_load_range(every)} during the runs).")


def _profile(every: list[dict]) -> str:
    return next((r["run_info"]["benchmark"].get("profile") for r in every), "cpu")


def _pending(task: str, t: dict, profile: Profile) -> list[str]:
    """What ``task``'s SVFit-vs-LoRA verdict still waits for under ``profile``'s plan: grid points, a grid growing
    past an end where its pick sits, the seeds at the picks (and seeds 3-4 where 3 left the verdict unresolved)."""
    plan = profile.tasks.get(task)
    if plan is None:
        return []
    pending = []
    for name, label in (("svfit", "SVFit"), ("lora", "LoRA r=8")):
        grid = t["grids"].get(name, [])
        if len(grid) < profile.grid_points:
            pending.append(f"{label}'s learning-rate grid ({len(grid)} of {profile.grid_points} points run)")
            continue
        pick, edge = t["picks"].get(name, (None, False))
        if edge and name in plan.centre:
            planned = planned_grid(profile, plan, name)
            lrs = [lr for lr, *_ in grid]
            low = pick == min(lrs)
            added = sum(1 for lr in lrs if (lr < min(planned) if low else lr > max(planned)))
            if added < profile.max_extend:
                pending.append(f"{label}'s grid to grow past its {'lower' if low else 'upper'} end, where its pick sits")
    if pending:
        return pending
    rows = t["rows"]
    if "svfit" in rows and "lora" in rows:
        paired = set(rows["svfit"]["by_seed"]) & set(rows["lora"]["by_seed"])
        if any(s not in paired for s in profile.seeds):
            pending.append(f"{_missing_seeds(rows, profile.seeds)} at the picks")
        elif profile.extra_seeds and verdict(rows["svfit"], rows["lora"])["status"] == "unresolved":
            if any(s not in paired for s in profile.extra_seeds):
                pending.append(f"{_missing_seeds(rows, profile.extra_seeds)} (the first {len(profile.seeds)} "
                               "leave the verdict unresolved)")
    return pending


def _missing_seeds(rows: dict, seeds) -> str:
    """E.g. "LoRA r=8's seeds 1, 2": each method's seeds among ``seeds`` that have no run yet."""
    parts = []
    for name, label in (("svfit", "SVFit"), ("lora", "LoRA r=8")):
        missing = [s for s in seeds if s not in rows[name]["by_seed"]]
        if missing:
            parts.append(f"{label}'s seed{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))}")
    return " and ".join(parts)


def _summary(table: dict, profile: Profile) -> tuple[list[str], dict]:
    """The one-line-per-task table, and each task's (verdict, floor); a task whose verdict still waits for runs of
    ``profile``'s plan is in progress, with no verdict yet."""
    summary = ["| task | probe (floor) | SVFit | SVFit full | LoRA r=8 | full FT (ceiling) | SVFit − LoRA [95% CI] "
               "| McNemar p | verdict |", "|---|---|---|---|---|---|---|---|---|"]
    verdicts = {}
    for task, t in table.items():
        rows = t["rows"]
        floor = max((p["test accuracy"] for p in (t["probe"] or {}).get("train_info", {}).get("probes", [])),
                    default=float("nan"))
        pending = _pending(task, t, profile) if t["runs"] else []
        if pending:
            v = {"status": "in progress", "text": f"In progress: the verdict waits for {'; '.join(pending)}. The "
                 "picks and rows here are provisional."}
        elif "svfit" in rows and "lora" in rows:
            v = verdict(rows["svfit"], rows["lora"])
        else:  # no pair to compare: say which, rather than call it unresolved
            v = {"status": "not run (probe only)" if not rows else "unresolved"}

        def cell(name):
            r = rows.get(name)
            return f"{_pct(r['mean'])} ± {100 * r['std']:.1f} ({r['n']})" if r else "—"

        ci = f"{v['gap']:+.1f} [{v['low']:+.1f}, {v['high']:+.1f}]" if "gap" in v else "—"
        p = f"{v['p']:.2g}" if "p" in v and not math.isnan(v["p"]) else "—"
        summary.append(f"| {task} | {_pct(floor)} | {cell('svfit')} | {cell('svfit-full')} | {cell('lora')} | "
                       f"{cell('full')} | {ci} | {p} | {v['status']} |")
        verdicts[task] = (v, floor)
    return summary, verdicts


def section(results: Path, plots: Path, link_prefix: str = "benchmarks/plots") -> str:
    table = load(results)
    accelerator = _accelerator_lines(results)
    if not table:
        return "## Quality\n\nNot run (`python -m benchmarks run --only quality`).\n" + "\n".join(accelerator)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots.mkdir(parents=True, exist_ok=True)
    every = [r for t in table.values() for r in t["runs"]]
    profile = _profile(every)
    plan_profile = {"cpu": CPU, "cuda": CUDA, "quick": QUICK}.get(profile, CPU)
    plans = plan_profile.tasks
    lines = ["## Quality: converged runs, SVFit vs LoRA", "", _recipe(profile), "",
             _compute(table, every, profile) + " " + PAPER_CLAIM, ""]
    for name in (PROVENANCE, NOTE):
        if (path := results / "quality" / name).is_file():
            lines += [path.read_text().strip(), ""]
    summary, verdicts = _summary(table, plan_profile)
    body = []
    for task, t in table.items():
        v, floor = verdicts[task]
        body += _task_section(task, t, plans.get(task), v, floor, plt, plots, link_prefix)
    lines += ["Test accuracy in %, mean ± std (seeds):", "", *summary, "", *accelerator, *body]
    return "\n".join(lines) + "\n"


def _budget(runs: list[dict]) -> str:
    """What the runs' recorded settings were, in words (e.g. "whole training splits, 3 epochs, batch 32")."""
    tc = runs[0]["run_info"]["train_config"]
    length = f"{tc['steps']} steps" if tc.get("steps") else f"{tc['epochs']:g} epochs"
    split = "whole training splits" if tc.get("train_limit", 0) >= EVERYTHING else f"{tc['train_limit']} examples"
    return f"{split}, {length}, batch {tc['batch_size']}"


def _accelerator_lines(results: Path) -> list[str]:
    """For the committed CPU results: the summary of what the accelerator profile measured, beside them."""
    other = ACCELERATOR_RESULTS
    if results.resolve() != RESULTS.resolve() or not (other / "quality").is_dir():
        return []
    table = load(other)
    every = [r for t in table.values() for r in t["runs"]]
    if not every:
        return []
    summary, _ = _summary(table, CUDA)
    provenance = other / "quality" / PROVENANCE
    return [
        f"**The same benchmark on an accelerator** (`--device cuda`: {_budget(every)}), in "
        f"`benchmarks/{ACCELERATOR_RESULTS.name}/` (full tables and curves in its BENCHMARKS.md). "
        + _compute(table, every, "cuda"), "",
        *([provenance.read_text().strip(), ""] if provenance.is_file() else []),
        *summary, "",
    ]


def _late_note(r: dict, examples: Optional[int]) -> str:
    """A row whose runs end more than 1 point below their best validation accuracy: which seeds, where each peaked,
    what that drop is in validation examples, what the validation loss did meanwhile, and each seed's test
    accuracy against the row's mean (a run that had degraded would sit below it)."""
    parts = []
    for seed, (best, last) in sorted(r["late"].items()):
        drop = best["valid accuracy"] - last["valid accuracy"]
        count = f", {round(drop * examples)} of {examples} examples" if examples else ""
        parts.append(f"seed {seed}: {_pct(best['valid accuracy'])} at step {best.get('step', '?')} → "
                     f"{_pct(last['valid accuracy'])} at {last.get('step', '?')} ({100 * drop:.1f} points{count}; "
                     f"validation loss {best['valid loss']:.3f} → {last['valid loss']:.3f}; test "
                     f"{_pct(r['by_seed'][seed])} against the row's {_pct(r['mean'])})")
    return (f"{r['label']} ends {100 * r['end_gap']:.1f} points below its best validation accuracy, more than the "
            f"1-point convergence check allows: " + "; ".join(parts) + ".")


def _task_section(task, t, plan, v, floor, plt, plots, link_prefix) -> list[str]:
    rows, probe = t["rows"], t["probe"]
    out = [f"### {task}: {TASK_TITLES.get(task, task)}", ""]
    runs = [r for r in t["runs"] if ok(r)]
    if runs:
        tc = runs[0]["run_info"]["train_config"]
        examples = runs[0]["train_info"]["metrics"][-1]
        size = f", {tc['image_size']} px inputs" if tc.get("image_size") else ""
        length = f"{tc['steps']} optimizer steps" if tc.get("steps") else f"{tc['epochs']:g} epochs"
        seen = examples.get("train samples")
        out.append(f"Validation split {tc['curve_examples']} examples (the end of the training data), fixed test set "
                   f"{examples.get('test examples')} examples (split seed {tc.get('split_seed')}); {length} × batch "
                   f"{tc['batch_size']} ({seen:,} training examples seen per run){size}"
                   f"{', batches grouped by length' if tc.get('bucket_by_length') else ''}; "
                   f"{'every method starts from the probe head (LP-FT), head lr ' + format(tc['head_lr'], 'g') if tc.get('head_init') else 'no new head (the LM head stays frozen)'}.")
    if not runs:
        out.append(f"No training runs yet, only the probe (the floor). `python -m benchmarks run --only quality --task "
                   f"{task}` runs them (existing results are kept).")
    if runs:
        if _profile(runs) == "cuda":
            out.append(f"Compute: {len(runs)} runs, "
                       f"{sum(r['run_info'].get('total_time', 0.0) for r in runs) / 3600:.2f} h summed wall time on "
                       f"the accelerator.")
        else:
            out.append(f"Compute: {len(runs)} runs, {_cpu_hours(runs):.1f} CPU-hours, "
                       f"{sum(r['run_info'].get('total_time', 0.0) for r in runs) / 3600:.1f} h summed wall time "
                       f"(load average {_load_range(runs)}).")
    if plan is not None and plan.dropped:
        out.append(f"Dropped: {plan.dropped}")
    if v.get("status") == "in progress":
        out.append(f"**{v['text']}**")
    out.append("")
    table = ["| method | lr | test accuracy % | steps | epochs | end gap | valid % | adapter params | file | train s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for p in (probe or {}).get("train_info", {}).get("probes", []):
        table.append(f"| linear probe on {p['features']} (floor) | L2 {p['l2']:g} | {_pct(p['test accuracy'])} | — | — "
                     f"| — | {_pct(p['valid accuracy'])} | 0 (a {p['feature dim']}-d linear head) | — | — |")
    for name in [*VARIANTS]:
        r = rows.get(name)
        if r is None:
            continue
        steps = "/".join(map(str, r["steps"]))
        shared = "" if ALL[name].tuned else f" ({ALL[name].source}'s)"
        edge = " **(edge)**" if ALL[name].tuned and t["picks"].get(name, (None, False))[1] else ""
        table.append(f"| {r['label']} | {r['lr']:g}{shared}{edge} | {_pct(r['mean'])} ± {100 * r['std']:.1f} "
                     f"({r['n']} seed{'s' if r['n'] != 1 else ''}) | {steps} | {r['epochs']:.2f} | {100 * r['end_gap']:.1f} | "
                     f"{_pct(r['valid'])} | {r['adapter_params']:,} | {_size(r['file_bytes'])} | "
                     f"{r['train_time']:.0f} |")
    out += table + [""]
    if "svfit" in rows and "lora" in rows:
        if v.get("status") != "in progress":  # (said above the table)
            out += [verdict_text(v, rows["svfit"], rows["lora"]), ""]
        notes = []
        for name in ("svfit", "lora"):
            r = rows[name]
            if not math.isnan(floor) and r["mean"] <= floor:
                notes.append(f"{r['label']} ({_pct(r['mean'])}) does not beat the linear probe ({_pct(floor)}).")
            if r["late"]:
                notes.append(_late_note(r, t["runs"][0]["run_info"]["train_config"].get("curve_examples")))
            if min(r["steps"], default=0) < 500:
                notes.append(f"{r['label']} ran {min(r['steps'])} steps (< 500).")
        if notes:
            out += ["Checks: " + " ".join(notes), ""]
        else:
            out += ["Checks: SVFit and LoRA beat the probe, ran ≥ 500 steps and end within 1 point of their best "
                    "validation accuracy.", ""]
    out += _grid_table(t)
    image = _plot_task(task, t, floor, plt, plots)
    if image:
        out += [f"![validation curves and learning-rate grids on {task}]({link_prefix}/{image})", ""]
    out += _ablation_table(t)
    return out


def _grid_table(t) -> list[str]:
    if not t["grids"]:
        return []
    lines = ["Learning-rate grids (final validation accuracy %, seed 0; **bold**: the pick):", "",
             "| method | grid |", "|---|---|"]
    for name, grid in t["grids"].items():
        pick, edge = t["picks"][name]
        cells = []
        for lr, acc, _, status in grid:
            text = f"{lr:g}: {_pct(acc)}" if status == "success" else f"{lr:g}: {status}"
            cells.append(f"**{text}**" if lr == pick else text)
        lines.append(f"| {ALL[name].label if name in ALL else name} | {', '.join(cells)}"
                     f"{' — pick at an edge' if edge else ''} |")
    return lines + [""]


def _ablation_table(t) -> list[str]:
    rows = t["rows"]
    names = [n for n in ABLATIONS if n in rows]
    if not names or "svfit" not in rows:
        return []
    base = rows["svfit"]
    seed = min(base["by_seed"]) if base["by_seed"] else 0
    lora = rows.get("lora", {}).get("by_seed", {})
    lines = ["Why SVFit trails (ablation at SVFit's pick; SVFit's seed "
             f"{seed} at {base['lr']:g}: {_pct(base['by_seed'].get(seed, float('nan')))}%; learning rate: the grid "
             "above). *vs LoRA*: the mean gap to LoRA r=8 over the seeds both ran:", "",
             "| change | lr | test accuracy % (seeds) | vs LoRA, points | valid % | adapter params |",
             "|---|---|---|---|---|---|"]
    for name in ("svfit-r8", *names, "svfit-full"):
        r = rows.get(name)
        if r:
            accs = list(r["by_seed"].values())
            spread = f" ± {100 * statistics.stdev(accs):.1f}" if len(accs) > 1 else ""
            shared = [s for s in r["by_seed"] if s in lora]
            gap = (f"{100 * statistics.fmean(r['by_seed'][s] - lora[s] for s in shared):+.1f}" if shared else "—")
            lines.append(f"| {r['label']} | {r['lr']:g} | {_pct(statistics.fmean(accs))}{spread} ({len(accs)}) | "
                         f"{gap} | {_pct(r['valid'])} | {r['adapter_params']:,} |")
    return lines + [""]


def _plot_task(task, t, floor, plt, plots) -> Optional[str]:
    rows = t["rows"]
    if not rows:
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, r in rows.items():
        if name not in VARIANTS or not r["curves"]:
            continue
        steps = [e["step"] for e in r["curves"][0]]
        acc = [100 * statistics.fmean(c[i]["valid accuracy"] for c in r["curves"] if i < len(c))
               for i in range(len(steps))]
        a1.plot(steps, acc, marker=".", label=name, linestyle="-" if name.startswith("svfit") else "--")
    probe = (t["probe"] or {}).get("train_info", {}).get("probes", [])
    if probe:
        a1.axhline(100 * probe[0]["valid accuracy"], color="gray", linewidth=0.8, linestyle=":",
                   label="probe (start)")
    a1.set_xlabel("optimizer step")
    a1.set_ylabel("validation accuracy %")
    a1.set_title(f"{task}: validation curves at the picks (mean over seeds)", fontsize=9)
    a1.legend(fontsize=7)
    for name, grid in t["grids"].items():
        pts = [(lr, 100 * acc) for lr, acc, _, status in grid if status == "success"]
        if pts:
            a2.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    a2.set_xscale("log")
    a2.set_xlabel("learning rate")
    a2.set_ylabel("final validation accuracy %")
    a2.set_title("learning-rate grids (seed 0)", fontsize=9)
    a2.legend(fontsize=7)
    fig.tight_layout()
    name = f"quality-{task}.png"
    fig.savefig(plots / name, dpi=110)
    plt.close(fig)
    return name
