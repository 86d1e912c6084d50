"""rotational_dla: the 41x41x5 30-layer classifier (dense == patch-wise), the
classical path, the outputs and their DICOM encodings (SEG on the source volume,
the DLA angiogram as a CT series, the MIP Secondary Capture)."""

from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from scipy import ndimage as ndi

import pipelines.rotational as rotational
from pipelines.base import ImageOutput, PipelineContext, Run, RunMeta, SegmentationOutput
from pipelines.models.dla import (
    CLASS_BONE,
    CLASS_SOFT,
    CLASS_VESSEL,
    receptive_field,
    weight_layers,
)
from pipelines.models.package import build, write_package
from pipelines.rotational import (
    AIR_HU,
    NAME,
    RotationalDLA,
    body_mask,
    classical_tissues,
    classify_dense,
    classify_patches,
    extend_beyond_field,
    fill_holes,
    reconstruction_field,
    soft_tissue_level,
    tubeness,
    tubeness_in_slabs,
)

torch.set_num_threads(1)
SPACING = (0.8, 0.8, 0.8)


def synthetic_head(
    slices: int = 24, size: int = 56, seed: int = 0, vessel_hu: float = 450.0
) -> tuple[np.ndarray, np.ndarray]:
    """A head-like volume: soft tissue in a 6 mm skull (1300-1600 HU), a thinner bony floor
    at the base, and contrast-filled tubes (a loop and a straight vessel) of ``vessel_hu``
    inside. Returns (HU, truth labels with 0 vessel, 1 bone, 2 soft tissue / air)."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.indices((slices, size, size)).astype(np.float32) * SPACING[0]
    cz, cy, cx = slices * SPACING[0] * 0.7, size * SPACING[1] / 2, size * SPACING[2] / 2
    r = np.sqrt((zz - cz) ** 2 + (yy - cy) ** 2 + (xx - cx) ** 2)
    outer = 0.48 * size * SPACING[1]
    head = r < outer
    bone = head & (r > outer - 6.0)
    bone |= head & (zz < 3.2)  # skull base floor, 4 slices thick
    hu = np.where(head, 40.0, -1000.0)
    hu = np.where(bone, 1300.0 + 300.0 * rng.random(hu.shape), hu)
    ring = 0.55 * (outer - 6.0)  # well inside the skull at any size
    loop = np.abs(np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) - ring) < 1.4
    loop &= np.abs(zz - cz) < 1.4
    trunk = (np.sqrt((yy - cy - ring) ** 2 + (xx - cx) ** 2) < 1.6) & (zz > 6.0) & (zz < cz + 1)
    vessel = (loop | trunk) & head & ~bone
    hu = np.where(vessel, vessel_hu, hu) + rng.normal(0, 25.0, hu.shape)
    labels = np.full(hu.shape, CLASS_SOFT, np.uint8)
    labels[bone] = CLASS_BONE
    labels[vessel] = CLASS_VESSEL
    return hu.astype(np.float32), labels


def volume_run(hu: np.ndarray) -> Run:
    meta = RunMeta(
        modality="CT",
        sop_class_uid=CTImageStorage,
        rows=hu.shape[1],
        columns=hu.shape[2],
        number_of_frames=hu.shape[0],
        pixel_spacing_mm=SPACING[1:],
        slice_spacing_mm=SPACING[0],
        is_volume=True,
    )
    return Run(pixels=hu, meta=meta)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def random_bn_model(width: int = 8, seed: int = 0) -> torch.nn.Module:
    """Random weights with non-trivial batch-norm statistics (so eval-mode norm matters)."""
    torch.manual_seed(seed)
    model = build("dla_resnet", {"width": width})
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


# --------------------------------------------------------------------------- model


def test_receptive_field_depth_and_config() -> None:
    model = build("dla_resnet", {"width": 8})
    assert receptive_field(model) == 41
    assert weight_layers(model) == 30
    with torch.no_grad():
        assert model(torch.zeros(2, 5, 41, 41)).shape == (2, 3, 1, 1)
        assert model(torch.zeros(1, 5, 50, 60)).shape == (1, 3, 10, 20)
    with pytest.raises(ValueError, match="HU slabs"):
        model(torch.zeros(1, 3, 41, 41))
    with pytest.raises(ValueError, match="unknown config keys"):
        build("dla_resnet", {"depth": 50})


def test_dense_inference_equals_patchwise_inference() -> None:
    """Every voxel of a small volume: one pass over slabs gives the labels of 41x41x5 patches."""
    hu, _ = synthetic_head(slices=7, size=30, seed=1)
    model = random_bn_model()
    device = torch.device("cpu")
    dense = classify_dense(model, hu, device, slab=3)
    coords = np.argwhere(np.ones(hu.shape, bool))
    patchwise = classify_patches(model, hu, coords, device, batch=512).reshape(hu.shape)
    assert len(np.unique(dense)) >= 2  # a constant answer would prove nothing
    assert np.array_equal(dense, patchwise)


# --------------------------------------------------------------------------- classical


def test_classical_separates_vessels_from_bone() -> None:
    hu, truth = synthetic_head()
    labels = classical_tissues(hu, SPACING)
    assert dice(labels == CLASS_VESSEL, truth == CLASS_VESSEL) > 0.8
    assert dice(labels == CLASS_BONE, truth == CLASS_BONE) > 0.9


@pytest.mark.parametrize("vessel_hu", [250.0, 800.0, 1450.0, 2500.0])
def test_classical_holds_from_faint_iodine_to_iodine_brighter_than_bone(vessel_hu: float) -> None:
    """No HU constant: the same path finds vessels fainter than the diploe, as dense as
    the skull (1300-1600 HU) and brighter than it, by shape; bone stays bone."""
    hu, truth = synthetic_head(vessel_hu=vessel_hu)
    labels = classical_tissues(hu, SPACING)
    assert dice(labels == CLASS_VESSEL, truth == CLASS_VESSEL) > 0.8
    assert dice(labels == CLASS_BONE, truth == CLASS_BONE) > 0.9


def test_soft_tissue_level_and_noise_come_from_the_histogram() -> None:
    hu, _ = synthetic_head()
    level, noise = soft_tissue_level(hu, body_mask(hu))
    assert level == pytest.approx(40.0, abs=6.0)
    assert noise == pytest.approx(25.0, rel=0.25)
    shifted, _ = soft_tissue_level(hu + 60.0, body_mask(hu + 60.0))
    assert shifted == pytest.approx(level + 60.0, abs=4.0)


def test_tubeness_tells_tubes_from_plates_and_blobs() -> None:
    zz, yy, xx = np.indices((40, 40, 40)).astype(np.float32)
    tube = ((yy - 20) ** 2 + (xx - 20) ** 2 < 2.5**2).astype(np.float32)
    plate = (np.abs(zz - 20) < 2.5).astype(np.float32)
    blob = ((zz - 20) ** 2 + (yy - 20) ** 2 + (xx - 20) ** 2 < 8**2).astype(np.float32)
    centre = np.zeros(tube.shape, bool)
    centre[20, 20, 20] = True
    scores = {
        name: float(tubeness(u, centre, 1.0, (1.0, 1.5, 2.5))[20, 20, 20])
        for name, u in (("tube", tube), ("plate", plate), ("blob", blob))
    }
    assert scores["tube"] > 0.5 and scores["plate"] < 0.05 and scores["blob"] < 0.05, scores


def test_bone_cut_by_the_reconstruction_circle_is_not_a_vessel() -> None:
    """Truncation: outside the reconstruction circle every slice holds the padding value;
    a skull cut there is a thin sliver at the circle, not a vessel."""
    hu, truth = synthetic_head()
    size = hu.shape[1]
    yy, xx = np.mgrid[:size, :size]
    outside = (yy - size / 2) ** 2 + (xx - size / 2 + 6) ** 2 > (0.45 * size) ** 2
    hu[:, outside] = -1024.0
    truth[:, outside] = CLASS_SOFT
    labels = classical_tissues(hu, SPACING)
    assert not labels[:, outside].any() or (labels[:, outside] == CLASS_SOFT).all()
    assert dice(labels == CLASS_VESSEL, truth == CLASS_VESSEL) > 0.8
    assert (labels[truth == CLASS_BONE] == CLASS_VESSEL).mean() < 0.01


def test_a_thin_bone_plate_seeded_by_its_rim_is_bone() -> None:
    """A bony lamina thinner than the bone seeds' opening (a clinoid, a plate of the
    skull base), free in soft tissue: its rim is tubular enough to seed a vessel, and
    the watershed then filled the whole plate. Since 1.4.0 a seeded piece that is not
    tubular on average is bone, as an unseeded one was; the vessels stay."""
    hu, truth = synthetic_head(vessel_hu=1450.0, slices=32, size=64)
    zz, yy, xx = np.indices(hu.shape).astype(np.float32) * SPACING[0]
    cz, cy, cx = (n * SPACING[0] * f for n, f in zip(hu.shape, (0.45, 0.35, 0.5), strict=True))
    plate = (np.abs(zz - cz) < 1.2) & (np.abs(yy - cy) < 6.0) & (np.abs(xx - cx) < 6.0)
    plate &= truth == CLASS_SOFT
    rng = np.random.default_rng(1)
    bone_hu = 1300.0 + 300.0 * rng.random(hu.shape) + rng.normal(0.0, 25.0, hu.shape)
    hu = np.where(plate, bone_hu, hu).astype(np.float32)
    truth[plate] = CLASS_BONE
    labels = classical_tissues(hu, SPACING)
    assert (labels[plate] == CLASS_VESSEL).mean() < 0.05
    assert dice(labels == CLASS_VESSEL, truth == CLASS_VESSEL) > 0.8


def test_bright_specks_found_tubular_do_not_hide_a_faint_lumen() -> None:
    """Short bright spicules (a calcification, a clip, a bone fragment: 2000 HU) in the
    soft tissue of a faint run (250 HU of iodine) are tubular enough to seed a vessel.
    Before 1.5.0 the lumen contrast was the 95th percentile of all seeds pooled; a few
    percent of them on the spicules put it at 2000 HU, the partial-volume floor (a
    fifth of it) above the whole lumen, and not one vessel voxel was left. Now each
    piece has its own lumen and the run's is their median weighted by seeds. (The
    spicules themselves may stay vessel: shape alone cannot tell them apart.)"""
    hu, truth = synthetic_head(vessel_hu=250.0, slices=32, size=64)
    rng = np.random.default_rng(5)
    zz, yy, xx = np.indices(hu.shape)
    inner = (truth == CLASS_SOFT) & (hu > -500)
    inner &= ndi.distance_transform_edt(inner) > 4  # well away from skull and vessels
    spicules = np.zeros(hu.shape, bool)
    for z, y, x in rng.permutation(np.argwhere(inner))[:10]:
        spicules |= (np.abs(zz - z) <= 2) & (np.abs(yy - y) <= 0) & (np.abs(xx - x) <= 0)
    spicules &= inner
    hu = np.where(spicules, 2000.0 + rng.normal(0.0, 25.0, hu.shape), hu).astype(np.float32)
    truth[spicules] = CLASS_BONE
    labels = classical_tissues(hu, SPACING)
    assert dice(labels == CLASS_VESSEL, truth == CLASS_VESSEL) > 0.8


@functools.cache
def porous_skull_base(porosity: float, cell_hu: float) -> tuple[float, float]:
    """Vessel Dice of the classical path (and its false vessel on bone, as a share of
    the true vessel) on a randomised family A volume (development seed 962100) at
    1000 HU, its skull base drawn solid or as septa around cells 2.5 mm across."""
    import dataclasses

    from training.phantoms import priors
    from training.phantoms import rotational as phantom

    pri = dataclasses.replace(
        priors.ROTATIONAL,
        field_mm=(100.0, 100.0),
        noise_hu=(12.0, 12.0),
        skull_base_porosity=(porosity, porosity),
        skull_base_cell_mm=(2.5, 2.5),
        skull_base_cell_hu=(cell_hu, cell_hu),
    )
    ph = phantom.generate(962100, size=128, contrast_hu=1000.0, randomise=pri)
    truth = ph.truth["labels"]
    vessel = classical_tissues(ph.hu, ph.spacing_mm) == CLASS_VESSEL
    scored, true_vessel = truth != 0, truth == 1
    on_bone = float((vessel & (truth == 2)).sum() / true_vessel.sum())
    return dice(vessel & scored, true_vessel & scored), on_bone


@pytest.mark.parametrize("cell_hu", [-850.0, 30.0])
def test_a_porous_skull_base_is_bone_and_the_vessels_stay(cell_hu: float) -> None:
    """The cancellous or pneumatised skull base (septa as thin as a vessel, meeting in
    ridges as tubular as one) is bone, with air cells or marrow in it; the vessels
    found over a solid skull base are found over a porous one. Before 1.3.0 the
    septa gave 0.85-3.3 times as many false vessel voxels as there are vessel
    voxels, and the vessel Dice fell from 0.65 to 0.25-0.46."""
    porous_dice, on_bone = porous_skull_base(0.6, cell_hu)
    solid_dice, _ = porous_skull_base(0.0, 0.0)  # no cells: one volume for both cases
    assert on_bone < 0.25, on_bone
    assert porous_dice > solid_dice - 0.05, (porous_dice, solid_dice)


def truncated_head() -> tuple[np.ndarray, np.ndarray]:
    hu, truth = synthetic_head(slices=40, seed=3, vessel_hu=900.0)
    size = hu.shape[1]
    yy, xx = np.mgrid[:size, :size]
    outside = (yy - size / 2) ** 2 + (xx - size / 2 + 6) ** 2 > (0.45 * size) ** 2
    hu[:, outside] = -1024.0
    return hu.astype(np.float32), outside


def test_tubeness_in_slabs_equals_the_whole_volume() -> None:
    """Each slab carries the widest Gaussian's reach as context: the values are the
    whole volume's, bit for bit, with slabs far thinner than that reach, worked
    out one after the other or on threads."""
    hu, _ = truncated_head()
    mask = hu > 300
    scales = (0.45, 0.8, 1.4)
    u = np.clip((hu - 40.0) / 200.0, 0.0, 1.0).astype(np.float32)
    whole = tubeness(u, mask, 0.8, scales)[mask]
    assert whole.max() > 0.5
    for threads in (1, 3):
        slabs = tubeness_in_slabs(hu, 40.0, 200.0, mask, 0.8, scales, 5, threads)
        assert np.array_equal(whole, slabs)
    assert np.array_equal(whole, tubeness_in_slabs(hu, 40.0, 200.0, mask, 0.8, scales))


def test_reconstruction_field_is_found_when_air_noise_reaches_below_the_padding() -> None:
    """Family A pads the circle with -1000 HU while the air inside it is noisy about
    -1000: the volume's minimum is then noise, and the padding is a corner's value."""
    rng = np.random.default_rng(3)
    n = 40
    yy, xx = np.mgrid[:n, :n]
    inside = np.hypot(yy - (n - 1) / 2, xx - (n - 1) / 2) <= n / 2 - 1
    hu = rng.normal(-1000.0, 40.0, (6, n, n)).astype(np.float32)
    hu[:, np.hypot(yy - n / 2, xx - n / 2) < n / 4] = 40.0  # the head
    hu[:, ~inside] = -1000.0
    assert hu.min() < -1000.0
    assert np.array_equal(reconstruction_field(hu), inside)
    # Padded with the minimum, as a scanner's padding value usually is.
    hu[:, ~inside] = -3024.0
    assert np.array_equal(reconstruction_field(hu), inside)
    # No padding: the whole slice.
    assert reconstruction_field(rng.normal(0.0, 10.0, (6, n, n))).all()


def test_extend_beyond_field_in_place_takes_the_nearest_value_inside() -> None:
    hu, outside = truncated_head()
    from scipy import ndimage

    iy, ix = ndimage.distance_transform_edt(outside, return_distances=False, return_indices=True)
    expected = hu[:, iy, ix]
    extend_beyond_field(hu, ~outside)
    assert np.array_equal(hu, expected)


def test_classical_path_restores_its_input_and_slabs_keep_the_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The field is extended in place and undone; with the watershed's context
    covering the volume, thin slabs give the whole-volume labels exactly, and
    with the default context (5 mm) nearly so."""
    hu, _ = truncated_head()
    original = hu.copy()
    monkeypatch.setattr(rotational, "WATERSHED_CONTEXT_MM", 1000.0)
    whole = classical_tissues(hu, SPACING)  # one slab of flooding: the whole volume
    assert np.array_equal(hu, original)
    assert (whole == CLASS_VESSEL).any() and (whole == CLASS_BONE).any()
    monkeypatch.setattr(rotational, "SLAB", 6)
    assert np.array_equal(classical_tissues(hu, SPACING), whole)
    monkeypatch.setattr(rotational, "WATERSHED_CONTEXT_MM", 5.0)
    sliced = classical_tissues(hu, SPACING)
    assert dice(sliced == CLASS_VESSEL, whole == CLASS_VESSEL) > 0.95
    assert dice(sliced == CLASS_BONE, whole == CLASS_BONE) > 0.95
    assert np.array_equal(hu, original)


