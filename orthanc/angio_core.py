"""The forwarding engine behind the Orthanc plugin, free of the ``orthanc`` module.

It runs inside Orthanc's embedded Python (Debian ``orthanc-python``: the system
``python3``) and may use only the standard library and ``requests``. It talks
to Orthanc through a small ``api`` object (``get``/``post``/``put`` on
Orthanc's REST API: ``angio_forward`` wraps ``orthanc.RestApi*``) and to the
node's REST API with ``requests``, so that it can be tested outside Orthanc.

How a forward happens:

1. Orthanc's change log (``/changes``) is read in order; the last sequence
   number is kept in the ledger, so a change that arrived while the plugin was
   down is handled after a restart.
2. ``NewInstance``: results from the node (its calling AE, Manufacturer, or the
   ``AI `` series description) are labelled and never forwarded. Otherwise the
   first matching rule decides. A multi-frame instance (one XA run) is queued
   for forwarding at once; a single-frame one waits for ``StableSeries``.
3. ``StableSeries``: the waiting instances of the series are queued as one
   forward; once sent, the node is asked to complete the run now (``/trigger``).
4. A queued forward becomes an Orthanc job (C-STORE to the node's modality, or
   the DICOMweb plugin's STOW-RS client); jobs are Orthanc's, saved in its
   database, so a restart does not lose them. A failed job is retried as a new
   job with exponential backoff; after ``MaxAttempts`` the forward is ``failed``
   and stays listed so until retried by hand. Delivery is at least once: the
   node stores a duplicate SOP Instance idempotently.

Errors::

    AngioError
    ├── ConfigError     the "AngioNode" section is wrong; names the key
    ├── OrthancError    a call to Orthanc's REST API failed (carries Orthanc's code)
    └── NodeApiError    the node's REST API is unreachable or refused
"""

from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import requests

log = logging.getLogger("angio_forward")
VERSION = "0.1.0"
UNKNOWN_RESOURCE = 17  # Orthanc's ErrorCode for 404
# The node's header for the sender a STOW-RS forward is for (dicom_node.stow.SENDER_HEADER)
SENDER_HEADER = "X-Angio-Sender"
# Rejection notes (IHE IOCM): Key Object Selection Documents titled with a reason of
# PS3.16 CID 7011 (dicom_node.rejection); forwarded when they list a forwarded instance
KOS_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"
REJECTION_CODES = frozenset({"113001", "113037", "113038", "113039"})
REJECTION_RULE = "rejection note"


def rejection_listed(tags: dict[str, Any]) -> list[str]:
    """The SOP Instance UIDs a rejection note lists (Orthanc's simplified tags); none
    when the instance is not one."""
    titles = tags.get("ConceptNameCodeSequence") or []
    if not (
        isinstance(titles, list)
        and len(titles) == 1
        and isinstance(titles[0], dict)
        and titles[0].get("CodingSchemeDesignator") == "DCM"
        and titles[0].get("CodeValue") in REJECTION_CODES
    ):
        return []

    def items(value: Any) -> list[dict[str, Any]]:
        return [i for i in value if isinstance(i, dict)] if isinstance(value, list) else []

    return [
        str(sop["ReferencedSOPInstanceUID"])
        for study in items(tags.get("CurrentRequestedProcedureEvidenceSequence"))
        for series in items(study.get("ReferencedSeriesSequence"))
        for sop in items(series.get("ReferencedSOPSequence"))
        if sop.get("ReferencedSOPInstanceUID")
    ]


ORTHANC_JOB_DONE = {"Success": "sent", "Failure": "failed"}


class AngioError(Exception):
    pass


class ConfigError(AngioError):
    pass


class OrthancError(AngioError):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"Orthanc error {code}: {message}")
        self.code = code


class NodeApiError(AngioError):
    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


