"""Contrast timing: bolus, residue functions, tissue and venous curves, frame schedules.

Curves are computed on a fine grid (10 ms) and sampled at the frame times, so
truth such as TTP does not depend on the frame rate.

- Arterial input: gamma variate (Thompson et al., Circ Res 1964; Madsen, Phys
  Med Biol 1992) plus a small recirculation bump, in units of the fraction of
  full-strength contrast (300 mgI/mL) in blood.
- Tissue: the indicator-dilution convolution model used by perfusion digital
  reference objects (Ostergaard et al., MRM 1996; Kudo et al., Radiology 2010):
  C(t) = rho * CBF * (AIF conv R)(t - delay), with R exponential, box or gamma
  shaped and mean transit time MTT = CBV / CBF (central volume theorem).
- Veins: the AIF convolved with a transit-time density, shifted so that the
  superior sagittal sinus peaks ``venous_delay_s`` after the ICA (3-6 s in
  adults; Aoki et al., AJNR 2008; Greitz, Acta Radiol 1956).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import gammaincc
from scipy.stats import gamma as gamma_dist

from training.phantoms.errors import PhantomOptionError

DT = 0.01  # s, fine grid step
RHO_BRAIN = 1.04  # g/mL
RESIDUE_KINDS = ("exponential", "box", "gamma")


@dataclass(frozen=True)
class Bolus:
    """Gamma-variate arterial bolus at the ICA; times in s from the first frame."""

    arrival_s: float
    alpha: float
    beta_s: float
    peak: float  # fraction of full-strength contrast at the peak
    recirculation: float = 0.08
    # Injection longer than the bolus rise: the first pass is the gamma variate
    # convolved with a box of this length (a plateau), renormalised to ``peak``.
    duration_s: float = 0.0

    @property
    def peak_time_s(self) -> float:
        """Peak of the first pass (approximate, mid-plateau, when ``duration_s`` > 0)."""
        return self.arrival_s + self.alpha * self.beta_s + 0.5 * self.duration_s


def gamma_variate(t: np.ndarray, t0: float, alpha: float, beta: float) -> np.ndarray:
    """Gamma variate normalised to a peak of 1 at t0 + alpha * beta."""
    x = np.maximum(np.asarray(t, float) - t0, 0.0)
    tp = alpha * beta
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.where(x > 0, (x / tp) ** alpha * np.exp(alpha * (1.0 - x / tp)), 0.0)
    return y


def aif(t: np.ndarray, bolus: Bolus) -> np.ndarray:
    """Arterial concentration at the ICA (fraction of full-strength contrast)."""
    first = gamma_variate(t, bolus.arrival_s, bolus.alpha, bolus.beta_s)
    if bolus.duration_s > DT:
        box = np.ones(int(round(bolus.duration_s / DT)))
        first = np.convolve(first, box)[: len(t)]
        first /= max(float(first.max()), 1e-12)
    # First-pass recirculation about 8-12 s after arrival, lower and broader.
    second = gamma_variate(t, bolus.arrival_s + 9.0, 3.0, 1.6)
    return bolus.peak * (first + bolus.recirculation * second)


def residue(kind: str, t: np.ndarray, mtt: float) -> np.ndarray:
    """Tissue residue function R(t), R(0) = 1 and integral = MTT."""
    t = np.asarray(t, float)
    if kind == "exponential":
        r = np.exp(-np.maximum(t, 0.0) / mtt)
    elif kind == "box":
        r = (t < mtt).astype(float)
    elif kind == "gamma":
        k = 3.0  # transit times gamma(k, MTT/k): a mode before the mean, as in capillary beds
        r = gammaincc(k, np.maximum(t, 0.0) * k / mtt)
    else:
        raise PhantomOptionError(f"residue kind {kind!r} is not one of {RESIDUE_KINDS}")
    return np.where(t >= 0, r, 0.0)


def transit_density(kind: str, t: np.ndarray, mtt: float) -> np.ndarray:
    """h(t) = -dR/dt, the outflow transit-time density (unit area on the grid)."""
    t = np.maximum(np.asarray(t, float), 0.0)
    if kind == "exponential":
        h = np.exp(-t / mtt) / mtt
    elif kind == "box":
        h = (t < mtt) / mtt
    elif kind == "gamma":
        h = gamma_dist.pdf(t, 3.0, scale=mtt / 3.0)
    else:
        raise PhantomOptionError(f"residue kind {kind!r} is not one of {RESIDUE_KINDS}")
    area = h.sum() * DT
    return h / area if area > 0 else h


def delayed(curve: np.ndarray, t: np.ndarray, delay_s: float) -> np.ndarray:
    """curve(t - delay) on the same grid (zero before the start)."""
    return np.interp(t - delay_s, t, curve, left=0.0, right=curve[-1])


def tissue_curve(
    t: np.ndarray, arterial: np.ndarray, cbf: float, mtt: float, delay_s: float, kind: str
) -> np.ndarray:
    """Blood-volume-weighted contrast in tissue: rho * CBF/6000 * (AIF conv R)(t - delay)."""
    r = residue(kind, t - t[0], mtt)
    conv = np.convolve(arterial, r)[: len(t)] * DT
    return delayed(RHO_BRAIN * cbf / 6000.0 * conv, t, delay_s)


def venous_curve(
    t: np.ndarray,
    arterial: np.ndarray,
    arterial_peak_s: float,
    peak_lag_s: float,
    mtt_s: float = 4.0,
) -> np.ndarray:
    """Outflow of a mean brain compartment, shifted to peak ``peak_lag_s`` after the AIF."""
    h = transit_density("gamma", t - t[0], mtt_s)
    out = np.convolve(arterial, h)[: len(t)] * DT
    current = t[int(np.argmax(out))]
    return delayed(out, t, arterial_peak_s + peak_lag_s - current)


def dispersed(t: np.ndarray, arterial: np.ndarray, delay_s: float, tau_s: float) -> np.ndarray:
    """Arterial curve after transit: delayed and convolved with an exponential of time constant tau."""
    if tau_s <= DT:
        return delayed(arterial, t, delay_s)
    kernel = np.exp(-(t - t[0]) / tau_s)
    kernel /= kernel.sum()
    return delayed(np.convolve(arterial, kernel)[: len(t)], t, delay_s)


def frame_schedule(
    frames: int,
    fps: float | tuple[float, float] | None,
    rng: np.random.Generator,
    fast_phase_s: float,
) -> tuple[np.ndarray, tuple[float, float]]:
    """Frame times (s from the first frame) and the (fast, slow) rates used.

    A float gives a constant rate. ``None`` draws a vendor-like variable
    protocol (2-4 fps for the arterial and capillary phase, then 0.5-1 fps for
    the venous phase); a (fast, slow) pair fixes the two rates.
    """
    if frames < 2:
        raise PhantomOptionError(f"frames must be at least 2, got {frames}")
    if fps is None:
        fast = float(rng.choice([2.0, 3.0, 4.0]))
        slow = float(rng.choice([0.5, 1.0]))
    elif isinstance(fps, (tuple, list)):
        fast, slow = (float(v) for v in fps)
    else:
        fast = slow = float(fps)
    for v in (fast, slow):
        if not 0.1 <= v <= 30.0:
            raise PhantomOptionError(f"fps must be within 0.1-30 frames/s, got {v}")
    # The fast phase covers the arterial and capillary phases but leaves at least
    # 40 % of the frames for the slow (venous) phase.
    n_fast = (
        frames
        if fast == slow
        else min(int(np.ceil(0.6 * frames)), max(2, int(round(fast_phase_s * fast)) + 1))
    )
    times = np.arange(n_fast) / fast
    if n_fast < frames:
        times = np.r_[times, times[-1] + np.arange(1, frames - n_fast + 1) / slow]
    return times.astype(np.float64), (fast, slow)


def fine_grid(frame_times_s: np.ndarray) -> np.ndarray:
    """Fine time grid covering the run with margins for delays."""
    return np.arange(-2.0, float(frame_times_s[-1]) + 4.0 + DT, DT)


def sample(t_fine: np.ndarray, curve: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Curve values at frame times (each frame integrates about one pulse: no averaging)."""
    return np.interp(times, t_fine, curve)


