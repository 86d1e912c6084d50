"""What a sender sends cannot make the node's memory or disk run out (``dicom_node.scp``):
a C-STORE's data set goes to a file as it arrives and is renamed into the spool; a PDU
longer than the node accepts, or a data set past ``limits.max_received_bytes``, ends
the association; a transfer cut off leaves no file behind."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, XRayAngiographicImageStorage, generate_uid
from pynetdicom import AE

from dicom_node.scp import MAX_PDU_BYTES, ReceiveLimits
from tests.conftest import NodeProcess, corpus_seed, free_port, wait_for

MIB = 2**20


def _instance(pixel_bytes: int) -> Dataset:
    """An XA instance of 512 x 512 x N frames whose Pixel Data is ``pixel_bytes`` long."""
    ds = Dataset()
    ds.SOPClassUID = XRayAngiographicImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "XA"
    ds.Rows = ds.Columns = 512
    ds.NumberOfFrames = pixel_bytes // (512 * 512 * 2)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = bytes(pixel_bytes)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _store(port: int, ds: Dataset) -> int | None:
    """The C-STORE status, or None when the association ended without one."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(XRayAngiographicImageStorage, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    assoc = ae.associate("127.0.0.1", port, ae_title="ANGIO_NODE")
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_store(ds)
        return int(status.Status) if status and "Status" in status else None
    except (RuntimeError, OSError):
        return None
    finally:
        if assoc.is_established:
            assoc.release()


def _memory_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


class _Serve(NodeProcess):
    """``dicom-node serve`` in its own process (its memory is its own to measure)."""

    def __init__(self, tmp_path: Path, max_received: int, network_timeout_s: float = 60) -> None:
        self.port, self.api_port = free_port(), free_port()
        self.storage = tmp_path / "node"
        config = tmp_path / "node.toml"
        config.write_text(
            f'ae_title = "ANGIO_NODE"\nport = {self.port}\nstorage_dir = "{self.storage}"\n'
            f"min_free_bytes = 0\nnetwork_timeout_s = {network_timeout_s}\n"
            f"max_associations = 2\n[api]\nport = {self.api_port}\n"
            f"max_part_bytes = {max_received}\n"
            f"[limits]\nmax_received_bytes = {max_received}\n"
        )
        super().__init__(config)

    def indexed(self) -> int:
        import sqlite3

        with sqlite3.connect(self.storage / "node.sqlite") as db:
            return int(db.execute("SELECT COUNT(*) FROM instances").fetchone()[0])


@pytest.fixture
def node(tmp_path: Path):  # type: ignore[no-untyped-def]
    serve = _Serve(tmp_path, max_received=300 * MIB)
    serve.start()
    yield serve
    serve.terminate()


def test_a_large_instance_costs_no_memory_and_is_moved_into_the_spool(node) -> None:  # type: ignore[no-untyped-def]
    """256 MiB of Pixel Data: the node's peak memory grows by less than 64 MiB (it grew
    by four times the data set when the data set was gathered in memory, copied, parsed
    and copied again), and the file it wrote as the data arrived is the spool file."""
    assert node.proc is not None
    before = _memory_kib(node.proc.pid, "VmRSS")
    ds = _instance(256 * MIB)
    assert _store(node.port, ds) == 0
    grown_mib = (_memory_kib(node.proc.pid, "VmHWM") - before) / 1024
    assert grown_mib < 64, f"peak memory grew by {grown_mib:.0f} MiB"
    stored = list((node.storage / "spool").rglob(f"{ds.SOPInstanceUID}.dcm"))
    assert len(stored) == 1 and stored[0].stat().st_size > 256 * MIB
    assert not any((node.storage / "tmp").iterdir())  # renamed, not copied
    print(f"peak memory grew by {grown_mib:.1f} MiB for a 256 MiB data set")


