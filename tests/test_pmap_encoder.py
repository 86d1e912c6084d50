"""Parametric Map, colour SC, AIF plot SC and TID 1500 SR from dsa_perfusion:
dciodvfy with zero errors on every object type, round trips, codes and units,
and references that resolve within the delivered set plus the XA run."""

from __future__ import annotations

from datetime import datetime

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch
from pydicom.sr.codedict import codes
from skimage import measure

from bench.perfusion import dsa_run
from dicom_node.encode import encode_result
from dicom_node.encode.common import EncodeContext
from dicom_node.encode.pmap import encode_parametric_map
from dicom_node.encode.sr import QUALITY_TITLE
from pipelines.base import (
    ICA,
    MeasurementsOutput,
    ParametricMapOutput,
    PipelineContext,
    RenderingOutput,
    get,
)
from pipelines.perfusion.pipeline import (
    MEAN_TRANSIT_TIME,
    RELATIVE_CBF,
    RELATIVE_CBV,
    TIME_TO_PEAK,
    TMAX,
)
from tests.conftest import dciodvfy_errors
from tests.dicomgen import xa_run
from tests.test_seg_encoder import assert_references_only

torch.set_num_threads(1)
NOW = datetime(2024, 5, 6, 7, 8, 9)
PM_CLASS = "1.2.840.10008.5.1.4.1.1.30"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
CANVAS_CLASS = "1.2.840.10008.5.1.4.1.1.7.3"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


@pytest.fixture(scope="module")
def delivered(tmp_path_factory):
    synthetic = dsa_run(
        11,
        fps=2.0,
        snr=40.0,
        cbfs=(0.01, 0.02),
        mtts=(3.0, 5.0),
        delays=(0.0, 2.0),
        shapes=("exponential",),
    )
    result = get("dsa_perfusion")(synthetic.run, PipelineContext())
    frames, rows, cols = synthetic.run.pixels.shape
    header = xa_run(frames=frames, rows=rows, cols=cols, frame_time_ms=500.0)
    del header.PixelData
    ctx = EncodeContext(sources=[header], pipeline="dsa_perfusion", now=NOW)
    datasets = encode_result(result, synthetic.run, ctx)
    folder = tmp_path_factory.mktemp("perfusion")
    paths = []
    for i, ds in enumerate(datasets):
        path = folder / f"{i:02d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return result, header, datasets, paths


def test_quantity_codes_match_the_standard():
    assert RELATIVE_CBF.meaning == codes.DCM.RelativeRegionalBloodFlow.meaning
    assert RELATIVE_CBV.meaning == codes.DCM.RelativeRegionalBloodVolume.meaning
    assert (RELATIVE_CBF.value, RELATIVE_CBV.value) == ("126397", "126398")
    assert MEAN_TRANSIT_TIME.meaning == codes.DCM.MeanTransitTime.meaning == "Mean Transit Time"
    assert TMAX.value == codes.DCM.Tmax.value == "113084"
    assert TIME_TO_PEAK.meaning == codes.DCM.TimeToPeak.meaning
    assert TIME_TO_PEAK.value == "113069" and MEAN_TRANSIT_TIME.value == "113052"


def test_every_object_type_passes_dciodvfy(delivered):
    _, _, datasets, paths = delivered
    kinds = {str(ds.SOPClassUID) for ds in datasets}
    assert {PM_CLASS, SC_CLASS, SR_CLASS, CANVAS_CLASS} <= kinds
    assert sum(str(ds.SOPClassUID) == PM_CLASS for ds in datasets) == 5
    assert sum(str(ds.SOPClassUID) == SC_CLASS for ds in datasets) == 6
    assert sum(str(ds.SOPClassUID) == SEG_CLASS for ds in datasets) == 1  # the AIF region
    for ds, path in zip(datasets, paths, strict=True):
        assert dciodvfy_errors(path) == [], (ds.SeriesDescription, path)


def test_aif_region_seg_round_trips_on_the_canvas(delivered):
    """The pixels the AIF averaged, as a SEG on the MinIP canvas: what a reader checks
    before trusting the maps."""
    result, _, datasets, _ = delivered
    (seg,) = [ds for ds in datasets if str(ds.SOPClassUID) == SEG_CLASS]
    (canvas,) = [ds for ds in datasets if str(ds.SOPClassUID) == CANVAS_CLASS]
    (output,) = [o for o in result.outputs if o.key == "aif_region"]
    assert str(seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue) == ICA.value
    referenced = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
    assert str(referenced.ReferencedSOPInstanceUID) == str(canvas.SOPInstanceUID)
    assert np.array_equal(seg.pixel_array.astype(bool), output.masks[0])


