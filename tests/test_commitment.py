"""Storage commitment (PS3.4 Annex J, Push Model) as SCP: a suite asks whether the node
holds what it sent, and takes the result on an association of the node's (the
asynchronous mode). Real associations both ways: the suite is pynetdicom, an
N-ACTION SCU and an N-EVENT-REPORT acceptor; with a real Orthanc as the requester in
tests/test_orthanc_integration.py."""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from pydicom.dataset import Dataset
from pydicom.uid import (
    CTImageStorage as CT,
)
from pydicom.uid import (
    SecondaryCaptureImageStorage,
    XRayAngiographicImageStorage,
    generate_uid,
)
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, build_role, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node.commitment import PUSH_MODEL, PUSH_MODEL_INSTANCE
from dicom_node.db import Database, TooManyListed
from dicom_node.errors import ConfigError
from dicom_node.settings import load_settings
from tests.conftest import NodeProcess, free_port, wait_for
from tests.dicomgen import xa_run
from tests.dimse_faults import commitment_info
from tests.test_cli import _cli
from tests.test_ingest import MINIP_ONLY, _send


class Suite:
    """An angio suite's storage commitment side: it asks (N-ACTION) and listens for
    the results (N-EVENT-REPORT, the node being SCP on the node's association)."""

    def __init__(self, ae_title: str = "SUITE") -> None:
        self.ae_title = ae_title
        self.port = free_port()
        self.reports: queue.Queue[tuple[str, int, Dataset]] = queue.Queue()
        self.server: Any = None

    def address(self) -> dict[str, Any]:
        return {
            "name": self.ae_title.lower(),
            "ae_title": self.ae_title,
            "host": "127.0.0.1",
            "port": self.port,
        }

    def listen(self) -> None:
        ae = AE(ae_title=self.ae_title)
        ae.add_supported_context(PUSH_MODEL, scu_role=False, scp_role=True)

        def on_report(event: Any) -> tuple[int, None]:
            self.reports.put(
                (
                    str(event.assoc.requestor.ae_title).strip(),
                    int(event.request.EventTypeID),
                    event.event_information,
                )
            )
            return 0x0000, None

        self.server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)],
        )

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    def ask(
        self,
        port: int,
        references: list[tuple[str, str]] | None,
        transaction: str | None = None,
        action_type: int = 1,
        instance: str = PUSH_MODEL_INSTANCE,
        calling: str | None = None,
    ) -> Dataset:
        """One N-ACTION; its response's status data set. The association must go on."""
        ae = AE(ae_title=calling or self.ae_title)
        ae.add_requested_context(PUSH_MODEL)
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", port, ae_title="ANGIO_NODE")
        assert assoc.is_established
        try:
            info = Dataset()
            if transaction is not None:
                info.TransactionUID = transaction
            if references is not None:
                info.ReferencedSOPSequence = []
                for sop_class, sop in references:
                    item = Dataset()
                    item.ReferencedSOPClassUID = sop_class
                    item.ReferencedSOPInstanceUID = sop
                    info.ReferencedSOPSequence.append(item)
            status, _ = assoc.send_n_action(info, action_type, PUSH_MODEL, instance)
            assert "Status" in status
            assert int(assoc.send_c_echo().Status) == 0x0000  # the association goes on
            return status
        finally:
            assoc.release()


@pytest.fixture
def suite() -> Any:
    s = Suite()
    yield s
    s.close()


def _report(suite: Suite, timeout: float = 30) -> tuple[str, int, Dataset]:
    return suite.reports.get(timeout=timeout)


