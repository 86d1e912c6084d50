"""Jobs run in worker processes: untrusted bytes are decoded where a crash costs one job.

A :class:`WorkerProcess` is a long-lived child (forked from a forkserver that
has the pipelines and torch imported, so a new one starts in a fraction of a
second) that runs one job at a time: decode the run, compute, encode, write the
result files. Model packages it loads stay in memory for the next job
(``pipelines.models.package``: a small cache keyed by package and weights hash,
verified at load).

The parent watches it while it works: a child that dies (a decoder panic, a
segfault, the kernel's OOM killer), grows past the memory limit (resident set,
polled; the job's pipeline budget when that is lower: ``[workers]
pipeline_memory_mib`` and ``pipeline_memory_bytes_per_pixel`` times the pixels of
its run, which the child reports once it has read the run's headers and before it
decodes) or runs past its time limit (:class:`TimeLimit`: a fixed part and one per
pixel of the run, which grows once the child has reported them) is killed and
replaced, and the job gets an :class:`Outcome` whose reason names what happened and
in which stage. The service process itself never decodes pixel data from the network.

Jobs running at once share a :class:`MemoryPool`: a job's worker waits, after it has
read the headers and before it decodes, until the job's budget for its run fits beside
the budgets of the jobs already running, so that several large runs at once do not
exhaust the machine.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import math
import multiprocessing as mp
import os
import resource
import signal
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from multiprocessing.context import ForkServerContext
from pathlib import Path
from typing import Any, Protocol

from dicom_node import logsafe
from dicom_node.db import ResultFile
from dicom_node.diskfull import FAILING, storage_fault
from dicom_node.errors import RunError
from dicom_node.processing import resolve_device, run_pipeline, write_dataset
from dicom_node.runs import load_run
from dicom_node.settings import (
    DEFAULT_PIPELINE_MEMORY_BYTES_PER_PIXEL,
    DEFAULT_PIPELINE_MEMORY_MIB,
    WorkerSettings,
)
from pipelines.base import BUILTIN, PipelineError

log = logging.getLogger(__name__)

_POLL_S = 0.05
WAITING = "waiting for memory"  # the stage of a job whose worker waits for the pool
_PR_SET_PDEATHSIG = 1
_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class JobSpec:
    job_id: int
    run_id: str
    pipeline: str
    paths: tuple[str, ...]
    out_dir: str
    device: str
    models: Mapping[str, str] = field(default_factory=dict)
    # Files earlier jobs of this pipeline on this run delivered (supersession).
    prior_results: tuple[str, ...] = ()
    # The pipeline's options from the settings ([workers] pipeline_options).
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TimeLimit:
    """The wall time one attempt may take: ``fixed_s`` (``[workers] job_timeout_s``)
    plus ``per_megapixel_s`` for each million decoded pixels of its run, at most
    ``max_s`` (never below ``fixed_s``; None: no ceiling)."""

    fixed_s: float
    per_megapixel_s: float = 0.0
    max_s: float | None = None

    def seconds(self, pixels: int = 0) -> float:
        """The limit for a run of ``pixels`` (0: not known yet, the fixed part)."""
        if self.max_s is None:
            return self.grown(pixels)
        return min(self.grown(pixels), max(self.max_s, self.fixed_s))

    def grown(self, pixels: int) -> float:
        """The limit for such a run before the ceiling caps it."""
        return self.fixed_s + self.per_megapixel_s * pixels / 1e6

    @classmethod
    def of(cls, workers: WorkerSettings, pipeline: str) -> TimeLimit:
        """The limit ``[workers]`` gives a job of ``pipeline``."""
        per_megapixel = workers.pipeline_seconds_per_megapixel.get(pipeline, 0.0)
        return cls(workers.job_timeout_s, per_megapixel, workers.job_timeout_max_s)

    @classmethod
    def decoding(cls, settings: DecodingSettings) -> TimeLimit:
        """Decoding's limit from the node's ``[workers]`` or a scale-out worker's file."""
        return cls(settings.decode_timeout_s, settings.decode_seconds_per_megapixel)


