"""Renderings any PACS viewer shows: grey to RGB, mask overlays, colour maps with a
colour bar, and burned-in labels. Pure numpy plus Pillow for text.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

AI_LABEL = "AI OUTPUT - RESEARCH USE - NOT FOR DIAGNOSIS UNLESS VALIDATED"


def to_grey_rgb(image: np.ndarray, lo_pct: float = 0.5, hi_pct: float = 99.5) -> np.ndarray:
    """Window a float image by percentiles into RGB uint8 (H, W, 3)."""
    finite = np.isfinite(image)
    if not finite.any():
        return np.zeros((*image.shape, 3), np.uint8)
    lo, hi = np.percentile(image[finite], [lo_pct, hi_pct])
    scaled = np.clip((np.where(finite, image, lo) - lo) / max(hi - lo, 1e-6), 0, 1)
    grey = (scaled * 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def overlay(
    base_rgb: np.ndarray,
    masks: Sequence[np.ndarray],
    colors: Sequence[tuple[int, int, int]],
    alpha: float = 0.55,
) -> np.ndarray:
    """Blend binary masks over an RGB image; later masks are drawn over earlier ones."""
    out = base_rgb.astype(np.float32)
    for mask, color in zip(masks, colors, strict=True):
        m = mask.astype(bool)
        out[m] = (1 - alpha) * out[m] + alpha * np.asarray(color, np.float32)
    return np.clip(out, 0, 255).astype(np.uint8)


def _lut(name: str) -> np.ndarray:
    """256-entry RGB colour scales. 'perfusion' is the rainbow scale of perfusion
    consoles (black-blue-green-yellow-red-white)."""
    stops = {
        "perfusion": [
            (0.0, (0, 0, 0)),
            (0.15, (0, 0, 180)),
            (0.35, (0, 160, 255)),
            (0.5, (0, 200, 0)),
            (0.7, (255, 255, 0)),
            (0.88, (255, 0, 0)),
            (1.0, (255, 255, 255)),
        ],
        "hot": [(0.0, (0, 0, 0)), (0.4, (230, 0, 0)), (0.8, (255, 230, 0)), (1.0, (255, 255, 255))],
    }[name]
    xs = np.linspace(0, 1, 256)
    pos = [s[0] for s in stops]
    return np.stack(
        [np.interp(xs, pos, [s[1][c] for s in stops]) for c in range(3)], axis=-1
    ).astype(np.uint8)


def colorize(
    values: np.ndarray,
    vmin: float,
    vmax: float,
    valid: np.ndarray | None = None,
    cmap: str = "perfusion",
    background: np.ndarray | None = None,
) -> np.ndarray:
    """Map values onto a colour scale; invalid pixels show ``background`` (RGB) or black."""
    lut = _lut(cmap)
    scaled = np.clip((np.nan_to_num(values, nan=vmin) - vmin) / max(vmax - vmin, 1e-12), 0, 1)
    rgb = lut[(scaled * 255).astype(np.uint8)]
    if valid is not None:
        bg = background if background is not None else np.zeros_like(rgb)
        rgb = np.where(valid[..., None], rgb, bg)
    return rgb


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def burn_text(rgb: np.ndarray, lines: Sequence[str], corner: str = "top-left") -> np.ndarray:
    """Burn text lines into an RGB image on a dark band so it reads on any background."""
    height, width = rgb.shape[:2]
    img = Image.fromarray(rgb)
    draw = ImageDraw.Draw(img)
    size = max(8, min(28, width // 40))
    font = _font(size)
    longest = max(lines, key=len, default="")
    while size > 7 and draw.textlength(longest, font=font) > width - 8:
        size -= 1
        font = _font(size)
    pad = max(2, size // 4)
    y = pad if corner.startswith("top") else height - pad - len(lines) * (size + pad)
    for line in lines:
        box = draw.textbbox((0, 0), line, font=font)
        w = box[2] - box[0]
        x = pad if corner.endswith("left") else width - w - 2 * pad
        draw.rectangle((x, y, x + w + 2 * pad, y + size + pad), fill=(0, 0, 0))
        draw.text((x + pad, y), line, fill=(255, 255, 255), font=font)
        y += size + pad
    return np.asarray(img)


def colorbar(
    rgb: np.ndarray, vmin: float, vmax: float, unit: str, title: str, cmap: str = "perfusion"
) -> np.ndarray:
    """Append a vertical colour bar with tick labels and units on the right."""
    height = rgb.shape[0]
    bar_w = max(60, height // 6)
    panel = np.zeros((height, bar_w, 3), np.uint8)
    top, bottom = height // 8, height - height // 8
    ramp = np.linspace(1, 0, bottom - top)
    panel[top:bottom, 6 : 6 + bar_w // 4] = _lut(cmap)[(ramp * 255).astype(np.uint8)][:, None, :]
    img = Image.fromarray(panel)
    draw = ImageDraw.Draw(img)
    size = max(9, min(18, height // 40))
    font = _font(size)
    for frac in (0.0, 0.5, 1.0):
        y = bottom - frac * (bottom - top) - size / 2
        draw.text(
            (10 + bar_w // 4, y),
            f"{vmin + frac * (vmax - vmin):.3g}",
            fill=(255, 255, 255),
            font=font,
        )
    draw.text((4, max(0, top - 2 * size - 4)), title, fill=(255, 255, 255), font=font)
    draw.text((4, min(height - size - 2, bottom + 4)), unit, fill=(255, 255, 255), font=font)
    return np.concatenate([rgb, np.asarray(img)], axis=1)


def _wrap(
    draw: ImageDraw.ImageDraw,
    text: str,
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
    width: int,
    most: int,
) -> list[str]:
    """Greedy word wrap into at most ``most`` lines of ``width`` pixels; an ellipsis
    ends a text that does not fit."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        trial = f"{current} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not current:
            current = trial
            continue
        lines.append(current)
        current = word
        if len(lines) == most:
            break
    else:
        lines.append(current)
        return lines[:most]
    lines[-1] = lines[-1].rstrip(" .,;:") + " ..."
    return lines[:most]


BANNER_RGB = (170, 0, 0)


def quality_panel(width: int, line: str, banner: str = "") -> np.ndarray:
    """A band (h, width, 3) to set under a rendering: the ``banner`` ("LOW CONFIDENCE:
    reason") white on red when there is one, then the quality ``line``, wrapped to the
    width; below the image, so it never hides a pixel of the result."""
    size = max(9, min(18, width // 45))
    font = _font(size)
    pad = max(2, size // 4)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    usable = width - 2 * pad
    banner_lines = _wrap(probe, banner, font, usable, 3) if banner else []
    text_lines = _wrap(probe, line, font, usable, 3) if line else []
    rows = banner_lines + text_lines
    step = size + pad
    height = pad + step * max(1, len(rows))
    img = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(img)
    if banner_lines:
        draw.rectangle((0, 0, width, pad // 2 + step * len(banner_lines)), fill=BANNER_RGB)
    y = pad // 2
    for text in rows:
        draw.text((pad, y), text, fill=(255, 255, 255), font=font)
        y += step
    return np.asarray(img)
