"""Domain-randomised phantoms: priors honoured, truth exact, DICOM valid, defaults unchanged.

Small matrices and few frames keep the file fast; the randomisation does not
depend on size except for the drawn matrix, which is tested on the draws alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from scipy import ndimage
from skimage.draw import polygon2mask

from training.phantoms import (
    appearance,
    cerebral,
    cli,
    coronary,
    dsa,
    priors,
    rotational,
    timing,
)
from training.phantoms.errors import PhantomOptionError

DCIODVFY = shutil.which("dciodvfy")
SIZE = (96, 128)
DOCS = Path(__file__).resolve().parents[1] / "docs" / "phantoms.md"


def dciodvfy_errors(path: Path) -> list[str]:
    out = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def _one(files: list[Path], name: str) -> Path:
    (match,) = [f for f in files if f.name == name]
    return match


# --- the draws -------------------------------------------------------------------------------


def test_draws_cover_the_priors():
    """Over many seeds the DSA draws span each documented range and stay inside it."""
    pri = priors.DSA
    draws = [appearance.draw_dsa(s, pri, None, native=False) for s in range(300)]
    rows = np.array([d.rows for d in draws])
    cols = np.array([d.cols for d in draws])
    assert rows.min() >= 512 and cols.max() <= 1024 and (rows != cols).mean() > 0.2
    assert {d.bits for d in draws} == {10, 12, 14, 16}
    assert {d.shutter.shapes for d in draws if d.shutter} == {
        ("RECTANGULAR",),
        ("POLYGONAL",),
        ("CIRCULAR",),
        ("CIRCULAR", "RECTANGULAR"),
    }
    fps = np.array([d.fps[0] for d in draws])
    assert fps.min() == 1.0 and fps.max() == 30.0
    assert 0.5 in {d.fps[1] for d in draws}
    snr = np.array([d.snr for d in draws])
    assert pri.snr[0] <= snr.min() and snr.max() <= pri.snr[1] and snr.max() / snr.min() > 5
    spacing = np.array([d.field_mm / max(d.rows, d.cols) for d in draws])
    assert spacing.min() < 0.15 and spacing.max() > 0.45
    for name in ("jpeg_quality", "grid", "shutter", "blank", "partial_filling"):
        present = np.mean([getattr(d, name) is not None for d in draws])
        assert 0.1 < present < 0.95, name
    assert any(d.misregistration != (0.0, 0.0, 0.0) for d in draws)
    assert {d.flip for d in draws} == {True, False}
    # Native runs feed a log subtraction: lossless and at least 12 bits.
    native = [appearance.draw_dsa(s, pri, None, native=True) for s in range(60)]
    assert all(d.jpeg_quality is None and d.bits >= 12 for d in native)


def test_anatomy_variation_and_3d_contrast_cover_the_priors():
    variations = [cerebral.draw_variation(s, priors.AnatomyPriors()) for s in range(200)]
    assert {len(v.aneurysm_radii_mm) for v in variations} == {0, 1, 2}
    assert {v.stenoses for v in variations} == {0, 1, 2}
    scale = [v.calibre_scale for v in variations]
    assert min(scale) < 0.85 and max(scale) > 1.2
    contrast = [appearance.draw_rotational(s, priors.ROTATIONAL).contrast_hu for s in range(200)]
    assert min(contrast) < 300 and max(contrast) > 2000
    cor = [appearance.draw_coronary(s, priors.CORONARY, None, "left") for s in range(100)]
    assert min(c.fps[0] for c in cor) == 7.5 and max(c.fps[0] for c in cor) == 30.0


def test_randomise_is_checked():
    with pytest.raises(PhantomOptionError):
        dsa.generate(1, size=64, frames=3, randomise=priors.CORONARY)
    with pytest.raises(PhantomOptionError):
        dsa.generate(1, size=(64, 4000), frames=3, randomise=True)


def test_priors_table_is_in_the_docs():
    """docs/phantoms.md carries exactly the tables the code's priors print."""
    assert priors.tables() in DOCS.read_text()


# --- determinism and defaults ----------------------------------------------------------------


