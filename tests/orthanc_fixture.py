"""A real Orthanc (Debian packages) on free loopback ports, for tests.

``start_orthanc(tmp_path, with_plugin=..., node=...)`` writes a config derived
from ``orthanc/orthanc.json`` (the deployable template) with its own storage
directory and ports, starts ``/usr/sbin/Orthanc``, waits until the REST API,
the DICOM port and (with the plugin) ``/angio-node/status`` answer, and
returns an :class:`OrthancProcess`. The ``orthanc`` pytest fixture is the same
without the plugin: a plain PACS with DICOMweb.

``node`` describes the angio node Orthanc should forward to::

    {"aet": "ANGIO_NODE", "host": "127.0.0.1", "port": 11112,
     "api_url": "http://127.0.0.1:8780",          # the node's REST API
     "dicomweb_url": "http://127.0.0.1:8780/dicom-web"}   # optional

The embedded Python of ``orthanc-python`` is the system ``python3``; the
environment is cleaned so that a virtualenv's variables do not leak into it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

ORTHANC_BIN = os.environ.get("ORTHANC_BIN", "/usr/sbin/Orthanc")
PLUGIN_DIR = Path(os.environ.get("ORTHANC_PLUGIN_DIR", "/usr/share/orthanc/plugins"))
REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "orthanc" / "orthanc.json"
PLUGIN_SCRIPT = REPO / "orthanc" / "angio_forward.py"
PYTHON_PLUGIN = PLUGIN_DIR / "libOrthancPython.so"
DICOMWEB_PLUGIN = PLUGIN_DIR / "libOrthancDicomWeb.so"


def missing_parts(with_plugin: bool = False) -> list[str]:
    """What this machine lacks to run Orthanc (empty when all is there)."""
    missing = []
    if not (Path(ORTHANC_BIN).exists() or shutil.which(ORTHANC_BIN)):
        missing.append(f"{ORTHANC_BIN} (Debian package orthanc)")
    if not DICOMWEB_PLUGIN.exists():
        missing.append(f"{DICOMWEB_PLUGIN} (Debian package orthanc-dicomweb)")
    if with_plugin:
        if not PYTHON_PLUGIN.exists():
            missing.append(f"{PYTHON_PLUGIN} (Debian package orthanc-python)")
        probe = subprocess.run(["/usr/bin/python3", "-c", "import requests"], capture_output=True,
                               env=_clean_env())
        if probe.returncode != 0:
            missing.append("requests for the system python3 (Debian package python3-requests)")
    return missing


def free_port() -> int:
    """A port free on loopback now (another process may take it before we bind)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "VIRTUAL_ENV", "CONDA", "PYENV"))}
    env["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin"
    return env


def load_template() -> dict[str, Any]:
    return json.loads(TEMPLATE.read_text())


def make_config(workdir: Path, http_port: int, dicom_port: int, *, with_plugin: bool,
                node: dict[str, Any] | None = None, aet: str = "ORTHANC",
                overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The template with this test's ports, storage and node; ``overrides`` merge last."""
    cfg = load_template()
    storage = workdir / "storage"
    cfg.update({
        "Name": f"test-{http_port}",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": aet,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [str(DICOMWEB_PLUGIN)] + ([str(PYTHON_PLUGIN)] if with_plugin else []),
    })
    if with_plugin:
        cfg["PythonScript"] = str(PLUGIN_SCRIPT)
        cfg["PythonVerbose"] = False
    else:
        cfg.pop("PythonScript", None)
        cfg.pop("PythonVerbose", None)
    angio = cfg.setdefault("AngioNode", {})
    angio["StateFile"] = str(workdir / "angio-node-forwards.sqlite")
    if node is not None:
        modality = cfg["DicomModalities"][angio.get("NodeModality", "angio-node")]
        modality.update({"AET": node.get("aet", "ANGIO_NODE"), "Host": node.get("host", "127.0.0.1"),
                         "Port": int(node["port"])})
        angio["NodeAet"] = node.get("aet", "ANGIO_NODE")
        if node.get("api_url"):
            angio["NodeApiUrl"] = node["api_url"]
        if node.get("dicomweb_url"):
            server = cfg["DicomWeb"]["Servers"][angio.get("NodeDicomWebServer", "angio-node")]
            server["Url"] = node["dicomweb_url"]
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            _merge(cfg[key], value)
        else:
            cfg[key] = value
    return cfg


def _merge(base: dict[str, Any], over: dict[str, Any]) -> None:
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


@dataclass
class OrthancProcess:
    """A running Orthanc; ``stop()`` it (the fixture does)."""

    config_path: Path
    log_path: Path
    http_port: int
    dicom_port: int
    aet: str
    with_plugin: bool
    proc: subprocess.Popen[bytes] | None = None
    session: requests.Session = field(default_factory=requests.Session)

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.http_url}/dicom-web"

    @property
    def config(self) -> dict[str, Any]:
        return json.loads(self.config_path.read_text())

    def get(self, path: str, **kw: Any) -> requests.Response:
        return self.session.get(self.http_url + path, timeout=kw.pop("timeout", 30), **kw)

    def post(self, path: str, **kw: Any) -> requests.Response:
        return self.session.post(self.http_url + path, timeout=kw.pop("timeout", 30), **kw)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout: float = 30.0) -> OrthancProcess:
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen([ORTHANC_BIN, str(self.config_path)], stdout=log,
                                         stderr=subprocess.STDOUT, env=_clean_env(),
                                         cwd=self.config_path.parent)
        finally:
            log.close()
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}")
            try:
                ok = self.get("/system", timeout=2).ok
                if ok and self.with_plugin:
                    ok = self.get("/angio-node/status", timeout=5).ok
                if ok:
                    with socket.create_connection(("127.0.0.1", self.dicom_port), timeout=2):
                        return
            except (requests.RequestException, OSError):
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc not ready after {timeout:g} s:\n{self.log_text()[-4000:]}")

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (a clean shutdown that saves the jobs), SIGKILL if it hangs."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise RuntimeError(f"Orthanc did not stop in {timeout:g} s:\n{self.log_text()[-2000:]}") from None
        finally:
            self.session.close()
            self.session = requests.Session()

    def restart(self, timeout: float = 30.0) -> OrthancProcess:
        """Stop and start again with the same config, storage and ports."""
        self.stop()
        return self.start(timeout)