# --------------------------------------------------------------------------- pipeline


def check_outputs(result, hu: np.ndarray) -> tuple[SegmentationOutput, ImageOutput]:
    seg, dla, mip = result.outputs
    assert isinstance(seg, SegmentationOutput) and seg.geometry == "volume"
    assert seg.masks.shape == (3, *hu.shape) and seg.masks.dtype == bool
    assert [(s.code.value, s.code.scheme) for s in seg.segments] == [
        ("59820001", "SCT"),
        ("272673000", "SCT"),
        ("87784001", "SCT"),
    ]
    assert not (seg.masks.sum(axis=0) > 1).any()  # one class per voxel
    assert not seg.masks[2][hu < -500].any()  # air is not soft tissue
    assert (
        isinstance(dla, ImageOutput) and dla.geometry == "volume" and dla.pixels.shape == hu.shape
    )
    assert np.array_equal(dla.pixels[seg.masks[0]], hu[seg.masks[0]])
    assert (dla.pixels[~seg.masks[0]] == AIR_HU).all()
    assert mip.rgb.ndim == 3 and mip.rgb.shape[2] == 3 and mip.rgb.dtype == np.uint8
    return seg, dla


def test_pipeline_classical_outputs() -> None:
    hu, truth = synthetic_head()
    result = RotationalDLA()(volume_run(hu), PipelineContext())
    seg, _ = check_outputs(result, hu)
    assert seg.algorithm.family == "classical"
    assert dice(seg.masks[0], truth == CLASS_VESSEL) > 0.8


