"""The internal carotid artery on the MinIP: where the AIF is measured.

With a model package (architecture ``ica_unet``) a U-Net segments it. Without
one, a classical rule finds it: among the dense vessels that enter from the
image border, the earliest to opacify, and among those the widest at the
border; its wide trunk (an opening at half the entry radius) is the mask, so
the thinner branches and their partial-volume edges stay out of the AIF. A
trunk wider than any artery (``IcaSettings.widest_mm``) is blush, or an artery
joined to it, and the next vessel in time is tried.

Keeping only the largest connected component removes stray fragments but can
also drop a true part of the ICA (a siphon crossed by another vessel); it is an
option, and ``bench.perfusion`` measures it both ways.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu

from pipelines.base import PipelineError

# A vessel "enters from the border" when it reaches this band. It is a fraction of
# the image, not a few pixels, because collimator shutters and the detector's
# edge roll-off often stop the visible vessel short of the last rows.
BORDER_FRACTION = 0.025
MIN_BORDER_PX = 3


@dataclass(frozen=True)
class IcaSettings:
    # Components entering this much later than the earliest are not the ICA.
    early_margin_s: float = 0.75
    keep_largest: bool = True
    # No artery is wider (the ICA is 4-7 mm, magnified up to about 1.5 in
    # projection): a dense region that holds a disk this wide is blush, a
    # hemisphere seen through its full depth, not a vessel. The maps' large-vessel
    # rule uses the same width (``MapSettings.vessel_width_mm``).
    widest_mm: float = 10.0


@dataclass(frozen=True)
class IcaResult:
    mask: np.ndarray
    method: str  # "classical" or "model"
    entry_width_px: float
    components: int  # connected components before keeping the largest


def opacity_and_arrival(
    concentration: np.ndarray, grid_s: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Peak opacification per pixel and the time it first reaches half of it."""
    peak = concentration.max(axis=0)
    reached = concentration >= 0.5 * peak[None]
    arrival = grid_s[np.argmax(reached, axis=0)]
    return peak, arrival


def disk_radius_px(width_mm: float, spacing_px_mm: float) -> int:
    """The radius in pixels of a disk ``width_mm`` across at ``spacing_px_mm`` (at
    least 1 px): the ICA rules' widest artery and the maps' widest vessel."""
    return max(1, int(round(0.5 * width_mm / max(spacing_px_mm, 1e-6))))


def widest_radius_px(spacing_mm: tuple[float, float] | None, widest_mm: float) -> float:
    """``disk_radius_px`` of ``widest_mm`` at ``spacing_mm`` (0.5 mm when it is
    unknown); infinite for an infinite width: a region holds that disk where its
    distance to the background exceeds it."""
    if not np.isfinite(widest_mm):
        return float("inf")
    spacing = float(np.mean(spacing_mm)) if spacing_mm and min(spacing_mm) > 0 else 0.5
    return float(disk_radius_px(widest_mm, spacing))


def largest_component(mask: np.ndarray) -> tuple[np.ndarray, int]:
    labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
    if count <= 1:
        return mask, count
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (int(np.argmax(sizes)) + 1), count


def classical_ica(
    opacity: np.ndarray,
    arrival_s: np.ndarray,
    sigma: float,
    settings: IcaSettings | None = None,
    field: np.ndarray | None = None,
    spacing_mm: tuple[float, float] | None = None,
) -> IcaResult:
    """Earliest-opacifying, widest vessel entering from the border (see module docstring).

    With a collimated ``field`` (H, W) the vessel enters from the field's edge,
    not the image's, and nothing outside the field counts. A trunk that holds a
    disk wider than ``settings.widest_mm`` (at ``spacing_mm``) is not an artery:
    the next vessel in time is tried.
    """
    settings = settings or IcaSettings()
    smooth = ndimage.gaussian_filter(opacity, 1.0)
    if field is not None:
        smooth = np.where(field, smooth, 0.0)
    candidates = smooth[smooth > 5 * sigma]
    if candidates.size < 16:
        raise PipelineError("no opacified vessels found on the MinIP: cannot locate the ICA")
    level = max(float(threshold_otsu(candidates)), 10 * sigma)
    vessels = smooth >= level
    labels, count = ndimage.label(vessels, structure=np.ones((3, 3)))
    band = max(MIN_BORDER_PX, int(round(BORDER_FRACTION * min(vessels.shape))))
    border = np.zeros_like(vessels)
    border[:band], border[-band:] = True, True
    border[:, :band], border[:, -band:] = True, True
    if field is not None:
        border = field & (border | ~ndimage.binary_erosion(field, iterations=band))
    entering = np.unique(labels[border & vessels])
    entering = entering[entering > 0]
    if len(entering) == 0:
        raise PipelineError("no dense vessel enters from the image border: cannot locate the ICA")
    radius = ndimage.distance_transform_edt(vessels)
    entry = border & vessels
    index = labels[entry]
    # Per component: median arrival and maximum radius where it crosses the border band.
    entry_arrival = arrival_s[entry]
    early = np.array([np.median(entry_arrival[index == k]) for k in entering])
    width = np.atleast_1d(
        np.asarray(ndimage.maximum(np.where(entry, radius, 0.0), labels, entering), float)
    )
    in_time = early <= early.min() + settings.early_margin_s
    # The widest in time first. A trunk that holds a disk wider than any artery is
    # blush (a hemisphere seen through its full depth) or an artery joined to it:
    # it would take that part of the brain out of the maps; the next one is tried.
    limit = widest_radius_px(spacing_mm, settings.widest_mm)
    for choice in sorted(np.flatnonzero(in_time), key=lambda i: -width[i]):
        mask, components = _border_trunk(
            labels == entering[choice],
            arrival_s,
            float(width[choice]),
            float(early[choice]),
            settings,
        )
        if float(ndimage.distance_transform_edt(mask).max()) <= limit:
            return IcaResult(
                mask=mask,
                method="classical",
                entry_width_px=2 * float(width[choice]),
                components=components,
            )
    raise PipelineError(
        f"every dense vessel entering from the border in time is wider than an artery "
        f"({settings.widest_mm:g} mm) where it would be the ICA: blush, not the ICA"
    )


def _border_trunk(
    component: np.ndarray,
    arrival_s: np.ndarray,
    entry_radius: float,
    early_s: float,
    settings: IcaSettings,
) -> tuple[np.ndarray, int]:
    """The wide trunk of a component entering from the border: opening by
    reconstruction at half the entry radius, opacifying in time; with the number
    of its pieces."""
    core = ndimage.distance_transform_edt(component) >= max(1.0, 0.5 * entry_radius)
    grow = max(1, int(round(0.5 * entry_radius)))
    trunk = ndimage.binary_dilation(core, iterations=grow) & component
    trunk &= arrival_s <= early_s + settings.early_margin_s
    if not trunk.any():
        trunk = component
    if settings.keep_largest:
        return largest_component(trunk)
    return trunk, int(ndimage.label(trunk, structure=np.ones((3, 3)))[1])


def model_ica(mask: np.ndarray, settings: IcaSettings | None = None) -> IcaResult:
    """Post-processing of a U-Net mask (the network runs in the pipeline)."""
    settings = settings or IcaSettings()
    if not mask.any():
        raise PipelineError("the ICA model found no ICA on the MinIP")
    if settings.keep_largest:
        mask, components = largest_component(mask)
    else:
        components = int(ndimage.label(mask, structure=np.ones((3, 3)))[1])
    width = 2 * float(ndimage.distance_transform_edt(mask).max())
    return IcaResult(mask=mask, method="model", entry_width_px=width, components=components)
