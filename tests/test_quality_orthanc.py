"""The verdict and measures read back from what a real Orthanc serves: a DSA run with
patient motion between mask and fill goes to the node (dcmtk storescu), dsa_av
gives a low-confidence result, and Orthanc's WADO-RS returns an SR whose Run
quality group holds the verdict, the reasons and the measures, a rendering with
the LOW CONFIDENCE banner, and a SEG whose Image Comments say the same; the node's
REST API (/jobs, /status) reports the same verdict."""

from __future__ import annotations

import html
import math
from pathlib import Path

import numpy as np
import pytest
import requests
from pydicom import dcmread

import pipelines
from dicom_node.runs import load_run
from pipelines.base import PipelineContext
from pipelines.render import BANNER_RGB
from tests import quality_faults as qf
from tests.conftest import send_storescu
from tests.orthanc_fixture import free_port, missing_parts, orthanc  # noqa: F401  (fixture)
from tests.test_orthanc_integration import (
    NODE_AET,
    needs_storescu,
    result_series,
    running_node,
    wado_series,
    wait_for,
)

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(bool(missing_parts()), reason="Orthanc not installed"),
    needs_storescu,
]
DSA_AV = [{"name": "dsa", "match": {"modality": ["XA"]}, "pipelines": ["dsa_av"]}]


def test_verdict_and_measures_read_back_from_orthanc(tmp_path: Path, orthanc) -> None:  # noqa: F811
    from training.phantoms import dsa

    paths = dsa.generate(11, size=128, frames=10, fps=2.0, motion_mm=3.0).write(tmp_path / "in")
    path = next(p for p in paths if p.suffix == ".dcm")
    expected = pipelines.get("dsa_av")(load_run([path]).run, PipelineContext()).quality
    assert expected is not None and expected.verdict.value == "low_confidence"
    source = dcmread(path, stop_before_pixels=True)
    study, series = str(source.StudyInstanceUID), str(source.SeriesInstanceUID)
    port, api_port = free_port(), free_port()
    with running_node(tmp_path / "node", orthanc, port=port, api_port=api_port, rules=DSA_AV):
        send_storescu(NODE_AET, port, [path])
        found = wait_for(
            "the canvas, the SEG, the rendering and the SR in Orthanc",
            lambda: (lambda s: s if len(s) >= 4 else None)(result_series(orthanc, study)),
            timeout=180,
            every=1.0,
        )
        served = [
            ds for s in found for ds in wado_series(orthanc, study, s["0020000E"]["Value"][0])
        ]
        by_class = {ds.SOPClassUID.name: ds for ds in served}

        verdict, reasons, measures = qf.read_quality(by_class["Comprehensive 3D SR Storage"])
        assert verdict == "LOWCONFIDENCE" and reasons == list(expected.reasons)
        assert "misregistration" in reasons[0]
        finite = {m.name.meaning: m.value for m in expected.measures if math.isfinite(m.value)}
        assert measures == pytest.approx(finite, rel=1e-6)

        seg = by_class["Segmentation Storage"]
        assert seg.ImageComments.startswith("Quality verdict: low_confidence: " + reasons[0])
        rendering = by_class["Secondary Capture Image Storage"]
        assert rendering.ImageComments.startswith("Quality verdict: low_confidence")
        band = rendering.pixel_array[128:]
        assert np.all(band == np.array(BANNER_RGB, np.uint8), axis=-1).mean() > 0.2

        api = f"http://127.0.0.1:{api_port}"
        (job,) = requests.get(f"{api}/jobs", params={"series": series}, timeout=10).json()["jobs"]
        assert job["verdict"] == "low_confidence" and job["reasons"] == "; ".join(reasons)
        assert job["measures"].startswith("vessel fraction of the field ")
        status = requests.get(f"{api}/status", timeout=10).json()
        assert status["verdicts"]["low_confidence"] == 1
        assert status["doubtful_results"][0]["id"] == job["id"]
        # The status page (issue 17): the verdict on the job, the result among those
        # to check, with why.
        page = requests.get(f"{api}/", timeout=10).text
        assert '<span class="v-low_confidence">low confidence</span>' in page
        doubtful = page.split('<table id="doubtful">', 1)[1].split("</table>", 1)[0]
        assert f"#{job['id']}" in doubtful and html.escape(reasons[0]) in doubtful
