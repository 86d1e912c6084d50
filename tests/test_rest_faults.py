"""A generated corpus of broken calls of the REST API (tests/rest_faults.py) sent as
raw bytes to a running node with tokens: every call gets an answer with a
documented HTTP status (README, "Behaviour on bad input"), never a 500 or a
dropped connection, and the node goes on: its jobs settle, it stores and it
answers a valid call."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import requests

from dicom_node.auth import hash_token
from tests.conftest import corpus_seed, send_storescu, wait_for
from tests.dicomgen import save, xa_run
from tests.rest_faults import corpus
from tests.test_stow_faults import _answers, _exchange, send_corpus

TOKEN = "rest-faults-every-scope-0123456789"
TOKENS = [
    {
        "name": "everything",
        "sha256": hash_token(TOKEN),
        "scopes": ["read", "operate", "store", "worker"],
    }
]
# README "Behaviour on bad input", REST routes: the node's answers, and those Python's
# http.server gives before a request reaches the node (400, 414, 431; 501 for a
# method the API has no handler for).
DOCUMENTED = {200, 303, 400, 401, 403, 404, 405, 406, 409, 411, 413, 414, 431, 501}


def test_a_corpus_of_broken_rest_calls_never_stops_the_node(
    make_node: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node = make_node(
        api={"tokens": TOKENS, "read_timeout_s": 2},
        rules=[
            {"name": "xa", "match": {"modality": ["XA"]}, "pipelines": ["minip", "dsa_perfusion"]}
        ],
        workers={"max_attempts": 1},
    )
    run = xa_run(frames=2, rows=32, cols=32, seed=77)  # dsa_perfusion fails on 2 frames
    send_storescu("ANGIO_NODE", node.port, [save(run, tmp_path / "in")])
    wait_for(lambda: node.db.query("SELECT 1 FROM jobs") and node.db.unsettled_jobs() == 0, 120)
    failed = node.db.query("SELECT id FROM jobs WHERE state = 'failed'")
    assert failed, "the 2-frame run's dsa_perfusion job should have failed"
    principal = node.auth.authenticate(f"Bearer {TOKEN}")
    ctx = {
        "study": str(run.StudyInstanceUID),
        "series": str(run.SeriesInstanceUID),
        "sop": str(run.SOPInstanceUID),
        "job": node.db.query("SELECT id FROM jobs WHERE state = 'done'")[0]["id"],
        "failed_job": failed[0]["id"],
        "token": TOKEN,
        "csrf": node.auth.csrf(principal),
    }
    caplog.set_level(logging.ERROR, logger="dicom_node")
    problems, seen, _ = send_corpus(node.api_port, corpus(corpus_seed(31), 330, ctx), DOCUMENTED)
    assert not problems, "\n".join(problems)
    # the corpus reaches the routes, not only the parsers in front of them
    assert seen.get(200, 0) > 20 and seen.get(400, 0) > 20 and len(seen) >= 7, seen
    defects = [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.ERROR
        and r.name.startswith(("dicom_node.api", "dicom_node.worker_api"))
    ]
    assert not defects, defects

    # a body cut short is named as such, on the API's routes and on the workers'
    for path in ("/trigger", f"/worker/jobs/{ctx['job']}/started"):
        cut = (
            f"POST {path} HTTP/1.1\r\nHost: node\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Type: application/json\r\nContent-Length: 40\r\n\r\n"
            '{"generation": 1}'
        ).encode()
        ((status, body),) = _answers(_exchange(node.api_port, cut))
        assert status == 400 and b"shorter than its Content-Length" in body, (path, body)

    # the node goes on: the jobs the corpus queued settle, a valid call is answered,
    # and a new run is stored and processed
    wait_for(lambda: node.db.unsettled_jobs() == 0, 120, what="the queued jobs to settle")
    answer = requests.get(
        f"http://127.0.0.1:{node.api_port}/jobs",
        params={"series": ctx["series"]},
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=30,
    )
    assert answer.status_code == 200 and answer.json()["jobs"], answer.text
    second = xa_run(frames=2, rows=32, cols=32, seed=78)
    send_storescu("ANGIO_NODE", node.port, [save(second, tmp_path / "in2")])
    wait_for(
        lambda: node.db.query(
            "SELECT 1 FROM jobs j JOIN runs r ON r.run_id = j.run_id WHERE r.series_uid = ? "
            "AND j.state = 'done'",
            (str(second.SeriesInstanceUID),),
        ),
        120,
        what="the next run's minip job",
    )


def test_a_defect_of_the_node_is_answered_500_and_logged(
    make_node: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The last resort: an exception no handler expected (here a defect put into
    /status) gets a 500 with a JSON error, not a connection dropped unanswered, and
    its trace in the log; the next request is served."""
    node = make_node()
    url = f"http://127.0.0.1:{node.api_port}"

    def broken() -> None:
        raise KeyError("a defect")

    monkeypatch.setattr(node, "status", broken)
    caplog.set_level(logging.ERROR, logger="dicom_node.api")
    answer = requests.get(f"{url}/status", timeout=30)
    assert answer.status_code == 500 and "internal error" in answer.json()["error"]
    (record,) = [r for r in caplog.records if r.name == "dicom_node.api"]
    assert "GET /status: internal error" in record.getMessage() and record.exc_info
    assert requests.get(f"{url}/health", timeout=30).status_code == 200
