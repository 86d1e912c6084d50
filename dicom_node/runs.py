"""Decode a stored run into ``pipelines.base.Run``: pixels, timing and geometry.

Tolerant when reading: small defects are logged, unusable runs raise RunError
with the reason (the job fails without retry).
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import config, dcmread
from pydicom.datadict import dictionary_VM, dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut
from pydicom.valuerep import DA, DT, TM, PersonName, validate_value

from dicom_node.errors import RejectedInstance, RunError
from dicom_node.geometry import (
    enhanced_geometry,
    fill_pixel_measures,
    fill_slice_thickness,
    plane_spacing_2d,
    series_geometry,
)
from dicom_node.routing import (
    SUBTRACTING_MASK_OPERATIONS,
    frame_rate,
    header_floats,
    mask_operation,
)
from dicom_node.sopclasses import ACCEPTED_SOP_CLASSES, CINE_2D, VOLUME, run_sop_class
from dicom_node.spool import check_uid
from pipelines import pixel_shift
from pipelines.base import Run, RunMeta, Shutter
from pipelines.pixel_shift import Shift
from pipelines.shutter import from_header as shutter_from_header
from pipelines.shutter import shutter_mask

log = logging.getLogger(__name__)

# Log-subtraction scale for native runs: stored = MID + GAIN * ln(live / mask),
# so vessels come out dark on a flat mid-grey field, as in a subtracted run.
SUB_MID = 2048.0
SUB_GAIN = 1024.0


@dataclass
class LoadedRun:
    run: Run
    headers: list[Dataset]  # pixel data removed, in run order


def _has_value(ds: Dataset, keyword: str) -> bool:
    """Whether the element is there with a value, read without converting it: a value
    its VR cannot hold (a Frame Time sent as an FD of 250 bytes) raises when converted,
    which ``header_floats`` has already reported as unreadable."""
    if keyword not in ds:
        return False
    value = ds.get_item(keyword, keep_deferred=True).value  # an empty one: None, unconverted
    if isinstance(value, (bytes, str)):
        return len(value) > 0
    return value is not None


def frame_times_s(ds: Dataset, frames: int) -> tuple[np.ndarray | None, str]:
    """Acquisition times (s, from the first frame) from Frame Time Vector, Frame Time or
    the per-frame acquisition date-times, and what was wrong with the timing when there
    is none: the run is still decoded (a MinIP needs no timing), and pipelines that
    need timing fail with that reason. Timing is never guessed.

    The Frame Time Vector holds increments in ms (its first value is 0).
    """
    problems = []
    ftv = header_floats(ds, "FrameTimeVector")
    if ftv is not None:
        if len(ftv) == frames:
            inc = np.asarray(ftv, dtype=np.float64)
            inc[0] = 0.0
            if np.all(inc[1:] > 0):
                return np.cumsum(inc) / 1000.0, ""
            problems.append("Frame Time Vector has increments that are not positive")
        else:
            problems.append(f"Frame Time Vector has {len(ftv)} values for {frames} frames")
    elif _has_value(ds, "FrameTimeVector"):
        problems.append("Frame Time Vector is not numeric")  # not quoted: logs carry no values
    ft = header_floats(ds, "FrameTime")
    if ft is not None:
        if len(ft) == 1 and ft[0] > 0:
            return np.arange(frames, dtype=np.float64) * ft[0] / 1000.0, ""
        problems.append(f"Frame Time is not one positive number ({len(ft)} value(s))")
    elif _has_value(ds, "FrameTime"):
        problems.append("Frame Time is not numeric")
    pf = ds.get("PerFrameFunctionalGroupsSequence")
    if pf is not None and len(pf) == frames:
        stamps = []
        for number, item in enumerate(pf, start=1):
            try:
                stamps.append(_acquired_at(item).timestamp())
            except Exception:  # noqa: BLE001 - absent or unreadable: no timing from these
                problems.append(
                    f"Frame Acquisition DateTime of frame {number} is missing or unreadable"
                )
                break
        if len(stamps) == frames:
            steps = np.diff(stamps)
            if np.all(steps > 0):
                return np.asarray(stamps) - stamps[0], ""
            number = int(np.flatnonzero(steps <= 0)[0]) + 2
            problems.append(f"Frame Acquisition DateTimes do not increase at frame {number}")
    problem = "; ".join(problems) or "the run carries no frame timing"
    if problems:
        log.warning("no usable frame timing: %s", problem)
    return None, problem


def _acquired_at(item: Dataset) -> datetime.datetime:
    """A per-frame functional groups item's Frame Acquisition DateTime; raises where it
    is absent or unreadable."""
    content = item.get("FrameContentSequence")
    stamp = content[0].get("FrameAcquisitionDateTime") if content else None
    return DT(str(stamp))


def _mask_subtract(
    frames: np.ndarray, ds: Dataset, shutter: Shutter | None = None
) -> tuple[np.ndarray, bool, Shift | None]:
    """Log-subtract native frames with the mask the Mask Subtraction Sequence names,
    shifted by its Mask Sub-pixel Shift, or else by the pixel shift that registers it
    to the first live frame (``pipelines.pixel_shift``; None: not shifted)."""
    op = mask_operation(ds)
    if op in ("", "NONE"):
        return frames, False, None
    if op not in SUBTRACTING_MASK_OPERATIONS:
        log.warning("Mask Operation %r not supported; using frames unsubtracted", op)
        return frames, False, None
    item = ds.MaskSubtractionSequence[0]
    listed = header_floats(item, "MaskFrameNumbers")
    if op == "TID" or listed is None:
        listed = [1.0]
    if not all(float(n).is_integer() for n in listed):
        raise RunError(f"Mask Frame Numbers {listed} are not frame numbers")
    numbers = [int(n) for n in listed]
    idx = [n - 1 for n in numbers if 1 <= n <= frames.shape[0]]
    if not idx:
        raise RunError(
            f"Mask Frame Numbers {numbers} are outside the run's {frames.shape[0]} frames"
        )
    mask = frames[idx].mean(axis=0)
    live = [k for k in range(max(idx) + 1, frames.shape[0]) if k not in idx]
    field = shutter_mask(shutter, mask.shape) if shutter is not None else None
    shift, exposed = _mask_shift(item, mask, frames, live, field)
    log_live = np.log1p(np.maximum(frames, 0))
    log_mask = np.log1p(np.maximum(mask, 0))
    if shift is None:
        return (SUB_MID + SUB_GAIN * (log_live - log_mask)).astype(np.float32), True, None
    # The collimator's blades stay where the detector has them (pixel_shift.moved_mask).
    if exposed is None:  # the header's shift: no field was needed to find it
        exposed = pixel_shift.exposed(mask, frames[live[0] if live else idx[0]], field)
    moved = np.log1p(
        np.maximum(pixel_shift.moved_mask(mask, shift.rows, shift.columns, exposed), 0)
    )
    sub = (SUB_MID + SUB_GAIN * (log_live - moved)).astype(np.float32)
    # The mask frames stay blank: a frame subtracted from its own shifted copy would
    # show the very misregistration the shift removed from the live frames.
    sub[idx] = SUB_MID + SUB_GAIN * (log_live[idx] - log_mask)
    log.info("%s", shift.note())
    return sub, True, shift


def _mask_shift(
    item: Dataset,
    mask: np.ndarray,
    frames: np.ndarray,
    live: list[int],
    field: np.ndarray | None,
) -> tuple[Shift | None, np.ndarray | None]:
    """The header's Mask Sub-pixel Shift (rows, columns) when it gives one other than
    (0, 0), else the estimated pixel shift against the first live frame after the
    mask (None: no shift); with the exposed field the estimate used (None when
    none was needed). ``field``: the DICOM shutter's exposed field, where the run
    has one."""
    given = header_floats(item, "MaskSubPixelShift")  # finite numbers, or None
    if given is not None:
        if len(given) != 2 or max(abs(v) for v in given) >= min(mask.shape) / 2:
            log.warning("Mask Sub-pixel Shift %s is not a (row, column) shift; ignored", given[:4])
        elif given != [0.0, 0.0]:
            return Shift(given[0], given[1], "header"), None
        # (0, 0) is what most consoles write when no one shifted the mask; it does not
        # say that the head kept still
    if not live:
        return None, None
    exposed = pixel_shift.exposed(mask, frames[live[0]], field)
    return pixel_shift.estimate(mask, frames[live[0]], exposed), exposed


def decode_pixels(ds: Dataset, path: Path) -> np.ndarray:
    """Stored values through the Modality LUT or rescale, as float32.

    Enhanced objects (3D XA, Enhanced CT and XA) carry their rescale in the
    Pixel Value Transformation functional group, shared or per frame, which
    pydicom's ``apply_modality_lut`` does not read; it is applied here. A rescale
    is applied in float32 in place: ``apply_modality_lut`` works in float64, a
    full-size temporary (1 GB for a 512³ volume) then copied to float32."""
    try:
        raw = ds.pixel_array
        if _is_colour(ds):
            out = _luminance(apply_color_lut(raw, ds) if _palette(ds) else raw)
            log.info("colour image %s read as its luminance", ds.get("SOPInstanceUID", "?"))
        elif ds.get("ModalityLUTSequence"):
            out = _apply_modality_lut(raw, ds, path)
        else:
            out = raw.astype(np.float32)
            del raw
            rescale = _rescale(ds, out.shape[0] if out.ndim == 3 else 1)
            if rescale is not None:
                slope, intercept = rescale
                frames = out if out.ndim == 3 else out[None]
                with np.errstate(over="ignore", invalid="ignore"):
                    for frame, m, b in zip(frames, slope, intercept, strict=True):
                        if (m, b) != (1.0, 0.0):
                            frame *= np.float32(m)
                            frame += np.float32(b)
    except RunError:
        raise
    except Exception as exc:  # noqa: BLE001 - a decoder meeting hostile data raises anything
        raise RunError(
            f"cannot decode pixel data of {path.name} "
            f"({ds.file_meta.get('TransferSyntaxUID', '?')}): {type(exc).__name__}: {exc}"
        ) from None
    # A Rescale Slope or Intercept that is not finite, or so large that the values
    # overflow float32, leaves nothing to compute on (every filter would spread NaN).
    # Checked a frame at a time: no volume-sized temporary.
    for k, frame in enumerate(out if out.ndim == 3 else out[None]):
        if not np.isfinite(frame).all():
            raise RunError(
                f"pixel values of {path.name} (frame or slice {k + 1}) are not finite "
                "numbers after the Rescale Slope and Intercept or Modality LUT"
            )
    return out


def _apply_modality_lut(raw: np.ndarray, ds: Dataset, path: Path) -> np.ndarray:
    """The Modality LUT Sequence's first item applied (pydicom), or a RunError naming
    what in the item is missing or does not fit: the stored values mean nothing without
    it."""
    item = ds.ModalityLUTSequence[0]
    missing = [k for k in ("LUTDescriptor", "LUTData") if k not in item]
    problem = f"it has no {' and no '.join(missing)}" if missing else ""
    if not problem:
        try:
            return np.asarray(apply_modality_lut(raw, ds), dtype=np.float32)
        except Exception as exc:  # noqa: BLE001 - pydicom on an inconsistent LUT
            problem = f"{type(exc).__name__}: {exc}"
    raise RunError(
        f"the Modality LUT Sequence of {path.name} cannot be applied ({problem}): its "
        "stored pixel values have no meaning without it"
    )


def _palette(ds: Dataset) -> bool:
    return str(ds.get("PhotometricInterpretation", "")).strip().upper() == "PALETTE COLOR"


def _is_colour(ds: Dataset) -> bool:
    """RGB or YBR (three samples; pydicom gives them as RGB), or a palette."""
    return int(ds.get("SamplesPerPixel", 1) or 1) == 3 or _palette(ds)


def _luminance(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) colour -> (...) float32 luma (ITU-R BT.601 weights), a frame at a
    time. A colour capture of a run (a Secondary Capture of a screen, say) is read
    in grey as a viewer's monochrome rendering would show it; the Modality LUT and
    rescale are monochrome attributes and do not apply."""
    weights = np.array([0.299, 0.587, 0.114], np.float32)
    frames = rgb if rgb.ndim == 4 else rgb[None]
    out = np.empty(frames.shape[:-1], np.float32)
    for k, frame in enumerate(frames):
        out[k] = frame.astype(np.float32) @ weights
    return out if rgb.ndim == 4 else out[0]


