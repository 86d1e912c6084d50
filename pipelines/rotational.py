"""``rotational_dla``: mask-free 3D angiography from a contrast-filled C-arm CT run.

3D-DSA needs a second (mask) rotation and suffers when the patient moves
between the two. Deep learning angiography (DLA) instead labels every voxel of
the fill volume as vessel, bone or soft tissue and keeps the vessels. With a
model package the 30-layer valid-convolution ResNet of ``pipelines.models.dla``
classifies each voxel from its 41 x 41 x 5 neighbourhood, densely (every voxel
in one pass per slab) rather than patch by patch; the labels are identical.
Without a package the classical path runs, with no HU constant: thresholds in
units of the soft tissue's noise (from the volume's histogram), shape to tell
vessel (tubes, by a multiscale Hessian) from bone (plates, blobs and thick
pieces), a watershed between the two where they touch, and a partial-volume
rule relative to the lumen contrast measured on the vessels themselves. It
works whether the iodine is fainter or brighter than bone (300-3000 HU).

Outputs: a SEG with Blood vessel / Bone / Soft tissue on the volume's own Frame
of Reference, the "DLA angiogram" (the source with everything but vessels set
to air) as a derived volume, and AP + lateral MIPs of it as a Secondary Capture.

Axis 0 of the run runs along the slice normal in ascending position (as
``dicom_node.runs`` sorts it); for axial head volumes that is inferior to superior.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from scipy import ndimage as ndi
from skimage.segmentation import watershed

from pipelines.base import (
    BLOOD_VESSEL,
    BONE,
    SOFT_TISSUE,
    TISSUE,
    AlgorithmInfo,
    ImageOutput,
    PipelineContext,
    PipelineError,
    PipelineResult,
    RenderingOutput,
    Run,
    Segment,
    SegmentationOutput,
    register,
)
from pipelines.models.dla import (
    ARCHITECTURE,
    CLASS_BONE,
    CLASS_SOFT,
    CLASS_VESSEL,
    MARGIN,
    PATCH,
    SLICES,
)
from pipelines.models.package import load_package
from pipelines.preprocess import inference_device, inference_mode, resize
from pipelines.render import AI_LABEL, burn_text
from pipelines.vessel_quality import volume_quality

NAME = "rotational_dla"
VERSION = "1.1.0"
AIR_HU = -1000.0
# Below this a voxel is air, not soft tissue (the SEG's soft-tissue segment is the body).
BODY_HU = -400.0
SEGMENTS = (
    Segment("Blood vessel", BLOOD_VESSEL, TISSUE, (255, 40, 40)),
    Segment("Bone", BONE, TISSUE, (240, 230, 200)),
    Segment("Soft tissue", SOFT_TISSUE, TISSUE, (120, 160, 255)),
)


def padded_volume(hu: np.ndarray) -> np.ndarray:
    """The volume with the context a voxel classifier needs at the edges (edge values repeated)."""
    half = SLICES // 2
    return np.pad(
        hu.astype(np.float32, copy=False),
        ((half, half), (MARGIN, MARGIN), (MARGIN, MARGIN)),
        mode="edge",
    )


@torch.no_grad()
def classify_dense(
    model: torch.nn.Module, hu: np.ndarray, device: torch.device, slab: int = 4
) -> np.ndarray:
    """Class of every voxel of (Z, Y, X) HU, ``slab`` slices per forward pass; uint8 labels."""
    padded = torch.from_numpy(padded_volume(hu)).to(device)
    labels = np.empty(hu.shape, np.uint8)
    with inference_mode(device):
        for z0 in range(0, hu.shape[0], slab):
            z1 = min(z0 + slab, hu.shape[0])
            # (z1 - z0 + 4, Y', X') -> (z1 - z0, 5, Y', X'): each slice with its 4 neighbours.
            windows = padded[z0 : z1 + SLICES - 1].unfold(0, SLICES, 1).permute(0, 3, 1, 2)
            logits = model(windows.contiguous())
            labels[z0:z1] = logits.float().argmax(dim=1).to(torch.uint8).cpu().numpy()
    return labels


def extract_patches(padded: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """(N, 5, 41, 41) patches centred on ``coords`` (N, 3) voxel indices of the unpadded volume."""
    dz = np.arange(SLICES)[None, :, None, None]
    dy = np.arange(PATCH)[None, None, :, None]
    dx = np.arange(PATCH)[None, None, None, :]
    z, y, x = (coords[:, i].reshape(-1, 1, 1, 1) for i in range(3))
    return padded[z + dz, y + dy, x + dx]


@torch.no_grad()
def classify_patches(
    model: torch.nn.Module,
    hu: np.ndarray,
    coords: np.ndarray,
    device: torch.device,
    batch: int = 256,
    padded: np.ndarray | None = None,
) -> np.ndarray:
    """Class of the voxels at ``coords``, one 41 x 41 x 5 patch each (the paper's way)."""
    padded = padded_volume(hu) if padded is None else padded
    out = np.empty(len(coords), np.uint8)
    with inference_mode(device):
        for s in range(0, len(coords), batch):
            patches = torch.from_numpy(extract_patches(padded, coords[s : s + batch])).to(device)
            logits = model(patches)
            out[s : s + batch] = logits.float().argmax(dim=1)[:, 0, 0].to(torch.uint8).cpu().numpy()
    return out


# ---------------------------------------------------------------------------
# Classical path
#
# Why it looks the way it does: the contrast of a 3D-RA run varies tenfold
# (200-3000 HU) with the injection, and full-strength iodine is brighter than
# cortical bone, so no HU constant separates vessel from bone. What does not
# vary is the soft tissue around both (its histogram peak gives the level and
# the noise, and every threshold is a multiple of that noise) and the shapes:
# vessels are tubes, bone is plates (skull), blobs (skull base) and large
# compact pieces. The lumen level, for the partial-volume rule, is read from
# the tubes themselves.

FULL = np.ones((3, 3, 3), bool)
# Dense voxels whose Hessians are formed at once in ``tubeness``.
HESSIAN_BLOCK = 1 << 19

# Every constant is in units the volume supplies: soft-tissue noise SDs, mm, or
# fractions of the measured lumen contrast. Chosen on training phantom seeds
# 2000-2001 at 300, 800 and 3000 HU (never on held-out seeds or family B).
CLASSICAL_DEFAULTS: dict[str, Any] = {
    # Dense voxels: above soft tissue by k_low noise SDs, in components that
    # reach k_high somewhere (hysteresis).
    "k_low": 3.5,
    "k_high": 7.0,
    # The shape analysis sees intensities clipped at k_sat noise SDs above soft
    # tissue, so a tube looks the same at 300 HU as at 3000 HU.
    "k_sat": 8.0,
    # Bone seeds: dense structures thicker than this radius (larger than the
    # largest artery, the ICA, with its blur).
    "thick_mm": 3.0,
    # Vessel seeds: tubeness above v_seed, at least seed_gap_mm from thick bone.
    "v_seed": 0.5,
    "seed_gap_mm": 1.5,
    # Dense regions reached by no seed are vessel when tubular on average.
    "v_unassigned": 0.2,
    # Tube scales (Gaussian sigma, mm): the smallest visible branch to the ICA.
    "scales_mm": (0.45, 0.8, 1.4),
    # Partial volume: a vessel voxel is at least this fraction of the vessel's
    # local peak above soft tissue (the local peak within local_mm) ...
    "fwhm": 0.4,
    "local_mm": 1.5,
    # ... and of the run's lumen contrast (the 95th percentile of the vessel
    # seeds): less than that is a sub-voxel vessel or blur.
    "lumen_fraction": 0.2,
    "min_vessel_mm3": 5.0,
    # Gradient smoothing for the watershed between vessel and bone.
    "grad_mm": 0.5,
}


def body_mask(hu: np.ndarray) -> np.ndarray:
    """The largest connected non-air region with its internal cavities filled."""
    body = hu > BODY_HU
    labels, count = ndi.label(body)
    if count == 0:
        return body
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return ndi.binary_fill_holes(labels == sizes.argmax())


def soft_tissue_level(hu: np.ndarray, body: np.ndarray) -> tuple[float, float]:
    """(level, noise SD) of soft tissue: the main peak of the body's HU histogram and
    its half width at half maximum on the low side (the high side carries the
    partial volume of everything denser)."""
    values = hu[body][::7]
    if values.size == 0:
        return 0.0, 10.0
    edges = np.arange(-500.0, 602.0, 2.0)
    counts, _ = np.histogram(values, edges)
    counts = np.convolve(counts, np.ones(5) / 5, mode="same")
    peak = int(counts.argmax())
    low = peak
    while low > 0 and counts[low] > counts[peak] / 2:
        low -= 1
    level = float(edges[peak] + 1.0)
    return level, max((level - float(edges[low])) / 1.1774, 2.0)


def reconstruction_field(hu: np.ndarray) -> np.ndarray:
    """(Y, X) bool: inside the reconstruction circle. Outside it a cone-beam CT holds
    one padding value in every slice; none found means the whole slice."""
    outside = np.all(hu == hu.min(), axis=0)
    return ~outside if outside.mean() >= 0.01 else np.ones(outside.shape, bool)


def extend_beyond_field(volume: np.ndarray, field: np.ndarray) -> np.ndarray:
    """Every voxel outside the reconstruction circle takes the value of the nearest
    voxel inside it (per slice), so that bone cut by the circle keeps its
    thickness there instead of looking like a thin, vessel-like sliver."""
    if field.all():
        return volume
    iy, ix = ndi.distance_transform_edt(~field, return_distances=False, return_indices=True)
    return volume[:, iy, ix]


def _hessian_eigenvalues(
    smooth: np.ndarray, index: np.ndarray, shape: tuple[int, ...]
) -> np.ndarray:
    """Eigenvalues (N, 3), ordered by magnitude, of the Hessian (finite differences) of
    the flat ``smooth`` array of ``shape`` at flat ``index``es (not on the array's faces)."""
    sz, sy = shape[1] * shape[2], shape[2]

    def at(offset: int) -> np.ndarray:
        return smooth[index + offset]

    centre = at(0)
    dzz = at(sz) - 2 * centre + at(-sz)
    dyy = at(sy) - 2 * centre + at(-sy)
    dxx = at(1) - 2 * centre + at(-1)
    dzy = (at(sz + sy) - at(sz - sy) - at(sy - sz) + at(-sz - sy)) / 4
    dzx = (at(sz + 1) - at(sz - 1) - at(1 - sz) + at(-sz - 1)) / 4
    dyx = (at(sy + 1) - at(sy - 1) - at(1 - sy) + at(-sy - 1)) / 4
    hessian = np.stack(
        [
            np.stack([dzz, dzy, dzx], axis=-1),
            np.stack([dzy, dyy, dyx], axis=-1),
            np.stack([dzx, dyx, dxx], axis=-1),
        ],
        axis=-2,
    )
    values = np.linalg.eigvalsh(hessian)
    return np.take_along_axis(values, np.argsort(np.abs(values), axis=1), axis=1)


def tubeness(
    u: np.ndarray, mask: np.ndarray, step_mm: float, scales_mm: tuple[float, ...]
) -> np.ndarray:
    """Bright-tube measure in [0, 1] (Frangi's, alpha = beta = 0.5) at the voxels of
    ``mask``, the maximum over scales; 0 elsewhere. Plates (skull) and blobs
    (skull base) score near 0. Only the masked voxels' Hessians are formed."""
    padded = np.pad(u, 1, mode="edge")
    flat = np.flatnonzero(mask)
    index = np.ravel_multi_index(
        tuple(c + 1 for c in np.unravel_index(flat, u.shape)), padded.shape
    )
    best = np.zeros(len(flat), np.float32)
    for scale in scales_mm:
        sigma = max(scale / step_mm, 0.7)
        smooth = ndi.gaussian_filter(padded, sigma, mode="nearest").ravel()
        # A block of voxels at a time: the Hessians and their temporaries take a few
        # hundred bytes per voxel (gigabytes for a 512^3 head's dense voxels at once).
        for start in range(0, len(flat), HESSIAN_BLOCK):
            part = slice(start, start + HESSIAN_BLOCK)
            ev = _hessian_eigenvalues(smooth, index[part], padded.shape) * np.float32(sigma**2)
            l1, l2, l3 = ev[:, 0], ev[:, 1], ev[:, 2]
            plate = (l2 / (l3 - 1e-9)) ** 2  # |l2| / |l3|: 0 for a plate, 1 for a tube
            blob = l1**2 / (np.abs(l2 * l3) + 1e-12)  # 0 for a tube, 1 for a blob
            strength = l1**2 + l2**2 + l3**2
            v = (1 - np.exp(-plate / 0.5)) * np.exp(-blob / 0.5) * (1 - np.exp(-strength / 0.045))
            v[(l2 > 0) | (l3 > 0)] = 0.0  # dark tubes and saddles
            best[part] = np.maximum(best[part], v.astype(np.float32))
        del smooth
    out = np.zeros(u.shape, np.float32)
    out.ravel()[flat] = best
    return out


def within(
    mask: np.ndarray, r: float, spacing_mm: tuple[float, float, float], slab: int = 32
) -> np.ndarray:
    """Voxels at most ``r`` mm (Euclidean) from a voxel of ``mask``: the distance
    transform of ``~mask`` thresholded, slab by slab along axis 0.

    Whether a distance is at most ``r`` depends only on voxels within ``r``, so each
    slab with ``r`` of context on both sides gives exactly the whole volume's
    answer, while scipy's transform holds its 20 bytes per voxel for one slab
    only (a 512^3 volume otherwise needs 2.7 GB per transform).
    """
    halo = int(np.ceil(r / spacing_mm[0])) + 1
    out = np.zeros(mask.shape, bool)
    for z0 in range(0, mask.shape[0], slab):
        z1 = min(z0 + slab, mask.shape[0])
        lo, hi = max(0, z0 - halo), min(mask.shape[0], z1 + halo)
        part = mask[lo:hi]
        if part.any():
            near = ndi.distance_transform_edt(~part, sampling=spacing_mm) <= r
            out[z0:z1] = near[z0 - lo : z1 - lo]
    return out


def thick_parts(mask: np.ndarray, spacing_mm: tuple[float, float, float], r: float) -> np.ndarray:
    """Opening of ``mask`` by a ball of radius ``r`` mm (distance transforms), the
    array's faces continued outward (a structure cut by them keeps its thickness)."""
    pad = int(np.ceil(r / min(spacing_mm))) + 2
    m = np.pad(mask, pad, mode="edge")
    core = ~within(~m, r, spacing_mm)  # farther than r from the background
    opened = within(core, r, spacing_mm)
    return opened[pad:-pad, pad:-pad, pad:-pad] & mask


def hysteresis3d(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    labels, count = ndi.label(low, structure=FULL)
    keep = np.zeros(count + 1, bool)
    keep[np.unique(labels[high & low])] = True
    keep[0] = False
    return keep[labels]


def classical_tissues(
    hu: np.ndarray,
    spacing_mm: tuple[float, float, float],
    params: Mapping[str, Any] | None = None,
) -> np.ndarray:
    """Labels (vessel 0, bone 1, soft tissue / air 2) with thresholds from the volume
    itself and shape telling vessel from bone.

    1. Soft tissue level and noise from the histogram (:func:`soft_tissue_level`);
       dense = hysteresis at ``k_low`` / ``k_high`` noise SDs above it.
    2. Shape on the dense voxels, on intensities clipped at ``k_sat`` noise SDs:
       tubeness (multiscale Hessian) and thickness (an opening at ``thick_mm``).
    3. Seeds: thick structures are bone; strongly tubular voxels away from them
       are vessel. A watershed on the gradient magnitude assigns every dense
       voxel to one of them, so a vessel touching bone is cut where the
       intensity changes (or halfway, where it does not), whichever is brighter.
    4. Partial volume: vessel voxels keep ``fwhm`` of the local peak and
       ``lumen_fraction`` of the lumen contrast measured on the seeds; specks
       under ``min_vessel_mm3`` go.

    Structures cut by the reconstruction circle or the volume's faces are
    continued beyond them for the shape analysis.
    """
    p = {**CLASSICAL_DEFAULTS, **(params or {})}
    step = min(spacing_mm)
    field = reconstruction_field(hu)
    body = body_mask(hu)
    level, noise = soft_tissue_level(hu, body)
    labels = np.full(hu.shape, CLASS_SOFT, np.uint8)
    hx = extend_beyond_field(hu, field)
    bx = extend_beyond_field(body, field)
    dense = hysteresis3d(bx & (hx > level + p["k_low"] * noise), hx > level + p["k_high"] * noise)
    if not dense.any():
        return labels
    u = np.clip((hx - level) / (p["k_sat"] * noise), 0.0, 1.0).astype(np.float32)
    tube = tubeness(u, dense, step, tuple(p["scales_mm"]))
    del u
    thick = thick_parts(dense, spacing_mm, p["thick_mm"])
    vessel_seed = dense & (tube > p["v_seed"]) & ~within(thick, p["seed_gap_mm"], spacing_mm)
    markers = np.zeros(hu.shape, np.uint8)
    markers[thick] = 2
    markers[vessel_seed] = 1
    del thick
    gradient = ndi.gaussian_gradient_magnitude(
        hx.astype(np.float32, copy=False), p["grad_mm"] / step
    )
    # Flooding stays inside ``dense``, so its bounding box holds all of it (the
    # watershed copies its input twice as float64: 16 bytes per voxel it sees).
    box = ndi.find_objects(dense.view(np.uint8))[0]
    basins = np.zeros(hu.shape, np.uint8)
    basins[box] = watershed(gradient[box], markers[box], mask=dense[box])
    del gradient, markers
    vessel, bone = basins == 1, basins == 2
    rest = dense & (basins == 0)
    del basins
    if rest.any():
        parts, count = ndi.label(rest, structure=FULL)
        mean_tube = np.asarray(ndi.mean(tube, parts, np.arange(1, count + 1)))
        tubular = np.concatenate([[False], mean_tube > p["v_unassigned"]])
        vessel |= tubular[parts]
        bone |= rest & ~tubular[parts]
    radius = max(1, int(round(p["local_mm"] / step)))
    local_peak = ndi.maximum_filter(
        np.where(vessel, hx, -np.inf).astype(np.float32), size=2 * radius + 1
    )
    lumen = float(np.percentile(hx[vessel_seed], 95)) if vessel_seed.any() else float(hx.max())
    floor = np.maximum(p["fwhm"] * (local_peak - level), p["lumen_fraction"] * (lumen - level))
    vessel &= hx >= level + floor
    parts, count = ndi.label(vessel, structure=FULL)
    if count:
        volume_mm3 = np.bincount(parts.ravel()) * float(np.prod(spacing_mm))
        keep = volume_mm3 >= p["min_vessel_mm3"]
        keep[0] = False
        vessel = keep[parts]
    inside = field[None] & body
    labels[bone & inside] = CLASS_BONE
    labels[vessel & inside] = CLASS_VESSEL
    return labels


# ---------------------------------------------------------------------------
# Outputs


def masks_from_labels(labels: np.ndarray, hu: np.ndarray) -> np.ndarray:
    """(3, Z, Y, X) bool: vessel, bone, soft tissue (the body only, not the air around it)."""
    return np.stack(
        [
            labels == CLASS_VESSEL,
            labels == CLASS_BONE,
            (labels == CLASS_SOFT) & (hu > BODY_HU),
        ]
    )


def angiogram(hu: np.ndarray, vessel: np.ndarray) -> np.ndarray:
    """The DLA angiogram: source HU in vessels, air everywhere else."""
    return np.where(vessel, hu, np.float32(AIR_HU)).astype(np.float32)


def mip_rendering(
    volume: np.ndarray, spacing_mm: tuple[float, float, float], algorithm: AlgorithmInfo
) -> np.ndarray:
    """AP and lateral maximum-intensity projections side by side, superior up, (H, W, 3)."""
    sz, sy, sx = spacing_mm
    views = []
    for axis, col_spacing, title in ((1, sx, "AP MIP"), (2, sy, "Lateral MIP")):
        mip = volume.max(axis=axis)[::-1]  # rows: superior at the top
        h = max(1, int(round(mip.shape[0] * sz / col_spacing)))
        mip = resize(torch.from_numpy(np.ascontiguousarray(mip))[None], (h, mip.shape[1]))[
            0
        ].numpy()
        views.append((mip, title))
    height = max(v.shape[0] for v, _ in views)
    vessels = volume[volume > AIR_HU]
    hi = float(np.percentile(vessels, 99.5)) if vessels.size else 1.0
    lo = min(0.0, hi - 1.0)
    panels = []
    for mip, title in views:
        grey = (np.clip((mip - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)
        canvas = np.zeros((height, grey.shape[1]), np.uint8)
        top = (height - grey.shape[0]) // 2
        canvas[top : top + grey.shape[0]] = grey
        rgb = np.repeat(canvas[..., None], 3, axis=-1)
        panels.append(burn_text(rgb, [title], corner="top-left"))
    rgb = np.concatenate(panels, axis=1)
    return burn_text(
        rgb, [AI_LABEL, f"DLA angiogram: {algorithm.describe()}"], corner="bottom-left"
    )


def _spacing(run: Run) -> tuple[float, float, float]:
    row, col = run.meta.pixel_spacing_mm or (1.0, 1.0)
    return float(run.meta.slice_spacing_mm or row), float(row), float(col)


class RotationalDLA:
    name = NAME

    def __call__(self, run: Run, ctx: PipelineContext) -> PipelineResult:
        hu = run.pixels
        if not run.meta.is_volume or hu.ndim != 3:
            raise PipelineError(
                f"{NAME} needs a volume (Z, Y, X), got shape {hu.shape}"
                f"{'' if run.meta.is_volume else ' (a 2D run)'}"
            )
        if hu.shape[0] < SLICES:
            raise PipelineError(f"{NAME}: {hu.shape[0]} slices, at least {SLICES} needed")
        opts: Mapping[str, Any] = ctx.options
        spacing = _spacing(run)
        notes: list[str] = []
        if run.meta.pixel_spacing_mm is None:
            notes.append("no pixel spacing in the headers: 1 mm assumed for the MIP aspect")
        if ctx.model_package:
            pkg = load_package(ctx.model_package, pipeline=NAME)
            if pkg.architecture != ARCHITECTURE:
                raise PipelineError(
                    f"model package {pkg.name} has architecture "
                    f"{pkg.architecture!r}; {NAME} needs {ARCHITECTURE!r}"
                )
            device = inference_device(ctx.device)
            model = pkg.load_model(device)
            labels = classify_dense(model, hu, device, slab=int(opts.get("slab", 4)))
            algorithm = pkg.algorithm("DLA voxel classifier", VERSION)
            notes.append(f"model {pkg.name} {pkg.version}, dense inference on {device.type}")
        else:
            labels = classical_tissues(hu, spacing, opts.get("classical"))
            algorithm = AlgorithmInfo(
                "Adaptive thresholds + tube/bone shape + watershed", VERSION, "classical"
            )
            notes.append("no model package configured: classical path (thresholds from the volume)")
        masks = masks_from_labels(labels, hu)
        volume_ml = masks.reshape(3, -1).sum(axis=1) * float(np.prod(spacing)) / 1000.0
        notes.append(
            "volumes (ml): "
            + ", ".join(f"{s.label} {v:.1f}" for s, v in zip(SEGMENTS, volume_ml, strict=True))
        )
        dla = angiogram(hu, masks[0])
        return PipelineResult(
            outputs=[
                SegmentationOutput(
                    key="tissues",
                    masks=masks,
                    segments=list(SEGMENTS),
                    algorithm=algorithm,
                    geometry="volume",
                    description="Vessel, bone and soft tissue",
                ),
                ImageOutput(
                    key="dla_angiogram",
                    pixels=dla,
                    description="DLA angiogram",
                    geometry="volume",
                    derivation="Source with all voxels but vessels set to air (-1000 HU)",
                ),
                RenderingOutput(
                    key="mip",
                    rgb=mip_rendering(dla, spacing, algorithm),
                    description="DLA angiogram MIP",
                ),
            ],
            notes=notes,
            quality=volume_quality(masks[0], masks[1]),
        )


@register(NAME)
def _factory() -> RotationalDLA:
    return RotationalDLA()
