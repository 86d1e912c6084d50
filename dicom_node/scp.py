"""The storage SCP: C-ECHO and C-STORE. The C-STORE handler only persists:
``dicom_node.ingest`` stores the bytes and answers the DIMSE status.

With ``[tls] dicom = true`` the port speaks DICOM over TLS (PS3.15 B.1, the
secure transport profile): the handshake runs in the connection's own thread
under a timeout, so a plain client, or one that connects and says nothing, is
refused without holding up anyone else. ``max_associations`` bounds the
associations served at once; beyond it pynetdicom rejects with "local limit
exceeded". Every association accepted or rejected goes to the audit trail with
its AE titles and peer address (and the client certificate's subject).

Memory does not grow with what a sender sends. A C-STORE's data set is written
to a file as its PDUs arrive (pynetdicom's chunked receipt), in the spool's
``tmp/`` (``_receive_file``), so it is renamed into the spool, never copied, and
the spool reads only its header. A disk that cannot take it as it arrives (full,
read-only, failing, or free space under ``min_free_bytes``) is answered 0xA700 once
the rest has been read and dropped (``_Arrival``); the association goes on.
Every accepted association's socket is a ``_GuardedSocket``: a PDU longer than
``MAX_PDU_BYTES`` (pynetdicom reads whatever length a PDU declares), a data set
past ``limits.max_received_bytes``, or a peer too slow (a PDU not whole within
``network_timeout_s`` plus its length at ``MIN_RATE``, or a message arriving
below ``MIN_RATE`` after ``network_timeout_s``: pynetdicom's own timeout is
checked only between PDUs, so a PDU cut short held its association, and with
``max_associations`` of them the node took no more) closes the connection (the
association is aborted, nothing was acknowledged) and the reason is logged with
the calling AE title.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import shutil
import socket
import ssl
import struct
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any, NoReturn

from pydicom.filereader import read_dataset
from pynetdicom import AE, _config, dimse_messages, evt
from pynetdicom._handlers import standard_dimse_recv_handler, standard_pdu_recv_handler
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_ECHO, C_STORE, N_ACTION, N_EVENT_REPORT
from pynetdicom.dul import DULServiceProvider
from pynetdicom.events import Event
from pynetdicom.fsm import InvalidEventError, StateMachine
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from dicom_node.arrivals import InFlight
from dicom_node.audit import AuditTrail
from dicom_node.commitment import PUSH_MODEL, ResultCommitment, StorageCommitment
from dicom_node.diskfull import storage_fault
from dicom_node.errors import OutOfResources, RejectedInstance
from dicom_node.ingest import Ingest
from dicom_node.metrics import Metrics
from dicom_node.settings import Settings
from dicom_node.sopclasses import ACCEPTED_SOP_CLASSES, TRANSFER_SYNTAXES
from dicom_node.spool import Requested
from dicom_node.tls import peer_subject, server_context

log = logging.getLogger(__name__)
HANDSHAKE_TIMEOUT_S = 30.0
# The largest PDU the node accepts (and says so in the association): P-DATA of this
# size keep a gigabit link busy; a peer that sends a longer one is cut off.
MAX_PDU_BYTES = 4 * 2**20
# Free space is checked again each time this much of one data set has arrived.
SPACE_CHECK_BYTES = 64 * 2**20
# A DIMSE command set (a C-STORE request is a few hundred bytes): pynetdicom gathers
# a message's command fragments in memory, so their sum is bounded here.
MAX_COMMAND_BYTES = 64 * 1024
C_STORE_RQ = 0x0001  # Command Field: only its data set goes to a file as it arrives
N_ACTION_RQ, N_EVENT_REPORT_RQ = 0x0130, 0x0100
# A storage commitment request's Action Information (or a result's Event Information),
# held in memory too: bounded by the most instances a request may list
# (storage_commitment.max_instances) at the most bytes one can take (an item, two UIDs
# of 64 bytes and their headers), and MAX_COMMAND_BYTES for the rest.
COMMITMENT_ITEM_BYTES = 160
A_ASSOCIATE_RQ, P_DATA_TF = b"\x01", b"\x04"  # PDU types (PS3.8 9.3.1)
# The shortest Maximum Length Received a peer may ask for: a P-DATA PDU's
# presentation data value needs six bytes of header and one of data (PS3.8 9.3.5).
# pynetdicom divided by zero, or cut its answers short, under seven.
MIN_PEER_PDU_BYTES = 7
# The slowest a PDU or a message may arrive (bytes/s) once network_timeout_s has passed:
# a 4 MiB PDU over a 128 kbit/s link.
MIN_RATE = 16 * 1024


def _ae_text(aet: object) -> str:
    """An AE title as pynetdicom gives it (text or bytes), stripped; "" for none."""
    if aet is None:
        return ""
    return aet.decode(errors="replace").strip() if isinstance(aet, bytes) else str(aet).strip()


def _calling_aet(event: Event) -> str:
    return _ae_text(event.assoc.requestor.ae_title)


def _move_originator(event: Event) -> str:
    """The C-STORE's Move Originator AE Title: the AE that asked for it to be sent (a
    C-MOVE's, or the sender an Orthanc forwarding for it names); "" when none."""
    return _ae_text(getattr(event.request, "MoveOriginatorApplicationEntityTitle", None))


