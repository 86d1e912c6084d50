"""The Orthanc plugin against a node whose API wants tokens (issue 17): the plugin's
REST client sends its bearer token (``NodeApiTokenFile``) for ``/health``, ``/jobs``
and ``/trigger``, and its STOW-RS jobs carry it in their HTTP headers."""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import pytest

from dicom_node.auth import hash_token
from tests.dicomgen import save, xa_run
from tests.orthanc_fixture import free_port, start_orthanc
from tests.test_orthanc_integration import (
    FAST,
    NODE_AET,
    forwards,
    needs_orthanc,
    needs_storescu,
    result_series,
    single_frame_series,
    start_node,
    storescu,
    wait_for,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "orthanc"))
import angio_core  # noqa: E402

pytestmark = pytest.mark.timeout(240)
TOKEN = "orthanc-plugin-token-9f8e7d6c5b4a"


def _node_with_tokens(tmp: Path, pacs: Any, port: int, api_port: int, transport: str) -> Any:
    from dicom_node.service import Node
    from dicom_node.settings import load_settings

    node = start_node(tmp, pacs, port=port, api_port=api_port, transport=transport)
    data = node.settings.model_dump(mode="json")
    node.stop()
    data["api"]["tokens"] = [
        {"name": "ORTHANC", "sha256": hash_token(TOKEN), "scopes": ["read", "operate", "store"]}
    ]
    data["forwarders"] = ["ORTHANC"]  # its AE title, and its token's name
    return Node(load_settings(None, environ={}, **data)).start()


