"""Family B cerebral DSA (evaluation only): a selective ICA run with exact truth.

``generate(seed)`` builds the L-system head (``cerebral``), projects it
through a point focal spot (``geometry``), gives arteries, veins and a
perfusion reference object their LDRW-driven curves (``bolus``) on an
irregular frame schedule, and forms frames with the flat-panel model
(``detector``): correlated quantum noise, electronic noise, flicker,
vignetting, a collimator shutter, burned-in text, and storage as subtracted
(10 or 12 bits, sometimes with landmarking) or
native (12-16 bits LIN with a Mask Subtraction Sequence, mask of one or two
frames). Spacing is written as Imager Pixel Spacing, sometimes also as a
calibrated Pixel Spacing, and sometimes not at all.

Truth masks are limited to the open collimator field (nothing behind the
blades is visible). Vessel opacification is drawn at the truth position;
patient motion moves the static anatomy only, so it shows as mask
misregistration without moving the truth.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from pipelines.base import Run, RunMeta
from training.phantoms.errors import PhantomOptionError
from training.phantoms.family_b import bolus, cerebral, detector, textures
from training.phantoms.family_b.geometry import (
    ConeBeam,
    ellipsoid_chord,
    render_segments,
    rotation,
)
from training.phantoms.family_b.textures import Shutter

XA_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.12.1"


@dataclass(frozen=True)
class AcquisitionB:
    view: str
    primary_angle: float
    secondary_angle: float
    patient_orientation: tuple[str, str]
    kvp: float
    tube_current_ma: float
    pulse_ms: float
    sid_mm: float
    sod_mm: float
    pitch_mm: float
    fps: tuple[float, float]
    quanta_per_mm2: float
    contrast_volume_ml: float
    contrast_rate_ml_s: float
    bits: int
    photometric: str
    mask_frames: tuple[int, ...]  # 0-based
    spacing_mode: str  # "imager", "both" or "none"
    burned_in_text: bool
    burned_in_shutter: bool

    @property
    def magnification(self) -> float:
        return self.sid_mm / self.sod_mm


@dataclass(frozen=True)
class RegionB:
    label: int
    state: str
    cbf: float  # mL/100 g/min
    mtt_s: float
    delay_s: float
    shape: float  # lognormal transit-time shape


@dataclass
class DSAPhantomB:
    """A family B DSA run: ``pixels`` are the stored values as written (T, H, W)."""

    seed: int
    native: bool
    pixels: np.ndarray
    frame_times_s: np.ndarray
    pixel_spacing_mm: tuple[float, float]  # at the isocentre
    truth: dict[str, np.ndarray]
    aif: np.ndarray
    region_labels: np.ndarray
    regions: tuple[RegionB, ...]
    acquisition: AcquisitionB
    shutter: Shutter | None
    timing: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)

    kind = "dsa"
    family = "B"

    @property
    def image_type(self) -> tuple[str, ...]:
        if self.native:
            return ("ORIGINAL", "PRIMARY", "SINGLE PLANE")
        return ("DERIVED", "PRIMARY", "SINGLE PLANE", "SUBTRACTION")

    @property
    def series_description(self) -> str:
        side = "R" if self.options["side"] < 0 else "L"
        return f"{side} ICA {self.acquisition.view} {'NATIVE' if self.native else 'DSA'}"

    @property
    def header_spacing_mm(self) -> tuple[float, float] | None:
        """The spacing a reader of the header finds (Pixel Spacing, else Imager Pixel Spacing)."""
        mode = self.acquisition.spacing_mode
        value = {"both": self.pixel_spacing_mm[0], "imager": self.acquisition.pitch_mm}.get(mode)
        if value is None:
            return None
        written = float(f"{value:.6g}")  # as the header stores it
        return (written, written)

    def to_run(self, subtract: bool = True) -> Run:
        """The run exactly as the node decodes the written file (``dicom_node.runs``):
        native frames log-subtracted against the mean of the Mask Frame Numbers,
        spacing from the header."""
        from dicom_node.runs import SUB_GAIN, SUB_MID

        pixels = self.pixels.astype(np.float32)
        subtracted = not self.native
        if self.native and subtract:
            mask = pixels[list(self.acquisition.mask_frames)].mean(axis=0)
            pixels = (
                SUB_MID
                + SUB_GAIN * (np.log1p(np.maximum(pixels, 0)) - np.log1p(np.maximum(mask, 0)))
            ).astype(np.float32)
            subtracted = True
        t, h, w = pixels.shape
        meta = RunMeta(
            modality="XA",
            sop_class_uid=XA_SOP_CLASS,
            rows=h,
            columns=w,
            number_of_frames=t,
            frame_times_s=self.frame_times_s.copy(),
            pixel_spacing_mm=self.header_spacing_mm,
            image_type=self.image_type,
            body_part="HEAD",
            series_description=self.series_description,
            subtracted=subtracted,
            is_volume=False,
            frame_rate=None,
            extra={"phantom": "dsa", "family": "B", "seed": self.seed, "native": self.native},
        )
        return Run(pixels=pixels, meta=meta)

    def write(self, directory: str | Path, encoding: str = "explicit") -> list[Path]:
        from training.phantoms.family_b import dicom

        return dicom.write_dsa(self, Path(directory), encoding=encoding)


def _views(rng: np.random.Generator, view: str | None, side: int):
    view = view or ("LAT" if rng.random() < 0.6 else "AP")
    if view == "LAT":
        primary = -side * 90.0 + rng.uniform(-12, 12)
        secondary = rng.uniform(-10, 10)
        orientation = ("P", "F") if side < 0 else ("A", "F")
    elif view == "AP":
        primary, secondary = rng.uniform(-15, 15), rng.uniform(-20, 15)
        orientation = ("L", "F")
    else:
        raise PhantomOptionError(f"view must be 'LAT' or 'AP', got {view!r}")
    return view, float(primary), float(secondary), orientation


def _half_chord(source, dirs, semi_axes, side: int) -> np.ndarray:
    """Path length (mm) of each ray through the brain ellipsoid on the injected side."""
    s = source / semi_axes
    d = dirs / semi_axes
    qa = (d * d).sum(-1)
    qb = 2.0 * (d * s).sum(-1)
    qc = float(s @ s) - 1.0
    disc = np.maximum(qb * qb - 4 * qa * qc, 0.0)
    t1 = (-qb - np.sqrt(disc)) / (2 * qa)
    t2 = (-qb + np.sqrt(disc)) / (2 * qa)
    # Clip to side * x >= 0 along the ray: x(t) = source_x + t dir_x.
    dx = dirs[..., 0] * side
    sx = source[0] * side
    with np.errstate(divide="ignore", invalid="ignore"):
        tx = -sx / dx
    lo = np.where(dx > 0, np.maximum(t1, tx), t1)
    hi = np.where(dx < 0, np.minimum(t2, tx), t2)
    inside_all = (dx == 0) & (sx >= 0)
    lo = np.where(inside_all, t1, lo)
    hi = np.where(inside_all, t2, hi)
    return np.where(disc > 0, np.maximum(hi - lo, 0.0), 0.0)


def _motion_warp(frames: np.ndarray, times: np.ndarray, start: int, amp_px: float, rng):
    """Move static anatomy after the mask: a smooth drift plus a small non-rigid field."""
    if amp_px <= 0:
        return frames
    t, h, w = frames.shape
    direction = rng.normal(size=2)
    direction /= np.linalg.norm(direction)
    nonrigid = [0.5 * amp_px * textures.fractal((h, w), 5.0, rng) for _ in range(2)]
    t0 = times[start] + rng.uniform(0.0, 0.4) * (times[-1] - times[start])
    rr, cc = np.mgrid[:h, :w].astype(np.float32)
    out = frames.copy()
    for k in range(start, t):
        ramp = float(np.clip((times[k] - t0) / rng.uniform(1.5, 4.0), 0.0, 1.0))
        if ramp == 0:
            continue
        dy = ramp * (amp_px * direction[0] + nonrigid[0])
        dx = ramp * (amp_px * direction[1] + nonrigid[1])
        out[k] = ndimage.map_coordinates(frames[k], [rr - dy, cc - dx], order=1, mode="nearest")
    return out


def generate(
    seed: int,
    size: int = 512,
    native: bool = False,
    *,
    duration_s: float | None = None,
    view: str | None = None,
    lesion: bool | None = None,
    noise: bool = True,
    shutter: bool = True,
    text: bool = True,
    motion_mm: float | None = None,
) -> DSAPhantomB:
    """Generate one family B cerebral DSA run; deterministic for (seed, options).

    Args:
        seed: anatomy and acquisition seed.
        size: detector rows, 64-2048; columns follow a seeded aspect ratio.
        native: unsubtracted live frames with a Mask Subtraction Sequence.
        duration_s: run length; None draws 12-20 s (the frame count follows the
            irregular protocol: about 15-70 frames).
        view: "LAT" or "AP"; None draws one (3:2 lateral).
        lesion: force (True) or forbid (False) hypoperfused regions.
        noise: False gives the noise-free expectation.
        shutter: False leaves the collimator open.
        text: False leaves out burned-in text.
        motion_mm: anatomy motion after the mask; None draws it (half the runs still).
    """
    if not 64 <= size <= 2048:
        raise PhantomOptionError(f"size must be 64-2048, got {size}")
    rng = np.random.default_rng([seed, 0xB0, 0x2])
    anatomy = cerebral.build(seed)
    hd = anatomy.head
    view, primary, secondary, orientation = _views(rng, view, hd.side)
    aspect = float(rng.choice([1.0, 1.0, 1.25, 0.8]))
    rows, cols = size, max(64, int(round(size * aspect / 8)) * 8)
    sid = float(rng.uniform(980, 1250))
    sod = float(rng.uniform(0.62, 0.72) * sid)
    field_mm = float(rng.uniform(200, 300))
    beam = ConeBeam(
        rotation(primary, secondary),
        np.array([0.0, rng.uniform(-5, 15), rng.uniform(-35, -10)]),
        sid,
        sod,
        (rows, cols),
        field_mm / max(rows, cols),
    )
    iso = beam.iso_spacing_mm
    source, dirs = beam.rays()

    # --- static anatomy (attenuation line integrals, 1/mm * mm) -----------------------
    kvp = float(rng.uniform(65, 90))
    mu_soft = 0.0215 - 0.00006 * (kvp - 65)
    mu_bone = float(rng.uniform(0.085, 0.115)) - 0.0006 * (kvp - 65)
    mu_iodine = 0.52 - 0.006 * (kvp - 65)
    tex = textures.fractal((rows, cols), float(rng.uniform(2.4, 3.0)), rng)
    base_tex = textures.fractal((rows, cols), 3.2, rng)
    c0 = np.zeros(3)
    soft = ellipsoid_chord(source, dirs, c0, hd.scalp) + ellipsoid_chord(
        source, dirs, hd.neck_centre, hd.neck_axes
    )
    shell = ellipsoid_chord(source, dirs, c0, hd.skull_outer) - ellipsoid_chord(
        source, dirs, c0, hd.skull_inner * (1.0 + 0.02 * base_tex[..., None])
    )
    # Skull base: a slab whose outline and thickness follow fractal noise, plus two
    # dense petrous ridges running antero-medially.
    lobe = textures.fractal((rows, cols), 3.8, rng)
    wobble = np.stack([0.25 * lobe, 0.25 * lobe, 0.6 * base_tex], axis=-1)
    base = ellipsoid_chord(source, dirs, hd.base_centre, hd.base_axes * np.clip(1 + wobble, 0.3, 2))
    for sgn in (-1.0, 1.0):
        ang = np.deg2rad(sgn * rng.uniform(35, 55))
        frame = np.array([[np.cos(ang), -np.sin(ang), 0], [np.sin(ang), np.cos(ang), 0], [0, 0, 1]])
        centre = hd.base_centre + [sgn * hd.base_axes[0] * 0.55, rng.uniform(5, 20), 4.0]
        base = base + 1.5 * ellipsoid_chord(
            source, dirs, centre, np.array([rng.uniform(18, 25), 7.0, 8.0]), frame
        )
    air = sum(ellipsoid_chord(source, dirs, c, a) for c, a in hd.sinuses)
    static = (
        mu_soft * (soft - air)
        + (mu_bone - mu_soft) * np.maximum(shell, 0) * (1.0 + 0.25 * tex)
        + 0.35 * (mu_bone - mu_soft) * base * np.clip(0.5 + 0.8 * base_tex, 0.0, 1.6)
    ).astype(np.float32)
    behind = (soft > 0).astype(np.float32)

    # --- timing -----------------------------------------------------------------------
    duration = float(duration_s if duration_s is not None else rng.uniform(12, 20))
    if not 2.0 <= duration <= 120.0:
        raise PhantomOptionError(f"duration_s must be 2-120 s, got {duration}")
    times = bolus.dsa_schedule(rng, duration)
    t = bolus.fine_grid(times)
    arrival = float(rng.uniform(0.5, 2.0))
    mu_s, lam = float(rng.uniform(1.5, 3.5)), float(rng.uniform(2.0, 6.0))
    a_fine = bolus.aif(
        t, arrival, mu_s, lam, float(rng.uniform(0.35, 0.7)), float(rng.uniform(0.08, 0.2)), 9.0
    )
    pulse_s = float(rng.uniform(0.02, 0.1))

    # --- perfusion reference object ---------------------------------------------------
    path = _half_chord(source, dirs, hd.brain, hd.side).astype(np.float32)
    labels = cerebral.dro_regions((rows, cols), rng)
    labels[path < 4.0] = 0
    field_ = textures.draw_shutter(rows, cols, rng) if shutter else None
    open_field = (
        np.ones((rows, cols), np.float32)
        if field_ is None
        else textures.soft_field(field_.field(rows, cols), float(rng.uniform(1.0, 3.0)))
    )
    inside = open_field > 0.5
    labels[~inside] = 0
    present = [int(v) for v in np.unique(labels) if v > 0]
    regions = _regions(rng, present, lesion)
    tissue_fine = (
        np.stack(
            [bolus.tissue_curve(t, a_fine, r.cbf, r.mtt_s, r.delay_s, r.shape) for r in regions]
        )
        if regions
        else np.zeros((0, len(t)))
    )

    # --- vessels ---------------------------------------------------------------------
    art = anatomy.arteries.subdivided(2.0 * iso)
    v_art = float(rng.uniform(250, 500))
    ref = float(anatomy.arteries.path_mm[anatomy.arteries.role == cerebral.ICA].max()) - 60.0
    delay = (art.path_mm - ref) / v_art
    uv, _ = beam.project(art.p1)
    ci = np.clip(np.rint(uv).astype(int), 0, [cols - 1, rows - 1])
    in_region = labels[ci[:, 1], ci[:, 0]]
    by_label = {r.label: r for r in regions}
    for i in np.flatnonzero((art.r1 < 0.4) & (in_region > 0)):
        r = by_label.get(int(in_region[i]))
        if r is not None and r.state != "normal":
            delay[i] += 0.7 * r.delay_s
    art_group, art_curves = _grouped(delay, 0.08, lambda d: bolus.transported(t, a_fine, d, 0.12))
    art_img = render_segments(
        art, beam, art_group, len(art_curves), (art.role == cerebral.ICA).astype(int), 2
    )
    # Venous offsets: the sinus fills front to back; a cortical vein fills from its
    # far end towards the sinus; the deep vein with the posterior sinus.
    kind = anatomy.vein_kind
    offset = anatomy.sinus_position * float(rng.uniform(0.8, 1.6))
    offset = offset - np.where(kind == 1, anatomy.veins.path_mm / rng.uniform(60, 120), 0.0)
    veins, origin = anatomy.veins.subdivided_with_index(2.5 * iso)
    v_offset = offset[origin]
    transit = float(rng.uniform(3.0, 6.0))
    venous = bolus.venous_curve(t, a_fine, transit, float(rng.uniform(0.25, 0.45)))
    dilution = float(rng.uniform(0.35, 0.6)) * float(a_fine.max())
    vein_group, vein_curves = _grouped(
        v_offset, 0.15, lambda d: dilution * np.interp(t - d, t, venous, left=0.0)
    )
    vein_img = render_segments(veins, beam, vein_group, len(vein_curves))
    sample = lambda c: bolus.at_frames(t, c, times, pulse_s)  # noqa: E731
    art_s = np.stack([sample(c) for c in art_curves])
    iodine = np.tensordot(art_s, art_img.path_mm, axes=(0, 0))
    iodine += np.tensordot(
        np.stack([sample(c) for c in vein_curves]), vein_img.path_mm, axes=(0, 0)
    )
    aneurysm_cover = np.zeros((rows, cols), bool)
    if anatomy.aneurysm is not None:
        centre, radius = anatomy.aneurysm
        chord = ellipsoid_chord(source, dirs, centre, np.full(3, radius)).astype(np.float32)
        aneurysm_cover = chord > 0
        slow = bolus.transported(t, a_fine, float(np.median(delay)) + 0.3, 0.6)
        iodine += sample(slow)[:, None, None] * chord[None]
    if regions:
        onehot = np.stack([(labels == r.label) for r in regions]).astype(np.float32)
        iodine += (
            np.tensordot(np.stack([sample(c) for c in tissue_fine]), onehot, axes=(0, 0)) * path
        )

    # --- devices ----------------------------------------------------------------------
    device_att, device_cover, lumen = _devices(anatomy, beam, rng)
    volume_ml, rate = float(rng.uniform(5, 9)), float(rng.uniform(3, 6))
    inj0 = arrival - float(rng.uniform(0.2, 0.5))
    injecting = ((times >= inj0) & (times <= inj0 + volume_ml / rate)).astype(np.float32)
    iodine += injecting[:, None, None] * lumen[None]

    # --- acquisition ------------------------------------------------------------------
    m = 2 if (times[1] < arrival - 0.3 and rng.random() < 0.5) else 1
    amp_mm = (
        float(motion_mm)
        if motion_mm is not None
        else (0.0 if rng.random() < 0.5 else float(rng.uniform(0.2, 1.5)))
    )
    background = np.repeat((static + device_att)[None], len(times), axis=0)
    background = _motion_warp(background, times, m, amp_mm / iso, rng)
    attenuation = background + mu_iodine * iodine
    det = detector.draw_detector(rng, beam.pitch_mm, (1.0, 3.0), (0.25, 0.6))
    noise_rng = np.random.default_rng([seed, 0xB0, 0x3, rows, cols]) if noise else None
    brain_px = (path > 4.0) & inside
    if not brain_px.any():
        brain_px = inside
    signal = detector.expose(
        attenuation, det, noise_rng, open_field if field_ else None, behind, brain_px
    )
    if native:
        bits = int(rng.choice([12, 16]))  # the XA Image module allows 8, 10, 12 or 16
        stored, _ = detector.stored_linear(signal, bits, float(rng.uniform(0.15, 0.35)), brain_px)
        photometric = "MONOCHROME2"
    else:
        bits = int(rng.choice([10, 12]))
        gain = 2**bits * float(rng.uniform(0.15, 0.35))
        landmark = float(rng.uniform(0.03, 0.1)) if rng.random() < 0.15 else 0.0
        stored = detector.log_subtracted(signal, signal[:m].mean(axis=0), bits, gain, landmark)
        photometric = "MONOCHROME2"  # the XA Image module allows nothing else
    top = 2**bits - 1
    burn_shutter = field_ is not None and rng.random() < 0.35
    if burn_shutter:
        stored[:, ~inside] = 0 if native or rng.random() < 0.5 else top
    text_mask = np.zeros((rows, cols), bool)
    with_text = text and rng.random() < 0.6
    if with_text:
        marker = "R" if hd.side < 0 else "L"
        head_lines = [f"FAMB {seed:05d}", f"{kvp:.0f} kV {pulse_s * 1000:.0f} ms"]
        for k in range(len(times)):
            ann = textures.annotation(
                rows,
                cols,
                head_lines,
                [f"F {k + 1}/{len(times)}", f"{times[k]:.2f} s"],
                marker,
                int(round(50.0 / iso)),
            )
            on = ann > 0.5
            stored[k][on] = top
            text_mask |= on

    spacing_mode = str(rng.choice(["imager", "imager", "both", "none"], p=[0.35, 0.25, 0.25, 0.15]))
    art_cover = (art_img.cover[0] | art_img.cover[1] | aneurysm_cover) & inside
    truth = _truth(labels, regions, t, tissue_fine, path)
    truth.update(
        {
            "artery": art_cover,
            "ica": art_img.cover[1] & inside,
            "vein": vein_img.cover[0] & inside,
            "device": device_cover & inside,
            "diameter_mm": np.maximum(art_img.diameter_mm, vein_img.diameter_mm),
            "field": inside,
            "text": text_mask,
            "tissue_path_mm": np.where(labels > 0, path, 0.0).astype(np.float32),
            "dro_interior": ndimage.binary_erosion(labels > 0, iterations=2)
            & (ndimage.minimum_filter(labels, 5) == ndimage.maximum_filter(labels, 5)),
        }
    )
    acq = AcquisitionB(
        view=view,
        primary_angle=primary,
        secondary_angle=secondary,
        patient_orientation=orientation,
        kvp=kvp,
        tube_current_ma=float(rng.uniform(200, 600)),
        pulse_ms=pulse_s * 1000.0,
        sid_mm=sid,
        sod_mm=sod,
        pitch_mm=beam.pitch_mm,
        fps=(float(1.0 / np.diff(times).min()), float(1.0 / np.diff(times).max())),
        quanta_per_mm2=det.quanta_per_mm2,
        contrast_volume_ml=volume_ml,
        contrast_rate_ml_s=rate,
        bits=bits,
        photometric=photometric,
        mask_frames=tuple(range(m)),
        spacing_mode=spacing_mode,
        burned_in_text=with_text,
        burned_in_shutter=burn_shutter,
    )
    peak_ica = float(t[np.argmax(a_fine)])
    return DSAPhantomB(
        seed=seed,
        native=native,
        pixels=stored,
        frame_times_s=times,
        pixel_spacing_mm=(iso, iso),
        truth=truth,
        aif=sample(a_fine).astype(np.float32),
        region_labels=labels,
        regions=tuple(regions),
        acquisition=acq,
        shutter=field_,
        timing={
            "t_fine_s": t.astype(np.float32),
            "aif_fine": a_fine.astype(np.float32),
            "bolus_arrival_s": arrival,
            "arterial_peak_s": peak_ica,
            "venous_peak_s": float(t[np.argmax(venous)]),
            "ldrw_mu_s": mu_s,
            "ldrw_lambda": lam,
            "tissue_fine": tissue_fine.astype(np.float32),
        },
        options={
            "family": "B",
            "size": size,
            "native": native,
            "duration_s": duration,
            "view": view,
            "lesion": lesion,
            "noise": noise,
            "shutter": shutter,
            "text": text,
            "motion_mm": amp_mm,
            "side": hd.side,
        },
    )


def _grouped(delays: np.ndarray, step_s: float, curve_of) -> tuple[np.ndarray, list[np.ndarray]]:
    q = np.rint(delays / step_s).astype(np.int64)
    uniq, inverse = np.unique(q, return_inverse=True)
    return inverse, [curve_of(float(k * step_s)) for k in uniq]


def _regions(rng: np.random.Generator, labels: list[int], lesion: bool | None) -> list[RegionB]:
    n = len(labels)
    states = ["normal"] * n
    if n and (lesion is True or (lesion is None and rng.random() < 0.5)):
        chosen = rng.choice(n, size=min(n, int(rng.integers(1, 3))), replace=False)
        for i in chosen:
            states[int(i)] = "core" if rng.random() < 0.3 else "hypoperfused"
    out = []
    for label, state in zip(labels, states, strict=True):
        if state == "normal":
            cbf, mtt, delay = rng.uniform(40, 70), rng.uniform(3.0, 5.5), rng.uniform(0.0, 0.8)
        elif state == "hypoperfused":
            cbf, mtt, delay = rng.uniform(15, 35), rng.uniform(6, 11), rng.uniform(1.5, 4.0)
        else:
            cbf, mtt, delay = rng.uniform(4, 12), rng.uniform(8, 15), rng.uniform(2.0, 5.0)
        out.append(
            RegionB(
                label, state, float(cbf), float(mtt), float(delay), float(rng.uniform(0.35, 0.8))
            )
        )
    return out


def _truth(labels, regions, t, tissue_fine, path) -> dict[str, np.ndarray]:
    h, w = labels.shape
    maps = {k: np.full((h, w), np.nan, np.float32) for k in ("cbf", "cbv", "mtt", "tmax", "ttp")}
    for i, r in enumerate(regions):
        sel = labels == r.label
        maps["cbf"][sel] = r.cbf
        maps["cbv"][sel] = r.cbf * r.mtt_s / 60.0
        maps["mtt"][sel] = r.mtt_s
        maps["tmax"][sel] = r.delay_s
        maps["ttp"][sel] = float(t[int(np.argmax(tissue_fine[i]))])
    return maps


def _devices(anatomy: cerebral.CerebralB, beam: ConeBeam, rng: np.random.Generator):
    """Catheter (radio-opaque wall, lumen filled while injecting) and, sometimes, a clip."""
    from training.phantoms.family_b.lsystem import polyline

    rows, cols = beam.shape
    pts = anatomy.catheter
    outer_r, inner_r = float(rng.uniform(0.75, 1.0)), float(rng.uniform(0.45, 0.6))
    k = len(pts)
    outer = render_segments(polyline(pts, np.full(k, outer_r)), beam, np.zeros(k - 1, int), 1)
    inner = render_segments(polyline(pts, np.full(k, inner_r)), beam, np.zeros(k - 1, int), 1)
    wall = np.maximum(outer.path_mm[0] - inner.path_mm[0], 0.0)
    att = float(rng.uniform(0.05, 0.1)) * wall
    cover = outer.cover[0].copy()
    if rng.random() < 0.2:
        art = anatomy.arteries
        i = int(rng.choice(np.flatnonzero(art.r0 > 0.5)))
        centre = art.p1[i] + rng.normal(0, 3.0, 3)
        frame = np.linalg.qr(rng.normal(size=(3, 3)))[0]
        source, dirs = beam.rays()
        clip = ellipsoid_chord(source, dirs, centre, np.array([4.5, 1.2, 0.8]), frame)
        att = att + 2.5 * clip
        cover |= clip > 0
    return att.astype(np.float32), cover, inner.path_mm[0]
