"""The node's index: instances, runs, jobs and the outbox, in SQLite (WAL).

One connection per thread; writes that claim work use ``BEGIN IMMEDIATE`` so
two workers never take the same job or outbox row.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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
    state        TEXT NOT NULL,          -- receiving | complete | routed | unrouted
    first_at     REAL NOT NULL,
    last_at      REAL NOT NULL,
    completed_at REAL,
    rule         TEXT,
    reason       TEXT
);
CREATE INDEX IF NOT EXISTS runs_state ON runs(state, last_at);

CREATE TABLE IF NOT EXISTS jobs (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id       TEXT NOT NULL,
    pipeline     TEXT NOT NULL,
    destinations TEXT NOT NULL,          -- JSON list of destination names
    state        TEXT NOT NULL,          -- queued | running | done | failed
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
    state            TEXT NOT NULL,      -- pending | sent | failed
    attempts         INTEGER NOT NULL DEFAULT 0,
    not_before       REAL NOT NULL,
    error            TEXT,
    created_at       REAL NOT NULL,
    sent_at          REAL,
    UNIQUE (destination, sop_instance_uid)
);
CREATE INDEX IF NOT EXISTS outbox_state ON outbox(state, not_before);
"""


class Database:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self.connect() as con:
            con.execute("PRAGMA journal_mode=WAL")
            con.executescript(SCHEMA)

    def connect(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(
                self.path, timeout=60, isolation_level=None, check_same_thread=True
            )
            con.row_factory = sqlite3.Row
            con.execute("PRAGMA synchronous=FULL")  # the index is as durable as the files
            con.execute("PRAGMA busy_timeout=60000")
            self._local.con = con
        return con

    @contextmanager
    def transaction(self, immediate: bool = True) -> Iterator[sqlite3.Connection]:
        con = self.connect()
        con.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
        try:
            yield con
        except BaseException:
            con.execute("ROLLBACK")
            raise
        else:
            con.execute("COMMIT")

    def query(self, sql: str, params: tuple | dict = ()) -> list[sqlite3.Row]:  # type: ignore[type-arg]
        return self.connect().execute(sql, params).fetchall()

    def close(self) -> None:
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
            self._local.con = None


def now() -> float:
    return time.time()
