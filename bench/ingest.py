"""Ingest throughput: the same runs sent with dcmtk storescu to the node, to Orthanc's
own SCP and to dcmtk storescp, in one run on this machine.

    python -m bench.ingest [--runs 6] [--frames 30] [--size 1024]

The node fsyncs every instance (file and directory) and indexes it in SQLite
before answering; storescp writes without fsync; Orthanc writes its storage
area and SQLite index with its defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.report import write_section
from dicom_node import dcmtk
from training.demo import LocalOrthanc, _free_port, _wait


def tool(name: str) -> str:
    """dcmtk's ``name`` (not pynetdicom's script of the same name)."""
    path = dcmtk.find(name)
    if path is None:
        raise SystemExit(f"dcmtk {name} is needed (apt-get install dcmtk)")
    return path


def make_runs(directory: Path, runs: int, frames: int, size: int) -> list[Path]:
    """Realistic-size XA runs (16-bit, size² × frames) with noise so nothing compresses away."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.dicomgen import save, xa_run

    out = []
    for i in range(runs):
        ds = xa_run(frames=frames, rows=size, cols=size, seed=i)
        out.append(save(ds, directory, f"run{i}.dcm"))
    return out


def _storescu(paths: list[Path], port: int, aec: str) -> float:
    t0 = time.perf_counter()
    subprocess.run(
        [tool("storescu"), "-aet", "BENCH", "-aec", aec, "127.0.0.1", str(port), *map(str, paths)],
        check=True,
        capture_output=True,
        timeout=1800,
    )
    return time.perf_counter() - t0


def bench_node(paths: list[Path], work: Path) -> float:
    port, api = _free_port(), _free_port()
    cfg = work / "node.toml"
    cfg.write_text(
        f'storage_dir = "{work / "node"}"\nport = {port}\nmin_free_bytes = 0\n'
        f'[api]\nport = {api}\n[[rules]]\nname = "store-only"\npipelines = []\n'
    )
    log = open(work / "node.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(cfg)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait(lambda: b"storage SCP" in (work / "node.log").read_bytes(), 60, "node")
        return _storescu(paths, port, "ANGIO_NODE")
    finally:
        proc.terminate()
        proc.wait(30)


def bench_storescp(paths: list[Path], work: Path) -> float:
    port = _free_port()
    out = work / "storescp"
    out.mkdir()
    proc = subprocess.Popen(
        [tool("storescp"), "-aet", "STORESCP", "-od", str(out), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.5)
        return _storescu(paths, port, "STORESCP")
    finally:
        proc.terminate()
        proc.wait(30)


def bench_orthanc(paths: list[Path], work: Path) -> float:
    orthanc = LocalOrthanc(work / "orthanc", "NONE", 1).start()
    try:
        return _storescu(paths, orthanc.dicom_port, "ORTHANC")
    finally:
        orthanc.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("--frames", type=int, default=30)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        work = Path(tmp)
        paths = make_runs(work / "runs", args.runs, args.frames, args.size)
        total_mb = sum(p.stat().st_size for p in paths) / 2**20
        results: dict[str, list[float]] = {"node": [], "orthanc": [], "storescp": []}
        for r in range(args.repeats):
            for name, fn in (
                ("node", bench_node),
                ("orthanc", bench_orthanc),
                ("storescp", bench_storescp),
            ):
                sub = work / f"{name}-{r}"
                sub.mkdir()
                results[name].append(fn(paths, sub))
                shutil.rmtree(sub)
    med = {k: float(np.median(v)) for k, v in results.items()}
    rows = [
        "| receiver | median time (s) | instances/s | MB/s | time ratio vs node |",
        "|---|---|---|---|---|",
    ]
    for name in ("node", "orthanc", "storescp"):
        t = med[name]
        rows.append(
            f"| {name} | {t:.2f} | {args.runs / t:.2f} | {total_mb / t:.1f} | {t / med['node']:.2f} |"
        )
    body = (
        f"{args.runs} XA runs of {args.size}×{args.size} × {args.frames} frames, 16-bit, "
        f"{total_mb:.0f} MB in all, sent by dcmtk `storescu` over loopback; median of {args.repeats} "
        f"repeats, receivers measured alternately in the same run.\n\n"
        + "\n".join(rows)
        + "\n\nThe node fsyncs every file and its directory and commits its SQLite index "
        "(synchronous=FULL) before answering Success; storescp does no fsync; Orthanc uses its "
        "defaults. A ratio above 1 means that receiver was slower than the node.\n\n"
        f"Raw times (s): `{json.dumps({k: [round(x, 2) for x in v] for k, v in results.items()})}`\n"
    )
    write_section("ingest", "Ingest throughput (storage SCP)", body)
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
