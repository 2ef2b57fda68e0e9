"""One experiment end to end: load a task's pre-trained model and data, score it, apply a method, train with the
shared loop, score again, and write ``adapter/`` (or ``model/``) plus ``result.json`` atomically."""

from __future__ import annotations

import hashlib
import json
import warnings
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from accelerate.utils import gather_object
from safetensors import SafetensorError

from ..errors import SVFitUserError
from ..methods import MethodOptions, get_method
from ..tasks import get_task
from ..validation import check_choice, check_number, check_optimizer
from .loop import OptimConfig, fit, make_accelerator
from .results import RESULT_FILE, check_writable, meta_info, now_iso, peak_memory, read_result, staged_directory, write_json


@dataclass
class RunConfig:
    task: str = "sentiment"
    method: str = "svfit"
    model: Optional[str] = None  # a local dir or hub id replacing the task's bundled pre-trained model
    out: Path = Path("runs/sentiment-svfit")
    seed: int = 0
    epochs: Optional[float] = None  # None: the task's default
    lr: Optional[float] = None
    head_lr: Optional[float] = None
    batch_size: Optional[int] = None
    train_limit: Optional[int] = None
    eval_limit: Optional[int] = None
    weight_decay: float = 0.0
    validation: bool = False  # score on a split of the training data (for tuning) instead of the test split
    eval_every: Optional[int] = None  # also score a validation split every N steps (learning curves)
    curve_examples: int = 200  # size of that validation split (carved from the training data, never trained on)
    steps: Optional[int] = None  # optimizer steps (replaces epochs; the data repeats as needed)
    split_seed: Optional[int] = None  # seed of the train/test split; None: `seed` (a fixed one keeps the test set)
    bucket_by_length: bool = False  # batch examples of similar length together (text tasks: less padding)
    head_init: Optional[str] = None  # a probe's head.safetensors to start the new head from (LP-FT)
    score_before: bool = True  # also score the evaluation split before training
    image_size: Optional[int] = None  # image tasks: input side in pixels; None: the task's default
    options: MethodOptions = field(default_factory=MethodOptions)
    overwrite: bool = False
    progress: bool = True  # progress bars (for a terminal)
    progress_lines: bool = False  # a plain line per logging interval instead (for logs and pipes)

    def resolved(self) -> "RunConfig":
        """Fill every None with the task's default, so result.json records the values actually used."""
        task = get_task(self.task, self.model)
        get_method(self.method)  # fail early on a bad name
        d = task.defaults
        return RunConfig(
            task=self.task,
            method=self.method,
            model=self.model,
            out=Path(self.out),
            seed=self.seed,
            epochs=d.epochs if self.epochs is None else self.epochs,
            lr=d.lr[self.method] if self.lr is None else self.lr,
            head_lr=d.head_lr if self.head_lr is None else self.head_lr,
            batch_size=d.batch_size if self.batch_size is None else self.batch_size,
            train_limit=d.train_limit if self.train_limit is None else self.train_limit,
            eval_limit=d.eval_limit if self.eval_limit is None else self.eval_limit,
            weight_decay=self.weight_decay,
            validation=self.validation,
            eval_every=self.eval_every,
            curve_examples=self.curve_examples,
            steps=self.steps,
            split_seed=self.split_seed,
            bucket_by_length=self.bucket_by_length,
            head_init=None if self.head_init is None else str(self.head_init),
            score_before=self.score_before,
            image_size=self.image_size,
            options=self.options,
            overwrite=self.overwrite,
            progress=self.progress,
            progress_lines=self.progress_lines,
        )

    @property
    def data_seed(self) -> int:
        return self.seed if self.split_seed is None else self.split_seed

    def to_json(self) -> dict:
        d = asdict(self)
        d["out"] = str(self.out)
        d.pop("progress")
        d.pop("progress_lines")
        d.pop("overwrite")
        return d


def check_settings(config: RunConfig) -> None:
    """Every setting that can be judged without the model or the data, so that a bad one fails at once with one
    line naming its flag (not minutes later, or as a "diverged" run that blames another flag)."""
    check_optimizer(config.lr, config.weight_decay, head_lr=config.head_lr, epochs=config.epochs)
    check_number("--batch-size", config.batch_size, minimum=1)
    if config.method == "svfit":
        from ..core.parametrization import PARAMETRIZATIONS
        from ..core.spectrum import INFORMATION_MEASURES

        options = config.options
        check_choice("--parametrization", options.parametrization, PARAMETRIZATIONS)
        check_choice("--information", options.information, INFORMATION_MEASURES)
        if not 0.0 < options.threshold <= 1.0:  # NaN included
            raise SVFitUserError(
                f"--threshold must lie in (0, 1], got {options.threshold} (0.99 keeps 99% of the spectrum)"
            )
    _check_parametrization_settings(config)


