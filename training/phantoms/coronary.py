"""Coronary XA cine phantom: a left or right coronary tree on a beating heart.

The arteries lie on an ellipsoidal epicardium described by height ``h`` (0 at
the atrioventricular groove, 1 at the apex) and angle ``phi`` around the long
axis, which keeps them on the heart through the cardiac cycle. Courses follow
standard angiographic anatomy (Dodge et al., Circulation 1992, for calibres:
LM about 4.5 mm, proximal LAD 3.5-3.7 mm, LCx 3.4 mm, RCA 3.5-4 mm; distal
segments and branches down to about 1 mm; small side branches below that).

Motion: ventricular contraction shortens and narrows the heart with apical
twist (systole about a third of the cycle, 60-90 bpm), and breathing drifts the
heart and diaphragm a few millimetres. Contrast fills from the ostium at about
15-25 cm/s and washes out after the injection (hand or injector, 2-3 s).
Acquisition: 12.5 or 15 fps, low-dose cine quanta, ribs, spine, lungs,
diaphragm and a guiding catheter in the background.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from pipelines.base import Run, RunMeta
from training.phantoms import (
    appearance,
    chest_devices,
    lesions,
    physics,
    priors,
    timing,
    xa_effects,
)
from training.phantoms import heart as thorax
from training.phantoms.dicom_common import options_key
from training.phantoms.errors import PhantomOptionError
from training.phantoms.raster import Projection, render_tree
from training.phantoms.vessels import VesselTree, subdivide

XA_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.12.1"
FOV_MM = 130.0
SID_MM = 1000.0
SOD_MM = 720.0
VIEWS_LEFT = (
    ("RAO 30 CAU 25", -30.0, -25.0),
    ("LAO 45 CRA 25", 45.0, 25.0),
    ("AP CRA 30", 0.0, 30.0),
    ("LAO 50 CAU 30", 50.0, -30.0),
)
VIEWS_RIGHT = (("LAO 30", 30.0, 0.0), ("RAO 30", -30.0, 0.0), ("LAO 30 CRA 20", 30.0, 20.0))
NAMES = ("ostium", "main", "branch", "twig")


@dataclass(frozen=True)
class CineAcquisition:
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
    quanta_per_pixel: float
    contrast_volume_ml: float
    contrast_rate_ml_s: float
    iodine_mg_ml: float = 300.0

    @property
    def magnification(self) -> float:
        return self.sid_mm / self.sod_mm


@dataclass
class CoronaryPhantom:
    """A coronary cine and its per-frame truth (``truth['vessel']`` is (T, H, W) bool)."""

    seed: int
    side: str
    pixels: np.ndarray
    frame_times_s: np.ndarray
    pixel_spacing_mm: tuple[float, float]
    truth: dict[str, np.ndarray]
    cardiac_phase: np.ndarray
    r_wave_frames: np.ndarray
    heart_rate_bpm: float
    acquisition: CineAcquisition
    options: dict[str, Any] = field(default_factory=dict)
    # Randomised runs: storage (bits, window, shutter, text, lossy) and the drawn appearance.
    presentation: xa_effects.Presentation | None = None
    appearance: dict[str, Any] | None = None

    kind = "coronary"

    @property
    def series_description(self) -> str:
        return f"{'LCA' if self.side == 'left' else 'RCA'} {self.acquisition.view}"

    def to_run(self) -> Run:
        t, h, w = self.pixels.shape
        meta = RunMeta(
            modality="XA",
            sop_class_uid=XA_SOP_CLASS,
            rows=h,
            columns=w,
            number_of_frames=t,
            frame_times_s=self.frame_times_s.copy(),
            pixel_spacing_mm=self.pixel_spacing_mm,
            image_type=("ORIGINAL", "PRIMARY", "SINGLE PLANE"),
            body_part="HEART",
            series_description=self.series_description,
            subtracted=False,
            is_volume=False,
            frame_rate=self.acquisition.fps[0],
            extra={
                "phantom": "coronary",
                "seed": self.seed,
                "side": self.side,
                "heart_rate_bpm": self.heart_rate_bpm,
            },
        )
        return Run(pixels=self.pixels.astype(np.float32), meta=meta)

    def write(
        self, directory: str | Path, encoding: str = "explicit", seg: bool = False
    ) -> list[Path]:
        from training.phantoms import dicom_xa

        return dicom_xa.write_coronary(self, Path(directory), encoding=encoding, seg=seg)


def _curve(rng, h0, h1, phi0, phi1, n, wiggle=0.02):
    t = np.linspace(0, 1, n)
    h = (
        h0
        + (h1 - h0) * t
        + wiggle * np.sin(2 * np.pi * t * rng.uniform(1, 3) + rng.uniform(0, 6)) * t
    )
    phi = (
        phi0
        + (phi1 - phi0) * t
        + 2 * wiggle * np.sin(2 * np.pi * t * rng.uniform(1, 3) + rng.uniform(0, 6)) * t
    )
    return h, phi


def _scaled(k: int, branches: float) -> int:
    return k if branches == 1.0 else max(0, int(round(k * branches)))


def _tree(rng: np.random.Generator, side: str, wiggle: float = 0.02, branches: float = 1.0):
    """Coronary tree in surface coordinates: per node (h, phi, lift, radius, path mm, parent, label).

    ``wiggle`` sets tortuosity and ``branches`` scales the number of side
    branches (randomised runs; the defaults give the seed's usual tree).
    """
    hs, phis, lifts, radii, parents, labels = [], [], [], [], [], []
    count = 0

    def add(h, phi, r, parent, label, lift=None):
        nonlocal count
        n = len(h)
        idx = np.arange(count, count + n)
        hs.append(h)
        phis.append(phi)
        lifts.append(np.zeros(n) if lift is None else lift)
        radii.append(r)
        parents.append(np.r_[parent, idx[:-1]])
        labels.append(np.full(n, NAMES.index(label)))
        count += n
        return idx

    def branch(parent_idx, h1, phi1, r0, r1, label, n=None):
        h0 = np.concatenate(hs)[parent_idx]
        p0 = np.concatenate(phis)[parent_idx]
        n = n or max(6, int(abs(h1 - h0) * 40 + abs(phi1 - p0) * 12))
        h, phi = _curve(rng, h0, h1, p0, phi1, n, wiggle)
        return add(h[1:], phi[1:], np.linspace(r0, r1, n)[1:], parent_idx, label)

    if side == "left":
        # Left main from the left coronary sinus, lifted off the surface.
        lm = add(
            np.linspace(-0.28, -0.02, 8),
            np.full(8, 0.25 + rng.normal(0, 0.05)),
            np.full(8, 2.2),
            -1,
            "ostium",
            np.linspace(14, 2, 8),
        )
        phi_aiv = rng.uniform(-0.15, 0.15)
        lad = branch(lm[-1], 0.97, phi_aiv - rng.uniform(0.2, 0.5), 1.8, 0.6, "main", n=60)
        lcx = branch(lm[-1], rng.uniform(0.0, 0.1), rng.uniform(2.0, 2.6), 1.6, 0.8, "main", n=45)
        for k in range(_scaled(int(rng.integers(2, 4)), branches)):  # diagonals
            at = lad[int(rng.uniform(0.15, 0.55) * len(lad))]
            branch(
                at,
                rng.uniform(0.65, 0.9),
                np.concatenate(phis)[at] + rng.uniform(0.6, 1.1),
                max(1.1 - 0.2 * k, 0.5),
                0.45,
                "branch",
            )
        for _ in range(_scaled(int(rng.integers(4, 7)), branches)):  # septal perforators
            at = lad[int(rng.uniform(0.1, 0.6) * len(lad))]
            branch(
                at,
                np.concatenate(hs)[at] + rng.uniform(0.1, 0.2),
                np.concatenate(phis)[at] - rng.uniform(0.3, 0.5),
                0.45,
                0.25,
                "twig",
                n=8,
            )
        for k in range(_scaled(int(rng.integers(2, 4)), branches)):  # obtuse marginals
            at = lcx[int(rng.uniform(0.25, 0.85) * len(lcx))]
            branch(
                at,
                rng.uniform(0.6, 0.85),
                np.concatenate(phis)[at] + rng.uniform(-0.2, 0.2),
                max(1.1 - 0.15 * k, 0.5),
                0.45,
                "branch",
            )
        if rng.random() < 0.3:  # ramus intermedius
            branch(lm[-1], 0.7, rng.uniform(0.9, 1.3), 1.0, 0.45, "branch")
    else:
        ost = add(
            np.linspace(-0.3, -0.03, 7),
            np.full(7, -1.0 + rng.normal(0, 0.05)),
            np.full(7, 2.1),
            -1,
            "ostium",
            np.linspace(12, 2, 7),
        )
        rca = branch(
            ost[-1], rng.uniform(0.0, 0.08), rng.uniform(-3.6, -3.2), 1.9, 1.3, "main", n=70
        )
        branch(
            rca[-1],
            0.85,
            np.concatenate(phis)[rca[-1]] - rng.uniform(0.1, 0.3),
            1.1,
            0.5,
            "main",
            n=40,
        )
        branch(
            rca[-1], 0.3, np.concatenate(phis)[rca[-1]] - 0.8, 0.9, 0.4, "branch"
        )  # posterolateral
        for k in range(_scaled(int(rng.integers(2, 4)), branches)):  # acute marginals
            at = rca[int(rng.uniform(0.2, 0.6) * len(rca))]
            branch(
                at,
                rng.uniform(0.55, 0.8),
                np.concatenate(phis)[at] + rng.uniform(-0.3, 0.1),
                max(0.9 - 0.15 * k, 0.45),
                0.4,
                "branch",
            )
        branch(ost[-2], -0.15, -0.3, 0.6, 0.3, "twig", n=10)  # conus branch
    # Small side branches off every main and branch vessel.
    labels_all = np.concatenate(labels)
    for idx in np.flatnonzero(np.isin(labels_all, [NAMES.index("main"), NAMES.index("branch")])):
        if rng.random() < 0.08 * branches:
            h0 = np.concatenate(hs)[idx]
            branch(
                idx,
                min(0.97, h0 + rng.uniform(0.05, 0.25)),
                np.concatenate(phis)[idx] + rng.uniform(-0.5, 0.5),
                0.35,
                0.2,
                "twig",
                n=10,
            )
    return (
        np.concatenate(hs),
        np.concatenate(phis),
        np.concatenate(lifts),
        np.concatenate(radii),
        np.concatenate(parents).astype(np.int64),
        np.concatenate(labels).astype(np.uint8),
    )


def _path_length(pts: np.ndarray, parent: np.ndarray) -> np.ndarray:
    out = np.zeros(len(parent))
    seg = np.linalg.norm(pts - pts[np.maximum(parent, 0)], axis=1)
    for i in range(len(parent)):
        if parent[i] >= 0:
            out[i] = out[parent[i]] + seg[i]
    return out


def _projection(
    primary: float, secondary: float, centre: np.ndarray, size: int, spacing: float | None = None
) -> Projection:
    a, b = np.deg2rad(primary), np.deg2rad(-secondary)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    rot = rz @ rx
    spacing = FOV_MM / size if spacing is None else spacing
    return Projection(
        rot @ np.array([1.0, 0, 0]), rot @ np.array([0, 0, -1.0]), centre, spacing, size
    )


def generate(
    seed: int,
    size: int | tuple[int, int] | None = None,
    frames: int = 45,
    *,
    fps: float | None = None,
    side: str | None = None,
    snr: float | None = 12.0,
    noise: bool = True,
    breathing_mm: float | None = None,
    heart_rate_bpm: float | None = None,
    randomise: bool | priors.CoronaryPriors = False,
) -> CoronaryPhantom:
    """Generate one coronary cine; deterministic for (seed, options).

    Args:
        seed: patient/anatomy seed.
        size: matrix, 64-2048: an int (square) or (rows, columns); None gives
            512, or a draw from the priors when randomised. The field stays
            130 mm at the isocentre across the longer side unless randomised.
        frames: number of frames.
        fps: 12.5 or 15 typically; None draws one of the two from the seed.
        side: "left" or "right" coronary tree; None draws (2:1 left).
        snr: contrast of a 1 mm vessel at full opacification over the noise
            standard deviation, median over the heart (low-dose cine: 5-15);
            None, or ``noise=False``, gives noise-free frames.
        breathing_mm: peak-to-peak diaphragm drift; None draws 2-8 mm.
        heart_rate_bpm: None draws 60-90 bpm.
        randomise: True (or a ``priors.CoronaryPriors``) draws geometry, tree
            variation, stenoses, contrast, acquisition, devices and artefacts
            from the priors; options left at their defaults are drawn, options
            you set win (``snr`` other than 12 counts as set).
    """
    if frames < 2:
        raise PhantomOptionError(f"frames must be at least 2, got {frames}")
    pri = priors.resolve(randomise, priors.CORONARY)
    rng = np.random.default_rng([seed, 0xC0])
    side = side or ("left" if rng.random() < 0.67 else "right")
    if side not in ("left", "right"):
        raise PhantomOptionError(f"side must be 'left' or 'right', got {side!r}")
    app = None if pri is None else appearance.draw_coronary(seed, pri, size, side)
    if app is not None:
        rows, cols = app.rows, app.cols
    elif size is None or np.isscalar(size):
        rows = cols = int(512 if size is None else size)  # type: ignore[arg-type]
    else:
        rows, cols = (int(v) for v in size)  # type: ignore[union-attr]
    for length in (rows, cols):
        if not 64 <= length <= 2048:
            raise PhantomOptionError(f"size must be 64-2048, got {size}")
    n = max(rows, cols)
    if app is not None and snr == 12.0:
        snr = app.snr
    fps_drawn = float(fps or rng.choice([12.5, 15.0]))
    fps = fps_drawn if app is None or fps is not None else app.fps[0]
    if not 1.0 <= fps <= 60.0:
        raise PhantomOptionError(f"fps must be 1-60, got {fps}")
    hr = float(heart_rate_bpm or rng.uniform(60, 90))
    breathing = float(rng.uniform(2, 8) if breathing_mm is None else breathing_mm)
    views = VIEWS_LEFT if side == "left" else VIEWS_RIGHT
    view, primary, secondary = views[int(rng.integers(len(views)))]
    times = np.arange(frames) / fps
    phase_offset = rng.uniform(0, 1)
    phase = (times * hr / 60.0 + phase_offset) % 1.0
    breath_period, breath_phase = rng.uniform(4.0, 6.0), rng.uniform(0, np.pi)
    pan = np.zeros((frames, 2))
    if app is not None:
        app_rng = np.random.default_rng([seed, 0x5A, 0xC1])
        if heart_rate_bpm is None:
            hr = app.heart_rate_bpm
        if breathing_mm is None:
            breathing = app.breathing_mm
        primary, secondary = app.primary_deg, app.secondary_deg
        view = _view_name(primary, secondary)
        times, _ = timing.protocol_schedule(
            frames, (fps, fps), 0.0, 0.0, app_rng, app.frame_jitter, app.drop_frame
        )
        phase = _cardiac_phase(times, hr, app.rr_variability, phase_offset, app_rng)
        ramp = np.clip(times / max(times[-1], 1e-6), 0, 1)
        pan = np.asarray(app.pan_mm)[None, :] * (ramp * ramp * (3 - 2 * ramp))[:, None]
    contraction = thorax.contraction(phase)
    r_wave = np.flatnonzero(np.r_[True, np.diff(phase) < 0])
    breath = breathing * 0.5 * (1 - np.cos(2 * np.pi * times / breath_period + breath_phase))

    axis = np.array([0.6, -0.5, -0.62])
    axis /= np.linalg.norm(axis)
    e1 = np.cross(axis, [0, 0, 1.0])
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(axis, e1)
    heart = thorax.Heart(
        np.array([25.0, -10.0, -30.0]), axis, e1, e2, rng.uniform(40, 48), rng.uniform(85, 100)
    )
    if app is None:
        h, phi, lift, radius, parent, label = _tree(rng, side)
    else:
        h, phi, lift, radius, parent, label = _tree(rng, side, app.wiggle, app.branch_scale)
    pts0 = thorax.surface(heart, h, phi, lift, 0.0, 12.0)
    stenoses: list[tuple[np.ndarray, float, float]] = []
    if app is not None:
        radius = radius * app.calibre_scale
        rest = VesselTree(pts0, parent, radius, np.zeros(len(parent)), label, NAMES)
        wide = np.isin(label, [NAMES.index("main"), NAMES.index("branch")]) & (radius > 0.7)
        stenoses = lesions.stenose(
            rest,
            np.random.default_rng([seed, 0x5A, 0xC2]),
            app.stenoses,
            priors.CORONARY.stenosis_severity if pri is None else pri.stenosis_severity,
            priors.CORONARY.stenosis_length_mm if pri is None else pri.stenosis_length_mm,
            wide,
        )
        radius = rest.radius
    # Centre the field on the tree, as the operator pans the table to it.
    centre = 0.5 * (pts0.min(axis=0) + pts0.max(axis=0))
    spacing = None if app is None else app.field_mm / n
    proj = _projection(primary, secondary, centre, n, spacing)
    if app is not None:
        shift = app.centre_shift_mm
        centre = centre + shift[0] * proj.axis_u + shift[1] * proj.axis_v
        proj = _projection(primary, secondary, centre, n, spacing)
    spacing = proj.spacing_mm
    path = _path_length(pts0, parent)
    speed = rng.uniform(150, 250)
    inj_start, inj_len = rng.uniform(0.2, 0.5), rng.uniform(2.0, 3.0)
    washout = rng.uniform(0.4, 0.8)
    peak_conc = rng.uniform(0.7, 0.9)
    fill = np.ones(len(parent))
    mu_iodine = physics.MU_IODINE
    if app is not None:
        speed, inj_len, washout, peak_conc = (
            app.fill_speed_mm_s,
            app.injection_s,
            app.washout_s,
            app.peak,
        )
        mu_iodine = physics.MU_IODINE * app.iodine_scale
        fill = _partial_fill(seed, parent, radius, label, app.partial_filling)
        # Short fast runs still see the injection: it starts in the first quarter.
        inj_start = min(inj_start, 0.25 * float(times[-1]))

    if app is None:
        background_static, cath_tree = thorax.chest(rng, proj, heart, pts0[0])
    else:
        background_static, cath_tree = thorax.chest(
            rng, proj, heart, pts0[0], app.torso_scale, app.catheter_radius_mm
        )
    cath_render = render_tree(cath_tree, proj, np.zeros(len(cath_tree), int), 1)
    dev_att, dev_cover = np.zeros((n, n)), np.zeros((n, n), bool)
    wire_nodes = np.zeros(0, np.int64)
    if app is not None:
        dev_rng = np.random.default_rng([seed, 0x5A, 0xC3])
        dev_att, dev_cover = chest_devices.static_devices(
            dev_rng, proj, heart.centre, app.sternal_wires, app.ecg, app.clips
        )
        if app.guidewire:
            wire_nodes = chest_devices.guidewire(pts0, parent, label, NAMES.index("main"))
    frames_att = np.empty((frames, n, n))
    vessel = np.zeros((frames, n, n), bool)
    geometry = np.zeros((frames, n, n), bool)
    diameter = np.zeros((frames, n, n), np.float32)
    catheter = np.zeros((frames, n, n), bool)
    device = np.zeros((frames, n, n), bool)
    diaphragm_shift = 0.0 if app is None else app.diaphragm_shift_mm
    for k in range(frames):
        shift = np.array([0.0, 0.0, -breath[k]])  # diaphragm down on inspiration
        pts = thorax.surface(heart, h, phi, lift, float(contraction[k]), 12.0) + shift
        # Table panning moves the whole image: rows and columns in pixels.
        pr, pc = pan[k] / spacing
        proj_k = proj
        if pr or pc:
            proj_k = replace(
                proj, centre=proj.centre - pc * spacing * proj.axis_u - pr * spacing * proj.axis_v
            )
        tree = VesselTree(pts, parent, radius, np.zeros(len(parent)), label, NAMES)
        arrive = inj_start + path / speed
        conc = peak_conc * _injection(times[k] - arrive, inj_len, washout)
        tree.delay = conc * fill  # carried through subdivision as a per-node value
        fine = subdivide(tree, 1.0)
        opac = fine.delay > 0.1 * peak_conc
        img = render_tree(
            fine,
            proj_k,
            np.zeros(len(fine), int),
            1,
            mask_class=np.where(opac, 0, 1),
            n_masks=2,
            weight=fine.delay,
        )
        vessel[k] = img.cover[0]
        geometry[k] = img.cover[0] | img.cover[1]
        diameter[k] = img.diameter_mm
        dy = breath[k] / spacing
        moving = physics.warp(background_static["moving"], (dy * 0.3 + pr, pc), 0.0, (0.0, 0.0))
        diaphragm = thorax.diaphragm(proj_k, heart, breath[k], diaphragm_shift)
        cath_now = physics.warp(cath_render.thickness_mm[0], (dy + pr, pc), 0.0, (0.0, 0.0))
        catheter[k] = (
            physics.warp(cath_render.cover[0].astype(float), (dy + pr, pc), 0.0, (0.0, 0.0)) > 0.5
        )
        in_cath = (
            peak_conc * (times[k] >= inj_start - 0.1) * (times[k] <= inj_start + inj_len + 0.3)
        )
        static = background_static["static"]
        if app is not None:
            static = physics.warp(static, (pr, pc), 0.0, (0.0, 0.0)) + physics.warp(
                dev_att, (dy * 0.3 + pr, pc), 0.0, (0.0, 0.0)
            )
            device[k] = (
                physics.warp(dev_cover.astype(float), (dy * 0.3 + pr, pc), 0.0, (0.0, 0.0)) > 0.5
            )
            if len(wire_nodes) > 1:
                wire_att, wire_cover = chest_devices.render_wire(pts[wire_nodes], proj_k)
                static = static + wire_att
                device[k] |= wire_cover
        frames_att[k] = (
            static
            + moving
            + diaphragm
            + physics.MU_CATHETER * 2.0 * cath_now
            + mu_iodine * (img.thickness_mm[0] + in_cath * 0.4 * cath_now)
        )

    # 1 mm vessel, pixel-averaged chord about pi/4 mm
    ref_signal = mu_iodine * 1.0 * peak_conc * np.pi / 4
    heart_region = thorax.heart_mask(proj, heart)
    r0, c0 = (n - rows) // 2, (n - cols) // 2
    crop = (slice(r0, r0 + rows), slice(c0, c0 + cols))
    if n != rows or n != cols:
        frames_att = frames_att[(slice(None), *crop)]
        vessel, geometry, diameter, catheter, device = (
            a[(slice(None), *crop)] for a in (vessel, geometry, diameter, catheter, device)
        )
        heart_region = heart_region[crop]
        if not heart_region.any():
            heart_region = np.ones((rows, cols), bool)
    field = np.ones((rows, cols), bool)
    if app is not None and app.shutter is not None:
        field = app.shutter.field(rows, cols)
        frames_att = frames_att + xa_effects.shutter_attenuation(
            field, app.shutter_transmission, app.shutter_penumbra_mm / spacing
        )
        if (heart_region & field).any():
            heart_region = heart_region & field
    noisy = noise and snr is not None
    blur_mm = physics.DETECTOR_BLUR_MM if app is None else app.blur_mm
    detected_primary = physics.blur(np.exp(-frames_att), spacing, blur_mm)
    relative = (
        detected_primary
        + physics.scatter(
            detected_primary[0],
            frames_att[0] > 1.0,
            heart_region,
            spacing,
            spr=float(rng.uniform(0.5, 1.0)) if app is None else app.scatter_ratio,
        )[None]
    )
    keep = float(np.median((detected_primary[0] / relative[0])[heart_region]))
    if app is not None:
        relative = relative * xa_effects.detector_gain(
            rows, cols, app.vignetting, app.heel, app.heel_angle, app.grid
        )
    # A cine frame is seen alone (no mask): its noise is sqrt(1/N), half the
    # variance of a subtraction, hence the factor 2.
    n0 = (
        physics.dose_for_snr(ref_signal * keep, relative[0], heart_region, snr) / 2.0
        if noisy
        else 1e6
    )
    expected = n0 * relative
    noise_rng = np.random.default_rng([seed, 0xC9, frames, n]) if noisy else None
    counts = physics.detected(expected, noise_rng)
    if noise_rng is not None and app is not None and app.electronic_noise > 0:
        sigma = app.electronic_noise * np.sqrt(float(np.median(expected[0][heart_region])))
        counts = counts + noise_rng.normal(0.0, sigma, size=counts.shape)
    # Display-ready image as cine systems store it: log of the quanta with the
    # large-scale range compressed (lungs versus spine), 600 grey levels per
    # unit of attenuation for detail.
    log_img = np.log(np.maximum(counts, 1.0) / n0)
    sigma = 25.0 / spacing
    compression = 0.6 if app is None else app.range_compression
    if field.all():
        log_img = log_img - compression * physics.lowpass(log_img, sigma)
    else:
        # Processing finds the collimation first: the blades' shadow does not enter the
        # range compression, so it stays dark instead of being lifted to the field's level.
        level = np.median(log_img[:, field], axis=1)[:, None, None]
        inside = np.where(field[None], log_img, level)
        log_img = log_img - compression * physics.lowpass(inside, sigma)
    ref = float(np.median(log_img[0][heart_region]))
    presentation = None
    overlay = np.zeros((rows, cols), bool)
    if app is None:
        pixels = np.clip(np.rint(2048.0 + 600.0 * (log_img - ref)), 0, physics.STORED_MAX).astype(
            np.uint16
        )
    else:
        if app.edge_enhancement > 0:
            log_img = log_img + app.edge_enhancement * (
                log_img - ndimage.gaussian_filter(log_img, (0, 1.5, 1.5))
            )
        bits = app.bits
        # The vendor's scale, capped so that the field stays inside the stored range.
        lo, hi = np.percentile((log_img - ref)[:, field][::4], [0.5, 99.5])
        gain = min(600.0 * 2.0 ** (bits - 12) * app.display_gain, 0.9 * (2**bits - 1) / (hi - lo))
        offset = float(2 ** (bits - 1)) - gain * 0.5 * (lo + hi)
        pixels = xa_effects.to_stored(log_img - ref, offset, gain, bits)
        # Automatic windowing, as cine systems do: the field's 1st to 99th percentile.
        lo, hi = np.percentile(pixels[:, field][::4], [1.0, 99.0])
        window = (float(round((lo + hi) / 2)), float(max(round(hi - lo), 16)))
        pixels, overlay, presentation = xa_effects.finish(
            pixels,
            field,
            app,
            np.random.default_rng([seed, 0x5A, 0xC4]),
            bits,
            window,
            int(2 ** (bits - 1)),
            view,
            spacing,
            scale=(offset - gain * ref, gain),
        )
    keep_truth = field & ~overlay
    truth = {
        "vessel": vessel & keep_truth,
        "vessel_geometry": geometry & keep_truth,
        "diameter_mm": np.where(keep_truth, diameter, np.float32(0)).astype(np.float32),
        "catheter": catheter & keep_truth,
        "device": device & keep_truth,
        "field": field,
        "overlay": overlay,
    }

    acq = CineAcquisition(
        view=view,
        primary_angle=primary,
        secondary_angle=secondary,
        patient_orientation=("L", "F"),
        kvp=float(rng.uniform(70, 90)),
        tube_current_ma=float(rng.uniform(600, 900)),
        pulse_ms=float(rng.uniform(4, 8)),
        sid_mm=SID_MM if app is None else round(app.sid_mm, 1),
        sod_mm=SOD_MM if app is None else round(app.sid_mm / app.magnification, 1),
        fps=(fps, fps),
        quanta_per_pixel=n0 if noisy else 0.0,
        contrast_volume_ml=float(round(inj_len * rng.uniform(3, 4), 1)),
        contrast_rate_ml_s=float(rng.uniform(3, 4)),
    )
    options: dict[str, Any] = {
        "size": 512 if size is None and app is None else size,
        "frames": frames,
        "fps": fps,
        "side": side,
        "snr": snr if noisy else None,
        "breathing_mm": breathing,
        "heart_rate_bpm": hr,
    }
    if app is not None:
        acq = replace(
            acq,
            contrast_volume_ml=round(app.injection_rate_ml_s * app.injection_s, 1),
            contrast_rate_ml_s=round(app.injection_rate_ml_s, 1),
            iodine_mg_ml=round(300.0 * app.iodine_scale),
        )
        options["randomise"] = options_key(dataclasses.asdict(pri))
    return CoronaryPhantom(
        seed=seed,
        side=side,
        pixels=pixels,
        frame_times_s=times,
        pixel_spacing_mm=(spacing, spacing),
        truth=truth,
        cardiac_phase=phase.astype(np.float32),
        r_wave_frames=r_wave.astype(np.int32),
        heart_rate_bpm=hr,
        acquisition=acq,
        options=options,
        presentation=presentation,
        appearance=None
        if app is None
        else {**app.summary(), "stenoses": [(float(sv), float(ln)) for _, sv, ln in stenoses]},
    )


def _view_name(primary: float, secondary: float) -> str:
    """Cardiologists' name of a C-arm angle pair, e.g. LAO 35 CRA 20."""
    name = f"{'LAO' if primary >= 0 else 'RAO'} {abs(primary):.0f}"
    if abs(secondary) >= 5:
        name += f" {'CRA' if secondary > 0 else 'CAU'} {abs(secondary):.0f}"
    return name


def _cardiac_phase(
    times: np.ndarray, hr: float, rr_cv: float, offset: float, rng: np.random.Generator
) -> np.ndarray:
    """Phase (0 at each R wave) for beats whose RR intervals vary with coefficient ``rr_cv``."""
    mean_rr = 60.0 / hr
    rr = mean_rr * np.clip(
        1.0 + rr_cv * rng.standard_normal(int(times[-1] / mean_rr) + 4), 0.5, 1.6
    )
    starts = np.r_[0.0, np.cumsum(rr)] - offset * rr[0]
    beat = np.searchsorted(starts, times, side="right") - 1
    return ((times - starts[beat]) / rr[beat]).astype(np.float64)


def _partial_fill(
    seed: int, parent: np.ndarray, radius: np.ndarray, label: np.ndarray, factor: float | None
) -> np.ndarray:
    """Per-node contrast factor: some side branches fill partly (streaming, competitive flow)."""
    if factor is None:
        return np.ones(len(parent))
    rng = np.random.default_rng([seed, 0x5A, 0xC5])
    starts = np.flatnonzero(
        (label == NAMES.index("branch")) & (parent >= 0) & (label[np.maximum(parent, 0)] != label)
    )
    if len(starts) == 0:
        return np.ones(len(parent))
    roots = rng.choice(starts, size=min(int(rng.integers(1, 3)), len(starts)), replace=False)
    return lesions.subtree_factor(parent, roots, rng.uniform(factor, 1.0, size=len(roots)))


def _injection(t: np.ndarray, length: float, washout: float) -> np.ndarray:
    """Concentration profile at a point the front reached ``t`` s ago: 0.15 s rise, plateau, exponential washout."""
    rise = np.clip(t / 0.15, 0, 1)
    fall = np.where(t > length, np.exp(-(t - length) / washout), 1.0)
    return np.where(t > 0, rise * fall, 0.0)
