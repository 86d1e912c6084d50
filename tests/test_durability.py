"""Nothing acknowledged is lost: kill -9 mid-transfer, destinations that are down,
job leases and retries."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import XRayAngiographicImageStorage, generate_uid
from pynetdicom import AE

from dicom_node.db import Database
from tests.conftest import free_port, wait_for
from tests.dicomgen import xa_run

MINIP_RULES = """
[[rules]]
name = "xa-minip"
pipelines = ["minip"]
[rules.match]
modality = ["XA"]
"""


def _start_serve(config: Path) -> subprocess.Popen[bytes]:
    log = open(config.with_suffix(".log"), "ab")  # noqa: SIM115 - the child owns it
    return subprocess.Popen(
        [sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def _wait_listening(config: Path, starts: int) -> None:
    log = config.with_suffix(".log")
    wait_for(lambda: log.read_text().count("storage SCP") >= starts, 60, what="node to listen")


def _store(node, *datasets) -> None:  # type: ignore[no-untyped-def]
    """Send XA instances to the node over one association, each answered Success."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(XRayAngiographicImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.settings.ae_title)
    try:
        for ds in datasets:
            assert int(assoc.send_c_store(ds).Status) == 0
    finally:
        assoc.release()


def _settled(node: Any, count: int | None = None) -> list[Any]:
    """The outbox's rows once every delivery is sent or failed (and there are ``count``
    of them, when given), else []."""
    rows = node.db.query("SELECT * FROM outbox ORDER BY id")
    if not rows or (count is not None and len(rows) != count):
        return []
    return rows if all(r["state"] in ("sent", "failed") for r in rows) else []


def _send_series_and_kill(proc: subprocess.Popen[bytes], port: int, series: str) -> list[str]:
    """Send a 12-instance series, SIGKILL the node after 6; the UIDs that got Success."""
    study = generate_uid()
    acknowledged: list[str] = []
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(XRayAngiographicImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="ANGIO_NODE")
    assert assoc.is_established
    killed = False
    for i in range(12):
        ds = xa_run(frames=1, rows=128, cols=128, series_uid=series, study_uid=study, seed=i)
        ds.InstanceNumber = i + 1
        if i == 6:
            os.kill(proc.pid, signal.SIGKILL)  # mid-association, mid-series
            proc.wait(10)
            killed = True
        try:
            status = assoc.send_c_store(ds)
        except (RuntimeError, ValueError):
            break
        if status and int(status.get("Status", 0xFFFF)) == 0:
            acknowledged.append(str(ds.SOPInstanceUID))
        elif killed:
            break
    assoc.abort()
    return acknowledged


def test_kill_9_mid_series_loses_nothing_acknowledged(tmp_path: Path) -> None:
    port, api_port = free_port(), free_port()
    storage = tmp_path / "node"
    config = tmp_path / "node.toml"
    config.write_text(
        f'storage_dir = "{storage}"\nport = {port}\nmin_free_bytes = 0\n'
        f"[api]\nport = {api_port}\n[completion]\nquiet_period_s = 1.5\nsweep_interval_s = 0.2\n"
        f"[workers]\npoll_interval_s = 0.1\n" + MINIP_RULES
    )
    series = generate_uid()
    proc = _start_serve(config)
    try:
        _wait_listening(config, 1)
        acknowledged = _send_series_and_kill(proc, port, series)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert 6 <= len(acknowledged) < 12

    proc = _start_serve(config)
    try:
        _wait_listening(config, 2)
        db = Database(storage / "node.sqlite")
        stored = {r["sop_instance_uid"]: r["path"] for r in db.query("SELECT * FROM instances")}
        for uid in acknowledged:
            assert uid in stored, f"acknowledged {uid} lost"
            assert dcmread(stored[uid]).SOPInstanceUID == uid
        # the restarted node completes and processes the partial series
        wait_for(
            lambda: db.query("SELECT * FROM jobs WHERE state='done'"),
            60,
            what="job done after restart",
        )
        run = db.query("SELECT * FROM runs")[0]
        assert run["series_uid"] == series and run["state"] == "routed"
        # no partial file is left in the spool
        assert not list((storage / "spool").rglob("*.part"))
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise


def test_destination_down_then_up_delivers_once(make_node, storescp) -> None:  # type: ignore[no-untyped-def]
    node = make_node(
        destinations=[storescp.destination()],
        rules=[{"name": "xa", "match": {"modality": ["XA"]}, "pipelines": ["minip"]}],
    )
    _store(node, *(xa_run(frames=3, seed=i) for i in range(2)))
    # destination is down: the outbox keeps the results and retries
    wait_for(lambda: node.db.query("SELECT * FROM outbox WHERE attempts >= 2"), 30, what="retries")
    pending = node.db.query("SELECT * FROM outbox WHERE state='pending'")
    assert len(pending) == 2 and all("dest" in r["error"] for r in pending)
    status = node.status()
    assert status["outbox_backlog"][0]["n"] == 2  # type: ignore[index]
    storescp.start()
    wait_for(
        lambda: len(node.db.query("SELECT * FROM outbox WHERE state='sent'")) == 2,
        30,
        what="delivery once the destination is up",
    )
    time.sleep(1.0)
    files = storescp.files()
    assert len(files) == 2  # +uf would show duplicates as extra files
    assert len({dcmread(f).SOPInstanceUID for f in files}) == 2


