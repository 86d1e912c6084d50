"""Renderings of the perfusion results for any viewer: colour maps with a colour bar,
and the AIF plotted next to the MinIP with the ICA outlined. numpy and Pillow only."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from pipelines.perfusion.aif import Aif
from pipelines.render import AI_LABEL, burn_text, colorbar, colorize, to_grey_rgb

OUTLINE_RGB = (255, 64, 64)
CURVE_RGB = (255, 220, 0)
ARRIVAL_RGB = (0, 200, 255)


def color_map(
    values: np.ndarray,
    valid: np.ndarray,
    minip: np.ndarray,
    title: str,
    unit: str,
    lines: list[str],
    vmin: float | None = None,
    vmax: float | None = None,
) -> np.ndarray:
    """A map in the perfusion colour scale over the grey MinIP, with colour bar and label."""
    inside = values[valid]
    if vmin is None:
        vmin = min(0.0, float(np.percentile(inside, 2))) if inside.size else 0.0
    if vmax is None:
        vmax = float(np.percentile(inside, 98)) if inside.size else 1.0
    if vmax <= vmin:
        vmax = vmin + 1.0
    rgb = colorize(values, vmin, vmax, valid, background=to_grey_rgb(minip))
    rgb = burn_text(rgb, [AI_LABEL, *lines])  # on the map, so the colour bar stays readable
    return colorbar(rgb, vmin, vmax, unit, title)


def _nice_step(span: float, ticks: int = 6) -> float:
    raw = span / max(ticks, 1)
    power = 10 ** np.floor(np.log10(raw))
    for mult in (1, 2, 5, 10):
        if mult * power >= raw:
            return float(mult * power)
    return float(10 * power)


def _plot(aif: Aif, size: int) -> np.ndarray:
    """The AIF on a square panel with axes, ticks and markers."""
    img = Image.new("RGB", (size, size), (0, 0, 0))
    draw = ImageDraw.Draw(img)
    font_size = max(9, size // 40)
    font = ImageFont.load_default(size=font_size)
    left, right = int(0.16 * size), int(0.95 * size)
    top, bottom = int(0.24 * size), int(0.86 * size)
    t = aif.grid_s
    y = aif.curve
    t_max = float(t[-1]) if t[-1] > 0 else 1.0
    y_lo = min(0.0, float(y.min()))
    y_hi = float(y.max()) * 1.08 if y.max() > 0 else 1.0

    def px(tt: float, yy: float) -> tuple[float, float]:
        return (
            left + (tt / t_max) * (right - left),
            bottom - (yy - y_lo) / (y_hi - y_lo) * (bottom - top),
        )

    draw.line([(left, top), (left, bottom), (right, bottom)], fill=(255, 255, 255), width=2)
    step = _nice_step(t_max)
    for tick in np.arange(0, t_max + 1e-9, step):
        x, _ = px(float(tick), y_lo)
        draw.line([(x, bottom), (x, bottom + font_size // 2)], fill=(255, 255, 255), width=1)
        draw.text(
            (x - font_size // 2, bottom + font_size // 2 + 2),
            f"{tick:g}",
            fill=(255, 255, 255),
            font=font,
        )
    for frac in (0.0, 0.5, 1.0):
        value = frac * aif.peak
        _, yy = px(0, value)
        draw.line([(left - font_size // 2, yy), (left, yy)], fill=(255, 255, 255), width=1)
        draw.text((4, yy - font_size // 2), f"{value:.3g}", fill=(255, 255, 255), font=font)
    for when, color, text in (
        (aif.arrival_s, ARRIVAL_RGB, f"arrival {aif.arrival_s:.2f} s"),
        (aif.peak_time_s, OUTLINE_RGB, f"peak {aif.peak_time_s:.2f} s"),
    ):
        if np.isfinite(when):
            x, _ = px(when, y_lo)
            for y0 in range(top, bottom, 8):
                draw.line([(x, y0), (x, min(y0 + 4, bottom))], fill=color, width=1)
            row = top - 2 * font_size if color == ARRIVAL_RGB else top - font_size
            draw.text((min(x + 3, right - 8 * font_size), row), text, fill=color, font=font)
    draw.line(
        [px(float(a), float(b)) for a, b in zip(t, y, strict=True)],
        fill=CURVE_RGB,
        width=max(2, size // 256),
    )
    for a, b in zip(t, y, strict=True):
        cx, cy = px(float(a), float(b))
        r = max(2, size // 200)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=CURVE_RGB)
    draw.text(
        (left, bottom + 2 * font_size),
        "time after first frame (s)",
        fill=(255, 255, 255),
        font=font,
    )
    draw.text(
        (4, top - 4 * font_size),
        "AIF: ICA mean concentration (a.u.)",
        fill=(255, 255, 255),
        font=font,
    )
    return np.asarray(img)


def aif_figure(minip: np.ndarray, ica: np.ndarray, aif: Aif, lines: list[str]) -> np.ndarray:
    """MinIP with the ICA mask outlined (left) and the AIF curve (right)."""
    base = to_grey_rgb(minip)
    edge = ica & ~ndimage.binary_erosion(ica)
    thickness = max(0, min(base.shape[:2]) // 512)
    if thickness:
        edge = ndimage.binary_dilation(edge, iterations=thickness)
    base[edge] = OUTLINE_RGB
    panel = _plot(aif, base.shape[0])
    return burn_text(np.concatenate([base, panel], axis=1), [AI_LABEL, *lines])
