"""The audit trail: who sent what, who asked for what, what went where.

One JSON object a line in ``storage_dir/audit/audit.jsonl``, rotated by size
(``[audit] max_bytes``, ``backup_count``), optionally copied to syslog (from a
queue and a thread of its own: a collector down or stalled never holds the node). Each
record carries the event in the spirit of IHE ATNA (RFC 3881, DICOM PS3.15
Annex A.5): the event ID and type as DCM codes, the action (C create, R read,
U update, E execute), the outcome (0 success, 4 minor failure, 8 serious
failure), the participants (AE titles, peer address, API token name) and the
objects (UIDs). Records hold identifiers only, never attribute values of a
data set, so the trail is PHI-free like the log.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import queue
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from dicom_node.settings import AuditSettings

_log = logging.getLogger(__name__)

# DICOM PS3.16 CID 400/401 (DCM codes used by PS3.15 A.5.3).
APPLICATION_ACTIVITY = ("110100", "Application Activity")
INSTANCES_ACCESSED = ("110103", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED = ("110104", "DICOM Instances Transferred")
SECURITY_ALERT = ("110113", "Security Alert")
USER_AUTHENTICATION = ("110114", "User Authentication")
APPLICATION_START = ("110120", "Application Start")
APPLICATION_STOP = ("110121", "Application Stop")
LOGIN = ("110122", "Login")
NODE_AUTHENTICATION = ("110126", "Node Authentication")
USE_OF_RESTRICTED_FUNCTION = ("110132", "Use of Restricted Function")

SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE = 0, 4, 8


class _TrailFile(logging.handlers.RotatingFileHandler):
    """The trail's file. A record it cannot write (its disk full, read-only or failing)
    goes to the node's log instead, where journald or the console keep it, and the
    failure is logged once and once more when the file takes records again: logging's
    own answer was a traceback on stderr for every record, and ``close`` raised, so the
    node could not be stopped cleanly on such a disk."""

    failing = False
    _failed_now = False

    def emit(self, record: logging.LogRecord) -> None:
        self._failed_now = False
        super().emit(record)
        if self.failing and not self._failed_now:
            self.failing = False
            _log.warning("audit trail %s takes records again", self.baseFilename)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        self._failed_now = True
        if not self.failing:
            self.failing = True
            _log.error(
                "audit trail %s cannot be written (%s): its records go to this log until it can",
                self.baseFilename,
                sys.exc_info()[1],
            )
        _log.warning("audit record: %s", _plain(record.getMessage()))

    def close(self) -> None:
        try:
            super().close()
        except OSError as exc:  # what was buffered is lost with the disk; stopping goes on
            _log.warning("audit trail %s not closed cleanly: %s", self.baseFilename, exc)


def _plain(line: str) -> str:
    """A record as ``key=value`` pairs (codes by their code): the log's filter would take
    the JSON's quoted strings for values of a data set and write their lengths."""
    try:
        entry = json.loads(line)
    except ValueError:
        return line
    return " ".join(
        f"{key}={value['code'] if isinstance(value, dict) and 'code' in value else value}"
        for key, value in entry.items()
    )


def _code(pair: tuple[str, str]) -> dict[str, str]:
    return {"code": pair[0], "scheme": "DCM", "meaning": pair[1]}


