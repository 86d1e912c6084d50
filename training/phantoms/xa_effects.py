"""What a real 2D run carries besides anatomy: shutters, detector gain, text, lossy storage.

Used by the randomised ``dsa`` and ``coronary`` phantoms (see ``priors``):

- Collimator shutters (rectangular, polygonal, circular, circular with
  rectangular) attenuate the primary beam outside the exposed field, with a
  penumbra, and are recorded in the Display Shutter module (Shutter Shape,
  edges, Center/Radius of Circular Shutter, Vertices of the Polygonal
  Shutter; pixel coordinates, 1-based, rows first).
- Detector gain: vignetting, the anode heel gradient and aliased anti-scatter
  grid lines multiply the detected signal (so they cancel in a log
  subtraction, as on real systems, and stay in native and cine frames).
- Burned-in text and markers (patient details, angles, frame counter, L/R
  marker, ruler) are painted into stored pixels; Burned In Annotation YES.
- Lossy JPEG: frames are windowed to 8 bits and passed through baseline JPEG,
  as archives keep cine; Lossy Image Compression 01 with its ratio and method.

Truth convention: the truth masks are cleared outside the exposed field
(``truth['field']``): there is no image of a vessel behind a lead blade, and a
model must not learn to paint one. Pixels covered by burned-in text or markers
(``truth['overlay']``) are cleared too.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from scipy import ndimage
from skimage.draw import polygon2mask


@dataclass(frozen=True)
class Shutter:
    """Collimator shutter in DICOM pixel coordinates (1-based; (row, column) pairs).

    ``shapes`` holds one or more of RECTANGULAR, CIRCULAR, POLYGONAL; the
    exposed field is the intersection of the shapes' insides.
    """

    shapes: tuple[str, ...]
    rect: tuple[int, int, int, int] | None = None  # left, right, upper, lower
    centre: tuple[int, int] | None = None  # (row, column)
    radius: int | None = None
    vertices: tuple[tuple[int, int], ...] | None = None  # (row, column) per vertex

    def field(self, rows: int, cols: int) -> np.ndarray:
        """(rows, cols) bool: pixel centres inside every shape (the exposed field)."""
        r = np.arange(1, rows + 1)[:, None]
        c = np.arange(1, cols + 1)[None, :]
        inside = np.ones((rows, cols), bool)
        if "RECTANGULAR" in self.shapes and self.rect is not None:
            left, right, upper, lower = self.rect
            inside &= (c >= left) & (c <= right) & (r >= upper) & (r <= lower)
        if "CIRCULAR" in self.shapes and self.centre is not None and self.radius is not None:
            inside &= (r - self.centre[0]) ** 2 + (c - self.centre[1]) ** 2 <= self.radius**2
        if "POLYGONAL" in self.shapes and self.vertices is not None:
            verts = np.asarray(self.vertices, float) - 1.0
            inside &= polygon2mask((rows, cols), verts)
        return inside

    def write(self, ds: Dataset, presentation_value: int = 0) -> None:
        """The Display Shutter module attributes."""
        ds.ShutterShape = list(self.shapes)
        if self.rect is not None and "RECTANGULAR" in self.shapes:
            (
                ds.ShutterLeftVerticalEdge,
                ds.ShutterRightVerticalEdge,
                ds.ShutterUpperHorizontalEdge,
                ds.ShutterLowerHorizontalEdge,
            ) = self.rect
        if self.centre is not None and "CIRCULAR" in self.shapes:
            ds.CenterOfCircularShutter = list(self.centre)
            ds.RadiusOfCircularShutter = self.radius
        if self.vertices is not None and "POLYGONAL" in self.shapes:
            ds.VerticesOfThePolygonalShutter = [v for rc in self.vertices for v in rc]
        ds.ShutterPresentationValue = presentation_value


def draw_shutter(rng: np.random.Generator, rows: int, cols: int, kind: str) -> Shutter:
    """A shutter of ``kind`` (RECTANGULAR, POLYGONAL, CIRCULAR, CIRCULAR+RECTANGULAR)."""
    cr = rows / 2.0 + rng.uniform(-0.08, 0.08) * rows
    cc = cols / 2.0 + rng.uniform(-0.08, 0.08) * cols

    def rect() -> tuple[int, int, int, int]:
        hw = rng.uniform(0.3, 0.5) * cols
        hh = rng.uniform(0.3, 0.5) * rows
        return (
            int(np.clip(round(cc - hw), 1, cols)),
            int(np.clip(round(cc + hw), 1, cols)),
            int(np.clip(round(cr - hh), 1, rows)),
            int(np.clip(round(cr + hh), 1, rows)),
        )

    if kind == "RECTANGULAR":
        return Shutter(("RECTANGULAR",), rect=rect())
    if kind == "CIRCULAR" or kind == "CIRCULAR+RECTANGULAR":
        radius = int(round(rng.uniform(0.42, 0.62) * min(rows, cols)))
        centre = (int(round(cr)), int(round(cc)))
        if kind == "CIRCULAR":
            return Shutter(("CIRCULAR",), centre=centre, radius=radius)
        return Shutter(("CIRCULAR", "RECTANGULAR"), rect=rect(), centre=centre, radius=radius)
    # Polygonal: an octagon (rectangle with cut corners) or a rotated rectangle
    # of collimator blades, kept inside the image.
    hw, hh = rng.uniform(0.3, 0.48) * cols, rng.uniform(0.3, 0.48) * rows
    if rng.random() < 0.6:
        cut = rng.uniform(0.15, 0.4) * min(hw, hh)
        pts = [
            (-hh, -hw + cut),
            (-hh, hw - cut),
            (-hh + cut, hw),
            (hh - cut, hw),
            (hh, hw - cut),
            (hh, -hw + cut),
            (hh - cut, -hw),
            (-hh + cut, -hw),
        ]
    else:
        pts = [(-hh, -hw), (-hh, hw), (hh, hw), (hh, -hw)]
    th = np.deg2rad(rng.uniform(-25, 25))
    rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    xy = np.asarray(pts) @ rot.T
    verts = tuple(
        (int(np.clip(round(cr + dr), 1, rows)), int(np.clip(round(cc + dc), 1, cols)))
        for dr, dc in xy
    )
    return Shutter(("POLYGONAL",), vertices=verts)


def shutter_attenuation(field: np.ndarray, transmission: float, penumbra_px: float) -> np.ndarray:
    """Extra attenuation (-ln transmission) behind the blades, soft over the penumbra."""
    outside = (~field).astype(np.float64)
    if penumbra_px > 0.3:
        outside = ndimage.gaussian_filter(outside, penumbra_px, mode="nearest")
    return -np.log(transmission) * outside


def detector_gain(
    rows: int,
    cols: int,
    vignetting: float,
    heel: float,
    heel_angle: float,
    grid: tuple[float, float, int, float] | None,
) -> np.ndarray:
    """Multiplicative gain (rows, cols): vignetting, heel gradient, grid stripes (amp, cycles/px, axis, phase)."""
    r = (np.arange(rows) - (rows - 1) / 2.0)[:, None]
    c = (np.arange(cols) - (cols - 1) / 2.0)[None, :]
    half_diag = 0.5 * np.hypot(rows, cols)
    gain = 1.0 - vignetting * (r * r + c * c) / half_diag**2
    along = (np.cos(heel_angle) * c + np.sin(heel_angle) * r) / half_diag
    gain = gain * (1.0 + heel * along)
    if grid is not None:
        amp, freq, axis, phase = grid
        coord = np.arange(cols if axis == 1 else rows, dtype=float)
        stripes = 1.0 + amp * np.cos(2 * np.pi * freq * coord + phase)
        gain = gain * (stripes[None, :] if axis == 1 else stripes[:, None])
    return np.asarray(gain, np.float64)


def to_stored(values: np.ndarray, offset: float, gain: float, bits: int) -> np.ndarray:
    """Round offset + gain * values into 0..2**bits-1 (uint16)."""
    top = 2**bits - 1
    return np.clip(np.rint(offset + gain * values), 0, top).astype(np.uint16)


# --- burned-in text and markers ----------------------------------------------------------------


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def burn_in(
    frames: np.ndarray,
    rng: np.random.Generator,
    value: int,
    lines: list[str],
    counter: bool,
    marker: str | None,
    ruler_px: float | None,
) -> np.ndarray:
    """Paint text and markers into stored frames (T, H, W) in place; returns the overlay mask (H, W).

    ``lines`` go to two random corners; ``counter`` adds a frame counter that
    changes every frame; ``marker`` is an orientation letter; ``ruler_px`` the
    length of a 10 mm scale bar in pixels.
    """
    t, h, w = frames.shape
    size = max(9, int(round(h * rng.uniform(0.018, 0.032))))
    font = _font(size)
    static = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(static)
    corners = rng.permutation(4)
    pad = int(round(0.02 * min(h, w))) + 1

    def block(text_lines: list[str], corner: int, canvas: ImageDraw.ImageDraw) -> None:
        step = int(size * 1.25)
        for k, text in enumerate(text_lines):
            width = int(canvas.textlength(text, font=font))
            x = pad if corner in (0, 2) else w - pad - width
            y = pad + k * step if corner in (0, 1) else h - pad - (len(text_lines) - k) * step
            canvas.text((x, y), text, fill=255, font=font)

    half = (len(lines) + 1) // 2
    block(lines[:half], int(corners[0]), draw)
    block(lines[half:], int(corners[1]), draw)
    if marker:
        big = _font(size * 2)
        x = int(w * rng.uniform(0.05, 0.9))
        y = int(h * rng.uniform(0.3, 0.7)) if rng.random() < 0.5 else pad
        draw.text((x, y), marker, fill=255, font=big)
    if ruler_px is not None and ruler_px > 6:
        x0 = w - pad - int(ruler_px * 5) - 2 if rng.random() < 0.5 else pad
        y0 = int(h * rng.uniform(0.4, 0.9))
        draw.line([(x0, y0), (x0 + int(ruler_px * 5), y0)], fill=255, width=max(1, size // 10))
        for k in range(6):
            xk = x0 + int(round(k * ruler_px))
            tick = size // 2 if k % 5 == 0 else size // 4
            draw.line([(xk, y0 - tick), (xk, y0)], fill=255, width=max(1, size // 10))
    alpha_static = np.asarray(static, np.float32) / 255.0
    overlay = alpha_static > 0.25
    corner = int(corners[2])
    for k in range(t):
        alpha = alpha_static
        if counter:
            layer = Image.new("L", (w, h), 0)
            block([f"F {k + 1}/{t}"], corner, ImageDraw.Draw(layer))
            a_k = np.asarray(layer, np.float32) / 255.0
            overlay |= a_k > 0.25
            alpha = np.maximum(alpha_static, a_k)
        frames[k] = np.rint(frames[k] * (1.0 - alpha) + value * alpha).astype(frames.dtype)
    return overlay


def text_lines(rng: np.random.Generator, view: str, kvp: float, ma: float) -> list[str]:
    """Plausible annotation lines (no real names): an ID, a date, the view, the technique."""
    year, month, day = (
        2018 + int(rng.integers(0, 7)),
        int(rng.integers(1, 13)),
        1 + int(rng.integers(0, 28)),
    )
    lines = [
        f"ID {int(rng.integers(10**5, 10**7))}",
        f"{year}-{month:02d}-{day:02d} {int(rng.integers(7, 19)):02d}:{int(rng.integers(0, 60)):02d}",
        view,
        f"{kvp:.0f} kV {ma:.0f} mA",
    ]
    if rng.random() < 0.5:
        lines.append(f"Zoom {rng.choice(['16', '22', '32', '42'])} cm")
    return lines


# --- lossy JPEG --------------------------------------------------------------------------------


def jpeg_roundtrip(
    frames: np.ndarray, window: tuple[float, float], quality: int
) -> tuple[np.ndarray, float]:
    """Window stored frames to 8 bits and pass each through baseline JPEG.

    Returns the decoded 8-bit frames (as uint16 stored values) and the
    compression ratio against 16-bit storage of the original frames.
    """
    centre, width = window
    lo = centre - width / 2.0
    eight = np.clip(np.rint((frames.astype(np.float64) - lo) / width * 255.0), 0, 255)
    eight = eight.astype(np.uint8)
    out = np.empty(frames.shape, np.uint16)
    total = 0
    for k in range(len(frames)):
        buf = io.BytesIO()
        Image.fromarray(eight[k]).save(buf, format="JPEG", quality=int(quality))
        total += buf.tell()
        buf.seek(0)
        out[k] = np.asarray(Image.open(buf), np.uint8)
    ratio = frames[0].size * 2.0 * len(frames) / max(total, 1)
    return out, float(ratio)


@dataclass(frozen=True)
class Presentation:
    """How a randomised run is stored: bits, window, shutter, burned-in text, lossy history."""

    bits_stored: int  # the values' depth (8 after JPEG, 10, 12, 14, 16)
    window: tuple[float, float]
    shutter: Shutter | None = None
    shutter_value: int = 0
    burned_in: bool = False
    lossy_ratio: float | None = None
    # stored = offset + gain * log value (log-subtracted DSA, cine); None for linear data
    scale: tuple[float, float] | None = None

    def write(self, ds: Dataset) -> None:
        """Image Pixel, VOI LUT, Display Shutter and lossy-compression attributes."""
        # The XA IOD allows 8, 10, 12 and 16 bits stored: 14-bit detector data goes
        # into 16 bits stored with its values in 0..16383, as vendors store it.
        stored = 16 if self.bits_stored == 14 else self.bits_stored
        ds.BitsStored = stored
        ds.HighBit = stored - 1
        ds.WindowCenter = f"{self.window[0]:.0f}"
        ds.WindowWidth = f"{self.window[1]:.0f}"
        ds.BurnedInAnnotation = "YES" if self.burned_in else "NO"
        if self.lossy_ratio is not None:
            ds.LossyImageCompression = "01"
            ds.LossyImageCompressionRatio = f"{self.lossy_ratio:.2f}"
            ds.LossyImageCompressionMethod = "ISO_10918_1"
        if self.shutter is not None:
            self.shutter.write(ds, self.shutter_value)


def finish(
    pixels: np.ndarray,
    field: np.ndarray,
    app,
    rng: np.random.Generator,
    bits: int,
    window: tuple[float, float],
    grey: int,
    view: str,
    spacing_mm: float,
    lossy: bool = True,
    scale: tuple[float, float] | None = None,
) -> tuple[np.ndarray, np.ndarray, Presentation]:
    """Blank outside the shutter, burn in text and markers, pass through JPEG, as drawn in
    ``app`` (an ``appearance.XAAppearance``). Returns pixels, the overlay mask, presentation."""
    top = 2**bits - 1
    shutter_value = 0
    if app.blank is not None:
        shutter_value = {"black": 0, "white": top, "grey": grey}[app.blank]
        pixels[:, ~field] = shutter_value
    overlay = np.zeros(field.shape, bool)
    if app.text or app.marker:
        value = top if rng.random() < 0.8 else 0
        lines = []
        if app.text:
            lines = text_lines(rng, view, rng.uniform(70, 90), rng.uniform(200, 900))
        overlay = burn_in(
            pixels,
            rng,
            value,
            lines,
            counter=app.text and rng.random() < 0.6,
            marker=str(rng.choice(["L", "R"])) if app.marker else None,
            ruler_px=10.0 / spacing_mm if app.marker and rng.random() < 0.5 else None,
        )
    ratio = None
    if lossy and app.jpeg_quality is not None:
        pixels, ratio = jpeg_roundtrip(pixels, window, app.jpeg_quality)
        lo = window[0] - window[1] / 2.0
        shutter_value = int(np.clip(round((shutter_value - lo) / window[1] * 255), 0, 255))
        if scale is not None:
            scale = ((scale[0] - lo) / window[1] * 255.0, scale[1] / window[1] * 255.0)
        bits, window = 8, (128.0, 256.0)
    presentation = Presentation(
        bits_stored=bits,
        window=window,
        shutter=app.shutter,
        shutter_value=shutter_value,
        burned_in=bool(overlay.any()),
        lossy_ratio=ratio,
        scale=scale,
    )
    return pixels, overlay, presentation
