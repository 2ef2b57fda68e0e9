"""Linear probes on frozen features: the floor every fine-tuning method must beat, and the head that LP-FT starts
every method from (linear probing, then fine-tuning: Kumar et al., 2022).

The probe is a multinomial logistic regression on standardised features, fitted to convergence with full-batch
L-BFGS; its L2 strength is chosen on the validation split. The standardisation is folded back into the weights, so
the result is a plain ``nn.Linear`` over the raw features, which is exactly what the task's new head computes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import SVFitUserError

L2_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)  # penalty per unit of ||W||^2 on standardised features (mean loss)
HEAD_FILE = "head.safetensors"
PROBE_FILE = "probe.json"


@dataclass
class Probe:
    features: str  # which features (the task's name for them)
    l2: float
    weight: torch.Tensor  # (classes, dim) over the raw features
    bias: torch.Tensor
    valid_accuracy: float
    test_accuracy: float
    test_correct: list[int]
    valid_by_l2: dict[float, float]


@torch.no_grad()
def extract(task, model, examples: list, batch_size: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The task's probe features of ``examples`` (model in eval mode) and their labels."""
    model.eval()
    device = next(model.parameters()).device
    order = task.eval_order(examples)
    chunks: dict[str, list] = {}
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                 for k, v in task.collate([examples[i] for i in idx]).items()}
        for name, f in task.probe_features(model, batch).items():
            chunks.setdefault(name, []).append(f.float().cpu())
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    feats = {name: torch.cat(parts)[inverse] for name, parts in chunks.items()}  # back in the examples' order
    return feats, torch.tensor([label for _, label in examples])


def fit_logistic(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight (classes, dim), bias) minimising mean cross-entropy + l2 * ||W_std||^2, W_std acting on standardised
    features; returned folded back to act on the raw features."""
    x = x.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-8)
    z = (x - mean) / std
    w = torch.zeros(z.shape[1], classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=1000, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w, b = w.detach(), b.detach()
    weight = (w / std[:, None]).T
    bias = b - (mean / std) @ w
    return weight.float().contiguous(), bias.float().contiguous()


def _scores(weight, bias, x, y) -> tuple[float, list[int]]:
    hits = ((x @ weight.T + bias).argmax(-1) == y).long().tolist()
    return sum(hits) / max(len(hits), 1), hits


def linear_probes(task, model, train: list, valid: list, test: list, batch_size: int,
                  l2_grid=L2_GRID, echo: Callable[[str], None] = print) -> list[Probe]:
    """One probe per kind of feature the task offers (the first is the new head's input), L2 chosen on ``valid``."""
    if not valid:
        raise SVFitUserError("a linear probe needs a validation split to choose its L2 strength")
    started = time.perf_counter()
    f_train, y_train = extract(task, model, train, batch_size)
    f_valid, y_valid = extract(task, model, valid, batch_size)
    f_test, y_test = extract(task, model, test, batch_size)
    echo(f"probe features of {len(train)} + {len(valid)} + {len(test)} examples: {time.perf_counter() - started:.0f} s")
    classes = len(task.labels)
    probes = []
    for name in f_train:
        fits = {l2: fit_logistic(f_train[name], y_train, classes, l2) for l2 in l2_grid}
        valid_by_l2 = {l2: _scores(*fits[l2], f_valid[name], y_valid)[0] for l2 in l2_grid}
        best = max(l2_grid, key=lambda l2: (valid_by_l2[l2], l2))  # ties: the stronger penalty
        test_acc, hits = _scores(*fits[best], f_test[name], y_test)
        probes.append(Probe(name, best, *fits[best], valid_by_l2[best], test_acc, hits, valid_by_l2))
        echo(f"probe on {name}: L2 {best:g}, validation accuracy {valid_by_l2[best]:.4f}, test accuracy {test_acc:.4f}")
    return probes


def save_head(probe: Probe, path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"weight": probe.weight, "bias": probe.bias}, str(path),
              metadata={"features": probe.features, "l2": repr(probe.l2)})


def load_head(model, task, path) -> None:
    """Copy a saved probe into the task's new head of a freshly loaded model (before a method wraps it), and switch
    off the dropout on the head's input: the probe was fitted to whole feature vectors, and features with a large
    mean and a small spread (MiniLM's pooler output: weight norm ~540) turn dropped entries into huge logit shifts
    (measured: training loss 5.4 against 0.50 in eval mode on the same MiniLM batch; 0.69 without that dropout)."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (OSError, ValueError) as exc:
        raise SVFitUserError(f"cannot read the head init {path}: {exc}") from None
    try:
        head = task.head_linear(model)
    except NotImplementedError as exc:
        raise SVFitUserError(f"--head-init: {exc}") from None
    if tuple(tensors["weight"].shape) != tuple(head.weight.shape):
        raise SVFitUserError(f"--head-init {path}: weight {tuple(tensors['weight'].shape)} does not fit the head "
                             f"{tuple(head.weight.shape)}")
    with torch.no_grad():
        head.weight.copy_(tensors["weight"])
        head.bias.copy_(tensors["bias"])
    dropout = task.head_dropout(model)
    if dropout is not None:
        dropout.p = 0.0


def probe_run(config, echo: Callable[[str], None] = print) -> dict:
    """`svfit probe`: fit the task's linear probes on the training split of ``config`` (a RunConfig; its
    ``curve_examples`` validation split chooses the L2 strength), score them on its evaluation split, and write
    ``probe.json`` and ``head.safetensors`` (the first probe: the new head's input, for ``--head-init``)."""
    from .results import check_writable, meta_info, now_iso, staged_directory, write_json
    from .run import data_splits
    from ..tasks import get_task

    started = time.perf_counter()
    cfg = config.resolved()
    cfg.validation = False
    if cfg.eval_every is None:  # the splits come with the validation split only when curves are on
        cfg.eval_every = 1
    check_writable(cfg.out, cfg.overwrite)
    task = get_task(cfg.task, cfg.model)
    torch.manual_seed(cfg.seed)
    model = task.load_model()
    train, valid, test = data_splits(task, cfg)
    split = "test"
    probes = linear_probes(task, model, train, valid, test, task.defaults.eval_batch_size, echo=echo)
    rows = [{"features": p.features, "l2": p.l2, "valid accuracy": p.valid_accuracy, f"{split} accuracy": p.test_accuracy,
             f"{split} examples": len(test), "valid by l2": {repr(k): v for k, v in p.valid_by_l2.items()},
             f"{split} correct": "".join(map(str, p.test_correct)), "feature dim": int(p.weight.shape[1])}
            for p in probes]
    config_json = cfg.to_json()
    for key in ("method", "epochs", "lr", "head_lr", "batch_size", "weight_decay", "steps", "bucket_by_length",
                "head_init", "score_before", "options", "eval_every"):
        config_json.pop(key, None)
    result = {
        "run_info": {"created_at": now_iso(), "total_time": time.perf_counter() - started,
                     "experiment_name": f"probe/{cfg.task}", "train_config": config_json, "error_msg": ""},
        "train_info": {"status": "success", "probes": rows, "train examples": len(train),
                       "valid examples": len(valid)},
        "meta_info": meta_info(cfg.model or task.model_name, task.dataset_name),
    }
    with staged_directory(cfg.out) as stage:
        try:
            task.head_linear(model)
            save_head(probes[0], stage / HEAD_FILE)
        except NotImplementedError:
            pass  # no new head (e.g. the LM task): the probe is only the floor
        write_json(stage / PROBE_FILE, result)
    echo(f"saved {cfg.out}/")
    return result
