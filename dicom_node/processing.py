"""Run one pipeline on one decoded run and encode its outputs: shared by the job
worker processes (``dicom_node.sandbox``) and the offline ``dicom-node process``."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

import pipelines
from dicom_node.encode import encode_result
from dicom_node.encode.common import EncodeContext, PackageIdentity, PriorResult
from dicom_node.runs import LoadedRun
from pipelines.base import PipelineContext, PipelineResult

log = logging.getLogger(__name__)


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run_pipeline(
    loaded: LoadedRun,
    pipeline_name: str,
    models: Mapping[str, Path | str],
    device: str,
    on_stage: Callable[[str], None] = lambda _stage: None,
    options: Mapping[str, Any] | None = None,
    prior_results: Sequence[Path | str] = (),
) -> tuple[list[Dataset], list[str]]:
    """``on_stage`` hears "computing", then "encoding" (a crash report names the stage).

    What determines the content (the package when a model made the result, the
    ``options``, the device) goes into the result UIDs; ``prior_results`` are the
    files earlier runs of this pipeline on this run delivered, so a result whose
    content changed names the series it supersedes."""
    pipeline = pipelines.get(pipeline_name)
    package = models.get(pipeline_name)
    resolved = resolve_device(device)
    ctx = PipelineContext(
        device=resolved,
        model_package=str(package) if package else None,
        options=dict(options or {}),
    )
    on_stage("computing")
    result = pipeline(loaded.run, ctx)
    on_stage("encoding")
    encode_ctx = EncodeContext(
        sources=loaded.headers,
        pipeline=pipeline_name,
        package=package_identity(package) if package and _model_used(result) else None,
        options=ctx.options,
        device=resolved,
        prior=read_prior_results(prior_results),
    )
    datasets = encode_result(result, loaded.run, encode_ctx)
    return datasets, list(result.notes)


def _model_used(result: PipelineResult) -> bool:
    return any(
        getattr(getattr(o, "algorithm", None), "family", "") == "model" for o in result.outputs
    )


def package_identity(path: Path | str) -> PackageIdentity:
    """Name, version and weights hash of a model package (checked as the pipeline
    checks it when it loads the package)."""
    from pipelines.models.package import load_package

    package = load_package(path)
    return PackageIdentity(
        package.name, package.version, str(package.meta.get("weights_sha256", ""))
    )


def read_prior_results(paths: Sequence[Path | str]) -> list[PriorResult]:
    """Headers of earlier result files; one that is gone or unreadable is skipped."""
    prior = []
    for path in paths:
        try:
            header = dcmread(path, stop_before_pixels=True)
            prior.append(PriorResult.from_header(header))
        except (OSError, InvalidDicomError, AttributeError, ValueError) as exc:
            log.warning("earlier result %s not read: %s", path, exc)
    return prior


def write_dataset(ds: Dataset, directory: Path) -> Path:
    """Write atomically and durably as ``<SOPInstanceUID>.dcm``."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{ds.SOPInstanceUID}.dcm"
    tmp = directory / f".{uuid.uuid4().hex}.part"
    ds.save_as(tmp, enforce_file_format=True)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    return final
