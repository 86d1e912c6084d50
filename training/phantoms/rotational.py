"""3D rotational angiography fill run: a cone-beam-CT-like volume with labels.

The arterial tree of ``cerebral`` (same seed, same patient anatomy as the DSA
phantom) is voxelised with partial volume and filled with contrast (lumen
values 450-900, dropping distally as contrast dilutes: they overlap with bone,
as in real 3D-RA), over the skull with diploe and skull base, brain, CSF and
scalp from ``head``. The reconstruction adds a blur, correlated noise (15-35)
and streaks along lines through dense objects (bone, coil), and leaves air
outside the cylindrical field of view. Default 256^3 at 0.46 mm, centred on
the injected hemisphere's circle of Willis and skull base.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from pipelines.base import Run, RunMeta
from training.phantoms import appearance, cerebral, lesions, priors
from training.phantoms.dicom_common import options_key
from training.phantoms.errors import PhantomOptionError
from training.phantoms.head import (
    AIR,
    BONE,
    VESSEL,
    Porosity,
    head_primitives,
    voxelize_head,
)
from training.phantoms.raster import voxelize_tree
from training.phantoms.vessels import VesselTree

FOV_MM = 117.76  # 256 x 0.46 mm
VOLUME_CENTRE_MM = np.array([-28.0, -4.0, -8.0])
CT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.2"
XA3D_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.13.1.1"


@dataclass
class RotationalPhantom:
    """``hu`` (Z, Y, X) float32 on voxels of ``spacing_mm`` (z, y, x); voxel (0, 0, 0) at ``origin_mm`` (x, y, z)."""

    seed: int
    hu: np.ndarray
    spacing_mm: tuple[float, float, float]
    origin_mm: np.ndarray
    truth: dict[str, np.ndarray]
    options: dict[str, Any] = field(default_factory=dict)
    bits_stored: int = 12  # HU + 1024 as stored; randomised volumes may use 16
    appearance: dict[str, Any] | None = None

    kind = "rotational"

    def to_run(self) -> Run:
        z, y, x = self.hu.shape
        meta = RunMeta(
            modality="XA",
            sop_class_uid=XA3D_SOP_CLASS,
            rows=y,
            columns=x,
            number_of_frames=z,
            frame_times_s=None,
            pixel_spacing_mm=(self.spacing_mm[1], self.spacing_mm[2]),
            slice_spacing_mm=self.spacing_mm[0],
            image_type=("ORIGINAL", "PRIMARY", "VOLUME", "NONE"),
            body_part="HEAD",
            series_description="3D-RA fill run",
            subtracted=False,
            is_volume=True,
            extra={
                "phantom": "rotational",
                "seed": self.seed,
                "origin_mm": tuple(float(v) for v in self.origin_mm),
            },
        )
        return Run(pixels=self.hu.astype(np.float32), meta=meta)

    def write(
        self, directory: str | Path, encoding: str = "explicit", seg: bool = False
    ) -> list[Path]:
        """Write the 3D XA (enhanced) file, the CT series, the truth (.npz, README) and optionally a SEG."""
        from training.phantoms import dicom_volume

        return dicom_volume.write_rotational(self, Path(directory), encoding=encoding, seg=seg)


def generate(
    seed: int,
    size: int = 256,
    *,
    noise: bool = True,
    noise_hu: float | None = None,
    streaks: bool = True,
    contrast_hu: float | None = None,
    randomise: bool | priors.RotationalPriors = False,
) -> RotationalPhantom:
    """Generate one 3D-RA volume of ``size``^3 voxels over a fixed 117.8 mm field.

    Args:
        seed: patient/anatomy seed (the same anatomy as ``dsa.generate(seed)``,
            also when both are randomised with the same anatomy priors).
        size: voxels per side, 32-512 (spacing = 117.76 mm / size; 256 gives 0.46 mm).
        noise: add correlated reconstruction noise.
        noise_hu: its standard deviation; None draws 15-35.
        streaks: add streaks from bone and coils.
        contrast_hu: lumen value of the proximal ICA; None draws 450-900.
        randomise: True (or a ``priors.RotationalPriors``) draws the field,
            contrast (200-3000 HU), bone density, a cancellous or pneumatised
            skull base, kernel, noise, streaks and truncation from the priors,
            and the anatomy variation (stenoses, aneurysms, coils, clips);
            options you set (noise_hu, contrast_hu, noise=False, streaks=False)
            win.
    """
    if not 32 <= size <= 512:
        raise PhantomOptionError(f"size must be 32-512, got {size}")
    pri = priors.resolve(randomise, priors.ROTATIONAL)
    app = None if pri is None else appearance.draw_rotational(seed, pri)
    rng = np.random.default_rng([seed, 0x3D])
    anatomy = cerebral.build(
        seed, None if pri is None else cerebral.draw_variation(seed, pri.anatomy)
    )
    spacing = FOV_MM / size if app is None else app.field_mm / size
    shape = (size, size, size)
    centre = VOLUME_CENTRE_MM if app is None else VOLUME_CENTRE_MM + np.asarray(app.centre_shift_mm)
    origin = centre - (size - 1) / 2.0 * spacing
    head_rng = np.random.default_rng([seed, 0x4E])
    porosity = None
    if app is not None:
        porosity = Porosity(app.skull_base_porosity, app.skull_base_cell_mm, app.skull_base_cell_hu)
    hu, labels = voxelize_head(
        head_primitives(anatomy.brain, head_rng),
        origin,
        spacing,
        shape,
        head_rng,
        porosity,
        np.random.default_rng([seed, 0x90]),
    )
    if app is not None:
        hu = np.where(labels == BONE, hu * app.bone_scale, hu).astype(np.float32)

    art = anatomy.arteries
    frac = voxelize_tree(art, origin, spacing, shape)
    lumen_hu = float(contrast_hu if contrast_hu is not None else rng.uniform(450, 900))
    dilution = 0.3
    if app is not None:
        lumen_hu = float(contrast_hu if contrast_hu is not None else app.contrast_hu)
        dilution = app.distal_dilution
    # Lumen value per voxel: contrast dilutes along the tree (by 30 % at 1 s of transit).
    lumen_map = _lumen_values(art, origin, spacing, shape, lumen_hu, frac > 0, dilution)
    for centre_mm, radius, delay in anatomy.aneurysms:
        sac = lesions.voxelize_sphere(centre_mm, radius, origin, spacing, shape)
        inside = sac > frac
        lumen_map[inside] = lumen_hu * (1.0 - dilution * min(max(delay, 0.0), 1.0))
        frac = np.maximum(frac, sac)
    hu = hu * (1.0 - frac) + lumen_map * frac
    labels[frac >= 0.5] = VESSEL
    if anatomy.coil is not None:
        centre, radius = anatomy.coil
        zz, yy, xx = np.ogrid[:size, :size, :size]
        pos = [(v * spacing + o) for v, o in zip((xx, yy, zz), origin, strict=True)]
        d2 = sum((p - c) ** 2 for p, c in zip(pos, centre, strict=True))
        coil = d2 <= radius**2
        hu = np.where(coil, 3000.0, hu)  # platinum; a device, so the tissue label stays
    if anatomy.clips is not None:
        k = 2 * len(anatomy.clips)
        blades = VesselTree(
            anatomy.clips.reshape(-1, 3),
            np.where(np.arange(k) % 2 == 1, np.arange(k) - 1, -1),
            np.full(k, 0.5),
            np.zeros(k),
            np.zeros(k, np.uint8),
            ("clip",),
        )
        metal = voxelize_tree(blades, origin, spacing, shape)
        hu = np.where(metal >= 0.5, 3000.0, hu)  # a device: labels stay
    clean = hu.astype(np.float32)

    kernel = 0.6 if app is None else app.kernel_sigma_vox
    recon = ndimage.gaussian_filter(clean, kernel)
    if app is not None and app.sharpening > 0:
        recon += app.sharpening * (recon - ndimage.gaussian_filter(recon, 1.0))
    if streaks:
        recon += _streaks(clean, spacing, rng) * (1.0 if app is None else app.streak_scale)
    if noise:
        if noise_hu is not None:
            sigma = float(noise_hu)
        else:
            sigma = float(rng.uniform(15, 35)) if app is None else app.noise_hu
        grain = 0.8 if app is None else app.noise_grain_vox
        field_ = ndimage.gaussian_filter(rng.normal(size=shape).astype(np.float32), grain)
        recon += field_ * (sigma / max(float(field_.std()), 1e-6))
    outside = _outside_cylinder(size, 1.0 if app is None else app.truncation)
    if app is not None and app.capping_hu > 0:
        # Truncated projections raise values towards the edge of the field (capping).
        c = (size - 1) / 2.0
        yy, xx = np.mgrid[:size, :size]
        rel = np.hypot(yy - c, xx - c) / (0.5 * size * app.truncation)
        recon += (app.capping_hu * np.clip(rel, 0, 1) ** 4).astype(np.float32)[None]
    recon[:, outside] = -1000.0
    clean[:, outside] = -1000.0
    labels[:, outside] = AIR
    options: dict[str, Any] = {
        "size": size,
        "noise": noise,
        "noise_hu": noise_hu,
        "streaks": streaks,
        "contrast_hu": lumen_hu,
    }
    bits = 12
    if app is not None:
        bits = app.bits
        options["randomise"] = options_key(dataclasses.asdict(pri))
        # What is stored is what the volume holds: HU + 1024 in 12 or 16 bits.
        recon = np.clip(recon, -1024.0, 2.0**bits - 1 - 1024.0)
    return RotationalPhantom(
        seed=seed,
        hu=recon.astype(np.float32),
        spacing_mm=(spacing, spacing, spacing),
        origin_mm=origin,
        truth={"labels": labels, "vessel_fraction": frac.astype(np.float32), "hu_clean": clean},
        options=options,
        bits_stored=bits,
        appearance=None if app is None else app.summary(),
    )


def _lumen_values(
    art: VesselTree, origin, spacing, shape, lumen_hu, inside, dilution: float = 0.3
) -> np.ndarray:
    """Nearest-node lumen value for voxels inside vessels (constant elsewhere)."""
    out = np.full(shape, lumen_hu, np.float32)
    idx = np.argwhere(inside)
    if len(idx) == 0:
        return out
    from scipy.spatial import cKDTree

    pos = origin + idx[:, ::-1] * spacing
    _, near = cKDTree(art.points).query(pos)
    value = lumen_hu * (1.0 - dilution * np.clip(art.delay[near] / 1.0, 0.0, 1.0))
    out[inside] = value
    return out


def _outside_cylinder(size: int, fraction: float = 1.0) -> np.ndarray:
    """(Y, X) mask outside the reconstruction circle (``fraction`` of the inscribed radius)."""
    c = (size - 1) / 2.0
    yy, xx = np.mgrid[:size, :size]
    return (yy - c) ** 2 + (xx - c) ** 2 > (0.5 * size * fraction) ** 2


def _streaks(
    clean: np.ndarray, spacing: float, rng: np.random.Generator, n_angles: int = 10
) -> np.ndarray:
    """Streaks along lines through dense material, per axial slice.

    Along each of a few view angles, the projected excess density (bone above
    300, coil) is high-pass filtered and smeared back along the line, a cheap
    stand-in for beam hardening and view undersampling in filtered back-projection.
    """
    nz, ny, nx = clean.shape
    dense = np.clip(clean - 300.0, 0.0, None) / 1000.0
    out = np.zeros_like(clean)
    yy, xx = np.mgrid[:ny, :nx]
    n_bins = int(np.ceil(np.hypot(ny, nx))) + 2
    z_off = (np.arange(nz) * n_bins)[:, None]
    for theta in rng.uniform(0, np.pi, n_angles):
        s = np.rint(
            xx * np.cos(theta)
            + yy * np.sin(theta)
            + n_bins / 2
            - (nx * np.cos(theta) + ny * np.sin(theta)) / 2
        ).astype(np.int64)
        s = np.clip(s, 0, n_bins - 1).ravel()
        proj = np.bincount(
            (z_off + s[None, :]).ravel(),
            weights=dense.reshape(nz, -1).ravel(),
            minlength=nz * n_bins,
        )
        proj = proj.reshape(nz, n_bins) * spacing
        high = proj - ndimage.gaussian_filter1d(proj, 3.0, axis=1)
        out += high[:, s].reshape(nz, ny, nx).astype(np.float32)
    return out * (-60.0 / n_angles)
