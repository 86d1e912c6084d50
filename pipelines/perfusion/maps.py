"""Perfusion maps from concentration curves and the AIF, kept to the brain.

- CBF: maximum of the flow-scaled residue, reported relative to its median over
  the brain mask (DSA has no absolute calibration).
- CBV: area under the tissue curve over the area under the AIF (a ratio of
  projected iodine; relative for the same reason).
- MTT = CBV / CBF (seconds), Tmax = the time the residue reaches its peak
  (seconds after the bolus enters the AIF's region, ``aif.upstream_lag``; see
  ``deconvolution._tmax_onset``), TTP = time of the
  tissue curve's peak (seconds after the first frame).

Masking, as clinical tools do it: large vessels are pixels whose peak
opacification reaches ``vessel_fraction`` of the densest vessels' (the AIF
peak, or the run's ``DENSEST_QUANTILE`` of peak opacification when that is
higher: an AIF from an artery thinner than the ICA, which a later ICA rule
may take, would otherwise make the brain's blush a vessel) in a region no wider
than the widest vessel (``vessel_width_mm``: wider is a thick blush) or stands out from
the surrounding blush (top-hat) by ``vessel_contrast`` of it, the ICA mask, and
static opacity (a catheter: already opaque when the bolus arrives), found on
the peak-opacity image smoothed by half a pixel and not dilated (see
``MapSettings.vessel_dilation_px``); the brain is the tissue whose area under the curve, smoothed, is
clearly above its noise, with holes filled (non-enhancing tissue inside the
brain stays in), in the connected region (vessels included) that holds most of
it. Maps are defined on brain minus vessels.
Spatial noise handling: the curves are smoothed by normalised convolution
inside that mask before deconvolution, so vessel signal never leaks in.

Physically valid values only (issue 13): a pixel has a value only where every
map is possible: CBF > 0, CBV > 0, MTT = CBV / CBF within the run, Tmax within
[0, run length] and TTP within the run. A Tmax less than one grid step before the
AIF is 0 (the AIF's own time resolution: the tissue is fed as early as the ICA);
earlier is a residue that wrapped round the circular deconvolution or an AIF
that is not upstream of the tissue, and is no value. Everything else (outside
the brain, large vessels, poor fits, out of range) is "no value" in every map at
once (``Maps.valid``), which the Parametric Map encoder writes as its padding
value and the colour renderings leave transparent. ``Maps.rejected`` counts the
brain pixels each rule removed, for the notes and the quality checks.

Memory: the concentration curves arrive as :class:`~pipelines.perfusion.timing.Curves`
(acquired frames and the linear map onto the grid); every step here works on
2D summaries, one frame, or blocks of pixels, so nothing of the grid's size
(N x H x W) is ever held.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage

from pipelines.base import PipelineError
from pipelines.perfusion.aif import Aif, smoothing_gain
from pipelines.perfusion.deconvolution import Residues, Settings, deconvolve, smooth_at
from pipelines.perfusion.ica import disk_radius_px
from pipelines.perfusion.quality import MAX_EARLY_BRAIN
from pipelines.perfusion.timing import Curves
from pipelines.shutter import disk

# Pixels per block for the TTP and area pass (the grid curves of one block).
PIXEL_BLOCK = 1 << 16
# The densest vessels' opacity, which the large-vessel level is a fraction of: the
# AIF's peak, or this quantile of the peak opacification when higher (the top 1 %
# of the frame: the large arteries wherever they are in view). On randomised
# development seeds 920000-920005 with 1.5 mm of drift, whose AIFs came from
# thinner arteries, coverage 60.1 -> 66.4 % (920004: 44 % of the perfused brain
# was "vessel" by the level alone); 920000-920011 without drift unchanged.
DENSEST_QUANTILE = 0.99
# The share of the deconvolved brain that may lie before Tmax's reference (see
# ``aif_lead``): noise, not tissue fed earlier.
EARLY_QUANTILE = 0.02
LEAD_SMOOTHING = 2.0
# A downstream AIF lags the tissue fed first by at most the arterial transit from the
# ICA to a cortical branch, about a second: normal tissue's Tmax against an ICA AIF
# stays under 2 s, the delay DSC perfusion starts to call abnormal. Tissue that peaks
# longer than this before the AIF is not fed earlier: its residue wrapped round the
# circular deconvolution (head motion during the bolus, noise). On motion-free
# randomised family A development runs (920000-920015, 930000-930011, 256 px) the
# leads were 0.32-0.56 s; with 1.5 mm of head motion during the run (920000-920011,
# drift and jerks) they reached 1.7-5.5 s on six runs (over 2 s, 3.1-5.5 s, on three),
# and each put the whole Tmax map late by about that much. The bound is applied to the chosen AIF's maps only
# (``DsaPerfusion``), and kept where it leaves nearly as much brain with a value
# (``BOUNDED_KEEP``): a late AIF that most of the brain fills before has a long lead
# that is real.
MAX_LEAD_S = 2.0
# The maps with the bound are kept when they give a value to at least this share of
# the pixels the maps without it did: wrapped residues are a minority of the brain.
BOUNDED_KEEP = 0.9


@dataclass(frozen=True)
class MapSettings:
    deconvolution: Settings = field(default_factory=Settings)
    # Spatial smoothing (Gaussian sigma) before deconvolution.
    sigma_mm: float = 1.0
    sigma_px: float = 2.0  # when the pixel spacing is unknown
    # Large vessels: peak opacification at least this fraction of the AIF peak, or
    # standing out from the surrounding blush (white top-hat of the peak
    # opacification, disk of vessel_width_mm) by vessel_contrast of the AIF peak
    # and by vessel_relative of the blush level (vessel_contrast 0: rule off).
    # Chosen on phantom seeds 100-102 (bench.perfusion reports 210-212): with the
    # level alone (0.25) a thick hemisphere's blush was excluded as vessel. The level's
    # regions wider than vessel_width_mm are not vessels either (1.5.0).
    vessel_fraction: float = 0.6
    vessel_contrast: float = 0.05
    vessel_relative: float = 0.5
    vessel_width_mm: float = 10.0
    # Brain: smoothed area under the tissue curve at least this many noise SDs.
    brain_snr: float = 6.0
    # The vessel rules act on the peak opacification smoothed by this Gaussian sigma,
    # and the vessel mask is grown by this many pixels. Smoothing by 1 px and a 1 px
    # dilation (before issue 13) left 84 % of the perfused brain outside the vessels
    # with a value on the tuning seeds 100-102 at 512 px (72 % at 256 px); 0.75 px and
    # no dilation: 97.5 %, with CBF error 18.9 vs 18.7 %, CBV 18.3 vs 17.7 %, MTT MAE
    # 1.14 s both, Spearman rho of region CBF 0.94 vs 0.96 (bench.perfusion's phantom
    # errors, SNR 20 and 50, 4 fps). 0.5 px (98.8 %) took noise for vessels on the grid
    # DRO at SNR 30 (test_thick_blush_is_kept_while_vessels_are_excluded).
    vessel_smoothing_px: float = 0.75
    vessel_dilation_px: int = 0
    # Static opacity: already this fraction of its peak when the bolus reaches the ICA.
    static_fraction: float = 0.3

    def sigma_pixels(self, spacing_mm: tuple[float, float] | None) -> float:
        if spacing_mm is None or min(spacing_mm) <= 0:
            return self.sigma_px
        return self.sigma_mm / float(np.mean(spacing_mm))

    def describe_mask(self) -> str:
        return (
            f"brain = tissue whose curve area is > {self.brain_snr:g} noise SD after "
            f"smoothing, holes filled, the region (with its vessels) holding most of it; "
            f"large vessels excluded = peak opacification >= {self.vessel_fraction:.0%} of "
            f"the densest vessels' (the AIF peak, or the top {1 - DENSEST_QUANTILE:.0%} of the "
            f"frame when higher) where no wider than {self.vessel_width_mm:g} mm, or >= "
            f"{self.vessel_contrast:.0%} of the AIF peak above the "
            f"surrounding blush (top-hat, {self.vessel_width_mm:g} mm), the ICA, or opacity >= "
            f"{self.static_fraction:.0%} of its peak already at bolus arrival (catheter)"
            + (f", dilated {self.vessel_dilation_px} px" if self.vessel_dilation_px else "")
        )


@dataclass(frozen=True)
class Maps:
    cbf: np.ndarray  # relative: 1 = median over the valid mask
    cbf_median_per_s: float  # the raw CBF (1/s, relative units) that maps to 1
    cbv: np.ndarray
    mtt: np.ndarray
    tmax: np.ndarray
    ttp: np.ndarray
    valid: np.ndarray
    brain: np.ndarray
    vessels: np.ndarray
    regularisation: np.ndarray
    method: str  # deconvolution method used
    # Brain (non-vessel) pixels without a value, per reason (see the module docstring).
    rejected: dict[str, int] = field(default_factory=dict)
    # Share of the deconvolved brain reached before the AIF (Tmax < -1 grid step).
    early_share: float = 0.0
    # Tmax is measured from this many seconds before the AIF's arrival: the
    # earliest brain arrival, when part of the brain is reached before the AIF
    # (see ``aif_lead``); 0 when the AIF comes first.
    tmax_lead_s: float = 0.0
    # (H, W): smoothed area under the curve below -brain_snr noise SD: brighter than
    # the mask, which iodine cannot do (misregistration between mask and fill).
    brighter: np.ndarray | None = None


def tissue_masks(
    conc: np.ndarray | Curves,
    step_s: float,
    aif_peak: float,
    sigma: float,
    ica: np.ndarray,
    sigma_px: float,
    settings: MapSettings,
    arrival_s: float | None = None,
    spacing_px_mm: float = 0.5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Brain and large-vessel masks (see the module docstring), from 2D summaries:
    the peak opacification (vessels) and the area under the curve (brain), whose
    noise SD after smoothing is ``sigma * step * sqrt(N) * gain``.

    Opacity that is already there when the bolus reaches the ICA (``arrival_s``)
    is not perfusion: a catheter full of contrast and its blurred edge, a
    device, misregistration. Such pixels count as vessels (excluded), or their
    large area under the curve would pass for brain.

    Third: the pixels whose smoothed area is as far below zero as the brain's is
    above it: brighter than the mask, which iodine cannot make (misregistration).
    """
    curves = conc if isinstance(conc, Curves) else Curves(conc)
    (peak,) = curves.reduce(lambda block: (block.max(axis=0),))
    peak = ndimage.gaussian_filter(peak, settings.vessel_smoothing_px)
    densest = max(aif_peak, float(np.quantile(peak, DENSEST_QUANTILE)))
    disk = _disk(settings.vessel_width_mm, spacing_px_mm)
    level = peak >= settings.vessel_fraction * densest
    # A level region wider than the widest vessel is blush, not vessel: a hemisphere
    # seen through its full depth, where the brain's opacity reaches the level (on
    # family A development seed 930015, 22 % of the perfused brain was "vessel" by
    # the level alone). The opening keeps the parts of the region that hold a disk
    # as wide as the widest vessel to remove.
    level &= ~ndimage.binary_opening(level, structure=disk)
    vessels = level | ica
    if settings.vessel_contrast > 0:
        # Vessels stand out from the blush around them (a projection's tissue
        # blush can reach a third of the ICA's opacity, so a level alone either
        # keeps vessels or loses brain): white top-hat of the peak opacification
        # with a disk as wide as the widest vessel to remove.
        background = ndimage.grey_opening(peak, footprint=disk)
        tophat = peak - background
        vessels |= (tophat >= settings.vessel_contrast * aif_peak) & (
            tophat >= settings.vessel_relative * np.maximum(background, 0)
        )
    if arrival_s is not None and np.isfinite(arrival_s):
        at = int(np.clip(round(arrival_s / step_s), 0, curves.shape[0] - 1))
        early = ndimage.gaussian_filter(curves[at], 1.0)
        vessels |= (early >= settings.static_fraction * peak) & (peak >= 5 * sigma)
    if settings.vessel_dilation_px > 0:
        vessels = ndimage.binary_dilation(
            vessels, structure=np.ones((3, 3)), iterations=settings.vessel_dilation_px
        )
    tissue = (~vessels).astype(np.float32)
    area = curves.total() * step_s
    smoothed = ndimage.gaussian_filter(area * tissue, sigma_px) / np.maximum(
        ndimage.gaussian_filter(tissue, sigma_px), 1e-6
    )
    # The area's exact noise: it is a linear map of the acquired frames (interpolation
    # and baseline subtraction included), whose noise is independent between frames;
    # the baseline's own error, common to every sample, dominates it. (Before issue
    # 13 the model was sqrt(N) samples: on the tuning seeds 100-102 at 512 px 21 % of
    # the pixels with a value lay off the perfused brain or on a vessel of the truth,
    # now 17 %; at 256 px 18 -> 14 %; coverage and errors unchanged within 1 %.)
    per_frame = np.asarray(curves.weights).sum(axis=0) if curves.weights is not None else None
    exact = float(np.linalg.norm(per_frame)) if per_frame is not None else np.sqrt(curves.shape[0])
    noise = sigma * step_s * exact * smoothing_gain(sigma_px)
    enhancing = (smoothed >= settings.brain_snr * noise) & ~vessels
    brighter = ndimage.gaussian_filter(area, sigma_px) <= -settings.brain_snr * noise
    # The brain is one piece together with the vessels that cross it: label the
    # union, so that vessels do not cut the hemisphere into islands of which a
    # stray enhancing patch elsewhere could be the largest.
    filled = ndimage.binary_fill_holes(enhancing | vessels)
    labels, count = ndimage.label(filled)
    enhancing_per_label = np.bincount(labels.ravel(), weights=enhancing.ravel().astype(float))[1:]
    if count == 0 or enhancing_per_label.max() <= 0:
        raise PipelineError("no enhancing brain tissue found outside the large vessels")
    brain = (labels == int(np.argmax(enhancing_per_label)) + 1) & ~vessels
    return brain, vessels, brighter


