"""The shipping gate: what a model may train on, and what a package must show.

Two rules keep accuracy honest (evaluate where you did not tune):

- **Family B is evaluation-only.** Phantom generator family B
  (``training.phantoms.family_b``) exists to measure generalisation; every file
  it writes carries ``ManufacturerModelName = FAMILY_B_MODEL_NAME``. A dataset
  holding any such case is refused for training (:func:`refuse_evaluation_only`),
  and so is a dataset whose cases' model names are unknown (built before they
  were recorded: rebuild it).
- **No package without an out-of-distribution evaluation.** ``python -m
  training package`` writes a package only with an evaluation on data the
  model was not trained on (:func:`check_held_out`): a generator family none of
  whose cases were in the training dataset, or site data (not synthetic) that
  shares no case, instance or patient pseudonym with it. package.json records
  that evaluation next to the classical path's figure on the same cases
  (:func:`evaluation_record`), and the node logs both when it loads the package.

A generator family is named by the ManufacturerModelName of its synthetic
cases (family A writes :data:`FAMILY_A_MODEL_NAME`); every non-synthetic case
counts as site data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from scipy import stats

from training.phantoms.family_b import FAMILY_B_MODEL_NAME

# What training.phantoms.dicom_common writes into every family A file (tested).
FAMILY_A_MODEL_NAME = "Angio Phantom"
SITE = "site"
# House rule: a model ships only if it beats the classical path by this much on
# the held-out family (Dice / IoU points).
REQUIRED_MARGIN = 0.03

__all__ = [
    "FAMILY_A_MODEL_NAME",
    "FAMILY_B_MODEL_NAME",
    "REQUIRED_MARGIN",
    "EvaluationPart",
    "GateError",
    "case_model_names",
    "check_held_out",
    "evaluation_record",
    "refuse_evaluation_only",
    "smallest_margin",
    "summary",
]


class GateError(Exception):
    """Data a model may not train on, or a package that may not be written, with the reason."""


# ---------------------------------------------------------------------------
# Which family a case comes from


def _dicom_model_name(folder: Path, instances: Sequence[str]) -> str | None:
    """ManufacturerModelName of the run's own instances in an exported case folder (the
    folder also holds SEGs and canvases, which name their own device)."""
    for uid in instances:
        path = folder / f"{uid}.dcm"
        if path.is_file():
            ds = dcmread(path, stop_before_pixels=True, specific_tags=["ManufacturerModelName"])
            return str(ds.get("ManufacturerModelName", "") or "")
    return None


def case_model_names(root: str | Path, manifest: Mapping[str, Any]) -> dict[str, str | None]:
    """Case id -> ManufacturerModelName of its source DICOM: from the manifest, else from
    the de-identified copy in ``dicom/<id>/`` (``--export-dicom``); None when unknown."""
    out: dict[str, str | None] = {}
    for case in manifest["cases"]:
        name = case.get("meta", {}).get("manufacturer_model_name")
        if name is None:
            folder = Path(root) / "dicom" / case["id"]
            name = _dicom_model_name(folder, case.get("instances", [])) if folder.is_dir() else None
        out[case["id"]] = None if name is None else str(name)
    return out


def _family(case: Mapping[str, Any], model_name: str | None) -> str:
    return str(model_name) if case.get("synthetic") else SITE


def refuse_evaluation_only(root: str | Path, manifest: Mapping[str, Any]) -> None:
    """Raise GateError when a dataset may not be used for training (family B, or unknown)."""
    names = case_model_names(root, manifest)
    family_b = sorted(i for i, n in names.items() if n == FAMILY_B_MODEL_NAME)
    if family_b:
        raise GateError(
            f"dataset {root} holds {len(family_b)} case(s) from phantom generator family B "
            f"(ManufacturerModelName {FAMILY_B_MODEL_NAME!r}, e.g. case {family_b[0]}): "
            "family B is for evaluation only and is never used for training or tuning; "
            "train on family A (training.phantoms) or site data and give family B to "
            "`python -m training package --eval-dataset`"
        )
    unknown = sorted(i for i, n in names.items() if n is None)
    if unknown:
        raise GateError(
            f"dataset {root}: the generator family of {len(unknown)} case(s) is not recorded "
            f"(e.g. case {unknown[0]}; built before ManufacturerModelName was kept, and no "
            "DICOM export to read it from); rebuild the dataset with build-dataset"
        )


def _training_identity(manifest: Mapping[str, Any]) -> tuple[set[str], set[str], set[str]]:
    cases = manifest["cases"]
    return (
        {c["sha256"] for c in cases},
        {u for c in cases for u in c.get("instances", [])},
        {c["patient"] for c in cases},
    )


def check_held_out(
    train_root: str | Path,
    train_manifest: Mapping[str, Any],
    train_sha256: str,
    eval_root: str | Path,
    eval_manifest: Mapping[str, Any],
    eval_sha256: str,
) -> dict[str, Any]:
    """Check that the evaluation dataset is data the model was not trained on; returns
    what package.json records about it (families, and those of training)."""
    if eval_sha256 == train_sha256:
        raise GateError(
            f"the evaluation dataset {eval_root} is the training dataset (manifest "
            f"{eval_sha256[:16]}); give a generator family or site data the model never saw"
        )
    train_names = case_model_names(train_root, train_manifest)
    eval_names = case_model_names(eval_root, eval_manifest)
    trained = {
        _family(c, train_names[c["id"]])
        for c in train_manifest["cases"]
        if c["split"] in ("train", "val")
    }
    trained_synthetic = {
        train_names[c["id"]] for c in train_manifest["cases"] if c.get("synthetic")
    }
    shas, instances, patients = _training_identity(train_manifest)
    families: set[str] = set()
    for case in eval_manifest["cases"]:
        name = eval_names[case["id"]]
        if case.get("synthetic"):
            if name is None:
                raise GateError(
                    f"evaluation case {case['id']}: generator family not recorded; "
                    "rebuild the evaluation dataset"
                )
            if name in trained_synthetic:
                raise GateError(
                    f"evaluation case {case['id']} comes from generator family {name!r}, "
                    "which the training dataset contains: evaluate on a family the model "
                    f"was not trained on (family B: {FAMILY_B_MODEL_NAME!r})"
                )
            families.add(str(name))
            continue
        overlap = (
            case["sha256"] in shas
            or bool(set(case.get("instances", [])) & instances)
            or case["patient"] in patients
        )
        if overlap:
            raise GateError(
                f"evaluation case {case['id']} is site data that also appears in the "
                "training dataset (same case file, SOP instance or patient pseudonym)"
            )
        families.add(SITE)
    if not any(c.get("kind") == "full" for c in eval_manifest["cases"]):
        raise GateError(f"the evaluation dataset {eval_root} has no fully annotated case")
    return {"families": sorted(families), "trained_on": sorted(str(f) for f in trained)}


# ---------------------------------------------------------------------------
# What package.json records


def summary(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample SD and the t-based 95 % confidence interval of the mean."""
    v = np.asarray([x for x in values if np.isfinite(x)], np.float64)
    n = int(v.size)
    if n == 0:
        return {"mean": float("nan"), "sd": float("nan"), "ci95": [float("nan")] * 2, "n": 0}
    mean = float(v.mean())
    sd = float(v.std(ddof=1)) if n > 1 else 0.0
    half = float(stats.t.ppf(0.975, n - 1) * sd / np.sqrt(n)) if n > 1 else float("nan")
    return {"mean": mean, "sd": sd, "ci95": [mean - half, mean + half], "n": n}


