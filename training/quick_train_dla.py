"""Train the DLA voxel classifier on rotational phantoms and write a model package.

As in the paper: 41 x 41 x 5 patches, one labelled voxel each, with
class-balanced undersampling (all vessel voxels, and as many bone and as many
soft-tissue voxels drawn at random). Patches are classified one voxel at a
time in training; held-out volumes are classified densely (same function).
Held-out seeds are never used for training or for tuning the classical path.

    python -m training.quick_train_dla --output out/models/dla-phantom --steps 3000

Metrics (per held-out volume, inside the head, mean and 95% CI over volumes):
vessel accuracy, sensitivity, PPV and Dice, for the model and the classical path.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.models.dla import ARCHITECTURE, CLASS_BONE, CLASS_SOFT, CLASS_VESSEL
from pipelines.models.package import build, write_package
from pipelines.preprocess import inference_device
from pipelines.rotational import (
    CLASSICAL_DEFAULTS,
    NAME,
    classical_tissues,
    classify_dense,
    extract_patches,
    padded_volume,
)

# Phantom truth labels (0 background, 1 vessel, 2 bone, 3 soft tissue) -> classifier classes.
PHANTOM_TO_CLASS = np.array([CLASS_SOFT, CLASS_VESSEL, CLASS_BONE, CLASS_SOFT], np.uint8)
TRAIN_SEEDS = tuple(range(2000, 2006))
TEST_SEEDS = tuple(range(2900, 2904))


def balanced_indices(classes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Flat indices of all vessel voxels plus equally many bone and soft-tissue voxels.

    Vessels are about 1% of a head volume; training on the natural mix would
    teach the network to say 'not vessel'. Where a class has fewer voxels than
    the vessels, all of them are taken.
    """
    flat = classes.ravel()
    vessel = np.flatnonzero(flat == CLASS_VESSEL)
    picks = [vessel]
    for cls in (CLASS_BONE, CLASS_SOFT):
        pool = np.flatnonzero(flat == cls)
        picks.append(rng.choice(pool, size=min(len(vessel), len(pool)), replace=False))
    return np.concatenate(picks)


def load_phantom(seed: int, size: int) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """(HU, phantom labels, spacing zyx mm) of one rotational phantom."""
    from training.phantoms import rotational

    ph = rotational.generate(seed, size=size)
    spacing = tuple(float(s) for s in ph.spacing_mm)
    return np.asarray(ph.hu, np.float32), np.asarray(ph.truth["labels"], np.uint8), spacing  # type: ignore[return-value]


def vessel_metrics(
    pred_vessel: np.ndarray, truth_vessel: np.ndarray, body: np.ndarray
) -> dict[str, float]:
    """Binary vessel-class metrics inside the body (the paper's 'relevant anatomy')."""
    p, t = pred_vessel[body], truth_vessel[body]
    tp = float((p & t).sum())
    fp = float((p & ~t).sum())
    fn = float((~p & t).sum())
    tn = float((~p & ~t).sum())
    return {
        "accuracy": (tp + tn) / max(tp + tn + fp + fn, 1.0),
        "sensitivity": tp / max(tp + fn, 1.0),
        "ppv": tp / max(tp + fp, 1.0),
        "dice": 2 * tp / max(2 * tp + fp + fn, 1.0),
    }


