"""A new result never hides behind an old UID: a run processed with one model package,
the package replaced, the run processed again through Orthanc's 'process again'. With
Orthanc's default settings (it keeps the first copy of an instance), the new result
must arrive as new instances in a new series, the old result stays, and the new series
names the one it supersedes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from tests.orthanc_fixture import free_port, start_orthanc
from tests.test_orthanc_integration import (
    FAST,
    NODE_AET,
    needs_orthanc,
    needs_storescu,
    node_status,
    phantom_dsa_file,
    storescu,
    wado_series,
    wait_for,
)
from tests.test_sandbox import _tiny_package

pytestmark = pytest.mark.timeout(300)
SEG = "1.2.840.10008.5.1.4.1.1.66.4"


def _node(tmp: Path, pacs: Any, port: int, api_port: int, package: Path) -> Any:
    from dicom_node.service import Node
    from dicom_node.settings import load_settings

    settings = load_settings(
        None,
        environ={},
        storage_dir=tmp,
        port=port,
        api={"port": api_port},
        ae_title=NODE_AET,
        destinations=[
            {
                "kind": "dimse",
                "name": "orthanc",
                "host": "127.0.0.1",
                "port": pacs.dicom_port,
                "ae_title": pacs.aet,
            }
        ],
        completion={"quiet_period_s": 1.0, "sweep_interval_s": 0.3},
        outbox={"backoff_base_s": 0.5, "poll_interval_s": 0.2},
        rules=[{"name": "dsa", "match": {"modality": ["XA"]}, "pipelines": ["dsa_ia"]}],
        models={"dsa_ia": str(package)},
    )
    return Node(settings).start()


def _study_series(pacs: Any, study_id: str) -> dict[str, dict[str, Any]]:
    return {
        s["MainDicomTags"]["SeriesInstanceUID"]: s
        for s in pacs.get(f"/studies/{study_id}/series").json()
    }


def _made_by(seg: Any) -> str:
    """What names the package behind a SEG: its algorithm version, or, when the node
    replaced the package's output by the classical path (a tiny untrained package
    fails its quality checks), the fallback reason in Image Comments."""
    if "(classical fallback)" in seg.SeriesDescription:
        return str(seg.ImageComments)
    return str(
        seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion
    )


@needs_orthanc
@needs_storescu
def test_reprocess_after_a_package_change_stores_a_new_series(tmp_path: Path) -> None:
    package = _tiny_package(tmp_path / "package", seed=0)
    node_port, api_port = free_port(), free_port()
    pacs = start_orthanc(
        tmp_path,
        with_plugin=True,
        overrides=FAST,
        node={"aet": NODE_AET, "port": node_port, "api_url": f"http://127.0.0.1:{api_port}"},
    )
    assert pacs.config.get("OverwriteInstances", False) is False  # Orthanc's default
    node = _node(tmp_path / "node", pacs, node_port, api_port, package)
    try:
        path = phantom_dsa_file(tmp_path / "in", seed=3, size=96, frames=10)
        study = str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)
        storescu(pacs, path)
        wait_for(
            "the first result in Orthanc",
            lambda: (
                node_status(node)["jobs"] == {"done": 1}
                and not node_status(node)["outbox"].get("pending")
            ),
            timeout=120,
            every=0.5,
        )
        study_id = pacs.post("/tools/lookup", data=study).json()[0]["ID"]
        before = _study_series(pacs, study_id)
        (old_seg_uid,) = [u for u, s in before.items() if s["MainDicomTags"]["Modality"] == "SEG"]
        (old_seg,) = wado_series(pacs, study, old_seg_uid)
        assert "tiny 0" in _made_by(old_seg)

        # A retrained package replaces the old one in the configured folder.
        retrained = _tiny_package(tmp_path / "retrained", seed=1)
        for name in ("weights.pt", "package.json"):
            (package / name).write_bytes((retrained / name).read_bytes())

        again = pacs.post(f"/angio-node/studies/{study_id}/reprocess")
        assert again.ok, again.text
        wait_for(
            "the reprocessed result in Orthanc",
            lambda: (
                node_status(node)["jobs"] == {"done": 2}
                and not node_status(node)["outbox"].get("pending")
                and len(_study_series(pacs, study_id)) > len(before)
            ),
            timeout=120,
            every=0.5,
        )
        after = _study_series(pacs, study_id)
        assert set(before) <= set(after)  # the old results are all still there
        new = {u: s for u, s in after.items() if u not in before}
        by_modality = {s["MainDicomTags"]["Modality"] for s in new.values()}
        # SEG, overlay and quality report: new; the canvas: the same
        assert by_modality == {"SEG", "OT", "SR"}, new
        (new_seg_uid,) = [u for u, s in new.items() if s["MainDicomTags"]["Modality"] == "SEG"]
        (new_seg,) = wado_series(pacs, study, new_seg_uid)
        (old_again,) = wado_series(pacs, study, old_seg_uid)
        assert new_seg.SOPInstanceUID != old_seg.SOPInstanceUID
        assert old_again.SOPInstanceUID == old_seg.SOPInstanceUID
        assert "tiny 0" in _made_by(old_again)  # Orthanc kept the old content under the old UID
        assert "tiny 1" in _made_by(new_seg)
        # The new series names the one it supersedes.
        assert "(replaces " in new_seg.SeriesDescription
        assert f"Supersedes series {old_seg_uid}" in new_seg.ImageComments
        assert int(new_seg.SeriesNumber) == int(old_seg.SeriesNumber)
        # The canvas is the same object: one instance, referenced by both SEGs.
        canvas_refs = {
            str(s.ReferencedSeriesSequence[0].SeriesInstanceUID) for s in (old_seg, new_seg)
        }
        assert len(canvas_refs) == 1 and canvas_refs <= set(before)
        assert (
            len(pacs.get(f"/series/{after[next(iter(canvas_refs))]['ID']}").json()["Instances"])
            == 1
        )
    finally:
        node.stop()
        pacs.stop()
