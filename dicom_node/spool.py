"""The durable spool: received bytes become a file that survives a crash before the
sender hears Success.

Order of operations for one instance: check the header (UIDs, SOP class, pixel
data), check free space, write to ``tmp/``, ``fsync`` the file, ``rename`` it into
``spool/<study>/<series>/<sop>.dcm``, ``fsync`` the directory, then index it in
SQLite. Only then does the SCP return Success. A duplicate SOP Instance UID is
idempotent: the file is replaced atomically and the index row kept.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from dicom_node.db import Database, now
from dicom_node.errors import OutOfResources, RejectedInstance
from dicom_node.sopclasses import ACCEPTED_SOP_CLASSES, CINE_2D, NON_IMAGE

log = logging.getLogger(__name__)

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


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
    if not _UID_RE.match(text):
        raise RejectedInstance(
            RejectedInstance.CANNOT_UNDERSTAND,
            f"{name} {text[:80]!r} is not a valid UID (digits and dots only)",
        )
    return text


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


def _expected_pixel_bytes(ds: Dataset) -> int | None:
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits = int(ds.BitsAllocated)
        spp = int(ds.get("SamplesPerPixel", 1))
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return None
    total_bits = rows * cols * bits * spp * frames
    return (total_bits + 7) // 8


def inspect(data: bytes, requested_sop_class: str, max_uid_length: int = 64) -> Dataset:
    """Parse and check a received dataset; raises RejectedInstance with the precise status."""
    try:
        ds = dcmread(BytesIO(data), force=True)
        ds.get("SOPInstanceUID")  # force a parse of the header elements we need
        _ = [
            ds.get(kw)
            for kw in (
                "SOPClassUID",
                "SeriesInstanceUID",
                "StudyInstanceUID",
                "NumberOfFrames",
                "Rows",
                "Columns",
            )
        ]
        pixel = ds.get("PixelData")
    except (InvalidDicomError, EOFError, ValueError, KeyError, OSError, TypeError) as exc:
        raise RejectedInstance(
            RejectedInstance.CANNOT_UNDERSTAND, f"dataset cannot be parsed: {exc}"
        ) from None
    sop_class = check_uid("SOP Class UID", ds.get("SOPClassUID"), max_uid_length)
    check_uid("SOP Instance UID", ds.get("SOPInstanceUID"), max_uid_length)
    check_uid("Series Instance UID", ds.get("SeriesInstanceUID"), max_uid_length)
    check_uid("Study Instance UID", ds.get("StudyInstanceUID"), max_uid_length)
    if sop_class not in ACCEPTED_SOP_CLASSES:
        raise RejectedInstance(
            RejectedInstance.SOP_CLASS_NOT_SUPPORTED,
            f"SOP Class {sop_class} is not accepted by this node",
        )
    if requested_sop_class and sop_class != requested_sop_class:
        raise RejectedInstance(
            RejectedInstance.DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
            f"dataset SOP Class {sop_class} differs from the request's {requested_sop_class}",
        )
    if sop_class not in NON_IMAGE:
        if pixel is None:
            raise RejectedInstance(
                RejectedInstance.DATA_SET_DOES_NOT_MATCH_SOP_CLASS, "image has no Pixel Data"
            )
        encapsulated = (
            ds.file_meta.TransferSyntaxUID.is_compressed
            if "TransferSyntaxUID" in ds.file_meta
            else False
        )
        expected = _expected_pixel_bytes(ds)
        if expected is None:
            raise RejectedInstance(
                RejectedInstance.DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
                "image lacks Rows, Columns or Bits Allocated",
            )
        if not encapsulated and len(pixel or b"") < expected:
            raise RejectedInstance(
                RejectedInstance.CANNOT_UNDERSTAND,
                f"Pixel Data is truncated: {len(pixel or b'')} of {expected} bytes",
            )
    return ds


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    def __init__(
        self, root: Path, db: Database, min_free_bytes: int = 0, max_uid_length: int = 64
    ) -> None:
        self.root = Path(root)
        self.db = db
        self.min_free_bytes = min_free_bytes
        self.max_uid_length = max_uid_length
        self.tmp = self.root / "tmp"
        self.spool = self.root / "spool"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.spool.mkdir(parents=True, exist_ok=True)

    def _check_space(self, size: int) -> None:
        free = shutil.disk_usage(self.root).free
        if free - size < self.min_free_bytes:
            raise OutOfResources(
                f"only {free // 2**20} MiB free in {self.root}, need {self.min_free_bytes // 2**20} MiB "
                f"in reserve plus {size // 2**10} KiB"
            )

    def _write_durably(self, data: bytes, final: Path) -> None:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp / f"{uuid.uuid4().hex}.part"
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
            _fsync_dir(final.parent)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise OutOfResources(f"disk full while writing {final.name}: {exc}") from None
            raise

    def store(self, data: bytes, requested_sop_class: str = "", calling_aet: str = "") -> Stored:
        """Persist one received instance (``data`` is a DICOM file with meta) and index it."""
        ds = inspect(data, requested_sop_class, self.max_uid_length)
        self._check_space(len(data))
        sop_uid = str(ds.SOPInstanceUID).rstrip("\0 ")
        series = str(ds.SeriesInstanceUID).rstrip("\0 ")
        study = str(ds.StudyInstanceUID).rstrip("\0 ")
        sop_class = str(ds.SOPClassUID).rstrip("\0 ")
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        single = sop_class in CINE_2D and frames > 1
        run_id = sop_uid if single else series
        final = self.spool / study / series / f"{sop_uid}.dcm"
        self._write_durably(data, final)
        t = now()
        with self.db.transaction() as con:
            dup = con.execute(
                "SELECT 1 FROM instances WHERE sop_instance_uid=?", (sop_uid,)
            ).fetchone()
            con.execute(
                "INSERT OR REPLACE INTO instances VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    sop_uid,
                    sop_class,
                    series,
                    study,
                    run_id,
                    str(final),
                    len(data),
                    str(ds.file_meta.get("TransferSyntaxUID", "")),
                    frames,
                    calling_aet,
                    t,
                ),
            )
            row = con.execute("SELECT state FROM runs WHERE run_id=?", (run_id,)).fetchone()
            if row is None:
                con.execute(
                    "INSERT INTO runs (run_id, series_uid, study_uid, calling_aet, state, first_at, last_at)"
                    " VALUES (?,?,?,?,?,?,?)",
                    (run_id, series, study, calling_aet, "receiving", t, t),
                )
            elif not dup:
                # a new instance re-opens a series that was already complete
                con.execute(
                    "UPDATE runs SET last_at=?, state='receiving' WHERE run_id=?", (t, run_id)
                )
            else:
                con.execute("UPDATE runs SET last_at=? WHERE run_id=?", (t, run_id))
        if dup:
            log.info("duplicate %s stored again (idempotent)", sop_uid)
        return Stored(sop_uid, series, study, run_id, final, frames, single, bool(dup))
