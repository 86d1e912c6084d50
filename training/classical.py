"""``python -m training tune-classical``: how the classical paths' constants were chosen.

A grid search on the *training* split of a dataset only (never on held-out
seeds, never on family B: the CLI refuses evaluation-only data here as it does
for training). It reports the best values; putting them into ``pipelines/`` is
a reviewed code change, not something this command does.

- ``xa_coronary``: hysteresis (low, high) and the lumen SNR of the classical
  Frangi path, maximising the run-pooled IoU.
- ``rotational_dla``: one coordinate-descent pass over the HU-threshold bone
  model's constants (:data:`ROTATIONAL_GRID`), maximising vessel Dice inside the
  head, from the pipeline's current defaults.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from training import metrics as M
from training.dataset import Case
from training.tasks import TaskError

CORONARY_GRID = {
    "low": (0.002, 0.005, 0.01, 0.02, 0.05),
    # 0.8: the shipped seed level since xa_coronary 2.6.0 (searched on development
    # seeds, docs/coronary_rotational.md), so that the grid holds it.
    "high": (0.5, 0.7, 0.8, 0.9, 0.97),
    "lumen_snr": (0.0, 0.5, 1.0, 1.5),
}
ROTATIONAL_GRID: dict[str, tuple[float, ...]] = {
    "dense_hu": (200.0, 250.0, 300.0),
    "bone_core_hu": (1000.0, 1100.0, 1250.0, 1400.0),
    "plate_radius_mm": (2.2, 2.6, 3.0),
    "grow_mm": (1.5, 2.5, 3.5),
    "base_grow_mm": (0.0, 2.0, 4.0),
    "base_fraction": (0.0, 0.3),
    "min_vessel_mm3": (5.0, 20.0, 50.0),
}


def _coronary(cases: Sequence[Case]) -> dict[str, Any]:
    from pipelines.coronary import (
        classical_response,
        min_component_px,
        normalise_cine,
        remove_small_components,
        vessels_from,
    )

    runs = []
    for case in cases:
        if "vessel" not in case.masks or case.geometry != "frames":
            raise TaskError(f"case {case.id}: xa_coronary tuning needs a vessel label per frame")
        cine = normalise_cine(case.pixels)
        runs.append((*classical_response(cine), cine, np.asarray(case.masks["vessel"], bool)))
    best: dict[str, Any] = {}
    best_iou = -1.0
    for low in CORONARY_GRID["low"]:
        for high in CORONARY_GRID["high"]:
            for lumen in CORONARY_GRID["lumen_snr"]:
                ious = []
                for response, snr, chest, cine, truth in runs:
                    masks = vessels_from(response, snr, cine, (low, high), lumen, chest=chest)
                    masks = remove_small_components(masks, min_component_px(truth.shape[1:]))
                    ious.append(M.iou(masks, truth))
                if float(np.mean(ious)) > best_iou:
                    best = {"hysteresis": [low, high], "lumen_snr": lumen}
                    best_iou = float(np.mean(ious))
    return {"best": best, "iou": best_iou}


def _rotational(cases: Sequence[Case]) -> dict[str, Any]:
    from pipelines import rotational
    from pipelines.models.dla import CLASS_VESSEL

    defaults = getattr(rotational, "CLASSICAL_DEFAULTS", None)
    if not defaults:
        raise TaskError("the rotational classical path has no tunable constants any more")
    vols = []
    for case in cases:
        if case.geometry != "volume" or "vessel" not in case.masks:
            raise TaskError(f"case {case.id}: rotational_dla tuning needs a vessel volume label")
        m = case.meta
        row, col = m.get("pixel_spacing_mm") or (1.0, 1.0)
        spacing = (float(m.get("slice_spacing_mm") or row), float(row), float(col))
        truth = np.asarray(case.masks["vessel"], bool)
        body = truth | np.asarray(
            case.masks.get("bone", False) | case.masks.get("soft_tissue", False)
        )
        vols.append((case.pixels, spacing, truth, body))

    def score(params: dict[str, float]) -> float:
        return float(
            np.mean(
                [
                    M.dice(
                        (rotational.classical_tissues(hu, sp, params) == CLASS_VESSEL)[body],
                        truth[body],
                    )
                    for hu, sp, truth, body in vols
                ]
            )
        )

    params = dict(defaults)
    best = start = score(params)
    for key, values in ROTATIONAL_GRID.items():
        if key not in params:
            continue
        for value in values:
            trial = {**params, key: value}
            if trial != params and (dice := score(trial)) > best:
                params, best = trial, dice
    return {"best": params, "dice": best, "dice_with_defaults": start}


def tune(task: str, cases: Sequence[Case], limit: int | None = None) -> dict[str, Any]:
    chosen = sorted((c for c in cases if c.kind == "full"), key=lambda c: c.id)[:limit]
    if not chosen:
        raise TaskError("no fully annotated training run to tune on")
    result = _coronary(chosen) if task == "xa_coronary" else _rotational(chosen)
    return {"task": task, "training_runs": len(chosen), **result}