@dataclass(frozen=True)
class EvaluationPart:
    """One evaluation dataset's per-case figures: the model's and the classical path's."""

    dataset: Mapping[str, Any]  # name, version, manifest_sha256, source
    held_out: Mapping[str, Any]  # what check_held_out returned for it
    model_cases: Mapping[str, Mapping[str, float]]
    classical_cases: Mapping[str, Mapping[str, float]]


def _paired(metric: str, part: EvaluationPart) -> tuple[list[str], list[float], list[float]]:
    ids = sorted(set(part.model_cases) & set(part.classical_cases))
    if not ids:
        raise GateError(
            f"no case of evaluation dataset {part.dataset['name']} has both a model and a "
            "classical result"
        )
    model = [float(part.model_cases[i].get(metric, np.nan)) for i in ids]
    classical = [float(part.classical_cases[i].get(metric, np.nan)) for i in ids]
    return ids, model, classical


def _figures(metric: str, parts: Sequence[EvaluationPart]) -> dict[str, Any]:
    """n, refusals and the three summaries over the paired cases of ``parts``."""
    model: list[float] = []
    classical: list[float] = []
    failed = {"model": 0, "classical": 0}
    for part in parts:
        part_ids, m, c = _paired(metric, part)
        model += m
        classical += c
        for who, cases in (("model", part.model_cases), ("classical", part.classical_cases)):
            failed[who] += sum(int(cases[i].get("failed", 0)) for i in part_ids)
    diff = [m - c for m, c in zip(model, classical, strict=True)]
    return {
        "n": len(diff),
        # Runs the pipeline refused (scored as empty output, as the node would answer).
        "failed": failed,
        "model": summary(model),
        "classical": summary(classical),
        "difference": summary(diff),
    }


