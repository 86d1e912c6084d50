"""Perfusion DSA: accuracy on a digital reference object and speed of the deconvolution.

Run as ``python -m bench.perfusion``. The digital reference object (DRO) is a grid
of square regions with known CBF, MTT, delay and residue shape (exponential or
box), convolved with a gamma-variate AIF at fine resolution, then sampled at
DSA frame rates with Gaussian noise. ``dsa_run`` embeds the DRO in a synthetic
subtracted DSA run (an ICA entering from the border, the tissue regions, a flat
background) so the whole pipeline can be measured, ICA and AIF included.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from pipelines.base import Run, RunMeta

XA_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.12.1"

FINE_STEP_S = 0.01


def gamma_variate(
    t: np.ndarray, t0: float = 1.5, alpha: float = 3.0, beta: float = 0.6
) -> np.ndarray:
    """A gamma-variate bolus with unit peak, arriving at ``t0`` seconds."""
    s = np.clip(t - t0, 0, None)
    curve = s**alpha * np.exp(-s / beta)
    return curve / (alpha * beta) ** alpha / np.exp(-alpha)


def residue(t: np.ndarray, mtt: float, shape: str) -> np.ndarray:
    """Residue functions with mean transit time ``mtt`` (area = mtt)."""
    if shape == "exponential":
        return np.where(t >= 0, np.exp(-np.clip(t, 0, None) / mtt), 0.0)
    if shape == "box":
        return ((t >= 0) & (t < mtt)).astype(float)
    raise ValueError(f"unknown residue shape {shape!r}")


def tissue_curve(
    t: np.ndarray, aif: np.ndarray, cbf: float, mtt: float, delay: float, shape: str
) -> np.ndarray:
    """``C = CBF * AIF (*) R(t - delay)`` on a fine uniform grid ``t``."""
    step = t[1] - t[0]
    kernel = residue(t - delay, mtt, shape)
    return cbf * step * np.convolve(aif, kernel)[: len(t)]


@dataclass
class DRO:
    """Tissue concentration frames (N, H, W), the AIF, and the truth maps."""

    times_s: np.ndarray
    tissue: np.ndarray
    aif: np.ndarray
    labels: np.ndarray  # region index per pixel, -1 outside
    interior: np.ndarray  # region interiors (away from region borders)
    regions: list[dict[str, float | str]]
    noise_sigma: float
    truth: dict[str, np.ndarray] = field(default_factory=dict)


def make_dro(
    seed: int,
    fps: float = 4.0,
    duration_s: float = 20.0,
    snr: float | None = 30.0,
    tile: int = 20,
    cbfs: tuple[float, ...] = (0.01, 0.015, 0.02),
    mtts: tuple[float, ...] = (2.0, 4.0, 6.0),
    delays: tuple[float, ...] = (0.0, 1.0, 2.0, 3.0),
    shapes: tuple[str, ...] = ("exponential", "box"),
    aif_t0: float = 1.5,
    margin: int = 4,
    times_s: np.ndarray | None = None,
) -> DRO:
    """Regions for every combination of CBF (1/s), MTT (s), delay (s) and residue shape.

    SNR is the median tissue peak over the noise SD (``None``: no noise); the seed
    draws the noise and a sub-frame jitter of the bolus arrival. ``times_s``
    overrides the uniform sampling at ``fps`` (variable frame rates).
    """
    rng = np.random.default_rng(seed)
    times = np.arange(0, duration_s, 1 / fps) if times_s is None else np.asarray(times_s, float)
    fine = np.arange(0, times[-1] + 10, FINE_STEP_S)
    t0 = aif_t0 + rng.uniform(0, 1 / fps)
    aif_fine = gamma_variate(fine, t0=t0)
    combos = list(itertools.product(cbfs, mtts, delays, shapes))
    cols = int(np.ceil(np.sqrt(len(combos))))
    rows = int(np.ceil(len(combos) / cols))
    height, width = rows * tile + 2 * margin, cols * tile + 2 * margin
    tissue = np.zeros((len(times), height, width), np.float64)
    labels = np.full((height, width), -1, np.int32)
    interior = np.zeros((height, width), bool)
    truth = {k: np.zeros((height, width)) for k in ("cbf", "cbv", "mtt", "tmax")}
    regions: list[dict[str, float | str]] = []
    peaks = []
    edge = max(2, tile // 4)
    for index, (cbf, mtt, delay, shape) in enumerate(combos):
        r, c = divmod(index, cols)
        y, x = margin + r * tile, margin + c * tile
        sampled = np.interp(times, fine, tissue_curve(fine, aif_fine, cbf, mtt, delay, shape))
        peaks.append(sampled.max())
        tissue[:, y : y + tile, x : x + tile] = sampled[:, None, None]
        labels[y : y + tile, x : x + tile] = index
        interior[y + edge : y + tile - edge, x + edge : x + tile - edge] = True
        for key, value in (("cbf", cbf), ("cbv", cbf * mtt), ("mtt", mtt), ("tmax", delay)):
            truth[key][y : y + tile, x : x + tile] = value
        regions.append({"cbf": cbf, "mtt": mtt, "delay": delay, "shape": shape})
    sigma = float(np.median(peaks)) / snr if snr else 0.0
    if sigma:
        tissue += rng.normal(0, sigma, tissue.shape)
    aif = np.interp(times, fine, aif_fine)
    return DRO(
        times_s=times,
        tissue=tissue.astype(np.float32),
        aif=aif,
        labels=labels,
        interior=interior,
        regions=regions,
        noise_sigma=sigma,
        truth=truth,
    )


@dataclass
class SyntheticRun:
    run: Run
    dro: DRO  # noise-free tissue; truth maps in run coordinates
    ica: np.ndarray  # true ICA mask
    gain: float


def _vessel(
    shape: tuple[int, int], axis: int, position: int, start: int, stop: int, radius: float
) -> np.ndarray:
    """Projected thickness of a straight vessel along rows (axis 0) or columns (axis 1)."""
    rows, cols = np.indices(shape)
    across, along = (cols, rows) if axis == 0 else (rows, cols)
    chord = 2 * np.sqrt(np.clip(radius**2 - (across - position) ** 2, 0, None)) / (2 * radius)
    return np.where((along >= start) & (along < stop), chord, 0.0)


def dsa_run(
    seed: int,
    fps: float = 4.0,
    snr: float | None = 30.0,
    duration_s: float = 20.0,
    spacing_mm: float = 0.5,
    times_s: np.ndarray | None = None,
    background: float = 3000.0,
    gain: float = 2000.0,
    **dro_options: object,
) -> SyntheticRun:
    """A subtracted DSA run (vessels dark) holding the DRO regions, an ICA entering
    from the bottom border, a thinner early artery (ECA-like) and a wide late vein
    leaving through the left border. SNR as in ``make_dro`` (tissue peak / noise)."""
    dro = make_dro(seed, fps=fps, duration_s=duration_s, snr=None, times_s=times_s, **dro_options)  # type: ignore[arg-type]
    rng = np.random.default_rng(seed + 10_000)
    n, h, w = dro.tissue.shape
    height, width = h + 56, w
    conc = np.zeros((n, height, width), np.float32)
    conc[:, :h] = dro.tissue
    ica_col, eca_col = width // 3, 2 * width // 3
    ica = _vessel((height, width), 0, ica_col, h + 4, height, 5.0)
    eca = _vessel((height, width), 0, eca_col, h + 20, height, 1.5)
    vein = _vessel((height, width), 1, h + 12, 0, width // 4, 7.0)
    fine = np.arange(0, dro.times_s[-1] + 10, FINE_STEP_S)
    venous = np.interp(dro.times_s, fine, 0.6 * gamma_variate(fine, t0=6.5, beta=1.4))
    conc += dro.aif[:, None, None] * (ica + eca)[None] + venous[:, None, None] * vein[None]
    peaks = dro.tissue.reshape(n, -1).max(axis=0)
    sigma = gain * float(np.median(peaks[dro.labels.ravel() >= 0])) / snr if snr else 0.0
    pixels = (
        background - gain * conc + rng.normal(0, sigma, conc.shape)
        if sigma
        else background - gain * conc
    )
    pixels = np.round(pixels).astype(np.float32)
    pad = np.zeros((height, width))
    truth = {}
    for key, value in dro.truth.items():
        full = pad.copy()
        full[:h] = value
        truth[key] = full
    labels = np.full((height, width), -1, np.int32)
    labels[:h] = dro.labels
    interior = np.zeros((height, width), bool)
    interior[:h] = dro.interior
    embedded = DRO(
        times_s=dro.times_s,
        tissue=conc,
        aif=dro.aif,
        labels=labels,
        interior=interior,
        regions=dro.regions,
        noise_sigma=sigma / gain,
        truth=truth,
    )
    meta = RunMeta(
        modality="XA",
        sop_class_uid=XA_SOP_CLASS,
        rows=height,
        columns=width,
        number_of_frames=n,
        frame_times_s=dro.times_s.copy(),
        pixel_spacing_mm=(spacing_mm, spacing_mm),
        subtracted=True,
        frame_rate=fps,
        series_description="synthetic perfusion DSA",
    )
    return SyntheticRun(run=Run(pixels=pixels, meta=meta), dro=embedded, ica=ica > 0.5, gain=gain)


def reference_osvd(
    tissue: np.ndarray, aif: np.ndarray, step_s: float, budget: float, floor: float = 0.01
) -> tuple[np.ndarray, np.ndarray]:
    """The straightforward per-pixel numpy oSVD (Wu et al. 2003): for each pixel, drop
    singular-value levels one at a time, least regularised first, until the
    residue's oscillation index is within ``budget / L``, then blend with the
    last failing level as the vectorised code does. CBF and Tmax (argmax, no
    interpolation) per column of ``tissue`` (N, P). The speed reference."""
    from pipelines.perfusion.deconvolution import aif_matrix

    matrix = aif_matrix(aif, step_s, circulant=True)
    u, s, vt = np.linalg.svd(matrix)
    length = len(s)
    rel = s / s[0]
    levels = [
        k
        for k in range(1, length + 1)
        if rel[k - 1] >= floor and (k == length or rel[k] < rel[k - 1] * (1 - 1e-6))
    ]
    bound = budget / length
    cbf = np.zeros(tissue.shape[1])
    tmax = np.zeros(tissue.shape[1])
    for p in range(tissue.shape[1]):
        c = np.zeros(length)
        c[: tissue.shape[0]] = tissue[:, p]
        z = u.T @ c / s
        failed = None
        for k in reversed(levels):
            r = vt[:k].T @ z[:k]
            oscillation = np.abs(np.diff(r, 2)).sum() / (length * max(r.max(), 1e-12))
            if oscillation <= bound or k == levels[0]:
                break
            failed = (r, oscillation)
        if failed is not None and oscillation <= bound:
            # Blend with the first failing level so the index meets the bound.
            w = np.clip((bound - oscillation) / max(failed[1] - oscillation, 1e-12), 0, 1)
            r = r + w * (failed[0] - r)
        cbf[p] = r.max()
        tmax[p] = int(np.argmax(r)) * step_s
    return cbf, tmax


# --- the benchmark --------------------------------------------------------------


def mean_sd(errors: list[dict[str, float]]) -> dict[str, tuple[float, float]]:
    """Mean and SD over seeds of each figure."""
    return {
        k: (float(np.mean([e[k] for e in errors])), float(np.std([e[k] for e in errors])))
        for k in errors[0]
    }


def format_cell(stats: dict[str, tuple[float, float]], key: str, pct: bool = False) -> str:
    m, sd = stats[key]
    return f"{100 * m:.1f} ± {100 * sd:.1f}" if pct else f"{m:.2f} ± {sd:.2f}"


# Held-out seeds: the tests use 1-11 and the oSVD bound was chosen on 100-102.
SEEDS = (200, 201, 202)
METHODS = (
    ("sSVD 20% (reference)", {"method": "ssvd", "svd_threshold": 0.2}),
    ("sSVD 15% (reference)", {"method": "ssvd", "svd_threshold": 0.15}),
    ("cSVD 10% (default below 2 frames/s)", {"method": "csvd"}),
    ("oSVD (default from 2 frames/s)", {"method": "osvd"}),
    ("oSVD, Tmax by plain argmax", {"method": "osvd", "tmax": "argmax"}),
    ("Tikhonov-GCV", {"method": "tikhonov"}),
)


def region_errors(result: object, synthetic: SyntheticRun) -> dict[str, float]:
    """Map errors over region interiors, region-level rank correlation and delay spread."""
    from scipy.stats import spearmanr

    from pipelines.base import ParametricMapOutput

    maps = {o.key: o for o in result.outputs if isinstance(o, ParametricMapOutput)}  # type: ignore[attr-defined]
    dro = synthetic.dro
    inside = dro.interior & maps["cbf"].valid
    out: dict[str, float] = {"coverage": float(inside.sum() / dro.interior.sum())}
    shapes = np.array([r["shape"] for r in dro.regions])
    labels = dro.labels[inside]
    for key in ("mtt", "tmax"):
        err = np.abs(maps[key].values[inside] - dro.truth[key][inside])
        out[key] = float(err.mean())
        for shape in ("exponential", "box"):
            out[f"{key}_{shape[:3]}"] = float(err[shapes[labels] == shape].mean())
    for key in ("cbf", "cbv"):
        est, ref = maps[key].values[inside], dro.truth[key][inside]
        scale = np.median(ref / est)
        out[key] = float(np.mean(np.abs(est * scale - ref) / ref))
    means = {
        k: np.array([maps[k].values[inside][labels == i].mean() for i in range(len(dro.regions))])
        for k in ("cbf", "mtt")
    }
    truth_cbf = np.array([r["cbf"] for r in dro.regions], float)
    truth_mtt = np.array([r["mtt"] for r in dro.regions], float)
    out["rho_cbf"] = float(spearmanr(means["cbf"], truth_cbf)[0])
    out["rho_mtt"] = float(spearmanr(means["mtt"], truth_mtt)[0])
    groups: dict[tuple[object, ...], list[float]] = {}
    for i, r in enumerate(dro.regions):
        groups.setdefault((r["cbf"], r["mtt"], r["shape"]), []).append(float(means["cbf"][i]))
    out["delay_spread"] = float(np.mean([np.ptp(v) / np.mean(v) for v in groups.values()]))
    return out


def accuracy(seeds: tuple[int, ...] = SEEDS) -> tuple[str, dict[str, dict[str, float]]]:
    from pipelines.base import PipelineContext, get

    pipeline = get("dsa_perfusion")
    rows = []
    summary: dict[str, dict[str, float]] = {}
    for fps in (4.0, 1.0):
        # The delay spread of noisy region means is partly the noise of those means
        # (a range over four of them); the same runs without noise give the
        # systematic part.
        clean = [dsa_run(seed, fps=fps, snr=None) for seed in seeds]
        systematic = {
            name: float(
                np.mean(
                    [
                        region_errors(pipeline(s.run, PipelineContext(options=options)), s)[
                            "delay_spread"
                        ]
                        for s in clean
                    ]
                )
            )
            for name, options in METHODS
        }
        for snr in (20.0, 50.0):
            runs = [dsa_run(seed, fps=fps, snr=snr) for seed in seeds]
            for name, options in METHODS:
                errs = [
                    region_errors(pipeline(s.run, PipelineContext(options=options)), s)
                    for s in runs
                ]
                stats = mean_sd(errs)
                summary[f"{fps:g}/{snr:g}/{name}"] = {k: v[0] for k, v in stats.items()}
                cell = partial(format_cell, stats)

                rows.append(
                    f"| {fps:g} | {snr:g} | {name} | {cell('mtt')} | {cell('tmax')} "
                    f"({stats['tmax_exp'][0]:.2f} / {stats['tmax_box'][0]:.2f}) | "
                    f"{cell('cbf', True)} | {cell('cbv', True)} | {cell('rho_cbf')} | "
                    f"{cell('rho_mtt')} | {cell('delay_spread', True)} | "
                    f"{100 * systematic[name]:.1f} |"
                )
    header = (
        "| fps | SNR | method | MTT MAE (s) | Tmax MAE (s) (exp / box) | CBF rel. err (%) | "
        "CBV rel. err (%) | ρ CBF | ρ MTT | CBF spread over 0–3 s delays (%) | "
        "same, without noise (%) |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|"
    )
    return header + "\n" + "\n".join(rows), summary


# The phantom's perfusion object (training.phantoms.dsa): a whole cerebral DSA run
# (projected vessels, skull, veins, devices, quantum noise) whose capillary blush
# is a DRO of Voronoi regions with known CBF, MTT, delay and residue shape.
PHANTOM_SEEDS = (210, 211, 212)
PHANTOM_METHODS = (
    ("sSVD 20% (reference)", {"method": "ssvd", "svd_threshold": 0.2}),
    ("cSVD 10% (default below 2 frames/s)", {"method": "csvd"}),
    ("oSVD (default from 2 frames/s)", {"method": "osvd"}),
    ("Tikhonov-GCV", {"method": "tikhonov"}),
)


def phantom_errors(result: object, phantom: object) -> dict[str, float]:
    """Errors of the node's maps against the phantom DRO's truth, over the pixels
    that see a single region (``dro_interior``) and that the node kept (brain, not
    large vessels): MAE of MTT and Tmax, relative CBF/CBV error after one global
    scale, and Spearman correlation of region medians with the region truth."""
    from scipy.stats import spearmanr

    from pipelines.base import ParametricMapOutput

    maps = {o.key: o for o in result.outputs if isinstance(o, ParametricMapOutput)}  # type: ignore[attr-defined]
    truth = phantom.truth  # type: ignore[attr-defined]
    labels = phantom.region_labels  # type: ignore[attr-defined]
    interior = truth["dro_interior"] & np.isfinite(truth["cbf"])
    inside = interior & maps["cbf"].valid
    out: dict[str, float] = {"coverage": float(inside.sum() / max(interior.sum(), 1))}
    for key in ("mtt", "tmax"):
        out[key] = float(np.mean(np.abs(maps[key].values[inside] - truth[key][inside])))
    for key in ("cbf", "cbv"):
        # A projection integrates along the ray: the projected truth is the
        # region's value times the perfused brain path length.
        est, ref = maps[key].values[inside], (truth[key] * truth["tissue_path_mm"])[inside]
        ok = est > 0
        scale = np.median(ref[ok] / est[ok])
        out[key] = float(np.mean(np.abs(est * scale - ref) / ref))
    present = [r for r in phantom.regions if (inside & (labels == r.label)).sum() >= 20]  # type: ignore[attr-defined]
    projected_cbf = truth["cbf"] * truth["tissue_path_mm"]
    for key, reference in (("cbf", projected_cbf), ("mtt", truth["mtt"]), ("tmax", truth["tmax"])):
        medians = [np.median(maps[key].values[inside & (labels == r.label)]) for r in present]
        truths = [np.median(reference[inside & (labels == r.label)]) for r in present]
        out[f"rho_{key}"] = float(spearmanr(medians, truths)[0])
    out["regions"] = float(len(present))
    return out


def phantom_accuracy(
    seeds: tuple[int, ...] = PHANTOM_SEEDS, size: int = 512, duration_s: float = 20.0
) -> str:
    from pipelines.base import PipelineContext, get
    from training.phantoms import dsa

    pipeline = get("dsa_perfusion")
    rows = []
    for fps in (4.0, 1.0):
        for snr in (20.0, 50.0):
            runs = [
                dsa.generate(
                    seed,
                    size=size,
                    frames=int(duration_s * fps),
                    fps=fps,
                    snr=snr,
                    snr_reference="tissue",
                )
                for seed in seeds
            ]
            for name, options in PHANTOM_METHODS:
                errs = [
                    phantom_errors(
                        pipeline(p.to_run(subtract=True), PipelineContext(options=options)), p
                    )
                    for p in runs
                ]
                stats = mean_sd(errs)
                cell = partial(format_cell, stats)

                rows.append(
                    f"| {fps:g} | {snr:g} | {name} | {cell('mtt')} | {cell('tmax')} | "
                    f"{cell('cbf', True)} | {cell('cbv', True)} | {cell('rho_cbf')} | "
                    f"{cell('rho_mtt')} | {cell('rho_tmax')} | {100 * stats['coverage'][0]:.0f} |"
                )
    header = (
        "| fps | SNR | method | MTT MAE (s) | Tmax MAE (s) | CBF rel. err (%) | CBV rel. err (%) "
        "| ρ CBF | ρ MTT | ρ Tmax | coverage (%) |\n|---|---|---|---|---|---|---|---|---|---|---|"
    )
    return header + "\n" + "\n".join(rows)


def ica_comparison(seeds: tuple[int, ...] = PHANTOM_SEEDS, size: int = 512) -> str:
    """The ICA mask (classical rule, and every dsa_perfusion package in ``models/``) with and
    without keeping the largest connected component, on the phantom (projected
    ICA with its siphon, a catheter, veins crossing it), 4 frames/s, SNR 30: the
    mask against the generator's ICA truth, and the maps it leads to."""
    from pathlib import Path

    from pipelines.base import PipelineContext, get
    from training.phantoms import dsa

    pipeline = get("dsa_perfusion")
    phantoms = [
        dsa.generate(seed, size=size, frames=80, fps=4.0, snr=30.0, snr_reference="tissue")
        for seed in seeds
    ]
    runs = [p.to_run(subtract=True) for p in phantoms]
    from bench.generalization import methods_for

    sources = [("classical", None)] + [
        (f"U-Net ({Path(m.package).name})", m.package)
        for m in methods_for("dsa_perfusion", {})
        if m.package
    ]
    rows = []
    for label, model in sources:
        for keep in (True, False):
            dice, purity, mtt, tmax, cbf = [], [], [], [], []
            for p, run in zip(phantoms, runs, strict=True):
                truth = p.truth["ica"] > 0
                ctx = PipelineContext(options={"keep_largest_ica": keep}, model_package=model)
                result = pipeline(run, ctx)
                mask = _ica_mask(run, model, keep)  # the mask itself is not an output
                dice.append(2 * (mask & truth).sum() / (mask.sum() + truth.sum()))
                purity.append((mask & truth).sum() / max(mask.sum(), 1))
                errs = phantom_errors(result, p)
                mtt.append(errs["mtt"])
                tmax.append(errs["tmax"])
                cbf.append(errs["cbf"])
            rows.append(
                f"| {label} | {'yes' if keep else 'no'} | {np.mean(dice):.3f} ± "
                f"{np.std(dice):.3f} | {np.mean(purity):.3f} | {np.mean(mtt):.2f} | "
                f"{np.mean(tmax):.2f} | {100 * np.mean(cbf):.1f} |"
            )
    return (
        "| ICA | keep largest component | ICA Dice vs truth | ICA precision | MTT MAE (s) | "
        "Tmax MAE (s) | CBF rel. err (%) |\n|---|---|---|---|---|---|---|\n" + "\n".join(rows)
    )


