"""Training configurations as TOML files, validated before anything is loaded.

One file per task (``python -m training config TASK`` writes the defaults)::

    task = "dsa_av"            # optional; when given it must be the task trained

    [train]                    # TrainConfig fields: epochs, steps_per_epoch, lr, ...
    epochs = 40
    lr = 3e-3

    [model]                    # the architecture's config and the pipeline's keys
    widths = [16, 32, 64, 128]
    work_spacing_mm = "auto"

Precedence: the task's defaults (or a ``quick`` recipe) < the file (``--config-file``)
< the command line (``--epochs`` ...; ``--config`` JSON for ``[model]`` keys). An
unknown key or a value of the wrong type or range is refused with the key named
(pydantic, strict types). TOML has no null: the string ``"none"`` stands for "no
value" where a key allows one (``fps = "none"``: every frame). The engine writes
the resolved configuration of every run as ``config.toml`` next to its checkpoints;
given back with ``--config-file`` it trains the same run again.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError

NONE = "none"

PosInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]


class ConfigError(Exception):
    """A configuration file or value that cannot be used, naming the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TrainTable(_Strict):
    """``[train]``: the engine's options (``training.engine.TrainConfig``)."""

    mode: Literal["full", "sscr", "rpst"] | None = None
    epochs: PosInt | None = None
    steps_per_epoch: PosInt | None = None
    batch_size: PosInt | None = None
    patch: PosInt | None = None
    optimizer: Literal["adamw", "adam", "rmsprop", "sgd"] | None = None
    lr: PosFloat | None = None
    weight_decay: NonNegFloat | None = None
    schedule: Literal["cosine", "plateau"] | None = None
    warmup_epochs: NonNegInt | None = None
    early_stop: PosInt | None = None
    seed: int | None = None
    device: Literal["auto", "cpu", "cuda"] | None = None
    amp: bool | None = None
    max_val_cases: PosInt | None = None
    lambda_cps: NonNegFloat | None = None
    lambda_cr: NonNegFloat | None = None
    use_ps: bool | None = None
    use_cps: bool | None = None
    use_cr: bool | None = None
    rpst_rounds: PosInt | None = None
    teacher_epochs: PosInt | None = None
    strong_augment: bool | None = None
    no_validation: bool | None = None


Role = Literal["artery", "vein", "ica"]


class _Sequence(_Strict):
    """Keys the DSA pipelines read from a package (``pipelines.preprocess``)."""

    channels: list[Role] | None = None
    fps: PosFloat | None = None
    min_frames: PosInt | None = None
    max_frames: PosInt | None = None
    max_side: PosInt | None = None
    work_spacing_mm: PosFloat | Literal["auto"] | None = None
    tile: PosInt | None = None
    overlap: NonNegInt | None = None


class StUnet(_Sequence):
    in_channels: PosInt | None = None
    out_channels: PosInt | None = None
    widths: Annotated[list[PosInt], Field(min_length=1)] | None = None
    gru_layers: PosInt | None = None
    kernel_size: PosInt | None = None
    chunk: PosInt | None = None


class VssNet(_Sequence):
    out_channels: PosInt | None = None
    widths: Annotated[list[PosInt], Field(min_length=1)] | None = None


class CeNet(_Strict):
    neighbours: NonNegInt | None = None
    width: PosInt | None = None
    blocks: Annotated[list[PosInt], Field(min_length=4, max_length=4)] | None = None
    temporal_features: PosInt | None = None
    threshold: Annotated[float, Field(gt=0, lt=1)] | None = None
    max_side: PosInt | None = None
    work_spacing_mm: PosFloat | Literal["auto"] | None = None


class Dla(_Strict):
    width: PosInt | None = None
    hu_scale: PosFloat | None = None


class IcaUnet(_Strict):
    in_channels: PosInt | None = None
    classes: PosInt | None = None
    width: PosInt | None = None
    levels: PosInt | None = None
    max_width: PosInt | None = None