def test_randomised_runs_are_deterministic_per_seed():
    a = dsa.generate(3, size=SIZE, frames=5, randomise=True)
    b = dsa.generate(3, size=SIZE, frames=5, randomise=True)
    c = dsa.generate(4, size=SIZE, frames=5, randomise=True)
    np.testing.assert_array_equal(a.pixels, b.pixels)
    for key in a.truth:
        np.testing.assert_array_equal(a.truth[key], b.truth[key])
    assert a.appearance == b.appearance and a.appearance != c.appearance
    assert a.options["randomise"] == b.options["randomise"]
    narrow = dataclasses.replace(priors.DSA, snr=(30.0, 30.0))
    d = dsa.generate(3, size=SIZE, frames=5, randomise=narrow)
    assert d.appearance["snr"] == 30.0 and d.options["randomise"] != a.options["randomise"]


def test_default_appearance_has_no_randomised_parts():
    p = dsa.generate(3, size=SIZE, frames=4)
    assert p.presentation is None and p.appearance is None and "randomise" not in p.options
    assert p.pixels.shape[1:] == SIZE and p.truth["field"].all() and not p.truth["overlay"].any()
    assert p.pixel_spacing_mm[0] == pytest.approx(dsa.FOV_MM / max(SIZE))
    c = coronary.generate(3, size=64, frames=3)
    assert c.presentation is None and c.truth["field"].all() and not c.truth["device"].any()


# --- truth stays exact -----------------------------------------------------------------------


_CLEAN = dataclasses.replace(
    priors.DSA, jpeg_p=0.0, text_p=0.0, marker_p=0.0, misregistration_p=0.0, shutter_p=0.0
)


def test_dsa_truth_matches_the_noise_free_image():
    """Noise-free randomised runs: arteries are dark at their peak, background flat."""
    for seed in (5, 6, 7):
        p = dsa.generate(seed, size=SIZE, frames=10, noise=False, devices=False, randomise=_CLEAN)
        offset, gain = p.presentation.scale
        assert gain <= 1000.0 * 2.0 ** (p.presentation.bits_stored - 12) * 2.0
        signal = (offset - p.pixels.astype(float)) / gain  # attenuation units
        assert (p.pixels[0] == round(offset)).all(), "the mask subtracts to the offset"
        art = p.truth["artery"]
        big = art & ~p.truth["vein"] & (p.truth["diameter_mm"] > 2.0)
        assert big.any()
        assert np.median(signal.max(axis=0)[big]) > 0.05
        near = ndimage.binary_dilation(art | p.truth["vein"], iterations=3)
        empty = ~near & (p.region_labels == 0)
        assert np.abs(signal.max(axis=0)[empty]).max() < 0.02


def test_shutter_clears_the_truth_and_is_written_to_dicom(tmp_path):
    pri = dataclasses.replace(_CLEAN, shutter_p=1.0, blank_p=0.0)
    for seed, kind in zip((1, 2, 3, 4), priors.SHUTTER_KINDS, strict=True):
        kind_pri = dataclasses.replace(pri, shutter_kinds=(kind,))
        p = dsa.generate(seed, size=SIZE, frames=4, native=True, noise=False, randomise=kind_pri)
        field = p.truth["field"]
        assert 0.1 < field.mean() < 0.99
        for key in ("artery", "vein", "ica", "device", "dro_interior"):
            assert not (p.truth[key] & ~field).any(), key
        assert np.isnan(p.truth["cbf"][~field]).all() and (p.region_labels[~field] == 0).all()
        # The blades cut the primary beam: far fewer quanta behind them.
        inner = ndimage.binary_erosion(field, iterations=4)
        outer = ~ndimage.binary_dilation(field, iterations=4)
        assert np.median(p.pixels[0][outer]) < 0.6 * np.median(p.pixels[0][inner])
        ds = pydicom.dcmread(_one(p.write(tmp_path / kind), "native.dcm"))
        assert np.array_equal(_field_from_dicom(ds), field), kind


def _field_from_dicom(ds: pydicom.Dataset) -> np.ndarray:
    """The exposed field as the Display Shutter module describes it (1-based pixels)."""
    rows, cols = int(ds.Rows), int(ds.Columns)
    r, c = np.mgrid[1 : rows + 1, 1 : cols + 1]
    inside = np.ones((rows, cols), bool)
    shapes = list(np.atleast_1d(ds.ShutterShape))
    if "RECTANGULAR" in shapes:
        inside &= (c >= ds.ShutterLeftVerticalEdge) & (c <= ds.ShutterRightVerticalEdge)
        inside &= (r >= ds.ShutterUpperHorizontalEdge) & (r <= ds.ShutterLowerHorizontalEdge)
    if "CIRCULAR" in shapes:
        cr, cc = (int(v) for v in ds.CenterOfCircularShutter)
        inside &= (r - cr) ** 2 + (c - cc) ** 2 <= int(ds.RadiusOfCircularShutter) ** 2
    if "POLYGONAL" in shapes:
        verts = np.asarray(ds.VerticesOfThePolygonalShutter, float).reshape(-1, 2) - 1.0
        inside &= polygon2mask((rows, cols), verts)
    return inside