def _disk(width_mm: float, spacing_px_mm: float) -> np.ndarray:
    """A disk ``width_mm`` across at ``spacing_px_mm`` (a radius of at least 1 px)."""
    return disk(disk_radius_px(width_mm, spacing_px_mm))


def aif_lead(
    raw_tmax: np.ndarray,
    early_share: float,
    where: np.ndarray,
    step_s: float,
    sigma_px: float,
    max_lead_s: float | None = None,
) -> float:
    """How much earlier than the AIF Tmax is measured from: when more than
    ``MAX_EARLY_BRAIN`` of the deconvolved brain peaks more than one grid step
    before the AIF (``early_share``, the quality measure: the AIF is downstream), the time of the earliest brain
    (``EARLY_QUANTILE`` of the Tmax map smoothed by ``sigma_px``); else 0 (what
    noise and the wrap of a truncated curve give with the ICA as the AIF: those
    pixels have no value). With ``max_lead_s`` (``MAX_LEAD_S``), a lead longer than
    that is taken again over the tissue peaking at most that long before the AIF
    (the rest left out of the smoothing too), and with no more than
    ``MAX_EARLY_BRAIN`` of the brain there, there is no lead.

    An AIF taken downstream of part of the brain (no ICA in view: the earliest
    large artery in the field is a branch) puts that tissue's Tmax below 0, which
    no Tmax map can show; with no value there, the map lost a fifth of the brain
    on development runs whose ICA is out of view. The block-circulant
    deconvolution's CBF, and so MTT, do not depend on that delay, and its
    residues keep their order in time, so Tmax is measured from the earliest
    brain instead: a constant shift, the lead, reported in the notes. Every Tmax
    is then a delay after the tissue fed first, which is what it measures when the
    AIF is the ICA (the tissue nearest the ICA fills almost with it). A quantile,
    not the minimum: a few noisy residues must not move the whole map; those
    still before the reference have no value. The quality check on the brain
    reached before the AIF still marks the run (the AIF may not be the feeding
    artery).
    """
    if early_share <= MAX_EARLY_BRAIN:  # also when nothing was deconvolved
        return 0.0
    earliest = _earliest(raw_tmax, where, None, sigma_px)
    if max_lead_s is not None and earliest < -max_lead_s:
        plausible = raw_tmax >= -max_lead_s
        if np.mean(plausible & (raw_tmax < -step_s)) <= MAX_EARLY_BRAIN:
            return 0.0
        earliest = _earliest(raw_tmax, where, plausible, sigma_px)
    return -earliest if earliest < -step_s else 0.0


