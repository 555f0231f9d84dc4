"""HL7 v2 messages: order extraction, acknowledgements, ORU^R01 results, escaping."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from acwi_node.audit import audit_file, close_audit, configure_audit
from acwi_node.config import ConfigError, load_settings
from acwi_node.hl7 import messages
from acwi_node.hl7.er7 import normalise
from acwi_node.hl7.messages import (
    ApplicationError,
    Lesion,
    LimitExceeded,
    Limits,
    OruStudy,
    Rejected,
    Verdict,
    build_ack,
    build_oru,
    decode_message,
    escape,
    extract_order,
    extract_orders,
    identifying_values,
    msh_info,
    oru_observations,
    parse,
    parse_ack,
    peek_msh,
    unescape,
)
from acwi_node.hl7.mllp import frame
from acwi_node.hl7.orders import OrderIntake, acknowledgement
from acwi_node.ledger import Ledger
from acwi_node.ledger.models import Hl7Outbound
from tests.support.study_flow import analyse, receive

MSH = "MSH|^~\\&|RIS|HOSP|ACWI|ACWI|20240101120000||{type}|{cid}|P|2.5"


def orm(
    *,
    cid: str = "MSG1",
    accession: str = "ACC1",
    name: str = "Doe^John",
    orc_priority: str = "",
    obr_priority: str = "",
    zds: str = "",
) -> str:
    obr = ["OBR", "1", "PL1", "FI1", "CHEST^Chest X-ray^L"] + [""] * 13 + [accession]
    obr += [""] * (27 - len(obr) + 1)
    obr[27] = f"^^^^^{obr_priority}" if obr_priority else ""
    segs = [
        MSH.format(type="ORM^O01", cid=cid),
        f"PID|1||PAT1^^^HOSP^MR||{name}||19700101|M",
        f"ORC|NW|PL1|FI1||SC||{'^^^^^' + orc_priority if orc_priority else ''}",
        "|".join(obr).rstrip("|"),
    ]
    if zds:
        segs.append(f"ZDS|{zds}")
    return "\r".join(segs)


def test_escape_round_trip() -> None:
    raw = "a|b^c&d\\e~f\rg"
    escaped = escape(raw)
    assert not any(c in escaped for c in "|^&~\r")
    assert unescape(escaped) == raw


def test_orm_order_fields() -> None:
    order = extract_order(parse(orm(zds="1.2.826.0.1.3680043.2.1125.1^ACWI^Application^DICOM|12")))
    assert order.accession_number == "ACC1"
    assert order.control == "NW"
    assert order.patient_id == "PAT1^^^HOSP^MR"
    assert order.patient_name == "Doe^John"
    assert order.birth_date == "19700101"
    assert order.procedure_code == "CHEST"
    assert order.procedure_text == "Chest X-ray"
    assert order.placer_order_number == "PL1"
    assert order.study_uid == "1.2.826.0.1.3680043.2.1125.1"
    assert order.expected_images == 12
    assert order.priority == "" and not order.stat  # none given: routine, unless one was


@pytest.mark.parametrize(
    ("orc", "obr", "expected"),
    [
        ("S", "", "S"),
        ("", "S", "S"),
        ("R", "S", "R"),
        ("", "", ""),
        # spelled out, as some RISs send it: the code, not its first two letters ("ST")
        ("STAT", "", "S"),
        ("", "Stat", "S"),
        ("ASAP", "", "A"),
        ("Routine", "S", "R"),
    ],
)
def test_priority_from_orc_then_obr(orc: str, obr: str, expected: str) -> None:
    order = extract_order(parse(orm(orc_priority=orc, obr_priority=obr)))
    assert order.priority == expected


def test_omi_with_ipc_and_tq1() -> None:
    text = "\r".join(
        [
            MSH.format(type="OMI^O23^OMI_O23", cid="M2"),
            "PID|1||P2||Roe^Jane",
            "ORC|NW|PL2",
            "TQ1|1||||||||S",
            "OBR|1|PL2||CT^CT head",
            "IPC|ACC2|RP1|1.2.3.4|SPS1",
        ]
    )
    order = extract_order(parse(text))
    assert (order.accession_number, order.study_uid, order.priority) == ("ACC2", "1.2.3.4", "S")
    assert order.stat


def test_missing_accession_is_application_error() -> None:
    with pytest.raises(ApplicationError) as info:
        extract_order(parse(orm(accession="")))
    assert info.value.code == "AE"


def test_bad_study_uid_is_application_error() -> None:
    with pytest.raises(ApplicationError):
        extract_order(parse(orm(zds="../../etc")))


def test_unsupported_type_is_rejected() -> None:
    text = MSH.format(type="ADT^A01", cid="M3") + "\rPID|1||X"
    with pytest.raises(Rejected) as info:
        extract_order(parse(text))
    assert info.value.code == "AR"


@pytest.mark.parametrize("text", ["", "garbage", "PID|1||x", "MSH|^~\\&|A\rQQQ|1"])
def test_malformed_is_rejected(text: str) -> None:
    with pytest.raises(Rejected):
        extract_order(parse(text))


def test_script_in_name_is_kept_as_data() -> None:
    order = extract_order(parse(orm(name="<script>alert(1)</script>^X")))
    assert order.patient_name == "<script>alert(1)</script>^X"


def test_ack_echoes_control_id_only() -> None:
    msg = parse(orm(cid="C-42", name="Secret^Name"))
    ack = build_ack(msh_info(msg), "AA", "", control_id="A1", application="ACWI", facility="F")
    assert "Secret" not in ack
    info = parse_ack(ack)
    assert (info.code, info.control_id) == ("AA", "C-42")
    assert ack.startswith("MSH|^~\\&|ACWI|F|RIS|HOSP|")
    assert "|ACK^O01^ACK|A1|P|2.5" in ack


def test_ack_without_msh_and_with_error() -> None:
    ack = build_ack(None, "AR", "bad | input", control_id="A2", application="ACWI", facility="")
    info = parse_ack(ack)
    assert (info.code, info.control_id, info.text) == ("AR", "", "bad | input")
    with pytest.raises(ValueError):
        build_ack(None, "XX", "", control_id="A3", application="ACWI", facility="")


def test_peek_msh_reads_broken_messages() -> None:
    info = peek_msh("MSH|^~\\&|RIS|H|A|N|2024||ORM^O01|X\\F\\1|P|2.5\rQQQ|broken")
    assert info is not None
    # the control id as the sender wrote it (MSA-2 repeats it), the other values unescaped
    assert (info.type_code, info.control_id, info.sender) == ("ORM^O01", "X\\F\\1", "RIS|H")
    assert peek_msh("PID|1") is None


SUMMARY = {
    "model": {"name": "dianet", "version": "1.2.0"},
    "labels": ["normal", "abnormal"],
    "probabilities": {"normal": 0.25, "abnormal": 0.75},
    "predicted_label": "abnormal",
    "uncertainty": {"score": 0.125},
    "ood_score": 0.5,
    "needs_review": True,
}


def _study(**kw: str) -> OruStudy:
    base = {
        "study_uid": "1.2.3",
        "accession_number": "ACC|9",
        "patient_id": "PAT1^^^HOSP^MR",
        "patient_name": "<script>^Jo",
    }
    base.update(kw)
    return OruStudy(summary=SUMMARY, **base)  # type: ignore[arg-type]


def test_oru_carries_result_observations() -> None:
    text = build_oru(_study(), control_id="ORU1", receiving=("RIS", "HOSP"))
    msg = parse(text)
    info = msh_info(msg)
    assert (info.type_code, info.control_id) == ("ORU^R01", "ORU1")
    segs = text.split("\r")
    assert segs[1] == "PID|1||PAT1^^^HOSP^MR||<script>^Jo"
    obr = segs[3].split("|")
    assert obr[18] == "ACC\\F\\9" and obr[25] == "P"
    obs = oru_observations(text)
    assert obs["FINDING"][0][1].startswith("abnormal^")
    assert obs["PROB"] == [("normal", "0.2500"), ("abnormal", "0.7500")]
    assert obs["UNCERTAINTY"] == [("", "0.1250")]
    assert obs["NEEDS_REVIEW"][0][1].startswith("Y^")
    assert obs["ALGORITHM"] == [("", "dianet")]
    assert obs["ALGORITHM_VERSION"] == [("", "1.2.0")]
    assert obs["STUDY_UID"] == [("", "1.2.3")]
    assert "VERDICT" not in obs


def test_oru_with_verdict_is_final() -> None:
    verdict = Verdict(agrees=False, label="normal", reviewer="R1^Smith^Ann", comment="a|b")
    text = build_oru(_study(), verdict, control_id="ORU2")
    obs = oru_observations(text)
    assert obs["VERDICT"][0][1].startswith("DISAGREE^")
    assert obs["FINAL_FINDING"][0][1].startswith("normal^")
    assert obs["COMMENT"] == [("", "a|b")]
    obr = text.split("\r")[3].split("|")
    assert obr[25] == "F"
    assert all(seg.split("|")[11] == "F" for seg in text.split("\r") if seg.startswith("OBX"))


def test_oru_with_verdict_carries_the_lesion_boxes_marked() -> None:
    """Each box the radiologist marked is a group of observations under its own sub-id: the
    image's SOP Instance UID, its frame (multi-frame images only), and the box as a numeric
    array x0^y0^x1^y1 in the image's pixels; none without boxes."""
    verdict = Verdict(
        agrees=True,
        label="abnormal",
        reviewer="R1^Smith^Ann",
        lesions=(
            Lesion("1.2.3.4", None, (32, 64, 63, 95)),
            Lesion("1.2.3.5", 7, (0, 1, 2, 3)),
        ),
    )
    text = build_oru(_study(), verdict, control_id="ORU5")
    obs = oru_observations(text)
    assert obs["LESION_IMAGE"] == [("1", "1.2.3.4"), ("2", "1.2.3.5")]
    assert obs["LESION_FRAME"] == [("2", "7")]
    assert obs["LESION_BOX"] == [("1", "32^64^63^95"), ("2", "0^1^2^3")]
    boxes = [seg.split("|") for seg in text.split("\r") if "|LESION_BOX^" in seg]
    assert [(f[2], f[4], f[5], f[11]) for f in boxes] == [
        ("NA", "1", "32^64^63^95", "F"),
        ("NA", "2", "0^1^2^3", "F"),
    ]
    parse(text)  # still a well-formed message
    plain = oru_observations(build_oru(_study(), Verdict(agrees=True, label="x"), control_id="O"))
    assert not {"LESION_IMAGE", "LESION_FRAME", "LESION_BOX"} & set(plain)