def test_a_suite_is_told_which_instances_the_node_holds(make_node: Any, suite: Suite) -> None:
    """Before, the node refused the storage commitment context: a suite set to ask for
    commitment saw every run as not stored. Now the result comes on the node's own
    association: the instances held with their class are committed, one never
    received fails 0x0112, one held under another class 0x0119; asked again (the same
    Transaction UID), it is reported again."""
    suite.listen()
    node = make_node(rules=[], storage_commitment={"report_to": [suite.address()]})
    runs = [xa_run(frames=2, seed=i) for i in range(3)]
    for ds in runs:
        assert _send(node, ds, calling="SUITE") == 0x0000
    held = [(XRayAngiographicImageStorage, str(ds.SOPInstanceUID)) for ds in runs]
    never = (XRayAngiographicImageStorage, generate_uid())
    other_class = (SecondaryCaptureImageStorage, str(runs[0].SOPInstanceUID))
    transaction = generate_uid()

    status = suite.ask(node.port, [*held, never, other_class], transaction)
    assert int(status.Status) == 0x0000

    calling, event_type, info = _report(suite)
    assert calling == node.settings.ae_title
    assert event_type == 2  # failures exist
    assert info.TransactionUID == transaction
    committed = {
        (i.ReferencedSOPClassUID, i.ReferencedSOPInstanceUID) for i in info.ReferencedSOPSequence
    }
    assert committed == set(held)
    failed = {
        (i.ReferencedSOPClassUID, i.ReferencedSOPInstanceUID): int(i.FailureReason)
        for i in info.FailedSOPSequence
    }
    assert failed == {never: 0x0112, other_class: 0x0119}
    wait_for(
        lambda: node.db.status_summary()["storage_commitments"] == {"reported": 1},
        10,
        what="the result recorded as taken",
    )
    metrics = requests.get(f"http://127.0.0.1:{node.api_port}/metrics", timeout=10).text
    assert 'angio_node_storage_commitments{requester="SUITE",state="reported"} 1.0' in metrics

    # all held: event type 1, no failed sequence; the same transaction asked again
    assert int(suite.ask(node.port, held, transaction).Status) == 0x0000
    _, event_type, info = _report(suite)
    assert event_type == 1 and "FailedSOPSequence" not in info
    assert len(info.ReferencedSOPSequence) == 3


@pytest.mark.parametrize(
    ("case", "status", "words"),
    [
        ("unknown sender", 0x0124, "NOT_LISTED not in storage_commitment.report_to"),
        ("action type 2", 0x0123, "Action Type ID"),
        ("another SOP instance", 0x0117, PUSH_MODEL_INSTANCE),
        ("no transaction UID", 0x0115, "Transaction UID"),
        ("transaction UID not a UID", 0x0115, "Transaction UID"),
        ("no references", 0x0115, "Referenced SOP Sequence"),
        ("an empty sequence", 0x0115, "Referenced SOP Sequence"),
        ("a reference without its class", 0x0115, "item 2's SOP Class UID"),
        ("a reference not a UID", 0x0115, "item 1's SOP Instance UID"),
        ("more than max_instances", 0x0213, "max_instances"),
        ("another sender's transaction", 0x0210, "another sender"),
        ("more listed than max_listed_per_sender", 0x0213, "max_listed_per_sender"),
    ],
)
def test_a_request_the_node_cannot_take_is_refused_with_why(
    make_node: Any, suite: Suite, case: str, status: int, words: str
) -> None:
    """Each answered with its status and an Error Comment that says why; the
    association goes on (``Suite.ask`` echoes after), nothing is recorded, and the
    node serves the next request."""
    other = Suite("SUITE_B")
    node = make_node(
        rules=[],
        storage_commitment={
            "report_to": [suite.address(), other.address()],
            "max_instances": 3,
            "max_listed_per_sender": 3,  # the suite does not listen: its requests wait
        },
    )
    ds = xa_run(frames=2)
    assert _send(node, ds, calling="SUITE") == 0x0000
    ref = (XRayAngiographicImageStorage, str(ds.SOPInstanceUID))
    kwargs: dict[str, Any] = {"references": [ref], "transaction": generate_uid()}
    if case == "unknown sender":
        kwargs["calling"] = "NOT_LISTED"
    elif case == "action type 2":
        kwargs["action_type"] = 2
    elif case == "another SOP instance":
        kwargs["instance"] = generate_uid()
    elif case == "no transaction UID":
        kwargs["transaction"] = None
    elif case == "transaction UID not a UID":
        kwargs["transaction"] = "1.2.three"
    elif case == "no references":
        kwargs["references"] = None
    elif case == "an empty sequence":
        kwargs["references"] = []
    elif case == "a reference without its class":
        kwargs["references"] = [ref, ("", generate_uid())]
    elif case == "a reference not a UID":
        kwargs["references"] = [(XRayAngiographicImageStorage, "x" * 65)]
    elif case == "more than max_instances":
        kwargs["references"] = [ref] * 4
    elif case == "more listed than max_listed_per_sender":
        assert int(suite.ask(node.port, [ref], generate_uid()).Status) == 0x0000
        kwargs["references"] = [ref] * 3
    elif case == "another sender's transaction":
        assert int(other.ask(node.port, [ref], kwargs["transaction"]).Status) == 0x0000
    before = node.db.query("SELECT COUNT(*) n FROM commitments")[0]["n"]

    answer = suite.ask(node.port, **kwargs)
    assert int(answer.Status) == status
    assert words in str(answer.ErrorComment)
    assert len(str(answer.ErrorComment)) < 64  # an LO value: each reason fits, whole
    assert node.db.query("SELECT COUNT(*) n FROM commitments")[0]["n"] == before
    # and the next request is served
    assert int(suite.ask(node.port, [ref], generate_uid()).Status) == 0x0000


