"""Image geometry from the headers, checked before anything is computed.

A volume's result (a SEG on its slices, a DLA series) is placed in the patient
by the source's geometry: highdicom copies the orientation, positions and pixel
spacing into the result. A series a sender assembled badly (a slice without
Image Position, two slices at one position, a slice missing, slices that
disagree on orientation or spacing, spacing of zero or a kilometre) would
otherwise reach the pipeline, which divides by the spacing, and the encoder,
which refuses the geometry with an exception of its own: the job then fails
as an "internal error" after the compute, or, with an absurd spacing, the
rendering of the volume grows to millions of rows. Here such a run fails at
decoding with :class:`~dicom_node.errors.RunError`, saying which slice or
frame and which attribute, before anything is computed.

What a volume needs (a series of single-frame slices, or one Enhanced
multi-frame instance):

- the same SOP class in every slice (one Enhanced instance is one class);
- a Frame of Reference UID, the same in every slice (the positions mean
  nothing without one);
- Image Orientation (Patient): six finite numbers, two unit vectors at right
  angles (within ``ORTHONORMAL_TOLERANCE``), the same in every slice, and in
  an Enhanced instance one shared orientation (the encoder cannot place frames
  of different orientations in one result);
- Image Position (Patient): three finite numbers for every slice or frame;
- positions along the slice normal that are distinct and evenly spaced (each
  step within ``EVEN_TOLERANCE`` of the median: a larger gap is a missing
  slice), the step within [``MIN_SPACING_MM``, ``MAX_SPACING_MM``];
- Pixel Spacing (in an Enhanced instance, its Pixel Measures, shared or of the
  first frame): two finite numbers within the same bounds, the same in every
  slice.

2D runs are only measured, not placed. Their spacing is Pixel Spacing (at the
top level, or in the shared Pixel Measures of an Enhanced XA or XRF instance),
else Imager Pixel Spacing; one that is not two numbers within the bounds is
treated as absent (the pipelines then work in pixels and say so), with a
warning in the log.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from dicom_node.errors import RunError

log = logging.getLogger(__name__)

# Voxel and pixel sizes outside these are not X-ray images of a patient.
MIN_SPACING_MM = 0.01
MAX_SPACING_MM = 50.0
ORTHONORMAL_TOLERANCE = 0.01
EVEN_TOLERANCE = 0.1  # of the median step between slices


@dataclass(frozen=True)
class VolumeGeometry:
    order: np.ndarray  # slice (or frame) indices in order of position along the normal
    pixel_spacing_mm: tuple[float, float]
    slice_spacing_mm: float


def value_of(ds: Dataset | None, keyword: str, what: str) -> Any:
    """``ds``'s value of ``keyword`` (None if absent); one that does not parse as its
    VR is a RunError naming ``what``."""
    if ds is None or keyword not in ds:
        return None
    try:
        return ds[keyword].value
    except Exception:  # noqa: BLE001 - pydicom raises what the value's parser raises
        raise RunError(f"{what} cannot be read") from None


def _numbers(value: Any, count: int, what: str) -> np.ndarray:
    if value is None:
        raise RunError(f"{what} is missing")
    try:
        listed = isinstance(value, Sequence | np.ndarray) and not isinstance(value, str | bytes)
        items = list(value) if listed else [value]
        numbers = np.asarray([float(v) for v in items], float)
    except (TypeError, ValueError):
        raise RunError(f"{what} is not numeric") from None  # text is not quoted: it may be PHI
    if numbers.size != count:
        raise RunError(f"{what} has {numbers.size} value(s), not {count}")
    if not np.all(np.isfinite(numbers)):
        raise RunError(f"{what} is not finite: {numbers.tolist()}")
    return numbers


def spacing_pair(value: Any, what: str) -> tuple[float, float]:
    """Two spacings in mm (rows, then columns), each within the bounds."""
    numbers = _numbers(value, 2, what)
    if not np.all((numbers >= MIN_SPACING_MM) & (numbers <= MAX_SPACING_MM)):
        raise RunError(
            f"{what} {numbers.tolist()} mm is outside {MIN_SPACING_MM}-{MAX_SPACING_MM} mm"
        )
    return float(numbers[0]), float(numbers[1])


def optional_spacing(ds: Dataset, keyword: str) -> tuple[float, float] | None:
    """``ds``'s ``keyword`` (Pixel Spacing, Imager Pixel Spacing) as a checked pair, or
    None when it is absent or unusable (logged: the UID and why, not the value)."""
    if keyword not in ds:
        return None
    try:
        return spacing_pair(value_of(ds, keyword, keyword), keyword)
    except RunError as exc:
        log.warning("%s of %s ignored: %s", keyword, ds.get("SOPInstanceUID", "?"), exc)
        return None


def calibrated_spacing(ds: Dataset) -> tuple[float, float] | None:
    """Pixel Spacing of a 2D run, from the data set or (Enhanced XA / XRF) from the
    shared Pixel Measures; None if neither is there and usable."""
    found = optional_spacing(ds, "PixelSpacing")
    if found is not None:
        return found
    try:
        shared = ds.get("SharedFunctionalGroupsSequence")
        measures = shared[0].get("PixelMeasuresSequence") if shared else None
    except Exception:  # noqa: BLE001 - an unreadable sequence: no spacing from it
        log.warning("Pixel Measures of %s cannot be read; ignored", ds.get("SOPInstanceUID", "?"))
        return None
    return optional_spacing(measures[0], "PixelSpacing") if measures else None


def plane_spacing_2d(ds: Dataset) -> tuple[float, float] | None:
    """Pixel Spacing (:func:`calibrated_spacing`), else Imager Pixel Spacing, of a 2D
    run; None if neither is usable."""
    return calibrated_spacing(ds) or optional_spacing(ds, "ImagerPixelSpacing")


def orientation(value: Any, what: str) -> np.ndarray:
    """Image Orientation (Patient): the row and column direction cosines, checked."""
    iop = _numbers(value, 6, what)
    row, col = iop[:3], iop[3:]
    if (
        abs(np.linalg.norm(row) - 1) > ORTHONORMAL_TOLERANCE
        or abs(np.linalg.norm(col) - 1) > ORTHONORMAL_TOLERANCE
        or abs(float(row @ col)) > ORTHONORMAL_TOLERANCE
    ):
        raise RunError(f"{what} {iop.tolist()} is not two unit vectors at right angles")
    return iop


def _normal(iop: np.ndarray) -> np.ndarray:
    normal = np.cross(iop[:3], iop[3:])
    return normal / np.linalg.norm(normal)


def _slice_spacing(along: np.ndarray, names: Sequence[str]) -> tuple[np.ndarray, float]:
    """The order of the positions along the normal, and the step between them."""
    order = np.argsort(along, kind="stable")
    steps = np.diff(along[order])
    if len(steps) == 0:
        return order, 0.0
    if steps.min() < MIN_SPACING_MM:
        k = int(np.argmin(steps))
        raise RunError(
            f"{names[order[k]]} and {names[order[k + 1]]} lie at the same position "
            f"(step {steps[k]:.3g} mm along the slice normal)"
        )
    step = float(np.median(steps))
    if step > MAX_SPACING_MM:
        raise RunError(f"slices are {step:.4g} mm apart, more than {MAX_SPACING_MM} mm")
    uneven = np.abs(steps - step) > EVEN_TOLERANCE * step
    if uneven.any():
        k = int(np.flatnonzero(uneven)[0])
        raise RunError(
            f"slices are not evenly spaced: {steps[k]:.4g} mm between {names[order[k]]} and "
            f"{names[order[k + 1]]}, {step:.4g} mm elsewhere (a slice missing?)"
        )
    return order, step


def _frame_of_reference(ds: Dataset, name: str = "the volume") -> str:
    uid = str(value_of(ds, "FrameOfReferenceUID", "Frame of Reference UID") or "").strip("\0 ")
    if not uid:
        raise RunError(
            f"{name} has no Frame of Reference UID (absent, empty or not a UID): "
            "its slices cannot be placed"
        )
    return uid


def _label(ds: Dataset, index: int) -> str:
    """The slice's Instance Number, else its place in the series as received."""
    try:
        return str(int(ds.InstanceNumber))
    except Exception:  # noqa: BLE001 - absent or unreadable: any failure means no number
        return f"#{index + 1} (no Instance Number)"


