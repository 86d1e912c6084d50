"""The kill -9 suite: the node killed during transfer, routing, processing and
delivery, restarted each time, then left to finish.

Afterwards: no acknowledged instance is lost, every run has every job its rule
names, every job is done (or failed with a reason), every result reached the
destination, and the destination got at most one extra copy per kill.
"""

from __future__ import annotations

import collections
import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import XRayAngiographicImageStorage, generate_uid
from pynetdicom import AE

from dicom_node.db import Database
from tests.conftest import NodeProcess, StoreSCP, free_port, wait_for
from tests.dicomgen import xa_run

pytestmark = pytest.mark.slow

TRIALS = 24
PIPELINES = ("minip", "dsa_av", "dsa_perfusion")
PHASES = ("transfer", "routing", "processing", "delivery")


def _config(path: Path, storage: Path, port: int, dest: StoreSCP) -> Path:
    path.write_text(
        f"""
ae_title = "ANGIO_NODE"
port = {port}
storage_dir = "{storage}"
min_free_bytes = 0

[api]
enabled = false

[completion]
quiet_period_s = 1.0
sweep_interval_s = 0.2

[workers]
concurrency = 1
poll_interval_s = 0.1
backoff_base_s = 0.2
max_attempts = 12
lease_s = 60

[outbox]
poll_interval_s = 0.1
backoff_base_s = 0.2
backoff_max_s = 1.0

[[destinations]]
kind = "dimse"
name = "dest"
host = "127.0.0.1"
port = {dest.port}
ae_title = "{dest.aet}"

[[rules]]
name = "xa"
pipelines = {list(PIPELINES)!r}
[rules.match]
sop_class_uid = ["XRayAngiographicImageStorage"]
"""
    )
    return path


def _scu() -> AE:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(XRayAngiographicImageStorage)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    return ae


def _send(port: int, datasets: list[Any], acknowledged: list[str]) -> None:
    """Send over one association; the UIDs that got Success go into ``acknowledged``."""
    assoc = _scu().associate("127.0.0.1", port, ae_title="ANGIO_NODE")
    if not assoc.is_established:
        return
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            if not status or int(status.get("Status", -1)) != 0:
                return
            acknowledged.append(str(ds.SOPInstanceUID))
    except (RuntimeError, OSError, ValueError):
        return  # the node died under us
    finally:
        if assoc.is_established:
            assoc.release()


def _run(seed: int) -> list[Any]:
    """A subtracted XA run, either one multi-frame instance or a 10-instance series."""
    if seed % 2:
        return [xa_run(frames=10, rows=96, cols=96, seed=seed)]
    series, study = generate_uid(), generate_uid()
    out = []
    for i in range(10):
        ds = xa_run(
            frames=1, rows=96, cols=96, seed=seed * 100 + i, series_uid=series, study_uid=study
        )
        ds.InstanceNumber = i + 1
        ds.AcquisitionTime = f"1200{i:02d}"
        out.append(ds)
    return out


def _db_rows(db_path: Path, sql: str) -> list[Any]:
    try:
        return Database(db_path).query(sql)
    except Exception:  # noqa: BLE001 - the node may be mid-write or dead: poll again
        return []


def _wait_phase(phase: str, db_path: Path, sending: threading.Thread, timeout: float = 20) -> bool:
    """Wait until the node is in ``phase`` (as the index shows it); False on timeout."""
    conditions = {
        "routing": "SELECT 1 FROM runs WHERE state='complete'",
        "processing": "SELECT 1 FROM jobs WHERE state='running'",
        "delivery": "SELECT 1 FROM outbox WHERE state='pending' "
        "AND EXISTS (SELECT 1 FROM outbox WHERE state='sent')",
    }
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if phase == "transfer":
            if sending.is_alive():
                return True
        elif _db_rows(db_path, conditions[phase]):
            return True
        time.sleep(0.005)
    return False


def test_kill_9_loses_nothing_and_duplicates_at_most_one_per_kill(tmp_path: Path) -> None:
    rng = random.Random(16)
    dest = StoreSCP(tmp_path / "dest").start()
    port = free_port()
    storage = tmp_path / "node"
    db_path = storage / "node.sqlite"
    node = NodeProcess(_config(tmp_path / "node.toml", storage, port, dest))
    acknowledged: list[str] = []
    hit: collections.Counter[str] = collections.Counter()
    try:
        for trial in range(TRIALS):
            node.start()
            phase = PHASES[trial % len(PHASES)]
            datasets = _run(trial)
            sending = threading.Thread(target=_send, args=(port, datasets, acknowledged))
            sending.start()
            if phase == "transfer":
                time.sleep(rng.uniform(0.05, 0.6))
                reached = sending.is_alive()
            else:
                reached = _wait_phase(phase, db_path, sending)
                time.sleep(rng.uniform(0, 0.05))
            node.kill()
            sending.join(60)
            hit[phase if reached else f"{phase} (missed)"] += 1
        node.start()  # and let it finish
        db = Database(db_path)

        def settled() -> bool:
            busy = db.query("SELECT COUNT(*) n FROM runs WHERE state IN ('receiving', 'complete')")[
                0
            ]["n"]
            return busy == 0 and db.unsettled_jobs() == 0 and db.pending_deliveries() == 0

        wait_for(settled, 900, interval=1.0, what="the node to finish after the last kill")
    finally:
        node.terminate()
        dest.stop()
    print(f"kills by phase: {dict(hit)}")
    # the log says what happened, not every tick of the scheduler (a line a second each)
    assert " INFO apscheduler" not in node.log.read_text()
    assert sum(v for k, v in hit.items() if "missed" not in k) >= 20

    # 0 acknowledged instances lost
    stored = {r["sop_instance_uid"]: r["path"] for r in db.query("SELECT * FROM instances")}
    lost = [uid for uid in acknowledged if uid not in stored or not Path(stored[uid]).exists()]
    assert not lost and acknowledged
    # 0 runs with missing jobs, 0 stuck runs, every job settled with a reason when failed
    for run in db.query("SELECT run_id, state FROM runs"):
        assert run["state"] == "routed", dict(run)
        jobs = db.query("SELECT pipeline, state, error FROM jobs WHERE run_id=?", (run["run_id"],))
        assert {j["pipeline"] for j in jobs} >= set(PIPELINES)
        assert all(j["state"] == "done" or (j["state"] == "failed" and j["error"]) for j in jobs)
    assert not list((storage / "tmp").glob("*.part"))
    # every result delivered; at most one extra copy per kill
    sent = {r["sop_instance_uid"] for r in db.query("SELECT * FROM outbox WHERE state='sent'")}
    received = collections.Counter(
        str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in dest.files()
    )
    assert sent and sent <= set(received)
    extra = sum(received.values()) - len(received)
    print(f"deliveries: {sum(received.values())}, distinct {len(received)}, extra {extra}")
    assert extra <= TRIALS