def test_an_acknowledged_request_is_reported_after_a_restart(make_node: Any, suite: Suite) -> None:
    """The suite's listener is down when it asks; the node is stopped before it could
    report, and started again: the result, as found when the request came, reaches the
    suite once it listens. Given up only after ``give_up_h``, with the reason."""
    node = make_node(rules=[], storage_commitment={"report_to": [suite.address()]})
    ds = xa_run(frames=2)
    assert _send(node, ds, calling="SUITE") == 0x0000
    transaction = generate_uid()
    assert (
        int(
            suite.ask(
                node.port, [(XRayAngiographicImageStorage, str(ds.SOPInstanceUID))], transaction
            ).Status
        )
        == 0
    )
    wait_for(
        lambda: node.db.query("SELECT attempts FROM commitments")[0]["attempts"] >= 1,
        10,
        what="a first attempt to report",
    )
    error = node.db.query("SELECT state, error FROM commitments")[0]
    assert error["state"] == "pending" and "127.0.0.1" in error["error"]
    node.stop()

    suite.listen()
    again = make_node(rules=[], storage_commitment={"report_to": [suite.address()]})
    _, event_type, info = _report(suite)
    assert event_type == 1 and info.TransactionUID == transaction
    assert info.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
    wait_for(
        lambda: again.db.status_summary()["storage_commitments"] == {"reported": 1},
        10,
        what="recorded",
    )


def test_a_result_nobody_takes_is_given_up_with_the_reason(
    make_node: Any, suite: Suite, tmp_path: Path
) -> None:
    node = make_node(
        rules=[], storage_commitment={"report_to": [suite.address()], "give_up_h": 1 / 3600}
    )
    ds = xa_run(frames=2)
    assert _send(node, ds, calling="SUITE") == 0x0000
    assert (
        int(
            suite.ask(
                node.port, [(XRayAngiographicImageStorage, str(ds.SOPInstanceUID))], generate_uid()
            ).Status
        )
        == 0
    )
    wait_for(
        lambda: node.db.status_summary()["storage_commitments"] == {"given_up": 1},
        20,
        what="given up",
    )
    row = node.db.query("SELECT error FROM commitments")[0]
    assert "give_up_h" in row["error"]
    # an operator sees it, with why, in dicom-node status
    cfg = tmp_path / "cli.toml"
    cfg.write_text(f'storage_dir = "{node.settings.storage_dir}"\n[api]\nport = {node.api_port}\n')
    out = _cli("status", "--config", str(cfg))
    assert out.returncode == 0, out.stderr
    assert "storage_commitments: given_up 1" in out.stdout
    assert "from SUITE given_up after" in out.stdout and "give_up_h" in out.stdout
    page = requests.get(f"http://127.0.0.1:{node.api_port}/", timeout=10).text
    row = page[page.index('<table id="commitments">') :].split("</table>")[0]
    assert "<td>SUITE</td><td>0</td><td>0</td><td>1</td>" in row and "give_up_h" in row


