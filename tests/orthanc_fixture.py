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
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

ORTHANC_BIN = os.environ.get("ORTHANC_BIN", "/usr/sbin/Orthanc")
PLUGIN_DIR = Path(os.environ.get("ORTHANC_PLUGIN_DIR", "/usr/share/orthanc/plugins"))
REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "orthanc" / "orthanc.json"
PLUGIN_SCRIPT = REPO / "orthanc" / "angio_forward.py"
PYTHON_PLUGIN = PLUGIN_DIR / "libOrthancPython.so"
DICOMWEB_PLUGIN = PLUGIN_DIR / "libOrthancDicomWeb.so"
# Orthanc's own Web Viewer (Debian package orthanc-webviewer), a second viewer for tests
WEB_VIEWER_PLUGIN = PLUGIN_DIR / "libOrthancWebViewer.so"


def missing_parts(with_plugin: bool = False, web_viewer: bool = False) -> list[str]:
    """What this machine lacks to run Orthanc (empty when all is there)."""
    missing = []
    if web_viewer and not WEB_VIEWER_PLUGIN.exists():
        missing.append(f"{WEB_VIEWER_PLUGIN} (Debian package orthanc-webviewer)")
    if not (Path(ORTHANC_BIN).exists() or shutil.which(ORTHANC_BIN)):
        missing.append(f"{ORTHANC_BIN} (Debian package orthanc)")
    if not DICOMWEB_PLUGIN.exists():
        missing.append(f"{DICOMWEB_PLUGIN} (Debian package orthanc-dicomweb)")
    if with_plugin:
        if not PYTHON_PLUGIN.exists():
            missing.append(f"{PYTHON_PLUGIN} (Debian package orthanc-python)")
        probe = subprocess.run(
            ["/usr/bin/python3", "-c", "import requests"], capture_output=True, env=_clean_env()
        )
        if probe.returncode != 0:
            missing.append("requests for the system python3 (Debian package python3-requests)")
    return missing


def free_port() -> int:
    """A port free on loopback now (another process may take it before we bind)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _clean_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PYTHON", "VIRTUAL_ENV", "CONDA", "PYENV"))
    }
    env["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin"
    return env


def load_template() -> dict[str, Any]:
    return json.loads(TEMPLATE.read_text())


def make_config(
    workdir: Path,
    http_port: int,
    dicom_port: int,
    *,
    with_plugin: bool,
    node: dict[str, Any] | None = None,
    aet: str = "ORTHANC",
    overrides: dict[str, Any] | None = None,
    web_viewer: bool = False,
) -> dict[str, Any]:
    """The template with this test's ports, storage and node; ``overrides`` merge last.
    ``web_viewer`` loads Orthanc's Web Viewer plugin too."""
    cfg = load_template()
    storage = workdir / "storage"
    cfg.update(
        {
            # Unique, so that the readiness check knows it reached this Orthanc and
            # not another test process's that took the same port first.
            "Name": f"test-{http_port}-{os.getpid()}-{secrets.token_hex(4)}",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": http_port,
            "DicomPort": dicom_port,
            "DicomAet": aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [str(DICOMWEB_PLUGIN)]
            + ([str(PYTHON_PLUGIN)] if with_plugin else [])
            + ([str(WEB_VIEWER_PLUGIN)] if web_viewer else []),
        }
    )
    if web_viewer:
        cfg["WebViewer"] = {"CachePath": str(workdir / "web-viewer-cache"), "CacheSize": 64}
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
        modality.update(
            {
                "AET": node.get("aet", "ANGIO_NODE"),
                "Host": node.get("host", "127.0.0.1"),
                "Port": int(node["port"]),
            }
        )
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


#: POSTs to Orthanc that are safe to send twice: storing an instance Orthanc
#: already has is a no-op, and a lookup is a read.
IDEMPOTENT_POSTS = ("/instances", "/tools/lookup", "/tools/find")
READS = frozenset({"GET", "HEAD"})
READS_AND_POSTS = READS | {"POST"}


