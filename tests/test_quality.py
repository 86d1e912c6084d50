"""The quality interface (pipelines.quality), how results carry it (SR, renderings,
Image Comments; dciodvfy-clean) and how the index reports it (job notes, status,
/jobs). Fault injection and the classical fallback: tests/test_quality_faults.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

import pipelines
from dicom_node.encode import encode_result
from dicom_node.encode.common import EncodeContext
from pipelines.base import PipelineContext
from pipelines.quality import (
    NO_UNIT,
    Check,
    Quality,
    Verdict,
    assess,
    combine,
    measure,
    verdict_from_notes,
)
from pipelines.render import BANNER_RGB
from tests import quality_faults as qf
from tests.conftest import dciodvfy_errors


def _m(value: float, code: str = "X") -> object:
    return measure(code, f"Measure {code}", value, NO_UNIT)


def test_verdict_is_the_worst_failed_check_with_its_reason_first() -> None:
    low = Check(_m(1.0, "A"), "a is low", low=2.0)  # low confidence
    bad = Check(_m(9.0, "B"), "b is far too high", high=5.0, severity=Verdict.FAILED)
    fine = Check(_m(3.0, "C"), "c", low=0.0, high=10.0)
    q = assess([low, fine, bad])
    assert q.verdict is Verdict.FAILED
    assert q.reasons == ("measure b 9 above 5: b is far too high", "measure a 1 below 2: a is low")
    assert [m.name.value for m in q.measures] == ["A", "C", "B"]
    assert q.banner().startswith("FAILED: measure b 9 above 5")
    assert assess([fine]).verdict is Verdict.OK and assess([fine]).banner() == ""


def test_two_bounds_on_one_measure_give_one_reason_and_one_measure() -> None:
    m = _m(0.0)
    q = assess(
        [
            Check(m, "nothing", low=1e-9, severity=Verdict.FAILED),
            Check(m, "little", low=0.1),
        ]
    )
    assert q.verdict is Verdict.FAILED and q.reasons == ("measure x 0: nothing",)
    assert len(q.measures) == 1


def test_a_measure_that_cannot_be_computed_fails_unless_missing_is_ok() -> None:
    nan = _m(math.nan)
    assert assess([Check(nan, "unknown", low=1.0)]).verdict is Verdict.LOW_CONFIDENCE
    assert "not measurable" in assess([Check(nan, "unknown", low=1.0)]).reasons[0]
    assert assess([Check(nan, "unknown", low=1.0, missing_ok=True)]).verdict is Verdict.OK


def test_notes_round_trip_and_combine() -> None:
    q = assess([Check(_m(1.0), "low", low=2.0)]).with_fallback("model X failed: classical used")
    notes = q.notes()
    assert notes[0].startswith("verdict: low_confidence: measure x 1 below 2: low")
    assert notes[1] == "quality: measure x 1"
    assert verdict_from_notes(["other", *notes]) == "low_confidence"
    assert verdict_from_notes(["verdict: maybe"]) is None
    both = combine(Quality(verdict=Verdict.OK), q, None)
    assert both is not None and both.verdict is Verdict.LOW_CONFIDENCE
    assert both.fallback == "model X failed: classical used"
    assert combine(None) is None


def _encode(result, loaded, tmp_path: Path, **ctx) -> list:  # type: ignore[no-untyped-def]
    datasets = encode_result(
        result, loaded.run, EncodeContext(sources=loaded.headers, pipeline="dsa_av", **ctx)
    )
    for i, ds in enumerate(datasets):
        path = tmp_path / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == [], ds.SOPClassUID.name
    return [dcmread(tmp_path / f"{i}.dcm") for i in range(len(datasets))]


def test_low_confidence_result_carries_verdict_everywhere_and_stays_valid(tmp_path: Path) -> None:
    """Motion between mask and fill: a low-confidence dsa_av result. The SR's Run quality
    group holds the verdict, the reasons and every finite measure; the rendering has
    the red LOW CONFIDENCE banner under the image; SEG and rendering carry the verdict
    in Image Comments; the canvas (shared by every pipeline) does not; dciodvfy-clean."""
    loaded = qf.dsa_loaded(size=128, frames=10, motion_mm=3.0)
    result = pipelines.get("dsa_av")(loaded.run, PipelineContext())
    assert result.quality is not None and result.quality.verdict is Verdict.LOW_CONFIDENCE
    back = _encode(result, loaded, tmp_path)
    by_class = {ds.SOPClassUID.name: ds for ds in back}
    sr = by_class["Comprehensive 3D SR Storage"]
    verdict, reasons, measures = qf.read_quality(sr)
    assert verdict == "LOWCONFIDENCE"
    assert reasons == list(result.quality.reasons) and "misregistration" in reasons[0]
    expected = {m.name.meaning: m.value for m in result.quality.measures if math.isfinite(m.value)}
    assert measures == pytest.approx(expected)
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99ADN"
    for kind in ("Segmentation Storage", "Secondary Capture Image Storage"):
        assert by_class[kind].ImageComments.startswith("Quality verdict: low_confidence: ")
    canvas = by_class["Multi-frame Grayscale Word Secondary Capture Image Storage"]
    assert "ImageComments" not in canvas
    rendering = by_class["Secondary Capture Image Storage"].pixel_array
    overlay = result.outputs[2].rgb
    assert rendering.shape[0] > overlay.shape[0]
    assert np.array_equal(rendering[: overlay.shape[0]], overlay)
    band = rendering[overlay.shape[0] :]
    red = np.all(band == np.array(BANNER_RGB, np.uint8), axis=-1)
    assert red.mean() > 0.2  # the banner


def test_ok_result_has_no_banner(tmp_path: Path) -> None:
    loaded = qf.dsa_loaded(size=128, frames=10)
    result = pipelines.get("dsa_av")(loaded.run, PipelineContext())
    assert result.quality is not None and result.quality.verdict is Verdict.OK, result.quality
    back = _encode(result, loaded, tmp_path)
    sr = next(ds for ds in back if ds.SOPClassUID.name == "Comprehensive 3D SR Storage")
    assert qf.read_quality(sr)[:2] == ("OK", [])
    rendering = next(ds for ds in back if ds.SOPClassUID.name == "Secondary Capture Image Storage")
    band = rendering.pixel_array[result.outputs[2].rgb.shape[0] :]
    assert not np.all(band == np.array(BANNER_RGB, np.uint8), axis=-1).any()
    assert (band > 200).any()  # the quality line is there


def test_index_reports_verdicts_in_status_and_jobs(tmp_path: Path) -> None:
    """Job notes carry the verdict; status counts verdicts and lists results that are not
    ok with their reasons; /jobs (jobs_for) gives each job's verdict and measures."""
    from dicom_node.db import Database, InstanceRecord, JobState

    db = Database(tmp_path / "node.sqlite")
    db.record_instance(
        InstanceRecord("1.2.3", "1.2.840.10008.5.1.4.1.1.12.1", "1.2", "1", "run-1", Path("x"),
                       1, "1.2.840.10008.1.2.1", 5, "AE")
    )  # fmt: skip
    assert db.complete_run("run-1", "test")
    assert len(db.route_run("run-1", "rule", ["dsa_av", "dsa_ia"], [])) == 2
    low = assess([Check(_m(1.0), "too low", low=2.0)])
    ok = assess([Check(_m(3.0), "too low", low=2.0)])
    for quality in (low, ok):
        job = db.claim_job("w", 60.0, 3)
        assert job is not None
        assert db.finish_job(job, [], ["device cpu", *quality.notes()])
    summary = db.status_summary()
    assert summary["verdicts"] == {"ok": 1, "low_confidence": 1, "failed": 0}
    (doubtful,) = summary["doubtful_results"]
    assert doubtful["verdict"] == "low_confidence" and doubtful["reasons"] == low.reasons[0]
    jobs = [j for j in db.jobs_for(series_uid="1.2") if j["state"] == JobState.DONE]
    assert sorted(j["verdict"] for j in jobs) == ["low_confidence", "ok"]
    for j in jobs:
        assert j["measures"] == "measure x " + ("3" if j["verdict"] == "ok" else "1")
    json.dumps(summary, default=str)