class DecodingSettings(Protocol):
    """Where decoding's limit is set: ``WorkerSettings``, and ``worker.WorkerConfig``
    (which this module may not import: the worker imports it)."""

    @property
    def decode_timeout_s(self) -> float: ...

    @property
    def decode_seconds_per_megapixel(self) -> float: ...


@dataclass(eq=False)  # compared by identity: it is also the attempt's place in the pool's line
class _Watch:
    """What the watchdog learns of one attempt: the run's size once the child reported
    it, the limits for that size, and the largest resident set it saw."""

    pixels: int = 0
    memory_limit: int = 0
    time_limit: float = 0.0
    decode_limit: float = math.inf  # decoding's own limit (inf: only the job's)
    peak_rss: int = 0
    reserved: int = 0  # bytes it holds in the memory pool

    def size(self) -> str:
        """The run's size for a reason ("" before the child reported it)."""
        return f", a run of {self.pixels / 1e6:.3g} million pixels" if self.pixels else ""


@dataclass(frozen=True)
class Outcome:
    results: tuple[ResultFile, ...] = ()
    notes: tuple[str, ...] = ()
    error: str | None = None  # None: done
    transient: bool = False  # worth another attempt (crash, memory, I/O), else permanent
    interrupted: bool = False  # the node is stopping: the attempt does not count
    # no room to write, or a read-only disk (diskfull.FULL, READ_ONLY): the attempt does not
    # count, the job waits; a failing disk's I/O error may be one bad file's and counts
    unwritable: str | None = None
    withdrawn: bool = False  # the job is no longer this attempt's (cancelled, lease taken)
    pid: int = 0
    timings: tuple[tuple[str, float], ...] = ()  # seconds per stage, measured by the parent
    threads: int = 0  # the CPU threads the job's process had (torch's); 0: not known
    # The job's peak resident set (the kernel's count in the worker process, or else the
    # largest the parent's watchdog saw), and its budget for the run (bytes; 0: not
    # watched here, e.g. a job a scale-out worker reported).
    peak_rss: int = 0
    budget: int = 0
    time_limit: float = 0.0  # the attempt's time limit for its run (s; 0: not watched here)

    @property
    def ok(self) -> bool:
        return self.error is None and not self.interrupted and not self.withdrawn

    @property
    def waited_s(self) -> float:
        """Seconds its worker waited for memory (not timed against the limit)."""
        return dict(self.timings).get(WAITING, 0.0)


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/site-packages/" not in f.filename] or frames
    if not ours:
        return ""
    last = ours[-1]
    parts = Path(last.filename).parts
    return f" at {'/'.join(parts[-2:])}:{last.lineno}"


