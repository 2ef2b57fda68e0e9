"""An SVFT-style baseline for the cost benchmark (our own code, written from the method's description).

SVFT (arXiv 2405.19597, "Plain" variant) does the same job as SVFit with the whole spectrum: it factors each
targeted weight W0 = U diag(sigma) V^T, trains a shift delta of every singular value, and, as its reference
implementation does, rebuilds W = U diag(sigma + delta) V^T in every forward from both full bases, which it keeps
in place of W0. Autograd then keeps the rebuilt W for backward. It is here only to be measured against SVFit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SVFTLinear(nn.Module):
    def __init__(self, base: nn.Linear):
        super().__init__()
        W = base.weight.detach()
        U, S, Vh = torch.linalg.svd(W.float(), full_matrices=False)
        self.register_buffer("svft_U", U.to(W.dtype))
        self.register_buffer("svft_sigma", S.to(W.dtype))
        self.register_buffer("svft_V", Vh.mH.contiguous().to(W.dtype))
        self.svft_delta = nn.Parameter(torch.zeros_like(S, dtype=W.dtype))
        self.bias = base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        W = (self.svft_U * (self.svft_sigma + self.svft_delta)) @ self.svft_V.T
        return F.linear(x, W, self.bias)


def _matches(name: str, module: nn.Module, targets, output_layer) -> bool:
    if not isinstance(module, nn.Linear) or module is output_layer:
        return False
    if targets == "all-linear":
        return True
    return name.rsplit(".", 1)[-1] in targets


def apply_svft(model: nn.Module, targets) -> nn.Module:
    """Freeze ``model`` and replace its targeted nn.Linear layers (names' last part in ``targets``, or every Linear
    but the output layer for "all-linear", like PEFT) by SVFT layers, in place."""
    for p in model.parameters():
        p.requires_grad_(False)
    get_out = getattr(model, "get_output_embeddings", None)
    output_layer = get_out() if callable(get_out) else None
    chosen = [(n, m) for n, m in model.named_modules() if _matches(n, m, targets, output_layer)]
    if not chosen:
        raise ValueError(f"no nn.Linear matches {targets!r}")
    for name, module in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, SVFTLinear(module))
    return model


def svft_layers(model: nn.Module) -> list[SVFTLinear]:
    return [m for m in model.modules() if isinstance(m, SVFTLinear)]