class AuditTrail:
    """Thread-safe writer of audit records; ``enabled = false`` writes nothing."""

    def __init__(self, storage_dir: Path, settings: AuditSettings, source_ae: str) -> None:
        self.settings = settings
        self.source_ae = source_ae
        self.path = storage_dir / "audit" / "audit.jsonl"
        # A logger of its own, outside logging's tree: the trail is not the log, and no
        # handler or filter put on the log's loggers (logsafe's rewrites records) nor
        # a later trail reusing this one's name ever sees its records.
        self._logger = logging.Logger("dicom_node.audit", logging.INFO)
        self._logger.propagate = False
        self._handlers: list[logging.Handler] = []
        self._lock = threading.Lock()
        if not settings.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        file_handler = _TrailFile(
            self.path, maxBytes=settings.max_bytes, backupCount=settings.backup_count
        )
        self._handlers.append(file_handler)
        if settings.syslog:
            self._handlers.append(_syslog_handler(settings.syslog))
        for h in self._handlers:
            h.setFormatter(logging.Formatter("%(message)s"))
            self._logger.addHandler(h)

    def close(self) -> None:
        for h in self._handlers:
            self._logger.removeHandler(h)
            h.close()
        self._handlers = []

    def record(
        self,
        event: str,
        event_id: tuple[str, str],
        *,
        action: str = "E",
        outcome: int = SUCCESS,
        event_type: tuple[str, str] | None = None,
        **fields: Any,
    ) -> None:
        """One record; ``fields`` are identifiers (AE titles, addresses, UIDs, reasons)."""
        if not self._handlers:
            return
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
            + f".{int(time.time() * 1000) % 1000:03d}Z",
            "event": event,
            "event_id": _code(event_id),
            "action": action,
            "outcome": outcome,
            "source": self.source_ae,
        }
        if event_type is not None:
            entry["event_type"] = _code(event_type)
        entry.update({k: v for k, v in fields.items() if v not in (None, "")})
        self._logger.info(json.dumps(entry, sort_keys=False, default=str))

    # -- the events the node records ------------------------------------------------
    def node_started(self, dicom: str, api: str) -> None:
        self.record(
            "node-started", APPLICATION_ACTIVITY, event_type=APPLICATION_START, dicom=dicom, api=api
        )

    def node_stopped(self) -> None:
        self.record("node-stopped", APPLICATION_ACTIVITY, event_type=APPLICATION_STOP)

    def association(
        self, accepted: bool, calling_ae: str, called_ae: str, peer: str, **extra: Any
    ) -> None:
        self.record(
            "association-accepted" if accepted else "association-rejected",
            USER_AUTHENTICATION,
            event_type=LOGIN,
            outcome=SUCCESS if accepted else MINOR_FAILURE,
            calling_ae=calling_ae,
            called_ae=called_ae,
            peer=peer,
            **extra,
        )

    def tls_refused(self, channel: str, peer: str, reason: str) -> None:
        self.record(
            "tls-refused",
            SECURITY_ALERT,
            event_type=NODE_AUTHENTICATION,
            outcome=MINOR_FAILURE,
            channel=channel,
            peer=peer,
            reason=reason,
        )

    def instance(
        self,
        stored: bool,
        status: int,
        source: str,
        transport: str,
        sop_instance_uid: str,
        study_uid: str,
        reason: str,
        peer: str = "",
    ) -> None:
        self.record(
            "instance-stored" if stored else "instance-refused",
            INSTANCES_TRANSFERRED,
            action="C",
            outcome=SUCCESS if stored else MINOR_FAILURE,
            calling_ae=source,
            transport=transport,
            peer=peer,
            status=f"0x{status:04X}",
            study_uid=study_uid,
            sop_instance_uid=sop_instance_uid,
            reason=None if stored else reason,
        )

    def api_call(
        self, who: str, peer: str, method: str, path: str, status: int, what: Any = None
    ) -> None:
        """A REST call that changes state (or was refused for want of a token)."""
        denied = status in (401, 403)
        self.record(
            "api-denied" if denied else "api-call",
            USER_AUTHENTICATION if denied else INSTANCES_ACCESSED,
            event_type=LOGIN if denied else USE_OF_RESTRICTED_FUNCTION,
            action="E" if denied else "U",
            outcome=SUCCESS if status < 400 else MINOR_FAILURE,
            who=who,
            peer=peer,
            method=method,
            path=path,
            http_status=status,
            what=what,
        )

    def delivery(
        self,
        destination: str,
        sop_instance_uid: str,
        sent: bool,
        reason: str = "",
        permanent: bool = False,
    ) -> None:
        self.record(
            "delivery-sent" if sent else "delivery-failed",
            INSTANCES_TRANSFERRED,
            action="R",
            outcome=SUCCESS if sent else SERIOUS_FAILURE if permanent else MINOR_FAILURE,
            destination=destination,
            sop_instance_uid=sop_instance_uid,
            reason=reason or None,
            permanent=permanent if not sent else None,
        )

    def purged(self, run_id: str, study_uid: str, instances: int, reason: str) -> None:
        """A processed run's received files and results were deleted (retention)."""
        self.record(
            "run-purged",
            INSTANCES_ACCESSED,
            action="D",
            run_id=run_id,
            study_uid=study_uid,
            instances=instances,
            reason=reason,
        )


