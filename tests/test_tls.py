"""TLS on both ports, with the real foreign clients: dcmtk ``storescu +tls`` and
``echoscu +tls`` on the DICOM port, ``curl --cacert`` on the REST API; mutual TLS
with client certificates; a plain client gets a refusal, not a hang. Results
sent over TLS to a destination, dcmtk ``storescp +tls``. The CA is made here
(tests/tlsca.py), never committed."""

from __future__ import annotations

import json
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import XRayAngiographicImageStorage
from pynetdicom import AE

from tests.conftest import free_port, need, wait_for
from tests.dicomgen import save, xa_run
from tests.tlsca import Issued, TestCA


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    directory = tmp_path_factory.mktemp("pki")
    ca = TestCA(directory / "ca")
    other = TestCA(directory / "other", "some other CA")
    return {
        "ca": ca,
        "server": ca.issue("server", "localhost", server=True),
        "client": ca.issue("client", "SUITE1", server=False),
        "stranger": other.issue("stranger", "SUITE1", server=False),
        "other": other,
    }


def _tls(pki: dict[str, Any], mutual: bool) -> dict[str, Any]:
    server: Issued = pki["server"]
    cfg = {"cert_file": str(server.cert), "key_file": str(server.key), "dicom": True, "api": True}
    if mutual:
        cfg["ca_file"] = str(pki["ca"].cert)
    return cfg


def _run(args: list[str], timeout: float = 60) -> tuple[int, str, float]:
    t0 = time.monotonic()
    res = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    return res.returncode, res.stdout + res.stderr, time.monotonic() - t0


def _audit(node: Any) -> list[dict[str, Any]]:
    path = node.settings.storage_dir / "audit" / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_dcmtk_over_tls_and_plain_clients_refused(
    make_node: Any, pki: dict[str, Any], tmp_path: Path
) -> None:
    storescu, echoscu = need("storescu"), need("echoscu")
    node = make_node(tls=_tls(pki, mutual=False), rules=[])
    ca: TestCA = pki["ca"]
    files = [save(xa_run(frames=2, seed=s), tmp_path / f"in{s}") for s in (1, 2)]
    # anonymous TLS client (+tla), verifying the node's certificate against the test CA
    code, out, _ = _run(
        [echoscu, "+tla", "+cf", str(ca.cert), "-aec", "ANGIO_NODE", "127.0.0.1", str(node.port)]
    )
    assert code == 0, out
    code, out, _ = _run(
        [storescu, "+tla", "+cf", str(ca.cert), "-aet", "SUITE1", "-aec", "ANGIO_NODE"]
        + ["127.0.0.1", str(node.port), *map(str, files)]
    )
    assert code == 0, out
    assert len(node.db.query("SELECT 1 FROM instances")) == 2
    # a plain client on the TLS port: refused at once
    code, out, seconds = _run([echoscu, "-aec", "ANGIO_NODE", "127.0.0.1", str(node.port)])
    assert code != 0 and seconds < 10, (code, out, seconds)
    # a client that does not trust the node's certificate gives up too
    code, out, _ = _run(
        [echoscu, "+tla", "+cf", str(pki["stranger"].cert), "-aec", "ANGIO_NODE"]
        + ["127.0.0.1", str(node.port)]
    )
    assert code != 0
    # curl over HTTPS with the CA; plain HTTP on the HTTPS port is refused, not hung
    url = f"https://localhost:{node.api_port}"
    code, out, _ = _run(["curl", "-sS", "--cacert", str(ca.cert), f"{url}/health"])
    assert code == 0 and json.loads(out)["status"] == "ok", out
    code, out, _ = _run(["curl", "-sS", f"{url}/health"])
    assert code != 0  # the test CA is not in the system store
    code, out, seconds = _run(
        ["curl", "-sS", "--max-time", "20", f"http://localhost:{node.api_port}/health"]
    )
    assert code != 0 and seconds < 10, (out, seconds)
    events = _audit(node)
    refused = [e for e in events if e["event"] == "tls-refused"]
    assert {e["channel"] for e in refused} == {"dicom", "api"}
    accepted = [e for e in events if e["event"] == "association-accepted"]
    assert accepted and all(e["tls"] for e in accepted)


