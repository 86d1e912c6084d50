"""Segmentation metrics for vessels: overlap, ranking, topology, artery/vein.

Definitions (all on boolean masks of the same shape; probabilities for AUC):

- Dice = 2|P∩T| / (|P|+|T|); IoU = |P∩T| / |P∪T|; sensitivity = TP/(TP+FN);
  specificity = TN/(TN+FP). An empty prediction of an empty truth scores 1.
- AUC: area under the ROC curve of the probabilities against the truth, the
  Mann-Whitney U statistic with average ranks for ties (exact, no binning).
- clDice (Shit et al., CVPR 2021): harmonic mean of topology precision
  |S(P)∩T|/|S(P)| and topology sensitivity |S(T)∩P|/|S(T)|, S the skeleton.
- Vascular connectivity as DIAS computes it: the number of 8-connected
  (26 in 3D) components of the prediction over that of the truth, each
  counted with the background label as OpenCV counts them, i.e.
  (n_P + 1) / (n_T + 1). 1 is ideal; above 1 the prediction is fragmented.
- A-Dice, V-Dice: Dice of the artery and of the vein channel; M-Dice: the
  Dice pooled over both channels, 2 Σ_c |P_c∩T_c| / Σ_c (|P_c|+|T_c|), as the
  ST U-Net paper's code (CAVE) computes its multi-class Dice.

Per-case values are aggregated as the mean, the standard deviation (``std``:
population, ddof=0, as numpy and the DIAS code compute it; ``sd``: sample, ddof=1),
the t-based 95 % confidence interval of the mean (``ci95``; none below n = 2) and
the case count.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage, stats
from scipy.stats import rankdata
from skimage.morphology import skeletonize


def _counts(pred: np.ndarray, truth: np.ndarray) -> tuple[int, int, int, int]:
    p = np.asarray(pred, bool)
    t = np.asarray(truth, bool)
    if p.shape != t.shape:
        raise ValueError(f"prediction {p.shape} and truth {t.shape} differ in shape")
    tp = int(np.count_nonzero(p & t))
    fp = int(np.count_nonzero(p & ~t))
    fn = int(np.count_nonzero(~p & t))
    tn = int(p.size - tp - fp - fn)
    return tp, fp, fn, tn


def _ratio(num: float, den: float) -> float:
    """num/den, with 0/0 = 1 (nothing to find and nothing found is perfect)."""
    return 1.0 if den == 0 else num / den


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    tp, fp, fn, _ = _counts(pred, truth)
    return _ratio(2 * tp, 2 * tp + fp + fn)


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    tp, fp, fn, _ = _counts(pred, truth)
    return _ratio(tp, tp + fp + fn)


def sensitivity(pred: np.ndarray, truth: np.ndarray) -> float:
    tp, _, fn, _ = _counts(pred, truth)
    return _ratio(tp, tp + fn)


def specificity(pred: np.ndarray, truth: np.ndarray) -> float:
    _, fp, _, tn = _counts(pred, truth)
    return _ratio(tn, tn + fp)


def auc(prob: np.ndarray, truth: np.ndarray) -> float:
    """ROC AUC by the rank-sum formula; NaN when the truth has a single class."""
    p = np.asarray(prob, np.float64).ravel()
    t = np.asarray(truth, bool).ravel()
    if p.shape != t.shape:
        raise ValueError(f"probabilities {p.shape} and truth {t.shape} differ in size")
    n_pos = int(t.sum())
    n_neg = t.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(p)  # average ranks for ties
    u = ranks[t].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _skeleton(mask: np.ndarray) -> np.ndarray:
    m = np.asarray(mask, bool)
    return skeletonize(m) if m.any() else m


def cldice(pred: np.ndarray, truth: np.ndarray) -> float:
    p, t = np.asarray(pred, bool), np.asarray(truth, bool)
    if not p.any() and not t.any():
        return 1.0
    sp, st = _skeleton(p), _skeleton(t)
    tprec = _ratio(int(np.count_nonzero(sp & t)), int(np.count_nonzero(sp)))
    tsens = _ratio(int(np.count_nonzero(st & p)), int(np.count_nonzero(st)))
    return 0.0 if tprec + tsens == 0 else 2 * tprec * tsens / (tprec + tsens)


def components(mask: np.ndarray) -> int:
    """Number of 8-connected (2D) or 26-connected (3D) foreground components."""
    m = np.asarray(mask, bool)
    structure = np.ones((3,) * m.ndim, bool)
    return int(ndimage.label(m, structure=structure)[1])


def connectivity(pred: np.ndarray, truth: np.ndarray) -> float:
    return (components(pred) + 1) / (components(truth) + 1)


def binary_metrics(
    pred: np.ndarray, truth: np.ndarray, prob: np.ndarray | None = None, topology: bool = True
) -> dict[str, float]:
    """Every single-class metric of one case (AUC only when probabilities are given)."""
    tp, fp, fn, tn = _counts(pred, truth)
    out = {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn),
        "iou": _ratio(tp, tp + fp + fn),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
    }
    if prob is not None:
        out["auc"] = auc(prob, truth)
    if topology:
        out["cldice"] = cldice(pred, truth)
        out["connectivity"] = connectivity(pred, truth)
    return out


def av_metrics(
    pred_artery: np.ndarray, pred_vein: np.ndarray, true_artery: np.ndarray, true_vein: np.ndarray
) -> dict[str, float]:
    """A-Dice, V-Dice and M-Dice (pooled over the two channels)."""
    ta, fa, na, _ = _counts(pred_artery, true_artery)
    tv, fv, nv, _ = _counts(pred_vein, true_vein)
    return {
        "a_dice": _ratio(2 * ta, 2 * ta + fa + na),
        "v_dice": _ratio(2 * tv, 2 * tv + fv + nv),
        "m_dice": _ratio(2 * (ta + tv), 2 * (ta + tv) + fa + na + fv + nv),
    }


def frame_mean(fn, pred: np.ndarray, truth: np.ndarray, **kw) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """A 2D metric function averaged over the frames of (T, H, W) masks (per-frame truth)."""
    rows = [
        fn(
            pred[i],
            truth[i],
            **{k: (v[i] if isinstance(v, np.ndarray) else v) for k, v in kw.items()},
        )
        for i in range(pred.shape[0])
    ]
    return {k: float(np.nanmean([r[k] for r in rows])) for k in rows[0]}


def aggregate(cases: Sequence[Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Mean, std (ddof 0) and count of every metric over cases, NaNs left out."""
    keys: list[str] = []
    for case in cases:
        keys += [k for k in case if k not in keys]
    out: dict[str, dict[str, float]] = {}
    for key in keys:
        values = np.asarray([c[key] for c in cases if key in c and not _isnan(c[key])], float)
        if values.size == 0:
            nan = float("nan")
            out[key] = {"mean": nan, "std": nan, "sd": nan, "ci95": [nan, nan], "n": 0}
            continue
        out[key] = {
            "mean": float(values.mean()),
            "std": float(values.std()),
            **_spread(values),
            "n": int(values.size),
        }
    return out


