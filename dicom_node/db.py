"""The node's index and the one owner of its state machines (SQLite, WAL).

Nobody else writes SQL. Run, job and delivery states are enums; every
transition is a method that checks the state it leaves, and a state change
commits together with its consequences (a run routed and its jobs created; a
job done and its deliveries queued)::

    run       receiving -> complete -> routed | unrouted | unroutable
              (a new instance re-opens a run; reprocess: any settled state -> complete)
    job       queued -> running -> done | failed, running -> queued (retry, lost lease),
              failed -> queued (an operator's retry)
              with Temporal: queued (dispatched_at set: its workflow started) -> running
              (a worker took an attempt) -> done | failed; the workflow's generation must
              match, so a superseded workflow cannot record (``*_dispatched_job``)
    delivery  pending -> sent | failed, failed -> pending (resend)

One connection per thread; writes use ``BEGIN IMMEDIATE`` so two workers never
take the same job or delivery.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 2

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    sop_class_uid    TEXT NOT NULL,
    series_uid       TEXT NOT NULL,
    study_uid        TEXT NOT NULL,
    run_id           TEXT NOT NULL,
    path             TEXT NOT NULL,
    size             INTEGER NOT NULL,
    transfer_syntax  TEXT NOT NULL,
    frames           INTEGER NOT NULL,
    calling_aet      TEXT NOT NULL,
    received_at      REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_run ON instances(run_id);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_uid);
CREATE INDEX IF NOT EXISTS instances_study ON instances(study_uid);

-- A run is one multi-frame 2D instance, or one multi-instance series.
CREATE TABLE IF NOT EXISTS runs (
    run_id       TEXT PRIMARY KEY,
    series_uid   TEXT NOT NULL,
    study_uid    TEXT NOT NULL,
    calling_aet  TEXT NOT NULL,
    state        TEXT NOT NULL,
    first_at     REAL NOT NULL,
    last_at      REAL NOT NULL,
    completed_at REAL,
    rule         TEXT,
    reason       TEXT,
    resend       INTEGER NOT NULL DEFAULT 0  -- the next routing sends results again
);
CREATE INDEX IF NOT EXISTS runs_state ON runs(state, last_at);

CREATE TABLE IF NOT EXISTS jobs (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id       TEXT NOT NULL,
    pipeline     TEXT NOT NULL,
    destinations TEXT NOT NULL,          -- JSON list of destination names
    resend       INTEGER NOT NULL DEFAULT 0,
    state        TEXT NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    not_before   REAL NOT NULL,
    lease_until  REAL,
    worker       TEXT,
    error        TEXT,
    notes        TEXT,
    created_at   REAL NOT NULL,
    updated_at   REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, not_before);
CREATE INDEX IF NOT EXISTS jobs_run ON jobs(run_id);

CREATE TABLE IF NOT EXISTS outbox (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id           INTEGER NOT NULL,
    destination      TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    sop_class_uid    TEXT NOT NULL,
    series_uid       TEXT NOT NULL,
    path             TEXT NOT NULL,
    state            TEXT NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    not_before       REAL NOT NULL,
    error            TEXT,
    created_at       REAL NOT NULL,
    sent_at          REAL,
    UNIQUE (destination, sop_instance_uid)
);
CREATE INDEX IF NOT EXISTS outbox_state ON outbox(state, not_before);

-- index_id: this index's identity, part of every Temporal workflow ID it starts
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

# Columns added after the first release (schema 1 had none of them).
_MIGRATIONS = {
    "runs": [("resend", "INTEGER NOT NULL DEFAULT 0")],
    "jobs": [
        ("resend", "INTEGER NOT NULL DEFAULT 0"),
        ("timings", "TEXT"),
        # Temporal: the n-th workflow of this job (an operator's retry starts a new one)
        ("generation", "INTEGER NOT NULL DEFAULT 0"),
        ("dispatched_at", "REAL"),  # its workflow was started (None: embedded, or not yet)
    ],
}


class RunState(StrEnum):
    RECEIVING = "receiving"
    COMPLETE = "complete"
    ROUTED = "routed"
    UNROUTED = "unrouted"  # no rule matched: stored, reported, nothing to do
    UNROUTABLE = "unroutable"  # its header could not be read for routing


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class DeliveryState(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"


SETTLED_RUN_STATES = (RunState.ROUTED, RunState.UNROUTED, RunState.UNROUTABLE)


class StateError(Exception):
    """A transition from a state it does not leave (a bug, never input)."""


@dataclass(frozen=True)
class InstanceRecord:
    sop_instance_uid: str
    sop_class_uid: str
    series_uid: str
    study_uid: str
    run_id: str
    path: Path
    size: int
    transfer_syntax: str
    frames: int
    calling_aet: str


@dataclass(frozen=True)
class Recorded:
    """What indexing one instance did to its run."""

    run_id: str
    duplicate: bool


@dataclass(frozen=True)
class Job:
    id: int
    run_id: str
    pipeline: str
    destinations: list[str]
    resend: bool
    attempts: int
    worker: str


@dataclass(frozen=True)
class DispatchJob:
    """A queued job to hand to an external engine (one Temporal workflow per generation)."""

    id: int
    run_id: str
    pipeline: str
    generation: int


@dataclass(frozen=True)
class ResultFile:
    """One object a job wrote, to be delivered."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    series_uid: str
    description: str