def _session(methods: frozenset[str] = READS) -> requests.Session:
    """A session whose idempotent requests retry when Orthanc closed a kept-alive connection.

    Orthanc (1.10 has no keep-alive timeout setting) may close an idle
    keep-alive connection just as the next request goes out on it
    ('RemoteDisconnected'); a test then failed on a request that never reached
    Orthanc (a GET while polling; once a POST /instances in CI). Requests that
    are safe to repeat are retried (urllib3's Retry); a refused connection is
    not, so a dead Orthanc still fails at once.
    """
    session = requests.Session()
    retry = Retry(total=2, connect=0, read=2, status=0, allowed_methods=methods)
    session.mount("http://", HTTPAdapter(max_retries=retry))
    return session


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
    session: requests.Session = field(default_factory=_session)
    idempotent_session: requests.Session = field(default_factory=lambda: _session(READS_AND_POSTS))

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
        """POST to Orthanc; one of ``IDEMPOTENT_POSTS`` is retried on a dropped connection."""
        session = self.idempotent_session if path in IDEMPOTENT_POSTS else self.session
        return session.post(self.http_url + path, timeout=kw.pop("timeout", 30), **kw)

    def delete(self, path: str, **kw: Any) -> requests.Response:
        return self.session.delete(self.http_url + path, timeout=kw.pop("timeout", 30), **kw)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout: float = 30.0) -> OrthancProcess:
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                [ORTHANC_BIN, str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_clean_env(),
                cwd=self.config_path.parent,
            )
        finally:
            log.close()
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        name = self.config.get("Name")  # read once: the loop polls every 0.1 s
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"Orthanc exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}"
                )
            try:
                system = self.get("/system", timeout=2)
                ok = system.ok and system.json().get("Name") == name
                if ok and self.with_plugin:  # 503 and not 'starting': disabled or a config error
                    plugin = self.get("/angio-node/status", timeout=5)
                    ok = plugin.ok or (plugin.status_code == 503 and "starting" not in plugin.text)
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
            raise RuntimeError(
                f"Orthanc did not stop in {timeout:g} s:\n{self.log_text()[-2000:]}"
            ) from None
        finally:
            self.session.close()
            self.session = _session()
            self.idempotent_session.close()
            self.idempotent_session = _session(READS_AND_POSTS)

    def restart(self, timeout: float = 30.0) -> OrthancProcess:
        """Stop and start again with the same config, storage and ports."""
        self.stop()
        return self.start(timeout)


def start_orthanc(
    tmp_path: Path,
    *,
    with_plugin: bool,
    node: dict[str, Any] | None = None,
    aet: str = "ORTHANC",
    overrides: dict[str, Any] | None = None,
    timeout: float = 30.0,
    web_viewer: bool = False,
) -> OrthancProcess:
    """Start Orthanc in ``tmp_path/orthanc-<port>`` on free loopback ports."""
    missing = missing_parts(with_plugin, web_viewer)
    if missing:
        raise RuntimeError("cannot start Orthanc, missing: " + "; ".join(missing))
    last: Exception | None = None
    for _ in range(3):  # a free port may be taken between probe and bind
        http_port, dicom_port = free_port(), free_port()
        workdir = Path(tmp_path) / f"orthanc-{http_port}"
        workdir.mkdir(parents=True, exist_ok=True)
        cfg = make_config(
            workdir,
            http_port,
            dicom_port,
            with_plugin=with_plugin,
            node=node,
            aet=aet,
            overrides=overrides,
            web_viewer=web_viewer,
        )
        config_path = workdir / "orthanc.json"
        config_path.write_text(json.dumps(cfg, indent=2))
        proc = OrthancProcess(
            config_path, workdir / "orthanc.log", http_port, dicom_port, aet, with_plugin
        )
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


# -- OHIF against this Orthanc ------------------------------------------------------------

# .ci/install.sh unpacks the npm package @ohif/app into .cache/ohif (ignored by git)
OHIF_DIST_CANDIDATES = (
    os.environ.get("OHIF_DIST", ""),
    str(REPO / ".cache" / "ohif" / "dist"),
    "/opt/ohif/dist",
)
CONTENT_TYPES = {
    ".js": "application/javascript",
    ".css": "text/css",
    ".html": "text/html",
    ".wasm": "application/wasm",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".woff2": "font/woff2",
    ".map": "application/json",
}


def find_ohif_dist() -> Path | None:
    """The ``dist/`` of the npm package ``@ohif/app`` ($OHIF_DIST or /opt/ohif/dist)."""
    for c in OHIF_DIST_CANDIDATES:
        if c and (Path(c) / "index.html").is_file():
            return Path(c)
    return None


