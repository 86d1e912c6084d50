"""``dicom-node worker --config FILE``: a scale-out worker on any machine.

It polls one Temporal task queue (``gpu``, ``cpu``, one per pipeline: the node's
``[engine] queues`` say which job goes where) and runs each job exactly as the
embedded engine does, in a long-lived worker process of its own
(``dicom_node.sandbox``: memory and time limits, model packages loaded once per
process and checked against ``weights_sha256`` at load, so they stay warm for
the next job). While it works it heartbeats; a worker that dies stops
heartbeating and Temporal gives the job to another worker after
``[engine] heartbeat_timeout_s``.

No shared filesystem is needed: the run comes from the node over WADO-RS and the
result objects go back to the node by STOW-RS (``dicom_node.worker_api``, a
token with the ``worker`` scope), whose outbox delivers them. A worker that can
mount the node's storage directory may say so (``[node] storage_dir``) and read
and write there instead. A node that is down is waited for (``[node] wait_s``,
heartbeating meanwhile), so restarting the node costs no attempt.

SIGTERM or SIGINT drains: the worker stops taking jobs, finishes the one it runs
(for at most ``drain_timeout_s``; then the job is cancelled and retried
elsewhere) and exits. One worker per GPU: ``CUDA_VISIBLE_DEVICES=N`` each.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import shutil
import signal
import socket
import tempfile
import threading
import time
import tomllib
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import requests
from pydantic import Field, ValidationError, model_validator
from temporalio import activity
from temporalio.exceptions import ApplicationError
from temporalio.worker import Worker

from dicom_node import stow
from dicom_node.diskfull import FULL, READ_ONLY, backoff_s, storage_fault
from dicom_node.errors import ConfigError
from dicom_node.logsafe import scrub
from dicom_node.sandbox import (
    JobSpec,
    MemoryPool,
    TimeLimit,
    WorkerProcess,
    cpu_only,
    jobs_memory,
    threads_per_job,
)
from dicom_node.settings import (
    DEFAULT_PIPELINE_MEMORY_BYTES_PER_PIXEL,
    DEFAULT_PIPELINE_MEMORY_MIB,
    DecodeSecondsPerMegapixel,
    DecodeTimeoutS,
    EngineSettings,
    JobsMemoryMib,
    PipelineBudgets,
    PipelineBytesPerPixel,
    Strict,
    Url,
    _describe,
    _merge,
    check_pipeline_keys,
)
from dicom_node.temporal_client import connect
from dicom_node.temporal_workflow import (
    PERMANENT,
    PROCESS,
    TRANSIENT,
    InstanceRef,
    JobInput,
    JobReport,
    ResultRef,
)

log = logging.getLogger(__name__)
ENV_PREFIX = "DICOM_NODE_WORKER_"
ACCEPT_AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'
_RETRYABLE_STATUS = (502, 503, 504)


class NodeLink(Strict):
    """How this worker reaches the node."""

    url: Url = Field(description="the node's REST API, e.g. https://node.example:8780")
    token: str | None = Field(None, repr=False, description="a token with the worker scope")
    token_file: Path | None = None
    token_env: str | None = None
    ca_file: Path | None = Field(None, description="the CA of the node's HTTPS certificate")
    storage_dir: Path | None = Field(
        None, description="the node's storage_dir mounted here: read and write it directly"
    )
    timeout_s: float = Field(60.0, gt=0, description="one HTTP request")
    wait_s: float = Field(
        600.0, ge=0, description="how long one attempt waits for a node that is down"
    )

    @model_validator(mode="after")
    def _token(self) -> NodeLink:
        if self.token is None and self.token_file is not None:
            try:
                object.__setattr__(self, "token", self.token_file.read_text().strip())
            except OSError as exc:
                raise ValueError(
                    f"token_file: cannot read {self.token_file}: {exc.strerror}"
                ) from None
        if self.token is None and self.token_env:
            if self.token_env not in os.environ:
                raise ValueError(f"token_env: the environment variable {self.token_env} is not set")
            object.__setattr__(self, "token", os.environ[self.token_env])
        return self


class WorkerConfig(Strict):
    """``[engine]`` (address, namespace, and the task_queue this worker polls), ``[node]``,
    and how jobs run here."""

    engine: EngineSettings = EngineSettings()
    node: NodeLink
    identity: str | None = Field(None, description="shown in Temporal and the node's status")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    concurrency: int = Field(1, ge=1, le=64, description="jobs at once, one worker process each")
    memory_limit_mib: int = Field(8192, ge=256)
    pipeline_memory_mib: PipelineBudgets = Field(
        default_factory=lambda: dict(DEFAULT_PIPELINE_MEMORY_MIB),
        description="as the node's [workers] pipeline_memory_mib: each pipeline's budget, "
        "its fixed part",
    )
    pipeline_memory_bytes_per_pixel: PipelineBytesPerPixel = Field(
        default_factory=lambda: dict(DEFAULT_PIPELINE_MEMORY_BYTES_PER_PIXEL),
        description="as the node's: what each pixel of the run adds to the budget (bytes)",
    )
    jobs_memory_mib: JobsMemoryMib = None
    decode_timeout_s: DecodeTimeoutS = 120.0
    decode_seconds_per_megapixel: DecodeSecondsPerMegapixel = 1.0
    models: dict[str, Path] = Field({}, description="model package folder per pipeline, here")
    scratch_dir: Path = Path(tempfile.gettempdir()) / "angio-worker"
    drain_timeout_s: float = Field(1800.0, ge=0, description="SIGTERM: finish the job this long")
    cpu_threads: int | None = Field(
        None,
        ge=1,
        le=256,
        description="CPU threads one job may use (torch's; BLAS's too when given); none: "
        "this machine's CPUs divided by concurrency, at least 1",
    )


def load_worker_config(
    path: str | Path, environ: Mapping[str, str] | None = None, **overrides: Any
) -> WorkerConfig:
    """The worker's TOML file, then ``DICOM_NODE_WORKER_...`` variables, then overrides."""
    p = Path(path)
    try:
        data: dict[str, Any] = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {p} is not valid TOML: {exc}") from None
    env = os.environ if environ is None else environ
    for key, raw in env.items():
        if key.startswith(ENV_PREFIX):
            keys = key[len(ENV_PREFIX) :].lower().split("__")
            node = data
            for part in keys[:-1]:
                node = node.setdefault(part, {})
            node[keys[-1]] = raw
    _merge(data, overrides)
    try:
        config = WorkerConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    check_pipeline_keys(
        (
            ("pipeline_memory_mib", config.pipeline_memory_mib),
            ("pipeline_memory_bytes_per_pixel", config.pipeline_memory_bytes_per_pixel),
        )
    )
    return config


