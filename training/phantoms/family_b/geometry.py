"""Cone-beam geometry and rasterisers for family B.

A C-arm has a point focal spot and a flat detector: a point at depth ``z``
along the beam is magnified by SID / (SOD + z), so vessels near the tube
look larger than those near the detector and the magnification is not one
number for the whole image. Family A projects orthographically; family B
projects through the focal spot.

Vessel path lengths are computed per pixel centre from the perpendicular
distance to each (short) conical segment, with a minimum effective radius that
keeps the cross-section area of sub-pixel vessels (their contrast spreads
over about one pixel instead of vanishing). Neighbouring segments of a vessel
tile it along its axis (flat ends), so joints do not bead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.phantoms.family_b.lsystem import Segments

_BATCH_PIXELS = 2_500_000


def rotation(primary_deg: float, secondary_deg: float) -> np.ndarray:
    """Rows: detector column direction, row direction, beam (source to detector), patient LPS.

    Primary angle rotates about the patient's long axis (LAO positive, towards
    the patient's left), secondary tilts cranial (positive) or caudal. At (0, 0)
    the beam runs posterior to anterior (an AP/PA view as seen from the front),
    columns run to the patient's left and rows run inferior.
    """
    a, b = np.deg2rad(primary_deg), np.deg2rad(secondary_deg)
    u = np.array([np.cos(a), np.sin(a), 0.0])  # column direction
    beam = np.array([np.sin(a), -np.cos(a), 0.0])  # posterior to anterior at 0
    v = np.array([0.0, 0.0, -1.0])  # rows run inferior
    # Cranial/caudal tilt: rotate beam and rows about the column axis.
    beam_t = beam * np.cos(b) + v * np.sin(b)
    v_t = v * np.cos(b) - beam * np.sin(b)
    return np.stack([u, v_t, beam_t])


@dataclass(frozen=True)
class ConeBeam:
    """Point source, flat detector of ``shape`` (rows, cols) pixels of ``pitch_mm``."""

    axes: np.ndarray  # (3, 3): column, row, beam directions
    isocentre: np.ndarray
    sid_mm: float
    sod_mm: float
    shape: tuple[int, int]
    pitch_mm: float

    @property
    def magnification(self) -> float:
        return self.sid_mm / self.sod_mm

    @property
    def iso_spacing_mm(self) -> float:
        """Pixel size at the isocentre (what Pixel Spacing means for a C-arm)."""
        return self.pitch_mm / self.magnification

    def project(self, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, 3) patient mm -> ((N, 2) (column, row) px, (N,) magnification)."""
        q = (np.asarray(pts, float) - self.isocentre) @ self.axes.T
        m = self.sid_mm / np.maximum(self.sod_mm + q[:, 2], 1.0)
        rows, cols = self.shape
        uv = np.stack(
            [
                q[:, 0] * m / self.pitch_mm + (cols - 1) / 2.0,
                q[:, 1] * m / self.pitch_mm + (rows - 1) / 2.0,
            ],
            axis=1,
        )
        return uv, m

    def rays(self) -> tuple[np.ndarray, np.ndarray]:
        """Source position (3,) and unit ray directions (rows, cols, 3) through pixel centres."""
        rows, cols = self.shape
        source = self.isocentre - self.sod_mm * self.axes[2]
        cc = (np.arange(cols) - (cols - 1) / 2.0) * self.pitch_mm
        rr = (np.arange(rows) - (rows - 1) / 2.0) * self.pitch_mm
        det = (
            self.isocentre
            + (self.sid_mm - self.sod_mm) * self.axes[2]
            + cc[None, :, None] * self.axes[0]
            + rr[:, None, None] * self.axes[1]
        )
        d = det - source
        return source, d / np.linalg.norm(d, axis=-1, keepdims=True)


def ellipsoid_chord(
    source: np.ndarray,
    dirs: np.ndarray,
    centre: np.ndarray,
    semi_axes: np.ndarray,
    frame: np.ndarray | None = None,
) -> np.ndarray:
    """Length (mm) of each ray inside an ellipsoid; ``frame`` columns are its axes."""
    r = np.eye(3) if frame is None else np.asarray(frame, float)
    a = np.asarray(semi_axes, float)
    s = ((np.asarray(source, float) - centre) @ r) / a
    d = (dirs @ r) / a
    qa = (d * d).sum(-1)
    qb = 2.0 * (d * s).sum(-1)
    qc = (s * s).sum(-1) - 1.0  # semi-axes may vary per ray (a perturbed surface)
    disc = qb * qb - 4.0 * qa * qc
    return np.where(disc > 0, np.sqrt(np.maximum(disc, 0.0)) / qa, 0.0)


