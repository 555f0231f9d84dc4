"""The MLLP order listener over loopback: orders, ACKs, duplicates and hostile input."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery

from acwi_node.config import Settings, load_settings
from acwi_node.hl7.listener import MllpListener
from acwi_node.hl7.messages import parse_ack
from acwi_node.hl7.mllp import END, START, frame, read_frame_sync
from acwi_node.ingest.completion import CompletionService
from acwi_node.ledger import InstanceRecord, Ledger
from acwi_node.ledger.repository import STAT_PRIORITY
from acwi_node.tasks.app import ANALYSIS_QUEUE, HIGH_PRIORITY_QUEUE, configure
from tests.conftest import REDIS_URL
from tests.support.ports import free_port

pytestmark = pytest.mark.integration

STUDY_UID = "1.2.826.0.1.3680043.8.498.77"


def orm(cid: str, accession: str = "ACC1", *, name: str = "Doe^John", extra: str = "") -> bytes:
    obr = "OBR|1|PL1|FI1|CHEST^Chest X-ray^L" + "|" * 14 + accession
    return "\r".join(
        [
            f"MSH|^~\\&|RIS|HOSP|ACWI|ACWI|20240101120000||ORM^O01|{cid}|P|2.5",
            f"PID|1||PAT1^^^HOSP^MR||{name}||19700101|F",
            "ORC|NW|PL1|FI1||SC||^^^^^S",
            obr,
            *([extra] if extra else []),
        ]
    ).encode()


@pytest.fixture
def hl7_settings(tmp_path: Path) -> Settings:
    return load_settings(
        None,
        node={"data_dir": tmp_path / "data", "broker_url": f"{REDIS_URL}/15"},
        ingest={"fsync": False},
        completion={"quiet_period_s": 3600},
        routes=[{"name": "all"}],
        hl7={
            "listen_host": "127.0.0.1",
            "listen_port": free_port(),
            "max_message_bytes": 4096,
            "max_connections": 2,
            "read_timeout_s": 1.0,
            "idle_timeout_s": 5.0,
        },
    )


@pytest.fixture
def node(hl7_settings: Settings) -> Iterator[tuple[MllpListener, Ledger]]:
    ledger = Ledger(hl7_settings.database_url)
    listener = MllpListener(hl7_settings, ledger).start()
    yield listener, ledger
    listener.stop()
    ledger.dispose()


def connect(listener: MllpListener) -> socket.socket:
    return socket.create_connection(("127.0.0.1", listener.port), timeout=5)


def exchange(listener: MllpListener, payload: bytes) -> tuple[str, str, str]:
    with connect(listener) as sock:
        sock.sendall(frame(payload))
        ack = parse_ack(read_frame_sync(sock, max_bytes=65536, timeout_s=5).decode())
    return ack.code, ack.control_id, ack.text


def closed_without_reply(sock: socket.socket) -> bool:
    sock.settimeout(5)
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True


def test_order_is_stored_and_acknowledged(node: tuple[MllpListener, Ledger]) -> None:
    listener, ledger = node
    extra = f"ZDS|{STUDY_UID}^ACWI^Application^DICOM|3"
    assert exchange(listener, orm("M1", extra=extra)) == ("AA", "M1", "")
    order = ledger.hl7_order("ACC1")
    assert order is not None
    assert order["priority"] == "S"
    assert order["study_uid"] == STUDY_UID
    assert order["expected_images"] == 3
    assert order["patient_name"] == "Doe^John"


def test_a_multi_procedure_order_stores_each_of_its_orders(
    node: tuple[MllpListener, Ledger],
) -> None:
    """An order of two procedures (two ORC/OBR groups): both are stored, each with its own
    Study Instance UID and priority, under the one ACK; the second is not dropped."""
    listener, ledger = node
    second = "\r".join(
        [
            "ORC|NW|PL2|FI2||SC||^^^^^S",
            "OBR|2|PL2|FI2|ABD^Abdomen X-ray^L" + "|" * 14 + "ACC-2",
            f"ZDS|{STUDY_UID}.2",
        ]
    )
    message = orm("MP1", "ACC-1", extra=f"ZDS|{STUDY_UID}.1").replace(
        b"ORC|NW|PL1|FI1||SC||^^^^^S", b"ORC|NW|PL1|FI1||SC"
    )
    assert exchange(listener, message + b"\r" + second.encode()) == ("AA", "MP1", "")
    first, other = ledger.hl7_order("ACC-1"), ledger.hl7_order("ACC-2")
    assert first is not None and other is not None
    assert (first["study_uid"], first["priority"], first["procedure_code"]) == (
        f"{STUDY_UID}.1",
        "R",
        "CHEST",
    )
    assert (other["study_uid"], other["priority"], other["procedure_code"]) == (
        f"{STUDY_UID}.2",
        "S",
        "ABD",
    )
    assert first["control_id"] == other["control_id"] == "MP1"


def test_several_messages_on_one_connection(node: tuple[MllpListener, Ledger]) -> None:
    listener, ledger = node
    with connect(listener) as sock:
        for n in range(3):
            sock.sendall(frame(orm(f"K{n}", f"ACC-K{n}")))
            ack = parse_ack(read_frame_sync(sock, max_bytes=65536, timeout_s=5).decode())
            assert (ack.code, ack.control_id) == ("AA", f"K{n}")
    assert all(ledger.hl7_order(f"ACC-K{n}") for n in range(3))


def test_a_quick_ack_is_asked_for_before_each_message(
    hl7_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A RIS with Nagle's algorithm on holds a message's later parts until the first is
    acknowledged: before reading each message the listener asks to acknowledge at once."""
    asked: list[int] = []
    monkeypatch.setattr(
        "acwi_node.hl7.listener.quick_ack", lambda sock: asked.append(sock.getsockname()[1])
    )
    ledger = Ledger(hl7_settings.database_url)
    listener = MllpListener(hl7_settings, ledger).start()
    try:
        with connect(listener) as sock:
            for n in range(3):
                sock.sendall(frame(orm(f"Q{n}", f"ACC-Q{n}")))
                ack = parse_ack(read_frame_sync(sock, max_bytes=65536, timeout_s=5).decode())
                assert ack.code == "AA"
                assert len(asked) >= n + 1  # before this one (and perhaps the next already)
            deadline = time.monotonic() + 10
            while len(asked) < 4 and time.monotonic() < deadline:  # waiting for a fourth
                time.sleep(0.01)
        assert asked == [listener.port] * 4
    finally:
        listener.stop()
        ledger.dispose()