class _Unwritable(Exception):
    """The job's results could not be written: its disk is full or read-only."""

    def __init__(self, fault: str, reason: str) -> None:
        super().__init__(reason)
        self.fault, self.reason = fault, reason


class Beat:
    """The heartbeat of one attempt; a cancelled attempt (the heartbeat timed out, the
    drain time is over) sets ``stopping``, which ends the worker process's job."""

    def __init__(self) -> None:
        self.stopping = threading.Event()

    def __call__(self, *details: Any) -> None:
        activity.heartbeat(*details)
        if activity.is_cancelled():
            self.stopping.set()


def _error(reason: str, attempt: int, permanent: bool = False) -> ApplicationError:
    """A failed attempt as Temporal records it: scrubbed, with its attempt number."""
    return ApplicationError(
        scrub(reason), attempt, type=PERMANENT if permanent else TRANSIENT, non_retryable=permanent
    )


def _filled_alone(work: Path) -> str | None:
    """Why waiting for room is no use: the job's own files (the run fetched so far, its
    results) alone fill the disk ``work`` is on, so that the run is larger than it.
    None where other files hold more than a twentieth of it (they may go)."""
    try:
        st = os.statvfs(work.parent)
        ours = sum(p.lstat().st_blocks * 512 for p in work.rglob("*"))
    except OSError:
        return None
    size = st.f_blocks * st.f_frsize
    others = (st.f_blocks - st.f_bfree) * st.f_frsize - ours
    if others > size // 20:
        return None
    return (
        f"the run is larger than the scratch disk of this worker: the files of the job alone "
        f"filled {work.parent} ({ours / 2**20:.1f} of {size / 2**20:.1f} MiB); give the worker "
        f"a larger scratch_dir"
    )


