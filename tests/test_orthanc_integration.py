"""Orthanc integration, with real parts only: Debian Orthanc with orthanc/'s config
and plugin, the node on loopback, dcmtk storescu as the angiography suite.

The plugin's engine (rules, result recognition, ledger, backoff) is also tested
directly, outside Orthanc: it is plain Python (orthanc/angio_core.py).
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.uid import generate_uid

from dicom_node import dcmtk
from tests.conftest import send_storescu
from tests.dicomgen import concatenation, save, xa_run
from tests.orthanc_fixture import (  # noqa: F401  (orthanc: the fixture)
    OrthancProcess,
    free_port,
    missing_parts,
    orthanc,
    start_orthanc,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "orthanc"))
import angio_core  # noqa: E402

pytestmark = pytest.mark.timeout(180)
NODE_AET = "ANGIO_NODE"
FAST = {
    "StableAge": 2,
    "AngioNode": {"PollSeconds": 0.3, "Retry": {"BackoffSeconds": 1, "MaxBackoffSeconds": 2}},
}

needs_orthanc = pytest.mark.skipif(
    bool(missing_parts(with_plugin=True)),
    reason="Orthanc not installed: " + "; ".join(missing_parts(with_plugin=True)),
)
needs_storescu = pytest.mark.skipif(
    dcmtk.find("storescu") is None, reason="dcmtk storescu not installed"
)


# -- helpers ------------------------------------------------------------------------


def wait_for(what: str, check: Callable[[], Any], timeout: float = 30.0, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what} (last: {last!r})")


def storescu(pacs: OrthancProcess, *files: Path, aet: str = "ANGIO_SUITE") -> None:
    send_storescu(pacs.aet, pacs.dicom_port, list(files), aet=aet, timeout=60)


def phantom_dsa_file(directory: Path, seed: int = 1, size: int = 64, frames: int = 8) -> Path:
    """A phantom cerebral DSA run (training.phantoms) written as XA; the small test run
    from tests.dicomgen where the phantom package is not there."""
    try:
        from training.phantoms import dsa
    except ImportError:
        return save(xa_run(frames=frames, rows=size, cols=size, seed=seed), directory)
    paths = dsa.generate(seed, size=size, frames=frames).write(directory)
    return next(p for p in paths if p.suffix == ".dcm")


def single_frame_series(frames: int = 5) -> list:
    """An XA run as single-frame instances of one series (a multi-instance run)."""
    run = xa_run(frames=frames, seed=3)
    series = generate_uid()
    rows, cols = run.Rows, run.Columns
    out = []
    for i in range(frames):
        ds = copy.deepcopy(run)
        del ds.NumberOfFrames, ds.FrameIncrementPointer, ds.FrameTime
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        ds.AcquisitionTime = f"1200{i:02d}.000000"
        ds.PixelData = run.PixelData[i * rows * cols * 2 : (i + 1) * rows * cols * 2]
        out.append(ds)
    return out


def pacs_for_node(
    tmp_path: Path, overrides: dict[str, Any] = FAST, dicomweb: bool = False
) -> tuple[OrthancProcess, int, int]:
    """Orthanc with the plugin, pointed at a node still to start on the two ports
    returned (DICOM, API); ``dicomweb``: forwards by STOW-RS."""
    node_port, api_port = free_port(), free_port()
    node: dict[str, Any] = {
        "aet": NODE_AET,
        "port": node_port,
        "api_url": f"http://127.0.0.1:{api_port}",
    }
    if dicomweb:
        overrides = copy.deepcopy(overrides)
        overrides["AngioNode"]["Transport"] = "dicomweb"
        node["dicomweb_url"] = f"http://127.0.0.1:{api_port}/dicom-web/"
    pacs = start_orthanc(tmp_path, with_plugin=True, overrides=overrides, node=node)
    return pacs, node_port, api_port


def _processed(node: Any, series: list[Any]) -> str:
    """Wait for the node to process the series; its UID."""
    series_uid = str(series[0].SeriesInstanceUID)
    wait_for(
        "the instances the node takes processed",
        lambda: node.db.query("SELECT id FROM jobs WHERE run_id=? AND state='done'", (series_uid,)),
        timeout=60,
    )
    return series_uid


MINIP_ONLY = [{"name": "dsa", "match": {"modality": ["XA"]}, "pipelines": ["minip"]}]


def start_node(
    tmp: Path,
    pacs: OrthancProcess,
    *,
    port: int = 0,
    api_port: int = 0,
    transport: str = "dimse",
    quiet_period_s: float = 1.0,
    rules: list[dict[str, Any]] | None = MINIP_ONLY,
    **more: Any,
):  # type: ignore[no-untyped-def]
    """The node on loopback; ``rules=None`` means its built-in rules (every DSA pipeline);
    ``more``: other settings."""
    from dicom_node.service import Node
    from dicom_node.settings import load_settings

    if transport == "dimse":
        dest = {
            "kind": "dimse",
            "name": "orthanc",
            "host": "127.0.0.1",
            "port": pacs.dicom_port,
            "ae_title": pacs.aet,
        }
    else:
        dest = {"kind": "dicomweb", "name": "orthanc", "url": pacs.dicomweb_url}
    settings = load_settings(
        None,
        environ={},
        storage_dir=tmp,
        port=port,
        api={"port": api_port},
        ae_title=NODE_AET,
        destinations=[dest],
        completion={"quiet_period_s": quiet_period_s, "sweep_interval_s": 0.3},
        outbox={"backoff_base_s": 0.5, "poll_interval_s": 0.2},
        rules=rules,
        **more,
    )
    return Node(settings).start()


@contextmanager
def running_node(tmp: Path, pacs: OrthancProcess, **kw: Any) -> Iterator[Any]:
    node = start_node(tmp, pacs, **kw)
    try:
        yield node
    finally:
        node.stop()


def forwards(pacs: OrthancProcess, **params: str) -> list[dict[str, Any]]:
    resp = pacs.get("/angio-node/forwards", params=params)
    assert resp.ok, resp.text
    return resp.json()["forwards"]


def settled_forwards(pacs: OrthancProcess, timeout: float = 30.0) -> dict[str, list[Any]]:
    """Once every forward is sent, failed or split: the forwards by state."""
    listed = wait_for(
        "every forward settled",
        lambda: (
            (fws := forwards(pacs))
            and all(f["state"] in ("sent", "failed", "split") for f in fws)
            and fws
        ),
        timeout=timeout,
    )
    by_state: dict[str, list[Any]] = {}
    for f in listed:
        by_state.setdefault(f["state"], []).append(f)
    return by_state


def result_series(pacs: OrthancProcess, study_uid: str) -> list[dict[str, Any]]:
    """QIDO-RS: series of the study whose description marks them as the node's output."""
    resp = pacs.get(
        f"/dicom-web/studies/{study_uid}/series", headers={"Accept": "application/dicom+json"}
    )
    if resp.status_code == 204 or not resp.content:
        return []
    assert resp.ok, resp.text
    return [s for s in resp.json() if s.get("0008103E", {}).get("Value", [""])[0].startswith("AI ")]


