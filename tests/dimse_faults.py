"""A generated corpus of broken DICOM conversations, for tests/test_dimse_faults.py.

The PDU corpus (tests/test_receive_limits.py) breaks the bytes of PDUs; these
streams are well-formed PDUs that carry what a broken or hostile *DICOM* peer
says: association requests with odd negotiation items (maximum lengths a PDV
cannot fit in, hundreds of presentation contexts, unknown syntaxes, user
identity, role selection, extended negotiation, asynchronous operations), then
DIMSE messages of every kind, requests the node does not serve and responses it
never asked for, with command sets that miss, repeat or mistype elements, lie
about their data set, or name contexts that were not accepted; data sets in
another transfer syntax than their context, cut short, or whose SOP Instance UID
is not the command's. Each stream is deterministic for its seed and is sent as
raw bytes.
"""

from __future__ import annotations

import random
import socket
import struct
from dataclasses import dataclass, field
from io import BytesIO

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    XRayAngiographicImageStorage,
    generate_uid,
)
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
    SOPClassCommonExtendedNegotiation,
    SOPClassExtendedNegotiation,
    UserIdentityNegotiation,
)
from pynetdicom.presentation import PresentationContext

from tests.faults import fresh

VERIFICATION = "1.2.840.10008.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
FIND = "1.2.840.10008.5.1.4.1.2.2.1"  # Study Root Query/Retrieve - FIND
MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
MPPS = "1.2.840.10008.3.1.2.3.3"  # Modality Performed Procedure Step (N-CREATE/N-SET)
COMMITMENT = "1.2.840.10008.1.20.1"  # Storage Commitment Push Model (N-ACTION)
COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
ABSTRACT = [
    XRayAngiographicImageStorage,
    VERIFICATION,
    CT,
    COMMITMENT,
    FIND,
    MOVE,
    MPPS,
    "1.2.3.4.5",
    "1." + "2" * 62,
]
SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    "1.2.840.10008.1.2.99",
    "1.2.3",
]
# Command Field values (PS3.7 E.1): requests, responses, and values no message has.
COMMANDS = {
    "C-STORE-RQ": 0x0001,
    "C-STORE-RSP": 0x8001,
    "C-GET-RQ": 0x0010,
    "C-FIND-RQ": 0x0020,
    "C-MOVE-RQ": 0x0021,
    "C-ECHO-RQ": 0x0030,
    "C-ECHO-RSP": 0x8030,
    "N-EVENT-REPORT-RQ": 0x0100,
    "N-GET-RQ": 0x0110,
    "N-SET-RQ": 0x0120,
    "N-ACTION-RQ": 0x0130,
    "N-CREATE-RQ": 0x0140,
    "N-DELETE-RQ": 0x0150,
    "C-CANCEL-RQ": 0x0FFF,
    "unknown": 0x7777,
}


@dataclass
class Stream:
    """One connection: the association request and what follows once it is accepted.
    ``whole`` names the instances whose data set was sent whole: a node may store
    these and no others."""

    name: str
    request: bytes
    data: bytes
    whole: list[str] = field(default_factory=list)


def _item_pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, len(body)) + body


def p_data(context_id: int, header: int, fragment: bytes) -> bytes:
    """A P-DATA-TF PDU with one PDV (header bit 0: command, bit 1: last)."""
    pdv = struct.pack(">LBB", len(fragment) + 2, context_id, header) + fragment
    return _item_pdu(4, pdv)


def release_request() -> bytes:
    return _item_pdu(5, bytes(4))


def encode_dataset(ds: Dataset, implicit: bool, little: bool = True) -> bytes:
    buf = DicomBytesIO()
    buf.is_implicit_VR, buf.is_little_endian = implicit, little
    write_dataset(buf, ds)
    return buf.getvalue()


def _value_bytes(vr: str, value: object) -> bytes:
    if isinstance(value, bytes):
        return value  # as it is: odd lengths included
    if vr == "US":
        return struct.pack("<H", int(value) & 0xFFFF)  # type: ignore[call-overload]
    if vr == "UL":
        return struct.pack("<L", int(value) & 0xFFFFFFFF)  # type: ignore[call-overload]
    if vr == "AT":
        return b"".join(struct.pack("<HH", t >> 16, t & 0xFFFF) for t in value)  # type: ignore[attr-defined]
    text = str(value).encode("latin-1")
    return text + b"\0" * (len(text) % 2)