def series_geometry(datasets: Sequence[Dataset]) -> VolumeGeometry:
    """The geometry of a volume sent as one single-frame instance per slice."""
    first = datasets[0]
    names = [f"slice {_label(ds, k)}" for k, ds in enumerate(datasets)]
    frame_of_reference = _frame_of_reference(first, names[0])
    for ds, name in zip(datasets, names, strict=True):
        if _frame_of_reference(ds, name) != frame_of_reference:
            raise RunError(
                f"{name} has another Frame of Reference UID than {names[0]}: not one volume"
            )

    def iop_of(ds: Dataset, name: str) -> np.ndarray:
        what = f"Image Orientation of {name}"
        return orientation(value_of(ds, "ImageOrientationPatient", what), what)

    iop = iop_of(first, names[0])
    for ds, name in zip(datasets, names, strict=True):
        other = iop_of(ds, name)
        if not np.array_equal(other, iop):
            raise RunError(
                f"{name} has another Image Orientation ({other.tolist()}) than "
                f"{names[0]} ({iop.tolist()}): not one volume"
            )
    normal = _normal(iop)
    along = []
    for ds, name in zip(datasets, names, strict=True):
        what = f"Image Position of {name}"
        along.append(_numbers(value_of(ds, "ImagePositionPatient", what), 3, what) @ normal)
    order, step = _slice_spacing(np.asarray(along), names)

    def spacing_of(ds: Dataset, name: str) -> tuple[float, float]:
        what = f"Pixel Spacing of {name}"
        return spacing_pair(value_of(ds, "PixelSpacing", what), what)

    spacing = spacing_of(first, names[0])
    for ds, name in zip(datasets, names, strict=True):
        pair = spacing_of(ds, name)
        if not all(math.isclose(a, b, rel_tol=1e-4) for a, b in zip(pair, spacing, strict=True)):
            raise RunError(f"{name} has another Pixel Spacing ({pair}) than {names[0]} ({spacing})")
    return VolumeGeometry(order, spacing, step)


