"""One draw of the priors per seed: the concrete appearance of a randomised run.

Each ``draw_*`` uses its own random stream ([seed, 0x5A, kind]), so the same
seed and priors always give the same appearance, and anatomy (drawn from the
seed elsewhere) does not depend on it. The generators read these values
instead of their fixed defaults; ``asdict`` of the result is kept on the
phantom (``appearance``) for stratified evaluation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from training.phantoms import xa_effects
from training.phantoms.errors import PhantomOptionError
from training.phantoms.priors import (
    CoronaryPriors,
    DSAPriors,
    RotationalPriors,
    XAPriors,
    count,
    draw_matrix,
    uniform,
)


@dataclass(frozen=True)
class XAAppearance:
    """Acquisition, display and artefacts of one 2D run (fields shared by DSA and cine)."""

    rows: int
    cols: int
    field_mm: float  # isocentre field across the longer side
    magnification: float
    sid_mm: float
    centre_shift_mm: tuple[float, float]  # along image columns, rows
    iodine_scale: float  # concentration / 300 mgI/mL
    injection_rate_ml_s: float
    injection_s: float
    peak: float
    partial_filling: float | None  # factor of partly filled branches, None: all full
    fps: tuple[float, float]
    frame_jitter: float
    drop_frame: bool
    bits: int
    display_gain: float
    snr: float
    electronic_noise: float
    blur_mm: float
    scatter_ratio: float
    vignetting: float
    heel: float
    heel_angle: float
    grid: tuple[float, float, int, float] | None
    jpeg_quality: int | None
    shutter: xa_effects.Shutter | None
    shutter_transmission: float
    shutter_penumbra_mm: float
    blank: str | None  # "black", "white", "grey" or None (physical signal kept)
    text: bool
    marker: bool

    def summary(self) -> dict[str, Any]:
        """Plain values (JSON-able) for records and stratified scores."""
        out = dataclasses.asdict(self)
        out["shutter"] = None if self.shutter is None else "+".join(self.shutter.shapes)
        return out


@dataclass(frozen=True)
class DSAAppearance(XAAppearance):
    primary_offset_deg: float = 0.0
    secondary_offset_deg: float = 0.0
    flip: bool = False
    arrival_s: float = 1.0
    alpha: float = 3.0
    rise_s: float = 1.2
    recirculation: float = 0.08
    venous_delay_s: float = 4.5
    microcatheter: bool = False
    misregistration: tuple[float, float, float] = (0.0, 0.0, 0.0)  # row mm, column mm, deg
    bone_scale: float = 1.0


@dataclass(frozen=True)
class CoronaryAppearance(XAAppearance):
    primary_deg: float = 0.0
    secondary_deg: float = 0.0
    fill_speed_mm_s: float = 200.0
    washout_s: float = 0.6
    range_compression: float = 0.6
    edge_enhancement: float = 0.0
    heart_rate_bpm: float = 70.0
    rr_variability: float = 0.0
    breathing_mm: float = 5.0
    pan_mm: tuple[float, float] = (0.0, 0.0)
    torso_scale: float = 1.0
    diaphragm_shift_mm: float = 0.0
    calibre_scale: float = 1.0
    wiggle: float = 0.02
    branch_scale: float = 1.0
    stenoses: int = 0
    catheter_radius_mm: float = 1.0
    guidewire: bool = False
    sternal_wires: bool = False
    ecg: bool = False
    clips: bool = False


@dataclass(frozen=True)
class RotationalAppearance:
    field_mm: float
    centre_shift_mm: tuple[float, float, float]
    contrast_hu: float
    distal_dilution: float
    bone_scale: float
    streak_scale: float
    noise_hu: float
    kernel_sigma_vox: float
    sharpening: float
    noise_grain_vox: float
    truncation: float
    capping_hu: float
    bits: int
    skull_base_porosity: float
    skull_base_cell_mm: float
    skull_base_cell_hu: float

    def summary(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _matrix(rng: np.random.Generator, pri: XAPriors, size: Any) -> tuple[int, int]:
    if size is None:
        return draw_matrix(rng, pri)
    rows, cols = (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))
    for v in (rows, cols):
        if not 64 <= v <= 2048:
            raise PhantomOptionError(f"size must be 64-2048 per side, got {size}")
    return rows, cols


def _common(
    rng: np.random.Generator, pri: XAPriors, size: Any, lossy_ok: bool, bits_min: int = 0
) -> dict[str, Any]:
    """The shared XA draws. Every field consumes a fixed number of draws, so narrowing one
    prior (``dataclasses.replace``) leaves the others' values as they were."""
    rows, cols = _matrix(rng, pri, size)
    mag = uniform(rng, pri.magnification)
    field_mm = uniform(rng, pri.detector_field_mm) / mag
    shift = tuple(float(rng.uniform(-1, 1) * pri.centre_shift_mm) for _ in range(2))
    fast = float(rng.choice(pri.fps_fast))
    constant, slow = rng.random() < pri.constant_rate_p, float(rng.choice(pri.fps_slow))
    bits_choices = [b for b in pri.bits if b >= bits_min] or [max(pri.bits)]
    grid = (
        uniform(rng, pri.grid_amplitude),
        uniform(rng, pri.grid_frequency),
        int(rng.integers(0, 2)),
        float(rng.uniform(0, 2 * np.pi)),
    )
    has_grid = rng.random() < pri.grid_p
    quality = int(round(uniform(rng, pri.jpeg_quality)))
    has_jpeg = lossy_ok and rng.random() < pri.jpeg_p
    kind = str(rng.choice(pri.shutter_kinds))
    shutter_rng = np.random.default_rng(int(rng.integers(2**63)))
    has_shutter = rng.random() < pri.shutter_p
    shutter = xa_effects.draw_shutter(shutter_rng, rows, cols, kind) if has_shutter else None
    blank_kind = str(rng.choice(["black", "white", "grey"]))
    blank = blank_kind if has_shutter and rng.random() < pri.blank_p else None
    factor = uniform(rng, pri.partial_filling_factor)
    partial = factor if rng.random() < pri.partial_filling_p else None
    return dict(
        rows=rows,
        cols=cols,
        field_mm=field_mm,
        magnification=mag,
        sid_mm=float(rng.uniform(950, 1250)),
        centre_shift_mm=shift,
        iodine_scale=uniform(rng, pri.iodine_mg_ml) / 300.0,
        injection_rate_ml_s=uniform(rng, pri.injection_rate_ml_s),
        injection_s=uniform(rng, pri.injection_s),
        peak=uniform(rng, pri.bolus_peak),
        partial_filling=partial,
        fps=(fast, fast if constant else slow),
        frame_jitter=uniform(rng, pri.frame_jitter),
        drop_frame=bool(rng.random() < pri.frame_drop_p),
        bits=int(rng.choice(bits_choices)),
        display_gain=uniform(rng, pri.display_gain, log=True),
        snr=uniform(rng, pri.snr, log=True),
        electronic_noise=uniform(rng, pri.electronic_noise),
        blur_mm=uniform(rng, pri.blur_mm),
        scatter_ratio=uniform(rng, pri.scatter_ratio),
        vignetting=uniform(rng, pri.vignetting),
        heel=uniform(rng, pri.heel),
        heel_angle=float(rng.uniform(0, 2 * np.pi)),
        grid=grid if has_grid else None,
        jpeg_quality=quality if has_jpeg else None,
        shutter=shutter,
        shutter_transmission=uniform(rng, pri.shutter_transmission, log=True),
        shutter_penumbra_mm=uniform(rng, pri.shutter_penumbra_mm),
        blank=blank,
        text=bool(rng.random() < pri.text_p),
        marker=bool(rng.random() < pri.marker_p),
    )


