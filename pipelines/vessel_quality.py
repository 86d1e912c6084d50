"""Quality measures of vessel segmentations (2D DSA, coronary cine, 3D), with the
bounds a plausible result lies in and why. See ``docs/quality.md``.

Every bound here follows from the physics of the acquisition or the anatomy,
never from one phantom family's numbers: a vessel tree is connected, covers a
few per cent of a projection, does not care where the collimator blades are,
and iodine only ever darkens a log-subtracted frame. Family B phantoms
(``training/phantoms/family_b``) played no part in choosing any of them.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from pipelines.base import Code
from pipelines.quality import RATIO, Check, Quality, Verdict, assess, measure
from pipelines.shutter import Field, margin_px

FRAMES = Code("{frames}", "UCUM", "frames")

# -- vessel fraction (% of the exposed field marked as vessel) -----------------
# One major vessel (3 mm wide) across a third of a 200 mm field already covers
# 3 * 67 / 200^2 = 0.5 % of it; below a fifth of that the segmentation has
# found next to nothing of the tree the injection filled.
MIN_VESSEL_PERCENT = 0.1
# In projection the densest arterial tree (lateral ICA injection, all phases
# overlaid) covers about a quarter of the field; more than 40 % marks background
# as vessel, more than 60 % is background with some vessels in it.
MAX_VESSEL_PERCENT = 40.0
FAILED_VESSEL_PERCENT = 60.0

# -- connectivity ---------------------------------------------------------------
# A vessel tree filled from one injection is connected in projection; thin
# branches below the resolution and vessels that leave and re-enter the field
# break it into a few pieces, never into hundreds. When less than half of the
# mask lies in its ten largest pieces, the mask is mostly specks: noise,
# texture or bone edges, not a tree.
LARGEST_PIECES = 10
MIN_LARGEST_SHARE = 50.0

# -- the field's edge -------------------------------------------------------------
# Vessels cross the edge of the field (image border or collimator blades) no
# more and no less often than any other line of the same length: the mask's
# density in a band along the edge should match its density inside. A density
# three times higher is the edge itself marked as vessel (the blade's
# penumbra, an uncorrected border), which anatomy does not explain.
MAX_EDGE_EXCESS = 3.0

# -- frames with no signal ------------------------------------------------------
# Quantum noise makes every exposed pixel change from frame to frame by much
# more than one stored value (noise SD of many grey levels at DSA and cine
# doses). Pixels inside the field that keep one value through the whole run are
# clipped (a saturated or blanked detector): vessels there cannot be seen.
MAX_FLAT_PERCENT = 5.0

# -- contrast over time (DSA) ----------------------------------------------------
# The passage of a bolus through the cerebral vessels (arterial to venous phase)
# lasts 6-10 s and its vessel-mean opacity stays above half its peak for at
# least 3 s: at any DSA rate (0.5 fps or faster) that spans two frames or more.
MIN_CONTRAST_FRAMES = 2

# -- misregistration (subtracted runs) ---------------------------------------------
# Iodine only attenuates: in a log-subtracted run every true signal is darker than
# the mask. Structures brighter than the mask come from motion between mask and
# fill, whose edges subtract into a bright and a dark fringe of similar strength.
# When the bright signal reaches 30 % of the dark one, motion makes up a large
# part of what the segmentation saw. "Beyond noise" is beyond 5 local noise SDs:
# quantum noise is larger where the patient is dense.
BRIGHT_NOISE_SDS = 5.0
MAX_BRIGHT_RATIO = 0.3

# -- artery/vein split (classical DSA paths) --------------------------------------
# The split rests on timing: arteries fill before veins. Where the artery and vein
# labels overlap in time (pipelines.vessels.timing_overlap) the split is uncertain.
# On 28 randomised family A development runs (seeds 940000-940027) the overlap ranked
# with the split's accuracy (Spearman -0.51 against M-Dice); above 20 % it marked 7
# runs with mean M-Dice 0.50, against 0.60 for the other 21.
MAX_TIMING_OVERLAP = 20.0

# -- temporal consistency (cine) -------------------------------------------------
# At cine rates (7.5-30 fps, 33-133 ms a frame) the filled coronary tree changes
# little between neighbouring frames: contrast fills and washes out over about a
# second and the heart moves vessels, it does not remove them. Overlap of the
# vessel area of neighbouring frames (sum of min / sum of max) below 50 % means
# vessels appear and vanish from frame to frame.
MIN_AREA_CONSISTENCY = 50.0
# Slower runs (a frame longer than this) are not held to it.
MAX_CINE_FRAME_S = 0.25

# -- 3D (rotational DLA) -----------------------------------------------------------
# In a head volume the skull holds far more tissue than the vessels: intracranial
# arteries and veins fill tens of ml, the skull in the same field hundreds.
# A vessel volume above the bone volume is bone (or soft tissue) called vessel;
# below 1/500 of it, next to no vessel was found (contrast missing, or vessels
# called bone).
MAX_VESSEL_BONE_RATIO = 1.0
MIN_VESSEL_BONE_RATIO = 0.002
# The 3D tree from one injection is connected; both carotid and the basilar
# territories can be separate pieces when the circle of Willis is incomplete.
VOLUME_LARGEST_PIECES = 3
MIN_VOLUME_LARGEST_SHARE = 50.0
# Vessels run through soft tissue (brain, cisterns, the neck); only short stretches
# (the carotid canal, the cavernous sinus) lie against bone. Septa of a porous skull
# base or the rim of the skull called vessel lie in bone and air cells. On 28
# randomised family A development volumes (seeds 962000-965003, 210-3000 HU, 192^3,
# porous and solid skull base) the classical path's 23 outputs with vessel Dice >=
# 0.24 had 71-99 % soft tissue within 1 mm of their vessels, the five with Dice <= 0.1
# 28-50 %.
VESSEL_SHELL_MM = 1.0
SOFT_TISSUE_MIN_HU = -300.0  # above air and air cells, below fat
MIN_VESSEL_SOFT_PERCENT = 60.0


def _count(masks: np.ndarray, where: np.ndarray) -> int:
    """Set pixels of (H, W) or every frame of (T, H, W) ``masks`` inside ``where``, a
    frame at a time (no (T, H, W) temporary)."""
    frames = masks.reshape(-1, *masks.shape[-2:])
    return sum(int(np.count_nonzero(frame & where)) for frame in frames)


def vessel_fraction(masks: np.ndarray, field: np.ndarray) -> float:
    """Per cent of the field (every frame of (T, H, W), or one (H, W)) marked vessel."""
    frames = masks.size // max(field.size, 1)
    area = int(field.sum()) * frames
    return 100.0 * _count(masks, field) / area if area else float("nan")


def largest_share(mask: np.ndarray, pieces: int, structure: np.ndarray | None = None) -> float:
    """Per cent of ``mask`` in its ``pieces`` largest connected components (per frame
    when ``structure`` keeps components in-plane)."""
    labels, count = ndi.label(mask, structure=structure)
    if count == 0:
        return float("nan")
    sizes = np.bincount(labels.ravel())[1:]
    return 100.0 * float(np.sort(sizes)[::-1][:pieces].sum()) / float(sizes.sum())


def _per_frame_largest(masks: np.ndarray) -> float:
    """Largest-pieces share pooled over frames: pixels in each frame's ten largest pieces."""
    kept = total = 0
    for frame in masks:
        labels, count = ndi.label(frame, structure=np.ones((3, 3), bool))
        if count == 0:
            continue
        sizes = np.sort(np.bincount(labels.ravel())[1:])[::-1]
        kept += int(sizes[:LARGEST_PIECES].sum())
        total += int(sizes.sum())
    return 100.0 * kept / total if total else float("nan")


