"""The quality benchmark's plan: which rows (variants) each task has, and each profile's budget per task."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional

from svfit.methods import MethodOptions


@dataclass(frozen=True)
class Variant:
    """A row of a task's table: a method with options. ``lr_from`` names the variant whose pick it uses (itself
    when it is tuned); ``lr_factor`` scales that pick (a parametrization with other units)."""

    name: str
    method: str
    options: MethodOptions = field(default_factory=MethodOptions)
    label: str = ""
    lr_from: str = ""
    lr_factor: float = 1.0

    @property
    def tuned(self) -> bool:
        return not self.lr_from or self.lr_from == self.name

    @property
    def source(self) -> str:
        return self.lr_from or self.name


VARIANTS = {
    v.name: v
    for v in [
        Variant("svfit", "svfit", MethodOptions(), "SVFit, energy 0.99 (default)"),
        Variant("svfit-full", "svfit", MethodOptions(rank="full"), "SVFit, full spectrum (SVFT-Plain)", "svfit"),
        Variant("svfit-r8", "svfit", MethodOptions(rank=8), "SVFit, fixed r=8", "svfit"),
        Variant("lora", "lora", MethodOptions(), "LoRA r=8"),
        Variant("pissa", "pissa", MethodOptions(), "PiSSA r=8", "lora"),
        Variant("full", "full", MethodOptions(), "full fine-tuning (ceiling)"),
    ]
}
# Why SVFit trails, if it does: one seed each at SVFit's pick (scale: the same rms step, and a quarter of it)
ABLATIONS = {
    v.name: v
    for v in [
        Variant("abl-scale", "svfit", MethodOptions(parametrization="scale"), "parametrization: scale (σ·z)",
                "svfit", 500.0),
        Variant("abl-scale-low", "svfit", MethodOptions(parametrization="scale"),
                "parametrization: scale (σ·z), lr / 4", "svfit", 125.0),
        Variant("abl-t0.90", "svfit", MethodOptions(threshold=0.9), "threshold: energy 0.90", "svfit"),
        Variant("abl-nuclear", "svfit", MethodOptions(information="nuclear"), "threshold: nuclear 0.99", "svfit"),
        Variant("abl-all-linear", "svfit", MethodOptions(targets="all-linear"), "layers: every Linear", "svfit"),
    ]
}
ALL = {**VARIANTS, **ABLATIONS}


EVERYTHING = 10**7  # a limit above any split's size: the whole split (None would mean the task's CLI default)


@dataclass(frozen=True)
class TaskPlan:
    steps: Optional[int]  # optimizer steps per run (None: ``epochs`` over the training split)
    batch_size: int
    val_examples: int  # validation split (the last examples of the training data)
    test_examples: int  # the fixed test set (EVERYTHING: the whole test split)
    train_limit: int  # training split (EVERYTHING: all that remains after the validation split)
    centre: dict  # tuned method -> the middle of its grid
    variants: tuple[str, ...]
    eval_points: int = 10  # validation scores per run (plus step 0)
    epochs: Optional[float] = None
    image_size: Optional[int] = None
    bucket: bool = False
    head_lr: float = 1e-3  # the probe-initialised head (LP-FT): one rate for every method
    lpft: bool = True
    probe_train_limit: Optional[int] = None  # the probe's training examples (None: the runs' training split)
    ablation: bool = True
    dropped: str = ""  # what the budget dropped, for the report

    def eval_every(self, train_size: int) -> int:
        steps = self.steps or math.ceil(self.epochs * math.ceil(train_size / self.batch_size))
        return max(1, steps // self.eval_points)


@dataclass(frozen=True)
class Profile:
    name: str
    tasks: dict  # task -> TaskPlan, in run order
    seeds: tuple[int, ...] = (0, 1, 2)
    extra_seeds: tuple[int, ...] = (3, 4)  # SVFit and LoRA, where 3 seeds neither resolve nor bound the verdict
    grid_points: int = 5
    spacing: float = 2.0
    max_extend: int = 3  # grid points added past an end, per end
    split_seed: int = 0  # one train/validation/test split for every seed and method
    workers: int = 2  # experiments run side by side, each in its own process
    threads: int = 1  # torch threads per worker (0: torch's default)


CPU = Profile(
    "cpu",
    {
        "sentiment": TaskPlan(
            500, 16, 1000, EVERYTHING, EVERYTHING, {"svfit": 1e-4, "lora": 1e-3, "full": 5e-5},
            ("svfit", "svfit-full", "svfit-r8", "lora", "pissa", "full"), bucket=True,
        ),
        "fashion": TaskPlan(
            500, 16, 1000, 2000, 8000, {"svfit": 6e-5, "lora": 1e-3, "full": 2e-4},
            ("svfit", "svfit-full", "svfit-r8", "lora", "full"), image_size=56,
            dropped="PiSSA: PEFT's PiSSA initialises Linear layers only, and this task adapts Conv2d layers.",
        ),
        "vit-fashion": TaskPlan(
            500, 16, 1000, 2000, 8000, {"svfit": 3e-4, "lora": 1e-3, "full": 2e-5},
            ("svfit", "svfit-full", "svfit-r8", "lora", "pissa", "full"), image_size=56,
        ),
        "lm-sentiment": TaskPlan(
            500, 10, 2000, 1000, EVERYTHING, {"svfit": 4e-5, "lora": 1e-3, "full": 2e-5},
            ("svfit", "svfit-full", "lora"), eval_points=5, bucket=True, lpft=False, probe_train_limit=2000,
            ablation=False,
            dropped="SVFit r=8, PiSSA, full fine-tuning and the ablation: a SmolLM2-135M step costs ~4x a MiniLM "
            "step on 2 CPU cores; the issue's rule keeps SVFit, SVFit full spectrum and LoRA and drops methods "
            "before steps.",
        ),
    },
)
# An accelerator scales the budget up: whole training sets, 3 epochs, the whole test sets, full resolution. Up to four
# experiments share the GPU at a time (small models leave most of it idle), each with 2 CPU threads (profile_for
# lowers the count on a machine with fewer than 8 cores). Measured on sentiment only (benchmarks/results-cuda).
CUDA = Profile(
    "cuda",
    {
        task: replace(plan, steps=None, epochs=3.0, batch_size=32, train_limit=EVERYTHING, test_examples=EVERYTHING,
                      val_examples=2000, image_size=224 if plan.image_size else None, probe_train_limit=None,
                      variants=plan.variants if task == "fashion" else tuple(VARIANTS),
                      dropped=plan.dropped if task == "fashion" else "")
        for task, plan in CPU.tasks.items()
    },
    workers=4,
    threads=2,
)
QUICK = Profile(
    "quick",
    {"sentiment": TaskPlan(4, 4, 8, 8, 16, {"svfit": 1e-4, "lora": 1e-3}, ("svfit", "lora"),
                           eval_points=2, bucket=True)},
    seeds=(0, 1),
    extra_seeds=(),
    grid_points=1,
    workers=1,
)


def profile_for(quick: bool, device: str) -> Profile:
    if quick:
        return QUICK
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is visible")
        import os

        # up to 4 experiments share the GPU, 2 CPU threads each, never more threads than the machine has cores
        return replace(CUDA, workers=max(1, min(CUDA.workers, (os.cpu_count() or 2) // CUDA.threads)))
    if device != "cpu":
        raise ValueError(f"--device must be cpu or cuda, got {device!r}")
    return CPU


def grid_lr(x: float) -> float:
    return float(f"{x:.3g}")


def planned_grid(profile: Profile, plan: TaskPlan, name: str) -> list[float]:
    """The learning rates ``profile`` first runs for a tuned variant: ``grid_points`` at ``spacing`` around its
    centre (before any growth past an end)."""
    half = profile.grid_points // 2
    return [grid_lr(plan.centre[name] * profile.spacing ** (k - half)) for k in range(profile.grid_points)]

