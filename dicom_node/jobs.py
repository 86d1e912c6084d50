"""Job workers: threads that claim jobs and run each in a worker process.

A worker thread claims a job with a lease (``Database.claim_job``), hands it to
its :class:`~dicom_node.sandbox.WorkerProcess`, renews the lease while the
child works, and records the outcome. This module is where a job's outcome
becomes its state:

- done: the job and the deliveries of its results commit together;
- a permanent error (a run that cannot be decoded or processed, a defect met on
  this input) fails the job at once with its reason;
- a transient one (the worker crashed or was killed for memory or time, out of
  memory, I/O) is retried with exponential backoff until ``max_attempts``.

A job whose worker disappeared with the whole node (kill -9, power loss) is
taken again when its lease expires or at the next start, and fails once it has
had ``max_attempts``: an input that kills the node cannot loop forever.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

from dicom_node.db import Cancelled, Database, Job
from dicom_node.diskfull import Waiting
from dicom_node.logsafe import scrub
from dicom_node.loops import Loops
from dicom_node.sandbox import (
    JobSpec,
    MemoryPool,
    Outcome,
    TimeLimit,
    WorkerProcess,
    cpu_only,
    jobs_memory,
    threads_per_job,
)
from dicom_node.settings import WorkerSettings

log = logging.getLogger(__name__)


class Workers(Loops):
    """``concurrency`` threads, each with its own worker process."""

    def __init__(
        self,
        db: Database,
        settings: WorkerSettings,
        results_dir: Path,
        device: str,
        models: Mapping[str, Path],
        on_outcome: Callable[[Job, Outcome], None] = lambda _job, _outcome: None,
    ) -> None:
        super().__init__()
        self.db = db
        self.on_outcome = on_outcome  # metrics: durations per pipeline and stage
        self.settings = settings
        self.results_dir = results_dir
        self.device = device
        self.models = {k: str(v) for k, v in models.items()}
        self.prefix = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._attempts: dict[int, threading.Event] = {}  # running job -> its withdrawal
        self._attempts_lock = threading.Lock()
        self.memory = MemoryPool(jobs_memory(settings.jobs_memory_mib))
        self.processes = [
            WorkerProcess(
                f"job-worker-{i}",
                settings.memory_limit_mib * 2**20,
                cpu_only(device),
                settings.pipeline_memory_mib,
                threads_per_job(settings.concurrency, settings.cpu_threads),
                settings.pipeline_memory_bytes_per_pixel,
                self.memory,
                TimeLimit.decoding(settings),
            )
            for i in range(settings.concurrency)
        ]
        self.threads = [
            threading.Thread(target=self._loop, name=f"worker-{i}", daemon=True, args=(i,))
            for i in range(settings.concurrency)
        ]

    def recover(self) -> None:
        requeued, failed = self.db.recover_jobs(self.prefix, self.settings.max_attempts)
        if requeued or failed:
            log.warning(
                "jobs left running by a previous process: %d re-queued, %d failed "
                "(had every attempt)",
                requeued,
                failed,
            )

    def stop(self, timeout: float = 30) -> None:
        super().stop(timeout)
        for p in self.processes:
            p.close()

    def withdraw(self, cancelled: Cancelled) -> None:
        """Stop the attempts of jobs an operator cancelled now (their worker processes
        are ended), instead of at their next heartbeat."""
        with self._attempts_lock:
            for job_id in cancelled.jobs:
                if job_id in self._attempts:
                    self._attempts[job_id].set()

    def _loop(self, index: int) -> None:
        worker = f"{self.prefix}-{index}"
        process = self.processes[index]
        full = Waiting(worker, self.db)
        while not self.stop_event.is_set():
            try:
                job = self.db.claim_job(worker, self.settings.lease_s, self.settings.max_attempts)
                if job is None:  # (no write: it says nothing of the disk)
                    self.wake.wait(self.settings.poll_interval_s)
                    self.wake.clear()
                    continue
                full.passed()  # the claim was written
                log.info(
                    "job %d: %s on run %s (attempt %d)",
                    job.id,
                    job.pipeline,
                    job.run_id,
                    job.attempts,
                )
                outcome = self._run(job, process)
                self._record_when_it_can(job, outcome, full)
                if outcome.unwritable:  # released: taken again once it can be written
                    full.noted("the job's results could not be written", outcome.unwritable)
                    self.stop_event.wait(full.delay_s)
            except Exception as exc:  # noqa: BLE001 - a defect must not end the worker's thread
                # A job it had claimed keeps its lease, and is taken again when it ends.
                if full.met(exc):
                    self.stop_event.wait(full.delay_s)
                    continue
                log.exception("%s: unexpected error; going on", worker)
                self.stop_event.wait(self.settings.poll_interval_s)

    def _record_when_it_can(self, job: Job, outcome: Outcome, full: Waiting) -> None:
        """The outcome recorded; on a full or failing disk, again once it can be (retention
        frees room), while the job's lease lasts, instead of losing the work done."""
        observed: list[Job] = []

        def observe(job: Job, outcome: Outcome) -> None:  # once, whatever the tries
            if not observed:
                observed.append(job)
                self.on_outcome(job, outcome)

        while True:
            try:
                self._record(job, outcome, observe)
                return
            except Exception as exc:
                if not full.met(exc) or self.stop_event.is_set():
                    raise
            self.stop_event.wait(full.delay_s)

    def _run(self, job: Job, process: WorkerProcess) -> Outcome:
        paths = tuple(str(i.path) for i in self.db.run_instances(job.run_id))
        if not paths:
            return Outcome(error=f"run {job.run_id} has no stored instances")
        spec = JobSpec(
            job.id,
            job.run_id,
            job.pipeline,
            paths,
            str(self.results_dir / str(job.id)),
            self.device,
            self.models,
            tuple(self.db.prior_result_paths(job.run_id, job.pipeline, job.id)),
            options=self.settings.pipeline_options.get(job.pipeline, {}),
        )
        withdrawn = threading.Event()
        with self._attempts_lock:
            self._attempts[job.id] = withdrawn
        if not self.db.renew_lease(job, self.settings.lease_s):
            withdrawn.set()  # cancelled between its claim and here
        try:
            return process.run(
                spec,
                TimeLimit.of(self.settings, job.pipeline),
                heartbeat=lambda: self.db.renew_lease(job, self.settings.lease_s),
                heartbeat_every_s=max(self.settings.lease_s / 3, 1.0),
                stopping=self.stop_event,
                withdrawn=withdrawn,
            )
        finally:
            with self._attempts_lock:
                del self._attempts[job.id]

    def _record(self, job: Job, outcome: Outcome, observe: Callable[[Job, Outcome], None]) -> None:
        if outcome.interrupted or outcome.unwritable:
            self.db.release_job(job)
            return
        if outcome.withdrawn:
            log.info(
                "job %d (%s on run %s): attempt %d stopped, the job is no longer this "
                "worker's (cancelled by an operator, or its lease was taken)",
                job.id,
                job.pipeline,
                job.run_id,
                job.attempts,
            )
            return
        if outcome.timings:
            self.db.record_timings(job.id, dict(outcome.timings))
        observe(job, outcome)
        if outcome.ok:
            if not self.db.finish_job(job, outcome.results, outcome.notes):
                log.warning(
                    "job %d finished after it was cancelled or its lease was taken; result dropped",
                    job.id,
                )
                return
            waited = outcome.waited_s
            log.info(
                "job %d (%s on run %s) done: %d object(s) in %.1f s of a %.0f s limit%s on %d "
                "CPU thread(s), peak %.2f GiB resident of a %.2f GiB budget",
                job.id,
                job.pipeline,
                job.run_id,
                len(outcome.results),
                sum(seconds for _, seconds in outcome.timings) - waited,
                outcome.time_limit,
                f" (after {waited:.1f} s waiting for memory)" if waited else "",
                outcome.threads,
                outcome.peak_rss / 2**30,
                outcome.budget / 2**30,
            )
            return
        reason = scrub(outcome.error or "unknown error")  # stored, shown and logged: no values
        if outcome.transient and job.attempts < self.settings.max_attempts:
            delay = min(
                self.settings.backoff_base_s * 2 ** (job.attempts - 1), self.settings.backoff_max_s
            )
            self.db.retry_job(job, reason, delay)
            log.warning(
                "job %d (%s on run %s) attempt %d failed, retry in %.0f s: %s",
                job.id,
                job.pipeline,
                job.run_id,
                job.attempts,
                delay,
                reason,
            )
            return
        if outcome.transient:
            reason = f"{reason} (attempt {job.attempts} of {self.settings.max_attempts})"
        self.db.fail_job(job, reason)
        log.error(
            "job %d (%s on run %s) failed after %d attempt(s): %s",
            job.id,
            job.pipeline,
            job.run_id,
            job.attempts,
            reason,
        )