# -- configuration -------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """All given conditions hold. Tag values: a string (equals one of the
    values), a list (any of), or ``{"Regex": "..."}`` (searched in each value)."""

    name: str
    sop_class_uids: tuple[str, ...] = ()
    modalities: tuple[str, ...] = ()
    tags: dict[str, Any] = field(default_factory=dict)
    min_frames: int | None = None

    def matches(self, tags: dict[str, Any], sop_class_uid: str) -> bool:
        if self.sop_class_uids and sop_class_uid not in self.sop_class_uids:
            return False
        if self.modalities and str(tags.get("Modality", "")) not in self.modalities:
            return False
        if self.min_frames is not None and frames_of(tags) < self.min_frames:
            return False
        return all(_tag_matches(values_of(tags, k), want) for k, want in self.tags.items())


def values_of(tags: dict[str, Any], keyword: str) -> list[str]:
    """Orthanc's simplified tags join multiple values with a backslash."""
    value = tags.get(keyword)
    if value is None or isinstance(value, (list, dict)):
        return [""]
    return str(value).split("\\")


def _tag_matches(values: list[str], want: Any) -> bool:
    if isinstance(want, dict):
        return any(re.search(want["Regex"], v) for v in values)
    options = [want] if isinstance(want, str) else list(want)
    return any(v in options for v in values)


def frames_of(tags: dict[str, Any]) -> int:
    try:
        return int(str(tags.get("NumberOfFrames") or "1").strip() or 1)
    except ValueError:
        return 1


def _rule(i: int, raw: Any) -> Rule:
    where = f"AngioNode.Rules[{i}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be an object")
    allowed = {"Name", "SopClassUids", "Modalities", "Tags", "MinFrames"}
    unknown = set(raw) - allowed
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)} (allowed: {sorted(allowed)})")
    tags = raw.get("Tags", {}) or {}
    if not isinstance(tags, dict):
        raise ConfigError(f"{where}.Tags: must be an object of keyword -> value")
    for key, want in tags.items():
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", str(key)):
            # Orthanc's simplified tags, which the rules read, are keyed by keyword
            raise ConfigError(f"{where}.Tags.{key}: a DICOM keyword, such as BodyPartExamined")
        if isinstance(want, dict):
            if set(want) != {"Regex"}:
                raise ConfigError(f'{where}.Tags.{key}: an object must be {{"Regex": "..."}}')
            try:
                re.compile(want["Regex"])
            except re.error as exc:
                raise ConfigError(f"{where}.Tags.{key}: invalid regex: {exc}") from None
        elif not isinstance(want, str) and not (
            isinstance(want, list) and all(isinstance(w, str) for w in want)
        ):
            raise ConfigError(
                f'{where}.Tags.{key}: a string, a list of strings or {{"Regex": ...}}'
            )
    # What a rule compares is compared as it is: a value of another form never matched.
    classes = _strings(raw.get("SopClassUids", []) or [], f"{where}.SopClassUids")
    for value in classes:
        if len(value) > 64 or not re.fullmatch(r"[0-9]+(\.[0-9]+)*", value):
            raise ConfigError(f"{where}.SopClassUids: {value!r} is not a UID (digits and dots)")
    modalities = _strings(raw.get("Modalities", []) or [], f"{where}.Modalities")
    for value in modalities:
        if not re.fullmatch(r"[A-Z0-9_ ]{1,16}", value):
            raise ConfigError(f"{where}.Modalities: {value!r} is not a Modality code, e.g. XA")
    min_frames = raw.get("MinFrames")
    if min_frames is not None and (
        not isinstance(min_frames, int) or isinstance(min_frames, bool) or min_frames < 1
    ):
        raise ConfigError(f"{where}.MinFrames: a whole number of at least 1, not {min_frames!r}")
    return Rule(
        name=str(raw.get("Name") or f"rule-{i}"),
        sop_class_uids=classes,
        modalities=modalities,
        tags=dict(tags),
        min_frames=min_frames,
    )


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: a list of strings")
    return tuple(value)


