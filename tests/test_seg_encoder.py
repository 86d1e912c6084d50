"""SEG encoder: highdicom round trips for canvas, frames and volume geometry, the
frames canvas, references that resolve, and dciodvfy with zero errors."""

from __future__ import annotations

import subprocess
from datetime import datetime
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    XRayAngiographicImageStorage,
    generate_uid,
)

from dicom_node.encode import encode_result
from dicom_node.encode.canvas import make_canvas
from dicom_node.encode.common import EncodeContext
from dicom_node.encode.frames_canvas import make_frames_canvas
from dicom_node.encode.seg import encode_segmentation
from pipelines.base import (
    ARTERY,
    BLOOD_VESSEL,
    ICA,
    VEIN,
    AlgorithmInfo,
    PipelineResult,
    Run,
    RunMeta,
    Segment,
    SegmentationOutput,
)

NOW = datetime(2024, 5, 6, 7, 8, 9)
CLASSICAL = AlgorithmInfo("dsa_av", "0.1.0", "classical")
MODEL = AlgorithmInfo("dsa_av", "0.1.0", "model", model_package="stunet-phantom", model_version="3")


def _identity(ds: Dataset, seed: str) -> None:
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["study", seed])
    ds.PatientName, ds.PatientID = "Phantom^Test", "PH-1"
    ds.PatientBirthDate, ds.PatientSex = "", "O"
    ds.StudyDate, ds.StudyTime, ds.StudyID = "20240506", "070000", "1"
    ds.AccessionNumber, ds.ReferringPhysicianName = "", ""


