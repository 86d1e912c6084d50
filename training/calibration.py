"""Decision calibration of the DLA voxel classifier on validation runs.

The DLA classifier is trained as the paper trains it: patch centres drawn per
class and, inside each patch, every vessel voxel with as many bone and soft-tissue
voxels (``training.tasks.VolumeTask._balanced``). It therefore learns class
priors of about a third each, while vessels are a fraction of a percent of a
head. Its argmax, applied to a whole volume, calls far too much vessel: on a
randomised family A validation volume a model trained this way called 2.9 % of
the head vessel where 0.24 % is (vessel Dice 0.09).

Bayes' rule says by how much to shift each logit when the priors change
(log of the ratio of the priors, Saerens et al. 2002), but that holds for a
calibrated posterior, which a small model trained briefly does not give: on
that volume the full shift (-5.8) removed every vessel, a shift of -2 gave Dice
0.30. So the offset is chosen where the node's decision is judged, on
validation runs: the vessel logit offset (bone and soft tissue stay 0) that
maximises the vessel Dice pooled over the validation runs, on a grid of
``GRID``. It is stored in the model's config as ``class_bias`` and the node
decides with it (``pipelines.rotational.class_bias``). Validation runs only:
never the test split, never family B (``refuse_evaluation_only``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from training.dataset import Case
from training.tasks import Task

# Vessel logit offsets tried: -8 to +2 in quarter steps.
GRID = np.round(np.arange(-8.0, 2.0001, 0.25), 2)
CALIBRATED_TASKS = ("rotational_dla",)


def vessel_bias(
    task: Task, model: nn.Module, cases: Sequence[Case], device: torch.device | str = "cpu"
) -> dict[str, Any]:
    """The vessel logit offset with the best pooled vessel Dice over ``cases``, and the
    Dice at every offset of ``GRID`` (labelled voxels only)."""
    from pipelines.rotational import dense_logit_slabs

    if task.name not in CALIBRATED_TASKS:
        raise ValueError(f"no decision calibration is defined for task {task.name}")
    device = torch.device(device)
    tp = np.zeros(len(GRID), np.int64)
    fp = np.zeros(len(GRID), np.int64)
    fn = np.zeros(len(GRID), np.int64)
    used = []
    for case in cases:
        if case.kind != "full":
            continue
        truth = task.truth(case)
        vessel = np.asarray(truth["vessel"], bool)
        labelled = vessel | np.asarray(truth["bone"], bool) | np.asarray(truth["soft_tissue"], bool)
        for z0, z1, logits in dense_logit_slabs(model, case.pixels, device):
            # The vessel class wins when its logit plus the offset beats both others.
            margin = (logits[:, 0] - logits[:, 1:].max(dim=1).values).cpu().numpy()
            inside = labelled[z0:z1]
            is_vessel = vessel[z0:z1][inside]
            m = margin[inside]
            pos, neg = np.sort(m[is_vessel]), np.sort(m[~is_vessel])
            # Voxels with margin + b > 0, i.e. margin > -b, for every b at once.
            pos_called = len(pos) - np.searchsorted(pos, -GRID, side="right")
            neg_called = len(neg) - np.searchsorted(neg, -GRID, side="right")
            tp += pos_called
            fp += neg_called
            fn += len(pos) - pos_called
        used.append(case.id)
    if not used:
        raise ValueError("no fully annotated validation run to calibrate on")
    dice = 2 * tp / np.maximum(2 * tp + fp + fn, 1)
    best = float(dice.max())
    # Among equally good offsets, the smallest change from the plain argmax.
    candidates = np.flatnonzero(dice >= best - 1e-12)
    choice = float(GRID[candidates[np.argmin(np.abs(GRID[candidates]))]])
    zero = int(np.flatnonzero(GRID == 0.0)[0])
    return {
        "class_bias": [choice, 0.0, 0.0],
        "vessel_dice": best,
        "vessel_dice_without": float(dice[zero]),
        "dice_by_offset": {f"{b:g}": round(float(d), 4) for b, d in zip(GRID, dice, strict=True)},
        "cases": used,
    }


def calibrate_file(
    model: str | Path,
    cases: Sequence[Case],
    out: str | Path,
    dataset: str | Path,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Calibrate the model file ``model`` on the validation runs among ``cases`` and
    write it, with ``class_bias`` in its config and a ``calibration`` record, to ``out``."""
    from training.engine import load_model_file, save_file

    task, network, data = load_model_file(model, device)
    val = [c for c in cases if c.split == "val" and c.kind == "full"]
    result = vessel_bias(task, network, val, device)
    data["model_config"] = {**data["model_config"], "class_bias": result["class_bias"]}
    data["calibration"] = {
        **result,
        "dataset": str(dataset),
        "split": "val",
        "from_model": str(model),
    }
    save_file(data, Path(out))
    return result
