"""Perfusion results a reader can trust (issue 13): coverage, impossible values, verdicts.

    python -m bench.perfusion_quality [--cases N] [--size PX] [--no-write] [--classical-only]

On held-out family A phantoms (``training.phantoms.dsa``, seeds from 900000 as
in ``bench.generalization``: as generated, and with its domain randomisation),
and on family B (``training.phantoms.family_b``, seeds from 700000; no
threshold here was chosen on it), each run goes through ``dsa_perfusion`` and
is scored, once by the classical path and once with every ``dsa_perfusion`` package
in ``models/`` (what a site that configures it runs: the package finds the ICA,
the rest of the pipeline is the same):

- outcome: maps, or refused (and why);
- brain coverage: share of the perfused brain in view (perfusion truth
  defined, inside the exposed field, no artery, vein or device on the ray:
  a pixel under a vessel cannot be estimated) that has a value; a second
  figure leaves out only vessels at least ``LARGE_MM`` wide;
- values off the perfused brain: share of the pixels with a value where the
  perfusion truth is undefined (outside the brain regions or the field);
- impossible values: pixels with a value that is negative (CBF, CBV, MTT) or
  outside the run (MTT, Tmax, TTP): the target is 0;
- the verdict, its reasons, and which ICA rule found the AIF.

Figures go to the "perfusion_quality" section of BENCHMARKS.md, per family and
method: runs with maps, mean ± SD coverage with a t-based 95 % CI, runs at >= 90 %.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections import Counter
from typing import Any

import numpy as np
from scipy import stats

SECTION = "perfusion_quality"
# A vessel this wide (truth diameter) is "large": the second coverage figure only
# leaves those out (a pixel under a thinner one still sees mostly tissue).
LARGE_MM = 2.0
SEED0 = {"A": 900_000, "Ar": 900_000, "B": 700_000}
NAMES = {"A": "A (held out)", "Ar": "A randomised (held out)", "B": "B (evaluation only)"}


def methods(classical_only: bool) -> list[Any]:
    """``bench.generalization.Method``s: the classical path, then its option variants
    (off by default) and each package, as ``bench.generalization`` measures them."""
    from bench.generalization import methods_for

    found = methods_for("dsa_perfusion", {})
    return found[:1] if classical_only else found


def case(family: str, seed: int, size: int) -> tuple[Any, dict[str, np.ndarray]]:
    """The run and its truth (20 s; family A at 4 frames/s, SNR 30 on the tissue)."""
    if family == "B":
        from training.phantoms.family_b import dsa as dsa_b

        p = dsa_b.generate(seed, size=size, duration_s=20.0)
    else:
        from training.phantoms import dsa

        extra: dict[str, Any] = {"randomise": True} if family == "Ar" else {}
        p = dsa.generate(
            seed, size=size, frames=80, fps=4.0, snr=30.0, snr_reference="tissue", **extra
        )
    return p.to_run(), p.truth


def score(run: Any, truth: dict[str, np.ndarray], method: Any = None) -> dict[str, Any]:
    """One run scored; ``method``: a ``bench.generalization.Method`` (None: the
    classical path with its defaults)."""
    from pipelines.base import ParametricMapOutput, PipelineContext, PipelineError, get

    context = PipelineContext() if method is None else method.context()
    try:
        result = get("dsa_perfusion")(run, context)
    except PipelineError as exc:
        return {"outcome": "refused", "reason": str(exc)}
    maps = {o.key: o for o in result.outputs if isinstance(o, ParametricMapOutput)}
    duration = float(run.meta.frame_times_s[-1])
    impossible = 0
    for key, out in maps.items():
        values = out.values[out.valid]
        bad = ~np.isfinite(values) | (values < 0)
        if key in ("mtt", "tmax", "ttp"):
            bad |= values > duration
        impossible += int(bad.sum())
    valid = maps["cbf"].valid
    assert valid is not None
    field = truth.get("field", np.ones_like(valid)).astype(bool)
    brain = np.isfinite(truth["cbf"]) & field
    any_vessel = (truth["artery"] | truth["vein"] | truth["device"]).astype(bool)
    large = (any_vessel & (truth["diameter_mm"] >= LARGE_MM)) | truth["device"].astype(bool)
    perfused = brain & ~any_vessel
    from pipelines.perfusion.localise import RULE_NAMES, rule_in

    rule = rule_in(result.notes)
    quality = result.quality
    return {
        "outcome": "maps",
        "coverage": float((valid & perfused).sum() / max(int(perfused.sum()), 1)),
        "coverage_large": float(
            (valid & brain & ~large).sum() / max(int((brain & ~large).sum()), 1)
        ),
        "valid_outside_perfused": float((valid & ~brain).sum() / max(int(valid.sum()), 1)),
        "impossible": impossible,
        "verdict": quality.verdict.value if quality else "none",
        "reasons": list(quality.reasons) if quality else [],
        "rule": RULE_NAMES[rule] if rule else "",
    }


def summary(family: str, method: str, rows: list[dict[str, Any]]) -> str:
    maps = [r for r in rows if r["outcome"] == "maps"]
    cov = np.array([r["coverage"] for r in maps])
    if len(cov) > 1:
        half = stats.t.ppf(0.975, len(cov) - 1) * cov.std(ddof=1) / np.sqrt(len(cov))
        cell = f"{100 * cov.mean():.1f} ± {100 * cov.std(ddof=1):.1f} (95 % CI ± {100 * half:.1f})"
    elif len(cov) == 1:
        cell = f"{100 * cov[0]:.1f}"
    else:
        cell = "–"
    off = [r["valid_outside_perfused"] for r in maps]
    off_cell = f"{100 * np.mean(off):.1f}" if off else "–"
    wide = [r["coverage_large"] for r in maps]
    wide_cell = f"{100 * np.mean(wide):.1f}" if wide else "–"
    verdicts = Counter(r["verdict"] for r in maps)
    rules = Counter(r["rule"] for r in maps)
    return (
        f"| {NAMES[family]} | {method} | {len(maps)} / {len(rows)} | {cell} | "
        f"{sum(c >= 0.9 for c in cov)} | {wide_cell} | {off_cell} | "
        f"{sum(r['impossible'] for r in maps)} | "
        + ", ".join(f"{k} {v}" for k, v in sorted(verdicts.items()))
        + " | "
        + ", ".join(f"{k} {v}" for k, v in sorted(rules.items()))
        + " |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=6, help="runs per family")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--families", default="A,Ar,B")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument(
        "--classical-only", action="store_true", help="leave out the packages in models/"
    )
    args = parser.parse_args(argv)
    import torch

    t0 = time.monotonic()
    lines: list[str] = []
    details: list[str] = []
    todo = methods(args.classical_only)
    for family in args.families.split(","):
        rows: dict[str, list[dict[str, Any]]] = {m.label: [] for m in todo}
        for seed in range(SEED0[family], SEED0[family] + args.cases):
            run, truth = case(family, seed, args.size)
            for method in todo:
                label = method.label
                row = score(run, truth, method)
                rows[label].append(row)
                text = (
                    f"coverage {100 * row['coverage']:.1f} %, {row['verdict']}, rule {row['rule']}"
                    + (f" ({'; '.join(row['reasons'])})" if row["reasons"] else "")
                    if row["outcome"] == "maps"
                    else f"refused: {row['reason']}"
                )
                details.append(f"- {NAMES[family]} seed {seed}, {label}: {text}")
                print(details[-1], flush=True)
        lines.extend(summary(family, m.label, rows[m.label]) for m in todo)
    seconds = time.monotonic() - t0
    body = (
        "`python -m bench.perfusion_quality` "
        f"({args.cases} runs per family, {args.size} px, 20 s; family A at 4 frames/s, SNR 30 "
        "on the tissue; family B its own irregular protocol). Coverage = share of the perfused "
        "brain in view (perfusion truth defined, inside the exposed field, no artery, vein or "
        "device on the ray) that has a value; the second coverage leaves out only vessels at "
        f"least {LARGE_MM:g} mm wide (and devices); values off the perfused brain = share of "
        "the pixels with a value where the perfusion truth is undefined (outside the brain "
        "regions or the field); "
        "impossible = pixels with a negative CBF, CBV or "
        "MTT, or an MTT, Tmax or TTP beyond the run (target 0). No reference run: these are "
        "absolute figures of the classical path, of its options that are off by default "
        "and of each `dsa_perfusion` package in `models/` "
        f"({', '.join(m.label for m in todo[1:]) or 'none'}) on the same runs."
        "\n\n"
        "| family | method | runs with maps | coverage (%) mean ± SD | runs >= 90 % | coverage, only "
        f"vessels >= {LARGE_MM:g} mm left out (%) | values off the perfused brain (%) | "
        "impossible values | verdicts | ICA rule |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
        + "\n".join(lines)
        + "\n\nPer run:\n\n"
        + "\n".join(details)
        + f"\n\n{seconds:.0f} s on {platform.machine()} ({platform.processor() or 'CPU'}), "
        f"{torch.get_num_threads()} threads."
    )
    print(body)
    if not args.no_write:
        from bench.report import write_section

        write_section(SECTION, "Perfusion: coverage, impossible values, verdicts", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
