"""Senders: C-STORE SCU and DICOMweb STOW-RS. Each sends a batch of files to one
destination and reports each file's outcome the moment it is known, so the
outbox marks it sent before the next one goes: after a crash only the file in
flight can be sent twice.

A sender raises DeliveryError when the destination cannot be reached or the
connection is lost (the outbox retries what was not reported, later); a
per-file refusal is reported, permanent when the destination says the object
itself is bad.
"""

from __future__ import annotations

import logging
import socket
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import build_context

from dicom_node.db import Delivery
from dicom_node.errors import ConfigError, DeliveryError
from dicom_node.settings import Destination, DicomwebDestination, DimseDestination
from dicom_node.tls import client_context

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InFlight:
    """The object was in flight when the destination ended the association, or it
    answered HTTP 500 for it: the object may be why (a PACS that aborts on what it
    cannot take, instead of refusing it). Sent again after the others; given up after
    ``[outbox] max_aborts`` such ends with other objects stored in between."""

    reason: str


# Per file: None when stored, else (permanent?, reason), or InFlight.
Refusal = tuple[bool, str] | InFlight | None
Report = Callable[[Delivery, Refusal], None]
Sender = Callable[[Destination, Sequence[Delivery], str, float, Report], None]
_SENDERS: dict[str, Sender] = {}


def sender(kind: str) -> Callable[[Sender], Sender]:
    def deco(fn: Sender) -> Sender:
        _SENDERS[kind] = fn
        return fn

    return deco


def send(
    dest: Destination, items: Sequence[Delivery], calling_aet: str, timeout: float, report: Report
) -> None:
    _SENDERS[dest.kind](dest, items, calling_aet, timeout, report)


# C-STORE statuses (PS3.4 B.2.3, PS3.7 C) that say the destination could not store
# the object now, not that the object is bad: out of resources (A7xx), a general
# processing failure (0110: an I/O error, say; the node answers it for its own) and a
# resource limitation (0213). Retried with the backoff; any other failure is for good.
_STORED = frozenset({0x0000, 0xB000, 0xB006, 0xB007})
_NOT_NOW = frozenset({0x0110, 0x0213})


def refusal(code: int, how: str) -> Refusal:
    """What a C-STORE status, or a STOW-RS Failure Reason, means for a delivery."""
    if code in _STORED:
        return None
    transient = (code & 0xFF00) == 0xA700 or code in _NOT_NOW
    return (not transient, f"{how} 0x{code:04X}" + (" (not now: retried)" if transient else ""))


def _gone(item: Delivery) -> Refusal:
    """A result file that is no longer there (removed by hand, or by a disk cleanup)
    is refused for good: retrying cannot bring it back, a reprocess can."""
    if item.path.is_file():
        return None
    return (True, f"result file {item.path.name} is gone: reprocess the run to write it again")


def _read(item: Delivery, report: Report) -> Dataset | None:
    """The result's data set, or None once its refusal is reported: for good when the
    file is gone or does not parse, for this item only and later on an I/O error. A
    file that cannot be sent never holds back the others of its batch."""
    if gone := _gone(item):
        report(item, gone)
        return None
    try:
        return dcmread(item.path)
    except OSError as exc:
        report(item, (False, f"result file cannot be read: {exc}"))
    except Exception as exc:  # noqa: BLE001 - a file that does not parse
        report(item, (True, f"result file cannot be read: {type(exc).__name__}: {exc}"))
    return None


