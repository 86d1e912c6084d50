"""Anatomy drift after the mask in perfusion DSA (``pipelines.perfusion.motion``).

The phantom's head drifts by ``motion_mm`` after the mask (``training.phantoms.dsa``):
the subtracted frames then hold bone and skin edges that grow with the drift. The
drift model estimates how far the drift has gone in each frame and the edge
pattern, from the run alone; the pipeline keeps the correction when it takes out
the area brighter than the mask, and says so in the notes and the verdict.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest
import torch

from pipelines.base import ParametricMapOutput, PipelineContext, PipelineResult, get
from pipelines.perfusion.aif import contrast_signal
from pipelines.perfusion.motion import drift
from training.phantoms import dsa

torch.set_num_threads(1)
SEED = 40  # family A; the drift model was developed on seeds 920000-920015
SIZE = 160


@cache
def phantom(motion_mm: float) -> dsa.DSAPhantom:
    return dsa.generate(
        SEED,
        size=SIZE,
        frames=80,
        fps=4.0,
        snr=30.0,
        snr_reference="tissue",
        view="lateral",
        motion_mm=motion_mm,
    )


@cache
def result(motion_mm: float) -> PipelineResult:
    return get("dsa_perfusion")(phantom(motion_mm).to_run(), PipelineContext())


def coverage(res: PipelineResult, truth: dict[str, np.ndarray]) -> float:
    """Share of the perfused brain (no vessel of the truth on the ray) with a value."""
    valid = next(o for o in res.outputs if isinstance(o, ParametricMapOutput)).valid
    assert valid is not None
    vessel = (truth["artery"] | truth["vein"] | truth["device"]).astype(bool)
    perfused = np.isfinite(truth["cbf"]) & ~vessel
    return float((valid & perfused).sum() / perfused.sum())


def test_drift_weights_follow_the_motion_and_the_edges_go():
    moved, still = phantom(1.5), phantom(0.0)
    signal = contrast_signal(moved.to_run().pixels, moved.to_run().meta)
    found = drift(signal)
    assert found is not None
    # The truth's displacement per frame, as a share of the final one.
    shift = np.hypot(*moved.truth["motion_px"][:, :2].T)
    progress = shift / shift[-1]
    assert np.abs(found.weights - progress).max() < 0.15, np.round(found.weights, 2)
    # Against the same run without motion (same anatomy, iodine and noise). The
    # correction also takes the iodine of the last frames, scaled by the weights, out
    # (the model's known cost, see the module): the reference loses it too.
    reference = contrast_signal(still.to_run().pixels, still.to_run().meta)
    reference = reference - reference[0]
    tail = reference[-found.tail_frames :].mean(axis=0)
    expected = reference - found.weights[:, None, None] * tail
    brain = np.isfinite(still.truth["cbf"])

    def error(s: np.ndarray) -> float:
        e = (s - s[0]) - expected
        return float(np.sqrt(np.mean(e[:, brain] ** 2)))

    corrected = found.corrected(signal)
    assert error(corrected) < 0.5 * error(signal)

    # Iodine only darkens: the brain brighter than its mask over the run is the edges.
    noise = np.std(np.diff(reference, axis=0)[:, brain]) / np.sqrt(2) * np.sqrt(len(signal))

    def brighter(s: np.ndarray) -> float:
        return float(((s - s[0]).sum(axis=0)[brain] < -6 * noise).mean())

    assert brighter(signal) > 0.05
    assert brighter(corrected) <= brighter(reference) + 0.005


def test_a_drifting_run_is_corrected_and_says_so():
    moved, still = result(1.5), result(0.0)
    notes = " ".join(moved.notes)
    assert "anatomy drift after the mask corrected" in notes, moved.notes
    assert moved.quality is not None and moved.quality.verdict.value == "low_confidence"
    assert any("head moved after the mask" in r for r in moved.quality.reasons)
    assert coverage(moved, phantom(1.5).truth) >= 0.85
    # A run without motion is not touched.
    assert not any("drift" in n for n in still.notes), still.notes
    assert still.quality is not None
    assert not any("moved" in r for r in still.quality.reasons)


@pytest.mark.parametrize("mm", [0.0, 1.5])
def test_drift_correction_leaves_no_impossible_value(mm):
    res = result(mm)
    duration = float(phantom(mm).to_run().meta.frame_times_s[-1])
    for out in res.outputs:
        if isinstance(out, ParametricMapOutput):
            assert out.valid is not None
            values = out.values[out.valid]
            assert np.isfinite(values).all() and values.min() >= 0, out.key
            if out.key in ("mtt", "tmax", "ttp"):
                assert values.max() <= duration, out.key
