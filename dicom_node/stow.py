"""STOW-RS into the node, so that Orthanc's DICOMweb client (the plugin's
``"Transport": "dicomweb"``) or any STOW-RS sender can push runs over HTTP::

    POST /dicom-web/studies          multipart/related; type="application/dicom"
    POST /dicom-web/studies/{study}  every instance must belong to {study}

Each part goes through the same ``Ingest.receive`` as a C-STORE (header checks,
limits, durable write, index, completion), so the HTTP path cannot bypass what
the SCP enforces and answers the same statuses. The answer is the PS3.18 store response in DICOM JSON:
Referenced SOP Sequence (0008,1199) for what was stored, Failed SOP Sequence
(0008,1198) with the DIMSE status as Failure Reason (0008,1197) for what was
refused; HTTP 200 when all were stored, 202 when some, 409 when none.

The body is read whole (at most ``MAX_BODY`` bytes), so very large runs are
better sent by C-STORE.
"""

from __future__ import annotations

import logging
import re
from email.message import Message
from io import BytesIO
from typing import Any

from pydicom import dcmread
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.uid import DeflatedExplicitVRLittleEndian

from dicom_node.errors import RejectedInstance
from dicom_node.ingest import Ingest
from dicom_node.spool import PARSE_ERRORS, check_uid

log = logging.getLogger(__name__)
MAX_BODY = 2 * 2**30
STOW_PATH = re.compile(r"^/dicom-web/studies(?:/([0-9.]{1,64}))?/?$")
# The calling "AE" recorded for instances that came by STOW-RS (routing can match it).
STOW_SOURCE = "STOW-RS"


class StowError(Exception):
    """The request as a whole is refused (an HTTP status, not a per-instance failure)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def split_multipart(content_type: str, body: bytes) -> list[tuple[str, bytes]]:
    """(content type, bytes) of each part of a multipart/related body (RFC 2046)."""
    msg = Message()
    msg["Content-Type"] = content_type
    if msg.get_content_type() != "multipart/related":
        raise StowError(
            415, f"STOW-RS needs multipart/related, got {content_type or 'no Content-Type'!r}"
        )
    boundary = msg.get_param("boundary")
    if not boundary or not isinstance(boundary, str):
        raise StowError(400, "multipart/related without a boundary")
    default_type = str(msg.get_param("type") or "application/dicom")
    delimiter = b"--" + boundary.encode()
    start = body.find(delimiter)
    if start < 0:
        raise StowError(400, "multipart body without its boundary")
    parts: list[tuple[str, bytes]] = []
    pos = start + len(delimiter)
    while not body.startswith(b"--", pos):
        head_end = body.find(b"\r\n\r\n", pos)
        if head_end < 0:
            raise StowError(400, f"multipart part {len(parts) + 1} has no header end")
        headers = Message()
        for line in body[pos:head_end].decode("latin-1").split("\r\n"):
            if ":" in line:
                key, _, value = line.partition(":")
                headers[key.strip()] = value.strip()
        end = body.find(b"\r\n" + delimiter, head_end + 4)
        if end < 0:
            raise StowError(400, f"multipart part {len(parts) + 1} is not closed by the boundary")
        parts.append(
            (
                headers.get_content_type() if headers["Content-Type"] else default_type,
                body[head_end + 4 : end],
            )
        )
        pos = end + 2 + len(delimiter)
    return parts


def read_body(headers: Any, rfile: Any, limit: int = MAX_BODY) -> bytes:
    """The request body, by Content-Length or chunked (Orthanc's STOW client streams)."""
    if "chunked" in str(headers.get("Transfer-Encoding", "")).lower():
        chunks: list[bytes] = []
        total = 0
        while True:
            line = rfile.readline(1024).split(b";")[0].strip()
            try:
                size = int(line, 16)
            except ValueError:
                raise StowError(400, f"bad chunk size {line[:20]!r}") from None
            if size == 0:
                while rfile.readline(1024).strip():  # trailers
                    pass
                return b"".join(chunks)
            total += size
            if total > limit:
                raise StowError(413, f"body larger than {limit} bytes")
            chunks.append(rfile.read(size))
            rfile.readline(8)  # CRLF after the chunk
    try:
        length = int(headers.get("Content-Length") or 0)
    except ValueError:
        raise StowError(400, "bad Content-Length") from None
    if length > limit:
        raise StowError(413, f"body of {length} bytes is larger than {limit}")
    return bytes(rfile.read(length))


def _uids(data: bytes) -> tuple[str, str, str]:
    """(SOP Class, SOP Instance, Study Instance UID) as far as the header can be read,
    each empty unless it is a valid UID. A deflated data set is not inflated here
    (the spool inflates it with a bound): its file meta names the first two."""
    try:
        fp = BytesIO(data)
        read_preamble(fp, True)
        meta = _read_file_meta_info(fp)
        if meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
            values = [
                meta.get("MediaStorageSOPClassUID"),
                meta.get("MediaStorageSOPInstanceUID"),
                "",
            ]
        else:
            ds = dcmread(BytesIO(data), force=True, stop_before_pixels=True)
            values = [ds.get(k) for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID")]
    except PARSE_ERRORS:
        return "", "", ""
    out = []
    for v in values:
        try:
            out.append(check_uid("UID", v))
        except RejectedInstance:
            out.append("")
    return out[0], out[1], out[2]


def _item(sop_class: str, sop_uid: str, reason: int | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {
        "00081150": {"vr": "UI", "Value": [sop_class]} if sop_class else {"vr": "UI"},
        "00081155": {"vr": "UI", "Value": [sop_uid]} if sop_uid else {"vr": "UI"},
    }
    if reason is not None:
        item["00081197"] = {"vr": "US", "Value": [reason]}
    return item


def stow(ingest: Ingest, path: str, content_type: str, body: bytes) -> tuple[int, dict[str, Any]]:
    """Store every application/dicom part; returns (HTTP status, DICOM JSON response)."""
    match = STOW_PATH.match(path)
    if match is None:
        raise StowError(404, f"no STOW-RS route {path}")
    target_study = match.group(1)
    stored, failed = [], []
    for i, (ctype, data) in enumerate(split_multipart(content_type, body), start=1):
        sop_class, sop_uid, study = _uids(data)
        if ctype != "application/dicom":
            log.warning("STOW-RS part %d refused: %s parts are not accepted", i, ctype)
            failed.append(_item(sop_class, sop_uid, RejectedInstance.SOP_CLASS_NOT_SUPPORTED))
            continue
        if target_study and study != target_study:
            log.warning(
                "STOW-RS part %d refused: study %s is not the target %s", i, study, target_study
            )
            failed.append(_item(sop_class, sop_uid, RejectedInstance.CANNOT_UNDERSTAND))
            continue
        receipt = ingest.receive(data, "", STOW_SOURCE)
        if receipt.ok:
            stored.append(_item(sop_class, sop_uid))
        else:
            failed.append(_item(sop_class, sop_uid, receipt.status))
    if not stored and not failed:
        raise StowError(400, "multipart body with no part")
    response: dict[str, Any] = {}
    if stored:
        response["00081199"] = {"vr": "SQ", "Value": stored}
    if failed:
        response["00081198"] = {"vr": "SQ", "Value": failed}
    return (200 if not failed else 202 if stored else 409), response
