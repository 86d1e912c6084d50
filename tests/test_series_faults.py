"""Volumes whose geometry is broken end as failed jobs that say which slice and which
attribute, never as an internal error, a crash or a retried "I/O error"
(``dicom_node.geometry``; the corpus is ``tests/series_faults.py``)."""

from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.datadict import dictionary_VR
from pydicom.uid import SegmentationStorage, generate_uid

from tests.conftest import corpus_seed, dciodvfy_errors, send_storescu, wait_for
from tests.faults import raw
from tests.series_faults import Case, corpus, run_header_corpus

# A refusal of these set-level breaks names what is wrong.
EXPECTED = {
    "a slice missing in the middle": "not evenly spaced",
    "a slice sent twice under two UIDs": "same position",
    "a slice of another SOP class": "1 instance(s) of another SOP Class than the run's (CT)",
    "slices a kilometre apart": "apart, more than",
    "one slice of another orientation": "another Image Orientation",
    "enhanced per-frame groups cut short": "Per-Frame Functional Groups",
    "enhanced no shared groups": "no Shared Functional Groups",
    "enhanced orientation per frame": "not shared by its frames",
    "enhanced FrameOfReferenceUID": "no Frame of Reference UID",
}
# These leave the geometry intact: the volume is processed.
GOOD = ("slices out of order, instance numbers scrambled",)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Any], Any]:
    from training.phantoms import rotational

    folder = tmp_path_factory.mktemp("phantom")
    written = rotational.generate(31, size=32).write(folder)
    series = [dcmread(p) for p in sorted((written[0].parent / "rotational_ct").glob("*.dcm"))]
    volume = dcmread(next(p for p in written if p.name == "rotational_3dxa.dcm"))
    return series, volume


@pytest.fixture(scope="module")
def geometry_corpus(phantom) -> list[Case]:  # type: ignore[no-untyped-def]
    """The broken-geometry corpus (built once: it takes seconds); tests only read it."""
    warnings.simplefilter("ignore")
    series, volume = phantom
    return corpus(series, volume, seed=corpus_seed(5), combinations=40)


def _write(datasets: list[Any], folder: Path, new_uids: bool = False) -> list[Path]:
    """Write the case's instances; ``new_uids``: as a series of its own (new series and
    instance UIDs), as each case is for the node."""
    folder.mkdir(parents=True)
    series_uid = generate_uid()
    paths = []
    for i, ds in enumerate(datasets):
        if new_uids:
            ds = copy.deepcopy(ds)
            ds.SeriesInstanceUID = series_uid
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = folder / f"{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=False)
        paths.append(path)
    return paths


# Identity a result keeps as the source has it, valid or not, so that it joins the
# source's patient and order in the PACS (README, "Behaviour on bad input").
KEPT_AS_SENT = (
    "Patient's Name",
    "<PatientName>",
    "Patient ID",
    "<PatientID>",
    "Issuer of Patient ID",
    "<IssuerOfPatientID>",
    "Accession Number",
    "<AccessionNumber>",
    "Study ID",
    "<StudyID>",
)


def _execute(case: Case, index: int, folder: Path, pipeline: str, valid: bool = False) -> Any:
    """The case through ``sandbox.execute`` (the worker process's own code path): its
    Outcome, checked to be done or failed with a reason, never a defect of the node.
    ``valid``: one result of each SOP Class passes dciodvfy too (but for what the
    source's identity carries into it: ``KEPT_AS_SENT``)."""
    from dicom_node.sandbox import JobSpec, execute

    paths = _write(case.datasets, folder / f"{index:03d}")
    out = folder / f"{index:03d}-out"
    out.mkdir()
    spec = JobSpec(index, f"run{index}", pipeline, tuple(map(str, paths)), str(out), "cpu")
    outcome = execute(spec, lambda stage: None)
    assert not outcome.transient, (case.name, outcome.error)
    if outcome.error is None:
        assert outcome.results, case.name
        if valid:
            for result in {r.sop_class_uid: r for r in outcome.results}.values():
                errors = [
                    e
                    for e in dciodvfy_errors(Path(result.path))
                    if not any(k in e for k in KEPT_AS_SENT) and "invalid data values" not in e
                ]
                assert errors == [], (case.name, result.description, errors)
    else:
        for defect in ("internal error", "crashed", "I/O error"):
            assert defect not in outcome.error, (case.name, outcome.error)
    return outcome


