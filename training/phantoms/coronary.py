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

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.base import Run, RunMeta
from training.phantoms import physics
from training.phantoms.errors import PhantomOptionError
from training.phantoms.head import MU_BONE, MU_SOFT, Ellipsoid, _plane_chords
from training.phantoms.raster import Projection, render_tree
from training.phantoms.vessels import VesselTree, spline_chain, subdivide

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


@dataclass
class _Heart:
    centre: np.ndarray
    axis: np.ndarray  # base -> apex
    e1: np.ndarray
    e2: np.ndarray
    radius: float
    length: float


def _surface(
    heart: _Heart,
    h: np.ndarray,
    phi: np.ndarray,
    lift: np.ndarray,
    contraction: float,
    twist_deg: float,
) -> np.ndarray:
    """Epicardial points for (h, phi); ``lift`` mm above the surface (ostia, proximal trunks)."""
    scale_r = 1.0 - 0.13 * contraction
    scale_l = 1.0 - 0.07 * contraction
    ang = phi + np.deg2rad(twist_deg) * contraction * np.clip(h, 0, 1)
    hh = np.clip(h, -0.3, 0.97)
    r = heart.radius * scale_r * np.sqrt(np.clip(1.0 - hh**2, 0.02, 1.0)) + lift
    along = heart.length * scale_l * h
    return (
        heart.centre
        + along[:, None] * heart.axis
        + r[:, None] * (np.cos(ang)[:, None] * heart.e1 + np.sin(ang)[:, None] * heart.e2)
    )


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


