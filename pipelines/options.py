"""The options each built-in pipeline takes (``PipelineContext.options``; the node's
``[workers] pipeline_options``), declared once and checked alike where they are read:

- by the node when it loads its settings (``dicom_node.settings``), so that a
  mistyped name or a value a pipeline cannot use stops the start with the setting's
  name, not every job of that pipeline at run time;
- by the pipeline on every call (``checked``), for callers that are not the node
  (``dicom-node process``, the benchmarks, training).

Before (2026-12-07) only ``dsa_perfusion`` checked its options, per job: an
``xa_coronary`` ``min_component_px = "many"`` failed every job as an "internal error
... (the input may be malformed)", ``treshold`` for ``threshold`` or any option of a
pipeline that takes none was ignored without a word, and a ``rotational_dla``
``classical`` override of a name the path does not have was ignored too.

Light on purpose: no torch and no numpy, so that the node's process checks the
options without loading a pipeline (``tests/test_structure.py``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipelines.base import PipelineError

Parse = Callable[[str, Any], Any]


@dataclass(frozen=True)
class Option:
    help: str
    parse: Parse  # (the option's name, its value) -> the value to use; PipelineError if unusable


def _is_number(value: Any) -> bool:
    """A finite int or float. TOML's true is a bool, which Python counts as the integer
    1: not a number here; nor is an integer past a float's range (TOML reads any)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _is_list(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def number(
    low: float | None = None,
    high: float | None = None,
    *,
    above: bool = False,
    below: bool = False,
    integer: bool = False,
) -> Parse:
    """A finite number (a whole number when ``integer``) from ``low`` (excluded when
    ``above``) to ``high`` (excluded when ``below``)."""

    def parse(name: str, value: Any) -> float | int:
        whole = _is_number(value) and (isinstance(value, int) or float(value).is_integer())
        if not _is_number(value) or (integer and not whole):
            raise PipelineError(
                f"{name} must be a {'whole ' if integer else ''}number, not {value!r}"
            )
        if (low is not None and (value <= low if above else value < low)) or (
            high is not None and (value >= high if below else value > high)
        ):
            lower = "" if low is None else f"{'above' if above else 'at least'} {low:g}"
            upper = "" if high is None else f"{'below' if below else 'at most'} {high:g}"
            raise PipelineError(
                f"{name} must be {' and '.join(filter(None, (lower, upper)))}, not {value!r}"
            )
        return int(value) if integer else float(value)

    return parse


def one_of(*allowed: str) -> Parse:
    def parse(name: str, value: Any) -> str:
        if value not in allowed:
            raise PipelineError(f"{name}={value!r}: allowed {', '.join(allowed)}")
        return str(value)

    return parse


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise PipelineError(f"{name}={value!r}: allowed true or false")
    return value


