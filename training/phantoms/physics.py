"""Image formation: attenuation to detected quanta, noise, blur, motion, stored values.

Detected quanta per pixel follow Beer-Lambert plus scatter, N = N0 (exp(-A)
blurred + S), with Poisson noise, so the noise of a log-subtracted image is
about sqrt(1/N_live + 1/N_mask) and grows behind dense bone, as in real DSA,
while scatter S keeps it finite there and lowers iodine contrast. The dose N0 is set from
a target signal-to-noise ratio rather than in microgray, because that is what
an algorithm sees.

Stored values:

- subtracted (12 bits): 2048 + 1000 * ln(N_live / N_mask), so contrast is dark
  on a flat mid-grey field (MONOCHROME2), 1000 grey levels per unit of attenuation;
- native (16 bits): proportional to the detected quanta (Pixel Intensity
  Relationship LIN), so ln(live / mask) recovers the subtraction.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# Full-strength iodinated contrast (300 mgI/mL) at about 46 keV effective:
# mu/rho(I) about 15 cm^2/g (NIST XCOM) * 0.3 g/mL = 0.45 /mm.
MU_IODINE = 0.45
# Platinum coil wire and a barium-loaded catheter wall at the same energy.
MU_PLATINUM = 8.0
MU_CATHETER = 0.06
STORED_MAX = 4095  # subtracted runs: 12 bits
NATIVE_MAX = 65535  # native runs: 16 bits, so the neck is not clipped (only direct beam is)
SUB_OFFSET = 2048.0
SUB_GAIN = 1000.0
DETECTOR_BLUR_MM = 0.2  # focal spot and scintillator spread, sigma at the isocentre


def blur(frames: np.ndarray, spacing_mm: float, sigma_mm: float = DETECTOR_BLUR_MM) -> np.ndarray:
    """Gaussian system blur applied to each frame of (T, H, W) or a single (H, W) image."""
    sigma = sigma_mm / spacing_mm
    if sigma < 0.05:
        return frames
    axes_sigma = (0.0, sigma, sigma) if frames.ndim == 3 else (sigma, sigma)
    return ndimage.gaussian_filter(frames, sigma=axes_sigma, mode="nearest")


def lowpass(frames: np.ndarray, sigma_px: float) -> np.ndarray:
    """Wide Gaussian low-pass of each (H, W) frame, computed on a coarse grid (cheap for large sigma)."""
    factor = max(1, int(sigma_px // 4))
    h, w = frames.shape[-2:]
    hc, wc = -(-h // factor), -(-w // factor)
    pad = np.pad(
        frames,
        [(0, 0)] * (frames.ndim - 2) + [(0, hc * factor - h), (0, wc * factor - w)],
        mode="edge",
    )
    coarse = pad.reshape(*frames.shape[:-2], hc, factor, wc, factor).mean(axis=(-3, -1))
    sig = (0,) * (frames.ndim - 2) + (sigma_px / factor,) * 2
    coarse = ndimage.gaussian_filter(coarse, sig, mode="nearest")
    zoom = (1,) * (frames.ndim - 2) + (factor, factor)
    return ndimage.zoom(coarse, zoom, order=1, mode="nearest", grid_mode=True)[..., :h, :w]


def detected(expected: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
    """Poisson quanta for expected counts; None gives the noise-free expectation."""
    if rng is None:
        return expected
    return rng.poisson(expected).astype(np.float64)


def dose_for_snr(
    reference_signal: float, transmission: np.ndarray, region: np.ndarray, snr: float
) -> float:
    """Unattenuated quanta per pixel N0 that gives the requested SNR in ``region``.

    ``transmission`` is the detected fraction of N0 in the mask frame (primary
    plus scatter). SNR = reference_signal / sigma, with sigma the median noise
    of a live-minus-mask log difference, sqrt(2 / N), over the region.
    """
    target_sigma = reference_signal / snr
    if not np.isfinite(target_sigma) or target_sigma <= 0:
        raise ValueError(f"reference signal must be positive, got {reference_signal}")
    return float(np.median(2.0 / (transmission[region] * target_sigma**2)))


def scatter(
    primary: np.ndarray,
    behind_patient: np.ndarray,
    region: np.ndarray,
    spacing_mm: float,
    spr: float,
    sigma_mm: float = 30.0,
) -> np.ndarray:
    """Scattered radiation behind the grid, as a broad blur of the primary behind the patient.

    Scaled so that the median scatter-to-primary ratio over ``region`` is
    ``spr``: 0.3-0.6 is typical for the head with a grid, 0.5-1 for the chest
    (Boone & Seibert, Med Phys 1988). Scatter fills in the shadow of dense
    bone, which caps the noise there and lowers iodine contrast behind it.
    """
    broad = lowpass(primary * behind_patient, sigma_mm / spacing_mm)
    ratio = np.median(broad[region] / np.maximum(primary[region], 1e-12))
    return spr * broad / max(float(ratio), 1e-12)


def subtracted_values(live: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Stored values of a log subtraction (floors counts at 1 quantum to stay finite)."""
    diff = np.log(np.maximum(live, 1.0)) - np.log(np.maximum(mask, 1.0))
    return np.clip(np.rint(SUB_OFFSET + SUB_GAIN * diff), 0, STORED_MAX).astype(np.uint16)