def _rescale(ds: Dataset, frames: int) -> tuple[list[float], list[float]] | None:
    """(slopes, intercepts), one per frame: the top-level Rescale Slope/Intercept, else
    the Pixel Value Transformation functional group (per frame over shared); None
    when there is none."""
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:
        return [float(ds.RescaleSlope)] * frames, [float(ds.RescaleIntercept)] * frames

    def transformation(groups: Any) -> tuple[float, float] | None:
        """The group's slope and intercept; None when it has none, or when they cannot
        be read as one number each (empty, text, several values): left out, as the
        top-level elements are (``_strip``). A number that is not finite is kept, and
        the run refused for it below, as at the top level."""
        item = groups.get("PixelValueTransformationSequence") if groups is not None else None
        if not item or "RescaleSlope" not in item[0] or "RescaleIntercept" not in item[0]:
            return None
        try:
            slope, intercept = item[0].RescaleSlope, item[0].RescaleIntercept
            return float(slope), float(intercept)
        except Exception as exc:  # noqa: BLE001 - pydicom raises its parser's errors too
            log.warning("Pixel Value Transformation ignored: %s", type(exc).__name__)
            return None

    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = transformation(shared_seq[0]) if shared_seq else None
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    each = [transformation(item) for item in per_frame] if len(per_frame) == frames else []
    if not any(each) and shared is None:
        return None
    pairs = [own or shared or (1.0, 0.0) for own in (each or [None] * frames)]
    return [m for m, _ in pairs], [b for _, b in pairs]