def wado_series(pacs: OrthancProcess, study_uid: str, series_uid: str) -> list:
    """WADO-RS: the series' instances, parsed from multipart/related."""
    resp = pacs.get(
        f"/dicom-web/studies/{study_uid}/series/{series_uid}",
        headers={"Accept": 'multipart/related; type="application/dicom"'},
    )
    assert resp.status_code == 200, resp.text[:500]
    boundary = re.search(r'boundary="?([^";]+)"?', resp.headers["Content-Type"]).group(1).encode()
    datasets = []
    for part in resp.content.split(b"--" + boundary)[1:]:
        if part.startswith(b"--"):
            break
        _, _, body = part.partition(b"\r\n\r\n")
        datasets.append(dcmread(DicomBytesIO(body.rstrip(b"\r\n"))))
    return datasets


def node_status(node: Any) -> dict[str, Any]:
    return node.db.status_summary()  # type: ignore[no-any-return]


# -- the engine, outside Orthanc ------------------------------------------------------


def template_config(**angio: Any) -> angio_core.Config:
    full = json.loads(
        (Path(__file__).resolve().parents[1] / "orthanc" / "orthanc.json").read_text()
    )
    full["AngioNode"].update(angio)
    return angio_core.Config.from_orthanc(full)


def test_rules_match_angiography_and_not_results() -> None:
    cfg = template_config()
    xa = {
        "Modality": "XA",
        "SOPClassUID": "1.2.840.10008.5.1.4.1.1.12.1",
        "NumberOfFrames": "20",
        "ImageType": "DERIVED\\PRIMARY\\SINGLE PLANE\\SUBTRACTION",
    }
    assert cfg.rule_for(xa, xa["SOPClassUID"]).name == "xray-angiography"
    assert cfg.rule_for({**xa, "Modality": "CT"}, "1.2.840.10008.5.1.4.1.1.2") is None
    assert cfg.may_match(xa["SOPClassUID"]) and not cfg.may_match("1.2.840.10008.5.1.4.1.1.2")
    # the node's output is recognised three independent ways
    assert cfg.result_reason({}, "ANGIO_NODE") == "calling AE ANGIO_NODE"
    assert "Manufacturer" in cfg.result_reason({"Manufacturer": "angio-dicom-node"}, "ORTHANC")
    assert "Series Description" in cfg.result_reason({"SeriesDescription": "AI MinIP"}, "")
    assert (
        cfg.result_reason({"SeriesDescription": "AIR study", "Manufacturer": "ACME"}, "SUITE")
        is None
    )

    tagged = template_config(
        Rules=[
            {
                "Name": "sub-only",
                "Modalities": ["XA"],
                "MinFrames": 2,
                "Tags": {
                    "ImageType": "SUBTRACTION",
                    "BodyPartExamined": {"Regex": "(?i)^(HEAD|NECK)$"},
                },
            }
        ]
    )
    assert tagged.may_match("1.2.840.10008.5.1.4.1.1.2")  # a rule without classes: read the tags
    assert tagged.rule_for({**xa, "BodyPartExamined": "head"}, "") is not None
    assert tagged.rule_for({**xa, "BodyPartExamined": "HEART"}, "") is None
    assert tagged.rule_for({**xa, "BodyPartExamined": "HEAD", "NumberOfFrames": "1"}, "") is None
    assert (
        tagged.rule_for({**xa, "BodyPartExamined": "HEAD", "ImageType": "ORIGINAL\\PRIMARY"}, "")
        is None
    )


@pytest.mark.parametrize(
    ("angio", "key"),
    [
        ({"Transport": "ftp"}, "AngioNode.Transport"),
        ({"Retry": {"MaxAttempts": 0}}, "AngioNode.Retry.MaxAttempts"),
        ({"Rules": [{"Tags": {"ImageType": {"Regex": "("}}}]}, "AngioNode.Rules[0].Tags.ImageType"),
        ({"Rules": [{"Modality": ["XA"]}]}, "AngioNode.Rules[0]"),
        # the rules read Orthanc's simplified tags, keyed by keyword: a tag never matched
        ({"Rules": [{"Tags": {"0018,0015": "HEAD"}}]}, "Rules[0].Tags.0018,0015: a DICOM keyword"),
        # compared as they are: a value of another form never matched (MinFrames "2" raised)
        ({"Rules": [{"Modalities": ["xa"]}]}, "Rules[0].Modalities: 'xa' is not a Modality"),
        ({"Rules": [{"Modalities": "XA"}]}, "Rules[0].Modalities: a list of strings"),
        (
            {"Rules": [{"SopClassUids": ["XRayAngiographicImageStorage"]}]},
            "Rules[0].SopClassUids: 'XRayAngiographicImageStorage' is not a UID",
        ),
        ({"Rules": [{"MinFrames": "2"}]}, "Rules[0].MinFrames: a whole number of at least 1"),
        ({"NodeApiUrl": "node:8780"}, "AngioNode.NodeApiUrl"),
        ({"Bogus": 1}, "AngioNode: unknown key"),
    ],
)
def test_config_errors_name_the_key(angio: dict[str, Any], key: str) -> None:
    with pytest.raises(angio_core.ConfigError, match=re.escape(key)):
        template_config(**angio)


def test_ledger_forwards_once_and_backs_off(tmp_path: Path) -> None:
    cfg = template_config(Retry={"MaxAttempts": 3, "BackoffSeconds": 10, "MaxBackoffSeconds": 15})
    ledger = angio_core.Ledger(str(tmp_path / "ledger.sqlite"))
    tags = {"StudyInstanceUID": "1.2", "SeriesInstanceUID": "1.2.3", "SOPInstanceUID": "1.2.3.4"}
    fid = ledger.add_instance(
        "i1", "s1", tags, "r", forward_now=True, trigger=False, transport="dimse"
    )
    assert ledger.known_instance("i1")
    # a replayed change (crash before the change number was saved) adds nothing
    assert ledger.known_instance("i1") and len(ledger.due(time.time())) == 1
    for i in (2, 3):
        ledger.add_instance(
            f"i{i}",
            "s2",
            {**tags, "SOPInstanceUID": f"1.2.3.{i}"},
            "r",
            forward_now=False,
            trigger=True,
            transport="dimse",
        )
    assert len(ledger.due(time.time())) == 1  # single-frame instances wait for the stable series
    series_fid = ledger.forward_waiting("s2", trigger=True, transport="dimse")
    assert json.loads(ledger.forward(series_fid)["resources"]) == ["i2", "i3"]
    assert ledger.forward_waiting("s2", trigger=True, transport="dimse") is None  # never twice

    assert [cfg.backoff(n) for n in (1, 2, 3)] == [10, 15, 15]
    ledger.submitted(fid, "job-1")
    assert ledger.attempt_failed(fid, "connection refused", cfg) == "retrying"
    row = ledger.forward(fid)
    assert row["attempts"] == 1 and row["next_try"] > time.time() + 9 and "refused" in row["error"]
    assert fid not in [r["id"] for r in ledger.due(time.time())]
    ledger.attempt_failed(fid, "again", cfg)
    assert ledger.attempt_failed(fid, "and again", cfg) == "failed"
    assert ledger.counts()["failed"] == 1
    assert ledger.retry_now(fid) and ledger.forward(fid)["state"] == "queued"
    ledger.submitted(fid, "job-2")
    ledger.sent(fid)
    assert not ledger.retry_now(fid)  # a sent forward is not sent again by 'retry'
    assert json.loads(ledger.forward(fid)["jobs"]) == ["job-1", "job-2"]


