"""Fault injection for the quality tests: family A phantom runs (generator
``training.phantoms``, never family B) decoded by the node, then broken the way
acquisitions break: a collimated field, contrast in one frame only, patient
motion between mask and fill, a saturated detector.

Each fault acts on the decoded ``Run`` (what a pipeline sees), keeping the
quantum noise a real detector adds: frames made free of contrast get fresh
noise of the run's own level, never a copy of another frame.
"""

from __future__ import annotations

import dataclasses
import tempfile
from functools import cache
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from dicom_node.runs import LoadedRun, load_run
from pipelines.base import Run, Shutter
from training.phantoms import coronary, dsa


def _load(write, folder: Path) -> LoadedRun:  # type: ignore[no-untyped-def]
    paths = [p for p in write(folder) if p.suffix == ".dcm"]
    return load_run(paths)


@cache
def dsa_loaded(
    seed: int = 11, size: int = 256, frames: int = 15, motion_mm: float = 0.0
) -> LoadedRun:
    """A subtracted cerebral DSA phantom run as the node decodes it (with its headers)."""
    ph = dsa.generate(seed, size=size, frames=frames, fps=2.0, motion_mm=motion_mm)
    with tempfile.TemporaryDirectory() as tmp:
        return _load(ph.write, Path(tmp))


def dsa_run(seed: int = 11, size: int = 256, frames: int = 15, motion_mm: float = 0.0) -> Run:
    return dsa_loaded(seed, size, frames, motion_mm).run


@cache
def cine_run(seed: int = 3900, size: int = 256, frames: int = 30) -> Run:
    """A coronary cine phantom run as the node decodes it."""
    ph = coronary.generate(seed, size=size, frames=frames, fps=15.0)
    with tempfile.TemporaryDirectory() as tmp:
        return _load(ph.write, Path(tmp)).run


def noise_sd(frames: np.ndarray) -> float:
    """The run's noise SD from differences of neighbouring frames (robust: MAD)."""
    diff = np.diff(frames.astype(np.float64), axis=0)
    return float(1.4826 * np.median(np.abs(diff - np.median(diff))) / np.sqrt(2.0))


def contrast_in_one_frame(run: Run, seed: int = 0) -> Run:
    """Only the frame of peak opacity keeps its contrast; every other frame is the
    first (pre-contrast) frame's smooth background with fresh noise."""
    from scipy import ndimage as ndi

    x = run.pixels.astype(np.float32)
    peak = int(np.argmin(x.reshape(x.shape[0], -1).mean(axis=1)))
    sd = noise_sd(x)
    if run.meta.subtracted:
        background = np.full(x.shape[1:], float(np.median(x[0])), np.float32)
    else:
        # Static anatomy of an unsubtracted cine: iodine only darkens and the heart
        # moves the vessels, so a high percentile over time holds no vessel.
        background = ndi.gaussian_filter(np.percentile(x, 90, axis=0), 1.0) - sd
    rng = np.random.default_rng(seed)
    out = background[None] + rng.normal(0, sd, x.shape).astype(np.float32)
    out[peak] = x[peak]
    return dataclasses.replace(run, pixels=out.astype(np.float32))


def saturated(run: Run, share: float = 0.3) -> Run:
    """A detector saturated over the brightest ``share`` of the field: those pixels
    sit at full scale in every frame (a subtracted run: no signal, exactly flat)."""
    x = run.pixels.copy()
    if run.meta.subtracted:
        rows = int(round(x.shape[1] * share))
        x[:, :rows] = float(np.median(x[0]))
    else:
        level = float(np.quantile(np.median(x, axis=0), 1 - share))
        x = np.minimum(x, level)
    return dataclasses.replace(run, pixels=x)


def collimated(run: Run, keep: float = 0.7) -> Run:
    """Collimator blades around the central ``keep`` of each side: behind them a dim,
    noisy, contrast-free shadow (2 % transmission); the DICOM Shutter module says so."""
    x = run.pixels.copy()
    h, w = x.shape[1:]
    top, left = int(h * (1 - keep) / 2), int(w * (1 - keep) / 2)
    bottom, right = h - top - 1, w - left - 1
    outside = np.ones((h, w), bool)
    outside[top : bottom + 1, left : right + 1] = False
    rng = np.random.default_rng(1)
    if run.meta.subtracted:
        level = float(np.median(x[0]))
        sd = 5 * noise_sd(x)  # fewer photons: more noise in the subtraction
    else:
        level = 0.02 * float(np.median(x))
        sd = noise_sd(x)
    x[:, outside] = level + rng.normal(0, sd, (x.shape[0], int(outside.sum())))
    meta = dataclasses.replace(
        run.meta, shutter=Shutter(rectangle=(float(top), float(bottom), float(left), float(right)))
    )
    return Run(x.astype(np.float32), meta)


def read_quality(sr: Dataset) -> tuple[str, list[str], dict[str, float]]:
    """From an SR as the node writes it: the verdict's code value, the reasons, and
    the measures of the "Run quality" group by their meaning."""
    verdict, reasons, measures = "", [], {}
    groups = [
        item
        for container in sr.ContentSequence
        if container.get("ValueType") == "CONTAINER"
        for item in container.get("ContentSequence", [])
        if item.get("ValueType") == "CONTAINER"
    ]
    for group in groups:
        items = group.get("ContentSequence", [])
        titles = [str(i.get("TextValue", "")) for i in items if i.get("ValueType") == "TEXT"]
        if "Run quality" not in titles:
            continue
        for item in items:
            name = item.ConceptNameCodeSequence[0]
            if item.ValueType == "NUM":
                measures[str(name.CodeMeaning)] = float(item.MeasuredValueSequence[0].NumericValue)
            elif item.ValueType == "CODE" and name.CodeValue == "VERDICT":
                verdict = str(item.ConceptCodeSequence[0].CodeValue)
            elif item.ValueType == "TEXT" and name.CodeValue == "VERDICTREASON":
                reasons.append(str(item.TextValue))
    return verdict, reasons, measures
