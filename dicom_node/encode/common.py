"""What every emitted object shares: identity copied from the source, node equipment,
deterministic UIDs, and series bookkeeping.

UIDs are derived from the source SOP Instance UIDs, the pipeline and the output
key, so that a re-run after a crash (or two pipelines delivering the same MinIP
canvas) yields the same UIDs and the destination stores each object once.
"""

from __future__ import annotations

import copy
import hashlib
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

import highdicom as hd
from pydicom.dataset import Dataset

from dicom_node import __version__
from pipelines.base import Code

MANUFACTURER = "angio-dicom-node"
MODEL_NAME = "angio-dicom-node"
# Series descriptions of everything the node emits start with this, so that
# PACS rules (and our Orthanc plugin) recognise results and never loop them.
SERIES_PREFIX = "AI "
RESULT_DISCLAIMER = "AI output - research use, not for diagnosis unless validated"

# Module-level attributes copied from the source so results join the study.
PATIENT_KEYWORDS = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "PatientWeight",
    "PatientSize",
)
# Type 2 in the Patient and General Study modules: present in every result, empty
# when unknown; often absent from de-identified sources.
TYPE2_IDENTITY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
)
STUDY_KEYWORDS = (
    "StudyInstanceUID",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyDescription",
)


def deterministic_uid(*parts: str) -> str:
    """A 2.25 UID that depends only on ``parts`` (a name-based UUID, PS3.5 B.2).

    pydicom's ``generate_uid(prefix=None, entropy_srcs=...)`` ignores the
    entropy and returns a random UID, so the hash is taken here.
    """
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    value = bytearray(digest[:16])
    value[6] = (value[6] & 0x0F) | 0x50  # version 5 (name-based, SHA)
    value[8] = (value[8] & 0x3F) | 0x80  # RFC 4122 variant
    return f"2.25.{int.from_bytes(value, 'big')}"


@dataclass
class EncodeContext:
    """The source run's headers (no pixel data) and the node's identity.

    ``sources`` are in run order: one multi-frame instance, or the slices of a
    volume, or the instances of a multi-instance series.
    """

    sources: Sequence[Dataset]
    pipeline: str
    now: datetime = field(default_factory=datetime.now)
    # Set by the encoder once the MinIP canvas exists (2D runs).
    canvas: Dataset | None = None

    def __post_init__(self) -> None:
        # Tolerant when reading: highdicom reads these from its source images, and
        # de-identified data often lacks them. Copies, so the caller's are untouched.
        completed = []
        for src in self.sources:
            missing = [kw for kw in TYPE2_IDENTITY if kw not in src]
            if missing:
                src = copy.deepcopy(src)
                for kw in missing:
                    setattr(src, kw, "")
            completed.append(src)
        self.sources = completed

    @property
    def first(self) -> Dataset:
        return self.sources[0]

    def uid(self, *parts: str) -> str:
        """Deterministic UID for this run and ``parts`` (a pipeline-independent
        key such as ``("canvas",)`` yields the same UID from every pipeline)."""
        src = [str(ds.SOPInstanceUID) for ds in self.sources]
        return deterministic_uid("angio-dicom-node", *src, *parts)

    def series_uid(self, key: str) -> str:
        return self.uid("series", self.pipeline, key)

    def series_number(self, key: str) -> int:
        """A stable series number in 9000..9899 (away from modality numbers)."""
        return 9000 + zlib.crc32(f"{self.pipeline}/{key}".encode()) % 900

    def patient_study_kwargs(self) -> dict[str, object]:
        """Keyword arguments highdicom constructors take for identity."""
        src = self.first
        return {
            "study_instance_uid": src.StudyInstanceUID,
            "manufacturer": MANUFACTURER,
            "manufacturer_model_name": MODEL_NAME,
            "software_versions": __version__,
            "device_serial_number": "0",
        }


def copy_identity(target: Dataset, source: Dataset) -> None:
    """Patient and study identity, so the result lands in the source's study."""
    for kw in PATIENT_KEYWORDS + STUDY_KEYWORDS:
        if kw in source:
            setattr(target, kw, source[kw].value)
        elif kw in TYPE2_IDENTITY:
            setattr(target, kw, "")  # type 2: present, possibly empty


def set_laterality(target: Dataset, source: Dataset) -> None:
    """Body Part Examined and Laterality as the source has them.

    Laterality is type 2C (paired body parts); dciodvfy wants it present, and
    empty only when unknown, so an unknown side is written empty and a known
    unpaired part (head) leaves it out.
    """
    part = str(source.get("BodyPartExamined", "") or "")
    if part:
        target.BodyPartExamined = part
    if source.get("Laterality"):
        target.Laterality = source.Laterality
    elif part.upper() not in UNPAIRED:
        target.Laterality = ""


UNPAIRED = {
    "HEAD",
    "BRAIN",
    "SKULL",
    "NECK",
    "HEART",
    "CHEST",
    "ABDOMEN",
    "PELVIS",
    "SPINE",
    "CSPINE",
    "TSPINE",
    "LSPINE",
    "AORTA",
    "WHOLEBODY",
    "CORONARY",
    "THORAX",
}


def set_equipment(
    target: Dataset,
    description: str,
    series_uid: str,
    series_number: int,
    modality: str,
    now: datetime,
) -> None:
    target.Manufacturer = MANUFACTURER
    target.ManufacturerModelName = MODEL_NAME
    target.SoftwareVersions = __version__
    target.SeriesInstanceUID = series_uid
    target.SeriesNumber = series_number
    target.SeriesDescription = (SERIES_PREFIX + description)[:64]
    target.Modality = modality
    target.SeriesDate = now.strftime("%Y%m%d")
    target.SeriesTime = now.strftime("%H%M%S")
    target.ContentDate = now.strftime("%Y%m%d")
    target.ContentTime = now.strftime("%H%M%S")
    target.InstanceCreationDate = now.strftime("%Y%m%d")
    target.InstanceCreationTime = now.strftime("%H%M%S")


def source_image_reference(
    source: Dataset,
    purpose: tuple[str, str, str] | None = None,
    frames: Sequence[int] | None = None,
) -> Dataset:
    """An item of Source Image Sequence / Referenced Image Sequence.

    ``purpose`` is a (value, scheme, meaning) code for Purpose of Reference.
    """
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if frames:
        item.ReferencedFrameNumber = list(frames) if len(frames) > 1 else frames[0]
    if purpose is not None:
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = purpose
        item.PurposeOfReferenceCodeSequence = [code]
    return item


# DCM 121322 "Source image for image processing operation"
PURPOSE_SOURCE_FOR_PROCESSING = ("121322", "DCM", "Source image for image processing operation")
# CID 7203 Image Derivation
DERIVATION_MINIP = ("113079", "DCM", "Minimum intensity projection")
DERIVATION_MIP = ("113078", "DCM", "Maximum intensity projection")


def coded(code: Code) -> hd.sr.CodedConcept:
    """A pipeline ``Code`` as the coded concept highdicom takes."""
    return hd.sr.CodedConcept(code.value, code.scheme, code.meaning)
