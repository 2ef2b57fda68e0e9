"""The one training loop every task and method goes through, so that comparisons are like for like."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from torch import nn
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup


@dataclass
class OptimConfig:
    lr: float  # trained adapter parameters (singular values for SVFit; the backbone for full fine-tuning)
    head_lr: float  # new task heads (modules_to_save)
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    grad_clip: float = 1.0


@dataclass
class TrainLog:
    """What the loop measured; becomes result.json's train_info."""

    steps: int = 0
    examples: int = 0
    tokens: int = 0
    train_time: float = 0.0
    curve: list[dict] = field(default_factory=list)  # one entry per logging interval
    eval_curve: list[dict] = field(default_factory=list)  # periodic held-out scores, when requested
    distributed: Optional[dict] = None  # data-parallel runs: process count and per-process parameter checksums

    @property
    def final_loss(self) -> Optional[float]:
        return self.curve[-1]["train loss"] if self.curve else None


def param_groups(model: nn.Module, optim: OptimConfig, is_head: Callable[[str], bool]) -> list[dict]:
    """Separate learning rates for the adapter and for new heads: singular values want rates ~100x those of a
    freshly initialised linear head (see SVFIT.md's priors), LoRA the opposite."""
    adapter, head = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (head if is_head(name) else adapter).append(p)
    groups = []
    if adapter:
        groups.append({"params": adapter, "lr": optim.lr, "weight_decay": optim.weight_decay, "name": "adapter"})
    if head:
        groups.append({"params": head, "lr": optim.head_lr, "weight_decay": optim.weight_decay, "name": "head"})
    if not groups:
        raise ValueError("nothing to train: no parameter requires grad")
    return groups