def evaluation_record(
    *,
    metric: str,
    parts: Sequence[EvaluationPart],
    pipeline: str,
    min_margin: float,
) -> dict[str, Any]:
    """The evaluation package.json carries: the dataset(s), n, the headline metric of the
    model and of the classical path on the same cases, and their paired difference.

    With several evaluation datasets (sizes, contrast levels, sites) the figures are
    pooled over all their cases and ``by_dataset`` holds each one's own record; the
    model beats the classical path only if it does so on every one of them, and
    ``decided_by`` names the dataset where its margin is smallest (a model that wins
    on the pooled mean but loses on one kind of data does not ship).
    """
    if not parts:
        raise GateError("no evaluation dataset")
    records = []
    for part in parts:
        figures = _figures(metric, [part])
        records.append(
            {
                "dataset": part.dataset["name"],
                "dataset_version": part.dataset["version"],
                "manifest_sha256": part.dataset["manifest_sha256"],
                "source": part.dataset["source"],
                "families": list(part.held_out["families"]),
                "trained_on": list(part.held_out["trained_on"]),
                **figures,
                "beats_classical_by_required_margin": bool(
                    figures["difference"]["mean"] >= REQUIRED_MARGIN
                ),
            }
        )
    common = {
        "metric": metric,
        "required_margin": REQUIRED_MARGIN,
        "min_margin_used": min_margin,
        "evaluated_with": (
            f"The node's {pipeline} pipeline, with a package staged from these weights and "
            "without a package (its classical path), on the same cases"
        ),
    }
    if len(records) == 1:
        return {**records[0], **common}
    worst = min(records, key=lambda r: r["difference"]["mean"])
    return {
        "dataset": " + ".join(r["dataset"] for r in records),
        "dataset_version": " + ".join(r["dataset_version"] for r in records),
        "manifest_sha256": " + ".join(r["manifest_sha256"] for r in records),
        "source": "; ".join(r["source"] for r in records),
        "families": sorted({f for r in records for f in r["families"]}),
        "trained_on": sorted({f for r in records for f in r["trained_on"]}),
        **_figures(metric, parts),
        "beats_classical_by_required_margin": all(
            r["beats_classical_by_required_margin"] for r in records
        ),
        "decided_by": worst["dataset"],
        "by_dataset": records,
        **common,
    }


def smallest_margin(evaluation: Mapping[str, Any]) -> tuple[float, str]:
    """The model's smallest mean margin over the classical path, and where (the gate)."""
    records = evaluation.get("by_dataset") or [evaluation]
    worst = min(records, key=lambda r: r["difference"]["mean"])
    return float(worst["difference"]["mean"]), str(worst["dataset"])