def test_plugin_config_reads_its_token_from_a_file(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    cfg = angio_core.Config.from_orthanc({"AngioNode": {"NodeApiTokenFile": str(token_file)}})
    assert cfg.node_api_token == TOKEN and TOKEN not in repr(cfg)
    with pytest.raises(angio_core.ConfigError, match="NodeApiTokenFile"):
        angio_core.Config.from_orthanc({"AngioNode": {"NodeApiTokenFile": str(tmp_path / "x")}})


def test_a_token_file_deleted_or_emptied_keeps_the_token_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The plugin reads ``NodeApiTokenFile`` again when it changes. A file deleted, or
    left empty (a rotation half done), kept the token in use without a word, so that
    the first sign was the node refusing it once the node's side changed. Each such
    change is now logged once; the token in use is kept; the file put back is read."""
    token_file = tmp_path / "node-token"
    token_file.write_text(TOKEN + "\n")
    client = angio_core.NodeClient("http://127.0.0.1:9", 1.0, TOKEN, token_file=str(token_file))

    def sent() -> str:
        client._reread_token()
        return str(client.session.headers["Authorization"])

    caplog.set_level("WARNING", logger=angio_core.log.name)
    token_file.unlink()
    assert sent() == sent() == f"Bearer {TOKEN}"
    (missing,) = [r.getMessage() for r in caplog.records]
    assert "NodeApiTokenFile" in missing and "No such file" in missing, missing
    assert "kept" in missing, missing
    caplog.clear()
    token_file.write_text("\n")
    assert sent() == sent() == f"Bearer {TOKEN}"
    (empty,) = [r.getMessage() for r in caplog.records]
    assert "holds no token" in empty and "kept" in empty, empty
    caplog.clear()
    token_file.write_text("the-next-token\n")
    assert sent() == "Bearer the-next-token"
    assert "read again" in caplog.records[-1].getMessage()


@needs_orthanc
@needs_storescu
@pytest.mark.parametrize("transport", ["dimse", "dicomweb"])
def test_plugin_forwards_and_triggers_with_a_token(tmp_path: Path, transport: str) -> None:
    node_port, api_port = free_port(), free_port()
    token_file = tmp_path / "node-token"
    token_file.write_text(TOKEN + "\n")
    overrides = copy.deepcopy(FAST)
    overrides["AngioNode"]["Transport"] = transport
    overrides["AngioNode"]["NodeApiTokenFile"] = str(token_file)
    # Orthanc's STOW-RS client sends the headers of the server's definition
    overrides["DicomWeb"] = {
        "Servers": {"angio-node": {"HttpHeaders": {"Authorization": f"Bearer {TOKEN}"}}}
    }
    pacs = start_orthanc(
        tmp_path,
        with_plugin=True,
        overrides=overrides,
        node={
            "aet": NODE_AET,
            "port": node_port,
            "api_url": f"http://127.0.0.1:{api_port}",
            "dicomweb_url": f"http://127.0.0.1:{api_port}/dicom-web/",
        },
    )
    node = _node_with_tokens(tmp_path / "node", pacs, node_port, api_port, transport)
    try:
        assert node.auth.enabled
        status = pacs.get("/angio-node/status").json()
        assert status["node"]["status"] == "ok", status
        if transport == "dicomweb":
            run = xa_run(frames=4, seed=12)
            storescu(pacs, save(run, tmp_path / "in"))
        else:  # a series: forwarded on the stable-series event, then /trigger with the token
            series = single_frame_series(4)
            run = series[0]
            storescu(pacs, *[save(ds, tmp_path / "in", f"{i}.dcm") for i, ds in enumerate(series)])

        (fw,) = wait_for("the forward delivered", lambda: forwards(pacs, state="sent"), 60)
        wait_for("results back in Orthanc", lambda: result_series(pacs, str(run.StudyInstanceUID)))
        fw = wait_for(
            "the node's jobs shown with the forward (GET /jobs with the token)",
            lambda: [f for f in forwards(pacs) if f.get("node_jobs")],
        )[0]
        assert "node_error" not in fw, fw
        rows = node.db.query("SELECT DISTINCT calling_aet, sender FROM instances")
        assert [r["calling_aet"] for r in rows] == ["ORTHANC"]  # C-STORE AE or token name
        # the suite that sent the run to Orthanc, named with the token's header (STOW-RS)
        assert [r["sender"] for r in rows] == ["ANGIO_SUITE"]
        audit = (node.settings.storage_dir / "audit" / "audit.jsonl").read_text()
        assert '"api-denied"' not in audit
        if transport == "dimse":
            assert '"path": "/trigger"' in audit and '"who": "ORTHANC"' in audit
        else:
            assert '"transport": "stow"' in audit
    finally:
        node.stop()
        pacs.stop()


@needs_orthanc
def test_a_token_the_node_refuses_is_what_the_plugin_status_says(tmp_path: Path) -> None:
    """A plugin token the node does not take (mistyped, or revoked): ``/health`` needs
    none, so the plugin's status said the node was ok, while every trigger, every
    ``node_jobs`` and every reprocess was refused. It now says ``refused`` and what to
    check; the token file put right is read again without a restart of Orthanc."""
    node_port, api_port = free_port(), free_port()
    token_file = tmp_path / "node-token"
    token_file.write_text("not-the-token-the-node-knows\n")
    overrides = copy.deepcopy(FAST)
    overrides["AngioNode"]["NodeApiTokenFile"] = str(token_file)
    pacs = start_orthanc(
        tmp_path,
        with_plugin=True,
        overrides=overrides,
        node={"aet": NODE_AET, "port": node_port, "api_url": f"http://127.0.0.1:{api_port}"},
    )
    node = _node_with_tokens(tmp_path / "node", pacs, node_port, api_port, "dimse")
    try:
        node_status = pacs.get("/angio-node/status").json()["node"]
        assert node_status["status"] == "refused", node_status
        assert "401" in node_status["error"] and "NodeApiToken" in node_status["error"]
        # Put right (or a token rotated): read again when it changes, with no restart of
        # Orthanc (it was read when Orthanc started only)
        token_file.write_text(TOKEN + "\n")
        wait_for(
            "the plugin to use the token put right",
            lambda: pacs.get("/angio-node/status").json()["node"]["status"] == "ok",
            30,
        )
    finally:
        node.stop()
        pacs.stop()
