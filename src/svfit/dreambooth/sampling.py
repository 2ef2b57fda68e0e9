"""Sampling with DDIM and classifier-free guidance, and image grids (PNG, via PIL)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .pipeline import TextToImage


@torch.no_grad()
def sample(pipe: TextToImage, prompts: Sequence[str], *, steps: int = 25, guidance: float = 7.5, seed: int = 0,
           batch_size: int = 64, unet: Optional[torch.nn.Module] = None, eta: float = 0.0) -> torch.Tensor:
    """One image per prompt, in [0, 1], shape (N, C, H, W), on the CPU.

    DDIM (``DDIMScheduler`` built from the pipeline's own scheduler config) with ``steps`` denoising steps;
    classifier-free guidance against the empty prompt when ``guidance != 1``. The noise of image i depends only on
    ``seed`` and i, so the same seed gives the same starting noise before and after fine-tuning (paired samples).
    ``unet`` overrides the pipeline's UNet (e.g. a PEFT-wrapped one).
    """
    from diffusers import DDIMScheduler

    unet = unet if unet is not None else pipe.unet
    device = pipe.device
    ddim = DDIMScheduler.from_config(pipe.scheduler.config)
    was_training = unet.training
    unet.eval()
    c, h, w = pipe.latent_shape
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(prompts), c, h, w), generator=gen)  # drawn on the CPU: same on every device
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        cond = pipe.encode_prompts(chunk)
        uncond = pipe.encode_prompts([""] * len(chunk)) if guidance != 1.0 else None
        ddim.set_timesteps(steps, device=device)
        x = noise[start:start + len(chunk)].to(device) * ddim.init_noise_sigma
        for t in ddim.timesteps:
            inp = ddim.scale_model_input(x, t)
            if uncond is None:
                eps = unet(inp, t, encoder_hidden_states=cond).sample
            else:
                both = unet(torch.cat([inp, inp]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
                eps_u, eps_c = both.chunk(2)
                eps = eps_u + guidance * (eps_c - eps_u)
            x = ddim.step(eps, t, x, eta=eta).prev_sample
        out.append(((pipe.decode(x) + 1) / 2).float().cpu())
    unet.train(was_training)
    return torch.cat(out) if out else torch.empty(0, pipe.image_channels, pipe.resolution, pipe.resolution)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [0, 1] -> (N, H, W, C) uint8."""
    return (images.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def save_grid(rows: Sequence[torch.Tensor], path: Path, labels: Optional[Sequence[str]] = None, scale: int = 2,
              pad: int = 2) -> Path:
    """Write images as a PNG grid: one row per tensor in ``rows`` (each (N, C, H, W) in [0, 1]), an optional text
    label left of each row. Greyscale and RGB rows may be mixed. The file is written atomically."""
    from PIL import Image, ImageDraw, ImageFont

    rows = [r for r in rows]
    if not rows:
        raise ValueError("save_grid: nothing to draw")
    h, w = rows[0].shape[-2:]
    ncol = max(len(r) for r in rows)
    label_w = 0
    if labels:
        label_w = 7 * max(len(s) for s in labels) + 8
    cell_w, cell_h = w * scale + pad, h * scale + pad
    canvas = Image.new("RGB", (label_w + ncol * cell_w + pad, len(rows) * cell_h + pad), "white")
    draw = ImageDraw.Draw(canvas)
    try:
        font = ImageFont.load_default(size=11)  # Pillow >= 10.1: a scalable font with proper word spacing
    except TypeError:
        font = ImageFont.load_default()
    for i, row in enumerate(rows):
        arr = to_uint8(row)
        for j, img in enumerate(arr):
            pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).convert("RGB")
            pil = pil.resize((w * scale, h * scale), Image.NEAREST)
            canvas.paste(pil, (label_w + pad + j * cell_w, pad + i * cell_h))
        if labels:
            draw.text((4, pad + i * cell_h + cell_h // 2 - 6), labels[i], fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    canvas.save(tmp, format="PNG")
    tmp.replace(path)
    return path
