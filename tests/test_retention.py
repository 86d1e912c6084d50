"""Retention on a running node: processed runs lose their files and results by age
or when space runs short, oldest first; nothing still to be processed or delivered
is touched; a purged run keeps its history, refuses a reprocess, and a new instance
re-opens it. An operator purges chosen runs now, and cancels what is still to be done
for a run."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from dicom_node.retention import Retention
from dicom_node.settings import RetentionSettings
from tests.conftest import wait_for
from tests.dicomgen import xa_run
from tests.test_ingest import _send
from tests.test_security import _audit

RULES = [{"name": "xa", "match": {"modality": ["XA"]}, "pipelines": ["minip"]}]
# dsa_ia refuses a run of 2 frames (a failed job, for an operator's retry)
FAILING = [{"name": "xa", "match": {"modality": ["XA"]}, "pipelines": ["minip", "dsa_ia"]}]
OFF = {"keep_days": None, "free_target_bytes": None}


def _processed(node: Any, run_id: str, jobs: int | None = None) -> bool:
    """Whether the run's jobs (``jobs`` of them, when given) have all ended."""
    rows = node.db.query("SELECT state FROM jobs WHERE run_id=?", (run_id,))
    if jobs is not None and len(rows) != jobs:
        return False
    return bool(rows) and all(j["state"] in ("done", "failed") for j in rows)


def _files(node: Any) -> list[Path]:
    return sorted(p for p in (node.spool.spool).rglob("*.dcm"))


def _run(node: Any, frames: int = 6) -> tuple[str, Any]:
    ds = xa_run(frames=frames)
    assert _send(node, ds) == 0x0000
    run_id = str(ds.SOPInstanceUID)
    wait_for(lambda: _processed(node, run_id), 120, what="the run's jobs")
    return run_id, ds


def test_a_processed_run_is_purged_by_age_and_keeps_its_history(make_node: Any) -> None:
    node = make_node(rules=FAILING, retention=OFF)
    run_id, ds = _run(node, frames=2)
    assert node.db.query("SELECT COUNT(*) n FROM jobs WHERE state='failed'")[0]["n"] == 1
    results = node.results_dir / str(
        node.db.query("SELECT id FROM jobs WHERE state='done'")[0]["id"]
    )
    assert _files(node) and any(results.iterdir())

    # kept while younger than keep_days
    quarantined = node.spool.quarantine / "1.2.3" / "1.2.3.4" / "1.2.3.4.5.dcm"
    quarantined.parent.mkdir(parents=True)
    quarantined.write_bytes(b"set aside by recovery")
    young = Retention(
        node.db, node.spool, node.results_dir, RetentionSettings(keep_days=1, **_no_space())
    )
    assert young.run() == 0 and _files(node) and quarantined.exists()

    now = Retention(
        node.db,
        node.spool,
        node.results_dir,
        RetentionSettings(keep_days=0, **_no_space()),
        node.audit,
    )
    assert now.run() == 1
    assert not _files(node) and not results.exists()
    assert not quarantined.exists() and not list(node.spool.quarantine.iterdir())
    assert not list(node.spool.spool.iterdir())  # the empty series and study folders too
    assert node.db.query("SELECT COUNT(*) n FROM instances")[0]["n"] == 0
    run = node.db.query("SELECT state, purged_at FROM runs WHERE run_id=?", (run_id,))[0]
    assert run["state"] == "routed" and run["purged_at"] is not None
    states = {r["state"] for r in node.db.query("SELECT state FROM jobs")}
    assert states == {"done", "failed"}  # the history stays
    assert now.run() == 0  # once
    assert node.db.status_summary()["purged_runs"] == 1

    # a purged run cannot be reprocessed or retried: its files are gone
    api = f"http://127.0.0.1:{node.api_port}"
    resp = requests.post(f"{api}/reprocess", json={"run_id": run_id}, timeout=10)
    assert resp.status_code == 409 and "purged" in resp.text
    failed = node.db.query("SELECT id FROM jobs WHERE state='failed'")[0]["id"]
    resp = requests.post(f"{api}/jobs/{failed}/retry", timeout=10)
    assert resp.status_code == 409 and "purged" in resp.text

    # the same instance sent again re-opens the run, which is processed again
    assert _send(node, ds) == 0x0000
    wait_for(lambda: _processed(node, run_id, jobs=4), 120, what="the re-opened run's jobs")
    run = node.db.query("SELECT purged_at FROM runs WHERE run_id=?", (run_id,))[0]
    assert run["purged_at"] is None and len(_files(node)) == 1


