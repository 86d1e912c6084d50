"""Result UIDs follow the content: the same source, pipeline, algorithm, package and
settings give the same UIDs (an idempotent re-run); a different package (name,
version or weights), algorithm version, option or device gives new UIDs and a new
series that names the one it supersedes. Across reprocessing with other packages
and settings, no UID ever stands for two different contents."""

from __future__ import annotations

import hashlib
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from dicom_node.encode import encode_result
from dicom_node.encode.common import (
    EncodeContext,
    PackageIdentity,
    PriorResult,
    Provenance,
)
from dicom_node.processing import run_pipeline, write_dataset
from dicom_node.runs import load_run
from pipelines.base import (
    ARTERY,
    ICA,
    AlgorithmInfo,
    Code,
    Measurement,
    MeasurementsOutput,
    PipelineResult,
    RenderingOutput,
    Run,
    RunMeta,
    Segment,
    SegmentationOutput,
)
from tests.conftest import dciodvfy_errors
from tests.dicomgen import xa_run
from tests.test_sandbox import _tiny_package

NOW = datetime(2024, 5, 6, 7, 8, 9)
LATER = datetime(2024, 6, 1, 10, 11, 12)
CLASSICAL = AlgorithmInfo("dsa_av", "1.0.0", "classical")
MODEL = AlgorithmInfo("dsa_av", "1.0.0", "model", model_package="tiny", model_version="1")
PACKAGE = PackageIdentity("tiny", "1", "ab" * 32)
SECOND = Code("s", "UCUM", "second")


def _header() -> Dataset:
    ds = xa_run(frames=6, rows=32, cols=32, seed=1)
    del ds.PixelData
    return ds


def _run() -> Run:
    meta = RunMeta("XA", "1.2.840.10008.5.1.4.1.1.12.1", 32, 32, 6, pixel_spacing_mm=(0.3, 0.3))
    return Run(np.zeros((6, 32, 32), np.float32), meta)


def _result(algorithm: AlgorithmInfo, seed: int = 0) -> PipelineResult:
    """A SEG, a rendering and a measurement report on the canvas."""
    rng = np.random.default_rng(seed)
    mask = rng.random((1, 32, 32)) < 0.2
    return PipelineResult(
        outputs=[
            SegmentationOutput("av", mask, [Segment("Artery", ARTERY)], algorithm),
            RenderingOutput("overlay", np.zeros((32, 32, 3), np.uint8), "Artery overlay"),
            MeasurementsOutput(
                "aif",
                "AIF",
                [Measurement(Code("126371", "DCM", "Bolus Arrival Time"), 1.5, SECOND)],
                algorithm,
                finding_site=ICA,
                region=mask[0],
            ),
        ]
    )


def _encode(algorithm: AlgorithmInfo = CLASSICAL, **ctx: Any) -> list[Dataset]:
    header = ctx.pop("header", None) or _header()
    context = EncodeContext(sources=[header], pipeline="dsa_av", now=ctx.pop("now", NOW), **ctx)
    return encode_result(_result(algorithm), _run(), context)


def _uids(datasets: list[Dataset]) -> dict[str, tuple[str, str]]:
    """Series description (without a supersession note) -> (series UID, SOP UID)."""
    return {
        str(d.SeriesDescription).split(" (replaces")[0]: (
            str(d.SeriesInstanceUID),
            str(d.SOPInstanceUID),
        )
        for d in datasets
    }


def test_same_inputs_same_uids_at_any_time() -> None:
    header = _header()
    first = _encode(header=header)
    again = _encode(header=header, now=LATER)
    assert _uids(first) == _uids(again)
    assert [str(d.SeriesDescription) for d in again] == [str(d.SeriesDescription) for d in first]


@pytest.mark.parametrize(
    "change",
    [
        {"algorithm": MODEL, "package": PACKAGE},
        {"algorithm": MODEL, "package": PackageIdentity("tiny", "2", "ab" * 32)},
        {"algorithm": MODEL, "package": PackageIdentity("tiny", "1", "cd" * 32)},
        {"algorithm": AlgorithmInfo("dsa_av", "1.1.0", "classical")},
        {"options": {"threshold": 0.4}},
        {"device": "cuda:0"},
    ],
    ids=["model", "package-version", "weights", "algorithm-version", "option", "device"],
)
def test_anything_else_new_uids_except_the_canvas(change: dict[str, Any]) -> None:
    header = _header()
    base = _uids(_encode(header=header, package=PACKAGE))  # a package configured, not used
    other = _uids(_encode(header=header, **change))
    assert base["AI MinIP"] == other["AI MinIP"]  # the canvas depends on the source only
    for description in ("AI av segmentation", "AI Artery overlay", "AI AIF"):
        assert base[description][0] != other[description][0], description
        assert base[description][1] != other[description][1], description


