"""A real Orthanc as the destination: the MinIP arrives by C-STORE and by STOW-RS."""

from __future__ import annotations

import pytest
from pydicom.uid import XRayAngiographicImageStorage
from pynetdicom import AE

from tests.conftest import wait_for
from tests.dicomgen import xa_run
from tests.orthanc_fixture import orthanc  # noqa: F401  (fixture)

RULES = [{"name": "xa", "match": {"modality": ["XA"]}, "pipelines": ["minip"]}]


@pytest.mark.parametrize("kind", ["dimse", "dicomweb"])
def test_minip_arrives_in_orthanc(make_node, orthanc, kind) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    dest = (
        {
            "kind": "dimse",
            "name": "orthanc",
            "host": "127.0.0.1",
            "port": orthanc.dicom_port,
            "ae_title": orthanc.aet,
        }
        if kind == "dimse"
        else {"kind": "dicomweb", "name": "orthanc", "url": orthanc.dicomweb_url}
    )
    node = make_node(destinations=[dest], rules=RULES)
    ds = xa_run(frames=4)
    ae = AE(ae_title="SUITE")
    ae.add_requested_context(XRayAngiographicImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.settings.ae_title)
    assert int(assoc.send_c_store(ds).Status) == 0
    assoc.release()
    sent = wait_for(
        lambda: node.db.query("SELECT * FROM outbox WHERE state='sent'"),
        60,
        what=f"MinIP sent by {kind}",
    )
    uid = sent[0]["sop_instance_uid"]
    found = orthanc.post(
        "/tools/find", json={"Level": "Instance", "Query": {"SOPInstanceUID": uid}, "Expand": True}
    ).json()
    assert len(found) == 1
    tags = orthanc.get(f"/instances/{found[0]['ID']}/simplified-tags").json()
    assert tags["StudyInstanceUID"] == ds.StudyInstanceUID
    assert tags["SeriesDescription"] == "AI MinIP"
    # QIDO-RS finds the result series in the source study
    qido = orthanc.get(
        f"/dicom-web/studies/{ds.StudyInstanceUID}/series",
        headers={"Accept": "application/dicom+json"},
    ).json()
    assert any(s["0020000E"]["Value"][0] == tags["SeriesInstanceUID"] for s in qido)
