"""Rejection notes (IHE IOCM): a sender withdraws instances, and the node withdraws what it
made of them (``dicom_node.rejection``). Real associations: the sender is pynetdicom,
the destination dcmtk's storescp; every note the node makes passes dciodvfy."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import requests
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import KeyObjectSelectionDocumentStorage

from dicom_node.db import RunState
from tests.conftest import dciodvfy_errors, wait_for
from tests.dicomgen import rejection_note, xa_run
from tests.test_ingest import MINIP_ONLY, _send

PATIENT_SAFETY = ("113037", "DCM", "Rejected for Patient Safety Reasons")
OF_INTEREST = ("113000", "DCM", "Of Interest")


def note(title: tuple[str, str, str], *instances: Dataset) -> Dataset:
    return rejection_note(title, list(instances))


def _listed(kos: Dataset) -> set[str]:
    return {
        str(sop.ReferencedSOPInstanceUID)
        for study in kos.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    }


def _run_reason(node: Any, run_id: str) -> dict[str, Any]:
    wait_for(
        lambda: node.db.run_state(run_id) not in (RunState.RECEIVING, RunState.COMPLETE),
        30,
        what=f"run {run_id} settled",
    )
    return dict(node.db.query("SELECT state, reason FROM runs WHERE run_id=?", (run_id,))[0])


def _processed_and_delivered(make_node: Any, storescp: Any) -> tuple[Any, Dataset]:
    """A node whose run from SUITE was processed and its results delivered to dcmtk's
    storescp; the node and the run."""
    storescp.start()
    node = make_node(destinations=[storescp.destination()], rules=MINIP_ONLY)
    source = xa_run(frames=5)
    assert _send(node, source, calling="SUITE") == 0x0000
    wait_for(
        lambda: (
            node.db.query("SELECT 1 FROM outbox WHERE state='sent'")
            and node.db.pending_deliveries() == 0
        ),
        120,
        what="the run's results delivered",
    )
    return node, source


def test_results_of_rejected_instances_are_withdrawn_at_their_destination(
    make_node: Any, storescp: Any
) -> None:
    """A run processed and its results delivered; then the suite rejects the run's
    instance (the wrong patient). Before, the note was refused (0x0122: SOP class not
    supported) and the results stayed in the PACS under that patient. Now the node
    sends its own rejection note, with the same title, listing exactly those results,
    in their patient's study; applied again, it queues nothing twice."""
    node, source = _processed_and_delivered(make_node, storescp)
    sent = "SELECT sop_instance_uid, sop_class_uid FROM outbox WHERE state='sent'"
    results = {r["sop_instance_uid"] for r in node.db.query(sent)}
    received = {p.name for p in storescp.files()}
    (held,) = node.db.run_instances(str(source.SOPInstanceUID))

    rejection = note(PATIENT_SAFETY, source)
    assert _send(node, rejection, calling="SUITE") == 0x0000
    reason = _run_reason(node, str(rejection.SOPInstanceUID))
    assert reason["state"] == RunState.UNROUTED
    assert (
        "1 run(s)" in reason["reason"] and f"{len(results)} delivered result(s)" in reason["reason"]
    )
    assert "113037" in reason["reason"] and "from SUITE" in reason["reason"]
    # the rejected run's files are deleted, once the note's run is settled
    wait_for(lambda: not held.path.exists(), 10, what="the rejected run's file deleted")
    assert node.db.is_purged(held.run_id)

    kos_rows = f"SELECT * FROM outbox WHERE sop_class_uid='{KeyObjectSelectionDocumentStorage}'"
    wait_for(
        lambda: [r for r in node.db.query(kos_rows) if r["state"] == "sent"],
        60,
        what="the node's rejection note delivered",
    )
    (new,) = [p for p in storescp.files() if p.name not in received]
    kos = dcmread(new)
    assert kos.SOPClassUID == KeyObjectSelectionDocumentStorage
    title = kos.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator) == PATIENT_SAFETY[:2]
    assert _listed(kos) == results  # exactly the results, not the source
    assert kos.PatientID == source.PatientID and kos.StudyInstanceUID == source.StudyInstanceUID
    assert kos.SeriesDescription.startswith("AI ")  # a result of the node: never routed back
    assert dciodvfy_errors(new) == []

    # applied again (a crash before the note's run was settled): nothing new to send
    run = node.db.run_instances(str(rejection.SOPInstanceUID))[0]
    node.router.rejections.apply(run.run_id, run.path, "SUITE")
    assert len(node.db.query(kos_rows)) == 1
    assert node.db.query(kos_rows)[0]["state"] == "sent"


def test_a_run_rejected_before_it_is_processed_is_never_processed(make_node: Any) -> None:
    """Rejected while still receiving: the run is settled with the note as its reason,
    and completing it later makes no job."""
    node = make_node(completion={"quiet_period_s": 600.0}, rules=MINIP_ONLY)
    source = xa_run(frames=1, rows=64, cols=64)  # a series: receiving until its quiet period
    assert _send(node, source, calling="SUITE") == 0x0000
    series = str(source.SeriesInstanceUID)
    assert node.db.run_state(series) == RunState.RECEIVING
    rejection = note(PATIENT_SAFETY, source)
    assert _send(node, rejection, calling="SUITE") == 0x0000
    assert "0 delivered result(s)" in _run_reason(node, str(rejection.SOPInstanceUID))["reason"]
    rejected = _run_reason(node, series)
    assert rejected["state"] == RunState.UNROUTED
    assert rejected["reason"].startswith("rejected by rejection note")
    node.trigger(series_uid=series)
    assert node.db.query("SELECT * FROM jobs") == []
    # a later instance of the series opens the run again: it is settled, not processed
    later = xa_run(frames=1, rows=64, cols=64, study_uid=str(source.StudyInstanceUID))
    later.SeriesInstanceUID = series
    assert _send(node, later) == 0x0000
    assert node.db.run_state(series) == RunState.RECEIVING
    node.trigger(series_uid=series)
    again = _run_reason(node, series)
    assert again["state"] == RunState.UNROUTED and again["reason"] == rejected["reason"]
    assert node.db.query("SELECT * FROM jobs") == []