def checked(pipeline: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``options`` of the built-in ``pipeline`` with every value parsed (numbers as
    float or int); ``PipelineError`` naming the option and what it allows when a
    name is not one of the pipeline's or a value is unusable. A pipeline not declared
    here (one registered by a site) gets its options as they are: it checks them."""
    declared = DECLARED.get(pipeline)
    given = dict(options or {})
    if declared is None:
        return given
    unknown = sorted(set(given) - set(declared))
    if unknown:
        allowed = f"allowed: {', '.join(sorted(declared))}" if declared else "it takes none"
        raise PipelineError(f"unknown {pipeline} option(s) {', '.join(unknown)}; {allowed}")
    return {key: declared[key].parse(key, value) for key, value in given.items()}


# --- dsa_perfusion ------------------------------------------------------------

# Deconvolution methods and Tmax estimators (pipelines.perfusion.deconvolution).
DECONVOLUTION_METHODS = ("auto", "ssvd", "csvd", "osvd", "tikhonov")
TMAX_ESTIMATORS = ("onset", "argmax")


@dataclass(frozen=True)
class SiteRuleSpec:
    """A site's ICA location for one protocol (``pipelines.perfusion.localise.SiteRule``):
    ``roi`` (top, left, bottom, right) or ``seed`` (row, column), in fractions of the
    image height and width."""

    protocol: str  # regular expression searched in the Series Description
    roi: tuple[float, float, float, float] | None = None
    seed: tuple[float, float] | None = None
    seed_radius: float = 0.06  # fraction of the shorter image side


def _fractions(value: Any, count: int, key: str) -> tuple[float, ...]:
    if not _is_list(value) or not all(_is_number(v) for v in value):
        raise PipelineError(f"{key} must be {count} numbers, got {value!r}")
    numbers = tuple(float(v) for v in value)
    if len(numbers) != count or not all(0.0 <= v <= 1.0 for v in numbers):
        raise PipelineError(f"{key} must be {count} fractions of the image (0 to 1), got {value!r}")
    return numbers


def site_rules(name: str, value: Any) -> tuple[SiteRuleSpec, ...]:
    """The ``ica_site_rules`` option: a list of tables ``{protocol = "regex", roi =
    [top, left, bottom, right]}`` or ``{protocol = "regex", seed = [row, col]}``."""
    if value is None:
        return ()
    if not _is_list(value):
        raise PipelineError(f"option {name} must be a list of tables")
    rules = []
    for i, item in enumerate(value):
        key = f"{name}[{i}]"
        if not isinstance(item, Mapping):
            raise PipelineError(f"{key} must be a table with protocol and roi or seed")
        unknown = sorted(set(item) - {"protocol", "roi", "seed", "seed_radius"})
        if unknown:
            raise PipelineError(
                f"{key}: unknown key(s) {', '.join(unknown)}; allowed: protocol, roi, seed, "
                "seed_radius"
            )
        protocol = str(item.get("protocol", ".*"))
        try:
            re.compile(protocol)
        except re.error as exc:
            raise PipelineError(f"{key}.protocol {protocol!r} is not a regex: {exc}") from None
        if ("roi" in item) == ("seed" in item):
            raise PipelineError(f"{key} needs exactly one of roi or seed")
        roi = seed = None
        if "roi" in item:
            top, left, bottom, right = _fractions(item["roi"], 4, f"{key}.roi")
            if bottom <= top or right <= left:
                raise PipelineError(f"{key}.roi must be [top, left, bottom, right], top < bottom")
            roi = (top, left, bottom, right)
        else:
            row, col = _fractions(item["seed"], 2, f"{key}.seed")
            seed = (row, col)
        radius = _fractions([item.get("seed_radius", 0.06)], 1, f"{key}.seed_radius")[0]
        rules.append(SiteRuleSpec(protocol, roi, seed, radius))
    return tuple(rules)


PERFUSION: dict[str, Option] = {
    "method": Option(
        f"deconvolution: one of {', '.join(DECONVOLUTION_METHODS)} (default auto: osvd at "
        "steps up to 0.5 s, csvd on coarser grids)",
        one_of(*DECONVOLUTION_METHODS),
    ),
    "svd_threshold": Option(
        "fixed SVD threshold for ssvd / csvd, fraction of the largest singular value "
        "(default 0.2 / 0.1)",
        number(0, 1, above=True, below=True),
    ),
    "oscillation_budget": Option(
        "oSVD bound on the residue's oscillation index times its length (default 4; larger "
        "regularises less)",
        number(0, above=True),
    ),
    "tmax": Option(
        "Tmax estimator: onset (time the residue first reaches its peak, default) or argmax",
        one_of(*TMAX_ESTIMATORS),
    ),
    "ica": Option(
        "which ICA rule comes first: auto (the package when one is configured, else the "
        "border rule), classical (border rule, never the package), model or site; the other "
        "rules follow as fallbacks (see pipelines.perfusion.localise)",
        one_of("auto", "classical", "model", "site"),
    ),
    "ica_site_rules": Option(
        "site rules per protocol: a list of tables {protocol = regex on the Series "
        "Description, roi = [top, left, bottom, right] or seed = [row, column], fractions of "
        "the image}",
        site_rules,
    ),
    "keep_largest_ica": Option(
        "keep only the largest connected part of the ICA mask (default true)", boolean
    ),
    "sigma_mm": Option(
        "spatial smoothing before deconvolution, Gaussian sigma in mm (default 1.0)",
        number(0, 20),
    ),
    "vessel_fraction": Option(
        "large-vessel exclusion, fraction of the densest vessels' opacity (default 0.6)",
        number(0, 1, above=True),
    ),
    "vessel_contrast": Option(
        "large-vessel exclusion by contrast to the surrounding blush, fraction of the AIF "
        "peak (default 0.05; 0 = off)",
        number(0, 1),
    ),
    "vessel_width_mm": Option(
        "widest vessel, mm (default 10): the level and contrast rules remove no wider "
        "region; a wider ICA trunk is blush (the border rule passes over it, the earliest "
        "rule tries it last)",
        number(0, 100, above=True),
    ),
    "min_aif_snr": Option(
        "refuse an AIF whose peak is below this many noise SDs (default 10)", number(0)
    ),
    "drift_correction": Option(
        "take the artefact of head drift after the mask out of a subtracted run (default "
        "false; see pipelines.perfusion.drift for what it costs on the unseen family)",
        boolean,
    ),
}

# --- rotational_dla -------------------------------------------------------------

# The classical path's constants (pipelines.rotational.classical_tissues), which the
# ``classical`` option may override one by one (training's tuning does).
# Every constant is in units the volume supplies: soft-tissue noise SDs, mm, or
# fractions of the measured lumen contrast. Chosen on training phantom seeds
# 2000-2001 at 300, 800 and 3000 HU (never on held-out seeds or family B).
ROTATIONAL_CLASSICAL: dict[str, Any] = {
    # Dense voxels: above soft tissue by k_low noise SDs, in components that
    # reach k_high somewhere (hysteresis).
    "k_low": 3.5,
    "k_high": 7.0,
    # The shape analysis sees intensities clipped at k_sat noise SDs above soft
    # tissue, so a tube looks the same at 300 HU as at 3000 HU.
    "k_sat": 8.0,
    # Bone seeds: dense structures thicker than this radius (larger than the
    # largest artery, the ICA, with its blur).
    "thick_mm": 3.0,
    # Porous bone (the cancellous or pneumatised skull base: septa thinner than a
    # vessel around marrow or air cells) is thick once cells up to 2 * pore_mm
    # across are closed; where more than pore_fraction of the pore_window_mm
    # neighbourhood is such a cell, its dense voxels are bone seeds too. Chosen
    # on family A development seeds 962000-962003 with a porous skull base.
    "pore_mm": 2.5,
    "pore_fraction": 0.15,
    "pore_window_mm": 4.0,
    # ... except where the dense voxels are solid wider than 2 * solid_mm (a
    # vessel, a thick septum): those stay for the seeds and the watershed.
    "solid_mm": 1.5,
    # Vessel seeds: tubeness above v_seed, at least seed_gap_mm from thick bone.
    "v_seed": 0.5,
    "seed_gap_mm": 1.5,
    # A vessel piece (seeded, or dense and reached by no seed) is vessel when
    # tubular on average; else bone.
    "v_unassigned": 0.2,
    # Tube scales (Gaussian sigma, mm): the smallest visible branch to the ICA.
    "scales_mm": (0.45, 0.8, 1.4),
    # Partial volume: a vessel voxel is at least this fraction of the vessel's
    # local peak above soft tissue (the local peak within local_mm) ...
    "fwhm": 0.4,
    "local_mm": 1.5,
    # ... and of the run's lumen contrast (the 95th percentile of the vessel
    # seeds): less than that is a sub-voxel vessel or blur.
    "lumen_fraction": 0.2,
    "min_vessel_mm3": 5.0,
    # Gradient smoothing for the watershed between vessel and bone.
    "grad_mm": 0.5,
}
# At most this many tube scales (the defaults have three; each costs a Hessian of
# the volume).
MAX_SCALES = 8
_non_negative = number(0)


def _scales(name: str, value: Any) -> tuple[float, ...]:
    if not _is_list(value):
        raise PipelineError(f"{name} must be a list of numbers, not {value!r}")
    if not 1 <= len(value) <= MAX_SCALES:
        raise PipelineError(f"{name} must have 1 to {MAX_SCALES} scales, not {len(value)}")
    return tuple(float(number(0, above=True)(f"{name}[{i}]", v)) for i, v in enumerate(value))


def rotational_classical(name: str, value: Any) -> dict[str, Any]:
    """The ``classical`` option: a table overriding some of ``ROTATIONAL_CLASSICAL``;
    each a number of at least 0, ``scales_mm`` a list of positive numbers."""
    if not isinstance(value, Mapping):
        raise PipelineError(f"option {name} must be a table of the classical path's constants")
    unknown = sorted(set(value) - set(ROTATIONAL_CLASSICAL))
    if unknown:
        raise PipelineError(
            f"{name}: unknown constant(s) {', '.join(unknown)}; allowed: "
            + ", ".join(sorted(ROTATIONAL_CLASSICAL))
        )
    return {
        key: (_scales if key == "scales_mm" else _non_negative)(f"{name}.{key}", v)
        for key, v in value.items()
    }


ROTATIONAL: dict[str, Option] = {
    "classical": Option(
        "the classical path's constants to override, a table (see "
        "pipelines.options.ROTATIONAL_CLASSICAL)",
        rotational_classical,
    ),
    "slab": Option(
        "slices per batch of the DLA package's dense inference (default 4)",
        number(1, 512, integer=True),
    ),
}

# --- xa_coronary ----------------------------------------------------------------

CORONARY: dict[str, Option] = {
    "threshold": Option(
        "vessel probability threshold of the CE-Net package (default: the package's, else 0.5)",
        number(0, 1, above=True, below=True),
    ),
    "min_component_px": Option(
        "smallest vessel piece kept, pixels (default scaled with the image size)",
        number(0, 10**7, integer=True),
    ),
}

DECLARED: dict[str, dict[str, Option]] = {
    "minip": {},
    "dsa_av": {},
    "dsa_ia": {},
    "dsa_perfusion": PERFUSION,
    "xa_coronary": CORONARY,
    "rotational_dla": ROTATIONAL,
}
