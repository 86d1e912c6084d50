"""TLS contexts for the DICOM port and the REST API (``[tls]`` in the settings).

TLS 1.2 or later with Python's default server ciphers (which meet the BCP 195
profiles dcmtk proposes). With ``ca_file`` the peer must present a certificate
that CA signed (mutual TLS); the audit trail then names its subject.
"""

from __future__ import annotations

import ssl
from typing import Any

from dicom_node.errors import ConfigError
from dicom_node.settings import TlsSettings


def server_context(tls: TlsSettings) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"tls.cert_file / tls.key_file: cannot load {tls.cert_file} with {tls.key_file}: {exc}"
        ) from None
    if tls.ca_file is not None:
        try:
            ctx.load_verify_locations(cafile=str(tls.ca_file))
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"tls.ca_file: cannot load {tls.ca_file}: {exc}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def peer_subject(sock: Any) -> str:
    """The common name of a TLS peer's certificate, or "" (no TLS, no certificate)."""
    getpeercert = getattr(sock, "getpeercert", None)
    if getpeercert is None:
        return ""
    try:
        cert = getpeercert() or {}
    except (ValueError, OSError):
        return ""
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return ""
