"""Tasks: how a dataset case becomes model tensors for one pipeline, and back.

A task ties a registered architecture to the pipeline that will load its
package, and reuses that pipeline's own preprocessing and inference code, so a
model is trained on exactly what the node will feed it:

    dsa_av         st_unet      pipelines.preprocess.predict_sequence (1 fps)
    dsa_ia         vss_net      pipelines.preprocess.predict_sequence (all frames)
    xa_coronary    ce_net_3d2d  pipelines.coronary normalise_cine + frame windows
    rotational_dla dla_resnet   pipelines.rotational padded_volume (dense)
    dsa_perfusion  ica_unet     pipelines.models.ica_unet minip_opacity (the ICA)

Training draws random patches (the DIAS recipe; whole 512^2 sequences do not
fit a CPU step). Sequence models see one case per step (runs differ in their
number of frames after resampling), several patches of it per batch.

``train_defaults`` are the seed papers' optimisation settings where their
published code states them (ST U-Net: CAVE's ``train.py``; VSS-Net, SSCR and
RPST: the DIAS code); the others are marked as ours in docs/training.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.coronary import normalise_cine, predict_probabilities
from pipelines.models.cenet import STRIDE, frame_windows
from pipelines.models.dla import CLASS_BONE, CLASS_SOFT, CLASS_VESSEL, MARGIN, SLICES
from pipelines.models.ica_unet import minip_opacity
from pipelines.preprocess import (
    inference_mode,
    normalise_dsa,
    predict_sequence,
    resample_frames,
    resize,
    work_shape,
)
from pipelines.rotational import padded_volume
from training import metrics as M
from training.annotations import label_targets
from training.augment import Geometric
from training.dataset import Case


class TaskError(Exception):
    """A case or configuration a task cannot use, with the reason."""


@dataclass
class Prepared:
    """A case on the working grid: inputs, per-channel targets and valid masks (or None)."""

    case_id: str
    x: torch.Tensor
    y: torch.Tensor | None
    valid: torch.Tensor | None


@dataclass
class Batch:
    x: torch.Tensor  # model input (B, ...)
    y: torch.Tensor  # (B, K, p, p) targets
    valid: torch.Tensor  # (B, K, p, p)
    sequence: bool  # whether x is (B, T, p, p) frames over time


@dataclass(frozen=True)
class TrainDefaults:
    optimizer: str = "adamw"
    lr: float = 5e-4
    weight_decay: float = 0.01
    momentum: float = 0.9
    schedule: str = "cosine"  # cosine (with warmup) | plateau
    warmup_epochs: int = 10
    min_lr: float = 5e-6
    plateau_patience: int = 10
    plateau_factor: float = 0.5
    early_stop: int = 100
    patch: int = 64


def _resize_labels(
    target: np.ndarray, valid: np.ndarray, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels onto the working grid: a pixel is labelled where labelled pixels cover it,
    with the label its labelled share votes for (thin scribbles survive shrinking)."""
    t = torch.from_numpy(target.astype(np.float32))
    v = torch.from_numpy(valid.astype(np.float32))
    if tuple(t.shape[-2:]) == tuple(size):
        return t, v
    rv = resize(v, size)
    rt = resize(t * v, size)
    v_out = (rv > 0.25).float()
    return (rt / rv.clamp_min(1e-6) >= 0.5).float() * v_out, v_out


