"""The VERIFIED SR written after a radiologist's verdict."""

from __future__ import annotations

import datetime as dt
import io
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset

from acwi_node.results.sr import (
    LesionRegion,
    Verification,
    _walk,
    amended_sr_uid,
    build_sr,
    build_verified_sr,
    summarise_sr,
    verified_sr_uid,
)
from tests.unit.test_sr import MODEL, make_study, needs_dciodvfy

AT = dt.datetime(2026, 3, 4, 5, 6, 7)


def _unverified() -> tuple[list[Dataset], Dataset]:
    sources, analysis = make_study()
    buf = io.BytesIO()
    build_sr(sources, analysis).save_as(buf, enforce_file_format=True)
    return sources, pydicom.dcmread(io.BytesIO(buf.getvalue()))


def _verdict(action: str = "override", label: str = "nodule", reason: str = "rib") -> Verification:
    return Verification("Doe^Jane", "Example Hospital", action, label, reason, AT)


def test_flags_observer_and_predecessor() -> None:
    sources, sr = _unverified()
    doc = build_verified_sr(sr, sources, _verdict())
    assert (doc.VerificationFlag, doc.CompletionFlag, doc.PreliminaryFlag) == (
        "VERIFIED",
        "COMPLETE",
        "FINAL",
    )
    observer = doc.VerifyingObserverSequence[0]
    assert str(observer.VerifyingObserverName) == "Doe^Jane"
    assert observer.VerifyingOrganization == "Example Hospital"
    assert observer.VerificationDateTime.startswith("20260304050607")
    ref = doc.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
    assert ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == sr.SOPInstanceUID
    assert doc.SeriesInstanceUID == sr.SeriesInstanceUID
    # the series' attributes as the unverified SR has them: one series, one description
    for keyword in ("SeriesDescription", "SeriesNumber", "Modality", "SeriesDate"):
        assert doc.get(keyword) == sr.get(keyword), keyword
    assert doc.StudyInstanceUID == sr.StudyInstanceUID
    assert doc.PatientID == sr.PatientID
    assert doc.SOPInstanceUID == verified_sr_uid(sr.StudyInstanceUID, MODEL.name, MODEL.version)
    assert doc.SOPInstanceUID != sr.SOPInstanceUID


def test_content_keeps_the_ai_result_and_adds_the_verdict() -> None:
    sources, sr = _unverified()
    before = summarise_sr(sr)
    after = summarise_sr(build_verified_sr(sr, sources, _verdict(reason="<b>rib</b>")))
    for key in ("probabilities", "uncertainty", "ood_score", "predicted_label", "model_name"):
        assert after[key] == before[key]
    assert after["verdict"] == {
        "action": "override",
        "label": "nodule",
        "reason": "<b>rib</b>",
        "regions": [],
    }
    assert after["verified"] and not before["verified"]
    assert before["verdict"] is None
    confirmed = summarise_sr(build_verified_sr(sr, sources, _verdict("confirm", "effusion", "")))
    assert confirmed["verdict"] == {
        "action": "confirm",
        "label": "effusion",
        "reason": "",
        "regions": [],
    }


def test_same_verdict_inputs_same_uid_single_name_gets_caret() -> None:
    sources, sr = _unverified()
    one = build_verified_sr(sr, sources, _verdict())
    two = build_verified_sr(sr, sources, Verification("jdoe", "X", "confirm", "normal", "", AT))
    assert one.SOPInstanceUID == two.SOPInstanceUID  # one verified SR per result: replaced
    assert str(two.VerifyingObserverSequence[0].VerifyingObserverName) == "jdoe^"


@pytest.mark.parametrize(
    ("verification", "message"),
    [
        (_verdict("escalate"), "verdict must be one of"),
        (_verdict("override", reason="  "), "needs a reason"),
        (_verdict("confirm", label="pneumonia"), "not one of the model's"),
    ],
)
def test_bad_verdicts_are_refused(verification: Verification, message: str) -> None:
    sources, sr = _unverified()
    with pytest.raises(ValueError, match=message):
        build_verified_sr(sr, sources, verification)


def test_only_unverified_documents_are_verified() -> None:
    sources, sr = _unverified()
    doc = build_verified_sr(sr, sources, _verdict())
    with pytest.raises(ValueError, match="not an UNVERIFIED SR"):
        build_verified_sr(doc, sources, _verdict())
    with pytest.raises(ValueError, match="source instances"):
        build_verified_sr(sr, [], _verdict())


@needs_dciodvfy
def test_dciodvfy_reports_no_errors(tmp_path: Path) -> None:
    sources, sr = _unverified()
    path = tmp_path / "verified.dcm"
    build_verified_sr(sr, sources, _verdict()).save_as(path, enforce_file_format=True)
    done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    errors = [line for line in (done.stdout + done.stderr).splitlines() if "Error" in line]
    assert not errors, "\n".join(errors)


