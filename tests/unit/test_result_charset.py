"""The Specific Character Set of a result object: the source's, unless the node's own words
(model labels, a radiologist's name, an administrator's note) need UTF-8."""

from __future__ import annotations

import datetime as dt
import warnings
from dataclasses import replace
from pathlib import Path

import pydicom
import pytest
from highdicom.valuerep import _check_specific_character_set
from pydicom.charset import python_encoding
from pydicom.multival import MultiValue

from acwi_node.inference.types import StudyAnalysis
from acwi_node.results.charset import UTF8, result_charset
from acwi_node.results.encoding import encode_part10
from acwi_node.results.heatmap import build_heatmap_sc
from acwi_node.results.sr import Verification, build_sr, build_verified_sr, summarise_sr
from tests.unit.test_result_headers import NO_ERRORS, result_objects, validation_errors
from tests.unit.test_sr import LABELS, make_study, needs_dciodvfy

JAPANESE = {"normal": "normal", "effusion": "胸水", "nodule": "Rundherd ø", "atelectasis": "無気肺"}


@pytest.mark.parametrize(
    ("source", "texts", "expected"),
    [
        (None, ["nodule", "cxr-triage"], None),  # ASCII keeps even the default repertoire
        ("ISO_IR 100", ["Rundherd ø", None, ""], "ISO_IR 100"),  # Latin-1 writes ø
        ("ISO_IR 100", ["無気肺"], UTF8),
        (None, ["Rundherd ø"], UTF8),  # the default repertoire is ASCII
        ("ISO_IR 6", ["Rundherd ø"], UTF8),  # pydicom encodes it as Latin-1: it is ASCII
        ("ISO 2022 IR 6", ["Größe"], UTF8),
        ("ISO_IR 144", ["Узел"], "ISO_IR 144"),  # Cyrillic in a Cyrillic study
        ("ISO_IR 144", ["Knötchen"], UTF8),
        (UTF8, ["無気肺", "Größe"], UTF8),
        ("GB18030", ["结节"], "GB18030"),
        ("ISO_IR 13", ["ｹｯｾﾂ"], UTF8),  # JIS X 0201: kept only for ASCII
        (["", "ISO 2022 IR 87"], ["結節"], UTF8),  # code extensions: only ASCII is safe
        # the empty first value (the default repertoire) as highdicom takes it
        (["", "ISO 2022 IR 87"], ["nodule"], ["ISO 2022 IR 6", "ISO 2022 IR 87"]),
        (" ISO_IR 100 ", ["Rundherd ø"], "ISO_IR 100"),
        # what highdicom refuses is UTF-8, whatever the words
        (["", "ISO 2022 IR 149"], ["nodule"], UTF8),  # highdicom 0.28 lacks IR 149
        ("ISO_IR 6", ["nodule"], UTF8),  # the default repertoire is no value
        ("UTF-8", ["nodule"], UTF8),
        ("ISO 2022 IR 100", ["nodule"], UTF8),  # code extensions, but one value
        (["ISO_IR 100", "ISO_IR 192"], ["nodule"], UTF8),  # several, without extensions
        (["", "ISO 2022 IR 58"], ["nodule"], UTF8),
        ("ISO_IR 203", ["nodule"], UTF8),  # highdicom takes it, pydicom has no codec
    ],
)
def test_the_source_character_set_is_kept_when_it_writes_every_word(
    source: str | list[str] | None, texts: list[str | None], expected: str | list[str] | None
) -> None:
    assert result_charset(source, texts) == expected


def test_an_unknown_source_character_set_is_utf8() -> None:
    """highdicom refuses it; pydicom decoded the source's text as best it could, and UTF-8
    writes that text whatever it is."""
    assert result_charset("ISO_IR 999", ["nodule"]) == UTF8
    assert result_charset("ISO_IR 999", ["ø"]) == UTF8


def test_a_multi_valued_source_character_set_is_kept_as_highdicom_takes_it() -> None:
    read = MultiValue(str, ["", "ISO 2022 IR 100"])
    assert result_charset(read, ["nodule"]) == ["ISO 2022 IR 6", "ISO 2022 IR 100"]
    assert result_charset(read, ["Größe"]) == UTF8


def _field_values() -> list[str | list[str]]:
    """Every value pydicom knows, alone, after an empty one and before a Kanji one, and some
    it does not."""
    known = sorted(python_encoding)
    return [
        *known,
        *(["", value] for value in known),
        *([value, "ISO 2022 IR 87"] for value in known),
        *(["ISO 2022 IR 6", value] for value in known),
        "UTF-8",
        "utf8",
        "iso_ir 100",
        "ISO-IR 100",
        "ISO IR 192",
        "ISO_IR 999",
        ["", ""],
        ["ISO_IR 100", "ISO_IR 100"],
    ]


@pytest.mark.parametrize("words", [["nodule"], ["Rundherd ø"], ["無気肺"]])
def test_every_result_character_set_is_one_highdicom_takes_and_pydicom_writes(
    words: list[str],
) -> None:
    for value in _field_values():
        charset = result_charset(value, words)
        if charset is None:
            continue
        values = [charset] if isinstance(charset, str) else list(charset)
        assert all(v in python_encoding for v in values), (value, charset)
        _check_specific_character_set(charset)  # raises where highdicom refuses it


