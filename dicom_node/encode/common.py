"""What every emitted object shares: identity copied from the source, node equipment,
UIDs derived from what determines the content, and series bookkeeping.

UIDs are derived, never random, from the source SOP Instance UIDs and from every
input that determines an object's content (:class:`Provenance`): the node's
software and encoding revision, the pipeline, its algorithms and their
versions, the model package's name, version and weights hash when a model made
the result, and the settings that change the output. A re-run with the same
inputs yields the same UIDs, so the destination stores each object once; a
re-run with anything different yields new UIDs and a new series, so a PACS that
keeps the first copy of an instance (Orthanc's default) cannot silently keep a
stale result. The new series names the one it supersedes
(:func:`mark_supersession`). Canvases depend on the source and the encoding
only, so every pipeline delivers the same canvas.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import highdicom as hd
from pydicom import config
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.valuerep import validate_value

from dicom_node import MANUFACTURER, __version__
from pipelines.base import AlgorithmInfo, Code
from pipelines.quality import Quality

MODEL_NAME = "angio-dicom-node"
# Series descriptions of everything the node emits start with this, so that
# PACS rules (and our Orthanc plugin) recognise results and never loop them.
SERIES_PREFIX = "AI "
RESULT_DISCLAIMER = "AI output - research use, not for diagnosis unless validated"
# Bumped whenever an encoder writes different content for the same inputs (attributes,
# references, value encoding), so that objects encoded differently get new UIDs even
# when the software version string did not change. 2: canvas Pixel Spacing, SEG and
# Parametric Map reference only the canvas series, SR as TID 1410 on the canvas.
# 3: the result's quality (verdict, reasons, measures) in Image Comments, under every
# rendering, and in the SR's "Run quality" group. 4: every result in the source's
# Specific Character Set. 5: an over-long Patient ID, Issuer, Accession Number or
# Study ID kept as the source has it (it was left out), impossible identity values
# (Patient's Sex "U", February 30th) left out (the result failed). 6: values a result
# cannot hold left out (several values or empty ones, control characters), and a
# de-identified source's Patient Identity Removed and De-identification Method carried.
ENCODING_REVISION = "6"

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
    # a de-identified source's results say so (PS3.15 E.1), as it does
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
)
# What a result says of a source flagged de-identified that does not say how (type 1C).
METHOD_NOT_STATED = "not stated by the source"
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


@dataclass(frozen=True)
class PackageIdentity:
    """The model package a result was made with: name, version and weights hash."""

    name: str
    version: str
    weights_sha256: str


@dataclass(frozen=True)
class Provenance:
    """Everything besides the source that determines a pipeline result's content."""

    pipeline: str
    algorithms: tuple[AlgorithmInfo, ...] = ()
    # Set when a model made the result (an algorithm of family "model").
    package: PackageIdentity | None = None
    # Pipeline options from the settings (``PipelineContext.options``).
    options: Mapping[str, Any] = field(default_factory=dict)
    # "cpu" or "cuda": floating-point results may differ between the two.
    device: str = "cpu"

    def key(self) -> str:
        """A short digest of the provenance (part of every result UID)."""
        record = {
            "software": [__version__, ENCODING_REVISION],
            "pipeline": self.pipeline,
            "algorithms": sorted(
                [a.name, a.version, a.family, a.model_package or "", a.model_version or ""]
                for a in self.algorithms
            ),
            "package": (
                [self.package.name, self.package.version, self.package.weights_sha256]
                if self.package is not None
                else None
            ),
            "options": self.options,
            "device": self.device,
        }
        text = json.dumps(record, sort_keys=True, default=str, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class PriorResult:
    """One object that an earlier run of the same pipeline on the same source delivered
    (read from its header), so that a new result can name what it supersedes."""

    sop_class_uid: str
    sop_instance_uid: str
    series_uid: str
    series_number: int
    series_description: str
    series_date: str = ""
    series_time: str = ""

    @classmethod
    def from_header(cls, ds: Dataset) -> PriorResult:
        return cls(
            str(ds.SOPClassUID),
            str(ds.SOPInstanceUID),
            str(ds.SeriesInstanceUID),
            int(ds.get("SeriesNumber", 0) or 0),
            str(ds.get("SeriesDescription", "") or ""),
            str(ds.get("SeriesDate", "") or ds.get("ContentDate", "") or ""),
            str(ds.get("SeriesTime", "") or ds.get("ContentTime", "") or ""),
        )


@dataclass(frozen=True)
class Superseded:
    """The series a new result replaces: its UID, description, when it was made, and
    its instances (for references)."""

    series_uid: str
    description: str
    made: str  # "YYYY-MM-DD HH:MM:SS" or ""
    instances: tuple[tuple[str, str], ...]  # (SOP Class UID, SOP Instance UID)


@dataclass
class EncodeContext:
    """The source run's headers (no pixel data), the node's identity, and the
    provenance of the result being encoded.

    ``sources`` are in run order: one multi-frame instance, or the slices of a
    volume, or the instances of a multi-instance series.
    """

    sources: Sequence[Dataset]
    pipeline: str
    now: datetime = field(default_factory=datetime.now)
    # Set by the encoder once the MinIP canvas exists (2D runs).
    canvas: Dataset | None = None
    # Set by the caller: the model package (when one is configured), options, device.
    package: PackageIdentity | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    # Set by ``encode_result``: the algorithms of the result being encoded.
    algorithms: tuple[AlgorithmInfo, ...] = ()
    # Objects earlier runs of this pipeline on this source delivered.
    prior: Sequence[PriorResult] = ()
    # Set by ``encode_result``: the result's quality (verdict, reasons, measures).
    quality: Quality | None = None

    def __post_init__(self) -> None:
        # Tolerant when reading: highdicom reads these from its source images, and
        # de-identified data often lacks them. Copies, so the caller's are untouched.
        # Of the Patient and Clinical Trial groups only the identity is kept: highdicom
        # copies every attribute of those modules a volume's slices hold into its SEG
        # and SR, where an empty type 1 one a sender wrote (a Sponsor Name, a Species
        # Description) made them invalid; a 2D run's results never carried them.
        completed = []
        for src in self.sources:
            missing = [kw for kw in TYPE2_IDENTITY if kw not in src]
            extra = [t for t in src.keys() if _not_identity(t)]
            method = _deidentification(src)
            if missing or extra or method is not None:
                src = copy.deepcopy(src)
                for kw in missing:
                    setattr(src, kw, "")
                for tag in extra:
                    del src[tag]
                if method is not None:
                    _set_deidentification(src, *method)
            completed.append(src)
        self.sources = completed

    @property
    def first(self) -> Dataset:
        return self.sources[0]

    def uid(self, *parts: str) -> str:
        """UID for this source run and ``parts`` alone (canvases: the same from every
        pipeline); pipeline results use :meth:`result_uid`."""
        src = [str(ds.SOPInstanceUID) for ds in self.sources]
        return deterministic_uid("angio-dicom-node", *src, *parts)

    def encoding_uid(self, *parts: str) -> str:
        """UID for what depends on the source and the node's encoding only (canvases)."""
        return self.uid(*parts, "encoding", __version__, ENCODING_REVISION)

    @property
    def provenance(self) -> Provenance:
        model_used = any(a.family == "model" for a in self.algorithms)
        return Provenance(
            pipeline=self.pipeline,
            algorithms=self.algorithms,
            package=self.package if model_used else None,
            options=dict(self.options),
            device="cuda" if self.device.startswith("cuda") else "cpu",
        )

    def result_uid(self, *parts: str) -> str:
        """UID of a pipeline result: source, provenance and ``parts``."""
        return self.uid(self.pipeline, self.provenance.key(), *parts)

    def series_uid(self, key: str) -> str:
        return self.result_uid("series", key)

    def series_number(self, key: str) -> int:
        """A stable series number in 9000..9899 (away from modality numbers); the same
        for every version of a result, whose series UIDs differ."""
        return 9000 + zlib.crc32(f"{self.pipeline}/{key}".encode()) % 900

    def superseded(self, key: str, sop_class_uid: str) -> Superseded | None:
        """The latest earlier series of output ``key`` whose content differed (another
        series UID for the same series number and SOP class), if any.

        When this very series was delivered before (a re-run, or a return to earlier
        settings), only what preceded its first delivery counts: the objects then come
        out exactly as they did, since a UID must never name two contents."""
        number, current = self.series_number(key), self.series_uid(key)
        slot = [
            p
            for p in self.prior
            if p.series_number == number and p.sop_class_uid == str(sop_class_uid)
        ]
        delivered = [(p.series_date, p.series_time) for p in slot if p.series_uid == current]
        older = [
            p
            for p in slot
            if p.series_uid != current
            and (not delivered or (p.series_date, p.series_time) < min(delivered))
        ]
        if not older:
            return None
        latest = max(older, key=lambda p: (p.series_date, p.series_time))
        same = [p for p in older if p.series_uid == latest.series_uid]
        return Superseded(
            latest.series_uid,
            latest.series_description,
            _when(latest.series_date, latest.series_time),
            tuple(sorted({(p.sop_class_uid, p.sop_instance_uid) for p in same})),
        )

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


_IDENTITY_TAGS = frozenset(tag_for_keyword(k) for k in PATIENT_KEYWORDS)
# Patient (0010) and Clinical Trial (0012) groups: only PATIENT_KEYWORDS reach a result.
_PATIENT_GROUPS = (0x0010, 0x0012)


def _deidentification(src: Dataset) -> tuple[str, list[Dataset]] | None:
    """How a source's De-identification Method and its code sequence must change for
    its results (None: as they are). Both go with Patient Identity Removed YES, and one
    of them is then required (PS3.3 C.7.1.1, type 1C): a source flagged YES without
    either says so in the text; one that is not flagged YES carries neither. Codes
    without a value, scheme or meaning are left out."""
    method = str(src.get("DeidentificationMethod", "") or "")
    given = src.get("DeidentificationMethodCodeSequence") or []
    codes = [item for item in given if _whole_code(item)]
    if str(src.get("PatientIdentityRemoved", "")) != "YES":
        method, codes = "", []
    elif not method and not codes:
        method = METHOD_NOT_STATED
    as_is = (
        method == str(src.get("DeidentificationMethod", "") or "")
        and ("DeidentificationMethod" in src) == bool(method)
        and len(codes) == len(given)
        and ("DeidentificationMethodCodeSequence" in src) == bool(codes)
    )
    return None if as_is else (method, codes)


def _whole_code(item: Dataset) -> bool:
    """A code item with a value, scheme and meaning its VRs allow (and a valid version)."""
    for keyword, vr in _CODE_VRS.items():
        value = item.get(keyword)
        if value is None and keyword == "CodingSchemeVersion":
            continue
        if not isinstance(value, str) or not value:
            return False
        try:
            validate_value(vr, value, config.RAISE)
        except ValueError:
            return False
    return True


_CODE_VRS = {
    "CodeValue": "SH",
    "CodingSchemeDesignator": "SH",
    "CodingSchemeVersion": "SH",
    "CodeMeaning": "LO",
}


def _set_deidentification(src: Dataset, method: str, codes: list[Dataset]) -> None:
    for keyword in ("DeidentificationMethod", "DeidentificationMethodCodeSequence"):
        if keyword in src:
            delattr(src, keyword)
    if method:
        src.DeidentificationMethod = method
    if codes:
        items = []
        for code in codes:
            item = Dataset()
            for k in ("CodeValue", "CodingSchemeDesignator", "CodingSchemeVersion", "CodeMeaning"):
                if code.get(k):
                    setattr(item, k, code.get(k))
            items.append(item)
        src.DeidentificationMethodCodeSequence = items


def _not_identity(tag: int) -> bool:
    group = tag >> 16
    return group in _PATIENT_GROUPS and tag not in _IDENTITY_TAGS and tag & 0xFFFF != 0


def _when(date: str, time: str) -> str:
    if len(date) != 8:
        return ""
    made = f"{date[:4]}-{date[4:6]}-{date[6:]}"
    if len(time) >= 6:
        made += f" {time[:2]}:{time[2:4]}:{time[4:6]}"
    return made


def series_description(description: str, superseded: Superseded | None) -> str:
    """``AI <description>``, naming the series it replaces when there is one."""
    note = "" if superseded is None else f" (replaces {superseded.made or 'earlier result'})"
    # Trailing markers such as " (classical fallback)" stay whole: the name is
    # shortened instead, so that the 64 characters of LO never cut a marker.
    base, markers = re.fullmatch(r"(.*?)((?: \([^()]*\))*)", description).groups()  # type: ignore[union-attr]
    room = 64 - len(SERIES_PREFIX) - len(markers) - len(note)
    if room < 8:  # markers that leave no room for the name: the name, then cut
        return (SERIES_PREFIX + description)[: 64 - len(note)] + note
    return SERIES_PREFIX + base[:room].rstrip() + markers + note


def mark_supersession(ds: Dataset, superseded: Superseded | None) -> None:
    """Name the superseded series in Image Comments (full UID, description and time)."""
    if superseded is None:
        return
    line = (
        f"Supersedes series {superseded.series_uid} ({superseded.description}"
        + (f", {superseded.made}" if superseded.made else "")
        + ")"
    )
    previous = str(ds.get("ImageComments", "") or "")
    ds.ImageComments = (f"{previous}\n{line}" if previous else line)[:10240]


def quality_comment(quality: Quality) -> str:
    """The verdict, its reasons and the measures as one text (Image Comments)."""
    return "Quality " + "\n".join(quality.notes())


def mark_quality(ds: Dataset, quality: Quality | None) -> None:
    """Put the result's quality first in Image Comments (the supersession note, if
    any, stays after it)."""
    if quality is None:
        return
    previous = str(ds.get("ImageComments", "") or "")
    text = quality_comment(quality)
    ds.ImageComments = (f"{text}\n{previous}" if previous else text)[:10240]


def set_dimension_organization(ds: Dataset, uid: str) -> None:
    """Replace the Dimension Organization UID highdicom draws at random, so that the
    same inputs give byte-for-byte the same object (and a UID one content)."""
    for keyword in ("DimensionOrganizationSequence", "DimensionIndexSequence"):
        for item in ds.get(keyword, []):
            if "DimensionOrganizationUID" in item:
                item.DimensionOrganizationUID = uid


def copy_character_set(target: Dataset, source: Dataset) -> None:
    """The source's Specific Character Set, as it is. The identity copied from the
    source is text pydicom decoded from it, and is written back in that repertoire
    (without it, a Latin-1 or UTF-8 name was written as bytes of no declared set, and
    characters outside Latin-1 became '?'); the node's own text is ASCII, which every
    set holds. A Specific Character Set present with no value (senders write that)
    means the default repertoire, as its absence does; written back empty it is an
    error in every result (a Type 1C element present must have a value), so it is
    left out."""
    value = source.get("SpecificCharacterSet")
    values = [] if value is None else [value] if isinstance(value, str) else list(value)
    if any(values):
        target.SpecificCharacterSet = value
    elif "SpecificCharacterSet" in target:
        del target.SpecificCharacterSet


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
    superseded: Superseded | None = None,
) -> None:
    target.Manufacturer = MANUFACTURER
    target.ManufacturerModelName = MODEL_NAME
    target.SoftwareVersions = __version__
    target.SeriesInstanceUID = series_uid
    target.SeriesNumber = series_number
    target.SeriesDescription = series_description(description, superseded)
    target.Modality = modality
    target.SeriesDate = now.strftime("%Y%m%d")
    # to the microsecond, as highdicom writes it: earlier versions of a result are
    # ordered by it (EncodeContext.superseded)
    target.SeriesTime = now.strftime("%H%M%S.%f")
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
