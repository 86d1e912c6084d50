"""``xa_coronary``: per-frame vessel segmentation of coronary XA cine runs.

Coronary runs are unsubtracted (the heart moves, so no mask frame fits), so the
vessels must be separated from ribs, spine, diaphragm and catheter in every
frame. With a model package the 3D-2D CE-Net (``pipelines.models.cenet``) looks
at each frame with its 2N+1 neighbours; without one, the classical path runs:
a top-hat of every frame keeps what is thinner than the widest lumen (ribs,
spine, diaphragm and heart borders are wider, and their moving edges are steps,
not ridges), the top-hat's low percentile over the run takes away what is thin
in nearly every frame (ECG leads, wires, a catheter held still: not contrast),
multiscale Frangi finds tubular structures in what is left, and hysteresis
keeps weak vessel segments connected to strong ones; what it finds in the frames
before the contrast arrives is a device (a lead or wire that moves with breathing
escapes the percentile) and is taken out of every frame where the frame's shift
carries it (``remove_devices``), and so is what is thin in nearly every frame
once the frames are aligned by the chest's shift (``remove_chest_static``: ribs,
leads and wires that breathing or a table pan moves, in runs where the contrast
is there from the first frame too). Both paths then remove small
connected components in every frame (isolated specks are noise, not coronary
branches).

Both paths ignore what lies outside the collimated field (``pipelines.shutter``):
no path reports vessel outside it, and the classical path scales its response
by the vessels inside it. (A blade edge is a step, to which the top-hat does
not respond, and it is in every frame; the step it leaves in the local noise
estimate keeps the filter quiet along it.)

Outputs: a SEG on geometry ``frames`` (one mask per frame of the run) and a
cine overlay (Multi-frame True Color SC) that any viewer plays.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi
from skimage.filters import frangi
from skimage.registration import phase_cross_correlation

from pipelines.base import (
    BLOOD_VESSEL,
    AlgorithmInfo,
    PipelineContext,
    PipelineError,
    PipelineResult,
    RenderingOutput,
    Run,
    Segment,
    SegmentationOutput,
    register,
    require_2d_run,
)
from pipelines.models.cenet import ARCHITECTURE, STRIDE, frame_windows
from pipelines.models.package import ModelPackage, load_package
from pipelines.options import checked
from pipelines.preprocess import inference_device, inference_mode, resize, work_shape
from pipelines.render import AI_LABEL, burn_text, overlay
from pipelines.shutter import disk, exposed_field, restrict
from pipelines.vessel_quality import cine_quality
from pipelines.vessels import lumen_ring

NAME = "xa_coronary"
# 1.1.0: shutter ignored, noise floor inside the field; quality and verdict.
# 2.0.0: top-hat and its static part instead of the temporal median.
# 2.1.0: a blanked field found where burned-in text touches it.
# 2.1.1: a blanked field is one stored value through the run (air is not);
# circle peaks above half the strongest (the search took 35 s on noisy edges).
# 2.2.0: thin structures already there before the contrast arrives (ECG leads, sternal
# wires, clips, a guidewire, the catheter before it fills) are taken out of every frame,
# moved with the frame, except where something wider than them lies on them.
# 2.3.0: what is thin in nearly every frame once the frames are aligned by the chest's
# shift (breathing, a table pan) is taken out of the masks.
# 2.4.0: a wide vessel's blurred edge that is still lumen is added (lumen_ring).
# 2.5.0: a component whose lumen stands out nowhere by FAINT_SNR noise SDs is dropped.
# 2.6.0: the hysteresis seeds at 0.8 of the run's strong-vessel response, not 0.97.
VERSION = "2.6.0"
SEGMENT = Segment(label="Coronary vessels", code=BLOOD_VESSEL, color_rgb=(255, 60, 40))
# Connectivity within a frame only: components never join across frames.
IN_PLANE = np.zeros((3, 3, 3), bool)
IN_PLANE[1] = True

# Classical path, tuned on training phantom seeds only
# (python -m training tune-classical xa_coronary on a family A dataset).
FRANGI_SIGMAS_PX = (1.0, 1.5, 2.0, 3.0, 4.0)  # at 256 px across the field; scaled with size
FRANGI_GAMMA = 5.0  # structureness scale, in noise units (fixed, so frames compare)
# Hysteresis (low, high) as a fraction of the run's strong-vessel response. The high
# value seeds: 0.97 (tuned on training seeds) left whole frames with contrast empty where
# a catheter or a device set the run's scale; 0.8 chosen on randomised family A
# development seeds 950000-950019 (0.97, 0.9, 0.8, 0.7, 0.6, 0.5: mean IoU 0.392, 0.394,
# 0.396, 0.395, 0.394, 0.379; family A development runs 0.618 -> 0.631 at 0.8).
HYSTERESIS = (0.005, 0.8)
LUMEN_SNR = 0.5  # a vessel pixel is darker than its surroundings by this many noise SDs
# Top-hat width at 256 px across (scaled with size): wider than the widest lumen there,
# narrower than a rib. Developed on randomised family A seeds 950000-950019.
TOPHAT_PX = 9
# What is thin in more than this share of the frames at a pixel is not contrast.
STATIC_PERCENTILE = 10.0
# The chest's shift between frames (chest_shifts): phase correlation of the edges of the
# wide anatomy (a difference of Gaussians of CHEST_BAND_PX SDs), windowed
# SHIFT_MARGIN_PX inside the collimated field, both at 256 px across. Each part of a
# frame's shift is kept only where it leaves the squared difference of those edges
# from the reference frame's under CHEST_ACCEPT of what it is without it. A mask pixel
# where the static part (chest_static) is over CHEST_STATIC_SHARE of what is thin there
# is not contrast (chest_static_pixels, remove_chest_static). Developed on randomised family A seeds
# 950000-950019 (mean IoU 0.341 -> 0.361; a share of 0.5 gave 0.369 but took 6,170 true
# vessel pixels from 950008, a panned run with a guidewire in its artery).
CHEST_BAND_PX = (1.0, 8.0)
SHIFT_MARGIN_PX = 8
CHEST_ACCEPT = 0.8
CHEST_STATIC_SHARE = 0.7
# Devices: the frames before the contrast are those before the vessel count first
# rises by ARRIVAL_RISE of its range (see pre_contrast_frames). What is found in each
# of them is a device, taken out of every frame within DEVICE_TOLERANCE_PX (at 256 px
# across) of where the frame's content has moved. Developed on randomised family A
# seeds 950000-950019.
ARRIVAL_RISE = 0.25
PRE_CONTRAST_RISE = 1.5
MIN_PRE_CONTRAST = 2
PRE_CONTRAST_TREND = 1.25
DEVICE_TOLERANCE_PX = 3
# A wide vessel's edge (pipelines.vessels.lumen_ring): the pixel beside the mask is
# lumen where its lumen SNR is at least EDGE_FRACTION of the brightest vessel pixel
# beside it and EDGE_SNR noise SDs, beside a vessel whose core lies EDGE_CORE_PX
# inside its mask (the DSA paths' fraction and core, with this path's own noise
# floor). Developed on randomised family A seeds 950000-950019.
EDGE_FRACTION = 0.4
EDGE_CORE_PX = 2.0
EDGE_SNR = 3.0
# A kept component's lumen SNR reaches FAINT_SNR somewhere (remove_faint_components):
# the hysteresis is relative to the run's strongest response, so in a run whose
# vessels are faint the noise of its darkest, least exposed region (heart, spine,
# diaphragm) seeds a mesh. Developed on randomised family A seeds 950000-950019: mean
# IoU 0.381 -> 0.392 (6, 8, 10, 12: 0.390, 0.392, 0.393, 0.390; 8 takes fewer true
# pixels from the runs it lowers than 10).
FAINT_SNR = 8.0


def min_component_px(shape: tuple[int, int]) -> int:
    """Smallest kept component: 1/5000 of the frame (52 px at 512 x 512)."""
    return max(4, int(round(shape[0] * shape[1] / 5000)))


def normalise_cine(frames: np.ndarray) -> np.ndarray:
    """Contrast of an unsubtracted run: positive where darker than the frame median.

    Per-frame medians absorb exposure changes; one robust spread for the whole
    run cancels dose and detector gain while keeping frame-to-frame contrast.
    """
    if frames.ndim != 3:
        raise PipelineError(f"expected (T, H, W) frames, got shape {frames.shape}")
    x = frames.astype(np.float32, copy=False)
    step = max(1, min(x.shape[1], x.shape[2]) // 128)
    sample = x[:, ::step, ::step].reshape(x.shape[0], -1)
    median = np.median(sample, axis=1).astype(np.float32)
    centred = median[:, None] - sample
    lo, hi = np.percentile(centred, [1.0, 99.0])
    scale = float(hi - lo) / 4.0
    if not np.isfinite(scale) or scale <= 0:
        raise PipelineError("run has no contrast (flat frames)")
    return np.clip((median[:, None, None] - x) / scale, -6.0, 6.0).astype(np.float32)


def remove_small_components(masks: np.ndarray, min_px: int) -> np.ndarray:
    """Drop 8-connected components smaller than ``min_px`` in every frame of (T, H, W)."""
    labels, count = ndi.label(masks, structure=IN_PLANE)
    if count == 0:
        return masks.astype(bool)
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_px
    keep[0] = False
    return keep[labels]


def components_reaching(masks: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """The 8-connected components of every frame of ``masks`` (T, H, W) that hold a
    pixel of ``seeds`` (T, H, W)."""
    labels, count = ndi.label(masks, structure=IN_PLANE)
    if count == 0:
        return np.zeros(masks.shape, bool)
    keep = np.zeros(count + 1, bool)
    keep[np.unique(labels[seeds])] = True
    keep[0] = False
    return keep[labels]


def remove_faint_components(masks: np.ndarray, snr: np.ndarray, min_snr: float) -> np.ndarray:
    """Drop the components of every frame of ``masks`` (T, H, W) whose lumen SNR
    (``snr``, noise SDs) stays under ``min_snr`` throughout: a vessel stands out of the
    noise along its course, a network of noise ridges nowhere far."""
    return components_reaching(masks, snr >= min_snr)


def hysteresis(response: np.ndarray, low: float, high: float) -> np.ndarray:
    """Per-frame hysteresis: components above ``low`` that reach ``high`` somewhere."""
    return components_reaching(response > low, response > high)


def noise_sd(x: np.ndarray, scale: float, field: np.ndarray | None = None) -> np.ndarray:
    """Local quantum-noise SD (H, W) of normalised frames: dark, dense regions (heart,
    diaphragm) get few photons and are much noisier than the lung field.

    The floor (the quietest 5 % of the field) is taken inside the collimated
    ``field`` (non-empty) when one is given: vendors blank the area behind the blades to a
    constant, whose zero variance would otherwise make the floor zero and the
    noise-normalised residual infinite.
    """
    detail = x - ndi.gaussian_filter(x, (0, scale, scale))
    var = ndi.gaussian_filter(np.median(detail**2, axis=0), 8 * scale)
    inside = var if field is None else var[field]
    floor = float(np.percentile(inside, 5))
    if not floor > 0:  # a flat run: no noise to measure, so no residual stands out
        floor = float(np.finfo(np.float32).tiny)
    return np.sqrt(np.maximum(var, floor)).astype(np.float32)


def classical_response(
    cine: np.ndarray, field: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Frangi vesselness (scaled to the run's strong vessels) and lumen SNR, both (T, H, W),
    of ``cine``, the run as :func:`normalise_cine` gives it; and where the top-hat is
    static in the chest's frame of reference (:func:`chest_static_pixels`, None when
    the chest holds still), for :func:`remove_chest_static`.

    A grey opening of each frame with a ``TOPHAT_PX`` square holds what is wider
    than a lumen (ribs, spine, heart and diaphragm, and their moving edges); what is
    darker than it (the top-hat), in units of the local noise, is thin: filled
    vessel, device or noise. Its ``STATIC_PERCENTILE`` over the run at each pixel
    is what is thin there in nearly every frame (leads, wires, a still catheter)
    and is taken away. (The run's temporal median, used before, left every edge
    that moved with breathing or the heart as a ridge, and lost vessels that
    stayed filled in the same place for half the run.) Frangi with a fixed
    structureness scale keeps responses comparable between frames (frames before
    the contrast arrives stay empty); the response is scaled by its 99.9th
    percentile over the run
    (within the collimated ``field`` when one is given: the blanked area behind
    the blades would otherwise lower the scale; the noise floor is taken there
    too, and the residual behind the blades is zero).
    """
    x = cine
    if field is not None and not field.any():
        field = None
    scale = max(1.0, min(x.shape[1:]) / 256.0)  # small images: treat as crops
    # x is positive where darker than the frame median, so vessels are ridges here.
    k = int(round(TOPHAT_PX * scale)) | 1
    wide = ndi.grey_opening(x, size=(1, k, k))
    thin = (x - wide) / noise_sd(x, scale, field)
    chest = chest_static_pixels(wide, thin, field, scale)
    del wide
    residual = thin - np.percentile(thin, STATIC_PERCENTILE, axis=0, keepdims=True)
    del thin
    if field is not None:
        residual[:, ~field] = 0.0  # behind the blades nothing can fill
    sigmas = [s * scale for s in FRANGI_SIGMAS_PX]
    vesselness = np.stack(
        [
            frangi(frame, sigmas=sigmas, black_ridges=False, gamma=FRANGI_GAMMA, mode="reflect")
            for frame in residual
        ]
    ).astype(np.float32)
    inside = vesselness if field is None else vesselness[:, field]
    ref = float(np.percentile(inside, 99.9))
    snr = ndi.gaussian_filter(residual, (0, 0.7 * scale, 0.7 * scale))
    return (vesselness / ref if ref > 0 else vesselness), snr, chest


