"""A full disk: the node's storage on a small tmpfs of its own, filled by another
program (a ballast file) while the node works. Nothing acknowledged is lost, no loop
logs a traceback at every poll, and the node goes on by itself once there is room:
retention frees it from processed runs, whose purge a full index could not commit
before.

A failing disk: the node's storage on an ext4 file system of its own (a loop device)
mounted ``errors=remount-ro``, made to fail by ext4's own ``trigger_fs_error`` (what a
disk's I/O error does: ext4 aborts its journal and turns read-only under the node's
open files). The node cannot repair that; it says so, in ``/health`` and once a loop."""

from __future__ import annotations

import io
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests
from pydicom import dcmwrite
from pydicom.uid import generate_uid

from tests.conftest import wait_for
from tests.dicomgen import ct_series, xa_run
from tests.test_ingest import _send
from tests.test_stow_faults import _post_part


@contextmanager
def tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (mount's notation) on ``folder``, made here; as root, as CI
    runs, or else the test is skipped."""
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs."""
    with tmpfs(tmp_path / "disk", "24m") as folder:
        yield folder


def _fill(disk: Path) -> Path:
    """Another program fills the disk to its last byte. Unbuffered: a buffered file
    kept what the full disk refused and raised again when closed, depending on how
    the free space fell against the buffer's size."""
    ballast = disk / "ballast"
    for size in (65536, 4096, 512, 1):  # then what the last full block left
        with open(ballast, "ab", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError:
                continue
    assert shutil.disk_usage(disk).free < 4096
    return ballast


def _run(seed: int) -> Any:
    ds = xa_run(frames=10, rows=192, cols=192, seed=seed)
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    return ds


def _with_reserve(disk: Path) -> dict[str, Any]:
    """A node on ``disk`` whose retention keeps 3 MiB free and a 2 MiB reserve."""
    return {
        "storage_dir": str(disk / "node"),
        "min_free_bytes": 2**20,
        "retention": {
            "free_target_bytes": 3 * 2**20,
            "interval_s": 0.5,
            "keep_days": None,
            "reserve_bytes": 2 * 2**20,
        },
        "rules": [{"name": "xa", "match": {"modality": ["XA"]}, "pipelines": ["minip"]}],
    }


def _process_three(node: Any) -> None:
    for seed in range(3):
        assert _send(node, _run(seed)) == 0x0000
    wait_for(
        lambda: len(node.db.query("SELECT id FROM jobs WHERE state='done'")) == 3,
        120,
        what="three runs processed",
    )


def _tracebacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_full_disk_is_freed_by_retention_from_processed_runs(
    small_disk: Path, make_node: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The disk filled by another program with processed runs on it: retention's purge
    could not commit its claim, so the disk stayed full and every sender was refused
    0xA700 until an operator freed space. Now retention deletes the storage reserve,
    purges processed runs until its target is free, and the node takes runs again."""
    caplog.set_level(logging.INFO)
    node = make_node(**_with_reserve(small_disk))
    assert (small_disk / "node" / "reserve").stat().st_size == 2 * 2**20
    _process_three(node)
    _fill(small_disk)
    wait_for(
        lambda: shutil.disk_usage(small_disk).free >= 3 * 2**20,
        30,
        what="processed runs purged on the full disk until the target is free",
    )
    assert node.db.query("SELECT run_id FROM runs WHERE purged_at IS NOT NULL")
    assert any("storage reserve (2 MiB) was deleted" in r.getMessage() for r in caplog.records)
    last = _run(9)
    assert _send(node, last) == 0x0000
    done = wait_for(
        lambda: node.db.query(
            "SELECT id FROM jobs WHERE run_id=? AND state='done'", (last.SOPInstanceUID,)
        ),
        60,
        what="the run sent after the purge processed",
    )
    assert done
    assert _tracebacks(caplog) == []


def test_jobs_wait_out_a_full_disk_and_lose_nothing(
    small_disk: Path, make_node: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Runs acknowledged, then the disk filled before their jobs wrote their results:
    each attempt failed with an I/O error that counted (three, and the job failed), an
    outcome that could not be recorded left its job running until its lease (15
    minutes) ran out, every loop logged a traceback at each poll, and an operator's
    request that writes, or a STOW-RS request (its part cannot be written), was answered
    500. Now a job waits for room without losing an attempt, the loops log the full
    disk once, those requests are answered 503 with Retry-After, and once the other
    program's file is gone every run is done on its first attempt."""
    caplog.set_level(logging.INFO)
    node = make_node(
        storage_dir=str(small_disk / "node"),
        min_free_bytes=2**20,
        retention={"free_target_bytes": None, "keep_days": None, "reserve_bytes": 0},
        rules=[{"name": "xa", "match": {"modality": ["XA"]}, "pipelines": ["minip", "dsa_av"]}],
    )
    sent = [_run(seed) for seed in range(3)]
    for ds in sent:
        assert _send(node, ds) == 0x0000
    first = sent[0].SOPInstanceUID
    wait_for(
        lambda: node.db.query("SELECT id FROM jobs WHERE state='running'"),
        60,
        what="a job running",
    )
    ballast = _fill(small_disk)  # while it runs, the others queued
    time.sleep(10)  # the loops meet the full disk again and again
    answer = requests.post(  # an operator's request that writes: 503, not a defect's 500
        f"http://127.0.0.1:{node.api_port}/reprocess", json={"run_id": first}, timeout=30
    )
    assert answer.status_code == 503 and answer.headers["Retry-After"], answer.text
    part = io.BytesIO()
    dcmwrite(part, _run(8), enforce_file_format=True)
    answer = _post_part(node, part.getvalue())  # a STOW-RS part cannot be written
    assert answer.status_code == 503 and answer.headers["Retry-After"], answer.text
    ballast.unlink()
    wait_for(
        lambda: len(node.db.query("SELECT id FROM jobs WHERE state='done'")) == 6,
        180,
        what="every job done once the disk has room",
    )
    jobs = node.db.query("SELECT attempts, error FROM jobs")
    assert all(j["attempts"] == 1 for j in jobs), [dict(j) for j in jobs]
    assert _tracebacks(caplog) == []
    full = [r.getMessage() for r in caplog.records if "storage is full" in r.getMessage()]
    assert 0 < len(full) <= 8, full  # once a loop, not once a poll


def test_the_node_starts_on_a_full_disk_and_indexes_what_a_crash_left(
    small_disk: Path, make_node: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Stopped with processed runs, a crash leaving one stored file unindexed, and the
    disk then filled: the node did not start (the index's schema version was written
    again at every start, a write a full disk refuses). It starts, indexes the file in
    the space of its reserve, and retention frees the disk for new runs."""
    caplog.set_level(logging.INFO)
    settings = _with_reserve(small_disk)
    node = make_node(**settings)
    _process_three(node)
    node.stop()
    left = _run(5)  # stored, renamed into place, then the node died before indexing it
    place = small_disk / "node" / "spool" / left.StudyInstanceUID / left.SeriesInstanceUID
    place.mkdir(parents=True)
    left.save_as(place / f"{left.SOPInstanceUID}.dcm", enforce_file_format=True)
    _fill(small_disk)
    node = make_node(**settings)
    assert node.db.query("SELECT 1 FROM instances WHERE sop_instance_uid=?", (left.SOPInstanceUID,))
    wait_for(
        lambda: node.db.query(
            "SELECT id FROM jobs WHERE run_id=? AND state='done'", (left.SOPInstanceUID,)
        ),
        60,
        what="the run a crash left processed",
    )
    wait_for(
        lambda: shutil.disk_usage(small_disk).free >= 3 * 2**20,
        30,
        what="processed runs purged until the target is free",
    )
    assert _send(node, _run(9)) == 0x0000
    assert _tracebacks(caplog) == []


def test_a_folder_where_the_reserve_goes_is_logged_not_raised(tmp_path: Path) -> None:
    """The reserve is written in full (fallocated, not sparse), deleted once, and a
    folder someone made in its place neither stops a start nor a retention pass."""
    from dicom_node.diskfull import Reserve

    reserve = Reserve(tmp_path, 2**20, 0)
    reserve.keep()
    assert (tmp_path / "reserve").stat().st_blocks * 512 >= 2**20
    assert reserve.release() and not reserve.release()
    (tmp_path / "reserve").mkdir()
    reserve.keep()
    assert not reserve.release()


def test_an_instance_is_stored_where_there_is_room_for_it(small_disk: Path, make_node: Any) -> None:
    """An instance received into the spool's tmp/ was counted again before it was
    renamed into place, so that it needed twice its size free above
    ``min_free_bytes``: on a disk with room for it (a 2 GB acquisition and 2.5 GB
    free), it was refused 0xA700. It is stored; one that would go under the floor is
    still refused (0xA700; over STOW-RS 503 with Retry-After, as it may pass later)."""
    node = make_node(
        storage_dir=str(small_disk / "node"),
        min_free_bytes=4 * 2**20,
        retention={"free_target_bytes": None, "keep_days": None, "reserve_bytes": 0},
        rules=[{"name": "xa", "match": {"modality": ["XA"]}, "pipelines": ["minip"]}],
    )
    instance = _run(1)
    part = io.BytesIO()
    dcmwrite(part, instance, enforce_file_format=True)
    size = len(part.getvalue())
    ballast = _fill(small_disk)
    os.truncate(ballast, ballast.stat().st_size - (4 * 2**20 + size * 3 // 2))
    assert _send(node, instance) == 0x0000
    assert shutil.disk_usage(small_disk).free < 4 * 2**20 + size  # what it left
    second = _run(2)  # would go under the floor
    assert _send(node, second) == 0xA700
    part = io.BytesIO()
    dcmwrite(part, second, enforce_file_format=True)
    answer = _post_part(node, part.getvalue())  # 409 before: a STOW-RS client gives up
    assert answer.status_code == 503 and answer.headers["Retry-After"], answer.text
    (item,) = answer.json()["00081198"]["Value"]
    assert item["00081197"]["Value"] == [0xA700]
    assert not node.db.query(
        "SELECT 1 FROM instances WHERE sop_instance_uid=?", (second.SOPInstanceUID,)
    )


@pytest.mark.parametrize("through", ["direct", "a forwarder"])
def test_the_last_of_the_disk_is_kept_for_the_senders_not_filling_it(
    tmp_path: Path, make_node: Any, caplog: pytest.LogCaptureFixture, through: str
) -> None:
    """One suite sends more than the node can process: its runs filled the disk to
    ``min_free_bytes``, and every other suite's run was refused (0xA700) until the node
    caught up. The last ``sender_reserve_share`` of the disk is now kept for the
    senders whose runs not yet processed hold less than it: the flooding suite is
    refused there, the other stores on, and the first sends again once its run is
    processed. Through a forwarder (an Orthanc in ``forwarders`` that names the suite
    as the Move Originator AE Title) too: the suites behind it are told apart."""
    from pydicom.uid import XRayAngiographicImageStorage
    from pynetdicom import AE

    forwarder = "ORTHANC" if through == "a forwarder" else None

    def calling(suite: str) -> dict[str, Any]:  # _send's sender arguments
        return {"calling": forwarder, "originator": suite} if forwarder else {"calling": suite}

    with tmpfs(tmp_path / "disk", "32m") as disk:
        node = make_node(
            storage_dir=str(disk / "node"),
            forwarders=[forwarder] if forwarder else [],
            min_free_bytes=2**20,
            sender_reserve_share=0.25,  # 8 MiB of 32
            completion={"quiet_period_s": 600},  # the series stay open: not processed
            retention={"free_target_bytes": None, "keep_days": None, "reserve_bytes": 0},
            rules=[{"name": "xa", "match": {"modality": ["XA"]}, "pipelines": ["minip"]}],
        )

        study = generate_uid()

        def instance(series: str) -> Any:
            ds = xa_run(frames=1, rows=512, cols=512, study_uid=study, series_uid=series)
            ds.SOPInstanceUID = generate_uid()  # 0.5 MiB each
            return ds

        flood = generate_uid()
        ae = AE(ae_title=forwarder or "SUITE_A")
        ae.add_requested_context(XRayAngiographicImageStorage)
        assoc = ae.associate("127.0.0.1", node.port, ae_title=node.settings.ae_title)
        named = {"originator_aet": "SUITE_A", "originator_id": 7} if forwarder else {}
        statuses = []
        with caplog.at_level(logging.WARNING, logger="dicom_node.ingest"):
            while len(statuses) < 80 and 0xA700 not in statuses:
                statuses.append(int(assoc.send_c_store(instance(flood), **named).Status))
        assoc.release()
        assert statuses[-1] == 0xA700 and set(statuses[:-1]) == {0x0000}, statuses
        free = shutil.disk_usage(disk).free
        assert free > 6 * 2**20, free  # refused in the reserve, far above min_free_bytes
        assert "kept for the other senders: SUITE_A" in caplog.text
        assert "runs not yet processed hold" in caplog.text
        # another suite stores on, in the reserve
        other = generate_uid()
        for _ in range(4):
            assert _send(node, instance(other), **calling("SUITE_B")) == 0x0000
        # once the node has processed the flood, its sender stores again
        node.trigger(series_uid=flood)
        wait_for(
            lambda: node.db.query("SELECT 1 FROM jobs WHERE run_id=? AND state='done'", (flood,)),
            120,
            what="the flood's run processed",
        )
        time.sleep(1.1)  # what a sender holds is read at most once a second
        assert _send(node, instance(generate_uid()), **calling("SUITE_A")) == 0x0000


@pytest.mark.parametrize("fault", ["disk full", "under the floor"])
def test_a_disk_that_fills_while_an_instance_arrives_is_answered_0xa700(
    tmp_path: Path, make_node: Any, caplog: pytest.LogCaptureFixture, fault: str
) -> None:
    """The disk filled while a C-STORE's data set arrived: the write failed (ENOSPC) in
    the thread that reads, or the free space went under ``min_free_bytes`` (checked every
    64 MiB received), and the association was ended with nothing answered. A sender
    cannot tell that from a network fault. Now the partial file is removed at once, the
    rest of the data set is read and dropped, the request is answered 0xA700 with the
    reason, and the association goes on: the next instance on it is stored once there
    is room."""
    from tests.test_ingest import _assoc

    caplog.set_level(logging.INFO)
    big = fault == "under the floor"  # past the first 64 MiB, where the floor is checked
    with tmpfs(tmp_path / "disk", "200m" if big else "24m") as disk:
        node = make_node(
            storage_dir=str(disk / "node"),
            min_free_bytes=60 * 2**20 if big else 0,
            retention={"free_target_bytes": None, "keep_days": None, "reserve_bytes": 0},
            rules=[{"name": "xa", "match": {"modality": ["XA"]}, "pipelines": ["minip"]}],
        )
        instance = (
            xa_run(frames=36, rows=1024, cols=1024, seed=3)  # 72 MiB
            if big
            else _run(3)
        )
        instance.SeriesInstanceUID, instance.SOPInstanceUID = generate_uid(), generate_uid()
        part = io.BytesIO()
        dcmwrite(part, instance, enforce_file_format=True)
        size = len(part.getvalue())
        ballast = _fill(disk)
        room = 100 * 2**20 if big else size // 2  # 100 MiB: 36 left after 64 received
        os.truncate(ballast, ballast.stat().st_size - room)

        assoc = _assoc(node)
        try:
            status = assoc.send_c_store(instance)
            assert "Status" in status, "the association ended: no answer"
            assert int(status.Status) == 0xA700
            assert not node.db.query(
                "SELECT 1 FROM instances WHERE sop_instance_uid=?", (instance.SOPInstanceUID,)
            )
            assert not list((disk / "node" / "tmp").iterdir())  # removed, its space freed
            ballast.unlink()  # an operator makes room: the same association goes on
            later = _run(4)
            assert int(assoc.send_c_store(later).Status) == 0x0000
        finally:
            assoc.release()
        wait_for(
            lambda: len(node.db.query("SELECT id FROM jobs WHERE state='done'")) == 1,
            60,
            what="the later run processed",
        )
    refusals = [r.getMessage() for r in caplog.records if "(0xA700)" in r.getMessage()]
    assert len(refusals) == 1, refusals
    assert ("under min_free_bytes" if big else "storage is full") in refusals[0]
    assert not _tracebacks(caplog)


def mount_or_skip(command: str, what: str) -> None:
    """Run a shell ``command`` that mounts ``what`` (as root, as CI runs); the test is
    skipped where it cannot."""
    made = subprocess.run(command, shell=True, capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount {what} here: {made.stderr.strip()}")


@pytest.fixture
def failing_disk(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A 96 MiB ext4 on a loop device, and the file that makes it fail (as root, as CI
    runs; else skipped)."""
    image, folder = tmp_path / "ext4.img", tmp_path / "disk"
    folder.mkdir()
    mount_or_skip(
        f"truncate -s 96M {image} && mkfs.ext4 -q -F {image} && "
        f"mount -o loop,errors=remount-ro {image} {folder}",
        "an ext4 loop device",
    )
    try:
        device = subprocess.run(
            ["findmnt", "-n", "-o", "SOURCE", str(folder)], capture_output=True, text=True
        ).stdout.strip()
        trigger = Path("/sys/fs/ext4") / Path(device).name / "trigger_fs_error"
        if not trigger.exists():
            pytest.skip(f"this kernel has no {trigger}")
        yield folder, trigger
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_failing_disk_is_reported_and_logged_once_not_at_every_poll(
    failing_disk: tuple[Path, Path], make_node: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The disk turned read-only under the node: every loop that writes logged a
    traceback at every poll (149 in 20 s), the audit trail a traceback on stderr for
    every record, ``/health`` said ok, a STOW-RS request got 500, the node could not
    be stopped (closing the audit trail raised), and a start on it ended in SQLite's
    "unable to open database file" in a traceback. Now ``/health`` answers 503 naming
    the read-only disk, requests that write get 503 with Retry-After, each loop logs
    the fault once, the audit records go to the log, the node stops, and a start is
    refused with the reason."""
    from dicom_node.errors import StorageError
    from dicom_node.service import Node
    from dicom_node.settings import load_settings

    disk, trigger = failing_disk
    caplog.set_level(logging.INFO)
    settings: dict[str, Any] = {
        "storage_dir": str(disk / "node"),
        "completion": {"quiet_period_s": 2.0},
        "retention": {"interval_s": 0.5, "reserve_bytes": 0},
        "rules": [
            {
                "name": "xa",
                "match": {"modality": ["XA"]},
                "pipelines": ["minip"],
                "destinations": ["down"],
            }
        ],
        "destinations": [
            {"kind": "dimse", "name": "down", "ae_title": "DOWN", "host": "127.0.0.1", "port": 9}
        ],
    }
    node = make_node(**settings)
    _process_three(node)  # their results wait for a destination that is down
    series = ct_series(4)
    for ds in series[:2]:  # a series still receiving: completed by the sweep, later
        assert _send(node, ds) == 0x0000
    trigger.write_text("a test of the node\n")  # ext4 aborts its journal: read-only

    later = _run(7)  # nothing is acknowledged that was not stored
    assert _send(node, later) == 0xA700  # answered: the disk cannot take it
    assert not node.db.query(
        "SELECT 1 FROM instances WHERE sop_instance_uid=?", (later.SOPInstanceUID,)
    )
    api = f"http://127.0.0.1:{node.api_port}"
    health = requests.get(f"{api}/health", timeout=30)
    assert health.status_code == 503, health.text
    assert health.json()["status"] == "unavailable"
    assert "read-only" in health.json()["error"] and "0xA700" in health.json()["error"]
    part = io.BytesIO()
    dcmwrite(part, _run(8), enforce_file_format=True)
    answer = _post_part(node, part.getvalue())
    assert answer.status_code == 503 and answer.headers["Retry-After"], answer.text
    answer = requests.post(  # it writes: completes the series now
        f"{api}/trigger", json={"series_uid": series[0].SeriesInstanceUID}, timeout=30
    )
    assert answer.status_code == 503 and answer.headers["Retry-After"], answer.text
    time.sleep(6)  # the outbox, the sweep and retention meet the fault again and again

    node.stop()  # raised: the audit trail's file could not be closed
    faults = [  # each loop's once, and nothing else at ERROR
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.ERROR and r.name.startswith("dicom_node")
    ]
    assert all("cannot be written" in m for m in faults), faults
    loops = [m.split(":")[0] for m in faults]
    assert len(loops) == len(set(loops)), faults  # once a loop (and the audit trail once)
    assert {"outbox (down)", "completion sweep"} <= set(loops), faults
    assert any(m.startswith("audit trail") for m in faults), faults
    assert any(
        "audit record:" in r.getMessage() and "event=node-stopped" in r.getMessage()
        for r in caplog.records
    )
    deliveries = [r for r in caplog.records if "event=delivery-failed" in r.getMessage()]
    assert len(deliveries) <= 8, len(deliveries)  # tried again after 2, 4 s: not each poll
    assert all(r.exc_info is None for r in caplog.records if r.levelno >= logging.ERROR)
    with pytest.raises(StorageError, match="read-only"):
        Node(load_settings(None, environ={}, port=0, api={"port": 0}, **settings))


def test_a_damaged_index_a_loop_meets_is_what_health_says(tmp_path: Path) -> None:
    """A loop that meets a damaged index (SQLite's own error, from a file damaged on
    disk) logs it once; ``/health``'s probe writes a file, which a damaged index does
    not stop, so it said ok. It now names what the node's loops wait on (not another
    node's), until they pass."""
    import sqlite3

    from dicom_node.diskfull import StorageProbe, Waiting

    path = tmp_path / "index.sqlite"
    with sqlite3.connect(path) as con:
        con.execute("CREATE TABLE t (x TEXT)")
        con.executemany("INSERT INTO t VALUES (?)", [("x" * 500,)] * 200)
    data = bytearray(path.read_bytes())
    data[4096:] = b"\xab" * (len(data) - 4096)
    path.write_bytes(bytes(data))
    with pytest.raises(sqlite3.DatabaseError) as damaged:
        sqlite3.connect(path).execute("SELECT count(*) FROM t").fetchall()

    index, other = object(), object()
    probe = StorageProbe(tmp_path, 0, index)
    assert probe.problem() is None
    router = Waiting("router", index)
    assert router.met(damaged.value)
    said = probe.problem()
    assert said is not None and said.startswith("router: the node's index is damaged")
    assert "rebuild-index" in said
    assert StorageProbe(tmp_path, 0, other).problem() is None  # another node's loops
    router.passed()
    assert probe.problem() is None
