"""A full disk, told apart from a defect, and the reserve that lets the node out of one.

The index (SQLite) cannot commit on a full disk, and every loop of the node writes to
it: a worker recording a job's outcome, the router, the outbox, the completion sweep,
and retention, whose first step is to claim a run before deleting its files. Met as a
defect, a full disk logged a traceback at every poll of every loop, lost the outcome
of the job that was running, and held retention back, so that a disk filled by
results or by another program stayed full until an operator freed space by hand.

- :func:`is_disk_full` tells the condition from a defect (SQLITE_FULL, ENOSPC, EDQUOT).
- :class:`Waiting` logs it once when a loop meets it and once when it clears.
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
import time
from pathlib import Path

log = logging.getLogger(__name__)

WAIT_S = 2.0  # how long a loop waits before it tries again on a full disk, at first
WAIT_MAX_S = 60.0  # ... doubled at each try, up to this


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` says the disk (or the user's quota) is full."""
    if isinstance(exc, sqlite3.OperationalError):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


class Waiting:
    """One loop's view of a full disk: logged once when met and once when it clears
    (not a traceback at every poll)."""

    def __init__(self, loop: str) -> None:
        self.loop = loop
        self.since: float | None = None
        self.tries = 0

    @property
    def delay_s(self) -> float:
        """How long to wait before the next try: doubled at each try on a full disk."""
        return min(WAIT_S * 2 ** max(self.tries - 1, 0), WAIT_MAX_S)

    def met(self, exc: BaseException) -> bool:
        """True, and noted, when ``exc`` is a full disk; False for anything else."""
        if not is_disk_full(exc):
            return False
        self.noted(type(exc).__name__)
        return True

    def noted(self, what: str) -> None:
        """The loop met a full disk (``what`` says how)."""
        self.tries += 1
        if self.since is None:
            self.since = time.monotonic()
            log.warning(
                "%s: the disk holding the node's storage is full (%s): waiting for space "
                "(retention frees it from processed runs; see [retention])",
                self.loop,
                what,
            )

    def passed(self) -> None:
        """The loop wrote again: the disk has room."""
        if self.since is not None:
            log.warning(
                "%s: space again after %.0f s; going on",
                self.loop,
                time.monotonic() - self.since,
            )
            self.since = None
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
