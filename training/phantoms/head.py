"""Skull, skull base, face, neck and brain as ellipsoid primitives.

One description serves both the 2D phantoms (analytic line integrals, so the
skull edge stays sharp at any image size, which is what leaves realistic
misregistration artefacts after motion) and the 3D phantom (voxelised by
painting primitives in order, later ones overwrite earlier ones).

Attenuation coefficients are for an effective energy of about 46 keV, the mean
energy behind a head for a 70-80 kVp angiography spectrum (NIST XCOM / Hubbell &
Seltzer, NISTIR 5632): soft tissue 0.025/mm, cortical bone 0.11/mm, diploe
about 0.06/mm. Skull-base, facial and spinal bones are modelled as solid
ellipsoids, so they carry 30-60 % of the cortical value to stand for their
cancellous and pneumatised interior; randomised 3D volumes can draw the
petrous bone, mastoid and clivus instead as septa around marrow or air cells
(``Porosity``). Hounsfield-like values are those of a cone-beam CT: cortical
bone 1200-1800, diploe 400-800, brain 35, CSF 10, fat -80, air -1000.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from training.phantoms.cerebral import Brain
from training.phantoms.raster import Projection

MU_SOFT = 0.025  # 1/mm
MU_BONE = 0.11
MU_DIPLOE = 0.06

AIR, VESSEL, BONE, SOFT = 0, 1, 2, 3


@dataclass(frozen=True)
class Ellipsoid:
    """``mu`` is added to the line integral (1/mm, may be negative for cavities);
    ``hu`` / ``label`` are painted into voxels (None leaves them as they are).
    ``bone_texture`` marks the terms whose sum is the excess attenuation of
    bone, which gets a diploic texture (and, in voxels, bone values do too)."""

    centre: np.ndarray
    axes: np.ndarray
    rotation: np.ndarray
    mu: float
    hu: float | None
    label: int | None
    bone_texture: bool = False
    # Skull-base bone whose interior is cancellous or pneumatised: in voxels it
    # can be drawn as thin bony septa around marrow or air cells (``Porosity``).
    cancellous: bool = False


@dataclass(frozen=True)
class Porosity:
    """The interior of the skull-base bones as a sponge: bony septa around cells.

    ``fraction`` of a cancellous primitive's volume is cell (0 leaves it solid),
    cells are about ``cell_mm`` across and hold ``cell_hu`` (marrow near 0 HU, air
    cells of a pneumatised mastoid or petrous apex near -1000 HU). The septa are
    the band ``|g| < w`` of a smooth Gaussian field ``g``, so they are sheets
    meeting in ridges, as in trabecular bone and mastoid air cells."""

    fraction: float
    cell_mm: float
    cell_hu: float


def _rot(deg_x: float = 0.0, deg_y: float = 0.0, deg_z: float = 0.0) -> np.ndarray:
    ax, ay, az = np.deg2rad([deg_x, deg_y, deg_z])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def head_primitives(brain: Brain, rng: np.random.Generator) -> list[Ellipsoid]:
    """Nested calvarium shells around the brain plus skull base, face and neck."""
    c, a = brain.centre, brain.axes
    eye = np.eye(3)
    t_outer, t_diploe, t_inner = rng.uniform(1.6, 2.4), rng.uniform(2.5, 4.5), rng.uniform(1.4, 2.2)
    csf = 2.0
    skull_in = a + csf
    prims = [
        Ellipsoid(
            np.array([0.0, 12.0, -150.0]), np.array([55.0, 60.0, 90.0]), eye, MU_SOFT, 40.0, SOFT
        ),  # neck
        Ellipsoid(
            np.array([0.0, -62.0, -70.0]), np.array([52.0, 38.0, 48.0]), eye, MU_SOFT, 40.0, SOFT
        ),  # face
        Ellipsoid(
            c, skull_in + t_inner + t_diploe + t_outer + 6.0, eye, MU_SOFT, 40.0, SOFT
        ),  # scalp
        Ellipsoid(
            c, skull_in + t_inner + t_diploe + t_outer, eye, MU_BONE - MU_SOFT, 1500.0, BONE, True
        ),
        Ellipsoid(c, skull_in + t_inner + t_diploe, eye, MU_DIPLOE - MU_BONE, 650.0, BONE, True),
        Ellipsoid(c, skull_in + t_inner, eye, MU_BONE - MU_DIPLOE, 1500.0, BONE, True),
        Ellipsoid(c, skull_in, eye, MU_SOFT - MU_BONE, 10.0, SOFT, True),  # CSF space
        Ellipsoid(c, a, eye, 0.0, 35.0, SOFT),  # brain
    ]
    for s in (-1.0, 1.0):
        prims += [
            Ellipsoid(
                np.array([s * 12, 2.0, 22.0]), np.array([6.0, 28.0, 9.0]), eye, -0.001, 8.0, SOFT
            ),  # lateral ventricle
            # Petrous ridge running anteromedially, mastoid behind it.
            Ellipsoid(
                np.array([s * 32, 18.0, -40.0]),
                np.array([9.0, 30.0, 9.0]),
                _rot(deg_z=-s * 40),
                0.5 * MU_BONE,
                1700.0,
                BONE,
                True,
                cancellous=True,
            ),
            Ellipsoid(
                np.array([s * 52, 32.0, -52.0]),
                np.array([10.0, 12.0, 14.0]),
                eye,
                0.3 * MU_BONE,
                700.0,
                BONE,
                True,
                cancellous=True,
            ),
            Ellipsoid(
                np.array([s * 30, -62.0, -22.0]),
                np.array([15.0, 18.0, 15.0]),
                eye,
                -0.2 * MU_SOFT,
                -60.0,
                SOFT,
            ),  # orbit
            Ellipsoid(
                np.array([s * 27, -58.0, -62.0]),
                np.array([13.0, 16.0, 14.0]),
                eye,
                -MU_SOFT,
                -1000.0,
                AIR,
            ),  # maxillary sinus
            Ellipsoid(
                np.array([s * 46, -28.0, -98.0]),
                np.array([6.0, 12.0, 28.0]),
                _rot(deg_x=15),
                0.6 * MU_BONE,
                1600.0,
                BONE,
            ),  # ramus
        ]
    prims += [
        Ellipsoid(
            np.array([0.0, 2.0, -50.0]),
            np.array([10.0, 9.0, 24.0]),
            _rot(deg_x=-55),
            0.5 * MU_BONE,
            1400.0,
            BONE,
            True,
            cancellous=True,
        ),  # clivus
        Ellipsoid(
            np.array([0.0, -16.0, -40.0]), np.array([13.0, 11.0, 10.0]), eye, -MU_SOFT, -1000.0, AIR
        ),  # sphenoid sinus
        # Frontal sinus inside the frontal bone, above the orbits.
        Ellipsoid(
            np.array(
                [
                    0.0,
                    c[1] - (skull_in[1] + t_inner + 0.5 * t_diploe) * 0.96,
                    c[2] - 0.28 * skull_in[2],
                ]
            ),
            np.array([13.0, 0.5 * t_diploe + 1.0, 9.0]),
            eye,
            -0.6 * MU_DIPLOE,
            -1000.0,
            AIR,
            True,
        ),
        Ellipsoid(
            np.array([0.0, -68.0, -72.0]),
            np.array([38.0, 18.0, 11.0]),
            eye,
            0.35 * MU_BONE,
            1300.0,
            BONE,
            True,
        ),  # maxilla
        Ellipsoid(
            np.array([0.0, -56.0, -112.0]),
            np.array([46.0, 34.0, 9.0]),
            eye,
            0.6 * MU_BONE,
            1600.0,
            BONE,
        ),  # mandible body
        Ellipsoid(
            np.array([0.0, -56.0, -112.0]),
            np.array([38.0, 26.0, 8.5]),
            eye,
            MU_SOFT - 0.6 * MU_BONE,
            40.0,
            SOFT,
        ),
    ]
    for k, z in enumerate(np.arange(-70.0, -190.0, -19.0)):
        w = 13.0 + 0.6 * k
        prims += [
            Ellipsoid(
                np.array([0.0, 24.0, z]),
                np.array([w, 9.0, 7.5]),
                eye,
                0.5 * (MU_BONE - MU_SOFT),
                900.0,
                BONE,
                True,
            ),
            Ellipsoid(
                np.array([0.0, 44.0, z - 2.0]),
                np.array([20.0, 9.0, 6.0]),
                _rot(deg_x=20),
                0.35 * (MU_BONE - MU_SOFT),
                900.0,
                BONE,
            ),
        ]
    return prims


def _plane_chords(prim: Ellipsoid, proj: Projection) -> np.ndarray:
    """Length (mm) inside the ellipsoid of every pixel's ray, (H, W).

    The rays start on a plane, so the quadratic's coefficients are separable in
    row and column: a few outer sums instead of a (H*W, 3) matrix product.
    """
    half = (proj.size - 1) / 2.0
    k = (np.arange(proj.size) - half) * proj.spacing_mm
    m = prim.rotation / prim.axes[None, :]  # x @ m maps patient offsets to unit-sphere coordinates
    o0 = (proj.centre - prim.centre) @ m
    du = proj.axis_u @ m
    dv = proj.axis_v @ m
    d = proj.beam @ m
    a = d @ d
    b = (o0 @ d) + k[None, :] * (du @ d) + k[:, None] * (dv @ d)
    c = (
        o0 @ o0
        - 1.0
        + 2.0 * k[None, :] * (o0 @ du)
        + 2.0 * k[:, None] * (o0 @ dv)
        + (k * k)[None, :] * (du @ du)
        + (k * k)[:, None] * (dv @ dv)
        + 2.0 * np.outer(k, k) * (du @ dv)
    )
    disc = b * b - a * c
    return 2.0 * np.sqrt(np.maximum(disc, 0.0)) / a


def project_head(prims: list[Ellipsoid], proj: Projection, rng: np.random.Generator) -> np.ndarray:
    """Line integral of attenuation through the head (dimensionless), (H, W)."""
    n = proj.size
    soft = np.zeros((n, n))
    bone = np.zeros((n, n))
    for p in prims:
        ch = p.mu * _plane_chords(p, proj)
        if p.bone_texture:
            bone += ch
        else:
            soft += ch
    # Diploic and vascular-groove texture: bone attenuation varies by several
    # percent at 2-15 mm scales, which a real mask frame shows and subtraction removes.
    tex = _smooth_noise(rng, (n, n), sigma_px=6.0 / proj.spacing_mm) * 0.08
    tex += _smooth_noise(rng, (n, n), sigma_px=1.5 / proj.spacing_mm) * 0.03
    return np.maximum(soft, 0.0) + np.maximum(bone, 0.0) * (1.0 + tex)


def brain_chord(
    brain: Brain, proj: Projection, side: int, midline_gap_mm: float = 2.0
) -> np.ndarray:
    """Path length (mm) through one hemisphere of the brain ellipsoid, (H, W)."""
    # The hemisphere is the ellipsoid cut by the plane side * (x - x_c) = gap; its
    # chord is the full chord clipped to the ray interval on the injected side.
    n = proj.size
    half = (n - 1) / 2.0
    k = (np.arange(n) - half) * proj.spacing_mm
    origin = (
        proj.centre[None, None, :] + k[None, :, None] * proj.axis_u + k[:, None, None] * proj.axis_v
    )
    o = (origin - brain.centre) / brain.axes
    d = proj.beam / brain.axes
    a = d @ d
    b = o @ d
    c = (o * o).sum(axis=2) - 1.0
    disc = b * b - a * c
    root = np.sqrt(np.maximum(disc, 0.0))
    s0, s1 = (-b - root) / a, (-b + root) / a
    x0 = origin[..., 0] - brain.centre[0]
    bx = proj.beam[0]
    if abs(bx) < 1e-9:
        length = np.where(side * x0 > midline_gap_mm, s1 - s0, 0.0)
    else:
        s_mid = (side * midline_gap_mm - x0) / bx
        if side * bx > 0:
            length = s1 - np.maximum(s0, s_mid)
        else:
            length = np.minimum(s1, s_mid) - s0
    return np.where(disc > 0, np.maximum(length, 0.0), 0.0)


def voxelize_head(
    prims: list[Ellipsoid],
    origin_mm: np.ndarray,
    spacing_mm: float,
    shape: tuple[int, int, int],
    rng: np.random.Generator,
    porosity: Porosity | None = None,
    porosity_rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Paint primitives into (Z, Y, X) Hounsfield-like values and labels (0 air, 2 bone, 3 soft).

    With ``porosity`` (fraction > 0) the cancellous primitives are septa around
    cells (``Porosity``), drawn from ``porosity_rng``; the cells are labelled soft
    tissue (marrow) or air (air cells)."""
    nz, ny, nx = shape
    hu = np.full(shape, -1000.0, np.float32)
    labels = np.zeros(shape, np.uint8)
    axes_idx = [np.arange(n) * spacing_mm + o for n, o in zip((nx, ny, nz), origin_mm, strict=True)]
    tex = _smooth_noise(rng, shape, sigma_px=3.0 / spacing_mm).astype(np.float32)
    cells, cell_hu = None, 0.0
    if porosity is not None and porosity.fraction > 0:
        cell_hu = porosity.cell_hu
        from scipy.stats import norm

        g = _smooth_noise(
            porosity_rng if porosity_rng is not None else rng,
            shape,
            sigma_px=porosity.cell_mm / 2.5 / spacing_mm,
        )
        # |g| < w holds 1 - fraction of the voxels (g is standard normal at each voxel).
        cells = np.abs(g) >= norm.ppf(1.0 - 0.5 * porosity.fraction)
        del g
    for p in prims:
        if p.hu is None:
            continue
        reach = np.abs(p.rotation) @ p.axes  # half extent of the rotated box
        lo = [
            int(max(0, np.floor((p.centre[i] - reach[i] - origin_mm[i]) / spacing_mm)))
            for i in range(3)
        ]
        hi = [
            int(min(n, np.ceil((p.centre[i] + reach[i] - origin_mm[i]) / spacing_mm) + 1))
            for i, n in enumerate((nx, ny, nz))
        ]
        if any(top <= bottom for bottom, top in zip(lo, hi, strict=True)):
            continue
        x = axes_idx[0][lo[0] : hi[0]] - p.centre[0]
        y = axes_idx[1][lo[1] : hi[1]] - p.centre[1]
        z = axes_idx[2][lo[2] : hi[2]] - p.centre[2]
        r = p.rotation
        q = 0.0
        for k in range(3):
            comp = (
                z[:, None, None] * r[2, k] + y[None, :, None] * r[1, k] + x[None, None, :] * r[0, k]
            ) / p.axes[k]
            q = q + comp * comp
        inside = q <= 1.0
        sl = (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))
        value = p.hu
        if p.bone_texture and p.label == BONE:
            block = value * (1.0 + 0.18 * tex[sl])
            hu[sl] = np.where(inside, block, hu[sl])
        else:
            hu[sl] = np.where(inside, value, hu[sl])
        if p.label is not None:
            labels[sl] = np.where(inside, p.label, labels[sl])
        if cells is not None and p.cancellous:
            cell = inside & cells[sl]
            hu[sl] = np.where(cell, cell_hu, hu[sl])
            labels[sl] = np.where(cell, SOFT if cell_hu > -400 else AIR, labels[sl])
    return hu, labels


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_px: float) -> np.ndarray:
    """Zero-mean, unit-variance Gaussian random field with correlation length ``sigma_px``."""
    # Generate at a coarse grid and zoom: same look, far cheaper for large sigma.
    factor = max(1, int(sigma_px // 2))
    coarse = tuple(max(4, -(-n // factor)) for n in shape)
    field = ndimage.gaussian_filter(
        rng.normal(size=coarse), sigma=max(sigma_px / factor, 0.5), mode="wrap"
    )
    if factor > 1:
        field = ndimage.zoom(field, [n / c for n, c in zip(shape, coarse, strict=True)], order=1)[
            tuple(slice(0, n) for n in shape)
        ]
    std = field.std()
    return (field - field.mean()) / (std if std > 0 else 1.0)
