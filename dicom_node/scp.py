"""The storage SCP: C-ECHO and C-STORE. The C-STORE handler only persists.

This module is the one place where node exceptions become DIMSE statuses.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.errors import RejectedInstance
from dicom_node.settings import Settings
from dicom_node.sopclasses import ACCEPTED_SOP_CLASSES, TRANSFER_SYNTAXES
from dicom_node.spool import Spool, Stored

log = logging.getLogger(__name__)

OnStored = Callable[[Stored], None]


def _calling_aet(event: Event) -> str:
    aet = event.assoc.requestor.ae_title
    return aet.decode(errors="replace").strip() if isinstance(aet, bytes) else str(aet).strip()


def make_ae(settings: Settings) -> AE:
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_pdu_size = 0  # unlimited: large XA runs
    ae.network_timeout = 60
    ae.dimse_timeout = 120
    ae.acse_timeout = 30
    ae.add_supported_context(Verification)
    for sop_class in ACCEPTED_SOP_CLASSES:
        ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
    if settings.allowed_calling_aets:
        ae.require_calling_aet = list(settings.allowed_calling_aets)
    ae.maximum_associations = 32
    return ae


def make_store_handler(spool: Spool, on_stored: OnStored) -> Callable[[Event], int]:
    def handle_store(event: Event) -> int:
        calling = _calling_aet(event)
        requested = str(event.request.AffectedSOPClassUID)
        try:
            data = event.encoded_dataset()
        except (ValueError, AttributeError) as exc:
            log.warning(
                "C-STORE from %s refused (0xC000): cannot encode file meta: %s", calling, exc
            )
            return RejectedInstance.CANNOT_UNDERSTAND
        try:
            stored = spool.store(data, requested_sop_class=requested, calling_aet=calling)
        except RejectedInstance as exc:
            log.warning("C-STORE from %s refused (0x%04X): %s", calling, exc.status, exc.reason)
            return exc.status
        except OSError as exc:
            log.error(
                "C-STORE from %s failed (0x%04X): %s",
                calling,
                RejectedInstance.PROCESSING_FAILURE,
                exc,
            )
            return RejectedInstance.PROCESSING_FAILURE
        log.info(
            "stored %s from %s (run %s%s)",
            stored.sop_instance_uid,
            calling,
            stored.run_id,
            ", duplicate" if stored.duplicate else "",
        )
        on_stored(stored)
        return 0x0000

    return handle_store


def _handle_echo(event: Event) -> int:
    log.info("C-ECHO from %s", _calling_aet(event))
    return 0x0000


def start_scp(settings: Settings, spool: Spool, on_stored: OnStored) -> ThreadedAssociationServer:
    ae = make_ae(settings)
    handlers: list = [  # type: ignore[type-arg]
        (evt.EVT_C_STORE, make_store_handler(spool, on_stored)),
        (evt.EVT_C_ECHO, _handle_echo),
    ]
    server = ae.start_server((settings.host, settings.port), block=False, evt_handlers=handlers)
    assert server is not None  # block=False always returns the server
    log.info(
        "storage SCP %s listening on %s:%d",
        settings.ae_title,
        settings.host,
        server.server_address[1],
    )
    return server