class NodeClient:
    """The node's worker routes, waiting out a node that is down (heartbeating)."""

    def __init__(self, link: NodeLink, beat: Beat, attempt: int) -> None:
        self.link = link
        self.beat = beat
        self.attempt = attempt
        self.session = requests.Session()
        if link.token:
            self.session.headers["Authorization"] = f"Bearer {link.token}"
        self.session.verify = str(link.ca_file) if link.ca_file else True
        self.fetched = 0

    def close(self) -> None:
        self.session.close()

    def _request(self, what: str, method: str, path: str, **kw: Any) -> requests.Response:
        deadline = time.monotonic() + self.link.wait_s
        delay = 0.5
        while True:
            data = kw.get("data")
            args = {**kw, "data": data()} if callable(data) else kw  # a fresh stream a try
            try:
                resp = self.session.request(
                    method, self.link.url + path, timeout=self.link.timeout_s, **args
                )
                if resp.status_code not in _RETRYABLE_STATUS:
                    break
                problem = f"HTTP {resp.status_code}"
            except requests.RequestException as exc:  # refused, reset, timed out, cut off
                problem = type(exc).__name__
            if time.monotonic() + delay > deadline:
                raise _error(f"the node did not answer while {what} ({problem})", self.attempt)
            log.warning("node unreachable while %s (%s); retry in %.1f s", what, problem, delay)
            self.pause(what, delay)
            delay = min(delay * 2, 10.0)
        if resp.status_code in (401, 403):
            raise _error(
                f"the node refused this worker ({resp.status_code}): check its token "
                "and the worker scope",
                self.attempt,
            )
        return resp

    def started(self, job: JobInput, worker: str) -> None:
        body = {"generation": job.generation, "attempt": self.attempt, "worker": worker}
        resp = self._request(
            "reporting the attempt", "POST", f"/worker/jobs/{job.job_id}/started", json=body
        )
        if resp.status_code == 409:
            raise _error(
                "the node no longer expects this job (settled or superseded)",
                self.attempt,
                permanent=True,
            )
        _check(resp, "reporting the attempt", self.attempt)

    def instances(self, job: JobInput) -> list[InstanceRef]:
        """The run's instances, which its workflow input left out (too many to carry)."""
        what = "asking for the run's instances"
        resp = self._request(
            what, "GET", f"/worker/jobs/{job.job_id}/instances?generation={job.generation}"
        )
        if resp.status_code == 409:
            raise _error(
                "the node no longer expects this job (settled or superseded)",
                self.attempt,
                permanent=True,
            )
        _check(resp, what, self.attempt)
        try:
            listed = resp.json()["instances"]
            refs = [InstanceRef(str(i["sop_instance_uid"]), str(i["relpath"])) for i in listed]
        except (ValueError, KeyError, TypeError) as exc:
            raise _error(
                f"{what}: the answer is not a list of instances ({exc})", self.attempt
            ) from None
        if not refs:
            raise _error(f"{what}: the node lists none", self.attempt, permanent=True)
        return refs

    def fetch(self, path: str, target: Path, what: str) -> list[Path]:
        """Every part of a WADO-RS answer into ``target``, one file each, numbered in order;
        a transfer that breaks off (the node went down) is fetched again."""
        deadline = time.monotonic() + self.link.wait_s
        while True:
            written: list[Path] = []
            try:
                self._fetch_once(path, target, what, written)
                return written
            except (requests.RequestException, stow.StowError) as exc:
                for f in written:
                    f.unlink(missing_ok=True)
                self.fetched -= len(written)
                if time.monotonic() > deadline:
                    raise _error(f"{what}: transfer broke off ({exc})", self.attempt) from None
                log.warning("%s: transfer broke off (%s); again", what, type(exc).__name__)
                self.pause(what, 1.0)

    def _fetch_once(self, path: str, target: Path, what: str, written: list[Path]) -> None:
        resp = self._request(what, "GET", path, headers={"Accept": ACCEPT_AS_STORED}, stream=True)
        try:
            if resp.status_code == 404:
                raise _error(f"{what}: no longer on the node", self.attempt, permanent=True)
            _check(resp, what, self.attempt)
            chunks = resp.iter_content(1 << 20)

            def read() -> bytes:
                self.beat(what)
                return next(chunks, b"")

            target.mkdir(parents=True, exist_ok=True)
            ctype = resp.headers.get("Content-Type", "")
            for _part_type, data in stow.iter_parts(ctype, read, 1 << 34):
                self.fetched += 1
                out = target / f"{self.fetched:06d}.dcm"
                out.write_bytes(data)
                written.append(out)
        finally:
            resp.close()

    def pause(self, what: str, seconds: float) -> None:
        """Wait, heartbeating; a cancelled attempt stops waiting."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.beat(what)
            if self.beat.stopping.is_set():
                raise _error(f"cancelled while {what}", self.attempt)
            time.sleep(min(0.5, seconds))

    def upload(self, job: JobInput, paths: list[Path]) -> None:
        """Every result object in one STOW-RS request, streamed (chunked)."""
        boundary = os.urandom(16).hex()

        def body() -> Iterator[bytes]:
            for path in paths:
                yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                with open(path, "rb") as fh:
                    while chunk := fh.read(1 << 20):
                        yield chunk
                yield b"\r\n"
                self.beat("returning results")
            yield f"--{boundary}--\r\n".encode()

        ctype = f'multipart/related; type="application/dicom"; boundary={boundary}'
        resp = self._request(
            "returning results",
            "POST",
            f"/worker/jobs/{job.job_id}/results?generation={job.generation}",
            data=body,  # called again for each try
            headers={"Content-Type": ctype},
        )
        if resp.status_code == 409:
            raise _error(
                "the node no longer takes this job's results (settled or superseded)",
                self.attempt,
                permanent=True,
            )
        _check(resp, "returning results", self.attempt)


def _check(resp: requests.Response, what: str, attempt: int) -> None:
    if not resp.ok:
        raise _error(
            f"the node answered {resp.status_code} while {what}: {resp.text[:300]}", attempt
        )


class JobRunner:
    """The ``process_job`` activity and the worker processes it runs jobs in."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        gpu = os.environ.get("CUDA_VISIBLE_DEVICES")
        self.identity = config.identity or (
            f"{socket.gethostname()}-{os.getpid()}" + (f"-gpu{gpu}" if gpu else "")
        )
        self.pool: queue.Queue[WorkerProcess] = queue.Queue()
        memory = MemoryPool(jobs_memory(config.jobs_memory_mib))
        self.processes = [
            WorkerProcess(
                f"job-worker-{i}",
                config.memory_limit_mib * 2**20,
                cpu_only(config.device),
                config.pipeline_memory_mib,
                threads=threads_per_job(config.concurrency, config.cpu_threads),
                bytes_per_pixel=config.pipeline_memory_bytes_per_pixel,
                memory_pool=memory,
                decode_limit=TimeLimit.decoding(config),
            )
            for i in range(config.concurrency)
        ]
        for p in self.processes:
            p.start()  # the forkserver imports torch and the pipelines once, now
            self.pool.put(p)
        self.models = {k: str(v) for k, v in config.models.items()}

    def close(self) -> None:
        for p in self.processes:
            p.close()

    @activity.defn(name=PROCESS, no_thread_cancel_exception=True)
    def process_job(self, job: JobInput) -> JobReport:
        attempt = activity.info().attempt
        beat = Beat()
        node = NodeClient(self.config.node, beat, attempt)
        work = (
            self.config.scratch_dir / f"job-{job.job_id}.{job.generation}.{attempt}.{os.getpid()}"
        )
        try:
            node.started(job, self.identity)
            log.info(
                "job %d: %s on run %s, attempt %d", job.job_id, job.pipeline, job.run_id, attempt
            )
            tries = 0
            while True:  # a full or read-only disk is waited out within the attempt
                try:
                    return self._process(job, attempt, node, beat, work)
                except _Unwritable as exc:
                    fault, what = exc.fault, exc.reason
                except OSError as exc:
                    met = storage_fault(exc)
                    if met not in (FULL, READ_ONLY):
                        raise
                    fault, what = str(met), f"{type(exc).__name__}: {exc}"
                alone = _filled_alone(work) if fault == FULL else None
                shutil.rmtree(work, ignore_errors=True)
                if alone is not None:  # no room will come: another worker may have it
                    raise _error(alone, attempt) from None
                tries += 1
                delay = backoff_s(tries)
                log.warning(
                    "job %d: the disk it writes to is %s (%s): tried again in %.0f s, within "
                    "attempt %d",
                    job.job_id,
                    fault,
                    what,
                    delay,
                    attempt,
                )
                node.pause(f"waiting for a disk that is {fault}", delay)
        finally:
            node.close()
            shutil.rmtree(work, ignore_errors=True)

    def _process(
        self, job: JobInput, attempt: int, node: NodeClient, beat: Beat, work: Path
    ) -> JobReport:
        shared = self.config.node.storage_dir
        t0 = time.monotonic()
        instances = node.instances(job) if job.instances_at_node else job.instances
        if shared is not None:
            paths = [shared / i.relpath for i in instances]
            out_dir = shared / "results" / str(job.job_id)
        else:
            base = f"/dicom-web/studies/{job.study_uid}/series/{job.series_uid}/instances/"
            paths = []
            for i in instances:
                paths += node.fetch(base + i.sop_instance_uid, work / "run", "fetching the run")
            out_dir = work / "out"
        prior: list[Path] = []
        for sop in job.prior:
            try:
                prior += node.fetch(
                    f"/worker/results/{sop}", work / "prior", "fetching a prior result"
                )
            except ApplicationError as exc:
                log.warning("job %d: prior result %s not fetched: %s", job.job_id, sop, exc)
        fetched = time.monotonic() - t0
        spec = JobSpec(
            job.job_id,
            job.run_id,
            job.pipeline,
            tuple(map(str, paths)),
            str(out_dir),
            self.config.device,
            self.models,
            prior_results=tuple(map(str, prior)),
            options=job.options,
        )
        process = self.pool.get()
        try:
            outcome = process.run(
                spec,
                TimeLimit(job.job_timeout_s, job.seconds_per_megapixel, job.longest_s()),
                heartbeat=beat,
                heartbeat_every_s=max(0.5, min(job.heartbeat_timeout_s / 4, 5.0)),
                stopping=beat.stopping,
            )
        finally:
            self.pool.put(process)
        if outcome.interrupted:
            raise _error("the attempt was cancelled (heartbeat lost or drain time over)", attempt)
        if outcome.unwritable:
            raise _Unwritable(outcome.unwritable, outcome.error or "")
        if not outcome.ok:
            raise _error(outcome.error or "unknown error", attempt, permanent=not outcome.transient)
        t1 = time.monotonic()
        if shared is None and outcome.results:
            node.upload(job, [r.path for r in outcome.results])
        timings = dict(outcome.timings)
        timings["fetching"] = fetched
        timings["returning"] = time.monotonic() - t1
        return JobReport(
            [
                ResultRef(r.sop_instance_uid, r.sop_class_uid, r.series_uid, r.description)
                for r in outcome.results
            ],
            list(outcome.notes),
            timings,
            attempt,
            self.identity,
        )


