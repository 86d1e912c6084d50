"""Fractal textures, collimator shutters and burned-in annotations for family B.

Anatomical texture (trabecular and diploic bone, lung parenchyma, brain) is
drawn as fractional Brownian noise: white noise shaped in Fourier space to a
power spectrum 1/f^beta (beta about 2-3.5 for natural textures; Heine and
Velthuizen, Med Phys 2002, for breast and lung), a different background
model from family A's ellipsoid primitives.

Shutters are the collimator blades a technologist closes to the region of
interest (rectangular, circular, or polygonal with cut corners on cardiac
systems). Burned-in text is what exported runs carry in their pixels: patient
and date strings, frame counters, a side marker and a scale bar.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def fractal(shape: tuple[int, ...], beta: float, rng: np.random.Generator) -> np.ndarray:
    """Zero-mean, unit-SD noise with power spectrum 1/f^beta (2D or 3D)."""
    white = rng.normal(size=shape)
    spec = np.fft.rfftn(white)
    freqs = np.meshgrid(
        *[np.fft.fftfreq(n) for n in shape[:-1]], np.fft.rfftfreq(shape[-1]), indexing="ij"
    )
    f = np.sqrt(sum(q * q for q in freqs))
    f[(0,) * len(shape)] = 1.0
    spec *= f ** (-beta / 2.0)
    spec[(0,) * len(shape)] = 0.0
    out = np.fft.irfftn(spec, s=shape, axes=tuple(range(len(shape))))
    return ((out - out.mean()) / max(float(out.std()), 1e-12)).astype(np.float32)


@dataclass(frozen=True)
class Shutter:
    """A collimated field: ``shape`` RECTANGULAR, CIRCULAR or POLYGONAL (DICOM terms).

    Coordinates are in pixels, (row, column), 1-based as the Display Shutter
    module writes them. ``recorded`` says whether the run's header carries it.
    """

    shape: str
    rect: tuple[int, int, int, int] | None = None  # left, right, upper, lower edges
    centre: tuple[int, int] | None = None
    radius: int | None = None
    vertices: tuple[tuple[int, int], ...] = ()
    recorded: bool = True

    def field(self, rows: int, cols: int) -> np.ndarray:
        """(rows, cols) bool: inside the open field."""
        rr, cc = np.mgrid[1 : rows + 1, 1 : cols + 1]
        if self.shape == "RECTANGULAR":
            left, right, upper, lower = self.rect  # type: ignore[misc]
            return (cc >= left) & (cc <= right) & (rr >= upper) & (rr <= lower)
        if self.shape == "CIRCULAR":
            r0, c0 = self.centre  # type: ignore[misc]
            return (rr - r0) ** 2 + (cc - c0) ** 2 <= self.radius**2  # type: ignore[operator]
        img = Image.new("1", (cols, rows), 0)
        ImageDraw.Draw(img).polygon([(c - 1, r - 1) for r, c in self.vertices], fill=1)
        return np.asarray(img, bool)


def draw_shutter(rows: int, cols: int, rng: np.random.Generator) -> Shutter | None:
    """A collimator setting: open (None) in about a quarter of runs."""
    kind = rng.choice(["none", "rect", "circle", "polygon"], p=[0.25, 0.35, 0.15, 0.25])
    recorded = bool(rng.random() < 0.6)
    if kind == "none":
        return None
    if kind == "rect":
        left = int(rng.uniform(0.0, 0.15) * cols) + 1
        right = cols - int(rng.uniform(0.0, 0.15) * cols)
        upper = int(rng.uniform(0.0, 0.12) * rows) + 1
        lower = rows - int(rng.uniform(0.0, 0.12) * rows)
        return Shutter("RECTANGULAR", rect=(left, right, upper, lower), recorded=recorded)
    if kind == "circle":
        centre = (
            int(rows / 2 + rng.uniform(-0.05, 0.05) * rows),
            int(cols / 2 + rng.uniform(-0.05, 0.05) * cols),
        )
        radius = int(rng.uniform(0.47, 0.62) * min(rows, cols))
        return Shutter("CIRCULAR", centre=centre, radius=radius, recorded=recorded)
    # Octagon-like: a rectangle whose corners are cut at 45 degrees.
    top, bottom = int(rng.uniform(0.0, 0.08) * rows) + 1, rows - int(rng.uniform(0, 0.08) * rows)
    left, right = int(rng.uniform(0.0, 0.08) * cols) + 1, cols - int(rng.uniform(0, 0.08) * cols)
    cut = int(rng.uniform(0.12, 0.28) * min(rows, cols))
    verts = (
        (top, left + cut),
        (top, right - cut),
        (top + cut, right),
        (bottom - cut, right),
        (bottom, right - cut),
        (bottom, left + cut),
        (bottom - cut, left),
        (top + cut, left),
    )
    return Shutter("POLYGONAL", vertices=verts, recorded=recorded)


def soft_field(field: np.ndarray, edge_px: float) -> np.ndarray:
    """Blade penumbra: the field mask with a linear ramp of ``edge_px`` at its border."""
    from scipy import ndimage

    inside = ndimage.distance_transform_edt(field)
    outside = ndimage.distance_transform_edt(~field)
    signed = np.where(field, inside - 0.5, 0.5 - outside)
    return np.clip(0.5 + signed / max(edge_px, 1e-3), 0.0, 1.0).astype(np.float32)


def annotation(
    rows: int, cols: int, lines_tl: list[str], lines_br: list[str], marker: str, scale_px: int
) -> np.ndarray:
    """(rows, cols) float mask in [0, 1] of burned-in text, a side marker and a scale bar."""
    img = Image.new("L", (cols, rows), 0)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    y = 3
    for line in lines_tl:
        draw.text((4, y), line, fill=255, font=font)
        y += 12
    y = rows - 14 * len(lines_br) - 2
    for line in lines_br:
        w = draw.textlength(line, font=font)
        draw.text((cols - 4 - w, y), line, fill=255, font=font)
        y += 14
    draw.text((cols - 16, 4), marker, fill=255, font=font)
    # Scale bar with ticks on the left edge, mid-height.
    x0, y0 = 6, rows // 2 - scale_px // 2
    draw.line([(x0, y0), (x0, y0 + scale_px)], fill=255, width=1)
    for k in range(6):
        yy = y0 + int(k * scale_px / 5)
        draw.line([(x0, yy), (x0 + 4, yy)], fill=255, width=1)
    return np.asarray(img, np.float32) / 255.0


def jpeg_roundtrip(frame8: np.ndarray, quality: int) -> np.ndarray:
    """One 8-bit frame through baseline JPEG (lossy), as some cine archives store runs."""
    import io

    buf = io.BytesIO()
    Image.fromarray(frame8).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    return np.asarray(Image.open(buf), np.uint8)
