"""TLS contexts for the DICOM port and the REST API (``[tls]`` in the settings), and
for the C-STORE destinations that ask for it (``tls = true`` on a destination).

TLS 1.2 or later with Python's default ciphers (which meet the BCP 195 profiles
dcmtk proposes). With ``ca_file`` the peer must present a certificate that CA
signed (mutual TLS); the audit trail then names its subject. As a client the node
always verifies the destination's certificate and its name.
"""

from __future__ import annotations

import ssl
from typing import Any

from dicom_node.errors import ConfigError
from dicom_node.settings import DimseDestination, TlsSettings


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


def client_context(dest: DimseDestination) -> ssl.SSLContext:
    """The context for a C-STORE association to ``dest``: its certificate verified
    against ``tls_ca_file`` (else the system's roots) and its name; the node's own
    certificate presented when the destination wants one (mutual TLS)."""
    try:
        ctx = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH,
            cafile=None if dest.tls_ca_file is None else str(dest.tls_ca_file),
        )
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"destination {dest.name}: tls_ca_file: cannot load {dest.tls_ca_file}: {exc}"
        ) from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if dest.tls_cert_file is not None:
        try:
            ctx.load_cert_chain(str(dest.tls_cert_file), str(dest.tls_key_file))
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                f"destination {dest.name}: cannot load tls_cert_file {dest.tls_cert_file} "
                f"with tls_key_file {dest.tls_key_file}: {exc}"
            ) from None
    return ctx