MODEL_TABLES: dict[str, type[_Strict]] = {
    "st_unet": StUnet,
    "vss_net": VssNet,
    "ce_net_3d2d": CeNet,
    "dla_resnet": Dla,
    "ica_unet": IcaUnet,
}
TRAIN_KEYS = tuple(TrainTable.model_fields)


def _nones(values: Mapping[str, Any]) -> dict[str, Any]:
    """``"none"`` -> None (TOML has no null)."""
    return {k: (None if v == NONE else v) for k, v in values.items()}


def _describe(exc: ValidationError, where: str, table: str, known: list[str]) -> str:
    lines = []
    for e in exc.errors():
        key = ".".join([table, *(str(p) for p in e["loc"])])
        if e["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key (known in [{table}]: {', '.join(known)})")
        else:
            lines.append(f"{key}: {e['msg']} (got {e.get('input')!r})")
    return f"{where}: " + "; ".join(lines)


def validate_train(values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The ``[train]`` keys given, checked; None values are left out."""
    try:
        table = TrainTable.model_validate(_nones(values))
    except ValidationError as exc:
        raise ConfigError(_describe(exc, where, "train", list(TRAIN_KEYS))) from None
    return {k: v for k, v in table.model_dump(exclude_unset=True).items() if v is not None}


def validate_model(architecture: str, values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The ``[model]`` keys given, checked against the architecture and its pipeline; the
    values stay as given ("none" becomes None)."""
    schema = MODEL_TABLES.get(architecture)
    if schema is None:
        raise ConfigError(f"{where}: no configuration schema for architecture {architecture!r}")
    given = _nones(values)
    try:
        schema.model_validate(given)
    except ValidationError as exc:
        known = sorted(schema.model_fields)
        raise ConfigError(
            _describe(exc, where, "model", known).replace("[model]", f"[model] of {architecture}")
        ) from None
    return given


def load_file(path: str | Path, task: str, architecture: str) -> tuple[dict, dict]:
    """(train options, model config) from a TOML file for ``task``."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"--config-file {p} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config-file {p} is not valid TOML: {exc}") from None
    unknown = sorted(set(data) - {"task", "train", "model"})
    if unknown:
        raise ConfigError(
            f"{p}: unknown key(s) {', '.join(unknown)} (known: task, [train], [model])"
        )
    if "task" in data and data["task"] != task:
        raise ConfigError(f"{p}: task = {data['task']!r}, but the task trained is {task!r}")
    for table in ("train", "model"):
        if not isinstance(data.get(table, {}), dict):
            raise ConfigError(f"{p}: {table} must be a table ([{table}])")
    train = validate_train(data.get("train", {}), str(p))
    model = validate_model(architecture, data.get("model", {}), str(p))
    return train, model


def to_toml(task: str, train: Mapping[str, Any], model: Mapping[str, Any], header: str) -> str:
    """A configuration file (None written as "none"); it loads back to the same values."""

    def table(values: Mapping[str, Any], keys: list[str]) -> dict[str, Any]:
        return {k: (NONE if values[k] is None else values[k]) for k in keys if k in values}

    doc = {
        "task": task,
        "train": table(train, [k for k in TRAIN_KEYS if k in train]),
        "model": table(model, sorted(model)),
    }
    comment = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    return comment + tomli_w.dumps(doc)


def template(task_name: str) -> str:
    """The defaults of a task as a configuration file to copy and edit."""
    from training.engine import TrainConfig
    from training.tasks import get_task

    task = get_task(task_name)
    cfg = TrainConfig(task=task_name, model_config=dict(task.default_config))
    opts = {k: v for k, v in cfg.resolved(task).items() if k in TRAIN_KEYS}
    return to_toml(
        task_name,
        opts,
        dict(task.default_config),
        f"Training configuration of {task_name} ({task.architecture}): the defaults.\n"
        "python -m training train --task TASK --config-file THIS ... (options given on\n"
        f"the command line win). [model] keys of {task.architecture}: "
        + ", ".join(sorted(MODEL_TABLES[task.architecture].model_fields)),
    )
