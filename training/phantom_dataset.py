"""Datasets straight from the phantom generators, in the layout build-dataset writes.

``python -m training quick`` trains on these. They have the manifest, case files
and manifest hash of a dataset built from DICOM, so the engine, ``package`` and
the shipping gate treat both alike; they skip writing and re-reading DICOM and
carry labels a SEG on the canvas cannot (a coronary label per frame). Each run
is the generator's ``to_run()``, the run as the node decodes the phantom's
DICOM, and the masks are its truth.

Family A (``training.phantoms``) trains; family B (``training.phantoms.family_b``)
builds evaluation datasets only: its cases carry family B's ManufacturerModelName
and the engine and the CLI refuse them for training like any family B data.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import multiprocessing
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.base import Run
from training import versions
from training.dataset import (
    FORMAT,
    Case,
    DatasetError,
    _counts,
    _meta_dict,
    _reuse,
    canonical_json,
    save_npz,
    sha256_file,
    write_manifest,
)
from training.gate import FAMILY_A_MODEL_NAME, FAMILY_B_MODEL_NAME

FAMILIES = {
    "A": ("training.phantoms", FAMILY_A_MODEL_NAME),
    "B": ("training.phantoms.family_b", FAMILY_B_MODEL_NAME),
}
GEOMETRY = {"dsa": "canvas", "coronary": "frames", "rotational": "volume"}
# Rotational truth labels of the generators: 1 vessel, 2 bone, 3 soft tissue (0 air).
VOLUME_LABELS = {"vessel": 1, "bone": 2, "soft_tissue": 3}


@dataclass(frozen=True)
class PhantomSpec:
    """Which generator, at what size, which seeds in which split, which truth as labels."""

    kind: str  # dsa | coronary | rotational
    size: int | None  # None: the generator's default (drawn from its priors when randomised)
    frames: int | None
    roles: tuple[str, ...]
    splits: Mapping[str, Sequence[int]] = field(default_factory=dict)
    family: str = "A"
    randomise: bool = False  # family A's domain randomisation (training.phantoms.priors)

    def key(self) -> dict[str, Any]:
        d = asdict(self)
        d["splits"] = {k: list(v) for k, v in self.splits.items()}
        d["roles"] = list(self.roles)
        return d


def generator(family: str, kind: str) -> Any:
    """The generator module of ``kind`` in ``family``, with the reason when there is none."""
    if family not in FAMILIES:
        raise DatasetError(f"phantom family {family!r}: known {', '.join(FAMILIES)}")
    if kind not in GEOMETRY:
        raise DatasetError(f"phantom kind {kind!r}: known {', '.join(GEOMETRY)}")
    name = f"{FAMILIES[family][0]}.{kind}"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        raise DatasetError(f"phantom family {family} has no {kind} generator ({exc})") from None


def phantom_masks(kind: str, truth: Mapping[str, np.ndarray], roles: Sequence[str]) -> dict:
    """Role -> bool mask from a phantom's truth."""
    out = {}
    for role in roles:
        if kind == "rotational" and "labels" in truth and role in VOLUME_LABELS:
            out[role] = np.asarray(truth["labels"]) == VOLUME_LABELS[role]
        elif role in truth:
            out[role] = np.asarray(truth[role], bool)
        else:
            raise DatasetError(f"{kind} phantom truth has no {role!r} (has {sorted(truth)})")
    return out


def case_from_run(
    case_id: str,
    run: Run,
    masks: Mapping[str, np.ndarray],
    geometry: str | None,
    split: str = "train",
    kind: str = "full",
    model_name: str = "",
) -> Case:
    """An in-memory dataset case of a run and its masks (benchmarks and tests train on
    these without writing a dataset folder)."""
    return Case(
        id=case_id,
        patient=case_id,
        split=split,
        kind=kind,
        geometry=geometry,
        pixels=np.asarray(run.pixels, np.float32),
        masks={k: np.asarray(v, bool) for k, v in masks.items()},
        frame_times_s=run.meta.frame_times_s,
        meta={**_meta_dict(run.meta), "manufacturer_model_name": model_name},
    )


def _options(gen: Any, size: int | None, frames: int | None, randomise: bool) -> dict:
    """Generator keywords: family B draws its own frame counts and timing, and only
    family A has domain randomisation."""
    accepted = inspect.signature(gen.generate).parameters
    kw: dict[str, Any] = {} if size is None else {"size": size}
    if frames is not None and "frames" in accepted:
        kw["frames"] = frames
    if randomise:
        if "randomise" not in accepted:
            raise DatasetError(f"{gen.__name__} has no domain randomisation")
        kw["randomise"] = True
    return kw


