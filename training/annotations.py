"""DICOM SEG annotations: which run they label, what each segment means, and the masks.

A segment's meaning comes only from its coded Segmented Property Type, never
from its free-text label:

    SCT 51114001 Artery            -> "artery"
    SCT 29092000 Vein              -> "vein"
    SCT 86117002 Internal carotid  -> "ica"
    SCT 59820001 Blood vessel      -> "vessel"
    SCT 272673000 Bone             -> "bone"
    SCT 87784001 Soft tissue       -> "soft_tissue"
    DCM 125040 Background          -> "background"

(SRT, the old designator of SNOMED CT, is read as SCT.) A SEG with a
Background segment is a *scribble* annotation: its foreground segments and
its background segment mark only the pixels an annotator drew on, every other
pixel is unknown. A SEG without one is a *full* annotation: pixels outside
every segment are background.

References: a SEG may reference the run itself (frame by frame), or a canvas
Secondary Capture that references the run in its Source Image Sequence (the
node's MinIP canvas: one frame, 2D labels for the whole run; the frames
canvas: frame k of the canvas is frame k of the run), or the slices of a
volume. Anything that cannot be tied to a run, or that has no segment with a
known property type, is reported with the reason and left out; it is never
turned into an empty (all-background) label.

Node results (series description starting with the node's ``AI `` prefix and
only AUTOMATIC segments) are model output, not annotation, and are skipped
with that reason.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import SegmentationStorage

from dicom_node.encode.common import SERIES_PREFIX
from dicom_node.sopclasses import CINE_2D, VOLUME

log = logging.getLogger(__name__)

ROLES: dict[tuple[str, str], str] = {
    ("51114001", "SCT"): "artery",
    ("29092000", "SCT"): "vein",
    ("86117002", "SCT"): "ica",
    ("59820001", "SCT"): "vessel",
    ("272673000", "SCT"): "bone",
    ("87784001", "SCT"): "soft_tissue",
    ("125040", "DCM"): "background",
}
FOREGROUND_ROLES = ("artery", "vein", "ica", "vessel", "bone", "soft_tissue")
Geometry = Literal["canvas", "frames", "volume"]
Kind = Literal["full", "scribble"]


@dataclass(eq=False)  # identity: masks are arrays
class Annotation:
    """Masks of one run from one or more SEG instances.

    ``masks`` maps a role to a bool array: (H, W) for ``canvas``, (T, H, W) for
    ``frames``, (Z, Y, X) for ``volume``. For scribbles, ``background`` is
    among the roles and unmarked pixels are unknown.
    """

    run_key: str
    kind: Kind
    geometry: Geometry
    masks: dict[str, np.ndarray]
    seg_uids: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def roles(self) -> list[str]:
        return sorted(self.masks)


@dataclass(frozen=True)
class Problem:
    """Something left out, with the reason (reported, never used as a negative)."""

    uid: str
    reason: str


@dataclass
class RunInfo:
    """What annotation matching needs of a run: its key and its instances in run order."""

    key: str
    headers: list[Dataset]
    frames: int
    rows: int
    columns: int
    is_volume: bool


def _code_key(item: Dataset) -> tuple[str, str]:
    scheme = str(item.get("CodingSchemeDesignator", ""))
    return str(item.get("CodeValue", "")), "SCT" if scheme == "SRT" else scheme


def segment_roles(seg: Dataset) -> dict[int, str | None]:
    """Segment number -> role (None for a property type we do not know)."""
    out: dict[int, str | None] = {}
    for item in seg.get("SegmentSequence", []):
        codes = item.get("SegmentedPropertyTypeCodeSequence")
        role = ROLES.get(_code_key(codes[0])) if codes else None
        out[int(item.SegmentNumber)] = role
    return out


def is_node_result(seg: Dataset) -> bool:
    automatic = all(
        str(s.get("SegmentAlgorithmType", "")) == "AUTOMATIC"
        for s in seg.get("SegmentSequence", [])
    )
    return str(seg.get("SeriesDescription", "")).startswith(SERIES_PREFIX) and automatic


def referenced_uids(ds: Dataset) -> list[str]:
    """Every SOP Instance UID a SEG or SC references (series, source and derivation)."""
    uids: list[str] = []
    for series in ds.get("ReferencedSeriesSequence", []):
        uids += [
            str(i.ReferencedSOPInstanceUID) for i in series.get("ReferencedInstanceSequence", [])
        ]
    uids += [str(i.ReferencedSOPInstanceUID) for i in ds.get("SourceImageSequence", [])]
    for frame in ds.get("PerFrameFunctionalGroupsSequence", []):
        for der in frame.get("DerivationImageSequence", []):
            uids += [str(i.ReferencedSOPInstanceUID) for i in der.get("SourceImageSequence", [])]
    return list(dict.fromkeys(uids))


def _frame_numbers(item: Dataset) -> list[int]:
    value = item.get("ReferencedFrameNumber")
    if value is None:
        return []
    if isinstance(value, (int, str)):
        return [int(value)]
    return [int(v) for v in value]


def _frame_sources(seg: Dataset) -> list[tuple[int, str | None, int | None]]:
    """(segment number, referenced SOP Instance UID, referenced frame) per SEG frame."""
    out: list[tuple[int, str | None, int | None]] = []
    shared = seg.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
    for frame in seg.get("PerFrameFunctionalGroupsSequence", []):
        ident = frame.get("SegmentIdentificationSequence") or shared.get(
            "SegmentIdentificationSequence"
        )
        number = int(ident[0].ReferencedSegmentNumber)
        uid, frame_no = None, None
        for der in frame.get("DerivationImageSequence", []):
            for src in der.get("SourceImageSequence", []):
                uid = str(src.ReferencedSOPInstanceUID)
                numbers = _frame_numbers(src)
                frame_no = numbers[0] if numbers else None
        out.append((number, uid, frame_no))
    return out


def segment_pixels(seg: Dataset) -> np.ndarray:
    """(frames, rows, columns) bool; FRACTIONAL segmentations thresholded at one half."""
    arr = np.asarray(seg.pixel_array).reshape(-1, int(seg.Rows), int(seg.Columns))
    if str(seg.get("SegmentationType", "BINARY")) == "FRACTIONAL":
        top = float(seg.get("MaximumFractionalValue", 255) or 255)
        return arr.astype(np.float32) >= 0.5 * top
    return arr.astype(bool)


def _volume_order(header: Dataset) -> np.ndarray:
    """Rank of every frame of a single-instance volume along the slice normal,
    as ``dicom_node.runs`` orders them."""
    frames = int(header.get("NumberOfFrames", 1) or 1)
    pf = header.get("PerFrameFunctionalGroupsSequence")
    sfg = header.get("SharedFunctionalGroupsSequence")
    if pf is None or len(pf) != frames or "PlanePositionSequence" not in pf[0]:
        return np.arange(frames)
    iop = (
        sfg[0].PlaneOrientationSequence[0].ImageOrientationPatient
        if sfg and "PlaneOrientationSequence" in sfg[0]
        else [1, 0, 0, 0, 1, 0]
    )
    normal = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))
    pos = [
        float(np.asarray(it.PlanePositionSequence[0].ImagePositionPatient, float) @ normal)
        for it in pf
    ]
    rank = np.empty(frames, np.int64)
    rank[np.argsort(pos, kind="stable")] = np.arange(frames)
    return rank


class Resolver:
    """Ties SEG frames to runs: directly, through a canvas SC, or through volume slices."""

    def __init__(self, runs: Iterable[RunInfo], canvases: Iterable[Dataset]) -> None:
        self.runs = {r.key: r for r in runs}
        # SOP Instance UID -> (run key, slice index or None for a 2D run instance)
        self.instances: dict[str, tuple[str, int | None]] = {}
        for run in self.runs.values():
            if run.is_volume and len(run.headers) > 1:
                for z, h in enumerate(run.headers):
                    self.instances[str(h.SOPInstanceUID)] = (run.key, z)
            else:
                for h in run.headers:
                    self.instances[str(h.SOPInstanceUID)] = (run.key, None)
        self.canvases = {str(c.SOPInstanceUID): c for c in canvases}

    def locate(self, uid: str | None, frame: int | None) -> tuple[str, str, int | None] | str:
        """(run key, geometry, index) of one SEG frame's source, or the reason it has none.

        Geometry is ``canvas``, ``frames`` (through a frames canvas), ``run-frame``
        (a frame of the run itself) or ``volume``; the index is the run frame,
        the slice, or None for the canvas.
        """
        if uid is None:
            return "a SEG frame names no source image"
        if uid in self.instances:
            key, z = self.instances[uid]
            run = self.runs[key]
            if run.is_volume:
                if z is None:  # one multi-frame volume instance
                    if frame is None:
                        return f"frame reference missing for volume instance {uid}"
                    z = int(_volume_order(run.headers[0])[frame - 1])
                return key, "volume", z
            return key, "run-frame", (frame or 1) - 1
        canvas = self.canvases.get(uid)
        if canvas is None:
            return f"references {uid}, which is neither a run nor a canvas in the source"
        src = list(canvas.get("SourceImageSequence", []))
        found = [self.instances.get(str(s.ReferencedSOPInstanceUID)) for s in src]
        targets = [t for t in found if t is not None]
        if not targets:
            return f"canvas {uid} references no run in the source"
        key = targets[0][0]
        if int(canvas.get("NumberOfFrames", 1) or 1) == 1:
            return key, "canvas", None
        numbers = [n for s in src for n in _frame_numbers(s)]
        k = (frame or 1) - 1
        return key, "frames", (numbers[k] - 1 if k < len(numbers) else k)


def read_annotation(seg: Dataset, resolver: Resolver) -> Annotation | Problem:
    """One SEG instance as an annotation of one run, or the reason it is unusable."""
    uid = str(seg.SOPInstanceUID)
    if str(seg.SOPClassUID) != SegmentationStorage:
        return Problem(uid, f"SOP class {seg.SOPClassUID} is not Segmentation")
    if is_node_result(seg):
        return Problem(uid, "a result of this node (automatic segments), not an annotation")
    roles = segment_roles(seg)
    known = {n: r for n, r in roles.items() if r is not None}
    if not known or set(known.values()) == {"background"}:
        return Problem(
            uid,
            "no segment with a known property type "
            f"(segments {sorted(roles)}; known: {sorted(set(ROLES.values()))})",
        )
    sources = _frame_sources(seg)
    pixels = segment_pixels(seg)
    if len(sources) != pixels.shape[0]:
        # No per-frame functional groups: one frame per segment, all on the one referenced image.
        refs = referenced_uids(seg)
        if len(refs) != 1 or pixels.shape[0] != len(roles):
            return Problem(
                uid,
                "frames carry no source references and the SEG does not "
                "reference exactly one image",
            )
        sources = [(n, refs[0], None) for n in sorted(roles)]
    located = [resolver.locate(u, f) for _, u, f in sources]
    reasons = {loc for loc in located if isinstance(loc, str)}
    if reasons:
        return Problem(uid, "; ".join(sorted(reasons)))
    keys = {loc[0] for loc in located if not isinstance(loc, str)}
    if len(keys) != 1:
        return Problem(uid, f"frames reference {len(keys)} different runs")
    key = keys.pop()
    run = resolver.runs[key]
    geometries = {loc[1] for loc in located if not isinstance(loc, str)}
    indices = [loc[2] for loc in located if not isinstance(loc, str)]
    geometry: Geometry
    if geometries == {"run-frame"}:
        # Every segment drawn on one frame of the run is a 2D label of the whole run.
        geometry = "canvas" if len(set(indices)) == 1 else "frames"
    elif len(geometries) == 1:
        geometry = geometries.pop()  # type: ignore[assignment]
    else:
        return Problem(uid, f"mixed geometries {sorted(geometries)}")
    if (pixels.shape[1], pixels.shape[2]) != (run.rows, run.columns):
        return Problem(
            uid,
            f"mask size {pixels.shape[1]}x{pixels.shape[2]} differs from the "
            f"run's {run.rows}x{run.columns}",
        )
    shape = (run.rows, run.columns) if geometry == "canvas" else (run.frames, run.rows, run.columns)
    masks: dict[str, np.ndarray] = {}
    for (number, _, _), loc, frame_pixels in zip(sources, located, pixels, strict=True):
        role = roles.get(number)
        if role is None or isinstance(loc, str):
            continue
        target = masks.setdefault(role, np.zeros(shape, bool))
        if geometry == "canvas":
            target |= frame_pixels
        else:
            index = loc[2]
            if index is None or not 0 <= index < shape[0]:
                return Problem(uid, f"frame index {index} outside the run's {shape[0]} frames")
            target[index] |= frame_pixels
    kind: Kind = "scribble" if "background" in masks else "full"
    notes = []
    unknown = sorted(n for n, r in roles.items() if r is None)
    if unknown:
        notes.append(f"SEG {uid}: segments {unknown} have property types we do not use")
    return Annotation(
        run_key=key, kind=kind, geometry=geometry, masks=masks, seg_uids=[uid], notes=notes
    )


def merge(annotations: Sequence[Annotation]) -> tuple[dict[str, Annotation], list[Problem]]:
    """One annotation per run: full annotations win over scribbles; several of the
    same kind and geometry are united (role by role)."""
    by_run: dict[str, list[Annotation]] = defaultdict(list)
    for a in annotations:
        by_run[a.run_key].append(a)
    out: dict[str, Annotation] = {}
    problems: list[Problem] = []
    for key, items in by_run.items():
        full = [a for a in items if a.kind == "full"]
        chosen = full or items
        for a in items:
            if a not in chosen:
                problems.append(
                    Problem(
                        a.seg_uids[0],
                        f"scribbles of run {key} not used: the run also has a full annotation",
                    )
                )
        geometry = chosen[0].geometry
        same = [a for a in chosen if a.geometry == geometry]
        for a in chosen:
            if a.geometry != geometry:
                problems.append(
                    Problem(
                        a.seg_uids[0],
                        f"geometry {a.geometry} differs from "
                        f"{geometry} of another SEG of run {key}",
                    )
                )
        masks: dict[str, np.ndarray] = {}
        for a in same:
            for role, m in a.masks.items():
                masks[role] = masks[role] | m if role in masks else m.copy()
        merged = Annotation(
            run_key=key,
            kind=same[0].kind,
            geometry=geometry,
            masks=masks,
            seg_uids=[u for a in same for u in a.seg_uids],
            notes=[n for a in same for n in a.notes],
        )
        if len(same) > 1:
            merged.notes.append(f"{len(same)} SEG instances united")
        out[key] = merged
    return out, problems


def is_run_header(ds: Dataset) -> bool:
    return str(ds.get("SOPClassUID", "")) in CINE_2D | VOLUME


def is_canvas_header(ds: Dataset) -> bool:
    """A Secondary Capture that derives from other images (a canvas candidate)."""
    return (
        str(ds.get("SOPClassUID", "")).startswith("1.2.840.10008.5.1.4.1.1.7")
        and "SourceImageSequence" in ds
    )


def label_targets(annotation: Annotation, channels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Targets (K, ...) and valid mask (K, ...) for model output channels named by role.

    ``vessel`` is the union of every vessel role present when no explicit
    vessel segment exists. Full annotations are valid everywhere. Scribbles
    are valid where the channel's own scribble or the background scribble is.
    """
    masks = dict(annotation.masks)
    shape = next(iter(masks.values())).shape
    if "vessel" in channels and "vessel" not in masks:
        parts = [masks[r] for r in ("artery", "vein", "ica") if r in masks]
        if parts:
            masks["vessel"] = np.logical_or.reduce(parts)
    target = np.zeros((len(channels), *shape), bool)
    valid = np.zeros((len(channels), *shape), bool)
    background = masks.get("background")
    for k, role in enumerate(channels):
        m = masks.get(role)
        if annotation.kind == "full":
            if m is not None:
                target[k] = m
            valid[k] = True
        else:
            if m is not None:
                target[k] = m
                valid[k] |= m
            if background is not None:
                valid[k] |= background
                target[k] &= ~background
    return target, valid


def usable_for(annotation: Annotation, channels: Sequence[str]) -> str | None:
    """None when the annotation labels every channel, else the reason it does not."""
    have = set(annotation.masks)
    if "vessel" in channels and have & {"artery", "vein", "ica"}:
        have.add("vessel")
    missing = [c for c in channels if c not in have and c != "soft_tissue"]
    if annotation.kind == "full" and missing:
        return f"no {', '.join(missing)} segment"
    if annotation.kind == "scribble" and not (have & set(channels)):
        return f"no scribble of {', '.join(channels)}"
    return None


def summarise(problems: Iterable[Problem]) -> Mapping[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for p in problems:
        counts[p.reason.split(" (")[0]] += 1
    return dict(counts)
