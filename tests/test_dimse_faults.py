"""What a broken or hostile DICOM peer says cannot stop the node or lose what it
acknowledged (``dicom_node.scp``): well-formed PDUs that carry odd association
requests and DIMSE messages of every kind (``tests/dimse_faults.py``). The PDU
corpus in tests/test_receive_limits.py breaks the bytes of PDUs instead."""

from __future__ import annotations

import logging
import random
import threading
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import XRayAngiographicImageStorage

from tests import dimse_faults
from tests.conftest import corpus_seed, send_storescu

# C-STORE statuses a corpus may draw (README, "Behaviour on bad input"): 0x0110, a
# defect of the node, and 0xA700, a full disk, may not.
STORE_STATUSES = {0x0000, 0x0122, 0xA900, 0xC000, 0xC001}
C_STORE_RSP, C_ECHO_RSP = 0x8001, 0x8030
A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ABORT = 2, 3, 7
XA_CONTEXT = [(1, XRayAngiographicImageStorage, ["1.2.840.10008.1.2.1"])]


def _request(max_length: int | None = 16384) -> bytes:
    return dimse_faults.association_request(random.Random(0), XA_CONTEXT, max_length=max_length)


def _node(make_node):  # type: ignore[no-untyped-def]
    """A node whose one rule matches no XA run: what is stored is not processed."""
    return make_node(
        max_associations=8,
        max_associations_per_host=8,
        network_timeout_s=2,
        api={"enabled": False},
        rules=[{"name": "none", "pipelines": ["minip"], "match": {"modality": ["OT"]}}],
    )


RECEIVING = ("dicom_node.scp", "dicom_node.ingest", "dicom_node.spool", "pynetdicom")


def _receiving_error(record: logging.LogRecord) -> bool:
    """An error logged while receiving, other than pynetdicom's own report of a peer's
    mistake that it answers with an A-ABORT (a command set it decoded whose values it
    refuses) or of a silent peer. (The jobs of the runs stored fail for want of
    frames: not the receiving's concern.)"""
    if record.levelno < logging.ERROR or not record.name.startswith(RECEIVING):
        return False
    if record.name in ("pynetdicom.dimse", "pynetdicom.utils"):
        return False
    return not (
        record.name == "pynetdicom.association"
        and record.getMessage().startswith("Network timeout")
    )


def _after(node, tmp_path: Path, name: str) -> None:  # type: ignore[no-untyped-def]
    """Afterwards dcmtk's storescu is served, and its instance stored."""
    ds = dimse_faults.instance(seed=99)
    path = tmp_path / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    send_storescu("ANGIO_NODE", node.port, [path])
    rows = node.db.query(
        "SELECT COUNT(*) n FROM instances WHERE sop_instance_uid = ?", (ds.SOPInstanceUID,)
    )
    assert rows[0]["n"] == 1


