"""Cerebral 2D DSA phantom: a selective ICA run with exact truth.

``generate(seed)`` builds the 3D anatomy (``cerebral``), projects it
(``raster``, ``head``), gives every vessel and region a contrast curve
(``timing``, ``perfusion``) and forms frames with dose-dependent quantum noise
(``physics``). ``DSAPhantom.write`` turns the result into DICOM
(``dicom_xa``) with the truth beside it.

Geometry: 230 mm field at the isocentre whatever the matrix, source-image
distance 1200 mm, source-isocentre 780 mm (magnification 1.54), so
``pixel_spacing_mm`` (isocentre) = Imager Pixel Spacing / 1.54.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from pipelines.base import Run, RunMeta
from training.phantoms import (
    appearance,
    cerebral,
    cerebral_devices,
    lesions,
    physics,
    priors,
    timing,
    xa_effects,
)
from training.phantoms.dicom_common import options_key
from training.phantoms.errors import PhantomOptionError
from training.phantoms.head import head_primitives, project_head
from training.phantoms.perfusion import PerfusionDRO, PerfusionRegion, build_dro
from training.phantoms.raster import Projection, render_tree
from training.phantoms.vessels import VesselTree, chain_ids

XA_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.12.1"
FOV_MM = 230.0
SID_MM = 1200.0
SOD_MM = 780.0
# (axis of increasing column, axis of increasing row, primary angle, secondary angle, Patient Orientation)
VIEWS: dict[
    str,
    tuple[tuple[float, float, float], tuple[float, float, float], float, float, tuple[str, str]],
] = {
    "lateral": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0), -90.0, 0.0, ("P", "F")),
    "ap": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0), 0.0, 0.0, ("L", "F")),
}
IMAGE_CENTRE_MM = np.array([0.0, 5.0, -25.0])


@dataclass(frozen=True)
class Acquisition:
    """Header facts of the run (X-Ray Acquisition, Positioner, Contrast/Bolus)."""

    view: str
    primary_angle: float
    secondary_angle: float
    patient_orientation: tuple[str, str]
    kvp: float
    tube_current_ma: float
    pulse_ms: float
    sid_mm: float
    sod_mm: float
    fps: tuple[float, float]
    quanta_per_pixel: float  # N0, unattenuated detected quanta; 0 when noise-free
    snr: float | None
    snr_reference: str
    contrast_volume_ml: float
    contrast_rate_ml_s: float
    iodine_mg_ml: float = 300.0

    @property
    def magnification(self) -> float:
        return self.sid_mm / self.sod_mm


@dataclass
class DSAPhantom:
    """A generated DSA run and its truth (see ``docs/phantoms.md``).

    ``pixels`` are the stored values as written to DICOM. ``truth`` masks and
    maps are on the same (H, W) grid; perfusion maps are NaN outside the DRO
    regions (``region_labels == 0``).
    """

    seed: int
    native: bool
    pixels: np.ndarray
    mask_pixels: np.ndarray | None
    frame_times_s: np.ndarray
    pixel_spacing_mm: tuple[float, float]
    truth: dict[str, np.ndarray]
    aif: np.ndarray
    region_labels: np.ndarray
    regions: tuple[PerfusionRegion, ...]
    acquisition: Acquisition
    timing: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)
    # Randomised runs: how the pixels are stored (bits, window, shutter, text,
    # lossy history) and the drawn appearance; None for the default appearance.
    presentation: xa_effects.Presentation | None = None
    appearance: dict[str, Any] | None = None

    kind = "dsa"

    @property
    def image_type(self) -> tuple[str, ...]:
        if self.native:
            return ("ORIGINAL", "PRIMARY", "SINGLE PLANE")
        return ("DERIVED", "PRIMARY", "SINGLE PLANE", "SUBTRACTION")

    def to_run(self, subtract: bool = True) -> Run:
        """The run as the node decodes it.

        A native run is log-subtracted against its mask (``subtract=True``, the
        node's behaviour for a Mask Subtraction Sequence) on the same scale as
        the subtracted variant; ``subtract=False`` gives the raw live frames.
        """
        pixels = self.pixels.astype(np.float32)
        subtracted = not self.native
        if self.native and subtract:
            mask = self.mask_pixels.astype(np.float64).mean(axis=0)
            pixels = physics.subtracted_values(self.pixels.astype(np.float64), mask).astype(
                np.float32
            )
            subtracted = True
        t, h, w = self.pixels.shape
        meta = RunMeta(
            modality="XA",
            sop_class_uid=XA_SOP_CLASS,
            rows=h,
            columns=w,
            number_of_frames=t,
            frame_times_s=self.frame_times_s.copy(),
            pixel_spacing_mm=self.pixel_spacing_mm,
            image_type=self.image_type,
            body_part="HEAD",
            series_description=self.series_description,
            subtracted=subtracted,
            is_volume=False,
            frame_rate=self.acquisition.fps[0],
            extra={
                "phantom": "dsa",
                "seed": self.seed,
                "view": self.acquisition.view,
                "native": self.native,
            },
        )
        return Run(pixels=pixels, meta=meta)

    @property
    def series_description(self) -> str:
        return f"R ICA {self.acquisition.view.upper()} {'NATIVE' if self.native else 'DSA'}"

    def regions_table(self) -> np.ndarray:
        """The DRO regions as a structured array: label, territory, state, residue, cbf, cbv, mtt_s, delay_s."""
        return PerfusionDRO(self.region_labels, self.regions, self.truth["tissue_path_mm"]).table()

    def write(
        self, directory: str | Path, encoding: str = "explicit", seg: bool = False
    ) -> list[Path]:
        """Write the run as XA DICOM plus truth (.npz, README); ``seg`` adds a MinIP canvas and SEG."""
        from training.phantoms import dicom_xa

        return dicom_xa.write_dsa(self, Path(directory), encoding=encoding, seg=seg)


def generate(
    seed: int,
    size: int | tuple[int, int] | None = None,
    frames: int = 20,
    native: bool = False,
    *,
    fps: float | tuple[float, float] | None = None,
    frame_times_s: Sequence[float] | None = None,
    snr: float | None = 60.0,
    snr_reference: str = "artery",
    noise: bool = True,
    motion_mm: float = 0.0,
    motion_kind: str = "drift",
    view: str | None = None,
    venous_delay_s: float | None = None,
    lesion: bool | None = None,
    devices: bool = True,
    randomise: bool | priors.DSAPriors = False,
) -> DSAPhantom:
    """Generate one cerebral DSA run; deterministic for (seed, options).

    Anatomy depends only on ``seed`` (and the anatomy priors when randomised);
    options change acquisition, not anatomy.

    Args:
        seed: patient/anatomy seed (also sets Patient ID and UIDs).
        size: matrix, 64-2048: an int (square) or (rows, columns). None: 512,
            or drawn from the priors (512-1024, non-square too) when randomised.
            The field of view stays 230 mm across the longer side unless randomised.
        frames: number of frames (ignored when ``frame_times_s`` is given).
        native: unsubtracted live frames over skull and soft tissue, with the
            mask in ``mask_pixels``; default is the log-subtracted run.
        fps: a float for a constant rate (e.g. 4 or 1), a (fast, slow) pair,
            or None for a seeded variable protocol (2-4 fps arterial and
            capillary phase, then 0.5-1 fps), written as a Frame Time Vector.
        frame_times_s: explicit frame times in s (first must be 0).
        snr: dose, as signal-to-noise ratio: peak signal of the reference
            (see ``snr_reference``) over the noise standard deviation of a
            subtracted frame, median over the brain. DSA frames (1-3 uGy at
            the detector) give an ICA SNR of about 60-80 at 512^2 and half
            that at 1024^2; 20-50 is a low-dose or perfusion stress range.
            None, or ``noise=False``, gives noise-free frames.
        snr_reference: "artery" (peak ICA signal, the default) or "tissue"
            (median peak capillary-blush signal; use for perfusion tests).
        noise: False turns quantum noise off (same as ``snr=None``).
        motion_mm: in-plane head drift after the mask, mm (0 = none); leaves
            skull-edge misregistration in the subtraction (truth in the mask's
            geometry, later frames displaced by ``truth['motion_px']``).
        motion_kind: "drift" (smooth, rigid, one direction) or "jerks" (one to
            three quick moves in their own directions, a tremor, and soft tissue
            that stretches on a course of its own: ``physics.motion_track``).
        view: "lateral" or "ap"; None draws one from the seed (3:1 lateral).
        venous_delay_s: superior sagittal sinus peak minus ICA peak, 1-10 s;
            None draws it from the seed.
        lesion: force (True) or forbid (False) a hypoperfused DRO area.
        devices: include the guide catheter (and, by seed, a coiled aneurysm).
        randomise: True (or a ``priors.DSAPriors``) draws anatomy variation,
            geometry, contrast, acquisition and artefacts from the priors (see
            ``training.phantoms.priors``). Options left at their defaults are
            drawn; options you set (size, fps, frame_times_s, snr other than
            60, view, venous_delay_s, noise=False, devices=False) win.
    """
    pri = priors.resolve(randomise, priors.DSA)
    app = None if pri is None else appearance.draw_dsa(seed, pri, size, native)
    if app is not None:
        rows, cols = app.rows, app.cols
    elif size is None or np.isscalar(size):
        rows = cols = int(512 if size is None else size)  # type: ignore[arg-type]
    else:
        rows, cols = (int(v) for v in size)  # type: ignore[union-attr]
    for side in (rows, cols):
        if not 64 <= side <= 2048:
            raise PhantomOptionError(f"size must be 64-2048, got {size}")
    n = max(rows, cols)  # rendered square, cropped to (rows, cols) at the end
    if snr_reference not in ("artery", "tissue"):
        raise PhantomOptionError(
            f"snr_reference must be 'artery' or 'tissue', got {snr_reference!r}"
        )
    if snr is not None and snr <= 0:
        raise PhantomOptionError(f"snr must be positive or None, got {snr}")
    if app is not None and snr == 60.0:
        snr = app.snr
    rng = np.random.default_rng([seed, 0x51])
    variation = None if pri is None else cerebral.draw_variation(seed, pri.anatomy)
    anatomy = cerebral.build(seed, variation)
    if view is None:
        view = "lateral" if rng.random() < 0.75 else "ap"
    if view not in VIEWS:
        raise PhantomOptionError(f"view must be one of {sorted(VIEWS)}, got {view!r}")
    u, v, primary, secondary, orientation = VIEWS[view]
    u, v, centre_mm = np.array(u), np.array(v), IMAGE_CENTRE_MM
    spacing = FOV_MM / n
    if app is not None:
        u, v, primary, secondary, orientation = _oblique(u, v, primary, secondary, app)
        shift = app.centre_shift_mm
        centre_mm = IMAGE_CENTRE_MM + shift[0] * u + shift[1] * v
        spacing = app.field_mm / n
    proj = Projection(u, v, centre_mm, spacing, n)

    arrival, alpha = float(rng.uniform(0.6, 1.4)), float(rng.uniform(2.5, 4.0))
    rise = float(rng.uniform(0.9, 1.5))  # arrival to peak, s
    bolus = timing.Bolus(
        arrival_s=arrival, alpha=alpha, beta_s=rise / alpha, peak=float(rng.uniform(0.45, 0.65))
    )
    if venous_delay_s is None:
        venous_delay_s = float(rng.uniform(3.5, 5.5)) if app is None else app.venous_delay_s
    if motion_kind not in physics.MOTION_KINDS:
        raise PhantomOptionError(
            f"motion_kind must be one of {physics.MOTION_KINDS}, got {motion_kind!r}"
        )
    if not 1.0 <= venous_delay_s <= 10.0:
        raise PhantomOptionError(f"venous_delay_s must be 1-10 s, got {venous_delay_s}")
    if app is not None:
        bolus = timing.Bolus(
            arrival_s=app.arrival_s,
            alpha=app.alpha,
            beta_s=app.rise_s / app.alpha,
            peak=app.peak,
            recirculation=app.recirculation,
            duration_s=app.injection_s,
        )
    if frame_times_s is not None:
        times = np.asarray(frame_times_s, float)
        if times.ndim != 1 or len(times) < 2 or times[0] != 0 or np.any(np.diff(times) <= 0):
            raise PhantomOptionError("frame_times_s must start at 0 and increase strictly")
        rates = (float(1.0 / np.diff(times).min()), float(1.0 / np.diff(times).max()))
    elif app is not None and fps is None:
        times, rates, bolus = _randomised_schedule(seed, frames, app, bolus, venous_delay_s)
    else:
        times, rates = timing.frame_schedule(frames, fps, rng, fast_phase_s=bolus.peak_time_s + 2.0)

    t = timing.fine_grid(times)
    a_fine = timing.aif(t, bolus)
    a_peak = bolus.peak_time_s if app is None else float(t[np.argmax(a_fine)])
    dro = build_dro(seed, anatomy, proj, lesion=lesion)

    # Arteries: transit delays from the ICA, plus the region's extra delay for
    # small branches inside a hypoperfused region (collateral filling).
    art = anatomy.arteries
    art_delay = art.delay.copy()
    uv = np.clip(np.rint(proj.uv(art.points)).astype(int), 0, n - 1)
    node_region = dro.labels[uv[:, 1], uv[:, 0]]
    for r in dro.regions:
        if r.state != "normal":
            sel = (node_region == r.label) & (art.radius < 0.5)
            art_delay[sel] += max(0.0, r.delay_s - 0.8)
    art_groups, art_curves = _groups(
        art_delay, 0.05, lambda d: timing.dispersed(t, a_fine, d, 0.25 * d)
    )
    ica_label = art.label_of("ica")
    art_img = render_tree(
        art,
        proj,
        art_groups,
        len(art_curves),
        mask_class=(art.label == ica_label).astype(int),
        n_masks=2,
        weight=None if app is None else _partial_filling(seed, art, app.partial_filling),
    )
    vein = anatomy.veins
    vein_groups, vein_curves = _groups(
        vein.delay + venous_delay_s,
        0.1,
        lambda d: timing.venous_curve(t, a_fine, a_peak, d),
    )
    vein_img = render_tree(vein, proj, vein_groups, len(vein_curves), weight=vein.dilution)

    tissue_fine = (
        np.stack(
            [
                timing.tissue_curve(t, a_fine, r.cbf, r.mtt_s, r.delay_s, r.residue)
                for r in dro.regions
            ]
        )
        if dro.regions
        else np.zeros((0, len(t)))
    )

    # Iodine path (mm of full-strength contrast) per frame.
    sample = lambda curves: np.stack([timing.sample(t, c, times) for c in curves])  # noqa: E731
    iodine = np.tensordot(sample(art_curves), art_img.thickness_mm, axes=(0, 0))
    iodine += np.tensordot(sample(vein_curves), vein_img.thickness_mm, axes=(0, 0))
    tissue_frames = np.zeros((len(times), n, n), np.float32)
    weights, interior = _region_weights(dro, spacing)
    if dro.regions:
        tissue_frames = np.tensordot(sample(tissue_fine), weights, axes=(0, 0)) * dro.path_mm[None]
    iodine += tissue_frames
    art_mask = art_img.cover[0] | art_img.cover[1]
    sac_diameter = np.zeros((n, n), np.float32)
    for centre, radius, delay in anatomy.aneurysms:
        # A sac fills from its parent and washes out slowly (stasis).
        path, cover = lesions.project_sphere(centre, radius, proj)
        curve = timing.dispersed(t, a_fine, delay, 1.0 + 0.25 * radius)
        iodine += sample([curve])[0][:, None, None] * path[None]
        art_mask |= cover
        sac_diameter = np.where(cover, np.maximum(sac_diameter, 2 * radius), sac_diameter)

    device_att, device_mask, lumen = cerebral_devices.devices(
        anatomy, proj, rng, enabled=devices, micro=app is not None and app.microcatheter
    )
    injection_start = bolus.arrival_s - 0.3
    iodine += lumen[None] * (times >= injection_start)[:, None, None]

    head_rng = np.random.default_rng([seed, 0x4E])
    prims = head_primitives(anatomy.brain, head_rng)
    if app is not None:
        prims = [replace(p, mu=p.mu * app.bone_scale) if p.bone_texture else p for p in prims]
    background = project_head(prims, proj, head_rng) + device_att
    mu_iodine = physics.MU_IODINE * (1.0 if app is None else app.iodine_scale)
    attenuation = background[None] + mu_iodine * iodine

    motion = physics.motion_track(
        times, motion_mm, np.random.default_rng([seed, 0x30]), motion_kind
    )
    centre = ((n - 1) / 2.0, (n - 1) / 2.0)
    if app is not None:
        # The head moved between the mask and the fill: the live frames keep the
        # truth's geometry, the mask is displaced (skull-edge misregistration).
        motion[0, :3] = app.misregistration
    for k in range(0 if app is not None else 1, len(times)):
        shift = (motion[k, 0] / spacing, motion[k, 1] / spacing)
        attenuation[k] = physics.warp(
            attenuation[k], shift, float(motion[k, 2]), centre, float(motion[k, 3])
        )

    ica_mask = art_img.cover[1]
    ica_c = ica_mask  # on the stored (cropped) grid
    brain_region = dro.path_mm > 0
    if not brain_region.any():
        brain_region = np.ones((n, n), bool)
    ica_path = (
        art_img.thickness_mm.sum(axis=0)[ica_mask]
        if ica_mask.any()
        else art_img.thickness_mm.sum(axis=0).ravel()
    )
    r0, c0 = (n - rows) // 2, (n - cols) // 2
    crop = (slice(r0, r0 + rows), slice(c0, c0 + cols))
    field = np.ones((rows, cols), bool)
    if n != rows or n != cols:
        attenuation, background = attenuation[(slice(None), *crop)], background[crop]
        ica_c, brain_region = ica_mask[crop], brain_region[crop]
        if not brain_region.any():
            brain_region = np.ones((rows, cols), bool)
    if app is not None and app.shutter is not None:
        field = app.shutter.field(rows, cols)
        attenuation += xa_effects.shutter_attenuation(
            field, app.shutter_transmission, app.shutter_penumbra_mm / spacing
        )[None]
        if (brain_region & field).any():
            brain_region = brain_region & field
    # Detected signal relative to N0: blurred primary plus scatter (grid in place).
    blur_mm = physics.DETECTOR_BLUR_MM if app is None else app.blur_mm
    detected_primary = physics.blur(np.exp(-attenuation), spacing, blur_mm)
    # Scatter and dose are set on a frame in the truth's geometry: the mask for the
    # default appearance, the first live frame when the mask may be misregistered.
    ref = 0 if app is None or len(times) < 2 else 1
    scatter = physics.scatter(
        detected_primary[ref],
        background > 1.0,
        brain_region,
        spacing,
        spr=float(rng.uniform(0.3, 0.6)) if app is None else app.scatter_ratio,
    )
    relative = detected_primary + scatter[None]
    keep = detected_primary[ref] / relative[ref]  # fraction of the log contrast that scatter leaves
    if app is not None:
        relative *= xa_effects.detector_gain(
            rows, cols, app.vignetting, app.heel, app.heel_angle, app.grid
        )[None]
    # Reference signals from the noise-free curves on the fine grid, so that the
    # dose does not depend on whether a frame happens to hit the peak.
    if snr_reference == "artery":
        att = mu_iodine * float(a_fine.max()) * float(np.percentile(ica_path, 99))
        f = float(np.median(keep[ica_c])) if ica_c.any() else float(np.median(keep))
        ref_signal = -np.log(1.0 - f * (1.0 - np.exp(-att)))
    else:
        tissue_peak = np.r_[0.0, tissue_fine.max(axis=1)][dro.labels] * dro.path_mm
        if n != rows or n != cols:
            tissue_peak = tissue_peak[crop]
        att = mu_iodine * tissue_peak[brain_region]
        ref_signal = float(np.median(-np.log(1.0 - keep[brain_region] * (1.0 - np.exp(-att)))))
    noisy = noise and snr is not None
    n0 = physics.dose_for_snr(ref_signal, relative[ref], brain_region, snr) if noisy else 1e6
    expected = n0 * relative
    noise_rng = np.random.default_rng([seed, 0x9A, len(times), n]) if noisy else None
    counts = physics.detected(expected, noise_rng)
    if noise_rng is not None and app is not None and app.electronic_noise > 0:
        sigma = app.electronic_noise * np.sqrt(float(np.median(expected[0][brain_region])))
        counts = counts + noise_rng.normal(0.0, sigma, size=counts.shape)

    presentation = None
    if native:
        gain = physics.native_gain(counts[0], brain_region)
        pixels = physics.native_values(counts, gain)
        mask_pixels = pixels[:1].copy()
    else:
        pixels = physics.subtracted_values(counts, counts[0])
        mask_pixels = None

    truth = _truth(
        art_mask, ica_mask, vein_img, art_img, device_mask, dro, t, tissue_fine, motion, spacing
    )
    truth["diameter_mm"] = np.maximum(truth["diameter_mm"], sac_diameter)
    truth["dro_interior"] = interior
    region_labels = dro.labels
    if n != rows or n != cols:
        truth = {k: (a[crop] if k != "motion_px" else a) for k, a in truth.items()}
        region_labels = region_labels[crop]
    overlay = np.zeros((rows, cols), bool)
    if app is not None:
        pixels, mask_pixels, overlay, presentation = _store(
            seed, app, counts, native, field, view, spacing
        )
    truth, region_labels = _clear_truth(truth, region_labels, field & ~overlay)
    truth["field"] = field
    truth["overlay"] = overlay
    aif_frames = timing.sample(t, a_fine, times)
    peak_ica = float(t[np.argmax(a_fine)])
    sss = vein.label_of("sss")
    sss_group = np.unique(vein_groups[vein.label == sss])
    sss_curve = np.mean([vein_curves[g] for g in sss_group], axis=0)
    acq = Acquisition(
        view=view,
        primary_angle=primary,
        secondary_angle=secondary,
        patient_orientation=orientation,
        kvp=float(rng.choice([70.0, 75.0, 80.0, 85.0])),
        tube_current_ma=float(rng.uniform(250, 500)),
        pulse_ms=float(rng.uniform(50, 100)),
        sid_mm=SID_MM if app is None else round(app.sid_mm, 1),
        sod_mm=SOD_MM if app is None else round(app.sid_mm / app.magnification, 1),
        fps=rates,
        quanta_per_pixel=n0 if noisy else 0.0,
        snr=snr if noisy else None,
        snr_reference=snr_reference,
        contrast_volume_ml=float(rng.choice([6.0, 7.0, 8.0])),
        contrast_rate_ml_s=float(rng.choice([4.0, 5.0, 6.0])),
    )
    if app is not None:
        acq = replace(
            acq,
            contrast_volume_ml=round(app.injection_rate_ml_s * app.injection_s, 1),
            contrast_rate_ml_s=round(app.injection_rate_ml_s, 1),
            iodine_mg_ml=round(300.0 * app.iodine_scale),
        )
    options: dict[str, Any] = {
        "size": size,
        "frames": len(times),
        "native": native,
        "fps": fps,
        "snr": snr if noisy else None,
        "snr_reference": snr_reference,
        "motion_mm": motion_mm,
        "motion_kind": motion_kind,
        "view": view,
        "venous_delay_s": venous_delay_s,
        "lesion": lesion,
        "devices": devices,
        "frame_times_s": None if frame_times_s is None else [float(x) for x in times],
    }
    if pri is not None:
        options["randomise"] = options_key(dataclasses.asdict(pri))
    elif size is None:
        options["size"] = 512
    return DSAPhantom(
        seed=seed,
        native=native,
        pixels=pixels,
        mask_pixels=mask_pixels,
        frame_times_s=times,
        pixel_spacing_mm=(spacing, spacing),
        truth=truth,
        aif=aif_frames.astype(np.float32),
        region_labels=region_labels,
        regions=dro.regions,
        acquisition=acq,
        timing={
            "t_fine_s": t.astype(np.float32),
            "aif_fine": a_fine.astype(np.float32),
            "bolus_arrival_s": bolus.arrival_s,
            "arterial_peak_s": peak_ica,
            "venous_peak_s": float(t[np.argmax(sss_curve)]),
            "venous_delay_s": venous_delay_s,
            "bolus_alpha": bolus.alpha,
            "bolus_beta_s": bolus.beta_s,
            "bolus_peak": bolus.peak,
            "tissue_fine": tissue_fine.astype(np.float32),
        },
        options=options,
        presentation=presentation,
        appearance=None if app is None else app.summary(),
    )


def _groups(delays: np.ndarray, step_s: float, curve_of) -> tuple[np.ndarray, list[np.ndarray]]:
    """Quantise node delays to ``step_s`` and compute one fine curve per distinct delay."""
    q = np.rint(delays / step_s).astype(np.int64)
    uniq, inverse = np.unique(q, return_inverse=True)
    return inverse, [curve_of(float(k * step_s)) for k in uniq]


def _oblique(u: np.ndarray, v: np.ndarray, primary: float, secondary: float, app) -> tuple:
    """Working projection: tilt about the image's horizontal axis, turn about the patient's
    long axis, and optionally mirror the display; returns axes, angles, orientation."""
    a, b = np.deg2rad(app.primary_offset_deg), np.deg2rad(app.secondary_offset_deg)
    v = v * np.cos(b) + np.cross(u, v) * np.sin(b)
    rz = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
    u, v = rz @ u, rz @ v
    if app.flip:
        u = -u
    orientation = (_letters(u), _letters(v))
    return u, v, primary + app.primary_offset_deg, secondary + app.secondary_offset_deg, orientation


def _letters(direction: np.ndarray) -> str:
    """Patient Orientation letters of a direction (LPS), strongest component first."""
    names = (("R", "L"), ("A", "P"), ("F", "H"))
    order = np.argsort(-np.abs(direction))
    out = [names[i][int(direction[i] > 0)] for i in order if abs(direction[i]) > 0.25]
    return "".join(out[:2]) or names[int(order[0])][int(direction[order[0]] > 0)]


def _randomised_schedule(seed: int, frames: int, app, bolus: timing.Bolus, venous_delay_s: float):
    """Frame times drawn from the priors, long enough to reach the venous phase; the bolus
    arrives within the first quarter of the run, so short fast runs still see it."""
    rng = np.random.default_rng([seed, 0x5A, 0xD7])
    end = bolus.peak_time_s + venous_delay_s + 2.0
    times, rates = timing.protocol_schedule(
        frames, app.fps, bolus.peak_time_s + 2.0, end, rng, app.frame_jitter, app.drop_frame
    )
    if bolus.arrival_s > 0.25 * times[-1]:
        bolus = replace(bolus, arrival_s=0.25 * float(times[-1]))
    return times, rates, bolus


def _partial_filling(seed: int, art: VesselTree, factor: float | None) -> np.ndarray | None:
    """Per-node contrast factor: one to four branches carry unopacified blood too."""
    if factor is None:
        return None
    rng = np.random.default_rng([seed, 0x5A, 0xD8])
    _, side = chain_ids(art.parent, art.radius)
    starts = np.flatnonzero(side & (art.radius > 0.4))
    if len(starts) == 0:
        return None
    roots = rng.choice(starts, size=min(int(rng.integers(1, 5)), len(starts)), replace=False)
    return lesions.subtree_factor(art.parent, roots, rng.uniform(factor, 1.0, size=len(roots)))


def _store(
    seed: int, app, counts: np.ndarray, native: bool, field: np.ndarray, view: str, spacing: float
):
    """Stored pixels of a randomised run: bit depth and vendor scale, then blanking, text and
    lossy JPEG (``xa_effects.finish``). Returns pixels, mask, overlay, presentation."""
    rng = np.random.default_rng([seed, 0x5A, 0xD6])
    bits = app.bits
    top = 2**bits - 1
    if native:
        # Linear in quanta with headroom: the neck and direct beam are several times
        # brighter than the brain.
        level = float(rng.uniform(0.03, 0.12)) * top
        gain = level / max(float(np.median(counts[-1][field])), 1.0)  # exposure set on live frames
        pixels = xa_effects.to_stored(counts, 0.0, gain, bits)
        window = (2.0 * level, 4.0 * level)
        grey = int(level)
    else:
        offset = float(2 ** (bits - 1))
        diff = np.log(np.maximum(counts, 1.0)) - np.log(np.maximum(counts[0], 1.0))
        # The vendor's scale, capped so the densest contrast stays inside the stored range.
        reach = float(np.percentile(np.abs(diff[:, field][:, ::7]), 99.9))
        gain = min(1000.0 * 2.0 ** (bits - 12) * app.display_gain, 0.95 * offset / max(reach, 1e-3))
        pixels = xa_effects.to_stored(diff, offset, gain, bits)
        window = (offset - 0.4 * gain, 1.5 * gain)
        grey = int(offset)
    pixels, overlay, presentation = xa_effects.finish(
        pixels,
        field,
        app,
        rng,
        bits,
        window,
        grey,
        view.upper(),
        spacing,
        lossy=not native,
        scale=None if native else (offset, gain),
    )
    return pixels, (pixels[:1].copy() if native else None), overlay, presentation


_NAN_OUTSIDE = ("cbf", "cbv", "mtt", "tmax", "ttp")


def _clear_truth(truth: dict[str, np.ndarray], region_labels: np.ndarray, keep: np.ndarray):
    """Truth outside the exposed field and under burned-in text is empty (NaN for perfusion)."""
    if keep.all():
        return truth, region_labels
    out = {}
    for key, a in truth.items():
        if key == "motion_px":
            out[key] = a
        elif a.dtype == bool:
            out[key] = a & keep
        elif key in _NAN_OUTSIDE:
            out[key] = np.where(keep, a, np.float32(np.nan)).astype(a.dtype)
        else:
            out[key] = np.where(keep, a, 0).astype(a.dtype)
    return out, np.where(keep, region_labels, 0).astype(region_labels.dtype)


def _region_weights(
    dro: PerfusionDRO, spacing: float, blend_mm: float = 1.5
) -> tuple[np.ndarray, np.ndarray]:
    """Soft region weights (R, H, W) summing to 1 inside the DRO, and where one region is pure.

    Borders between regions blend over a few millimetres, as perfusion does
    between neighbouring territories; the truth maps stay the hard labels, and
    ``dro_interior`` marks pixels whose signal comes from a single region.
    """
    n = dro.labels.shape[0]
    if not dro.regions:
        return np.zeros((0, n, n), np.float32), np.zeros((n, n), bool)
    sigma = blend_mm / spacing
    soft = np.stack(
        [
            ndimage.gaussian_filter((dro.labels == r.label).astype(np.float32), sigma)
            for r in dro.regions
        ]
    )
    total = soft.sum(axis=0)
    inside = dro.labels > 0
    weights = np.where(inside[None], soft / np.maximum(total, 1e-6)[None], 0.0).astype(np.float32)
    interior = inside & (weights.max(axis=0) > 0.98)
    return weights, interior


def _truth(
    art_mask,
    ica_mask,
    vein_img,
    art_img,
    device_mask,
    dro: PerfusionDRO,
    t,
    tissue_fine,
    motion,
    spacing,
):
    n = dro.labels.shape[0]
    maps = {k: np.full((n, n), np.nan, np.float32) for k in ("cbf", "cbv", "mtt", "tmax", "ttp")}
    for i, r in enumerate(dro.regions):
        sel = dro.labels == r.label
        maps["cbf"][sel] = r.cbf
        maps["cbv"][sel] = r.cbv
        maps["mtt"][sel] = r.mtt_s
        maps["tmax"][sel] = r.delay_s
        maps["ttp"][sel] = float(t[int(np.argmax(tissue_fine[i]))])
    return {
        "artery": art_mask,
        "vein": vein_img.cover[0],
        "ica": ica_mask,
        "device": device_mask,
        "diameter_mm": np.maximum(art_img.diameter_mm, vein_img.diameter_mm),
        "tissue_path_mm": dro.path_mm,
        "motion_px": np.c_[motion[:, :2] / spacing, motion[:, 2:]].astype(np.float32),
        **maps,
    }