def test_parametric_maps_round_trip(delivered):
    result, header, datasets, paths = delivered
    outputs = {o.label: o for o in result.outputs if isinstance(o, ParametricMapOutput)}
    canvas = datasets[0]
    seen = set()
    for ds, path in zip(datasets, paths, strict=True):
        if str(ds.SOPClassUID) != PM_CLASS:
            continue
        back = pydicom.dcmread(path)
        mapping = back.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
        label = mapping.LUTLabel
        out = outputs[label]
        seen.add(label)
        # No value = the Float Pixel Padding Value, outside the mapped range.
        padding = float(back.FloatPixelPaddingValue)
        assert padding == -1.0
        expected = np.where(out.valid, out.values, padding).astype(np.float32)
        assert back.pixel_array.dtype == np.float32
        assert np.array_equal(back.pixel_array, expected)
        first = float(mapping.DoubleFloatRealWorldValueFirstValueMapped)
        last = float(mapping.DoubleFloatRealWorldValueLastValueMapped)
        assert first == pytest.approx(out.values[out.valid].min()) and first > padding
        assert last == pytest.approx(out.values[out.valid].max())
        quantity = mapping.QuantityDefinitionSequence[0].ConceptCodeSequence[0]
        assert (quantity.CodeValue, quantity.CodingSchemeDesignator) == (
            out.quantity.value,
            out.quantity.scheme,
        )
        unit = mapping.MeasurementUnitsCodeSequence[0]
        assert unit.CodeValue == ("s" if label in ("MTT", "TMAX", "TTP") else "{ratio}")
        assert float(mapping.RealWorldValueSlope) == 1.0
        if label in ("CBF", "CBV"):
            assert "relative" in mapping.LUTExplanation and "uncalibrated" in mapping.LUTExplanation
        assert "brain" in back.ImageComments and "vessels" in back.ImageComments
        # Geometry and references: the canvas's Frame of Reference; the canvas alone as
        # source and referenced series (it names the run), so OHIF fuses over it.
        assert back.FrameOfReferenceUID == canvas.FrameOfReferenceUID
        assert back.StudyInstanceUID == header.StudyInstanceUID
        assert_references_only(back, canvas)
        assert [i.ReferencedSOPInstanceUID for i in canvas.SourceImageSequence] == [
            header.SOPInstanceUID
        ]
        assert hd.pm.ParametricMap.from_dataset(back).SOPInstanceUID == ds.SOPInstanceUID
    assert seen == {"CBF", "CBV", "MTT", "TMAX", "TTP"}


def test_times_are_seconds_in_the_objects(delivered):
    """Seconds-versus-milliseconds guard at the DICOM edge: the DRO's MTTs are 3-5 s."""
    result, _, datasets, paths = delivered
    for ds, path in zip(datasets, paths, strict=True):
        if str(ds.SOPClassUID) != PM_CLASS:
            continue
        back = pydicom.dcmread(path)
        mapping = back.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
        if mapping.LUTLabel == "MTT":
            inside = back.pixel_array[back.pixel_array > 0]
            assert 2.0 < float(np.median(inside)) < 7.0
            assert mapping.MeasurementUnitsCodeSequence[0].CodeMeaning == "second"


def test_renderings_round_trip(delivered):
    result, _, datasets, paths = delivered
    renderings = {o.description: o for o in result.outputs if isinstance(o, RenderingOutput)}
    found = 0
    for ds, path in zip(datasets, paths, strict=True):
        if str(ds.SOPClassUID) != SC_CLASS:
            continue
        back = pydicom.dcmread(path)
        out = renderings[back.SeriesDescription.removeprefix("AI ")]
        # The rendering, with the quality band the encoder sets under it (the verdict).
        height = out.rgb.shape[0]
        assert np.array_equal(back.pixel_array[:height], out.rgb)
        assert back.pixel_array.shape[0] > height
        assert back.BurnedInAnnotation == "YES"
        found += 1
    assert found == 6


