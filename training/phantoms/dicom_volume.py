"""The rotational volume as DICOM: Enhanced X-Ray 3D Angiographic Image and a CT series.

C-arm workstations export a 3D reconstruction both ways: as the enhanced
multi-frame X-Ray 3D Angiographic Image (one file, functional groups per
frame) and as legacy CT Image Storage, one file per axial slice, for PACS and
planning software. Both share one Frame of Reference and carry the same
stored values (HU + 1024 in 12 bits, or 16 for some randomised volumes,
Rescale Intercept -1024).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from pipelines.base import ANATOMICAL_STRUCTURE, BLOOD_VESSEL, BONE, SOFT_TISSUE, TISSUE
from training.phantoms import canvas
from training.phantoms.dicom_common import (
    Identity,
    base_dataset,
    identity,
    options_key,
    save,
    save_truth,
    uid,
    write_readme,
)
from training.phantoms.readme import ROTATIONAL_README

if TYPE_CHECKING:
    from training.phantoms.rotational import RotationalPhantom

XA3D_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.13.1.1"
CT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.2"
INTERCEPT = -1024.0
AXIAL = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def _stored(hu: np.ndarray, bits: int = 12) -> np.ndarray:
    return np.clip(np.rint(hu - INTERCEPT), 0, 2**bits - 1).astype(np.uint16)


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    ds = Dataset()
    ds.CodeValue = value
    ds.CodingSchemeDesignator = scheme
    ds.CodeMeaning = meaning
    return ds


def _common(ds: Dataset, ident: Identity, for_uid: str, bits: int = 12) -> None:
    ds.FrameOfReferenceUID = for_uid
    ds.PositionReferenceIndicator = ""
    ds.ContentDate = ident.study_date
    ds.ContentTime = ident.study_time
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"


def xa3d_dataset(
    p: RotationalPhantom, ident: Identity, series_uid: str, sop_uid: str, for_uid: str
) -> Dataset:
    ds = base_dataset(
        XA3D_SOP_CLASS,
        sop_uid,
        ident,
        "XA",
        series_uid,
        10,
        "3D-RA fill run",
        "HEAD",
        "Cerebral angiography",
    )
    _common(ds, ident, for_uid, p.bits_stored)
    nz, ny, nx = p.hu.shape
    dz, dy, dx = p.spacing_mm
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.PresentationLUTShape = "IDENTITY"
    ds.ContentQualification = "RESEARCH"
    ds.RecognizableVisualFeatures = "NO"
    ds.Rows, ds.Columns, ds.NumberOfFrames = ny, nx, nz
    ds.AcquisitionContextSequence = Sequence([])
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    # Enhanced Contrast/Bolus: the agent code sits in the item itself.
    agent = _code("109218004", "SCT", "Iohexol")
    agent.ContrastBolusAgentNumber = 1
    agent.ContrastBolusAdministrationRouteSequence = [
        _code("58100008", "SCT", "Intra-arterial route")
    ]
    agent.ContrastBolusIngredientCodeSequence = [_code("44588005", "SCT", "Iodine")]
    agent.ContrastBolusVolume = 18.0
    agent.ContrastBolusIngredientConcentration = 300.0
    agent.ContrastBolusIngredientOpaque = "YES"
    ds.ContrastBolusAgentSequence = [agent]
    # Multi-frame Dimension: one stack, frames ordered by position in it.
    dim_uid = uid("rotational", p.seed, options_key(p.options), "dimension")
    ds.DimensionOrganizationSequence = [Dataset()]
    ds.DimensionOrganizationSequence[0].DimensionOrganizationUID = dim_uid
    ds.DimensionOrganizationType = "3D"
    idx = []
    for pointer, label in (
        ("StackID", "Stack ID"),
        ("InStackPositionNumber", "In-Stack Position Number"),
    ):
        item = Dataset()
        item.DimensionOrganizationUID = dim_uid
        item.DimensionIndexPointer = pointer
        item.FunctionalGroupPointer = "FrameContentSequence"
        item.DimensionDescriptionLabel = label
        idx.append(item)
    ds.DimensionIndexSequence = idx
    # Shared functional groups
    shared = Dataset()
    pm = Dataset()
    pm.PixelSpacing = [f"{dy:.6g}", f"{dx:.6g}"]
    pm.SliceThickness = f"{dz:.6g}"
    pm.SpacingBetweenSlices = f"{dz:.6g}"
    shared.PixelMeasuresSequence = [pm]
    po = Dataset()
    po.ImageOrientationPatient = AXIAL
    shared.PlaneOrientationSequence = [po]
    pvt = Dataset()
    pvt.RescaleIntercept = f"{INTERCEPT:.0f}"
    pvt.RescaleSlope = "1"
    pvt.RescaleType = "HU"
    shared.PixelValueTransformationSequence = [pvt]
    voi = Dataset()
    voi.WindowCenter = "400"
    voi.WindowWidth = "2000"
    shared.FrameVOILUTSequence = [voi]
    ft = Dataset()
    ft.FrameType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ft.PixelPresentation = "MONOCHROME"
    ft.VolumetricProperties = "VOLUME"
    ft.VolumeBasedCalculationTechnique = "NONE"
    shared.XRay3DFrameTypeSequence = [ft]
    anat = Dataset()
    anat.AnatomicRegionSequence = [_code("69536005", "SCT", "Head")]
    anat.FrameLaterality = "U"
    shared.FrameAnatomySequence = [anat]
    usage = Dataset()
    usage.ContrastBolusAgentNumber = 1
    usage.ContrastBolusAgentAdministered = "YES"
    usage.ContrastBolusAgentDetected = "YES"
    shared.ContrastBolusUsageSequence = [usage]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    start = ident.content_datetime.strftime("%Y%m%d%H%M%S.%f")
    for k in range(nz):
        item = Dataset()
        fc = Dataset()
        # Every slice comes from the whole 5 s rotation.
        fc.FrameAcquisitionDateTime = start
        fc.FrameReferenceDateTime = start
        fc.FrameAcquisitionDuration = 5000.0
        fc.StackID = "1"
        fc.InStackPositionNumber = k + 1
        fc.DimensionIndexValues = [1, k + 1]
        item.FrameContentSequence = [fc]
        pp = Dataset()
        pp.ImagePositionPatient = [
            f"{v:.6g}" for v in (p.origin_mm[0], p.origin_mm[1], p.origin_mm[2] + k * dz)
        ]
        item.PlanePositionSequence = [pp]
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    ds.PixelData = _stored(p.hu, p.bits_stored).tobytes()
    return ds


def ct_slices(
    p: RotationalPhantom, ident: Identity, series_uid: str, for_uid: str
) -> list[Dataset]:
    nz, ny, nx = p.hu.shape
    dz, dy, dx = p.spacing_mm
    stored = _stored(p.hu, p.bits_stored)
    key = options_key(p.options)
    out = []
    for k in range(nz):
        sop = uid("rotational", p.seed, key, "ct", k)
        ds = base_dataset(
            CT_SOP_CLASS,
            sop,
            ident,
            "CT",
            series_uid,
            11,
            "3D-RA fill run (CT export)",
            "HEAD",
            "Cerebral angiography",
        )
        _common(ds, ident, for_uid, p.bits_stored)
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.InstanceNumber = k + 1
        ds.AcquisitionNumber = 1
        ds.ImagePositionPatient = [
            f"{v:.6g}" for v in (p.origin_mm[0], p.origin_mm[1], p.origin_mm[2] + k * dz)
        ]
        ds.ImageOrientationPatient = AXIAL
        ds.SliceLocation = f"{p.origin_mm[2] + k * dz:.6g}"
        ds.SliceThickness = f"{dz:.6g}"
        ds.PixelSpacing = [f"{dy:.6g}", f"{dx:.6g}"]
        ds.Rows, ds.Columns = ny, nx
        ds.RescaleIntercept = f"{INTERCEPT:.0f}"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.KVP = "90"
        ds.WindowCenter = "400"
        ds.WindowWidth = "2000"
        ds.ContrastBolusAgent = "Iohexol 300 mgI/mL"
        ds.ContrastBolusRoute = "INTRA-ARTERIAL"
        ds.AcquisitionDateTime = ident.content_datetime.strftime("%Y%m%d%H%M%S.%f")
        ds.PixelData = stored[k].tobytes()
        out.append(ds)
    return out


def write_rotational(
    p: RotationalPhantom, directory: Path, encoding: str = "explicit", seg: bool = False
) -> list[Path]:
    ident = identity("rotational", p.seed)
    out_dir = directory / ident.patient_id
    key = options_key(p.options)
    for_uid = uid("rotational", p.seed, key, "frame-of-reference")
    xa = xa3d_dataset(
        p,
        ident,
        uid("rotational", p.seed, key, "xa3d-series"),
        uid("rotational", p.seed, key, "xa3d"),
        for_uid,
    )
    written = [save(xa, out_dir / "rotational_3dxa.dcm", encoding)]
    ct_series = uid("rotational", p.seed, key, "ct-series")
    slices = ct_slices(p, ident, ct_series, for_uid)
    written += [
        save(ds, out_dir / "rotational_ct" / f"CT{k + 1:04d}.dcm", encoding)
        for k, ds in enumerate(ct_slices(p, ident, ct_series, for_uid))
    ]
    if seg:
        labels = p.truth["labels"]
        masks = np.stack([labels == 1, labels == 2, labels == 3])
        s = canvas.truth_segmentation(
            slices,
            masks,
            [
                ("Vessel", BLOOD_VESSEL, ANATOMICAL_STRUCTURE),
                ("Bone", BONE, TISSUE),
                ("Soft tissue", SOFT_TISSUE, TISSUE),
            ],
            series_uid=uid("rotational", p.seed, key, "seg-series"),
            sop_uid=uid("rotational", p.seed, key, "seg"),
            series_number=12,
            description="Truth of the 3D-RA volume",
        )
        path = out_dir / "rotational_seg.dcm"
        s.save_as(path, enforce_file_format=True)
        written.append(path)
    written.append(
        save_truth(
            out_dir / "rotational_truth.npz",
            {
                **p.truth,
                "spacing_mm": np.asarray(p.spacing_mm),
                "origin_mm": np.asarray(p.origin_mm),
            },
        )
    )
    written.append(write_readme(out_dir, ROTATIONAL_README))
    return written