def _ica_mask(run: Run, model: str | None, keep: bool) -> np.ndarray:
    """The ICA mask the pipeline would use (its own ``locate_ica``), before the AIF's
    first-pass selection."""
    import torch

    from pipelines.base import minip
    from pipelines.perfusion.aif import contrast_signal, noise_sigma
    from pipelines.perfusion.ica import IcaSettings
    from pipelines.perfusion.pipeline import locate_ica

    signal = contrast_signal(run.pixels, run.meta)
    ica, _ = locate_ica(
        minip(run.pixels),
        signal,
        np.asarray(run.meta.frame_times_s),
        noise_sigma(signal),
        model,
        "auto",
        IcaSettings(keep_largest=keep),
        torch.device("cpu"),
        spacing_mm=run.meta.pixel_spacing_mm,
    )
    return ica.mask


def speed(size: int = 1024, frames: int = 40, subset: int = 2000) -> str:
    """Deconvolution of size x size x frames curves, against the per-pixel numpy
    oSVD on a subset, extrapolated linearly to all pixels."""
    import time

    import torch

    from pipelines.base import PipelineContext, get
    from pipelines.perfusion.deconvolution import Settings, deconvolve

    dro = make_dro(300, fps=2.0, duration_s=frames / 2.0, snr=30.0, tile=8, margin=0)
    pool = dro.tissue.reshape(len(dro.times_s), -1)
    index = np.random.default_rng(0).integers(0, pool.shape[1], size * size)
    curves = np.ascontiguousarray(pool[:, index])
    step = 0.5
    rows = []
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    reference_osvd(curves[:, :subset], dro.aif, step, Settings().oscillation_budget)
    per_pixel = (time.perf_counter() - start) / subset
    reference_total = per_pixel * size * size
    for method in ("ssvd", "csvd", "osvd", "tikhonov"):
        start, cpu = time.perf_counter(), time.process_time()
        deconvolve(curves, dro.aif, step, Settings(method=method))
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        ratio = f"{reference_total / elapsed:.0f}x" if method == "osvd" else "–"
        rows.append(f"| {method} | {elapsed:.2f} | {cpu:.2f} | {ratio} |")
    table = (
        f"Deconvolution of {size}×{size} pixels × {frames} time points (block-circulant L = "
        f"{2 * frames}), torch {torch.__version__} on the CPU with {torch.get_num_threads()} "
        f"threads; load average before the run {load_before:.1f} on {os.cpu_count()} cores "
        "(the machine is shared, so wall times are inflated; CPU seconds are the sum over "
        "threads).\n\n| method | wall s | CPU s | speed-up (wall) vs per-pixel numpy oSVD |\n"
        "|---|---|---|---|\n"
        + "\n".join(rows)
        + f"\n\nReference: the straightforward per-pixel numpy oSVD (`reference_osvd`), timed on "
        f"{subset} pixels ({per_pixel * 1e3:.3f} ms/pixel) and extrapolated linearly to "
        f"{size * size} pixels: {reference_total:.0f} s (estimated, not run in full)."
    )
    height = size - 56
    big = (
        dsa_run(301, fps=2.0, snr=30.0, duration_s=frames / 2.0, tile=height // 8, margin=0)
        if size >= 256
        else None
    )
    if big is not None:
        h, w = big.run.pixels.shape[1:]
        start, cpu = time.perf_counter(), time.process_time()
        get("dsa_perfusion")(big.run, PipelineContext())
        whole, cpu = time.perf_counter() - start, time.process_time() - cpu
        table += (
            f"\n\nWhole pipeline (timing, ICA, AIF, masks, smoothing, oSVD, maps, six "
            f"renderings) on one synthetic run of {h}×{w} × {frames} frames: {whole:.1f} s "
            f"wall, {cpu:.1f} s CPU (load average {os.getloadavg()[0]:.1f})."
        )
    return table


def main() -> None:
    import torch

    from bench.report import write_section

    acc, _ = accuracy()
    phantom = phantom_accuracy()
    lcc = ica_comparison()
    perf = speed()
    body = (
        "Digital reference object (`bench.perfusion.make_dro`, embedded in a synthetic "
        "subtracted DSA run by `dsa_run`): 72 regions = CBF {0.01, 0.015, 0.02}/s × MTT "
        "{2, 4, 6} s × delay {0, 1, 2, 3} s × residue {exponential, box}, gamma-variate AIF "
        "(arrival 1.5 s + sub-frame jitter, peak 1.8 s later), 20 s runs, noise SD = median "
        "tissue peak / SNR. The whole pipeline runs on each (classical ICA, AIF, masks, "
        "smoothing σ = 1 mm = 2 px, deconvolution); errors over region interiors, "
        f"mean ± SD over held-out seeds {', '.join(map(str, SEEDS))}. CBF/CBV errors after "
        "one global scale; ρ = Spearman correlation of region means with the truth; "
        "Tmax truth = the delay. Tmax is estimated as the time the residue first reaches its "
        "peak (`tmax=onset`, the half-peak crossing of its rising edge); the plain argmax row "
        "shows why: a regularised box residue is a plateau whose argmax lands MTT / 2 late "
        "(Tmax per residue shape in brackets).\n\n"
        "Goals: MTT and Tmax MAE ≤ 0.5 s, CBF error ≤ 10 %, CBF spread over 0–3 s delays ≤ 2 %.\n\n"
        + acc
        + "\n\n### The phantom's perfusion object\n\n"
        '`training.phantoms.dsa.generate(seed, size=512, fps=…, snr=…, snr_reference="tissue")`: '
        "a whole cerebral DSA run (projected arterial and venous trees, skull, a contrast-filled "
        "catheter, scatter, quantum noise) whose capillary blush is a DRO of Voronoi regions with "
        "known CBF, MTT, delay and residue (exponential, box, gamma), 20 s, subtracted. Errors "
        "over the pixels that see one region (`dro_interior`) and that the node kept (brain, "
        "not large vessels; 'coverage' = their share). DSA integrates along the ray, so CBF and "
        "CBV are compared with the projected truth (region value × perfused brain path length, "
        "after one global scale); ρ = Spearman correlation of region medians with the "
        "(projected) truth. Held-out seeds "
        f"{', '.join(map(str, PHANTOM_SEEDS))}.\n\n"
        + phantom
        + "\n\n### ICA: classical rule vs U-Net, and keeping the largest connected component"
        f"\n\nPhantom seeds {', '.join(map(str, PHANTOM_SEEDS))} (4 frames/s, SNR 30), ICA truth "
        "from the generator; a row per dsa_perfusion package in models/ (its shipping gate, "
        "on family B, is in its package.json and docs/training.md). The paper found that "
        "keeping the largest component both helps and hurts.\n\n"
        + lcc
        + "\n\n### Speed\n\n"
        + perf
        + f"\n\n(torch threads: {torch.get_num_threads()})"
    )
    write_section("perfusion", "Perfusion DSA (dsa_perfusion)", body)
    print(body)


if __name__ == "__main__":
    main()
