"""The embedded DreamBooth demo: a small class-conditional text-to-image diffusion model pre-trained by this
project on Fashion-MNIST with one class (ankle boot) held out, and a 10-class judge.

* ``weights/`` is a diffusers pipeline directory (``unet/``: UNet2DConditionModel on 28x28 grey pixels,
  ``text_encoder/``: a 2-layer CLIPTextModel, ``tokenizer/``: a word-level tokenizer, ``scheduler/``:
  DDPMScheduler) plus ``classifier.safetensors`` (a small CNN trained on all ten classes, the judge of the
  benchmark). All of it was written by ``python -m svfit.dreambooth.demo.pretrain`` (seeded; see its docstring).
* The prompts are "a photo of a <class word>". "shoe" is a super-class word: the pre-training captions sandals and
  sneakers either with their own word or with "shoe", so "a photo of a shoe" means "sandal or sneaker".
  Ankle boots never appear. DreamBooth then teaches "a photo of sks shoe" from a few ankle-boot photos, with
  prior preservation on "a photo of a shoe".
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

WEIGHTS = Path(__file__).resolve().parent / "weights"
CLASSIFIER_FILE = "classifier.safetensors"

# Fashion-MNIST label -> caption word; None = held out of pre-training (the DreamBooth subject)
CLASS_WORDS: tuple[Optional[str], ...] = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", None,
)
HELD_OUT = 9  # Ankle boot
SHOE_CLASSES = (5, 7)  # sandal, sneaker: also captioned "shoe"
SUBJECT_PROMPT = "a photo of sks shoe"
CLASS_PROMPT = "a photo of a shoe"
RARE_TOKENS = ("sks", "xjy", "qzv")  # in the vocabulary, never in a pre-training caption
VOCAB = ("<pad>", "<unk>", "<bos>", "<eos>", "a", "photo", "of", "shoe",
         *[w for w in CLASS_WORDS if w is not None], *RARE_TOKENS)
GUIDANCE = 2.0  # classifier-free guidance at which the pre-trained model's class prompts come out best
MAX_TOKENS = 8  # <bos> a photo of a <word> <eos> <pad>


def class_prompt(label: int) -> str:
    word = CLASS_WORDS[label]
    if word is None:
        raise ValueError(f"class {label} is held out of the demo model's vocabulary")
    return f"a photo of a {word}"


def unet_config() -> dict:
    """UNet2DConditionModel kwargs: 28x28x1 pixels, channels (16, 32, 64); cross-attention at 7x7 only."""
    return dict(
        sample_size=28, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(16, 32, 64),
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=8,
    )


def text_config():
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(VOCAB), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=MAX_TOKENS, pad_token_id=0, bos_token_id=2,
                          eos_token_id=3)


def build_tokenizer(vocab=VOCAB, max_length: int = MAX_TOKENS):
    """A word-level tokenizer (lower-cased, whitespace-split, <bos> ... <eos>) as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    ids = {w: i for i, w in enumerate(vocab)}
    tok = Tokenizer(models.WordLevel(ids, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", ids["<bos>"]), ("<eos>", ids["<eos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                                   eos_token="<eos>", model_max_length=max_length)


class Classifier(nn.Module):
    """The judge: a small CNN for 28x28 Fashion-MNIST in [0, 1] (all ten classes)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
            nn.Flatten(), nn.Dropout(0.2), nn.Linear(128, 10),
        )

    def forward(self, x):  # x in [0, 1]
        return self.net((x - 0.286) / 0.353)


def load_classifier(weights: Path = WEIGHTS) -> Classifier:
    from safetensors.torch import load_file

    from ...assets import AssetMissingError

    path = Path(weights) / CLASSIFIER_FILE
    if not path.is_file():
        raise AssetMissingError(f"demo classifier not found at {path}; run: python -m svfit.dreambooth.demo.pretrain")
    model = Classifier()
    model.load_state_dict(load_file(path))
    return model.eval()


@torch.no_grad()
def classify(classifier: Classifier, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Predicted labels of (N, 1, 28, 28) images in [0, 1]."""
    preds = [classifier(images[i:i + batch_size].float()).argmax(1) for i in range(0, len(images), batch_size)]
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def load_demo_pipeline(device: Optional[str] = None, weights: Path = WEIGHTS):
    from ...assets import AssetMissingError
    from ..pipeline import load_pipeline

    if not (Path(weights) / "unet").is_dir():
        raise AssetMissingError(f"demo pipeline not found at {weights}; run: python -m svfit.dreambooth.demo.pretrain")
    return load_pipeline(weights, device=device)


def to_unit(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float (N, 1, 28, 28) in [0, 1]."""
    return torch.from_numpy(images.astype(np.float32) / 255.0)[:, None]


def subject_images(n: int = 8, seed: int = 0, split: str = "train") -> torch.Tensor:
    """``n`` ankle-boot photos (the DreamBooth subject set) from a Fashion-MNIST split, seeded, in [0, 1]."""
    from ...assets.images import load_fashion_mnist

    x, y = load_fashion_mnist(split)
    idx = np.flatnonzero(y == HELD_OUT)
    pick = np.random.default_rng(seed).choice(idx, size=n, replace=False)
    return to_unit(x[np.sort(pick)])