def native_gain(counts_mask: np.ndarray, region: np.ndarray) -> float:
    """Grey levels per quantum placing the brain's median at 2000 of 65535."""
    return float(2000.0 / max(np.median(counts_mask[region]), 1.0))


def native_values(counts: np.ndarray, gain: float) -> np.ndarray:
    return np.clip(np.rint(counts * gain), 0, NATIVE_MAX).astype(np.uint16)


MOTION_KINDS = ("drift", "jerks")


def motion_track(
    times_s: np.ndarray, amplitude_mm: float, rng: np.random.Generator, kind: str = "drift"
) -> np.ndarray:
    """In-plane head motion per frame: (T, 4) = (row mm, column mm, rotation deg,
    stretch), the stretch a relative change of scale along the rows about the centre.

    The head is still for the mask, then

    - ``"drift"``: drifts smoothly (a patient relaxing, or reacting to the contrast)
      to about ``amplitude_mm``, rigidly, in one direction;
    - ``"jerks"``: moves in one to three jerks of 0.1-0.5 s each (a swallow, a cough,
      a start at the contrast's warmth), each in its own direction, about
      ``amplitude_mm`` in all; the soft tissue of the face and neck does not follow
      the skull: a stretch along the rows (up to half of ``amplitude_mm`` at the
      field's edge, for a field of 230 mm) with a course of its own, and a tremor
      of 5 % of ``amplitude_mm`` in every frame after the first jerk.
    """
    if kind not in MOTION_KINDS:
        raise ValueError(f"motion kind must be one of {MOTION_KINDS}, got {kind!r}")
    out = np.zeros((len(times_s), 4))
    if amplitude_mm <= 0:
        return out
    if kind == "drift":
        start = rng.uniform(0.1, 0.5) * times_s[-1]
        ramp = _smoothstep((times_s - start) / max(rng.uniform(1.0, 4.0), 1e-3))
        out[:, :3] = _rigid_move(amplitude_mm, ramp, rng)
        out[0] = 0.0
        return out
    count = int(rng.integers(1, 4))
    starts = np.sort(rng.uniform(0.1, 0.8, count)) * times_s[-1]
    shares = rng.dirichlet(np.ones(count))
    for start, share in zip(starts, shares, strict=True):
        ramp = _smoothstep((times_s - start) / rng.uniform(0.1, 0.5))
        out[:, :3] += _rigid_move(amplitude_mm * share, ramp, rng)
    moving = times_s >= starts[0]
    out[:, :2] += 0.05 * amplitude_mm * rng.normal(size=(len(times_s), 2)) * moving[:, None]
    stretch_start = rng.uniform(0.1, 0.8) * times_s[-1]
    stretch = _smoothstep((times_s - stretch_start) / rng.uniform(0.3, 3.0))
    out[:, 3] = rng.uniform(-0.5, 0.5) * amplitude_mm / 115.0 * stretch
    out[0] = 0.0
    return out


def _rigid_move(amplitude_mm: float, ramp: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(T, 3) = (row mm, column mm, rotation deg): a move by ``amplitude_mm`` along
    ``ramp`` (T,; 0 to 1) in a random direction, with a rotation of up to 0.4 deg
    per mm."""
    direction = rng.normal(size=2)
    direction /= np.linalg.norm(direction)
    rotation = rng.uniform(-1, 1) * amplitude_mm * 0.4 * ramp
    return np.c_[amplitude_mm * ramp[:, None] * direction, rotation]


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def warp(
    image: np.ndarray,
    shift_rc_px: tuple[float, float],
    rot_deg: float,
    centre_rc: tuple[float, float],
    stretch: float = 0.0,
) -> np.ndarray:
    """Stretch the rows by ``1 + stretch`` and rotate, about ``centre_rc``, then shift,
    with linear interpolation (edge values kept)."""
    if shift_rc_px == (0.0, 0.0) and rot_deg == 0.0 and stretch == 0.0:
        return image
    if rot_deg == 0.0 and stretch == 0.0:
        return _shift_linear(_shift_linear(image, shift_rc_px[0], 0), shift_rc_px[1], 1)
    th = np.deg2rad(rot_deg)
    rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    c = np.asarray(centre_rc)
    # output(o) = input(A^-1 (o - c - s) + c), A = R diag(1 + stretch, 1)
    inv = np.diag([1.0 / (1.0 + stretch), 1.0]) @ rot.T
    offset = c - inv @ (c + np.asarray(shift_rc_px))
    return ndimage.affine_transform(image, inv, offset=offset, order=1, mode="nearest")


def _shift_linear(image: np.ndarray, shift: float, axis: int) -> np.ndarray:
    """Linear-interpolated shift along one axis with edge values kept (a gather, no spline filter)."""
    if shift == 0.0:
        return image
    n = image.shape[axis]
    src = np.arange(n) - shift
    i0 = np.floor(src).astype(np.int64)
    w = src - i0
    a = np.take(image, np.clip(i0, 0, n - 1), axis=axis)
    b = np.take(image, np.clip(i0 + 1, 0, n - 1), axis=axis)
    shape = [1] * image.ndim
    shape[axis] = n
    w = w.reshape(shape)
    return (1.0 - w) * a + w * b