#: Specific Character Sets found in the field that highdicom refused as they are, a patient
#: name each writes, and the set the results are written in.
FIELD_CHARSETS = [
    (
        ["", "ISO 2022 IR 87"],  # Japanese, PS3.5 Annex H
        "Yamada^Tarou=山田^太郎=やまだ^たろう",
        ["ISO 2022 IR 6", "ISO 2022 IR 87"],
    ),
    (["", "ISO 2022 IR 149"], "Hong^Gildong=洪^吉洞=홍^길동", UTF8),  # Korean, Annex I
    ("ISO_IR 6", "Doe^John", UTF8),
    ("UTF-8", "Müller^Jürgen", UTF8),
    ("ISO 2022 IR 100", "Müller^Jürgen", UTF8),
    (["ISO_IR 100", "ISO_IR 192"], "Doe^John", UTF8),
]


@pytest.mark.parametrize(("source_charset", "name", "expected"), FIELD_CHARSETS)
def test_results_of_a_source_in_a_character_set_highdicom_refuses_are_written_and_valid(
    source_charset: str | list[str], name: str, expected: str | list[str], tmp_path: Path
) -> None:
    """The whole study failed ('' is not a valid SpecificCharacterSetValues): now every
    result object is written, in the source's character set as highdicom takes it or in
    UTF-8, and reads back the patient's name as the node read it from the source."""

    def edit(ds: pydicom.Dataset) -> None:
        ds.SpecificCharacterSet = source_charset
        ds.PatientName = name

    results = result_objects(edit, tmp_path)
    source = results.pop("sources")
    assert str(source.PatientName) == name  # the source's text, decoded by pydicom
    for kind, ds in results.items():
        charset = ds.SpecificCharacterSet
        assert (charset if isinstance(charset, str) else list(charset)) == expected, kind
        assert str(ds.PatientName) == name, kind
    assert validation_errors(results) == NO_ERRORS


def _relabelled(analysis: StudyAnalysis) -> StudyAnalysis:
    def labels(values: dict[str, float]) -> dict[str, float]:
        return {JAPANESE[label]: p for label, p in values.items()}

    return replace(
        analysis,
        labels=[JAPANESE[label] for label in LABELS],
        images=[replace(i, probabilities=labels(i.probabilities)) for i in analysis.images],
        probabilities=labels(analysis.probabilities),
        predicted_label=JAPANESE[analysis.predicted_label],
        finding_labels=[JAPANESE[label] for label in analysis.finding_labels],
    )


def _read(ds: pydicom.Dataset) -> pydicom.Dataset:
    return pydicom.dcmread(pydicom.filebase.DicomBytesIO(encode_part10(ds)))


def test_an_sr_with_labels_outside_the_source_character_set_is_written_in_utf8() -> None:
    """A Latin-1 study, a model whose labels are Japanese: the SR is UTF-8 and reads back the
    labels and the patient's name as they are, not as question marks."""
    sources, analysis = make_study()
    sources[0].PatientName = "Müller^Jürgen"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sr = _read(build_sr(sources, _relabelled(analysis)))
    assert not [w for w in caught if "replacement characters" in str(w.message)]
    assert sr.SpecificCharacterSet == UTF8
    assert str(sr.PatientName) == "Müller^Jürgen"
    summary = summarise_sr(sr)
    assert set(summary["probabilities"]) == set(JAPANESE.values())
    assert summary["predicted_label"] == "胸水"


def test_an_sr_with_labels_the_source_writes_keeps_its_character_set() -> None:
    sources, analysis = make_study()
    assert build_sr(sources, analysis).SpecificCharacterSet == "ISO_IR 100"


def test_a_verified_sr_keeps_the_models_labels_when_the_radiologists_words_change_the_set() -> None:
    """The unverified SR is Latin-1 (its labels are); a radiologist's name in another script
    makes the verified one UTF-8, and the Latin-1 label it copies stays the same word."""
    sources, analysis = make_study()
    latin = {label: label for label in LABELS} | {"nodule": "Rundherd ø"}
    relabelled = replace(
        analysis,
        labels=[latin[label] for label in LABELS],
        images=[
            replace(i, probabilities={latin[k]: v for k, v in i.probabilities.items()})
            for i in analysis.images
        ],
        probabilities={latin[k]: v for k, v in analysis.probabilities.items()},
        finding_labels=[latin[label] for label in analysis.finding_labels],
    )
    unverified = _read(build_sr(sources, relabelled))
    assert unverified.SpecificCharacterSet == "ISO_IR 100"
    verdict = Verification(
        "Wáng^Fāng", "", "override", "Rundherd ø", "rib", dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    )
    verified = _read(build_verified_sr(unverified, sources, verdict))
    assert verified.SpecificCharacterSet == UTF8
    summary = summarise_sr(verified)
    assert "Rundherd ø" in summary["probabilities"]
    assert summary["verdict"]["label"] == "Rundherd ø"


def _heatmap(source: pydicom.Dataset, analysis: StudyAnalysis) -> pydicom.Dataset:
    image = analysis.images[0]
    return build_heatmap_sc(source, image.heatmap_array(), analysis, image, instance_number=1)


def test_heatmaps_write_the_predicted_label_in_utf8_when_needed() -> None:
    sources, analysis = make_study()
    relabelled = _relabelled(analysis)
    heatmap = _read(_heatmap(sources[0], relabelled))
    assert heatmap.SpecificCharacterSet == UTF8
    assert "胸水" in heatmap.ImageComments
    plain = _heatmap(sources[0], analysis)
    assert plain.SpecificCharacterSet == "ISO_IR 100"


@needs_dciodvfy
def test_utf8_results_are_valid() -> None:
    from acwi_node.results.validate import run_dciodvfy

    sources, analysis = make_study()
    relabelled = _relabelled(analysis)
    for ds in (
        build_sr(sources, relabelled),
        _heatmap(sources[0], relabelled),
    ):
        report = run_dciodvfy(ds)
        assert report.errors == [], report.output
