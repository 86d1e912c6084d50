"""When is a run complete? A small pluggable rule.

- A single-instance multi-frame 2D run (the usual XA) is complete on arrival.
- A multi-instance series is complete after a quiet period with no new instance.
- An explicit trigger (REST, CLI, Orthanc's stable-series event) completes it now.

Completing is a compare-and-set on the run's state (``Database.complete_run``),
so a trigger racing the sweep completes a run once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from dicom_node.db import Database, now
from dicom_node.spool import Stored


class CompletionRule(Protocol):
    def complete_on_arrival(self, stored: Stored) -> bool: ...

    def due(self, db: Database) -> list[str]: ...


@dataclass(frozen=True)
class QuietPeriodRule:
    quiet_period_s: float

    def complete_on_arrival(self, stored: Stored) -> bool:
        return stored.single_instance_run

    def due(self, db: Database) -> list[str]:
        return db.quiet_runs(now() - self.quiet_period_s)

    def sweep(self, db: Database) -> int:
        """Complete every run that has been quiet long enough; returns how many."""
        reason = f"quiet for {self.quiet_period_s:g} s"
        return sum(db.complete_run(run_id, reason) for run_id in self.due(db))
