"""Reading dciodvfy's output (results/validate.py)."""

from __future__ import annotations

from acwi_node.results.validate import _parse


def test_iod_name_after_warnings_about_the_file() -> None:
    """dciodvfy may warn (about what a DICOMDIR would need) before it names the IOD."""
    output = (
        "Warning - Missing attribute or value that would be needed to build DICOMDIR - Study ID\n"
        "Comprehensive3DSR\n"
        "Error - Missing attribute Type 1 Required Element=<ValueType>\n"
        "   Module=<SRDocumentContent>\n"
        "Warning - Unrecognized defined term <99ACWI>\n"
    )
    iod, errors, warnings = _parse(output)
    assert iod == "Comprehensive3DSR"
    assert errors == [
        "Missing attribute Type 1 Required Element=<ValueType> Module=<SRDocumentContent>"
    ]
    assert len(warnings) == 2


def test_iod_name_first() -> None:
    iod, errors, warnings = _parse("SecondaryCaptureImage\nWarning - something\n")
    assert (iod, errors, warnings) == ("SecondaryCaptureImage", [], ["something"])
