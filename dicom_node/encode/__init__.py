"""Result encoding: pipeline outputs in, valid DICOM objects out.

Each output type has one encoder, registered here explicitly. 2D runs whose
outputs live on the ``canvas`` geometry get the MinIP canvas (see
``dicom_node.encode.canvas``) first; SEG and Parametric Map encoders reference it.

A result's quality (``PipelineResult.quality``) reaches every object but the
canvas (which every pipeline shares): the SR's "Run quality" group (a quality-only
SR when the pipeline writes no report), a band under every rendering, and Image
Comments of the image objects.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

from pydicom.dataset import Dataset

from dicom_node.encode.canvas import make_canvas
from dicom_node.encode.common import EncodeContext, copy_character_set, mark_quality
from dicom_node.encode.rendering import encode_rendering
from pipelines.base import (
    AlgorithmInfo,
    ImageOutput,
    MeasurementsOutput,
    Output,
    PipelineResult,
    RenderingOutput,
    Run,
    minip,
)
from pipelines.quality import FALLBACK_SUFFIX

Encoder = Callable[[Output, EncodeContext, Run], list[Dataset]]
_ENCODERS: dict[type, Encoder] = {}


def encoder(output_type: type) -> Callable[[Encoder], Encoder]:
    def deco(fn: Encoder) -> Encoder:
        if output_type in _ENCODERS:
            raise ValueError(f"encoder for {output_type.__name__} registered twice")
        _ENCODERS[output_type] = fn
        return fn

    return deco


def _frame_time_ms(run: Run) -> float | None:
    times = run.meta.frame_times_s
    if times is None or len(times) < 2:
        return None
    return float((times[-1] - times[0]) / (len(times) - 1) * 1000.0)


def _needs_canvas(result: PipelineResult) -> bool:
    return any(getattr(o, "geometry", None) == "canvas" for o in result.outputs)


def _algorithms(result: PipelineResult) -> tuple[AlgorithmInfo, ...]:
    found: list[AlgorithmInfo] = []
    for out in result.outputs:
        info = getattr(out, "algorithm", None)
        if isinstance(info, AlgorithmInfo) and info not in found:
            found.append(info)
    return tuple(found)


QUALITY_KEY = "quality"


def _outputs(result: PipelineResult) -> list[Output]:
    """The result's outputs, plus a quality-only report when it has a quality
    assessment and no report of its own to carry it."""
    outputs = list(result.outputs)
    algorithms = _algorithms(result)
    if (
        result.quality is not None
        and algorithms
        and not any(isinstance(o, MeasurementsOutput) for o in outputs)
    ):
        outputs.append(
            MeasurementsOutput(
                key=QUALITY_KEY,
                title="Result quality" + (FALLBACK_SUFFIX if result.quality.fallback else ""),
                measurements=(),
                algorithm=algorithms[0],
            )
        )
    return outputs


def encode_result(result: PipelineResult, run: Run, ctx: EncodeContext) -> list[Dataset]:
    """All DICOM objects for one pipeline result, canvas first. The result's
    algorithms join the provenance its UIDs derive from."""
    with warnings.catch_warnings():
        # The source's Patient's Name is copied as it is (common.copy_identity):
        # highdicom's doubt about a name of one component ('ANONYMOUS', as most
        # de-identified runs have) would put a warning of two lines in the node's log
        # for each such name a worker process meets, about nothing an operator can
        # change.
        warnings.filterwarnings("ignore", _PERSON_NAME_DOUBT, UserWarning, "highdicom")
        return _encode_result(result, run, ctx)


_PERSON_NAME_DOUBT = r"The string .* is unlikely to represent the intended person name"


def _encode_result(result: PipelineResult, run: Run, ctx: EncodeContext) -> list[Dataset]:
    ctx.algorithms = _algorithms(result)
    ctx.quality = result.quality
    datasets: list[Dataset] = []
    if not run.meta.is_volume and _needs_canvas(result):
        canvas_image = next(
            (o.pixels for o in result.outputs if isinstance(o, ImageOutput) and o.key == "minip"),
            None,
        )
        ctx.canvas = make_canvas(
            ctx, canvas_image if canvas_image is not None else minip(run.pixels)
        )
        datasets.append(ctx.canvas)
    for out in _outputs(result):
        if isinstance(out, ImageOutput) and out.key == "minip":
            continue  # it is the canvas
        try:
            fn = _ENCODERS[type(out)]
        except KeyError:
            raise TypeError(f"no encoder registered for {type(out).__name__}") from None
        made = fn(out, ctx, run)
        if not isinstance(out, (MeasurementsOutput, RenderingOutput)):
            for ds in made:  # the SR has it in its content, renderings mark it themselves
                mark_quality(ds, result.quality)
        datasets.extend(made)
    for ds in datasets:
        copy_character_set(ds, ctx.first)
    return datasets


@encoder(RenderingOutput)
def _rendering(out: Output, ctx: EncodeContext, run: Run) -> list[Dataset]:
    assert isinstance(out, RenderingOutput)
    return encode_rendering(out, ctx, _frame_time_ms(run))


# Encoders living in their own modules register themselves on import.
# (Add one line per module: SEG, Parametric Map, SR, derived volumes.)
from dicom_node.encode import pmap as _pmap  # noqa: E402,F401  (ParametricMapOutput -> Parametric Map)
from dicom_node.encode import seg as _seg  # noqa: E402,F401  (SegmentationOutput -> DICOM SEG)
from dicom_node.encode import sr as _sr  # noqa: E402,F401  (MeasurementsOutput -> TID 1500 SR)
from dicom_node.encode import volume as _volume  # noqa: E402,F401  (ImageOutput volume -> CT series)
