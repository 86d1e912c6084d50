"""Jobs running at once reserve their budgets in a shared pool: a job whose budget does
not fit beside the running ones' waits, after its headers are read and before it
decodes, in the order jobs asked; one larger than the pool runs alone."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from pydicom import dcmread

from dicom_node.sandbox import (
    WAITING,
    JobSpec,
    MemoryPool,
    Outcome,
    TimeLimit,
    WorkerProcess,
    jobs_memory,
    machine_memory,
)
from dicom_node.settings import load_settings
from tests.conftest import store_and_settle, wait_for
from tests.dicomgen import xa_run

GiB = 2**30


def test_jobs_are_let_in_in_order_while_their_budgets_fit() -> None:
    pool = MemoryPool(10 * GiB)
    a, b, c, d = object(), object(), object(), object()
    assert pool.acquire(a, 6 * GiB, 0)
    assert not pool.acquire(b, 6 * GiB, 0.05)  # 12 GiB would not fit
    assert not pool.acquire(c, 2 * GiB, 0.05)  # it would fit, but b asked first
    assert "6 of 10 GiB reserved by 1 running job(s), 2 job(s) in line" in pool.describe()
    assert pool.snapshot() == {
        "bytes": 10 * GiB,
        "reserved_bytes": 6 * GiB,
        "running_jobs": 1,
        "waiting_jobs": 2,
    }
    pool.release(6 * GiB)
    assert pool.acquire(b, 6 * GiB, 0)
    assert pool.acquire(c, 2 * GiB, 0)  # now beside b
    assert not pool.acquire(d, 20 * GiB, 0.05)  # larger than the pool: waits to run alone
    pool.release(6 * GiB)
    pool.release(2 * GiB)
    assert pool.acquire(d, 20 * GiB, 0)  # alone
    e = object()
    assert not pool.acquire(e, GiB, 0.05)
    pool.cancel(e)  # e gave up (its job ended): it no longer holds the line
    f = object()
    pool.release(20 * GiB)
    assert pool.acquire(f, GiB, 0) and pool.held == GiB and pool.jobs == 1


def test_a_waiting_job_is_let_in_by_a_release_from_another_thread() -> None:
    pool = MemoryPool(4 * GiB)
    first, second = object(), object()
    assert pool.acquire(first, 3 * GiB, 0)
    threading.Timer(0.2, pool.release, args=(3 * GiB,)).start()
    began = time.monotonic()
    assert pool.acquire(second, 3 * GiB, 10)
    assert 0.15 < time.monotonic() - began < 5


def test_the_pool_is_the_setting_or_three_quarters_of_the_machine() -> None:
    physical = __import__("os").sysconf("SC_PHYS_PAGES") * __import__("os").sysconf("SC_PAGE_SIZE")
    assert 0 < machine_memory() <= physical
    assert jobs_memory(None) == machine_memory() * 3 // 4
    assert jobs_memory(1024) == GiB
    assert load_settings(None, environ={}).workers.jobs_memory_mib is None
    with pytest.raises(Exception, match="jobs_memory_mib"):
        load_settings(None, environ={}, workers={"jobs_memory_mib": 10})


def _run(tmp_path: Path) -> Path:
    path = tmp_path / "run.dcm"
    xa_run(frames=40, rows=512, cols=512, seed=3).save_as(path, enforce_file_format=True)
    return path


def _beside_a_long_job(tmp_path: Path, path: Path, capacity: int) -> tuple[Outcome, Outcome]:
    """A dsa_av job, and a minip job (a 0.5 s time limit) started once the first holds
    its memory, in two workers sharing a pool of ``capacity`` bytes."""
    pool = MemoryPool(capacity)
    workers = [WorkerProcess(f"t{i}", 8 * GiB, cpu_only=True, memory_pool=pool) for i in range(2)]
    for w in workers:
        w.start()

    def spec(job_id: int, pipeline: str) -> JobSpec:
        return JobSpec(job_id, "run", pipeline, (str(path),), str(tmp_path / str(job_id)), "cpu")

    try:
        long: list[Outcome] = []
        first = threading.Thread(
            target=lambda: long.append(
                workers[0].run(spec(1, "dsa_av"), 600, lambda: None, 60, threading.Event())
            )
        )
        first.start()
        wait_for(lambda: pool.jobs == 1, 60, 0.01, "the first job to hold its memory")
        short = workers[1].run(
            spec(2, "minip"), TimeLimit(0.5), lambda: None, 60, threading.Event()
        )
        first.join(300)
        assert pool.held == 0 and pool.jobs == 0  # every reservation was given back
        return long[0], short
    finally:
        for w in workers:
            w.close()


def test_a_job_waits_for_memory_before_it_decodes_and_its_wait_is_not_timed(
    tmp_path: Path,
) -> None:
    """A pool with room for the budgets of both: the minip job runs beside the dsa_av
    job. Room for the dsa_av job's only: the minip job waits until the first is done,
    longer than its time limit, which the wait does not count."""
    path = _run(tmp_path)
    sizing = WorkerProcess("b", 8 * GiB, cpu_only=True)
    pixels = 512 * 512 * 40
    long_budget = sizing.memory_limit_for("dsa_av", pixels)
    both = long_budget + sizing.memory_limit_for("minip", pixels)
    long, short = _beside_a_long_job(tmp_path, path, both)
    assert long.ok and short.ok, (long.error, short.error)
    assert WAITING not in dict(short.timings)

    long, short = _beside_a_long_job(tmp_path, path, long_budget + 2**29)
    assert long.ok and short.ok, (long.error, short.error)
    waited = dict(short.timings).get(WAITING, 0.0)
    assert waited > 0.5, dict(short.timings)  # past its time limit, not counted
    assert WAITING not in dict(long.timings)


def test_the_node_runs_jobs_that_do_not_fit_together_one_after_the_other(
    make_node: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node = make_node(
        rules=[{"name": "xa", "match": {"modality": ["XA"]}, "pipelines": ["dsa_av", "dsa_ia"]}],
        workers={"concurrency": 2, "jobs_memory_mib": 4096, "max_attempts": 1},
    )
    with caplog.at_level(logging.INFO, logger="dicom_node"):
        jobs = store_and_settle(node, dcmread(_run(tmp_path)), 2)
    assert [row["state"] for row in jobs] == ["done", "done"], [row["error"] for row in jobs]
    waits = [r.getMessage() for r in caplog.records if "waits for memory" in r.getMessage()]
    assert len(waits) == 1, waits
    assert "of 4 GiB reserved by 1 running job(s)" in waits[0], waits
    done = [r.getMessage() for r in caplog.records if " done: " in r.getMessage()]
    assert sum("s waiting for memory)" in line for line in done) == 1, done
    assert node.workers.memory.held == 0
    metrics = node.metrics.render().decode()
    assert "angio_node_jobs_memory_bytes 4.294967296e+09" in metrics
    assert "angio_node_jobs_memory_reserved_bytes 0.0" in metrics
    # the REST API's /status and the status page show the pool too
    base = f"http://127.0.0.1:{node.api_port}"
    status = requests.get(f"{base}/status", timeout=10).json()
    assert status["jobs_memory"] == {
        "bytes": 4 * 2**30,
        "reserved_bytes": 0,
        "running_jobs": 0,
        "waiting_jobs": 0,
    }
    page = requests.get(base, timeout=10).text
    assert "jobs memory 0 of 4 GiB reserved, 0 waiting" in page
