"""Jobs: claims with leases, attempts, outcomes with their deliveries; jobs run by an external engine."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from dicom_node.db.core import Core
from dicom_node.db.records import (
    SENDER,
    Delivered,
    DeliveryState,
    DispatchJob,
    Job,
    JobState,
    ResultFile,
    RunState,
    lost_reason,
    now,
)
from dicom_node.sopclasses import KEY_OBJECT_SELECTION

# The order due jobs are taken in: a live run's before an older run's; then the
# sender (the run's calling AE or STOW-RS source, or whom a forwarder named,
# ``records.SENDER``) served longest ago, one never
# served first; then the oldest. One suite's burst of runs, or an Orthanc forwarding
# a day's studies, takes one job in turn with each other sender, instead of holding
# up their runs until it is done.
_TURN_ORDER = "j.priority, COALESCE(s.turn, 0), j.id"
_RUN_SENDER = SENDER.format("r")


def _served(con: sqlite3.Connection, sender: str) -> None:
    """``sender``'s job was taken: its turn comes after every other sender's."""
    con.execute(
        "INSERT INTO sender_turns (calling_aet, turn) "
        "SELECT ?, COALESCE(MAX(turn), 0) + 1 FROM sender_turns WHERE true "
        "ON CONFLICT (calling_aet) DO UPDATE SET turn = excluded.turn",
        (sender,),
    )


@dataclass(frozen=True)
class Cancelled:
    """What an operator's cancel of a run stopped."""

    run_id: str
    settled: bool  # it was receiving or to be routed: now unrouted, with the reason
    jobs: tuple[int, ...]  # queued or running: now failed, with the reason
    workflows: tuple[tuple[int, int], ...]  # (job, generation) of those Temporal ran
    deliveries: int  # results not yet delivered: now failed, with the reason


