"""Collimator shutters: the DICOM Shutter / X-Ray Collimator modules, the field found
from the pixels, and every 2D pipeline ignoring what lies outside it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from scipy import ndimage

from bench.shutter import octagon
from pipelines.base import PipelineContext, Run, RunMeta, Shutter
from pipelines.coronary import (
    CoronarySegmentation,
    classical_vessels,
    min_component_px,
    remove_small_components,
)
from pipelines.dsa_av import DsaArteryVein
from pipelines.shutter import (
    detect,
    exposed_field,
    fill_outside,
    from_header,
    margin_px,
    restrict,
    shutter_mask,
)
from tests.dicomgen import save, xa_run

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
GE_RF = REAL / "RF_RuboDEMO_GE-DRS_1024_ExplicitLE.dcm"
CORONARY_CINE = REAL / "XA_RuboDEMO_96f_512_JPEGBaseline.dcm"


def noisy_run(frames: int = 8, size: int = 128, seed: int = 0) -> np.ndarray:
    """Unsubtracted-looking frames: smooth anatomy, a moving dark vessel, quantum noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    anatomy = 1500 + 300 * np.sin(xx / 17.0) * np.cos(yy / 23.0)
    out = []
    for t in range(frames):
        vessel = np.abs(xx - size / 2 - 10 * np.sin((yy + 3 * t) / 11)) < 2.5
        out.append(anatomy - 250 * vessel + rng.normal(0, 20, (size, size)))
    return np.asarray(out, np.float32)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def meta_for(frames: np.ndarray, **kw: object) -> RunMeta:
    t, h, w = frames.shape
    return RunMeta(
        modality="XA",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.12.1",
        rows=h,
        columns=w,
        number_of_frames=t,
        **kw,  # type: ignore[arg-type]
    )


# --- the header ---------------------------------------------------------------


def test_rectangular_circular_and_polygonal_shutters_from_the_header() -> None:
    ds = Dataset()
    ds.ShutterShape = ["RECTANGULAR", "CIRCULAR", "POLYGONAL"]
    ds.ShutterLeftVerticalEdge, ds.ShutterRightVerticalEdge = 11, 90
    ds.ShutterUpperHorizontalEdge, ds.ShutterLowerHorizontalEdge = 6, 95
    ds.CenterOfCircularShutter = [51, 49]
    ds.RadiusOfCircularShutter = 45
    ds.VerticesOfThePolygonalShutter = [1, 1, 1, 100, 100, 100, 100, 1]
    shutter = from_header(ds)
    assert shutter is not None
    assert shutter.rectangle == (5.0, 94.0, 10.0, 89.0)  # 1-based rows/columns -> 0-based
    assert shutter.circle == (50.0, 48.0, 45.0)
    assert shutter.polygon[0] == (0.0, 0.0) and len(shutter.polygon) == 4
    assert set(shutter.shapes) == {"RECTANGULAR", "CIRCULAR", "POLYGONAL"}
    mask = shutter_mask(shutter, (100, 100))
    assert mask[50, 48] and not mask[50, 9] and not mask[4, 48] and not mask[95, 48]
    assert not mask[10, 12]  # inside the rectangle, outside the circle


def test_collimator_module_and_enhanced_functional_groups() -> None:
    ds = Dataset()
    ds.CollimatorShape = "RECTANGULAR"
    ds.CollimatorLeftVerticalEdge, ds.CollimatorRightVerticalEdge = 21, 200
    ds.CollimatorUpperHorizontalEdge, ds.CollimatorLowerHorizontalEdge = 31, 180
    assert from_header(ds) == Shutter(rectangle=(30.0, 179.0, 20.0, 199.0))
    item = Dataset()
    item.ShutterShape = "CIRCULAR"
    item.CenterOfCircularShutter = [65, 65]
    item.RadiusOfCircularShutter = 60
    shared = Dataset()
    shared.FrameDisplayShutterSequence = [item]
    enhanced = Dataset()
    enhanced.SharedFunctionalGroupsSequence = [shared]
    assert from_header(enhanced) == Shutter(circle=(64.0, 64.0, 60.0))


