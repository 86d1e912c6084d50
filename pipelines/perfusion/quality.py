"""What a reader needs to judge a perfusion result, measured on every run, with a verdict.

Each measure has the range within which the maps can be read as they are
(:class:`pipelines.quality.Check`); outside it the result is delivered as low
confidence with the reason, or refused (``failed``) when the maps would be
meaningless. The bounds are physiology and sampling, not fitted numbers:

- AIF peak SNR >= 20 (the AIF is refused below 10 noise SD, ``aif.py``);
- AIF width: the AIF stays above half its peak for >= 0.5 s; a bolus passage
  takes seconds, so a narrower one is contrast in a single frame (refused);
- washout: the AIF ends at <= 50 % of its peak, else the bolus is cut by the
  end of the run and CBV and MTT are underestimated;
- pre-contrast frames >= 2 (one frame is a noisy baseline);
- sampling: the longest frame interval during the AIF's first pass <= 1 s
  (the first pass rises in about a second);
- saturation: <= 1 % of the ICA's samples at the detector limit (the stored
  extremes of the run: a clipped AIF peak inflates CBF and CBV), and <= 5 % of
  the exposed field clipped in some frame (no perfusion measurable there);
- misregistration: <= 5 % of the exposed field brighter than its mask by
  more than 6 noise SD (iodine only darkens: motion between mask and fill;
  noise alone reaches 0.7-2.5 % on motion-free phantom runs, 3 mm of motion
  18 %);
- head drift: <= 5 % of the exposed field brighter than its mask by more than
  6 noise SD at the end of the run against its pre-contrast frames. Above it the
  drift's artefact is taken out (``drift.py``) and the result is low confidence:
  the estimate is first order and leaves an error while the head moves;
- brain in view >= 10 % of the exposed field;
- brain without a value (large vessels, poor fit, out of range) <= 50 %;
  above 90 % the maps say nothing and the result fails (not delivered);
- brain reached before the AIF <= 10 % of the estimated brain (residue peak
  more than one sample before the AIF: the AIF is not the feeding artery);
- the ICA found by the fallback rule ``earliest`` (not the border rule, a
  package or a site rule) is low confidence: an artery, but maybe not the ICA.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipelines.base import Code
from pipelines.perfusion.drift import DRIFT_MIN_SHARE
from pipelines.quality import NO_UNIT, Check, Quality, Verdict, assess, measure

SECOND = Code("s", "UCUM", "second")
# Maps with a value on less than a tenth of the brain are not a result (failed).
MAX_NO_VALUE_FAILED = 0.9
# More of the brain than this reached before the AIF: the AIF is downstream of it
# (low confidence here; Tmax measured from the earliest brain, ``maps.aif_lead``).
# Less is what noise and the wrap of truncated curves give with the ICA as the AIF.
MAX_EARLY_BRAIN = 0.10


@dataclass(frozen=True)
class Findings:
    """The perfusion run's measures, computed by the pipeline."""

    aif_snr: float
    aif_fwhm_s: float
    aif_tail: float  # AIF at the end of the run / its peak
    baseline_frames: int  # acquired frames before the bolus reaches the ICA
    first_pass_gap_s: float  # longest acquired frame interval during the AIF's first pass
    aif_saturation: float  # share of ICA samples at the detector limit
    field_saturation: float  # share of the exposed field clipped in some frame
    misregistration: float  # share of the field brighter than the mask
    drift_share: float  # share of the field brighter than the mask at the end (drift.py)
    drift_removed: bool  # whether that drift's artefact was taken out
    drift_left_in: str  # why not, when it was over the bound ("" otherwise)
    brain_share: float  # brain / exposed field
    no_value_share: float  # brain pixels without a value
    early_share: float  # estimated brain pixels reached before the AIF
    ica_rule: str  # "border", "model", "earliest" or "site"


