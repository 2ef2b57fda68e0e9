"""A local diffusers text-to-image pipeline, loaded component by component.

The layout is the one diffusers writes with ``save_pretrained`` (Stable Diffusion and friends)::

    DIR/unet/          UNet2DConditionModel          (required)
    DIR/text_encoder/  a transformers text encoder   (required; CLIPTextModel for Stable Diffusion)
    DIR/tokenizer/     its tokenizer                 (required)
    DIR/scheduler/     the training noise scheduler  (required; DDPMScheduler, PNDMScheduler, ...)
    DIR/vae/           AutoencoderKL                 (optional: without it the UNet works on pixels)

Components are loaded one by one (not through ``DiffusionPipeline``) so that a pixel-space pipeline without a VAE
works too, and so that a missing or corrupt component is named in the error.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..errors import SVFitUserError

REQUIRED = ("unet", "text_encoder", "tokenizer", "scheduler")


@dataclass
class TextToImage:
    """The pieces of a text-to-image diffusion model that fine-tuning and sampling need."""

    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object  # the training (noise-adding) scheduler
    vae: Optional[torch.nn.Module] = None
    source: str = ""

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def image_channels(self) -> int:
        return int(self.vae.config.in_channels if self.vae is not None else self.unet.config.in_channels)

    @property
    def vae_factor(self) -> int:
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """Image side in pixels: the UNet's sample size times the VAE's downscaling factor."""
        size = self.unet.config.sample_size
        size = size[0] if isinstance(size, (list, tuple)) else size
        return int(size) * self.vae_factor

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.resolution // self.vae_factor
        return int(self.unet.config.in_channels), side, side

    def to(self, device) -> "TextToImage":
        for m in (self.unet, self.text_encoder, self.vae):
            if m is not None:
                m.to(device)
        return self

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text-encoder hidden states for the cross-attention, padded to the tokenizer's max length (as Stable
        Diffusion does: no attention mask; CLIP's causal mask keeps padding from reaching real tokens)."""
        max_len = min(int(self.tokenizer.model_max_length), _max_positions(self.text_encoder))
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=max_len, truncation=True,
                             return_tensors="pt").input_ids.to(self.device)
        return self.text_encoder(ids)[0]

    def encode_images(self, pixels: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Images in [-1, 1] -> what the UNet denoises (VAE latents scaled by its scaling factor, or the pixels)."""
        if self.vae is None:
            return pixels
        dist = self.vae.encode(pixels).latent_dist
        return dist.sample(generator) * self.vae.config.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`encode_images`: images in [-1, 1]."""
        if self.vae is None:
            return latents.clamp(-1, 1)
        return self.vae.decode(latents / self.vae.config.scaling_factor).sample.clamp(-1, 1)


def _max_positions(text_encoder) -> int:
    cfg = text_encoder.config
    return int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 77))


def check_pipeline_dir(path: Path) -> None:
    """Fail with one line naming what is wrong with a pipeline directory, before anything heavy loads."""
    path = Path(path)
    if not path.exists():
        raise SVFitUserError(f"--model {path} does not exist; give a local diffusers pipeline directory "
                             f"(with {', '.join(REQUIRED)}/ and optionally vae/)")
    if not path.is_dir():
        raise SVFitUserError(f"--model {path} is a file, not a diffusers pipeline directory")
    missing = [name for name in REQUIRED if not (path / name).is_dir()]
    if missing:
        raise SVFitUserError(f"--model {path} is not a diffusers text-to-image pipeline: missing {', '.join(m + '/' for m in missing)} "
                             f"(expected {', '.join(r + '/' for r in REQUIRED)} as written by save_pretrained)")
    for name, config in (("unet", "config.json"), ("text_encoder", "config.json"), ("scheduler", "scheduler_config.json")):
        file = path / name / config
        if not file.is_file():
            raise SVFitUserError(f"--model {path}: {name}/{config} is missing")
        try:
            json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SVFitUserError(f"--model {path}: {name}/{config} is corrupt ({exc})") from None


def load_pipeline(path: Path, device: Optional[str] = None) -> TextToImage:
    """Load the components of a local pipeline directory (see the module docstring), frozen, in eval mode."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = Path(path)
    check_pipeline_dir(path)
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoModel, AutoTokenizer

    def load(name, fn):
        try:
            return fn(path / name)
        except SVFitUserError:
            raise
        except Exception as exc:  # noqa: BLE001 -- any failure here means an unusable component; say which
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise SVFitUserError(f"--model {path}: cannot load {name}/ ({type(exc).__name__}: {first})") from exc

    unet = load("unet", lambda p: UNet2DConditionModel.from_pretrained(p, local_files_only=True))
    text_encoder = load("text_encoder", lambda p: AutoModel.from_pretrained(p, local_files_only=True))
    tokenizer = load("tokenizer", lambda p: AutoTokenizer.from_pretrained(p, local_files_only=True))
    scheduler = load("scheduler", _load_scheduler)
    vae = None
    if (path / "vae").is_dir():
        vae = load("vae", lambda p: AutoencoderKL.from_pretrained(p, local_files_only=True))
    pipe = TextToImage(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler, vae=vae,
                       source=str(path))
    for m in (pipe.unet, pipe.text_encoder, pipe.vae):
        if m is not None:
            m.requires_grad_(False).eval()
    return pipe.to(device or default_device())


def _load_scheduler(path: Path):
    """The scheduler class named in scheduler_config.json (diffusers' own convention)."""
    import diffusers

    config = json.loads((path / "scheduler_config.json").read_text())
    name = config.get("_class_name", "DDPMScheduler")
    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "add_noise"):
        raise SVFitUserError(f"scheduler/scheduler_config.json names {name!r}, which is not a diffusers noise scheduler")
    return cls.from_pretrained(path)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
