"""``dicom-node demo``: the node end to end on its embedded defaults.

It lives in ``training`` (which may import the node) and reaches the
``dicom-node`` command through an entry point, so the node never imports
``training``.

1. starts a local Orthanc (Debian package) on loopback as the PACS;
2. starts the node with Orthanc as its destination, by C-STORE and STOW-RS;
3. writes synthetic angiography runs (phantoms: cerebral DSA, coronary cine,
   rotational 3D) and sends them to the node with dcmtk ``storescu``;
4. waits until the results are stored in Orthanc and prints what arrived and
   where to look.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests

from dicom_node import dcmtk
from dicom_node.errors import NodeError

ORTHANC = "/usr/sbin/Orthanc"
PLUGINS = Path("/usr/share/orthanc/plugins")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise NodeError(f"timed out after {timeout:.0f} s waiting for {what}")


class LocalOrthanc:
    """A throwaway Orthanc on loopback ports with DICOMweb, storing under ``workdir``."""

    def __init__(self, workdir: Path, node_aet: str, node_port: int) -> None:
        if not Path(ORTHANC).exists():
            raise NodeError(
                f"{ORTHANC} not found: install the Debian packages orthanc and orthanc-dicomweb"
            )
        self.workdir = workdir
        self.http_port = _free_port()
        self.dicom_port = _free_port()
        # With this process's id, so that readiness is read from this Orthanc and not
        # from another one that took the free port first.
        self.name = f"angio-demo-pacs-{os.getpid()}"
        workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": self.name,
            "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "storage"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomModalities": {"angio-node": [node_aet, "127.0.0.1", node_port]},
            "Plugins": [str(PLUGINS / "libOrthancDicomWeb.so")],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        self.config_path = workdir / "orthanc.json"
        self.config_path.write_text(json.dumps(config, indent=2))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> LocalOrthanc:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
        with open(self.workdir / "orthanc.log", "ab") as log:
            self.proc = subprocess.Popen(
                [ORTHANC, str(self.config_path)], stdout=log, stderr=subprocess.STDOUT, env=env
            )
        _wait(self._ready, 60, "Orthanc to start")
        return self

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise NodeError(f"Orthanc exited; see {self.workdir / 'orthanc.log'}")
        try:
            system = requests.get(f"{self.url}/system", timeout=2)
            return system.ok and system.json().get("Name") == self.name
        except (requests.RequestException, ValueError):
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def series(self) -> list[dict[str, Any]]:
        ids = requests.get(f"{self.url}/series", timeout=10).json()
        out = []
        for sid in ids:
            info = requests.get(f"{self.url}/series/{sid}", timeout=10).json()
            out.append(
                {
                    "id": sid,
                    "tags": info["MainDicomTags"],
                    "instances": len(info["Instances"]),
                    "study": info["ParentStudy"],
                }
            )
        return out


def _write_phantoms(directory: Path) -> list[Path]:
    """The three kinds of angiography the default rules tell apart: two cerebral
    DSA runs (subtracted, and native with a Mask Subtraction Sequence), a
    coronary cine and a rotational 3D run exported as a CT series."""
    from training.phantoms import coronary, dsa, rotational

    paths: list[Path] = []
    for seed, native in ((1, False), (2, True)):
        phantom = dsa.generate(seed=seed, size=512, frames=20, native=native)
        written = phantom.write(directory / f"dsa-{seed}")
        paths.extend(p for p in written if p.suffix == ".dcm")
    written = coronary.generate(3, size=256, frames=24).write(directory / "coronary-3")
    paths.extend(p for p in written if p.suffix == ".dcm")
    folder = rotational.generate(4, size=64).write(directory / "rotational-4")[0].parent
    paths.extend(sorted((folder / "rotational_ct").glob("*.dcm")))
    return paths


def run_demo(workdir: Path, keep_running: bool = False) -> int:
    from dicom_node.auth import hash_token, new_token
    from dicom_node.service import Node
    from dicom_node.settings import load_settings

    workdir = workdir.resolve()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    # The node's REST API wants a token, as it would on a network: one with the read,
    # operate and store scopes, kept in a file only this user can read.
    token = new_token()
    token_file = workdir / "api-token"
    token_file.touch(mode=0o600)
    token_file.write_text(token + "\n")
    auth = {"Authorization": f"Bearer {token}"}
    node_port = _free_port()
    orthanc = LocalOrthanc(workdir / "orthanc", "ANGIO_NODE", node_port).start()
    node = None
    try:
        settings = load_settings(
            None,
            storage_dir=str(workdir / "node"),
            port=node_port,
            api={
                "port": 0,
                "tokens": [
                    {
                        "name": "demo",
                        "sha256": hash_token(token),
                        "scopes": ["read", "operate", "store"],
                    }
                ],
            },
            min_free_bytes=0,
            completion={"quiet_period_s": 2},
            destinations=[
                {
                    "kind": "dimse",
                    "name": "orthanc-dimse",
                    "host": "127.0.0.1",
                    "port": orthanc.dicom_port,
                    "ae_title": "ORTHANC",
                },
                {"kind": "dicomweb", "name": "orthanc-stow", "url": f"{orthanc.url}/dicom-web"},
            ],
        )
        node = Node(settings).start()
        print(
            f"Orthanc (PACS):  {orthanc.url}/app/explorer.html   DICOM ORTHANC@127.0.0.1:{orthanc.dicom_port}"
        )
        api = f"http://127.0.0.1:{node.api_port}"
        print(f"Node:            ANGIO_NODE@127.0.0.1:{node.port}   status page {api}/")
        print(f"                 (sign in with any user name and the token in {token_file})")
        runs = _write_phantoms(workdir / "phantoms")
        print(
            f"Sending {len(runs)} synthetic file(s) (cerebral DSA, coronary cine, rotational 3D) "
            "to the node with dcmtk storescu ..."
        )
        storescu = dcmtk.find("storescu")
        if storescu is None:
            raise NodeError("storescu not found: install the Debian package dcmtk")
        # The suite sends to the node and archives its runs in the PACS too, so every
        # reference in the results resolves there.
        for aec, port in (("ANGIO_NODE", node.port), ("ORTHANC", orthanc.dicom_port)):
            subprocess.run(
                [
                    storescu,
                    "-aet",
                    "ANGIO_SUITE",
                    "-aec",
                    aec,
                    "127.0.0.1",
                    str(port),
                    *map(str, runs),
                ],
                check=True,
                timeout=300,
            )

        def finished() -> bool:
            # every run settled (routed, unrouted, unroutable), no job left, nothing to send
            runs = node.db.query("SELECT state FROM runs")
            settled = bool(runs) and all(r["state"] not in ("receiving", "complete") for r in runs)
            return settled and not node.db.unsettled_jobs() and not node.db.pending_deliveries()

        _wait(finished, 1800, "the node to process the runs and deliver the results")
        status = requests.get(f"{api}/status", headers=auth, timeout=30).json()
        print(f"\nJobs: {status['jobs']}   outbox: {status['outbox']}")
        for failure in status["failed_jobs"]:  # type: ignore[attr-defined]
            print(f"  FAILED job {failure['id']} {failure['pipeline']}: {failure['error']}")
        print("\nSeries now in Orthanc:")
        results = 0
        for s in sorted(
            orthanc.series(), key=lambda s: (s["study"], s["tags"].get("SeriesNumber", ""))
        ):
            desc = s["tags"].get("SeriesDescription", "")
            ai = desc.startswith("AI ")
            results += ai
            print(
                f"  {'[AI result]' if ai else '[source]   '} {s['tags'].get('Modality', ''):3} "
                f"{desc:40.40} {s['instances']:3} instance(s)  {orthanc.url}/app/explorer.html#series?uuid={s['id']}"
            )
        print(f"\n{results} result series stored in Orthanc. Open {orthanc.url}/app/explorer.html")
        if keep_running:
            print("Running; press Ctrl-C to stop.")
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
        return 0 if results and not status["failed_jobs"] else 1
    finally:
        if node is not None:
            node.stop()
        orthanc.stop()


def add_command(sub: Any) -> None:
    """``dicom-node demo`` (registered through the ``dicom_node.commands`` entry point)."""
    p = sub.add_parser("demo", help="end-to-end demo: Orthanc + node + synthetic runs over DICOM")
    p.add_argument("--workdir", default="demo-output")
    p.add_argument("--keep-running", action="store_true")
    p.set_defaults(func=lambda args: run_demo(Path(args.workdir), keep_running=args.keep_running))


if __name__ == "__main__":
    sys.exit(run_demo(Path(sys.argv[1] if len(sys.argv) > 1 else "demo-output")))