def draw_dsa(seed: int, pri: DSAPriors, size: Any, native: bool) -> DSAAppearance:
    """Appearance of a randomised DSA run; ``size`` None draws the matrix from the priors."""
    rng = np.random.default_rng([seed, 0x5A, 0xD5])
    # Native runs stay lossless and at least 12 bits: they feed a log subtraction.
    common = _common(rng, pri, size, lossy_ok=not native, bits_min=12 if native else 0)
    amp = uniform(rng, pri.misregistration_mm)
    ang = float(rng.uniform(0, 2 * np.pi))
    deg = uniform(rng, pri.misregistration_deg) * float(rng.choice([-1.0, 1.0]))
    misreg = (amp * np.sin(ang), amp * np.cos(ang), deg)
    if rng.random() >= pri.misregistration_p:
        misreg = (0.0, 0.0, 0.0)
    return DSAAppearance(
        **common,
        primary_offset_deg=float(rng.uniform(-1, 1) * pri.primary_jitter_deg),
        secondary_offset_deg=float(rng.uniform(-1, 1) * pri.secondary_jitter_deg),
        flip=bool(rng.random() < pri.flip_p),
        arrival_s=uniform(rng, pri.bolus_arrival_s),
        alpha=uniform(rng, pri.bolus_alpha),
        rise_s=uniform(rng, pri.bolus_rise_s),
        recirculation=uniform(rng, pri.recirculation),
        venous_delay_s=uniform(rng, pri.venous_delay_s),
        microcatheter=bool(rng.random() < pri.microcatheter_p),
        misregistration=misreg,
        bone_scale=uniform(rng, pri.bone_scale),
    )


