"""Issue 13, perfusion: maps without impossible values, "no value" as viewers honour
it, ICA rules that fall back instead of failing, quality measures with a verdict,
and fault injection on family A phantoms (``training.phantoms.dsa``; family B is
evaluation-only and plays no part here).

Every fault ends either with maps whose verdict names the fault, or with a refused
run whose reason says why: never a negative CBF, CBV or MTT, never a Tmax or TTP
outside the run, never an empty map.
"""

from __future__ import annotations

from dataclasses import replace
from functools import cache

import numpy as np
import pydicom
import pytest
import torch
from scipy import ndimage

from dicom_node.encode import encode_result
from dicom_node.encode.common import EncodeContext
from dicom_node.encode.pmap import NO_VALUE
from pipelines.base import (
    ParametricMapOutput,
    PipelineContext,
    PipelineError,
    PipelineResult,
    RenderingOutput,
    Run,
    SegmentationOutput,
    get,
)
from pipelines.options import checked
from pipelines.perfusion.localise import locate, rule_in
from pipelines.quality import Verdict
from tests.conftest import dciodvfy_errors
from tests.dicomgen import xa_run
from tests.perfusion_runs import development_run
from training.phantoms import dsa

torch.set_num_threads(1)
SEED = 40  # family A; the perfusion tuning seeds are 100-102, the benchmark's 210-212
SIZE = 160
PM_CLASS = "1.2.840.10008.5.1.4.1.1.30"


@cache
def phantom(**options) -> dsa.DSAPhantom:
    options = {"frames": 40, "fps": 4.0, **options}
    return dsa.generate(
        SEED, size=SIZE, snr=40.0, snr_reference="tissue", view="lateral", **options
    )


def process(run: Run, **options) -> PipelineResult:
    return get("dsa_perfusion")(run, PipelineContext(options=options))


def outcome(run: Run, **options) -> PipelineResult | str:
    """The result, or the reason the run was refused."""
    try:
        return process(run, **options)
    except PipelineError as exc:
        return str(exc)


def maps(result: PipelineResult) -> dict[str, ParametricMapOutput]:
    return {o.key: o for o in result.outputs if isinstance(o, ParametricMapOutput)}


def assert_physical(result: PipelineResult, run: Run) -> None:
    """CBF, CBV, MTT >= 0, Tmax and TTP within the run, no empty map, a verdict."""
    duration = float(run.meta.frame_times_s[-1])
    found = maps(result)
    assert set(found) == {"cbf", "cbv", "mtt", "tmax", "ttp"}
    for key, out in found.items():
        assert out.valid is not None and out.valid.any(), f"{key}: empty map"
        values = out.values[out.valid]
        assert np.isfinite(values).all(), key
        assert values.min() >= 0, (key, float(values.min()))
        if key in ("mtt", "tmax", "ttp"):
            assert values.max() <= duration, (key, float(values.max()), duration)
        assert np.array_equal(out.valid, found["cbf"].valid), key  # one mask for all maps
    assert result.quality is not None
    assert result.quality.verdict in set(Verdict)


def verdict(result: PipelineResult | str) -> str:
    return result if isinstance(result, str) else result.quality.verdict.value  # type: ignore[union-attr]


def reasons(result: PipelineResult) -> str:
    assert result.quality is not None
    return "; ".join(result.quality.reasons)


# --- item 1: no impossible values, "no value" in the objects ---------------------------


@pytest.mark.parametrize(
    "name, options",
    [
        ("noisy", {"snr": 8.0}),
        ("short", {"frames": 20}),
        ("truncated bolus", {"frames": 14}),
        ("1 frame/s", {"frames": 12, "fps": 1.0}),
    ],
)
def test_maps_hold_no_impossible_value(name, options):
    snr = options.pop("snr", None)
    p = (
        dsa.generate(
            SEED, size=SIZE, snr=snr, snr_reference="tissue", view="lateral", fps=4.0, frames=40
        )
        if snr
        else phantom(**options)
    )
    run = p.to_run()
    result = outcome(run)
    assert not isinstance(result, str), result
    assert_physical(result, run)


