"""Scale-out (issue 15): the index's transitions for dispatched jobs, the workers' REST
routes (WADO-RS of the spool, results by STOW-RS, the worker scope), the settings,
and the whole thing for real: the Temporal dev server, the node and workers as
separate processes (workers in their own network and mount namespaces where this
runs as root), one run end to end, and ``/status`` in the same shape in both
engines. The failure suites are in ``tests/test_scale_out_failures.py``."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import requests
from pydicom import dcmread
from pydicom.uid import XRayAngiographicImageStorage
from pynetdicom import AE

from dicom_node.auth import hash_token
from dicom_node.db import Database, JobState, ResultFile, RunState
from dicom_node.errors import ConfigError
from dicom_node.settings import load_settings
from dicom_node.stow import split_multipart
from dicom_node.temporal_engine import OLDER_PRIORITY
from dicom_node.temporal_workflow import workflow_id
from tests.conftest import wait_for
from tests.dicomgen import save, xa_run
from tests.scaleout_fixture import Site, mounts_tmpfs_at, same_netns, temporal_bin

WORKER, READER = "worker-token-0123456789", "reader-token-0123456789"
TOKENS = [
    {"name": "w1", "sha256": hash_token(WORKER), "scopes": ["worker"]},
    {"name": "ops", "sha256": hash_token(READER), "scopes": ["read", "operate", "store"]},
]
AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def _routed_job(db: Database, tmp_path: Path, pipeline: str = "minip") -> tuple[int, str]:
    from dicom_node.db import InstanceRecord

    ds = xa_run(seed=3)
    path = save(ds, tmp_path, "run.dcm")
    run = str(ds.SOPInstanceUID)
    db.record_instance(
        InstanceRecord(
            run,
            str(ds.SOPClassUID),
            str(ds.SeriesInstanceUID),
            str(ds.StudyInstanceUID),
            run,
            path,
            path.stat().st_size,
            "1.2.840.10008.1.2.1",
            6,
            "MODALITY",
        )
    )
    assert db.complete_run(run, "test")
    (job,) = db.route_run(run, "xa", [pipeline], ["dest"])
    return job, run


def test_dispatched_jobs_record_once_and_only_for_their_generation(tmp_path: Path) -> None:
    db = Database(tmp_path / "node.sqlite")
    assert db.index_id() == Database(tmp_path / "node.sqlite").index_id()  # stable
    job, _run = _routed_job(db, tmp_path)
    (due,) = db.jobs_to_dispatch(10)
    assert (due.id, due.generation) == (job, 0)
    assert db.mark_dispatched(job, 0) and not db.mark_dispatched(job, 0)
    assert db.jobs_to_dispatch(10) == []  # dispatched once
    assert not db.dispatched_job_started(job, 1, 1, "w")  # not this generation
    assert db.dispatched_job_started(job, 0, 1, "worker-a")
    assert db.dispatched_job_started(job, 0, 2, "worker-b")  # a retry on another worker
    row = db.query("SELECT state, attempts, worker FROM jobs WHERE id=?", (job,))[0]
    assert (row["state"], row["attempts"], row["worker"]) == ("running", 2, "worker-b")
    result = ResultFile(tmp_path / "r.dcm", "1.2.3", "1.2.3.4", "1.2.3.5", "MinIP")
    assert not db.finish_dispatched_job(job, 1, 2, "w", [result], [])  # superseded
    assert db.finish_dispatched_job(job, 0, 2, "worker-b", [result], ["ok"])
    assert db.finish_dispatched_job(job, 0, 2, "worker-b", [result], ["ok"])  # a retried record
    assert db.query("SELECT COUNT(*) n FROM outbox")[0]["n"] == 1
    assert not db.fail_dispatched_job(job, 0, 2, "late")  # done stays done
    assert not db.dispatched_job_open(job, 0)


def test_an_operator_retry_starts_a_new_generation_and_the_embedded_engine_takes_back(
    tmp_path: Path,
) -> None:
    db = Database(tmp_path / "node.sqlite")
    job, _run = _routed_job(db, tmp_path)
    db.mark_dispatched(job, 0)
    assert db.fail_dispatched_job(job, 0, 3, "worker lost (attempt 3 of 3)")
    assert db.fail_dispatched_job(job, 0, 3, "again")  # idempotent
    assert db.retry_failed_job(job)
    (due,) = db.jobs_to_dispatch(10)
    assert due.generation == 1
    assert workflow_id("abc", job, 1) == f"angio-abc-job-{job}-r1"
    assert not db.finish_dispatched_job(job, 0, 1, "old workflow", [], [])
    db.mark_dispatched(job, 1)
    db.dispatched_job_started(job, 1, 1, "w")
    # back on the embedded engine: the dispatched job is taken back, its workflow superseded
    assert db.take_back_dispatched() == 1
    row = db.query("SELECT state, generation, dispatched_at FROM jobs WHERE id=?", (job,))[0]
    assert (row["state"], row["generation"], row["dispatched_at"]) == ("queued", 2, None)
    assert not db.dispatched_job_open(job, 1)
    assert db.claim_job("embedded", 60, 3) is not None


def test_engine_settings_name_the_key() -> None:
    with pytest.raises(ConfigError, match="engine.kind"):
        load_settings(None, environ={}, engine={"kind": "celery"})
    with pytest.raises(ConfigError, match="engine.queues.nosuch: unknown pipeline"):
        load_settings(None, environ={}, engine={"kind": "temporal", "queues": {"nosuch": "gpu"}})
    with pytest.raises(ConfigError, match="needs the REST API"):
        load_settings(None, environ={}, engine={"kind": "temporal"}, api={"enabled": False})
    with pytest.raises(ConfigError, match="engine.address"):
        load_settings(None, environ={}, engine={"address": "http://x:7233/"})
    s = load_settings(None, environ={}, engine={"kind": "temporal", "queues": {"dsa_av": "gpu"}})
    assert (s.engine.queue_for("dsa_av"), s.engine.queue_for("minip")) == ("gpu", "angio-jobs")


def test_worker_config_reads_its_token_and_names_bad_keys(tmp_path: Path) -> None:
    from dicom_node.worker import load_worker_config

    token = tmp_path / "token"
    token.write_text("s3cret\n")
    cfg = tmp_path / "worker.toml"
    cfg.write_text(
        f'[engine]\ntask_queue = "gpu"\n[node]\nurl = "http://n:8780"\ntoken_file = "{token}"\n'
    )
    config = load_worker_config(cfg, environ={"DICOM_NODE_WORKER_CONCURRENCY": "2"})
    assert config.node.token == "s3cret" and config.concurrency == 2
    assert "s3cret" not in repr(config)
    cfg.write_text('[node]\nurl = "ftp://n"\nconcurency = 2\n')
    with pytest.raises(ConfigError) as err:
        load_worker_config(cfg, environ={})
    assert "node.url" in str(err.value) and "node.concurency: unknown key" in str(err.value)


def _send(port: int, datasets: list[Any]) -> None:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(XRayAngiographicImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="ANGIO_NODE")
    for ds in datasets:
        assert int(assoc.send_c_store(ds).Status) == 0
    assoc.release()


def _offline_temporal_node(make_node: Any) -> Any:
    """A node with the Temporal engine and no Temporal server: it receives and routes, its
    jobs stay queued, and its worker routes answer (nothing runs them meanwhile)."""
    return make_node(
        api={"tokens": TOKENS},
        engine={"kind": "temporal", "address": "127.0.0.1:9"},
        rules=[{"name": "xa", "match": {"modality": ["XA"]}, "pipelines": ["minip"]}],
    )


def test_wado_rs_serves_the_spool_as_stored_to_workers_only(make_node: Any) -> None:
    node = _offline_temporal_node(make_node)
    ds = xa_run(seed=5)
    _send(node.port, [ds])
    base = f"http://127.0.0.1:{node.api_port}/dicom-web/studies/{ds.StudyInstanceUID}"
    url = f"{base}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
    assert requests.get(url, timeout=10).status_code == 401
    reader = {"Authorization": f"Bearer {READER}"}
    assert requests.get(url, headers=reader, timeout=10).status_code == 403
    worker = {"Authorization": f"Bearer {WORKER}", "Accept": AS_STORED}
    resp = requests.get(url, headers=worker, timeout=10)
    assert resp.status_code == 200, resp.text
    ((ctype, data),) = split_multipart(resp.headers["Content-Type"], resp.content)
    stored = next((node.settings.storage_dir / "spool").rglob(f"{ds.SOPInstanceUID}.dcm"))
    assert ctype == "application/dicom" and data == stored.read_bytes()
    series = requests.get(f"{base}/series/{ds.SeriesInstanceUID}", headers=worker, timeout=10)
    assert len(split_multipart(series.headers["Content-Type"], series.content)) == 1
    # a transfer syntax the node would have to transcode to is refused, as is a guess
    jpeg = {
        **worker,
        "Accept": 'multipart/related; type="application/dicom"; '
        "transfer-syntax=1.2.840.10008.1.2.4.50",
    }
    assert requests.get(url, headers=jpeg, timeout=10).status_code == 406
    assert requests.get(url + "9", headers=worker, timeout=10).status_code == 404
    assert (
        requests.get(
            f"{base}/series/1.2.3/instances/../../x", headers=worker, timeout=10
        ).status_code
        == 404
    )
    audit = (node.settings.storage_dir / "audit" / "audit.jsonl").read_text().splitlines()
    retrieved = [json.loads(x) for x in audit if '"instances-retrieved"' in x]
    assert retrieved and retrieved[0]["who"] == "w1"
    assert retrieved[0]["sop_instance_uids"] == [str(ds.SOPInstanceUID)]


def test_results_come_back_by_stow_rs_only_for_the_open_job(make_node: Any) -> None:
    node = _offline_temporal_node(make_node)
    ds = xa_run(seed=6)
    _send(node.port, [ds])
    job = wait_for(lambda: node.db.query("SELECT id FROM jobs"), 30)[0]["id"]
    # Temporal is unreachable: the job waits, queued and not dispatched
    assert node.db.query("SELECT state, dispatched_at FROM jobs")[0]["state"] == "queued"
    api = f"http://127.0.0.1:{node.api_port}/worker/jobs/{job}"
    auth = {"Authorization": f"Bearer {WORKER}"}
    started = requests.post(
        f"{api}/started",
        json={"generation": 0, "attempt": 1, "worker": "gpu-7"},
        headers=auth,
        timeout=10,
    )
    assert started.status_code == 200, started.text
    row = node.db.query("SELECT state, attempts, worker FROM jobs WHERE id=?", (job,))[0]
    assert (row["state"], row["attempts"], row["worker"]) == ("running", 1, "gpu-7")
    result = xa_run(seed=7)  # any DICOM object stands in for a result here
    buf = io.BytesIO()
    result.save_as(buf, enforce_file_format=True)
    body = b"--xyz\r\nContent-Type: application/dicom\r\n\r\n" + buf.getvalue() + b"\r\n--xyz--\r\n"
    headers = {**auth, "Content-Type": 'multipart/related; type="application/dicom"; boundary=xyz'}
    resp = requests.post(f"{api}/results?generation=0", data=body, headers=headers, timeout=10)
    assert resp.status_code == 200 and resp.json()["stored"] == [str(result.SOPInstanceUID)]
    written = node.settings.storage_dir / "results" / str(job) / f"{result.SOPInstanceUID}.dcm"
    assert written.read_bytes() == buf.getvalue()
    assert (
        requests.post(
            f"{api}/results?generation=1", data=body, headers=headers, timeout=10
        ).status_code
        == 409
    )
    bad = body.replace(b"DICM", b"XXXX")
    assert (
        requests.post(
            f"{api}/results?generation=0", data=bad, headers=headers, timeout=10
        ).status_code
        == 400
    )
    reader = {**headers, "Authorization": f"Bearer {READER}"}
    assert (
        requests.post(
            f"{api}/results?generation=0", data=body, headers=reader, timeout=10
        ).status_code
        == 403
    )
    # the spool is untouched by results: a result never becomes a run
    assert node.db.query("SELECT COUNT(*) n FROM runs")[0]["n"] == 1


def test_a_worker_gets_a_run_s_instances_only_for_the_open_job(make_node: Any) -> None:
    """The list a workflow input leaves out when the run has too many instances."""
    node = _offline_temporal_node(make_node)
    ds = xa_run(seed=8)
    _send(node.port, [ds])
    job = wait_for(lambda: node.db.query("SELECT id FROM jobs"), 30)[0]["id"]
    api = f"http://127.0.0.1:{node.api_port}/worker/jobs/{job}/instances"
    auth = {"Authorization": f"Bearer {WORKER}"}
    resp = requests.get(api, params={"generation": 0}, headers=auth, timeout=10)
    assert resp.status_code == 200, resp.text
    (listed,) = resp.json()["instances"]
    sop = str(ds.SOPInstanceUID)
    assert listed == {
        "sop_instance_uid": sop,
        "relpath": f"spool/{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{sop}.dcm",
    }
    assert (node.settings.storage_dir / listed["relpath"]).is_file()
    for params, headers, status in (
        ({"generation": 1}, auth, 409),  # not this job's workflow
        ({"generation": "x"}, auth, 400),
        ({}, auth, 400),
        ({"generation": 0}, {"Authorization": f"Bearer {READER}"}, 403),
    ):
        got = requests.get(api, params=params, headers=headers, timeout=10)
        assert got.status_code == status, (params, got.status_code, got.text)
    node.db.fail_dispatched_job(job, 0, 1, "done with")
    assert requests.get(api, params={"generation": 0}, headers=auth, timeout=10).status_code == 409


needs_temporal = pytest.mark.skipif(temporal_bin() is None, reason="temporal-bin not installed")


def _shape(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return [_shape(value[0])] if value else []
    return type(value).__name__ if value is not None else "null"


def _status(site: Site) -> tuple[dict[str, Any], dict[str, Any]]:
    rest = requests.get(
        f"{site.api_url}/status", timeout=10, headers={"Authorization": f"Bearer {site.ops_token}"}
    ).json()
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "dicom_node.cli",
            "status",
            "--json",
            "--config",
            str(site.root / "node.toml"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return rest, json.loads(cli.stdout)


@needs_temporal
@pytest.mark.slow
def test_a_run_through_temporal_workers_and_the_same_status_as_embedded(tmp_path: Path) -> None:
    runs = [xa_run(frames=10, rows=96, cols=96, seed=s) for s in (1, 2)]
    shapes, results = {}, {}
    # The node's pipeline options reach its Temporal workers: they enter the result
    # UIDs, so both engines deliver the same UIDs only when both ran with them.
    options = "[workers.pipeline_options.xa_coronary]\nmin_component_px = 3"
    for engine in ("embedded", "temporal"):
        # with Temporal only over mutual TLS (a TLS-terminating relay in front of the dev server)
        site = Site(
            tmp_path / engine,
            workers=1,
            engine=engine,
            pipelines=("minip", "xa_coronary"),
            temporal_tls=True,
            workers_extra=options,
        )
        try:
            site.start()
            if engine == "temporal" and site.isolation.kind != "none":
                worker = site.workers[0].pid
                assert mounts_tmpfs_at(worker, site.storage), "the worker sees the node's storage"
                assert site.isolation.kind != "netns" or not same_netns(worker)
            assert len(site.send(runs)) == 2
            site.wait_settled(4, 180, f"the {engine} node to finish")
            jobs = site.rows("SELECT * FROM jobs")
            assert all(j["state"] == JobState.DONE for j in jobs), [dict(j) for j in jobs]
            sent = {r["sop_instance_uid"] for r in site.rows("SELECT * FROM outbox")}
            assert sent and site.received() == dict.fromkeys(sent, 1)
            results[engine] = sent
            assert all(r["state"] == RunState.ROUTED for r in site.rows("SELECT * FROM runs"))
            rest, cli = _status(site)
            # The live memory pool is the embedded engine's (a scale-out worker has its
            # own, on its machine); the rest is the index, which the CLI reads too.
            memory = rest.pop("jobs_memory", None)
            assert (memory is not None) == (engine == "embedded"), memory
            assert _shape(rest) == _shape(cli)
            shapes[engine] = _shape(rest)
            if engine == "temporal":
                assert {j["worker"] for j in jobs} == {"worker-0"}
                index = site.db().index_id()
                assert site.temporal is not None
                ids = {w.id for w in site.temporal.workflows()}
                assert ids == {workflow_id(index, j["id"], 0) for j in jobs}
                described = site.temporal.describe(workflow_id(index, jobs[0]["id"], 0))
                assert described.status.name == "COMPLETED"
                # the generator's runs are dated 2026-01-01: older runs, after live ones
                info = described.raw_description.workflow_execution_info
                assert info.priority.priority_key == OLDER_PRIORITY
                # its sender, the fairness key of a server that takes senders in turn
                assert info.priority.fairness_key == "MODALITY"
                timings = json.loads(jobs[0]["timings"])
                assert {"fetching", "computing", "returning"} <= set(timings)
                for f in site.dest.files():
                    assert dcmread(f, stop_before_pixels=True).SOPInstanceUID in sent
        finally:
            site.stop()
    assert shapes["embedded"] == shapes["temporal"]
    assert results["embedded"] == results["temporal"]


@needs_temporal
def test_temporal_over_mutual_tls_needs_the_ca_and_a_client_certificate(tmp_path: Path) -> None:
    import asyncio

    from dicom_node.settings import EngineSettings
    from dicom_node.temporal_client import connect
    from tests.scaleout_fixture import TemporalDevServer
    from tests.tlsca import TestCA

    ca = TestCA(tmp_path / "ca")
    server, client = ca.issue("t", "localhost", True), ca.issue("c", "angio", False)
    temporal = TemporalDevServer(tmp_path / "t", tls=(server.cert, server.key, ca.cert))
    temporal.start()

    def reaches(**engine: Any) -> bool:
        settings = EngineSettings(address=temporal.address, tls_server_name="localhost", **engine)

        async def probe() -> bool:
            c = await asyncio.wait_for(connect(settings, "test"), 10)
            await asyncio.wait_for(c.count_workflows(), 10)
            return True

        try:
            return asyncio.run(probe())
        except Exception:  # noqa: BLE001 - refused, in whatever form the SDK raises it
            return False

    try:
        mutual = {"tls_cert_file": client.cert, "tls_key_file": client.key}
        assert reaches(tls=True, tls_ca_file=ca.cert, **mutual)
        assert not reaches(tls=True, tls_ca_file=ca.cert)  # no client certificate
        assert not reaches(tls=True, **mutual)  # the server's CA unknown
        assert not reaches()  # plain gRPC
    finally:
        temporal.close()


def test_a_worker_fetches_again_when_a_transfer_breaks_off_or_the_node_is_away(
    tmp_path: Path,
) -> None:
    """The worker's node client in a real activity context (temporalio's
    ActivityEnvironment): a WADO-RS answer cut off mid-body is fetched again, a node
    that is not listening yet is waited for, heartbeating, and no partial file stays."""
    import socket
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from temporalio.testing import ActivityEnvironment

    from dicom_node.worker import Beat, NodeClient, NodeLink

    payload = b"DICM-like bytes " * 4096
    body = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + payload + b"\r\n--b--\r\n"
    calls: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_: Any) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            calls.append(self.headers["Authorization"])
            self.send_response(200)
            self.send_header(
                "Content-Type", 'multipart/related; type="application/dicom"; boundary=b'
            )
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if len(calls) == 1:  # the node dies in the middle of the first answer
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.wfile.write(body)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    servers: list[ThreadingHTTPServer] = []

    def node_comes_back() -> None:
        time.sleep(1.5)
        server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        servers.append(server)
        server.serve_forever()

    threading.Thread(target=node_comes_back, daemon=True).start()
    beats: list[Any] = []
    env = ActivityEnvironment()
    env.on_heartbeat = lambda *d: beats.append(d)
    link = NodeLink(url=f"http://127.0.0.1:{port}", token="t0ken", wait_s=30)

    def fetch() -> list[Path]:
        client = NodeClient(link, Beat(), attempt=1)
        return client.fetch("/dicom-web/x", tmp_path / "run", "fetching the run")

    try:
        files = env.run(fetch)
    finally:
        for server in servers:
            server.shutdown()
    assert calls == ["Bearer t0ken", "Bearer t0ken"]
    assert [f.name for f in files] == ["000001.dcm"] and files[0].read_bytes() == payload
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["000001.dcm"]
    assert ("fetching the run",) in beats  # it heartbeat while it waited for the node


@needs_temporal
@pytest.mark.slow
def test_a_worker_that_shares_the_storage_reads_and_writes_it_directly(tmp_path: Path) -> None:
    site = Site(tmp_path / "site", workers=1, isolate=False, shared_storage=True)
    try:
        site.start()
        assert site.send([xa_run(frames=10, rows=96, cols=96, seed=9)])
        site.wait_settled(2, 180, "the run to finish")
        jobs = site.rows("SELECT * FROM jobs")
        assert all(j["state"] == "done" and j["worker"] == "worker-0" for j in jobs)
        sent = {r["sop_instance_uid"] for r in site.rows("SELECT * FROM outbox")}
        assert sent and site.received() == dict.fromkeys(sent, 1)
        audit = (site.storage / "audit" / "audit.jsonl").read_text()
        assert '"instances-retrieved"' not in audit and '"results-received"' not in audit
        assert all(json.loads(j["timings"])["fetching"] < 1 for j in jobs)
    finally:
        site.stop()


@needs_temporal
@pytest.mark.slow
def test_with_task_queue_fairness_the_workers_take_the_senders_in_turn(tmp_path: Path) -> None:
    """A suite's burst is on the workers' task queue already when another suite's run
    arrives: a Temporal server with task queue fairness (``matching.enableFairness``,
    one partition so that the order is the matcher's alone) gives the later sender its
    turn next, by the fairness key the node starts each workflow with. (The node's
    own start order cannot help here: the burst was started before the run came.)
    Without fairness (checked by hand) the later run was taken last, seventh of seven;
    with it, third."""
    site = Site(
        tmp_path,
        workers=1,
        pipelines=("xa_coronary",),  # seconds a job: the burst waits on the queue
        temporal_config={
            "matching.enableFairness": True,
            "matching.numTaskqueueReadPartitions": 1,
            "matching.numTaskqueueWritePartitions": 1,
        },
    )
    try:
        site.start()
        burst = [xa_run(frames=12, rows=192, cols=192, seed=s) for s in range(6)]
        assert len(site.send(burst, calling="SUITE_A")) == 6
        wait_for(
            lambda: (
                len(site.rows("SELECT id FROM jobs WHERE dispatched_at IS NOT NULL")) == 6
                and site.rows("SELECT id FROM jobs WHERE state != 'queued'")
            ),
            120,
            what="the burst on the task queue, its first job taken",
        )
        later = xa_run(frames=12, rows=192, cols=192, seed=99)
        assert len(site.send([later], calling="SUITE_B")) == 1
        site.wait_settled(7, 300, "the seven jobs done")
        assert site.temporal is not None
        index = site.db().index_id()
        jobs = site.rows("SELECT id, run_id FROM jobs")
        closed = sorted(
            (
                site.temporal.describe(
                    workflow_id(index, j["id"], 0)
                ).raw_description.workflow_execution_info.close_time.ToNanoseconds(),
                j["run_id"],
            )
            for j in jobs
        )
        order = [run_id for _, run_id in closed]
        # taken within the first three: the burst's first was running already, and the
        # worker may hold the next task it polled (without fairness: seventh)
        assert order.index(str(later.SOPInstanceUID)) <= 2, order
    finally:
        site.stop()
