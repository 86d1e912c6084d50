"""``python -m training``: build-dataset, train, calibrate, evaluate, package, quick,
tune-classical.

    python -m training build-dataset --dicomweb http://pacs/dicom-web --out data/dsa-v1 \\
        --pseudonym-map ~/secure/dsa-v1-pseudonyms.json
    python -m training train --dataset data/dsa-v1 --task dsa_av --workdir runs/av1
    torchrun --nproc-per-node 2 -m training train ...      # DDP, same options
    python -m training calibrate --model runs/dla1/model.pt --dataset data/rot-v1 \\
        --out runs/dla1/model-calibrated.pt  # DLA: the vessel decision on validation runs
    python -m training evaluate --model runs/av1/model.pt --dataset data/dsa-v1
    python -m training package --model runs/av1/model.pt --dataset data/dsa-v1 \\
        --eval-dataset data/family-b --out models/dsa-av-1.0.0 --name dsa-av --version 1.0.0
    python -m training quick dsa_av --workdir runs/av-quick --eval-family B \\
        --out models/dsa_av-quick-1 --version 1.0.0  # phantoms -> engine -> package

Errors (a source, a dataset, a task, a gate or a package that cannot be used,
an invalid option) end the command with a message and exit status 2, here and
nowhere else. A dataset holding phantom generator family B (evaluation-only) is
refused for training; a package is written only with an evaluation on data the
model was not trained on (``training.gate``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dicom_node.errors import NodeError
from pipelines.base import PipelineError
from training import metrics as M
from training.config import ConfigError
from training.dataset import BuildOptions, DatasetError, build_dataset, load_dataset, manifest_hash
from training.gate import REQUIRED_MARGIN, GateError, refuse_evaluation_only
from training.record import command as record_command
from training.scribbles import ScribbleError
from training.sources import SourceError, SpoolSource, open_source
from training.tasks import TASKS, TaskError
from training.tracking import TrackingError

log = logging.getLogger("training")


class UsageError(Exception):
    """An option value the command cannot use."""


def json_option(text: str | None, option: str) -> dict[str, Any]:
    """A JSON object given on the command line, or a UsageError that shows the problem."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"{option}: invalid JSON ({exc.msg} at column {exc.colno}): {text}"
        ) from None
    if not isinstance(value, dict):
        raise UsageError(f"{option}: expected a JSON object, got {text}")
    return value


def cmd_build(args: argparse.Namespace) -> int:
    password = os.environ.get(args.password_env) if args.password_env else None
    token = os.environ.get(args.token_env) if args.token_env else None
    source = open_source(
        dicomweb=args.dicomweb,
        spool=args.spool,
        folder=args.folder,
        cache_dir=args.cache or Path(args.out).with_name(Path(args.out).name + "-cache"),
        username=args.username,
        password=password,
        bearer_token=token,
    )
    options = BuildOptions(
        out=Path(args.out),
        pseudonym_map=Path(args.pseudonym_map),
        name=args.name,
        version=args.version,
        test_fraction=args.test_fraction,
        val_fraction=args.val_fraction,
        seed=args.seed,
        include_unlabelled=args.include_unlabelled,
        deidentify=not args.no_deidentify,
        export_dicom=args.export_dicom,
        previous=Path(args.previous) if args.previous else None,
        force=args.force,
    )
    manifest = build_dataset(source, options, progress=lambda m: print(m, file=sys.stderr))
    print(json.dumps(manifest["counts"], sort_keys=True))
    for p in manifest["problems"]:
        print(f"left out {p['uid']}: {p['reason']}", file=sys.stderr)
    print(f"manifest sha256 {manifest_hash(Path(args.out))}")
    return 0 if manifest["cases"] else 2


def _select(cases: list[Any], split: str, labelled: int | None) -> list[Any]:
    chosen = sorted((c for c in cases if c.split == split and c.labelled), key=lambda c: c.id)
    return chosen[:labelled] if labelled is not None else chosen