def phantom_case(
    kind: str,
    seed: int,
    size: int | None,
    frames: int | None,
    roles: Sequence[str],
    split: str = "train",
    family: str = "A",
    randomise: bool = False,
) -> Case:
    """One generated phantom as an in-memory case (what the dataset builder writes)."""
    gen = generator(family, kind)
    phantom = gen.generate(seed, **_options(gen, size, frames, randomise))
    return case_from_run(
        f"{family.lower()}-{kind}-{seed:06d}",
        phantom.to_run(),
        phantom_masks(kind, phantom.truth, roles),
        GEOMETRY[kind],
        split,
        model_name=FAMILIES[family][1],
    )


def _write_case(spec: PhantomSpec, folder: Path, job: tuple[str, int]) -> dict[str, Any]:
    """Generate one seed of ``spec`` into ``folder``; its manifest entry."""
    split, seed = job
    case = phantom_case(
        spec.kind, seed, spec.size, spec.frames, spec.roles, split, spec.family, spec.randomise
    )
    arrays = {"pixels": case.pixels}
    if case.frame_times_s is not None:
        arrays["frame_times_s"] = np.asarray(case.frame_times_s, np.float64)
    arrays.update({f"mask_{r}": m for r, m in case.masks.items()})
    path = folder / f"{case.id}.npz"
    save_npz(path, arrays)
    return {
        "id": case.id,
        "patient": f"PH{spec.family}{spec.kind.upper()}{seed:06d}",
        "split": split,
        "kind": "full",
        "geometry": case.geometry,
        "roles": sorted(case.masks),
        "shape": list(case.pixels.shape),
        "synthetic": True,
        "seed": seed,
        "meta": case.meta,
        "instances": [],
        "annotations": [],
        "file": f"cases/{case.id}.npz",
        "sha256": sha256_file(path),
        "notes": [],
    }


def build_phantom_dataset(
    out: str | Path,
    spec: PhantomSpec,
    name: str,
    version: str = "1",
    progress: Callable[[str], None] = print,
    force: bool = False,
    workers: int = 1,
) -> dict[str, Any]:
    """Generate, label and write; returns the manifest. A folder already built from the
    same spec is reused as it is (long runs resume on the same dataset hash); one that
    holds other content is never rewritten unless ``force`` (``training.versions``).
    ``workers`` > 1 generates that many seeds at a time in separate processes: the
    same files and manifest as one at a time (each case depends on its seed alone)."""
    target = Path(out)
    root = target
    # Fails early when the family lacks the kind or the options.
    used = _options(generator(spec.family, spec.kind), spec.size, spec.frames, spec.randomise)
    build_key = hashlib.sha256(
        canonical_json({"phantoms": spec.key(), "name": name, "version": version})
    ).hexdigest()
    cached = _reuse(root, build_key)
    if cached is not None:
        progress(f"phantom dataset {root} is up to date (build key {build_key[:12]})")
        return cached
    root = versions.staging(target.resolve())
    (root / "cases").mkdir(parents=True, exist_ok=True)
    jobs: list[tuple[str, int]] = []
    seen: set[int] = set()
    for split, seeds in spec.splits.items():
        for seed in seeds:
            if seed in seen:
                raise DatasetError(f"seed {seed} is in more than one split")
            seen.add(seed)
            jobs.append((split, seed))
    cases = []
    make = partial(_write_case, spec, root / "cases")
    # Each case is one generator call from its seed alone, so a pool writes the same
    # files as one at a time; spawn, because the caller may hold torch's threads.
    pool = (
        ProcessPoolExecutor(
            min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn")
        )
        if workers > 1 and len(jobs) > 1
        else None
    )
    with pool or contextlib.nullcontext():
        for record in pool.map(make, jobs) if pool else map(make, jobs):
            cases.append(record)
            progress(
                f"{spec.kind} seed {record['seed']} -> {record['split']} {tuple(record['shape'])}"
            )
    cases.sort(key=lambda c: c["id"])
    seeds_text = ", ".join(
        f"{k} {min(v)}-{max(v)} ({len(v)})" for k, v in spec.splits.items() if len(v)
    )
    manifest = {
        "format": FORMAT,
        "name": name,
        "version": version,
        "source": (
            f"{FAMILIES[spec.family][0]}.{spec.kind} (family {spec.family}"
            + (", randomised" if spec.randomise else "")
            + f"), size {used.get('size', 'drawn per run')}"
            + (f", {spec.frames} frames" if "frames" in used else "")
            + f"; seeds {seeds_text}"
        ),
        "deidentification": "not applicable: synthetic phantoms, no patient data",
        "split": {"unit": "seed", **{k: list(v) for k, v in spec.splits.items()}},
        "phantoms": spec.key(),
        "cases": cases,
        "counts": _counts(cases),
        "problems": [],
    }
    digest = write_manifest(root, manifest)
    (root / "build.json").write_text(
        canonical_json({"build_key": build_key, "manifest_sha256": digest}).decode()
    )
    try:
        versions.commit(target.resolve(), root, manifest, digest, force, progress)
    except versions.VersionError as exc:
        raise DatasetError(str(exc)) from None
    progress(f"phantom dataset {target}: {len(cases)} cases, sha256 {digest[:16]}")
    return manifest
