"""A throwaway certificate authority for the TLS tests, made with the openssl CLI
(never committed): a CA, a server certificate for localhost / 127.0.0.1, and
client certificates for mutual TLS."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


def _openssl(*args: str, cwd: Path) -> None:
    res = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr


class TestCA:
    __test__ = False  # not a test class

    def __init__(self, directory: Path, name: str = "angio test CA") -> None:
        if shutil.which("openssl") is None:
            pytest.skip("openssl is not installed")
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.cert = directory / "ca.pem"
        self.key = directory / "ca.key"
        _openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-keyout", str(self.key), "-out", str(self.cert), "-subj", f"/CN={name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            cwd=directory,
        )  # fmt: skip

    def issue(self, name: str, common_name: str, server: bool) -> Issued:
        key, csr, cert = (self.dir / f"{name}.{ext}" for ext in ("key", "csr", "pem"))
        ext = self.dir / f"{name}.ext"
        usage = "serverAuth" if server else "clientAuth"
        ext.write_text(
            "basicConstraints=CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            f"extendedKeyUsage={usage}\n"
            + ("subjectAltName=DNS:localhost,IP:127.0.0.1\n" if server else "")
        )
        _openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
            "-subj", f"/CN={common_name}", cwd=self.dir,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", str(csr), "-CA", str(self.cert), "-CAkey", str(self.key),
            "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext),
            cwd=self.dir,
        )  # fmt: skip
        return Issued(cert, key)