def ohif_app_config(origin: str) -> str:
    """OHIF's app-config.js: one DICOMweb data source, Orthanc's, on the same origin."""
    root = f"{origin}/dicom-web"
    return f"""window.config = {{
  routerBasename: '/',
  extensions: [], modes: [], customizationService: {{}},
  showStudyList: true, maxNumberOfWebWorkers: 1,
  showWarningMessageForCrossOrigin: false, showCPUFallbackMessage: false,
  showLoadingIndicator: true, strictZSpacingForVolumeViewport: true,
  defaultDataSourceName: 'orthanc',
  dataSources: [{{
    namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
    sourceName: 'orthanc',
    configuration: {{
      friendlyName: 'Orthanc (angio node results)', name: 'orthanc',
      wadoUriRoot: '{origin}/wado', qidoRoot: '{root}', wadoRoot: '{root}',
      qidoSupportsIncludeField: false, supportsReject: false, dicomUploadEnabled: false,
      imageRendering: 'wadors', thumbnailRendering: 'wadors', enableStudyLazyLoad: true,
      supportsFuzzyMatching: false, supportsWildcard: true, omitQuotationForMultipartRequest: true,
      bulkDataURI: {{ enabled: true }},
    }},
  }}],
}};
"""


class OhifServer:
    """OHIF's static ``dist/`` at ``/`` (single-page fallback to index.html) and Orthanc's
    DICOMweb proxied under the same origin, so the browser needs no CORS. ``requests``
    lists the DICOMweb paths the viewer asked for."""

    def __init__(self, dist: Path, pacs: OrthancProcess) -> None:
        self.dist = dist.resolve()
        self.pacs = pacs
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, fmt: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                path = self.path.split("?", 1)[0]
                if path.startswith(("/dicom-web/", "/wado")):
                    server.requests.append(self.path)
                    self._proxy()
                elif path == "/app-config.js":
                    self._send(200, ohif_app_config(server.url).encode(), "application/javascript")
                else:
                    file = (server.dist / path.lstrip("/")).resolve()
                    if not file.is_file() or server.dist not in file.parents:
                        file = server.dist / "index.html"
                    self._send(
                        200,
                        file.read_bytes(),
                        CONTENT_TYPES.get(file.suffix, "application/octet-stream"),
                    )

            def _proxy(self) -> None:
                headers = {
                    k: v for k, v in self.headers.items() if k.lower() in ("accept", "range")
                }
                try:
                    resp = requests.get(
                        server.pacs.http_url + self.path, headers=headers, timeout=60
                    )
                except requests.RequestException as exc:
                    self._send(502, str(exc).encode(), "text/plain")
                    return
                self._send(
                    resp.status_code,
                    resp.content,
                    resp.headers.get("Content-Type", "application/octet-stream"),
                )

            def _send(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="ohif", daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
)


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def ohif_missing() -> str:
    if find_ohif_dist() is None:
        return "OHIF not installed: npm pack @ohif/app, extract package/dist to /opt/ohif/dist (or set OHIF_DIST)"
    if find_chromium() is None or shutil.which("chromedriver") is None:
        return "chromium not installed (Debian packages chromium, chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium not installed (pip install selenium)"
    return ""


def chromium_driver(profile: Path):  # type: ignore[no-untyped-def]
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = find_chromium()
    for flag in CHROMIUM_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={profile}")
    opts.add_argument("--window-size=1400,860")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)


def click_text(driver: Any, text: str) -> None:
    from selenium.webdriver.common.by import By

    for el in driver.find_elements(By.XPATH, f"//*[normalize-space(text())='{text}']"):
        if el.is_displayed():
            el.click()
            return


# -- what a viewport shows, as pixels ------------------------------------------------------


def element_rgb(element: Any) -> Any:
    """An element's screenshot as an (H, W, 3) uint8 array."""
    import io

    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(element.screenshot_as_png)).convert("RGB"))


def inner(rgb: Any, margin: float = 1 / 12) -> Any:
    """The middle of an image, away from a viewport's text overlays in its corners."""
    h, w = rgb.shape[:2]
    return rgb[int(h * margin) : h - int(h * margin), int(w * margin) : w - int(w * margin)]


def contrast(rgb: Any) -> float:
    """Standard deviation of the grey levels (about 0 for an empty or flat viewport)."""
    return float(inner(rgb).mean(axis=2).std())


def colour_fraction(rgb: Any, chroma: int = 60) -> float:
    """Share of pixels that are clearly coloured (max - min channel > ``chroma``): a grey
    image scores about 0; an overlay, fusion or colour rendering does not."""
    import numpy as np

    part = inner(rgb).astype(np.int16)
    return float(((part.max(axis=2) - part.min(axis=2)) > chroma).mean())


def lit_fraction(rgb: Any, level: int = 24) -> float:
    """Share of pixels brighter than ``level``: a sparse image on black (one slice of a
    vessel-only volume) has little contrast overall but is not blank."""
    return float((inner(rgb).mean(axis=2) > level).mean())