def _earliest(
    raw_tmax: np.ndarray, where: np.ndarray, counted: np.ndarray | None, sigma_px: float
) -> float:
    """``EARLY_QUANTILE`` of the Tmax map (``raw_tmax`` at ``where``) smoothed by
    ``sigma_px``, over the pixels ``counted`` (a selection of ``raw_tmax``; the
    others are left out of the smoothing too; None: all of them)."""
    inside = where.copy()
    if counted is not None:
        inside[where] = counted
    image = np.zeros(where.shape, np.float64)
    image[inside] = raw_tmax if counted is None else raw_tmax[counted]
    weight = ndimage.gaussian_filter(inside.astype(np.float64), sigma_px)
    smooth = ndimage.gaussian_filter(image, sigma_px)[inside] / np.maximum(weight[inside], 1e-6)
    return float(np.quantile(smooth, EARLY_QUANTILE))


def _ttp(curves: torch.Tensor, step_s: float) -> torch.Tensor:
    """Time of the maximum of each column with parabolic interpolation."""
    peak, index = curves.max(dim=0)
    n = curves.shape[0]
    before = curves.gather(0, (index - 1).clamp_min(0)[None])[0]
    after = curves.gather(0, (index + 1).clamp_max(n - 1)[None])[0]
    curvature = before - 2 * peak + after
    inner = (index > 0) & (index < n - 1) & (curvature < 0)
    offset = torch.where(
        inner, 0.5 * (before - after) / torch.where(inner, curvature, -1.0), torch.zeros_like(peak)
    ).clamp(-0.5, 0.5)
    return (index.to(curves.dtype) + offset) * step_s


