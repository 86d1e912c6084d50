"""Preprocessing shared by the deep pipelines: temporal resampling, intensity
normalisation, working-grid resizing, dense tiled inference with blending, and
the choice of inference device.

Why generic: every sequence model in the node needs the same steps (a fixed
frame rate regardless of the acquisition protocol, intensities that do not
depend on dose or detector, and images larger than the model was trained on),
so they live here rather than in one pipeline.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from pipelines.base import PipelineError

# ---------------------------------------------------------------------------
# Time


def resample_times(
    frame_times_s: np.ndarray, fps: float = 1.0, min_frames: int = 4, max_frames: int = 60
) -> np.ndarray:
    """Output times on a uniform grid at ``fps`` covering the run.

    Runs too short for ``min_frames`` at ``fps`` get ``min_frames`` evenly spread
    frames; runs too long get ``max_frames`` (a lower rate), so sequence models
    always see a length they were trained for.
    """
    times = np.asarray(frame_times_s, np.float64)
    if times.ndim != 1 or len(times) < 2 or not np.all(np.diff(times) > 0):
        raise PipelineError("frame times must be strictly increasing with at least two frames")
    t0, t1 = float(times[0]), float(times[-1])
    natural = int(np.floor((t1 - t0) * fps + 1e-6)) + 1
    if min_frames <= natural <= max_frames:
        return t0 + np.arange(natural) / fps
    return np.linspace(t0, t1, min(max(natural, min_frames), max_frames))


def temporal_weights(times_in: np.ndarray, times_out: np.ndarray) -> np.ndarray:
    """(T_out, T_in) weights that resample a sequence from ``times_in`` to ``times_out``.

    Upsampling is linear interpolation. Downsampling averages the source frames
    within one output period with tent weights first (anti-aliasing: averaging
    also lowers the quantum noise, which plain decimation would keep).
    """
    t_in = np.asarray(times_in, np.float64)
    t_out = np.asarray(times_out, np.float64)
    eye = np.eye(len(t_in))
    interp = np.stack([np.interp(t_out, t_in, eye[j]) for j in range(len(t_in))], axis=1)
    period_out = float(np.median(np.diff(t_out))) if len(t_out) > 1 else np.inf
    gap_in = float(np.median(np.diff(t_in)))
    if gap_in >= period_out:
        return interp
    tent = np.clip(1.0 - np.abs(t_out[:, None] - t_in[None, :]) / period_out, 0.0, None)
    sums = tent.sum(axis=1, keepdims=True)
    return np.where(sums > 0, tent / np.where(sums > 0, sums, 1.0), interp)


def resample_frames(
    frames: np.ndarray,
    frame_times_s: np.ndarray | None,
    fps: float = 1.0,
    min_frames: int = 4,
    max_frames: int = 60,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Resample (T, H, W) frames to ``fps``; returns frames and their times.

    Without frame times the frames are returned unchanged (timing is never
    guessed) and the caller records that.
    """
    if frames.ndim != 3:
        raise PipelineError(f"expected (T, H, W) frames, got shape {frames.shape}")
    if frame_times_s is None:
        return frames, None
    times = np.asarray(frame_times_s, np.float64)
    if len(times) != frames.shape[0]:
        raise PipelineError(f"{len(times)} frame times for {frames.shape[0]} frames")
    t_out = resample_times(times, fps, min_frames, max_frames)
    weights = temporal_weights(times, t_out).astype(np.float32)
    flat = frames.reshape(frames.shape[0], -1).astype(np.float32, copy=False)
    return (weights @ flat).reshape(len(t_out), *frames.shape[1:]), t_out


# ---------------------------------------------------------------------------
# Intensity


def _changing(sample: np.ndarray) -> np.ndarray:
    """The columns of (T, N) ``sample`` that change over the run. Blanked collimation
    and burned-in overlays hold one value; where they cover half of a subtracted
    image the frame median is theirs, and nothing looks darker than the background."""
    moving = sample.std(axis=0) > 0
    return sample[:, moving] if moving.any() else sample