def test_sr_round_trip(delivered):
    """TID 1500 with the AIF measurements as a TID 1410 planar ROI on the canvas: the
    region is the outline of the AIF pixels, what a viewer draws with the values."""
    result, header, datasets, paths = delivered
    (out,) = [o for o in result.outputs if isinstance(o, MeasurementsOutput)]
    (path,) = [p for ds, p in zip(datasets, paths, strict=True) if str(ds.SOPClassUID) == SR_CLASS]
    canvas = datasets[0]
    sr = hd.sr.srread(path)
    report = hd.sr.MeasurementReport.from_sequence([sr])
    assert report.get_image_measurement_groups() == []
    group, quality = report.get_planar_roi_measurement_groups()  # AIF, then "Run quality"
    assert quality.tracking_identifier == QUALITY_TITLE
    assert {m.name.value for m in quality.get_measurements()} >= {"AIFSNR", "NOVALUE"}
    back = {m.name.value: (m.value, m.unit.value) for m in group.get_measurements()}
    assert back == {m.name.value: (pytest.approx(m.value), m.unit.value) for m in out.measurements}
    assert group.finding_sites[0].value.value == "86117002"  # internal carotid artery
    region = group.roi
    assert region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
    selected_from = region.ContentSequence[0].ReferencedSOPSequence[0]
    assert selected_from.ReferencedSOPInstanceUID == canvas.SOPInstanceUID
    assert int(selected_from.ReferencedFrameNumber) == 1
    points = region.value  # (x = column, y = row), closed
    assert np.array_equal(points[0], points[-1]) and len(points) >= 4
    rows, cols = np.nonzero(out.region)
    inside = measure.points_in_poly(np.stack([cols + 0.5, rows + 0.5], axis=1), points)
    assert inside.mean() > 0.9, points  # the outline encloses the AIF pixels
    evidence = {
        str(ref.ReferencedSOPInstanceUID)
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert evidence == {header.SOPInstanceUID, canvas.SOPInstanceUID}


def test_encoder_refuses_a_map_without_canvas():
    out = ParametricMapOutput(
        "mtt", np.ones((4, 4), np.float32), "MTT", MEAN_TRANSIT_TIME, codes.UCUM.Second, None
    )  # type: ignore[arg-type]
    header = xa_run(frames=4, rows=4, cols=4)
    with pytest.raises(ValueError, match="canvas"):
        encode_parametric_map(out, EncodeContext(sources=[header], pipeline="dsa_perfusion"))


def test_deterministic_uids(delivered):
    """The same result encoded again (later, say) has the same UIDs."""
    result, header, datasets, _ = delivered
    run = dsa_run(
        11,
        fps=2.0,
        snr=40.0,
        cbfs=(0.01, 0.02),
        mtts=(3.0, 5.0),
        delays=(0.0, 2.0),
        shapes=("exponential",),
    ).run
    ctx = EncodeContext(sources=[header], pipeline="dsa_perfusion", now=datetime(2025, 1, 1))
    again = encode_result(result, run, ctx)
    assert [d.SOPInstanceUID for d in again] == [d.SOPInstanceUID for d in datasets]
    assert [d.SeriesInstanceUID for d in again] == [d.SeriesInstanceUID for d in datasets]


@pytest.mark.parametrize("with_canvas", [True, False], ids=["canvas", "volume"])
def test_sr_run_quality_group(tmp_path, with_canvas):
    """Per-run quality measures (MeasurementsOutput.quality) are their own group, "Run
    quality": over the whole canvas on a 2D run (TID 1410), not tied to an image region
    without one (TID 1501); dciodvfy-clean either way, quality-only reports too."""
    from dicom_node.encode.canvas import make_canvas
    from dicom_node.encode.sr import QUALITY_TITLE, encode_measurements
    from pipelines.base import AlgorithmInfo, Code, Measurement

    header = xa_run(frames=4, rows=24, cols=20)
    del header.PixelData
    ctx = EncodeContext(sources=[header], pipeline="dsa_perfusion", now=NOW)
    if with_canvas:
        ctx.canvas = make_canvas(ctx, np.ones((24, 20), np.float32))
    snr = Measurement(Code("C0000", "99TEST", "AIF peak SNR"), 42.0, Code("1", "UCUM", "no units"))
    arrival = Measurement(Code("126371", "DCM", "Bolus Arrival Time"), 1.5, Code("s", "UCUM", "s"))
    algorithm = AlgorithmInfo("dsa_perfusion", "1.0.0", "classical")
    for measurements in ([arrival], []):
        out = MeasurementsOutput("aif", "AIF", measurements, algorithm, quality=[snr])
        (sr,) = encode_measurements(out, ctx)
        path = tmp_path / f"sr-{len(measurements)}.dcm"
        sr.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == []
        report = hd.sr.MeasurementReport.from_sequence([hd.sr.srread(path)])
        groups = (
            report.get_planar_roi_measurement_groups()
            if with_canvas
            else report.get_image_measurement_groups()
        )
        titles = [g.tracking_identifier for g in groups]
        assert titles == (["AIF"] if measurements else []) + [QUALITY_TITLE]
        quality = groups[-1]
        assert [m.value for m in quality.get_measurements()] == [42.0]
        if with_canvas:  # the whole canvas, corner to corner
            points = quality.roi.value
            assert points.min(axis=0).tolist() == [0, 0] and points.max(axis=0).tolist() == [20, 24]