def test_pipeline_model_path_runs_dense(tmp_path: Path) -> None:
    hu, _ = synthetic_head(slices=8, size=32)
    model = random_bn_model(width=4)
    pkg = write_package(
        tmp_path / "dla",
        model=model,
        name="test-dla",
        version="0.0.1",
        architecture_name="dla_resnet",
        config={"width": 4},
        pipeline=NAME,
        metrics={},
        data={"synthetic": True},
        model_card="untrained test package",
        training_command="pytest",
        dataset_manifest_hash="0" * 64,
    )
    result = RotationalDLA()(volume_run(hu), PipelineContext(model_package=str(pkg)))
    seg, _ = check_outputs(result, hu)
    assert seg.algorithm.family == "model"
    expected = classify_dense(model, hu, torch.device("cpu"))
    assert np.array_equal(seg.masks[0], expected == CLASS_VESSEL)
    assert np.array_equal(seg.masks[1], expected == CLASS_BONE)


def test_pipeline_refuses_2d_runs() -> None:
    meta = RunMeta(
        modality="XA",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.12.1",
        rows=32,
        columns=32,
        number_of_frames=8,
    )
    with pytest.raises(Exception, match="needs a volume"):
        RotationalDLA()(Run(np.zeros((8, 32, 32), np.float32), meta), PipelineContext())


