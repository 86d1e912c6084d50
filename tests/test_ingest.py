"""Ingest over real loopback associations: pynetdicom and dcmtk clients, refusals
with their DIMSE statuses, durability, and the run through to a destination."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    MRImageStorage,
    XRayAngiographicImageStorage,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node.runs import load_run
from tests.conftest import REAL_DATA, dciodvfy_errors, need, wait_for
from tests.dicomgen import save, xa_run

MINIP_ONLY = [{"name": "xa-minip", "match": {"modality": ["XA"]}, "pipelines": ["minip"]}]


def _assoc(
    node,
    calling: str = "TESTSCU",
    sop_class: str = XRayAngiographicImageStorage,  # type: ignore[no-untyped-def]
    transfer_syntax: str | None = None,
):
    ae = AE(ae_title=calling)
    if transfer_syntax:
        ae.add_requested_context(sop_class, transfer_syntax)
    else:
        ae.add_requested_context(sop_class)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.settings.ae_title)
    assert assoc.is_established
    return assoc


def _send(node, ds, calling: str = "TESTSCU", originator: str | None = None) -> int:  # type: ignore[no-untyped-def]
    """C-STORE ``ds`` as ``calling``; ``originator``: the Move Originator AE Title it
    names (a forwarder's sender, as an Orthanc forwarding for a suite names it)."""
    assoc = _assoc(node, calling, str(ds.SOPClassUID))
    try:
        status = assoc.send_c_store(
            ds, originator_aet=originator, originator_id=1 if originator else None
        )
        return int(status.Status)
    finally:
        assoc.release()


def _jobs(node, state: str = "done") -> list:  # type: ignore[no-untyped-def]
    return node.db.query("SELECT * FROM jobs WHERE state=?", (state,))


def test_echo_with_dcmtk_echoscu(make_node) -> None:  # type: ignore[no-untyped-def]
    node = make_node()
    out = subprocess.run(
        [need("echoscu"), "-aec", node.settings.ae_title, "127.0.0.1", str(node.port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr


def test_pynetdicom_store_is_durable_indexed_and_processed(make_node, storescp) -> None:  # type: ignore[no-untyped-def]
    storescp.start()
    node = make_node(destinations=[storescp.destination()], rules=MINIP_ONLY)
    ds = xa_run(frames=5)
    assert _send(node, ds) == 0x0000
    row = node.db.query("SELECT * FROM instances WHERE sop_instance_uid=?", (ds.SOPInstanceUID,))[0]
    assert Path(row["path"]).is_file()
    assert dcmread(row["path"]).SOPInstanceUID == ds.SOPInstanceUID
    # single-instance multi-frame: complete on arrival, routed, processed, delivered
    wait_for(lambda: _jobs(node), 60, what="minip job done")
    files = wait_for(lambda: storescp.files(), 30, what="MinIP at destination")
    minip = dcmread(files[0])
    assert minip.StudyInstanceUID == ds.StudyInstanceUID
    assert minip.PatientID == ds.PatientID
    assert minip.SeriesInstanceUID != ds.SeriesInstanceUID
    assert minip.SourceImageSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
    expected = ds.pixel_array.min(axis=0)
    assert np.array_equal(minip.pixel_array.reshape(expected.shape), expected)
    assert dciodvfy_errors(files[0]) == []


def test_duplicate_is_idempotent(make_node) -> None:  # type: ignore[no-untyped-def]
    node = make_node()
    ds = xa_run(frames=4)
    assert _send(node, ds) == 0
    assert _send(node, ds) == 0
    assert node.db.query("SELECT COUNT(*) n FROM instances")[0]["n"] == 1
    wait_for(
        lambda: node.db.query("SELECT state FROM runs")[0]["state"] in ("routed", "unrouted"), 10
    )
    # the duplicate does not route the run twice
    per_pipeline = node.db.query("SELECT pipeline, COUNT(*) n FROM jobs GROUP BY pipeline")
    assert per_pipeline and all(r["n"] == 1 for r in per_pipeline)


def test_a_uid_held_by_another_series_or_study_is_refused(make_node) -> None:  # type: ignore[no-untyped-def]
    """One SOP Instance UID names one instance, and one series is in one study. The
    same SOP Instance UID in another series, study or run, or the series in another
    study, is refused 0xC002, and what was stored under it stays where it was, in
    its run, also across a restart (the index used to follow the last copy, leave
    the first run without it, and follow the other file again at each restart; a
    series took instances of any study into one run)."""
    node = make_node(rules=MINIP_ONLY, completion={"quiet_period_s": 3600})
    first = xa_run(frames=1)
    assert _send(node, first) == 0
    other_series = xa_run(frames=1)
    other_series.SOPInstanceUID = first.SOPInstanceUID
    other_study = xa_run(frames=1)
    other_study.SOPInstanceUID = first.SOPInstanceUID
    other_study.SeriesInstanceUID = first.SeriesInstanceUID
    other_run = xa_run(frames=3)  # a multi-frame run of its own, in the first one's series
    other_run.SOPInstanceUID, other_run.SeriesInstanceUID, other_run.StudyInstanceUID = (
        first.SOPInstanceUID,
        first.SeriesInstanceUID,
        first.StudyInstanceUID,
    )
    series_elsewhere = xa_run(frames=1)  # a new instance of the series, in another study
    series_elsewhere.SeriesInstanceUID = first.SeriesInstanceUID
    # a multi-frame run whose SOP Instance UID is the series' UID: its run's ID
    named_as_series = xa_run(frames=3, study_uid=first.StudyInstanceUID)
    named_as_series.SOPInstanceUID = first.SeriesInstanceUID
    for ds in (other_series, other_study, other_run, series_elsewhere, named_as_series):
        assert _send(node, ds) == 0xC002
    (path,) = [r["path"] for r in node.db.query("SELECT path FROM instances")]
    assert int(dcmread(path).NumberOfFrames) == 1  # other_run's 3 frames were not written there
    assert _send(node, first) == 0  # the same instance again: idempotent
    rows = node.db.query("SELECT * FROM instances")
    assert [(r["series_uid"], r["run_id"]) for r in rows] == [
        (first.SeriesInstanceUID, first.SeriesInstanceUID)
    ]
    storage = Path(node.settings.storage_dir)
    assert sorted((storage / "spool").rglob("*.dcm")) == [Path(rows[0]["path"])]
    # a crash between the file's rename and its index left the other series' copy
    node.stop()
    left = storage / "spool" / other_series.StudyInstanceUID / other_series.SeriesInstanceUID
    save(other_series, left)
    node = make_node(rules=MINIP_ONLY, completion={"quiet_period_s": 3600})
    assert [r["path"] for r in node.db.query("SELECT * FROM instances")] == [rows[0]["path"]]
    assert list((storage / "quarantine").rglob("*.dcm"))


def test_a_series_of_two_patients_fails_its_jobs_with_the_reason(make_node) -> None:  # type: ignore[no-untyped-def]
    """Each instance is stored (each is valid), but no result mixes two patients:
    the run's jobs fail with a reason that names no value."""
    node = make_node(rules=MINIP_ONLY)
    first = xa_run(frames=1)
    second = xa_run(frames=1, seed=1, series_uid=first.SeriesInstanceUID)
    second.StudyInstanceUID = first.StudyInstanceUID
    second.PatientID = "OTHER-PATIENT"
    assert _send(node, first) == 0 and _send(node, second) == 0
    (job,) = wait_for(lambda: _jobs(node, "failed"), 60, what="the run's job failed")
    assert job["error"].endswith(
        "the instances of the series name 2 patients (Patient ID): not one run"
    )
    assert "OTHER-PATIENT" not in job["error"]


ENCODINGS = {
    # name: (converter command, storescu proposal flag or None to send with pynetdicom)
    "explicit": (None, "-xe"),
    "jpeg-lossless-sv1": (
        ["dcmcjpeg", "+e1"],
        "-xs",
    ),  # process 14 SV1 (.70), storescu's default lossless
    "jpeg-lossless-p14": (
        ["dcmcjpeg", "+el"],
        None,
    ),  # process 14 (.57): storescu has no flag for it
    "rle": (["dcmcrle"], "-xr"),
}


@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
def test_client_transfer_syntaxes(make_node, tmp_path, encoding) -> None:  # type: ignore[no-untyped-def]
    node = make_node()
    ds = xa_run(frames=4, rows=48, cols=40)
    src = save(ds, tmp_path / "src", "run.dcm")
    converter, flag = ENCODINGS[encoding]
    if converter:
        converted = tmp_path / "conv.dcm"
        subprocess.run(
            [need(converter[0]), *converter[1:], str(src), str(converted)], check=True, timeout=60
        )
        src = converted
    tsuid = str(dcmread(src, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    if flag:
        out = subprocess.run(
            [
                need("storescu"),
                flag,
                "-aec",
                node.settings.ae_title,
                "-aet",
                "DCMTK",
                "127.0.0.1",
                str(node.port),
                str(src),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stdout + out.stderr
    else:
        ae = AE(ae_title="PYNETDICOM")
        ae.add_requested_context(XRayAngiographicImageStorage, tsuid)
        assoc = ae.associate("127.0.0.1", node.port, ae_title=node.settings.ae_title)
        assert assoc.is_established
        try:
            assert int(assoc.send_c_store(src).Status) == 0
        finally:
            assoc.release()
    row = node.db.query("SELECT * FROM instances")[0]
    assert row["transfer_syntax"] == tsuid  # stored as received, not transcoded
    loaded = load_run([Path(row["path"])])
    assert np.array_equal(loaded.run.pixels, ds.pixel_array.astype(np.float32))
    assert loaded.run.meta.frame_times_s is not None
    assert np.allclose(np.diff(loaded.run.meta.frame_times_s), 0.25)


def test_high_throughput_jpeg_2000_is_received_and_processed(make_node, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """HTJ2K (PS3.5 A.4.11: lossless, lossless RPCL, lossy), proposed alone as a
    sender that offers nothing else would: the context was rejected, and the run never
    left the sender. Accepted, stored as received, decoded to the sent pixels (within
    the quantisation of the lossy one) and processed; a codestream whose SIZ marker
    declares another size than the header is refused, as for JPEG 2000."""
    from pydicom.uid import HTJ2K, HTJ2KLossless, HTJ2KLosslessRPCL

    from tests.dicomgen import htj2k
    from tests.faults import _patch_j2k_size

    node = make_node(rules=MINIP_ONLY)
    sent = {}
    for ts, quality in ((HTJ2KLossless, None), (HTJ2KLosslessRPCL, None), (HTJ2K, 1e-4)):
        ds = xa_run(frames=4, rows=48, cols=40, seed=len(sent))
        pixels = ds.pixel_array.astype(np.float32)
        assoc = _assoc(node, transfer_syntax=ts)
        try:
            assert int(assoc.send_c_store(htj2k(ds, ts, quality)).Status) == 0x0000, ts
            lying = _patch_j2k_size(htj2k(xa_run(frames=2, rows=48, cols=40), ts, quality), 99, 99)
            assert int(assoc.send_c_store(lying).Status) == 0xA900, ts
        finally:
            assoc.release()
        sent[ds.SOPInstanceUID] = (ts, pixels, quality)
    for sop, (ts, pixels, quality) in sent.items():
        (row,) = node.db.query("SELECT * FROM instances WHERE sop_instance_uid=?", (sop,))
        assert row["transfer_syntax"] == ts  # stored as received, not transcoded
        loaded = load_run([Path(row["path"])]).run.pixels
        if quality is None:
            assert np.array_equal(loaded, pixels), ts
        else:
            assert 0 < np.abs(loaded - pixels).max() < 32, ts  # of 4096: 12 bits
    wait_for(lambda: len(_jobs(node)) == 3, 120, what="the three runs processed")
    assert not _jobs(node, "failed")


def test_calling_ae_not_allowed_is_rejected(make_node) -> None:  # type: ignore[no-untyped-def]
    node = make_node(allowed_calling_aets=["MODALITY1"])
    ae = AE(ae_title="INTRUDER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.settings.ae_title)
    assert assoc.is_rejected
    ae2 = AE(ae_title="MODALITY1")
    ae2.add_requested_context(Verification)
    ok = ae2.associate("127.0.0.1", node.port, ae_title=node.settings.ae_title)
    assert ok.is_established
    ok.release()


@pytest.fixture
def raw_send(monkeypatch):  # type: ignore[no-untyped-def]
    """pynetdicom sends files as raw bytes, without decoding them first."""
    from pynetdicom import _config

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


def test_unsupported_sop_class(make_node, tmp_path, raw_send) -> None:  # type: ignore[no-untyped-def]
    node = make_node()
    # negotiation: MR is not offered; with no acceptable context there is no association
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(MRImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.settings.ae_title)
    assert not assoc.is_established
    assert [c.result for c in assoc.rejected_contexts] == [0x03]  # abstract syntax not supported
    # dataset level: a file whose meta says XA but whose dataset is MR, sent as raw
    # bytes under the XA context, gets 0x0122 (SOP class not supported)
    ds = xa_run(frames=2)
    ds.SOPClassUID = MRImageStorage
    ds.file_meta.MediaStorageSOPClassUID = XRayAngiographicImageStorage
    ds.preamble = b"\0" * 128
    path = tmp_path / "mr.dcm"
    ds.save_as(path, enforce_file_format=False)  # keeps the lying file meta
    assoc = _assoc(node, transfer_syntax=ExplicitVRLittleEndian)
    try:
        status = assoc.send_c_store(path)
    finally:
        assoc.release()
    assert int(status.Status) == 0x0122
    assert node.db.query("SELECT COUNT(*) n FROM instances")[0]["n"] == 0


def test_missing_pixel_data(make_node) -> None:  # type: ignore[no-untyped-def]
    node = make_node()
    ds = xa_run(frames=2)
    del ds.PixelData
    assert _send(node, ds) == 0xA900
    assert node.db.query("SELECT COUNT(*) n FROM instances")[0]["n"] == 0


def test_truncated_pixel_data(make_node) -> None:  # type: ignore[no-untyped-def]
    node = make_node()
    ds = xa_run(frames=3)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    assert _send(node, ds) == 0xC000


def test_truncated_file_from_path(make_node, tmp_path, raw_send) -> None:  # type: ignore[no-untyped-def]
    """A file cut mid-element, sent as raw bytes by pynetdicom (no decoding)."""
    node = make_node()
    path = save(xa_run(frames=3), tmp_path, "full.dcm")
    data = path.read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: len(data) - 3001])
    assoc = _assoc(node, transfer_syntax=ExplicitVRLittleEndian)
    try:
        status = assoc.send_c_store(cut)
    finally:
        assoc.release()
    assert int(status.Status) == 0xC000
    assert node.db.query("SELECT COUNT(*) n FROM instances")[0]["n"] == 0


@pytest.mark.parametrize(
    "uid", ["1.2.3/../../../etc/passwd", "1.2." + "1" * 70, "/etc/passwd", "..", "1.2.3.x"]
)
def test_hostile_uids(make_node, uid, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from pynetdicom import _config

    # a hostile client does not validate what it sends
    monkeypatch.setitem(_config.VALIDATORS, "UI", lambda value: (True, ""))
    node = make_node()
    ds = xa_run(frames=2)
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    assert _send(node, ds) == 0xC000
    assert node.db.query("SELECT COUNT(*) n FROM instances")[0]["n"] == 0
    assert not any(p.suffix == ".dcm" for p in (node.settings.storage_dir / "spool").rglob("*"))


def test_hostile_series_uid(make_node) -> None:  # type: ignore[no-untyped-def]
    node = make_node()
    ds = xa_run(frames=2)
    ds.SeriesInstanceUID = "../../x"
    assert _send(node, ds) == 0xC000


def test_disk_full_is_out_of_resources(make_node) -> None:  # type: ignore[no-untyped-def]
    node = make_node(min_free_bytes=2**62)
    assert _send(node, xa_run(frames=2)) == 0xA700
    assert node.db.query("SELECT COUNT(*) n FROM instances")[0]["n"] == 0
    assert list((node.settings.storage_dir / "tmp").iterdir()) == []


def test_multi_instance_series_completes_after_quiet_period(make_node) -> None:  # type: ignore[no-untyped-def]
    node = make_node(completion={"quiet_period_s": 1.0}, rules=MINIP_ONLY)
    series, study = generate_uid(), generate_uid()
    for i in range(4):
        ds = xa_run(frames=1, series_uid=series, study_uid=study, seed=i)
        ds.InstanceNumber = i + 1
        ds.AcquisitionTime = f"1200{i:02d}"
        assert _send(node, ds) == 0
    assert node.db.query("SELECT state FROM runs")[0]["state"] == "receiving"
    wait_for(
        lambda: node.db.query("SELECT state FROM runs")[0]["state"] != "receiving",
        10,
        what="quiet-period completion",
    )
    wait_for(lambda: _jobs(node), 60, what="job done")
    assert node.db.query("SELECT COUNT(*) n FROM runs")[0]["n"] == 1


def test_explicit_trigger_completes_now(make_node) -> None:  # type: ignore[no-untyped-def]
    import requests

    node = make_node(completion={"quiet_period_s": 3600}, rules=MINIP_ONLY)
    series, study = generate_uid(), generate_uid()
    for i in range(3):
        ds = xa_run(frames=1, series_uid=series, study_uid=study, seed=i)
        ds.InstanceNumber = i + 1
        assert _send(node, ds) == 0
    resp = requests.post(
        f"http://127.0.0.1:{node.api_port}/trigger", json={"series_uid": series}, timeout=10
    )
    assert resp.status_code == 200 and resp.json()["completed_runs"] == [series]
    wait_for(lambda: _jobs(node), 60, what="job done")
    bad = requests.post(
        f"http://127.0.0.1:{node.api_port}/trigger", json={"series_uid": "../x"}, timeout=10
    )
    assert bad.status_code == 400


def test_dcmtk_tools_are_found_past_pynetdicom_scripts_of_the_same_name(
    tmp_path, monkeypatch
) -> None:
    """pynetdicom 3 installs Python ``storescu``/``storescp``/``echoscu`` scripts with
    other options; with a virtual environment first on PATH they shadowed dcmtk."""
    import os
    import shutil as sh

    from dicom_node.dcmtk import find

    scripts, binaries = tmp_path / "venv-bin", tmp_path / "usr-bin"
    scripts.mkdir()
    binaries.mkdir()
    script = scripts / "storescu"
    script.write_text("#!/usr/bin/env python3\nprint('not dcmtk')\n")
    script.chmod(0o755)
    sh.copy("/bin/true", binaries / "storescu")
    monkeypatch.setenv("PATH", os.pathsep.join([str(scripts), str(binaries)]))
    assert find("storescu") == str(binaries / "storescu")
    assert find("echoscu") is None


REAL_FILES = sorted(REAL_DATA.rglob("*.dcm")) if REAL_DATA.exists() else []
# storescu's proposal for each real file's own transfer syntax (it would transcode
# otherwise, and cannot decode these); uncompressed files: -xe.
STORESCU_FLAG = {
    "1.2.840.10008.1.2.4.50": "-xy",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51": "-xx",  # JPEG Extended 12 bit
    "1.2.840.10008.1.2.4.70": "-xs",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80": "-xt",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.90": "-xv",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.5": "-xr",  # RLE
}


@pytest.mark.skipif(not REAL_FILES, reason="../shared/data/real is not present")
def test_real_vendor_files_by_dcmtk_are_stored_byte_for_byte(make_node) -> None:  # type: ignore[no-untyped-def]
    """The real sample files, sent by dcmtk storescu in their own transfer syntax, are
    written to the spool as they arrive and stored with their Pixel Data unchanged
    (the JPEG Baseline cine's 96 compressed frames byte for byte, and the WG04 image
    in six transfer syntaxes); nothing is left in the spool's tmp/."""
    node = make_node(rules=[])
    for path in REAL_FILES:
        ts = str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        flag = STORESCU_FLAG.get(ts, "-xe")
        send = [need("storescu"), flag, "-aec", node.settings.ae_title, "-aet", "SUITE"]
        out = subprocess.run(
            [*send, "127.0.0.1", str(node.port), str(path)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0 and "Failed" not in out.stderr, out.stderr
        source = dcmread(path)
        (row,) = node.db.query(
            "SELECT path, transfer_syntax FROM instances WHERE sop_instance_uid = ?",
            (str(source.SOPInstanceUID),),
        )
        stored = dcmread(row["path"])
        assert row["transfer_syntax"] == ts, path.name
        assert stored.PixelData == source.PixelData, path.name
    assert not any((node.settings.storage_dir / "tmp").iterdir())


def test_two_senders_racing_one_uid_into_two_series_store_one(make_node) -> None:  # type: ignore[no-untyped-def]
    """Two associations send one SOP Instance UID in two series at the same moment,
    twenty times: each time exactly one is stored (Success) and the other refused
    0xC002, and the spool holds exactly the files the index names."""
    import threading

    node = make_node(completion={"quiet_period_s": 3600})
    study = generate_uid()
    for _ in range(20):
        pair = [xa_run(frames=1, study_uid=study) for _ in range(2)]
        pair[1].SOPInstanceUID = pair[0].SOPInstanceUID
        pair[1].file_meta.MediaStorageSOPInstanceUID = pair[0].SOPInstanceUID
        statuses: list[int] = []
        start = threading.Barrier(2)

        def send(ds, start=start, statuses=statuses) -> None:  # type: ignore[no-untyped-def]
            assoc = _assoc(node)
            try:
                start.wait()
                statuses.append(int(assoc.send_c_store(ds).Status))
            finally:
                assoc.release()

        threads = [threading.Thread(target=send, args=(ds,)) for ds in pair]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(statuses) == [0x0000, 0xC002]
    rows = node.db.query("SELECT path FROM instances")
    assert len(rows) == 20
    spool = Path(node.settings.storage_dir, "spool")
    assert sorted(map(str, spool.rglob("*.dcm"))) == sorted(r["path"] for r in rows)


def test_the_same_instances_from_several_senders_at_once_are_stored_once(make_node) -> None:  # type: ignore[no-untyped-def]
    """Two suites, or a suite and a PACS's routing rule, sending the same series at the
    same moment: every copy is acknowledged, each instance is stored once and whole,
    and each run (a series of single frames, or a multi-frame instance) is routed once."""
    import threading

    node = make_node(rules=MINIP_ONLY, completion={"quiet_period_s": 1})
    orders = [[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1], [0, 1, 2, 3], [3, 1, 2, 0]]

    def send(instances: list, order: list[int], start: threading.Barrier, statuses: list) -> None:  # type: ignore[type-arg]
        assoc = _assoc(node)
        try:
            start.wait()
            for i in order:
                statuses.append(int(assoc.send_c_store(instances[i]).Status))
        finally:
            assoc.release()

    for round_ in range(4):
        study, series = generate_uid(), generate_uid()
        frames = 1 if round_ % 2 else 2  # one run of four instances; four runs
        instances = [
            xa_run(frames, seed=round_ * 10 + i, study_uid=study, series_uid=series)
            for i in range(4)
        ]
        statuses: list[int] = []
        start = threading.Barrier(len(orders))
        threads = [
            threading.Thread(target=send, args=(instances, o, start, statuses)) for o in orders
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert statuses == [0] * 24, [hex(s) for s in statuses]
        rows = node.db.query(
            "SELECT sop_instance_uid, path FROM instances WHERE series_uid=?", (series,)
        )
        assert sorted(r["sop_instance_uid"] for r in rows) == sorted(
            str(ds.SOPInstanceUID) for ds in instances
        )
        for r in rows:
            stored = dcmread(r["path"])
            sent = next(ds for ds in instances if ds.SOPInstanceUID == stored.SOPInstanceUID)
            assert stored.PixelData == sent.PixelData
    runs = 2 * 1 + 2 * 4
    wait_for(lambda: node.db.unsettled_jobs() == 0 and len(_jobs(node)) == runs, 60)
    assert node.db.query("SELECT COUNT(*) n FROM runs")[0]["n"] == runs


@pytest.mark.parametrize(
    ("context", "embedded"),
    [
        (ExplicitVRLittleEndian, JPEGBaseline8Bit),
        (ImplicitVRLittleEndian, ExplicitVRLittleEndian),
        (ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian),
    ],
    ids=["explicit, meta naming JPEG", "implicit, meta naming explicit", "explicit, deflate"],
)
def test_file_meta_left_in_a_c_store_data_set_is_left_out(  # type: ignore[no-untyped-def]
    make_node, context: str, embedded: str
) -> None:
    """An SCU that sends a file's data set with its File Meta elements (group 0002)
    still in it, naming the file's transfer syntax rather than the association's: PS3.5
    7.1 keeps them out of a data set, and DCMTK-based archives drop them. Read where
    they lay, right after the file meta the SCP wrote, they were taken for it and the
    instance was refused (0xA900 "Pixel Data is not encapsulated, but the transfer
    syntax is JPEG", 0xC000 for the others). They are left out and the instance stored
    as the association carried it."""
    node = make_node(rules=MINIP_ONLY)
    ds = xa_run(frames=3)
    ds.add_new(0x00020002, "UI", ds.SOPClassUID)
    ds.add_new(0x00020010, "UI", embedded)
    assoc = _assoc(node, transfer_syntax=context)
    try:
        assert int(assoc.send_c_store(ds).Status) == 0x0000
    finally:
        assoc.release()
    path = node.db.query("SELECT path FROM instances")[0]["path"]
    stored = dcmread(path)
    assert stored.file_meta.TransferSyntaxUID == context
    assert not [e for e in stored if e.tag.group == 0x0002]
    assert stored.PixelData == xa_run(frames=3).PixelData  # the generator's, seed 0
    wait_for(lambda: len(_jobs(node)) == 1, 60)


def test_rle_frames_in_several_fragments_without_an_offset_table_are_refused(  # type: ignore[no-untyped-def]
    make_node, caplog
) -> None:
    """RLE Lossless puts each frame in one fragment (PS3.5 A.4.2), and a RLE segment has
    no end marker: a multi-frame run split into more fragments, without a Basic Offset
    Table, cannot be told apart into frames. It was acknowledged and its job failed
    with "StopIteration"; it is refused, with the reason. With an offset table it is
    stored and processed, as is JPEG 2000 in several fragments a frame without one
    (its codestreams end with a marker)."""
    from pydicom.dataset import Dataset
    from pydicom.encaps import encapsulate, generate_fragmented_frames
    from pydicom.uid import JPEG2000Lossless, RLELossless

    from tests.faults import fresh

    node = make_node(rules=MINIP_ONLY)

    def split(ts: str, bot: bool) -> Dataset:
        ds = fresh(frames=6, size=64, seed=1)
        ds.compress(ts)
        frames = [b"".join(f) for f in generate_fragmented_frames(ds.PixelData, number_of_frames=6)]
        ds.PixelData = encapsulate(frames, fragments_per_frame=2, has_bot=bot)
        return ds

    refused = split(RLELossless, bot=False)
    assoc = _assoc(node, transfer_syntax=RLELossless)
    try:
        with caplog.at_level("WARNING", logger="dicom_node.ingest"):
            assert int(assoc.send_c_store(refused).Status) == 0xC000
        assert "12 fragments for 6 frame(s), without a Basic Offset Table" in caplog.text
        assert int(assoc.send_c_store(split(RLELossless, bot=True)).Status) == 0x0000
    finally:
        assoc.release()
    assoc = _assoc(node, transfer_syntax=JPEG2000Lossless)
    try:
        assert int(assoc.send_c_store(split(JPEG2000Lossless, bot=False)).Status) == 0x0000
    finally:
        assoc.release()
    wait_for(lambda: len(_jobs(node)) == 2, 120, what="both stored runs processed")
    assert not _jobs(node, "failed")


def test_a_series_whose_next_instance_is_still_arriving_is_not_quiet(make_node) -> None:  # type: ignore[no-untyped-def]
    """The quiet period counted from the last stored instance: an instance that took
    longer than the quiet period to arrive (a slow link) let its series complete
    without it, and the series was processed twice, the first time in part. A series
    with a data set still arriving, by C-STORE or by STOW-RS, is now left open until
    it is stored (``max_receiving_s`` still bounds it): one job, of the whole series."""
    import io
    import time

    import requests

    from tests.test_security import multipart

    node = make_node(rules=MINIP_ONLY, completion={"quiet_period_s": 1})

    def series(seed: int) -> list:  # type: ignore[type-arg]
        study, uid = generate_uid(), generate_uid()
        return [
            xa_run(1, rows=512, cols=512, seed=seed + i, study_uid=study, series_uid=uid)
            for i in range(2)
        ]

    def jobs_of(instances: list) -> list:  # type: ignore[type-arg]
        return node.db.query(
            "SELECT * FROM jobs WHERE run_id=?", (str(instances[0].SeriesInstanceUID),)
        )

    def small_pdus(assoc) -> None:  # type: ignore[no-untyped-def]
        """PDUs of 16 KiB from now on, smaller than the node takes (4 MiB)."""
        from pynetdicom.pdu_primitives import MaximumLengthNotification

        for item in assoc.acceptor.user_information:
            if isinstance(item, MaximumLengthNotification):
                item.maximum_length_received = 16_384
        assert assoc.dimse.maximum_pdu_size == 16_384

    # C-STORE: the second instance's 512 KiB in PDUs of 16 KiB, 0.1 s apart (3.2 s)
    dimse = series(1)
    ae = AE(ae_title="SLOWSCU")
    ae.add_requested_context(XRayAngiographicImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.settings.ae_title)
    assert assoc.is_established
    assert int(assoc.send_c_store(dimse[0]).Status) == 0
    small_pdus(assoc)
    fast = assoc.dul.socket.send

    def slow(data: bytes) -> None:
        time.sleep(0.1)
        fast(data)

    assoc.dul.socket.send = slow  # type: ignore[method-assign]
    assert int(assoc.send_c_store(dimse[1]).Status) == 0
    assoc.release()

    # a transfer cut off half way (the sender's connection closed): the series is quiet
    cut_off = series(21)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.settings.ae_title)
    assert int(assoc.send_c_store(cut_off[0]).Status) == 0
    small_pdus(assoc)
    sent = 0
    raw = assoc.dul.socket.socket
    fast = assoc.dul.socket.send

    def cut(data: bytes) -> None:
        nonlocal sent
        sent += 1
        if sent == 8:
            time.sleep(0.5)
            raw.shutdown(2)  # type: ignore[union-attr]
        fast(data)

    assoc.dul.socket.send = cut  # type: ignore[method-assign]
    status = assoc.send_c_store(cut_off[1])
    assert "Status" not in status, status  # no answer: the connection is gone
    assoc.abort()
    wait_for(lambda: jobs_of(cut_off), 30, what="the series left with its first instance")
    assert (
        len(
            node.db.query(
                "SELECT 1 FROM instances WHERE run_id=?", (jobs_of(cut_off)[0]["run_id"],)
            )
        )
        == 1
    )

    # STOW-RS: one request, the second part sent 32 KiB every 0.2 s (3.2 s)
    stow = series(11)
    parts = []
    for ds in stow:
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        parts.append(buf.getvalue())
    ctype, body = multipart(parts)
    cut = body.index(parts[1][:256])

    def chunks():  # type: ignore[no-untyped-def]
        yield body[:cut]
        for at in range(cut, len(body), 32_768):
            time.sleep(0.2)
            yield body[at : at + 32_768]

    resp = requests.post(
        f"http://127.0.0.1:{node.api_port}/dicom-web/studies",
        data=chunks(),
        headers={"Content-Type": ctype},
        timeout=60,
    )
    assert resp.status_code == 200, resp.text
    for instances in (dimse, stow):
        wait_for(lambda i=instances: jobs_of(i), 30, what="the series routed")
        time.sleep(2.5)  # a second completion would have come by now
        (job,) = jobs_of(instances)  # the old code: two, the first of one instance
        (run,) = node.db.query("SELECT * FROM runs WHERE run_id=?", (job["run_id"],))
        assert run["state"] == "routed" and run["reason"] == "quiet for 1 s", dict(run)
        assert run["completed_at"] > max(
            r["received_at"]
            for r in node.db.query("SELECT * FROM instances WHERE run_id=?", (job["run_id"],))
        )
    assert node.db.query("SELECT COUNT(*) AS n FROM instances")[0]["n"] == 5


def test_the_series_of_a_data_set_still_arriving_is_read_only_once_whole() -> None:
    """Every prefix of a file gives no series (not yet: a later look reads it) or its
    exact Series Instance UID, never a part of it, in each VR encoding and deflated
    (what arrived of the deflated stream inflated; a deflated data set held no series
    open before, so that its series could complete while it still arrived); bytes
    that are not DICOM give none."""
    import io

    from pydicom.uid import ExplicitVRBigEndian

    from dicom_node.arrivals import series_of

    for syntax in (
        ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian,
        DeflatedExplicitVRLittleEndian,
    ):  # fmt: skip
        ds = xa_run(frames=2)
        ds.file_meta.TransferSyntaxUID = syntax
        buf = io.BytesIO()
        encoding = {
            ImplicitVRLittleEndian: {"implicit_vr": True, "little_endian": True},
            ExplicitVRBigEndian: {"implicit_vr": False, "little_endian": False},
        }.get(syntax, {})
        ds.save_as(buf, enforce_file_format=True, **encoding)
        data = buf.getvalue()
        seen = [series_of(data[:n]) for n in range(0, 2048)]
        first = seen.index(str(ds.SeriesInstanceUID))  # found, and from then on
        assert set(seen[:first]) == {None} and set(seen[first:]) == {seen[first]}, syntax
        assert series_of(data) == str(ds.SeriesInstanceUID), syntax
    assert series_of(b"\0" * 128 + b"DICM" + b"\xff" * 4000) is None
    assert series_of(b"") is None


def test_why_an_instance_was_refused_is_answered_by_its_uid(make_node) -> None:  # type: ignore[no-untyped-def]
    """``GET /refusals?instance=UID``: the status and reason of the last refusal of an
    instance, by C-STORE or STOW-RS (what the Orthanc plugin asks of a STOW-RS forward
    that failed, whose error does not say); forgotten once the instance is stored."""
    import io

    import requests

    from tests.test_security import multipart

    node = make_node(rules=MINIP_ONLY)
    base = f"http://127.0.0.1:{node.api_port}"
    dimse, stow = xa_run(frames=2, seed=1), xa_run(frames=2, seed=2)
    for ds in (dimse, stow):
        ds.BitsStored = 17  # refused 0xA900
    assoc = _assoc(node)
    assert int(assoc.send_c_store(dimse).Status) == 0xA900
    buf = io.BytesIO()
    stow.save_as(buf, enforce_file_format=True)
    ctype, body = multipart([buf.getvalue()])
    resp = requests.post(f"{base}/dicom-web/studies", data=body, headers={"Content-Type": ctype})
    assert resp.status_code == 409
    for ds, source in ((dimse, "TESTSCU"), (stow, "STOW-RS")):
        said = requests.get(f"{base}/refusals?instance={ds.SOPInstanceUID}", timeout=10).json()
        assert said["status"] == "0xA900" and "Bits Stored" in said["reason"], said
        assert said["source"] == source and said["sop_instance_uid"] == ds.SOPInstanceUID
    assert requests.get(f"{base}/refusals?instance=1.2.3", timeout=10).status_code == 404
    assert requests.get(f"{base}/refusals?instance=1.2.3%0A", timeout=10).status_code == 400
    dimse.BitsStored = 12  # put right and sent again: stored, the refusal forgotten
    assert int(assoc.send_c_store(dimse).Status) == 0
    assoc.release()
    resp = requests.get(f"{base}/refusals?instance={dimse.SOPInstanceUID}", timeout=10)
    assert resp.status_code == 404 and "no refusal" in resp.json()["error"]