_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_PIXEL_TAGS = frozenset(tag_for_keyword(k) for k in _PIXEL_KEYWORDS)


def _decode_and_release(ds: Dataset, path: Path) -> np.ndarray:
    """:func:`decode_pixels`, then drop the data set's pixel data and pydicom's cached
    array of it: the bytes and the stored values are as large again as the float32
    frames, and only the header is needed after this."""
    out = decode_pixels(ds, path)
    for keyword in _PIXEL_KEYWORDS:
        if keyword in ds:
            delattr(ds, keyword)
    return out


_IDENTITY_UIDS = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")


def _strip_all(datasets: Sequence[Dataset]) -> list[Dataset]:
    """:func:`_strip` for the instances of one run. Their headers are mostly the same
    elements with the same bytes (a volume's slices differ in position and UIDs): an
    element whose encoded bytes were already read and checked in this run is taken
    as it is, not converted and checked again (a 32-slice series: 9 ms a header,
    most of it converting and validating the same values)."""
    readable: set[tuple[Any, ...]] = set()
    return [_strip(ds, readable) for ds in datasets]


def _strip(ds: Dataset, readable: set[tuple[Any, ...]] | None = None) -> Dataset:
    """The header without pixel data, and without elements that cannot be read as their
    dictionary VR (a wrong VR, a value that does not parse): the encoders copy many of
    them into the results, which must be valid. What is dropped is logged.

    ``readable`` holds the encoded form of elements found readable in an instance
    of the same run (tag, VR, encoding, character set, bytes); such an element is
    copied unconverted, to be converted where it is used, as it would be here."""
    readable = set() if readable is None else readable
    header = Dataset()
    header.file_meta = ds.file_meta
    dropped = []
    # keep_deferred: pydicom converts an element whose raw value is None (an empty one)
    # when it is asked for, and one with an unknown VR then raises (corpus seed 87).
    charset = ds.get_item(0x00080005, keep_deferred=True)
    charset_bytes = charset.value if isinstance(charset, RawDataElement) else repr(charset)
    for tag in list(ds.keys()):
        if tag in _PIXEL_TAGS:
            continue
        raw = ds.get_item(tag, keep_deferred=True)
        key = None
        if isinstance(raw, RawDataElement) and raw.value is not None:
            key = (tag, raw.VR, raw.is_implicit_VR, raw.is_little_endian, charset_bytes, raw.value)
            if key in readable:
                header[tag] = raw
                continue
        try:
            elem = ds[tag]  # converts the raw element: a value that does not parse raises
        except Exception:  # noqa: BLE001
            dropped.append(str(tag))
            continue
        if _unreadable(elem):
            dropped.append(elem.keyword or str(elem.tag))
            continue
        header.add(elem)
        if key is not None:
            readable.add(key)
    for keyword in _IDENTITY_UIDS:  # checked at ingest; kept, with the VR they must have
        if keyword in ds and keyword not in header:
            setattr(header, keyword, str(ds[keyword].value).rstrip("\0 "))
    if dropped:
        log.warning("header elements dropped as unreadable: %s", ", ".join(dropped[:20]))
    return header


