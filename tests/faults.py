"""A generated corpus of malformed instances, for the fault suite (tests/test_faults.py).

Every case starts from a small valid XA run (``tests.dicomgen.xa_run``) with its
own UIDs and breaks it in one of the ways senders break data: truncations, byte
flips, wrong VRs, false lengths, hostile and missing UIDs, decompression bombs,
inconsistent pixel modules, transfer syntax mismatches and bad timing values,
plus random combinations. The corpus is deterministic for a seed. Cases keep
their file meta intact (the SCU reads it to choose a presentation context) and
are sent as raw bytes, never re-encoded.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.filewriter import write_file_meta_info
from pydicom.tag import Tag
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    KeyObjectSelectionDocumentStorage,
    RLELossless,
    XRayAngiographicImageStorage,
    generate_uid,
)
from pynetdicom import AE

from dicom_node.sopclasses import TRANSFER_SYNTAXES
from tests.dicomgen import htj2k, rejection_note, xa_run

CATEGORIES = (
    "truncation",
    "byte flip",
    "wrong VR",
    "false length",
    "hostile UID",
    "bomb",
    "pixel module",
    "transfer syntax",
    "timing",
    "identity value",
    "rejection note",
    "combination",
)


@dataclass(frozen=True)
class Case:
    name: str
    category: str
    data: bytes


def encode(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def dataset_offset(data: bytes) -> int:
    """Where the data set starts, after preamble and file meta."""
    fp = io.BytesIO(data)
    read_preamble(fp, True)
    _read_file_meta_info(fp)
    return fp.tell()


def relabel(data: bytes, transfer_syntax: str | None = None, sop_uid: str | None = None) -> bytes:
    """The same data set bytes behind another file meta: another transfer syntax, or a
    valid SOP Instance UID for the request when the data set's own is hostile."""
    fp = io.BytesIO(data)
    read_preamble(fp, True)
    old = _read_file_meta_info(fp)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = XRayAngiographicImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid or old.MediaStorageSOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax or old.TransferSyntaxUID
    buf = DicomBytesIO()
    buf.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)
    return buf.getvalue() + data[fp.tell() :]


def raw(ds: Dataset, keyword: str, vr: str, value: str) -> None:
    """Set an element to exactly these characters (pydicom would refuse to build them)."""
    tag = Tag(keyword)
    data = value.encode("latin-1")
    if len(data) % 2:
        data += b" "
    ds[tag] = RawDataElement(tag, vr, len(data), data, 0, False, True)


def fresh(frames: int = 8, size: int = 64, seed: int = 0) -> Dataset:
    ds = xa_run(frames=frames, rows=size, cols=size, seed=seed)
    ds.SeriesInstanceUID = generate_uid()
    ds["PixelData"].VR = "OW"  # not ambiguous, so it can be written without Bits Allocated
    return ds


def _element_offset(data: bytes, keyword_tag: int, start: int) -> int:
    """Offset of an Explicit VR Little Endian element's tag in ``data`` (or -1)."""
    tag = Tag(keyword_tag)
    return data.find(struct.pack("<HH", tag.group, tag.element), start)


TAGS = {
    "Rows": 0x00280010,
    "Columns": 0x00280011,
    "NumberOfFrames": 0x00280008,
    "BitsAllocated": 0x00280100,
    "BitsStored": 0x00280101,
    "SamplesPerPixel": 0x00280002,
    "FrameTime": 0x00181063,
    "SOPInstanceUID": 0x00080018,
    "StudyInstanceUID": 0x0020000D,
    "SeriesInstanceUID": 0x0020000E,
    "SOPClassUID": 0x00080016,
    "ImageType": 0x00080008,
    "PixelData": 0x7FE00010,
    "PatientName": 0x00100010,
    "FrameIncrementPointer": 0x00280009,
}
VRS = (b"UL", b"SQ", b"OB", b"XX", b"DS", b"US", b"UN", b"AT", b"FD", b"LO")
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"OV"}


def truncations(rng: np.random.Generator) -> Iterator[Case]:
    for i in range(40):
        data = encode(fresh(seed=i))
        start = dataset_offset(data)
        # half in the header, half anywhere in the data set
        end = start + 700 if i % 2 == 0 else len(data)
        cut = int(rng.integers(start + 1, min(end, len(data) - 1)))
        yield Case(f"truncated at {cut} of {len(data)}", "truncation", data[:cut])


