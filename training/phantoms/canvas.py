"""MinIP Secondary Capture canvases and the truth SEG objects that reference them.

Legacy XA has no Frame of Reference, and highdicom (0.28) will not build a
SEG on it. So a 2D run gets a canvas: its MinIP as a Secondary Capture with
its own Frame of Reference, which cites the XA in the Source Image Sequence;
the SEG references the canvas. The node delivers such canvases too, so
:func:`canvas_uids` derives the canvas UIDs from the source SOP Instance UID
alone: the node and the phantom writer produce the same canvas identity for
the same run. The Frame of Reference attributes make the SC a Standard
Extended SOP Class (dciodvfy warns, no errors).
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from pipelines.base import Code
from training.phantoms.dicom_common import SOFTWARE_VERSION, uid

CANVAS_SERIES_NUMBER_OFFSET = 900
SEG_SERIES_NUMBER_OFFSET = 950


def canvas_uids(source_sop_instance_uid: str) -> tuple[str, str, str]:
    """(Series Instance UID, SOP Instance UID, Frame of Reference UID) of a run's MinIP canvas."""
    return (
        uid("canvas", source_sop_instance_uid, "series"),
        uid("canvas", source_sop_instance_uid, "instance"),
        uid("canvas", source_sop_instance_uid, "frame-of-reference"),
    )


def minip_canvas(source: Dataset, image: np.ndarray, pixel_spacing_mm: tuple[float, float] | None = None) -> hd.sc.SCImage:
    """A MinIP (or any 2D derived image) of ``source`` as an SC with its own Frame of Reference.

    ``image`` must be unsigned integers on the source's pixel grid (H, W).
    Identity is copied from the source; UIDs come from :func:`canvas_uids`.
    """
    if image.ndim != 2 or image.shape != (int(source.Rows), int(source.Columns)):
        raise ValueError(f"canvas must be ({source.Rows}, {source.Columns}), got {image.shape}")
    if image.dtype.kind != "u":
        raise ValueError(f"canvas pixels must be unsigned integers, got {image.dtype}")
    series_uid, sop_uid, for_uid = canvas_uids(str(source.SOPInstanceUID))
    orientation = tuple(source.get("PatientOrientation", ["", ""])) if source.get("PatientOrientation") else ("P", "F")
    sc = hd.sc.SCImage(
        pixel_array=image,
        photometric_interpretation="MONOCHROME2",
        bits_allocated=16 if image.dtype.itemsize > 1 else 8,
        coordinate_system="PATIENT",
        study_instance_uid=str(source.StudyInstanceUID),
        series_instance_uid=series_uid,
        series_number=int(source.get("SeriesNumber", 1)) + CANVAS_SERIES_NUMBER_OFFSET,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=str(source.get("Manufacturer", "")),
        patient_id=str(source.get("PatientID", "")),
        patient_name=source.get("PatientName", ""),
        patient_birth_date=str(source.get("PatientBirthDate", "")),
        patient_sex=str(source.get("PatientSex", "")) or None,
        accession_number=str(source.get("AccessionNumber", "")),
        study_id=str(source.get("StudyID", "")),
        study_date=str(source.get("StudyDate", "")),
        study_time=str(source.get("StudyTime", "")),
        referring_physician_name=source.get("ReferringPhysicianName", ""),
        pixel_spacing=pixel_spacing_mm,
        patient_orientation=orientation,
    )
    if "BitsStored" in source and image.dtype.itemsize > 1:
        sc.BitsStored = int(source.BitsStored)
        sc.HighBit = int(source.BitsStored) - 1
    sc.SeriesDescription = f"MinIP canvas of series {source.get('SeriesNumber', '')}"
    sc.ImageType = ["DERIVED", "SECONDARY", "MINIP"]
    sc.DerivationDescription = "Minimum intensity projection over all frames"
    sc.BodyPartExamined = str(source.get("BodyPartExamined", "")) or "HEAD"
    sc.FrameOfReferenceUID = for_uid
    sc.PositionReferenceIndicator = ""
    sc.SoftwareVersions = SOFTWARE_VERSION
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [ref]
    return sc


def _coded(code: Code) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def truth_segmentation(
    sources: Sequence[Dataset],
    masks: np.ndarray,
    segments: Sequence[tuple[str, Code, Code]],
    series_uid: str,
    sop_uid: str,
    series_number: int,
    description: str,
    pixel_spacing_mm: tuple[float, float] | None = None,
    slice_thickness_mm: float = 1.0,
) -> hd.seg.Segmentation:
    """A BINARY SEG of phantom truth; ``masks`` is (S, H, W) for one canvas or (S, Z, H, W) per slice.

    ``segments`` gives (label, property type, category) per mask. Empty
    segments are kept (``omit_empty_frames=False``) so readers see every label.
    """
    masks = np.asarray(masks, bool)
    arr = np.moveaxis(masks, 0, -1)  # (..., S)
    if arr.ndim == 3:
        arr = arr[None]
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=i + 1,
            segment_label=label,
            segmented_property_category=_coded(category),
            segmented_property_type=_coded(prop),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for i, (label, prop, category) in enumerate(segments)
    ]
    measures = None
    if pixel_spacing_mm is not None:
        measures = hd.PixelMeasuresSequence(pixel_spacing=pixel_spacing_mm, slice_thickness=slice_thickness_mm)
    seg = hd.seg.Segmentation(
        source_images=list(sources),
        pixel_array=arr,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=str(sources[0].get("Manufacturer", "")),
        manufacturer_model_name="Angio Phantom",
        software_versions=SOFTWARE_VERSION,
        device_serial_number="PH-0001",
        content_description="Phantom ground truth"[:64],
        content_label="TRUTH",
        content_creator_name="PHANTOM^GENERATOR",
        pixel_measures=measures,
        omit_empty_frames=False,
    )
    seg.SeriesDescription = description
    if "PatientOrientation" in sources[0] and "ImageOrientationPatient" not in sources[0]:
        seg.PatientOrientation = sources[0].PatientOrientation
    # Deterministic timestamps: the truth of a seed is the same whenever it is written.
    for key in ("ContentDate", "SeriesDate", "InstanceCreationDate"):
        if key in seg:
            setattr(seg, key, sources[0].get("StudyDate", seg.get(key)))
    for key in ("ContentTime", "SeriesTime", "InstanceCreationTime"):
        if key in seg:
            setattr(seg, key, sources[0].get("StudyTime", seg.get(key)))
    return seg