@dataclass(frozen=True)
class Config:
    enabled: bool = True
    transport: str = "dimse"
    node_modality: str = "angio-node"
    node_dicomweb_server: str = "angio-node"
    node_api_url: str = "http://127.0.0.1:8780"
    node_api_timeout_s: float = 10.0
    node_api_token: str = field(default="", repr=False)  # scopes read, operate (and store)
    node_api_token_file: str = ""  # read again when it changes (NodeClient)
    node_api_ca_file: str = ""  # CA of an https NodeApiUrl (default: the system store)
    node_aet: str = "ANGIO_NODE"
    result_manufacturer: str = "angio-dicom-node"
    result_prefix: str = "AI "
    result_label: str = "angio-ai-result"
    trigger_node_after_series: bool = True
    forward_existing_on_first_start: bool = False
    state_file: str = ""
    poll_s: float = 2.0
    max_attempts: int = 8
    backoff_s: float = 15.0
    max_backoff_s: float = 900.0
    rules: tuple[Rule, ...] = ()

    KEYS = {
        "Enabled": "enabled",
        "Transport": "transport",
        "NodeModality": "node_modality",
        "NodeDicomWebServer": "node_dicomweb_server",
        "NodeApiUrl": "node_api_url",
        "NodeApiTimeoutSeconds": "node_api_timeout_s",
        "NodeApiToken": "node_api_token",
        "NodeApiCaFile": "node_api_ca_file",
        "NodeAet": "node_aet",
        "ResultManufacturer": "result_manufacturer",
        "ResultSeriesDescriptionPrefix": "result_prefix",
        "ResultLabel": "result_label",
        "TriggerNodeAfterSeries": "trigger_node_after_series",
        "ForwardExistingOnFirstStart": "forward_existing_on_first_start",
        "StateFile": "state_file",
        "PollSeconds": "poll_s",
    }

    @classmethod
    def from_orthanc(cls, full: dict[str, Any]) -> Config:
        """From Orthanc's whole configuration (its "AngioNode" section)."""
        section = full.get("AngioNode", {})
        if not isinstance(section, dict):
            raise ConfigError("AngioNode: must be an object")
        extra = {"Retry", "Rules", "NodeApiTokenFile"}
        unknown = set(section) - set(cls.KEYS) - extra
        if unknown:
            raise ConfigError(
                f"AngioNode: unknown key(s) {sorted(unknown)} "
                f"(allowed: {sorted(set(cls.KEYS) | extra)})"
            )
        kw: dict[str, Any] = {cls.KEYS[k]: v for k, v in section.items() if k in cls.KEYS}
        token_file = section.get("NodeApiTokenFile")
        if token_file and not kw.get("node_api_token"):
            try:
                with open(str(token_file)) as fh:
                    kw["node_api_token"] = fh.read().strip()
            except OSError as exc:
                raise ConfigError(
                    f"AngioNode.NodeApiTokenFile: cannot read {token_file}: {exc.strerror}"
                ) from None
            kw["node_api_token_file"] = str(token_file)
        for key in ("node_api_token", "node_api_ca_file"):
            if not isinstance(kw.get(key, ""), str):
                raise ConfigError(f"AngioNode: {key} must be a string")
        retry = section.get("Retry", {}) or {}
        for key, attr in (
            ("MaxAttempts", "max_attempts"),
            ("BackoffSeconds", "backoff_s"),
            ("MaxBackoffSeconds", "max_backoff_s"),
        ):
            if key in retry:
                kw[attr] = retry[key]
        if kw.get("transport", "dimse") not in ("dimse", "dicomweb"):
            raise ConfigError(
                f"AngioNode.Transport: {kw['transport']!r} (allowed: dimse, dicomweb)"
            )
        for attr in ("poll_s", "backoff_s", "max_backoff_s", "node_api_timeout_s"):
            if attr in kw and not (isinstance(kw[attr], (int, float)) and kw[attr] > 0):
                raise ConfigError(f"AngioNode: {attr} must be a positive number (got {kw[attr]!r})")
        if "max_attempts" in kw and not (
            isinstance(kw["max_attempts"], int) and kw["max_attempts"] >= 1
        ):
            raise ConfigError(
                f"AngioNode.Retry.MaxAttempts: an integer >= 1 (got {kw['max_attempts']!r})"
            )
        if not re.match(r"^https?://[^\s/]+", str(kw.get("node_api_url", cls.node_api_url))):
            raise ConfigError(
                f"AngioNode.NodeApiUrl: a http(s) URL (got {kw.get('node_api_url')!r})"
            )
        if not re.match(r"^[A-Za-z0-9_-]+\Z", str(kw.get("result_label", cls.result_label))):
            raise ConfigError("AngioNode.ResultLabel: letters, digits, '-' and '_' only")
        rules = section.get("Rules")
        if rules is None:
            rules = [{"Name": "xray-angiography", "SopClassUids": list(XRAY_ANGIO_CLASSES)}]
        if not isinstance(rules, list):
            raise ConfigError("AngioNode.Rules: must be a list of rules")
        kw["rules"] = tuple(_rule(i, r) for i, r in enumerate(rules))
        if not kw.get("state_file"):
            storage = full.get("StorageDirectory", "OrthancStorage")
            kw["state_file"] = f"{storage.rstrip('/')}/angio-node-forwards.sqlite"
        kw["node_api_url"] = str(kw.get("node_api_url", cls.node_api_url)).rstrip("/")
        return cls(**kw)

    def backoff(self, attempts: int) -> float:
        """Delay before attempt ``attempts + 1``: base * 2^(attempts-1), capped."""
        return float(min(self.backoff_s * 2 ** max(attempts - 1, 0), self.max_backoff_s))

    def may_match(self, sop_class_uid: str) -> bool:
        """False when no rule can take this SOP class (every rule names its classes)."""
        if any(not r.sop_class_uids for r in self.rules):
            return True
        return any(sop_class_uid in r.sop_class_uids for r in self.rules)

    def rule_for(self, tags: dict[str, Any], sop_class_uid: str) -> Rule | None:
        return next((r for r in self.rules if r.matches(tags, sop_class_uid)), None)

    def result_reason(self, tags: dict[str, Any], remote_aet: str) -> str | None:
        """Why an instance is the node's output (so never forwarded), or None."""
        if remote_aet and remote_aet.strip() == self.node_aet:
            return f"calling AE {remote_aet.strip()}"
        if str(tags.get("Manufacturer", "")).strip() == self.result_manufacturer:
            return f"Manufacturer {self.result_manufacturer}"
        if self.result_prefix and str(tags.get("SeriesDescription", "")).startswith(
            self.result_prefix
        ):
            return f"Series Description starts with {self.result_prefix!r}"
        return None


