"""The node: wires receive -> spool -> complete -> route -> job -> pipeline -> encode -> send.

Each stage only hands work to the next through the index: the C-STORE handler
and STOW-RS persist (``ingest``), the sweep and triggers complete runs, the
router routes complete runs, workers run jobs in worker processes, the outbox
delivers. At start, what a crash left behind is repaired first: partial files
removed, unindexed spool files indexed or quarantined, jobs of the dead process
re-queued (or failed after their last attempt), complete runs routed.

A damaged index (a disk that lied about a sync) stops the start with what to do:
``rebuild_index`` (``dicom-node rebuild-index``) makes a new one from the spool.
"""

from __future__ import annotations

import fcntl
import logging
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node import __version__, completion, logsafe
from dicom_node.api import start_api
from dicom_node.audit import AuditTrail
from dicom_node.auth import Authenticator, load_tokens
from dicom_node.commitment import ResultCommitment, StorageCommitment
from dicom_node.db import Database, Delivery, now
from dicom_node.diskfull import (
    DAMAGED,
    FULL,
    REBUILD,
    Reserve,
    StorageProbe,
    explain,
    is_disk_full,
    storage_fault,
    write_fails,
)
from dicom_node.engine import EmbeddedEngine, make_engine
from dicom_node.errors import ConfigError, StorageError
from dicom_node.ingest import Ingest, Receipt
from dicom_node.metrics import Metrics
from dicom_node.outbox import Outbox
from dicom_node.rejection import Rejections
from dicom_node.retention import Retention
from dicom_node.router import Router
from dicom_node.scp import MAX_PDU_BYTES, read_seconds, start_scp
from dicom_node.settings import DimseDestination, Settings
from dicom_node.spool import Spool
from dicom_node.tls import CertificateExpiry, client_context, server_context

log = logging.getLogger(__name__)
# A file in the spool's tmp/ not written for this long (at least) is left from a
# transfer that ended before its last byte; see Node.tmp_max_age_s.
TMP_MIN_AGE_S = 600.0


def _damaged(path: Path, exc: BaseException) -> StorageError | None:
    """A damaged index as a StorageError that says what to do; None for anything else."""
    if storage_fault(exc) != DAMAGED:
        return None
    return StorageError(f"the index {path} is damaged ({exc}): {REBUILD}")


@contextmanager
def damage_explained(path: Path) -> Iterator[None]:
    """A damaged index met within: a StorageError that says what to do (not SQLite's
    "database disk image is malformed" in a traceback)."""
    try:
        yield
    except sqlite3.DatabaseError as exc:
        if (damaged := _damaged(path, exc)) is not None:
            raise damaged from None
        raise


def open_index(path: Path) -> Database:
    """The index; a damaged one refused with what to do."""
    with damage_explained(path):
        return Database(path)


