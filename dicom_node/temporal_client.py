"""A Temporal client from ``[engine]``: the node and the workers connect the same way,
over TLS (optionally mutual) when ``engine.tls`` is set."""

from __future__ import annotations

from pathlib import Path

from temporalio.client import Client
from temporalio.service import TLSConfig

from dicom_node.settings import EngineSettings


def _read(path: Path | None) -> bytes | None:
    return Path(path).read_bytes() if path is not None else None


async def connect(engine: EngineSettings, identity: str) -> Client:
    tls: TLSConfig | bool = False
    if engine.tls:
        tls = TLSConfig(
            server_root_ca_cert=_read(engine.tls_ca_file),
            domain=engine.tls_server_name,
            client_cert=_read(engine.tls_cert_file),
            client_private_key=_read(engine.tls_key_file),
        )
    return await Client.connect(
        engine.address, namespace=engine.namespace, identity=identity, tls=tls
    )
