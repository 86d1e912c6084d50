"""The README's first command, ``dicom-node demo``, end to end: a local Orthanc, the
node, dcmtk storescu, three kinds of angiography, every job done."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node import dcmtk
from tests.orthanc_fixture import missing_parts

pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.skipif(
        bool(missing_parts(with_plugin=False)) or dcmtk.find("storescu") is None,
        reason="needs the Debian Orthanc packages and dcmtk",
    ),
]


def test_demo_runs_every_kind_of_angiography_to_orthanc(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from training.demo import run_demo

    assert run_demo(tmp_path / "demo") == 0
    out = capsys.readouterr().out
    assert "FAILED" not in out
    assert (
        "Jobs: {'done': 8}" in out
    )  # minip, dsa_av, dsa_perfusion x 2; xa_coronary; rotational_dla
    for description in (
        "AI Arteries and veins",
        "AI CBF Relative Regional Blood Flow",
        "AI Coronary vessels cine overlay",
        "AI DLA angiogram MIP",
    ):
        assert description in out, description
