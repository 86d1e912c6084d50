"""Retention: which processed runs may lose their files, and the purge's two steps.

A run is *processed* when it is settled and none of its jobs is queued or running.
Its last activity is the latest of its last instance, its completion, its jobs'
last change and its deliveries. A purge first claims the run (``purged_at`` set,
in the transaction that checks all of this once more, so a reprocess or an
operator's retry refuses it from then on), then the caller deletes the files,
then ``finish_purge`` deletes their rows; the run and job rows stay, with their
states, reasons and notes. Results that still wait for delivery (a destination
down) are kept, with their deliveries, until none does; the received files go
regardless. What is left of a purge (those results once delivered, or what a
crash cut short) is found by ``unfinished_purges``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dicom_node.db.core import Core
from dicom_node.db.deliveries import AWAITING
from dicom_node.db.records import SETTLED_RUN_STATES, DeliveryState, JobState, now

_SETTLED = ",".join(f"'{s.value}'" for s in SETTLED_RUN_STATES)
_ACTIVITY = """
MAX(r.last_at, COALESCE(r.completed_at, 0),
    COALESCE((SELECT MAX(j.updated_at) FROM jobs j WHERE j.run_id = r.run_id), 0),
    COALESCE((SELECT MAX(COALESCE(o.sent_at, o.created_at)) FROM outbox o
              JOIN jobs j ON o.job_id = j.id WHERE j.run_id = r.run_id), 0))
"""
_PROCESSED = f"""
r.state IN ({_SETTLED})
AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.run_id = r.run_id
                AND j.state IN ('{JobState.QUEUED.value}', '{JobState.RUNNING.value}'))
"""
_UNDELIVERED = f"""
EXISTS (SELECT 1 FROM outbox o JOIN jobs j ON o.job_id = j.id
        WHERE j.run_id = r.run_id AND (o.state = '{DeliveryState.PENDING.value}'
                                       OR o.commitment = '{AWAITING}'))
"""


@dataclass(frozen=True)
class Purge:
    """A run whose files are to go, and what they are."""

    run_id: str
    study_uid: str
    series_uid: str
    activity: float
    instances: tuple[Path, ...] = ()
    job_ids: tuple[int, ...] = ()
    results: tuple[Path, ...] = ()


class Retention(Core):
    def purge_candidates(self, active_before: float | None, limit: int = 100) -> list[Purge]:
        """Processed runs not purged yet, least recently active first; with
        ``active_before``, only those whose last activity was before it."""
        age = "" if active_before is None else f"AND {_ACTIVITY} < :before"
        rows = self.query(
            f"SELECT r.run_id, r.study_uid, r.series_uid, {_ACTIVITY} AS activity FROM runs r "
            f"WHERE r.purged_at IS NULL AND {_PROCESSED} {age} ORDER BY activity LIMIT :limit",
            {"before": active_before, "limit": limit},
        )
        return [Purge(r["run_id"], r["study_uid"], r["series_uid"], r["activity"]) for r in rows]

    def purge_candidate(self, run_id: str) -> Purge | str:
        """The run as a candidate for an operator's purge now, or why it is not one."""
        rows = self.query(
            f"SELECT r.run_id, r.study_uid, r.series_uid, r.state, r.purged_at, "
            f"{_ACTIVITY} AS activity, ({_PROCESSED}) AS processed FROM runs r WHERE r.run_id=?",
            (run_id,),
        )
        if not rows:
            return "no such run"
        r = rows[0]
        if r["purged_at"] is not None:
            return "purged already"
        if not r["processed"]:
            return (
                f"not processed yet (the run is {r['state']}, or a job of it is queued or "
                "running): purge it once its jobs have ended"
            )
        return Purge(r["run_id"], r["study_uid"], r["series_uid"], r["activity"])

    def unfinished_purges(self) -> list[Purge]:
        """Purged runs with files left to delete: a crash came between the claim and the
        rows, or their results waited for delivery and none does any more."""
        rows = self.query(
            "SELECT r.run_id, r.study_uid, r.series_uid, r.purged_at FROM runs r "
            "WHERE r.purged_at IS NOT NULL AND (EXISTS "
            "(SELECT 1 FROM instances i WHERE i.run_id = r.run_id) OR (EXISTS "
            "(SELECT 1 FROM outbox o JOIN jobs j ON o.job_id = j.id WHERE j.run_id = r.run_id)"
            f" AND NOT {_UNDELIVERED})) ORDER BY r.purged_at"
        )
        return [
            self._files(Purge(r["run_id"], r["study_uid"], r["series_uid"], r["purged_at"]))
            for r in rows
        ]

    def claim_purge(self, candidate: Purge) -> Purge | None:
        """Mark the run purged if it is still processed and nothing happened to it since
        ``candidate`` was chosen; returns it with its files, or None."""
        with self._tx() as con:
            row = con.execute(
                f"SELECT {_ACTIVITY} AS activity FROM runs r "
                f"WHERE r.run_id = ? AND r.purged_at IS NULL AND {_PROCESSED}",
                (candidate.run_id,),
            ).fetchone()
            if row is None or row["activity"] != candidate.activity:
                return None
            con.execute("UPDATE runs SET purged_at=? WHERE run_id=?", (now(), candidate.run_id))
        return self._files(candidate)

    def _files(self, purge: Purge) -> Purge:
        """Its instance files, and its results unless one still waits for delivery."""
        instances = self.query("SELECT path FROM instances WHERE run_id=?", (purge.run_id,))
        if self.query(f"SELECT 1 FROM runs r WHERE r.run_id=? AND {_UNDELIVERED}", (purge.run_id,)):
            jobs, results = [], []
        else:
            jobs = self.query("SELECT id FROM jobs WHERE run_id=?", (purge.run_id,))
            results = self.query(
                "SELECT o.path FROM outbox o JOIN jobs j ON o.job_id = j.id WHERE j.run_id=?",
                (purge.run_id,),
            )
        return Purge(
            purge.run_id,
            purge.study_uid,
            purge.series_uid,
            purge.activity,
            tuple(Path(r["path"]) for r in instances),
            tuple(int(r["id"]) for r in jobs),
            tuple(Path(r["path"]) for r in results),
        )

    def finish_purge(self, purge: Purge) -> None:
        """The files are gone: so are their rows (deliveries only with their results)."""
        with self._tx() as con:
            con.execute("DELETE FROM instances WHERE run_id=?", (purge.run_id,))
            if purge.job_ids:
                marks = ",".join("?" * len(purge.job_ids))
                con.execute(f"DELETE FROM outbox WHERE job_id IN ({marks})", purge.job_ids)

    def is_purged(self, run_id: str) -> bool:
        rows = self.query("SELECT purged_at FROM runs WHERE run_id=?", (run_id,))
        return bool(rows) and rows[0]["purged_at"] is not None

    def job_purged(self, job_id: int) -> bool:
        """Whether the job's run was purged (its files are gone: no retry)."""
        rows = self.query(
            "SELECT r.purged_at FROM jobs j JOIN runs r ON r.run_id = j.run_id WHERE j.id=?",
            (job_id,),
        )
        return bool(rows) and rows[0]["purged_at"] is not None
