"""The spine's stages one by one: limits at the door, routing as its own stage,
one state machine, repair at start, one delivery marked at a time."""

from __future__ import annotations

import copy
import json
import logging
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    generate_uid,
)

from dicom_node.db import Database, InstanceRecord, RunState, StateError
from dicom_node.errors import RejectedInstance
from dicom_node.router import Router
from dicom_node.settings import LimitsSettings, load_settings
from dicom_node.spool import inspect
from tests.conftest import wait_for
from tests.dicomgen import xa_run
from tests.faults import encode, raw, relabel

MINIP = [{"name": "xa", "match": {"modality": ["XA"]}, "pipelines": ["minip", "dsa_av"]}]


def _status(data: bytes, limits: LimitsSettings | None = None) -> int:
    try:
        inspect(data, limits or LimitsSettings())
    except RejectedInstance as exc:
        return exc.status
    return 0


def test_declared_sizes_are_checked_before_anything_is_decoded() -> None:
    assert _status(encode(xa_run())) == 0
    big = xa_run(frames=2, rows=64, cols=64)
    big.Rows = big.Columns = 60000
    assert _status(encode(big)) == RejectedInstance.OVER_LIMITS
    assert _status(encode(xa_run(frames=9)), LimitsSettings(max_frames=8)) == 0xC001
    assert _status(encode(xa_run(frames=8)), LimitsSettings(max_decoded_bytes=1000)) == 0xC001
    # a JPEG 2000 codestream that decodes larger than the header says
    j2k = xa_run(frames=1, rows=32, cols=32)
    j2k.compress(JPEG2000Lossless)
    assert _status(encode(j2k)) == 0
    raw_bytes = bytearray(j2k.PixelData)
    pos = raw_bytes.find(b"\xff\x4f\xff\x51")
    raw_bytes[pos + 8 : pos + 16] = struct.pack(">2I", 50000, 50000)
    j2k.PixelData = bytes(raw_bytes)
    assert _status(encode(j2k)) == RejectedInstance.DATA_SET_DOES_NOT_MATCH_SOP_CLASS


def test_a_data_set_must_use_the_vr_encoding_its_transfer_syntax_names() -> None:
    """pydicom would read either (it guesses), but the file would name an encoding
    its body does not use: refused 0xC000, with the reason."""
    explicit = encode(xa_run(frames=1, rows=8, cols=8))
    assert _status(explicit) == 0
    with pytest.raises(RejectedInstance, match="encoded in explicit VR, but its transfer syntax"):
        inspect(relabel(explicit, ImplicitVRLittleEndian), LimitsSettings())
    ds = xa_run(frames=1, rows=8, cols=8)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    implicit = encode(ds)
    assert _status(implicit) == 0
    with pytest.raises(RejectedInstance, match="encoded in implicit VR, but its transfer syntax"):
        inspect(relabel(implicit, ExplicitVRLittleEndian), LimitsSettings())
    for lying in (relabel(explicit, ImplicitVRLittleEndian), relabel(implicit, JPEG2000Lossless)):
        assert _status(lying) == RejectedInstance.CANNOT_UNDERSTAND


def test_a_deflate_bomb_is_refused_with_a_bounded_inflate() -> None:
    ds = xa_run(frames=1, rows=8, cols=8)
    del ds.PixelData
    plain = encode(ds)
    from tests.faults import dataset_offset

    start = dataset_offset(plain)
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = comp.compress(plain[start:] + struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, 2**26))
    body += b"".join(comp.compress(bytes(2**20)) for _ in range(64)) + comp.flush()
    bomb = relabel(plain[:start], DeflatedExplicitVRLittleEndian) + body
    assert len(bomb) < 200_000
    limits = LimitsSettings(max_inflated_bytes=2**20)
    assert _status(bomb, limits) == RejectedInstance.OVER_LIMITS
    # the same data set, honestly sized, passes
    assert _status(bomb, LimitsSettings()) != RejectedInstance.OVER_LIMITS


