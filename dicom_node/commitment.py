"""Storage commitment (PS3.4 Annex J, Push Model), both ways.

**As SCP** (``StorageCommitment``): a sender asks whether the node has taken
responsibility for instances it sent (N-ACTION); the node answers at once whether it
recorded the request, and reports the result (N-EVENT-REPORT) on a new association
to the sender's address in ``[storage_commitment] report_to``: the asynchronous mode
that modalities and Orthanc expect (the requester may release its association as
soon as the N-ACTION is answered). An instance is committed when the index holds it
with the SOP Class the request names: the node indexes an instance only once its
file was written, synced and renamed into the spool, before it answered the C-STORE
(or STOW-RS) with Success. What the index holds is read when the request comes, in
the transaction that records it; the result is kept with the request, so that a node
stopped before it reported reports the same result after its restart. Committed
instances are kept as every received instance is (until their run is processed and
``[retention]`` takes it): docs/deployment.md says so, as PS3.2 asks of a
conformance statement.

**As SCU** (``ResultCommitment``): a destination with ``storage_commitment = true``
is asked to commit to the results it stored, and reports on its own association;
retention keeps a result's file until it has, and one it did not commit to is sent
again.

A request or report the node cannot take is answered with a failure status and an
Error Comment (README, "Behaviour on bad input"); the association goes on.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import build_role
from pynetdicom.presentation import build_context

from dicom_node.db import Commitment, Database, DuplicateTransaction, TooManyListed, now
from dicom_node.diskfull import Waiting, storage_fault
from dicom_node.errors import DeliveryError
from dicom_node.loops import Loops
from dicom_node.senders import associate
from dicom_node.settings import DimseDestination, Settings
from dicom_node.sopclasses import UID_RE

log = logging.getLogger(__name__)

PUSH_MODEL = "1.2.840.10008.1.20.1"
PUSH_MODEL_INSTANCE = "1.2.840.10008.1.20.1.1"  # its well-known SOP Instance
REQUEST_COMMITMENT = 1  # Action Type ID
ALL_COMMITTED, FAILURES_EXIST = 1, 2  # Event Type IDs
# N-ACTION statuses (PS3.7 C)
SUCCESS = 0x0000
PROCESSING_FAILURE = 0x0110
INVALID_ARGUMENT = 0x0115
INVALID_INSTANCE = 0x0117
NO_SUCH_ACTION = 0x0123
NOT_AUTHORISED = 0x0124
DUPLICATE_INVOCATION = 0x0210
RESOURCE_LIMITATION = 0x0213

BATCH = 16
KEEP_SETTLED_S = 7 * 86400  # rows of requests reported (or given up) are kept this long


class Refused(Exception):
    """A request or report the node does not take: its status, and why (an Error
    Comment, an LO value: each reason is written to fit its 64 characters)."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status

    def answer(self, what: str, calling_aet: str) -> Dataset:
        """The response's status data set, logged with who sent ``what``."""
        log.warning("%s from %s refused (0x%04X): %s", what, calling_aet, self.status, self)
        status = Dataset()
        status.Status = self.status
        status.ErrorComment = str(self)[:64]
        return status


@contextmanager
def _decoding(what: str) -> Iterator[None]:
    """Reading a peer's data set: what pydicom raises on its bytes is a refusal (0x0115)."""
    try:
        yield
    except Refused:
        raise
    except Exception as exc:  # noqa: BLE001 - pydicom decoding a peer's bytes
        raise Refused(
            INVALID_ARGUMENT, f"{what} cannot be decoded ({type(exc).__name__})"
        ) from None


def _storage_refusal(exc: Exception, status: int) -> Exception:
    """``exc`` as a refusal with ``status`` when it is the disk's (full, read-only,
    failing: the index cannot record now); else ``exc`` itself (a defect)."""
    fault = storage_fault(exc)
    return exc if fault is None else Refused(status, f"cannot record it now: storage {fault}")


