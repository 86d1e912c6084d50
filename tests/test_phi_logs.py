"""PHI-free logs by construction (issue 17): the real ``dicom-node serve`` receives the
instance whose SOP Instance UID is declared 0xFFFF bytes long (pydicom then reads the
following elements as its "value" and warns with them), then the whole fault corpus
(tests/faults.py), processes what it stored in its worker processes, and its log,
audit trail and stored job errors are searched for the patients' names and IDs."""

from __future__ import annotations

import json
import re
import signal
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import requests
from pynetdicom import _config

from tests.conftest import free_port, wait_for
from tests.faults import (
    TAGS,
    _element_offset,
    corpus,
    dataset_offset,
    encode,
    fresh,
    fuzzer_ae,
)

NAME, PATIENT_ID, INSTITUTION = "SENTINEL^PHI^NAME", "PHIID73519", "SENTINEL PHI HOSPITAL"


def _malformed() -> bytes:
    ds = fresh(seed=5)
    ds.PatientName, ds.PatientID, ds.InstitutionName = NAME, PATIENT_ID, INSTITUTION
    data = bytearray(encode(ds))
    pos = _element_offset(bytes(data), TAGS["SOPInstanceUID"], dataset_offset(bytes(data)))
    data[pos + 6 : pos + 8] = struct.pack("<H", 0xFFFF)
    return bytes(data)


class _Node:
    """``dicom-node -vv serve`` in a subprocess, its log in a file."""

    def __init__(self, tmp: Path, **settings: Any) -> None:
        self.port, self.api_port = free_port(), free_port()
        self.storage = tmp / "node"
        self.log = tmp / "node.log"
        cfg = tmp / "node.toml"
        cfg.write_text(
            f'storage_dir = "{self.storage}"\nport = {self.port}\nmin_free_bytes = 0\n'
            "[completion]\nquiet_period_s = 0.5\nsweep_interval_s = 0.2\n"
            "[workers]\nconcurrency = 2\nmax_attempts = 1\nmemory_limit_mib = 1536\n"
            "poll_interval_s = 0.1\n"
            "[limits]\nmax_decoded_bytes = 67108864\nmax_inflated_bytes = 83886080\n"
            f"[api]\nport = {self.api_port}\n"
            '[[rules]]\nname = "xa"\npipelines = ["minip"]\n'
            '[rules.match]\nmodality = ["XA"]\n'
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dicom_node.cli", "-vv", "serve", "--config", str(cfg)],
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("wb"),
        )
        wait_for(self._up, 120, what="dicom-node serve to start")

    def _up(self) -> bool:
        assert self.proc.poll() is None, self.log.read_text()[-3000:]
        try:
            return requests.get(f"http://127.0.0.1:{self.api_port}/health", timeout=2).ok
        except requests.RequestException:
            return False

    def settled(self) -> bool:
        status = requests.get(f"http://127.0.0.1:{self.api_port}/status", timeout=10).json()
        busy = sum(status["runs"].get(s, 0) for s in ("receiving", "complete"))
        return busy == 0 and not any(status["jobs"].get(s) for s in ("queued", "running"))

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def _send(port: int, paths: list[Path]) -> list[int | None]:
    ae = fuzzer_ae()
    ae.dimse_timeout = ae.network_timeout = 180
    out = []
    for path in paths:
        assoc = ae.associate("127.0.0.1", port, ae_title="ANGIO_NODE")
        assert assoc.is_established
        try:
            status = assoc.send_c_store(path)
        finally:
            if assoc.is_established:
                assoc.release()
        out.append(int(status.Status) if status and "Status" in status else None)
    return out


def _leaks(text: str, patterns: list[str]) -> list[str]:
    return [p for p in patterns if re.search(p, text)]


def test_malformed_instance_leaves_no_phi_in_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    node = _Node(tmp_path)
    try:
        bad = tmp_path / "bad.dcm"
        bad.write_bytes(_malformed())
        assert _send(node.port, [bad]) == [0xC000]
    finally:
        node.stop()
    log = node.log.read_text(errors="replace")
    assert "SOP Instance UID is" in log and "refused (0xC000)" in log  # the reason is logged
    assert "pydicom" in log  # and the library's warning too, without its values
    patterns = [re.escape(NAME), re.escape(PATIENT_ID), "SENTINEL", re.escape("PHI^")]
    assert _leaks(log, patterns) == []
    audit = (node.storage / "audit" / "audit.jsonl").read_text()
    assert _leaks(audit, patterns) == [] and '"instance-refused"' in audit


@pytest.mark.slow
def test_fault_corpus_leaves_no_phi_in_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every case of the corpus is built on a run of patient TEST^XA, ID TEST0nnn."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    cases = corpus(seed=16)
    folder = tmp_path / "corpus"
    folder.mkdir()
    paths = []
    for i, case in enumerate(cases):
        path = folder / f"{i:03d}.dcm"
        path.write_bytes(case.data)
        paths.append(path)
    bad = folder / "sentinel.dcm"
    bad.write_bytes(_malformed())
    node = _Node(tmp_path)
    try:
        statuses = _send(node.port, [bad, *paths])
        assert statuses.count(0x0000) > 20, "some cases are stored and processed"
        wait_for(node.settled, 900, interval=1.0, what="every run and job to settle")
        jobs = requests.get(f"http://127.0.0.1:{node.api_port}/status", timeout=10).json()
    finally:
        node.stop()
    log = node.log.read_text(errors="replace")
    assert "pydicom" in log and "refused (0x" in log and "job " in log
    patterns = [r"TEST\^XA", r"TEST\d{4}", "SENTINEL", re.escape(PATIENT_ID)]
    # and the corpus's identity values (tests.faults.identity_values): dates in any
    # form, over-long IDs and names
    patterns += [
        r"1980-01-01", r"2026\.01\.01", r"\b19800231\b", r"\b20260231120000\b",
        r"A{30}", r"X{30}", r"S{30}", r"N{30}", r"(R\^){10}",
    ]  # fmt: skip
    leaks = _leaks(log, patterns)
    lines = [line for line in log.splitlines() if _leaks(line, patterns)][:5]
    assert leaks == [], lines
    audit = (node.storage / "audit" / "audit.jsonl").read_text()
    assert _leaks(audit, patterns) == []
    # the reasons stored with failed jobs (shown by /status, /jobs and the status page)
    assert _leaks(json.dumps(jobs), patterns) == []
    print(
        f"{len(statuses)} instances sent, {statuses.count(0)} stored; log "
        f"{len(log.splitlines())} lines, {log.count('pydicom')} pydicom lines, no PHI"
    )


