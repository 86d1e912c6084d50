"""The node's own rejection note (IHE IOCM): a Key Object Selection Document that
withdraws results the node delivered, made of instances a sender rejected
(``dicom_node.rejection``)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import highdicom as hd
from pydicom.dataset import Dataset

from dicom_node import MANUFACTURER
from dicom_node.db.records import Delivered
from dicom_node.encode.common import (
    copy_character_set,
    copy_identity,
    deterministic_uid,
    set_equipment,
)

SERIES_NUMBER = 9900


def rejection_note(
    title: tuple[str, str, str],
    source: Dataset,
    results: Sequence[Delivered],
    received_note: str,
    destination: str,
) -> Dataset:
    """A rejection note titled ``title`` (that of the note received) listing ``results``,
    in the study and for the patient of ``source`` (a header of the rejected run): its
    UIDs depend on the received note, the results and the destination only, so that
    making it again gives the same object."""
    listed = sorted(r.sop_instance_uid for r in results)
    evidence = []
    for r in results:
        ds = Dataset()
        copy_identity(ds, source)
        ds.SOPClassUID = r.sop_class_uid
        ds.SOPInstanceUID = r.sop_instance_uid
        ds.SeriesInstanceUID = r.series_uid
        evidence.append(ds)
    content = hd.ko.KeyObjectSelection(
        document_title=hd.sr.CodedConcept(*title),
        referenced_objects=evidence,
        description=f"results withdrawn: their source was rejected by {received_note}"[:1024],
    )
    kos = hd.ko.KeyObjectSelectionDocument(
        evidence=evidence,
        content=content,
        series_instance_uid=deterministic_uid("rejection-series", received_note, destination),
        series_number=SERIES_NUMBER,
        sop_instance_uid=deterministic_uid("rejection", received_note, destination, *listed),
        instance_number=1,
        manufacturer=MANUFACTURER,
    )
    copy_character_set(kos, source)
    now = datetime.now()
    set_equipment(
        kos,
        "rejection of results",
        str(kos.SeriesInstanceUID),
        SERIES_NUMBER,
        "KO",
        now,
    )
    return kos
