"""Storage commitment reports that stretch the standard (``acwi_node/export/commitment.py``):
a Failure Reason with several values, or one that is no number, still refuses its object; a
Referenced SOP Instance UID with several values names none. The report is read, never
answered with a processing failure for the node's own error."""

from __future__ import annotations

from pydicom.dataset import Dataset

from acwi_node.export.commitment import (
    EVENT_SOME_FAILED,
    STATUS_PROCESSING_FAILURE,
    describe_failure,
    parse_report,
)


def _item(uid: str | list[str], reason: object = None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    item.ReferencedSOPInstanceUID = uid
    if reason is not None:
        item.FailureReason = reason
    return item


def test_odd_failure_reasons_and_uids_are_read_not_raised() -> None:
    ds = Dataset()
    ds.TransactionUID = "1.2.3"
    ds.ReferencedSOPSequence = [_item("1.2.3.1"), _item(["1.2.3.8", "1.2.3.9"])]
    ds.FailedSOPSequence = [
        _item("1.2.3.2", [0x0112, 0x0110]),  # two values: the first
        _item("1.2.3.3", []),  # an empty value: none given
        _item("1.2.3.4"),  # none at all
        _item(["1.2.3.5", "1.2.3.6"], 0x0112),  # no single object
    ]
    report = parse_report(EVENT_SOME_FAILED, ds)
    assert report.committed == ("1.2.3.1",)
    assert report.refused == {
        "1.2.3.2": 0x0112,
        "1.2.3.3": STATUS_PROCESSING_FAILURE,
        "1.2.3.4": STATUS_PROCESSING_FAILURE,
    }
    assert describe_failure(report.refused["1.2.3.2"]) == "no such object instance (0x0112)"