class StorageLock:
    """``storage_dir/node.lock``, held (flock) while a node uses its storage: a second
    node on the same folder, or ``dicom-node rebuild-index`` under a running node, is
    refused. The kernel lets go of it when the process ends, a crash included."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "node.lock"
        self._file: Any = None

    def acquire(self) -> None:
        if not self.path.parent.is_dir():
            raise StorageError(f"no node storage at {self.path.parent} (storage_dir)")
        try:
            handle = open(self.path, "a")  # noqa: SIM115 - held until release
        except OSError as exc:
            raise StorageError(f"cannot open {self.path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise StorageError(
                f"{self.path.parent} is in use by a running node (it holds {self.path.name})"
            ) from None
        self._file = handle

    def release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def rebuild_index(settings: Settings) -> tuple[Path, int, int]:
    """A new index from the spool, for one that is damaged: the index and ``results/``
    (results of jobs the new index will not know) are set aside in
    ``storage_dir/damaged-<UTC time>/``, and every file in the spool is indexed again
    (``Spool.recover``: a file that fails the checks is quarantined). The node then
    completes those runs after their quiet period and processes them again; their
    results carry the same UIDs (they follow the content), so a destination that has
    them already keeps one copy. Returns (the folder set aside, files indexed, files
    quarantined)."""
    lock = StorageLock(settings.storage_dir)
    lock.acquire()
    try:
        aside = settings.storage_dir / time.strftime("damaged-%Y%m%dT%H%M%SZ", time.gmtime())
        aside.mkdir()
        db_path = settings.db_path
        for part in (db_path, *(db_path.with_name(db_path.name + s) for s in ("-wal", "-shm"))):
            if part.exists():
                part.rename(aside / part.name)
        results = settings.storage_dir / "results"
        if results.exists():
            results.rename(aside / "results")
        db = Database(db_path)
        spool = Spool(
            settings.storage_dir,
            db,
            settings.limits,
            settings.min_free_bytes,
            settings.max_uid_length,
            settings.sender_reserve_share,
        )
        _, indexed, quarantined = spool.recover()
        return aside, indexed, quarantined
    finally:
        lock.release()


# What the node keeps in storage_dir, and which are folders.
_FOLDERS = ("spool", "tmp", "quarantine", "results", "audit")
_FILES = ("node.sqlite", "node.lock", "reserve")


def _check_layout(storage_dir: Path) -> None:
    """A file where the node keeps a folder, or a folder where it keeps a file (moved
    there by hand, a restore gone wrong) stops the start with the path and what to do:
    it was a traceback (``FileExistsError``, ``IsADirectoryError``), and a file in place
    of ``results/`` let the node start and fail every job."""
    wrong = [
        f"{path} is not a folder"
        for path in (storage_dir / n for n in _FOLDERS)
        if path.exists() and not path.is_dir()
    ] + [f"{storage_dir / n} is a folder" for n in _FILES if (storage_dir / n).is_dir()]
    if wrong:
        raise StorageError(
            "; ".join(wrong) + ": the node keeps its own there (docs/architecture.md, "
            "storage layout): move it away"
        )


def _cannot_listen(what: str, host: str, port: int, settings: str, exc: OSError) -> str:
    return (
        f"cannot listen for {what} on {host}:{port}: {exc.strerror or exc} (another program "
        f"listens there, or the address is not this machine's; settings: {settings})"
    )


class Node:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        try:
            settings.storage_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(
                f"storage_dir {settings.storage_dir}: {exc.strerror or exc}"
            ) from None
        _check_layout(settings.storage_dir)
        # a read-only or failing disk: the reason, not SQLite's "unable to open database
        # file" in a traceback (a full one is not a reason not to start: retention frees it)
        failed = write_fails(settings.storage_dir)
        if failed is not None and storage_fault(failed) != FULL:
            raise StorageError(explain(failed, settings.storage_dir))
        self.db = open_index(settings.db_path)
        self.spool = Spool(
            settings.storage_dir,
            self.db,
            settings.limits,
            settings.min_free_bytes,
            settings.max_uid_length,
            settings.sender_reserve_share,
        )
        self.completion = completion.QuietPeriodRule(
            settings.completion.quiet_period_s, settings.completion.max_receiving_s
        )
        self.results_dir = settings.storage_dir / "results"
        if settings.tls.dicom or settings.tls.api:
            server_context(settings.tls)  # a bad certificate or key stops the node here
        for dest in settings.destinations:
            if isinstance(dest, DimseDestination) and dest.tls:
                client_context(dest)  # and so does a destination's
        self.certificates = CertificateExpiry(settings)
        self.auth = Authenticator(load_tokens(settings.api), settings.api)
        self.audit = AuditTrail(settings.storage_dir, settings.audit, settings.ae_title)
        self.metrics = Metrics(self.db, settings.models, settings.storage_dir)
        self.metrics.watch_certificates(self.certificates)
        # the job engine: embedded worker processes, or Temporal workers (``[engine]``)
        self.workers = make_engine(settings, self.db, self.results_dir, self.metrics.job)
        if isinstance(self.workers, EmbeddedEngine):  # Temporal's workers have their own
            self.metrics.watch_memory(self.workers.memory)
        self.router = Router(
            self.db,
            settings,
            on_routed=self.workers.wake.set,
            rejections=Rejections(
                self.db,
                self.results_dir,
                self.workers.withdraw,
                lambda runs, why: self.retention.purge_now(runs, why),
                [
                    (d.ae_title, d.name)
                    for d in settings.destinations
                    if isinstance(d, DimseDestination)
                ],
            ),
        )
        self.ingest = Ingest(
            self.spool,
            self.db,
            self.completion,
            self.router.wake.set,
            observe=self._received,
            forwarders=settings.forwarders,
        )
        self.outbox = Outbox(self.db, settings, on_delivery=self._delivered)
        self.commitment = StorageCommitment(self.db, settings)
        self.result_commitment = ResultCommitment(self.db, settings)
        # written again only where it leaves the space retention and the spool want
        floor = max(settings.min_free_bytes, settings.retention.free_target_bytes or 0)
        self.reserve = Reserve(settings.storage_dir, settings.retention.reserve_bytes, floor)
        self.retention = Retention(
            self.db,
            self.spool,
            self.results_dir,
            settings.retention,
            self.audit,
            reserve=self.reserve,
        )
        self.storage = StorageProbe(self.spool.tmp, settings.min_free_bytes, self.db)
        self.lock = StorageLock(settings.storage_dir)
        self.sweeper = completion.Sweeper(self.sweep, settings.completion.sweep_interval_s, self.db)
        self.scheduler = BackgroundScheduler()
        self.server: ThreadedAssociationServer | None = None
        self.api: ThreadingHTTPServer | None = None

    # -- lifecycle ---------------------------------------------------------
    @property
    def tmp_max_age_s(self) -> float:
        """Twice the longest a live transfer leaves its file in tmp/ unwritten: one
        whole PDU of a C-STORE (its deadline), or a STOW-RS client's read timeout."""
        longest = max(
            read_seconds(MAX_PDU_BYTES, self.settings.network_timeout_s),
            self.settings.api.read_timeout_s,
        )
        return max(TMP_MIN_AGE_S, 2 * longest)

    def start(self) -> Node:
        logsafe.install()  # PHI-free logs: library warnings lose their values
        self.lock.acquire()
        try:
            with damage_explained(self.settings.db_path):
                try:
                    self._repair()
                except Exception as exc:  # a full disk: what a crash left, in the reserve
                    if not is_disk_full(exc) or not self.reserve.release():
                        raise
                    self._repair()
            self._listen()  # before anything runs: a port it cannot have stops the start
        except BaseException:
            self._close_listeners()
            self.lock.release()
            raise
        self.reserve.keep()
        self.router.start()
        self.outbox.start()
        self.commitment.start()
        self.result_commitment.start()
        self.workers.start()
        self.sweeper.start()
        self.scheduler.add_job(
            self.spool.sweep_tmp,
            "interval",
            args=[self.tmp_max_age_s],
            seconds=60,
            max_instances=1,
            coalesce=True,
            id="tmp-sweep",
        )
        self.certificates.report()
        self.scheduler.add_job(
            self.certificates.report,
            "interval",
            hours=24,
            max_instances=1,
            coalesce=True,
            id="certificate-expiry",
        )
        self.scheduler.add_job(
            self.retention.run,
            "interval",
            seconds=self.settings.retention.interval_s,
            max_instances=1,
            coalesce=True,
            id="retention",
        )
        self.scheduler.start()
        tls = self.settings.tls
        self.audit.node_started(
            f"{self.settings.host}:{self.port}{' TLS' if tls.dicom else ''}",
            f"{self.settings.api.host}:{self.api_port}{' TLS' if tls.api else ''}"
            if self.api
            else "off",
        )
        return self

    def _listen(self) -> None:
        """The storage SCP's port and the REST API's, or a ``ConfigError`` naming the
        setting: another program listens there, or the host is not this machine's (it
        was a traceback, after the router, workers and outbox had started)."""
        s, api = self.settings, self.settings.api
        try:
            self.server = start_scp(
                s, self.ingest, self.audit, self.metrics, self.commitment, self.result_commitment
            )
        except OSError as exc:
            raise ConfigError(_cannot_listen("DICOM", s.host, s.port, "host, port", exc)) from exc
        if api.enabled:
            try:
                self.api = start_api(self)
            except OSError as exc:
                raise ConfigError(
                    _cannot_listen("the REST API", api.host, api.port, "[api] host, port", exc)
                ) from exc

    def _close_listeners(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None
        if self.api is not None:
            self.api.shutdown()
            self.api.server_close()  # its port, at once: not when the server is collected
            self.api = None

    def _repair(self) -> None:
        removed, indexed, quarantined = self.spool.recover()
        if removed or indexed or quarantined:
            log.warning(
                "spool after a crash: %d partial file(s) removed, %d indexed, %d quarantined",
                removed,
                indexed,
                quarantined,
            )
        for part in self.results_dir.glob("*/.*.part"):
            part.unlink(missing_ok=True)
        self.workers.recover()

    def stop(self) -> None:
        """Stop every stage; a second call does nothing."""
        self._close_listeners()
        if not self.scheduler.running:
            return
        self.scheduler.shutdown(wait=False)
        self.sweeper.stop()
        self.router.stop()
        self.workers.stop()
        self.outbox.stop()
        self.commitment.stop()
        self.result_commitment.stop()
        self.audit.node_stopped()
        self.audit.close()
        self.lock.release()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.server_address[1])

    @property
    def api_port(self) -> int:
        assert self.api is not None
        return int(self.api.server_address[1])

    # -- complete ----------------------------------------------------------
    def sweep(self) -> None:
        moved = self.db.after_a_clock_step(
            now(),
            self.settings.workers.backoff_max_s,
            self.settings.outbox.backoff_max_s,
            self.settings.storage_commitment.wait_s,
        )
        if moved:
            log.warning(
                "%d time(s) in the index were ahead of the clock (it was stepped back): "
                "due from now",
                moved,
            )
        if self.completion.sweep(self.db, self.ingest.in_flight.series):
            self.router.wake.set()

    def trigger(self, **selector: str) -> list[str]:
        """Complete runs now (REST/CLI trigger, Orthanc stable series) and route them."""
        done = []
        for run_id in self.db.runs_for(**selector):
            if self.db.complete_run(run_id, "explicit trigger"):
                self.router.route(run_id)
                done.append(run_id)
        return done

    def reprocess(self, **selector: str) -> list[int]:
        """Route the selected runs again and queue new jobs whose results are sent again."""
        jobs: list[int] = []
        for run_id in self.db.runs_for(**selector):
            if self.db.reopen_for_reprocess(run_id):
                jobs.extend(self.router.route(run_id))
        return jobs

    def purge(self, operator: str, **selector: str) -> tuple[list[str], dict[str, str]]:
        """An operator's purge of the selected runs (REST/CLI): the processed ones lose
        their files now; returns them and, for the others, why not."""
        return self.retention.purge_now(
            self.db.runs_for(**selector), f"deleted at the request of {operator}"
        )

    def cancel(self, operator: str, **selector: str) -> tuple[list[str], dict[str, str]]:
        """An operator's cancel of the selected runs (REST/CLI): what is still to be done
        for them is not done (``Database.cancel_run``); a running job's worker process is
        stopped. Returns the runs cancelled and, for the others, why not."""
        reason = f"cancelled at the request of {operator}"
        cancelled: list[str] = []
        kept: dict[str, str] = {}
        for run_id in self.db.runs_for(**selector):
            done = self.db.cancel_run(run_id, reason)
            if isinstance(done, str):
                kept[run_id] = done
                continue
            self.workers.withdraw(done)
            cancelled.append(run_id)
            log.warning(
                "run %s %s: %s%d job(s) stopped, %d delivery(ies) withheld",
                run_id,
                reason,
                "not routed, " if done.settled else "",
                len(done.jobs),
                done.deliveries,
            )
        return cancelled, kept

    def retry_job(self, job_id: int) -> bool:
        """An operator's retry of a failed job (status page, ``POST /jobs/{id}/retry``)."""
        if not self.db.retry_failed_job(job_id):
            return False
        self.workers.wake.set()
        return True

    # -- audit and metrics ---------------------------------------------------
    def _received(
        self, receipt: Receipt, source: str, transport: str, size: int, peer: str
    ) -> None:
        self.metrics.instance(receipt, source, transport, size, peer)
        stored = receipt.stored
        self.audit.instance(
            receipt.ok,
            receipt.status,
            source,
            transport,
            stored.sop_instance_uid if stored else "",
            stored.study_uid if stored else "",
            receipt.reason,
            peer,
        )

    def _delivered(
        self, destination: str, item: Delivery, sent: bool, reason: str, permanent: bool
    ) -> None:
        self.metrics.delivery(destination, item, sent, reason, permanent)
        self.audit.delivery(destination, item.sop_instance_uid, sent, reason, permanent)

    # -- status ------------------------------------------------------------
    def jobs_memory(self) -> dict[str, int] | None:
        """The embedded engine's memory pool (``MemoryPool.snapshot``); None under
        Temporal, where each worker has its own (its /metrics and log show it)."""
        if isinstance(self.workers, EmbeddedEngine):
            return self.workers.memory.snapshot()
        return None

    def health(self) -> dict[str, object]:
        """``/health``: status ``ok``, or ``unavailable`` with the reason when the node
        cannot store what it receives (its disk full, read-only or failing)."""
        problem = self.storage.problem()
        answer: dict[str, object] = {"status": "ok" if problem is None else "unavailable"}
        if problem is not None:
            answer["error"] = f"{problem}: instances are refused (0xA700)"
        answer.update(version=__version__, ae_title=self.settings.ae_title, dicom_port=self.port)
        return answer

    def status(self) -> dict[str, object]:
        """The index's summary, with the memory pool where the node runs the jobs."""
        summary = self.db.status_summary()
        memory = self.jobs_memory()
        if memory is not None:
            summary["jobs_memory"] = memory
        return summary