@pytest.fixture
def node_in_new_york(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The node's own local time is New York's: the hospital's clock (``monitoring.timezone``)
    is what the messages must use all the same."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_oru_times_are_one_clock_with_their_offset(node_in_new_york: None) -> None:
    """The ledger's times (naive UTC) reach the RIS as the moments they were: on the hospital's
    clock (Berlin: a clock change on 2026-10-25, 03:00 CEST -> 02:00) with the offset, like
    MSH-7, so that the two 02:30 of the night the clocks go back differ."""
    completed = dt.datetime(2026, 10, 25, 0, 30)  # 02:30 CEST, the first 02:30
    reviewed = dt.datetime(2026, 10, 25, 1, 30)  # 02:30 CET, the second
    verdict = Verdict(agrees=True, label="abnormal", reviewed_at=reviewed)
    sent = dt.datetime(2026, 12, 7, 5, 0, tzinfo=dt.timezone.utc)
    study = dataclasses.replace(_study(), observed_at=completed)
    text = build_oru(study, verdict, control_id="T1", when=sent, timezone="Europe/Berlin")
    segs = [seg.split("|") for seg in text.split("\r")]
    msh, obr = segs[0], next(f for f in segs if f[0] == "OBR")
    (obx,) = [f for f in segs if f[0] == "OBX" and f[3].startswith("VERDICT^")]
    assert msh[6] == obr[22] == "20261207060000+0100"
    assert obr[7] == "20261025023000+0200"
    assert obx[14] == "20261025023000+0100"
    now = messages.timestamp(zone="Asia/Kolkata")  # now, with Kolkata's offset
    assert len(now) == 19 and now.endswith("+0530")


@pytest.mark.parametrize(
    ("zone", "moment", "expected"),
    [
        ("America/New_York", dt.datetime(2026, 11, 1, 5, 30), "20261101013000-0400"),
        ("America/New_York", dt.datetime(2026, 11, 1, 6, 30), "20261101013000-0500"),
        ("Europe/Berlin", dt.datetime(2026, 3, 29, 0, 59), "20260329015900+0100"),
        ("Europe/Berlin", dt.datetime(2026, 3, 29, 1, 0), "20260329030000+0200"),
        ("Australia/Lord_Howe", dt.datetime(2026, 4, 4, 14, 45), "20260405014500+1100"),
        ("Australia/Lord_Howe", dt.datetime(2026, 4, 4, 15, 15), "20260405014500+1030"),
        ("Asia/Kolkata", dt.datetime(2026, 10, 25, 1, 30), "20261025070000+0530"),
        ("UTC", dt.datetime(2026, 10, 25, 1, 30), "20261025013000+0000"),
    ],
)
def test_timestamps_on_the_hospitals_clock_not_the_nodes(
    node_in_new_york: None, zone: str, moment: dt.datetime, expected: str
) -> None:
    assert messages.timestamp(moment, zone) == expected


def test_acks_are_on_the_hospitals_clock(node_in_new_york: None) -> None:
    ack = build_ack(
        None, "AA", "", control_id="A1", application="ACWI", facility="H", timezone="Asia/Kolkata"
    )
    stamp = ack.split("\r")[0].split("|")[6]
    assert len(stamp) == 19 and stamp.endswith("+0530")


def test_oru_after_a_final_result_is_a_correction() -> None:
    verdict = Verdict(agrees=True, label="abnormal", reviewer="R1^Smith^Ann")
    for text in (
        build_oru(_study(), control_id="ORU3", correction=True),
        build_oru(_study(), verdict, control_id="ORU4", correction=True),
    ):
        segs = text.split("\r")
        assert segs[3].split("|")[25] == "C"
        assert {seg.split("|")[11] for seg in segs if seg.startswith("OBX")} == {"C"}


def test_a_verdicts_outbound_kind_names_its_case_and_any_amendment() -> None:
    from acwi_node.hl7.client import parse_verdict_kind, verdict_kind

    assert verdict_kind(7) == "verdict-7"
    assert verdict_kind(7, 31) == "verdict-7-31"
    assert parse_verdict_kind("verdict-7") == (7, None)
    assert parse_verdict_kind(verdict_kind(7, 31)) == (7, 31)
    for bad in ("verdict", "verdict-", "verdict-x", "verdict-7-", "verdict-7-8-9", "result-7"):
        with pytest.raises(ValueError, match="not a verdict"):
            parse_verdict_kind(bad)


def test_kept_lesion_boxes_become_the_orus_lesions() -> None:
    """As the ledger keeps them: by image name (a frame's ``"<uid> frame <n>"``), each image's a
    list of boxes, or one box (kept when an image took one)."""
    from acwi_node.hl7.client import lesions_of

    kept = {
        "1.2.3": [[1, 2, 3, 4], [5, 6, 7, 8]],
        "1.2.4 frame 2": [[0, 0, 9, 9]],
        "1.2.5": [10, 11, 12, 13],
    }
    assert lesions_of(kept) == (
        Lesion("1.2.3", None, (1, 2, 3, 4)),
        Lesion("1.2.3", None, (5, 6, 7, 8)),
        Lesion("1.2.4", 2, (0, 0, 9, 9)),
        Lesion("1.2.5", None, (10, 11, 12, 13)),
    )
    assert lesions_of({}) == ()


def _flags(text: str) -> dict[str, str]:
    """OBX-3 code -> OBX-8 (abnormal flags) of each OBX that has one."""
    out = {}
    for seg in text.split("\r"):
        fields = seg.split("|")
        if fields[0] == "OBX" and len(fields) > 8 and fields[8]:
            out[fields[3].split("^")[0]] = fields[8]
    return out


def test_a_finding_is_flagged_abnormal_for_the_ris() -> None:
    """OBX-8 of the AI finding and of the radiologist's: A for a finding, N for normal (by
    the model's finding labels; before summaries listed them, every label but "normal")."""
    assert _flags(build_oru(_study(), control_id="F1")) == {"FINDING": "A"}
    corrected = Verdict(agrees=False, label="normal")
    assert _flags(build_oru(_study(), corrected, control_id="F2")) == {
        "FINDING": "A",
        "FINAL_FINDING": "N",
    }
    listed = {**SUMMARY, "labels": ["clear", "nodule"], "finding_labels": ["nodule"]}
    listed["predicted_label"] = "clear"
    study = OruStudy(summary=listed, study_uid="1.2.3", accession_number="", patient_id="",
                     patient_name="")  # fmt: skip
    assert _flags(build_oru(study, control_id="F3")) == {"FINDING": "N"}


# ----------------------------------------------------------- framing bytes, limits, encodings
def test_an_ack_never_carries_the_mllp_framing_bytes() -> None:
    """A control id or sender that hex-escapes a framing byte (and a message too broken to
    parse, answered from its MSH alone) gets an ACK that can be framed, repeating MSH-10 as
    it was sent; control characters in any value are escaped as HL7 hex escapes."""
    text = "MSH|^~\\&|R\\X0B\\IS|HOSP|ACWI|ACWI|2024||ORM^O01|M\\X0B\\X\\X1C0D\\|P|2.5\rZZZ1|a\rPI"
    with pytest.raises(Rejected):
        parse(text)
    info = peek_msh(text)
    assert info is not None
    ack = build_ack(info, "AR", "bad\x0b\x1c\r", control_id="A1", application="A", facility="F")
    framed = frame(ack.encode())
    assert b"\x0b" not in framed[1:] and b"\x1c" not in framed[:-2]
    segs = ack.split("\r")
    assert segs[0].split("|")[4] == "R\\X0B\\IS"
    assert segs[1] == "MSA|AR|M\\X0B\\X\\X1C0D\\|bad\\X0B\\\\X1C\\\\X0D\\"
    assert escape("a\x00b\x7f") == "a\\X00\\b\\X7F\\"


def test_msa2_repeats_the_control_id_as_sent() -> None:
    ack = build_ack(
        msh_info(parse(orm(cid="C\\X0B\\1\\F\\"))),
        "AA",
        "",
        control_id="A1",
        application="ACWI",
        facility="F",
    )
    assert ack.split("\r")[1] == "MSA|AA|C\\X0B\\1\\F\\"


def _big_order() -> str:
    """An order far larger than real ones: every segment an OMI may carry, comments, many
    identifiers, and long clinical text."""
    pid = "PID|1||" + "~".join(f"ID{n}^^^AUTH{n}&1.2.3&ISO^MR" for n in range(20))
    pid += "||Doe^John^Q^Jr^Dr^^L~Doe^Johnny^^^^^A||19700101|M|||1 Main St^^Town^^12345^US"
    segs = [
        MSH.format(type="OMI^O23^OMI_O23", cid="BIG1"),
        pid,
        "PV1|1|O|RAD^1^1^HOSP||||1234^Smith^Ann^^^Dr|||||||||||V1",
        *[f"NTE|{n}||{'clinical note ' * 40}" for n in range(1, 31)],
        "ORC|NW|PL1|FI1||SC||^^^^^R|||||1234^Smith^Ann",
        "TQ1|1||||||||R",
        "OBR|1|PL1|FI1|CHEST^Chest X-ray^L" + "|" * 14 + "ACC1",
        *[f"OBX|{n}|ST|Q{n}^Question^L||answer {n}||||||F" for n in range(1, 41)],
        *[f"IPC|ACC1|REQ1|1.2.3.{n}|SPS{n}|CR" for n in range(1, 11)],
    ]
    return "\r".join(segs)


@pytest.mark.parametrize(
    ("text", "limit"),
    [
        (orm(name="~" * 250_000), "PID-5 has more than 100 repetitions"),
        (orm(name="~".join(["X^^^H^MR"] * 60_000)), "PID-5 has more than 100 repetitions"),
        (orm(name="^" * 100_000), "PID-5 has more than 64 components"),
        (orm(name="&" * 100_000), "PID-5 has more than 32 subcomponents"),
        (orm() + "|x" * 200_000, "OBR has more than 100 fields"),
        (orm() + "\rNTE|1" * 60_000, "more than 500 segments"),
        (orm() + ("\rNTE|1|" + "|".join(["a^b"] * 40)) * 80, "more than 5000 separators"),
    ],
    ids=[
        "empty-repetitions",
        "repetitions",
        "components",
        "subcomponents",
        "fields",
        "segments",
        "separators",
    ],
)
def test_a_message_past_a_limit_is_refused_before_it_is_parsed(
    monkeypatch: pytest.MonkeyPatch, text: str, limit: str
) -> None:
    """Counting delimiters refuses a hostile message (hundreds of thousands of repetitions
    or segments) without handing it to hl7apy, whose time and memory grow with every
    element, and in little memory; a real order, however large, is well within the limits."""
    parsed: list[str] = []
    real = messages.parse_message

    def parse_message(text: str, **kw: Any) -> Any:
        parsed.append(text)
        return real(text, **kw)

    monkeypatch.setattr(messages, "parse_message", parse_message)
    tracemalloc.start()
    try:
        with pytest.raises(LimitExceeded) as info:
            parse(text)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (info.value.code, info.value.text) == ("AR", limit)
    assert parsed == []
    assert peak < 8 * len(text) + (1 << 20)  # a few copies of the text, not a parse tree
    order = extract_order(parse(_big_order()))
    assert order.accession_number == "ACC1" and len(parsed) == 1


@pytest.mark.parametrize(
    ("hl7", "text", "code", "reason"),
    [
        ({}, orm().replace("PAT1^^^HOSP^MR", "~".join(["X^^^H^MR"] * 150), 1), "AR", "100"),
        (
            {"max_repetitions": 200},
            orm().replace("PAT1^^^HOSP^MR", "~".join(["X"] * 150), 1),
            "AA",
            "",
        ),
        ({"max_segments": 20}, orm() + "\rNTE|1" * 30, "AR", "more than 20 segments"),
        (
            {"max_separators": 1000},
            orm() + ("\rNTE|1|" + "|".join(["a^b"] * 40)) * 15,
            "AR",
            "1000",
        ),
        ({"max_fields": 50}, orm() + "|x" * 60, "AR", "OBR has more than 50 fields"),
    ],
    ids=["default", "more-repetitions", "fewer-segments", "fewer-separators", "fewer-fields"],
)
def test_the_message_limits_are_settings(
    tmp_path: Path, hl7: dict[str, int], text: str, code: str, reason: str
) -> None:
    """``[hl7]`` ``max_segments``, ``max_fields``, ``max_repetitions``, ``max_components``,
    ``max_subcomponents`` and ``max_separators`` set the limits an order is read within."""
    settings = load_settings(None, node={"data_dir": tmp_path}, hl7=hl7)
    ledger = Ledger(settings.database_url)
    try:
        msa = _msa(OrderIntake(settings, ledger).handle(text.encode()))
    finally:
        ledger.dispose()
    assert msa[1] == code
    assert reason in (msa[3] if len(msa) > 3 else "")


@pytest.mark.parametrize(
    "hl7",
    [
        {"max_segments": 10},
        {"max_segments": 20_000},
        {"max_fields": 40},
        {"max_repetitions": 0},
        {"max_components": 29},
        {"max_subcomponents": 5_000},
        {"max_separators": 999},
    ],
)
def test_message_limits_out_of_bounds_stop_the_start(tmp_path: Path, hl7: dict[str, int]) -> None:
    """A limit that would refuse standard messages, or let a hostile one be parsed at
    length, is a configuration error at start-up."""
    with pytest.raises(ConfigError, match=next(iter(hl7))):
        load_settings(None, node={"data_dir": tmp_path}, hl7=hl7)


def test_an_acknowledgement_is_read_within_the_limits() -> None:
    """The RIS's acknowledgement of a result is read within the configured limits too."""
    ack = "MSH|^~\\&|RIS|H|ACWI|ACWI|2024||ACK|A1|P|2.5\rMSA|AA|R1" + "\rNTE|1" * 30
    assert parse_ack(ack).code == "AA"
    with pytest.raises(LimitExceeded, match="more than 20 segments"):
        parse_ack(ack, Limits(segments=20))


def test_sender_delimiters_are_re_encoded_in_the_standard_ones() -> None:
    """A sender declaring its own delimiters (MSH-2 ``$~\\&``): the patient is kept in the
    standard ones, so that a result message built with them carries what the order did."""
    text = "\r".join(
        [
            "MSH|$~\\&|RIS|HOSP|ACWI|ACWI|2024||ORM$O01|ODD1|P|2.5",
            "PID|1||PAT3$$$H$MR~OTHER||Smith$An^na$\\S\\x",
            "ORC|NW|PL3",
            "OBR|1|PL3|FI3|CT$CT scan" + "|" * 14 + "ACCODD",
        ]
    )
    order = extract_order(parse(text))
    assert order.patient_id == "PAT3^^^H^MR~OTHER"
    assert order.patient_name == "Smith^An\\S\\na^\\S\\x"
    assert (order.procedure_code, order.procedure_text) == ("CT", "CT scan")
    oru = build_oru(
        _study(patient_id=order.patient_id, patient_name=order.patient_name), control_id="O1"
    )
    assert oru.split("\r")[1] == "PID|1||PAT3^^^H^MR~OTHER||Smith^An\\S\\na^\\S\\x"


def test_every_patient_identifier_of_the_order_goes_back_to_the_ris() -> None:
    """PID-3 lists several identifiers; the RIS's own medical record number need not come
    first (here an insurance number does). Only the first went back in the ORU^R01, and the
    RIS could not find its patient by it."""
    text = orm().replace("PID|1||PAT1^^^HOSP^MR|", "PID|1||INS-77^^^AOK^SN~PAT1^^^HOSP^MR|")
    order = extract_order(parse(text))
    assert order.patient_id == "INS-77^^^AOK^SN~PAT1^^^HOSP^MR"
    oru = build_oru(_study(patient_id=order.patient_id), control_id="O1")
    assert oru.split("\r")[1].startswith("PID|1||INS-77^^^AOK^SN~PAT1^^^HOSP^MR|")
    assert "PAT1" in identifying_values(oru) and "INS-77" in identifying_values(oru)


def test_patient_identifiers_past_250_characters_are_left_out_whole() -> None:
    many = "~".join(f"ID{n:03d}^^^FACILITY-{n:03d}^MR" for n in range(20))  # 20 x 23 characters
    order = extract_order(parse(orm().replace("PID|1||PAT1^^^HOSP^MR|", f"PID|1||{many}|")))
    kept = order.patient_id.split("~")
    assert len(order.patient_id) <= 250 and len(kept) == 10
    assert kept == many.split("~")[:10]


def test_escape_sequences_and_control_characters_in_the_patient_travel_unchanged() -> None:
    name = "Do\\S\\e\\X0D\\^Jo\\X0A\\hn\x01\x1b[1m\\.br\\\\H\\x\\N\\"
    order = extract_order(parse(orm(name=name)))
    expected = "Do\\S\\e\\X0D\\^Jo\\X0A\\hn\\X01\\\\X1B\\[1m\\.br\\\\H\\x\\N\\"
    assert order.patient_name == expected
    oru = build_oru(_study(patient_name=order.patient_name), control_id="O1")
    assert oru.split("\r")[1] == f"PID|1||PAT1^^^HOSP^MR||{expected}"
    assert "\x01" not in oru and "\x1b" not in oru
    # a comment over several lines arrives as lines, not as literal escape text
    comment = Verdict(agrees=True, label="normal", comment="line 1\nline 2")
    assert oru_observations(build_oru(_study(), comment, control_id="O2"))["COMMENT"] == [
        ("", "line 1\nline 2")
    ]


def _bytes(charset: str, name: bytes) -> bytes:
    msh = MSH.format(type="ORM^O01", cid="CS1") + "||||||" + charset
    return msh.encode() + b"\rPID|1||PAT1^^^H^MR||" + name


def test_message_is_decoded_in_the_declared_character_set() -> None:
    """MSH-18 decides how the bytes are read; without it, UTF-8 when valid, else Latin-1."""
    for charset, name, decoded in [
        ("8859/1", b"M\xc3\xbcller", "MÃ¼ller"),  # valid UTF-8, but declared Latin-1
        ("8859/1", b"M\xfcller", "Müller"),
        ("UNICODE UTF-8", b"M\xc3\xbcller", "Müller"),
        ("ASCII", b"Muller", "Muller"),
        ("", b"M\xc3\xbcller", "Müller"),
        ("", b"M\xfcller", "Müller"),
        ("ISO IR100", b"M\xfcller", "Müller"),  # DICOM's term, as some senders write it
        ("UTF-8", b"M\xc3\xbcller", "Müller"),  # IANA's names, as interface engines write them
        ("utf8", b"M\xc3\xbcller", "Müller"),
        ("ISO-8859-1", b"M\xfcller", "Müller"),
        ("ISO-8859-15", b"\xa4", "€"),
        ("GB 18030-2000", "王^小明".encode("gb18030"), "王^小明"),
    ]:
        assert decode_message(_bytes(charset, name)).endswith(f"||{decoded}"), charset


def test_a_byte_order_mark_before_msh_is_no_part_of_the_message() -> None:
    """Some Windows interface engines write one before a UTF-8 message: it was refused as not
    starting with MSH, with an ACK that could not name its control id."""
    for charset in ("", "UNICODE UTF-8"):
        text = decode_message(b"\xef\xbb\xbf" + _bytes(charset, b"M\xc3\xbcller"))
        assert text.startswith("MSH|") and text.endswith("||Müller")
        assert parse(normalise(text)).first("PID") is not None


@pytest.mark.parametrize(
    ("charset", "name", "reason"),
    [
        ("UNICODE UTF-8", b"M\xfcller", "is not valid in the character set UNICODE UTF-8 (MSH-18)"),
        ("ASCII", b"M\xc3\xbcller", "is not valid in the character set ASCII (MSH-18)"),
        ("KLINGON", b"x", "unsupported character set in MSH-18: KLINGON"),
        ("UTF-8", b"M\xfcller", "is not valid in the character set UTF-8 (MSH-18)"),
        # HL7 2.3's UNICODE names no encoding (UCS-2 or UTF-8): not guessed
        ("UNICODE", b"x", "unsupported character set in MSH-18: UNICODE"),
    ],
)
def test_bytes_invalid_in_the_declared_character_set_are_rejected(
    charset: str, name: bytes, reason: str
) -> None:
    raw = _bytes(charset, name)
    with pytest.raises(Rejected) as info:
        decode_message(raw)
    first = next((i for i, b in enumerate(raw) if b > 127), None)
    where = f"byte {first + 1} " if first is not None else ""
    assert (info.value.code, info.value.text) == ("AR", where + reason)


@pytest.mark.parametrize(
    ("text", "err"),
    [
        (orm(accession=""), "ERR||OBR^1^18|101^Required field missing^HL70357|E"),
        (orm(zds="../../etc"), "ERR||ZDS^1^1|102^Data type error^HL70357|E"),
        (orm(accession="A" * 65), "ERR||OBR^1^18|102^Data type error^HL70357|E"),
        (
            MSH.format(type="ADT^A01", cid="M3") + "\rPID|1||X",
            "ERR||MSH^1^9|200^Unsupported message type^HL70357|E",
        ),
        (orm(cid=""), "ERR||MSH^1^10|101^Required field missing^HL70357|E"),
        (orm().replace("|P|2.5", "|P|2.5||||||KLINGON", 1), "ERR||MSH^1^18|103^Table value"),
        (orm().replace("\rORC|NW|PL1|FI1||SC||", "\rQ!Q|1"), "ERR|||100^Segment sequence error"),
        (orm(name="~" * 200), "ERR|||207^Application internal error^HL70357|E"),
        (orm().replace("|P|2.5", "|P|2.9", 1), "ERR||MSH^1^12|203^Unsupported version id"),
        (orm().replace("|P|2.5", "|P|", 1), "ERR||MSH^1^12|101^Required field missing"),
        (
            orm() + "\rORC|NW|PL2|FI2\rOBR|1|PL2|FI2|ABD^Abdomen^L",
            "ERR||OBR^2^18|101^Required field missing",
        ),
    ],
    ids=[
        "no-accession",
        "bad-uid",
        "long-accession",
        "type",
        "no-msh10",
        "charset",
        "seg",
        "lim",
        "version",
        "no-version",
        "second-order-no-accession",
    ],
)
def test_a_refusal_says_where_and_what_in_err_2_and_err_3(
    tmp_path: Path, text: str, err: str
) -> None:
    """HL7 2.5 requires ERR-3 (Table 0357) in an ERR segment; ERR-2 names the field at fault,
    so that an interface engine can route the error without reading its text."""
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    try:
        intake = OrderIntake(load_settings(None, node={"data_dir": tmp_path}), ledger)
        ack = intake.handle(text.encode()).decode()
    finally:
        ledger.dispose()
    (segment,) = [s for s in ack.split("\r") if s.startswith("ERR|")]
    assert segment.startswith(err), segment


@pytest.mark.parametrize(
    ("charset", "codec", "text"),
    [
        ("GB 18030-2000", "gb18030", "检查号未知"),
        ("8859/1", "latin-1", "Auftragsnummer unbekannt: Müller"),
        ("", "utf-8", "número desconocido"),
        ("KLINGON", "utf-8", "número desconocido"),  # declared wrongly: read as without
    ],
    ids=["gb18030", "latin-1", "none", "unknown"],
)
def test_a_ris_acknowledgement_is_read_in_its_declared_character_set(
    charset: str, codec: str, text: str
) -> None:
    """MSA-3 in the RIS's language, in the character set its MSH-18 declares, is logged and
    stored as the RIS wrote it; its code and control id are read whatever it declares."""
    from acwi_node.hl7.client import ack_text

    msh = f"MSH|^~\\&|RIS|HOSP|ACWI|ACWI|20240101120000||ACK^R01^ACK|R1|P|2.5||||||{charset}"
    reply = f"{msh}\rMSA|AE|ORU-7|{text}".encode(codec)
    info = parse_ack(ack_text(reply))
    assert (info.code, info.control_id, info.text) == ("AE", "ORU-7", text)


def test_a_multi_procedure_order_gives_each_of_its_orders() -> None:
    """Several ORC/OBR groups in one message (a multi-procedure order) are several orders,
    each with its own accession number, numbers, procedure, priority and Study Instance UID."""
    text = "\r".join(
        [
            MSH.format(type="OMI^O23^OMI_O23", cid="M9"),
            "PID|1||P9^^^HOSP^MR||Roe^Jane",
            "PV1|1|O",
            "ORC|NW|PLA|FIA",
            "TQ1|1||||||||R",
            "OBR|1|PLA|FIA|CT^CT head",
            "IPC|ACC-A|RP1|1.2.3.1|SPS1|CT",
            "ORC|NW|PLB|FIB",
            "TQ1|1||||||||S",
            "OBR|2|PLB|FIB|CR^Chest",
            "IPC|ACC-B|RP2|1.2.3.2|SPS2|CR",
            "ORC|CA|PLC|FIC",
            "OBR|3|PLC|FIC|US^Abdomen" + "|" * 14 + "ACC-C",
            "OBR|4|PLC|FIC|US^Pelvis" + "|" * 14 + "ACC-D",
        ]
    )
    orders = extract_orders(parse(text))
    assert [
        (o.accession_number, o.placer_order_number, o.procedure_code, o.priority, o.study_uid)
        for o in orders
    ] == [
        ("ACC-A", "PLA", "CT", "R", "1.2.3.1"),
        ("ACC-B", "PLB", "CR", "S", "1.2.3.2"),
        ("ACC-C", "PLC", "US", "", None),
        ("ACC-D", "PLC", "US", "", None),  # an OBR without its own ORC: that ORC's order
    ]
    assert [o.cancelled for o in orders] == [False, False, True, True]
    assert {o.patient_id for o in orders} == {"P9^^^HOSP^MR"}


@pytest.mark.parametrize(
    ("control", "status", "cancelled"),
    [
        ("NW", "SC", False),
        ("XO", "", False),
        ("SC", "IP", False),
        ("SC", "CM", False),
        ("SC", "CA", True),
        ("SC", "DC", True),
        ("CA", "", True),
        ("DC", "", True),
        ("OC", "CA", True),
        ("CR", "CA", True),
        ("OD", "", True),
        ("DR", "DC", True),
    ],
)
def test_an_order_is_cancelled_by_its_control_code_or_the_status_it_changes_to(
    control: str, status: str, cancelled: bool
) -> None:
    """ORC-1 (HL7 table 0119): a cancel or discontinue request, or the RIS's own cancellation
    (``OC``, ``OD``) or its answer to one (``CR``, ``DR``); or a status change (``SC``) to ORC-5
    ``CA`` or ``DC`` (HL7 table 0038)."""
    text = orm().replace("ORC|NW|PL1|FI1||SC||", f"ORC|{control}|PL1|FI1||{status}||", 1)
    assert extract_order(parse(text)).cancelled is cancelled


def test_a_status_change_keeps_the_orders_priority_and_can_cancel_it(tmp_path: Path) -> None:
    """A status change (``SC``, exam in progress) gives no priority: the STAT order stays STAT;
    one to ``CA`` cancels the order."""
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    try:
        intake = OrderIntake(load_settings(None, node={"data_dir": tmp_path}), ledger)
        for cid, control in (("S1", "NW"), ("S2", "SC")):
            text = orm(cid=cid, orc_priority="S" if control == "NW" else "")
            text = text.replace("ORC|NW|PL1|FI1||SC||", f"ORC|{control}|PL1|FI1||IP||", 1)
            assert "MSA|AA|" in intake.handle(text.encode()).decode()
        order = ledger.hl7_order("ACC1")
        assert order is not None
        assert (order["priority"], order["status"]) == ("S", "scheduled")
        text = orm(cid="S3").replace("ORC|NW|PL1|FI1||SC||", "ORC|SC|PL1|FI1||CA||", 1)
        assert "MSA|AA|" in intake.handle(text.encode()).decode()
        order = ledger.hl7_order("ACC1")
        assert order is not None
        assert (order["priority"], order["status"]) == ("S", "cancelled")
        assert extract_order(parse(orm(cid="S4"))).priority == ""
        intake.handle(orm(cid="S4", accession="ACC2").encode())
        new = ledger.hl7_order("ACC2")
        assert new is not None and new["priority"] == "R"  # none given: routine
    finally:
        ledger.dispose()


@pytest.mark.parametrize("version", ["2.9", ""])
def test_a_ris_acknowledgement_of_any_version_is_read(version: str) -> None:
    """An ACK needs only its MSA: one whose MSH-12 names a version hl7apy does not know, or
    none, is read (not taken for no answer, so that its ORU would be sent again and fail)."""
    reply = f"MSH|^~\\&|RIS|HOSP|ACWI|ACWI|20240101||ACK^R01^ACK|R1|P|{version}\rMSA|AA|ORU-8"
    info = parse_ack(reply)
    assert (info.code, info.control_id) == ("AA", "ORU-8")


@pytest.mark.parametrize(
    ("version", "extra", "priority"),
    [
        ("2.3", ["TQ1|1||||||||S", "IPC|ACC1|RP1|1.2.3.9|SPS1"], "S"),
        ("2.4", ["SFT|Vendor|4.2|RIS"], ""),
        ("2.5.1", ["PRT|1|AD||OP^Ordering Provider^HL70443|1234^Smith^Ann"], ""),
        ("2.5", ["XYZ|a vendor's own segment"], ""),
    ],
    ids=["tq1-ipc-in-2.3", "sft-in-2.4", "prt-in-2.5.1", "vendor"],
)
def test_segments_the_version_does_not_define_are_ignored(
    tmp_path: Path, version: str, extra: list[str], priority: str
) -> None:
    """HL7 v2 asks a receiver to ignore segments it does not expect: one that the message's
    version does not define (added in a later version, or a vendor's) does not refuse the
    order; one the node reads (TQ1, IPC) is read whatever the version."""
    text = orm().replace("|P|2.5", f"|P|{version}", 1) + "\r" + "\r".join(extra)
    order = extract_order(parse(text))
    assert (order.accession_number, order.priority) == ("ACC1", priority)
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    try:
        intake = OrderIntake(load_settings(None, node={"data_dir": tmp_path}), ledger)
        assert "\rMSA|AA|MSG1" in intake.handle(text.encode()).decode()
    finally:
        ledger.dispose()


@pytest.fixture
def intake(tmp_path: Path) -> Iterator[tuple[OrderIntake, Ledger]]:
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    try:
        yield OrderIntake(load_settings(None, node={"data_dir": tmp_path}), ledger), ledger
    finally:
        ledger.dispose()


def _msa(ack: bytes) -> list[str]:
    return ack.decode().split("\r")[1].split("|")


@pytest.mark.parametrize(
    ("control", "status"),
    [("XO", ""), ("SC", "IP"), ("NW", "SC")],
    ids=["change", "status-change", "new-order-again"],
)
def test_a_cancelled_order_stays_cancelled(
    intake: tuple[OrderIntake, Ledger], control: str, status: str
) -> None:
    """HL7 v2.5 chapter 4 (ORC-1): a cancelled order is final. A change (``XO``), a status
    change or a new order with its accession number is answered AE, naming the order's ORC-1,
    and changes nothing; the same message again gets the same answer; a cancel again is AA."""
    handler, ledger = intake
    assert _msa(handler.handle(orm(cid="C1", orc_priority="S").encode()))[1] == "AA"
    cancel = orm(cid="C2").replace("ORC|NW|PL1|FI1||SC||", "ORC|CA|PL1|FI1||CA||", 1)
    assert _msa(handler.handle(cancel.encode()))[1] == "AA"
    change = orm(cid="C3", name="Changed^Name", orc_priority="R").replace(
        "ORC|NW|PL1|FI1||SC||", f"ORC|{control}|PL1|FI1||{status}||", 1
    )
    ack = handler.handle(change.encode())
    msa = _msa(ack)
    assert msa[1:3] == ["AE", "C3"]
    assert msa[3] == f"order 1 is cancelled: {control} cannot change or reopen it"
    assert ack.decode().split("\r")[2].split("|")[2] == "ORC^1^1"
    order = ledger.hl7_order("ACC1")
    assert order is not None
    assert (order["status"], order["priority"], order["patient_name"], order["control_id"]) == (
        "cancelled",
        "S",
        "Doe^John",
        "C2",
    )
    assert handler.handle(change.encode()) == ack  # the stored answer
    again = cancel.replace("|C2|", "|C4|", 1)
    assert _msa(handler.handle(again.encode()))[1] == "AA"


def a40(cid: str, surviving: str, prior: str, *, name: str = "Doe^John") -> str:
    return "\r".join(
        [
            MSH.format(type="ADT^A40^ADT_A39", cid=cid),
            "EVN|A40|20240101120000",
            f"PID|1||{surviving}||{name}||19700101|M",
            f"MRG|{prior}",
        ]
    )


def test_a_patient_merge_moves_the_orders_of_the_merged_away_patient(
    intake: tuple[OrderIntake, Ledger], caplog: pytest.LogCaptureFixture
) -> None:
    """ADT^A40: the orders under MRG-1 (the same id from the same assigning authority, in
    any repetition of the order's PID-3) take the surviving PID-3 and name; the orders of
    other patients, and of the same id from another authority, stay; AA; the log names no
    patient."""
    handler, ledger = intake
    for cid, accession, pid in (
        ("M1", "ACC-OLD", "OLD7^^^HOSP^MR"),
        ("M2", "ACC-OLD2", "INS55^^^AOK^SS~OLD7^^^HOSP^MR"),
        ("M3", "ACC-OTHER", "OLD7^^^CLINIC^MR"),
        ("M4", "ACC-NEW", "NEW1^^^HOSP^MR"),
    ):
        text = orm(cid=cid, accession=accession).replace("PAT1^^^HOSP^MR", pid, 1)
        assert _msa(handler.handle(text.encode()))[1] == "AA"
    caplog.set_level("INFO", logger="acwi_node.hl7")
    ack = handler.handle(a40("A1", "NEW1^^^HOSP^MR", "OLD7^^^HOSP^MR", name="Doe^Jon").encode())
    assert _msa(ack)[1:3] == ["AA", "A1"]
    moved = [ledger.hl7_order(a) for a in ("ACC-OLD", "ACC-OLD2", "ACC-OTHER", "ACC-NEW")]
    assert [(o or {}).get("patient_id") for o in moved] == [
        "NEW1^^^HOSP^MR",
        "NEW1^^^HOSP^MR",
        "OLD7^^^CLINIC^MR",
        "NEW1^^^HOSP^MR",
    ]
    assert [(o or {}).get("patient_name") for o in moved] == [
        "Doe^Jon",
        "Doe^Jon",
        "Doe^John",
        "Doe^John",
    ]
    assert "2 order(s) and 0 ORU^R01 waiting in the outbox moved" in caplog.text
    for value in ("OLD7", "NEW1", "Doe", "Jon"):
        assert value not in caplog.text


@pytest.mark.parametrize(
    "database", ["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)]
)
def test_a_patient_merge_moves_the_orus_waiting_in_the_outbox(
    tmp_path: Path, database: str, request: pytest.FixtureRequest
) -> None:
    """ADT^A40: an ORU^R01 built for the merged-away patient and not yet delivered carries the
    surviving patient's PID-3 (and name, birth date, sex) when it goes, under the same MSH-10;
    one delivered already, and one of the same id from another authority, stay as they
    were."""
    node: dict[str, Any] = {"data_dir": tmp_path / "data"}
    if database == "postgresql":
        node["database_url"] = request.getfixturevalue("postgres_url")
    settings = load_settings(None, node=node, ingest={"fsync": False})
    ledger = Ledger(settings.database_url)
    try:
        queued: dict[str, tuple[int, str]] = {}
        for study, pid, delivered in (
            ("1.2.3", "OLD7^^^HOSP^MR", False),
            ("1.2.4", "OLD7^^^HOSP^MR", True),
            ("1.2.5", "OLD7^^^CLINIC^MR", False),
        ):
            receive(settings, ledger, study, f"{study}.1")
            job = analyse(settings, ledger, study)
            oru = _study(study_uid=study, patient_id=pid, patient_name="Doe^John")
            message = build_oru(oru, control_id=f"R{job}")
            row = ledger.add_hl7_outbound(
                job_id=job, kind="result", control_id=f"R{job}", message=message
            )
            assert row is not None
            if delivered:
                ledger.record_hl7_attempt(
                    row, delivered=True, ack_code="AA", error="", max_attempts=3, backoff_s=1
                )
            queued[study] = (row, message)
        handler = OrderIntake(settings, ledger)
        ack = handler.handle(a40("M1", "NEW1^^^HOSP^MR", "OLD7^^^HOSP^MR", name="Doe^Jon").encode())
        assert _msa(ack)[1:3] == ["AA", "M1"]
        with ledger.session() as s:
            now = {study: s.get_one(Hl7Outbound, row) for study, (row, _) in queued.items()}
            sent = {study: (r.message, r.control_id) for study, r in now.items()}
    finally:
        ledger.dispose()
    before = queued["1.2.3"][1].split("\r")
    after = sent["1.2.3"][0].split("\r")
    assert after[1] == "PID|1||NEW1^^^HOSP^MR||Doe^Jon||19700101|M"
    assert after[:1] + after[2:] == before[:1] + before[2:]  # nothing else changed
    assert sent["1.2.3"][1] == msh_info(parse(queued["1.2.3"][1])).control_id
    assert sent["1.2.4"][0] == queued["1.2.4"][1]  # delivered: the RIS merges its own
    assert sent["1.2.5"][0] == queued["1.2.5"][1]  # another authority's OLD7


@pytest.mark.parametrize("patient_id", [True, False], ids=["patient-ids", "no-patient-ids"])
def test_a_patient_merge_is_an_audit_record(tmp_path: Path, patient_id: bool) -> None:
    """ADT^A40: each merge applied is an audit record (IHE ATNA: 110110 Patient Record,
    action U) naming the RIS and what moved, with the patient IDs only where
    ``audit.patient_id`` is on, never a name; the same message again records nothing."""
    settings = load_settings(
        None, node={"data_dir": tmp_path / "data"}, audit={"patient_id": patient_id}
    )
    ledger = Ledger(settings.database_url)
    configure_audit(settings, "hl7")
    try:
        handler = OrderIntake(settings, ledger)
        text = orm(cid="O1").replace("PAT1^^^HOSP^MR", "OLD7^^^HOSP^MR", 1)
        assert _msa(handler.handle(text.encode()))[1] == "AA"
        merge = a40("M1", "NEW1^^^HOSP^MR", "OLD7^^^HOSP^MR", name="Canary^Jon").encode()
        ack = handler.handle(merge)
        assert _msa(ack)[1:3] == ["AA", "M1"]
        assert handler.handle(merge) == ack  # a repeat: its stored answer, nothing applied
    finally:
        close_audit()
        ledger.dispose()
    trail = audit_file(settings).read_text()
    merged = [json.loads(line) for line in trail.splitlines() if "patients_merged" in line]
    assert len(merged) == 1
    record = merged[0]
    assert (record["event_id"]["code"], record["action"], record["outcome"]) == (
        "110110",
        "U",
        "success",
    )
    assert {"type": "application", "id": "RIS", "requestor": True} in record["participants"]
    assert "1 order(s) and 0 ORU^R01" in record["detail"]
    assert record.get("patient_ids") == (["NEW1", "OLD7"] if patient_id else None)
    assert "Canary" not in trail and "Jon" not in trail


@pytest.mark.parametrize(
    ("message", "location"),
    [
        (a40("A2", "NEW1^^^HOSP^MR", ""), "MRG^1^1"),
        (a40("A3", "", "OLD7^^^HOSP^MR"), "PID^1^3"),
        (a40("A4", "NEW1^^^HOSP^MR", "OLD7").replace("\rMRG|OLD7", ""), "MRG"),
    ],
    ids=["no-prior-id", "no-surviving-id", "no-mrg"],
)
def test_a_patient_merge_without_both_patients_is_an_application_error(
    intake: tuple[OrderIntake, Ledger], message: str, location: str
) -> None:
    handler, ledger = intake
    assert _msa(handler.handle(orm(cid="M1").encode()))[1] == "AA"
    ack = handler.handle(message.encode()).decode()
    assert ack.split("\r")[1].split("|")[1] == "AE"
    assert ack.split("\r")[2].split("|")[2] == location
    order = ledger.hl7_order("ACC1")
    assert order is not None and order["patient_id"] == "PAT1^^^HOSP^MR"


def adt(event: str, cid: str, *groups: tuple[str, str], name: str = "Doe^John") -> str:
    """An ADT merge or link event: its PID/MRG pairs (surviving PID-3, MRG segment text),
    in the event's structure (ADT_A18: PV1 after the MRG; ADT_A39: PV1 in each group)."""
    structure = {
        "A18": "ADT_A18",
        "A39": "ADT_A39",
        "A40": "ADT_A39",
        "A41": "ADT_A39",
        "A42": "ADT_A39",
    }.get(event, "ADT_A30")
    segs = [MSH.format(type=f"ADT^{event}^{structure}", cid=cid), f"EVN|{event}|20240101120000"]
    for surviving, mrg in groups:
        segs += [f"PID|1||{surviving}||{name}||19700101|M", f"MRG|{mrg}"]
        if structure in {"ADT_A18", "ADT_A39"}:
            segs.append("PV1|1|O")
    return "\r".join(segs)


def _take_orders(handler: OrderIntake, *patients: tuple[str, str]) -> None:
    for n, (accession, pid) in enumerate(patients, start=1):
        text = orm(cid=f"O{n}", accession=accession).replace("PAT1^^^HOSP^MR", pid, 1)
        assert _msa(handler.handle(text.encode()))[1] == "AA"


@pytest.mark.parametrize(
    ("event", "mrg"),
    [
        ("A18", "OLD7^^^HOSP^MR"),
        ("A30", "OLD7^^^HOSP^MR"),
        ("A30", "|||OLD7^^^HOSP^MR"),
        ("A34", "OLD7^^^HOSP^MR"),
        ("A36", "OLD7^^^HOSP^MR|||ACCT1"),
        ("A39", "|||OLD7^^^HOSP^MR"),
        ("A40", "OLD7^^^HOSP^MR"),
    ],
    ids=["A18", "A30", "A30-mrg4", "A34", "A36", "A39-mrg4", "A40"],
)
def test_the_patient_merge_events_move_the_orders_as_an_a40_does(
    intake: tuple[OrderIntake, Ledger], event: str, mrg: str
) -> None:
    """HL7 v2.5 chapter 3: A18 (merge patient information), A30 (merge person information),
    A34 (merge patient ID only), A36 (merge patient ID and account number), A39 (merge person
    - patient ID: the prior ID may be in MRG-4) merge two patients as an A40 does: the orders
    under the merged-away identifier take the surviving PID-3 and name; AA."""
    handler, ledger = intake
    _take_orders(handler, ("ACC-OLD", "OLD7^^^HOSP^MR"), ("ACC-OTHER", "OLD7^^^CLINIC^MR"))
    message = adt(event, "M1", ("NEW1^^^HOSP^MR", mrg), name="Doe^Jon")
    assert _msa(handler.handle(message.encode()))[1:3] == ["AA", "M1"]
    old, other = ledger.hl7_order("ACC-OLD"), ledger.hl7_order("ACC-OTHER")
    assert old is not None and other is not None
    assert (old["patient_id"], old["patient_name"]) == ("NEW1^^^HOSP^MR", "Doe^Jon")
    assert (other["patient_id"], other["patient_name"]) == ("OLD7^^^CLINIC^MR", "Doe^John")


def test_an_a39_merges_each_of_its_patient_groups(intake: tuple[OrderIntake, Ledger]) -> None:
    """ADT^A39 repeats its PID/PD1/MRG/PV1 group (ADT_A39): each group is one merge."""
    handler, ledger = intake
    _take_orders(handler, ("ACC-A", "OLDA^^^HOSP^MR"), ("ACC-B", "OLDB^^^HOSP^MR"))
    message = adt(
        "A39", "M1", ("NEWA^^^HOSP^MR", "OLDA^^^HOSP^MR"), ("NEWB^^^HOSP^MR", "OLDB^^^HOSP^MR")
    )
    assert _msa(handler.handle(message.encode()))[1] == "AA"
    assert [(ledger.hl7_order(a) or {}).get("patient_id") for a in ("ACC-A", "ACC-B")] == [
        "NEWA^^^HOSP^MR",
        "NEWB^^^HOSP^MR",
    ]


@pytest.mark.parametrize("event", ["A18", "A30", "A34", "A36", "A47"])
def test_an_event_of_one_patient_pair_with_two_is_an_application_error(
    intake: tuple[OrderIntake, Ledger], event: str
) -> None:
    """ADT_A18 and ADT_A30 (A18, A30, A34, A36, A47) carry one PID and its MRG: a second pair
    is a segment sequence error (AE, ERR-3 100, ERR-2 the second MRG) and nothing is applied."""
    handler, ledger = intake
    _take_orders(handler, ("ACC-A", "OLDA^^^HOSP^MR"))
    message = adt(
        event, "M1", ("NEWA^^^HOSP^MR", "OLDA^^^HOSP^MR"), ("NEWB^^^HOSP^MR", "OLDB^^^HOSP^MR")
    )
    ack = handler.handle(message.encode()).decode().split("\r")
    assert ack[1].split("|")[1] == "AE"
    assert ack[2].split("|")[2:4] == ["MRG^2", "100^Segment sequence error^HL70357"]
    assert (ledger.hl7_order("ACC-A") or {}).get("patient_id") == "OLDA^^^HOSP^MR"


def test_an_a47_changes_one_identifier_and_keeps_the_others(tmp_path: Path) -> None:
    """ADT^A47 (change patient identifier list): MRG-1 the wrong identifier, PID-3 the right
    one. The orders and the waiting ORU^R01 under the wrong one take the right one in its
    place and keep the patient's other identifiers (an A40 would give them PID-3 alone); the
    audit record is ``patient_identifier_changed`` (110110, U); the log names no patient."""
    settings = load_settings(None, node={"data_dir": tmp_path / "data"}, audit={"patient_id": True})
    ledger = Ledger(settings.database_url)
    configure_audit(settings, "hl7")
    try:
        receive(settings, ledger, "1.2.3", "1.2.3.1")
        job = analyse(settings, ledger, "1.2.3")
        pid = "INS55^^^AOK^SS~OLD7^^^HOSP^MR~X9^^^LAB^PI"
        oru = build_oru(_study(patient_id=pid, patient_name="Doe^John"), control_id="R1")
        row = ledger.add_hl7_outbound(job_id=job, kind="result", control_id="R1", message=oru)
        assert row is not None
        handler = OrderIntake(settings, ledger)
        _take_orders(handler, ("ACC-A", pid), ("ACC-B", "OLD7^^^CLINIC^MR"))
        message = adt("A47", "M1", ("NEW7^^^HOSP^MR", "OLD7^^^HOSP^MR"))
        assert _msa(handler.handle(message.encode()))[1:3] == ["AA", "M1"]
        with ledger.session() as s:
            patched = s.get_one(Hl7Outbound, row).message
        changed = ledger.hl7_order("ACC-A")
        other = ledger.hl7_order("ACC-B")
    finally:
        close_audit()
        ledger.dispose()
    assert changed is not None and other is not None
    assert changed["patient_id"] == "INS55^^^AOK^SS~NEW7^^^HOSP^MR~X9^^^LAB^PI"
    assert other["patient_id"] == "OLD7^^^CLINIC^MR"
    assert patched.split("\r")[1].split("|")[3] == "INS55^^^AOK^SS~NEW7^^^HOSP^MR~X9^^^LAB^PI"
    trail = [json.loads(line) for line in audit_file(settings).read_text().splitlines()]
    changes = [r for r in trail if r["event"] == "patient_identifier_changed"]
    assert len(changes) == 1
    assert (changes[0]["event_id"]["code"], changes[0]["action"]) == ("110110", "U")
    assert "1 order(s) and 1 ORU^R01" in changes[0]["detail"]
    assert changes[0]["patient_ids"] == ["NEW7", "OLD7"]
    assert not [r for r in trail if r["event"] == "patients_merged"]


@pytest.mark.parametrize(
    "event",
    ["A24", "A35", "A37", "A41", "A42"],
)
def test_link_account_and_visit_events_are_acknowledged_without_changes(
    intake: tuple[OrderIntake, Ledger], event: str
) -> None:
    """A24 (link), A37 (unlink), A35 (merge account number only), A41 (merge account), A42
    (merge visit) change nothing the node keeps: AA (CA in enhanced mode), the orders stay
    under their patient even where MRG-1 names another."""
    handler, ledger = intake
    _take_orders(handler, ("ACC-A", "OLDA^^^HOSP^MR"))
    if event in {"A24", "A37"}:
        message = "\r".join(
            [
                MSH.format(type=f"ADT^{event}^ADT_{event}", cid="M1"),
                f"EVN|{event}|20240101120000",
                "PID|1||OLDA^^^HOSP^MR||Doe^John",
                "PID|2||NEWA^^^HOSP^MR||Doe^John",
            ]
        )
    else:
        message = adt(event, "M1", ("NEWA^^^HOSP^MR", "OLDA^^^HOSP^MR|||ACCT1"))
    assert _msa(handler.handle(message.encode()))[1:3] == ["AA", "M1"]
    assert (ledger.hl7_order("ACC-A") or {}).get("patient_id") == "OLDA^^^HOSP^MR"
    enhanced = message.replace("|M1|P|2.5", "|M2|P|2.5|||AL|NE", 1).encode()
    answer = acknowledgement(enhanced, handler.handle(enhanced))
    assert answer is not None and answer.decode().split("\r")[1].split("|")[1:3] == ["CA", "M2"]


@pytest.mark.parametrize("event", ["A18", "A34", "A39", "A47"])
def test_merge_events_are_accepted_in_enhanced_mode(
    intake: tuple[OrderIntake, Ledger], event: str
) -> None:
    """A merge event asking for an accept acknowledgement (MSH-15 AL) gets CA, once applied."""
    handler, ledger = intake
    _take_orders(handler, ("ACC-A", "OLDA^^^HOSP^MR"))
    message = adt(event, "M1", ("NEWA^^^HOSP^MR", "OLDA^^^HOSP^MR"))
    raw = message.replace("|M1|P|2.5", "|M1|P|2.5|||AL|NE", 1).encode()
    answer = acknowledgement(raw, handler.handle(raw))
    assert answer is not None and answer.decode().split("\r")[1].split("|")[1:3] == ["CA", "M1"]
    assert (ledger.hl7_order("ACC-A") or {}).get("patient_id") == "NEWA^^^HOSP^MR"


@pytest.mark.parametrize("patient_id", [True, False], ids=["patient-ids", "no-patient-ids"])
def test_orders_taken_are_audit_records(tmp_path: Path, patient_id: bool) -> None:
    """Each order taken from the RIS is an audit record (DICOM PS3.15 A.5.3.13: 110109 Order
    Record): ``order_created`` (action C) for one the node did not have, ``order_updated``
    (U) for a change, ``order_cancelled`` (U: the order is kept, cancelled), naming the RIS,
    the message and the order control, the study's UID where given, the patient ID only with
    ``audit.patient_id``; no name, accession or order number. A repeated message, and one
    refused (a change of a cancelled order), record nothing."""
    settings = load_settings(
        None, node={"data_dir": tmp_path / "data"}, audit={"patient_id": patient_id}
    )
    ledger = Ledger(settings.database_url)
    configure_audit(settings, "hl7")
    try:
        handler = OrderIntake(settings, ledger)
        new = orm(cid="C1", accession="ACC-Q7", name="Canary^Jon", zds="1.2.840.99.7")
        change = new.replace("|C1|", "|C2|", 1).replace("ORC|NW|", "ORC|XO|", 1)
        cancel = new.replace("|C1|", "|C3|", 1).replace("ORC|NW|", "ORC|CA|", 1)
        refused = new.replace("|C1|", "|C4|", 1).replace("ORC|NW|", "ORC|XO|", 1)
        for text, code in ((new, "AA"), (new, "AA"), (change, "AA"), (cancel, "AA")):
            assert _msa(handler.handle(text.encode()))[1] == code
        assert _msa(handler.handle(refused.encode()))[1] == "AE"
    finally:
        close_audit()
        ledger.dispose()
    text = audit_file(settings).read_text()
    trail = [json.loads(line) for line in text.splitlines()]
    orders = [r for r in trail if r["event"].startswith("order_")]
    assert [(r["event"], r["event_id"]["code"], r["action"]) for r in orders] == [
        ("order_created", "110109", "C"),
        ("order_updated", "110109", "U"),
        ("order_cancelled", "110109", "U"),
    ]
    for record, control in zip(orders, ("C1", "C2", "C3"), strict=True):
        assert {"type": "application", "id": "RIS", "requestor": True} in record["participants"]
        assert f"message {control}" in record["detail"]
        assert record["study_uids"] == ["1.2.840.99.7"]
        assert record.get("patient_ids") == (["PAT1"] if patient_id else None)
    assert "ORC-1 CA" in orders[2]["detail"]
    for value in ("Canary", "Jon", "ACC-Q7", "PL1", "FI1"):
        assert value not in text


@pytest.mark.parametrize(
    ("accept", "application", "outcome", "expected"),
    [
        ("", "", "AA", "AA"),  # original mode
        ("", "", "AE", "AE"),
        ("NE", "NE", "AA", None),
        ("NE", "NE", "AR", None),
        ("AL", "NE", "AA", "CA"),
        ("AL", "NE", "AE", "CE"),
        ("AL", "NE", "AR", "CE"),  # the node's own failure (ERR-3 207): CE
        ("AL", "NE", "AR/200", "CR"),  # a message type the node does not take: CR
        ("AL", "NE", "AR/203", "CR"),  # nor its version
        ("AL", "AL", "AA", "CA"),
        ("ER", "NE", "AA", None),
        ("ER", "NE", "AR/200", "CR"),
        ("SU", "NE", "AA", "CA"),
        ("SU", "NE", "AE", None),
        ("NE", "AL", "AA", "AA"),
        ("NE", "ER", "AA", None),
        ("NE", "ER", "AE", "AE"),
        ("NE", "SU", "AE", None),
        ("NE", "", "AA", "AA"),  # MSH-16 empty in enhanced mode: always
        ("", "NE", "AE", "CE"),  # MSH-15 empty in enhanced mode: always
    ],
)
def test_msh15_and_msh16_decide_which_acknowledgement_goes_back(
    accept: str, application: str, outcome: str, expected: str | None
) -> None:
    """HL7 v2.5 2.9 (table 0155): both empty, original mode (the ACK); else enhanced mode:
    the accept acknowledgement (CA; CR for a message the node does not take whatever its
    content; else CE) where MSH-15 asks for one for this outcome, else
    the application acknowledgement where MSH-16 asks for one, else nothing."""
    text = orm().replace("|P|2.5", f"|P|2.5|||{accept}|{application}", 1)
    assert msh_info(parse(text)).accept_ack == accept
    code, _, error = outcome.partition("/")
    ack = build_ack(
        peek_msh(text),
        code,
        "",
        control_id="A1",
        application="ACWI",
        facility="ACWI",
        error=error or "207",
    )
    got = acknowledgement(text.encode(), ack.encode())
    if expected is None:
        assert got is None
    else:
        assert got is not None
        assert _msa(got)[1:3] == [expected, "MSG1"]
        assert got.split(b"\r")[0] == ack.encode().split(b"\r")[0]


def test_the_messages_the_node_sends_pass_strict_hl7_2_5_validation() -> None:
    """Every ORU^R01 (preliminary, with a verdict and its lesion boxes, a withdrawal) and
    every ACK (AA, and AE with its ERR) is valid HL7 2.5, the version its MSH-12 claims,
    under hl7apy's strict validation."""
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.parser import parse_message

    study = OruStudy(
        "1.2.3",
        "ACC1",
        "PAT1^^^HOSP^MR",
        "Doe^John",
        SUMMARY,
        birth_date="19700101",
        sex="M",
        placer_order_number="PL1",
        filler_order_number="FI1",
        procedure_code="CHEST",
        procedure_text="Chest X-ray",
    )
    verdict = Verdict(
        True,
        "abnormal",
        reviewer="R1^Smith^Ann",
        comment="agreed",
        reviewed_at=dt.datetime(2024, 1, 1, 12),
        lesions=(Lesion("1.2.3.4", 2, (1, 2, 3, 4)),),
    )
    sent = [
        build_oru(study, control_id="C1"),
        build_oru(study, verdict, control_id="C2", correction=True),
        build_oru(study, control_id="C3", withdrawn="wrong patient"),
        build_ack(peek_msh(orm()), "AA", "", control_id="A1", application="A", facility="F"),
        build_ack(
            peek_msh(orm()),
            "AE",
            "no accession number",
            control_id="A2",
            application="A",
            facility="F",
            error="101",
            location="OBR^1^18",
        ),
    ]
    for text in sent:
        assert "|P|2.5|" in text.split("\r")[0]
        parse_message(text, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True).validate()