def _uid(value: Any, what: str) -> str:
    text = str(value or "").strip()
    if not text or len(text) > 64 or not UID_RE.match(text):
        raise Refused(INVALID_ARGUMENT, f"{what}: missing or not a UID")
    return text


def parse_request(
    action_type: Any, instance_uid: Any, information: Callable[[], Dataset | None], limit: int
) -> tuple[str, list[tuple[str, str]]]:
    """The Transaction UID and the (SOP Class, SOP Instance) UIDs a Storage Commitment
    request lists, or ``Refused`` with the status and why."""
    if action_type != REQUEST_COMMITMENT:
        raise Refused(NO_SUCH_ACTION, f"Action Type ID {action_type}: only 1 (request commitment)")
    if str(instance_uid or "") != PUSH_MODEL_INSTANCE:
        raise Refused(INVALID_INSTANCE, f"Requested SOP Instance UID must be {PUSH_MODEL_INSTANCE}")
    with _decoding("Action Information"):
        ds = information()
        if ds is None:
            raise Refused(INVALID_ARGUMENT, "no Action Information")
        transaction = _uid(ds.get("TransactionUID"), "Transaction UID (0008,1195)")
        items = ds.get("ReferencedSOPSequence")
        if not items:
            raise Refused(INVALID_ARGUMENT, "Referenced SOP Sequence (0008,1199) is empty")
        if len(items) > limit:
            raise Refused(
                RESOURCE_LIMITATION,
                f"{len(items)} instances listed, over storage_commitment.max_instances",
            )
        references = [
            (
                _uid(item.get("ReferencedSOPClassUID"), f"item {i + 1}'s SOP Class UID"),
                _uid(item.get("ReferencedSOPInstanceUID"), f"item {i + 1}'s SOP Instance UID"),
            )
            for i, item in enumerate(items)
        ]
    return transaction, references


def event_information(c: Commitment) -> tuple[int, Dataset]:
    """The N-EVENT-REPORT's Event Type ID and Event Information (PS3.4 J.3.3.1)."""
    ds = Dataset()
    ds.TransactionUID = c.transaction_uid
    if c.committed:
        ds.ReferencedSOPSequence = [_item(cls, sop) for cls, sop in c.committed]
    if c.failed:
        ds.FailedSOPSequence = [_item(cls, sop, why) for cls, sop, why in c.failed]
    return (FAILURES_EXIST if c.failed else ALL_COMMITTED), ds