def byte_flips(rng: np.random.Generator) -> Iterator[Case]:
    for i in range(60):
        data = bytearray(encode(fresh(seed=100 + i)))
        start = dataset_offset(bytes(data))
        header_end = _element_offset(bytes(data), TAGS["PixelData"], start) + 12
        span = (start, header_end) if i % 4 else (start, len(data))
        n = int(rng.integers(1, 21))
        for pos in rng.integers(span[0], span[1], n):
            data[int(pos)] ^= int(rng.integers(1, 256))
        yield Case(f"{n} byte(s) flipped", "byte flip", bytes(data))


def wrong_vrs(rng: np.random.Generator) -> Iterator[Case]:
    names = list(TAGS)
    for i in range(36):
        name = names[i % len(names)]
        vr = VRS[int(rng.integers(0, len(VRS)))]
        data = bytearray(encode(fresh(seed=200 + i)))
        pos = _element_offset(bytes(data), TAGS[name], dataset_offset(bytes(data)))
        if pos < 0:
            continue
        data[pos + 4 : pos + 6] = vr
        yield Case(f"{name} with VR {vr.decode()}", "wrong VR", bytes(data))
    # An empty element with an unknown VR: pydicom converts an empty raw element when it
    # is asked for, and the unknown VR then raises (found by the corpus of seed 87, on an
    # empty Patient's Birth Date). The character set is read while the file is parsed.
    for keyword, tag in (("PatientBirthDate", 0x00100030), ("SpecificCharacterSet", 0x00080005)):
        ds = fresh(seed=260)
        setattr(ds, keyword, "")
        data = bytearray(encode(ds))
        pos = _element_offset(bytes(data), tag, dataset_offset(bytes(data)))
        data[pos + 4 : pos + 6] = b"XX"
        yield Case(f"an empty {keyword} with VR XX", "wrong VR", bytes(data))


def false_lengths(rng: np.random.Generator) -> Iterator[Case]:
    names = list(TAGS)
    for i in range(36):
        name = names[i % len(names)]
        data = bytearray(encode(fresh(seed=300 + i)))
        pos = _element_offset(bytes(data), TAGS[name], dataset_offset(bytes(data)))
        if pos < 0:
            continue
        vr = bytes(data[pos + 4 : pos + 6])
        if vr in _LONG_VRS:
            value = [0, 1, 0xFFFFFFFF, 0x7FFFFFFF, int(rng.integers(2, 2**31))][i % 5]
            data[pos + 8 : pos + 12] = struct.pack("<L", value)
        else:
            value = [0, 1, 0xFFFF, 0xFFFE, int(rng.integers(2, 2**16))][i % 5]
            data[pos + 6 : pos + 8] = struct.pack("<H", value)
        yield Case(f"{name} length {value}", "false length", bytes(data))


def hostile_uids(rng: np.random.Generator) -> Iterator[Case]:
    values = [
        "",
        "..",
        "../../etc/passwd",
        "1.2.3/4",
        "1.2.3\\4",
        "1" * 65,
        "1." + "2" * 80,
        "1..2",
        "1.2.3.x",
        "-1.2",
        "1.2.3\x00\x00",
        " 1.2.3",
        "1.2.840.10008.5.1.4.1.1.4",
    ]
    for i, value in enumerate(values):
        for keyword in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
            ds = fresh(seed=400 + i)
            raw(ds, keyword, "UI", value)
            # the request carries a valid UID (the SCU needs one); the data set the hostile one
            data = relabel(encode(ds), sop_uid=generate_uid())
            yield Case(f"{keyword} {value[:20]!r}", "hostile UID", data)
    for keyword in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "SOPClassUID"):
        ds = fresh(seed=450)
        del ds[keyword]
        yield Case(f"no {keyword}", "hostile UID", encode(ds))
    ds = fresh(seed=451)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR, while the request says XA
    yield Case("SOP Class differs from the request", "hostile UID", relabel(encode(ds)))


def _compressed(ts: str, frames: int = 2, size: int = 64, seed: int = 0) -> Dataset:
    ds = fresh(frames=frames, size=size, seed=seed)
    if ts == HTJ2KLossless:  # pydicom encodes no HTJ2K
        return htj2k(ds, ts)
    ds.compress(ts)
    return ds