def test_an_oversized_pdu_or_data_set_ends_the_association_and_the_node_goes_on(node) -> None:  # type: ignore[no-untyped-def]
    """A PDU that declares 2 GiB is refused at its header, before a byte of it is
    gathered; a data set past ``max_received_bytes`` is cut off at the limit. The
    partial file is removed at the next start; nothing of either is indexed, and the
    node stores the next instance."""
    assert node.proc is not None
    with socket.create_connection(("127.0.0.1", node.port), timeout=30) as raw:
        raw.sendall(struct.pack(">BBL", 0x04, 0, 2**31) + bytes(64 * 1024))
        raw.settimeout(30)
        assert raw.recv(1) == b""  # the node closed the connection
    wait_for(lambda: "a PDU of 2147483648 bytes" in node.log.read_text(), 30, what="the log")

    started = time.monotonic()
    assert _store(node.port, _instance(400 * MIB)) is None
    assert time.monotonic() - started < 120
    log = node.log.read_text()
    assert "closed: a data set of more than 314572800 bytes" in log
    partial = list((node.storage / "tmp").iterdir())
    assert partial, "the cut-off data set was written to the spool's tmp/"
    assert sum(p.stat().st_size for p in partial) <= 300 * MIB

    assert node.proc.poll() is None
    small = _instance(2 * 512 * 512 * 2)
    assert _store(node.port, small) == 0
    assert node.indexed() == 1
    node.terminate()
    node.start()  # recover: a transfer cut off leaves nothing behind
    assert not any((node.storage / "tmp").iterdir())
    assert node.indexed() == 1


def test_receive_limits_refuse_what_is_too_long(tmp_path: Path) -> None:
    """(Free space under ``min_free_bytes`` while a data set arrives is answered 0xA700
    once it has arrived: ``tests/test_disk_full.py``.)"""
    limits = ReceiveLimits(100 * MIB, tmp_path, min_free_bytes=0)
    assert limits.refuse(0, 6) is None
    assert limits.refuse(0, MAX_PDU_BYTES) is None
    assert "PDU of" in (limits.refuse(0, MAX_PDU_BYTES + 7) or "")
    assert limits.refuse(96 * MIB, 4 * MIB) is None
    assert "data set of more than" in (limits.refuse(97 * MIB, 4 * MIB) or "")


class _Wire:
    """The plain socket under a ``_GuardedSocket`` in the read tests: ``read(n)`` gives
    what the peer sends."""

    def __init__(self, read: Callable[[int], bytes]) -> None:
        self.read = read

    def gettimeout(self) -> float | None:
        return None

    def settimeout(self, value: float | None) -> None:
        pass

    def recv(self, n: int) -> bytes:
        return self.read(n)


def test_a_clock_restarted_during_a_read_does_not_end_the_read(tmp_path: Path) -> None:
    """``message_done`` restarted a message's clock from the association's thread
    (EVT_ACCEPTED) while the reading thread could be inside ``recv`` with the sender's
    first PDU: the read ended in a TypeError (its start read back as None), the DUL
    aborted the association, and the demo's storescu failed (seen once, 2026-12-03).
    That restart is now made by the reading thread itself (the next test); a read
    still keeps the start it began with, tried here from inside the read."""
    from dicom_node.scp import _GuardedSocket

    guarded = object.__new__(_GuardedSocket)  # no association: only the read is tested

    def read(n: int) -> bytes:
        guarded.received, guarded.started = 0, None  # message_done, from elsewhere
        return b"\x04" * n

    guarded.socket = _Wire(read)  # type: ignore[assignment]
    guarded.limits = ReceiveLimits(100 * MIB, tmp_path, min_free_bytes=0)
    assert guarded.recv(6) == bytearray(b"\x04" * 6)
    assert guarded.started is None  # the restart stands: the next read starts the clock


def test_the_association_request_restarts_the_count_in_the_reading_thread(
    tmp_path: Path,
) -> None:
    """The bytes of the A-ASSOCIATE-RQ are not a message's: once its body is read, the
    reading thread itself restarts the count, the clock and the command set, so the
    association's thread (EVT_ACCEPTED) no longer touches what a read under way uses.
    A P-DATA-TF that follows is counted from zero; nothing else restarts the count."""
    from dicom_node.scp import _GuardedSocket

    request = _association_request()
    p_data = struct.pack(">BBL", 4, 0, 8) + struct.pack(">LBB", 4, 1, 0x01) + b"\0\0"
    stream = bytearray(request + p_data)
    guarded = object.__new__(_GuardedSocket)

    def read(n: int) -> bytes:
        data = bytes(stream[:n])
        del stream[:n]
        return data

    guarded.socket = _Wire(read)  # type: ignore[assignment]
    guarded.limits = ReceiveLimits(100 * MIB, tmp_path, min_free_bytes=0)
    guarded.recv(6)  # the request's header, as pynetdicom reads a PDU
    assert guarded.received == 6 and guarded.started is not None
    guarded.recv(len(request) - 6)  # its body: the count restarts here
    assert (guarded.received, guarded.started, guarded.command) == (0, None, b"")
    guarded.recv(6)
    guarded.recv(8)  # a P-DATA-TF with a command fragment (not the last)
    assert guarded.received == 14 and guarded.command == b"\0\0"
    assert guarded.started is not None


