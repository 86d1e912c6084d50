"""From DSA intensities to a contrast-concentration proxy, and the arterial input function.

Concentration proxy (the assumption, stated once): in subtracted DSA, and in
native XA whose stored values are logarithmic in the detector dose (the usual
case, Pixel Intensity Relationship LOG), iodine makes pixels darker in
proportion to the iodine mass along the ray (Beer-Lambert after the log). So
``concentration ~ baseline - pixel`` where ``baseline`` is the pixel's own mean
over the frames before the bolus arrives. For native data stored linearly in
dose (Pixel Intensity Relationship LIN) the log is taken first. The scale is
arbitrary (projection thickness, kV, detector gain), hence CBF and CBV are
relative.

The AIF is the mean concentration over the ICA mask pixels that show a clean
first pass (see ``first_pass_pixels``: a catheter full of contrast or a vein
crossing the ICA in projection keeps pixels opaque after the bolus, which
widens the AIF and biases MTT and CBV). Its quality is checked:
a bolus that is already there in the first frames, that peaks at the last
frame, or whose peak is not well above the noise makes the run unusable and is
refused; a curve that does not come back down is flagged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from pipelines.base import PipelineError, RunMeta
from pipelines.perfusion.timing import Curves

# Bolus arrival: the first time the AIF reaches this fraction of its peak.
ARRIVAL_FRACTION = 0.1


@dataclass(frozen=True)
class AifSettings:
    min_peak_snr: float = 10.0
    # Flag when the AIF ends above this fraction of its peak (bolus not passed).
    max_tail_fraction: float = 0.5
    # First-pass selection: keep ICA pixels whose signal after the first pass, as
    # a fraction of their peak, is at most this quantile over the mask (0.5: the
    # cleaner half); 1.0 keeps every pixel. Never fewer than ``min_pixels``.
    first_pass_quantile: float = 0.5
    min_pixels: int = 10


@dataclass(frozen=True)
class Aif:
    curve: np.ndarray  # concentration proxy on the uniform grid (N,)
    grid_s: np.ndarray
    baseline_frames: int  # grid samples before the bolus used as the baseline
    arrival_s: float
    peak: float
    peak_time_s: float
    noise: float
    pixels: int
    mask: np.ndarray  # (H, W) bool: the ICA pixels averaged (clean first pass)
    flags: list[str] = field(default_factory=list)
    # How long after the bolus enters the region the mean curve rises (upstream_lag):
    # Tmax is measured from that entry.
    upstream_s: float = 0.0

    @property
    def snr(self) -> float:
        return self.peak / self.noise if self.noise > 0 else float("inf")

    @property
    def tail(self) -> float:
        """The AIF at the end of the run as a fraction of its peak: how far the bolus
        has washed out (``AifSettings.max_tail_fraction``)."""
        return float(self.curve[-1]) / self.peak


def is_linear(meta: RunMeta) -> bool:
    """Native data stored linearly in dose (needs a log before subtraction)."""
    relationship = str(meta.extra.get("pixel_intensity_relationship", "")).upper()
    return not meta.subtracted and relationship == "LIN"


def contrast_signal(frames: np.ndarray, meta: RunMeta) -> np.ndarray:
    """A signal that grows with iodine: ``-pixel`` (log data) or ``-log(pixel)`` (linear)."""
    if is_linear(meta):
        return -np.log(np.clip(frames, 1.0, None)).astype(np.float32)
    return -frames.astype(np.float32, copy=False)


def smoothing_gain(sigma_px: float) -> float:
    """Noise SD after a 2D Gaussian of ``sigma_px`` relative to before."""
    return min(1.0, 1.0 / (2 * np.sqrt(np.pi) * max(sigma_px, 1e-6)))


def noise_sigma(signal: np.ndarray, field: np.ndarray | None = None) -> float:
    """Per-pixel, per-frame noise SD from the frame-to-frame changes (within the
    collimated ``field`` (H, W) when given: behind the blades nothing changes).

    The median absolute change is robust to the bolus, which changes few pixels
    between consecutive frames compared with the noise that changes all of them.
    When the noise is below the grey-level step, most changes are zero and the
    median says nothing; then the RMS of the central 90% of changes is used.
    """
    sample = signal[:, ::2, ::2]
    if field is not None and field[::2, ::2].any():
        sample = sample[:, field[::2, ::2]]
    diff = np.diff(sample, axis=0).ravel()
    sigma = 1.4826 * float(np.median(np.abs(diff - np.median(diff)))) / np.sqrt(2)
    if sigma < 0.5:
        lo, hi = np.percentile(diff, [5, 95])
        central = diff[(diff >= lo) & (diff <= hi)]
        # RMS of a normal distribution truncated at +-1.645 SD is 0.79 SD.
        sigma = max(sigma, float(np.sqrt(np.mean(central**2))) / 0.79 / np.sqrt(2))
    if not np.isfinite(sigma) or sigma <= 0:
        # Noise-free (synthetic) data: a tiny floor keeps the ratios finite.
        sigma = 1e-6 * max(float(np.ptp(diff)), 1e-6)
    return sigma


# A subtracted frame whose fine detail (noise) is at most this fraction of the
# run's median is blank: the mask subtracted from itself when the run has at most
# MAX_MASK_FRAMES of them. More blank frames mean a noise-free run (a digital
# reference object), whose flat pre-contrast frames are true samples (9 of them on
# family A at snr None, 4 frames/s; 1 in every noisy family A run).
MASK_BLANK_FRACTION = 0.1
MAX_MASK_FRAMES = 2
# The bolus has reached a frame when, among the bolus passages of largest dynamic
# (the top BOLUS_TOP share: the big arteries and veins), the 90th percentile of the
# frame's height above the pixel's lowest value, relative to its range, reaches
# BOLUS_PRESENT. Static misregistration cancels in both; a pre-contrast frame is a
# few noise SD above the lowest value.
BOLUS_TOP = 0.01
BOLUS_PRESENT = 0.2
# The blank frame is left out only when at least this many live frames precede the
# bolus. Where nothing moved it is an exact baseline sample, without noise; with one
# live pre-contrast frame the baseline would rest on that frame's noise alone (at 1
# frame/s on the perfusion phantom, seeds 210-212, MTT MAE rose from 0.6 to 1.2 s).
MIN_LIVE_BASELINE = 2


def _fine_detail(frames: np.ndarray, field: np.ndarray | None) -> np.ndarray:
    """Per frame: RMS of the central 90 % of the differences between horizontal
    neighbours (every second row, inside ``field``): the noise of a noisy frame,
    0 for a flat one."""
    rows = frames[:, ::2, :]
    diffs = np.diff(rows, axis=2)
    if field is not None:
        inner = field[::2, 1:] & field[::2, :-1]
        if inner.any():
            diffs = diffs[:, inner]
    diffs = diffs.reshape(len(frames), -1).astype(np.float32)
    lo, hi = np.percentile(diffs, [5, 95], axis=1, keepdims=True)
    return np.sqrt(np.mean(np.clip(diffs, lo, hi) ** 2, axis=1))


def subtracted_mask_frames(
    frames: np.ndarray, meta: RunMeta, field: np.ndarray | None = None
) -> np.ndarray:
    """Which frames of a subtracted run are its mask, subtracted from itself (T,) bool.

    A suite stores the mask frame of a subtracted run as a blank frame, and the
    node's own subtraction of a native run (Mask Subtraction Sequence) makes one.
    It carries no measurement: it is zero by construction, without the noise of
    the live frames and without their misregistration. As a baseline sample it
    turns every edge that moved between mask and fill into "contrast" present from
    the second frame on (on the randomised family A seeds the maps lost up to 40 %
    of the brain to it). Such a frame is recognised by its fine detail: none, where
    the run's frames have some. A noise-free run (a digital reference object) has
    many flat pre-contrast frames, all true samples: nothing is left out when more
    than ``MAX_MASK_FRAMES`` frames are blank, nor when fewer than 4 would remain.
    Nor when fewer than ``MIN_LIVE_BASELINE`` live frames precede the bolus
    (``frames_before_bolus``): then the blank frame is the better baseline.
    """
    n = len(frames)
    none = np.zeros(n, bool)
    if not meta.subtracted or n < 5:
        return none
    detail = _fine_detail(frames, field)
    level = float(np.median(detail))
    if not np.isfinite(level) or level <= 0:
        return none
    blank = detail <= MASK_BLANK_FRACTION * level
    if not 0 < int(blank.sum()) <= MAX_MASK_FRAMES or n - int(blank.sum()) < 4:
        return none
    step = max(1, min(frames.shape[1:]) // 128)  # a subsample, never a copy of the run
    live = np.flatnonzero(~blank)
    if frames_before_bolus(contrast_signal(frames[live, ::step, ::step], meta)) < MIN_LIVE_BASELINE:
        return none
    return blank


def frames_before_bolus(signal: np.ndarray) -> int:
    """How many leading frames of ``signal`` (T, H, W; darkening positive) hold no
    contrast yet in the vessels of largest dynamic (see ``BOLUS_PRESENT``).

    Only pixels whose curve peaks inside the run count (their peak stands above
    both the first and the last frame by a fifth and a half of their range): a
    bolus passage. An edge that moved during the run is a step, highest at one
    end, however large its range.
    """
    step = max(1, min(signal.shape[1:]) // 128)
    small = ndimage.gaussian_filter(signal[:, ::step, ::step], (0, 1, 1))
    low, high = small.min(axis=0), small.max(axis=0)
    dynamic = high - low
    passage = (high - small[0] >= 0.2 * dynamic) & (high - small[-1] >= 0.5 * dynamic)
    passage &= dynamic > 0
    if not passage.any():
        return 0
    values = dynamic[passage]
    top = values >= np.quantile(values, 1 - BOLUS_TOP)
    present = (small[:, passage][:, top] - low[passage][top]) / values[top]
    arrived = np.quantile(present, 0.9, axis=1) >= BOLUS_PRESENT
    return int(np.argmax(arrived)) if arrived.any() else 0


def crossing_time(curve: np.ndarray, grid_s: np.ndarray, level: float) -> float:
    """First time ``curve`` reaches ``level``, linearly interpolated; NaN if never."""
    above = np.flatnonzero(curve >= level)
    if len(above) == 0:
        return float("nan")
    i = int(above[0])
    if i == 0:
        return float(grid_s[0])
    lo, hi = curve[i - 1], curve[i]
    frac = (level - lo) / (hi - lo) if hi > lo else 0.0
    return float(grid_s[i - 1] + frac * (grid_s[i] - grid_s[i - 1]))


def parabolic_peak(curve: np.ndarray, grid_s: np.ndarray) -> tuple[float, float]:
    """Peak value and time with parabolic interpolation around the largest sample."""
    i = int(np.argmax(curve))
    if 0 < i < len(curve) - 1:
        a, b, c = curve[i - 1], curve[i], curve[i + 1]
        denom = a - 2 * b + c
        if denom < 0:
            off = float(np.clip(0.5 * (a - c) / denom, -0.5, 0.5))
            step = grid_s[i + 1] - grid_s[i]
            return float(b - 0.25 * (a - c) * off), float(grid_s[i] + off * step)
    return float(curve[i]), float(grid_s[i])


class NoBaseline(PipelineError):
    """The ICA already holds contrast in the first frame: no pre-contrast sample."""


def baseline_frames(
    signal: np.ndarray | Curves, mask: np.ndarray, grid_s: np.ndarray, subtracted: bool
) -> int:
    """Grid samples before the bolus reaches the ICA (at least one).

    In subtracted runs the background is flat, so the ICA's first frame can be
    compared with the frame's median: contrast already there means no frame
    shows the pre-contrast baseline, and the run is refused.
    """
    raw = signal[:, mask].mean(axis=1)
    rise = raw - raw[0]
    peak = float(rise.max())
    if peak <= 0:
        raise PipelineError("no contrast bolus is visible in the ICA region")
    arrival = crossing_time(rise, grid_s, ARRIVAL_FRACTION * peak)
    step = grid_s[1] - grid_s[0]
    before = max(1, int(np.searchsorted(grid_s, arrival - step, side="right")))
    if subtracted and before < MIN_LIVE_BASELINE:
        present = float(raw[0] - np.median(signal[0]))
        if present >= ARRIVAL_FRACTION * (peak + present):
            raise NoBaseline(
                f"contrast is already in the ICA in the first frame ({present / (peak + present):.0%}"
                " of its peak): no pre-contrast baseline, so concentrations cannot be measured"
            )
    return before


def first_pass_pixels(curves: np.ndarray, grid_s: np.ndarray, settings: AifSettings) -> np.ndarray:
    """Which columns of ``curves`` (N, P: the ICA mask's pixels) carry a clean first pass.

    In projection, whatever else lies on the ray adds to the ICA's curve: a
    catheter full of contrast (opaque from the injection on), the cavernous
    sinus or another vein (opaque in the venous phase). Both keep the pixel's
    signal up after the arterial bolus has passed. The late signal is measured
    in a window after the mean curve's first pass (from the peak plus three
    rise times, for at least 2 s), relative to the pixel's own peak, and the
    pixels up to ``first_pass_quantile`` of that ratio are kept. Runs too short
    for the window keep every pixel.
    """
    pixels = curves.shape[1]
    everything = np.ones(pixels, bool)
    if settings.first_pass_quantile >= 1.0 or pixels < 2 * settings.min_pixels:
        return everything
    mean = curves.mean(axis=1)
    top = int(np.argmax(mean))
    peak = float(mean[top])
    if peak <= 0:
        return everything
    arrival = crossing_time(mean, grid_s, ARRIVAL_FRACTION * peak)
    step = float(grid_s[1] - grid_s[0])
    rise = max(float(grid_s[top]) - arrival, step) if np.isfinite(arrival) else step
    start = float(grid_s[top]) + 3 * rise
    window = (grid_s >= start) & (grid_s <= start + max(2.0, 2 * rise))
    if window.sum() < 2:
        return everything
    own_peak = np.maximum(curves[max(0, top - 1) : top + 2].mean(axis=0), 1e-12)
    late = curves[window].mean(axis=0) / own_peak
    cut = float(np.quantile(late, settings.first_pass_quantile))
    keep = late <= cut
    if keep.sum() < settings.min_pixels:
        keep = np.zeros(pixels, bool)
        keep[np.argsort(late)[: settings.min_pixels]] = True
    return keep


# Tmax is measured from the bolus's arrival where it enters the AIF region (its
# upstream end), not from the region's mean curve (``upstream_lag``): the earliest
# tenth of the region's pixels, each at half its own peak. Chosen on development runs
# (family A seeds 100-102 and randomised 920000-920015, 256 px, 4 frames/s), in a first
# form that did not yet keep the earliest brain as the reference where it comes first:
# the earliest 5, 10 and 25 % gave Tmax errors of 0.088 / 0.093 / 0.121 s and 0.337 /
# 0.343 / 0.354 s (0.093 and 0.339 s in the form kept); a lower quantile is also a
# noisier one.
UPSTREAM_QUANTILE = 0.1
UPSTREAM_LEVEL = 0.5
UPSTREAM_MIN_PIXELS = 10


def upstream_lag(curves: np.ndarray, curve: np.ndarray, grid_s: np.ndarray, peak: float) -> float:
    """How long after the bolus enters the AIF region its mean curve ``curve`` (peak
    ``peak``) rises: the mean curve's time at ``UPSTREAM_LEVEL`` of its peak less the
    ``UPSTREAM_QUANTILE`` of the region's pixels' own such times (``curves``, (N, P));
    0 with fewer than ``UPSTREAM_MIN_PIXELS`` pixels that cross it.

    The region is a stretch of artery, and the bolus takes time to travel along it: on
    family A phantoms the region's mean curve rose 0.16-0.19 s after its earliest
    pixels (tuning seeds 100-102), and every Tmax, measured from that mean, was early
    by about as much (0.13-0.15 s against the arterial input's delay). Each pixel is
    timed at half its own peak, so a pixel at the lumen's edge, fainter by partial
    volume, times the same bolus as one at its centre."""
    if curves.shape[1] < UPSTREAM_MIN_PIXELS:
        return 0.0
    own = curves.max(axis=0)
    times = np.array(
        [crossing_time(curves[:, i], grid_s, UPSTREAM_LEVEL * own[i]) for i in range(own.size)]
    )
    times = times[np.isfinite(times)]
    mean_time = crossing_time(curve, grid_s, UPSTREAM_LEVEL * peak)
    if times.size < UPSTREAM_MIN_PIXELS or not np.isfinite(mean_time):
        return 0.0
    return max(0.0, mean_time - float(np.quantile(times, UPSTREAM_QUANTILE)))


def measure_aif(
    concentration: np.ndarray | Curves,
    mask: np.ndarray,
    grid_s: np.ndarray,
    baseline: int,
    sigma: float,
    settings: AifSettings | None = None,
) -> Aif:
    """The AIF as the mean concentration over ``mask``, with its quality checks."""
    settings = settings or AifSettings()
    if not mask.any():
        raise PipelineError("the ICA mask is empty: no AIF")
    curves = concentration[:, mask]
    clean = first_pass_pixels(curves, grid_s, settings)
    pixels = int(clean.sum())
    used = np.zeros(mask.shape, bool)
    used[mask] = clean
    curve = curves[:, clean].mean(axis=1).astype(np.float64)
    peak, peak_time = parabolic_peak(curve, grid_s)
    noise = sigma / np.sqrt(pixels)
    if baseline >= 3:
        noise = max(noise, float(np.std(curve[:baseline], ddof=1)))
    flags: list[str] = []
    if peak < settings.min_peak_snr * noise:
        raise PipelineError(
            f"AIF peak is only {peak / noise:.1f} times its noise (needs "
            f"{settings.min_peak_snr:g}); the ICA region shows no usable bolus"
        )
    if int(np.argmax(curve)) == len(curve) - 1:
        raise PipelineError("the AIF peaks at the last frame: the run ends before the bolus passes")
    arrival = crossing_time(curve, grid_s, ARRIVAL_FRACTION * peak)
    upstream = upstream_lag(curves[:, clean], curve, grid_s, peak)
    tail = float(curve[-1]) / peak
    if tail > settings.max_tail_fraction:
        flags.append(
            f"AIF ends at {tail:.0%} of its peak: the run is short for the bolus, CBV and MTT "
            "are underestimated"
        )
    if baseline == 1:
        flags.append("only one pre-contrast frame: the baseline is noisy")
    return Aif(
        curve=curve,
        grid_s=grid_s,
        baseline_frames=baseline,
        arrival_s=arrival,
        peak=peak,
        peak_time_s=peak_time,
        noise=float(noise),
        pixels=pixels,
        mask=used,
        flags=flags,
        upstream_s=upstream,
    )
