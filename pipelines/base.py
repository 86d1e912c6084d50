"""The pipeline contract: arrays and a small metadata object in, typed outputs out.

Pipelines never touch sockets, the spool, the database or DICOM files. The node
(``dicom_node.runs``) decodes a run into a :class:`Run`; a pipeline returns a
:class:`PipelineResult` whose outputs ``dicom_node.encode`` turns into DICOM
objects (Secondary Capture, SEG, Parametric Map, SR, derived volumes).

Geometry of the outputs:

- ``"canvas"``: one 2D plane aligned with the run's pixel grid. The node
  delivers a MinIP Secondary Capture canvas (with its own Frame of Reference)
  alongside, and SEG / Parametric Map objects reference that canvas, because
  legacy XA has no Frame of Reference and highdicom cannot use it as a source.
- ``"frames"``: one plane per frame of the run (T, H, W).
- ``"volume"``: (Z, Y, X) on the source volume's own grid.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from pipelines.quality import Quality

Geometry = Literal["canvas", "frames", "volume"]


class PipelineError(Exception):
    """A run that a pipeline cannot process, with a reason a person can act on."""


@dataclass(frozen=True)
class Code:
    """A coded concept, kept free of highdicom so pipelines stay pure."""

    value: str
    scheme: str
    meaning: str


# Codes used by several pipelines (SNOMED CT unless noted).
ARTERY = Code("51114001", "SCT", "Artery")
VEIN = Code("29092000", "SCT", "Vein")
ICA = Code("86117002", "SCT", "Internal carotid artery")
BLOOD_VESSEL = Code("59820001", "SCT", "Blood vessel")
BONE = Code("272673000", "SCT", "Bone")
SOFT_TISSUE = Code("87784001", "SCT", "Soft tissue")
ANATOMICAL_STRUCTURE = Code("91723000", "SCT", "Anatomical structure")
TISSUE = Code("85756007", "SCT", "Tissue")


@dataclass(frozen=True)
class Shutter:
    """The display shutter of a 2D run (DICOM Shutter module), in 0-based pixel coordinates.

    The exposed field is the intersection of the shapes present: what lies
    outside it was behind the collimator blades and shows no patient.
    """

    # (top row, bottom row, left column, right column), inclusive.
    rectangle: tuple[float, float, float, float] | None = None
    # (centre row, centre column, radius), pixels.
    circle: tuple[float, float, float] | None = None
    # (row, column) vertices of a polygon.
    polygon: tuple[tuple[float, float], ...] = ()

    @property
    def shapes(self) -> tuple[str, ...]:
        names = (("RECTANGULAR", self.rectangle), ("CIRCULAR", self.circle))
        found = tuple(n for n, v in names if v is not None)
        return found + (("POLYGONAL",) if self.polygon else ())


@dataclass(frozen=True)
class RunMeta:
    """What a pipeline may know about a run, decoded from its headers."""

    modality: str
    sop_class_uid: str
    rows: int
    columns: int
    number_of_frames: int
    # Acquisition time of every frame in seconds, relative to the first frame;
    # None when the run carries no timing (never guessed).
    frame_times_s: np.ndarray | None = None
    # (row, column) spacing in mm at the detector or in the volume plane.
    pixel_spacing_mm: tuple[float, float] | None = None
    slice_spacing_mm: float | None = None
    image_type: tuple[str, ...] = ()
    body_part: str = ""
    series_description: str = ""
    # True when the pixels are a subtraction (vessels dark on a flat field).
    subtracted: bool = False
    # True when the run is a volume (Z, Y, X) rather than 2D+t (T, H, W).
    is_volume: bool = False
    # Cine rate in frames/s when known.
    frame_rate: float | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    # The DICOM Shutter module of a 2D run, when it has one.
    shutter: Shutter | None = None


@dataclass(frozen=True)
class Run:
    """A decoded run. ``pixels`` is float32: (T, H, W) for 2D+t, (Z, Y, X) for volumes.

    For volumes the values are rescaled (Hounsfield-like for CT).
    For 2D runs the values are the stored values after the Modality LUT;
    native runs with a Mask Subtraction Sequence are already log-subtracted.
    """

    pixels: np.ndarray
    meta: RunMeta


# Frames narrower than this (pixels) hold no angiogram that a vessel filter could
# read: its scales reach 4 px at 256 px and more on larger frames.
MIN_FRAME_SIDE = 32


def require_2d_run(run: Run, name: str, min_frames: int, min_side: int = MIN_FRAME_SIDE) -> None:
    """Refuse, with the reason, a run that is not 2D+t, has fewer than ``min_frames``
    frames or frames smaller than ``min_side`` pixels."""
    shape = run.pixels.shape
    if run.meta.is_volume or run.pixels.ndim != 3:
        volume = " (a volume)" if run.meta.is_volume else ""
        raise PipelineError(f"{name} needs a 2D+t run, got shape {shape}{volume}")
    if shape[0] < min_frames:
        raise PipelineError(f"{name} needs at least {min_frames} frames, the run has {shape[0]}")
    if min(shape[1:]) < min_side:
        raise PipelineError(
            f"{name}: frames of {shape[1]} x {shape[2]} pixels are too small "
            f"(at least {min_side} on each side)"
        )


@dataclass(frozen=True)
class AlgorithmInfo:
    """Recorded in every result object (SEG Algorithm Identification, series text)."""

    name: str
    version: str
    family: Literal["classical", "model"]
    model_package: str | None = None
    model_version: str | None = None

    def describe(self) -> str:
        if self.family == "model":
            return f"{self.name} {self.version} (model {self.model_package} {self.model_version})"
        return f"{self.name} {self.version} (classical)"


@dataclass(frozen=True)
class Segment:
    label: str
    code: Code
    category: Code = ANATOMICAL_STRUCTURE
    color_rgb: tuple[int, int, int] = (255, 255, 0)


@dataclass(frozen=True)
class ImageOutput:
    """A grayscale derived image (a MinIP, a derived volume), float pixels."""

    key: str
    pixels: np.ndarray
    description: str
    geometry: Geometry = "canvas"
    # When set, the value to use as 'air' / background in derived volumes.
    derivation: str = ""


@dataclass(frozen=True)
class SegmentationOutput:
    """Binary masks, shape (S, H, W) for canvas, (S, T, H, W) for frames, (S, Z, Y, X) for volume."""

    key: str
    masks: np.ndarray
    segments: Sequence[Segment]
    algorithm: AlgorithmInfo
    geometry: Geometry = "canvas"
    description: str = ""


@dataclass(frozen=True)
class ParametricMapOutput:
    """A float map on the canvas. ``label`` is the Real World Value Mapping LUT Label."""

    key: str
    values: np.ndarray
    label: str
    quantity: Code
    unit: Code
    algorithm: AlgorithmInfo
    description: str = ""
    # NaN-free mask of where the values are meaningful (the rest is 0).
    valid: np.ndarray | None = None


@dataclass(frozen=True)
class RenderingOutput:
    """An RGB uint8 rendering (H, W, 3) or cine (T, H, W, 3) for any viewer."""

    key: str
    rgb: np.ndarray
    description: str
    burned_in_text: bool = True


@dataclass(frozen=True)
class Measurement:
    name: Code
    value: float
    unit: Code


@dataclass(frozen=True)
class MeasurementsOutput:
    """Measurements for a TID 1500 structured report."""

    key: str
    title: str
    measurements: Sequence[Measurement]
    algorithm: AlgorithmInfo
    finding_site: Code | None = None
    # (H, W) bool on the canvas: where the measurements were made (the report's image
    # region, which viewers draw with the values); None: the whole canvas.
    region: np.ndarray | None = None
    # Measures of the run's quality (AIF SNR, coverage, ...), reported as their own
    # measurement group "Run quality" over the whole canvas. A pipeline that judges
    # its result sets ``PipelineResult.quality`` instead (or as well): its measures,
    # verdict and reasons join this group.
    quality: Sequence[Measurement] = ()


Output = (
    ImageOutput | SegmentationOutput | ParametricMapOutput | RenderingOutput | MeasurementsOutput
)


@dataclass
class PipelineResult:
    """What a pipeline returns. ``quality`` (see ``pipelines.quality``): the measures a
    reader needs to judge the outputs, the verdict (ok, low confidence, failed) and
    its reasons; the node writes them into an SR, onto every rendering and into the
    job record, and falls back to the classical path when a model's output fails."""

    outputs: list[Output] = field(default_factory=list)
    # Human-readable notes (flags, quality warnings) kept in the job record.
    notes: list[str] = field(default_factory=list)
    quality: Quality | None = None


