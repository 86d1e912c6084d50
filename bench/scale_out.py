"""Scale-out: the same runs through the embedded engine, Temporal with one worker and
Temporal with two workers, in one run on this machine.

    python -m bench.scale_out [--runs 12] [--sequential 6] [--rounds 2] [--size 512]
                              [--frames 48] [--pipeline dsa_av] [--quick]

Each configuration is a separate site of processes (``tests/scaleout_fixture.py``):
the node (``dicom-node serve``), for Temporal its dev server and the workers
(``dicom-node worker``, fetching runs over WADO-RS and returning results by
STOW-RS, on loopback), and a storescp destination. Every job process gets one
BLAS/torch thread, so one worker is one core's worth of compute. After one
warm-up run: ``--sequential`` runs one at a time (the latency of one run and the
overhead of Temporal against the embedded engine), then a batch of ``--runs`` runs
sent at once (throughput, and per-run latency with queueing). Latency is from
the run's completion (on arrival: multi-frame runs) to its last job done, and to
its last result delivered. The configurations are measured in ``--rounds``
interleaved rounds (medians reported), each round also measuring the reference:
the same jobs run directly in one worker process, then in two at once (no node,
no Temporal), which is the parallelism this machine offers at that moment. With
a CUDA device, per-pipeline timings on the GPU (mixed precision where the
pipeline uses it) are measured next to the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import write_section  # noqa: E402
from tests.conftest import wait_for  # noqa: E402
from tests.dicomgen import xa_run  # noqa: E402
from tests.scaleout_fixture import Site  # noqa: E402

CONFIGS = (
    ("embedded", "embedded", 0),
    ("temporal, 1 worker", "temporal", 1),
    ("temporal, 2 workers", "temporal", 2),
)


def _runs(count: int, size: int, frames: int, seed: int) -> list[Any]:
    return [xa_run(frames=frames, rows=size, cols=size, seed=seed + i) for i in range(count)]


def _run_times(site: Site, run_id: str) -> tuple[float, float, float] | None:
    """(completed, last job done, last result delivered) of a settled run, else None."""
    run = site.rows("SELECT completed_at FROM runs WHERE run_id=?", (run_id,))
    jobs = site.rows("SELECT id, state, updated_at FROM jobs WHERE run_id=?", (run_id,))
    if not run or not jobs or any(j["state"] not in ("done", "failed") for j in jobs):
        return None
    sent = site.rows(
        "SELECT MAX(sent_at) t, SUM(state!='sent') pending FROM outbox WHERE job_id IN "
        f"({','.join(str(j['id']) for j in jobs)})"
    )
    if not sent or sent[0]["pending"] or sent[0]["t"] is None:
        return None
    done = max(j["updated_at"] for j in jobs)
    return run[0]["completed_at"], done, sent[0]["t"]


def _wait_runs(site: Site, run_ids: list[str], timeout: float = 1800) -> list[tuple[float, ...]]:
    def all_settled() -> list[tuple[float, ...]] | None:
        times = [_run_times(site, r) for r in run_ids]
        return times if all(t is not None for t in times) else None  # type: ignore[return-value]

    return wait_for(all_settled, timeout, interval=0.05, what="the runs to settle")  # type: ignore[no-any-return]


def measure(
    label: str, engine: str, workers: int, args: argparse.Namespace, work: Path
) -> dict[str, Any]:
    site = Site(
        work / label.replace(" ", "").replace(",", "-"),
        workers=workers,
        pipelines=(args.pipeline,),
        isolate=False,
        engine=engine,
        heartbeat_timeout_s=30.0,
    )
    site.start()
    try:
        warm = _runs(1, args.size, args.frames, 9000)
        site.send(warm)
        _wait_runs(site, [str(warm[0].SOPInstanceUID)])
        sequential = []
        for ds in _runs(args.sequential, args.size, args.frames, 100):
            site.send([ds])
            ((completed, done, sent),) = _wait_runs(site, [str(ds.SOPInstanceUID)])
            sequential.append((done - completed, sent - completed))
        batch = _runs(args.runs, args.size, args.frames, 1000)
        load = os.getloadavg()[0]
        site.send(batch)
        times = _wait_runs(site, [str(ds.SOPInstanceUID) for ds in batch])
        first = min(t[0] for t in times)
        makespan = max(t[1] for t in times) - first
        stages: dict[str, list[float]] = {}
        for row in site.rows("SELECT timings FROM jobs WHERE state='done'"):
            for stage, seconds in json.loads(row["timings"] or "{}").items():
                stages.setdefault(stage, []).append(seconds)
        failed = site.rows("SELECT COUNT(*) n FROM jobs WHERE state='failed'")[0]["n"]
        attempts = site.rows("SELECT MAX(attempts) n FROM jobs")[0]["n"]
    finally:
        site.stop()
    return {
        "label": label,
        "sequential_done": [s[0] for s in sequential],
        "sequential_sent": [s[1] for s in sequential],
        "batch_makespan": makespan,
        "batch_done": [t[1] - t[0] for t in times],
        "batch_sent_makespan": max(t[2] for t in times) - first,
        "stages": {k: statistics.median(v) for k, v in sorted(stages.items())},
        "failed": failed,
        "max_attempts": attempts,
        "load": load,
    }


def direct(args: argparse.Namespace, work: Path, processes: int) -> float:
    """Seconds for the batch's jobs run straight in ``processes`` worker processes at once
    (after one warm-up job each): the reference, with no node and no engine."""
    import threading

    from dicom_node.sandbox import JobSpec, WorkerProcess
    from tests.dicomgen import save

    folder = work / f"direct-{processes}"
    paths = [
        save(ds, folder, f"{i}.dcm")
        for i, ds in enumerate(_runs(args.runs, args.size, args.frames, 1000))
    ]
    workers = [WorkerProcess(f"direct-{i}", 16 * 2**30, cpu_only=True) for i in range(processes)]

    def spec(i: int, path: Path) -> JobSpec:
        return JobSpec(i, str(i), args.pipeline, (str(path),), str(folder / f"out{i}"), "cpu")

    def run(worker: WorkerProcess, share: list[tuple[int, Path]]) -> None:
        for i, path in share:
            outcome = worker.run(spec(i, path), 600, lambda: None, 60, threading.Event())
            assert outcome.ok, outcome.error

    try:
        for w in workers:
            run(w, [(10_000, paths[0])])  # warm
        threads = [
            threading.Thread(target=run, args=(w, list(enumerate(paths))[k::processes]))
            for k, w in enumerate(workers)
        ]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.perf_counter() - t0
    finally:
        for w in workers:
            w.close()


def device_timings(size: int, frames: int) -> list[tuple[str, str, float]]:
    """(pipeline, device, seconds) per pipeline on the CPU and, if present, on CUDA."""
    import threading

    import torch

    from dicom_node.sandbox import JobSpec, WorkerProcess
    from training.phantoms import dsa

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        written = dsa.generate(7, size=size, frames=frames).write(Path(tmp) / "phantom")
        path = next(p for p in written if p.name == "dsa.dcm")  # a cerebral DSA phantom run
        for device in devices:
            worker = WorkerProcess(f"bench-{device}", 16 * 2**30, cpu_only=device == "cpu")
            try:
                for i, name in enumerate(("minip", "dsa_av", "dsa_ia", "dsa_perfusion")):
                    spec = JobSpec(i, "r", name, (str(path),), f"{tmp}/out{i}", device)
                    worker.run(spec, 600, lambda: None, 60, threading.Event())  # warm
                    t0 = time.perf_counter()
                    outcome = worker.run(spec, 600, lambda: None, 60, threading.Event())
                    seconds = time.perf_counter() - t0
                    out.append((name, device, seconds if outcome.ok else float("nan")))
            finally:
                worker.close()
    return out


def _med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def report(
    results: list[dict[str, Any]],
    args: argparse.Namespace,
    gpu: list[Any],
    reference: list[tuple[float, float]],
) -> str:
    base = results[0]
    one = next(r for r in results if r["label"] == "temporal, 1 worker")
    two = next(r for r in results if r["label"] == "temporal, 2 workers")
    direct1 = statistics.median(t[0] for t in reference)
    direct2 = statistics.median(t[1] for t in reference)
    rows = [
        "| engine | batch time (s), median (each round) | runs/s | speed-up vs embedded "
        "| run latency, one at a time: done / delivered, median (s) "
        "| run latency in the batch, median (s) | failed jobs |",
        "|---|---|---|---|---|---|---|",
        f"| reference: the jobs straight in 1 worker process | {direct1:.1f} "
        f"({', '.join(f'{t[0]:.1f}' for t in reference)}) | {args.runs / direct1:.2f} "
        f"| {base['batch_makespan'] / direct1:.2f} | - | - | - |",
        f"| reference: in 2 worker processes at once | {direct2:.1f} "
        f"({', '.join(f'{t[1]:.1f}' for t in reference)}) | {args.runs / direct2:.2f} "
        f"| {base['batch_makespan'] / direct2:.2f} | - | - | - |",
    ]
    for r in results:
        each = ", ".join(f"{x:.1f}" for x in r["batch_makespans"])
        rows.append(
            f"| {r['label']} | {r['batch_makespan']:.1f} ({each}) "
            f"| {args.runs / r['batch_makespan']:.2f} "
            f"| {base['batch_makespan'] / r['batch_makespan']:.2f} "
            f"| {_med(r['sequential_done']):.2f} / {_med(r['sequential_sent']):.2f} "
            f"| {_med(r['batch_done']):.1f} | {r['failed']} |"
        )
    overhead = _med(one["sequential_done"]) - _med(base["sequential_done"])
    per_job = (one["batch_makespan"] - base["batch_makespan"]) / args.runs
    speedup = one["batch_makespan"] / two["batch_makespan"]
    machine = direct1 / direct2
    stage_names = sorted(one["stages"])
    stage_rows = [
        "| engine | " + " | ".join(stage_names) + " |",
        "|---|" + "---|" * len(stage_names),
    ]
    for r in results:
        stage_rows.append(
            f"| {r['label']} | "
            + " | ".join(f"{r['stages'].get(s, float('nan')):.3f}" for s in stage_names)
            + " |"
        )
    loads = ", ".join(f"{r['label']} {'/'.join(f'{x:.1f}' for x in r['load'])}" for r in results)
    lines = [
        f"{args.runs} XA runs of {args.size}×{args.size} × {args.frames} frames, pipeline "
        f"`{args.pipeline}`, one BLAS/torch thread per job; one warm-up run, then "
        f"{args.sequential} runs one at a time, then the {args.runs} runs sent at once; "
        f"{args.rounds} interleaved round(s). Each engine is its own set of processes on this "
        "machine: the node, and for Temporal its dev server (SQLite) and the workers on "
        "loopback, fetching runs over WADO-RS and returning results by STOW-RS (no shared "
        "storage). The reference runs the same jobs straight in worker processes (no node, "
        "no engine): what this machine allowed at the time.",
        "",
        *rows,
        "",
        f"- **2 workers against 1**: {speedup:.2f}× the throughput (target ≥ 1.7 on 2 cores); "
        f"the reference, 2 worker processes against 1 without node or engine, reached "
        f"{machine:.2f}× in the same run.",
        f"- **Temporal's overhead per run** (one at a time, median run latency, Temporal with "
        f"1 worker minus embedded): {overhead:+.2f} s (target ≤ 0.5 s); in the batch, "
        f"{per_job:+.2f} s per run of makespan.",
        f"- Load average (1 min) when each batch started: {loads}; the machine is shared "
        "with other work, which this benchmark does not control.",
        "",
        "Median seconds per job stage (the worker's fetching and returning are its WADO-RS "
        "and STOW-RS round trips; starting is the wait for the worker process):",
        "",
        *stage_rows,
        "",
        "Raw latencies (s): `"
        + json.dumps(
            {
                r["label"]: {
                    k: [round(x, 2) for x in r[k]] for k in ("sequential_done", "batch_done")
                }
                for r in results
            }
        )
        + "`",
    ]
    if gpu:
        lines += [
            "",
            "Per-pipeline job time on a 256² x 40 cerebral DSA phantom (decode, compute, "
            "encode, write; warm worker process, the second of two runs), by device:",
            "",
            "| pipeline | device | s |",
            "|---|---|---|",
        ]
        lines += [f"| {p} | {d} | {s:.2f} |" for p, d, s in gpu]
        if not any(d == "cuda" for _, d, _ in gpu):
            lines += ["", "No CUDA device on this machine: GPU timings not measured."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=12)
    ap.add_argument("--sequential", type=int, default=6)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--frames", type=int, default=48)
    ap.add_argument("--pipeline", default="dsa_av")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny runs, nothing written")
    args = ap.parse_args(argv)
    if args.quick:
        args.runs, args.sequential, args.size, args.frames, args.rounds = 4, 2, 96, 10, 1
    os.environ["OMP_NUM_THREADS"] = "1"  # the embedded node's job processes inherit it
    rounds: list[list[dict[str, Any]]] = []
    reference: list[tuple[float, float]] = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        for r in range(args.rounds):
            work = Path(tmp) / f"round{r}"
            print(f"round {r + 1}: direct reference ...", flush=True)
            reference.append((direct(args, work, 1), direct(args, work, 2)))
            results = []
            for label, engine, workers in CONFIGS:
                print(f"round {r + 1}: {label} ...", flush=True)
                results.append(measure(label, engine, workers, args, work))
            rounds.append(results)
    gpu = [] if args.quick else device_timings(256, 40)
    body = report(_pool(rounds), args, gpu, reference)
    print(body)
    if not args.quick:
        write_section("scale_out", "Scale-out: embedded engine against Temporal workers", body)
    return 0


def _pool(rounds: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One result per configuration: medians of the rounds' batch times, latencies pooled."""
    pooled = []
    for i, first in enumerate(rounds[0]):
        same = [r[i] for r in rounds]
        pooled.append(
            {
                "label": first["label"],
                "batch_makespans": [r["batch_makespan"] for r in same],
                "batch_makespan": statistics.median(r["batch_makespan"] for r in same),
                "sequential_done": [x for r in same for x in r["sequential_done"]],
                "sequential_sent": [x for r in same for x in r["sequential_sent"]],
                "batch_done": [x for r in same for x in r["batch_done"]],
                "stages": {
                    k: statistics.median(r["stages"].get(k, float("nan")) for r in same)
                    for k in first["stages"]
                },
                "failed": sum(r["failed"] for r in same),
                "load": [r["load"] for r in same],
            }
        )
    return pooled


if __name__ == "__main__":
    raise SystemExit(main())
