"""Two job engines behind one interface; ``[engine] kind`` picks one.

``embedded`` (the default, :class:`~dicom_node.jobs.Workers`): threads of this
process claim jobs from the index with a lease and run each in a worker process
of this machine. ``temporal`` (:class:`~dicom_node.temporal_engine.TemporalEngine`):
each job becomes a Temporal workflow, run by ``dicom-node worker`` processes on
any machine. Either way the node keeps ingest, completion, routing and the
outbox, and the index records every job's state, so ``/status`` and
``dicom-node status`` show the same thing whichever engine runs the jobs.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from dicom_node.db import Cancelled, Database, Job
from dicom_node.jobs import Workers
from dicom_node.sandbox import Outcome
from dicom_node.settings import Settings

log = logging.getLogger(__name__)


class Engine(Protocol):
    """What the node asks of a job engine."""

    wake: threading.Event  # set when jobs were queued (routing, an operator's retry)

    def recover(self) -> None:
        """At start, before ``start``: repair what a previous process left."""

    def start(self) -> None: ...

    def withdraw(self, cancelled: Cancelled) -> None:
        """Stop the attempts of the jobs an operator cancelled (the index no longer
        takes their outcomes)."""

    def stop(self, timeout: float = 30) -> None: ...


class EmbeddedEngine(Workers):
    """The embedded engine; at start it takes back jobs a Temporal configuration of this
    node dispatched and never settled, so switching engines loses no job."""

    def recover(self) -> None:
        taken = self.db.take_back_dispatched()
        if taken:
            log.warning("%d job(s) dispatched to Temporal taken back by the embedded engine", taken)
        super().recover()


def make_engine(
    settings: Settings,
    db: Database,
    results_dir: Path,
    on_outcome: Callable[[Job, Outcome], None],
) -> Engine:
    if settings.engine.kind == "temporal":
        from dicom_node.temporal_engine import TemporalEngine

        return TemporalEngine(settings, db, results_dir, on_outcome)
    return EmbeddedEngine(
        db, settings.workers, results_dir, settings.device, settings.models, on_outcome
    )