def test_settled_requests_are_forgotten_pending_ones_kept(tmp_path: Path) -> None:
    """The index keeps a request's row a week after it settled (``KEEP_SETTLED_S``),
    or until its sender's requests list more than ``max_listed`` (a sender could grow
    the index without end with new Transaction UIDs): a pending one, whatever its age,
    stays until reported or given up."""
    db = Database(tmp_path / "index.sqlite")
    uids = [generate_uid() for _ in range(3)]
    rows = [db.request_commitment(u, "SUITE", [(XRayAngiographicImageStorage, u)]) for u in uids]
    assert all(r.failed and not r.committed for r in rows)  # none of them is held
    db.commitment_reported(rows[0])
    db.commitment_given_up(rows[1], "not taken")
    # past max_listed, the sender's oldest settled request is forgotten first; its
    # requests not reported are never forgotten: a request past it is refused
    with pytest.raises(TooManyListed):
        db.request_commitment(
            generate_uid(), "SUITE", [(XRayAngiographicImageStorage, "1.2")] * 3, 3
        )
    assert len(db.query("SELECT * FROM commitments")) == 3  # rolled back
    fourth = db.request_commitment(generate_uid(), "SUITE", [(CT, "1.2")], max_listed=3)
    assert {r["transaction_uid"] for r in db.query("SELECT * FROM commitments")} == {
        uids[1],
        uids[2],
        fourth.transaction_uid,
    }
    db.commitment_reported(fourth)
    assert db.forget_commitments(before=rows[1].requested_at) == 0
    assert db.forget_commitments(before=time.time() + 1) == 2
    assert [r["transaction_uid"] for r in db.query("SELECT * FROM commitments")] == [uids[2]]


def test_who_calls_the_node_for_storage_commitment_must_be_allowed_to() -> None:
    """A destination that commits reports on its own association, and a sender in
    ``report_to`` asks on its own: one whose AE title ``allowed_calling_aets`` leaves
    out would be rejected at every association (and a destination's results kept a
    day for nothing). The start is refused, naming it."""
    pacs = CommittingPacs.destination_of(104)
    with pytest.raises(ConfigError, match=r"\['PACS'\], which allowed_calling_aets refuses"):
        load_settings(None, environ={}, destinations=[pacs], allowed_calling_aets=["SUITE"])
    load_settings(None, environ={}, destinations=[pacs], allowed_calling_aets=["SUITE", "PACS"])
    # and a sender that asks for commitment
    asks = {"report_to": [Suite("SUITE_B").address()]}
    with pytest.raises(ConfigError, match=r"\['SUITE_B'\], which allowed_calling_aets refuses"):
        load_settings(None, environ={}, storage_commitment=asks, allowed_calling_aets=["SUITE"])


def test_one_report_address_per_ae_title() -> None:
    suite = Suite().address()
    with pytest.raises(ConfigError, match="one address per AE title"):
        load_settings(None, environ={}, storage_commitment={"report_to": [suite, suite]})


def test_a_requester_whose_address_hangs_holds_back_no_other(make_node: Any, suite: Suite) -> None:
    """A suite whose listener takes the connection and never answers holds its own
    report's attempt for ``[outbox] timeout_s``; another suite's result comes at once
    all the same (one reporting thread per requester)."""
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(8)  # accepts (the kernel's backlog), never answers
    silent = {"name": "silent", "ae_title": "SILENT", "host": "127.0.0.1"}
    silent["port"] = hung.getsockname()[1]
    suite.listen()
    node = make_node(
        rules=[],
        outbox={"timeout_s": 30},
        storage_commitment={"report_to": [silent, suite.address()]},
    )
    try:
        ds = xa_run(frames=2)
        assert _send(node, ds, calling="SUITE") == 0x0000
        ref = [(XRayAngiographicImageStorage, str(ds.SOPInstanceUID))]
        assert int(Suite("SILENT").ask(node.port, ref, generate_uid()).Status) == 0x0000
        time.sleep(1)  # its attempt under way
        asked = time.monotonic()
        assert int(suite.ask(node.port, ref, generate_uid()).Status) == 0x0000
        _, event_type, _ = _report(suite, timeout=20)
        assert event_type == 1 and time.monotonic() - asked < 10
    finally:
        hung.close()