# --------------------------------------------------------------------------- DICOM


def ct_sources(hu: np.ndarray, reverse: bool = False) -> list[Dataset]:
    """The source CT series of ``hu`` (slices ascending in z, as the node decodes them)."""
    study, series, frame_of_ref = generate_uid(), generate_uid(), generate_uid()
    out = []
    for i in range(hu.shape[0]):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.FrameOfReferenceUID = frame_of_ref
        ds.PositionReferenceIndicator = ""
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "TEST^3D", "R1", "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID = "20260101", "120000", "1"
        ds.AccessionNumber, ds.ReferringPhysicianName = "", ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, i + 1
        ds.PatientPosition = "HFS"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [-20.0, -20.0, float(i * SPACING[0])]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [SPACING[1], SPACING[2]]
        ds.SliceThickness = SPACING[0]
        ds.KVP = "90"
        ds.AcquisitionNumber = 1
        ds.ContrastBolusAgent = "Iodinated contrast"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = hu.shape[1:]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
        ds.PixelData = np.round(hu[i]).astype(np.int16).tobytes()
        out.append(ds)
    return out


def dciodvfy_errors(path: Path) -> list[str]:
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools not installed")
def test_seg_angiogram_ct_series_and_mip_encode_valid(tmp_path: Path) -> None:
    import highdicom as hd

    from dicom_node.encode import encode_result
    from dicom_node.encode.common import EncodeContext

    hu, _ = synthetic_head(slices=12, size=40)
    sources = ct_sources(hu)
    run = volume_run(hu)
    result = RotationalDLA()(run, PipelineContext())
    assert result.outputs[0].masks[0].any()
    datasets = encode_result(result, run, EncodeContext(sources=sources, pipeline=NAME))
    paths = {}
    for ds in datasets:
        paths[ds.SOPInstanceUID] = tmp_path / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(paths[ds.SOPInstanceUID], enforce_file_format=True)
    ct = [ds for ds in datasets if ds.SOPClassUID == CTImageStorage]
    (seg_ds,) = [ds for ds in datasets if ds.SOPClassUID == pydicom.uid.SegmentationStorage]
    (mip,) = [ds for ds in datasets if ds.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage]
    # the result's quality report (pipelines.quality) besides the SEG and the MIP
    (report,) = [ds for ds in datasets if ds.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage]
    assert len(ct) == hu.shape[0] and len(datasets) == hu.shape[0] + 3
    for ds in [seg_ds, mip, report, *ct]:
        assert dciodvfy_errors(paths[ds.SOPInstanceUID]) == [], ds.SOPClassUID.name

    # The angiogram: new series on the source geometry, exact HU, references to its slice.
    angio = result.outputs[1].pixels
    for i, ds in enumerate(ct):
        back = pydicom.dcmread(paths[ds.SOPInstanceUID])
        assert back.FrameOfReferenceUID == sources[i].FrameOfReferenceUID
        assert back.SeriesInstanceUID != sources[i].SeriesInstanceUID
        assert list(back.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert [float(v) for v in back.ImagePositionPatient] == pytest.approx(
            [float(v) for v in sources[i].ImagePositionPatient], abs=1e-9
        )
        assert back.SourceImageSequence[0].ReferencedSOPInstanceUID == sources[i].SOPInstanceUID
        values = back.pixel_array * float(back.RescaleSlope) + float(back.RescaleIntercept)
        assert np.array_equal(values, np.round(angio[i]))
    # Deterministic UIDs: encoding again yields the same instances.
    again = encode_result(result, run, EncodeContext(sources=sources, pipeline=NAME))
    mine = (CTImageStorage, pydicom.uid.SecondaryCaptureImageStorage)
    assert [d.SOPInstanceUID for d in again if d.SOPClassUID in mine] == [
        d.SOPInstanceUID for d in datasets if d.SOPClassUID in mine
    ]

    # The SEG: three segments on the source Frame of Reference, masks as computed.
    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(paths[seg_ds.SOPInstanceUID]))
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert [seg.get_segment_description(i).segmented_property_type.value for i in (1, 2, 3)] == [
        "59820001",
        "272673000",
        "87784001",
    ]
    masks = result.outputs[0].masks
    got = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[str(ds.SOPInstanceUID) for ds in sources],
        segment_numbers=[1, 2, 3],
        ignore_spatial_locations=False,
    )
    assert np.array_equal(np.moveaxis(got, -1, 0).astype(bool), masks)

    mip_back = pydicom.dcmread(paths[mip.SOPInstanceUID])
    rgb = result.outputs[2].rgb  # as rendered; the quality band follows under it
    assert np.array_equal(mip_back.pixel_array[: rgb.shape[0]], rgb)
    assert mip_back.pixel_array.shape[0] > rgb.shape[0]