def summarise(per_case: Sequence[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean, std and a t-based 95% confidence interval over cases, per metric (clipped
    to [0, 1] for fractions)."""
    from scipy import stats

    out = {}
    for key in per_case[0]:
        values = np.array([c[key] for c in per_case], np.float64)
        mean = float(values.mean())
        std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        half = (
            float(stats.t.ppf(0.975, len(values) - 1) * std / np.sqrt(len(values)))
            if len(values) > 1
            else 0.0
        )
        lo, hi = mean - half, mean + half
        if values.min() >= 0 and values.max() <= 1:  # a fraction: so is its interval
            lo, hi = max(lo, 0.0), min(hi, 1.0)
        out[key] = {"mean": mean, "std": std, "ci95": [lo, hi], "n": len(values)}
    return out


def train(
    volumes: Sequence[tuple[np.ndarray, np.ndarray]],
    width: int,
    max_steps: int,
    cpu_minutes: float,
    batch: int,
    lr: float,
    seed: int,
    device: torch.device,
    log=print,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Patch-wise training on the class-balanced pool of ``volumes`` (HU, classes), for
    ``max_steps`` (cosine learning-rate decay over them) or ``cpu_minutes`` of process CPU
    time (all threads), whichever is first."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    padded = [padded_volume(hu) for hu, _ in volumes]
    pools = [balanced_indices(classes, rng) for _, classes in volumes]
    shapes = [classes.shape for _, classes in volumes]
    pool_sizes = [len(p) for p in pools]
    counts = {
        name: int(
            sum(int((c.ravel()[p] == k).sum()) for (_, c), p in zip(volumes, pools, strict=True))
        )
        for name, k in (("vessel", CLASS_VESSEL), ("bone", CLASS_BONE), ("soft", CLASS_SOFT))
    }
    model = build(ARCHITECTURE, {"width": width}).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max_steps)
    cpu0, wall0 = time.process_time(), time.monotonic()
    steps, seen, running = 0, 0, 0.0
    weights = np.array(pool_sizes, np.float64) / sum(pool_sizes)
    while steps < max_steps and time.process_time() - cpu0 < cpu_minutes * 60:
        v = int(rng.choice(len(volumes), p=weights))
        flat = rng.choice(pools[v], size=batch)
        coords = np.stack(np.unravel_index(flat, shapes[v]), axis=1)
        x = torch.from_numpy(extract_patches(padded[v], coords)).to(device)
        if rng.random() < 0.5:
            x = x.flip(-1)
        if rng.random() < 0.5:
            x = x.flip(-2)
        y = torch.from_numpy(volumes[v][1].ravel()[flat].astype(np.int64)).to(device)
        loss = F.cross_entropy(model(x)[:, :, 0, 0], y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        steps += 1
        seen += batch
        running = 0.98 * running + 0.02 * loss.item() if steps > 1 else loss.item()
        if steps % 100 == 0:
            log(f"step {steps}: loss {running:.4f} ({seen} patches)")
    return model.eval(), {
        "steps": steps,
        "patches_seen": seen,
        "balanced_pool": counts,
        "final_loss_ema": running,
        "cpu_minutes": (time.process_time() - cpu0) / 60,
        "wall_minutes": (time.monotonic() - wall0) / 60,
    }


CLASSICAL_GRID: dict[str, tuple[float, ...]] = {
    "dense_hu": (200.0, 250.0, 300.0),
    "bone_core_hu": (1000.0, 1100.0, 1250.0, 1400.0),
    "plate_radius_mm": (2.2, 2.6, 3.0),
    "grow_mm": (1.5, 2.5, 3.5),
    "base_grow_mm": (0.0, 2.0, 4.0),
    "base_fraction": (0.0, 0.3),
    "min_vessel_mm3": (5.0, 20.0, 50.0),
}


def tune_classical(
    cases: Sequence[tuple[np.ndarray, np.ndarray, tuple[float, float, float]]], log=print
) -> tuple[dict[str, float], float]:
    """One coordinate-descent pass over CLASSICAL_GRID, maximising mean vessel Dice on
    training volumes only (HU, phantom labels, spacing)."""
    params = dict(CLASSICAL_DEFAULTS)

    def score(p: dict[str, float]) -> float:
        return float(
            np.mean(
                [
                    vessel_metrics(
                        classical_tissues(hu, sp, p) == CLASS_VESSEL, labels == 1, labels != 0
                    )["dice"]
                    for hu, labels, sp in cases
                ]
            )
        )

    best = score(params)
    log(f"defaults: Dice {best:.3f}")
    for key, values in CLASSICAL_GRID.items():
        for value in values:
            trial = {**params, key: value}
            if trial == params:
                continue
            dice = score(trial)
            if dice > best:
                params, best = trial, dice
            log(f"{key}={value}: Dice {dice:.3f} (best {best:.3f})")
    return params, best


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", required=True)
    ap.add_argument("--version", default="0.1.0")
    ap.add_argument("--size", type=int, default=256, help="phantom size (voxels per side)")
    ap.add_argument("--train-seeds", type=int, nargs="+", default=list(TRAIN_SEEDS))
    ap.add_argument("--test-seeds", type=int, nargs="+", default=list(TEST_SEEDS))
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3000, help="optimiser steps")
    ap.add_argument(
        "--cpu-minutes", type=float, default=15.0, help="cap in process CPU minutes (all threads)"
    )
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument(
        "--tune-classical",
        type=int,
        metavar="N_SEEDS",
        default=0,
        help="only tune the classical path on the first N training seeds and report",
    )
    args = ap.parse_args(argv)
    if set(args.train_seeds) & set(args.test_seeds):
        ap.error("train and test seeds overlap")
    torch.set_num_threads(args.threads)
    device = inference_device(args.device)
    if args.tune_classical:
        cases = [load_phantom(s, args.size) for s in args.train_seeds[: args.tune_classical]]
        params, dice = tune_classical(cases, log=lambda m: print(m, flush=True))
        print(f"best classical parameters on training seeds: {params} (Dice {dice:.3f})")
        return 0
    t0 = time.monotonic()
    train_set = []
    for s in args.train_seeds:
        hu, labels, spacing = load_phantom(s, args.size)
        train_set.append((hu, PHANTOM_TO_CLASS[labels]))
    print(
        f"{len(train_set)} training volumes {train_set[0][0].shape} in {time.monotonic() - t0:.0f} s",
        flush=True,
    )
    model, info = train(
        train_set,
        args.width,
        args.steps,
        args.cpu_minutes,
        args.batch,
        args.lr,
        0,
        device,
        log=lambda m: print(m, flush=True),
    )
    del train_set
    model_cases, classical_cases = [], []
    for s in args.test_seeds:
        hu, labels, spacing = load_phantom(s, args.size)
        body = labels != 0
        truth = labels == 1
        t1 = time.monotonic()
        pred = classify_dense(model, hu, device)
        dense_s = time.monotonic() - t1
        model_cases.append(
            {
                "seed": s,
                **vessel_metrics(pred == CLASS_VESSEL, truth, body),
                "dense_seconds": dense_s,
            }
        )
        cls = classical_tissues(hu, spacing)
        classical_cases.append({"seed": s, **vessel_metrics(cls == CLASS_VESSEL, truth, body)})
        print(
            f"seed {s}: model {model_cases[-1]}\n         classical {classical_cases[-1]}",
            flush=True,
        )
    keys = ("accuracy", "sensitivity", "ppv", "dice")
    metrics = {
        "held_out_seeds": args.test_seeds,
        "region": "inside the head (phantom label != background)",
        "model": summarise([{k: c[k] for k in keys} for c in model_cases]),
        "classical": summarise([{k: c[k] for k in keys} for c in classical_cases]),
        "per_case": {"model": model_cases, "classical": classical_cases},
    }
    config = {"width": args.width}
    manifest = hashlib.sha256(
        json.dumps(
            {
                "generator": "training.phantoms.rotational",
                "size": args.size,
                "train_seeds": args.train_seeds,
            }
        ).encode()
    ).hexdigest()
    card = f"""# DLA voxel classifier (phantom-trained), version {args.version}

Classifies every voxel of a contrast-filled C-arm CT into vessel / bone / soft
tissue from a 41 x 41 x 5 neighbourhood (30-layer valid-convolution ResNet,
width {args.width}); the pipeline keeps the vessels to build the DLA angiogram.

- **Training data:** synthetic rotational phantoms only (`training.phantoms.rotational`,
  seeds {args.train_seeds}, {args.size}^3), class-balanced undersampling as in
  the DLA paper. No patient data. **No pretrained weights** were used (none can
  be downloaded here); trained from scratch on the CPU ({info["steps"]} steps,
  {info["patches_seen"]} patches, {info["cpu_minutes"]:.0f} CPU min).
- **Held-out metrics** (seeds {args.test_seeds}, inside the head): see metrics.json;
  vessel Dice {metrics["model"]["dice"]["mean"]:.3f} (classical {metrics["classical"]["dice"]["mean"]:.3f}).
- **Intended use:** research and demonstration of the node. Not validated on
  clinical data; phantom performance says nothing certain about patients.
"""
    write_package(
        args.output,
        model=model,
        name="dla-phantom",
        version=args.version,
        architecture_name=ARCHITECTURE,
        config=config,
        pipeline=NAME,
        metrics=metrics,
        data={
            "synthetic": True,
            "generator": "training.phantoms.rotational",
            "size": args.size,
            "train_seeds": args.train_seeds,
            "test_seeds": args.test_seeds,
            **info,
        },
        model_card=card,
        training_command=" ".join(
            [
                sys.executable,
                "-m",
                "training.quick_train_dla",
                *(argv if argv is not None else sys.argv[1:]),
            ]
        ),
        dataset_manifest_hash=manifest,
    )
    print(json.dumps({k: metrics[k] for k in ("model", "classical")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