def _no_space() -> dict[str, Any]:
    return {"free_target_bytes": None}


def _behind_a_pacs_down(make_node: Any, tmp_path: Path, **settings: Any) -> tuple[Any, Any]:
    """A node whose results go to a PACS that is down until the test starts it, and
    whose series wait an hour for their quiet period."""
    from tests.conftest import StoreSCP

    pacs = StoreSCP(tmp_path / "pacs")
    node = make_node(
        rules=RULES,
        retention=OFF,
        destinations=[pacs.destination()],
        completion={"quiet_period_s": 3600},
        outbox={"backoff_max_s": 0.5},
        **settings,
    )
    return node, pacs


def test_nothing_still_to_be_processed_is_purged_nor_results_still_to_be_delivered(
    make_node: Any, tmp_path: Path
) -> None:
    node, pacs = _behind_a_pacs_down(make_node, tmp_path)
    run_id, _ = _run(node)
    wait_for(
        lambda: node.db.query("SELECT COUNT(*) n FROM outbox WHERE state='pending'")[0]["n"] > 0,
        60,
        what="a pending delivery",
    )
    results = sorted(node.results_dir.rglob("*.dcm"))
    assert results
    # a series still receiving (its quiet period is an hour)
    series = xa_run(frames=1)
    assert _send(node, series) == 0x0000
    purge = Retention(
        node.db,
        node.spool,
        node.results_dir,
        RetentionSettings(keep_days=0, free_target_bytes=None),
    )
    # the processed run's received file goes; its results wait for the destination
    assert purge.run() == 1 and node.db.is_purged(run_id)
    assert len(_files(node)) == 1 and all(p.exists() for p in results)
    assert purge.run() == 0 and all(p.exists() for p in results)
    pacs.start()
    try:
        wait_for(
            lambda: (
                node.db.query("SELECT COUNT(*) n FROM outbox WHERE state='pending'")[0]["n"] == 0
            ),
            60,
            what="the deliveries",
        )
        assert len(pacs.files()) == len(results)
    finally:
        pacs.stop()
    # delivered: the next pass takes the results and their deliveries too
    assert purge.run() == 0
    assert not any(p.exists() for p in results)
    assert node.db.query("SELECT COUNT(*) n FROM outbox")[0]["n"] == 0
    assert len(_files(node)) == 1  # the receiving series is untouched
    assert node.db.query("SELECT COUNT(*) n FROM runs WHERE purged_at IS NOT NULL")[0]["n"] == 1


def test_short_space_purges_the_oldest_processed_runs_first(make_node: Any) -> None:
    node = make_node(rules=RULES, retention=OFF)
    oldest, _ = _run(node)
    time.sleep(0.05)
    newer, _ = _run(node)
    oldest_files = [
        Path(r["path"])
        for r in node.db.query("SELECT path FROM instances WHERE run_id=?", (oldest,))
    ]

    def free() -> int:  # short of space until the oldest run's files are gone
        return 10**12 if not any(p.exists() for p in oldest_files) else 0

    space = Retention(
        node.db,
        node.spool,
        node.results_dir,
        RetentionSettings(keep_days=None, free_target_bytes=2**30),
        free_bytes=free,
    )
    assert space.run() == 1
    assert node.db.is_purged(oldest) and not node.db.is_purged(newer)
    # always short: every processed run goes, then it says there is nothing left
    starved = Retention(
        node.db,
        node.spool,
        node.results_dir,
        RetentionSettings(keep_days=None, free_target_bytes=2**30),
        free_bytes=lambda: 0,
    )
    assert starved.run() == 1 and node.db.is_purged(newer) and not _files(node)


