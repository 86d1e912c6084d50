"""Retention: processed runs lose their received files and results, so that the disk
never fills with what the node has finished with (a full disk answers every sender
0xA700: the node would stop taking runs).

Two rules, applied by a scheduler job every ``[retention] interval_s``, and an
operator's request (``POST /purge``, ``dicom-node purge``) for chosen runs:

- age: a processed run whose last activity is older than ``keep_days`` (and a file
  that recovery moved to ``quarantine/`` that long ago);
- space: while free space is below ``free_target_bytes``, processed runs oldest
  first, whatever their age.

Only processed runs are touched (``dicom_node.db.retention``): nothing that is
still to be routed or processed is deleted, so what was acknowledged is kept until
the node has done its work with it; results that wait for delivery (a destination
down) are kept until they are delivered (or refused), the run's received files
are not. For each run, under the spool's lock
of its series (an instance of the series being stored waits, or is waited for): the
run is claimed, its instance files and its jobs' result folders are deleted, then
their rows. The run and job rows stay (states, reasons, notes), marked purged; a
reprocess or an operator's retry of a purged run is refused, and a new instance
re-opens it like any settled run. Each purge is logged and audited (DICOM
Instances Accessed, action D) with UIDs and counts only.

A full disk (filled by results, or by another program) would hold retention back: its
first step, the claim, is a write to the index, which cannot commit then. The pass
deletes the storage reserve (``dicom_node.diskfull.Reserve``) and goes on; the reserve
is written again once there is room for it above ``min_free_bytes`` and the
retention target.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import stat
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from dicom_node.audit import AuditTrail
from dicom_node.db import Database, Purge
from dicom_node.diskfull import FAILING, FULL, READ_ONLY, Reserve, Waiting, storage_fault
from dicom_node.settings import RetentionSettings
from dicom_node.spool import Spool

log = logging.getLogger(__name__)

DAY_S = 86400.0


class Retention:
    def __init__(
        self,
        db: Database,
        spool: Spool,
        results_dir: Path,
        settings: RetentionSettings,
        audit: AuditTrail | None = None,
        free_bytes: Callable[[], int] | None = None,
        reserve: Reserve | None = None,
    ) -> None:
        self.db = db
        self.spool = spool
        self.results_dir = results_dir
        self.settings = settings
        self.audit = audit
        self.free_bytes = free_bytes or (lambda: shutil.disk_usage(spool.root).free)
        self.reserve = reserve
        self.waiting = Waiting("retention", db)

    def run(self) -> int:
        """One pass of both rules (and of purges a crash cut short); returns how many
        runs were purged. On a full disk the reserve goes first, then the pass again; a
        read-only or failing disk is logged once (``Waiting``), not at every pass."""
        for first in (True, False):
            try:
                purged = self._pass()
                break
            except Exception as exc:
                fault = storage_fault(exc)
                if fault is None:
                    raise
                if not (
                    fault == FULL and first and self.reserve is not None and self.reserve.release()
                ):
                    self.waiting.met(exc)
                    return 0
        self.waiting.passed()
        if self.reserve is not None:
            self.reserve.keep()
        return purged

    def _pass(self) -> int:
        for unfinished in self.db.unfinished_purges():
            with self.spool.series_lock(unfinished.series_uid):
                self._delete(unfinished, "the rest of an earlier purge")
        purged = 0
        if self.settings.keep_days is not None:
            before = time.time() - self.settings.keep_days * DAY_S
            self._sweep_quarantine(before)
            reason = f"processed more than {self.settings.keep_days:g} days ago"
            while batch := self.db.purge_candidates(before):
                done = sum(self._purge(c, reason) for c in batch)
                purged += done
                if not done:
                    break
        target = self.settings.free_target_bytes
        if target is not None:
            while self.free_bytes() < target:
                batch = self.db.purge_candidates(None, limit=10)
                done = sum(
                    self._purge(c, f"free space below {target // 2**20} MiB")
                    for c in batch
                    if self.free_bytes() < target
                )
                purged += done
                if not done:
                    if not batch:
                        log.warning(
                            "free space %d MiB is below the retention target %d MiB, and no "
                            "processed run is left to delete",
                            self.free_bytes() // 2**20,
                            target // 2**20,
                        )
                    break
        return purged

    def purge_now(self, run_ids: Iterable[str], reason: str) -> tuple[list[str], dict[str, str]]:
        """An operator's purge: each run that is processed loses its files now, as the
        rules above would take them (results still waiting for delivery are kept until
        delivered); returns the runs purged and, for the others, why not."""
        purged: list[str] = []
        kept: dict[str, str] = {}
        for run_id in run_ids:
            candidate = self.db.purge_candidate(run_id)
            if isinstance(candidate, str):
                kept[run_id] = candidate
            elif self._purge(candidate, reason):
                purged.append(run_id)
            else:
                kept[run_id] = "it changed while it was being purged: try again"
        return purged, kept

    def _sweep_quarantine(self, before: float) -> None:
        """Files recovery set aside (unindexed at start and failing the checks) go after
        ``keep_days`` too, counted from when they were moved there."""
        if not self.spool.quarantine.is_dir():
            return
        for path in sorted(self.spool.quarantine.rglob("*"), reverse=True):
            with contextlib.suppress(OSError):
                info = path.stat()
                if stat.S_ISDIR(info.st_mode):
                    path.rmdir()  # only when empty
                elif max(info.st_mtime, info.st_ctime) < before:
                    path.unlink()
                    log.info(
                        "quarantined file %s deleted (kept %g days)",
                        path.name,
                        self.settings.keep_days,
                    )

    def _purge(self, candidate: Purge, reason: str) -> bool:
        with self.spool.series_lock(candidate.series_uid):
            claimed = self.db.claim_purge(candidate)
            if claimed is None:
                return False  # it changed since it was chosen
            self._delete(claimed, reason)
        return True

    def _delete(self, purge: Purge, reason: str) -> None:
        """Files first, then their rows: a crash in between leaves rows whose files
        are gone, which the next pass finishes; never a file without a row, which the
        spool's recovery would index again as a new run. A file that cannot be deleted
        (its permissions) keeps the run's rows, and the next pass tries again; the other
        files and runs go on (one such file stopped every later purge, and the disk
        filled). A read-only or failing disk ends the pass: ``run`` waits on it."""
        freed, kept = 0, []
        for path in purge.instances + purge.results:
            try:
                size = path.stat().st_size
                path.unlink()
                freed += size
            except FileNotFoundError:
                pass
            except OSError as exc:
                if storage_fault(exc) in (READ_ONLY, FAILING):
                    # the disk, not this file: ``run`` waits on it and logs it once (this
                    # run's ERROR came again at every pass, 0.5-60 s apart)
                    raise
                kept.append(f"{path.name}: {exc.strerror or type(exc).__name__}")
        if kept:
            log.error(
                "run %s: %d file(s) could not be deleted (%s); its purge is tried again at "
                "the next pass",
                purge.run_id,
                len(kept),
                "; ".join(kept[:3]),
            )
            return
        for job_id in purge.job_ids:
            shutil.rmtree(self.results_dir / str(job_id), ignore_errors=True)
        series = self.spool.spool / purge.study_uid / purge.series_uid
        for folder in (series, series.parent):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty: other runs of the study stay
        self.db.finish_purge(purge)
        log.info(
            "run %s purged (%s): %d instance(s), %d result(s), %d MiB",
            purge.run_id,
            reason,
            len(purge.instances),
            len(purge.results),
            freed // 2**20,
        )
        if self.audit is not None:
            self.audit.purged(purge.run_id, purge.study_uid, len(purge.instances), reason)
