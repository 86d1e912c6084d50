"""``dsa_ia``: intracranial artery segmentation of a cerebral 2D+t DSA run (VSS-Net).

With a model package, VSS-Net sees every frame of the run (no resampling, no
fixed subset) and outputs the arteries. Without one, the classical vessel path
runs and its result is labelled classical: all vessels (Blood vessel) and the
arteries it separates by timing. Neither path reports anything outside the
collimated field (``pipelines.shutter``).
"""

from __future__ import annotations

import numpy as np

from pipelines.base import (
    ARTERY,
    BLOOD_VESSEL,
    AlgorithmInfo,
    ImageOutput,
    PipelineContext,
    PipelineError,
    PipelineResult,
    RenderingOutput,
    Run,
    Segment,
    SegmentationOutput,
    minip,
    register,
    require_2d_run,
)
from pipelines.dsa_av import label_lines
from pipelines.models.package import load_package
from pipelines.options import checked
from pipelines.preprocess import inference_device, predict_sequence
from pipelines.render import burn_text, overlay, to_grey_rgb
from pipelines.shutter import exposed_field, restrict
from pipelines.vessel_quality import dsa_quality
from pipelines.vessels import analyse, motion_note

NAME = "dsa_ia"
# 0.3.0: static content removed, lower vesselness thresholds, shutter past text.
# 0.3.1: a blanked field is one stored value through the run (air is not); a
# physical blade in a subtracted run found by the noise behind it.
# 0.3.2: the background of each frame from its stillest pixels, not its median
# (a late blush over most of the head moved the median).
# 0.3.3: the timing clusters from curves ten noise SDs high (faint pixels had
# taken the early cluster).
# 0.4.0: bone edges of a head that drifted after the mask are not vessels.
# 0.4.1: the artery and vein timing overlap is measured; above 20 % the verdict is low
# confidence (labels unchanged).
# 0.5.0: a wide vessel's mask reaches its lumen's edge (a pixel more on each side).
# 0.6.0: each vessel pixel's own (unsmoothed) curve is unmixed into artery and vein.
# 0.7.0: a vessel pixel stands out from its surroundings in some frame (a dense blush,
# which the MinIP holds at every pixel, is not vessel).
VERSION = "0.7.0"
# 0.2.0: the collimator shutter found and ignored; quality measures and verdict
RED, YELLOW = (255, 0, 0), (255, 220, 0)
ARTERY_SEGMENT = Segment("Artery", ARTERY, color_rgb=RED)
VESSEL_SEGMENT = Segment("Blood vessel", BLOOD_VESSEL, color_rgb=YELLOW)


def vessel_rendering(
    base: np.ndarray, vessel: np.ndarray | None, artery: np.ndarray, algorithm: AlgorithmInfo
) -> RenderingOutput:
    """Arteries red (other vessels yellow) over the MinIP, with the AI label."""
    layers, colours, legend = [], [], "red: artery"
    if vessel is not None:
        layers.append(vessel & ~artery)
        colours.append(YELLOW)
        legend += "  yellow: other vessel"
    layers.append(artery)
    colours.append(RED)
    rgb = overlay(to_grey_rgb(base), layers, colours)
    rgb = burn_text(rgb, label_lines(rgb.shape[1], algorithm), corner="top-left")
    rgb = burn_text(rgb, [legend], corner="bottom-left")
    return RenderingOutput(key="overlay", rgb=rgb, description="Intracranial artery overlay")


class DsaIntracranialArteries:
    name = NAME

    def __call__(self, run: Run, ctx: PipelineContext) -> PipelineResult:
        checked(NAME, ctx.options)  # it takes none: one given is refused
        require_2d_run(run, NAME, 3)
        meta = run.meta
        notes: list[str] = []
        vessel: np.ndarray | None
        field = exposed_field(run.pixels, meta)
        overlap = None
        if ctx.model_package is None:
            result = analyse(run.pixels, meta.frame_times_s, meta.pixel_spacing_mm, field=field)
            notes += motion_note(result)
            overlap = result.timing_overlap
            vessel, artery = result.vessel, result.artery
            algorithm = AlgorithmInfo(NAME, VERSION, "classical")
            masks, segments = np.stack([vessel, artery]), [VESSEL_SEGMENT, ARTERY_SEGMENT]
        else:
            package = load_package(ctx.model_package, pipeline=NAME)
            device = inference_device(ctx.device)
            config = {"fps": None, **package.config}
            probs, notes = predict_sequence(
                package.load_model(device),
                run.pixels,
                meta.frame_times_s,
                meta.pixel_spacing_mm,
                config,
                device,
            )
            if probs.shape[0] != 1:
                raise PipelineError(
                    f"model package {package.name}: {NAME} expects one output "
                    f"channel, got {probs.shape[0]}"
                )
            vessel, artery = None, restrict(probs[0] >= 0.5, field)
            algorithm = package.algorithm(NAME, VERSION)
            masks, segments = artery[None], [ARTERY_SEGMENT]
            notes.append(f"device {device.type}; all {run.pixels.shape[0]} frames used")
        if field.collimated:
            notes.append(field.describe())
        image = minip(run.pixels)
        return PipelineResult(
            outputs=[
                SegmentationOutput(
                    key="ia",
                    masks=masks,
                    segments=segments,
                    algorithm=algorithm,
                    geometry="canvas",
                    description="Intracranial arteries",
                ),
                ImageOutput(key="minip", pixels=image, description="MinIP", geometry="canvas"),
                vessel_rendering(image, vessel, artery, algorithm),
            ],
            notes=notes,
            quality=dsa_quality(run.pixels, masks, field, meta.subtracted, overlap),
        )


@register(NAME)
def _factory() -> DsaIntracranialArteries:
    return DsaIntracranialArteries()
