"""Frame timing for perfusion: acquisition times in seconds, checked, and a uniform grid.

Deconvolution needs samples on a uniform grid, because the convolution matrix
assumes one time step. DSA runs often change frame rate within the run (a fast
arterial phase, then a slow venous phase), so the curves are resampled by
linear interpolation onto a grid whose step is the run's short frame interval.
Timing is never guessed: a run without it is refused, and times that look like
milliseconds are refused rather than silently rescaled.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipelines.base import PipelineError, RunMeta

# A DSA frame interval longer than this is implausible; the usual cause is a
# Frame Time Vector in milliseconds passed on as seconds.
MAX_MEDIAN_INTERVAL_S = 5.0
# The grid never gets more samples than this (the block-circulant matrix is 2N x 2N).
MAX_GRID_SAMPLES = 160


@dataclass(frozen=True)
class Timing:
    """Acquisition times (relative to the first frame) and the uniform grid."""

    times_s: np.ndarray
    grid_s: np.ndarray
    step_s: float
    variable_rate: bool

    @property
    def resampled(self) -> bool:
        return len(self.grid_s) != len(self.times_s) or not np.allclose(self.grid_s, self.times_s)

    def describe(self) -> str:
        rate = "variable frame rate" if self.variable_rate else "constant frame rate"
        text = f"{len(self.times_s)} frames over {self.times_s[-1]:.2f} s ({rate})"
        if self.resampled:
            text += f", resampled to {len(self.grid_s)} samples every {self.step_s:.3f} s"
        return text


def acquisition_times(meta: RunMeta, frames: int) -> np.ndarray:
    """Frame times in seconds from the run metadata, relative to the first frame."""
    if meta.frame_times_s is None:
        why = meta.extra.get("timing_problem") or "the run carries no frame timing"
        raise PipelineError(
            f"{why}; perfusion analysis needs acquisition times (Frame Time Vector or "
            "Frame Time) and does not guess them"
        )
    times = np.asarray(meta.frame_times_s, dtype=np.float64).ravel()
    if len(times) != frames:
        raise PipelineError(f"the run has {frames} frames but {len(times)} frame times")
    if frames < 4:
        raise PipelineError(f"perfusion analysis needs at least 4 frames, the run has {frames}")
    if not np.all(np.isfinite(times)):
        raise PipelineError("the run's frame times contain non-finite values")
    intervals = np.diff(times)
    if np.any(intervals <= 0):
        first = int(np.argmax(intervals <= 0)) + 1
        raise PipelineError(f"frame times are not strictly increasing (at frame {first + 1})")
    median = float(np.median(intervals))
    if median > MAX_MEDIAN_INTERVAL_S:
        raise PipelineError(
            f"median frame interval {median:g} s is implausible for DSA (at most "
            f"{MAX_MEDIAN_INTERVAL_S:g} s); are the frame times in milliseconds?"
        )
    return times - times[0]


def uniform_grid(times_s: np.ndarray, max_samples: int = MAX_GRID_SAMPLES) -> Timing:
    """A uniform grid over the run with the step of its fast phase.

    The step is the 10th percentile of the frame intervals (robust to jitter in
    the recorded times), widened only if the grid would exceed ``max_samples``.
    """
    intervals = np.diff(times_s)
    median = float(np.median(intervals))
    variable = bool(np.ptp(intervals) > 0.1 * median)
    step = median if not variable else float(np.percentile(intervals, 10))
    span = float(times_s[-1])
    count = int(np.floor(span / step + 1e-6)) + 1
    if count > max_samples:
        count = max_samples
        step = span / (count - 1)
    grid = np.arange(count) * step
    if not variable and count == len(times_s):
        grid = times_s.copy()  # keep the recorded times: no interpolation at all
    return Timing(times_s=times_s, grid_s=grid, step_s=step, variable_rate=variable)


def resample(frames: np.ndarray, times_s: np.ndarray, grid_s: np.ndarray) -> np.ndarray:
    """Linear interpolation along axis 0 from ``times_s`` onto ``grid_s`` (any trailing shape)."""
    if len(grid_s) == len(times_s) and np.allclose(grid_s, times_s):
        return frames
    index = np.clip(np.searchsorted(times_s, grid_s, side="right") - 1, 0, len(times_s) - 2)
    weight = (grid_s - times_s[index]) / (times_s[index + 1] - times_s[index])
    weight = np.clip(weight, 0.0, 1.0).astype(frames.dtype)
    shape = (-1,) + (1,) * (frames.ndim - 1)
    return frames[index] * (1 - weight.reshape(shape)) + frames[index + 1] * weight.reshape(shape)
