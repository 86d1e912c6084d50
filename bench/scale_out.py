"""Scale-out: the same runs through the embedded engine, Temporal with one worker and
Temporal with two workers, in one run on this machine.

    python -m bench.scale_out [--runs 8] [--sequential 3] [--tiny 5] [--rounds 5] [--size 512]
                              [--frames 48] [--pipeline dsa_av] [--quick]

Each configuration is a separate site of processes (``tests/scaleout_fixture.py``):
the node (``dicom-node serve``), for Temporal its dev server and the workers
(``dicom-node worker``, fetching runs over WADO-RS and returning results by
STOW-RS, on loopback), and a storescp destination. Every job process gets one
BLAS/torch thread, so one worker is one core's worth of compute. After one
warm-up run: ``--sequential`` runs one at a time (the latency of one run), ``--tiny``
runs of 96² × 10 frames one at a time (compute next to nothing: the overhead of
Temporal against the embedded engine), then a batch of ``--runs`` runs
sent at once (throughput, and per-run latency with queueing). Latency is from
the run's completion (on arrival: multi-frame runs) to its last job done, and to
its last result delivered. All three sites run throughout and are measured in
``--rounds`` rounds, a new order each round; each round also measures the
reference: the same jobs run straight in one worker process, then in two at once
(no node, no engine), which is the parallelism this shared machine offers at that
moment. Ratios are paired by round (the load of the moment cancels as far as it
can) and their medians reported. With a CUDA device, per-pipeline timings on the
GPU (mixed precision where the pipeline uses it) are measured next to the CPU.
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


class Config:
    """One engine configuration as a running site; measured a round at a time."""

    def __init__(
        self, label: str, engine: str, workers: int, args: argparse.Namespace, work: Path
    ) -> None:
        self.label = label
        self.args = args
        self.site = Site(
            work / label.replace(" ", "").replace(",", "-"),
            workers=workers,
            pipelines=(args.pipeline,),
            isolate=False,
            engine=engine,
            heartbeat_timeout_s=30.0,
        )

    def start(self) -> None:
        self.site.start()
        warm = _runs(1, self.args.size, self.args.frames, 9000)
        self.site.send(warm)
        _wait_runs(self.site, [str(warm[0].SOPInstanceUID)])

    def round(self, seed: int) -> dict[str, Any]:
        args, site = self.args, self.site
        sequential = []
        for ds in _runs(args.sequential, args.size, args.frames, seed):
            site.send([ds])
            ((completed, done, sent),) = _wait_runs(site, [str(ds.SOPInstanceUID)])
            sequential.append((done - completed, sent - completed))
        tiny = []  # the engine's own overhead: runs whose compute takes next to nothing
        for ds in _runs(args.tiny, 96, 10, seed + 300):
            site.send([ds])
            ((completed, done, _sent),) = _wait_runs(site, [str(ds.SOPInstanceUID)])
            tiny.append(done - completed)
        batch = _runs(args.runs, args.size, args.frames, seed + 500)
        load = os.getloadavg()[0]
        site.send(batch)
        ids = [str(ds.SOPInstanceUID) for ds in batch]
        times = _wait_runs(site, ids)
        first = min(t[0] for t in times)
        stages: dict[str, list[float]] = {}
        marks = ",".join("?" * len(ids))
        for row in site.rows(f"SELECT timings FROM jobs WHERE run_id IN ({marks})", tuple(ids)):
            for stage, seconds in json.loads(row["timings"] or "{}").items():
                stages.setdefault(stage, []).append(seconds)
        failed = site.rows("SELECT COUNT(*) n FROM jobs WHERE state='failed'")[0]["n"]
        return {
            "sequential_done": [x[0] for x in sequential],
            "sequential_sent": [x[1] for x in sequential],
            "tiny": tiny,
            "batch_makespan": max(t[1] for t in times) - first,
            "batch_done": [t[1] - t[0] for t in times],
            "stages": stages,
            "failed": failed,
            "load": load,
        }

    def stop(self) -> None:
        self.site.stop()


class Direct:
    """The reference: the batch's jobs straight in ``processes`` worker processes at once
    (no node, no engine), the parallelism this machine offers at that moment."""

    def __init__(self, args: argparse.Namespace, work: Path, processes: int) -> None:
        from dicom_node.sandbox import WorkerProcess
        from tests.dicomgen import save

        self.args = args
        self.folder = work / f"direct-{processes}"
        self.paths = [
            save(ds, self.folder, f"{i}.dcm")
            for i, ds in enumerate(_runs(args.runs, args.size, args.frames, 7000))
        ]
        self.workers = [
            WorkerProcess(f"direct-{i}", 16 * 2**30, cpu_only=True) for i in range(processes)
        ]
        for w in self.workers:
            self._run(w, [(10_000, self.paths[0])])  # warm

    def _run(self, worker: Any, share: list[tuple[int, Path]]) -> None:
        import threading

        from dicom_node.sandbox import JobSpec

        for i, path in share:
            spec = JobSpec(
                i, str(i), self.args.pipeline, (str(path),), str(self.folder / f"o{i}"), "cpu"
            )
            outcome = worker.run(spec, 600, lambda: None, 60, threading.Event())
            assert outcome.ok, outcome.error

    def batch(self) -> float:
        import threading

        n = len(self.workers)
        threads = [
            threading.Thread(target=self._run, args=(w, list(enumerate(self.paths))[k::n]))
            for k, w in enumerate(self.workers)
        ]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.perf_counter() - t0

    def close(self) -> None:
        for w in self.workers:
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
    # paired by round, so that the load of the moment cancels as far as it can
    overheads = [
        t - e for t, e in zip(one["round_sequential"], base["round_sequential"], strict=True)
    ]
    overhead = statistics.median(overheads)
    tiny = [t - e for t, e in zip(one["round_tiny"], base["round_tiny"], strict=True)]
    per_job = statistics.median(
        (t - e) / args.runs
        for t, e in zip(one["batch_makespans"], base["batch_makespans"], strict=True)
    )
    speedups = [a / b for a, b in zip(one["batch_makespans"], two["batch_makespans"], strict=True)]
    speedup = statistics.median(speedups)
    machines = [a / b for a, b in reference]
    machine = statistics.median(machines)
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
        f"{args.sequential} runs one at a time, then {args.runs} runs sent at once, in "
        f"{args.rounds} rounds, the engines in a new order each round, all of them running "
        "throughout. Each engine is its own set of processes on this "
        "machine: the node, and for Temporal its dev server (SQLite) and the workers on "
        "loopback, fetching runs over WADO-RS and returning results by STOW-RS (no shared "
        "storage). The reference runs the same jobs straight in worker processes (no node, "
        "no engine): what this machine allowed at the time.",
        "",
        *rows,
        "",
        f"- **2 workers against 1**: {speedup:.2f}× the throughput, median of the rounds "
        f"({', '.join(f'{x:.2f}' for x in speedups)}; target ≥ 1.7 on 2 cores). The "
        f"reference, 2 worker processes against 1 without node or engine, reached "
        f"{machine:.2f}× ({', '.join(f'{x:.2f}' for x in machines)}) in the same rounds.",
        f"- **Temporal's overhead per run** (target ≤ 0.5 s), one run at a time, the median "
        f"latency with Temporal and 1 worker minus the embedded engine's, median of the "
        f"rounds: {statistics.median(tiny):+.2f} s on {args.tiny} tiny runs a round (96² × "
        f"10 frames: compute next to nothing, so the engine's own cost; "
        f"{', '.join(f'{x:+.2f}' for x in tiny)}; medians {_med(one['tiny']):.2f} s against "
        f"{_med(base['tiny']):.2f} s); {overhead:+.2f} s on the full-size runs "
        f"({', '.join(f'{x:+.2f}' for x in overheads)}); in the batch, {per_job:+.2f} s "
        "of makespan per run.",
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
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--sequential", type=int, default=3)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--frames", type=int, default=48)
    ap.add_argument("--pipeline", default="dsa_av")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tiny", type=int, default=5, help="tiny runs one at a time, a round")
    ap.add_argument("--quick", action="store_true", help="tiny runs, nothing written")
    args = ap.parse_args(argv)
    if args.quick:
        args.runs, args.sequential, args.size, args.frames, args.rounds = 4, 2, 96, 10, 1
        args.tiny = 2
    os.environ["OMP_NUM_THREADS"] = "1"  # the embedded node's job processes inherit it
    configs: list[Config] = []
    measured: dict[str, list[dict[str, Any]]] = {label: [] for label, _, _ in CONFIGS}
    reference: list[tuple[float, float]] = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        work = Path(tmp)
        direct = [Direct(args, work, 1), Direct(args, work, 2)]
        try:
            for label, engine, workers in CONFIGS:
                print(f"starting {label} ...", flush=True)
                configs.append(Config(label, engine, workers, args, work))
                configs[-1].start()
            for r in range(args.rounds):
                print(f"round {r + 1} of {args.rounds} ...", flush=True)
                reference.append((direct[0].batch(), direct[1].batch()))
                for c in configs[r % 3 :] + configs[: r % 3]:  # a new order each round
                    measured[c.label].append(c.round(1000 * (r + 1)))
        finally:
            for c in configs:
                c.stop()
            for d in direct:
                d.close()
    gpu = [] if args.quick else device_timings(256, 40)
    body = report(_pool(measured), args, gpu, reference)
    print(body)
    if not args.quick:
        write_section("scale_out", "Scale-out: embedded engine against Temporal workers", body)
    return 0


def _pool(measured: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One result per configuration: each round's batch time, latencies and stages pooled."""
    pooled = []
    for label, rounds in measured.items():
        stages: dict[str, list[float]] = {}
        for r in rounds:
            for k, v in r["stages"].items():
                stages.setdefault(k, []).extend(v)
        pooled.append(
            {
                "label": label,
                "batch_makespans": [r["batch_makespan"] for r in rounds],
                "batch_makespan": statistics.median(r["batch_makespan"] for r in rounds),
                "round_sequential": [statistics.median(r["sequential_done"]) for r in rounds],
                "round_tiny": [statistics.median(r["tiny"]) for r in rounds],
                "tiny": [x for r in rounds for x in r["tiny"]],
                "sequential_done": [x for r in rounds for x in r["sequential_done"]],
                "sequential_sent": [x for r in rounds for x in r["sequential_sent"]],
                "batch_done": [x for r in rounds for x in r["batch_done"]],
                "stages": {k: statistics.median(v) for k, v in sorted(stages.items())},
                "failed": max(r["failed"] for r in rounds),
                "load": [r["load"] for r in rounds],
            }
        )
    return pooled


if __name__ == "__main__":
    raise SystemExit(main())
