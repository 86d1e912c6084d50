"""Contrast kinetics and frame timing for family B.

- Arterial input: the local density random walk (LDRW) model of indicator
  dilution (Sheppard, 1962; Bogaard et al., Cardiovasc Res 1984), with a
  broader, lower recirculation pass. Family A uses a gamma variate.
- Transit along arteries: a delay plus diffusive broadening (Gaussian whose
  SD grows with the square root of the delay).
- Tissue: indicator-dilution convolution C = rho CBF/6000 (AIF * R)(t - delay)
  with a lognormal transit-time distribution, R(t) = 1 - F_lognormal(t), whose
  mean is the MTT (central volume theorem). Family A uses exponential, box and
  gamma residues.
- Veins: the AIF through a lognormal venous transit.
- Frames: irregular Frame Time Vectors. A protocol of 2-4 phases with their
  own rates (0.5-7.5 frames/s), each interval jittered by a few percent (pulse
  timing follows the generator and the heart rate trigger), and now and then
  a dropped frame (a doubled interval).
"""

from __future__ import annotations

import numpy as np
from scipy.special import erfc

DT = 0.02  # s, fine grid
RHO_BRAIN = 1.04


def ldrw(t: np.ndarray, t0: float, mu: float, lam: float) -> np.ndarray:
    """LDRW indicator curve starting at ``t0``, mean transit ``mu`` (s), skew ``lam``; peak 1."""
    x = np.asarray(t, float) - t0
    pos = x > 1e-6
    y = np.zeros_like(x)
    xp = x[pos]
    y[pos] = np.sqrt(mu / xp) / xp * np.exp(-0.5 * lam * (xp / mu + mu / xp))
    top = float(y.max())
    return y / top if top > 0 else y


def aif(
    t: np.ndarray,
    arrival_s: float,
    mu_s: float,
    lam: float,
    peak: float,
    recirculation: float,
    recirculation_delay_s: float,
) -> np.ndarray:
    """ICA concentration (fraction of full-strength contrast): first pass plus recirculation."""
    first = ldrw(t, arrival_s, mu_s, lam)
    second = ldrw(t, arrival_s + recirculation_delay_s, 2.2 * mu_s, 0.6 * lam)
    return peak * (first + recirculation * second)


def transported(t: np.ndarray, curve: np.ndarray, delay_s: float, spread: float) -> np.ndarray:
    """``curve`` after ``delay_s`` of transit with diffusive broadening."""
    shifted = np.interp(t - delay_s, t, curve, left=0.0, right=curve[-1])
    sd = spread * np.sqrt(max(delay_s, 0.0)) / DT
    if sd < 0.3:
        return shifted
    half = int(np.ceil(4 * sd))
    k = np.exp(-0.5 * (np.arange(-half, half + 1) / sd) ** 2)
    k /= k.sum()
    return np.convolve(np.pad(shifted, half, mode="edge"), k, mode="valid")


def lognormal_residue(t: np.ndarray, mtt_s: float, shape: float) -> np.ndarray:
    """R(t) = P(transit time > t) for lognormal transit times of mean ``mtt_s``."""
    x = np.asarray(t, float)
    m = np.log(mtt_s) - 0.5 * shape**2
    with np.errstate(divide="ignore"):
        z = (np.log(np.maximum(x, 1e-12)) - m) / (shape * np.sqrt(2.0))
    return np.where(x > 0, 0.5 * erfc(z), np.where(x == 0, 1.0, 0.0))


def lognormal_density(t: np.ndarray, mean_s: float, shape: float) -> np.ndarray:
    x = np.maximum(np.asarray(t, float), 1e-9)
    m = np.log(mean_s) - 0.5 * shape**2
    h = np.exp(-((np.log(x) - m) ** 2) / (2 * shape**2)) / (x * shape * np.sqrt(2 * np.pi))
    h = np.where(np.asarray(t) > 0, h, 0.0)
    area = h.sum() * DT
    return h / area if area > 0 else h


def tissue_curve(
    t: np.ndarray, arterial: np.ndarray, cbf: float, mtt_s: float, delay_s: float, shape: float
) -> np.ndarray:
    """Contrast in tissue (blood-volume weighted) for CBF mL/100 g/min, MTT s, delay s."""
    r = lognormal_residue(t - t[0], mtt_s, shape)
    conv = np.convolve(arterial, r)[: len(t)] * DT
    return np.interp(t - delay_s, t, RHO_BRAIN * cbf / 6000.0 * conv, left=0.0)


def venous_curve(t: np.ndarray, arterial: np.ndarray, transit_s: float, shape: float) -> np.ndarray:
    """Outflow of the brain: the AIF through a lognormal transit of mean ``transit_s``."""
    h = lognormal_density(t - t[0], transit_s, shape)
    out = np.convolve(arterial, h)[: len(t)] * DT
    top = float(out.max())
    return out / top if top > 0 else out


def fine_grid(times_s: np.ndarray) -> np.ndarray:
    return np.arange(-3.0, float(times_s[-1]) + 5.0, DT)


def at_frames(t_fine: np.ndarray, curve: np.ndarray, times_s: np.ndarray, pulse_s: float):
    """Each frame averages the curve over its pulse (a few ms to 0.1 s)."""
    offsets = np.linspace(0.0, pulse_s, 5)
    return np.mean([np.interp(times_s + o, t_fine, curve) for o in offsets], axis=0)


def dsa_schedule(rng: np.random.Generator, duration_s: float) -> np.ndarray:
    """Irregular frame times (s from the first frame) covering ``duration_s``."""
    rates = [float(rng.choice([7.5, 6.0, 4.0, 3.0]))]
    for _ in range(int(rng.integers(1, 4))):
        rates.append(float(rng.choice([3.0, 2.0, 1.5, 1.0, 0.5])))
    rates = sorted(rates, reverse=True)
    bounds = np.sort(rng.uniform(0.15, 0.6, len(rates) - 1)) * duration_s
    jitter = rng.uniform(0.01, 0.08)
    times = [0.0]
    while times[-1] < duration_s:
        phase = int(np.searchsorted(bounds, times[-1]))
        step = (1.0 / rates[phase]) * (1.0 + rng.normal(0.0, jitter))
        if rng.random() < 0.03:
            step *= 2.0  # a dropped pulse
        times.append(times[-1] + max(step, 0.05))
    # Millisecond resolution, as a Frame Time Vector stores it.
    return np.round(np.asarray(times), 3)


def cine_schedule(rng: np.random.Generator, frames: int, fps: float, jitter: float) -> np.ndarray:
    steps = (1.0 / fps) * (1.0 + rng.normal(0.0, jitter, frames - 1))
    return np.round(np.r_[0.0, np.cumsum(np.maximum(steps, 0.2 / fps))], 3)
