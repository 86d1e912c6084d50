"""Devices in a cerebral run: guide catheter, coil, clips and a microcatheter.

All are static during a run (so they subtract away unless the mask is
misregistered); the guide catheter's lumen fills with contrast at the
injection, so it shows in the subtraction. Attenuation at about 46 keV:
platinum coil wire and marker bands 8/mm, clips (titanium or cobalt alloy)
about 2/mm, braided catheter walls a few times soft tissue.
"""

from __future__ import annotations

import numpy as np

from training.phantoms import cerebral, physics
from training.phantoms.raster import Projection, render_tree
from training.phantoms.vessels import VesselTree


def devices(
    anatomy: cerebral.CerebralAnatomy,
    proj: Projection,
    rng: np.random.Generator,
    enabled: bool,
    micro: bool = False,
):
    """Static guide catheter (wall + contrast-filled lumen), platinum coil mass, clip, microcatheter."""
    n = proj.size
    att = np.zeros((n, n))
    mask = np.zeros((n, n), bool)
    lumen = np.zeros((n, n), np.float32)
    if not enabled:
        return att, mask, lumen
    cath = anatomy.catheter
    k = len(cath)
    base = dict(
        points=cath,
        parent=np.arange(-1, k - 1),
        delay=np.zeros(k),
        label=np.zeros(k, np.uint8),
        names=("catheter",),
    )
    outer = render_tree(VesselTree(radius=np.full(k, 0.85), **base), proj, np.zeros(k, int), 1)
    inner = render_tree(VesselTree(radius=np.full(k, 0.55), **base), proj, np.zeros(k, int), 1)
    att += physics.MU_CATHETER * (outer.thickness_mm[0] - inner.thickness_mm[0])
    lumen += inner.thickness_mm[0]
    mask |= outer.cover[0]
    if anatomy.coil is not None:
        centre, radius = anatomy.coil
        coil_rng = np.random.default_rng(rng.integers(2**32))
        steps = coil_rng.normal(size=(600, 3))
        steps = 0.5 * steps / np.linalg.norm(steps, axis=1, keepdims=True)
        walk = np.cumsum(steps, axis=0)
        # Fold the walk into the sac: wire packed against the wall, as coils are.
        r = np.linalg.norm(walk, axis=1, keepdims=True)
        walk = walk * np.where(r > radius, (radius - (r % radius) * 0.3) / np.maximum(r, 1e-9), 1.0)
        pts = centre + walk
        m = len(pts)
        wire = VesselTree(
            pts,
            np.arange(-1, m - 1),
            np.full(m, 0.13),
            np.zeros(m),
            np.zeros(m, np.uint8),
            ("coil",),
        )
        img = render_tree(wire, proj, np.zeros(m, int), 1)
        att += physics.MU_PLATINUM * img.thickness_mm[0]
        mask |= img.cover[0]
    if anatomy.clips is not None:
        for blade in anatomy.clips:
            tube = VesselTree(
                blade,
                np.array([-1, 0]),
                np.full(2, 0.5),
                np.zeros(2),
                np.zeros(2, np.uint8),
                ("clip",),
            )
            img = render_tree(tube, proj, np.zeros(2, int), 1)
            att += MU_CLIP * img.thickness_mm[0]
            mask |= img.cover[0]
    if micro:
        wall, cover = microcatheter(anatomy, proj, rng)
        att += wall
        mask |= cover
    return att, mask, lumen


MU_CLIP = 2.0  # titanium / cobalt alloy clip at about 46 keV, 1/mm


def microcatheter(
    anatomy: cerebral.CerebralAnatomy, proj: Projection, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A microcatheter from the guide's tip up the ICA (into M1 in half the runs), with
    two platinum marker bands at its tip and 30 mm behind it; static, so it subtracts away."""
    art = anatomy.arteries
    names = ["ica"] + (["m1"] if rng.random() < 0.5 else [])
    idx = np.flatnonzero(np.isin(art.label, [art.label_of(nm) for nm in names]))
    idx = idx[np.argsort(art.delay[idx])]
    tip = anatomy.catheter[-1]
    start = int(np.argmin(np.linalg.norm(art.points[idx] - tip, axis=1)))
    stop = start + int((len(idx) - start) * rng.uniform(0.6, 1.0))
    pts = art.points[idx[start:stop:2]]
    n = proj.size
    if len(pts) < 3:
        return np.zeros((n, n)), np.zeros((n, n), bool)
    pts = pts + rng.normal(scale=0.3, size=pts.shape)
    k = len(pts)
    base = dict(
        points=pts, parent=np.arange(-1, k - 1), delay=np.zeros(k), label=np.zeros(k, np.uint8)
    )
    outer = render_tree(
        VesselTree(radius=np.full(k, 0.33), names=("micro",), **base), proj, np.zeros(k, int), 1
    )
    inner = render_tree(
        VesselTree(radius=np.full(k, 0.21), names=("micro",), **base), proj, np.zeros(k, int), 1
    )
    wall = 3 * physics.MU_CATHETER * (outer.thickness_mm[0] - inner.thickness_mm[0])
    steps = np.linalg.norm(np.diff(pts, axis=0), axis=1)
    back = np.r_[0.0, np.cumsum(steps[::-1])][::-1]  # distance from the tip
    for at in (0.0, 30.0):
        j = int(np.argmin(np.abs(back - at)))
        if j == 0:
            continue
        band = VesselTree(
            pts[j - 1 : j + 1],
            np.array([-1, 0]),
            np.full(2, 0.35),
            np.zeros(2),
            np.zeros(2, np.uint8),
            ("band",),
        )
        wall += physics.MU_PLATINUM * render_tree(band, proj, np.zeros(2, int), 1).thickness_mm[0]
    return wall, outer.cover[0]
