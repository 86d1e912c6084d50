"""Training engine: throughput per architecture, and the DIAS-style ablations on phantoms.

Run as ``python -m bench.training`` (about 20 minutes of CPU here; ``nice`` it on a
shared machine). Three parts, each measured in the same run as its reference:

1. Throughput: training iterations per second of the engine's real step (patch
   sampling, augmentation, forward, backward, optimiser) for every registered
   architecture that has a task, at its default (paper-size) configuration,
   with its parameter count; the reference is a forward-only pass on the same
   batch (train/infer ratio).
2. Weak supervision (SSCR, dsa_ia / VSS-Net): pCE alone versus
   pCE + PS + CPS + CR on simulated scribbles (centre-line fragments of the
   truth arteries and background strokes away from every vessel), next to the
   classical path of the pipeline, on held-out phantom seeds.
3. Semi-supervised (RPST, dsa_ia / VSS-Net): teacher versus student with 1, 3
   and 10 labelled runs plus unlabelled runs, same held-out seeds.

Training and test phantoms use disjoint seeds (1000+ and 1900+). The defaults
are deliberately small (96 px, tiny widths, a few hundred steps) so that the
whole benchmark fits the CPU budget; the longer run is documented in
docs/training.md (``--size 256 --steps 2000 --widths 16,32,64,128``).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from skimage.morphology import skeletonize

from bench.report import write_section
from pipelines.models import package as pkg
from training import metrics as M
from training.dataset import Case
from training.engine import TrainConfig, Trainer, evaluate_node, evaluate_weights
from training.phantom_dataset import phantom_case as _phantom
from training.tasks import TASKS, TaskError, task_for_architecture

TRAIN_SEED0, TEST_SEED0 = 1000, 1900
# Of the node's masks (every figure goes through the pipeline, so no AUC).
METRICS = ("dice", "cldice", "sensitivity", "specificity", "connectivity")


# ---------------------------------------------------------------------------
# Data


def phantom_case(seed: int, size: int, frames: int) -> Case:
    """A family A DSA phantom with its artery, vein and ICA truth."""
    return _phantom("dsa", seed, size, frames, ("artery", "vein", "ica"))


def scribbles(case: Case, rng: np.random.Generator, keep: float = 0.3) -> Case:
    """Simulated scribbles: fragments of the artery centre lines and background strokes
    at least 3 px from any vessel (what an annotator would draw in a minute)."""
    artery = case.masks["artery"]
    vessels = artery | case.masks["vein"]
    skel = skeletonize(artery)
    labels, n = ndimage.label(skel, structure=np.ones((3, 3)))
    chosen = rng.random(n + 1) < keep
    chosen[0] = False
    fg = chosen[labels]
    if not fg.any():
        fg = skel
    far = ~ndimage.binary_dilation(vessels, iterations=3)
    h, w = artery.shape
    bg = np.zeros_like(artery)
    for _ in range(8):  # a few straight strokes, clipped to the background
        r0, c0 = rng.integers(0, h), rng.integers(0, w)
        angle = rng.uniform(0, np.pi)
        t = np.arange(-h // 4, h // 4)
        rr = np.clip((r0 + t * np.sin(angle)).astype(int), 0, h - 1)
        cc = np.clip((c0 + t * np.cos(angle)).astype(int), 0, w - 1)
        bg[rr, cc] = True
    bg &= far
    return Case(
        id=case.id,
        patient=case.patient,
        split="train",
        kind="scribble",
        geometry="canvas",
        pixels=case.pixels,
        masks={"artery": fg, "background": bg},
        frame_times_s=case.frame_times_s,
        meta=case.meta,
    )


def unlabelled(case: Case) -> Case:
    return Case(
        id=case.id,
        patient=case.patient,
        split="train",
        kind="unlabelled",
        geometry=None,
        pixels=case.pixels,
        masks={},
        frame_times_s=case.frame_times_s,
        meta=case.meta,
    )


# ---------------------------------------------------------------------------
# 1. Throughput


def synthetic_case(task_name: str, size: int) -> Case:
    """Random data of the right shape for a task (throughput does not need anatomy)."""
    rng = np.random.default_rng(0)
    meta = {
        "modality": "XA",
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.12.1",
        "rows": size,
        "columns": size,
        "pixel_spacing_mm": [0.3, 0.3],
        "is_volume": False,
    }
    vessel = rng.random((size, size)) < 0.1
    if task_name in ("dsa_av", "dsa_ia", "dsa_perfusion"):
        pixels = 2048 - 400 * rng.random((10, size, size))
        return Case(
            "t",
            "t",
            "train",
            "full",
            "canvas",
            pixels.astype(np.float32),
            {
                "artery": vessel,
                "vein": ~vessel & (rng.random((size, size)) < 0.1),
                "ica": vessel & (rng.random((size, size)) < 0.2),
            },
            np.arange(10, dtype=float),
            {**meta, "number_of_frames": 10},
        )
    if task_name == "xa_coronary":
        pixels = 1000 + 300 * rng.random((6, size, size))
        return Case(
            "t",
            "t",
            "train",
            "full",
            "frames",
            pixels.astype(np.float32),
            {"vessel": rng.random((6, size, size)) < 0.1},
            np.arange(6) / 15.0,
            {**meta, "number_of_frames": 6},
        )
    z = 8
    hu = rng.normal(40, 300, (z, size, size))
    labels = rng.integers(0, 3, (z, size, size))
    return Case(
        "t",
        "t",
        "train",
        "full",
        "volume",
        hu.astype(np.float32),
        {"vessel": labels == 0, "bone": labels == 1},
        None,
        {**meta, "modality": "CT", "is_volume": True, "number_of_frames": z},
    )


def throughput(steps: int, batch: int, log: Any) -> tuple[str, list[dict[str, Any]]]:
    rows: list[dict[str, Any]] = []
    names = pkg.architectures()  # every registered architecture, trainable or not
    for arch in names:
        try:
            task = task_for_architecture(arch)
        except TaskError as exc:  # an architecture without a training task: reported
            rows.append({"architecture": arch, "note": f"no task: {exc}"})
            continue
        patch = task.defaults.patch
        size = max(2 * patch, 128)
        case = synthetic_case(task.name, size)
        cfg = TrainConfig(
            task=task.name,
            epochs=1,
            steps_per_epoch=steps,
            batch_size=batch,
            progress=False,
            device="cpu",
        )
        trainer = Trainer(cfg, [case], [], Path("/tmp") / f"bench-training-{arch}")
        model = trainer.models[0]
        params = sum(p.numel() for p in model.parameters())
        trainer._step(0, 0)  # warm-up (allocations, first-call overheads)
        t0 = time.perf_counter()
        for i in range(steps):
            trainer._step(0, i + 1)
        train_s = (time.perf_counter() - t0) / steps
        b = task.batch(
            trainer.prepared, np.random.default_rng(0), batch, patch, trainer.model_config
        )
        model.eval()
        with torch.no_grad():
            model(b.x.float())
            t0 = time.perf_counter()
            for _ in range(steps):
                model(b.x.float())
            infer_s = (time.perf_counter() - t0) / steps
        input_shape = "x".join(str(s) for s in b.x.shape)
        rows.append(
            {
                "architecture": arch,
                "task": task.name,
                "parameters": params,
                "batch": batch,
                "input": input_shape,
                "train_s": train_s,
                "infer_s": infer_s,
            }
        )
        log(f"throughput {arch}: {params:,} params, {1 / train_s:.3f} it/s")
    lines = [
        "| architecture | task | parameters | batch input (B x ...) | train it/s | s/it | "
        "forward-only s/batch | train / forward |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "note" in r:
            lines.append(f"| {r['architecture']} | – | – | – | – | – | – | {r['note']} |")
            continue
        lines.append(
            f"| {r['architecture']} | {r['task']} | {r['parameters']:,} | {r['input']} | "
            f"{1 / r['train_s']:.3f} | {r['train_s']:.2f} | {r['infer_s']:.2f} | "
            f"{r['train_s'] / r['infer_s']:.1f}x |"
        )
    return "\n".join(lines), rows


# ---------------------------------------------------------------------------
# 2 and 3. Ablations


def _train(
    cfg: TrainConfig,
    train: Sequence[Case],
    val: Sequence[Case],
    work: Path,
    unl: Sequence[Case] = (),
) -> tuple[Trainer, float]:
    t0 = time.process_time()
    trainer = Trainer(cfg, train, val, work, unlabelled=unl)
    trainer.fit()
    return trainer, time.process_time() - t0


def _eval(trainer: Trainer, test: Sequence[Case]) -> dict[str, Any]:
    """The node's dsa_ia pipeline with the trainer's current weights."""
    return evaluate_weights(trainer.task, trainer.models[0], trainer.model_config, test)[
        "aggregate"
    ]


def ablations(args: argparse.Namespace, log: Any) -> tuple[str, dict[str, Any]]:
    widths = [int(w) for w in args.widths.split(",")]
    n_lab = [int(n) for n in args.labelled.split(",")]
    max_lab = max(n_lab)
    t0 = time.perf_counter()
    pool = [
        phantom_case(TRAIN_SEED0 + i, args.size, args.frames)
        for i in range(max_lab + args.unlabelled)
    ]
    val = [phantom_case(TRAIN_SEED0 + 500, args.size, args.frames)]
    test = [phantom_case(TEST_SEED0 + i, args.size, args.frames) for i in range(args.test)]
    log(f"{len(pool) + len(test) + 1} phantoms in {time.perf_counter() - t0:.0f} s")
    base = dict(
        task="dsa_ia",
        model_config={"widths": widths},
        epochs=args.epochs,
        steps_per_epoch=args.steps // args.epochs,
        batch_size=args.batch,
        patch=args.patch,
        progress=False,
        device="cpu",
        seed=0,
        early_stop=args.epochs,
    )
    work = Path(args.workdir)
    results: dict[str, Any] = {"classical": evaluate_node(TASKS["dsa_ia"], test)["aggregate"]}
    cpu: dict[str, float] = {}

    rng = np.random.default_rng(7)
    scribbled = [scribbles(c, rng) for c in pool[: args.scribbled]]
    fg_px = np.mean([c.masks["artery"].sum() for c in scribbled])
    bg_px = np.mean([c.masks["background"].sum() for c in scribbled])
    for name, flags in (
        ("pCE", {"use_ps": False, "use_cps": False, "use_cr": False}),
        ("pCE+PS+CPS+CR (SSCR)", {}),
    ):
        trainer, seconds = _train(
            TrainConfig(mode="sscr", **base, **flags),
            scribbled,
            val,  # type: ignore[arg-type]
            work / f"sscr-{len(flags)}",
        )
        results[name], cpu[name] = _eval(trainer, test), seconds
        log(f"{name}: dice {results[name]['dice']['mean']:.3f} ({seconds:.0f} s CPU)")

    for n in n_lab:
        labelled, unl = pool[:n], [unlabelled(c) for c in pool[max_lab : max_lab + args.unlabelled]]
        trainer, seconds = _train(
            TrainConfig(mode="rpst", rpst_rounds=1, **base),
            labelled,
            val,  # type: ignore[arg-type]
            work / f"rpst-{n}",
            unl,
        )
        teacher = torch.load(work / f"rpst-{n}" / "best-teacher.pt", weights_only=True)[
            "state_dict"
        ]
        results[f"student ({n} labelled)"] = _eval(trainer, test)
        trainer.models[0].load_state_dict(teacher)
        results[f"teacher ({n} labelled)"] = _eval(trainer, test)
        cpu[f"rpst {n}"] = seconds
        log(
            f"rpst {n}: teacher {results[f'teacher ({n} labelled)']['dice']['mean']:.3f}, "
            f"student {results[f'student ({n} labelled)']['dice']['mean']:.3f} ({seconds:.0f} s CPU)"
        )

    weak = {k: results[k] for k in ("classical", "pCE", "pCE+PS+CPS+CR (SSCR)")}
    semi = {"classical": results["classical"]}
    for n in n_lab:
        semi[f"teacher ({n} labelled)"] = results[f"teacher ({n} labelled)"]
        semi[f"student ({n} labelled)"] = results[f"student ({n} labelled)"]
    deltas = ", ".join(
        f"{n} labelled {results[f'student ({n} labelled)']['dice']['mean'] - results[f'teacher ({n} labelled)']['dice']['mean']:+.3f}"
        for n in n_lab
    )
    ref = results["pCE"]["dice"]["mean"]
    gain = results["pCE+PS+CPS+CR (SSCR)"]["dice"]["mean"] - ref
    setup = (
        f"Phantoms {args.size} px, {args.frames} frames (dsa.generate defaults otherwise); "
        f"VSS-Net widths {widths}; {args.steps} steps of batch {args.batch} patches of "
        f"{args.patch} px per training (per phase for RPST), AdamW with the DIAS schedule; "
        f"test: {args.test} held-out seeds ({TEST_SEED0}+), never used in training; "
        f"threshold 0.5; intracranial arteries (all arteries of the phantom)."
    )
    md = [
        "### Weak supervision (SSCR), dsa_ia / VSS-Net",
        "",
        f"{args.scribbled} training runs with simulated scribbles: on average {fg_px:.0f} artery "
        f"and {bg_px:.0f} background pixels scribbled per run (of {args.size}² pixels). "
        f"SSCR minus pCE Dice: {gain:+.3f}. CPU per training: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in cpu.items() if not k.startswith("rpst"))
        + ".",
        "",
        M.format_table(weak, METRICS),
        "",
        "### Semi-supervised (RPST), dsa_ia / VSS-Net",
        "",
        f"{args.unlabelled} unlabelled runs; one relabelling round; teacher and student each "
        f"{args.steps} steps. CPU per RPST run: "
        + ", ".join(
            f"{k.split()[1]} labelled {v:.0f} s" for k, v in cpu.items() if k.startswith("rpst")
        )
        + f". Student minus teacher Dice: {deltas}.",
        "",
        M.format_table(semi, METRICS),
        "",
        setup,
    ]
    return "\n".join(md), results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.training",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--widths", default="4,8,16")
    parser.add_argument("--steps", type=int, default=160, help="steps per training (phase)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--patch", type=int, default=48)
    parser.add_argument("--labelled", default="1,3,10")
    parser.add_argument("--unlabelled", type=int, default=10)
    parser.add_argument("--scribbled", type=int, default=10)
    parser.add_argument("--test", type=int, default=5)
    parser.add_argument("--throughput-steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", default="/tmp/bench-training")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-ablations", action="store_true")
    parser.add_argument("--json", help="also write the raw results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(msg, flush=True)

    start_cpu, start = time.process_time(), time.perf_counter()
    parts: list[str] = []
    raw: dict[str, Any] = {}
    if not args.skip_throughput:
        table, raw["throughput"] = throughput(args.throughput_steps, 2, log)
        parts += [
            "### Throughput (training step vs forward-only on the same batch)",
            "",
            f"{args.threads} thread(s), batch 2, default (paper-size) configuration of each "
            f"task, patch = the task's default; mean of {args.throughput_steps} steps after "
            "one warm-up step. The machine is shared, so absolute times are upper bounds.",
            "",
            table,
            "",
        ]
    if not args.skip_ablations:
        text, raw["ablations"] = ablations(args, log)
        parts += [text, ""]
    parts.append(
        f"Total: {time.perf_counter() - start:.0f} s wall, "
        f"{time.process_time() - start_cpu:.0f} s CPU (this process)."
    )
    body = "\n".join(parts)
    write_section(
        "training", "Training engine: throughput and DIAS-style ablations on phantoms", body
    )
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=1, default=str))
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