def _peer(event: Event) -> str:
    return f"{event.assoc.requestor.address}:{event.assoc.requestor.port}"


class _Server(ThreadedAssociationServer):
    """pynetdicom's server with the TLS handshake moved out of the accept loop, and a
    share of the associations for each host (``host_share``)."""

    handshake_timeout_s = HANDSHAKE_TIMEOUT_S
    host_share: int | None = None
    on_tls_failure: Callable[[str, str], None] = staticmethod(lambda _peer, _reason: None)
    on_host_full: Callable[[str], None] = staticmethod(lambda _peer: None)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """A connection from a host that holds its share of open associations already
        is closed at once (socketserver's hook: no thread, no place taken). Counted at
        the connection, not the request: connections that never send their request
        would otherwise fill every place, and pynetdicom counts them too."""
        if self.host_share is None:
            return True
        host = client_address[0]
        held = sum(
            a.requestor.address == host and _holds_place(a) for a in self.active_associations
        )
        if held < self.host_share:
            return True
        self.on_host_full(f"{client_address[0]}:{client_address[1]}")
        return False

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        sock, address = self.socket.accept()
        return sock, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if self.ssl_context is not None:
            try:
                request.settimeout(self.handshake_timeout_s)
                request = self.ssl_context.wrap_socket(request, server_side=True)
                request.settimeout(None)
            except (ssl.SSLError, OSError) as exc:
                peer = f"{client_address[0]}:{client_address[1]}"
                self.on_tls_failure(peer, getattr(exc, "reason", None) or str(exc) or "timeout")
                with contextlib.suppress(OSError):
                    request.close()
                return
        super().process_request_thread(request, client_address)


def read_seconds(nr_bytes: int, network_timeout_s: float) -> float:
    """How long one read of ``nr_bytes`` (a PDU's header, or its body) may take."""
    return network_timeout_s + nr_bytes / MIN_RATE


class ReceiveLimits:
    """What one association may send between two messages, and the disk it lands on
    (``receive_dir``: where data sets are written as they arrive)."""

    def __init__(
        self,
        max_received_bytes: int,
        spool_root: Path,
        min_free_bytes: int,
        receive_dir: Path | None = None,
        timeout_s: float = 60.0,
        max_commitment_instances: int = 0,
    ) -> None:
        self.max_received_bytes = max_received_bytes
        # a storage commitment request's data set (kept in memory, as pynetdicom does)
        self.max_action_bytes = MAX_COMMAND_BYTES + COMMITMENT_ITEM_BYTES * max_commitment_instances
        self.spool_root = spool_root
        self.min_free_bytes = min_free_bytes
        self.receive_dir = receive_dir
        self.timeout_s = timeout_s
        # the node's data sets still arriving (``start_scp``: its Ingest's), read by the
        # completion sweep: a series with one still arriving is not quiet
        self.in_flight: InFlight | None = None

    def too_slow(self, received: int, elapsed_s: float) -> str | None:
        """Why a message of which ``received`` bytes came in ``elapsed_s`` is too slow."""
        if elapsed_s > self.timeout_s and received < MIN_RATE * elapsed_s:
            return f"{received} bytes of a message in {elapsed_s:.0f} s, under {MIN_RATE} bytes/s"
        return None

    def refuse(self, received: int, next_read: int) -> str | None:
        """Why reading ``next_read`` more bytes after ``received`` is refused, or None."""
        if next_read > MAX_PDU_BYTES + 6:
            return f"a PDU of {next_read} bytes, over the {MAX_PDU_BYTES} this node accepts"
        if received + next_read > self.max_received_bytes:
            return (
                f"a data set of more than {self.max_received_bytes} bytes "
                "(limits.max_received_bytes)"
            )
        return None


