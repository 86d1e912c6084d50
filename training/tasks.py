"""Tasks: how a dataset case becomes model tensors for one pipeline, and how the
node's answer on that case is scored.

A task ties a registered architecture to the pipeline that will load its
package. Training inputs are built with that pipeline's own preprocessing
functions, so a model is trained on exactly what the node will feed it:

    dsa_av         st_unet      resample_frames (1 fps), normalise_dsa, work_shape
    dsa_ia         vss_net      normalise_dsa on every frame, work_shape
    xa_coronary    ce_net_3d2d  normalise_cine, (2N+1)-frame windows
    rotational_dla dla_resnet   padded_volume (HU slabs with context)
    dsa_perfusion  ica_unet     minip_opacity of the MinIP (the ICA)

Evaluation never re-implements inference: :meth:`Task.node_masks` runs the
node's pipeline itself on the case's run, with a package staged from the
weights (or none: the classical path), and reads the segmentation it emits;
the ICA task calls the perfusion pipeline's own ``locate_ica``, because that
pipeline emits the AIF region rather than the ICA. So a number reported by
training is the number the node would get on that run.

Training draws random patches (the DIAS recipe; whole 512^2 sequences do not
fit a CPU step). Sequence models see one case per step (runs differ in their
number of frames after resampling), several patches of it per batch.

``train_defaults`` are the seed papers' optimisation settings where their
published code states them (ST U-Net: CAVE's ``train.py``; VSS-Net, SSCR and
RPST: the DIAS code); the others are marked as ours in docs/training.md.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipelines.base import PipelineContext, Run, SegmentationOutput
from pipelines.coronary import normalise_cine
from pipelines.models.cenet import STRIDE, frame_windows
from pipelines.models.dla import CLASS_BONE, CLASS_SOFT, CLASS_VESSEL, MARGIN, SLICES
from pipelines.models.ica_unet import minip_opacity
from pipelines.preprocess import normalise_dsa, resample_frames, resize, work_shape
from pipelines.rotational import padded_volume
from training import metrics as M
from training.annotations import ROLES, label_targets
from training.augment import Geometric
from training.dataset import Case

Masks = dict[str, np.ndarray]
SEQUENCE_ROLES = ("artery", "vein", "ica")


class TaskError(Exception):
    """A case or configuration a task cannot use, with the reason."""


@dataclass
class Prepared:
    """A case on the working grid: inputs, per-channel targets and valid masks (or None)."""

    case_id: str
    x: torch.Tensor
    y: torch.Tensor | None
    valid: torch.Tensor | None
    # Per class, a sample of the voxels labelled with it ((N, 3) int32): where the
    # volume task centres its class-balanced patches.
    centres: tuple[np.ndarray, ...] | None = None


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
    headline: str = ""  # the metric the shipping gate compares (default: monitor)

    # -- configuration
    def config(self, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        return {**self.default_config, **(overrides or {})}

    def configured(self, config: Mapping[str, Any]) -> Task:
        """This task for one architecture config (sequence tasks take their output
        channels from it)."""
        return self

    @property
    def gate_metric(self) -> str:
        return self.headline or self.monitor

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

    # -- the node's answer
    def node_masks(self, run: Run, package: str | None, device: str = "cpu") -> Masks:
        """Role -> bool mask of what the node's pipeline emits for ``run`` with ``package``
        (a package folder; None: the classical path)."""
        import pipelines

        result = pipelines.get(self.pipeline)(
            run, PipelineContext(device=device, model_package=package)
        )
        seg = next((o for o in result.outputs if isinstance(o, SegmentationOutput)), None)
        if seg is None:
            raise TaskError(f"the {self.pipeline} pipeline emits no segmentation to compare")
        out: Masks = {}
        for i, segment in enumerate(seg.segments):
            role = ROLES.get((segment.code.value, segment.code.scheme))
            if role is not None:
                out[role] = np.asarray(seg.masks[i], bool)
        return out

    def truth(self, case: Case) -> Masks:
        """Role -> bool truth on the native grid (full annotations only)."""
        target, _ = label_targets(case.annotation(), self.channels)
        return {c: target[k] for k, c in enumerate(self.channels)}

    def pseudo_labels(self, pred: Masks) -> Masks:
        """Hard pseudo-labels (role -> mask) of an unlabelled run from the node's answer."""
        return {c: pred[c] for c in self.channels if c in pred}

    def drawn(self) -> tuple[str, ...]:
        """Roles worth drawing (softmax 'everything else' classes are not)."""
        return self.channels

    # -- evaluation
    def score(self, pred: Masks, case: Case) -> dict[str, float]:
        """Per-case metrics of the node's masks against the case's full annotation."""
        truth = self.truth(case)
        shape = next(iter(truth.values())).shape

        def p(role: str) -> np.ndarray:
            return np.asarray(pred.get(role, np.zeros(shape, bool)), bool)

        if len(self.channels) == 1:
            return M.binary_metrics(p(self.channels[0]), truth[self.channels[0]])
        vessels = [c for c in self.channels if c != "ica"]
        out = M.binary_metrics(
            np.logical_or.reduce([p(c) for c in vessels]),
            np.logical_or.reduce([truth[c] for c in vessels]),
        )
        if {"artery", "vein"} <= set(self.channels):
            out.update(M.av_metrics(p("artery"), p("vein"), truth["artery"], truth["vein"]))
        return out