def command_set(elements: list[tuple[int, str, object]]) -> bytes:
    """A command set in implicit VR little endian (PS3.7 6.3.1), group length first,
    each element written as it is given: repeated, out of order or of any length."""
    body = b""
    for tag, vr, value in elements:
        data = _value_bytes(vr, value)
        body += struct.pack("<HHL", tag >> 16, tag & 0xFFFF, len(data)) + data
    return struct.pack("<HHLL", 0, 0, 4, len(body)) + body


def association_request(
    rng: random.Random,
    contexts: list[tuple[int, str, list[str]]],
    max_length: int | None = 16384,
    extras: bool = False,
    calling: str = "FUZZ",
) -> bytes:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title, primitive.called_ae_title = calling, "ANGIO_NODE"
    items = []
    for context_id, abstract, syntaxes in contexts:
        cx = PresentationContext()
        cx.context_id = context_id
        cx.abstract_syntax = abstract
        cx.transfer_syntax = syntaxes
        items.append(cx)
    primitive.presentation_context_definition_list = items
    uid = ImplementationClassUIDNotification()
    uid.implementation_class_uid = "1.2.3.4"
    info: list[object] = [uid]
    if max_length is not None:  # the sub-item is mandatory (PS3.8 D.1)
        length = MaximumLengthNotification()
        length.maximum_length_received = max_length
        info.insert(0, length)
    if extras:
        info += _negotiation_items(rng)
    primitive.user_information = info
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def _item(kind: int, body: bytes) -> bytes:
    """An item or sub-item of an association request (PS3.8 9.3.2): type, length, body."""
    return struct.pack(">BBH", kind, 0, len(body)) + body


def _context(context_id: int, subitems: list[bytes]) -> bytes:
    return _item(0x20, bytes([context_id, 0, 0, 0]) + b"".join(subitems))


_XA, _EXPLICIT = XRayAngiographicImageStorage.encode(), ExplicitVRLittleEndian.encode()
_LENGTH = _item(0x51, struct.pack(">L", 16384))
_CLASS = _item(0x52, b"1.2.3.4")
# Item-level breaks pynetdicom's primitives cannot express: (name, items, called AE,
# calling AE, protocol version). Each keeps context 1 for XA in Explicit VR LE where
# the break allows, so the messages that follow may still be served.
_GOOD = _context(1, [_item(0x30, _XA), _item(0x40, _EXPLICIT)])
_APP = _item(0x10, b"1.2.840.10008.3.1.1.1")