def _log_end(assoc: Association, verb: str, reason: str) -> None:
    """Log why an association ended (``verb``: closed, aborted), with its calling AE
    title and its peer's address: no value of what it sent."""
    peer = assoc.requestor
    log.warning(
        "association from %s at %s:%s %s: %s",
        str(peer.ae_title).strip() or "(no request yet)",
        peer.address,
        peer.port,
        verb,
        reason,
    )


class _GuardedSocket(AssociationSocket):
    """The socket of every accepted association (``_RequestHandler`` gives it this
    class): each read is checked by ``ReceiveLimits`` before it is made. pynetdicom
    reads a PDU as its 6-byte header and then one read of the length it declares,
    so that read is refused, not its bytes gathered. ``received`` counts what came
    since the last complete message or the association request. Only the thread
    that reads changes this state (``message_done`` runs there, on EVT_DIMSE_RECV):
    a reset from the association's thread raced the read under way (2026-12-03)."""

    limits: ReceiveLimits | None = None
    received = 0
    started: float | None = None  # when the current message's first byte was read
    header: bytes | None = None  # the PDU type just read, when its body is next
    command = b""  # the current message's command set, as it arrives
    held = False  # its data set is kept in memory (not a C-STORE request)
    held_bytes = 0
    held_limit = MAX_COMMAND_BYTES  # larger for a storage commitment request

    def _refuse(self, reason: str) -> NoReturn:
        _log_end(self.assoc, "closed", reason)
        raise OSError(reason)  # the DUL closes the connection: the association ends

    def recv(self, nr_bytes: int) -> bytearray:
        """pynetdicom's read (until ``nr_bytes`` or the peer closes), with the checks,
        under a deadline: the underlying socket waits at most what is left of it."""
        limits = self.limits
        if limits is None or self.socket is None:
            return super().recv(nr_bytes)
        reason = limits.refuse(self.received, nr_bytes)
        if reason is not None:
            self._refuse(reason)
        now = time.monotonic()
        started = self.started  # this read keeps the start it began with
        if started is None:
            started = self.started = now
        deadline = now + read_seconds(nr_bytes, limits.timeout_s)
        data = bytearray()
        previous = self.socket.gettimeout()  # the DUL's sends keep theirs
        try:
            while len(data) < nr_bytes:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._refuse(f"{len(data)} of {nr_bytes} bytes of a PDU came in time, too slow")
                self.socket.settimeout(left)
                try:
                    chunk = self.socket.recv(min(nr_bytes - len(data), 1 << 16))
                except TimeoutError:
                    continue
                if not chunk:
                    break  # the peer closed: a short read, as pynetdicom's
                data += chunk
        finally:
            self.socket.settimeout(previous)
        self.received += len(data)
        reason = limits.too_slow(self.received, time.monotonic() - started)
        if reason is None:
            reason = self._count_command(data)
        if reason is not None:
            self._refuse(reason)
        return data

    def restart(self) -> None:
        """The next message's count and clock start (in the thread that reads)."""
        self.received = 0
        self.started = None
        self.command = b""
        self.held = False
        self.held_bytes = 0
        self.held_limit = MAX_COMMAND_BYTES

    def _count_command(self, data: bytearray) -> str | None:
        """pynetdicom reads a PDU as its header, then its body, and keeps in memory a
        message's command set and, for any message but a C-STORE request, its data
        set. In a P-DATA-TF body, each is bounded by ``MAX_COMMAND_BYTES``; the data
        set of a storage commitment request by ``ReceiveLimits.max_action_bytes``."""
        header, self.header = self.header, None
        if header is None:
            self.header = bytes(data[:1])  # the next read is this PDU's body
            return None
        if header == A_ASSOCIATE_RQ:
            self.restart()  # the association's request is not a message
            return None
        if header != P_DATA_TF:
            return None
        at = 0
        while at + 6 <= len(data):  # PDV items: length, context ID, control header, value
            (length,) = struct.unpack_from(">L", data, at)
            if length < 2:
                break  # malformed: pynetdicom says so
            control, value = data[at + 5], data[at + 6 : at + 4 + length]
            at += 4 + length
            if control & 0x01:
                self.command += value
                if len(self.command) > MAX_COMMAND_BYTES:
                    return f"a command set of more than {MAX_COMMAND_BYTES} bytes"
                if control & 0x02:
                    field, sop_class = _command_field(self.command)
                    self.held = field != C_STORE_RQ
                    if field in (N_ACTION_RQ, N_EVENT_REPORT_RQ) and sop_class == PUSH_MODEL:
                        self.held_limit = max(MAX_COMMAND_BYTES, self.limits.max_action_bytes)  # type: ignore[union-attr]
            elif self.held:
                self.held_bytes += len(value)
                if self.held_bytes > self.held_limit:
                    what = (
                        "a storage commitment request or result (storage_commitment.max_instances)"
                        if self.held_limit > MAX_COMMAND_BYTES
                        else "a message other than a C-STORE request"
                    )
                    return f"a data set of more than {self.held_limit} bytes with {what}"
        return None