def execute(
    spec: JobSpec,
    on_stage: Callable[[str], None],
    on_pixels: Callable[[int], None] | None = None,
) -> Outcome:
    """Decode, compute, encode and write one job; every error becomes an Outcome.
    ``on_pixels`` hears the run's pixel count once its headers are read, before it is
    decoded (the parent sizes the job's memory budget from it)."""
    stage = "decoding"

    def at(name: str) -> None:
        nonlocal stage
        stage = name
        on_stage(name)

    try:
        at("decoding")
        loaded = load_run([Path(p) for p in spec.paths], on_pixels=on_pixels)
        datasets, notes = run_pipeline(
            loaded,
            spec.pipeline,
            spec.models,
            spec.device,
            at,
            options=spec.options,
            prior_results=spec.prior_results,
        )
        at("writing")
        results = []
        for ds in datasets:
            path = write_dataset(ds, Path(spec.out_dir))
            results.append(
                ResultFile(
                    path,
                    str(ds.SOPClassUID),
                    str(ds.SOPInstanceUID),
                    str(ds.SeriesInstanceUID),
                    str(ds.get("SeriesDescription", ds.SOPClassUID)),
                )
            )
        summary = ", ".join(sorted({r.description for r in results}))
        notes.append(f"{len(results)} object(s): {summary}")
        return Outcome(tuple(results), tuple(notes), pid=os.getpid(), threads=_cpu_threads())
    except (RunError, PipelineError) as exc:
        return Outcome(error=str(exc), pid=os.getpid())
    except MemoryError:
        return Outcome(error=f"out of memory while {stage}", transient=True, pid=os.getpid())
    except OSError as exc:
        fault = storage_fault(exc)
        return Outcome(
            error=f"I/O error while {stage}: {exc}",
            transient=True,
            pid=os.getpid(),
            unwritable=fault if fault != FAILING else None,
        )
    except Exception as exc:  # noqa: BLE001 - a defect met on this input: it would recur
        return Outcome(
            error=f"internal error while {stage}: {type(exc).__name__}: {exc}{_where(exc)} "
            "(the input may be malformed; report it with the run's UID)",
            pid=os.getpid(),
        )
    except BaseException as exc:  # e.g. a decoder's Rust panic (pyo3 PanicException)
        if isinstance(exc, (SystemExit, KeyboardInterrupt)):
            raise
        return Outcome(
            error=f"{'decoder' if stage == 'decoding' else 'pipeline'} crashed while {stage}: "
            f"{type(exc).__name__}: {exc}",
            pid=os.getpid(),
        )