def test_no_value_is_the_padding_value_outside_the_mapped_range(tmp_path):
    """In the Parametric Maps a pixel without a value is the Float Pixel Padding Value
    (-1), excluded from the Real World Value Mapping's range; the colour renderings
    show the MinIP there (transparent). dciodvfy-clean."""
    p = phantom(frames=14)  # truncated bolus: many pixels without a value
    run = p.to_run()
    result = process(run)
    frames, rows, cols = run.pixels.shape
    header = xa_run(frames=frames, rows=rows, cols=cols, frame_time_ms=250.0)
    del header.PixelData
    datasets = encode_result(result, run, EncodeContext(sources=[header], pipeline="dsa_perfusion"))
    outputs = maps(result)
    checked = 0
    for i, ds in enumerate(datasets):
        if str(ds.SOPClassUID) != PM_CLASS:
            continue
        path = tmp_path / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == []
        back = pydicom.dcmread(path)
        mapping = back.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
        out = outputs[mapping.LUTLabel.lower()]
        pixels = back.pixel_array
        assert float(back.FloatPixelPaddingValue) == NO_VALUE
        assert float(back.FloatPixelPaddingRangeLimit) == NO_VALUE
        assert np.array_equal(pixels == NO_VALUE, ~out.valid)
        assert pixels[out.valid].min() >= 0
        assert float(mapping.DoubleFloatRealWorldValueFirstValueMapped) >= 0 > NO_VALUE
        checked += 1
    assert checked == 5
    minip = result.outputs[0].pixels
    for out in outputs.values():
        (rendering,) = [
            o
            for o in result.outputs
            if isinstance(o, RenderingOutput) and o.key == f"{out.key}_color"
        ]
        # Outside the valid mask the rendering is the grey MinIP (R = G = B), not a colour.
        rgb = rendering.rgb[: minip.shape[0], : minip.shape[1]].astype(int)
        far = ~out.valid
        far[:40] = False  # the burned-in label band at the top
        grey = (rgb[..., 0] == rgb[..., 1]) & (rgb[..., 1] == rgb[..., 2])
        assert grey[far].mean() > 0.99


# --- item 2: ICA rules in order --------------------------------------------------------


def with_noise(run: Run, fraction: float = 0.01) -> Run:
    """Quantum noise over the whole image (``fraction`` of the run's contrast range)."""
    sd = fraction * float(np.ptp(run.pixels))
    noise = np.random.default_rng(7).normal(0, sd, run.pixels.shape).astype(np.float32)
    return replace(run, pixels=run.pixels + noise)


