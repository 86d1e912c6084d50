"""When is a run complete? A small pluggable rule.

- A single-instance multi-frame 2D run (the usual XA) is complete on arrival.
- A multi-instance series is complete after a quiet period with no new instance.
- An explicit trigger (REST, CLI, Orthanc's stable-series event) completes it now.

Completing is a compare-and-set on the run's state, so a trigger racing the
sweep completes a run once.
"""

from __future__ import annotations

from dataclasses import dataclass

from dicom_node.db import Database, now
from dicom_node.spool import Stored


@dataclass(frozen=True)
class QuietPeriodRule:
    quiet_period_s: float

    def complete_on_arrival(self, stored: Stored) -> bool:
        return stored.single_instance_run

    def due(self, db: Database) -> list[str]:
        cutoff = now() - self.quiet_period_s
        rows = db.query(
            "SELECT run_id FROM runs WHERE state='receiving' AND last_at <= ?", (cutoff,)
        )
        return [r["run_id"] for r in rows]


def complete(db: Database, run_id: str, reason: str) -> bool:
    """Mark a receiving run complete; False when it already was (or does not exist)."""
    with db.transaction() as con:
        cur = con.execute(
            "UPDATE runs SET state='complete', completed_at=?, reason=? "
            "WHERE run_id=? AND state='receiving'",
            (now(), reason, run_id),
        )
        return cur.rowcount == 1


def runs_for(
    db: Database,
    *,
    run_id: str | None = None,
    series_uid: str | None = None,
    study_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> list[str]:
    """Run ids selected by any DICOM level (for triggers and reprocessing)."""
    if run_id:
        rows = db.query("SELECT run_id FROM runs WHERE run_id=?", (run_id,))
    elif sop_instance_uid:
        rows = db.query(
            "SELECT DISTINCT run_id FROM instances WHERE sop_instance_uid=?", (sop_instance_uid,)
        )
    elif series_uid:
        rows = db.query("SELECT run_id FROM runs WHERE series_uid=?", (series_uid,))
    elif study_uid:
        rows = db.query("SELECT run_id FROM runs WHERE study_uid=?", (study_uid,))
    else:
        return []
    return [r["run_id"] for r in rows]
