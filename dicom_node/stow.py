"""STOW-RS into the node, so that Orthanc's DICOMweb client (the plugin's
``"Transport": "dicomweb"``) or any STOW-RS sender can push runs over HTTP::

    POST /dicom-web/studies          multipart/related; type="application/dicom"
    POST /dicom-web/studies/{study}  every instance must belong to {study}

Each part goes through the same ``Ingest.receive`` as a C-STORE (header checks,
limits, durable write, index, completion), so the HTTP path cannot bypass what
the SCP enforces and answers the same statuses. The answer is the PS3.18 store response in DICOM JSON:
Referenced SOP Sequence (0008,1199) for what was stored, Failed SOP Sequence
(0008,1198) with the DIMSE status as Failure Reason (0008,1197) for what was
refused; HTTP 200 when all were stored, 202 when some, 409 when none, and 503 with
Retry-After when none was stored for want of room only (every Failure Reason 0xA7xx):
the same request may pass later, which a STOW-RS client does not retry after 409.

The body is parsed as a stream: each part is written to a file in the spool's
``tmp/`` as it arrives (``iter_part_files``; memory holds one read of the socket,
not the part; at most ``api.max_part_bytes`` a part, else 413), moved into the
spool by the same ingest as a C-STORE's file as soon as it is whole,
and the body as a whole may not pass ``api.max_body_bytes`` (413, checked
against Content-Length before anything is read, and while reading a chunked
body). A body needs a valid Content-Length or chunked transfer coding (411 and
400 otherwise). Parts stored before a 413 stay stored, as they would have over
C-STORE; a sender that retries sends duplicates, which are idempotent.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from email.message import Message
from io import BytesIO
from pathlib import Path
from typing import Any, BinaryIO, Generic, Protocol, TypeVar

from pydicom.uid import DeflatedExplicitVRLittleEndian

from dicom_node.arrivals import InFlight
from dicom_node.errors import RejectedInstance
from dicom_node.ingest import Ingest
from dicom_node.settings import LimitsSettings
from dicom_node.spool import NOTHING_REQUESTED, PARSE_ERRORS, check_uid, read_header

log = logging.getLogger(__name__)
STOW_PATH = re.compile(r"^/dicom-web/studies(?:/([0-9.]{1,64}))?/?\Z")
# The calling "AE" recorded for instances that came by STOW-RS without a token
# (routing can match it); with tokens, the token's name.
STOW_SOURCE = "STOW-RS"
# A forwarder's (settings.forwarders) name for the sender it forwards for
SENDER_HEADER = "X-Angio-Sender"
_READ = 1 << 20  # bytes read from the socket at a time
_MAX_HEADERS = 16 << 10  # a part's header block
_MAX_PREAMBLE = 64 << 10


class StowError(Exception):
    """The request as a whole is refused (an HTTP status, not a per-instance failure)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def declared_length(headers: Any) -> int | None:
    """The body's Content-Length, or None for a chunked body; 411 / 400 / 501 otherwise."""
    coding = str(headers.get("Transfer-Encoding", "") or "").strip().lower()
    lengths = headers.get_all("Content-Length") or []
    if coding:
        if coding != "chunked":
            raise StowError(501, f"Transfer-Encoding {coding[:30]} is not supported")
        if lengths:
            raise StowError(400, "both Content-Length and Transfer-Encoding: chunked")
        return None
    if not lengths:
        raise StowError(411, "a request body needs Content-Length (or chunked transfer coding)")
    values = {v.strip() for v in lengths}
    value = values.pop()
    # ASCII digits only: str.isdigit() also takes '\xb2' (a header is read as Latin-1),
    # which int() then refuses, and the request was dropped without an answer.
    if values or not re.fullmatch(r"[0-9]{1,18}", value):
        raise StowError(400, f"bad Content-Length {','.join(lengths)[:40]}")
    return int(value)


def read_small_body(handler: Any, limit: int) -> bytes:
    """A small request body read whole (a JSON object, the status page's form): it
    must have a Content-Length of at most ``limit`` (413 otherwise, chunked too) and
    arrive whole (400: a body shorter than its Content-Length was parsed as it was).
    Marks the body read, so the handler does not drain it again before answering."""
    length = declared_length(handler.headers)
    if length is None or length > limit:
        raise StowError(413, f"a body of at most {limit} bytes, not chunked")
    handler.body_read = True
    raw = handler.rfile.read(length)
    if len(raw) != length:
        raise StowError(400, "body shorter than its Content-Length")
    return bytes(raw)