def edge_band(field: np.ndarray) -> np.ndarray:
    """The inner band along the field's edge (the image border counts as an edge)."""
    width = margin_px((int(field.shape[0]), int(field.shape[1])))
    inner = ndi.binary_erosion(field, np.ones((3, 3), bool), iterations=width, border_value=0)
    return field & ~inner


def edge_checks(masks: np.ndarray, field: np.ndarray) -> list[Check]:
    """Share of the mask on the field's edge, against three times the band's share of
    the field (the mask's density there three times its density overall)."""
    band = edge_band(field)
    total = float(_count(masks, field))
    on_edge = float(_count(masks, band))
    share = 100.0 * on_edge / total if total else float("nan")
    band_share = 100.0 * float(band.sum()) / max(float(field.sum()), 1.0)
    m = measure("EDGESHARE", "Mask share on the field edge", share)
    meaning = (
        "the mask follows the edge of the field (collimator blade or image border) rather "
        "than vessels; check the outline before use"
    )
    if not total:
        return []
    return [Check(m, meaning, high=min(100.0, MAX_EDGE_EXCESS * band_share), missing_ok=True)]


def flat_percent(frames: np.ndarray, field: np.ndarray) -> float:
    """Per cent of the field whose value never changes over the run (clipped). Two
    (H, W) running extremes, no copy of the run."""
    if frames.shape[0] < 2 or not field.any():
        return float("nan")
    flat = np.max(frames, axis=0) == np.min(frames, axis=0)
    return 100.0 * float(flat[field].mean())


