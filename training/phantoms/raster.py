"""Rasterise conical vessel segments: projected (2D, partial volume) and voxelised (3D).

The 2D renderer gives, per pixel, the iodine path length through each vessel
averaged over the pixel width: the chord 2 sqrt(r^2 - d^2) integrated over
[d - 1/2, d + 1/2] in closed form. A vessel of radius 0.1 px therefore still
contributes its true cross-section (pi r^2 per pixel length), which is what
makes sub-pixel arterioles faint rather than absent. Overlapping segments of
one unbranched chain are merged by maximum (no beading at joints); different
vessels add, as X-ray attenuation does.

Work is batched over segments with fixed-size windows: no loop over pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.phantoms.vessels import VesselTree, chain_ids

_MAX_BATCH = 3_000_000  # window pixels per batch; bounds peak memory near 200 MB


@dataclass(frozen=True)
class Projection:
    """Orthographic projection of patient millimetres onto a square pixel grid.

    ``axis_u`` / ``axis_v`` are the patient directions of increasing column /
    row; ``centre`` is the patient point imaged at the grid centre.
    """

    axis_u: np.ndarray
    axis_v: np.ndarray
    centre: np.ndarray
    spacing_mm: float
    size: int

    @property
    def beam(self) -> np.ndarray:
        return np.cross(self.axis_u, self.axis_v)

    def uv(self, pts: np.ndarray) -> np.ndarray:
        """(N, 3) patient mm -> (N, 2) (column, row) in pixels, pixel centres at integers."""
        rel = np.asarray(pts, float) - self.centre
        half = (self.size - 1) / 2.0
        return np.stack(
            [
                rel @ self.axis_u / self.spacing_mm + half,
                rel @ self.axis_v / self.spacing_mm + half,
            ],
            axis=1,
        )


def _pixel_chord(d: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Chord length of a cylinder averaged over a unit-wide pixel at distance d (pixels)."""

    def prim(u: np.ndarray) -> np.ndarray:
        u = np.clip(u, -r, r)
        rr = np.maximum(r, 1e-9)
        return u * np.sqrt(np.maximum(rr * rr - u * u, 0.0)) + rr * rr * np.arcsin(u / rr)

    return prim(d + 0.5) - prim(d - 0.5)


@dataclass
class TubeImage:
    """Result of :func:`render_tree`: path length per timing group plus truth rasters."""

    thickness_mm: np.ndarray  # (G, H, W) float32, lumen path length along the beam
    cover: np.ndarray  # (M, H, W) bool, pixel centre within max(r, half a pixel) of a centre line
    diameter_mm: np.ndarray  # (H, W) float32, largest covering diameter, 0 elsewhere


