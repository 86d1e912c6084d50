"""Results keep the source's Specific Character Set: a patient's name in Latin-1,
UTF-8 or ISO 2022 (Japanese) reads back the same from every kind of result
object, which dciodvfy passes. (Without it, names were written as bytes of no
declared set, and characters outside Latin-1 became '?'.)"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest
import torch
from pydicom import dcmread

from bench.perfusion import dsa_run
from dicom_node.encode import encode_result
from dicom_node.encode.common import EncodeContext
from pipelines.base import PipelineContext, get
from tests.conftest import dciodvfy_errors
from tests.dicomgen import xa_run

torch.set_num_threads(1)
# Parametric Map, SEG, SR, Secondary Capture and the multi-frame canvas.
KINDS = {
    "1.2.840.10008.5.1.4.1.1.30",
    "1.2.840.10008.5.1.4.1.1.66.4",
    "1.2.840.10008.5.1.4.1.1.88.34",
    "1.2.840.10008.5.1.4.1.1.7",
    "1.2.840.10008.5.1.4.1.1.7.3",
}


@pytest.fixture(scope="module")
def perfusion():  # type: ignore[no-untyped-def]
    synthetic = dsa_run(
        11, fps=2.0, snr=40.0, cbfs=(0.01, 0.02), mtts=(3.0, 5.0), delays=(0.0, 2.0)
    )
    return synthetic.run, get("dsa_perfusion")(synthetic.run, PipelineContext())


@pytest.mark.parametrize(
    ("charset", "name", "description"),
    [
        ("ISO_IR 100", "Müller^Hans", "Angiographie cérébrale"),
        ("ISO_IR 192", "Müller^Hans=山田^太郎", "Angiografía cerebral"),
        (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎", "Angio"),
        ("ISO_IR 144", "Иванов^Иван", "Ангиография"),
        ("", "Doe^John", "Angio"),  # present, no value: left out (the default repertoire)
    ],
    ids=["latin-1", "utf-8", "iso-2022-jis", "cyrillic", "empty"],
)
def test_results_keep_the_source_s_character_set(  # type: ignore[no-untyped-def]
    perfusion, tmp_path: Path, charset, name, description
) -> None:
    run, result = perfusion
    frames, rows, cols = run.pixels.shape
    header = xa_run(frames=frames, rows=rows, cols=cols, frame_time_ms=500.0)
    del header.PixelData
    header.SpecificCharacterSet = charset
    header.PatientName, header.StudyDescription = name, description
    ctx = EncodeContext(sources=[header], pipeline="dsa_perfusion", now=datetime(2026, 1, 2))
    datasets = encode_result(result, run, ctx)
    assert {str(ds.SOPClassUID) for ds in datasets} == KINDS
    for i, ds in enumerate(datasets):
        path = tmp_path / f"{i:02d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        back = dcmread(path)
        assert back.get("SpecificCharacterSet", "") == charset, ds.SOPClassUID
        assert (str(back.PatientName), back.StudyDescription) == (name, description)
        assert dciodvfy_errors(path) == [], (ds.SOPClassUID, path)


def test_a_patient_name_of_one_component_is_copied_without_a_warning(  # type: ignore[no-untyped-def]
    perfusion, recwarn
) -> None:
    """'ANONYMOUS' (one component, as most de-identified runs have) is copied as it
    is, without highdicom's warning for each result object in the job's log."""
    run, result = perfusion
    frames, rows, cols = run.pixels.shape
    header = xa_run(frames=frames, rows=rows, cols=cols, frame_time_ms=500.0)
    del header.PixelData
    header.PatientName = "ANONYMOUS"
    ctx = EncodeContext(sources=[header], pipeline="dsa_perfusion", now=datetime(2026, 1, 2))
    datasets = encode_result(result, run, ctx)
    assert {str(ds.PatientName) for ds in datasets} == {"ANONYMOUS"}
    assert not [w for w in recwarn if "person name" in str(w.message)]


@pytest.mark.parametrize(
    "charset", ["", "ISO_IR 999", "\\ISO 2022 IR 87"], ids=["empty", "unknown", "iso-2022"]
)
def test_a_volume_s_results_keep_the_character_set_its_slices_declare(
    tmp_path: Path, charset: str
) -> None:
    """A volume's SEG and SR take the identity from its slices (there is no canvas),
    and highdicom refused an empty or unknown Specific Character Set there, which
    senders write: the rotational job failed. Every result is made, and carries the
    slices' Specific Character Set as they declare it; an empty one is left out (the
    default repertoire, as an empty one means: written back empty, dciodvfy found
    each result in error). Every result passes dciodvfy."""
    from dicom_node.processing import run_pipeline
    from dicom_node.runs import load_run
    from tests.faults import raw
    from training.phantoms import rotational

    written = rotational.generate(3, size=48).write(tmp_path / "ph")
    slices = sorted(p for p in written if p.parent.name == "rotational_ct")
    for path in slices:
        ds = dcmread(path)
        raw(ds, "SpecificCharacterSet", "CS", charset)
        ds.save_as(path)
    declared = dcmread(slices[0]).get("SpecificCharacterSet")
    datasets, _ = run_pipeline(load_run(slices), "rotational_dla", {}, "cpu")
    made = {str(ds.SOPClassUID) for ds in datasets}
    assert {"1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.88.34"} <= made
    for i, ds in enumerate(datasets):
        if charset:
            assert ds.get("SpecificCharacterSet") == declared, ds.SOPClassUID
        else:
            assert "SpecificCharacterSet" not in ds, ds.SOPClassUID
        path = tmp_path / f"result{i:02d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == [], (ds.SOPClassUID, path)
