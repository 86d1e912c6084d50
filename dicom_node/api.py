"""The node's small REST API (JSON over HTTP, standard library server).

    GET  /health                          {"status": "ok", "version": ...}
    GET  /status                          runs, jobs, failures, outbox backlog
    GET  /jobs?study=UID|series=UID|instance=UID
    POST /trigger    {"study_uid"|"series_uid"|"sop_instance_uid"|"run_id": UID}
    POST /reprocess  {"study_uid"|"series_uid"|"sop_instance_uid"|"run_id": UID}
    POST /dicom-web/studies[/{study}]     STOW-RS into the spool (dicom_node.stow)

This is where node errors become HTTP statuses.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import parse_qs, urlparse

from dicom_node import __version__, stow
from dicom_node.db import Database
from dicom_node.errors import NodeError, RejectedInstance
from dicom_node.ingest import Ingest
from dicom_node.settings import Settings
from dicom_node.spool import check_uid


class Node(Protocol):
    """What the API needs of the node (``dicom_node.service.Node``)."""

    settings: Settings
    db: Database
    ingest: Ingest

    @property
    def port(self) -> int: ...

    def trigger(self, **selector: str) -> list[str]: ...

    def reprocess(self, **selector: str) -> list[int]: ...


log = logging.getLogger(__name__)
SELECTORS = ("study_uid", "series_uid", "sop_instance_uid", "run_id")
QUERY_KEYS = {"study": "study_uid", "series": "series_uid", "instance": "sop_instance_uid"}


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _selector(body: dict[str, Any]) -> dict[str, str]:
    given = {k: v for k, v in body.items() if k in SELECTORS and v}
    if len(given) != 1:
        raise HttpError(400, f"give exactly one of {', '.join(SELECTORS)}")
    ((key, value),) = given.items()
    try:
        return {key: check_uid(key, value)}
    except RejectedInstance as exc:
        raise HttpError(400, exc.reason) from None


def make_handler(node: Node) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = f"angio-dicom-node/{__version__}"

        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug("api: " + fmt, *args)

        def _send(self, status: int, payload: Any, content_type: str = "application/json") -> None:
            body = json.dumps(payload, indent=1, default=str).encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _dispatch(self, method: str) -> None:
            url = urlparse(self.path)
            if method == "POST" and url.path.startswith("/dicom-web/"):
                try:
                    body = stow.read_body(self.headers, self.rfile)
                    status, payload = stow.stow(
                        node.ingest, url.path, self.headers.get("Content-Type", ""), body
                    )
                except stow.StowError as exc:
                    log.info("STOW-RS %s -> %d: %s", url.path, exc.status, exc)
                    status, payload = exc.status, {"error": str(exc)}
                self._send(status, payload, "application/dicom+json")
                return
            try:
                self._send(
                    200, self._route(method, url.path.rstrip("/") or "/", parse_qs(url.query))
                )
            except HttpError as exc:
                log.info("api %s %s -> %d: %s", method, url.path, exc.status, exc)
                self._send(exc.status, {"error": str(exc)})
            except NodeError as exc:
                log.warning("api %s %s -> 500: %s", method, url.path, exc)
                self._send(500, {"error": str(exc)})

        def _body(self) -> dict[str, Any]:
            length = int(self.headers.get("Content-Length") or 0)
            if length > 1 << 20:
                raise HttpError(413, "request body too large")
            try:
                data = json.loads(self.rfile.read(length) or b"{}")
            except json.JSONDecodeError as exc:
                raise HttpError(400, f"body is not JSON: {exc}") from None
            if not isinstance(data, dict):
                raise HttpError(400, "body must be a JSON object")
            return data

        def _route(self, method: str, path: str, query: dict[str, list[str]]) -> Any:
            if method == "GET" and path == "/health":
                return {
                    "status": "ok",
                    "version": __version__,
                    "ae_title": node.settings.ae_title,
                    "dicom_port": node.port,
                }
            if method == "GET" and path == "/status":
                return node.db.status_summary()
            if method == "GET" and path == "/jobs":
                sel = {QUERY_KEYS[k]: v[0] for k, v in query.items() if k in QUERY_KEYS}
                if len(sel) != 1:
                    raise HttpError(400, "give one of ?study=, ?series=, ?instance=")
                ((k, v),) = sel.items()
                try:
                    check_uid(k, v)
                except RejectedInstance as exc:
                    raise HttpError(400, exc.reason) from None
                return {"jobs": node.db.jobs_for(**sel)}
            if method == "POST" and path == "/trigger":
                runs = node.trigger(**_selector(self._body()))
                return {"completed_runs": runs}
            if method == "POST" and path == "/reprocess":
                sel = _selector(self._body())
                jobs = node.reprocess(**sel)
                if not jobs:
                    raise HttpError(404, f"no routable run for {sel}")
                return {"jobs": jobs}
            raise HttpError(404 if method == "GET" else 405, f"no route {method} {path}")

        def do_GET(self) -> None:  # noqa: N802
            self._dispatch("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._dispatch("POST")

    return Handler


def start_api(node: Node) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(
        (node.settings.api.host, node.settings.api.port), make_handler(node)
    )
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="api", daemon=True).start()
    log.info("REST API on http://%s:%d", node.settings.api.host, server.server_address[1])
    return server