def fraction_checks(percent: float) -> list[Check]:
    m = measure("VESSELFRAC", "Vessel fraction of the field", percent)
    return [
        Check(
            m,
            "no vessel found; check that the run holds contrast",
            low=1e-9,
            severity=Verdict.FAILED,
        ),
        Check(
            m,
            "almost no vessel found; check that the run holds contrast and the vessels are in view",
            low=MIN_VESSEL_PERCENT,
        ),
        Check(
            m,
            "most of the field is marked as vessel: background taken for vessels",
            high=FAILED_VESSEL_PERCENT,
            severity=Verdict.FAILED,
        ),
        Check(m, "more of the field is marked than vessels cover", high=MAX_VESSEL_PERCENT),
    ]


def flat_check(frames: np.ndarray, field: np.ndarray) -> Check:
    m = measure("FLATSHARE", "Field share without signal", flat_percent(frames, field))
    return Check(
        m,
        "pixels keep one value through the run (a saturated or blanked detector): vessels "
        "there cannot be seen",
        high=MAX_FLAT_PERCENT,
        missing_ok=True,
    )


def contrast_frames(frames: np.ndarray, vessel: np.ndarray) -> float:
    """Frames whose vessel-mean opacity (darker than the run's first frame) is above half
    its peak."""
    if not vessel.any() or frames.shape[0] < 2:
        return float("nan")
    means = np.array([float(frame[vessel].mean()) for frame in frames])
    curve = means[0] - means
    curve = curve - min(float(curve.min()), 0.0)
    peak = float(curve.max())
    return float((curve >= 0.5 * peak).sum()) if peak > 0 else 0.0


def noise_sd_map(frames: np.ndarray, field: np.ndarray) -> np.ndarray:
    """Local noise SD (H, W) of a run from its neighbouring frames' differences.

    Quantum noise grows where the patient is dense, so one SD for the whole field
    takes noise for signal there. Each squared difference is capped at nine times
    the field's typical one (edges and filling vessels are not noise), smoothed
    over about a tenth of the field, and averaged over the run's frame pairs:
    (H, W) accumulators, no copy of the run."""
    step = max(1, int(np.sqrt(field.sum() / 50000)))
    sample = frames[:, ::step, ::step][:, field[::step, ::step]]
    diff = np.diff(sample, axis=0)
    typical = float(np.median(diff**2)) / 0.4549  # median of chi-square(1) = 0.4549
    cap = 9.0 * max(typical, 1e-12)
    total = np.zeros(frames.shape[1:], np.float64)
    for before, after in zip(frames[:-1], frames[1:], strict=True):
        total += np.minimum((after.astype(np.float64) - before) ** 2, cap)
    var = total / (frames.shape[0] - 1) / 2.0  # a difference holds the noise twice
    sigma = max(frames.shape[1:]) / 20.0
    weight = ndi.gaussian_filter(field.astype(np.float64), sigma)
    local = ndi.gaussian_filter(np.where(field, var, 0.0), sigma) / np.maximum(weight, 1e-6)
    return np.sqrt(np.maximum(local, 1e-12)).astype(np.float32)


def bright_ratio(frames: np.ndarray, field: np.ndarray) -> float:
    """Bright over dark signal of a subtracted run: the sum over the field of how far the
    MaxIP rises above the run's flat background (its median: most of the field is
    background), over how far the MinIP falls below it, both beyond
    ``BRIGHT_NOISE_SDS`` local noise SDs (:func:`noise_sd_map`). Works on (H, W)
    projections, no copy of the run."""
    if frames.shape[0] < 2 or not field.any():
        return float("nan")
    step = max(1, int(np.sqrt(field.sum() / 50000)))
    background = float(np.median(frames[:, ::step, ::step][:, field[::step, ::step]]))
    margin = BRIGHT_NOISE_SDS * noise_sd_map(frames, field)[field]
    bright = np.maximum(np.max(frames, axis=0)[field] - background - margin, 0).sum()
    dark = np.maximum(background - np.min(frames, axis=0)[field] - margin, 0).sum()
    return float(bright / dark) if dark > 0 else float("nan")


