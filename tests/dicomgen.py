"""Small, valid DICOM objects built in tests (the phantom generator makes realistic ones)."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    XRayAngiographicImageStorage,
    generate_uid,
)


def xa_run(
    frames: int = 6,
    rows: int = 64,
    cols: int = 64,
    seed: int = 0,
    subtracted: bool = True,
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_time_ms: float = 250.0,
    body_part: str = "HEAD",
) -> Dataset:
    """A subtracted XA multi-frame run with a dark vessel filling over time."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:cols]
    vessel = np.abs(xx - cols / 2 - 6 * np.sin(yy / 9)) < 3
    t = np.arange(frames)
    curve = np.exp(-((t - frames / 2) ** 2) / (2 * (frames / 4) ** 2))
    pixels = (
        2048 - 600 * curve[:, None, None] * vessel[None] + rng.normal(0, 8, (frames, rows, cols))
    )
    pixels = np.clip(pixels, 0, 4095).astype(np.uint16)

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = XRayAngiographicImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientName = "TEST^XA"
    # One patient per study: the instances of a series built from several seeds
    # share the study they are given, and so the patient (a run is one patient's).
    ds.PatientID = (
        f"TEST{seed if study_uid is None else zlib.crc32(study_uid.encode()) % 10_000:04d}"
    )
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.Modality = "XA"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.BodyPartExamined = body_part
    ds.ImageType = (
        ["DERIVED", "PRIMARY", "SINGLE PLANE", "SUBTRACTION"]
        if subtracted
        else ["ORIGINAL", "PRIMARY", "SINGLE PLANE"]
    )
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.NumberOfFrames = frames
    ds.FrameIncrementPointer = 0x00181063
    ds.FrameTime = f"{frame_time_ms:g}"
    ds.ImagerPixelSpacing = [0.3, 0.3]
    ds.PixelData = pixels.tobytes()
    return ds


def ct_series(slices: int = 8, size: int = 32, study_uid: str | None = None) -> list[Dataset]:
    study = study_uid or generate_uid()
    series = generate_uid()
    frame_of_ref = generate_uid()
    out = []
    for i in range(slices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.FrameOfReferenceUID = frame_of_ref
        ds.PatientName = "TEST^CT"
        ds.PatientID = "CT0001"
        ds.Modality = "CT"
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [0, 0, float(i)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.5, 0.5]
        ds.SliceThickness = 0.5
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.PixelData = np.full((size, size), i * 10, np.int16).tobytes()
        out.append(ds)
    return out


def save(ds: Dataset, directory: Path, name: str | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / (name or f"{ds.SOPInstanceUID}.dcm")
    ds.save_as(path, enforce_file_format=True)
    return path


def htj2k(ds: Dataset, transfer_syntax: str, quality: float | None = None) -> Dataset:
    """``ds`` with its frames encoded in High-Throughput JPEG 2000 (PS3.5 A.4.11), one
    codestream a frame, by OpenJPH through imagecodecs (a test dependency: pydicom
    encodes no HTJ2K); reversible unless ``quality`` (a quantisation step) is given."""
    import imagecodecs
    from pydicom.encaps import encapsulate

    frames = np.asarray(ds.pixel_array).reshape(-1, int(ds.Rows), int(ds.Columns))
    options = {"level": 0} if quality is None else {"level": quality}
    ds.PixelData = encapsulate(
        [imagecodecs.htj2k_encode(np.ascontiguousarray(f), **options) for f in frames]
    )
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    if quality is not None:
        ds.LossyImageCompression = "01"
    return ds


def concatenation(total: int, numbers: list[int], frames: int = 4) -> tuple[str, list[Dataset]]:
    """Parts ``numbers`` (1-based, in that order) of a concatenation of ``total`` parts
    of ``frames`` frames each (PS3.3 C.7.6.16.2.2.4), in one new study and series: its
    Concatenation UID and the parts."""
    from pydicom.uid import generate_uid

    uid, study, series = generate_uid(), generate_uid(), generate_uid()
    parts = []
    for number in numbers:
        ds = xa_run(frames=frames, seed=number, study_uid=study, series_uid=series)
        ds.ConcatenationUID = uid
        ds.InConcatenationNumber = number
        ds.InConcatenationTotalNumber = total
        ds.ConcatenationFrameOffsetNumber = frames * (number - 1)
        parts.append(ds)
    return uid, parts


def rejection_note(title: tuple[str, str, str], instances: list[Dataset]) -> Dataset:
    """A Key Object Selection Document titled ``title`` listing ``instances`` (each with
    its patient, study, series and SOP UIDs), as a suite or PACS sends a rejection note
    (IHE IOCM; highdicom)."""
    import highdicom as hd

    return hd.ko.KeyObjectSelectionDocument(
        evidence=instances,
        content=hd.ko.KeyObjectSelection(
            document_title=hd.sr.CodedConcept(*title), referenced_objects=instances
        ),
        series_instance_uid=generate_uid(),
        series_number=99,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="SUITE VENDOR",
    )
