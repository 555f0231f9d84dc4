"""The C-STORE fast path's message router and response encoder, against pynetdicom's encoder."""

from __future__ import annotations

import struct
from io import BytesIO

import pytest
from pydicom.uid import generate_uid
from pynetdicom import _config as pynetdicom_config
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.pdu import P_DATA_TF

from acwi_node.ingest.fastpath import (
    PassThrough,
    PDataRouter,
    ProtocolError,
    StoreRequest,
    parse_command,
    store_response_command,
    store_response_pdu,
    ui_value,
    us_value,
)
from acwi_node.ingest.reactor import conformant_uid

CT = "1.2.840.10008.5.1.4.1.1.2"


def command_bytes(message: C_STORE_RQ | C_STORE_RSP | C_ECHO_RQ) -> bytes:
    """The command set of a pynetdicom DIMSE message, taken from the PDVs it encodes to."""
    command = b""
    for p_data in message.encode_msg(1, 0):
        for _, data in p_data.presentation_data_value_list:
            if data[0] & 0x01:
                command += data[1:]
    return command


def store_command(message_id: int = 7, sop_uid: str | None = None) -> tuple[bytes, str]:
    primitive = C_STORE()
    primitive.MessageID = message_id
    primitive.AffectedSOPClassUID = CT
    primitive.AffectedSOPInstanceUID = sop_uid or generate_uid()
    primitive.Priority = 0
    primitive.MoveOriginatorApplicationEntityTitle = "MOVER"
    primitive.MoveOriginatorMessageID = 3
    primitive.DataSet = BytesIO(b"\x08\x00\x18\x00\x00\x00\x00\x00")  # a data set follows
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    return command_bytes(message), str(primitive.AffectedSOPInstanceUID)


def echo_command() -> bytes:
    primitive = C_ECHO()
    primitive.MessageID = 9
    primitive.AffectedSOPClassUID = "1.2.840.10008.1.1"
    message = C_ECHO_RQ()
    message.primitive_to_message(primitive)
    return command_bytes(message)


def pdv(context_id: int, control: int, data: bytes) -> bytes:
    return struct.pack(">IBB", len(data) + 2, context_id, control) + data


CMD_LAST, CMD_MORE, DATA_LAST, DATA_MORE = 0x03, 0x01, 0x02, 0x00


def accept_all(context_id: int, elements: dict[int, bytes]) -> StoreRequest | None:
    if us_value(elements, 0x0100) != 0x0001:
        return None
    return StoreRequest(
        context_id,
        ui_value(elements, 0x0002) or "",
        ui_value(elements, 0x1000) or "",
        us_value(elements, 0x0110) or 0,
    )


# ------------------------------------------------------------------ the command set codec
def test_parse_command_reads_pynetdicoms_encoding() -> None:
    command, uid = store_command(message_id=513)
    elements = parse_command(command)
    assert elements is not None
    assert us_value(elements, 0x0100) == 0x0001
    assert us_value(elements, 0x0110) == 513
    assert ui_value(elements, 0x0002) == CT
    assert ui_value(elements, 0x1000) == uid
    assert ui_value(elements, 0x1030) == "MOVER"
    assert us_value(elements, 0x1031) == 3


@pytest.mark.parametrize(
    "data",
    [
        b"\x00\x00\x00",  # cut inside an element header
        struct.pack("<HHI", 0x0008, 0x0016, 2) + b"ab",  # not group 0000
        struct.pack("<HHI", 0, 0x0100, 10) + b"\x01\x00",  # value longer than the data
        struct.pack("<HHI", 0, 0x0100, 0xFFFFFFFF),  # undefined length
    ],
)
def test_parse_command_refuses_what_is_not_a_command_set(data: bytes) -> None:
    assert parse_command(data) is None


def test_value_readers_refuse_wrong_sizes_and_non_ascii() -> None:
    assert us_value({0x0100: b"\x01"}, 0x0100) is None
    assert us_value({}, 0x0100) is None
    assert ui_value({0x0002: b"1.2\xff"}, 0x0002) is None
    assert ui_value({0x0002: b"1.23\x00"}, 0x0002) == "1.23"


@pytest.mark.parametrize("status", [0x0000, 0xA700, 0xC211, 0xB000])
@pytest.mark.parametrize("uid_length", [63, 64])  # odd and even: padded or not
def test_store_response_is_byte_for_byte_pynetdicoms(status: int, uid_length: int) -> None:
    sop_uid = ("1.2." + "9" * 70)[:uid_length]
    request = StoreRequest(5, CT, sop_uid, 0xFFFF)
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = 0xFFFF
    primitive.AffectedSOPClassUID = CT
    primitive.AffectedSOPInstanceUID = sop_uid
    primitive.Status = status
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    assert store_response_command(request, status) == command_bytes(message)

    pdu = P_DATA_TF()
    pdu.decode(store_response_pdu(request, status))
    [(context_id, data)] = pdu.to_primitive().presentation_data_value_list
    assert context_id == 5
    assert data[0] == 0x03  # command, last fragment
    assert data[1:] == command_bytes(message)


