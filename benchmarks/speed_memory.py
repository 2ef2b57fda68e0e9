"""Training-step speed and memory of SVFit against LoRA r=8, measured in the same run on the same batch.

For each adapter on MiniLM-L6 (query, value) it times forward + backward + optimizer step (median of --steps after
--warmup), and counts the bytes autograd keeps for backward (exact, via saved-tensor hooks, deduplicated by
storage) and the adapter's own extra memory (trainable values plus frozen U_r, V_r). On CUDA it also reports the
peak allocated memory. Ratios are against LoRA r=8 from the same invocation.

    python benchmarks/speed_memory.py [--batch-size 32] [--seq-len 64] [--steps 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model

import svfit
from svfit.train.results import system_info

TARGETS = ["query", "value"]


def saved_bytes(model, batch) -> int:
    """Bytes autograd stores for the backward pass of one forward (each storage counted once)."""
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).last_hidden_state.float().pow(2).mean()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def adapter_bytes(model) -> int:
    total = 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if any(k in name for k in ("svfit_", "lora_")):
            total += t.numel() * t.element_size()
    return total


def step_times(model, batch, steps: int, warmup: int) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    times = []
    for i in range(warmup + steps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = model(**batch).last_hidden_state.float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel

    from svfit.assets import minilm_dir

    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(1000, 20000, (args.batch_size, args.seq_len), generator=g).to(device),
        "attention_mask": torch.ones(args.batch_size, args.seq_len, dtype=torch.long, device=device),
    }
    configs = {
        "lora r=8": LoraConfig(r=8, target_modules=TARGETS),
        "svfit energy-99%": svfit.SVFitConfig(target_modules=TARGETS),
        "svfit full spectrum": svfit.SVFitConfig(target_modules=TARGETS, r="full"),
        "svfit r=32": svfit.SVFitConfig(target_modules=TARGETS, r=32),
    }
    results = {}
    for name, config in configs.items():
        model = get_peft_model(AutoModel.from_pretrained(minilm_dir()), config).to(device)
        model.train()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        times = step_times(model, batch, args.steps, args.warmup)
        results[name] = {
            "step_s": statistics.median(times),
            "saved_for_backward": saved_bytes(model, batch),
            "adapter_bytes": adapter_bytes(model),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "cuda_peak": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        }
        del model
    info = system_info()
    print(f"MiniLM-L6, targets query,value; batch {args.batch_size} x {args.seq_len} tokens; median of {args.steps} "
          f"steps; {info['processor']}, {info['cpu_count']} cores, torch threads {info['torch_threads']}, "
          f"accelerator: {info['accelerator']}")
    ref = results["lora r=8"]
    print(f"{'adapter':22s} {'trainable':>9s} {'step s':>8s} {'vs LoRA':>8s} {'saved MB':>9s} {'vs LoRA':>8s} "
          f"{'adapter MB':>10s}")
    for name, r in results.items():
        print(f"{name:22s} {r['trainable']:9,d} {r['step_s']:8.3f} {r['step_s'] / ref['step_s']:7.2f}x "
              f"{r['saved_for_backward'] / 2**20:9.1f} {r['saved_for_backward'] / ref['saved_for_backward']:7.2f}x "
              f"{r['adapter_bytes'] / 2**20:10.2f}")


if __name__ == "__main__":
    main()
