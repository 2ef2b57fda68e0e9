"""DreamBooth fine-tuning of a diffusers UNet with SVFit, LoRA or full fine-tuning.

DreamBooth (Ruiz et al., 2022): a handful of images of one subject, captioned with a rare token ("a photo of sks
dog"), teach a pre-trained text-to-image model the subject. Prior preservation adds the same denoising loss on
images the *pre-trained* model generated for the bare class prompt ("a photo of a dog"), so that the class word
keeps meaning the whole class instead of drifting to the subject.

The adapter is plain PEFT: ``get_peft_model(unet, SVFitConfig(target_modules=...))`` or the same with
``LoraConfig`` -- the two configs are the only difference between the methods.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import SVFitUserError
from ..validation import check_number, check_optimizer
from .pipeline import TextToImage
from .sampling import sample

METHODS = ("svfit", "lora", "full")
ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
CONV_TARGETS = ("conv1", "conv2")  # the 3x3 convolutions of diffusers' ResnetBlock2D
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")  # CLIP text encoder attention
DEFAULT_LR = {"svfit": 1e-2, "lora": 1e-3, "full": 5e-5}  # see benchmarks/dreambooth.py for how they were picked
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclass
class DreamBoothConfig:
    instance_prompt: str
    class_prompt: Optional[str] = None  # None: no prior preservation
    method: str = "svfit"
    targets: Sequence[str] = ATTENTION_TARGETS
    conv: bool = False  # also adapt the ResNet 3x3 convolutions
    train_text_encoder: bool = False
    rank: Optional[int] = None  # lora: rank (default 4); svfit: fixed r (default: 0.99 energy threshold)
    steps: int = 300  # with the demo: the benchmark's setting, which measurably teaches the subject (BENCHMARKS.md)
    lr: Optional[float] = None
    batch_size: int = 4
    num_class_images: int = 64
    prior_weight: float = 1.0
    seed: int = 0
    sample_steps: int = 25
    guidance: float = 7.5  # Stable Diffusion's usual scale; the demo model samples best at 2.0

    def __post_init__(self):
        if self.method not in METHODS:
            raise SVFitUserError(f"unknown --method {self.method!r}; choose from {', '.join(METHODS)}")
        for name in ("steps", "batch_size", "sample_steps"):
            if getattr(self, name) < 1:
                raise SVFitUserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.class_prompt is not None and self.num_class_images < 1:
            raise SVFitUserError(f"--num-class-images must be >= 1 with --class-prompt, got {self.num_class_images}")
        if self.rank is not None and self.rank < 1:
            raise SVFitUserError(f"--rank must be >= 1, got {self.rank}")
        check_numbers(lr=self.lr, prior_weight=self.prior_weight, guidance=self.guidance)
        if not self.instance_prompt.strip():
            raise SVFitUserError("--instance-prompt is empty; give e.g. 'a photo of sks dog'")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]

    @property
    def all_targets(self) -> list[str]:
        return list(self.targets) + (list(CONV_TARGETS) if self.conv else [])


def check_numbers(lr: Optional[float] = None, prior_weight: Optional[float] = None,
                  guidance: Optional[float] = None) -> None:
    """The real-valued settings (None = default, accepted): run before the pipeline loads, and by the config."""
    check_optimizer(lr)
    check_number("--prior-weight", prior_weight, minimum=0.0, why="0 turns prior preservation's loss off")
    check_number("--guidance", guidance, minimum=1.0, why="1 turns classifier-free guidance off")


def load_instance_images(directory: Path, channels: int, resolution: int) -> torch.Tensor:
    """Every image file in ``directory``, centre-cropped to a square, resized, as (N, C, H, W) in [-1, 1]."""
    from PIL import Image, UnidentifiedImageError

    directory = Path(directory)
    if not directory.is_dir():
        raise SVFitUserError(f"--instance-dir {directory} is not a directory of images")
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SVFitUserError(f"--instance-dir {directory} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    out = []
    for f in files:
        try:
            img = Image.open(f)
            img.load()
        except (UnidentifiedImageError, OSError) as exc:
            raise SVFitUserError(f"cannot read image {f} ({exc})") from None
        img = img.convert("L" if channels == 1 else "RGB")
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
        arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        out.append(torch.from_numpy(arr.copy()))
    return torch.stack(out)


def peft_config(method: str, targets: Sequence[str], rank: Optional[int] = None):
    """The PEFT config of a method: the only thing that differs between SVFit and LoRA."""
    if method == "svfit":
        from ..tuner import SVFitConfig

        return SVFitConfig(target_modules=list(targets), r=rank)
    if method == "lora":
        from peft import LoraConfig

        r = rank or 4
        return LoraConfig(target_modules=list(targets), r=r, lora_alpha=r, init_lora_weights="gaussian")
    raise ValueError(method)


def prepare(pipe: TextToImage, cfg: DreamBoothConfig):
    """(unet, text_encoder) ready to train: PEFT-wrapped for svfit/lora, fully trainable for full."""
    from peft import get_peft_model

    unet, text_encoder = pipe.unet, pipe.text_encoder
    if cfg.method == "full":
        unet.requires_grad_(True)
        if cfg.train_text_encoder:
            text_encoder.requires_grad_(True)
        return unet, text_encoder
    try:
        unet = get_peft_model(unet, peft_config(cfg.method, cfg.all_targets, cfg.rank))
    except ValueError as exc:
        if "not found in the base model" in str(exc) or "Target modules" in str(exc):
            raise SVFitUserError(f"--targets {','.join(cfg.all_targets)} match no layer of the UNet") from None
        raise
    if cfg.train_text_encoder:
        text_encoder = get_peft_model(text_encoder, peft_config(cfg.method, TEXT_TARGETS, cfg.rank))
    return unet, text_encoder


def trainable_parameters(*modules) -> list[torch.nn.Parameter]:
    return [p for m in modules for p in m.parameters() if p.requires_grad]


@dataclass
class FinetuneResult:
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    losses: list[float] = field(default_factory=list)
    train_time: float = 0.0
    class_images_time: float = 0.0
    trainable: int = 0


def generate_class_images(pipe: TextToImage, cfg: DreamBoothConfig) -> torch.Tensor:
    """Prior-preservation images: the pre-trained model's own samples for the class prompt, in [-1, 1]."""
    images = sample(pipe, [cfg.class_prompt] * cfg.num_class_images, steps=cfg.sample_steps, guidance=cfg.guidance,
                    seed=cfg.seed + 10_000)
    return images * 2 - 1


