"""The cost section of BENCHMARKS.md, and its plot: written from the JSON results alone."""

from __future__ import annotations

import json
import math
from pathlib import Path

from benchmarks.cost.spec import BEFORE, CACHE_GOAL_S, GOALS, INIT_GOAL, NAME, RATIO_KEYS, _ratio


def _load_results(results: Path, folder: str = NAME) -> list[dict]:
    files = sorted((Path(results) / folder).glob("*.json"))
    out = []
    for f in files:
        try:
            out.append(json.loads(f.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    return out


def _fmt_bytes(b) -> str:
    if b is None or (isinstance(b, float) and math.isnan(b)):
        return "–"
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(b) >= div:
            return f"{b / div:.1f} {unit}"
    return f"{int(b)} B"


def _fmt_s(s) -> str:
    if s is None:
        return "–"
    return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s"


def _fmt_ratio(r) -> str:
    return "–" if r is None else f"{r:.2f}×"


def section(results: Path, plots: Path, link_prefix: str = "benchmarks/plots") -> str:
    from svfit.train.results import machine_name

    runs = _load_results(results)
    head = "## Cost of SVFit against LoRA r=8 (time, memory, init, load, file size)\n\n"
    if not runs:
        return head + "Not run: no results under `" + str(Path(results) / NAME) + "` (run `python -m benchmarks run --only cost`).\n"
    lines = [head.rstrip("\n"), ""]
    lines.append(
        "Every ratio is SVFit / LoRA r=8 measured in the same run, on the same model and the same batch; each "
        "method runs in a fresh process of its own and the processes take turns step by step. Step time is "
        "forward + backward + AdamW; activations are the bytes autograd saves for backward, without the model's "
        "own weights; peak memory is the growth of the peak RSS over the RSS after loading the base model (CPU) or "
        "of `max_memory_allocated` (CUDA). Init is the first `get_peft_model` in the process; its floor is "
        "`torch.linalg.svd` of the same matrices. Load is `PeftModel.from_pretrained` onto a fresh base."
    )
    lines.append("")
    done = [r for r in runs if "methods" in r.get("train_info", {})]
    for r in runs:
        if "skipped" in r.get("train_info", {}):
            lines.append(f"- `{r['run_info']['case']}` not run: {r['train_info']['skipped']}")
    if not done:
        return "\n".join(lines) + "\n"
    sysinfo = done[0]["meta_info"]["system_info"]
    lines.append(
        f"Machine: {machine_name(sysinfo)}, {sysinfo.get('cpu_count')} CPU cores, accelerator: "
        f"{sysinfo.get('accelerator')}. The load average is the machine's 1-minute load before and after each case: "
        "above the torch thread count, other work was competing for the cores."
        + (" **Quick run (tiny random models): for checking the code, not for quoting.**"
           if any(r["run_info"].get("quick") for r in done) else "")
    )
    lines.append("")
    lines.append("| case | model | targets | batch | timed steps (+ warm-up) | torch threads | load average |")
    lines.append("|---|---|---|---|---|---|---|")
    for r in done:
        ri = r["run_info"]
        threads = sorted({v.get("torch_threads") for v in r["train_info"]["methods"].values()} - {None}) or [
            ri.get("torch_threads_in_workers", "–")]
        load = ri.get("load_average_before"), ri.get("load_average_after")
        load_txt = f"{load[0][0]:.1f} → {load[1][0]:.1f}" if all(load) else "–"
        targets = ri["targets"] if isinstance(ri["targets"], str) else ", ".join(ri["targets"])
        lines.append(f"| {ri['case']} | {ri['model']} | {targets} | {ri['batch']['batch_size']}×"
                     f"{ri['batch']['seq_len']} | {ri['steps_timed']} (+{ri['warmup_steps']}) | "
                     f"{', '.join(map(str, threads)) or '–'} | {load_txt} |")
    lines.append("")
    lines.extend(_goals(done, Path(results)))
    # ratio table
    lines.append("| case | batch | method | " + " | ".join(v[0] for v in RATIO_KEYS.values()) + " | init / SVD floor |")
    lines.append("|---|---|---|" + "---|" * (len(RATIO_KEYS) + 1))
    for r in done:
        ri, ti = r["run_info"], r["train_info"]
        for m, ratios in ti["ratios_vs_lora_r8"].items():
            cells = [_fmt_ratio(ratios.get(k)) for k in RATIO_KEYS]
            lines.append(f"| {ri['case']} | {ri['batch']['batch_size']}×{ri['batch']['seq_len']} | "
                         f"{ti['methods'][m]['label']} | " + " | ".join(cells)
                         + f" | {_fmt_ratio(ratios.get('init_over_svd_floor'))} |")
    lines.append("")
    lines.append("Absolute numbers:")
    lines.append("")
    lines.append("| case | method | trainable | step median (IQR) | activations | peak mem growth | adapter tensors "
                 "(bases, vectors) | init | SVD floor | load | file | merged fwd / base fwd |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in done:
        ri, ti = r["run_info"], r["train_info"]
        for m, v in ti["methods"].items():
            file_bytes = f"{v['adapter_file_bytes']:,} B" if v.get("adapter_file_bytes") is not None else "–"
            merged = (f"{_fmt_s(v['merged_forward_s'])} / {_fmt_s(v['base_forward_s'])} "
                      f"({_fmt_ratio(v['merged_forward_over_base'])})") if v.get("merged_forward_s") else "–"
            lines.append(
                f"| {ri['case']} | {v['label']} | {v['trainable_params']:,} | {_fmt_s(v['step_time_median_s'])} "
                f"({_fmt_s(v['step_time_iqr_s'])}) | {_fmt_bytes(v.get('saved_activation_bytes'))} | "
                f"{_fmt_bytes(v.get('peak_train_memory_growth_bytes'))} | "
                f"{_fmt_bytes(v.get('adapter_tensor_bytes'))} | {_fmt_s(v['init_s'])} | "
                f"{_fmt_s(v.get('svd_floor_s'))} | {_fmt_s(v.get('load_s'))} | {file_bytes} | {merged} |"
            )
    lines.append("")
    notes = sorted({n for r in done for n in r["run_info"].get("notes", [])})
    for n in notes:
        lines.append(f"- Note: {n}")
    resets = all(v.get("peak_reset_before_training") for r in done for v in r["train_info"]["methods"].values())
    if not resets:
        lines.append("- Note: the peak-RSS reset was refused on this machine, so some peaks include the init peak.")
    if notes or not resets:
        lines.append("")
    png = _plot(done, Path(plots))
    lines.append(f"![SVFit / LoRA r=8 cost ratios]({link_prefix.rstrip('/')}/{png})")
    lines.append("")
    return "\n".join(lines)


def _verdict(value, limit) -> str:
    if value is None:
        return "–"
    return f"{value:.2f} {'✅ met' if value <= limit else '❌ not met'}"


def _goals(done: list[dict], results: Path) -> list[str]:
    """Issue #6's goals: before (the reference side branch, same run; and the run before the change, kept in
    ``cost-before/``) and after (default fast paths)."""
    earlier = {r["run_info"]["case"]: r for r in _load_results(results, BEFORE)}
    lines = ["### Goals of the fast paths (before → after)", "",
             "After: the default `compute_path=\"auto\"`. Before, same run: SVFit's reference side branch "
             "((x V_r) ⊙ c) U_rᵀ, measured next to it and LoRA r=8. Before, earlier run: the committed results of the "
             "last run before the fast paths and the init changes (`benchmarks/results/cost-before/`, same machine; "
             "only its ratios are comparable, not its absolute times).", "",
             "| case | measurement | goal | before (earlier run) | before (same run) | after |", "|---|---|---|---|---|---|"]
    for r in done:
        ri, ti = r["run_info"], r["train_info"]
        ratios = ti["ratios_vs_lora_r8"]
        kind = ri["case"].rsplit("-", 1)[-1]
        after, before = ratios.get("svfit", {}), ratios.get("svfit-reference", {})
        old = earlier.get(ri["case"], {}).get("train_info", {}).get("ratios_vs_lora_r8", {}).get("svfit", {})
        for key, limit in GOALS.get(kind, {}).items():
            lines.append(f"| {ri['case']} | {RATIO_KEYS[key][0]} / LoRA | ≤ {limit:.2f} | "
                         f"{_verdict(old.get(key), limit)} | {_verdict(before.get(key), limit)} | "
                         f"{_verdict(after.get(key), limit)} |")
        lines.append(f"| {ri['case']} | cold init / SVD floor | ≤ {INIT_GOAL:.2f} | "
                     f"{_verdict(old.get('init_over_svd_floor'), INIT_GOAL)} | "
                     f"{_verdict(before.get('init_over_svd_floor'), INIT_GOAL)} | "
                     f"{_verdict(after.get('init_over_svd_floor'), INIT_GOAL)} |")
        reinit = ti["methods"].get("svfit", {}).get("cache_reinit_s")
        if reinit is not None:
            lines.append(f"| {ri['case']} | re-init from the SVD cache (s) | ≤ {CACHE_GOAL_S:.1f} s | – | – | "
                         f"{_verdict(reinit, CACHE_GOAL_S)} |")
        merged = ti["methods"].get("svfit", {}).get("merged_forward_over_base")
        if merged is not None:
            lines.append(f"| {ri['case']} | merged inference / base | = 1 (noise ±5%) | – | – | {merged:.2f} |")
        svft = ti["methods"].get("svft")
        ours = ti["methods"].get("svfit")
        if svft and ours:
            lines.append(
                f"| {ri['case']} | SVFit / SVFT-style: step time, adapter tensors | < 1 | – | – | "
                f"{_fmt_ratio(_ratio(ours['step_time_median_s'], svft['step_time_median_s']))}, "
                f"{_fmt_ratio(_ratio(ours.get('adapter_tensor_bytes'), svft.get('adapter_tensor_bytes')))} |")
    lines.append("")
    return lines


def _plot(done: list[dict], plots: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    plots.mkdir(parents=True, exist_ok=True)
    rows = [(r["run_info"]["case"], m, ti_m) for r in done
            for m, ti_m in r["train_info"]["ratios_vs_lora_r8"].items()]
    keys = list(RATIO_KEYS)
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / max(len(rows), 1)
    x = np.arange(len(keys))
    for i, (case, m, ratios) in enumerate(rows):
        vals = [ratios.get(k) or np.nan for k in keys]
        # tab20: 20 distinct colours, where the default cycle repeats after 10 series
        ax.bar(x + i * width - 0.4 + width / 2, vals, width, label=f"{case}: {m}", color=plt.cm.tab20(i % 20))
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_yscale("log")
    ax.set_xticks(x)
    ax.set_xticklabels([RATIO_KEYS[k][0] for k in keys], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("SVFit / LoRA r=8 (log)")
    ax.set_title("Cost of SVFit relative to LoRA r=8 (below 1: SVFit cheaper)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    name = "cost_ratios.png"
    fig.savefig(plots / name, dpi=110)
    plt.close(fig)
    return name
