"""Pixel shift: registering the mask of a native DSA run to its live frames.

The head moves between the mask and the fill (the patient swallows, or feels the
contrast), and a mask subtracted where it no longer lies leaves the skull's edges
in every subtracted frame. Angiography consoles correct this by shifting the mask
("pixel shift"); DICOM records the shift a console applied in Mask Sub-pixel Shift
(0028,6114), rows then columns, in pixels.

``estimate`` finds the translation of the mask that best matches the first live
frame after it (the one least filled with contrast): the variance of the log
difference of the two, smoothed (``SIGMA_PX``: quantum noise and anti-scatter grid
lines are not motion), inside the exposed field (a collimator's blades and
whatever else is fixed on the detector do not move with the head, and would pin
the match at zero). An integer search over +-``MAX_SHIFT`` of the image, then a
Nelder-Mead refinement to a twentieth of a pixel (``scipy.optimize``), on an image
of at most ``WORK_SIDE`` px. Iodine changes the live frame only where vessels
fill; the bone edges that dominate the difference move with the head.

The shift is used only when it is a real correction: at least ``MIN_SHIFT_PX``,
and the residual at least ``MIN_GAIN`` lower than unshifted. Rotation is not
corrected (nor can Mask Sub-pixel Shift record one); what a rotation leaves,
the perfusion pipeline's baseline and the quality checks see.

Collimator blades are fixed on the detector, and so is what lies outside the
exposed field: ``moved_mask`` leaves them where they are (a shifted blade edge
would be subtracted into a bright line along the field's edge).

Motion during the run (after the first live frame) is not followed: a per-frame
registration was built and measured (``bench.pixel_shift``, commit 4c8e3e2) and,
better on family A, made the vessel segmentations of generator family B worse.

Sign convention (as ``scipy.ndimage.shift``): a shift of (+1, 0) moves the mask's
content one row down, towards higher row numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage, optimize

from pipelines.shutter import detect, margin_px

MIN_SHIFT_PX = 0.2
MAX_SHIFT = 0.03  # of the larger side: 7.7 px at 256, 31 px at 1024 (head motion of mm)
MIN_GAIN = 0.10  # the residual must fall by at least this fraction
SIGMA_PX = 2.0  # smoothing of the working image
WORK_SIDE = 256  # the registration's image, block means of the run's
MIN_FIELD = 0.05  # of the working image, else no estimate
HALF_PX_SIMPLEX = np.array([[0.0, 0.0], [0.5, 0.0], [0.0, 0.5]])


@dataclass(frozen=True)
class Shift:
    rows: float
    columns: float
    source: str  # "header" or "estimated"
    residual_before: float = float("nan")
    residual_after: float = float("nan")

    def note(self) -> str:
        what = (
            "Mask Sub-pixel Shift of the header"
            if self.source == "header"
            else "estimated by registering the mask to the first live frame (variance of "
            f"their smoothed log difference {self.residual_before:.3g} -> "
            f"{self.residual_after:.3g})"
        )
        return (
            f"mask shifted by ({self.rows:+.2f}, {self.columns:+.2f}) px (rows, columns) "
            f"before subtraction: {what}"
        )


def shifted(image: np.ndarray, rows: float, columns: float) -> np.ndarray:
    """``image`` (2D) translated by (rows, columns) px, linear interpolation, edges
    continued."""
    if rows == 0 and columns == 0:
        return image
    return ndimage.shift(image, (rows, columns), order=1, mode="nearest")


def exposed(mask: np.ndarray, live: np.ndarray, field: np.ndarray | None = None) -> np.ndarray:
    """The exposed field of a native run: the collimation found in the mask and a live
    frame, intersected with ``field`` (the DICOM shutter) where known."""
    found = detect(np.stack([mask, live]).astype(np.float32), subtracted=False)
    inside = np.ones(mask.shape, bool)
    for f in (field, found):
        if f is not None and f.shape == inside.shape:
            inside &= f
    return inside


def moved_mask(
    mask: np.ndarray, rows: float, columns: float, field: np.ndarray | None
) -> np.ndarray:
    """The mask shifted by (rows, columns) where the head is, and as stored where the
    detector's own structures are: outside the exposed ``field`` and within the
    shift's reach of its edge. Collimator blades are fixed on the detector and do not
    move with the head: a shifted blade edge would be subtracted into a bright line
    along the field's edge, which vessel paths take for a vessel."""
    if rows == 0 and columns == 0:
        return mask
    out = shifted(mask, rows, columns)
    if field is None or field.all():
        return out
    reach = math.ceil(math.hypot(rows, columns)) + 1
    inner = ndimage.binary_erosion(field, iterations=reach, border_value=1)
    return np.where(inner, out, mask)


def _log(image: np.ndarray) -> np.ndarray:
    return np.log1p(np.maximum(np.asarray(image, np.float64), 0.0))


def _blocks(image: np.ndarray, k: int) -> np.ndarray:
    h, w = (image.shape[0] // k) * k, (image.shape[1] // k) * k
    return image[:h, :w].reshape(h // k, k, w // k, k).mean(axis=(1, 3))


def estimate(mask: np.ndarray, live: np.ndarray, field: np.ndarray | None = None) -> Shift | None:
    """The shift that registers ``mask`` to ``live`` (2D detector values, before any
    subtraction), or None when no shift would be a real correction (see the
    module's docstring). ``field``: the exposed field (``exposed``, which a caller
    that also needs it for ``moved_mask`` computes once); None: found here."""
    if mask.shape != live.shape or mask.ndim != 2 or min(mask.shape) < 32:
        return None
    k = max(1, math.ceil(max(mask.shape) / WORK_SIDE))
    m, lv = _blocks(_log(mask), k), _blocks(_log(live), k)
    if not (np.isfinite(m).all() and np.isfinite(lv).all()):
        return None
    inside = field if field is not None and field.shape == mask.shape else exposed(mask, live)
    reach = max(1, math.ceil(MAX_SHIFT * max(m.shape)))
    inside = _blocks(inside.astype(np.float32), k) == 1.0
    inside = ndimage.binary_erosion(
        inside, iterations=math.ceil(margin_px(mask.shape) / k) + reach + 2, border_value=0
    )
    if inside.mean() < MIN_FIELD:
        return None
    ms, ls = ndimage.gaussian_filter(m, SIGMA_PX), ndimage.gaussian_filter(lv, SIGMA_PX)

    def residual(s: np.ndarray | tuple[float, float]) -> float:
        return float((ls - shifted(ms, float(s[0]), float(s[1])))[inside].var())

    before = residual((0.0, 0.0))
    grid = range(-reach, reach + 1)
    # the best whole shift; among equal ones, the smallest
    start = min((residual((a, b)), a * a + b * b, a, b) for a in grid for b in grid)
    x0 = np.array(start[2:], float)
    fit = optimize.minimize(
        residual,
        x0=x0,
        method="Nelder-Mead",
        # a half-pixel simplex around the best whole shift; 1/20 px at the end
        options={"xatol": 0.05, "fatol": 1e-12, "initial_simplex": x0 + HALF_PX_SIMPLEX},
    )
    dr, dc = (float(v) * k for v in fit.x)
    after = float(fit.fun)
    if np.hypot(dr, dc) < MIN_SHIFT_PX or not after < (1.0 - MIN_GAIN) * before:
        return None
    if max(abs(dr), abs(dc)) > (reach + 1) * k:  # ran off the searched range
        return None
    return Shift(round(dr, 2), round(dc, 2), "estimated", before, after)
