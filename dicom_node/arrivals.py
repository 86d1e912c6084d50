"""Data sets still arriving, and the series they belong to.

A series is complete after a quiet period with no new instance (``completion``),
counted from its last stored instance. An instance that takes longer than the
quiet period to arrive (a 2 MB frame over a 1 Mbit/s link takes 16 s) let its
series complete without it: the series was processed, and processed again when
the instance was stored, once for every such instance, and each partial result was
sent. The completion sweep now asks which series have a data set still arriving, by
C-STORE or STOW-RS, and leaves them open; ``max_receiving_s`` still bounds how long
a series is held so, whatever a sender does.

A data set's series is read from the first bytes written to its file, once its
Series Instance UID has arrived whole (a file meta and a header of a few KiB, at
most ``HEAD_BYTES``); a deflated data set's header is inflated from what arrived,
at most ``HEAD_BYTES`` of it. A data set whose header cannot be read so (broken)
holds no series open: as before.
"""

from __future__ import annotations

import io
import os
import threading
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from pydicom.dataelem import RawDataElement
from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
from pydicom.tag import Tag
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
)

from dicom_node.errors import RejectedInstance
from dicom_node.spool import check_uid

HEAD_BYTES = 1 << 20  # a Series Instance UID not within this is not looked for further
_SERIES = 0x0020000E


def _past_series(tag: object, vr: object, length: object) -> bool:
    return int(tag) > _SERIES  # type: ignore[call-overload]


@dataclass
class _Arrival:
    alive: Callable[[], bool]
    series: str | None = None
    read: int = 0  # bytes of the file the last look read
    done: bool = False  # no series will be found in it


class InFlight:
    """The files data sets are being written to, each until its caller discards it (or
    ``alive`` says its transfer ended without that: an association aborted)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._files: dict[str, _Arrival] = {}

    def add(self, path: str, alive: Callable[[], bool] = lambda: True) -> None:
        with self._lock:
            self._files[path] = _Arrival(alive)

    def discard(self, path: str) -> None:
        with self._lock:
            self._files.pop(path, None)

    def series(self) -> frozenset[str]:
        """The series of the data sets arriving now (as far as their headers came)."""
        with self._lock:
            files = list(self._files.items())
        found = set()
        for path, arrival in files:
            if not arrival.alive():
                self.discard(path)
                continue
            if arrival.series is None and not arrival.done:
                _look(path, arrival)
            if arrival.series is not None:
                found.add(arrival.series)
        return frozenset(found)


def _look(path: str, arrival: _Arrival) -> None:
    """Read the series of ``path`` if its Series Instance UID has arrived whole."""
    try:
        if min(os.stat(path).st_size, HEAD_BYTES) == arrival.read:
            return  # nothing more came since the last look
        with open(path, "rb") as fh:
            head = fh.read(HEAD_BYTES)
    except OSError:  # moved into the spool, or removed: its series is stored or gone
        arrival.done = True
        return
    arrival.read = len(head)
    arrival.series = series_of(head)
    arrival.done = arrival.series is None and len(head) >= HEAD_BYTES


def series_of(head: bytes) -> str | None:
    """The Series Instance UID in the first bytes of a DICOM file, if whole there."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fp = io.BytesIO(head)
            read_preamble(fp, False)
            meta = _read_file_meta_info(fp)
            body = head[fp.tell() :]
            syntax = meta.get("TransferSyntaxUID")
            if syntax == DeflatedExplicitVRLittleEndian:
                # what arrived of the deflated stream, inflated as far as it goes
                body = zlib.decompressobj(-zlib.MAX_WBITS).decompress(body, HEAD_BYTES)
            ds = read_dataset(
                io.BytesIO(body), syntax == ImplicitVRLittleEndian, syntax != ExplicitVRBigEndian,
                stop_when=_past_series, specific_tags=[Tag(_SERIES)],
            )  # fmt: skip
            raw = ds.get_item("SeriesInstanceUID")
            if not isinstance(raw, RawDataElement) or raw.value_tell + raw.length > len(body):
                return None  # not yet, or cut inside its value
            text = ds.SeriesInstanceUID
    except Exception:  # noqa: BLE001 - bytes still arriving, or hostile: no series
        return None
    try:
        return check_uid("Series Instance UID", text)  # as the spool will take it
    except RejectedInstance:
        return None
