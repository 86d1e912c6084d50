"""Per-pipeline memory budgets: settings defaults from the measured peaks, the
sandbox ends a job whose pipeline outgrows its budget (as it ends any memory
overrun), and the node records it as it records other overruns."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import XRayAngiographicImageStorage
from pynetdicom import AE

from dicom_node.errors import ConfigError
from dicom_node.sandbox import JobSpec, WorkerProcess
from dicom_node.settings import DEFAULT_PIPELINE_MEMORY_MIB, load_settings
from pipelines import names
from tests.conftest import wait_for

GiB = 2**30


def _phantom(tmp_path: Path, size: int = 256) -> Path:
    from training.phantoms import dsa

    written = dsa.generate(7, size=size, frames=20).write(tmp_path / "phantom")
    return next(p for p in written if p.name == "dsa.dcm")


def _spec(path: Path, out: Path, pipeline: str, job_id: int) -> JobSpec:
    return JobSpec(job_id, "run", pipeline, (str(path),), str(out / str(job_id)), "cpu")


def test_every_pipeline_has_a_default_budget_and_settings_merge_over_it() -> None:
    assert set(DEFAULT_PIPELINE_MEMORY_MIB) == set(names())
    settings = load_settings(None, environ={}, workers={"pipeline_memory_mib": {"minip": 700}})
    budgets = settings.workers.pipeline_memory_mib
    assert budgets["minip"] == 700
    assert budgets["dsa_perfusion"] == DEFAULT_PIPELINE_MEMORY_MIB["dsa_perfusion"]
    with pytest.raises(ConfigError, match="pipeline_memory_mib.nope: unknown pipeline"):
        load_settings(None, environ={}, workers={"pipeline_memory_mib": {"nope": 1024}})
    with pytest.raises(ConfigError, match="at least 256 MiB"):
        load_settings(None, environ={}, workers={"pipeline_memory_mib": {"minip": 100}})


def test_the_budget_is_capped_by_the_worker_limit() -> None:
    worker = WorkerProcess("t", 2 * GiB, cpu_only=True, budgets_mib={"minip": 1024, "dsa_av": 4096})
    assert worker.memory_limit_for("minip") == GiB
    assert worker.memory_limit_for("dsa_av") == 2 * GiB  # the worker limit wins
    assert worker.memory_limit_for("unlisted") == 2 * GiB
    default = WorkerProcess("t", 64 * GiB, cpu_only=True)
    assert default.memory_limit_for("dsa_perfusion") == (
        DEFAULT_PIPELINE_MEMORY_MIB["dsa_perfusion"] * 2**20
    )


def test_a_job_over_its_pipeline_budget_ends_and_other_pipelines_run(tmp_path: Path) -> None:
    """The same worker process: minip within its budget, then dsa_perfusion with a
    budget below what a worker with torch loaded holds, ended by the watchdog."""
    path = _phantom(tmp_path)
    worker = WorkerProcess("t", 4 * GiB, cpu_only=True, budgets_mib={"dsa_perfusion": 64})
    try:
        first = worker.run(
            _spec(path, tmp_path, "minip", 1), 120, lambda: None, 60, threading.Event()
        )
        assert first.ok, first.error
        over = worker.run(
            _spec(path, tmp_path, "dsa_perfusion", 2), 120, lambda: None, 60, threading.Event()
        )
        assert over.transient and "memory limit 0.0625 GiB exceeded" in over.error, over.error
        again = worker.run(
            _spec(path, tmp_path, "minip", 3), 120, lambda: None, 60, threading.Event()
        )
        assert again.ok and again.pid != first.pid  # the overrun's process was replaced
    finally:
        worker.close()


def test_the_node_applies_the_budget_of_the_jobs_pipeline(make_node: Any, tmp_path: Path) -> None:
    node = make_node(
        rules=[
            {"name": "xa", "match": {"modality": ["XA"]}, "pipelines": ["minip", "dsa_perfusion"]}
        ],
        workers={"max_attempts": 1, "pipeline_memory_mib": {"dsa_perfusion": 256}},
    )
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(XRayAngiographicImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.settings.ae_title)
    assert int(assoc.send_c_store(dcmread(_phantom(tmp_path))).Status) == 0
    assoc.release()
    jobs = wait_for(
        lambda: (
            rows
            if len(rows := node.db.query("SELECT * FROM jobs WHERE state IN ('done', 'failed')"))
            == 2
            else None
        ),
        180,
    )
    by_pipeline = {row["pipeline"]: row for row in jobs}
    assert by_pipeline["minip"]["state"] == "done"
    failed = by_pipeline["dsa_perfusion"]
    assert failed["state"] == "failed"
    assert "memory limit 0.25 GiB exceeded" in failed["error"], failed["error"]
