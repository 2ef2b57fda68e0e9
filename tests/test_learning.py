"""SVFit learns: on every compute path and layer type, a student recovers a teacher whose weight differs from the
base only in its singular values, W* = U diag(sigma*) V^T, to a stated tolerance within a few hundred steps, at a
LoRA-style learning rate (the default ``scaling`` makes one work)."""

import pytest
import torch
from peft import get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

import svfit
from svfit.tuner import SVFitLayer

TOLERANCE = 0.05  # ||W_student - W*|| / ||W* - W0|| after training
STEPS = 150
LR = 1e-4


def _base(kind):
    torch.manual_seed(0)
    return {
        "linear": lambda: nn.Sequential(nn.Linear(32, 24)),
        "conv1d": lambda: nn.Sequential(Conv1D(24, 32)),  # GPT-2's layer: weight stored (in, out)
        "conv2d": lambda: nn.Sequential(nn.Conv2d(6, 8, 3, padding=1)),
        "embedding": lambda: nn.Sequential(nn.Embedding(40, 16)),
    }[kind]()


def _inputs(kind, g):
    if kind == "conv2d":
        return torch.randn(16, 6, 8, 8, generator=g)
    if kind == "embedding":
        return torch.randint(0, 40, (64,), generator=g)
    return torch.randn(64, 32, generator=g)


CASES = [("linear", p) for p in ("auto", "reference", "merged", "input", "output")] + [
    ("conv1d", p) for p in ("auto", "reference", "merged", "input", "output")
] + [("conv2d", "auto"), ("conv2d", "reference"), ("conv2d", "merged"), ("embedding", "auto")]


@pytest.mark.parametrize("kind,path", CASES)
def test_svfit_recovers_a_spectrum_teacher(kind, path):
    model = get_peft_model(_base(kind), svfit.SVFitConfig(target_modules=["0"], r="full", compute_path=path,
                                                          bases="both" if path in ("input", "output") else "auto"))
    layer = next(m for m in model.modules() if isinstance(m, SVFitLayer))
    W0 = layer._weight_matrix().detach().clone()
    U, V = (t.detach() for t in layer.dense_bases("default"))
    sigma = layer.svfit_sigma["default"]
    g = torch.Generator().manual_seed(1)
    sigma_star = sigma * (1 + 0.3 * torch.randn(sigma.shape, generator=g)).clamp(min=0.2)
    target = (U * sigma_star) @ V.T  # the teacher's weight as a (d_out, d_in) matrix
    teacher = _base(kind)
    with torch.no_grad():
        teacher[0].weight.copy_(layer._to_weight_layout(target))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=LR)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / STEPS)
    for _ in range(STEPS):
        x = _inputs(kind, g)
        loss = (model(x) - teacher(x).detach()).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    if path != "auto":
        assert layer.compute_path_for(_inputs(kind, g))[0] == path  # the path under test is the one that trained
    learned = W0 + layer._delta_matrix("default").detach()
    assert (learned - target).norm() <= TOLERANCE * (target - W0).norm()