def test_a_request_of_thousands_of_instances_is_taken_and_one_past_its_bound_cut_off(
    make_node: Any, suite: Suite, caplog: Any
) -> None:
    """A data set that is not a C-STORE's is held in memory, and bounded: a storage
    commitment request's by ``max_instances`` (160 bytes each), other messages' by
    64 KiB. Before, the 64 KiB bound closed the connection of any request listing
    more than about 400 instances (a rotational series of single-frame slices). Past
    its own bound the connection is closed, with the reason in the log."""
    suite.listen()
    node = make_node(
        rules=[], storage_commitment={"report_to": [suite.address()], "max_instances": 6000}
    )
    ds = xa_run(frames=2)
    assert _send(node, ds, calling="SUITE") == 0x0000
    held = (XRayAngiographicImageStorage, str(ds.SOPInstanceUID))
    never = [(XRayAngiographicImageStorage, generate_uid()) for _ in range(4999)]
    assert int(suite.ask(node.port, [held, *never], generate_uid()).Status) == 0x0000
    _, event_type, info = _report(suite)
    assert event_type == 2 and len(info.ReferencedSOPSequence) == 1
    assert len(info.FailedSOPSequence) == 4999

    caplog.set_level(logging.WARNING)
    ae = AE(ae_title="SUITE")
    ae.add_requested_context(PUSH_MODEL)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.settings.ae_title)
    too_many = commitment_info([held] * 20_000, generate_uid())  # 1.6 MB, past 6000 x 160
    status, _ = assoc.send_n_action(too_many, 1, PUSH_MODEL, PUSH_MODEL_INSTANCE)
    assert "Status" not in status  # cut off, not answered
    wait_for(lambda: not assoc.is_established, 10, what="the connection closed")
    wait_for(
        lambda: any(
            "storage commitment request or result (storage_commitment.max_instances)"
            in r.getMessage()
            and "SUITE" in r.getMessage()
            for r in caplog.records
        ),
        10,
        what="the reason logged",
    )
    assert int(suite.ask(node.port, [held], generate_uid()).Status) == 0x0000  # served after


class CommittingPacs:
    """A PACS that stores results and commits to them (Storage Commitment SCP): it
    reports on an association of its own to the node, once ``release`` is set; the
    first time it is asked about an instance of ``refuse_once`` it fails it (0x0110)."""

    def __init__(self, node_port: int) -> None:
        self.node_port = node_port
        self.port = free_port()
        self.stored: list[str] = []
        self.asked: list[int] = []  # instances per request
        self.release = threading.Event()
        self.refuse_once: set[str] = set()
        self.answers: list[int] = []  # the node's statuses to its reports
        ae = AE(ae_title="PACS")
        for cx in StoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(PUSH_MODEL)
        self.server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._store), (evt.EVT_N_ACTION, self._action)],
        )

    def destination(self) -> dict[str, Any]:
        return self.destination_of(self.port)

    @staticmethod
    def destination_of(port: int) -> dict[str, Any]:
        return {
            "kind": "dimse",
            "name": "pacs",
            "host": "127.0.0.1",
            "port": port,
            "ae_title": "PACS",
            "storage_commitment": True,
        }

    def _store(self, event: Any) -> int:
        self.stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def _action(self, event: Any) -> tuple[int, None]:
        info = event.action_information
        refs = [
            (i.ReferencedSOPClassUID, i.ReferencedSOPInstanceUID)
            for i in info.ReferencedSOPSequence
        ]
        self.asked.append(len(refs))
        threading.Thread(target=self._report, args=(info.TransactionUID, refs), daemon=True).start()
        return 0x0000, None

    def _report(self, transaction: str, refs: list[tuple[str, str]]) -> None:
        self.release.wait(60)
        refused = [r for r in refs if r[1] in self.refuse_once]
        self.refuse_once -= {r[1] for r in refused}
        info = Dataset()
        info.TransactionUID = transaction
        info.ReferencedSOPSequence = [
            commitment_info([r], None).ReferencedSOPSequence[0] for r in refs if r not in refused
        ]
        if refused:
            info.FailedSOPSequence = commitment_info(refused, None).ReferencedSOPSequence
            for item in info.FailedSOPSequence:
                item.FailureReason = 0x0110
        ae = AE(ae_title="PACS")
        ae.add_requested_context(PUSH_MODEL)
        role = build_role(PUSH_MODEL, scp_role=True)
        assoc = ae.associate("127.0.0.1", self.node_port, ae_title="ANGIO_NODE", ext_neg=[role])
        assert assoc.is_established
        status, _ = assoc.send_n_event_report(
            info, 2 if refused else 1, PUSH_MODEL, PUSH_MODEL_INSTANCE
        )
        self.answers.append(int(status.Status))
        assoc.release()

    def close(self) -> None:
        self.server.shutdown()


