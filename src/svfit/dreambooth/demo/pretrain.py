"""Pre-train the embedded DreamBooth demo, once: the script that made the committed weights in ``weights/``.

    python -m svfit.dreambooth.demo.pretrain                 # writes src/svfit/dreambooth/demo/weights/
    python -m svfit.dreambooth.demo.pretrain --out /tmp/w --steps 50 --classifier-steps 20   # a smoke run

The committed weights took 34 min on this project's 2-core CPU machine (28 min of it the diffusion model) while other
jobs shared the cores; about 15 min when it has the machine to itself. What it trains (seed 0, fixed data order; on CPU the run is reproducible up to thread-count round-off):

1. A class-conditional text-to-image diffusion model on Fashion-MNIST's train split *without* the ankle boots
   (54,000 images, 28x28 grey, pixels scaled to [-1, 1]): a diffusers ``UNet2DConditionModel`` (channels
   16/32/64, cross-attention at 7x7) and a 2-layer ``CLIPTextModel`` trained jointly from scratch on captions
   "a photo of a <word>" (sandals and sneakers are captioned "shoe" half of the time; 10 % of captions are empty,
   for classifier-free guidance), epsilon prediction under a cosine ``DDPMScheduler`` with 1000 steps, AdamW with
   warm-up and cosine decay, and an exponential moving average of the weights (what is saved).
2. The judge: a small CNN on all ten classes (the full train split), scored on the test split.

The pipeline directory has the standard diffusers layout, so ``svfit dreambooth --model weights/`` loads it like
any local Stable Diffusion directory.
"""

from __future__ import annotations

import argparse
import os
import sys
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import (CLASS_WORDS, CLASSIFIER_FILE, HELD_OUT, SHOE_CLASSES, WEIGHTS, Classifier, build_tokenizer, classify,
               text_config, to_unit, unet_config)


def captions(labels: np.ndarray, rng: np.random.Generator, drop: float = 0.1) -> list[str]:
    out = []
    for y in labels:
        word = CLASS_WORDS[int(y)]
        if int(y) in SHOE_CLASSES and rng.random() < 0.5:
            word = "shoe"
        out.append("" if rng.random() < drop else f"a photo of a {word}")
    return out


def train_diffusion(x: np.ndarray, y: np.ndarray, steps: int, batch_size: int, lr: float, seed: int, log) -> dict:
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    unet = UNet2DConditionModel(**unet_config())
    text_encoder = CLIPTextModel(text_config())
    tokenizer = build_tokenizer()
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon")
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))) )
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    pixels = torch.from_numpy(x.astype(np.float32) / 127.5 - 1.0)[:, None]
    losses, t0 = [], time.perf_counter()
    order = rng.permutation(len(x))
    pos = 0
    for step in range(steps):
        if pos + batch_size > len(order):
            order, pos = rng.permutation(len(x)), 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        ids = tokenizer(captions(y[idx], rng), padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        clean = pixels[idx]
        noise = torch.randn_like(clean)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),))
        pred = unet(scheduler.add_noise(clean, noise, t), t, encoder_hidden_states=text_encoder(ids)[0]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lr_sched.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema, live in ((ema_unet, unet), (ema_text, text_encoder)):
                for pe, pl in zip(ema.parameters(), live.parameters()):
                    pe.lerp_(pl, 1 - decay)
        losses.append(float(loss))
        if (step + 1) % max(1, steps // 20) == 0 or step + 1 == steps:
            log(f"diffusion step {step + 1}/{steps}  loss {np.mean(losses[-100:]):.4f}  "
                f"{time.perf_counter() - t0:.0f}s")
    return {"unet": ema_unet.eval(), "text_encoder": ema_text.eval(), "tokenizer": tokenizer, "scheduler": scheduler,
            "losses": losses, "seconds": time.perf_counter() - t0}


def train_classifier(x, y, xt, yt, steps: int, batch_size: int, seed: int, log) -> tuple[Classifier, dict]:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed + 1)
    model = Classifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    images, labels = to_unit(x), torch.from_numpy(y)
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        idx = torch.from_numpy(rng.integers(0, len(x), batch_size))
        batch = images[idx]
        if rng.random() < 0.5:
            batch = batch.flip(-1)
        loss = F.cross_entropy(model(batch), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % max(1, steps // 5) == 0:
            log(f"classifier step {step + 1}/{steps}  loss {float(loss):.3f}")
    model.eval()
    pred = classify(model, to_unit(xt))
    acc = float((pred == torch.from_numpy(yt)).float().mean())
    per_class = [float((pred[yt == c] == c).float().mean()) for c in range(10)]
    log(f"classifier test accuracy {acc:.4f}")
    return model, {"test_accuracy": acc, "per_class_test_accuracy": per_class, "steps": steps,
                   "batch_size": batch_size, "seconds": time.perf_counter() - t0}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=WEIGHTS)
    parser.add_argument("--steps", type=int, default=2500)
    parser.add_argument("--batch-size", type=int, default=48)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--classifier-steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from safetensors.torch import save_file

    from ...assets.images import load_fashion_mnist
    from ...train.results import now_iso, package_info, staged_directory, system_info

    x, y = load_fashion_mnist("train")
    xt, yt = load_fashion_mnist("test")
    keep = y != HELD_OUT
    t_all = time.perf_counter()
    with staged_directory(args.out) as stage:
        clf, clf_info = train_classifier(x, y, xt, yt, args.classifier_steps, 128, args.seed, print)
        save_file({k: v.contiguous() for k, v in clf.state_dict().items()}, str(stage / CLASSIFIER_FILE))
        d = train_diffusion(x[keep], y[keep], args.steps, args.batch_size, args.lr, args.seed, print)
        d["unet"].save_pretrained(stage / "unet")
        d["text_encoder"].save_pretrained(stage / "text_encoder")
        d["tokenizer"].save_pretrained(stage / "tokenizer")
        d["scheduler"].save_pretrained(stage / "scheduler")
        losses = d["losses"]
        info = {
            "created_at": now_iso(),
            "script": "python -m svfit.dreambooth.demo.pretrain " + " ".join(sys.argv[1:] if argv is None else argv),
            "load_average_after": list(os.getloadavg()),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"},
            "held_out_class": "Ankle boot",
            "diffusion": {"train_images": int(keep.sum()), "steps": args.steps, "batch_size": args.batch_size,
                          "seconds": d["seconds"], "loss_first_100": float(np.mean(losses[:100])),
                          "loss_last_100": float(np.mean(losses[-100:])),
                          "unet_parameters": sum(p.numel() for p in d["unet"].parameters()),
                          "text_encoder_parameters": sum(p.numel() for p in d["text_encoder"].parameters())},
            "classifier": clf_info,
            "total_seconds": time.perf_counter() - t_all,
            "system_info": system_info(),
            "package_info": package_info(),
        }
        (stage / "pretrain_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote {args.out} in {info['total_seconds']:.0f}s")


if __name__ == "__main__":
    main()
