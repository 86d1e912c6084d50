"""TLS contexts for the DICOM port and the REST API (``[tls]`` in the settings), and
for the C-STORE destinations that ask for it (``tls = true`` on a destination).

TLS 1.2 or later with Python's default ciphers (which meet the BCP 195 profiles
dcmtk proposes). With ``ca_file`` the peer must present a certificate that CA
signed (mutual TLS); the audit trail then names its subject. As a client the node
always verifies the destination's certificate and its name.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509

from dicom_node.errors import ConfigError
from dicom_node.settings import DimseDestination, Settings, TlsSettings

log = logging.getLogger(__name__)

# A certificate that ends sooner than this is reported at start and every day.
EXPIRY_WARNING = timedelta(days=30)


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


@dataclass(frozen=True)
class CertificateFile:
    """A certificate file of the settings: ``setting`` its key. ``served``: the node's
    own listening certificate and CA, loaded once at start (a renewed file needs a
    restart); the others are read again each time they are used."""

    setting: str
    path: Path
    served: bool


def certificate_files(settings: Settings) -> list[CertificateFile]:
    """Every certificate file the node uses with these settings."""
    tls, engine = settings.tls, settings.engine
    used: list[tuple[str, Any, tuple[str, ...], bool]] = []  # (key prefix, section, keys, served)
    if tls.dicom or tls.api:
        used.append(("tls", tls, ("cert_file", "ca_file"), True))
    for dest in settings.destinations:
        if isinstance(dest, DimseDestination) and dest.tls:
            used.append(
                (f"destinations.{dest.name}", dest, ("tls_cert_file", "tls_ca_file"), False)
            )
    if engine.kind == "temporal" and engine.tls:
        used.append(("engine", engine, ("tls_cert_file", "tls_ca_file"), False))
    return [
        CertificateFile(f"{prefix}.{key}", Path(getattr(section, key)), served)
        for prefix, section, keys, served in used
        for key in keys
        if getattr(section, key) is not None
    ]


def not_after(path: Path) -> datetime:
    """When the first of the certificates in a PEM file ends (a chain or a CA bundle:
    the earliest of them)."""
    certs = x509.load_pem_x509_certificates(path.read_bytes())
    return min(c.not_valid_after_utc for c in certs)


class CertificateExpiry:
    """When each certificate the node uses ends, reported at start, every day, and in
    ``/metrics``, so that a certificate is renewed before TLS peers refuse the node:
    an expired one is found otherwise only by each handshake refused."""

    def __init__(self, settings: Settings) -> None:
        self.files = certificate_files(settings)
        # what the node serves until it restarts, whatever the file holds later
        self._served = {f.setting: self._read(f) for f in self.files if f.served}

    @staticmethod
    def _read(f: CertificateFile) -> datetime | str:
        try:
            return not_after(f.path)
        except (OSError, ValueError) as exc:
            return f"its end of validity cannot be read: {exc}"

    def current(self) -> list[tuple[CertificateFile, datetime | str]]:
        """Each file with its end of validity, or why that cannot be read."""
        return [(f, self._served[f.setting] if f.served else self._read(f)) for f in self.files]

    def report(self, now: datetime | None = None) -> int:
        """Log each certificate that has ended or ends within ``EXPIRY_WARNING``;
        returns how many."""
        now = now or datetime.now(UTC)
        problems = 0
        for f, end in self.current():
            where = f"{f.setting} ({f.path})"
            if isinstance(end, str):
                log.warning("%s: %s", where, end)
                continue
            renew = "renew it" + (
                " and restart the node (it serves the certificate it loaded at start)"
                if f.served
                else ""
            )
            when = end.strftime("%Y-%m-%d %H:%M UTC")
            if end <= now:
                problems += 1
                log.error(
                    "%s: the certificate expired on %s: TLS peers refuse it; %s", where, when, renew
                )
            elif end - now < EXPIRY_WARNING:
                problems += 1
                log.warning(
                    "%s: the certificate expires on %s (in %d day(s)); %s",
                    where,
                    when,
                    (end - now).days,
                    renew,
                )
        return problems
