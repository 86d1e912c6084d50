"""Senders: C-STORE SCU and DICOMweb STOW-RS. Each sends a batch of files to one
destination and says, per file, whether it was stored.

A sender raises DeliveryError when the destination cannot be reached (the
outbox retries the whole batch later); a per-file refusal comes back in the
result map, permanent when the destination says the object itself is bad.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import requests
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.presentation import build_context

from dicom_node.errors import DeliveryError
from dicom_node.settings import Destination, DicomwebDestination, DimseDestination

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Item:
    id: int
    path: Path
    sop_class_uid: str
    sop_instance_uid: str


# Per item: None when stored, else (permanent?, reason).
Outcome = dict[int, tuple[bool, str] | None]
Sender = Callable[[Destination, Sequence[Item], str, float], Outcome]
_SENDERS: dict[str, Sender] = {}


def sender(kind: str) -> Callable[[Sender], Sender]:
    def deco(fn: Sender) -> Sender:
        _SENDERS[kind] = fn
        return fn

    return deco


def send(dest: Destination, items: Sequence[Item], calling_aet: str, timeout: float) -> Outcome:
    return _SENDERS[dest.kind](dest, items, calling_aet, timeout)


@sender("dimse")
def cstore(dest: Destination, items: Sequence[Item], calling_aet: str, timeout: float) -> Outcome:
    """One association proposing only the SOP classes in the batch (Explicit and Implicit LE)."""
    assert isinstance(dest, DimseDestination)
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    classes = sorted({i.sop_class_uid for i in items})
    if len(classes) > 128:
        raise DeliveryError("more than 128 SOP classes in one batch")
    contexts = [build_context(c) for c in classes]
    assoc = ae.associate(dest.host, dest.port, contexts=contexts, ae_title=dest.ae_title)
    if not assoc.is_established:
        why = (
            "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "no association"
        )
        raise DeliveryError(f"{dest.name}: {why} at {dest.host}:{dest.port} ({dest.ae_title})")
    outcome: Outcome = {}
    try:
        for item in items:
            ds = dcmread(item.path)
            status = assoc.send_c_store(ds)
            if not status or "Status" not in status:
                raise DeliveryError(f"{dest.name}: no C-STORE response (connection lost)")
            code = int(status.Status)
            if code in (0x0000, 0xB000, 0xB007, 0xB006):
                outcome[item.id] = None
            else:
                # 0xA7xx out of resources is transient; other refusals are about the object
                transient = (code & 0xFF00) == 0xA700
                outcome[item.id] = (not transient, f"C-STORE status 0x{code:04X}")
    finally:
        if assoc.is_established:
            assoc.release()
    return outcome


@sender("dicomweb")
def stow(dest: Destination, items: Sequence[Item], calling_aet: str, timeout: float) -> Outcome:
    """STOW-RS: one multipart/related POST of application/dicom parts to {url}/studies."""
    assert isinstance(dest, DicomwebDestination)
    boundary = f"angio-node-{uuid.uuid4().hex}"
    parts = []
    for item in items:
        parts.append(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
        parts.append(item.path.read_bytes())
        parts.append(b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json",
    }
    auth = None
    if dest.bearer_token:
        headers["Authorization"] = f"Bearer {dest.bearer_token}"
    elif dest.username:
        auth = (dest.username, dest.password or "")
    try:
        resp = requests.post(
            f"{dest.url}/studies", data=b"".join(parts), headers=headers, auth=auth, timeout=timeout
        )
    except requests.RequestException as exc:
        raise DeliveryError(f"{dest.name}: {exc}") from None
    if resp.status_code in (502, 503, 504, 429) or resp.status_code >= 500:
        raise DeliveryError(f"{dest.name}: HTTP {resp.status_code}")
    if resp.status_code in (401, 403):
        raise DeliveryError(f"{dest.name}: HTTP {resp.status_code} (check credentials)")
    failed = _stow_failures(resp)
    outcome: Outcome = {}
    for item in items:
        if item.sop_instance_uid in failed:
            outcome[item.id] = (True, f"STOW-RS refused: {failed[item.sop_instance_uid]}")
        elif resp.status_code in (200, 202):
            outcome[item.id] = None
        else:
            outcome[item.id] = (resp.status_code < 500, f"STOW-RS HTTP {resp.status_code}")
    return outcome


def _stow_failures(resp: requests.Response) -> dict[str, str]:
    """SOP Instance UIDs in the response's Failed SOP Sequence (0008,1198)."""
    try:
        body = resp.json()
    except ValueError:
        return {}
    failed = {}
    for entry in (
        (body.get("00081198", {}) or {}).get("Value", []) if isinstance(body, dict) else []
    ):
        uid = entry.get("00081155", {}).get("Value", [""])[0]
        reason = entry.get("00081197", {}).get("Value", ["?"])[0]
        failed[uid] = f"failure reason {reason}"
    return failed