def render_tree(
    tree: VesselTree,
    proj: Projection,
    group: np.ndarray,
    n_groups: int,
    mask_class: np.ndarray | None = None,
    n_masks: int = 1,
    weight: np.ndarray | None = None,
) -> TubeImage:
    """Project a tree: iodine path length per timing group, coverage masks, calibre map.

    ``group`` / ``mask_class`` / ``weight`` are per node and apply to the segment
    ending at that node (``mask_class`` -1 excludes it from all masks).
    """
    size = proj.size
    hw = size * size
    seg = tree.segment_children()
    uv = proj.uv(tree.points)
    a, b = uv[tree.parent[seg]], uv[seg]
    chain_all, side_all = chain_ids(tree.parent, tree.radius)
    chains, side_branch = chain_all[seg], side_all[seg]
    rb = tree.radius[seg] / proj.spacing_mm
    # A side branch starts with its own calibre, not the wider parent's.
    ra = np.where(side_branch, rb, tree.radius[tree.parent[seg]] / proj.spacing_mm)
    direction = tree.points[seg] - tree.points[tree.parent[seg]]
    length3 = np.linalg.norm(direction, axis=1)
    cos_beam = np.abs(direction @ proj.beam) / np.maximum(length3, 1e-9)
    # Path through an oblique cylinder is longer by 1/sin(angle to the beam);
    # capped where the vessel runs along the beam (its own length bounds it).
    obliq = np.minimum(1.0 / np.sqrt(np.maximum(1.0 - cos_beam**2, 1e-6)), 4.0)
    seg_group = np.asarray(group)[seg]
    seg_mask = np.zeros(len(seg), np.int64) if mask_class is None else np.asarray(mask_class)[seg]
    seg_weight = np.ones(len(seg)) if weight is None else np.asarray(weight, float)[seg]

    rmax = np.maximum(ra, rb)
    lo = np.floor(np.minimum(a, b) - rmax[:, None] - 1.0).astype(np.int64)
    hi = np.ceil(np.maximum(a, b) + rmax[:, None] + 1.0).astype(np.int64)
    onscreen = (hi[:, 0] >= 0) & (hi[:, 1] >= 0) & (lo[:, 0] < size) & (lo[:, 1] < size)
    extent = (hi - lo + 1).max(axis=1)
    bucket = 2 ** np.ceil(np.log2(np.maximum(extent, 2))).astype(np.int64)

    keys, vals, groups = [], [], []
    cover_pix, cover_cls, diam_pix, diam_val = [], [], [], []
    for k in np.unique(bucket[onscreen]):
        sel_all = np.flatnonzero(onscreen & (bucket == k))
        per = max(1, _MAX_BATCH // int(k * k))
        oy, ox = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
        for start in range(0, len(sel_all), per):
            s = sel_all[start : start + per]
            px = lo[s, 0][:, None, None] + ox[None]
            py = lo[s, 1][:, None, None] + oy[None]
            valid = (px <= hi[s, 0][:, None, None]) & (py <= hi[s, 1][:, None, None])
            valid &= (px >= 0) & (py >= 0) & (px < size) & (py < size)
            ab = b[s] - a[s]
            denom = np.maximum((ab**2).sum(1), 1e-12)[:, None, None]
            t = (
                (px - a[s, 0][:, None, None]) * ab[:, 0][:, None, None]
                + (py - a[s, 1][:, None, None]) * ab[:, 1][:, None, None]
            ) / denom
            valid &= ~(side_branch[s][:, None, None] & (t < 0.0))
            t = np.clip(t, 0.0, 1.0)
            dx = px - (a[s, 0][:, None, None] + t * ab[:, 0][:, None, None])
            dy = py - (a[s, 1][:, None, None] + t * ab[:, 1][:, None, None])
            d = np.sqrt(dx * dx + dy * dy)
            r = ra[s][:, None, None] + t * (rb[s] - ra[s])[:, None, None]
            chord = _pixel_chord(d, r) * (obliq[s] * seg_weight[s])[:, None, None]
            keep = valid & (d < r + 0.5)
            pix = (py * size + px)[keep]
            keys.append(np.broadcast_to(chains[s][:, None, None], keep.shape)[keep] * hw + pix)
            vals.append(chord[keep])
            groups.append(np.broadcast_to(seg_group[s][:, None, None], keep.shape)[keep])
            cov = valid & (d <= np.maximum(r, 0.5))
            cls = np.broadcast_to(seg_mask[s][:, None, None], cov.shape)
            cov_m = cov & (cls >= 0)
            cover_pix.append((py * size + px)[cov_m])
            cover_cls.append(cls[cov_m])
            diam_pix.append((py * size + px)[cov])
            diam_val.append(np.broadcast_to((2 * r * proj.spacing_mm), cov.shape)[cov])

    thickness = np.zeros((n_groups, hw), np.float64)
    cover = np.zeros((n_masks, hw), bool)
    diameter = np.zeros(hw, np.float64)
    if keys and sum(len(k) for k in keys):  # boxes may touch the grid with no pixel inside
        key = np.concatenate(keys)
        val = np.concatenate(vals)
        grp = np.concatenate(groups)
        order = np.argsort(key, kind="stable")
        key, val, grp = key[order], val[order], grp[order]
        starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
        vmax = np.maximum.reduceat(val, starts)
        # group of the element holding the maximum in each (chain, pixel) run
        run = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(key)]))
        is_max = val >= vmax[run]
        first_max = np.full(len(starts), -1, np.int64)
        idx_max = np.flatnonzero(is_max)
        first_max[run[idx_max[::-1]]] = idx_max[::-1]
        pix = key[starts] % hw
        flat = grp[first_max] * hw + pix
        thickness = np.bincount(flat, weights=vmax, minlength=n_groups * hw).reshape(n_groups, hw)
        cp = np.concatenate(cover_pix)
        cover[np.concatenate(cover_cls), cp] = True
        dp = np.concatenate(diam_pix)
        np.maximum.at(diameter, dp, np.concatenate(diam_val))
    return TubeImage(
        thickness_mm=(thickness * proj.spacing_mm).reshape(n_groups, size, size).astype(np.float32),
        cover=cover.reshape(n_masks, size, size),
        diameter_mm=diameter.reshape(size, size).astype(np.float32),
    )


