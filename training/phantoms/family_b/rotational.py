"""Family B 3D rotational angiography volume (evaluation only), with voxel labels.

The arteries are the family B L-system tree of ``cerebral`` (same seed, same
patient as the family B DSA run), voxelised with partial volume and filled
with contrast of a selectable strength: ``contrast_hu`` from 300 to 3000 HU
(intra-arterial 3D-RA with diluted or full-strength contrast; at the upper end
the arteries are brighter than cortical bone), diluting by up to a quarter
along the tree. The skull is a shell whose surfaces follow 3D fractal noise,
with cortical tables and diploe, bone density drawn per patient; the skull
base is porous bone from thresholded 3D fractal noise around the carotid
canal; brain and scalp carry texture, the ventricles CSF, the sinuses air.

Reconstruction: a smooth or sharp kernel (the sharp one overshoots at edges),
noise with a ramp-filtered (CT-like) power spectrum, concentric ring
artefacts, cupping, and a reconstruction cylinder smaller than the head
(truncation: a bright rim inside its edge, nothing outside). A metal clip,
when present, streaks through filtered back-projection of its own sinogram
with photon-starvation errors (``skimage.transform.radon``).

Labels (``truth['labels']``): 0 air / outside the reconstruction, 1 vessel
(partial-volume fraction at least one half), 2 bone, 3 soft tissue, as in
family A.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from pipelines.base import Run, RunMeta
from training.phantoms.errors import PhantomOptionError
from training.phantoms.family_b import cerebral, textures
from training.phantoms.family_b.geometry import voxelise_segments

CT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.2"
AIR, VESSEL, BONE, SOFT = 0, 1, 2, 3
CONTRAST_RANGE_HU = (300.0, 3000.0)


@dataclass
class RotationalPhantomB:
    """``hu`` (Z, Y, X) float32, z ascending (inferior to superior); voxel (0, 0, 0) at
    ``origin_mm`` (x, y, z)."""

    seed: int
    hu: np.ndarray
    spacing_mm: tuple[float, float, float]
    origin_mm: np.ndarray
    truth: dict[str, np.ndarray]
    options: dict[str, Any] = field(default_factory=dict)

    kind = "rotational"
    family = "B"

    def to_run(self) -> Run:
        """The volume as the node decodes the written CT series (integer HU, sorted by position)."""
        z, y, x = self.hu.shape
        meta = RunMeta(
            modality="CT",
            sop_class_uid=CT_SOP_CLASS,
            rows=y,
            columns=x,
            number_of_frames=z,
            frame_times_s=None,
            pixel_spacing_mm=(
                float(f"{self.spacing_mm[1]:.6g}"),
                float(f"{self.spacing_mm[2]:.6g}"),
            ),
            slice_spacing_mm=self.spacing_mm[0],
            image_type=("DERIVED", "SECONDARY", "AXIAL"),
            body_part="HEAD",
            series_description="3D rotational angio (family B)",
            is_volume=True,
            extra={"phantom": "rotational", "family": "B", "seed": self.seed},
        )
        hu = np.clip(np.rint(self.hu), -32768, 32767).astype(np.float32)
        return Run(pixels=hu, meta=meta)

    def write(self, directory: str | Path, encoding: str = "explicit") -> list[Path]:
        from training.phantoms.family_b import dicom

        return dicom.write_rotational(self, Path(directory), encoding=encoding)


def _coords(origin, spacing, shape):
    nz, ny, nx = shape
    x = (origin[0] + np.arange(nx) * spacing).astype(np.float32)[None, None, :]
    y = (origin[1] + np.arange(ny) * spacing).astype(np.float32)[None, :, None]
    z = (origin[2] + np.arange(nz) * spacing).astype(np.float32)[:, None, None]
    return x, y, z


def _rho(x, y, z, axes, centre=(0.0, 0.0, 0.0)):
    return np.sqrt(
        ((x - centre[0]) / axes[0]) ** 2
        + ((y - centre[1]) / axes[1]) ** 2
        + ((z - centre[2]) / axes[2]) ** 2
    )


def _metal_streaks(metal: np.ndarray, rng: np.random.Generator, amplitude: float) -> np.ndarray:
    """Streaks of one slice: FBP of the metal's sinogram with photon-starvation errors."""
    from skimage.transform import iradon, radon

    n = metal.shape[0]
    theta = np.linspace(0.0, 180.0, 90, endpoint=False)
    sino = radon(metal.astype(float), theta=theta, circle=False)
    starved = (
        sino * rng.normal(0.0, 1.0, sino.shape) * 0.5
        - 0.3 * sino**1.5 / max(sino.max(), 1e-6) ** 0.5
    )
    rec = iradon(starved, theta=theta, filter_name="ramp", circle=False, output_size=n)
    return (amplitude * rec / max(float(np.abs(rec).max()), 1e-6)).astype(np.float32)