def _item(sop_class: str, sop: str, failure: int | None = None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop
    if failure is not None:
        item.FailureReason = failure
    return item


class StorageCommitment(Loops):
    """Records requests (``request``, from the storage SCP's N-ACTION handler) and
    reports their results from a thread per requester, retried with the outbox's
    backoff until taken or ``give_up_h`` has passed."""

    def __init__(self, db: Database, settings: Settings) -> None:
        super().__init__()
        self.db = db
        self.settings = settings
        # One thread per requester, so that one whose address hangs (each attempt
        # waits up to [outbox] timeout_s) holds back no other's results; one more
        # gives up those of requesters no longer listed.
        titles = [p.ae_title for p in settings.storage_commitment.report_to]
        self.threads = [
            threading.Thread(target=self._loop, args=(t,), name=f"commitment-{t}", daemon=True)
            for t in titles
        ] + [threading.Thread(target=self._loop, args=(None,), name="commitment", daemon=True)]
        self._forgotten_at = 0.0

    # -- N-ACTION ------------------------------------------------------------
    def request(
        self,
        calling_aet: str,
        action_type: Any,
        instance_uid: Any,
        information: Callable[[], Dataset | None],
    ) -> Dataset:
        """The N-ACTION response's status (and Error Comment) for a request from
        ``calling_aet``; Success once it is recorded in the index."""
        cfg = self.settings.storage_commitment
        status = Dataset()
        try:
            if cfg.address_of(calling_aet) is None:
                raise Refused(NOT_AUTHORISED, f"{calling_aet} not in storage_commitment.report_to")
            transaction, references = parse_request(
                action_type, instance_uid, information, cfg.max_instances
            )
            try:
                c = self.db.request_commitment(
                    transaction, calling_aet, references, cfg.max_listed_per_sender
                )
            except DuplicateTransaction:
                raise Refused(
                    DUPLICATE_INVOCATION, "Transaction UID is another sender's request"
                ) from None
            except TooManyListed as many:
                raise Refused(
                    RESOURCE_LIMITATION,
                    f"{many} listed in requests not reported: max_listed_per_sender",
                ) from None
            except Exception as exc:
                raise _storage_refusal(exc, RESOURCE_LIMITATION) from None
        except Refused as refused:
            return refused.answer("storage commitment request", calling_aet)
        log.info(
            "storage commitment %s from %s: %d of %d instance(s) held",
            c.transaction_uid,
            calling_aet,
            len(c.committed),
            len(references),
        )
        self.wake.set()
        status.Status = SUCCESS
        return status

    # -- N-EVENT-REPORT ------------------------------------------------------
    def _loop(self, requester: str | None) -> None:
        full = Waiting(f"storage commitment ({requester or 'other'})", self.db)
        while not self.stop_event.is_set():
            try:
                busy = self.report_due(requester)
                if requester is None and now() - self._forgotten_at > 3600:
                    self.db.forget_commitments(now() - KEEP_SETTLED_S)
                    self._forgotten_at = now()
                full.passed()
            except Exception as exc:  # noqa: BLE001 - a defect must not end the thread
                if full.met(exc):
                    self.stop_event.wait(full.delay_s)
                    continue
                log.exception("storage commitment: unexpected error; going on")
                busy = False
            if not busy:
                self.wake.wait(self.settings.outbox.poll_interval_s)
                self.wake.clear()

    def report_due(self, requester: str | None = None) -> bool:
        """Report one batch of the results due to ``requester`` (None: give up those
        of requesters no longer listed); True when any was settled or deferred."""
        listed = [p.ae_title for p in self.settings.storage_commitment.report_to]
        due = self.db.due_commitments(BATCH, requester, not_of=listed)
        for c in due:
            if self.stop_event.is_set():
                break
            self._report(c)
        return bool(due)

    def _report(self, c: Commitment) -> None:
        cfg = self.settings.storage_commitment
        peer = cfg.address_of(c.calling_aet)
        if peer is None:
            why = f"no address for {c.calling_aet} in [[storage_commitment.report_to]] any more"
        elif now() - c.requested_at > cfg.give_up_h * 3600:
            why = f"not taken in {cfg.give_up_h:g} h (storage_commitment.give_up_h)"
        else:
            try:
                self._send(peer, c)
            except (DeliveryError, OSError) as exc:
                outbox = self.settings.outbox
                delay = min(outbox.backoff_base_s * 2 ** min(c.attempts, 20), outbox.backoff_max_s)
                self.db.commitment_retry(c, str(exc), delay)
                log.warning(
                    "storage commitment %s: result not taken by %s, again in %.3g s: %s",
                    c.transaction_uid,
                    c.calling_aet,
                    delay,
                    exc,
                )
                return
            self.db.commitment_reported(c)
            log.info(
                "storage commitment %s: result reported to %s (%d committed, %d failed)",
                c.transaction_uid,
                c.calling_aet,
                len(c.committed),
                len(c.failed),
            )
            return
        self.db.commitment_given_up(c, why)
        log.error(
            "storage commitment %s from %s given up: %s", c.transaction_uid, c.calling_aet, why
        )

    def _send(self, peer: Any, c: Commitment) -> None:
        timeout = self.settings.outbox.timeout_s
        assoc = associate(
            peer,
            [build_context(PUSH_MODEL)],
            self.settings.ae_title,
            timeout,
            # the node is the SCP of Storage Commitment on an association it requests
            ext_neg=[build_role(PUSH_MODEL, scp_role=True)],
        )
        try:
            event_type, info = event_information(c)
            try:
                status, _ = assoc.send_n_event_report(
                    info, event_type, PUSH_MODEL, PUSH_MODEL_INSTANCE
                )
            except ValueError as exc:  # no context on which the node is SCP
                raise DeliveryError(
                    f"{peer.name} did not accept the node as SCP of Storage Commitment "
                    f"(SCP/SCU role selection): {exc}"
                ) from None
            if not status or "Status" not in status:
                raise DeliveryError(f"{peer.name}: no N-EVENT-REPORT response (connection lost)")
            if int(status.Status) != SUCCESS:
                raise DeliveryError(
                    f"{peer.name} answered the N-EVENT-REPORT 0x{int(status.Status):04X}"
                )
        finally:
            if assoc.is_established:
                assoc.release()


# -- the node as SCU: destinations that commit to the results it sent -------------
ASK_BATCH = 1000  # results asked for in one request
# N-EVENT-REPORT response statuses (PS3.7 10.1.1.1.8)
NO_SUCH_EVENT_TYPE = 0x0113


def _uids(items: Any) -> list[str]:
    return [str(i.get("ReferencedSOPInstanceUID", "")) for i in items or []]


class ResultCommitment(Loops):
    """Asks each destination whose ``storage_commitment`` is set to commit to the
    results the node sent it (one thread each), and applies the results it reports
    (``report``, from the storage SCP's N-EVENT-REPORT handler): committed, or sent
    again (failed at ``storage_commitment.max_failures``). A result not committed to
    keeps its files (retention waits for it) until ``give_up_h``."""

    def __init__(self, db: Database, settings: Settings) -> None:
        super().__init__()
        self.db = db
        self.settings = settings
        self.destinations = [
            d
            for d in settings.destinations
            if isinstance(d, DimseDestination) and d.storage_commitment
        ]
        self.threads = [
            threading.Thread(target=self._loop, args=(d,), name=f"commit-ask-{d.name}", daemon=True)
            for d in self.destinations
        ]

    def start(self) -> None:
        try:
            gone = self.db.commitment_no_longer_awaited([d.name for d in self.destinations])
        except Exception as exc:  # a full or failing disk must not stop the start
            if storage_fault(exc) is None:
                raise
            log.warning("results awaiting a storage commitment not checked now: %s", exc)
            gone = 0
        if gone:
            log.warning(
                "%d result(s) awaited the storage commitment of a destination no longer "
                "asked to commit: their files may go",
                gone,
            )
        super().start()

    def _loop(self, dest: Any) -> None:
        full = Waiting(f"storage commitment of {dest.name}", self.db)
        tries = 0
        while not self.stop_event.is_set():
            try:
                busy, tries = self.ask_due(dest, tries)
                full.passed()
            except Exception as exc:  # noqa: BLE001 - a defect must not end the thread
                if full.met(exc):
                    self.stop_event.wait(full.delay_s)
                    continue
                log.exception("storage commitment of %s: unexpected error; going on", dest.name)
                busy = False
            if not busy:
                self.stop_event.wait(self.settings.outbox.poll_interval_s)

    def ask_due(self, dest: Any, tries: int = 0) -> tuple[bool, int]:
        """Give up what waited too long, then ask for one batch of what is due;
        (anything asked, the tries that failed in a row)."""
        cfg = self.settings.storage_commitment
        gone = self.db.results_not_committed(
            dest.name,
            now() - cfg.give_up_h * 3600,
            f"{dest.name} did not commit to it in {cfg.give_up_h:g} h "
            "(storage_commitment.give_up_h): its files may go",
        )
        if gone:
            log.error("%s: %d result(s) never committed to: given up", dest.name, gone)
        due = self.db.awaiting_commitment(dest.name, min(ASK_BATCH, cfg.max_instances))
        if not due:
            return False, tries
        transaction = generate_uid()
        ids = [d.id for d in due]
        self.db.commitment_asked(ids, transaction, cfg.wait_s)
        info = Dataset()
        info.TransactionUID = transaction
        info.ReferencedSOPSequence = [_item(d.sop_class_uid, d.sop_instance_uid) for d in due]
        try:
            self._ask(dest, info)
        except (DeliveryError, OSError) as exc:
            outbox = self.settings.outbox
            delay = min(outbox.backoff_base_s * 2 ** min(tries, 20), outbox.backoff_max_s)
            self.db.commitment_not_asked(ids, delay)
            log.warning(
                "storage commitment of %d result(s) not asked of %s, again in %.3g s: %s",
                len(ids),
                dest.name,
                delay,
                exc,
            )
            return True, tries + 1
        log.info(
            "storage commitment %s: %d result(s) asked of %s", transaction, len(ids), dest.name
        )
        return True, 0

    def _ask(self, dest: Any, info: Dataset) -> None:
        assoc = associate(
            dest,
            [build_context(PUSH_MODEL)],
            self.settings.ae_title,
            self.settings.outbox.timeout_s,
        )
        try:
            try:
                status, _ = assoc.send_n_action(
                    info, REQUEST_COMMITMENT, PUSH_MODEL, PUSH_MODEL_INSTANCE
                )
            except ValueError:  # the context was not accepted
                raise DeliveryError(
                    f"{dest.name} does not accept Storage Commitment Push Model"
                ) from None
            if not status or "Status" not in status:
                raise DeliveryError(f"{dest.name}: no N-ACTION response (connection lost)")
            if int(status.Status) != SUCCESS:
                comment = str(status.get("ErrorComment", "") or "")
                raise DeliveryError(
                    f"{dest.name} answered the request 0x{int(status.Status):04X} {comment}".strip()
                )
        finally:
            if assoc.is_established:
                assoc.release()

    def report(
        self, calling_aet: str, event_type: Any, information: Callable[[], Dataset | None]
    ) -> Dataset:
        """The N-EVENT-REPORT response's status for a destination's result: applied to
        the results asked of the destinations whose AE title ``calling_aet`` is."""
        status = Dataset()
        names = [d.name for d in self.destinations if d.ae_title == calling_aet]
        try:
            if event_type not in (ALL_COMMITTED, FAILURES_EXIST):
                raise Refused(NO_SUCH_EVENT_TYPE, f"Event Type ID {event_type}: only 1 or 2")
            with _decoding("Event Information"):
                ds = information() or Dataset()
                transaction = _uid(ds.get("TransactionUID"), "Transaction UID")
                committed = _uids(ds.get("ReferencedSOPSequence"))
                failed: dict[str, str] = {}
                for item in ds.get("FailedSOPSequence") or []:
                    why = f"0x{int(item.get('FailureReason', 0)):04X}"
                    failed[str(item.get("ReferencedSOPInstanceUID", ""))] = why
            try:
                done, again, given = self.db.commitment_result(
                    transaction,
                    names,
                    committed,
                    failed,
                    self.settings.storage_commitment.max_failures,
                )
            except Exception as exc:  # it is asked about again after wait_s
                raise _storage_refusal(exc, PROCESSING_FAILURE) from None
            if not (done or again or given):
                raise Refused(INVALID_ARGUMENT, "no result of the node was asked under this UID")
        except Refused as refused:
            return refused.answer("storage commitment result", calling_aet)
        log.info(
            "storage commitment %s from %s: %d result(s) committed to, %d sent again, %d failed",
            transaction,
            calling_aet,
            done,
            again,
            given,
        )
        status.Status = SUCCESS
        return status