def test_sweep_removes_files_of_transfers_that_stopped_writing(tmp_path: Path) -> None:
    from dicom_node.db import Database
    from dicom_node.spool import Spool

    spool = Spool(tmp_path / "s", Database(tmp_path / "index.sqlite3"))
    old, fresh = spool.tmp / "tmpold.dcm", spool.tmp / "tmpfresh.dcm"
    old.write_bytes(b"x")
    fresh.write_bytes(b"y")
    hour_ago = time.time() - 3600
    os.utime(old, (hour_ago, hour_ago))
    assert spool.sweep_tmp(600) == 1
    assert not old.exists() and fresh.exists()


def test_a_large_stow_rs_part_costs_no_memory_and_leaves_no_file(node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """STOW-RS: a 256 MiB part is written to the spool's tmp/ as it arrives and moved into
    the spool (peak memory grows by less than 64 MiB; it held the part twice before); a
    part refused (another study than the target) leaves no file behind."""
    from tests.test_security import multipart

    assert node.proc is not None
    ds = _instance(256 * MIB)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    part = tmp_path / "part.dcm"
    ds.save_as(part, enforce_file_format=True)
    del ds
    ctype, body = multipart([part.read_bytes()])
    path = tmp_path / "body.bin"
    path.write_bytes(body)
    del body
    url = f"http://127.0.0.1:{node.api_port}/dicom-web/studies"

    def post(target: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            ["curl", "-sS", "-H", f"Content-Type: {ctype}", "--data-binary", f"@{path}"]
            + ["-o", "/dev/null", "-w", "%{http_code}", target],
            capture_output=True,
            timeout=300,
        )

    before = _memory_kib(node.proc.pid, "VmRSS")
    assert post(url).stdout == b"200"
    grown_mib = (_memory_kib(node.proc.pid, "VmHWM") - before) / 1024
    assert grown_mib < 64, f"peak memory grew by {grown_mib:.0f} MiB"
    assert node.indexed() == 1
    assert post(url + "/1.2.3.4").stdout == b"409"  # not the target study: refused
    assert not any((node.storage / "tmp").iterdir())
    print(f"STOW-RS: peak memory grew by {grown_mib:.1f} MiB for a 256 MiB part")


def test_slow_senders_are_dropped_and_cannot_hold_every_association(tmp_path: Path) -> None:
    """Two connections (``max_associations``) that stop in the middle of a PDU, or send
    one byte at a time, held their association for good (pynetdicom checks its network
    timeout only between PDUs: the node then accepted no one). Now each is closed once
    ``network_timeout_s`` (2 s here) has passed, and a sender after them is served."""
    serve = _Serve(tmp_path, max_received=300 * MIB, network_timeout_s=2)
    serve.start()
    try:
        header = struct.pack(">BBL", 0x01, 0, 1000)
        stalled = socket.create_connection(("127.0.0.1", serve.port), timeout=30)
        stalled.sendall(header + bytes(10))  # then nothing
        trickle = socket.create_connection(("127.0.0.1", serve.port), timeout=30)
        trickle.sendall(header)
        started = time.monotonic()
        closed_after = None
        while time.monotonic() - started < 30:
            try:
                trickle.sendall(b"\0")  # a byte every 0.2 s: 5 bytes/s
            except OSError:
                closed_after = time.monotonic() - started
                break
            time.sleep(0.2)
        assert closed_after is not None and closed_after < 10, closed_after
        stalled.settimeout(30)
        assert stalled.recv(1) == b""
        assert time.monotonic() - started < 15
        stalled.close()
        trickle.close()
        # their places are free once the acceptors give up waiting for a request
        small = _instance(2 * 512 * 512 * 2)
        wait_for(lambda: _store(serve.port, small) == 0, 20, interval=1, what="a free place")
        log = serve.log.read_text()
        assert "bytes of a PDU came in time, too slow" in log
    finally:
        serve.terminate()


def _association_request() -> bytes:
    """A valid A-ASSOCIATE-RQ PDU for an XA storage context."""
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import (
        A_ASSOCIATE,
        ImplementationClassUIDNotification,
        MaximumLengthNotification,
    )
    from pynetdicom.presentation import build_context

    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title, primitive.called_ae_title = "FUZZ", "ANGIO_NODE"
    context = build_context(XRayAngiographicImageStorage, ExplicitVRLittleEndian)
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    length, uid = MaximumLengthNotification(), ImplementationClassUIDNotification()
    length.maximum_length_received, uid.implementation_class_uid = 16384, "1.2.3.4"
    primitive.user_information = [length, uid]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def _pdu_corpus(seed: int, count: int) -> list[bytes]:
    """Byte streams a broken or hostile peer may send: noise; PDU headers of every type
    with absurd lengths; a valid association request followed by a P-DATA of noise or
    with PDV lengths that lie; a request with a few bytes changed, or cut short."""
    import random

    rng = random.Random(seed)
    request = _association_request()

    def noise(most: int) -> bytes:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(most)))

    def p_data(body: bytes) -> bytes:
        return struct.pack(">BBL", 4, 0, len(body)) + body

    makers = [
        lambda: noise(200) + b"\0",
        lambda: (
            struct.pack(">BBL", rng.randrange(1, 8), 0, rng.choice([0, 1, 5, 100, 2**32 - 1]))
            + noise(300)
        ),
        lambda: request + p_data(noise(100)),
        lambda: (
            request
            + p_data(struct.pack(">LBB", rng.choice([0, 1, 2, 10**6, 2**32 - 1]), 1, 3) + bytes(10))
        ),
        lambda: bytes(b if rng.random() > 0.02 else rng.randrange(256) for b in request),
        lambda: request[: rng.randrange(len(request))],
    ]
    return [makers[k % len(makers)]() for k in range(count)]