class Jobs(Core):
    """Jobs: the job state machine, for the embedded and the Temporal engine."""

    def claim_job(self, worker: str, lease_s: float, max_attempts: int) -> Job | None:
        """Take a due job (or one whose lease expired) and count an attempt: a live
        run's before an older run's (``priority``); then the oldest job of the
        sender whose turn it is (``_TURN_ORDER``).

        A job whose lease expired after its last allowed attempt fails here
        instead of being run again: whatever killed its worker would again.
        """
        t = now()
        with self._tx() as con:
            while True:
                row = con.execute(
                    f"SELECT j.*, COALESCE({_RUN_SENDER}, '') AS sender FROM jobs j "
                    "LEFT JOIN runs r ON r.run_id = j.run_id "
                    f"LEFT JOIN sender_turns s ON s.calling_aet = {_RUN_SENDER} "
                    "WHERE (j.state=? AND j.not_before <= ?) OR (j.state=? AND j.lease_until < ?) "
                    f"ORDER BY {_TURN_ORDER} LIMIT 1",
                    (JobState.QUEUED, t, JobState.RUNNING, t),
                ).fetchone()
                if row is None:
                    return None
                if row["state"] == JobState.RUNNING and row["attempts"] >= max_attempts:
                    self._fail(con, row["id"], lost_reason(row["attempts"], row["error"]), t)
                    continue
                con.execute(
                    "UPDATE jobs SET state=?, lease_until=?, worker=?, attempts=attempts+1, "
                    "updated_at=? WHERE id=?",
                    (JobState.RUNNING, t + lease_s, worker, t, row["id"]),
                )
                _served(con, row["sender"])
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
                    self._fail(con, r["id"], lost_reason(r["attempts"], r["error"]), t)
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
                    self._queue_delivery(con, job.id, job.resend, dest, res, t)
            return True

    def _queue_delivery(
        self,
        con: sqlite3.Connection,
        job_id: int,
        resend: bool,
        dest: str,
        res: ResultFile,
        t: float,
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
                    job_id,
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
        elif resend or row["state"] == DeliveryState.FAILED:
            con.execute(
                "UPDATE outbox SET job_id=?, path=?, state=?, attempts=0, not_before=?, "
                "error=NULL WHERE id=?",
                (job_id, str(res.path), DeliveryState.PENDING, t, row["id"]),
            )
        elif row["state"] == DeliveryState.PENDING:
            # same UID, same content: deliver the newest copy of the file
            con.execute(
                "UPDATE outbox SET job_id=?, path=? WHERE id=?", (job_id, str(res.path), row["id"])
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
        """failed -> queued, attempts counted afresh (an operator's retry); False otherwise
        (also when its run's files were deleted: purged)."""
        t = now()
        with self._tx() as con:
            cur = con.execute(
                "UPDATE jobs SET state=?, attempts=0, not_before=?, lease_until=NULL, worker=NULL, "
                "error=?, updated_at=?, generation=generation+1, dispatched_at=NULL "
                "WHERE id=? AND state=? AND run_id NOT IN "
                "(SELECT run_id FROM runs WHERE purged_at IS NOT NULL)",
                (JobState.QUEUED, t, "retried by an operator", t, job_id, JobState.FAILED),
            )
            return cur.rowcount == 1

    # -- jobs run by an external engine (Temporal) ------------------------------
    def jobs_to_dispatch(self, limit: int) -> list[DispatchJob]:
        """Queued jobs whose workflow has not been started, in the order the embedded
        engine would take them: a live run's before an older run's, and the senders
        in turn (each one's oldest first)."""
        rows = self.query(
            "SELECT id, run_id, pipeline, generation, priority, sender FROM ("
            f"SELECT j.*, COALESCE({_RUN_SENDER}, '') AS sender, s.turn, ROW_NUMBER() OVER ("
            f"PARTITION BY j.priority, {_RUN_SENDER} ORDER BY j.id) AS nth FROM jobs j "
            "LEFT JOIN runs r ON r.run_id = j.run_id "
            f"LEFT JOIN sender_turns s ON s.calling_aet = {_RUN_SENDER} "
            "WHERE j.state=? AND j.dispatched_at IS NULL AND j.not_before <= ?) "
            "ORDER BY priority, nth, COALESCE(turn, 0), id LIMIT ?",
            (JobState.QUEUED, now(), limit),
        )
        return [
            DispatchJob(
                r["id"], r["run_id"], r["pipeline"], r["generation"], r["priority"], r["sender"]
            )
            for r in rows
        ]

    def mark_dispatched(self, job_id: int, generation: int) -> bool:
        """Its workflow exists (started now, or by a process that died before this);
        its sender was served."""
        with self._tx() as con:
            cur = con.execute(
                "UPDATE jobs SET dispatched_at=?, updated_at=? WHERE id=? AND generation=? "
                "AND dispatched_at IS NULL AND state IN (?,?)",
                (now(), now(), job_id, generation, JobState.QUEUED, JobState.RUNNING),
            )
            if cur.rowcount != 1:
                return False
            (sender,) = con.execute(
                f"SELECT COALESCE({_RUN_SENDER}, '') FROM jobs j "
                "LEFT JOIN runs r ON r.run_id = j.run_id WHERE j.id=?",
                (job_id,),
            ).fetchone()
            _served(con, sender)
            return True

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
        return self.dispatched_job_run(job_id, generation) is not None

    def dispatched_job_run(self, job_id: int, generation: int) -> str | None:
        """The run of this workflow's job while its results are expected, else None."""
        rows = self.query(
            "SELECT run_id FROM jobs WHERE id=? AND generation=? AND state IN (?,?)",
            (job_id, generation, JobState.QUEUED, JobState.RUNNING),
        )
        return str(rows[0]["run_id"]) if rows else None

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
                    self._queue_delivery(con, job.id, job.resend, dest, res, t)
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

    def cancel_run(self, run_id: str, reason: str) -> Cancelled | str:
        """An operator's cancel, in one transaction: a run still receiving or to be routed
        is settled unrouted, its queued and running jobs fail, and its results not yet
        delivered are not delivered, each with ``reason``; or why there is nothing to
        cancel. A running job's generation moves on, so that neither its worker nor its
        Temporal workflow can record an outcome; an operator's retry queues it again."""
        t = now()
        with self._tx() as con:
            row = con.execute("SELECT state FROM runs WHERE run_id=?", (run_id,)).fetchone()
            if row is None:
                return "no such run"
            settled = row["state"] in (RunState.RECEIVING, RunState.COMPLETE)
            if settled:
                con.execute(
                    "UPDATE runs SET state=?, reason=?, resend=0, "
                    "completed_at=COALESCE(completed_at, ?) WHERE run_id=?",
                    (RunState.UNROUTED, reason, t, run_id),
                )
            jobs = con.execute(
                "SELECT id, generation, dispatched_at FROM jobs WHERE run_id=? AND state IN (?,?)",
                (run_id, JobState.QUEUED, JobState.RUNNING),
            ).fetchall()
            con.execute(
                "UPDATE jobs SET state=?, error=?, lease_until=NULL, dispatched_at=NULL, "
                "generation=generation+1, updated_at=? WHERE run_id=? AND state IN (?,?)",
                (JobState.FAILED, reason, t, run_id, JobState.QUEUED, JobState.RUNNING),
            )
            deliveries = con.execute(
                "UPDATE outbox SET state=?, error=? WHERE state=? "
                "AND job_id IN (SELECT id FROM jobs WHERE run_id=?)",
                (DeliveryState.FAILED, reason, DeliveryState.PENDING, run_id),
            ).rowcount
        if not (settled or jobs or deliveries):
            return (
                f"nothing to cancel: the run is {row['state']}, none of its jobs is queued or "
                "running and none of its results waits for delivery"
            )
        return Cancelled(
            run_id,
            settled,
            tuple(int(j["id"]) for j in jobs),
            tuple((int(j["id"]), int(j["generation"])) for j in jobs if j["dispatched_at"]),
            deliveries,
        )

    def runs_holding(self, instances: Collection[str]) -> dict[str, frozenset[str]]:
        """The runs that hold any of ``instances`` (SOP Instance UIDs), each with who
        sent it: its calling AE and its sender (``records.SENDER``)."""
        uids = sorted(instances)
        runs: dict[str, frozenset[str]] = {}
        for k in range(0, len(uids), 500):
            chunk = uids[k : k + 500]
            rows = self.query(
                f"SELECT DISTINCT r.run_id, r.calling_aet, {_RUN_SENDER} AS sender "
                "FROM instances i JOIN runs r ON r.run_id = i.run_id "
                f"WHERE i.sop_instance_uid IN ({','.join('?' * len(chunk))})",
                tuple(chunk),
            )
            runs |= {r["run_id"]: frozenset((r["calling_aet"], r["sender"])) for r in rows}
        return runs

    def delivered_results(self, run_id: str) -> dict[str, list[Delivered]]:
        """The run's results delivered, by destination, leaving out the node's own
        rejection notes (``dicom_node.rejection``)."""
        rows = self.query(
            "SELECT o.job_id, o.destination, o.sop_class_uid, o.sop_instance_uid, o.series_uid "
            "FROM outbox o JOIN jobs j ON j.id = o.job_id WHERE j.run_id=? AND o.state=? "
            "AND o.sop_class_uid != ? ORDER BY o.id",
            (run_id, DeliveryState.SENT, KEY_OBJECT_SELECTION),
        )
        out: dict[str, list[Delivered]] = {}
        for r in rows:
            out.setdefault(r["destination"], []).append(
                Delivered(r["job_id"], r["sop_class_uid"], r["sop_instance_uid"], r["series_uid"])
            )
        return out

    def results_listed(
        self, instances: Collection[str], destinations: Collection[str]
    ) -> list[Any]:
        """The node's results among ``instances`` delivered to any of ``destinations``:
        rows of (sop_instance_uid, job_id, pipeline, destination)."""
        uids, names = sorted(instances), sorted(destinations)
        rows: list[Any] = []
        for k in range(0, len(uids), 500):
            chunk = uids[k : k + 500]
            rows += self.query(
                "SELECT o.sop_instance_uid, o.job_id, j.pipeline, o.destination FROM outbox o "
                "JOIN jobs j ON j.id = o.job_id WHERE o.state=? "
                f"AND o.destination IN ({','.join('?' * len(names))}) "
                f"AND o.sop_instance_uid IN ({','.join('?' * len(chunk))}) ORDER BY o.id",
                (DeliveryState.SENT, *names, *chunk),
            )
        return rows

    def record_result_rejections(
        self, note_uid: str, code: str, meaning: str, rows: Sequence[Any]
    ) -> int:
        """Keep the rejection of the node's results ``rows`` (``results_listed``) by the
        note ``note_uid``; once each (a note applied again records nothing new)."""
        with self._tx() as con:
            return sum(
                con.execute(
                    "INSERT OR IGNORE INTO result_rejections (sop_instance_uid, note_uid, "
                    "job_id, pipeline, destination, code, meaning, at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        r["sop_instance_uid"],
                        note_uid,
                        r["job_id"],
                        r["pipeline"],
                        r["destination"],
                        code,
                        meaning,
                        now(),
                    ),
                ).rowcount
                for r in rows
            )

    def queue_note(self, job_id: int, destination: str, note: ResultFile) -> None:
        """Deliver the node's rejection note of job ``job_id``'s results, once a
        destination and UID: queued again (the note applied again after a crash, the
        cancel of the run's deliveries having failed it), a failed one is queued anew,
        a sent one stays sent."""
        with self._tx() as con:
            self._queue_delivery(con, job_id, False, destination, note, now())

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
