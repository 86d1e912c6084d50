"""The beating heart, chest and diaphragm of the coronary phantom.

The heart is an ellipsoidal epicardium (long axis, radius, length) on which
the coronary tree lies in (height, angle) coordinates; ventricular
contraction shortens and narrows it with apical twist. The chest is
ellipsoids (torso, lungs, heart shadow, spine, aorta) with ribs as bone
tubes, and the diaphragm is the dome of the liver, which rises and falls with
breathing. Attenuation values are those of ``head`` (about 46-60 keV).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.phantoms.head import MU_BONE, MU_SOFT, Ellipsoid, _plane_chords
from training.phantoms.raster import Projection, render_tree
from training.phantoms.vessels import VesselTree, spline_chain


@dataclass
class Heart:
    centre: np.ndarray
    axis: np.ndarray  # base -> apex
    e1: np.ndarray
    e2: np.ndarray
    radius: float
    length: float


def surface(
    heart: Heart,
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


def contraction(phase: np.ndarray) -> np.ndarray:
    """0 (end-diastole) to 1 (end-systole): fast systole over the first third, slower relaxation."""
    sys = np.clip(phase / 0.33, 0, 1)
    rel = np.clip((phase - 0.33) / 0.3, 0, 1)
    return np.where(phase < 0.33, np.sin(0.5 * np.pi * sys) ** 2, np.cos(0.5 * np.pi * rel) ** 2)


def heart_mask(proj: Projection, heart: Heart) -> np.ndarray:
    prim = Ellipsoid(
        heart.centre + heart.axis * heart.length * 0.3,
        np.array([heart.radius, heart.radius, heart.length * 0.8]),
        frame(heart),
        1.0,
        None,
        None,
    )
    return _plane_chords(prim, proj) > 20.0


def frame(heart: Heart) -> np.ndarray:
    return np.stack([heart.e1, heart.e2, heart.axis], axis=1)


def diaphragm(
    proj: Projection, heart: Heart, breath_mm: float, shift_mm: float = 0.0
) -> np.ndarray:
    liver = Ellipsoid(
        np.array([-20.0, 0.0, -175.0 - breath_mm + shift_mm]),
        np.array([150.0, 110.0, 95.0]),
        np.eye(3),
        MU_SOFT,
        None,
        None,
    )
    return MU_SOFT * _plane_chords(liver, proj)


def chest(
    rng: np.random.Generator,
    proj: Projection,
    heart: Heart,
    ostium: np.ndarray,
    torso: float = 1.0,
    catheter_mm: float = 1.0,
) -> tuple[dict[str, np.ndarray], VesselTree]:
    """Static chest (torso, lungs, spine), ribs (moving with breathing) and the guiding catheter.

    ``torso`` scales the chest's width and depth (slim to obese), ``catheter_mm``
    is the guiding catheter's radius.
    """
    eye = np.eye(3)
    prims = [
        Ellipsoid(
            np.array([0.0, 0.0, -40.0]),
            np.array([160.0 * torso, 110.0 * torso, 260.0]),
            eye,
            MU_SOFT,
            None,
            None,
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
            frame(heart),
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
    cp, cr = spline_chain(ctrl, np.full(len(ctrl), catheter_mm), 2.0)
    k = len(cp)
    cath = VesselTree(
        cp, np.arange(-1, k - 1), cr, np.zeros(k), np.zeros(k, np.uint8), ("catheter",)
    )
    return {"static": static, "moving": moving}, cath
