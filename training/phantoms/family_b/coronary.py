"""Family B coronary XA cine (evaluation only): L-system coronaries on a beating heart.

The coronary trees are grown by the L-system of ``lsystem`` with every new
point projected radially onto an ellipsoidal epicardium, from a left main
(LAD towards the apex, circumflex around the atrioventricular groove) or a
right coronary ostium. Heart motion is a random Fourier series per run
(radial and longitudinal shortening, twist), breathing a slow drift along a
random direction. Contrast fills from the ostium with an exponential rise,
holds while injecting and washes out.

Background drawn in the detector plane: chest and lungs with fractal lung
texture, a spine with vertebral bodies, ribs as hollow bone tubes that move
with breathing, a diaphragm dome, the heart silhouette, a guiding catheter,
and in some runs sternal wires and ECG leads with electrodes. The detector
is ``detector``'s flat panel; stored images are display processed (log,
range compression, unsharp masking), 8, 10 or 12 bits, JPEG-degraded in some
8-bit runs, with collimator shutters and burned-in text.

Truth ``vessel`` (T, H, W): opacified lumen (concentration above a tenth of
its peak) inside the open field; ``catheter`` and ``field`` alongside.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from pipelines.base import Run, RunMeta
from training.phantoms.errors import PhantomOptionError
from training.phantoms.family_b import bolus, detector, lsystem, textures
from training.phantoms.family_b.geometry import ConeBeam, ellipsoid_chord, render_segments, rotation
from training.phantoms.family_b.lsystem import Grammar, Segments
from training.phantoms.family_b.textures import Shutter

XA_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.12.1"
VIEWS = {
    "left": (
        ("RAO 25 CAU 20", -25, -20),
        ("LAO 40 CRA 25", 40, 25),
        ("AP CRA 35", 0, 35),
        ("LAO 45 CAU 25", 45, -25),
        ("RAO 10 CRA 40", -10, 40),
    ),
    "right": (("LAO 35", 35, 0), ("RAO 35", -35, 0), ("LAO 25 CRA 20", 25, 20)),
}


@dataclass(frozen=True)
class CineAcquisitionB:
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
    bits: int
    spacing_mode: str
    burned_in_text: bool
    burned_in_shutter: bool
    jpeg_quality: int  # 0: no lossy step
    jpeg_ratio: float

    @property
    def magnification(self) -> float:
        return self.sid_mm / self.sod_mm


@dataclass
class CoronaryPhantomB:
    """A family B coronary cine; ``truth['vessel']`` is (T, H, W) bool."""

    seed: int
    side: str
    pixels: np.ndarray
    frame_times_s: np.ndarray
    pixel_spacing_mm: tuple[float, float]
    truth: dict[str, np.ndarray]
    r_wave_frames: np.ndarray
    heart_rate_bpm: float
    acquisition: CineAcquisitionB
    shutter: Shutter | None
    options: dict[str, Any] = field(default_factory=dict)

    kind = "coronary"
    family = "B"

    @property
    def series_description(self) -> str:
        return f"{'LCA' if self.side == 'left' else 'RCA'} {self.acquisition.view}"

    @property
    def header_spacing_mm(self) -> tuple[float, float] | None:
        mode = self.acquisition.spacing_mode
        value = {"both": self.pixel_spacing_mm[0], "imager": self.acquisition.pitch_mm}.get(mode)
        if value is None:
            return None
        written = float(f"{value:.6g}")  # as the header stores it
        return (written, written)

    def to_run(self) -> Run:
        t, h, w = self.pixels.shape
        meta = RunMeta(
            modality="XA",
            sop_class_uid=XA_SOP_CLASS,
            rows=h,
            columns=w,
            number_of_frames=t,
            frame_times_s=self.frame_times_s.copy(),
            pixel_spacing_mm=self.header_spacing_mm,
            image_type=("ORIGINAL", "PRIMARY", "SINGLE PLANE"),
            body_part="HEART",
            series_description=self.series_description,
            subtracted=False,
            is_volume=False,
            frame_rate=None,
            extra={"phantom": "coronary", "family": "B", "seed": self.seed, "side": self.side},
        )
        return Run(pixels=self.pixels.astype(np.float32), meta=meta)

    def write(self, directory: str | Path, encoding: str = "explicit") -> list[Path]:
        from training.phantoms.family_b import dicom

        return dicom.write_coronary(self, Path(directory), encoding=encoding)


@dataclass(frozen=True)
class _Heart:
    centre: np.ndarray
    frame: np.ndarray  # columns: e1, e2, long axis (base to apex)
    radius: float
    half_length: float

    def onto(self, local: np.ndarray) -> np.ndarray:
        """Radially project local points onto the (undeformed) epicardium."""
        a = np.array([self.radius, self.radius, self.half_length])
        rho = np.linalg.norm(local / a, axis=1, keepdims=True)
        return local / np.maximum(rho, 1e-9)


def _trees(rng: np.random.Generator, heart: _Heart, side: str) -> Segments:
    """Coronary trees in heart-local coordinates (origin at the centre, z base to apex)."""
    a = np.array([heart.radius, heart.radius, heart.half_length])
    lift_mm = 1.5  # vessels run in epicardial fat, just above the myocardium

    def constrain(p: np.ndarray) -> np.ndarray:
        q = heart.onto(p)
        return q * (1.0 + lift_mm / np.linalg.norm(q * [1, 1, 1], axis=1, keepdims=True))

    g = Grammar(
        length_per_radius=rng.uniform(5, 8),
        min_length_mm=1.5,
        max_length_mm=7.0,
        taper=rng.uniform(0.975, 0.99),
        branch_after=int(rng.integers(2, 4)),
        branch_probability=rng.uniform(0.3, 0.5),
        major_ratio=(0.8, 0.95),
        minor_ratio=(0.4, 0.7),
        major_angle=(5.0, 20.0),
        minor_angle=(30.0, 70.0),
        wiggle_deg=rng.uniform(5, 12),
        r_min_mm=0.3,
        max_segments=int(rng.integers(160, 300)),
    )

    def surf(z_frac: float, phi: float) -> np.ndarray:
        z = z_frac * a[2]
        r = heart.radius * np.sqrt(max(1 - z_frac**2, 0.05))
        return np.array([r * np.cos(phi), r * np.sin(phi), z])

    parts = []
    if side == "left":
        phi0 = rng.uniform(0.2, 0.6)
        groove = surf(-0.72, phi0)
        root = groove * 1.35  # the aortic root, off the surface
        lm = lsystem.polyline(np.linspace(root, groove, 6), np.full(6, rng.uniform(2.0, 2.4)))
        parts.append(lm)
        for heading_to, r0, share in (
            (surf(0.9, phi0 - rng.uniform(0.2, 0.5)), rng.uniform(1.6, 1.9), 1.0),  # LAD
            (surf(-0.7, phi0 + rng.uniform(1.8, 2.4)), rng.uniform(1.3, 1.6), 0.8),  # LCx
        ):
            h = heading_to - groove
            tree = lsystem.grow(
                rng,
                groove,
                h,
                r0,
                Grammar(
                    **{
                        **g.__dict__,
                        "tropism": tuple(h / np.linalg.norm(h)),
                        "tropism_weight": 0.25,
                        "max_segments": int(g.max_segments * share),
                    }
                ),
                constrain=constrain,
                path_mm=float(lm.path_mm[-1]),
            )
            parts.append(tree)
    else:
        phi0 = rng.uniform(-1.3, -0.9)
        groove = surf(-0.75, phi0)
        root = groove * 1.3
        ost = lsystem.polyline(np.linspace(root, groove, 6), np.full(6, rng.uniform(1.9, 2.2)))
        parts.append(ost)
        target = surf(-0.6, phi0 - rng.uniform(2.0, 2.6))
        h = target - groove
        parts.append(
            lsystem.grow(
                rng,
                groove,
                h,
                rng.uniform(1.6, 1.9),
                Grammar(
                    **{**g.__dict__, "tropism": tuple(h / np.linalg.norm(h)), "tropism_weight": 0.3}
                ),
                constrain=constrain,
                path_mm=float(ost.path_mm[-1]),
            )
        )
    out = parts[0]
    for tree in parts[1:]:
        n = len(out)
        joined = lsystem.concat([out, tree])
        joined.parent[n:] = np.where(tree.parent >= 0, tree.parent + n, len(parts[0]) - 1)
        out = joined
    return out


def _cycle(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Fourier coefficients (amplitudes, phases) of a contraction curve over one beat."""
    amps = np.array([1.0, rng.uniform(0.2, 0.5), rng.uniform(0.0, 0.25)])
    return amps, rng.uniform(0, 2 * np.pi, 3)