def _raw_requests() -> list[tuple[str, list[bytes], bytes, bytes, int]]:
    info = _item(0x50, _LENGTH + _CLASS)

    def user(*subitems: bytes) -> bytes:
        return _item(0x50, _LENGTH + _CLASS + b"".join(subitems))

    def ctx(*subitems: bytes, context_id: int = 1) -> bytes:
        return _context(context_id, list(subitems))

    many = [ctx(_item(0x30, _XA), _item(0x40, _EXPLICIT), context_id=2 * k + 1) for k in range(128)]
    cases = [
        ("a context ID twice", [_APP, _GOOD, _GOOD, info]),
        (
            "an even context ID",
            [_APP, _GOOD, ctx(_item(0x30, _XA), _item(0x40, _EXPLICIT), context_id=2), info],
        ),
        (
            "context ID 0",
            [_APP, _GOOD, ctx(_item(0x30, _XA), _item(0x40, _EXPLICIT), context_id=0), info],
        ),
        ("no presentation context", [_APP, info]),
        (
            "a context without abstract syntax",
            [_APP, _GOOD, ctx(_item(0x40, _EXPLICIT), context_id=3), info],
        ),
        (
            "a context without transfer syntax",
            [_APP, _GOOD, ctx(_item(0x30, _XA), context_id=3), info],
        ),
        (
            "an empty transfer syntax",
            [_APP, _GOOD, ctx(_item(0x30, _XA), _item(0x40, b""), context_id=3), info],
        ),
        (
            "an empty abstract syntax",
            [_APP, _GOOD, ctx(_item(0x30, b""), _item(0x40, _EXPLICIT), context_id=3), info],
        ),
        (
            "two abstract syntaxes",
            [_APP, ctx(_item(0x30, _XA), _item(0x30, _XA), _item(0x40, _EXPLICIT)), info],
        ),
        (
            "an unknown sub-item",
            [_APP, ctx(_item(0x30, _XA), _item(0x77, b"zz"), _item(0x40, _EXPLICIT)), info],
        ),
        ("an unknown item", [_APP, _item(0x99, b"abc"), _GOOD, info]),
        ("a sub-item cut short", [_APP, ctx(_item(0x30, _XA)[:-3], _item(0x40, _EXPLICIT)), info]),
        ("another application context", [_item(0x10, b"1.2.3"), _GOOD, info]),
        ("no application context", [_GOOD, info]),
        ("no user information", [_APP, _GOOD]),
        ("two user information items", [_APP, _GOOD, info, info]),
        (
            "a maximum length of two bytes",
            [_APP, _GOOD, _item(0x50, _item(0x51, b"\x40\x00") + _CLASS)],
        ),
        ("no implementation class UID", [_APP, _GOOD, _item(0x50, _LENGTH)]),
        ("a UID of 120 characters", [_APP, _GOOD, _item(0x50, _LENGTH + _item(0x52, b"1." * 60))]),
        (
            "a UID that is not ASCII",
            [_APP, ctx(_item(0x30, b"1.2.\xff"), _item(0x40, _EXPLICIT)), info],
        ),
        (
            "a UID padded with NULs",
            [_APP, ctx(_item(0x30, _XA + b"\0\0"), _item(0x40, _EXPLICIT)), info],
        ),
        ("a role selection cut short", [_APP, _GOOD, user(_item(0x54, b"\x00"))]),
        (
            "a role selection whose UID length lies",
            [_APP, _GOOD, user(_item(0x54, b"\x00\x50" + _XA + b"\x01\x01"))],
        ),
        ("an operations window cut short", [_APP, _GOOD, user(_item(0x53, b"\x00"))]),
        (
            "an extended negotiation whose UID length lies",
            [_APP, _GOOD, user(_item(0x56, b"\x00\x40" + b"1.2"))],
        ),
        ("a user identity cut short", [_APP, _GOOD, user(_item(0x58, b"\x01"))]),
        (
            "a user identity whose length lies",
            [_APP, _GOOD, user(_item(0x58, b"\x02\x01\xff\xffabc"))],
        ),
        (
            "a user identity of type 9",
            [_APP, _GOOD, user(_item(0x58, b"\x09\x00\x00\x03abc\x00\x00"))],
        ),
        (
            "an implementation version of 200 characters",
            [_APP, _GOOD, user(_item(0x55, b"V" * 200))],
        ),
        ("an unknown user sub-item", [_APP, _GOOD, user(_item(0x5F, b"xyz"))]),
        ("128 presentation contexts", [_APP, *many, info]),
        (
            "300 transfer syntaxes",
            [_APP, ctx(_item(0x30, _XA), *[_item(0x40, _EXPLICIT)] * 300), info],
        ),
    ]
    out = [(name, items, b"ANGIO_NODE", b"FUZZ", 1) for name, items in cases]
    out += [
        ("protocol version 0", [_APP, _GOOD, info], b"ANGIO_NODE", b"FUZZ", 0),
        ("protocol version 2", [_APP, _GOOD, info], b"ANGIO_NODE", b"FUZZ", 2),
        ("a called AE title of spaces", [_APP, _GOOD, info], b" " * 16, b"FUZZ", 1),
        (
            "control characters in the calling AE title",
            [_APP, _GOOD, info],
            b"ANGIO_NODE",
            b"\x00\x1b[31m",
            1,
        ),
        (
            "a calling AE title that is not ASCII",
            [_APP, _GOOD, info],
            b"ANGIO_NODE",
            b"\xc4\xd6",
            1,
        ),
    ]
    return out


RAW_REQUESTS = _raw_requests()


def raw_request(k: int | str) -> tuple[str, bytes]:
    """An item-level break of an association request (the k-th, or by its name), as
    its PDU."""
    if isinstance(k, str):
        k = [r[0] for r in RAW_REQUESTS].index(k)
    name, items, called, calling, version = RAW_REQUESTS[k % len(RAW_REQUESTS)]
    body = struct.pack(">HH", version, 0) + called.ljust(16) + calling.ljust(16) + bytes(32)
    return name, _item_pdu(1, body + b"".join(items))


