"""XA cine (coronary) and 3D rotational runs end to end: an angio suite (dcmtk
storescu) sends each run to the PACS (a real Orthanc) and to the node; the
node's default rules route it, the pipeline runs, and the results arrive in
Orthanc by C-STORE, where every reference they carry resolves and dciodvfy
finds no error in what Orthanc serves back."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pydicom
import pytest

from dicom_node import dcmtk
from tests.conftest import dciodvfy_errors, send_storescu, wait_for
from tests.orthanc_fixture import OrthancProcess, orthanc  # noqa: F401  (fixture)

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(dcmtk.find("storescu") is None, reason="dcmtk storescu not installed"),
]


def referenced_instances(ds: pydicom.Dataset) -> set[str]:
    """Every SOP Instance UID the object points at (image, source, derivation and
    series references), found wherever they are nested."""
    uids: set[str] = set()

    def walk(item: pydicom.Dataset) -> None:
        for element in item:
            if element.VR == "SQ":
                for child in element.value:
                    if "ReferencedSOPInstanceUID" in child:
                        uids.add(str(child.ReferencedSOPInstanceUID))
                    walk(child)

    walk(ds)
    return uids


def results_in_orthanc(pacs: OrthancProcess, study_uid: str) -> dict[str, list[pydicom.Dataset]]:
    """The study's instances in Orthanc, parsed, by modality."""
    found = pacs.post(
        "/tools/find", json={"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}}
    ).json()
    out: dict[str, list[pydicom.Dataset]] = {}
    for instance in found:
        raw = pacs.get(f"/instances/{instance}/file").content
        ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(raw))
        out.setdefault(str(ds.Modality), []).append(ds)
    return out


def run_through(
    make_node: Any,
    pacs: OrthancProcess,
    files: list[Path],
    pipeline: str,
    expected: int,
    tmp_path: Path,
) -> dict[str, list[pydicom.Dataset]]:
    node = make_node(
        destinations=[
            {
                "kind": "dimse",
                "name": "pacs",
                "host": "127.0.0.1",
                "port": pacs.dicom_port,
                "ae_title": pacs.aet,
            }
        ]
    )
    send_storescu(pacs.aet, pacs.dicom_port, files, aet="CATHLAB")  # the suite archives the run ...
    send_storescu(node.settings.ae_title, node.port, files, aet="CATHLAB")  # ... and forwards it
    jobs = wait_for(
        lambda: node.db.query("SELECT * FROM jobs WHERE state IN ('done', 'failed')"),
        180,
        what=f"the {pipeline} job",
    )
    assert [(j["pipeline"], j["state"]) for j in jobs] == [(pipeline, "done")], jobs[0]["error"]
    # Settled: nothing left pending (a count polled mid-batch passes through every value).
    states = wait_for(
        lambda: (
            [r["state"] for r in rows]
            if (rows := node.db.query("SELECT state FROM outbox"))
            and all(r["state"] != "pending" for r in rows)
            else None
        ),
        120,
        what="the results in Orthanc",
    )
    assert states == ["sent"] * expected, states
    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    stored = results_in_orthanc(pacs, study)
    everything = {str(ds.SOPInstanceUID) for group in stored.values() for ds in group}
    sources = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    assert sources <= everything
    for group in stored.values():
        for ds in group:
            if str(ds.SOPInstanceUID) in sources:
                continue
            missing = referenced_instances(ds) - everything
            assert not missing, f"{ds.Modality} {ds.SeriesDescription}: unresolved {missing}"
    for ds in [group[0] for group in stored.values()]:
        path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        if shutil.which("dciodvfy"):
            assert dciodvfy_errors(path) == [], f"{ds.Modality} {ds.SOPClassUID.name}"
    return stored


def test_coronary_cine_from_the_suite_to_orthanc(make_node, orthanc, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    from training.phantoms import coronary

    phantom = coronary.generate(21, size=128, frames=10)
    files = [f for f in phantom.write(tmp_path / "suite") if f.suffix == ".dcm"]
    assert len(files) == 1  # one multi-frame XA
    # frames canvas, SEG, overlay cine, quality SR
    stored = run_through(make_node, orthanc, files, "xa_coronary", expected=4, tmp_path=tmp_path)
    (seg,) = stored["SEG"]
    assert int(seg.NumberOfFrames) >= 1
    # every SEG frame points at the frame of the frames canvas it segments
    sources = [
        f.DerivationImageSequence[0].SourceImageSequence[0]
        for f in seg.PerFrameFunctionalGroupsSequence
    ]
    assert {int(s.ReferencedFrameNumber) for s in sources} <= set(range(1, 11))
    descriptions = sorted(
        str(ds.SeriesDescription)
        for ds in stored.get("OT", []) + stored.get("XA", []) + stored.get("SC", [])
    )
    assert any("cine" in d.lower() for d in descriptions), descriptions


def test_rotational_ct_series_from_the_suite_to_orthanc(make_node, orthanc, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    from training.phantoms import rotational

    folder = rotational.generate(22, size=32).write(tmp_path / "suite")[0].parent
    files = sorted((folder / "rotational_ct").glob("*.dcm"))
    # SEG + 32-slice DLA angiogram + MIP + quality SR
    stored = run_through(
        make_node, orthanc, files, "rotational_dla", expected=35, tmp_path=tmp_path
    )
    (seg,) = stored["SEG"]
    labels = {str(s.SegmentLabel) for s in seg.SegmentSequence}
    assert len(labels) == 3
    source_for = str(pydicom.dcmread(files[0], stop_before_pixels=True).FrameOfReferenceUID)
    assert str(seg.FrameOfReferenceUID) == source_for
    angiogram = [ds for ds in stored["CT"] if "DLA" in str(ds.SeriesDescription)]
    assert len(angiogram) == 32
