"""The classical ``rotational_dla`` path across contrast levels, written to BENCHMARKS.md.

    python -m bench.rotational_classical [--seeds 2900 2901 2902 2903] [--size 256]

In intra-arterial 3D-RA the iodine reaches 200-3000 HU, fainter than bone or
brighter. On held-out family A phantoms (``training.phantoms.rotational``,
seeds never used for training or tuning) at fixed lumen values of 300, 500,
800, 1200, 2000 and 3000 HU, and on randomised held-out phantoms (contrast,
bone density, kernel, noise, streaks and truncation drawn from the priors),
this measures the vessel Dice, sensitivity and PPV inside the head of

- the classical path as it is (``pipelines.rotational.classical_tissues``:
  thresholds from the volume, tube/bone shape, watershed), and
- the reference: the previous classical path, HU constants tuned on seeds
  2000-2001 at one contrast (``legacy_classical_tissues`` below, kept here
  only to measure against, in the same run on the same volumes).

Family B is not used here (it is evaluation-only and reported by
``bench.generalization``).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from scipy import stats

from bench.report import write_section
from pipelines.models.dla import CLASS_BONE, CLASS_SOFT, CLASS_VESSEL
from pipelines.rotational import body_mask, classical_tissues

CONTRASTS_HU = (300, 500, 800, 1200, 2000, 3000)
HELD_OUT = (2900, 2901, 2902, 2903)
# The constants of the previous classical path (tuned on training seeds 2000-2001).
LEGACY = {
    "dense_hu": 250.0,
    "bone_core_hu": 1000.0,
    "plate_radius_mm": 2.6,
    "grow_mm": 2.5,
    "min_vessel_mm3": 50.0,
}


def legacy_classical_tissues(hu: np.ndarray, spacing_mm: tuple[float, float, float]) -> np.ndarray:
    """The previous classical path: fixed HU thresholds ('bone is denser than contrast'),
    dense plates as bone seeds grown by a few mm, components (skull-base growth was off)."""
    p = LEGACY
    body = body_mask(hu)
    dense = body & (hu > p["dense_hu"])
    labels = np.full(hu.shape, CLASS_SOFT, np.uint8)
    if not dense.any():
        return labels
    r = p["plate_radius_mm"]
    inside = ndi.distance_transform_edt(dense, sampling=spacing_mm) > r
    plate = ndi.distance_transform_edt(~inside, sampling=spacing_mm) <= r
    seed = (dense & (hu > p["bone_core_hu"])) | (plate & dense)
    steps = max(1, int(round(p["grow_mm"] / min(spacing_mm))))
    bone = ndi.binary_dilation(seed, iterations=steps, mask=dense)
    vessel = dense & ~bone
    parts, count = ndi.label(vessel, structure=np.ones((3, 3, 3), bool))
    if count:
        keep = np.bincount(parts.ravel()) * float(np.prod(spacing_mm)) >= p["min_vessel_mm3"]
        keep[0] = False
        vessel = keep[parts]
    labels[bone] = CLASS_BONE
    labels[vessel] = CLASS_VESSEL
    return labels


def vessel_scores(labels: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Dice, sensitivity, PPV of the vessel class inside the head (phantom label != 0)."""
    body = truth != 0
    pred, true = (labels == CLASS_VESSEL)[body], (truth == 1)[body]
    tp = float((pred & true).sum())
    fp = float((pred & ~true).sum())
    fn = float((~pred & true).sum())
    return {
        "dice": 2 * tp / max(2 * tp + fp + fn, 1.0),
        "sensitivity": tp / max(tp + fn, 1.0),
        "ppv": tp / max(tp + fp, 1.0),
    }


def summary(values: Sequence[float]) -> str:
    """mean ± SD [95 % CI, t distribution, within 0-1]."""
    v = np.asarray(values, float)
    if len(v) < 2:
        return f"{v.mean():.3f}"
    half = float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
    lo, hi = max(v.mean() - half, 0.0), min(v.mean() + half, 1.0)
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f} [{lo:.3f}, {hi:.3f}]"


Method = Callable[[np.ndarray, tuple[float, float, float]], np.ndarray]
METHODS: dict[str, Method] = {
    "classical (thresholds from the volume, shape, watershed)": classical_tissues,
    "previous classical (HU constants tuned at one contrast)": legacy_classical_tissues,
}