def associate(
    dest: DimseDestination,
    contexts: list[Any],
    calling_aet: str,
    timeout: float,
    ext_neg: list[Any] | None = None,
) -> Association:
    """An association with ``dest`` (over TLS where it says so), each wait bounded by
    ``timeout``, or a ``DeliveryError`` that says why there is none."""
    ae = AE(ae_title=calling_aet)
    # connection_timeout too: without it, a host that drops the SYN holds the attempt
    # for the system's connect timeout (134 s here), whatever timeout_s says.
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    tls_args = None
    if dest.tls:
        try:
            tls_args = (client_context(dest), dest.tls_server_name or dest.host)
        except ConfigError as exc:  # a certificate file changed since the node started
            raise DeliveryError(str(exc)) from None
    answers: list[Any] = []  # the A-ASSOCIATE response, whose rejection says why
    assoc = ae.associate(
        dest.host,
        dest.port,
        contexts=contexts,
        ae_title=dest.ae_title,
        tls_args=tls_args,
        ext_neg=ext_neg,
        evt_handlers=[(evt.EVT_ACSE_RECV, lambda event: answers.append(event.primitive))],
    )
    if not assoc.is_established:
        why = "aborted" if assoc.is_aborted else "no association"
        if assoc.is_rejected:
            why = "rejected" + "".join(
                f" ({a.result_str}, {a.source_str}: {a.reason_str})"
                for a in answers[-1:]
                if isinstance(a, A_ASSOCIATE) and a.result in (0x01, 0x02)
            )
        if dest.tls and not assoc.is_rejected:
            why += " (TLS: is the port TLS, and its certificate signed by tls_ca_file for "
            why += f"{dest.tls_server_name or dest.host}?)"
        raise DeliveryError(f"{dest.name}: {why} at {dest.host}:{dest.port} ({dest.ae_title})")
    # pynetdicom sends with no timeout once connected: a peer that stops reading
    # (a hung PACS) would hold this thread as long as it hangs. With one, a send that
    # makes no progress for ``timeout`` s ends the association (no response: deferred).
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if isinstance(sock, socket.socket):
        sock.settimeout(timeout)
    return assoc


@sender("dimse")
def cstore(
    dest: Destination, items: Sequence[Delivery], calling_aet: str, timeout: float, report: Report
) -> None:
    """One association proposing only the SOP classes in the batch (Explicit and Implicit LE)."""
    assert isinstance(dest, DimseDestination)
    classes = sorted({i.sop_class_uid for i in items})
    if len(classes) > 128:
        raise DeliveryError("more than 128 SOP classes in one batch")
    assoc = associate(dest, [build_context(c) for c in classes], calling_aet, timeout)
    try:
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        for item in items:
            if item.sop_class_uid not in accepted:  # pynetdicom would raise ValueError
                report(item, (True, f"{dest.name} did not accept SOP Class {item.sop_class_uid}"))
                continue
            ds = _read(item, report)
            if ds is None:
                continue
            status = assoc.send_c_store(ds)
            if not status or "Status" not in status:
                # The object in flight may be why (a PACS that aborts on what it cannot
                # take, instead of refusing it): it goes again after the others.
                report(
                    item,
                    InFlight(
                        f"{dest.name} ended the association during its C-STORE (it may not "
                        "take this object): sent again after the others"
                    ),
                )
                raise DeliveryError(f"{dest.name}: no C-STORE response (connection lost)")
            report(item, refusal(int(status.Status), "C-STORE status"))
    finally:
        if assoc.is_established:
            assoc.release()


@sender("dicomweb")
def stow(
    dest: Destination, items: Sequence[Delivery], calling_aet: str, timeout: float, report: Report
) -> None:
    """STOW-RS: one multipart/related POST per instance to {url}/studies, over one session,
    so that each instance's outcome is known and recorded before the next is sent."""
    assert isinstance(dest, DicomwebDestination)
    with requests.Session() as session:
        if dest.bearer_token:
            session.headers["Authorization"] = f"Bearer {dest.bearer_token}"
        elif dest.username:
            session.auth = (dest.username, dest.password or "")
        for item in items:
            try:
                body = item.path.read_bytes()
            except OSError as exc:
                report(item, _gone(item) or (False, f"result file cannot be read: {exc}"))
                continue
            report(item, _stow_one(session, dest, item, body, timeout))


