"""The forwarder's loop: read Orthanc's change log, queue forwards, submit them as
Orthanc jobs, watch the jobs, retry with backoff, label the node's results.

``api`` is anything with ``get(uri) -> Any`` (parsed JSON), ``post(uri, body) ->
Any`` and ``put(uri, body) -> None`` on Orthanc's REST API that raises
``OrthancError``; inside Orthanc it wraps ``orthanc.RestApi*``.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
from typing import Any, Protocol

from angio_core import (
    KOS_SOP_CLASS,
    REJECTION_RULE,
    SENDER_HEADER,
    UNKNOWN_RESOURCE,
    AngioError,
    Config,
    Ledger,
    NodeApiError,
    NodeClient,
    OrthancError,
    frames_of,
    log,
    partly_received,
    refusal,
    rejection_listed,
)

_ORTHANC_ID = re.compile(r"^[0-9a-f]{8}(-[0-9a-f]{8}){4}\Z")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*\Z")
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}\Z")  # PS3.5 AE: no backslash
PAGE = 100


class OrthancApi(Protocol):
    def get(self, uri: str) -> Any: ...
    def post(self, uri: str, body: Any) -> Any: ...
    def put(self, uri: str, body: str) -> None: ...


def version_tuple(version: str) -> tuple[int, ...]:
    """'1.10.1' -> (1, 10, 1); 'mainline' (a development build) sorts above all releases."""
    parts = re.findall(r"\d+", version)
    return tuple(int(p) for p in parts) if parts else (999,)


class Forwarder:
    def __init__(
        self,
        config: Config,
        api: OrthancApi,
        ledger: Ledger,
        node: NodeClient,
        orthanc_version: str,
        has_labels: bool = False,
    ) -> None:
        self.config = config
        self.api = api
        self.ledger = ledger
        self.node = node
        self.orthanc_version = orthanc_version
        # Labels arrived in Orthanc 1.12.0 (/system says "HasLabels": true where the database
        # supports them); before that, metadata is what we have.
        self.labels_supported = has_labels and version_tuple(orthanc_version) >= (1, 12, 0)
        self.wake = threading.Event()
        self.stop_event = threading.Event()
        self.thread: threading.Thread | None = None
        self.last_error: str | None = None
        self._failing: dict[str, str] = {}  # each part of the loop: its failure, once logged
        # Orthanc instance -> its Concatenation UID ("" for none), for the views
        self._concatenations: dict[str, str] = {}

    # -- the loop -----------------------------------------------------------------
    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name="angio-forward", daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.stop_event.set()
        self.wake.set()
        if self.thread is not None:
            self.thread.join(timeout)
            if self.thread.is_alive():
                log.error("angio-forward: worker thread did not stop in %.0f s", timeout)

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def _loop(self) -> None:
        while not self.stop_event.is_set():
            self.step()
            self.wake.wait(self.config.poll_s)
            self.wake.clear()

    def step(self) -> None:
        """One pass; a failing part is logged and retried at the next pass. The same
        failure again is not logged again (the ledger's disk full: a line every poll),
        and its end is. SQLite's errors (the ledger's disk full or failing), or a defect,
        ended the loop's thread, and nothing was forwarded until Orthanc restarted."""
        for part in (
            self.catch_up,
            self.read_again,
            self.dispatch,
            self.poll_jobs,
            self.trigger_pending,
        ):
            if self.stop_event.is_set():
                return
            name = part.__name__
            try:
                part()
            except Exception as exc:  # noqa: BLE001 - nothing may end the loop's thread
                self.last_error = f"{name}: {exc}"
                if self._failing.get(name) != str(exc):
                    expected = (AngioError, OSError, ValueError, KeyError, sqlite3.Error)
                    # a defect of the plugin's: with its trace, once
                    trace = None if isinstance(exc, expected) else exc
                    log.error("angio-forward: %s failed: %s", name, exc, exc_info=trace)
                self._failing[name] = str(exc)
                continue
            if self._failing.pop(name, None) is not None:
                log.warning("angio-forward: %s works again", name)

    # -- the change log -------------------------------------------------------------
    def catch_up(self) -> int:
        """Handle Orthanc changes since the last one seen; returns how many."""
        seen = self.ledger.get_meta("last_change")
        if seen is None:
            last = (
                0
                if self.config.forward_existing_on_first_start
                else int(self.api.get("/changes?last")["Last"])
            )
            self.ledger.set_meta("last_change", str(last))
            log.warning("angio-forward: first start, following Orthanc changes after #%d", last)
            seen = str(last)
        since, handled = int(seen), 0
        while not self.stop_event.is_set():
            page = self.api.get(f"/changes?since={since}&limit={PAGE}")
            for change in page["Changes"]:
                self._handle_or_defer(change)
                since = int(change["Seq"])
                self.ledger.set_meta("last_change", str(since))
                handled += 1
            if page["Done"] or not page["Changes"]:
                break
        return handled

    def _handle_or_defer(self, change: dict[str, Any]) -> None:
        """Handle a change; a new instance Orthanc cannot give is set aside and read again
        later (``read_again``), so that the changes after it are handled: one instance
        whose file Orthanc lost or cannot parse stopped the change log there for good,
        and nothing sent after it was forwarded."""
        try:
            self._handle_change(change)
        except (OrthancError, OSError, ValueError, KeyError) as exc:
            if change["ChangeType"] != "NewInstance":
                raise
            self._unread(str(change["ID"]), int(change["Seq"]), exc)

    def _unread(self, instance_id: str, seq: int, exc: Exception) -> None:
        error = f"cannot be read: {exc}"
        state = self.ledger.unread_failed(instance_id, seq, error, self.config)
        if state == "failed":
            self.last_error = f"instance {instance_id} not forwarded: {error}"
            log.error(
                "angio-forward: instance %s (change %d) not forwarded after %d attempts: %s",
                instance_id,
                seq,
                self.config.max_attempts,
                error,
            )
        else:
            log.warning(
                "angio-forward: instance %s (change %d) %s; read again later",
                instance_id,
                seq,
                error,
            )

    def read_again(self) -> None:
        """New instances set aside by ``_handle_or_defer`` whose next try is due. A
        single-frame one whose series Orthanc found stable meanwhile is forwarded now
        (its StableSeries change has passed)."""
        for row in self.ledger.unread_due(time.time()):
            rid = row["instance_id"]
            try:
                self.handle_instance(rid)
                series = self.api.get(f"/instances/{rid}/series")
            except (OrthancError, OSError, ValueError, KeyError) as exc:
                if isinstance(exc, OrthancError) and exc.code == UNKNOWN_RESOURCE:
                    self.ledger.unread_read(rid)  # deleted meanwhile
                else:
                    self._unread(rid, row["change_seq"], exc)
                continue
            self.ledger.unread_read(rid)
            log.info("angio-forward: instance %s read at attempt %d", rid, row["attempts"] + 1)
            if series.get("IsStable"):
                self.handle_stable_series(str(series["ID"]))

    def _handle_change(self, change: dict[str, Any]) -> None:
        kind, rid = change["ChangeType"], change["ID"]
        try:
            if kind == "NewInstance":
                self.handle_instance(rid)
            elif kind == "StableSeries":
                self.handle_stable_series(rid)
        except OrthancError as exc:
            if exc.code != UNKNOWN_RESOURCE:
                raise
            log.info("angio-forward: %s %s was deleted before it was handled", kind, rid)

    def handle_instance(self, instance_id: str) -> None:
        if self.ledger.known_instance(instance_id):
            return
        # Index lookups first (metadata, the series' main tags): most of a PACS's traffic
        # is neither the node's output nor angiography, and is dismissed without a file read.
        meta = self.api.get(f"/instances/{instance_id}/metadata?expand")
        series = self.api.get(f"/instances/{instance_id}/series")
        series_id = series["ID"]
        sop_class = str(meta.get("SopClassUid", ""))
        reason = self.config.result_reason(
            series.get("MainDicomTags", {}), str(meta.get("RemoteAET", ""))
        )
        if reason is None and sop_class == KOS_SOP_CLASS:
            self.handle_note(instance_id, series_id)
            return
        if reason is None and sop_class and not self.config.may_match(sop_class):
            return
        tags = self.api.get(f"/instances/{instance_id}/tags?simplify")
        if reason is None:
            reason = self.config.result_reason(tags, "")
        if reason is not None:
            self.label_result(series_id, tags, reason)
            return
        rule = self.config.rule_for(tags, sop_class or str(tags.get("SOPClassUID", "")))
        if rule is None:
            return
        # One multi-frame instance is a whole run: no reason to wait for StableAge.
        self._record(
            instance_id,
            series_id,
            tags,
            rule.name,
            frames_of(tags) > 1,
            f"run {tags.get('SOPInstanceUID')} (rule {rule.name})",
        )

    def _record(
        self,
        instance_id: str,
        series_id: str,
        tags: dict[str, Any],
        rule: str,
        forward_now: bool,
        what: str,
    ) -> None:
        """A matching instance in the ledger; forwarded alone at once when ``forward_now``."""
        fid = self.ledger.add_instance(
            instance_id,
            series_id,
            tags,
            rule,
            forward_now=forward_now,
            trigger=False,
            transport=self.config.transport,
        )
        if fid is not None:
            log.info("angio-forward: %s queued as forward %d", what, fid)
            self.wake.set()

    def handle_note(self, instance_id: str, series_id: str) -> None:
        """A Key Object Selection Document: a rejection note (IHE IOCM) that lists an
        instance forwarded to the node goes to it at once, which withdraws what it made
        of them (dicom_node.rejection); the node's own notes are results."""
        tags = self.api.get(f"/instances/{instance_id}/tags?simplify")
        reason = self.config.result_reason(tags, "")
        if reason is not None:
            self.label_result(series_id, tags, reason)
            return
        listed = rejection_listed(tags)
        if not listed or not self.ledger.holds_any(listed):
            return  # another key object selection, or a rejection of nothing forwarded
        what = f"rejection note {tags.get('SOPInstanceUID')} ({len(listed)} instance(s))"
        self._record(instance_id, series_id, tags, REJECTION_RULE, True, what)

    def handle_stable_series(self, series_id: str) -> None:
        fid = self.ledger.forward_waiting(
            series_id,
            trigger=self.config.trigger_node_after_series,
            transport=self.config.transport,
        )
        if fid is not None:
            log.info("angio-forward: stable series %s queued as forward %d", series_id, fid)

    def label_result(self, series_id: str, tags: dict[str, Any], reason: str) -> None:
        """Mark a result series: metadata always, a label where Orthanc has labels (>= 1.12)."""
        if self.ledger.query("SELECT 1 FROM results WHERE series_id=?", (series_id,)):
            self.ledger.add_result(series_id, tags, reason)
            return
        value = json.dumps(
            {
                "reason": reason,
                "description": str(tags.get("SeriesDescription", "")),
                "sop_class_uid": str(tags.get("SOPClassUID", "")),
            }
        )
        self.api.put(f"/series/{series_id}/metadata/AngioNodeResult", value)
        if self.labels_supported:
            self.api.put(f"/series/{series_id}/labels/{self.config.result_label}", "")
        self.ledger.add_result(series_id, tags, reason)
        log.info(
            "angio-forward: result series %s (%s) labelled, not forwarded: %s",
            series_id,
            tags.get("SeriesDescription", ""),
            reason,
        )

    # -- jobs -------------------------------------------------------------------------
    def dispatch(self) -> int:
        """Submit the forwards that are due as Orthanc jobs."""
        n = 0
        for row in self.ledger.due(time.time()):
            if self.stop_event.is_set():
                break
            resources = json.loads(row["resources"])
            sender = self.sender_of(resources)
            try:
                if row["transport"] == "dicomweb":
                    body: dict[str, Any] = {"Resources": resources, "Synchronous": False}
                    if sender:
                        body["HttpHeaders"] = {SENDER_HEADER: sender}
                    job = self.api.post(
                        f"/dicom-web/servers/{self.config.node_dicomweb_server}/stow", body
                    )
                else:
                    body = {"Resources": resources, "Asynchronous": True, "Permissive": False}
                    if sender:  # an ID of 0 would be "not a C-MOVE": Orthanc would leave it out
                        body |= {
                            "MoveOriginatorAet": sender,
                            "MoveOriginatorID": row["id"] % 65535 + 1,
                        }
                    job = self.api.post(f"/modalities/{self.config.node_modality}/store", body)
            except OrthancError as exc:
                gone = self._deleted(resources) if exc.code == UNKNOWN_RESOURCE else []
                if gone:
                    self._without_deleted(row, resources, gone)
                else:
                    self._failed(row, f"cannot submit the job: {exc}")
                continue
            self.ledger.submitted(row["id"], job["ID"])
            self._mark_source(row, f"sending (forward {row['id']}, job {job['ID']})")
            n += 1
        return n

    def sender_of(self, resources: list[str]) -> str:
        """The AE that sent a forward's instances to Orthanc (its first instance's
        ``RemoteAET``), named to the node so that the suites behind this Orthanc keep
        their own turns and share of its disk (the node believes it from the senders in
        its ``forwarders``); "" when none sent it over DICOM (a REST upload)."""
        if not resources:
            return ""
        try:
            meta = self.api.get(f"/instances/{resources[0]}/metadata?expand")
        except OrthancError as exc:  # deleted (the job's submission finds it), or not one
            log.info("angio-forward: no sender of %s to name: %s", resources[0], exc)
            return ""
        aet = str(meta.get("RemoteAET", "")).strip() if isinstance(meta, dict) else ""
        return aet if _AE_TITLE.match(aet) else ""  # never a value Orthanc's job refuses

    def poll_jobs(self) -> None:
        for row in self.ledger.in_state("sending"):
            try:
                job = self.api.get(f"/jobs/{row['job_id']}")
            except OrthancError as exc:
                if exc.code != UNKNOWN_RESOURCE:
                    raise
                # Evicted from the history or lost: send again (the node stores duplicates once).
                self._failed(row, f"Orthanc job {row['job_id']} disappeared")
                continue
            state = job.get("State")
            if state == "Success":
                self.ledger.sent(row["id"])
                self._mark_source(row, f"sent (forward {row['id']}, job {row['job_id']})")
                log.info("angio-forward: forward %d delivered (job %s)", row["id"], row["job_id"])
                if row["trigger"]:
                    self._trigger(row)
            elif state == "Failure":
                content = job.get("Content") or {}
                details = job.get("ErrorDetails") or content.get("FunctionErrorDescription") or ""
                more = content.get("FunctionErrorDetails")  # the STOW-RS client's: "4 out of 5"
                if more and more not in details:
                    details = f"{details}: {more}" if details else str(more)
                error = f"job {row['job_id']}: {job.get('ErrorDescription', '?')}" + (
                    f": {details}" if details else ""
                )
                if refusal(error) is not None:
                    self._refused(row, error)
                elif partly_received(error, len(json.loads(row["resources"]))):
                    self._split(row, error, "the node took only some of its instances")
                elif (why := self._refused_over_stow(row)) is not None:
                    self._refused(row, f"{error}: {why}")
                else:
                    self._failed(row, error)

    def _refused_over_stow(self, row: dict[str, Any]) -> str | None:
        """Why the node refused the one instance of a STOW-RS forward for good, as its
        ``/refusals`` says, or None (not refused for good, not since this forward began,
        or it cannot be asked). Orthanc's STOW-RS client says only "Error in the network
        protocol" of the node's 409 (refused for good) and 503 (no room) alike, so the
        instance was sent again ``MaxAttempts`` times, hours at the default backoff."""
        resources = json.loads(row["resources"])
        if row["transport"] != "dicomweb" or len(resources) != 1:
            return None
        try:
            sop = row["sop_instance_uid"] or self.api.get(f"/instances/{resources[0]}")[
                "MainDicomTags"
            ].get("SOPInstanceUID", "")
            found = self.node.refusal(sop) if sop else None
        except (OrthancError, NodeApiError, KeyError, TypeError) as exc:
            log.info("angio-forward: forward %d: the node not asked why: %s", row["id"], exc)
            return None
        if not found or float(found.get("at") or 0) < float(row["created_at"] or 0):
            return None
        why = f"the node refused it: DIMSE status {found.get('status')}: {found.get('reason')}"
        return why if refusal(why) is not None else None

    def _refused(self, row: dict[str, Any], error: str) -> None:
        """The node refused an instance for good (its status says so): sending it again
        would be refused again. Orthanc's job stops at the refusal, so that the rest of
        a series never arrived, and the forward was tried ``MaxAttempts`` times, the
        node left with a part of the run. One instance: failed at once, with the reason.
        Several: each is sent by a forward of its own (the one refused fails alone; the
        node stores again those that arrived once), and the node completes the run
        after its quiet period."""
        resources = json.loads(row["resources"])
        if len(resources) == 1:
            self.ledger.given_up(
                row["id"], "failed", f"refused by the node, not sent again: {error}"
            )
            log.error(
                "angio-forward: forward %d refused by the node, not sent again: %s",
                row["id"],
                error,
            )
            self._mark_source(row, f"failed: refused by the node: {error}"[:500])
            return
        self._split(row, error, f"the node refused one of its {len(resources)} instances")

    def _split(self, row: dict[str, Any], error: str, why: str) -> None:
        """Each instance of ``row`` sent by a forward of its own: the one the node
        refuses is tried (and fails) alone, and the others are not sent again with it
        (the node stores again those that arrived once, as duplicates)."""
        resources = json.loads(row["resources"])
        children = [self._again(row, [iid], alone=True) for iid in resources]
        self.ledger.given_up(
            row["id"],
            "split",
            f"{why} ({error}): each sent by a forward of its own, {children[0]}-{children[-1]}",
        )
        log.warning(
            "angio-forward: forward %d: %s (%s); each is sent by a forward of its own, %d-%d",
            row["id"],
            why,
            error,
            children[0],
            children[-1],
        )
        self.wake.set()

    def _again(self, row: dict[str, Any], resources: list[str], alone: bool = False) -> int:
        """A new forward of ``resources``, of ``row``'s run; ``alone``: one instance of
        a split series, which does not trigger the node (the series' run completes after
        its quiet period)."""
        return self.ledger.add_forward(
            "series" if alone else row["kind"],
            row["rule"],
            row["study_uid"],
            row["series_uid"],
            None if alone else row["sop_instance_uid"],
            row["series_id"],
            resources,
            False if alone else bool(row["trigger"]),
            row["transport"],
        )

    def concatenation_of(self, row: dict[str, Any]) -> str | None:
        """The Concatenation UID of the one instance ``row`` forwarded, None if it has
        none or Orthanc cannot give it (read once an instance; the last 10,000 kept)."""
        resources = json.loads(row["resources"])
        if len(resources) != 1:
            return None
        iid = resources[0]
        known = self._concatenations.get(iid)
        if known is None:
            try:
                tags = self.api.get(f"/instances/{iid}/tags?simplify")
            except OrthancError as exc:
                log.info("angio-forward: forward %d: its instance not read: %s", row["id"], exc)
                return None
            known = str(tags.get("ConcatenationUID") or "")
            with self.ledger.lock:  # the views run in Orthanc's REST threads
                if len(self._concatenations) >= 10_000:
                    self._concatenations.pop(next(iter(self._concatenations)))
                self._concatenations[iid] = known
        return known or None

    def _deleted(self, resources: list[str]) -> list[str]:
        """The instances of ``resources`` Orthanc no longer has."""
        gone = []
        for iid in resources:
            try:
                self.api.get(f"/instances/{iid}")
            except OrthancError as exc:
                if exc.code != UNKNOWN_RESOURCE:
                    raise
                gone.append(iid)
        return gone

    def _without_deleted(self, row: dict[str, Any], resources: list[str], gone: list[str]) -> None:
        """Instances deleted from Orthanc (by a user, or by Orthanc recycling a full
        storage) while their forward waited: its job could not be submitted, and the
        forward was tried ``MaxAttempts`` times, hours at the default backoff. It fails
        now, saying so; the instances left go by a forward of their own."""
        left = [iid for iid in resources if iid not in gone]
        error = f"{len(gone)} of its {len(resources)} instance(s) deleted from Orthanc"
        if left:
            error += f": the {len(left)} left sent by forward {self._again(row, left)}"
            self.wake.set()
        self.ledger.given_up(row["id"], "failed", error)
        log.warning("angio-forward: forward %d failed: %s", row["id"], error)

    def _failed(self, row: dict[str, Any], error: str) -> None:
        state = self.ledger.attempt_failed(row["id"], error, self.config)
        attempts = row["attempts"] + 1
        if state == "failed":
            log.error(
                "angio-forward: forward %d FAILED after %d attempt(s), not retried: %s",
                row["id"],
                attempts,
                error,
            )
        else:
            log.warning(
                "angio-forward: forward %d attempt %d failed, retry in %.0f s: %s",
                row["id"],
                attempts,
                self.config.backoff(attempts),
                error,
            )
        self._mark_source(row, f"{state} after {attempts} attempt(s): {error}"[:500])

    def _mark_source(self, row: dict[str, Any], text: str) -> None:
        try:
            self.api.put(f"/series/{row['series_id']}/metadata/AngioNodeForward", text)
        except OrthancError as exc:  # the series may have been deleted; the ledger has the state
            log.warning(
                "angio-forward: cannot set AngioNodeForward on %s: %s", row["series_id"], exc
            )

    def trigger_pending(self) -> None:
        for row in self.ledger.query(
            "SELECT * FROM forwards WHERE state='sent' AND trigger=1 AND triggered=0"
        ):
            self._trigger(row)

    def _trigger(self, row: dict[str, Any]) -> None:
        """Ask the node to complete a multi-instance run now (else its quiet period does)."""
        try:
            runs = self.node.trigger(row["series_uid"])
        except NodeApiError as exc:
            log.warning(
                "angio-forward: trigger of series %s failed (the node's quiet period will "
                "complete it): %s",
                row["series_uid"],
                exc,
            )
            if exc.status is not None:  # the node answered: do not ask again
                self.ledger.triggered(row["id"])
            return
        self.ledger.triggered(row["id"])
        log.info("angio-forward: node completed run(s) %s", runs)

    # -- actions from the REST route ---------------------------------------------------
    def study_uid_of(self, study: str) -> tuple[str, str | None]:
        """(StudyInstanceUID, Orthanc study id or None) from either form."""
        if _ORTHANC_ID.match(study):
            info = self.api.get(f"/studies/{study}")
            return str(info["MainDicomTags"]["StudyInstanceUID"]), study
        if not _UID.match(study) or len(study) > 64:
            raise ValueError(f"{study!r} is neither an Orthanc study id nor a Study Instance UID")
        found = self.api.post("/tools/lookup", study)
        ids = [r["ID"] for r in found if r.get("Type") == "Study"]
        return study, ids[0] if ids else None

    def reprocess_study(self, study: str) -> dict[str, Any]:
        """Ask the node to process a study again; if it no longer has it, forward it again."""
        uid, orthanc_id = self.study_uid_of(study)
        try:
            jobs = self.node.reprocess(uid)
            return {"study_uid": uid, "action": "reprocessed by the node", "node_jobs": jobs}
        except NodeApiError as exc:
            if exc.status != 404:
                raise
        if orthanc_id is None:
            raise OrthancError(
                UNKNOWN_RESOURCE, f"study {uid} is neither on the node nor in Orthanc"
            )
        return {
            "study_uid": uid,
            "action": "forwarded again (the node did not have it)",
            "forwards": self.forward_study(orthanc_id),
        }

    def forward_study(self, study_id: str) -> list[int]:
        """Queue forwards for a study's matching instances, already forwarded or not."""
        singles: dict[str, list[tuple[str, dict[str, Any], str]]] = {}
        forwards = []
        for inst in self.api.get(f"/studies/{study_id}/instances"):
            iid, series_id = inst["ID"], inst["ParentSeries"]
            tags = self.api.get(f"/instances/{iid}/tags?simplify")
            meta = self.api.get(f"/instances/{iid}/metadata?expand")
            if self.config.result_reason(tags, str(meta.get("RemoteAET", ""))) is not None:
                continue
            rule = self.config.rule_for(
                tags, str(meta.get("SopClassUid") or tags.get("SOPClassUID", ""))
            )
            if rule is None:
                continue
            if frames_of(tags) > 1:
                forwards.append(
                    self.ledger.add_forward(
                        "instance",
                        rule.name,
                        str(tags.get("StudyInstanceUID", "")),
                        str(tags.get("SeriesInstanceUID", "")),
                        str(tags.get("SOPInstanceUID", "")),
                        series_id,
                        [iid],
                        False,
                        self.config.transport,
                    )
                )
            else:
                singles.setdefault(series_id, []).append((iid, tags, rule.name))
        for series_id, items in singles.items():
            _, tags, rule_name = items[0]
            forwards.append(
                self.ledger.add_forward(
                    "series",
                    rule_name,
                    str(tags.get("StudyInstanceUID", "")),
                    str(tags.get("SeriesInstanceUID", "")),
                    None,
                    series_id,
                    [i for i, _, _ in items],
                    self.config.trigger_node_after_series,
                    self.config.transport,
                )
            )
        self.wake.set()
        return forwards
