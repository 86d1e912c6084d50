"""Frame timing for perfusion: acquisition times in seconds, checked, and a uniform grid.

Deconvolution needs samples on a uniform grid, because the convolution matrix
assumes one time step. DSA runs often change frame rate within the run (a fast
arterial phase, then a slow venous phase), so the curves are resampled by
linear interpolation onto a grid whose step is the run's short frame interval.
Timing is never guessed: a run without it is refused, and times that look like
milliseconds are refused rather than silently rescaled.

The grid curves are never stored for the whole run: interpolation and baseline
subtraction are linear in time, so :class:`Curves` keeps the acquired frames and
an (N, T) matrix, and expands blocks of pixels when they are used. Memory then
follows the acquired run, not the grid (a 1024^2 run of 30 frames over 28 s at a
0.25 s step would otherwise be 114 frames, 4x the run, per copy).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

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
            f"{why}; perfusion analysis needs acquisition times (Frame Time Vector, "
            "Frame Time, or each frame's Frame Acquisition DateTime) and does not guess them"
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


def resample_weights(times_s: np.ndarray, grid_s: np.ndarray) -> np.ndarray | None:
    """Linear interpolation from ``times_s`` onto ``grid_s`` as an (N, T) matrix;
    None when the grid is the acquisition times (nothing to interpolate)."""
    if len(grid_s) == len(times_s) and np.allclose(grid_s, times_s):
        return None
    index = np.clip(np.searchsorted(times_s, grid_s, side="right") - 1, 0, len(times_s) - 2)
    weight = (grid_s - times_s[index]) / (times_s[index + 1] - times_s[index])
    weight = np.clip(weight, 0.0, 1.0)
    rows = np.arange(len(grid_s))
    matrix = np.zeros((len(grid_s), len(times_s)))
    matrix[rows, index] = 1 - weight
    matrix[rows, index + 1] += weight
    return matrix


def resample(frames: np.ndarray, times_s: np.ndarray, grid_s: np.ndarray) -> np.ndarray:
    """Linear interpolation along axis 0 from ``times_s`` onto ``grid_s`` (any trailing shape).

    Materialises every grid sample; the pipeline uses :class:`Curves` instead."""
    weights = resample_weights(times_s, grid_s)
    if weights is None:
        return frames
    flat = frames.reshape(len(times_s), -1)
    out = weights.astype(frames.dtype) @ flat
    return out.reshape((len(grid_s), *frames.shape[1:]))


# Values per block when curves are expanded onto the grid (64 MB in float32).
BLOCK_VALUES = 1 << 24


@dataclass(frozen=True)
class Curves:
    """Curves on the uniform grid, (N, H, W), held as ``weights @ frames``: the
    acquired (T, H, W) float32 frames and an (N, T) matrix (None: the identity,
    the frames are the grid samples).

    Indexing works as on the (N, H, W) array it stands for and expands only what
    is asked for; ``blocks`` expands rows of pixels a block at a time.
    """

    frames: np.ndarray
    weights: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        t, h, w = self.frames.shape
        return (t if self.weights is None else len(self.weights), h, w)

    def _matrix(self) -> np.ndarray:
        if self.weights is None:
            return np.eye(self.frames.shape[0])
        return self.weights

    def minus_baseline(self, count: int) -> Curves:
        """Each curve minus its mean over the first ``count`` grid samples."""
        matrix = self._matrix()
        return Curves(self.frames, matrix - matrix[:count].mean(axis=0, keepdims=True))

    def minus_sample(self, index: int) -> Curves:
        """Each curve minus its value at grid sample ``index``."""
        matrix = self._matrix()
        return Curves(self.frames, matrix - matrix[index : index + 1])

    def __getitem__(self, key: Any) -> np.ndarray:
        if self.weights is None:
            return np.asarray(self.frames[key])
        first, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        weights = self.weights[first].astype(np.float32)
        data = self.frames[(slice(None), *rest)]
        flat = data.reshape(data.shape[0], -1)
        return (weights @ flat).reshape(weights.shape[:-1] + data.shape[1:])

    def total(self) -> np.ndarray:
        """Sum over the grid samples, (H, W)."""
        if self.weights is None:
            return self.frames.sum(axis=0)
        weights = self.weights.sum(axis=0).astype(np.float32)
        t, h, w = self.frames.shape
        return (weights @ self.frames.reshape(t, -1)).reshape(h, w)

    def blocks(self, values: int = BLOCK_VALUES) -> Iterator[tuple[slice, np.ndarray]]:
        """(rows, curves (N, r, W)) over blocks of image rows of about ``values`` values."""
        n, h, w = self.shape
        rows = max(1, values // max(1, n * w))
        for start in range(0, h, rows):
            part = slice(start, min(h, start + rows))
            yield part, self[:, part]

    def reduce(self, fn: Callable[[np.ndarray], tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
        """``fn`` maps curves (N, r, W) to images (r, W); applied block by block and joined."""
        parts: list[tuple[np.ndarray, ...]] = []
        for _rows, block in self.blocks():
            parts.append(fn(block))
        return tuple(np.concatenate(p, axis=0) for p in zip(*parts, strict=True))
