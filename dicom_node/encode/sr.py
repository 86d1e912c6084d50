"""DICOM SR (TID 1500 Measurement Report, highdicom) for ``MeasurementsOutput``.

On a 2D run the measurements are a TID 1410 planar ROI group whose image region
is the outline of ``out.region`` on the MinIP canvas (the AIF pixels, for the
perfusion AIF): a viewer that displays measurement reports (OHIF) opens the
canvas, draws the region and lists the values. The run's quality measures
(``out.quality``) form a second group, "Run quality", over the whole canvas; the
result's quality assessment (``EncodeContext.quality``, see ``pipelines.quality``)
joins it: its measures, the verdict as a qualitative evaluation and each reason as
a text item. Codes of the private scheme ``99ADN`` are declared in the Coding
Scheme Identification Sequence.
Without a canvas (a volume run) the groups are TID 1501, measurements not tied
to an image region. Each group carries the algorithm (TID 4019) and the finding
site; the observer is the node as a device. The canvas and the XA run are the
evidence, so the report lands in the run's study.

A report that replaces an earlier one of the same pipeline and source (other
package or settings) names it in the Predecessor Documents Sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import Comprehensive3DSRStorage
from pydicom.valuerep import DA, TM
from scipy import ndimage
from skimage import measure

from dicom_node.encode import encoder
from dicom_node.encode.common import (
    MANUFACTURER,
    MODEL_NAME,
    EncodeContext,
    Superseded,
    coded,
    series_description,
)
from pipelines.base import AlgorithmInfo, Code, Measurement, MeasurementsOutput, Output, Run
from pipelines.quality import (
    PRIVATE_SCHEME,
    PRIVATE_SCHEME_NAME,
    REASON_CONCEPT,
    VERDICT_CONCEPT,
    Quality,
)

# SCT 77343006 "Angiography": the procedure the measurements come from.
PROCEDURE = codes.SCT.Angiography
QUALITY_TITLE = "Run quality"
_Group = TypeVar(
    "_Group",
    hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations,
    hd.sr.MeasurementsAndQualitativeEvaluations,
)


def algorithm_id(info: AlgorithmInfo) -> hd.sr.AlgorithmIdentification:
    if info.family == "model":
        return hd.sr.AlgorithmIdentification(
            name=info.name,
            version=info.version,
            parameters=[
                f"model_package={info.model_package}",
                f"model_version={info.model_version}",
            ],
        )
    return hd.sr.AlgorithmIdentification(
        name=info.name, version=info.version, parameters=["family=classical"]
    )


def region_outline(mask: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray:
    """A closed outline (x = column, y = row, pixel corners at integers) around
    ``mask``; the image border when there is no mask.

    One region per measurement group (TID 1410): the mask grown by one pixel, which
    joins the fragments of a vessel (the AIF keeps only its clean pixels), and of
    that the largest connected part."""
    rows, cols = shape
    border = np.array([[0, 0], [cols, 0], [cols, rows], [0, rows], [0, 0]], np.float32)
    if mask is None:
        return border
    mask = np.asarray(mask, bool)
    if mask.shape != shape:
        raise ValueError(f"measurement region {mask.shape} does not fit the canvas {shape}")
    labels, count = ndimage.label(ndimage.binary_dilation(mask, np.ones((3, 3), bool)))
    if count == 0:
        return border
    largest = 1 + int(np.argmax(ndimage.sum_labels(labels > 0, labels, range(1, count + 1))))
    padded = np.pad(labels == largest, 1)
    contour = max(measure.find_contours(padded.astype(np.float32), 0.5), key=len)
    contour = measure.approximate_polygon(contour, tolerance=0.5)
    # find_contours: (row, column) of pixel centres in the padded image.
    points = np.stack([contour[:, 1] - 0.5, contour[:, 0] - 0.5], axis=1).astype(np.float32)
    if not np.array_equal(points[0], points[-1]):
        points = np.vstack([points, points[:1]])
    return points


def _finite(items: Sequence[Measurement]) -> list[hd.sr.Measurement]:
    return [
        hd.sr.Measurement(name=coded(m.name), value=float(m.value), unit=coded(m.unit))
        for m in items
        if np.isfinite(m.value)
    ]


def _group(
    ctx: EncodeContext,
    out: MeasurementsOutput,
    title: str,
    measurements: list[hd.sr.Measurement],
    region: np.ndarray | None,
    site: Code | None,
    quality: Quality | None = None,
) -> (
    hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    | hd.sr.MeasurementsAndQualitativeEvaluations
):
    tracking = hd.sr.TrackingIdentifier(
        uid=ctx.result_uid(out.key, "tracking", title), identifier=title[:64]
    )
    sites = [hd.sr.FindingSite(coded(site))] if site else None
    evaluations = (
        [hd.sr.QualitativeEvaluation(coded(VERDICT_CONCEPT), coded(quality.verdict.code))]
        if quality is not None
        else None
    )
    canvas = ctx.canvas
    group: (
        hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
        | hd.sr.MeasurementsAndQualitativeEvaluations
    )
    if canvas is None:
        group = hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking,
            algorithm_id=algorithm_id(out.algorithm),
            finding_sites=sites,
            measurements=measurements or None,
            qualitative_evaluations=evaluations,
        )
        return _with_reasons(group, quality)
    outline = region_outline(region, (int(canvas.Rows), int(canvas.Columns)))
    image_region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=outline,
        source_image=hd.sr.SourceImageForRegion.from_source_image(
            canvas, referenced_frame_numbers=[1]
        ),
    )
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        referenced_region=image_region,
        algorithm_id=algorithm_id(out.algorithm),
        finding_sites=sites,
        measurements=measurements or None,
        qualitative_evaluations=evaluations,
    )
    return _with_reasons(group, quality)


def _with_reasons(group: _Group, quality: Quality | None) -> _Group:
    """Each reason for the verdict as a TEXT item of the group (the fallback too)."""
    if quality is None:
        return group
    for reason in quality.reasons:
        group[0].ContentSequence.append(
            hd.sr.TextContentItem(
                name=coded(REASON_CONCEPT),
                value=reason[:1024],
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    return group


def scheme_identification() -> Dataset:
    """A Coding Scheme Identification Sequence item for the private scheme."""
    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = PRIVATE_SCHEME_NAME
    item.CodingSchemeResponsibleOrganization = MANUFACTURER
    return item


def _predecessor(ctx: EncodeContext, superseded: Superseded) -> Dataset:
    """A Predecessor Documents Sequence item: the superseded report."""
    sop = []
    for sop_class, sop_instance in superseded.instances:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        sop.append(item)
    series = Dataset()
    series.SeriesInstanceUID = superseded.series_uid
    series.ReferencedSOPSequence = sop
    study = Dataset()
    study.StudyInstanceUID = ctx.first.StudyInstanceUID
    study.ReferencedSeriesSequence = [series]
    return study


def encode_measurements(out: MeasurementsOutput, ctx: EncodeContext) -> list[Dataset]:
    assessed = ctx.quality
    measurements = _finite(out.measurements)
    # the output's own quality measures and the assessment's, each measure once
    merged = {m.name: m for m in [*out.quality, *(assessed.measures if assessed else ())]}
    quality = _finite(list(merged.values()))
    if not measurements and not quality and assessed is None:
        raise ValueError(f"measurements {out.key!r}: no finite value to report")
    groups = []
    if measurements:
        groups.append(_group(ctx, out, out.title, measurements, out.region, out.finding_site))
    if quality or assessed is not None:  # the whole run
        groups.append(_group(ctx, out, QUALITY_TITLE, quality, None, None, assessed))
    device = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=ctx.uid("device", MODEL_NAME),
            name=MODEL_NAME,
            manufacturer_name=MANUFACTURER,
            model_name=MODEL_NAME,
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=PROCEDURE,
        imaging_measurements=groups,
        title=codes.cid7021.ImagingMeasurementReport,
    )
    superseded = ctx.superseded(out.key, Comprehensive3DSRStorage)
    evidence = ([ctx.canvas] if ctx.canvas is not None else []) + list(ctx.sources)
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report[0],
        series_instance_uid=ctx.series_uid(out.key),
        series_number=ctx.series_number(out.key),
        sop_instance_uid=ctx.result_uid(out.key, "instance"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=series_description(out.title, superseded),
        content_date=ctx.now.date(),
        content_time=ctx.now.time(),
        specific_character_set=None,  # the source's, as it is, after (see encode.seg)
    )
    sr.ManufacturerModelName = MODEL_NAME
    sr.SeriesDate, sr.SeriesTime = DA(ctx.now.date()), TM(ctx.now.time())
    if superseded is not None:
        sr.PredecessorDocumentsSequence = [_predecessor(ctx, superseded)]
    if PRIVATE_SCHEME in {str(v) for v in _schemes(sr)}:
        sr.CodingSchemeIdentificationSequence = [scheme_identification()]
    return [sr]


def _schemes(ds: Dataset) -> set[str]:
    """Every Coding Scheme Designator in the content tree."""
    found: set[str] = set()
    for item in ds.get("ContentSequence", []):
        for keyword in (
            "ConceptNameCodeSequence",
            "ConceptCodeSequence",
            "MeasurementUnitsCodeSequence",
        ):
            for code in item.get(keyword, []):
                found.add(str(code.get("CodingSchemeDesignator", "")))
        for seq in ("MeasuredValueSequence",):
            for mv in item.get(seq, []):
                for code in mv.get("MeasurementUnitsCodeSequence", []):
                    found.add(str(code.get("CodingSchemeDesignator", "")))
        found |= _schemes(item)
    return found


@encoder(MeasurementsOutput)
def _measurements(out: Output, ctx: EncodeContext, run: Run) -> list[Dataset]:
    assert isinstance(out, MeasurementsOutput)
    return encode_measurements(out, ctx)