def dsa_quality(
    frames: np.ndarray,
    masks: np.ndarray,
    field: Field,
    subtracted: bool,
    timing_overlap: float | None = None,
) -> Quality:
    """Quality of a canvas vessel segmentation ((S, H, W) masks, any segment a vessel)
    of a (T, H, W) DSA run; ``timing_overlap`` (``pipelines.vessels.timing_overlap``)
    when the classical path split arteries from veins."""
    inside = field.mask if field.collimated else np.ones(frames.shape[1:], bool)
    vessel = masks.any(axis=0) & inside
    checks = fraction_checks(vessel_fraction(vessel, inside))
    checks.append(
        Check(
            measure(
                "LARGESTSHARE",
                "Mask share in its largest pieces",
                largest_share(vessel, LARGEST_PIECES, np.ones((3, 3), bool)),
            ),
            "the mask is mostly small specks (noise or texture), not a connected vessel tree",
            low=MIN_LARGEST_SHARE,
            missing_ok=True,
        )
    )
    checks += edge_checks(vessel, inside)
    checks.append(flat_check(frames, inside))
    checks.append(
        Check(
            measure(
                "CONTRASTFRAMES", "Frames with contrast", contrast_frames(frames, vessel), FRAMES
            ),
            "contrast in too few frames: the bolus passage is not in the run (arterial and "
            "venous timing cannot be told)",
            low=MIN_CONTRAST_FRAMES,
            missing_ok=True,
        )
    )
    if timing_overlap is not None:
        checks.append(
            Check(
                measure("AVOVERLAP", "Artery and vein timing overlap", timing_overlap),
                "arteries and veins fill at overlapping times: the artery/vein split is uncertain",
                high=MAX_TIMING_OVERLAP,
            )
        )
    if subtracted:
        checks.append(
            Check(
                measure(
                    "BRIGHTRATIO",
                    "Bright to dark signal ratio",
                    bright_ratio(frames, inside),
                    RATIO,
                ),
                "bright structures in a subtracted run: patient motion between mask and fill "
                "(misregistration); edges may be marked as vessels",
                high=MAX_BRIGHT_RATIO,
                missing_ok=True,
            )
        )
    return assess(checks)


def area_consistency(masks: np.ndarray) -> float:
    """Overlap of the vessel area of neighbouring frames, per cent: sum of the smaller
    over sum of the larger area of each pair."""
    area = masks.reshape(masks.shape[0], -1).sum(axis=1).astype(np.float64)
    if area.size < 2:
        return float("nan")
    lo, hi = np.minimum(area[:-1], area[1:]), np.maximum(area[:-1], area[1:])
    return 100.0 * float(lo.sum() / hi.sum()) if hi.sum() else float("nan")


def cine_quality(
    frames: np.ndarray, masks: np.ndarray, field: Field, frame_times_s: np.ndarray | None
) -> Quality:
    """Quality of a per-frame vessel segmentation ((T, H, W) masks) of a cine run."""
    inside = field.mask if field.collimated else np.ones(frames.shape[1:], bool)
    checks = fraction_checks(vessel_fraction(masks, inside))
    checks.append(
        Check(
            measure("LARGESTSHARE", "Mask share in its largest pieces", _per_frame_largest(masks)),
            "the masks are mostly small specks (noise or texture), not connected vessels",
            low=MIN_LARGEST_SHARE,
            missing_ok=True,
        )
    )
    checks += edge_checks(masks, inside)
    checks.append(flat_check(frames, inside))
    consistency = measure(
        "AREACONSIST", "Frame-to-frame vessel area consistency", area_consistency(masks)
    )
    step = (
        float(np.median(np.diff(frame_times_s)))
        if frame_times_s is not None and len(frame_times_s) > 1
        else None
    )
    if step is None or step <= MAX_CINE_FRAME_S:
        checks.append(
            Check(
                consistency,
                "vessels appear and vanish between neighbouring frames (contrast in a few "
                "frames only, or noise taken for vessels)",
                low=MIN_AREA_CONSISTENCY,
                missing_ok=True,
            )
        )
        return assess(checks)
    return assess(checks, extra=[consistency])


