"""Pixel shift of the mask of native DSA runs, written to BENCHMARKS.md.

    python -m bench.pixel_shift [--cases N] [--skip N] [--size PX] [--frames N] [--no-write]

Native runs (live frames with a Mask Subtraction Sequence) of held-out randomised
family A phantoms (``training.phantoms.dsa``, seeds from 900016, never used to
train or tune; 900000-900015 were looked at while the registration was built; half
of them have the head moved between mask and fill, with a
small rotation), the same with the head drifting after the mask as well (seeds from
910016, drift of 0.5-2.5 mm: what the node does not follow), and of family B
(``training.phantoms.family_b``, seeds from
700016: its own drift and non-rigid motion after the mask; evaluation only, no
constant here was chosen on it). Each run is written as DICOM and decoded by the
node (``dicom_node.runs.load_run``: the mask registered by
``pipelines.pixel_shift`` where that is a real correction), and subtracted
without a shift by the generator's ``to_run`` (the reference, the same run).
Both go through the classical ``dsa_av`` and ``dsa_ia`` paths; reported per
family: how many runs were shifted (and how many had the mask moved, family A's
truth), the paired difference in M-Dice (``dsa_av``) and artery Dice
(``dsa_ia``) over the shifted runs and over all runs (mean +- SD, t-based 95 %
CI), the shift's error against the truth's translation (family A) and, per frame,
against each live frame's displacement from the mask (median over the frames,
median over the runs; in brackets with no shift), and the time
the registration takes (the decode with it less the decode without), against the
classical ``dsa_av`` path's time on the same run.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.generalization import Case, av_metrics, ia_metrics, stats
from bench.report import write_section

SEED0 = {"Ar": 900_000, "Ad": 910_000, "B": 700_000}
LABEL = {
    "Ar": "A randomised (held out)",
    "Ad": "A randomised, head drifting after the mask (held out)",
    "B": "B (evaluation only)",
}
DRIFT_MM = (0.5, 2.5)  # family "Ad": the drift's amplitude, uniform per run


def phantom(family: str, seed: int, size: int, frames: int) -> Any:
    if family == "B":
        from training.phantoms.family_b import dsa as dsa_b

        return dsa_b.generate(seed, size=size, native=True)
    from training.phantoms import dsa

    drift = 0.0
    if family == "Ad":
        drift = float(np.random.default_rng([seed, 0xD1]).uniform(*DRIFT_MM))
    return dsa.generate(
        seed, size=size, frames=frames, native=True, randomise=True, motion_mm=drift
    )


def _decode(files: list[Path], estimate: bool) -> tuple[Any, float]:
    from dicom_node import runs
    from pipelines import pixel_shift

    saved = pixel_shift.estimate, pixel_shift.exposed
    if not estimate:  # the reference decode: no estimate, nor the field it would need
        pixel_shift.estimate = lambda *a, **k: None
        pixel_shift.exposed = lambda mask, live, field=None: np.ones(mask.shape, bool)
    try:
        t0 = time.perf_counter()
        run = runs.load_run(files).run
        return run, time.perf_counter() - t0
    finally:
        pixel_shift.estimate, pixel_shift.exposed = saved


def measure(family: str, seed: int, size: int, frames: int) -> dict[str, Any]:
    from pipelines.base import PipelineContext, get

    p = phantom(family, seed, size, frames)
    with tempfile.TemporaryDirectory() as tmp:
        files = [f for f in p.write(tmp) if f.suffix == ".dcm"]
        node, t_node = _decode(files, estimate=True)
        plain, t_plain = _decode(files, estimate=False)
    row: dict[str, Any] = {
        "family": family,
        "seed": seed,
        "shifted": node.meta.extra.get("mask_shift") is not None,
        "t_node": t_node,
        "t_plain": t_plain,
    }
    shift = node.meta.extra.get("mask_shift")
    if family != "B":
        # Family A's truth: the mask's displacement, then every frame's (px); the mask
        # must move by the difference to match a live frame.
        motion = np.asarray(p.truth["motion_px"], np.float64)[:, :2]
        want = {k: motion[k] - motion[0] for k in range(1, len(motion))}  # mask: frame 0
        first = min(want)
        row["moved"] = bool(np.hypot(*want[first]) > 0)
        row["drift_px"] = float(max(np.hypot(*(w - want[first])) for w in want.values()))
        got = np.array((shift.rows, shift.columns) if shift else (0.0, 0.0))
        if shift is not None:
            row["error_px"] = float(np.hypot(*(got - want[first])))
            row["truth_px"] = float(np.hypot(*want[first]))
        row["frame_error_px"] = float(np.median([np.hypot(*(got - want[k])) for k in want]))
        row["frame_error_plain_px"] = float(np.median([np.hypot(*want[k]) for k in want]))
    for name, metrics, key in (("dsa_av", av_metrics, "m_dice"), ("dsa_ia", ia_metrics, "a_dice")):
        for label, run in (("node", node), ("plain", plain)):
            t0 = time.perf_counter()
            result = get(name)(run, PipelineContext())
            row[f"t_{name}"] = time.perf_counter() - t0
            row[f"{name}_{label}"] = metrics(result, Case(family, seed, run, p.truth, p))[key]
    return row


def _fmt(s: dict[str, Any], digits: int = 3) -> str:
    if not s["n"]:
        return "-"
    lo, hi = s["ci95"]
    ci = f" [{lo:+.{digits}f}, {hi:+.{digits}f}]" if s["n"] > 1 else ""
    return f"{s['mean']:+.{digits}f} ± {s['sd']:.{digits}f}{ci} (n = {s['n']})"


def report(rows: list[dict[str, Any]], args: argparse.Namespace, seconds: float) -> str:
    lines = [
        f"`python -m bench.pixel_shift --cases {args.cases} --size {args.size} --frames "
        f"{args.frames} --skip {args.skip}`: seeds {SEED0['Ar'] + args.skip}+ (family A) and "
        f"{SEED0['B'] + args.skip}+ (family B); native runs, decoded by the node (mask "
        "registered where that is a "
        "real correction) against the same file decoded without the estimate (reference). "
        f"{platform.processor() or platform.machine()}, {seconds / 60:.1f} min.",
        "",
        "| family | runs shifted | mask moved (truth) | shift error, px (truth's size) "
        "| runs whose head drifted > 0.5 px after the first live frame "
        "| per-frame error, px: median of runs (unregistered) "
        "| `dsa_av` M-Dice, shifted runs | `dsa_ia` artery Dice, shifted runs "
        "| `dsa_av` M-Dice, all runs | time of the registration, and against `dsa_av` |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for family in ("Ar", "Ad", "B"):
        fam = [r for r in rows if r["family"] == family]
        if not fam:
            continue
        shifted = [r for r in fam if r["shifted"]]
        moved = [r for r in fam if r.get("moved")]
        err = [r["error_px"] for r in shifted if "error_px" in r]
        size = [r["truth_px"] for r in shifted if "truth_px" in r]
        error = f"{np.median(err):.2f} median ({np.median(size):.2f})" if err else "-"
        truth = family != "B"
        moved_s = f"{len(moved)} of {len(fam)}" if truth else "not recorded"
        hits = sum(1 for r in shifted if r.get("moved"))
        shifted_s = f"{len(shifted)} of {len(fam)}" + (f" ({hits} of them moved)" if truth else "")
        drifted = [r for r in fam if r.get("drift_px", 0.0) > 0.5]
        drifted_s = f"{len(drifted)} of {len(fam)}" if truth else "not recorded"
        frame_err = "-"
        if truth:
            frame_err = (
                f"{np.median([r['frame_error_px'] for r in fam]):.2f} "
                f"({np.median([r['frame_error_plain_px'] for r in fam]):.2f})"
            )

        def diff(name: str, runs: list[dict[str, Any]]) -> str:
            return _fmt(stats([r[f"{name}_node"] - r[f"{name}_plain"] for r in runs]))

        extra = float(np.mean([r["t_node"] - r["t_plain"] for r in fam]))
        ratio = extra / float(np.mean([r["t_dsa_av"] for r in fam]))
        lines.append(
            f"| {LABEL[family]} | {shifted_s} | {moved_s} | {error} | {drifted_s} "
            f"| {frame_err} | {diff('dsa_av', shifted)} "
            f"| {diff('dsa_ia', shifted)} | {diff('dsa_av', fam)} "
            f"| {extra:.2f} s, {ratio:.2f}× |"
        )
    lines += [
        "",
        "Differences are node minus reference, paired per run; a positive difference is "
        "a better segmentation with the shift. The truth's shift is the translation "
        "the generator moved the mask by (its rotation, up to 0.8°, is not corrected).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.pixel_shift", description=__doc__)
    ap.add_argument("--cases", type=int, default=32, help="runs per family (default 32)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--frames", type=int, default=20, help="family A frames (default 20)")
    ap.add_argument("--families", default="Ar,Ad,B")
    ap.add_argument(
        "--skip",
        type=int,
        default=16,
        help="seeds left out at the start of each family's range (default 16: family A's "
        "900000-900015 were looked at while the registration was built)",
    )
    ap.add_argument("--no-write", action="store_true", help="print, do not touch BENCHMARKS.md")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rows = []
    for family in args.families.split(","):
        first = SEED0[family] + args.skip
        for seed in range(first, first + args.cases):
            row = measure(family, seed, args.size, args.frames)
            print(row, flush=True)
            rows.append(row)
    text = report(rows, args, time.perf_counter() - t0)
    print(text)
    if not args.no_write:
        write_section("pixel_shift", "Pixel shift of native DSA runs", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