def test_a_report_with_its_own_quality_measures_lists_each_once(tmp_path: Path) -> None:
    """A pipeline that gives the same measures in its report and in its assessment (as
    dsa_perfusion does) gets each measure once in the Run quality group."""
    import dataclasses

    from pipelines.base import MeasurementsOutput

    loaded = qf.dsa_loaded(size=128, frames=10)
    result = pipelines.get("dsa_av")(loaded.run, PipelineContext())
    assert result.quality is not None
    seg = result.outputs[0]
    report = MeasurementsOutput(
        "aif",
        "AIF",
        [],
        seg.algorithm,
        quality=list(result.quality.measures),  # type: ignore[union-attr]
    )
    result = dataclasses.replace(result, outputs=[*result.outputs, report])
    back = _encode(result, loaded, tmp_path)
    (sr,) = [ds for ds in back if ds.SOPClassUID.name == "Comprehensive 3D SR Storage"]
    measures = qf.read_quality(sr)[2]
    names = [
        item.ConceptNameCodeSequence[0].CodeMeaning
        for c in sr.ContentSequence
        if c.ValueType == "CONTAINER"
        for g in c.get("ContentSequence", [])
        if g.ValueType == "CONTAINER"
        for item in g.ContentSequence
        if item.ValueType == "NUM"
    ]
    assert len(names) == len(set(names)) == len(measures) > 0