def _command_field(command: bytes) -> tuple[int | None, str]:
    """The Command Field (0000,0100) of a command set (implicit VR little endian), and
    its Requested (0000,0003) or else Affected (0000,0002) SOP Class UID, "" when none."""
    try:
        cs = read_dataset(BytesIO(command), True, True)
        value = cs.get("CommandField")
        sop_class = str(cs.get("RequestedSOPClassUID") or cs.get("AffectedSOPClassUID") or "")
    except Exception:  # noqa: BLE001 - a broken command set is pynetdicom's to answer
        return None, ""
    return (int(value) if isinstance(value, int) else None), sop_class


class _Arrival:
    """pynetdicom's file for a C-STORE data set as it arrives (it writes, flushes
    ``.file``, closes, and unlinks ``.name``), made in the receiving node's spool
    ``tmp/``: on the spool's file system (a rename, not a copy, and counted by its
    free-space checks) and swept by ``Spool.sweep_tmp`` when a transfer is cut off.
    pynetdicom opens it in the association's DUL thread and has no setting for its
    folder; elsewhere (none found) it is the system's.

    A disk that cannot take the data set (full, read-only, failing: ENOSPC, EROFS,
    EIO, when the file is made or written) or free space under ``min_free_bytes``
    (checked every ``SPACE_CHECK_BYTES`` written) stops the writing: the file is
    removed at once, freeing its space, the rest of the data set is read and dropped,
    and the C-STORE handler answers 0xA700 with ``fault``. The association goes on.
    Before (2026-12-07) the write's error ended the association in the thread that
    reads, with no answer: to a sender, a network fault."""

    def __init__(
        self, limits: ReceiveLimits | None, assoc: Association | None = None, **kwargs: Any
    ) -> None:
        self.limits = limits
        folder = getattr(limits, "receive_dir", None)
        self.fault: BaseException | None = None
        self.written = 0
        self._file: Any = None
        self.in_flight = getattr(limits, "in_flight", None)
        try:
            self._file = tempfile.NamedTemporaryFile(dir=folder, **kwargs)  # noqa: SIM115 - closed by close()
            self.name = self._file.name
        except OSError as exc:
            if storage_fault(exc) is None:
                raise
            self.fault = exc
            self.name = str(Path(folder or tempfile.gettempdir()) / f"unwritten-{uuid.uuid4()}.dcm")
        else:
            if self.in_flight is not None:  # until the handler is done with it, or the
                # association ends without one (aborted mid-transfer)
                self.in_flight.add(
                    self.name, (lambda: _holds_place(assoc)) if assoc is not None else _always
                )
        self.file = self  # pynetdicom flushes ``.file`` after each write: done in write()

    def settled(self) -> None:
        """The C-STORE handler is done with the data set: stored (its series' last
        instance time says so from now on) or refused."""
        if self.in_flight is not None:
            self.in_flight.discard(self.name)

    def write(self, data: bytes) -> int:
        if self.fault is None:
            try:
                self._file.write(data)
                self._file.flush()  # a full disk says so here, not at close
            except OSError as exc:
                if storage_fault(exc) is None:
                    raise
                self._stop(exc)
                return len(data)
            before, self.written = self.written, self.written + len(data)
            if self.written // SPACE_CHECK_BYTES > before // SPACE_CHECK_BYTES:
                self._check_floor()
        return len(data)

    def _check_floor(self) -> None:
        floor = getattr(self.limits, "min_free_bytes", 0)
        if not floor:
            return
        free = shutil.disk_usage(self.limits.spool_root).free  # type: ignore[union-attr]
        if free < floor:
            self._stop(
                OutOfResources(f"only {free // 2**20} MiB free for the spool, under min_free_bytes")
            )

    def _stop(self, fault: BaseException) -> None:
        self.fault = fault
        self.settled()  # removed below: it holds no series open
        with contextlib.suppress(OSError):
            self._file.close()  # what it still buffers cannot be written either
        with contextlib.suppress(OSError):
            os.unlink(self.name)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):  # after a fault: nothing left to write
                self._file.close()


def _receive_file(**kwargs: Any) -> _Arrival:
    """``NamedTemporaryFile`` for pynetdicom's chunked receipt: an ``_Arrival`` with
    the limits of the association whose DUL thread calls it."""
    sock = getattr(threading.current_thread(), "socket", None)
    return _Arrival(getattr(sock, "limits", None), getattr(sock, "assoc", None), **kwargs)


