"""The node's exceptions, converted to a DIMSE status, an HTTP status, a run or job
state or a delivery retry in exactly one place each (``ingest``, ``api``,
``router``, ``jobs``, ``outbox``)::

    NodeError
    ├── ConfigError          bad settings; names the key and what is allowed
    ├── StorageError         storage_dir cannot be written at start: the node does not start
    ├── RejectedInstance     a received instance we refuse (carries a DIMSE status)
    │   └── OutOfResources   no disk space: 0xA700
    ├── RunError             a run that cannot be decoded or processed (job fails, no retry)
    └── DeliveryError        a destination that is down or refused (outbox retries)
"""

from __future__ import annotations


class NodeError(Exception):
    """Base of every error the node raises on purpose."""


class ConfigError(NodeError):
    pass


class StorageError(NodeError):
    pass


class RejectedInstance(NodeError):
    """``status`` is the DIMSE status the C-STORE response carries."""

    # PS3.4 Annex B.2.3 / PS3.7 C: storage service statuses. Every one of them is
    # in the README's table; ``dicom_node.ingest`` is where they are answered.
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    CANNOT_UNDERSTAND = 0xC000
    OVER_LIMITS = 0xC001  # Cannot understand: declared size beyond the node's limits
    UID_HELD = (
        0xC002  # Cannot understand: its SOP Instance UID names a stored instance of another series
    )
    # PS3.18 Table I.2-2, "Referenced Transfer Syntax not supported": a STOW-RS part
    # in a transfer syntax the node does not decode (a C-STORE's is negotiated)
    TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    OUT_OF_RESOURCES = 0xA700
    PROCESSING_FAILURE = 0x0110

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class OutOfResources(RejectedInstance):
    def __init__(self, reason: str) -> None:
        super().__init__(RejectedInstance.OUT_OF_RESOURCES, reason)


class RunError(NodeError):
    """Permanent: retrying the same run will not help."""


class DeliveryError(NodeError):
    """Transient by default: the outbox retries with backoff."""

    def __init__(self, reason: str, permanent: bool = False) -> None:
        super().__init__(reason)
        self.permanent = permanent