def test_duplicate_control_id_gets_stored_ack(node: tuple[MllpListener, Ledger]) -> None:
    listener, ledger = node
    with connect(listener) as sock:
        sock.sendall(frame(orm("DUP1", "ACC-D")))
        first = read_frame_sync(sock, max_bytes=65536, timeout_s=5)
    # Same MSH-10, different content: the stored ACK comes back and nothing changes.
    with connect(listener) as sock:
        sock.sendall(frame(orm("DUP1", "ACC-OTHER")))
        second = read_frame_sync(sock, max_bytes=65536, timeout_s=5)
    assert first == second
    assert ledger.hl7_order("ACC-D") is not None
    assert ledger.hl7_order("ACC-OTHER") is None


def test_missing_accession_is_ae_and_repeat_is_stable(node: tuple[MllpListener, Ledger]) -> None:
    listener, _ = node
    code, cid, text = exchange(listener, orm("NOACC", accession=""))
    assert (code, cid) == ("AE", "NOACC") and "accession" in text
    assert exchange(listener, orm("NOACC", accession="")) == (code, cid, text)


def test_script_in_patient_name(node: tuple[MllpListener, Ledger]) -> None:
    listener, ledger = node
    name = "<script>alert(1)</script>^Eve"
    with connect(listener) as sock:
        sock.sendall(frame(orm("XSS1", "ACC-X", name=name)))
        raw = read_frame_sync(sock, max_bytes=65536, timeout_s=5)
    assert parse_ack(raw.decode()).code == "AA"
    assert b"script" not in raw  # the ACK does not echo message content
    order = ledger.hl7_order("ACC-X")
    assert order is not None and order["patient_name"] == name


