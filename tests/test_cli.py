"""The dicom-node command line: process, status."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pydicom import dcmread

from tests.conftest import dciodvfy_errors
from tests.dicomgen import save, xa_run
from tests.faults import _rle_panic, encode


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_process_writes_results_and_prints_one_line_each(tmp_path: Path) -> None:
    src = tmp_path / "in"
    ds = xa_run(frames=4)
    save(ds, src)
    (src / "notes.txt").write_text("not dicom")
    out = _cli("process", str(src), "--output", str(tmp_path / "out"), "--pipeline", "minip")
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    files = sorted((tmp_path / "out").glob("*.dcm"))
    assert len(lines) == len(files) == 1
    assert str(files[0]) in lines[0] and "minip" in lines[0]
    assert "notes.txt" in out.stderr  # skipped, and said so
    assert dcmread(files[0]).StudyInstanceUID == ds.StudyInstanceUID
    assert dciodvfy_errors(files[0]) == []


def test_process_unknown_pipeline_and_nothing_processable(tmp_path: Path) -> None:
    save(xa_run(frames=3), tmp_path / "in")
    out = _cli(
        "process", str(tmp_path / "in"), "--output", str(tmp_path / "o"), "--pipeline", "nope"
    )
    assert out.returncode == 2 and "unknown pipeline 'nope'" in out.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    out = _cli("process", str(empty), "--output", str(tmp_path / "o"))
    assert out.returncode == 2 and "nothing could be processed" in out.stderr


def test_process_into_an_output_it_cannot_write_says_so(tmp_path: Path) -> None:
    """``--output`` a file, or under one: a traceback (FileExistsError, NotADirectoryError)
    once the runs were processed. Now refused first, exit 2."""
    run = save(xa_run(frames=3), tmp_path / "in")
    (tmp_path / "a_file").write_text("x")
    for output in (tmp_path / "a_file", tmp_path / "a_file" / "sub"):
        out = _cli("process", str(run), "--output", str(output), "--pipeline", "minip")
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        assert f"error: --output {output}: " in out.stderr, out.stderr


def test_process_and_route_skip_what_the_node_would_refuse_with_its_reason(
    tmp_path: Path,
) -> None:
    """``process`` and ``route`` read files as the spool does, after its checks: an
    instance without a Series Instance UID ended both with a traceback, a file cut
    short in its header was grouped as a run. Each is skipped with the reason and the
    status the node would answer; a run whose decoder panics (the node's worker
    process survives it) is named with the panic, not a traceback that ended the
    command; the good run is processed."""
    src = tmp_path / "in"
    good = xa_run(frames=4)
    save(good, src)
    no_series = xa_run(frames=4, seed=1)
    del no_series.SeriesInstanceUID
    save(no_series, src / "no-series")
    cut = src / "cut.dcm"
    whole = next((src / "no-series").glob("*.dcm")).read_bytes()
    cut.write_bytes(whole[:700])
    (src / "panic.dcm").write_bytes(encode(_rle_panic()))  # the decoder's Rust panic
    out = _cli("process", str(src), "--output", str(tmp_path / "out"), "--pipeline", "minip")
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    skipped = [line for line in out.stderr.splitlines() if line.startswith("skipped ")]
    assert len(skipped) == 2 and all("the node answers 0x" in line for line in skipped), skipped
    assert "Series Instance UID" in out.stderr, out.stderr
    assert "cannot be read: PanicException" in out.stderr, out.stderr
    assert len(list((tmp_path / "out").glob("*.dcm"))) == 1
    route = _cli("route", str(src))
    assert route.returncode == 0 and "Traceback" not in route.stderr, route.stderr
    assert route.stdout.count("\nrun ") + route.stdout.startswith("run ") == 2, route.stdout


def test_status_reports_runs_jobs_and_backlog(make_node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from pydicom.uid import XRayAngiographicImageStorage
    from pynetdicom import AE

    from tests.conftest import wait_for

    node = make_node(
        destinations=[
            {"kind": "dimse", "name": "down", "host": "127.0.0.1", "port": 9, "ae_title": "NOBODY"}
        ],
        rules=[{"name": "xa", "match": {"modality": ["XA"]}, "pipelines": ["minip"]}],
    )
    ae = AE(ae_title="SUITE")
    ae.add_requested_context(XRayAngiographicImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.settings.ae_title)
    assert int(assoc.send_c_store(xa_run(frames=3)).Status) == 0
    assoc.release()
    wait_for(lambda: node.db.query("SELECT * FROM outbox WHERE attempts >= 1"), 30)
    from tests.conftest import free_port

    cfg = tmp_path / "cli.toml"
    storage = f'storage_dir = "{node.settings.storage_dir}"\n'
    cfg.write_text(storage + f"[api]\nport = {node.api_port}\n")
    out = _cli("status", "--config", str(cfg))
    assert out.returncode == 0, out.stderr
    assert "jobs: done 1" in out.stdout and "backlog to down: 1 object(s)" in out.stdout
    # the memory pool lives in the running node: asked of its API
    gib = node.jobs_memory()["bytes"] / 2**30
    pool = f"jobs' memory pool: 0 of {gib:.3g} GiB reserved by 0 running job(s), 0 job(s) waiting"
    assert pool in out.stdout
    summary = json.loads(_cli("status", "--config", str(cfg), "--json").stdout)
    assert summary["outbox"] == {"pending": 1}
    assert summary["jobs_memory"]["running_jobs"] == 0
    closed = tmp_path / "closed.toml"  # no node listens there: the index still answers
    closed.write_text(storage + f"[api]\nport = {free_port()}\n")
    out = _cli("status", "--config", str(closed))
    assert "jobs: done 1" in out.stdout
    assert "jobs' memory pool: not shown: the node's API at http" in out.stdout
    assert "did not answer (ConnectionError)" in out.stdout
    closed_json = _cli("status", "--config", str(closed), "--json")
    assert "jobs_memory" not in json.loads(closed_json.stdout)
    assert "did not answer" in closed_json.stderr
    for command in ("trigger", "purge", "cancel"):  # a traceback (ConnectionError) before
        answer = _cli(command, "--config", str(closed), "--series", "1.2.3")
        assert answer.returncode == 2 and "Traceback" not in answer.stderr, answer.stderr
        assert "error: the node's API at http" in answer.stderr and "is the node running" in (
            answer.stderr
        )
    answer = _cli("trigger", "--config", str(closed), "--series", "1.2", "--token-file", "/nope")
    assert answer.returncode == 2 and "--token-file /nope: No such file" in answer.stderr, (
        answer.stderr
    )
    nowhere = tmp_path / "nowhere.toml"  # a FileNotFoundError for node.lock before
    nowhere.write_text(f'storage_dir = "{tmp_path / "no" / "such"}"\n')
    answer = _cli("rebuild-index", "--config", str(nowhere))
    assert answer.returncode == 2 and "error: no node storage at" in answer.stderr, answer.stderr
    assert "purged runs (files deleted by retention): 0" in out.stdout

    from dicom_node.retention import Retention
    from dicom_node.settings import RetentionSettings

    purge = RetentionSettings(keep_days=0, free_target_bytes=None)
    assert Retention(node.db, node.spool, node.results_dir, purge).run() == 1
    out = _cli("status", "--config", str(cfg))
    assert "purged runs (files deleted by retention): 1" in out.stdout
    assert "backlog to down: 1 object(s)" in out.stdout  # its result still waits


def test_serve_on_a_port_another_program_holds_says_so_and_leaves_nothing_running(
    tmp_path: Path,
) -> None:
    """``dicom-node serve`` on a DICOM or REST port another program listens on ended in
    a traceback (``OSError: [Errno 98] Address already in use``) after its router,
    workers and outbox had started, and in-process the storage lock stayed held. Now
    the ports are taken before anything else starts, and the start is refused with the
    setting to change (exit 2); a node started afterwards on the same storage runs."""
    import socket

    from dicom_node.errors import ConfigError
    from dicom_node.service import Node
    from dicom_node.settings import load_settings

    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    port = held.getsockname()[1]
    storage = tmp_path / "node"
    try:
        for dicom, api, setting in ((port, 0, ": host, port"), (0, port, ": [api] host, port")):
            config = tmp_path / "node.toml"
            config.write_text(
                f'storage_dir = "{storage}"\nhost = "127.0.0.1"\nport = {dicom}\n'
                f'min_free_bytes = 0\n[api]\nhost = "127.0.0.1"\nport = {api}\n'
            )
            out = _cli("serve", "--config", str(config))
            assert out.returncode == 2, out.stderr
            assert "Traceback" not in out.stderr, out.stderr
            assert f"127.0.0.1:{port}" in out.stderr and setting in out.stderr, out.stderr
            assert "in use" in out.stderr, out.stderr

        settings = {"storage_dir": str(storage), "min_free_bytes": 0, "api": {"port": 0}}
        try:
            Node(load_settings(None, environ={}, port=port, **settings)).start()
            raise AssertionError("started on a port another program holds")
        except ConfigError as exc:
            assert f"127.0.0.1:{port}" in str(exc) or f":{port}" in str(exc), exc
        node = Node(load_settings(None, environ={}, port=0, **settings)).start()  # lock free
        node.stop()
    finally:
        held.close()


def test_a_file_where_the_node_keeps_a_folder_stops_the_start_with_the_path(
    tmp_path: Path,
) -> None:
    """A file in place of ``spool/``, ``tmp/`` or ``audit/``, or a folder in place of
    ``node.lock``, ended the start in a traceback; a file in place of ``results/`` let
    the node start and fail every job. Each now stops the start with the path."""
    import pytest

    from dicom_node.errors import StorageError
    from dicom_node.service import Node
    from dicom_node.settings import load_settings

    for name, folder in [(n, False) for n in ("spool", "tmp", "audit", "results")] + [
        ("node.lock", True)
    ]:
        storage = tmp_path / name.replace(".", "_")
        storage.mkdir()
        if folder:
            (storage / name).mkdir()
        else:
            (storage / name).write_text("moved here by hand\n")
        settings = load_settings(
            None, environ={}, storage_dir=str(storage), port=0, min_free_bytes=0, api={"port": 0}
        )
        with pytest.raises(StorageError, match=f"{storage / name} is (not )?a folder"):
            Node(settings).start()


def test_token_refuses_a_name_the_settings_refuse_and_an_output_it_cannot_write(
    tmp_path: Path,
) -> None:
    """``dicom-node token --name ''`` (or a name with a space) printed an entry the
    node's settings then refused at its start; ``--output`` an existing file or one in
    no folder was a traceback. Both are refused with the reason, exit 2, before any
    token is shown."""
    (tmp_path / "exists").write_text("an older token\n")
    for name in ("", "a b", 'q"uote'):
        out = _cli("token", "--name", name, "--scopes", "read")
        assert out.returncode == 2 and "error: --name must match" in out.stderr, out.stderr
        assert "token (shown once" not in out.stderr and not out.stdout
    for output in (tmp_path / "exists", tmp_path / "no" / "such"):
        out = _cli("token", "--name", "cli", "--scopes", "read", "--output", str(output))
        assert out.returncode == 2 and f"error: --output {output}: " in out.stderr, out.stderr
        assert "Traceback" not in out.stderr and not out.stdout
    assert (tmp_path / "exists").read_text() == "an older token\n"
