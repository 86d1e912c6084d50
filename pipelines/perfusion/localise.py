"""Where the AIF comes from when the border rule cannot say: the ICA rules in order.

The classical rule (``ica.classical_ica``) takes the earliest, widest dense
vessel that enters from the image border. It finds nothing when the contrast
starts inside the image (the catheter tip of a selective injection in view), in
oblique views whose skull base hides the entry, and in collimated fields whose
blades cut the vessel short of the band. Instead of failing, the rules are
tried in order, and the first whose AIF passes the checks is used:

1. ``border``: the classical rule (or the package first, with ``ica=model``,
   or ``ica=auto`` when a package is configured);
2. ``earliest``: the earliest-arriving large arterial structure anywhere in the
   field: dense components at least ``min_diameter_mm`` wide, the earliest
   (10th percentile of their arrival times) within ``early_margin_s`` of the
   first, the widest of those; its wide, early trunk is the mask (one wider
   than an artery, ``IcaSettings.widest_mm``, is blush: tried last);
3. ``model``: the ICA U-Net of the configured package (skipped when none is
   configured or it already ran);
4. ``site``: a site rule from the settings, per protocol (a regular
   expression on the Series Description): a region of interest or a seed, in
   fractions of the image height and width (so one rule fits every matrix);
   the earliest dense vessel inside it (a seed: within ``seed_radius`` of it).

A rule's ICA is also refused, after the deconvolution, when most of the brain
fills before its AIF (``MAX_BRAIN_BEFORE_AIF``): a vein or a late branch at the
border, not the feeding artery; the rule's next candidate is then tried. Only when every rule fails is the run refused, with each rule's
reason. The rule that found the ICA is in the result (notes, AIF region, AIF
plot).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu

from pipelines.base import PipelineError
from pipelines.options import SiteRuleSpec
from pipelines.perfusion.ica import IcaResult, IcaSettings, largest_component, widest_radius_px

# What each rule is called in the result.
T = TypeVar("T")

RULE_NAMES = {
    "border": "vessel entering from the border",
    "model": "ICA model package",
    "earliest": "earliest-arriving large artery",
    "site": "site rule",
}


def rule_in(notes: Iterable[str]) -> str | None:
    """The key in :data:`RULE_NAMES` of the rule that found the ICA, read back from a
    result's notes (the line :attr:`Located.describe` writes), or None."""
    for note in notes:
        for key, name in RULE_NAMES.items():
            if note.startswith(f"ICA by the {name} rule"):
                return key
    return None


@dataclass(frozen=True)
class SiteRule(SiteRuleSpec):
    """A site's ICA location for one protocol (``pipelines.options.site_rules`` checks
    the option): ``roi`` (top, left, bottom, right) or ``seed`` (row, column), in
    fractions of the image height and width."""

    @classmethod
    def of(cls, spec: SiteRuleSpec) -> SiteRule:
        return cls(spec.protocol, spec.roi, spec.seed, spec.seed_radius)

    def matches(self, series_description: str) -> bool:
        return re.search(self.protocol, series_description, re.IGNORECASE) is not None

    def region(self, shape: tuple[int, int]) -> np.ndarray:
        rows, cols = shape
        out = np.zeros(shape, bool)
        if self.roi is not None:
            top, left, bottom, right = self.roi
            r0, r1 = int(np.floor(top * rows)), int(np.ceil(bottom * rows))
            c0, c1 = int(np.floor(left * cols)), int(np.ceil(right * cols))
            out[r0:r1, c0:c1] = True
        elif self.seed is not None:
            rr, cc = np.ogrid[:rows, :cols]
            radius = self.seed_radius * min(rows, cols)
            out = np.hypot(rr - self.seed[0] * rows, cc - self.seed[1] * cols) <= radius
        return out


