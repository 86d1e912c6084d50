"""Run one pipeline on one decoded run and encode its outputs: shared by the job
worker processes (``dicom_node.sandbox``) and the offline ``dicom-node process``.

When a model package's output fails its quality checks (``pipelines.quality``:
verdict not ok) the classical path runs on the same run; its result is delivered
instead when its verdict is better, marked as a classical fallback (series
descriptions, the SR's reasons, the notes) with why. The verdict and measures of
what is delivered join the notes (the job record) and the log."""

from __future__ import annotations

import dataclasses
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
from pipelines.base import Pipeline, PipelineContext, PipelineError, PipelineResult, Run
from pipelines.quality import FALLBACK_SUFFIX, Verdict

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
    options = dict(ctx.options)
    if package and _model_used(result):
        result, marker = classical_fallback(pipeline, loaded.run, ctx, result)
        if marker:
            options["classical_fallback"] = marker  # a result of its own: its own UIDs
    on_stage("encoding")
    encode_ctx = EncodeContext(
        sources=loaded.headers,
        pipeline=pipeline_name,
        package=package_identity(package) if package and _model_used(result) else None,
        options=options,
        device=resolved,
        prior=read_prior_results(prior_results),
    )
    datasets = encode_result(result, loaded.run, encode_ctx)
    notes = list(result.notes)
    shift = loaded.run.meta.extra.get("mask_shift")
    if shift is not None:  # how the node subtracted a native run (dicom_node.runs)
        notes.insert(0, shift.note())
    left_out = loaded.run.meta.extra.get("left_out")
    if left_out:  # instances of the series that are not of its run (dicom_node.runs)
        notes.insert(0, left_out)
    if result.quality is not None:
        notes += [n for n in result.quality.notes() if n not in notes]
        log.info(
            "%s result %s (%s)",
            pipeline_name,
            result.quality.verdict.value,
            "; ".join(result.quality.reasons) or result.quality.summary(),
        )
    return datasets, notes


__all__ = ["FALLBACK_SUFFIX", "classical_fallback", "run_pipeline"]


def classical_fallback(
    pipeline: Pipeline, run: Run, ctx: PipelineContext, result: PipelineResult
) -> tuple[PipelineResult, str]:
    """The classical result instead of a model's whose verdict is not ok, when the
    classical verdict is better; else the model's, with a note. Returns the result
    and, for a fallback, what names it (package name, version, weights hash)."""
    quality = result.quality
    if quality is None or quality.verdict is Verdict.OK:
        return result, ""
    try:
        classical = pipeline(run, dataclasses.replace(ctx, model_package=None))
    except PipelineError as exc:  # the model's result stands, marked as it is
        result.notes.append(
            f"classical path checked as a fallback: {exc}; the model's result is kept"
        )
        return result, ""
    theirs = classical.quality
    if theirs is not None and theirs.verdict.rank >= quality.verdict.rank:
        result.notes.append(
            f"classical path checked as a fallback: {theirs.verdict.value}, no better; "
            "the model's result is kept"
        )
        return result, ""
    identity = package_identity(str(ctx.model_package))
    why = (
        f"model package {identity.name} {identity.version} output {quality.verdict.value} "
        f"({quality.reasons[0] if quality.reasons else 'no reason recorded'}): "
        "classical path used for this run"
    )
    log.warning("%s", why)
    return (
        PipelineResult(
            outputs=[_marked(o) for o in classical.outputs],
            notes=[why, *classical.notes],
            quality=theirs.with_fallback(why) if theirs is not None else None,
        ),
        f"{identity.name} {identity.version} {identity.weights_sha256[:16]}",
    )


def _marked(out: Any) -> Any:
    """An output whose series description says it is a classical fallback."""
    for name in ("description", "title"):
        text = getattr(out, name, "")
        if text and getattr(out, "key", "") != "minip":
            return dataclasses.replace(out, **{name: text + FALLBACK_SUFFIX})
    return out


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