def test_volume_encoder_refuses_2d_images() -> None:
    from dicom_node.encode.common import EncodeContext
    from dicom_node.encode.volume import encode_volume

    hu, _ = synthetic_head(slices=6, size=32)
    ctx = EncodeContext(sources=ct_sources(hu), pipeline=NAME)
    with pytest.raises(ValueError, match="only \\(Z, Y, X\\) volumes"):
        encode_volume(ImageOutput("other", hu[0], "a 2D image"), ctx)
    with pytest.raises(ValueError, match="slices"):
        encode_volume(ImageOutput("dla_angiogram", hu[:4], "short", geometry="volume"), ctx)


def test_volume_encoder_orders_multiframe_source_frames(tmp_path: Path) -> None:
    """A single multi-frame source (3D XA / Enhanced CT) with frames stored top-down: slice i of
    the run (ascending z) references the right frame number."""
    from dicom_node.encode.common import EncodeContext
    from dicom_node.encode.volume import encode_volume

    hu, _ = synthetic_head(slices=6, size=32)
    src = ct_sources(hu)[0]
    src.SOPClassUID = pydicom.uid.XRay3DAngiographicImageStorage
    src.Modality = "XA"
    src.NumberOfFrames = 6
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = [0.8, 0.8]
    measures.SliceThickness = 0.8
    orientation = Dataset()
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PixelMeasuresSequence = [measures]
    shared.PlaneOrientationSequence = [orientation]
    src.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for k in range(6):  # frame 1 is the top slice
        pos = Dataset()
        pos.ImagePositionPatient = [-20.0, -20.0, float((5 - k) * 0.8)]
        item = Dataset()
        item.PlanePositionSequence = [pos]
        per_frame.append(item)
    src.PerFrameFunctionalGroupsSequence = per_frame
    out = encode_volume(
        ImageOutput("dla_angiogram", hu, "DLA angiogram", geometry="volume"),
        EncodeContext(sources=[src], pipeline=NAME),
    )
    assert [int(ds.SourceImageSequence[0].ReferencedFrameNumber) for ds in out] == [
        6,
        5,
        4,
        3,
        2,
        1,
    ]
    assert [float(ds.ImagePositionPatient[2]) for ds in out] == pytest.approx(
        [0, 0.8, 1.6, 2.4, 3.2, 4.0]
    )
    assert all(ds.RescaleType == "US" for ds in out)  # 3D XA values are not calibrated HU
    path = tmp_path / "slice.dcm"
    out[0].save_as(path, enforce_file_format=True)
    if shutil.which("dciodvfy"):
        assert dciodvfy_errors(path) == []


