"""Augmentation on batches of tensors, identical for images and their labels.

Geometric (the seed papers' ranges): horizontal flip (p = 0.5), then with
p = 0.5 a shift of up to ±5% of the size, a scale of ±5% and a rotation of
±10°, as albumentations' ``ShiftScaleRotate(0.05, 0.05, 10)`` in the ST U-Net
code. One pixel-space transform per sample is applied to every tensor of that
sample, whatever its size, about the common centre: a DLA input slab with its
20-pixel context margin and its smaller label map stay aligned.

Labels are resampled nearest-neighbour; pixels that come from outside the
image carry no label (their ``valid`` becomes 0), so padding is never learned
as background.

Photometric: random contrast per frame for sequences (a gain per frame, since
dose and injection vary over a run), and the "strong" augmentation of
self-training (gain, offset, noise and blur per sample) applied on top of the
geometric "weak" one.

All randomness comes from a ``numpy.random.Generator`` the caller seeds, so a
training step is reproducible from (seed, rank, step).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Geometric:
    flip_p: float = 0.5
    affine_p: float = 0.5
    shift: float = 0.05  # fraction of the size
    scale: float = 0.05  # fraction
    rotate_deg: float = 10.0


@dataclass(frozen=True)
class Photometric:
    frame_gain: float = 0.2  # per-frame gain in [1 - g, 1 + g]
    gain: float = 0.25  # strong: per-sample gain
    offset: float = 0.1  # strong: per-sample additive offset (normalised contrast units)
    noise: float = 0.05  # strong: max Gaussian noise sigma
    blur_p: float = 0.3  # strong: probability of a Gaussian blur
    blur_sigma: float = 1.0


def sample_transforms(
    rng: np.random.Generator, n: int, params: Geometric = Geometric()
) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample (A, t): 2x2 linear part and shift (fraction of size), in (x, y) order.

    A maps output coordinates to input coordinates about the centre.
    """
    a = np.tile(np.eye(2), (n, 1, 1))
    t = np.zeros((n, 2))
    for i in range(n):  # per sample, not per pixel
        flip = rng.random() < params.flip_p
        if rng.random() < params.affine_p:
            angle = np.deg2rad(rng.uniform(-params.rotate_deg, params.rotate_deg))
            s = 1.0 + rng.uniform(-params.scale, params.scale)
            c, si = np.cos(angle), np.sin(angle)
            a[i] = np.array([[c, -si], [si, c]]) / s
            t[i] = rng.uniform(-params.shift, params.shift, 2)
        if flip:
            a[i] = a[i] @ np.diag([-1.0, 1.0])
    return a, t


def _theta(
    a: np.ndarray, t: np.ndarray, size: tuple[int, int], ref: tuple[int, int]
) -> torch.Tensor:
    """affine_grid matrices for tensors of ``size`` from the pixel-space transform.

    The shift is a fraction of the reference size, so tensors of different
    sizes move by the same number of pixels.
    """
    h, w = size
    half = np.array([w / 2.0, h / 2.0])
    scale = np.diag(half)
    inv = np.diag(1.0 / half)
    lin = inv[None] @ a @ scale[None]
    shift_px = t * np.array([ref[1], ref[0]])
    trans = shift_px / half
    theta = np.concatenate([lin, trans[:, :, None]], axis=2)
    return torch.as_tensor(theta, dtype=torch.float32)


def warp(x: torch.Tensor, theta: torch.Tensor, mode: str) -> torch.Tensor:
    """Resample (B, C, H, W) with per-sample affine ``theta``; zeros outside."""
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    out = F.grid_sample(x.float(), grid, mode=mode, padding_mode="zeros", align_corners=False)
    return out.to(x.dtype) if mode == "nearest" else out


def geometric(
    images: Sequence[torch.Tensor],
    labels: Sequence[torch.Tensor],
    rng: np.random.Generator,
    params: Geometric = Geometric(),
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Apply one random transform per sample to every (B, C, H, W) tensor given.

    ``images`` are interpolated bilinearly, ``labels`` (labels and valid masks)
    nearest-neighbour. Sizes may differ between tensors; the first image sets
    the reference for the shift.
    """
    n = images[0].shape[0]
    a, t = sample_transforms(rng, n, params)

    def size(x: torch.Tensor) -> tuple[int, int]:
        return int(x.shape[-2]), int(x.shape[-1])

    ref = size(images[0])
    out_i = [warp(x, _theta(a, t, size(x), ref), "bilinear") for x in images]
    out_l = [warp(y, _theta(a, t, size(y), ref), "nearest") for y in labels]
    return out_i, out_l


def frame_contrast(x: torch.Tensor, rng: np.random.Generator, amount: float = 0.2) -> torch.Tensor:
    """Multiply each frame of (B, T, H, W) sequences by its own gain in [1 - a, 1 + a]."""
    gains = rng.uniform(1.0 - amount, 1.0 + amount, size=x.shape[:2])
    g = torch.as_tensor(gains, dtype=x.dtype, device=x.device)
    return x * g.reshape(*x.shape[:2], *([1] * (x.dim() - 2)))


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(round(3 * sigma)))
    r = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (r / sigma) ** 2)
    return k / k.sum()


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of the last two axes of (B, C, H, W)."""
    k = _gaussian_kernel(sigma).to(x.device, x.dtype)
    c = x.shape[1]
    pad = len(k) // 2
    y = F.conv2d(
        F.pad(x, (pad, pad, 0, 0), mode="replicate"),
        k.reshape(1, 1, 1, -1).repeat(c, 1, 1, 1),
        groups=c,
    )
    return F.conv2d(
        F.pad(y, (0, 0, pad, pad), mode="replicate"),
        k.reshape(1, 1, -1, 1).repeat(c, 1, 1, 1),
        groups=c,
    )


def strong(
    x: torch.Tensor, rng: np.random.Generator, params: Photometric = Photometric()
) -> torch.Tensor:
    """Photometric 'strong' augmentation of (B, C, H, W) inputs: gain, offset, noise, blur."""
    b = x.shape[0]
    shape = (b,) + (1,) * (x.dim() - 1)
    gain = torch.as_tensor(rng.uniform(1 - params.gain, 1 + params.gain, b), dtype=x.dtype)
    offset = torch.as_tensor(rng.uniform(-params.offset, params.offset, b), dtype=x.dtype)
    sigma = rng.uniform(0, params.noise, b)
    noise_seed = int(rng.integers(0, 2**31 - 1))
    blur_mask = rng.random(b) < params.blur_p
    gen = torch.Generator().manual_seed(noise_seed)
    noise = torch.randn(x.shape, generator=gen, dtype=torch.float32).to(x.device, x.dtype)
    y = x * gain.reshape(shape).to(x.device) + offset.reshape(shape).to(x.device)
    y = y + noise * torch.as_tensor(sigma, dtype=x.dtype).reshape(shape).to(x.device)
    if blur_mask.any():
        idx = torch.as_tensor(np.flatnonzero(blur_mask), device=x.device)
        y[idx] = blur(y[idx], params.blur_sigma)
    return y