def generate(
    seed: int,
    size: int = 256,
    *,
    contrast_hu: float | None = None,
    noise: bool = True,
    artefacts: bool = True,
) -> RotationalPhantomB:
    """Generate one family B 3D-RA volume; deterministic for (seed, options).

    Args:
        seed: patient seed (same anatomy as ``family_b.dsa.generate(seed)``).
        size: voxels across (rows and columns), 32-512; slices 75-100 % of it.
        contrast_hu: proximal arterial lumen value, 300-3000 HU; None draws one
            (log-uniform over that range).
        noise: add reconstruction noise.
        artefacts: rings, cupping, truncation rim, sharp-kernel overshoot, streaks.
    """
    if not 32 <= size <= 512:
        raise PhantomOptionError(f"size must be 32-512, got {size}")
    rng = np.random.default_rng([seed, 0xB0, 0x3D])
    if contrast_hu is None:
        contrast_hu = float(np.exp(rng.uniform(*np.log(CONTRAST_RANGE_HU))))
    if not CONTRAST_RANGE_HU[0] <= contrast_hu <= CONTRAST_RANGE_HU[1]:
        raise PhantomOptionError(f"contrast_hu must be 300-3000, got {contrast_hu}")
    anatomy = cerebral.build(seed)
    hd = anatomy.head
    fov = float(rng.uniform(110, 150))
    spacing = fov / size
    nz = max(16, int(round(size * rng.uniform(0.75, 1.0))))
    shape = (nz, size, size)
    ica_end = anatomy.arteries.p1[anatomy.arteries.role == cerebral.ICA][-1]
    centre = ica_end + np.array(
        [-hd.side * rng.uniform(0, 15), rng.uniform(-10, 10), rng.uniform(-5, 15)]
    )
    origin = centre - np.array([size - 1, size - 1, nz - 1]) / 2.0 * spacing
    x, y, z = _coords(origin, spacing, shape)

    # Soft tissue, skull, skull base, brain, ventricles, air cavities.
    hu = np.full(shape, -1000.0, np.float32)
    labels = np.zeros(shape, np.uint8)
    scalp = _rho(x, y, z, hd.scalp) <= 1.0
    hu[scalp] = rng.uniform(20, 60)
    labels[scalp] = SOFT
    coarse = (max(8, nz // 4), max(8, size // 4), max(8, size // 4))

    def noise_field(beta: float) -> np.ndarray:
        f = textures.fractal(coarse, beta, rng)
        return ndimage.zoom(f, np.array(shape) / np.array(coarse), order=1)[
            : shape[0], : shape[1], : shape[2]
        ]

    n_outer, n_inner, n_base = noise_field(3.5), noise_field(3.5), noise_field(2.6)
    rho = _rho(x, y, z, hd.skull_outer)
    inner_ratio = float(np.mean(hd.skull_inner / hd.skull_outer))
    shell = (rho <= 1.0 + 0.015 * n_outer) & (rho > inner_ratio + 0.02 * n_inner)
    cortical = float(rng.uniform(1100, 2000))
    diploe = float(rng.uniform(400, 900))
    depth = (1.0 + 0.015 * n_outer - rho) / max(1.0 - inner_ratio, 1e-3)
    bone_hu = np.where((depth > 0.3) & (depth < 0.7), diploe, cortical) * (1.0 + 0.1 * n_base)
    top = hd.base_centre[2] + hd.base_axes[2] * (1.0 + 1.2 * noise_field(4.0))
    base_band = (z < top) & (z > hd.base_centre[2] - 2.5 * hd.base_axes[2])
    base = base_band & (_rho(x, y, z, hd.skull_inner) <= 1.0) & (n_base > rng.uniform(0.2, 0.6))
    base &= _rho(x, y, z, hd.base_axes * [1.0, 1.2, 2.5], hd.base_centre) <= 1.0
    brain = (_rho(x, y, z, hd.skull_inner) <= 1.0) & ~base
    hu[brain] = rng.uniform(25, 45) + 6.0 * noise_field(3.0)[brain]
    labels[brain] = SOFT
    for sgn in (-1, 1):
        vent = _rho(x, y, z, [7.0, 22.0, 9.0], (sgn * 8.0, 10.0, 15.0)) <= 1.0
        hu[vent] = rng.uniform(3, 15)
    for c, a in hd.sinuses:
        cav = (_rho(x, y, z, a, c) <= 1.0) & scalp
        hu[cav] = -900.0
        labels[cav] = AIR
    bone = (shell | base) & scalp
    hu[bone] = (bone_hu * np.where(base, rng.uniform(0.6, 1.0), 1.0))[bone]
    labels[bone] = BONE

    # Arteries with contrast, diluting along the tree.
    art = anatomy.arteries.subdivided(max(spacing, 0.5))
    ref = float(np.min(art.path_mm))
    dilution = 1.0 - 0.25 * np.clip((art.path_mm - ref - 150.0) / 150.0, 0.0, 1.0)
    frac, lumen = voxelise_segments(art, origin, spacing, shape, contrast_hu * dilution)
    hu = hu * (1.0 - frac) + lumen * frac
    labels[frac >= 0.5] = VESSEL
    metal = np.zeros(shape, bool)
    if rng.random() < 0.2:
        i = int(rng.choice(np.flatnonzero(art.r0 > 0.6)))
        c = art.p1[i] + rng.normal(0, 2.5, 3)
        metal = _rho(x, y, z, [3.0, 1.2, 1.0], c) <= 1.0
        hu[metal] = 6000.0  # a clip: a device, its tissue label stays
    clean = hu.copy()

    # Reconstruction.
    kernel = "SHARP" if rng.random() < 0.4 else "SMOOTH"
    if artefacts and kernel == "SHARP":
        blurred = ndimage.gaussian_filter(hu, 0.45)
        recon = blurred + 0.35 * (blurred - ndimage.gaussian_filter(hu, 1.2))
    else:
        recon = ndimage.gaussian_filter(hu, 0.75)
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - (size - 1) / 2, xx - (size - 1) / 2) / (size / 2)
    radius = float(rng.uniform(0.8, 1.0)) if artefacts else 1.0
    if artefacts:
        rings = np.zeros((size, size), np.float32)
        for _ in range(int(rng.integers(0, 6))):
            rings += rng.uniform(-25, 25) * np.exp(
                -0.5 * ((r - rng.uniform(0.05, 0.9)) * size / 0.8) ** 2
            )
        body = labels > 0
        recon += (rings[None] - rng.uniform(0, 40) * (1.0 - r**2)[None]) * body
        recon += rng.uniform(50, 200) * np.exp(-(radius - r) * size / 2 / 4.0)[None] * (r < radius)
        if metal.any():
            for k in np.flatnonzero(metal.any(axis=(1, 2))):
                recon[k] += _metal_streaks(metal[k], rng, rng.uniform(300, 800))
    if noise:
        white = rng.normal(size=shape).astype(np.float32)
        fy = np.fft.fftfreq(size)[:, None]
        fx = np.fft.rfftfreq(size)[None, :]
        f = np.sqrt(fy**2 + fx**2)
        nps = np.sqrt(f * np.clip(np.cos(np.pi * f / 1.0), 0, None))  # ramp with a window
        shaped = np.fft.irfft2(np.fft.rfft2(white, axes=(1, 2)) * nps, s=(size, size), axes=(1, 2))
        shaped = ndimage.gaussian_filter1d(shaped, 0.7, axis=0)
        sigma = float(rng.uniform(10, 40))
        recon += (shaped * sigma / max(float(shaped.std()), 1e-6)).astype(np.float32)
    outside = r > radius
    fill = -1000.0 if rng.random() < 0.7 else 0.0
    recon[:, outside] = fill
    clean[:, outside] = fill
    labels[:, outside] = AIR
    return RotationalPhantomB(
        seed=seed,
        hu=recon.astype(np.float32),
        spacing_mm=(spacing, spacing, spacing),
        origin_mm=origin,
        truth={
            "labels": labels,
            "vessel_fraction": frac.astype(np.float32),
            "hu_clean": clean.astype(np.float32),
            "metal": metal,
        },
        options={
            "family": "B",
            "size": size,
            "contrast_hu": float(contrast_hu),
            "noise": noise,
            "artefacts": artefacts,
            "kernel": kernel,
            "kvp": float(rng.uniform(70, 100)),
            "cortical_hu": cortical,
        },
    )
