"""A generated corpus of volumes whose geometry is broken, for tests/test_series_faults.py.

Each instance of these runs is valid on its own, so ingest stores it; what is
broken is the geometry the volume's result is placed by (``dicom_node.geometry``):
Image Position and Orientation, Pixel Spacing, Frame of Reference, the
Enhanced instance's functional groups, and a series that mixes SOP classes (a
slice of another class is left out of the run: a slice missing) or sizes. Every case starts from a small valid rotational phantom (the CT series
or the Enhanced 3D XA instance) and breaks one attribute in a subset of its
slices or frames with one of ``HOSTILE``'s values, or several at once in the
random combinations. Unparseable values are written as raw bytes, as a sender
would put them on the wire. The corpus is deterministic for a seed.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import EnhancedXAImageStorage, XRayAngiographicImageStorage, generate_uid

from tests.faults import raw


@dataclass(frozen=True)
class Case:
    name: str
    datasets: list[Dataset]


# What senders put in a numeric attribute: nothing, an empty value, text, too few or
# too many numbers, numbers that are not finite, zero, negative, absurd.
HOSTILE: dict[str, Callable[[int], bytes | None]] = {
    "absent": lambda n: None,
    "empty": lambda n: b"",
    "text": lambda n: b"abc\\def",
    "one value": lambda n: b"1",
    "one value too many": lambda n: "\\".join(["1"] * (n + 1)).encode(),
    "one value too few": lambda n: "\\".join(["1"] * max(n - 1, 1)).encode(),
    "NaN": lambda n: "\\".join(["NaN"] * n).encode(),
    "infinite": lambda n: "\\".join(["1e999"] * n).encode(),
    "zeros": lambda n: "\\".join(["0"] * n).encode(),
    "negative": lambda n: "\\".join(["-0.5"] * n).encode(),
    "huge": lambda n: "\\".join(["1e30"] * n).encode(),
    "tiny": lambda n: "\\".join(["1e-30"] * n).encode(),
}

# Attributes of a slice of a series: (keyword, values).
SERIES_ATTRIBUTES = (
    ("ImagePositionPatient", 3),
    ("ImageOrientationPatient", 6),
    ("PixelSpacing", 2),
    ("SliceThickness", 1),
    ("FrameOfReferenceUID", 1),
    ("InstanceNumber", 1),
)
# Which slices: every one, one, every other.
SUBSETS = ("all", "one", "half")


def put(ds: Dataset, keyword: str, value: bytes | None) -> None:
    """Set ``keyword`` to ``value``'s bytes as received, with its dictionary VR
    (``tests.faults.raw``; a UID padded with NUL); None deletes it."""
    if value is None:
        if keyword in ds:
            delattr(ds, keyword)
        return
    vr = dictionary_VR(Tag(keyword))
    if vr == "UI" and len(value) % 2:
        value += b"\0"
    raw(ds, keyword, vr, value.decode("latin-1"))


def _chosen(count: int, subset: str, rng: np.random.Generator) -> list[int]:
    if subset == "all":
        return list(range(count))
    if subset == "one":
        return [int(rng.integers(count))]
    return list(range(int(rng.integers(2)), count, 2))


def break_series(
    series: list[Dataset], keyword: str, hostile: str, subset: str, rng: np.random.Generator
) -> list[Dataset]:
    out = [copy.deepcopy(ds) for ds in series]
    n = dict(SERIES_ATTRIBUTES)[keyword]
    raw = HOSTILE[hostile](n)
    if keyword == "FrameOfReferenceUID" and raw is not None:
        raw = raw.replace(b"\\", b".")
    for i in _chosen(len(out), subset, rng):
        put(out[i], keyword, raw)
    return out


def break_enhanced(
    volume: Dataset, where: str, hostile: str, subset: str, rng: np.random.Generator
) -> Dataset:
    """Break the Enhanced instance's ``where``: the shared spacing or orientation, the
    per-frame positions (``subset`` of the frames), or the functional groups."""
    ds = copy.deepcopy(volume)
    shared = ds.SharedFunctionalGroupsSequence[0]
    if where == "shared PixelSpacing":
        put(shared.PixelMeasuresSequence[0], "PixelSpacing", HOSTILE[hostile](2))
    elif where in ("shared SliceThickness", "shared SpacingBetweenSlices"):
        keyword = where.split()[1]
        put(shared.PixelMeasuresSequence[0], keyword, HOSTILE[hostile](1))
    elif where == "shared ImageOrientationPatient":
        put(shared.PlaneOrientationSequence[0], "ImageOrientationPatient", HOSTILE[hostile](6))
    elif where == "per-frame ImagePositionPatient":
        frames = ds.PerFrameFunctionalGroupsSequence
        for i in _chosen(len(frames), subset, rng):
            put(frames[i].PlanePositionSequence[0], "ImagePositionPatient", HOSTILE[hostile](3))
    elif where == "FrameOfReferenceUID":
        put(ds, "FrameOfReferenceUID", None)
    elif where == "per-frame groups cut short":
        ds.PerFrameFunctionalGroupsSequence = ds.PerFrameFunctionalGroupsSequence[:3]
    elif where == "no shared groups":
        del ds.SharedFunctionalGroupsSequence
    elif where == "orientation per frame":
        orientation = shared.PlaneOrientationSequence
        del shared.PlaneOrientationSequence
        for item in ds.PerFrameFunctionalGroupsSequence:
            item.PlaneOrientationSequence = copy.deepcopy(orientation)
    else:
        raise ValueError(where)
    return ds


ENHANCED_PLACES = (
    "shared PixelSpacing",
    "shared SliceThickness",
    "shared SpacingBetweenSlices",
    "shared ImageOrientationPatient",
    "per-frame ImagePositionPatient",
)
ENHANCED_WHOLE = (
    "FrameOfReferenceUID",
    "per-frame groups cut short",
    "no shared groups",
    "orientation per frame",
)


def _set_level(series: list[Dataset], rng: np.random.Generator) -> list[Case]:
    """Breaks of the series as a set: slices missing, repeated, mixed in."""
    cases = []
    gap = [ds for i, ds in enumerate(series) if i != len(series) // 2]
    cases.append(Case("a slice missing in the middle", [copy.deepcopy(d) for d in gap]))
    twice = [copy.deepcopy(d) for d in series]
    clone = copy.deepcopy(twice[3])
    clone.SOPInstanceUID = generate_uid()
    clone.file_meta.MediaStorageSOPInstanceUID = clone.SOPInstanceUID
    cases.append(Case("a slice sent twice under two UIDs", [*twice, clone]))
    mixed = [copy.deepcopy(d) for d in series]
    k = int(rng.integers(1, len(mixed) - 1))  # inside: left out, it leaves a gap
    mixed[k].SOPClassUID = XRayAngiographicImageStorage
    mixed[k].file_meta.MediaStorageSOPClassUID = XRayAngiographicImageStorage
    cases.append(Case("a slice of another SOP class", mixed))
    far = [copy.deepcopy(d) for d in series]
    for i, ds in enumerate(far):
        ds.ImagePositionPatient = [0.0, 0.0, float(i) * 1e6]
    cases.append(Case("slices a kilometre apart", far))
    rotated = [copy.deepcopy(d) for d in series]
    rotated[len(rotated) // 3].ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    cases.append(Case("one slice of another orientation", rotated))
    shuffled = [copy.deepcopy(series[i]) for i in rng.permutation(len(series))]
    for ds in shuffled:  # sent in any order, numbered in that order: still a good volume
        ds.InstanceNumber = int(rng.integers(1, 10_000))
    cases.append(Case("slices out of order, instance numbers scrambled", shuffled))
    return cases


def corpus(series: list[Dataset], volume: Dataset, seed: int, combinations: int) -> list[Case]:
    """Every attribute × hostile value × subset of ``series``, the Enhanced instance's
    geometry the same way, the set-level breaks, then random combinations."""
    rng = np.random.default_rng(seed)
    cases: list[Case] = []
    for keyword, _ in SERIES_ATTRIBUTES:
        for hostile in HOSTILE:
            subset = SUBSETS[int(rng.integers(len(SUBSETS)))]
            name = f"series {keyword} {hostile} ({subset})"
            cases.append(Case(name, break_series(series, keyword, hostile, subset, rng)))
    for where in ENHANCED_PLACES:
        for hostile in HOSTILE:
            subset = SUBSETS[int(rng.integers(len(SUBSETS)))]
            name = f"enhanced {where} {hostile} ({subset})"
            cases.append(Case(name, [break_enhanced(volume, where, hostile, subset, rng)]))
    for where in ENHANCED_WHOLE:
        cases.append(
            Case(f"enhanced {where}", [break_enhanced(volume, where, "absent", "all", rng)])
        )
    cases += _set_level(series, rng)
    hostile_names = list(HOSTILE)
    for k in range(combinations):
        broken = series
        parts = []
        for _ in range(int(rng.integers(2, 4))):
            keyword = SERIES_ATTRIBUTES[int(rng.integers(len(SERIES_ATTRIBUTES)))][0]
            hostile = hostile_names[int(rng.integers(len(hostile_names)))]
            subset = SUBSETS[int(rng.integers(len(SUBSETS)))]
            broken = break_series(broken, keyword, hostile, subset, rng)
            parts.append(f"{keyword} {hostile} ({subset})")
        cases.append(Case(f"combination {k}: " + ", ".join(parts), broken))
    return cases


# Header attributes of a 2D run that the node reads besides the pixels: (keyword,
# values, the shutter shape the attribute belongs to or None).
RUN_ATTRIBUTES = (
    ("ShutterLeftVerticalEdge", 1, "RECTANGULAR"),
    ("ShutterLowerHorizontalEdge", 1, "RECTANGULAR"),
    ("CenterOfCircularShutter", 2, "CIRCULAR"),
    ("RadiusOfCircularShutter", 1, "CIRCULAR"),
    ("VerticesOfThePolygonalShutter", 8, "POLYGONAL"),
    ("ShutterShape", 1, "RECTANGULAR"),
    ("PixelSpacing", 2, None),
    ("ImagerPixelSpacing", 2, None),
    ("EstimatedRadiographicMagnificationFactor", 1, None),
    ("FrameTime", 1, None),
    ("FrameTimeVector", 16, None),
    ("RecommendedDisplayFrameRate", 1, None),
    ("PositionerPrimaryAngle", 1, None),
    ("DistanceSourceToDetector", 1, None),
)
# In the first item of the Mask Subtraction Sequence of a native run.
MASK_ATTRIBUTES = (("MaskFrameNumbers", 1), ("MaskSubPixelShift", 2), ("ApplicableFrameRange", 2))
# Beyond the numeric HOSTILE values: integers out of range.
RUN_HOSTILE: dict[str, Callable[[int], bytes | None]] = {
    **HOSTILE,
    "99999": lambda n: "\\".join(["99999"] * n).encode(),
    "-5": lambda n: "\\".join(["-5"] * n).encode(),
}


def _with_shutter(ds: Dataset, shape: str) -> None:
    rows, cols = int(ds.Rows), int(ds.Columns)
    ds.ShutterShape = shape
    if shape == "RECTANGULAR":
        ds.ShutterLeftVerticalEdge, ds.ShutterRightVerticalEdge = 5, cols - 5
        ds.ShutterUpperHorizontalEdge, ds.ShutterLowerHorizontalEdge = 5, rows - 5
    elif shape == "CIRCULAR":
        ds.CenterOfCircularShutter = [rows // 2, cols // 2]
        ds.RadiusOfCircularShutter = min(rows, cols) // 2 - 2
    else:
        ds.VerticesOfThePolygonalShutter = [5, 5, 5, cols - 5, rows - 5, cols - 5, rows - 5, 5]


def run_header_corpus(
    native: Dataset, subtracted: Dataset, seed: int, per_attribute: int
) -> list[Case]:
    """Each attribute of ``RUN_ATTRIBUTES`` (in a native or a subtracted run, drawn) and
    of ``MASK_ATTRIBUTES`` (native) set to ``per_attribute`` of ``RUN_HOSTILE``'s values,
    drawn without replacement."""
    rng = np.random.default_rng(seed)
    names = list(RUN_HOSTILE)
    cases = []
    for keyword, n, shape in RUN_ATTRIBUTES:
        for k in rng.choice(len(names), per_attribute, replace=False):
            source = native if rng.random() < 0.5 else subtracted
            ds = copy.deepcopy(source)
            if shape is not None:
                _with_shutter(ds, shape)
            put(ds, keyword, RUN_HOSTILE[names[k]](n))
            kind = "native" if source is native else "subtracted"
            cases.append(Case(f"{kind} run {keyword} {names[k]}", [ds]))
    for keyword, n in MASK_ATTRIBUTES:
        for k in rng.choice(len(names), per_attribute, replace=False):
            ds = copy.deepcopy(native)
            put(ds.MaskSubtractionSequence[0], keyword, RUN_HOSTILE[names[k]](n))
            cases.append(Case(f"native run Mask Subtraction {keyword} {names[k]}", [ds]))
    return cases


def enhanced_xa(source: Dataset, stamps: list[str | None]) -> Dataset:
    """``source`` (a multi-frame XA run) as an Enhanced XA instance whose timing is each
    frame's Frame Acquisition DateTime (``stamps``; None leaves one out), the spacing only
    in the shared Pixel Measures."""
    from pydicom.sequence import Sequence

    ds = copy.deepcopy(source)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = EnhancedXAImageStorage
    for keyword in ("FrameTimeVector", "FrameTime", "FrameIncrementPointer"):
        if keyword in ds:
            delattr(ds, keyword)
    measures = Dataset()  # the calibrated spacing moves into the shared Pixel Measures
    measures.PixelSpacing = ds.get("PixelSpacing") or ds.ImagerPixelSpacing
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        if keyword in ds:
            delattr(ds, keyword)
    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    items = []
    for stamp in stamps:
        content = Dataset()
        if stamp is not None:
            content.FrameAcquisitionDateTime = stamp
        item = Dataset()
        item.FrameContentSequence = Sequence([content])
        items.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(items)
    return ds


# Values of each VR that are well formed or nearly, as senders write them: empty, too
# long, a list where one is meant, an impossible date, a code of no enumeration.
VR_HOSTILE: dict[str, tuple[str, ...]] = {
    "AE": ("", "X" * 20, "A\\B"),
    "AS": ("", "999Y", "045y"),
    "CS": ("", "ZZZ", "A\\B\\C", "X" * 20),
    "DA": ("", "20260231", "1980-01-01"),
    "DS": ("", "0", "-1", "1e30", "1\\2\\3\\4\\5\\6\\7"),
    "DT": ("", "20260231120000"),
    "IS": ("", "0", "-5", "99999999", "1\\2\\3"),
    "LO": ("", "L" * 80, "a\\b"),
    "LT": ("", "T" * 2000),
    "PN": ("", "=^=", "a\\b", "P" * 100),
    "SH": ("", "S" * 30, "a\\b"),
    "ST": ("", "T" * 2000),
    "TM": ("", "246000", "12"),
    "UI": ("", "1.2.3"),
    "UT": ("", "U" * 100),
}
# What the spool checks before it acknowledges (a run cannot hold other values of these)
STORED_AS_CHECKED = {
    "SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID", "PixelData",
    "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "SamplesPerPixel",
    "PixelRepresentation", "NumberOfFrames", "PhotometricInterpretation",
}  # fmt: skip


def header_value_corpus(datasets: list[Dataset], seed: int, label: str) -> list[Case]:
    """``datasets`` (one run) with each top-level text element of its first data set
    set to one hostile value of its VR (``VR_HOSTILE``, drawn by ``seed``), in every
    data set of the run: one case per element."""
    rng = np.random.default_rng(seed)
    cases = []
    for elem in datasets[0]:
        keyword = elem.keyword
        if not keyword or keyword in STORED_AS_CHECKED or elem.VR not in VR_HOSTILE:
            continue
        options = VR_HOSTILE[elem.VR]
        value = options[int(rng.integers(len(options)))]
        run = [copy.deepcopy(ds) for ds in datasets]
        for ds in run:
            raw(ds, keyword, dictionary_VR(keyword), value)
        cases.append(Case(f"{label} {keyword} {value[:20]!r}", run))
    return cases