def _check_parametrization_settings(config: RunConfig) -> None:
    """The tuned defaults assume SVFit's default delta parametrization; the others need the user's own settings."""
    p = config.options.parametrization
    if config.method != "svfit" or p == "delta":
        return
    if config.lr is None:
        raise SVFitUserError(
            f"the default learning rates are tuned for parametrization 'delta'; with '{p}' pass --lr explicitly "
            "(SVFIT.md's priors: a relative step, e.g. 1e-2, for 'scale')"
        )
    if config.weight_decay > 0:
        raise SVFitUserError(
            f"--weight-decay with parametrization '{p}' would pull the singular values towards zero rather than "
            "towards the pre-trained model: use parametrization 'delta' or --weight-decay 0"
        )


def train_run(config: RunConfig, echo: Callable[[str], None] = print) -> Optional[dict]:
    """Train, score and save one run. Under `accelerate launch` / `torchrun` every process trains its shard of each
    batch; the main process alone scores and writes (the others return None)."""
    started = time.perf_counter()
    get_task(config.task, config.model)  # unknown names first
    get_method(config.method)
    check_settings(config)
    cfg = config.resolved()
    check_writable(cfg.out, cfg.overwrite)
    accelerator = make_accelerator()
    main = accelerator.is_main_process
    if cfg.batch_size % accelerator.num_processes:
        raise SVFitUserError(
            f"--batch-size {cfg.batch_size} does not split over {accelerator.num_processes} processes: each batch is "
            "shared out between them, so pass a multiple of the process count"
        )
    if not main:
        echo = _silent
        cfg.progress = False
    task, method = get_task(cfg.task, cfg.model), get_method(cfg.method)

    if cfg.steps is not None and cfg.steps < 1:
        raise SVFitUserError(f"--steps must be >= 1, got {cfg.steps}")

    echo(f"task {task.name}: {cfg.model or task.model_name} on {task.dataset_name}")
    torch.manual_seed(cfg.seed)  # the new head's init
    model = task.load_model()
    if cfg.head_init is not None:
        from .probe import load_head

        load_head(model, task, cfg.head_init)  # LP-FT: every method starts from the same probe head
    train_set, curve_set, eval_set = data_splits(task, cfg)
    held_out = "validation (from the training data)" if cfg.validation else "held-out test"
    echo(f"data: {len(train_set)} train / {len(eval_set)} {held_out} examples (seed {cfg.seed}, split {cfg.data_seed})")

    # Applied before the first evaluation so that a bad target list fails at once; every method starts from the
    # base model's function (SVFit exactly), so this is the pre-trained model's score.
    model = method.apply(model, task, cfg.options)
    # every process scores (in parallel), so that none idles in a collective long enough to time out
    before = None
    if cfg.score_before:
        before = task.evaluate(model, eval_set, task.defaults.eval_batch_size, progress=cfg.progress)
        echo(f"before fine-tuning: accuracy {before['accuracy']:.4f}  loss {before['loss']:.4f}")
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    n_head = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and task.is_head(n))
    echo(
        f"method {method.name}: {n_trainable:,} trainable parameters ({n_trainable - n_head:,} adapter + {n_head:,} "
        f"head) of {n_total:,}; lr {cfg.lr:g}, head lr {cfg.head_lr:g}"
    )
    optim = OptimConfig(lr=cfg.lr, head_lr=cfg.head_lr, weight_decay=cfg.weight_decay)
    log = fit(
        model,
        train_set,
        task.collate,
        task.loss,
        optim,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        is_head=task.is_head,
        progress=cfg.progress,
        count_tokens=task.count_tokens,
        on_train_start=task.on_train_start,
        accelerator=accelerator,
        evaluate=(lambda m: task.evaluate(m, curve_set, task.defaults.eval_batch_size)) if curve_set else None,
        eval_every=cfg.eval_every,
        max_steps=cfg.steps,
        lengths=[task.example_length(e) for e in train_set] if cfg.bucket_by_length else None,
        report=echo if cfg.progress_lines else None,
    )
    # Data-parallel replicas must end identical; record each process's checksum of the trained parameters.
    checksums = gather_object([_trained_checksum(model)])
    if not main:
        return None  # the last collective: the main process alone scores and writes, and nobody waits for it
    if len(set(checksums)) > 1:
        warnings.warn(f"data-parallel processes ended with different trained parameters: {checksums}", stacklevel=2)
    log.distributed = {"num_processes": accelerator.num_processes, "trained_checksums": checksums}
    eval_start = time.perf_counter()
    after = task.evaluate(model, eval_set, task.defaults.eval_batch_size, progress=cfg.progress)
    eval_time = time.perf_counter() - eval_start
    echo(f"after fine-tuning:  accuracy {after['accuracy']:.4f}  loss {after['loss']:.4f}  ({log.train_time:.0f} s training)")
    doubts = doubtful_outcome(model, before, after, cfg.lr)
    for line in doubts:
        echo(f"warning: {line}")

    with staged_directory(cfg.out) as stage:
        weights = method.save(model, stage)
        result = _result(cfg, task, model, log, before, after, eval_time, weights, n_trainable, n_head, n_total, started)
        result["train_info"]["warnings"] = doubts
        write_json(stage / RESULT_FILE, result)
    echo(f"saved {cfg.out}/ ({weights.relative_to(stage)}: {result['train_info']['file_size']:,} bytes)")
    return result


