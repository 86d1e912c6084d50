"""DICOM Parametric Map (highdicom) for ``ParametricMapOutput``: one float map per
quantity on the MinIP canvas.

The canvas (``ctx.canvas``) is the source image: it carries the Frame of
Reference and plane geometry the Parametric Map IOD requires and legacy XA
lacks, and it is delivered before the map, so every reference resolves at the
destination. The map references the canvas only (Source Image Sequence,
Derivation Image Sequence, Referenced Series Sequence); the canvas names the XA
run, so the chain reads map -> canvas -> XA, and a viewer that fuses the map
over its referenced series (OHIF) always finds the canvas.

Pixel values are 32-bit floats, mapped to the quantity by a Real World Value
Mapping (identity slope and intercept) whose LUT Label is the pipeline's label
(CBF, CBV, MTT, TMAX, TTP), with the quantity in its Quantity Definition and
UCUM units.

"No value" (a pixel outside the output's ``valid`` mask, or not finite) is never
a number a reader could take for a measurement: it is stored as the Float Pixel
Padding Value (0028,0122) of the Floating Point Image Pixel module (with a
range limit equal to it), -1 for maps
whose values are all >= 0 (every perfusion map), else one below the smallest
value; the Real World Value Mapping's first and last values mapped span the
valid values only, so the padding value is outside the mapped range, and the
window (VOI LUT) is set from the valid values, so padding renders as the
darkest value in a viewer that ignores both. A map without any valid pixel is
refused: an empty map is a failed result, not an object.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ParametricMapStorage

from dicom_node import __version__
from dicom_node.encode import encoder
from dicom_node.encode.common import (
    MANUFACTURER,
    MODEL_NAME,
    EncodeContext,
    coded,
    mark_supersession,
    series_description,
    set_dimension_organization,
)
from pipelines.base import Output, ParametricMapOutput, Run

# Float Pixel Padding Value of maps whose valid values are all >= 0.
NO_VALUE = -1.0


def padding_value(valid_values: np.ndarray) -> float:
    """The stored value meaning "no value": below every valid value."""
    low = float(valid_values.min())
    return NO_VALUE if low >= 0 else float(np.floor(low)) - 1.0


def _values(out: ParametricMapOutput) -> tuple[np.ndarray, np.ndarray, float]:
    """Stored pixels (padding where there is no value), the valid mask, the padding."""
    values = np.asarray(out.values, dtype=np.float32)
    if values.ndim != 2:
        raise ValueError(f"parametric map {out.key!r} must be (H, W), got {values.shape}")
    valid = np.isfinite(values)
    if out.valid is not None:
        valid &= np.asarray(out.valid, bool)
    if not valid.any():
        raise ValueError(f"parametric map {out.key!r} has no valid pixel: refusing an empty map")
    padding = padding_value(values[valid])
    return np.where(valid, values, np.float32(padding)), valid, padding


def encode_parametric_map(out: ParametricMapOutput, ctx: EncodeContext) -> list[Dataset]:
    if ctx.canvas is None:
        raise ValueError(f"parametric map {out.key!r} needs the MinIP canvas as its source")
    values, valid, padding = _values(out)
    if values.shape != (ctx.canvas.Rows, ctx.canvas.Columns):
        raise ValueError(
            f"parametric map {out.key!r} {values.shape} does not fit the canvas "
            f"({ctx.canvas.Rows}, {ctx.canvas.Columns})"
        )
    lo, hi = float(values[valid].min()), float(values[valid].max())
    if hi <= lo:
        hi = lo + 1.0
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=out.label[:16],
        lut_explanation=(out.description or out.quantity.meaning)[:64],
        unit=coded(out.unit),
        value_range=(lo, hi),
        slope=1.0,
        intercept=0.0,
        quantity_definition=coded(out.quantity),
    )
    inside = values[valid]
    p_lo, p_hi = (float(v) for v in np.percentile(inside, [2, 98]))
    width = max(p_hi - p_lo, 1e-6)
    superseded = ctx.superseded(out.key, ParametricMapStorage)
    pm = hd.pm.ParametricMap(
        source_images=[ctx.canvas],
        pixel_array=values[None],
        series_instance_uid=ctx.series_uid(out.key),
        series_number=ctx.series_number(out.key),
        sop_instance_uid=ctx.result_uid(out.key, "instance"),
        instance_number=1,
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        # LINEAR_EXACT: relative maps have windows narrower than 1.
        voi_lut_transformations=[
            hd.content.VOILUTTransformation(
                window_center=p_lo + width / 2,
                window_width=width,
                voi_lut_function=hd.VOILUTFunctionValues.LINEAR_EXACT,
            )
        ],
        content_description=f"{out.quantity.meaning} ({out.algorithm.describe()})"[:64],
        content_label=out.label.upper()[:16],
        series_description=series_description(f"{out.label} {out.quantity.meaning}", superseded),
        series_date=ctx.now.date(),
        series_time=ctx.now.time(),
        content_date=ctx.now.date(),
        content_time=ctx.now.time(),
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MODEL_NAME,
        software_versions=__version__,
        device_serial_number="0",
    )
    # General Series: Type 2C, empty when unknown (a head run is not paired).
    pm.Laterality = ctx.first.get("Laterality", "")
    pm.ImageComments = (out.description or out.quantity.meaning)[:10240]
    # Floating Point Image Pixel module: the value that means "no value here".
    # Its range limit equal to it (a one-value range): dciodvfy checks the Type 1C
    # limit whenever the value is present.
    pm.FloatPixelPaddingValue = padding
    pm.FloatPixelPaddingRangeLimit = padding
    set_dimension_organization(pm, ctx.result_uid(out.key, "dimension-organization"))
    mark_supersession(pm, superseded)
    return [pm]


@encoder(ParametricMapOutput)
def _parametric_map(out: Output, ctx: EncodeContext, run: Run) -> list[Dataset]:
    assert isinstance(out, ParametricMapOutput)
    return encode_parametric_map(out, ctx)
