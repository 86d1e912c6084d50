"""Derived volumes (the DLA angiogram) as a CT series: one CT Image per slice.

Why CT: every viewer and PACS renders a CT series in 3D (MIP, volume
rendering), while Enhanced XA 3D support is patchy. The slices keep the
source's Frame of Reference and plane geometry, so the angiogram overlays the
fill run and the SEG exactly; they start a new series whose UIDs derive from
the source and the result's provenance (a re-run stores nothing twice; another
package or setting makes a new series), say DERIVED\\SECONDARY, and
reference the source slice (or source frame of a multi-frame 3D XA / Enhanced
CT) they were computed from. Values are stored as unsigned 16 bits with
Rescale Intercept -1024, so any HU in [-1024, 64511] is exact to 1 HU.

Only ``ImageOutput`` with geometry ``volume`` lands here; the 2D MinIP image
(key ``minip``) is turned into the canvas by ``encode_result`` before
encoders run, and any other 2D image is refused rather than mis-encoded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pydicom.valuerep import DS

from dicom_node.encode import encoder
from dicom_node.encode.common import (
    PURPOSE_SOURCE_FOR_PROCESSING,
    EncodeContext,
    copy_identity,
    mark_supersession,
    set_equipment,
    set_laterality,
    source_image_reference,
)
from pipelines.base import ImageOutput, Output, Run

INTERCEPT = -1024.0
# CID 7203 Image Derivation: "Segmentation" (the vessels kept, the rest removed).
DERIVATION_SEGMENTATION = ("113076", "DCM", "Segmentation")
CONTRAST_KEYWORDS = (
    "ContrastBolusAgent",
    "ContrastBolusRoute",
    "ContrastBolusVolume",
    "ContrastBolusIngredient",
    "ContrastBolusIngredientConcentration",
    "ContrastBolusAgentSequence",
)


@dataclass(frozen=True)
class SlicePlane:
    """Where one slice of the source lies, and which instance (and frame) it came from."""

    position: tuple[float, ...]
    orientation: tuple[float, ...]
    spacing: tuple[float, ...]
    thickness: float | None
    source: Dataset
    frame: int | None  # 1-based frame number in a multi-frame source


def _floats(values: Any) -> tuple[float, ...]:
    return tuple(float(v) for v in values)


def _functional(item: Dataset | None, shared: Dataset | None, sequence: str, keyword: str) -> Any:
    """A functional-group attribute from the per-frame item, else the shared one."""
    for group in (item, shared):
        if group is not None and sequence in group and keyword in group[sequence].value[0]:
            return group[sequence].value[0][keyword].value
    return None


def source_planes(ctx: EncodeContext) -> list[SlicePlane]:
    """The source slices in run order (ascending along the slice normal, as decoded)."""
    if len(ctx.sources) > 1:
        planes = []
        for ds in ctx.sources:
            for kw in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
                if kw not in ds:
                    raise ValueError(f"source slice {ds.SOPInstanceUID} lacks {kw}")
            planes.append(
                SlicePlane(
                    _floats(ds.ImagePositionPatient),
                    _floats(ds.ImageOrientationPatient),
                    _floats(ds.PixelSpacing),
                    float(ds.SliceThickness) if ds.get("SliceThickness") else None,
                    ds,
                    None,
                )
            )
        return planes
    src = ctx.first
    per_frame = src.get("PerFrameFunctionalGroupsSequence")
    shared = (
        src.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in src else None
    )
    if not per_frame:
        raise ValueError("a single-instance volume source needs per-frame plane positions")
    planes = []
    for number, item in enumerate(per_frame, start=1):
        position = _functional(item, shared, "PlanePositionSequence", "ImagePositionPatient")
        orientation = _functional(
            item, shared, "PlaneOrientationSequence", "ImageOrientationPatient"
        )
        spacing = _functional(item, shared, "PixelMeasuresSequence", "PixelSpacing")
        thickness = _functional(item, shared, "PixelMeasuresSequence", "SliceThickness")
        if position is None or orientation is None or spacing is None:
            raise ValueError(f"frame {number} of {src.SOPInstanceUID} lacks plane geometry")
        planes.append(
            SlicePlane(
                _floats(position),
                _floats(orientation),
                _floats(spacing),
                float(thickness) if thickness else None,
                src,
                number,
            )
        )
    normal = np.cross(planes[0].orientation[:3], planes[0].orientation[3:])
    order = np.argsort([np.dot(p.position, normal) for p in planes], kind="stable")
    return [planes[i] for i in order]


def _ds(value: float) -> Any:
    """A Decimal String with as much precision as 16 characters hold (geometry kept exact)."""
    return DS(value, auto_format=True)


def _stored(values: np.ndarray) -> np.ndarray:
    """HU as stored values (HU - INTERCEPT, uint16), a few slices at a time: the float
    temporaries for a whole 512³ volume at once take over 2 GB."""
    out = np.empty(values.shape, np.uint16)
    for z0 in range(0, values.shape[0], 16):
        out[z0 : z0 + 16] = np.clip(np.round(values[z0 : z0 + 16] - INTERCEPT), 0, 65535)
    return out


def default_window(stored: np.ndarray) -> tuple[float, float]:
    """(low, high) HU of the default window, from the stored values: what is denser than
    air sets it (1st to 99.5th percentile). A sparse volume (the vessels kept, the rest
    air: less than a fifth of the voxels denser than air) is windowed from air up, so
    that every vessel voxel shows bright on black rather than its fainter half black."""
    dense = stored > 25
    body = stored[dense]
    if not body.size:
        return INTERCEPT, 0.0
    lo, hi = (float(v) + INTERCEPT for v in np.percentile(body, [1, 99.5]))
    if dense.mean() < 0.2:
        lo = float(stored[~dense].max()) + INTERCEPT if (~dense).any() else INTERCEPT
    return lo, hi


def encode_volume(out: ImageOutput, ctx: EncodeContext) -> list[Dataset]:
    """One CT Image per slice of ``out.pixels`` (Z, Y, X), on the source's geometry."""
    if out.geometry != "volume" or out.pixels.ndim != 3:
        raise ValueError(
            f"image output {out.key!r} has geometry {out.geometry!r} and shape {out.pixels.shape}: "
            "only (Z, Y, X) volumes are encoded as derived series (2D images become the "
            "canvas only under key 'minip')"
        )
    planes = source_planes(ctx)
    volume = np.asarray(out.pixels, dtype=np.float32)
    if len(planes) != volume.shape[0]:
        raise ValueError(
            f"volume {out.key!r} has {volume.shape[0]} slices, source has {len(planes)}"
        )
    src = ctx.first
    if "FrameOfReferenceUID" not in src:
        raise ValueError("volume source has no Frame of Reference UID")
    if (int(src.Rows), int(src.Columns)) != volume.shape[1:]:
        raise ValueError(
            f"volume {out.key!r} slices are {volume.shape[1:]}, source is "
            f"{(int(src.Rows), int(src.Columns))}"
        )
    stored = _stored(volume)
    lo, hi = default_window(stored)
    series_uid = ctx.series_uid(out.key)
    series_number = ctx.series_number(out.key)
    superseded = ctx.superseded(out.key, CTImageStorage)
    is_ct = str(src.get("Modality", "")) == "CT"
    datasets = []
    for index, plane in enumerate(planes):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ctx.result_uid(out.key, "slice", str(index))
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        copy_identity(ds, src)
        set_equipment(ds, out.description, series_uid, series_number, "CT", ctx.now, superseded)
        mark_supersession(ds, superseded)
        ds.PatientPosition = src.get("PatientPosition", "")
        set_laterality(ds, src)
        # Frame of Reference and Image Plane: the source's own geometry.
        ds.FrameOfReferenceUID = src.FrameOfReferenceUID
        ds.PositionReferenceIndicator = src.get("PositionReferenceIndicator", "")
        ds.ImagePositionPatient = [_ds(v) for v in plane.position]
        ds.ImageOrientationPatient = [_ds(v) for v in plane.orientation]
        ds.PixelSpacing = [_ds(v) for v in plane.spacing]
        ds.SliceThickness = _ds(plane.thickness) if plane.thickness else ""
        normal = np.cross(plane.orientation[:3], plane.orientation[3:])
        ds.SliceLocation = _ds(float(np.dot(plane.position, normal)))
        # General Image and CT Image.
        ds.InstanceNumber = index + 1
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.AcquisitionNumber = src.get("AcquisitionNumber", "")
        ds.KVP = src.get("KVP", "")
        ds.BurnedInAnnotation = "NO"
        ds.LossyImageCompression = "00"
        ds.DerivationDescription = (out.derivation or out.description)[:1024]
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = DERIVATION_SEGMENTATION
        ds.DerivationCodeSequence = [code]
        ds.SourceImageSequence = [
            source_image_reference(
                plane.source,
                PURPOSE_SOURCE_FOR_PROCESSING,
                frames=[plane.frame] if plane.frame is not None else None,
            )
        ]
        for kw in CONTRAST_KEYWORDS:
            if kw in src:
                ds[kw] = src[kw]
        # Image Pixel.
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = volume.shape[1:]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = f"{INTERCEPT:g}"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU" if is_ct else "US"
        ds.WindowCenter = f"{(lo + hi) / 2:.6g}"
        ds.WindowWidth = f"{max(hi - lo, 1.0):.6g}"
        ds.PixelData = np.ascontiguousarray(stored[index]).tobytes()
        datasets.append(ds)
    return datasets


@encoder(ImageOutput)
def _volume(out: Output, ctx: EncodeContext, run: Run) -> list[Dataset]:
    assert isinstance(out, ImageOutput)
    return encode_volume(out, ctx)
