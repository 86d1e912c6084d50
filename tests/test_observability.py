"""What an operator sees (issue 17): Prometheus metrics parsed by prometheus_client's
own text parser, the audit trail (rotation, syslog, deliveries), and the status page
in headless Chromium with a retry button, plus a screenshot for docs/."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from dicom_node.auth import hash_token
from tests.conftest import send_storescu, wait_for
from tests.dicomgen import save, xa_run
from tests.tiny_package import tiny_package

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / "docs" / "img" / "statuspage.png"
READER, OPERATOR = "reader-token-0123456789abcdef", "operator-token-0123456789abcdef"
TOKENS = [
    {"name": "dashboard", "sha256": hash_token(READER), "scopes": ["read"]},
    {"name": "nurse", "sha256": hash_token(OPERATOR), "scopes": ["read", "operate"]},
]
RULES = [{"name": "xa", "match": {"modality": ["XA"]}, "pipelines": ["minip", "dsa_perfusion"]}]
DOWN = {"kind": "dimse", "name": "down", "host": "127.0.0.1", "port": 9, "ae_title": "NOBODY"}


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def _value(samples: dict[Any, float], metric: str, **labels: str) -> float:
    return samples.get((metric, frozenset(labels.items())), -1.0)


def _busy_node(make_node: Any, storescp: Any, tmp_path: Path) -> Any:
    """A node with one run done (minip), one job failed (dsa_perfusion on 2 frames), results
    delivered to a storescp and stuck for a destination that is down."""
    storescp.start()
    node = make_node(
        api={"tokens": TOKENS},
        rules=RULES,
        destinations=[storescp.destination("pacs"), DOWN],
        workers={"max_attempts": 1},
        models={"dsa_av": str(tiny_package(tmp_path / "dsa_av-tiny", "dsa_av", "dsa_av-tiny"))},
    )
    send_storescu("ANGIO_NODE", node.port, [save(xa_run(frames=2, seed=41), tmp_path / "in")])
    wait_for(lambda: node.db.unsettled_jobs() == 0 and node.db.query("SELECT 1 FROM jobs"), 120)
    wait_for(lambda: storescp.files(), 60, what="the result at the PACS")
    wait_for(lambda: node.db.query("SELECT 1 FROM outbox WHERE attempts >= 1 AND state='pending'"))
    return node


def test_metrics_are_prometheus_text_with_what_happened(
    make_node: Any, storescp: Any, tmp_path: Path
) -> None:
    node = _busy_node(make_node, storescp, tmp_path)
    base = f"http://127.0.0.1:{node.api_port}"
    # a refused instance over STOW-RS
    boundary = "xyz"
    body = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\nnot dicom\r\n--{boundary}--\r\n"
    resp = requests.post(
        f"{base}/dicom-web/studies",
        data=body.encode(),
        headers={
            "Content-Type": f"multipart/related; type=application/dicom; boundary={boundary}",
            "Authorization": f"Bearer {OPERATOR}",
        },
        timeout=10,
    )
    assert resp.status_code == 403  # no store scope
    assert requests.get(f"{base}/metrics", timeout=10).status_code == 401
    reader = {"Authorization": f"Bearer {READER}"}
    resp = requests.get(f"{base}/metrics", headers=reader, timeout=10)
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/plain")
    s = _samples(resp.text)
    assert _value(s, "angio_node_instances_received_total", transport="dimse") == 1
    assert _value(s, "angio_node_received_bytes_total", transport="dimse") > 10_000
    assert _value(s, "angio_node_runs", state="routed") == 1
    assert _value(s, "angio_node_jobs", pipeline="minip", state="done") == 1
    assert _value(s, "angio_node_jobs", pipeline="dsa_perfusion", state="failed") == 1
    assert _value(s, "angio_node_job_queue_depth") == 0
    assert _value(s, "angio_node_job_queue_older") == 0  # counted in test_spine
    assert _value(s, "angio_node_runs_purged") == 0
    assert _value(s, "angio_node_storage_free_bytes") > 0
    for stage in ("decode", "compute", "encode", "write"):
        count = _value(
            s, "angio_node_job_stage_duration_seconds_count", pipeline="minip", stage=stage
        )
        assert count == 1, stage
    assert _value(s, "angio_node_job_duration_seconds_count", pipeline="minip", outcome="done") == 1
    # the job's peak memory against its budget for the run: watched, and within it
    share = "angio_node_job_memory_budget_share"
    assert _value(s, f"{share}_count", pipeline="minip") == 1
    assert _value(s, f"{share}_bucket", pipeline="minip", le="1.0") == 1
    assert 0 < _value(s, f"{share}_sum", pipeline="minip") <= 1
    # the memory pool of the jobs running at once: none now
    assert _value(s, "angio_node_jobs_memory_bytes") > 2**30
    assert _value(s, "angio_node_jobs_memory_reserved_bytes") == 0
    assert _value(s, "angio_node_jobs_waiting_for_memory") == 0
    # and its time against its limit for the run
    share = "angio_node_job_time_limit_share"
    assert _value(s, f"{share}_count", pipeline="minip") == 1
    assert 0 < _value(s, f"{share}_sum", pipeline="minip") < 0.1
    failed = _value(
        s, "angio_node_job_duration_seconds_count", pipeline="dsa_perfusion", outcome="failed"
    )
    assert failed == 1
    assert _value(s, "angio_node_outbox_backlog", destination="down") >= 1
    assert _value(s, "angio_node_deliveries_sent_total", destination="pacs") >= 1
    assert _value(s, "angio_node_delivery_failures_total", destination="down", kind="retry") >= 1
    assert (
        _value(
            s,
            "angio_node_model_package_info",
            pipeline="dsa_av",
            name="dsa_av-tiny",
            version="0.0.1",
        )
        == 1
    )
    assert _value(s, "angio_node_associations_total", result="accepted") >= 1
    # a request is counted once answered: the 401's thread may count it only after this
    # scrape was served (seen once in a loaded run), so it is read again until it shows
    wait_for(
        lambda: (
            _value(
                _samples(requests.get(f"{base}/metrics", headers=reader, timeout=10).text),
                "angio_node_api_requests_total",
                method="GET",
                code="401",
            )
            >= 1
        ),
        10,
        what="the 401 counted",
    )
    assert _value(s, "angio_node_api_requests_in_progress") == 1  # this scrape
    # names follow the conventions: counters end in _total, durations in _seconds
    families = {f.name: f.type for f in text_string_to_metric_families(resp.text)}
    assert all(n.startswith("angio_node_") for n in families if not n.startswith("python_"))
    assert families["angio_node_job_stage_duration_seconds"] == "histogram"
    # a STOW-RS refusal counted by status
    node.stop()
    node = make_node(rules=[], storage_dir=str(tmp_path / "n2"))
    requests.post(
        f"http://127.0.0.1:{node.api_port}/dicom-web/studies",
        data=body.encode(),
        headers={"Content-Type": f"multipart/related; boundary={boundary}"},
        timeout=10,
    )
    s = _samples(requests.get(f"http://127.0.0.1:{node.api_port}/metrics", timeout=10).text)
    assert _value(s, "angio_node_instances_refused_total", transport="stow", status="0xC000") == 1


def test_audit_trail_records_deliveries_rotates_and_goes_to_syslog(
    make_node: Any, storescp: Any, tmp_path: Path
) -> None:
    node = _busy_node(make_node, storescp, tmp_path)
    path = node.settings.storage_dir / "audit" / "audit.jsonl"

    def recorded() -> list[dict[str, Any]]:
        lines = path.read_text().splitlines() if path.exists() else []
        return [json.loads(line) for line in lines]

    # A delivery is recorded by the outbox's thread once its C-STORE has answered (sent)
    # or failed; the PACS holds the file a moment before that.
    deliveries = {"delivery-sent", "delivery-failed"}
    wait_for(lambda: deliveries <= {e["event"] for e in recorded()}, 30)
    events = recorded()
    kinds = {e["event"] for e in events}
    assert {"node-started", "association-accepted", "instance-stored"} <= kinds
    sent = [e for e in events if e["event"] == "delivery-sent"]
    assert sent and all(e["destination"] == "pacs" and e["sop_instance_uid"] for e in sent)
    failed = [e for e in events if e["event"] == "delivery-failed"]
    assert failed and failed[0]["destination"] == "down" and failed[0]["outcome"] == 4
    assert all(e["event_id"]["scheme"] == "DCM" for e in events)
    # no attribute value of the data set: the patient's name and ID are nowhere
    assert "TEST^XA" not in path.read_text() and "TEST0041" not in path.read_text()

    from dicom_node.audit import AuditTrail
    from dicom_node.settings import AuditSettings

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        udp.settimeout(5)
        port = udp.getsockname()[1]
        trail = AuditTrail(
            tmp_path / "rot",
            AuditSettings(max_bytes=4096, backup_count=2, syslog=f"udp://127.0.0.1:{port}"),
            "NODE",
        )
        trail.association(False, "EVIL", "NODE", "10.0.0.1:4444", reason="not allowed")
        datagram = udp.recv(65536).decode()
        assert "angio-dicom-node" in datagram and '"calling_ae": "EVIL"' in datagram
        for i in range(200):
            trail.delivery("pacs", f"1.2.3.{i}", True)
        trail.close()
    files = sorted(p.name for p in (tmp_path / "rot" / "audit").iterdir())
    assert files == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    for name in files:
        text = (tmp_path / "rot" / "audit" / name).read_text()
        assert len(text) <= 4096 + 400
        assert all(json.loads(line)["source"] == "NODE" for line in text.splitlines())


def _chromium_missing() -> str:
    from tests.orthanc_fixture import find_chromium

    if find_chromium() is None or shutil.which("chromedriver") is None:
        return "chromium not installed (Debian packages chromium, chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium not installed"
    return ""


@pytest.mark.skipif(bool(_chromium_missing()), reason=_chromium_missing() or "ok")
def test_status_page_in_chromium_with_retry(make_node: Any, storescp: Any, tmp_path: Path) -> None:
    """ANGIO_UPDATE_SCREENSHOTS=1 writes the screenshot to docs/img/statuspage.png."""
    from selenium.webdriver.common.by import By

    from tests.orthanc_fixture import chromium_driver

    node = _busy_node(make_node, storescp, tmp_path)
    # a second run, a CT series no rule takes, so the page shows more than one state
    from tests.dicomgen import ct_series

    files = [save(ds, tmp_path / "ct", f"{i}.dcm") for i, ds in enumerate(ct_series(4))]
    send_storescu("ANGIO_NODE", node.port, files)
    # A series is complete after the quiet period; then no rule takes it.
    wait_for(lambda: node.db.query("SELECT 1 FROM runs WHERE state='unrouted'"), 60)
    (failed,) = node.db.query("SELECT id FROM jobs WHERE state='failed'")
    base = f"http://127.0.0.1:{node.api_port}"
    assert requests.get(f"{base}/", timeout=10).status_code == 401
    driver = chromium_driver(tmp_path / "chromium-profile")

    def sign_in(token: str) -> None:
        creds = base64.b64encode(f"ward:{token}".encode()).decode()
        driver.execute_cdp_cmd("Network.enable", {})
        driver.execute_cdp_cmd(
            "Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Basic {creds}"}}
        )

    try:
        sign_in(READER)  # read scope: the page, but no retry button
        driver.get(f"{base}/")
        assert "ANGIO_NODE" in driver.title
        assert driver.find_elements(By.ID, "failed") and driver.find_elements(By.ID, "runs")
        assert not driver.find_elements(By.ID, f"retry-{failed['id']}")
        sign_in(OPERATOR)
        driver.get(f"{base}/")
        for table in ("failed", "runs", "outbox", "packages"):
            assert driver.find_element(By.ID, table).is_displayed(), table
        runs = driver.find_element(By.ID, "runs").text
        assert "minip done" in runs and "dsa_perfusion failed" in runs and "compute" in runs
        assert "unrouted" in runs  # the CT series: no rule for it
        outbox = driver.find_element(By.ID, "outbox").text
        assert "pacs" in outbox and "down" in outbox
        assert "dsa_av-tiny" in driver.find_element(By.ID, "packages").text
        assert (
            "perfusion analysis needs at least 4 frames"
            in driver.find_element(By.ID, "failed").text
        )
        driver.set_window_size(1400, 900)
        shot = SCREENSHOT if os.environ.get("ANGIO_UPDATE_SCREENSHOTS") else tmp_path / "page.png"
        shot.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        driver.find_element(By.ID, f"retry-{failed['id']}").click()
        wait_for(lambda: "/?message=" in driver.current_url, 10, what="the redirect")
        assert "queued again" in driver.find_element(By.ID, "message").text
        wait_for(
            lambda: node.db.query(
                "SELECT 1 FROM jobs WHERE id=? AND state='failed' AND attempts=1", (failed["id"],)
            ),
            60,
            what="the retried job to run (and fail) again",
        )
        events = [
            json.loads(line)
            for line in (node.settings.storage_dir / "audit" / "audit.jsonl")
            .read_text()
            .splitlines()
        ]
        retries = [e for e in events if e["event"] == "api-call" and "retry" in e["path"]]
        assert retries[-1]["who"] == "nurse" and retries[-1]["http_status"] == 200
    finally:
        driver.quit()
    # a form posted from elsewhere (no CSRF field) is refused
    resp = requests.post(
        f"{base}/jobs/{failed['id']}/retry",
        data={"csrf": "forged"},
        auth=("x", OPERATOR),
        timeout=10,
        allow_redirects=False,
    )
    assert resp.status_code == 403
    time.sleep(0)


def test_a_syslog_collector_down_or_stalled_stops_neither_the_node_nor_its_trail(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """The audit trail's copy to syslog over TCP never holds the node: a collector that
    is down when the node starts (the node did not start: connection refused), one that
    accepts and then reads nothing (every thread that audits, the C-STORE handlers
    first, blocked once the socket's buffers were full), and one that comes back later
    (it got nothing more). The file trail keeps every record throughout."""
    from dicom_node import audit
    from dicom_node.audit import AuditTrail
    from dicom_node.settings import AuditSettings
    from tests.conftest import free_port

    monkeypatch.setattr(audit._Syslog, "RETRY_S", 0.2)
    port = free_port()
    settings = AuditSettings(max_bytes=2**30, syslog=f"tcp://127.0.0.1:{port}")
    trail = AuditTrail(tmp_path / "down", settings, "NODE")  # nothing listens
    try:
        for i in range(10):
            trail.delivery("pacs", f"1.2.3.{i}", True)
        with socket.create_server(("127.0.0.1", port)) as collector:
            collector.settimeout(10)
            time.sleep(0.5)  # past the retry interval
            received = b""
            deadline = time.monotonic() + 20
            while b"1.2.4.9" not in received and time.monotonic() < deadline:
                for i in range(10):
                    trail.delivery("pacs", f"1.2.4.{i}", True)
                conn, _ = collector.accept()  # the trail connects again when it is back
                conn.settimeout(2)
                try:
                    while b"1.2.4.9" not in received:
                        received += conn.recv(65536)
                except TimeoutError:
                    pass
                conn.close()
            assert b'"sop_instance_uid": "1.2.4.9"' in received
    finally:
        trail.close()
    assert len((tmp_path / "down" / "audit" / "audit.jsonl").read_text().splitlines()) >= 20

    # a collector that accepts and never reads: recording goes on at the file's pace
    with socket.create_server(("127.0.0.1", 0)) as stalled:
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        settings = AuditSettings(
            max_bytes=2**30, syslog=f"tcp://127.0.0.1:{stalled.getsockname()[1]}"
        )
        trail = AuditTrail(tmp_path / "stalled", settings, "NODE")
        started = time.monotonic()
        try:
            for i in range(20000):
                trail.delivery("pacs", f"1.2.5.{i}", True)
        finally:
            trail.close()
        assert time.monotonic() - started < 30
    lines = (tmp_path / "stalled" / "audit" / "audit.jsonl").read_text().splitlines()
    assert len(lines) == 20000

    # the local syslog socket (/dev/log): missing (a container without one), then there
    path = tmp_path / "log.sock"
    trail = AuditTrail(tmp_path / "local", AuditSettings(syslog=str(path)), "NODE")
    try:
        trail.delivery("pacs", "1.2.6.1", True)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as local:
            local.bind(str(path))
            local.settimeout(10)
            time.sleep(0.5)  # past the retry interval
            trail.delivery("pacs", "1.2.6.2", True)
            got = b""
            while b'"sop_instance_uid": "1.2.6.2"' not in got:  # 1.2.6.1 may come first
                got += local.recv(65536)
    finally:
        trail.close()
