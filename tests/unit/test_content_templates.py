"""Content items rendered from a template (results/content_templates.py): the bytes of the same
items encoded with other values, whatever the values' lengths."""

from __future__ import annotations

from pydicom import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.valuerep import DS

from acwi_node.results.content_templates import template
from acwi_node.results.encoding import encode_items


def _items(uid: str, text: str, value: float) -> list[Dataset]:
    """Two items, the variable values nested two levels down and once at the top."""
    number = Dataset()
    number.NumericValue = DS(value, auto_format=True)
    number.FloatingPointValue = value
    reference = Dataset()
    reference.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    reference.ReferencedSOPInstanceUID = uid
    child = Dataset()
    child.ValueType = "NUM"
    child.MeasuredValueSequence = DicomSequence([number])
    first = Dataset()
    first.ValueType = "CONTAINER"
    first.TextValue = text
    first.ContentSequence = DicomSequence([child])
    second = Dataset()
    second.ValueType = "IMAGE"
    second.ReferencedSOPSequence = DicomSequence([reference])
    return [first, second]


def _values(uid: str, text: str, value: float) -> dict[tuple[str, str], object]:
    return {
        ("instance", ""): uid,
        ("text", "t"): text,
        ("ds", "v"): DS(value, auto_format=True),
        ("fd", "v"): value,
    }


def test_rendered_items_are_the_items_encoded_with_other_values() -> None:
    sentinel = ("1.2.826.0.1.3680043.10.1137.1", "SENTINEL TEXT", 0.713917)
    found = template(_items(*sentinel), _values(*sentinel), None)
    assert found is not None
    for values in [
        ("1.2.3", "a", 1.0),  # shorter, odd lengths (padded)
        ("1.2.826.0.1.3680043.10.1137.98765432109876543210.1", "a longer text, much", -1e-7),
        sentinel,
    ]:
        assert found.render(_values(*values), None) == encode_items(_items(*values), None)


def test_no_template_when_a_sentinel_is_missing_or_ambiguous() -> None:
    sentinel = ("1.2.826.0.1.3680043.10.1137.1", "SENTINEL TEXT", 0.713917)
    missing = {**_values(*sentinel), ("text", "other"): "NOT THERE"}
    assert template(_items(*sentinel), missing, None) is None
    ambiguous = {**_values(*sentinel), ("text", "again"): "SENTINEL TEXT"}
    assert template(_items(*sentinel), ambiguous, None) is None