def test_results_are_kept_until_the_destination_commits_to_them(make_node: Any) -> None:
    """A destination set to commit (``storage_commitment = true``) is asked, after the
    results are stored there, to commit to them, and reports on its own association.
    Until it has, retention keeps the results' files (a purged run's instances go, its
    results stay); one it did not commit to is sent again and asked about again;
    once all are committed to, the files go at the next pass."""
    port = free_port()
    pacs = CommittingPacs(port)
    try:
        node = make_node(
            port=port,
            rules=MINIP_ONLY,
            destinations=[pacs.destination()],
            storage_commitment={"wait_s": 60},
        )
        run = xa_run(frames=4)
        assert _send(node, run, calling="SUITE") == 0x0000
        wait_for(lambda: pacs.asked, 60, what="the PACS asked to commit")
        rows = node.db.query("SELECT * FROM outbox")
        assert {r["commitment"] for r in rows} == {"awaiting"} and len(pacs.stored) == len(rows)
        pacs.refuse_once = {rows[0]["sop_instance_uid"]}

        # purged while the PACS has not committed: the instance goes, the results stay
        (held,) = node.db.run_instances(str(run.SOPInstanceUID))
        node.retention.purge_now([held.run_id], "test")
        assert not held.path.exists()
        results = [Path(r["path"]) for r in rows]
        assert all(p.exists() for p in results)

        pacs.release.set()
        wait_for(
            lambda: (
                {r["commitment"] for r in node.db.query("SELECT * FROM outbox")} == {"committed"}
            ),
            60,
            what="every result committed to, the refused one after it was sent again",
        )
        assert pacs.answers and set(pacs.answers) == {0x0000}
        assert len(pacs.asked) >= 2 and pacs.stored.count(rows[0]["sop_instance_uid"]) == 2
        assert (
            node.db.query("SELECT commit_failures FROM outbox WHERE id=?", (rows[0]["id"],))[0][0]
            == 1
        )
        assert node.db.status_summary()["result_commitments"] == {"committed": len(rows)}
        page = requests.get(f"http://127.0.0.1:{node.api_port}/", timeout=10).text
        assert f"{len(rows)} committed, 0 awaited" in page
        metrics = requests.get(f"http://127.0.0.1:{node.api_port}/metrics", timeout=10).text
        gauge = 'angio_node_result_commitments{commitment="committed",destination="pacs"}'
        assert f"{gauge} {len(rows)}.0" in metrics
        node.retention.run()
        assert not any(p.exists() for p in results)
    finally:
        pacs.close()


