"""``python -m training quick TASK``: phantom dataset, training, package, in one command.

A recipe is a configuration of the one training stack, nothing more: which
family A generator and seeds make the dataset (``training.phantom_dataset``),
the architecture config and the optimisation settings. Training is the engine
(``Trainer``: checkpoints every epoch, ``--resume``, ``--max-minutes`` to split
a long run, DDP under torchrun); evaluation and packaging are ``python -m
training package`` (through the node's pipeline; the shipping gate needs
``--eval-dataset`` or ``--eval-family B``).

    python -m training quick dsa_av --workdir runs/av-quick                # train
    python -m training quick dsa_av --workdir runs/av-quick --resume      # continue
    python -m training quick dsa_av --workdir runs/av-quick --resume --eval-family B \\
        --out models/dsa_av-st_unet-2 --name dsa_av-st_unet --version 2.0.0

The recipes keep the seeds and the scale of the scripts that produced the
packages in ``models/`` (``training/quick_train_*.py`` until they were folded
in here): their training seeds, held-out seeds, phantom sizes, widths and
step counts; the optimiser and loss are the engine's.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from training.dataset import DatasetError, load_dataset, manifest_hash
from training.phantom_dataset import PhantomSpec, build_phantom_dataset


@dataclass(frozen=True)
class Recipe:
    task: str
    kind: str  # phantom generator
    size: int
    frames: int | None
    roles: tuple[str, ...]
    train: range
    val: range
    test: range
    model_config: Mapping[str, Any]
    options: Mapping[str, Any] = field(default_factory=dict)  # TrainConfig fields
    eval_cases: int = 20  # family B evaluation runs
    # Family B evaluation datasets, one per size (empty: the training size). The gate
    # must pass on each: one size alone can flatter a model (see docs/training.md).
    eval_sizes: tuple[int, ...] = (256, 512)


_SEQUENCE = {
    "epochs": 30,
    "steps_per_epoch": 50,
    "batch_size": 2,
    "patch": 64,
    "optimizer": "adamw",
    "lr": 3e-3,
    "weight_decay": 1e-4,
    "schedule": "cosine",
    "warmup_epochs": 1,
    "early_stop": 30,
}
_DSA_TRAIN, _DSA_VAL, _DSA_TEST = range(1000, 1100), range(1400, 1405), range(5000, 5010)

RECIPES: dict[str, Recipe] = {
    # was quick_train_dsa st_unet (1,518 steps of 2 crops of 64 px, AdamW 3e-3)
    "dsa_av": Recipe(
        task="dsa_av",
        kind="dsa",
        size=256,
        frames=20,
        roles=("artery", "vein", "ica"),
        train=_DSA_TRAIN,
        val=_DSA_VAL,
        test=_DSA_TEST,
        model_config={
            "widths": [8, 16, 32, 48],
            "channels": ["artery", "vein", "ica"],
            "out_channels": 3,
            "fps": 1.0,
            "work_spacing_mm": "auto",
            "tile": 512,
            "overlap": 64,
        },
        options=_SEQUENCE,
    ),
    # was quick_train_dsa vss_net (948 steps)
    "dsa_ia": Recipe(
        task="dsa_ia",
        kind="dsa",
        size=256,
        frames=20,
        roles=("artery",),
        train=_DSA_TRAIN,
        val=_DSA_VAL,
        test=_DSA_TEST,
        model_config={
            "widths": [8, 16, 32, 48],
            "channels": ["artery"],
            "out_channels": 1,
            "fps": None,
            "work_spacing_mm": "auto",
            "tile": 512,
            "overlap": 64,
        },
        options={**_SEQUENCE, "epochs": 20},
    ),
    # was quick_train_coronary (6,000 steps of 4 crops of 128 px, N = 1 shipped)
    "xa_coronary": Recipe(
        task="xa_coronary",
        kind="coronary",
        size=256,
        frames=36,
        roles=("vessel",),
        train=range(3000, 3012),
        val=range(3100, 3102),
        test=range(3900, 3905),
        model_config={
            "width": 8,
            "temporal_features": 8,
            "neighbours": 1,
            "threshold": 0.5,
            "max_side": 256,
        },
        options={
            "epochs": 30,
            "steps_per_epoch": 200,
            "batch_size": 4,
            "patch": 128,
            "optimizer": "adamw",
            "lr": 1e-3,
            "weight_decay": 1e-4,
            "schedule": "cosine",
            "warmup_epochs": 1,
            "early_stop": 30,
        },
    ),
    # was quick_train_dla (3,000 steps, width 16); the engine trains on dense patches
    # with the paper's class-balanced undersampling inside each patch
    "rotational_dla": Recipe(
        task="rotational_dla",
        kind="rotational",
        size=256,
        frames=None,
        roles=("vessel", "bone", "soft_tissue"),
        train=range(2000, 2006),
        val=range(2100, 2101),
        test=range(2900, 2904),
        model_config={"width": 16},
        options={
            "epochs": 30,
            "steps_per_epoch": 100,
            "batch_size": 4,
            "patch": 32,
            "optimizer": "adamw",
            "lr": 2e-3,
            "weight_decay": 1e-4,
            "schedule": "cosine",
            "warmup_epochs": 1,
            "early_stop": 30,
            "max_val_cases": 1,
        },
        eval_cases=5,
        eval_sizes=(192, 256),
    ),
    # as the first ICA U-Net example package was trained (30 x 40 steps, patch 256; it
    # did not pass the shipping gate on family B and is no longer in models/)
    "dsa_perfusion": Recipe(
        task="dsa_perfusion",
        kind="dsa",
        size=256,
        frames=20,
        roles=("ica",),
        train=range(1000, 1023),
        val=range(1400, 1403),
        test=range(5000, 5004),
        model_config={"width": 8, "levels": 5},
        options={
            "epochs": 30,
            "steps_per_epoch": 40,
            "batch_size": 4,
            "patch": 256,
            "lr": 2e-3,
        },
    ),
}


def phantom_spec(recipe: Recipe, args: argparse.Namespace) -> PhantomSpec:
    def first(seeds: range, n: int | None) -> list[int]:
        return list(seeds)[: n if n is not None else len(seeds)]

    # Randomised phantoms draw their matrix from the priors unless --size is given.
    size = args.size or (None if args.randomise else recipe.size)
    return PhantomSpec(
        kind=recipe.kind,
        size=size,
        frames=(args.frames or recipe.frames) if recipe.frames is not None else None,
        roles=recipe.roles,
        randomise=args.randomise,
        splits={
            "train": first(recipe.train, args.train_cases),
            "val": first(recipe.val, args.val_cases),
            "test": first(recipe.test, args.test_cases),
        },
    )


def eval_specs(recipe: Recipe, train: PhantomSpec, args: argparse.Namespace) -> list[PhantomSpec]:
    """Family B runs of the same kind, every one for evaluation: one dataset per
    evaluation size (``--eval-sizes``, else the recipe's, else the training size)."""
    n = args.eval_cases or recipe.eval_cases
    sizes = args.eval_sizes or recipe.eval_sizes or (train.size,)
    return [
        PhantomSpec(
            kind=train.kind,
            size=size,
            frames=train.frames,
            roles=train.roles,
            splits={"test": list(range(args.eval_seed, args.eval_seed + n))},
            family="B",
        )
        for size in dict.fromkeys(sizes)
    ]


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes such as 192,256, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected positive sizes such as 192,256, got {text!r}")
    return sizes


def cmd_quick(args: argparse.Namespace, train_config: Any) -> int:
    """Build (or reuse) the phantom datasets, train or resume, and package when asked."""
    from training.calibration import CALIBRATED_TASKS, calibrate_file
    from training.engine import Trainer, init_distributed
    from training.packaging import package_model

    recipe = RECIPES[args.task]
    info = init_distributed()
    work = Path(args.workdir)
    spec = phantom_spec(recipe, args)
    data_dir = work / "data"

    def say(message: str) -> None:
        if info.main:
            print(message, file=sys.stderr, flush=True)

    if info.main:
        try:
            build_phantom_dataset(
                data_dir,
                spec,
                name=f"{recipe.task}-family-a",
                progress=say,
                workers=args.workers,
            )
        except DatasetError as exc:
            raise DatasetError(
                f"{exc}. For quick: the run in {work} was trained on the dataset there; train "
                "another recipe, size or case count in a new --workdir"
            ) from None
    if info.enabled:
        torch.distributed.barrier()
    manifest, cases = load_dataset(data_dir, verify=info.main)
    train = sorted((c for c in cases if c.split == "train"), key=lambda c: c.id)
    val = sorted((c for c in cases if c.split == "val"), key=lambda c: c.id)
    # --resume continues <workdir>/run/last.pt when there is one, so one command line
    # serves every part of a long run.
    last = work / "run" / "last.pt" if args.resume == "auto" else Path(args.resume or "")
    resume = last if args.resume and last.is_file() else None
    from training.__main__ import run_record

    subcommand = ["quick", recipe.task]
    if args.randomise:
        subcommand.append("--randomise")
    for option in ("size", "frames", "train_cases", "val_cases", "test_cases"):
        if getattr(args, option) is not None:
            subcommand += ["--" + option.replace("_", "-"), str(getattr(args, option))]
    trainer = Trainer(
        train_config(args, {**recipe.options, "task": recipe.task}, recipe.model_config),
        train,
        val,
        work / "run",
        dist_info=info,
        dataset_sha256=manifest_hash(data_dir),
        command=args.command_line,
        record=run_record(args, subcommand, work, manifest, data_dir, work / "run" / "config.toml"),
        mlflow_uri=args.mlflow_uri,
    )
    say(
        f"quick {recipe.task}: {len(trainer.prepared)} training, {len(trainer.val_cases)} "
        f"validation runs of {manifest['source']} (monitoring {trainer.monitor}); "
        f"device {trainer.device}"
    )
    trainer.fit(resume=resume, max_minutes=args.max_minutes)
    if info.enabled:
        torch.distributed.destroy_process_group()
    if not trainer.finished:
        say(
            f"stopped after {args.max_minutes} minutes at phase {trainer.state['phase']}, "
            f"epoch {trainer.state['epoch']}; continue with the same command and --resume"
        )
        return 0
    say(f"trained: {work / 'run' / 'model.pt'}")
    if not info.main or not args.out:
        return 0
    eval_dirs = list(args.eval_dataset or [])
    if not eval_dirs and args.eval_family:
        specs = eval_specs(recipe, spec, args)
        for eval_spec in specs:
            size = "" if len(specs) == 1 else f"-{eval_spec.size}"
            eval_dir = work / f"eval-family-b{size}"
            build_phantom_dataset(
                eval_dir,
                eval_spec,
                name=f"{recipe.kind}-family-b{size}",
                progress=say,
                workers=args.workers,
            )
            eval_dirs.append(eval_dir)
    model_file = work / "run" / "model.pt"
    if recipe.task in CALIBRATED_TASKS and any(c.kind == "full" for c in val):
        calibrated = work / "run" / "model-calibrated.pt"
        result = calibrate_file(model_file, val, calibrated, data_dir, trainer.device)
        say(
            f"vessel decision calibrated on {len(result['cases'])} validation run(s): logit "
            f"offset {result['class_bias'][0]:g}, vessel Dice {result['vessel_dice']:.3f} "
            f"(plain argmax {result['vessel_dice_without']:.3f})"
        )
        model_file = calibrated
    path = package_model(
        model_file,
        data_dir,
        eval_dirs,
        args.out,
        args.name or f"{recipe.task}-quick",
        args.version,
        args.min_margin,
        device=str(trainer.device),
        log=say,
    )
    print(path)
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("task", choices=sorted(RECIPES))
    p.add_argument("--workdir", required=True, help="dataset(s) and run go here")
    p.add_argument(
        "--randomise",
        action="store_true",
        help="family A with domain randomisation (training.phantoms.priors)",
    )
    p.add_argument("--size", type=int, help="phantom size (default: the recipe's)")
    p.add_argument("--frames", type=int, help="phantom frames (2D kinds)")
    p.add_argument("--train-cases", type=int, help="first N of the recipe's training seeds")
    p.add_argument("--val-cases", type=int)
    p.add_argument("--test-cases", type=int)
    p.add_argument(
        "--workers", type=int, default=1, help="phantoms generated at a time, one process each"
    )
    p.add_argument("--out", help="write a package here once trained (needs an evaluation)")
    p.add_argument("--name")
    p.add_argument("--version", default="0.1.0")
    p.add_argument(
        "--eval-dataset",
        action="append",
        help="dataset the model was not trained on (the gate); repeat for several",
    )
    p.add_argument(
        "--eval-family",
        choices=("B",),
        help="build the evaluation dataset from phantom generator family B",
    )
    p.add_argument("--eval-seed", type=int, default=0, help="first family B seed")
    p.add_argument("--eval-cases", type=int, help="family B runs (default: the recipe's)")
    p.add_argument(
        "--eval-sizes",
        type=_sizes,
        metavar="N,M",
        help="family B sizes, one evaluation dataset each, the gate passed on every one "
        "(default: the recipe's: 256,512; rotational_dla 192,256)",
    )
