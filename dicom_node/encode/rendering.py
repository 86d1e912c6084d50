"""Renderings as Secondary Capture: RGB single frame (SC Image) or cine
(Multi-frame True Color SC), each in its own series, labelled as AI output.

When the result carries a quality assessment (``EncodeContext.quality``), a band
under the image says the verdict and the measures, with a "LOW CONFIDENCE:
reason" banner when so (``pipelines.render.quality_panel``), and Image Comments
carry the verdict, every reason and every measure."""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
    SecondaryCaptureImageStorage,
)

from dicom_node.encode.common import (
    PURPOSE_SOURCE_FOR_PROCESSING,
    EncodeContext,
    copy_identity,
    mark_quality,
    mark_supersession,
    set_equipment,
    set_laterality,
    source_image_reference,
)
from pipelines.base import RenderingOutput
from pipelines.quality import Quality
from pipelines.render import quality_panel


def with_quality(rgb: np.ndarray, quality: Quality | None) -> np.ndarray:
    """The rendering with the quality band under it (every frame of a cine)."""
    if quality is None:
        return rgb
    line = f"Quality {quality.verdict.label}: {quality.summary()}"
    if quality.fallback:
        line = f"{quality.fallback}. {line}"
    panel = quality_panel(int(rgb.shape[-2]), line, quality.banner())
    if rgb.ndim == 4:
        panel = np.broadcast_to(panel, (rgb.shape[0], *panel.shape))
    return np.concatenate([rgb, panel], axis=-3)


def encode_rendering(
    out: RenderingOutput, ctx: EncodeContext, frame_time_ms: float | None = None
) -> list[Dataset]:
    rgb = np.ascontiguousarray(out.rgb, dtype=np.uint8)
    cine = rgb.ndim == 4
    if rgb.shape[-1] != 3 or rgb.ndim not in (3, 4):
        raise ValueError(
            f"rendering {out.key!r} must be (H, W, 3) or (T, H, W, 3), got {rgb.shape}"
        )
    rgb = np.ascontiguousarray(with_quality(rgb, ctx.quality))
    src = ctx.first
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = (
        MultiFrameTrueColorSecondaryCaptureImageStorage if cine else SecondaryCaptureImageStorage
    )
    ds.SOPInstanceUID = ctx.result_uid(out.key, "instance")
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    copy_identity(ds, src)
    superseded = ctx.superseded(out.key, ds.SOPClassUID)
    set_equipment(
        ds,
        out.description,
        ctx.series_uid(out.key),
        ctx.series_number(out.key),
        "OT",
        ctx.now,
        superseded,
    )
    mark_supersession(ds, superseded)
    mark_quality(ds, ctx.quality)
    set_laterality(ds, src)
    ds.PatientOrientation = src.get("PatientOrientation", "")
    ds.ConversionType = "WSD"
    ds.InstanceNumber = 1
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.BurnedInAnnotation = "YES" if out.burned_in_text else "NO"
    ds.RecognizableVisualFeatures = "NO"
    ds.LossyImageCompression = "00"
    ds.DerivationDescription = out.description[:1024]
    ds.SourceImageSequence = [
        source_image_reference(s, PURPOSE_SOURCE_FOR_PROCESSING) for s in ctx.sources
    ]
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = rgb.shape[-3], rgb.shape[-2]
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    if cine:
        ds.NumberOfFrames = rgb.shape[0]
        if frame_time_ms is not None and frame_time_ms > 0:
            ds.FrameTime = f"{frame_time_ms:.6g}"
            ds.FrameIncrementPointer = 0x00181063  # Frame Time
        else:
            ds.FrameIncrementPointer = 0x00182002  # Frame Label Vector
            ds.FrameLabelVector = [f"{i + 1}" for i in range(rgb.shape[0])]
    ds.PixelData = rgb.tobytes()
    return [ds]