def _negotiation_items(rng: random.Random) -> list[object]:
    """Extended negotiation a peer may offer: each kind at random."""
    items: list[object] = []
    if rng.random() < 0.5:
        name = ImplementationVersionNameNotification()
        name.implementation_version_name = rng.choice(["FUZZ_1", "X" * 16, "A"])
        items.append(name)
    if rng.random() < 0.5:
        window = AsynchronousOperationsWindowNegotiation()
        window.maximum_number_operations_invoked = rng.choice([0, 2, 65535])
        window.maximum_number_operations_performed = rng.choice([0, 2, 65535])
        items.append(window)
    for _ in range(rng.choice([0, 0, 1, 3])):
        role = SCP_SCU_RoleSelectionNegotiation()
        role.sop_class_uid = rng.choice(ABSTRACT[:6])
        role.scu_role, role.scp_role = rng.choice([(True, True), (False, True), (True, False)])
        items.append(role)
    if rng.random() < 0.4:
        ext = SOPClassExtendedNegotiation()
        ext.sop_class_uid = rng.choice(ABSTRACT[:6])
        ext.service_class_application_information = rng.randbytes(rng.choice([1, 16, 4000]))
        items.append(ext)
    if rng.random() < 0.3:
        common = SOPClassCommonExtendedNegotiation()
        common.sop_class_uid = rng.choice(ABSTRACT[:6])
        common.service_class_uid = "1.2.840.10008.4.2"
        common.related_general_sop_class_identification = [rng.choice(ABSTRACT[:3])]
        items.append(common)
    if rng.random() < 0.4:
        identity = UserIdentityNegotiation()
        identity.user_identity_type = rng.choice([1, 2, 3, 4, 5])
        identity.positive_response_requested = rng.random() < 0.5
        identity.primary_field = rng.randbytes(rng.choice([1, 64, 8000]))
        if identity.user_identity_type == 2:
            identity.secondary_field = rng.randbytes(rng.choice([1, 64]))
        items.append(identity)
    return items


def _instance(rng: random.Random) -> Dataset:
    ds = fresh(frames=2, size=16, seed=rng.randrange(1000))
    ds.SOPInstanceUID = generate_uid()
    return ds


def command_elements(
    kind: str, sop_class: str, message_id: int = 1, data_set_type: int = 0x0101, status: int = 0
) -> list[tuple[int, str, object]]:
    """A command set's elements for a message of this kind (``COMMANDS``) and SOP
    Class: a request's Message ID, or a response's Message ID Being Responded To and
    Status. 0x0101 in Command Data Set Type: no data set follows."""
    response = kind.endswith("RSP")
    elements: list[tuple[int, str, object]] = [
        (0x00000002, "UI", sop_class),
        (0x00000100, "US", COMMANDS[kind]),
        (0x00000120 if response else 0x00000110, "US", message_id),
        (0x00000800, "US", data_set_type),
    ]
    if response:
        elements.append((0x00000900, "US", status))
    return elements


def store_command(
    sop_class: str, sop_uid: str, message_id: int = 1, has_data: bool = True, priority: int = 0
) -> list[tuple[int, str, object]]:
    """A C-STORE request's elements, naming this instance."""
    elements = command_elements("C-STORE-RQ", sop_class, message_id, 0x0000 if has_data else 0x0101)
    elements.insert(3, (0x00000700, "US", priority))  # the order the corpus draws from
    return [*elements, (0x00001000, "UI", sop_uid)]


def _mutate_command(rng: random.Random, elements: list[tuple[int, str, object]]) -> str:
    """Break a command set's elements in place; the kind of break."""
    kind = rng.choice(["drop", "retype", "value", "duplicate", "data set type", "message id"])
    k = rng.randrange(len(elements))
    tag, vr, value = elements[k]
    if kind == "drop":
        del elements[k]
    elif kind == "retype":
        elements[k] = (tag, rng.choice(["UI", "US", "UL", "OB", "LO"]), _value_for(rng, "OB"))
    elif kind == "value":
        elements[k] = (tag, vr, _value_for(rng, vr))
    elif kind == "duplicate":
        elements.append((tag, vr, value))  # written once by pydicom: the element is kept
        elements.append((0x00000901, "AT", [0x00100010]))  # an Offending Element in a request
    elif kind == "data set type":
        for j, (t, v, _) in enumerate(elements):
            if t == 0x00000800:
                elements[j] = (t, v, rng.choice([0x0000, 0x0101, 0x0102, 0xFFFF]))
    else:
        for j, (t, v, _) in enumerate(elements):
            if t == 0x00000110:
                elements[j] = (t, v, rng.choice([0, 65535]))
    return kind