# ---------------------------------------------------------------------------
# 2D+t DSA sequences -> one 2D label map (dsa_av, dsa_ia)


class SequenceTask(Task):
    """A 2D label map of a 2D+t run; the output channels are roles, from the config's
    ``channels`` (``dsa_av`` packages may add ``ica`` to artery and vein)."""

    def config(self, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        out = super().config(overrides)
        if overrides and "channels" in overrides and "out_channels" not in overrides:
            out["out_channels"] = len(overrides["channels"])
        return out

    def configured(self, config: Mapping[str, Any]) -> Task:
        channels = tuple(config.get("channels") or self.channels)
        if not set(channels) <= set(SEQUENCE_ROLES) or len(set(channels)) != len(channels):
            raise TaskError(f"{self.name}: channels {list(channels)}; allowed {SEQUENCE_ROLES}")
        if len(channels) != int(config.get("out_channels", len(channels))):
            raise TaskError(
                f"{self.name}: {len(channels)} channels {list(channels)} but out_channels "
                f"{config.get('out_channels')}"
            )
        if self.pipeline == "dsa_av" and not {"artery", "vein"} <= set(channels):
            raise TaskError(f"dsa_av needs artery and vein channels, got {list(channels)}")
        if self.pipeline == "dsa_ia" and len(channels) != 1:
            raise TaskError(f"dsa_ia has one output channel, got {list(channels)}")
        return dataclasses.replace(self, channels=channels)

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

    def score(self, pred: Masks, case: Case) -> dict[str, float]:
        out = super().score(pred, case)
        if self.pipeline == "dsa_av" and "ica" in case.masks:
            # The ICA as the pipeline reports it; none reported where the truth has one is 0.
            truth = np.asarray(case.masks["ica"], bool)
            out["ica_dice"] = M.dice(np.asarray(pred.get("ica", np.zeros_like(truth)), bool), truth)
        return out


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
            if rng.random() < 0.5:
                win = win.flip(0)  # time reversal: a window looks the same either way
            xs.append(win[:, top : top + ps, left : left + ps])
            ys.append(p.y[t, :, top : top + ps, left : left + ps])
            vs.append(p.valid[t, :, top : top + ps, left : left + ps])
        return Batch(torch.stack(xs), torch.stack(ys), torch.stack(vs), sequence=False)

    def score(self, pred: Masks, case: Case) -> dict[str, float]:
        """Overlap pooled over every frame of the run (the CE-Net paper's table: frames
        before the contrast arrives count as what they are, not as perfect frames), and
        clDice averaged over the frames."""
        truth = self.truth(case)["vessel"]
        mask = np.asarray(pred.get("vessel", np.zeros_like(truth)), bool)
        out = M.binary_metrics(mask, truth, topology=False)
        out["cldice"] = float(np.mean([M.cldice(m, t) for m, t in zip(mask, truth, strict=True)]))
        return out


# ---------------------------------------------------------------------------
# Rotational volumes: vessel / bone / soft tissue per voxel (rotational_dla)

# Patch centres kept per class and case: enough to cover a 256^3 volume's vessels.
CENTRES_PER_CLASS = 65536


def _sample_voxels(mask: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``count`` voxels of ``mask`` drawn without replacement, (N, 3) int32."""
    flat = np.flatnonzero(mask)
    if len(flat) > count:
        flat = rng.choice(flat, count, replace=False)
    return np.stack(np.unravel_index(flat, mask.shape), axis=1).astype(np.int32)


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

    def truth(self, case: Case) -> Masks:
        one_hot = self.classes(case)[0]
        return {role: one_hot[k] for role, k in self.CLASS_OF.items()}

    def prepare(self, case: Case, config: Mapping[str, Any]) -> Prepared:
        if case.pixels.ndim != 3 or not case.meta.get("is_volume"):
            raise TaskError(f"case {case.id}: {self.name} needs a volume")
        x = torch.from_numpy(padded_volume(case.pixels))
        if not case.labelled:
            return Prepared(case.id, x, None, None)
        # Boolean targets and masks, made float one patch at a time: a 256^3 case
        # holds 0.1 GB of them instead of 0.4 GB (twelve cases were OOM-killed).
        y, v = self.classes(case)
        rng = np.random.default_rng(zlib.crc32(case.id.encode()))
        centres = tuple(_sample_voxels(y[k] & v[k], CENTRES_PER_CLASS, rng) for k in range(3))
        return Prepared(case.id, x, torch.from_numpy(y), torch.from_numpy(v), centres)

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
            assert p.centres is not None  # prepare() samples them for every labelled case
            pool = p.centres[cls]
            if len(pool):
                z, cy, cx = (int(v) for v in pool[int(rng.integers(len(pool)))])
            else:  # no voxel of this class: anywhere
                z, cy, cx = (int(rng.integers(n)) for n in (z_n, h, w))
            top = int(np.clip(cy - ps // 2, 0, h - ps))
            left = int(np.clip(cx - ps // 2, 0, w - ps))
            xs.append(
                p.x[z : z + SLICES, top : top + ps + 2 * MARGIN, left : left + ps + 2 * MARGIN]
            )
            y = p.y[:, z, top : top + ps, left : left + ps].float()
            v = p.valid[:, z, top : top + ps, left : left + ps].float()
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

    def pseudo_labels(self, pred: Masks) -> Masks:
        vessel = np.asarray(pred["vessel"], bool)
        return {"vessel": vessel, "bone": np.asarray(pred["bone"], bool) & ~vessel}

    def drawn(self) -> tuple[str, ...]:
        return ("vessel", "bone")

    def score(self, pred: Masks, case: Case) -> dict[str, float]:
        truth = self.truth(case)
        shape = truth["vessel"].shape
        vessel = np.asarray(pred.get("vessel", np.zeros(shape, bool)), bool)
        bone = np.asarray(pred.get("bone", np.zeros(shape, bool)), bool) & ~vessel
        out = M.binary_metrics(vessel, truth["vessel"], topology=False)
        out["bone_dice"] = M.dice(bone, truth["bone"])
        # Everything the node calls neither vessel nor bone is soft tissue (or air).
        label = np.where(vessel, CLASS_VESSEL, np.where(bone, CLASS_BONE, CLASS_SOFT))
        true_label = np.where(
            truth["vessel"], CLASS_VESSEL, np.where(truth["bone"], CLASS_BONE, CLASS_SOFT)
        )
        out["accuracy"] = float((label == true_label).mean())
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

    def truth(self, case: Case) -> Masks:
        return {"ica": self.classes(case)[0][1]}

    def prepare(self, case: Case, config: Mapping[str, Any]) -> Prepared:
        if case.pixels.ndim != 3 or case.meta.get("is_volume"):
            raise TaskError(f"case {case.id}: {self.name} needs a 2D+t run")
        x = torch.from_numpy(minip_opacity(case.pixels.min(axis=0)))[None]
        # The scale the node gives the network (pipelines.models.ica_unet.predict_mask).
        size = full = (int(x.shape[-2]), int(x.shape[-1]))
        if config.get("max_side"):
            size = work_shape(full, None, None, int(config["max_side"]))
        x = resize(x, size)
        if not case.labelled:
            return Prepared(case.id, x, None, None)
        if case.geometry != "canvas" or "ica" not in case.masks:
            raise TaskError(f"case {case.id}: {self.name} needs a 2D ICA label")
        y, v = (resize(torch.from_numpy(a).float(), size) for a in self.classes(case))
        y, v = (y >= 0.5).float(), (v >= 0.5).float()
        return Prepared(case.id, x, y, v)

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

    def node_masks(self, run: Run, package: str | None, device: str = "cpu") -> Masks:
        """The ICA the perfusion pipeline places its AIF in, by the pipeline's own
        ``locate_ica`` on the inputs its ``__call__`` prepares (the pipeline emits the
        AIF region, a part of the ICA, as its SEG)."""
        from pipelines.base import minip
        from pipelines.perfusion.aif import contrast_signal, noise_sigma
        from pipelines.perfusion.ica import IcaSettings
        from pipelines.perfusion.pipeline import locate_ica
        from pipelines.perfusion.timing import acquisition_times, resample, uniform_grid

        frames = run.pixels
        times = acquisition_times(run.meta, frames.shape[0])
        timing = uniform_grid(times)
        raw = contrast_signal(frames, run.meta)
        signal = resample(raw, times, timing.grid_s)
        ica, _ = locate_ica(
            minip(frames),
            signal,
            timing.grid_s,
            noise_sigma(raw),
            package,
            "auto",
            IcaSettings(),
            torch.device(device),
        )
        return {"ica": np.asarray(ica.mask, bool)}

    def drawn(self) -> tuple[str, ...]:
        return ("ica",)

    def score(self, pred: Masks, case: Case) -> dict[str, float]:
        truth = self.truth(case)["ica"]
        return M.binary_metrics(np.asarray(pred.get("ica", np.zeros_like(truth)), bool), truth)


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
        headline="iou",  # the CE-Net paper reports IoU
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
        # The node decides with the offset calibrated on validation runs
        # (training.calibration), so the checkpoint is chosen by that decision's Dice.
        monitor="calibrated_dice",
        headline="dice",
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
        # max_side: the MinIP is shrunk to 256 px, as the node does (the ICA is large)
        default_config={"width": 16, "levels": 5, "max_side": 256},
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
