"""DICOM SR (TID 1500 Measurement Report, highdicom) for ``MeasurementsOutput``.

One measurement group (TID 1501, measurements not tied to an image region)
holding the output's measurements with their codes and UCUM units, the
algorithm (TID 4019) and the finding site. The observer is the node as a
device. The XA run is the evidence, so the report lands in the run's study and
its Current Requested Procedure Evidence names the run.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicom_node.encode import encoder
from dicom_node.encode.common import MANUFACTURER, MODEL_NAME, SERIES_PREFIX, EncodeContext, coded
from pipelines.base import AlgorithmInfo, MeasurementsOutput, Output, Run

# SCT 77343006 "Angiography": the procedure the measurements come from.
PROCEDURE = codes.SCT.Angiography


def algorithm_id(info: AlgorithmInfo) -> hd.sr.AlgorithmIdentification:
    if info.family == "model":
        return hd.sr.AlgorithmIdentification(
            name=info.name,
            version=info.version,
            parameters=[
                f"model_package={info.model_package}",
                f"model_version={info.model_version}",
            ],
        )
    return hd.sr.AlgorithmIdentification(
        name=info.name, version=info.version, parameters=["family=classical"]
    )


def encode_measurements(out: MeasurementsOutput, ctx: EncodeContext) -> list[Dataset]:
    measurements = [
        hd.sr.Measurement(name=coded(m.name), value=float(m.value), unit=coded(m.unit))
        for m in out.measurements
        if np.isfinite(m.value)
    ]
    if not measurements:
        raise ValueError(f"measurements {out.key!r}: no finite value to report")
    device = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=ctx.uid("device", MODEL_NAME),
            name=MODEL_NAME,
            manufacturer_name=MANUFACTURER,
            model_name=MODEL_NAME,
        ),
    )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=ctx.uid(ctx.pipeline, out.key, "tracking"), identifier=out.title[:64]
        ),
        algorithm_id=algorithm_id(out.algorithm),
        finding_sites=[hd.sr.FindingSite(coded(out.finding_site))] if out.finding_site else None,
        measurements=measurements,
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=PROCEDURE,
        imaging_measurements=[group],
        title=codes.cid7021.ImagingMeasurementReport,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=list(ctx.sources),
        content=report[0],
        series_instance_uid=ctx.series_uid(out.key),
        series_number=ctx.series_number(out.key),
        sop_instance_uid=ctx.uid(ctx.pipeline, out.key, "instance"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=(SERIES_PREFIX + out.title)[:64],
        content_date=ctx.now.date(),
        content_time=ctx.now.time(),
    )
    sr.ManufacturerModelName = MODEL_NAME
    return [sr]


@encoder(MeasurementsOutput)
def _measurements(out: Output, ctx: EncodeContext, run: Run) -> list[Dataset]:
    assert isinstance(out, MeasurementsOutput)
    return encode_measurements(out, ctx)