def test_bad_timing_values_are_stored_and_routed_and_never_stop_the_node(
    make_node: Any, tmp_path: Path
) -> None:
    from tests.test_ingest import _send

    node = make_node(rules=MINIP)
    sent = []
    for value in ("abc", "1\\2"):
        ds = xa_run(frames=6)
        raw(ds, "FrameTime", "DS", value)
        sent.append(ds)
    ftv = xa_run(frames=6)
    del ftv.FrameTime
    raw(ftv, "FrameTimeVector", "DS", "1")
    sent.append(ftv)
    for ds in sent:
        assert _send(node, ds) == 0x0000
    wait_for(lambda: len(node.db.query("SELECT 1 FROM jobs WHERE state='done'")) == 6, 120)
    notes = node.db.query("SELECT notes FROM jobs WHERE pipeline='dsa_av'")
    assert all("no frame timing" in r["notes"] for r in notes)
    # and a restart on this storage is clean
    node.stop()
    again = make_node(rules=MINIP)
    assert again.db.query("SELECT COUNT(*) n FROM runs WHERE state='routed'")[0]["n"] == 3


def test_a_header_routing_cannot_read_makes_the_run_unroutable(tmp_path: Path) -> None:
    db = Database(tmp_path / "n.sqlite")
    bad = tmp_path / "x.dcm"
    bad.write_bytes(b"DICM but not really")
    db.record_instance(
        InstanceRecord(
            "1.2.3", "1.2.840.10008.5.1.4.1.1.12.1", "1.2", "1", "run", bad, 1, "", 5, "AE"
        )
    )
    assert db.complete_run("run", "test")
    router = Router(db, load_settings(None, environ={}, rules=MINIP))
    assert router.route("run") == []
    row = db.query("SELECT state, reason FROM runs")[0]
    assert row["state"] == "unroutable" and "header cannot be read" in row["reason"]
    assert db.status_summary()["unrouted_runs"][0]["state"] == "unroutable"
    # transitions check the state they leave
    assert not db.complete_run("run", "again")
    assert db.route_run("run", "xa", ["minip"], []) == []
    with pytest.raises(StateError):
        db.settle_unrouted("run", RunState.ROUTED, None, "no")
    with pytest.raises(StateError):
        db.query("UPDATE runs SET state='x'")
    # a reprocess re-opens it, the resend flag is a column, not a name
    assert db.reopen_for_reprocess("run")
    assert db.query("SELECT resend FROM runs")[0]["resend"] == 1


def test_routing_and_job_creation_are_one_transaction(tmp_path: Path) -> None:
    db = Database(tmp_path / "n.sqlite")
    db.record_instance(
        InstanceRecord(
            "1.2.3", "1.2.840.10008.5.1.4.1.1.12.1", "1.2", "1", "run", tmp_path, 1, "", 5, "AE"
        )
    )
    assert db.complete_run("run", "test")
    with pytest.raises(Exception, match="NOT NULL"):
        db.route_run("run", "xa", ["minip", None], ["dest"])  # type: ignore[list-item]
    assert db.run_state("run") == RunState.COMPLETE  # nothing of the failed routing stayed
    assert db.query("SELECT COUNT(*) n FROM jobs")[0]["n"] == 0
    assert len(db.route_run("run", "xa", ["minip", "dsa_av", "dsa_perfusion"], ["dest"])) == 3


def test_start_repairs_what_a_crash_left(make_node: Any, tmp_path: Path) -> None:
    node = make_node(rules=MINIP)
    storage = node.settings.storage_dir
    node.stop()
    (storage / "tmp" / "deadbeef.part").write_bytes(b"half a file")
    good = xa_run(frames=4)
    folder = storage / "spool" / good.StudyInstanceUID / good.SeriesInstanceUID
    folder.mkdir(parents=True)
    (folder / f"{good.SOPInstanceUID}.dcm").write_bytes(encode(good))
    (folder / "1.2.3.dcm").write_bytes(b"garbage")
    # one that cannot be set aside (here its place in quarantine is taken; as for a
    # read-only disk or a file the node may not move): it stopped the node from starting
    (folder / "1.2.4.dcm").write_bytes(b"garbage too")
    aside = storage / "quarantine" / good.StudyInstanceUID / good.SeriesInstanceUID
    (aside / "1.2.4.dcm" / "taken").mkdir(parents=True)
    (storage / "tmp" / "a-folder").mkdir()
    again = make_node(rules=MINIP)
    assert not list((storage / "tmp").glob("*.part"))
    assert (aside / "1.2.3.dcm").exists()
    assert (folder / "1.2.4.dcm").read_bytes() == b"garbage too"  # left where it was
    row = again.db.query(
        "SELECT calling_aet FROM instances WHERE sop_instance_uid=?", (good.SOPInstanceUID,)
    )
    assert row[0]["calling_aet"] == "RECOVERED"
    wait_for(lambda: len(again.db.query("SELECT 1 FROM jobs WHERE state='done'")) == 2, 120)


