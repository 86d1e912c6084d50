"""What every phantom file shares: identity, deterministic UIDs, encodings, truth files.

Identity is realistic in form and deterministic for (kind, seed): a fake
patient ``PHANTOM^DSA^0007`` with Patient ID ``PHDSA000007``, one study per
(kind, seed), so training can split by patient. UIDs are hashes of
(kind, seed, role, options) under pydicom's UID root, so two runs of the same
command produce identical files, and different options never collide.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_ROOT_UID,
    ExplicitVRLittleEndian,
    JPEGLosslessSV1,
    RLELossless,
    generate_uid,
)

from training.phantoms.errors import EncodingError

ENCODINGS = ("explicit", "rle", "jpeg-lossless")
SOFTWARE_VERSION = "training.phantoms 1.0"
MANUFACTURER = "SYNTHETIC"
INSTITUTION = "Phantom General Hospital"


@dataclass(frozen=True)
class Identity:
    patient_name: str
    patient_id: str
    birth_date: str
    sex: str
    study_uid: str
    study_date: str
    study_time: str
    accession: str
    study_id: str

    @property
    def content_datetime(self) -> dt.datetime:
        return dt.datetime.strptime(self.study_date + self.study_time, "%Y%m%d%H%M%S")


def uid(*parts: Any) -> str:
    """Deterministic UID from its parts (kind, seed, role, option hash...)."""
    return generate_uid(
        prefix=PYDICOM_ROOT_UID, entropy_srcs=["training.phantoms", *[str(p) for p in parts]]
    )


def options_key(options: dict[str, Any]) -> str:
    """Short stable hash of generation options, so differently generated series get different UIDs."""
    return hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()[
        :16
    ]


def identity(kind: str, seed: int) -> Identity:
    rng = np.random.default_rng([seed, 0x1D, sum(kind.encode())])
    study_day = dt.date(2024, 1, 1) + dt.timedelta(days=int(rng.integers(0, 366)))
    age = int(rng.integers(35, 86))
    birth = study_day - dt.timedelta(days=age * 365 + int(rng.integers(0, 365)))
    seconds = int(rng.integers(7 * 3600, 18 * 3600))
    tag = kind.upper()
    return Identity(
        patient_name=f"PHANTOM^{tag}^{seed:04d}",
        patient_id=f"PH{tag}{seed:06d}",
        birth_date=birth.strftime("%Y%m%d"),
        sex=str(rng.choice(["F", "M"])),
        study_uid=uid(kind, seed, "study"),
        study_date=study_day.strftime("%Y%m%d"),
        study_time=f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}",
        accession=f"A{tag[:3]}{seed:07d}",
        study_id=f"{seed % 100000:05d}",
    )


def base_dataset(
    sop_class_uid: str,
    sop_instance_uid: str,
    ident: Identity,
    modality: str,
    series_uid: str,
    series_number: int,
    series_description: str,
    body_part: str,
    study_description: str,
) -> Dataset:
    """SOP Common, Patient, General Study, General Series and General Equipment."""
    ds = Dataset()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationVersionName = "PHANTOMS_1_0"
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid
    ds.InstanceCreationDate = ident.study_date
    ds.InstanceCreationTime = ident.study_time
    ds.PatientName = ident.patient_name
    ds.PatientID = ident.patient_id
    ds.PatientBirthDate = ident.birth_date
    ds.PatientSex = ident.sex
    ds.StudyInstanceUID = ident.study_uid
    ds.StudyDate = ident.study_date
    ds.StudyTime = ident.study_time
    ds.ReferringPhysicianName = ""
    ds.StudyID = ident.study_id
    ds.AccessionNumber = ident.accession
    ds.StudyDescription = study_description
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description
    ds.SeriesDate = ident.study_date
    ds.SeriesTime = ident.study_time
    ds.BodyPartExamined = body_part
    ds.PatientPosition = "HFS"
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = "Angio Phantom"
    ds.SoftwareVersions = SOFTWARE_VERSION
    ds.DeviceSerialNumber = "PH-0001"
    ds.InstitutionName = INSTITUTION
    ds.StationName = "ANGIO1"
    return ds


def save(ds: Dataset, path: Path, encoding: str) -> Path:
    """Write ``ds`` in the requested transfer syntax (pixel data must be native on entry)."""
    if encoding not in ENCODINGS:
        raise EncodingError(f"encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if encoding == "explicit":
        ds.save_as(path, enforce_file_format=True)
    elif encoding == "rle":
        ds.compress(RLELossless, encoding_plugin="pylibjpeg", generate_instance_uid=False)
        ds.file_meta.TransferSyntaxUID = RLELossless
        ds.save_as(path, enforce_file_format=True)
    else:
        _jpeg_lossless(ds, path)
    return path


def _jpeg_lossless(ds: Dataset, path: Path) -> None:
    """JPEG Lossless SV1 through dcmtk's dcmcjpeg (pydicom has no JPEG Lossless encoder)."""
    exe = shutil.which("dcmcjpeg")
    if exe is None:
        raise EncodingError("jpeg-lossless needs dcmtk's dcmcjpeg on PATH (Debian package dcmtk)")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in.dcm"
        ds.save_as(src, enforce_file_format=True)
        proc = subprocess.run(
            [exe, "+e1", "+un", str(src), str(path)], capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise EncodingError(f"dcmcjpeg failed ({proc.returncode}): {proc.stderr.strip()}")
    if "DerivationDescription" not in ds:
        # dcmcjpeg notes the compression in Derivation Description, which some
        # IODs (Enhanced X-Ray 3D) do not define; lossless needs no such note.
        out = dcmread(path)
        if "DerivationDescription" in out:
            del out.DerivationDescription
            out.save_as(path, enforce_file_format=True)
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1


def save_truth(path: Path, arrays: dict[str, Any]) -> Path:
    """Truth arrays as compressed .npz (plain numpy, no pickles)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = {k: np.asarray(v) for k, v in arrays.items() if v is not None}
    for k, v in clean.items():
        if v.dtype == object:
            raise TypeError(f"truth array {k!r} has dtype object; would need pickling")
    np.savez_compressed(path, **clean)
    return path


def write_readme(directory: Path, text: str) -> Path:
    path = directory / "README.md"
    path.write_text(text)
    return path
