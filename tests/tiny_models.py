"""Tiny models built from configs (no downloads) for the tuner tests."""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
)


def bert(seed: int = 0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     initializer_range=0.2)
    return BertForSequenceClassification(cfg).eval()


def roberta(seed: int = 0):
    torch.manual_seed(seed)
    cfg = RobertaConfig(
        vocab_size=100, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
        max_position_embeddings=64, initializer_range=0.2,
    )
    return RobertaForSequenceClassification(cfg).eval()


def llama(seed: int = 0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2,
    )
    return LlamaForCausalLM(cfg).eval()


def gpt2(seed: int = 0):
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0,
                     initializer_range=0.2)
    return GPT2LMHeadModel(cfg).eval()


class ConvNet(nn.Module):
    """A small CNN: a 3x3 stem, a strided 3x3 conv with padding/dilation variety, a 1x1 conv and a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 12, 3, stride=2, padding=2, dilation=2, bias=False)
        self.pw = nn.Conv2d(12, 16, 1)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = torch.relu(self.conv(h))
        h = torch.relu(self.depthwise(self.pw(h)))
        return self.head(h.mean((2, 3)))


class EmbedNet(nn.Module):
    """Embedding -> linear, with an optional Gemma-style embed scale on the embedding module."""

    def __init__(self, vocab: int = 50, dim: int = 16, embed_scale: float | None = None):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim) if embed_scale is None else ScaledEmbedding(vocab, dim, embed_scale)
        self.lin = nn.Linear(dim, 4)

    def forward(self, input_ids):
        return self.lin(self.emb(input_ids))


class ScaledEmbedding(nn.Embedding):
    def __init__(self, num, dim, scale):
        super().__init__(num, dim)
        self.register_buffer("embed_scale", torch.tensor(scale), persistent=False)

    def forward(self, ids):
        return super().forward(ids) * self.embed_scale.to(self.weight.dtype)


def conv_net(seed: int = 0):
    torch.manual_seed(seed)
    return ConvNet().eval()


def embed_net(seed: int = 0, **kw):
    torch.manual_seed(seed)
    return EmbedNet(**kw).eval()


def token_batch(vocab: int = 100, batch: int = 4, length: int = 7, seed: int = 123):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (batch, length), generator=g)