# An association thread that dies of an exception fails the test: undecodable command
# sets ended pynetdicom's upper-layer thread with a traceback (KeyError, AttributeError,
# BytesLengthException) before the node answered them with an A-ABORT.
@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_corpus_of_broken_dicom_conversations_never_stops_the_node(
    make_node, tmp_path: Path, caplog
) -> None:  # type: ignore[no-untyped-def]
    """64 generated conversations (``dimse_faults.corpus``), eight at a time. Every
    answer is an association answer or a documented DIMSE status; every instance
    acknowledged with Success is in the index and its file; nothing is stored that
    was not sent whole; nothing is logged as an error but pynetdicom's reports of the
    peer's mistakes; afterwards a sender is served."""
    node = _node(make_node)
    corpus = dimse_faults.corpus(corpus_seed(5), 64)
    replies: list[dimse_faults.Reply] = [dimse_faults.Reply()] * len(corpus)

    def talk(k: int) -> None:
        replies[k] = dimse_faults.converse(node.port, corpus[k])

    caplog.set_level(logging.WARNING)
    for start in range(0, len(corpus), 8):
        threads = [threading.Thread(target=talk, args=(k,)) for k in range(start, start + 8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    whole = {uid for stream in corpus for uid in stream.whole}
    stored = {r["sop_instance_uid"]: r for r in node.db.query("SELECT * FROM instances")}
    assert set(stored) <= whole
    acknowledged = 0
    for stream, reply in zip(corpus, replies, strict=True):
        assert reply.pdus, f"no answer at all: {stream.name}"
        assert reply.pdus[0] in (A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ABORT), stream.name
        for field, status, uid in reply.responses:
            assert field in (C_STORE_RSP, C_ECHO_RSP), (stream.name, hex(field))
            allowed = STORE_STATUSES if field == C_STORE_RSP else {0x0000}
            assert status in allowed, (stream.name, hex(status))
            if field == C_STORE_RSP and status == 0x0000:
                acknowledged += 1
                assert uid in stored, f"acknowledged, not indexed: {stream.name}"
                path = Path(stored[uid]["path"])
                assert dcmread(path, stop_before_pixels=True).SOPInstanceUID == uid
    assert acknowledged >= 3  # the corpus reaches the store, not only the association
    assert {A_ASSOCIATE_RJ, A_ABORT} <= {r.pdus[0] for r in replies} | {
        p for r in replies for p in r.pdus
    }
    errors = [f"{r.name}: {r.getMessage()}" for r in caplog.records if _receiving_error(r)]
    assert not errors, errors
    _after(node, tmp_path, "after")


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize(
    ("name", "max_length", "body", "answer", "logged"),
    [
        ("no maximum length", None, b"", [A_ASSOCIATE_RJ], "no Maximum Length sub-item"),
        ("maximum length 6", 6, b"", [A_ASSOCIATE_RJ], "of 6 bytes cannot carry"),
        (
            "unknown Command Field",
            16384,
            dimse_faults.message(1, dimse_faults.command_set([(0x00000100, "US", 0x7777)]), None),
            [A_ASSOCIATE_AC, A_ABORT],
            "a DIMSE message that cannot be decoded (KeyError)",
        ),
        (
            "no Command Field",
            16384,
            dimse_faults.message(1, dimse_faults.command_set([(0x00000110, "US", 1)]), None),
            [A_ASSOCIATE_AC, A_ABORT],
            "a DIMSE message that cannot be decoded (AttributeError)",
        ),
        (
            "C-ECHO on a storage context",
            16384,
            dimse_faults.message(
                1,
                dimse_faults.command_set(
                    [
                        (0x00000002, "UI", "1.2.840.10008.1.1"),
                        (0x00000100, "US", 0x0030),
                        (0x00000110, "US", 1),
                        (0x00000800, "US", 0x0101),
                    ]
                ),
                None,
            ),
            [A_ASSOCIATE_AC, A_ABORT],
            "a C-ECHO request for SOP Class 1.2.840.10008.1.1 on a presentation context",
        ),
        (
            "an unsolicited C-STORE response",
            16384,
            dimse_faults.message(
                1,
                dimse_faults.command_set(
                    [
                        (0x00000002, "UI", XRayAngiographicImageStorage),
                        (0x00000100, "US", 0x8001),
                        (0x00000120, "US", 1),
                        (0x00000800, "US", 0x0101),
                        (0x00000900, "US", 0),
                    ]
                ),
                None,
            ),
            [A_ASSOCIATE_AC, A_ABORT],
            "a C-STORE message that is not a valid request",
        ),
    ],
    ids=lambda value: value if isinstance(value, str) and " " in value else "",
)
def test_each_kind_of_broken_conversation_gets_its_answer_and_reason(
    make_node, tmp_path: Path, caplog, name, max_length, body, answer, logged
) -> None:  # type: ignore[no-untyped-def]
    """Each kind the corpus found, by hand: its answer (the association rejected, or
    aborted at once, not a connection closed without a word or an answer that never
    comes) and its reason in the log, with the calling AE title."""
    node = _node(make_node)
    caplog.set_level(logging.INFO)
    reply = dimse_faults.converse(node.port, dimse_faults.Stream(name, _request(max_length), body))
    assert reply.pdus[: len(answer)] == answer, (name, reply.pdus)
    assert any(logged in r.getMessage() and "FUZZ" in r.getMessage() for r in caplog.records)
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    _after(node, tmp_path, "after")


def test_a_c_store_must_carry_the_instance_it_names(make_node, tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    """A C-STORE whose data set is another instance than its request names is refused
    0xA900 (the sender would count the named one as stored: the node stored the data
    set's), one without a data set 0xC000 (it reached the handler, which raised:
    0xC211); the one after them, whole, is stored."""
    node = _node(make_node)
    caplog.set_level(logging.WARNING)
    other, good = dimse_faults.instance(1), dimse_faults.instance(2)
    named = "1.2.826.0.1.3680043.8.498.1"
    no_data = dimse_faults.command_set(
        [
            (0x00000002, "UI", XRayAngiographicImageStorage),
            (0x00000100, "US", 0x0001),
            (0x00000110, "US", 2),
            (0x00000700, "US", 0),
            (0x00000800, "US", 0x0101),
            (0x00001000, "UI", "1.2.826.0.1.3680043.8.498.2"),
        ]
    )
    body = (
        dimse_faults.store_request(1, other, sop_uid=named)
        + dimse_faults.message(1, no_data, None)
        + dimse_faults.store_request(1, good)
    )  # no release: pynetdicom releases once asked, with messages still queued
    reply = dimse_faults.converse(node.port, dimse_faults.Stream("uids", _request(), body))
    statuses = [(status, uid) for _, status, uid in reply.responses]
    assert statuses == [
        (0xA900, named),
        (0xC000, "1.2.826.0.1.3680043.8.498.2"),
        (0x0000, good.SOPInstanceUID),
    ]
    assert "differs from the request" in caplog.text
    assert "the request has no data set" in caplog.text
    uids = {r["sop_instance_uid"] for r in node.db.query("SELECT * FROM instances")}
    assert uids == {good.SOPInstanceUID}