def native_without_border_entry() -> tuple[Run, dsa.DSAPhantom]:
    """A native run (log-subtracted against its mask, as the node decodes a Mask
    Subtraction Sequence) whose ICA does not reach the border: below the middle of the
    ICA nothing changes (the catheter tip sits in the ICA, in view). Quantum noise over
    the whole image, as a detector has (the phantom's subtracted background outside the
    head is flat, which would read as a collimator)."""
    p = phantom(native=True)
    run = p.to_run(subtract=True)
    rows = np.flatnonzero(p.truth["ica"].any(axis=1))
    cut = int(rows.min() + (rows.max() - rows.min()) // 2)
    pixels = run.pixels.copy()
    pixels[:, cut:] = pixels[:1, cut:]
    contrast = float(np.ptp(pixels[:, p.truth["ica"]]))
    noise = np.random.default_rng(7).normal(0, 0.01 * contrast, pixels.shape)
    return replace(run, pixels=pixels + noise.astype(np.float32)), p


def _misregistered(run: Run, amplitude: float) -> Run:
    """The mask moved before the fill: every live frame carries the same bone edges
    (bright on one side of the skull, dark on the other); frame 1, the subtracted
    mask, stays blank."""
    rows, cols = run.pixels.shape[1:]
    r, c = np.mgrid[:rows, :cols]
    radius = np.hypot(r - rows / 2, c - cols / 2)
    ring = (np.abs(radius - 0.42 * rows) < 2.5).astype(np.float32)
    edges = amplitude * (ring * np.sign(c - cols / 2 + 0.5)).astype(np.float32)
    inner = (np.abs(radius - 0.25 * rows) < 2.0) & (r > rows / 2)  # a skull-base edge
    edges[inner] = -amplitude
    pixels = run.pixels.copy()
    pixels[1:] += edges[None]
    return replace(run, pixels=pixels)


def test_the_blank_mask_frame_is_not_a_baseline_sample(monkeypatch):
    """A subtracted run's first frame is its mask subtracted from itself: blank,
    without the live frames' noise or their misregistration. Used as a baseline
    sample it turns every moved edge into contrast; left out, the live pre-contrast
    frames cancel the edges."""
    from pipelines.perfusion import pipeline as perfusion
    from pipelines.perfusion.aif import (
        contrast_signal,
        frames_before_bolus,
        noise_sigma,
        subtracted_mask_frames,
    )

    run = phantom().to_run()
    sigma = noise_sigma(-run.pixels)
    moved = _misregistered(run, 40 * sigma)
    blank = subtracted_mask_frames(moved.pixels, moved.meta)
    assert blank.tolist() == [True] + [False] * (len(blank) - 1)
    # Only subtracted runs have a mask frame; a noise-free run's flat frames are samples.
    assert not subtracted_mask_frames(moved.pixels, replace(moved.meta, subtracted=False)).any()
    clean = dsa.generate(SEED, size=SIZE, frames=40, fps=4.0, snr=None, view="lateral")
    assert not subtracted_mask_frames(clean.to_run().pixels, clean.to_run().meta).any()
    # At 1 frame/s one live frame precedes the bolus: the exact blank frame stays.
    slow = phantom(frames=12, fps=1.0).to_run()
    assert frames_before_bolus(contrast_signal(slow.pixels[1:], slow.meta)) == 1
    assert not subtracted_mask_frames(slow.pixels, slow.meta).any()

    reference = process(run)
    result = process(moved)
    assert any("frame(s) 1 left out" in n for n in result.notes), result.notes
    assert_physical(result, moved)
    expected = maps(reference)["cbf"].valid
    assert (maps(result)["cbf"].valid ^ expected).sum() <= 0.01 * expected.sum()
    # With the blank frame as a baseline sample, the edges become tissue with values
    # (here 9 % of the mask changes).
    monkeypatch.setattr(perfusion, "subtracted_mask_frames", lambda f, m, i: np.zeros(len(f), bool))
    with_mask = process(moved)
    assert (maps(with_mask)["cbf"].valid ^ expected).sum() > 0.03 * expected.sum()


def test_opacity_that_stays_flat_before_the_bolus_is_not_contrast_already_there():
    """Randomised family A seed 900004 (subtracted, its mask misregistered; the run
    bench.perfusion_quality's randomised family A lost most to 9b06ec8): the border
    vessel's region holds opacity in the first live frame (the moved mask's edges;
    27 % of its peak above the frame's median), stays at that level for seconds,
    then the bolus rises: those frames are its baseline. Until 2026-12-01 that
    opacity read as contrast already in the ICA: the border rule was refused for
    want of a baseline, the run was tried again with the blank mask frame as the
    baseline, and the AIF came from a later branch or a vein's misregistered edge."""
    p = dsa.generate(
        900004, size=160, frames=80, fps=4.0, snr=30.0, snr_reference="tissue", randomise=True
    )
    run = p.to_run()
    field = p.truth.get("field", np.ones(p.truth["cbf"].shape)).astype(bool)
    vessels = (p.truth["artery"] | p.truth["vein"] | p.truth["device"]).astype(bool)
    perfused = np.isfinite(p.truth["cbf"]) & field & ~vessels

    result = process(run)
    assert_physical(result, run)
    notes = "\n".join(result.notes)
    assert "left out: the subtracted mask" in notes
    assert "contrast is already in the ICA in the first frame" not in notes
    (rule,) = [n for n in result.notes if n.startswith("ICA by the ")]
    assert rule == "ICA by the vessel entering from the border rule", rule
    (region,) = [o for o in result.outputs if o.key == "aif_region"]
    assert isinstance(region, SegmentationOutput)
    mask = region.masks[0]
    on_ica = ndimage.binary_dilation(p.truth["ica"] | p.truth["device"])
    assert (mask & on_ica).sum() >= 0.9 * mask.sum()
    coverage = float((maps(result)["cbf"].valid & perfused).sum() / perfused.sum())
    # 0.75 (the second try with the blank frame gave 0.62, without it 0.29).
    assert coverage >= 0.7, coverage


def test_contrast_in_the_first_frame_is_told_from_static_opacity():
    """``baseline_frames`` of a subtracted run: opacity in the ICA's first frame is
    contrast already there (no baseline) when the curve rises from it at once; when it
    stays at that level for at least two samples before the bolus, it is static (a
    misregistered edge, bone, a catheter), and those samples are the baseline."""
    from pipelines.perfusion.aif import NoBaseline, baseline_frames

    grid = np.arange(20) * 0.5
    bolus = np.exp(-0.5 * ((grid - 5.0) / 1.2) ** 2)
    mask = np.zeros((4, 4), bool)
    mask[1:3, 1:3] = True

    def frames(curve: np.ndarray) -> np.ndarray:
        out = np.zeros((len(curve), 4, 4))
        out[:, mask] = curve[:, None]
        return out

    static = 0.4 + bolus  # 29 % of its peak above the frame's median from the start
    assert baseline_frames(frames(static), mask, grid, subtracted=True) >= 2
    late_start = bolus[5:]  # starts at a tenth of its peak and rises at once
    with pytest.raises(NoBaseline, match="already in the ICA in the first frame"):
        baseline_frames(frames(late_start), mask, grid[:15], subtracted=True)
    # Unsubtracted runs have no flat background to compare with: never refused here.
    assert baseline_frames(frames(late_start), mask, grid[:15], subtracted=False) >= 1


def test_the_blank_mask_frame_stays_where_no_live_frame_precedes_the_bolus():
    """A run that goes from its mask straight into the bolus: the blank frame is the
    only baseline there is, so it stays."""
    from pipelines.perfusion.aif import subtracted_mask_frames

    run = phantom().to_run()
    assert subtracted_mask_frames(run.pixels, run.meta)[0]
    signal = -run.pixels
    rise = (signal - signal[1]).max(axis=(1, 2))
    first = int(np.argmax(rise > 0.5 * rise.max()))  # the bolus half way in
    assert first > 2
    keep = [0, *range(first, len(run.pixels))]
    times = run.meta.frame_times_s[keep]
    cut = replace(run, pixels=run.pixels[keep], meta=replace(run.meta, frame_times_s=times))
    assert not subtracted_mask_frames(cut.pixels, cut.meta).any()
    result = process(cut)
    assert_physical(result, cut)
    assert not any("left out" in n for n in result.notes)
    assert "brain reached before the aif" not in reasons(result)


def test_native_run_is_processed():
    p = phantom(native=True)
    run = p.to_run(subtract=True)
    result = process(run)
    assert_physical(result, run)
    assert "ICA by the vessel entering from the border rule" in "\n".join(result.notes)


def test_native_dicom_run_through_the_node_decoder(tmp_path):
    """The XA file with its Mask Subtraction Sequence, decoded as the node decodes it
    (log-subtracted against the mask), gets maps, a verdict and the rule used."""
    from dicom_node.runs import load_run

    files = phantom(native=True).write(tmp_path)
    (native,) = [f for f in files if f.name == "native.dcm"]
    loaded = load_run([native])
    assert loaded.run.meta.subtracted
    result = process(loaded.run)
    assert_physical(result, loaded.run)
    assert any(n.startswith("ICA by the ") for n in result.notes)


def test_native_run_without_a_border_vessel_falls_back_and_says_so():
    run, p = native_without_border_entry()
    result = process(run, ica="classical")
    assert_physical(result, run)
    notes = "\n".join(result.notes)
    assert (
        "ICA by the earliest-arriving large artery rule (vessel entering from the border:" in notes
    )
    assert rule_in(result.notes) == "earliest"  # what the benchmarks read back
    assert result.quality.verdict is Verdict.LOW_CONFIDENCE
    assert "earliest-arriving large artery" in reasons(result)
    (region,) = [o for o in result.outputs if o.key == "aif_region"]
    assert "earliest-arriving large artery" in region.description
    # The ICA, its earliest dense piece: the mask lies within a pixel of the phantom's
    # ICA (the dense vessels are found on the opacity smoothed by one pixel).
    near = ndimage.binary_dilation(p.truth["ica"])
    assert (region.masks[0] & near).sum() >= 0.9 * region.masks[0].sum()


def test_a_candidate_refused_after_the_deconvolution_passes_to_the_next():
    """``locate`` with the candidates a rule gave refused later (by the brain filling
    before their AIF): the rule's next candidate serves, and says why the ones before
    it did not; a rule whose every candidate is refused is passed over."""
    from pipelines.perfusion.ica import IcaResult

    def candidate(k: int) -> IcaResult:
        mask = np.zeros((4, 4), bool)
        mask[k, k] = True
        return IcaResult(mask=mask, method="earliest", entry_width_px=5.0, components=1)

    calls: list[str] = []

    def earliest() -> list[IcaResult]:
        calls.append("earliest")
        return [candidate(0), candidate(1), candidate(2)]

    def accept(rule: str, ica: IcaResult) -> int:
        k = int(np.flatnonzero(ica.mask.any(axis=1))[0])
        if k == 1:
            raise PipelineError("its AIF peak is only 3 times its noise")
        return k

    attempts = {"border": None, "earliest": earliest}
    order = ["border", "earliest"]
    located, k = locate(order, attempts, accept, {"earliest": {0: "71% fills before"}})
    assert (located.rule, located.candidate, k) == ("earliest", 2, 2)
    assert located.skipped == ("71% fills before", "its AIF peak is only 3 times its noise")
    assert located.describe.startswith(
        "ICA by the earliest-arriving large artery rule, its candidate 3 (candidate 1: 71% "
        "fills before; candidate 2: its AIF peak is only 3 times its noise)"
    ), located.describe
    with pytest.raises(PipelineError, match="candidate 1: 71% fills before; candidate 2: its"):
        locate(order, attempts, accept, {"earliest": {0: "71% fills before", 2: "60% too"}})


def test_the_earliest_artery_is_not_passed_over_for_a_blush():
    """Randomised family A development seed 920005 at 256 px: no vessel enters from
    the border; the widest dense component in time is a blush where arteries and veins
    overlap, 30 mm across, whose AIF most of the brain fills before. Its next candidate
    is the ICA. (When "large" also needed 5 % of the largest component's area, the
    ICA's own component did not count beside the blush, and the maps covered 10 % of
    the brain.)"""
    p = dsa.generate(
        920005, size=256, frames=80, fps=4.0, snr=30.0, snr_reference="tissue", randomise=True
    )
    run = p.to_run()
    result = process(run, ica="classical")
    assert_physical(result, run)
    (rule,) = [n for n in result.notes if n.startswith("ICA by the ")]
    assert rule.startswith(
        "ICA by the earliest-arriving large artery rule, its candidate 2 (candidate 1: "
    ), rule
    assert "of the brain fills before its AIF: not the feeding artery" in rule
    (region,) = [o for o in result.outputs if o.key == "aif_region"]
    mask = region.masks[0]
    assert (mask & p.truth["ica"]).sum() >= 0.9 * mask.sum()
    field = p.truth.get("field", np.ones(mask.shape)).astype(bool)
    vessels = (p.truth["artery"] | p.truth["vein"] | p.truth["device"]).astype(bool)
    perfused = np.isfinite(p.truth["cbf"]) & field & ~vessels
    assert (maps(result)["cbf"].valid & perfused).sum() >= 0.75 * perfused.sum()


def _vessel_and_blush() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(opacity, arrival, the vessel) at 0.5 mm: a vessel 3 mm wide entering from the
    bottom at 1.0 s, and beside it a blush 30 mm across entering there at 1.2 s."""
    yy, xx = np.mgrid[:128, :128]
    vessel = np.abs(xx - 30) <= 3
    blush = np.hypot(yy - 110, xx - 90) <= 30
    opacity = np.where(vessel | blush, 100.0, 0.0)
    arrival = np.where(vessel, 1.0, 1.2)
    return opacity, arrival, vessel


def test_an_ica_wider_than_an_artery_is_passed_over():
    """A trunk that holds a disk wider than any artery (10 mm) is blush, or an artery
    joined to it: the border rule passes over it, the earliest rule tries it after
    every narrower candidate. Before, the border rule took the blush for the widest
    vessel at the border, and the earliest rule took it first, as the widest in time."""
    from pipelines.perfusion.ica import classical_ica
    from pipelines.perfusion.localise import earliest_artery

    opacity, arrival, vessel = _vessel_and_blush()
    border = classical_ica(opacity, arrival, 1.0, spacing_mm=(0.5, 0.5))
    first, second = earliest_artery(opacity, arrival, 1.0, (0.5, 0.5), candidates=2)
    for found in (border, first):
        assert found.mask.any() and not (found.mask & ~vessel).any()
    # The earliest rule keeps the blush as its last candidate, after every narrower one.
    assert not (second.mask & vessel).any()
    only_blush = np.where(vessel, 0.0, opacity)
    with pytest.raises(PipelineError, match=r"wider than an artery \(10 mm\)"):
        classical_ica(only_blush, arrival, 1.0, spacing_mm=(0.5, 0.5))


def test_the_ica_does_not_take_the_brain_out_of_the_maps():
    """Randomised family A development seed 920015, head drift of 1.5 mm: the border
    rule's trunk was a dense region of 4,200 mm², a fifth of the perfused
    brain, which the maps then left out as vessel (coverage 59 %). Passed over as
    wider than an artery, the ICA comes from the earliest rule, inside the true ICA."""
    p = dsa.generate(
        920015, size=256, frames=80, fps=4.0, snr=30.0, snr_reference="tissue",
        motion_mm=1.5, randomise=True,
    )  # fmt: skip
    run = p.to_run()
    result = process(run)
    assert_physical(result, run)
    (rule,) = [n for n in result.notes if n.startswith("ICA by the ")]
    assert "wider than an artery (10 mm)" in rule, rule
    (region,) = [o for o in result.outputs if o.key == "aif_region"]
    assert (region.masks[0] & p.truth["ica"]).sum() >= 0.9 * region.masks[0].sum()
    field = p.truth.get("field", np.ones(region.masks[0].shape)).astype(bool)
    vessels = (p.truth["artery"] | p.truth["vein"] | p.truth["device"]).astype(bool)
    perfused = np.isfinite(p.truth["cbf"]) & field & ~vessels
    # 72.2 % of the perfused brain (59.3 % before)
    assert (maps(result)["cbf"].valid & perfused).sum() >= 0.68 * perfused.sum()


def test_site_rule_from_the_settings_places_the_aif():
    p = phantom()
    run = p.to_run()
    rows, cols = np.nonzero(p.truth["ica"])
    h, w = p.truth["ica"].shape
    pick = len(rows) // 2
    seed = [rows[pick] / h, cols[pick] / w]
    rules = [
        {"protocol": "^NO MATCH$", "roi": [0, 0, 0.2, 0.2]},
        {"protocol": "ICA", "seed": seed, "seed_radius": 0.08},
    ]
    result = process(run, ica="site", ica_site_rules=rules)
    assert_physical(result, run)
    assert "ICA by the site rule" in "\n".join(result.notes)
    (region,) = [o for o in result.outputs if o.key == "aif_region"]
    assert (region.masks[0] & p.truth["ica"]).sum() >= 0.5 * region.masks[0].sum()


def test_site_rules_are_checked():
    assert checked("dsa_perfusion", {"ica_site_rules": None}) == {"ica_site_rules": ()}
    for bad, match in [
        ({"protocol": "x", "roi": [0, 0, 1, 1]}, "list of tables"),
        ([{"protocol": "x"}], "exactly one of roi or seed"),
        ([{"protocol": "x", "roi": [0, 0, 2, 1]}], "fractions"),
        ([{"protocol": "(", "seed": [0.5, 0.5]}], "not a regex"),
        ([{"protocol": "x", "seed": [0.5, 0.5], "radius": 1}], "unknown key"),
    ]:
        with pytest.raises(PipelineError, match=match):
            checked("dsa_perfusion", {"ica_site_rules": bad})


def test_every_rule_failing_gives_each_reason():
    """No contrast anywhere: each rule says why it failed, and the run is refused."""
    run = phantom().to_run()
    still = np.repeat(run.pixels[:1], run.pixels.shape[0], axis=0)
    noise = np.random.default_rng(0).normal(0, 2.0, still.shape).astype(np.float32)
    result = outcome(replace(run, pixels=still + noise))
    assert isinstance(result, str)
    for rule in (
        "vessel entering from the border",
        "earliest-arriving large artery",
        "ICA model package: not configured",
        "site rule: no site rule is configured",
    ):
        assert rule in result, result


def test_a_run_refused_with_and_without_its_mask_frame_gives_both_reasons(monkeypatch):
    """A run with a blank mask frame is tried without it, then again with it kept as
    the baseline; when both tries are refused, the refusal gives both reasons (the
    second try's own reason was lost before)."""
    from pipelines.perfusion.pipeline import DsaPerfusion

    run = phantom().to_run()  # subtracted: its first frame is the blank mask

    def refuse(self, prepared, left_out, *args, **kwargs):
        raise PipelineError("refused without it" if left_out.any() else "refused with it")

    monkeypatch.setattr(DsaPerfusion, "_choose", refuse)
    assert outcome(run) == (
        "refused without it; again with the subtracted mask frame(s) kept as the baseline: "
        "refused with it"
    )
    noisy = run.pixels.copy()
    noisy[0] = run.pixels[1]  # no blank frame: one try
    assert outcome(replace(run, pixels=noisy)) == "refused with it"


# --- items 3 and 5: quality measures, verdicts, fault injection -------------------------


def test_clean_run_is_ok_with_its_measures():
    run = phantom().to_run()
    result = process(run)
    assert_physical(result, run)
    assert result.quality.verdict is Verdict.OK, reasons(result)
    names = {m.name.value for m in result.quality.measures}
    assert {"AIFSNR", "AIFTAIL", "BASEFRAMES", "BRAINAREA", "NOVALUE", "AIFSAT"} <= names
    (sr,) = [o for o in result.outputs if o.key == "aif"]
    assert {m.name.value for m in sr.quality} == names  # into the SR's "Run quality" group


def _collimated(run: Run) -> Run:
    """Blades over the edges: flat outside the field. The phantom's subtracted background
    is flat too, so detector noise is added inside first, as a real run has."""
    pixels = with_noise(run).pixels
    h, w = pixels.shape[1:]
    inside = np.zeros((h, w), bool)
    inside[h // 10 : 9 * h // 10, w // 8 : 7 * w // 8] = True
    pixels[:, ~inside] = float(np.median(pixels))
    return replace(run, pixels=pixels)


def _one_frame(run: Run) -> Run:
    pixels = np.repeat(run.pixels[:1], run.pixels.shape[0], axis=0)
    pixels[12] = run.pixels[12]
    return replace(run, pixels=pixels)


def _saturated(run: Run) -> Run:
    return replace(run, pixels=np.maximum(run.pixels, np.percentile(run.pixels, 1.0)))


def _no_ica_in_view(run: Run) -> Run:
    """The upper half of the head only: the ICA and the skull base are out of view."""
    return replace(run, pixels=run.pixels[:, : run.pixels.shape[1] // 2].copy())


IRREGULAR = np.concatenate([[0.0], np.cumsum(np.random.default_rng(1).uniform(0.12, 0.6, 39))])

FAULTS = {
    # name: (phantom options, run transform, allowed verdicts / refusal text, reason text)
    "bolus truncated by the end of the run": (
        {"frames": 14},
        None,
        {"low_confidence"},
        "washes out",
    ),
    "run ends before the AIF peak": ({"frames": 9}, None, {"refused"}, "before the bolus passes"),
    "contrast in one frame only": ({}, _one_frame, {"refused"}, "single frame, not a bolus"),
    "0.5 frames/s": ({"frames": 12, "fps": 0.5}, None, {"low_confidence"}, "sparsely"),
    "irregular frame times": ({"frame_times_s": tuple(IRREGULAR)}, None, {"ok"}, ""),
    "motion between mask and fill": ({"motion_mm": 3.0}, None, {"low_confidence"}, "motion"),
    "saturated detector": ({}, _saturated, {"low_confidence"}, "detector"),
    "collimated field": ({}, _collimated, {"ok"}, ""),
    # The arteries cut by the lower edge enter from the border: the widest early one (the
    # MCA) gives the AIF, which may be fine (checked below: an artery, not a vein). Up
    # to the field finder of dsa_perfusion 1.2.1 the quiet air above the head was taken
    # for a blanked shutter, the lower edge for the field's, and the run was refused or
    # low confidence for want of a vessel entering from the border.
    "no ICA in view": ({}, _no_ica_in_view, {"ok", "low_confidence", "refused"}, ""),
}


@pytest.mark.parametrize("name", list(FAULTS))
def test_fault_injection(name):
    options, transform, allowed, text = FAULTS[name]
    ph = phantom(**options)
    run = ph.to_run()
    if transform is not None:
        run = transform(run)
    result = outcome(run)
    if isinstance(result, str):
        assert "refused" in allowed, f"{name}: refused: {result}"
        assert text in result, result
        return
    assert_physical(result, run)
    assert result.quality.verdict.value in allowed, (name, reasons(result))
    assert text in reasons(result), reasons(result)
    if name == "collimated field":
        inside = np.abs(run.pixels - run.pixels[0]).max(axis=0) > 0
        assert not (maps(result)["cbf"].valid & ~inside).any()
    if name == "no ICA in view":
        truth = ph.truth
        rows = run.pixels.shape[1]
        region = next(
            o for o in result.outputs if isinstance(o, SegmentationOutput) and o.key == "aif_region"
        )
        aif = np.asarray(region.masks[0], bool)
        on_artery = (aif & np.asarray(truth["artery"], bool)[:rows]).sum()
        assert on_artery > 5 * (aif & np.asarray(truth["vein"], bool)[:rows]).sum()


def test_a_downstream_aif_measures_tmax_from_the_earliest_brain():
    """Randomised development seed 920008 at 160 px: no vessel enters from the border,
    and the earliest-arriving large artery is a branch that part of the brain fills
    before. That brain keeps its values (Tmax measured from the earliest brain, not
    "no value"), the Tmax map and its rendering say from where, and the run stays
    low confidence for its AIF."""
    ph = dsa.generate(
        920008, size=SIZE, frames=40, fps=4.0, snr=40.0, snr_reference="tissue", randomise=True
    )
    run = ph.to_run()
    result = process(run)
    assert_physical(result, run)
    note = next(n for n in result.notes if n.startswith("Tmax measured from the earliest brain"))
    assert "before the AIF's arrival" in note
    assert "after the earliest brain" in maps(result)["tmax"].description
    assert verdict(result) == "low_confidence"
    assert "fills before the AIF" in reasons(result)
    truth = ph.truth
    perfused = np.isfinite(truth["cbf"]) & ~(truth["artery"] | truth["vein"] | truth["device"])
    valid = maps(result)["tmax"].valid
    # 92 %; 78 % before, when the brain reached before the AIF had no value
    assert (valid & perfused).sum() / perfused.sum() > 0.9


def test_verdicts_from_the_measures():
    """The bounds of ``pipelines.perfusion.quality`` give the verdicts they say."""
    from pipelines.perfusion.quality import Findings, assess_perfusion

    good = Findings(
        aif_snr=100.0,
        aif_fwhm_s=2.0,
        aif_tail=0.1,
        baseline_frames=4,
        first_pass_gap_s=0.25,
        aif_saturation=0.0,
        field_saturation=0.0,
        misregistration=0.01,
        drift_share=0.01,
        drift_removed=False,
        drift_left_in="",
        brain_share=0.4,
        no_value_share=0.2,
        early_share=0.02,
        ica_rule="border",
    )
    assert assess_perfusion(good).verdict is Verdict.OK
    assert assess_perfusion(replace(good, aif_tail=0.7)).verdict is Verdict.LOW_CONFIDENCE
    assert assess_perfusion(replace(good, ica_rule="earliest")).verdict is Verdict.LOW_CONFIDENCE
    assert assess_perfusion(replace(good, ica_rule="site")).verdict is Verdict.OK
    for removed, left_in, why in (
        (True, "", "estimated from the last frames"),
        (False, "the drift_correction option is off", "left in (the drift_correction"),
    ):
        drift = assess_perfusion(
            replace(good, drift_share=0.2, drift_removed=removed, drift_left_in=left_in)
        )
        assert drift.verdict is Verdict.LOW_CONFIDENCE and why in drift.reasons[0]
    assert assess_perfusion(replace(good, no_value_share=0.6)).verdict is Verdict.LOW_CONFIDENCE
    empty = assess_perfusion(replace(good, no_value_share=0.95))
    assert (
        empty.verdict is Verdict.FAILED and "95.0 % of the brain has no value" in empty.reasons[0]
    )
    assert assess_perfusion(replace(good, aif_fwhm_s=0.2)).verdict is Verdict.FAILED


def test_site_rule_from_the_node_settings_reaches_the_pipeline(tmp_path):
    """``[workers] pipeline_options`` in the settings: checked at load (pipeline names),
    carried by the job to the worker process, given to the pipeline as its options."""
    from dicom_node.errors import ConfigError
    from dicom_node.sandbox import JobSpec, execute
    from dicom_node.settings import load_settings

    p = phantom()
    rows, cols = np.nonzero(p.truth["ica"])
    h, w = p.truth["ica"].shape
    pick = len(rows) // 2
    rules = [{"protocol": "ICA", "seed": [rows[pick] / h, cols[pick] / w], "seed_radius": 0.08}]
    options = {"dsa_perfusion": {"ica": "site", "ica_site_rules": rules}}
    settings = load_settings(None, environ={}, workers={"pipeline_options": options})
    with pytest.raises(ConfigError, match="pipeline_options.nope: unknown pipeline"):
        load_settings(None, environ={}, workers={"pipeline_options": {"nope": {}}})
    files = [f for f in p.write(tmp_path / "run") if f.name == "dsa.dcm"]
    spec = JobSpec(
        1,
        "run",
        "dsa_perfusion",
        tuple(map(str, files)),
        str(tmp_path / "out"),
        "cpu",
        options=settings.workers.pipeline_options["dsa_perfusion"],
    )
    outcome = execute(spec, lambda _stage: None)
    assert outcome.ok, outcome.error
    assert any(n.startswith("ICA by the site rule") for n in outcome.notes), outcome.notes


def test_when_no_rule_passes_the_aif_with_the_least_brain_before_it_stays(monkeypatch):
    """Every ICA rule gives an AIF that much of the brain fills before: the result
    keeps the rule whose AIF the least brain precedes, not merely the first tried
    (with a package, the package's comes first)."""
    from pipelines.perfusion import pipeline as perfusion

    shares = iter([0.8, 0.6, 0.9, 0.9])  # all above MAX_BRAIN_BEFORE_AIF
    real = perfusion.compute_maps

    def early(*args, **kwargs):
        return replace(real(*args, **kwargs), early_share=next(shares))

    monkeypatch.setattr(perfusion, "compute_maps", early)
    result = process(phantom().to_run())
    rule = next(n for n in result.notes if n.startswith("ICA by the "))
    assert rule.startswith("ICA by the earliest-arriving large artery rule"), rule
    assert any(n.startswith("no other ICA rule did better") for n in result.notes)
    assert "brain reached before the aif 60 %" in reasons(result)


def test_the_coverage_benchmark_scores_the_classical_path_and_each_package(capsys):
    """``bench.perfusion_quality`` measures what a site runs: the classical path, its
    options that are off by default, and every ``dsa_perfusion`` package in
    ``models/``, on the same runs."""
    from bench import perfusion_quality
    from bench.generalization import ROOT, Method

    packages = sorted(
        p.parent.name
        for p in (ROOT / "models").glob("*/package.json")
        if '"dsa_perfusion"' in p.read_text()
    )
    expected = ["classical", "classical, drift_correction=true", *packages]
    assert [m.label for m in perfusion_quality.methods(False)] == expected
    assert perfusion_quality.methods(True) == [Method("classical", None)]
    perfusion_quality.main(["--cases", "1", "--size", "128", "--families", "A", "--no-write"])
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| A ")]
    assert [row.split(" | ")[1] for row in table] == expected
    # the option reaches the pipeline: a value it refuses is refused with the reason
    run, truth = perfusion_quality.case("A", 900_000, 64)
    odd = perfusion_quality.score(run, truth, Method("odd", None, (("drift_correction", 1),)))
    assert odd["outcome"] == "refused" and "drift_correction" in odd["reason"]
    for row in table:
        assert row.split(" | ")[2] == "1 / 1" and row.split(" | ")[7] == "0"  # no impossible value
        assert "vessel entering from the border" in row.split(" | ")[-1], row  # the ICA rule


def test_an_aif_that_never_washes_out_gives_way_to_one_that_does():
    """Randomised development seed 920000 at 256 px with 1.5 mm of head drift after
    the mask: the drift leaves the skull's edges in every later subtracted frame,
    opacity that rises and stays, and one of them enters from the border. Taken as
    the AIF (dsa_perfusion 1.3.0), its curve never came down and the Tmax map was off
    by 1.7 s on average; it now gives way to an artery whose bolus passes, and the
    notes say why."""
    ph = development_run(920000)
    run = ph.to_run()
    result = process(run)
    assert_physical(result, run)
    located = next(n for n in result.notes if n.startswith("ICA by the"))
    assert "no washout within the run" in located
    assert not any("run is short for the bolus" in n for n in result.notes)
    assert verdict(result) == "low_confidence" and "motion" in reasons(result)
    truth = ph.truth
    perfused = np.isfinite(truth["cbf"]) & ~(truth["artery"] | truth["vein"] | truth["device"])
    tmax = maps(result)["tmax"]
    scored = tmax.valid & perfused
    # 0.49 s over 75 % of the perfused brain; 1.68 s over 66 % with the edge as the AIF
    assert np.mean(np.abs(tmax.values[scored] - truth["tmax"][scored])) < 1.0
    assert scored.sum() / perfused.sum() > 0.7
