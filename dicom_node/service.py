"""The node: wires receive -> spool -> complete -> route -> job -> pipeline -> encode -> send."""

from __future__ import annotations

import json
import logging
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

from apscheduler.schedulers.background import BackgroundScheduler
from pydicom import dcmread
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node import completion
from dicom_node.db import Database
from dicom_node.errors import RunError
from dicom_node.jobs import Job, JobQueue, Workers
from dicom_node.outbox import Outbox
from dicom_node.processing import run_pipeline, write_dataset
from dicom_node.routing import RunFeatures, route
from dicom_node.runs import load_run
from dicom_node.scp import start_scp
from dicom_node.settings import Settings
from dicom_node.spool import Spool, Stored

log = logging.getLogger(__name__)


class Node:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        settings.storage_dir.mkdir(parents=True, exist_ok=True)
        self.db = Database(settings.db_path)
        self.spool = Spool(
            settings.storage_dir, self.db, settings.min_free_bytes, settings.max_uid_length
        )
        self.completion = completion.QuietPeriodRule(settings.completion.quiet_period_s)
        self.queue = JobQueue(self.db, settings.workers)
        self.outbox = Outbox(self.db, settings)
        self.workers = Workers(
            self.queue, self.execute, settings.workers.concurrency, settings.workers.poll_interval_s
        )
        self.scheduler = BackgroundScheduler()
        self.results_dir = settings.storage_dir / "results"
        self.server: ThreadedAssociationServer | None = None
        self.api: ThreadingHTTPServer | None = None
        self._route_lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> Node:
        self.queue.recover()
        self._route_pending()
        self.outbox.start()
        self.workers.start()
        self.scheduler.add_job(
            self.sweep,
            "interval",
            seconds=self.settings.completion.sweep_interval_s,
            max_instances=1,
            coalesce=True,
            id="completion-sweep",
        )
        self.scheduler.start()
        self.server = start_scp(self.settings, self.spool, self.on_stored)
        if self.settings.api.enabled:
            from dicom_node.api import start_api

            self.api = start_api(self)
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
        if self.api is not None:
            self.api.shutdown()
        self.scheduler.shutdown(wait=False)
        self.workers.stop()
        self.outbox.stop()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.server_address[1])

    @property
    def api_port(self) -> int:
        assert self.api is not None
        return int(self.api.server_address[1])

    # -- complete and route ------------------------------------------------
    def on_stored(self, stored: Stored) -> None:
        if self.completion.complete_on_arrival(stored) and not stored.duplicate:
            if completion.complete(self.db, stored.run_id, "single-instance multi-frame run"):
                self.route_run(stored.run_id)

    def sweep(self) -> None:
        for run_id in self.completion.due(self.db):
            if completion.complete(
                self.db, run_id, f"quiet for {self.completion.quiet_period_s:g} s"
            ):
                self.route_run(run_id)

    def trigger(self, **selector: str) -> list[str]:
        """Complete runs now (REST/CLI trigger, Orthanc stable series)."""
        done = []
        for run_id in completion.runs_for(self.db, **selector):
            if completion.complete(self.db, run_id, "explicit trigger"):
                self.route_run(run_id)
                done.append(run_id)
        return done

    def reprocess(self, **selector: str) -> list[int]:
        """Route the selected runs again and queue new jobs (results resent)."""
        jobs: list[int] = []
        for run_id in completion.runs_for(self.db, **selector):
            with self.db.transaction() as con:
                con.execute(
                    "UPDATE runs SET state='complete', reason='reprocess' WHERE run_id=?", (run_id,)
                )
            jobs.extend(self.route_run(run_id, resend=True))
        return jobs

    def _route_pending(self) -> None:
        """Runs completed but not routed before a crash are routed at start."""
        for row in self.db.query("SELECT run_id FROM runs WHERE state='complete'"):
            self.route_run(row["run_id"])

    def route_run(self, run_id: str, resend: bool = False) -> list[int]:
        with self._route_lock:
            rows = self.db.query(
                "SELECT path, calling_aet FROM instances WHERE run_id=?", (run_id,)
            )
            if not rows:
                return []
            headers = [dcmread(r["path"], stop_before_pixels=True) for r in rows]
            decision = route(
                self.settings.effective_rules(),
                RunFeatures.from_headers(headers, rows[0]["calling_aet"]),
            )
            job_ids: list[int] = []
            with self.db.transaction() as con:
                state = con.execute("SELECT state FROM runs WHERE run_id=?", (run_id,)).fetchone()
                if state is None or state["state"] != "complete":
                    return []
                if decision.rule is None or not decision.rule.pipelines:
                    why = (
                        "no rule matched"
                        if decision.rule is None
                        else f"rule {decision.rule.name} has no pipeline"
                    )
                    con.execute(
                        "UPDATE runs SET state='unrouted', rule=?, reason=? WHERE run_id=?",
                        (decision.rule.name if decision.rule else None, why, run_id),
                    )
                    log.warning("run %s not routed: %s", run_id, why)
                    return []
                con.execute(
                    "UPDATE runs SET state='routed', rule=? WHERE run_id=?",
                    (decision.rule.name, run_id),
                )
            dests = [d.name for d in self.settings.destinations_for(decision.rule)]
            if resend:
                dests = [f"{d}!resend" for d in dests]
            for name in decision.rule.pipelines:
                job_ids.append(self.queue.enqueue(run_id, name, dests))
            log.info("run %s -> rule %s: jobs %s", run_id, decision.rule.name, job_ids)
            self.workers.wake.set()
            return job_ids

    # -- a job -------------------------------------------------------------
    def execute(self, job: Job) -> list[str]:
        rows = self.db.query(
            "SELECT path FROM instances WHERE run_id=? ORDER BY received_at", (job.run_id,)
        )
        if not rows:
            raise RunError(f"run {job.run_id} has no stored instances")
        loaded = load_run([Path(r["path"]) for r in rows])
        datasets, notes = run_pipeline(loaded, job.pipeline, self.settings)
        out_dir = self.results_dir / str(job.id)
        for ds in datasets:
            path = write_dataset(ds, out_dir)
            for dest in job.destinations:
                name, _, flag = dest.partition("!")
                self.outbox.add(
                    job.id,
                    name,
                    path,
                    str(ds.SOPClassUID),
                    str(ds.SOPInstanceUID),
                    str(ds.SeriesInstanceUID),
                    resend=flag == "resend",
                )
        notes.append(
            f"{len(datasets)} object(s): "
            + ", ".join(
                sorted({str(ds.get("SeriesDescription", ds.SOPClassUID)) for ds in datasets})
            )
        )
        return notes

    # -- status ------------------------------------------------------------
    def status(self) -> dict[str, object]:
        return status_summary(self.db)