@dataclass(frozen=True)
class PipelineContext:
    """What the node gives a pipeline besides the run."""

    device: str = "cpu"
    # Model package folder chosen by the node's settings, if any.
    model_package: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)


@runtime_checkable
class Pipeline(Protocol):
    name: str

    def __call__(self, run: Run, ctx: PipelineContext) -> PipelineResult: ...


_REGISTRY: dict[str, Callable[[], Pipeline]] = {}

# The built-in pipelines and the module that registers each. A module is imported
# when its pipeline is first asked for, so that a process which only names them (the
# node's router and settings check, the CLI) starts without torch and the
# scientific stack; the node's worker processes import them all once, up front
# (``dicom_node.sandbox``).
BUILTIN: dict[str, str] = {
    "minip": "pipelines.minip",
    "dsa_av": "pipelines.dsa_av",
    "dsa_ia": "pipelines.dsa_ia",
    "dsa_perfusion": "pipelines.perfusion",
    "xa_coronary": "pipelines.coronary",
    "rotational_dla": "pipelines.rotational",
}


def register(name: str) -> Callable[[Callable[[], Pipeline]], Callable[[], Pipeline]]:
    """Register a pipeline factory under ``name`` (explicit, never name scanning)."""

    def deco(factory: Callable[[], Pipeline]) -> Callable[[], Pipeline]:
        if name in _REGISTRY:
            raise ValueError(f"pipeline {name!r} registered twice")
        _REGISTRY[name] = factory
        return factory

    return deco


def get(name: str) -> Pipeline:
    if name not in _REGISTRY and name in BUILTIN:
        importlib.import_module(BUILTIN[name])
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise PipelineError(
            f"unknown pipeline {name!r}; registered: {', '.join(names())}"
        ) from None


def names() -> list[str]:
    """The built-in pipelines and any other registered ones, without importing them."""
    return sorted(set(_REGISTRY) | set(BUILTIN))


def minip(frames: np.ndarray) -> np.ndarray:
    """Minimum-intensity projection over time (vessels are dark in subtracted DSA)."""
    if frames.ndim != 3:
        raise PipelineError(f"expected (T, H, W) frames, got shape {frames.shape}")
    return frames.min(axis=0)
