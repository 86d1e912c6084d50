"""``dsa_perfusion``: CBF, CBV, MTT, Tmax and TTP maps from a DSA run of the brain.

Steps: frame timing and a uniform grid (``timing``), intensities to a
concentration proxy (``aif``), the ICA on the MinIP by U-Net or classical rule
(``ica``), the AIF with quality checks (``aif``), deconvolution (``deconvolution``)
and maps kept to the brain without large vessels (``maps``), all within the
collimated field (``pipelines.shutter``). Outputs: the MinIP
(the canvas), one Parametric Map per quantity, a colour rendering per map, the
AIF plot with the ICA outline, and the AIF measurements for an SR.

Options (``PipelineContext.options``): ``pipelines.options.PERFUSION``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from pipelines.base import (
    ICA,
    AlgorithmInfo,
    Code,
    ImageOutput,
    Measurement,
    MeasurementsOutput,
    ParametricMapOutput,
    PipelineContext,
    PipelineError,
    PipelineResult,
    RenderingOutput,
    Run,
    RunMeta,
    Segment,
    SegmentationOutput,
    minip,
    register,
    require_2d_run,
)
from pipelines.options import checked
from pipelines.perfusion.aif import (
    Aif,
    AifSettings,
    NoBaseline,
    baseline_frames,
    contrast_signal,
    measure_aif,
    noise_sigma,
    subtracted_mask_frames,
)
from pipelines.perfusion.deconvolution import Settings
from pipelines.perfusion.drift import Drift, remove_drift
from pipelines.perfusion.figures import aif_figure, color_map
from pipelines.perfusion.ica import (
    IcaResult,
    IcaSettings,
    classical_ica,
    model_ica,
    opacity_and_arrival,
)
from pipelines.perfusion.localise import (
    MAX_BRAIN_BEFORE_AIF,
    RULE_NAMES,
    ArterySettings,
    Located,
    SiteRule,
    earliest_artery,
    locate,
    rule_order,
    site_ica,
    wide_enough,
)
from pipelines.perfusion.maps import BOUNDED_KEEP, MAX_LEAD_S, Maps, MapSettings, compute_maps
from pipelines.perfusion.quality import (
    Findings,
    assess_perfusion,
    first_pass_gap,
    fwhm_s,
    saturation,
)
from pipelines.perfusion.timing import (
    Curves,
    Timing,
    acquisition_times,
    resample_weights,
    uniform_grid,
)
from pipelines.quality import Quality, Verdict
from pipelines.shutter import Field, exposed_field

NAME = "dsa_perfusion"
# 1.2.0: a blanked field found where burned-in text touches it.
# 1.2.1: a blanked field is one stored value through the run (air is not); a
# physical blade in a subtracted run found by the noise behind it.
# 1.3.0: Tmax measured from the earliest brain when part of it fills before the
# AIF (a downstream AIF), instead of leaving that tissue without a value.
# 1.4.0: an AIF that does not wash out within the run gives way to one that does
# (the edges of a mask the head moved from rise and stay); the large-vessel level
# is a fraction of the densest vessels' opacity, not of a thin artery's AIF.
# 1.5.0: a region at the large-vessel level wider than the widest vessel
# (vessel_width_mm) is blush (a hemisphere seen through its full depth), not vessel.
# 1.6.0: head drift after the mask measured (HEADDRIFT, among the quality checks),
# and taken out of a subtracted run with the drift_correction option (drift.py).
# 1.6.1: the drift_correction option measures the drift against the earliest still
# stretch of pre-contrast frames, so a head that moved before the bolus is taken
# out too (the default path's output is 1.6.0's).
# 1.6.2: with a drift taken out, the ICA rules look for the ICA in the run as
# measured (``Prepared.located_on``); the AIF and the maps come from the corrected
# signal (option only again).
# 1.7.0: an ICA trunk wider than any artery (vessel_width_mm, 10 mm) is passed over
# by the border rule and tried last by the earliest rule: blush, or an artery joined
# to it, whose mask took that part of the brain out of the maps.
# 1.8.0: a lead (Tmax measured from the earliest brain) longer than MAX_LEAD_S (2 s) is
# taken again over the tissue within 2 s of the AIF, once the AIF is chosen, where that
# leaves nearly as much brain with a value: head motion during the bolus wraps residues
# round, and such leads had put whole Tmax maps seconds late.
# 1.9.0: Tmax is measured from the bolus's arrival at the upstream end of the AIF region
# (its earliest tenth of pixels), not from the region's mean curve, which rises later by
# the bolus's travel along it (aif.upstream_lag): family A Tmax errors 0.19 -> 0.09 s.
VERSION = "1.9.0"
# 1.1.0: valid-only maps, ICA/AIF fallbacks and candidates, quality, verdict

UCUM_SECOND = Code("s", "UCUM", "second")
UCUM_RATIO = Code("{ratio}", "UCUM", "ratio")
UCUM_ARBITRARY = Code("[arb'U]", "UCUM", "arbitrary unit")
RELATIVE_CBF = Code("126397", "DCM", "Relative Regional Blood Flow")
RELATIVE_CBV = Code("126398", "DCM", "Relative Regional Blood Volume")
MEAN_TRANSIT_TIME = Code("113052", "DCM", "Mean Transit Time")
TMAX = Code("113084", "DCM", "Tmax")
TIME_TO_PEAK = Code("113069", "DCM", "Time To Peak")
TIME_OF_PEAK_CONCENTRATION = Code("126370", "DCM", "Time of Peak Concentration")
PEAK_VALUE = Code("126031", "DCM", "Peak Value Within ROI")
# A bolus passage takes seconds: an AIF narrower than this at half its peak is
# contrast in a single frame (see ``pipelines.perfusion.quality``).
MIN_AIF_WIDTH_S = 0.5
# An ICA opaque from the first live frame on, with the blank mask frame kept as its
# baseline, must show the first pass over the live frames: its AIF rises or washes
# out by at least this share of its peak there. Opacity that moves less is static
# (bone edges of a mask misregistered against every live frame, a device).
MIN_LIVE_SWING = 0.5
# The pixels the AIF averages: the ICA, where it shows a clean first pass.
AIF_SEGMENT = Segment("AIF region (internal carotid artery)", ICA, color_rgb=(255, 160, 0))
BOLUS_ARRIVAL = Code("126371", "DCM", "Bolus Arrival Time")


def _settings(
    options: Mapping[str, Any],
) -> tuple[MapSettings, IcaSettings, AifSettings, str, tuple[SiteRule, ...], bool]:
    given = checked(NAME, options)
    site_rules = tuple(SiteRule.of(spec) for spec in given.get("ica_site_rules", ()))
    maps = MapSettings(
        deconvolution=Settings(
            method=given.get("method", "auto"),
            ssvd_threshold=given.get("svd_threshold", 0.2),
            csvd_threshold=given.get("svd_threshold", 0.1),
            tmax=given.get("tmax", "onset"),
            oscillation_budget=given.get("oscillation_budget", 4.0),
        ),
        sigma_mm=given.get("sigma_mm", 1.0),
        vessel_fraction=given.get("vessel_fraction", 0.6),
        vessel_contrast=given.get("vessel_contrast", 0.05),
        vessel_width_mm=given.get("vessel_width_mm", 10.0),
    )
    aif = AifSettings(min_peak_snr=given.get("min_aif_snr", 10.0))
    keep, drift = given.get("keep_largest_ica", True), given.get("drift_correction", False)
    ica = IcaSettings(keep_largest=keep, widest_mm=maps.vessel_width_mm)
    ica_mode = given.get("ica", "auto")
    return maps, ica, aif, ica_mode, site_rules, drift


def _device(ctx: PipelineContext, notes: list[str]) -> torch.device:
    if ctx.device.startswith("cuda"):
        if torch.cuda.is_available():
            return torch.device(ctx.device)
        notes.append("CUDA requested but not available: computed on the CPU")
    return torch.device("cpu")


def locate_ica(
    image: np.ndarray,
    signal: np.ndarray | Curves,
    grid_s: np.ndarray,
    sigma: float,
    model_package: str | None,
    mode: str,
    settings: IcaSettings,
    device: torch.device,
    field: Field | None = None,
    spacing_mm: tuple[float, float] | None = None,
) -> tuple[IcaResult, AlgorithmInfo]:
    """The ICA mask: the U-Net of ``model_package`` on the MinIP ``image`` (mode
    "model", or "auto" with a package), else the classical rule on the contrast
    ``signal`` (N, H, W) sampled at ``grid_s``; within the collimated ``field``, at
    the pixel ``spacing_mm``."""
    inside = field.mask if field is not None and field.collimated else None
    use_model = mode == "model" or (mode == "auto" and model_package is not None)
    if use_model:
        if model_package is None:
            raise PipelineError("option ica=model but no model package is configured")
        return _model_ica(image, model_package, settings, device, inside)
    curves = signal if isinstance(signal, Curves) else Curves(signal)
    # Pixel by pixel, so a block of rows at a time: never a copy of all the curves.
    opacity, arrival = curves.minus_sample(0).reduce(
        lambda block: opacity_and_arrival(block, grid_s)
    )
    result = classical_ica(opacity, arrival, sigma, settings, inside, spacing_mm)
    return result, AlgorithmInfo(name=NAME, version=VERSION, family="classical")


def _model_ica(
    image: np.ndarray,
    model_package: str,
    settings: IcaSettings,
    device: torch.device,
    inside: np.ndarray | None,
) -> tuple[IcaResult, AlgorithmInfo]:
    """The ICA U-Net of ``model_package`` on the MinIP, within the field."""
    from pipelines.models.ica_unet import predict_mask
    from pipelines.models.package import load_package

    package = load_package(model_package, pipeline=NAME)
    if package.architecture != "ica_unet":
        raise PipelineError(
            f"model package {package.name} has architecture {package.architecture!r}, "
            "dsa_perfusion needs 'ica_unet'"
        )
    model = package.load_model(device)
    max_side = package.config.get("max_side")
    mask = predict_mask(model, image, device, int(max_side) if max_side else None)  # type: ignore[arg-type]
    if inside is not None:
        mask = mask & inside
    return model_ica(mask, settings), package.algorithm(NAME, VERSION)


@dataclass(frozen=True)
class Input:
    """The located ICA and what follows from it: the baseline, the concentration
    curves and the AIF."""

    located: Located
    algorithm: AlgorithmInfo
    baseline: int
    concentration: Curves
    aif: Aif


def ica_order(mode: str, has_package: bool) -> list[str]:
    """The ICA rules in the order they are tried (option ``ica``, a package or not)."""
    order = rule_order(mode, has_package)
    return ["site", *(r for r in order if r != "site")] if mode == "site" else order


def ica_and_aif(
    image: np.ndarray,
    signal: Curves,
    times_s: np.ndarray,
    grid_s: np.ndarray,
    sigma: float,
    meta: RunMeta,
    ctx: PipelineContext,
    mode: str,
    settings: tuple[IcaSettings, AifSettings, tuple[SiteRule, ...]],
    device: torch.device,
    inside: np.ndarray | None,
    refused: Mapping[str, Mapping[int, str]] | None = None,
    no_baseline: set[str] | None = None,
    *,
    first_live_s: float | None = None,
    found: dict[str, tuple[Any, AlgorithmInfo | None]] | None = None,
    located_on: Curves | None = None,
) -> Input:
    """The ICA by the rules of ``pipelines.perfusion.localise`` in order, the first
    whose baseline and AIF pass their checks; the run is refused, with every rule's
    reason, only when none does. ``refused``: the candidates refused after the
    deconvolution (see ``localise.locate``). The rules whose ICA already held
    contrast in the first frame are added to ``no_baseline``. ``found`` keeps each
    rule's candidates between calls on the same frames, so that a rule whose first
    candidate was refused is not run again (a model package, for one).

    ``located_on``: the run as measured when a head drift was taken out of
    ``signal`` (``drift.py``): the rules find the ICA in it, and the AIF is measured
    in ``signal``. The correction is first order and its pattern holds some of the
    contrast left at the end; on the corrected signal the rules took another
    structure for the ICA on jerking family A development runs (920010: 1,612 px
    against 88 px, Tmax error 0.26 -> 0.62 s; 920008: none at the border).

    ``first_live_s``: the time of the first live frame when the blank subtracted
    mask frame(s) before it are kept as the baseline. An ICA that is opaque from
    that frame on has only the blank frame to show its rise, so it must show the
    bolus passing over the live frames (rising or washing out by at least
    ``MIN_LIVE_SWING`` of its peak): opacity that is there in every live frame and
    stays is static (the bone edges of a mask misregistered against the live
    frames, which a subtracted run carries from its first live frame to its last;
    a device), not the arterial input."""
    ica_settings, aif_settings, site_rules = settings
    if mode == "model" and ctx.model_package is None:
        raise PipelineError("option ica=model but no model package is configured")
    rise = (signal if located_on is None else located_on).minus_sample(0)
    # Pixel by pixel, so a block of rows at a time: never a copy of all the curves.
    opacity, arrival, lowest = rise.reduce(
        lambda block: (*opacity_and_arrival(block, grid_s), block.min(axis=0))
    )
    final = rise[-1]
    second = float(times_s[1])
    spacing = meta.pixel_spacing_mm
    package = ctx.model_package
    models: dict[str, AlgorithmInfo] = {}

    def model() -> IcaResult:
        assert package is not None
        result, models["model"] = _model_ica(image, package, ica_settings, device, inside)
        return result

    attempts: dict[str, Callable[[], IcaResult | list[IcaResult]] | None] = {
        "border": lambda: wide_enough(
            classical_ica(opacity, arrival, sigma, ica_settings, inside, spacing), spacing
        ),
        "earliest": lambda: earliest_artery(
            opacity,
            arrival,
            sigma,
            spacing,
            None,
            ica_settings,
            inside,
            final,
            second,
            ArterySettings().candidates,
            lowest,
        ),
        "model": model if package is not None else None,
        "site": lambda: site_ica(
            site_rules,
            meta.series_description,
            opacity,
            arrival,
            sigma,
            spacing,
            ica_settings,
            inside,
            final,
            second,
        ),
    }

    def remembered(
        rule: str, make: Callable[[], IcaResult | list[IcaResult]]
    ) -> Callable[[], IcaResult | list[IcaResult]]:
        def attempt() -> IcaResult | list[IcaResult]:
            if found is None:
                return make()
            if rule not in found:
                found[rule] = (make(), models.get(rule))
            result, algorithm = found[rule]
            if algorithm is not None:
                models[rule] = algorithm
            return result

        return attempt

    attempts = {r: None if f is None else remembered(r, f) for r, f in attempts.items()}

    def accept(rule: str, ica: IcaResult) -> tuple[int, Curves, Aif]:
        try:
            baseline = baseline_frames(signal, ica.mask, grid_s, meta.subtracted)
        except NoBaseline:
            if no_baseline is not None:
                no_baseline.add(rule)
            raise
        concentration = signal.minus_baseline(baseline)
        aif = measure_aif(concentration, ica.mask, grid_s, baseline, sigma, aif_settings)
        width = fwhm_s(aif.curve, grid_s)
        if first_live_s is not None and aif.arrival_s <= first_live_s:
            live = aif.curve[grid_s >= first_live_s]
            swing = float(live.max() - live.min()) / aif.peak if live.size else 0.0
            if swing < MIN_LIVE_SWING:
                raise PipelineError(
                    f"its opacity is there from the first live frame and changes by "
                    f"{swing:.0%} of its peak over the live frames: no bolus passes through "
                    "it within the run (static opacity: a misregistered mask or a device)"
                )
        if width < MIN_AIF_WIDTH_S:
            raise PipelineError(
                f"its AIF is above half its peak for {width:.2f} s only: contrast in a single "
                "frame, not a bolus passage"
            )
        return baseline, concentration, aif

    order = ica_order(mode, package is not None)
    located, (baseline, concentration, aif) = locate(order, attempts, accept, refused)
    classical = AlgorithmInfo(name=NAME, version=VERSION, family="classical")
    return Input(located, models.get(located.rule, classical), baseline, concentration, aif)


def restrict_maps(maps: Maps, field: np.ndarray) -> Maps:
    """The maps with everything outside the collimated field invalid and zero."""
    valid = maps.valid & field

    def cut(values: np.ndarray) -> np.ndarray:
        return np.where(valid, values, 0.0).astype(values.dtype)

    return replace(
        maps,
        cbf=cut(maps.cbf),
        cbv=cut(maps.cbv),
        mtt=cut(maps.mtt),
        tmax=cut(maps.tmax),
        ttp=cut(maps.ttp),
        regularisation=cut(maps.regularisation),
        valid=valid,
        brain=maps.brain & field,
    )


@dataclass(frozen=True)
class Prepared:
    """The frames the maps are computed from, and what follows from them alone."""

    frames: np.ndarray
    times: np.ndarray
    meta: RunMeta
    timing: Timing
    sigma: float
    signal: Curves
    image: np.ndarray
    # The time of the first live frame when blank subtracted mask frames before it
    # are kept as the baseline (see ``ica_and_aif``); None when none is kept.
    first_live_s: float | None = None
    # The head drift after the mask, measured; taken out of ``signal`` with the
    # drift_correction option (``drift.py``).
    drift: Drift = Drift(0.0)
    # The signal as measured when a drift was taken out of ``signal``: the ICA rules
    # look for the ICA in it (see ``ica_and_aif``); None otherwise.
    located_on: Curves | None = None

    @classmethod
    def of(
        cls,
        frames: np.ndarray,
        times: np.ndarray,
        meta: RunMeta,
        inside: np.ndarray | None,
        first_live_s: float | None = None,
        drift_correction: bool = False,
    ) -> Prepared:
        timing = uniform_grid(times)
        weights = resample_weights(times, timing.grid_s)
        measured = contrast_signal(frames, meta)
        sigma = noise_sigma(measured, inside)
        blank = int(np.sum(times < first_live_s)) if first_live_s is not None else 0
        raw_signal, drift = remove_drift(
            measured,
            sigma,
            inside,
            meta.pixel_spacing_mm,
            start=blank,
            times_s=times,
            apply=drift_correction,
        )
        # The grid curves stay lazy (acquired frames and the interpolation
        # matrix): memory follows the run, not the grid (see ``timing.Curves``).
        return cls(
            frames=frames,
            times=times,
            meta=meta,
            timing=timing,
            sigma=sigma,
            signal=Curves(raw_signal, weights),
            image=minip(frames),
            first_live_s=first_live_s,
            drift=drift,
            located_on=Curves(measured, weights) if drift.course is not None else None,
        )


@dataclass(frozen=True)
class Choice:
    """The ICA, AIF and maps chosen for one set of frames."""

    prepared: Prepared
    left_out: np.ndarray  # (T,) frames of the run not used (the blank mask frame)
    found: Input
    maps: Maps
    width: float
    others: str
    rank: tuple[int, float]  # lower is better
    passed_for_no_baseline: bool  # an earlier rule's ICA held contrast in the first frame


# Smallest frame side (pixels) perfusion analyses.
MIN_SIDE = 8


def _maps_of(
    found: Input,
    prepared: Prepared,
    map_settings: MapSettings,
    device: torch.device,
    inside: np.ndarray | None,
    max_lead_s: float | None = None,
) -> Maps:
    """The maps for this ICA and AIF, kept to the exposed field (``inside``)."""
    maps = compute_maps(
        found.concentration,
        found.aif,
        prepared.sigma,
        found.located.ica.mask,
        prepared.meta.pixel_spacing_mm,
        map_settings,
        device,
        max_lead_s=max_lead_s,
    )
    return restrict_maps(maps, inside) if inside is not None else maps


def _bounded_lead(
    choice: Choice,
    map_settings: MapSettings,
    device: torch.device,
    inside: np.ndarray | None,
) -> Choice:
    """The chosen AIF's maps again with its lead bounded by ``MAX_LEAD_S``
    (``maps.aif_lead``), when they give a value to at least ``BOUNDED_KEEP`` of the
    pixels the maps without the bound did; else the choice as it was. Head motion
    during the bolus wraps a minority of the residues round to seconds before the
    AIF, and the whole Tmax map was measured from them; a late AIF that most of the
    brain fills before has a long lead that is real. The AIF was chosen without the
    bound, so the choice between candidates is not changed by it."""
    try:
        bounded = _maps_of(choice.found, choice.prepared, map_settings, device, inside, MAX_LEAD_S)
    except PipelineError:  # no brain with the bound (the masks follow the lead)
        return choice
    if bounded.valid.sum() < BOUNDED_KEEP * choice.maps.valid.sum():
        return choice
    return replace(choice, maps=bounded)


def _doubt(aif: Aif, maps: Maps, max_tail: float) -> tuple[bool, bool, float]:
    """How doubtful an AIF is, as a sort key: fed after too much of the brain first,
    then no washout (it ends above ``max_tail`` of its peak), then the share of the
    brain reached before it. (False, False, ...): not doubtful."""
    return (maps.early_share > MAX_BRAIN_BEFORE_AIF, aif.tail > max_tail, maps.early_share)


class DsaPerfusion:
    name = NAME

    def __call__(self, run: Run, ctx: PipelineContext) -> PipelineResult:
        map_settings, ica_settings, aif_settings, ica_mode, site_rules, drift_correction = (
            _settings(ctx.options)
        )
        # Curves are per pixel; the ICA, field and brain rules need a few pixels
        # around each (the frame count is acquisition_times' to check).
        require_2d_run(run, NAME, 1, min_side=MIN_SIDE)
        notes: list[str] = []
        device = _device(ctx, notes)
        all_frames = run.pixels
        all_times = acquisition_times(run.meta, all_frames.shape[0])
        field = exposed_field(all_frames, run.meta)
        inside = field.mask if field.collimated else None
        mask_frames = subtracted_mask_frames(all_frames, run.meta, inside)
        order = ica_order(ica_mode, ctx.model_package is not None)

        def attempt(left_out: np.ndarray) -> Choice:
            # Boolean indexing copies: only when a frame is left out.
            frames, times = (
                (all_frames[~left_out], all_times[~left_out])
                if left_out.any()
                else (all_frames, all_times)
            )
            live = np.flatnonzero(~mask_frames)
            kept = mask_frames.any() and not left_out.any() and live.size > 0
            return self._choose(
                Prepared.of(
                    frames,
                    times,
                    run.meta,
                    inside,
                    float(all_times[live[0]]) if kept else None,
                    drift_correction,
                ),
                left_out,
                ctx,
                ica_mode,
                (ica_settings, aif_settings, site_rules),
                map_settings,
                device,
                inside,
                order,
            )

        try:
            choice: Choice | None = attempt(mask_frames)
            failure: PipelineError | None = None
        except PipelineError as exc:
            choice, failure = None, exc
        if mask_frames.any() and (choice is None or choice.passed_for_no_baseline):
            # An ICA that already holds contrast in the first live frame has no live
            # pre-contrast sample; the blank mask frame is one (see aif.subtracted_mask_frames).
            try:
                kept = attempt(np.zeros_like(mask_frames))
            except PipelineError as exc:
                kept = None
                if failure is not None:  # both refused: the reasons of both
                    failure = PipelineError(
                        f"{failure}; again with the subtracted mask frame(s) kept as the "
                        f"baseline: {exc}"
                    )
            if kept is not None and (choice is None or kept.rank < choice.rank):
                choice = kept
        if choice is None:
            assert failure is not None
            raise failure
        if choice.maps.tmax_lead_s > MAX_LEAD_S:
            choice = _bounded_lead(choice, map_settings, device, inside)
        prepared, found, maps, width, others = (
            choice.prepared,
            choice.found,
            choice.maps,
            choice.width,
            choice.others,
        )
        frames, times, timing, image = (
            prepared.frames,
            prepared.times,
            prepared.timing,
            prepared.image,
        )
        notes.append(timing.describe())
        if prepared.drift.course is not None:
            notes.append(prepared.drift.describe())
        if choice.left_out.any():
            numbers = ", ".join(str(int(i) + 1) for i in np.flatnonzero(choice.left_out))
            notes.append(
                f"frame(s) {numbers} left out: the subtracted mask (a blank frame), "
                "not a measurement"
            )
        elif mask_frames.any():
            numbers = ", ".join(str(int(i) + 1) for i in np.flatnonzero(mask_frames))
            notes.append(
                f"frame(s) {numbers}, the subtracted mask (a blank frame), kept as the "
                "baseline: the ICA holds contrast from the first live frame on"
            )
        if field.collimated:
            notes.append(field.describe())
        ica, aif, algorithm = found.located.ica, found.aif, found.algorithm
        notes.append(found.located.describe)
        if others:
            notes.append(others)
        notes.extend(aif.flags)
        if not maps.valid.any():
            raise PipelineError("no pixel inside the exposed field has a perfusion estimate")
        quality = self._quality(
            frames, times, timing.grid_s, found, maps, inside, width, prepared.drift
        )
        if quality.verdict is Verdict.FAILED:
            raise PipelineError(
                "perfusion result failed its checks: "
                + "; ".join(
                    [*quality.reasons, found.located.describe, *([others] if others else [])]
                )
            )
        method = maps.method
        notes.append(
            f"ICA: {ica.method}, {int(ica.mask.sum())} px, {ica.components} part(s)"
            + (", largest kept" if ica_settings.keep_largest else "")
            + f"; AIF peak {aif.peak:.4g} at {aif.peak_time_s:.2f} s, arrival {aif.arrival_s:.2f} s, "
            f"SNR {aif.snr:.0f}; deconvolution {method}; CBF 1 = {maps.cbf_median_per_s:.4g}/s "
            f"(AIF units); {map_settings.describe_mask()}"
        )
        if aif.upstream_s > 0 and maps.tmax_lead_s <= 0:
            notes.append(
                "Tmax measured from the bolus's arrival at the upstream end of the AIF region, "
                f"{aif.upstream_s:.2f} s before the region's mean curve"
            )
        if maps.tmax_lead_s > 0:
            notes.append(
                f"Tmax measured from the earliest brain, {maps.tmax_lead_s:.2f} s before the "
                f"AIF's arrival: {maps.early_share:.0%} of the brain fills before the AIF, "
                "which lies downstream of it"
            )
        if maps.rejected:
            notes.append(
                "brain pixels without a value (physically impossible estimates): "
                + ", ".join(f"{why} {count}" for why, count in maps.rejected.items())
            )
        rule = RULE_NAMES[found.located.rule]
        outputs: list[Any] = [ImageOutput(key="minip", pixels=image, description="MinIP")]
        outputs += self._maps(maps, image, algorithm, method, map_settings)
        outputs.append(
            SegmentationOutput(
                key="aif_region",
                masks=aif.mask[None],
                segments=[AIF_SEGMENT],
                algorithm=algorithm,
                geometry="canvas",
                description=f"Perfusion AIF region ({rule})",
            )
        )
        outputs.append(
            RenderingOutput(
                key="aif_plot",
                rgb=aif_figure(image, ica.mask, aif, [f"AIF: ICA by the {rule} rule, {method}"]),
                description="Perfusion AIF and ICA mask",
            )
        )
        outputs.append(
            MeasurementsOutput(
                key="aif",
                title="Perfusion DSA arterial input function",
                measurements=[
                    Measurement(TIME_OF_PEAK_CONCENTRATION, aif.peak_time_s, UCUM_SECOND),
                    Measurement(PEAK_VALUE, aif.peak, UCUM_ARBITRARY),
                    Measurement(BOLUS_ARRIVAL, aif.arrival_s, UCUM_SECOND),
                ],
                algorithm=algorithm,
                finding_site=ICA,
                region=aif.mask,
                quality=quality.measures,
            )
        )
        return PipelineResult(outputs=outputs, notes=notes, quality=quality)

    def _choose(
        self,
        prepared: Prepared,
        left_out: np.ndarray,
        ctx: PipelineContext,
        ica_mode: str,
        settings: tuple[IcaSettings, AifSettings, tuple[SiteRule, ...]],
        map_settings: MapSettings,
        device: torch.device,
        inside: np.ndarray | None,
        order: list[str],
    ) -> Choice:
        """The ICA, AIF and maps for these frames.

        An AIF that most of the brain fills before is not the feeding artery, and
        one that does not wash out within the run (``AifSettings.max_tail_fraction``)
        is doubtful: opacity that rises and stays is what the bone edges of a mask
        the head moved from look like, and a device. The rule's next candidate
        tries, then the next rule; if none passes, the least doubtful stays, low
        confidence (``_doubt``; a package's AIF comes first, and need not be that one).
        In a run cut short before the bolus washes out, no artery washes out, and
        the first AIF that feeds the brain stays.
        """
        refused: dict[str, dict[int, str]] = {}
        no_baseline: set[str] = set()
        candidates: dict[str, tuple[Any, AlgorithmInfo | None]] = {}
        best: tuple[Input, Maps, float] | None = None
        max_tail = settings[1].max_tail_fraction
        others = ""
        while True:
            try:
                found = ica_and_aif(
                    prepared.image,
                    prepared.signal,
                    prepared.times,
                    prepared.timing.grid_s,
                    prepared.sigma,
                    prepared.meta,
                    ctx,
                    ica_mode,
                    settings,
                    device,
                    inside,
                    refused,
                    no_baseline,
                    first_live_s=prepared.first_live_s,
                    found=candidates,
                    located_on=prepared.located_on,
                )
            except PipelineError as exc:
                if best is None:
                    raise
                found, maps, width = best
                others = f"no other ICA rule did better ({exc})"
                break
            width = fwhm_s(found.aif.curve, prepared.timing.grid_s)
            try:
                maps = _maps_of(found, prepared, map_settings, device, inside)
            except PipelineError as exc:  # no brain for this AIF: the next candidate tries
                refused.setdefault(found.located.rule, {})[found.located.candidate] = str(exc)
                continue
            fed_late, no_washout, _ = doubt = _doubt(found.aif, maps, max_tail)
            if not (fed_late or no_washout):
                break
            if best is None or doubt < _doubt(best[0].aif, best[1], max_tail):
                best = (found, maps, width)
            refused.setdefault(found.located.rule, {})[found.located.candidate] = (
                f"{maps.early_share:.0%} of the brain fills before its AIF: not the feeding artery"
                if fed_late
                else f"its AIF ends at {found.aif.tail:.0%} of its peak: no washout within the "
                "run (the edge of a mask the head moved from, a device, or a run cut short)"
            )
        rank = order.index(found.located.rule)
        return Choice(
            prepared=prepared,
            left_out=left_out,
            found=found,
            maps=maps,
            width=width,
            others=others,
            # Ranked by the rule that served, then by the brain filling before the AIF.
            rank=(rank, maps.early_share),
            passed_for_no_baseline=any(order.index(r) < rank for r in no_baseline),
        )

    def _quality(
        self,
        frames: np.ndarray,
        times: np.ndarray,
        grid: np.ndarray,
        found: Input,
        maps: Maps,
        inside: np.ndarray | None,
        width: float,
        drift: Drift,
    ) -> Quality:
        """The measures of ``pipelines.perfusion.quality`` for this run."""
        aif = found.aif
        field = inside if inside is not None else np.ones(maps.valid.shape, bool)
        ica_share, field_share = saturation(frames, aif.mask, inside)
        region = np.asarray(ndimage.binary_fill_holes(maps.brain)) & field
        brighter = maps.brighter if maps.brighter is not None else np.zeros_like(field)
        return assess_perfusion(
            Findings(
                aif_snr=aif.snr,
                aif_fwhm_s=width,
                aif_tail=aif.tail,
                baseline_frames=int(np.sum(times < aif.arrival_s)),
                first_pass_gap_s=first_pass_gap(times, aif.curve, grid),
                aif_saturation=ica_share,
                field_saturation=field_share,
                misregistration=float((brighter & field).sum()) / max(float(field.sum()), 1.0),
                drift_share=drift.share,
                drift_removed=drift.course is not None,
                drift_left_in=drift.left_in,
                brain_share=float(region.sum()) / max(float(field.sum()), 1.0),
                no_value_share=1.0 - float(maps.valid.sum()) / max(float(region.sum()), 1.0),
                early_share=maps.early_share,
                ica_rule=found.located.rule,
            )
        )

    def _maps(
        self,
        maps: Maps,
        image: np.ndarray,
        algorithm: AlgorithmInfo,
        method: str,
        settings: MapSettings,
    ) -> list[Any]:
        specs = [
            (
                "cbf",
                "CBF",
                maps.cbf,
                RELATIVE_CBF,
                UCUM_RATIO,
                "ratio",
                "relative CBF (uncalibrated DSA), 1 = brain median",
            ),
            (
                "cbv",
                "CBV",
                maps.cbv,
                RELATIVE_CBV,
                UCUM_RATIO,
                "ratio",
                "relative CBV = tissue/AIF area (uncalibrated DSA)",
            ),
            ("mtt", "MTT", maps.mtt, MEAN_TRANSIT_TIME, UCUM_SECOND, "s", "MTT = CBV/CBF (s)"),
            (
                "tmax",
                "TMAX",
                maps.tmax,
                TMAX,
                UCUM_SECOND,
                "s",
                "Tmax = time the residue reaches its peak, after the AIF (s)"
                if maps.tmax_lead_s <= 0
                # the AIF is downstream of part of the brain: see maps.aif_lead
                else "Tmax = time the residue reaches its peak, after the earliest brain, "
                f"{maps.tmax_lead_s:.2f} s before the AIF (s)",
            ),
            (
                "ttp",
                "TTP",
                maps.ttp,
                TIME_TO_PEAK,
                UCUM_SECOND,
                "s",
                "TTP = tissue peak time after the first frame (s)",
            ),
        ]
        outputs: list[Any] = []
        mask_note = settings.describe_mask()
        for key, label, values, quantity, unit, unit_text, text in specs:
            outputs.append(
                ParametricMapOutput(
                    key=key,
                    values=values,
                    label=label,
                    quantity=quantity,
                    unit=unit,
                    algorithm=algorithm,
                    description=f"{text}; {method}; no value outside the mask ({mask_note})",
                    valid=maps.valid,
                )
            )
            outputs.append(
                RenderingOutput(
                    key=f"{key}_color",
                    rgb=color_map(
                        values, maps.valid, image, label, unit_text, [f"{text}; {method}"]
                    ),
                    description=f"Perfusion {label} colour map",
                )
            )
        return outputs


@register(NAME)
def _factory() -> DsaPerfusion:
    return DsaPerfusion()