def threads_per_job(concurrency: int, threads: int | None = None) -> int:
    """CPU threads one job may use: ``threads`` when given, else the CPUs this process
    may run on shared among ``concurrency`` jobs at once (at least 1), so that jobs
    running together do not each start a thread per CPU."""
    if threads:
        return threads
    return max(1, len(os.sched_getaffinity(0)) // max(concurrency, 1))


def _cpu_threads() -> int:
    import torch  # loaded in the worker already (the forkserver's preload)

    return int(torch.get_num_threads())


def _serve(
    conn: Connection, address_space_limit: int | None, unless_cuda: bool, threads: int | None
) -> None:
    """The child's loop: a JobSpec in, stage messages and an Outcome out; None ends it.

    ``unless_cuda``: the address-space cap is left off when torch sees a GPU. The
    child asks, not the node: torch is loaded here already, and the node process
    does not load it at all (it starts in half the time). ``threads``: torch's CPU
    threads in this process (its intra-op pool; the pipelines' own thread pools take
    their size from it); None leaves torch's default, a thread per core.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    logsafe.install()  # decoders warn with the values they read: keep those out of the log
    _die_with_parent()
    if threads:
        import torch

        torch.set_num_threads(threads)
    if address_space_limit and not (unless_cuda and resolve_device("auto") == "cuda"):
        resource.setrlimit(resource.RLIMIT_AS, (address_space_limit, address_space_limit))
    while True:
        try:
            spec = conn.recv()
        except (EOFError, OSError):
            return
        if spec is None:
            return
        _reset_peak_rss()

        def admitted(pixels: int) -> None:
            """Report the run's size and wait until the parent lets the job decode it
            (its memory reserved); anything but "go" means the parent is ending us."""
            conn.send(("pixels", pixels))
            if conn.recv() != "go":
                raise SystemExit(0)

        outcome = execute(spec, lambda stage: conn.send(("stage", stage)), admitted)
        conn.send(("done", replace(outcome, peak_rss=_peak_rss())))


def _die_with_parent() -> None:
    """Linux: SIGKILL this worker when the forkserver that forked it ends, which it does
    when the node dies; a node killed with -9 leaves no worker computing on."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        log.debug("prctl(PR_SET_PDEATHSIG) unavailable: workers may outlive a killed node")


def _reset_peak_rss() -> None:
    """Linux: start this process's peak resident set (VmHWM) again from what it holds
    now, so that the peak read after a job is that job's (proc(5), clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        log.debug("cannot reset the peak resident set: the watchdog's samples only")


def _peak_rss() -> int:
    """This process's peak resident set since :func:`_reset_peak_rss` (0: unknown)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _seconds(value: float) -> str:
    return f"{value:.0f}" if value >= 10 else f"{value:g}"


def _signal_name(code: int | None) -> str:
    if code is None:
        return "no exit code"
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


_CONTEXT: ForkServerContext | None = None
_CONTEXT_LOCK = threading.Lock()


def _context() -> ForkServerContext:
    """One forkserver per node process, with the heavy imports done once."""
    global _CONTEXT
    with _CONTEXT_LOCK:
        if _CONTEXT is None:
            ctx = mp.get_context("forkserver")
            # The pipelines are imported here, once, not by the node process itself
            # (pipelines.base.BUILTIN): each worker forks with them loaded.
            ctx.set_forkserver_preload(["dicom_node.sandbox", *BUILTIN.values()])
            _CONTEXT = ctx
        return _CONTEXT


def cpu_only(device: str) -> bool | None:
    """``WorkerProcess``'s ``cpu_only`` for a configured device: ``cpu`` True, ``auto``
    None (the worker asks torch), any CUDA device False."""
    return {"cpu": True, "auto": None}.get(device, False)


class MemoryPool:
    """The memory that the jobs running at once on this machine may reserve together.

    A job reserves its budget for its run (:meth:`WorkerProcess.memory_limit_for`) once
    its worker has read the run's headers, before it decodes; it waits while the budgets
    of the jobs already running leave too little beside them. Jobs are let in in the
    order they asked, and a job whose budget alone is more than the pool runs when
    nothing else does (its own budget, capped by ``memory_limit_mib``, still ends it).
    A budget only bounds one job; the pool is what keeps several large runs at once
    from exhausting the machine, where the kernel's OOM killer would end a worker (a
    crash, retried into the same collision) or the node."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity = capacity_bytes
        self.held = 0
        self.jobs = 0
        self._waiting: deque[object] = deque()
        self._cond = threading.Condition()

    def _fits(self, ticket: object, nbytes: int) -> bool:
        first = bool(self._waiting) and self._waiting[0] is ticket
        return first and (self.jobs == 0 or self.held + nbytes <= self.capacity)

    def acquire(self, ticket: object, nbytes: int, timeout: float) -> bool:
        """Reserve ``nbytes`` for ``ticket`` (its place in line is kept between calls;
        tickets are compared by identity); False when it did not fit within ``timeout``
        seconds."""
        with self._cond:
            if not any(t is ticket for t in self._waiting):
                self._waiting.append(ticket)
            if not self._cond.wait_for(lambda: self._fits(ticket, nbytes), timeout):
                return False
            self._waiting.popleft()
            self.held += nbytes
            self.jobs += 1
            self._cond.notify_all()  # the next in line may fit too
            return True

    def cancel(self, ticket: object) -> None:
        """``ticket`` no longer waits (its job ended or the node stops)."""
        with self._cond:
            for i, t in enumerate(self._waiting):
                if t is ticket:
                    del self._waiting[i]
                    self._cond.notify_all()
                    return

    def release(self, nbytes: int) -> None:
        with self._cond:
            self.held -= nbytes
            self.jobs -= 1
            self._cond.notify_all()

    @property
    def waiting(self) -> int:
        """Jobs in line."""
        with self._cond:
            return len(self._waiting)

    def snapshot(self) -> dict[str, int]:
        """Its size, what the running jobs reserve, and how many jobs run and wait."""
        with self._cond:
            return {
                "bytes": self.capacity,
                "reserved_bytes": self.held,
                "running_jobs": self.jobs,
                "waiting_jobs": len(self._waiting),
            }

    def describe(self) -> str:
        with self._cond:
            return (
                f"{self.held / 2**30:.3g} of {self.capacity / 2**30:.3g} GiB reserved by "
                f"{self.jobs} running job(s), {len(self._waiting)} job(s) in line"
            )


def machine_memory() -> int:
    """Bytes of memory this process's machine gives it: the physical memory, or its
    cgroup's limit where that is lower (v2 ``memory.max``, v1 ``memory.limit_in_bytes``;
    a container's own)."""
    limit = os.sysconf("SC_PHYS_PAGES") * _PAGE
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            limit = min(limit, int(text))
    return limit


def jobs_memory(setting_mib: int | None) -> int:
    """The pool's size (bytes): the setting (``jobs_memory_mib``), or three quarters of
    :func:`machine_memory`, the rest for the node, the idle workers and the system."""
    return setting_mib * 2**20 if setting_mib else machine_memory() * 3 // 4


class WorkerProcess:
    """One child process, replaced after it crashes or is killed."""

    def __init__(
        self,
        name: str,
        memory_limit_bytes: int,
        cpu_only: bool | None,
        budgets_mib: Mapping[str, int] | None = None,
        threads: int | None = None,
        bytes_per_pixel: Mapping[str, float] | None = None,
        memory_pool: MemoryPool | None = None,
        decode_limit: TimeLimit | None = None,
    ) -> None:
        """``cpu_only``: True for a worker that runs on the CPU, False for one that
        may use a GPU, None to let the worker decide (CPU-only unless torch sees a
        GPU: the ``auto`` device). ``threads``: the CPU threads its jobs may use
        (:func:`threads_per_job`); None: torch's default. ``budgets_mib`` and
        ``bytes_per_pixel``: each pipeline's budget, a fixed part and a part per pixel
        of the run (None: the measured defaults). ``memory_pool``: shared by the workers
        whose jobs run at once (None: each job only within its own budget).
        ``decode_limit``: the time decoding a run may take, within the job's own limit
        (None: only the job's limit)."""
        self.memory_pool = memory_pool
        self.decode_limit = decode_limit
        self.name = name
        self.threads = threads
        self.memory_limit = memory_limit_bytes
        # Per pipeline, each capped by the limit above: a job of a pipeline measured at
        # 1 GB is ended well before the limit that a 3 GB one needs, and a large run
        # gets what its pixels need (a 1024^2 x 90 coronary cine 3 GB, 512^2 x 90 1 GB).
        self.budgets = dict(DEFAULT_PIPELINE_MEMORY_MIB if budgets_mib is None else budgets_mib)
        self.bytes_per_pixel = dict(
            DEFAULT_PIPELINE_MEMORY_BYTES_PER_PIXEL if bytes_per_pixel is None else bytes_per_pixel
        )
        # A hard address-space cap backs the RSS watchdog against a sudden allocation.
        # CUDA maps far more address space than it uses, so only CPU workers get it.
        self.address_space_limit = (
            2 * memory_limit_bytes + 4 * 2**30 if cpu_only is not False else None
        )
        self.unless_cuda = cpu_only is None
        self.proc: Any = None
        self.conn: Connection | None = None

    def memory_limit_for(self, pipeline: str, pixels: int = 0) -> int:
        """Bytes a job of ``pipeline`` on a run of ``pixels`` decoded pixels may hold
        resident (0: not known yet, the fixed part)."""
        return min(self.memory_limit, self.budget_for(pipeline, pixels))

    def budget_for(self, pipeline: str, pixels: int = 0) -> int:
        """The pipeline's budget for such a run before ``memory_limit_mib`` caps it (the
        limit itself for a pipeline without a budget)."""
        budget = self.budgets.get(pipeline)
        if budget is None:
            return self.memory_limit
        return budget * 2**20 + int(self.bytes_per_pixel.get(pipeline, 0.0) * pixels)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        """Start the child now, not with the first job (a scale-out worker does this
        before it takes jobs, so a first job does not miss heartbeats while torch loads)."""
        self._ensure()

    def _ensure(self) -> Connection:
        if self.proc is None or not self.proc.is_alive() or self.conn is None:
            self._discard()
            ctx = _context()
            parent, child = ctx.Pipe()
            self.proc = ctx.Process(
                target=_serve,
                args=(child, self.address_space_limit, self.unless_cuda, self.threads),
                name=self.name,
                daemon=True,
            )
            self.proc.start()
            child.close()
            self.conn = parent
            log.info(
                "worker process %s started (pid %d, %s CPU threads per job)",
                self.name,
                self.proc.pid,
                self.threads or "torch's default",
            )
        return self.conn

    def _discard(self) -> None:
        if self.proc is not None:
            if self.proc.is_alive():
                self.proc.kill()
            self.proc.join(10)
        if self.conn is not None:
            self.conn.close()
        self.proc = None
        self.conn = None

    def _end(self, reason: str, stage: str, transient: bool = True, then: str = "") -> Outcome:
        pid = self.pid or 0
        self._discard()
        return Outcome(error=f"{reason} while {stage}{then}", transient=transient, pid=pid)

    def run(
        self,
        spec: JobSpec,
        timeout: TimeLimit | float,
        heartbeat: Callable[[], object],
        heartbeat_every_s: float,
        stopping: threading.Event,
        withdrawn: threading.Event | None = None,
    ) -> Outcome:
        """The job's outcome, with the seconds spent in each stage (crashed ones too).
        ``timeout``: its time limit (a number: a fixed one, whatever the run's size).
        The child is stopped, and the outcome says ``withdrawn``, once ``withdrawn`` is
        set or ``heartbeat`` returns False: the job is no longer this attempt's."""
        limit = timeout if isinstance(timeout, TimeLimit) else TimeLimit(timeout)
        laps: list[tuple[str, float]] = []  # (stage, when it began)
        watch = _Watch(
            memory_limit=self.memory_limit_for(spec.pipeline),
            time_limit=limit.seconds(),
            decode_limit=(
                self.decode_limit.seconds() if self.decode_limit is not None else math.inf
            ),
        )
        try:
            outcome = self._watch(
                spec, limit, heartbeat, heartbeat_every_s, stopping, withdrawn, laps, watch
            )
        finally:
            if self.memory_pool is not None:
                self.memory_pool.cancel(watch)  # its place in line, where it waited
                if watch.reserved:
                    self.memory_pool.release(watch.reserved)
                    watch.reserved = 0
        laps.append(("", time.monotonic()))
        timings: dict[str, float] = {}
        for (stage, began), (_, ended) in zip(laps, laps[1:], strict=False):
            timings[stage] = timings.get(stage, 0.0) + ended - began
        # The child's own peak (the kernel's, since the job began) where it reported one;
        # the watchdog's samples otherwise, e.g. when it was killed.
        return replace(
            outcome,
            timings=tuple(timings.items()),
            peak_rss=max(outcome.peak_rss, watch.peak_rss),
            budget=watch.memory_limit,
            time_limit=watch.time_limit,
        )

    def _admit(self, watch: _Watch, conn: Connection) -> bool:
        """Let the child decode once the pool holds the job's budget (the attempt's
        watch is its ticket in the pool's line); False while it waits."""
        pool = self.memory_pool
        if pool is not None:
            if not pool.acquire(watch, watch.memory_limit, _POLL_S):
                return False
            watch.reserved = watch.memory_limit
        conn.send("go")
        return True

    def _watch(
        self,
        spec: JobSpec,
        limit: TimeLimit,
        heartbeat: Callable[[], object],
        heartbeat_every_s: float,
        stopping: threading.Event,
        withdrawn: threading.Event | None,
        laps: list[tuple[str, float]],
        watch: _Watch,
    ) -> Outcome:
        conn = self._ensure()
        conn.send(spec)
        stage = "starting"
        start = stage_began = time.monotonic()
        laps.append((stage, start))
        next_beat = start + heartbeat_every_s
        waiting_since: float | None = None  # the child waits for its memory
        waited = 0.0  # seconds it waited, not counted against the time limit
        while True:
            try:
                if conn.poll(0 if waiting_since is not None else _POLL_S):
                    kind, value = conn.recv()
                    if kind == "stage":
                        stage = value
                        stage_began = time.monotonic()
                        laps.append((stage, stage_began))
                        continue
                    if kind == "pixels":
                        watch.pixels = int(value)
                        watch.memory_limit = self.memory_limit_for(spec.pipeline, watch.pixels)
                        watch.time_limit = limit.seconds(watch.pixels)
                        if self.decode_limit is not None:
                            watch.decode_limit = self.decode_limit.seconds(watch.pixels)
                        if not self._admit(watch, conn):
                            waiting_since = time.monotonic()
                            laps.append((WAITING, waiting_since))
                            log.info(
                                "job %d waits for memory: a budget of %.3g GiB for a run of "
                                "%.3g million pixels; %s (this one included)",
                                spec.job_id,
                                watch.memory_limit / 2**30,
                                watch.pixels / 1e6,
                                self.memory_pool.describe() if self.memory_pool else "",
                            )
                        continue
                    return value  # type: ignore[no-any-return]
            except (EOFError, OSError):
                pass  # the child died: its exit code says how, below
            if waiting_since is not None and self._admit(watch, conn):
                now = time.monotonic()
                waited += now - waiting_since
                waiting_since = None
                laps.append((stage, now))
            if not self.proc.is_alive():
                self.proc.join(5)
                code = self.proc.exitcode
                what = "decoder" if stage == "decoding" else "worker process"
                return self._end(f"{what} crashed ({_signal_name(code)})", stage)
            rss = _rss_bytes(self.proc.pid)
            watch.peak_rss = max(watch.peak_rss, rss)
            if rss > watch.memory_limit:
                # Where memory_limit_mib capped the run's budget, another attempt meets
                # the same cap: the job fails now, and the reason says what to raise.
                wanted = self.budget_for(spec.pipeline, watch.pixels)
                capped = watch.pixels > 0 and wanted > watch.memory_limit
                return self._end(
                    f"memory limit {watch.memory_limit / 2**30:.3g} GiB exceeded "
                    f"({rss / 2**30:.3g} GiB resident{watch.size()})",
                    stage,
                    transient=not capped,
                    then=f"; its budget for the run would be {wanted / 2**30:.3g} GiB, "
                    "above memory_limit_mib: not retried (raise memory_limit_mib to process "
                    "it)"
                    if capped
                    else "",
                )
            if (
                stage == "decoding"
                and waiting_since is None
                # The wait for memory falls within decoding, and is not timed either.
                and time.monotonic() - stage_began - waited > watch.decode_limit
            ):
                # Before the job's own limit: a decoder stuck on a codestream would hold
                # the worker for that limit, and again on every attempt.
                return self._end(
                    f"decoder timed out after {_seconds(watch.decode_limit)} s{watch.size()}",
                    stage,
                    then="; the pixel data may be malformed (decode_timeout_s and "
                    "decode_seconds_per_megapixel set this limit)",
                )
            if waiting_since is None and time.monotonic() - start - waited > watch.time_limit:
                # Likewise where job_timeout_max_s capped the run's time limit.
                wanted_s = limit.grown(watch.pixels)
                capped = watch.pixels > 0 and wanted_s > watch.time_limit
                return self._end(
                    f"timed out after {_seconds(watch.time_limit)} s{watch.size()}",
                    stage,
                    transient=not capped,
                    then=f"; its limit for the run would be {_seconds(wanted_s)} s, above "
                    "job_timeout_max_s: not retried (raise job_timeout_max_s to process it)"
                    if capped
                    else "",
                )
            if stopping.is_set():
                self._discard()
                return Outcome(error="the node is stopping", interrupted=True)
            lost = False  # the job is no longer this attempt's (its lease was not renewed)
            if time.monotonic() >= next_beat:
                lost = heartbeat() is False
                next_beat += heartbeat_every_s
            if lost or (withdrawn is not None and withdrawn.is_set()):
                self._discard()
                return Outcome(error=f"the job was withdrawn while {stage}", withdrawn=True)

    def close(self) -> None:
        if self.conn is not None and self.proc is not None and self.proc.is_alive():
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.proc.join(5)
        self._discard()