def voxelize_tree(
    tree: VesselTree,
    origin_mm: np.ndarray,
    spacing_mm: float,
    shape: tuple[int, int, int],
) -> np.ndarray:
    """Fraction of each voxel inside the vessel lumen, (Z, Y, X) float32 in [0, 1].

    ``origin_mm`` is the patient position (x, y, z) of voxel (0, 0, 0); voxel
    index (k, j, i) sits at origin + (i, j, k) * spacing. The fraction is an
    anti-aliased step of the signed distance to the cone surface, so sub-voxel
    vessels keep a faint, partial-volume trace.
    """
    nz, ny, nx = shape
    seg = tree.segment_children()
    vox = (tree.points - np.asarray(origin_mm, float)) / spacing_mm  # (x, y, z) in voxels
    a, b = vox[tree.parent[seg]], vox[seg]
    side_branch = chain_ids(tree.parent, tree.radius)[1][seg]
    rb = tree.radius[seg] / spacing_mm
    ra = np.where(side_branch, rb, tree.radius[tree.parent[seg]] / spacing_mm)
    rmax = np.maximum(ra, rb)
    lo = np.floor(np.minimum(a, b) - rmax[:, None] - 1.0).astype(np.int64)
    hi = np.ceil(np.maximum(a, b) + rmax[:, None] + 1.0).astype(np.int64)
    dims = np.array([nx, ny, nz])
    inside = ((hi >= 0) & (lo < dims)).all(axis=1)
    extent = (hi - lo + 1).max(axis=1)
    bucket = 2 ** np.ceil(np.log2(np.maximum(extent, 2))).astype(np.int64)
    occ = np.zeros(nz * ny * nx, np.float32)
    for k in np.unique(bucket[inside]):
        sel_all = np.flatnonzero(inside & (bucket == k))
        per = max(1, _MAX_BATCH // int(k**3))
        oz, oy, ox = np.meshgrid(np.arange(k), np.arange(k), np.arange(k), indexing="ij")
        for start in range(0, len(sel_all), per):
            s = sel_all[start : start + per]
            pos = [lo[s, ax][:, None, None, None] + o[None] for ax, o in enumerate((ox, oy, oz))]
            valid = np.ones(pos[0].shape, bool)
            for ax in range(3):
                valid &= (
                    (pos[ax] <= hi[s, ax][:, None, None, None])
                    & (pos[ax] >= 0)
                    & (pos[ax] < dims[ax])
                )
            ab = b[s] - a[s]
            denom = np.maximum((ab**2).sum(1), 1e-12)[:, None, None, None]
            t = (
                sum(
                    (pos[ax] - a[s, ax][:, None, None, None]) * ab[:, ax][:, None, None, None]
                    for ax in range(3)
                )
                / denom
            )
            t = np.clip(t, 0.0, 1.0)
            d2 = sum(
                (pos[ax] - (a[s, ax][:, None, None, None] + t * ab[:, ax][:, None, None, None]))
                ** 2
                for ax in range(3)
            )
            r = ra[s][:, None, None, None] + t * (rb[s] - ra[s])[:, None, None, None]
            frac = np.clip(r - np.sqrt(d2) + 0.5, 0.0, 1.0)
            # A sub-voxel vessel cannot fill more than its cross-section.
            frac = np.minimum(frac, np.pi * r * r)
            keep = valid & (frac > 0)
            flat = (pos[2] * ny + pos[1]) * nx + pos[0]
            np.maximum.at(occ, flat[keep], frac[keep].astype(np.float32))
    return occ.reshape(nz, ny, nx)
