"""DICOM AI node for X-ray angiography: the service, its stages and the CLI.

Stages, one module each (see docs/architecture.md): ``scp`` (receive) ->
``spool`` (durable store) -> ``completion`` -> ``routing`` -> ``jobs`` ->
``runs`` (decode) -> ``pipelines`` -> ``encode`` -> ``outbox`` / ``senders``.
"""

__version__ = "0.1.0"
# Manufacturer (0008,0070) of every result the node writes: routing knows them by it.
MANUFACTURER = "angio-dicom-node"
