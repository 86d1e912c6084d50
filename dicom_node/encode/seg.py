"""DICOM Segmentation (BINARY, highdicom) for ``SegmentationOutput``.

Sources by geometry:

- ``canvas``: the MinIP canvas (``ctx.canvas``), delivered before the SEG.
- ``frames``: a frames canvas built here from the run (one source frame per
  mask frame), returned before the SEG so every reference resolves.
- ``volume``: the source images themselves (they have a Frame of Reference).

References name only the series whose geometry the SEG shares: the SEG's
Source Image Sequence, its per-frame Derivation Image Sequence and its Common
Instance Reference module (Referenced Series Sequence) all point at the canvas.
The XA run stays referenced through the canvas, whose Source Image Sequence
(and, for the MinIP canvas, Derivation Code) names it: SEG -> canvas -> XA. A
viewer that resolves the SEG's referenced series (OHIF takes the first) then
always finds the canvas; listing the XA run there too made OHIF pick it half the
time, and the XA run has no plane geometry to overlay on.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import SegmentationStorage

from dicom_node import __version__
from dicom_node.encode import encoder
from dicom_node.encode.common import (
    MANUFACTURER,
    MODEL_NAME,
    EncodeContext,
    coded,
    mark_supersession,
    series_description,
    set_dimension_organization,
)
from dicom_node.encode.frames_canvas import make_frames_canvas
from pipelines.base import AlgorithmInfo, Output, Run, SegmentationOutput


def algorithm_identification(info: AlgorithmInfo) -> hd.AlgorithmIdentificationSequence:
    """Name, version and family; a model package's name and version go into both
    the version string and the parameters, so a viewer shows them either way."""
    if info.family == "model":
        family = codes.cid7162.ArtificialIntelligence
        version = f"{info.version} ({info.model_package} {info.model_version})"
        parameters = {
            "model_package": str(info.model_package),
            "model_version": str(info.model_version),
        }
    else:
        # The classical vessel methods of this node are multi-scale (Hessian) filters.
        family = codes.cid7162.MultiScaleResolutionFiltering
        version, parameters = info.version, {"family": "classical"}
    return hd.AlgorithmIdentificationSequence(
        name=info.name[:64], family=family, version=version[:64], parameters=parameters
    )


def segment_descriptions(out: SegmentationOutput) -> list[hd.seg.SegmentDescription]:
    algorithm = algorithm_identification(out.algorithm)
    return [
        hd.seg.SegmentDescription(
            segment_number=i + 1,
            segment_label=seg.label[:64],
            segmented_property_category=coded(seg.category),
            segmented_property_type=coded(seg.code),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            display_color=hd.color.CIELabColor.from_rgb(*seg.color_rgb),
        )
        for i, seg in enumerate(out.segments)
    ]


def _pixel_array(out: SegmentationOutput, frames: int | None) -> np.ndarray:
    """Masks as highdicom takes them: segments that never overlap as one label map
    (frames, rows, columns) of segment numbers, else (frames, rows, columns,
    segments) bool. The label map is the same SEG at a fraction of the memory:
    highdicom sums a stack over its segments in int64 to look for overlaps (8
    bytes a voxel, 1 GB for a 512³ volume)."""
    masks = np.asarray(out.masks, dtype=bool)
    expected = {"canvas": 3, "frames": 4, "volume": 4}[out.geometry]
    if masks.ndim != expected or masks.shape[0] != len(out.segments):
        raise ValueError(
            f"SEG {out.key!r}: masks {masks.shape} do not fit geometry "
            f"{out.geometry!r} with {len(out.segments)} segments"
        )
    if out.geometry == "canvas":
        masks = masks[:, None]
    if frames is not None and masks.shape[1] != frames:
        raise ValueError(
            f"SEG {out.key!r}: {masks.shape[1]} mask frames for {frames} source frames"
        )
    if len(out.segments) < 256 and _disjoint(masks):
        labels = np.zeros(masks.shape[1:], np.uint8)
        for number, mask in enumerate(masks, start=1):
            labels[mask] = number
        return labels
    return np.ascontiguousarray(np.moveaxis(masks, 0, -1))


def _disjoint(masks: np.ndarray) -> bool:
    """No pixel in two of the (segments, ...) masks."""
    seen = np.zeros(masks.shape[1:], bool)
    for mask in masks:
        if (seen & mask).any():
            return False
        seen |= mask
    return True


def encode_segmentation(out: SegmentationOutput, ctx: EncodeContext, run: Run) -> list[Dataset]:
    """The SEG, preceded by any canvas it references that is not delivered elsewhere."""
    delivered: list[Dataset] = []
    if out.geometry == "canvas":
        if ctx.canvas is None:
            raise ValueError(f"SEG {out.key!r} on the canvas, but no canvas was made")
        sources: Sequence[Dataset] = [ctx.canvas]
        frames: int | None = 1
    elif out.geometry == "frames":
        canvas = make_frames_canvas(ctx, run.pixels, run.meta.frame_times_s)
        delivered.append(canvas)
        sources, frames = [canvas], run.pixels.shape[0]
    else:
        sources, frames = list(ctx.sources), None
    pixels = _pixel_array(out, frames)
    description = out.description or f"{out.key} segmentation"
    superseded = ctx.superseded(out.key, SegmentationStorage)
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(out),
        series_instance_uid=ctx.series_uid(out.key),
        series_number=ctx.series_number(out.key),
        sop_instance_uid=ctx.result_uid(out.key, "instance"),
        instance_number=1,
        content_description=out.algorithm.describe()[:64],
        content_label=out.key.upper().replace("-", "_")[:16],
        # Empty frames are left out (the reader treats them as empty), except on
        # the one-frame canvas and when nothing at all was found.
        omit_empty_frames=out.geometry != "canvas" and bool(pixels.any()),
        series_description=series_description(description, superseded),
        series_date=ctx.now.date(),
        series_time=ctx.now.time(),
        content_date=ctx.now.date(),
        content_time=ctx.now.time(),
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MODEL_NAME,
        software_versions=__version__,
        device_serial_number="0",
        # The source's Specific Character Set is written as it is, after (as on every
        # result: encode.copy_character_set); highdicom would refuse an empty or
        # unknown one of a volume's slices, which senders write.
        specific_character_set=None,
    )
    set_dimension_organization(seg, ctx.result_uid(out.key, "dimension-organization"))
    mark_supersession(seg, superseded)
    return [*delivered, seg]


@encoder(SegmentationOutput)
def _segmentation(out: Output, ctx: EncodeContext, run: Run) -> list[Dataset]:
    assert isinstance(out, SegmentationOutput)
    return encode_segmentation(out, ctx, run)