def status_summary(db: Database) -> dict[str, object]:
    def counts(table: str) -> dict[str, int]:
        return {
            r["state"]: r["n"]
            for r in db.query(f"SELECT state, COUNT(*) n FROM {table} GROUP BY state")
        }

    failures = [
        dict(r)
        for r in db.query(
            "SELECT id, run_id, pipeline, error, updated_at FROM jobs WHERE state='failed' ORDER BY id DESC LIMIT 20"
        )
    ]
    backlog = [
        dict(r)
        for r in db.query(
            "SELECT destination, COUNT(*) n, MAX(attempts) attempts, MAX(error) error FROM outbox "
            "WHERE state='pending' GROUP BY destination"
        )
    ]
    unrouted = [
        dict(r)
        for r in db.query(
            "SELECT run_id, series_uid, reason FROM runs WHERE state='unrouted' ORDER BY last_at DESC LIMIT 20"
        )
    ]
    return {
        "instances": db.query("SELECT COUNT(*) n FROM instances")[0]["n"],
        "runs": counts("runs"),
        "jobs": counts("jobs"),
        "outbox": counts("outbox"),
        "failed_jobs": failures,
        "outbox_backlog": backlog,
        "unrouted_runs": unrouted,
    }


def jobs_for(
    db: Database,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> list[dict[str, object]]:
    where, params = "", ()  # type: tuple[str, tuple[str, ...]]
    if sop_instance_uid:
        where, params = (
            "WHERE r.run_id IN (SELECT run_id FROM instances WHERE sop_instance_uid=?)",
            (sop_instance_uid,),
        )
    elif series_uid:
        where, params = "WHERE r.series_uid=?", (series_uid,)
    elif study_uid:
        where, params = "WHERE r.study_uid=?", (study_uid,)
    rows = db.query(
        "SELECT j.id, j.run_id, j.pipeline, j.state, j.attempts, j.error, j.notes, j.created_at, j.updated_at,"
        " r.series_uid, r.study_uid, r.state AS run_state, r.rule,"
        " (SELECT COUNT(*) FROM outbox o WHERE o.job_id=j.id AND o.state='sent') AS sent,"
        " (SELECT COUNT(*) FROM outbox o WHERE o.job_id=j.id AND o.state='pending') AS pending"
        f" FROM runs r LEFT JOIN jobs j ON j.run_id=r.run_id {where} ORDER BY r.first_at, j.id",
        params,
    )
    out = []
    for r in rows:
        d = dict(r)
        d["notes"] = json.loads(d["notes"]) if d.get("notes") else []
        out.append(d)
    return out
