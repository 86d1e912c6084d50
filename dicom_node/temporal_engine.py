"""The Temporal engine, node side: hand each queued job to Temporal as a workflow, and
record what the workflow reports.

Two threads: a dispatcher that starts one workflow per queued job (ID: the job's
deterministic :func:`~dicom_node.temporal_workflow.workflow_id`, so a start that a
node killed mid-way repeats is refused by the server and the job is enqueued
once), and an asyncio loop with the Temporal client and the node's own Temporal
worker, which runs the job workflows (on ``engine.node_task_queue``) and their
local activities ``record_done`` / ``record_failed``: those write the outcome into
the index, the job done together with its deliveries, in one transaction. The
compute happens in ``dicom-node worker`` processes (``dicom_node.worker``).

Temporal keeps the attempts, the backoff and the lease (the activity heartbeat);
the index keeps what the node shows: a job is ``queued`` until a worker reports
its attempt, ``running`` on that worker, then ``done`` or ``failed`` with the
reason, as in the embedded engine. The node never requeues a dispatched job
itself; if Temporal cannot be reached the dispatcher retries with backoff and
runs keep arriving, routed, their jobs queued.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path

from temporalio import activity
from temporalio.client import Client
from temporalio.common import Priority, WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.converter import DataConverter
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import Worker

from dicom_node.db import Cancelled, Database, DispatchJob, Job, ResultFile
from dicom_node.logsafe import scrub
from dicom_node.sandbox import Outcome
from dicom_node.settings import Settings
from dicom_node.temporal_client import connect
from dicom_node.temporal_workflow import (
    RECORD_DONE,
    RECORD_FAILED,
    WORKFLOW,
    InstanceRef,
    JobFailure,
    JobInput,
    JobReport,
    JobWorkflow,
    workflow_id,
)
from dicom_node.worker_api import relative

log = logging.getLogger(__name__)
_BATCH = 64
# Temporal priority keys (1 first, 5 last, 3 when none is given): a live run's job
# before an older run's (workers.live_window_h) on the same task queue.
LIVE_PRIORITY, OLDER_PRIORITY = 2, 4
_RETRY_MAX_S = 30.0


class TemporalEngine:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        results_dir: Path,
        on_outcome: Callable[[Job, Outcome], None] = lambda _job, _outcome: None,
    ) -> None:
        self.settings = settings
        self.engine = settings.engine
        self.db = db
        self.results_dir = results_dir
        self.on_outcome = on_outcome
        self.index_id = db.index_id()
        self.node_queue = self.engine.node_task_queue or f"angio-node-{self.index_id}"
        self.identity = f"node {settings.ae_title} pid {os.getpid()}"
        self.wake = threading.Event()
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._client: Client | None = None
        self._worker: Worker | None = None
        self._loop_thread = threading.Thread(target=self._run_loop, name="temporal", daemon=True)
        self._dispatcher = threading.Thread(
            target=self._dispatch_loop, name="temporal-dispatch", daemon=True
        )

    # -- lifecycle -----------------------------------------------------------------
    def recover(self) -> None:
        """Jobs an embedded configuration left running go back to the queue; dispatched
        ones stay with Temporal, which knows their attempts."""
        requeued, failed = self.db.recover_jobs("temporal:", self.settings.workers.max_attempts)
        if requeued or failed:
            log.warning(
                "jobs left running by the embedded engine: %d re-queued, %d failed",
                requeued,
                failed,
            )

    def start(self) -> None:
        self._loop_thread.start()
        self._dispatcher.start()

    def stop(self, timeout: float = 30) -> None:
        self._stop.set()
        self.wake.set()
        self._dispatcher.join(timeout)
        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
        self._loop_thread.join(timeout)

    async def _shutdown(self) -> None:
        if self._worker is not None:
            await self._worker.shutdown()

    def withdraw(self, cancelled: Cancelled) -> None:
        """Cancel the workflows of jobs an operator cancelled: their activities are
        cancelled at the next heartbeat, which ends the worker process's job. Whatever
        happens to them, they can no longer record (the jobs' generations moved on)."""
        for job_id, generation in cancelled.workflows:
            wid = workflow_id(self.index_id, job_id, generation)
            if self._client is None or not self._loop.is_running():
                log.warning("job %d: workflow %s not cancelled (no Temporal client)", job_id, wid)
                continue
            asyncio.run_coroutine_threadsafe(self._cancel(job_id, wid), self._loop)

    async def _cancel(self, job_id: int, wid: str) -> None:
        assert self._client is not None
        try:
            await self._client.get_workflow_handle(wid).cancel()
            log.info("job %d: workflow %s cancelled", job_id, wid)
        except Exception as exc:  # noqa: BLE001 - ended already, or the server is away
            log.warning("job %d: workflow %s not cancelled (%s)", job_id, wid, exc)

    # -- the loop: client and the node's Temporal worker -----------------------------
    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
        finally:
            self._loop.close()

    async def _main(self) -> None:
        delay = 1.0
        while not self._stop.is_set():
            try:
                client = await connect(self.engine, self.identity)
            except Exception as exc:  # noqa: BLE001 - unreachable, refused, TLS: all retried
                log.warning(
                    "Temporal at %s unreachable (%s); retry in %.0f s",
                    self.engine.address,
                    exc,
                    delay,
                )
                await self._pause(delay)
                delay = min(delay * 2, _RETRY_MAX_S)
                continue
            self._client = client
            self._connected.set()
            log.info(
                "Temporal engine: %s namespace %s, workflows on %s, jobs on %s",
                self.engine.address,
                self.engine.namespace,
                self.node_queue,
                self.engine.task_queue,
            )
            self._worker = Worker(
                client,
                task_queue=self.node_queue,
                workflows=[JobWorkflow],
                activities=[self.record_done, self.record_failed],
                identity=self.identity,
            )
            if self._stop.is_set():
                return
            try:
                await self._worker.run()
                delay = 1.0
            except Exception as exc:  # noqa: BLE001 - the worker ended: start a new one
                log.error("the node's Temporal worker stopped (%s); restart in %.0f s", exc, delay)
                await self._pause(delay)
                delay = min(delay * 2, _RETRY_MAX_S)

    async def _pause(self, seconds: float) -> None:
        """Sleep, but not past a stop."""
        for _ in range(max(1, int(seconds / 0.2))):
            if self._stop.is_set():
                return
            await asyncio.sleep(0.2)

    # -- dispatch --------------------------------------------------------------------
    def _dispatch_loop(self) -> None:
        delay = 1.0
        while not self._stop.is_set():
            if not self._connected.wait(0.5):
                continue
            try:
                started = self.dispatch_due()
                delay = 1.0
            except Exception as exc:  # noqa: BLE001 - the server is down or restarting
                log.warning("dispatch to Temporal failed (%s); retry in %.0f s", exc, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, _RETRY_MAX_S)
                continue
            if not started:
                self.wake.wait(self.settings.workers.poll_interval_s)
                self.wake.clear()

    def dispatch_due(self) -> int:
        """Start the workflow of every queued job not yet dispatched; returns how many."""
        count = 0
        for job in self.db.jobs_to_dispatch(_BATCH):
            if self._stop.is_set():
                break
            job_input = self._input(job)
            if job_input is None:
                continue
            future: Future[None] = asyncio.run_coroutine_threadsafe(
                self._start(job_input, job.priority, job.sender), self._loop
            )
            try:
                future.result(timeout=60)
            except RPCError as exc:
                if exc.status != RPCStatusCode.INVALID_ARGUMENT:
                    raise  # the server is down, restarting or busy: the loop retries
                # This request will never be taken: the job fails, the others go on
                # (they waited behind it for ever, the same request being retried).
                reason = f"Temporal refused the job's workflow: {scrub(exc.message)}"
                log.error("job %d: %s", job.id, reason)
                self.db.fail_dispatched_job(job.id, job.generation, 0, reason)
                continue
            self.db.mark_dispatched(job.id, job.generation)
            count += 1
        return count

    @staticmethod
    def _input_bytes(job: JobInput) -> int:
        """The size of ``job`` as the workflow's input payload: the client is connected
        with Temporal's default data converter (``temporal_client.connect``)."""
        payloads = DataConverter.default.payload_converter.to_payloads([job])
        return sum(p.ByteSize() for p in payloads)

    def _input(self, job: DispatchJob) -> JobInput | None:
        instances = self.db.run_instances(job.run_id)
        if not instances:
            self.db.fail_dispatched_job(
                job.id, job.generation, 0, f"run {job.run_id} has no stored instances"
            )
            return None
        storage = self.settings.storage_dir
        prior = self.db.prior_result_paths(job.run_id, job.pipeline, job.id)
        workers = self.settings.workers
        job_input = JobInput(
            job_id=job.id,
            generation=job.generation,
            run_id=job.run_id,
            pipeline=job.pipeline,
            study_uid=instances[0].study_uid,
            series_uid=instances[0].series_uid,
            instances=[
                InstanceRef(i.sop_instance_uid, relative(Path(i.path), storage)) for i in instances
            ],
            task_queue=self.engine.queue_for(job.pipeline),
            max_attempts=workers.max_attempts,
            backoff_base_s=workers.backoff_base_s,
            backoff_max_s=workers.backoff_max_s,
            heartbeat_timeout_s=self.engine.heartbeat_timeout_s,
            job_timeout_s=workers.job_timeout_s,
            job_timeout_max_s=workers.job_timeout_max_s,
            seconds_per_megapixel=workers.pipeline_seconds_per_megapixel.get(job.pipeline, 0.0),
            prior=list(dict.fromkeys(Path(p).stem for p in prior)),
            index_id=self.index_id,
            options=dict(workers.pipeline_options.get(job.pipeline, {})),
        )
        limit = self.engine.max_input_bytes
        if self._input_bytes(job_input) <= limit:
            return job_input
        # A run of many instances: its worker asks the node for the list instead.
        job_input = replace(job_input, instances=[], instances_at_node=True)
        size = self._input_bytes(job_input)
        if size > limit:
            self.db.fail_dispatched_job(
                job.id,
                job.generation,
                0,
                f"the job's workflow input is {size} bytes without the run's instances, past "
                f"engine.max_input_bytes ({limit}): its pipeline options are too large",
            )
            return None
        log.info(
            "job %d: the %d instances of run %s go by reference (the workflow input would "
            "pass engine.max_input_bytes); its worker asks the node for them",
            job.id,
            len(instances),
            job.run_id,
        )
        return job_input

    async def _start(self, job: JobInput, priority: int, sender: str) -> None:
        """Start the job's workflow; an older run's (``priority`` 1) with a lower
        Temporal priority than a live run's, which its activities inherit, so that
        on a busy task queue a live run's job is taken first there too. Its run's
        sender is the fairness key: a server with task queue fairness (Temporal
        1.29 or later, ``matching.enableFairness``) then takes the senders' jobs in
        turn, as the embedded engine does; one without it ignores the key."""
        assert self._client is not None
        wid = workflow_id(self.index_id, job.job_id, job.generation)
        try:
            await self._client.start_workflow(
                WORKFLOW,
                job,
                id=wid,
                task_queue=self.node_queue,
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
                request_eager_start=True,  # its first task straight to this node's worker
                priority=Priority(
                    priority_key=OLDER_PRIORITY if priority else LIVE_PRIORITY,
                    fairness_key=sender or None,
                ),
            )
            log.info(
                "job %d: %s on run %s -> workflow %s (queue %s)",
                job.job_id,
                job.pipeline,
                job.run_id,
                wid,
                job.task_queue,
            )
        except WorkflowAlreadyStartedError:
            log.info("job %d: workflow %s was already started", job.job_id, wid)

    # -- local activities of the job workflow: the outcome into the index --------------
    @activity.defn(name=RECORD_DONE)
    async def record_done(self, job: JobInput, report: JobReport) -> bool:
        return await asyncio.to_thread(self._record_done, job, report)

    @activity.defn(name=RECORD_FAILED)
    async def record_failed(self, job: JobInput, failure: JobFailure) -> bool:
        return await asyncio.to_thread(self._record_failed, job, failure)

    def _check_index(self, job: JobInput) -> None:
        if job.index_id and job.index_id != self.index_id:  # two nodes, one node_task_queue
            raise RuntimeError(
                f"job {job.job_id} belongs to index {job.index_id}, not this node's "
                f"{self.index_id}: give each node its own engine.node_task_queue"
            )

    def _record_done(self, job: JobInput, report: JobReport) -> bool:
        self._check_index(job)
        folder = self.results_dir / str(job.job_id)
        results = [
            ResultFile(
                folder / f"{r.sop_instance_uid}.dcm",
                r.sop_class_uid,
                r.sop_instance_uid,
                r.series_uid,
                r.description,
            )
            for r in report.results
        ]
        missing = [r.sop_instance_uid for r in results if not r.path.is_file()]
        if missing:
            failure = JobFailure(
                f"{len(missing)} of {len(results)} result object(s) the worker reported never "
                "reached the node",
                report.attempt,
            )
            return self._record_failed(job, failure)
        recorded = self.db.finish_dispatched_job(
            job.job_id, job.generation, report.attempt, report.worker, results, report.notes
        )
        wid = workflow_id(self.index_id, job.job_id, job.generation)
        if not recorded:
            log.warning(
                "job %d: workflow %s was superseded; its results are dropped", job.job_id, wid
            )
            return False
        self.db.record_timings(job.job_id, dict(report.timings))
        self.on_outcome(
            self._job(job, report.attempt, report.worker),
            Outcome(tuple(results), tuple(report.notes), timings=tuple(report.timings.items())),
        )
        log.info(
            "job %d done on %s (attempt %d, workflow %s): %d object(s)",
            job.job_id,
            report.worker,
            report.attempt,
            wid,
            len(results),
        )
        return True

    def _record_failed(self, job: JobInput, failure: JobFailure) -> bool:
        self._check_index(job)
        wid = workflow_id(self.index_id, job.job_id, job.generation)
        reason = f"{scrub(failure.reason)} [workflow {wid}]"
        if not self.db.fail_dispatched_job(job.job_id, job.generation, failure.attempts, reason):
            log.warning(
                "job %d: workflow %s was superseded; its failure is ignored", job.job_id, wid
            )
            return False
        self.on_outcome(self._job(job, failure.attempts, ""), Outcome(error=reason))
        log.error(
            "job %d (%s on run %s) failed after %d attempt(s): %s",
            job.job_id,
            job.pipeline,
            job.run_id,
            failure.attempts,
            reason,
        )
        return True

    @staticmethod
    def _job(job: JobInput, attempts: int, worker: str) -> Job:
        return Job(job.job_id, job.run_id, job.pipeline, [], False, attempts, worker)
