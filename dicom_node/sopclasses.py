"""What the storage SCP accepts, and how the node classifies instances."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

from pydicom import uid

# A UID as the node takes it: digits and dots (the spool's check_uid, a rule's SOP class).
UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*\Z")

# A rejection note (IHE IOCM) is one: instances withdrawn, and the results made of them
# (dicom_node.rejection).
KEY_OBJECT_SELECTION = uid.KeyObjectSelectionDocumentStorage

# Storage SOP classes accepted from modalities and PACS.
ACCEPTED_SOP_CLASSES: dict[str, str] = {
    uid.XRayAngiographicImageStorage: "XA",
    uid.EnhancedXAImageStorage: "Enhanced XA",
    uid.XRayRadiofluoroscopicImageStorage: "XRF",
    uid.EnhancedXRFImageStorage: "Enhanced XRF",
    uid.XRay3DAngiographicImageStorage: "X-Ray 3D Angiographic",
    uid.XRay3DCraniofacialImageStorage: "X-Ray 3D Craniofacial",
    uid.CTImageStorage: "CT",
    uid.EnhancedCTImageStorage: "Enhanced CT",
    uid.SecondaryCaptureImageStorage: "Secondary Capture",
    uid.MultiFrameSingleBitSecondaryCaptureImageStorage: "MF Single Bit SC",
    uid.MultiFrameGrayscaleByteSecondaryCaptureImageStorage: "MF Grayscale Byte SC",
    uid.MultiFrameGrayscaleWordSecondaryCaptureImageStorage: "MF Grayscale Word SC",
    uid.MultiFrameTrueColorSecondaryCaptureImageStorage: "MF True Color SC",
    uid.SegmentationStorage: "Segmentation",
    KEY_OBJECT_SELECTION: "Key Object Selection",
}

# Classes that are runs of 2D frames over time.
CINE_2D = {
    uid.XRayAngiographicImageStorage,
    uid.EnhancedXAImageStorage,
    uid.XRayRadiofluoroscopicImageStorage,
    uid.EnhancedXRFImageStorage,
}
# Classes that are (parts of) volumes.
VOLUME = {
    uid.XRay3DAngiographicImageStorage,
    uid.XRay3DCraniofacialImageStorage,
    uid.CTImageStorage,
    uid.EnhancedCTImageStorage,
}
# Classes that carry no pixel data of their own to check.
NON_IMAGE = {uid.SegmentationStorage, KEY_OBJECT_SELECTION}
# Classes whose every instance is a run of its own, complete on arrival.
DOCUMENTS = {KEY_OBJECT_SELECTION}

TRANSFER_SYNTAXES: list[str] = [
    uid.ImplicitVRLittleEndian,
    uid.ExplicitVRLittleEndian,
    uid.DeflatedExplicitVRLittleEndian,
    uid.ExplicitVRBigEndian,
    uid.JPEGBaseline8Bit,
    uid.JPEGExtended12Bit,
    uid.JPEGLossless,  # process 14
    uid.JPEGLosslessSV1,  # process 14, selection value 1
    uid.JPEGLSLossless,
    uid.JPEGLSNearLossless,
    uid.JPEG2000Lossless,
    uid.JPEG2000,
    # High-Throughput JPEG 2000 (PS3.5 A.4.11, 2023): decoded by openjpeg, as JPEG 2000
    uid.HTJ2KLossless,
    uid.HTJ2KLosslessRPCL,
    uid.HTJ2K,
    uid.RLELossless,
]


def run_sop_class(classes: Sequence[str]) -> str:
    """The SOP Class of a run whose instances are of ``classes``, in the order they
    arrived: the most common, the earliest of those tied. A series that mixes classes
    (a screen capture stored into an XA series, say) is a run of that class, and the
    other instances are left out of it."""
    counts = Counter(classes)
    top = max(counts.values())
    return next(c for c in classes if counts[c] == top)


def resolve_sop_class(name_or_uid: str) -> str:
    """A SOP Class UID from a UID or a pydicom keyword (e.g. 'XRayAngiographicImageStorage')."""
    if name_or_uid and name_or_uid[0].isdigit():
        return name_or_uid
    value = getattr(uid, name_or_uid, None)
    if value is None:
        raise ValueError(f"unknown SOP class keyword {name_or_uid!r}")
    return str(value)
