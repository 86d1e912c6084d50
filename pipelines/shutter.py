"""The collimated field of a 2D run: where the detector saw the patient.

Collimator blades (rectangular, circular, an iris that leaves an octagon) block
the beam at the edges of most angiography runs. Outside the field the image is
flat (no quantum noise, nothing moves), and the field's edge is a long straight
or circular step that a vesselness filter or a network answers like a vessel
wall. Every 2D pipeline therefore finds the field once and

1. hides the blade edge from its filters where they would answer it (the
   DSA path fills what lies outside the field with a smooth extension of the
   inside, ``fill_outside``; the coronary path's temporal median already
   removes the static edge), and
2. reports nothing outside it (``restrict``).

Network inputs are left as they are (a package sees what it was trained on);
only its output is restricted.

Where the field comes from, in this order: the DICOM Shutter module or the
X-Ray Collimator module (``RunMeta.shutter``, decoded by ``dicom_node.runs``
with :func:`from_header`),
then the image (``detect``: pixels connected to the image border that are flat
in time and space and at the border's value, most of them holding exactly one
stored value through the run, as blanking writes it; the field is the largest
region left, opened until it is convex where burned-in text or a scale bar on the
blanked area joins it). When both are there the
field is their intersection. A margin of a few pixels (the blades' penumbra and
lossy-compression ringing) is taken off the inside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage
from skimage.draw import polygon2mask
from skimage.feature import canny
from skimage.morphology import convex_hull_image
from skimage.transform import (
    hough_circle,
    hough_circle_peaks,
    hough_line,
    hough_line_peaks,
    resize,
)

from pipelines.base import RunMeta, Shutter

# A detected outside region must cover at least this share of the image
# (less is a few flat pixels at a corner, not a collimator).
MIN_OUTSIDE_FRACTION = 0.005
# A field smaller than this share of the image is a failed detection.
MIN_FIELD_FRACTION = 0.2
# If more than this share of the field is itself flat at the border value (and, in a
# run of frames, holds it exactly through the run), the image cannot tell
# collimation from background.
MAX_FLAT_INSIDE_FRACTION = 0.02
# Blanking writes one stored value behind the blades, so in a run of frames most of
# the outside holds exactly one value through the run (compression ringing along the
# edge does not); air or a saturated background around the head is quiet but not
# exactly constant, nor is a physical blade's shadow.
MIN_CONSTANT_OUTSIDE_FRACTION = 0.6
# A run with more than this share of the image's centre exactly flat (in time and
# space) is noise-free: a digital reference object, whose background is as flat as a
# blanked area. Low-noise 8-bit runs have a share of such pixels too, from
# quantisation.
NOISE_FREE_FRACTION = 0.5
# Structure outside the field (beyond this share of the image) means the "outside"
# is a quiet background, not a blade.
MAX_STRAY_FRACTION = 0.02
# A collimated field is convex: its area over its convex hull's (a head outlined by
# the air around it is about 0.90-0.94).
MIN_CONVEXITY = 0.95
# Openings tried on the blanked-field outline, radius as a share of the longest side
# (the first: at least 2 px, smoothing only; the last cuts off text blocks up to about
# a tenth of the image tall that touch the field).
OPENING_RADII = (0.0, 1 / 64, 1 / 32, 1 / 20)


@dataclass(frozen=True)
class Field:
    """(H, W) bool ``mask`` of the exposed field, penumbra margin removed."""

    mask: np.ndarray
    source: str  # "none", "dicom", "image" or "dicom+image"

    @property
    def collimated(self) -> bool:
        return self.source != "none" and not bool(self.mask.all())

    def describe(self) -> str:
        if not self.collimated:
            return "collimator shutter: none found, whole image used"
        return (
            f"collimator shutter from {self.source.replace('+', ' and ')}: "
            f"{self.mask.mean():.0%} of the image is the exposed field; nothing is reported outside it"
        )


# Shutter coordinates are pixel rows and columns (at most 65535 of either): a value
# beyond twice that is not a position in the image, and would overflow the drawing.
MAX_COORDINATE = 2.0**17


def _numbers(value: Any) -> list[float] | None:
    """A numeric header value as finite floats within ``MAX_COORDINATE``; None when
    absent, unreadable or out of range."""
    if value is None or value == "":
        return None
    items = [value] if isinstance(value, (str, bytes, int, float)) else list(value)
    try:
        out = [float(v) for v in items]
    except (TypeError, ValueError, OverflowError):
        return None
    return out if all(math.isfinite(v) and abs(v) <= MAX_COORDINATE for v in out) else None


# Keywords of the Display Shutter module and of the X-Ray Collimator module
# (XA/RF images often carry only the latter); both give pixel rows and columns.
_MODULES = {
    "Shutter": (
        "ShutterShape",
        (
            "ShutterUpperHorizontalEdge",
            "ShutterLowerHorizontalEdge",
            "ShutterLeftVerticalEdge",
            "ShutterRightVerticalEdge",
        ),
        ("CenterOfCircularShutter", "RadiusOfCircularShutter"),
        "VerticesOfThePolygonalShutter",
    ),
    "Collimator": (
        "CollimatorShape",
        (
            "CollimatorUpperHorizontalEdge",
            "CollimatorLowerHorizontalEdge",
            "CollimatorLeftVerticalEdge",
            "CollimatorRightVerticalEdge",
        ),
        ("CenterOfCircularCollimator", "RadiusOfCircularCollimator"),
        "VerticesOfThePolygonalCollimator",
    ),
}


def _shapes(value: Any) -> set[str]:
    if value is None:
        return set()
    items = [value] if isinstance(value, (str, bytes)) else list(value)
    return {str(v).strip().upper() for v in items}


def _read(source: Any, module: str) -> Shutter | None:
    shape_kw, edge_kws, (centre_kw, radius_kw), vertices_kw = _MODULES[module]
    shapes = _shapes(source.get(shape_kw))
    rectangle = circle = None
    polygon: tuple[tuple[float, float], ...] = ()
    if "RECTANGULAR" in shapes:
        edges = [_numbers(source.get(k)) for k in edge_kws]
        if all(e is not None and len(e) == 1 for e in edges):
            top, bottom, left, right = (e[0] - 1.0 for e in edges if e is not None)
            if bottom > top and right > left:
                rectangle = (top, bottom, left, right)
    if "CIRCULAR" in shapes:
        centre, radius = _numbers(source.get(centre_kw)), _numbers(source.get(radius_kw))
        if centre is not None and radius is not None and len(centre) == 2 and len(radius) == 1:
            if radius[0] > 0:
                circle = (centre[0] - 1.0, centre[1] - 1.0, radius[0])
    if "POLYGONAL" in shapes:
        vertices = _numbers(source.get(vertices_kw))
        if vertices is not None and len(vertices) >= 6 and len(vertices) % 2 == 0:
            polygon = tuple(
                (vertices[i] - 1.0, vertices[i + 1] - 1.0) for i in range(0, len(vertices), 2)
            )
    if rectangle is None and circle is None and not polygon:
        return None
    return Shutter(rectangle=rectangle, circle=circle, polygon=polygon)


def from_header(ds: Any) -> Shutter | None:
    """The shutter of a 2D run's header (any object with ``get(keyword)``, e.g. a pydicom
    Dataset), or None when it has none that is usable (tolerant: defects are ignored).

    Read in this order: the Display Shutter module, the Frame Display Shutter
    Sequence of enhanced objects' Shared Functional Groups, the X-Ray Collimator
    module. DICOM gives rows and columns 1-based; the result is 0-based.
    """
    try:
        found = _read(ds, "Shutter")
        if found is None:
            shared = ds.get("SharedFunctionalGroupsSequence")
            inner = shared[0].get("FrameDisplayShutterSequence") if shared else None
            found = _read(inner[0], "Shutter") if inner else None
        return found if found is not None else _read(ds, "Collimator")
    except (TypeError, ValueError, OverflowError, AttributeError, IndexError, KeyError):
        # OverflowError: pydicom reading an IS of 1e999 as int
        return None


def shutter_mask(shutter: Shutter, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) bool: inside every shape of ``shutter``."""
    h, w = shape
    rows = np.arange(h, dtype=np.float64)[:, None]
    cols = np.arange(w, dtype=np.float64)[None, :]
    mask = np.ones((h, w), bool)
    if shutter.rectangle is not None:
        top, bottom, left, right = shutter.rectangle
        mask &= (rows >= top) & (rows <= bottom) & (cols >= left) & (cols <= right)
    if shutter.circle is not None:
        cr, cc, radius = shutter.circle
        mask &= (rows - cr) ** 2 + (cols - cc) ** 2 <= radius**2
    if shutter.polygon:
        mask &= polygon2mask((h, w), np.asarray(shutter.polygon, np.float64))
    return mask


