"""DSA vessel pipelines: preprocessing, tiling, the two architectures, the classical
path, model packages through the pipelines, and the emitted objects (dciodvfy)."""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

import pipelines
from dicom_node.encode import encode_result
from dicom_node.encode.common import EncodeContext
from pipelines.base import ARTERY, ICA, VEIN, PipelineContext, PipelineError, Run, RunMeta
from pipelines.models.package import build, load_package, write_package
from pipelines.models.stunet import STUNet
from pipelines.models.vssnet import VSSNet
from pipelines.preprocess import (
    blend_window,
    normalise_dsa,
    resample_frames,
    resample_times,
    static_background,
    temporal_weights,
    tile_starts,
    tiled_apply,
    work_shape,
)
from pipelines.shutter import exposed_field
from pipelines.vessel_quality import MAX_TIMING_OVERLAP
from pipelines.vessels import (
    ClassicalParams,
    analyse,
    classical_av,
    motion_note,
    separate,
    smoothed_frames,
    threshold_vessels,
    timing_overlap,
    vessel_mask,
)
from tests.test_seg_encoder import xa_header

torch.set_num_threads(1)


# ---------------------------------------------------------------------------
# A small synthetic run: an arterial tree from the bottom edge, a venous tree
# from the left edge, gamma-variate inflow (arteries early, veins late), noise.


def _tube_thickness(shape: tuple[int, int], segments: list[tuple[float, ...]]) -> np.ndarray:
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    out = np.zeros(shape, np.float32)
    for x0, y0, x1, y1, r in segments:
        dx, dy = x1 - x0, y1 - y0
        t = np.clip(((xx - x0) * dx + (yy - y0) * dy) / (dx * dx + dy * dy), 0, 1)
        d = np.hypot(xx - (x0 + t * dx), yy - (y0 + t * dy))
        out = np.maximum(out, 2 * r * np.sqrt(np.clip(1 - (d / r) ** 2, 0, None)))
    return out


def _tree(
    rng: np.random.Generator,
    size: int,
    root: tuple[float, float],
    angle: float,
    radius: float,
    depth: int = 3,
) -> list[tuple[float, ...]]:
    segments, stack = [], [(root, angle, radius, 0)]
    while stack:
        (x, y), a, r, d = stack.pop()
        length = size * rng.uniform(0.15, 0.3) * 0.8**d
        x1, y1 = x + length * np.cos(a), y + length * np.sin(a)
        segments.append((x, y, x1, y1, r))
        if d < depth:
            stack += [
                ((x1, y1), a + s * rng.uniform(0.3, 0.7), max(0.75 * r, 1.0), d + 1)
                for s in (-1, 1)
            ]
    return segments


def gamma_variate(t: np.ndarray, arrival: float, peak: float) -> np.ndarray:
    s = np.clip(t - arrival, 0, None) / (peak - arrival)
    return s**3 * np.exp(3 * (1 - s))


def synthetic_dsa(
    seed: int = 0, size: int = 96, frames: int = 12, duration: float = 10.0
) -> tuple[Run, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    artery = _tube_thickness(
        (size, size),
        _tree(rng, size, (size * rng.uniform(0.4, 0.6), size - 1.0), -np.pi / 2, size / 45),
    )
    vein = _tube_thickness(
        (size, size), _tree(rng, size, (1.0, size * rng.uniform(0.3, 0.7)), 0.0, size / 50)
    )
    times = np.linspace(0, duration, frames)
    curve_a, curve_v = gamma_variate(times, 0.5, 3.0), gamma_variate(times, 3.5, 7.0)
    contrast = 0.12 * (artery[None] * curve_a[:, None, None] + vein[None] * curve_v[:, None, None])
    pixels = 2048 - 600 * contrast + rng.normal(0, 12, (frames, size, size))
    meta = RunMeta(
        modality="XA",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.12.1",
        rows=size,
        columns=size,
        number_of_frames=frames,
        frame_times_s=times,
        pixel_spacing_mm=(0.3, 0.3),
        subtracted=True,
    )
    return Run(pixels.astype(np.float32), meta), {"artery": artery > 0, "vein": vein > 0}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(int(a.sum() + b.sum()), 1))