def test_mutual_tls_needs_a_client_certificate_of_the_ca(
    make_node: Any, pki: dict[str, Any], tmp_path: Path
) -> None:
    storescu, echoscu = need("storescu"), need("echoscu")
    node = make_node(tls=_tls(pki, mutual=True), rules=[])
    ca: TestCA = pki["ca"]
    client: Issued = pki["client"]
    stranger: Issued = pki["stranger"]
    path = save(xa_run(frames=2, seed=3), tmp_path / "in")
    code, out, _ = _run(
        [storescu, "+tls", str(client.key), str(client.cert), "+cf", str(ca.cert)]
        + ["-aet", "SUITE1", "-aec", "ANGIO_NODE", "127.0.0.1", str(node.port), str(path)]
    )
    assert code == 0, out
    for creds in (["+tla"], ["+tls", str(stranger.key), str(stranger.cert)]):
        code, out, seconds = _run(
            [echoscu, *creds, "+cf", str(ca.cert), "-aec", "ANGIO_NODE"]
            + ["127.0.0.1", str(node.port)]
        )
        assert code != 0 and seconds < 10, out
    # pynetdicom as a TLS SCU with the client certificate
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca.cert))
    ctx.load_cert_chain(str(client.cert), str(client.key))
    ae = AE(ae_title="SUITE1")
    ae.add_requested_context(XRayAngiographicImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="ANGIO_NODE", tls_args=(ctx, "localhost"))
    assert assoc.is_established
    assert int(assoc.send_c_store(xa_run(frames=2, seed=4)).Status) == 0
    assoc.release()
    assert len(node.db.query("SELECT 1 FROM instances")) == 2
    # HTTPS with and without a client certificate
    url = f"https://localhost:{node.api_port}/health"
    code, out, _ = _run(
        ["curl", "-sS", "--cacert", str(ca.cert), "--cert", str(client.cert)]
        + ["--key", str(client.key), url]
    )
    assert code == 0 and json.loads(out)["status"] == "ok", out
    code, out, _ = _run(["curl", "-sS", "--cacert", str(ca.cert), url])
    assert code != 0, out
    events = _audit(node)
    accepted = [e for e in events if e["event"] == "association-accepted"]
    assert {e["client_certificate"] for e in accepted} == {"SUITE1"}
    reasons = " ".join(e["reason"] for e in events if e["event"] == "tls-refused")
    assert "CERTIFICATE" in reasons.upper()


def test_tls_settings_are_checked_at_start(tmp_path: Path, pki: dict[str, Any]) -> None:
    from dicom_node.errors import ConfigError
    from dicom_node.settings import load_settings

    with pytest.raises(ConfigError, match="tls.cert_file is needed"):
        load_settings(None, environ={}, tls={"dicom": True})
    with pytest.raises(ConfigError, match="not a readable file"):
        load_settings(
            None,
            environ={},
            tls={"dicom": True, "cert_file": str(tmp_path / "no.pem"), "key_file": "x"},
        )
    # a key that does not belong to the certificate: the node does not start
    from dicom_node.service import Node

    server: Issued = pki["server"]
    other: Issued = pki["client"]
    settings = _node_settings(
        tmp_path, tls={"cert_file": str(server.cert), "key_file": str(other.key), "api": True}
    )
    with pytest.raises(ConfigError, match="tls.cert_file / tls.key_file"):
        Node(settings)


def _node_settings(tmp_path: Path, **settings: Any) -> Any:
    """Settings of a node on ephemeral ports, with ``settings`` on top."""
    from dicom_node.settings import load_settings

    return load_settings(
        None, environ={}, storage_dir=str(tmp_path / "n"), port=0, api={"port": 0}, **settings
    )