def _stow_one(
    session: requests.Session,
    dest: DicomwebDestination,
    item: Delivery,
    data: bytes,
    timeout: float,
) -> Refusal:
    boundary = f"angio-node-{uuid.uuid4().hex}"
    body = b"".join(
        (
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(),
            data,
            f"\r\n--{boundary}--\r\n".encode(),
        )
    )
    headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json",
    }
    url = f"{dest.url}/studies"
    try:
        # A redirect is not followed: requests would follow a 302 with a GET, and a sign-in
        # page's 200 would read as the instance stored.
        resp = session.post(url, data=body, headers=headers, timeout=timeout, allow_redirects=False)
    except requests.RequestException as exc:
        raise DeliveryError(f"{dest.name}: {exc}") from None
    code = resp.status_code
    if code == 500:
        # A server error on this request: the object may be why (a server that fails on
        # what it cannot parse). It goes again after the others, as a C-STORE that
        # ended the association does; the destination's own "not now" (408, 429, 502,
        # 503, 504 ...) defers the batch.
        return InFlight(
            "STOW-RS HTTP 500 (the destination failed on it): sent again after the others"
        )
    if code in (408, 429) or code >= 500:
        raise DeliveryError(f"{dest.name}: HTTP {code}")
    if code in (401, 403):
        raise DeliveryError(f"{dest.name}: HTTP {code} (check credentials)")
    # What says that the url is not a STOW-RS service (no result is stored there, nor
    # would any be): the results wait, as for a destination down, until it is put right.
    if 300 <= code < 400:
        where = _shown(resp.headers.get("Location", ""))
        raise DeliveryError(
            f"{dest.name}: HTTP {code}, a redirect to {where} (not followed: set url to the "
            "DICOMweb service itself)"
        )
    if code in (404, 405):
        raise DeliveryError(
            f"{dest.name}: HTTP {code} (no STOW-RS service at {_shown(url)}: check url)"
        )
    answer = _json_object(resp)
    failed = _stow_failures(answer)
    if item.sop_instance_uid in failed:
        reason = failed[item.sop_instance_uid]
        if reason is None:
            return (True, "STOW-RS refused it (no Failure Reason)")
        return refusal(reason, "STOW-RS Failure Reason") or (True, f"STOW-RS refused it: {reason}")
    if code not in (200, 202):
        return (True, f"STOW-RS HTTP {code}")
    if answer is None:
        kind = resp.headers.get("Content-Type", "no Content-Type").split(";")[0]
        raise DeliveryError(
            f"{dest.name}: HTTP {code} with a body that is not a STOW-RS response ({kind}; "
            f"is {_shown(dest.url)} the DICOMweb service?)"
        )
    if item.sop_instance_uid not in _stow_stored(answer):
        raise DeliveryError(
            f"{dest.name}: HTTP {code} whose Referenced SOP Sequence does not name this "
            "instance as stored (PS3.18 10.5.3: a stored instance is referenced there)"
        )
    return None


def _shown(url: str) -> str:
    """A URL as the status and the log may show it: no user or password, no query."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"  # IPv6
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}" if parts.scheme else parts.path


def _json_object(resp: requests.Response) -> dict[str, object] | None:
    """The response's body as a JSON object, or None (not JSON, or another value)."""
    try:
        body = resp.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _entries(answer: dict[str, object] | None, tag: str) -> list[dict[str, object]]:
    """The items of a sequence of a DICOM JSON object, whatever the shape of the rest."""
    sequence = answer.get(tag) if answer is not None else None
    entries = sequence.get("Value") if isinstance(sequence, dict) else None
    return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []


def _stow_stored(answer: dict[str, object] | None) -> set[str]:
    """SOP Instance UIDs in the response's Referenced SOP Sequence (0008,1199)."""
    uids = (_first(e, "00081155") for e in _entries(answer, "00081199"))
    return {u for u in uids if isinstance(u, str)}


def _stow_failures(answer: dict[str, object] | None) -> dict[str, int | None]:
    """SOP Instance UIDs in the response's Failed SOP Sequence (0008,1198), each with
    its Failure Reason (0008,1197), None where there is none that reads as a number."""
    failed: dict[str, int | None] = {}
    for entry in _entries(answer, "00081198"):
        uid = _first(entry, "00081155")
        reason = _first(entry, "00081197")
        if isinstance(uid, str):
            failed[uid] = (
                reason if isinstance(reason, int) and not isinstance(reason, bool) else None
            )
    return failed


def _first(entry: dict[str, object], tag: str) -> object:
    """The first value of a DICOM JSON attribute, or None."""
    attr = entry.get(tag)
    values = attr.get("Value") if isinstance(attr, dict) else None
    return values[0] if isinstance(values, list) and values else None