class FlakyDestination:
    """A storage SCP that aborts the association at its third instance, once."""

    def __init__(self) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        self.received: list[str] = []
        self.aborted = False
        self.ae = AE(ae_title="FLAKY")
        self.ae.supported_contexts = AllStoragePresentationContexts
        self.server = self.ae.start_server(
            ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self.handle)]
        )
        self.port = self.server.server_address[1]

    def handle(self, event: Any) -> int:
        if len(self.received) == 2 and not self.aborted:
            self.aborted = True
            event.assoc.abort()
            return 0xA700
        self.received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def destination(self) -> dict[str, Any]:
        return {
            "kind": "dimse",
            "name": "flaky",
            "host": "127.0.0.1",
            "port": self.port,
            "ae_title": "FLAKY",
        }


def test_a_destination_lost_mid_batch_gets_no_duplicates(make_node: Any) -> None:
    """Each delivery is marked sent the moment its C-STORE succeeds: when the
    association is lost at the third object, the first two are not sent again."""
    from tests.test_ingest import _send

    dest = FlakyDestination()
    try:
        node = make_node(rules=MINIP, destinations=[dest.destination()])
        assert _send(node, xa_run(frames=6)) == 0
        wait_for(lambda: node.db.query("SELECT 1 FROM jobs WHERE state='done'"), 60)
        wait_for(lambda: node.db.pending_deliveries() == 0 and dest.aborted, 60)
        sent = {
            r["sop_instance_uid"] for r in node.db.query("SELECT * FROM outbox WHERE state='sent'")
        }
        assert len(sent) >= 3 and sent == set(dest.received)
        assert len(dest.received) == len(sent)  # not one copy more
        retried = node.db.query("SELECT attempts FROM outbox WHERE attempts > 1")
        assert retried  # what was in flight when the association died went again
    finally:
        dest.server.shutdown()


