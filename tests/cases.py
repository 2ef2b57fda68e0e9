"""Model cases shared by the tuner tests: how to build each tiny model, what to target, how to feed it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

import tiny_models as tm


@dataclass
class Case:
    name: str
    build: Callable[..., torch.nn.Module]
    targets: list[str]
    make_input: Callable[[], dict]
    extra: dict = field(default_factory=dict)

    def run(self, model, inputs=None, **kwargs):
        inputs = self.make_input() if inputs is None else inputs
        out = model(**inputs, **kwargs)
        return out if isinstance(out, torch.Tensor) else out.logits


def _tokens(vocab=100):
    return lambda: {"input_ids": tm.token_batch(vocab=vocab)}


def _images():
    g = torch.Generator().manual_seed(7)
    return lambda: {"x": torch.randn(4, 3, 12, 12, generator=g)}


CASES = {
    "bert": Case("bert", tm.bert, ["query", "value"], _tokens(), {"task_type": "SEQ_CLS"}),
    "roberta": Case("roberta", tm.roberta, ["query", "value"], _tokens()),
    "llama": Case("llama", tm.llama, ["q_proj", "v_proj", "down_proj"], _tokens(120)),
    "gpt2": Case("gpt2", tm.gpt2, ["c_attn", "c_proj"], _tokens()),
    "conv": Case("conv", tm.conv_net, ["stem", "conv", "pw"], _images()),
    "embed": Case("embed", tm.embed_net, ["emb", "lin"], lambda: {"input_ids": tm.token_batch(vocab=50)}),
}