def _always() -> bool:
    return True


def message_done(assoc: Association) -> None:
    """A message has arrived whole (``EVT_DIMSE_RECV``, in the thread that reads):
    the next message's count and clock start."""
    if isinstance(assoc.dul.socket, _GuardedSocket):
        assoc.dul.socket.restart()


# States of the DICOM upper layer (PS3.8 9.2) from a release request on: Sta7 to
# Sta12 (release under way, collisions included) and Sta13 (the association no
# longer exists, the connection not yet closed).
_RELEASING = frozenset(f"Sta{n}" for n in range(7, 14))
# Events of the node's own requests to its upper layer: A-ASSOCIATE, P-DATA, A-RELEASE
# (request and response) and A-ABORT (PS3.8 9.2.2).
_LOCAL_REQUESTS = frozenset({"Evt1", "Evt7", "Evt8", "Evt9", "Evt11", "Evt14", "Evt15"})


def _holds_place(assoc: Association) -> bool:
    """Still open: not ended, not being released, its connection not closed (its
    thread lingers after either: after a connection closed before its request, up
    to the ACSE timeout; a sender that reconnects meanwhile must not count it).
    pynetdicom answers A-RELEASE-RP before it sets ``is_released``, so a sender
    that released and reconnected at once could find its old association counted;
    the upper layer's state is Sta8 from the moment the request arrives."""
    if assoc.is_aborted or assoc.is_released or assoc.is_rejected:
        return False
    if assoc.dul.state_machine.current_state in _RELEASING:
        return False
    sock = assoc.dul.socket
    return sock is not None and sock.socket is not None and sock.socket.fileno() != -1


class _NodeDUL(DULServiceProvider):
    """An acceptor's upper layer whose end by a protocol violation is a logged reason.

    Some broken PDU streams put pynetdicom's upper layer where its own next step
    is not allowed (the A-ASSOCIATE-AC it was asked to send, after the peer's PDU
    had moved it to Sta13): its thread ended in an unhandled InvalidEventError, a
    traceback on stderr per connection (ten in a run of the broken-PDU corpus).
    It now logs the reason and ends; the association sees its upper layer gone
    and closes the connection, as before. A PDU that pynetdicom cannot turn into a
    request (a presentation context ID that is even or 0, a User Identity type
    past 5: tests/test_dimse_faults.py) raised other errors there and ended the
    thread the same way: it now gets an A-ABORT (PS3.8 9.2, AA-1) and the
    connection is closed."""

    def run(self) -> None:
        try:
            super().run()
        except InvalidEventError:
            self._ended(
                "its PDUs broke the DICOM upper layer protocol (a step its state "
                f"{self.state_machine.current_state} does not allow)"
            )
        except Exception as exc:  # noqa: BLE001 - pynetdicom decoding a peer's PDU
            self._ended(f"a PDU that cannot be decoded ({type(exc).__name__})")
            abort = A_ABORT_RQ()
            abort.source, abort.reason_diagnostic = 0x02, 0x00  # service provider
            with contextlib.suppress(OSError, AttributeError):
                self.socket.send(abort.encode())  # type: ignore[union-attr]
                self.socket.close()  # type: ignore[union-attr]
        finally:
            # An association still waiting for its request (the connection closed, or
            # its PDU answered with an A-ABORT) takes this for the ACSE timeout and
            # ends now: it held its place among max_associations that long (up to
            # 30 s), so undecodable requests could keep every sender out.
            self.to_user_queue.put(None)  # type: ignore[arg-type]

    def _ended(self, reason: str) -> None:
        _log_end(self.assoc, "closed", reason)
        self.assoc.is_aborted = True
        self.assoc.is_established = False


class _NodeDIMSE(DIMSEServiceProvider):
    """An acceptor's DIMSE provider whose peer's undecodable message aborts the
    association with a logged reason.

    pynetdicom answers a message it decoded but cannot use with an A-ABORT (event
    19 of the upper layer's state machine). A command set it cannot decode at all (no
    Command Field or one no message has, no Command Data Set Type, a value of the
    wrong length) raised in the upper layer's thread instead and ended it with a
    traceback, and the peer saw its connection closed without an answer
    (tests/test_dimse_faults.py). Such a message now gets the same A-ABORT."""

    def receive_primitive(self, primitive: Any) -> None:
        try:
            super().receive_primitive(primitive)
        except Exception as exc:  # noqa: BLE001 - pynetdicom decoding a peer's bytes
            message, self.message = self.message, None
            partial = getattr(message, "_data_set_file", None)
            if partial is not None:  # a C-STORE data set begun: nothing was acknowledged
                with contextlib.suppress(OSError):
                    partial.close()
                    Path(partial.name).unlink()
            what = (
                f"its data set could not be written: {exc.strerror}"
                if isinstance(exc, OSError)
                else f"a DIMSE message that cannot be decoded ({type(exc).__name__})"
            )
            _log_end(self.assoc, "aborted", what)
            self.dul.event_queue.put("Evt19")  # A-ABORT to the peer (PS3.8 9.2, AA-8)