XRAY_ANGIO_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.12.1",  # X-Ray Angiographic Image
    "1.2.840.10008.5.1.4.1.1.12.1.1",  # Enhanced XA Image
    "1.2.840.10008.5.1.4.1.1.12.2",  # X-Ray Radiofluoroscopic Image
    "1.2.840.10008.5.1.4.1.1.12.2.1",  # Enhanced XRF Image
    "1.2.840.10008.5.1.4.1.1.13.1.1",  # X-Ray 3D Angiographic Image
)


# -- the ledger ------------------------------------------------------------------

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS forwards (
    id INTEGER PRIMARY KEY, kind TEXT NOT NULL, rule TEXT, study_uid TEXT, series_uid TEXT,
    sop_instance_uid TEXT, series_id TEXT, resources TEXT NOT NULL, transport TEXT,
    state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, next_try REAL NOT NULL,
    job_id TEXT, jobs TEXT NOT NULL DEFAULT '[]', error TEXT, trigger INTEGER NOT NULL DEFAULT 0,
    triggered INTEGER NOT NULL DEFAULT 0, created_at REAL, updated_at REAL, sent_at REAL);
CREATE INDEX IF NOT EXISTS forwards_state ON forwards(state, next_try);
CREATE INDEX IF NOT EXISTS forwards_study ON forwards(study_uid);
CREATE TABLE IF NOT EXISTS instances (
    instance_id TEXT PRIMARY KEY, series_id TEXT, study_uid TEXT, series_uid TEXT,
    sop_instance_uid TEXT, rule TEXT, forward_id INTEGER, seen_at REAL);
CREATE INDEX IF NOT EXISTS instances_waiting ON instances(series_id, forward_id);
CREATE TABLE IF NOT EXISTS unread (
    instance_id TEXT PRIMARY KEY, change_seq INTEGER, state TEXT NOT NULL,
    attempts INTEGER NOT NULL, next_try REAL NOT NULL, error TEXT, first_at REAL,
    updated_at REAL);
CREATE TABLE IF NOT EXISTS results (
    series_id TEXT PRIMARY KEY, study_uid TEXT, series_uid TEXT, description TEXT,
    sop_class_uid TEXT, reason TEXT, instances INTEGER NOT NULL DEFAULT 0, first_at REAL);
