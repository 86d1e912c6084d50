"""A persistent job queue in SQLite with leases, retries and worker threads.

A worker claims a job by setting a lease. A job whose worker died (process
killed) is taken again when its lease expires, or at once at the next start,
since every start gets a new worker identity. Failures retry with exponential
backoff up to ``max_attempts``; permanent errors (RunError, PipelineError) fail
at once. This module is where a job's exception becomes a failed-job record.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from dicom_node.db import Database, now
from dicom_node.errors import RunError
from dicom_node.settings import WorkerSettings
from pipelines.base import PipelineError

log = logging.getLogger(__name__)

PERMANENT = (RunError, PipelineError)


@dataclass(frozen=True)
class Job:
    id: int
    run_id: str
    pipeline: str
    destinations: list[str]
    attempts: int


class JobQueue:
    def __init__(self, db: Database, settings: WorkerSettings) -> None:
        self.db = db
        self.settings = settings
        self.worker_prefix = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def enqueue(self, run_id: str, pipeline: str, destinations: list[str]) -> int:
        t = now()
        with self.db.transaction() as con:
            cur = con.execute(
                "INSERT INTO jobs (run_id, pipeline, destinations, state, not_before, created_at, updated_at)"
                " VALUES (?,?,?,?,?,?,?)",
                (run_id, pipeline, json.dumps(destinations), "queued", t, t, t),
            )
            return int(cur.lastrowid or 0)

    def recover(self) -> int:
        """Jobs left running by a previous process go back to the queue now."""
        with self.db.transaction() as con:
            cur = con.execute(
                "UPDATE jobs SET state='queued', lease_until=NULL, worker=NULL, updated_at=? "
                "WHERE state='running' AND (worker IS NULL OR worker NOT LIKE ?)",
                (now(), f"{self.worker_prefix}%"),
            )
            n = cur.rowcount
        if n:
            log.warning("re-queued %d job(s) left running by a previous process", n)
        return n

    def claim(self, worker: str) -> Job | None:
        t = now()
        with self.db.transaction() as con:
            row = con.execute(
                "SELECT * FROM jobs WHERE (state='queued' AND not_before <= ?) "
                "OR (state='running' AND lease_until < ?) ORDER BY id LIMIT 1",
                (t, t),
            ).fetchone()
            if row is None:
                return None
            con.execute(
                "UPDATE jobs SET state='running', lease_until=?, worker=?, attempts=attempts+1, "
                "updated_at=? WHERE id=?",
                (t + self.settings.lease_s, worker, t, row["id"]),
            )
        return Job(
            row["id"],
            row["run_id"],
            row["pipeline"],
            json.loads(row["destinations"]),
            row["attempts"] + 1,
        )

    def done(self, job: Job, notes: list[str]) -> None:
        with self.db.transaction() as con:
            con.execute(
                "UPDATE jobs SET state='done', lease_until=NULL, error=NULL, notes=?, updated_at=? WHERE id=?",
                (json.dumps(notes), now(), job.id),
            )

    def failed(self, job: Job, exc: BaseException) -> None:
        permanent = isinstance(exc, PERMANENT)
        reason = f"{type(exc).__name__}: {exc}"
        t = now()
        with self.db.transaction() as con:
            if permanent or job.attempts >= self.settings.max_attempts:
                con.execute(
                    "UPDATE jobs SET state='failed', lease_until=NULL, error=?, updated_at=? WHERE id=?",
                    (reason, t, job.id),
                )
                log.error(
                    "job %d (%s on run %s) failed after %d attempt(s): %s",
                    job.id,
                    job.pipeline,
                    job.run_id,
                    job.attempts,
                    reason,
                )
            else:
                delay = min(
                    self.settings.backoff_base_s * 2 ** (job.attempts - 1),
                    self.settings.backoff_max_s,
                )
                con.execute(
                    "UPDATE jobs SET state='queued', lease_until=NULL, error=?, not_before=?, updated_at=? "
                    "WHERE id=?",
                    (reason, t + delay, t, job.id),
                )
                log.warning(
                    "job %d attempt %d failed, retry in %.0f s: %s",
                    job.id,
                    job.attempts,
                    delay,
                    reason,
                )


class Workers:
    """``concurrency`` threads that claim and execute jobs until stopped."""

    def __init__(
        self,
        queue: JobQueue,
        execute: Callable[[Job], list[str]],
        concurrency: int,
        poll_interval_s: float,
    ) -> None:
        self.queue = queue
        self.execute = execute
        self.poll = poll_interval_s
        self.stop_event = threading.Event()
        self.threads = [
            threading.Thread(
                target=self._loop,
                name=f"worker-{i}",
                daemon=True,
                args=(f"{queue.worker_prefix}-{i}",),
            )
            for i in range(concurrency)
        ]
        self.wake = threading.Event()

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self, timeout: float = 30) -> None:
        self.stop_event.set()
        self.wake.set()
        for t in self.threads:
            t.join(timeout)

    def _loop(self, worker: str) -> None:
        while not self.stop_event.is_set():
            job = self.queue.claim(worker)
            if job is None:
                self.wake.wait(self.poll)
                self.wake.clear()
                continue
            log.info(
                "job %d: %s on run %s (attempt %d)", job.id, job.pipeline, job.run_id, job.attempts
            )
            try:
                notes = self.execute(job)
            except Exception as exc:  # noqa: BLE001 - the one place a job error becomes a record
                log.debug("job %d traceback:\n%s", job.id, traceback.format_exc())
                self.queue.failed(job, exc)
            else:
                self.queue.done(job, notes)