def _tree(rng: np.random.Generator, side: str):
    """Coronary tree in surface coordinates: per node (h, phi, lift, radius, path mm, parent, label)."""
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
        h, phi = _curve(rng, h0, h1, p0, phi1, n)
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
        for k in range(int(rng.integers(2, 4))):  # diagonals over the anterolateral wall
            at = lad[int(rng.uniform(0.15, 0.55) * len(lad))]
            branch(
                at,
                rng.uniform(0.65, 0.9),
                np.concatenate(phis)[at] + rng.uniform(0.6, 1.1),
                1.1 - 0.2 * k,
                0.45,
                "branch",
            )
        for _ in range(int(rng.integers(4, 7))):  # septal perforators, into the septum
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
        for k in range(int(rng.integers(2, 4))):  # obtuse marginals down the lateral wall
            at = lcx[int(rng.uniform(0.25, 0.85) * len(lcx))]
            branch(
                at,
                rng.uniform(0.6, 0.85),
                np.concatenate(phis)[at] + rng.uniform(-0.2, 0.2),
                1.1 - 0.15 * k,
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
        for k in range(int(rng.integers(2, 4))):  # acute marginals over the right ventricle
            at = rca[int(rng.uniform(0.2, 0.6) * len(rca))]
            branch(
                at,
                rng.uniform(0.55, 0.8),
                np.concatenate(phis)[at] + rng.uniform(-0.3, 0.1),
                0.9 - 0.15 * k,
                0.4,
                "branch",
            )
        branch(ost[-2], -0.15, -0.3, 0.6, 0.3, "twig", n=10)  # conus branch
    # Small side branches off every main and branch vessel.
    labels_all = np.concatenate(labels)
    for idx in np.flatnonzero(np.isin(labels_all, [NAMES.index("main"), NAMES.index("branch")])):
        if rng.random() < 0.08:
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


def _projection(primary: float, secondary: float, centre: np.ndarray, size: int) -> Projection:
    a, b = np.deg2rad(primary), np.deg2rad(-secondary)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    rot = rz @ rx
    return Projection(
        rot @ np.array([1.0, 0, 0]), rot @ np.array([0, 0, -1.0]), centre, FOV_MM / size, size
    )


def _contraction(phase: np.ndarray) -> np.ndarray:
    """0 (end-diastole) to 1 (end-systole): fast systole over the first third, slower relaxation."""
    sys = np.clip(phase / 0.33, 0, 1)
    rel = np.clip((phase - 0.33) / 0.3, 0, 1)
    return np.where(phase < 0.33, np.sin(0.5 * np.pi * sys) ** 2, np.cos(0.5 * np.pi * rel) ** 2)


def generate(
    seed: int,
    size: int = 512,
    frames: int = 45,
    *,
    fps: float | None = None,
    side: str | None = None,
    snr: float | None = 12.0,
    noise: bool = True,
    breathing_mm: float | None = None,
    heart_rate_bpm: float | None = None,
) -> CoronaryPhantom:
    """Generate one coronary cine; deterministic for (seed, options).

    Args:
        seed: patient/anatomy seed.
        size: matrix (square), 64-2048; the field stays 160 mm at the isocentre.
        frames: number of frames.
        fps: 12.5 or 15 typically; None draws one of the two from the seed.
        side: "left" or "right" coronary tree; None draws (2:1 left).
        snr: contrast of a 1 mm vessel at full opacification over the noise
            standard deviation, median over the heart (low-dose cine: 5-15);
            None, or ``noise=False``, gives noise-free frames.
        breathing_mm: peak-to-peak diaphragm drift; None draws 2-8 mm.
        heart_rate_bpm: None draws 60-90 bpm.
    """
    if not 64 <= size <= 2048:
        raise PhantomOptionError(f"size must be 64-2048, got {size}")
    if frames < 2:
        raise PhantomOptionError(f"frames must be at least 2, got {frames}")
    rng = np.random.default_rng([seed, 0xC0])
    side = side or ("left" if rng.random() < 0.67 else "right")
    if side not in ("left", "right"):
        raise PhantomOptionError(f"side must be 'left' or 'right', got {side!r}")
    fps = float(fps or rng.choice([12.5, 15.0]))
    if not 1.0 <= fps <= 60.0:
        raise PhantomOptionError(f"fps must be 1-60, got {fps}")
    hr = float(heart_rate_bpm or rng.uniform(60, 90))
    breathing = float(rng.uniform(2, 8) if breathing_mm is None else breathing_mm)
    views = VIEWS_LEFT if side == "left" else VIEWS_RIGHT
    view, primary, secondary = views[int(rng.integers(len(views)))]
    times = np.arange(frames) / fps
    phase = (times * hr / 60.0 + rng.uniform(0, 1)) % 1.0
    contraction = _contraction(phase)
    r_wave = np.flatnonzero(np.r_[True, np.diff(phase) < 0])
    breath = (
        breathing
        * 0.5
        * (1 - np.cos(2 * np.pi * times / rng.uniform(4.0, 6.0) + rng.uniform(0, np.pi)))
    )

    axis = np.array([0.6, -0.5, -0.62])
    axis /= np.linalg.norm(axis)
    e1 = np.cross(axis, [0, 0, 1.0])
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(axis, e1)
    heart = _Heart(
        np.array([25.0, -10.0, -30.0]), axis, e1, e2, rng.uniform(40, 48), rng.uniform(85, 100)
    )
    h, phi, lift, radius, parent, label = _tree(rng, side)
    pts0 = _surface(heart, h, phi, lift, 0.0, 12.0)
    # Centre the field on the tree, as the operator pans the table to it.
    proj = _projection(primary, secondary, 0.5 * (pts0.min(axis=0) + pts0.max(axis=0)), size)
    spacing = proj.spacing_mm
    path = _path_length(pts0, parent)
    speed = rng.uniform(150, 250)
    inj_start, inj_len = rng.uniform(0.2, 0.5), rng.uniform(2.0, 3.0)
    washout = rng.uniform(0.4, 0.8)
    peak_conc = rng.uniform(0.7, 0.9)

    background_static, cath_tree = _chest(rng, proj, heart, pts0[0])
    cath_render = render_tree(cath_tree, proj, np.zeros(len(cath_tree), int), 1)
    frames_att = np.empty((frames, size, size))
    vessel = np.zeros((frames, size, size), bool)
    geometry = np.zeros((frames, size, size), bool)
    diameter = np.zeros((frames, size, size), np.float32)
    catheter = np.zeros((frames, size, size), bool)
    for k in range(frames):
        shift = np.array([0.0, 0.0, -breath[k]])  # diaphragm down on inspiration
        pts = _surface(heart, h, phi, lift, float(contraction[k]), 12.0) + shift
        tree = VesselTree(pts, parent, radius, np.zeros(len(parent)), label, NAMES)
        arrive = inj_start + path / speed
        conc = peak_conc * _injection(times[k] - arrive, inj_len, washout)
        tree.delay = conc  # carried through subdivision as a per-node value
        fine = subdivide(tree, 1.0)
        opac = fine.delay > 0.1 * peak_conc
        img = render_tree(
            fine,
            proj,
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
        moving = physics.warp(background_static["moving"], (dy * 0.3, 0.0), 0.0, (0.0, 0.0))
        diaphragm = _diaphragm(proj, heart, breath[k])
        cath_now = physics.warp(cath_render.thickness_mm[0], (dy, 0.0), 0.0, (0.0, 0.0))
        catheter[k] = (
            physics.warp(cath_render.cover[0].astype(float), (dy, 0.0), 0.0, (0.0, 0.0)) > 0.5
        )
        in_cath = (
            peak_conc * (times[k] >= inj_start - 0.1) * (times[k] <= inj_start + inj_len + 0.3)
        )
        frames_att[k] = (
            background_static["static"]
            + moving
            + diaphragm
            + physics.MU_CATHETER * 2.0 * cath_now
            + physics.MU_IODINE * (img.thickness_mm[0] + in_cath * 0.4 * cath_now)
        )

    ref_signal = (
        physics.MU_IODINE * 1.0 * peak_conc * np.pi / 4
    )  # 1 mm vessel, pixel-averaged chord ~ pi/4 mm
    heart_region = _heart_mask(proj, heart)
    noisy = noise and snr is not None
    detected_primary = physics.blur(np.exp(-frames_att), spacing)
    relative = (
        detected_primary
        + physics.scatter(
            detected_primary[0],
            frames_att[0] > 1.0,
            heart_region,
            spacing,
            spr=float(rng.uniform(0.5, 1.0)),
        )[None]
    )
    keep = float(np.median((detected_primary[0] / relative[0])[heart_region]))
    # A cine frame is seen alone (no mask): its noise is sqrt(1/N), half the
    # variance of a subtraction, hence the factor 2.
    n0 = (
        physics.dose_for_snr(ref_signal * keep, relative[0], heart_region, snr) / 2.0
        if noisy
        else 1e6
    )
    expected = n0 * relative
    counts = physics.detected(
        expected, np.random.default_rng([seed, 0xC9, frames, size]) if noisy else None
    )
    # Display-ready image as cine systems store it: log of the quanta with the
    # large-scale range compressed (lungs versus spine), 600 grey levels per
    # unit of attenuation for detail.
    log_img = np.log(np.maximum(counts, 1.0) / n0)
    sigma = 25.0 / spacing
    log_img = log_img - 0.6 * physics.lowpass(log_img, sigma)
    ref = float(np.median(log_img[0][heart_region]))
    pixels = np.clip(np.rint(2048.0 + 600.0 * (log_img - ref)), 0, physics.STORED_MAX).astype(
        np.uint16
    )

    acq = CineAcquisition(
        view=view,
        primary_angle=primary,
        secondary_angle=secondary,
        patient_orientation=("L", "F"),
        kvp=float(rng.uniform(70, 90)),
        tube_current_ma=float(rng.uniform(600, 900)),
        pulse_ms=float(rng.uniform(4, 8)),
        sid_mm=SID_MM,
        sod_mm=SOD_MM,
        fps=(fps, fps),
        quanta_per_pixel=n0 if noisy else 0.0,
        contrast_volume_ml=float(round(inj_len * rng.uniform(3, 4), 1)),
        contrast_rate_ml_s=float(rng.uniform(3, 4)),
    )
    return CoronaryPhantom(
        seed=seed,
        side=side,
        pixels=pixels,
        frame_times_s=times,
        pixel_spacing_mm=(spacing, spacing),
        truth={
            "vessel": vessel,
            "vessel_geometry": geometry,
            "diameter_mm": diameter,
            "catheter": catheter,
        },
        cardiac_phase=phase.astype(np.float32),
        r_wave_frames=r_wave.astype(np.int32),
        heart_rate_bpm=hr,
        acquisition=acq,
        options={
            "size": size,
            "frames": frames,
            "fps": fps,
            "side": side,
            "snr": snr if noisy else None,
            "breathing_mm": breathing,
            "heart_rate_bpm": hr,
        },
    )


def _injection(t: np.ndarray, length: float, washout: float) -> np.ndarray:
    """Concentration profile at a point the front reached ``t`` s ago: 0.15 s rise, plateau, exponential washout."""
    rise = np.clip(t / 0.15, 0, 1)
    fall = np.where(t > length, np.exp(-(t - length) / washout), 1.0)
    return np.where(t > 0, rise * fall, 0.0)


def _heart_mask(proj: Projection, heart: _Heart) -> np.ndarray:
    prim = Ellipsoid(
        heart.centre + heart.axis * heart.length * 0.3,
        np.array([heart.radius, heart.radius, heart.length * 0.8]),
        _frame(heart),
        1.0,
        None,
        None,
    )
    return _plane_chords(prim, proj) > 20.0


def _frame(heart: _Heart) -> np.ndarray:
    return np.stack([heart.e1, heart.e2, heart.axis], axis=1)


def _diaphragm(proj: Projection, heart: _Heart, breath_mm: float) -> np.ndarray:
    liver = Ellipsoid(
        np.array([-20.0, 0.0, -175.0 - breath_mm]),
        np.array([150.0, 110.0, 95.0]),
        np.eye(3),
        MU_SOFT,
        None,
        None,
    )
    return MU_SOFT * _plane_chords(liver, proj)


def _chest(
    rng: np.random.Generator, proj: Projection, heart: _Heart, ostium: np.ndarray
) -> tuple[dict[str, np.ndarray], VesselTree]:
    """Static chest (torso, lungs, spine), ribs (moving with breathing) and the guiding catheter."""
    eye = np.eye(3)
    prims = [
        Ellipsoid(
            np.array([0.0, 0.0, -40.0]), np.array([160.0, 110.0, 260.0]), eye, MU_SOFT, None, None
        ),
        Ellipsoid(
            np.array([-75.0, 10.0, -10.0]),
            np.array([65.0, 85.0, 150.0]),
            eye,
            -0.8 * MU_SOFT,
            None,
            None,
        ),
        Ellipsoid(
            np.array([75.0, 10.0, -10.0]),
            np.array([60.0, 85.0, 150.0]),
            eye,
            -0.8 * MU_SOFT,
            None,
            None,
        ),
        Ellipsoid(
            heart.centre + heart.axis * heart.length * 0.3,
            np.array([heart.radius * 1.15, heart.radius * 1.1, heart.length * 0.85]),
            _frame(heart),
            0.8 * MU_SOFT,
            None,
            None,
        ),
        Ellipsoid(
            np.array([0.0, 70.0, -20.0]),
            np.array([18.0, 16.0, 260.0]),
            eye,
            0.6 * MU_BONE,
            None,
            None,
        ),  # spine
        Ellipsoid(
            np.array([10.0, 30.0, 40.0]),
            np.array([16.0, 16.0, 60.0]),
            eye,
            0.2 * MU_SOFT,
            None,
            None,
        ),  # aorta
    ]
    static = sum(p.mu * _plane_chords(p, proj) for p in prims)
    # Ribs: arcs around the chest wall, as tubes of bone.
    pts, parents, radii = [], [], []
    count = 0
    for z in np.arange(110.0, -160.0, -24.0):
        for s in (-1.0, 1.0):
            ang = np.linspace(0.15, 0.95, 40) * np.pi
            x = s * 150.0 * np.sin(ang)
            y = 95.0 * np.cos(ang) * -1.0 + 10.0
            zz = z - 30.0 * np.sin(ang) + rng.normal(0, 1.0)
            p = np.stack([x, y, zz], 1)
            pts.append(p)
            parents.append(np.r_[-1, np.arange(count, count + 39)])
            radii.append(np.full(40, rng.uniform(4.0, 5.5)))
            count += 40
    ribs = VesselTree(
        np.concatenate(pts),
        np.concatenate(parents),
        np.concatenate(radii),
        np.zeros(count),
        np.zeros(count, np.uint8),
        ("rib",),
    )
    rib_img = render_tree(ribs, proj, np.zeros(count, int), 1)
    moving = 0.5 * MU_BONE * rib_img.thickness_mm[0]
    # Guiding catheter: up the descending aorta, over the arch, into the ostium.
    ctrl = np.array(
        [
            [15.0, 40.0, -200.0],
            [15.0, 40.0, 20.0],
            [5.0, 20.0, 70.0],
            [-10.0, -5.0, 55.0],
            ostium + np.array([0, 0, 15.0]),
            ostium,
        ]
    )
    cp, cr = spline_chain(ctrl, np.full(len(ctrl), 1.0), 2.0)
    k = len(cp)
    cath = VesselTree(
        cp, np.arange(-1, k - 1), cr, np.zeros(k), np.zeros(k, np.uint8), ("catheter",)
    )
    return {"static": static, "moving": moving}, cath
