"""When is a run complete? A small pluggable rule.

- A single-instance multi-frame 2D run (the usual XA) is complete on arrival; a run
  split into a concatenation of instances, on the arrival of its last one.
- A multi-instance series is complete after a quiet period with no new instance, or
  once it has been receiving for ``max_receiving_s`` (a sender that never stops, or
  resends an instance in a loop, would hold it open, and its run unprocessed, for
  ever); an instance after that opens it again.
- An explicit trigger (REST, CLI, Orthanc's stable-series event) completes it now.

Completing is a compare-and-set on the run's state (``Database.complete_run``),
so a trigger racing the sweep completes a run once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from dicom_node.db import Database, now
from dicom_node.diskfull import Waiting
from dicom_node.spool import Stored

log = logging.getLogger(__name__)


def _nothing_arriving() -> frozenset[str]:
    return frozenset()


class CompletionRule(Protocol):
    def complete_on_arrival(self, stored: Stored) -> bool: ...

    def sweep(
        self, db: Database, arriving: Callable[[], frozenset[str]] = _nothing_arriving
    ) -> int: ...


@dataclass(frozen=True)
class QuietPeriodRule:
    quiet_period_s: float
    max_receiving_s: float = 3600.0
    # runs left open because an instance of their series is still arriving (logged once)
    _held: set[str] = field(default_factory=set, compare=False, repr=False)

    def complete_on_arrival(self, stored: Stored) -> bool:
        return stored.single_instance_run or stored.whole_concatenation

    def sweep(
        self, db: Database, arriving: Callable[[], frozenset[str]] = _nothing_arriving
    ) -> int:
        """Complete every run that has been quiet long enough, or receiving too long;
        returns how many. ``arriving``: the series with a data set still arriving
        (``arrivals.InFlight``), which are not quiet, however long since their last
        instance was stored."""
        quiet = f"quiet for {self.quiet_period_s:g} s"
        runs = db.quiet_runs(now() - self.quiet_period_s)
        busy = arriving() if runs else frozenset()
        self._held.intersection_update(run_id for run_id, _ in runs)  # others completed
        done = 0
        for run_id, series in runs:
            if series in busy:
                if run_id not in self._held:
                    self._held.add(run_id)
                    log.info(
                        "run %s: %s, but an instance of its series is still arriving: "
                        "left open until it is stored",
                        run_id,
                        quiet,
                    )
                continue
            self._held.discard(run_id)
            done += db.complete_run(run_id, quiet)
        held = f"receiving for {self.max_receiving_s:g} s with instances still arriving"
        for run_id in db.runs_open_since(now() - self.max_receiving_s):
            if db.complete_run(run_id, held):
                done += 1
                log.warning(
                    "run %s complete after %s (a sender that does not stop, or sends "
                    "again in a loop); an instance after this opens it again",
                    run_id,
                    held,
                )
        return done


class Sweeper:
    """Calls ``tick`` every ``interval_s`` of the monotonic clock, in a thread of its own.

    Not an apscheduler interval job: apscheduler 3 compares wall-clock times, so a step
    back of the clock (NTP, a virtual machine restored from a snapshot) paused its jobs
    by the size of the step, and with the sweep the completion of every series."""

    def __init__(self, tick: Callable[[], None], interval_s: float, scope: object = None) -> None:
        self.tick = tick
        self.interval_s = interval_s
        self.scope = scope  # the node's index: its loops' faults, for /health
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="completion", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _loop(self) -> None:
        full = Waiting("completion sweep", self.scope)
        next_at = time.monotonic()
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            next_at = time.monotonic() + self.interval_s
            try:
                self.tick()
                full.passed()
            except Exception as exc:  # noqa: BLE001 - a defect must not end the sweep's thread
                if full.met(exc):
                    next_at = time.monotonic() + max(self.interval_s, full.delay_s)
                else:
                    log.exception("completion sweep: unexpected error; going on")