def test_broken_geometry_fails_with_a_reason_in_the_worker(  # type: ignore[no-untyped-def]
    geometry_corpus, tmp_path: Path
) -> None:
    """Every case through ``sandbox.execute``, the worker process's own code path."""
    warnings.simplefilter("ignore")  # pydicom warns about every invalid value it reads
    cases = geometry_corpus
    assert len(cases) >= 150
    outcomes: dict[str, str] = {}
    for i, case in enumerate(cases):
        outcome = _execute(case, i, tmp_path, "rotational_dla")
        outcomes[case.name] = outcome.error or "done"
        if outcome.error is None and case.name.startswith("series SliceThickness absent"):
            # given the slice step (dicom_node.geometry.fill_slice_thickness): valid
            seg = next(r for r in outcome.results if r.sop_class_uid == SegmentationStorage)
            assert dciodvfy_errors(Path(seg.path)) == []
    for name, text in EXPECTED.items():
        assert text in outcomes[name], (name, outcomes[name])
    for name in GOOD:
        assert outcomes[name] == "done", (name, outcomes[name])
    refused = sum(v != "done" for v in outcomes.values())
    print(f"{len(outcomes)} cases, {refused} refused with a reason, {len(outcomes) - refused} done")
    # Both kinds occur: the corpus is not all refusals (a check that refused everything
    # would pass the loop above) nor all successes.
    assert 0.3 * len(outcomes) < refused < len(outcomes)


def test_broken_series_sent_by_dcmtk_fail_with_the_reason_and_the_node_goes_on(  # type: ignore[no-untyped-def]
    phantom, make_node, tmp_path: Path
) -> None:
    """Through the node: storescu sends broken series and a good one; the broken ones'
    jobs fail at once (one attempt) with the geometry reason, the good one is done."""
    warnings.simplefilter("ignore")
    series, volume = phantom
    cases = {c.name: c for c in corpus(series, volume, seed=5, combinations=0)}
    chosen = [
        "a slice missing in the middle",
        "one slice of another orientation",
        "slices a kilometre apart",
        "slices out of order, instance numbers scrambled",
    ]
    node = make_node(
        completion={"quiet_period_s": 0.5},
        workers={"concurrency": 1, "max_attempts": 3},
    )
    for i, name in enumerate(chosen):
        send_storescu(
            node.settings.ae_title,
            node.port,
            _write(cases[name].datasets, tmp_path / str(i), new_uids=True),
        )

    def settled() -> list[Any] | None:
        jobs = node.db.query("SELECT run_id, state, attempts, error FROM jobs")
        done = len(jobs) == len(chosen) and all(j["state"] in ("done", "failed") for j in jobs)
        return jobs if done else None

    try:
        jobs = wait_for(settled, 120, interval=0.5, what="every job to end")
    except AssertionError:
        runs = [dict(r) for r in node.db.query("SELECT state, reason FROM runs")]
        print(runs, [dict(j) for j in node.db.query("SELECT * FROM jobs")])
        raise
    failed = sorted(j["error"] for j in jobs if j["state"] == "failed")
    assert len(failed) == 3 and all(j["attempts"] == 1 for j in jobs), [dict(j) for j in jobs]
    assert any("not evenly spaced" in e for e in failed), failed
    assert any("another Image Orientation" in e for e in failed), failed
    assert any("apart, more than" in e for e in failed), failed
    assert sum(j["state"] == "done" for j in jobs) == 1


def test_hostile_header_values_of_a_2d_run_never_become_internal_errors(tmp_path: Path) -> None:
    """Shutter, spacing, magnification, timing, positioner and mask-subtraction values
    a sender may get wrong (``run_header_corpus``), in native and subtracted DSA runs,
    through ``sandbox.execute`` with ``minip`` (decoding, the shutter, the canvas and
    its encoders): done, or failed with a reason; never an internal error."""
    from training.phantoms import dsa

    warnings.simplefilter("ignore")
    native_file = dsa.generate(9100, size=96, frames=16, native=True).write(tmp_path / "n")
    subtracted_file = dsa.generate(9101, size=96, frames=16).write(tmp_path / "s")
    native = dcmread(next(p for p in native_file if p.name == "native.dcm"))
    subtracted = dcmread(next(p for p in subtracted_file if p.name == "dsa.dcm"))
    cases = run_header_corpus(native, subtracted, seed=corpus_seed(3), per_attribute=4)
    assert len(cases) >= 60
    done = sum(_execute(case, i, tmp_path, "minip").error is None for i, case in enumerate(cases))
    # Most such defects are ignored (the attribute is treated as absent): the run is done.
    assert done > len(cases) // 2