def test_a_purge_cut_short_is_finished_and_a_store_waits_for_its_series(make_node: Any) -> None:
    node = make_node(rules=RULES, retention=OFF)
    run_id, ds = _run(node)
    # a crash after the claim and before the files went: the next pass finishes it
    candidate = node.db.purge_candidates(None)[0]
    assert node.db.claim_purge(candidate) is not None
    assert _files(node)
    assert Retention(node.db, node.spool, node.results_dir, RetentionSettings(**OFF)).run() == 0
    assert not _files(node) and node.db.query("SELECT COUNT(*) n FROM instances")[0]["n"] == 0

    # an instance of a series being purged is written and indexed after the purge
    other = xa_run(frames=4)
    lock = node.spool.series_lock(str(other.SeriesInstanceUID))
    status: list[int] = []
    with lock:
        sender = threading.Thread(target=lambda: status.append(_send(node, other)))
        sender.start()
        time.sleep(1.0)
        assert not status  # it waits for the lock
    sender.join(30)
    assert status == [0x0000] and len(_files(node)) == 1


def test_a_file_that_cannot_be_deleted_holds_back_no_other_purge(make_node: Any) -> None:
    """A spool file that cannot be deleted (its permissions, a read-only or failing
    disk; here a folder in its place) raised out of the pass: that run's purge was
    tried first at every later pass and raised again, so no run was purged any more and
    the disk filled. Now the run keeps its rows (its files are not indexed again at a
    restart) and is tried again each pass; the others are purged."""
    import shutil

    node = make_node(rules=RULES, retention=OFF)
    stuck, _ = _run(node)
    (path,) = [Path(r.path) for r in node.db.run_instances(stuck)]
    others = [_run(node)[0] for _ in range(2)]
    path.unlink()
    (path / "held").mkdir(parents=True)  # unlink() now fails (EISDIR), as for EACCES
    now = Retention(
        node.db, node.spool, node.results_dir, RetentionSettings(keep_days=0, **_no_space())
    )
    assert now.run() == 3
    assert [r["path"] for r in node.db.query("SELECT path FROM instances")] == [str(path)]
    for run_id in others:
        assert node.db.query("SELECT purged_at FROM runs WHERE run_id=?", (run_id,))[0][0]
    third = xa_run(frames=4)  # processed after the failed purge: purged at the next pass
    assert _send(node, third) == 0x0000
    wait_for(lambda: _processed(node, str(third.SOPInstanceUID)), 120, what="the third run")
    assert now.run() == 1
    assert len(node.db.query("SELECT 1 FROM instances")) == 1
    shutil.rmtree(path)  # put right: the next pass finishes it
    assert now.run() == 0
    assert node.db.query("SELECT COUNT(*) n FROM instances")[0]["n"] == 0
    assert not _files(node)


