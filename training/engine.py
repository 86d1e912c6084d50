"""The training engine: full supervision, SSCR weak supervision, RPST self-training.

- ``full``: CE + Dice on annotated pixels (``training.losses``), with the
  papers' augmentation.
- ``sscr`` (DIAS): two networks, each with partial CE on the scribbled pixels;
  scribble-corrected hard pseudo-labels of each network supervise the *other*
  (cross pseudo supervision, weight λ1 = 1) and an MSE between their
  probabilities keeps them consistent (λ2 = 0.5). ``use_ps``, ``use_cps`` and
  ``use_cr`` switch the parts off for the ablation (pCE alone when all are off).
- ``rpst`` (DIAS): a teacher trained on the labelled runs pseudo-labels the
  unlabelled ones (hard labels); a fresh student trains on random patches of
  both, weakly augmented (geometry) and, for the pseudo-labelled patches,
  strongly augmented (photometric) as well; the student becomes the teacher
  and relabels, for ``rpst_rounds`` rounds.

Validation, pseudo-labelling and every reported metric go through the node:
the current weights are staged as a package and the pipeline itself runs on
each case (``Task.node_masks``), so the preprocessing, tiling, mapping back and
post-processing are the node's own and a reported number is what the node
would get. Cases from phantom generator family B (evaluation-only) are refused.

Engineering: CUDA with mixed precision when present, the CPU otherwise;
deterministic seeds (every batch is drawn from a generator seeded by seed,
rank, phase and step, so a resumed run draws exactly what an uninterrupted one
would); ``last.pt`` after every epoch and ``--resume``; early stopping and the
learning-rate schedule of each paper; a wall-clock budget that stops at an
epoch boundary (resume continues it); a progress bar with live loss and
validation metric; ``learning_curve.png`` and ``examples.png`` next to the
checkpoints; DDP under ``torchrun`` (NCCL on GPUs, gloo on CPUs), rank 0
validating and writing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipelines.base import PipelineError
from pipelines.models.package import build, write_package
from pipelines.preprocess import inference_device
from training import augment, losses
from training import metrics as M
from training.calibration import CALIBRATED_TASKS, vessel_bias
from training.dataset import Case
from training.gate import FAMILY_B_MODEL_NAME, GateError
from training.model_card import example_png
from training.tasks import Batch, Masks, Prepared, Task, TaskError, get_task
from training.tracking import Tracker, learning_curve

log = logging.getLogger(__name__)
CHECKPOINT_FORMAT = 1


@dataclass
class TrainConfig:
    task: str
    mode: str = "full"  # full | sscr | rpst
    model_config: dict[str, Any] = field(default_factory=dict)
    epochs: int = 50
    steps_per_epoch: int = 100
    batch_size: int = 4
    patch: int | None = None
    optimizer: str | None = None  # None: the task's paper default
    lr: float | None = None
    weight_decay: float | None = None
    schedule: str | None = None
    warmup_epochs: int | None = None
    early_stop: int | None = None
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    max_val_cases: int = 8
    lambda_cps: float = 1.0
    lambda_cr: float = 0.5
    use_ps: bool = True
    use_cps: bool = True
    use_cr: bool = True
    rpst_rounds: int = 1
    teacher_epochs: int | None = None
    # The photometric 'strong' augmentation (gain, offset, noise, blur) on labelled
    # batches too, not only on pseudo-labelled ones: against a model that learns the
    # generator's noise and contrast rather than the vessels.
    strong_augment: bool = False
    # Train without a fully annotated validation run: monitor the training loss instead.
    no_validation: bool = False
    progress: bool = True

    def resolved(self, task: Task) -> dict[str, Any]:
        d = task.defaults
        out = asdict(self)
        for key in (
            "optimizer",
            "lr",
            "weight_decay",
            "schedule",
            "warmup_epochs",
            "early_stop",
            "patch",
        ):
            if out[key] is None:
                out[key] = getattr(d, key)
        if self.mode not in ("full", "sscr", "rpst"):
            raise TaskError(f"mode {self.mode!r}: allowed full, sscr, rpst")
        return out


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """Whether this process validates and writes (rank 0, or any lone process)."""
        return self.rank == 0 or not self.enabled


def init_distributed() -> DistInfo:
    """Join the process group ``torchrun`` describes in the environment (if any)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return DistInfo(
        rank=dist.get_rank(),
        world=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def _progress(total: int, enabled: bool, desc: str) -> Any:
    """A tqdm bar when tqdm is installed (and wanted), else a plain line printer."""
    if not enabled:
        return _Quiet()
    try:
        from tqdm import tqdm
    except ImportError:
        return _Lines(total, desc)
    return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False)