def test_the_index_is_migrated_from_schema_1(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.sqlite"
    con = sqlite3.connect(path)
    con.executescript(
        "CREATE TABLE runs (run_id TEXT PRIMARY KEY, series_uid TEXT NOT NULL, study_uid TEXT "
        "NOT NULL, calling_aet TEXT NOT NULL, state TEXT NOT NULL, first_at REAL NOT NULL, "
        "last_at REAL NOT NULL, completed_at REAL, rule TEXT, reason TEXT);"
        "CREATE TABLE jobs (id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL, pipeline "
        "TEXT NOT NULL, destinations TEXT NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL "
        "DEFAULT 0, not_before REAL NOT NULL, lease_until REAL, worker TEXT, error TEXT, notes TEXT, "
        "created_at REAL NOT NULL, updated_at REAL NOT NULL);"
        "INSERT INTO jobs (run_id, pipeline, destinations, state, not_before, created_at, updated_at)"
        " VALUES ('r', 'minip', '[\"pacs!resend\"]', 'queued', 0, 0, 0);"
        "CREATE TABLE instances (sop_instance_uid TEXT PRIMARY KEY, sop_class_uid TEXT NOT NULL, "
        "series_uid TEXT NOT NULL, study_uid TEXT NOT NULL, run_id TEXT NOT NULL, path TEXT NOT "
        "NULL, size INTEGER NOT NULL, transfer_syntax TEXT NOT NULL, frames INTEGER NOT NULL, "
        "calling_aet TEXT NOT NULL, received_at REAL NOT NULL);"
        "INSERT INTO instances VALUES ('1.2.3', '1.2.840.10008.5.1.4.1.1.12.1', '1.2', '1', 'r', "
        "'x', 1000, '1.2.840.10008.1.2.1', 1, 'SUITE_A', 0);"
        "INSERT INTO runs VALUES ('r', '1.2', '1', 'SUITE_A', 'receiving', 0, 0, NULL, NULL, NULL);"
    )
    con.commit()
    con.close()
    db = Database(path)
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 2
    # a resend that rode in the destination name becomes the column
    row = db.query("SELECT destinations, resend FROM jobs")[0]
    assert json.loads(row["destinations"]) == ["pacs"] and row["resend"] == 1
    # rows indexed before the sender column count for their calling AE
    assert db.pending_bytes("SUITE_A") == 1000
    assert db.queued_jobs_by_sender() == {"SUITE_A": 1}
    assert [i.sender for i in db.run_instances("r")] == ["SUITE_A"]
    db.record_instance(
        InstanceRecord(
            "1.2.4", "1.2.840.10008.5.1.4.1.1.12.1", "1.2", "1", "r", Path("y"), 500,
            "1.2.840.10008.1.2.1", 1, "ORTHANC", "SUITE_A",
        )
    )  # fmt: skip
    assert db.pending_bytes("SUITE_A") == 1500 and db.pending_bytes("ORTHANC") == 0


def _cerebral_phantom(tmp_path: Path) -> Any:
    from pydicom import dcmread

    from training.phantoms import dsa

    written = dsa.generate(5, size=128, frames=16).write(tmp_path / "ph")
    return dcmread(next(p for p in written if p.name == "dsa.dcm"))


def _results_of_every_cerebral_pipeline(make_node: Any, tmp_path: Path, ds: Any) -> list[Path]:
    """``ds`` sent to a node: each cerebral pipeline's job done; the result files."""
    from tests.test_ingest import _send

    node = make_node(storage_dir=str(tmp_path / "node"))
    assert _send(node, ds) == 0
    wait_for(lambda: node.db.unsettled_jobs() == 0 and node.db.query("SELECT 1 FROM jobs"), 180)
    jobs = node.db.query("SELECT pipeline, state, error FROM jobs")
    assert {j["pipeline"] for j in jobs} == {"minip", "dsa_av", "dsa_perfusion"}
    assert all(j["state"] == "done" for j in jobs), [dict(j) for j in jobs]
    return sorted((tmp_path / "node" / "results").rglob("*.dcm"))


def test_sources_without_type_2_attributes_are_processed(make_node: Any, tmp_path: Path) -> None:
    """De-identified data often lacks Type 2 attributes (Patient's Name, Birth Date,
    Sex, Study Date...): every cerebral pipeline still produces valid objects."""
    from pydicom import dcmread

    from tests.conftest import dciodvfy_errors

    ds = _cerebral_phantom(tmp_path)
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
               "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName"):  # fmt: skip
        if kw in ds:
            del ds[kw]
    kinds = {}
    for path in _results_of_every_cerebral_pipeline(make_node, tmp_path, ds):
        kinds.setdefault(str(dcmread(path, stop_before_pixels=True).SOPClassUID), path)
    assert len(kinds) >= 4  # canvas, SEG, Parametric Map, SR, renderings
    for path in kinds.values():
        assert dciodvfy_errors(path) == [], path


def test_identity_values_a_result_cannot_hold_are_dropped_and_its_keys_kept(
    make_node: Any, tmp_path: Path
) -> None:
    """Identity values that are well formed but impossible (Patient's Sex "U", a birth
    date of February 31st, two Patient's Names) made every SEG, Parametric Map and SR
    fail (highdicom validates the identity it copies): they are left out of the
    results (type 2: empty), and the worker logs which. What files the result with its
    source in the PACS (Patient ID, Accession Number) is kept as sent, over-long as it
    is, so that the results join the source's patient and order, not an empty one."""
    from pydicom import dcmread

    from tests.conftest import dciodvfy_errors

    ds = _cerebral_phantom(tmp_path)
    impossible = {
        "PatientSex": ("CS", "U"),
        "PatientBirthDate": ("DA", "19800231"),
        "StudyDate": ("DA", "20260229"),
        "PatientName": ("PN", "DOE^JOHN\\DOE^J"),
    }
    kept = {"PatientID": ("LO", "P" * 70), "AccessionNumber": ("SH", "A" * 20)}
    for keyword, (vr, value) in {**impossible, **kept}.items():
        raw(ds, keyword, vr, value)
    kinds: dict[str, Path] = {}
    for path in _results_of_every_cerebral_pipeline(make_node, tmp_path, ds):
        out = dcmread(path, stop_before_pixels=True)
        assert out.PatientID == "P" * 70 and out.AccessionNumber == "A" * 20, path
        assert all(out.get(k) in ("", None) for k in impossible), path
        kinds.setdefault(str(out.SOPClassUID), path)
    assert len(kinds) >= 4  # canvas, SEG, Parametric Map, SR, renderings
    for path in kinds.values():
        errors = dciodvfy_errors(path)
        assert all("Patient ID" in e or "Accession Number" in e or "Value Representations" in e
                   for e in errors), (path, errors)  # fmt: skip