def doubtful_outcome(model: torch.nn.Module, before: dict, after: dict, lr: float) -> list[str]:
    """One line per sign that training went wrong, for the user to see before trusting the run: kept singular
    values pushed through zero (an SVFit step far larger than the spectrum), or a held-out loss that ended above the
    pre-trained model's."""
    from ..core.parametrization import adapted_singular_values
    from ..tuner.layer import SVFitLayer

    lines = []
    flipped = kept = 0
    worst = 0.0
    for layer in model.modules():
        if not isinstance(layer, SVFitLayer):
            continue
        for name, vector in layer.svfit_vector.items():
            sigma = layer.svfit_sigma[name].float()
            new = adapted_singular_values(vector.detach().float(), sigma, layer.svfit_parametrization[name],
                                          layer.svfit_nonneg[name]).to(sigma.device)
            positive = sigma > 0
            flipped += int((new[positive] < 0).sum())
            kept += int(sigma.numel())
            if bool(positive.any()):
                worst = max(worst, float(((new - sigma).abs()[positive] / sigma[positive]).max()))
    if flipped:
        lines.append(
            f"{flipped:,} of {kept:,} kept singular values changed sign during training (the largest moved by "
            f"{100 * worst:,.0f}% of its pre-trained value): --lr {lr:g} is probably too high for this run"
        )
    if before is not None and after["loss"] > before["loss"]:  # unknown when the run skipped the score before
        lines.append(
            f"the held-out loss ended above where it started ({before['loss']:.4f} -> {after['loss']:.4f}): the "
            f"run did not fit; try a lower --lr (now {lr:g}) or more data / epochs"
        )
    return lines


def _silent(*_args, **_kwargs) -> None:
    pass