def _patch_j2k_size(ds: Dataset, rows: int, cols: int) -> Dataset:
    """Rewrite the SIZ marker of every JPEG 2000 codestream (ISO 15444-1 A.5.1)."""
    raw = bytearray(ds.PixelData)
    pos = 0
    while (pos := raw.find(b"\xff\x4f\xff\x51", pos)) >= 0:
        raw[pos + 8 : pos + 16] = struct.pack(">2I", cols, rows)
        pos += 4
    ds.PixelData = bytes(raw)
    return ds


def _jpeg_baseline(rows: int, cols: int, sof: tuple[int, int] | None = None) -> Dataset:
    ds = fresh(frames=1, size=rows)
    ds.Columns = cols
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    del ds.NumberOfFrames
    buf = io.BytesIO()
    Image.fromarray((np.arange(rows * cols) % 250).astype(np.uint8).reshape(rows, cols)).save(
        buf, "JPEG"
    )
    frame = bytearray(buf.getvalue())
    if sof is not None:
        pos = frame.find(b"\xff\xc0")
        frame[pos + 5 : pos + 9] = struct.pack(">2H", *sof)
    ds.PixelData = encapsulate([bytes(frame)])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PhotometricInterpretation = "MONOCHROME2"
    return ds


def _rle_panic() -> Dataset:
    """Rows = Columns = 1 with oversized segments: pylibjpeg-rle's decoder panics (a
    BaseException). Two frames, so that the default rules route it to processing."""
    ds = fresh(frames=2, size=1)
    body = np.random.default_rng(0).integers(0, 256, 41000, dtype=np.uint8).tobytes()
    header = struct.pack("<16L", 2, 64, 64 + 20000, *([0] * 13))
    ds.PixelData = encapsulate([header + body, header + body])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = RLELossless
    return ds


