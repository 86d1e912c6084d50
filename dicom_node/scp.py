"""The storage SCP: C-ECHO and C-STORE. The C-STORE handler only persists:
``dicom_node.ingest`` stores the bytes and answers the DIMSE status.

With ``[tls] dicom = true`` the port speaks DICOM over TLS (PS3.15 B.1, the
secure transport profile): the handshake runs in the connection's own thread
under a timeout, so a plain client, or one that connects and says nothing, is
refused without holding up anyone else. ``max_associations`` bounds the
associations served at once; beyond it pynetdicom rejects with "local limit
exceeded". Every association accepted or rejected goes to the audit trail with
its AE titles and peer address (and the client certificate's subject).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.audit import AuditTrail
from dicom_node.errors import RejectedInstance
from dicom_node.ingest import Ingest
from dicom_node.metrics import Metrics
from dicom_node.settings import Settings
from dicom_node.sopclasses import ACCEPTED_SOP_CLASSES, TRANSFER_SYNTAXES
from dicom_node.tls import peer_subject, server_context

log = logging.getLogger(__name__)
HANDSHAKE_TIMEOUT_S = 30.0


def _calling_aet(event: Event) -> str:
    aet = event.assoc.requestor.ae_title
    return aet.decode(errors="replace").strip() if isinstance(aet, bytes) else str(aet).strip()


def _peer(event: Event) -> str:
    return f"{event.assoc.requestor.address}:{event.assoc.requestor.port}"


class _Server(ThreadedAssociationServer):
    """pynetdicom's server with the TLS handshake moved out of the accept loop."""

    handshake_timeout_s = HANDSHAKE_TIMEOUT_S
    on_tls_failure: Callable[[str, str], None] = staticmethod(lambda _peer, _reason: None)

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


class _NodeAE(AE):
    def make_server(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["server_class"] = _Server
        return super().make_server(*args, **kwargs)


def make_ae(settings: Settings) -> AE:
    ae = _NodeAE(ae_title=settings.ae_title)
    ae.maximum_pdu_size = 0  # unlimited: large XA runs
    ae.network_timeout = 60
    ae.dimse_timeout = 120
    ae.acse_timeout = 30
    ae.add_supported_context(Verification)
    for sop_class in ACCEPTED_SOP_CLASSES:
        ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
    if settings.allowed_calling_aets:
        ae.require_calling_aet = list(settings.allowed_calling_aets)
    ae.maximum_associations = settings.max_associations
    return ae


def make_store_handler(ingest: Ingest) -> Callable[[Event], int]:
    def handle_store(event: Event) -> int:
        calling = _calling_aet(event)
        try:
            data = event.encoded_dataset()
            requested = str(event.request.AffectedSOPClassUID)
        except (ValueError, AttributeError, TypeError) as exc:
            log.warning(
                "C-STORE from %s refused (0xC000): cannot encode file meta: %s", calling, exc
            )
            return RejectedInstance.CANNOT_UNDERSTAND
        return ingest.receive(data, requested, calling, "dimse", _peer(event)).status

    return handle_store


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
        if allowed and calling not in allowed:
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
) -> ThreadedAssociationServer:
    ae = make_ae(settings)
    events = _Associations(settings, audit, metrics)
    handlers: list = [  # type: ignore[type-arg]
        (evt.EVT_C_STORE, make_store_handler(ingest)),
        (evt.EVT_C_ECHO, _handle_echo),
        (evt.EVT_ACCEPTED, events.accepted),
        (evt.EVT_REJECTED, events.rejected),
    ]
    context = server_context(settings.tls) if settings.tls.dicom else None
    server = ae.start_server(
        (settings.host, settings.port), block=False, evt_handlers=handlers, ssl_context=context
    )
    assert server is not None  # block=False always returns the server
    server.on_tls_failure = events.tls_failed  # type: ignore[attr-defined]
    log.info(
        "storage SCP %s listening on %s:%d%s",
        settings.ae_title,
        settings.host,
        server.server_address[1],
        " (TLS)" if context else "",
    )
    return server
