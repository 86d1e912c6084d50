"""The Temporal workflow of one job, and what the node and its workers pass each other.

One workflow per job (and per operator retry of it), started by the node with the
job's deterministic workflow ID, so a second start of the same job is refused by
the server. The workflow runs on the node's task queue; it sends one activity,
``process_job``, to the job's task queue, where a ``dicom-node worker`` fetches
the run, computes, hands the results back to the node and returns a
:class:`JobReport`. Temporal keeps the retries and their backoff; the activity's
heartbeat is the lease. Then a local activity of the node records the outcome in
the index (done with its deliveries, or failed with the reason), retried until
the node has it, and a failed job fails its workflow with the same reason.

This module runs inside Temporal's workflow sandbox: it must stay deterministic
and import nothing but the standard library and ``temporalio``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    RetryState,
    TimeoutError,
    TimeoutType,
    is_cancelled_exception,
)

WORKFLOW = "AngioJob"
PROCESS = "process_job"
RECORD_DONE = "record_done"
RECORD_FAILED = "record_failed"
# ApplicationError types a worker raises: a permanent one is not retried.
PERMANENT = "PermanentJobError"
TRANSIENT = "TransientJobError"
FAILED = "JobFailed"


def workflow_id(index_id: str, job_id: int, generation: int) -> str:
    """The job's deterministic workflow ID: the index, the job, the operator's retry."""
    base = f"angio-{index_id}-job-{job_id}"
    return f"{base}-r{generation}" if generation else base


@dataclass(frozen=True)
class InstanceRef:
    sop_instance_uid: str
    relpath: str  # below the node's storage_dir (for a worker that shares it)


@dataclass(frozen=True)
class JobInput:
    job_id: int
    generation: int
    run_id: str
    pipeline: str
    study_uid: str
    series_uid: str
    instances: list[InstanceRef]
    task_queue: str
    max_attempts: int
    backoff_base_s: float
    backoff_max_s: float
    heartbeat_timeout_s: float
    job_timeout_s: float
    # SOP Instance UIDs of results earlier jobs of this pipeline on this run delivered:
    # a result whose content changed names the series it supersedes
    prior: list[str] = field(default_factory=list)
    index_id: str = ""  # the node whose index holds the job (its local activities check)
    # The pipeline's options from the node's settings ([workers] pipeline_options):
    # site rules are the node's configuration, whichever worker runs the job.
    options: dict[str, Any] = field(default_factory=dict)
    # The time limit grows with the run ([workers] pipeline_seconds_per_megapixel of the
    # job's pipeline, at most job_timeout_max_s); 0 and 0: a fixed job_timeout_s, as a
    # workflow started before these fields existed had it.
    seconds_per_megapixel: float = 0.0
    job_timeout_max_s: float = 0.0
    # True: ``instances`` is empty, the run's list being too long for a workflow input
    # (engine.max_input_bytes); the worker asks the node for it (GET /worker/jobs/ID/instances)
    instances_at_node: bool = False

    def longest_s(self) -> float:
        """The time limit of an attempt on the largest run (a worker's limit grows with
        the run up to it)."""
        if self.seconds_per_megapixel <= 0:
            return self.job_timeout_s
        return max(self.job_timeout_s, self.job_timeout_max_s)


@dataclass(frozen=True)
class ResultRef:
    sop_instance_uid: str
    sop_class_uid: str
    series_uid: str
    description: str


@dataclass(frozen=True)
class JobReport:
    """What a worker made of one attempt; the files themselves went to the node."""

    results: list[ResultRef]
    notes: list[str]
    timings: dict[str, float]
    attempt: int
    worker: str


@dataclass(frozen=True)
class JobFailure:
    reason: str
    attempts: int


def activity_start_to_close(job: JobInput) -> timedelta:
    """The compute limit for the largest run plus time to fetch the run and return the
    results (a worker waits for a node that is down up to its own limit, heartbeating
    meanwhile; a worker that is lost is found by its heartbeat, not by this)."""
    return timedelta(seconds=2 * job.longest_s() + 600)


def describe(exc: ActivityError, job: JobInput) -> JobFailure:
    """The reason and attempt count of a job whose activity failed for good."""
    cause = exc.cause
    exhausted = exc.retry_state == RetryState.MAXIMUM_ATTEMPTS_REACHED
    attempts = job.max_attempts if exhausted else 1
    if isinstance(cause, ApplicationError):
        reason = cause.message
        if cause.details and isinstance(cause.details[0], int):
            attempts = cause.details[0]
    elif isinstance(cause, TimeoutError) and cause.type == TimeoutType.HEARTBEAT:
        reason = f"worker lost (no heartbeat for {job.heartbeat_timeout_s:g} s)"
    elif isinstance(cause, TimeoutError):
        reason = f"activity timed out ({cause.type.name if cause.type else 'timeout'})"
    else:
        reason = str(cause or exc)
    if exhausted:
        reason = f"{reason} (attempt {job.max_attempts} of {job.max_attempts})"
    return JobFailure(reason, attempts)


_RECORD_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=30)
)


@workflow.defn(name=WORKFLOW)
class JobWorkflow:
    @workflow.run
    async def run(self, job: JobInput) -> JobReport:
        try:
            report = await workflow.execute_activity(
                PROCESS,
                job,
                result_type=JobReport,
                task_queue=job.task_queue,
                start_to_close_timeout=activity_start_to_close(job),
                heartbeat_timeout=timedelta(seconds=job.heartbeat_timeout_s),
                retry_policy=RetryPolicy(
                    initial_interval=timedelta(seconds=job.backoff_base_s),
                    backoff_coefficient=2.0,
                    maximum_interval=timedelta(seconds=job.backoff_max_s),
                    maximum_attempts=job.max_attempts,
                    non_retryable_error_types=[PERMANENT],
                ),
            )
        except ActivityError as exc:
            if is_cancelled_exception(exc):
                raise  # an operator cancelled the job: the index says so already
            failure = describe(exc, job)
            await workflow.execute_local_activity(
                RECORD_FAILED,
                args=[job, failure],
                result_type=bool,
                start_to_close_timeout=timedelta(seconds=60),
                retry_policy=_RECORD_RETRY,
            )
            raise ApplicationError(failure.reason, type=FAILED, non_retryable=True) from None
        await workflow.execute_local_activity(
            RECORD_DONE,
            args=[job, report],
            result_type=bool,
            start_to_close_timeout=timedelta(seconds=60),
            retry_policy=_RECORD_RETRY,
        )
        return report