@dataclass(frozen=True)
class Delivery:
    id: int
    destination: str
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    attempts: int


def now() -> float:
    return time.time()


class Database:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        con = self.connect()
        con.execute("PRAGMA journal_mode=WAL")
        con.executescript(SCHEMA)  # idempotent
        with self._tx() as con:
            for table, columns in _MIGRATIONS.items():
                have = {r["name"] for r in con.execute(f"PRAGMA table_info({table})")}
                for name, decl in columns:
                    if name not in have:
                        con.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")
            if con.execute("PRAGMA user_version").fetchone()[0] < 2:
                # schema 1 marked a resend as a destination name suffix, "name!resend"
                for row in con.execute("SELECT id, destinations FROM jobs").fetchall():
                    names = json.loads(row["destinations"])
                    if any(n.endswith("!resend") for n in names):
                        plain = [n.removesuffix("!resend") for n in names]
                        con.execute(
                            "UPDATE jobs SET destinations=?, resend=1 WHERE id=?",
                            (json.dumps(plain), row["id"]),
                        )
            con.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('index_id', ?)",
                (uuid.uuid4().hex[:12],),
            )
            con.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    # -- connection ---------------------------------------------------------
    def connect(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(
                self.path, timeout=60, isolation_level=None, check_same_thread=True
            )
            con.row_factory = sqlite3.Row
            con.execute("PRAGMA synchronous=FULL")  # the index is as durable as the files
            con.execute("PRAGMA busy_timeout=60000")
            self._local.con = con
        return con

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        con = self.connect()
        con.execute("BEGIN IMMEDIATE")
        try:
            yield con
        except BaseException:
            con.execute("ROLLBACK")
            raise
        else:
            con.execute("COMMIT")

    def query(self, sql: str, params: tuple | dict = ()) -> list[sqlite3.Row]:  # type: ignore[type-arg]
        """Read-only SQL for reports and tests; writes go through the methods below."""
        if not sql.lstrip().upper().startswith(("SELECT", "WITH")):
            raise StateError("Database.query is read-only")
        return self.connect().execute(sql, params).fetchall()

    def index_id(self) -> str:
        """A random identity made with the index: workflow IDs of two indexes never meet."""
        return str(self.query("SELECT value FROM meta WHERE key='index_id'")[0]["value"])

    def close(self) -> None:
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
            self._local.con = None

    # -- instances and runs ---------------------------------------------------
    def record_instance(self, inst: InstanceRecord) -> Recorded:
        """Index a stored instance; a new instance (re-)opens its run for receiving."""
        t = now()
        with self._tx() as con:
            dup = (
                con.execute(
                    "SELECT 1 FROM instances WHERE sop_instance_uid=?", (inst.sop_instance_uid,)
                ).fetchone()
                is not None
            )
            con.execute(
                "INSERT OR REPLACE INTO instances VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    inst.sop_instance_uid,
                    inst.sop_class_uid,
                    inst.series_uid,
                    inst.study_uid,
                    inst.run_id,
                    str(inst.path),
                    inst.size,
                    inst.transfer_syntax,
                    inst.frames,
                    inst.calling_aet,
                    t,
                ),
            )
            row = con.execute("SELECT state FROM runs WHERE run_id=?", (inst.run_id,)).fetchone()
            if row is None:
                con.execute(
                    "INSERT INTO runs (run_id, series_uid, study_uid, calling_aet, state, first_at,"
                    " last_at) VALUES (?,?,?,?,?,?,?)",
                    (
                        inst.run_id,
                        inst.series_uid,
                        inst.study_uid,
                        inst.calling_aet,
                        RunState.RECEIVING,
                        t,
                        t,
                    ),
                )
            elif dup:
                con.execute("UPDATE runs SET last_at=? WHERE run_id=?", (t, inst.run_id))
            else:
                # a new instance re-opens a run that was already complete
                con.execute(
                    "UPDATE runs SET last_at=?, state=?, reason=NULL WHERE run_id=?",
                    (t, RunState.RECEIVING, inst.run_id),
                )
        return Recorded(inst.run_id, dup)

    def indexed_paths(self) -> set[str]:
        return {r["path"] for r in self.query("SELECT path FROM instances")}

    def run_instances(self, run_id: str) -> list[InstanceRecord]:
        rows = self.query("SELECT * FROM instances WHERE run_id=? ORDER BY received_at", (run_id,))
        return [_instance(r) for r in rows]

    def series_instances(self, study_uid: str, series_uid: str) -> list[InstanceRecord]:
        """The stored instances of a series (WADO-RS), in the order they arrived."""
        rows = self.query(
            "SELECT * FROM instances WHERE study_uid=? AND series_uid=? ORDER BY received_at",
            (study_uid, series_uid),
        )
        return [_instance(r) for r in rows]

    def result_path(self, sop_instance_uid: str) -> Path | None:
        """The file of a result queued for delivery (the newest job's copy)."""
        rows = self.query(
            "SELECT path FROM outbox WHERE sop_instance_uid=? ORDER BY job_id DESC LIMIT 1",
            (sop_instance_uid,),
        )
        return Path(rows[0]["path"]) if rows else None

    def complete_run(self, run_id: str, reason: str) -> bool:
        """receiving -> complete; False when it was not receiving (once only)."""
        with self._tx() as con:
            cur = con.execute(
                "UPDATE runs SET state=?, completed_at=?, reason=? WHERE run_id=? AND state=?",
                (RunState.COMPLETE, now(), reason, run_id, RunState.RECEIVING),
            )
            return cur.rowcount == 1

    def quiet_runs(self, quiet_since: float) -> list[str]:
        """Receiving runs with no new instance since ``quiet_since``."""
        rows = self.query(
            "SELECT run_id FROM runs WHERE state=? AND last_at <= ?",
            (RunState.RECEIVING, quiet_since),
        )
        return [r["run_id"] for r in rows]

    def runs_to_route(self) -> list[str]:
        rows = self.query(
            "SELECT run_id FROM runs WHERE state=? ORDER BY completed_at", (RunState.COMPLETE,)
        )
        return [r["run_id"] for r in rows]

    def run_state(self, run_id: str) -> RunState | None:
        rows = self.query("SELECT state FROM runs WHERE run_id=?", (run_id,))
        return RunState(rows[0]["state"]) if rows else None

    def route_run(
        self, run_id: str, rule: str, pipelines: Sequence[str], destinations: Sequence[str]
    ) -> list[int]:
        """complete -> routed, and its jobs created, in one transaction.

        Returns the new job ids; none when the run was not complete (routed by
        someone else, or re-opened by a new instance meanwhile)."""
        t = now()
        with self._tx() as con:
            row = con.execute("SELECT state, resend FROM runs WHERE run_id=?", (run_id,)).fetchone()
            if row is None or row["state"] != RunState.COMPLETE:
                return []
            con.execute(
                "UPDATE runs SET state=?, rule=?, resend=0 WHERE run_id=?",
                (RunState.ROUTED, rule, run_id),
            )
            ids = []
            for name in pipelines:
                cur = con.execute(
                    "INSERT INTO jobs (run_id, pipeline, destinations, resend, state, not_before,"
                    " created_at, updated_at) VALUES (?,?,?,?,?,?,?,?)",
                    (
                        run_id,
                        name,
                        json.dumps(list(destinations)),
                        row["resend"],
                        JobState.QUEUED,
                        t,
                        t,
                        t,
                    ),
                )
                ids.append(int(cur.lastrowid or 0))
            return ids

    def settle_unrouted(self, run_id: str, state: RunState, rule: str | None, reason: str) -> bool:
        """complete -> unrouted (no rule, or a rule without pipelines) or unroutable."""
        if state not in (RunState.UNROUTED, RunState.UNROUTABLE):
            raise StateError(f"{state} is not an unrouted state")
        with self._tx() as con:
            cur = con.execute(
                "UPDATE runs SET state=?, rule=?, reason=?, resend=0 WHERE run_id=? AND state=?",
                (state, rule, reason, run_id, RunState.COMPLETE),
            )
            return cur.rowcount == 1

    def reopen_for_reprocess(self, run_id: str) -> bool:
        """A settled run -> complete again, its results to be sent again."""
        with self._tx() as con:
            cur = con.execute(
                "UPDATE runs SET state=?, reason='reprocess', resend=1, completed_at=? "
                f"WHERE run_id=? AND state IN ({','.join('?' * len(SETTLED_RUN_STATES))})",
                (RunState.COMPLETE, now(), run_id, *SETTLED_RUN_STATES),
            )
            return cur.rowcount == 1

    def runs_for(
        self,
        *,
        run_id: str | None = None,
        series_uid: str | None = None,
        study_uid: str | None = None,
        sop_instance_uid: str | None = None,
    ) -> list[str]:
        """Run ids selected by any DICOM level (for triggers and reprocessing)."""
        if run_id:
            rows = self.query("SELECT run_id FROM runs WHERE run_id=?", (run_id,))
        elif sop_instance_uid:
            rows = self.query(
                "SELECT DISTINCT run_id FROM instances WHERE sop_instance_uid=?",
                (sop_instance_uid,),
            )
        elif series_uid:
            rows = self.query("SELECT run_id FROM runs WHERE series_uid=?", (series_uid,))
        elif study_uid:
            rows = self.query("SELECT run_id FROM runs WHERE study_uid=?", (study_uid,))
        else:
            return []
        return [r["run_id"] for r in rows]

    # -- jobs ---------------------------------------------------------------
    def claim_job(self, worker: str, lease_s: float, max_attempts: int) -> Job | None:
        """Take the oldest due job (or one whose lease expired) and count an attempt.

        A job whose lease expired after its last allowed attempt fails here
        instead of being run again: whatever killed its worker would again.
        """
        t = now()
        with self._tx() as con:
            while True:
                row = con.execute(
                    "SELECT * FROM jobs WHERE (state=? AND not_before <= ?) "
                    "OR (state=? AND lease_until < ?) ORDER BY id LIMIT 1",
                    (JobState.QUEUED, t, JobState.RUNNING, t),
                ).fetchone()
                if row is None:
                    return None
                if row["state"] == JobState.RUNNING and row["attempts"] >= max_attempts:
                    self._fail(con, row["id"], _lost_reason(row["attempts"], row["error"]), t)
                    continue
                con.execute(
                    "UPDATE jobs SET state=?, lease_until=?, worker=?, attempts=attempts+1, "
                    "updated_at=? WHERE id=?",
                    (JobState.RUNNING, t + lease_s, worker, t, row["id"]),
                )
                return Job(
                    row["id"],
                    row["run_id"],
                    row["pipeline"],
                    json.loads(row["destinations"]),
                    bool(row["resend"]),
                    row["attempts"] + 1,
                    worker,
                )

    def renew_lease(self, job: Job, lease_s: float) -> bool:
        with self._tx() as con:
            cur = con.execute(
                "UPDATE jobs SET lease_until=? WHERE id=? AND state=? AND worker=?",
                (now() + lease_s, job.id, JobState.RUNNING, job.worker),
            )
            return cur.rowcount == 1

    def recover_jobs(self, current_worker_prefix: str, max_attempts: int) -> tuple[int, int]:
        """At start: jobs a previous process left running go back to the queue, or
        fail when they already had every attempt. Returns (re-queued, failed)."""
        t = now()
        requeued = failed = 0
        with self._tx() as con:
            rows = con.execute(
                "SELECT id, attempts, error FROM jobs WHERE state=? AND dispatched_at IS NULL "
                "AND (worker IS NULL OR worker NOT LIKE ?)",
                (JobState.RUNNING, f"{current_worker_prefix}%"),
            ).fetchall()
            for r in rows:
                if r["attempts"] >= max_attempts:
                    self._fail(con, r["id"], _lost_reason(r["attempts"], r["error"]), t)
                    failed += 1
                else:
                    con.execute(
                        "UPDATE jobs SET state=?, lease_until=NULL, worker=NULL, not_before=?, "
                        "error=?, updated_at=? WHERE id=?",
                        (
                            JobState.QUEUED,
                            t,
                            "the node stopped while this job was running",
                            t,
                            r["id"],
                        ),
                    )
                    requeued += 1
        return requeued, failed

    def finish_job(self, job: Job, results: Sequence[ResultFile], notes: Sequence[str]) -> bool:
        """running -> done, and a delivery per result and destination, in one transaction.

        False when the job is no longer this worker's (its lease expired and
        another worker took it): nothing is recorded then.
        """
        t = now()
        with self._tx() as con:
            cur = con.execute(
                "UPDATE jobs SET state=?, lease_until=NULL, error=NULL, notes=?, updated_at=? "
                "WHERE id=? AND state=? AND worker=?",
                (JobState.DONE, json.dumps(list(notes)), t, job.id, JobState.RUNNING, job.worker),
            )
            if cur.rowcount != 1:
                return False
            for res in results:
                for dest in job.destinations:
                    self._queue_delivery(con, job, dest, res, t)
            return True

    def _queue_delivery(
        self, con: sqlite3.Connection, job: Job, dest: str, res: ResultFile, t: float
    ) -> None:
        row = con.execute(
            "SELECT id, state FROM outbox WHERE destination=? AND sop_instance_uid=?",
            (dest, res.sop_instance_uid),
        ).fetchone()
        if row is None:
            con.execute(
                "INSERT INTO outbox (job_id, destination, sop_instance_uid, sop_class_uid,"
                " series_uid, path, state, not_before, created_at) VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    job.id,
                    dest,
                    res.sop_instance_uid,
                    res.sop_class_uid,
                    res.series_uid,
                    str(res.path),
                    DeliveryState.PENDING,
                    t,
                    t,
                ),
            )
        elif job.resend or row["state"] == DeliveryState.FAILED:
            con.execute(
                "UPDATE outbox SET job_id=?, path=?, state=?, attempts=0, not_before=?, "
                "error=NULL WHERE id=?",
                (job.id, str(res.path), DeliveryState.PENDING, t, row["id"]),
            )
        elif row["state"] == DeliveryState.PENDING:
            # same UID, same content: deliver the newest copy of the file
            con.execute(
                "UPDATE outbox SET job_id=?, path=? WHERE id=?", (job.id, str(res.path), row["id"])
            )

    def retry_job(self, job: Job, reason: str, delay_s: float) -> bool:
        t = now()
        with self._tx() as con:
            cur = con.execute(
                "UPDATE jobs SET state=?, lease_until=NULL, error=?, not_before=?, updated_at=? "
                "WHERE id=? AND state=? AND worker=?",
                (JobState.QUEUED, reason, t + delay_s, t, job.id, JobState.RUNNING, job.worker),
            )
            return cur.rowcount == 1

    def fail_job(self, job: Job, reason: str) -> bool:
        with self._tx() as con:
            cur = con.execute(
                "UPDATE jobs SET state=?, lease_until=NULL, error=?, updated_at=? "
                "WHERE id=? AND state=? AND worker=?",
                (JobState.FAILED, reason, now(), job.id, JobState.RUNNING, job.worker),
            )
            return cur.rowcount == 1

    def release_job(self, job: Job) -> bool:
        """running -> queued without counting the attempt (the node is stopping)."""
        t = now()
        with self._tx() as con:
            cur = con.execute(
                "UPDATE jobs SET state=?, lease_until=NULL, worker=NULL, attempts=attempts-1, "
                "not_before=?, updated_at=? WHERE id=? AND state=? AND worker=?",
                (JobState.QUEUED, t, t, job.id, JobState.RUNNING, job.worker),
            )
            return cur.rowcount == 1

    @staticmethod
    def _fail(con: sqlite3.Connection, job_id: int, reason: str, t: float) -> None:
        con.execute(
            "UPDATE jobs SET state=?, lease_until=NULL, error=?, updated_at=? WHERE id=?",
            (JobState.FAILED, reason, t, job_id),
        )

    def retry_failed_job(self, job_id: int) -> bool:
        """failed -> queued, attempts counted afresh (an operator's retry); False otherwise."""
        t = now()
        with self._tx() as con:
            cur = con.execute(
                "UPDATE jobs SET state=?, attempts=0, not_before=?, lease_until=NULL, worker=NULL, "
                "error=?, updated_at=?, generation=generation+1, dispatched_at=NULL "
                "WHERE id=? AND state=?",
                (JobState.QUEUED, t, "retried by an operator", t, job_id, JobState.FAILED),
            )
            return cur.rowcount == 1

    # -- jobs run by an external engine (Temporal) ------------------------------
    def jobs_to_dispatch(self, limit: int) -> list[DispatchJob]:
        """Queued jobs whose workflow has not been started, oldest first."""
        rows = self.query(
            "SELECT id, run_id, pipeline, generation FROM jobs WHERE state=? AND "
            "dispatched_at IS NULL AND not_before <= ? ORDER BY id LIMIT ?",
            (JobState.QUEUED, now(), limit),
        )
        return [DispatchJob(r["id"], r["run_id"], r["pipeline"], r["generation"]) for r in rows]

    def mark_dispatched(self, job_id: int, generation: int) -> bool:
        """Its workflow exists (started now, or by a process that died before this)."""
        with self._tx() as con:
            cur = con.execute(
                "UPDATE jobs SET dispatched_at=?, updated_at=? WHERE id=? AND generation=? "
                "AND dispatched_at IS NULL AND state IN (?,?)",
                (now(), now(), job_id, generation, JobState.QUEUED, JobState.RUNNING),
            )
            return cur.rowcount == 1

    def dispatched_job_started(
        self, job_id: int, generation: int, attempt: int, worker: str
    ) -> bool:
        """queued | running -> running: a worker took attempt ``attempt`` of this workflow."""
        t = now()
        with self._tx() as con:
            cur = con.execute(
                "UPDATE jobs SET state=?, attempts=MAX(attempts, ?), worker=?, lease_until=NULL, "
                "dispatched_at=COALESCE(dispatched_at, ?), updated_at=? "
                "WHERE id=? AND generation=? AND state IN (?,?)",
                (JobState.RUNNING, attempt, worker, t, t, job_id, generation)
                + (JobState.QUEUED, JobState.RUNNING),
            )
            return cur.rowcount == 1

    def dispatched_job_open(self, job_id: int, generation: int) -> bool:
        """Whether results for this workflow of the job are still expected."""
        return bool(
            self.query(
                "SELECT 1 FROM jobs WHERE id=? AND generation=? AND state IN (?,?)",
                (job_id, generation, JobState.QUEUED, JobState.RUNNING),
            )
        )

    def finish_dispatched_job(
        self,
        job_id: int,
        generation: int,
        attempt: int,
        worker: str,
        results: Sequence[ResultFile],
        notes: Sequence[str],
    ) -> bool:
        """queued | running -> done with its deliveries, in one transaction. True also when
        this workflow already recorded it (a retried record); False when it was superseded."""
        t = now()
        with self._tx() as con:
            row = con.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None or row["generation"] != generation:
                return False
            if row["state"] not in (JobState.QUEUED, JobState.RUNNING):
                return bool(row["state"] == JobState.DONE)
            con.execute(
                "UPDATE jobs SET state=?, attempts=MAX(attempts, ?), worker=?, lease_until=NULL, "
                "dispatched_at=COALESCE(dispatched_at, ?), error=NULL, notes=?, updated_at=? "
                "WHERE id=?",
                (JobState.DONE, attempt, worker, t, json.dumps(list(notes)), t, job_id),
            )
            job = Job(
                job_id,
                row["run_id"],
                row["pipeline"],
                json.loads(row["destinations"]),
                bool(row["resend"]),
                max(row["attempts"], attempt),
                worker,
            )
            for res in results:
                for dest in job.destinations:
                    self._queue_delivery(con, job, dest, res, t)
            return True

    def fail_dispatched_job(self, job_id: int, generation: int, attempts: int, reason: str) -> bool:
        """queued | running -> failed; True also when this workflow already recorded it."""
        with self._tx() as con:
            row = con.execute("SELECT state, generation FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None or row["generation"] != generation:
                return False
            if row["state"] not in (JobState.QUEUED, JobState.RUNNING):
                return bool(row["state"] == JobState.FAILED)
            con.execute(
                "UPDATE jobs SET state=?, attempts=MAX(attempts, ?), lease_until=NULL, error=?, "
                "updated_at=? WHERE id=?",
                (JobState.FAILED, attempts, reason, now(), job_id),
            )
            return True

    def take_back_dispatched(self) -> int:
        """Jobs handed to Temporal and not settled come back to this node's own queue
        (the node went back to the embedded engine); their workflows can no longer record."""
        t = now()
        with self._tx() as con:
            cur = con.execute(
                "UPDATE jobs SET state=?, generation=generation+1, dispatched_at=NULL, worker=NULL,"
                " lease_until=NULL, not_before=?, updated_at=? "
                "WHERE dispatched_at IS NOT NULL AND state IN (?,?)",
                (JobState.QUEUED, t, t, JobState.QUEUED, JobState.RUNNING),
            )
            return cur.rowcount

    def record_timings(self, job_id: int, timings: dict[str, float]) -> None:
        """Seconds per stage of a job's last attempt (decode, compute, encode, write)."""
        with self._tx() as con:
            con.execute("UPDATE jobs SET timings=? WHERE id=?", (json.dumps(timings), job_id))

    def unsettled_jobs(self) -> int:
        return int(
            self.query(
                "SELECT COUNT(*) n FROM jobs WHERE state IN (?,?)",
                (JobState.QUEUED, JobState.RUNNING),
            )[0]["n"]
        )

    # -- deliveries -----------------------------------------------------------
    def due_deliveries(self, limit: int) -> list[Delivery]:
        rows = self.query(
            "SELECT * FROM outbox WHERE state=? AND not_before <= ? ORDER BY id LIMIT ?",
            (DeliveryState.PENDING, now(), limit),
        )
        return [
            Delivery(
                r["id"],
                r["destination"],
                Path(r["path"]),
                r["sop_class_uid"],
                r["sop_instance_uid"],
                r["attempts"],
            )
            for r in rows
        ]

    def delivery_sent(self, delivery: Delivery) -> None:
        with self._tx() as con:
            con.execute(
                "UPDATE outbox SET state=?, sent_at=?, attempts=attempts+1, error=NULL "
                "WHERE id=? AND state=?",
                (DeliveryState.SENT, now(), delivery.id, DeliveryState.PENDING),
            )

    def delivery_retry(self, delivery: Delivery, reason: str, delay_s: float) -> None:
        with self._tx() as con:
            con.execute(
                "UPDATE outbox SET attempts=attempts+1, error=?, not_before=? WHERE id=? AND state=?",
                (reason, now() + delay_s, delivery.id, DeliveryState.PENDING),
            )

    def delivery_failed(self, delivery: Delivery, reason: str) -> None:
        with self._tx() as con:
            con.execute(
                "UPDATE outbox SET state=?, attempts=attempts+1, error=? WHERE id=? AND state=?",
                (DeliveryState.FAILED, reason, delivery.id, DeliveryState.PENDING),
            )

    def pending_deliveries(self) -> int:
        return int(
            self.query("SELECT COUNT(*) n FROM outbox WHERE state=?", (DeliveryState.PENDING,))[0][
                "n"
            ]
        )

    # -- reports --------------------------------------------------------------
    def status_summary(self) -> dict[str, Any]:
        def counts(table: str) -> dict[str, int]:
            return {
                r["state"]: r["n"]
                for r in self.query(f"SELECT state, COUNT(*) n FROM {table} GROUP BY state")
            }

        failures = [
            dict(r)
            for r in self.query(
                "SELECT id, run_id, pipeline, error, updated_at FROM jobs WHERE state=? "
                "ORDER BY id DESC LIMIT 20",
                (JobState.FAILED,),
            )
        ]
        backlog = [
            dict(r)
            for r in self.query(
                "SELECT destination, COUNT(*) n, MAX(attempts) attempts, MAX(error) error "
                "FROM outbox WHERE state=? GROUP BY destination",
                (DeliveryState.PENDING,),
            )
        ]
        unrouted = [
            dict(r)
            for r in self.query(
                "SELECT run_id, series_uid, state, reason FROM runs WHERE state IN (?,?) "
                "ORDER BY last_at DESC LIMIT 20",
                (RunState.UNROUTED, RunState.UNROUTABLE),
            )
        ]
        return {
            "instances": self.query("SELECT COUNT(*) n FROM instances")[0]["n"],
            "runs": counts("runs"),
            "jobs": counts("jobs"),
            "outbox": counts("outbox"),
            "failed_jobs": failures,
            "outbox_backlog": backlog,
            "unrouted_runs": unrouted,
        }

    def metrics_snapshot(self) -> dict[str, Any]:
        """Counts for the Prometheus gauges: runs by state, jobs by pipeline and state,
        jobs due now, deliveries by destination and state."""
        t = now()
        return {
            "runs": {
                r["state"]: r["n"]
                for r in self.query("SELECT state, COUNT(*) n FROM runs GROUP BY state")
            },
            "jobs": [
                (r["pipeline"], r["state"], r["n"])
                for r in self.query(
                    "SELECT pipeline, state, COUNT(*) n FROM jobs GROUP BY pipeline, state"
                )
            ],
            "queue_depth": self.query(
                "SELECT COUNT(*) n FROM jobs WHERE state=? AND not_before <= ?",
                (JobState.QUEUED, t),
            )[0]["n"],
            "outbox": [
                (r["destination"], r["state"], r["n"])
                for r in self.query(
                    "SELECT destination, state, COUNT(*) n FROM outbox GROUP BY destination, state"
                )
            ],
        }

    def recent_runs(self, since: float, limit: int = 200) -> list[dict[str, Any]]:
        """Runs with activity since ``since``, newest first, each with its jobs."""
        runs = [
            dict(r)
            for r in self.query(
                "SELECT run_id, series_uid, study_uid, calling_aet, state, first_at, last_at,"
                " rule, reason, (SELECT COUNT(*) FROM instances i WHERE i.run_id=r.run_id)"
                " AS instances FROM runs r WHERE last_at >= ? OR run_id IN"
                " (SELECT run_id FROM jobs WHERE updated_at >= ?) ORDER BY last_at DESC LIMIT ?",
                (since, since, limit),
            )
        ]
        by_run: dict[str, list[dict[str, Any]]] = {r["run_id"]: [] for r in runs}
        if runs:
            marks = ",".join("?" * len(runs))
            for j in self.query(
                "SELECT id, run_id, pipeline, state, attempts, error, timings, created_at,"
                f" updated_at FROM jobs WHERE run_id IN ({marks}) ORDER BY id",
                tuple(by_run),
            ):
                job = dict(j)
                job["timings"] = json.loads(job["timings"]) if job["timings"] else {}
                by_run[job["run_id"]].append(job)
        for r in runs:
            r["jobs"] = by_run[r["run_id"]]
        return runs

    def outbox_by_destination(self) -> list[dict[str, Any]]:
        """Per destination: deliveries by state, the oldest pending and the last error."""
        rows = self.query(
            "SELECT destination, SUM(state='pending') pending, SUM(state='sent') sent,"
            " SUM(state='failed') failed, MIN(CASE WHEN state='pending' THEN created_at END)"
            " oldest_pending, MAX(sent_at) last_sent,"
            " (SELECT error FROM outbox o2 WHERE o2.destination=o.destination AND"
            " o2.error IS NOT NULL ORDER BY o2.id DESC LIMIT 1) last_error"
            " FROM outbox o GROUP BY destination ORDER BY destination"
        )
        return [dict(r) for r in rows]

    def jobs_for(
        self,
        *,
        study_uid: str | None = None,
        series_uid: str | None = None,
        sop_instance_uid: str | None = None,
    ) -> list[dict[str, Any]]:
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
        rows = self.query(
            "SELECT j.id, j.run_id, j.pipeline, j.state, j.attempts, j.error, j.notes,"
            " j.created_at, j.updated_at, r.series_uid, r.study_uid, r.state AS run_state,"
            " r.rule, r.reason AS run_reason,"
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

    def prior_result_paths(self, run_id: str, pipeline: str, before_job: int) -> list[str]:
        """Result files that earlier jobs of ``pipeline`` on this run queued for delivery,
        newest job first: a new result whose content changed names what it supersedes."""
        rows = self.query(
            "SELECT o.path, MAX(o.job_id) AS job FROM outbox o JOIN jobs j ON j.id = o.job_id"
            " WHERE j.run_id=? AND j.pipeline=? AND j.id<? GROUP BY o.path ORDER BY job DESC",
            (run_id, pipeline, before_job),
        )
        return [str(r["path"]) for r in rows]


def _instance(r: sqlite3.Row) -> InstanceRecord:
    return InstanceRecord(
        r["sop_instance_uid"],
        r["sop_class_uid"],
        r["series_uid"],
        r["study_uid"],
        r["run_id"],
        Path(r["path"]),
        r["size"],
        r["transfer_syntax"],
        r["frames"],
        r["calling_aet"],
    )


def _lost_reason(attempts: int, last_error: str | None) -> str:
    why = f"worker lost {attempts} time(s) while running this job (node killed or restarted)"
    return f"{why}; last error: {last_error}" if last_error else why
