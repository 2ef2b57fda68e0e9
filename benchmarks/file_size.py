"""Adapter file size: SVFit against LoRA r=8 on the same targets, measured in the same run.

Real weights: MiniLM-L6 (pre-trained BERT, the default task's model), attention query/value, SVFit at its default
(99% energy), nuclear 99%, and the full spectrum. A RoBERTa-base-shaped model built from its config (random weights)
gives the paper's 18,432-vs-294,912 full-spectrum arithmetic on disk. No task head is included on either side.

    python benchmarks/file_size.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

import svfit
from svfit.train.results import system_info

TARGETS = ["query", "value"]


def adapter_bytes(model, directory: Path) -> tuple[int, int]:
    model.save_pretrained(directory)
    weights = (directory / "adapter_model.safetensors").stat().st_size
    total = sum(f.stat().st_size for f in directory.iterdir() if f.is_file() and f.name != "README.md")
    return weights, total


def measure(name: str, build, rows: list, tmp: Path) -> None:
    torch.manual_seed(0)
    lora = get_peft_model(build(), LoraConfig(r=8, target_modules=TARGETS))
    lora_w, lora_t = adapter_bytes(lora, tmp / f"{name}-lora")
    lora_params = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    variants = {
        "svfit energy-99% (default)": {},
        "svfit nuclear-99%": {"information": "nuclear"},
        "svfit full spectrum": {"r": "full"},
    }
    for label, kwargs in variants.items():
        torch.manual_seed(0)
        model = get_peft_model(build(), svfit.SVFitConfig(target_modules=TARGETS, **kwargs))
        w, t = adapter_bytes(model, tmp / f"{name}-{label.split()[1]}")
        params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        rows.append(
            {
                "model": name,
                "variant": label,
                "trainable": params,
                "lora_r8_trainable": lora_params,
                "param_ratio": lora_params / params,
                "safetensors_bytes": w,
                "lora_r8_safetensors_bytes": lora_w,
                "file_ratio": lora_w / w,
                "dir_bytes_incl_config": t,
                "lora_r8_dir_bytes_incl_config": lora_t,
                "dir_ratio": lora_t / t,
            }
        )


def minilm():
    from transformers import AutoModel

    from svfit.assets import minilm_dir

    return AutoModel.from_pretrained(minilm_dir())


def roberta_base_shape():
    from transformers import RobertaConfig, RobertaModel

    return RobertaModel(RobertaConfig(vocab_size=1000, max_position_embeddings=130))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        measure("MiniLM-L6 (pre-trained)", minilm, rows, Path(tmp))
        measure("RoBERTa-base shape (random init)", roberta_base_shape, rows, Path(tmp))
    print(f"machine: {system_info()['processor']}, {system_info()['cpu_count']} cores")
    print(f"{'model':34s} {'variant':28s} {'params':>8s} {'LoRA/SVFit':>10s} {'file B':>8s} {'LoRA/SVFit':>10s}"
          f" {'dir B':>8s} {'LoRA/SVFit':>10s}")
    for r in rows:
        print(f"{r['model']:34s} {r['variant']:28s} {r['trainable']:8,d} {r['param_ratio']:9.1f}x "
              f"{r['safetensors_bytes']:8,d} {r['file_ratio']:9.1f}x {r['dir_bytes_incl_config']:8,d} {r['dir_ratio']:9.1f}x")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
