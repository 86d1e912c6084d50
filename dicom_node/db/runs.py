"""Instances and runs: indexing, completion, routing (a run and its jobs in one transaction)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from pathlib import Path

from dicom_node.db.core import Core
from dicom_node.db.deliveries import AWAITING
from dicom_node.db.records import (
    SENDER,
    SETTLED_RUN_STATES,
    CommitmentState,
    DeliveryState,
    InstanceConflict,
    InstanceRecord,
    JobState,
    Recorded,
    RunState,
    StateError,
    instance_record,
    now,
)


class Runs(Core):
    """Instances and runs: the run state machine."""

    def record_instance(self, inst: InstanceRecord) -> Recorded:
        """Index a stored instance; a new instance (re-)opens its run for receiving.

        Raises InstanceConflict when its SOP Instance UID is indexed in another
        series, study or run (one UID names one instance, and its run keeps it), or
        its run's ID in another series or study (a run is never made of two studies,
        nor of a series and a multi-frame instance whose UID is the series'). Rows
        of a purged run (a purge a crash cut short leaves them) hold nothing."""
        t = now()
        with self._tx() as con:
            held, row, conflict = _holders(con, inst)
            if conflict:
                raise InstanceConflict(conflict)
            dup = held is not None
            con.execute(
                "INSERT OR REPLACE INTO instances (sop_instance_uid, sop_class_uid, series_uid,"
                " study_uid, run_id, path, size, transfer_syntax, frames, calling_aet,"
                " received_at, sender) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
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
                    inst.sender or inst.calling_aet,
                ),
            )
            if row is None:
                con.execute(
                    "INSERT INTO runs (run_id, series_uid, study_uid, calling_aet, state, first_at,"
                    " last_at, opened_at, sender) VALUES (?,?,?,?,?,?,?,?,?)",
                    (
                        inst.run_id,
                        inst.series_uid,
                        inst.study_uid,
                        inst.calling_aet,
                        RunState.RECEIVING,
                        t,
                        t,
                        t,
                        inst.sender or inst.calling_aet,
                    ),
                )
            elif dup:
                con.execute("UPDATE runs SET last_at=? WHERE run_id=?", (t, inst.run_id))
            else:
                # a new instance re-opens a run that was already complete, or purged (the
                # rows a purge cut short by a crash left behind name deleted files; a
                # purged run may come back in another series or study)
                if row["purged_at"] is not None:
                    con.execute(
                        "DELETE FROM instances WHERE run_id=? AND sop_instance_uid!=?",
                        (inst.run_id, inst.sop_instance_uid),
                    )
                con.execute(
                    "UPDATE runs SET last_at=?, state=?, reason=NULL, purged_at=NULL, "
                    "series_uid=?, study_uid=?, opened_at=CASE WHEN state=? THEN "
                    "COALESCE(opened_at, first_at) ELSE ? END WHERE run_id=?",
                    (
                        t,
                        RunState.RECEIVING,
                        inst.series_uid,
                        inst.study_uid,
                        RunState.RECEIVING,
                        t,
                        inst.run_id,
                    ),
                )
        return Recorded(inst.run_id, dup)

    def instance_conflict(self, inst: InstanceRecord) -> str | None:
        """Why :meth:`record_instance` would refuse ``inst`` now (None: it would not);
        the spool asks before it writes over a file that is there."""
        return _holders(self.connect(), inst)[2]

    def indexed_paths(self) -> set[str]:
        return {r["path"] for r in self.query("SELECT path FROM instances")}

    def run_instance_count(self, run_id: str) -> int:
        return int(
            self.query("SELECT COUNT(*) AS n FROM instances WHERE run_id=?", (run_id,))[0]["n"]
        )

    def pending_bytes(self, sender: str) -> int:
        """The bytes of ``sender``'s instances in runs not yet processed: receiving,
        complete, or with a job queued or running (read from those runs, not from
        every instance the index holds)."""
        row = self.query(
            "WITH pending(run_id) AS ("
            "SELECT run_id FROM runs WHERE state IN (?,?) "
            "UNION SELECT run_id FROM jobs WHERE state IN (?,?)) "
            "SELECT COALESCE(SUM(i.size), 0) AS n FROM pending p "
            f"JOIN instances i ON i.run_id = p.run_id WHERE {SENDER.format('i')} = ?",
            (RunState.RECEIVING, RunState.COMPLETE, JobState.QUEUED, JobState.RUNNING, sender),
        )
        return int(row[0]["n"])

    def run_instances(self, run_id: str) -> list[InstanceRecord]:
        rows = self.query("SELECT * FROM instances WHERE run_id=? ORDER BY received_at", (run_id,))
        return [instance_record(r) for r in rows]

    def series_instances(self, study_uid: str, series_uid: str) -> list[InstanceRecord]:
        """The stored instances of a series (WADO-RS), in the order they arrived."""
        rows = self.query(
            "SELECT * FROM instances WHERE study_uid=? AND series_uid=? ORDER BY received_at",
            (study_uid, series_uid),
        )
        return [instance_record(r) for r in rows]

    def series_instance(self, study_uid: str, series_uid: str, sop: str) -> InstanceRecord | None:
        """One stored instance of a series (WADO-RS of one instance: a worker fetching
        a run of thousands asks for each, so not a scan of the series)."""
        rows = self.query(
            "SELECT * FROM instances WHERE sop_instance_uid=? AND study_uid=? AND series_uid=?",
            (sop, study_uid, series_uid),
        )
        return instance_record(rows[0]) if rows else None

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

    def after_a_clock_step(
        self, t: float, job_backoff_s: float, delivery_backoff_s: float, commit_wait_s: float = 0
    ) -> int:
        """Times the index holds ahead of the wall clock, which was stepped back (NTP, a
        virtual machine restored from a snapshot): a receiving run's last instance
        becomes ``t`` (it completes one quiet period from now, not once the clock has
        caught up), and a queued job's, pending delivery's, storage commitment result's
        or commitment request's next try further ahead than its longest wait is due now.
        Returns how many rows moved."""
        with self._tx() as con:
            moved = con.execute(
                "UPDATE runs SET last_at=? WHERE state=? AND last_at > ?",
                (t, RunState.RECEIVING, t + 1.0),
            ).rowcount
            con.execute(  # (counted with last_at: a run opened ahead was received ahead)
                "UPDATE runs SET opened_at=? WHERE state=? AND opened_at > ?",
                (t, RunState.RECEIVING, t + 1.0),
            )
            moved += con.execute(
                "UPDATE jobs SET not_before=? WHERE state=? AND not_before > ?",
                (t, JobState.QUEUED, t + job_backoff_s + 1.0),
            ).rowcount
            moved += con.execute(
                "UPDATE outbox SET not_before=? WHERE state=? AND not_before > ?",
                (t, DeliveryState.PENDING, t + delivery_backoff_s + 1.0),
            ).rowcount
            moved += con.execute(  # a storage commitment result: the outbox's backoff
                "UPDATE commitments SET not_before=? WHERE state=? AND not_before > ?",
                (t, CommitmentState.PENDING, t + delivery_backoff_s + 1.0),
            ).rowcount
            moved += con.execute(  # a result's commitment, asked of its destination
                "UPDATE outbox SET commit_not_before=? WHERE commitment=? "
                "AND commit_not_before > ?",
                (t, AWAITING, t + max(delivery_backoff_s, commit_wait_s) + 1.0),
            ).rowcount
        return int(moved)

    def quiet_runs(self, quiet_since: float) -> list[tuple[str, str]]:
        """(run ID, series) of the receiving runs with no new instance since
        ``quiet_since``."""
        rows = self.query(
            "SELECT run_id, series_uid FROM runs WHERE state=? AND last_at <= ?",
            (RunState.RECEIVING, quiet_since),
        )
        return [(r["run_id"], r["series_uid"]) for r in rows]

    def runs_open_since(self, opened_before: float) -> list[str]:
        """Receiving runs that began receiving before ``opened_before`` (however
        recently an instance came)."""
        rows = self.query(
            "SELECT run_id FROM runs WHERE state=? AND COALESCE(opened_at, first_at) <= ?",
            (RunState.RECEIVING, opened_before),
        )
        return [r["run_id"] for r in rows]

    def runs_to_route(self) -> list[str]:
        rows = self.query(
            "SELECT run_id FROM runs WHERE state=? ORDER BY completed_at", (RunState.COMPLETE,)
        )
        return [r["run_id"] for r in rows]

    def mark_rejected(self, run_id: str, reason: str) -> None:
        """A rejection note listed one of the run's instances: it is never processed
        again (the router settles it with ``reason`` whenever it completes)."""
        with self._tx() as con:
            con.execute(
                "UPDATE runs SET rejected=? WHERE run_id=? AND rejected IS NULL", (reason, run_id)
            )

    def rejected(self, run_id: str) -> str | None:
        """Why the run was rejected (``mark_rejected``), or None."""
        rows = self.query("SELECT rejected FROM runs WHERE run_id=?", (run_id,))
        return rows[0]["rejected"] if rows else None

    def run_state(self, run_id: str) -> RunState | None:
        rows = self.query("SELECT state FROM runs WHERE run_id=?", (run_id,))
        return RunState(rows[0]["state"]) if rows else None

    def route_run(
        self,
        run_id: str,
        rule: str,
        pipelines: Sequence[str],
        destinations: Sequence[str],
        older: bool = False,
    ) -> list[int]:
        """complete -> routed, and its jobs created, in one transaction; ``older``:
        an older run's jobs, taken after every due job of a live run.

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
                    " created_at, updated_at, priority) VALUES (?,?,?,?,?,?,?,?,?)",
                    (
                        run_id,
                        name,
                        json.dumps(list(destinations)),
                        row["resend"],
                        JobState.QUEUED,
                        t,
                        t,
                        t,
                        int(older),
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
        """A settled run -> complete again, its results to be sent again (not once its
        files were deleted: purged)."""
        with self._tx() as con:
            cur = con.execute(
                "UPDATE runs SET state=?, reason='reprocess', resend=1, completed_at=? "
                "WHERE run_id=? AND purged_at IS NULL "
                f"AND state IN ({','.join('?' * len(SETTLED_RUN_STATES))})",
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


def _holders(
    con: sqlite3.Connection, inst: InstanceRecord
) -> tuple[sqlite3.Row | None, sqlite3.Row | None, str | None]:
    """The row that holds the instance's SOP Instance UID (None: none, or one of a
    purged run: a purge a crash cut short leaves them), its run's row, and why the
    instance cannot be indexed beside them (None: it can)."""
    held = con.execute(
        "SELECT i.series_uid, i.study_uid, i.run_id, r.purged_at FROM instances i"
        " LEFT JOIN runs r ON r.run_id = i.run_id WHERE i.sop_instance_uid=?",
        (inst.sop_instance_uid,),
    ).fetchone()
    if held is not None and held["purged_at"] is not None:
        held = None
    row = con.execute(
        "SELECT state, purged_at, series_uid, study_uid FROM runs WHERE run_id=?",
        (inst.run_id,),
    ).fetchone()
    why = None
    if held is not None and tuple(held)[:3] != (inst.series_uid, inst.study_uid, inst.run_id):
        why = (
            f"SOP Instance UID {inst.sop_instance_uid} is stored already in series "
            f"{held['series_uid']} of study {held['study_uid']} (run {held['run_id']}; "
            f"`dicom-node purge --run {held['run_id']}` frees it once that run is processed)"
        )
    # A series run's ID is its Series UID, a multi-frame instance's its SOP Instance
    # UID, a concatenation's its Concatenation UID: the run is another one's when its
    # series or study differ.
    elif row is not None and row["purged_at"] is None:
        if (row["series_uid"], row["study_uid"]) != (inst.series_uid, inst.study_uid):
            why = (
                f"run {inst.run_id} is stored already, of series {row['series_uid']} "
                f"of study {row['study_uid']} (`dicom-node purge --run {inst.run_id}` frees it "
                "once that run is processed)"
            )
    return held, row, why
