"""What a package says about itself: the model card text, and the figures written
next to the checkpoints (learning curve, example predictions), drawn with Pillow.

The card states the intended use, the data it was trained on with the dataset
manifest hash, the headline evaluation on data the model was not trained on
(generator family B or site data) next to the classical path on the same cases,
held-out metrics of the training family as mean ± std, the training command,
and, when any training data is synthetic, a warning that no clinical
performance is claimed. Every figure is of the node's own pipeline output.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageFont

from pipelines.render import burn_text, overlay, to_grey_rgb

if TYPE_CHECKING:
    from training.dataset import Case
    from training.tasks import Masks, Task

INTENDED_USE = {
    "dsa_av": "Artery/vein segmentation of subtracted cerebral 2D+t DSA runs (ST U-Net), "
    "loaded by the node's dsa_av pipeline.",
    "dsa_ia": "Intracranial artery segmentation of subtracted cerebral 2D+t DSA runs (VSS-Net), "
    "loaded by the node's dsa_ia pipeline.",
    "xa_coronary": "Per-frame coronary vessel segmentation of unsubtracted XA cine runs "
    "(3D-2D CE-Net), loaded by the node's xa_coronary pipeline.",
    "rotational_dla": "Vessel / bone / soft-tissue voxel classification of contrast-filled "
    "C-arm CT volumes (DLA), loaded by the node's rotational_dla pipeline.",
    "dsa_perfusion": "Internal carotid artery segmentation on the MinIP of a cerebral DSA run "
    "(ICA U-Net), used by the dsa_perfusion pipeline to place the AIF.",
}
SYNTHETIC_WARNING = (
    "**Warning: trained on synthetic data.** Every training case comes from the phantom "
    "generator, not from patients. The held-out figures below are on phantoms too; they say "
    "nothing about performance on clinical images. Do not use for diagnosis; validate on your "
    "own annotated archive first."
)


def _metric_lines(aggregate: Mapping[str, Mapping[str, float]]) -> list[str]:
    from training.metrics import _cell

    lines = ["| metric | mean ± SD (95 % CI of the mean) | n |", "|---|---|---|"]
    for name, v in aggregate.items():
        if v.get("n"):
            lines.append(f"| {name} | {_cell(v)} | {int(v['n'])} |")
    return lines


def _evaluation_lines(evaluation: Mapping[str, Any] | None) -> list[str]:
    """The shipping gate's evaluation: model and classical path on the same unseen cases."""
    if not evaluation:
        return [
            "## Evaluation on data the model was not trained on",
            "",
            "None recorded.",
            "",
        ]

    def row(label: str, s: Mapping[str, Any]) -> str:
        lo, hi = s["ci95"]
        return f"| {label} | {s['mean']:.3f} | {s['sd']:.3f} | {lo:.3f} to {hi:.3f} | {s['n']} |"

    verdict = "beats" if evaluation["beats_classical_by_required_margin"] else "does **not** beat"
    return [
        "## Evaluation on data the model was not trained on (the headline)",
        "",
        f"Dataset `{evaluation['dataset']}` version {evaluation['dataset_version']} "
        f"(manifest sha256 `{evaluation['manifest_sha256']}`; {evaluation['source']}); "
        f"families: {', '.join(evaluation['families'])}; the model was trained on: "
        f"{', '.join(evaluation['trained_on'])}. {evaluation['evaluated_with']}.",
        "",
        f"| {evaluation['metric']} | mean | SD | 95 % CI of the mean | n |",
        "|---|---|---|---|---|",
        row("model", evaluation["model"]),
        row("classical path", evaluation["classical"]),
        row("model - classical (paired)", evaluation["difference"]),
        "",
        *_by_dataset_lines(evaluation),
        f"The model {verdict} the classical path by the required "
        f"{evaluation['required_margin']}"
        + (" on every dataset." if evaluation.get("by_dataset") else " here."),
        "",
    ]


def _by_dataset_lines(evaluation: Mapping[str, Any]) -> list[str]:
    """Each evaluation dataset's own figures, when there are several (the gate takes the
    worst of them)."""
    parts = evaluation.get("by_dataset")
    if not parts:
        return []
    lines = [
        f"Per dataset ({evaluation['metric']}, mean ± SD; the gate is decided by "
        f"`{evaluation['decided_by']}`):",
        "",
        "| dataset | n | model | classical path | difference (95 % CI) |",
        "|---|---|---|---|---|",
    ]
    for r in parts:
        d = r["difference"]
        lo, hi = d["ci95"]
        lines.append(
            f"| `{r['dataset']}` ({r['source']}) | {r['n']} "
            f"| {r['model']['mean']:.3f} ± {r['model']['sd']:.3f} "
            f"| {r['classical']['mean']:.3f} ± {r['classical']['sd']:.3f} "
            f"| {d['mean']:+.3f} ({lo:+.3f} to {hi:+.3f}) |"
        )
    return [*lines, ""]