# An association thread that dies of an exception fails the test: some streams put
# pynetdicom's upper layer where its next step raises (an unhandled InvalidEventError
# in ten threads per run before the node caught it).
@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_corpus_of_broken_pdus_never_stops_the_node(make_node) -> None:  # type: ignore[no-untyped-def]
    """48 generated byte streams (``_pdu_corpus``), eight connections at a time, against
    a node taking 8 associations with ``network_timeout_s`` 2: afterwards every place
    is free again and a sender is stored. All eight from one host may be open at once
    (with the default share of four, half the streams were closed at accept and never
    reached the PDU parser)."""
    import threading

    node = make_node(
        max_associations=8,
        max_associations_per_host=8,
        network_timeout_s=2,
        api={"enabled": False},
    )

    def send(data: bytes) -> None:
        try:
            with socket.create_connection(("127.0.0.1", node.port), timeout=5) as peer:
                peer.sendall(data)
                peer.recv(1 << 16)
        except OSError:
            pass  # reset or timed out: what the node does with it is the test

    corpus = _pdu_corpus(seed=corpus_seed(11), count=48)
    for start in range(0, len(corpus), 8):
        threads = [threading.Thread(target=send, args=(d,)) for d in corpus[start : start + 8]]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    small = _instance(2 * 512 * 512 * 2)
    wait_for(lambda: _store(node.port, small) == 0, 30, interval=1, what="a sender stored")
    assert node.db.query("SELECT COUNT(*) n FROM instances")[0]["n"] == 1


def test_a_command_set_past_its_bound_ends_the_association(make_node, caplog) -> None:  # type: ignore[no-untyped-def]
    """pynetdicom gathers a message's command fragments in memory: 400 MiB of them grew
    the node by 425 MB. Past MAX_COMMAND_BYTES the association ends; normal command
    sets (every other test's stores) pass."""
    from dicom_node.scp import MAX_COMMAND_BYTES

    node = make_node(api={"enabled": False})
    fragment = bytes(16 * 1024)
    pdv = struct.pack(">LBB", len(fragment) + 2, 1, 0x01) + fragment  # command, not last
    pdu = struct.pack(">BBL", 4, 0, len(pdv) * 4) + pdv * 4  # 64 KiB of command in one PDU
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as peer:
        peer.sendall(_association_request())
        assert peer.recv(1) == b"\x02"  # A-ASSOCIATE-AC
        peer.sendall(pdu)  # exactly the bound: still read
        peer.sendall(struct.pack(">BBL", 4, 0, len(pdv)) + pdv)  # past it
        with contextlib.suppress(OSError):
            while peer.recv(1 << 16):  # until the node closes the connection
                pass
    assert f"a command set of more than {MAX_COMMAND_BYTES} bytes" in caplog.text
    assert _store(node.port, _instance(2 * 512 * 512 * 2)) == 0


