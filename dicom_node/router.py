"""The routing stage: complete runs get their rule, their jobs, or a reason why not.

A loop (woken when a run completes) reads the header of each complete run's
first instance (never pixel data; the rules read nothing else, and every
instance's header was checked at ingest), applies the routing rules and records the outcome in
one transaction: ``routed`` with its jobs, ``unrouted`` (no rule, or a rule
without pipelines) or ``unroutable`` (a header that cannot be read). This is
where a header defect becomes a run state, so nothing a sender sends can raise
in the C-STORE handler or stop the node from starting.

A run acquired before ``workers.live_window_h`` (a study re-sent from the
archive, a bulk retrieval) is an older run: its jobs are taken only while no
job of a live run is due, so a resend of hundreds of runs does not hold up the
run a suite sends now.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable

from pydicom import dcmread
from pydicom.dataset import Dataset

from dicom_node.db import Database, RunState
from dicom_node.diskfull import Waiting
from dicom_node.loops import Loops
from dicom_node.rejection import Rejections
from dicom_node.routing import RunFeatures, acquired_at, effective_rules, route
from dicom_node.settings import Settings
from dicom_node.sopclasses import KEY_OBJECT_SELECTION, run_sop_class

log = logging.getLogger(__name__)


class Router(Loops):
    def __init__(
        self,
        db: Database,
        settings: Settings,
        on_routed: Callable[[], None] = lambda: None,
        rejections: Rejections | None = None,
    ) -> None:
        super().__init__()
        self.db = db
        self.settings = settings
        # rejection notes (IHE IOCM) go here, not to the rules
        self.rejections = rejections or Rejections(db, settings.storage_dir / "results")
        self.rules = effective_rules(settings)
        self.on_routed = on_routed
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._loop, name="router", daemon=True)]

    def _loop(self) -> None:
        full = Waiting("router", self.db)
        while not self.stop_event.is_set():
            try:
                self.route_pending()
                full.passed()
            except Exception as exc:  # noqa: BLE001 - a defect must not end the router's thread
                if full.met(exc):
                    self.stop_event.wait(full.delay_s)  # the run's header is read again at each try
                else:
                    log.exception("router: unexpected error; going on")
            self.wake.wait(1.0)
            self.wake.clear()

    def route_pending(self) -> None:
        for run_id in self.db.runs_to_route():
            if self.stop_event.is_set():
                return
            self.route(run_id)

    def older(self, first: Dataset) -> bool:
        """Whether the run was acquired before ``workers.live_window_h`` (see the
        setting): a resend or a retrieval, not a suite's run of today."""
        window = self.settings.workers.live_window_h
        try:  # the header is the sender's: nothing in it may stop the router's thread
            acquired = acquired_at(first)
            if window <= 0 or acquired is None:
                return False
            current = dt.datetime.now(acquired.tzinfo) if acquired.tzinfo else dt.datetime.now()
            return current - acquired > dt.timedelta(hours=window)
        except Exception as exc:  # noqa: BLE001 - a date defect makes the run live, not stuck
            log.warning("acquisition time not compared (%s): the run is live", type(exc).__name__)
            return False

    def route(self, run_id: str) -> list[int]:
        """Route one complete run; returns the jobs created (none if it is not complete)."""
        with self._lock:
            if rejected := self.db.rejected(run_id):  # a rejection note listed it
                if self.db.settle_unrouted(run_id, RunState.UNROUTED, None, rejected):
                    log.warning("run %s not routed: %s", run_id, rejected)
                return []
            instances = self.db.run_instances(run_id)
            if not instances:
                self.db.settle_unrouted(
                    run_id, RunState.UNROUTABLE, None, "the run has no stored instance"
                )
                return []
            try:
                # one header: each instance's was checked at ingest, and holding a run's
                # thousands of headers cost the node memory in proportion
                # of the run's SOP Class: the instances decoding keeps (dicom_node.runs)
                sop = run_sop_class([i.sop_class_uid for i in instances])
                members = [i for i in instances if i.sop_class_uid == sop]
                if sop == KEY_OBJECT_SELECTION:  # a run of its own (DOCUMENTS), read whole there
                    note = members[0]
                    self.rejections.apply(run_id, note.path, note.calling_aet, note.sender)
                    return []
                first = dcmread(members[0].path, stop_before_pixels=True)
                features = RunFeatures.from_first(
                    first,
                    len(members),
                    members[0].calling_aet,
                    frames=sum(i.frames for i in members),
                )
                decision = route(self.rules, features)
            except Exception as exc:  # noqa: BLE001 - a header defect becomes the run's state
                reason = f"header cannot be read for routing: {type(exc).__name__}: {exc}"
                log.warning("run %s unroutable: %s", run_id, reason)
                self.db.settle_unrouted(run_id, RunState.UNROUTABLE, None, reason)
                return []
            rule = decision.rule
            if rule is None or not rule.pipelines:
                why = decision.excluded or (
                    "no rule matched" if rule is None else f"rule {rule.name} has no pipeline"
                )
                if self.db.settle_unrouted(
                    run_id, RunState.UNROUTED, rule.name if rule else None, why
                ):
                    log.warning("run %s not routed: %s", run_id, why)
                return []
            destinations = [d.name for d in self.settings.destinations_for(rule)]
            older = self.older(first)
            jobs = self.db.route_run(run_id, rule.name, rule.pipelines, destinations, older)
        if jobs:
            log.info(
                "run %s -> rule %s: jobs %s%s",
                run_id,
                rule.name,
                jobs,
                " (an older run: they wait behind live runs)" if older else "",
            )
            self.on_routed()
        return jobs
