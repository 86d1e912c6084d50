"""Anatomy that drifts after the mask: a subtraction edge pattern that grows over the run.

When the head moves after the mask frame, each subtracted frame holds, besides
the iodine, the difference of the anatomy with itself shifted: edges of bone
and skin whose contrast grows with the displacement. A patient who relaxes,
swallows or reacts to the contrast drifts to a new position and stays there,
so to first order the edge pattern is one image ``A`` scaled by how far the
drift has gone in each frame, ``r_k`` (0 at the mask, 1 at the end of the
run): ``signal_k = iodine_k + r_k * A``.

``drift`` estimates both from the run itself:

- ``A`` is the mean of the last frames (the drift has ended there) less the
  first frame (the mask's time);
- ``r_k`` is the least-squares weight of each frame's fine detail (a Gaussian
  high-pass) on that pattern's fine detail, over the pixels where the pattern's
  detail is strongest: those are the edges, where iodine, which is smooth in
  the tissue and localised in the vessels, contributes little.

Subtracting ``r_k * A`` also subtracts the iodine still present in the last
frames, scaled by ``r_k``: it shortens the tail of slow tissue curves. The
pipeline therefore tries the corrected signal only on a run whose maps show
misregistration, and keeps it only when it takes out most of the area
brighter than the mask (see ``DsaPerfusion._drift_corrected``; figures in
docs/perfusion.md, step 2).

What it does not model: motion that comes back (the pattern is then not
the last frames'), several independent movements, and through-plane motion.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

# The last frames hold the drifted pattern: this share of the run, at least 2 frames.
TAIL_SHARE = 0.15
# Fine detail: the frame less its Gaussian blur of this sigma (pixels).
DETAIL_SIGMA_PX = 2.0
# The edges: this share of the field's pixels with the strongest pattern detail.
EDGE_SHARE = 0.05


@dataclass(frozen=True)
class Drift:
    """The estimated edge pattern and its weight per frame."""

    pattern: np.ndarray  # (H, W) signal units: the drift's subtraction edges at the end
    weights: np.ndarray  # (T,) 0 at the mask's time, about 1 once the drift has ended
    tail_frames: int

    def corrected(self, signal: np.ndarray) -> np.ndarray:
        """``signal`` (T, H, W) less the pattern scaled per frame (a new array)."""
        out = signal.astype(np.float32, copy=True)
        for k, w in enumerate(self.weights):
            out[k] -= np.float32(w) * self.pattern
        return out

    def describe(self, times_s: np.ndarray) -> str:
        half = np.flatnonzero(self.weights >= 0.5)
        when = f"half of it by {float(times_s[half[0]]):.1f} s" if half.size else "small"
        return (
            "anatomy drift after the mask corrected: the subtraction edges of the last "
            f"{self.tail_frames} frames, scaled per frame by the drift's progress ({when})"
        )


def _detail(image: np.ndarray) -> np.ndarray:
    return image - ndimage.gaussian_filter(image, DETAIL_SIGMA_PX)


def drift(signal: np.ndarray, field: np.ndarray | None = None) -> Drift | None:
    """The drift pattern and weights of ``signal`` (T, H, W), or None (too short, flat).

    ``field``: the exposed field (H, W); edges are looked for inside it only.
    """
    frames = signal.shape[0]
    if frames < 4:
        return None
    tail = max(2, int(round(TAIL_SHARE * frames)))
    first = signal[0].astype(np.float32)
    pattern = signal[-tail:].astype(np.float32).mean(axis=0) - first
    detail = _detail(pattern)
    where = field if field is not None and field.any() else np.ones(detail.shape, bool)
    magnitude = np.abs(detail[where])
    edges = where & (np.abs(detail) >= np.quantile(magnitude, 1.0 - EDGE_SHARE))
    basis = detail[edges]
    energy = float(np.dot(basis, basis))
    if not np.isfinite(energy) or energy <= 0:
        return None
    weights = np.array(
        [float(np.dot(_detail(signal[k] - first)[edges], basis)) / energy for k in range(frames)]
    )
    return Drift(pattern=pattern, weights=weights, tail_frames=tail)
