"""Self-describing model packages: a folder the training package writes and the node reads.

Layout of a package folder::

    package.json   name, version, architecture, architecture config, pipeline,
                   training command, dataset manifest hash, created
    weights.pt     a plain state_dict, loaded with torch.load(weights_only=True)
    metrics.json   held-out metrics (per case and aggregated)
    data.json      training-data summary (counts, sources, synthetic or not)
    MODEL_CARD.md  intended use and limits

Architectures register a builder by name (explicit registry, no name scanning).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipelines.base import AlgorithmInfo, PipelineError
from pipelines.models.manifest import FORMAT_VERSION, read_manifest, verified_weights
from pipelines.models.runtime import prepare_model

log = logging.getLogger(__name__)


_ARCHITECTURES: dict[str, Callable[[Mapping[str, Any]], nn.Module]] = {}


def architecture(
    name: str,
) -> Callable[[Callable[[Mapping[str, Any]], nn.Module]], Callable[[Mapping[str, Any]], nn.Module]]:
    """Register ``builder(config) -> nn.Module`` under ``name``."""

    def deco(
        builder: Callable[[Mapping[str, Any]], nn.Module],
    ) -> Callable[[Mapping[str, Any]], nn.Module]:
        if name in _ARCHITECTURES:
            raise ValueError(f"architecture {name!r} registered twice")
        _ARCHITECTURES[name] = builder
        return builder

    return deco


def build(name: str, config: Mapping[str, Any]) -> nn.Module:
    import pipelines.models  # noqa: F401  (registers the built-in architectures)

    try:
        builder = _ARCHITECTURES[name]
    except KeyError:
        raise PipelineError(
            f"unknown architecture {name!r}; known: {', '.join(sorted(_ARCHITECTURES))}"
        ) from None
    return builder(config)


def architectures() -> list[str]:
    """Names of the registered architectures."""
    import pipelines.models  # noqa: F401

    return sorted(_ARCHITECTURES)


@dataclass(frozen=True)
class ModelPackage:
    path: Path
    name: str
    version: str
    architecture: str
    config: Mapping[str, Any]
    pipeline: str
    metrics: Mapping[str, Any]
    data: Mapping[str, Any]
    meta: Mapping[str, Any]

    def algorithm(self, algorithm_name: str, algorithm_version: str) -> AlgorithmInfo:
        return AlgorithmInfo(
            name=algorithm_name,
            version=algorithm_version,
            family="model",
            model_package=self.name,
            model_version=self.version,
        )

    def load_model(self, device: str | torch.device = "cpu") -> nn.Module:
        """The model with its weights, built once per process and package version, and
        prepared for the device (``pipelines.models.runtime.prepare_model``).

        Worker processes are long-lived, so a package stays loaded across jobs; the
        cache key includes the weights file's identity, so a package replaced on
        disk is loaded (and verified) again."""
        weights = self.path / "weights.pt"
        try:
            st = weights.stat()
        except OSError as exc:
            raise PipelineError(f"model package {self.path}: {exc}") from None
        return _cached_model(
            str(self.path.resolve()),
            str(self.meta.get("weights_sha256", "")),
            st.st_mtime_ns,
            st.st_size,
            str(device),
            self.architecture,
            json.dumps(self.config, sort_keys=True),
        )


@functools.lru_cache(maxsize=4)
def _cached_model(
    path: str,
    sha256: str,
    mtime_ns: int,
    size: int,
    device: str,
    architecture_name: str,
    config_json: str,
) -> nn.Module:
    """Build the architecture and load the weights safely (``weights_only=True``), after
    checking them against the ``weights_sha256`` the package declares."""
    root = Path(path)
    data = verified_weights(root, sha256)
    model = build(architecture_name, json.loads(config_json))
    state = torch.load(io.BytesIO(data), map_location=device, weights_only=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise PipelineError(
            f"model package {root}: weights do not fit architecture {architecture_name!r} "
            f"(missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]})"
        )
    log.info(
        "model package %s loaded on %s (weights SHA-256 %s verified)", root, device, sha256[:16]
    )
    return prepare_model(model, torch.device(device))


def load_package(path: str | Path, pipeline: str | None = None) -> ModelPackage:
    """Read and check a package folder; ``pipeline`` guards against a package
    configured for the wrong pipeline."""
    root = Path(path)
    meta, metrics, data = read_manifest(root, pipeline)
    _announce(
        str(root.resolve()),
        str(meta.get("weights_sha256", "")),
        json.dumps(meta.get("evaluation"), sort_keys=True),
        bool(meta.get("staged")),
    )
    return ModelPackage(
        path=root,
        name=str(meta["name"]),
        version=str(meta["version"]),
        architecture=str(meta["architecture"]),
        config=meta["config"],
        pipeline=str(meta["pipeline"]),
        metrics=metrics,
        data=data,
        meta=meta,
    )


def describe_evaluation(evaluation: Mapping[str, Any]) -> str:
    """A recorded evaluation in one line: the model's figure next to the classical path's."""

    def figure(s: Mapping[str, Any]) -> str:
        lo, hi = s["ci95"]
        return f"{s['mean']:.3f} ± {s['sd']:.3f} (95 % CI {lo:.3f} to {hi:.3f})"

    failed = evaluation.get("failed") or {}
    refused = ", ".join(f"{who} {k}" for who, k in failed.items() if k)
    return (
        f"{evaluation['metric']} on {'/'.join(evaluation['families'])} data "
        f"'{evaluation['dataset']}' it was not trained on (n={evaluation['n']}): "
        f"model {figure(evaluation['model'])}, classical path "
        f"{figure(evaluation['classical'])} on the same cases"
        + (f" (runs the pipeline refused, scored as empty: {refused})" if refused else "")
        + "".join(
            f"; {r['dataset']} (n={r['n']}): {r['model']['mean']:.3f} against "
            f"{r['classical']['mean']:.3f}"
            for r in evaluation.get("by_dataset") or ()
        )
    )


@functools.lru_cache(maxsize=256)
def _announce(root: str, weights_sha256: str, evaluation_json: str, staged: bool) -> None:
    """Log what a package showed before it shipped, once per package version and process
    (pipelines read the package for every job)."""
    evaluation = json.loads(evaluation_json)
    if staged:
        log.debug("model package %s: staged by training for evaluation, not for shipping", root)
    elif not evaluation:
        log.warning(
            "model package %s records no evaluation on data it was not trained on "
            "(written before the shipping gate, or not by python -m training package)",
            root,
        )
    elif evaluation.get("beats_classical_by_required_margin", True):
        log.info("model package %s: %s", root, describe_evaluation(evaluation))
    else:
        log.warning(
            "model package %s does not beat the classical path by the required %s: %s",
            root,
            evaluation.get("required_margin"),
            describe_evaluation(evaluation),
        )


def write_package(
    path: str | Path,
    *,
    model: nn.Module,
    name: str,
    version: str,
    architecture_name: str,
    config: Mapping[str, Any],
    pipeline: str,
    metrics: Mapping[str, Any],
    data: Mapping[str, Any],
    model_card: str,
    training_command: str,
    dataset_manifest_hash: str,
    evaluation: Mapping[str, Any] | None = None,
    staged: bool = False,
) -> Path:
    """Write a package folder; refuses to overwrite an existing version.

    ``evaluation`` goes into package.json: the headline metric on data the model
    was not trained on (generator family B or site data), model and classical path
    on the same cases; ``python -m training package`` refuses to write a package
    without one (the shipping gate) and :func:`load_package` logs it. ``staged``
    marks a package training writes only to run the node's pipeline on its current
    weights.
    """
    root = Path(path)
    if (root / "package.json").exists():
        raise FileExistsError(f"{root} already holds a model package; bump the version")
    root.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, root / "weights.pt")
    digest = hashlib.sha256((root / "weights.pt").read_bytes()).hexdigest()
    meta = {
        "format": FORMAT_VERSION,
        "name": name,
        "version": version,
        "architecture": architecture_name,
        "config": dict(config),
        "pipeline": pipeline,
        "parameters": sum(p.numel() for p in model.parameters()),
        "training_command": training_command,
        "dataset_manifest_sha256": dataset_manifest_hash,
        "weights_sha256": digest,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "evaluation": dict(evaluation) if evaluation is not None else None,
    }
    if staged:
        meta["staged"] = True
    (root / "package.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    (root / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    (root / "data.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    (root / "MODEL_CARD.md").write_text(model_card.rstrip() + "\n")
    return root
