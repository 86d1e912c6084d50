"""States, records and small helpers shared by the index's parts."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path


class RunState(StrEnum):
    RECEIVING = "receiving"
    COMPLETE = "complete"
    ROUTED = "routed"
    UNROUTED = "unrouted"  # no rule matched: stored, reported, nothing to do
    UNROUTABLE = "unroutable"  # its header could not be read for routing


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class DeliveryState(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"


class CommitmentState(StrEnum):
    PENDING = "pending"  # its result not yet taken by the requester
    REPORTED = "reported"
    GIVEN_UP = "given_up"  # not taken within storage_commitment.give_up_h


@dataclass(frozen=True)
class Commitment:
    """A storage commitment request and what the node found held when it came."""

    transaction_uid: str
    calling_aet: str
    requested_at: float
    committed: list[tuple[str, str]]  # (SOP Class UID, SOP Instance UID)
    failed: list[tuple[str, str, int]]  # and the Failure Reason (PS3.4 J.3.3.1.1.2)
    attempts: int


SETTLED_RUN_STATES = (RunState.ROUTED, RunState.UNROUTED, RunState.UNROUTABLE)


class StateError(Exception):
    """A transition from a state it does not leave (a bug, never input)."""


class InstanceConflict(Exception):
    """An instance the index cannot take without taking it from another series or
    study: its SOP Instance UID is held by another series, study or run, or its
    series by another study."""


@dataclass(frozen=True)
class InstanceRecord:
    sop_instance_uid: str
    sop_class_uid: str
    series_uid: str
    study_uid: str
    run_id: str
    path: Path
    size: int
    transfer_syntax: str
    frames: int
    calling_aet: str
    sender: str = ""  # whom a forwarder named (settings.forwarders); "": the calling AE


# The sender of an instance or run row (``{0}``: the table's alias), for the turns and
# the disk's reserve: whom a forwarder named, else the calling AE (rows indexed before
# the column have none)
SENDER = "COALESCE({0}.sender, {0}.calling_aet)"


@dataclass(frozen=True)
class Recorded:
    """What indexing one instance did to its run."""

    run_id: str
    duplicate: bool


@dataclass(frozen=True)
class Job:
    id: int
    run_id: str
    pipeline: str
    destinations: list[str]
    resend: bool
    attempts: int
    worker: str


@dataclass(frozen=True)
class DispatchJob:
    """A queued job to hand to an external engine (one Temporal workflow per generation)."""

    id: int
    run_id: str
    pipeline: str
    generation: int
    priority: int = 0  # 0: a live run's job; 1: an older run's (``jobs.priority``)
    sender: str = ""  # its run's calling AE (or STOW-RS source): Temporal's fairness key


@dataclass(frozen=True)
class Delivered:
    """A result delivered to a destination (``Database.delivered_results``)."""

    job_id: int
    sop_class_uid: str
    sop_instance_uid: str
    series_uid: str


@dataclass(frozen=True)
class ResultFile:
    """One object a job wrote, to be delivered."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    series_uid: str
    description: str


@dataclass(frozen=True)
class Delivery:
    id: int
    destination: str
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    attempts: int


def now() -> float:
    return time.time()


def instance_record(r: sqlite3.Row) -> InstanceRecord:
    return InstanceRecord(
        r["sop_instance_uid"],
        r["sop_class_uid"],
        r["series_uid"],
        r["study_uid"],
        r["run_id"],
        Path(r["path"]),
        r["size"],
        r["transfer_syntax"],
        r["frames"],
        r["calling_aet"],
        r["sender"] or r["calling_aet"],
    )


def lost_reason(attempts: int, last_error: str | None) -> str:
    why = f"worker lost {attempts} time(s) while running this job (node killed or restarted)"
    return f"{why}; last error: {last_error}" if last_error else why


def one_or_none_of(column: str, value: str | None, others: Sequence[str]) -> tuple[str, list[str]]:
    """A WHERE condition and its parameters: ``column`` is ``value`` when given, else
    none of ``others``."""
    if value is not None:
        return f"{column} = ?", [value]
    return f"{column} NOT IN ({','.join('?' * len(others))})", list(others)
