"""``python -m training``: build-dataset, train, evaluate, package.

    python -m training build-dataset --dicomweb http://pacs/dicom-web --out data/dsa-v1 \\
        --pseudonym-map ~/secure/dsa-v1-pseudonyms.json
    python -m training train --dataset data/dsa-v1 --task dsa_av --workdir runs/av1
    torchrun --nproc-per-node 2 -m training train ...      # DDP, same options
    python -m training evaluate --model runs/av1/model.pt --dataset data/dsa-v1
    python -m training package --model runs/av1/model.pt --dataset data/dsa-v1 \\
        --out models/dsa-av-1.0.0 --name dsa-av --version 1.0.0

Errors (a source, a dataset, a task or a package that cannot be used) end
the command with a message and exit status 2, here and nowhere else.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pipelines.base import PipelineError
from training import metrics as M
from training.dataset import BuildOptions, DatasetError, build_dataset, load_dataset, manifest_hash
from training.sources import SourceError, open_source
from training.tasks import TASKS, TaskError

log = logging.getLogger("training")


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


def train_config(args: argparse.Namespace) -> Any:
    from training.engine import TrainConfig

    return TrainConfig(
        task=args.task,
        mode=args.mode,
        model_config=json.loads(args.config or "{}"),
        epochs=args.epochs,
        steps_per_epoch=args.steps,
        batch_size=args.batch,
        patch=args.patch,
        optimizer=args.optimizer,
        lr=args.lr,
        schedule=args.schedule,
        early_stop=args.early_stop,
        warmup_epochs=args.warmup_epochs,
        seed=args.seed,
        device=args.device,
        amp=not args.no_amp,
        use_ps=not args.no_ps,
        use_cps=not args.no_cps,
        use_cr=not args.no_cr,
        rpst_rounds=args.rounds,
        teacher_epochs=args.teacher_epochs,
        progress=not args.no_progress,
        max_val_cases=args.max_val_cases,
    )


def cmd_train(args: argparse.Namespace) -> int:
    from training.engine import Trainer, init_distributed

    info = init_distributed()
    manifest, cases = load_dataset(args.dataset, verify=info.main)
    train = _select(cases, "train", args.labelled)
    val = _select(cases, "val", None)
    unlabelled = sorted(
        (c for c in cases if c.split == "train" and not c.labelled), key=lambda c: c.id
    )
    unlabelled = unlabelled[: args.unlabelled] if args.unlabelled is not None else unlabelled
    if args.mode == "rpst" and args.unlabelled_from_labelled:
        # Ablation on fully annotated data: hide the labels of the runs not used as labelled.
        used = {c.id for c in train}
        unlabelled += [c for c in _select(cases, "train", None) if c.id not in used]
    workdir = Path(args.workdir)
    resume = None
    if args.resume:
        resume = workdir / "last.pt" if args.resume == "auto" else Path(args.resume)
        if not resume.is_file():
            raise TaskError(f"no checkpoint to resume at {resume}")
    command = shlex.join(["python", "-m", "training", *sys.argv[1:]])
    trainer = Trainer(
        train_config(args),
        train,
        val,
        workdir,
        unlabelled=unlabelled,
        dist_info=info,
        dataset_sha256=manifest_hash(Path(args.dataset)),
        command=command,
    )
    if info.main:
        print(
            f"task {args.task} ({trainer.task.architecture}), mode {args.mode}: {len(trainer.prepared)} "
            f"labelled, {len(unlabelled)} unlabelled, {len(trainer.val_cases)} validation runs; "
            f"device {trainer.device}, {info.world} process(es)",
            file=sys.stderr,
        )
    path = trainer.fit(resume=resume)
    if info.main:
        print(path)
    if info.enabled:
        torch.distributed.destroy_process_group()
    return 0


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from training.engine import evaluate_model, evaluate_pipeline, load_model_file
    from training.tasks import get_task

    _, cases = load_dataset(args.dataset)
    chosen = [c for c in cases if c.split == args.split]
    device = torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
    if args.classical:
        task = get_task(args.task)
        result = evaluate_pipeline(task, chosen, None, device.type)
        result["evaluated_with"] = f"the {task.pipeline} pipeline's classical path"
        return result
    if args.package:
        from pipelines.models.package import load_package
        from training.tasks import task_for_architecture

        pkg = load_package(args.package)
        task = task_for_architecture(pkg.architecture)
        result = evaluate_pipeline(task, chosen, str(pkg.path), device.type)
        result["evaluated_with"] = (
            f"the {task.pipeline} pipeline with package {pkg.name} {pkg.version}"
        )
        return result
    if not args.model:
        raise TaskError("give --model, --package or --classical")
    task, model, data = load_model_file(args.model, device)
    result = evaluate_model(task, model, chosen, data["model_config"], device)
    result["evaluated_with"] = (
        "the pipeline's preprocessing and inference (probabilities, threshold 0.5)"
    )
    return result


def cmd_evaluate(args: argparse.Namespace) -> int:
    result = evaluate(args)
    result["split"] = args.split
    text = json.dumps(result, indent=1, sort_keys=True)
    if args.out:
        Path(args.out).write_text(text + "\n")
    agg = result["aggregate"]
    print(M.format_table({args.model or args.package or "classical": agg}, list(agg)))
    return 0 if agg else 2


def cmd_package(args: argparse.Namespace) -> int:
    from pipelines.models.package import load_package, write_package
    from training.engine import evaluate_model, evaluate_pipeline, load_model_file
    from training.model_card import model_card

    device = torch.device("cpu")
    task, model, data = load_model_file(args.model, device)
    manifest, cases = load_dataset(args.dataset)
    sha = manifest_hash(Path(args.dataset))
    if data.get("dataset_sha256") and data["dataset_sha256"] != sha:
        raise DatasetError(
            f"{args.model} was trained on dataset {data['dataset_sha256'][:16]}, "
            f"not on {args.dataset} ({sha[:16]})"
        )
    test = [c for c in cases if c.split == "test"]
    metrics = evaluate_model(task, model, test, data["model_config"], device)
    metrics["evaluated_with"] = (
        "the pipeline's own preprocessing and inference code on the probabilities, threshold 0.5"
    )
    used = [c for c in manifest["cases"] if c["split"] in ("train", "val")]
    summary = {
        "dataset": manifest["name"],
        "dataset_version": manifest["version"],
        "manifest_sha256": sha,
        "source": manifest["source"],
        "counts": manifest["counts"],
        "synthetic": any(c.get("synthetic") for c in manifest["cases"]),
        "training_cases": len([c for c in used if c["split"] == "train"]),
        "deidentification": manifest["deidentification"],
    }
    config = {**data["model_config"]}
    command = data.get("command") or "unknown"
    common = dict(
        model=model,
        name=args.name,
        version=args.version,
        architecture_name=task.architecture,
        config=config,
        pipeline=task.pipeline,
        data=summary,
        training_command=command,
        dataset_manifest_hash=sha,
    )
    parameters = sum(p.numel() for p in model.parameters())
    if test:
        # Through the node's own pipeline as well: what the node will actually emit.
        with tempfile.TemporaryDirectory() as tmp:
            staged = write_package(
                Path(tmp) / "pkg", metrics=metrics, model_card="staging", **common
            )  # type: ignore[arg-type]
            try:
                metrics["through_pipeline"] = evaluate_pipeline(task, test, str(staged))[
                    "aggregate"
                ]
            except TaskError as exc:
                print(f"note: not evaluated through the pipeline: {exc}", file=sys.stderr)
    card = model_card(
        task=task,
        name=args.name,
        version=args.version,
        parameters=parameters,
        metrics=metrics,
        data=summary,
        training=data.get("config", {}),
        training_command=command,
        dataset_sha256=sha,
    )
    out = write_package(Path(args.out), metrics=metrics, model_card=card, **common)  # type: ignore[arg-type]
    pkg = load_package(out, pipeline=task.pipeline)
    pkg.load_model("cpu")  # the weights load back with weights_only=True
    print(f"package {pkg.name} {pkg.version} for {pkg.pipeline} at {out}")
    if not test:
        print(
            "warning: the dataset has no test case; the package carries no held-out metric",
            file=sys.stderr,
        )
    return 0


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
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("train", help="train a model (full, sscr or rpst); torchrun for DDP")
    p.add_argument("--dataset", required=True)
    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument("--mode", default="full", choices=("full", "sscr", "rpst"))
    p.add_argument("--workdir", required=True)
    p.add_argument(
        "--config",
        help="JSON overrides of the architecture config, e.g. '{\"widths\": [16, 32, 64]}'",
    )
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--steps", type=int, default=100, help="steps per epoch")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--patch", type=int)
    p.add_argument("--optimizer", choices=("adamw", "adam", "rmsprop", "sgd"))
    p.add_argument("--lr", type=float)
    p.add_argument("--schedule", choices=("cosine", "plateau"))
    p.add_argument("--warmup-epochs", type=int)
    p.add_argument("--early-stop", type=int, help="patience in epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--no-amp", action="store_true")
    p.add_argument("--labelled", type=int, help="use only the first N labelled training runs")
    p.add_argument("--unlabelled", type=int, help="use at most N unlabelled runs (rpst)")
    p.add_argument(
        "--unlabelled-from-labelled",
        action="store_true",
        help="rpst ablation: the labelled runs beyond --labelled serve as unlabelled",
    )
    p.add_argument("--no-ps", action="store_true", help="sscr: no pseudo-label supervision")
    p.add_argument("--no-cps", action="store_true", help="sscr: own instead of cross pseudo-labels")
    p.add_argument("--no-cr", action="store_true", help="sscr: no consistency regularisation")
    p.add_argument("--rounds", type=int, default=1, help="rpst relabelling rounds")
    p.add_argument("--teacher-epochs", type=int)
    p.add_argument("--max-val-cases", type=int, default=8)
    p.add_argument(
        "--resume", nargs="?", const="auto", help="checkpoint (default: <workdir>/last.pt)"
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "evaluate", help="held-out metrics of a model, a package or the classical path"
    )
    p.add_argument("--dataset", required=True)
    p.add_argument("--model", help="model.pt from train")
    p.add_argument("--package", help="a model package folder (run through its pipeline)")
    p.add_argument("--classical", action="store_true", help="the pipeline without a package")
    p.add_argument("--task", choices=sorted(TASKS), help="with --classical")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--out", help="write per-case and aggregated metrics as JSON")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("package", help="evaluate on the test split and write a model package")
    p.add_argument("--model", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--version", required=True)
    p.set_defaults(func=cmd_package)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose + 1, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "evaluate" and args.classical and not args.task:
        print("error: --classical needs --task", file=sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except (SourceError, DatasetError, TaskError, PipelineError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
