"""MinIP Secondary Capture canvases and the truth SEG objects that reference them.

Legacy XA has no Frame of Reference, and highdicom (0.28) will not build a
SEG on it. So a 2D run gets a canvas: its MinIP as a Secondary Capture with
its own Frame of Reference, which cites the XA in the Source Image Sequence;
the SEG references the canvas. The canvas is the node's own
(``dicom_node.encode.canvas``: a Multi-frame Grayscale Word SC whose Frame of
Reference module the IOD allows), with UIDs derived from the source SOP
Instance UID alone, so a truth annotation references exactly the canvas the
node delivers for the same run.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from dicom_node.encode import canvas as node_canvas
from dicom_node.encode.common import EncodeContext, coded
from pipelines.base import Code
from training.phantoms.dicom_common import SOFTWARE_VERSION

SEG_SERIES_NUMBER_OFFSET = 950


def canvas_uids(source_sop_instance_uid: str) -> tuple[str, str, str]:
    """(Series, SOP Instance, Frame of Reference) UIDs of the node's canvas for a source."""
    source = Dataset()
    source.SOPInstanceUID = source_sop_instance_uid
    return node_canvas.canvas_uids(EncodeContext(sources=[source], pipeline="phantom"))


def minip_canvas(
    source: Dataset, image: np.ndarray, pixel_spacing_mm: tuple[float, float] | None = None
) -> Dataset:
    """The node's own MinIP canvas for ``source`` (same UIDs, pixels and geometry as the
    node delivers), so truth annotations reference the object the node sends.

    ``pixel_spacing_mm`` is accepted for the caller's record; the canvas takes its
    spacing from the source header exactly as the node does.
    """
    if image.ndim != 2 or image.shape != (int(source.Rows), int(source.Columns)):
        raise ValueError(f"canvas must be ({source.Rows}, {source.Columns}), got {image.shape}")
    return node_canvas.make_canvas(EncodeContext(sources=[source], pipeline="phantom"), image)


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
            segmented_property_category=coded(category),
            segmented_property_type=coded(prop),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for i, (label, prop, category) in enumerate(segments)
    ]
    measures = None
    if pixel_spacing_mm is not None:
        measures = hd.PixelMeasuresSequence(
            pixel_spacing=pixel_spacing_mm, slice_thickness=slice_thickness_mm
        )
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