def model_card(
    *,
    task: Task,
    name: str,
    version: str,
    parameters: int,
    metrics: Mapping[str, Any],
    data: Mapping[str, Any],
    training: Mapping[str, Any],
    training_command: str,
    dataset_sha256: str,
    evaluation: Mapping[str, Any] | None = None,
    record: Mapping[str, Any] | None = None,
) -> str:
    synthetic = bool(data.get("synthetic", True))
    out = [f"# Model card: {name} {version}", ""]
    if synthetic:
        out += [SYNTHETIC_WARNING, ""]
    out += [
        "## Intended use",
        "",
        INTENDED_USE.get(task.name, f"Segmentation for the {task.pipeline} pipeline."),
        "Research use. Outputs are labelled as AI output by the node and are not for diagnosis "
        "unless validated locally.",
        "",
        "## Model",
        "",
        f"- architecture: `{task.architecture}` ({parameters:,} parameters)",
        f"- pipeline: `{task.pipeline}`; outputs: {', '.join(task.channels)}",
        f"- training mode: {training.get('mode', 'full')}; "
        f"optimizer {training.get('optimizer')} lr {training.get('lr')}, schedule "
        f"{training.get('schedule')}, {training.get('epochs')} epochs x "
        f"{training.get('steps_per_epoch')} steps, batch {training.get('batch_size')}, "
        f"patch {training.get('patch')}, seed {training.get('seed')}",
        "",
        "## Training data",
        "",
        f"- dataset manifest sha256: `{dataset_sha256}`",
        f"- source: {data.get('source', 'unknown')}",
        "- cases: " + ", ".join(f"{k} {v}" for k, v in data.get("counts", {}).items()),
        f"- synthetic: {'yes (phantoms)' if synthetic else 'no'}",
        "- split by patient: no Patient ID appears in more than one of train / val / test.",
        "",
    ]
    out += _evaluation_lines(evaluation)
    out += [
        "## Held-out metrics of the training data's own family",
        "",
        f"Test split of the training dataset, {metrics.get('evaluated_with', 'the node')}. "
        "Not the headline: it comes from the distribution the model learned.",
        "",
    ]
    agg = metrics.get("aggregate", {})
    out += _metric_lines(agg) if agg else ["No annotated test case: no held-out metric."]
    out += [
        "",
        "## Limitations",
        "",
        "- Trained on the data above only; other vendors, protocols, frame rates and "
        "pathologies may fail silently.",
        "- The pipeline thresholds at 0.5; no calibration was done.",
        "",
    ]
    out += _reproduce_lines(training_command, record or {})
    return "\n".join(out)


def _reproduce_lines(command: str, record: Mapping[str, Any]) -> list[str]:
    """How the weights were trained, and the command that trains them again."""
    out = ["## Reproduce", ""]
    if not record:
        return [*out, "Trained with (no run record):", "", "```", command, "```", ""]
    code = record.get("code", {})
    versions = record.get("versions", {})
    device = record.get("device", {})
    dataset = record.get("dataset", {})
    commit = code.get("commit") or "unknown"
    if code.get("uncommitted_changes"):
        commit += " with uncommitted changes to " + ", ".join(code.get("changed_files", []))
    out += [
        f"Trained with `{record.get('command', command)}` "
        f"(world size {record.get('world_size', 1)}; "
        f"{len(record.get('parts', [])) or 1} part(s)) on {device.get('type', '?')} "
        f"({device.get('name', '?')}), code commit {commit}; "
        + ", ".join(f"{k} {v}" for k, v in versions.items())
        + f". Dataset {dataset.get('name')} version {dataset.get('version')} "
        f"(`{dataset.get('path')}`, manifest sha256 `{dataset.get('manifest_sha256')}`). "
        "The resolved configuration is this package's training_config.toml (the same file "
        "as the run's config.toml). Trains it again "
        + (f"(from `{record['cwd']}`)" if record.get("cwd") else "")
        + ":",
        "",
        "```",
        str(record.get("reproduce", command)),
        "```",
        "",
    ]
    return out


# ---------------------------------------------------------------------------
# Figures


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _view(task: Task, case: Case, pred: Masks) -> tuple[np.ndarray, Masks, Masks]:
    """(grey image, truth masks, the node's masks) of one representative plane."""
    truth = task.truth(case)
    roles = task.drawn()
    if task.geometry == "canvas":
        return case.pixels.min(axis=0), truth, pred
    first = truth[roles[0]]
    k = int(first.reshape(first.shape[0], -1).sum(axis=1).argmax())
    return (
        case.pixels[k],
        {r: m[k] for r, m in truth.items()},
        {r: np.asarray(m)[k] for r, m in pred.items()},
    )


COLOURS = [(255, 40, 40), (40, 110, 255), (255, 200, 0)]


def example_png(path: Path, task: Task, case: Case, pred: Masks, title: str) -> Path:
    """Three panels: the input, the truth over it, the node's masks over it."""
    image, truth, shown_pred = _view(task, case, pred)
    zoom = max(1, 256 // min(image.shape))  # small test images are enlarged to be legible

    def up(a: np.ndarray) -> np.ndarray:
        return np.repeat(np.repeat(a, zoom, axis=-2), zoom, axis=-1)

    base = to_grey_rgb(up(image))
    shown = task.drawn()[: len(COLOURS)]
    colours = COLOURS[: len(shown)]
    empty = np.zeros(image.shape, bool)

    def layers(masks: Masks) -> list[np.ndarray]:
        return [up(np.asarray(masks.get(r, empty), bool)) for r in shown]

    panels = [
        burn_text(base, [f"{case.id[:12]} input"]),
        burn_text(overlay(base, layers(truth), colours), ["truth"]),
        burn_text(overlay(base, layers(shown_pred), colours), [f"node output ({title})"]),
    ]
    Image.fromarray(np.concatenate(panels, axis=1)).save(path)
    return path