def test_misregistration_moves_the_mask_not_the_live_frames():
    still = dataclasses.replace(_CLEAN, misregistration_p=0.0)
    moved = dataclasses.replace(_CLEAN, misregistration_p=1.0, misregistration_mm=(2.0, 2.0))
    a = dsa.generate(8, size=SIZE, frames=6, native=True, noise=False, randomise=still)
    b = dsa.generate(8, size=SIZE, frames=6, native=True, noise=False, randomise=moved)
    np.testing.assert_array_equal(a.pixels[1:], b.pixels[1:])
    assert not np.array_equal(a.pixels[0], b.pixels[0])
    shift_px = np.hypot(*b.truth["motion_px"][0, :2]) * b.pixel_spacing_mm[0]
    assert shift_px == pytest.approx(2.0, rel=1e-4)
    assert not b.truth["motion_px"][1:].any()
    np.testing.assert_array_equal(a.truth["artery"], b.truth["artery"])


def test_text_and_jpeg_leave_their_marks():
    pri = dataclasses.replace(_CLEAN, text_p=1.0, marker_p=1.0, jpeg_p=1.0)
    p = dsa.generate(9, size=(128, 160), frames=4, randomise=pri)
    overlay = p.truth["overlay"]
    assert overlay.any() and not (p.truth["artery"] & overlay).any()
    assert p.presentation.burned_in and p.presentation.bits_stored == 8
    assert p.pixels.max() <= 255 and p.presentation.lossy_ratio > 1.5


def test_stenosis_narrows_the_truth():
    v = cerebral.draw_variation(0, priors.AnatomyPriors())
    v = dataclasses.replace(v, stenoses=2, aneurysm_radii_mm=(4.0,), tortuosity_mm=0.0)
    plain = cerebral.build(0, dataclasses.replace(v, stenoses=0, aneurysm_radii_mm=()))
    varied = cerebral.build(0, v)
    assert len(varied.stenoses) == 2 and len(varied.aneurysms) == 1
    ratio = varied.arteries.radius / plain.arteries.radius
    for _, severity, _ in varied.stenoses:
        assert np.isclose(ratio, 1.0 - severity, atol=0.02).any()
    assert ratio.min() > 0.1 and (ratio < 0.999).sum() < 0.05 * len(ratio)
    # The 2D truth is drawn from the narrowed radii: the diameter map shows the lesion.
    proj_kwargs = dict(size=160, frames=4, noise=False, devices=False)
    a = dsa.generate(0, randomise=_CLEAN, **proj_kwargs)
    assert a.truth["diameter_mm"].max() > 0


def _variation(seed: int) -> cerebral.Variation:
    return cerebral.draw_variation(seed, priors.AnatomyPriors())


def test_aneurysm_sac_is_drawn_and_labelled():
    seed = next(s for s in range(50) if _variation(s).aneurysm_radii_mm)
    p = dsa.generate(seed, size=160, frames=8, noise=False, randomise=_CLEAN)
    anatomy = cerebral.build(seed, _variation(seed))
    assert anatomy.aneurysms
    vol = rotational.generate(seed, size=64, noise=False, streaks=False, randomise=True)
    labels = vol.truth["labels"]
    for centre, radius, _ in anatomy.aneurysms:
        idx = np.rint((centre - vol.origin_mm) / vol.spacing_mm[0]).astype(int)[::-1]
        if np.all((idx >= 0) & (idx < labels.shape[0])) and radius > vol.spacing_mm[0]:
            assert labels[tuple(idx)] == 1
    assert p.truth["artery"].sum() > 0


def test_rotational_contrast_can_exceed_bone():
    pri = dataclasses.replace(priors.ROTATIONAL, contrast_hu=(2800.0, 3000.0), bits=(16,))
    p = rotational.generate(5, size=48, noise=False, streaks=False, randomise=pri)
    labels, clean = p.truth["labels"], p.truth["hu_clean"]
    assert np.median(clean[labels == 1]) > np.median(clean[labels == 2])
    assert p.bits_stored == 16 and p.hu.max() > 2000
    frac = p.truth["vessel_fraction"]
    inside = labels != 0
    np.testing.assert_array_equal(labels[inside] == 1, frac[inside] >= 0.5)
    low = dataclasses.replace(priors.ROTATIONAL, contrast_hu=(200.0, 220.0), bits=(12,))
    q = rotational.generate(5, size=48, noise=False, streaks=False, randomise=low)
    assert np.median(q.truth["hu_clean"][q.truth["labels"] == 1]) < 250
    assert q.hu.max() <= 3071