def _routed(
    db: Database, router: Router, folder: Path, run_id: str, sender: str, values: dict[str, str]
) -> None:
    """A two-frame run from ``sender`` with the header ``values``, indexed, complete and
    routed (two jobs: MINIP's rule) without a node."""
    ds = xa_run(frames=2, rows=8, cols=8)
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    path = folder / f"{run_id}.dcm"
    ds.save_as(path, enforce_file_format=True)
    db.record_instance(
        InstanceRecord(
            ds.SOPInstanceUID, ds.SOPClassUID, ds.StudyInstanceUID, ds.SeriesInstanceUID,
            run_id, path, 2, "", path.stat().st_size, sender,
        )
    )  # fmt: skip
    assert db.complete_run(run_id, "test")
    assert len(router.route(run_id)) == 2


def test_older_runs_wait_behind_live_runs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A bulk resend of older runs (acquired before workers.live_window_h) is routed
    first; the live runs routed after it are claimed first, the older ones then in
    order of arrival. A run without a readable date is live; so is every run with
    a window of 0."""
    import datetime as dt

    db = Database(tmp_path / "n.sqlite")
    today = dt.datetime.now()
    old = today - dt.timedelta(days=3)
    headers: dict[str, dict[str, str]] = {
        # the bulk resend: read from each source in turn
        "old-acquisition": {"AcquisitionDateTime": f"{old:%Y%m%d%H%M%S}"},
        "old-series": {"SeriesDate": f"{old:%Y%m%d}", "SeriesTime": "0800"},
        "old-study": {},  # the generator's StudyDate, 2026-01-01
        "old-utc": {"AcquisitionDateTime": f"{old:%Y%m%d%H%M%S}+0900"},
        # then the suites' runs
        "live": {"AcquisitionDate": f"{today:%Y%m%d}", "AcquisitionTime": f"{today:%H%M%S}"},
        "live-utc": {"AcquisitionDateTime": f"{dt.datetime.now(dt.UTC):%Y%m%d%H%M%S}+0000"},
        "no-date": {"StudyDate": ""},
        "bad-date": {"StudyDate": "2026-13-45", "SeriesDate": "yesterday"},
    }
    settings = load_settings(None, environ={}, rules=MINIP)
    router = Router(db, settings)
    for run_id, values in headers.items():
        _routed(db, router, tmp_path, run_id, "AE", values)
    assert db.status_summary()["older_queued_jobs"] == 8
    assert db.metrics_snapshot()["older_queued_jobs"] == 8  # angio_node_job_queue_older
    claimed = []
    while (job := db.claim_job("w", 60, 3)) is not None:
        claimed.append(job.run_id)
    live = ["live", "live-utc", "no-date", "bad-date"]
    older = ["old-acquisition", "old-series", "old-study", "old-utc"]
    assert claimed == [r for r in live for _ in range(2)] + [r for r in older for _ in range(2)]
    assert db.status_summary()["older_queued_jobs"] == 0

    assert router.older(xa_run())  # the generator's 2026-01-01
    # dates at the edges of what pydicom reads, and offsets it cannot: each read, or
    # skipped for the next source (the generator's StudyDate, 2026-01-01), by
    # acquired_at itself; the router's last-resort guard never has to act
    caplog.set_level(logging.WARNING, logger="dicom_node.router")
    for values, expected in (
        ({"AcquisitionDateTime": "99991231235959.999999+1400"}, False),  # the future
        ({"AcquisitionDateTime": "00010101000000-1200"}, True),
        ({"AcquisitionDateTime": "2026"}, True),
        ({"AcquisitionDateTime": "20260101+9999"}, True),  # skipped: StudyDate
        ({"StudyDate": "00010101", "TimezoneOffsetFromUTC": "+2500"}, False),  # no date
        ({"StudyDate": "20260101", "StudyTime": "999999", "TimezoneOffsetFromUTC": "abc"}, False),
        ({"SeriesDate": "20260101", "SeriesTime": "12", "TimezoneOffsetFromUTC": "-0000"}, True),
    ):
        ds = xa_run(frames=2, rows=8, cols=8)
        for keyword, value in values.items():
            setattr(ds, keyword, value)
        assert router.older(ds) is expected, values
    assert "not compared" not in caplog.text
    for window in (0, 24 * 365 * 10):  # 0: every run in order of arrival
        wide = load_settings(None, environ={}, rules=MINIP, workers={"live_window_h": window})
        assert not Router(db, wide).older(xa_run())


def test_the_senders_take_their_turns(tmp_path: Path) -> None:
    """One suite's burst of runs does not hold up another's: the due jobs of the
    sender served longest ago are taken first (one never served before any), each
    sender's oldest first, a live run's still before an older run's. Temporal's
    dispatch takes them in the same order, and marks the sender served too."""
    import datetime as dt

    db = Database(tmp_path / "n.sqlite")
    router = Router(db, load_settings(None, environ={}, rules=MINIP))  # two jobs a run
    live = {"AcquisitionDateTime": f"{dt.datetime.now():%Y%m%d%H%M%S}"}

    def arrive(run_id: str, sender: str, values: dict[str, str] = live) -> None:
        _routed(db, router, tmp_path, run_id, sender, values)

    def taken() -> list[str]:
        claimed = []
        while (job := db.claim_job("w", 60, 3)) is not None:
            claimed.append(job.run_id)
        return claimed

    for k in range(4):  # suite A sends four runs at once
        arrive(f"a{k}", "SUITE_A")
    first = db.claim_job("w", 60, 3)
    assert first is not None and first.run_id == "a0"  # busy with A's first job
    arrive("b-old", "SUITE_B", {})  # the generator's 2026-01-01: an older run
    arrive("b0", "SUITE_B")
    arrive("c0", "SUITE_C")
    arrive("a4", "SUITE_A")
    # what `dicom-node status` and GET /status show of who waits
    assert db.status_summary()["queued_jobs_by_sender"] == {
        "SUITE_A": 9, "SUITE_B": 4, "SUITE_C": 2,
    }  # fmt: skip
    assert taken() == [
        "b0", "c0", "a0",  # B and C were never served; A was, just now
        "b0", "c0", "a1",
        "a1", "a2", "a2", "a3", "a3", "a4", "a4",  # A alone: its runs in order
        "b-old", "b-old",  # an older run after every live one, as before
    ]  # fmt: skip
    # a sender whose turn came long ago is not owed the turns it missed
    arrive("a5", "SUITE_A")
    arrive("c1", "SUITE_C")
    assert taken() == ["c1", "a5", "c1", "a5"]  # C's last turn was before A's

    # Temporal: the same order, the sender with each job; dispatching serves it
    db2 = Database(tmp_path / "t.sqlite")
    db, tmp_path = db2, tmp_path / "t"
    tmp_path.mkdir()
    router = Router(db, load_settings(None, environ={}, rules=MINIP))
    for k in range(3):
        arrive(f"a{k}", "SUITE_A")
    arrive("b0", "SUITE_B")
    order = [(j.run_id, j.sender) for j in db.jobs_to_dispatch(100)]
    assert order == [
        ("a0", "SUITE_A"), ("b0", "SUITE_B"), ("a0", "SUITE_A"), ("b0", "SUITE_B"),
        ("a1", "SUITE_A"), ("a1", "SUITE_A"), ("a2", "SUITE_A"), ("a2", "SUITE_A"),
    ]  # fmt: skip
    a0 = db.jobs_to_dispatch(1)[0]
    assert db.mark_dispatched(a0.id, a0.generation)
    assert [j.run_id for j in db.jobs_to_dispatch(2)] == ["b0", "a0"]  # A was served


@pytest.mark.parametrize("through", ["direct", "a forwarder"])
def test_a_suite_s_run_is_not_held_up_by_another_s_burst(make_node: Any, through: str) -> None:
    """Through the node: suite A sends six runs, suite B one just after; with one
    worker, B's run is processed next, not after all of A's (which it was before
    the senders took turns). Through a forwarder (an Orthanc in ``forwarders`` that
    names each suite as the Move Originator AE Title) too: before, every run was
    the forwarder's, and B's was processed last."""
    import datetime as dt

    from tests.test_ingest import _send

    forwarder = "ORTHANC" if through == "a forwarder" else None
    node = make_node(
        forwarders=[forwarder] if forwarder else [],
        workers={"concurrency": 1},
        completion={"quiet_period_s": 600.0},  # complete when triggered, all at once
        rules=[{"name": "xa", "match": {"modality": ["XA"]}, "pipelines": ["minip"]}],
    )
    runs: dict[str, str] = {}
    study = generate_uid()
    for sender, count in (("SUITE_A", 6), ("SUITE_B", 1)):
        for _ in range(count):
            ds = xa_run(frames=1, rows=64, cols=64)  # one instance a series
            ds.StudyInstanceUID = study
            ds.AcquisitionDateTime = f"{dt.datetime.now():%Y%m%d%H%M%S}"  # a live run
            named = {"calling": forwarder, "originator": sender} if forwarder else {}
            assert _send(node, ds, **(named or {"calling": sender})) == 0x0000
            runs[ds.SeriesInstanceUID] = sender
    assert len(node.trigger(study_uid=study)) == 7  # routed in order of arrival, B's last
    done = "SELECT run_id FROM jobs WHERE state='done' ORDER BY updated_at, id"
    wait_for(lambda: len(node.db.query(done)) == 7, 120, what="the seven runs processed")
    order = [runs[r["run_id"]] for r in node.db.query(done)]
    assert order.index("SUITE_B") <= 2, order  # after A's first one or two, not the sixth


def test_a_series_whose_sender_never_stops_is_complete_after_max_receiving_s(
    make_node: Any,
) -> None:
    """A sender that resends an instance in a loop (an answer it does not like) kept
    its series receiving for ever: each instance, a copy too, restarted the quiet
    period, so the run was never processed. After ``max_receiving_s`` it is complete
    all the same, with the reason; the copies that go on arriving change nothing, and
    a new instance later opens it again for one quiet period, not for no time."""
    import time

    from tests.test_ingest import _send

    node = make_node(
        completion={"quiet_period_s": 1.0, "max_receiving_s": 4.0, "sweep_interval_s": 0.2},
        rules=[{"name": "xa", "match": {"modality": ["XA"]}, "pipelines": ["minip"]}],
    )
    first = xa_run(frames=1, rows=64, cols=64)
    series = first.SeriesInstanceUID = generate_uid()
    instances = []
    for k in range(3):
        ds = copy.deepcopy(first)
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = k + 1
        instances.append(ds)
    start = time.monotonic()
    assert _send(node, instances[0]) == 0x0000
    assert _send(node, instances[1]) == 0x0000
    completed_after = None
    while time.monotonic() - start < 9.0:  # a copy every 0.3 s: never a quiet second
        assert _send(node, instances[1]) == 0x0000
        if completed_after is None and node.db.run_state(series) != RunState.RECEIVING:
            completed_after = time.monotonic() - start
        time.sleep(0.3)
    assert completed_after is not None and 4.0 <= completed_after < 7.0, completed_after
    (run,) = node.db.query("SELECT state, reason FROM runs WHERE run_id=?", (series,))
    assert "receiving for 4 s" in run["reason"], dict(run)
    wait_for(
        lambda: node.db.query("SELECT id FROM jobs WHERE run_id=? AND state='done'", (series,)),
        60,
        what="the held-open run processed",
    )
    assert _send(node, instances[2]) == 0x0000  # a new instance: open again
    assert node.db.run_state(series) == RunState.RECEIVING
    wait_for(
        lambda: node.db.run_state(series) != RunState.RECEIVING,
        10,
        what="the re-opened run complete again",
    )
    (run,) = node.db.query("SELECT reason FROM runs WHERE run_id=?", (series,))
    assert run["reason"] == "quiet for 1 s", dict(run)
    jobs = wait_for(
        lambda: node.db.query("SELECT id FROM jobs WHERE run_id=? AND state='done'", (series,))[1:],
        60,
        what="the run processed again with its new instance",
    )
    assert jobs