TRAIN_OPTIONS = {
    # TrainConfig field: command-line option (the same for train and quick)
    "mode": "mode",
    "epochs": "epochs",
    "steps_per_epoch": "steps",
    "batch_size": "batch",
    "patch": "patch",
    "optimizer": "optimizer",
    "lr": "lr",
    "weight_decay": "weight_decay",
    "schedule": "schedule",
    "early_stop": "early_stop",
    "warmup_epochs": "warmup_epochs",
    "seed": "seed",
    "device": "device",
    "rpst_rounds": "rounds",
    "teacher_epochs": "teacher_epochs",
    "max_val_cases": "max_val_cases",
}


FLAGS = {
    # TrainConfig field: (command-line flag, the value the flag sets)
    "amp": ("no_amp", False),
    "use_ps": ("no_ps", False),
    "use_cps": ("no_cps", False),
    "use_cr": ("no_cr", False),
    "no_validation": ("no_validation", True),
    "strong_augment": ("strong_augment", True),
}


def train_config(
    args: argparse.Namespace,
    base: dict[str, Any] | None = None,
    base_model_config: dict[str, Any] | None = None,
) -> Any:
    """TrainConfig: the defaults < ``base`` (a recipe) < ``--config-file`` < the options
    given < ``--config`` JSON (model keys); every layer validated, naming the key."""
    from training.config import load_file, validate_model, validate_train
    from training.engine import TrainConfig
    from training.tasks import get_task

    values: dict[str, Any] = dict(base or {})
    task_name = values.pop("task", None) or args.task
    task = get_task(task_name)
    model: dict[str, Any] = dict(base_model_config or {})
    if getattr(args, "config_file", None):
        file_train, file_model = load_file(args.config_file, task_name, task.architecture)
        values.update(file_train)
        model.update(file_model)
    given = {
        field_name: getattr(args, option)
        for field_name, option in TRAIN_OPTIONS.items()
        if getattr(args, option, None) is not None
    }
    for field_name, (flag, value) in FLAGS.items():
        if getattr(args, flag, False):
            given[field_name] = value
    values.update(validate_train(given, "command line"))
    values = validate_train(values, "training configuration")
    model.update(
        validate_model(task.architecture, json_option(args.config, "--config"), "--config")
    )
    validate_model(task.architecture, model, "model configuration")
    return TrainConfig(
        task=task_name,
        **values,
        model_config=model,
        progress=not args.no_progress,
    )


def run_record(
    args: argparse.Namespace,
    subcommand: list[str],
    workdir: Path,
    manifest: dict[str, Any],
    dataset: str | Path,
    config_file: Path | None = None,
) -> dict[str, Any]:
    """What the engine records of the command (``training.record``)."""
    from training import record as R

    config_file = config_file or workdir / "config.toml"
    return {
        "command": args.command_line,
        "reproduce": R.reproduce(subcommand, workdir, config_file),
        "cwd": os.getcwd(),
        "dataset": {
            "path": str(dataset),
            "name": manifest.get("name"),
            "version": manifest.get("version"),
        },
    }