def _contraction(phase: np.ndarray, amps: np.ndarray, phases: np.ndarray) -> np.ndarray:
    k = np.arange(1, 4)[:, None]
    g = (amps[:, None] * np.cos(2 * np.pi * k * phase[None] + phases[:, None])).sum(axis=0)
    grid = np.linspace(0, 1, 200)
    gg = (amps[:, None] * np.cos(2 * np.pi * k * grid[None] + phases[:, None])).sum(axis=0)
    return (g - gg.min()) / max(float(gg.max() - gg.min()), 1e-9)


def _smooth(ctrl: np.ndarray, n: int) -> np.ndarray:
    from scipy.interpolate import make_interp_spline

    s = np.r_[0.0, np.cumsum(np.linalg.norm(np.diff(ctrl, axis=0), axis=1))]
    return make_interp_spline(s / s[-1], ctrl, k=3)(np.linspace(0, 1, n))


def _tube_image(shape, polylines, radius_px) -> np.ndarray:
    """Chord length (px) through 2D tubes around ``polylines`` (lists of (col, row))."""
    img = Image.new("1", (shape[1], shape[0]), 0)
    draw = ImageDraw.Draw(img)
    for line in polylines:
        draw.line([tuple(p) for p in line], fill=1, width=1)
    dist = ndimage.distance_transform_edt(~np.asarray(img, bool))
    return 2.0 * np.sqrt(np.maximum(radius_px**2 - dist**2, 0.0))


