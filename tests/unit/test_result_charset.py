"""The Specific Character Set of a result object: the source's, unless the node's own words
(model labels, a radiologist's name, an administrator's note) need UTF-8."""

from __future__ import annotations

import datetime as dt
import warnings
from dataclasses import replace

import pydicom
import pytest
from pydicom.multival import MultiValue

from acwi_node.inference.types import StudyAnalysis
from acwi_node.results.charset import UTF8, result_charset
from acwi_node.results.encoding import encode_part10
from acwi_node.results.heatmap import build_heatmap_sc
from acwi_node.results.sr import Verification, build_sr, build_verified_sr, summarise_sr
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
        (["", "ISO 2022 IR 87"], ["nodule"], ["", "ISO 2022 IR 87"]),
    ],
)
def test_the_source_character_set_is_kept_when_it_writes_every_word(
    source: str | list[str] | None, texts: list[str | None], expected: str | list[str] | None
) -> None:
    assert result_charset(source, texts) == expected


def test_an_unknown_source_character_set_keeps_only_ascii() -> None:
    assert result_charset("ISO_IR 999", ["nodule"]) == "ISO_IR 999"
    with pytest.warns(UserWarning, match="Unknown encoding"):
        assert result_charset("ISO_IR 999", ["ø"]) == UTF8


def test_a_multi_valued_source_character_set_is_kept_as_read() -> None:
    read = MultiValue(str, ["", "ISO 2022 IR 100"])
    assert result_charset(read, ["nodule"]) is read
    assert result_charset(read, ["Größe"]) == UTF8


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
