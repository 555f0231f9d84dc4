"""The stand-ins a rejection note names when its results' files are gone: the ledger's UIDs,
each result's series derived as the node derives it, the archive's patient and study."""

from __future__ import annotations

import pytest
from pydicom import Dataset

from acwi_node import MANUFACTURER
from acwi_node.export.withdrawal_headers import HeaderUnavailable, stand_ins
from acwi_node.ledger.withdrawals import WithdrawableJob, WithdrawableResult
from acwi_node.results.rejection import build_rejection_note
from acwi_node.results.uids import result_uids

STUDY = "1.2.826.0.1.3680043.8.498.77"
SR = "1.2.840.10008.5.1.4.1.1.88.34"
SC = "1.2.840.10008.5.1.4.1.1.7"


def _header(name: str = "Doe^Jane") -> Dataset:
    header = Dataset()
    header.StudyInstanceUID = STUDY
    header.PatientName = name
    header.PatientID = "P1"
    header.AccessionNumber = "A1"
    return header


def _job(*results: WithdrawableResult) -> WithdrawableJob:
    return WithdrawableJob(7, STUDY, 1, "chest", "dianet", "1.2.0", results, True)


def _result(kind: str, uid: str, sop_class: str = SC) -> WithdrawableResult:
    return WithdrawableResult(kind, uid, sop_class, f"{STUDY}/{uid}.dcm", ("pacs",))


def test_each_result_is_named_in_its_derived_series_with_the_archives_patient() -> None:
    uids = result_uids(STUDY, "dianet", "1.2.0")
    results = (
        _result("sr", uids.sr_instance_uid, SR),
        _result("heatmap", uids.heatmap_instance_uid("1.2.3.4")),
    )
    sr, heatmap = stand_ins(_header(), _job(*results), results)
    assert (sr.SeriesInstanceUID, heatmap.SeriesInstanceUID) == (
        uids.sr_series_uid,
        uids.heatmap_series_uid,
    )
    assert (sr.SOPClassUID, heatmap.SOPInstanceUID) == (SR, results[1].sop_instance_uid)
    assert {sr.Manufacturer, heatmap.Manufacturer} == {MANUFACTURER}
    assert (sr.PatientID, str(heatmap.PatientName)) == ("P1", "Doe^Jane")
    assert "Rows" not in sr and "Rows" in heatmap  # listed as an IMAGE, as its file would be
    note = build_rejection_note([sr, heatmap], reason="quality")
    assert note.PatientID == "P1"


def test_a_patient_name_outside_the_answers_character_set_makes_the_note_utf8() -> None:
    uids = result_uids(STUDY, "dianet", "1.2.0")
    results = (_result("sr", uids.sr_instance_uid, SR),)
    (sr,) = stand_ins(_header("山田^太郎"), _job(*results), results)
    assert sr.SpecificCharacterSet == "ISO_IR 192"
    assert build_rejection_note([sr], reason="quality").SpecificCharacterSet == "ISO_IR 192"


def test_the_note_names_the_patient_by_the_archives_issuer_of_patient_id() -> None:
    """The note is filed by the patient's ID and its issuer as the archive holds them."""
    uids = result_uids(STUDY, "dianet", "1.2.0")
    results = (_result("sr", uids.sr_instance_uid, SR),)
    header = _header()
    header.IssuerOfPatientID = "HOSP-A"
    (sr,) = stand_ins(header, _job(*results), results)
    note = build_rejection_note([sr], reason="quality")
    assert (note.PatientID, note.get("IssuerOfPatientID")) == ("P1", "HOSP-A")


@pytest.mark.parametrize(
    "result",
    [
        _result("sr", "1.2.3.999", SR),  # an SR whose UID is not the node's derivation
        _result("pdf", "1.2.3.998"),  # a kind with no series of its own
    ],
)
def test_a_result_whose_series_cannot_be_told_is_refused(result: WithdrawableResult) -> None:
    with pytest.raises(HeaderUnavailable, match="reject them in the PACS by hand"):
        stand_ins(_header(), _job(result), [result])