@pytest.mark.parametrize(
    "hostile",
    [
        pytest.param(b"MSH|^~\\&|no start byte" + END, id="no-start-byte"),
        pytest.param(START + b"MSH|^~\\&|never ends", id="no-end-bytes"),
        pytest.param(START + b"A" * 10_000, id="oversized-no-end"),
        pytest.param(frame(b"MSH|" + b"A" * 10_000), id="oversized-framed"),
        pytest.param(b"\x00\xff\x1c\x0d", id="binary"),
    ],
)
def test_broken_framing_closes_and_listener_serves_next(
    node: tuple[MllpListener, Ledger], hostile: bytes
) -> None:
    listener, _ = node
    with connect(listener) as sock:
        sock.sendall(hostile)
        assert closed_without_reply(sock)
    assert exchange(listener, orm("AFTER", "ACC-AFTER"))[0] == "AA"


@pytest.mark.parametrize(
    ("payload", "control_id", "expected"),
    [
        (b"MSH|^~\\&|RIS|H|A|N|2024||ADT^A01|U1|P|2.5\rPID|1||X", "U1", "AR"),
        # a segment HL7 2.5 does not define is ignored: what is left is an order without ORC
        (b"MSH|^~\\&|RIS|H|A|N|2024||ORM^O01|B1|P|2.5\rQQQ|not a segment", "B1", "AE"),
        (b"this is not HL7", "", "AR"),
    ],
)
def test_unsupported_or_malformed_is_ar(
    node: tuple[MllpListener, Ledger], payload: bytes, control_id: str, expected: str
) -> None:
    listener, _ = node
    code, cid, _text = exchange(listener, payload)
    assert (code, cid) == (expected, control_id)
    assert exchange(listener, orm("NEXT" + control_id, "ACC-N" + control_id))[0] == "AA"


