"""The node's index and the one owner of its state machines (SQLite, WAL).

Nobody else writes SQL. Run, job and delivery states are enums; every
transition is a method that checks the state it leaves, and a state change
commits together with its consequences (a run routed and its jobs created; a
job done and its deliveries queued)::

    run       receiving -> complete -> routed | unrouted | unroutable; receiving |
              complete -> unrouted (an operator's cancel)
              (a new instance re-opens a run; reprocess: any settled state -> complete)
    job       queued -> running -> done | failed, running -> queued (retry, lost lease),
              failed -> queued (an operator's retry), queued | running -> failed
              (an operator's cancel)
              with Temporal: queued (dispatched_at set: its workflow started) -> running
              (a worker took an attempt) -> done | failed; the workflow's generation must
              match, so a superseded workflow cannot record (``*_dispatched_job``)
    delivery  pending -> sent | failed (also an operator's cancel), failed -> pending
              (resend)
    commitment pending -> reported | given_up; a request its sender repeats -> pending
    retention a processed run is purged (``purged_at``): its files, instance and
              delivery rows go, its run and job rows stay; a new instance re-opens it

One connection per thread; writes use ``BEGIN IMMEDIATE`` so two workers never
take the same job or delivery.
"""

from __future__ import annotations

from dicom_node.db.commitments import Commitments, DuplicateTransaction, TooManyListed
from dicom_node.db.core import Core
from dicom_node.db.deliveries import Deliveries
from dicom_node.db.jobs import Cancelled, Jobs
from dicom_node.db.records import (
    SETTLED_RUN_STATES,
    Commitment,
    CommitmentState,
    Delivery,
    DeliveryState,
    DispatchJob,
    InstanceConflict,
    InstanceRecord,
    Job,
    JobState,
    Recorded,
    ResultFile,
    RunState,
    StateError,
    now,
)
from dicom_node.db.reports import Reports
from dicom_node.db.retention import Purge, Retention
from dicom_node.db.runs import Runs
from dicom_node.db.schema import SCHEMA_VERSION

__all__ = [
    "SCHEMA_VERSION",
    "SETTLED_RUN_STATES",
    "Cancelled",
    "Commitment",
    "CommitmentState",
    "Core",
    "Database",
    "Delivery",
    "DeliveryState",
    "DispatchJob",
    "DuplicateTransaction",
    "InstanceConflict",
    "InstanceRecord",
    "Job",
    "JobState",
    "Purge",
    "Recorded",
    "ResultFile",
    "RunState",
    "StateError",
    "TooManyListed",
    "now",
]


class Database(Runs, Jobs, Deliveries, Commitments, Reports, Retention):
    """The index: every part over one connection per thread."""