def finetune(pipe: TextToImage, instance_images: torch.Tensor, cfg: DreamBoothConfig,
             class_images: Optional[torch.Tensor] = None, log: Callable[[str], None] = lambda s: None,
             progress: bool = False, report_every: int = 0) -> FinetuneResult:
    """The DreamBooth loop. Each step: ``batch_size`` instance images (drawn with replacement) with the instance
    prompt, plus as many prior images with the class prompt when prior preservation is on; the loss is the
    noise-prediction MSE on the instance half + ``prior_weight`` x the MSE on the class half. With
    ``report_every``, ``log`` also gets a plain progress line every that many steps (for logs and pipes)."""
    torch.manual_seed(cfg.seed)
    t_class = 0.0
    if cfg.class_prompt is not None and class_images is None:
        t0 = time.perf_counter()
        class_images = generate_class_images(pipe, cfg)
        t_class = time.perf_counter() - t0
        log(f"generated {len(class_images)} prior-preservation images for {cfg.class_prompt!r} in {t_class:.1f}s")
    unet, text_encoder = prepare(pipe, cfg)
    params = trainable_parameters(unet, text_encoder)
    n_trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.steps // 10)))
    noise_sched = pipe.scheduler
    device = pipe.device
    gen = torch.Generator().manual_seed(cfg.seed)
    instance_images = instance_images.to(device)
    prompts = [cfg.instance_prompt] * cfg.batch_size
    if class_images is not None:
        class_images = class_images.to(device)
        prompts += [cfg.class_prompt] * cfg.batch_size
    train_te = cfg.train_text_encoder
    if not train_te:
        with torch.no_grad():
            fixed_states = pipe.encode_prompts(prompts)
    unet.train()
    text_encoder.train(train_te)
    losses = []
    bar = _bar(cfg.steps, progress)
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        idx = torch.randint(len(instance_images), (cfg.batch_size,), generator=gen)
        pixels = instance_images[idx.to(device)]
        if class_images is not None:
            cidx = torch.randint(len(class_images), (cfg.batch_size,), generator=gen)
            pixels = torch.cat([pixels, class_images[cidx.to(device)]])
        with torch.no_grad():
            latents = pipe.encode_images(pixels)
        noise = torch.randn(latents.shape, generator=gen).to(device)
        t = torch.randint(noise_sched.config.num_train_timesteps, (len(latents),), generator=gen).to(device)
        noisy = noise_sched.add_noise(latents, noise, t)
        target = _target(noise_sched, latents, noise, t)
        states = _encode_with(pipe, text_encoder, prompts) if train_te else fixed_states
        pred = unet(noisy, t, encoder_hidden_states=states).sample
        per_image = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        loss = per_image[: cfg.batch_size].mean()
        if class_images is not None:
            loss = loss + cfg.prior_weight * per_image[cfg.batch_size:].mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the loss became {loss.item()} at step {step}; lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        if report_every and ((step + 1) % report_every == 0 or step + 1 == cfg.steps):
            window = losses[-report_every:]
            log(f"step {step + 1}/{cfg.steps}  loss {np.mean(window):.4f} (mean of the last {len(window)})  "
                f"{time.perf_counter() - t0:.0f} s elapsed")
    if bar is not None:
        bar.close()
    unet.eval()
    text_encoder.eval()
    return FinetuneResult(unet=unet, text_encoder=text_encoder, losses=losses,
                          train_time=time.perf_counter() - t0, class_images_time=t_class, trainable=n_trainable)