# --------------------------------------------------------------------------- training


def test_class_balanced_undersampling() -> None:
    """All vessel voxels plus as many bone and as many soft-tissue voxels (the paper's rule),
    as the training engine applies it inside each patch."""
    from training.tasks import VolumeTask

    classes = np.full(2000, CLASS_SOFT, np.uint8)
    classes[:10] = CLASS_VESSEL
    classes[10:110] = CLASS_BONE
    one_hot = torch.from_numpy(np.stack([classes == k for k in range(3)])[:, None]).float()
    keep = VolumeTask._balanced(one_hot, torch.ones_like(one_hot), np.random.default_rng(0))
    picked = keep[0, 0].bool().numpy()
    assert picked.sum() == 30 and picked[classes == CLASS_VESSEL].all()
    assert np.bincount(classes[picked], minlength=3).tolist() == [10, 10, 10]


def test_training_engine_runs_on_a_volume(tmp_path: Path) -> None:
    """The training engine's DLA task: class-balanced patches of a labelled volume,
    validation through the node's rotational pipeline."""
    from training.engine import TrainConfig, Trainer
    from training.phantom_dataset import case_from_run

    hu, truth = synthetic_head(slices=8, size=40, seed=3)
    case = case_from_run(
        "head",
        volume_run(hu),
        {"vessel": truth == CLASS_VESSEL, "bone": truth == CLASS_BONE},
        "volume",
    )
    cfg = TrainConfig(
        task="rotational_dla",
        model_config={"width": 4},
        epochs=1,
        steps_per_epoch=3,
        batch_size=2,
        patch=16,
        progress=False,
        device="cpu",
    )
    trainer = Trainer(cfg, [case], [case], tmp_path)
    trainer.fit()
    assert trainer.state["step"] == 3 and np.isfinite(trainer.state["history"][-1]["loss"])
    agg, _, pred = trainer.validate()
    assert pred is not None and pred["vessel"].shape == hu.shape
    assert 0.0 <= agg["dice"]["mean"] <= 1.0 and "bone_dice" in agg


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools not installed")
@pytest.mark.parametrize("form", ["ct", "xa3d"])
def test_phantom_files_through_decode_pipeline_and_encode(tmp_path: Path, form: str) -> None:
    """The phantom as a C-arm exports it (CT series or one X-Ray 3D Angiographic Image),
    decoded by the node, segmented, encoded: every object valid, slices on the source grid."""
    from dicom_node.encode import encode_result
    from dicom_node.encode.common import EncodeContext
    from dicom_node.runs import load_run
    from training.phantoms import rotational

    folder = rotational.generate(5, size=32).write(tmp_path / "in")[0].parent
    files = (
        sorted((folder / "rotational_ct").glob("*.dcm"))
        if form == "ct"
        else [folder / "rotational_3dxa.dcm"]
    )
    loaded = load_run(files)
    result = RotationalDLA()(loaded.run, PipelineContext())
    datasets = encode_result(
        result, loaded.run, EncodeContext(sources=loaded.headers, pipeline=NAME)
    )
    ct = [ds for ds in datasets if ds.SOPClassUID == CTImageStorage]
    assert len(ct) == 32
    source_uids = {str(h.SOPInstanceUID) for h in loaded.headers}
    for ds in [d for d in datasets if d.SOPClassUID != CTImageStorage] + [ct[0], ct[-1]]:
        path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == [], ds.SOPClassUID.name
    assert all(ds.SourceImageSequence[0].ReferencedSOPInstanceUID in source_uids for ds in ct)
    assert all(ds.FrameOfReferenceUID == loaded.headers[0].FrameOfReferenceUID for ds in ct)
    z = [float(ds.ImagePositionPatient[2]) for ds in ct]
    assert np.all(np.diff(z) > 0)  # ascending, like the decoded run