def test_unusable_shutter_values_are_ignored_not_raised() -> None:
    ds = Dataset()
    ds.ShutterShape = "RECTANGULAR"
    ds.ShutterLeftVerticalEdge = 10  # the other three edges are missing
    assert from_header(ds) is None
    ds = Dataset()
    ds.ShutterShape = "CIRCULAR"
    ds.CenterOfCircularShutter = [10, 10]
    ds.RadiusOfCircularShutter = 0
    assert from_header(ds) is None
    assert from_header(Dataset()) is None


def test_the_decoder_puts_the_shutter_on_the_run(tmp_path: Path) -> None:
    from dicom_node.runs import load_run

    ds = xa_run(frames=4, rows=64, cols=64)
    ds.ShutterShape = "CIRCULAR"
    ds.CenterOfCircularShutter = [33, 33]
    ds.RadiusOfCircularShutter = 28
    run = load_run([save(ds, tmp_path)]).run
    assert run.meta.shutter == Shutter(circle=(32.0, 32.0, 28.0))
    plain = load_run([save(xa_run(frames=4), tmp_path, "plain.dcm")]).run
    assert plain.meta.shutter is None


@pytest.mark.skipif(not GE_RF.exists(), reason="../shared/data/real is not present")
def test_real_file_combined_circular_and_rectangular_shutter() -> None:
    ds = dcmread(GE_RF)
    shutter = from_header(ds)
    assert shutter is not None and shutter.rectangle and shutter.circle
    pixels = ds.pixel_array.astype(np.float32)
    dicom = shutter_mask(shutter, pixels.shape)
    found = detect(pixels[None])
    assert found is not None
    # The header's field lies inside the collimated area the image shows.
    assert (dicom & ~found).mean() < 0.01 and iou(dicom, found) > 0.9
    # Behind the blades the image is black.
    assert np.percentile(pixels[~found], 95) < 10


# --- the image ----------------------------------------------------------------


def test_blanked_octagon_is_found_from_the_pixels() -> None:
    frames = noisy_run()
    field = octagon(*frames.shape[1:])
    frames[:, ~field] = 0.0
    found = detect(frames)
    assert found is not None and iou(found, field) > 0.95


def test_blanked_field_is_found_past_burned_in_text_and_a_scale_bar() -> None:
    """Text burned into the blanked corners, touching the field, and a scale bar drawn
    across the blanked area into the field, hold one value through the run: the field
    is still the convex octagon (the old code took the text in, found the field not
    convex and gave up)."""
    frames = noisy_run(size=160)
    field = octagon(*frames.shape[1:])
    frames[:, ~field] = 0.0
    text = np.zeros(field.shape, bool)
    for row in (3, 11, 19):  # three lines of 4 x 5 px glyphs in each top corner
        for col in (*range(2, 62, 6), *range(100, 156, 6)):
            text[row : row + 5, col : col + 4] = True
            text[row + 1 : row + 4, col + 1 : col + 3] = False
    text &= ~field  # burned onto the blanked area, up to the field's edge
    text[115:123, 0:60:10] = True  # a scale bar from the image edge into the field
    text[120:123, 0:60] = True
    frames[:, text] = 3000.0
    found = detect(frames)
    assert found is not None and iou(found, field) > 0.95
    # Less the margin (the blades' penumbra): the octagon. Glyphs that touch its edge
    # may leave a bump a few pixels wide; no text farther out stays in it.
    inner = exposed_field(frames, meta_for(frames)).mask
    assert inner.sum() > 0.85 * field.sum() and (inner & ~field).sum() < 0.005 * field.sum()
    assert not (inner & text & ~ndimage.binary_dilation(field, iterations=4)).any()


def test_dark_physical_circular_shutter_is_found_from_its_edge() -> None:
    frames = noisy_run(size=160)
    yy, xx = np.mgrid[:160, :160]
    field = (yy - 80) ** 2 + (xx - 85) ** 2 <= 70**2
    shadow = ndimage.gaussian_filter((~field).astype(np.float32), 1.5)
    rng = np.random.default_rng(1)
    frames = frames * (1 - 0.9 * shadow) + rng.normal(0, 5, frames.shape) * shadow
    found = detect(frames.astype(np.float32))
    assert found is not None and iou(found, field) > 0.9