def test_rotational_skull_base_can_be_porous():
    """Septa around air cells in the petrous bone, mastoid and clivus; the other draws
    are the same as with a solid skull base."""
    solid = dataclasses.replace(priors.ROTATIONAL, skull_base_porosity=(0.0, 0.0))
    porous = dataclasses.replace(
        priors.ROTATIONAL, skull_base_porosity=(0.6, 0.6), skull_base_cell_hu=(-900.0, -900.0)
    )
    a = rotational.generate(7, size=64, noise=False, streaks=False, randomise=solid)
    b = rotational.generate(7, size=64, noise=False, streaks=False, randomise=porous)
    cells = (a.truth["labels"] == 2) & (b.truth["labels"] == 0)
    assert 0.01 < cells.sum() / (a.truth["labels"] == 2).sum() < 0.6
    clear = cells & (b.truth["vessel_fraction"] == 0)  # no vessel partly in the voxel
    assert clear.any() and (b.truth["hu_clean"][clear] == -900.0).all()
    np.testing.assert_array_equal(a.truth["labels"] == 1, b.truth["labels"] == 1)
    skull_base = ("skull_base_porosity", "skull_base_cell_mm", "skull_base_cell_hu")
    assert {k: v for k, v in a.appearance.items() if k not in skull_base} == {
        k: v for k, v in b.appearance.items() if k not in skull_base
    }


def test_coronary_truth_follows_every_frame():
    """Panning, breathing and irregular timing: the vessel truth is where the vessels are."""
    pri = dataclasses.replace(
        priors.CORONARY,
        pan_mm=(20.0, 25.0),
        breathing_mm=(10.0, 15.0),
        jpeg_p=0.0,
        text_p=0.0,
        marker_p=0.0,
        shutter_p=0.0,
        frame_jitter=(0.03, 0.03),
    )
    p = coronary.generate(4, size=(112, 96), frames=12, noise=False, randomise=pri)
    assert p.pixels.shape == (12, 112, 96) and p.truth["vessel"].shape == p.pixels.shape
    steps = np.diff(p.frame_times_s)
    assert steps.std() > 0, "irregular timing"
    centroids = []
    for k in range(12):
        v = p.truth["vessel"][k] & (p.truth["diameter_mm"][k] > 1.2)
        if v.sum() < 5:
            continue
        img = p.pixels[k].astype(float)
        ring = ndimage.binary_dilation(v, iterations=3) & ~ndimage.binary_dilation(
            p.truth["vessel_geometry"][k] | p.truth["catheter"][k] | p.truth["device"][k],
            iterations=1,
        )
        assert np.median(img[v]) < np.median(img[ring]), k
        centroids.append(np.argwhere(p.truth["vessel_geometry"][k]).mean(axis=0))
    assert len(centroids) >= 4
    assert np.ptp(np.asarray(centroids), axis=0).max() > 3, "the pan moves the truth"


def test_protocol_schedule_reaches_the_venous_phase():
    rng = np.random.default_rng(0)
    times, (fast, slow) = timing.protocol_schedule(20, (30.0, 2.0), 1.0, 12.0, rng, 0.05, True)
    assert len(times) == 20 and times[0] == 0 and np.all(np.diff(times) > 0)
    assert times[-1] >= 12.0 * 0.8 and fast == 30.0 and slow < 2.0
    const, _ = timing.protocol_schedule(10, (4.0, 4.0), 1.0, 1.0, rng)
    np.testing.assert_allclose(const, np.arange(10) / 4.0)


