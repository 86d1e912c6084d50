"""The capillary blush as a perfusion digital reference object (DRO).

The image plane is cut into regions (Voronoi cells over the injected
hemisphere's projection); each region has one known CBF, MTT, delay and residue
shape, so that a perfusion method can be scored against exact values, as with
the DROs used for CT and MR perfusion (Kudo et al., Radiology 2010; QIBA DCE
DRO). Every pixel of a region sees the region's tissue curve scaled by the
path length of perfused brain along its ray.

Parameter ranges: normal mixed grey/white matter CBF 40-65 mL/100 g/min and
MTT 3.5-5 s; hypoperfused (penumbra-like) CBF 15-30, MTT 6-10 s and 1.5-3.5 s
extra delay; core CBF 5-12, MTT 8-14 s (Wintermark et al., Stroke 2006;
Ostergaard, JCBFM 2005). The delay is the lag of the region's arterial input
behind the ICA, so Tmax equals it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from training.phantoms.cerebral import CerebralAnatomy, hemisphere_points, territory_of
from training.phantoms.head import brain_chord
from training.phantoms.raster import Projection
from training.phantoms.timing import RESIDUE_KINDS

MIN_PATH_MM = 4.0  # thinner tissue than this is left out of the DRO (label 0)


@dataclass(frozen=True)
class PerfusionRegion:
    label: int
    territory: str
    state: str  # "normal", "hypoperfused" or "core"
    residue: str
    cbf: float  # mL/100 g/min
    mtt_s: float
    delay_s: float

    @property
    def cbv(self) -> float:
        """mL/100 g, from the central volume theorem CBV = CBF * MTT."""
        return self.cbf * self.mtt_s / 60.0


@dataclass
class PerfusionDRO:
    labels: np.ndarray  # (H, W) int16, 0 outside the DRO
    regions: tuple[PerfusionRegion, ...]
    path_mm: np.ndarray  # (H, W) float32, perfused brain along each ray (0 outside)

    def region(self, label: int) -> PerfusionRegion:
        return self.regions[label - 1]

    def table(self) -> np.ndarray:
        """Regions as a structured array (for .npz truth files)."""
        dtype = [
            ("label", "i2"),
            ("territory", "U3"),
            ("state", "U12"),
            ("residue", "U11"),
            ("cbf", "f4"),
            ("cbv", "f4"),
            ("mtt_s", "f4"),
            ("delay_s", "f4"),
        ]
        return np.array(
            [
                (r.label, r.territory, r.state, r.residue, r.cbf, r.cbv, r.mtt_s, r.delay_s)
                for r in self.regions
            ],
            dtype=dtype,
        )


def build_dro(
    seed: int, anatomy: CerebralAnatomy, proj: Projection, lesion: bool | None = None
) -> PerfusionDRO:
    """Regions for one seed and view. ``lesion`` forces (True) or forbids (False) a hypoperfused area."""
    rng = np.random.default_rng([seed, 0xD0])
    n = proj.size
    path = brain_chord(anatomy.brain, proj, anatomy.side)
    # Perfused fraction along each ray: a non-fetal PCA territory receives no
    # contrast from this ICA. Estimated by projecting territory sample points.
    pts = hemisphere_points(rng, anatomy.brain, anatomy.side, 40000, shell=(0.0, 1.0), uniform=True)
    terr = territory_of(anatomy.brain, pts)
    uv = proj.uv(pts)
    ij = np.clip(np.round(uv[:, ::-1]).astype(int), 0, n - 1)
    bins = max(4, int(round(6.0 / proj.spacing_mm)))  # 6 mm histogram cells
    cell = ij // bins
    nc = -(-n // bins)
    flat = cell[:, 0] * nc + cell[:, 1]
    total = np.bincount(flat, minlength=nc * nc).astype(float)
    codes = {"aca": 0, "mca": 1, "pca": 2}
    tcode = np.array([codes[t] for t in terr])
    per_terr = np.stack(
        [np.bincount(flat[tcode == k], minlength=nc * nc) for k in range(3)]
    ).astype(float)
    frac = per_terr / np.maximum(total, 1.0)
    perfused = frac[0] + frac[1] + (frac[2] if anatomy.fetal_pca else 0.0)
    perfused = ndimage.gaussian_filter(
        np.where(total > 0, perfused, 1.0).reshape(nc, nc), 1.0, mode="nearest"
    )
    perf_px = np.clip(ndimage.zoom(perfused, n / nc, order=1, mode="nearest")[:n, :n], 0.0, 1.0)
    path = (path * perf_px).astype(np.float32)
    inside = path >= MIN_PATH_MM

    # Voronoi seeds in millimetres on the image plane, so regions do not depend on size.
    yy, xx = np.nonzero(inside)
    k = int(rng.integers(9, 15))
    if len(yy) < k:
        return PerfusionDRO(np.zeros((n, n), np.int16), (), np.zeros((n, n), np.float32))
    pick = rng.choice(len(yy), size=k, replace=False)
    seeds_mm = np.stack([yy[pick], xx[pick]], 1) * proj.spacing_mm
    seeds_mm += rng.normal(scale=1.0, size=seeds_mm.shape)
    # Voronoi cells with wavy borders (distance plus a smooth random field per
    # seed), so regions look like patches of cortex rather than polygons.
    pix_mm = np.stack([yy, xx], 1) * proj.spacing_mm
    dist = np.linalg.norm(pix_mm[None, :, :] - seeds_mm[:, None, :], axis=2)
    wobble = np.stack([_smooth_field(rng, n, 10.0 / proj.spacing_mm) for _ in range(k)])
    labels = np.zeros((n, n), np.int16)
    labels[yy, xx] = np.argmin(dist + 7.0 * wobble[:, yy, xx], axis=0) + 1
    # Territory of each region: majority of its projected sample points.
    lab_pts = labels[ij[:, 0], ij[:, 1]]
    region_terr = []
    for r in range(1, k + 1):
        sel = tcode[lab_pts == r]
        region_terr.append(
            ("aca", "mca", "pca")[int(np.bincount(sel, minlength=3).argmax())]
            if len(sel)
            else "mca"
        )

    states = ["normal"] * k
    want_lesion = rng.random() < 0.6 if lesion is None else lesion
    mca_regions = [i for i, t in enumerate(region_terr) if t == "mca"]
    if want_lesion and mca_regions:
        centre = int(rng.choice(mca_regions))
        dist = np.linalg.norm(seeds_mm - seeds_mm[centre], axis=1)
        order = np.argsort(dist)
        states[centre] = "core" if rng.random() < 0.5 else "hypoperfused"
        for j in order[1 : 1 + int(rng.integers(1, 3))]:
            if region_terr[j] == "mca":
                states[j] = "hypoperfused"
    regions = []
    for i in range(k):
        transit = rng.uniform(0.3, 0.8)
        if states[i] == "normal":
            cbf, mtt, extra = rng.uniform(40, 65), rng.uniform(3.5, 5.0), 0.0
        elif states[i] == "hypoperfused":
            cbf, mtt, extra = rng.uniform(15, 30), rng.uniform(6.0, 10.0), rng.uniform(1.5, 3.5)
        else:
            cbf, mtt, extra = rng.uniform(5, 12), rng.uniform(8.0, 14.0), rng.uniform(2.5, 5.0)
        regions.append(
            PerfusionRegion(
                label=i + 1,
                territory=region_terr[i],
                state=states[i],
                residue=str(rng.choice(RESIDUE_KINDS)),
                cbf=round(float(cbf), 2),
                mtt_s=round(float(mtt), 3),
                delay_s=round(float(transit + extra), 3),
            )
        )
    # Grey/white matter and sulcal heterogeneity: perfused path varies by about
    # 15 % at 3-10 mm scales. It changes the blush, not the per-tissue truth.
    path *= np.clip(
        1.0
        + 0.12 * _smooth_field(rng, n, 8.0 / proj.spacing_mm)
        + 0.06 * _smooth_field(rng, n, 2.5 / proj.spacing_mm),
        0.5,
        1.5,
    )
    path[labels == 0] = 0.0
    return PerfusionDRO(labels, tuple(regions), path.astype(np.float32))


def _smooth_field(rng: np.random.Generator, n: int, sigma_px: float) -> np.ndarray:
    """Unit-variance smooth random field on an (n, n) grid, built coarse and zoomed."""
    factor = max(1, int(sigma_px // 2))
    m = max(4, -(-n // factor))
    field = ndimage.gaussian_filter(
        rng.normal(size=(m, m)), sigma=max(sigma_px / factor, 0.5), mode="wrap"
    )
    if factor > 1:
        field = ndimage.zoom(field, n / m, order=1)[:n, :n]
    return (field - field.mean()) / max(field.std(), 1e-12)