def test_reprocess_yields_same_uids(make_node, storescp) -> None:  # type: ignore[no-untyped-def]
    """Deterministic UIDs: a re-run supersedes rather than duplicates."""
    import requests

    storescp.start()
    node = make_node(
        destinations=[storescp.destination()],
        rules=[{"name": "xa", "match": {"modality": ["XA"]}, "pipelines": ["minip"]}],
    )
    ds = xa_run(frames=3)
    _store(node, ds)
    wait_for(lambda: node.db.query("SELECT * FROM outbox WHERE state='sent'"), 30)
    first = node.db.query("SELECT sop_instance_uid FROM outbox")[0]["sop_instance_uid"]
    resp = requests.post(
        f"http://127.0.0.1:{node.api_port}/reprocess",
        json={"study_uid": str(ds.StudyInstanceUID)},
        timeout=10,
    )
    assert resp.status_code == 200
    wait_for(lambda: len(node.db.query("SELECT * FROM jobs WHERE state='done'")) == 2, 30)
    wait_for(lambda: node.db.query("SELECT * FROM outbox WHERE state='sent' AND attempts >= 1"), 30)
    rows = node.db.query("SELECT sop_instance_uid FROM outbox")
    assert [r["sop_instance_uid"] for r in rows] == [first]


def test_job_failure_retries_then_fails_with_reason(make_node, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A run whose file vanished: permanent RunError, recorded once, no retry storm."""
    node = make_node(
        rules=[{"name": "xa", "match": {"modality": ["XA"]}, "pipelines": ["minip"]}],
        workers={"max_attempts": 2},
    )
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(XRayAngiographicImageStorage)
    node.workers.stop()  # hold the job while we break its input
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.settings.ae_title)
    ds = xa_run(frames=3)
    assert int(assoc.send_c_store(ds).Status) == 0
    assoc.release()
    path = node.db.query("SELECT path FROM instances")[0]["path"]
    Path(path).write_bytes(b"not dicom any more")
    from dicom_node.jobs import Workers

    node.workers = Workers(node.db, node.settings.workers, node.results_dir, "cpu", {})
    node.workers.start()
    # 120 s: a worker process (forkserver, pipelines preloaded) starts first.
    failed = wait_for(lambda: node.db.query("SELECT * FROM jobs WHERE state='failed'"), 120)
    job = failed[0]
    assert job["attempts"] == 1 and "cannot read" in job["error"]
    assert node.status()["failed_jobs"][0]["error"] == job["error"]  # type: ignore[index]


def _routed_job(db: Database) -> int:
    from dicom_node.db import InstanceRecord

    db.record_instance(
        InstanceRecord("1.2.3", "1.2.840.10008.5.1.4.1.1.12.1", "1.2", "1", "run-1", Path("x"),
                       1, "1.2.840.10008.1.2.1", 5, "AE")
    )  # fmt: skip
    assert db.complete_run("run-1", "test")
    (job_id,) = db.route_run("run-1", "rule", ["minip"], [])
    return job_id


def test_lease_expiry_requeues_a_dead_workers_job(tmp_path: Path) -> None:
    db = Database(tmp_path / "q.sqlite")
    jid = _routed_job(db)
    job = db.claim_job("dead-worker", lease_s=0.2, max_attempts=4)
    assert job is not None and job.id == jid
    assert db.claim_job("other", 0.2, 4) is None  # leased
    time.sleep(0.3)
    again = db.claim_job("other", 0.2, 4)
    assert again is not None and again.id == jid and again.attempts == 2
    # a new process re-queues jobs that an old process left running, at once
    assert db.recover_jobs("new-process", max_attempts=4) == (1, 0)
    third = db.claim_job("new-process-0", 100, 4)
    assert third is not None and third.attempts == 3
    assert db.retry_job(third, "boom", 0.3)  # attempt 3 of 4: retried with backoff
    row = db.query("SELECT state, error, not_before FROM jobs")[0]
    assert row["state"] == "queued" and "boom" in row["error"] and row["not_before"] > time.time()
    assert not db.retry_job(third, "again", 0)  # a transition checks the state it leaves
    time.sleep(0.5)
    fourth = db.claim_job("new-process-0", 100, 4)
    assert fourth is not None and fourth.attempts == 4
    assert db.fail_job(fourth, "boom again")
    row = db.query("SELECT state, error FROM jobs")[0]
    assert row["state"] == "failed" and "boom again" in row["error"]


def test_a_job_that_keeps_killing_its_node_fails_after_max_attempts(tmp_path: Path) -> None:
    """claim_job counts attempts across restarts: a job whose lease expired after its
    last attempt fails with the reason instead of being claimed again."""
    db = Database(tmp_path / "q.sqlite")
    _routed_job(db)
    for start in range(3):
        job = db.claim_job(f"process-{start}", lease_s=0.05, max_attempts=3)
        assert job is not None and job.attempts == start + 1
        time.sleep(0.1)  # the process is killed: no renewal, no outcome
    assert db.claim_job("process-3", lease_s=0.05, max_attempts=3) is None
    row = db.query("SELECT state, error FROM jobs")[0]
    assert row["state"] == "failed" and "worker lost 3 time(s)" in row["error"]


def test_a_destination_that_refuses_a_sop_class_fails_those_results_only(
    make_node, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """A destination that accepts the association but not every result's SOP Class
    (a PACS without Segmentation or SR storage): those results fail with the reason,
    the others are delivered, and the outbox goes on delivering. (pynetdicom raised
    ValueError for a class with no accepted context, which ended the outbox's
    thread: nothing was delivered anywhere from then on.)"""
    from pynetdicom import evt
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
        SecondaryCaptureImageStorage,
    )

    received: list[str] = []

    def on_store(event):  # type: ignore[no-untyped-def]
        received.append(str(event.request.AffectedSOPClassUID))
        return 0x0000

    dest = AE(ae_title="SCONLY")
    for sop_class in (
        SecondaryCaptureImageStorage,
        MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    ):
        dest.add_supported_context(sop_class)
    port = free_port()
    server = dest.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    try:
        node = make_node(
            destinations=[
                {
                    "kind": "dimse",
                    "name": "sc-only",
                    "host": "127.0.0.1",
                    "port": port,
                    "ae_title": "SCONLY",
                }
            ],
            rules=[{"name": "xa", "match": {"modality": ["XA"]}, "pipelines": ["dsa_av"]}],
        )
        for seed in (1, 2):  # the second run's results go out after the first's refusals
            _store(node, xa_run(frames=8, seed=seed))

        rows = wait_for(lambda: _settled(node), 120, what="every result sent or failed")
        failed = [r for r in rows if r["state"] == "failed"]
        sent = [r for r in rows if r["state"] == "sent"]
        assert failed and sent
        assert {r["sop_class_uid"] for r in sent} <= {
            SecondaryCaptureImageStorage,
            MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
        }
        assert all("did not accept" in r["error"] for r in failed), [r["error"] for r in failed]
        assert sorted(received) == sorted(r["sop_class_uid"] for r in sent)
        assert all(t.is_alive() for t in node.outbox.threads)
    finally:
        server.shutdown()


def test_a_defect_while_delivering_defers_the_batch_and_keeps_the_outbox(
    make_node, storescp, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """Fault injection: the DIMSE sender raises an unexpected error once. The batch
    is retried after its backoff with the reason, and delivered; the outbox's
    thread lives on (any exception but DeliveryError and OSError used to end it)."""
    from dicom_node import senders

    real = senders._SENDERS["dimse"]
    calls = []

    def flaky(*args):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected defect")
        return real(*args)

    monkeypatch.setitem(senders._SENDERS, "dimse", flaky)
    storescp.start()
    node = make_node(
        destinations=[storescp.destination()],
        rules=[{"name": "xa", "match": {"modality": ["XA"]}, "pipelines": ["minip"]}],
    )
    _store(node, xa_run(frames=3))
    wait_for(lambda: node.db.query("SELECT * FROM outbox WHERE state='sent'"), 30, what="delivered")
    assert len(calls) >= 2 and all(t.is_alive() for t in node.outbox.threads)
    (row,) = node.db.query("SELECT * FROM outbox")
    assert row["attempts"] >= 1


def test_a_defect_in_the_router_or_a_worker_does_not_end_their_threads(
    make_node, storescp, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """Fault injection: the index raises once while the router looks for runs, once
    while each worker claims a job, once while each outbox thread looks for what is
    due, and once in the completion sweep (as SQLite does when the database is locked
    past its timeout). All go on, and the run is routed, processed and delivered."""
    import sqlite3

    storescp.start()
    node = make_node(
        destinations=[storescp.destination()],
        rules=[{"name": "xa", "match": {"modality": ["XA"]}, "pipelines": ["minip"]}],
    )
    failures: list[str] = []
    threads = {"claim_job": node.workers.threads, "due_deliveries": node.outbox.threads}

    def once(name: str):  # type: ignore[no-untyped-def]
        real = getattr(node.db, name)
        count = len(threads.get(name, [None]))

        def flaky(*args, **kwargs):  # type: ignore[no-untyped-def]
            if failures.count(name) < count:
                failures.append(name)
                raise sqlite3.OperationalError("database is locked")
            return real(*args, **kwargs)

        monkeypatch.setattr(node.db, name, flaky)

    once("runs_to_route")
    once("claim_job")
    once("due_deliveries")
    once("after_a_clock_step")
    _store(node, xa_run(frames=3))
    wait_for(lambda: node.db.query("SELECT * FROM outbox WHERE state='sent'"), 60, what="delivered")
    assert {"runs_to_route", "claim_job", "due_deliveries", "after_a_clock_step"} <= set(failures)
    assert node.router.threads[0].is_alive() and node.sweeper._thread.is_alive()
    assert all(t.is_alive() for t in node.workers.threads + node.outbox.threads)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [("gone", "is gone: reprocess the run"), ("garbled", "result file cannot be read")],
)
def test_a_result_file_damaged_before_delivery_fails_with_the_reason(
    make_node, storescp, damage, reason
) -> None:  # type: ignore[no-untyped-def]
    """A result removed from the disk, or overwritten, while its destination was down
    (by hand, by a cleanup) fails for good once the destination is back, with the
    reason; the other results are delivered. (Either deferred the whole batch, so
    the results behind it were never delivered either.)"""
    node = make_node(
        destinations=[storescp.destination()],
        rules=[{"name": "xa", "match": {"modality": ["XA"]}, "pipelines": ["minip"]}],
    )
    _store(node, *(xa_run(frames=3, seed=i) for i in range(2)))
    pending = wait_for(
        lambda: (
            [r for r in node.db.query("SELECT * FROM outbox") if r["attempts"] >= 1]
            if len(node.db.query("SELECT * FROM outbox")) == 2
            else []
        ),
        30,
        what="both results waiting for the destination",
    )
    damaged = Path(pending[0]["path"])
    if damage == "gone":
        damaged.unlink()
    else:
        damaged.write_bytes(b"not DICOM")
    storescp.start()

    rows = wait_for(lambda: _settled(node, 2), 60, what="both deliveries settled")
    states = {r["id"]: (r["state"], r["error"]) for r in rows}
    state, error = states[pending[0]["id"]]
    assert state == "failed" and reason in error
    assert sorted(s for s, _ in states.values()) == ["failed", "sent"]
    assert all(t.is_alive() for t in node.outbox.threads)


class _Answers:
    """A destination's answers per object, in order of first arrival: the first object
    is answered 'not now' (out of resources, processing failure, resource limitation)
    and then stored; every other one is refused for good."""

    NOT_NOW = (0xA700, 0x0110, 0x0213)

    def __init__(self, refusal: int) -> None:
        self.refusal = refusal
        self.tries: dict[str, int] = {}
        self.stored: list[str] = []

    def answer(self, uid: str) -> int:
        first = not self.tries or next(iter(self.tries)) == uid
        n = self.tries[uid] = self.tries.get(uid, 0) + 1
        if not first:
            return self.refusal
        if n <= len(self.NOT_NOW):
            return self.NOT_NOW[n - 1]
        self.stored.append(uid)
        return 0x0000


class _StowHandler(BaseHTTPRequestHandler):
    """A test STOW-RS endpoint's plumbing: the posted part's header, an answer."""

    def _posted(self) -> Any:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        part = body.split(b"\r\n\r\n", 1)[1].rsplit(b"\r\n--", 1)[0]
        return dcmread(BytesIO(part), stop_before_pixels=True)

    def _send(
        self, status: int, body: bytes, kind: str = "application/dicom+json", **headers: str
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def _http_server(handler: type) -> tuple[Any, int]:
    """An HTTP server on a free loopback port, serving in a thread of its own."""
    import threading
    from http.server import ThreadingHTTPServer

    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, int(server.server_address[1])


def _stow_destination(answers: _Answers) -> tuple[Any, dict[str, Any]]:
    """A STOW-RS endpoint answering each instance's Failure Reason in a Failed SOP
    Sequence (HTTP 409), or 200 with it referenced; its first answer of all is a
    408 Request Timeout."""
    import json

    timed_out: list[bool] = []

    class Handler(_StowHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            uid = str(self._posted().SOPInstanceUID)
            if not timed_out:
                timed_out.append(True)
                self._send(408, b"")
                return
            code = answers.answer(uid)
            item = {"00081155": {"vr": "UI", "Value": [uid]}}
            if code:
                item["00081197"] = {"vr": "US", "Value": [code]}
                reply, status = {"00081198": {"vr": "SQ", "Value": [item]}}, 409
            else:
                reply, status = {"00081199": {"vr": "SQ", "Value": [item]}}, 200
            self._send(status, json.dumps(reply).encode())

    server, port = _http_server(Handler)
    return server, {"kind": "dicomweb", "name": "answers", "url": f"http://127.0.0.1:{port}"}


def _storage_scp(
    ae_title: str, on_store: Any = None, called: str | None = None, require_called: bool = False
) -> tuple[Any, dict[str, Any]]:
    """A pynetdicom storage SCP on a free loopback port (its C-STORE handler
    ``on_store``), and the node's destination entry for it (called AE ``called``)."""
    from pynetdicom import AllStoragePresentationContexts, evt

    ae = AE(ae_title=ae_title)
    ae.supported_contexts = AllStoragePresentationContexts
    ae.require_called_aet = require_called
    handlers = [(evt.EVT_C_STORE, on_store)] if on_store is not None else []
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
    return server, {
        "kind": "dimse",
        "name": ae_title.lower(),
        "host": "127.0.0.1",
        "port": server.server_address[1],
        "ae_title": called or ae_title,
    }


def _dimse_destination(answers: _Answers) -> tuple[Any, dict[str, Any]]:
    return _storage_scp("ANSWERS", lambda e: answers.answer(str(e.request.AffectedSOPInstanceUID)))


@pytest.mark.parametrize(
    ("kind", "refusal"), [("dimse", 0xA900), ("dimse", 0xC000), ("dicomweb", 0xC000)]
)
def test_a_destination_that_cannot_store_now_gets_the_object_again(
    make_node: Any, kind: str, refusal: int
) -> None:
    """Out of resources (0xA7xx), a processing failure (0x0110), a resource
    limitation (0x0213) and an HTTP 408 say 'not now': the object is sent again after the backoff
    until it is stored, over C-STORE and STOW-RS alike. A refusal of the object
    (0xA900, 0xC000) fails that delivery for good with the status. (0x0110 and
    0x0213 failed the delivery for good, and over STOW-RS 0xA700 did too: results a
    destination could not store for a moment were never delivered.)"""
    answers = _Answers(refusal)
    server, dest = (_stow_destination if kind == "dicomweb" else _dimse_destination)(answers)
    try:
        node = make_node(
            destinations=[dest],
            rules=[{"name": "xa", "match": {"modality": ["XA"]}, "pipelines": ["minip"]}],
        )
        _store(node, *(xa_run(frames=3, seed=i) for i in range(2)))

        rows = wait_for(lambda: _settled(node, 2), 60, what="both deliveries settled")
        by_uid = {r["sop_instance_uid"]: r for r in rows}
        first, other = list(answers.tries)
        assert answers.stored == [first] and answers.tries[first] == 4
        assert by_uid[first]["state"] == "sent" and by_uid[first]["attempts"] >= 3
        assert by_uid[other]["state"] == "failed" and answers.tries[other] == 1
        assert f"0x{refusal:04X}" in by_uid[other]["error"]
    finally:
        server.shutdown()


def test_a_stow_answer_of_any_shape_is_read_without_error() -> None:
    """A destination's STOW-RS answer is read for its Failed SOP Sequence whatever
    shape its JSON has; what is not a UID with a numeric reason names no reason."""
    import requests

    from dicom_node.senders import _json_object, _stow_failures, _stow_stored

    def answer(body: bytes) -> dict[str, object] | None:
        resp = requests.Response()
        resp._content = body
        return _json_object(resp)

    shapes = {
        b"[1, 2]": {},
        b'{"00081198": 1}': {},
        b'{"00081198": {"Value": [1, "x", null, []]}}': {},
        b'{"00081198": {"Value": [{"00081155": {"Value": [7]}}]}}': {},
        b'{"00081198": {"Value": [{"00081155": {"Value": ["1.2.3"]}}]}}': {"1.2.3": None},
        b'{"00081198": {"Value": [{"00081155": {"Value": ["1.2.3"]}, "00081197": '
        b'{"Value": ["A700"]}}]}}': {"1.2.3": None},
        b'{"00081198": {"Value": [{"00081155": {"Value": ["1.2.3"]}, "00081197": '
        b'{"Value": [true]}}]}}': {"1.2.3": None},
        b"not json": {},
        b'{"00081198": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["1.2.3"]}, '
        b'"00081197": {"vr": "US", "Value": [43264]}}]}}': {"1.2.3": 0xA900},
    }
    for body, expected in shapes.items():
        assert _stow_failures(answer(body)) == expected, body
        assert _stow_stored(answer(body)) == set(), body
    stored = b'{"00081199": {"Value": [{"00081155": {"Value": ["1.2.3"]}}, 1, {"00081155": 2}]}}'
    assert _stow_stored(answer(stored)) == {"1.2.3"}


def test_a_stow_destination_that_is_not_a_stow_service_delivers_nothing_and_keeps_all(
    make_node: Any,
) -> None:
    """A DICOMweb destination whose URL is wrong, or that sits behind a login page: a
    redirect (to a sign-in page that a GET answers 200), a 200 page of HTML (a web
    application's catch-all route), a 200 JSON that names other instances, a 404 or
    405. None of them stored anything, so none may count as a delivery: the results
    wait, with the reason, until the destination is put right, and then all go. (The
    redirect and the 200 answers counted as delivered, and the 404 failed each result
    for good: results were lost without a word, or for good.)"""
    import json

    mode = ["redirect"]
    stored: list[str] = []

    def stored_answer(uid: str) -> bytes:
        item = {"00081155": {"vr": "UI", "Value": [uid]}}
        return json.dumps({"00081199": {"vr": "SQ", "Value": [item]}}).encode()

    class Handler(_StowHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self._send(200, b"<html><form>Sign in</form></html>", "text/html")

        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            uid = str(self._posted().SOPInstanceUID)
            m = mode[0]
            if m == "redirect":
                self._send(302, b"", "text/plain", Location="/login?next=/dicom-web")
            elif m == "html":
                self._send(200, b"<!doctype html><html><body>app</body></html>", "text/html")
            elif m == "other":
                self._send(200, stored_answer("1.2.3.4"))
            elif m in ("404", "405"):
                self._send(int(m), b"no such route", "text/plain")
            else:
                stored.append(uid)
                self._send(200, stored_answer(uid))

    server, port = _http_server(Handler)
    url = f"http://node:secret@127.0.0.1:{port}/dicom-web"
    try:
        node = make_node(
            destinations=[{"kind": "dicomweb", "name": "web", "url": url}],
            rules=[{"name": "xa", "match": {"modality": ["XA"]}, "pipelines": ["minip"]}],
            outbox={"backoff_base_s": 0.1, "backoff_max_s": 0.3},
        )
        _store(node, xa_run(frames=3, seed=5))
        expected = {
            "redirect": "HTTP 302, a redirect to /login (",  # the query is not shown
            "html": "not a STOW-RS response",
            "other": "does not name this instance",
            "404": "HTTP 404",
            "405": "HTTP 405",
        }
        for m, reason in expected.items():
            mode[0] = m
            wait_for(
                lambda r=reason: (
                    (rows := node.db.query("SELECT state, error FROM outbox"))
                    and all(x["state"] == "pending" and r in (x["error"] or "") for x in rows)
                    and not any("secret" in x["error"] for x in rows)  # nor the password
                ),
                60,
                what=f"every delivery pending with {reason!r}",
            )
        mode[0] = "ok"
        rows = wait_for(lambda: _settled(node), 60, what="the deliveries")
        assert {r["state"] for r in rows} == {"sent"}
        assert sorted(stored) == sorted(r["sop_instance_uid"] for r in rows)
    finally:
        server.shutdown()


def test_a_destination_that_never_answers_holds_back_no_other(
    make_node: Any, tmp_path: Path
) -> None:
    """A destination whose host drops the connection requests (a firewall that drops,
    a host switched off behind one) is tried within ``[outbox] timeout_s``, not the
    system's two minutes of SYN retries, and while it is tried, the other destinations
    get their results. (One outbox thread tried the destinations in turn: each pass
    waited 134 s on the silent one, and every destination waited with it.)"""
    import socket

    from tests.conftest import StoreSCP

    # A listening socket whose backlog is full and never accepted: the kernel drops
    # further SYNs, as a firewall would.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(0)
    fillers = []
    for _ in range(3):
        c = socket.socket()
        c.setblocking(False)
        try:
            c.connect(silent.getsockname())
        except BlockingIOError:
            pass
        fillers.append(c)
    pacs = StoreSCP(tmp_path / "pacs").start()
    try:
        node = make_node(
            destinations=[
                {
                    "kind": "dimse",
                    "name": "silent",
                    "host": "127.0.0.1",
                    "port": silent.getsockname()[1],
                    "ae_title": "SILENT",
                },
                pacs.destination(),
            ],
            rules=[{"name": "xa", "match": {"modality": ["XA"]}, "pipelines": ["minip"]}],
            outbox={"timeout_s": 10.0},
        )
        started = time.monotonic()

        def delivered(runs: int) -> bool:
            rows = node.db.query("SELECT state FROM outbox WHERE destination='dest'")
            return len(rows) == runs and all(r["state"] == "sent" for r in rows)

        for runs, seed in enumerate((11, 12), 1):  # the second while the first is tried
            _store(node, xa_run(frames=3, seed=seed))
            wait_for(
                lambda r=runs: node.db.query("SELECT 1 FROM jobs WHERE state='done'")[r - 1 :], 60
            )
            # well within the 10 s each attempt at the silent destination takes
            wait_for(lambda r=runs: delivered(r), 5, what="the destination that answers")
        assert len(pacs.files()) == len(
            node.db.query("SELECT 1 FROM outbox WHERE destination='dest'")
        )
        wait_for(
            lambda: all(
                r["state"] == "pending" and "silent" in (r["error"] or "")
                for r in node.db.query("SELECT * FROM outbox WHERE destination='silent'")
            ),
            60,
            what="the silent destination's deliveries deferred",
        )
        assert time.monotonic() - started < 60
    finally:
        pacs.stop()
        for c in fillers:
            c.close()
        silent.close()


def test_deliveries_to_a_destination_no_longer_configured_fail_with_the_reason(
    make_node: Any, tmp_path: Path
) -> None:
    """A destination taken out of the settings while results wait for it: after the
    restart, those deliveries fail with the reason (an operator's resend goes to the
    destinations configured then)."""
    from tests.conftest import StoreSCP

    pacs = StoreSCP(tmp_path / "pacs")  # down
    rules = [{"name": "xa", "match": {"modality": ["XA"]}, "pipelines": ["minip"]}]
    node = make_node(destinations=[pacs.destination("old")], rules=rules)
    _store(node, xa_run(frames=3, seed=21))
    wait_for(
        lambda: node.db.query("SELECT 1 FROM outbox WHERE state='pending' AND attempts > 0"),
        60,
        what="a delivery tried",
    )
    node.stop()
    node = make_node(destinations=[], rules=rules)
    rows = wait_for(lambda: _settled(node), 30, what="the deliveries to settle")
    assert [(r["state"], r["error"]) for r in rows] == [
        ("failed", "destination 'old' is no longer configured")
    ] * len(rows)


def test_a_destination_that_stops_reading_is_given_up_after_timeout_s(tmp_path: Path) -> None:
    """A destination that accepts the association and then reads nothing more (a PACS
    whose process hangs): sending stops after ``timeout_s`` without progress, and the
    batch is deferred as for a destination down (the object in flight after the
    others). (pynetdicom sends with no timeout: the delivery thread waited as long as
    the destination did, forever.)"""
    import threading

    import numpy as np
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage
    from pynetdicom import evt

    from dicom_node.db import Delivery
    from dicom_node.errors import DeliveryError
    from dicom_node.senders import InFlight, cstore
    from dicom_node.settings import DimseDestination

    received = [0]
    release = threading.Event()

    def stall(event: Any) -> None:  # in the SCP's reading thread: it stops reading
        received[0] += len(event.data)
        if received[0] > 100_000:
            release.wait(120)

    scp = AE(ae_title="HUNG")
    scp.add_supported_context(SecondaryCaptureImageStorage, [ExplicitVRLittleEndian])
    server = scp.start_server(
        ("127.0.0.1", 0),
        block=False,
        evt_handlers=[(evt.EVT_DATA_RECV, stall), (evt.EVT_C_STORE, lambda e: 0x0000)],
    )
    ds = xa_run(frames=1)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.Rows = ds.Columns = 4096  # 32 MiB: more than the socket buffers hold
    ds.NumberOfFrames = 1
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelData = np.zeros((4096, 4096), np.uint16).tobytes()
    path = tmp_path / "big.dcm"
    ds.save_as(path, enforce_file_format=True)
    item = Delivery(1, "hung", path, SecondaryCaptureImageStorage, str(ds.SOPInstanceUID), 0)
    dest = DimseDestination(
        name="hung", host="127.0.0.1", port=server.server_address[1], ae_title="HUNG"
    )
    reports: list[Any] = []
    started = time.monotonic()
    try:
        with pytest.raises(DeliveryError, match="no C-STORE response"):
            cstore(dest, [item], "NODE", 3.0, lambda d, r: reports.append(r))
        assert time.monotonic() - started < 30
        # the object in flight goes again after the others (it may be why)
        (report,) = reports  # the object in flight, reported as such
        assert isinstance(report, InFlight) and "sent again after" in report.reason
    finally:
        release.set()
        server.shutdown()


def test_a_destination_that_rejects_the_association_says_why_in_the_status(
    make_node: Any,
) -> None:
    """A destination that rejects the association (its called AE title mistyped in the
    node's settings, the node's AE not configured there): the deliveries wait, as for
    a destination down, and their reason says what the destination answered, so the
    administrator knows which side to correct. (It said only "rejected".)"""

    server, dest = _storage_scp("PACS", called="PACSS", require_called=True)  # mistyped
    try:
        node = make_node(
            destinations=[dest],
            rules=[{"name": "xa", "match": {"modality": ["XA"]}, "pipelines": ["minip"]}],
        )
        _store(node, xa_run(frames=3, seed=31))
        rows = wait_for(
            lambda: node.db.query("SELECT * FROM outbox WHERE attempts > 0"), 60, what="a try"
        )
        assert rows[0]["state"] == "pending"
        assert "Called AE title not recognised" in rows[0]["error"], rows[0]["error"]
        assert "Rejected Permanent" in rows[0]["error"] and "PACSS" in rows[0]["error"]
    finally:
        server.shutdown()


def test_an_object_that_makes_the_destination_abort_holds_back_no_other(
    make_node: Any,
) -> None:
    """A PACS that aborts the association on an object it cannot take (an older one, on
    a Segmentation) instead of refusing it with a status: that object is sent again
    later, after the others, which are delivered; so are the next runs' results. (The
    batch was deferred as a whole and came back in the same order: the object was
    first again, every time, and nothing behind it ever reached the destination.)
    After ``max_aborts`` such ends, the PACS storing the others in between, the object
    fails with the reason (it was tried for ever, one association each, every
    ``backoff_max_s``: a load that grew with every run). A PACS that aborts on
    everything is down, not choking on one object: nothing of it fails."""

    seg = "1.2.840.10008.5.1.4.1.1.66.4"
    aborts: list[str] = []
    takes_nothing = threading.Event()

    def on_store(event: Any) -> int:
        if str(event.request.AffectedSOPClassUID) == seg or takes_nothing.is_set():
            aborts.append(str(event.request.AffectedSOPInstanceUID))
            event.assoc.abort()
        return 0x0000

    server, dest = _storage_scp("OLDPACS", on_store)
    try:
        node = make_node(
            destinations=[dest],
            rules=[{"name": "xa", "match": {"modality": ["XA"]}, "pipelines": ["dsa_av"]}],
            outbox={"backoff_base_s": 0.2, "backoff_max_s": 1.0, "max_aborts": 3},
        )

        def delivered_but_segs() -> list[Any]:
            rows = node.db.query("SELECT * FROM outbox")
            others = [r for r in rows if r["sop_class_uid"] != seg]
            return rows if others and all(r["state"] == "sent" for r in others) else []

        for seed in (1, 2, 3, 4):
            _store(node, xa_run(frames=8, seed=seed))
            wait_for(
                lambda s=seed: node.db.query("SELECT 1 FROM jobs WHERE state='done'")[s - 1 :],
                120,
                what="the run's job",
            )
            rows = wait_for(delivered_but_segs, 30, what="every result but the SEG delivered")
        segs = [r for r in rows if r["sop_class_uid"] == seg]
        assert len(segs) == 4 and len(set(aborts)) == 4
        assert all("ended the association during its C-STORE" in r["error"] for r in segs)
        # Each abort counts once the PACS stored other objects after the one before (the
        # next runs' results): the first two runs' SEGs are given up.
        ids = [r["id"] for r in segs[:2]]

        def given_up() -> list[Any]:
            rows = node.db.query("SELECT * FROM outbox WHERE id IN (?,?)", ids)
            return rows if all(r["state"] == "failed" for r in rows) else []

        for row in wait_for(given_up, 30, what="the first two SEGs given up"):
            assert row["state"] == "failed" and row["aborts"] == 3, dict(row)
            assert (
                "ended the association during its C-STORE (it may not take this object) on 3 "
                "attempts, the destination storing other objects in between" in row["error"]
            )
        # a PACS that takes nothing: everything waits, however often it aborts
        takes_nothing.set()
        before = len(aborts)
        _store(node, xa_run(frames=8, seed=5))
        wait_for(lambda: len(aborts) > before + 12, 60, what="aborts on every object")
        pending = node.db.query("SELECT * FROM outbox WHERE state='pending'")
        assert len(pending) > 3 and all(r["aborts"] <= 2 for r in pending)
        fifth = [r for r in pending if r["created_at"] > max(x["created_at"] for x in segs)]
        assert fifth and all(r["aborts"] == 1 for r in fifth), [dict(r) for r in fifth]
        takes_nothing.clear()  # back: the fifth run's results but its SEG are delivered
        wait_for(delivered_but_segs, 60, what="the fifth run delivered")
    finally:
        server.shutdown()


def test_an_object_a_stow_server_fails_on_holds_back_no_other(make_node: Any) -> None:
    """A DICOMweb server that answers 500 for an object it chokes on (a Segmentation):
    that object is sent again later, after the others, which are stored. (A 500
    deferred the batch as a whole, in the same order: nothing behind it went.)"""
    import json

    seg = "1.2.840.10008.5.1.4.1.1.66.4"

    class Choking(_StowHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            ds = self._posted()
            if str(ds.SOPClassUID) == seg:
                self._send(500, b"internal error", "text/plain")
                return
            item = {"00081155": {"vr": "UI", "Value": [str(ds.SOPInstanceUID)]}}
            self._send(200, json.dumps({"00081199": {"vr": "SQ", "Value": [item]}}).encode())

    server, port = _http_server(Choking)
    try:
        node = make_node(
            destinations=[
                {
                    "kind": "dicomweb",
                    "name": "web",
                    "url": f"http://127.0.0.1:{port}/dicom-web",
                }
            ],
            rules=[{"name": "xa", "match": {"modality": ["XA"]}, "pipelines": ["dsa_av"]}],
            outbox={"backoff_base_s": 0.2, "backoff_max_s": 1.0, "max_aborts": 2},
        )
        _store(node, xa_run(frames=8, seed=3))

        def settled_but_seg() -> list[Any]:
            rows = node.db.query("SELECT * FROM outbox")
            rest = [r for r in rows if r["sop_class_uid"] != seg]
            return rows if len(rest) > 1 and all(r["state"] == "sent" for r in rest) else []

        rows = wait_for(settled_but_seg, 120, what="every result but the SEG stored")
        (choked,) = [r for r in rows if r["sop_class_uid"] == seg]
        assert "HTTP 500" in choked["error"]
        # its second run's results stored in between, it is given up after two 500s
        _store(node, xa_run(frames=8, seed=4))
        wait_for(
            lambda: not node.db.query("SELECT 1 FROM outbox WHERE state='pending'"),
            120,
            what="both runs settled",
        )
        for row in node.db.query("SELECT * FROM outbox WHERE sop_class_uid=?", (seg,)):
            assert row["state"] == "failed", dict(row)
            assert "STOW-RS HTTP 500 (the destination failed on it) on 2 attempts" in row["error"]
    finally:
        server.shutdown()


def test_a_step_back_of_the_wall_clock_holds_back_no_run(make_node: Any, monkeypatch: Any) -> None:
    """The wall clock stepped back an hour (NTP, a virtual machine restored from a
    snapshot) while a series was arriving: its last instance's time in the index is an
    hour ahead of the clock, and apscheduler, which compares wall-clock times, had put
    its next completion sweep an hour ahead too. The series was completed an hour late.
    Now the sweep runs on the monotonic clock, and a time ahead of the clock is taken
    as now: the series completes one quiet period later and is processed."""
    import datetime as dt

    import apscheduler.schedulers.base as scheduler_base

    class HourBack(dt.datetime):
        @classmethod
        def now(cls, tz: Any = None) -> Any:  # type: ignore[override]
            return dt.datetime.now(tz) - dt.timedelta(hours=1)

    node = make_node(rules=[{"name": "xa", "match": {"modality": ["XA"]}, "pipelines": ["minip"]}])
    import sqlite3

    frame = xa_run(frames=1, seed=21)
    series = []
    for number in range(1, 4):
        ds = frame.copy()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = number
        series.append(ds)
    monkeypatch.setattr(scheduler_base, "datetime", HourBack)  # the step, for apscheduler
    time.sleep(0.5)  # its loop has looked at the clock
    with monkeypatch.context() as held:
        held.setattr(node.db, "complete_run", lambda *_: False)  # not before the step
        _store(node, *series)
        run = str(frame.SeriesInstanceUID)
        with sqlite3.connect(node.db.path) as con:  # its time as recorded before the step
            con.execute("UPDATE runs SET last_at=last_at+3600 WHERE run_id=?", (run,))
    assert node.db.query("SELECT state FROM runs WHERE run_id=?", (run,))[0][0] == "receiving"
    wait_for(
        lambda: node.db.query("SELECT 1 FROM jobs WHERE run_id=? AND state='done'", (run,)),
        30,
        what="the series completed and processed",
    )


def test_retries_timed_before_a_clock_step_are_due_after_it(tmp_path: Path) -> None:
    """A job's, delivery's or storage commitment result's next try is at most its
    longest backoff ahead: one further ahead was timed before the wall clock was
    stepped back, and is due now (it waited for the clock to catch up: the size of
    the step)."""
    from dicom_node.db import ResultFile
    from tests.test_scale_out import _routed_job

    db = Database(tmp_path / "node.sqlite")
    _routed_job(db, tmp_path)
    job = db.claim_job("w", 60, 3)
    assert job is not None and db.retry_job(job, "crashed", 7200)  # timed before the step
    retry = db.claim_job("w", 60, 3)
    assert retry is None  # waits two hours
    result = ResultFile(tmp_path / "r.dcm", "1.2.3", "1.2.3.4", "1.2.3.5", "MinIP")
    _routed_job(db, tmp_path / "b")  # a done job with a delivery to retry later
    assert db.finish_job(db.claim_job("w", 60, 3), [result], [])  # type: ignore[arg-type]
    (delivery,) = db.due_deliveries(10)
    db.delivery_retry(delivery, "destination down", 7200)
    assert db.due_deliveries(10) == []
    # a storage commitment result retried with the outbox's backoff
    commitment = db.request_commitment("1.2.9", "SUITE", [("1.2.3", "1.2.3.4")])
    db.commitment_retry(commitment, "suite down", 7200)
    assert db.due_commitments(10) == []
    # a result's commitment, asked of a destination that commits: asked again after the wait
    _routed_job(db, tmp_path / "c")
    other = ResultFile(tmp_path / "s.dcm", "1.2.3", "1.2.3.6", "1.2.3.7", "MinIP")
    assert db.finish_job(db.claim_job("w", 60, 3), [other], [])  # type: ignore[arg-type]
    (sent,) = [d for d in db.due_deliveries(10) if d.id != delivery.id]
    db.delivery_sent(sent, commitment=True)
    db.commitment_asked([sent.id], "1.2.10", 7200)
    assert db.awaiting_commitment(sent.destination, 10) == []
    assert db.after_a_clock_step(time.time(), 300, 300, 600) == 4
    assert db.claim_job("w", 60, 3) is not None
    assert [d.id for d in db.due_deliveries(10)] == [delivery.id]
    assert [d.id for d in db.awaiting_commitment(sent.destination, 10)] == [sent.id]
    assert [c.transaction_uid for c in db.due_commitments(10)] == ["1.2.9"]
    assert db.after_a_clock_step(time.time(), 300, 300) == 0


def test_a_damaged_index_stops_the_start_with_what_to_do_and_is_rebuilt_from_the_spool(
    make_node: Any, tmp_path: Path, capsys: Any
) -> None:
    """The index damaged while the node was down (a disk that lied about a sync, a bad
    block): the start ended in SQLite's "database disk image is malformed" in a
    traceback, and nothing said what to do. The start is refused naming the damage and
    ``dicom-node rebuild-index``; that command sets the index and results/ aside,
    indexes the spool again, and the next start processes the runs again, their
    results with the same UIDs. It is refused while a node uses the storage."""
    from dicom_node.cli import main
    from dicom_node.errors import StorageError
    from dicom_node.service import Node
    from dicom_node.settings import load_settings

    def _result_uids(folder: Path) -> set[str]:
        return {str(dcmread(f).SOPInstanceUID) for f in folder.glob("*/*.dcm")}

    storage = tmp_path / "node"
    settings: dict[str, Any] = {
        "storage_dir": str(storage),
        "completion": {"quiet_period_s": 1.0, "sweep_interval_s": 0.2},
        "rules": [{"name": "all", "match": {}, "pipelines": ["minip"]}],
    }
    node = make_node(**settings)
    _store(node, xa_run(frames=3, seed=1), xa_run(frames=4, seed=2))
    wait_for(lambda: len(node.db.query("SELECT * FROM jobs WHERE state='done'")) == 2, 60)
    before = _result_uids(storage / "results")
    config = tmp_path / "node.toml"
    config.write_text(f'storage_dir = "{storage}"\n')
    assert main(["rebuild-index", "--config", str(config)]) == 2  # the node runs: refused
    assert "in use by a running node" in capsys.readouterr().err
    node.stop()

    index = storage / "node.sqlite"
    with sqlite3.connect(index) as con:  # what the WAL holds, into the file
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(index.read_bytes())
    data[4096:] = b"\xab" * (len(data) - 4096)  # every page after the first
    index.write_bytes(bytes(data))
    with pytest.raises(StorageError, match="damaged.*rebuild-index"):
        started = Node(load_settings(None, environ={}, port=0, api={"port": 0}, **settings))
        try:
            started.start()
        finally:
            started.stop()
    assert main(["status", "--config", str(config)]) == 2
    assert "rebuild-index" in capsys.readouterr().err

    assert main(["rebuild-index", "--config", str(config)]) == 0
    said = capsys.readouterr().out
    assert "2 file(s) indexed, 0 quarantined" in said, said
    (aside,) = storage.glob("damaged-*")
    assert (aside / "node.sqlite").exists() and (aside / "results").is_dir()

    node = make_node(**settings)
    wait_for(
        lambda: len(node.db.query("SELECT * FROM jobs WHERE state='done'")) == 2,
        60,
        what="both runs processed again after the rebuild",
    )
    assert _result_uids(aside / "results") == before
    after = _result_uids(storage / "results")
    assert after == before and len(after) == 2