# ------------------------------------------------------------------------------ the router
def test_a_store_request_over_several_pdus_is_taken_whole() -> None:
    command, uid = store_command()
    router = PDataRouter(accept_all)
    assert router.feed(pdv(3, CMD_LAST, command)) == []
    assert not router.between_messages
    assert router.feed(pdv(3, DATA_MORE, b"ab") + pdv(3, DATA_MORE, b"cd")) == []
    [taken] = router.feed(pdv(3, DATA_LAST, b"ef"))
    assert isinstance(taken, StoreRequest)
    assert (taken.context_id, taken.sop_instance_uid, taken.message_id) == (3, uid, 7)
    assert taken.data_set == b"abcdef"
    assert router.between_messages


def test_command_and_data_set_in_one_pdu() -> None:
    command, _ = store_command()
    [taken] = PDataRouter(accept_all).feed(pdv(1, CMD_LAST, command) + pdv(1, DATA_LAST, b"xy"))
    assert isinstance(taken, StoreRequest) and taken.data_set == b"xy"


def test_other_messages_pass_through_unchanged() -> None:
    router = PDataRouter(accept_all)
    echo = pdv(1, CMD_LAST, echo_command())
    [passed] = router.feed(echo)
    assert isinstance(passed, PassThrough)
    assert passed.items == [echo]
    assert router.between_messages  # a C-ECHO has no data set
    pdu = P_DATA_TF()
    pdu.decode(passed.pdu())
    assert pdu.to_primitive().presentation_data_value_list == [(1, b"\x03" + echo_command())]


def test_a_declined_request_passes_through_to_its_data_sets_end() -> None:
    command, _ = store_command()
    router = PDataRouter(lambda context_id, elements: None)
    items = [pdv(1, CMD_LAST, command), pdv(1, DATA_MORE, b"ab"), pdv(1, DATA_LAST, b"c")]
    actions = [router.feed(item) for item in items]
    assert [a[0].items for a in actions] == [[i] for i in items]  # type: ignore[union-attr]
    assert router.between_messages


def test_a_command_split_over_pdus_goes_to_pynetdicom_then_the_next_is_taken() -> None:
    command, _ = store_command()
    router = PDataRouter(accept_all)
    split = [pdv(1, CMD_MORE, command[:20]), pdv(1, CMD_LAST, command[20:])]
    data = pdv(1, DATA_LAST, b"ds")
    for item in [*split, data]:
        [passed] = router.feed(item)
        assert isinstance(passed, PassThrough) and passed.items == [item]
    assert router.between_messages
    [taken] = router.feed(pdv(1, CMD_LAST, command) + pdv(1, DATA_LAST, b"z"))
    assert isinstance(taken, StoreRequest)


def test_what_comes_before_a_taken_request_in_its_pdu_is_passed_first() -> None:
    command, _ = store_command()
    echo = pdv(1, CMD_LAST, echo_command())
    actions = PDataRouter(accept_all).feed(echo + pdv(1, CMD_LAST, command) + pdv(1, 0x02, b"d"))
    assert [type(a) for a in actions] == [PassThrough, StoreRequest]


def test_a_data_set_fragment_with_no_command_is_left_to_pynetdicom() -> None:
    router = PDataRouter(accept_all)
    stray = pdv(1, DATA_MORE, b"??")
    assert router.feed(stray) == [PassThrough([stray])]
    assert router.between_messages


@pytest.mark.parametrize(
    "intruder",
    [pdv(1, CMD_LAST, b"\x00" * 8), pdv(2, DATA_LAST, b"other context")],
)
def test_a_pdv_out_of_place_in_a_taken_request_is_a_protocol_error(intruder: bytes) -> None:
    command, _ = store_command()
    router = PDataRouter(accept_all)
    router.feed(pdv(1, CMD_LAST, command))
    with pytest.raises(ProtocolError):
        router.feed(intruder)
    assert router.between_messages


@pytest.mark.parametrize(
    "body",
    [
        b"\x00\x00\x00",  # cut inside a PDV header
        struct.pack(">IBB", 1, 1, 3),  # a PDV shorter than its own header
        struct.pack(">IBB", 50, 1, 3) + b"short",  # longer than the PDU
    ],
)
def test_pdv_items_that_do_not_fit_are_protocol_errors(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        PDataRouter(accept_all).feed(body)


@pytest.mark.parametrize(
    "value",
    [
        "1.2.840.10008.5.1.4.1.1.7",
        "0.1.2",
        "2.25.339818947364282957383923934894984892893",
        "1." + "1" * 62,  # 64 characters
    ],
)
def test_a_conformant_uid_is_what_pynetdicoms_setter_stores(value: str) -> None:
    by_setter = C_STORE()
    by_setter.AffectedSOPInstanceUID = value
    uid = conformant_uid(value)
    assert uid is not None and type(uid) is type(by_setter.AffectedSOPInstanceUID)
    assert uid == by_setter.AffectedSOPInstanceUID and uid.is_valid


@pytest.mark.parametrize(
    "value",
    ["1.02.3", "1..2", "1.2.", "1.2.3a", "1.2/../3", "1." + "1" * 63, " 1.2", ""],
)
def test_any_other_uid_is_left_to_pynetdicoms_checks(value: str) -> None:
    assert conformant_uid(value) is None


def test_replaced_uid_validators_are_always_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(pynetdicom_config.VALIDATORS, "UI", lambda v: (False, "no"))
    assert conformant_uid("1.2.3") is None