def test_a_note_that_rejects_nothing_here_is_settled_with_why(make_node: Any) -> None:
    """A key object selection that is not a rejection ("Of Interest"), and a rejection
    of instances the node never held: stored, and settled with the reason; nothing
    else changes."""
    node = make_node(rules=MINIP_ONLY)
    source = xa_run(frames=3)
    assert _send(node, source) == 0x0000
    wait_for(lambda: node.db.query("SELECT 1 FROM jobs WHERE state='done'"), 60, what="processed")
    interest = note(OF_INTEREST, source)
    assert _send(node, interest) == 0x0000
    assert "not a rejection note" in _run_reason(node, str(interest.SOPInstanceUID))["reason"]
    elsewhere = note(PATIENT_SAFETY, xa_run(frames=2))
    assert _send(node, elsewhere) == 0x0000
    why = _run_reason(node, str(elsewhere.SOPInstanceUID))["reason"]
    assert "none of its 1 instance(s) is held here" in why
    assert node.db.run_state(str(source.SOPInstanceUID)) == RunState.ROUTED
    assert node.db.query("SELECT state FROM outbox WHERE state!='sent'") == []


def test_only_who_sent_a_run_may_reject_it(make_node: Any) -> None:
    """A note from another sender than the run's leaves the run as it is: any sender
    could otherwise withdraw another suite's results by listing its instances. The
    suite behind a forwarder (``forwarders``) rejects what it sent through it."""
    node = make_node(forwarders=["ORTHANC"], rules=MINIP_ONLY)
    direct = xa_run(frames=3, seed=1)
    forwarded = xa_run(frames=3, seed=2, study_uid=str(direct.StudyInstanceUID))
    assert _send(node, direct, calling="SUITE_A") == 0x0000
    assert _send(node, forwarded, calling="ORTHANC", originator="SUITE_B") == 0x0000
    done = "SELECT 1 FROM jobs WHERE state='done'"
    wait_for(lambda: len(node.db.query(done)) == 2, 60, what="both runs processed")

    foreign = note(PATIENT_SAFETY, direct, forwarded)
    assert _send(node, foreign, calling="SUITE_C") == 0x0000
    why = _run_reason(node, str(foreign.SOPInstanceUID))["reason"]
    assert "its 2 run(s) held here were sent by others: not rejected" in why
    assert node.db.rejected(str(direct.SOPInstanceUID)) is None

    by_b = note(PATIENT_SAFETY, direct, forwarded)  # B, through Orthanc, names both runs
    assert _send(node, by_b, calling="ORTHANC", originator="SUITE_B") == 0x0000
    why = _run_reason(node, str(by_b.SOPInstanceUID))["reason"]
    assert (
        "from ORTHANC for SUITE_B: 1 run(s)" in why
        and "1 run(s) sent by others not rejected" in why
    )
    assert node.db.rejected(str(forwarded.SOPInstanceUID))
    assert node.db.rejected(str(direct.SOPInstanceUID)) is None


def test_a_destination_s_rejection_of_the_node_s_results_is_kept_as_feedback(
    make_node: Any, storescp: Any
) -> None:
    """A PACS that received the node's results rejects some of them (a radiologist
    marking an AI result unusable: 113001, quality) and sends its rejection note to
    the node. Before, the note was settled with "none of its instances is held here"
    and the verdict was lost. It is kept for the results' jobs, their pipeline and
    model (``dicom-node status``, /status, /metrics); a note listing them from another
    AE than the destination's keeps nothing."""
    node, source = _processed_and_delivered(make_node, storescp)
    job = node.db.query("SELECT id FROM jobs")[0]["id"]
    results = [dcmread(p) for p in storescp.files()]
    quality = ("113001", "DCM", "Rejected for Quality Reasons")

    other = note(quality, *results)
    assert _send(node, other, calling="SUITE") == 0x0000  # not the destination
    assert "is held here" in _run_reason(node, str(other.SOPInstanceUID))["reason"]
    assert node.db.status_summary()["rejected_results"] == []

    verdict = note(quality, *results)
    assert _send(node, verdict, calling=storescp.aet) == 0x0000
    reason = _run_reason(node, str(verdict.SOPInstanceUID))
    assert f"{len(results)} of the node's result(s) rejected" in reason["reason"]
    assert f"minip job {job}" in reason["reason"]
    assert node.db.status_summary()["rejected_results"] == [
        {
            "pipeline": "minip",
            "code": "113001",
            "meaning": "Rejected for Quality Reasons",
            "n": len(results),
            "jobs": 1,
        }
    ]
    metrics = requests.get(f"http://127.0.0.1:{node.api_port}/metrics", timeout=10).text
    assert f'angio_node_results_rejected{{code="113001",pipeline="minip"}} {len(results)}.0' in (
        metrics
    )
    # applied again (a resend): kept once
    assert _send(node, verdict, calling=storescp.aet) == 0x0000
    assert node.db.status_summary()["rejected_results"][0]["n"] == len(results)
    # and the training package lists the run, the case to annotate first
    out = subprocess.run(
        [sys.executable, "-m", "training", "rejected", "--storage", str(node.settings.storage_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert f"minip job {job}: run {source.SOPInstanceUID}" in out.stdout
    assert f"{len(results)} result(s) rejected, 113001 Rejected for Quality Reasons" in out.stdout