def _value_for(rng: random.Random, vr: str) -> object:
    if vr == "US":
        return rng.choice([0, 1, 0x8001, 0xFFFF])
    if vr == "UL":
        return rng.choice([0, 2**32 - 1])
    if vr == "UI":
        return rng.choice(["", "1.2", "0.0.0", "1." + "9" * 70, "not a uid", "1.2.3\\4.5"])
    return rng.randbytes(rng.choice([0, 1, 7, 300]))


def _split(data: bytes, rng: random.Random) -> list[bytes]:
    """A message's bytes in one to four fragments."""
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randrange(4))))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


def message(
    context_id: int, command: bytes, data: bytes | None, rng: random.Random | None = None
) -> bytes:
    """A DIMSE message as P-DATA-TF PDUs: its command set, then its data set (if any),
    each in one fragment, or in one to four when ``rng`` is given."""
    out = b""
    parts = _split(command, rng) if rng else [command]
    for i, part in enumerate(parts):
        out += p_data(context_id, 0x01 | (0x02 if i == len(parts) - 1 else 0), part)
    if data is not None:
        parts = _split(data, rng) if data and rng else [data]
        for i, part in enumerate(parts):
            out += p_data(context_id, 0x02 if i == len(parts) - 1 else 0x00, part)
    return out


def store_request(
    context_id: int, ds: Dataset, implicit: bool = False, sop_uid: str | None = None
) -> bytes:
    """A whole C-STORE request for ``ds`` (its command naming ``sop_uid`` if given)."""
    elements = store_command(ds.SOPClassUID, sop_uid or ds.SOPInstanceUID)
    return message(context_id, command_set(elements), encode_dataset(ds, implicit=implicit))


def commitment_request(
    context_id: int,
    message_id: int,
    info: Dataset | bytes,
    implicit: bool,
    action_type: int = 1,
    rng: random.Random | None = None,
) -> bytes:
    """A storage commitment request (N-ACTION) with ``info`` as its Action Information
    (a data set, or bytes sent as they are); its command broken when ``rng`` is given."""
    elements: list[tuple[int, str, object]] = [
        (0x00000003, "UI", COMMITMENT),
        (0x00000100, "US", COMMANDS["N-ACTION-RQ"]),
        (0x00000110, "US", message_id),
        (0x00000800, "US", 0x0000),
        (0x00001001, "UI", COMMITMENT_INSTANCE),
        (0x00001008, "US", action_type),
    ]
    if rng is not None:
        _mutate_command(rng, elements)
    data = info if isinstance(info, bytes) else encode_dataset(info, implicit=implicit)
    return message(context_id, command_set(elements), data)


def commitment_info(references: list[tuple[str, str]], transaction: str | None) -> Dataset:
    info = Dataset()
    if transaction is not None:
        info.TransactionUID = transaction
    info.ReferencedSOPSequence = []
    for sop_class, sop in references:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class, sop
        info.ReferencedSOPSequence.append(item)
    return info