def protocol_schedule(
    frames: int,
    rates: tuple[float, float],
    fast_phase_s: float,
    end_s: float,
    rng: np.random.Generator,
    jitter: float = 0.0,
    drop: bool = False,
) -> tuple[np.ndarray, tuple[float, float]]:
    """A randomised run's frame times that reach ``end_s`` (the venous phase).

    Fast rate through the arterial phase, then a slow rate lowered (to 0.5
    fps at least) until the run lasts ``end_s``; a constant rate that cannot
    last that long becomes a two-rate protocol. ``jitter`` is the relative SD
    of each interval (the Frame Time Vector of a real generator), ``drop``
    removes one frame inside the run (a missed pulse).
    """
    if frames < 2:
        raise PhantomOptionError(f"frames must be at least 2, got {frames}")
    fast, slow = rates
    total = frames + 1 if drop else frames
    if fast == slow and (total - 1) / fast >= end_s:
        times = np.arange(total) / fast
    else:
        n_fast = min(int(np.ceil(0.6 * total)), max(2, int(round(fast_phase_s * fast)) + 1))
        head = np.arange(n_fast) / fast
        rest = total - n_fast
        slow = max(0.5, min(slow, rest / max(end_s - head[-1], 1e-3)))
        times = np.r_[head, head[-1] + np.arange(1, rest + 1) / slow]
    steps = np.diff(times) * np.clip(1.0 + jitter * rng.standard_normal(total - 1), 0.5, 1.5)
    times = np.r_[0.0, np.cumsum(steps)]
    if drop:
        times = np.delete(times, int(rng.integers(1, total - 1)))
    return times.astype(np.float64), (float(fast), float(slow))