"""
STATES = ("queued", "sending", "retrying", "sent", "failed", "split")
# A C-STORE status the node answers for good (README: 0xA900, 0xC000-0xC002, 0x0122): sent
# again, the instance is refused again. Out of resources (0xA7xx) and a processing
# failure (0x0110, 0x0213) may pass: those are retried (as the node's own outbox does).
_DIMSE_STATUS = re.compile(r"DIMSE status 0x([0-9A-Fa-f]{4})")


def refusal(error: str) -> int | None:
    """The status of a C-STORE the node refused for good, from an Orthanc job's error."""
    found = _DIMSE_STATUS.search(error)
    if found is None:
        return None
    status = int(found.group(1), 16)
    if status in (0x0000, 0x0110, 0x0213) or status & 0xFF00 in (0xA700, 0xB000):
        return None
    return status


# Orthanc's STOW-RS client, when the answer names fewer instances stored than it sent.
_PARTLY = re.compile(r"only able to receive (\d+) instances out of (\d+)")


def partly_received(error: str, sent: int) -> bool:
    """Whether an Orthanc job's ``error`` says the node stored some, not all, of the
    ``sent`` instances of a STOW-RS forward: those it did not take are refused (for good,
    or for want of room), and sending the whole series again sends every other one again
    with them."""
    found = _PARTLY.search(error)
    return found is not None and 0 < int(found.group(1)) < int(found.group(2)) == sent


