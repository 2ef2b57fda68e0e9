"""The cost benchmark's cases and methods, the measurements it takes ratios over, and the goals it checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

NAME = "cost"
REFERENCE = "lora-r8"
BEFORE = "cost-before"  # results of the last run before the fast paths, kept for the before/after table
CALL_TIMEOUT_S = 1200  # one command of a worker (a setup, a step, the finish); a hung worker must not hang the run
METHODS: dict[str, dict[str, Any]] = {
    "svfit": {"kind": "svfit", "label": "SVFit (99% energy, default)"},
    "svfit-reference": {"kind": "svfit", "compute_path": "reference",
                        "label": "SVFit (99% energy), reference side branch (before the fast paths)"},
    "svfit-full": {"kind": "svfit", "r": "full", "label": "SVFit full spectrum"},
    "svft": {"kind": "svft", "label": "SVFT-style baseline (full bases, W rebuilt every forward)"},
    REFERENCE: {"kind": "lora", "r": 8, "lora_alpha": 8, "label": "LoRA r=8"},
}
# Issue #6's goals, checked in the report: (case suffix, measurement, limit)
GOALS = {
    "qv": {"step_time_median_s": 1.10, "peak_train_memory_growth_bytes": 1.10},
    "all": {"step_time_median_s": 1.50, "peak_train_memory_growth_bytes": 1.30},
}
INIT_GOAL = 1.1  # cold init / summed torch.linalg.svd
CACHE_GOAL_S = 1.0  # re-init from the SVD cache (SmolLM2-135M)
# measurement -> (label, unit); the ratios SVFit / LoRA are taken over these keys
RATIO_KEYS = {
    "step_time_median_s": ("training step time", "s"),
    "saved_activation_bytes": ("activations saved for backward", "B"),
    "peak_train_memory_growth_bytes": ("peak training memory growth", "B"),
    "init_s": ("cold init (get_peft_model)", "s"),
    "load_s": ("adapter load (from_pretrained)", "s"),
    "adapter_file_bytes": ("adapter_model.safetensors", "B"),
    "trainable_params": ("trainable parameters", ""),
}


@dataclass
class Case:
    id: str
    model_name: str
    loader: str  # key of LOADERS
    batch_size: int
    seq_len: int
    targets: list[str] | str
    targets_label: str
    steps: int
    warmup: int
    infer_reps: int
    threads: int | None = None  # torch threads in the workers; None: torch's default (all cores)
    notes: list[str] = field(default_factory=list)


def cases(quick: bool, threads: int | None = None, steps: int | None = None) -> list[Case]:
    """The cases of a run; ``threads`` overrides the torch threads of every worker (default: quick 1, full all),
    ``steps`` the number of timed steps."""
    chosen = _cases(quick)
    for c in chosen:
        c.threads = threads or c.threads
        c.steps = steps or c.steps
    return chosen


def _cases(quick: bool) -> list[Case]:
    if quick:
        return [
            Case("tiny-bert-qv", "tiny BERT (random init, hidden 64)", "tiny-bert", 8, 32, ["query", "value"],
                 "query, value", steps=4, warmup=1, infer_reps=2, threads=1),
            Case("tiny-llama-all", "tiny Llama (random init, hidden 64)", "tiny-llama", 4, 32, "all-linear",
                 "all-linear", steps=4, warmup=1, infer_reps=2, threads=1),
        ]
    smol_note = ("batch 4 x 256 instead of 8 x 256: a step of 8 x 256 takes 20-40 s on 2 CPU cores, too slow for "
                 "the time budget")
    minilm = "MiniLM-L6 (all-MiniLM-L6-v2, pre-trained BERT)"
    smol = "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to fp32)"
    return [
        Case("minilm-qv", minilm, "minilm", 32, 128, ["query", "value"], "query, value", 10, 2, 3),
        Case("minilm-all", minilm, "minilm", 32, 128, "all-linear", "all-linear", 10, 2, 3),
        Case("smollm2-qv", smol, "smollm2", 4, 256, ["q_proj", "v_proj"], "q_proj, v_proj", 10, 1, 1, notes=[smol_note]),
        Case("smollm2-all", smol, "smollm2", 4, 256, "all-linear", "all-linear", 10, 1, 1, notes=[smol_note]),
    ]


def _ratio(a, b) -> float | None:
    if a is None or b is None or not b or b <= 0 or a < 0:
        return None
    return a / b