@pytest.mark.parametrize(
    ("text", "scrubbed"),
    [
        # apostrophes inside words are not quotes: the node's reasons stay whole
        (
            "Mask Frame Numbers [9] are outside the run's 4 frames",
            "Mask Frame Numbers [9] are outside the run\u2019s 4 frames",
        ),
        ("it doesn't fit", "it doesn\u2019t fit"),
        ("job 17's run was purged", "job 17\u2019s run was purged"),
        ("the 7 of run 1.2.3's", "the 7 of run 1.2.3\u2019s"),
        ("'19800231's record", "<value dropped>"),
        # values are still replaced whole, with an apostrophe inside or around them
        ("value 'Mary's Clinic' rest", "value <13 chars> rest"),
        ("the name's 'SENTINEL^PHI' tail", "the name\u2019s <12 chars> tail"),
        ("x 'O'Brien^John' y", "x <12 chars> y"),
        ('repr "O\'Brien" x', "repr <7 chars> x"),
        # a quote left open still cuts the rest
        ("'JONES's record", "<value dropped>"),
        ("uid '1.2.3' and b'SMITH'", "uid 1.2.3 and <5 chars>"),
        # UIDs and short numbers stay; dates and long numbers (a numeric Patient ID) do not
        ("'1.2.840.10008.1.2' '12' '-1' '0.5'", "1.2.840.10008.1.2 12 -1 0.5"),
        ("DA '1980-01-01', '1980.01.01' or '19800231'", "DA <10 chars>, <10 chars> or <8 chars>"),
        ("IS '123456'", "IS <6 chars>"),
    ],
)
def test_scrub_keeps_words_and_drops_values(text: str, scrubbed: str) -> None:
    """An apostrophe inside a word cut the rest of the node's own reasons, in the log
    and in stored job errors; a quote followed by a letter ended a quoted name too
    soon ('O' and then Brien^John in the clear)."""
    from dicom_node.logsafe import scrub

    assert scrub(text) == scrubbed


def test_a_decoder_s_failure_is_a_warning_without_its_traceback() -> None:
    """pydicom logs each decoder plugin's failure on a frame as an ERROR with its
    traceback, several a frame; the job's reason names each plugin's message. Through
    the log's filter it is a warning, without the traceback; other errors keep theirs."""
    import logging

    from dicom_node.logsafe import FILTER

    try:
        raise ValueError("Invalid segment offset found in the RLE header")
    except ValueError:
        exc_info = sys.exc_info()
    decoder = logging.LogRecord(
        "pydicom.pixels.decoders.base", logging.ERROR, __file__, 1, "RLE", (), exc_info
    )
    assert FILTER.filter(decoder)
    assert (decoder.levelno, decoder.levelname, decoder.exc_info, decoder.exc_text) == (
        logging.WARNING,
        "WARNING",
        None,
        None,
    )
    other = logging.LogRecord("dicom_node.jobs", logging.ERROR, __file__, 1, "x", (), exc_info)
    assert FILTER.filter(other)
    assert other.levelno == logging.ERROR and "ValueError" in (other.exc_text or "")


def test_a_destination_that_cannot_be_reached_is_a_warning_not_pynetdicom_s_error(
    make_node: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A destination that is down: each delivery attempt logged pynetdicom's "TCP
    Initialisation Error" as an ERROR next to the outbox's own warning (deferred, with
    the reason). Through the node's log filter it is a warning; a handler's error in
    pynetdicom's service class stays an error."""
    import logging

    from dicom_node.logsafe import FILTER
    from tests.conftest import wait_for
    from tests.dicomgen import xa_run
    from tests.test_ingest import _send

    kept: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = kept.append  # type: ignore[method-assign]
    handler.addFilter(FILTER)
    logging.getLogger().addHandler(handler)
    try:
        node = make_node(
            rules=[{"name": "xa", "match": {"modality": ["XA"]}, "pipelines": ["minip"]}],
            destinations=[
                {
                    "kind": "dimse",
                    "name": "down",
                    "ae_title": "DOWN",
                    "host": "127.0.0.1",
                    "port": 9,
                }
            ],
        )
        assert _send(node, xa_run(frames=3)) == 0x0000
        wait_for(lambda: any("deferred" in r.getMessage() for r in kept), 60, what="a deferral")
    finally:
        logging.getLogger().removeHandler(handler)
    transport = [r for r in kept if r.name == "pynetdicom.transport"]
    assert transport and all(r.levelno == logging.WARNING for r in transport), transport
    assert not [r.getMessage() for r in kept if r.levelno >= logging.ERROR]
    handler_error = logging.LogRecord(
        "pynetdicom.service_class", logging.ERROR, __file__, 1, "Exception in handler", (), None
    )
    assert FILTER.filter(handler_error) and handler_error.levelno == logging.ERROR