class Ledger:
    """What was forwarded, in a SQLite file next to Orthanc's storage.

    Orthanc 1.10 cannot search metadata, so listing forwards needs an index of
    our own; the jobs themselves are Orthanc's.
    """

    def __init__(self, path: str) -> None:
        self.con = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self.con.row_factory = sqlite3.Row
        self.lock = threading.RLock()
        with self.lock:
            self.con.execute("PRAGMA journal_mode=WAL")
            self.con.executescript(SCHEMA)

    def close(self) -> None:
        with self.lock:
            self.con.close()

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        with self.lock:
            return [dict(r) for r in self.con.execute(sql, params).fetchall()]

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> int:
        with self.lock:
            return self.con.execute(sql, params).rowcount

    def get_meta(self, key: str) -> str | None:
        rows = self.query("SELECT value FROM meta WHERE key=?", (key,))
        return rows[0]["value"] if rows else None

    def set_meta(self, key: str, value: str) -> None:
        self.execute("INSERT OR REPLACE INTO meta VALUES (?,?)", (key, value))

    # -- new instances that could not be read -----------------------------------------
    def unread_failed(self, instance_id: str, seq: int, error: str, config: Config) -> str:
        """A new instance Orthanc could not give (its file lost or damaged in Orthanc's
        storage): tried again with the forwards' backoff, 'failed' after MaxAttempts.
        Returns the state."""
        t = time.time()
        with self.lock:
            rows = self.query("SELECT attempts FROM unread WHERE instance_id=?", (instance_id,))
            attempts = (rows[0]["attempts"] if rows else 0) + 1
            state = "failed" if attempts >= config.max_attempts else "retrying"
            self.execute(
                "INSERT INTO unread VALUES (?,?,?,?,?,?,?,?) ON CONFLICT(instance_id) DO UPDATE "
                "SET state=excluded.state, attempts=excluded.attempts, "
                "next_try=excluded.next_try, error=excluded.error, updated_at=excluded.updated_at",
                (
                    instance_id,
                    seq,
                    state,
                    attempts,
                    t + config.backoff(attempts),
                    error[:2000],
                    t,
                    t,
                ),
            )
        return state

    def unread_due(self, now: float) -> list[dict[str, Any]]:
        return self.query(
            "SELECT * FROM unread WHERE state='retrying' AND next_try<=? ORDER BY change_seq",
            (now,),
        )

    def unread_read(self, instance_id: str) -> None:
        self.execute("DELETE FROM unread WHERE instance_id=?", (instance_id,))

    def holds_any(self, sop_instance_uids: list[str]) -> bool:
        """Whether any of these instances was recorded (matched a rule)."""
        for k in range(0, len(sop_instance_uids), 500):
            chunk = sop_instance_uids[k : k + 500]
            marks = ",".join("?" * len(chunk))
            sql = f"SELECT 1 FROM instances WHERE sop_instance_uid IN ({marks}) LIMIT 1"
            if self.query(sql, tuple(chunk)):
                return True
        return False

    def known_instance(self, instance_id: str) -> bool:
        return bool(self.query("SELECT 1 FROM instances WHERE instance_id=?", (instance_id,)))

    def add_instance(
        self,
        instance_id: str,
        series_id: str,
        tags: dict[str, Any],
        rule: str,
        forward_now: bool,
        trigger: bool,
        transport: str,
    ) -> int | None:
        """Record a matching instance; queue a forward of it alone when ``forward_now``."""
        t = time.time()
        with self.lock:
            self.con.execute("BEGIN IMMEDIATE")
            try:
                fid = None
                if forward_now:
                    fid = self._insert_forward(
                        "instance",
                        rule,
                        str(tags.get("StudyInstanceUID", "")),
                        str(tags.get("SeriesInstanceUID", "")),
                        str(tags.get("SOPInstanceUID", "")),
                        series_id,
                        [instance_id],
                        trigger,
                        transport,
                        t,
                    )
                self.con.execute(
                    "INSERT OR IGNORE INTO instances VALUES (?,?,?,?,?,?,?,?)",
                    (
                        instance_id,
                        series_id,
                        str(tags.get("StudyInstanceUID", "")),
                        str(tags.get("SeriesInstanceUID", "")),
                        str(tags.get("SOPInstanceUID", "")),
                        rule,
                        fid,
                        t,
                    ),
                )
                self.con.execute("COMMIT")
            except BaseException:
                if self.con.in_transaction:  # SQLite rolled back itself (a full disk)
                    self.con.execute("ROLLBACK")
                raise
        return fid

    def forward_waiting(self, series_id: str, trigger: bool, transport: str) -> int | None:
        """Queue one forward of a stable series' waiting instances."""
        t = time.time()
        with self.lock:
            self.con.execute("BEGIN IMMEDIATE")
            try:
                rows = self.con.execute(
                    "SELECT * FROM instances WHERE series_id=? AND forward_id IS NULL "
                    "ORDER BY seen_at",
                    (series_id,),
                ).fetchall()
                if not rows:
                    self.con.execute("COMMIT")
                    return None
                first = rows[0]
                fid = self._insert_forward(
                    "series",
                    first["rule"],
                    first["study_uid"],
                    first["series_uid"],
                    None,
                    series_id,
                    [r["instance_id"] for r in rows],
                    trigger,
                    transport,
                    t,
                )
                self.con.execute(
                    "UPDATE instances SET forward_id=? WHERE series_id=? AND forward_id IS NULL",
                    (fid, series_id),
                )
                self.con.execute("COMMIT")
            except BaseException:
                if self.con.in_transaction:  # SQLite rolled back itself (a full disk)
                    self.con.execute("ROLLBACK")
                raise
        return fid

    def add_forward(
        self,
        kind: str,
        rule: str,
        study_uid: str,
        series_uid: str,
        sop_instance_uid: str | None,
        series_id: str,
        resources: list[str],
        trigger: bool,
        transport: str,
    ) -> int:
        """A forward outside the change feed (a study sent again by hand)."""
        with self.lock:
            return self._insert_forward(
                kind,
                rule,
                study_uid,
                series_uid,
                sop_instance_uid,
                series_id,
                resources,
                trigger,
                transport,
                time.time(),
            )

    def _insert_forward(
        self,
        kind: str,
        rule: str,
        study_uid: str,
        series_uid: str,
        sop_instance_uid: str | None,
        series_id: str,
        resources: list[str],
        trigger: bool,
        transport: str,
        t: float,
    ) -> int:
        cur = self.con.execute(
            "INSERT INTO forwards (kind, rule, study_uid, series_uid, sop_instance_uid, series_id,"
            " resources, transport, state, next_try, trigger, created_at, updated_at)"
            " VALUES (?,?,?,?,?,?,?,?,'queued',?,?,?,?)",
            (
                kind,
                rule,
                study_uid,
                series_uid,
                sop_instance_uid,
                series_id,
                json.dumps(resources),
                transport,
                t,
                int(trigger),
                t,
                t,
            ),
        )
        return int(cur.lastrowid or 0)

    def due(self, now: float) -> list[dict[str, Any]]:
        return self.query(
            "SELECT * FROM forwards WHERE state IN ('queued','retrying') AND next_try<=? "
            "ORDER BY id",
            (now,),
        )

    def in_state(self, state: str) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM forwards WHERE state=? ORDER BY id", (state,))

    def forward(self, fid: int) -> dict[str, Any] | None:
        rows = self.query("SELECT * FROM forwards WHERE id=?", (fid,))
        return rows[0] if rows else None

    def submitted(self, fid: int, job_id: str) -> None:
        row = self.forward(fid)
        jobs = json.loads(row["jobs"]) if row else []
        self.execute(
            "UPDATE forwards SET state='sending', job_id=?, jobs=?, updated_at=? WHERE id=?",
            (job_id, json.dumps(jobs + [job_id]), time.time(), fid),
        )

    def sent(self, fid: int) -> None:
        t = time.time()
        self.execute(
            "UPDATE forwards SET state='sent', error=NULL, sent_at=?, updated_at=? WHERE id=?",
            (t, t, fid),
        )

    def attempt_failed(self, fid: int, error: str, config: Config) -> str:
        """Count a failed attempt; 'retrying' with backoff, or 'failed' when exhausted."""
        row = self.forward(fid)
        assert row is not None
        attempts = row["attempts"] + 1
        t = time.time()
        state = "failed" if attempts >= config.max_attempts else "retrying"
        self.execute(
            "UPDATE forwards SET state=?, attempts=?, error=?, next_try=?, updated_at=? WHERE id=?",
            (state, attempts, error[:2000], t + config.backoff(attempts), t, fid),
        )
        return state

    def given_up(self, fid: int, state: str, error: str) -> None:
        """A forward not tried again: 'failed' (the node refused its one instance) or
        'split' (one of its instances refused: the others sent by forwards of their own)."""
        self.execute(
            "UPDATE forwards SET state=?, attempts=attempts+1, error=?, updated_at=? WHERE id=?",
            (state, error[:2000], time.time(), fid),
        )

    def retry_now(self, fid: int) -> bool:
        """A forward (failed or waiting for its backoff) is due again now, with a fresh count."""
        n = self.execute(
            "UPDATE forwards SET state='queued', attempts=0, next_try=?, updated_at=? "
            "WHERE id=? AND state IN ('failed','retrying')",
            (time.time(), time.time(), fid),
        )
        return n == 1

    def triggered(self, fid: int) -> None:
        self.execute("UPDATE forwards SET triggered=1, updated_at=? WHERE id=?", (time.time(), fid))

    def add_result(self, series_id: str, tags: dict[str, Any], reason: str) -> bool:
        """Count a result instance; True for the first of its series (label it then)."""
        with self.lock:
            n = self.con.execute(
                "INSERT OR IGNORE INTO results VALUES (?,?,?,?,?,?,0,?)",
                (
                    series_id,
                    str(tags.get("StudyInstanceUID", "")),
                    str(tags.get("SeriesInstanceUID", "")),
                    str(tags.get("SeriesDescription", "")),
                    str(tags.get("SOPClassUID", "")),
                    reason,
                    time.time(),
                ),
            ).rowcount
            self.con.execute(
                "UPDATE results SET instances=instances+1 WHERE series_id=?", (series_id,)
            )
        return n == 1

    def counts(self) -> dict[str, int]:
        return {
            r["state"]: r["n"]
            for r in self.query("SELECT state, COUNT(*) n FROM forwards GROUP BY state")
        }