def test_enhanced_xa_timing_from_per_frame_date_times(tmp_path: Path) -> None:
    """An Enhanced XA run timed by each frame's Frame Acquisition DateTime: perfusion
    uses those times (across midnight, with a UTC offset); out of order, equal or
    unreadable ones fail it with the frame number, while a MinIP, which needs no
    timing, is still done."""
    import datetime

    from dicom_node.runs import load_run
    from tests.series_faults import enhanced_xa
    from training.phantoms import dsa

    warnings.simplefilter("ignore")
    written = dsa.generate(9102, size=96, frames=16, fps=2.0).write(tmp_path / "s")
    source = dcmread(next(p for p in written if p.name == "dsa.dcm"))
    frames = int(source.NumberOfFrames)

    def stamps(start: datetime.datetime, offset: str = "") -> list[str | None]:
        return [
            (start + datetime.timedelta(seconds=k / 2.0)).strftime("%Y%m%d%H%M%S.%f") + offset
            for k in range(frames)
        ]

    good = stamps(datetime.datetime(2026, 12, 2, 23, 59, 57), "+0100")  # over midnight
    cases = {
        "good": (good, None),
        "reversed": (good[::-1], "do not increase at frame 2"),
        "two swapped": (good[:4] + [good[5], good[4]] + good[6:], "do not increase at frame 6"),
        "one unreadable": (good[:3] + ["abc"] + good[4:], "of frame 4 is missing or unreadable"),
        "one missing": (good[:7] + [None] + good[8:], "of frame 8 is missing or unreadable"),
    }
    for i, (name, (values, reason)) in enumerate(cases.items()):
        case = Case(name, [enhanced_xa(source, values)])
        assert _execute(case, 2 * i, tmp_path, "minip").error is None, name
        outcome = _execute(case, 2 * i + 1, tmp_path, "dsa_perfusion")
        if reason is None:
            assert outcome.error is None, outcome.error
            assert any("frames over 7.50 s" in n for n in outcome.notes), outcome.notes
            # the spacing, only in the shared Pixel Measures, is the run's
            paths = _write(case.datasets, tmp_path / "loaded")
            spacing = load_run(paths).run.meta.pixel_spacing_mm
            assert spacing == tuple(float(v) for v in source.ImagerPixelSpacing), spacing
        else:
            assert outcome.error is not None and reason in outcome.error, (name, outcome.error)


PIPELINES_2D = ("minip", "dsa_av", "dsa_ia", "dsa_perfusion", "xa_coronary")
# What these cases must say (a substring of the failed job's reason, or "done").
PIXEL_EXPECTED = {
    ("1 x 1 pixels, 16 frames", "dsa_perfusion"): "too small",
    ("96 x 1 pixels, 16 frames", "dsa_av"): "too small",
    ("3 x 400 pixels", "xa_coronary"): "too small",
    ("96 x 96 pixels, 3 frames", "dsa_ia"): "done",
    ("all zero", "dsa_av"): "no contrast",
    ("Rescale Slope 1e300, Intercept 0", "minip"): "not finite",
    ("Rescale Slope NaN, Intercept 0", "dsa_perfusion"): "not finite",
    ("Rescale Slope 1, Intercept 1e300", "xa_coronary"): "not finite",
    ("PALETTE COLOR without its table", "minip"): "Palette Color Lookup Table",
    ("RGB", "dsa_perfusion"): "done",
    ("RGB, planar", "dsa_av"): "done",
    ("YBR_FULL", "xa_coronary"): "done",
    ("MONOCHROME1", "dsa_perfusion"): "done",
    ("volume of 4 x 3 x 3", "rotational_dla"): "at least 5 needed",
    ("volume Rescale Slope 1e300, Intercept 0", "rotational_dla"): "not finite",
    ("volume noise", "rotational_dla"): "done",
}


