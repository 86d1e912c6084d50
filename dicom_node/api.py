"""The node's REST API and DICOMweb endpoint (standard library server, HTTP or HTTPS).

    GET  /health                          {"status": "ok", ...}            no token
                                          503 "unavailable" with the reason
                                          when the node cannot store (disk)
    GET  /                                the status page (HTML)           read
    GET  /status                          runs, jobs, failures, backlog,   read
                                          the jobs' memory pool
    GET  /jobs?study=UID|series=UID|instance=UID                           read
    GET  /metrics                         Prometheus text format           read
    GET  /refusals?instance=UID           why the node last refused it     read
                                          (status, reason; 404: none kept)
    POST /trigger    {"study_uid"|"series_uid"|"sop_instance_uid"|"run_id": UID}   operate
    POST /reprocess  {"study_uid"|"series_uid"|"sop_instance_uid"|"run_id": UID}   operate
    POST /purge      {"study_uid"|"series_uid"|"sop_instance_uid"|"run_id": UID}   operate
                                          processed runs lose their files now
    POST /cancel     {"study_uid"|"series_uid"|"sop_instance_uid"|"run_id": UID}   operate
                                          what is still to be done for them is not done
    POST /jobs/{id}/retry                 a failed job queued again        operate
    POST /dicom-web/studies[/{study}]     STOW-RS into the spool           store
    GET  /dicom-web/studies/..., /worker/...  the scale-out workers        worker
                                          (``dicom_node.worker_api``)

Every route but ``/health`` needs a token with its scope when tokens are
configured (``dicom_node.auth``), an unknown route too (401 before 404).
Limits: ``api.max_concurrent_requests`` requests served at once (503 beyond,
twice as many connections open, closed at once beyond; one IP address holds at most
``api.max_connections_per_host`` of them, half the requests by default), ``api.read_timeout_s``
for a silent client, a body needs a valid Content-Length or chunked coding.
Requests that change state, and refused ones, go to the audit trail.

This is where node errors become HTTP statuses.
"""

from __future__ import annotations

import json
import logging
import math
import re
import socket
import ssl
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import parse_qs, quote, urlparse

from dicom_node import __version__, statuspage, stow, worker_api
from dicom_node.audit import AuditTrail
from dicom_node.auth import ANONYMOUS, Authenticator, AuthError, Principal
from dicom_node.db import Database
from dicom_node.diskfull import describe, storage_fault
from dicom_node.errors import NodeError, RejectedInstance
from dicom_node.ingest import Ingest
from dicom_node.metrics import CONTENT_TYPE as METRICS_TYPE
from dicom_node.metrics import Metrics
from dicom_node.settings import Settings
from dicom_node.spool import check_uid
from dicom_node.tls import peer_subject, server_context


class Node(Protocol):
    """What the API needs of the node (``dicom_node.service.Node``)."""

    settings: Settings
    db: Database
    ingest: Ingest
    auth: Authenticator
    audit: AuditTrail
    metrics: Metrics

    @property
    def port(self) -> int: ...

    def trigger(self, **selector: str) -> list[str]: ...

    def reprocess(self, **selector: str) -> list[int]: ...

    def purge(self, operator: str, **selector: str) -> tuple[list[str], dict[str, str]]: ...

    def cancel(self, operator: str, **selector: str) -> tuple[list[str], dict[str, str]]: ...

    def retry_job(self, job_id: int) -> bool: ...

    def status(self) -> dict[str, object]: ...

    def health(self) -> dict[str, object]: ...

    def jobs_memory(self) -> dict[str, int] | None: ...


log = logging.getLogger(__name__)
SELECTORS = ("study_uid", "series_uid", "sop_instance_uid", "run_id")
QUERY_KEYS = {"study": "study_uid", "series": "series_uid", "instance": "sop_instance_uid"}
RETRY_PATH = re.compile(r"^/jobs/(\d{1,18})/retry\Z")
MAX_JSON = 1 << 20
REALM = 'realm="angio-dicom-node"'


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def required_scope(method: str, path: str) -> str | None:
    """The scope a route needs; None for /health."""
    if method == "GET" and path == "/health":
        return None
    if path.startswith("/dicom-web"):
        return "worker" if method in ("GET", "HEAD") else "store"
    if path.startswith("/worker"):
        return "worker"
    return "read" if method in ("GET", "HEAD") else "operate"


