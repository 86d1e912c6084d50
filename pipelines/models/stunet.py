"""ST U-Net: the spatio-temporal U-Net for artery/vein segmentation of cerebral DSA
(after Su et al., CAVE): a per-frame 2D encoder shared by all frames, two ConvGRU
layers at every scale that summarise the run, and a 2D decoder on the summaries.

Outputs are independent sigmoid logits (artery, vein, optionally ICA), because
arteries and veins overlap where they cross in projection.

The frames stream through the encoder in chunks and the GRU states carry the
sequence, so memory grows with the image size, not with the number of frames,
and any length of 1 to 60+ frames works. The paper's configuration (widths
64..512) has about 104 M parameters; the default here (32..256) has 21.4 M.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.models.convgru import ConvGRUCell
from pipelines.models.package import architecture

DEFAULT_WIDTHS = (32, 64, 128, 256, 256)


def double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad the last two axes up to a multiple (reflecting where possible)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x, (h, w)
    lead = x.shape[:-2]
    flat = x.reshape(-1, 1, h, w)
    mode = "reflect" if ph < h and pw < w else "replicate"
    flat = F.pad(flat, (0, pw, 0, ph), mode=mode)
    return flat.reshape(*lead, h + ph, w + pw), (h, w)


class STUNet(nn.Module):
    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 2,
        widths: Sequence[int] = DEFAULT_WIDTHS,
        gru_layers: int = 2,
        kernel_size: int = 3,
        chunk: int = 8,
    ):
        super().__init__()
        self.widths = tuple(int(w) for w in widths)
        self.chunk = chunk
        self.encoder = nn.ModuleList()
        for i, w in enumerate(self.widths):
            cin = in_channels if i == 0 else self.widths[i - 1]
            block = double_conv(cin, w)
            self.encoder.append(block if i == 0 else nn.Sequential(nn.MaxPool2d(2), block))
        self.temporal: list[list[ConvGRUCell]] = nn.ModuleList(  # type: ignore[assignment]
            nn.ModuleList(ConvGRUCell(w, w, kernel_size) for _ in range(gru_layers))
            for w in self.widths
        )
        self.decoder = nn.ModuleList(
            double_conv(self.widths[i + 1] + self.widths[i], self.widths[i])
            for i in range(len(self.widths) - 1)
        )
        self.head = nn.Conv2d(self.widths[0], out_channels, 1)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, T, H, W) or (B, T, C, H, W) frames -> (B, K, H, W) logits."""
        if frames.dim() == 4:
            frames = frames.unsqueeze(2)
        frames, (h0, w0) = pad_to_multiple(frames, 2 ** (len(self.widths) - 1))
        b, t = frames.shape[:2]
        chunk = t if self.training else max(1, self.chunk)
        states: list[list[torch.Tensor | None]] = [[None] * len(cells) for cells in self.temporal]
        for start in range(0, t, chunk):
            x = frames[:, start : start + chunk].flatten(0, 1)
            n = x.shape[0] // b
            for level, block in enumerate(self.encoder):
                x = block(x)
                seq = x
                for k, cell in enumerate(self.temporal[level]):
                    proj = cell.input_projection(seq).unflatten(0, (b, n))
                    h = states[level][k]
                    outs = []
                    for i in range(n):
                        h = cell.step(proj[:, i], h)
                        outs.append(h)
                    states[level][k] = h
                    seq = torch.stack(outs, dim=1).flatten(0, 1)
        skips = [s[-1] for s in states]
        y = skips[-1]
        for level in range(len(self.widths) - 2, -1, -1):
            skip = skips[level]
            assert y is not None and skip is not None
            y = F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            y = self.decoder[level](torch.cat([y, skip], dim=1))
        assert y is not None
        return self.head(y)[..., :h0, :w0]


@architecture("st_unet")
def build_st_unet(config: Mapping[str, Any]) -> STUNet:
    return STUNet(
        in_channels=int(config.get("in_channels", 1)),
        out_channels=int(config.get("out_channels", 2)),
        widths=tuple(config.get("widths", DEFAULT_WIDTHS)),
        gru_layers=int(config.get("gru_layers", 2)),
        kernel_size=int(config.get("kernel_size", 3)),
        chunk=int(config.get("chunk", 8)),
    )