# Values a well-formed element may still not hold: a date or time that is not one
# (February 30th: the form is checked, not the calendar), a code outside an
# enumeration (Patient's Sex "U"), a list where one value is meant. The encoders copy
# these attributes into results, and highdicom refuses them there.
_TEMPORAL: dict[str, Callable[[str], object]] = {"DA": DA, "DT": DT, "TM": TM}
_ENUMERATED = {
    tag_for_keyword("PatientSex"): {"M", "F", "O"},  # PS3.3 C.7.1.1
    tag_for_keyword("Laterality"): {"R", "L"},  # PS3.3 C.7.3.1
    tag_for_keyword("LossyImageCompression"): {"00", "01"},  # PS3.3 C.7.6.1.1.5
    tag_for_keyword("PatientIdentityRemoved"): {"YES", "NO"},  # PS3.3 C.7.1.1
}
# ... and may not be empty there: type 1 in the results that copy it (SEG, SC), where
# its absence is "00".
_EMPTY = {tag_for_keyword("LossyImageCompression"): set[str]()}
_SINGLE = {tag_for_keyword(k) for k in ("PatientName", "ReferringPhysicianName", "PatientSex")}
# Values in a number the dictionary does not allow (a Study Description "a\\b", a
# Patient Orientation or an Acquisition Number of three values): copied into a result,
# dciodvfy finds it in error. Decimals (DS: spacings, positions, orientations, rescale)
# are left to their readers, which name a wrong count, except those the encoders copy
# into results and nothing reads (encode.volume, encode.common.PATIENT_KEYWORDS).
_COUNTED_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "IS", "LO", "PN", "SH", "TM", "UI", "UC"})
_COPIED_DS = frozenset(
    tag_for_keyword(k)
    for k in (
        "KVP",
        "ContrastBolusVolume",
        "ContrastBolusIngredientConcentration",
        "PatientWeight",
        "PatientSize",
    )
)
# Control characters (PS3.5 6.2): none in a short text VR but ESC, which starts an
# ISO 2022 escape; the long texts may also hold TAB, LF, FF and CR.
_CONTROL = "".join(map(chr, range(0x20))) + "\x7f"
_LONG_TEXTS = frozenset({"LT", "ST", "UT"})
# Patient Orientation (PS3.3 C.7.6.1.1.1): each value letters of L R A P H F.
_ORIENTATION = tag_for_keyword("PatientOrientation")