def _encode_with(pipe: TextToImage, text_encoder, prompts):
    original = pipe.text_encoder
    pipe.text_encoder = text_encoder
    try:
        return pipe.encode_prompts(prompts)
    finally:
        pipe.text_encoder = original


def _target(noise_sched, latents, noise, t):
    kind = noise_sched.config.get("prediction_type", "epsilon")
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_sched.get_velocity(latents, noise, t)
    if kind == "sample":
        return latents
    raise SVFitUserError(f"the scheduler's prediction_type {kind!r} is not supported (epsilon, v_prediction, sample)")


def _bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="dreambooth", leave=False)


def sample_with(pipe: TextToImage, result: FinetuneResult, prompts: Sequence[str], cfg: DreamBoothConfig,
                seed: int = 0) -> torch.Tensor:
    """Samples from the fine-tuned UNet (and text encoder, if it was trained)."""
    original = pipe.text_encoder
    pipe.text_encoder = result.text_encoder
    try:
        return sample(pipe, prompts, steps=cfg.sample_steps, guidance=cfg.guidance, seed=seed, unet=result.unet)
    finally:
        pipe.text_encoder = original


def save_trained(result: FinetuneResult, cfg: DreamBoothConfig, out: Path) -> dict[str, int]:
    """Write what was trained under ``out``: PEFT adapters (unet_adapter/, text_encoder_adapter/) or, for full
    fine-tuning, the whole UNet (unet/) and text encoder. Returns {weights file: bytes}."""
    sizes = {}
    if cfg.method == "full":
        result.unet.save_pretrained(out / "unet")
        sizes["unet/diffusion_pytorch_model.safetensors"] = (out / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
        if cfg.train_text_encoder:
            result.text_encoder.save_pretrained(out / "text_encoder")
            sizes["text_encoder/model.safetensors"] = (out / "text_encoder" / "model.safetensors").stat().st_size
        return sizes
    result.unet.save_pretrained(out / "unet_adapter")
    sizes["unet_adapter/adapter_model.safetensors"] = (out / "unet_adapter" / "adapter_model.safetensors").stat().st_size
    if cfg.train_text_encoder:
        result.text_encoder.save_pretrained(out / "text_encoder_adapter")
        f = out / "text_encoder_adapter" / "adapter_model.safetensors"
        sizes["text_encoder_adapter/adapter_model.safetensors"] = f.stat().st_size
    return sizes


def load_trained(pipe: TextToImage, run_dir: Path) -> TextToImage:
    """The pipeline with a run's fine-tuned weights applied (adapters loaded with PEFT, or full weights)."""
    from diffusers import UNet2DConditionModel
    from peft import PeftModel
    from transformers import AutoModel

    import svfit  # noqa: F401  (registers SVFIT with PEFT before an adapter config is read)

    run_dir = Path(run_dir)
    device = pipe.device
    if (run_dir / "unet_adapter").is_dir():
        pipe.unet = PeftModel.from_pretrained(pipe.unet, run_dir / "unet_adapter").eval()
    elif (run_dir / "unet").is_dir():
        pipe.unet = UNet2DConditionModel.from_pretrained(run_dir / "unet").to(device).eval()
    else:
        raise SVFitUserError(f"{run_dir} holds no unet_adapter/ or unet/; is it a `svfit dreambooth` output?")
    if (run_dir / "text_encoder_adapter").is_dir():
        pipe.text_encoder = PeftModel.from_pretrained(pipe.text_encoder, run_dir / "text_encoder_adapter").eval()
    elif (run_dir / "text_encoder").is_dir():
        pipe.text_encoder = AutoModel.from_pretrained(run_dir / "text_encoder").to(device).eval()
    return pipe


def config_dict(cfg: DreamBoothConfig) -> dict:
    d = asdict(cfg)
    d["targets"] = cfg.all_targets
    d["lr"] = cfg.learning_rate
    return d