def _deflate_bomb(inflated_bytes: int) -> bytes:
    """A deflated data set whose Pixel Data inflates to ``inflated_bytes`` of zeros."""
    ds = fresh(frames=1, size=8)
    del ds.NumberOfFrames
    del ds.PixelData
    plain = encode(ds)
    start = dataset_offset(plain)
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    pixel_header = struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, inflated_bytes)
    out = [comp.compress(plain[start:] + pixel_header)]
    chunk = bytes(2**20)
    out.extend(comp.compress(chunk) for _ in range(inflated_bytes // len(chunk)))
    out.append(comp.flush())
    return relabel(plain[:start], DeflatedExplicitVRLittleEndian) + b"".join(out)


def _before(data: bytes, tag: int) -> int:
    """Where the element ``tag`` (group, element as one int) starts in explicit VR
    little endian ``data``, found by its bytes."""
    return data.index(struct.pack("<HH", tag >> 16, tag & 0xFFFF), dataset_offset(data))


def many_elements(count: int, frames: int = 2) -> bytes:
    """A valid data set with ``count`` private four-byte elements in its header: a few
    MB of elements that a parser holds at about 40 times their bytes."""
    plain = encode(fresh(frames=frames, size=16))
    elements = []
    group, element = 0x0009, 0x1000
    for value in range(count):
        elements.append(struct.pack("<HH2sHI", group, element, b"UL", 4, value))
        group, element = (group + 2, 0x1000) if element == 0xFFFF else (group, element + 1)
    at = _before(
        plain, 0x0020000D
    )  # Study Instance UID: the private groups 0009-001F lie before it
    return plain[:at] + b"".join(elements) + plain[at:]


def nested_sequences(depth: int) -> bytes:
    """A valid data set holding one private sequence nested ``depth`` levels deep."""
    plain = encode(fresh(frames=2, size=16))
    sq = struct.pack("<HH2sHI", 0x0009, 0x1010, b"SQ", 0, 0xFFFFFFFF)
    item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    end = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    at = _before(plain, 0x0020000D)
    return plain[:at] + (sq + item) * depth + end * depth + plain[at:]


def bombs(rng: np.random.Generator) -> Iterator[Case]:
    for seed in range(3):
        ds = _patch_j2k_size(_compressed(JPEG2000Lossless, seed=seed), 60000, 60000)
        yield Case("JPEG 2000 codestream 60000x60000, header 64x64", "bomb", encode(ds))
    ds = _patch_j2k_size(_compressed(HTJ2KLossless), 60000, 60000)
    yield Case("HTJ2K codestream 60000x60000, header 64x64", "bomb", encode(ds))
    for seed in range(3):
        ds = _compressed(JPEG2000Lossless, frames=1, seed=seed)
        ds.Rows = ds.Columns = 60000
        yield Case("header 60000x60000, 6 KB of JPEG 2000", "bomb", encode(ds))
    for seed in range(3):
        ds = _compressed(JPEGLSLossless, seed=seed)
        ds.NumberOfFrames = 4_000_000
        yield Case("4,000,000 frames declared", "bomb", encode(ds))
    yield Case(
        "JPEG SOF 40000x40000, header 64x64", "bomb", encode(_jpeg_baseline(64, 64, (40000, 40000)))
    )
    yield Case("RLE 1x1 whose decoder panics", "bomb", encode(_rle_panic()))
    for size in (96, 128):
        yield Case(f"deflate bomb {size} MiB", "bomb", _deflate_bomb(size * 2**20))
    ds = fresh(frames=1, size=8)
    ds.Rows = ds.Columns = 65535
    ds.NumberOfFrames = 9999
    yield Case("native 65535x65535x9999 declared, 8x8 sent", "bomb", encode(ds))
    yield Case("300,000 private elements in the header", "bomb", many_elements(300_000))
    yield Case("a sequence nested 5000 deep", "bomb", nested_sequences(5000))


def pixel_modules(rng: np.random.Generator) -> Iterator[Case]:
    edits: list[tuple[str, Callable[[Dataset], None]]] = [
        ("Bits Allocated 0", lambda d: setattr(d, "BitsAllocated", 0)),
        ("Bits Allocated 7", lambda d: setattr(d, "BitsAllocated", 7)),
        ("Bits Allocated 12", lambda d: setattr(d, "BitsAllocated", 12)),
        ("Bits Allocated 24", lambda d: setattr(d, "BitsAllocated", 24)),
        ("Bits Stored 17", lambda d: setattr(d, "BitsStored", 17)),
        ("High Bit 20", lambda d: setattr(d, "HighBit", 20)),
        ("Samples per Pixel 0", lambda d: setattr(d, "SamplesPerPixel", 0)),
        ("Samples per Pixel 2", lambda d: setattr(d, "SamplesPerPixel", 2)),
        ("Samples per Pixel 3, MONOCHROME2", lambda d: setattr(d, "SamplesPerPixel", 3)),
        ("Rows 0", lambda d: setattr(d, "Rows", 0)),
        ("Columns 0", lambda d: setattr(d, "Columns", 0)),
        ("Rows 65", lambda d: setattr(d, "Rows", 65)),
        ("Columns 63", lambda d: setattr(d, "Columns", 63)),
        ("Pixel Representation 7", lambda d: setattr(d, "PixelRepresentation", 7)),
        ("Pixel Representation 1", lambda d: setattr(d, "PixelRepresentation", 1)),
        ("Photometric RGB", lambda d: setattr(d, "PhotometricInterpretation", "RGB")),
        (
            "Photometric YBR_FULL_422",
            lambda d: setattr(d, "PhotometricInterpretation", "YBR_FULL_422"),
        ),
        (
            "Photometric PALETTE COLOR",
            lambda d: setattr(d, "PhotometricInterpretation", "PALETTE COLOR"),
        ),
        ("Photometric 'XYZ'", lambda d: setattr(d, "PhotometricInterpretation", "XYZ")),
        (
            "Photometric MONOCHROME1",
            lambda d: setattr(d, "PhotometricInterpretation", "MONOCHROME1"),
        ),
        ("Planar Configuration 5", lambda d: setattr(d, "PlanarConfiguration", 5)),
        ("Number of Frames 0", lambda d: setattr(d, "NumberOfFrames", 0)),
        ("Number of Frames 'abc'", lambda d: raw(d, "NumberOfFrames", "IS", "abc")),
        ("Number of Frames 9 of 8", lambda d: setattr(d, "NumberOfFrames", 9)),
        ("Number of Frames 1 of 8", lambda d: setattr(d, "NumberOfFrames", 1)),
        ("no Rows", lambda d: delattr(d, "Rows")),
        ("no Bits Allocated", lambda d: delattr(d, "BitsAllocated")),
        ("no Pixel Data", lambda d: delattr(d, "PixelData")),
        ("empty Pixel Data", lambda d: setattr(d, "PixelData", b"")),
        (
            "Pixel Data 3 bytes too long",
            lambda d: setattr(d, "PixelData", d.PixelData + b"\0\0\0\0"),
        ),
        ("Rescale Slope 'x'", lambda d: raw(d, "RescaleSlope", "DS", "x")),
        (
            "Rescale Slope 0",
            lambda d: (setattr(d, "RescaleSlope", 0), setattr(d, "RescaleIntercept", 0)),
        ),
        ("Image Type empty", lambda d: setattr(d, "ImageType", "")),
    ]
    for i, (name, edit) in enumerate(edits):
        ds = fresh(seed=500 + i)
        edit(ds)
        yield Case(name, "pixel module", encode(ds))


def transfer_syntaxes(rng: np.random.Generator) -> Iterator[Case]:
    for i, ts in enumerate(
        (
            JPEGBaseline8Bit,
            JPEG2000Lossless,
            HTJ2KLossless,
            RLELossless,
            JPEGLSLossless,
            DeflatedExplicitVRLittleEndian,
            ImplicitVRLittleEndian,
            ExplicitVRBigEndian,
        )
    ):
        data = relabel(encode(fresh(seed=600 + i)), ts)
        yield Case(f"Explicit VR Little Endian data labelled {ts.name}", "transfer syntax", data)
    # HTJ2K codestreams damaged past their headers: what openjpeg's decoder, newer than
    # its JPEG 2000 one, meets (in the worker's sandbox, never the node's process)
    for i in range(4):
        ds = _compressed(HTJ2KLossless, seed=640 + i)
        stream = bytearray(ds.PixelData)
        body = bytes(stream).index(b"\xff\x90")  # the first tile-part (SOT)
        n = int(rng.integers(1, 33))
        for pos in rng.integers(body + 12, len(stream), n):
            stream[int(pos)] ^= int(rng.integers(1, 256))
        ds.PixelData = bytes(stream)
        yield Case(f"HTJ2K codestream with {n} byte(s) flipped", "transfer syntax", encode(ds))
    for i, ts in enumerate((JPEG2000Lossless, HTJ2KLossless, RLELossless, JPEGLSLossless)):
        compressed = encode(_compressed(ts, seed=620 + i))
        yield Case(
            f"{ts.name} data labelled Explicit VR Little Endian",
            "transfer syntax",
            relabel(compressed, ExplicitVRLittleEndian),
        )
        other = RLELossless if ts != RLELossless else JPEG2000Lossless
        yield Case(
            f"{ts.name} data labelled {other.name}", "transfer syntax", relabel(compressed, other)
        )


def timings(rng: np.random.Generator) -> Iterator[Case]:
    values: list[tuple[str, Callable[[Dataset], None]]] = []
    for ft in ("abc", "1\\2", "-40", "0", "nan", "inf", "1e308", "", "1e-9", "-0"):
        values.append((f"Frame Time {ft!r}", lambda d, ft=ft: raw(d, "FrameTime", "DS", ft)))
    for ftv in (
        "1",
        "0\\a\\b",
        "0\\100\\100",
        "0\\-100\\-100\\-100\\-100\\-100\\-100\\-100",
        "0\\0\\0\\0\\0\\0\\0\\0",
        "0\\1e300\\1e300\\1e300\\1e300\\1e300\\1e300\\1e300",
        "0\\nan\\100\\100\\100\\100\\100\\100",
        "",
        "5\\5\\5\\5\\5\\5\\5\\5\\5\\5\\5",
    ):

        def edit(d: Dataset, ftv: str = ftv) -> None:
            del d.FrameTime
            d.FrameIncrementPointer = 0x00181065
            raw(d, "FrameTimeVector", "DS", ftv)

        values.append((f"Frame Time Vector {ftv[:24]!r}", edit))
    values += [
        (
            "Frame Increment Pointer to nothing",
            lambda d: setattr(d, "FrameIncrementPointer", 0x00191234),
        ),
        ("no timing at all", lambda d: delattr(d, "FrameTime")),
        (
            "Cine Rate 'x', no Frame Time",
            lambda d: (delattr(d, "FrameTime"), raw(d, "CineRate", "IS", "x")),
        ),
        (
            "Cine Rate 0, no Frame Time",
            lambda d: (delattr(d, "FrameTime"), setattr(d, "CineRate", 0)),
        ),
        ("Frame Time 1e-300", lambda d: raw(d, "FrameTime", "DS", "1e-300")),
        ("Acquisition Time 'zz'", lambda d: raw(d, "AcquisitionTime", "TM", "zz")),
        ("Frame Time 3, 8 frames", lambda d: setattr(d, "FrameTime", "3")),
        ("Frame Time 100000", lambda d: setattr(d, "FrameTime", "100000")),
        ("Mask Frame Numbers 99", _mask(99)),
        ("Mask Frame Numbers 0", _mask(0)),
        ("Mask Operation 'XYZ'", _mask(1, "XYZ")),
    ]
    for i, (name, edit) in enumerate(values):
        ds = fresh(seed=700 + i)
        edit(ds)
        yield Case(name, "timing", encode(ds))
    # A value its VR cannot hold, which raises when it is converted (an FD whose length
    # is not a multiple of 8: found by the corpus of seed 17). pydicom will not write
    # one, so the VR is changed in the encoded bytes.
    for keyword in ("FrameTime", "FrameTimeVector"):
        ds = fresh(seed=790)
        if keyword == "FrameTimeVector":
            del ds.FrameTime
            ds.FrameIncrementPointer = 0x00181065
        raw(ds, keyword, "DS", "0123456789")
        data = bytearray(encode(ds))
        pos = _element_offset(bytes(data), int(Tag(keyword)), dataset_offset(bytes(data)))
        data[pos + 4 : pos + 6] = b"FD"
        yield Case(f"{keyword} as an FD of 10 bytes", "timing", bytes(data))


def _mask(frame: int, op: str = "AVG_SUB") -> Callable[[Dataset], None]:
    def edit(d: Dataset) -> None:
        item = Dataset()
        item.MaskOperation = op
        item.MaskFrameNumbers = frame
        d.MaskSubtractionSequence = [item]
        d.ImageType = ["ORIGINAL", "PRIMARY", "SINGLE PLANE"]

    return edit


# Values a sender writes that are well formed, or nearly, but not what their attribute
# may hold: February 30th, a sex the standard has no code for (Patient's Sex "U" made
# every SEG, Parametric Map and SR fail: highdicom validates the identity it copies).
IDENTITY_VALUES: dict[str, tuple[str, ...]] = {
    "PatientSex": ("U", "X", "f", "M\\F", "MALE", "0"),
    "PatientBirthDate": ("19800231", "20260229", "00000000", "19800100", "1980", "1980-01-01"),
    "StudyDate": ("20260231", "20261301", "00000000", "99991231", "2026.01.01", "26"),
    "StudyTime": ("246000", "235960", "9", "12:30:00", "120000.1234567", "-1"),
    "SeriesDate": ("20260230", "yesterday"),
    "AcquisitionDateTime": ("20260231120000", "2026013125", "20260101+9999"),
    "PatientAge": ("abc", "999Y", "045y", "45"),
    "PatientName": ("A" * 200, "=", "^^^^^", "a\\b"),
    "PatientID": ("X" * 100, " "),
    "StudyID": ("S" * 40,),
    "AccessionNumber": ("N" * 40,),
    "ReferringPhysicianName": ("R^" * 100,),
    "Laterality": ("X", "LR"),
    "PatientWeight": ("-5", "abc", "1e400"),
    "PatientSize": ("0", "nan"),
}


def identity_values(rng: np.random.Generator) -> Iterator[Case]:
    names = list(IDENTITY_VALUES)
    for i in range(30):
        ds = fresh(seed=900 + i)
        written = []
        for name in rng.choice(names, size=int(rng.integers(1, 4)), replace=False):
            options = IDENTITY_VALUES[str(name)]
            value = options[int(rng.integers(0, len(options)))]
            raw(ds, str(name), dictionary_VR(str(name)), value)
            written.append(f"{name} {value!r}")
        yield Case(", ".join(written), "identity value", encode(ds))


def fuzzer_ae() -> AE:
    """The SCU that sends the corpus: one context per transfer syntax for XA (raw bytes
    go as they are), and the two little-endian ones for the rejection notes."""
    ae = AE(ae_title="FUZZER")
    for ts in TRANSFER_SYNTAXES:
        ae.add_requested_context(XRayAngiographicImageStorage, [ts])
    for ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        ae.add_requested_context(KeyObjectSelectionDocumentStorage, [ts])
    return ae


def _note(listed: list[str], title: tuple[str, str, str] | None = None) -> Dataset:
    """A rejection note (IHE IOCM) listing ``listed`` (SOP Instance UIDs of XA instances
    the node never held: the good runs of the fault suite must not be rejected)."""
    evidence = []
    study = generate_uid()
    series = generate_uid()
    for uid in listed:
        ds = Dataset()
        ds.SOPClassUID = XRayAngiographicImageStorage
        ds.SOPInstanceUID = uid
        ds.SeriesInstanceUID = series
        ds.StudyInstanceUID = study
        ds.PatientID = "TEST0999"  # the corpus's patient (tests/test_phi_logs.py)
        ds.PatientName = "TEST^XA"
        ds.PatientBirthDate = ""
        ds.PatientSex = ""
        ds.StudyDate = ds.StudyTime = ds.AccessionNumber = ds.StudyID = ""
        ds.ReferringPhysicianName = ""
        evidence.append(ds)
    return rejection_note(
        title or ("113037", "DCM", "Rejected for Patient Safety Reasons"), evidence
    )


def rejection_notes(rng: np.random.Generator) -> Iterator[Case]:
    """Key Object Selection Documents, which the node stores and reads whole
    (``dicom_node.rejection``): damaged, huge, untitled, or listing what it never held."""
    one = [str(generate_uid())]
    yield Case("a rejection of an instance never held", "rejection note", encode(_note(one)))
    untitled = _note(one)
    del untitled.ConceptNameCodeSequence
    yield Case("a rejection note without a title", "rejection note", encode(untitled))
    twice = _note(one)
    twice.ConceptNameCodeSequence.append(twice.ConceptNameCodeSequence[0])
    yield Case("a rejection note with two titles", "rejection note", encode(twice))
    yield Case(
        "a key object selection titled with a private code",
        "rejection note",
        encode(_note(one, ("X1", "99PRIVATE", "Private"))),
    )
    many = [f"2.25.{int(rng.integers(1, 2**62))}{k}" for k in range(5_000)]
    yield Case("a rejection of 5,000 instances", "rejection note", encode(_note(many)))
    huge = _note(one)
    huge.add_new(0x00991010, "OB", b"\0" * (5 * 2**20))
    huge.add_new(0x00990010, "LO", "FAULT")
    yield Case("a rejection note of 5 MiB", "rejection note", encode(huge))
    hostile = _note(one)
    ref = hostile.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    raw(ref.ReferencedSOPSequence[0], "ReferencedSOPInstanceUID", "UI", "1.2.\x00\\3")
    yield Case("a rejection listing a hostile UID", "rejection note", encode(hostile))
    data = encode(_note(one))
    for i in range(6):
        flipped = bytearray(data)
        start = dataset_offset(data)
        for pos in rng.integers(start, len(data), int(rng.integers(1, 16))):
            flipped[int(pos)] ^= 0xFF
        yield Case(f"a rejection note with bytes flipped ({i})", "rejection note", bytes(flipped))
        cut = int(rng.integers(start, len(data)))
        yield Case(f"a rejection note cut at {cut}", "rejection note", data[:cut])


def combinations(rng: np.random.Generator, pool: list[Case]) -> Iterator[Case]:
    """Random pairs of header-level mutations applied together (flip + length + VR)."""
    for i in range(40):
        data = bytearray(encode(fresh(seed=800 + i)))
        start = dataset_offset(bytes(data))
        names = rng.choice(list(TAGS), size=2, replace=False)
        for name in names:
            pos = _element_offset(bytes(data), TAGS[str(name)], start)
            if pos >= 0:
                data[pos + 4 : pos + 6] = VRS[int(rng.integers(0, len(VRS)))]
        for pos in rng.integers(start, start + 600, int(rng.integers(1, 6))):
            data[int(pos)] ^= 0xFF
        cut = len(data) - int(rng.integers(0, 2000))
        yield Case(
            f"VRs of {list(names)}, flips, cut {len(data) - cut}", "combination", bytes(data[:cut])
        )


def corpus(seed: int = 0) -> list[Case]:
    rng = np.random.default_rng(seed)
    cases: list[Case] = []
    for make in (
        truncations,
        byte_flips,
        wrong_vrs,
        false_lengths,
        hostile_uids,
        bombs,
        pixel_modules,
        transfer_syntaxes,
        timings,
        identity_values,
        rejection_notes,
    ):
        cases.extend(make(rng))
    cases.extend(combinations(rng, cases))
    return cases
