"""``python -m training package``: evaluate through the node, pass the gate, write the package.

Every figure a package carries is what the node's pipeline emits with the
package (staged from the weights first): the test split of the training
dataset (the training family, not the headline) and every evaluation dataset
whole, data the model was not trained on (``training.gate``), with the
classical path on the same cases. Without an evaluation dataset, or when the
model does not beat the classical path by ``min_margin`` on each of them,
nothing is written.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pipelines.models.package import describe_evaluation, load_package, write_package
from training.config import to_toml
from training.dataset import DatasetError, load_dataset, manifest_hash
from training.engine import evaluate_node, load_model_file, stage_package
from training.gate import (
    REQUIRED_MARGIN,
    EvaluationPart,
    GateError,
    check_held_out,
    evaluation_record,
    smallest_margin,
)
from training.model_card import model_card
from training.tasks import Task, TaskError

NO_EVALUATION = (
    "refusing to write a package without an evaluation on data the model was not trained "
    "on: give --eval-dataset, a dataset of phantom generator family B "
    "(`python -m training quick TASK --eval-family B` builds one) or of site data none of "
    "whose cases were in training"
)


def _summary(manifest: Mapping[str, Any], sha: str) -> dict[str, Any]:
    used = [c for c in manifest["cases"] if c["split"] in ("train", "val")]
    out = {
        "dataset": manifest["name"],
        "dataset_version": manifest["version"],
        "manifest_sha256": sha,
        "source": manifest["source"],
        "counts": manifest["counts"],
        "synthetic": any(c.get("synthetic") for c in manifest["cases"]),
        "training_cases": len([c for c in used if c["split"] == "train"]),
        "deidentification": manifest["deidentification"],
    }
    if "phantoms" in manifest:
        out["phantoms"] = manifest["phantoms"]
    return out


def _check_geometry(task: Task, cases: list[Any], where: str) -> None:
    for case in cases:
        if case.kind == "full" and case.geometry != task.geometry:
            raise TaskError(
                f"{where}: case {case.id} has {case.geometry} labels; {task.name} is scored "
                f"on {task.geometry} labels"
            )


def package_model(
    model_path: str | Path,
    dataset: str | Path,
    eval_datasets: Sequence[str | Path],
    out: str | Path,
    name: str,
    version: str,
    min_margin: float = REQUIRED_MARGIN,
    device: str = "cpu",
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
) -> Path:
    """Evaluate ``model_path`` through the node and write the package at ``out``.

    Every evaluation dataset is scored on its own and the model must beat the
    classical path by ``min_margin`` on each (a model that wins at one volume size
    or contrast level and loses at another does not ship)."""
    if not eval_datasets:
        raise GateError(NO_EVALUATION)
    task, model, data = load_model_file(model_path, "cpu")
    manifest, cases = load_dataset(dataset)
    sha = manifest_hash(Path(dataset))
    if data.get("dataset_sha256") and data["dataset_sha256"] != sha:
        raise DatasetError(
            f"{model_path} was trained on dataset {data['dataset_sha256'][:16]}, "
            f"not on {dataset} ({sha[:16]})"
        )
    evals: list[tuple[dict[str, Any], list[Any], str, dict[str, Any]]] = []
    for root in eval_datasets:
        eval_manifest, eval_cases = load_dataset(root)
        eval_sha = manifest_hash(Path(root))
        if any(eval_sha == other[2] for other in evals):
            raise GateError(f"evaluation dataset {root} is given twice (manifest {eval_sha[:16]})")
        held_out = check_held_out(dataset, manifest, sha, root, eval_manifest, eval_sha)
        _check_geometry(task, eval_cases, str(root))
        evals.append((eval_manifest, eval_cases, eval_sha, held_out))
    test = [c for c in cases if c.split == "test"]
    _check_geometry(task, test, str(dataset))
    config = dict(data["model_config"])
    log(
        f"evaluating {task.name} through the {task.pipeline} pipeline on "
        + ", ".join(str(r) for r in eval_datasets)
    )
    with stage_package(task, model, config) as staged:
        metrics: dict[str, Any] = evaluate_node(task, test, staged, device)
        ood_model = [evaluate_node(task, e[1], staged, device) for e in evals]
    ood_classical = [evaluate_node(task, e[1], None, device) for e in evals]
    metrics["evaluated_with"] = (
        f"the node's {task.pipeline} pipeline with this package (binary masks as it emits them)"
    )
    evaluation = evaluation_record(
        metric=task.gate_metric,
        parts=[
            EvaluationPart(
                dataset={
                    "name": eval_manifest["name"],
                    "version": eval_manifest["version"],
                    "manifest_sha256": eval_sha,
                    "source": eval_manifest["source"],
                },
                held_out=held_out,
                model_cases=m["cases"],
                classical_cases=c["cases"],
            )
            for (eval_manifest, _, eval_sha, held_out), m, c in zip(
                evals, ood_model, ood_classical, strict=True
            )
        ],
        pipeline=task.pipeline,
        min_margin=min_margin,
    )
    log(describe_evaluation(evaluation))
    margin, where = smallest_margin(evaluation)
    if margin < min_margin:
        raise GateError(
            f"{task.name} model does not beat the classical path by {min_margin} on data it "
            f"was not trained on (difference {margin:+.3f} on {where}); package not written "
            "(--min-margin sets another bar, and package.json records it)"
        )
    metrics["out_of_distribution"] = [
        {
            "dataset": eval_manifest["name"],
            "manifest_sha256": eval_sha,
            "model": m,
            "classical": c,
        }
        for (eval_manifest, _, eval_sha, _), m, c in zip(
            evals, ood_model, ood_classical, strict=True
        )
    ]
    summary = _summary(manifest, sha)
    command = data.get("command") or "unknown"
    record = data.get("record") or {}
    card = model_card(
        task=task,
        name=name,
        version=version,
        parameters=sum(p.numel() for p in model.parameters()),
        metrics=metrics,
        data=summary,
        training=data.get("config", {}),
        training_command=command,
        dataset_sha256=sha,
        evaluation=evaluation,
        record=record,
    )
    path = write_package(
        Path(out),
        model=model,
        name=name,
        version=version,
        architecture_name=task.architecture,
        config=config,
        pipeline=task.pipeline,
        metrics=metrics,
        data=summary,
        model_card=card,
        training_command=command,
        dataset_manifest_hash=sha,
        evaluation=evaluation,
    )
    # How the weights were trained (training.record), beside the files the node reads.
    (path / "training_record.json").write_text(
        json.dumps(
            record or {"command": command, "note": "trained before runs were recorded"},
            indent=2,
            sort_keys=True,
        )
        + "\n"
    )
    if record.get("config"):
        (path / "training_config.toml").write_text(
            to_toml(
                task.name,
                record["config"]["train"],
                record["config"]["model"],
                f"The resolved training configuration of {name} {version} "
                "(--config-file for python -m training train or quick)",
            )
        )
    pkg = load_package(path, pipeline=task.pipeline)
    pkg.load_model("cpu")  # the weights load back (weights_only, hash checked)
    if not test:
        log("warning: the training dataset has no test split; only the evaluation is recorded")
    return path
