"""The MinIP canvas: a Multi-frame Grayscale Word Secondary Capture with one frame
and its own Frame of Reference.

Why: legacy XA carries no Frame of Reference, so highdicom cannot use it as a
segmentation source, and the Parametric Map IOD requires one. The canvas is a
Secondary Capture (any viewer shows it), it carries the optional Frame of
Reference and Multi-frame Functional Groups modules that the Multi-frame SC
IODs allow, with a plane in a run-specific frame of reference whose axes are the
detector rows and columns, so SEG and Parametric Map objects can reference it
with full geometry. It references the XA run in Source Image Sequence and
Derivation Image Sequence. Its UIDs depend only on the source run and the
node's encoding, so every pipeline delivers the same canvas and the destination
stores it once.

Pixel Spacing is also written at the top level (the SC Image module allows it):
a viewer that reads a one-frame multi-frame object like a single-frame one
(OHIF 3 skips the functional groups below two frames) otherwise builds its
volume without a spacing, and a Parametric Map fused over it renders black.
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MultiFrameGrayscaleWordSecondaryCaptureImageStorage

from dicom_node.encode.common import (
    DERIVATION_MINIP,
    PURPOSE_SOURCE_FOR_PROCESSING,
    EncodeContext,
    copy_identity,
    set_equipment,
    set_laterality,
    source_image_reference,
)
from dicom_node.geometry import calibrated_spacing, optional_spacing
from dicom_node.routing import header_floats

BITS = 12
CANVAS_KEY = "canvas"


def detector_pixel_spacing(src: Dataset) -> tuple[float, float]:
    """Pixel spacing at the isocentre when the header says so, else at the detector.

    XA gives Imager Pixel Spacing at the detector; dividing by the Estimated
    Radiographic Magnification Factor gives the spacing at the isocentre.
    Either only when it is two numbers within ``dicom_node.geometry``'s bounds, and the
    factor only when it is a finite number from 1 to 10 (else 1 mm, as with none).
    """
    spacing = calibrated_spacing(src)
    if spacing is not None:
        return spacing
    imager = optional_spacing(src, "ImagerPixelSpacing")
    if imager is None:
        return 1.0, 1.0
    mag = header_floats(src, "EstimatedRadiographicMagnificationFactor")  # finite, or None
    if mag is not None and len(mag) == 1 and 1.0 <= mag[0] <= 10.0:
        return imager[0] / mag[0], imager[1] / mag[0]
    return imager


def quantise(image: np.ndarray, bits: int = BITS) -> tuple[np.ndarray, float, float]:
    """Map float values onto 0..2**bits-1; returns pixels, slope and intercept.

    Integer images that already fit are kept as they are (slope 1).
    """
    finite = np.isfinite(image)
    lo = float(image[finite].min()) if finite.any() else 0.0
    hi = float(image[finite].max()) if finite.any() else 0.0
    top = 2**bits - 1
    if lo >= 0 and hi <= top and np.allclose(image[finite], np.round(image[finite])):
        return np.where(finite, image, 0).astype(np.uint16), 1.0, 0.0
    slope = (hi - lo) / top if hi > lo else 1.0
    pixels = np.round((np.where(finite, image, lo) - lo) / slope)
    return np.clip(pixels, 0, top).astype(np.uint16), slope, lo


def canvas_uids(ctx: EncodeContext) -> tuple[str, str, str]:
    """(Series, SOP Instance, Frame of Reference) UIDs of a run's canvas: they depend
    only on the source SOP Instance UIDs and the node's encoding, so the node, every
    pipeline and the phantom truth annotations all name the same canvas."""
    return (
        ctx.encoding_uid(CANVAS_KEY, "series"),
        ctx.encoding_uid(CANVAS_KEY, "instance"),
        ctx.encoding_uid(CANVAS_KEY, "frame-of-reference"),
    )


def make_canvas(ctx: EncodeContext, image: np.ndarray) -> Dataset:
    """The canvas for a 2D run, from its MinIP (H, W) float image."""
    src = ctx.first
    pixels, slope, intercept = quantise(image)
    spacing = detector_pixel_spacing(src)

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = MultiFrameGrayscaleWordSecondaryCaptureImageStorage
    series_uid, ds.SOPInstanceUID, frame_of_reference_uid = canvas_uids(ctx)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    copy_identity(ds, src)
    set_equipment(ds, "MinIP", series_uid, 9000, "OT", ctx.now)
    ds.ConversionType = "WSD"
    ds.InstanceNumber = 1
    ds.ImageType = ["DERIVED", "SECONDARY"]
    set_laterality(ds, src)
    ds.PatientOrientation = src.get("PatientOrientation", "")
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = src.get("LossyImageCompression", "00")
    if ds.LossyImageCompression == "01":
        ds.LossyImageCompressionRatio = src.get("LossyImageCompressionRatio", None)
        ds.LossyImageCompressionMethod = src.get("LossyImageCompressionMethod", None)
        for kw in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
            if ds.get(kw) is None:
                del ds[kw]
    # SC Image module (Basic Pixel Spacing Calibration), for viewers that read a
    # one-frame object like a single-frame one (see the module docstring).
    ds.PixelSpacing = [f"{spacing[0]:.6g}", f"{spacing[1]:.6g}"]
    ds.DerivationDescription = "Minimum intensity projection over time of the run"
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = DERIVATION_MINIP
    ds.DerivationCodeSequence = [code]
    refs = [source_image_reference(s, PURPOSE_SOURCE_FOR_PROCESSING) for s in ctx.sources]
    ds.SourceImageSequence = refs

    # Frame of Reference, specific to this run's detector plane.
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PositionReferenceIndicator = ""

    # Image Pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = BITS
    ds.HighBit = BITS - 1
    ds.PixelRepresentation = 0
    ds.NumberOfFrames = 1
    ds.PixelData = pixels.tobytes()
    # Stored values map back to the run's values (after the source Modality LUT).
    ds.RescaleIntercept = f"{intercept:.6g}"
    ds.RescaleSlope = f"{slope:.6g}"
    ds.RescaleType = "US"

    # Multi-frame Functional Groups with the plane geometry.
    measures = Dataset()
    measures.PixelSpacing = [f"{spacing[0]:.6g}", f"{spacing[1]:.6g}"]
    # explicit slice geometry: viewers that build volumes (OHIF) divide by it
    measures.SliceThickness = "1"
    measures.SpacingBetweenSlices = "1"
    orientation = Dataset()
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared = Dataset()
    shared.PixelMeasuresSequence = [measures]
    shared.PlaneOrientationSequence = [orientation]
    position = Dataset()
    position.ImagePositionPatient = [0, 0, 0]
    frame = Dataset()
    frame.PlanePositionSequence = [position]
    ds.SharedFunctionalGroupsSequence = [shared]
    ds.PerFrameFunctionalGroupsSequence = [frame]

    lo, hi = int(pixels.min()), int(pixels.max())
    ds.WindowCenter = (lo + hi) / 2
    ds.WindowWidth = max(hi - lo, 1)
    ds.PresentationLUTShape = "IDENTITY"
    return ds