def test_no_shutter_no_field_and_noise_free_runs_are_left_alone() -> None:
    frames = noisy_run()
    assert detect(frames) is None
    # A noise-free object on a flat background (a digital reference object): the
    # background is flat at the border's value, like a blanked shutter, but so is
    # everything else: no noise says nothing about blades.
    yy, xx = np.mgrid[:128, :128]
    clean = np.zeros((6, 128, 128), np.float32)
    clean[:, (yy - 64) ** 2 + (xx - 64) ** 2 < 40**2] = 1000.0
    for t in range(6):
        clean[t, (np.abs(xx - 64) < 3) & (yy < 64 + 8 * t)] = 400.0
    assert detect(clean, subtracted=True) is None
    field = exposed_field(frames, meta_for(frames))
    assert not field.collimated and field.mask.all()
    assert fill_outside(frames, field) is frames
    masks = np.ones(frames.shape, bool)
    assert restrict(masks, field) is masks


def test_dicom_and_image_fields_are_intersected_less_a_margin() -> None:
    frames = noisy_run()
    field = octagon(128, 128)
    frames[:, ~field] = 0.0
    half = Shutter(rectangle=(0.0, 127.0, 0.0, 63.0))  # the left half of the image
    result = exposed_field(frames, meta_for(frames, shutter=half))
    assert result.source == "dicom+image"
    assert not result.mask[:, 64:].any()
    inner = ndimage.binary_erosion(field & shutter_mask(half, (128, 128)), iterations=1)
    assert (result.mask & ~inner).sum() == 0  # never larger than both
    gone = (inner & ~result.mask).sum() / inner.sum()
    assert 0 < gone < 0.35  # the margin of margin_px pixels and no more
    assert margin_px((128, 128)) >= 4


def test_fill_outside_leaves_the_field_and_removes_the_blade_step() -> None:
    frames = noisy_run()
    field_mask = octagon(128, 128)
    frames[:, ~field_mask] = 0.0
    field = exposed_field(frames, meta_for(frames))
    filled = fill_outside(frames, field)
    assert np.array_equal(filled[:, field.mask], frames[:, field.mask])
    edge = ndimage.binary_dilation(field.mask, iterations=3) & ~field.mask
    # Across the field's edge the filled image stays at the field's level (no 1500-grey step).
    assert abs(float(np.median(filled[:, edge])) - float(np.median(frames[:, field.mask]))) < 300


# --- the pipelines ------------------------------------------------------------


@pytest.fixture(scope="module")
def collimated_coronary() -> tuple[Run, np.ndarray, np.ndarray]:
    from training.phantoms import coronary

    ph = coronary.generate(3900, size=256, frames=24)
    run = ph.to_run()
    field = octagon(256, 256)
    pixels = run.pixels.copy()
    pixels[:, ~field] = 0.0  # blanked, as vendors store it
    return replace(run, pixels=pixels), field, np.asarray(ph.truth["vessel"], bool)


def test_coronary_reports_nothing_outside_the_field(
    collimated_coronary: tuple[Run, np.ndarray, np.ndarray],
) -> None:
    run, field, truth = collimated_coronary
    result = CoronarySegmentation()(run, PipelineContext())
    masks = result.outputs[0].masks[0]
    assert any("collimator shutter from image" in n for n in result.notes)
    assert not (masks & ~field[None]).any()
    inside = truth & field[None]
    assert iou(masks, inside) > 0.45
    # The classical path's top-hat does not answer a step, so even without the shutter
    # logic it leaves the blanked region and the blade edge alone (the temporal median
    # of version 1 painted them), and finds the same vessels inside.
    plain, _ = classical_vessels(run.pixels)
    plain = remove_small_components(plain, min_component_px(run.pixels.shape[1:]))
    assert (plain & ~field[None]).sum() < 100
    assert iou(masks, inside) > iou(plain, inside) - 0.02


def test_dsa_av_reports_nothing_outside_a_dicom_shutter() -> None:
    from training.phantoms import dsa

    ph = dsa.generate(5000, size=160, frames=10)
    run = ph.to_run()
    shutter = Shutter(circle=(80.0, 80.0, 60.0))
    run = replace(run, meta=replace(run.meta, shutter=shutter))
    result = DsaArteryVein()(run, PipelineContext())
    seg = result.outputs[0]
    assert not (seg.masks & ~shutter_mask(shutter, (160, 160))).any()
    assert any("collimator shutter from dicom" in n for n in result.notes)