# ---------------------------------------------------------------------------
# Preprocessing


def test_resample_to_one_fps_keeps_timing() -> None:
    times = np.arange(0, 10.01, 0.25)  # 4 fps over 10 s
    assert np.allclose(resample_times(times), np.arange(11))
    weights = temporal_weights(times, np.arange(11.0))
    assert np.allclose(weights.sum(axis=1), 1)
    # A linear ramp stays a ramp (interior: the tent average is symmetric there).
    ramp = weights @ (3 * times + 1)
    assert np.allclose(ramp[1:-1], 3 * np.arange(1, 10) + 1, atol=1e-9)
    # Upsampling (0.5 fps source) is linear interpolation.
    up = temporal_weights(np.arange(0, 9.0, 2.0), np.arange(9.0)) @ np.arange(0, 9.0, 2.0) ** 2
    assert np.allclose(
        up, np.interp(np.arange(9.0), np.arange(0, 9.0, 2.0), np.arange(0, 9.0, 2.0) ** 2)
    )
    frames = np.random.default_rng(0).random((len(times), 5, 6)).astype(np.float32)
    out, t_out = resample_frames(frames, times)
    assert out.shape == (11, 5, 6) and t_out is not None


def test_resample_bounds_sequence_length() -> None:
    assert len(resample_times(np.array([0.0, 0.5, 1.0, 1.5]))) == 4  # too short: 4 frames
    assert len(resample_times(np.linspace(0, 120, 200))) == 60  # too long: 60 frames
    frames = np.ones((3, 4, 4), np.float32)
    same, t = resample_frames(frames, None)
    assert same is frames and t is None  # timing is never guessed
    with pytest.raises(PipelineError):
        resample_times(np.array([0.0, 0.0, 1.0]))


def test_normalise_maps_background_to_zero_and_vessels_to_one() -> None:
    run, truth = synthetic_dsa(1)
    contrast = normalise_dsa(run.pixels)
    vessel = truth["artery"] | truth["vein"]
    assert abs(float(np.median(contrast[:, ~vessel]))) < 0.02
    assert 0.6 < float(np.percentile(contrast.max(axis=0)[vessel], 99)) < 1.5
    with pytest.raises(PipelineError, match="no contrast"):
        normalise_dsa(np.full((3, 8, 8), 100.0, np.float32))


def test_work_shape_uses_training_spacing_else_512() -> None:
    assert work_shape((1024, 1024), None, None) == (512, 512)
    assert work_shape((256, 256), None, None) == (256, 256)  # never upsampled
    assert work_shape((1024, 1024), (0.15, 0.15), 0.3) == (512, 512)
    assert work_shape((1024, 1024), (0.3, 0.3), 0.3) == (1024, 1024)  # then tiled


def test_tiles_cover_the_image_and_blend_weights_fade() -> None:
    assert tile_starts(100, 48, 16) == [0, 32, 52]
    assert tile_starts(40, 48, 16) == [0]
    w = blend_window((48, 48), 16)
    assert w[24, 24] == pytest.approx(1.0) and w[0, 24] < 0.05 and w.min() > 0