def forward_view(row: dict[str, Any]) -> dict[str, Any]:
    """A ledger row as the REST route shows it."""
    out = dict(row)
    out["resources"] = json.loads(out["resources"])
    out["jobs"] = json.loads(out["jobs"])
    out["trigger"], out["triggered"] = bool(out["trigger"]), bool(out["triggered"])
    for key in ("next_try", "created_at", "updated_at", "sent_at"):
        if out.get(key):
            out[key] = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(out[key]))
    if row["state"] not in ("retrying", "queued"):
        out.pop("next_try")
    return out


# -- the node's REST API ---------------------------------------------------------


class NodeClient:
    """The node's small REST API (``dicom_node/api.py``)."""

    def __init__(
        self,
        base_url: str,
        timeout: float,
        token: str = "",
        ca_file: str = "",
        token_file: str = "",
    ) -> None:
        self.base = base_url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        self._use(token)
        if ca_file:
            self.session.verify = ca_file
        # NodeApiTokenFile is read again when it changes, so that a token rotated on
        # both sides (the node reads its tokens file again too) needs no restart of
        # Orthanc; one that cannot be read keeps the token in use.
        self.token_file = token_file
        self._seen = self._signature() if token_file else ()

    def _use(self, token: str) -> None:
        if token:  # the node's API wants a token unless it listens on loopback without any
            self.session.headers["Authorization"] = f"Bearer {token}"

    def _signature(self) -> tuple[int, ...] | str:
        """What tells a change of the file: (modification time, size, inode), or the
        reason it cannot be seen (deleted, no permission on its folder)."""
        try:
            st = os.stat(self.token_file)
        except OSError as exc:
            return exc.strerror or type(exc).__name__
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _reread_token(self) -> None:
        """The token file read again if it changed. One that cannot be read, or holds
        no token, keeps the token in use (a rotation half done must not stop the
        forwards), logged once per change."""
        seen = self._signature()
        if seen == self._seen:
            return
        self._seen = seen
        token = ""
        if isinstance(seen, str):
            why = seen
        else:
            try:
                with open(self.token_file) as fh:
                    token = fh.read().strip()
                why = "holds no token"
            except OSError as exc:
                why = exc.strerror or type(exc).__name__
        if token:
            self._use(token)
            log.warning("angio-forward: NodeApiTokenFile %s read again", self.token_file)
        else:
            log.warning(
                "angio-forward: NodeApiTokenFile %s: %s; the token in use is kept",
                self.token_file,
                why,
            )

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        if self.token_file:
            self._reread_token()
        try:
            resp = self.session.request(method, self.base + path, timeout=self.timeout, **kw)
        except requests.RequestException as exc:
            raise NodeApiError(f"node API {self.base} unreachable: {exc}") from None
        try:
            body = resp.json()
        except ValueError:
            body = {"error": resp.text[:500]}
        if not resp.ok:
            raise NodeApiError(
                f"node API {method} {path}: HTTP {resp.status_code}: "
                f"{body.get('error', body) if isinstance(body, dict) else body}",
                resp.status_code,
            )
        return body

    def health(self) -> dict[str, Any]:
        return self._call("GET", "/health")

    def status(self) -> dict[str, Any]:
        return self._call("GET", "/status")

    def jobs(self, study_uid: str) -> list[dict[str, Any]]:
        return list(self._call("GET", "/jobs", params={"study": study_uid}).get("jobs", []))

    def trigger(self, series_uid: str) -> list[str]:
        return list(
            self._call("POST", "/trigger", json={"series_uid": series_uid}).get(
                "completed_runs", []
            )
        )

    def reprocess(self, study_uid: str) -> list[int]:
        return list(self._call("POST", "/reprocess", json={"study_uid": study_uid}).get("jobs", []))

    def refusal(self, sop_instance_uid: str) -> dict[str, Any] | None:
        """Why the node last refused an instance (``GET /refusals``), None if it keeps no
        refusal of it."""
        try:
            return dict(self._call("GET", "/refusals", params={"instance": sop_instance_uid}))
        except NodeApiError as exc:
            if exc.status == 404:
                return None
            raise


def node_jobs_for(
    forward: dict[str, Any], jobs: list[dict[str, Any]], concatenation: str | None = None
) -> list[dict[str, Any]]:
    """The node's jobs for the run a forward carried (run id: SOP UID or Series UID; for
    a part of a concatenation, its ``concatenation`` UID, PS3.3 C.7.6.16.2.2.4)."""
    run_id = concatenation or (
        forward["sop_instance_uid"] if forward["kind"] == "instance" else forward["series_uid"]
    )
    keep = (
        "id",
        "pipeline",
        "state",
        "attempts",
        "error",
        "notes",
        "sent",
        "pending",
        "run_state",
        "updated_at",
    )
    return [{k: j.get(k) for k in keep} for j in jobs if j.get("run_id") == run_id]