def _commitment(
    rng: random.Random, context_id: int, message_id: int, implicit: bool, whole: list[str]
) -> tuple[bytes, str]:
    """A storage commitment request for instances this stream sent and one it did not,
    broken in one way or none; and what was broken."""
    references = [(XRayAngiographicImageStorage, uid) for uid in whole[-3:]]
    references.append((rng.choice([XRayAngiographicImageStorage, CT]), generate_uid()))
    transaction: str | None = generate_uid()
    action_type, broken, roll = 1, "", rng.random()
    if roll < 0.1:
        transaction, broken = None, "no transaction UID"
    elif roll < 0.2:
        transaction, broken = str(_value_for(rng, "UI")), "transaction UID"
    elif roll < 0.3:
        references[-1] = (str(_value_for(rng, "UI")), str(_value_for(rng, "UI")))
        broken = "reference UIDs"
    elif roll < 0.35:
        action_type, broken = rng.choice([0, 2, 0xFFFF]), "action type"
    info: Dataset | bytes = commitment_info(references, transaction)
    if rng.random() < 0.25:  # a storage commitment result instead, as a PACS reports one
        event = rng.choice([1, 2, 3, 0xFFFF])
        if event == 2:
            info.FailedSOPSequence = info.ReferencedSOPSequence[-1:]
            info.FailedSOPSequence[0].FailureReason = rng.choice([0x0110, 0x0112, 0xFFFF])
        elements: list[tuple[int, str, object]] = [
            (0x00000002, "UI", COMMITMENT),
            (0x00000100, "US", COMMANDS["N-EVENT-REPORT-RQ"]),
            (0x00000110, "US", message_id),
            (0x00000800, "US", 0x0000),
            (0x00001000, "UI", COMMITMENT_INSTANCE),
            (0x00001002, "US", event),
        ]
        data = encode_dataset(info, implicit=implicit)
        if roll < 0.2:
            data = data[: rng.randrange(len(data))]
        return message(context_id, command_set(elements), data), f"result, event {event}"
    if broken == "" and roll < 0.55:
        data = encode_dataset(info, implicit=implicit)  # type: ignore[arg-type]
        info = (
            data[: rng.randrange(len(data))]
            if roll < 0.45
            else rng.randbytes(rng.randrange(1, 300))
        )
        broken = "action information cut" if roll < 0.45 else "action information garbage"
    mutate = rng if broken == "" and roll < 0.65 else None
    body = commitment_request(context_id, message_id, info, implicit, action_type, mutate)
    return body, broken or ("command" if mutate else "")


def instance(seed: int = 0) -> Dataset:
    return _instance(random.Random(seed))


def _messages(
    rng: random.Random, accepted: dict[int, tuple[str, str]]
) -> tuple[bytes, list[str], str]:
    """One to four DIMSE messages on the negotiated contexts; the SOP Instance UIDs of
    the data sets sent whole, and a name for each message and what was broken."""
    out, whole, names = b"", [], []
    for message_id in range(1, rng.randrange(2, 6)):
        context_id = rng.choice(sorted(accepted))
        abstract, syntax = accepted[context_id]
        implicit = syntax == ImplicitVRLittleEndian
        kind = "C-STORE-RQ" if rng.random() < 0.5 else rng.choice(list(COMMANDS))
        if abstract == COMMITMENT and rng.random() < 0.7:
            body, broken = _commitment(rng, context_id, message_id, implicit, whole)
            out += body
            names.append(f"storage commitment{' ' + broken if broken else ''}")
            continue
        if kind == "C-STORE-RQ":
            ds = _instance(rng)
            ds.SOPClassUID = abstract if abstract != VERIFICATION else XRayAngiographicImageStorage
            elements = store_command(
                ds.SOPClassUID, ds.SOPInstanceUID, message_id, priority=rng.choice([0, 1, 2])
            )
            data = encode_dataset(ds, implicit=implicit)
            broken = ""
            roll = rng.random()
            if roll < 0.2:
                broken = _mutate_command(rng, elements)
            elif roll < 0.26:
                broken = "other instance UID"
                elements[-1] = (0x00001000, "UI", generate_uid())
            elif roll < 0.32:
                broken = "other transfer syntax"
                data = encode_dataset(ds, implicit=not implicit)
            elif roll < 0.38:
                broken = "data set cut"
                data = data[: rng.randrange(len(data))]
            elif roll < 0.42:
                broken = "no data set"
                data = b""
            elif roll < 0.46:
                broken = "unaccepted context"
                context_id = rng.choice([0, 2, 255, max(accepted) + 2])
            if broken not in ("data set cut", "no data set"):
                whole.append(ds.SOPInstanceUID)
            out += message(context_id, command_set(elements), data, rng)
            names.append(f"C-STORE-RQ{' ' + broken if broken else ''}")
            continue
        elements = command_elements(
            kind,
            abstract,
            message_id,
            data_set_type=rng.choice([0x0101, 0x0000]),
            status=rng.choice([0, 0xA700, 0xC000]) if kind.endswith("RSP") else 0,
        )
        if kind.startswith("N-"):
            elements.append(
                (0x00001000 if kind == "N-EVENT-REPORT-RQ" else 0x00001001, "UI", generate_uid())
            )
        if rng.random() < 0.3:
            _mutate_command(rng, elements)
        has_data = any(t == 0x00000800 and v == 0x0000 for t, _, v in elements)
        identifier = Dataset()
        identifier.QueryRetrieveLevel, identifier.PatientID = "STUDY", "X" * rng.choice([1, 64])
        data = encode_dataset(identifier, implicit=implicit) if has_data else None
        if data is not None and rng.random() < 0.3:
            data = rng.randbytes(rng.randrange(1, 200))
        out += message(context_id, command_set(elements), data, rng)
        names.append(kind)
    return out, whole, ", ".join(names)