def _trained_checksum(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if p.requires_grad:
            digest.update(name.encode())
            digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def data_splits(task, cfg: RunConfig) -> tuple[list, Optional[list], list]:
    """(train, validation split for curves or None, evaluation split) of a resolved config, prepared for batching
    (e.g. tokenised once). The validation split is the last ``curve_examples`` of the training data, never trained
    on; a tuning run (``validation``) evaluates on it."""
    if cfg.image_size is not None:
        if not hasattr(task, "image_size"):
            raise SVFitUserError(f"--image-size applies to image tasks; {task.name} is not one")
        if cfg.image_size < 14:
            raise SVFitUserError(f"--image-size must be at least 14 pixels, got {cfg.image_size}")
        task.image_size = cfg.image_size
    curves = cfg.eval_every is not None
    if curves and (cfg.eval_every < 1 or cfg.curve_examples < 1):
        raise SVFitUserError("--eval-every and the validation split size must be >= 1")
    curve_set = None
    if curves and not cfg.validation:
        # the curve split is the last examples of the training data, and training uses the rest: the same prefix
        # as without curves whenever --train-limit leaves room for them
        train_all, eval_set = task.load_data(cfg.data_seed, None, cfg.eval_limit)
        train_set, curve_set = _hold_out(train_all, cfg.curve_examples, cfg.train_limit, "the --eval-every split")
    else:
        train_set, eval_set = load_split(task, cfg.data_seed, cfg.train_limit, cfg.eval_limit, cfg.validation)
        if curves:
            curve_set = eval_set  # a tuning run already holds a validation split out
    if not train_set or not eval_set:
        raise SVFitUserError("the train or evaluation split is empty: raise --train-limit / --eval-limit")
    prepared = {id(part): task.prepare(part) for part in (train_set, curve_set, eval_set) if part is not None}
    return (prepared[id(train_set)], prepared[id(curve_set)] if curve_set is not None else None,
            prepared[id(eval_set)])


def load_split(task, seed: int, train_limit, eval_limit, validation: bool):
    """(train, evaluation) examples. With ``validation`` the evaluation examples are the last ones of the
    training data (never the test split), so that hyper-parameters can be tuned without touching the test set."""
    if not validation:
        return task.load_data(seed, train_limit, eval_limit)
    train, _ = task.load_data(seed, None, None)
    n_val = eval_limit if eval_limit is not None else max(1, len(train) // 5)
    return _hold_out(train, n_val, train_limit, f"--eval-limit {n_val}")


def _hold_out(train: list, n_val: int, train_limit, what: str) -> tuple[list, list]:
    """(the first ``train_limit`` of all but the last ``n_val`` examples, the last ``n_val``): disjoint slices."""
    if n_val >= len(train):
        raise SVFitUserError(f"{what} leaves no training data for the validation split")
    return train[: len(train) - n_val][:train_limit], train[len(train) - n_val :]


def load_run(run_dir: Path):
    """(task, model ready for inference, result.json) of a finished run."""
    run_dir = Path(run_dir)
    result = read_result(run_dir)
    tc = result["run_info"]["train_config"]
    task, method = get_task(tc["task"], tc.get("model")), get_method(tc["method"])
    weights = method.weights_path(run_dir)
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing: the run directory is incomplete; re-run `svfit train`")
    check_adapter_config(weights)
    torch.manual_seed(tc["seed"])
    base = task.load_model()
    try:
        model = method.load(base, run_dir)
    except (SafetensorError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        # unreadable files; a readable SVFit adapter for another base raises BaseWeightMismatchError, which says so
        raise ValueError(f"cannot load {weights}: {exc}. The file is corrupt; re-run `svfit train`") from exc
    except RuntimeError as exc:  # e.g. tensor shapes that fit no layer of this model
        raise ValueError(
            f"cannot load {weights}: {exc}. The file is corrupt or from another model; re-run `svfit train`"
        ) from exc
    return task, model, result


def check_adapter_config(weights: Path) -> None:
    """An adapter's config must parse before the base model loads; a broken one is named as such (PEFT's own error
    would be taken for a broken weights file)."""
    config = weights.with_name("adapter_config.json")
    if weights.name != "adapter_model.safetensors":  # full fine-tuning: no adapter config
        return
    try:
        json.loads(config.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{config} is missing: the run directory is incomplete; re-run `svfit train`") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot load {config}: the file is corrupt ({exc}); re-run `svfit train`") from None


def eval_run(run_dir: Path, progress: bool = True) -> tuple[dict, dict]:
    """Re-score a saved run on its own held-out split; returns (fresh metrics, recorded metrics)."""
    task, model, result = load_run(run_dir)
    tc = result["run_info"]["train_config"]
    if tc.get("image_size") is not None:
        task.image_size = tc["image_size"]
    split_seed = tc["seed"] if tc.get("split_seed") is None else tc["split_seed"]
    _, eval_set = load_split(task, split_seed, tc["train_limit"], tc["eval_limit"], tc.get("validation", False))
    metrics = task.evaluate(model, eval_set, task.defaults.eval_batch_size, progress=progress)
    return metrics, result["train_info"]["metrics"][-1]


def _result(cfg, task, model, log, before, after, eval_time, weights, n_trainable, n_head, n_total, started) -> dict:
    peft_config = None
    if hasattr(model, "peft_config"):
        peft_config = model.peft_config["default"].to_dict()
    split = "valid" if cfg.validation else "test"  # a tuning run must not look like a test score
    final = {
        "step": log.steps,
        f"{split} accuracy": after["accuracy"],
        f"{split} loss": after["loss"],
        f"{split} examples": after["examples"],
        "accuracy before": before["accuracy"] if before else None,
        "loss before": before["loss"] if before else None,
        "train loss": log.final_loss,
        "train samples": log.examples,
        "eval time": eval_time,
    }
    if log.tokens:
        final["train total tokens"] = log.tokens
    svfit_summary = None
    if hasattr(model, "svfit_summary"):
        svfit_summary = [row.to_json() for row in model.svfit_summary()]
    return {
        "run_info": {
            "created_at": now_iso(),
            "total_time": time.perf_counter() - started,
            "experiment_name": f"{cfg.method}/{cfg.task}",
            "train_config": cfg.to_json(),
            "peft_config": peft_config,
            "error_msg": "",
        },
        "train_info": {
            **{f"{k}": v for k, v in peak_memory().items()},
            "train_time": log.train_time,
            "file_size": weights.stat().st_size,
            "num_trainable_params": n_trainable,
            "num_head_params": n_head,  # new task heads; the rest of the trainable count is the adapter
            "num_total_params": n_total,
            "status": "success",
            "metrics": [*log.curve, final],
            "svfit_ranks": svfit_summary,
            "eval curve": log.eval_curve,
            # 1/0 per evaluation example, in the split's order: paired tests (McNemar) between runs on one split
            f"{split} correct": "".join(str(c) for c in after["correct"]),
            "distributed": log.distributed,
        },
        "meta_info": meta_info(cfg.model or task.model_name, task.dataset_name),
    }