def cmd_train(args: argparse.Namespace) -> int:
    from training.engine import Trainer, init_distributed

    config = train_config(args)  # option errors before anything is loaded
    info = init_distributed()
    manifest, cases = load_dataset(args.dataset, verify=info.main)
    refuse_evaluation_only(args.dataset, manifest)
    train = _select(cases, "train", args.labelled)
    val = _select(cases, "val", None)
    unlabelled = sorted(
        (c for c in cases if c.split == "train" and not c.labelled), key=lambda c: c.id
    )
    unlabelled = unlabelled[: args.unlabelled] if args.unlabelled is not None else unlabelled
    if config.mode == "rpst" and args.unlabelled_from_labelled:
        # Ablation on fully annotated data: hide the labels of the runs not used as labelled.
        used = {c.id for c in train}
        unlabelled += [c for c in _select(cases, "train", None) if c.id not in used]
    workdir = Path(args.workdir)
    resume = None
    if args.resume:
        resume = workdir / "last.pt" if args.resume == "auto" else Path(args.resume)
        if not resume.is_file():
            raise TaskError(f"no checkpoint to resume at {resume}")
    command = args.command_line
    subcommand = ["train", "--dataset", str(args.dataset), "--task", args.task]
    for option in ("labelled", "unlabelled"):
        if getattr(args, option) is not None:
            subcommand += [f"--{option}", str(getattr(args, option))]
    if args.unlabelled_from_labelled:
        subcommand.append("--unlabelled-from-labelled")
    trainer = Trainer(
        config,
        train,
        val,
        workdir,
        unlabelled=unlabelled,
        dist_info=info,
        dataset_sha256=manifest_hash(Path(args.dataset)),
        command=command,
        record=run_record(args, subcommand, workdir, manifest, args.dataset),
        mlflow_uri=args.mlflow_uri,
    )
    if info.main:
        print(
            f"task {args.task} ({trainer.task.architecture}), mode {config.mode}: {len(trainer.prepared)} "
            f"labelled, {len(unlabelled)} unlabelled, {len(trainer.val_cases)} validation runs "
            f"(monitoring {trainer.monitor}); "
            f"device {trainer.device}, {info.world} process(es)",
            file=sys.stderr,
        )
    path = trainer.fit(resume=resume, max_minutes=args.max_minutes)
    if info.main:
        if not trainer.finished:
            print(
                f"stopped after {args.max_minutes} minutes; continue with --resume",
                file=sys.stderr,
            )
        print(path)
    if info.enabled:
        torch.distributed.destroy_process_group()
    return 0


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Metrics of what the node's pipeline emits: with a package, with a trained model's
    weights (staged as a package) or without either (the classical path)."""
    from training.engine import evaluate_node, evaluate_weights, load_model_file
    from training.tasks import get_task, task_for_architecture

    _, cases = load_dataset(args.dataset)
    chosen = [c for c in cases if args.split == "all" or c.split == args.split]
    device = "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    if args.classical:
        task = get_task(args.task)
        result = evaluate_node(task, chosen, None, device)
        result["evaluated_with"] = f"the {task.pipeline} pipeline's classical path"
        return result
    if args.package:
        from pipelines.models.package import load_package

        pkg = load_package(args.package)
        task = task_for_architecture(pkg.architecture).configured(pkg.config)
        result = evaluate_node(task, chosen, str(pkg.path), device)
        result["evaluated_with"] = (
            f"the {task.pipeline} pipeline with package {pkg.name} {pkg.version}"
        )
        return result
    if not args.model:
        raise TaskError("give --model, --package or --classical")
    task, model, data = load_model_file(args.model, "cpu")
    result = evaluate_weights(task, model, data["model_config"], chosen, device)
    result["evaluated_with"] = f"the {task.pipeline} pipeline with these weights staged"
    return result


def cmd_calibrate(args: argparse.Namespace) -> int:
    from training.calibration import calibrate_file

    manifest, cases = load_dataset(args.dataset)
    refuse_evaluation_only(args.dataset, manifest)  # calibrating is tuning
    out = Path(args.out)
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} exists (--force replaces it)")
    device = torch.device("cuda" if args.device == "cuda" else "cpu")
    try:
        result = calibrate_file(args.model, cases, out, args.dataset, device)
    except ValueError as exc:
        raise TaskError(f"{args.model}: {exc}") from exc
    print(
        f"vessel logit offset {result['class_bias'][0]:g} on {len(result['cases'])} validation "
        f"run(s) of {args.dataset}: vessel Dice {result['vessel_dice']:.3f} (without it "
        f"{result['vessel_dice_without']:.3f}); wrote {out}"
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    result = evaluate(args)
    result["split"] = args.split
    _, cases = load_dataset(args.dataset, verify=False)
    chosen = [c for c in cases if args.split == "all" or c.split == args.split]
    kinds = {k: sum(c.kind == k for c in chosen) for k in ("full", "scribble", "unlabelled")}
    n = len(result["cases"])
    result["n_by_kind"] = kinds
    result["scored"] = n
    result["min_n"] = args.min_n
    text = json.dumps(result, indent=1, sort_keys=True)
    if args.out:
        Path(args.out).write_text(text + "\n")
    agg = result["aggregate"]
    print(
        f"{args.split} split of {args.dataset}: {kinds['full']} fully annotated run(s) scored, "
        f"{kinds['scribble']} scribble and {kinds['unlabelled']} unlabelled run(s) not scored "
        "(a Dice needs a full annotation); " + result["evaluated_with"]
    )
    print(M.format_table({args.model or args.package or "classical": agg}, list(agg)))
    if n < args.min_n:
        print(
            f"warning: n = {n} fully annotated run(s), below --min-n {args.min_n}: the mean "
            "and its 95 % CI (t-based, sample SD) say little about accuracy",
            file=sys.stderr,
        )
    return 0 if agg else 2


def cmd_package(args: argparse.Namespace) -> int:
    from training.packaging import package_model

    out = package_model(
        args.model,
        args.dataset,
        args.eval_dataset or [],
        args.out,
        args.name,
        args.version,
        args.min_margin,
    )
    print(f"package {args.name} {args.version} at {out}")
    return 0


def cmd_quick(args: argparse.Namespace) -> int:
    from training.quick import cmd_quick as quick

    return quick(args, train_config)


def _seeds(text: str | None, option: str) -> list[int]:
    """ "FIRST:COUNT" -> seeds FIRST .. FIRST + COUNT - 1."""
    if not text:
        return []
    try:
        first, count = (int(v) for v in text.split(":"))
    except ValueError:
        raise UsageError(f"{option}: expected FIRST:COUNT, got {text!r}") from None
    return list(range(first, first + count))


def cmd_phantom_dataset(args: argparse.Namespace) -> int:
    from training.phantom_dataset import PhantomSpec, build_phantom_dataset

    splits = {
        split: seeds
        for split in ("train", "val", "test")
        if (seeds := _seeds(getattr(args, split), f"--{split}"))
    }
    if not splits:
        raise UsageError("give seeds: --train, --val and/or --test FIRST:COUNT")
    spec = PhantomSpec(
        kind=args.kind,
        size=args.size,
        frames=args.frames,
        roles=tuple(r for r in args.roles.split(",") if r),
        splits=splits,
        family=args.family,
        randomise=args.randomise,
    )
    manifest = build_phantom_dataset(
        args.out,
        spec,
        args.name,
        args.version,
        progress=lambda m: print(m, file=sys.stderr),
        force=args.force,
        workers=args.workers,
    )
    print(json.dumps(manifest["counts"], sort_keys=True))
    print(f"manifest sha256 {manifest_hash(Path(args.out))}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from training.config import template

    text = template(args.task)
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        print(text, end="")
    return 0


def cmd_rejected(args: argparse.Namespace) -> int:
    rows = SpoolSource(args.storage).rejected_runs(args.pipeline)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    for r in rows:
        where = "purged: fetch it from the PACS" if r["purged"] else "in the spool"
        print(
            f"{r['pipeline']} job {r['job_id']}: run {r['run_id']} (study {r['study_uid']}, "
            f"series {r['series_uid']}; {where}): {r['results']} result(s) rejected, "
            f"{r['reasons']}"
        )
    print(f"{len(rows)} run(s) with rejected results", file=sys.stderr)
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from training.classical import tune

    manifest, cases = load_dataset(args.dataset)
    refuse_evaluation_only(args.dataset, manifest)  # tuning is training too
    result = tune(args.task, [c for c in cases if c.split == "train"], args.cases)
    print(json.dumps(result, indent=1, sort_keys=True))
    return 0


def add_training_options(p: argparse.ArgumentParser, quick: bool = False) -> None:
    """Options of the engine, shared by train and quick (quick: None means the recipe's)."""

    def default(value: Any) -> str:
        return "the recipe's" if quick else str(value)

    p.add_argument("--mode", choices=("full", "sscr", "rpst"), help="default full")
    p.add_argument(
        "--config-file",
        metavar="TOML",
        help="training configuration ([train] and [model] tables; `python -m training config "
        "TASK` writes the defaults); options given here win over it",
    )
    p.add_argument(
        "--config",
        help="JSON overrides of the architecture config, e.g. '{\"widths\": [16, 32, 64]}'",
    )
    p.add_argument("--epochs", type=int, help=f"default {default(50)}")
    p.add_argument("--steps", type=int, help=f"steps per epoch (default {default(100)})")
    p.add_argument("--batch", type=int, help=f"default {default(4)}")
    p.add_argument("--patch", type=int)
    p.add_argument("--optimizer", choices=("adamw", "adam", "rmsprop", "sgd"))
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--schedule", choices=("cosine", "plateau"))
    p.add_argument("--warmup-epochs", type=int)
    p.add_argument("--early-stop", type=int, help="patience in epochs")
    p.add_argument("--seed", type=int, help=f"default {default(0)}")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default auto")
    p.add_argument("--no-amp", action="store_true")
    p.add_argument("--no-ps", action="store_true", help="sscr: no pseudo-label supervision")
    p.add_argument("--no-cps", action="store_true", help="sscr: own instead of cross pseudo-labels")
    p.add_argument("--no-cr", action="store_true", help="sscr: no consistency regularisation")
    p.add_argument("--rounds", type=int, help=f"rpst relabelling rounds (default {default(1)})")
    p.add_argument("--teacher-epochs", type=int)
    p.add_argument(
        "--strong-augment",
        action="store_true",
        help="full and rpst: the photometric 'strong' augmentation (gain, offset, noise, "
        "blur) on labelled batches too (rpst's pseudo-labelled half has it in any case; "
        "sscr has its own second view)",
    )
    p.add_argument(
        "--max-val-cases", type=int, help=f"validation runs per epoch (default {default(8)})"
    )
    p.add_argument(
        "--no-validation",
        action="store_true",
        help="train although the validation split has no fully annotated run: the training "
        "loss is monitored instead (lowest loss kept), which says nothing about accuracy",
    )
    p.add_argument(
        "--resume", nargs="?", const="auto", help="checkpoint (default: <workdir>/last.pt)"
    )
    p.add_argument(
        "--max-minutes",
        type=float,
        help="stop at the first epoch boundary after this wall time (resume continues)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--mlflow-uri",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI; none: no MLflow)",
    )