def measure(volumes: Sequence[tuple[Any, ...]]) -> dict[str, list[dict[str, float]]]:
    """Scores and seconds of every method on (label, hu, truth, spacing) volumes."""
    out: dict[str, list[dict[str, float]]] = {name: [] for name in METHODS}
    for label, hu, truth, spacing in volumes:
        for name, method in METHODS.items():
            t0 = time.perf_counter()
            scores = vessel_scores(method(hu, spacing), truth)
            scores["seconds"] = time.perf_counter() - t0
            out[name].append(scores)
            print(f"{label} {name[:22]}: {scores}", flush=True)
    return out


def phantom(
    seed: int, size: int, **options: Any
) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    from training.phantoms import rotational

    ph = rotational.generate(seed, size=size, **options)
    spacing = tuple(float(s) for s in ph.spacing_mm)
    return np.asarray(ph.hu, np.float32), np.asarray(ph.truth["labels"]), spacing


def fixed_contrast(seeds: Sequence[int], size: int) -> str:
    lines = [
        "| lumen (HU) | method | vessel Dice | sensitivity | PPV | s / volume |",
        "|---:|---|---|---|---|---:|",
    ]
    for contrast in CONTRASTS_HU:
        volumes = []
        for seed in seeds:
            hu, truth, spacing = phantom(seed, size, contrast_hu=float(contrast))
            volumes.append((f"{contrast} HU seed {seed}", hu, truth, spacing))
        scores = measure(volumes)
        for name, cases in scores.items():
            lines.append(
                f"| {contrast} | {name} | {summary([c['dice'] for c in cases])} | "
                f"{np.mean([c['sensitivity'] for c in cases]):.3f} | "
                f"{np.mean([c['ppv'] for c in cases]):.3f} | "
                f"{np.mean([c['seconds'] for c in cases]):.0f} |"
            )
    return "\n".join(lines)


def randomised(seeds: Sequence[int], size: int) -> str:
    from training.phantoms import rotational

    lines = [
        "| seed | drawn lumen (HU) | noise (HU) | classical Dice | previous classical Dice |",
        "|---:|---:|---:|---:|---:|",
    ]
    volumes, drawn = [], []
    for seed in seeds:
        ph = rotational.generate(seed, size=size, randomise=True)
        spacing = tuple(float(s) for s in ph.spacing_mm)
        volumes.append((f"randomised seed {seed}", ph.hu, np.asarray(ph.truth["labels"]), spacing))
        drawn.append((seed, ph.appearance or {}))
    scores = measure(volumes)
    new, old = list(scores.values())
    for (seed, app), a, b in zip(drawn, new, old, strict=True):
        c, n = app.get("contrast_hu", float("nan")), app.get("noise_hu", float("nan"))
        lines.append(f"| {seed} | {c:.0f} | {n:.0f} | {a['dice']:.3f} | {b['dice']:.3f} |")
    lines.append(
        f"| all | | | {summary([a['dice'] for a in new])} | {summary([b['dice'] for b in old])} |"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=list(HELD_OUT))
    ap.add_argument("--randomised-seeds", type=int, nargs="*", default=list(range(2904, 2910)))
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--no-write", action="store_true", help="print only (smoke runs)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    body = [
        f"Held-out family A phantoms, seeds {', '.join(map(str, args.seeds))}, "
        f"{args.size}^3 at {117.76 / args.size:.2f} mm, lumen value of the proximal ICA fixed "
        "(distally 30 % lower); vessel class inside the head; mean ± SD [95 % CI, t] over "
        "the seeds. The reference (previous classical path) runs on the same volumes in "
        "the same process.",
        "",
        fixed_contrast(args.seeds, args.size),
    ]
    if args.randomised_seeds:
        body += [
            "",
            f"Randomised held-out family A (`generate(seed, randomise=True)`, seeds "
            f"{args.randomised_seeds[0]}-{args.randomised_seeds[-1]}): contrast 200-3000 HU, "
            "bone density, kernel, noise, streaks and truncation drawn from the priors.",
            "",
            randomised(args.randomised_seeds, args.size),
        ]
    load = os.getloadavg()
    body += [
        "",
        f"Whole benchmark {time.perf_counter() - t0:.0f} s; load average at the end "
        f"{load[0]:.1f} on {os.cpu_count()} cores (shared machine: times are upper bounds).",
    ]
    text = "\n".join(body)
    print(text)
    if not args.no_write:
        write_section(
            "rotational_classical", "Rotational classical path across contrast levels", text
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
