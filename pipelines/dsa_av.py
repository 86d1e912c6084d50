"""``dsa_av``: artery/vein segmentation of a cerebral 2D+t DSA run.

Without a model package the classical path runs (Frangi on the MinIP, then
time-intensity separation; see ``pipelines.vessels``). With a package (the
node's settings give its folder) the ST U-Net runs on the run resampled to
1 fps (``pipelines.preprocess.predict_sequence``).

Both paths report nothing outside the collimated field (``pipelines.shutter``);
the classical filters also see a smooth extension of the field instead of the
blade edge.

Outputs: a SEG on the MinIP canvas (Artery, Vein, and the internal carotid
artery where it is found), the MinIP itself, and a colour overlay
(arteries red, veins blue) with a burned-in AI label for any viewer.
"""

from __future__ import annotations

import numpy as np

from pipelines.base import (
    ARTERY,
    ICA,
    VEIN,
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
from pipelines.models.package import load_package
from pipelines.options import checked
from pipelines.preprocess import inference_device, predict_sequence
from pipelines.render import AI_LABEL, burn_text, overlay, to_grey_rgb
from pipelines.shutter import exposed_field, restrict
from pipelines.vessel_quality import dsa_quality
from pipelines.vessels import analyse, motion_note

NAME = "dsa_av"
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
RED, BLUE, MAGENTA, ORANGE = (255, 0, 0), (0, 90, 255), (200, 0, 200), (255, 160, 0)
ARTERY_SEGMENT = Segment("Artery", ARTERY, color_rgb=RED)
VEIN_SEGMENT = Segment("Vein", VEIN, color_rgb=BLUE)
ICA_SEGMENT = Segment("Internal carotid artery", ICA, color_rgb=ORANGE)
# Output channels of an artery/vein model, by name in the package config.
CHANNEL_SEGMENTS = {"artery": ARTERY_SEGMENT, "vein": VEIN_SEGMENT, "ica": ICA_SEGMENT}
# Smallest ICA area (pixels) worth reporting; below it the channel is noise.
MIN_ICA_PIXELS = 20


def label_lines(width: int, algorithm: AlgorithmInfo) -> list[str]:
    """The AI label and the algorithm; the label wraps on narrow images so it stays legible."""
    label = AI_LABEL.split(" - ") if width < 400 else [AI_LABEL]
    return [*label, algorithm.describe()]


def av_rendering(
    base: np.ndarray, masks: dict[str, np.ndarray], algorithm: AlgorithmInfo, key: str = "overlay"
) -> RenderingOutput:
    """Arteries red, veins blue, crossings magenta, over the MinIP, with the AI label."""
    artery, vein = masks["artery"], masks["vein"]
    layers = [artery & ~vein, vein & ~artery, artery & vein]
    colours = [RED, BLUE, MAGENTA]
    legend = "red: artery  blue: vein  magenta: both"
    if "ica" in masks:
        layers.append(masks["ica"])
        colours.append(ORANGE)
        legend += "  orange: ICA"
    rgb = overlay(to_grey_rgb(base), layers, colours)
    rgb = burn_text(rgb, label_lines(rgb.shape[1], algorithm), corner="top-left")
    rgb = burn_text(rgb, [legend], corner="bottom-left")
    return RenderingOutput(key=key, rgb=rgb, description="Artery/vein overlay")


class DsaArteryVein:
    name = NAME

    def __call__(self, run: Run, ctx: PipelineContext) -> PipelineResult:
        checked(NAME, ctx.options)  # it takes none: one given is refused
        require_2d_run(run, NAME, 4 if ctx.model_package else 3)
        meta = run.meta
        notes: list[str] = []
        field = exposed_field(run.pixels, meta)
        overlap = None
        if ctx.model_package is None:
            result = analyse(run.pixels, meta.frame_times_s, meta.pixel_spacing_mm, field=field)
            notes += motion_note(result)
            overlap = result.timing_overlap
            if meta.frame_times_s is None:
                notes.append("no frame timing: frame order used for artery/vein timing")
            masks = {"artery": result.artery, "vein": result.vein}
            if result.ica is not None:
                masks["ica"] = result.ica
            else:
                notes.append("no pixel spacing: internal carotid artery not assessed")
            algorithm = AlgorithmInfo(NAME, VERSION, "classical")
        else:
            package = load_package(ctx.model_package, pipeline=NAME)
            device = inference_device(ctx.device)
            model = package.load_model(device)
            probs, notes = predict_sequence(
                model,
                run.pixels,
                meta.frame_times_s,
                meta.pixel_spacing_mm,
                dict(package.config),
                device,
            )
            channels = list(package.config.get("channels", ["artery", "vein"]))
            if (
                len(channels) != probs.shape[0]
                or not set(channels) <= set(CHANNEL_SEGMENTS)
                or not {"artery", "vein"} <= set(channels)
            ):
                raise PipelineError(
                    f"model package {package.name}: channels {channels} do not "
                    f"fit its {probs.shape[0]} outputs or {NAME}"
                )
            masks = {name: restrict(probs[i] >= 0.5, field) for i, name in enumerate(channels)}
            algorithm = package.algorithm(NAME, VERSION)
            notes.append(f"device {device.type}")
        if field.collimated:
            notes.append(field.describe())
        if "ica" in masks and masks["ica"].sum() < MIN_ICA_PIXELS:
            del masks["ica"]
            notes.append("no internal carotid artery found in the field of view")
        order = [k for k in ("artery", "vein", "ica") if k in masks]
        segmentation = SegmentationOutput(
            key="av",
            masks=np.stack([masks[k] for k in order]),
            segments=[CHANNEL_SEGMENTS[k] for k in order],
            algorithm=algorithm,
            geometry="canvas",
            description="Arteries and veins",
        )
        image = minip(run.pixels)
        return PipelineResult(
            outputs=[
                segmentation,
                ImageOutput(key="minip", pixels=image, description="MinIP", geometry="canvas"),
                av_rendering(image, masks, algorithm),
            ],
            notes=notes,
            quality=dsa_quality(run.pixels, segmentation.masks, field, meta.subtracted, overlap),
        )


@register(NAME)
def _factory() -> DsaArteryVein:
    return DsaArteryVein()