def _crop_starts(
    valid_fg: torch.Tensor | None, shape: tuple[int, int], patch: int, rng: np.random.Generator
) -> tuple[int, int]:
    """A patch corner: half the time centred on a labelled foreground pixel, else uniform."""
    h, w = shape
    if valid_fg is not None and rng.random() < 0.5:
        idx = torch.nonzero(valid_fg)
        if len(idx):
            y, x = (int(v) for v in idx[int(rng.integers(len(idx)))][-2:])
            return (
                int(np.clip(y - patch // 2, 0, h - patch)),
                int(np.clip(x - patch // 2, 0, w - patch)),
            )
    return int(rng.integers(h - patch + 1)), int(rng.integers(w - patch + 1))


@dataclass
class Task:
    name: str
    pipeline: str
    architecture: str
    channels: tuple[str, ...]
    multilabel: bool
    geometry: str
    monitor: str
    default_config: Mapping[str, Any]
    defaults: TrainDefaults = field(default_factory=TrainDefaults)
    geometric: Geometric = field(default_factory=Geometric)

    # -- configuration
    def config(self, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        return {**self.default_config, **(overrides or {})}

    # -- preparation (subclasses)
    def prepare(self, case: Case, config: Mapping[str, Any]) -> Prepared:
        raise NotImplementedError

    def batch(
        self,
        item: Sequence[Prepared],
        rng: np.random.Generator,
        size: int,
        patch: int,
        config: Mapping[str, Any],
    ) -> Batch:
        """``size`` random patches (side ``patch``) with targets, from prepared cases."""
        raise NotImplementedError

    def predict(
        self, model: torch.nn.Module, case: Case, config: Mapping[str, Any], device: torch.device
    ) -> np.ndarray:
        """Probabilities (K, ...) on the case's native grid, as the pipeline computes them."""
        raise NotImplementedError

    def truth(self, case: Case) -> np.ndarray:
        """(K, ...) bool truth on the native grid (full annotations only)."""
        target, _ = label_targets(case.annotation(), self.channels)
        return target

    def pseudo_labels(self, probs: np.ndarray) -> dict[str, np.ndarray]:
        """Hard pseudo-labels (role -> mask) from predicted probabilities."""
        return {c: probs[k] >= 0.5 for k, c in enumerate(self.channels)}

    def foreground(self) -> list[int]:
        """Output channels worth drawing (softmax 'everything else' classes are not)."""
        return list(range(len(self.channels)))

    # -- evaluation
    def evaluate(self, probs: np.ndarray, case: Case, threshold: float = 0.5) -> dict[str, float]:
        truth = self.truth(case)
        pred = probs >= threshold
        if len(self.channels) == 1:
            return M.binary_metrics(pred[0], truth[0], probs[0])
        vessel_p, vessel_t = np.asarray(pred.any(axis=0)), np.asarray(truth.any(axis=0))
        out = M.binary_metrics(vessel_p, vessel_t, probs.max(axis=0))
        if {"artery", "vein"} <= set(self.channels):
            a, v = self.channels.index("artery"), self.channels.index("vein")
            out.update(M.av_metrics(pred[a], pred[v], truth[a], truth[v]))
        return out


# ---------------------------------------------------------------------------
# 2D+t DSA sequences -> one 2D label map (dsa_av, dsa_ia)


class SequenceTask(Task):
    def prepare(self, case: Case, config: Mapping[str, Any]) -> Prepared:
        frames = case.pixels
        if frames.ndim != 3 or case.meta.get("is_volume"):
            raise TaskError(f"case {case.id}: {self.name} needs a 2D+t run, got {frames.shape}")
        fps = config.get("fps", 1.0)
        seq = frames
        if fps is not None and case.frame_times_s is not None:
            seq, _ = resample_frames(
                frames,
                case.frame_times_s,
                float(fps),
                int(config.get("min_frames", 4)),
                int(config.get("max_frames", 60)),
            )
        spacing = (
            tuple(case.meta["pixel_spacing_mm"]) if case.meta.get("pixel_spacing_mm") else None
        )
        size = work_shape(
            frames.shape[1:],
            spacing,
            config.get("work_spacing_mm"),  # type: ignore[arg-type]
            int(config.get("max_side", 512)),
        )
        x = resize(torch.from_numpy(normalise_dsa(seq)), size)
        if not case.labelled:
            return Prepared(case.id, x, None, None)
        if case.geometry != "canvas":
            raise TaskError(
                f"case {case.id}: {self.name} needs 2D (canvas) labels, got {case.geometry}"
            )
        target, valid = label_targets(case.annotation(), self.channels)
        y, v = _resize_labels(target, valid, size)
        return Prepared(case.id, x, y, v)

    def batch(
        self,
        item: Sequence[Prepared],
        rng: np.random.Generator,
        size: int,
        patch: int,
        config: Mapping[str, Any],
    ) -> Batch:
        p = item[int(rng.integers(len(item)))]
        assert p.y is not None and p.valid is not None
        h, w = p.x.shape[-2:]
        patch = min(patch, h, w)
        fg = (p.y * p.valid).amax(dim=0) if p.y.numel() else None
        xs, ys, vs = [], [], []
        for _ in range(size):
            top, left = _crop_starts(fg, (h, w), patch, rng)
            sl = (slice(None), slice(top, top + patch), slice(left, left + patch))
            xs.append(p.x[sl])
            ys.append(p.y[sl])
            vs.append(p.valid[sl])
        return Batch(torch.stack(xs), torch.stack(ys), torch.stack(vs), sequence=True)

    def predict(
        self, model: torch.nn.Module, case: Case, config: Mapping[str, Any], device: torch.device
    ) -> np.ndarray:
        spacing = (
            tuple(case.meta["pixel_spacing_mm"]) if case.meta.get("pixel_spacing_mm") else None
        )
        probs, _ = predict_sequence(
            model,
            case.pixels,
            case.frame_times_s,
            spacing,  # type: ignore[arg-type]
            dict(config),
            device,
        )
        return probs


# ---------------------------------------------------------------------------
# Coronary cine: a label per frame, (2N+1)-frame windows in (xa_coronary)


class CineTask(Task):
    def _grid(self, case: Case, config: Mapping[str, Any]) -> tuple[int, int]:
        spacing = (
            tuple(case.meta["pixel_spacing_mm"]) if case.meta.get("pixel_spacing_mm") else None
        )
        return work_shape(
            case.pixels.shape[1:],
            spacing,
            config.get("work_spacing_mm"),  # type: ignore[arg-type]
            max_side=int(config.get("max_side", 512)),
        )

    def prepare(self, case: Case, config: Mapping[str, Any]) -> Prepared:
        size = self._grid(case, config)
        x = resize(torch.from_numpy(normalise_cine(case.pixels)), size)
        if not case.labelled:
            return Prepared(case.id, x, None, None)
        if case.geometry != "frames":
            raise TaskError(
                f"case {case.id}: {self.name} needs a label per frame, got {case.geometry}"
            )
        target, valid = label_targets(case.annotation(), self.channels)  # (K, T, H, W)
        y, v = _resize_labels(target, valid, size)
        return Prepared(case.id, x, y.movedim(1, 0), v.movedim(1, 0))  # (T, K, h, w)

    def batch(
        self,
        item: Sequence[Prepared],
        rng: np.random.Generator,
        size: int,
        patch: int,
        config: Mapping[str, Any],
    ) -> Batch:
        n = int(config.get("neighbours", 1))
        xs, ys, vs = [], [], []
        for _ in range(size):
            p = item[int(rng.integers(len(item)))]
            assert p.y is not None and p.valid is not None
            t_count, h, w = p.x.shape
            # Instance norm needs more than one pixel at the 1/32 bottleneck: 64 px at least.
            ps = max(2 * STRIDE, min(patch, h, w) // STRIDE * STRIDE)
            if min(h, w) < ps:
                raise TaskError(f"case {p.case_id}: frames {h}x{w} smaller than {2 * STRIDE}")
            t = int(rng.integers(t_count))
            top, left = _crop_starts((p.y[t] * p.valid[t]).amax(dim=0), (h, w), ps, rng)
            win = frame_windows(p.x, n, torch.tensor([t]))[0]
            xs.append(win[:, top : top + ps, left : left + ps])
            ys.append(p.y[t, :, top : top + ps, left : left + ps])
            vs.append(p.valid[t, :, top : top + ps, left : left + ps])
        return Batch(torch.stack(xs), torch.stack(ys), torch.stack(vs), sequence=False)

    def predict(
        self, model: torch.nn.Module, case: Case, config: Mapping[str, Any], device: torch.device
    ) -> np.ndarray:
        x = normalise_cine(case.pixels)
        size = self._grid(case, config)
        x_work = resize(torch.from_numpy(x), size).numpy()
        probs = predict_probabilities(
            model.to(device).eval(), x_work, int(config.get("neighbours", 1)), device
        )
        return resize(torch.from_numpy(probs), case.pixels.shape[1:]).numpy()[None]

    def evaluate(self, probs: np.ndarray, case: Case, threshold: float = 0.5) -> dict[str, float]:
        truth = self.truth(case)[0]
        return M.frame_mean(M.binary_metrics, probs[0] >= threshold, truth, prob=probs[0])


# ---------------------------------------------------------------------------
# Rotational volumes: vessel / bone / soft tissue per voxel (rotational_dla)


class VolumeTask(Task):
    CLASS_OF = {"vessel": CLASS_VESSEL, "bone": CLASS_BONE, "soft_tissue": CLASS_SOFT}

    def classes(self, case: Case) -> tuple[np.ndarray, np.ndarray]:
        """(K, Z, Y, X) one-hot classes and valid mask (soft tissue: everything else)."""
        masks = case.masks
        shape = case.pixels.shape
        one_hot = np.zeros((3, *shape), bool)
        vessel = masks.get("vessel", np.zeros(shape, bool))
        bone = masks.get("bone", np.zeros(shape, bool)) & ~vessel
        one_hot[CLASS_VESSEL], one_hot[CLASS_BONE] = vessel, bone
        if case.kind == "scribble":
            soft = masks.get("soft_tissue", np.zeros(shape, bool)) | masks.get("background", False)
            one_hot[CLASS_SOFT] = soft & ~vessel & ~bone
            valid = np.broadcast_to(one_hot.any(axis=0), one_hot.shape).copy()
        else:
            one_hot[CLASS_SOFT] = ~vessel & ~bone
            valid = np.ones_like(one_hot)
        return one_hot, valid

    def truth(self, case: Case) -> np.ndarray:
        return self.classes(case)[0]

    def prepare(self, case: Case, config: Mapping[str, Any]) -> Prepared:
        if case.pixels.ndim != 3 or not case.meta.get("is_volume"):
            raise TaskError(f"case {case.id}: {self.name} needs a volume")
        x = torch.from_numpy(padded_volume(case.pixels))
        if not case.labelled:
            return Prepared(case.id, x, None, None)
        y, v = self.classes(case)
        return Prepared(case.id, x, torch.from_numpy(y).float(), torch.from_numpy(v).float())

    def batch(
        self,
        item: Sequence[Prepared],
        rng: np.random.Generator,
        size: int,
        patch: int,
        config: Mapping[str, Any],
    ) -> Batch:
        xs, ys, vs = [], [], []
        for _ in range(size):
            p = item[int(rng.integers(len(item)))]
            assert p.y is not None and p.valid is not None
            _, z_n, h, w = p.y.shape
            ps = min(patch, h, w)
            cls = int(rng.integers(3))  # class-balanced patch centres
            idx = torch.nonzero(p.y[cls] * p.valid[cls])
            if len(idx) == 0:
                idx = torch.nonzero(p.valid[0] >= 0)
            z, cy, cx = (int(v) for v in idx[int(rng.integers(len(idx)))])
            top = int(np.clip(cy - ps // 2, 0, h - ps))
            left = int(np.clip(cx - ps // 2, 0, w - ps))
            xs.append(
                p.x[z : z + SLICES, top : top + ps + 2 * MARGIN, left : left + ps + 2 * MARGIN]
            )
            y = p.y[:, z, top : top + ps, left : left + ps]
            v = p.valid[:, z, top : top + ps, left : left + ps]
            vs.append(v * self._balanced(y, v, rng))
            ys.append(y)
        return Batch(torch.stack(xs), torch.stack(ys), torch.stack(vs), sequence=False)

    @staticmethod
    def _balanced(y: torch.Tensor, v: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """The paper's undersampling within a patch: every vessel voxel and as many
        bone and soft-tissue voxels (all of a class when it has fewer)."""
        labelled = (y * v).bool()
        n = max(int(labelled[CLASS_VESSEL].sum()), 1)
        keep = labelled[CLASS_VESSEL].clone()
        scores = torch.as_tensor(rng.random(tuple(y.shape[1:])), dtype=torch.float32)
        for cls in (CLASS_BONE, CLASS_SOFT):
            pool = labelled[cls]
            count = int(pool.sum())
            if count <= n:
                keep |= pool
            else:
                cut = torch.kthvalue(scores[pool], n).values
                keep |= pool & (scores <= cut)
        return keep.float()[None].expand_as(y)

    def predict(
        self,
        model: torch.nn.Module,
        case: Case,
        config: Mapping[str, Any],
        device: torch.device,
        slab: int = 4,
    ) -> np.ndarray:
        padded = torch.from_numpy(padded_volume(case.pixels)).to(device)
        model = model.to(device).eval()
        z_n = case.pixels.shape[0]
        out = np.empty((3, *case.pixels.shape), np.float32)
        with inference_mode(device):
            for z0 in range(0, z_n, slab):
                z1 = min(z0 + slab, z_n)
                windows = padded[z0 : z1 + SLICES - 1].unfold(0, SLICES, 1).permute(0, 3, 1, 2)
                probs = F.softmax(model(windows.contiguous()).float(), dim=1)
                out[:, z0:z1] = probs.permute(1, 0, 2, 3).cpu().numpy()
        return out

    def pseudo_labels(self, probs: np.ndarray) -> dict[str, np.ndarray]:
        label = probs.argmax(axis=0)
        return {"vessel": label == CLASS_VESSEL, "bone": label == CLASS_BONE}

    def foreground(self) -> list[int]:
        return [CLASS_VESSEL, CLASS_BONE]

    def evaluate(self, probs: np.ndarray, case: Case, threshold: float = 0.5) -> dict[str, float]:
        truth = self.truth(case)
        # Binary inputs (a pipeline's masks) may leave voxels in no class: everything else.
        label = np.where(probs.max(axis=0) > 0, probs.argmax(axis=0), CLASS_SOFT)
        out = M.binary_metrics(
            label == CLASS_VESSEL, truth[CLASS_VESSEL], probs[CLASS_VESSEL], topology=False
        )
        out["bone_dice"] = M.dice(label == CLASS_BONE, truth[CLASS_BONE])
        out["accuracy"] = float((label == truth.argmax(axis=0)).mean())
        return out


# ---------------------------------------------------------------------------
# The MinIP as a 2D image -> background / ICA (dsa_perfusion's ICA U-Net)


class ImageTask(Task):
    """Softmax classes (background, ICA) of the MinIP, as ``minip_opacity`` presents it."""

    def _multiple(self, config: Mapping[str, Any]) -> int:
        return 2 ** (int(config.get("levels", 5)) - 1)

    def classes(self, case: Case) -> tuple[np.ndarray, np.ndarray]:
        target, valid = label_targets(case.annotation(), ["ica"])
        one_hot = np.stack([valid[0] & ~target[0], target[0]])
        return one_hot, np.broadcast_to(valid, one_hot.shape).copy()

    def truth(self, case: Case) -> np.ndarray:
        return self.classes(case)[0]

    def prepare(self, case: Case, config: Mapping[str, Any]) -> Prepared:
        if case.pixels.ndim != 3 or case.meta.get("is_volume"):
            raise TaskError(f"case {case.id}: {self.name} needs a 2D+t run")
        x = torch.from_numpy(minip_opacity(case.pixels.min(axis=0)))[None]
        if not case.labelled:
            return Prepared(case.id, x, None, None)
        if case.geometry != "canvas" or "ica" not in case.masks:
            raise TaskError(f"case {case.id}: {self.name} needs a 2D ICA label")
        y, v = self.classes(case)
        return Prepared(case.id, x, torch.from_numpy(y).float(), torch.from_numpy(v).float())

    def batch(
        self,
        item: Sequence[Prepared],
        rng: np.random.Generator,
        size: int,
        patch: int,
        config: Mapping[str, Any],
    ) -> Batch:
        m = self._multiple(config)
        xs, ys, vs = [], [], []
        for _ in range(size):
            p = item[int(rng.integers(len(item)))]
            assert p.y is not None and p.valid is not None
            h, w = p.x.shape[-2:]
            ps = max(m, min(patch, h, w) // m * m)
            if min(h, w) < ps:
                raise TaskError(f"case {p.case_id}: image {h}x{w} smaller than {m}")
            top, left = _crop_starts(p.y[1] * p.valid[1], (h, w), ps, rng)
            sl = (slice(None), slice(top, top + ps), slice(left, left + ps))
            xs.append(p.x[sl])
            ys.append(p.y[sl])
            vs.append(p.valid[sl])
        return Batch(torch.stack(xs), torch.stack(ys), torch.stack(vs), sequence=False)

    def predict(
        self, model: torch.nn.Module, case: Case, config: Mapping[str, Any], device: torch.device
    ) -> np.ndarray:
        image = torch.from_numpy(minip_opacity(case.pixels.min(axis=0)))[None, None]
        h, w = image.shape[-2:]
        m = self._multiple(config)
        image = F.pad(image, (0, (-w) % m, 0, (-h) % m), mode="replicate").to(device)
        model = model.to(device).eval()
        with inference_mode(device):
            probs = F.softmax(model(image).float(), dim=1)[0, :, :h, :w]
        return probs.cpu().numpy()

    def pseudo_labels(self, probs: np.ndarray) -> dict[str, np.ndarray]:
        return {"ica": probs.argmax(axis=0) == 1}

    def foreground(self) -> list[int]:
        return [1]

    def evaluate(self, probs: np.ndarray, case: Case, threshold: float = 0.5) -> dict[str, float]:
        truth = self.truth(case)
        pred = np.where(probs.max(axis=0) > 0, probs.argmax(axis=0), 0) == 1
        return M.binary_metrics(pred, truth[1], probs[1])


# ---------------------------------------------------------------------------
# Registry

CAVE = TrainDefaults(
    optimizer="rmsprop",
    lr=1e-4,
    weight_decay=1e-8,
    momentum=0.9,
    schedule="plateau",
    warmup_epochs=0,
    plateau_patience=10,
    plateau_factor=0.5,
    early_stop=50,
    patch=96,
)
DIAS = TrainDefaults(
    optimizer="adamw",
    lr=5e-4,
    weight_decay=0.01,
    schedule="cosine",
    warmup_epochs=10,
    min_lr=5e-6,
    early_stop=100,
    patch=64,
)

TASKS: dict[str, Task] = {
    "dsa_av": SequenceTask(
        name="dsa_av",
        pipeline="dsa_av",
        architecture="st_unet",
        channels=("artery", "vein"),
        multilabel=True,
        geometry="canvas",
        monitor="m_dice",
        default_config={
            "channels": ["artery", "vein"],
            "out_channels": 2,
            "fps": 1.0,
            "min_frames": 4,
            "max_frames": 60,
            "max_side": 512,
        },
        defaults=CAVE,
    ),
    "dsa_ia": SequenceTask(
        name="dsa_ia",
        pipeline="dsa_ia",
        architecture="vss_net",
        channels=("artery",),
        multilabel=True,
        geometry="canvas",
        monitor="dice",
        default_config={"out_channels": 1, "fps": None, "max_side": 512},
        defaults=DIAS,
    ),
    "xa_coronary": CineTask(
        name="xa_coronary",
        pipeline="xa_coronary",
        architecture="ce_net_3d2d",
        channels=("vessel",),
        multilabel=True,
        geometry="frames",
        monitor="dice",
        default_config={"neighbours": 1, "width": 64, "threshold": 0.5, "max_side": 512},
        defaults=TrainDefaults(
            optimizer="adam",
            lr=2e-4,
            weight_decay=0.0,
            schedule="plateau",
            warmup_epochs=0,
            early_stop=30,
            patch=128,
        ),
    ),
    "rotational_dla": VolumeTask(
        name="rotational_dla",
        pipeline="rotational_dla",
        architecture="dla_resnet",
        channels=("vessel", "bone", "soft_tissue"),
        multilabel=False,
        geometry="volume",
        monitor="dice",
        default_config={"width": 32},
        defaults=TrainDefaults(
            optimizer="adamw",
            lr=1e-3,
            weight_decay=1e-4,
            schedule="cosine",
            warmup_epochs=1,
            early_stop=30,
            patch=32,
        ),
        geometric=Geometric(affine_p=0.0),
    ),  # flips only: rotating HU slabs pulls in padding
    "dsa_perfusion": ImageTask(
        name="dsa_perfusion",
        pipeline="dsa_perfusion",
        architecture="ica_unet",
        channels=("background", "ica"),
        multilabel=False,
        geometry="canvas",
        monitor="dice",
        default_config={"width": 16, "levels": 5},
        defaults=TrainDefaults(
            optimizer="adamw",
            lr=1e-3,
            weight_decay=1e-4,
            schedule="cosine",
            warmup_epochs=1,
            early_stop=30,
            patch=64,
        ),
    ),
}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise TaskError(f"unknown task {name!r}; known: {', '.join(sorted(TASKS))}") from None


def task_for_architecture(architecture: str) -> Task:
    for task in TASKS.values():
        if task.architecture == architecture:
            return task
    raise TaskError(
        f"no task trains architecture {architecture!r}; tasks: "
        + ", ".join(f"{t.name} ({t.architecture})" for t in TASKS.values())
    )