class _Quiet:
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, **kw: Any) -> None: ...
    def close(self) -> None: ...


class _Lines(_Quiet):
    """Fallback without tqdm: one line per tenth of the epoch."""

    def __init__(self, total: int, desc: str) -> None:
        self.total, self.desc, self.n, self.post = total, desc, 0, ""
        self.every = max(1, total // 10)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n % self.every == 0 or self.n == self.total:
            print(f"{self.desc} {self.n}/{self.total} {self.post}", file=sys.stderr, flush=True)

    def set_postfix(self, **kw: Any) -> None:
        self.post = " ".join(f"{k}={v}" for k, v in kw.items())


class Trainer:
    """One training run in ``workdir``; ``fit()`` returns the path of the final model file."""

    def __init__(
        self,
        cfg: TrainConfig,
        train: Sequence[Case],
        val: Sequence[Case],
        workdir: Path,
        unlabelled: Sequence[Case] = (),
        dist_info: DistInfo | None = None,
        dataset_sha256: str = "",
        command: str = "",
        log_fn: Callable[[str], None] = log.info,
        record: Mapping[str, Any] | None = None,
        mlflow_uri: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.record: dict[str, Any] = dict(record or {})
        self.mlflow_uri = mlflow_uri
        self.tracker: Any = None
        refuse_family_b([*train, *val, *unlabelled])
        base = get_task(cfg.task)
        self.opts = cfg.resolved(base)
        self.model_config = resolve_config(base.config(cfg.model_config), train)
        self.task = base.configured(self.model_config)
        self.dist = dist_info or DistInfo()
        self.workdir = Path(workdir)
        self.dataset_sha256 = dataset_sha256
        self.command = command
        self.log = log_fn if self.dist.main else (lambda _m: None)
        requested = cfg.device
        if requested == "auto" or requested.startswith("cuda"):
            self.device = inference_device("auto")
            if self.device.type == "cuda" and self.dist.enabled:
                self.device = torch.device("cuda", self.dist.local_rank)
                torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        self.amp = cfg.amp and self.device.type == "cuda"
        self.amp_dtype = (
            torch.bfloat16 if self.amp and torch.cuda.is_bf16_supported() else torch.float16
        )
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=self.amp and self.amp_dtype == torch.float16
        )
        if self.device.type == "cpu":
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.train_cases = [c for c in train if c.labelled]
        self.val_cases = [c for c in val if c.kind == "full"][: cfg.max_val_cases]
        self.val_kinds = {
            k: sum(c.kind == k for c in val) for k in ("full", "scribble", "unlabelled")
        }
        # What is monitored, by a name that says what it is.
        self.monitor = f"val_{self.task.monitor}" if self.val_cases else "train_loss"
        self.unlabelled = list(unlabelled)
        self.prepared = self._prepare(self.train_cases)
        if not self.prepared:
            raise TaskError(f"no usable labelled training case for task {self.task.name}")
        if cfg.mode == "rpst" and not self.unlabelled:
            raise TaskError(
                "rpst needs unlabelled runs (build the dataset with --include-unlabelled)"
            )
        self.phases = self._phases()
        self.state: dict[str, Any] = {
            "phase": 0,
            "epoch": 0,
            "step": 0,
            "history": [],
            "best": None,
            "bad": 0,
            "plateau": {"best": None, "bad": 0, "scale": 1.0},
            "teacher": None,
        }
        self.pseudo: list[Prepared] = []
        self._new_phase_models()

    # -- setup
    def _prepare(self, cases: Sequence[Case]) -> list[Prepared]:
        out = []
        for case in cases:
            try:
                out.append(self.task.prepare(case, self.model_config))
            except TaskError as exc:
                self.log(f"skipping case {case.id}: {exc}")
        return out

    def _phases(self) -> list[tuple[str, int]]:
        if self.cfg.mode != "rpst":
            return [("main", self.cfg.epochs)]
        teacher = self.cfg.teacher_epochs or self.cfg.epochs
        return [("teacher", teacher)] + [
            (f"student{r + 1}", self.cfg.epochs) for r in range(self.cfg.rpst_rounds)
        ]

    def _build(self, index: int) -> nn.Module:
        torch.manual_seed(self.cfg.seed * 1000 + 100 * self.state["phase"] + index)
        model = build(self.task.architecture, self.model_config).to(self.device).train()
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=ids)
        return model

    def _new_phase_models(self) -> None:
        count = 2 if self.cfg.mode == "sscr" else 1
        self.models = [self._build(i) for i in range(count)]
        self.optimizers = [self._optimizer(m) for m in self.models]

    def _optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        o = self.opts
        params = model.parameters()
        if o["optimizer"] == "adamw":
            return torch.optim.AdamW(params, lr=o["lr"], weight_decay=o["weight_decay"])
        if o["optimizer"] == "adam":
            return torch.optim.Adam(params, lr=o["lr"], weight_decay=o["weight_decay"])
        if o["optimizer"] == "rmsprop":
            return torch.optim.RMSprop(
                params,
                lr=o["lr"],
                weight_decay=o["weight_decay"],
                momentum=self.task.defaults.momentum,
            )
        if o["optimizer"] == "sgd":
            return torch.optim.SGD(params, lr=o["lr"], weight_decay=o["weight_decay"], momentum=0.9)
        raise TaskError(f"optimizer {o['optimizer']!r}: allowed adamw, adam, rmsprop, sgd")

    # -- schedule
    def lr_at(self, epoch: int, step_in_epoch: int) -> float:
        o, d = self.opts, self.task.defaults
        base = float(o["lr"])
        if o["schedule"] == "plateau":
            return max(base * self.state["plateau"]["scale"], 1e-8)
        epochs = self.phases[self.state["phase"]][1]
        total = max(1, epochs * self.cfg.steps_per_epoch)
        # DIAS warms up for 10 of 100 epochs; short runs keep that tenth.
        warm = min(int(o["warmup_epochs"]) * self.cfg.steps_per_epoch, total // 10)
        t = epoch * self.cfg.steps_per_epoch + step_in_epoch
        if t < warm:
            start = base * 1e-3
            return start + (base - start) * t / warm
        frac = (t - warm) / max(1, total - warm)
        return d.min_lr + 0.5 * (base - d.min_lr) * (1 + math.cos(math.pi * min(frac, 1.0)))

    # -- one step
    def _rng(self, step: int) -> np.random.Generator:
        return np.random.default_rng([self.cfg.seed, self.dist.rank, self.state["phase"], step])

    def _augment(
        self, b: Batch, rng: np.random.Generator, strong: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Weak (geometric) augmentation of the batch; returns x, y, valid, inside."""
        inside = torch.ones_like(b.valid[:, :1])
        (x,), (y, v, inside) = augment.geometric(
            [b.x.float()], [b.y, b.valid, inside], rng, self.task.geometric
        )
        if b.sequence:
            x = augment.frame_contrast(x, rng)
        if strong:
            x = augment.strong(x, rng)
        return x, y, v, inside

    def _forward(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=self.amp_dtype, enabled=self.amp):
            return model(x.to(self.device))

    def _loss_full(
        self,
        rng: np.random.Generator,
        prepared: Sequence[Prepared],
        size: int,
        strong: bool = False,
    ) -> torch.Tensor:
        b = self.task.batch(prepared, rng, size, int(self.opts["patch"]), self.model_config)
        x, y, v, _ = self._augment(b, rng, strong)
        logits = self._forward(self.models[0], x)
        return losses.ce_dice_loss(
            logits, y.to(self.device), v.to(self.device), self.task.multilabel
        )

    def _loss_sscr(self, rng: np.random.Generator) -> torch.Tensor:
        b = self.task.batch(
            self.prepared, rng, self.cfg.batch_size, int(self.opts["patch"]), self.model_config
        )
        x, y, v, inside = self._augment(b, rng)
        x2 = augment.frame_contrast(x, rng) if b.sequence else augment.strong(x, rng)
        y, v, inside = y.to(self.device), v.to(self.device), inside.to(self.device)
        ml = self.task.multilabel
        l1, l2 = self._forward(self.models[0], x), self._forward(self.models[1], x2)
        loss = losses.partial_cross_entropy(l1, y, v, ml) + losses.partial_cross_entropy(
            l2, y, v, ml
        )
        if self.cfg.use_ps:
            p1 = losses.scribble_corrected(losses.hard_labels(l1, ml), y, v)
            p2 = losses.scribble_corrected(losses.hard_labels(l2, ml), y, v)
            t1, t2 = (p2, p1) if self.cfg.use_cps else (p1, p2)
            loss = loss + self.cfg.lambda_cps * (
                losses.cross_entropy(l1, t1, inside, ml) + losses.cross_entropy(l2, t2, inside, ml)
            )
        if self.cfg.use_cr:
            loss = loss + self.cfg.lambda_cr * losses.consistency_mse(l1, l2, ml)
        return loss

    def _step(self, epoch: int, step_in_epoch: int) -> float:
        rng = self._rng(self.state["step"])
        lr = self.lr_at(epoch, step_in_epoch)
        for opt in self.optimizers:
            for g in opt.param_groups:
                g["lr"] = lr
            opt.zero_grad(set_to_none=True)
        name = self.phases[self.state["phase"]][0]
        if self.cfg.mode == "sscr":
            loss = self._loss_sscr(rng)
        elif name.startswith("student"):
            # Half the batch from labelled runs (weak augmentation), half from
            # pseudo-labelled runs (weak + strong); two forwards, since sequence
            # lengths differ between runs.
            half = max(1, self.cfg.batch_size // 2)
            loss = self._loss_full(
                rng, self.prepared, half, strong=self.cfg.strong_augment
            ) + self._loss_full(rng, self.pseudo, half, strong=True)
        else:
            loss = self._loss_full(
                rng, self.prepared, self.cfg.batch_size, strong=self.cfg.strong_augment
            )
        self.scaler.scale(loss).backward()
        for opt in self.optimizers:
            self.scaler.step(opt)
        self.scaler.update()
        self.state["step"] += 1
        return float(loss.detach())

    # -- validation
    def validate(self) -> tuple[dict[str, dict[str, float]], Case | None, Masks | None]:
        """The node's pipeline with the current weights on every validation run."""
        rows, example, pred0 = [], None, None
        with stage_package(self.task, _unwrap(self.models[0]), self.model_config) as package:
            for case in self.val_cases:
                pred, row, _ = node_answer(self.task, case, package, str(self.device))
                rows.append(row)
                if example is None:
                    example, pred0 = case, pred
        agg = M.aggregate(rows)
        if self.task.name in CALIBRATED_TASKS:
            agg.update(self._calibrated())
        return agg, example, pred0

    def _calibrated(self) -> dict[str, dict[str, Any]]:
        """The vessel Dice pooled over the validation runs at the offset
        ``training.calibration`` would choose now, and that offset: what the package
        will decide with once calibrated (its plain argmax is not)."""
        full = [c for c in self.val_cases if c.kind == "full"]
        if not full:
            return {}
        model = _unwrap(self.models[0])
        training = model.training
        model.eval()
        try:
            result = vessel_bias(self.task, model, full, self.device)
        finally:
            model.train(training)
        n = len(result["cases"])
        return {
            "calibrated_dice": {"mean": result["vessel_dice"], "n": n},
            "calibrated_offset": {"mean": result["class_bias"][0], "n": n},
        }

    def _monitor(
        self, train_loss: float
    ) -> tuple[float, dict[str, Any], Case | None, Masks | None]:
        """(score, val summary, example case, the node's masks for it); higher is better
        (without validation runs: minus the training loss, see ``no_validation``)."""
        if not self.val_cases:
            return -train_loss, {}, None, None
        agg, example, pred = self.validate()
        score = agg.get(self.task.monitor, {}).get("mean", float("nan"))
        return (score if np.isfinite(score) else -math.inf), agg, example, pred

    # -- checkpoints
    def _checkpoint(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "task": self.task.name,
            "config": asdict(self.cfg),
            "model_config": self.model_config,
            "dataset_sha256": self.dataset_sha256,
            "models": [_unwrap(m).state_dict() for m in self.models],
            "optimizers": [o.state_dict() for o in self.optimizers],
            "scaler": self.scaler.state_dict(),
            "state": self.state,
        }

    def _save(self, obj: Mapping[str, Any], name: str) -> Path:
        return save_file(obj, self.workdir / name)

    def _model_file(self, name: str, metrics: Mapping[str, Any]) -> Path:
        return self._save(
            {
                "format": CHECKPOINT_FORMAT,
                "task": self.task.name,
                "architecture": self.task.architecture,
                "model_config": self.model_config,
                "state_dict": _unwrap(self.models[0]).state_dict(),
                "metrics": dict(metrics),
                "config": self.opts,
                "dataset_sha256": self.dataset_sha256,
                "command": self.record.get("command") or self.command,
                "record": json.loads(json.dumps(self.record, default=str)),
                "phase": self.phases[self.state["phase"]][0],
                "epoch": self.state["epoch"],
            },
            name,
        )

    def resume(self, path: Path) -> None:
        ck = torch.load(path, map_location=self.device, weights_only=True)
        if ck.get("format") != CHECKPOINT_FORMAT or ck.get("task") != self.task.name:
            raise TaskError(f"{path} is not a {self.task.name} checkpoint of this engine")
        self.state = ck["state"]
        for h in self.state["history"]:  # epochs of a run begun before these were recorded
            h.setdefault("monitor", self.monitor)
            h.setdefault("val_n", {})
        self._new_phase_models()
        for m, sd in zip(self.models, ck["models"], strict=True):
            _unwrap(m).load_state_dict(sd)
        for o, sd in zip(self.optimizers, ck["optimizers"], strict=True):
            o.load_state_dict(sd)
        self.scaler.load_state_dict(ck["scaler"])
        if self.state.get("teacher") is not None:
            self._relabel(self.state["teacher"])
        phase = self.phases[min(self.state["phase"], len(self.phases) - 1)][0]
        self.log(
            f"resumed {path}: phase {phase}, epoch {self.state['epoch']}, step {self.state['step']}"
        )

    # -- RPST
    def _relabel(self, teacher_state: Mapping[str, torch.Tensor]) -> None:
        """Hard pseudo-labels of every unlabelled run: the node's masks with the teacher."""
        teacher = build(self.task.architecture, self.model_config)
        teacher.load_state_dict({k: v.cpu() for k, v in teacher_state.items()})
        self.pseudo = []
        with stage_package(self.task, teacher, self.model_config) as package:
            for case in self.unlabelled:
                try:
                    pred = self.task.node_masks(case.run(), package, str(self.device))
                except PipelineError as exc:
                    self.log(f"no pseudo-label for case {case.id}: the pipeline failed ({exc})")
                    continue
                labelled = Case(
                    id=case.id,
                    patient=case.patient,
                    split=case.split,
                    kind="full",
                    geometry=self.task.geometry,
                    pixels=case.pixels,
                    masks=self.task.pseudo_labels(pred),
                    frame_times_s=case.frame_times_s,
                    meta=case.meta,
                )
                self.pseudo.extend(self._prepare([labelled]))
        self.log(f"pseudo-labelled {len(self.pseudo)} unlabelled runs")

    # -- the loop
    @property
    def finished(self) -> bool:
        return self.state["phase"] >= len(self.phases)

    def fit(
        self,
        resume: Path | None = None,
        stop_after: int | None = None,
        max_minutes: float | None = None,
    ) -> Path:
        """Train to the end; or stop at an epoch boundary after ``stop_after`` epochs or
        ``max_minutes`` of wall time in this call (a preemptible machine, a long run in
        parts) and return ``last.pt``: ``resume`` continues exactly where it left off."""
        self._check_validation()
        deadline = None if max_minutes is None else time.monotonic() + 60 * max_minutes
        self.workdir.mkdir(parents=True, exist_ok=True)
        if resume is not None:
            self.resume(resume)
        if self.dist.main:
            (self.workdir / "train_config.json").write_text(
                json.dumps(
                    {
                        "config": self.opts,
                        "model_config": self.model_config,
                        "dataset_sha256": self.dataset_sha256,
                    },
                    indent=1,
                    sort_keys=True,
                    default=str,
                )
            )
            config_text = self._write_record()
            self.tracker = Tracker(
                self.workdir,
                params=self.record["config"],
                config_text=config_text,
                resume_epoch=len(self.state["history"]),
                mlflow_uri=self.mlflow_uri,
                experiment=f"angio-training-{self.task.name}",
            )
        try:
            done = 0
            while self.state["phase"] < len(self.phases):
                name, epochs = self.phases[self.state["phase"]]
                # An early stop survives a resume: its patience count is in the checkpoint.
                stop = self.state["bad"] >= int(self.opts["early_stop"])
                while self.state["epoch"] < epochs and not stop:
                    out_of_time = deadline is not None and done > 0 and self._time_up(deadline)
                    if (stop_after is not None and done >= stop_after) or out_of_time:
                        return self.workdir / "last.pt"
                    stop = self._epoch(name, epochs)
                    done += 1
                self._end_phase(name)
        finally:
            if self.tracker is not None:
                names = ("metrics.csv", "metrics.json", "learning_curve.png", "examples.png")
                self.tracker.close([self.workdir / n for n in (*names, "config.toml", "run.json")])
                self.tracker = None
        final = self.workdir / "model.pt"
        if self.dist.enabled:
            dist.barrier()
        return final

    def _check_validation(self) -> None:
        """No run is trained blind without saying so: validation needs a fully annotated run
        (the node's Dice cannot be measured on scribbles or unlabelled runs)."""
        k = self.val_kinds
        if self.val_cases:
            return
        what = f"{k['full']} full, {k['scribble']} scribble, {k['unlabelled']} unlabelled"
        if not self.cfg.no_validation:
            raise TaskError(
                f"the validation split has no fully annotated run ({what}): no epoch could be "
                "chosen by the node's accuracy. Give a dataset whose val split holds a fully "
                "annotated run, or --no-validation to monitor the training loss instead (the "
                "epoch of lowest training loss is kept; it says nothing about accuracy)"
            )
        if self.dist.main:
            log.warning(
                "no validation run (%s; --no-validation): monitoring train_loss, keeping the "
                "epoch of lowest training loss; nothing here measures accuracy",
                what,
            )

    def _write_record(self) -> str:
        """config.toml (the resolved configuration) and run.json (training.record); returns
        the configuration text."""
        from training import record as R
        from training.config import TRAIN_KEYS, to_toml

        train = {k: v for k, v in self.opts.items() if k in TRAIN_KEYS}
        text = to_toml(
            self.task.name,
            train,
            self.model_config,
            f"Resolved configuration of the run in {self.workdir}:\n"
            "python -m training train --config-file THIS ... trains it again (run.json: reproduce)",
        )
        (self.workdir / "config.toml").write_text(text)
        path = self.workdir / "run.json"
        old = json.loads(path.read_text()) if path.is_file() and self.state["history"] else {}
        part = {
            "started": R.now(),
            "command": self.record.get("command") or self.command,
            "from_epoch": len(self.state["history"]),
            "world_size": self.dist.world,
            "device": R.device_description(self.device),
            "code": R.code_version(),
            "versions": R.versions(),
        }
        parts = [*old.get("parts", []), part]
        first = parts[0]
        self.record = {
            **self.record,
            "task": self.task.name,
            "architecture": self.task.architecture,
            "mode": self.cfg.mode,
            "command": first["command"],
            "world_size": first["world_size"],
            "config_file": str(self.workdir / "config.toml"),
            "config": {"train": train, "model": self.model_config},
            "dataset": {
                **self.record.get("dataset", {}),
                "manifest_sha256": self.dataset_sha256,
            },
            "monitor": self.monitor,
            "code": first["code"],
            "versions": first["versions"],
            "device": first["device"],
            "parts": parts,
        }
        if any(p["code"] != first["code"] or p["versions"] != first["versions"] for p in parts):
            self.record["note"] = "the parts of this run ran with different code or libraries"
        path.write_text(json.dumps(self.record, indent=1, sort_keys=True, default=str) + "\n")
        return text

    def _time_up(self, deadline: float) -> bool:
        """Whether the budget is spent, decided on rank 0 so every rank stops together."""
        flag = [time.monotonic() >= deadline]
        if self.dist.enabled:
            dist.broadcast_object_list(flag, src=0)
        return bool(flag[0])

    def _epoch(self, name: str, epochs: int) -> bool:
        epoch = self.state["epoch"]
        bar = _progress(
            self.cfg.steps_per_epoch,
            self.cfg.progress and self.dist.main,
            f"{name} {epoch + 1}/{epochs}",
        )
        t0, total, ema = time.monotonic(), 0.0, None
        for i in range(self.cfg.steps_per_epoch):
            loss = self._step(epoch, i)
            total += loss
            ema = loss if ema is None else 0.9 * ema + 0.1 * loss
            bar.update(1)
            bar.set_postfix(
                loss=f"{ema:.4f}",
                lr=f"{self.lr_at(epoch, i):.2e}",
                best=f"{(self.state['best'] or {}).get('score', float('nan')):.4f}",
            )
        bar.close()
        train_loss = total / self.cfg.steps_per_epoch
        stop = False
        if self.dist.main:
            score, agg, example, pred = self._monitor(train_loss)
            stop = self._after_epoch(name, epoch, train_loss, score, agg, time.monotonic() - t0)
            if example is not None and pred is not None:
                example_png(
                    self.workdir / "examples.png",
                    self.task,
                    example,
                    pred,
                    f"{name} epoch {epoch + 1}",
                )
            self.state["epoch"] += 1
            self._save(self._checkpoint(), "last.pt")
        else:
            self.state["epoch"] += 1
        if self.dist.enabled:
            flags: list[Any] = [stop, self.state]
            dist.broadcast_object_list(flags, src=0)
            stop, self.state = bool(flags[0]), flags[1]
        return stop

    def _after_epoch(
        self,
        name: str,
        epoch: int,
        train_loss: float,
        score: float,
        agg: Mapping[str, Any],
        seconds: float,
    ) -> bool:
        """Bookkeeping on rank 0: history, best model, plateau LR, early stopping."""
        val = {k: v["mean"] for k, v in agg.items()}
        self.state["history"].append(
            {
                "phase": name,
                "epoch": epoch + 1,
                "step": self.state["step"],
                "loss": train_loss,
                "lr": self.lr_at(epoch, self.cfg.steps_per_epoch - 1),
                "score": score,
                "monitor": self.monitor,
                "val": val,
                "val_n": {k: int(v["n"]) for k, v in agg.items()},
                "seconds": seconds,
            }
        )
        best = self.state["best"]
        if best is None or best["phase"] != name or score > best["score"]:
            self.state["best"] = {"phase": name, "epoch": epoch + 1, "score": score, "val": val}
            self.state["bad"] = 0
            self._model_file(f"best-{name}.pt", {"val": dict(agg), "monitor": self.task.monitor})
        else:
            self.state["bad"] += 1
        plateau = self.state["plateau"]
        if plateau["best"] is None or score > plateau["best"]:
            plateau["best"], plateau["bad"] = score, 0
        else:
            plateau["bad"] += 1
            if plateau["bad"] > self.task.defaults.plateau_patience:
                plateau["scale"] *= self.task.defaults.plateau_factor
                plateau["bad"] = 0
        if self.tracker is not None:
            self.tracker.epoch(self.state["history"])
        learning_curve(
            self.workdir / "learning_curve.png",
            self.state["history"],
            f"{self.task.name} ({self.task.architecture}), mode {self.cfg.mode}: {self.workdir}",
            self.monitor,
        )
        best = self.state["best"]
        if self.val_cases:
            n = len(self.val_cases)
            self.log(
                f"{name} epoch {epoch + 1}: train_loss {train_loss:.4f}, {self.monitor} "
                f"{score:.4f} (the node's pipeline on {n} validation run(s); best "
                f"{best['score']:.4f} at epoch {best['epoch']})"
            )
        else:
            self.log(
                f"{name} epoch {epoch + 1}: train_loss {train_loss:.4f} (no validation run: "
                f"lowest train_loss {-best['score']:.4f} at epoch {best['epoch']})"
            )
        if self.state["bad"] >= int(self.opts["early_stop"]):
            self.log(f"early stop: no improvement for {self.state['bad']} epochs")
            return True
        return False

    def _end_phase(self, name: str) -> None:
        """Load the phase's best weights; hand them on as teacher or as the final model."""
        best_path = self.workdir / f"best-{name}.pt"
        holder: list[Any] = [None]
        if self.dist.main:
            holder[0] = torch.load(best_path, map_location="cpu", weights_only=True)["state_dict"]
        if self.dist.enabled:  # ranks on other machines cannot read rank 0's files
            dist.broadcast_object_list(holder, src=0)
        state = {k: v.to(self.device) for k, v in holder[0].items()}
        for m in self.models[:1]:
            _unwrap(m).load_state_dict(state)
        last = self.state["phase"] + 1 >= len(self.phases)
        if self.dist.main and last:
            self._model_file(
                "model.pt",
                {
                    "val": self.state["best"]["val"] if self.state["best"] else {},
                    "monitor": self.task.monitor,
                },
            )
        if not last:
            self.state.update(
                phase=self.state["phase"] + 1,
                epoch=0,
                best=None,
                bad=0,
                teacher=state,
                plateau={"best": None, "bad": 0, "scale": 1.0},
            )
            self._relabel(state)
            self._new_phase_models()
        else:
            self.state["phase"] += 1


# ---------------------------------------------------------------------------
# Configuration, guards


def refuse_family_b(cases: Sequence[Case]) -> None:
    """No training, validation or pseudo-labelling on evaluation-only family B."""
    for case in cases:
        if case.meta.get("manufacturer_model_name") == FAMILY_B_MODEL_NAME:
            raise GateError(
                f"case {case.id} comes from phantom generator family B "
                f"(ManufacturerModelName {FAMILY_B_MODEL_NAME!r}), which is for evaluation "
                "only: never train, validate or tune on it"
            )


def resolve_config(config: Mapping[str, Any], train: Sequence[Case]) -> dict[str, Any]:
    """``work_spacing_mm: "auto"`` becomes the median pixel spacing of the training runs,
    so the package tells the node the physical scale the model learned."""
    out = dict(config)
    if out.get("work_spacing_mm") == "auto":
        spacings = [
            min(c.meta["pixel_spacing_mm"]) for c in train if c.meta.get("pixel_spacing_mm")
        ]
        if not spacings:
            raise TaskError("work_spacing_mm auto: no training run has a pixel spacing")
        out["work_spacing_mm"] = float(np.median(spacings))
    return out


# ---------------------------------------------------------------------------
# Evaluation: always through the node's pipelines


@contextlib.contextmanager
def stage_package(task: Task, model: nn.Module, model_config: Mapping[str, Any]) -> Iterator[str]:
    """The weights as a temporary package folder, for the node's pipeline to load."""
    with tempfile.TemporaryDirectory(prefix="staged-package-") as tmp:
        path = write_package(
            Path(tmp) / "pkg",
            model=model,
            name=f"staged-{task.name}",
            version="0",
            architecture_name=task.architecture,
            config=dict(model_config),
            pipeline=task.pipeline,
            metrics={},
            data={},
            model_card="Staged by training to run the node's pipeline; not for shipping.",
            training_command="",
            dataset_manifest_hash="",
            staged=True,
        )
        yield str(path)


def save_file(obj: Mapping[str, Any], path: Path) -> Path:
    """``torch.save`` to ``path`` whole or not at all (a ``.part`` file, then a rename)."""
    tmp = path.with_suffix(".part")
    torch.save(dict(obj), tmp)
    os.replace(tmp, path)
    return path


def load_model_file(
    path: str | Path, device: torch.device | str = "cpu"
) -> tuple[Task, nn.Module, dict[str, Any]]:
    """(task, model, file contents) from a ``model.pt`` / ``best-*.pt`` file (weights_only)."""
    data = torch.load(path, map_location=device, weights_only=True)
    task = get_task(data["task"]).configured(data["model_config"])
    model = build(data["architecture"], data["model_config"])
    model.load_state_dict(data["state_dict"])
    return task, model.to(device).eval(), data


def node_answer(
    task: Task, case: Case, package: str | None, device: str
) -> tuple[Masks, dict[str, float], str | None]:
    """(the node's masks, their metrics, the failure reason or None) for one case.

    A run the pipeline refuses (PipelineError: no ICA found, too few frames...) is
    what the node would answer with no output, so it scores as empty masks and is
    counted in ``failed``, never left out."""
    try:
        pred, reason = task.node_masks(case.run(), package, device), None
    except PipelineError as exc:
        pred, reason = {}, str(exc)
        log.warning("case %s: the %s pipeline failed: %s", case.id, task.pipeline, exc)
    return pred, {**task.score(pred, case), "failed": float(reason is not None)}, reason


def evaluate_node(
    task: Task, cases: Sequence[Case], package: str | None = None, device: str = "cpu"
) -> dict[str, Any]:
    """Per-case metrics and their mean ± std of what the node's pipeline emits with
    ``package`` (None: its classical path), on the fully annotated ``cases``."""
    rows, failures = {}, {}
    for case in cases:
        if case.kind == "full":
            _, rows[case.id], reason = node_answer(task, case, package, device)
            if reason is not None:
                failures[case.id] = reason
    return {"cases": rows, "aggregate": M.aggregate(list(rows.values())), "failures": failures}


def evaluate_weights(
    task: Task,
    model: nn.Module,
    model_config: Mapping[str, Any],
    cases: Sequence[Case],
    device: str = "cpu",
) -> dict[str, Any]:
    """:func:`evaluate_node` with ``model``'s weights staged as a package."""
    with stage_package(task, model, model_config) as package:
        return evaluate_node(task, cases, package, device)