def _multiplicity_allowed(tag: int, count: int) -> bool:
    """``count`` values fit the dictionary's Value Multiplicity of ``tag`` ("1",
    "2-2n", "1-n", "1-3", ...); an empty element fits any."""
    if count == 0:
        return True
    vm = dictionary_VM(tag).replace(" ", "")
    low, _, high = vm.partition("-")
    if not high:
        return count == int(low)
    if high.endswith("n"):
        step = int(high[:-1] or 1)
        return count >= int(low) and count % step == 0
    return int(low) <= count <= int(high)


# What files a result with its source in a PACS (its patient, its order): kept as the
# source has it when only its length is past its VR's (a RIS's 20-character accession
# number), so that the result joins the source's patient and study, not an empty one.
_KEPT_LONG = {
    tag_for_keyword(k): n
    for k, n in (
        ("PatientName", 64),  # each component: the viewer shows the result's patient
        ("PatientID", 64),
        ("IssuerOfPatientID", 64),
        ("AccessionNumber", 16),
        ("StudyID", 16),
    )
}


def _unreadable(elem: DataElement) -> bool:
    if elem.tag.is_private or elem.tag.group == 0x0002:
        return False
    try:
        expected = dictionary_VR(elem.tag)
    except KeyError:
        return False
    if elem.VR != expected and " or " not in expected and elem.VR != "UN":
        return True
    try:
        value = elem.value
        if elem.VR == "SQ":
            return False
        values = value if isinstance(value, MultiValue) else [value]
        if elem.tag in _SINGLE and len(values) > 1:
            return True
        # "\\" is two empty values, not none (a Study Date of them failed a SEG's
        # encoding); identity kept as sent is kept so too (_KEPT_LONG)
        empty = [v in ("", None) for v in values]
        several_empty = all(empty) and elem.tag not in _KEPT_LONG
        if len(values) > 1 and (several_empty or (elem.VR in _TEMPORAL and any(empty))):
            return True
        count = len(values) if not all(empty) else 0
        if (
            (elem.VR in _COUNTED_VRS or elem.tag in _COPIED_DS)
            and elem.tag not in _KEPT_LONG
            and not _multiplicity_allowed(elem.tag, count)
        ):
            return True
        if elem.tag == _ORIENTATION and not all(
            isinstance(v, str) and v.strip("LRAPHF") == "" for v in values
        ):
            return True
        allowed = _ENUMERATED.get(elem.tag)
        if allowed is not None and not set(values) <= allowed | _EMPTY.get(elem.tag, {""}):
            return True
        for v in values:
            if isinstance(v, PersonName):  # not a str: its length went unchecked
                v = str(v)  # (a Referring Physician's Name of 200 characters)
                if any(group.count("^") > 4 for group in v.split("=")) or v.count("=") > 2:
                    return True  # five components in three groups at most (PS3.5 6.2)
            if isinstance(v, str) and elem.tag not in _KEPT_LONG:
                controls = "\t\n\f\r\x1b" if elem.VR in _LONG_TEXTS else "\x1b"
                if any(c in _CONTROL and c not in controls for c in v):
                    return True
            if isinstance(v, (str, bytes)) and v:  # numbers already parsed as their VR
                validate_value(elem.VR, v[: _KEPT_LONG.get(elem.tag)], config.RAISE)
                if elem.VR in _TEMPORAL and isinstance(v, str):
                    _TEMPORAL[elem.VR](v)
    except Exception:  # noqa: BLE001 - any failure to read the value makes it unreadable
        return True
    return False


def load_run(paths: Sequence[Path], on_pixels: Callable[[int], None] | None = None) -> LoadedRun:
    """Read the files of one run (one multi-frame instance, or a series) into a Run.
    ``on_pixels`` hears how many pixels the headers declare before any is decoded."""
    if not paths:
        raise RunError("run has no instances")
    datasets: list[Dataset] = []
    for p in paths:
        try:
            datasets.append(dcmread(p))
        except (OSError, ValueError, InvalidDicomError) as exc:
            raise RunError(f"cannot read {p}: {exc}") from None
    _check_one_patient(datasets)
    parts = _concatenation(datasets, [Path(p) for p in paths])
    if parts is not None:
        datasets, files = parts
        left_out = ""
    else:
        datasets, files, left_out = _members(datasets, [Path(p) for p in paths])
    if on_pixels is not None:
        on_pixels(sum(declared_pixels(ds) for ds in datasets))
    first = datasets[0]
    sop = str(first.SOPClassUID)
    try:
        if sop in VOLUME:
            loaded = _load_volume(datasets, files)
        elif (
            sop not in CINE_2D and int(first.get("NumberOfFrames", 1) or 1) == 1 and len(files) == 1
        ):
            raise RunError(f"a single {first.get('Modality', '?')} frame is not a run")
        else:
            loaded = _load_cine(datasets, files, concatenated=parts is not None)
    except RunError as exc:
        if left_out:  # a slice of another class is a slice missing: say where it went
            raise RunError(f"{exc} ({left_out})") from None
        raise
    if left_out:
        run = loaded.run
        meta = dataclasses.replace(run.meta, extra={**run.meta.extra, "left_out": left_out})
        loaded = LoadedRun(dataclasses.replace(run, meta=meta), loaded.headers)
    return loaded


