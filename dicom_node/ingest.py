"""Ingest: the one function that takes a received instance, for C-STORE and
STOW-RS alike, and the one place where what happens to it becomes a DIMSE status.

It only persists: the spool checks and stores the instance, and a run that is
complete on arrival (a multi-frame 2D instance) is marked complete. Routing
and everything after it happen in other stages, woken by ``on_complete``.
Every answer is also told to ``observe`` (the metrics and the audit trail).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicom_node.arrivals import InFlight
from dicom_node.completion import CompletionRule
from dicom_node.db import Database
from dicom_node.diskfull import describe, storage_fault
from dicom_node.errors import RejectedInstance
from dicom_node.settings import is_ae_title
from dicom_node.spool import Requested, Spool, Stored

log = logging.getLogger(__name__)

SUCCESS = 0x0000
# (receipt, source, transport "dimse"/"stow", bytes received, peer address)
Observer = Callable[["Receipt", str, str, int, str], None]


@dataclass(frozen=True)
class Receipt:
    status: int  # the DIMSE status; STOW-RS answers it as the Failure Reason
    reason: str
    stored: Stored | None = None

    @property
    def ok(self) -> bool:
        return self.status == SUCCESS


class Refusals:
    """The last refusals of instances whose SOP Instance UID was known, in memory (since
    the node started, the newest ``size``): ``GET /refusals?instance=UID`` answers why
    an instance was refused. The Orthanc plugin asks it of a STOW-RS forward that
    failed: Orthanc's STOW-RS client tells a refusal for good (409) from a network fault
    in no word of its error, and the instance was sent again ``MaxAttempts`` times."""

    def __init__(self, size: int = 10_000) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._by_uid: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def note(self, sop_instance_uid: str, status: int, reason: str, source: str) -> None:
        if not sop_instance_uid:
            return
        with self._lock:
            self._by_uid.pop(sop_instance_uid, None)
            self._by_uid[sop_instance_uid] = {
                "sop_instance_uid": sop_instance_uid,
                "status": f"0x{status:04X}",
                "reason": reason,
                "source": source,
                "at": time.time(),
            }
            while len(self._by_uid) > self.size:
                self._by_uid.popitem(last=False)

    def stored(self, sop_instance_uid: str) -> None:
        """Stored since: no longer refused."""
        with self._lock:
            self._by_uid.pop(sop_instance_uid, None)

    def get(self, sop_instance_uid: str) -> dict[str, Any] | None:
        with self._lock:
            found = self._by_uid.get(sop_instance_uid)
            return dict(found) if found else None


def sender_of(source: str, named: str, forwarders: Collection[str]) -> str:
    """Whom an instance is from, for the senders' turns and the disk's reserve: the
    sender a forwarder in ``forwarders`` names (``named``: a C-STORE's Move Originator
    AE Title, a STOW-RS request's ``X-Angio-Sender``), else ``source`` itself (the
    calling AE title, or the STOW-RS sender). What another sender names is ignored: it
    could otherwise name a new sender for each run, and take every turn."""
    named = named.strip()
    if not named or source not in forwarders:
        return source
    if not is_ae_title(named):
        log.warning("%s named a sender that is not an AE title: taken as its own", source)
        return source
    return named


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


class Ingest:
    def __init__(
        self,
        spool: Spool,
        db: Database,
        rule: CompletionRule,
        on_complete: Callable[[], None] = lambda: None,
        observe: Observer = lambda *_: None,
        forwarders: Collection[str] = (),
    ) -> None:
        self.spool = spool
        self.forwarders = frozenset(forwarders)
        self.db = db
        self.rule = rule
        self.on_complete = on_complete
        self.observe = observe
        # data sets still arriving, by C-STORE (``scp._Arrival``) or STOW-RS
        # (``stow.iter_part_files``), until stored or refused: the completion sweep
        # leaves their series open
        self.in_flight = InFlight()
        self.refusals = Refusals()

    def receive(
        self,
        data: bytes | Path,
        requested: Requested,
        source: str,
        transport: str = "dimse",
        peer: str = "",
        named_sender: str = "",
    ) -> Receipt:
        """Store one instance, given as bytes or as the file the SCP wrote it to (which
        is moved into the spool); ``source`` is the calling AE title (or the STOW-RS
        sender); ``requested`` is what a C-STORE request named, which the data set
        must be; ``named_sender``: the sender a forwarder names (:func:`sender_of`)."""
        size = len(data) if isinstance(data, bytes) else _size(data)
        sender = sender_of(source, named_sender, self.forwarders)
        receipt = self._receive(data, requested, source, sender)
        if receipt.stored is not None:
            self.refusals.stored(receipt.stored.sop_instance_uid)
        else:
            self.refusals.note(requested.sop_instance, receipt.status, receipt.reason, source)
        self.observe(receipt, source, transport, size, peer)
        return receipt

    def refuse(
        self,
        fault: BaseException,
        requested: Requested,
        source: str,
        transport: str = "dimse",
        peer: str = "",
        size: int = 0,
    ) -> Receipt:
        """The answer to an instance whose data could not be written as it arrived
        (``fault``: the disk's error, or ``OutOfResources``); ``size``: what was
        written of it."""
        receipt = self._refusal(fault, source)
        self.refusals.note(requested.sop_instance, receipt.status, receipt.reason, source)
        log.info("instance %s from %s not written as it arrived", requested.sop_instance, source)
        self.observe(receipt, source, transport, size, peer)
        return receipt

    def _refusal(self, exc: BaseException, source: str) -> Receipt:
        """The status an error met while storing becomes, logged."""
        if isinstance(exc, RejectedInstance):
            log.warning("instance from %s refused (0x%04X): %s", source, exc.status, exc.reason)
            return Receipt(exc.status, exc.reason)
        fault = storage_fault(exc)  # the spool's files or the index, full or failing
        if fault is not None:
            reason = f"cannot store: {describe(fault)}: {exc}"
            log.warning("instance from %s refused (0xA700): %s", source, reason)
            return Receipt(RejectedInstance.OUT_OF_RESOURCES, reason)
        if isinstance(exc, OSError):
            reason = f"cannot store: {exc}"
            log.error("instance from %s failed (0x0110): %s", source, reason)
            return Receipt(RejectedInstance.PROCESSING_FAILURE, reason)
        reason = f"internal error while storing: {type(exc).__name__}: {exc}"
        log.error("instance from %s failed (0x0110): %s", source, reason, exc_info=exc)
        return Receipt(RejectedInstance.PROCESSING_FAILURE, reason)

    def _receive(
        self, data: bytes | Path, requested: Requested, source: str, sender: str
    ) -> Receipt:
        try:
            stored = self.spool.store(data, requested, source, sender)
        except Exception as exc:  # noqa: BLE001 - any defect of ours must still answer, not hang
            return self._refusal(exc, source)
        log.info(
            "stored %s from %s%s (run %s%s)",
            stored.sop_instance_uid,
            source,
            "" if sender == source else f" for {sender}",
            stored.run_id,
            ", duplicate" if stored.duplicate else "",
        )
        if (
            self.rule.complete_on_arrival(stored)
            and not stored.duplicate
            and self.db.complete_run(
                stored.run_id,
                "concatenation whole" if stored.whole_concatenation else "single-instance run",
            )
        ):
            self.on_complete()
        return Receipt(SUCCESS, "stored", stored)
