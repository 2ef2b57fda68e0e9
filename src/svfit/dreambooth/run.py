"""`svfit dreambooth`: one DreamBooth run from a local pipeline directory to an output directory.

OUT/ gets, atomically (built in a sibling temp dir, moved into place when complete):

* ``unet_adapter/`` (PEFT format; svfit or lora), or ``unet/`` for ``--method full``;
  ``text_encoder_adapter/`` / ``text_encoder/`` with ``--train-text-encoder``;
* ``samples.png``: the instance images, then samples for the instance prompt before and after fine-tuning from the
  same starting noise, then (with prior preservation) the class prompt before and after;
* ``result.json``: the configuration, loss curve, trainable parameters, file sizes and timings.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from ..errors import SVFitUserError
from .pipeline import TextToImage, load_pipeline
from .sampling import sample, save_grid
from .train import (DreamBoothConfig, check_numbers, config_dict, finetune, load_instance_images, sample_with,
                    save_trained)

RESULT_FILE = "result.json"
GRID_FILE = "samples.png"
DEMO_JUDGED_SAMPLES = 64  # subject samples the demo's fidelity is measured on (binomial s.e. <= 0.06), as the benchmark


@dataclass
class RunOptions:
    model: Optional[Path]  # None: the bundled Fashion-MNIST demo pipeline
    instance_dir: Optional[Path]  # None with the demo: 8 ankle boots from Fashion-MNIST
    out: Path
    num_samples: int = 8
    overwrite: bool = False
    progress: bool = False  # a progress bar (for a terminal)
    progress_lines: bool = False  # a plain line every 50 steps instead (for logs and pipes)
    device: Optional[str] = None


def resolve_inputs(opts: RunOptions, cfg_kwargs: dict) -> tuple[TextToImage, torch.Tensor, dict]:
    """Load the pipeline and the instance images; fill the demo's prompts when --model is omitted."""
    if opts.model is None:
        from . import demo

        pipe = demo.load_demo_pipeline(device=opts.device)
        cfg_kwargs.setdefault("instance_prompt", demo.SUBJECT_PROMPT)
        cfg_kwargs.setdefault("class_prompt", demo.CLASS_PROMPT)
        cfg_kwargs.setdefault("guidance", demo.GUIDANCE)
        if opts.instance_dir is None:
            images = demo.subject_images(8) * 2 - 1
        else:
            images = load_instance_images(opts.instance_dir, pipe.image_channels, pipe.resolution)
        return pipe, images, cfg_kwargs
    if opts.instance_dir is None:
        raise SVFitUserError("--instance-dir is required with --model (a folder of 3-10 photos of the subject)")
    if cfg_kwargs.get("instance_prompt") is None:
        raise SVFitUserError("--instance-prompt is required with --model, e.g. 'a photo of sks dog'")
    from .pipeline import check_pipeline_dir

    check_pipeline_dir(opts.model)
    if not Path(opts.instance_dir).is_dir():  # before loading the model: fail fast
        raise SVFitUserError(f"--instance-dir {opts.instance_dir} is not a directory of images")
    pipe = load_pipeline(opts.model, device=opts.device)
    images = load_instance_images(opts.instance_dir, pipe.image_channels, pipe.resolution)
    return pipe, images, cfg_kwargs


def _judge_demo(before: torch.Tensor, after: torch.Tensor, instance_images: torch.Tensor) -> dict:
    """The benchmark's subject measures (svfit.dreambooth.demo.evaluate) on the demo's samples: the share the
    10-class judge calls an ankle boot, and the mean RMS distance (in [0, 1]) to the nearest instance photo."""
    from . import demo
    from .demo.evaluate import nearest_distance

    judge = demo.load_classifier()
    instances = (instance_images.cpu() + 1) / 2

    def fidelity(images):
        return float((demo.classify(judge, images) == demo.HELD_OUT).float().mean())

    return {"samples": len(before), "fidelity_before": fidelity(before), "fidelity_after": fidelity(after),
            "nearest_instance_before": nearest_distance(before, instances),
            "nearest_instance_after": nearest_distance(after, instances)}


