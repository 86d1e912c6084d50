"""Shared fixtures: a real node on loopback, dcmtk peers, and polling helpers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

REAL_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "real"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    predicate: Callable[[], Any],
    timeout: float = 30.0,
    interval: float = 0.1,
    what: str = "condition",
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _corpus_seed_setting() -> str:
    return os.environ.get("ANGIO_CORPUS_SEED", "").strip()


def corpus_seed(default: int) -> int:
    """The seed of a generated fault corpus: ``default``, the one CI runs, or
    ``ANGIO_CORPUS_SEED`` to draw another corpus of the same kind (every corpus
    test takes it), e.g. ``ANGIO_CORPUS_SEED=240 pytest tests/test_faults.py``.
    pytest's header names it (:func:`pytest_report_header`), so a failure's output
    says which corpus found it."""
    value = _corpus_seed_setting()
    return int(value) if value else default


def pytest_configure(config: Any) -> None:
    value = _corpus_seed_setting()
    if value and not value.isdigit():
        raise pytest.UsageError(f"ANGIO_CORPUS_SEED must be a whole number, not {value!r}")


def pytest_report_header(config: Any) -> str | None:
    value = _corpus_seed_setting()
    if not value:
        return None
    return f"fault corpora drawn at seed {value} (ANGIO_CORPUS_SEED), not at CI's seeds"


def store_and_settle(node: Any, ds: Any, jobs: int, timeout: float = 180) -> list[Any]:
    """C-STORE ``ds`` to ``node`` as a modality (AE MODALITY) and wait until ``jobs``
    of the node's jobs are done or failed; their index rows."""
    from pynetdicom import AE, DEFAULT_TRANSFER_SYNTAXES

    ae = AE(ae_title="MODALITY")
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    compressed = syntax is not None and syntax.is_compressed
    ae.add_requested_context(ds.SOPClassUID, [syntax] if compressed else DEFAULT_TRANSFER_SYNTAXES)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.settings.ae_title)
    assert assoc.is_established
    assert int(assoc.send_c_store(ds).Status) == 0
    assoc.release()
    query = "SELECT * FROM jobs WHERE state IN ('done', 'failed')"
    return list(
        wait_for(
            lambda: rows if len(rows := node.db.query(query)) >= jobs else None,
            timeout,
            what=f"{jobs} job(s) to settle",
        )
    )


def need(tool: str) -> str:
    """A dcmtk tool (not pynetdicom's Python script of the same name), or skip."""
    from dicom_node.dcmtk import find

    path = find(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (.ci/run installs it)")
    return path


def send_storescu(
    aec: str, port: int, files: list[Path], aet: str = "ANGIO_SUITE", timeout: float = 120
) -> None:
    """dcmtk storescu, the foreign client, sends ``files`` to ``aec`` on loopback."""
    res = subprocess.run(
        [need("storescu"), "-aet", aet, "-aec", aec, "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert res.returncode == 0, res.stderr


@pytest.fixture
def make_node(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Start a node on ephemeral ports; ``make_node(**settings)`` returns it running."""
    from dicom_node.service import Node
    from dicom_node.settings import load_settings

    nodes: list[Node] = []

    def factory(**overrides: Any) -> Node:
        base: dict[str, Any] = {
            "storage_dir": str(tmp_path / "node"),
            "port": 0,
            "api": {"port": 0},
            "min_free_bytes": 0,
            "completion": {"quiet_period_s": 1.0, "sweep_interval_s": 0.2},
            "workers": {"poll_interval_s": 0.1, "backoff_base_s": 0.2},
            "outbox": {"poll_interval_s": 0.1, "backoff_base_s": 0.2, "backoff_max_s": 1.0},
        }
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                base[key] = {**base[key], **value}
            else:
                base[key] = value
        node = Node(load_settings(None, environ={}, **base)).start()
        nodes.append(node)
        return node

    yield factory
    for node in nodes:
        node.stop()


class StoreSCP:
    """dcmtk storescp as a destination that can go down and come back."""

    def __init__(self, directory: Path, aet: str = "DEST") -> None:
        self.directory = directory
        self.aet = aet
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)

    def start(self) -> StoreSCP:
        self.proc = subprocess.Popen(
            [need("storescp"), "-aet", self.aet, "-od", str(self.directory), "-uf", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: _port_open(self.port), 10, what="storescp to listen")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def files(self) -> list[Path]:
        return sorted(p for p in self.directory.iterdir() if p.is_file())

    def destination(self, name: str = "dest") -> dict[str, Any]:
        return {
            "kind": "dimse",
            "name": name,
            "host": "127.0.0.1",
            "port": self.port,
            "ae_title": self.aet,
        }


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreSCP]:
    scp = StoreSCP(tmp_path / "received")
    yield scp
    scp.stop()


def dciodvfy_errors(path: Path) -> list[str]:
    """Lines dciodvfy reports as errors (an empty list means valid)."""
    out = subprocess.run(
        [need("dciodvfy"), str(path)], capture_output=True, text=True, errors="replace"
    )
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


class NodeProcess:
    """`dicom-node serve` in a process of its own (to be killed, or measured); its
    output goes to the config's name with ``.log``."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.log = config.with_suffix(".log")
        self.starts = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.starts += 1
        wait_for(
            lambda: self.log.read_text().count("storage SCP") >= self.starts,
            120,
            what="the node to listen",
        )

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(60)