def assess_perfusion(f: Findings) -> Quality:
    """The checks of the module docstring on ``f``."""
    checks = [
        Check(
            measure("AIFSNR", "AIF peak SNR", f.aif_snr, NO_UNIT),
            "the AIF is noisy: CBF and Tmax are uncertain",
            low=20.0,
        ),
        Check(
            measure("AIFFWHM", "AIF width at half peak", f.aif_fwhm_s, SECOND),
            "a bolus passage takes seconds: this is contrast in a single frame, not a "
            "first pass; no maps can be computed from it",
            low=0.5,
            severity=Verdict.FAILED,
        ),
        Check(
            measure("AIFTAIL", "AIF level at the end of the run", 100 * f.aif_tail),
            "the run ends before the bolus washes out: CBV and MTT are underestimated",
            high=50.0,
        ),
        Check(
            measure("BASEFRAMES", "Pre-contrast frames", f.baseline_frames, NO_UNIT),
            "a single pre-contrast frame makes a noisy baseline",
            low=2.0,
        ),
        Check(
            measure(
                "PASSGAP", "Longest frame interval in the first pass", f.first_pass_gap_s, SECOND
            ),
            "the first pass is sampled too sparsely: Tmax, TTP and MTT are coarse",
            high=1.0,
        ),
        Check(
            measure("AIFSAT", "AIF samples at the detector limit", 100 * f.aif_saturation),
            "the ICA saturates the detector: the AIF peak is clipped, CBF and CBV are "
            "overestimated",
            high=1.0,
        ),
        Check(
            measure("SATFIELD", "Field at the detector limit", 100 * f.field_saturation),
            "the detector or the stored window clips part of the field: no perfusion can be "
            "measured there",
            high=5.0,
        ),
        Check(
            measure("MISREG", "Field brighter than its mask", 100 * f.misregistration),
            "mask and fill frames do not align (motion): subtraction edges bias the maps",
            high=5.0,
        ),
        Check(
            measure("HEADDRIFT", "Field brighter than its mask at the end", 100 * f.drift_share),
            "head motion after the mask: its subtraction artefact was estimated from the "
            "last frames and taken out; values near bone edges and while the head moved are "
            "less certain"
            if f.drift_removed
            else f"head motion after the mask, its artefact left in ({f.drift_left_in}): "
            "subtraction edges bias the maps",
            high=100 * DRIFT_MIN_SHARE,
        ),
        Check(
            measure("BRAINAREA", "Brain in the exposed field", 100 * f.brain_share),
            "little perfused brain is in view",
            low=10.0,
        ),
        Check(
            measure("NOVALUE", "Brain without a value", 100 * f.no_value_share),
            "much of the brain has no value (vessels, poor fits, out of range)",
            high=50.0,
        ),
        Check(
            measure("EARLYBRAIN", "Brain reached before the AIF", 100 * f.early_share),
            "part of the brain fills before the AIF: the AIF may not be the feeding artery",
            high=100 * MAX_EARLY_BRAIN,
        ),
    ]
    quality = assess(checks)
    if f.ica_rule == "earliest":
        why = (
            "no vessel enters from the border: the AIF is from the earliest-arriving large "
            "artery, which may not be the ICA"
        )
        verdict = quality.verdict if quality.verdict is Verdict.FAILED else Verdict.LOW_CONFIDENCE
        quality = Quality(quality.measures, verdict, (*quality.reasons, why))
    if f.no_value_share > MAX_NO_VALUE_FAILED:
        why = (
            f"{100 * f.no_value_share:.1f} % of the brain has no value: the maps would say "
            "nothing; not delivered"
        )
        quality = Quality(quality.measures, Verdict.FAILED, (why, *quality.reasons))
    return quality


def fwhm_s(curve: np.ndarray, grid_s: np.ndarray) -> float:
    """Time the curve spends above half its peak (linear interpolation between samples)."""
    peak = float(curve.max())
    if peak <= 0:
        return 0.0
    fine = np.linspace(float(grid_s[0]), float(grid_s[-1]), 20 * len(grid_s))
    above = np.interp(fine, grid_s, curve) >= 0.5 * peak
    return float(above.sum() * (fine[1] - fine[0]))


def first_pass_gap(times_s: np.ndarray, curve: np.ndarray, grid_s: np.ndarray) -> float:
    """Longest acquired interval overlapping the AIF's rise and fall (above 10 % of peak)."""
    peak = float(curve.max())
    above = grid_s[curve >= 0.1 * peak]
    if len(above) == 0 or len(times_s) < 2:
        return float("nan")
    start, stop = float(above.min()), float(above.max())
    gaps = np.diff(times_s)
    overlaps = (times_s[1:] >= start) & (times_s[:-1] <= stop)
    return float(gaps[overlaps].max()) if overlaps.any() else float(gaps.max())


def clipped(frames: np.ndarray, field: np.ndarray | None = None) -> np.ndarray:
    """(H, W): pixels that sit at the run's stored minimum or maximum in some frame,
    within the exposed ``field``. One pixel reaching an extreme is how any run
    ends; a detector or window that clips holds many at it."""
    low, high = float(frames.min()), float(frames.max())
    out = np.asarray(((frames <= low) | (frames >= high)).any(axis=0))
    if field is not None:
        out &= field
    return out


def saturation(
    frames: np.ndarray, ica: np.ndarray, field: np.ndarray | None = None
) -> tuple[float, float]:
    """(share of the ICA's samples at a stored extreme, share of the field clipped)."""
    low, high = float(frames.min()), float(frames.max())
    samples = frames[:, ica]
    ica_share = float(((samples <= low) | (samples >= high)).mean()) if ica.any() else 0.0
    area = clipped(frames, field)
    total = float(field.sum()) if field is not None else float(area.size)
    return ica_share, float(area.sum()) / max(total, 1.0)