@pytest.mark.parametrize(
    ("case", "status", "words"),
    [
        ("a transaction never asked", 0x0115, "no result of the node"),
        ("from an AE that is no destination", 0x0115, "no result of the node"),
        ("event type 3", 0x0113, "Event Type ID 3"),
        ("no transaction UID", 0x0115, "Transaction UID"),
    ],
)
def test_a_result_the_node_did_not_ask_for_is_refused(
    make_node: Any, case: str, status: int, words: str
) -> None:
    """A storage commitment result (N-EVENT-REPORT) applies only to what the node asked
    of the destination whose AE title reports it; anything else is answered with a
    failure and changes nothing."""
    port = free_port()
    pacs = CommittingPacs(port)
    try:
        node = make_node(port=port, rules=MINIP_ONLY, destinations=[pacs.destination()])
        assert _send(node, xa_run(frames=3), calling="SUITE") == 0x0000
        wait_for(lambda: pacs.asked, 60, what="the PACS asked to commit")
        asked = node.db.query("SELECT commit_uid FROM outbox")[0]["commit_uid"]
        info = Dataset()
        info.TransactionUID = asked if case != "a transaction never asked" else generate_uid()
        if case == "no transaction UID":
            del info.TransactionUID
        info.ReferencedSOPSequence = commitment_info(
            [
                (r["sop_class_uid"], r["sop_instance_uid"])
                for r in node.db.query("SELECT * FROM outbox")
            ],
            None,
        ).ReferencedSOPSequence
        ae = AE(ae_title="OTHER" if case == "from an AE that is no destination" else "PACS")
        ae.add_requested_context(PUSH_MODEL)
        assoc = ae.associate(
            "127.0.0.1",
            port,
            ae_title="ANGIO_NODE",
            ext_neg=[build_role(PUSH_MODEL, scp_role=True)],
        )
        answer, _ = assoc.send_n_event_report(
            info, 3 if case == "event type 3" else 1, PUSH_MODEL, PUSH_MODEL_INSTANCE
        )
        assoc.release()
        assert int(answer.Status) == status and words in str(answer.ErrorComment)
        assert {r["commitment"] for r in node.db.query("SELECT * FROM outbox")} == {"awaiting"}
    finally:
        pacs.close()


def test_results_no_longer_awaited_when_the_destination_stops_committing(make_node: Any) -> None:
    """A destination no longer asked to commit (its setting off, or gone): at the next
    start its results stop waiting for a commitment that will not be asked for, so
    that retention can take their files."""
    port = free_port()
    pacs = CommittingPacs(port)  # never reports (release is not set)
    try:
        node = make_node(port=port, rules=MINIP_ONLY, destinations=[pacs.destination()])
        assert _send(node, xa_run(frames=3), calling="SUITE") == 0x0000
        wait_for(lambda: pacs.asked, 60, what="the PACS asked to commit")
        node.stop()
        plain = {**pacs.destination(), "storage_commitment": False}
        again = make_node(port=port, rules=MINIP_ONLY, destinations=[plain])
        rows = again.db.query("SELECT commitment, error FROM outbox")
        assert {r["commitment"] for r in rows} == {"given_up"}
        assert all("no longer asked to commit" in r["error"] for r in rows)
    finally:
        pacs.close()


@pytest.mark.slow
def test_an_acknowledged_request_survives_a_kill_9(tmp_path: Path, suite: Suite) -> None:
    """The node, a process of its own, answers a request Success while the suite's
    listener is down, and is killed (-9) before it could report: restarted, it reports
    the result once the suite listens."""
    port = free_port()
    config = tmp_path / "node.toml"
    config.write_text(
        f'ae_title = "ANGIO_NODE"\nport = {port}\nstorage_dir = "{tmp_path / "node"}"\n'
        "min_free_bytes = 0\nrules = []\n[api]\nenabled = false\n"
        "[outbox]\nbackoff_base_s = 0.2\nbackoff_max_s = 1.0\npoll_interval_s = 0.1\n"
        "[[storage_commitment.report_to]]\n"
        f'name = "suite"\nae_title = "SUITE"\nhost = "127.0.0.1"\nport = {suite.port}\n'
    )
    node = NodeProcess(config)
    node.start()
    try:
        ds = xa_run(frames=2)
        ae = AE(ae_title="SUITE")
        ae.add_requested_context(XRayAngiographicImageStorage)
        assoc = ae.associate("127.0.0.1", port, ae_title="ANGIO_NODE")
        assert int(assoc.send_c_store(ds).Status) == 0x0000
        assoc.release()
        transaction = generate_uid()
        ref = [(XRayAngiographicImageStorage, str(ds.SOPInstanceUID))]
        assert int(suite.ask(port, ref, transaction).Status) == 0x0000
        node.kill()

        suite.listen()
        node.start()
        _, event_type, info = _report(suite, timeout=60)
        assert event_type == 1 and info.TransactionUID == transaction
    finally:
        node.terminate()