def compute_maps(
    concentration: np.ndarray | Curves,
    aif: Aif,
    sigma: float,
    ica: np.ndarray,
    spacing_mm: tuple[float, float] | None,
    settings: MapSettings | None = None,
    device: str | torch.device = "cpu",
    max_lead_s: float | None = None,
) -> Maps:
    """All maps for concentration curves (N, H, W) on the AIF's uniform grid
    (``max_lead_s``: see ``aif_lead``).

    When part of the brain fills before the AIF (``aif_lead``), the masks are
    made again with the static-opacity rule at the earliest brain's time instead
    of the AIF's arrival: tissue fed before a downstream AIF is already opaque
    when that AIF arrives, and would otherwise be left out as a catheter.
    """
    settings = settings or MapSettings()
    curves_in = concentration if isinstance(concentration, Curves) else Curves(concentration)
    args = (curves_in, aif, sigma, ica, spacing_mm, settings, device)
    maps = _maps_from(*args, aif.arrival_s, max_lead_s)
    if maps.tmax_lead_s > 0:
        maps = _maps_from(*args, aif.arrival_s - maps.tmax_lead_s, max_lead_s)
    return maps


def _maps_from(
    curves_in: Curves,
    aif: Aif,
    sigma: float,
    ica: np.ndarray,
    spacing_mm: tuple[float, float] | None,
    settings: MapSettings,
    device: str | torch.device,
    static_at_s: float,
    max_lead_s: float | None,
) -> Maps:
    """The maps, with static opacity judged at ``static_at_s``."""
    step = float(aif.grid_s[1] - aif.grid_s[0])
    sigma_px = settings.sigma_pixels(spacing_mm)
    brain, vessels, brighter = tissue_masks(
        curves_in,
        step,
        aif.peak,
        sigma,
        ica,
        sigma_px,
        settings,
        arrival_s=static_at_s,
        spacing_px_mm=float(np.mean(spacing_mm)) if spacing_mm else 0.5,
    )
    valid = brain & ~vessels
    # The smoothing is per frame and linear, so it is applied to the acquired
    # frames, at the valid pixels only: (T, P), the size of the run at most.
    samples = smooth_at(curves_in.frames, valid, sigma_px, device)
    weights = curves_in.weights
    grid = None if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    area = np.empty(samples.shape[1], np.float32)
    ttp = np.empty(samples.shape[1], np.float32)
    with torch.inference_mode():
        for start in range(0, samples.shape[1], PIXEL_BLOCK):
            part = slice(start, start + PIXEL_BLOCK)
            block = torch.from_numpy(samples[:, part])
            curves = block if grid is None else grid @ block
            area[part] = torch.trapezoid(curves, dx=step, dim=0).numpy()
            ttp[part] = _ttp(curves, step).numpy()
    residues: Residues = deconvolve(
        samples, aif.curve, step, settings.deconvolution, device, weights=weights
    )
    del samples
    aif_area = float(np.trapezoid(aif.curve, dx=step))
    cbv = area / aif_area
    duration = float(aif.grid_s[-1])
    raw_tmax = residues.tmax_s
    early_share = float(np.mean(raw_tmax < -step)) if raw_tmax.size else 0.0
    lead = aif_lead(raw_tmax, early_share, valid, step, LEAD_SMOOTHING * sigma_px, max_lead_s)
    # Tmax is measured from the bolus's arrival where it enters the AIF's region
    # (aif.upstream_lag), or from the earliest brain where that comes first.
    if lead <= aif.upstream_s:
        lead = 0.0
    shifted = raw_tmax + (lead or aif.upstream_s)
    # Within one grid step before the reference: as early as it, Tmax 0.
    tmax = np.where((shifted < 0) & (shifted >= -step), 0.0, shifted).astype(np.float32)
    positive = residues.cbf > 0
    mtt = np.where(positive, cbv / np.where(positive, residues.cbf, 1.0), np.inf)
    rules = {
        "CBF not positive": ~positive,
        "CBV not positive": ~(cbv > 0),
        "MTT longer than the run": ~(mtt <= duration),
        ("Tmax before the earliest brain" if lead else "Tmax before the AIF"): ~(tmax >= 0),
        "Tmax after the end of the run": ~(tmax <= duration),
        "TTP outside the run": ~((ttp >= 0) & (ttp <= duration)),
    }
    ok = np.isfinite(cbv) & np.isfinite(tmax) & np.isfinite(ttp)
    rejected: dict[str, int] = {}
    for why, bad in rules.items():
        count = int((bad & ok).sum())
        if count:
            rejected[why] = count
        ok &= ~bad
    if not ok.any():
        raise PipelineError(
            "no brain pixel has a physically valid perfusion estimate ("
            + ", ".join(f"{why}: {n}" for why, n in rejected.items())
            + ")"
        )
    median = float(np.median(residues.cbf[ok]))

    def image(values: np.ndarray) -> np.ndarray:
        out = np.zeros(valid.shape, np.float32)
        out[valid] = np.where(ok, values, 0.0)
        return out

    return Maps(
        cbf=image(residues.cbf / median),
        cbf_median_per_s=median,
        cbv=image(cbv),
        mtt=image(np.where(ok, mtt, 0.0)),
        tmax=image(tmax),
        ttp=image(ttp),
        valid=image(np.ones_like(cbv)) > 0,
        brain=brain,
        vessels=vessels,
        regularisation=image(residues.regularisation),
        method=residues.method,
        rejected=rejected,
        early_share=early_share,
        brighter=brighter,
        tmax_lead_s=lead,
    )
