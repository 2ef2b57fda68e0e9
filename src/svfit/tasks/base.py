"""What a task is: a pre-trained model, real data with a fixed seeded split, a loss and a metric."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn


@dataclass(frozen=True)
class TaskDefaults:
    """Sized for a meaningful result in minutes on 2 CPU cores; every value has a CLI override."""

    epochs: float
    batch_size: int
    train_limit: Optional[int]  # None: the whole training split
    eval_limit: Optional[int]
    lr: dict[str, float]  # per method name
    head_lr: float = 1e-3
    eval_batch_size: int = 64


@dataclass
class Prediction:
    label: str
    probability: float
    scores: dict[str, float] = field(default_factory=dict)
    generated: Optional[str] = None  # what a generative model actually wrote


class Task(ABC):
    name: str
    help: str
    model_name: str  # what result.json reports as the base model
    dataset_name: str
    labels: tuple[str, ...]
    # default target modules: the paper's attention q,v or the task's equivalent (a tuple of names, or a regex)
    targets: tuple[str, ...] | str
    head_modules: tuple[str, ...] = ()  # new modules trained in full (modules_to_save)
    peft_task_type: Optional[str] = None
    defaults: TaskDefaults
    input_kind: str = "text"  # what `svfit predict` expects: "text" or "image"
    model_source: Optional[str] = None  # a local model directory or hub id replacing the bundled model
    supports_model_override: bool = True

    # -- model and data --------------------------------------------------------------------------------------------

    @abstractmethod
    def load_model(self) -> nn.Module:
        """A fresh pre-trained base with a new head (seed the global RNG first for a reproducible head)."""

    @abstractmethod
    def load_data(self, seed: int, train_limit: Optional[int], eval_limit: Optional[int]) -> tuple[list, list]:
        """(train examples, held-out examples); the split is fixed by the seed."""

    @abstractmethod
    def collate(self, examples: list) -> dict:
        """Batch examples (raw, or as :meth:`prepare` returns them) into model inputs (with labels)."""

    def prepare(self, examples: list) -> list:
        """The examples in the form :meth:`collate` batches fastest (e.g. texts tokenised once); same labels, same
        order. The default keeps them as they are."""
        return examples

    def example_length(self, example) -> Optional[int]:
        """Size of one (prepared) example, e.g. its token count, for batching by length; None: not applicable."""
        return None

    # -- linear probe and probe-initialised heads (LP-FT) ---------------------------------------------------------

    def probe_features(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        """Frozen features of a batch for a linear probe, by name. The first entry is what the task's new head
        reads (so a probe on it can initialise that head); others are extra probes for the floor."""
        raise NotImplementedError(f"task {self.name} defines no probe features")

    def head_linear(self, model: nn.Module) -> nn.Linear:
        """The new head of a freshly loaded (not yet adapted) model, for a probe-initialised head."""
        raise NotImplementedError(f"task {self.name} has no new linear head")

    def head_dropout(self, model: nn.Module) -> Optional[nn.Module]:
        """The dropout applied to the head's input, if any (switched off under a probe-initialised head)."""
        return None

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return model(**batch).loss

    def count_tokens(self, batch: dict) -> int:
        mask = batch.get("attention_mask")
        return int(mask.sum()) if mask is not None else 0

    def on_train_start(self, model: nn.Module) -> None:
        """Hook after model.train(): e.g. keep BatchNorm statistics frozen."""

    def is_head(self, param_name: str) -> bool:
        """Is this trainable parameter part of a new head (its own learning rate)?"""
        if "modules_to_save" in param_name:
            return True
        return any(f".{h}." in f".{param_name}" for h in self.head_modules)

    # -- scoring ---------------------------------------------------------------------------------------------------

    def eval_order(self, examples: list) -> list[int]:
        """The order to score examples in: by length where lengths exist (less padding); results are per example."""
        if not examples or self.example_length(examples[0]) is None:
            return list(range(len(examples)))
        return sorted(range(len(examples)), key=lambda i: self.example_length(examples[i]))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, examples: list, batch_size: int, progress: bool = False) -> dict:
        """Accuracy and mean loss on held-out examples (classification tasks), and ``correct``: 1/0 per example in
        the given order (for paired tests between methods on the same examples)."""
        from tqdm.auto import tqdm

        model.eval()
        device = next(model.parameters()).device
        order = self.eval_order(examples)
        correct, loss_sum = [0] * len(examples), 0.0
        for start in tqdm(range(0, len(order), batch_size), desc="eval", disable=not progress, leave=False):
            idx = order[start : start + batch_size]
            batch = _to(self.collate([examples[i] for i in idx]), device)
            out = model(**batch)
            loss_sum += float(out.loss) * len(idx)
            for i, hit in zip(idx, (out.logits.argmax(-1) == batch["labels"]).tolist()):
                correct[i] = int(hit)
        n = max(len(examples), 1)
        return {"accuracy": sum(correct) / n, "loss": loss_sum / n, "examples": len(examples), "correct": correct}

    @abstractmethod
    def predict(self, model: nn.Module, raw: Any) -> Prediction:
        """Label one raw input (a text, or an image path)."""

    def describe_example(self, example) -> str:
        return str(example)


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def softmax_prediction(logits: torch.Tensor, labels: tuple[str, ...]) -> Prediction:
    probs = torch.softmax(logits.float(), -1)
    i = int(probs.argmax())
    return Prediction(labels[i], float(probs[i]), {label: float(p) for label, p in zip(labels, probs)})