def _members(datasets: list[Dataset], paths: list[Path]) -> tuple[list[Dataset], list[Path], str]:
    """The instances of a series that make its run, and what was left out (''): those
    of the run's SOP Class (``run_sop_class``; the router reads the same instance's
    header), and of a volume its slices without the localizers a scanner may store in
    the series (Image Type LOCALIZER: a plane across the slices)."""
    if len(datasets) == 1:
        return datasets, paths, ""
    sop = run_sop_class([str(ds.get("SOPClassUID", "")) for ds in datasets])
    keep = [i for i, ds in enumerate(datasets) if str(ds.get("SOPClassUID", "")) == sop]
    others = len(datasets) - len(keep)
    localizers = {i for i in keep if "LOCALIZER" in _image_type(datasets[i])}
    if sop not in VOLUME or len(localizers) == len(keep):
        localizers = set()
    keep = [i for i in keep if i not in localizers]
    parts = []
    if others:
        name = ACCEPTED_SOP_CLASSES.get(sop, sop)
        parts.append(f"{others} instance(s) of another SOP Class than the run's ({name})")
    if localizers:
        parts.append(f"{len(localizers)} localizer(s)")
    note = "left out of the run: " + " and ".join(parts) if parts else ""
    if note:
        log.info("series %s: %s", datasets[0].get("SeriesInstanceUID", "?"), note)
    return [datasets[i] for i in keep], [paths[i] for i in keep], note


def _image_type(ds: Dataset) -> tuple[str, ...]:
    try:
        return tuple(str(v).strip().upper() for v in (ds.get("ImageType") or []))
    except Exception:  # noqa: BLE001 - an unreadable Image Type: none
        return ()


# A run is one study's and one patient's: its results go to that study.
_ONE_PER_RUN = (("StudyInstanceUID", "studies"), ("PatientID", "patients (Patient ID)"))


def _check_one_patient(datasets: Sequence[Dataset]) -> None:
    """The instances of a series must name one study and one patient; the index
    keeps a series in one study, but a sender can give one series instances of two
    patients. Compared as stored (trailing padding aside), nothing decoded; the
    reason carries no value."""
    for keyword, what in _ONE_PER_RUN:
        values = set()
        for ds in datasets:
            item = ds.get_item(keyword, keep_deferred=True)
            value = None if item is None else item.value
            if isinstance(value, bytes):
                value = value.decode("latin-1")
            values.add(str(value or "").rstrip(" \0"))
        if len(values) > 1:
            raise RunError(f"the instances of the series name {len(values)} {what}: not one run")


def _whole_number(ds: Dataset, keyword: str) -> int:
    try:
        return int(ds.get(keyword) or 0)
    except (TypeError, ValueError):
        return 0


def _concatenation(
    datasets: list[Dataset], paths: list[Path]
) -> tuple[list[Dataset], list[Path]] | None:
    """The parts of a run a modality split into a concatenation (PS3.3 C.7.6.16.2.2.4:
    several instances, each a part of one multi-frame image's frames), in their order;
    None when the run is not one. Each part was a run of its own, complete on arrival
    and processed as if it were the whole (a DSA of the run's first frames, perfusion
    maps of a part of the bolus); the spool now makes its parts one run
    (``spool.Header.run_id``). A concatenation the node cannot join whole (parts
    missing, of another kind of image) fails with the reason."""
    marked = [
        ds
        for ds in datasets
        if "ConcatenationUID" in ds or _whole_number(ds, "InConcatenationTotalNumber") > 1
    ]
    if not marked:
        return None
    first = marked[0]
    try:  # a sender's value: named if a UID
        name = check_uid("Concatenation UID", first.get("ConcatenationUID"))
    except RejectedInstance:
        name = "?"
    number = _whole_number(first, "InConcatenationNumber")
    what = f"instance {first.get('SOPInstanceUID', '?')} is part {number or '?'} of concatenation {name}"
    if str(first.get("SOPClassUID", "")) not in CINE_2D:
        raise RunError(
            f"{what}: the node joins the instances of a concatenation of 2D frames only; "
            "have the modality send the run as one instance"
        )
    uids = {str(ds.get("ConcatenationUID") or "") for ds in datasets}
    if len(marked) != len(datasets) or len(uids) != 1 or name == "?":
        raise RunError(f"{what}: the instances of the run are not the parts of one concatenation")
    numbers = [_whole_number(ds, "InConcatenationNumber") for ds in datasets]
    totals = {_whole_number(ds, "InConcatenationTotalNumber") for ds in datasets}
    total = totals.pop() if len(totals) == 1 else -1
    expected = list(range(1, (total if total > 0 else len(datasets)) + 1))
    if total < 0 or sorted(numbers) != expected:
        missing = sorted(set(expected) - set(numbers))
        raise RunError(
            f"concatenation {name} is not whole: it has part(s) {sorted(numbers)}"
            + (f" of {total}" if total > 0 else "")
            + (f", part(s) {missing} missing" if missing else "")
        )
    order = np.argsort(numbers, kind="stable")
    datasets = [datasets[i] for i in order]
    paths = [paths[i] for i in order]
    offset = 0
    for k, ds in enumerate(datasets, start=1):
        given = ds.get("ConcatenationFrameOffsetNumber")
        if given is not None and _whole_number(ds, "ConcatenationFrameOffsetNumber") != offset:
            raise RunError(
                f"part {k} of concatenation {name} starts at frame offset {given}, after "
                f"{offset} frame(s) of the parts before it: its parts do not fit"
            )
        offset += int(ds.get("NumberOfFrames", 1) or 1)
    return datasets, paths


