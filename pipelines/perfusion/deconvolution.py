"""Deconvolution of tissue curves by the AIF, vectorised over all pixels at once.

The indicator-dilution model of a pixel is ``C(t) = dt * sum_j AIF(t - t_j) k(t_j)``
with ``k = CBF * R`` the flow-scaled residue function. In matrix form ``C = A k``.

Methods (one SVD of the AIF matrix, shared by every pixel):

- ``ssvd``: standard truncated SVD of the lower-triangular Toeplitz matrix
  (Ostergaard 1996), fixed threshold; the reference. Underestimates CBF when the
  tissue curve is delayed relative to the AIF.
- ``csvd``: the block-circulant matrix of the zero-padded AIF (Wu et al. 2003),
  fixed threshold; insensitive to tracer delay.
- ``osvd``: block-circulant with a threshold per pixel: the least regularisation
  whose residue has an oscillation index at most ``oscillation_budget / L`` (Wu et al.
  2003). Found by bisection over the singular-value levels, all pixels at once.
- ``tikhonov``: block-circulant with Tikhonov filter factors ``s^2 / (s^2 + l^2)``
  and ``l`` per pixel by generalised cross-validation.

Everything happens in the SVD basis: ``Z = U^T C`` for all pixels in one matrix
product, residues are ``V (F * Z / s)`` with per-pixel filter factors ``F``.
oSVD, which tries several truncations per pixel, uses that the block-circulant
matrix is diagonalised by the DFT: its singular values are the magnitudes of the
padded AIF's spectrum, so a truncation is a mask on the spectrum and a residue
one inverse real FFT (half the CPU time of the product with ``V``, the same
residues to float32 rounding). Pixels are processed in chunks to bound memory. On CUDA the work runs on the
GPU in float32; half precision is not used here because the small singular
values kept by the filters amplify rounding errors.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from pipelines.base import PipelineError
from pipelines.options import DECONVOLUTION_METHODS as METHODS
from pipelines.options import TMAX_ESTIMATORS

CIRCULANT = {"ssvd": False, "csvd": True, "osvd": True, "tikhonov": True}


@dataclass(frozen=True)
class Settings:
    # "auto": osvd on grids of at most ``auto_osvd_max_step_s``, csvd on coarser
    # ones. On the reference object at 1 frame/s cSVD beat oSVD on every figure
    # (MTT, Tmax, CBF, delay spread: 5.4 % vs 0.9 % without noise); at 4 frames/s
    # oSVD is ahead on MTT, Tmax and CBF (bench.perfusion).
    method: str = "auto"
    auto_osvd_max_step_s: float = 0.5
    # Fraction of the largest singular value below which components are dropped.
    ssvd_threshold: float = 0.2
    csvd_threshold: float = 0.1
    # oSVD bound on the oscillation index O of Wu et al. 2003, given as O * L (the
    # summed absolute second differences in units of the residue peak): O is a
    # mean over the L samples, so a bound fixed in O over-regularises coarse
    # sampling. 4.0 is O = 0.025 at L = 160 (4 frames/s over 20 s); chosen from
    # 3-11 on bench.perfusion DRO seeds 100-102 at 4 and 1 frames/s (MTT and CBF
    # error), seeds the reported figures do not use.
    oscillation_budget: float = 4.0
    # Smallest singular value (fraction of the largest) oSVD may ever keep.
    osvd_floor: float = 0.01
    # Tikhonov parameters searched by GCV, as fractions of the largest singular value.
    tikhonov_range: tuple[float, float] = (0.005, 1.0)
    tikhonov_steps: int = 40
    # Tmax estimator: "onset" (default) or "argmax"; see ``_tmax_onset``.
    tmax: str = "onset"
    # Pixels per chunk, one chunk per CPU thread at a time (working memory about
    # 8 kB per pixel in oSVD at L = 228). oSVD of the 262,224 brain curves of a
    # 1024^2 run: 3.9 s CPU at 4096, 3.8 s at 16384 (one thread, 2-core bench
    # machine), so the smaller chunk for memory (peak RSS 1.14 GB at 16384, two
    # threads).
    chunk: int = 1 << 12

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise PipelineError(
                f"unknown deconvolution method {self.method!r}; choose one of {', '.join(METHODS)}"
            )
        if self.tmax not in TMAX_ESTIMATORS:
            raise PipelineError(
                f"unknown Tmax estimator {self.tmax!r}; choose one of {', '.join(TMAX_ESTIMATORS)}"
            )


@dataclass(frozen=True)
class Residues:
    """Per-pixel summaries of the flow-scaled residue (all shape (P,))."""

    cbf: np.ndarray  # max of k(t), 1/s
    tmax_s: np.ndarray  # time k(t) reaches its maximum, s (see Settings.tmax)
    regularisation: np.ndarray  # threshold (SVD) or lambda (Tikhonov), fraction of s_max
    method: str  # the method used ("auto" resolved)


def aif_matrix(aif: np.ndarray, step_s: float, circulant: bool) -> np.ndarray:
    """``dt * AIF`` as a lower-triangular Toeplitz matrix (N x N) or, zero-padded to
    L = 2N, as a block-circulant matrix (L x L).

    The plain rectangle rule: on the reference object it beat Ostergaard's
    ``(a[m-1] + 4 a[m] + a[m+1]) / 6`` weighting at 1 frame/s and tied at 4.
    """
    n = len(aif)
    a = np.asarray(aif, np.float64)
    if circulant:
        length = 2 * n
        padded = np.zeros(length)
        padded[:n] = a
        i, j = np.indices((length, length))
        return step_s * padded[(i - j) % length]
    i, j = np.indices((n, n))
    return step_s * np.where(i >= j, a[np.clip(i - j, 0, n - 1)], 0.0)


class _Basis:
    """The SVD of the AIF matrix on the compute device."""

    def __init__(self, aif: np.ndarray, step_s: float, circulant: bool, device: torch.device):
        matrix = aif_matrix(np.asarray(aif, np.float64), step_s, circulant)
        u, s, vt = np.linalg.svd(matrix)
        if not np.isfinite(s).all() or s[0] <= 0:
            raise PipelineError("the AIF is zero or not finite; nothing to deconvolve")
        self.length = matrix.shape[0]
        self.frames = len(aif)
        self.circulant = circulant
        self.s_np = s
        self.ut_np = u.T
        self.ut = torch.as_tensor(u.T, dtype=torch.float32, device=device)
        self.v = torch.as_tensor(vt.T, dtype=torch.float32, device=device)
        self.s = torch.as_tensor(s, dtype=torch.float32, device=device)
        self.rel = s / s[0]

    def project(self, tissue: torch.Tensor) -> torch.Tensor:
        """``U^T C`` with C zero-padded to the matrix length (the padding meets zero
        columns of U^T, so only the first N are used)."""
        return self.ut[:, : tissue.shape[0]] @ tissue

    def projector(self, weights: np.ndarray | None) -> torch.Tensor:
        """``U^T`` restricted to the N grid samples, times the (N, T) matrix that maps
        acquired samples onto the grid: projects acquired samples in one product."""
        if weights is None:
            return self.ut[:, : self.frames]
        product = self.ut_np[:, : self.frames] @ np.asarray(weights, np.float64)
        return torch.as_tensor(product, dtype=torch.float32, device=self.ut.device)


def oscillation_index(residue: torch.Tensor) -> torch.Tensor:
    """Wu et al. 2003: mean absolute second difference relative to the peak, per column."""
    second = residue[2:] - 2 * residue[1:-1] + residue[:-2]
    peak = residue.max(dim=0).values.clamp_min(1e-12)
    return second.abs().sum(dim=0) / (residue.shape[0] * peak)


class _Spectrum:
    """The block-circulant AIF matrix as the DFT of the zero-padded ``dt * AIF``: its
    singular values are the spectrum's magnitudes (bins k and L - k give a pair)."""

    def __init__(self, aif: np.ndarray, step_s: float, device: torch.device):
        self.length = 2 * len(aif)
        padded = np.zeros(self.length)
        padded[: len(aif)] = step_s * np.asarray(aif, np.float64)
        spectrum = np.fft.rfft(padded)
        magnitude = np.abs(spectrum)
        if not np.isfinite(magnitude).all() or magnitude.max() <= 0:
            raise PipelineError("the AIF is zero or not finite; nothing to deconvolve")
        # The singular values, largest first, as the SVD orders them.
        bins = np.concatenate([magnitude, magnitude[1 : (self.length + 1) // 2]])
        self.rel = np.sort(bins)[::-1] / magnitude.max()
        self.bin_rel = torch.as_tensor(magnitude / magnitude.max(), device=device)
        safe = np.where(magnitude > 0, spectrum, 1.0)
        self.inverse = torch.as_tensor((1 / safe).astype(np.complex64), device=device)


def _osvd(
    spectrum: _Spectrum, tissue: torch.Tensor, settings: Settings
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel truncation by bisection over the singular-value levels, for the
    grid curves ``tissue`` (N, P); residues (L, P).

    Candidates keep every singular value down to a level, with levels only at gaps
    between distinct values (the circulant matrix has them in pairs; splitting a
    pair distorts the residue). Assumes the oscillation grows with the number
    kept, as it does. A candidate is a mask on the spectrum and one inverse FFT.
    """
    rel = spectrum.rel
    length = spectrum.length
    levels = [
        float(rel[k - 1])
        for k in range(1, length + 1)
        if rel[k - 1] >= settings.osvd_floor and (k == length or rel[k] < rel[k - 1] * (1 - 1e-6))
    ]
    # Levels are at least 1e-6 apart (relatively): a bin is kept when its magnitude
    # is within a tenth of that below the level.
    taus = torch.as_tensor(levels, dtype=torch.float64, device=tissue.device) * (1 - 1e-7)
    quotient = torch.fft.rfft(tissue.T, n=length, dim=1) * spectrum.inverse  # (P, B)
    bound = settings.oscillation_budget / length

    def evaluate(level: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keep = spectrum.bin_rel[None, :] >= taus[level][:, None]
        residue = torch.fft.irfft(torch.where(keep, quotient, 0), n=length, dim=1)
        peak = residue.amax(dim=1).clamp_min(1e-12)
        second = residue[:, 2:] - 2 * residue[:, 1:-1] + residue[:, :-2]
        return residue, second.abs().sum(dim=1) / (length * peak)

    lo = torch.zeros(tissue.shape[1], dtype=torch.long, device=tissue.device)
    hi = torch.full_like(lo, len(levels) - 1)
    while bool((lo < hi).any()):
        mid = (lo + hi + 1) // 2
        ok = evaluate(mid)[1] <= bound
        active = lo < hi
        lo = torch.where(active & ok, mid, lo)
        hi = torch.where(active & ~ok, mid - 1, hi)
    # Between the last level that passes and the first that fails, blend the two
    # residues so the oscillation index meets the bound: the discrete levels
    # otherwise make CBF jump by several per cent with tiny changes in the data.
    below, o_below = evaluate(lo)
    upper = (lo + 1).clamp_max(len(levels) - 1)
    above, o_above = evaluate(upper)
    weight = ((bound - o_below) / (o_above - o_below).clamp_min(1e-12)).clamp(0, 1)
    weight = torch.where(upper > lo, weight, torch.zeros_like(weight))
    residue = below + weight[:, None] * (above - below)
    level_t = torch.as_tensor(levels, dtype=torch.float32, device=tissue.device)
    threshold = level_t[lo] + weight * (level_t[upper] - level_t[lo])
    return residue.T.contiguous(), threshold


def _tikhonov(
    basis: _Basis, z: torch.Tensor, settings: Settings
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tikhonov filter factors with lambda per pixel by GCV, evaluated for a grid of
    lambdas in one matrix product (the GCV terms are linear in Z^2)."""
    s = basis.s
    lo, hi = settings.tikhonov_range
    lambdas = s[0] * torch.logspace(
        np.log10(lo), np.log10(hi), settings.tikhonov_steps, device=z.device
    )
    ratio = lambdas[:, None] ** 2 / (s[None, :] ** 2 + lambdas[:, None] ** 2)  # (G, L) = 1 - phi
    gcv = (ratio**2 @ z**2) / ratio.sum(dim=1)[:, None] ** 2
    best = gcv.argmin(dim=0)
    factors = s[:, None] / (s[:, None] ** 2 + lambdas[None, :] ** 2)  # (L, G)
    residue = basis.v @ (factors[:, best] * z)
    return residue, lambdas[best] / s[0]


def _peak(
    residue: torch.Tensor, step_s: float, circulant: bool, frames: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Maximum and its time with parabolic sub-sample interpolation.

    For circulant residues, maxima in the last quarter of the padded period are
    negative delays (tissue earlier than the AIF) wrapped around.
    """
    length = residue.shape[0]
    peak, index = residue.max(dim=0)
    if circulant:
        before = residue.gather(0, ((index - 1) % length)[None]).squeeze(0)
        after = residue.gather(0, ((index + 1) % length)[None]).squeeze(0)
    else:
        before = residue.gather(0, (index - 1).clamp_min(0)[None]).squeeze(0)
        after = residue.gather(0, (index + 1).clamp_max(length - 1)[None]).squeeze(0)
    curvature = before - 2 * peak + after
    offset = torch.where(
        curvature < 0, 0.5 * (before - after) / curvature.clamp_max(-1e-12), torch.zeros_like(peak)
    ).clamp(-0.5, 0.5)
    position = index.to(residue.dtype) + offset
    if circulant:
        position = torch.where(position > length - frames / 2, position - length, position)
    return peak, position * step_s


def _tmax_onset(
    residue: torch.Tensor,
    peak: torch.Tensor,
    argmax_s: torch.Tensor,
    step_s: float,
    circulant: bool,
    frames: int,
) -> torch.Tensor:
    """Tmax as the time the residue first reaches its maximum.

    For the ideal residues of the indicator-dilution model (a step at the delay,
    then non-increasing: exponential, box, any mix) the first time the maximum is
    attained is the delay itself, which is what Tmax is meant to measure. The
    plain argmax of a regularised residue is biased late: truncating the SVD
    smooths the step, which moves the peak of an exponential residue later by a
    fraction of the smoothing width, and the argmax of a smoothed box (a
    plateau) lands near its middle, MTT / 2 late. The smoothing is close to
    symmetric, so the rising edge still crosses half the peak at the step: this
    estimator walks back from the peak to the last sample below half of it and
    interpolates linearly. Walks at most half the run (N/2 samples); a residue
    that never drops below half (no clear onset) keeps its argmax.
    """
    length = residue.shape[0]
    index = residue.argmax(dim=0)
    if circulant:  # maxima late in the padded period are negative delays
        index = torch.where(index > length - frames / 2, index - length, index)
    back = torch.arange(0, max(2, frames // 2), device=residue.device)[:, None]
    rows = index[None, :] - back
    rows = rows % length if circulant else rows.clamp_min(0)
    values = residue.gather(0, rows)  # values[k] = r[peak - k]
    half = 0.5 * peak
    below = values < half[None, :]
    found = below.any(dim=0)
    k = torch.where(found, below.to(torch.int8).argmax(dim=0), torch.zeros_like(index))
    low = values.gather(0, k[None])[0]  # below half
    high = values.gather(0, (k - 1).clamp_min(0)[None])[0]  # at or above half
    fraction = ((half - low) / (high - low).clamp_min(1e-12)).clamp(0, 1)
    onset = (index - k).to(residue.dtype) + fraction
    return torch.where(found & (k > 0), onset * step_s, argmax_s)


def resolve(settings: Settings, step_s: float) -> Settings:
    """``settings`` with method "auto" replaced by the method for this time step."""
    if settings.method != "auto":
        return settings
    chosen = "osvd" if step_s <= settings.auto_osvd_max_step_s * (1 + 1e-6) else "csvd"
    return replace(settings, method=chosen)


def deconvolve(
    tissue: np.ndarray | torch.Tensor,
    aif: np.ndarray,
    step_s: float,
    settings: Settings | None = None,
    device: str | torch.device = "cpu",
    weights: np.ndarray | None = None,
) -> Residues:
    """CBF and Tmax for every column of ``tissue``: baseline-corrected curves (N, P) on
    the uniform grid of ``aif`` (N,), or with ``weights`` (N, T) the acquired samples
    (T, P) that ``weights`` maps onto that grid (folded into the projection, so the
    grid curves never exist)."""
    settings = resolve(settings or Settings(), step_s)
    device = torch.device(device)
    circulant = CIRCULANT[settings.method]
    frames = len(aif)
    data = torch.as_tensor(tissue)
    samples = frames if weights is None else weights.shape[1]
    if (
        data.ndim != 2
        or data.shape[0] != samples
        or (weights is not None and len(weights) != frames)
    ):
        raise PipelineError(f"tissue curves {tuple(data.shape)} do not match the AIF ({frames})")
    grid = None if weights is None else torch.as_tensor(weights, dtype=torch.float32, device=device)
    fixed = settings.ssvd_threshold if settings.method == "ssvd" else settings.csvd_threshold
    solve: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    if settings.method == "osvd":
        # The spectrum only: no L x L SVD (a second of CPU for L = 228 when BLAS
        # threads contend).
        spectrum = _Spectrum(aif, step_s, device)

        def solve(chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return _osvd(spectrum, chunk if grid is None else grid @ chunk, settings)

    else:
        basis = _Basis(aif, step_s, circulant, device)
        projector = basis.projector(weights)
        keep = torch.as_tensor(basis.rel >= fixed, device=device)
        inverse = basis.v @ torch.diag(torch.where(keep, 1 / basis.s, torch.zeros_like(basis.s)))

        def solve(chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if settings.method == "tikhonov":
                return _tikhonov(basis, projector @ chunk, settings)
            used = torch.full((chunk.shape[1],), fixed, device=chunk.device)
            return inverse @ (projector @ chunk), used

    pixels = data.shape[1]
    cbf = np.empty(pixels, np.float32)
    tmax = np.empty(pixels, np.float32)
    reg = np.empty(pixels, np.float32)

    def work(start: int) -> None:
        stop = min(start + settings.chunk, pixels)
        with torch.inference_mode():
            residue, used = solve(data[:, start:stop].to(device=device, dtype=torch.float32))
            peak, when = _peak(residue, step_s, circulant, frames)
            if settings.tmax == "onset":
                when = _tmax_onset(residue, peak, when, step_s, circulant, frames)
            cbf[start:stop] = peak.cpu().numpy()
            tmax[start:stop] = when.cpu().numpy()
            reg[start:stop] = used.cpu().numpy()

    starts = range(0, pixels, settings.chunk)
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1 or len(starts) == 1:
        for start in starts:
            work(start)
    else:
        # On the CPU, whole chunks in parallel, one torch thread each (the setting is
        # per thread): the many small operations of the bisection otherwise meet
        # at a barrier each, where a core taken by other work stalls both (2 threads:
        # 9.8 s CPU for 3.4 s of work on a busy 2-core machine).
        with ThreadPoolExecutor(threads, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            list(pool.map(work, starts))
    return Residues(cbf=cbf, tmax_s=tmax, regularisation=reg, method=settings.method)


def residues(
    tissue: np.ndarray, aif: np.ndarray, step_s: float, settings: Settings | None = None
) -> np.ndarray:
    """The full flow-scaled residues (L, P) of a few curves, for inspection and tests."""
    settings = resolve(settings or Settings(), step_s)
    cpu = torch.device("cpu")
    with torch.inference_mode():
        curves = torch.as_tensor(tissue, dtype=torch.float32)
        if settings.method == "osvd":
            return _osvd(_Spectrum(aif, step_s, cpu), curves, settings)[0].numpy()
        basis = _Basis(aif, step_s, CIRCULANT[settings.method], cpu)
        z = basis.project(curves)
        if settings.method in ("ssvd", "csvd"):
            fixed = (
                settings.ssvd_threshold if settings.method == "ssvd" else settings.csvd_threshold
            )
            keep = torch.as_tensor(basis.rel >= fixed)
            out = basis.v @ (torch.where(keep, 1 / basis.s, torch.zeros_like(basis.s))[:, None] * z)
        else:
            out, _ = _tikhonov(basis, z, settings)
    return out.numpy()


def smooth_in_mask(frames: torch.Tensor, mask: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """Spatial noise handling: Gaussian smoothing of every frame by normalised
    convolution inside ``mask``, so vessel signal outside the mask does not bleed
    into tissue. ``frames`` (N, H, W), ``mask`` (H, W) bool; outside stays as is."""
    if sigma_px <= 0:
        return frames
    kernel = torch.as_tensor(gaussian_kernel(sigma_px), dtype=frames.dtype, device=frames.device)
    radius = len(kernel) // 2
    weight = mask.to(frames.dtype)

    def blur(images: torch.Tensor) -> torch.Tensor:
        # Zero padding is right here: the normalisation sees the same zeros.
        out = F.conv2d(images[:, None], kernel.view(1, 1, -1, 1), padding=(radius, 0))
        return F.conv2d(out, kernel.view(1, 1, 1, -1), padding=(0, radius))[:, 0]

    norm = blur(weight[None])[0].clamp_min(1e-6)
    smoothed = blur(frames * weight[None]) / norm[None]
    return torch.where(mask[None], smoothed, frames)


def gaussian_kernel(sigma_px: float) -> np.ndarray:
    """The normalised 1D Gaussian of ``smooth_in_mask``: radius ceil(3 sigma)."""
    radius = max(1, int(np.ceil(3 * sigma_px)))
    x = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (x / sigma_px) ** 2)
    return kernel / kernel.sum()


def smooth_at(
    frames: np.ndarray,
    mask: np.ndarray,
    sigma_px: float,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """``smooth_in_mask`` of the (T, H, W) ``frames``, kept only at the pixels of
    ``mask``: (T, P) float32, P = mask.sum(), in ``np.flatnonzero(mask)`` order.

    A frame at a time, so the working memory is a few frames, not the run. The
    smoothing is linear and the same for every frame, so smoothing acquired
    frames and then interpolating in time equals the other order. On the CPU
    scipy's separable correlation (a fifth of the CPU time of torch's conv2d
    here); on CUDA ``smooth_in_mask`` a few frames at a time.
    """
    index = np.flatnonzero(mask)
    count = frames.shape[0]
    out = np.empty((count, len(index)), np.float32)
    device = torch.device(device)
    if sigma_px <= 0:
        for i in range(count):
            out[i] = frames[i].ravel()[index]
        return out
    if device.type != "cpu":
        mask_t = torch.as_tensor(mask, device=device)
        index_t = torch.as_tensor(index, device=device)
        step = 8
        with torch.inference_mode():
            for start in range(0, count, step):
                part = torch.as_tensor(frames[start : start + step], device=device)
                smoothed = smooth_in_mask(part.float(), mask_t, sigma_px)
                out[start : start + step] = (
                    smoothed.reshape(smoothed.shape[0], -1)[:, index_t].cpu().numpy()
                )
        return out
    kernel = gaussian_kernel(sigma_px)
    weight = mask.astype(np.float32)

    def blur(image: np.ndarray) -> np.ndarray:
        # Zero padding (mode constant) is right: the normalisation sees the same zeros.
        rows = ndimage.correlate1d(image, kernel, axis=0, mode="constant")
        return ndimage.correlate1d(rows, kernel, axis=1, mode="constant")

    norm = np.maximum(blur(weight).ravel()[index], 1e-6)
    for i in range(count):
        out[i] = blur(frames[i] * weight).ravel()[index] / norm
    return out