def test_unusual_pixels_never_become_internal_errors(phantom, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Sizes, encodings, contents and rescales a pipeline cannot expect
    (``tests/pixel_faults.py``), every 2D case through every 2D pipeline (a random
    combination through one, in turn) and every volume through ``rotational_dla``, in
    ``sandbox.execute``: done, or failed with a
    reason; never an internal error (a 1-pixel-wide run failed perfusion as one, a
    Rescale Slope of 1e300 failed the rotational path, an RGB run became three times
    as many scrambled frames)."""
    from tests.pixel_faults import run_corpus, volume_corpus
    from training.phantoms import dsa

    warnings.simplefilter("ignore")
    written = dsa.generate(9103, size=96, frames=16).write(tmp_path / "s")
    source = dcmread(next(p for p in written if p.name == "dsa.dcm"))
    series, _ = phantom
    seed = corpus_seed(7)
    cases = run_corpus(source, seed=seed, random_cases=30)
    jobs = [(c, p) for c in cases if not c.name.startswith("random") for p in PIPELINES_2D]
    # each random combination through one pipeline, in turn
    randoms = [c for c in cases if c.name.startswith("random")]
    jobs += [(c, PIPELINES_2D[k % len(PIPELINES_2D)]) for k, c in enumerate(randoms)]
    jobs += [(c, "rotational_dla") for c in volume_corpus(series, seed=seed)]
    outcomes = {}
    for i, (case, pipeline) in enumerate(jobs):
        outcome = _execute(case, i, tmp_path, pipeline)
        outcomes[case.name, pipeline] = outcome.error or "done"
    for key, text in PIXEL_EXPECTED.items():
        assert text in outcomes[key], (key, outcomes[key])
    refused = sum(v != "done" for v in outcomes.values())
    print(f"{len(outcomes)} jobs, {refused} refused with a reason, {len(outcomes) - refused} done")
    assert 0.2 * len(outcomes) < refused < 0.8 * len(outcomes)


def test_a_colour_run_is_read_as_its_luminance(tmp_path: Path) -> None:
    """RGB (either planar configuration) is read as one grey frame per frame, BT.601
    luma; before, its samples were read as three times as many frames."""
    from dicom_node.runs import load_run
    from tests.pixel_faults import colour_case
    from training.phantoms import dsa

    written = dsa.generate(9104, size=64, frames=6).write(tmp_path / "s")
    source = dcmread(next(p for p in written if p.name == "dsa.dcm"))
    grey = (source.pixel_array >> 4).astype(np.float32)
    expected = 0.299 * grey + 0.587 * np.floor(grey / 2) + 0.114 * (255 - grey)
    for planar in (0, 1):
        paths = _write(colour_case("RGB", source, planar).datasets, tmp_path / f"rgb{planar}")
        run = load_run(paths).run
        assert run.pixels.shape == grey.shape
        np.testing.assert_allclose(run.pixels, expected, atol=1e-3)


def test_a_modality_lut_is_applied_and_one_that_cannot_be_is_named(tmp_path: Path) -> None:
    """A Modality LUT Sequence maps stored values to the run's (here an inverting 12-bit
    LUT); one without its LUT Data or Descriptor, or whose data does not fit its
    descriptor, fails the run naming the sequence (it said "KeyError: (0028,3006)")."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    from dicom_node.errors import RunError
    from dicom_node.runs import load_run
    from training.phantoms import dsa

    written = dsa.generate(9106, size=64, frames=6).write(tmp_path / "s")
    source = dcmread(next(p for p in written if p.name == "dsa.dcm"))
    stored = source.pixel_array.astype(np.float32)
    assert stored.max() < 4096

    def with_lut(descriptor: list[int] | None, data: list[int] | None) -> Path:
        ds = source.copy()
        item = Dataset()
        if descriptor is not None:
            item.LUTDescriptor = descriptor
        if data is not None:
            item.add_new("LUTData", "OW", np.asarray(data, "<u2").tobytes())
        item.ModalityLUTType = "OD"
        ds.ModalityLUTSequence = Sequence([item])
        for key in ("RescaleSlope", "RescaleIntercept"):
            ds.pop(key, None)
        folder = tmp_path / f"lut{len(list(tmp_path.iterdir()))}"
        return _write([ds], folder)[0]

    run = load_run([with_lut([4096, 0, 16], list(range(4095, -1, -1)))]).run
    np.testing.assert_array_equal(run.pixels, 4095 - stored)
    for descriptor, data, named in (
        ([4096, 0, 16], None, "it has no LUTData"),
        (None, [1, 2], "it has no LUTDescriptor"),
        ([4096, 0, 16], list(range(10)), "cannot be applied (error: unpack requires"),
    ):
        with pytest.raises(RunError, match="Modality LUT Sequence of .* cannot be applied") as e:
            load_run([with_lut(descriptor, data)])
        assert named in str(e.value), str(e.value)


def test_an_enhanced_run_s_pixel_value_transformation_is_applied_or_left_out(
    tmp_path: Path,
) -> None:
    """An Enhanced XA's rescale is its Pixel Value Transformation functional group, shared
    or per frame (each frame's over the shared one). One that cannot be read as a number
    (empty, text, several values) is left out, as a top-level Rescale Slope is: the run
    failed with "TypeError: float() argument must be ... not 'NoneType'"."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    from dicom_node.runs import load_run
    from tests.faults import raw
    from tests.series_faults import enhanced_xa
    from training.phantoms import dsa

    written = dsa.generate(9107, size=64, frames=6).write(tmp_path / "s")
    source = dcmread(next(p for p in written if p.name == "dsa.dcm"))
    stored = source.pixel_array.astype(np.float32)
    stamps = [f"20260101120000.{k * 5:02d}" for k in range(6)]

    def group(slope: str, intercept: str) -> Sequence:
        item = Dataset()
        raw(item, "RescaleSlope", "DS", slope)
        raw(item, "RescaleIntercept", "DS", intercept)
        return Sequence([item])

    def pixels(shared: tuple[str, str] | None, frame_3: tuple[str, str] | None) -> Any:
        ds = enhanced_xa(source, stamps)
        if shared is not None:
            ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence = group(*shared)
        if frame_3 is not None:
            ds.PerFrameFunctionalGroupsSequence[3].PixelValueTransformationSequence = group(
                *frame_3
            )
        folder = tmp_path / f"e{len(list(tmp_path.iterdir()))}"
        return load_run(_write([ds], folder)).run.pixels

    expected = 2 * stored + 10
    expected[3] = stored[3]
    np.testing.assert_allclose(pixels(("2", "10"), ("1", "0")), expected)
    for hostile in ("", "abc", "1\\2\\3"):
        np.testing.assert_allclose(pixels((hostile, "0"), None), stored)
        # frame 3's own group left out: the shared one applies to it too
        np.testing.assert_allclose(pixels(("2", "10"), ("1", hostile)), 2 * stored + 10)


def test_a_run_s_headers_read_together_are_its_headers_read_one_by_one(  # type: ignore[no-untyped-def]
    geometry_corpus,
) -> None:
    """``runs._strip_all`` takes an element whose bytes it already read and checked in
    another instance of the run without checking it again: over broken series (a
    hostile value in some of the slices), every header it gives holds the same
    elements with the same values as that instance's header read alone."""
    from pydicom.filebase import DicomBytesIO

    from dicom_node.runs import _strip, _strip_all

    warnings.simplefilter("ignore")
    cases = [c for c in geometry_corpus if len(c.datasets) > 1]
    rng = np.random.default_rng(7)
    chosen = [cases[int(i)] for i in rng.choice(len(cases), 30, replace=False)]

    def values(header: Any) -> dict[Any, str]:
        return {tag: repr(header[tag].value) for tag in header.keys()}

    dropped_somewhere = 0
    for case in chosen:
        blobs = []
        for ds in case.datasets:
            buffer = DicomBytesIO()
            ds.save_as(buffer, enforce_file_format=False)
            blobs.append(buffer.getvalue())
        together = _strip_all([dcmread(DicomBytesIO(b)) for b in blobs])
        read = [dcmread(DicomBytesIO(b)) for b in blobs]
        for a, ds in zip(together, read, strict=True):
            alone = _strip(ds)
            assert values(a) == values(alone), case.name
            dropped_somewhere += len(ds) - 1 > len(alone)  # more left out than Pixel Data
    # the corpus's hostile values are dropped in some of these headers (a check that
    # compared only clean headers would pass the loop above)
    assert dropped_somewhere > 0


