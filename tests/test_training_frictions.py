"""Small frictions on the way from phantoms to a package the node uses: uploading the
``synth`` output (``--send`` and the documented storescu line), ``[models]`` paths relative
to the settings file, and a package for another pipeline refused when settings load."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dicom_node.errors import ConfigError
from dicom_node.settings import load_settings
from tests.orthanc_fixture import missing_parts, start_orthanc
from tests.tiny_package import tiny_package

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def dsa_ia_package(tmp_path: Path) -> Path:
    return tiny_package(tmp_path / "pkg" / "dsa_ia-tiny", "dsa_ia", "dsa_ia-tiny")


def test_models_paths_are_relative_to_the_settings_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dsa_ia_package: Path
) -> None:
    shutil.copytree(dsa_ia_package, tmp_path / "site" / "models" / "ia")
    conf = tmp_path / "site" / "conf"
    conf.mkdir()
    (conf / "node.toml").write_text('[models]\ndsa_ia = "../models/ia"\n')
    monkeypatch.chdir(tmp_path)  # not the file's folder
    settings = load_settings(conf / "node.toml", environ={})
    assert settings.models["dsa_ia"].resolve() == (tmp_path / "site" / "models" / "ia").resolve()
    # Absolute paths stay as they are; keyword overrides stay relative to the caller.
    (conf / "abs.toml").write_text(f'[models]\ndsa_ia = "{dsa_ia_package}"\n')
    assert load_settings(conf / "abs.toml", environ={}).models["dsa_ia"] == dsa_ia_package


def test_a_package_that_cannot_be_used_is_refused_when_settings_load(
    tmp_path: Path, dsa_ia_package: Path
) -> None:
    """A package is checked at the start as a worker reads it: before, only its declared
    pipeline was, and a corrupt weights.pt, a missing file or another format failed
    every job of its pipeline while the node ran."""
    with pytest.raises(ConfigError, match=r"models.dsa_av: .* is for pipeline 'dsa_ia'"):
        load_settings(None, environ={}, models={"dsa_av": str(dsa_ia_package)})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="models.dsa_ia: .* incomplete: missing package.json"):
        load_settings(None, environ={}, models={"dsa_ia": str(tmp_path / "empty")})

    def broken(name: str, change: Any) -> str:
        folder = tmp_path / name
        shutil.copytree(dsa_ia_package, folder)
        change(folder)
        return str(folder)

    def flip_a_byte(folder: Path) -> None:
        with (folder / "weights.pt").open("r+b") as f:
            f.seek(1000)
            byte = f.read(1)
            f.seek(1000)
            f.write(bytes([byte[0] ^ 0xFF]))

    def format_2(folder: Path) -> None:
        meta = json.loads((folder / "package.json").read_text())
        (folder / "package.json").write_text(json.dumps({**meta, "format": 2}))

    for change, reason in [
        (flip_a_byte, "weights.pt has SHA-256 .* \\(corrupt or replaced weights\\)"),
        (lambda f: (f / "metrics.json").unlink(), "incomplete: missing metrics.json"),
        (lambda f: (f / "data.json").write_text("{"), "data.json|cannot be read"),
        (format_2, "format 2 not supported"),
    ]:
        with pytest.raises(ConfigError, match=f"models.dsa_ia: .*{reason}"):
            load_settings(None, environ={}, models={"dsa_ia": broken(reason[:8], change)})
    assert load_settings(None, environ={}, models={"dsa_ia": str(dsa_ia_package)}).models


@pytest.mark.orthanc
def test_synth_output_uploads(tmp_path: Path) -> None:
    missing = missing_parts(with_plugin=False)
    if missing or shutil.which("storescu") is None:
        pytest.skip("needs Orthanc and dcmtk: " + "; ".join(missing))
    pacs = start_orthanc(tmp_path, with_plugin=False)
    try:
        synth = [sys.executable, "-m", "dicom_node.cli", "synth", "dsa", "--count", "2"]
        synth += ["--size", "64", "--frames", "4", "--seg"]
        out = subprocess.run(
            [*synth, "--output", str(tmp_path / "a"), "--send", f"127.0.0.1:{pacs.dicom_port}",
             "--aec", "ORTHANC"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-2000:]
        assert "sent 6 DICOM file(s)" in out.stdout
        assert len(pacs.get("/instances").json()) == 6  # runs, canvases, SEGs
        modalities = {pacs.get(f"/series/{s}").json()["MainDicomTags"]["Modality"]
                      for s in pacs.get("/series").json()}  # fmt: skip
        assert modalities == {"XA", "OT", "SEG"}
        # The documented dcmtk line on a synth folder (READMEs and .npz files beside them).
        out = subprocess.run([*synth, "--seed", "10", "--output", str(tmp_path / "b")],
                             capture_output=True, text=True, timeout=300)  # fmt: skip
        assert out.returncode == 0, out.stderr[-2000:]
        store = subprocess.run(
            ["storescu", "-aec", "ORTHANC", "+sd", "+r", "+sp", "*.dcm", "-R", "127.0.0.1",
             str(pacs.dicom_port), str(tmp_path / "b")],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert store.returncode == 0, store.stderr[-2000:]
        assert len(pacs.get("/instances").json()) == 12
        bad = subprocess.run([*synth, "--output", str(tmp_path / "c"), "--send", "nowhere"],
                             capture_output=True, text=True, timeout=300)  # fmt: skip
        assert bad.returncode == 2 and "HOST:PORT" in bad.stderr
    finally:
        pacs.stop()


def test_synth_into_an_output_it_cannot_write_or_with_no_frames_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--output`` a file: a traceback (NotADirectoryError) at the first run's write;
    ``--frames 0`` was taken for the default. Both are refused with the reason, exit 2."""
    from training.phantoms.cli import main

    (tmp_path / "a_file").write_text("x")
    out = str(tmp_path / "a_file")
    assert main(["dsa", "--output", out, "--size", "64", "--frames", "3"]) == 2
    assert f"synth: --output {out}: " in capsys.readouterr().err
    assert main(["dsa", "--output", str(tmp_path / "out"), "--size", "64", "--frames", "0"]) == 2
    assert "synth: --frames must be at least 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