def json_object(raw: bytes) -> dict[str, Any]:
    """A request's JSON body, which must be an object (an empty body is ``{}``); 400
    otherwise: nesting too deep for the parser (it raised RecursionError) and text
    that is not Unicode (``"\\ud800"``, a lone surrogate, which SQLite cannot store)
    included. Both had the request dropped without an answer."""
    try:
        data = json.loads(raw or b"{}")
        json.dumps(data, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise StowError(400, "body has text that is not Unicode (a lone surrogate)") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        raise StowError(400, f"body is not JSON: {str(exc)[:200]}") from None
    if not isinstance(data, dict):
        raise StowError(400, "body must be a JSON object")
    return data


class BodyReader:
    """A request body as a stream: Content-Length bytes, or chunked, at most ``limit``."""

    def __init__(self, rfile: BinaryIO, length: int | None, limit: int) -> None:
        if length is not None and length > limit:
            raise StowError(413, f"body of {length} bytes is larger than {limit}")
        self.rfile = rfile
        self.length = length
        self.limit = limit
        self.total = 0
        self._chunk_left = 0
        self._done = length == 0

    def read(self, size: int = _READ) -> bytes:
        """Up to ``size`` bytes; b"" at the end of the body."""
        if self._done:
            return b""
        if self.length is not None:
            data = self.rfile.read(min(size, self.length - self.total))
            if not data:
                raise StowError(400, f"body ended after {self.total} of {self.length} bytes")
            self.total += len(data)
            self._done = self.total >= self.length
            return data
        if self._chunk_left == 0:
            self._chunk_left = self._chunk_size()
            if self._chunk_left == 0:
                self._done = True
                return b""
        data = self.rfile.read(min(size, self._chunk_left))
        if not data:
            raise StowError(400, "chunked body ended inside a chunk")
        self._chunk_left -= len(data)
        self.total += len(data)
        if self.total > self.limit:
            raise StowError(413, f"body larger than {self.limit} bytes")
        if self._chunk_left == 0 and self.rfile.readline(8).strip():
            raise StowError(400, "chunk not followed by CRLF")
        return data

    def _chunk_size(self) -> int:
        line = self.rfile.readline(1024)
        if not line.endswith(b"\n"):
            raise StowError(400, "chunk size line missing or too long")
        text = line.split(b";")[0].strip()
        if not text or len(text) > 16 or not re.fullmatch(rb"[0-9A-Fa-f]+", text):
            raise StowError(400, f"bad chunk size {text[:20]!r}")
        size = int(text, 16)
        if size == 0:
            for _ in range(100):  # trailers, up to the empty line
                if not self.rfile.readline(1024).strip():
                    break
        return size


def _boundary(content_type: str) -> tuple[bytes, str]:
    msg = Message()
    msg["Content-Type"] = content_type
    if msg.get_content_type() != "multipart/related":
        raise StowError(
            415, f"STOW-RS needs multipart/related, got {content_type[:60] or 'no Content-Type'}"
        )
    boundary = msg.get_param("boundary")
    if not boundary or not isinstance(boundary, str) or len(boundary) > 256:
        raise StowError(400, "multipart/related without a (valid) boundary")
    return b"--" + boundary.encode(), str(msg.get_param("type") or "application/dicom")


T = TypeVar("T", covariant=True)


class _Sink(Protocol, Generic[T]):
    def write(self, data: bytes | bytearray) -> None: ...
    def result(self) -> T: ...
    def discard(self) -> None: ...


class _BytesSink:
    def __init__(self) -> None:
        self.buf = bytearray()

    def write(self, data: bytes | bytearray) -> None:
        self.buf += data

    def result(self) -> bytes:
        return bytes(self.buf)

    def discard(self) -> None:
        self.buf = bytearray()


class _FileSink:
    """A part written to ``folder`` as it arrives (``.part``: the spool's recovery and
    sweep remove what a cut-off request leaves)."""

    def __init__(self, folder: Path, in_flight: InFlight | None = None) -> None:
        fd, name = tempfile.mkstemp(suffix=".part", dir=folder)
        self.fh = os.fdopen(fd, "wb")
        self.path = Path(name)
        self.in_flight = in_flight
        if in_flight is not None:  # until ``stow_parts`` is done with it, or discarded
            in_flight.add(name)

    def write(self, data: bytes | bytearray) -> None:
        self.fh.write(data)

    def result(self) -> Path:
        self.fh.close()
        return self.path

    def discard(self) -> None:
        self.fh.close()
        self.path.unlink(missing_ok=True)
        if self.in_flight is not None:
            self.in_flight.discard(str(self.path))


def iter_parts(
    content_type: str, read: Callable[[], bytes], max_part: int, max_parts: int | None = None
) -> Iterator[tuple[str, bytes]]:
    """(content type, bytes) of each part of a multipart/related stream (RFC 2046),
    each yielded as soon as it is whole; ``read`` returns b"" at the end. More than
    ``max_parts`` parts end the stream with 413."""
    return _parts(content_type, read, max_part, _BytesSink, max_parts)


def iter_part_files(
    content_type: str,
    read: Callable[[], bytes],
    max_part: int,
    folder: Path,
    max_parts: int | None = None,
    in_flight: InFlight | None = None,
) -> Iterator[tuple[str, Path]]:
    """As :func:`iter_parts`, each part written to a file in ``folder`` as it arrives;
    the file is the caller's once yielded (to move or delete). Each file is in
    ``in_flight`` from its first byte until :func:`stow_parts` is done with it."""
    return _parts(content_type, read, max_part, lambda: _FileSink(folder, in_flight), max_parts)


def _parts(
    content_type: str,
    read: Callable[[], bytes],
    max_part: int,
    new_sink: Callable[[], _Sink[T]],
    max_parts: int | None = None,
) -> Iterator[tuple[str, T]]:
    delimiter, default_type = _boundary(content_type)
    buf = bytearray()
    eof = False

    def fill() -> bool:
        nonlocal eof
        if eof:
            return False
        data = read()
        if not data:
            eof = True
            return False
        buf.extend(data)
        return True

    while (start := buf.find(delimiter)) < 0:
        if len(buf) > _MAX_PREAMBLE or not fill():
            raise StowError(400, "multipart body without its boundary")
    del buf[: start + len(delimiter)]
    number = 0
    while True:
        while len(buf) < 2 and fill():
            pass
        if buf.startswith(b"--"):
            return  # the close delimiter; the epilogue is ignored
        number += 1
        if max_parts is not None and number > max_parts:
            # each part costs its answer's item and its work: a body of tiny parts
            # would otherwise hold the request, and the node's memory, without bound
            raise StowError(
                413,
                f"more than {max_parts} parts in one request ([api] max_parts); the "
                "parts before were stored: send the rest in another request",
            )
        while (head_end := buf.find(b"\r\n\r\n")) < 0:
            if len(buf) > _MAX_HEADERS or not fill():
                raise StowError(400, f"multipart part {number} has no header end")
        headers = Message()
        for line in bytes(buf[:head_end]).decode("latin-1").split("\r\n"):
            if ":" in line:
                key, _, value = line.partition(":")
                headers[key.strip()] = value.strip()
        del buf[: head_end + 4]
        closing = b"\r\n" + delimiter
        keep = len(closing) - 1  # a delimiter may straddle two reads
        sink = new_sink()
        written = 0
        try:
            while (end := buf.find(closing)) < 0:
                if len(buf) > keep:
                    sink.write(buf[:-keep])
                    written += len(buf) - keep
                    del buf[:-keep]
                if written > max_part:
                    raise StowError(413, f"multipart part {number} is larger than {max_part} bytes")
                if not fill():
                    raise StowError(400, f"multipart part {number} is not closed by the boundary")
            if written + end > max_part:
                raise StowError(413, f"multipart part {number} is larger than {max_part} bytes")
            sink.write(buf[:end])
        except BaseException:
            sink.discard()
            raise
        del buf[: end + len(closing)]
        ctype = headers.get_content_type() if headers["Content-Type"] else default_type
        yield ctype, sink.result()


def split_multipart(content_type: str, body: bytes) -> list[tuple[str, bytes]]:
    """Every part of a whole multipart/related body (for bodies already in memory)."""
    stream = BytesIO(body)
    return list(iter_parts(content_type, lambda: stream.read(_READ), len(body) + 1))


def _uids(data: bytes | Path, limits: LimitsSettings) -> tuple[str, str, str]:
    """(SOP Class, SOP Instance, Study Instance UID) as far as the header can be read
    within the limits, each empty unless it is a valid UID. A deflated data set is not
    inflated here (the spool inflates it with a bound): its file meta names the first
    two."""
    try:
        with open(data, "rb") if isinstance(data, Path) else BytesIO(data) as fp:
            ds, _ = read_header(fp, limits, inflate=False)
    except (RejectedInstance, OSError):
        return "", "", ""
    if ds.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        values = [
            ds.file_meta.get("MediaStorageSOPClassUID"),
            ds.file_meta.get("MediaStorageSOPInstanceUID"),
            "",
        ]
    else:
        try:
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


def stow_parts(
    ingest: Ingest,
    path: str,
    parts: Iterator[tuple[str, bytes | Path]],
    source: str = STOW_SOURCE,
    peer: str = "",
    named_sender: str = "",
) -> tuple[int, dict[str, Any]]:
    """Store every application/dicom part as it arrives; (HTTP status, DICOM JSON).
    A part given as a file is moved into the spool when stored, else deleted.
    ``named_sender``: the request's ``X-Angio-Sender`` (``ingest.sender_of``)."""
    match = STOW_PATH.match(path)
    if match is None:
        raise StowError(404, f"no STOW-RS route {path}")
    target_study = match.group(1)
    stored: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    for i, (ctype, data) in enumerate(parts, start=1):
        try:
            item = _stow_part(ingest, i, ctype, data, target_study, source, peer, named_sender)
        finally:
            if isinstance(data, Path):
                data.unlink(missing_ok=True)  # gone already when stored (moved)
                ingest.in_flight.discard(str(data))
        (failed if "00081197" in item else stored).append(item)
    if not stored and not failed:
        raise StowError(400, "multipart body with no part")
    response: dict[str, Any] = {}
    if stored:
        response["00081199"] = {"vr": "SQ", "Value": stored}
    if failed:
        response["00081198"] = {"vr": "SQ", "Value": failed}
    if not failed:
        return 200, response
    if stored:
        return 202, response
    busy = all(item["00081197"]["Value"][0] & 0xFF00 == 0xA700 for item in failed)
    return (503 if busy else 409), response


def _stow_part(
    ingest: Ingest,
    i: int,
    ctype: str,
    data: bytes | Path,
    target_study: str | None,
    source: str,
    peer: str,
    named_sender: str,
) -> dict[str, Any]:
    """One part's item of the response: Referenced SOP, or Failed SOP with its reason."""
    sop_class, sop_uid, study = _uids(data, ingest.spool.limits)
    if ctype != "application/dicom":
        log.warning("STOW-RS part %d refused: %s parts are not accepted", i, ctype[:60])
        status, reason = RejectedInstance.SOP_CLASS_NOT_SUPPORTED, f"{ctype[:60]} part"
    elif target_study and study != target_study:
        log.warning(
            "STOW-RS part %d refused: study %s is not the target %s", i, study, target_study
        )
        status, reason = (
            RejectedInstance.CANNOT_UNDERSTAND,
            f"not of the target study {target_study}",
        )
    else:
        receipt = ingest.receive(data, NOTHING_REQUESTED, source, "stow", peer, named_sender)
        if receipt.ok:
            return _item(sop_class, sop_uid)
        status, reason = receipt.status, receipt.reason
    ingest.refusals.note(sop_uid, status, reason, source)
    return _item(sop_class, sop_uid, status)


def stow(ingest: Ingest, path: str, content_type: str, body: bytes) -> tuple[int, dict[str, Any]]:
    """STOW-RS of a body already in memory."""
    if STOW_PATH.match(path) is None:
        raise StowError(404, f"no STOW-RS route {path}")
    return stow_parts(ingest, path, iter(split_multipart(content_type, body)))