def generate(
    seed: int,
    size: int = 512,
    frames: int | None = None,
    *,
    fps: float | None = None,
    side: str | None = None,
    noise: bool = True,
    shutter: bool = True,
    text: bool = True,
) -> CoronaryPhantomB:
    """Generate one family B coronary cine; deterministic for (seed, options).

    Args:
        seed: anatomy and acquisition seed.
        size: rows, 64-2048 (columns follow a seeded aspect ratio).
        frames: number of frames; None draws 2.5-5 s of cine.
        fps: frame rate; None draws 7.5-30 frames/s.
        side: "left" or "right"; None draws (3:2 left).
        noise, shutter, text: False turns the noise, the collimator shutter or
            the burned-in text off.
    """
    if not 64 <= size <= 2048:
        raise PhantomOptionError(f"size must be 64-2048, got {size}")
    rng = np.random.default_rng([seed, 0xB0, 0xC0])
    side = side or ("left" if rng.random() < 0.6 else "right")
    if side not in VIEWS:
        raise PhantomOptionError(f"side must be 'left' or 'right', got {side!r}")
    fps = float(fps or rng.choice([7.5, 10.0, 12.5, 15.0, 25.0, 30.0]))
    n = int(frames) if frames is not None else int(np.clip(rng.uniform(2.5, 5.0) * fps, 20, 120))
    if n < 4:
        raise PhantomOptionError(f"frames must be at least 4, got {n}")
    jitter = 0.0 if rng.random() < 0.5 else float(rng.uniform(0.005, 0.03))
    times = bolus.cine_schedule(rng, n, fps, jitter)
    hr = float(rng.uniform(55, 100))
    phase = (times * hr / 60.0 + rng.uniform(0, 1)) % 1.0
    amps, phs = _cycle(rng)
    squeeze = _contraction(phase, amps, phs)
    r_wave = np.flatnonzero(np.r_[True, np.diff(phase) < 0])

    axis = np.array([0.55, -0.45, -0.7]) + rng.normal(0, 0.1, 3)
    axis /= np.linalg.norm(axis)
    e1 = np.cross(axis, [0, 0, 1.0])
    e1 /= np.linalg.norm(e1)
    heart = _Heart(
        np.array([rng.uniform(10, 40), rng.uniform(-20, 0), rng.uniform(-45, -20)]),
        np.stack([e1, np.cross(axis, e1), axis], axis=1),
        float(rng.uniform(38, 50)),
        float(rng.uniform(45, 58)),
    )
    tree = _trees(rng, heart, side)
    tree, _ = tree.subdivided_with_index(2.0)
    view, primary, secondary = VIEWS[side][int(rng.integers(len(VIEWS[side])))]
    primary += rng.uniform(-5, 5)
    secondary += rng.uniform(-5, 5)
    aspect = float(rng.choice([1.0, 1.0, 1.0, 0.9, 1.2]))
    rows, cols = size, max(64, int(round(size * aspect / 8)) * 8)
    sid = float(rng.uniform(950, 1150))
    sod = float(rng.uniform(0.65, 0.78) * sid)
    world0 = heart.centre + tree.p1 @ heart.frame.T
    beam = ConeBeam(
        rotation(primary, secondary),
        0.5 * (world0.min(axis=0) + world0.max(axis=0)) + rng.normal(0, 8, 3),
        sid,
        sod,
        (rows, cols),
        float(rng.uniform(160, 250)) / max(rows, cols),
    )
    iso = beam.iso_spacing_mm
    source, dirs = beam.rays()
    kvp = float(rng.uniform(70, 95))
    mu_soft = 0.021 - 0.00006 * (kvp - 70)
    mu_bone = 0.08 - 0.0005 * (kvp - 70)
    mu_iodine = 0.45 - 0.005 * (kvp - 70)

    # Static chest in the detector plane.
    lung_tex = textures.fractal((rows, cols), float(rng.uniform(2.6, 3.2)), rng)
    torso = ellipsoid_chord(source, dirs, np.array([0, 0, -40.0]), np.array([165, 115, 300.0]))
    lungs = sum(
        ellipsoid_chord(source, dirs, np.array([s * 75.0, 10, 0]), np.array([65, 85, 150.0]))
        for s in (-1, 1)
    )
    spine = ellipsoid_chord(source, dirs, np.array([0, 75.0, 0]), np.array([20, 18, 400.0]))
    rr = np.arange(rows)[:, None] * iso
    vert = 1.0 + 0.35 * (np.sin(2 * np.pi * rr / rng.uniform(24, 30) + rng.uniform(0, 6)) > -0.6)
    static = (
        mu_soft * torso
        - 0.85 * mu_soft * lungs * (1.0 + 0.15 * lung_tex)
        + (mu_bone - mu_soft) * 0.55 * spine * vert
    ).astype(np.float32)
    # Ribs: hollow bone tubes drawn as arcs in the image plane.
    rib_lines = []
    period = rng.uniform(22, 30) / iso
    for k in range(-8, 9):
        r0 = rows / 2 + k * period + rng.normal(0, 2)
        cc = np.linspace(-0.2 * cols, 1.2 * cols, 40)
        bend = rng.uniform(0.4, 0.9) * rows / cols**2
        rib_lines.append(np.stack([cc, r0 + bend * (cc - cols * rng.uniform(0.3, 0.7)) ** 2], 1))
    rib_r = rng.uniform(4.0, 6.0) / iso
    ribs = (
        (
            _tube_image((rows, cols), rib_lines, rib_r)
            - 0.6 * _tube_image((rows, cols), rib_lines, 0.7 * rib_r)
        )
        * iso
        * (mu_bone - mu_soft)
    )
    wires = np.zeros((rows, cols), np.float32)
    if rng.random() < 0.3:  # sternal wires: small dense loops down the midline
        c0 = beam.project(np.array([[0.0, -110.0, -20.0]]))[0][0]
        img = Image.new("F", (cols, rows), 0)
        d = ImageDraw.Draw(img)
        for k in range(int(rng.integers(3, 6))):
            cy = c0[1] + (k - 2) * rng.uniform(20, 28) / iso
            w, hh = rng.uniform(5, 9) / iso, rng.uniform(2, 4) / iso
            d.ellipse([c0[0] - w, cy - hh, c0[0] + w, cy + hh], outline=3.0, width=2)
        wires += np.asarray(img, np.float32)
    if rng.random() < 0.5:  # ECG leads and electrodes
        img = Image.new("F", (cols, rows), 0)
        d = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(1, 4))):
            p0 = (rng.uniform(0, cols), rng.uniform(0, rows))
            p1 = (rng.uniform(0, cols), rng.uniform(0, rows))
            mid = ((p0[0] + p1[0]) / 2 + rng.normal(0, cols / 6), (p0[1] + p1[1]) / 2)
            d.line([p0, mid, p1], fill=0.4, width=1)
            rad = 5.0 / iso
            d.ellipse([p1[0] - rad, p1[1] - rad, p1[0] + rad, p1[1] + rad], fill=0.25)
            d.ellipse(
                [p1[0] - rad / 3, p1[1] - rad / 3, p1[0] + rad / 3, p1[1] + rad / 3], fill=2.0
            )
        wires += np.asarray(img, np.float32)
    static += wires

    # Acquisition facts and the contrast injection.
    breath_amp = float(rng.uniform(2, 12))
    breath_dir = rng.normal(size=3) * [0.3, 0.3, 1.0]
    breath_dir /= np.linalg.norm(breath_dir)
    breath = (
        breath_amp * 0.5 * (1 - np.cos(2 * np.pi * times / rng.uniform(3.5, 6) + rng.uniform(0, 6)))
    )
    amp_r, amp_l, twist = rng.uniform(0.08, 0.16), rng.uniform(0.04, 0.1), rng.uniform(5, 15)
    inj0, inj_len = float(rng.uniform(-0.3, 0.8)), float(rng.uniform(1.5, 3.5))
    speed, tau_r, tau_w = rng.uniform(120, 250), rng.uniform(0.1, 0.3), rng.uniform(0.5, 1.2)
    peak = float(rng.uniform(0.6, 0.9))
    arch = (
        np.array(
            [[-40.0, 60, -260], [-35, 55, 0], [-15, 35, 70], [5, 0, 55], [0, 0, 25], [0, 0, 0]]
        )
        + np.r_[rng.normal(0, 5, (5, 3)), np.zeros((1, 3))]
    )
    diaphragm_row = rows * rng.uniform(0.7, 1.05)
    dome = rng.uniform(0.5, 1.5) * rows / cols**2
    dome_c = cols * rng.uniform(0.3, 0.7)
    cc = np.arange(cols)[None, :]

    att = np.empty((n, rows, cols), np.float32)
    vessel = np.zeros((n, rows, cols), bool)
    catheter = np.zeros((n, rows, cols), bool)
    heart_px = None
    for k in range(n):
        s = float(squeeze[k])
        scale = np.array([1 - amp_r * s, 1 - amp_r * s, 1 - amp_l * s])
        ang = np.deg2rad(twist * s)

        def world(
            local: np.ndarray, ang: float = ang, scale: np.ndarray = scale, k: int = k
        ) -> np.ndarray:
            q = local * scale
            tw = ang * (q[:, 2] / heart.half_length + 1.0) / 2.0
            x = q[:, 0] * np.cos(tw) - q[:, 1] * np.sin(tw)
            y = q[:, 0] * np.sin(tw) + q[:, 1] * np.cos(tw)
            return (
                heart.centre + np.stack([x, y, q[:, 2]], 1) @ heart.frame.T + breath[k] * breath_dir
            )

        seg = Segments(
            world(tree.p0),
            world(tree.p1),
            tree.r0,
            tree.r1,
            tree.parent,
            tree.branch,
            tree.order,
            tree.path_mm,
            tree.role,
        )
        age = times[k] - inj0 - tree.path_mm / speed
        rise = np.where(age > 0, 1 - np.exp(-np.maximum(age, 0) / tau_r), 0.0)
        fall = np.where(age > inj_len, np.exp(-(age - inj_len) / tau_w), 1.0)
        conc = peak * rise * fall
        img = render_segments(
            seg, beam, np.zeros(len(seg), int), 1, np.where(conc > 0.1 * peak, 0, -1), 1, conc
        )
        vessel[k] = img.cover[0]
        heart_chord = ellipsoid_chord(
            source,
            dirs,
            heart.centre + breath[k] * breath_dir,
            np.array([heart.radius * 1.1 * scale[0]] * 2 + [heart.half_length * 1.2 * scale[2]]),
            heart.frame,
        )
        if heart_px is None:
            heart_px = heart_chord > 30.0
        # Guiding catheter: down the descending aorta, over the arch, into the ostium.
        tip = world(tree.p0[:1])[0]
        ctrl = np.array([tip + v for v in arch])
        c_img = render_segments(
            lsystem.polyline(_smooth(ctrl, 24), np.full(24, 1.0)), beam, np.zeros(23, int), 1
        )
        catheter[k] = c_img.cover[0]
        in_cath = peak if inj0 - 0.2 <= times[k] <= inj0 + inj_len else 0.0
        shift = breath[k] / iso * 0.6
        moving = ndimage.shift(ribs, (shift, 0.0), order=1, mode="nearest")
        depth = np.arange(rows)[:, None] - (diaphragm_row + shift - dome * (cc - dome_c) ** 2)
        diaphragm = mu_soft * np.clip(depth * iso * 1.5, 0, 120)
        att[k] = (
            static
            + moving
            + diaphragm
            + 0.2 * mu_soft * heart_chord
            + 0.12 * c_img.path_mm[0]
            + mu_iodine * (img.path_mm[0] + in_cath * 0.5 * c_img.path_mm[0])
        )

    field_ = textures.draw_shutter(rows, cols, rng) if shutter else None
    open_field = (
        np.ones((rows, cols), np.float32)
        if field_ is None
        else textures.soft_field(field_.field(rows, cols), float(rng.uniform(1, 3)))
    )
    inside = open_field > 0.5
    det = detector.draw_detector(rng, beam.pitch_mm, (0.1, 0.3), (0.5, 1.0))
    noise_rng = np.random.default_rng([seed, 0xB0, 0xC1, rows, cols, n]) if noise else None
    region = heart_px & inside if (heart_px & inside).any() else inside
    signal = detector.expose(
        att, det, noise_rng, open_field if field_ else None, (torso > 0).astype(np.float32), region
    )

    # Display processing as cardiac systems store cine.
    log = np.log(np.maximum(signal, 1.0))
    log -= float(rng.uniform(0.3, 0.7)) * np.stack(
        [ndimage.gaussian_filter(f, 25.0 / iso, mode="nearest") for f in log]
    )
    sharpen = float(rng.uniform(0.0, 0.8))
    log += sharpen * (log - ndimage.gaussian_filter(log, (0, 1.5, 1.5)))
    bits = int(rng.choice([8, 8, 10, 12]))
    top = 2**bits - 1
    gain = (top + 1) * float(rng.uniform(0.25, 0.5))
    ref = float(np.median(log[0][region]))
    display = (top + 1) * 0.5 + gain * (log - ref)
    burn_shutter = field_ is not None and rng.random() < 0.5
    if burn_shutter:
        display[:, ~inside] = 0
    text_mask = np.zeros((rows, cols), bool)
    with_text = text and rng.random() < 0.5
    if with_text:
        for k in range(n):
            ann = (
                textures.annotation(
                    rows,
                    cols,
                    [f"FAMB {seed:05d}", f"{hr:.0f} bpm"],
                    [f"{k + 1}/{n}"],
                    "",
                    int(round(20.0 / iso)),
                )
                > 0.5
            )
            display[k][ann] = top
            text_mask |= ann
    stored = np.clip(np.rint(display), 0, top)
    quality, ratio = 0, 1.0
    if bits == 8 and rng.random() < 0.6:
        quality = int(rng.integers(70, 95))
        stored8 = stored.astype(np.uint8)
        stored = np.stack([textures.jpeg_roundtrip(f, quality) for f in stored8]).astype(float)
        import io

        buf = io.BytesIO()
        Image.fromarray(stored8[n // 2]).save(buf, format="JPEG", quality=quality)
        ratio = stored8[n // 2].nbytes / max(buf.tell(), 1)
    pixels = stored.astype(np.uint8 if bits == 8 else np.uint16)
    acq = CineAcquisitionB(
        view=view,
        primary_angle=float(primary),
        secondary_angle=float(secondary),
        patient_orientation=("L", "F"),
        kvp=kvp,
        tube_current_ma=float(rng.uniform(500, 900)),
        pulse_ms=float(rng.uniform(3, 8)),
        sid_mm=sid,
        sod_mm=sod,
        pitch_mm=beam.pitch_mm,
        fps=(fps, fps),
        quanta_per_mm2=det.quanta_per_mm2,
        contrast_volume_ml=float(inj_len * rng.uniform(2.5, 4)),
        bits=bits,
        spacing_mode=str(rng.choice(["imager", "both", "none"], p=[0.5, 0.2, 0.3])),
        burned_in_text=with_text,
        burned_in_shutter=burn_shutter,
        jpeg_quality=quality,
        jpeg_ratio=float(ratio),
    )
    return CoronaryPhantomB(
        seed=seed,
        side=side,
        pixels=pixels,
        frame_times_s=times,
        pixel_spacing_mm=(iso, iso),
        truth={
            "vessel": vessel & inside[None],
            "catheter": catheter & inside[None],
            "field": inside,
            "text": text_mask,
        },
        r_wave_frames=r_wave.astype(np.int32),
        heart_rate_bpm=hr,
        acquisition=acq,
        shutter=field_,
        options={
            "family": "B",
            "size": size,
            "frames": n,
            "fps": fps,
            "side": side,
            "noise": noise,
            "shutter": shutter,
            "text": text,
        },
    )