@dataclass(frozen=True)
class ArterySettings:
    """The earliest-arriving large artery (rule ``earliest``)."""

    min_diameter_mm: float = 2.5
    min_diameter_px: float = 4.0  # when the pixel spacing is unknown
    # Absolute, not a share of the largest dense component: where arteries and veins
    # overlap in projection, that component is a blush tens of millimetres wide,
    # beside which the ICA's own component looked like a twig (randomised family A
    # development seeds 920009 and 920011: the ICA left out, the AIF from a later
    # branch). A twig that does pass is the first candidate only when it is the
    # widest in time, and its AIF is refused when the brain fills before it.
    min_area_px: int = 30
    early_margin_s: float = 0.75
    # Misregistration: brighter than the first frame by this many noise SD.
    misregistered_sd: float = 10.0
    # Candidates tried in turn when the first one's AIF is unusable.
    candidates: int = 3
    # The mask: the component's pixels opacifying within this time of its earliest.
    trunk_window_s: float = 0.4
    # A first pass comes back down: pixels still at this fraction of their peak at
    # the end of the run (misregistered bone edges, drift, a catheter) are not it.
    max_final_fraction: float = 0.7


def min_width_px(spacing_mm: tuple[float, float] | None, settings: ArterySettings) -> float:
    if spacing_mm is not None and min(spacing_mm) > 0:
        return settings.min_diameter_mm / float(np.mean(spacing_mm))
    return settings.min_diameter_px


def wide_enough(
    result: IcaResult,
    spacing_mm: tuple[float, float] | None,
    settings: ArterySettings | None = None,
) -> IcaResult:
    """``result`` when its vessel is as wide as a large artery, else a refusal: a thin
    vessel at the border (a scalp branch, a misregistered edge) is not the ICA."""
    settings = settings or ArterySettings()
    least = min_width_px(spacing_mm, settings)
    if result.entry_width_px < least:
        raise PipelineError(
            f"the vessel found is {result.entry_width_px:.1f} px wide, less than a large artery "
            f"({least:.1f} px)"
        )
    return result


