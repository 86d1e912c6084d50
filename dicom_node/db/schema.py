"""The index's tables and the columns added since schema 1."""

from __future__ import annotations

SCHEMA_VERSION = 2

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    sop_class_uid    TEXT NOT NULL,
    series_uid       TEXT NOT NULL,
    study_uid        TEXT NOT NULL,
    run_id           TEXT NOT NULL,
    path             TEXT NOT NULL,
    size             INTEGER NOT NULL,
    transfer_syntax  TEXT NOT NULL,
    frames           INTEGER NOT NULL,
    calling_aet      TEXT NOT NULL,
    received_at      REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_run ON instances(run_id);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_uid);
CREATE INDEX IF NOT EXISTS instances_study ON instances(study_uid);

-- A run is one multi-frame 2D instance, or one multi-instance series.
CREATE TABLE IF NOT EXISTS runs (
    run_id       TEXT PRIMARY KEY,
    series_uid   TEXT NOT NULL,
    study_uid    TEXT NOT NULL,
    calling_aet  TEXT NOT NULL,
    state        TEXT NOT NULL,
    first_at     REAL NOT NULL,
    last_at      REAL NOT NULL,
    completed_at REAL,
    rule         TEXT,
    reason       TEXT,
    resend       INTEGER NOT NULL DEFAULT 0  -- the next routing sends results again
);
CREATE INDEX IF NOT EXISTS runs_state ON runs(state, last_at);

CREATE TABLE IF NOT EXISTS jobs (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id       TEXT NOT NULL,
    pipeline     TEXT NOT NULL,
    destinations TEXT NOT NULL,          -- JSON list of destination names
    resend       INTEGER NOT NULL DEFAULT 0,
    state        TEXT NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    not_before   REAL NOT NULL,
    lease_until  REAL,
    worker       TEXT,
    error        TEXT,
    notes        TEXT,
    created_at   REAL NOT NULL,
    updated_at   REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, not_before);
CREATE INDEX IF NOT EXISTS jobs_run ON jobs(run_id);

CREATE TABLE IF NOT EXISTS outbox (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id           INTEGER NOT NULL,
    destination      TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    sop_class_uid    TEXT NOT NULL,
    series_uid       TEXT NOT NULL,
    path             TEXT NOT NULL,
    state            TEXT NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    not_before       REAL NOT NULL,
    error            TEXT,
    created_at       REAL NOT NULL,
    sent_at          REAL,
    UNIQUE (destination, sop_instance_uid)
);
CREATE INDEX IF NOT EXISTS outbox_state ON outbox(state, not_before);

-- whose turn it is: the jobs of the sender (calling AE, or whom a forwarder names) served longest ago are
-- taken first, so that one sender's burst does not hold up the others' runs
CREATE TABLE IF NOT EXISTS sender_turns (
    calling_aet TEXT PRIMARY KEY,
    turn        INTEGER NOT NULL  -- the n-th job taken on the node, counted over all
);

-- storage commitment requests (PS3.4 J): what was found held when each came, and
-- whether its result (an N-EVENT-REPORT to the requester's address) was taken
CREATE TABLE IF NOT EXISTS commitments (
    transaction_uid TEXT PRIMARY KEY,
    calling_aet     TEXT NOT NULL,
    requested_at    REAL NOT NULL,
    committed       TEXT NOT NULL,  -- JSON [[SOP Class UID, SOP Instance UID], ...]
    failed          TEXT NOT NULL,  -- JSON [[SOP Class UID, SOP Instance UID, reason], ...]
    listed          INTEGER NOT NULL,  -- how many instances it lists
    state           TEXT NOT NULL,  -- pending | reported | given_up
    attempts        INTEGER NOT NULL DEFAULT 0,
    not_before      REAL NOT NULL,
    error           TEXT,
    reported_at     REAL
);
CREATE INDEX IF NOT EXISTS commitments_state ON commitments(state, not_before);
CREATE INDEX IF NOT EXISTS commitments_sender ON commitments(calling_aet, requested_at);

-- the node's results a destination rejected (IHE IOCM rejection notes listing them: a
-- radiologist's verdict on an AI result), kept as feedback for the pipeline and model
CREATE TABLE IF NOT EXISTS result_rejections (
    sop_instance_uid TEXT NOT NULL,
    note_uid         TEXT NOT NULL,   -- the rejection note's SOP Instance UID
    job_id           INTEGER NOT NULL,
    pipeline         TEXT NOT NULL,
    destination      TEXT NOT NULL,
    code             TEXT NOT NULL,   -- the note's title (PS3.16 CID 7011)
    meaning          TEXT NOT NULL,
    at               REAL NOT NULL,
    UNIQUE (sop_instance_uid, note_uid)
);

-- index_id: this index's identity, part of every Temporal workflow ID it starts
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

# Indexes on columns added since: made once the columns are there.
POST_MIGRATION = """
CREATE INDEX IF NOT EXISTS outbox_commitment ON outbox(commitment, destination);
CREATE INDEX IF NOT EXISTS outbox_commit_uid ON outbox(commit_uid);
"""

# Columns added after the first release (schema 1 had none of them).
_MIGRATIONS = {
    "instances": [
        # whom it is from when a forwarder (settings.forwarders) named another sender
        # than itself; None: the calling AE
        ("sender", "TEXT"),
    ],
    "runs": [
        ("sender", "TEXT"),  # its first instance's sender (None: the calling AE)
        # a rejection note (IHE IOCM) listed one of its instances: why it is never
        # processed again (dicom_node.rejection)
        ("rejected", "TEXT"),
        ("resend", "INTEGER NOT NULL DEFAULT 0"),
        # its received files and results were deleted (retention); rows are kept
        ("purged_at", "REAL"),
        # when it last began receiving (created, or re-opened by a new instance); None:
        # indexed before the column, read as first_at
        ("opened_at", "REAL"),
    ],
    "jobs": [
        ("resend", "INTEGER NOT NULL DEFAULT 0"),
        ("timings", "TEXT"),
        # Temporal: the n-th workflow of this job (an operator's retry starts a new one)
        ("generation", "INTEGER NOT NULL DEFAULT 0"),
        ("dispatched_at", "REAL"),  # its workflow was started (None: embedded, or not yet)
        # 0: a live run's job; 1: an older run's (acquired before workers.live_window_h),
        # taken only when no live job is due
        ("priority", "INTEGER NOT NULL DEFAULT 0"),
    ],
    "outbox": [
        # times the destination ended the association (or answered HTTP 500) with this
        # object in flight and stored another object before the next such end; the last
        ("aborts", "INTEGER NOT NULL DEFAULT 0"),
        ("aborted_at", "REAL"),
        # storage commitment of a result sent to a destination that commits (its
        # storage_commitment setting): None (none asked of it) -> awaiting -> committed
        # | given_up; a result it did not commit to is sent again (pending)
        ("commitment", "TEXT"),
        ("commit_uid", "TEXT"),  # the Transaction UID it was last asked under
        ("commit_not_before", "REAL"),  # when to ask (again)
        ("commit_failures", "INTEGER NOT NULL DEFAULT 0"),
    ],
}
