"""Run one pipeline on one decoded run and encode its outputs: shared by the job
worker processes (``dicom_node.sandbox``) and the offline ``dicom-node process``."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

from pydicom.dataset import Dataset

import pipelines
from dicom_node.encode import encode_result
from dicom_node.encode.common import EncodeContext
from dicom_node.runs import LoadedRun
from pipelines.base import PipelineContext

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
) -> tuple[list[Dataset], list[str]]:
    """``on_stage`` hears "computing", then "encoding" (a crash report names the stage)."""
    pipeline = pipelines.get(pipeline_name)
    package = models.get(pipeline_name)
    ctx = PipelineContext(
        device=resolve_device(device), model_package=str(package) if package else None
    )
    on_stage("computing")
    result = pipeline(loaded.run, ctx)
    on_stage("encoding")
    datasets = encode_result(
        result, loaded.run, EncodeContext(sources=loaded.headers, pipeline=pipeline_name)
    )
    return datasets, list(result.notes)


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