def test_a_read_only_disk_under_a_purge_is_logged_once_not_at_every_pass(
    make_node: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A purge begun before the disk turned read-only (its files then cannot be
    deleted): each pass logged that run's files at ERROR, every ``interval_s``, beside
    the fault the other loops log once (seen in CI's failing-disk test, when a purge was
    in flight at the fault). The disk is what fails, not a file: the pass ends, the
    fault is logged once, and the purge is finished once the disk takes writes."""
    import subprocess

    from tests.test_disk_full import mount_or_skip

    node = make_node(rules=RULES, retention=OFF)
    run_id, _ = _run(node)
    candidate = node.db.purge_candidates(None)[0]
    assert node.db.claim_purge(candidate) is not None  # begun, its files still there
    spool = str(node.spool.spool)
    mount_or_skip(  # a read-only view of the spool: unlink() answers EROFS
        f"mount --bind {spool} {spool} && mount -o remount,bind,ro {spool}",
        "a read-only bind mount",
    )
    retention = Retention(node.db, node.spool, node.results_dir, RetentionSettings(**OFF))
    caplog.set_level(logging.INFO)
    try:
        assert [retention.run() for _ in range(3)] == [0, 0, 0]
    finally:
        subprocess.run(["umount", spool], check=True)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith("retention:"), errors
    assert "read-only" in errors[0]
    assert _files(node)  # kept, with their rows
    assert retention.run() == 0  # writable again: the purge is finished
    assert not _files(node) and node.db.is_purged(run_id)


def test_purges_racing_stores_of_the_same_series_lose_nothing(make_node: Any) -> None:
    """Instances of one series arrive while retention runs every 50 ms with keep_days
    0: the series completes, is processed, purged, re-opened by the next instance, and
    again. No job may meet a deleted file, and at the end no file is left without
    its row (recovery would index it as a new run) nor a row without its file."""
    from pydicom.uid import generate_uid

    node = make_node(rules=RULES, retention=OFF, completion={"quiet_period_s": 0.2})
    study, series = generate_uid(), generate_uid()
    purge = Retention(
        node.db,
        node.spool,
        node.results_dir,
        RetentionSettings(keep_days=0, free_target_bytes=None),
    )
    statuses: list[int] = []

    def send() -> None:
        for k in range(30):
            ds = xa_run(frames=1, seed=k, study_uid=study, series_uid=series)
            statuses.append(_send(node, ds))
            time.sleep(1.5 if k % 6 == 5 else 0.02)  # quiet now and then: processed

    sender = threading.Thread(target=send)
    sender.start()
    purged = 0
    while sender.is_alive():
        purged += purge.run()
        time.sleep(0.05)
    sender.join()
    assert statuses == [0x0000] * 30

    def settled() -> bool:
        runs = node.db.query("SELECT state FROM runs")
        jobs = node.db.query("SELECT state FROM jobs")
        return all(r["state"] == "routed" for r in runs) and all(
            j["state"] in ("done", "failed") for j in jobs
        )

    wait_for(settled, 120, what="the last jobs")
    purged += purge.run()
    assert purged >= 2, "the series was purged and re-opened more than once"
    jobs = node.db.query("SELECT state, error FROM jobs")
    assert jobs and all(j["state"] == "done" for j in jobs), [dict(j) for j in jobs]
    # everything was purged in the end, and nothing is left over either way
    assert node.db.query("SELECT COUNT(*) n FROM instances")[0]["n"] == 0
    assert not _files(node)
    assert node.spool.recover() == (0, 0, 0)


def test_an_operator_purges_chosen_runs_now_and_frees_their_uids(
    make_node: Any, tmp_path: Path, caplog: Any
) -> None:
    """``POST /purge`` and ``dicom-node purge``: a processed run loses its files at once
    (a patient sent by mistake; a series resent under other UIDs), a run still to be
    processed is kept with the reason, and a UID the purged run held is free again."""
    import subprocess
    import sys

    node = make_node(rules=RULES, retention=OFF, completion={"quiet_period_s": 3600})
    api = f"http://127.0.0.1:{node.api_port}"
    run_id, ds = _run(node)
    results = sorted(node.results_dir.rglob("*.dcm"))
    assert results and _files(node)
    # the same instance in another series is refused: its UID is held by the run
    moved = xa_run(frames=6, seed=1)
    moved.SOPInstanceUID = ds.SOPInstanceUID
    with caplog.at_level("WARNING", logger="dicom_node.ingest"):
        assert _send(node, moved) == 0xC002
    assert f"`dicom-node purge --run {run_id}` frees it" in caplog.text

    series = xa_run(frames=1)  # a series still receiving (its quiet period is an hour)
    assert _send(node, series) == 0x0000
    receiving = str(series.SeriesInstanceUID)
    resp = requests.post(f"{api}/purge", json={"series_uid": receiving}, timeout=30)
    assert resp.status_code == 409 and "not processed yet" in resp.text
    resp = requests.post(f"{api}/purge", json={"study_uid": "1.2.3.999"}, timeout=30)
    assert resp.status_code == 404
    resp = requests.post(f"{api}/purge", json={"run_id": "../x"}, timeout=30)
    assert resp.status_code == 400

    cfg = tmp_path / "cli.toml"
    cfg.write_text(f'storage_dir = "{node.settings.storage_dir}"\n[api]\nport = {node.api_port}\n')
    out = subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", "purge", "--config", str(cfg), "--run", run_id],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert json.loads(out.stdout) == {"purged_runs": [run_id], "kept_runs": {}}
    assert not any(p.exists() for p in results)
    assert [p.parent.name for p in _files(node)] == [receiving]  # the receiving series stays
    assert node.db.is_purged(run_id) and node.db.run_state(run_id) == "routed"
    resp = requests.post(f"{api}/purge", json={"run_id": run_id}, timeout=30)
    assert resp.status_code == 409 and "purged already" in resp.text
    purges = [a for a in _audit(node) if a.get("event") == "run-purged"]
    assert [(a["run_id"], a["reason"]) for a in purges] == [
        (run_id, "deleted at the request of anonymous")
    ]

    # the UID is free: the copy in the other series is stored and processed as its run
    assert _send(node, moved) == 0x0000
    wait_for(lambda: _processed(node, run_id, jobs=2), 120, what="the copy's job")
    assert not node.db.is_purged(run_id) and len(_files(node)) == 2
    row = node.db.query("SELECT series_uid FROM runs WHERE run_id=?", (run_id,))[0]
    assert row["series_uid"] == str(moved.SeriesInstanceUID)


def test_an_operator_cancels_what_is_still_to_be_done_for_a_run(
    make_node: Any, tmp_path: Path, caplog: Any
) -> None:
    """``POST /cancel`` and ``dicom-node cancel``: a run sent by mistake (the wrong
    patient) is stopped wherever it is, results waiting for a destination are not sent,
    a running job's worker process is ended, a run still receiving is not routed; the
    node goes on, and the cancelled runs can then be purged."""
    import os
    import signal
    import subprocess
    import sys

    node, pacs = _behind_a_pacs_down(make_node, tmp_path, workers={"concurrency": 1})
    api = f"http://127.0.0.1:{node.api_port}"

    def jobs(run_id: str) -> list[tuple[str, str | None]]:
        rows = node.db.query("SELECT state, error FROM jobs WHERE run_id=?", (run_id,))
        return [(r["state"], r["error"]) for r in rows]

    def pending() -> int:
        return int(node.db.query("SELECT COUNT(*) n FROM outbox WHERE state='pending'")[0]["n"])

    # a: processed, its results waiting for the destination (down)
    a, _ = _run(node)
    wait_for(lambda: pending() > 0, 60, what="a's deliveries")
    withheld = pending()
    # b: its job running in a worker process that is held (stopped) until the cancel
    pid = node.workers.processes[0].pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    b_ds = xa_run(frames=6)
    assert _send(node, b_ds) == 0x0000
    b = str(b_ds.SOPInstanceUID)
    wait_for(lambda: jobs(b) == [("running", None)], 60, what="b's job to run")
    # c: a series still receiving (its quiet period is an hour)
    c_ds = xa_run(frames=1)
    assert _send(node, c_ds) == 0x0000
    c = str(c_ds.SeriesInstanceUID)

    resp = requests.post(f"{api}/cancel", json={"run_id": a}, timeout=30)
    assert resp.json() == {"cancelled_runs": [a], "kept_runs": {}}, resp.text
    reason = "cancelled at the request of anonymous"
    failed = node.db.query("SELECT error FROM outbox WHERE state='failed'")
    assert pending() == 0 and [r["error"] for r in failed] == [reason] * withheld

    cfg = tmp_path / "cli.toml"
    cfg.write_text(f'storage_dir = "{node.settings.storage_dir}"\n[api]\nport = {node.api_port}\n')
    with caplog.at_level("INFO", logger="dicom_node"):
        out = subprocess.run(
            [sys.executable, "-m", "dicom_node.cli", "cancel", "--config", str(cfg)]
            + ["--series", str(b_ds.SeriesInstanceUID)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        assert json.loads(out.stdout) == {"cancelled_runs": [b], "kept_runs": {}}
        assert jobs(b) == [("failed", reason)]
        # its worker process is ended at once, not when the job's time limit runs out
        wait_for(lambda: not _alive(pid), 30, what="the held worker process to end")
        wait_for(lambda: "attempt 1 stopped" in caplog.text, 30, what="the worker's log line")
    assert f"run {b} {reason}: 1 job(s) stopped, 0 delivery(ies) withheld" in caplog.text

    resp = requests.post(f"{api}/cancel", json={"series_uid": c}, timeout=30)
    assert resp.status_code == 200 and resp.json()["cancelled_runs"] == [c], resp.text
    row = node.db.query("SELECT state, reason FROM runs WHERE run_id=?", (c,))[0]
    assert (row["state"], row["reason"]) == ("unrouted", reason)
    assert not jobs(c)

    # nothing is left to cancel for them; an unknown study, a selector that is no UID
    resp = requests.post(f"{api}/cancel", json={"run_id": a}, timeout=30)
    assert resp.status_code == 409 and "nothing to cancel" in resp.text, resp.text
    resp = requests.post(f"{api}/cancel", json={"study_uid": "1.2.3.999"}, timeout=30)
    assert resp.status_code == 404
    resp = requests.post(f"{api}/cancel", json={"run_id": "../x"}, timeout=30)
    assert resp.status_code == 400
    calls = [x for x in _audit(node) if x.get("path") == "/cancel"]
    assert [x["http_status"] for x in calls] == [200, 200, 200, 409, 404]
    assert calls[0]["what"] == {"run_id": a, "cancelled": [a]}

    # the node goes on: the destination is back, a new run is processed and delivered,
    # and nothing of the cancelled runs is sent
    pacs.start()
    try:
        d, _ = _run(node)
        wait_for(lambda: pending() == 0 and pacs.files(), 60, what="d's deliveries")
        sent = node.db.query(
            "SELECT j.run_id FROM outbox o JOIN jobs j ON o.job_id = j.id WHERE o.state='sent'"
        )
        assert {r["run_id"] for r in sent} == {d} and len(pacs.files()) == len(sent)
        # an operator's retry undoes a cancel: b's job runs again, its results go
        (job,) = node.db.query("SELECT id FROM jobs WHERE run_id=?", (b,))
        resp = requests.post(f"{api}/jobs/{job['id']}/retry", json={}, timeout=30)
        assert resp.status_code == 200, resp.text
        wait_for(lambda: jobs(b) == [("done", None)] and pending() == 0, 120, what="b again")
        assert len(pacs.files()) == 2 * len(sent)
    finally:
        pacs.stop()
    # cancelled, they are processed runs: the operator purges them
    for run_id in (a, b, c):
        resp = requests.post(f"{api}/purge", json={"run_id": run_id}, timeout=60)
        assert resp.json() == {"purged_runs": [run_id], "kept_runs": {}}, resp.text
    d_series = node.db.query("SELECT series_uid FROM runs WHERE run_id=?", (d,))[0][0]
    assert [p.parent.name for p in _files(node)] == [d_series]


def _alive(pid: int) -> bool:
    """Whether the process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False