def test_a_series_timed_by_its_instances_may_cross_midnight(tmp_path: Path) -> None:
    """Single-frame instances timed by Acquisition Time (no date in a TM): a run that
    starts before midnight and ends after it keeps its times; a clock that goes back
    is still refused, with the reason."""
    from pydicom.uid import generate_uid

    from dicom_node.runs import load_run
    from tests.dicomgen import save, xa_run

    def series(times: list[str], dates: list[str] | None = None) -> list[Path]:
        series_uid, study_uid = generate_uid(), generate_uid()
        folder = tmp_path / series_uid
        paths = []
        for i, t in enumerate(times):
            ds = xa_run(frames=1, series_uid=series_uid, study_uid=study_uid, seed=i)
            ds.InstanceNumber = i + 1
            ds.AcquisitionTime = t
            if dates is not None:
                ds.AcquisitionDate = dates[i]
            paths.append(save(ds, folder))
        return paths

    over = ["235958.5", "235959.0", "235959.5", "000000.0", "000000.5", "000001"]
    for dates in (None, ["20261205"] * 3 + ["20261206"] * 3):
        meta = load_run(series(over, dates)).run.meta
        assert meta.extra["timing_problem"] == "", (dates, meta.extra["timing_problem"])
        assert np.allclose(meta.frame_times_s, [0, 0.5, 1, 1.5, 2, 2.5]), meta.frame_times_s
    for times, dates in (
        (["120000", "120001", "115959", "120003"], None),
        (over, ["20261205"] * 4 + ["20261206"] * 2),  # the date says the clock went back
    ):
        back = load_run(series(times, dates)).run.meta
        assert (
            back.frame_times_s is None and "not in instance order" in back.extra["timing_problem"]
        )