class _NodeACSE(ACSE):
    """An acceptor's association negotiation that first refuses a request no answer
    could be sent under: a Maximum Length Received from 1 to 6 bytes, or none at
    all (the sub-item is mandatory, PS3.8 D.1). pynetdicom accepted both, then
    divided by zero (or by None) when it answered the first message. A request its
    negotiation raises on (a presentation context without an abstract syntax or
    without a transfer syntax) is refused too: the association's thread ended
    there, and the connection stayed open, unanswered, for as long as the peer
    kept it (a file descriptor each, outside every limit on associations)."""

    def negotiate_association(self) -> None:
        if self.assoc.is_acceptor:
            length = self.requestor.maximum_length
            refusal = None
            if length is None:
                refusal = "its request has no Maximum Length sub-item"
            elif 0 < length < MIN_PEER_PDU_BYTES:
                refusal = f"its Maximum Length Received of {length} bytes cannot carry a message"
            if refusal:
                self._refuse(refusal)
                return
            try:
                super().negotiate_association()
            except Exception as exc:  # noqa: BLE001 - pynetdicom negotiating a peer's request
                self._refuse(f"its request cannot be negotiated ({type(exc).__name__})")
            return
        super().negotiate_association()

    def _refuse(self, refusal: str) -> None:
        primitive = self.requestor.primitive
        self.requestor.ae_title = primitive.calling_ae_title  # type: ignore[union-attr]
        self.assoc.refusal = refusal  # type: ignore[attr-defined]
        self.send_reject(0x01, 0x01, 0x01)  # permanent, service-user, no reason given
        evt.trigger(self.assoc, evt.EVT_REJECTED, {})
        self.assoc.kill()


# the messages each context serves that is not a C-STORE's: a storage commitment
# request, and the result of one the node made (from a destination that commits)
_SERVED: dict[str, tuple[type, ...]] = {
    str(Verification): (C_ECHO,),
    PUSH_MODEL: (N_ACTION, N_EVENT_REPORT),
}


class _NodeAssociation(Association):
    """An acceptor that serves C-ECHO on the verification context, N-ACTION on the
    storage commitment context and C-STORE for its context's SOP Class, and aborts the association on any other message with the
    reason logged, as dcmtk's storescp does. pynetdicom passed a request to the
    service class that its SOP Class UID names (a C-ECHO on a storage context, or an
    N-CREATE naming a storage SOP Class, raised there and was logged as an error with
    its traceback, or reached the C-STORE handler without a data set), and ignored a
    response or a request that lacks an element, so the peer waited for an answer
    until its own timeout."""

    def _serve_request(self, msg: Any, context_id: int) -> None:
        context = self._accepted_cx.get(context_id)
        if context is not None and not self._sent_release:
            wanted = _SERVED.get(str(context.abstract_syntax), (C_STORE,))
            sop_class = getattr(msg, "AffectedSOPClassUID", None)
            if isinstance(msg, N_ACTION):
                sop_class = msg.RequestedSOPClassUID
            what = None
            if not msg.is_valid_request:
                what = f"a {msg.msg_type} message that is not a valid request"
            elif not isinstance(msg, wanted) or sop_class != context.abstract_syntax:
                what = (
                    f"a {msg.msg_type} request for SOP Class {str(sop_class or 'none')[:64]} "
                    f"on a presentation context for {context.abstract_syntax}, which this "
                    "node does not serve"
                )
            if what:
                _log_end(self, "aborted", what)
                self.abort()
                return
        super()._serve_request(msg, context_id)


class _NodeStateMachine(StateMachine):
    """The upper layer's state machine, which drops what the node asks of it once the
    association no longer exists (Sta13, PS3.8 9.2): a response still being sent, or a
    second A-ABORT, when the DIMSE provider had aborted on a later message meanwhile.
    No transition exists for them there; pynetdicom logged an error and raised."""

    def do_action(self, event: str) -> None:
        if self.current_state == "Sta13" and event in _LOCAL_REQUESTS:
            with contextlib.suppress(queue.Empty):
                self.dul.to_provider_queue.get(block=False)
            return
        super().do_action(event)


