"""A generated corpus of broken STOW-RS requests (tests/http_faults.py) sent as raw
bytes to a running node: every request gets an answer with a documented HTTP status
(README, "Behaviour on bad input"), nothing stored is lost or left half-written, no
handler thread ends in a traceback, and the node goes on storing."""

from __future__ import annotations

import json
import re
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import corpus_seed
from tests.http_faults import corpus
from tests.test_security import _instance, multipart

# README "Behaviour on bad input", STOW-RS: the node's answers (404/405: no such
# route), and those Python's http.server gives before a request reaches the node (a
# request line or header that cannot be read: 400, 414, 431; an HTTP version other
# than 1.0 and 1.1: 505; a method the API has no route for: 501).
DOCUMENTED = {200, 202, 400, 404, 405, 409, 411, 413, 414, 415, 431, 501, 505}
STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3}) ")


def _exchange(port: int, request: bytes) -> bytes:
    """Send the request and end the sending side (a client done, or cut off); the
    answer until the node closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as peer:
        try:
            peer.sendall(request)
            peer.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the node answered and closed before all was sent: its answer is read
        chunks = []
        try:
            while data := peer.recv(1 << 16):
                chunks.append(data)
        except ConnectionResetError:
            pass
    return b"".join(chunks)


def _answers(raw: bytes) -> list[tuple[int, bytes]]:
    """(status, body) of each response in the stream (a request shorter than its
    Content-Length leaves the rest to be read as a second request)."""
    found = list(STATUS_LINE.finditer(raw))
    ends = [m.start() for m in found[1:]] + [len(raw)] if found else []
    return [
        (int(m.group(1)), raw[m.start() : end].partition(b"\r\n\r\n")[2])
        for m, end in zip(found, ends, strict=True)
    ]


def send_corpus(
    port: int, cases: list[tuple[bytes, list[str]]], documented: set[int]
) -> tuple[list[str], dict[int, int], list[tuple[int, bytes]]]:
    """Each case sent on its own connection: the problems (no answer, a status not
    documented), the count of each status, and every (status, body) answered."""
    problems: list[str] = []
    seen: dict[int, int] = {}
    answered: list[tuple[int, bytes]] = []
    for number, (request, done) in enumerate(cases):
        raw = _exchange(port, request)
        answers = _answers(raw)
        if not answers:
            problems.append(f"case {number} ({', '.join(done)}): no answer ({raw[:80]!r})")
        for status, _ in answers:
            seen[status] = seen.get(status, 0) + 1
            if status not in documented:
                problems.append(f"case {number} ({', '.join(done)}): status {status}")
        answered += answers
    return problems, seen, answered


def _stored_uids(body: bytes) -> list[str]:
    items = json.loads(body).get("00081199", {}).get("Value", [])
    return [item["00081155"]["Value"][0] for item in items]


def _post_part(node: Any, part: bytes) -> requests.Response:
    """One STOW-RS request of one part."""
    content_type, body = multipart([part])
    return requests.post(
        f"http://127.0.0.1:{node.api_port}/dicom-web/studies",
        data=body,
        headers={"Content-Type": content_type},
        timeout=30,
    )


def test_a_corpus_of_broken_stow_requests_never_stops_the_node(
    make_node: Any, capfd: pytest.CaptureFixture[str]
) -> None:
    node = make_node(
        api={"read_timeout_s": 2, "max_body_bytes": 8 << 20, "max_part_bytes": 1 << 20},
        rules=[],  # stored, not processed: this test is about receiving
    )
    cases = corpus(seed=corpus_seed(23), count=400, instance=lambda k: _instance(50_000 + k))
    problems, seen, answered = send_corpus(node.api_port, cases, DOCUMENTED)
    acknowledged = [uid for s, body in answered if s in (200, 202) for uid in _stored_uids(body)]
    assert not problems, "\n".join(problems)
    assert seen.get(400, 0) > 20 and len(seen) >= 6, seen  # the corpus reaches the parsers
    assert acknowledged, "no request of the corpus stored anything"

    # every acknowledged instance is indexed, its file whole in the spool
    rows = node.db.query(
        f"SELECT sop_instance_uid, path, size FROM instances WHERE sop_instance_uid IN "
        f"({','.join('?' * len(acknowledged))})",
        tuple(acknowledged),
    )
    assert {r["sop_instance_uid"] for r in rows} == set(acknowledged)
    for r in rows:
        path = Path(r["path"])
        if not path.is_absolute():
            path = Path(node.settings.storage_dir) / path
        assert path.stat().st_size == r["size"]
    # no part file is left behind by a request cut off or refused
    deadline = time.monotonic() + 10
    while list(node.ingest.spool.tmp.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert list(node.ingest.spool.tmp.iterdir()) == []

    # the node goes on storing, and no handler thread ended in a traceback
    ctype, body = multipart([_instance(59_999)])
    answer = requests.post(
        f"http://127.0.0.1:{node.api_port}/dicom-web/studies",
        data=body,
        headers={"Content-Type": ctype},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception occurred" not in err, err[-3000:]


def test_a_stow_part_that_is_not_a_dicom_file_is_refused_with_the_reason(
    make_node: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A STOW-RS part is a DICOM file (PS3.18 10.5: PS3.10, with its File Meta
    Information). A bare data set, without it, names no Transfer Syntax: the node
    would guess how to read it, so it is refused (0xC000) with the reason, as is a file
    without its 128-byte preamble. (A bare data set was stored and acknowledged, and
    its run then failed routing: "header cannot be read".)"""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    from tests.dicomgen import xa_run

    node = make_node(rules=[])
    whole = _instance(1)
    bare = DicomBytesIO()
    bare.is_little_endian, bare.is_implicit_VR = True, False
    write_dataset(bare, xa_run(frames=2, rows=32, cols=32, seed=2))
    cut = _instance(3)[128:]  # "DICM" first
    reasons = {
        "bare": "no File Meta Information",
        "cut": "no 128-byte preamble",
    }

    def post(part: bytes) -> requests.Response:
        return _post_part(node, part)

    with caplog.at_level("WARNING", logger="dicom_node.ingest"):
        for name, part in (("bare", bare.getvalue()), ("cut", cut)):
            resp = post(part)
            assert resp.status_code == 409, (name, resp.text)
            (item,) = resp.json()["00081198"]["Value"]
            assert item["00081197"]["Value"] == [0xC000], name
            assert reasons[name] in caplog.text, (name, caplog.text)
    assert not node.db.query("SELECT 1 FROM instances")
    resp = post(whole)
    assert resp.status_code == 200 and len(node.db.query("SELECT 1 FROM instances")) == 1


