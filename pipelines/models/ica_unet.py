"""``ica_unet``: a 2D U-Net for the ICA on the DSA MinIP.

As in the perfusion-DSA paper: 5 resolution levels, instance normalisation,
trained with cross-entropy plus soft Dice. The input is the MinIP as opacity
(``minip_opacity``), so the network sees the same scale whatever the detector's
background level; training and inference share that function.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipelines.models.package import architecture


def minip_opacity(minip: np.ndarray) -> np.ndarray:
    """MinIP (vessels dark) to opacity in about [0, 1]: background (the median) at 0,
    the densest vessels (99.9th percentile) at 1."""
    opacity = np.median(minip) - minip.astype(np.float32)
    top = float(np.percentile(opacity, 99.9))
    return np.clip(opacity / max(top, 1e-6), -0.5, 2.0).astype(np.float32)


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.InstanceNorm2d(c_out, affine=True),
        nn.LeakyReLU(0.01, inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.InstanceNorm2d(c_out, affine=True),
        nn.LeakyReLU(0.01, inplace=True),
    )


class UNet(nn.Module):
    def __init__(
        self,
        in_channels: int = 1,
        classes: int = 2,
        width: int = 16,
        levels: int = 5,
        max_width: int = 320,
    ):
        super().__init__()
        widths = [min(width * 2**i, max_width) for i in range(levels)]
        self.levels = levels
        self.down = nn.ModuleList()
        c = in_channels
        for w in widths:
            self.down.append(_block(c, w))
            c = w
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        for w in reversed(widths[:-1]):
            self.up.append(nn.ConvTranspose2d(c, w, 2, stride=2))
            self.merge.append(_block(2 * w, w))
            c = w
        self.head = nn.Conv2d(c, classes, 1)

    @property
    def multiple(self) -> int:
        """Input sizes must be multiples of this."""
        return 2 ** (self.levels - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x)
            if i < self.levels - 1:
                skips.append(x)
                x = F.max_pool2d(x, 2)
        for up, merge in zip(self.up, self.merge, strict=True):
            x = up(x)
            x = merge(torch.cat([skips.pop(), x], dim=1))
        return self.head(x)


def predict_mask(
    model: UNet,
    minip: np.ndarray,
    device: str | torch.device = "cpu",
    max_side: int | None = None,
) -> np.ndarray:
    """Foreground mask (H, W) for one MinIP; pads to the network's multiple.

    ``max_side`` (the package's config): a MinIP whose longer side exceeds it is
    shrunk to it first, as in training (``training.tasks``), and the class scores are
    brought back to (H, W): the network finds the ICA at the scale it learned it.
    On CUDA the forward pass runs under autocast (half precision); on the CPU in float32.
    """
    from pipelines.preprocess import resize, work_shape

    device = torch.device(device)
    image = torch.as_tensor(minip_opacity(minip))[None, None]
    full = (int(image.shape[-2]), int(image.shape[-1]))
    if max_side:
        image = resize(image, work_shape(full, None, None, int(max_side)))
    height, width = image.shape[-2:]
    m = model.multiple
    pad_h, pad_w = (-height) % m, (-width) % m
    image = F.pad(image, (0, pad_w, 0, pad_h), mode="replicate").to(device)
    with torch.inference_mode(), torch.autocast(device.type, enabled=device.type == "cuda"):
        logits = model(image)[:, :, :height, :width].float()
    logits = resize(logits, full)
    return (logits.argmax(dim=1)[0] == 1).cpu().numpy()


@architecture("ica_unet")
def build(config: Mapping[str, Any]) -> nn.Module:
    return UNet(
        in_channels=int(config.get("in_channels", 1)),
        classes=int(config.get("classes", 2)),
        width=int(config.get("width", 16)),
        levels=int(config.get("levels", 5)),
        max_width=int(config.get("max_width", 320)),
    )