def _coarse(frames: np.ndarray) -> np.ndarray:
    """(T, h, w) every n-th pixel of (T, H, W) frames, so that the shorter side keeps
    about 256: enough for a background and a scale, at a fraction of the cost."""
    step = max(1, min(frames.shape[1], frames.shape[2]) // 256)
    return frames[:, ::step, ::step]


def static_background(frames: np.ndarray, share: float = 0.1) -> np.ndarray | None:
    """Per-frame background of a subtracted run (T, H, W) from its stillest pixels.

    A frame's median is its background only while less than half of the image
    holds contrast. In a late frame the parenchymal blush and the veins can
    cover most of the head; the median then moves towards them, the contrast of
    everything else (the neck, the air around the head, misregistered bone
    edges) drops by that much in those frames only, and a static artefact looks
    as if it emptied like a vessel. The pixels whose values vary least over the
    run (``share`` of those that vary at all, on smoothed frames so that noise,
    stronger behind bone, counts less than contrast: background far from the vessels)
    hold no contrast in any frame, so their median follows only the exposure
    drift. Pixels that never change (a blanked field, burned-in text) are not
    used. None when fewer than half of the pixels vary (a noiseless or mostly
    blanked run): the frame median is then the better reference.
    """
    if frames.ndim != 3 or frames.shape[0] < 2:
        return None
    grid = np.asarray(_coarse(frames), np.float32)
    sample = grid.reshape(grid.shape[0], -1)
    # Spread of the smoothed frames: noise averages out, a blush (smooth) does not.
    spread = ndimage.gaussian_filter(grid, (0, 2, 2)).std(axis=0).ravel()
    varies = sample.std(axis=0) > 0
    if varies.sum() < 0.5 * spread.size:
        return None
    still = varies & (spread <= np.quantile(spread[varies], share))
    return np.median(sample[:, still], axis=1).astype(np.float32)


def _references(
    pixels: np.ndarray, background: np.ndarray | None, scale: float | None
) -> tuple[np.ndarray, float]:
    """(background per frame, scale) of :func:`normalise_dsa` from (T, N) ``pixels``,
    each unless given."""
    if background is None:
        background = np.median(pixels, axis=1).astype(np.float32)
    if scale is None:
        peak = (background.reshape(-1, 1) - pixels).max(axis=0)
        scale = float(np.percentile(peak, 99.5))
    return background, scale


def normalise_dsa(
    frames: np.ndarray, background: np.ndarray | None = None, scale: float | None = None
) -> np.ndarray:
    """Contrast of a subtracted run: 0 on the background, about 1 in the densest vessel.

    Vessels are dark in subtracted DSA, so contrast = background - value. The
    background is each frame's median unless given (it absorbs exposure drift
    between frames; the classical vessel path gives :func:`static_background`);
    the scale is a high percentile of the MinIP contrast, so dose and detector
    gain cancel. Values are clipped to [-0.5, 1.5] to bound artefacts.
    When that finds no contrast, both come from the pixels that change over the run
    only (a field blanked over more than half of the image).
    """
    if frames.ndim != 3:
        raise PipelineError(f"expected (T, H, W) frames, got shape {frames.shape}")
    x = frames.astype(np.float32, copy=False)
    sample = _coarse(x).reshape(x.shape[0], -1)
    refs = _references(sample, background, scale)
    if scale is None and not (np.isfinite(refs[1]) and refs[1] > 0):
        refs = _references(_changing(sample), background, scale)
    background, scale = refs
    contrast = background.reshape(-1, 1, 1) - x
    if not np.isfinite(scale) or scale <= 0:
        raise PipelineError("run has no contrast (flat frames)")
    return np.clip(contrast / scale, -0.5, 1.5).astype(np.float32)


# ---------------------------------------------------------------------------
# Space


def work_shape(
    shape: tuple[int, int],
    pixel_spacing_mm: tuple[float, float] | None,
    work_spacing_mm: float | None,
    max_side: int = 512,
) -> tuple[int, int]:
    """The working grid: the model's training pixel spacing when both are known,
    else the native grid shrunk so its longer side is at most ``max_side``.

    Matching the physical scale keeps vessel calibres as the model saw them in
    training; a grid larger than a tile is then processed by tiles.
    """
    h, w = shape
    if pixel_spacing_mm is not None and work_spacing_mm:
        factor = min(pixel_spacing_mm) / float(work_spacing_mm)
    else:
        factor = min(1.0, max_side / max(h, w))
    return max(8, int(round(h * factor))), max(8, int(round(w * factor)))


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize the last two axes of ``x`` (any leading axes); antialiased when shrinking."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    lead = x.shape[:-2]
    flat = x.reshape(-1, 1, *x.shape[-2:])
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    out = F.interpolate(flat, size=size, mode="bilinear", align_corners=False, antialias=shrink)
    return out.reshape(*lead, *size)


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of ``tile`` covering ``length``, the last flush with the end."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    if stride <= 0:
        raise ValueError(f"overlap {overlap} must be smaller than the tile {tile}")
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def blend_window(shape: tuple[int, int], overlap: int) -> torch.Tensor:
    """Separable raised-cosine weights that fade to near zero within ``overlap`` of each edge.

    Predictions near a tile border lack context, so they get little weight where
    a neighbouring tile covers the same pixels. The floor keeps the weight
    positive where only one tile covers the image border.
    """

    def ramp(n: int) -> torch.Tensor:
        r = torch.ones(n)
        m = min(overlap, n // 2)
        if m > 0:
            edge = 0.5 - 0.5 * torch.cos(torch.linspace(0, torch.pi, m + 2)[1:-1])
            r[:m] = edge
            r[n - m :] = edge.flip(0)
        return r.clamp_min(1e-3)

    return ramp(shape[0])[:, None] * ramp(shape[1])[None, :]


def tiled_apply(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int = 512, overlap: int = 64
) -> torch.Tensor:
    """Apply ``fn`` to overlapping tiles of ``x`` (..., H, W) and blend the results.

    ``fn`` maps a (..., h, w) tile to (K, h, w). An image that fits in one tile
    is processed whole, so tiling only changes results for large images.
    """
    height, width = x.shape[-2:]
    th, tw = min(tile, height), min(tile, width)
    ys, xs = tile_starts(height, th, overlap), tile_starts(width, tw, overlap)
    if len(ys) == 1 and len(xs) == 1:
        return fn(x)
    window = blend_window((th, tw), overlap).to(x.device)
    out: torch.Tensor | None = None
    weight = torch.zeros((height, width), device=x.device)
    for y in ys:
        for x0 in xs:
            pred = fn(x[..., y : y + th, x0 : x0 + tw]).float()
            if out is None:
                out = torch.zeros((pred.shape[0], height, width), device=x.device)
            out[:, y : y + th, x0 : x0 + tw] += pred * window
            weight[y : y + th, x0 : x0 + tw] += window
    assert out is not None
    return out / weight


# ---------------------------------------------------------------------------
# Device


def inference_device(requested: str = "auto") -> torch.device:
    """The GPU when one is present and not ruled out, else the CPU.

    ``requested`` is the node's setting: "cpu" forces the CPU; "auto" and
    "cuda[:n]" use CUDA when available.
    """
    if requested == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device(requested if requested.startswith("cuda") else "cuda")
    return torch.device("cpu")


@contextlib.contextmanager
def inference_mode(device: torch.device) -> Iterator[None]:
    """No gradients; mixed precision on CUDA (bfloat16 where supported), float32 on the CPU."""
    with torch.inference_mode():
        if device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            with torch.autocast("cuda", dtype=dtype):
                yield
        else:
            yield


def probabilities_to_native(probs: torch.Tensor, shape: Sequence[int]) -> np.ndarray:
    """(K, h, w) probabilities on the working grid back to (K, H, W) float32 on the native grid."""
    return resize(probs.float(), (int(shape[0]), int(shape[1]))).cpu().numpy()


# ---------------------------------------------------------------------------
# Sequence model inference


def predict_sequence(
    model: torch.nn.Module,
    frames: np.ndarray,
    frame_times_s: np.ndarray | None,
    pixel_spacing_mm: tuple[float, float] | None,
    config: dict,
    device: torch.device,
) -> tuple[np.ndarray, list[str]]:
    """Sigmoid probabilities (K, H, W) on the native grid of a (T, H, W) run.

    ``config`` (the package's architecture config) sets the preprocessing the
    model was trained with: ``fps`` (None keeps every frame), ``min_frames``,
    ``max_frames``, ``work_spacing_mm``, ``max_side``, ``tile``, ``overlap``.
    Returns the probabilities and notes for the job record.
    """
    notes: list[str] = []
    fps = config.get("fps", 1.0)
    seq = frames
    if fps is not None:
        if frame_times_s is None:
            notes.append("no frame timing in the run: frames used as acquired, not resampled")
        else:
            seq, _ = resample_frames(
                frames,
                frame_times_s,
                float(fps),
                int(config.get("min_frames", 4)),
                int(config.get("max_frames", 60)),
            )
            notes.append(f"resampled {frames.shape[0]} frames to {seq.shape[0]} at {fps:g} fps")
    contrast = normalise_dsa(seq)
    size = work_shape(
        frames.shape[1:],
        pixel_spacing_mm,
        config.get("work_spacing_mm"),
        int(config.get("max_side", 512)),
    )
    model = model.to(device).eval()
    with inference_mode(device):
        x = resize(torch.from_numpy(contrast).to(device), size)

        def run_tile(tile: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(model(tile[None]).float())[0]

        probs = tiled_apply(
            run_tile, x, int(config.get("tile", 512)), int(config.get("overlap", 64))
        )
        native = probabilities_to_native(probs, frames.shape[1:])
    if size != tuple(frames.shape[1:]):
        notes.append(
            f"processed at {size[0]}x{size[1]}, mapped back to {frames.shape[1]}x{frames.shape[2]}"
        )
    return native, notes