@pytest.mark.skipif(not CORONARY_CINE.exists(), reason="../shared/data/real is not present")
def test_real_coronary_cine_octagon_is_found() -> None:
    from dicom_node.runs import load_run

    run = load_run([CORONARY_CINE]).run
    field = exposed_field(run.pixels, run.meta)
    assert field.source == "image"
    assert 0.65 < field.mask.mean() < 0.9
    mean = run.pixels.mean(axis=0)
    # The field holds no blanked pixel: everything there shows the patient.
    assert np.percentile(mean[field.mask], 0.1) > 10
    # Behind the blades: black, but for a flat grey strip along the left edge (a
    # semi-transparent blade or wedge filter's shadow, taken as collimation).
    outside = ~ndimage.binary_dilation(field.mask, iterations=2 * margin_px(mean.shape))
    assert np.mean(mean[outside] < 5) > 0.7
    assert np.percentile(mean[outside][mean[outside] >= 5], 99) < 80


@pytest.mark.parametrize(
    ("seed", "collimated"),
    [
        # Blanked to black, 8-bit JPEG, so quiet that quantisation leaves over a quarter
        # of the centre exactly flat (the old code took the run for noise-free).
        (941011, True),
        # Blanked to the subtraction's grey, with quiet areas at that grey inside the
        # field that are not constant through the run (the old code refused the field).
        (941012, True),
        # No shutter: the air around the head is quiet and at the border's value, but
        # not one stored value through the run (the old code took the head for a field).
        (941016, False),
        (941034, False),
    ],
)
def test_blanked_field_is_one_stored_value_through_the_run(seed: int, collimated: bool) -> None:
    """Randomised family A DSA runs (development seeds of the field finder, never used
    by a benchmark): blanking writes one stored value behind the blades, which no
    patient area holds exactly through a run."""
    from training.phantoms import dsa

    ph = dsa.generate(seed, randomise=True)
    run = ph.to_run()
    truth = np.asarray(ph.truth["field"], bool)
    assert truth.all() != collimated  # the generator drew what the case is about
    found = detect(run.pixels, run.meta.subtracted)
    if collimated:
        assert found is not None and iou(found, truth) > 0.9
    else:
        assert found is None


def subtracted_run(frames: int = 12, size: int = 160, seed: int = 0) -> np.ndarray:
    """Log-subtracted-looking frames: flat, quantum noise, a vessel that fills and empties."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    vessel = np.abs(xx - size / 2 - 12 * np.sin(yy / 13.0)) < 3
    fill = np.exp(-0.5 * ((np.arange(frames) - frames / 2) / 2.0) ** 2)
    out = 500.0 + rng.normal(0, 4, (frames, size, size))
    out[:, vessel] += 80.0 * fill[:, None]
    return out.astype(np.float32)


def test_physical_blade_in_a_subtracted_run_is_found_by_its_noise() -> None:
    """Subtraction cancels a blade's shadow, but fewer photons behind it leave more noise
    between frames: the field is found from that, where its edge is a step in the
    noise several times over. The same frames with an edge of only 1.2x (an anatomical
    edge) claim no field."""
    frames = subtracted_run()
    yy, xx = np.mgrid[:160, :160]
    field = (yy - 80) ** 2 + (xx - 85) ** 2 <= 70**2
    field &= (xx > 20) & (yy < 145)
    extra = np.random.default_rng(2).normal(0, 1, frames.shape).astype(np.float32)
    blade = frames + 4 * 3.0 * extra * (~field)  # noise 4 -> 4 * sqrt(1 + 9): about 3x
    found = detect(blade, subtracted=True)
    assert found is not None and iou(found, field) > 0.9
    assert exposed_field(blade, meta_for(blade, subtracted=True)).source == "image"
    faint = frames + 4 * 0.66 * extra * (~field)  # noise x 1.2
    assert detect(faint, subtracted=True) is None
    assert detect(frames, subtracted=True) is None
