"""Quick training of the DSA vessel models on phantoms: a minimal, honest loop.

Trains on phantom seeds 1000-1099 only, evaluates on held-out seeds from 5000
through the pipeline itself (preprocessing, tiling and mapping back included),
and writes a model package with ``write_package``. It exists so the deep paths
can be measured before the full training package does better; it is small on
purpose and reusable (``load_cases``, ``train``, ``evaluate_pipeline``).

    python -m training.quick_train_dsa st_unet --minutes 13 --batch 2 --crop 64 --lr 3e-3 \
        --widths 8 16 32 48 --out models/dsa_av-st_unet-quick
    python -m training.quick_train_dsa vss_net --minutes 11 --batch 2 --crop 64 --lr 3e-3 \
        --widths 8 16 32 48 --out models/dsa_ia-vss_net-quick

``--minutes`` is CPU time of the training process, so the budget does not
depend on what else the machine runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.base import PipelineContext, Run, RunMeta
from pipelines.models.package import build, write_package
from pipelines.preprocess import normalise_dsa, resample_frames

TRAIN_SEEDS = range(1000, 1100)
TEST_SEEDS = range(5000, 5100)
PIPELINE = {"st_unet": "dsa_av", "vss_net": "dsa_ia"}
CHANNELS = {"st_unet": ["artery", "vein", "ica"], "vss_net": ["artery"]}


@dataclass
class Case:
    seed: int
    contrast: np.ndarray  # (T, H, W) float16, preprocessed as the pipeline does
    target: np.ndarray  # (K, H, W) bool


def phantom(seed: int, size: int, frames: int) -> Any:
    from training.phantoms import dsa

    return dsa.generate(seed, size=size, frames=frames)


def load_cases(
    arch: str, seeds: Sequence[int], size: int, frames: int, fps: float | None
) -> tuple[list[Case], float]:
    """Preprocessed training cases and the phantoms' pixel spacing (mm)."""
    cases, spacing = [], 0.0
    for seed in seeds:
        ph = phantom(seed, size, frames)
        seq = ph.pixels.astype(np.float32)
        if fps is not None:
            seq, _ = resample_frames(seq, ph.frame_times_s, fps)
        target = np.stack([ph.truth[c] for c in CHANNELS[arch]]).astype(bool)
        cases.append(Case(seed, normalise_dsa(seq).astype(np.float16), target))
        spacing = float(np.mean(ph.pixel_spacing_mm))
    return cases, spacing


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(logits)
    inter = (p * target).sum(dim=(0, 2, 3))
    return (1 - (2 * inter + 1) / (p.sum(dim=(0, 2, 3)) + target.sum(dim=(0, 2, 3)) + 1)).mean()