def _spread(values: np.ndarray) -> dict[str, float | list[float]]:
    """Sample SD and the t-based 95 % CI of the mean (NaN below two values)."""
    n = values.size
    if n < 2:
        return {"sd": float("nan"), "ci95": [float("nan"), float("nan")]}
    mean, sd = float(values.mean()), float(values.std(ddof=1))
    half = float(stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n))
    return {"sd": sd, "ci95": [mean - half, mean + half]}


def _isnan(v: float) -> bool:
    return isinstance(v, float) and math.isnan(v)


def format_table(
    rows: Mapping[str, Mapping[str, Mapping[str, float]]], metrics: Iterable[str]
) -> str:
    """A markdown table: one row per method, 'mean ± SD (95 % CI lo to hi)' per metric
    (sample SD; one case has neither)."""
    metrics = list(metrics)
    lines = ["| method | n | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for name, agg in rows.items():
        n = max((int(agg[m]["n"]) for m in metrics if m in agg), default=0)
        lines.append(f"| {name} | {n} | " + " | ".join(_cell(agg.get(m)) for m in metrics) + " |")
    return "\n".join(lines)


def _cell(a: Mapping[str, float] | None) -> str:
    if not a or not a["n"]:
        return "–"
    if a["n"] < 2 or "ci95" not in a:
        return f"{a['mean']:.3f} (n={int(a['n'])}: no SD)" if a["n"] < 2 else f"{a['mean']:.3f}"
    lo, hi = a["ci95"]  # type: ignore[misc]
    return f"{a['mean']:.3f} ± {a['sd']:.3f} (95 % CI {lo:.3f} to {hi:.3f})"
