"""Following a run: TensorBoard event files, MLflow (when a tracking URI is set), a
per-epoch metrics table and readable learning curves, all written by rank 0.

- ``tensorboard/``: event files (``torch.utils.tensorboard``): ``train/loss``,
  ``train/lr``, ``val/<metric>`` (the node's pipeline on the validation runs),
  ``time/epoch_s``, the resolved configuration as text. ``tensorboard --logdir
  runs/`` shows them. A resumed run purges events past its checkpoint, so a part
  interrupted after its last checkpoint leaves no doubled points.
- ``metrics.csv`` and ``metrics.json``: one row per epoch (phase, epoch, step,
  train_loss, lr, the monitored quantity, every validation metric with its n),
  rewritten from the checkpointed history, so they match the run after a resume.
- ``learning_curve.png``: training loss and validation metrics per epoch, with
  axes, ticks, legends and phase boundaries (matplotlib).
- MLflow: with ``MLFLOW_TRACKING_URI`` set (or ``--mlflow-uri``), parameters, the
  per-epoch metrics and the run's files go to that server or folder, one MLflow
  run per training run (a resume continues it). mlflow is optional; a URI without
  it installed is refused with the package named.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CSV_FIXED = ("phase", "epoch", "global_epoch", "step", "train_loss", "lr", "monitor", "score")


class TrackingError(Exception):
    """Tracking that was asked for and cannot be done (mlflow missing), with the reason."""


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in values.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def rows(history: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per epoch; histories of runs started before ``monitor`` was recorded
    read as the validation metric they monitored."""
    out = []
    for i, h in enumerate(history):
        row = {
            "phase": h["phase"],
            "epoch": h["epoch"],
            "global_epoch": i + 1,
            "step": h.get("step"),
            "train_loss": h["loss"],
            "lr": h.get("lr"),
            "monitor": h.get("monitor", "val"),
            "score": h["score"],
        }
        for name, value in sorted((h.get("val") or {}).items()):
            row[f"val_{name}"] = value
        for name, n in sorted((h.get("val_n") or {}).items()):
            row[f"val_{name}_n"] = n
        row["seconds"] = h.get("seconds")
        out.append(row)
    return out


