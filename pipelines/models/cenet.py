"""The 3D-2D CE-Net for per-frame vessel segmentation of XA cine runs.

Why this shape: a coronary frame alone is ambiguous (ribs, catheter, diaphragm
edges look tubular too); the neighbouring frames show what moves with the heart
and fills with contrast. A 3D convolution over 2N+1 neighbouring frames folds
that temporal context into feature maps, a 2D convolution maps them to 3
channels (the input a ResNet encoder expects), and CE-Net segments the result:
a ResNet-34-style encoder, the dense atrous convolution (DAC) block, the
residual multi-kernel pooling (RMP) block and a decoder with additive skips.
Instance norm replaces batch norm so that batches of one run behave like
batches of many. ``neighbours = 0`` gives the 2D CE-Net baseline (the 3D
convolution then has a temporal extent of one frame).

Input ``(B, 2N+1, H, W)`` with H and W multiples of 32; output logits ``(B, 1, H, W)``.
No pretrained weights are used: none can be downloaded here, so packages are
trained from scratch on our phantoms (see docs/coronary_rotational.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.models.package import architecture

ARCHITECTURE = "ce_net_3d2d"
# ResNet-34 block counts per stage.
RESNET34_BLOCKS = (3, 4, 6, 3)
# Input H and W must be multiples of this (five stride-2 stages).
STRIDE = 32


def _norm(channels: int) -> nn.Module:
    return nn.InstanceNorm2d(channels, affine=True)


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convolutions and an identity or projected skip)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = _norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = _norm(cout)
        self.skip: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _norm(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return F.relu(y + self.skip(x))


def _stage(cin: int, cout: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [BasicBlock(cin, cout, stride)]
    layers += [BasicBlock(cout, cout) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class DACBlock(nn.Module):
    """Dense atrous convolution: four cascaded branches with receptive fields 3, 7, 9
    and 19, summed with the input (weights shared between branches as in CE-Net)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.dilate1 = nn.Conv2d(channels, channels, 3, dilation=1, padding=1)
        self.dilate3 = nn.Conv2d(channels, channels, 3, dilation=3, padding=3)
        self.dilate5 = nn.Conv2d(channels, channels, 3, dilation=5, padding=5)
        self.conv1x1 = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d1 = self.dilate1(x)
        d31 = self.dilate3(d1)
        b1 = F.relu(d1)
        b2 = F.relu(self.conv1x1(self.dilate3(x)))
        b3 = F.relu(self.conv1x1(d31))
        b4 = F.relu(self.conv1x1(self.dilate5(d31)))
        return x + b1 + b2 + b3 + b4


class RMPBlock(nn.Module):
    """Residual multi-kernel pooling: max pools of 2, 3, 5 and 6 pixels, each reduced
    to one channel and upsampled, concatenated with the input (C + 4 channels).

    Pool sizes are capped at the feature-map size so small test images still run.
    """

    KERNELS = (2, 3, 5, 6)

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        maps = []
        for k in self.KERNELS:
            k_eff = max(1, min(k, h, w))
            pooled = F.max_pool2d(x, kernel_size=k_eff, stride=k_eff)
            maps.append(
                F.interpolate(self.conv(pooled), size=(h, w), mode="bilinear", align_corners=False)
            )
        return torch.cat([*maps, x], dim=1)


