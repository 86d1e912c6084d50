"""Convolutional GRUs: the temporal building block of the DSA sequence models.

A ConvGRU keeps a spatial hidden state and updates it frame by frame, so a
network built on it accepts any number of frames and learns the
time-intensity behaviour (arterial inflow, venous outflow) pixel by pixel with
spatial context.

The input-to-hidden convolution is applied to all frames in one batched call
(it does not depend on the state); only the hidden-to-hidden convolutions run
per frame.
"""

from __future__ import annotations

import torch
from torch import nn


class ConvGRUCell(nn.Module):
    """One ConvGRU layer: h' = (1 - z) * h + z * tanh(Wx x + Wh (r * h))."""

    def __init__(self, in_channels: int, hidden_channels: int, kernel_size: int = 3):
        super().__init__()
        pad = kernel_size // 2
        self.hidden_channels = hidden_channels
        self.conv_x = nn.Conv2d(in_channels, 3 * hidden_channels, kernel_size, padding=pad)
        self.conv_h_gates = nn.Conv2d(
            hidden_channels, 2 * hidden_channels, kernel_size, padding=pad, bias=False
        )
        self.conv_h_cand = nn.Conv2d(
            hidden_channels, hidden_channels, kernel_size, padding=pad, bias=False
        )

    def input_projection(self, x: torch.Tensor) -> torch.Tensor:
        """Wx x for (N, C, H, W); batch all frames through this once."""
        return self.conv_x(x)

    def step(self, xp: torch.Tensor, h: torch.Tensor | None) -> torch.Tensor:
        """One update from a projected input ``xp`` (N, 3C, H, W) and state ``h`` (or None)."""
        xz, xr, xn = torch.split(xp, self.hidden_channels, dim=1)
        if h is None:
            z, n = torch.sigmoid(xz), torch.tanh(xn)
            return z * n
        hz, hr = torch.split(self.conv_h_gates(h), self.hidden_channels, dim=1)
        z = torch.sigmoid(xz + hz)
        r = torch.sigmoid(xr + hr)
        n = torch.tanh(xn + self.conv_h_cand(r * h))
        return h + z * (n - h)

    def forward(self, seq: torch.Tensor, reverse: bool = False) -> torch.Tensor:
        """Run over (B, T, C, H, W); returns every hidden state (B, T, C_h, H, W)."""
        b, t = seq.shape[:2]
        xp = self.input_projection(seq.flatten(0, 1)).unflatten(0, (b, t))
        order = range(t - 1, -1, -1) if reverse else range(t)
        h: torch.Tensor | None = None
        states: list[torch.Tensor] = [seq.new_empty(0)] * t
        for i in order:
            h = self.step(xp[:, i], h)
            states[i] = h
        return torch.stack(states, dim=1)


class ConvGRU(nn.Module):
    """Stacked ConvGRU layers; returns every hidden state of the last layer."""

    def __init__(
        self, in_channels: int, hidden_channels: int, num_layers: int = 2, kernel_size: int = 3
    ):
        super().__init__()
        self.layers = nn.ModuleList(
            ConvGRUCell(in_channels if i == 0 else hidden_channels, hidden_channels, kernel_size)
            for i in range(num_layers)
        )

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            seq = layer(seq)
        return seq


class BiConvGRU(nn.Module):
    """Bidirectional ConvGRU whose two directions are fused by a 1x1 convolution and tanh.

    Every output frame sees the whole run (past and future), which a single
    direction cannot give the first frames.
    """

    def __init__(self, in_channels: int, hidden_channels: int, kernel_size: int = 3):
        super().__init__()
        self.forward_cell = ConvGRUCell(in_channels, hidden_channels, kernel_size)
        self.backward_cell = ConvGRUCell(in_channels, hidden_channels, kernel_size)
        self.fuse = nn.Conv2d(2 * hidden_channels, hidden_channels, 1)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        fwd = self.forward_cell(seq)
        bwd = self.backward_cell(seq, reverse=True)
        both = torch.cat([fwd, bwd], dim=2)
        b, t = both.shape[:2]
        return torch.tanh(self.fuse(both.flatten(0, 1))).unflatten(0, (b, t))