def add_gate_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--min-margin",
        type=float,
        default=REQUIRED_MARGIN,
        help=f"refuse unless the model beats the classical path by this much on each "
        f"evaluation dataset (default {REQUIRED_MARGIN}; package.json records the value)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="count", default=0)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "build-dataset", help="runs + SEG annotations -> a de-identified, split dataset"
    )
    src = p.add_argument_group("source (exactly one)")
    src.add_argument("--dicomweb", help="DICOMweb base URL (QIDO-RS / WADO-RS)")
    src.add_argument("--spool", help="the node's storage_dir (spool + node.sqlite)")
    src.add_argument("--folder", help="a folder of DICOM files")
    p.add_argument("--username")
    p.add_argument("--password-env", help="environment variable holding the DICOMweb password")
    p.add_argument("--token-env", help="environment variable holding a bearer token")
    p.add_argument("--cache", help="download cache for DICOMweb (default: <out>-cache)")
    p.add_argument("--out", required=True)
    p.add_argument(
        "--pseudonym-map", required=True, help="JSON kept apart from the data (not inside --out)"
    )
    p.add_argument("--name", default="dataset")
    p.add_argument("--version", default="1")
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--include-unlabelled",
        action="store_true",
        help="keep runs without annotation (for rpst), flagged unlabelled",
    )
    p.add_argument(
        "--no-deidentify", action="store_true", help="keep identifiers (internal use only)"
    )
    p.add_argument(
        "--export-dicom", action="store_true", help="also write de-identified DICOM copies"
    )
    p.add_argument(
        "--previous",
        metavar="DIR",
        help="the previous version of this dataset: its patients keep their splits, and the "
        "manifest lists what changed",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace the version --out holds even though its content changes (says what)",
    )
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("train", help="train a model (full, sscr or rpst); torchrun for DDP")
    p.add_argument("--dataset", required=True)
    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument("--workdir", required=True)
    add_training_options(p)
    p.add_argument("--labelled", type=int, help="use only the first N labelled training runs")
    p.add_argument("--unlabelled", type=int, help="use at most N unlabelled runs (rpst)")
    p.add_argument(
        "--unlabelled-from-labelled",
        action="store_true",
        help="rpst ablation: the labelled runs beyond --labelled serve as unlabelled",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "calibrate",
        help="rotational_dla: choose the vessel decision (a logit offset) on validation runs",
    )
    p.add_argument("--model", required=True, help="model.pt from train")
    p.add_argument("--dataset", required=True, help="its dataset: the val split is used")
    p.add_argument("--out", required=True, help="the calibrated model file")
    p.add_argument("--force", action="store_true", help="replace --out")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser(
        "evaluate", help="held-out metrics of a model, a package or the classical path"
    )
    p.add_argument("--dataset", required=True)
    p.add_argument("--model", help="model.pt from train")
    p.add_argument("--package", help="a model package folder (run through its pipeline)")
    p.add_argument("--classical", action="store_true", help="the pipeline without a package")
    p.add_argument("--task", choices=sorted(TASKS), help="with --classical")
    p.add_argument("--split", default="test", choices=("train", "val", "test", "all"))
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--out", help="write per-case and aggregated metrics as JSON")
    p.add_argument(
        "--min-n",
        type=int,
        default=10,
        help="warn when fewer fully annotated runs are scored (default 10)",
    )
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "package",
        help="evaluate through the node on data the model was not trained on, then package",
    )
    p.add_argument("--model", required=True)
    p.add_argument("--dataset", required=True, help="the dataset the model was trained on")
    p.add_argument(
        "--eval-dataset",
        action="append",
        help="required: generator family B or site data the model was not trained on; "
        "repeat it for several (sizes, contrast levels, sites): the model must beat the "
        "classical path on each",
    )
    p.add_argument("--out", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--version", required=True)
    add_gate_options(p)
    p.set_defaults(func=cmd_package)

    from training.quick import add_arguments as quick_arguments

    p = sub.add_parser("quick", help="phantom dataset -> engine -> package, with a recipe per task")
    quick_arguments(p)
    add_training_options(p, quick=True)
    add_gate_options(p)
    p.set_defaults(func=cmd_quick)

    p = sub.add_parser(
        "phantom-dataset",
        help="a dataset straight from a phantom generator (family B: for evaluation only)",
    )
    p.add_argument("kind", choices=("dsa", "coronary", "rotational"))
    p.add_argument("--family", default="A", choices=("A", "B"))
    p.add_argument("--out", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--version", default="1")
    p.add_argument("--size", type=int, help="matrix (default: the generator's)")
    p.add_argument("--frames", type=int, help="2D kinds of family A (family B draws its own)")
    p.add_argument("--randomise", action="store_true", help="family A domain randomisation")
    p.add_argument(
        "--roles",
        required=True,
        help="truth used as labels, e.g. artery,vein,ica | vessel | vessel,bone,soft_tissue",
    )
    for split in ("train", "val", "test"):
        p.add_argument(f"--{split}", metavar="FIRST:COUNT", help=f"seeds of the {split} split")
    p.add_argument("--force", action="store_true", help="replace a dataset of other content")
    p.add_argument(
        "--workers", type=int, default=1, help="seeds generated at a time, one process each"
    )
    p.set_defaults(func=cmd_phantom_dataset)

    from training.scribbles import add_arguments as scribble_arguments
    from training.scribbles import run_command as scribbles

    p = sub.add_parser(
        "scribbles",
        help="scribble SEGs on the node's canvas, from a label image or sampled from a full SEG",
    )
    scribble_arguments(p)
    p.set_defaults(func=scribbles)

    p = sub.add_parser("config", help="a task's default training configuration (TOML)")
    p.add_argument("task", choices=sorted(TASKS))
    p.add_argument("--out", help="write it here (default: print it)")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser(
        "rejected",
        help="runs whose results a destination rejected (IOCM notes kept by the node): "
        "the cases to annotate first",
    )
    p.add_argument("--storage", required=True, help="the node's storage_dir")
    p.add_argument("--pipeline", help="only this pipeline's")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_rejected)

    p = sub.add_parser(
        "tune-classical",
        help="grid-search a classical path's constants on a dataset's training split",
    )
    p.add_argument("task", choices=("xa_coronary", "rotational_dla"))
    p.add_argument("--dataset", required=True)
    p.add_argument("--cases", type=int, help="use the first N training runs")
    p.set_defaults(func=cmd_tune)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    given = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(given)
    args.command_line = record_command(given)  # with its torchrun launcher; recorded in models
    level = logging.WARNING - 10 * min(args.verbose + 1, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "evaluate" and args.classical and not args.task:
        print("error: --classical needs --task", file=sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except (
        SourceError,
        DatasetError,
        TaskError,
        GateError,
        UsageError,
        PipelineError,
        FileExistsError,
        ConfigError,
        TrackingError,
        ScribbleError,
        NodeError,
    ) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