def test_provenance_key_ignores_order_and_the_unused_package() -> None:
    a = Provenance("p", (CLASSICAL, MODEL), PACKAGE, {"x": 1, "y": 2})
    b = Provenance("p", (MODEL, CLASSICAL), PACKAGE, {"y": 2, "x": 1})
    assert a.key() == b.key()
    classical = EncodeContext(sources=[_header()], pipeline="dsa_av", package=PACKAGE)
    classical.algorithms = (CLASSICAL,)
    assert classical.provenance.package is None  # no model made it: the package is no input
    classical.algorithms = (MODEL,)
    assert classical.provenance.package == PACKAGE


def _written(datasets: list[Dataset], folder: Path) -> list[Path]:
    return [write_dataset(d, folder) for d in datasets]


def test_a_new_series_names_the_one_it_supersedes(tmp_path: Path) -> None:
    header = _header()
    old = _encode(header=header)
    paths = _written(old, tmp_path / "old")
    prior = [PriorResult.from_header(dcmread(p, stop_before_pixels=True)) for p in paths]
    new = _encode(MODEL, header=header, package=PACKAGE, prior=prior, now=LATER)
    old_by, new_by = _uids(old), _uids(new)
    for ds in new:
        base = str(ds.SeriesDescription).split(" (replaces")[0]
        if base == "AI MinIP":
            assert new_by[base] == old_by[base] and "replaces" not in ds.SeriesDescription
            continue
        replaced = old_by[base][0]
        assert new_by[base][0] != replaced
        assert ds.SeriesDescription.endswith("(replaces 2024-05-06 07:08:09)"), ds.SeriesDescription
        assert len(ds.SeriesDescription) <= 64
        if ds.Modality == "SR":
            (study,) = ds.PredecessorDocumentsSequence
            (series,) = study.ReferencedSeriesSequence
            assert series.SeriesInstanceUID == replaced
            assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == old_by[base][1]
        else:
            assert f"Supersedes series {replaced}" in ds.ImageComments
    for path in _written(new, tmp_path / "new"):
        assert dciodvfy_errors(path) == [], path

    # The model's result again, both versions known: the same objects as the first time
    # (a UID never names two contents), naming the classical result as before.
    prior += [PriorResult.from_header(d) for d in new]
    again = _encode(MODEL, header=header, package=PACKAGE, prior=prior, now=datetime(2024, 7, 1))
    assert _uids(again) == new_by
    assert [d.SeriesDescription for d in again] == [d.SeriesDescription for d in new]
    # Back to the classical settings: the first UIDs, so the first content too (the PACS
    # has those objects already), not a note that would change them.
    back = _encode(header=header, prior=prior, now=datetime(2024, 7, 1))
    assert _uids(back) == old_by
    assert [d.SeriesDescription for d in back] == [d.SeriesDescription for d in old]
    assert not any("ImageComments" in d or "PredecessorDocumentsSequence" in d for d in back)


def _fingerprint(ds: Dataset) -> str:
    """The content of an object, without its creation dates and times."""
    digest = hashlib.sha256()

    def walk(item: Dataset) -> None:
        for elem in item:
            if elem.VR in ("DA", "TM", "DT"):
                continue
            digest.update(str(elem.tag).encode())
            if elem.VR == "SQ":
                for child in elem.value:
                    walk(child)
            else:
                value = elem.value
                digest.update(value if isinstance(value, bytes) else repr(value).encode())

    walk(ds)
    return digest.hexdigest()