def dense_vessels(
    opacity: np.ndarray, sigma: float, field: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """The dense-vessel mask of ``classical_ica`` (Otsu on the smoothed peak opacity,
    at least 10 noise SD) and the smoothed opacity."""
    smooth = ndimage.gaussian_filter(opacity, 1.0)
    if field is not None:
        smooth = np.where(field, smooth, 0.0)
    candidates = smooth[smooth > 5 * sigma]
    if candidates.size < 16:
        raise PipelineError("no opacified vessels in the field")
    level = max(float(threshold_otsu(candidates)), 10 * sigma)
    return smooth >= level, smooth


def _trunk(
    component: np.ndarray, arrival_s: np.ndarray, early: float, window: float
) -> tuple[np.ndarray, float]:
    """The upstream end of a vessel component: its pixels that opacify within
    ``window`` of its earliest (the artery before it branches into the blush that
    overlapping branches form in projection), the largest connected piece."""
    trunk = component & (arrival_s <= early + window)
    if not trunk.any():
        trunk = component
    trunk, _ = largest_component(trunk)
    width = 2 * float(ndimage.distance_transform_edt(trunk).max())
    return trunk, width


def earliest_artery(
    opacity: np.ndarray,
    arrival_s: np.ndarray,
    sigma: float,
    spacing_mm: tuple[float, float] | None = None,
    settings: ArterySettings | None = None,
    ica: IcaSettings | None = None,
    region: np.ndarray | None = None,
    final: np.ndarray | None = None,
    min_arrival_s: float = 0.0,
    candidates: int = 1,
    lowest: np.ndarray | None = None,
) -> list[IcaResult]:
    """The earliest-arriving large arterial structure within ``region`` (the field,
    or a site ROI): see the module docstring, rule ``earliest``; up to
    ``candidates`` of them, best first. ``final``: the
    opacity at the end of the run; pixels that never wash out are left out, as
    are pixels that arrive by ``min_arrival_s`` (the second acquired frame: no
    baseline before them, so what "arrives" there is misregistration, not a bolus).
    ``lowest``: the least opacity each pixel reaches (below zero: brighter than the
    first frame, which iodine cannot make); structures within 3 px of a pixel more
    than ``misregistered_sd`` noise SD below zero are bone edges that moved, not
    arteries."""
    settings = settings or ArterySettings()
    ica = ica or IcaSettings()
    passing = opacity
    if final is not None:
        washed = ndimage.gaussian_filter(final, 1.0) < settings.max_final_fraction * opacity
        passing = np.where(washed, opacity, 0.0)
    passing = np.where(arrival_s > min_arrival_s, passing, 0.0)
    if lowest is not None:
        moved = ndimage.gaussian_filter(lowest, 1.0) < -settings.misregistered_sd * sigma
        passing = np.where(ndimage.binary_dilation(moved, iterations=3), 0.0, passing)
    vessels, _ = dense_vessels(passing, sigma, region)
    if region is not None:
        vessels &= region
    labels, count = ndimage.label(vessels, structure=np.ones((3, 3)))
    if count == 0:
        raise PipelineError("no dense vessel in the field")
    index = np.arange(1, count + 1)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    radius = ndimage.distance_transform_edt(vessels)
    widths = 2 * np.asarray(ndimage.maximum(radius, labels, index), float)
    min_width = min_width_px(spacing_mm, settings)
    large = (widths >= min_width) & (sizes >= settings.min_area_px)
    if not large.any():
        raise PipelineError(
            f"no dense vessel is both {min_width:.1f} px wide and {settings.min_area_px} px "
            f"large (widest {widths.max():.1f} px)"
        )
    early = np.array(
        [np.percentile(arrival_s[labels == k], 10) if large[k - 1] else np.inf for k in index]
    )
    in_time = early <= early.min() + settings.early_margin_s
    # The widest of those in time first, then the others in time by width, then the
    # later ones by arrival: the next candidates when a first one's AIF is unusable.
    ranked = sorted(
        np.flatnonzero(large),
        key=lambda i: (not in_time[i], -widths[i] if in_time[i] else early[i]),
    )
    wanted = max(1, candidates)
    found: list[IcaResult] = []
    # A trunk wider than any artery is blush, or an artery joined to it (see
    # ``classical_ica``): tried only after every narrower candidate. (Upper half of
    # a head in view, no ICA: the AIF from such a trunk, overlapping arteries, was
    # better than that of a crossing of an artery and a vein that the brain filled
    # before.)
    wide: list[IcaResult] = []
    max_radius = widest_radius_px(spacing_mm, ica.widest_mm)
    for choice in ranked:
        if len(found) == wanted:
            break
        component = labels == choice + 1
        trunk, width = _trunk(component, arrival_s, float(early[choice]), settings.trunk_window_s)
        if ica.keep_largest:
            mask, parts = largest_component(trunk)
        else:
            mask, parts = trunk, int(ndimage.label(trunk, structure=np.ones((3, 3)))[1])
        result = IcaResult(mask=mask, method="earliest", entry_width_px=width, components=parts)
        (wide if 0.5 * width > max_radius else found).append(result)
    return (found + wide)[:wanted]


def site_ica(
    rules: Sequence[SiteRule],
    series_description: str,
    opacity: np.ndarray,
    arrival_s: np.ndarray,
    sigma: float,
    spacing_mm: tuple[float, float] | None = None,
    ica: IcaSettings | None = None,
    field: np.ndarray | None = None,
    final: np.ndarray | None = None,
    min_arrival_s: float = 0.0,
) -> IcaResult:
    """The ICA from the first site rule whose protocol matches the run: the earliest
    dense vessel inside its ROI (or around its seed), any width."""
    rule = next((r for r in rules if r.matches(series_description)), None)
    if rule is None:
        if not rules:
            raise PipelineError("no site rule is configured (option ica_site_rules)")
        raise PipelineError(
            f"no site rule matches the protocol {series_description!r} "
            f"(rules for {', '.join(repr(r.protocol) for r in rules)})"
        )
    region = rule.region(opacity.shape)
    if field is not None:
        region &= field
    if not region.any():
        raise PipelineError(f"the site rule for {rule.protocol!r} lies outside the exposed field")
    loose = ArterySettings(min_diameter_mm=0.0, min_diameter_px=0.0, min_area_px=4)
    any_width = replace(ica or IcaSettings(), widest_mm=float("inf"))
    try:
        (result,) = earliest_artery(
            opacity, arrival_s, sigma, spacing_mm, loose, any_width, region, final, min_arrival_s
        )
    except PipelineError as exc:
        raise PipelineError(f"site rule for {rule.protocol!r}: {exc}") from None
    return IcaResult(
        mask=result.mask,
        method="site",
        entry_width_px=result.entry_width_px,
        components=result.components,
    )


# An AIF that most of the brain's residues peak before (Tmax more than one grid
# step below 0) is downstream of that tissue (a vein, a late branch): not the
# feeding artery, whatever rule found it; the pipeline then tries the next rule.
MAX_BRAIN_BEFORE_AIF = 0.5


def rule_order(mode: str, has_package: bool) -> list[str]:
    """The rules to try for ``ica`` = auto, classical or model (see the module docstring)."""
    if mode == "classical":
        return ["border", "earliest", "site"]
    if mode == "model" or has_package:
        return ["model", "border", "earliest", "site"]
    return ["border", "earliest", "model", "site"]


def _numbered(failures: Sequence[str]) -> str:
    """The failed candidates of a rule, in order: 'candidate 1: why; candidate 2: why'."""
    return "; ".join(f"candidate {i + 1}: {why}" for i, why in enumerate(failures))


@dataclass(frozen=True)
class Located:
    """The ICA a rule found, and why the rules before it did not serve."""

    rule: str
    ica: IcaResult
    passed_over: tuple[str, ...]  # "rule: reason" of the rules tried before
    candidate: int = 0  # which of the rule's candidates, best first
    skipped: tuple[str, ...] = ()  # why each of the rule's candidates before it failed

    @property
    def describe(self) -> str:
        text = f"ICA by the {RULE_NAMES[self.rule]} rule"
        if self.skipped:
            text += f", its candidate {self.candidate + 1} ({_numbered(self.skipped)})"
        if self.passed_over:
            text += " (" + "; ".join(self.passed_over) + ")"
        return text


def locate(
    order: Sequence[str],
    attempts: Mapping[str, Callable[[], IcaResult | list[IcaResult]] | None],
    accept: Callable[[str, IcaResult], T],
    refused: Mapping[str, Mapping[int, str]] | None = None,
) -> tuple[Located, T]:
    """Try the rules of ``order`` until one gives an ICA that ``accept`` (the
    baseline and AIF checks; given the rule and its ICA) takes; a rule whose attempt
    is None is not configured. ``refused``: per rule, the candidates already taken
    and refused later (by their index, with why): the rule's next candidate is
    tried, and a rule whose every candidate is refused is passed over.
    Every failure is kept for the result, or for the refusal."""
    reasons: list[str] = []
    for rule in order:
        later = dict(refused.get(rule, {})) if refused else {}
        attempt = attempts.get(rule)
        if attempt is None:
            reasons.append(f"{RULE_NAMES[rule]}: not configured")
            continue
        try:
            found = attempt()
        except PipelineError as exc:
            reasons.append(f"{RULE_NAMES[rule]}: {exc}")
            continue
        candidates = found if isinstance(found, list) else [found]
        failures = []
        for index, ica in enumerate(candidates):
            if index in later:
                failures.append(later[index])
                continue
            try:
                accepted = accept(rule, ica)
            except PipelineError as exc:
                failures.append(str(exc))
                continue
            return Located(rule, ica, tuple(reasons), index, tuple(failures)), accepted
        shown = failures[0] if len(failures) == 1 else _numbered(failures)
        reasons.append(f"{RULE_NAMES[rule]}: {shown}")
    raise PipelineError("no ICA rule gave a usable AIF: " + "; ".join(reasons))
