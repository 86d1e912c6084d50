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

import itertools
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
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
from pipelines.options import ROTATIONAL_CLASSICAL, checked
from pipelines.preprocess import inference_device, inference_mode, resize
from pipelines.render import AI_LABEL, burn_text
from pipelines.vessel_quality import grown_box, volume_quality

NAME = "rotational_dla"
# 1.2.0: the circle found past air noise, nothing seeded beyond it
# 1.3.0: porous bone (thin septa around marrow or air cells) is bone
# 1.3.1: the soft tissue around the vessels is measured (VESSELSOFT): vessels with
# little of it are low confidence (the labels are 1.3.0's)
# 1.4.0: a seeded vessel piece that is not tubular on average is bone, as an unseeded
# one already was (a thin skull-base bone seeded by a few tubular voxels)
# 1.5.0: the run's lumen contrast is the seed-weighted median of each vessel piece's
# own, not the pooled seeds' 95th percentile
VERSION = "1.5.0"
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


def class_bias(config: Mapping[str, Any]) -> tuple[float, float, float] | None:
    """The package's per-class logit offsets (vessel, bone, soft tissue), or None.

    A DLA classifier trained on class-balanced samples (the paper's undersampling)
    learns priors of about a third per class, while vessels are a fraction of a
    percent of a head; its argmax then calls far too many voxels vessel. ``python -m
    training calibrate`` chooses the vessel offset on validation runs and writes it
    here (``class_bias``); the decision is the argmax of logits + offsets."""
    value = config.get("class_bias")
    if value is None:
        return None
    try:
        bias = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        bias = ()
    if len(bias) != 3 or not all(np.isfinite(bias)):
        raise PipelineError(f"model package class_bias {value!r}: expected 3 finite numbers")
    return bias[0], bias[1], bias[2]