def start_orthanc(tmp_path: Path, *, with_plugin: bool, node: dict[str, Any] | None = None,
                  aet: str = "ORTHANC", overrides: dict[str, Any] | None = None,
                  timeout: float = 30.0) -> OrthancProcess:
    """Start Orthanc in ``tmp_path/orthanc-<port>`` on free loopback ports."""
    missing = missing_parts(with_plugin)
    if missing:
        raise RuntimeError("cannot start Orthanc, missing: " + "; ".join(missing))
    last: Exception | None = None
    for _ in range(3):  # a free port may be taken between probe and bind
        http_port, dicom_port = free_port(), free_port()
        workdir = Path(tmp_path) / f"orthanc-{http_port}"
        workdir.mkdir(parents=True, exist_ok=True)
        cfg = make_config(workdir, http_port, dicom_port, with_plugin=with_plugin, node=node, aet=aet,
                          overrides=overrides)
        config_path = workdir / "orthanc.json"
        config_path.write_text(json.dumps(cfg, indent=2))
        proc = OrthancProcess(config_path, workdir / "orthanc.log", http_port, dicom_port, aet,
                              with_plugin)
        try:
            return proc.start(timeout)
        except RuntimeError as exc:
            last = exc
            if "already in use" not in str(exc).lower() and "cannot bind" not in str(exc).lower():
                raise
    raise RuntimeError(f"could not start Orthanc: {last}")


@pytest.fixture
def orthanc(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A plain Orthanc (DICOMweb, no forwarding plugin) as a PACS for tests."""
    missing = missing_parts(with_plugin=False)
    if missing:
        pytest.skip("Orthanc is not installed: missing " + "; ".join(missing))
    proc = start_orthanc(tmp_path, with_plugin=False)
    try:
        yield proc
    finally:
        proc.stop()
