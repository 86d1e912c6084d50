"""DICOM AI node for X-ray angiography: the service, its stages and the CLI.

Stages, one module each (see docs/architecture.md): ``scp`` (receive) ->
``spool`` (durable store) -> ``completion`` -> ``routing`` -> ``jobs`` ->
``runs`` (decode) -> ``pipelines`` -> ``encode`` -> ``outbox`` / ``senders``.
"""

__version__ = "0.1.0"
