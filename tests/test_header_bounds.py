"""What reading a header may cost: the bytes a parse reads are budgeted
(``limits.max_header_bytes``), encapsulated Pixel Data is walked in the file, and a
deflated data set is inflated a chunk at a time. Memory is measured with tracemalloc
against what the old reads held (the whole header's elements, the whole Pixel Data,
the inflated data set twice)."""

from __future__ import annotations

import struct
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless

from dicom_node.errors import RejectedInstance
from dicom_node.settings import LimitsSettings
from dicom_node.spool import inspect
from tests.faults import (
    _compressed,
    _deflate_bomb,
    _patch_j2k_size,
    encode,
    fresh,
    many_elements,
    nested_sequences,
)

MiB = 2**20


def _peak(call: Callable[[], Any]) -> tuple[Any, int]:
    """(what ``call`` returned or raised, the peak of memory it allocated)."""
    tracemalloc.start()
    try:
        try:
            out: Any = call()
        except RejectedInstance as exc:
            out = exc
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_header_of_many_small_elements_is_refused_within_its_budget() -> None:
    limits = LimitsSettings(max_header_bytes=MiB)
    bomb = many_elements(300_000)  # 3.6 MB of elements
    out, peak = _peak(lambda: inspect(bomb, limits))
    assert isinstance(out, RejectedInstance) and out.status == RejectedInstance.OVER_LIMITS
    assert "limits.max_header_bytes" in out.reason
    # the parse stopped at the budget: about 40 bytes held per byte read, not the
    # whole header's (which held 160 MB before)
    assert peak < 64 * MiB, peak
    # a header within the budget passes, and so does this one under the default
    assert inspect(many_elements(40_000), limits).frames == 2
    assert inspect(bomb, LimitsSettings()).frames == 2
    nested = nested_sequences(5000)
    out, _ = _peak(lambda: inspect(nested, limits))
    assert isinstance(out, RejectedInstance) and out.status == RejectedInstance.CANNOT_UNDERSTAND


def _jpeg_ls_file(path: Path, fragments: list[bytes], rows: int = 16) -> Path:
    ds = fresh(frames=len(fragments), size=rows)
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate(fragments)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    path.write_bytes(encode(ds))
    return path


def test_encapsulated_pixel_data_is_walked_in_the_file(tmp_path: Path) -> None:
    # 48 frames of 2 MiB that start like a JPEG and hold nothing a parser can use
    # (this took 1.1 GB and 83 s at 256 frames: each fragment was read, then scanned)
    frames = [b"\xff\xd8" + bytes(2 * MiB - 2)] * 48
    path = _jpeg_ls_file(tmp_path / "cine.dcm", frames)
    out, peak = _peak(lambda: inspect(path, LimitsSettings()))
    assert out.frames == 48 and peak < 2 * MiB, (out, peak)

    # a codestream larger than the header says is still found in a fragment read from the
    # file (left unread by the header parse, as it is over 64 KiB)
    j2k = _patch_j2k_size(_compressed(JPEG2000Lossless, frames=1), 60000, 60000)
    codestream = bytes(next(iter(_fragments(j2k.PixelData))))
    j2k.PixelData = encapsulate([codestream + bytes(200_000)])
    big = tmp_path / "j2k.dcm"
    big.write_bytes(encode(j2k))
    out, _ = _peak(lambda: inspect(big, LimitsSettings()))
    assert out.status == RejectedInstance.DATA_SET_DOES_NOT_MATCH_SOP_CLASS
    assert "60000x60000" in out.reason

    # Pixel Data given a defined length (not the standard's encoding, but written by
    # some) is walked within that length, so the elements after it are not fragments
    data = bytearray(path.read_bytes())
    header = data.rindex(b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff")
    delimiter = len(data) - 8
    assert data[delimiter:] == struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    value = data[header + 12 : delimiter]
    trailing = struct.pack("<HH2sH", 0xFFFC, 0xFFFC, b"OB", 0) + struct.pack("<I", 4) + bytes(4)
    defined = data[:header] + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, len(value))
    (tmp_path / "defined.dcm").write_bytes(defined + value + trailing)
    assert inspect(tmp_path / "defined.dcm", LimitsSettings()).frames == 48


def _fragments(encapsulated: bytes) -> list[bytes]:
    from pydicom.encaps import generate_fragments

    return list(generate_fragments(encapsulated))[1:]


def test_a_deflated_data_set_is_inflated_a_chunk_at_a_time() -> None:
    bomb = _deflate_bomb(96 * MiB)
    assert len(bomb) < MiB
    out, peak = _peak(lambda: inspect(bomb, LimitsSettings(max_inflated_bytes=32 * MiB)))
    assert out.status == RejectedInstance.OVER_LIMITS and "max_inflated_bytes" in out.reason
    assert peak < 40 * MiB, peak
    # within the bound it is inflated once (pydicom's own read held it twice, and the
    # check before it once more)
    out, peak = _peak(lambda: inspect(bomb, LimitsSettings(max_inflated_bytes=128 * MiB)))
    assert out.frames == 1 and peak < 120 * MiB, (out, peak)


def test_routing_a_run_of_many_instances_costs_one_header(tmp_path: Path) -> None:
    from dicom_node.db import Database, InstanceRecord
    from dicom_node.router import Router
    from dicom_node.settings import load_settings
    from tests.faults import relabel

    data = many_elements(40_000)  # 0.5 MB of elements, about 12 MB once parsed
    db = Database(tmp_path / "n.sqlite")
    for i in range(60):
        path = tmp_path / f"{i}.dcm"
        path.write_bytes(relabel(data, sop_uid=f"1.2.3.{i}"))
        db.record_instance(
            InstanceRecord(
                f"1.2.3.{i}",
                "1.2.840.10008.5.1.4.1.1.12.1",
                "1.2",
                "1",
                "run",
                path,
                1,
                "",
                5,
                "AE",
            )
        )
    assert db.complete_run("run", "test")
    rules = [{"name": "xa", "match": {"modality": ["XA"]}, "pipelines": ["minip"]}]
    router = Router(db, load_settings(None, environ={}, rules=rules))
    jobs, peak = _peak(lambda: router.route("run"))
    assert len(jobs) == 1
    assert peak < 48 * MiB, peak  # every header held at once: 60 x 12 MB
    assert db.query("SELECT COUNT(*) n FROM instances WHERE run_id='run'")[0]["n"] == 60
