"""Head drift after the mask in a subtracted run: its artefact, estimated and taken out.

A subtracted frame is the live frame minus the mask. When the head moves after
the mask, every live frame from then on holds the anatomy minus a displaced copy
of it: bone edges and the skull's diploic texture, in both signs, over the whole
head. Left in, it passes for vessels and for brain brighter than its mask, and
the perfusion maps lose that part of the brain (on randomised family A runs with
1.5 mm of drift, the maps covered 64 % of the perfused brain against 95 % without
drift).

A drift that ends where it stops (a patient relaxing, swallowing, reacting to the
contrast) leaves, to first order, one artefact image scaled by one course in
time: ``signal[k] ~ contrast[k] + course[k] * pattern``. Both are estimated
from the run:

- the pattern is the mean of the last frames minus the mean of the reference
  frames (below); besides the artefact it holds what contrast is left at the end,
  which is smooth and only darkens. So the pattern keeps the pattern's fine part
  (above ``DRIFT_DETAIL_MM``) and, of its smooth part, only what is brighter than
  the mask: iodine cannot make that;
- the course is, per frame, the median ratio of the frame's change from the
  reference frames to the pattern, fine parts only (a blush would pull it
  down while it lasts), at the pixels that end brighter than the mask by
  ``DRIFT_SD`` noise SD (iodine cannot make them either) where the pattern's
  fine part is strongest: 0 before the head moves, 1 at the end;
- the reference frames are pre-contrast frames over which the head held still:
  first those before the bolus (``aif.frames_before_bolus``); then, once the
  course is known and the bolus found again on the corrected signal (the drift's
  steps can hide its arrival), the earliest stretch of at least two pre-contrast
  frames over which the course stays within ``MAX_STILL_COURSE`` of its first
  frame, and the estimate is redone against them. A head that moved before the
  bolus arrived is measured against the frames before it moved (on synthetic
  drifts that start 0.5-2 s before the bolus, 12 of 12 are taken out, the
  course within 0.02 of the truth; 4 of 12 when every pre-contrast frame was the
  reference); a blank mask frame kept in the run, which holds none of the live
  frames' misregistration, is one frame and not a stretch;
- it is taken out only when such pixels cover at least ``DRIFT_MIN_SHARE`` of the
  exposed field, the bound beyond which the quality check calls the run
  misregistered (``quality.py``), and when such a stretch exists. A run that
  starts with contrast already in cannot tell a vessel emptying from an edge
  moving, and is left as it is.

The pipeline measures the drift on every run (``quality.HEADDRIFT``) and takes it
out only with its ``drift_correction`` option, off by default. On family A runs
with drift it gives back much of the brain and lowers the MTT and Tmax errors on
average, with a smooth drift (``dsa.generate(motion_kind="drift")``) and with one
that jerks (``"jerks"``: steps in their own directions, soft tissue stretching on a
course of its own), though on the latter not on every run. On family B, never used
to develop it, it gives back brain but raises the timing errors
(``bench.generalization``'s perfusion part at 256 px, 1.6.2: 5 of 10 runs
corrected, coverage 0.72 -> 0.79, Tmax MAE 0.58 -> 0.68 s, MTT MAE 1.65 -> 1.73 s;
BENCHMARKS.md, docs/perfusion.md step 2). Why is established for two of those runs
only (docs/perfusion.md step 2: a reference that held the arterial phase). Late contrast in
the pattern is not the main error on family A: on the five randomised family A runs
with 1.5 mm of drift that it corrects, the pattern's error correlates with the fine
part of the contrast left at the end at r = 0.08-0.27 (approximately: the same seed
without drift is not an exact twin). On the corrected signal the ICA rules took
another structure for the ICA on jerking development runs, so they look for it in
the run as measured (``pipeline.ica_and_aif``, since 1.6.2).

What it cannot take out: drift that does not end where it stops (the course is
one curve), a movement larger than the fine texture it shifts while it happens
(the artefact is then not proportional to the course), and non-rigid motion whose
parts move at different times. The run stays low confidence with the reason
(``quality.HEADDRIFT``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from pipelines.perfusion.aif import frames_before_bolus, smoothing_gain

# Pixels brighter than the mask at the end by this many noise SD of the pattern
# drive the course (the misregistration check's level, quality.py).
DRIFT_SD = 6.0
# Less of the exposed field than this brighter than the mask at the end is no drift
# (on motion-free randomised family A runs 0.01-2.3 %, with 0.5 mm of drift 6-22 %).
DRIFT_MIN_SHARE = 0.05
# The last tenth of the run (2 frames at least) is its end.
LATE_SHARE = 0.1
MIN_LATE_FRAMES = 2
# The pattern's smooth part is kept only where it is brighter than the mask:
# Gaussian sigma of the split, in mm (4 px at 512 px on the development runs).
DRIFT_DETAIL_MM = 1.5
DRIFT_DETAIL_PX = 4.0  # when the pixel spacing is unknown
# Noise is smoothed by a 1 px Gaussian where the drift is detected and its course
# measured (the pattern itself is taken out as measured).
SMOOTH_PX = 1.0
# The reference is a stretch of at least this many pre-contrast frames of the
# corrected run over which the course stays within MAX_STILL_COURSE of its first
# frame: the head still, and no contrast yet. A vessel emptying from the first
# frame on has a course that rises from the second frame (and one frame cannot
# show that).
MIN_STILL_FRAMES = 2
MAX_STILL_COURSE = 0.2
# The course is measured at this share of those pixels, where the pattern's fine
# part is strongest.
STRONG_SHARE = 0.5
# The course is clipped to this range: a frame far outside it is not drift.
COURSE_RANGE = (-0.5, 1.5)
MIN_FRAMES = 6
# Why a drift was left in.
OFF = "the drift_correction option is off"
UNSTILL = "fewer than two pre-contrast frames with the head still"


@dataclass(frozen=True)
class Drift:
    """What was found of a drift: the share of the exposed field that ends brighter
    than its mask by ``DRIFT_SD`` noise SD (0 when not measured: a run too short),
    and the course (T,) taken out, None when nothing was."""

    share: float
    course: np.ndarray | None = None
    pre_contrast: int = 0  # frames the pattern's reference was taken from
    times_s: np.ndarray | None = None
    left_in: str = ""  # why a drift over DRIFT_MIN_SHARE was not taken out

    def describe(self) -> str:
        """A note for the result, when the drift was taken out ("" otherwise)."""
        if self.course is None or self.times_s is None:
            return ""
        half = np.flatnonzero(self.course >= 0.5)
        when = f"{float(self.times_s[half[0]]):.1f} s" if half.size else "the end"
        return (
            f"head drift after the mask taken out: {100 * self.share:.1f} % of the exposed "
            f"field ended brighter than its mask; the drift reached half its extent at {when} "
            f"(artefact estimated from the last frames against {self.pre_contrast} "
            "pre-contrast frame(s))"
        )


def _ends(
    signal: np.ndarray, first: int, pre: int, sigma: float, field: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float] | None:
    """The run's end against the ``pre`` frames from ``first``: (difference as measured,
    reference and difference smoothed, pixels brighter than the mask by ``DRIFT_SD``
    noise SD, their share of ``field``); None when the run is too short."""
    count = signal.shape[0] - first
    late = max(MIN_LATE_FRAMES, int(round(LATE_SHARE * count)))
    if pre + late > count:
        return None
    raw_reference = signal[first : first + pre].mean(axis=0)
    raw_difference = signal[signal.shape[0] - late :].mean(axis=0) - raw_reference
    reference = ndimage.gaussian_filter(raw_reference, SMOOTH_PX)
    difference = ndimage.gaussian_filter(raw_difference, SMOOTH_PX)
    noise = sigma * np.sqrt(1.0 / pre + 1.0 / late) * smoothing_gain(SMOOTH_PX)
    brighter = (difference < -DRIFT_SD * noise) & field
    share = float(brighter.sum()) / max(float(field.sum()), 1.0)
    return raw_difference, reference, difference, brighter, share


def _share(signal: np.ndarray, start: int, pre: int, sigma: float, field: np.ndarray) -> float:
    """The share of ``field`` that ends brighter than the mask (0 for a run too short)."""
    ends = _ends(signal, start, pre, sigma, field)
    return 0.0 if ends is None else ends[-1]


def _estimate(
    signal: np.ndarray,
    start: int,
    first: int,
    pre: int,
    sigma: float,
    field: np.ndarray,
    detail_px: float,
) -> tuple[float, tuple[np.ndarray, np.ndarray] | None]:
    """(share, (course, pattern)) against the ``pre`` reference frames from ``first``,
    the course from frame ``start`` on; no course and pattern below
    ``DRIFT_MIN_SHARE``; share 0 when the run is too short."""
    ends = _ends(signal, first, pre, sigma, field)
    if ends is None:
        return 0.0, None
    raw_difference, reference, difference, brighter, share = ends
    if share < DRIFT_MIN_SHARE:
        return share, None
    # The course from the fine part only: a blush over those pixels is smooth and
    # would pull it down while it lasts. Per frame the median of the ratios at the
    # pixels where the pattern's fine part is strongest: the vessels crossing them
    # are few, but a least-squares fit follows them (a course 0.06 ahead of the
    # drift as the bolus arrived, on development seed 920010 at 256 px, and brain
    # that seemed to fill before its AIF).
    smooth = ndimage.gaussian_filter(difference, detail_px)
    fine_end = (difference - smooth)[brighter]
    strong = np.abs(fine_end) >= np.quantile(np.abs(fine_end), 1.0 - STRONG_SHARE)
    at = np.flatnonzero(brighter.ravel())[strong]
    weights = fine_end[strong]
    course = np.zeros(signal.shape[0], np.float32)
    for k in range(start, signal.shape[0]):
        change = ndimage.gaussian_filter(signal[k], SMOOTH_PX) - reference
        fine = (change - ndimage.gaussian_filter(change, detail_px)).ravel()[at]
        course[k] = float(np.median(fine / weights))
    course = np.clip(course, *COURSE_RANGE)
    # Subtracted as measured: smoothed, the pattern would leave the sharp part of
    # every edge (a third of the artefact on the unit test's skull).
    pattern = raw_difference - smooth + np.minimum(smooth, 0.0)
    return share, (course, pattern.astype(np.float32))


def _bolus_after(signal: np.ndarray, course: np.ndarray, pattern: np.ndarray) -> int:
    """``frames_before_bolus`` of the corrected signal, on the grid it samples anyway
    (every ``step``-th pixel; the same result without a corrected copy of the run)."""
    step = max(1, min(signal.shape[1:]) // 128)
    grid = (slice(None, None, step), slice(None, None, step))
    return frames_before_bolus(signal[(slice(None), *grid)] - course[:, None, None] * pattern[grid])


def _still(course: np.ndarray) -> tuple[int, int] | None:
    """(first, count): the earliest stretch of at least ``MIN_STILL_FRAMES`` frames of
    ``course`` over which it stays within ``MAX_STILL_COURSE`` of its first frame (the
    head still, nearest the mask); None when there is none."""
    first = 0
    for k in range(course.size + 1):
        if k == course.size or abs(float(course[k] - course[first])) > MAX_STILL_COURSE:
            if k - first >= MIN_STILL_FRAMES:
                return first, k - first
            first = k
    return None


def remove_drift(
    signal: np.ndarray,
    sigma: float,
    field: np.ndarray | None,
    spacing_mm: tuple[float, float] | None,
    start: int = 0,
    times_s: np.ndarray | None = None,
    apply: bool = True,
) -> tuple[np.ndarray, Drift]:
    """``signal`` (T, H, W; darkening positive) with the drift artefact taken out, and
    what was found; the signal itself when there is none to take out (see the
    module docstring) or ``apply`` is false (then the drift is only measured).
    ``start``: leading frames that are blank subtracted mask frames, left as they
    are. ``sigma``: the per-frame noise SD."""
    count = signal.shape[0] - start
    if signal.ndim != 3 or count < MIN_FRAMES or sigma <= 0:
        return signal, Drift(0.0)
    inside = field if field is not None else np.ones(signal.shape[1:], bool)
    detail_px = (
        DRIFT_DETAIL_MM / float(np.mean(spacing_mm))
        if spacing_mm is not None and min(spacing_mm) > 0
        else DRIFT_DETAIL_PX
    )
    pre = max(1, frames_before_bolus(signal[start:]))
    if not apply:
        return signal, Drift(_share(signal, start, pre, sigma, inside), left_in=OFF)
    share, found = _estimate(signal, start, start, pre, sigma, inside, detail_px)
    if found is None:
        return signal, Drift(share)
    course, pattern = found
    again = _bolus_after(signal[start:], course[start:], pattern)
    stretch = _still(course[start : start + again])
    if stretch is None:
        return signal, Drift(share, left_in=UNSTILL)
    first, still = start + stretch[0], stretch[1]
    if (first, still) != (start, pre):
        share, found = _estimate(signal, start, first, still, sigma, inside, detail_px)
        if found is None:
            return signal, Drift(share)
        course, pattern = found
        pre = still
    if np.abs(course[first : first + pre]).max() > MAX_STILL_COURSE:
        return signal, Drift(share, left_in=UNSTILL)
    corrected = signal - course[:, None, None] * pattern[None]
    times = times_s if times_s is not None else np.arange(signal.shape[0], dtype=float)
    return corrected.astype(np.float32, copy=False), Drift(share, course, pre, times)