def _selector(body: dict[str, Any]) -> dict[str, str]:
    given = {k: v for k, v in body.items() if k in SELECTORS and v is not None and v != ""}
    if len(given) != 1:
        raise HttpError(400, f"give exactly one of {', '.join(SELECTORS)}")
    ((key, value),) = given.items()
    if not isinstance(value, str):  # a number was taken as its digits
        raise HttpError(400, f"{key}: a string")
    try:
        return {key: check_uid(key, value)}
    except RejectedInstance as exc:
        raise HttpError(400, exc.reason) from None


def make_handler(node: Node) -> type[BaseHTTPRequestHandler]:
    api = node.settings.api

    class Handler(BaseHTTPRequestHandler):
        server_version = f"angio-dicom-node/{__version__}"
        timeout = api.read_timeout_s  # applied to the socket: a silent client is dropped
        # A request line without a version is answered as HTTP/1.0 (http.server's
        # default, 0.9, answers a bare body: a 400 without its status line).
        default_request_version = "HTTP/1.0"

        def parse_request(self) -> bool:
            """http.server's, with two more rules: one empty line before the request
            line is skipped (RFC 9112 2.2; it closed the connection without an
            answer), and an HTTP/0.x request is answered 505 with a status line (it
            was served, a STOW-RS stored, and the answer had no status)."""
            line = getattr(self, "raw_requestline", b"")  # set by handle_one_request
            if line in (b"\r\n", b"\n"):
                self.raw_requestline = self.rfile.readline(65537)
            if not super().parse_request():
                return False
            if self.request_version.startswith("HTTP/0."):
                self.send_error(505, "HTTP/1.0 or HTTP/1.1 only")
                return False
            return True

        def send_error(
            self, code: int, message: str | None = None, explain: str | None = None
        ) -> None:
            if self.request_version.startswith("HTTP/0."):  # every answer has its status line
                self.request_version = "HTTP/1.0"
            super().send_error(code, message, explain)

        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug("api: " + fmt, *args)

        @property
        def peer(self) -> str:
            return f"{self.client_address[0]}:{self.client_address[1]}"

        def _send(
            self,
            status: int,
            payload: Any,
            content_type: str = "application/json",
            headers: dict[str, str] | None = None,
        ) -> None:
            if isinstance(payload, bytes):
                body = payload
            else:
                body = json.dumps(payload, indent=1, default=str).encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
            self.status = status

        def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
            self._discard_body()
            self.close_connection = True
            try:
                self._send(status, {"error": message}, headers=headers)
            except (TimeoutError, ConnectionError, ssl.SSLError) as exc:
                # A client that hung up (a truncated upload) gets no answer; before,
                # the broken pipe escaped to socketserver, which printed a traceback.
                log.info(
                    "api: %s closed the connection before its %d answer: %s", self.peer, status, exc
                )

        def _discard_body(self) -> None:
            """Read a small unread body, so the client sees the answer and not a reset."""
            if getattr(self, "body_read", False):
                return
            self.body_read = True
            try:
                length = stow.declared_length(self.headers)
            except stow.StowError:
                return
            if length is not None and length <= MAX_JSON:
                try:
                    self.rfile.read(length)
                except OSError:
                    pass

        def send_response(self, code: int, message: str | None = None) -> None:
            self.answering = True  # a status line is on its way: no second answer
            super().send_response(code, message)

        def _dispatch(self, method: str) -> None:
            self.status = 0
            self.answering = False
            url = urlparse(self.path)
            path = url.path.rstrip("/") or "/"
            slots: threading.BoundedSemaphore = self.server.slots  # type: ignore[attr-defined]
            try:
                if not slots.acquire(blocking=False):
                    raise HttpError(503, "too many concurrent requests; try again")
                try:
                    with node.metrics.api_in_progress.track_inprogress():
                        self._serve(method, path, url.query)
                finally:
                    slots.release()
            except AuthError as exc:
                log.info("api %s %s from %s -> %d: %s", method, path, self.peer, exc.status, exc)
                node.audit.api_call(
                    self._who_or_anonymous(), self.peer, method, path, exc.status, str(exc)
                )
                headers = {"WWW-Authenticate": f"Basic {REALM}"} if exc.status == 401 else {}
                self._error(exc.status, str(exc), headers)
            except (HttpError, stow.StowError) as exc:
                log.info("api %s %s -> %d: %s", method, path, exc.status, exc)
                retry = {"Retry-After": "1"} if exc.status == 503 else None
                self._error(exc.status, str(exc), retry)
            except NodeError as exc:
                log.warning("api %s %s -> 500: %s", method, path, exc)
                self._error(500, str(exc))
            except (TimeoutError, ConnectionError, ssl.SSLError) as exc:
                log.info("api %s %s from %s: connection dropped: %s", method, path, self.peer, exc)
                self.close_connection = True
                self.status = 408
            except Exception as exc:
                # A defect of the node: answered 500 (http.server would drop the
                # connection without an answer), logged with its trace. No request
                # should get here: tests/test_rest_faults.py sends a corpus. A full or
                # failing disk is not a defect: 503, to be tried again (dicom_node.diskfull).
                fault = storage_fault(exc)
                if fault is not None and not self.answering:
                    log.warning("api %s %s -> 503: %s: %s", method, path, describe(fault), exc)
                    self._error(503, f"{describe(fault)}: try again later", {"Retry-After": "60"})
                elif self.answering:
                    log.exception("api %s %s: internal error", method, path)
                    self.close_connection = True
                else:
                    log.exception("api %s %s: internal error", method, path)
                    self._error(500, "internal error of the node (logged)")
            node.metrics.api_requests.labels(method, str(self.status or 500)).inc()

        def _who_or_anonymous(self) -> str:
            who = getattr(self, "principal", None)
            return who.name if who is not None else "(no valid token)"

        def _serve(self, method: str, path: str, query: str) -> None:
            self.principal: Principal | None = None
            scope = required_scope(method, path)
            if scope is not None:
                self.principal = node.auth.authenticate(self.headers.get("Authorization"))
                node.auth.authorize(self.principal, scope)
            principal = self.principal or ANONYMOUS
            if worker_api.handles(method, path):
                worker_api.serve(self, node, method, path, principal.name)
                return
            if method == "POST" and path.startswith("/dicom-web"):
                self._stow(path, principal)
                return
            if method == "GET" and path == "/":
                params = parse_qs(query)
                try:
                    hours = float(params.get("hours", ["24"])[0])
                except ValueError:
                    hours = math.nan
                if not math.isfinite(hours):
                    raise HttpError(400, "hours: a number")
                hours = min(max(hours, 0.1), 24 * 31)
                csrf = node.auth.csrf(principal) if principal.may("operate") else None
                page = statuspage.render(
                    node.db,
                    node.settings,
                    principal.name,
                    csrf,
                    hours,
                    params.get("message", [""])[0][:200],
                    node.port,
                    node.jobs_memory(),
                )
                self._send(200, page, "text/html; charset=utf-8")
                return
            if method == "GET" and path == "/metrics":
                self._send(200, node.metrics.render(), METRICS_TYPE)
                return
            if method == "GET" and path == "/health":
                health = node.health()
                self._send(200 if health["status"] == "ok" else 503, health)
                return
            match = RETRY_PATH.match(path)
            if method == "POST" and match:
                self._retry(int(match.group(1)), principal)
                return
            self._send(200, self._route(method, path, parse_qs(query), principal))

        def _raw_body(self) -> bytes:
            return stow.read_small_body(self, MAX_JSON)

        def _body(self) -> dict[str, Any]:
            return stow.json_object(self._raw_body())

        def _route(
            self, method: str, path: str, query: dict[str, list[str]], who: Principal
        ) -> Any:
            if method == "GET" and path == "/status":
                return node.status()
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
            if method == "GET" and path == "/refusals":
                uid = (query.get("instance") or [""])[0]
                try:
                    check_uid("instance", uid)
                except RejectedInstance as exc:
                    raise HttpError(400, exc.reason) from None
                found = node.ingest.refusals.get(uid)
                if found is None:
                    raise HttpError(
                        404,
                        f"no refusal of {uid} remembered (the node keeps its last "
                        f"{node.ingest.refusals.size} since it started; one stored since "
                        "is forgotten)",
                    )
                return found
            if method == "POST" and path == "/trigger":
                sel = _selector(self._body())
                runs = node.trigger(**sel)
                node.audit.api_call(who.name, self.peer, method, path, 200, {**sel, "runs": runs})
                return {"completed_runs": runs}
            if method == "POST" and path == "/reprocess":
                sel = _selector(self._body())
                jobs = node.reprocess(**sel)
                status = 200 if jobs else 404
                node.audit.api_call(
                    who.name, self.peer, method, path, status, {**sel, "jobs": jobs}
                )
                if not jobs:
                    purged = [r for r in node.db.runs_for(**sel) if node.db.is_purged(r)]
                    if purged:
                        raise HttpError(
                            409, f"run(s) {purged}: files deleted by retention (purged)"
                        )
                    raise HttpError(404, f"no routable run for {sel}")
                return {"jobs": jobs}
            if method == "POST" and path in ("/purge", "/cancel"):
                sel = _selector(self._body())
                act = node.purge if path == "/purge" else node.cancel
                done, kept = act(who.name, **sel)
                status = 200 if done else 409 if kept else 404
                key = "purged" if path == "/purge" else "cancelled"
                node.audit.api_call(who.name, self.peer, method, path, status, {**sel, key: done})
                if status == 404:
                    raise HttpError(404, f"no run for {sel}")
                if status == 409:
                    raise HttpError(409, "; ".join(f"run {r}: {why}" for r, why in kept.items()))
                return {f"{key}_runs": done, "kept_runs": kept}
            raise HttpError(404 if method == "GET" else 405, f"no route {method} {path}")

        def _retry(self, job_id: int, who: Principal) -> None:
            form = "application/x-www-form-urlencoded" in (self.headers.get("Content-Type") or "")
            raw = self._raw_body()
            if form:  # the status page's button: check its CSRF field
                fields = parse_qs(raw.decode("latin-1"))
                if not node.auth.check_csrf(who, fields.get("csrf", [""])[0]):
                    node.audit.api_call(who.name, self.peer, "POST", self.path, 403, "bad CSRF")
                    raise HttpError(403, "the form is stale or from elsewhere; reload the page")
            done = node.retry_job(job_id)
            status = 200 if done else 409
            node.audit.api_call(who.name, self.peer, "POST", self.path, status, {"job": job_id})
            text = (
                f"job {job_id} queued again"
                if done
                else f"job {job_id}'s run was purged: its files were deleted by retention"
                if node.db.job_purged(job_id)
                else f"job {job_id} is not failed"
            )
            if form:
                self._send(303, b"", "text/plain", {"Location": f"/?message={quote(text)}"})
            elif done:
                self._send(200, {"job": job_id, "state": "queued"})
            else:
                raise HttpError(409, text)

        def _stow(self, path: str, who: Principal) -> None:
            source = who.name if node.auth.enabled else stow.STOW_SOURCE
            allowed = node.settings.allowed_calling_aets
            if allowed and source not in allowed:
                node.audit.api_call(who.name, self.peer, "POST", path, 403, "source not allowed")
                raise HttpError(
                    403, f"STOW-RS sender {source} is not in allowed_calling_aets (as for C-STORE)"
                )
            length = stow.declared_length(self.headers)
            reader = stow.BodyReader(self.rfile, length, api.max_body_bytes)  # type: ignore[arg-type]
            self.body_read = True
            parts = stow.iter_part_files(
                self.headers.get("Content-Type", ""),
                reader.read,
                api.max_part_bytes,
                node.ingest.spool.tmp,
                api.max_parts,
                node.ingest.in_flight,
            )
            status, payload = stow.stow_parts(
                node.ingest,
                path,
                parts,
                source,
                self.peer,
                self.headers.get(stow.SENDER_HEADER, ""),
            )
            node.audit.api_call(
                who.name,
                self.peer,
                "POST",
                path,
                status,
                {
                    "stored": len(payload.get("00081199", {}).get("Value", [])),
                    "refused": len(payload.get("00081198", {}).get("Value", [])),
                },
            )
            busy = {"Retry-After": "60"} if status == 503 else None  # for want of room
            self._send(status, payload, "application/dicom+json", busy)

        def do_GET(self) -> None:  # noqa: N802
            self._dispatch("GET")

        def do_HEAD(self) -> None:  # noqa: N802
            self._dispatch("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._dispatch("POST")

    return Handler


class ApiServer(ThreadingHTTPServer):
    """A thread per connection, at most ``2 * max_concurrent_requests`` of them; the TLS
    handshake runs in that thread under the read timeout, never in the accept loop."""

    daemon_threads = True
    request_queue_size = 64

    def __init__(self, node: Node, context: ssl.SSLContext | None) -> None:
        api = node.settings.api
        self.node = node
        self.context = context
        self.read_timeout_s = api.read_timeout_s
        self.slots = threading.BoundedSemaphore(api.max_concurrent_requests)
        self.max_connections = 2 * api.max_concurrent_requests
        self.host_share = api.host_share
        self.open_connections = 0  # the one count: the limit reads it, and so does the gauge
        self.by_host: Counter[str] = Counter()  # open connections of each IP address
        self.open_lock = threading.Lock()
        node.metrics.api_connections.set_function(lambda: self.open_connections)
        super().__init__((api.host, api.port), make_handler(node))

    def process_request(self, request: Any, client_address: Any) -> None:
        host = str(client_address[0])
        with self.open_lock:
            full = self.open_connections >= self.max_connections
            host_full = self.host_share is not None and self.by_host[host] >= self.host_share
            if not (full or host_full):
                self.open_connections += 1
                self.by_host[host] += 1
        if full or host_full:
            if full:
                log.warning("api: too many open connections; %s closed", host)
            else:
                log.warning(
                    "api: %s holds api.max_connections_per_host (%d) open already; closed",
                    host,
                    self.host_share,
                )
            self.node.metrics.api_requests.labels("CONNECT", "503").inc()
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._closed(host)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._closed(str(client_address[0]))

    def _closed(self, host: str) -> None:
        with self.open_lock:
            self.open_connections -= 1
            self.by_host[host] -= 1
            if self.by_host[host] <= 0:
                del self.by_host[host]

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.context is None:
            super().finish_request(request, client_address)
            return
        peer = f"{client_address[0]}:{client_address[1]}"
        try:
            request.settimeout(self.read_timeout_s)
            tls = self.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or str(exc) or "timeout"
            log.warning("api: TLS handshake with %s failed: %s", peer, reason)
            self.node.audit.tls_refused("api", peer, str(reason))
            return
        try:
            log.debug("api: TLS from %s (%s)", peer, peer_subject(tls) or "no certificate")
            super().finish_request(tls, client_address)
        finally:
            try:
                tls.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            tls.close()


def start_api(node: Node) -> ApiServer:
    tls = node.settings.tls
    server = ApiServer(node, server_context(tls) if tls.api else None)
    threading.Thread(target=server.serve_forever, name="api", daemon=True).start()
    scheme = "https" if tls.api else "http"
    log.info(
        "REST API on %s://%s:%d%s",
        scheme,
        node.settings.api.host,
        server.server_address[1],
        "" if node.auth.enabled else " (no tokens: loopback only)",
    )
    return server
