"""Phantoms: determinism, truth consistency, timing, DICOM validity and round trips.

Small sizes keep the file fast; the physics and anatomy do not depend on size.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from scipy import ndimage

from pipelines.base import Run
from training.phantoms import cli, coronary, dsa, physics, rotational
from training.phantoms.canvas import canvas_uids
from training.phantoms.errors import PhantomOptionError

DCIODVFY = shutil.which("dciodvfy")
DCMCJPEG = shutil.which("dcmcjpeg")
SIZE = 96


def dciodvfy_errors(path: Path) -> list[str]:
    out = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True)
    lines = (out.stdout + out.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]


@pytest.fixture(scope="module")
def dsa_sub() -> dsa.DSAPhantom:
    return dsa.generate(7, size=SIZE, frames=12)


@pytest.fixture(scope="module")
def dsa_clean() -> dsa.DSAPhantom:
    return dsa.generate(7, size=SIZE, frames=12, noise=False)


@pytest.fixture(scope="module")
def written(tmp_path_factory, dsa_sub) -> dict[str, list[Path]]:
    root = tmp_path_factory.mktemp("phantoms")
    out = {
        "dsa": dsa_sub.write(root / "explicit", seg=True),
        "native": dsa.generate(7, size=SIZE, frames=12, native=True).write(root / "explicit"),
        "coronary": coronary.generate(3, size=SIZE, frames=10).write(root / "explicit", seg=True),
        "rotational": rotational.generate(5, size=40).write(root / "explicit", seg=True),
    }
    return out


def _one(files: list[Path], name: str) -> Path:
    matches = [f for f in files if f.name == name]
    assert len(matches) == 1, f"{name} not among {[f.name for f in files]}"
    return matches[0]


# --- determinism ---------------------------------------------------------------------------


def _cli(kind: str, out: Path, *extra: str) -> int:
    parser = argparse.ArgumentParser()
    cli.configure_parser(parser)
    return cli.run(parser.parse_args([kind, "--output", str(out), "--size", str(SIZE), *extra]))


def test_cli_is_deterministic(tmp_path):
    for name in ("a", "b"):
        assert _cli("dsa", tmp_path / name, "--count", "2", "--seed", "11", "--frames", "6") == 0
    files_a = sorted((tmp_path / "a").rglob("*.dcm"))
    files_b = sorted((tmp_path / "b").rglob("*.dcm"))
    assert [f.relative_to(tmp_path / "a") for f in files_a] == [
        f.relative_to(tmp_path / "b") for f in files_b
    ]
    assert len(files_a) == 2
    uids = set()
    for fa, fb in zip(files_a, files_b, strict=True):
        da, db = pydicom.dcmread(fa), pydicom.dcmread(fb)
        assert da.PixelData == db.PixelData
        for key in (
            "StudyInstanceUID",
            "SeriesInstanceUID",
            "SOPInstanceUID",
            "PatientID",
            "PatientName",
        ):
            assert da[key].value == db[key].value
        uids.add(da.SOPInstanceUID)
        assert da.PatientName == f"PHANTOM^DSA^{int(da.PatientID[-6:]):04d}"
    assert len(uids) == 2  # two seeds, two instances


def test_seeds_and_options_change_identity(dsa_sub):
    other = dsa.generate(8, size=SIZE, frames=12)
    assert not np.array_equal(other.pixels, dsa_sub.pixels)
    native = dsa.generate(7, size=SIZE, frames=12, native=True)
    from training.phantoms.dicom_xa import _dsa_dataset

    a, _ = _dsa_dataset(dsa_sub)
    b, _ = _dsa_dataset(native)
    c, _ = _dsa_dataset(other)
    assert a.StudyInstanceUID == b.StudyInstanceUID  # one patient, one study
    assert a.SeriesInstanceUID != b.SeriesInstanceUID
    assert a.PatientID != c.PatientID


def test_anatomy_does_not_depend_on_size():
    small, large = (
        dsa.generate(4, size=64, frames=4, noise=False),
        dsa.generate(4, size=128, frames=4, noise=False),
    )
    # Same vessels: the downsampled large artery mask overlaps the small one well.
    down = large.truth["artery"].reshape(64, 2, 64, 2).any(axis=(1, 3))
    overlap = (down & small.truth["artery"]).sum() / small.truth["artery"].sum()
    assert overlap > 0.8


# --- DSA truth and physics -------------------------------------------------------------------


def test_dsa_arrays_and_truth(dsa_sub):
    p = dsa_sub
    t = len(p.frame_times_s)
    assert p.pixels.shape == (t, SIZE, SIZE) and p.pixels.dtype == np.uint16
    assert p.mask_pixels is None
    for key in ("artery", "vein", "ica", "device"):
        assert p.truth[key].shape == (SIZE, SIZE) and p.truth[key].dtype == bool
    assert p.truth["artery"].any() and p.truth["vein"].any() and p.truth["ica"].any()
    assert not (p.truth["ica"] & ~p.truth["artery"]).any()
    assert (p.truth["artery"] & p.truth["vein"]).any(), (
        "arteries and veins should overlap in projection"
    )
    outside = p.region_labels == 0
    assert 0 < outside.sum() < outside.size
    for key in ("cbf", "cbv", "mtt", "tmax", "ttp"):
        m = p.truth[key]
        assert m.dtype == np.float32 and m.shape == (SIZE, SIZE)
        assert np.isnan(m[outside]).all() and np.isfinite(m[~outside]).all()
    inside = ~outside
    np.testing.assert_allclose(
        p.truth["cbv"][inside], p.truth["cbf"][inside] * p.truth["mtt"][inside] / 60, rtol=1e-5
    )
    assert (p.truth["ttp"][inside] > p.truth["tmax"][inside]).all()
    for r in p.regions:
        sel = p.region_labels == r.label
        if sel.any():
            assert np.allclose(p.truth["cbf"][sel], r.cbf) and np.allclose(
                p.truth["tmax"][sel], r.delay_s
            )
        assert r.residue in ("exponential", "box", "gamma")
    assert p.aif.shape == (t,) and p.aif.max() > 0.3 and p.aif[0] == 0


def test_vessels_are_dark_and_background_flat(dsa_clean):
    p = dsa_clean
    assert (p.pixels[0] == 2048).all(), "the mask frame subtracts to exactly the offset"
    minip = p.pixels.min(axis=0).astype(float)
    big = p.truth["ica"] & ~p.truth["vein"]
    near_vessel = ndimage.binary_dilation(
        p.truth["artery"] | p.truth["vein"] | p.truth["device"], iterations=2
    )
    nothing = ~near_vessel & (p.region_labels == 0)  # two pixels of margin for the system blur
    assert minip[big].mean() < 2048 - 300
    assert np.abs(minip[nothing] - 2048).max() <= 6
    blush = (p.region_labels > 0) & ~p.truth["artery"] & ~p.truth["vein"]
    assert minip[blush].mean() < 2048 - 3, "the capillary blush must be visible"


def test_blush_follows_each_regions_tissue_curve():
    p = dsa.generate(5, size=128, frames=48, fps=4, noise=False, devices=False, lesion=True)
    signal = 2048.0 - p.pixels.astype(float)
    clear = p.truth["dro_interior"] & ~ndimage.binary_dilation(
        p.truth["artery"] | p.truth["vein"], iterations=1
    )
    t_fine = p.timing["t_fine_s"]
    checked = 0
    for i, region in enumerate(p.regions):
        sel = clear & (p.region_labels == region.label)
        if sel.sum() < 10:
            continue
        measured = signal[:, sel].mean(axis=1)
        expected = np.interp(p.frame_times_s, t_fine, p.timing["tissue_fine"][i])
        assert np.corrcoef(measured, expected)[0, 1] > 0.98, region
        # The measured peak sits on the truth curve's peak (box residues have a plateau).
        assert expected[np.argmax(measured)] >= 0.97 * expected.max(), region
        assert abs(t_fine[np.argmax(p.timing["tissue_fine"][i])] - p.truth["ttp"][sel][0]) < 1e-3
        checked += 1
    assert checked >= 3
    assert {r.state for r in p.regions} & {"hypoperfused", "core"}


def test_noise_follows_requested_snr():
    clean = dsa.generate(2, size=SIZE, frames=16, fps=4, noise=False, devices=False)
    sig = []
    for snr in (20.0, 50.0):
        p = dsa.generate(2, size=SIZE, frames=16, fps=4, snr=snr, devices=False)
        pre = p.frame_times_s < p.timing["bolus_arrival_s"] - 0.1
        assert pre.sum() >= 2
        brain = p.truth["tissue_path_mm"] > 0
        noise = p.pixels[1].astype(float)[brain] - 2048.0
        # The SNR is defined on the median noise over the brain: a robust (MAD) sigma.
        sigma = 1.4826 * np.median(np.abs(noise - np.median(noise)))
        sig.append(sigma)
        peak = (2048.0 - clean.pixels.min(axis=0).astype(float))[clean.truth["ica"]]
        measured = np.percentile(peak, 99) / sigma
        assert 0.75 * snr < measured < 1.33 * snr, (snr, measured)
    assert 1.8 < sig[0] / sig[1] < 3.2


def test_native_subtracts_to_the_dsa_variant():
    sub = dsa.generate(6, size=SIZE, frames=8, noise=False)
    nat = dsa.generate(6, size=SIZE, frames=8, native=True, noise=False)
    assert nat.mask_pixels.shape == (1, SIZE, SIZE) and nat.pixels.dtype == np.uint16
    run = nat.to_run(subtract=True)
    brain = nat.truth["tissue_path_mm"] > 0
    diff = np.abs(run.pixels[:, brain] - sub.pixels[:, brain].astype(np.float32))
    assert diff.mean() < 2.0
    assert run.meta.subtracted and not nat.to_run(subtract=False).meta.subtracted
    assert (
        nat.pixels[3].std() > 10 * sub.pixels[3].std() / 10
    )  # skull and tissue are in the native frames


def test_motion_leaves_skull_edge_artefacts():
    still = dsa.generate(9, size=SIZE, frames=8, noise=False, devices=False)
    moved = dsa.generate(9, size=SIZE, frames=8, noise=False, devices=False, motion_mm=5.0)
    assert np.abs(moved.truth["motion_px"][-1, :2]).max() * moved.pixel_spacing_mm[0] > 2.0
    late = moved.pixels[-1].astype(float) - still.pixels[-1].astype(float)
    assert np.abs(late).max() > 200


def test_a_jerking_head_moves_in_steps_and_stretches_on_a_course_of_its_own():
    times = np.arange(80) * 0.25
    track = physics.motion_track(times, 2.0, np.random.default_rng(4), "jerks")
    assert track.shape == (80, 4) and not track[0].any()
    steps = np.hypot(*np.diff(track[:, :2], axis=0).T)
    assert steps.max() > 0.3  # mm between two frames 0.25 s apart: a jerk
    assert 1.0 < np.hypot(*track[-1, :2]) < 3.0
    assert (
        track[-1, 3] != 0 and np.flatnonzero(track[:, 3])[0] != np.flatnonzero(steps > 0.3)[0] + 1
    )
    drift = physics.motion_track(times, 2.0, np.random.default_rng(4))
    assert not drift[:, 3].any() and np.hypot(*np.diff(drift[:, :2], axis=0).T).max() < 0.3
    with pytest.raises(ValueError, match="motion kind"):
        physics.motion_track(times, 2.0, np.random.default_rng(4), "wobble")
    with pytest.raises(PhantomOptionError, match="motion_kind"):
        dsa.generate(9, size=64, frames=4, motion_mm=2.0, motion_kind="wobble")
    moved = dsa.generate(9, size=64, frames=12, noise=False, motion_mm=2.0, motion_kind="jerks")
    assert moved.truth["motion_px"].shape == (12, 4) and moved.options["motion_kind"] == "jerks"


def test_options_are_checked():
    with pytest.raises(PhantomOptionError):
        dsa.generate(1, size=16)
    with pytest.raises(PhantomOptionError):
        dsa.generate(1, size=64, frames=4, view="oblique")
    with pytest.raises(PhantomOptionError):
        dsa.generate(1, size=64, frame_times_s=[0.5, 1.0])


# --- timing ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 3])
def test_venous_phase_follows_arteries_by_3_to_6_s(seed):
    p = dsa.generate(seed, size=64, frames=60, fps=4, noise=False, devices=False)
    signal = 2048.0 - p.pixels.astype(float)
    ica = p.truth["ica"] & ~p.truth["vein"]
    sinus = p.truth["vein"] & ~p.truth["artery"] & (p.truth["diameter_mm"] > 4)
    t = p.frame_times_s
    lag = t[np.argmax(signal[:, sinus].mean(axis=1))] - t[np.argmax(signal[:, ica].mean(axis=1))]
    assert 3.0 <= lag <= 6.0
    assert abs(lag - p.timing["venous_delay_s"]) <= 0.6


def test_variable_frame_rate_in_frame_time_vector(written, dsa_sub):
    ds = pydicom.dcmread(_one(written["dsa"], "dsa.dcm"))
    steps = np.diff(dsa_sub.frame_times_s)
    assert steps.max() > 1.5 * steps.min(), "default protocol is fast then slow"
    assert ds.FrameIncrementPointer == pydicom.tag.Tag("FrameTimeVector")
    vec = np.array([float(v) for v in ds.FrameTimeVector])
    assert vec[0] == 0 and len(vec) == ds.NumberOfFrames
    np.testing.assert_allclose(np.cumsum(vec) / 1000.0, dsa_sub.frame_times_s, atol=1e-3)


def test_constant_rate_uses_frame_time(tmp_path):
    p = dsa.generate(1, size=64, frames=6, fps=1.0)
    ds = pydicom.dcmread(_one(p.write(tmp_path), "dsa.dcm"))
    assert (
        ds.FrameIncrementPointer == pydicom.tag.Tag("FrameTime") and float(ds.FrameTime) == 1000.0
    )
    np.testing.assert_allclose(p.frame_times_s, np.arange(6.0))


# --- DICOM -----------------------------------------------------------------------------------


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (dicom3tools) not installed")
@pytest.mark.parametrize(
    "kind,name",
    [
        ("dsa", "dsa.dcm"),
        ("dsa", "dsa_minip_sc.dcm"),
        ("dsa", "dsa_seg.dcm"),
        ("native", "native.dcm"),
        ("coronary", "coronary.dcm"),
        ("coronary", "coronary_seg.dcm"),
        ("rotational", "rotational_3dxa.dcm"),
        ("rotational", "CT0001.dcm"),
        ("rotational", "rotational_seg.dcm"),
    ],
)
def test_dciodvfy_reports_no_errors(written, kind, name):
    assert dciodvfy_errors(_one(written[kind], name)) == []


def test_headers_look_like_a_c_arm(written, dsa_sub):
    ds = pydicom.dcmread(_one(written["dsa"], "dsa.dcm"))
    assert ds.SOPClassUID == dsa.XA_SOP_CLASS and ds.Modality == "XA"
    assert list(ds.ImageType) == ["DERIVED", "PRIMARY", "SINGLE PLANE", "SUBTRACTION"]
    mag = float(ds.EstimatedRadiographicMagnificationFactor)
    assert mag == pytest.approx(
        float(ds.DistanceSourceToDetector) / float(ds.DistanceSourceToPatient), rel=1e-4
    )
    assert float(ds.ImagerPixelSpacing[0]) / mag == pytest.approx(
        dsa_sub.pixel_spacing_mm[0], rel=1e-4
    )
    for key in (
        "KVP",
        "PositionerPrimaryAngle",
        "PositionerSecondaryAngle",
        "XRayTubeCurrent",
        "ContrastBolusAgent",
    ):
        assert key in ds
    native = pydicom.dcmread(_one(written["native"], "native.dcm"))
    assert native.MaskSubtractionSequence[0].MaskOperation == "AVG_SUB"
    assert list(np.atleast_1d(native.MaskSubtractionSequence[0].MaskFrameNumbers)) == [1]
    assert native.RecommendedViewingMode == "SUB" and native.BitsStored == 16


@pytest.mark.parametrize("encoding", ["rle", "jpeg-lossless"])
def test_compressed_files_decode_to_the_same_pixels(tmp_path, dsa_sub, encoding):
    if encoding == "jpeg-lossless" and DCMCJPEG is None:
        pytest.skip("dcmcjpeg (dcmtk) not installed")
    ds = pydicom.dcmread(_one(dsa_sub.write(tmp_path, encoding=encoding), "dsa.dcm"))
    assert ds.file_meta.TransferSyntaxUID.is_compressed
    np.testing.assert_array_equal(ds.pixel_array, dsa_sub.pixels)
    vol = rotational.generate(5, size=32)
    files = vol.write(tmp_path / "vol", encoding=encoding)
    xa = pydicom.dcmread(_one(files, "rotational_3dxa.dcm"))
    ct = pydicom.dcmread(_one(files, "CT0010.dcm"))
    expected = np.clip(np.rint(vol.hu + 1024), 0, 4095).astype(np.uint16)
    np.testing.assert_array_equal(xa.pixel_array, expected)
    np.testing.assert_array_equal(ct.pixel_array, expected[9])
    if DCIODVFY is not None:
        assert dciodvfy_errors(_one(files, "rotational_3dxa.dcm")) == []


def test_seg_reads_back_as_the_truth(written, dsa_sub):
    sc = pydicom.dcmread(_one(written["dsa"], "dsa_minip_sc.dcm"))
    xa = pydicom.dcmread(_one(written["dsa"], "dsa.dcm"))
    assert (sc.SeriesInstanceUID, sc.SOPInstanceUID, sc.FrameOfReferenceUID) == canvas_uids(
        xa.SOPInstanceUID
    )
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == xa.SOPInstanceUID
    np.testing.assert_array_equal(sc.pixel_array, dsa_sub.pixels.min(axis=0))
    seg = hd.seg.segread(_one(written["dsa"], "dsa_seg.dcm"))
    labels = [seg.get_segment_description(i).SegmentLabel for i in seg.segment_numbers]
    masks = seg.get_pixels_by_source_instance([sc.SOPInstanceUID], combine_segments=False)[0]
    expected = {
        "Artery": "artery",
        "Vein": "vein",
        "Internal carotid artery": "ica",
        "Device": "device",
    }
    for i, label in enumerate(labels):
        np.testing.assert_array_equal(masks[..., i].astype(bool), dsa_sub.truth[expected[label]])
    assert {"Artery", "Vein"} <= set(labels)


def test_volume_seg_reads_back_as_the_labels(written):
    files = written["rotational"]
    truth = np.load(_one(files, "rotational_truth.npz"))["labels"]
    seg = hd.seg.segread(_one(files, "rotational_seg.dcm"))
    ct = sorted((f for f in files if f.name.startswith("CT")), key=lambda f: f.name)
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in ct]
    masks = seg.get_pixels_by_source_instance(uids, combine_segments=False)
    for i, value in enumerate((1, 2, 3)):
        np.testing.assert_array_equal(masks[..., i].astype(bool), truth == value)


def test_truth_files_are_plain_numpy(written, dsa_sub):
    with np.load(_one(written["dsa"], "dsa_truth.npz"), allow_pickle=False) as z:
        np.testing.assert_array_equal(z["artery"], dsa_sub.truth["artery"])
        np.testing.assert_array_equal(z["frame_times_s"], dsa_sub.frame_times_s)
        assert set(z["regions"].dtype.names) >= {"label", "cbf", "mtt_s", "delay_s", "residue"}
    assert "artery" in _one(written["dsa"], "README.md").read_text()


# --- contract --------------------------------------------------------------------------------


def test_to_run_follows_the_pipeline_contract(dsa_sub):
    run = dsa_sub.to_run()
    assert (
        isinstance(run, Run)
        and run.pixels.dtype == np.float32
        and run.pixels.shape == dsa_sub.pixels.shape
    )
    m = run.meta
    assert (
        m.modality == "XA"
        and m.sop_class_uid == dsa.XA_SOP_CLASS
        and m.subtracted
        and not m.is_volume
    )
    assert (m.rows, m.columns, m.number_of_frames) == (SIZE, SIZE, len(dsa_sub.frame_times_s))
    np.testing.assert_array_equal(m.frame_times_s, dsa_sub.frame_times_s)
    assert m.pixel_spacing_mm == dsa_sub.pixel_spacing_mm and "SUBTRACTION" in m.image_type


# --- coronary and rotational -----------------------------------------------------------------


def test_coronary_cine_truth_moves_and_fills():
    p = coronary.generate(3, size=SIZE, frames=24)
    t = len(p.frame_times_s)
    assert p.pixels.shape == (t, SIZE, SIZE) and p.truth["vessel"].shape == (t, SIZE, SIZE)
    assert 12.4 <= 1.0 / np.diff(p.frame_times_s).mean() <= 15.1
    filled = p.truth["vessel"].sum(axis=(1, 2))
    assert filled[0] < filled.max() / 4, "the tree fills during the run"
    geom = p.truth["vessel_geometry"]
    moving = [(geom[k] ^ geom[k + 1]).sum() for k in range(t - 1)]
    assert max(moving) > 0.05 * geom[0].sum(), "cardiac motion moves the vessels"
    full = int(np.argmax(filled))
    assert p.pixels[full][p.truth["vessel"][full]].mean() < p.pixels[full][~geom[full]].mean() - 100
    run = p.to_run()
    assert not run.meta.subtracted and run.meta.frame_times_s.shape == (t,)
    assert len(p.r_wave_frames) >= 1


def test_rotational_labels_and_values():
    p = rotational.generate(5, size=40, noise=False, streaks=False)
    labels = p.truth["labels"]
    assert p.hu.shape == labels.shape == (40, 40, 40) and labels.dtype == np.uint8
    assert set(np.unique(labels)) == {0, 1, 2, 3}
    clean = p.truth["hu_clean"]
    assert clean[labels == 1].mean() > 300 and clean[labels == 2].mean() > 600
    assert abs(np.median(clean[labels == 3]) - 35) < 20 and clean[labels == 0].max() < -500
    run = p.to_run()
    assert run.meta.is_volume and run.meta.slice_spacing_mm == pytest.approx(117.76 / 40)


def test_cli_refuses_bad_combinations(tmp_path, capsys):
    assert _cli("coronary", tmp_path, "--native") == 2
    assert "--native" in capsys.readouterr().err


def test_truth_seg_references_the_canvas_the_node_delivers(tmp_path: Path) -> None:
    """Phantom annotations and node results share one canvas: same UID, same pixels."""
    import numpy as np
    from pydicom import dcmread

    from dicom_node.encode import encode_result
    from dicom_node.encode.common import EncodeContext
    from dicom_node.runs import load_run
    from pipelines.base import PipelineContext
    from pipelines.minip import MinIP

    written = dsa.generate(seed=4, size=96, frames=6).write(tmp_path, seg=True)
    xa = next(p for p in written if p.name == "dsa.dcm")
    truth_canvas = dcmread(next(p for p in written if p.name.endswith("_minip_sc.dcm")))
    seg = dcmread(next(p for p in written if p.name.endswith("_seg.dcm")))
    loaded = load_run([xa])
    result = MinIP()(loaded.run, PipelineContext())
    (node_canvas,) = encode_result(result, loaded.run, EncodeContext(loaded.headers, "minip"))
    assert node_canvas.SOPInstanceUID == truth_canvas.SOPInstanceUID
    assert np.array_equal(node_canvas.pixel_array, truth_canvas.pixel_array)
    refs = {
        r.ReferencedSOPInstanceUID
        for s in seg.ReferencedSeriesSequence
        for r in s.ReferencedInstanceSequence
    }
    assert refs == {node_canvas.SOPInstanceUID}
