"""X-Ray Angiographic Image (XA) multi-frame files for the DSA and coronary phantoms.

Headers follow what C-arms write (compare the vendor samples described in
shared/data/real/README.txt): Frame Time Vector with the Frame Increment
Pointer on it for variable rates (Frame Time for a constant rate), positioner
angles, Imager Pixel Spacing at the detector with the distances and the
magnification, kVp / mA / pulse width, contrast bolus, and for native runs a
Mask Subtraction Sequence with Recommended Viewing Mode SUB.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from pipelines.base import ANATOMICAL_STRUCTURE, ARTERY, BLOOD_VESSEL, ICA, VEIN, Code
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

if TYPE_CHECKING:
    from training.phantoms.coronary import CoronaryPhantom
    from training.phantoms.dsa import DSAPhantom

XA_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.12.1"
DEVICE = Code("63653004", "SCT", "Medical device")
PHYSICAL_OBJECT = Code("260787004", "SCT", "Physical object")


def xa_dataset(
    ident: Identity,
    pixels: np.ndarray,
    frame_times_s: np.ndarray,
    series_uid: str,
    sop_uid: str,
    series_number: int,
    series_description: str,
    study_description: str,
    image_type: tuple[str, ...],
    body_part: str,
    acq,
    bits_stored: int,
    pixel_intensity_relationship: str,
    window: tuple[float, float],
    imager_spacing_mm: float,
) -> Dataset:
    """An XA multi-frame dataset; ``acq`` carries the acquisition facts (see ``dsa.Acquisition``)."""
    ds = base_dataset(
        XA_SOP_CLASS,
        sop_uid,
        ident,
        "XA",
        series_uid,
        series_number,
        series_description,
        body_part,
        study_description,
    )
    n_frames, rows, cols = pixels.shape
    start = ident.content_datetime
    ds.ProtocolName = series_description
    ds.InstanceNumber = 1
    ds.PatientOrientation = list(acq.patient_orientation)
    ds.ContentDate = ident.study_date
    ds.ContentTime = ident.study_time
    ds.AcquisitionDateTime = start.strftime("%Y%m%d%H%M%S.%f")
    ds.ImageType = list(image_type)
    ds.LossyImageCompression = "00"
    ds.BurnedInAnnotation = "NO"
    # Image Pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelIntensityRelationship = pixel_intensity_relationship
    ds.WindowCenter = f"{window[0]:.0f}"
    ds.WindowWidth = f"{window[1]:.0f}"
    # Multi-frame and Cine
    ds.NumberOfFrames = n_frames
    steps_ms = np.diff(frame_times_s) * 1000.0
    if np.allclose(steps_ms, steps_ms[0], rtol=0, atol=0.01):
        ds.FrameIncrementPointer = Tag("FrameTime")
        ds.FrameTime = f"{steps_ms[0]:.4g}"
    else:
        ds.FrameIncrementPointer = Tag("FrameTimeVector")
        # Each value is the increment from the previous frame; the first is 0.
        ds.FrameTimeVector = [f"{v:.4g}" for v in np.r_[0.0, steps_ms]]
    ds.RecommendedDisplayFrameRate = int(round(acq.fps[0]))
    ds.CineRate = int(round(acq.fps[0]))
    ds.PreferredPlaybackSequencing = 0
    ds.StartTrim = 1
    ds.StopTrim = n_frames
    ds.ActualFrameDuration = int(round(acq.pulse_ms))
    # X-Ray Acquisition, XA Positioner
    ds.KVP = f"{acq.kvp:.0f}"
    ds.RadiationSetting = "GR"
    ds.RadiationMode = "PULSED"
    ds.XRayTubeCurrent = int(round(acq.tube_current_ma))
    ds.ExposureTime = int(round(acq.pulse_ms))
    ds.Exposure = int(round(acq.tube_current_ma * acq.pulse_ms / 1000.0))
    ds.AveragePulseWidth = f"{acq.pulse_ms:.1f}"
    ds.ImagerPixelSpacing = [f"{imager_spacing_mm:.6g}"] * 2
    ds.FocalSpots = ["0.6"]
    ds.Grid = ["IN"]
    ds.DistanceSourceToDetector = f"{acq.sid_mm:.1f}"
    ds.DistanceSourceToPatient = f"{acq.sod_mm:.1f}"
    ds.EstimatedRadiographicMagnificationFactor = f"{acq.magnification:.6g}"
    ds.PositionerMotion = "STATIC"
    ds.PositionerPrimaryAngle = f"{acq.primary_angle:.1f}"
    ds.PositionerSecondaryAngle = f"{acq.secondary_angle:.1f}"
    # Contrast/Bolus
    iodine = float(getattr(acq, "iodine_mg_ml", 300.0))
    ds.ContrastBolusAgent = f"Iohexol {iodine:.0f} mgI/mL"
    ds.ContrastBolusRoute = "INTRA-ARTERIAL"
    ds.ContrastBolusVolume = f"{acq.contrast_volume_ml:.1f}"
    ds.ContrastFlowRate = [f"{acq.contrast_rate_ml_s:.1f}"]
    ds.ContrastFlowDuration = [f"{acq.contrast_volume_ml / acq.contrast_rate_ml_s:.2f}"]
    ds.ContrastBolusIngredient = "IODINE"
    ds.ContrastBolusIngredientConcentration = f"{iodine:.0f}"
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint16).tobytes()
    return ds


def _dsa_dataset(p: DSAPhantom) -> tuple[Dataset, Identity]:
    ident = identity("dsa", p.seed)
    variant = "native" if p.native else "dsa"
    key = options_key(p.options)
    series_uid = uid("dsa", p.seed, variant, key, "series")
    imager = p.pixel_spacing_mm[0] * p.acquisition.magnification
    peak_frame = int(np.argmin(np.abs(p.frame_times_s - p.timing["arterial_peak_s"])))
    ds = xa_dataset(
        ident,
        p.pixels,
        p.frame_times_s,
        series_uid,
        uid("dsa", p.seed, variant, key, "instance"),
        series_number=2 if p.native else 3,
        series_description=p.series_description,
        study_description="Cerebral angiography",
        image_type=p.image_type,
        body_part="HEAD",
        acq=p.acquisition,
        bits_stored=16 if p.native else 12,
        pixel_intensity_relationship="LIN" if p.native else "DISP",
        window=(2000.0, 4000.0) if p.native else (1650.0, 1500.0),
        imager_spacing_mm=imager,
    )
    ds.RepresentativeFrameNumber = peak_frame + 1
    if p.presentation is not None:
        p.presentation.write(ds)
    if p.native:
        item = Dataset()
        item.MaskOperation = "AVG_SUB"
        item.MaskFrameNumbers = [1]
        item.ApplicableFrameRange = [1, len(p.frame_times_s)]
        item.MaskSubPixelShift = [0.0, 0.0]
        ds.MaskSubtractionSequence = [item]
        ds.RecommendedViewingMode = "SUB"
    else:
        ds.DerivationDescription = "Logarithmic mask subtraction, mask = frame 1"
    return ds, ident


def write_dsa(
    p: DSAPhantom, directory: Path, encoding: str = "explicit", seg: bool = False
) -> list[Path]:
    ds, ident = _dsa_dataset(p)
    out_dir = directory / ident.patient_id
    stem = "native" if p.native else "dsa"
    written = [save(ds, out_dir / f"{stem}.dcm", encoding)]
    ds_plain, _ = _dsa_dataset(p)  # uncompressed copy as the canvas source
    if seg:
        written += _canvas_and_seg(
            ds_plain,
            p.to_run().pixels.min(axis=0),
            p.pixel_spacing_mm,
            out_dir,
            stem,
            masks=[p.truth["artery"], p.truth["vein"], p.truth["ica"], p.truth["device"]],
            segments=[
                ("Artery", ARTERY, ANATOMICAL_STRUCTURE),
                ("Vein", VEIN, ANATOMICAL_STRUCTURE),
                ("Internal carotid artery", ICA, ANATOMICAL_STRUCTURE),
                ("Device", DEVICE, PHYSICAL_OBJECT),
            ],
        )
    truth = dict(p.truth)
    truth.update(
        {
            "region_labels": p.region_labels,
            "regions": p.regions_table(),
            "frame_times_s": p.frame_times_s,
            "aif": p.aif,
            "pixel_spacing_mm": np.asarray(p.pixel_spacing_mm),
            "t_fine_s": p.timing["t_fine_s"],
            "aif_fine": p.timing["aif_fine"],
            "tissue_fine": p.timing["tissue_fine"],
            "timing": np.array([p.timing[k] for k in _TIMING_KEYS], np.float64),
            "timing_keys": np.array(_TIMING_KEYS),
        }
    )
    if p.mask_pixels is not None:
        truth["mask_frame_index"] = np.array([0])
    written.append(save_truth(out_dir / f"{stem}_truth.npz", truth))
    from training.phantoms.readme import DSA_README

    written.append(write_readme(out_dir, DSA_README))
    return written


_TIMING_KEYS = (
    "bolus_arrival_s",
    "arterial_peak_s",
    "venous_peak_s",
    "venous_delay_s",
    "bolus_alpha",
    "bolus_beta_s",
    "bolus_peak",
)


def _coronary_dataset(p: CoronaryPhantom) -> tuple[Dataset, Identity]:
    ident = identity("coronary", p.seed)
    key = options_key(p.options)
    ds = xa_dataset(
        ident,
        p.pixels,
        p.frame_times_s,
        uid("coronary", p.seed, key, "series"),
        uid("coronary", p.seed, key, "instance"),
        series_number=1,
        series_description=p.series_description,
        study_description="Coronary angiography",
        image_type=("ORIGINAL", "PRIMARY", "SINGLE PLANE"),
        body_part="HEART",
        acq=p.acquisition,
        bits_stored=12,
        pixel_intensity_relationship="DISP",
        window=(2048.0, 3000.0),
        imager_spacing_mm=p.pixel_spacing_mm[0] * p.acquisition.magnification,
    )
    ds.RWavePointer = [int(i) + 1 for i in p.r_wave_frames]
    if p.presentation is not None:
        p.presentation.write(ds)
    ds.RepresentativeFrameNumber = int(np.argmax(p.truth["vessel"].sum(axis=(1, 2)))) + 1
    return ds, ident


def write_coronary(
    p: CoronaryPhantom, directory: Path, encoding: str = "explicit", seg: bool = False
) -> list[Path]:
    ds, ident = _coronary_dataset(p)
    out_dir = directory / ident.patient_id
    written = [save(ds, out_dir / "coronary.dcm", encoding)]
    if seg:
        ds_plain, _ = _coronary_dataset(p)
        vessel_any = p.truth["vessel"].any(axis=0)
        written += _canvas_and_seg(
            ds_plain,
            p.pixels.min(axis=0).astype(np.float32),
            p.pixel_spacing_mm,
            out_dir,
            "coronary",
            masks=[vessel_any],
            segments=[("Coronary vessels (any frame)", BLOOD_VESSEL, ANATOMICAL_STRUCTURE)],
        )
    truth = dict(p.truth)
    truth.update(
        {
            "frame_times_s": p.frame_times_s,
            "cardiac_phase": p.cardiac_phase,
            "r_wave_frames": p.r_wave_frames,
            "pixel_spacing_mm": np.asarray(p.pixel_spacing_mm),
        }
    )
    written.append(save_truth(out_dir / "coronary_truth.npz", truth))
    from training.phantoms.readme import CORONARY_README

    written.append(write_readme(out_dir, CORONARY_README))
    return written


def _canvas_and_seg(
    source: Dataset, minip: np.ndarray, spacing, out_dir: Path, stem: str, masks, segments
) -> list[Path]:
    image = np.clip(np.rint(minip), 0, 2 ** int(source.BitsStored) - 1).astype(np.uint16)
    sc = canvas.minip_canvas(source, image, pixel_spacing_mm=spacing)
    sc_path = out_dir / f"{stem}_minip_sc.dcm"
    sc.save_as(sc_path, enforce_file_format=True)
    # Empty segments are left out, unless all are empty (a run before the contrast arrives).
    keep = [i for i, m in enumerate(masks) if np.any(m)] or list(range(len(masks)))
    seg = canvas.truth_segmentation(
        [sc],
        np.stack([masks[i] for i in keep]),
        [segments[i] for i in keep],
        series_uid=uid("seg", sc.SOPInstanceUID, "series"),
        sop_uid=uid("seg", sc.SOPInstanceUID, "instance"),
        series_number=int(source.SeriesNumber) + canvas.SEG_SERIES_NUMBER_OFFSET,
        description=f"Truth of series {source.SeriesNumber}",
        pixel_spacing_mm=spacing,
    )
    seg_path = out_dir / f"{stem}_seg.dcm"
    seg.save_as(seg_path, enforce_file_format=True)
    return [sc_path, seg_path]