@torch.no_grad()
def dense_logit_slabs(
    model: torch.nn.Module, hu: np.ndarray, device: torch.device, slab: int = 4
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(z0, z1, float32 logits (z1 - z0, 3, Y, X)) of every voxel, ``slab`` slices per pass."""
    padded = torch.from_numpy(padded_volume(hu)).to(device)
    for z0 in range(0, hu.shape[0], slab):
        z1 = min(z0 + slab, hu.shape[0])
        # (z1 - z0 + 4, Y', X') -> (z1 - z0, 5, Y', X'): each slice with its 4 neighbours.
        windows = padded[z0 : z1 + SLICES - 1].unfold(0, SLICES, 1).permute(0, 3, 1, 2)
        with inference_mode(device):  # not across the yield: the caller's mode is its own
            logits = model(windows.contiguous()).float()
        yield z0, z1, logits


def _decide(logits: torch.Tensor, bias: Sequence[float] | None) -> torch.Tensor:
    """uint8 classes of (N, 3, H, W) logits: the argmax of logits plus ``bias``."""
    if bias is not None:
        offsets = torch.tensor(bias, dtype=logits.dtype, device=logits.device)
        logits = logits + offsets[None, :, None, None]
    return logits.argmax(dim=1).to(torch.uint8)


def classify_dense(
    model: torch.nn.Module,
    hu: np.ndarray,
    device: torch.device,
    slab: int = 4,
    bias: Sequence[float] | None = None,
) -> np.ndarray:
    """Class of every voxel of (Z, Y, X) HU, ``slab`` slices per forward pass; uint8
    labels: the argmax of the logits plus ``bias`` (see ``class_bias``)."""
    labels = np.empty(hu.shape, np.uint8)
    for z0, z1, logits in dense_logit_slabs(model, hu, device, slab):
        labels[z0:z1] = _decide(logits, bias).cpu().numpy()
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
    bias: Sequence[float] | None = None,
) -> np.ndarray:
    """Class of the voxels at ``coords``, one 41 x 41 x 5 patch each (the paper's way),
    decided as ``classify_dense`` decides."""
    padded = padded_volume(hu) if padded is None else padded
    out = np.empty(len(coords), np.uint8)
    with inference_mode(device):
        for s in range(0, len(coords), batch):
            patches = torch.from_numpy(extract_patches(padded, coords[s : s + batch])).to(device)
            out[s : s + batch] = _decide(model(patches).float(), bias)[:, 0, 0].cpu().numpy()
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
# Bytes that tubeness holds per voxel of its slab (context included) and per Hessian
# of a block (tracemalloc, on a 60-slice slab of a 256² head).
TUBENESS_BYTES = 32
HESSIAN_BYTES = 400
# The classical path works on slabs of this many slices (with the context each
# stage needs around them), so that its temporaries are a slab's, not a volume's.
SLAB = 32
# The watershed floods each slab with this much context above and below: a
# dense voxel farther than this from every seed along the volume's axis is
# assigned within its slab's reach (the seeds are dense along vessels and bone).
WATERSHED_CONTEXT_MM = 5.0
# Bytes a watershed slab holds per voxel with its context (the gradient and
# skimage's float64 copies; 22 traced on a 256² head, rounded up for its heap).
WATERSHED_BYTES = 32
# Work done slab by slab (or block by block) runs on torch's threads where the
# library releases the GIL (scipy's distance transform and filters, LAPACK, most
# of skimage's watershed), as many at once as keep their temporaries within
# PARALLEL_BYTES. The distance transforms work on blocks of EDT_BLOCK voxels a
# side with their context, holding about EDT_BYTES a voxel (:func:`_edt`). Blocks
# of 64 were the fastest of 64, 96 and 128 on a 256³ head and on 192 slices of a
# 512³ one (2 threads; 4.2, 4.5, 5.5 s for a dilation and an erosion of the
# first, 8.1, 8.9, 8.3 s for a dilation of the second).
PARALLEL_BYTES = 1 << 30
EDT_BYTES = 40
EDT_BLOCK = 64

# The classical path's constants, which the ``classical`` option overrides one by one
# (declared with the options; their reasons are given there).
CLASSICAL_DEFAULTS = ROTATIONAL_CLASSICAL


def body_mask(hu: np.ndarray) -> np.ndarray:
    """The largest connected non-air region with its internal cavities filled."""
    body = hu > BODY_HU
    labels, count = ndi.label(body)
    if count == 0:
        return body
    sizes = label_sizes(labels, count)
    sizes[0] = 0
    body = labels == sizes.argmax()
    del labels
    return fill_holes(body)


def label_sizes(labels: np.ndarray, count: int, field: np.ndarray | None = None) -> np.ndarray:
    """Voxels per label 0..count (within the (Y, X) ``field`` when given), counted a slab
    at a time: ``np.bincount`` first casts its input to int64, a 1 GB copy of a 512³
    label volume."""
    sizes = np.zeros(count + 1, np.int64)
    field = None if field is None or field.all() else field  # no copy of each slab then
    for z0 in range(0, labels.shape[0], SLAB):
        part = labels[z0 : z0 + SLAB]
        part = part[:, field] if field is not None else part
        sizes += np.bincount(part.ravel(), minlength=count + 1)
    return sizes


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``ndi.binary_fill_holes`` (background parts, face-connected, that do not reach
    the array's faces are filled), by labelling the background: scipy's iterated
    dilation keeps coordinate lists that take gigabytes on a 512³ head."""
    background, count = ndi.label(~mask)
    if count == 0:
        return mask.copy()
    reaches_face = np.zeros(count + 1, bool)
    for axis in range(mask.ndim):
        for end in (0, -1):
            reaches_face[np.take(background, end, axis=axis)] = True
    reaches_face[0] = False
    return ~reaches_face[background]


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
    one padding value in every slice: the volume's minimum, or the value of a corner
    (air noise inside the circle can reach below a padding of -1000 HU, as in the
    phantoms of family A); none found means the whole slice."""
    # Each candidate compares the whole volume once: equal corners are tried once.
    for padding in dict.fromkeys(
        float(v) for v in (hu.min(), hu[0, 0, 0], hu[0, 0, -1], hu[0, -1, 0], hu[0, -1, -1])
    ):
        outside = np.all(hu == padding, axis=0)
        if outside.mean() >= 0.01:
            return ~outside
    return np.ones(hu.shape[1:], bool)


def extend_beyond_field(volume: np.ndarray, field: np.ndarray) -> None:
    """In place: every voxel outside the reconstruction circle takes the value of the
    nearest voxel inside it (per slice), so that bone cut by the circle keeps its
    thickness there instead of looking like a thin, vessel-like sliver."""
    if field.all():
        return
    iy, ix = ndi.distance_transform_edt(~field, return_distances=False, return_indices=True)
    oy, ox = np.nonzero(~field)
    sy, sx = iy[oy, ox], ix[oy, ox]
    for z0 in range(0, volume.shape[0], SLAB):
        part = volume[z0 : z0 + SLAB]
        part[:, oy, ox] = part[:, sy, sx]


def _slabs(n: int, slab: int, halo: int) -> Iterator[tuple[int, int, int, int]]:
    """(z0, z1, lo, hi): the core slices z0:z1 of each slab along axis 0 and, with
    ``halo`` slices of context on both sides, lo:hi."""
    for z0 in range(0, n, slab):
        z1 = min(z0 + slab, n)
        yield z0, z1, max(0, z0 - halo), min(n, z1 + halo)


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


def tubeness_in_slabs(
    hx: np.ndarray,
    level: float,
    scale: float,
    mask: np.ndarray,
    step_mm: float,
    scales_mm: tuple[float, ...],
    slab: int | None = None,
    threads: int | None = None,
) -> np.ndarray:
    """:func:`tubeness` of ``clip((hx - level) / scale, 0, 1)`` at the voxels of
    ``mask``, in ``np.flatnonzero(mask)`` order, computed slab by slab (by default
    :data:`SLAB` slices, as many at once as :data:`PARALLEL_BYTES` allows).

    Each slab carries the widest Gaussian's reach plus the Hessian's one voxel as
    context, so every value equals the whole volume's; no volume-sized float
    array is made (a 512³ volume's would take 0.5 GB each, and tubeness holds three).
    """
    sigma = max(max(scales_mm) / step_mm, 0.7)
    halo = int(4.0 * sigma + 0.5) + 2

    def one(z0: int, z1: int, lo: int, hi: int) -> np.ndarray:
        if not mask[z0:z1].any():
            return np.zeros(0, np.float32)
        core = np.zeros((hi - lo, *hx.shape[1:]), bool)
        core[z0 - lo : z1 - lo] = mask[z0:z1]
        u = np.clip((hx[lo:hi] - level) / scale, 0.0, 1.0).astype(np.float32)
        return tubeness(u, core, step_mm, scales_mm)[core]

    slab = slab or SLAB
    slab_bytes = (slab + 2 * halo) * hx.shape[1] * hx.shape[2] * TUBENESS_BYTES
    threads = threads or _threads(slab_bytes + HESSIAN_BLOCK * HESSIAN_BYTES)
    parts = _in_parallel(one, list(_slabs(hx.shape[0], slab, halo)), threads)
    return np.concatenate([np.zeros(0, np.float32), *parts])


def _in_parallel(work: Any, slabs: Sequence[tuple[Any, ...]], threads: int) -> list[Any]:
    """``work(*slab)`` for each slab (its bounds, or a block's slices), the results
    in order, on ``threads`` threads."""
    if threads <= 1 or len(slabs) <= 1:
        return [work(*slab) for slab in slabs]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda slab: work(*slab), slabs))


def _threads(bytes_each: int) -> int:
    """Torch's threads, or fewer where as many slabs or blocks holding ``bytes_each``
    would hold more than :data:`PARALLEL_BYTES` at once; at least one."""
    return max(1, min(torch.get_num_threads(), PARALLEL_BYTES // max(bytes_each, 1)))


def _blocks(
    shape: tuple[int, ...], block: int, margins: Sequence[int]
) -> list[tuple[tuple[slice, ...], tuple[slice, ...]]]:
    """(core, context) of each block of ``shape``: cores of ``block`` voxels a side
    (less at the far faces) tiling the array, each with ``margins`` voxels of
    context on both sides along each axis (clipped to the array)."""
    axes = [
        [(slice(z0, z1), slice(lo, hi)) for z0, z1, lo, hi in _slabs(n, block, m)]
        for n, m in zip(shape, margins, strict=True)
    ]
    return [
        (tuple(core for core, _ in parts), tuple(context for _, context in parts))
        for parts in itertools.product(*axes)
    ]


def _edt(part: np.ndarray, spacing_mm: tuple[float, float, float]) -> np.ndarray:
    """``ndi.distance_transform_edt(part, sampling=spacing_mm)`` bit for bit, in about
    half its memory: scipy's feature transform, then the distances from it one axis
    at a time with scipy's operations in scipy's order (it forms all three axes'
    float64 offsets at once, with a copy of the index grid: 49 bytes a voxel
    traced, against 32 here)."""
    nearest = ndi.distance_transform_edt(
        part, sampling=spacing_mm, return_distances=False, return_indices=True
    )

    def squared(axis: int) -> np.ndarray:
        index = np.arange(part.shape[axis], dtype=np.int32).reshape(
            [-1 if a == axis else 1 for a in range(part.ndim)]
        )
        offset = (nearest[axis] - index).astype(np.float64)
        offset *= np.float64(spacing_mm[axis])
        return np.multiply(offset, offset, offset)

    total = squared(0)
    for axis in range(1, part.ndim):
        total += squared(axis)
    return np.sqrt(total, out=total)


def _distance_in_blocks(
    mask: np.ndarray,
    box: tuple[slice, ...],
    test: Any,
    margins: Sequence[int],
    block: int | None,
    threads: int | None,
) -> np.ndarray:
    """``test(part)`` on each block of ``mask[box]`` with ``margins`` of context, the
    core of each block kept; False outside ``box``. By default blocks of
    :data:`EDT_BLOCK` voxels a side, as many at once as :data:`PARALLEL_BYTES`
    allows (the distance transform holds about :data:`EDT_BYTES` a voxel)."""
    out = np.zeros(mask.shape, bool)
    sub, target = mask[box], out[box]
    block = block or EDT_BLOCK
    blocks = _blocks(sub.shape, block, margins)
    if threads is None:
        largest = max(int(np.prod([c.stop - c.start for c in context])) for _, context in blocks)
        threads = _threads(largest * EDT_BYTES)

    def one(core: tuple[slice, ...], context: tuple[slice, ...]) -> None:
        inner = tuple(
            slice(c.start - x.start, c.stop - x.start) for c, x in zip(core, context, strict=True)
        )
        target[core] = test(sub[context])[inner]

    _in_parallel(one, blocks, threads)
    return out


def _margins(r: float, spacing_mm: tuple[float, float, float]) -> list[int]:
    """Voxels per axis that hold every voxel within ``r`` mm, and one more."""
    return [int(np.ceil(r / s)) + 1 for s in spacing_mm]


def within(
    mask: np.ndarray,
    r: float,
    spacing_mm: tuple[float, float, float],
    block: int | None = None,
    threads: int | None = None,
) -> np.ndarray:
    """Voxels at most ``r`` mm (Euclidean) from a voxel of ``mask``: the distance
    transform of ``~mask`` thresholded, block by block, over the mask's bounding
    box grown by ``r`` (nothing outside it is that close).

    Whether a distance is at most ``r`` depends only on voxels within ``r``, so each
    block with ``r`` of context on every side gives exactly the whole volume's
    answer, while the transform's temporaries are a block's (a 512^3 volume at
    once would need 8 GB in scipy's), and blocks run in parallel.
    """
    margins = _margins(r, spacing_mm)
    box = grown_box(mask, margins)
    if box is None:
        return np.zeros(mask.shape, bool)

    def near(part: np.ndarray) -> np.ndarray:
        if not part.any():
            return np.zeros(part.shape, bool)
        return _edt(~part, spacing_mm) <= r

    return _distance_in_blocks(mask, box, near, margins, block, threads)


def farther_than(
    mask: np.ndarray,
    r: float,
    spacing_mm: tuple[float, float, float],
    block: int | None = None,
    threads: int | None = None,
) -> np.ndarray:
    """Voxels of ``mask`` farther than ``r`` mm from every voxel of the array outside
    it: ``~within(~mask, r)``, but over the mask's bounding box grown by one voxel
    (the nearest outside voxel is never farther than that box's rim)."""
    box = grown_box(mask, [1, 1, 1])
    if box is None:
        return np.zeros(mask.shape, bool)

    def far(part: np.ndarray) -> np.ndarray:
        if part.all():  # nothing outside within the block's context: all farther than r
            return np.ones(part.shape, bool)
        return _edt(part, spacing_mm) > r

    return _distance_in_blocks(mask, box, far, _margins(r, spacing_mm), block, threads)


def thick_parts(mask: np.ndarray, spacing_mm: tuple[float, float, float], r: float) -> np.ndarray:
    """Opening of ``mask`` by a ball of radius ``r`` mm (distance transforms), the
    array's faces continued outward (a structure cut by them keeps its thickness)."""
    pad = int(np.ceil(r / min(spacing_mm))) + 2
    padded = np.pad(mask, pad, mode="edge")
    core = farther_than(padded, r, spacing_mm)
    del padded
    opened = within(core, r, spacing_mm)
    del core
    return opened[pad:-pad, pad:-pad, pad:-pad] & mask


def porous_parts(
    dense: np.ndarray, spacing_mm: tuple[float, float, float], p: Mapping[str, Any]
) -> np.ndarray:
    """Dense voxels of porous bone: septa around marrow or air cells.

    A septum is as thin as a vessel and, where septa meet, as tubular, so neither
    thickness nor tubeness tells the cancellous or pneumatised skull base from a
    tangle of vessels. Its cells do: closing the dense voxels with a ball of
    ``pore_mm`` fills cells up to twice that across, and the closed mask is thick
    (an opening at ``thick_mm``) where the bone is. There, dense voxels with more
    than ``pore_fraction`` of their ``pore_window_mm`` cube in closed cells are
    porous bone, unless they are solid wider than ``2 * solid_mm`` (an opening at
    ``solid_mm``): closing also fills the gap between a vessel and the bone it runs
    along, and the vessel must not be taken for a septum. Septa thinner than that
    are thinner than the ICA.
    """
    r = float(p["pore_mm"])
    if r <= 0:
        return np.zeros(dense.shape, bool)
    closed = farther_than(within(dense, r, spacing_mm), r, spacing_mm)
    closed |= dense
    region = thick_parts(closed, spacing_mm, p["thick_mm"])
    region &= dense
    cells = closed
    cells &= ~dense
    del closed
    size = max(3, int(round(p["pore_window_mm"] / min(spacing_mm))) | 1)
    out = np.zeros(dense.shape, bool)
    for z0, z1, lo, hi in _slabs(dense.shape[0], SLAB, size // 2):
        share = ndi.uniform_filter(cells[lo:hi].astype(np.float32), size=size)[z0 - lo : z1 - lo]
        out[z0:z1] = region[z0:z1] & (share > p["pore_fraction"])
    del cells, region
    out &= ~thick_parts(dense, spacing_mm, float(p["solid_mm"]))
    return out


def hysteresis3d(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    labels, count = ndi.label(low, structure=FULL)
    keep = np.zeros(count + 1, bool)
    for z0 in range(0, low.shape[0], SLAB):
        z = slice(z0, z0 + SLAB)
        keep[labels[z][high[z] & low[z]]] = True
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
    3. Seeds: thick structures are bone, and so are porous ones
       (:func:`porous_parts`); strongly tubular voxels away from thick bone are
       vessel. A watershed on the gradient magnitude assigns every dense
       voxel to one of them, so a vessel touching bone is cut where the
       intensity changes (or halfway, where it does not), whichever is brighter.
       Each connected vessel piece, seeded or reached by no seed, stays vessel
       only when tubular on average (``v_unassigned``); otherwise it is bone.
    4. Lumen contrast: each vessel piece's own (the 95th percentile of its
       seeds); the run's is their median weighted by seeds.
    5. Partial volume: vessel voxels keep ``fwhm`` of the local peak and
       ``lumen_fraction`` of the run's lumen contrast; specks under
       ``min_vessel_mm3`` go.

    Structures cut by the reconstruction circle or the volume's faces are
    continued beyond them for the shape analysis.
    """
    p = {**CLASSICAL_DEFAULTS, **(params or {})}
    field = reconstruction_field(hu)
    body = body_mask(hu)
    level, noise = soft_tissue_level(hu, body)
    # The shape analysis continues structures beyond the circle. That is done in
    # place (a copy is 0.5 GB at 512³) and undone before returning.
    hx = hu if hu.flags.writeable else hu.copy()
    # Outside the circle every voxel holds one padding value (reconstruction_field).
    padding = hx[0][~field][0] if not field.all() else None
    extend_beyond_field(hx, field)
    try:
        return _classical_labels(hx, body, field, level, noise, spacing_mm, p)
    finally:
        if padding is not None:
            for z0 in range(0, hx.shape[0], SLAB):
                hx[z0 : z0 + SLAB, ~field] = padding


def _classical_labels(
    hx: np.ndarray,
    body: np.ndarray,
    field: np.ndarray,
    level: float,
    noise: float,
    spacing_mm: tuple[float, float, float],
    p: Mapping[str, Any],
) -> np.ndarray:
    """The steps of :func:`classical_tissues` on the field-extended volume ``hx``.
    Volume-sized arrays are boolean or uint8 except the input; every float
    temporary is a slab's (see :data:`SLAB`)."""
    step = min(spacing_mm)
    # Inside the field the extension changes nothing: field & body stays the body.
    extend_beyond_field(body, field)
    dense = hysteresis3d(body & (hx > level + p["k_low"] * noise), hx > level + p["k_high"] * noise)
    if not dense.any():
        return np.full(hx.shape, CLASS_SOFT, np.uint8)
    scale, scales = p["k_sat"] * noise, tuple(p["scales_mm"])
    vessel_seed = np.zeros(hx.shape, bool)
    for z, values in _dense_chunks(dense, tubeness_in_slabs(hx, level, scale, dense, step, scales)):
        vessel_seed[z][dense[z]] = values > p["v_seed"]
    thick = thick_parts(dense, spacing_mm, p["thick_mm"])
    vessel_seed &= ~within(thick, p["seed_gap_mm"], spacing_mm)
    # Porous bone is bone too, except where a voxel is strongly tubular: a vessel
    # running through or along it keeps its seeds, and the watershed draws the line.
    thick |= porous_parts(dense, spacing_mm, p) & ~vessel_seed
    # Beyond the circle the volume is the continuation of its edge (extend_beyond_field):
    # an edge voxel's noise drawn out there is a tube to the Hessian, not a vessel.
    vessel_seed &= field[None]
    markers = np.zeros(hx.shape, np.uint8)
    markers[thick] = 2
    markers[vessel_seed] = 1
    del thick
    basins = _watershed_in_slabs(hx, markers, dense, spacing_mm, p["grad_mm"] / step)
    del markers
    vessel, bone = basins == 1, basins == 2
    rest = dense & (basins == 0)
    del basins
    # Every vessel piece, seeded or not, is vessel when tubular on average. The leftover
    # parts (dense, reached by no seed) need it; so do seeded ones: a few tubular
    # voxels in a thin skull-base bone (neither thick nor porous) seed the watershed,
    # which then fills the whole bone.
    pieces = vessel | rest
    del rest, dense
    lumen = float("nan")
    if pieces.any():
        parts, count = ndi.label(pieces, structure=FULL)
        sums = np.zeros(count + 1)
        sizes = np.zeros(count + 1, np.int64)
        # Tubeness once more, at these voxels only: holding it for every dense voxel
        # through the watershed would take up to 4 bytes a voxel of the volume.
        tube = tubeness_in_slabs(hx, level, scale, pieces, step, scales)
        for z, values in _dense_chunks(pieces, tube):
            of_part = parts[z][pieces[z]]
            sums += np.bincount(of_part, weights=values, minlength=count + 1)
            sizes += np.bincount(of_part, minlength=count + 1)
        tubular = sums > p["v_unassigned"] * np.maximum(sizes, 1)
        tubular[0] = False
        # The lumen contrast of the run: each tubular piece's own (the 95th percentile
        # of its seeds), their median weighted by seeds. Seeds pooled over all pieces
        # would not do: a few percent of them in bone specks found tubular put the
        # pooled 95th percentile at bone's density, and the partial-volume floor then
        # above a faint lumen (all of a 300 HU run's vessels lost). Pieces far brighter
        # than the median are not taken for bone: where iodine outshines bone and bone
        # holds most seeds, they are the vessels (docs/coronary_rotational.md).
        own, seeds = _piece_lumens(hx, parts, count, vessel_seed)
        own[~tubular] = np.nan
        lumen = _weighted_median(own, seeds)
        for z0 in range(0, hx.shape[0], SLAB):
            z = slice(z0, z0 + SLAB)
            is_tubular = tubular[parts[z]]
            vessel[z] = is_tubular
            bone[z] |= pieces[z] & ~is_tubular
        del parts, tube
    del pieces
    radius = max(1, int(round(p["local_mm"] / step)))
    del vessel_seed
    if not np.isfinite(lumen):
        lumen = float(hx.max())
    kept = np.zeros(hx.shape, bool)
    for z0, z1, lo, hi in _slabs(hx.shape[0], SLAB, radius):
        local_peak = ndi.maximum_filter(
            np.where(vessel[lo:hi], hx[lo:hi], -np.inf).astype(np.float32), size=2 * radius + 1
        )[z0 - lo : z1 - lo]
        floor = np.maximum(p["fwhm"] * (local_peak - level), p["lumen_fraction"] * (lumen - level))
        kept[z0:z1] = vessel[z0:z1] & (hx[z0:z1] >= level + floor)
    vessel = kept
    parts, count = ndi.label(vessel, structure=FULL)
    if count:
        # Measured inside the circle: the continuation beyond it is not measured data.
        volume_mm3 = label_sizes(parts, count, field) * float(np.prod(spacing_mm))
        keep = volume_mm3 >= p["min_vessel_mm3"]
        keep[0] = False
        vessel = keep[parts]
    del parts
    inside = field[None] & body
    labels = np.full(hx.shape, CLASS_SOFT, np.uint8)
    labels[bone & inside] = CLASS_BONE
    labels[vessel & inside] = CLASS_VESSEL
    return labels


def _piece_lumens(
    hx: np.ndarray, parts: np.ndarray, count: int, seeds: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(the 95th percentile of ``hx`` over each label's voxels of ``seeds``, NaN for a
    label without any; how many such voxels each label has), labels 0..count."""
    labels = np.concatenate(
        [parts[z0 : z0 + SLAB][seeds[z0 : z0 + SLAB]] for z0 in range(0, parts.shape[0], SLAB)]
    )
    values = np.concatenate(
        [hx[z0 : z0 + SLAB][seeds[z0 : z0 + SLAB]] for z0 in range(0, hx.shape[0], SLAB)]
    )
    out = np.full(count + 1, np.nan)
    seeds_of = np.zeros(count + 1, np.int64)
    if labels.size == 0:
        return out, seeds_of
    order = np.lexsort((values, labels))
    labels, values = labels[order], values[order]
    present, start, n = np.unique(labels, return_index=True, return_counts=True)
    # np.percentile's linear rule, between the two order statistics around it.
    at = 0.95 * (n - 1)
    below = np.floor(at).astype(np.int64)
    above = np.minimum(below + 1, n - 1)
    frac = at - below
    out[present] = values[start + below] * (1 - frac) + values[start + above] * frac
    seeds_of[present] = n
    return out, seeds_of


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    """Median of the finite ``values``, each counted ``weights`` times; NaN if none."""
    ok = np.isfinite(values) & (weights > 0)
    if not ok.any():
        return float("nan")
    v, w = values[ok], weights[ok].astype(np.float64)
    order = np.argsort(v)
    v, w = v[order], np.cumsum(w[order])
    return float(v[np.searchsorted(w, w[-1] / 2)])


def _dense_chunks(mask: np.ndarray, values: np.ndarray) -> Iterator[tuple[slice, np.ndarray]]:
    """(slab, the part of ``values`` at its voxels of ``mask``) for ``values`` given at
    the voxels of ``mask`` in C order, slab by slab."""
    start = 0
    for z0 in range(0, mask.shape[0], SLAB):
        z = slice(z0, z0 + SLAB)
        count = int(np.count_nonzero(mask[z]))
        yield z, values[start : start + count]
        start += count


def _watershed_in_slabs(
    hx: np.ndarray,
    markers: np.ndarray,
    dense: np.ndarray,
    spacing_mm: tuple[float, float, float],
    grad_sigma: float,
) -> np.ndarray:
    """Basins (0 unreached, else the marker) of a watershed on the gradient magnitude
    of ``hx`` from ``markers``, flooding only ``dense``.

    Slab by slab, each flooded with :data:`WATERSHED_CONTEXT_MM` of context: the
    watershed makes float64 copies of its input (16 bytes a voxel), which for a
    512³ head at once is over 2 GB. Flooding stays inside ``dense``, so only its
    bounding box is looked at; the gradient is computed with the Gaussian's reach
    around each piece, so it equals the whole volume's. The slabs are flooded as
    many at once as :data:`PARALLEL_BYTES` allows, always :data:`SLAB` thick: the
    flooding of a slab depends on its bounds."""
    basins = np.zeros(hx.shape, np.uint8)
    box = ndi.find_objects(dense.view(np.uint8))[0]
    reach = int(4.0 * grad_sigma + 0.5) + 1
    context = int(np.ceil(WATERSHED_CONTEXT_MM / spacing_mm[0]))
    (y0, y1), (x0, x1) = ((b.start, b.stop) for b in box[1:])
    gy0, gy1 = max(0, y0 - reach), min(hx.shape[1], y1 + reach)
    gx0, gx1 = max(0, x0 - reach), min(hx.shape[2], x1 + reach)
    zb = box[0]

    def one(z0: int, z1: int, lo: int, hi: int) -> None:
        z0, z1, lo, hi = (v + zb.start for v in (z0, z1, lo, hi))
        glo, ghi = max(0, lo - reach), min(hx.shape[0], hi + reach)
        gradient = ndi.gaussian_gradient_magnitude(hx[glo:ghi, gy0:gy1, gx0:gx1], grad_sigma)
        gradient = gradient[lo - glo : hi - glo, y0 - gy0 : y1 - gy0, x0 - gx0 : x1 - gx0]
        flooded = watershed(gradient, markers[lo:hi, y0:y1, x0:x1], mask=dense[lo:hi, y0:y1, x0:x1])
        basins[z0:z1, y0:y1, x0:x1] = flooded[z0 - lo : z1 - lo]

    threads = _threads((SLAB + 2 * (context + reach)) * (gy1 - gy0) * (gx1 - gx0) * WATERSHED_BYTES)
    _in_parallel(one, list(_slabs(zb.stop - zb.start, SLAB, context)), threads)
    return basins


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
    return np.where(vessel, hu, np.float32(AIR_HU)).astype(np.float32, copy=False)


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
        opts = checked(NAME, ctx.options)
        hu = run.pixels
        if not run.meta.is_volume or hu.ndim != 3:
            raise PipelineError(
                f"{NAME} needs a volume (Z, Y, X), got shape {hu.shape}"
                f"{'' if run.meta.is_volume else ' (a 2D run)'}"
            )
        if hu.shape[0] < SLICES:
            raise PipelineError(f"{NAME}: {hu.shape[0]} slices, at least {SLICES} needed")
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
            bias = class_bias(pkg.config)
            labels = classify_dense(model, hu, device, slab=opts.get("slab", 4), bias=bias)
            algorithm = pkg.algorithm("DLA voxel classifier", VERSION)
            notes.append(
                f"model {pkg.name} {pkg.version}, dense inference on {device.type}"
                + (
                    f"; class logit offsets (vessel, bone, soft tissue) {bias}"
                    if bias is not None
                    else ""
                )
            )
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
            quality=volume_quality(masks[0], masks[1], hu, spacing),
        )


@register(NAME)
def _factory() -> RotationalDLA:
    return RotationalDLA()