# Volumes above this many voxels are labelled at half resolution (2 x 2 x 2 blocks,
# a block is vessel when any voxel is): the labels of a 512^3 head would take 0.5 GB.
MAX_LABEL_VOXELS = 1 << 24


def coarse(mask: np.ndarray) -> np.ndarray:
    """``mask`` in 2 x 2 x 2 blocks (any voxel set) while it is larger than
    ``MAX_LABEL_VOXELS``; pieces closer than a block join, a small price for a share."""
    while mask.size > MAX_LABEL_VOXELS:
        z, y, x = (n - n % 2 for n in mask.shape)
        blocks = mask[:z, :y, :x].reshape(z // 2, 2, y // 2, 2, x // 2, 2)
        mask = np.asarray(blocks.any(axis=(1, 3, 5)))
    return mask


def grown_box(mask: np.ndarray, margins: list[int]) -> tuple[slice, ...] | None:
    """The bounding box of ``mask`` grown by ``margins`` voxels (clipped to the array)."""
    box = ndi.find_objects(mask.view(np.uint8))
    if not box:
        return None
    return tuple(
        slice(max(0, b.start - m), min(n, b.stop + m))
        for b, m, n in zip(box[0], margins, mask.shape, strict=True)
    )


def soft_tissue_around(
    vessel: np.ndarray, bone: np.ndarray, hu: np.ndarray, spacing_mm: tuple[float, ...]
) -> float:
    """Per cent of the voxels within ``VESSEL_SHELL_MM`` of the vessels (not vessel
    themselves) that are soft tissue: not bone, above ``SOFT_TISSUE_MIN_HU``; nan
    without vessels. Computed over the vessels' bounding box only."""
    steps = max(1, int(round(VESSEL_SHELL_MM / min(spacing_mm))))
    box = grown_box(vessel, [steps] * vessel.ndim)
    if box is None:
        return float("nan")
    part = vessel[box]
    shell = ndi.binary_dilation(part, iterations=steps) & ~part
    soft = ~bone[box][shell] & (hu[box][shell] > SOFT_TISSUE_MIN_HU)
    return 100.0 * float(soft.mean()) if soft.size else float("nan")


def volume_quality(
    vessel: np.ndarray,
    bone: np.ndarray,
    hu: np.ndarray | None = None,
    spacing_mm: tuple[float, ...] | None = None,
) -> Quality:
    """Quality of a 3D vessel/bone labelling; with the volume (``hu``, ``spacing_mm``)
    also what surrounds the vessels."""
    v, b = float(vessel.sum()), float(bone.sum())
    ratio = v / b if b else (float("inf") if v else float("nan"))
    m = measure("VESSELBONE", "Vessel to bone volume ratio", ratio, RATIO)
    checks = [
        Check(
            m,
            "no vessel found; check that the run holds contrast",
            low=1e-12,
            severity=Verdict.FAILED,
        ),
        Check(
            m,
            "next to no vessel for the bone in view: contrast missing or vessels called bone",
            low=MIN_VESSEL_BONE_RATIO,
        ),
        Check(
            m,
            "more vessel than bone: bone or soft tissue called vessel (or no skull in view)",
            high=MAX_VESSEL_BONE_RATIO,
        ),
        Check(
            measure(
                "LARGESTSHARE",
                "Vessel share in its largest pieces",
                largest_share(coarse(vessel), VOLUME_LARGEST_PIECES, np.ones((3, 3, 3), bool)),
            ),
            "the vessels are scattered pieces, not a connected tree",
            low=MIN_VOLUME_LARGEST_SHARE,
            missing_ok=True,
        ),
    ]
    if hu is not None and spacing_mm is not None:
        checks.append(
            Check(
                measure(
                    "VESSELSOFT",
                    "Soft tissue around the vessels",
                    soft_tissue_around(vessel, bone, hu, spacing_mm),
                ),
                "little soft tissue around the vessels: bone (a porous skull base, the "
                "skull's rim) may be called vessel",
                low=MIN_VESSEL_SOFT_PERCENT,
                missing_ok=True,
            )
        )
    return assess(checks)