def write_table(workdir: Path, history: Sequence[Mapping[str, Any]]) -> None:
    table = rows(history)
    more = sorted({k for r in table for k in r} - set(CSV_FIXED) - {"seconds"})
    columns = [*CSV_FIXED, *more, "seconds"]
    with open(workdir / "metrics.csv.part", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(table)
    os.replace(workdir / "metrics.csv.part", workdir / "metrics.csv")
    (workdir / "metrics.json.part").write_text(json.dumps(table, indent=1) + "\n")
    os.replace(workdir / "metrics.json.part", workdir / "metrics.json")


def learning_curve(
    path: Path, history: Sequence[Mapping[str, Any]], title: str, monitor: str
) -> Path:
    """Two panels: the training loss (and learning rate), and the validation metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    table = rows(history)
    x = [r["global_epoch"] for r in table]
    # Scores in [0, 1] share the panel; the connectivity ratio and failure counts are in
    # metrics.csv.
    val_names = sorted(
        {k[4:] for r in table for k in r if k.startswith("val_") and not k.endswith("_n")}
        - {"failed", "connectivity"}
    )
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    ax_loss.plot(x, [r["train_loss"] for r in table], "o-", color="tab:blue", label="train loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss (mean over the epoch's steps)")
    ax_lr = ax_loss.twinx()
    ax_lr.plot(x, [r["lr"] for r in table], "--", color="tab:gray", label="learning rate")
    ax_lr.set_ylabel("learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    lines = ax_loss.get_legend_handles_labels()
    more = ax_lr.get_legend_handles_labels()
    ax_loss.legend(lines[0] + more[0], lines[1] + more[1], loc="upper right", fontsize=8)
    if val_names:
        for name in val_names:
            style = "o-" if f"val_{name}" == monitor else ".-"
            ax_val.plot(x, [r.get(f"val_{name}") for r in table], style, label=name, linewidth=1.5)
        ax_val.set_ylabel("validation (the node's pipeline output)")
        ax_val.legend(loc="lower right", fontsize=8, ncol=2)
        best = max(range(len(table)), key=lambda i: table[i]["score"])
        ax_val.axvline(x[best], color="tab:green", linestyle=":", label="best epoch")
        ax_val.set_title(f"monitored: {monitor}; best at epoch {x[best]}", fontsize=9)
    else:
        ax_val.text(
            0.5,
            0.5,
            "no validation run:\nthe training loss was monitored",
            ha="center",
            va="center",
            transform=ax_val.transAxes,
        )
    ax_val.set_xlabel("epoch")
    for ax in (ax_loss, ax_val):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        phases = [r["phase"] for r in table]
        for i in range(1, len(phases)):
            if phases[i] != phases[i - 1]:
                ax.axvline(x[i] - 0.5, color="black", alpha=0.4)
                ax.text(x[i] - 0.4, 0.02, phases[i], transform=ax.get_xaxis_transform())
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


class Tracker:
    """Rank 0's writers for one run in ``workdir``."""

    def __init__(
        self,
        workdir: Path,
        *,
        params: Mapping[str, Any],
        config_text: str,
        resume_epoch: int,
        mlflow_uri: str | None = None,
        experiment: str = "angio-training",
    ) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.workdir = Path(workdir)
        # purge_step: events a part wrote after its last checkpoint are dropped on resume.
        self.tb = SummaryWriter(
            str(self.workdir / "tensorboard"), purge_step=resume_epoch + 1 if resume_epoch else None
        )
        if not resume_epoch:
            self.tb.add_text("config", "```\n" + config_text + "\n```", 0)
        self.mlflow: Any = None
        uri = mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if uri:
            self.mlflow = _start_mlflow(uri, experiment, self.workdir, params)

    def epoch(self, history: Sequence[Mapping[str, Any]]) -> None:
        """Log the newest epoch of ``history`` and rewrite the table."""
        row = rows(history)[-1]
        step = row["global_epoch"]
        self.tb.add_scalar("train/loss", row["train_loss"], step)
        if row["lr"] is not None:
            self.tb.add_scalar("train/lr", row["lr"], step)
        values = {
            k[4:]: v
            for k, v in row.items()
            if k.startswith("val_") and not k.endswith("_n") and v is not None
        }
        for name, value in values.items():
            self.tb.add_scalar(f"val/{name}", value, step)
        if row["seconds"] is not None:
            self.tb.add_scalar("time/epoch_s", row["seconds"], step)
        self.tb.flush()
        write_table(self.workdir, history)
        if self.mlflow is not None:
            metrics = {
                "train_loss": row["train_loss"],
                **{f"val_{k}": v for k, v in values.items()},
            }
            if row["lr"] is not None:
                metrics["lr"] = row["lr"]
            self.mlflow.log_metrics(metrics, step=step)

    def close(self, artifacts: Sequence[Path] = ()) -> None:
        self.tb.close()
        if self.mlflow is not None:
            for path in artifacts:
                if Path(path).is_file():
                    self.mlflow.log_artifact(str(path))
            self.mlflow.end_run()
            self.mlflow = None


def _start_mlflow(uri: str, experiment: str, workdir: Path, params: Mapping[str, Any]) -> Any:
    try:
        import mlflow
    except ImportError:
        raise TrackingError(
            f"an MLflow tracking URI is set ({uri}) but the package mlflow is not installed: "
            "pip install mlflow (or mlflow-skinny), or unset MLFLOW_TRACKING_URI"
        ) from None
    mlflow.set_tracking_uri(uri)
    id_file = workdir / "mlflow_run_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else None
    try:
        mlflow.set_experiment(experiment)
        run = mlflow.start_run(run_id=run_id, run_name=workdir.name)
    except mlflow.exceptions.MlflowException as exc:  # a refusal of the tracking server
        raise TrackingError(f"MLflow at {uri}: {exc}") from None
    if run_id is None:
        id_file.write_text(run.info.run_id + "\n")
        flat = {k: str(v)[:500] for k, v in flatten(params).items()}
        keys = sorted(flat)
        for i in range(0, len(keys), 100):  # MLflow takes at most 100 params per call
            mlflow.log_params({k: flat[k] for k in keys[i : i + 100]})
    log.info("MLflow: run %s at %s", run.info.run_id, uri)
    return mlflow