def test_instances_that_are_not_of_a_series_run_are_left_out_with_a_note(
    make_node: Any, tmp_path: Path
) -> None:
    """A screen capture stored into an XA series (first, even) and a CT localizer
    stored with its slices: the run is made of the series' instances of its SOP Class
    (the most common), without a volume's localizers; the router reads that class's
    header, and the job's notes say what was left out. (The capture became a frame
    of the run, and routed the run when it came first: unrouted, 'no rule matched';
    the localizer failed the volume for its orientation.)"""
    import copy
    import subprocess
    import sys

    from pydicom.uid import SecondaryCaptureImageStorage

    from dicom_node.runs import load_run
    from tests.dicomgen import ct_series, save, xa_run
    from tests.test_ingest import _send

    series_uid, study_uid = generate_uid(), generate_uid()
    instances = []
    for i in range(6):
        ds = xa_run(frames=1, series_uid=series_uid, study_uid=study_uid, seed=i)
        ds.InstanceNumber = i + 1
        ds.AcquisitionTime = f"1200{i:02d}"
        if i == 0:  # a capture of the screen, stored into the series first
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
            ds.Modality = "OT"
        instances.append(ds)
    loaded = load_run([save(ds, tmp_path / "xa") for ds in instances])
    assert loaded.run.pixels.shape[0] == 5 and len(loaded.headers) == 5
    note = "left out of the run: 1 instance(s) of another SOP Class than the run's (XA)"
    assert loaded.run.meta.extra["left_out"] == note
    route = subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", "route", str(tmp_path / "xa")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert f"run {series_uid} (5 instance(s), XA, 5 frame(s)" in route.stdout, route.stdout
    assert "-> cerebral-dsa" in route.stdout, route.stdout

    slices = ct_series(slices=8)
    scout = copy.deepcopy(slices[0])
    scout.SOPInstanceUID = scout.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    scout.InstanceNumber = 9
    volume = load_run([save(ds, tmp_path / "ct") for ds in [scout, *slices]])
    assert volume.run.pixels.shape[0] == 8
    assert volume.run.meta.extra["left_out"] == "left out of the run: 1 localizer(s)"
    scouts = ct_series(slices=2)
    for ds in scouts:  # localizers alone: nothing to leave them out for
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    alone = load_run([save(ds, tmp_path / "scouts") for ds in scouts])
    assert alone.run.pixels.shape[0] == 2 and "left_out" not in alone.run.meta.extra

    node = make_node(
        rules=[{"name": "xa", "match": {"modality": ["XA"]}, "pipelines": ["minip"]}],
        completion={"quiet_period_s": 0.5},
    )
    for ds in instances:
        assert _send(node, ds) == 0x0000
    job = wait_for(
        lambda: node.db.query("SELECT * FROM jobs WHERE run_id=? AND state='done'", (series_uid,)),
        60,
        what="the series' minip job",
    )[0]
    assert note in job["notes"]
    run = node.db.query("SELECT rule FROM runs WHERE run_id=?", (series_uid,))[0]
    assert run["rule"] == "xa"


@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("ClinicalTrialSponsorName", ""),
        ("PatientSpeciesDescription", ""),
        ("PatientIdentityRemoved", "ZZZ"),
        ("DeidentificationMethod", ""),
        ("PatientWeight", "1\\2\\3"),
    ],
)
def test_a_volume_s_results_carry_its_identity_and_no_other_patient_attribute(  # type: ignore[no-untyped-def]
    phantom, tmp_path: Path, keyword: str, value: str
) -> None:
    """highdicom copies every attribute of the Patient, Patient Study and Clinical
    Trial modules a volume's slices hold into the SEG and SR it makes from them; an
    empty type 1 one (a Sponsor Name, a Species Description) or an unknown code made
    each of them fail dciodvfy. A volume's results carry the identity a 2D run's do
    (``encode.common.PATIENT_KEYWORDS``), valid or left out, and pass dciodvfy."""
    from dicom_node.encode.common import PATIENT_KEYWORDS

    warnings.simplefilter("ignore")
    series, _ = phantom
    run = [copy.deepcopy(ds) for ds in series]
    for ds in run:
        raw(ds, keyword, dictionary_VR(keyword), value)
    outcome = _execute(
        Case(f"series {keyword} {value!r}", run), 0, tmp_path, "rotational_dla", valid=True
    )
    assert outcome.error is None, outcome.error
    for result in outcome.results:
        ds = dcmread(result.path, stop_before_pixels=True)
        if keyword not in PATIENT_KEYWORDS:
            assert keyword not in ds, result.description


def test_a_hostile_value_in_any_header_element_never_becomes_an_internal_error(  # type: ignore[no-untyped-def]
    phantom, tmp_path: Path
) -> None:
    """Each text element of a run's header set to a value senders write (empty, too
    long, a list, an impossible date, a code of no enumeration: ``VR_HOSTILE``), in
    ``sandbox.execute``: a 2D run through each 2D pipeline in turn, the CT series and
    the Enhanced 3D XA through ``rotational_dla``. Done, or failed with a reason; never
    an internal error (an empty or unknown Specific Character Set failed a volume's
    SEG, Patient's Sex "U" every 2D SEG, Parametric Map and SR). What is done passes
    dciodvfy (an empty Specific Character Set, a Study Description "a\\b" and a
    Patient Orientation "A\\B\\C" were copied into every result, in error)."""
    from tests.series_faults import header_value_corpus
    from training.phantoms import dsa

    warnings.simplefilter("ignore")
    written = dsa.generate(9105, size=64, frames=12).write(tmp_path / "s")
    source = dcmread(next(p for p in written if p.name == "dsa.dcm"))
    series, volume = phantom
    seed = corpus_seed(11)
    cases = header_value_corpus([source], seed, "2D")
    jobs = [(c, PIPELINES_2D[k % len(PIPELINES_2D)]) for k, c in enumerate(cases)]
    jobs += [(c, "rotational_dla") for c in header_value_corpus(series, seed + 1, "series")]
    jobs += [(c, "rotational_dla") for c in header_value_corpus([volume], seed + 2, "3D XA")]
    assert len(jobs) >= 120
    done = sum(
        _execute(case, i, tmp_path, p, valid=True).error is None for i, (case, p) in enumerate(jobs)
    )
    print(f"{len(jobs)} jobs, {done} done, {len(jobs) - done} refused with a reason")
    assert done > 0.6 * len(jobs)