async def _serve(config: WorkerConfig, runner: JobRunner, stop: asyncio.Event) -> None:
    engine = config.engine
    delay = 1.0
    while not stop.is_set():
        try:
            client = await connect(engine, runner.identity)
        except Exception as exc:  # noqa: BLE001 - unreachable or refused: retried
            log.warning(
                "Temporal at %s unreachable (%s); retry in %.0f s", engine.address, exc, delay
            )
            await _wait(stop, delay)
            delay = min(delay * 2, 30.0)
            continue
        with ThreadPoolExecutor(config.concurrency, thread_name_prefix="job") as executor:
            worker = Worker(
                client,
                task_queue=engine.task_queue,
                activities=[runner.process_job],
                activity_executor=executor,
                max_concurrent_activities=config.concurrency,
                graceful_shutdown_timeout=timedelta(seconds=config.drain_timeout_s),
                identity=runner.identity,
            )
            print(
                f"worker {runner.identity} polling {engine.task_queue!r} at {engine.address}",
                flush=True,
            )
            run = asyncio.create_task(worker.run())
            stopped = asyncio.create_task(stop.wait())
            await asyncio.wait({run, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if stop.is_set():
                log.warning(
                    "draining: no new jobs; the running ones get %.0f s", config.drain_timeout_s
                )
                await worker.shutdown()
                stopped.cancel()
                return
            stopped.cancel()
            try:
                run.result()
                delay = 1.0
            except Exception as exc:  # noqa: BLE001 - the worker ended: start a new one
                log.error("Temporal worker stopped (%s); restart in %.0f s", exc, delay)
                await _wait(stop, delay)
                delay = min(delay * 2, 30.0)


async def _wait(event: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except TimeoutError:
        pass


def run_worker(config: WorkerConfig) -> int:
    """Serve until SIGTERM / SIGINT, then drain."""
    if config.cpu_threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[var] = str(config.cpu_threads)
    config.scratch_dir.mkdir(parents=True, exist_ok=True)
    runner = JobRunner(config)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await _serve(config, runner, stop)

    try:
        asyncio.run(main())
    finally:
        runner.close()
    log.warning("worker %s stopped", runner.identity)
    return 0