class LengthGroupedBatches(Sampler):
    """Batches of similar length, in random order: each epoch shuffles the examples, cuts them into windows of
    ``window`` batches, sorts each window by length and cuts it into batches, then shuffles the batches. Padding
    shrinks to a few tokens while every example is still seen once per epoch (the last batch may be short), so an
    epoch has as many steps as with plain shuffling. Seeded: the same seed gives the same batches."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, window: int = 50):
        self.lengths, self.batch_size, self.window = list(lengths), batch_size, window
        self.drop_last = False
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def __iter__(self):
        order = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        chunk = self.batch_size * self.window
        batches = []
        for start in range(0, len(order), chunk):
            group = sorted(order[start : start + chunk], key=self.lengths.__getitem__)
            batches += [group[i : i + self.batch_size] for i in range(0, len(group), self.batch_size)]
        # the one short batch (if any) stays last, so that batch-size bookkeeping matches plain shuffling
        full = [b for b in batches if len(b) == self.batch_size]
        short = [b for b in batches if len(b) < self.batch_size]
        for i in torch.randperm(len(full), generator=self.generator).tolist():
            yield full[i]
        yield from short


def make_accelerator() -> Accelerator:
    """Data-parallel processes split each batch (split_batches): the global batch, step count and schedule stay
    those of a single-process run, so the same hyper-parameters mean the same optimisation at any scale."""
    return Accelerator(
        cpu=not torch.cuda.is_available(), dataloader_config=DataLoaderConfiguration(split_batches=True)
    )


def fit(
    model: nn.Module,
    dataset: Sequence,
    collate: Callable[[list], dict],
    loss_fn: Callable[[nn.Module, dict], torch.Tensor],
    optim: OptimConfig,
    *,
    epochs: float,
    batch_size: int,
    seed: int,
    is_head: Callable[[str], bool],
    accelerator: Optional[Accelerator] = None,
    log_every: int = 10,
    progress: bool = True,
    count_tokens: Optional[Callable[[dict], int]] = None,
    on_train_start: Optional[Callable[[nn.Module], None]] = None,
    evaluate: Optional[Callable[[nn.Module], dict]] = None,
    eval_every: Optional[int] = None,
    max_steps: Optional[int] = None,
    lengths: Optional[Sequence[int]] = None,
    report: Optional[Callable[[str], None]] = None,
) -> TrainLog:
    """Train ``model`` in place with AdamW, linear warm-up/decay and gradient clipping.

    ``epochs`` may be fractional (e.g. 0.5 stops half way through the first epoch). ``on_train_start`` lets a task
    adjust modes after ``model.train()`` (e.g. keep BatchNorm statistics frozen). With ``evaluate`` and
    ``eval_every``, the model is scored every ``eval_every`` steps (and at step 0) into ``log.eval_curve``: the
    learning curves that show how fast a method adapts. ``max_steps`` fixes the number of optimizer steps instead
    of ``epochs`` (the data repeats as needed). ``lengths`` (one per example, e.g. token counts) batches examples of
    similar length together (:class:`LengthGroupedBatches`), which removes most of the padding. ``report``, when
    given, receives one plain progress line per logging interval (for logs and pipes, where the progress bar is off).
    """
    accelerator = accelerator or make_accelerator()
    if lengths is not None:
        batches = LengthGroupedBatches(lengths, batch_size, seed)
        loader = DataLoader(list(dataset), batch_sampler=batches, collate_fn=collate)
    else:
        generator = torch.Generator().manual_seed(seed)
        loader = DataLoader(list(dataset), batch_size=batch_size, shuffle=True, collate_fn=collate, generator=generator)
    total_steps = max_steps if max_steps else max(1, math.ceil(epochs * len(loader)))
    optimizer = torch.optim.AdamW(param_groups(model, optim, is_head))
    scheduler = get_linear_schedule_with_warmup(optimizer, int(optim.warmup_ratio * total_steps), total_steps)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    trainable = [p for p in model.parameters() if p.requires_grad]

    log = TrainLog()
    window_loss, window_n, window_start = 0.0, 0, time.perf_counter()
    model.train()
    if on_train_start is not None:
        on_train_start(model)
    progress = progress and accelerator.is_main_process

    def score(step: int) -> None:
        if evaluate is None or not eval_every:
            return
        metrics = evaluate(accelerator.unwrap_model(model))
        log.eval_curve.append({"step": step, "valid accuracy": metrics["accuracy"], "valid loss": metrics["loss"]})
        model.train()
        if on_train_start is not None:
            on_train_start(model)

    score(0)
    window_start = time.perf_counter()
    bar = tqdm(total=total_steps, desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    start = time.perf_counter()
    while log.steps < total_steps:
        for batch in loader:
            loss = loss_fn(model, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"training diverged at step {log.steps} (loss={loss.item()}); lower the learning rate "
                    f"({_lr_flags(optimizer)})"
                )
            accelerator.backward(loss)
            if optim.grad_clip:
                accelerator.clip_grad_norm_(trainable, optim.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            n = _batch_size(batch) * accelerator.num_processes  # examples across all processes
            log.steps += 1
            log.examples += n
            log.tokens += count_tokens(batch) if count_tokens else 0
            window_loss += loss.item() * n
            window_n += n
            elapsed = time.perf_counter() - start
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", ex_per_s=f"{log.examples / max(elapsed, 1e-9):.1f}")
            if log.steps % log_every == 0 or log.steps == total_steps:
                now = time.perf_counter()
                entry = {
                    "step": log.steps,
                    "train loss": window_loss / max(window_n, 1),
                    "train samples": log.examples,
                    "train time": now - window_start,
                    "examples / sec": window_n / max(now - window_start, 1e-9),
                    "epoch": log.steps / len(loader),
                    "lr": scheduler.get_last_lr()[0],
                }
                if count_tokens:
                    entry["train total tokens"] = log.tokens
                log.curve.append(entry)
                if report is not None and accelerator.is_main_process:
                    report(_progress_line(entry, total_steps, now - start))
                window_loss, window_n, window_start = 0.0, 0, now
            if eval_every and (log.steps % eval_every == 0 or log.steps == total_steps):
                paused = time.perf_counter()
                score(log.steps)
                spent = time.perf_counter() - paused
                start += spent  # scoring is not training time
                window_start += spent
            if log.steps >= total_steps:
                break
    bar.close()
    log.train_time = time.perf_counter() - start
    model.eval()
    return log


def _progress_line(entry: dict, total_steps: int, elapsed: float) -> str:
    return (f"step {entry['step']}/{total_steps}  loss {entry['train loss']:.4f}  "
            f"{entry['examples / sec']:.1f} examples/s  {elapsed:.0f} s elapsed")


def _lr_flags(optimizer) -> str:
    """The CLI flags of the learning rates in play: a diverging head must not be blamed on --lr alone."""
    names = {group.get("name") for group in optimizer.param_groups}
    return " or ".join(flag for flag, name in (("--lr", "adapter"), ("--head-lr", "head")) if name in names) or "--lr"


def _batch_size(batch: dict) -> int:
    for value in batch.values():
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    raise ValueError("batch has no tensor")