def run_dreambooth(opts: RunOptions, cfg_kwargs: dict, echo: Callable[[str], None] = print) -> dict:
    from ..train.results import check_writable, meta_info, now_iso, peak_memory, staged_directory, write_json

    cfg_kwargs = {k: v for k, v in cfg_kwargs.items() if v is not None}
    check_numbers(**{k: cfg_kwargs.get(k) for k in ("lr", "prior_weight", "guidance")})  # before loading anything
    check_writable(opts.out, opts.overwrite)
    if opts.num_samples < 1:
        raise SVFitUserError(f"--num-samples must be >= 1, got {opts.num_samples}")
    t_start = time.perf_counter()
    pipe, instance_images, cfg_kwargs = resolve_inputs(opts, cfg_kwargs)
    cfg = DreamBoothConfig(**cfg_kwargs)
    echo(f"{pipe.source}: {len(instance_images)} instance images at {pipe.resolution}px, method {cfg.method}, "
         f"targets {','.join(cfg.all_targets)}{' + text encoder' if cfg.train_text_encoder else ''}, "
         f"{cfg.steps} steps, lr {cfg.learning_rate:g}, device {pipe.device}")
    n = opts.num_samples
    # the demo's own subject has a judge: score more samples than the grid shows (image i's noise depends only on
    # the seed and i, so the grid's samples are the first n of them)
    judged = opts.model is None and opts.instance_dir is None
    n_subject = max(n, DEMO_JUDGED_SAMPLES) if judged else n
    before_all = sample(pipe, [cfg.instance_prompt] * n_subject, steps=cfg.sample_steps, guidance=cfg.guidance,
                        seed=cfg.seed)
    before = before_all[:n]
    class_before = None
    if cfg.class_prompt is not None:
        class_before = sample(pipe, [cfg.class_prompt] * n, steps=cfg.sample_steps, guidance=cfg.guidance,
                              seed=cfg.seed + 1)
    result = finetune(pipe, instance_images, cfg, log=echo, progress=opts.progress,
                      report_every=50 if opts.progress_lines else 0)
    k = max(1, len(result.losses) // 4)
    # the denoising loss follows the noise levels each step draws far more than the subject being learnt (on the
    # demo its last quarter can be above its first while the fidelity rises): say so rather than let it mislead
    echo(f"trained {result.trainable:,} parameters in {result.train_time:.1f}s; mean denoising loss "
         f"{sum(result.losses[:k]) / k:.4f} (first {k} steps) -> {sum(result.losses[-k:]) / k:.4f} (last {k}), which "
         f"mostly reflects the noise levels drawn: judge by the samples")
    after_all = sample_with(pipe, result, [cfg.instance_prompt] * n_subject, cfg, seed=cfg.seed)
    after = after_all[:n]
    demo_metrics = None
    if judged:
        demo_metrics = _judge_demo(before_all, after_all, instance_images)
        echo(f"subject fidelity (share of {n_subject} samples for {cfg.instance_prompt!r} that the demo's classifier "
             f"calls an ankle boot): {demo_metrics['fidelity_before']:.2f} before -> "
             f"{demo_metrics['fidelity_after']:.2f} after; distance to the nearest instance photo "
             f"{demo_metrics['nearest_instance_before']:.3f} -> {demo_metrics['nearest_instance_after']:.3f}")
    rows = [(instance_images[:n] + 1) / 2, before, after]
    labels = ["instance images", f"before: {cfg.instance_prompt}", f"after: {cfg.instance_prompt}"]
    if cfg.class_prompt is not None:
        class_after = sample_with(pipe, result, [cfg.class_prompt] * n, cfg, seed=cfg.seed + 1)
        rows += [class_before, class_after]
        labels += [f"before: {cfg.class_prompt}", f"after: {cfg.class_prompt}"]
    with staged_directory(opts.out) as stage:
        sizes = save_trained(result, cfg, stage)
        save_grid([r.cpu() for r in rows], stage / GRID_FILE, labels=labels)
        total = sum(p.numel() for p in pipe.unet.parameters()) + sum(p.numel() for p in pipe.text_encoder.parameters())
        record = {
            "run_info": {"created_at": now_iso(), "command": "dreambooth", "model": pipe.source,
                         "instance_dir": str(opts.instance_dir) if opts.instance_dir else "(demo: Fashion-MNIST ankle boots)",
                         "instance_images": len(instance_images), "dreambooth_config": config_dict(cfg)},
            "train_info": {"status": "success", "num_trainable_params": result.trainable,
                           "num_total_params": total, "file_sizes": sizes, "file_size": sum(sizes.values()),
                           "train_time": result.train_time, "class_images_time": result.class_images_time,
                           "total_time": time.perf_counter() - t_start, "losses": result.losses, **peak_memory(),
                           **({"demo_metrics": demo_metrics} if demo_metrics else {})},
            "meta_info": meta_info(pipe.source, opts.instance_dir and str(opts.instance_dir) or "fashion-mnist"),
        }
        write_json(stage / RESULT_FILE, record)
    echo(f"adapter: {opts.out / next(iter(sizes))} ({sum(sizes.values()):,} bytes)")
    echo(f"samples: {opts.out / GRID_FILE}")
    return record
