"""What a broken or hostile DICOM peer says cannot stop the node or lose what it
acknowledged (``dicom_node.scp``): well-formed PDUs that carry odd association
requests and DIMSE messages of every kind (``tests/dimse_faults.py``). The PDU
corpus in tests/test_receive_limits.py breaks the bytes of PDUs instead."""

from __future__ import annotations

import logging
import random
import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import XRayAngiographicImageStorage

from dicom_node import logsafe
from tests import dimse_faults
from tests.conftest import corpus_seed, send_storescu, wait_for

# C-STORE statuses a corpus may draw (README, "Behaviour on bad input"): 0x0110, a
# defect of the node, and 0xA700, a full disk, may not.
STORE_STATUSES = {0x0000, 0x0122, 0xA900, 0xC000, 0xC001, 0xC002}
# storage commitment: README, "Behaviour on bad input"
COMMITMENT_STATUSES = {0x0000, 0x0115, 0x0117, 0x0123, 0x0124, 0x0210, 0x0213}
# a storage commitment result (from a destination the node asked): none was asked here
REPORT_STATUSES = {0x0113, 0x0115}
C_STORE_RSP, C_ECHO_RSP, N_ACTION_RSP, N_EVENT_REPORT_RSP = 0x8001, 0x8030, 0x8130, 0x8100
STATUSES = {
    C_STORE_RSP: STORE_STATUSES,
    C_ECHO_RSP: {0x0000},
    N_ACTION_RSP: COMMITMENT_STATUSES,
    N_EVENT_REPORT_RSP: REPORT_STATUSES,
}
A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ABORT = 2, 3, 7
XA_CONTEXT = [(1, XRayAngiographicImageStorage, ["1.2.840.10008.1.2.1"])]


def _request(max_length: int | None = 16384) -> bytes:
    return dimse_faults.association_request(random.Random(0), XA_CONTEXT, max_length=max_length)


def _command(kind: str, sop_class: str) -> bytes:
    """A message of this kind on context 1, without a data set."""
    return dimse_faults.message(
        1, dimse_faults.command_set(dimse_faults.command_elements(kind, sop_class)), None
    )


def _node(make_node):  # type: ignore[no-untyped-def]
    """A node whose one rule matches no XA run: what is stored is not processed."""
    return make_node(
        max_associations=16,
        max_associations_per_host=16,
        network_timeout_s=2,
        api={"enabled": False},
        rules=[{"name": "none", "pipelines": ["minip"], "match": {"modality": ["OT"]}}],
        # its results go to a closed port: retried, as a suite that is off
        storage_commitment={
            "report_to": [{"name": "fuzz", "ae_title": "FUZZ", "host": "127.0.0.1", "port": 9}]
        },
    )


# pynetdicom reports a peer's mistakes it answers itself (a PDU or a message it cannot
# decode, answered with an A-ABORT or a rejection; a silent peer) as errors of its
# upper layer, state machine and decoders. Errors of the node, or of pynetdicom's
# association and service classes (a request served by the wrong one, a handler
# that raised), are the receiving's own.
OWN = ("dicom_node.", "pynetdicom.association", "pynetdicom.service_class", "pynetdicom.events")


def _receiving_error(record: logging.LogRecord) -> bool:
    """An error logged while receiving. (The jobs of the runs stored fail for want of
    frames: not the receiving's concern.)"""
    if record.levelno < logging.ERROR or not record.name.startswith(OWN):
        return False
    if record.name == "dicom_node.jobs":
        return False
    return not (
        record.name == "pynetdicom.association"
        and record.getMessage().startswith("Network timeout")
    )