class _RequestHandler(RequestHandler):
    limits: ReceiveLimits | None = None

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        assoc.__class__ = _NodeAssociation  # same objects, before their threads start
        assoc.dul.__class__ = _NodeDUL
        assoc.dul.state_machine.__class__ = _NodeStateMachine
        assoc.dimse.__class__ = _NodeDIMSE
        assoc.acse.__class__ = _NodeACSE
        # pynetdicom's own handlers of what arrives only write its debug dumps, and
        # raise on a peer's malformed message or item: each was logged as an error
        # with a traceback (C-CANCEL or N-GET requests that lack an element).
        assoc.unbind(evt.EVT_DIMSE_RECV, standard_dimse_recv_handler)
        assoc.unbind(evt.EVT_PDU_RECV, standard_pdu_recv_handler)
        sock = assoc.dul.socket
        if sock is not None and self.limits is not None:
            sock.__class__ = _GuardedSocket  # same object and state, checked reads
            sock.limits = self.limits  # type: ignore[attr-defined]
        return assoc


class _NodeAE(AE):
    receive_limits: ReceiveLimits | None = None
    host_share: int | None = None

    def make_server(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["server_class"] = type("Server", (_Server,), {"host_share": self.host_share})
        handler = type("RequestHandler", (_RequestHandler,), {"limits": self.receive_limits})
        kwargs["request_handler"] = handler
        return super().make_server(*args, **kwargs)


def make_ae(settings: Settings) -> AE:
    # The data set goes to a file as it arrives (process-wide in pynetdicom: only
    # the SCP's receipt of C-STORE requests changes).
    _config.STORE_RECV_CHUNKED_DATASET = True
    dimse_messages.NamedTemporaryFile = _receive_file  # type: ignore[assignment]
    ae = _NodeAE(ae_title=settings.ae_title)
    ae.receive_limits = ReceiveLimits(
        settings.limits.max_received_bytes,
        Path(settings.storage_dir),
        settings.min_free_bytes,
        Path(settings.storage_dir) / "tmp",
        settings.network_timeout_s,
        settings.storage_commitment.max_instances,
    )
    ae.maximum_pdu_size = MAX_PDU_BYTES
    ae.network_timeout = settings.network_timeout_s
    ae.dimse_timeout = 120
    # How long an open connection may take to send its association request (one
    # closed before it frees its place at once: _NodeDUL).
    ae.acse_timeout = min(30.0, settings.network_timeout_s)
    ae.add_supported_context(Verification)
    # as SCP (N-ACTION in, N-EVENT-REPORT out), and as SCU on the association of a
    # destination reporting its result (it proposes the SCP role)
    ae.add_supported_context(PUSH_MODEL, scu_role=True, scp_role=True)
    for sop_class in ACCEPTED_SOP_CLASSES:
        ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
    if settings.allowed_calling_aets:
        ae.require_calling_aet = list(settings.allowed_calling_aets)
    ae.maximum_associations = settings.max_associations
    ae.host_share = settings.host_share
    return ae


def make_store_handler(ingest: Ingest) -> Callable[[Event], int]:
    def handle_store(event: Event) -> int:
        arrival = getattr(event.request, "_dataset_file", None)
        try:
            return _store(event)
        finally:
            if isinstance(arrival, _Arrival):
                arrival.settled()

    def _store(event: Event) -> int:
        calling = _calling_aet(event)
        try:
            path = event.dataset_path  # written as it arrived, with its file meta
            if not isinstance(path, Path):  # Command Data Set Type said there is none
                log.warning(
                    "C-STORE from %s refused (0xC000): the request has no data set", calling
                )
                return RejectedInstance.CANNOT_UNDERSTAND
            requested = Requested(
                str(event.request.AffectedSOPClassUID),
                str(event.request.AffectedSOPInstanceUID or ""),  # type: ignore[union-attr]
            )
            arrival = getattr(event.request, "_dataset_file", None)
        except (ValueError, AttributeError, TypeError) as exc:
            log.warning(
                "C-STORE from %s refused (0xC000): cannot encode file meta: %s", calling, exc
            )
            return RejectedInstance.CANNOT_UNDERSTAND
        if isinstance(arrival, _Arrival) and arrival.fault is not None:  # not written: dropped
            return ingest.refuse(
                arrival.fault, requested, calling, "dimse", _peer(event), arrival.written
            ).status
        receipt = ingest.receive(
            path, requested, calling, "dimse", _peer(event), _move_originator(event)
        )
        return receipt.status

    return handle_store


def make_commitment_handler(commitment: StorageCommitment) -> Callable[[Event], Any]:
    def handle_n_action(event: Event) -> tuple[Any, None]:
        request = event.request
        status = commitment.request(
            _calling_aet(event),
            getattr(request, "ActionTypeID", None),
            getattr(request, "RequestedSOPInstanceUID", None),
            lambda: event.action_information,
        )
        return status, None

    return handle_n_action


def make_report_handler(results: ResultCommitment) -> Callable[[Event], Any]:
    def handle_n_event_report(event: Event) -> tuple[Any, None]:
        status = results.report(
            _calling_aet(event),
            getattr(event.request, "EventTypeID", None),
            lambda: event.event_information,
        )
        return status, None

    return handle_n_event_report


def _handle_echo(event: Event) -> int:
    log.info("C-ECHO from %s", _calling_aet(event))
    return 0x0000


class _Associations:
    """Association events for the audit trail and the metrics."""

    def __init__(self, settings: Settings, audit: AuditTrail | None, metrics: Metrics | None):
        self.settings = settings
        self.audit = audit
        self.metrics = metrics

    def accepted(self, event: Event) -> None:
        subject = peer_subject(getattr(event.assoc.dul.socket, "socket", None))
        log.info("association from %s at %s accepted", _calling_aet(event), _peer(event))
        if self.metrics:
            self.metrics.associations.labels("accepted").inc()
        if self.audit:
            self.audit.association(
                True,
                _calling_aet(event),
                self.settings.ae_title,
                _peer(event),
                tls=self.settings.tls.dicom,
                client_certificate=subject,
            )

    def rejected(self, event: Event) -> None:
        calling = _calling_aet(event)
        allowed = self.settings.allowed_calling_aets
        if refusal := getattr(event.assoc, "refusal", None):
            reason = refusal
        elif allowed and calling not in allowed:
            reason = "calling AE title not in allowed_calling_aets"
        else:
            reason = f"more than max_associations ({self.settings.max_associations}) at once"
        log.warning("association from %s at %s rejected: %s", calling, _peer(event), reason)
        if self.metrics:
            self.metrics.associations.labels("rejected").inc()
        if self.audit:
            self.audit.association(
                False, calling, self.settings.ae_title, _peer(event), reason=reason
            )

    def host_full(self, peer: str) -> None:
        reason = (
            f"its host holds max_associations_per_host ({self.settings.host_share}) already: "
            "connection closed"
        )
        log.warning("connection from %s refused: %s", peer, reason)
        if self.metrics:
            self.metrics.associations.labels("rejected").inc()
        if self.audit:
            self.audit.association(False, "", self.settings.ae_title, peer, reason=reason)

    def tls_failed(self, peer: str, reason: str) -> None:
        log.warning("DICOM TLS handshake with %s failed: %s", peer, reason)
        if self.metrics:
            self.metrics.associations.labels("tls_refused").inc()
        if self.audit:
            self.audit.tls_refused("dicom", peer, reason)


def start_scp(
    settings: Settings,
    ingest: Ingest,
    audit: AuditTrail | None = None,
    metrics: Metrics | None = None,
    commitment: StorageCommitment | None = None,
    results: ResultCommitment | None = None,
) -> ThreadedAssociationServer:
    ae = make_ae(settings)
    ae.receive_limits.in_flight = ingest.in_flight  # type: ignore[attr-defined]
    events = _Associations(settings, audit, metrics)
    handlers: list = [  # type: ignore[type-arg]
        (evt.EVT_C_STORE, make_store_handler(ingest)),
        (evt.EVT_C_ECHO, _handle_echo),
        (evt.EVT_DIMSE_RECV, lambda event: message_done(event.assoc)),
        (evt.EVT_ACCEPTED, events.accepted),
        (evt.EVT_REJECTED, events.rejected),
    ]
    if commitment is not None:
        handlers.append((evt.EVT_N_ACTION, make_commitment_handler(commitment)))
    if results is not None:
        handlers.append((evt.EVT_N_EVENT_REPORT, make_report_handler(results)))
    context = server_context(settings.tls) if settings.tls.dicom else None
    server = ae.start_server(
        (settings.host, settings.port), block=False, evt_handlers=handlers, ssl_context=context
    )
    assert server is not None  # block=False always returns the server
    server.on_tls_failure = events.tls_failed  # type: ignore[attr-defined]
    server.on_host_full = events.host_full  # type: ignore[attr-defined]
    log.info(
        "storage SCP %s listening on %s:%d%s",
        settings.ae_title,
        settings.host,
        server.server_address[1],
        " (TLS)" if context else "",
    )
    return server