def test_connection_cap(node: tuple[MllpListener, Ledger]) -> None:
    listener, _ = node
    held = [connect(listener), connect(listener)]
    try:
        # Both held connections are served before the third arrives.
        for n, sock in enumerate(held):
            sock.sendall(frame(orm(f"CAP{n}", f"ACC-CAP{n}")))
            read_frame_sync(sock, max_bytes=65536, timeout_s=5)
        with connect(listener) as third:
            third.sendall(frame(orm("CAP3", "ACC-CAP3")))
            assert closed_without_reply(third)
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 5
    while True:  # the held connections' slots are freed once their close is seen
        try:
            assert exchange(listener, orm("CAP4", "ACC-CAP4"))[0] == "AA"
            break
        except (AssertionError, OSError, ValueError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_every_message_gets_an_ack_that_can_be_framed(
    node: tuple[MllpListener, Ledger],
) -> None:
    """A malformed message whose MSH-10 hex-escapes MLLP framing bytes is answered AR with
    MSA-2 as sent, on a connection that stays open for the next message."""
    listener, _ = node
    broken = b"MSH|^~\\&|RIS|HOSP|ACWI|ACWI|2024||ORM^O01|M\\X0B\\X\\X1C0D\\|P|2.5\rZZZ1|a\rPI"
    with connect(listener) as sock:
        sock.sendall(frame(broken))
        raw = read_frame_sync(sock, max_bytes=65536, timeout_s=5)
        assert raw.split(b"\r")[1].startswith(b"MSA|AR|M\\X0B\\X\\X1C0D\\|")
        sock.sendall(frame(orm("C\\X0B\\1", "ACC-X0B")))
        ack = read_frame_sync(sock, max_bytes=65536, timeout_s=5)
        assert ack.split(b"\r")[1] == b"MSA|AA|C\\X0B\\1"


def test_an_ack_that_cannot_be_built_is_answered_ar(
    node: tuple[MllpListener, Ledger], monkeypatch: pytest.MonkeyPatch
) -> None:
    listener, _ = node
    monkeypatch.setattr(listener.intake, "handle", lambda raw: b"MSA|AA|\x0b")
    with connect(listener) as sock:
        sock.sendall(frame(orm("NOACK1", "ACC-NOACK")))
        ack = parse_ack(read_frame_sync(sock, max_bytes=65536, timeout_s=5).decode())
    assert (ack.code, ack.control_id) == ("AR", "NOACK1")


def test_a_message_the_ledger_cannot_take_now_is_answered_ar_to_be_sent_again(
    node: tuple[MllpListener, Ledger], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ledger unavailable: AR (rejected for no fault of its content), nothing kept, so
    the same message sent again once the ledger is back is taken."""
    listener, ledger = node
    real = ledger.hl7_record_message

    def unavailable(**_: object) -> str:
        raise OSError("database unavailable")

    monkeypatch.setattr(ledger, "hl7_record_message", unavailable)
    with connect(listener) as sock:
        sock.sendall(frame(orm("DOWN1", "ACC-DOWN")))
        ack = parse_ack(read_frame_sync(sock, max_bytes=65536, timeout_s=5).decode())
        assert (ack.code, ack.control_id) == ("AR", "DOWN1")
        assert "send it again" in ack.text
        monkeypatch.setattr(ledger, "hl7_record_message", real)
        sock.sendall(frame(orm("DOWN1", "ACC-DOWN")))
        again = parse_ack(read_frame_sync(sock, max_bytes=65536, timeout_s=5).decode())
    assert (again.code, again.control_id) == ("AA", "DOWN1")


def test_a_message_past_a_limit_is_answered_ar_with_the_limit(
    node: tuple[MllpListener, Ledger],
) -> None:
    listener, ledger = node
    with connect(listener) as sock:
        sock.sendall(frame(orm("TILDE1", "ACC-TILDE", name="~" * 3000)))
        raw = read_frame_sync(sock, max_bytes=65536, timeout_s=5)
    segs = raw.decode().split("\r")
    assert segs[1] == "MSA|AR|TILDE1|PID-5 has more than 100 repetitions"
    assert segs[2] == (
        "ERR|||207^Application internal error^HL70357|E||||PID-5 has more than 100 repetitions"
    )
    assert ledger.hl7_order("ACC-TILDE") is None


def _declaring(charset: str, cid: str, accession: str, name: bytes) -> bytes:
    text = orm(cid, accession).decode().replace(f"|{cid}|P|2.5", f"|{cid}|P|2.5||||||{charset}")
    return text.replace("Doe^John", "@NAME@").encode().replace(b"@NAME@", name)


def test_messages_are_decoded_in_the_character_set_msh18_declares(
    node: tuple[MllpListener, Ledger],
) -> None:
    listener, ledger = node
    # Latin-1 bytes that happen to be valid UTF-8 are read as Latin-1
    assert exchange(listener, _declaring("8859/1", "CS1", "ACC-CS1", b"M\xc3\xbcller"))[0] == "AA"
    order = ledger.hl7_order("ACC-CS1")
    assert order is not None and order["patient_name"] == "MÃ¼ller"
    # bytes that are not UTF-8 in a message declaring UTF-8 are refused
    code, cid, text = exchange(
        listener, _declaring("UNICODE UTF-8", "CS2", "ACC-CS2", b"M\xfcller")
    )
    assert (code, cid) == ("AR", "CS2") and "UNICODE UTF-8 (MSH-18)" in text
    assert ledger.hl7_order("ACC-CS2") is None
    code, cid, text = exchange(listener, _declaring("EBCDIC", "CS3", "ACC-CS3", b"Doe"))
    assert (code, cid, text) == ("AR", "CS3", "unsupported character set in MSH-18: EBCDIC")


_CELERY: list[Celery] = []


def _celery(settings: Settings) -> Celery:
    """Configure the Celery app once per process for this broker (kombu keeps one producer
    pool per broker URL, which a second configure() for the same URL would close)."""
    if not _CELERY:
        _CELERY.append(configure(settings))
    return _CELERY[0]


def _receive(ledger: Ledger, count: int) -> int:
    rec = None
    for n in range(count):
        rec = ledger.record_instance(
            InstanceRecord(
                study_uid=STUDY_UID,
                sop_instance_uid=f"{STUDY_UID}.{n + 1}",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.7",
                series_uid=f"{STUDY_UID}.0",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                modality="OT",
                body_part="",
                path=f"{STUDY_UID}/{n}.dcm",
                size=1,
                calling_ae="MOD",
            ),
            first_in_association=n == 0,
        )
    assert rec is not None
    return rec.study_id


def test_expected_stat_study_completes_early_on_high_queue(
    node: tuple[MllpListener, Ledger], hl7_settings: Settings
) -> None:
    listener, ledger = node
    client = redis.Redis.from_url(f"{REDIS_URL}/15")
    client.delete(ANALYSIS_QUEUE, HIGH_PRIORITY_QUEUE)
    extra = f"ZDS|{STUDY_UID}^ACWI^Application^DICOM|2"
    assert exchange(listener, orm("STAT1", "ACC-STAT", extra=extra))[0] == "AA"
    study_id = _receive(ledger, 1)
    ledger.association_released([study_id])
    assert ledger.expected_studies_due() == []  # one of the two announced images
    _receive(ledger, 2)
    assert ledger.expected_studies_due() == []  # the association is still open
    ledger.association_released([study_id])
    assert ledger.expected_studies_due() == [(study_id, 1)]
    completion = CompletionService(hl7_settings, ledger, _celery(hl7_settings))
    job_ids = completion.tick()  # the quiet period (an hour) has not passed
    assert len(job_ids) == 1
    assert ledger.job_priorities(job_ids) == {job_ids[0]: STAT_PRIORITY}
    assert client.llen(HIGH_PRIORITY_QUEUE) == 1
    assert client.llen(ANALYSIS_QUEUE) == 0
    client.delete(ANALYSIS_QUEUE, HIGH_PRIORITY_QUEUE)


def test_routine_order_uses_normal_queue(
    node: tuple[MllpListener, Ledger], hl7_settings: Settings
) -> None:
    listener, ledger = node
    client = redis.Redis.from_url(f"{REDIS_URL}/15")
    client.delete(ANALYSIS_QUEUE, HIGH_PRIORITY_QUEUE)
    payload = orm("R1", "ACC-R", extra=f"ZDS|{STUDY_UID}").replace(b"^^^^^S", b"^^^^^R")
    assert exchange(listener, payload)[0] == "AA"
    study_id = _receive(ledger, 1)
    ledger.association_released([study_id])
    completion = CompletionService(hl7_settings, ledger, _celery(hl7_settings))
    job_ids = completion.tick()
    assert len(job_ids) == 1 and ledger.job_priorities(job_ids)[job_ids[0]] < STAT_PRIORITY
    assert client.llen(ANALYSIS_QUEUE) == 1 and client.llen(HIGH_PRIORITY_QUEUE) == 0
    client.delete(ANALYSIS_QUEUE, HIGH_PRIORITY_QUEUE)


def test_msh15_and_msh16_ne_get_no_reply_and_the_connection_goes_on(
    node: tuple[MllpListener, Ledger],
) -> None:
    """Enhanced mode (HL7 v2.5 2.9): MSH-15 and MSH-16 NE ask for no acknowledgement: none
    is sent, the order is taken, and the next message on the connection gets its own; MSH-15
    AL gets the accept acknowledgement CA."""
    listener, ledger = node
    never = orm("EN1", "ACC-EN1").replace(b"|P|2.5", b"|P|2.5|||NE|NE", 1)
    accept = orm("EN2", "ACC-EN2").replace(b"|P|2.5", b"|P|2.5|||AL|NE", 1)
    with connect(listener) as sock:
        sock.sendall(frame(never))
        sock.sendall(frame(accept))
        first = parse_ack(read_frame_sync(sock, max_bytes=65536, timeout_s=5).decode())
        sock.sendall(frame(orm("EN3", "ACC-EN3")))
        second = parse_ack(read_frame_sync(sock, max_bytes=65536, timeout_s=5).decode())
    assert (first.code, first.control_id) == ("CA", "EN2")
    assert (second.code, second.control_id) == ("AA", "EN3")
    assert all(ledger.hl7_order(f"ACC-EN{n}") is not None for n in (1, 2, 3))


def batch_of(*messages: bytes, newline: bytes = b"\r", file: bool = True) -> bytes:
    head = [b"BHS|^~\\&|RIS|HOSP|ACWI|ACWI|20240101120000||||B-77"]
    tail = [f"BTS|{len(messages)}".encode()]
    if file:
        head.insert(0, b"FHS|^~\\&|RIS|HOSP|ACWI|ACWI|20240101120000||||F-5")
        tail.append(b"FTS|1")
    return newline.join([*head, *(m.replace(b"\r", newline) for m in messages), *tail])


@pytest.mark.parametrize("file", [True, False], ids=["fhs-bhs", "bhs"])
def test_a_batch_of_orders_gets_a_batch_of_acknowledgements(
    node: tuple[MllpListener, Ledger], file: bool
) -> None:
    """HL7 v2.5 batch protocol: a batch (FHS, BHS ... BTS, FTS) in one frame: each message is taken
    as if it came alone, and the answer is a batch of their ACKs whose FHS-12 and BHS-12
    name the file and batch answered, BTS-1 the number of ACKs; the connection goes on."""
    listener, ledger = node
    bad = orm("B3", "")  # no accession number: AE
    payload = batch_of(orm("B1", "ACC-B1"), orm("B2", "ACC-B2"), bad, newline=b"\n", file=file)
    with connect(listener) as sock:
        sock.sendall(frame(payload))
        reply = read_frame_sync(sock, max_bytes=65536, timeout_s=5).decode().split("\r")
        sock.sendall(frame(orm("B4", "ACC-B4")))
        after = parse_ack(read_frame_sync(sock, max_bytes=65536, timeout_s=5).decode())
    names = [seg[:3] for seg in reply]
    expected = ["BHS", "MSH", "MSA", "MSH", "MSA", "MSH", "MSA", "ERR", "BTS"]
    assert names == (["FHS", *expected, "FTS"] if file else expected)
    headers = {seg[:3]: seg.split("|") for seg in reply if seg[:3] in {"FHS", "BHS"}}
    assert headers["BHS"][11] == "B-77"
    if file:
        assert headers["FHS"][11] == "F-5"
        assert reply[-1] == "FTS|1"
    msas = [seg.split("|")[1:3] for seg in reply if seg.startswith("MSA|")]
    assert msas == [["AA", "B1"], ["AA", "B2"], ["AE", "B3"]]
    assert "BTS|3" in reply
    assert (after.code, after.control_id) == ("AA", "B4")
    assert ledger.hl7_order("ACC-B1") is not None and ledger.hl7_order("ACC-B2") is not None
    # the batch again: each message's stored answer, nothing taken twice
    assert exchange(listener, orm("B1", "ACC-B1"))[:2] == ("AA", "B1")