def test_no_uid_names_two_contents_across_packages_and_settings(tmp_path: Path) -> None:
    """dsa_ia through the node's run_pipeline: classical, two packages, the first again,
    the same package rewritten with other weights. Every UID seen maps to one content."""
    from training.phantoms import dsa

    written = dsa.generate(5, size=64, frames=8).write(tmp_path / "run")
    loaded = load_run([next(p for p in written if p.name == "dsa.dcm")])
    pkg0 = _tiny_package(tmp_path / "pkg0", seed=0)
    pkg1 = _tiny_package(tmp_path / "pkg1", seed=1)
    swapped = _tiny_package(tmp_path / "swapped", seed=0)
    other = _tiny_package(tmp_path / "other", seed=2)
    for name in ("weights.pt", "package.json"):  # same name and version, new weights
        (swapped / name).write_bytes((other / name).read_bytes())
    (swapped / "package.json").write_text(
        (swapped / "package.json").read_text().replace('"version": "2"', '"version": "0"')
    )
    seen: dict[str, str] = {}
    series: list[set[str]] = []
    delivered: list[Path] = []  # what the job engine hands over: earlier jobs' files
    runs = ({}, {"dsa_ia": pkg0}, {"dsa_ia": pkg1}, {"dsa_ia": pkg0}, {}, {"dsa_ia": swapped})
    for job, models in enumerate(runs):
        datasets, _ = run_pipeline(loaded, "dsa_ia", models, "cpu", prior_results=delivered)
        delivered += _written(datasets, tmp_path / f"job{job}")
        for ds in datasets:
            content = _fingerprint(ds)
            assert seen.setdefault(str(ds.SOPInstanceUID), content) == content, ds.SeriesDescription
        series.append({str(d.SeriesInstanceUID) for d in datasets if d.Modality != "OT"})
    classical, first, second, first_again, classical_again, new_weights = series
    assert first == first_again and classical == classical_again  # idempotent re-runs
    assert len({frozenset(s) for s in (classical, first, second, new_weights)}) == 4
    replaced = [d for d in datasets if "(replaces " in str(d.SeriesDescription)]
    assert replaced  # the last (new weights) names what it supersedes


@pytest.mark.parametrize("pipeline", ["dsa_perfusion", "xa_coronary", "rotational_dla"])
def test_every_superseding_object_kind_is_valid(tmp_path: Path, pipeline: str) -> None:
    """Parametric Maps, the SR, per-frame SEGs, cine renderings and CT volumes that
    supersede earlier ones: new UIDs, the note, and dciodvfy-clean."""
    from pipelines.base import PipelineContext, get
    from training.phantoms import coronary, dsa, rotational

    if pipeline == "dsa_perfusion":
        files = [
            p for p in dsa.generate(21, size=96, frames=12).write(tmp_path) if p.name == "dsa.dcm"
        ]
    elif pipeline == "xa_coronary":
        files = [
            p
            for p in coronary.generate(3, size=96, frames=10).write(tmp_path)
            if p.suffix == ".dcm"
        ][:1]
    else:
        folder = rotational.generate(4, size=48).write(tmp_path)[0].parent
        files = sorted((folder / "rotational_ct").glob("*.dcm"))
    loaded = load_run(files)
    result = get(pipeline)(loaded.run, PipelineContext())
    old = encode_result(result, loaded.run, EncodeContext(loaded.headers, pipeline, now=NOW))
    prior = [PriorResult.from_header(d) for d in old]
    ctx = EncodeContext(loaded.headers, pipeline, now=LATER, options={"changed": 1}, prior=prior)
    new = encode_result(result, loaded.run, ctx)
    old_uids = {str(d.SOPInstanceUID) for d in old}
    kinds = set()
    for ds, path in zip(new, _written(new, tmp_path / "new"), strict=True):
        canvas = "canvas" in str(ds.SeriesDescription).lower() or ds.SeriesNumber in (9000, 9001)
        assert (str(ds.SOPInstanceUID) in old_uids) == canvas, ds.SeriesDescription
        if not canvas:
            assert "(replaces 2024-05-06 07:08:09)" in ds.SeriesDescription
            kinds.add(ds.SOPClassUID.name)
        assert dciodvfy_errors(path) == [], (ds.SeriesDescription, path)
    expected = {
        "dsa_perfusion": {
            "Parametric Map Storage",
            "Comprehensive 3D SR Storage",
            "Segmentation Storage",
            "Secondary Capture Image Storage",
        },
        "xa_coronary": {
            "Segmentation Storage",
            "Multi-frame True Color Secondary Capture Image Storage",
            "Comprehensive 3D SR Storage",  # the quality report (pipelines.quality)
        },
        "rotational_dla": {
            "CT Image Storage",
            "Segmentation Storage",
            "Secondary Capture Image Storage",
            "Comprehensive 3D SR Storage",  # the quality report (pipelines.quality)
        },
    }[pipeline]
    assert kinds == expected, kinds
