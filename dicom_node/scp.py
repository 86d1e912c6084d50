"""The storage SCP: C-ECHO and C-STORE. The C-STORE handler only persists:
``dicom_node.ingest`` stores the bytes and answers the DIMSE status.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.errors import RejectedInstance
from dicom_node.ingest import Ingest
from dicom_node.settings import Settings
from dicom_node.sopclasses import ACCEPTED_SOP_CLASSES, TRANSFER_SYNTAXES

log = logging.getLogger(__name__)


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
        return ingest.receive(data, requested, calling).status

    return handle_store


def _handle_echo(event: Event) -> int:
    log.info("C-ECHO from %s", _calling_aet(event))
    return 0x0000


def start_scp(settings: Settings, ingest: Ingest) -> ThreadedAssociationServer:
    ae = make_ae(settings)
    handlers: list = [  # type: ignore[type-arg]
        (evt.EVT_C_STORE, make_store_handler(ingest)),
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