def xa_header(frames: int = 6, rows: int = 48, cols: int = 40, seed: str = "a") -> Dataset:
    """A multi-frame XA header as the node keeps it (no pixel data)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = XRayAngiographicImageStorage
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["xa", seed])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["xa-series", seed])
    _identity(ds, seed)
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "XA", 3, 1
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, cols, frames
    ds.ImagerPixelSpacing = [0.3, 0.3]
    ds.FrameTime = 250
    return ds


def ct_slices(count: int = 4, rows: int = 24, cols: int = 20) -> list[Dataset]:
    """A small CT volume with its own Frame of Reference."""
    frame_of_reference = generate_uid(entropy_srcs=["ct-for"])
    series = generate_uid(entropy_srcs=["ct-series"])
    slices = []
    for z in range(count):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid(entropy_srcs=["ct", str(z)])
        ds.SeriesInstanceUID = series
        _identity(ds, "ct")
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 4, z + 1
        ds.FrameOfReferenceUID = frame_of_reference
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = [-10.0, -12.0, 2.5 * z]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.5, 0.5]
        ds.SliceThickness = 2.5
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        slices.append(ds)
    return slices


def dciodvfy_errors(ds: Dataset, path: Path) -> list[str]:
    ds.save_as(path, enforce_file_format=True)
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def read_back(ds: Dataset, path: Path) -> hd.seg.Segmentation:
    ds.save_as(path, enforce_file_format=True)
    return hd.seg.segread(path)


def random_masks(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.random(shape) < 0.2


def test_canvas_seg_round_trip_and_codes(tmp_path: Path) -> None:
    xa = xa_header()
    ctx = EncodeContext(sources=[xa], pipeline="dsa_av", now=NOW)
    ctx.canvas = make_canvas(ctx, np.random.default_rng(1).random((48, 40)).astype(np.float32))
    masks = random_masks((3, 48, 40))
    masks[:2, 5:9, 5:9] = True  # artery and vein overlap
    segments = [
        Segment("Artery", ARTERY, color_rgb=(255, 0, 0)),
        Segment("Vein", VEIN, color_rgb=(0, 0, 255)),
        Segment("Internal carotid artery", ICA, color_rgb=(255, 160, 0)),
    ]
    out = SegmentationOutput("av", masks, segments, CLASSICAL, geometry="canvas")
    (seg,) = encode_segmentation(out, ctx, Run(np.zeros((6, 48, 40), np.float32), _meta(6)))

    assert dciodvfy_errors(seg, tmp_path / "seg.dcm") == []
    back = read_back(seg, tmp_path / "seg.dcm")
    pixels = back.get_pixels_by_source_frame(ctx.canvas.SOPInstanceUID, [1])
    assert pixels.shape == (1, 48, 40, 3)
    assert np.array_equal(np.moveaxis(pixels[0], -1, 0).astype(bool), masks)

    assert back.SegmentationType == "BINARY"
    assert back.StudyInstanceUID == xa.StudyInstanceUID and back.PatientID == "PH-1"
    assert back.FrameOfReferenceUID == ctx.canvas.FrameOfReferenceUID
    for number, segment in enumerate(segments, start=1):
        desc = back.get_segment_description(number)
        assert desc.segmented_property_type.value == segment.code.value
        assert desc.segmented_property_type.scheme_designator == "SCT"
        assert desc.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
        assert desc.algorithm_identification[0].AlgorithmName == "dsa_av"
        rgb = hd.color.CIELabColor.from_dicom_value(desc.RecommendedDisplayCIELabValue).to_rgb()
        assert np.abs(np.asarray(rgb, float) - segment.color_rgb).max() <= 2
    # The derivation chain SEG -> canvas -> XA run: the SEG names only the canvas
    # (the series whose geometry it shares, so a viewer cannot pick the XA run to
    # overlay on), the canvas names the run.
    assert_references_only(back, ctx.canvas)
    assert [str(i.ReferencedSOPInstanceUID) for i in ctx.canvas.SourceImageSequence] == [
        xa.SOPInstanceUID
    ]


def assert_references_only(obj: Dataset, canvas: Dataset) -> None:
    """Source Image, Derivation Image and Referenced Series all name ``canvas`` alone."""
    sources = {str(i.ReferencedSOPInstanceUID) for i in obj.SourceImageSequence}
    assert sources == {str(canvas.SOPInstanceUID)}
    derived = {
        str(ref.ReferencedSOPInstanceUID)
        for frame in obj.PerFrameFunctionalGroupsSequence
        for item in frame.DerivationImageSequence
        for ref in item.SourceImageSequence
    }
    assert derived == {str(canvas.SOPInstanceUID)}
    assert [str(s.SeriesInstanceUID) for s in obj.ReferencedSeriesSequence] == [
        str(canvas.SeriesInstanceUID)
    ]
    listed = {
        str(i.ReferencedSOPInstanceUID)
        for s in obj.ReferencedSeriesSequence
        for i in s.ReferencedInstanceSequence
    }
    assert listed == {str(canvas.SOPInstanceUID)}


def _meta(frames: int, times: np.ndarray | None = None) -> RunMeta:
    return RunMeta(
        modality="XA",
        sop_class_uid=XRayAngiographicImageStorage,
        rows=48,
        columns=40,
        number_of_frames=frames,
        frame_times_s=times,
        pixel_spacing_mm=(0.3, 0.3),
    )


def test_model_algorithm_identification(tmp_path: Path) -> None:
    ctx = EncodeContext(sources=[xa_header()], pipeline="dsa_av", now=NOW)
    ctx.canvas = make_canvas(ctx, np.ones((48, 40), np.float32))
    out = SegmentationOutput("av", random_masks((1, 48, 40)), [Segment("Artery", ARTERY)], MODEL)
    (seg,) = encode_segmentation(out, ctx, Run(np.zeros((6, 48, 40), np.float32), _meta(6)))
    algorithm = (
        read_back(seg, tmp_path / "s.dcm").get_segment_description(1).algorithm_identification
    )
    item = algorithm[0]
    assert item.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"
    assert "stunet-phantom 3" in item.AlgorithmVersion
    assert "stunet-phantom" in item.AlgorithmParameters and "3" in item.AlgorithmParameters


@pytest.mark.parametrize("sources", ["multiframe", "instances"])
def test_frames_seg_references_every_source_frame(tmp_path: Path, sources: str) -> None:
    frames, rows, cols = 6, 48, 40
    if sources == "multiframe":
        headers = [xa_header(frames)]
    else:
        headers = [xa_header(1, seed=f"i{i}") for i in range(frames)]
        for i, h in enumerate(headers):
            h.SeriesInstanceUID = headers[0].SeriesInstanceUID
            h.InstanceNumber = i + 1
    times = np.array([0.0, 0.1, 0.2, 0.35, 0.5, 0.6])
    pixels = (np.random.default_rng(2).random((frames, rows, cols)) * 3000).astype(np.float32)
    run = Run(pixels, _meta(frames, times))
    ctx = EncodeContext(sources=headers, pipeline="xa_coronary", now=NOW)
    masks = random_masks((1, frames, rows, cols), seed=3)
    masks[0, 2] = False  # an empty frame must read back empty
    out = SegmentationOutput(
        "vessel", masks, [Segment("Blood vessel", BLOOD_VESSEL)], CLASSICAL, geometry="frames"
    )
    canvas, seg = encode_segmentation(out, ctx, run)

    assert canvas.SOPClassUID == pydicom.uid.MultiFrameGrayscaleWordSecondaryCaptureImageStorage
    assert int(canvas.NumberOfFrames) == frames
    assert dciodvfy_errors(canvas, tmp_path / "canvas.dcm") == []
    assert dciodvfy_errors(seg, tmp_path / "seg.dcm") == []
    # The canvas keeps the run's values (12-bit quantisation) and timing.
    stored = pydicom.dcmread(tmp_path / "canvas.dcm")
    restored = stored.pixel_array * float(stored.RescaleSlope) + float(stored.RescaleIntercept)
    assert np.abs(restored - pixels).max() <= float(stored.RescaleSlope)
    assert np.allclose(np.cumsum([float(v) for v in stored.FrameTimeVector]) / 1000, times)

    back = read_back(seg, tmp_path / "seg.dcm")
    got = back.get_pixels_by_source_frame(canvas.SOPInstanceUID, list(range(1, frames + 1)))
    assert np.array_equal(got[..., 0].astype(bool), masks[0])
    for item in back.PerFrameFunctionalGroupsSequence:
        ref = item.DerivationImageSequence[0].SourceImageSequence[0]
        assert ref.ReferencedSOPInstanceUID == canvas.SOPInstanceUID
        number = int(ref.ReferencedFrameNumber)
        assert masks[0, number - 1].any()  # empty frames are omitted, the others map 1:1
    assert len(back.PerFrameFunctionalGroupsSequence) == frames - 1
    assert_references_only(back, canvas)  # the frames canvas names the run, frame by frame
    named = {str(i.ReferencedSOPInstanceUID) for i in canvas.SourceImageSequence}
    assert named == {h.SOPInstanceUID for h in headers}


def test_frames_canvas_without_timing_labels_frames(tmp_path: Path) -> None:
    ctx = EncodeContext(sources=[xa_header(4)], pipeline="xa_coronary", now=NOW)
    canvas = make_frames_canvas(ctx, np.ones((4, 48, 40), np.float32))
    assert "FrameTimeVector" not in canvas and list(canvas.FrameLabelVector) == ["1", "2", "3", "4"]
    assert dciodvfy_errors(canvas, tmp_path / "c.dcm") == []


def test_volume_seg_round_trip(tmp_path: Path) -> None:
    slices = ct_slices()
    ctx = EncodeContext(sources=slices, pipeline="rotational_dla", now=NOW)
    masks = random_masks((2, 4, 24, 20), seed=5)
    out = SegmentationOutput(
        "labels",
        masks,
        [Segment("Blood vessel", BLOOD_VESSEL), Segment("Artery", ARTERY)],
        CLASSICAL,
        geometry="volume",
    )
    meta = RunMeta(
        modality="CT",
        sop_class_uid=CTImageStorage,
        rows=24,
        columns=20,
        number_of_frames=4,
        is_volume=True,
    )
    (seg,) = encode_segmentation(out, ctx, Run(np.zeros((4, 24, 20), np.float32), meta))
    assert seg.FrameOfReferenceUID == slices[0].FrameOfReferenceUID
    assert dciodvfy_errors(seg, tmp_path / "seg.dcm") == []
    back = read_back(seg, tmp_path / "seg.dcm")
    got = back.get_pixels_by_source_instance([s.SOPInstanceUID for s in slices])
    assert np.array_equal(np.moveaxis(got, -1, 0).astype(bool), masks)


def test_all_empty_frames_seg_reads_back_empty(tmp_path: Path) -> None:
    ctx = EncodeContext(sources=[xa_header(4)], pipeline="xa_coronary", now=NOW)
    out = SegmentationOutput(
        "vessel",
        np.zeros((1, 4, 48, 40), bool),
        [Segment("Blood vessel", BLOOD_VESSEL)],
        CLASSICAL,
        geometry="frames",
    )
    canvas, seg = encode_segmentation(out, ctx, Run(np.ones((4, 48, 40), np.float32), _meta(4)))
    assert dciodvfy_errors(seg, tmp_path / "seg.dcm") == []
    got = read_back(seg, tmp_path / "seg.dcm").get_pixels_by_source_frame(
        canvas.SOPInstanceUID, [1, 2, 3, 4]
    )
    assert got.shape == (4, 48, 40, 1) and not got.any()


def test_masks_must_fit_geometry() -> None:
    ctx = EncodeContext(sources=[xa_header()], pipeline="dsa_av", now=NOW)
    ctx.canvas = make_canvas(ctx, np.ones((48, 40), np.float32))
    out = SegmentationOutput(
        "av", random_masks((2, 48, 40)), [Segment("Artery", ARTERY)], CLASSICAL
    )
    with pytest.raises(ValueError, match="do not fit"):
        encode_segmentation(out, ctx, Run(np.zeros((6, 48, 40), np.float32), _meta(6)))


def test_encode_result_delivers_canvas_before_seg(tmp_path: Path) -> None:
    """Through the node's encode_result: canvas first, then SEG referencing it."""
    ctx = EncodeContext(sources=[xa_header()], pipeline="dsa_av", now=NOW)
    out = SegmentationOutput(
        "av", random_masks((1, 48, 40)), [Segment("Artery", ARTERY)], CLASSICAL
    )
    run = Run(np.ones((6, 48, 40), np.float32), _meta(6))
    canvas, seg = encode_result(PipelineResult(outputs=[out]), run, ctx)
    assert seg.SOPClassUID == pydicom.uid.SegmentationStorage
    ref = seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
    assert ref.ReferencedSOPInstanceUID == canvas.SOPInstanceUID


def test_uids_are_deterministic() -> None:
    """A re-run yields the same frames canvas and SEG UIDs (the destination stores them once)."""
    ctx = EncodeContext(sources=[xa_header()], pipeline="xa_coronary", now=NOW)
    pixels = np.ones((6, 48, 40), np.float32)
    out = SegmentationOutput(
        "vessel",
        random_masks((1, 6, 48, 40)),
        [Segment("Blood vessel", BLOOD_VESSEL)],
        CLASSICAL,
        geometry="frames",
    )
    run = Run(pixels, _meta(6))
    first = encode_segmentation(out, ctx, run)
    again = encode_segmentation(
        out, EncodeContext(sources=ctx.sources, pipeline="xa_coronary", now=NOW), run
    )
    assert [d.SOPInstanceUID for d in first] == [d.SOPInstanceUID for d in again]