def test_tiled_equals_untiled_for_a_local_operator() -> None:
    x = torch.rand(3, 100, 90)

    def local(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(t[None], 3, 1, 1, count_include_pad=False)[0]

    whole, tiled = local(x), tiled_apply(local, x, tile=48, overlap=16)
    assert tiled.shape == whole.shape
    assert float((tiled - whole).abs().max()) < 0.01  # only tile-border pixels differ, faded out


def test_dense_tiled_inference_matches_untiled_model() -> None:
    torch.manual_seed(0)
    model = STUNet(widths=(4, 8, 16)).eval()
    x = torch.from_numpy(normalise_dsa(synthetic_dsa(2, size=112, frames=5)[0].pixels))

    def run(t: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(model(t[None]))[0]

    with torch.no_grad():
        whole = run(x)
        tiled = tiled_apply(run, x, tile=64, overlap=32)
    diff = (tiled - whole).abs()
    assert float(diff.mean()) < 0.05 * float(whole.std())
    assert float(diff.max()) < 0.5 * float(whole.std())


# ---------------------------------------------------------------------------
# Architectures


def test_st_unet_default_size_and_paper_scale() -> None:
    model = build("st_unet", {})
    params = sum(p.numel() for p in model.parameters())
    assert 10e6 < params <= 25e6
    assert len(model.temporal[0]) == 2  # two ConvGRU layers at every scale


@pytest.mark.parametrize("frames", [4, 60])
def test_variable_sequence_length(frames: int) -> None:
    torch.manual_seed(0)
    stunet, vss = STUNet(widths=(4, 8, 16)).eval(), VSSNet(widths=(4, 8, 16)).eval()
    x = torch.rand(1, frames, 30, 34)
    with torch.no_grad():
        av, ia = stunet(x), vss(x)
        reversed_av = stunet(x.flip(1))
    assert av.shape == (1, 2, 30, 34) and ia.shape == (1, 1, 30, 34)
    assert torch.isfinite(av).all() and torch.isfinite(ia).all()
    assert not torch.allclose(av, reversed_av)  # the order of frames matters (timing)


def test_stunet_chunked_streaming_equals_one_pass() -> None:
    """Inference streams frames in chunks; the GRU state makes that exact."""
    torch.manual_seed(0)
    model = STUNet(widths=(4, 8)).eval()
    x = torch.rand(1, 9, 16, 16)
    with torch.no_grad():
        model.chunk = 9
        one = model(x)
        model.chunk = 2
        chunked = model(x)
    assert torch.allclose(one, chunked, atol=1e-5)


def test_vssnet_deep_supervision_heads_and_gradients() -> None:
    model = VSSNet(widths=(4, 8, 16))
    outs = model.forward_all(torch.rand(2, 5, 24, 24))
    assert len(outs) == 2 and all(o.shape == (2, 1, 24, 24) for o in outs)
    sum(o.mean() for o in outs).backward()
    assert model.sfe[0].gru.forward_cell.conv_x.weight.grad is not None


# ---------------------------------------------------------------------------
# Classical path


def test_a_field_blanked_over_most_of_the_image_is_not_refused() -> None:
    """Blanked collimation over 60 % of a subtracted run: the frame median is the blanked
    value and nothing looks darker than it. The references then come from the pixels
    that change over the run (the old code refused the run: "no contrast")."""
    run, truth = synthetic_dsa(1)
    frames = run.pixels.copy()
    h, w = frames.shape[1:]
    frames[:, :, : int(0.6 * w)] = 0.0
    contrast = normalise_dsa(frames)
    vessel = (truth["artery"] | truth["vein"])[:, int(0.6 * w) :]
    right = contrast[:, :, int(0.6 * w) :]
    assert abs(float(np.median(right[:, ~vessel]))) < 0.02
    assert 0.6 < float(np.percentile(right.max(axis=0)[vessel], 99)) < 1.5


def test_burned_in_text_and_edges_that_moved_before_the_run_are_not_vessels() -> None:
    """What holds one value through the run (text burned into every frame; the edge of
    anatomy that moved between the mask and the first fill frame) is taken away
    before the vessels are looked for: it neither becomes a vessel nor joins the
    arteries as their earliest cluster."""
    run, truth = synthetic_dsa(0)
    frames = run.pixels.copy()
    size = frames.shape[1]
    static = np.zeros(frames.shape[1:], bool)
    for row in (6, 12):  # two lines of "text": strokes 1 px wide
        static[row : row + 4, 4 : size // 2 : 3] = True
        static[row, 4 : size // 2] = True
    edge = np.zeros_like(static)
    edge[size - 12 : size - 9, 8 : size - 8] = True  # a bright rim from frame 1 on
    scale = float(np.percentile(frames.max(axis=0) - frames.min(axis=0), 99.5))
    frames[:, static] = float(np.median(frames)) - 0.8 * scale
    frames[1:, edge] -= 0.6 * scale
    clear = ~ndimage.binary_dilation(truth["artery"] | truth["vein"], iterations=2)
    result = analyse(frames, run.meta.frame_times_s, run.meta.pixel_spacing_mm)
    assert not (result.vessel & (static | edge) & clear).any()
    assert dice(result.artery, truth["artery"]) > 0.6
    assert dice(result.vein, truth["vein"]) > 0.6


def test_a_late_blush_over_most_of_the_head_does_not_make_static_edges_vessels() -> None:
    """In the late frames the blush covers most of the image and each frame's median
    moves to it. A misregistered edge outside the blush (constant from frame 1 on)
    then seems to empty in those frames, survives the static-content removal and was
    called an early artery. The background from the stillest pixels
    (``static_background``) follows only the exposure, so the edge stays static."""
    run, truth = synthetic_dsa(0, frames=16)
    frames = run.pixels.copy()
    size = frames.shape[1]
    scale = float(np.percentile(frames.max(axis=0) - frames.min(axis=0), 99.5))
    blush = np.zeros(frames.shape[1:], bool)
    blush[size // 5 :, :] = True  # 80 % of the field
    late = gamma_variate(run.meta.frame_times_s, 4.0, 8.0)
    frames -= 0.15 * scale * late[:, None, None] * ndimage.gaussian_filter(blush * 1.0, 2)[None]
    edge = np.zeros_like(blush)
    edge[4:7, 8 : size - 8] = True  # a bright rim from frame 1 on, above the blush
    frames[1:, edge] -= 0.25 * scale
    frames += 5.0 * np.sin(np.arange(len(frames)))[:, None, None]  # exposure drift
    background = static_background(frames)
    assert background is not None
    assert np.abs(background - (2048 + 5.0 * np.sin(np.arange(len(frames))))).max() < 3.0
    median = np.median(frames.reshape(len(frames), -1), axis=1)
    assert (2048 - median).max() > 0.05 * scale  # the frame median follows the blush
    result = analyse(frames, run.meta.frame_times_s, run.meta.pixel_spacing_mm)
    assert not (result.vessel & edge).any()
    assert dice(result.artery, truth["artery"]) > 0.6


def test_faint_pixels_do_not_make_the_timing_clusters() -> None:
    """Development run 940020 (randomised family A): a noisy band above the head passes
    the vessel threshold with 3,181 pixels that peak at 0.01 of the densest vessel.
    Their timing is noise, spread over the run; they took the "early" cluster and the
    arteries became veins (A-Dice 0.08, V-Dice 0.59). The clusters now come from curves
    at least ten noise SDs high, and every curve is unmixed with their templates (0.34,
    0.65)."""
    from training.phantoms import dsa

    p = dsa.generate(940020, size=256, frames=20, randomise=True)
    run = p.to_run()
    field = exposed_field(run.pixels, run.meta)
    result = analyse(run.pixels, run.meta.frame_times_s, run.meta.pixel_spacing_mm, field=field)
    assert dice(result.artery, p.truth["artery"].astype(bool)) > 0.3
    assert dice(result.vein, p.truth["vein"].astype(bool)) > 0.6


def test_bone_edges_of_a_head_that_drifted_after_the_mask_are_not_vessels() -> None:
    """Family A development run 940110 with a 1 mm drift after the mask: the skull's rim,
    the face and the vertebrae became late "veins" (vessel precision 0.59). Their dark
    lobes give the drift's time course; vessel pixels that follow it are set aside, and
    the result says so. Without the drift nothing is set aside."""
    from training.phantoms import dsa

    for motion_mm in (1.0, 0.0):
        p = dsa.generate(940110, size=256, frames=20, motion_mm=motion_mm)
        run = p.to_run()
        field = exposed_field(run.pixels, run.meta)
        result = analyse(run.pixels, run.meta.frame_times_s, run.meta.pixel_spacing_mm, field=field)
        truth = p.truth["artery"].astype(bool) | p.truth["vein"].astype(bool)
        precision = (result.vessel & truth).sum() / max(int(result.vessel.sum()), 1)
        assert precision > 0.85, (motion_mm, precision)
        assert (result.moved > 1000) == (motion_mm > 0)
        assert bool(motion_note(result)) == (motion_mm > 0)


def test_a_wide_vessel_mask_reaches_the_lumen_edge_a_thin_one_does_not_grow() -> None:
    """A round lumen 9 px across and one 2 px across, projected and blurred as a detector
    blurs: the vesselness hysteresis keeps the wide one's core and leaves about a pixel
    of lumen out on each side (development runs: most of the missed true vessel wider
    than 2 mm lay within a pixel of the mask). The mask now reaches the wide lumen's
    edge, and the thin vessel, whose blur is wider than its lumen, is not widened."""
    shape = (96, 96)
    wide = _tube_thickness(shape, [(10.0, 30.0, 86.0, 30.0, 4.5)])
    thin = _tube_thickness(shape, [(10.0, 70.0, 86.0, 70.0, 1.0)])
    contrast = ndimage.gaussian_filter(wide / wide.max() + thin / thin.max(), 0.8)
    contrast += np.random.default_rng(3).normal(0.0, 0.01, shape)
    yy = np.mgrid[0 : shape[0], 0 : shape[1]][0]
    columns = slice(20, 76)  # away from the tubes' rounded ends

    def rows_marked(mask: np.ndarray, centre: int) -> int:
        band = mask[centre - 12 : centre + 13, columns]
        return int(np.median(band.sum(axis=0)))

    after, vesselness = vessel_mask(contrast, (1.0, 1.0))
    before = threshold_vessels(contrast, vesselness, (1.0, 1.0))
    lumen_rows = int(np.median((wide > 0)[:, columns].sum(axis=0)))
    assert lumen_rows == 9
    assert rows_marked(before, 30) <= lumen_rows - 2, rows_marked(before, 30)
    assert lumen_rows - 1 <= rows_marked(after, 30) <= lumen_rows + 1, rows_marked(after, 30)
    # Every pixel added is the wide vessel's, and the thin vessel is as it was.
    added = after & ~before
    assert added.any() and np.all(np.abs(yy[added] - 30) <= 5)
    assert rows_marked(after, 70) == rows_marked(before, 70)


def test_a_vessel_crossing_a_dense_blush_is_not_widened_into_it() -> None:
    """A smooth capillary blush, 0.4 of the densest vessel, filling between the arterial
    and the venous phase over most of the field. The MinIP holds it at every blush
    pixel, far above the noise floor, so the vessel mask around the veins that cross
    it spread into it. A vessel pixel now also stands above its surroundings in some
    frame (``standout``): the veins keep their width, the arteries are unchanged."""
    run, truth = synthetic_dsa(0, size=128, frames=16, duration=12.0)
    frames = run.pixels.copy()
    size = frames.shape[1]
    scale = float(np.percentile(frames.max(axis=0) - frames.min(axis=0), 99.5))
    region = np.zeros((size, size), bool)
    region[size // 6 : -size // 6, size // 6 : -size // 6] = True
    blush = ndimage.gaussian_filter(region * 1.0, 3)
    frames -= 0.4 * scale * gamma_variate(run.meta.frame_times_s, 2.0, 5.5)[:, None, None] * blush
    vessels = truth["artery"] | truth["vein"]
    found = {}
    for rule, params in (
        ("without", replace(ClassicalParams(), standout_sigmas=float("-inf"))),
        ("with", ClassicalParams()),
    ):
        found[rule] = analyse(frames, run.meta.frame_times_s, run.meta.pixel_spacing_mm, params)
    false = {rule: int((r.vessel & ~vessels & region).sum()) for rule, r in found.items()}
    assert false["without"] > 300  # the premise: without the rule the veins widen
    assert false["with"] < 0.5 * false["without"], false
    assert dice(found["with"].vein, truth["vein"]) > 0.8
    assert dice(found["with"].artery, truth["artery"]) >= (
        dice(found["without"].artery, truth["artery"]) - 0.01
    )


def test_a_vein_beside_an_artery_keeps_its_own_label() -> None:
    """A vein running one pixel beside an artery: the frames smoothed by a pixel (which
    steady the timing that finds the two clusters) blur the denser artery into the
    vein, which came out artery as well. Each pixel's own curve is what is unmixed, so
    each keeps its class; lone vessels are labelled as before."""
    times = np.arange(20, dtype=float)

    def bolus(t0: float) -> np.ndarray:
        t = np.clip(times - t0, 0, None)
        return (t / 3.0) ** 2 * np.exp(2.0 - 2.0 * t / 3.0)

    artery_curve, vein_curve = 2.0 * bolus(2.0), bolus(9.0)  # the artery the denser
    frames = np.zeros((20, 40, 64))
    for column, curve in (
        (10, artery_curve),
        (11, vein_curve),
        (30, artery_curve),
        (50, vein_curve),
    ):
        frames[:, 5:35, column] = curve[:, None]
    frames += np.random.default_rng(0).normal(0.0, 0.01, frames.shape)
    vessels = np.zeros(frames.shape[1:], bool)
    vessels[5:35, [10, 11, 30, 50]] = True
    column = np.nonzero(vessels)[1]
    smoothed = smoothed_frames(frames)[:, vessels]

    blurred = separate(smoothed, times, noise_sd=0.01)
    own = separate(smoothed, times, noise_sd=0.01, own=frames[:, vessels])
    for is_artery, is_vein, which in (*blurred, "blurred"), (*own, "own"):
        assert np.all(is_artery[column == 30]) and not np.any(is_vein[column == 30]), which
        assert np.all(is_vein[column == 50]) and not np.any(is_artery[column == 50]), which
    # Smoothed, the pair is mixed: the vein beside the denser artery counts as artery too.
    assert np.mean(blurred[0][column == 11]) > 0.9
    assert np.all(own[0][column == 10]) and not np.any(own[1][column == 10])
    assert np.all(own[1][column == 11]) and not np.any(own[0][column == 11])


def test_classical_av_separates_by_timing() -> None:
    scores = []
    for seed in range(3):
        run, truth = synthetic_dsa(seed)
        artery, vein = classical_av(run.pixels, run.meta.frame_times_s, run.meta.pixel_spacing_mm)
        assert artery.dtype == bool and artery.shape == truth["artery"].shape
        scores.append(
            (
                dice(artery, truth["artery"]),
                dice(vein, truth["vein"]),
                dice(artery | vein, truth["artery"] | truth["vein"]),
            )
        )
    a, v, vessel = np.mean(scores, axis=0)
    # A method that swaps arteries and veins, or thresholds noise, scores far lower.
    assert vessel > 0.75 and a > 0.7 and v > 0.7, scores


def test_classical_on_phantom_has_a_dice_floor() -> None:
    dsa = pytest.importorskip("training.phantoms.dsa")
    scores = []
    for seed in (5000, 5001):
        ph = dsa.generate(seed, size=256, frames=15)
        artery, vein = classical_av(
            ph.pixels.astype(np.float32), ph.frame_times_s, ph.pixel_spacing_mm
        )
        truth_a, truth_v = ph.truth["artery"], ph.truth["vein"]
        ica = analyse(ph.pixels.astype(np.float32), ph.frame_times_s, ph.pixel_spacing_mm).ica
        assert ica is not None
        scores.append(
            (
                dice(artery, truth_a),
                dice(vein, truth_v),
                dice(artery | vein, truth_a | truth_v),
                dice(ica, ph.truth["ica"]),
            )
        )
    a, v, vessel, ica_dice = np.mean(scores, axis=0)
    # Training seeds give A 0.49, V 0.68, vessel 0.64, ICA 0.86; swapping
    # arteries and veins, or a threshold on noise, falls far below these floors.
    assert a > 0.3 and v > 0.45 and vessel > 0.45 and ica_dice > 0.5, scores


def test_classical_without_timing_uses_frame_order() -> None:
    run, truth = synthetic_dsa(0)
    result = analyse(run.pixels, None, None)
    assert dice(result.artery, truth["artery"]) > 0.6


# ---------------------------------------------------------------------------
# Pipelines and model packages


def _dciodvfy_errors(ds, path: Path) -> list[str]:
    ds.save_as(path, enforce_file_format=True)
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def test_dsa_av_classical_outputs_and_dicom(tmp_path: Path) -> None:
    run, _ = synthetic_dsa(0)
    result = pipelines.get("dsa_av")(run, PipelineContext())
    seg, image, rendering = result.outputs
    assert [s.code for s in seg.segments] == [ARTERY, VEIN]
    assert seg.segments[0].color_rgb == (255, 0, 0) and seg.segments[1].color_rgb[2] == 255
    assert seg.algorithm.family == "classical" and seg.geometry == "canvas"
    assert image.key == "minip" and rendering.rgb.shape == (96, 96, 3)
    # Arteries are drawn red on the rendering.
    red = seg.masks[0] & ~seg.masks[1]
    assert rendering.rgb[red][:, 0].mean() > rendering.rgb[red][:, 2].mean() + 60

    sources = [xa_header(run.pixels.shape[0], 96, 96)]
    datasets = encode_result(result, run, EncodeContext(sources=sources, pipeline="dsa_av"))
    names = [str(d.SOPClassUID.name) for d in datasets]
    assert names == [
        "Multi-frame Grayscale Word Secondary Capture Image Storage",
        "Segmentation Storage",
        "Secondary Capture Image Storage",
        "Comprehensive 3D SR Storage",  # the result's quality (pipelines.quality)
    ]
    for i, ds in enumerate(datasets):
        assert _dciodvfy_errors(ds, tmp_path / f"{i}.dcm") == [], names[i]
    assert datasets[2].BurnedInAnnotation == "YES"


def test_dsa_ia_classical_is_labelled_classical() -> None:
    run, _ = synthetic_dsa(1)
    seg = pipelines.get("dsa_ia")(run, PipelineContext()).outputs[0]
    assert seg.algorithm.family == "classical"
    assert [s.label for s in seg.segments] == ["Blood vessel", "Artery"]
    assert np.all(seg.masks[0] >= seg.masks[1])  # arteries are vessels


def _package(tmp_path: Path, name: str, arch: str, config: dict, pipeline: str) -> Path:
    torch.manual_seed(0)
    model = build(arch, config)
    return write_package(
        tmp_path / name,
        model=model,
        name=name,
        version="0.0.1",
        architecture_name=arch,
        config=config,
        pipeline=pipeline,
        metrics={"note": "untrained, tests only"},
        data={"synthetic": True, "cases": 0},
        model_card="Untrained test package.",
        training_command="pytest",
        dataset_manifest_hash="0" * 64,
    )


def test_model_packages_load_and_run_through_the_pipelines(tmp_path: Path) -> None:
    run, _ = synthetic_dsa(3, size=80, frames=9)
    av_pkg = _package(
        tmp_path,
        "stunet-test",
        "st_unet",
        {
            "widths": [4, 8, 16],
            "channels": ["artery", "vein", "ica"],
            "out_channels": 3,
            "max_side": 64,
            "tile": 48,
            "overlap": 16,
        },
        "dsa_av",
    )
    result = pipelines.get("dsa_av")(run, PipelineContext(device="cpu", model_package=str(av_pkg)))
    seg = result.outputs[0]
    assert seg.algorithm.family == "model" and seg.algorithm.model_package == "stunet-test"
    assert seg.masks.shape[1:] == (80, 80) and seg.masks.dtype == bool
    assert {s.code for s in seg.segments} <= {ARTERY, VEIN, ICA}
    assert any("resampled 9 frames" in n for n in result.notes)
    assert any("processed at 64x64" in n for n in result.notes)

    ia_pkg = _package(tmp_path, "vss-test", "vss_net", {"widths": [4, 8, 16]}, "dsa_ia")
    result = pipelines.get("dsa_ia")(run, PipelineContext(device="cpu", model_package=str(ia_pkg)))
    seg = result.outputs[0]
    assert [s.code for s in seg.segments] == [ARTERY] and seg.algorithm.family == "model"
    assert any("all 9 frames" in n for n in result.notes)

    assert load_package(av_pkg).config["channels"] == ["artery", "vein", "ica"]
    with pytest.raises(PipelineError, match="is for pipeline"):
        pipelines.get("dsa_ia")(run, PipelineContext(model_package=str(av_pkg)))


def test_deep_path_rejects_too_short_runs() -> None:
    run, _ = synthetic_dsa(0, frames=3)
    with pytest.raises(PipelineError, match="at least 4 frames"):
        pipelines.get("dsa_av")(run, PipelineContext(model_package="/nonexistent"))


def test_timing_overlap_of_the_artery_and_vein_labels() -> None:
    """Near 0 % when the labelled arteries fill before the labelled veins, about 90 %
    when the labels are drawn at random over the same curves (the two labels then have
    one distribution of filling times, and 90 % of each lies past the other's tenth);
    None when either label has fewer than 10 pixels."""
    rng = np.random.default_rng(0)
    times = np.arange(0.0, 12.0, 0.5)
    peaks = np.concatenate([rng.normal(3.0, 0.4, 200), rng.normal(7.0, 0.6, 200)])
    curves = np.exp(-0.5 * ((times[:, None] - peaks[None]) / 1.0) ** 2)
    curves += rng.normal(0, 0.02, curves.shape)
    early = peaks < 5.0
    assert timing_overlap(curves, times, early, ~early) < 2.0
    mixed = rng.random(peaks.size) < 0.5
    assert 85.0 < timing_overlap(curves, times, mixed, ~mixed) < 95.0
    few = np.zeros(peaks.size, bool)
    few[:9] = True
    assert timing_overlap(curves, times, few, ~few) is None


def test_an_uncertain_artery_vein_split_is_low_confidence() -> None:
    """Randomised development run 940023: the labels overlap in time (35 %: arteries
    filling late called veins and the reverse; M-Dice 0.54) and the verdict says so;
    940008 (0.0 %, M-Dice 0.65) is ok. Family A development runs 940100-940109 have
    0-4 %."""
    from training.phantoms import dsa

    for seed, uncertain in ((940023, True), (940008, False)):
        run = dsa.generate(seed, size=256, frames=20, randomise=True).to_run()
        quality = pipelines.get("dsa_av")(run, PipelineContext()).quality
        assert quality is not None
        (overlap,) = [m.value for m in quality.measures if m.name.value == "AVOVERLAP"]
        assert (overlap > MAX_TIMING_OVERLAP) == uncertain, (seed, overlap)
        flagged = any("artery/vein split is uncertain" in r for r in quality.reasons)
        assert flagged == uncertain, quality.reasons