def draw_coronary(seed: int, pri: CoronaryPriors, size: Any, side: str) -> CoronaryAppearance:
    """Appearance of a randomised coronary cine (view angles by ``side``)."""
    rng = np.random.default_rng([seed, 0x5A, 0xC0])
    common = _common(rng, pri, size, lossy_ok=True)
    if side == "left":
        primary, secondary = rng.uniform(-40, 60), rng.uniform(-35, 35)
    else:
        primary, secondary = rng.uniform(-40, 50), rng.uniform(-15, 30)
    pan = uniform(rng, pri.pan_mm)
    pan_dir = float(rng.uniform(0, 2 * np.pi))
    return CoronaryAppearance(
        **common,
        primary_deg=float(primary),
        secondary_deg=float(secondary),
        fill_speed_mm_s=uniform(rng, pri.fill_speed_mm_s),
        washout_s=uniform(rng, pri.washout_s),
        range_compression=uniform(rng, pri.range_compression),
        edge_enhancement=uniform(rng, pri.edge_enhancement),
        heart_rate_bpm=uniform(rng, pri.heart_rate_bpm),
        rr_variability=uniform(rng, pri.rr_variability),
        breathing_mm=uniform(rng, pri.breathing_mm),
        pan_mm=(pan * np.sin(pan_dir), pan * np.cos(pan_dir)),
        torso_scale=uniform(rng, pri.torso_scale),
        diaphragm_shift_mm=uniform(rng, pri.diaphragm_shift_mm),
        calibre_scale=uniform(rng, pri.calibre_scale),
        wiggle=uniform(rng, pri.wiggle),
        branch_scale=uniform(rng, pri.branch_scale),
        stenoses=count(rng, pri.stenosis_count_p),
        catheter_radius_mm=uniform(rng, pri.catheter_radius_mm),
        guidewire=bool(rng.random() < pri.guidewire_p),
        sternal_wires=bool(rng.random() < pri.sternal_wire_p),
        ecg=bool(rng.random() < pri.ecg_p),
        clips=bool(rng.random() < pri.clip_p),
    )


def draw_rotational(seed: int, pri: RotationalPriors) -> RotationalAppearance:
    rng = np.random.default_rng([seed, 0x5A, 0x3D])
    return RotationalAppearance(
        field_mm=uniform(rng, pri.field_mm),
        centre_shift_mm=tuple(float(rng.uniform(-1, 1) * pri.centre_shift_mm) for _ in range(3)),
        contrast_hu=uniform(rng, pri.contrast_hu, log=True),
        distal_dilution=uniform(rng, pri.distal_dilution),
        bone_scale=uniform(rng, pri.bone_scale),
        streak_scale=uniform(rng, pri.streak_scale, log=True),
        noise_hu=uniform(rng, pri.noise_hu, log=True),
        kernel_sigma_vox=uniform(rng, pri.kernel_sigma_vox),
        sharpening=uniform(rng, pri.sharpening),
        noise_grain_vox=uniform(rng, pri.noise_grain_vox),
        truncation=uniform(rng, pri.truncation),
        capping_hu=uniform(rng, pri.capping_hu),
        bits=int(rng.choice(pri.bits)),
        # Drawn last, so the draws above are what they were before these were added.
        skull_base_porosity=uniform(rng, pri.skull_base_porosity),
        skull_base_cell_mm=uniform(rng, pri.skull_base_cell_mm),
        skull_base_cell_hu=uniform(rng, pri.skull_base_cell_hu),
    )
