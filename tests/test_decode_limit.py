"""Decoding's own time limit (``decode_timeout_s`` plus ``decode_seconds_per_megapixel``,
within the job's limit): a decoder stuck on what a sender wrote is ended long before the
job's limit, which is 1800 s at least, on every attempt."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import JPEG2000Lossless

from dicom_node.errors import ConfigError
from dicom_node.sandbox import JobSpec, TimeLimit, WorkerProcess
from dicom_node.settings import load_settings
from tests.conftest import store_and_settle
from tests.dicomgen import xa_run


def _run(compressed: bool) -> Dataset:
    """A 512^2 x 20 XA run (5.24 million pixels); JPEG 2000 takes some 0.7 s to decode
    on a 2-core machine, the uncompressed run a few hundredths."""
    ds = xa_run(frames=20, rows=512, cols=512, seed=3)
    if compressed:
        ds.compress(JPEG2000Lossless)
    return ds


def test_the_settings_and_their_defaults(tmp_path: Path) -> None:
    workers = load_settings(None, environ={}).workers
    assert (workers.decode_timeout_s, workers.decode_seconds_per_megapixel) == (120, 1)
    with pytest.raises(ConfigError, match="decode_timeout_s"):
        load_settings(None, environ={}, workers={"decode_timeout_s": 0})
    with pytest.raises(ConfigError, match="decode_seconds_per_megapixel"):
        load_settings(None, environ={}, workers={"decode_seconds_per_megapixel": -1})
    from dicom_node.worker import load_worker_config

    cfg = tmp_path / "worker.toml"
    cfg.write_text(
        "decode_timeout_s = 30\ndecode_seconds_per_megapixel = 2.5\n"
        '[node]\nurl = "http://n:8780"\ntoken = "t"\n'
    )
    config = load_worker_config(cfg, environ={})
    assert (config.decode_timeout_s, config.decode_seconds_per_megapixel) == (30, 2.5)


def test_decoding_is_ended_at_its_own_limit_and_computing_is_not(tmp_path: Path) -> None:
    """One worker process: the JPEG 2000 run is ended while decoding at a 0.05 s limit,
    with the run's size in the reason (retried: transient); done when each pixel adds
    time to it. The uncompressed run's dsa_av job computes for longer than a 0.3 s
    decoding limit and is done: the limit holds for decoding only."""
    paths = {}
    for compressed in (True, False):
        paths[compressed] = tmp_path / f"run-{compressed}.dcm"
        _run(compressed).save_as(paths[compressed], enforce_file_format=True)

    def attempt(job_id: int, compressed: bool, decode: TimeLimit) -> Any:
        worker = WorkerProcess("t", 8 * 2**30, cpu_only=True, decode_limit=decode)
        spec = JobSpec(
            job_id, "run", "dsa_av", (str(paths[compressed]),), str(tmp_path / str(job_id)), "cpu"
        )
        try:
            return worker.run(spec, TimeLimit(600), lambda: None, 60, threading.Event())
        finally:
            worker.close()

    stuck = attempt(1, True, TimeLimit(0.05))
    assert stuck.error is not None and stuck.transient, stuck.error
    assert stuck.error.startswith(
        "decoder timed out after 0.05 s, a run of 5.24 million pixels while decoding; "
        "the pixel data may be malformed"
    ), stuck.error
    done = attempt(2, True, TimeLimit(0.05, 2.0))
    assert done.ok, done.error
    computing = attempt(3, False, TimeLimit(0.3))
    assert computing.ok, computing.error
    assert dict(computing.timings)["computing"] > 0.3, computing.timings


def test_the_node_applies_the_decoding_limit(make_node: Any) -> None:
    """Through the node's embedded engine: the stuck decoding's job fails with the
    reason, after one attempt here."""
    node = make_node(
        rules=[{"name": "xa", "match": {"modality": ["XA"]}, "pipelines": ["minip"]}],
        workers={"max_attempts": 1, "decode_timeout_s": 0.05, "decode_seconds_per_megapixel": 0},
    )
    (job,) = store_and_settle(node, _run(True), 1)
    assert job["state"] == "failed"
    assert (
        "decoder timed out after 0.05 s, a run of 5.24 million pixels while decoding"
        in (job["error"])
    ), job["error"]