def test_results_go_to_a_tls_destination_and_not_to_an_untrusted_one(
    make_node: Any, pki: dict[str, Any], tmp_path: Path
) -> None:
    """C-STORE of the results over TLS to dcmtk's storescp, which requires the node's
    client certificate (mutual TLS); a destination whose certificate the node cannot
    verify (another CA) gets nothing: its deliveries wait, with the reason."""
    storescp = need("storescp")
    ca: TestCA = pki["ca"]
    server, client = pki["server"], pki["client"]
    port, received = free_port(), tmp_path / "received"
    received.mkdir()
    proc = subprocess.Popen(
        [storescp, "+tls", str(server.key), str(server.cert), "+cf", str(ca.cert)]
        + ["-aet", "PACS", "-od", str(received), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        pacs = {"kind": "dimse", "host": "127.0.0.1", "port": port, "ae_title": "PACS"}
        tls = {"tls": True, "tls_server_name": "localhost", "tls_cert_file": str(client.cert)}
        tls["tls_key_file"] = str(client.key)
        node = make_node(
            destinations=[
                {**pacs, **tls, "name": "pacs", "tls_ca_file": str(ca.cert)},
                {**pacs, **tls, "name": "untrusted", "tls_ca_file": str(pki["other"].cert)},
            ],
            rules=[{"name": "xa", "match": {"modality": ["XA"]}, "pipelines": ["minip"]}],
        )
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(XRayAngiographicImageStorage)
        assoc = ae.associate("127.0.0.1", node.port, ae_title=node.settings.ae_title)
        assert int(assoc.send_c_store(xa_run(frames=3, seed=5)).Status) == 0
        assoc.release()

        def rows(dest: str, state: str) -> list[Any]:
            return node.db.query(
                "SELECT * FROM outbox WHERE destination=? AND state=?", (dest, state)
            )

        wait_for(lambda: rows("pacs", "sent"), 60, what="a result sent over TLS")
        wait_for(lambda: rows("untrusted", "pending") and all(
            r["attempts"] >= 1 for r in rows("untrusted", "pending")), 30, what="a retry")  # fmt: skip
        sent = rows("pacs", "sent")
        assert not rows("pacs", "pending") and len(list(received.iterdir())) == len(sent)
        assert not rows("untrusted", "sent")
        assert all("TLS" in r["error"] for r in rows("untrusted", "pending"))
    finally:
        proc.terminate()
        proc.wait(10)


def test_destination_tls_settings_are_checked(tmp_path: Path, pki: dict[str, Any]) -> None:
    from dicom_node.errors import ConfigError
    from dicom_node.service import Node
    from dicom_node.settings import load_settings

    dest = {"kind": "dimse", "name": "d", "host": "h", "port": 104, "ae_title": "D"}
    with pytest.raises(ConfigError, match="tls_ca_file is set but tls is off"):
        load_settings(None, environ={}, destinations=[{**dest, "tls_ca_file": str(pki["ca"].cert)}])
    with pytest.raises(ConfigError, match="tls_cert_file and tls_key_file go together"):
        load_settings(
            None,
            environ={},
            destinations=[{**dest, "tls": True, "tls_cert_file": str(pki["client"].cert)}],
        )
    # a key that does not belong to the certificate: the node does not start
    cert, key = str(pki["client"].cert), str(pki["server"].key)
    settings = _node_settings(
        tmp_path, destinations=[{**dest, "tls": True, "tls_cert_file": cert, "tls_key_file": key}]
    )
    with pytest.raises(ConfigError, match="destination d: cannot load tls_cert_file"):
        Node(settings)


def _self_signed(folder: Path, name: str, start: Any, end: Any) -> Issued:
    """A certificate for localhost valid from ``start`` to ``end`` (datetimes), and its key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    issued = Issued(folder / f"{name}.pem", folder / f"{name}.key")
    issued.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    issued.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return issued


def test_certificates_near_or_past_their_end_are_reported_and_measured(
    make_node: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A certificate that had expired was found only by each handshake a TLS peer
    refused. The node now says, at start and every day, which certificate of its
    settings has ended or ends within 30 days, and ``/metrics`` gives each one's end
    (what a monitoring system alerts on). The node's own listening certificate is the
    one it loaded at start (a renewed file needs a restart); a destination's is read
    when it is used, and so when it is measured."""
    from datetime import UTC, datetime, timedelta

    import requests

    now = datetime.now(UTC).replace(microsecond=0)
    soon = _self_signed(
        tmp_path / "pki", "soon", now - timedelta(days=300), now + timedelta(days=5)
    )
    gone = _self_signed(tmp_path / "pki", "gone", now - timedelta(days=40), now - timedelta(days=2))
    caplog.set_level("WARNING", logger="dicom_node.tls")
    node = make_node(
        tls={"cert_file": str(soon.cert), "key_file": str(soon.key), "dicom": True},
        destinations=[
            {
                "kind": "dimse",
                "name": "pacs",
                "host": "127.0.0.1",
                "port": 104,
                "ae_title": "PACS",
                "tls": True,
                "tls_ca_file": str(soon.cert),
                "tls_cert_file": str(gone.cert),
                "tls_key_file": str(gone.key),
            }
        ],
    )
    said = {r.getMessage().split(" (")[0]: r for r in caplog.records}
    warned = said["tls.cert_file"]
    assert warned.levelname == "WARNING" and "expires on" in warned.getMessage()
    assert "restart the node" in warned.getMessage()
    expired = said["destinations.pacs.tls_cert_file"]
    assert expired.levelname == "ERROR" and "expired on" in expired.getMessage()
    assert said["destinations.pacs.tls_ca_file"].levelname == "WARNING"

    def measured() -> dict[str, float]:
        text = requests.get(f"http://127.0.0.1:{node.api_port}/metrics", timeout=10).text
        return {
            line.split('"')[1]: float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith("angio_node_tls_certificate_expiry_timestamp_seconds{")
        }

    assert measured() == {
        "tls.cert_file": (now + timedelta(days=5)).timestamp(),
        "destinations.pacs.tls_ca_file": (now + timedelta(days=5)).timestamp(),
        "destinations.pacs.tls_cert_file": (now - timedelta(days=2)).timestamp(),
    }
    # both renewed on disk: the destination's is read again; the served one needs a restart
    later = now + timedelta(days=400)
    for issued in (soon, gone):
        fresh = _self_signed(tmp_path / "new", issued.cert.stem, now, later)
        issued.cert.write_bytes(fresh.cert.read_bytes())
        issued.key.write_bytes(fresh.key.read_bytes())
    assert measured()["destinations.pacs.tls_cert_file"] == later.timestamp()
    assert measured()["tls.cert_file"] == (now + timedelta(days=5)).timestamp()
    caplog.clear()
    assert node.certificates.report() == 1  # the daily check: the one served
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == ["tls.cert_file"]
    assert node.certificates.report(now + timedelta(days=6)) == 1  # expired by then
    assert "expired on" in caplog.records[-1].getMessage()
