"""Fault injection on family A phantoms (tests/quality_faults.py): each fault ends
with the verdict it should, for the classical vessel paths; and the classical
fallback when a real model package's output fails its checks.

Family B (training/phantoms/family_b) plays no part here: the bounds in
pipelines/vessel_quality.py are argued from physics, not fitted to any family.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread

import pipelines
from dicom_node.processing import FALLBACK_SUFFIX, run_pipeline
from dicom_node.runs import LoadedRun
from pipelines.base import PipelineContext, Run
from pipelines.quality import Verdict
from tests import quality_faults as qf
from tests.conftest import dciodvfy_errors

REPO = Path(__file__).resolve().parents[1]
VSS_NET = REPO / "models" / "dsa_ia-vss_net-quick"

# fault -> (verdict, words the first reason must contain)
DSA_FAULTS = {
    "none": (Verdict.OK, ""),
    "collimated": (Verdict.OK, ""),
    "contrast_in_one_frame": (Verdict.LOW_CONFIDENCE, "contrast in too few frames"),
    "motion": (Verdict.LOW_CONFIDENCE, "misregistration"),
    "saturated": (Verdict.LOW_CONFIDENCE, "saturated"),
}
CINE_FAULTS = {
    "none": (Verdict.OK, ""),
    "collimated": (Verdict.OK, ""),
    "contrast_in_one_frame": (Verdict.LOW_CONFIDENCE, "appear and vanish"),
    "saturated": (Verdict.LOW_CONFIDENCE, "saturated"),
}


def _faulted(run: Run, fault: str) -> Run:
    if fault in ("none", "motion"):
        return run
    return getattr(qf, fault)(run)  # type: ignore[no-any-return]


@pytest.mark.parametrize("pipeline", ["dsa_av", "dsa_ia"])
@pytest.mark.parametrize("fault", list(DSA_FAULTS))
def test_dsa_fault_gets_its_verdict(pipeline: str, fault: str) -> None:
    run = qf.dsa_run(motion_mm=3.0) if fault == "motion" else qf.dsa_run()
    result = pipelines.get(pipeline)(_faulted(run, fault), PipelineContext())
    quality = result.quality
    verdict, words = DSA_FAULTS[fault]
    assert quality is not None and quality.verdict is verdict, quality
    if words:
        assert words in quality.reasons[0], quality.reasons
    else:
        assert quality.reasons == ()


@pytest.mark.parametrize("fault", list(CINE_FAULTS))
def test_coronary_fault_gets_its_verdict(fault: str) -> None:
    result = pipelines.get("xa_coronary")(_faulted(qf.cine_run(), fault), PipelineContext())
    quality = result.quality
    verdict, words = CINE_FAULTS[fault]
    assert quality is not None and quality.verdict is verdict, quality
    if words:
        assert words in quality.reasons[0], quality.reasons
    else:
        assert quality.reasons == ()


def test_rotational_verdicts() -> None:
    """A contrast-filled head volume is ok; with the iodine gone (vessels at soft-tissue
    HU) next to no vessel is left for the bone in view."""
    import dataclasses
    import tempfile

    import numpy as np

    from dicom_node.runs import load_run
    from training.phantoms import rotational

    with tempfile.TemporaryDirectory() as tmp:
        folder = rotational.generate(4, size=64).write(Path(tmp))[0].parent
        run = load_run(sorted((folder / "rotational_ct").glob("*.dcm"))).run
    result = pipelines.get("rotational_dla")(run, PipelineContext())
    assert result.quality is not None and result.quality.verdict is Verdict.OK, result.quality
    vessel = result.outputs[0].masks[0]
    soft = float(np.median(run.pixels[result.outputs[0].masks[2] & ~vessel]))
    washed = dataclasses.replace(run, pixels=np.where(vessel, soft, run.pixels).astype(np.float32))
    quality = pipelines.get("rotational_dla")(washed, PipelineContext()).quality
    assert quality is not None and quality.verdict is not Verdict.OK, quality
    assert "vessel" in quality.reasons[0]


def test_model_output_that_fails_falls_back_to_the_classical_path(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The VSS-Net package from models/ sees contrast in one frame only and marks no
    artery (verdict failed); the node runs the classical path for that run, delivers
    its result marked as a classical fallback with why, under UIDs of its own, and
    every object stays dciodvfy-clean."""
    loaded = qf.dsa_loaded()
    faulted = LoadedRun(qf.contrast_in_one_frame(loaded.run), loaded.headers)
    model = pipelines.get("dsa_ia")(faulted.run, PipelineContext(model_package=str(VSS_NET)))
    assert model.quality is not None and model.quality.verdict is Verdict.FAILED

    with caplog.at_level("INFO", logger="dicom_node.processing"):
        datasets, notes = run_pipeline(faulted, "dsa_ia", {"dsa_ia": VSS_NET}, "cpu")
    why = next(n for n in notes if "classical path used for this run" in n)
    logged = [r.getMessage() for r in caplog.records if r.name == "dicom_node.processing"]
    assert why in logged and any(m.startswith("dsa_ia result low_confidence (") for m in logged)
    assert why.startswith("model package ") and " output failed (" in why
    assert any(n.startswith("verdict: low_confidence: ") for n in notes)
    plain, _ = run_pipeline(faulted, "dsa_ia", {}, "cpu")
    canvas = "Multi-frame Grayscale Word Secondary Capture Image Storage"
    results = [ds for ds in datasets if ds.SOPClassUID.name != canvas]
    assert {str(ds.SOPInstanceUID) for ds in results}.isdisjoint(
        str(ds.SOPInstanceUID) for ds in plain
    )
    for i, ds in enumerate(results):
        assert ds.SeriesDescription.endswith(FALLBACK_SUFFIX), ds.SeriesDescription
        path = tmp_path / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == [], ds.SOPClassUID.name
        back = dcmread(path)
        if back.SOPClassUID.name == "Segmentation Storage":
            algorithm = back.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
            assert algorithm.AlgorithmParameters == "family=classical"
            assert why in back.ImageComments
        if back.SOPClassUID.name == "Comprehensive 3D SR Storage":
            verdict, reasons, _ = qf.read_quality(back)
            assert verdict == "LOWCONFIDENCE" and reasons[-1] == why
