"""``minip``: the minimum-intensity projection of a DSA run over time.

It is what radiologists read for vessel anatomy, and the canvas that SEG and
Parametric Map results reference.
"""

from __future__ import annotations

from pipelines.base import (
    ImageOutput,
    PipelineContext,
    PipelineError,
    PipelineResult,
    Run,
    minip,
    register,
)
from pipelines.options import checked


class MinIP:
    name = "minip"

    def __call__(self, run: Run, ctx: PipelineContext) -> PipelineResult:
        checked(self.name, ctx.options)  # it takes none: one given is refused
        if run.meta.is_volume:
            raise PipelineError("minip needs a 2D+t run, got a volume")
        image = minip(run.pixels)
        notes = []
        if run.meta.frame_times_s is not None and len(run.meta.frame_times_s) > 1:
            span = float(run.meta.frame_times_s[-1] - run.meta.frame_times_s[0])
            notes.append(f"{run.meta.number_of_frames} frames over {span:.2f} s")
        return PipelineResult(
            outputs=[
                ImageOutput(key="minip", pixels=image, description="MinIP", geometry="canvas")
            ],
            notes=notes,
        )


@register("minip")
def _factory() -> MinIP:
    return MinIP()