def stream(seed: int) -> Stream:
    rng = random.Random(seed)
    roll = rng.random()
    extras = roll < 0.5
    max_length = 16384
    if roll < 0.15:
        max_length = rng.choice([None, 0, 1, 6, 7, 8, 100, 2**32 - 1])
    count = rng.choice([1, 2, 3, 8, 127])
    contexts = []
    for k in range(count):
        contexts.append(
            (
                2 * k + 1,
                rng.choice(ABSTRACT) if k else XRayAngiographicImageStorage,
                rng.sample(SYNTAXES, rng.randrange(1, 4)) if k else [ExplicitVRLittleEndian],
            )
        )
    request = association_request(rng, contexts, max_length, extras)
    raw = ""
    if rng.random() < 0.3:  # an item-level break instead, with context 1 for XA
        raw, request = raw_request(rng.randrange(len(RAW_REQUESTS)))
        contexts = [(1, XRayAngiographicImageStorage, [ExplicitVRLittleEndian])]
    # What the node accepts: the storage and verification contexts in a syntax it
    # knows, the first one proposed (pynetdicom's order). Messages on the others are
    # the peer's mistake, so some are sent there on purpose.
    accepted: dict[int, tuple[str, str]] = {}
    for context_id, abstract, syntaxes in contexts:
        known = [s for s in syntaxes if s in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)]
        if abstract in (XRayAngiographicImageStorage, VERIFICATION, CT, COMMITMENT) and known:
            accepted[context_id] = (abstract, known[0])
    if rng.random() < 0.15:  # a context the node refuses, used as if accepted
        context_id, abstract, syntaxes = rng.choice(contexts)
        accepted.setdefault(context_id, (abstract, syntaxes[0]))
    body, whole, names = _messages(rng, accepted)
    ending = rng.choice([release_request(), b"", _item_pdu(7, bytes(4))])  # release, close, abort
    detail = f"{count} contexts, max length {max_length}{', negotiation items' if extras else ''}"
    if raw:
        detail = f"association request with {raw}"
    return Stream(f"seed {seed}: {detail}: {names}", request, body + ending, whole)


def corpus(seed: int, count: int) -> list[Stream]:
    return [stream(seed * 1000 + k) for k in range(count)]


@dataclass
class Reply:
    """What the node answered on one connection: its PDU types in order, and each DIMSE
    response as (Command Field, Status, Affected SOP Instance UID)."""

    pdus: list[int] = field(default_factory=list)
    responses: list[tuple[int, int, str]] = field(default_factory=list)


def _read_pdus(data: bytes, reply: Reply) -> None:
    command, at = b"", 0
    while at + 6 <= len(data):
        kind, _, length = struct.unpack(">BBL", data[at : at + 6])
        body, at = data[at + 6 : at + 6 + length], at + 6 + length
        reply.pdus.append(kind)
        pos = 0
        while kind == 4 and pos + 6 <= len(body):
            size, _, header = struct.unpack(">LBB", body[pos : pos + 6])
            fragment, pos = body[pos + 6 : pos + 4 + size], pos + 4 + size
            if header & 1:
                command += fragment
                if header & 2:
                    cs = read_dataset(BytesIO(command), True, True)
                    uid = str(cs.get("AffectedSOPInstanceUID", "") or "")
                    reply.responses.append((cs.CommandField, cs.get("Status", -1), uid))
                    command = b""


def converse(port: int, stream: Stream, timeout: float = 20) -> Reply:
    """Send the request; once accepted, the rest, and read until the node closes."""
    received = b""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as peer:
            peer.sendall(stream.request)
            received = peer.recv(1 << 16)
            if received[:1] == b"\x02":  # A-ASSOCIATE-AC
                peer.sendall(stream.data)
                while chunk := peer.recv(1 << 16):
                    received += chunk
            # after an A-ASSOCIATE-RJ or an A-ABORT the peer closes, as it should
    except OSError:
        pass  # reset: what the node answered before it is the test
    reply = Reply()
    _read_pdus(received, reply)
    return reply
