"""Per-pipeline memory budgets: settings defaults from the measured peaks, the
sandbox ends a job whose pipeline outgrows its budget (as it ends any memory
overrun), and the node records it as it records other overruns."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from dicom_node.errors import ConfigError
from dicom_node.sandbox import JobSpec, WorkerProcess
from dicom_node.settings import (
    DEFAULT_PIPELINE_MEMORY_BYTES_PER_PIXEL,
    DEFAULT_PIPELINE_MEMORY_MIB,
    load_settings,
)
from pipelines import names
from tests.conftest import store_and_settle
from tests.dicomgen import xa_run

GiB = 2**30


def _phantom(tmp_path: Path, size: int = 256) -> Path:
    from training.phantoms import dsa

    written = dsa.generate(7, size=size, frames=20).write(tmp_path / "phantom")
    return next(p for p in written if p.name == "dsa.dcm")


def _spec(path: Path, out: Path, pipeline: str, job_id: int) -> JobSpec:
    return JobSpec(job_id, "run", pipeline, (str(path),), str(out / str(job_id)), "cpu")


def test_every_pipeline_has_a_default_budget_and_settings_merge_over_it() -> None:
    assert set(DEFAULT_PIPELINE_MEMORY_MIB) == set(names())
    assert set(DEFAULT_PIPELINE_MEMORY_BYTES_PER_PIXEL) == set(names())
    grown = load_settings(
        None, environ={}, workers={"pipeline_memory_bytes_per_pixel": {"xa_coronary": 50}}
    ).workers.pipeline_memory_bytes_per_pixel
    assert (
        grown["xa_coronary"] == 50
        and grown["minip"] == DEFAULT_PIPELINE_MEMORY_BYTES_PER_PIXEL["minip"]
    )
    with pytest.raises(ConfigError, match="pipeline_memory_bytes_per_pixel.nope: unknown pipeline"):
        load_settings(None, environ={}, workers={"pipeline_memory_bytes_per_pixel": {"nope": 1}})
    with pytest.raises(ConfigError, match="0 to 4096 bytes"):
        load_settings(None, environ={}, workers={"pipeline_memory_bytes_per_pixel": {"minip": -1}})
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


def test_the_budget_grows_with_the_run_and_keeps_the_clinical_sizes_where_they_were() -> None:
    """A 1024^2 x 90 coronary cine peaks at 3.1 GB (bench.budget, classical path): over
    the 2 GiB that every xa_coronary job had, within what its pixels now add. At
    the clinical sizes the budgets are at least what they were as fixed budgets."""
    default = WorkerProcess("t", 64 * GiB, cpu_only=True)
    cine = 1024 * 1024 * 90
    assert default.memory_limit_for("xa_coronary", cine) > 3.05e9 * 1.25
    before = {  # the fixed budgets (MiB) and the runs bench.budget measured them on
        "minip": (1536, 1024 * 1024 * 30),
        "dsa_av": (3584, 1024 * 1024 * 30),
        "dsa_ia": (3328, 1024 * 1024 * 30),
        "dsa_perfusion": (2048, 1024 * 1024 * 30),
        "xa_coronary": (2048, 512 * 512 * 90),
        "rotational_dla": (4096, 512**3),
    }
    for pipeline, (mib, pixels) in before.items():
        assert mib * 2**20 <= default.memory_limit_for(pipeline, pixels) < (mib + 256) * 2**20
    capped = WorkerProcess("t", 2 * GiB, cpu_only=True)
    assert capped.memory_limit_for("xa_coronary", cine) == 2 * GiB


def test_a_scale_out_worker_takes_the_budgets_from_its_own_file(tmp_path: Path) -> None:
    from dicom_node.worker import load_worker_config

    cfg = tmp_path / "worker.toml"
    cfg.write_text(
        "pipeline_memory_mib = { xa_coronary = 1024 }\n"
        "pipeline_memory_bytes_per_pixel = { xa_coronary = 40 }\n"
        '[node]\nurl = "http://n:8780"\ntoken = "t"\n'
    )
    config = load_worker_config(cfg, environ={})
    assert config.pipeline_memory_mib["xa_coronary"] == 1024
    assert config.pipeline_memory_mib["dsa_av"] == DEFAULT_PIPELINE_MEMORY_MIB["dsa_av"]
    assert config.pipeline_memory_bytes_per_pixel["xa_coronary"] == 40
    cfg.write_text(
        'pipeline_memory_mib = { x = 512 }\n[node]\nurl = "http://n:8780"\ntoken = "t"\n'
    )
    with pytest.raises(ConfigError, match="pipeline_memory_mib.x: unknown pipeline"):
        load_worker_config(cfg, environ={})


def test_a_large_run_gets_the_memory_its_pixels_need(tmp_path: Path) -> None:
    """The same 1024^2 x 60 run and pipeline: ended by the fixed part of the budget
    alone, which the error reports with the run's size; done when each pixel adds
    what the settings say (the worker learns the size before it decodes)."""
    ds = xa_run(frames=60, rows=1024, cols=1024, seed=3)
    path = tmp_path / "large.dcm"
    ds.save_as(path, enforce_file_format=True)
    fixed = WorkerProcess(
        "t", 8 * GiB, cpu_only=True, budgets_mib={"minip": 384}, bytes_per_pixel={"minip": 0}
    )
    grown = WorkerProcess(
        "t", 8 * GiB, cpu_only=True, budgets_mib={"minip": 384}, bytes_per_pixel={"minip": 20}
    )
    capped = WorkerProcess(
        "t", 2**29, cpu_only=True, budgets_mib={"minip": 384}, bytes_per_pixel={"minip": 20}
    )
    try:
        over = fixed.run(
            _spec(path, tmp_path, "minip", 1), 300, lambda: None, 60, threading.Event()
        )
        assert over.transient and "memory limit 0.375 GiB exceeded" in over.error, over.error
        assert "a run of 62.9 million pixels" in over.error, over.error
        assert over.budget == 384 * 2**20 < over.peak_rss
        done = grown.run(
            _spec(path, tmp_path, "minip", 2), 300, lambda: None, 60, threading.Event()
        )
        assert done.ok, done.error
        assert done.budget == 384 * 2**20 + 20 * 1024 * 1024 * 60  # reported with the outcome
        assert 384 * 2**20 < done.peak_rss < done.budget
        # memory_limit_mib (0.5 GiB here) caps the run's budget (1.55 GiB): another
        # attempt would meet the same cap, so the job fails now, saying what to raise
        ended = capped.run(
            _spec(path, tmp_path, "minip", 3), 300, lambda: None, 60, threading.Event()
        )
        assert not ended.transient, ended.error
        assert "memory limit 0.5 GiB exceeded" in ended.error, ended.error
        assert "its budget for the run would be 1.55 GiB, above memory_limit_mib: not " in (
            ended.error
        )
    finally:
        fixed.close()
        grown.close()
        capped.close()


def test_a_job_over_its_pipeline_budget_ends_and_other_pipelines_run(tmp_path: Path) -> None:
    """The same worker process: minip within its budget, then dsa_perfusion with a
    budget below what a worker with torch loaded holds, ended by the watchdog."""
    path = _phantom(tmp_path)
    worker = WorkerProcess(
        "t", 4 * GiB, cpu_only=True, budgets_mib={"dsa_perfusion": 64}, bytes_per_pixel={}
    )
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
        workers={
            "max_attempts": 1,
            "pipeline_memory_mib": {"dsa_perfusion": 256},
            "pipeline_memory_bytes_per_pixel": {"dsa_perfusion": 0},
        },
    )
    jobs = store_and_settle(node, dcmread(_phantom(tmp_path)), 2)
    by_pipeline = {row["pipeline"]: row for row in jobs}
    assert by_pipeline["minip"]["state"] == "done"
    failed = by_pipeline["dsa_perfusion"]
    assert failed["state"] == "failed"
    assert "memory limit 0.25 GiB exceeded" in failed["error"], failed["error"]


def test_a_run_over_the_ceiling_fails_at_once_saying_what_to_raise(
    make_node: Any, tmp_path: Path
) -> None:
    """memory_limit_mib caps dsa_perfusion's budget: the overrun is not retried (another
    attempt meets the same cap) although max_attempts allows three."""
    node = make_node(
        rules=[{"name": "xa", "match": {"modality": ["XA"]}, "pipelines": ["dsa_perfusion"]}],
        workers={"max_attempts": 3, "memory_limit_mib": 256, "backoff_base_s": 0.1},
    )
    job = store_and_settle(node, dcmread(_phantom(tmp_path)), 1)[0]
    assert job["state"] == "failed", dict(job)
    assert job["attempts"] == 1, dict(job)
    assert "memory limit 0.25 GiB exceeded" in job["error"], job["error"]
    assert "above memory_limit_mib: not retried (raise memory_limit_mib" in job["error"]
    assert "(attempt" not in job["error"]