def test_values_their_vr_does_not_allow_are_left_out(phantom, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A text element written "\\\\" holds two empty values, not no value: a Study
    Date or Time or a Patient's Birth Date of them failed every SEG's encoding
    (internal error), and a Study Description or Body Part Examined of them was
    copied into the results, where dciodvfy finds it in error; so were a control
    character in a Study Description or a Referring Physician's Name (a tab, a NUL)
    and a name of more than five components ("^^^^^"). Each text element of a 2D
    run's header set to each of these (and some of a volume's), in
    ``sandbox.execute``: done, and what is done passes dciodvfy."""
    from tests.series_faults import STORED_AS_CHECKED
    from training.phantoms import dsa

    warnings.simplefilter("ignore")
    written = dsa.generate(9105, size=64, frames=12).write(tmp_path / "s")
    source = dcmread(next(p for p in written if p.name == "dsa.dcm"))
    series, volume = phantom
    jobs = []
    for elem in source:
        if elem.keyword and elem.keyword not in STORED_AS_CHECKED and elem.VR in VR_TEXT:
            values = ["\\", "a\\", "a\tb", "a\x00b", "a\x1fb"] + ["^^^^^"] * (elem.VR == "PN")
            for value in values:
                if elem.keyword == "SpecificCharacterSet" and "\x00" in value:
                    continue  # pydicom cannot write it; the node refuses it (0xC000)
                ds = copy.deepcopy(source)
                raw(ds, elem.keyword, dictionary_VR(elem.keyword), value)
                jobs.append((Case(f"{elem.keyword} {value!r}", [ds]), PIPELINES_2D[len(jobs) % 3]))
    for keyword, value in (
        ("StudyDate", "\\"),
        ("StudyTime", "\\"),
        ("BodyPartExamined", "\\"),
        ("StudyDescription", "a\tb"),
        ("ReferringPhysicianName", "^^^^^"),
        ("FrameOfReferenceUID", "+1"),  # an Enhanced volume's: a SEG's internal error
    ):
        for label, run in (("series", series), ("3D XA", [volume])):
            copies = [copy.deepcopy(ds) for ds in run]
            for ds in copies:
                raw(ds, keyword, dictionary_VR(keyword), value)
            jobs.append((Case(f"{label} {keyword} {value!r}", copies), "rotational_dla"))
    assert len(jobs) > 200
    for i, (case, pipeline) in enumerate(jobs):
        outcome = _execute(case, i, tmp_path, pipeline, valid=True)
        if "FrameOfReferenceUID" in case.name:
            assert "no Frame of Reference UID" in (outcome.error or ""), (case.name, outcome)
        else:
            assert outcome.error is None, (case.name, outcome.error)


VR_TEXT = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "PN", "SH", "TM"})


def _code(value: str, scheme: str, meaning: str) -> Any:
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


@pytest.mark.parametrize(
    ("removed", "method", "codes", "expected"),
    [
        ("YES", "Basic Profile", [], ("YES", "Basic Profile", 0)),
        ("YES", None, [], ("YES", "not stated by the source", 0)),
        (
            "YES",
            None,
            [("113100", "DCM", "Basic Application Confidentiality Profile")],
            ("YES", None, 1),
        ),
        ("YES", None, [("113100", "DCM", "")], ("YES", "not stated by the source", 0)),
        ("YES", "Basic", [("X" * 30, "DCM", "Too long a value")], ("YES", "Basic", 0)),
        ("NO", "Basic Profile", [], ("NO", None, 0)),
    ],
)
def test_a_de_identified_source_s_results_say_so(  # type: ignore[no-untyped-def]
    phantom, tmp_path: Path, removed: str, method: str | None, codes: list[Any], expected: Any
) -> None:
    """A source flagged de-identified (Patient Identity Removed YES, PS3.15 E.1) gave
    results without the flag, which a research PACS or an export filter reads. Its
    results carry the flag and the method (the text, or the codes that are whole; one of
    them is required with YES, so a source that gives neither is said not to), and pass
    dciodvfy: 2D results and a volume's."""
    from pydicom.sequence import Sequence

    from training.phantoms import dsa

    warnings.simplefilter("ignore")
    written = dsa.generate(9105, size=64, frames=12).write(tmp_path / "s")
    source = dcmread(next(p for p in written if p.name == "dsa.dcm"))
    series, _ = phantom
    for k, (run, pipeline) in enumerate((([source], "dsa_av"), (series, "rotational_dla"))):
        run = [copy.deepcopy(ds) for ds in run]
        for ds in run:
            ds.PatientIdentityRemoved = removed
            if method is not None:
                ds.DeidentificationMethod = method
            if codes:
                ds.DeidentificationMethodCodeSequence = Sequence([_code(*c) for c in codes])
        outcome = _execute(Case(f"{pipeline} {removed}", run), k, tmp_path, pipeline, valid=True)
        assert outcome.error is None, outcome.error
        for result in outcome.results:
            ds = dcmread(result.path, stop_before_pixels=True)
            said = (
                ds.get("PatientIdentityRemoved"),
                ds.get("DeidentificationMethod"),
                len(ds.get("DeidentificationMethodCodeSequence", [])),
            )
            assert said == expected, (result.description, said)