def test_a_radiologists_words_in_any_script_are_kept(tmp_path: Path) -> None:
    """A name or reason outside the source's character set: the SR is written in UTF-8
    (not with question marks); plain ASCII keeps the source's."""
    sources, sr = _unverified()
    plain = build_verified_sr(sr, sources, _verdict())
    assert plain.get("SpecificCharacterSet") == sources[0].get("SpecificCharacterSet")
    verdict = Verification("Wáng^Fāng", "Hôpital Nord", "override", "nodule", "疤痕, Größe", AT)
    path = tmp_path / "verified.dcm"
    build_verified_sr(sr, sources, verdict).save_as(path, enforce_file_format=True)
    back = pydicom.dcmread(path)
    assert back.SpecificCharacterSet == "ISO_IR 192"
    observer = back.VerifyingObserverSequence[0]
    assert str(observer.VerifyingObserverName) == "Wáng^Fāng"
    assert observer.VerifyingOrganization == "Hôpital Nord"
    texts = [str(item.get("TextValue", "")) for item in _walk(back)]
    assert "疤痕, Größe" in texts
    assert str(back.PatientName) == str(sources[0].PatientName)
    done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    errors = [line for line in (done.stdout + done.stderr).splitlines() if "Error" in line]
    assert not errors, "\n".join(errors)


def test_no_control_character_reaches_a_text_value(tmp_path: Path) -> None:
    """A reason with a NUL, an escape sequence or a C1 control (refused from readers, but
    never written either): each such character a space in the SR, and a tab too (no text value
    may hold one), CR, LF and FF kept; the observer's name and organization (string values)
    without any control character."""
    sources, sr = _unverified()
    verdict = Verification(
        "Doe\u001b^Jane\u0000",
        "Example\r\nHospital",
        "override",
        "nodule",
        "scar\u0000\u001b[2J\r\nFORGED:\tline\u000cend\u0085\u007fnote",
        AT,
    )
    path = tmp_path / "verified.dcm"
    build_verified_sr(sr, sources, verdict).save_as(path, enforce_file_format=True)
    raw = path.read_bytes()
    assert b"\x1b" not in raw and b"[2J" in raw
    back = pydicom.dcmread(path)
    reason = "scar  [2J\r\nFORGED: line\u000cend  note"
    assert [str(item.TextValue) for item in _walk(back) if "TextValue" in item][-1] == reason
    assert summarise_sr(back)["verdict"]["reason"] == reason
    observer = back.VerifyingObserverSequence[0]
    assert str(observer.VerifyingObserverName) == "Doe ^Jane"
    assert observer.VerifyingOrganization == "Example  Hospital"
    only_controls = Verification("Doe^Jane", "H", "override", "nodule", "\u0000\u001b", AT)
    with pytest.raises(ValueError, match="an override needs a reason"):
        build_verified_sr(sr, sources, only_controls)


@needs_dciodvfy
def test_a_reason_typed_with_tabs_is_a_valid_text_value(tmp_path: Path) -> None:
    """Readers may type tabs (a reason pasted from a table), but a text value (UT) holds no
    tab (PS3.5 6.2): each is written as a space and dciodvfy finds the SR valid."""
    sources, sr = _unverified()
    verdict = _verdict(reason="rib\tshadow\r\nsee:\tprior")
    path = tmp_path / "verified.dcm"
    build_verified_sr(sr, sources, verdict).save_as(path, enforce_file_format=True)
    back = pydicom.dcmread(path)
    assert summarise_sr(back)["verdict"]["reason"] == "rib shadow\r\nsee: prior"
    done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    errors = [line for line in (done.stdout + done.stderr).splitlines() if "Error" in line]
    assert not errors, "\n".join(errors)


def _with_regions(sources: list[Dataset]) -> Verification:
    regions = (
        LesionRegion(str(sources[0].SOPInstanceUID), None, (10, 20, 29, 39)),
        LesionRegion(str(sources[-1].SOPInstanceUID), None, (0, 0, 0, 0)),
    )
    return Verification("Doe^Jane", "Example Hospital", "confirm", "nodule", "", AT, regions)


def test_the_radiologists_lesion_boxes_are_planar_regions_of_their_images() -> None:
    """Each box is a TID 1410 group with the verified finding and a closed polyline over the
    pixels it covers, selected from its image; read back as the same box."""
    sources, sr = _unverified()
    doc = build_verified_sr(sr, sources, _with_regions(sources))
    read = summarise_sr(doc)
    assert read["verdict"]["regions"] == [
        {"image": str(sources[0].SOPInstanceUID), "box": [10, 20, 29, 39]},
        {"image": str(sources[-1].SOPInstanceUID), "box": [0, 0, 0, 0]},
    ]
    scoords = [item for item in _walk(doc) if item.get("ValueType") == "SCOORD"]
    assert [s.GraphicType for s in scoords] == ["POLYLINE", "POLYLINE"]
    assert [float(v) for v in scoords[0].GraphicData] == [10, 20, 30, 20, 30, 40, 10, 40, 10, 20]
    stranger = Verification(
        "Doe^Jane", "X", "confirm", "nodule", "", AT, (LesionRegion("1.2.3.4", None, (0, 0, 1, 1)),)
    )
    with pytest.raises(ValueError, match="not among the sources"):
        build_verified_sr(sr, sources, stranger)


