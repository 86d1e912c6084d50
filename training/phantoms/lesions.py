"""Anatomical variation applied to vessel trees: bends, stenoses, aneurysm sacs, partial filling.

These act on the centre-line graphs of :mod:`training.phantoms.vessels`
(radius and position per node) or add simple analytic shapes (an aneurysm sac
is a sphere), so the truth rasters stay exact: every renderer draws what the
tree says.

- Tortuosity: a smooth random displacement field (a sum of random Fourier
  modes) bends every vessel by up to a few millimetres without breaking the
  tree, as elongation with age and hypertension does.
- Stenosis: the radius narrows by a severity (diameter reduction) over a
  length along one chain, with a raised-cosine profile.
- Aneurysm: a spherical sac beside a branch point, filled from its parent
  node with slower washout (stasis).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from training.phantoms.raster import Projection
from training.phantoms.vessels import VesselTree, chain_ids


def bend_field(
    rng: np.random.Generator, amplitude_mm: float, wavelength_mm: float, modes: int = 24
) -> Callable[[np.ndarray], np.ndarray]:
    """Smooth displacement field d(x) for (N, 3) points; RMS about ``amplitude_mm`` per axis."""
    k_dir = rng.normal(size=(modes, 3))
    k_dir /= np.linalg.norm(k_dir, axis=1, keepdims=True)
    lengths = wavelength_mm * np.exp(rng.uniform(-0.4, 0.4, size=modes))
    k = k_dir * (2 * np.pi / lengths)[:, None]
    phase = rng.uniform(0, 2 * np.pi, size=modes)
    amp = rng.normal(size=(modes, 3)) * amplitude_mm * np.sqrt(2.0 / modes)

    def displace(points: np.ndarray) -> np.ndarray:
        pts = np.asarray(points, float)
        return np.sin(pts @ k.T + phase) @ amp

    return displace


def stenose(
    tree: VesselTree,
    rng: np.random.Generator,
    n: int,
    severity: tuple[float, float],
    length_mm: tuple[float, float],
    eligible: np.ndarray,
) -> list[tuple[np.ndarray, float, float]]:
    """Narrow ``n`` chains in place; returns (centre point, diameter reduction, length) per lesion.

    ``eligible`` marks nodes that may be a stenosis centre (trunks wide enough
    to matter). The radius along the chain is multiplied by
    1 - s * (1 + cos(pi d / (L/2))) / 2 for |d| < L/2, d the arc distance.
    """
    out: list[tuple[np.ndarray, float, float]] = []
    candidates = np.flatnonzero(eligible)
    if n <= 0 or len(candidates) == 0:
        return out
    chain, _ = chain_ids(tree.parent, tree.radius)
    for _ in range(n):
        centre = int(rng.choice(candidates))
        nodes = np.flatnonzero(chain == chain[centre])  # in index order = along the chain
        steps = np.linalg.norm(np.diff(tree.points[nodes], axis=0), axis=1)
        arc = np.r_[0.0, np.cumsum(steps)]
        d = arc - arc[int(np.searchsorted(nodes, centre))]
        s = float(rng.uniform(*severity))
        length = float(rng.uniform(*length_mm))
        half = 0.5 * length
        near = np.abs(d) < half
        factor = 1.0 - s * 0.5 * (1.0 + np.cos(np.pi * d[near] / half))
        tree.radius[nodes[near]] *= factor
        out.append((tree.points[centre].copy(), s, length))
    return out


def subtree_factor(
    parent: np.ndarray, roots: Sequence[int], factors: Sequence[float]
) -> np.ndarray:
    """Per-node multiplier: every node below a root gets that root's factor (parents first)."""
    out = np.ones(len(parent))
    own = np.full(len(parent), np.nan)
    own[np.asarray(roots, int)] = factors
    par = parent.tolist()
    vals = out.tolist()
    own_l = own.tolist()
    for i in range(len(par)):
        if not np.isnan(own_l[i]):
            vals[i] = own_l[i]
        elif par[i] >= 0:
            vals[i] = vals[par[i]]
    return np.asarray(vals)


def project_sphere(
    centre: np.ndarray, radius_mm: float, proj: Projection
) -> tuple[np.ndarray, np.ndarray]:
    """Path length (mm) through a sphere for every pixel of ``proj``, and its cover mask.

    The chord is sampled at pixel centres (sacs are several pixels wide); the
    cover is the pixel centre within max(radius, half a pixel) of the centre,
    as for vessels.
    """
    n = proj.size
    u, v = proj.uv(np.asarray(centre, float)[None])[0]
    r_px = radius_mm / proj.spacing_mm
    lo_c, hi_c = max(0, int(np.floor(u - r_px - 1))), min(n, int(np.ceil(u + r_px + 2)))
    lo_r, hi_r = max(0, int(np.floor(v - r_px - 1))), min(n, int(np.ceil(v + r_px + 2)))
    path = np.zeros((n, n), np.float32)
    cover = np.zeros((n, n), bool)
    if lo_c >= hi_c or lo_r >= hi_r:
        return path, cover
    rr, cc = np.mgrid[lo_r:hi_r, lo_c:hi_c]
    d2 = (rr - v) ** 2 + (cc - u) ** 2
    chord = 2.0 * np.sqrt(np.maximum(r_px * r_px - d2, 0.0)) * proj.spacing_mm
    path[lo_r:hi_r, lo_c:hi_c] = chord
    cover[lo_r:hi_r, lo_c:hi_c] = d2 <= max(r_px, 0.5) ** 2
    return path, cover


def voxelize_sphere(
    centre: np.ndarray,
    radius_mm: float,
    origin_mm: np.ndarray,
    spacing_mm: float,
    shape: tuple[int, int, int],
) -> np.ndarray:
    """Fraction of each voxel inside the sphere (anti-aliased step of the signed distance)."""
    out = np.zeros(shape, np.float32)
    c = (np.asarray(centre, float) - origin_mm) / spacing_mm  # (x, y, z) voxel units
    r = radius_mm / spacing_mm
    lo = np.maximum(np.floor(c - r - 1).astype(int), 0)
    hi = np.minimum(np.ceil(c + r + 2).astype(int), np.array(shape[::-1]))
    if np.any(hi <= lo):
        return out
    zz, yy, xx = np.mgrid[lo[2] : hi[2], lo[1] : hi[1], lo[0] : hi[0]]
    d = np.sqrt((xx - c[0]) ** 2 + (yy - c[1]) ** 2 + (zz - c[2]) ** 2)
    out[lo[2] : hi[2], lo[1] : hi[1], lo[0] : hi[0]] = np.clip(r - d + 0.5, 0.0, 1.0)
    return out
