"""A full or failing disk, told apart from a defect, and the reserve that lets the node
out of a full one.

The index (SQLite) cannot commit on a full disk, and every loop of the node writes to
it: a worker recording a job's outcome, the router, the outbox, the completion sweep,
and retention, whose first step is to claim a run before deleting its files. Met as a
defect, a full disk logged a traceback at every poll of every loop, lost the outcome
of the job that was running, and held retention back, so that a disk filled by
results or by another program stayed full until an operator freed space by hand.

- :func:`storage_fault` tells the condition from a defect: full (SQLITE_FULL, ENOSPC,
  EDQUOT), read-only (SQLITE_READONLY, EROFS: ext4 remounts itself read-only after an
  I/O error, ``errors=remount-ro``, Debian's default) or failing (SQLITE_IOERR, EIO).
  The node cannot repair a read-only or failing disk; it must not drown the reason in
  a traceback at every poll either (each loop's, and the audit trail's, one a line).
  A damaged index (SQLITE_CORRUPT, SQLITE_NOTADB) is met the same way; ``dicom-node
  rebuild-index`` makes a new one from the spool (``dicom_node.service``).
- :class:`Waiting` logs it once when a loop meets it and once when it clears.
- :class:`StorageProbe` answers ``/health``: whether the node can store now.
- :class:`Reserve` is a file of ``[retention] reserve_bytes`` the node keeps next to
  its index; retention deletes it when the index cannot commit a purge, so that the
  purge can go on, and writes it again once there is room.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import sqlite3
import threading
import time
import weakref
from pathlib import Path

log = logging.getLogger(__name__)

WAIT_S = 2.0  # how long a loop waits before it tries again on a full or failing disk
WAIT_MAX_S = 60.0  # ... doubled at each try, up to this


FULL, READ_ONLY, FAILING, DAMAGED = "full", "read-only", "failing", "damaged"
_SQLITE = {
    sqlite3.SQLITE_FULL: FULL,
    sqlite3.SQLITE_READONLY: READ_ONLY,
    sqlite3.SQLITE_IOERR: FAILING,
    sqlite3.SQLITE_CORRUPT: DAMAGED,  # the index: a disk that lied about a sync, a bad block
    sqlite3.SQLITE_NOTADB: DAMAGED,
}
REBUILD = "stop the node and run `dicom-node rebuild-index` (docs/deployment.md)"
_ERRNO = {errno.ENOSPC: FULL, errno.EDQUOT: FULL, errno.EROFS: READ_ONLY, errno.EIO: FAILING}


def storage_fault(exc: BaseException) -> str | None:
    """What ``exc`` says of the disk: ``FULL`` (or the user's quota), ``READ_ONLY``,
    ``FAILING`` (an I/O error), ``DAMAGED`` (the index); None when it says nothing of
    the disk."""
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        # extended codes (SQLITE_IOERR_WRITE, SQLITE_READONLY_DBMOVED) keep the primary in the low byte
        return None if code is None else _SQLITE.get(code & 0xFF)
    return _ERRNO.get(exc.errno or 0) if isinstance(exc, OSError) else None


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` says the disk (or the user's quota) is full."""
    return storage_fault(exc) == FULL


def describe(fault: str) -> str:
    """A storage fault in words, for logs and answers."""
    if fault == FULL:
        return "the disk holding the node's storage is full"
    if fault == DAMAGED:
        return f"the node's index is damaged: {REBUILD}"
    return f"the node's storage cannot be written (the disk is {fault})"


_WAITING: weakref.WeakSet[Waiting] = weakref.WeakSet()


def faults_met(scope: object) -> list[str]:
    """What the loops of ``scope`` (a node's index) wait on now, but a full disk (the
    probe sees that itself): a damaged index is met only by the loops that read it."""
    return [
        f"{w.loop}: {describe(w.fault)}"
        for w in list(_WAITING)
        if w.scope is scope and w.fault not in (None, FULL)
    ]


def backoff_s(tries: int) -> float:
    """The wait after ``tries`` tries met a full or failing disk: ``WAIT_S``, doubled at
    each try, at most ``WAIT_MAX_S`` (the node's loops, a scale-out worker's attempt)."""
    return float(min(WAIT_S * 2 ** max(tries - 1, 0), WAIT_MAX_S))


class Waiting:
    """One loop's view of a full or failing disk: logged once when met, again when it
    turns from one to the other, and once when it clears (not a traceback at every
    poll). ``scope`` (the node's index) groups a node's loops for ``faults_met``."""

    def __init__(self, loop: str, scope: object = None) -> None:
        self.loop = loop
        self.scope = scope
        self.since: float | None = None
        self.fault: str | None = None
        self.tries = 0
        _WAITING.add(self)

    @property
    def delay_s(self) -> float:
        """How long to wait before the next try: doubled at each try on a full disk."""
        return backoff_s(self.tries)

    def met(self, exc: BaseException) -> bool:
        """True, and noted, when ``exc`` is a full or failing disk; False for anything else."""
        fault = storage_fault(exc)
        if fault is None:
            return False
        self.noted(f"{type(exc).__name__}: {exc}", fault)
        return True

    def noted(self, what: str, fault: str = FULL) -> None:
        """The loop met a full or failing disk (``what`` says how)."""
        self.tries += 1
        if self.since is None:
            self.since = time.monotonic()
        if fault == self.fault:
            return
        self.fault = fault
        if fault == FULL:
            log.warning(
                "%s: %s (%s): waiting for space "
                "(retention frees it from processed runs; see [retention])",
                self.loop,
                describe(fault),
                what,
            )
        else:
            log.error(
                "%s: %s (%s): waiting; it needs an operator (docs/deployment.md)",
                self.loop,
                describe(fault),
                what,
            )

    def passed(self) -> None:
        """The loop wrote again: the disk has room and takes writes."""
        if self.since is not None:
            log.warning(
                "%s: %s after %.0f s; going on",
                self.loop,
                "space again" if self.fault == FULL else "the storage takes writes again",
                time.monotonic() - self.since,
            )
            self.since = None
            self.fault = None
        self.tries = 0


class Reserve:
    """A file of ``size`` bytes next to the index, deleted to give the index room to
    commit a purge when the disk is full, and written again once the disk has room
    for it and ``floor`` more bytes."""

    NAME = "reserve"

    def __init__(self, folder: Path, size: int, floor: int) -> None:
        self.path = folder / self.NAME
        self.size = size
        self.floor = floor

    def keep(self) -> None:
        """Write the reserve when it is missing (or short) and there is room for it."""
        if self.size <= 0:
            return
        with contextlib.suppress(FileNotFoundError):
            if self.path.stat().st_size >= self.size:
                return
        if shutil.disk_usage(self.path.parent).free < self.size + self.floor:
            return
        tmp = self.path.with_suffix(".part")
        try:
            with open(tmp, "wb") as f:
                # posix_fallocate takes the blocks now; a sparse file would free nothing
                os.posix_fallocate(f.fileno(), 0, self.size)
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            log.info("storage reserve of %d MiB written", self.size // 2**20)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            log.warning("storage reserve not written: %s", exc)

    def release(self) -> bool:
        """The reserve deleted; True when there was one to delete."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            return False
        except OSError as exc:  # not a file of the node's (a folder in its place)
            log.warning("storage reserve cannot be deleted: %s", exc)
            return False
        log.warning(
            "the disk is full: the storage reserve (%d MiB) was deleted so that retention "
            "can purge processed runs",
            self.size // 2**20,
        )
        return True


def write_fails(folder: Path) -> OSError | None:
    """The error a small file written and synced in ``folder`` meets, or None."""
    path = folder / ".storage-probe"
    try:
        with open(path, "wb") as f:
            f.write(b"probe")
            f.flush()
            os.fsync(f.fileno())
        path.unlink()
    except OSError as exc:
        return exc
    return None


def explain(exc: OSError, folder: Path) -> str:
    """Why ``folder`` cannot be written, in words (``exc`` from :func:`write_fails`)."""
    fault = storage_fault(exc)
    what = describe(fault) if fault is not None else "the node's storage cannot be written"
    return f"{what}: {folder}: {exc.strerror or exc}"


class StorageProbe:
    """Whether the node can store what it receives now: room over ``min_free_bytes``
    and a small file written and synced in ``folder`` (the spool's ``tmp/``). Asked by
    ``/health``, which needs no token, so it writes at most once every ``every_s``."""

    def __init__(
        self, folder: Path, min_free_bytes: int, scope: object = None, every_s: float = 5.0
    ) -> None:
        self.folder = folder
        self.min_free_bytes = min_free_bytes
        self.scope = scope
        self.every_s = every_s
        self._lock = threading.Lock()
        self._at: float | None = None
        self._problem: str | None = None

    def problem(self) -> str | None:
        """Why the node cannot store now, or None: the probe's answer, or a fault one of
        the node's loops waits on (a damaged index)."""
        with self._lock:
            if self._at is None or time.monotonic() - self._at >= self.every_s:
                self._problem = self._probe()
                self._at = time.monotonic()
            if self._problem is None and self.scope is not None:
                met = faults_met(self.scope)
                return met[0] if met else None
            return self._problem

    def _probe(self) -> str | None:
        try:
            free = shutil.disk_usage(self.folder).free
        except OSError as exc:
            return f"the node's storage cannot be read: {self.folder}: {exc.strerror or exc}"
        failed = write_fails(self.folder)
        if failed is not None:
            return explain(failed, self.folder)
        if free < self.min_free_bytes:
            return f"only {free // 2**20} MiB free, under min_free_bytes"
        return None