# -- real Orthanc -------------------------------------------------------------------------


@needs_orthanc
def test_orthanc_fixture_is_a_working_pacs(orthanc: OrthancProcess) -> None:  # noqa: F811
    assert orthanc.get("/system").json()["DicomAet"] == orthanc.aet
    res = subprocess.run(
        [str(dcmtk.find("echoscu")), "-aec", orthanc.aet, "127.0.0.1", str(orthanc.dicom_port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 0, res.stderr
    assert orthanc.get("/dicom-web/studies").status_code in (200, 204)
    assert orthanc.get("/angio-node/status").status_code == 404  # no plugin in the plain fixture


@needs_orthanc
@pytest.mark.parametrize(
    ("section", "named"),
    [
        ({"Transport": "ftp"}, "AngioNode.Transport"),
        # A rule's tag Orthanc does not know never matched, without a word.
        (
            {"Rules": [{"Name": "heads", "Tags": {"BodyPartExamind": "HEAD"}}]},
            "AngioNode.Rules[0].Tags.BodyPartExamind: not a DICOM keyword in Orthanc's",
        ),
        ({"Rules": [{"Name": "heads", "Tags": {"BodyPartExamined": "HEAD"}}]}, None),
        # the node as Orthanc knows it: every forward failed to submit its job
        (
            {"NodeModality": "angio-nod"},
            "AngioNode.NodeModality: 'angio-nod' is not one of Orthanc's DicomModalities",
        ),
        (
            {"Transport": "dicomweb", "NodeDicomWebServer": "angio"},
            "AngioNode.NodeDicomWebServer: 'angio' is not one of Orthanc's DicomWeb.Servers",
        ),
    ],
)
def test_bad_plugin_config_is_reported_not_ignored(
    tmp_path: Path, section: dict[str, Any], named: str | None
) -> None:
    pacs = start_orthanc(tmp_path, with_plugin=True, overrides={"AngioNode": section})
    try:
        resp = pacs.get("/angio-node/status")
        if named is None:  # the keyword spelt right: the plugin runs
            assert resp.status_code == 200, resp.text
            return
        assert resp.status_code == 503
        assert named in resp.json()["error"], resp.json()["error"]
        assert "NOT forwarding, configuration error" in pacs.log_text()
    finally:
        pacs.stop()


@needs_orthanc
def test_the_stow_rs_transport_without_orthanc_s_dicomweb_plugin_is_a_configuration_error(
    tmp_path: Path,
) -> None:
    """Every forward would fail to submit its job: Orthanc has no STOW-RS client."""
    from tests.orthanc_fixture import PYTHON_PLUGIN

    pacs = start_orthanc(
        tmp_path,
        with_plugin=True,
        overrides={"Plugins": [str(PYTHON_PLUGIN)], "AngioNode": {"Transport": "dicomweb"}},
    )
    try:
        resp = pacs.get("/angio-node/status")
        assert resp.status_code == 503
        error = resp.json()["error"]
        assert "AngioNode.NodeDicomWebServer: Orthanc cannot list its DicomWeb.Servers" in error
        assert "needs the DICOMweb plugin" in error
    finally:
        pacs.stop()


@needs_orthanc
def test_a_damaged_ledger_is_reported_with_what_to_do(tmp_path: Path) -> None:
    """The plugin's ledger damaged (a disk that lied about a write, a file restored
    wrong): its start raised in Orthanc's change callback, a traceback in Orthanc's log,
    and its status said "starting" for ever while nothing was forwarded. Now it is
    reported as the configuration errors are, with what to do; moved aside, a new
    ledger is started and runs are forwarded."""
    ledger = tmp_path / "ledger.sqlite"
    ledger.write_bytes(b"not a database, a few blocks of something else " * 200)
    overrides = copy.deepcopy(FAST)
    overrides["AngioNode"]["StateFile"] = str(ledger)
    node = {"aet": NODE_AET, "port": free_port(), "api_url": f"http://127.0.0.1:{free_port()}"}
    pacs = start_orthanc(tmp_path, with_plugin=True, overrides=overrides, node=node)
    try:
        resp = pacs.get("/angio-node/status")
        assert resp.status_code == 503, resp.text
        error = resp.json()["error"]
        assert "AngioNode.StateFile" in error and str(ledger) in error and "move it aside" in error
        assert "NOT forwarding" in pacs.log_text() and "Traceback" not in pacs.log_text()
        pacs.stop()
        ledger.rename(tmp_path / "ledger.damaged")
        pacs.start()
        assert pacs.get("/angio-node/status").status_code == 200
    finally:
        pacs.stop()


@needs_orthanc
@needs_storescu
def test_end_to_end_forward_process_and_results_back(tmp_path: Path) -> None:
    pacs, node_port, api_port = pacs_for_node(tmp_path)
    try:
        with running_node(
            tmp_path / "node", pacs, port=node_port, api_port=api_port, quiet_period_s=60
        ) as node:
            # 1. a multi-frame XA run: forwarded on arrival, processed, results back
            path = phantom_dsa_file(tmp_path / "in", seed=11)
            run = dcmread(path, stop_before_pixels=True)
            storescu(pacs, path)
            study = str(run.StudyInstanceUID)
            results = wait_for(
                "result series in Orthanc (QIDO-RS)", lambda: result_series(pacs, study)
            )
            # the node marks its outbox row sent once Orthanc has answered: a moment later
            (fw,) = wait_for(
                "the node's job done and its results sent",
                lambda: [
                    f for f in forwards(pacs) if f["node_jobs"] and f["node_jobs"][0]["sent"] >= 1
                ],
            )
            assert fw["kind"] == "instance" and fw["state"] == "sent"
            assert fw["sop_instance_uid"] == run.SOPInstanceUID and fw["attempts"] == 0
            assert [j["state"] for j in fw["node_jobs"]] == ["done"] and fw["node_jobs"][0][
                "pending"
            ] == 0

            # WADO-RS returns the result objects, made by the node, in the source's study
            series_uid = results[0]["0020000E"]["Value"][0]
            objs = wado_series(pacs, study, series_uid)
            assert objs and all(o.Manufacturer == "angio-dicom-node" for o in objs)
            assert {o.StudyInstanceUID for o in objs} == {study}
            assert all(o.SeriesDescription.startswith("AI ") for o in objs)

            # results are labelled (metadata on Orthanc 1.10) and listed, never forwarded
            series_id = pacs.post("/tools/lookup", data=series_uid).json()[0]["ID"]
            mark = json.loads(pacs.get(f"/series/{series_id}/metadata/AngioNodeResult").text)
            assert mark["reason"] == f"calling AE {NODE_AET}"
            listed = pacs.get("/angio-node/results", params={"study": study}).json()["results"]
            assert {r["series_uid"] for r in listed} == {s["0020000E"]["Value"][0] for s in results}

            # 2. a multi-instance run: waits for Orthanc's stable series, one forward, then the
            #    plugin's trigger completes it on the node (whose quiet period is 60 s here)
            singles = single_frame_series(5)
            storescu(pacs, *[save(ds, tmp_path / "singles") for ds in singles])
            series2 = str(singles[0].SeriesInstanceUID)
            fw2 = wait_for(
                "the stable series forwarded and triggered",
                lambda: [
                    f
                    for f in forwards(pacs, study=str(singles[0].StudyInstanceUID))
                    if f["state"] == "sent" and f["triggered"]
                ],
                timeout=40,
            )
            assert fw2[0]["kind"] == "series" and len(fw2[0]["resources"]) == 5
            assert fw2[0]["series_uid"] == series2
            wait_for(
                "results of the multi-instance run",
                lambda: result_series(pacs, str(singles[0].StudyInstanceUID)),
            )
            run_row = node.db.query("SELECT state, reason FROM runs WHERE run_id=?", (series2,))[0]
            assert run_row["reason"] == "explicit trigger"

            # 3. nothing forwarded twice: wait past the stable age of every series (results too)
            time.sleep(FAST["StableAge"] + 3)
            assert len(forwards(pacs)) == 2
            status = node_status(node)
            assert status["instances"] == 1 + 5
            assert status["jobs"] == {"done": 2}
            store_jobs = [
                j for j in pacs.get("/jobs?expand").json() if j["Type"] == "DicomModalityStore"
            ]
            assert len(store_jobs) == 2 and {j["State"] for j in store_jobs} == {"Success"}
            source_series = pacs.post("/tools/lookup", data=str(run.SeriesInstanceUID)).json()[0][
                "ID"
            ]
            assert pacs.get(f"/series/{source_series}/metadata/AngioNodeForward").text.startswith(
                "sent"
            )

            # 4. 'process again' for a study: the node re-runs it; same result UIDs, no new series
            n_series = len(pacs.get("/series").json())
            study_id = pacs.post("/tools/lookup", data=study).json()[0]["ID"]
            again = pacs.post(f"/angio-node/studies/{study_id}/reprocess")
            assert again.ok, again.text
            assert again.json()["action"] == "reprocessed by the node" and again.json()["node_jobs"]
            wait_for("the reprocessing job done", lambda: node_status(node)["jobs"] == {"done": 3})
            assert node_status(node)["instances"] == 6  # nothing was forwarded again
            time.sleep(1)
            assert len(pacs.get("/series").json()) == n_series

            # REST errors are precise
            assert pacs.get("/angio-node/forwards/999").status_code == 404
            assert pacs.get("/angio-node/forwards/" + "9" * 30).status_code == 404
            assert pacs.post(f"/angio-node/forwards/{fw['id']}/retry").status_code == 409
            assert pacs.get(f"/angio-node/studies/{study_id}/reprocess").status_code == 405
            assert pacs.post("/angio-node/studies/1.2.3.999/reprocess").status_code == 404
            assert pacs.post("/angio-node/studies/not-a-uid/reprocess").status_code == 400
            status = pacs.get("/angio-node/status").json()
            assert (
                status["node"]["status"] == "ok"
                and status["worker_alive"]
                and status["last_error"] is None
            )
            assert status["result_marking"] == "metadata AngioNodeResult"
    finally:
        pacs.stop()


@needs_orthanc
@needs_storescu
def test_node_down_forward_retried_until_it_is_up(tmp_path: Path) -> None:
    """Node down: the job fails visibly and is retried; it is delivered once the node is up.
    Results come back over STOW-RS here, so they are recognised by Manufacturer, not AE."""
    node_port, api_port = free_port(), free_port()
    overrides = copy.deepcopy(FAST)
    overrides["AngioNode"]["Retry"]["MaxAttempts"] = (
        100  # never exhausted, however slow the machine
    )
    pacs = start_orthanc(
        tmp_path,
        with_plugin=True,
        overrides=overrides,
        node={"aet": NODE_AET, "port": node_port, "api_url": f"http://127.0.0.1:{api_port}"},
    )
    try:
        run = xa_run(frames=6, seed=2)
        storescu(pacs, save(run, tmp_path / "in"))
        failing = wait_for(
            "a failed forward attempt", lambda: [f for f in forwards(pacs) if f["attempts"] >= 1]
        )[0]
        assert failing["state"] == "retrying" and "Connection refused" in failing["error"]
        assert failing["node_jobs"] is None and "unreachable" in failing["node_error"]
        assert pacs.get("/angio-node/status").json()["node"]["status"] == "unreachable"
        failed_job = pacs.get(f"/jobs/{failing['jobs'][0]}").json()
        assert failed_job["State"] == "Failure"
        assert "angio-forward: forward 1 attempt 1 failed" in pacs.log_text()

        with running_node(
            tmp_path / "node", pacs, port=node_port, api_port=api_port, transport="dicomweb"
        ) as node:
            done = wait_for(
                "the forward delivered after retries",
                lambda: [
                    f
                    for f in forwards(pacs)
                    if f["state"] == "sent"
                    and f["node_jobs"]
                    and f["node_jobs"][0]["state"] == "done"
                ],
                timeout=40,
            )
            assert done[0]["attempts"] >= 1 and len(done[0]["jobs"]) == done[0]["attempts"] + 1
            results = wait_for(
                "results stored back over STOW-RS",
                lambda: result_series(pacs, str(run.StudyInstanceUID)),
            )
            series_id = pacs.post("/tools/lookup", data=results[0]["0020000E"]["Value"][0]).json()[
                0
            ]["ID"]
            mark = json.loads(pacs.get(f"/series/{series_id}/metadata/AngioNodeResult").text)
            assert mark["reason"] == "Manufacturer angio-dicom-node"
            time.sleep(FAST["StableAge"] + 2)
            assert node_status(node)["instances"] == 1 and len(forwards(pacs)) == 1
    finally:
        pacs.stop()


@needs_orthanc
@needs_storescu
def test_failed_forward_survives_restart_and_is_retried_by_hand(tmp_path: Path) -> None:
    """MaxAttempts exhausted: 'failed', logged as an error, kept across an Orthanc restart,
    sent by POST /angio-node/forwards/{id}/retry once the node is back."""
    node_port, api_port = free_port(), free_port()
    overrides = copy.deepcopy(FAST)
    overrides["AngioNode"]["Retry"]["MaxAttempts"] = 2
    pacs = start_orthanc(
        tmp_path,
        with_plugin=True,
        overrides=overrides,
        node={"aet": NODE_AET, "port": node_port, "api_url": f"http://127.0.0.1:{api_port}"},
    )
    try:
        run = xa_run(frames=4, seed=4)
        storescu(pacs, save(run, tmp_path / "in"))
        (failed,) = wait_for("the forward failed for good", lambda: forwards(pacs, state="failed"))
        assert failed["attempts"] == 2 and "FAILED after 2 attempt(s)" in pacs.log_text()

        pacs.restart()
        assert [f["state"] for f in forwards(pacs)] == ["failed"]  # the ledger survived

        with running_node(tmp_path / "node", pacs, port=node_port, api_port=api_port) as node:
            resp = pacs.post(f"/angio-node/forwards/{failed['id']}/retry")
            assert resp.ok, resp.text
            run2 = xa_run(frames=4, seed=5, study_uid=str(run.StudyInstanceUID))
            storescu(pacs, save(run2, tmp_path / "in2"))  # the change feed goes on after a restart
            wait_for(
                "both runs delivered",
                lambda: sorted(f["state"] for f in forwards(pacs)) == ["sent", "sent"],
                timeout=40,
            )
            wait_for("both runs processed", lambda: node_status(node)["jobs"] == {"done": 2})
            assert node_status(node)["instances"] == 2
    finally:
        pacs.stop()


# -- STOW-RS into the node (dicom_node/stow.py), for "Transport": "dicomweb" ----------------


def multipart(parts: list[tuple[str, bytes]], boundary: str = "b0und4ry") -> tuple[str, bytes]:
    body = (
        b"".join(
            f"--{boundary}\r\nContent-Type: {ct}\r\n\r\n".encode() + data + b"\r\n"
            for ct, data in parts
        )
        + f"--{boundary}--\r\n".encode()
    )
    return f'multipart/related; type="application/dicom"; boundary={boundary}', body


def test_stow_rs_stores_like_c_store_and_refuses_precisely(tmp_path: Path) -> None:
    from dicom_node import stow
    from dicom_node.service import Node
    from dicom_node.settings import load_settings

    node = Node(
        load_settings(
            None,
            environ={},
            storage_dir=tmp_path,
            port=0,
            api={"enabled": False},
            completion={"quiet_period_s": 60},
            rules=[],
        )
    ).start()
    try:
        good = save(xa_run(frames=3, seed=7), tmp_path / "in")
        ctype, body = multipart(
            [
                ("application/dicom", good.read_bytes()),
                ("application/dicom", b"not DICOM at all"),
                ("application/dicom+json", b"{}"),
            ]
        )
        status, resp = stow.stow(node.ingest, "/dicom-web/studies", ctype, body)
        assert status == 202
        uid = dcmread(good, stop_before_pixels=True).SOPInstanceUID
        assert [i["00081155"]["Value"][0] for i in resp["00081199"]["Value"]] == [uid]
        assert [i["00081197"]["Value"][0] for i in resp["00081198"]["Value"]] == [0xC000, 0x0122]
        row = node.db.query("SELECT calling_aet FROM instances WHERE sop_instance_uid=?", (uid,))
        assert row[0]["calling_aet"] == stow.STOW_SOURCE
        assert node.db.query("SELECT state FROM runs")[0]["state"] in (
            "receiving",
            "complete",
            "unrouted",
        )

        status, resp = stow.stow(
            node.ingest,
            "/dicom-web/studies/1.2.3",
            *multipart([("application/dicom", good.read_bytes())]),
        )
        assert status == 409 and resp["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]
        for bad_type, bad_body, code in [
            ("application/dicom", b"x", 415),
            ("multipart/related", b"", 400),
            (*multipart([]), 400),
        ]:
            with pytest.raises(stow.StowError) as err:
                stow.stow(node.ingest, "/dicom-web/studies", bad_type, bad_body)
            assert err.value.status == code
    finally:
        node.stop()


@needs_orthanc
@needs_storescu
def test_dicomweb_transport_forwards_by_stow_rs(tmp_path: Path) -> None:
    """Orthanc's DICOMweb STOW client job carries the run to the node's STOW-RS endpoint."""
    pacs, node_port, api_port = pacs_for_node(tmp_path, dicomweb=True)
    try:
        with running_node(tmp_path / "node", pacs, port=node_port, api_port=api_port) as node:
            run = xa_run(frames=5, seed=8)
            storescu(pacs, save(run, tmp_path / "in"))
            (fw,) = wait_for("the STOW-RS forward delivered", lambda: forwards(pacs, state="sent"))
            assert fw["transport"] == "dicomweb" and fw["attempts"] == 0
            job = pacs.get(f"/jobs/{fw['jobs'][-1]}").json()
            assert job["Type"] == "DicomWebStowClient" and job["State"] == "Success"
            wait_for(
                "results back in Orthanc", lambda: result_series(pacs, str(run.StudyInstanceUID))
            )
            rows = node.db.query("SELECT calling_aet FROM instances")
            assert [r["calling_aet"] for r in rows] == ["STOW-RS"]
    finally:
        pacs.stop()


@needs_orthanc
@needs_storescu
@pytest.mark.parametrize("transport", ["dimse", "dicomweb"])
def test_the_suites_behind_orthanc_are_told_apart_by_the_node(
    tmp_path: Path, transport: str
) -> None:
    """Every run Orthanc forwarded was Orthanc's: the suites behind it shared one turn
    and one share of the node's disk. The plugin now names the suite that sent each run
    to Orthanc (C-STORE: the Move Originator AE Title; STOW-RS: X-Angio-Sender), and the
    node, with Orthanc in ``forwarders``, counts the run for that suite. A run uploaded
    to Orthanc over its REST API has no suite: it stays Orthanc's."""
    pacs, node_port, api_port = pacs_for_node(tmp_path, dicomweb=transport == "dicomweb")
    forwarder = pacs.aet if transport == "dimse" else "STOW-RS"  # no token: the STOW source
    try:
        with running_node(
            tmp_path / "node", pacs, port=node_port, api_port=api_port, forwarders=[forwarder]
        ) as node:
            expected = {}
            for k, suite in enumerate(("SUITE_A", "SUITE_B")):
                run = xa_run(frames=3, rows=32, cols=32, seed=40 + k)
                storescu(pacs, save(run, tmp_path / suite), aet=suite)
                expected[str(run.SOPInstanceUID)] = suite
            uploaded = xa_run(frames=3, rows=32, cols=32, seed=42)
            resp = pacs.post("/instances", data=save(uploaded, tmp_path / "rest").read_bytes())
            assert resp.ok, resp.text
            expected[str(uploaded.SOPInstanceUID)] = forwarder
            query = "SELECT run_id, calling_aet, COALESCE(sender, calling_aet) AS sender FROM runs"
            wait_for(
                "the three runs at the node", lambda: len(node.db.query(query)) == 3, timeout=60
            )
            rows = node.db.query(query)
            assert {r["run_id"]: r["sender"] for r in rows} == expected
            assert {r["calling_aet"] for r in rows} == {forwarder}  # for routing, as before
    finally:
        pacs.stop()


@needs_orthanc
@needs_storescu
def test_a_rejection_note_sent_to_orthanc_withdraws_the_node_s_results(tmp_path: Path) -> None:
    """A suite rejects a run (IHE IOCM) by sending its rejection note to Orthanc. The
    plugin forwards a note that lists a forwarded instance (it dismissed every Key
    Object Selection before); the node withdraws its results with its own note, which
    Orthanc receives and the plugin labels as the node's, not forwarding it back."""
    from pydicom.uid import KeyObjectSelectionDocumentStorage

    from tests.test_rejection import PATIENT_SAFETY, note

    pacs, node_port, api_port = pacs_for_node(tmp_path)
    try:
        with running_node(tmp_path / "node", pacs, port=node_port, api_port=api_port) as node:
            run = xa_run(frames=5, seed=9)
            study = str(run.StudyInstanceUID)
            storescu(pacs, save(run, tmp_path / "in"))
            sent = "SELECT sop_instance_uid FROM outbox WHERE state='sent'"
            wait_for(
                "results delivered to Orthanc",
                lambda: node.db.query(sent) and node.db.pending_deliveries() == 0,
            )
            delivered = {r["sop_instance_uid"] for r in node.db.query(sent)}
            rejection = note(PATIENT_SAFETY, run)
            storescu(pacs, save(rejection, tmp_path / "note"), aet="SUITE")
            kos = f"SELECT * FROM outbox WHERE sop_class_uid='{KeyObjectSelectionDocumentStorage}'"
            (row,) = wait_for(
                "the node's rejection note delivered to Orthanc",
                lambda: [r for r in node.db.query(kos) if r["state"] == "sent"],
                timeout=60,
            )
            (found,) = pacs.post("/tools/lookup", data=row["sop_instance_uid"]).json()
            series_id = pacs.get(f"/instances/{found['ID']}").json()["ParentSeries"]
            tags = pacs.get(f"/instances/{found['ID']}/tags?simplify").json()
            assert tags["ConceptNameCodeSequence"][0]["CodeValue"] == "113037"
            listed = {
                sop["ReferencedSOPInstanceUID"]
                for st in tags["CurrentRequestedProcedureEvidenceSequence"]
                for se in st["ReferencedSeriesSequence"]
                for sop in se["ReferencedSOPSequence"]
            }
            assert listed == delivered and tags["StudyInstanceUID"] == study
            # forwarded: the run and the suite's note; the node's note is labelled a result
            by_rule = wait_for(
                "the node's note labelled a result",
                lambda: (
                    pacs.get(f"/series/{series_id}/metadata/AngioNodeResult").ok and forwards(pacs)
                ),
            )
            assert sorted(f["rule"] for f in by_rule) == ["rejection note", "xray-angiography"]
    finally:
        pacs.stop()


@needs_orthanc
@needs_storescu
def test_the_forwards_of_a_concatenation_s_parts_show_the_node_s_jobs(tmp_path: Path) -> None:
    """Each part of a concatenation, a multi-frame instance, is forwarded on arrival;
    the node processes the parts as one run, whose ID is their Concatenation UID. The
    plugin's view of each forward matched the node's jobs by the part's SOP Instance
    UID, and listed none; both now show the run's job."""
    pacs, node_port, api_port = pacs_for_node(tmp_path)
    try:
        with running_node(
            tmp_path / "node", pacs, port=node_port, api_port=api_port, quiet_period_s=60
        ) as node:
            uid, parts = concatenation(2, [1, 2])
            study = str(parts[0].StudyInstanceUID)
            files = [save(ds, tmp_path / "in", f"part{k}.dcm") for k, ds in enumerate(parts)]
            storescu(pacs, *files)
            both = wait_for(
                "both parts' forwards sent, with the run's job done",
                lambda: (
                    len(fws := forwards(pacs, study=study)) == 2
                    and all(f["node_jobs"] and f["node_jobs"][0]["state"] == "done" for f in fws)
                    and fws
                ),
                timeout=60,
            )
            assert {f["kind"] for f in both} == {"instance"}
            (job,) = node.db.query("SELECT id, run_id FROM jobs")
            assert job["run_id"] == uid
            assert [[j["id"] for j in f["node_jobs"]] for f in both] == [[job["id"]]] * 2
            # one forward alone (GET /angio-node/forwards/{id}) shows it too
            alone = pacs.get(f"/angio-node/forwards/{both[0]['id']}").json()
            assert [j["id"] for j in alone["node_jobs"]] == [job["id"]]
    finally:
        pacs.stop()


# What the radiologist sees (OHIF, Orthanc Explorer, Orthanc's Web Viewer): tests/test_viewers.py


@needs_orthanc
@needs_storescu
def test_an_instance_the_node_refuses_holds_back_none_of_the_others(tmp_path: Path) -> None:
    """A series of five instances through Orthanc, one of which the node refuses for
    good (0xA900: Bits Stored over Bits Allocated). Orthanc's store job stopped at it,
    so the three after it never reached the node; the forward was sent eight times,
    refused eight times, and failed, and the node held one instance of five. Now each
    instance goes by a forward of its own: four are stored, the refused one fails
    once with the node's status, and the node processes the four. A multi-frame run
    the node refuses fails at once, not after eight attempts."""
    pacs, node_port, api_port = pacs_for_node(tmp_path)
    try:
        with running_node(
            tmp_path / "node", pacs, port=node_port, api_port=api_port, quiet_period_s=3
        ) as node:
            series = single_frame_series(5)
            series[1].BitsStored = 17  # Orthanc stores it; the node refuses it 0xA900
            storescu(pacs, *[save(ds, tmp_path / "in") for ds in series])
            run = xa_run(frames=4, seed=6)
            run.BitsStored = 17
            storescu(pacs, save(run, tmp_path / "in"))
            series_uid = _processed(node, series)
            stored = node.db.query(
                "SELECT sop_instance_uid FROM instances WHERE series_uid=?", (series_uid,)
            )
            assert {r["sop_instance_uid"] for r in stored} == {
                str(ds.SOPInstanceUID) for i, ds in enumerate(series) if i != 1
            }
            by_state = settled_forwards(pacs)
            (split,) = by_state["split"]
            assert split["attempts"] == 1 and "0xA900" in split["error"]
            assert len(by_state["sent"]) == 4
            failed = sorted(by_state["failed"], key=lambda f: f["id"])
            assert len(failed) == 2 and all(
                f["attempts"] == 1 and "0xA900" in f["error"] for f in failed
            ), failed
            assert {f["kind"] for f in failed} == {"instance", "series"}
    finally:
        pacs.stop()


@needs_orthanc
@needs_storescu
def test_over_stow_rs_a_refused_instance_is_sent_again_alone(tmp_path: Path) -> None:
    """The same series over STOW-RS: one request carries all five, so the four the node
    takes arrive, and Orthanc's job says "only able to receive 4 instances out of 5".
    The forward was sent again whole, every instance of the series each time (a 1 GB
    series eight times over), until it failed. Now it is split: each instance goes by a
    forward of its own, four are sent, and the refused one is tried once alone. Orthanc's
    job says only "Error in the network protocol" of the node's answer, 409 (refused for
    good) or 503 (for want of room), and the refused instance was tried MaxAttempts
    (8) times; the plugin now asks the node why (``GET /refusals``) and fails it at
    once with the node's status and reason."""
    pacs, node_port, api_port = pacs_for_node(tmp_path, dicomweb=True)
    try:
        with running_node(
            tmp_path / "node", pacs, port=node_port, api_port=api_port, quiet_period_s=3
        ) as node:
            series = single_frame_series(5)
            series[1].BitsStored = 17
            storescu(pacs, *[save(ds, tmp_path / "in") for ds in series])
            _processed(node, series)
            assert len(node.db.query("SELECT 1 FROM instances")) == 4
            by_state = settled_forwards(pacs, timeout=60)
            (split,) = by_state["split"]
            assert split["attempts"] == 1, split
            assert "only able to receive 4 instances out of 5" in split["error"], split
            assert len(by_state["sent"]) == 4, by_state
            (failed,) = by_state["failed"]  # tried alone: only it was sent again
            assert failed["resources"] == [
                pacs.post("/tools/lookup", data=str(series[1].SOPInstanceUID)).json()[0]["ID"]
            ]
            assert failed["attempts"] <= 1, failed  # not MaxAttempts (8)
            assert "the node refused it: DIMSE status 0xA900" in failed["error"], failed
    finally:
        pacs.stop()


@needs_orthanc
@needs_storescu
def test_a_node_whose_disk_is_full_is_unavailable_and_a_run_waits_for_room(
    tmp_path: Path,
) -> None:
    """The node's disk filled by another program while Orthanc forwards to it. The
    plugin's status says the node is ``unavailable`` with the node's reason (not
    ``unreachable``: it answers); the run Orthanc forwards meanwhile is answered 0xA700
    (the association was ended with no answer while the data set arrived: a network
    fault to Orthanc), the forward is retried, not failed, and once there is room it is
    delivered and processed."""
    from tests.test_disk_full import _fill, tmpfs

    overrides = copy.deepcopy(FAST)
    overrides["AngioNode"]["Retry"]["MaxAttempts"] = 30
    pacs, node_port, api_port = pacs_for_node(tmp_path, overrides)
    try:
        with (
            tmpfs(tmp_path / "disk", "48m") as disk,
            running_node(
                disk / "node",
                pacs,
                port=node_port,
                api_port=api_port,
                min_free_bytes=2**20,
                retention={"reserve_bytes": 0, "free_target_bytes": None, "keep_days": None},
            ) as node,
        ):
            ballast = _fill(disk)
            status = wait_for(  # the node's probe writes at most every 5 s
                "the node unavailable",
                lambda: (
                    (st := pacs.get("/angio-node/status").json())["node"]["status"] == "unavailable"
                    and st
                ),
                timeout=20,
            )
            assert "MiB free" in status["node"]["error"] or "full" in status["node"]["error"]
            run = xa_run(frames=6, rows=256, cols=256, seed=8)
            storescu(pacs, save(run, tmp_path / "in"))
            (waiting,) = wait_for(
                "a forward refused for want of room",
                lambda: [f for f in forwards(pacs) if f["attempts"] >= 1],
            )
            assert waiting["state"] == "retrying" and "0xA700" in waiting["error"], waiting
            ballast.unlink()  # room again
            wait_for(
                "the run processed",
                lambda: node.db.query("SELECT id FROM jobs WHERE state='done'"),
                timeout=60,
            )
            assert forwards(pacs)[0]["state"] == "sent"
            wait_for(  # the probe's answer is 5 s old at most
                "the node ok again",
                lambda: pacs.get("/angio-node/status").json()["node"]["status"] == "ok",
                timeout=20,
            )
    finally:
        pacs.stop()


@needs_orthanc
@needs_storescu
def test_a_forward_of_what_was_deleted_from_orthanc_fails_at_once(tmp_path: Path) -> None:
    """A run, and one instance of a series, deleted from Orthanc (by a user, or by
    Orthanc's recycling of a full storage) while their forwards wait for a node that is
    down: every attempt failed to submit its job (Orthanc's unknown resource) and the
    forwards stayed ``retrying`` until ``MaxAttempts``, hours at the default backoff, the
    series' other instances with them. Now such a forward fails at its next attempt,
    saying what was deleted, and what is left goes by a forward of its own."""
    overrides = copy.deepcopy(FAST)
    overrides["AngioNode"]["Retry"]["MaxAttempts"] = 100
    pacs, node_port, api_port = pacs_for_node(tmp_path, overrides)
    try:
        gone, kept = xa_run(frames=4, seed=11), xa_run(frames=4, seed=12)
        series = single_frame_series(3)
        storescu(pacs, *[save(ds, tmp_path / "in") for ds in [gone, kept, *series]])
        wait_for(
            "the three forwards tried",
            lambda: len([f for f in forwards(pacs) if f["attempts"] >= 1]) == 3,
        )

        def instance_id(ds: Any) -> str:
            return str(pacs.post("/tools/lookup", data=str(ds.SOPInstanceUID)).json()[0]["ID"])

        deleted = [instance_id(gone), instance_id(series[1])]
        for iid in deleted:
            assert pacs.delete(f"/instances/{iid}").ok
        failed = wait_for(
            "the two forwards failed",
            lambda: (
                sorted((f for f in forwards(pacs) if f["state"] == "failed"), key=lambda f: f["id"])
                if len([f for f in forwards(pacs) if f["state"] == "failed"]) == 2
                else None
            ),
            timeout=20,
        )
        assert "1 of its 1 instance(s) deleted from Orthanc" in failed[0]["error"], failed
        assert (
            "1 of its 3 instance(s) deleted from Orthanc: the 2 left sent by forward"
            in (failed[1]["error"])
        ), failed
        with running_node(tmp_path / "node", pacs, port=node_port, api_port=api_port) as node:
            wait_for(
                "the run and the series' two instances processed",
                lambda: len(node.db.query("SELECT id FROM jobs WHERE state='done'")) == 2,
                timeout=60,
            )
            stored = {r["sop_instance_uid"] for r in node.db.query("SELECT * FROM instances")}
            assert stored == {str(ds.SOPInstanceUID) for ds in (kept, series[0], series[2])}
    finally:
        pacs.stop()


@needs_orthanc
@needs_storescu
def test_a_full_disk_under_the_ledger_pauses_forwarding_and_ends_nothing(
    tmp_path: Path,
) -> None:
    """The disk that holds the plugin's ledger (next to Orthanc's storage, by default)
    full: SQLite's "database or disk is full" is not an error the plugin's loop caught,
    so its thread ended and nothing was forwarded again until Orthanc restarted, and an
    operator's retry got a 500 with a traceback. Now the loop logs it once and goes on,
    the retry is answered 503, and once there is room both runs are forwarded."""
    from tests.test_disk_full import _fill, tmpfs

    with tmpfs(tmp_path / "disk", "4m") as disk:
        overrides = copy.deepcopy(FAST)
        overrides["AngioNode"]["StateFile"] = str(disk / "ledger.sqlite")
        overrides["AngioNode"]["Retry"]["MaxAttempts"] = 100
        pacs, node_port, api_port = pacs_for_node(tmp_path, overrides)
        try:
            first, second = xa_run(frames=4, seed=13), xa_run(frames=4, seed=14)
            storescu(pacs, save(first, tmp_path / "in"))  # the node is not up yet
            (fw,) = wait_for(
                "a failed attempt", lambda: [f for f in forwards(pacs) if f["attempts"] >= 1]
            )
            ballast = _fill(disk)
            retry = pacs.post(f"/angio-node/forwards/{fw['id']}/retry")
            assert retry.status_code == 503 and "full" in retry.json()["error"], retry.text
            storescu(pacs, save(second, tmp_path / "in"))
            time.sleep(3)  # a few passes of the plugin's loop meet the full disk
            status = pacs.get("/angio-node/status").json()
            assert status["worker_alive"], status
            assert "full" in (status["last_error"] or ""), status
            ballast.unlink()
            with running_node(tmp_path / "node", pacs, port=node_port, api_port=api_port) as node:
                wait_for(
                    "both runs processed once there is room",
                    lambda: len(node.db.query("SELECT id FROM jobs WHERE state='done'")) == 2,
                    timeout=60,
                )
            full = [line for line in pacs.log_text().splitlines() if "disk is full" in line]
            assert 1 <= len(full) <= 4, full  # once a part of the loop, not every pass
            assert "Traceback" not in pacs.log_text()
        finally:
            pacs.stop()


@needs_orthanc
@needs_storescu
def test_an_instance_orthanc_cannot_give_holds_back_none_after_it(tmp_path: Path) -> None:
    """Instances stored while forwarding was off, one run's file then lost from Orthanc's
    storage and one file of a single-frame series moved away for a moment. The plugin
    stopped its change log at the first instance it could not read: nothing sent after
    it was ever forwarded. Now such an instance is set aside and read again with the
    forwards' backoff: the runs after it are forwarded, the series once its file is back
    (its StableSeries has passed by then), and the lost one fails after MaxAttempts,
    listed in the status with Orthanc's error."""
    overrides = copy.deepcopy(FAST)
    overrides["AngioNode"]["Enabled"] = False
    overrides["AngioNode"]["Retry"]["MaxAttempts"] = 5
    pacs = start_orthanc(
        tmp_path,
        with_plugin=True,
        overrides=overrides,
        node={"aet": NODE_AET, "port": free_port(), "api_url": f"http://127.0.0.1:{free_port()}"},
    )
    try:
        runs = [xa_run(frames=3, seed=s) for s in (1, 2, 3)]
        singles = single_frame_series(3)
        storescu(pacs, *[save(ds, tmp_path / "in") for ds in runs[:2] + singles + runs[2:]])

        def stored_file(ds: Any) -> Path:
            iid = pacs.post("/tools/lookup", data=str(ds.SOPInstanceUID)).json()[0]["ID"]
            uuid = pacs.get(f"/instances/{iid}/attachments/dicom/info").json()["Uuid"]
            storage = Path(pacs.config["StorageDirectory"])
            return next((pacs.config_path.parent / storage).rglob(uuid))

        stored_file(runs[1]).unlink()  # lost for good
        moved = stored_file(singles[1])
        away = moved.rename(tmp_path / "away")
        pacs.stop()
        config = pacs.config
        config["AngioNode"].update(Enabled=True, ForwardExistingOnFirstStart=True)
        pacs.config_path.write_text(json.dumps(config))
        pacs.start()
        wait_for("the series' file set aside", lambda: "cannot be read" in pacs.log_text())
        away.rename(moved)  # back

        def series_sent(fws: list[dict[str, Any]]) -> set[str]:
            return {r for f in fws if f["kind"] == "series" for r in f["resources"]}

        listed = wait_for(  # the series in two: what Orthanc gave at once, then the third
            "the runs after the lost one, and the whole series, forwarded",
            lambda: (fws := forwards(pacs)) and len(series_sent(fws)) == 3 and fws,
            timeout=90,  # 15-22 s here, loaded or not; 30 s ran out once in a CI run
        )
        assert {f["sop_instance_uid"] for f in listed if f["kind"] == "instance"} == {
            str(runs[0].SOPInstanceUID),
            str(runs[2].SOPInstanceUID),
        }
        assert {f["series_uid"] for f in listed if f["kind"] == "series"} == {
            str(singles[0].SeriesInstanceUID)
        }
        (lost,) = wait_for(
            "the lost run failed",
            lambda: [
                u for u in pacs.get("/angio-node/status").json()["unread"] if u["state"] == "failed"
            ],
        )
        assert lost["attempts"] == 5 and "cannot be read" in lost["error"]
        assert pacs.get("/angio-node/status").json()["worker_alive"]
    finally:
        pacs.stop()


@contextmanager
def _orthanc_and_node(
    tmp_path: Path, settings: Callable[[OrthancProcess], dict[str, Any]]
) -> Iterator[tuple[OrthancProcess, Any]]:
    """An Orthanc without the plugin that knows the node (its ``angio-node`` modality),
    and the node, its ``settings`` made for that Orthanc."""
    from dicom_node.service import Node
    from dicom_node.settings import load_settings

    node_port = free_port()
    pacs = start_orthanc(tmp_path, with_plugin=False, node={"aet": NODE_AET, "port": node_port})
    try:
        node = Node(
            load_settings(
                None,
                environ={},
                storage_dir=tmp_path / "node",
                port=node_port,
                api={"enabled": False},
                **settings(pacs),
            )
        ).start()
        try:
            yield pacs, node
        finally:
            node.stop()
    finally:
        pacs.stop()


@needs_orthanc
def test_orthanc_asks_the_node_for_storage_commitment_and_takes_the_result(
    tmp_path: Path,
) -> None:
    """Orthanc, a foreign storage commitment SCU, sends two instances to the node and
    asks whether it holds them and a third it never sent. Orthanc takes the result on
    its own DICOM port (the asynchronous mode it expects) and shows it under the
    transaction: two committed, one failed 0x0112. Before, the node did not accept the
    Storage Commitment context: Orthanc's request failed at once."""

    def settings(pacs: OrthancProcess) -> dict[str, Any]:
        address = {"name": "orthanc", "ae_title": pacs.aet, "host": "127.0.0.1"}
        return {
            "rules": [],
            "storage_commitment": {"report_to": [{**address, "port": pacs.dicom_port}]},
        }

    with _orthanc_and_node(tmp_path, settings) as (pacs, node):
        sent = [xa_run(frames=2, seed=s) for s in (31, 32)]
        ids = []
        for ds in sent:
            answer = pacs.post("/instances", data=save(ds, tmp_path / "up").read_bytes())
            answer.raise_for_status()
            ids.append(answer.json()["ID"])
        pacs.post(
            "/modalities/angio-node/store", json={"Resources": ids, "Synchronous": True}
        ).raise_for_status()
        never = generate_uid()
        asked = [
            {"SOPClassUID": str(ds.SOPClassUID), "SOPInstanceUID": str(ds.SOPInstanceUID)}
            for ds in sent
        ] + [{"SOPClassUID": str(sent[0].SOPClassUID), "SOPInstanceUID": never}]
        request = pacs.post(
            "/modalities/angio-node/storage-commitment", json={"DicomInstances": asked}
        )
        request.raise_for_status()
        path = request.json()["Path"]
        result = wait_for(
            "Orthanc to take the node's result",
            lambda: (r := pacs.get(path).json()).get("Status") != "Pending" and r,
            timeout=30,
        )
        assert result["Status"] == "Failure", result  # one instance is not held
        assert sorted(i["SOPInstanceUID"] for i in result["Success"]) == sorted(
            str(ds.SOPInstanceUID) for ds in sent
        )
        assert [(f["SOPInstanceUID"], f["FailureReason"]) for f in result["Failures"]] == [
            (never, 0x0112)
        ]
        assert node.db.status_summary()["storage_commitments"] == {"reported": 1}


@needs_orthanc
def test_orthanc_commits_to_the_results_the_node_sent_it(tmp_path: Path) -> None:
    """Orthanc as a destination that commits (``storage_commitment = true``): the node
    asks it, after the results are stored there, whether it holds them, and Orthanc
    reports on its own association to the node (the node as SCU of the class, Orthanc
    proposing the SCP role): every result is committed to."""

    def settings(pacs: OrthancProcess) -> dict[str, Any]:
        dest = {"kind": "dimse", "name": "orthanc", "host": "127.0.0.1", "ae_title": pacs.aet}
        dest.update(port=pacs.dicom_port, storage_commitment=True)
        return {"rules": MINIP_ONLY, "outbox": {"poll_interval_s": 0.1}, "destinations": [dest]}

    with _orthanc_and_node(tmp_path, settings) as (pacs, node):
        send_storescu(NODE_AET, node.port, [save(xa_run(frames=3, seed=41), tmp_path / "in")])
        rows = wait_for(
            "the node's results committed to by Orthanc",
            lambda: (
                (r := node.db.query("SELECT * FROM outbox"))
                and all(x["commitment"] == "committed" for x in r)
                and r
            ),
            timeout=90,
        )
        stored = {
            i["MainDicomTags"]["SOPInstanceUID"] for i in pacs.get("/instances?expand").json()
        }
        assert {r["sop_instance_uid"] for r in rows} <= stored