def batch(
    cases: list[Case], rng: np.random.Generator, size: int, count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random crops with flips; each batch takes one sequence length (the shortest)."""
    picks = [cases[i] for i in rng.integers(0, len(cases), count)]
    frames = min(c.contrast.shape[0] for c in picks)
    xs, ys = [], []
    for c in picks:
        h, w = c.contrast.shape[1:]
        y0, x0 = rng.integers(0, h - size + 1), rng.integers(0, w - size + 1)
        x = c.contrast[:frames, y0 : y0 + size, x0 : x0 + size].astype(np.float32)
        y = c.target[:, y0 : y0 + size, x0 : x0 + size]
        if rng.random() < 0.5:
            x, y = x[..., ::-1], y[..., ::-1]
        gain = rng.uniform(0.8, 1.2)  # dose / normalisation variation
        xs.append(np.ascontiguousarray(x * gain))
        ys.append(np.ascontiguousarray(y))
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys).astype(np.float32))


def train(
    arch: str,
    config: dict[str, Any],
    cases: list[Case],
    minutes: float,
    crop: int,
    batch_size: int,
    lr: float,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = build(arch, config).train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    # The budget is CPU time of this process (all threads), so it does not
    # depend on what else runs on the machine.
    deadline = time.process_time() + minutes * 60
    step, losses = 0, []
    while time.process_time() < deadline:
        x, y = batch(cases, rng, crop, batch_size)
        if arch == "vss_net":
            outs = model.forward_all(x)
            loss = sum(F.binary_cross_entropy_with_logits(o, y) + dice_loss(o, y) for o in outs)
            loss = loss / len(outs)
        else:
            logits = model(x)
            loss = F.binary_cross_entropy_with_logits(logits, y) + dice_loss(logits, y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
        step += 1
        if step % 10 == 0:
            log(f"step {step} loss {np.mean(losses[-10:]):.4f} cpu {time.process_time():.0f} s")
    return model.eval(), {
        "steps": step,
        "cpu_minutes": minutes,
        "final_loss": float(np.mean(losses[-10:])),
        "loss_first_10": float(np.mean(losses[:10])),
    }


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(int(a.sum() + b.sum()), 1))


def av_scores(
    artery: np.ndarray,
    vein: np.ndarray | None,
    truth: dict[str, np.ndarray],
    ica: np.ndarray | None = None,
) -> dict[str, float]:
    """A-Dice, V-Dice, M-Dice (pooled over the artery and vein channels, as in
    Su et al.'s evaluation) and vessel Dice (union of both); ICA Dice when the
    method reports an ICA (an empty prediction counts when the truth has one)."""
    ta, tv = truth["artery"].astype(bool), truth["vein"].astype(bool)
    scores = {"a_dice": dice(artery, ta)}
    if vein is not None:
        scores["v_dice"] = dice(vein, tv)
        inter = (artery & ta).sum() + (vein & tv).sum()
        scores["m_dice"] = float(
            2 * inter / max(artery.sum() + ta.sum() + vein.sum() + tv.sum(), 1)
        )
        scores["vessel_dice"] = dice(artery | vein, ta | tv)
    if ica is not None:
        scores["ica_dice"] = dice(ica, truth["ica"].astype(bool))
    return scores


def run_of(ph: Any) -> Run:
    pixels = ph.pixels.astype(np.float32)
    meta = RunMeta(
        modality="XA",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.12.1",
        rows=pixels.shape[1],
        columns=pixels.shape[2],
        number_of_frames=pixels.shape[0],
        frame_times_s=np.asarray(ph.frame_times_s),
        subtracted=True,
        pixel_spacing_mm=tuple(float(v) for v in ph.pixel_spacing_mm),
    )
    return Run(pixels, meta)


def evaluate_pipeline(
    pipeline: str, package: str | None, seeds: Sequence[int], size: int, frames: int
) -> list[dict[str, float]]:
    """Per-case scores of a pipeline (None: the classical path) on held-out phantoms."""
    import pipelines

    fn = pipelines.get(pipeline)
    rows = []
    for seed in seeds:
        ph = phantom(seed, size, frames)
        result = fn(run_of(ph), PipelineContext(device="auto", model_package=package))
        seg = result.outputs[0]
        masks = {s.code.meaning: seg.masks[i] for i, s in enumerate(seg.segments)}
        ica = masks.get("Internal carotid artery")
        if ica is None and pipeline == "dsa_av":
            ica = np.zeros_like(masks["Artery"])
        rows.append({"seed": seed, **av_scores(masks["Artery"], masks.get("Vein"), ph.truth, ica)})
    return rows


def summarise(rows: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    keys = [k for k in rows[0] if k != "seed"]
    return {
        k: {
            "mean": float(np.mean([r[k] for r in rows])),
            "std": float(np.std([r[k] for r in rows], ddof=1)) if len(rows) > 1 else 0.0,
        }
        for k in keys
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("arch", choices=sorted(PIPELINE))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=12.0, help="CPU minutes of training")
    parser.add_argument("--train-cases", type=int, default=100)
    parser.add_argument("--test-cases", type=int, default=10)
    parser.add_argument("--size", type=int, default=256, help="phantom size (pixels)")
    parser.add_argument("--frames", type=int, default=20, help="phantom frames")
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--widths", type=int, nargs="+", default=None)
    parser.add_argument("--version", default="0.1.0")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1 avoids spin-waiting on a shared machine)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    fps = 1.0 if args.arch == "st_unet" else None
    widths = args.widths or ([8, 16, 32, 64] if args.arch == "st_unet" else [8, 16, 32, 64])
    seeds = list(TRAIN_SEEDS)[: args.train_cases]
    t0 = time.monotonic()
    cases, spacing = load_cases(args.arch, seeds, args.size, args.frames, fps)
    print(f"{len(cases)} training phantoms in {time.monotonic() - t0:.0f} s", flush=True)
    config: dict[str, Any] = {
        "widths": widths,
        "out_channels": len(CHANNELS[args.arch]),
        "channels": CHANNELS[args.arch],
        "fps": fps,
        "work_spacing_mm": spacing,
        "tile": 512,
        "overlap": 64,
    }
    model, fit = train(
        args.arch,
        config,
        cases,
        args.minutes,
        args.crop,
        args.batch,
        args.lr,
        log=lambda s: print(s, flush=True),
    )
    pipeline = PIPELINE[args.arch]
    tmp = args.out.with_name(args.out.name + ".eval")
    data = {
        "synthetic": True,
        "source": "training.phantoms.dsa",
        "train_seeds": seeds,
        "phantom_size": args.size,
        "phantom_frames": args.frames,
        "cases": len(seeds),
    }
    manifest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
    common = dict(
        model=model,
        name=f"{pipeline}-{args.arch}-quick",
        version=args.version,
        architecture_name=args.arch,
        config=config,
        pipeline=pipeline,
        data=data,
        training_command="python -m training.quick_train_dsa " + " ".join(sys.argv[1:]),
        dataset_manifest_hash=manifest,
    )
    card = (
        f"{args.arch} for {pipeline}, trained {args.minutes:g} CPU minutes on "
        f"{len(seeds)} synthetic phantoms (seeds {seeds[0]}-{seeds[-1]}). Research use; "
        "not validated on clinical data."
    )
    write_package(tmp, metrics={"training": fit}, model_card=card, **common)
    test_seeds = list(TEST_SEEDS)[: args.test_cases]
    rows = evaluate_pipeline(pipeline, str(tmp), test_seeds, args.size, args.frames)
    metrics = {
        "training": fit,
        "held_out_seeds": test_seeds,
        "per_case": rows,
        "summary": summarise(rows),
    }
    write_package(args.out, metrics=metrics, model_card=card, **common)
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()
    print(json.dumps(metrics["summary"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