def chest_shifts(wide: np.ndarray, field: np.ndarray | None, scale: float) -> np.ndarray:
    """(T, 2) shift (rows, columns) that brings each frame's chest onto the middle
    frame's, zero where none does.

    ``wide`` is the grey opening of the frames: what is wider than a lumen (ribs,
    spine, diaphragm, heart), so no vessel, wire or lead (a vessel wider than the
    top-hat is in it, and can draw the shift; the path does not find such a vessel
    either). Its edges, band-passed by a difference of Gaussians (``CHEST_BAND_PX``:
    rib edges, not the range compression's slow shading), are windowed smoothly to
    zero at the frame's edges and ``SHIFT_MARGIN_PX`` inside the collimated field
    (the blades do not move and would pull every shift to none). Each frame's shift
    is found by phase correlation, then taken apart along the principal directions
    of the reference's edges; each part is refined to the least squared difference
    and kept only where it brings the frame's edges closer to the reference's, by
    ``CHEST_ACCEPT`` of the squared difference without it: where the heart, not the
    chest, moves the edges, or nothing moves, the shift is noise and would carry a
    vessel filled through the run into the static part."""
    step = int(scale)
    if step > 1:  # the chest's motion is coarse: found at about 256 px across
        t, h, w = wide.shape
        h, w = h // step * step, w // step * step
        small = wide[:, :h, :w].reshape(t, h // step, step, w // step, step).mean(axis=(2, 4))
        small_field = None if field is None else field[:h:step, :w:step]
        return step * chest_shifts(small, small_field, scale / step)
    lo, hi = (b * scale for b in CHEST_BAND_PX)
    edges = ndi.gaussian_filter(wide, (0, lo, lo)) - ndi.gaussian_filter(wide, (0, hi, hi))
    t, h, w = edges.shape
    window = np.outer(np.hanning(h), np.hanning(w))
    if field is not None:
        margin = SHIFT_MARGIN_PX * scale
        inner = ndi.binary_erosion(field, iterations=int(round(margin)))
        inner = inner if inner.any() else field
        window *= ndi.gaussian_filter(inner.astype(np.float64), margin / 2)
    reference = edges[t // 2]
    spectrum = np.fft.fft2(reference * window)  # what phase_cross_correlation computes per call
    # Each shift is taken apart along the principal directions of the reference's edges
    # (its structure tensor), and each part is kept only where it brings the frame's
    # edges closer to the reference's by itself: along a direction with next to no
    # edges (bands all one way) the correlation has a ridge, not a peak, and its
    # maximum there is noise.
    gy, gx = np.gradient(reference * window)
    tensor = np.array([[(gy * gy).sum(), (gy * gx).sum()], [(gy * gx).sum(), (gx * gx).sum()]])
    directions = np.linalg.eigh(tensor)[1].T[::-1]

    def error(frame: np.ndarray, shift: np.ndarray) -> float:
        moved = frame if not shift.any() else ndi.shift(frame, shift, order=1, mode="nearest")
        return float((((moved - reference) * window) ** 2).sum())

    shifts = np.zeros((t, 2))
    for k in range(t):
        shift = phase_cross_correlation(
            spectrum,
            np.fft.fft2(edges[k] * window),
            upsample_factor=4,
            space="fourier",
            normalization=None,
        )[0]
        for v in directions:  # the direction with the most edge energy first
            # The correlation of windowed frames is drawn towards no shift: the part is
            # refined to the least squared difference (a parabola through three points
            # half a pixel apart, twice).
            a = float(shift @ v)
            for _ in range(2):
                e = [error(edges[k], shifts[k] + (a + d) * v) for d in (-0.5, 0.0, 0.5)]
                curve = e[0] - 2 * e[1] + e[2]
                if curve > 0:
                    a += float(np.clip(0.25 * (e[0] - e[2]) / curve, -0.5, 0.5))
            before = error(edges[k], shifts[k])
            if abs(a) >= 0.5 and error(edges[k], shifts[k] + a * v) < CHEST_ACCEPT * before:
                shifts[k] += a * v
    return shifts


def chest_static(thin: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """(H, W) what is thin in nearly every frame (``STATIC_PERCENTILE`` of ``thin`` over
    the run) in the chest's frame of reference: the frames aligned by ``shifts`` (from
    :func:`chest_shifts`) onto the middle frame. Ribs' edges, ECG leads, sternal wires
    and clips that breathing or a pan moves are static there; a vessel fills for part
    of the run and moves with the heart, so it is not."""
    aligned = np.stack(
        [ndi.shift(f, s, order=1, mode="nearest") for f, s in zip(thin, shifts, strict=True)]
    )
    chest = np.percentile(aligned, STATIC_PERCENTILE, axis=0).astype(np.float32)
    del aligned
    # Widened by a pixel each way: a shift a quarter pixel off leaves no ridge at its side.
    return ndi.grey_dilation(chest, size=(3, 3))


def chest_static_pixels(
    wide: np.ndarray, thin: np.ndarray, field: np.ndarray | None, scale: float
) -> np.ndarray | None:
    """(T, H, W) where what is thin (``thin``, the top-hat in noise units; ``wide``, the
    grey opening it was taken from) is over ``CHEST_STATIC_SHARE`` static in the
    chest's frame of reference: :func:`chest_static` carried back to each frame by its
    :func:`chest_shifts`. None when the chest holds still. It depends on the run only,
    so tuning the thresholds does not compute it again."""
    shifts = chest_shifts(wide, field, scale)
    if not np.abs(shifts).max() >= 0.5:
        return None
    chest = chest_static(thin, shifts)
    static = np.empty(thin.shape, bool)
    for t in range(thin.shape[0]):  # carried back to where it lies in each frame
        there = ndi.shift(chest, -shifts[t], order=1, mode="nearest")
        static[t] = there > CHEST_STATIC_SHARE * thin[t]
    return static


def remove_chest_static(masks: np.ndarray, chest: np.ndarray | None) -> np.ndarray:
    """``masks`` without what is static once the frames are aligned by the chest's
    shift (``chest``, from :func:`chest_static_pixels`; None keeps the masks).

    The static part of :func:`classical_response` holds still in the detector's frame
    only: ribs' cortical edges, ECG leads and sternal wires that breathing or a table
    pan moves escape it, and :func:`remove_devices` takes them out only where frames
    before the contrast show them. A mask pixel where the static part in the chest's
    frame is over ``CHEST_STATIC_SHARE`` of what is thin is taken out, except what is
    wider than that static structure there (as in :func:`remove_devices`)."""
    if chest is None:
        return masks
    static = masks & chest
    if not static.any():
        return masks
    # As for devices, what is wider than the static structure is kept where it lies on
    # it: a vessel filled around its guidewire, a vessel crossing a lead.
    # Its width: the 90th percentile of the distance to its edge, over a dozen frames.
    frames = np.flatnonzero(static.any(axis=(1, 2)))
    sample = np.concatenate(
        [
            ndi.distance_transform_edt(static[t])[static[t]]
            for t in frames[:: max(1, len(frames) // 12)]
        ]
    )
    footprint = _width_footprint(sample)
    out = masks.copy()
    for t in frames:
        out[t] = _without(masks[t], static[t], footprint)
    return out


def _width_footprint(distances: np.ndarray) -> np.ndarray:
    """A disk wider than a structure whose pixels lie ``distances`` from its edge (the
    90th percentile, plus one)."""
    return disk(1 + int(np.percentile(distances, 90)))


def _without(mask: np.ndarray, structure: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """``mask`` without ``structure``, except where the mask is wider than
    ``footprint`` (it survives an opening by it): a vessel filled around a guidewire,
    or crossing a lead, stays; a thinner one crossing it loses those pixels only."""
    return mask & ~(structure & ~ndi.binary_opening(mask, structure=footprint))


def pre_contrast_frames(masks: np.ndarray) -> int:
    """How many frames the run starts with before the contrast arrives: those before
    the count of vessel pixels first rises by ``ARRIVAL_RISE`` of its range. 0 when
    the count does not rise to ``PRE_CONTRAST_RISE`` times its first (plus one
    smallest kept component), when fewer than ``MIN_PRE_CONTRAST`` frames come
    before the rise, or when the count already grows through them (the second half
    above ``PRE_CONTRAST_TREND`` times the first, medians): contrast from the first
    frame on, or none at all."""
    counts = masks.reshape(masks.shape[0], -1).sum(axis=1).astype(np.float64)
    first, top = float(counts[0]), float(counts.max())
    if top < PRE_CONTRAST_RISE * first + min_component_px(masks.shape[1:]):
        return 0
    k = int(np.argmax(counts > first + ARRIVAL_RISE * (top - first)))
    if k < MIN_PRE_CONTRAST:
        return 0
    # A run filling from its first frame on rises through these frames too; devices stay.
    early, late = np.median(counts[: k // 2]), np.median(counts[k // 2 : k])
    return k if late <= PRE_CONTRAST_TREND * early else 0


def remove_devices(masks: np.ndarray, cine: np.ndarray) -> np.ndarray:
    """``masks`` without what was already there before the contrast arrived (``cine``:
    the run as :func:`normalise_cine` gives it).

    A thin structure found in every frame before the contrast (``pre_contrast_frames``)
    is a device: an ECG lead, a sternal wire, a clip, the catheter before it fills.
    The static rule of :func:`classical_response` misses them when breathing or a
    table pan moves them. Each frame's shift from the last of those frames (phase
    correlation of the whole frame: ribs, spine and devices move together) carries
    them to where they are in it, and they are taken out within
    ``DEVICE_TOLERANCE_PX``, except what is wider than the device there (an opening
    of the frame's mask by a disk wider than the device): a vessel filled around its
    guidewire, or crossing a lead, stays; a thinner one crossing it loses those
    pixels only."""
    k = pre_contrast_frames(masks)
    if k == 0:
        return masks
    pre = masks[:k]
    device = pre[0] if k == 1 else np.logical_and.reduce([ndi.binary_dilation(m) for m in pre])
    device = device & pre[-1]
    if not device.any():
        return masks
    scale = max(1.0, min(cine.shape[1:]) / 256.0)
    tolerance = max(1, int(round(DEVICE_TOLERANCE_PX * scale)))
    template = device.astype(np.float32)
    # What is wider than the device is kept where it lies on it: a vessel filled around
    # its guidewire, a vessel crossing a lead.
    footprint = _width_footprint(ndi.distance_transform_edt(device)[device])
    reference = np.fft.fft2(cine[k - 1])  # what phase_cross_correlation computes per call
    out = masks.copy()
    for t in range(masks.shape[0]):
        moving = np.fft.fft2(cine[t])
        shift = phase_cross_correlation(reference, moving, space="fourier", normalization=None)[0]
        there = ndi.binary_dilation(
            ndi.shift(template, -shift, order=0) > 0.5, iterations=tolerance
        )
        out[t] = _without(masks[t], there, footprint)
    return out


def classical_vessels(
    frames: np.ndarray,
    thresholds: tuple[float, float] = HYSTERESIS,
    lumen_snr: float = LUMEN_SNR,
    field: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-hat + multiscale Frangi + hysteresis, devices and what moves with the chest
    taken out; returns (masks, response).

    Hysteresis grows from the strongest vessels along weaker ones; pixels must
    also be darker than their surroundings by ``lumen_snr`` noise SDs, which
    trims Frangi's blur at the vessel edges. ``field`` (H, W), when given, is the
    collimated field: nothing outside it is a vessel. What is there before the
    contrast arrives is a device (:func:`remove_devices`), and what is static once the
    frames are aligned by the chest's shift is not contrast
    (:func:`remove_chest_static`); nor is a component whose lumen stands out nowhere by
    ``FAINT_SNR`` noise SDs (:func:`remove_faint_components`). Then the one-pixel ring
    of a wide vessel's edge that is still lumen is added
    (:func:`pipelines.vessels.lumen_ring`): Frangi answers that blurred edge weakly,
    and hysteresis leaves it out.
    """
    cine = normalise_cine(frames)
    response, snr, chest = classical_response(cine, field)
    return vessels_from(response, snr, cine, thresholds, lumen_snr, field, chest), response


def vessels_from(
    response: np.ndarray,
    snr: np.ndarray,
    cine: np.ndarray,
    thresholds: tuple[float, float] = HYSTERESIS,
    lumen_snr: float = LUMEN_SNR,
    field: np.ndarray | None = None,
    chest: np.ndarray | None = None,
) -> np.ndarray:
    """The vessel masks of :func:`classical_vessels` from the run's response, lumen SNR
    and chest-static pixels (:func:`classical_response`) and its ``cine``: hysteresis,
    the lumen rule, the field, devices (:func:`remove_devices`), what moves with the
    chest (:func:`remove_chest_static`) and faint components
    (:func:`remove_faint_components`) taken out, a wide vessel's edge added
    (``EDGE_*``). ``tune-classical`` scores its thresholds through this."""
    masks = hysteresis(response, *thresholds) & (snr > lumen_snr)
    masks = masks if field is None else masks & field
    masks = remove_chest_static(remove_devices(masks, cine), chest)
    # After the devices are out: what they leave of a component is judged on its own.
    masks = remove_faint_components(masks, snr, FAINT_SNR)
    return np.stack(
        [
            lumen_ring(mask, lumen, lumen > EDGE_SNR, EDGE_FRACTION, EDGE_CORE_PX, field)
            for mask, lumen in zip(masks, snr, strict=True)
        ]
    )


def _pad_to_stride(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    h, w = x.shape[-2:]
    ph, pw = (-h) % STRIDE, (-w) % STRIDE
    if ph or pw:
        mode = "reflect" if ph < h and pw < w else "replicate"
        x = F.pad(x[None], (0, pw, 0, ph), mode=mode)[0]
    return x, (h, w)


def predict_probabilities(
    model: torch.nn.Module,
    frames: np.ndarray,
    neighbours: int,
    device: torch.device,
    batch: int = 4,
) -> np.ndarray:
    """Vessel probability for every frame; (T, H, W) normalised frames in, (T, H, W) out."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).to(device)
    x, (h, w) = _pad_to_stride(x)
    out = torch.empty((x.shape[0], h, w), dtype=torch.float32)
    with inference_mode(device):
        for start in range(0, x.shape[0], batch):
            idx = torch.arange(start, min(start + batch, x.shape[0]))
            logits = model(frame_windows(x, neighbours, idx))
            out[idx] = torch.sigmoid(logits.float())[:, 0, :h, :w].cpu()
    return out.numpy()


def model_vessels(
    pkg: ModelPackage,
    frames: np.ndarray,
    spacing: tuple[float, float] | None,
    device: torch.device,
    threshold: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Run a CE-Net package on the working grid; returns (masks, probabilities) natively."""
    if pkg.architecture != ARCHITECTURE:
        raise PipelineError(
            f"model package {pkg.name} has architecture {pkg.architecture!r}; "
            f"{NAME} needs {ARCHITECTURE!r}"
        )
    cfg = pkg.config
    model = pkg.load_model(device)
    x = normalise_cine(frames)
    native = x.shape[1:]
    grid = work_shape(
        native, spacing, cfg.get("work_spacing_mm"), max_side=int(cfg.get("max_side", 512))
    )
    x_work = resize(torch.from_numpy(x), grid).numpy()
    probs = predict_probabilities(model, x_work, int(cfg.get("neighbours", 1)), device)
    probs = resize(torch.from_numpy(probs), native).numpy()
    return probs > threshold, probs


def render_cine(frames: np.ndarray, masks: np.ndarray, algorithm: AlgorithmInfo) -> np.ndarray:
    """Grey frames with the vessel masks blended in red, labelled as AI output, (T, H, W, 3)."""
    sample = frames[:: max(1, frames.shape[0] // 8)]
    lo, hi = np.percentile(sample, [0.5, 99.5])
    grey = np.clip((frames - lo) / max(float(hi - lo), 1e-6), 0, 1)
    rgb = np.repeat((grey * 255).astype(np.uint8)[..., None], 3, axis=-1)
    out = np.empty_like(rgb)
    text = [AI_LABEL, f"Coronary vessels: {algorithm.describe()}"]
    for t in range(frames.shape[0]):  # frame loop for the text burn-in only
        out[t] = burn_text(
            overlay(rgb[t], [masks[t]], [SEGMENT.color_rgb]),
            text + [f"frame {t + 1}/{frames.shape[0]}"],
            corner="bottom-left",
        )
    return out


class CoronarySegmentation:
    name = NAME

    def __call__(self, run: Run, ctx: PipelineContext) -> PipelineResult:
        opts = checked(NAME, ctx.options)
        require_2d_run(run, NAME, 1)
        frames = run.pixels
        notes: list[str] = []
        field = exposed_field(frames, run.meta)
        if field.collimated:
            notes.append(field.describe())
        if ctx.model_package:
            pkg = load_package(ctx.model_package, pipeline=NAME)
            device = inference_device(ctx.device)
            threshold = opts.get("threshold", float(pkg.config.get("threshold", 0.5)))
            masks, _ = model_vessels(pkg, frames, run.meta.pixel_spacing_mm, device, threshold)
            algorithm = pkg.algorithm("3D-2D CE-Net", VERSION)
            notes.append(
                f"model {pkg.name} {pkg.version} (N={pkg.config.get('neighbours', 1)}) "
                f"on {device.type}"
            )
        else:
            masks, _ = classical_vessels(frames, field=field.mask if field.collimated else None)
            algorithm = AlgorithmInfo("Frangi + top-hat + hysteresis", VERSION, "classical")
            notes.append("no model package configured: classical Frangi path")
        if run.meta.subtracted:
            notes.append("run is subtracted; the pipeline expects unsubtracted coronary cine")
        min_px = opts.get("min_component_px", min_component_px(frames.shape[1:]))
        masks = remove_small_components(restrict(masks, field), min_px)
        fraction = float(masks.mean())
        notes.append(f"vessel fraction {fraction:.3%} over {frames.shape[0]} frames")
        if fraction == 0:
            notes.append("no vessels found in any frame")
        return PipelineResult(
            outputs=[
                SegmentationOutput(
                    key="vessels",
                    masks=masks[None],
                    segments=[SEGMENT],
                    algorithm=algorithm,
                    geometry="frames",
                    description="Coronary vessels per frame",
                ),
                RenderingOutput(
                    key="cine",
                    rgb=render_cine(frames, masks, algorithm),
                    description="Coronary vessels cine overlay",
                ),
            ],
            notes=notes,
            quality=cine_quality(frames, masks, field, run.meta.frame_times_s),
        )


@register(NAME)
def _factory() -> CoronarySegmentation:
    return CoronarySegmentation()
