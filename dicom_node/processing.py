"""Run one pipeline on one decoded run and encode its outputs: shared by the job
workers and the offline ``dicom-node process`` command."""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

from pydicom.dataset import Dataset

import pipelines
from dicom_node.encode import encode_result
from dicom_node.encode.common import EncodeContext
from dicom_node.runs import LoadedRun
from dicom_node.settings import Settings
from pipelines.base import PipelineContext

log = logging.getLogger(__name__)


def device_for(settings: Settings) -> str:
    if settings.device != "auto":
        return settings.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run_pipeline(
    loaded: LoadedRun, pipeline_name: str, settings: Settings
) -> tuple[list[Dataset], list[str]]:
    pipeline = pipelines.get(pipeline_name)
    package = settings.models.get(pipeline_name)
    ctx = PipelineContext(
        device=device_for(settings), model_package=str(package) if package else None
    )
    result = pipeline(loaded.run, ctx)
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