class _Syslog(logging.handlers.SysLogHandler):
    """logging's SysLogHandler, made so that the collector cannot hold the node: it
    connects when it first sends (a collector down at start does not stop the start),
    within ``TIMEOUT_S``, and again after a failure (not sooner than ``RETRY_S``);
    a record it could not send is dropped and counted. It runs behind a queue
    (``_Copy``), so a collector that is slow, or reads nothing, waits on this thread
    only."""

    RETRY_S = 5.0
    TIMEOUT_S = 5.0

    def __init__(self, address: str | tuple[str, int], socktype: socket.SocketKind | None) -> None:
        self._started = False  # not at construction: the first record connects
        self._next_try = 0.0
        self.dropped = 0
        self._counting = threading.Lock()  # not the handler's: a send may hold that one
        self.closing = False  # the node stops: what is still queued is dropped
        super().__init__(address=address, socktype=socktype)  # type: ignore[arg-type]
        self._started = True
        self.ident = "angio-dicom-node: "
        self.facility = logging.handlers.SysLogHandler.LOG_AUTH

    def createSocket(self) -> None:  # noqa: N802 - logging's name
        self.socket = None  # type: ignore[assignment]
        now = time.monotonic()
        if not self._started or now < self._next_try:
            return
        self._next_try = now + self.RETRY_S
        try:
            if isinstance(self.address, str):
                self.unixsocket = True
                self._connect_unixsocket(self.address)  # type: ignore[attr-defined]
                self.socket.settimeout(self.TIMEOUT_S)  # type: ignore[attr-defined]
            elif self.socktype == socket.SOCK_STREAM:
                self.unixsocket = False
                self.socket = socket.create_connection(self.address, self.TIMEOUT_S)
            else:
                self.unixsocket = False
                host, port = self.address
                family = socket.getaddrinfo(host, port, 0, socket.SOCK_DGRAM)[0][0]
                self.socket = socket.socket(family, socket.SOCK_DGRAM)
        except OSError as exc:
            self.socket = None  # type: ignore[assignment]
            _log.warning("audit trail: syslog %s not reachable (%s)", self.address, exc)

    def emit(self, record: logging.LogRecord) -> None:
        if self.closing:
            self.drop()
            return
        super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        """The record is dropped (the file trail has it); the socket is made again."""
        if self.socket is not None:
            self.socket.close()
        self.socket = None  # type: ignore[assignment]
        self.drop()

    def drop(self) -> None:
        """Count a record not copied (logged at the 1st, 10th and every 1000th)."""
        with self._counting:
            self.dropped += 1
            dropped = self.dropped
        if dropped in (1, 10) or dropped % 1000 == 0:
            _log.warning(
                "audit trail: %d record(s) not copied to syslog %s (the file trail has them)",
                dropped,
                self.address,
            )


class _Copy(logging.handlers.QueueHandler):
    """The syslog copy's front: records are queued for ``_Syslog``'s own thread, and
    dropped (counted) when it is ``MAX_QUEUED`` behind, instead of waiting."""

    MAX_QUEUED = 10000

    def __init__(self, syslog: _Syslog) -> None:
        super().__init__(queue.Queue(self.MAX_QUEUED))
        self.syslog = syslog
        self.listener = _Listener(self.queue, syslog)
        self.listener.start()

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.syslog.drop()

    def close(self) -> None:
        """What is queued is sent first, for as long as one attempt may take; what is
        left then is dropped (counted)."""
        deadline = time.monotonic() + self.syslog.TIMEOUT_S
        while not self.queue.empty() and time.monotonic() < deadline:  # type: ignore[attr-defined]
            time.sleep(0.05)
        self.syslog.closing = True
        self.listener.stop()
        self.syslog.close()
        super().close()


class _Listener(logging.handlers.QueueListener):
    def enqueue_sentinel(self) -> None:
        self.queue.put(self._sentinel)  # type: ignore[attr-defined] # waits for room


def _syslog_handler(target: str) -> logging.Handler:
    if target.startswith("/"):
        return _Copy(_Syslog(target, None))  # datagram, else stream (logging's choice)
    scheme, _, rest = target.partition("://")
    host, _, port = rest.rpartition(":")
    kind = socket.SOCK_DGRAM if scheme == "udp" else socket.SOCK_STREAM
    return _Copy(_Syslog((host, int(port)), kind))