def _centre(shape: tuple[int, ...]) -> tuple[slice, slice]:
    """The central half of an (H, W) image in each direction."""
    h, w = shape[-2:]
    return slice(h // 4, h - h // 4), slice(w // 4, w - w // 4)


def _border(image: np.ndarray, width: int = 1) -> np.ndarray:
    """The pixels of the outer ``width`` rows and columns of an (H, W) image, flat."""
    return np.concatenate(
        [
            image[:width].ravel(),
            image[-width:].ravel(),
            image[:, :width].ravel(),
            image[:, -width:].ravel(),
        ]
    )


def _flat_field(x: np.ndarray) -> np.ndarray | None:
    """Blanked collimation: outside the field a pixel is at the border's value, flat over time (no
    quantum noise, no motion) and flat in space; the outside is the set of
    such pixels connected to the image border. "Flat" is relative to the noise
    in the middle of the image. In a run of frames most of the outside must hold
    exactly one stored value through the run: air around the head is as quiet,
    but not constant. The field is the largest remaining region, holes filled.
    None when no collimation is found or the image cannot tell it from
    background: a noise-free run, background inside the field flat at the
    border's value, structure outside it, a field that is not convex or under a
    fifth of the image.
    """
    h, w = x.shape[1:]
    mean = x.mean(axis=0)
    # Spatial flatness on one frame (the mean over time is smooth everywhere).
    frame = x[x.shape[0] // 2]
    local_var = ndimage.uniform_filter(frame * frame, 3) - ndimage.uniform_filter(frame, 3) ** 2
    variation = np.sqrt(np.maximum(local_var, 0.0))
    # Flatness over time (None for fewer than 3 frames: too few to tell).
    still = x.std(axis=0) if x.shape[0] >= 3 else None
    if still is not None:
        variation = np.maximum(variation, still)
    centre = _centre((h, w))
    lo, hi = np.percentile(mean[centre], [1, 99])
    scale = max(float(hi - lo), float(np.abs(mean).max()) * 1e-3, 1e-6)
    if np.mean(variation[centre] <= 1e-6 * scale) > NOISE_FREE_FRACTION:
        return None  # noise-free (synthetic): flatness cannot tell blades from background
    noise = max(float(np.median(variation[centre])), 1e-6 * scale)
    border_value = float(np.median(_border(mean, 2)))
    at_border_value = np.abs(mean - border_value) <= 0.05 * scale
    candidate = at_border_value & (variation <= 0.25 * noise)
    # Compression ringing next to the blade edge is not quite flat: let the outside
    # take in a few more pixels at the border value that are only half as noisy.
    loose = at_border_value & (variation <= 0.5 * noise)
    labels, count = ndimage.label(candidate)
    if count == 0:
        return None
    edge = np.zeros((h, w), bool)
    edge[0], edge[-1], edge[:, 0], edge[:, -1] = True, True, True, True
    touching = np.unique(labels[edge & candidate])
    outside = np.isin(labels, touching[touching > 0])
    outside = ndimage.binary_dilation(outside, iterations=8, mask=outside | loose)
    if outside.mean() < MIN_OUTSIDE_FRACTION:
        return None
    constant = None
    if still is not None:
        constant = np.ones((h, w), bool)
        for frame in x[1:]:  # frame by frame: a (T, H, W) comparison is T bytes a pixel
            constant &= frame == x[0]
        if constant[outside].mean() < MIN_CONSTANT_OUTSIDE_FRACTION:
            return None
    inside, n_inside = ndimage.label(~outside)
    if n_inside == 0:
        return None
    sizes = np.bincount(inside.ravel())
    sizes[0] = 0
    largest = ndimage.binary_fill_holes(inside == int(sizes.argmax()))
    # Every collimator opening (rectangle, circle, iris polygon, their intersection) is
    # convex. An opening smooths the outline (a ragged edge of compression ringing)
    # without growing it; where burned-in text or a scale bar on the blanked area
    # touches the field, wider openings cut it off (rounding the field's corners).
    for radius in OPENING_RADII:
        field = _largest_piece(
            ndimage.binary_opening(largest, structure=disk(max(2, round(radius * max(h, w)))))
        )
        if field.sum() >= MIN_CONVEXITY * convex_hull_image(field).sum():
            break
    else:
        return None
    if field.mean() < MIN_FIELD_FRACTION:
        return None
    # Behind the blades there is nothing but burned-in text (which holds one value
    # through the run, unlike anything the beam reaches).
    stray = ~outside & ~field
    if still is not None:
        stray &= still > 0.1 * noise
    if stray.mean() > MAX_STRAY_FRACTION:
        return None
    flat_inside = candidate & field
    if constant is not None:
        flat_inside &= constant
    if flat_inside.sum() > MAX_FLAT_INSIDE_FRACTION * field.sum():
        return None
    return field


def _largest_piece(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected piece of ``mask`` (all of it when it has one or none)."""
    pieces, count = ndimage.label(mask)
    if count < 2:
        return mask
    return pieces == 1 + int(np.argmax(np.bincount(pieces.ravel())[1:]))


# Blade edges are looked for on a copy of the mean image this size (longest side).
EDGE_GRID = 256
# A blade edge: the step across it (in units of the image's 1-99 % range) ...
EDGE_STEP = 0.08
# ... holds with one sign along at least this share of the grid (of the arc, for a circle).
EDGE_RUN = 0.15
ARC_RUN = 0.5


def _longest_run(flags: np.ndarray) -> tuple[int, int]:
    """(length, start) of the longest run of True."""
    padded = np.concatenate([[False], flags, [False]]).astype(np.int8)
    change = np.flatnonzero(np.diff(padded))
    starts, ends = change[::2], change[1::2]
    if len(starts) == 0:
        return 0, 0
    k = int(np.argmax(ends - starts))
    return int(ends[k] - starts[k]), int(starts[k])


def _is_blade(
    z: np.ndarray, points: np.ndarray, normals: np.ndarray, beyond: np.ndarray, need: int
) -> bool:
    """Whether a candidate edge (points along it, outward unit normals) is a blade's:
    darker beyond it along a long stretch of it, and everything beyond it (the
    image region ``beyond``) uniformly on the dark side of that step."""
    h, w = z.shape
    out, inn = points + 3.0 * normals, points - 3.0 * normals

    def on_image(p: np.ndarray) -> np.ndarray:
        return (p[:, 0] >= 0) & (p[:, 0] <= h - 1) & (p[:, 1] >= 0) & (p[:, 1] <= w - 1)

    ok = on_image(out) & on_image(inn)
    if ok.sum() < need or not beyond.any():
        return False
    v_out = ndimage.map_coordinates(z, out[ok].T, order=1)
    v_in = ndimage.map_coordinates(z, inn[ok].T, order=1)
    step = v_in - v_out
    run, start = _longest_run(step > EDGE_STEP)
    if run < need:
        return False
    level_out = float(np.median(v_out[start : start + run]))
    level_in = float(np.median(v_in[start : start + run]))
    lo, hi = np.percentile(z[beyond], [15, 85])  # burned-in text is allowed beyond
    return bool(hi < 0.5 * (level_out + level_in) and hi - lo < 0.8 * (level_in - level_out))


def _edge_field(mean: np.ndarray) -> np.ndarray | None:
    """Physical collimation (not blanked: dark, noisy, scatter near the edge): the field
    bounded by straight blade edges (Hough lines) and a round one (Hough circle)
    found on the mean image, each checked by :func:`_is_blade`. None if none is."""
    h0, w0 = mean.shape
    factor = EDGE_GRID / max(h0, w0)
    h, w = max(16, int(round(h0 * factor))), max(16, int(round(w0 * factor)))
    small = resize(mean, (h, w), anti_aliasing=True)
    lo, hi = np.percentile(small, [1, 99])
    z = (small - lo) / max(float(hi - lo), 1e-6)
    edges = canny(z, sigma=1.5, low_threshold=0.05, high_threshold=0.15)
    if not edges.any():
        return None
    rows, cols = np.mgrid[:h, :w]
    centre = np.array([(h - 1) / 2.0, (w - 1) / 2.0])
    need = int(EDGE_RUN * max(h, w))
    field = np.ones((h, w), bool)
    found = False
    space, angles, dists = hough_line(
        edges, np.linspace(-np.pi / 2, np.pi / 2, 360, endpoint=False)
    )
    peaks = hough_line_peaks(
        space,
        angles,
        dists,
        num_peaks=20,
        min_distance=5,
        min_angle=5,
        threshold=0.15 * space.max(),
    )
    for _, angle, dist in zip(*peaks, strict=True):
        # The line: column cos(a) + row sin(a) = dist; its normal in (row, column).
        normal = np.array([np.sin(angle), np.cos(angle)])
        side = cols * np.cos(angle) + rows * np.sin(angle) - dist
        centre_side = float(centre[1] * np.cos(angle) + centre[0] * np.sin(angle) - dist)
        beyond = side < 0 if centre_side > 0 else side > 0
        if beyond.mean() > 0.35:
            continue
        along = np.arange(-2.0 * max(h, w), 2.0 * max(h, w))
        points = dist * normal + along[:, None] * np.array([np.cos(angle), -np.sin(angle)])
        outward = -normal if centre_side > 0 else normal
        if _is_blade(z, points, np.broadcast_to(outward, points.shape), beyond, need):
            field &= ~beyond
            found = True
    radii = np.arange(int(0.3 * min(h, w)), int(0.8 * max(h, w)), 2)
    if len(radii):
        circles = hough_circle(edges, radii)
        # Peaks under half the strongest circle are not a blade's arc; without a floor,
        # every local maximum of every radius is measured (35 s on a noisy edge map).
        for _, cx, cy, radius in zip(
            *hough_circle_peaks(
                circles, radii, total_num_peaks=5, threshold=0.5 * float(circles.max())
            ),
            strict=True,
        ):
            beyond = (rows - cy) ** 2 + (cols - cx) ** 2 > radius**2
            if beyond.mean() > 0.5:
                continue
            theta = np.linspace(0.0, 2 * np.pi, int(2 * np.pi * radius), endpoint=False)
            normals = np.stack([np.sin(theta), np.cos(theta)], axis=1)
            points = np.array([cy, cx]) + radius * normals
            shown = (points[:, 0] >= 0) & (points[:, 0] <= h - 1) & (points[:, 1] >= 0)
            shown &= points[:, 1] <= w - 1
            # Walk the arc from where it enters the image, so a run does not wrap.
            order = np.roll(np.arange(len(theta)), -int(np.argmin(shown)) if not shown.all() else 0)
            order = order[shown[order]]
            if _is_blade(
                z, points[order], normals[order], beyond, max(need, int(ARC_RUN * len(order)))
            ):
                field &= ~beyond
                found = True
                break
    if not found:
        return None
    return resize(field.astype(np.float32), (h0, w0), order=0) > 0.5


# Behind a physical blade in a subtracted run: the noise between frames (fewer
# photons) is at least this many times the noise just inside the field (a quarter
# of the photons). A blade of 1-2 mm lead passes well under 1 % of the beam; scatter
# from the field fills in some, but the noise still rises several-fold (2.7-7x on
# development runs). Less is the edge of dense anatomy (1.5x on one run without a
# shutter), not a blade.
MIN_BLADE_NOISE_RATIO = 2.0
# The noise map is smoothed over this many pixels of the edge grid (EDGE_GRID) first.
NOISE_SMOOTH_GRID_PX = 1.5
# The edges are looked for only when at least this share of the image border is
# noisier than the centre by this share of MIN_BLADE_NOISE_RATIO. A blade that leaves
# a corner of MIN_OUTSIDE_FRACTION of the image covers 5 % of the border; on
# development runs the blades raised 9-98 % of it, runs without one 0-42 %.
MIN_RAISED_BORDER_FRACTION = 0.02
BORDER_NOISE_SHARE = 0.75


def frame_noise(x: np.ndarray) -> np.ndarray:
    """(H, W): each pixel's median absolute difference between consecutive frames of a
    (T, H, W) run, its quantum noise (a bolus moves a pixel in a few frames only).
    Computed a band of rows at a time: the differences of a long run are gigabytes."""
    t, h, w = x.shape
    rows = max(1, (64 << 20) // max(1, 4 * (t - 1) * w))
    out = np.empty((h, w), np.float32)
    for r0 in range(0, h, rows):
        out[r0 : r0 + rows] = np.median(np.abs(np.diff(x[:, r0 : r0 + rows], axis=0)), axis=0)
    return out


def _noisy_blade_field(x: np.ndarray) -> np.ndarray | None:
    """Physical collimation in a subtracted run. Subtraction cancels the blade's shadow,
    but not its noise: fewer photons reach the detector behind it. The field is found
    by :func:`_edge_field` on the map of frame-to-frame noise (its logarithm, negated,
    so that the blade side is the dark one), and kept only when the noise just
    beyond its edge is :data:`MIN_BLADE_NOISE_RATIO` times that just inside."""
    noise = frame_noise(x)
    top = float(np.percentile(noise, 99))
    if top <= 0:
        return None  # noise-free: nothing to tell a blade by
    # Each pixel's median over the run is itself noisy: smoothed over about 1.5 pixels
    # of the grid the edges are looked for on (more where the image is smaller).
    sigma = NOISE_SMOOTH_GRID_PX * max(1.0, max(x.shape[1:]) / EDGE_GRID)
    log_noise = ndimage.gaussian_filter(np.log(noise + 1e-3 * top), sigma)
    # The blade's side reaches the image border. Where no stretch of the border is
    # noisier than the centre, the edge search (a second on a small run) is spared.
    centre = float(np.median(log_noise[_centre(log_noise.shape)]))
    raised = _border(log_noise) >= centre + np.log(BORDER_NOISE_SHARE * MIN_BLADE_NOISE_RATIO)
    if raised.mean() < MIN_RAISED_BORDER_FRACTION:
        return None
    field = _edge_field(-log_noise)
    if field is None:
        return None
    band = max(2, max(field.shape) // 50)
    inside = field & ~ndimage.binary_erosion(field, iterations=band)
    beyond = ~field & ndimage.binary_dilation(field, iterations=band)
    if not inside.any() or not beyond.any():
        return None
    ratio = float(np.median(noise[beyond])) / max(float(np.median(noise[inside])), 1e-12)
    return field if ratio >= MIN_BLADE_NOISE_RATIO else None


def detect(frames: np.ndarray, subtracted: bool = False) -> np.ndarray | None:
    """The exposed field (H, W) found from the pixels of a (T, H, W) run, or None.

    Two looks, intersected when both find something: blanked collimation
    (:func:`_flat_field`: flat at the border's value) and physical collimation:
    in unsubtracted runs :func:`_edge_field` (straight or round blade edges with
    nothing but the blade's dark shadow beyond them); in subtracted runs, which
    cancel that shadow, :func:`_noisy_blade_field` (the same edges on the map of
    frame-to-frame noise, which rises behind a blade). None when the run shows
    no collimation, or the field found is under a fifth of the image.
    """
    x = np.asarray(frames, np.float32)
    if x.ndim == 2:
        x = x[None]
    looks = [_flat_field(x)]
    if not subtracted:
        looks.append(_edge_field(x.mean(axis=0)))
    elif x.shape[0] >= 3:
        looks.append(_noisy_blade_field(x))
    found = [f for f in looks if f is not None]
    if not found:
        return None
    field = np.logical_and.reduce(found)
    return field if field.mean() >= MIN_FIELD_FRACTION else None


def disk(radius: int) -> np.ndarray:
    """A filled disk of ``radius`` pixels, ``2 * radius + 1`` across."""
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return yy * yy + xx * xx <= radius * radius


def margin_px(shape: tuple[int, int]) -> int:
    """Pixels taken off the field's edge: the blades' penumbra, compression ringing and
    the edge pixels that the flatness test leaves inside (its 3 x 3 window)."""
    return max(4, int(round(max(shape) / 100)))


def exposed_field(frames: np.ndarray, meta: RunMeta) -> Field:
    """The field of a (T, H, W) run: the DICOM shutter and the image's, intersected."""
    shape = (int(frames.shape[-2]), int(frames.shape[-1]))
    sources = []
    mask = np.ones(shape, bool)
    if meta.shutter is not None:
        dicom = shutter_mask(meta.shutter, shape)
        if dicom.mean() >= MIN_FIELD_FRACTION:
            mask &= dicom
            sources.append("dicom")
    found = detect(frames, meta.subtracted)
    if found is not None and (mask & found).mean() >= MIN_FIELD_FRACTION:
        mask &= found
        sources.append("image")
    if not sources:
        return Field(mask=mask, source="none")
    # The image border is an edge for every filter too, so the margin runs along it as well.
    mask = ndimage.binary_erosion(mask, structure=disk(margin_px(shape)), border_value=0)
    return Field(mask=mask, source="+".join(sources))


def fill_outside(frames: np.ndarray, field: Field, sigma_px: float | None = None) -> np.ndarray:
    """(T, H, W) frames with the outside of the field replaced by a smooth extension
    of the inside (normalised convolution), so no filter sees the blade edge.

    Far from the field the extension fades to each frame's median inside it.
    Returns the input unchanged when the run is not collimated.
    """
    if not field.collimated:
        return frames
    x = np.asarray(frames, np.float32)
    h, w = x.shape[-2:]
    sigma = float(sigma_px or max(4.0, max(h, w) / 64))
    weight = field.mask.astype(np.float32)
    step = max(1, int(np.sqrt(field.mask.sum() / 20000)))
    inside = x[:, field.mask][:, ::step]
    median = np.median(inside, axis=1).astype(np.float32)[:, None, None]
    eps = np.float32(0.02)
    num = ndimage.gaussian_filter(x * weight, (0, sigma, sigma)) + eps * median
    den = ndimage.gaussian_filter(weight, sigma)[None] + eps
    return np.where(field.mask[None], x, num / den).astype(np.float32)


def restrict(masks: np.ndarray, field: Field) -> np.ndarray:
    """Masks (..., H, W) with everything outside the field cleared."""
    if not field.collimated:
        return masks
    return masks & field.mask