@needs_dciodvfy
def test_dciodvfy_reports_no_errors_with_lesion_regions(tmp_path: Path) -> None:
    sources, sr = _unverified()
    path = tmp_path / "verified.dcm"
    build_verified_sr(sr, sources, _with_regions(sources)).save_as(path, enforce_file_format=True)
    done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    errors = [line for line in (done.stdout + done.stderr).splitlines() if "Error" in line]
    assert not errors, "\n".join(errors)


def test_two_boxes_on_one_image_are_tracked_apart() -> None:
    """Each lesion box is its own tracked region: two on one image have their own Tracking
    Unique Identifiers (the first keeps the one an image's single box always had)."""
    sources, sr = _unverified()
    sop = str(sources[0].SOPInstanceUID)
    one = Verification(
        "Doe^Jane", "X", "confirm", "nodule", "", AT, (LesionRegion(sop, None, (1, 1, 4, 4)),)
    )
    two = Verification(
        "Doe^Jane",
        "X",
        "confirm",
        "nodule",
        "",
        AT,
        (LesionRegion(sop, None, (1, 1, 4, 4)), LesionRegion(sop, None, (8, 8, 12, 12))),
    )

    def tracking(doc: Dataset) -> list[str]:
        return [
            str(item.UID)
            for item in _walk(doc)
            if item.get("ValueType") == "UIDREF"
            and item.ConceptNameCodeSequence[0].CodeValue == "112040"  # Tracking Unique Id
        ]

    single = set(tracking(build_verified_sr(sr, sources, one)))
    double = tracking(build_verified_sr(sr, sources, two))
    assert len(double) == len(set(double))
    assert single <= set(double) and len(set(double) - single) == 1


def _amendment(previous: Dataset, revision: int = 1) -> Verification:
    return Verification(
        "Roe^Rick",
        "Example Hospital",
        "confirm",
        "effusion",
        "the nodule was a nipple shadow",
        AT,
        amends=str(previous.SOPInstanceUID),
        revision=revision,
    )


def test_an_amendment_is_a_new_instance_that_names_the_one_it_replaces() -> None:
    """An amended verdict's SR: its own SOP Instance UID (derived from the one it replaces, so
    re-sending replaces, never duplicates), the next instance number, the same series, and both
    the unverified SR and the verified SR it replaces among its predecessor documents."""
    sources, sr = _unverified()
    first = build_verified_sr(sr, sources, _verdict())
    amended = build_verified_sr(sr, sources, _amendment(first))
    assert amended.SOPInstanceUID == amended_sr_uid(str(first.SOPInstanceUID))
    assert amended.SOPInstanceUID not in {first.SOPInstanceUID, sr.SOPInstanceUID}
    assert (first.InstanceNumber, amended.InstanceNumber) == (2, 3)
    assert amended.SeriesInstanceUID == first.SeriesInstanceUID == sr.SeriesInstanceUID
    (series,) = amended.PredecessorDocumentsSequence[0].ReferencedSeriesSequence
    assert series.SeriesInstanceUID == sr.SeriesInstanceUID
    assert [
        (str(r.ReferencedSOPClassUID), str(r.ReferencedSOPInstanceUID))
        for r in series.ReferencedSOPSequence
    ] == [
        (str(sr.SOPClassUID), str(sr.SOPInstanceUID)),
        (str(first.SOPClassUID), str(first.SOPInstanceUID)),
    ]
    read = summarise_sr(amended)
    assert read["verdict"]["label"] == "effusion"
    assert read["verdict"]["reason"] == "the nodule was a nipple shadow"
    assert read["verifying_observer"] == "Roe^Rick"
    # a second amendment chains on the first
    again = build_verified_sr(sr, sources, _amendment(amended, revision=2))
    assert again.SOPInstanceUID == amended_sr_uid(str(amended.SOPInstanceUID))
    assert again.InstanceNumber == 4


@needs_dciodvfy
def test_dciodvfy_reports_no_errors_in_an_amendment(tmp_path: Path) -> None:
    sources, sr = _unverified()
    first = build_verified_sr(sr, sources, _verdict())
    path = tmp_path / "amended.dcm"
    build_verified_sr(sr, sources, _amendment(first)).save_as(path, enforce_file_format=True)
    done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    errors = [line for line in (done.stdout + done.stderr).splitlines() if "Error" in line]
    assert not errors, "\n".join(errors)