def test_the_instances_of_a_concatenation_are_one_run(make_node) -> None:  # type: ignore[no-untyped-def]
    """A run a modality split into a concatenation (Concatenation UID, In-concatenation
    Number 1 and 2 of 2, sent last part first): each part, a multi-frame XA instance,
    was a run complete on arrival, and was processed as if it were the whole run (a DSA
    of its first half, perfusion maps of a part of the bolus), the results sent like
    any other. The parts are now one run, complete when the last arrives, its frames
    and times joined in order. A concatenation that never comes whole (one part of
    three) completes after its quiet period and fails at once with what is missing."""
    from pydicom.uid import XRayAngiographicImageStorage
    from pynetdicom import AE

    from dicom_node.runs import load_run
    from tests.dicomgen import concatenation

    node = make_node(
        rules=[
            {"name": "xa", "match": {"modality": ["XA"], "min_frames": 6}, "pipelines": ["minip"]}
        ],
        workers={"concurrency": 1, "max_attempts": 3},
        completion={"quiet_period_s": 1},
    )

    whole, parts = concatenation(2, [2, 1])
    partial, alone = concatenation(3, [1], frames=6)
    ae = AE(ae_title="SUITE")
    ae.add_requested_context(XRayAngiographicImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.settings.ae_title)
    assert [int(assoc.send_c_store(ds).Status) for ds in [*parts, *alone]] == [0, 0, 0]
    assoc.release()
    jobs = wait_for(
        lambda: (
            (rows := node.db.query("SELECT * FROM jobs ORDER BY id"))
            and len(rows) == 2
            and all(r["state"] in ("done", "failed") for r in rows)
            and rows
        ),
        60,
        what="the two jobs settled",
    )
    by_run = {j["run_id"]: j for j in jobs}  # one run each: no run of a part alone
    assert set(by_run) == {whole, partial}, [dict(j) for j in jobs]
    (run,) = node.db.query("SELECT * FROM runs WHERE run_id=?", (whole,))
    assert run["reason"] == "concatenation whole", dict(run)  # not after a quiet period
    assert by_run[whole]["state"] == "done", dict(by_run[whole])
    files = [
        Path(r["path"])
        for r in node.db.query("SELECT path FROM instances WHERE run_id=?", (whole,))
    ]
    loaded = load_run(files).run
    assert loaded.meta.number_of_frames == 8
    ordered = sorted(parts, key=lambda ds: ds.InConcatenationNumber)
    expected = np.concatenate([ds.pixel_array for ds in ordered]).astype(np.float32)
    assert np.array_equal(loaded.pixels, expected)
    assert np.allclose(loaded.meta.frame_times_s, np.arange(8) * 0.25)
    failed = by_run[partial]
    assert failed["state"] == "failed" and failed["attempts"] == 1, dict(failed)
    assert "is not whole: it has part(s) [1] of 3, part(s) [2, 3] missing" in failed["error"]


def test_a_concatenation_that_does_not_fit_together_fails_with_the_reason(tmp_path: Path) -> None:
    """Parts whose frame offsets leave a gap, a part sent twice in place of another,
    parts of other sizes: each fails with what is wrong; a gap between two parts that
    no header gives leaves the run without timing (never guessed), its frames joined."""
    from dicom_node.errors import RunError
    from dicom_node.runs import load_run
    from tests.dicomgen import concatenation, save

    def parts(**change: Any) -> list[Path]:
        uid, made = concatenation(2, [1, 2], frames=3)
        files = []
        for number, ds in zip((1, 2), made, strict=True):
            for keyword, values in change.items():
                if values[number - 1] is None:
                    delattr(ds, keyword)
                else:
                    setattr(ds, keyword, values[number - 1])
            files.append(save(ds, tmp_path / uid))
        return files

    for change, reason in (
        ({"ConcatenationFrameOffsetNumber": [0, 4]}, "starts at frame offset 4, after 3 frame(s)"),
        ({"InConcatenationNumber": [1, 1]}, "has part(s) [1, 1] of 2, part(s) [2] missing"),
        ({"InConcatenationTotalNumber": [2, 3]}, "is not whole"),
        ({"ConcatenationUID": [None, "1.2.3"]}, "not the parts of one concatenation"),
    ):
        with pytest.raises(RunError, match=re.escape(reason)):
            load_run(parts(**change))
    untimed = load_run(
        parts(FrameTime=[None, None], FrameTimeVector=[[0, 100, 100], [0, 100, 100]])
    ).run
    assert untimed.pixels.shape[0] == 6 and untimed.meta.frame_times_s is None
    assert "from part 1 to part 2" in untimed.meta.extra["timing_problem"]
    timed = load_run(
        parts(FrameTime=[None, None], FrameTimeVector=[[0, 100, 100], [150, 100, 100]])
    ).run
    assert np.allclose(timed.meta.frame_times_s, [0, 0.1, 0.2, 0.35, 0.45, 0.55])