def test_a_data_set_kept_in_memory_is_bounded_like_a_command_set(make_node, caplog) -> None:  # type: ignore[no-untyped-def]
    """Only a C-STORE request's data set goes to a file as it arrives; pynetdicom keeps
    any other message's in memory (a C-FIND request with 400 MiB of identifier grew the
    node by 425 MB). Past MAX_COMMAND_BYTES the association ends."""
    from io import BytesIO

    from pynetdicom.dimse_messages import C_FIND_RQ
    from pynetdicom.dimse_primitives import C_FIND
    from pynetdicom.pdu import P_DATA_TF

    from dicom_node.scp import MAX_COMMAND_BYTES

    node = make_node(api={"enabled": False})
    find = C_FIND()
    find.MessageID, find.Priority = 1, 2
    find.AffectedSOPClassUID = XRayAngiographicImageStorage
    find.Identifier = BytesIO(b"\x08\x00\x52\x00\x06\x00\x00\x00STUDY ")
    message = C_FIND_RQ()
    message.primitive_to_message(find)
    command = P_DATA_TF()
    command.from_primitive(next(iter(message.encode_msg(1, 2**20))))  # the command set
    fragment = bytes(MAX_COMMAND_BYTES // 2)
    pdv = struct.pack(">LBB", len(fragment) + 2, 1, 0x00) + fragment  # data set, not last
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as peer:
        peer.sendall(_association_request())
        assert peer.recv(1) == b"\x02"
        peer.sendall(command.encode())
        for _ in range(3):
            with contextlib.suppress(OSError):
                peer.sendall(struct.pack(">BBL", 4, 0, len(pdv)) + pdv)
        with contextlib.suppress(OSError):
            while peer.recv(1 << 16):
                pass
    assert "other than a C-STORE request" in caplog.text
    assert _store(node.port, _instance(2 * 512 * 512 * 2)) == 0


def test_a_peer_that_reads_no_answer_is_dropped_and_stops_nothing(make_node, caplog) -> None:  # type: ignore[no-untyped-def]
    """A peer that sends requests and reads none of the answers: once the socket's
    buffers are full the node's answers cannot be sent, and nothing more is read; the
    association ends after ``network_timeout_s`` without a read (pynetdicom's idle
    timer, which closes the socket under the blocked send), and the node stops
    promptly. (The node's own sends, to destinations, needed a timeout of their own:
    tests/test_durability.py.)"""
    import random
    import threading

    from pydicom.uid import ImplicitVRLittleEndian

    from tests.dimse_faults import association_request, command_set, p_data

    node = make_node(api={"enabled": False}, network_timeout_s=2.0)
    verification = "1.2.840.10008.1.1"
    request = association_request(
        random.Random(0), [(1, verification, [ImplicitVRLittleEndian])], calling="DEAF"
    )
    echoes = b"".join(
        p_data(
            1,
            0x03,
            command_set(
                [
                    (0x00000002, "UI", verification),
                    (0x00000100, "US", 0x0030),
                    (0x00000110, "US", i % 65536),
                    (0x00000800, "US", 0x0101),
                ]
            ),
        )
        for i in range(40000)
    )
    peer = socket.socket()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    peer.connect(("127.0.0.1", node.port))
    try:
        peer.sendall(request)
        assert peer.recv(1) == b"\x02"  # A-ASSOCIATE-AC; nothing more is read

        def flood() -> None:
            with contextlib.suppress(OSError):
                peer.sendall(echoes)

        threading.Thread(target=flood, daemon=True).start()
        assert node.server is not None
        wait_for(lambda: node.server.active_associations, 10, what="the association")
        wait_for(
            lambda: not node.server.active_associations, 60, what="the deaf peer to be dropped"
        )
        started = time.monotonic()
        node.stop()
        assert time.monotonic() - started < 20
        assert "Network timeout reached" in caplog.text
    finally:
        peer.close()
