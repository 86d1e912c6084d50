"""The REST routes of the scale-out workers, all behind the ``worker`` scope::

    GET  /dicom-web/studies/{study}/series/{series}[/instances/{sop}]   WADO-RS retrieve
    GET  /worker/results/{sop}             a result an earlier job queued (supersession)
    GET  /worker/jobs/{id}/instances?generation=N   the run's instances, when too many
                                           to go in the workflow's input
    POST /worker/jobs/{id}/started         {"generation", "attempt", "worker"}
    POST /worker/jobs/{id}/results?generation=N   STOW-RS of the job's result objects

A worker on another machine needs no access to the node's storage: it fetches
the run over WADO-RS and hands its results back by STOW-RS. The spool is served
read-only and as stored (``transfer-syntax=*``): the node never transcodes, so it
never decodes pixel data from the network. Only indexed instances are served,
looked up by UID, never by a path from the request. Results go to
``results/<job>/<sop>.dcm`` (written atomically, header checked, pixels not
read), only while the job's workflow is the current one and unsettled; the
index records them when the workflow reports the job done. Retrievals and
uploads go to the audit trail.
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from collections.abc import Iterator
from email.message import Message
from http.server import BaseHTTPRequestHandler
from io import BytesIO
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs

from pydicom import dcmread

from dicom_node import stow
from dicom_node.audit import INSTANCES_ACCESSED, INSTANCES_TRANSFERRED, AuditTrail
from dicom_node.db import Database, InstanceRecord
from dicom_node.errors import RejectedInstance
from dicom_node.settings import Settings
from dicom_node.spool import PARSE_ERRORS, check_uid

log = logging.getLogger(__name__)

_UID = r"([0-9.]{1,64})"
WADO_PATH = re.compile(rf"^/dicom-web/studies/{_UID}/series/{_UID}(?:/instances/{_UID})?\Z")
STARTED_PATH = re.compile(r"^/worker/jobs/(\d{1,18})/started\Z")
RESULTS_PATH = re.compile(r"^/worker/jobs/(\d{1,18})/results\Z")
INSTANCES_PATH = re.compile(r"^/worker/jobs/(\d{1,18})/instances\Z")
PRIOR_PATH = re.compile(rf"^/worker/results/{_UID}\Z")
EXPLICIT_LE = "1.2.840.10008.1.2.1"  # PS3.18: the transfer syntax when none is asked for
_CHUNK = 1 << 20
_MAX_JSON = 4096


class WorkerApiError(stow.StowError):
    """The request as a whole is refused with an HTTP status (answered like STOW-RS's)."""


class Node(Protocol):
    settings: Settings
    db: Database
    audit: AuditTrail


def handles(method: str, path: str) -> bool:
    return path.startswith("/worker/") or (
        method == "GET" and path.startswith("/dicom-web/studies/")
    )


def serve(handler: BaseHTTPRequestHandler, node: Node, method: str, path: str, who: str) -> None:
    """Answer one worker route on ``handler`` (the caller checked the ``worker`` scope)."""
    peer = f"{handler.client_address[0]}:{handler.client_address[1]}"
    if method == "GET" and (m := WADO_PATH.match(path)):
        _retrieve(handler, node, who, peer, m.group(1), m.group(2), m.group(3))
    elif method == "GET" and (m := PRIOR_PATH.match(path)):
        _prior(handler, node, who, peer, m.group(1))
    elif method == "GET" and (m := INSTANCES_PATH.match(path)):
        _run_instances(handler, node, int(m.group(1)))
    elif method == "POST" and (m := STARTED_PATH.match(path)):
        _started(handler, node, int(m.group(1)))
    elif method == "POST" and (m := RESULTS_PATH.match(path)):
        _results(handler, node, who, peer, int(m.group(1)))
    else:
        raise WorkerApiError(404 if method == "GET" else 405, f"no route {method} {path}")


# -- WADO-RS -----------------------------------------------------------------------
def accepts(accept: str | None, transfer_syntax: str) -> bool:
    """Whether an Accept header takes a part in ``transfer_syntax`` as stored."""
    if not accept or accept.strip() == "*/*":
        return transfer_syntax == EXPLICIT_LE
    for item in accept.split(","):
        msg = Message()
        msg["Content-Type"] = item.strip()
        kind = msg.get_content_type()
        if kind not in ("multipart/related", "*/*"):
            continue
        if str(msg.get_param("type") or "application/dicom") != "application/dicom":
            continue
        wanted = str(msg.get_param("transfer-syntax") or EXPLICIT_LE)
        if wanted in ("*", transfer_syntax):
            return True
    return False


def _instances(db: Database, study: str, series: str, sop: str | None) -> list[InstanceRecord]:
    if sop is not None:
        one = db.series_instance(study, series, sop)
        found = [one] if one is not None else []
    else:
        found = db.series_instances(study, series)
    if not found:
        raise WorkerApiError(404, "no such instance on this node" if sop else "no such series")
    return found


def _retrieve(
    handler: BaseHTTPRequestHandler,
    node: Node,
    who: str,
    peer: str,
    study: str,
    series: str,
    sop: str | None,
) -> None:
    found = _instances(node.db, study, series, sop)
    accept = handler.headers.get("Accept")
    refused = sorted({i.transfer_syntax for i in found if not accepts(accept, i.transfer_syntax)})
    if refused:
        raise WorkerApiError(
            406,
            f"stored as {', '.join(refused)}; the node serves instances as stored: ask for "
            'multipart/related; type="application/dicom"; transfer-syntax=*',
        )
    files = [(i.transfer_syntax, Path(i.path)) for i in found]
    if any(not path.is_file() for _, path in files):
        raise WorkerApiError(410, "an indexed instance is no longer in the spool")
    _send_files(handler, files)
    node.audit.record(
        "instances-retrieved",
        INSTANCES_ACCESSED,
        action="R",
        who=who,
        peer=peer,
        study_uid=study,
        series_uid=series,
        sop_instance_uids=[i.sop_instance_uid for i in found],
    )


def _send_files(handler: BaseHTTPRequestHandler, files: list[tuple[str, Path]]) -> None:
    """A multipart/related answer, one application/dicom part per file, streamed."""
    boundary = uuid.uuid4().hex
    heads = []
    for syntax, path in files:
        param = f"; transfer-syntax={syntax}" if syntax else ""
        size = path.stat().st_size
        heads.append(
            f"--{boundary}\r\nContent-Type: application/dicom{param}\r\n"
            f"Content-Length: {size}\r\n\r\n".encode()
        )
    tail = f"--{boundary}--\r\n".encode()
    length = sum(len(h) + p.stat().st_size + 2 for h, (_, p) in zip(heads, files, strict=True))
    handler.send_response(200)
    handler.send_header(
        "Content-Type", f'multipart/related; type="application/dicom"; boundary={boundary}'
    )
    handler.send_header("Content-Length", str(length + len(tail)))
    handler.send_header("Cache-Control", "no-store")
    handler.end_headers()
    handler.status = 200  # type: ignore[attr-defined]
    if handler.command == "HEAD":
        return
    for head, (_, path) in zip(heads, files, strict=True):
        handler.wfile.write(head)
        with open(path, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                handler.wfile.write(chunk)
        handler.wfile.write(b"\r\n")
    handler.wfile.write(tail)


def _prior(handler: BaseHTTPRequestHandler, node: Node, who: str, peer: str, sop: str) -> None:
    path = node.db.result_path(sop)
    if path is None or not path.is_file():
        raise WorkerApiError(404, "no such result on this node")
    _send_files(handler, [("", path)])
    node.audit.record(
        "result-retrieved", INSTANCES_ACCESSED, action="R", who=who, peer=peer, sop_instance_uid=sop
    )


# -- the worker reporting ------------------------------------------------------------
def _json_body(handler: BaseHTTPRequestHandler) -> dict[str, Any]:
    return stow.json_object(stow.read_small_body(handler, _MAX_JSON))


def _int(data: dict[str, Any] | dict[str, list[str]], key: str) -> int:
    """A whole number from 0 to 2^63 - 1 (what SQLite stores): a JSON integer, or
    digits in a query. Floats, booleans and larger numbers are refused (an infinite
    float and a number past SQLite's range dropped the request without an answer)."""
    value = data.get(key)
    if isinstance(value, list):
        value = value[0] if value else None
    if isinstance(value, str) and re.fullmatch(r"[0-9]{1,19}", value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise WorkerApiError(400, f"{key}: a whole number from 0 to 2^63 - 1")
    return value


def _started(handler: BaseHTTPRequestHandler, node: Node, job_id: int) -> None:
    body = _json_body(handler)
    generation, attempt = _int(body, "generation"), _int(body, "attempt")
    worker = str(body.get("worker", ""))[:200] or "unnamed worker"
    if not node.db.dispatched_job_started(job_id, generation, attempt, worker):
        raise WorkerApiError(409, f"job {job_id} (generation {generation}) is not expected")
    log.info("job %d: attempt %d on worker %s", job_id, attempt, worker)
    _answer(handler, 200, {"job": job_id, "state": "running"})


def _run_instances(handler: BaseHTTPRequestHandler, node: Node, job_id: int) -> None:
    """What the workflow input of a run of many instances leaves out (``InstanceRef``s,
    in the order the input would carry them); only for the job's current workflow."""
    generation = _int(parse_qs(handler.path.partition("?")[2]), "generation")
    run_id = node.db.dispatched_job_run(job_id, generation)
    if run_id is None:
        raise WorkerApiError(409, f"job {job_id} (generation {generation}) is not expected")
    storage = node.settings.storage_dir
    instances = [
        {"sop_instance_uid": i.sop_instance_uid, "relpath": relative(Path(i.path), storage)}
        for i in node.db.run_instances(run_id)
    ]
    _answer(handler, 200, {"job": job_id, "instances": instances})


def relative(path: Path, storage: Path) -> str:
    """A spool path as a worker that shares the storage finds it (below storage_dir)."""
    try:
        return str(path.relative_to(storage))
    except ValueError:
        return path.name


def _results(handler: BaseHTTPRequestHandler, node: Node, who: str, peer: str, job_id: int) -> None:
    query = parse_qs(handler.path.partition("?")[2])
    generation = _int(query, "generation")
    if not node.db.dispatched_job_open(job_id, generation):
        raise WorkerApiError(409, f"job {job_id} (generation {generation}) takes no results")
    api = node.settings.api
    reader = stow.BodyReader(
        handler.rfile,  # type: ignore[arg-type]
        stow.declared_length(handler.headers),
        api.max_body_bytes,
    )
    handler.body_read = True  # type: ignore[attr-defined]
    parts = stow.iter_parts(
        handler.headers.get("Content-Type", ""), reader.read, api.max_part_bytes, api.max_parts
    )
    folder = node.settings.storage_dir / "results" / str(job_id)
    stored = list(_store_results(parts, folder))
    if not stored:
        raise WorkerApiError(400, "multipart body with no part")
    node.audit.record(
        "results-received",
        INSTANCES_TRANSFERRED,
        action="C",
        who=who,
        peer=peer,
        job=job_id,
        sop_instance_uids=stored,
    )
    _answer(handler, 200, {"job": job_id, "stored": stored})


def _store_results(parts: Iterator[tuple[str, bytes]], folder: Path) -> Iterator[str]:
    """Each part, checked as a DICOM header with UIDs, written as ``<sop>.dcm``."""
    folder.mkdir(parents=True, exist_ok=True)
    for number, (ctype, data) in enumerate(parts, start=1):
        if ctype != "application/dicom":
            raise WorkerApiError(415, f"part {number}: {ctype[:60]} is not application/dicom")
        try:
            ds = dcmread(BytesIO(data), stop_before_pixels=True)
            sop = check_uid("SOPInstanceUID", ds.SOPInstanceUID)
            for key in ("SOPClassUID", "SeriesInstanceUID"):
                check_uid(key, ds.get(key))
        except (*PARSE_ERRORS, RejectedInstance) as exc:
            raise WorkerApiError(400, f"part {number} is not a result object: {exc}") from None
        tmp = folder / f".{uuid.uuid4().hex}.part"
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, folder / f"{sop}.dcm")
        yield sop
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _answer(
    handler: BaseHTTPRequestHandler, status: int, payload: Any, content_type: str = ""
) -> None:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", content_type or "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.send_header("Cache-Control", "no-store")
    handler.end_headers()
    handler.wfile.write(body)
    handler.status = status  # type: ignore[attr-defined]
