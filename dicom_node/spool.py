"""The durable spool: received bytes become a file that survives a crash before the
sender hears Success.

Order of operations for one instance: check the header (UIDs, SOP class, pixel
module, declared size against the limits: nothing is decoded), check free
space, write to ``tmp/`` (or take the file the storage SCP already wrote as the
data arrived), ``fsync`` the file, ``rename`` it into
``spool/<study>/<series>/<sop>.dcm``, ``fsync`` the directory, then index it.
A received file is read for its header only: pixel data in a native transfer
syntax is never loaded, so a large instance costs no memory.
Only then is Success returned. A duplicate SOP Instance UID is idempotent: the
file is replaced atomically and the index row kept.

At start, ``recover`` removes partial writes (and files of transfers cut off
mid-way) and indexes spool files a crash left unindexed (or moves them to
``quarantine/`` when they no longer pass the checks); ``sweep_tmp`` removes
such files while the node runs.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import BinaryIO, NamedTuple

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import parse_fragments
from pydicom.errors import InvalidDicomError
from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32

from dicom_node.db import Database, InstanceConflict, InstanceRecord
from dicom_node.errors import OutOfResources, RejectedInstance
from dicom_node.settings import LimitsSettings
from dicom_node.sopclasses import (
    ACCEPTED_SOP_CLASSES,
    CINE_2D,
    DOCUMENTS,
    NON_IMAGE,
    TRANSFER_SYNTAXES,
    UID_RE,
)

log = logging.getLogger(__name__)

_BITS_ALLOCATED = (1, 8, 16, 32, 64)
_ITEM_TAG = b"\xfe\xff\x00\xe0"
# Elements longer than this are left on disk when a header is read (pixel data).
_HEADER_DEFER_BYTES = 64 * 1024
# A deflated body is inflated this many bytes at a time (read and written).
_INFLATE_CHUNK = 1 << 20
# What of a codestream its size is looked for in: JPEG, JPEG-LS and JPEG 2000 put it
# in their first marker segments (pydicom's JPEG parser walks bytes that are not
# markers two at a time: 0.6 s for a fragment of 2 MiB).
_CODESTREAM_PREFIX = 4096
# Header checks at once: a parse holds the GIL and up to about 40 times the bytes it
# reads (limits.max_header_bytes), so more at once only adds memory, not speed.
_PARSES = threading.BoundedSemaphore(2)
# What a parse of hostile bytes raises in pydicom (struct and index errors included).
PARSE_ERRORS = (
    InvalidDicomError,
    EOFError,
    ValueError,
    KeyError,
    OSError,
    TypeError,
    IndexError,
    AttributeError,
    OverflowError,
    struct.error,
    zlib.error,
    NotImplementedError,
)


def check_uid(name: str, value: object, max_length: int = 64) -> str:
    """A UID we may use in a path: digits and dots only, at most 64 characters.

    Anything else (path separators, '..', NUL, padding tricks, over-long values)
    is hostile or broken and is refused.
    """
    text = str(value or "").rstrip("\0 ")
    if not text:
        raise RejectedInstance(RejectedInstance.CANNOT_UNDERSTAND, f"missing {name}")
    if len(text) > max_length:
        raise RejectedInstance(
            RejectedInstance.CANNOT_UNDERSTAND,
            f"{name} is {len(text)} characters long (max {max_length})",
        )
    if not UID_RE.match(text):
        raise RejectedInstance(
            RejectedInstance.CANNOT_UNDERSTAND,
            f"{name} {text[:80]!r} is not a valid UID (digits and dots only)",
        )
    return text


@dataclass(frozen=True)
class Header:
    """What the checks learned from an instance's header."""

    sop_class_uid: str
    sop_instance_uid: str
    series_uid: str
    study_uid: str
    transfer_syntax: str
    frames: int
    # A part of a 2D run a modality split into a concatenation (PS3.3 C.7.6.16.2.2.4):
    # its Concatenation UID, the run's ID, and how many instances make it (0: unknown)
    concatenation: str = ""
    concatenation_total: int = 0

    @property
    def single_instance_run(self) -> bool:
        if self.sop_class_uid in DOCUMENTS:
            return True
        return self.sop_class_uid in CINE_2D and self.frames > 1 and not self.concatenation

    @property
    def run_id(self) -> str:
        if self.concatenation:
            return self.concatenation
        return self.sop_instance_uid if self.single_instance_run else self.series_uid


