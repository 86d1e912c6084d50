"""Flat-panel detector model for family B: from attenuation to stored pixel values.

Order of events, as in a CsI flat panel: quanta arrive (Poisson), the
scintillator spreads their light (so the quantum noise is spatially
correlated: its power falls at high frequencies), a small fraction becomes
veiling glare, each pixel has its own gain, the read-out adds Gaussian
electronic noise and a per-row offset (line noise), and the tube output
flickers by a percent or so between pulses. Family A counts after blurring
(white noise) and has none of the electronic terms.

Dose is the detector entrance air kerma per frame behind the patient, which
automatic exposure control holds in a reference region (the brain, the
heart): 1-3 uGy for DSA frames, 0.1-0.3 uGy for cardiac cine (about 2-3 x
10^4 quanta per mm^2 per uGy at 70-80 kVp, IEC 62220-1 beam qualities, times
a DQE of 0.6-0.7).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class Detector:
    quanta_per_mm2: float
    pitch_mm: float  # detector pixel pitch (at the detector)
    psf_sigma_px: float  # scintillator spread, applied to the counted quanta
    glare: float  # fraction of the signal spread as veiling glare
    electronic_sd: float  # additive read-out noise, in quanta
    row_sd: float  # per-row, per-frame offset, in quanta
    gain_sd: float  # fixed per-pixel gain variation
    flicker_sd: float  # per-pulse tube output variation
    vignetting: float  # signal loss at the corners relative to the centre
    spr: float  # scatter-to-primary ratio behind the grid
    blade_transmission: float  # primary transmitted by the collimator blades

    @property
    def quanta_per_pixel(self) -> float:
        return self.quanta_per_mm2 * self.pitch_mm**2


def draw_detector(
    rng: np.random.Generator, pitch_mm: float, dose_ugy: tuple[float, float], spr: tuple
) -> Detector:
    return Detector(
        quanta_per_mm2=float(rng.uniform(*dose_ugy) * rng.uniform(2.2e4, 3.0e4) * 0.65),
        pitch_mm=pitch_mm,
        psf_sigma_px=float(rng.uniform(0.55, 1.1)),
        glare=float(rng.uniform(0.02, 0.08)),
        electronic_sd=float(rng.uniform(1.0, 6.0)),
        row_sd=float(rng.uniform(0.0, 1.5)),
        gain_sd=float(rng.uniform(0.003, 0.012)),
        flicker_sd=float(rng.uniform(0.002, 0.008)),
        vignetting=float(rng.uniform(0.05, 0.25)),
        spr=float(rng.uniform(*spr)),
        blade_transmission=float(rng.uniform(0.01, 0.05)),
    )


def _vignette(rows: int, cols: int, amount: float) -> np.ndarray:
    yy, xx = np.mgrid[:rows, :cols]
    r2 = ((yy - (rows - 1) / 2) / (rows / 2)) ** 2 + ((xx - (cols - 1) / 2) / (cols / 2)) ** 2
    return (1.0 - amount * np.clip(r2 / 2.0, 0, 1)).astype(np.float32)


def _broad(img: np.ndarray, size: int) -> np.ndarray:
    """A wide box blur on a 4x coarser grid (scatter and glare kernels are tens of mm)."""
    f = 4
    h, w = img.shape
    hc, wc = -(-h // f), -(-w // f)
    pad = np.pad(img, ((0, hc * f - h), (0, wc * f - w)), mode="edge")
    coarse = pad.reshape(hc, f, wc, f).mean(axis=(1, 3))
    coarse = ndimage.uniform_filter(coarse, max(1, size // f), mode="nearest")
    coarse = ndimage.uniform_filter(coarse, max(1, size // f), mode="nearest")  # ~triangle
    return np.repeat(np.repeat(coarse, f, 0), f, 1)[:h, :w]


def expose(
    attenuation: np.ndarray,
    det: Detector,
    rng: np.random.Generator | None,
    field: np.ndarray | None = None,
    behind_patient: np.ndarray | None = None,
    aec_region: np.ndarray | None = None,
) -> np.ndarray:
    """Detected signal (T, H, W) in quanta units for attenuation line integrals (T, H, W).

    ``field`` (H, W) in [0, 1] is the open collimator field (soft-edged);
    ``aec_region`` is where the exposure control holds the dose (default: the
    whole field); ``rng`` None gives the noise-free expectation (no flicker either).
    """
    t, h, w = attenuation.shape
    vig = _vignette(h, w, det.vignetting)
    blade = (
        1.0 if field is None else det.blade_transmission + (1.0 - det.blade_transmission) * field
    )
    flicker = (
        np.ones(t) if rng is None else 1.0 + rng.normal(0.0, det.flicker_sd, t).clip(-0.05, 0.05)
    )
    if rng is not None:
        flicker[0] = 1.0  # the mask pulse is the reference
    gain = (
        np.ones((h, w), np.float32)
        if rng is None
        else (1.0 + rng.normal(0.0, det.gain_sd, (h, w))).astype(np.float32)
    )
    scatter_size = int(round(60.0 / det.pitch_mm))
    region = aec_region if aec_region is not None else np.ones((h, w), bool)
    if field is not None and (region & (field > 0.5)).any():
        region = region & (field > 0.5)
    n0, spr_scale = None, None
    out = np.empty((t, h, w), np.float32)
    for k in range(t):
        primary = np.exp(-attenuation[k]) * vig * blade * flicker[k]
        source = primary if behind_patient is None else primary * behind_patient
        scatter = _broad(source, scatter_size)
        if spr_scale is None:  # the scatter-to-primary ratio is ``spr`` over the region
            ratio = np.median(scatter[region] / np.maximum(primary[region], 1e-12))
            spr_scale = det.spr / max(float(ratio), 1e-12)
        relative = primary + spr_scale * scatter * (blade if field is not None else 1.0)
        if n0 is None:  # exposure control, set on the first (mask) pulse
            n0 = det.quanta_per_pixel / max(float(np.median(relative[region])), 1e-12)
        expected = n0 * relative
        counts = expected if rng is None else rng.poisson(expected).astype(np.float32)
        light = ndimage.gaussian_filter(counts, det.psf_sigma_px, mode="nearest")
        light = (1.0 - det.glare) * light + det.glare * _broad(light, scatter_size // 2)
        signal = light * gain
        if rng is not None:
            signal = signal + rng.normal(0.0, det.electronic_sd, (h, w)).astype(np.float32)
            signal = signal + rng.normal(0.0, det.row_sd, (h, 1)).astype(np.float32)
        out[k] = signal
    return out


def stored_linear(signal: np.ndarray, bits: int, median_level: float, region: np.ndarray) -> tuple:
    """Native (LIN) stored values placing the median of ``region`` at ``median_level`` of
    full scale; returns (uint16 pixels, gain in grey levels per quantum)."""
    top = 2**bits - 1
    gain = median_level * top / max(float(np.median(signal[0][region])), 1e-6)
    return np.clip(np.rint(signal * gain), 0, top).astype(np.uint16), gain


def log_subtracted(
    live: np.ndarray, mask: np.ndarray, bits: int, gain: float, landmark: float = 0.0
) -> np.ndarray:
    """Subtracted stored values: mid-grey + ``gain`` * ln(live / mask), vessels dark,
    with ``landmark`` of the mask's own log image added back for orientation."""
    top = 2**bits - 1
    lm = np.log(np.maximum(mask, 1.0))
    diff = np.log(np.maximum(live, 1.0)) - lm[None]
    value = 0.5 * (top + 1) + gain * diff + landmark * gain * (lm - np.median(lm))[None]
    return np.clip(np.rint(value), 0, top).astype(np.uint16)
