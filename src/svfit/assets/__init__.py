"""Offline loaders for the real pre-trained models and data sets that ship inside ordinary packages.

Nothing here downloads anything. Models and data come from pip/apt "carrier" packages (see ``/work/shared/ASSETS.md``
and ``./setup.sh``); a missing one raises :class:`AssetMissingError`, whose one-line message says what to install.
Derived checkpoints (DINOv2 converted from ONNX, SmolLM2 dequantised from GGUF) are built once under
:func:`cache_dir` and reused.
"""

from ._common import AssetMissingError, cache_dir, pkg_dir
from .dinov2 import IMAGENET_MEAN, IMAGENET_STD, dinov2_checkpoint
from .efficientnet import EFFICIENTNET_MEAN_STD, EfficientNetLite0, load_efficientnet_lite0
from .images import FASHION_MNIST_CLASSES, load_fashion_mnist
from .smollm2 import smollm2_checkpoint
from .text import load_rotten_tomatoes, minilm_dir

__all__ = [
    "EFFICIENTNET_MEAN_STD",
    "FASHION_MNIST_CLASSES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "AssetMissingError",
    "EfficientNetLite0",
    "cache_dir",
    "dinov2_checkpoint",
    "load_efficientnet_lite0",
    "load_fashion_mnist",
    "load_rotten_tomatoes",
    "minilm_dir",
    "pkg_dir",
    "smollm2_checkpoint",
]