@dataclass(frozen=True)
class Stored:
    sop_instance_uid: str
    series_uid: str
    study_uid: str
    run_id: str
    path: Path
    frames: int
    single_instance_run: bool
    duplicate: bool
    # the last instance of a concatenation came: its run is whole
    whole_concatenation: bool = False


def _held(head: Header, conflict: str) -> RejectedInstance:
    """A data set the index holds another instance or run under its UIDs for: the
    stored one keeps them."""
    return RejectedInstance(
        RejectedInstance.UID_HELD,
        f"{conflict}; this data set names series {head.series_uid} of study {head.study_uid}",
    )


def _mismatch(reason: str) -> RejectedInstance:
    return RejectedInstance(RejectedInstance.DATA_SET_DOES_NOT_MATCH_SOP_CLASS, reason)


def _too_large(reason: str) -> RejectedInstance:
    return RejectedInstance(RejectedInstance.OVER_LIMITS, reason)


class _Reader:
    """A file read through a budget: at most ``budget`` bytes read (seeks are free,
    and pydicom seeks past the values it defers) and nothing past ``end``.

    Memory spent parsing a header grows with the bytes the parser reads (a data set
    of 12 MB of four-byte elements took 520 MB), so the budget bounds it.
    """

    def __init__(self, fp: BinaryIO, budget: int, end: int | None = None) -> None:
        self._fp = fp
        self._left = budget
        self._end = end

    def read(self, size: int = -1) -> bytes:
        if self._end is not None:
            rest = max(0, self._end - self._fp.tell())
            size = rest if size < 0 else min(size, rest)
        if size < 0 or size > self._left:
            raise _HeaderTooLarge
        data = self._fp.read(size)
        self._left -= len(data)
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._fp.seek(offset, whence)

    def tell(self) -> int:
        return self._fp.tell()


class _HeaderTooLarge(Exception):
    pass


def _header_too_large(limits: LimitsSettings) -> RejectedInstance:
    return _too_large(
        f"reading the data set's header takes more than {limits.max_header_bytes} bytes "
        "(limits.max_header_bytes; values over 64 KiB are skipped, not read)"
    )


