"""Orthanc Python plugin: forward angiography runs to the angio DICOM node, keep
its results from looping back, and show what happened.

Load it with ``"PythonScript": ".../angio_forward.py"`` (Debian ``orthanc-python``,
the system ``python3``; standard library and ``requests`` only). Settings are
the ``"AngioNode"`` section of Orthanc's configuration (see README.md).

REST routes (Orthanc's own authentication applies)::

    GET  /angio-node/status                   plugin, node health, forward counts
    GET  /angio-node/forwards?state=&study=&limit=   forwards with the node's job state
    GET  /angio-node/forwards/{id}
    POST /angio-node/forwards/{id}/retry      a failed (or backing-off) forward, now
    POST /angio-node/studies/{id}/reprocess   Orthanc study id or Study Instance UID
    GET  /angio-node/results?study=           result series recognised and labelled

This module is the edge: engine errors become HTTP statuses here, and Orthanc's
``OrthancException`` becomes ``OrthancError``.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import sys
from typing import Any

import orthanc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from angio_core import (  # noqa: E402
    STATES,
    UNKNOWN_RESOURCE,
    VERSION,
    Config,
    ConfigError,
    Ledger,
    NodeApiError,
    NodeClient,
    OrthancError,
    forward_view,
    log,
    node_jobs_for,
)
from angio_engine import Forwarder  # noqa: E402


class OrthancLogHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        text = self.format(record)
        if record.levelno >= logging.ERROR:
            orthanc.LogError(text)
        elif record.levelno >= logging.WARNING:
            orthanc.LogWarning(text)
        else:
            orthanc.LogInfo(text)


class PluginApi:
    """Orthanc's REST API from inside Orthanc (no HTTP, no authentication). The
    ``AfterPlugins`` calls also reach routes that plugins add, such as the DICOMweb
    plugin's ``/dicom-web/servers/{id}/stow``."""

    @staticmethod
    def _wrap(fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except orthanc.OrthancException as exc:
            code = exc.args[0] if exc.args else -1
            raise OrthancError(
                int(code) if str(code).lstrip("-").isdigit() else -1,
                f"{fn.__name__}{args[:1]}: {exc.args[1] if len(exc.args) > 1 else exc}",
            ) from None

    def get(self, uri: str) -> Any:
        return json.loads(self._wrap(orthanc.RestApiGetAfterPlugins, uri))

    def post(self, uri: str, body: Any) -> Any:
        raw = body if isinstance(body, str) else json.dumps(body)
        return json.loads(self._wrap(orthanc.RestApiPostAfterPlugins, uri, raw) or b"null")

    def put(self, uri: str, body: str) -> None:
        self._wrap(orthanc.RestApiPutAfterPlugins, uri, body)


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


STATE: dict[str, Any] = {}


def _forwarder() -> Forwarder:
    fw = STATE.get("forwarder")
    if fw is None:
        raise HttpError(503, STATE.get("disabled", "the angio-node plugin is starting"))
    return fw


def _answer(output: Any, payload: Any) -> None:
    output.AnswerBuffer(json.dumps(payload, indent=1, default=str), "application/json")


def _error(output: Any, status: int, message: str) -> None:
    text = json.dumps({"error": message})  # ASCII: its length is its size in bytes
    output.SetHttpHeader("Content-Type", "application/json")
    # orthanc-python 4.0 takes (status, str, size); 4.1 made the body bytes.
    signatures = (
        (status, text, len(text)),
        (status, text.encode()),
        (status, text.encode(), len(text)),
    )
    for i, args in enumerate(signatures):
        try:
            output.SendHttpStatus(*args)
            return
        except TypeError:
            if i == len(signatures) - 1:
                raise


def route(handler: Any) -> Any:
    """Wrap a REST handler: exceptions become HTTP statuses in this one place."""

    def callback(output: Any, uri: str, **request: Any) -> None:
        try:
            _answer(
                output,
                handler(request["method"], request.get("groups", ()), request.get("get", {}) or {}),
            )
        except HttpError as exc:
            if exc.status == 405:
                output.SendMethodNotAllowed(str(exc))
            else:
                _error(output, exc.status, str(exc))
        except OrthancError as exc:
            _error(output, 404 if exc.code == UNKNOWN_RESOURCE else 500, str(exc))
        except NodeApiError as exc:
            _error(output, 502, str(exc))
        except ValueError as exc:
            _error(output, 400, str(exc))
        except sqlite3.Error as exc:  # the ledger's disk full or failing: a 500 and a trace
            _error(output, 503, f"the plugin's ledger cannot be used now: {exc}")

    return callback


def _method(method: str, allowed: str) -> None:
    if method != allowed:
        raise HttpError(405, allowed)


def rest_status(method: str, groups: Any, query: dict[str, str]) -> Any:
    _method(method, "GET")
    fw = _forwarder()
    try:
        node: Any = fw.node.health()
        fw.node.status()  # /health takes no token: this call checks the plugin's
    except NodeApiError as exc:  # no answer, or 503 "unavailable": its storage (the reason)
        if exc.status in (401, 403):  # every trigger, node_jobs and reprocess is refused
            node = {
                "status": "refused",
                "error": f"the node refuses the plugin's token ({exc}): check "
                "AngioNode.NodeApiToken / NodeApiTokenFile and its scopes (read, operate)",
            }
        else:
            state = "unreachable" if exc.status is None else "unavailable"
            node = {"status": state, "error": str(exc)}
    return {
        "plugin": "angio_forward",
        "version": VERSION,
        "orthanc": fw.orthanc_version,
        "result_marking": "labels + metadata"
        if fw.labels_supported
        else "metadata AngioNodeResult",
        "transport": fw.config.transport,
        "node_api": fw.config.node_api_url,
        "node": node,
        "forwards": fw.ledger.counts(),
        "last_change": fw.ledger.get_meta("last_change"),
        "worker_alive": fw.alive,
        "last_error": fw.last_error,
        "results": fw.ledger.query("SELECT COUNT(*) n FROM results")[0]["n"],
        "unread": fw.ledger.query(
            "SELECT instance_id, state, attempts, error FROM unread ORDER BY change_seq DESC "
            "LIMIT 20"
        ),
    }


def _with_node_jobs(fw: Forwarder, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each forward with the node's jobs for its run (one node call per study). The
    node's run of a part of a concatenation is its Concatenation UID: read from the
    instance, only for a forward of one instance whose study has jobs of a run that no
    SOP or Series Instance UID of its forwards names."""
    by_study: dict[str, Any] = {}
    for uid in {r["study_uid"] for r in rows}:
        try:
            by_study[uid] = fw.node.jobs(uid)
        except NodeApiError as exc:
            by_study[uid] = exc
    named = {uid for f in rows for uid in (f["sop_instance_uid"], f["series_uid"])}
    unnamed = {
        study: {j.get("run_id") for j in jobs} - named
        for study, jobs in by_study.items()
        if not isinstance(jobs, NodeApiError)
    }
    out = []
    for r in rows:
        view = forward_view(r)
        jobs = by_study[r["study_uid"]]
        if isinstance(jobs, NodeApiError):
            view["node_jobs"], view["node_error"] = None, str(jobs)
        else:
            view["node_jobs"] = node_jobs_for(r, jobs)
            if not view["node_jobs"] and r["kind"] == "instance" and unnamed[r["study_uid"]]:
                concatenation = fw.concatenation_of(r)
                if concatenation in unnamed[r["study_uid"]]:
                    view["node_jobs"] = node_jobs_for(r, jobs, concatenation)
        out.append(view)
    return out


def rest_forwards(method: str, groups: Any, query: dict[str, str]) -> Any:
    _method(method, "GET")
    fw = _forwarder()
    where, params = [], []
    if query.get("state"):
        if query["state"] not in STATES:
            raise ValueError(f"state must be one of {', '.join(STATES)}")
        where.append("state=?")
        params.append(query["state"])
    if query.get("study"):
        where.append("study_uid=?")
        params.append(query["study"])
    limit = int(query.get("limit") or 100)
    sql = (
        "SELECT * FROM forwards"
        + (" WHERE " + " AND ".join(where) if where else "")
        + " ORDER BY id DESC LIMIT ?"
    )
    rows = fw.ledger.query(sql, tuple(params) + (max(1, min(limit, 1000)),))
    return {"forwards": _with_node_jobs(fw, rows), "counts": fw.ledger.counts()}


def rest_forward(method: str, groups: Any, query: dict[str, str]) -> Any:
    fw = _forwarder()
    fid = int(groups[0])
    # past SQLite's integers the lookup raised OverflowError, which Orthanc answered 500
    row = fw.ledger.forward(fid) if fid < 2**63 else None
    if row is None:
        raise HttpError(404, f"no forward {fid}")
    if len(groups) > 1 and groups[1] == "retry":
        _method(method, "POST")
        if not fw.ledger.retry_now(fid):
            raise HttpError(
                409,
                f"forward {fid} is {row['state']}: only failed or retrying forwards can be retried",
            )
        log.warning("angio-forward: forward %d retried by hand", fid)
        fw.wake.set()
        row = fw.ledger.forward(fid)
    else:
        _method(method, "GET")
    return _with_node_jobs(fw, [row])[0]


def rest_reprocess(method: str, groups: Any, query: dict[str, str]) -> Any:
    _method(method, "POST")
    return _forwarder().reprocess_study(groups[0])


def rest_results(method: str, groups: Any, query: dict[str, str]) -> Any:
    _method(method, "GET")
    fw = _forwarder()
    if query.get("study"):
        rows = fw.ledger.query(
            "SELECT * FROM results WHERE study_uid=? ORDER BY first_at", (query["study"],)
        )
    else:
        rows = fw.ledger.query("SELECT * FROM results ORDER BY first_at DESC LIMIT 500")
    return {"results": rows, "marking": "labels + metadata" if fw.labels_supported else "metadata"}


EXPLORER_JS = r"""
$('#study').live('pagebeforecreate', function() {
  var b = $('<a>').attr('data-role', 'button').attr('href', '#').attr('data-icon', 'refresh')
    .attr('data-theme', 'e').text('Process again (angio node)');
  b.insertBefore($('#study-delete').parent().parent());
  b.click(function() {
    if (!$.mobile.pageData) return;
    $.ajax({url: '../angio-node/studies/' + $.mobile.pageData.uuid + '/reprocess', type: 'POST',
            dataType: 'json', data: '{}',
            success: function(r) { alert('angio node: ' + r.action); },
            error: function(x) { alert('angio node: ' + x.status + ' ' + x.responseText); }});
  });
});
$('#series').live('pageshow', function() {
  if (!$.mobile.pageData) return;
  $('#angio-ai-banner').remove();
  $.ajax({url: '../series/' + $.mobile.pageData.uuid + '/metadata/AngioNodeResult', dataType: 'text',
          success: function(v) {
            var info = {}; try { info = JSON.parse(v); } catch (e) {}
            $('<div id="angio-ai-banner">').css({background: '#ffcc00', padding: '6px',
              'font-weight': 'bold', 'margin-bottom': '8px'})
              .text('AI result from the angio node: ' + (info.description || v))
              .prependTo($('#series .ui-content, #series [data-role=content]').first());
          }});
});
"""


def _start() -> None:
    full = json.loads(orthanc.GetConfiguration())
    config = Config.from_orthanc(full)
    _check_keywords(config)
    if not config.enabled:
        STATE["disabled"] = "forwarding is disabled (AngioNode.Enabled is false)"
        log.warning("angio-forward: disabled by AngioNode.Enabled")
        return
    api = PluginApi()
    _check_destination(config, api)
    system = api.get("/system")
    version = str(system.get("Version", "0"))
    try:
        os.makedirs(os.path.dirname(os.path.abspath(config.state_file)), exist_ok=True)
        ledger = Ledger(config.state_file)
    except (OSError, sqlite3.Error) as exc:  # a damaged file: a traceback, "starting" for ever
        raise ConfigError(
            f"AngioNode.StateFile: the ledger {config.state_file} cannot be used ({exc}): stop "
            "Orthanc, move it aside and start Orthanc again; a new ledger follows Orthanc's "
            "changes from then on (ForwardExistingOnFirstStart forwards what Orthanc holds, "
            "POST /angio-node/studies/{id}/reprocess one study)"
        ) from exc
    fw = Forwarder(
        config,
        api,
        ledger,
        NodeClient(
            config.node_api_url,
            config.node_api_timeout_s,
            config.node_api_token,
            config.node_api_ca_file,
            config.node_api_token_file,
        ),
        version,
        has_labels=bool(system.get("HasLabels", False)),
    )
    STATE["forwarder"] = fw
    fw.start()
    log.warning(
        "angio-forward %s: forwarding to %s via %s, ledger %s, results marked by %s",
        VERSION,
        config.node_modality if config.transport == "dimse" else config.node_dicomweb_server,
        config.transport,
        config.state_file,
        "labels and metadata" if fw.labels_supported else "metadata (Orthanc < 1.12 has no labels)",
    )


def _check_destination(config: Config, api: PluginApi) -> None:
    """The node as Orthanc knows it: a NodeModality (or NodeDicomWebServer) Orthanc does
    not hold made every forward fail to submit its job ("unknown resource"), retried
    until MaxAttempts, while the status said the node was ok."""
    if config.transport == "dimse":
        key, what, uri, name = (
            "NodeModality",
            "DicomModalities",
            "/modalities",
            config.node_modality,
        )
    else:
        key, what, uri, name = (
            "NodeDicomWebServer",
            "DicomWeb.Servers",
            "/dicom-web/servers",
            config.node_dicomweb_server,
        )
    try:
        known = [str(k) for k in api.get(uri)]
    except OrthancError as exc:
        hint = "; the STOW-RS transport needs the DICOMweb plugin" if key != "NodeModality" else ""
        raise ConfigError(
            f"AngioNode.{key}: Orthanc cannot list its {what} ({exc}){hint}"
        ) from None
    if name not in known:
        raise ConfigError(
            f"AngioNode.{key}: {name!r} is not one of Orthanc's {what} "
            f"({', '.join(known) or 'none'}): every forward would fail"
        )


def _check_keywords(config: Config) -> None:
    """Each rule's tag a keyword of Orthanc's dictionary: an unknown one is absent from
    every instance, so the rule never matched, without a word (a typo such as
    BodyPartExamind, or a keyword of another toolkit's dictionary)."""
    for i, rule in enumerate(config.rules):
        for keyword in rule.tags:
            try:
                orthanc.LookupDictionary(keyword)
            except (orthanc.OrthancException, TypeError):  # TypeError: Orthanc 1.10's plugin
                raise ConfigError(
                    f"AngioNode.Rules[{i}].Tags.{keyword}: not a DICOM keyword in Orthanc's "
                    "dictionary: the rule would never match"
                ) from None


def on_change(change_type: int, level: int, resource_id: str) -> None:
    fw = STATE.get("forwarder")
    if change_type == orthanc.ChangeType.ORTHANC_STARTED:
        try:
            _start()
        except ConfigError as exc:
            STATE["disabled"] = f"configuration error: {exc}"
            log.error("angio-forward: NOT forwarding, configuration error: %s", exc)
    elif change_type == orthanc.ChangeType.ORTHANC_STOPPED:
        if fw is not None:
            fw.stop()
            fw.ledger.close()
            STATE.pop("forwarder", None)
    elif fw is not None and change_type in (
        orthanc.ChangeType.NEW_INSTANCE,
        orthanc.ChangeType.STABLE_SERIES,
        orthanc.ChangeType.JOB_SUCCESS,
        orthanc.ChangeType.JOB_FAILURE,
    ):
        fw.wake.set()


def _register() -> None:
    handler = OrthancLogHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    orthanc.RegisterOnChangeCallback(on_change)
    orthanc.RegisterRestCallback("/angio-node/status", route(rest_status))
    orthanc.RegisterRestCallback("/angio-node/forwards", route(rest_forwards))
    orthanc.RegisterRestCallback("/angio-node/forwards/([0-9]+)", route(rest_forward))
    orthanc.RegisterRestCallback("/angio-node/forwards/([0-9]+)/(retry)", route(rest_forward))
    orthanc.RegisterRestCallback("/angio-node/studies/([^/]+)/reprocess", route(rest_reprocess))
    orthanc.RegisterRestCallback("/angio-node/results", route(rest_results))
    orthanc.ExtendOrthancExplorer(EXPLORER_JS)


_register()
