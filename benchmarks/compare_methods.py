"""Where SVFit stands: every method on the same task, data, loop and budget, with ratios against LoRA measured in
the same invocation.

    python benchmarks/compare_methods.py --task sentiment --seeds 0 1 2
    python benchmarks/compare_methods.py --task vit-fashion --variants svfit svfit-full lora --train-limit 1000

Each run is a normal `svfit train` run directory under --out (result.json in PEFT's method_comparison schema);
the summary table (markdown) and summary.json go next to them. Report the machine with the numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from svfit.methods import MethodOptions
from svfit.train.results import held_out, system_info, write_json
from svfit.train.run import RunConfig, train_run

# variant -> (method, options); the SVFit variants are the threshold default, the other reading of "information"
# and the full spectrum (SVFIT.md §7: benchmarks report both the threshold default and the full spectrum)
VARIANTS = {
    "svfit": ("svfit", {}),
    "svfit-nuclear": ("svfit", {"information": "nuclear"}),
    "svfit-full": ("svfit", {"rank": "full"}),
    "lora": ("lora", {}),
    "pissa": ("pissa", {}),
    "ia3": ("ia3", {}),
    "full": ("full", {}),
}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="sentiment")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--epochs", type=float)
    p.add_argument("--train-limit", type=int)
    p.add_argument("--eval-limit", type=int)
    p.add_argument("--lr", action="append", default=[], metavar="VARIANT=LR", help="override a variant's lr")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)
    lrs = dict(item.split("=", 1) for item in args.lr)

    out = args.out / args.task
    rows = []
    for variant in args.variants:
        method, opts = VARIANTS[variant]
        for seed in args.seeds:
            run_dir = out / f"{variant}-seed{seed}"
            print(f"== {variant} seed {seed} -> {run_dir}", file=sys.stderr)
            config = RunConfig(
                task=args.task, method=method, out=run_dir, seed=seed, epochs=args.epochs,
                lr=float(lrs[variant]) if variant in lrs else None, train_limit=args.train_limit,
                eval_limit=args.eval_limit, options=MethodOptions(**opts), overwrite=True, progress=False,
            )
            result = train_run(config, echo=lambda s: print("   ", s, file=sys.stderr))
            info, final = result["train_info"], result["train_info"]["metrics"][-1]
            rows.append({
                "variant": variant, "seed": seed, "accuracy": held_out(final)["accuracy"],
                "accuracy_before": final["accuracy before"], "test_loss": held_out(final)["loss"],
                "trainable": info["num_trainable_params"], "file_size": info["file_size"],
                "train_time": info["train_time"], "lr": result["run_info"]["train_config"]["lr"],
                "cpu_rss_max": info["cpu_rss_max"],
            })
    summary = summarize(rows)
    table = markdown(summary, args.task)
    print(table)
    write_json(out / "summary.json", {"task": args.task, "system": system_info(), "runs": rows, "summary": summary})
    (out / "summary.md").write_text(table + "\n")


def summarize(rows: list[dict]) -> list[dict]:
    by_variant: dict[str, list[dict]] = {}
    for r in rows:
        by_variant.setdefault(r["variant"], []).append(r)
    lora = by_variant.get("lora")
    out = []
    for variant, runs in by_variant.items():
        acc = [r["accuracy"] for r in runs]
        entry = {
            "variant": variant,
            "seeds": len(runs),
            "accuracy_mean": statistics.mean(acc),
            "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "trainable": runs[0]["trainable"],
            "file_size": runs[0]["file_size"],
            "train_time_mean": statistics.mean(r["train_time"] for r in runs),
            "lr": runs[0]["lr"],
        }
        if lora:
            entry["lora_trainable_ratio"] = lora[0]["trainable"] / entry["trainable"]
            entry["lora_file_ratio"] = lora[0]["file_size"] / entry["file_size"]
            entry["time_vs_lora"] = entry["train_time_mean"] / statistics.mean(r["train_time"] for r in lora)
        out.append(entry)
    return out


def markdown(summary: list[dict], task: str) -> str:
    sysinfo = system_info()
    lines = [
        f"task `{task}` — measured on {sysinfo['processor']} ({sysinfo['cpu_count']} cores, {sysinfo['accelerator']})",
        "",
        "| variant | lr | accuracy | trainable (incl. head) | LoRA/this params | file bytes | LoRA/this file | train s | time vs LoRA |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        acc = f"{s['accuracy_mean']:.4f}" + (f" ± {s['accuracy_std']:.4f}" if s["seeds"] > 1 else "")
        ratio = lambda k, f="{:.1f}x": f.format(s[k]) if k in s else "-"  # noqa: E731
        lines.append(
            f"| {s['variant']} | {s['lr']:g} | {acc} (n={s['seeds']}) | {s['trainable']:,} | {ratio('lora_trainable_ratio')} "
            f"| {s['file_size']:,} | {ratio('lora_file_ratio')} | {s['train_time_mean']:.0f} | {ratio('time_vs_lora', '{:.2f}x')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