def test_a_stow_part_in_a_transfer_syntax_the_node_does_not_decode_is_refused(
    make_node: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A C-STORE's transfer syntax is negotiated; a STOW-RS part's was taken as it came.
    A part in one the node does not decode (JPIP's pixel data by reference, MPEG-2
    video, a private one) was acknowledged and its job failed; it is refused with
    PS3.18's "Referenced Transfer Syntax not supported" (0xC122) and the reason. One
    in HTJ2K, which the node decodes, is stored."""
    from pydicom.encaps import encapsulate
    from pydicom.filebase import DicomBytesIO
    from pydicom.uid import HTJ2KLossless

    from tests.dicomgen import htj2k, xa_run

    node = make_node(rules=[])

    def part(ds: Any, ts: str) -> bytes:
        ds.file_meta.TransferSyntaxUID = ts
        out = DicomBytesIO()
        ds.save_as(out, enforce_file_format=True, implicit_vr=False, little_endian=True)
        return out.getvalue()

    jpip = xa_run(frames=2, rows=32, cols=32, seed=1)
    del jpip.PixelData
    jpip.PixelDataProviderURL = "http://jpip.example/pixels"
    video = xa_run(frames=2, rows=32, cols=32, seed=2)
    video.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(60)])  # a sequence header
    video["PixelData"].VR = "OB"
    cases = {
        "1.2.840.10008.1.2.4.94": part(jpip, "1.2.840.10008.1.2.4.94"),  # JPIP Referenced
        "1.2.840.10008.1.2.4.100": part(video, "1.2.840.10008.1.2.4.100"),  # MPEG2 MP@ML
        "1.2.3.4": part(xa_run(frames=2, rows=32, cols=32, seed=3), "1.2.3.4"),  # a private one
    }
    with caplog.at_level("WARNING", logger="dicom_node.ingest"):
        for ts, body in cases.items():
            resp = _post_part(node, body)
            assert resp.status_code == 409, (ts, resp.text)
            (item,) = resp.json()["00081198"]["Value"]
            assert item["00081197"]["Value"] == [0xC122], ts
            assert f"transfer syntax {ts} (" in caplog.text, ts
    assert "is not one this node decodes" in caplog.text
    assert not node.db.query("SELECT 1 FROM instances")
    ht = htj2k(xa_run(frames=2, rows=32, cols=32, seed=4), HTJ2KLossless)
    resp = _post_part(node, part(ht, HTJ2KLossless))
    assert resp.status_code == 200, resp.text
    (row,) = node.db.query("SELECT transfer_syntax FROM instances")
    assert row["transfer_syntax"] == HTJ2KLossless


def test_file_meta_left_in_a_stow_part_s_data_set_is_left_out(make_node: Any) -> None:
    """A STOW-RS part whose data set still carries File Meta elements (group 0002,
    naming another Transfer Syntax) after the file meta its Group Length bounds: read as
    they lie, they were taken for the file meta, and the part was refused (0xA900,
    "Pixel Data is not encapsulated, but the transfer syntax is JPEG"). They are left
    out, as for a C-STORE's data set. A file meta whose Group Length is short of its
    own Transfer Syntax is not cut: it is read whole, as before."""
    from pydicom import dcmread
    from pydicom.dataset import Dataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info

    from tests.dicomgen import xa_run

    node = make_node(rules=[])

    def part(ds: Any, embedded: bool, short_by: int = 0) -> bytes:
        data = Dataset()
        for elem in ds:
            data.add(elem)
        if embedded:
            data.add_new(0x00020002, "UI", ds.SOPClassUID)
            data.add_new(0x00020010, "UI", "1.2.840.10008.1.2.4.50")  # JPEG Baseline
        out = DicomBytesIO()
        out.is_little_endian, out.is_implicit_VR = True, False
        out.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(out, ds.file_meta, enforce_standard=True)
        write_dataset(out, data)
        raw = bytearray(out.getvalue())
        length = int.from_bytes(raw[140:144], "little")
        raw[140:144] = (length - short_by).to_bytes(4, "little")
        return bytes(raw)

    def post(body_part: bytes) -> requests.Response:
        return _post_part(node, body_part)

    embedded = xa_run(frames=3, seed=11)
    resp = post(part(embedded, True))
    assert resp.status_code == 200, resp.text
    (path,) = [r["path"] for r in node.db.query("SELECT path FROM instances")]
    stored = dcmread(path)
    assert stored.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert not [e for e in stored if e.tag.group == 0x0002]
    assert stored.PixelData == embedded.PixelData
    # Group Length short of everything from the Transfer Syntax on: the meta is kept whole
    short = xa_run(frames=3, seed=12)
    meta = DicomBytesIO()
    meta.is_little_endian, meta.is_implicit_VR = True, False
    write_file_meta_info(meta, short.file_meta, enforce_standard=True)
    from_ts = len(meta.getvalue()) - meta.getvalue().index(b"\x02\x00\x10\x00UI")
    resp = post(part(short, False, short_by=from_ts))
    assert resp.status_code == 200, resp.text
    assert len(node.db.query("SELECT 1 FROM instances")) == 2