def test_fill_holes_equals_scipy() -> None:
    from scipy import ndimage

    rng = np.random.default_rng(4)
    filled = 0
    for _ in range(5):
        mask = ndimage.gaussian_filter(rng.random((20, 24, 28)), 1.5) > 0.5
        expected = ndimage.binary_fill_holes(mask)
        filled += int((expected & ~mask).sum())
        assert np.array_equal(fill_holes(mask), expected)
    assert filled > 0  # the masks had holes to fill


def test_distance_tests_in_blocks_equal_the_whole_volume_transform() -> None:
    from scipy import ndimage

    rng = np.random.default_rng(5)
    spacing = (0.9, 0.6, 0.7)
    for density in (0.002, 0.3, 0.7):
        smooth = ndimage.gaussian_filter(rng.random((30, 26, 34)), 2.5)
        mask = smooth > np.quantile(smooth, 1.0 - density)
        mask[:, :2] = False  # a bounding box smaller than the array
        near = ndimage.distance_transform_edt(~mask, sampling=spacing) <= 2.0
        far = ndimage.distance_transform_edt(mask, sampling=spacing) > 2.0
        for threads in (1, 3):  # blocks one after the other, and at once
            assert np.array_equal(rotational.within(mask, 2.0, spacing, 4, threads), near)
            assert np.array_equal(rotational.farther_than(mask, 2.0, spacing, 4, threads), far)
        # The lean transform is scipy's, bit for bit.
        whole = ndimage.distance_transform_edt(mask, sampling=spacing)
        assert np.array_equal(rotational._edt(mask, spacing), whole)
        assert np.array_equal(rotational.within(mask, 2.0, spacing), near)
        assert np.array_equal(rotational.farther_than(mask, 2.0, spacing), far)
        assert far.any() or density < 0.01


def test_enhanced_3d_xa_is_read_in_hu_like_the_ct_series(tmp_path: Path) -> None:
    """The Enhanced 3D XA object carries its rescale in the Pixel Value Transformation
    functional group, not at the top level (where pydicom's modality LUT looks):
    both encodings of one volume must give the same HU, the phantom's."""
    from dicom_node.runs import load_run
    from training.phantoms import rotational as phantom

    ph = phantom.generate(5, size=48)
    files = ph.write(tmp_path)
    enhanced = next(f for f in files if f.name == "rotational_3dxa.dcm")
    assert "RescaleIntercept" not in pydicom.dcmread(enhanced, stop_before_pixels=True)
    hu = load_run([enhanced]).run.pixels
    series = load_run(sorted(enhanced.parent.glob("rotational_ct/*.dcm"))).run.pixels
    assert np.array_equal(hu, series)
    assert np.abs(hu - np.clip(np.round(ph.hu), -1024, 3071)).max() <= 1.0