class DecoderBlock(nn.Module):
    """1x1 reduce, 3x3 transposed convolution (x2), 1x1 expand."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        mid = max(cin // 4, 1)
        self.reduce = nn.Sequential(nn.Conv2d(cin, mid, 1), _norm(mid), nn.ReLU(inplace=True))
        self.up = nn.Sequential(
            nn.ConvTranspose2d(mid, mid, 3, stride=2, padding=1, output_padding=1),
            _norm(mid),
            nn.ReLU(inplace=True),
        )
        self.expand = nn.Sequential(nn.Conv2d(mid, cout, 1), _norm(cout), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expand(self.up(self.reduce(x)))


class CENet3D2D(nn.Module):
    """3D temporal input layer + 2D conv to 3 channels + CE-Net."""

    def __init__(
        self,
        neighbours: int = 1,
        width: int = 64,
        blocks: Sequence[int] = RESNET34_BLOCKS,
        temporal_features: int = 16,
    ) -> None:
        super().__init__()
        if neighbours < 0:
            raise ValueError(f"neighbours must be >= 0, got {neighbours}")
        if len(blocks) != 4 or min(blocks) < 1:
            raise ValueError(f"blocks must be four positive counts, got {list(blocks)}")
        self.neighbours = neighbours
        depth = 2 * neighbours + 1
        f = [width, 2 * width, 4 * width, 8 * width]
        # Temporal input layer: the whole (2N+1)-frame window in one 3D kernel.
        self.temporal = nn.Conv3d(
            1, temporal_features, (depth, 3, 3), padding=(0, 1, 1), bias=False
        )
        self.temporal_norm = _norm(temporal_features)
        self.to_rgb = nn.Conv2d(temporal_features, 3, 3, padding=1)
        # ResNet-34-style encoder.
        self.stem = nn.Sequential(
            nn.Conv2d(3, f[0], 7, 2, 3, bias=False), _norm(f[0]), nn.ReLU(inplace=True)
        )
        self.enc1 = _stage(f[0], f[0], blocks[0], 1)
        self.enc2 = _stage(f[0], f[1], blocks[1], 2)
        self.enc3 = _stage(f[1], f[2], blocks[2], 2)
        self.enc4 = _stage(f[2], f[3], blocks[3], 2)
        self.dac = DACBlock(f[3])
        self.rmp = RMPBlock(f[3])
        self.dec4 = DecoderBlock(f[3] + len(RMPBlock.KERNELS), f[2])
        self.dec3 = DecoderBlock(f[2], f[1])
        self.dec2 = DecoderBlock(f[1], f[0])
        self.dec1 = DecoderBlock(f[0], f[0])
        head = max(f[0] // 2, 4)
        self.head = nn.Sequential(
            nn.ConvTranspose2d(f[0], head, 4, 2, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(head, head, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(head, 1, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 2 * self.neighbours + 1:
            raise ValueError(
                f"expected (B, {2 * self.neighbours + 1}, H, W) frame windows, got {tuple(x.shape)}"
            )
        if x.shape[-1] % STRIDE or x.shape[-2] % STRIDE:
            raise ValueError(f"H and W must be multiples of {STRIDE}, got {tuple(x.shape[-2:])}")
        t = self.temporal(x.unsqueeze(1)).squeeze(2)
        t = F.relu(self.temporal_norm(t))
        e = self.stem(self.to_rgb(t))
        e = F.max_pool2d(e, 3, 2, 1)
        e1 = self.enc1(e)
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        e4 = self.rmp(self.dac(self.enc4(e3)))
        d4 = self.dec4(e4) + e3
        d3 = self.dec3(d4) + e2
        d2 = self.dec2(d3) + e1
        d1 = self.dec1(d2)
        return self.head(d1)


def frame_windows(frames: torch.Tensor, neighbours: int, index: torch.Tensor) -> torch.Tensor:
    """Stack the 2N+1 frames around each frame in ``index``; edge frames repeat.

    ``frames`` is (T, H, W); returns (len(index), 2N+1, H, W).
    """
    offsets = torch.arange(-neighbours, neighbours + 1, device=frames.device)
    rows = (index.to(frames.device)[:, None] + offsets[None, :]).clamp(0, frames.shape[0] - 1)
    return frames[rows]


@architecture(ARCHITECTURE)
def build(config: Mapping[str, Any]) -> nn.Module:
    """Config keys: neighbours (N, default 1), width (64 = ResNet-34), blocks,
    temporal_features."""
    # Pipeline-level keys the package also carries (see pipelines.coronary).
    known = {
        "neighbours",
        "width",
        "blocks",
        "temporal_features",
        "threshold",
        "work_spacing_mm",
        "max_side",
    }
    unknown = set(config) - known
    if unknown:
        raise ValueError(
            f"{ARCHITECTURE}: unknown config keys {sorted(unknown)}; allowed: {sorted(known)}"
        )
    return CENet3D2D(
        neighbours=int(config.get("neighbours", 1)),
        width=int(config.get("width", 64)),
        blocks=tuple(int(b) for b in config.get("blocks", RESNET34_BLOCKS)),
        temporal_features=int(config.get("temporal_features", 16)),
    )