def declared_pixels(ds: Dataset) -> int:
    """Rows x Columns x frames x samples per pixel as the header declares them (the
    ingest checked them against its limits); 0 where one cannot be read, which decoding
    then reports."""
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        return max(0, int(ds.Rows) * int(ds.Columns) * frames * samples)
    except Exception:  # noqa: BLE001 - any unreadable value: not counted
        return 0


def _load_cine(datasets: list[Dataset], paths: list[Path], concatenated: bool = False) -> LoadedRun:
    if concatenated:  # the parts in order (``_concatenation``): their frames joined
        sizes = {(int(ds.Rows), int(ds.Columns)) for ds in datasets}
        if len(sizes) > 1:
            raise RunError(f"the parts of the concatenation differ in size: {sorted(sizes)}")
        frames = np.concatenate(
            [
                _decode_and_release(ds, p).reshape(-1, int(ds.Rows), int(ds.Columns))
                for ds, p in zip(datasets, paths, strict=True)
            ]
        )
        times, timing_problem = _concatenation_times(datasets)
    elif len(datasets) > 1:
        numbers = [header_floats(ds, "InstanceNumber") or [i] for i, ds in enumerate(datasets)]
        order = np.argsort([n[0] for n in numbers], kind="stable")
        datasets = [datasets[i] for i in order]
        paths = [paths[i] for i in order]
        sizes = {(int(ds.Rows), int(ds.Columns)) for ds in datasets}
        if len(sizes) > 1:
            raise RunError(f"the instances of the series differ in size: {sorted(sizes)}")
        frames = np.stack(
            [
                _decode_and_release(ds, p).reshape(-1, int(ds.Rows), int(ds.Columns))[0]
                for ds, p in zip(datasets, paths, strict=True)
            ]
        )
        times, timing_problem = _instance_times(datasets)
    else:
        ds = datasets[0]
        arr = _decode_and_release(ds, paths[0])
        frames = arr.reshape(-1, int(ds.Rows), int(ds.Columns))
        times, timing_problem = frame_times_s(ds, frames.shape[0])
    first = datasets[0]
    if str(first.get("PhotometricInterpretation", "MONOCHROME2")) == "MONOCHROME1":
        frames = frames.max() - frames  # keep 'vessels dark' meaning of MONOCHROME2
    shutter = shutter_from_header(first)
    frames, mask_subtracted, shift = _mask_subtract(frames, first, shutter)
    image_type = tuple(str(v).upper() for v in (first.get("ImageType") or []))
    spacing = plane_spacing_2d(first)
    meta = RunMeta(
        modality=str(first.get("Modality", "")),
        sop_class_uid=str(first.SOPClassUID),
        rows=int(first.Rows),
        columns=int(first.Columns),
        number_of_frames=frames.shape[0],
        frame_times_s=times,
        pixel_spacing_mm=spacing,
        image_type=image_type,
        body_part=str(first.get("BodyPartExamined", "")),
        series_description=str(first.get("SeriesDescription", "")),
        subtracted=mask_subtracted or "SUBTRACTION" in image_type,
        is_volume=False,
        frame_rate=frame_rate(first),
        extra={
            "mask_subtracted": mask_subtracted,
            "timing_problem": timing_problem,
            "mask_shift": shift,  # pipelines.pixel_shift.Shift, or None
        },
        shutter=shutter,
    )
    return LoadedRun(
        Run(pixels=frames.astype(np.float32, copy=False), meta=meta),
        _strip_all(datasets),
    )


def _concatenation_times(parts: list[Dataset]) -> tuple[np.ndarray | None, str]:
    """The frame times of a concatenation's parts, joined: each part's own
    (``frame_times_s``), after the one before it by the time to its first frame (its
    Frame Time Vector's first increment, its Frame Time, or the per-frame acquisition
    date-times across the two parts). Never guessed: a gap not given is a problem."""
    joined: list[np.ndarray] = []
    for k, ds in enumerate(parts, start=1):
        times, problem = frame_times_s(ds, int(ds.get("NumberOfFrames", 1) or 1))
        if times is None:
            return None, f"part {k} of the concatenation: {problem}"
        if joined:
            gap = _gap_s(parts[k - 2], ds)
            if gap is None:
                return (
                    None,
                    f"the time from part {k - 1} to part {k} of the concatenation is not given",
                )
            times = times + joined[-1][-1] + gap
        joined.append(times)
    return np.concatenate(joined), ""


