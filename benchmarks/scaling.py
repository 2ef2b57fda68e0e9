"""How SVFit's cost grows with width: a sweep over square nn.Linear layers (n x n, no bias).

Two kinds of matrix per width, because the 99 % energy threshold behaves very differently on them:

* ``random``: i.i.d. Gaussian entries / sqrt(n). Its spectrum is flat (Marchenko-Pastur), so 99 % of the energy
  needs most of the singular values and the threshold saves little;
* ``lowrank+noise``: an exact rank-n/16 matrix with singular values falling linearly from 1 to 0.2, plus Gaussian
  noise holding 0.5 % of the energy, so the threshold has a small block to select (r <= n/16). Pre-trained weights
  sit between the two.

Per width: the SVD floor (``torch.linalg.svd(W, full_matrices=False)`` of the same matrix), SVFit init time
(``get_peft_model`` wall time) at the 0.99 threshold on both kinds and with ``r="full"``, ``svd="lowrank"`` init
time and the relative error of the top-r singular values it finds against the exact ones (threshold 0.99 on
``lowrank+noise``; a fixed r = n/16 on ``random``, where a randomized SVD is known to be inaccurate), and the
training-step time (forward + backward + AdamW) on a batch of tokens (2048; quick: 64) for SVFit and LoRA r=8. The
input requires grad, as inside a network, so the backward also computes the input gradient through the adapter;
the models take turns step by step so that machine load hits them alike.

    python benchmarks/scaling.py --out benchmarks/results [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

NAME = "scaling"
FILE = "square-linear.json"
NOISE_SHARE = 0.005  # share of the energy held by the noise in the lowrank+noise matrix
RANK_DIVISOR = 16  # the lowrank+noise matrix has rank n / RANK_DIVISOR
STEP_MODELS = {
    "svfit-random": "SVFit 0.99, random W",
    "svfit-full": "SVFit full spectrum",
    "svfit-lowrank+noise": "SVFit 0.99, low-rank + noise W",
    "lora-r8": "LoRA r=8",
}


def settings(quick: bool) -> dict:
    if quick:
        return {"widths": [64, 128], "tokens": 64, "warmup": 1, "steps": {64: 3, 128: 3}, "svd_reps": 2, "threads": 1}
    return {
        "widths": [256, 512, 1024, 2048, 4096],
        "tokens": 2048,
        "warmup": 1,
        "steps": {256: 20, 512: 15, 1024: 10, 2048: 6, 4096: 4},
        "svd_reps": 3,  # widths up to 1024; larger ones are timed once
        "threads": None,
    }


def matrix(kind: str, n: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, n, generator=g) / math.sqrt(n)
    if kind == "random":
        return noise
    k = max(1, n // RANK_DIVISOR)
    qa, _ = torch.linalg.qr(torch.randn(n, k, generator=g))
    qb, _ = torch.linalg.qr(torch.randn(n, k, generator=g))
    s = torch.linspace(1.0, 0.2, k)
    signal = (qa * s) @ qb.T
    # scale the noise so that it holds NOISE_SHARE of the total energy
    eps = math.sqrt(NOISE_SHARE / (1 - NOISE_SHARE) * float((s**2).sum()) / float((noise**2).sum()))
    return signal + eps * noise


def _net(W):
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(W.shape[1], W.shape[0], bias=False)

        def forward(self, x):
            return self.proj(x)

    net = Net()
    with torch.no_grad():
        net.proj.weight.copy_(W)
    return net


def _timed_init(W, config):
    from peft import get_peft_model

    net = _net(W)
    t0 = time.perf_counter()
    model = get_peft_model(net, config)
    return model, time.perf_counter() - t0


def _svfit_layer(model):
    from svfit.tuner import SVFitLayer

    return next(m for m in model.modules() if isinstance(m, SVFitLayer))


def _svd_time(W, reps: int):
    import torch

    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        _, S, _ = torch.linalg.svd(W, full_matrices=False)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), S


def _lowrank_error(model, S_exact) -> dict:
    s = _svfit_layer(model).svfit_sigma["default"].double()
    ref = S_exact[: s.numel()].double()
    rel = (s - ref).abs() / ref.clamp_min(1e-30)
    return {
        "r": int(s.numel()),
        "top_r_max_rel_error": float(rel.max()) if s.numel() else 0.0,
        "top_r_rel_error_l2": float((s - ref).norm() / ref.norm()) if s.numel() else 0.0,
    }


@contextmanager
def _threads(n):
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def measure_width(n: int, s: dict) -> dict:
    import gc

    import torch
    from peft import LoraConfig

    import svfit

    reps = s["svd_reps"] if n <= 1024 else 1
    row: dict = {"width": n, "rank_of_lowrank_part": max(1, n // RANK_DIVISOR)}
    step_models = {}
    for kind in ("random", "lowrank+noise"):
        W = matrix(kind, n)
        svd_s, S = _svd_time(W, reps)
        energy = torch.cumsum(S.double() ** 2, 0) / float((S.double() ** 2).sum())
        thr, thr_s = _timed_init(W, svfit.SVFitConfig(target_modules=["proj"]))
        k = {"svd_s": svd_s, "init_threshold_s": thr_s, "r_threshold": _svfit_layer(thr).svfit_info["default"].r,
             "rank_for_90pct_energy": int(torch.searchsorted(energy, torch.tensor(0.9, dtype=energy.dtype))) + 1}
        if kind == "random":
            full, full_s = _timed_init(W, svfit.SVFitConfig(target_modules=["proj"], r="full"))
            k["init_full_s"] = full_s
            lr_config = svfit.SVFitConfig(target_modules=["proj"], svd="lowrank", r=row["rank_of_lowrank_part"])
            step_models["svfit-random"] = thr
            step_models["svfit-full"] = full
            lora, lora_s = _timed_init(W, LoraConfig(r=8, lora_alpha=8, target_modules=["proj"]))
            row["lora_init_s"] = lora_s
            step_models["lora-r8"] = lora
        else:
            lr_config = svfit.SVFitConfig(target_modules=["proj"], svd="lowrank")
            step_models["svfit-lowrank+noise"] = thr
        lowrank, lowrank_s = _timed_init(W, lr_config)
        k["lowrank"] = {"spec": "fixed r = n/16" if kind == "random" else "threshold 0.99", "init_s": lowrank_s,
                        **_lowrank_error(lowrank, S)}
        del lowrank
        row[kind] = k
        gc.collect()
    row["step"] = _step_times(n, step_models, s)
    ref = row["step"]["lora-r8"]["median_s"]
    row["step_over_lora"] = {m: v["median_s"] / ref for m, v in row["step"].items() if m != "lora-r8"}
    row["init_over_svd"] = {
        "threshold_random": row["random"]["init_threshold_s"] / row["random"]["svd_s"],
        "full_random": row["random"]["init_full_s"] / row["random"]["svd_s"],
        "threshold_lowrank+noise": row["lowrank+noise"]["init_threshold_s"] / row["lowrank+noise"]["svd_s"],
        "lowrank_svd_lowrank+noise": row["lowrank+noise"]["lowrank"]["init_s"] / row["lowrank+noise"]["svd_s"],
    }
    return row


def _step_times(n: int, models: dict, s: dict) -> dict:
    import numpy as np
    import torch

    g = torch.Generator().manual_seed(1)
    x = torch.randn(s["tokens"], n, generator=g)
    opts = {m: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
            for m, model in models.items()}
    times = {m: [] for m in models}
    order = list(models)
    steps = s["steps"][n]
    for i in range(s["warmup"] + steps):
        for m in order[i % len(order):] + order[: i % len(order)]:
            inp = x.clone().requires_grad_(True)  # as inside a network: the input gradient is computed too
            t0 = time.perf_counter()
            loss = models[m](inp).pow(2).mean()
            loss.backward()
            opts[m].step()
            opts[m].zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            if i >= s["warmup"]:
                times[m].append(dt)
    return {
        m: {
            "median_s": statistics.median(t),
            "iqr_s": float(np.percentile(t, 75) - np.percentile(t, 25)),
            "times_s": t,
            "trainable_params": sum(p.numel() for p in models[m].parameters() if p.requires_grad),
        }
        for m, t in times.items()
    }


def run(out: Path, quick: bool, threads: int | None = None, widths: list[int] | None = None) -> None:
    import os

    from svfit.train.results import meta_info, now_iso, write_json

    target = Path(out) / NAME
    target.mkdir(parents=True, exist_ok=True)
    s = settings(quick)
    if threads:
        s["threads"] = threads
    if widths:
        s["widths"] = widths
        s["steps"] = {n: s["steps"].get(n, 3) for n in widths}
    t0 = time.perf_counter()
    load0 = os.getloadavg()
    rows = []
    with _threads(s["threads"]):
        import torch

        threads = torch.get_num_threads()
        for n in s["widths"]:
            t = time.perf_counter()
            rows.append(measure_width(n, s))
            print(f"[{NAME}] width {n}: {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
    run_info = {
        "benchmark": NAME,
        "layer": "one square nn.Linear(n, n, bias=False), adapter on it",
        "matrices": {
            "random": "i.i.d. N(0, 1/n) entries: flat spectrum, 99% of the energy needs most singular values",
            "lowrank+noise": f"rank n/{RANK_DIVISOR}, singular values 1 -> 0.2 (linear), plus Gaussian noise "
                             f"holding {NOISE_SHARE:.1%} of the energy: the 0.99 threshold selects "
                             f"r <= n/{RANK_DIVISOR}",
        },
        "widths": s["widths"],
        "tokens_per_step": s["tokens"],
        "warmup_steps": s["warmup"],
        "steps_timed": {str(k): v for k, v in s["steps"].items()},
        "svd_reps": f"median of {s['svd_reps']} for widths <= 1024, else 1",
        "step_models": STEP_MODELS,
        "optimizer": "AdamW lr 1e-3; loss mean(y^2); the input requires grad",
        "torch_threads": threads,
        "quick": quick,
        "load_average_before": load0,
        "load_average_after": os.getloadavg(),
        "created_at": now_iso(),
        "total_time": time.perf_counter() - t0,
    }
    write_json(target / FILE, {"run_info": run_info, "train_info": {"rows": rows},
                               "meta_info": meta_info("square nn.Linear (synthetic)", "random inputs")})


# ---------------------------------------------------------------------------------------------------------------
# report


def _fmt_s(x) -> str:
    if x is None:
        return "–"
    return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s"


def section(results: Path, plots: Path, link_prefix: str = "benchmarks/plots") -> str:
    from svfit.train.results import machine_name

    head = "## Scaling with width (square linear layers)"
    path = Path(results) / NAME / FILE
    try:
        data = json.loads(path.read_text())
        rows = data["train_info"]["rows"]
    except (OSError, json.JSONDecodeError, KeyError):
        return f"{head}\n\nNot run: no results at `{path}` (run `benchmarks/scaling.py`).\n"
    ri = data["run_info"]
    sysinfo = data["meta_info"]["system_info"]
    prefix = link_prefix.rstrip("/")
    lines = [head, ""]
    lines.append(
        f"One `nn.Linear(n, n)` per width; SVD floor = `torch.linalg.svd` of the same matrix; init = `get_peft_model` "
        f"wall time; step = forward + backward (input gradient included) + AdamW on {ri['tokens_per_step']} tokens, "
        f"the models taking turns. Matrices: **random** = {ri['matrices']['random']}; **low-rank + noise** = "
        f"{ri['matrices']['lowrank+noise']}. Machine: {machine_name(sysinfo)}, {sysinfo.get('cpu_count')} CPU "
        f"cores, torch threads {ri.get('torch_threads')}, accelerator: {sysinfo.get('accelerator')}; 1-minute load "
        f"average {ri['load_average_before'][0]:.1f} before, {ri['load_average_after'][0]:.1f} after (above the "
        "thread count, other work was competing for the cores)."
        + (" **Quick run: for checking the code, not for quoting.**" if ri.get("quick") else "")
    )
    lines.append("")
    lines.append("| n | r at 0.99, random | r at 0.99, low-rank+noise | SVD | init 0.99 random | init full | "
                 "init 0.99 low-rank+noise | init `svd=\"lowrank\"` (r, top-r max rel. error) | "
                 "same on random, r = n/16 | LoRA init |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        rnd, lrn = r["random"], r["lowrank+noise"]
        low = lrn["lowrank"]
        lines.append(
            f"| {r['width']} | {rnd['r_threshold']} | {lrn['r_threshold']} | {_fmt_s(rnd['svd_s'])} | "
            f"{_fmt_s(rnd['init_threshold_s'])} | {_fmt_s(rnd['init_full_s'])} | {_fmt_s(lrn['init_threshold_s'])} | "
            f"{_fmt_s(low['init_s'])} (r={low['r']}, {low['top_r_max_rel_error']:.1e}) | "
            f"{_fmt_s(rnd['lowrank']['init_s'])} ({rnd['lowrank']['top_r_max_rel_error']:.1e}) | "
            f"{_fmt_s(r['lora_init_s'])} |"
        )
    lines.append("")
    lines.append("Training step, time and ratio to LoRA r=8 (median over the timed steps):")
    lines.append("")
    lines.append("| n | " + " | ".join(STEP_MODELS.values()) + " |")
    lines.append("|---|" + "---|" * len(STEP_MODELS))
    for r in rows:
        cells = []
        for m in STEP_MODELS:
            v = r["step"][m]["median_s"]
            ratio = r["step_over_lora"].get(m)
            cells.append(_fmt_s(v) + (f" ({ratio:.2f}×)" if ratio is not None else ""))
        lines.append(f"| {r['width']} | " + " | ".join(cells) + " |")
    lines.append("")
    init_png, step_png = _plot(rows, Path(plots))
    lines.append(f"![init time vs width]({prefix}/{init_png})")
    lines.append(f"![step time vs width]({prefix}/{step_png})")
    lines.append("")
    return "\n".join(lines)


def _plot(rows: list[dict], plots: Path) -> tuple[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots.mkdir(parents=True, exist_ok=True)
    n = [r["width"] for r in rows]
    init_series = {
        "torch.linalg.svd (floor)": [r["random"]["svd_s"] for r in rows],
        "SVFit 0.99, random": [r["random"]["init_threshold_s"] for r in rows],
        "SVFit full": [r["random"]["init_full_s"] for r in rows],
        "SVFit 0.99, low-rank+noise": [r["lowrank+noise"]["init_threshold_s"] for r in rows],
        'SVFit svd="lowrank", low-rank+noise': [r["lowrank+noise"]["lowrank"]["init_s"] for r in rows],
        "LoRA r=8": [r["lora_init_s"] for r in rows],
    }
    step_series = {label: [r["step"][m]["median_s"] for r in rows] for m, label in STEP_MODELS.items()}
    init_png, step_png = "scaling_init.png", "scaling_step.png"
    _loglog(plt, n, init_series, "width n (n x n weight)", "seconds", "Init time vs width", plots / init_png)
    _loglog(plt, n, step_series, "width n", "seconds per step", "Training step time vs width", plots / step_png)
    return init_png, step_png


def _loglog(plt, n: list[int], series: dict[str, list[float]], xlabel: str, ylabel: str, title: str, path: Path):
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for label, ys in series.items():
        ax.plot(n, ys, marker="o", label=label, ls="--" if "floor" in label else "-")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, help="torch threads (default: quick 1, full all cores)")
    parser.add_argument("--widths", type=int, nargs="+", help="override the widths (by-hand partial runs)")
    args = parser.parse_args()
    run(args.out, args.quick, args.threads, args.widths)
    with tempfile.TemporaryDirectory() as plots:  # the committed plots are the report's (python -m benchmarks report)
        print(section(args.out, Path(plots)))


if __name__ == "__main__":
    main()
