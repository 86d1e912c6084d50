"""The DLA voxel classifier (vessel / bone / soft tissue) of deep learning angiography.

The published method classifies every voxel of a contrast-filled C-arm CT from
a 41 x 41 in-plane patch over 5 adjacent slices with a 30-layer ResNet, one
voxel at a time (about 2,500 voxels/s/GPU), and assigns the class of highest
posterior probability. We keep that receptive field and decision rule but build
the network from unpadded ("valid") convolutions only, without pooling or
striding, so the same weights run two ways:

- patch-wise: a (N, 5, 41, 41) batch of patches gives (N, 3, 1, 1) logits, one
  voxel per patch, as in the paper (used for training);
- dense: a slab of slices padded by 20 pixels gives logits for every voxel at
  once, which is exactly the patch-wise answer for every voxel, computed with
  shared intermediate results (used for inference).

Layer count (weight layers, as ResNet depth is counted): a 3x3 stem, 14
residual blocks of two convolutions, and a 1x1 classifier = 30. Twenty of the
convolutions are 3x3 (20 x 2 + 1 = 41 pixels), the others 1x1; the 5 slices
enter as input channels. Batch norm is a per-channel affine map at inference,
so it keeps the two ways identical (instance norm would not).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.models.package import architecture

ARCHITECTURE = "dla_resnet"
PATCH = 41  # in-plane receptive field (pixels)
SLICES = 5  # through-plane receptive field (slices)
MARGIN = PATCH // 2  # pixels of context needed on each side
RESIDUAL_BLOCKS = 14
# Blocks whose second convolution is also 3x3 (the rest use 1x1): 1 + 14 + 5 = 20.
WIDE_BLOCKS = 5
N_CLASSES = 3  # vessel, bone, soft tissue (everything else, air included)
CLASS_VESSEL, CLASS_BONE, CLASS_SOFT = 0, 1, 2


class ValidBlock(nn.Module):
    """Residual block of unpadded convolutions; the skip is centre-cropped."""

    def __init__(self, width: int, second_kernel: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, bias=False)
        self.norm1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, second_kernel, bias=False)
        self.norm2 = nn.BatchNorm2d(width)
        self.crop = 1 + (second_kernel - 1) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        c = self.crop
        return F.relu(y + x[..., c:-c, c:-c])


class DLAResNet(nn.Module):
    """30-layer valid-convolution ResNet; input HU slabs (B, 5, H+40, W+40) -> logits (B, 3, H, W)."""

    # On the CPU the node runs it in ONNX Runtime (pipelines.models.runtime).
    onnx_on_cpu = True
    onnx_probe_shape = (2, SLICES, PATCH + 7, PATCH + 11)
    onnx_probe_scale = 500.0  # HU

    def __init__(self, width: int = 32, hu_scale: float = 1000.0) -> None:
        super().__init__()
        self.hu_scale = hu_scale
        self.stem = nn.Sequential(
            nn.Conv2d(SLICES, width, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        self.blocks = nn.Sequential(
            *[ValidBlock(width, 3 if i < WIDE_BLOCKS else 1) for i in range(RESIDUAL_BLOCKS)]
        )
        self.classifier = nn.Conv2d(width, N_CLASSES, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != SLICES or min(x.shape[-2:]) < PATCH:
            raise ValueError(
                f"expected (B, {SLICES}, >= {PATCH}, >= {PATCH}) HU slabs, got {tuple(x.shape)}"
            )
        # Fixed scaling (not per-input statistics) keeps patch-wise == dense.
        return self.classifier(self.blocks(self.stem(x / self.hu_scale)))


def receptive_field(model: DLAResNet) -> int:
    """In-plane receptive field, counted from the layers (checked in tests)."""
    field = 1
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            field += m.kernel_size[0] - 1
    return field


def weight_layers(model: nn.Module) -> int:
    return sum(isinstance(m, nn.Conv2d | nn.Linear) for m in model.modules())


@architecture(ARCHITECTURE)
def build(config: Mapping[str, Any]) -> nn.Module:
    """Config keys: width (channels, default 32), hu_scale (default 1000); class_bias is
    the node's decision, not the network's (``pipelines.rotational.class_bias``)."""
    known = {"width", "hu_scale", "air_hu", "class_bias"}
    unknown = set(config) - known
    if unknown:
        raise ValueError(
            f"{ARCHITECTURE}: unknown config keys {sorted(unknown)}; allowed: {sorted(known)}"
        )
    return DLAResNet(
        width=int(config.get("width", 32)), hu_scale=float(config.get("hu_scale", 1000.0))
    )
