"""Objects on and in the chest that coronary runs show besides the arteries.

Sternal wires after sternotomy, surgical clips from bypass grafting, ECG
electrodes with their lead wires, and a PCI guidewire in the artery. They are
centre-line tubes (``VesselTree``) so the projection renderer draws them with
partial volume; the chest-wall objects move with breathing like the ribs, the
guidewire with the heart. Attenuation at about 60 keV effective: stainless
steel about 3/mm, the electrode's snap and ring and the lead's copper about
1/mm (the foam pad is not drawn: it is nearly invisible).
"""

from __future__ import annotations

import numpy as np

from training.phantoms.raster import Projection, render_tree
from training.phantoms.vessels import VesselTree, spline_chain

MU_STEEL = 3.0
MU_LEAD = 1.0


def _tube(points: list[np.ndarray], radius: float, names: str) -> VesselTree:
    """Join poly-lines into one tree of separate chains."""
    pts, parents = [], []
    count = 0
    for p in points:
        k = len(p)
        pts.append(p)
        parents.append(np.r_[-1, np.arange(count, count + k - 1)])
        count += k
    return VesselTree(
        np.concatenate(pts),
        np.concatenate(parents).astype(np.int64),
        np.full(count, radius),
        np.zeros(count),
        np.zeros(count, np.uint8),
        (names,),
    )


def static_devices(
    rng: np.random.Generator,
    proj: Projection,
    heart_centre: np.ndarray,
    sternal: bool,
    ecg: bool,
    clips: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Attenuation (H, W) and cover mask of chest-wall devices, in the diastolic position."""
    n = proj.size
    att = np.zeros((n, n))
    cover = np.zeros((n, n), bool)

    def add(tree: VesselTree, mu: float) -> None:
        nonlocal att, cover
        img = render_tree(tree, proj, np.zeros(len(tree), int), 1)
        att = att + mu * img.thickness_mm[0]
        cover |= img.cover[0]

    if sternal:
        loops = []
        for z in np.linspace(60.0, -60.0, int(rng.integers(4, 8))) + rng.normal(0, 4.0):
            ang = np.linspace(0, 2 * np.pi, 40)
            w, h = rng.uniform(10, 16), rng.uniform(2.5, 4.0)
            x = w * np.cos(ang) + rng.normal(0, 1.0)
            loops.append(np.stack([x, -105.0 + 3 * np.sin(ang), z + h * np.sin(ang)], 1))
            # the twisted ends
            loops.append(np.array([[w, -105.0, z], [w + 6.0, -109.0, z + rng.uniform(-3, 3)]]))
        add(_tube(loops, 0.45, "sternal wire"), MU_STEEL)
    if clips:
        bars = []
        for _ in range(int(rng.integers(3, 9))):
            c = heart_centre + rng.normal(0, 30.0, size=3)
            d = rng.normal(size=3)
            d *= rng.uniform(2.0, 3.5) / np.linalg.norm(d)
            bars.append(np.stack([c - d, c + d]))
        add(_tube(bars, 0.45, "clip"), MU_STEEL)
    if ecg:
        # An electrode shows as a small ring with a dot (the snap) and its lead wire.
        rings, dots, wires = [], [], []
        for _ in range(int(rng.integers(1, 4))):
            c = np.array([rng.uniform(-120, 120), -110.0, rng.uniform(-120, 80)])
            ang = np.linspace(0, 2 * np.pi, 24)
            rings.append(c + 4.0 * np.stack([np.cos(ang), np.zeros(24), np.sin(ang)], 1))
            dots.append(np.stack([c - [1.0, 0, 0], c + [1.0, 0, 0]]))
            end = c + np.array([rng.uniform(-200, 200), -5.0, rng.uniform(-250, 250)])
            mid = 0.5 * (c + end) + rng.normal(0, 40.0, size=3)
            p, _ = spline_chain(np.stack([c, mid, end]), np.ones(3), 3.0)
            wires.append(p)
        add(_tube(rings, 0.5, "electrode"), MU_LEAD)
        add(_tube(dots, 1.2, "snap"), MU_LEAD)
        add(_tube(wires, 0.6, "lead"), MU_LEAD)
    return att, cover


def guidewire(points: np.ndarray, parent: np.ndarray, label: np.ndarray, main: int) -> np.ndarray:
    """Node indices of the longest path from the ostium along ``main``-labelled vessels."""
    n = len(parent)
    depth = np.zeros(n)
    for i in range(n):
        if parent[i] >= 0:
            depth[i] = depth[parent[i]] + np.linalg.norm(points[i] - points[parent[i]])
    candidates = np.flatnonzero(label == main)
    if len(candidates) == 0:
        return np.zeros(0, np.int64)
    node = int(candidates[np.argmax(depth[candidates])])
    path = []
    while node >= 0:
        path.append(node)
        node = int(parent[node])
    return np.asarray(path[::-1], np.int64)


def render_wire(points: np.ndarray, proj: Projection) -> tuple[np.ndarray, np.ndarray]:
    """A 0.014 inch (0.36 mm) steel wire along ``points``: attenuation and cover."""
    tree = _tube([points], 0.18, "guidewire")
    img = render_tree(tree, proj, np.zeros(len(tree), int), 1)
    return MU_STEEL * img.thickness_mm[0], img.cover[0]