class _Kept(logging.Handler):
    """A handler of the root logger as the node's are: through its PHI filter."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.addFilter(logsafe.FILTER)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _after(node, tmp_path: Path, name: str) -> None:  # type: ignore[no-untyped-def]
    """Afterwards dcmtk's storescu is served, and its instance stored (within the few
    seconds the corpus's last associations may still hold their places)."""
    ds = dimse_faults.instance(seed=99)
    path = tmp_path / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)

    def stored() -> bool:
        try:
            send_storescu("ANGIO_NODE", node.port, [path])
        except AssertionError:
            return False
        return bool(
            node.db.query(
                "SELECT 1 FROM instances WHERE sop_instance_uid = ?", (ds.SOPInstanceUID,)
            )
        )

    wait_for(stored, 30, interval=1, what="dcmtk storescu served after the corpus")


# An association thread that dies of an exception fails the test: undecodable command
# sets ended pynetdicom's upper-layer thread with a traceback (KeyError, AttributeError,
# BytesLengthException) before the node answered them with an A-ABORT.
@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_corpus_of_broken_dicom_conversations_never_stops_the_node(
    make_node, tmp_path: Path, caplog
) -> None:  # type: ignore[no-untyped-def]
    """96 generated conversations (``dimse_faults.corpus``), eight at a time. Every
    answer is an association answer or a documented DIMSE status; every instance
    acknowledged with Success is in the index and its file; nothing is stored that
    was not sent whole; nothing is logged as an error but pynetdicom's reports of the
    peer's mistakes; afterwards a sender is served."""
    node = _node(make_node)
    corpus = dimse_faults.corpus(corpus_seed(5), 96)
    replies: list[dimse_faults.Reply] = [dimse_faults.Reply()] * len(corpus)

    def talk(k: int) -> None:
        replies[k] = dimse_faults.converse(node.port, corpus[k])

    caplog.set_level(logging.WARNING)
    kept = _Kept()  # what the node's own log handlers write (through its filter)
    logging.getLogger().addHandler(kept)
    try:
        for start in range(0, len(corpus), 8):
            threads = [threading.Thread(target=talk, args=(k,)) for k in range(start, start + 8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    finally:
        logging.getLogger().removeHandler(kept)

    whole = {uid for stream in corpus for uid in stream.whole}
    stored = {r["sop_instance_uid"]: r for r in node.db.query("SELECT * FROM instances")}
    assert set(stored) <= whole
    answered = committed = 0
    for stream, reply in zip(corpus, replies, strict=True):
        assert reply.pdus, f"no answer at all: {stream.name}"
        assert reply.pdus[0] in (A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ABORT), stream.name
        for field, status, uid in reply.responses:
            assert field in STATUSES, (stream.name, hex(field))
            assert status in STATUSES[field], (stream.name, hex(status))
            answered += field == C_STORE_RSP
            committed += field == N_ACTION_RSP and status == 0x0000
            if field == C_STORE_RSP and status == 0x0000:
                assert uid in stored, f"acknowledged, not indexed: {stream.name}"
                path = Path(stored[uid]["path"])
                assert dcmread(path, stop_before_pixels=True).SOPInstanceUID == uid
    # The corpus reaches the store, not only the association. (How many are answered
    # varies: a peer that releases with requests queued is released at once.)
    assert answered >= 5
    # every storage commitment request answered Success is recorded, to be reported
    assert node.db.query("SELECT COUNT(*) n FROM commitments")[0]["n"] >= committed
    # and the corpus reaches storage commitment (requests, and results as a PACS reports)
    fields = [f for r in replies for f, _, _ in r.responses]
    assert fields.count(N_ACTION_RSP) + fields.count(N_EVENT_REPORT_RSP) >= 1
    assert {A_ASSOCIATE_RJ, A_ABORT} <= {r.pdus[0] for r in replies} | {
        p for r in replies for p in r.pdus
    }
    errors = [f"{r.name}: {r.getMessage()}" for r in caplog.records if _receiving_error(r)]
    assert not errors, errors
    # pynetdicom's reports of the peer's mistakes are warnings, one line each: they were
    # errors, 30 of them with a traceback
    loud = [
        f"{r.name}: {r.getMessage()}"
        for r in kept.records
        if r.levelno >= logging.ERROR and r.name != "dicom_node.jobs"
    ]
    assert not loud, loud
    assert not [r.name for r in kept.records if r.name.startswith("pynetdicom") and r.exc_text]
    assert any(r.name.startswith("pynetdicom.dul") for r in kept.records)
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
            _command("C-ECHO-RQ", "1.2.840.10008.1.1"),
            [A_ASSOCIATE_AC, A_ABORT],
            "a C-ECHO request for SOP Class 1.2.840.10008.1.1 on a presentation context",
        ),
        (
            "an unsolicited C-STORE response",
            16384,
            _command("C-STORE-RSP", XRayAngiographicImageStorage),
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


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize(
    ("name", "answer", "logged"),
    [
        ("an even context ID", A_ABORT, "a PDU that cannot be decoded (ValueError)"),
        ("a user identity of type 9", A_ABORT, "a PDU that cannot be decoded (ValueError)"),
        (
            "a context without transfer syntax",
            A_ASSOCIATE_RJ,
            "its request cannot be negotiated (IndexError)",
        ),
        (
            "a context without abstract syntax",
            A_ASSOCIATE_RJ,
            "its request cannot be negotiated (TypeError)",
        ),
        ("an unknown item", A_ABORT, None),  # pynetdicom answers, and logs, this one
    ],
)
def test_association_requests_pynetdicom_cannot_take_are_answered_and_hold_no_place(
    make_node, caplog, name, answer, logged
) -> None:  # type: ignore[no-untyped-def]
    """Item-level breaks of the association request: each is answered at once (an
    unanswered connection stayed open for as long as the peer kept it, or the
    connection was closed without a word), and none keeps a place among
    ``max_associations``: three of them, then a sender, with two places and an ACSE
    timeout of 30 s. (An association whose request was answered with an A-ABORT
    waited that long for a request that could no longer come.)"""
    node = make_node(
        max_associations=2,
        max_associations_per_host=2,
        network_timeout_s=30,
        api={"enabled": False},
        rules=[{"name": "none", "pipelines": ["minip"], "match": {"modality": ["OT"]}}],
    )
    caplog.set_level(logging.WARNING)
    _, request = dimse_faults.raw_request(name)
    for _ in range(3):
        reply = dimse_faults.converse(node.port, dimse_faults.Stream(name, request, b""), 10)
        assert reply.pdus == [answer], (name, reply.pdus)
    if logged:
        assert any(logged in r.getMessage() for r in caplog.records), name
    good = dimse_faults.instance(3)
    data = dimse_faults.store_request(1, good) + dimse_faults.release_request()
    sender = dimse_faults.Stream("sender", _request(), data)
    started = time.monotonic()
    reply = dimse_faults.converse(node.port, sender, 10)
    assert reply.pdus[0] == A_ASSOCIATE_AC and time.monotonic() - started < 10
    assert (C_STORE_RSP, 0x0000, good.SOPInstanceUID) in reply.responses


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
        dimse_faults.store_command(
            XRayAngiographicImageStorage, "1.2.826.0.1.3680043.8.498.2", 2, has_data=False
        )
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


def test_a_c_store_data_set_must_be_in_its_context_s_encoding(
    make_node, tmp_path: Path, caplog
) -> None:  # type: ignore[no-untyped-def]
    """A data set in Implicit VR on an Explicit VR context is refused 0xC000 (the
    node would store a file whose meta names an encoding its body does not use);
    the same instance in the context's encoding is stored."""
    node = _node(make_node)
    caplog.set_level(logging.WARNING)
    ds = dimse_faults.instance(3)
    body = dimse_faults.store_request(1, ds, implicit=True) + dimse_faults.store_request(1, ds)
    reply = dimse_faults.converse(node.port, dimse_faults.Stream("encoding", _request(), body))
    assert [status for _, status, _ in reply.responses] == [0xC000, 0x0000]
    assert "data set is encoded in implicit VR, but its transfer syntax" in caplog.text
    (row,) = node.db.query("SELECT * FROM instances")
    stored = dcmread(row["path"])
    assert stored.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert stored.SOPInstanceUID == ds.SOPInstanceUID
