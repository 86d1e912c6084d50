"""The frames canvas: the run itself as a Multi-frame Grayscale Word Secondary Capture
with T frames, its own Frame of Reference and per-frame plane geometry.

Why: per-frame results (coronary cine, one mask per frame) need a SEG whose
frames reference the source frames, and highdicom cannot use legacy XA (no
Frame of Reference) as a segmentation source. The canvas copies the run's
pixels (quantised to 12 bits with a Rescale Slope/Intercept back to the run's
values), keeps the timing in the Cine module (Frame Time Vector), and
references the XA run frame by frame in Source Image Sequence, so a SEG built
on it derives, through it, from the XA run. All frames lie in the same plane
(the detector) at different times; FRAME_STEP_MM says how they are told
apart. Its UIDs depend only on the source run and the node's encoding, so every
pipeline delivers the same canvas.
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MultiFrameGrayscaleWordSecondaryCaptureImageStorage

from dicom_node.encode.canvas import BITS, detector_pixel_spacing, quantise
from dicom_node.encode.common import (
    PURPOSE_SOURCE_FOR_PROCESSING,
    EncodeContext,
    copy_identity,
    set_equipment,
    source_image_reference,
)

FRAMES_CANVAS_KEY = "frames-canvas"
# Frame Increment Pointer values (tags of the attributes that step through frames).
FRAME_LABEL_VECTOR = 0x00182002
FRAME_TIME_VECTOR = 0x00181065
# Frames are stacked along the plane normal of the canvas's own Frame of
# Reference, one step per frame: a convention (the third axis is time, not
# anatomy) that gives every frame a distinct plane position, which SEG needs to
# address frames; the Frame of Reference is private to the canvas, so nothing
# else is ever placed in it.
FRAME_STEP_MM = 1.0


def _source_references(ctx: EncodeContext, frames: int) -> list[Dataset]:
    """One Source Image Sequence item per source instance; a multi-frame source
    lists every frame it contributes (frame i of the canvas is frame i of the run)."""
    if len(ctx.sources) == frames:
        return [source_image_reference(s, PURPOSE_SOURCE_FOR_PROCESSING) for s in ctx.sources]
    if len(ctx.sources) == 1:
        return [
            source_image_reference(
                ctx.first, PURPOSE_SOURCE_FOR_PROCESSING, frames=list(range(1, frames + 1))
            )
        ]
    raise ValueError(f"{frames} frames but {len(ctx.sources)} source instances")


def make_frames_canvas(
    ctx: EncodeContext, frames: np.ndarray, frame_times_s: np.ndarray | None = None
) -> Dataset:
    """The frames canvas for a 2D+t run from its (T, H, W) float frames."""
    if frames.ndim != 3:
        raise ValueError(f"frames canvas needs (T, H, W) frames, got {frames.shape}")
    src = ctx.first
    count = frames.shape[0]
    pixels, slope, intercept = quantise(frames)
    spacing = detector_pixel_spacing(src)

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = MultiFrameGrayscaleWordSecondaryCaptureImageStorage
    ds.SOPInstanceUID = ctx.encoding_uid(FRAMES_CANVAS_KEY, "instance")
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    copy_identity(ds, src)
    series_uid = ctx.encoding_uid(FRAMES_CANVAS_KEY, "series")
    set_equipment(ds, "Run frames", series_uid, 9001, "OT", ctx.now)
    ds.ConversionType = "WSD"
    ds.InstanceNumber = 1
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.Laterality = src.get("Laterality", "")  # type 2C: empty when the run does not say
    ds.PatientOrientation = src.get("PatientOrientation", "")
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.DerivationDescription = "Frames of the run, for frame-by-frame segmentation references"
    ds.SourceImageSequence = _source_references(ctx, count)

    ds.FrameOfReferenceUID = ctx.encoding_uid(FRAMES_CANVAS_KEY, "frame-of-reference")
    ds.PositionReferenceIndicator = ""

    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape[1:]
    ds.BitsAllocated = 16
    ds.BitsStored = BITS
    ds.HighBit = BITS - 1
    ds.PixelRepresentation = 0
    ds.NumberOfFrames = count
    ds.PixelData = pixels.tobytes()
    ds.RescaleIntercept = f"{intercept:.6g}"
    ds.RescaleSlope = f"{slope:.6g}"
    ds.RescaleType = "US"

    # Cine: the acquisition timing of every frame.
    if frame_times_s is not None and len(frame_times_s) == count and count > 1:
        increments = np.diff(np.asarray(frame_times_s, np.float64)) * 1000.0
        ds.FrameTimeVector = [0.0] + [float(f"{v:.6g}") for v in increments]
        ds.FrameIncrementPointer = FRAME_TIME_VECTOR
    else:  # no timing known: label the frames instead of inventing a rate
        ds.FrameIncrementPointer = FRAME_LABEL_VECTOR
        ds.FrameLabelVector = [str(i + 1) for i in range(count)]

    measures = Dataset()
    measures.PixelSpacing = [f"{spacing[0]:.6g}", f"{spacing[1]:.6g}"]
    measures.SliceThickness = "1"
    orientation = Dataset()
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared = Dataset()
    shared.PixelMeasuresSequence = [measures]
    shared.PlaneOrientationSequence = [orientation]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for index in range(count):
        position = Dataset()
        position.ImagePositionPatient = [0, 0, index * FRAME_STEP_MM]
        item = Dataset()
        item.PlanePositionSequence = [position]
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = per_frame

    lo, hi = int(pixels.min()), int(pixels.max())
    ds.WindowCenter = (lo + hi) / 2
    ds.WindowWidth = max(hi - lo, 1)
    ds.PresentationLUTShape = "IDENTITY"
    return ds
