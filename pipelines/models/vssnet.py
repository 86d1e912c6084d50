"""VSS-Net: intracranial artery segmentation from a whole DSA sequence.

Encoder: a sequence feature extraction (SFE) module at every stage. Each SFE
concatenates the raw frames (resized to the stage) with the stage features, so
fine intensity detail is never lost; fuses them with a 1x1 convolution shared
by all frames; runs a bidirectional ConvGRU whose directions are fused with a
tanh; sends a strided down-convolution of every frame to the next stage; and
max-pools over time into the skip connection (a vessel is seen in the frame
where it is most opaque, whenever that is).

Decoder: FR-UNet style. Feature maps at every resolution are refined over
several columns, each node taking its own resolution, the upsampled coarser
one and the downsampled finer one; every full-resolution node has an output
head (deep supervision), and the prediction is their mean. Uses every frame.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.models.convgru import BiConvGRU
from pipelines.models.package import architecture
from pipelines.models.stunet import pad_to_multiple

DEFAULT_WIDTHS = (16, 32, 64, 128, 256)


def conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class SequenceFeatureExtraction(nn.Module):
    """Raw frames + features -> shared 1x1 fusion -> BiConvGRU -> (skip, down)."""

    def __init__(self, in_channels: int, channels: int, down_channels: int):
        super().__init__()
        self.fuse = conv_bn(in_channels + 1, channels, kernel=1)
        self.gru = BiConvGRU(channels, channels)
        self.down = conv_bn(channels, down_channels, stride=2)

    def forward(self, feats: torch.Tensor, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """feats (B, T, C, H, W), raw (B, T, 1, H0, W0) -> skip (B, C', H, W), down (B, T, C'', H/2, W/2)."""
        b, t = feats.shape[:2]
        size = feats.shape[-2:]
        raw_s = raw.flatten(0, 1)
        if raw_s.shape[-2:] != size:
            raw_s = F.interpolate(
                raw_s, size=size, mode="bilinear", align_corners=False, antialias=True
            )
        fused = self.fuse(torch.cat([feats.flatten(0, 1), raw_s], dim=1)).unflatten(0, (b, t))
        seq = self.gru(fused)
        skip = seq.amax(dim=1)
        down = self.down(seq.flatten(0, 1)).unflatten(0, (b, t))
        return skip, down


class FRNode(nn.Module):
    """One decoder node: same resolution + upsampled coarser + downsampled finer."""

    def __init__(self, channels: int, coarser: int, finer: int | None):
        super().__init__()
        self.down = conv_bn(finer, channels, stride=2) if finer else None
        cin = channels + coarser + (channels if finer else 0)
        self.conv = nn.Sequential(conv_bn(cin, channels), conv_bn(channels, channels))

    def forward(
        self, same: torch.Tensor, coarser: torch.Tensor, finer: torch.Tensor | None
    ) -> torch.Tensor:
        parts = [
            same,
            F.interpolate(coarser, size=same.shape[-2:], mode="bilinear", align_corners=False),
        ]
        if self.down is not None and finer is not None:
            parts.append(self.down(finer))
        return self.conv(torch.cat(parts, dim=1))


class VSSNet(nn.Module):
    def __init__(self, out_channels: int = 1, widths: Sequence[int] = DEFAULT_WIDTHS):
        super().__init__()
        self.widths = tuple(int(w) for w in widths)
        levels = len(self.widths)
        self.stem = conv_bn(1, self.widths[0])
        self.sfe = nn.ModuleList(
            SequenceFeatureExtraction(
                self.widths[i], self.widths[i], self.widths[min(i + 1, levels - 1)]
            )
            for i in range(levels - 1)
        )
        self.bottleneck = nn.Sequential(
            conv_bn(self.widths[-1], self.widths[-1]), conv_bn(self.widths[-1], self.widths[-1])
        )
        # Column j (1..levels-1) holds nodes for levels 0..levels-1-j.
        self.columns: list[list[FRNode]] = nn.ModuleList(  # type: ignore[assignment]
            nn.ModuleList(
                FRNode(
                    self.widths[level],
                    self.widths[level + 1],
                    self.widths[level - 1] if level > 0 else None,
                )
                for level in range(levels - j)
            )
            for j in range(1, levels)
        )
        self.heads = nn.ModuleList(
            nn.Conv2d(self.widths[0], out_channels, 1) for _ in range(levels - 1)
        )

    def forward_all(self, frames: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every full-resolution head (for deep supervision)."""
        if frames.dim() == 4:
            frames = frames.unsqueeze(2)
        frames, (h0, w0) = pad_to_multiple(frames, 2 ** (len(self.widths) - 1))
        b, t = frames.shape[:2]
        feats = self.stem(frames.flatten(0, 1)).unflatten(0, (b, t))
        grid: list[torch.Tensor] = []
        for sfe in self.sfe:
            skip, feats = sfe(feats, frames)
            grid.append(skip)
        grid.append(self.bottleneck(feats.amax(dim=1)))
        outputs = []
        for j, column in enumerate(self.columns):
            grid = [
                node(grid[level], grid[level + 1], grid[level - 1] if level > 0 else None)
                for level, node in enumerate(column)
            ]
            outputs.append(self.heads[j](grid[0])[..., :h0, :w0])
        return outputs

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, T, H, W) frames -> (B, K, H, W) logits, the mean of the heads."""
        return torch.stack(self.forward_all(frames)).mean(dim=0)


@architecture("vss_net")
def build_vss_net(config: Mapping[str, Any]) -> VSSNet:
    return VSSNet(
        out_channels=int(config.get("out_channels", 1)),
        widths=tuple(config.get("widths", DEFAULT_WIDTHS)),
    )
