"""Time limits that grow with the run: a fixed part (``job_timeout_s``), one per
million decoded pixels of the run (``pipeline_seconds_per_megapixel``), at most
``job_timeout_max_s``; the worker process reports the run's size before it decodes,
and an attempt past its limit is ended with a reason naming the run's size."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from dicom_node.errors import ConfigError
from dicom_node.sandbox import JobSpec, TimeLimit, WorkerProcess
from dicom_node.settings import DEFAULT_PIPELINE_SECONDS_PER_MEGAPIXEL, load_settings
from dicom_node.temporal_workflow import InstanceRef, JobInput, activity_start_to_close
from pipelines import names
from tests.conftest import store_and_settle
from tests.dicomgen import xa_run

PIXELS = 512 * 512 * 20  # the run below: 5.24 million pixels


def _run(tmp_path: Path) -> Path:
    path = tmp_path / "run.dcm"
    xa_run(frames=20, rows=512, cols=512, seed=3).save_as(path, enforce_file_format=True)
    return path


def _job(**limits: float) -> JobInput:
    return JobInput(
        job_id=1,
        generation=0,
        run_id="r",
        pipeline="xa_coronary",
        study_uid="1.2",
        series_uid="1.2.3",
        instances=[InstanceRef("1.2.3.4", "a.dcm")],
        task_queue="q",
        max_attempts=3,
        backoff_base_s=5,
        backoff_max_s=600,
        heartbeat_timeout_s=60,
        **limits,
    )


def test_the_limit_grows_with_the_run_up_to_its_ceiling() -> None:
    assert TimeLimit(1800).seconds(10**9) == 1800  # a number alone: fixed
    grown = TimeLimit(1800, 8.0, 7200)
    assert grown.seconds() == 1800  # before the worker knows the run's size
    assert grown.seconds(94_371_840) == pytest.approx(1800 + 8 * 94.37184)  # 1024^2 x 90
    assert grown.seconds(10**9) == 7200
    assert TimeLimit(9000, 8.0, 7200).seconds(10**9) == 9000  # never below the fixed part
    assert TimeLimit(10, 1.0).seconds(10**7) == 20  # no ceiling


def test_every_pipeline_has_a_default_and_settings_merge_over_it() -> None:
    assert set(DEFAULT_PIPELINE_SECONDS_PER_MEGAPIXEL) == set(names())
    workers = load_settings(
        None, environ={}, workers={"pipeline_seconds_per_megapixel": {"xa_coronary": 20}}
    ).workers
    assert workers.pipeline_seconds_per_megapixel["xa_coronary"] == 20
    assert (
        workers.pipeline_seconds_per_megapixel["minip"]
        == DEFAULT_PIPELINE_SECONDS_PER_MEGAPIXEL["minip"]
    )
    assert (workers.job_timeout_s, workers.job_timeout_max_s) == (1800, 7200)
    with pytest.raises(ConfigError, match="pipeline_seconds_per_megapixel.nope: unknown pipeline"):
        load_settings(None, environ={}, workers={"pipeline_seconds_per_megapixel": {"nope": 1}})
    with pytest.raises(ConfigError, match="0 to 3600 s"):
        load_settings(None, environ={}, workers={"pipeline_seconds_per_megapixel": {"minip": -1}})


def test_a_scale_out_attempt_gets_the_limit_of_the_largest_run() -> None:
    """The workflow schedules the activity before the run's size is known: its
    start-to-close covers the ceiling; a workflow started before the fields existed
    keeps its fixed limit."""
    old = _job(job_timeout_s=1800)
    assert old.longest_s() == 1800
    assert activity_start_to_close(old).total_seconds() == 2 * 1800 + 600
    new = _job(job_timeout_s=1800, seconds_per_megapixel=8.0, job_timeout_max_s=7200)
    assert new.longest_s() == 7200
    assert activity_start_to_close(new).total_seconds() == 2 * 7200 + 600


def test_a_large_run_gets_the_time_its_pixels_need(tmp_path: Path) -> None:
    """The same run and pipeline in one worker process: ended by the fixed part alone,
    with the run's size in the reason (retried: transient); done when each pixel adds
    time; ended again at the ceiling, for good."""
    path = _run(tmp_path)
    worker = WorkerProcess("t", 8 * 2**30, cpu_only=True)
    worker.start()

    def attempt(job_id: int, limit: TimeLimit) -> Any:
        spec = JobSpec(job_id, "run", "dsa_av", (str(path),), str(tmp_path / str(job_id)), "cpu")
        return worker.run(spec, limit, lambda: None, 60, threading.Event())

    try:
        over = attempt(1, TimeLimit(0.4))
        assert over.transient and "timed out after 0.4 s, a run of 5.24 million pixels" in (
            over.error
        ), over.error
        done = attempt(2, TimeLimit(0.4, 20.0))
        assert done.ok, done.error
        assert done.time_limit == pytest.approx(0.4 + 20.0 * PIXELS / 1e6)  # with the outcome
        # the ceiling binds: another attempt would meet it too, so the job fails now
        capped = attempt(3, TimeLimit(0.4, 20.0, 0.8))
        assert not capped.transient, capped.error
        assert "timed out after 0.8 s, a run of 5.24 million pixels while" in capped.error
        assert "its limit for the run would be 105 s, above job_timeout_max_s: not retried" in (
            capped.error
        )
        assert capped.time_limit == 0.8
    finally:
        worker.close()


def test_the_node_applies_the_time_of_the_jobs_pipeline(
    make_node: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """dsa_av gets time per pixel and is done; dsa_ia gets none and is ended by the
    fixed part, with the reason stored."""
    node = make_node(
        rules=[{"name": "xa", "match": {"modality": ["XA"]}, "pipelines": ["dsa_av", "dsa_ia"]}],
        workers={
            "max_attempts": 1,
            "job_timeout_s": 0.4,
            "pipeline_seconds_per_megapixel": {"dsa_av": 20, "dsa_ia": 0},
        },
    )
    with caplog.at_level(logging.INFO, logger="dicom_node.jobs"):
        jobs = store_and_settle(node, dcmread(_run(tmp_path)), 2)
    by_pipeline = {row["pipeline"]: row for row in jobs}
    assert by_pipeline["dsa_av"]["state"] == "done"
    failed = by_pipeline["dsa_ia"]
    assert failed["state"] == "failed"
    assert "timed out after 0.4 s, a run of 5.24 million pixels" in failed["error"]
    assert "(attempt 1 of 1)" in failed["error"], failed["error"]
    done_lines = [r.getMessage() for r in caplog.records if "done:" in r.getMessage()]
    assert any("dsa_av" in line and "of a 105 s limit" in line for line in done_lines), done_lines
