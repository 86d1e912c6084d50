"""Train the 3D-2D CE-Net on coronary cine phantoms and write model packages.

One run trains the 2D baseline (N = 0) and the 3D-2D variants (N = 1, 2) with
the same seeds, steps budget and width, so their held-out figures compare the
temporal context and nothing else; the classical path is scored on the same
held-out seeds. Held-out seeds are never used for training or tuning.

    python -m training.quick_train_coronary --output out/models --steps 6000 --threads 1

No pretrained encoder: ImageNet ResNet-34 weights cannot be downloaded here,
so every package is trained from scratch on phantoms (said in its model card).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.coronary import (
    NAME,
    classical_response,
    classical_vessels,
    hysteresis,
    min_component_px,
    normalise_cine,
    predict_probabilities,
    remove_small_components,
)
from pipelines.models.cenet import ARCHITECTURE, frame_windows
from pipelines.models.package import build, write_package
from pipelines.preprocess import inference_device
from training.quick_train_dla import summarise

TRAIN_SEEDS = tuple(range(3000, 3012))
TEST_SEEDS = tuple(range(3900, 3905))


def load_phantom(seed: int, size: int, frames: int) -> tuple[np.ndarray, np.ndarray]:
    """(frames (T, H, W) float32, vessel truth (T, H, W) bool) of one coronary phantom."""
    from training.phantoms import coronary

    ph = coronary.generate(seed, size=size, frames=frames)
    return np.asarray(ph.pixels, np.float32), np.asarray(ph.truth["vessel"], bool)


def frame_metrics(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """IoU, sensitivity and specificity over all frames of a run (the paper's table)."""
    tp = float((pred & truth).sum())
    fp = float((pred & ~truth).sum())
    fn = float((~pred & truth).sum())
    tn = float((~pred & ~truth).sum())
    return {
        "iou": tp / max(tp + fp + fn, 1.0),
        "sensitivity": tp / max(tp + fn, 1.0),
        "specificity": tn / max(tn + fp, 1.0),
    }


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(logits)
    inter = (p * target).sum(dim=(1, 2, 3))
    return (1 - (2 * inter + 1) / (p.sum(dim=(1, 2, 3)) + target.sum(dim=(1, 2, 3)) + 1)).mean()


def crop_origin(
    rng: np.random.Generator, y: torch.Tensor, crop: int, foreground: float
) -> tuple[int, int, int]:
    """(frame, top, left) of a training crop; with probability ``foreground`` the crop is
    centred near a vessel pixel (vessels are ~1-3 % of pixels and absent before the
    contrast arrives, so uniform crops would mostly teach 'background')."""
    t_max, h, w = y.shape
    filled = torch.nonzero(y.flatten(1).any(dim=1)).flatten()
    if len(filled) and rng.random() < foreground:
        t = int(filled[int(rng.integers(len(filled)))])
        pixels = torch.nonzero(y[t])
        cy, cx = (int(v) for v in pixels[int(rng.integers(len(pixels)))])
        jitter = rng.integers(-crop // 4, crop // 4 + 1, size=2)
        top = int(np.clip(cy - crop // 2 + jitter[0], 0, h - crop))
        left = int(np.clip(cx - crop // 2 + jitter[1], 0, w - crop))
        return t, top, left
    return (
        int(rng.integers(t_max)),
        int(rng.integers(h - crop + 1)),
        int(rng.integers(w - crop + 1)),
    )


def train(
    runs: Sequence[tuple[np.ndarray, np.ndarray]],
    neighbours: int,
    config: dict[str, Any],
    max_steps: int,
    cpu_minutes: float,
    batch: int,
    crop: int,
    lr: float,
    seed: int,
    device: torch.device,
    log=print,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """BCE + Dice on (2N+1)-frame windows and crops of normalised runs, two thirds of
    them on vessels, with cosine learning-rate decay over ``max_steps``. Stops after
    ``max_steps`` or ``cpu_minutes`` of process CPU time (all threads), whichever is first."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model = build(ARCHITECTURE, {**config, "neighbours": neighbours}).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max_steps)
    tensors = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in runs]
    cpu0, wall0 = time.process_time(), time.monotonic()
    steps, running = 0, 0.0
    while steps < max_steps and time.process_time() - cpu0 < cpu_minutes * 60:
        xs, ys = [], []
        for _ in range(batch):
            x, y = tensors[int(rng.integers(len(tensors)))]
            t, top, left = crop_origin(rng, y, crop, foreground=2 / 3)
            win = frame_windows(x, neighbours, torch.tensor([t]))[
                0, :, top : top + crop, left : left + crop
            ]
            lab = y[t, top : top + crop, left : left + crop].float()
            if rng.random() < 0.5:
                win, lab = win.flip(-1), lab.flip(-1)
            if rng.random() < 0.5:
                win = win.flip(0)  # time reversal: a window looks the same either way
            xs.append(win)
            ys.append(lab[None])
        xb, yb = torch.stack(xs).to(device), torch.stack(ys).to(device)
        logits = model(xb)
        loss = F.binary_cross_entropy_with_logits(logits, yb) + dice_loss(logits, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        steps += 1
        running = 0.95 * running + 0.05 * loss.item() if steps > 1 else loss.item()
        if steps % 50 == 0:
            log(f"N={neighbours} step {steps}: loss {running:.4f}")
    return model.eval(), {
        "steps": steps,
        "samples_seen": steps * batch,
        "final_loss_ema": running,
        "cpu_minutes": (time.process_time() - cpu0) / 60,
        "wall_minutes": (time.monotonic() - wall0) / 60,
    }


def segment(
    model: torch.nn.Module,
    x: np.ndarray,
    neighbours: int,
    device: torch.device,
    threshold: float = 0.5,
) -> np.ndarray:
    """The pipeline's model path on an already normalised run (same grid)."""
    probs = predict_probabilities(model, x, neighbours, device)
    return remove_small_components(probs > threshold, min_component_px(x.shape[1:]))


def tune_classical(runs: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[dict[str, Any], float]:
    """Hysteresis thresholds and lumen SNR maximising mean IoU on training runs only."""
    responses = [(*classical_response(frames), truth) for frames, truth in runs]
    best: dict[str, Any] = {}
    best_iou = -1.0
    for low in (0.002, 0.005, 0.01, 0.02, 0.05):
        for high in (0.5, 0.7, 0.9, 0.97):
            for lumen in (0.0, 0.5, 1.0, 1.5):
                ious = []
                for response, snr, truth in responses:
                    masks = hysteresis(response, low, high) & (snr > lumen)
                    masks = remove_small_components(masks, min_component_px(truth.shape[1:]))
                    ious.append(frame_metrics(masks, truth)["iou"])
                if np.mean(ious) > best_iou:
                    best = {"hysteresis": (low, high), "lumen_snr": lumen}
                    best_iou = float(np.mean(ious))
    return best, best_iou


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", required=True, help="folder that receives one package per N")
    ap.add_argument("--version", default="0.1.0")
    ap.add_argument("--neighbours", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--frames", type=int, default=36)
    ap.add_argument("--train-seeds", type=int, nargs="+", default=list(TRAIN_SEEDS))
    ap.add_argument("--test-seeds", type=int, nargs="+", default=list(TEST_SEEDS))
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6000, help="optimiser steps per N")
    ap.add_argument("--seed", type=int, default=0, help="training seed (the same for every N)")
    ap.add_argument(
        "--cpu-minutes",
        type=float,
        default=15.0,
        help="cap per N in process CPU minutes (all threads)",
    )
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument(
        "--tune-classical",
        action="store_true",
        help="only report the hysteresis thresholds that fit the training seeds best",
    )
    args = ap.parse_args(argv)
    if set(args.train_seeds) & set(args.test_seeds):
        ap.error("train and test seeds overlap")
    torch.set_num_threads(args.threads)
    device = inference_device(args.device)
    t0 = time.monotonic()
    raw_train = [load_phantom(s, args.size, args.frames) for s in args.train_seeds]
    print(
        f"{len(raw_train)} training runs {raw_train[0][0].shape} in {time.monotonic() - t0:.0f} s",
        flush=True,
    )
    if args.tune_classical:
        best, score = tune_classical(raw_train)
        print(f"best hysteresis (low, high) on training seeds: {best}, mean IoU {score:.3f}")
        return 0
    train_runs = [(normalise_cine(x), y) for x, y in raw_train]
    test = [load_phantom(s, args.size, args.frames) for s in args.test_seeds]
    classical_cases = []
    for s, (frames, truth) in zip(args.test_seeds, test, strict=True):
        masks, _ = classical_vessels(frames)
        masks = remove_small_components(masks, min_component_px(frames.shape[1:]))
        classical_cases.append({"seed": s, **frame_metrics(masks, truth)})
    keys = ("iou", "sensitivity", "specificity")
    classical = summarise([{k: c[k] for k in keys} for c in classical_cases])
    print("classical", json.dumps(classical), flush=True)
    # max_side: runs larger than the training size are segmented on a grid of that size
    # (coronary fields of view are similar, so this keeps vessel calibres in pixels).
    config = {"width": args.width, "temporal_features": 8, "threshold": 0.5, "max_side": args.size}
    manifest = hashlib.sha256(
        json.dumps(
            {
                "generator": "training.phantoms.coronary",
                "size": args.size,
                "frames": args.frames,
                "train_seeds": args.train_seeds,
            }
        ).encode()
    ).hexdigest()
    table = {"classical": classical}
    for n in args.neighbours:
        model, info = train(
            train_runs,
            n,
            config,
            args.steps,
            args.cpu_minutes,
            args.batch,
            args.crop,
            args.lr,
            args.seed,
            device,
            log=lambda m: print(m, flush=True),
        )
        cases = []
        for s, (frames, truth) in zip(args.test_seeds, test, strict=True):
            pred = segment(model, normalise_cine(frames), n, device)
            cases.append({"seed": s, **frame_metrics(pred, truth)})
        summary = summarise([{k: c[k] for k in keys} for c in cases])
        table[f"N={n}"] = summary
        print(f"N={n}", json.dumps(summary), flush=True)
        metrics = {
            "held_out_seeds": args.test_seeds,
            "model": summary,
            "classical": classical,
            "per_case": {"model": cases, "classical": classical_cases},
        }
        card = f"""# 3D-2D CE-Net, N = {n} ({"2D baseline" if n == 0 else f"{2 * n + 1}-frame window"}), version {args.version}

Per-frame coronary vessel segmentation of XA cine runs: a 3D convolution over
{2 * n + 1} neighbouring frames (edge frames repeated), a 2D convolution to 3
channels, and CE-Net (ResNet-34-style encoder of width {args.width}, DAC, RMP,
decoder) with instance norm.

- **No pretrained weights.** The CE-Net paper starts from an ImageNet
  ResNet-34; those weights cannot be downloaded here, so this package was
  trained from scratch on synthetic phantoms, on the CPU
  ({info["steps"]} steps of {args.batch} crops of {args.crop} px, {info["cpu_minutes"]:.0f} CPU min).
- **Training data:** `training.phantoms.coronary` seeds {args.train_seeds},
  {args.size} px, {args.frames} frames. No patient data.
- **Held-out metrics** (seeds {args.test_seeds}): IoU
  {summary["iou"]["mean"]:.3f} +/- {summary["iou"]["std"]:.3f} (classical
  {classical["iou"]["mean"]:.3f} +/- {classical["iou"]["std"]:.3f}); see metrics.json.
- **Intended use:** research and demonstration. Not validated on clinical data.
"""
        write_package(
            Path(args.output) / f"xa-coronary-cenet-n{n}",
            model=model,
            name=f"xa-coronary-cenet-n{n}",
            version=args.version,
            architecture_name=ARCHITECTURE,
            config={**config, "neighbours": n},
            pipeline=NAME,
            metrics=metrics,
            data={
                "synthetic": True,
                "generator": "training.phantoms.coronary",
                "size": args.size,
                "frames": args.frames,
                "train_seeds": args.train_seeds,
                "test_seeds": args.test_seeds,
                "training_seed": args.seed,
                **info,
            },
            model_card=card,
            training_command=" ".join(
                [
                    sys.executable,
                    "-m",
                    "training.quick_train_coronary",
                    *(argv if argv is not None else sys.argv[1:]),
                ]
            ),
            dataset_manifest_hash=manifest,
        )
    print(json.dumps(table, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