def _inflate(fp: BinaryIO, limits: LimitsSettings) -> BytesIO:
    """A deflated data set's body, inflated a chunk at a time with a bound (pydicom
    would read the whole file and inflate it whole, twice the memory and no bound)."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = BytesIO()
    bound = limits.max_inflated_bytes
    try:
        while data := inflater.unconsumed_tail or fp.read(_INFLATE_CHUNK):
            out.write(inflater.decompress(data, _INFLATE_CHUNK))
            if out.tell() > bound:
                raise _too_large(
                    f"deflated data set inflates to more than {bound} bytes "
                    "(limits.max_inflated_bytes)"
                )
    except zlib.error as exc:
        raise RejectedInstance(
            RejectedInstance.CANNOT_UNDERSTAND, f"deflated data set cannot be read: {exc}"
        ) from None
    out.seek(0)
    return out


def read_header(
    fp: BinaryIO, limits: LimitsSettings, inflate: bool = True
) -> tuple[Dataset, BinaryIO]:
    """The data set in ``fp`` with its values over 64 KiB left unread (deferred), read
    through a budget of ``limits.max_header_bytes``; a deflated body is inflated first,
    within ``limits.max_inflated_bytes`` (or, without ``inflate``, left out: only the
    file meta is read). Returns it and the stream its values' positions refer to.
    Raises RejectedInstance (0xC001 over a bound, 0xC000 when the bytes cannot be
    parsed)."""
    reader = _Reader(fp, limits.max_header_bytes)
    try:
        if reader.read(4) == b"DICM":
            raise RejectedInstance(
                RejectedInstance.CANNOT_UNDERSTAND,
                "a DICOM file with no 128-byte preamble ('DICM' first): send the whole file",
            )
        reader.seek(0)
        read_preamble(reader, True)  # type: ignore[arg-type]
        meta = _read_file_meta_info(reader)  # type: ignore[arg-type]
        if "TransferSyntaxUID" not in meta:
            # The storage SCP writes one for what a C-STORE brings; a STOW-RS part or a
            # file without it names no Transfer Syntax, which would be guessed.
            raise RejectedInstance(
                RejectedInstance.CANNOT_UNDERSTAND,
                "not a DICOM file: no File Meta Information with a Transfer Syntax UID "
                "(PS3.10; a STOW-RS part is a DICOM file, not a bare data set)",
            )
        if meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
            if not inflate:
                ds = Dataset()
                ds.file_meta = meta
                return ds, fp
            body: BinaryIO = _inflate(fp, limits)
            ds = read_dataset(
                _Reader(body, limits.max_header_bytes),  # type: ignore[arg-type]
                is_implicit_VR=False,
                is_little_endian=True,
                defer_size=_HEADER_DEFER_BYTES,
            )
            ds.file_meta = meta
            return ds, body
        _check_vr_encoding(reader, meta.get("TransferSyntaxUID"))
        fp.seek(0)
        return dcmread(reader, force=True, defer_size=_HEADER_DEFER_BYTES), fp  # type: ignore[arg-type]
    except _HeaderTooLarge:
        raise _header_too_large(limits) from None
    except RejectedInstance:
        raise
    except Exception as exc:  # noqa: BLE001 - hostile bytes make a parser raise anything
        raise RejectedInstance(
            RejectedInstance.CANNOT_UNDERSTAND,
            f"dataset cannot be parsed: {type(exc).__name__}: {exc}",
        ) from None


def _check_vr_encoding(fp: _Reader, transfer_syntax: object) -> None:
    """The data set at ``fp`` must use the VR encoding its transfer syntax names.

    pydicom reads a body in the other one (it warns and guesses, as its
    ``_is_implicit_VR`` does: the VR of the first element is two letters, or a
    length), but the stored file would then name an encoding its body does not use,
    and other readers (dcmtk's, a PACS) refuse it. In a C-STORE, the transfer
    syntax is the presentation context's."""
    syntax = UID(str(transfer_syntax or ""))
    if not syntax.is_transfer_syntax:
        return  # none, or unknown: the checks of the pixel module answer for it
    start = fp.tell()
    first = fp.read(6)
    fp.seek(start)
    if len(first) < 6:
        return
    implicit = not all(0x40 < byte < 0x5B for byte in first[4:6])
    if implicit != syntax.is_implicit_VR:
        found, named = ("implicit", "explicit") if implicit else ("explicit", "implicit")
        raise RejectedInstance(
            RejectedInstance.CANNOT_UNDERSTAND,
            f"data set is encoded in {found} VR, but its transfer syntax {syntax} is {named} VR",
        )


def _positive_int(ds: Dataset, keyword: str, default: int | None = None) -> int:
    value = ds.get(keyword, default)
    if value is None or value == "":
        if default is not None:
            return default
        raise _mismatch(f"image lacks {keyword}")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise _mismatch(f"{keyword} {str(value)[:20]!r} is not an integer") from None
    if number < 1:
        raise _mismatch(f"{keyword} is {number}")
    return number


def _codestream_size(fragment: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) a JPEG, JPEG-LS or JPEG 2000 codestream declares.

    pydicom parses JPEG headers (``_get_jpg_parameters``) but returns only the
    precision of a JPEG 2000 one; its SIZ marker (ISO 15444-1 A.5.1) is read here.
    """
    if fragment.startswith(b"\xff\xd8"):
        from pydicom.pixels.utils import _get_jpg_parameters

        info = _get_jpg_parameters(fragment)
        if "height" in info:
            return int(info["height"]), int(info["width"]), int(info["components"])
        return None
    if fragment.startswith(b"\xff\x4f\xff\x51") and len(fragment) >= 40:
        x, y, x0, y0 = struct.unpack(">4I", fragment[8:24])
        (components,) = struct.unpack(">H", fragment[38:40])
        return y - y0, x - x0, components
    return None


def _check_pixel_module(ds: Dataset, data_ts: UID, limits: LimitsSettings, body: BinaryIO) -> int:
    """Rows, Columns, frames, samples and bits: valid, within the limits, and matching
    what the pixel data holds. Returns the number of frames."""
    rows = _positive_int(ds, "Rows")
    cols = _positive_int(ds, "Columns")
    frames = _positive_int(ds, "NumberOfFrames", 1)
    spp = _positive_int(ds, "SamplesPerPixel", 1)
    bits = _positive_int(ds, "BitsAllocated")
    if bits not in _BITS_ALLOCATED:
        raise _mismatch(f"Bits Allocated is {bits}")
    if spp not in (1, 3):
        raise _mismatch(f"Samples per Pixel is {spp}")
    stored = ds.get("BitsStored")
    if stored not in (None, "") and not 1 <= _positive_int(ds, "BitsStored") <= bits:
        raise _mismatch(f"Bits Stored {stored} exceeds Bits Allocated {bits}")
    for name, value, limit in (
        ("Rows", rows, limits.max_rows),
        ("Columns", cols, limits.max_columns),
        ("Number of Frames", frames, limits.max_frames),
    ):
        if value > limit:
            raise _too_large(f"{name} {value} exceeds the limit {limit}")
    expected = (rows * cols * frames * spp * bits + 7) // 8
    if expected > limits.max_decoded_bytes:
        raise _too_large(
            f"declared image of {rows}x{cols}x{frames}x{spp}x{bits} bits decodes to "
            f"{expected} bytes, over limits.max_decoded_bytes {limits.max_decoded_bytes}"
        )
    item = ds.get_item("PixelData", keep_deferred=True)
    # a long value is left unread (deferred, None): its length is in its header
    value = None if item is None else item.value
    length = len(value) if value is not None else int(getattr(item, "length", 0) or 0)
    if item is None or not length:
        raise _mismatch("image has no Pixel Data")
    if not data_ts.is_compressed:
        if length < expected:
            raise RejectedInstance(
                RejectedInstance.CANNOT_UNDERSTAND,
                f"Pixel Data is truncated: {length} of {expected} bytes",
            )
        return frames
    if isinstance(item, RawDataElement) and value is None:  # left in the file
        fp, start = body, int(item.value_tell)
        end = None if length == 0xFFFFFFFF else start + length
    else:
        fp, start, end = BytesIO(bytes(value)), 0, len(value)
    fp.seek(start)
    if fp.read(4) != _ITEM_TAG:
        raise _mismatch(f"Pixel Data is not encapsulated, but the transfer syntax is {data_ts}")
    # RLE: one fragment a frame (PS3.5 A.4.2); without an offset table, frames cannot
    # be told apart otherwise (a RLE segment has no end marker)
    rle = data_ts == RLELossless and frames > 1 and "ExtendedOffsetTable" not in ds
    one_per_frame = frames if rle else None
    _check_fragments(fp, start, end, (rows, cols), limits, one_per_frame)
    return frames


def _check_fragments(
    fp: BinaryIO,
    start: int,
    end: int | None,
    size: tuple[int, int],
    limits: LimitsSettings,
    one_per_frame: int | None = None,
) -> None:
    """Encapsulated Pixel Data: items all the way through, every codestream's own size
    the header's, and with ``one_per_frame`` (RLE) one fragment a frame unless a Basic
    Offset Table says where each begins. Read from the file: a fragment's first bytes,
    never all of it."""
    fp.seek(start)
    try:
        _, offsets = parse_fragments(_Reader(fp, limits.max_header_bytes, end))  # type: ignore[arg-type]
    except _HeaderTooLarge:
        raise _header_too_large(limits) from None
    except PARSE_ERRORS as exc:
        raise RejectedInstance(
            RejectedInstance.CANNOT_UNDERSTAND, f"encapsulated Pixel Data is malformed: {exc}"
        ) from None
    if one_per_frame is not None and len(offsets) - 1 != one_per_frame:
        fp.seek(offsets[0] + 4)
        if struct.unpack("<I", fp.read(4))[0] == 0:  # an empty Basic Offset Table
            raise RejectedInstance(
                RejectedInstance.CANNOT_UNDERSTAND,
                f"RLE Lossless Pixel Data in {len(offsets) - 1} fragments for "
                f"{one_per_frame} frame(s), without a Basic Offset Table: which fragment "
                "belongs to which frame cannot be known (PS3.5 A.4.2: one fragment a frame)",
            )
    for offset in offsets[1:]:  # the first item is the Basic Offset Table
        fp.seek(offset + 4)
        (fragment_length,) = struct.unpack("<I", fp.read(4))
        prefix = fp.read(min(fragment_length, _CODESTREAM_PREFIX))
        found = _codestream_size(prefix)
        if found is not None and found[:2] != size:
            raise _mismatch(
                f"a codestream declares {found[0]}x{found[1]} pixels, the header "
                f"{size[0]}x{size[1]}"
            )


@contextlib.contextmanager
def _opened(source: bytes | Path) -> Iterator[BinaryIO]:
    if isinstance(source, bytes):
        yield BytesIO(source)
        return
    try:
        fh = open(source, "rb")  # noqa: SIM115 - closed below, after the deferred reads
    except OSError as exc:
        raise RejectedInstance(
            RejectedInstance.PROCESSING_FAILURE, f"received file cannot be read: {exc}"
        ) from None
    with fh:
        yield fh


class Requested(NamedTuple):
    """What a C-STORE request named: the data set must be of this SOP Class and carry
    this SOP Instance UID. Empty where nothing was named (STOW-RS, recovery)."""

    sop_class: str = ""
    sop_instance: str = ""


NOTHING_REQUESTED = Requested()


def inspect(
    source: bytes | Path,
    limits: LimitsSettings,
    requested: Requested = NOTHING_REQUESTED,
    max_uid_length: int = 64,
) -> Header:
    """Check a received data set (its bytes, or the file it was written to) without
    decoding its pixels; raises RejectedInstance with the precise status."""
    with _PARSES, _opened(source) as fp:
        return _inspect(fp, limits, requested, max_uid_length)


def _inspect(
    fp: BinaryIO, limits: LimitsSettings, requested: Requested, max_uid_length: int
) -> Header:
    ds, body = read_header(fp, limits)
    try:
        uids = [
            ds.get(kw)
            for kw in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")
        ]
        ts = UID(str(ds.file_meta.get("TransferSyntaxUID", "") or "1.2.840.10008.1.2"))
    except Exception as exc:  # noqa: BLE001 - hostile bytes make a parser raise anything
        raise RejectedInstance(
            RejectedInstance.CANNOT_UNDERSTAND,
            f"dataset cannot be parsed: {type(exc).__name__}: {exc}",
        ) from None
    sop_class = check_uid("SOP Class UID", uids[0], max_uid_length)
    sop_uid = check_uid("SOP Instance UID", uids[1], max_uid_length)
    series = check_uid("Series Instance UID", uids[2], max_uid_length)
    study = check_uid("Study Instance UID", uids[3], max_uid_length)
    if ts not in TRANSFER_SYNTAXES:  # a C-STORE's is its negotiated context's
        try:
            named = check_uid("Transfer Syntax UID", ts)
            named += f" ({ts.name if ts.is_transfer_syntax else 'not a DICOM transfer syntax'})"
        except RejectedInstance:
            named = "that is not a UID"
        raise RejectedInstance(
            RejectedInstance.TRANSFER_SYNTAX_NOT_SUPPORTED,
            f"transfer syntax {named} is not one this node decodes; send it in one of "
            "those its C-STORE accepts (an uncompressed one always is)",
        )
    if sop_class not in ACCEPTED_SOP_CLASSES:
        raise RejectedInstance(
            RejectedInstance.SOP_CLASS_NOT_SUPPORTED,
            f"SOP Class {sop_class} is not accepted by this node",
        )
    if requested.sop_class and sop_class != requested.sop_class:
        raise _mismatch(
            f"dataset SOP Class {sop_class} differs from the request's {requested.sop_class}"
        )
    # The sender counts the instance in its request as stored once answered Success.
    if requested.sop_instance and sop_uid != requested.sop_instance:
        raise _mismatch(
            f"dataset SOP Instance UID {sop_uid} differs from the request's "
            f"{requested.sop_instance[:max_uid_length]}"
        )
    frames = 1
    if sop_class not in NON_IMAGE:
        try:
            frames = _check_pixel_module(ds, ts, limits, body)
        except RejectedInstance:
            raise
        except Exception as exc:  # noqa: BLE001 - elements are parsed lazily, on access
            raise RejectedInstance(
                RejectedInstance.CANNOT_UNDERSTAND, f"pixel module cannot be read: {exc}"
            ) from None
    return Header(
        sop_class, sop_uid, series, study, str(ts), frames, *_concatenation(ds, sop_class)
    )


def _concatenation(ds: Dataset, sop_class: str) -> tuple[str, int]:
    """(Concatenation UID, In-concatenation Total Number) of a part of a concatenated 2D
    run, or ("", 0). Values that cannot be read leave the instance a run of its own,
    whose decoding says it is a part (``runs.load_run``)."""
    if sop_class not in CINE_2D or "ConcatenationUID" not in ds:
        return "", 0
    try:
        uid = check_uid("Concatenation UID", ds.get("ConcatenationUID"))
        total = int(ds.get("InConcatenationTotalNumber") or 0)
    except (RejectedInstance, TypeError, ValueError):
        return "", 0
    return uid, max(total, 0)


_MAX_EMBEDDED = 1000


def embedded_meta(fp: BinaryIO) -> tuple[int, int, int] | None:
    """File Meta elements (group 0002) a sender left in the data set of its C-STORE,
    after the file meta the storage SCP wrote, or in the data set of a STOW-RS part,
    after the file meta its File Meta Information Group Length bounds: ``(start, end,
    count)`` of their bytes, or None. PS3.5 7.1 keeps them out of a data set; read as
    they lie, right after the file meta, they were taken for it (a Transfer Syntax the
    association, or the file, did not use) and the instance was refused. DCMTK-based
    archives drop them too. Only what can be stepped over is found: little endian, not
    deflated, defined lengths, and a file meta that holds its Transfer Syntax within its
    group length (one whose length is short leaves its own elements after it)."""
    fp.seek(128)
    head = fp.read(16)
    if len(head) < 16 or head[:4] != b"DICM" or head[4:10] != b"\x02\x00\x00\x00UL":
        return None
    start = 144 + struct.unpack("<I", head[12:16])[0]
    fp.seek(start)
    if fp.read(2) != b"\x02\x00":  # every C-STORE but a faulty sender's: nothing more to read
        return None
    fp.seek(132)
    try:
        meta = read_dataset(BytesIO(fp.read(start - 132)), False, True)
        syntax = meta.get("TransferSyntaxUID")
    except Exception:  # noqa: BLE001 - a file meta that does not parse: inspect() says why
        return None
    if syntax is None or syntax in (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian):
        return None
    implicit = syntax == ImplicitVRLittleEndian
    pos, count = start, 0
    while count < _MAX_EMBEDDED:
        fp.seek(pos)
        element = fp.read(12)
        if len(element) < 8 or struct.unpack_from("<H", element)[0] != 0x0002:
            break
        if implicit:
            size, length = 8, struct.unpack_from("<I", element, 4)[0]
        elif element[4:6].decode("latin-1") in EXPLICIT_VR_LENGTH_32:
            if len(element) < 12:
                break
            size, length = 12, struct.unpack_from("<I", element, 8)[0]
        else:
            size, length = 8, struct.unpack_from("<H", element, 6)[0]
        if length == 0xFFFFFFFF:
            return None
        pos, count = pos + size + length, count + 1
    end_of_file = fp.seek(0, os.SEEK_END)
    return (start, pos, count) if count and pos <= end_of_file else None


def _make_parent(path: Path) -> None:
    """Its folder, made again should a purge remove an empty study folder between the
    study's and the series' mkdir (another series' purge holds another lock)."""
    for _ in range(3):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return
        except FileNotFoundError:
            continue
    path.parent.mkdir(parents=True, exist_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    def __init__(
        self,
        root: Path,
        db: Database,
        limits: LimitsSettings | None = None,
        min_free_bytes: int = 0,
        max_uid_length: int = 64,
        sender_reserve_share: float = 0.0,
    ) -> None:
        self.root = Path(root)
        self.db = db
        self.limits = limits or LimitsSettings()
        self.min_free_bytes = min_free_bytes
        self.max_uid_length = max_uid_length
        self.sender_reserve_share = sender_reserve_share
        self._pending: dict[str, tuple[float, int]] = {}  # sender: (when read, bytes)
        self.tmp = self.root / "tmp"
        self.spool = self.root / "spool"
        self.quarantine = self.root / "quarantine"
        self._series_locks = [threading.Lock() for _ in range(64)]
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.spool.mkdir(parents=True, exist_ok=True)

    def _check_space(self, size: int, sender: str = "") -> None:
        usage = shutil.disk_usage(self.root)
        free = usage.free
        if free - size < self.min_free_bytes:
            raise OutOfResources(
                f"only {free // 2**20} MiB free in {self.root}, need {self.min_free_bytes // 2**20} MiB "
                f"in reserve plus {size // 2**10} KiB"
            )
        reserve = int(self.sender_reserve_share * usage.total)
        if free - size >= self.min_free_bytes + reserve or not sender:
            return
        # In the last of the room: kept for the senders that are not filling the disk.
        held = self._pending_bytes(sender)
        if held > reserve:
            raise OutOfResources(
                f"only {free // 2**20} MiB free in {self.root}, and its last "
                f"{reserve // 2**20} MiB (sender_reserve_share) are kept for the other "
                f"senders: {sender}'s runs not yet processed hold {held // 2**20} MiB; "
                "send again once the node has caught up"
            )

    def _pending_bytes(self, sender: str) -> int:
        """What ``sender``'s instances of runs not yet processed hold, read at most
        once a second a sender (it is asked only when the disk is nearly full)."""
        t = time.monotonic()
        read = self._pending.get(sender)
        if read is None or t - read[0] > 1.0:
            read = (t, self.db.pending_bytes(sender))
            if len(self._pending) >= 1024:
                self._pending.clear()
            self._pending[sender] = read
        return read[1]

    def series_lock(self, series_uid: str) -> threading.Lock:
        """Held while an instance of the series is written and indexed, and while a
        purge deletes a run of it (``dicom_node.retention``)."""
        return self._series_locks[zlib.crc32(series_uid.encode()) % len(self._series_locks)]

    def _write_durably(self, data: bytes, final: Path) -> None:
        _make_parent(final)
        tmp = self.tmp / f"{uuid.uuid4().hex}.part"
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
            _fsync_dir(final.parent)
        except OSError:  # a full or failing disk: 0xA700 in ingest, like the index's
            tmp.unlink(missing_ok=True)
            raise

    def _move_durably(self, source: Path, final: Path) -> None:
        """The file the SCP wrote as the data arrived becomes ``final``: fsync, rename
        (a copy through ``tmp/`` when it lies on another file system), fsync the
        directory."""
        _make_parent(final)
        with open(source, "rb") as fh:
            os.fsync(fh.fileno())
        try:
            os.replace(source, final)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            tmp = self.tmp / f"{uuid.uuid4().hex}.part"
            try:
                shutil.copyfile(source, tmp)
                with open(tmp, "rb") as fh:
                    os.fsync(fh.fileno())
                os.replace(tmp, final)
            finally:
                tmp.unlink(missing_ok=True)
        _fsync_dir(final.parent)

    def store(
        self,
        source: bytes | Path,
        requested: Requested = NOTHING_REQUESTED,
        calling_aet: str = "",
        sender: str = "",
    ) -> Stored:
        """Persist one received instance and index it: ``source`` is a DICOM file with
        meta, as bytes or as the file the storage SCP wrote (moved into the spool);
        ``sender``: whom it is from, for the disk's reserve and the turns (by default
        ``calling_aet``; another when a forwarder names it, ``ingest.sender_of``)."""
        sender = sender or calling_aet
        # A C-STORE's data set, or a STOW-RS part's, may repeat File Meta elements
        source = self._without_embedded_meta(source, requested)
        head = inspect(source, self.limits, requested, self.max_uid_length)
        # A file the SCP or STOW-RS wrote as the data arrived takes no more room once
        # renamed into place: counted again, an instance needed twice its size free
        # (and, on a disk that had room for it, was refused 0xA700).
        if isinstance(source, bytes):
            size = len(source)
            self._check_space(size, sender)
        else:
            info = source.stat()
            size = info.st_size
            self._check_space(0 if info.st_dev == self.root.stat().st_dev else size, sender)
        final = self.spool / head.study_uid / head.series_uid / f"{head.sop_instance_uid}.dcm"
        record = self._record(head, final, size, calling_aet, sender)
        with self.series_lock(head.series_uid):  # a purge of the series waits, or is waited for
            # A file there is the stored instance's, which a refused one must not
            # replace: the index is asked before writing over it (under the series
            # lock, nothing else writes there). A new file is written first, and the
            # index's own check removes it if it is refused.
            existed = final.exists()
            if existed and (conflict := self.db.instance_conflict(record)):
                raise _held(head, conflict)
            if isinstance(source, bytes):
                self._write_durably(source, final)
            else:
                self._move_durably(source, final)
            try:
                recorded = self.db.record_instance(record)
            except InstanceConflict as exc:
                if not existed:
                    final.unlink(missing_ok=True)
                raise _held(head, str(exc)) from None
        if recorded.duplicate:
            log.info("duplicate %s stored again (idempotent)", head.sop_instance_uid)
        return Stored(
            head.sop_instance_uid,
            head.series_uid,
            head.study_uid,
            head.run_id,
            final,
            head.frames,
            head.single_instance_run,
            recorded.duplicate,
            head.concatenation_total > 0
            and self.db.run_instance_count(head.run_id) >= head.concatenation_total,
        )

    def _without_embedded_meta(self, source: bytes | Path, requested: Requested) -> bytes | Path:
        """``source`` without the File Meta elements its data set carried
        (:func:`embedded_meta`); a file is copied without them, in its own folder."""
        with _opened(source) as fp:
            span = embedded_meta(fp)
        if span is None:
            return source
        start, end, count = span
        log.warning(
            "the data set of %s carried %d File Meta element(s) (group 0002): left out (PS3.5 7.1)",
            requested.sop_instance or "a STOW-RS part",
            count,
        )
        if isinstance(source, bytes):
            return source[:start] + source[end:]
        self._check_space(source.stat().st_size)
        copy = source.with_name(f"{source.name}.{uuid.uuid4().hex}.part")
        try:
            with open(source, "rb") as src, open(copy, "wb") as dst:
                dst.write(src.read(start))
                src.seek(end)
                shutil.copyfileobj(src, dst, 2**20)
            os.replace(copy, source)
        except BaseException:
            copy.unlink(missing_ok=True)
            raise
        return source

    @staticmethod
    def _record(
        head: Header, path: Path, size: int, calling_aet: str, sender: str
    ) -> InstanceRecord:
        return InstanceRecord(
            head.sop_instance_uid,
            head.sop_class_uid,
            head.series_uid,
            head.study_uid,
            head.run_id,
            path,
            size,
            head.transfer_syntax,
            head.frames,
            calling_aet,
            sender,
        )

    def sweep_tmp(self, older_than_s: float) -> int:
        """Remove files in ``tmp/`` not written for ``older_than_s``: partial writes of a
        crash, and data sets of transfers that ended before their last byte (the SCP
        writes them there as they arrive). Returns how many were removed."""
        removed = 0
        now = time.time()
        for path in self.tmp.iterdir():
            with contextlib.suppress(OSError):
                if path.is_file() and now - path.stat().st_mtime >= older_than_s:
                    path.unlink()
                    removed += 1
        return removed

    def _quarantine(self, path: Path, reason: Exception) -> int:
        """Set ``path`` aside; 1 when it was moved. One that cannot be moved (its
        permissions, a read-only disk, the place taken) stays where it is, unindexed,
        and is looked at again at the next start: it stopped the node from starting."""
        target = self.quarantine / path.relative_to(self.spool)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
        except OSError as exc:
            log.error(
                "unindexed spool file %s fails the checks (%s) and cannot be quarantined "
                "(%s): left where it is",
                path.name,
                reason,
                exc.strerror or type(exc).__name__,
            )
            return 0
        log.error("quarantined unindexed spool file %s: %s", target, reason)
        return 1

    def recover(self) -> tuple[int, int, int]:
        """After a crash: remove partial writes, index what was written but not indexed
        (the sender never heard Success for it), quarantine what fails the checks.

        Returns (partial files removed, files indexed, files quarantined)."""
        removed = self.sweep_tmp(0.0)
        indexed = quarantined = 0
        known = self.db.indexed_paths()
        for path in sorted(self.spool.rglob("*.dcm")):
            if str(path) in known:
                continue
            try:
                head = inspect(path, self.limits, NOTHING_REQUESTED, self.max_uid_length)
                expected = self.spool / head.study_uid / head.series_uid
                if path.parent != expected or path.stem != head.sop_instance_uid:
                    raise RejectedInstance(
                        RejectedInstance.CANNOT_UNDERSTAND, "file name does not match its UIDs"
                    )
                self.db.record_instance(
                    self._record(head, path, path.stat().st_size, "RECOVERED", "")
                )
            except InstanceConflict as conflict:
                quarantined += self._quarantine(path, _held(head, str(conflict)))
                continue
            except (RejectedInstance, OSError) as exc:
                quarantined += self._quarantine(path, exc)
                continue
            log.warning("indexed spool file %s left unindexed by a crash", path.name)
            indexed += 1
        return removed, indexed, quarantined