@dataclass
class Projected:
    """What :func:`render_segments` returns."""

    path_mm: np.ndarray  # (G, H, W) float32 lumen path length per group
    cover: np.ndarray  # (M, H, W) bool: pixel centre inside the projected lumen (min half a pixel)
    diameter_mm: np.ndarray  # (H, W) widest covering vessel, 0 elsewhere


def render_segments(
    seg: Segments,
    beam: ConeBeam,
    group: np.ndarray,
    n_groups: int,
    mask_class: np.ndarray | None = None,
    n_masks: int = 1,
    weight: np.ndarray | None = None,
    min_radius_px: float = 0.7,
) -> Projected:
    """Project segments through the focal spot; per-segment ``group`` / ``mask_class``
    (-1 = in no mask) / ``weight`` (a concentration factor on the path length)."""
    rows, cols = beam.shape
    hw = rows * cols
    uv0, m0 = beam.project(seg.p0)
    uv1, m1 = beam.project(seg.p1)
    ra = seg.r0 * m0 / beam.pitch_mm
    rb = seg.r1 * m1 / beam.pitch_mm
    mm_per_px = beam.pitch_mm / (0.5 * (m0 + m1))  # at the vessel's depth
    axis3 = seg.p1 - seg.p0
    cos_b = np.abs(axis3 @ beam.axes[2]) / np.maximum(np.linalg.norm(axis3, axis=1), 1e-9)
    oblique = np.minimum(1.0 / np.sqrt(np.maximum(1.0 - cos_b**2, 1e-6)), 4.0)
    grp = np.asarray(group, np.int64)
    cls = np.zeros(len(seg), np.int64) if mask_class is None else np.asarray(mask_class, np.int64)
    w = np.ones(len(seg)) if weight is None else np.asarray(weight, float)
    reach = np.maximum(np.maximum(ra, rb), min_radius_px) + 1.0
    lo = np.floor(np.minimum(uv0, uv1) - reach[:, None]).astype(np.int64)
    hi = np.ceil(np.maximum(uv0, uv1) + reach[:, None]).astype(np.int64)
    visible = (hi[:, 0] >= 0) & (hi[:, 1] >= 0) & (lo[:, 0] < cols) & (lo[:, 1] < rows)
    side = np.maximum(hi[:, 0] - lo[:, 0], hi[:, 1] - lo[:, 1]) + 1
    bucket = 2 ** np.ceil(np.log2(np.maximum(side, 2))).astype(np.int64)
    acc = np.zeros(n_groups * hw, np.float64)
    cover = np.zeros(n_masks * hw, bool)
    diam = np.zeros(hw, np.float32)
    for k in np.unique(bucket[visible]):
        chosen = np.flatnonzero(visible & (bucket == k))
        oy, ox = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
        per = max(1, _BATCH_PIXELS // int(k * k))
        for start in range(0, len(chosen), per):
            s = chosen[start : start + per]
            px = lo[s, 0, None, None] + ox
            py = lo[s, 1, None, None] + oy
            ok = (px >= 0) & (py >= 0) & (px < cols) & (py < rows)
            ok &= (px <= hi[s, 0, None, None]) & (py <= hi[s, 1, None, None])
            ax = (uv1[s] - uv0[s])[:, :, None, None]
            rel_x = px - uv0[s, 0, None, None]
            rel_y = py - uv0[s, 1, None, None]
            len2 = np.maximum((ax**2).sum(1), 1e-12)
            t = (rel_x * ax[:, 0] + rel_y * ax[:, 1]) / len2
            tc = np.clip(t, 0.0, 1.0)
            dx, dy = rel_x - tc * ax[:, 0], rel_y - tc * ax[:, 1]
            d = np.sqrt(dx * dx + dy * dy)
            r = ra[s, None, None] + tc * (rb - ra)[s, None, None]
            re = np.maximum(r, min_radius_px)
            # Flat ends: a pixel belongs to the piece its foot point falls on.
            along = ok & (t >= 0.0) & (t < 1.0) & (d < re)
            chord = 2.0 * np.sqrt(np.maximum(re * re - d * d, 0.0)) * (r / re) ** 2
            chord *= (mm_per_px * oblique * w)[s, None, None]
            pix = py * cols + px
            keys = grp[s, None, None] * hw + pix
            acc += np.bincount(keys[along], weights=chord[along], minlength=n_groups * hw)
            inside = ok & (d <= np.maximum(r, 0.5))
            sel = inside & (cls[s, None, None] >= 0)
            cover[(cls[s, None, None] * hw + pix)[sel]] = True
            dm = np.broadcast_to((2.0 * r * mm_per_px[s, None, None]).astype(np.float32), d.shape)
            np.maximum.at(diam, pix[inside], dm[inside])
    return Projected(
        acc.reshape(n_groups, rows, cols).astype(np.float32),
        cover.reshape(n_masks, rows, cols),
        diam.reshape(rows, cols),
    )


def voxelise_segments(
    seg: Segments,
    origin_mm: np.ndarray,
    spacing_mm: float,
    shape: tuple[int, int, int],
    value: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Partial-volume vessel fraction (Z, Y, X) and, per voxel, the ``value`` of the
    segment that covers it most (0 where no vessel). Voxel (z, y, x) is centred at
    ``origin + (x, y, z) * spacing``; the fraction ramps linearly over one voxel."""
    nz, ny, nx = shape
    n = nz * ny * nx
    frac = np.zeros(n, np.float32)
    best = np.zeros(n, np.float32)
    val = np.ones(len(seg), np.float32) if value is None else np.asarray(value, np.float32)
    a = (seg.p0 - origin_mm) / spacing_mm  # (x, y, z) voxel units
    b = (seg.p1 - origin_mm) / spacing_mm
    ra, rb = seg.r0 / spacing_mm, seg.r1 / spacing_mm
    reach = np.maximum(ra, rb) + 1.0
    lo = np.floor(np.minimum(a, b) - reach[:, None]).astype(np.int64)
    hi = np.ceil(np.maximum(a, b) + reach[:, None]).astype(np.int64)
    dims = np.array([nx, ny, nz])
    visible = np.all(hi >= 0, axis=1) & np.all(lo < dims, axis=1)
    side = (hi - lo).max(axis=1) + 1
    bucket = 2 ** np.ceil(np.log2(np.maximum(side, 2))).astype(np.int64)
    entries_k, entries_f, entries_v = [], [], []
    for k in np.unique(bucket[visible]):
        chosen = np.flatnonzero(visible & (bucket == k))
        oz, oy, ox = np.meshgrid(np.arange(k), np.arange(k), np.arange(k), indexing="ij")
        per = max(1, _BATCH_PIXELS // int(k**3))
        for start in range(0, len(chosen), per):
            s = chosen[start : start + per]
            px = lo[s, 0, None, None, None] + ox
            py = lo[s, 1, None, None, None] + oy
            pz = lo[s, 2, None, None, None] + oz
            ok = (px >= 0) & (py >= 0) & (pz >= 0) & (px < nx) & (py < ny) & (pz < nz)
            ab = (b[s] - a[s])[:, :, None, None, None]
            rx = px - a[s, 0, None, None, None]
            ry = py - a[s, 1, None, None, None]
            rz = pz - a[s, 2, None, None, None]
            len2 = np.maximum((ab**2).sum(1), 1e-12)
            t = np.clip((rx * ab[:, 0] + ry * ab[:, 1] + rz * ab[:, 2]) / len2, 0.0, 1.0)
            d = np.sqrt(
                (rx - t * ab[:, 0]) ** 2 + (ry - t * ab[:, 1]) ** 2 + (rz - t * ab[:, 2]) ** 2
            )
            r = ra[s, None, None, None] + t * (rb - ra)[s, None, None, None]
            f = np.clip(r - d + 0.5, 0.0, 1.0)
            hit = ok & (f > 0)
            idx = (pz * ny + py) * nx + px
            entries_k.append(idx[hit])
            entries_f.append(f[hit].astype(np.float32))
            entries_v.append(np.broadcast_to(val[s, None, None, None], f.shape)[hit])
    if entries_k:
        keys = np.concatenate(entries_k)
        fr = np.concatenate(entries_f)
        vv = np.concatenate(entries_v)
        np.maximum.at(frac, keys, fr)
        win = fr >= frac[keys] - 1e-7
        best[keys[win]] = vv[win]
    return frac.reshape(shape), best.reshape(shape)
