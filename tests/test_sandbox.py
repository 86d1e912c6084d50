"""Jobs in worker processes: a crash, a memory overrun or a timeout ends the job, not
the node; data errors fail at once with their reason, crashes are retried up to
max_attempts; a worker process and the packages it loaded serve many jobs."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import XRayAngiographicImageStorage
from pynetdicom import AE

from dicom_node.sandbox import JobSpec, WorkerProcess, threads_per_job
from pipelines.base import PipelineError
from tests.conftest import wait_for
from tests.dicomgen import xa_run

GiB = 2**30


def _run_file(tmp_path: Path, name: str = "run.dcm", **kw: Any) -> Path:
    path = tmp_path / name
    xa_run(**kw).save_as(path, enforce_file_format=True)
    return path


def _phantom(tmp_path: Path, size: int = 256) -> Path:
    from training.phantoms import dsa

    written = dsa.generate(7, size=size, frames=20).write(tmp_path / "phantom")
    return next(p for p in written if p.name == "dsa.dcm")


def _spec(path: Path, out: Path, pipeline: str = "minip", job_id: int = 1) -> JobSpec:
    return JobSpec(job_id, "run", pipeline, (str(path),), str(out / str(job_id)), "cpu")


def _run(worker: WorkerProcess, spec: JobSpec, timeout: float = 120) -> Any:
    return worker.run(spec, timeout, lambda: None, 60, threading.Event())


def test_one_worker_process_serves_many_jobs(tmp_path: Path) -> None:
    worker = WorkerProcess("t", 4 * GiB, cpu_only=True)
    try:
        path = _run_file(tmp_path)
        first = _run(worker, _spec(path, tmp_path, "minip", 1))
        second = _run(worker, _spec(path, tmp_path, "dsa_av", 2))
        assert first.ok and second.ok, (first.error, second.error)
        assert first.pid == second.pid == worker.pid
        assert all(r.path.exists() for r in (*first.results, *second.results))
        assert "object(s)" in first.notes[-1]
    finally:
        worker.close()
    assert worker.pid is None


def test_a_data_error_is_permanent_with_its_reason(tmp_path: Path) -> None:
    worker = WorkerProcess("t", 4 * GiB, cpu_only=True)
    try:
        bad = tmp_path / "bad.dcm"
        bad.write_bytes(b"not dicom")
        outcome = _run(worker, _spec(bad, tmp_path))
        assert not outcome.ok and not outcome.transient and "cannot read" in outcome.error
        volume = _run(worker, _spec(_run_file(tmp_path), tmp_path, "rotational_dla"))
        assert not volume.transient and "needs a volume" in volume.error
    finally:
        worker.close()


def test_a_crashing_worker_ends_one_job_and_is_replaced(tmp_path: Path) -> None:
    worker = WorkerProcess("t", 4 * GiB, cpu_only=True)
    path = _phantom(tmp_path)
    try:
        assert _run(worker, _spec(path, tmp_path, "minip", 1)).ok  # the process is up
        pid = worker.pid
        assert pid is not None
        killer = threading.Timer(0.5, os.kill, (pid, signal.SIGSEGV))  # a decoder segfault
        killer.start()
        outcome = _run(worker, _spec(path, tmp_path, "dsa_perfusion", 2))
        killer.join()
        assert outcome.transient and "crashed (SIGSEGV) while" in outcome.error, outcome.error
        again = _run(worker, _spec(path, tmp_path, "minip", 3))
        assert again.ok and again.pid != pid
    finally:
        worker.close()


def test_a_job_no_longer_the_attempts_ends_its_worker_process(tmp_path: Path) -> None:
    """A heartbeat that could not renew the job's lease (an operator cancelled it, or
    another worker took it) ends the child at once, and so does a withdrawal (the
    operator's cancel, told by the node's own worker thread)."""
    worker = WorkerProcess("t", 4 * GiB, cpu_only=True)
    path = _phantom(tmp_path)

    def held(job_id: int, beat: Any, withdrawn: threading.Event) -> None:
        worker.start()
        pid = worker.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # a job that would not end by itself
        started = time.monotonic()
        spec = _spec(path, tmp_path, "minip", job_id)
        outcome = worker.run(spec, 120, beat, 0.2, threading.Event(), withdrawn)
        assert outcome.withdrawn and not outcome.ok and not outcome.transient
        assert "withdrawn while starting" in outcome.error, outcome.error
        assert time.monotonic() - started < 10 and worker.pid is None
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # ended, and reaped

    try:
        assert _run(worker, _spec(path, tmp_path, "minip", 1)).ok  # the process is up
        held(2, lambda: False, threading.Event())  # the lease was not renewed
        withdrawn = threading.Event()
        threading.Timer(0.5, withdrawn.set).start()
        held(3, lambda: True, withdrawn)
        assert _run(worker, _spec(path, tmp_path, "minip", 4)).ok  # a new process
    finally:
        worker.close()


def test_memory_and_time_limits_end_the_job(tmp_path: Path) -> None:
    path = _phantom(tmp_path)
    # the limit is below what a worker with torch loaded holds: the watchdog ends it
    small = WorkerProcess("t", 64 * 2**20, cpu_only=False)
    try:
        outcome = _run(small, _spec(path, tmp_path, "dsa_perfusion"))
        assert "memory limit 0.0625 GiB exceeded" in outcome.error
        # the limit caps the pipeline's budget: not retried, the reason says what to raise
        assert not outcome.transient and "raise memory_limit_mib" in outcome.error
    finally:
        small.close()
    worker = WorkerProcess("t", 4 * GiB, cpu_only=True)
    try:
        started = time.monotonic()
        outcome = _run(worker, _spec(path, tmp_path, "dsa_perfusion"), timeout=0.3)
        # the limit was fixed (a number, not a TimeLimit): the run's size does not add
        assert outcome.transient and "timed out after 0.3 s" in outcome.error
        assert "while" in outcome.error and outcome.time_limit == 0.3
        assert time.monotonic() - started < 10
    finally:
        worker.close()


def test_the_node_retries_a_crash_then_fails_it_with_the_reason(
    make_node: Any, tmp_path: Path
) -> None:
    """Through the whole node: a job whose worker is killed every time fails after
    max_attempts with the reason, and the next run is processed."""
    node = make_node(
        rules=[{"name": "xa", "match": {"modality": ["XA"]}, "pipelines": ["dsa_perfusion"]}],
        workers={
            "max_attempts": 2,
            "backoff_base_s": 0.1,
            "job_timeout_s": 0.2,
            "pipeline_seconds_per_megapixel": {"dsa_perfusion": 0.0},
        },
    )
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(XRayAngiographicImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.settings.ae_title)
    from pydicom import dcmread

    assert int(assoc.send_c_store(dcmread(_phantom(tmp_path, size=384))).Status) == 0
    assoc.release()
    job = wait_for(lambda: node.db.query("SELECT * FROM jobs WHERE state='failed'"), 120)[0]
    assert job["attempts"] == 2
    assert "timed out after 0.2 s" in job["error"] and "(attempt 2 of 2)" in job["error"]
    assert all(t.is_alive() for t in node.workers.threads)


def _tiny_package(root: Path, seed: int) -> Path:
    import torch

    from pipelines.models.package import build, write_package

    torch.manual_seed(seed)
    return write_package(
        root,
        model=build("vss_net", {"widths": [4, 8]}),
        name="tiny",
        version=str(seed),
        architecture_name="vss_net",
        config={"widths": [4, 8]},
        pipeline="dsa_ia",
        metrics={},
        data={},
        model_card="test package",
        training_command="test",
        dataset_manifest_hash="0",
    )


def test_packages_are_loaded_once_and_verified(tmp_path: Path) -> None:
    from pipelines.models.package import load_package

    root = _tiny_package(tmp_path / "pkg", seed=0)
    first = load_package(root).load_model("cpu")
    assert load_package(root).load_model("cpu") is first  # kept in memory
    # a new version installed in the same folder is loaded, not served from memory
    other = _tiny_package(tmp_path / "other", seed=1)
    for name in ("weights.pt", "package.json"):
        (root / name).write_bytes((other / name).read_bytes())
    second = load_package(root).load_model("cpu")
    assert second is not first
    assert not all(
        bool((a == b).all())
        for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True)
    )
    # damaged weights are refused before torch reads them
    weights = root / "weights.pt"
    data = bytearray(weights.read_bytes())
    data[-20] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(PipelineError, match="SHA-256"):
        load_package(root).load_model("cpu")


def _address_space_limit(pid: int) -> str:
    line = next(
        x for x in Path(f"/proc/{pid}/limits").read_text().splitlines() if "address space" in x
    )
    return line.split()[3]  # the soft limit, in bytes, or "unlimited"


@pytest.mark.parametrize(("cpu_only", "capped"), [(True, True), (None, True), (False, False)])
def test_the_address_space_cap_of_cpu_and_auto_workers(cpu_only: bool | None, capped: bool) -> None:
    """``auto`` (None): the worker asks torch for a GPU itself; this machine has none
    (a GPU worker, which CUDA's mappings would break under the cap, gets none)."""
    worker = WorkerProcess("t", 1 * GiB, cpu_only=cpu_only)
    try:
        worker.start()
        assert worker.pid is not None
        # The child sets its limit first thing; it polls its pipe only after that.
        wait_for(
            lambda: _address_space_limit(worker.pid or 0) != "unlimited" or not capped,
            60,
            what="the worker's limit",
        )
        limit = _address_space_limit(worker.pid)
        assert (limit == str(2 * GiB + 4 * GiB)) if capped else limit == "unlimited", limit
    finally:
        worker.close()


def test_jobs_share_the_cpus_among_the_workers(tmp_path: Path) -> None:
    """A worker's jobs run on the threads it was given: two jobs at once on an 8-core
    machine use 4 threads each, not 8 each (torch's default in every process)."""
    cpus = len(os.sched_getaffinity(0))
    assert threads_per_job(1) == cpus
    assert threads_per_job(2) == max(1, cpus // 2)
    assert threads_per_job(4 * cpus) == 1
    assert threads_per_job(2, threads=5) == 5
    path = _run_file(tmp_path)
    for threads in (1, 3):
        worker = WorkerProcess("t", 4 * GiB, cpu_only=True, threads=threads)
        try:
            outcome = _run(worker, _spec(path, tmp_path / str(threads), "minip"))
            assert outcome.ok, outcome.error
            assert outcome.threads == threads
        finally:
            worker.close()