# --- DICOM -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, list[Path]]:
    root = tmp_path_factory.mktemp("randomised")
    full = dataclasses.replace(priors.DSA, shutter_p=1.0, text_p=1.0, jpeg_p=1.0)
    cine = dataclasses.replace(
        priors.CORONARY, shutter_p=1.0, text_p=1.0, ecg_p=1.0, guidewire_p=1.0
    )
    return {
        "dsa": dsa.generate(11, size=SIZE, frames=5, randomise=full).write(root, seg=True),
        "native": dsa.generate(12, size=SIZE, frames=5, native=True, randomise=True).write(
            root / "native"
        ),
        "coronary": coronary.generate(13, size=(96, 112), frames=8, randomise=cine).write(
            root, seg=True
        ),
        "rotational": rotational.generate(14, size=40, randomise=True).write(root, seg=True),
    }


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (dicom3tools) not installed")
@pytest.mark.parametrize(
    "kind,name",
    [
        ("dsa", "dsa.dcm"),
        ("dsa", "dsa_seg.dcm"),
        ("native", "native.dcm"),
        ("coronary", "coronary.dcm"),
        ("coronary", "coronary_seg.dcm"),
        ("rotational", "rotational_3dxa.dcm"),
        ("rotational", "CT0001.dcm"),
    ],
)
def test_randomised_files_pass_dciodvfy(written, kind, name):
    assert dciodvfy_errors(_one(written[kind], name)) == []


def test_randomised_headers_describe_the_pixels(written):
    ds = pydicom.dcmread(_one(written["dsa"], "dsa.dcm"))
    assert (ds.Rows, ds.Columns) == SIZE
    assert ds.LossyImageCompression == "01" and ds.LossyImageCompressionMethod == "ISO_10918_1"
    assert ds.BurnedInAnnotation == "YES" and ds.BitsStored == 8
    assert "ShutterShape" in ds and "ShutterPresentationValue" in ds
    cine = pydicom.dcmread(_one(written["coronary"], "coronary.dcm"))
    assert cine.BitsStored in (8, 10, 12, 16) and (cine.Rows, cine.Columns) == (96, 112)
    truth = np.load(_one(written["coronary"], "coronary_truth.npz"))
    assert np.array_equal(_field_from_dicom(cine), truth["field"])
    assert truth["device"].any(), "the guidewire is a device"
    seg = hd.seg.segread(_one(written["coronary"], "coronary_seg.dcm"))
    sc = pydicom.dcmread(_one(written["coronary"], "coronary_minip_sc.dcm"))
    masks = seg.get_pixels_by_source_instance([sc.SOPInstanceUID], combine_segments=False)[0]
    np.testing.assert_array_equal(masks[..., 0].astype(bool), truth["vessel"].any(axis=0))
    vol = pydicom.dcmread(_one(written["rotational"], "rotational_3dxa.dcm"))
    assert vol.BitsStored in (12, 16)


def test_cli_randomise(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    cli.configure_parser(parser)
    for out in ("a", "b"):
        args = ["dsa", "--output", str(tmp_path / out), "--size", "96x128", "--frames", "4"]
        assert cli.run(parser.parse_args([*args, "--count", "2", "--randomise"])) == 0
    files_a = sorted((tmp_path / "a").rglob("*.dcm"))
    files_b = sorted((tmp_path / "b").rglob("*.dcm"))
    assert len(files_a) == 2
    for fa, fb in zip(files_a, files_b, strict=True):
        da, db = pydicom.dcmread(fa), pydicom.dcmread(fb)
        assert da.PixelData == db.PixelData and da.SOPInstanceUID == db.SOPInstanceUID
        assert (da.Rows, da.Columns) == (96, 128)
    plain = tmp_path / "plain"
    args = ["dsa", "--output", str(plain), "--size", "96x128", "--frames", "4"]
    assert cli.run(parser.parse_args(args)) == 0
    (file_plain,) = plain.rglob("*.dcm")
    assert pydicom.dcmread(file_plain).SOPInstanceUID != pydicom.dcmread(files_a[0]).SOPInstanceUID
    bad = ["rotational", "--output", str(tmp_path / "r"), "--size", "32x40"]
    assert cli.run(parser.parse_args(bad)) == 2
    assert "one number" in capsys.readouterr().err


def test_render_tree_with_boxes_touching_the_grid_but_no_pixel():
    """A device just outside a zoomed field: its box reaches the grid, no pixel is covered."""
    from training.phantoms.raster import Projection, render_tree
    from training.phantoms.vessels import VesselTree

    proj = Projection(np.array([1.0, 0, 0]), np.array([0, 0, -1.0]), np.zeros(3), 1.0, 16)
    pts = np.array([[-8.2, 0.0, 0.0], [-8.2, 0.0, -6.0]])  # column -0.7, radius 0.15 px
    tree = VesselTree(
        pts, np.array([-1, 0]), np.full(2, 0.15), np.zeros(2), np.zeros(2, np.uint8), ("x",)
    )
    img = render_tree(tree, proj, np.zeros(2, int), 1)
    assert img.thickness_mm.shape == (1, 16, 16) and not img.cover.any()
