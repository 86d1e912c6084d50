"""docs/conformance.md, the DICOM conformance statement, against the code: the SOP
classes and transfer syntaxes the node accepts, and the objects it creates, both ways
(a class the node accepts or creates and the statement leaves out fails, as does one
the statement names that the node does not)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydicom.uid import UID, KeyObjectSelectionDocumentStorage

from dicom_node.encode import EncodeContext, encode_result
from dicom_node.runs import load_run
from dicom_node.scp import make_ae
from dicom_node.settings import load_settings
from dicom_node.sopclasses import ACCEPTED_SOP_CLASSES, TRANSFER_SYNTAXES

STATEMENT = Path(__file__).resolve().parents[1] / "docs" / "conformance.md"
# a table row's cells: a name, then a UID
ROW = re.compile(r"\| ([^|\n]+?) \| ([0-9]+(?:\.[0-9]+)+) \|")


def _section(title: str) -> str:
    text = STATEMENT.read_text()
    start = text.index(title)
    end = text.find("\n#", start + len(title))
    return text[start : end if end > 0 else None]


def _rows(text: str) -> dict[str, str]:
    """UID -> name of the table rows ``| name | UID |`` in ``text``."""
    return {uid: name for name, uid in ROW.findall(text)}


def test_the_storage_classes_and_syntaxes_are_what_the_scp_accepts(tmp_path: Path) -> None:
    section = _section("### 3.1 Storage SOP classes")
    tables = section.split("\n\n| transfer syntax")
    classes, syntaxes = _rows(tables[0]), _rows(tables[1])
    assert set(classes) == set(ACCEPTED_SOP_CLASSES)
    assert list(syntaxes) == list(TRANSFER_SYNTAXES)  # in the node's order
    for uid, name in classes.items():
        assert f"{name} Storage" == UID(uid).name, uid
    for uid, name in syntaxes.items():
        assert name == UID(uid).name, uid
    # the services of section 1: what the running SCP is given, and nothing else
    services = _rows(_section("## 1. Network services"))
    settings = load_settings(None, environ={}, storage_dir=str(tmp_path))
    supported = {str(cx.abstract_syntax) for cx in make_ae(settings).supported_contexts}
    assert supported == set(services) | set(classes)
    for uid, name in services.items():
        assert name == UID(uid).name, uid


@pytest.mark.slow
def test_the_objects_created_are_the_kinds_the_pipelines_write(tmp_path: Path) -> None:
    """Every kind of result the pipelines write (the three that between them write
    every kind, on small phantoms), and the node's rejection note."""
    from pipelines.base import PipelineContext, get
    from training.phantoms import coronary, dsa, rotational

    runs = {
        "dsa_perfusion": [
            p for p in dsa.generate(21, size=96, frames=12).write(tmp_path) if p.name == "dsa.dcm"
        ],
        "xa_coronary": [
            p
            for p in coronary.generate(3, size=96, frames=10).write(tmp_path / "c")
            if p.suffix == ".dcm"
        ][:1],
        "rotational_dla": sorted(
            (
                rotational.generate(4, size=48).write(tmp_path / "r")[0].parent / "rotational_ct"
            ).glob("*.dcm")
        ),
    }
    made = {str(KeyObjectSelectionDocumentStorage)}  # dicom_node.encode.rejection
    for pipeline, files in runs.items():
        loaded = load_run(files)
        result = get(pipeline)(loaded.run, PipelineContext())
        made |= {
            str(ds.SOPClassUID)
            for ds in encode_result(result, loaded.run, EncodeContext(loaded.headers, pipeline))
        }
    listed = _rows(_section("## 5. Objects created"))
    assert set(listed) == made
    for uid, name in listed.items():
        assert name == UID(uid).name.removesuffix(" Storage"), uid