def _gap_s(before: Dataset, part: Dataset) -> float | None:
    """Seconds from the last frame of ``before`` to the first of ``part``."""
    ftv = header_floats(part, "FrameTimeVector")
    if ftv and ftv[0] > 0:
        return ftv[0] / 1000.0
    ft = header_floats(part, "FrameTime")
    if ft and len(ft) == 1 and ft[0] > 0:
        return ft[0] / 1000.0
    try:
        first = _acquired_at(part.PerFrameFunctionalGroupsSequence[0])
        gap = (first - _acquired_at(before.PerFrameFunctionalGroupsSequence[-1])).total_seconds()
    except Exception:  # noqa: BLE001 - absent or unreadable: the gap is not given
        return None
    return gap if gap > 0 else None


def _instance_times(datasets: list[Dataset]) -> tuple[np.ndarray | None, str]:
    """Times of a multi-instance series from Acquisition (or Content) Time, with its
    date where both instances have one. A time without a date that falls more than
    12 h back from the one before is the next day's: a run across midnight."""
    stamps: list[tuple[float, datetime.date | None]] = []
    for ds in datasets:
        keys = ("AcquisitionDate", "AcquisitionTime")
        if not ds.get("AcquisitionTime"):
            keys = ("ContentDate", "ContentTime")
        try:
            t = TM(str(ds.get(keys[1])))
        except (TypeError, ValueError):
            return (
                None,
                f"instance {ds.get('InstanceNumber', '?')} has no readable Acquisition Time",
            )
        try:
            day: datetime.date | None = DA(str(ds.get(keys[0]))) if ds.get(keys[0]) else None
        except (TypeError, ValueError):
            day = None
        stamps.append((t.hour * 3600 + t.minute * 60 + t.second + t.microsecond / 1e6, day))
    steps = []
    for (before, day_before), (after, day) in itertools.pairwise(stamps):
        step = after - before
        if day is not None and day_before is not None:
            step += (day - day_before).days * 86400.0
        elif step < -43200.0:
            step += 86400.0
        steps.append(step)
    times = np.concatenate([[0.0], np.cumsum(steps)])
    if np.all(np.asarray(steps) >= 0):
        return times, ""
    return None, "Acquisition Times of the instances are not in instance order"


def _load_volume(datasets: list[Dataset], paths: list[Path]) -> LoadedRun:
    first = datasets[0]
    if len(datasets) == 1:
        vol = _decode_and_release(first, paths[0])
        if vol.ndim == 2:
            raise RunError("a single 2D slice is not a volume")
        headers = [_strip(first)]  # geometry from what the results copy, as a series'
        geometry = enhanced_geometry(headers[0], vol.shape[0])
        spacing, slice_spacing = geometry.pixel_spacing_mm, geometry.slice_spacing_mm
        if fill_pixel_measures(headers[0], slice_spacing):
            log.info("Pixel Measures without a usable slice thickness or spacing: the step given")
        if not np.array_equal(geometry.order, np.arange(len(geometry.order))):
            vol = vol[geometry.order]
            log.info("reordered %d frames of %s by plane position", vol.shape[0], paths[0].name)
    else:
        headers = _strip_all(datasets)
        geometry = series_geometry(headers)
        order = geometry.order
        datasets = [datasets[i] for i in order]
        headers = [headers[i] for i in order]
        paths = [paths[i] for i in order]
        sizes = {(int(ds.Rows), int(ds.Columns)) for ds in datasets}
        if len(sizes) > 1:
            raise RunError(f"the slices of the series differ in size: {sorted(sizes)}")
        vol = np.empty((len(datasets), *sizes.pop()), np.float32)
        for i, (ds, p) in enumerate(zip(datasets, paths, strict=True)):
            pixels = _decode_and_release(ds, p)
            if pixels.shape != vol.shape[1:]:
                raise RunError(f"{p.name} holds {pixels.shape} pixels, not one slice")
            vol[i] = pixels
        spacing, slice_spacing = geometry.pixel_spacing_mm, geometry.slice_spacing_mm
        filled = fill_slice_thickness(headers, slice_spacing)
        if filled:
            log.info("Slice Thickness of %d slice(s) missing: the slice step given", filled)
    meta = RunMeta(
        modality=str(first.get("Modality", "")),
        sop_class_uid=str(first.SOPClassUID),
        rows=int(first.Rows),
        columns=int(first.Columns),
        number_of_frames=vol.shape[0],
        pixel_spacing_mm=spacing,
        slice_spacing_mm=slice_spacing,
        image_type=tuple(str(v).upper() for v in (first.get("ImageType") or [])),
        body_part=str(first.get("BodyPartExamined", "")),
        series_description=str(first.get("SeriesDescription", "")),
        is_volume=True,
    )
    return LoadedRun(Run(pixels=vol.astype(np.float32, copy=False), meta=meta), headers)