def enhanced_geometry(ds: Dataset, frames: int) -> VolumeGeometry:
    """The geometry of a volume sent as one Enhanced multi-frame instance."""
    _frame_of_reference(ds)
    shared = ds.get("SharedFunctionalGroupsSequence")
    if not shared:
        raise RunError("the volume has no Shared Functional Groups: no shared geometry")
    groups = shared[0]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is None or len(per_frame) != frames:
        raise RunError(
            f"the volume has {frames} frames and {len(per_frame or [])} Per-Frame Functional Groups"
        )
    if "PlaneOrientationSequence" not in groups or not groups.PlaneOrientationSequence:
        raise RunError(
            "the volume's orientation is not shared by its frames (no Plane Orientation in "
            "the Shared Functional Groups): not one volume"
        )
    what = "shared Image Orientation"
    iop = orientation(
        value_of(groups.PlaneOrientationSequence[0], "ImageOrientationPatient", what), what
    )
    normal = _normal(iop)
    names = [f"frame {k + 1}" for k in range(frames)]
    along = []
    for item, name in zip(per_frame, names, strict=True):
        plane = item.get("PlanePositionSequence")
        what = f"Image Position of {name}"
        value = value_of(plane[0], "ImagePositionPatient", what) if plane else None
        along.append(_numbers(value, 3, what) @ normal)
    order, step = _slice_spacing(np.asarray(along), names)
    # Pixel Measures are shared, or given per frame (then the first frame's are read).
    measures = groups.get("PixelMeasuresSequence") or per_frame[0].get("PixelMeasuresSequence")
    what = "Pixel Spacing of the Pixel Measures"
    spacing = spacing_pair(value_of(measures[0] if measures else None, "PixelSpacing", what), what)
    return VolumeGeometry(order, spacing, step)


def _usable(ds: Dataset, keyword: str) -> bool:
    """``keyword`` holds one number within (0, ``MAX_SPACING_MM``]."""
    try:
        value = float(ds[keyword].value)
    except Exception:  # noqa: BLE001 - absent, empty, several values or unreadable
        return False
    return math.isfinite(value) and 0 < value <= MAX_SPACING_MM


def fill_slice_thickness(headers: Sequence[Dataset], step_mm: float) -> int:
    """Give the headers without a usable Slice Thickness the step between slices.

    Slice Thickness is type 2 in a CT image (it may be empty), but the SEG and the
    DLA series copy it into their Pixel Measures, where it must be a positive
    number; the spacing between the slices is what the result's voxels measure.
    Returns how many headers were given it."""
    return _fill(headers, "SliceThickness", step_mm, required=True)


def _fill(datasets: Sequence[Dataset], keyword: str, step_mm: float, required: bool) -> int:
    """Set ``keyword`` to the step where it is not usable (and, unless ``required``,
    present); the count set."""
    filled = 0
    for ds in datasets:
        if (required or keyword in ds) and not _usable(ds, keyword):
            setattr(ds, keyword, f"{step_mm:.6g}")
            filled += 1
    return filled


def fill_pixel_measures(ds: Dataset, step_mm: float) -> int:
    """The same for an Enhanced volume's Pixel Measures (shared and per frame): a Slice
    Thickness that is not one positive number, and a Spacing Between Slices that is
    present but not one, become the step between the frames' positions (the encoders
    copy both, and highdicom indexes the frames by the latter). Returns how many
    values were replaced."""
    items = []
    for keyword in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        for group in ds.get(keyword) or []:
            items += list(group.get("PixelMeasuresSequence") or [])
    return _fill(items, "SliceThickness", step_mm, required=True) + _fill(
        items, "SpacingBetweenSlices", step_mm, required=False
    )
