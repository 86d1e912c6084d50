"""Losses for full, weak and semi-supervised training.

Targets are always dense one-hot / multi-hot maps ``target`` (B, K, ...) with a
``valid`` mask (B, K, ...) or (B, 1, ...): 1 where the label is known. Full
annotations are valid everywhere except where augmentation moved pixels in
from outside the image; scribbles are valid only on scribbled pixels, which
turns cross-entropy into the partial cross-entropy (pCE) of scribble learning.

``multilabel`` models (sigmoid per channel: arteries and veins may overlap in
projection) use binary cross-entropy per channel; the others (softmax over
classes: vessel / bone / soft tissue) use categorical cross-entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _valid(target: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    if valid is None:
        return torch.ones_like(target)
    return valid.to(target.dtype).expand_as(target)


def probabilities(logits: torch.Tensor, multilabel: bool) -> torch.Tensor:
    return torch.sigmoid(logits) if multilabel else torch.softmax(logits, dim=1)


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor | None = None,
    multilabel: bool = True,
) -> torch.Tensor:
    """Mean CE over valid labels; 0 (with a graph) when nothing is valid."""
    logits = logits.float()
    target = target.float()
    w = _valid(target, valid)
    if multilabel:
        per = F.binary_cross_entropy_with_logits(logits, target, reduction="none") * w
        return per.sum() / w.sum().clamp_min(1.0)
    logp = F.log_softmax(logits, dim=1)
    # A pixel is valid when its label (one-hot) is known: valid is the same for all K.
    wp = w.amax(dim=1)
    per = -(target * logp).sum(dim=1) * wp
    return per.sum() / wp.sum().clamp_min(1.0)


partial_cross_entropy = cross_entropy  # the same formula; only the valid mask differs


def soft_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor | None = None,
    multilabel: bool = True,
    smooth: float = 1.0,
) -> torch.Tensor:
    """1 - mean over channels of the soft Dice, pooled over the batch and valid pixels."""
    p = probabilities(logits.float(), multilabel)
    t = target.float()
    w = _valid(t, valid)
    dims = [0] + list(range(2, p.dim()))
    inter = (p * t * w).sum(dim=dims)
    denom = (p * w).sum(dim=dims) + (t * w).sum(dim=dims)
    return 1.0 - ((2 * inter + smooth) / (denom + smooth)).mean()


def ce_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor | None = None,
    multilabel: bool = True,
    dice_weight: float = 1.0,
) -> torch.Tensor:
    """The full-supervision loss of the seed papers: cross-entropy plus Dice."""
    return cross_entropy(logits, target, valid, multilabel) + dice_weight * soft_dice_loss(
        logits, target, valid, multilabel
    )


def hard_labels(logits: torch.Tensor, multilabel: bool, threshold: float = 0.5) -> torch.Tensor:
    """One-hot / multi-hot hard pseudo-labels (no gradient)."""
    with torch.no_grad():
        if multilabel:
            return (torch.sigmoid(logits.float()) >= threshold).float()
        idx = logits.argmax(dim=1)
        return F.one_hot(idx, logits.shape[1]).movedim(-1, 1).float()


def scribble_corrected(
    pseudo: torch.Tensor, scribble: torch.Tensor, scribble_valid: torch.Tensor
) -> torch.Tensor:
    """Pseudo-labels overwritten by the scribbles wherever a scribble says otherwise."""
    v = scribble_valid.to(pseudo.dtype).expand_as(pseudo)
    return pseudo * (1 - v) + scribble.to(pseudo.dtype) * v


def consistency_mse(
    logits_a: torch.Tensor, logits_b: torch.Tensor, multilabel: bool
) -> torch.Tensor:
    """MSE between the two networks' probabilities (consistency regularisation).

    The DIAS code applies the MSE to the two arg-max maps, which carries no
    gradient; the probabilities make the term act, as the paper describes it.
    """
    return F.mse_loss(
        probabilities(logits_a.float(), multilabel), probabilities(logits_b.float(), multilabel)
    )
