"""The SR's AI regions: per image the model reports a finding on, a TID 1410 planar ROI whose
closed polyline is the box around the heatmap's hot region that holds its peak, in the source
image's pixels (and frame), which viewers draw on the image."""

from __future__ import annotations

import collections
import io
from dataclasses import replace
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom import Dataset

from acwi_node.inference.resample import upsample_cam
from acwi_node.inference.types import DeferredHeatmap, ImageResult, StudyAnalysis
from acwi_node.results.content_templates import forget_templates
from acwi_node.results.encoding import encode_part10
from acwi_node.results.heatmap_region import heatmap_region
from acwi_node.results.sr import (
    METHOD_HEATMAP_REGION,
    LesionRegion,
    Verification,
    build_sr,
    build_verified_sr,
    finding_code,
    summarise_sr,
)
from models.data.synth import write_enhanced_ct
from tests.support.dciodvfy import dciodvfy_output, require_dciodvfy
from tests.support.dcmtk import dsrdump_clean, require_dcmtk_tool
from tests.unit.test_sr import LABELS, MODEL, make_study, verification
from tests.unit.test_sr_image_groups import _from_template, _same_times

FRACTION = 0.5


def _saved(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _reread(ds: Dataset) -> Dataset:
    return pydicom.dcmread(io.BytesIO(encode_part10(ds)))


def _roi_groups(ds: Dataset) -> list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations]:
    parsed = hd.sr.Comprehensive3DSR.from_dataset(_reread(ds))
    content: Any = parsed.content  # a MeasurementReport, typed as its base class
    return list(content.get_planar_roi_measurement_groups())


def _selected_from(region: Dataset) -> Dataset:
    """The image (and frame) reference of a SCOORD item's SELECTED FROM child."""
    (image,) = region.ContentSequence
    assert image.RelationshipType == "SELECTED FROM"
    return image.ReferencedSOPSequence[0]


def _study() -> tuple[list[Dataset], StudyAnalysis]:
    """make_study's two analysed images, both most probably "effusion" (a finding), each with
    a heatmap hot on rows 10-29 and columns 20-39; the second's a weaker, separate spot too."""
    sources, analysis = make_study()
    heat = np.asarray(analysis.images[1].heatmap, dtype=np.float32).copy()
    heat[50:60, 5:15] = 0.4  # below half the peak: not in the region
    heat[0:5, 100:110] = 0.9  # hot, but not connected to the peak
    analysis.images[1].heatmap = heat
    return sources, analysis


def test_each_image_with_a_finding_has_a_region_viewers_draw() -> None:
    sources, analysis = _study()
    document = build_sr(sources, analysis, region_fraction=FRACTION)
    groups = _roi_groups(document)
    assert len(groups) == 2
    for number, (group, image) in enumerate(zip(groups, analysis.images, strict=True), start=1):
        region = group.roi
        assert region is not None and region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        # columns 20-39 and rows 10-29 covered: pixel edges 20..40 and 10..30, closed
        assert region.value.tolist() == [[20, 10], [40, 10], [40, 30], [20, 30], [20, 10]]
        ref = _selected_from(region)
        assert ref.ReferencedSOPInstanceUID == image.sop_instance_uid
        assert ref.ReferencedSOPClassUID == image.sop_class_uid
        assert "ReferencedFrameNumber" not in ref
        assert group.finding_type == finding_code("effusion")
        assert group.tracking_identifier == f"AI region {number}: effusion"
        method = [
            item
            for item in group[0].ContentSequence
            if item.ConceptNameCodeSequence[0].CodeValue == "370129005"
        ]
        assert hd.sr.CodedConcept.from_dataset(method[0].ConceptCodeSequence[0]) == (
            METHOD_HEATMAP_REGION
        )
        values = {m.name.meaning: m.value for m in group.get_measurements()}
        assert values["Probability"] == pytest.approx(image.probabilities["effusion"])
        assert values["Uncertainty score"] == pytest.approx(image.uncertainty.score)
        assert values["Heatmap region threshold"] == pytest.approx(FRACTION)
    # the image groups and the study's numbers are what they were
    summary = summarise_sr(document)
    plain = summarise_sr(build_sr(sources, analysis))
    assert {k: v for k, v in summary.items() if k != "ai_regions"} == {
        k: v for k, v in plain.items() if k != "ai_regions"
    }
    assert plain["ai_regions"] == []
    assert summary["ai_regions"] == [
        {"image": image.sop_instance_uid, "box": [20, 10, 39, 29], "label": "effusion"}
        for image in analysis.images
    ]


def test_no_region_for_an_image_without_a_finding_or_a_peak() -> None:
    sources, analysis = _study()
    first, second = analysis.images
    normal = dict.fromkeys(LABELS, 0.1) | {"normal": 0.7}
    images = [
        replace(first, probabilities=normal),  # most probably normal
        replace(second, heatmap=np.zeros_like(np.asarray(second.heatmap))),  # nothing hot
    ]
    analysis = replace(analysis, images=images)
    assert _roi_groups(build_sr(sources, analysis, region_fraction=FRACTION)) == []
    # a model whose manifest lists no finding labels reports no finding
    sources, analysis = _study()
    analysis = replace(analysis, finding_labels=[])
    assert _roi_groups(build_sr(sources, analysis, region_fraction=FRACTION)) == []


def test_regions_off_writes_none() -> None:
    sources, analysis = _study()
    assert _roi_groups(build_sr(sources, analysis)) == []


def test_template_groups_and_highdicoms_make_the_same_document() -> None:
    sources, analysis = _study()
    document = build_sr(sources, analysis, region_fraction=FRACTION)
    assert _from_template(document)
    reference = build_sr(sources, analysis, region_fraction=FRACTION, check_all=True)
    _same_times(document, reference)
    assert _saved(document) == _saved(reference)


def test_a_non_square_image_region_is_in_its_own_pixels() -> None:
    """The network's map is square (16 x 16 cells); the source 200 rows by 320 columns: the
    region is where the hot cell lies in the source's pixels, not the network input's."""
    sources, analysis = _study()
    source = sources[0]
    source.Rows, source.Columns = 200, 320
    source.PixelData = np.zeros((200, 320), dtype=np.uint16).tobytes()
    cam = np.zeros((16, 16), dtype=np.float32)
    cam[4, 10] = 1.0  # the cell of rows 50-62.5 and columns 200-220 of the source
    image = replace(analysis.images[0], heatmap=DeferredHeatmap(cam, (200, 320), upsample_cam))
    analysis = replace(analysis, images=[image, analysis.images[1]])
    sources[1].Rows, sources[1].Columns = 64, 64  # the second's 64 x 64 map does not fit it
    groups = _roi_groups(build_sr(sources, analysis, region_fraction=FRACTION))
    assert len(groups) == 1
    roi = groups[0].roi
    assert roi is not None
    corners = roi.value
    x0, y0 = corners.min(axis=0)
    x1, y1 = corners.max(axis=0)
    # bilinear spread of one cell over about two cells, centred on the cell's centre
    assert (x0 + x1) / 2 == pytest.approx(210, abs=1) and (y0 + y1) / 2 == pytest.approx(56, abs=1)
    # at half the peak, the bilinear spread is the cell itself (within a pixel or two)
    assert abs(x0 - 200) <= 2 and abs(x1 - 220) <= 2
    assert abs(y0 - 50) <= 2 and abs(y1 - 62.5) <= 2


def test_a_frame_of_a_multi_frame_image_is_referenced_by_its_number(tmp_path: Path) -> None:
    image = pydicom.dcmread(write_enhanced_ct(tmp_path / "mf", slices=3, size=64))
    sources, analysis = _study()
    heat = np.zeros((64, 64), dtype=np.float32)
    heat[10:30, 20:40] = 1.0
    template = replace(analysis.images[0], heatmap=heat)
    results = [
        replace(
            template,
            sop_instance_uid=str(image.SOPInstanceUID),
            sop_class_uid=str(image.SOPClassUID),
            series_instance_uid=str(image.SeriesInstanceUID),
            frame_number=n,
            probabilities=template.probabilities
            if n == 2
            else dict.fromkeys(LABELS, 0.1) | {"normal": 0.7},
        )
        for n in (1, 2, 3)
    ]
    analysis = replace(analysis, images=results)
    document = build_sr([image], analysis, region_fraction=FRACTION)
    (group,) = _roi_groups(document)
    assert group.roi is not None
    ref = _selected_from(group.roi)
    assert ref.ReferencedSOPInstanceUID == image.SOPInstanceUID
    assert int(ref.ReferencedFrameNumber) == 2
    assert group.tracking_identifier == "AI region 2: effusion"
    assert summarise_sr(document)["ai_regions"] == [
        {"image": f"{image.SOPInstanceUID} frame 2", "box": [20, 10, 39, 29], "label": "effusion"}
    ]
    reference = build_sr([image], analysis, region_fraction=FRACTION, check_all=True)
    _same_times(document, reference)
    assert _saved(document) == _saved(reference)


def _verdict(sources: list[Dataset]) -> Verification:
    box = LesionRegion(str(sources[0].SOPInstanceUID), None, (22, 12, 35, 25))
    return verification(regions=(box,))


def test_the_verified_sr_keeps_the_ai_regions_apart_from_the_radiologists_boxes() -> None:
    sources, analysis = _study()
    unverified = _reread(build_sr(sources, analysis, region_fraction=FRACTION))
    verified = build_verified_sr(unverified, sources, _verdict(sources))
    summary = summarise_sr(verified)
    assert summary["verdict"]["regions"] == [
        {"image": str(sources[0].SOPInstanceUID), "box": [22, 12, 35, 25]}
    ]
    assert summary["ai_regions"] == summarise_sr(unverified)["ai_regions"]
    assert len(summary["ai_regions"]) == 2
    groups = _roi_groups(verified)
    ids = [group.tracking_identifier for group in groups]
    assert ids == ["AI region 1: effusion", "AI region 2: effusion", "Radiologist lesion box 1"]
    # the radiologist's box names no algorithm (111001) and no method (370129005)
    concepts = {item.ConceptNameCodeSequence[0].CodeValue for item in groups[2][0].ContentSequence}
    assert concepts.isdisjoint({"111001", "370129005"})
    assert {"111001", "370129005"} <= {
        item.ConceptNameCodeSequence[0].CodeValue for item in groups[0][0].ContentSequence
    }


def _complaints(output: str) -> set[str]:
    """The kinds of errors and warnings (the local coding scheme's warning is one, for each
    of its codes)."""
    return {line for line in output.splitlines() if line.startswith(("Error", "Warning"))}


def test_dciodvfy_finds_nothing_new_in_an_sr_with_regions(tmp_path: Path) -> None:
    require_dciodvfy()
    sources, analysis = _study()
    found: dict[str, set[str]] = {}
    for name, fraction in (("plain", None), ("regions", FRACTION)):
        sr = build_sr(sources, analysis, region_fraction=fraction)
        verified = build_verified_sr(_reread(sr), sources, _verdict(sources))
        for kind, document in (("", sr), (" verified", verified)):
            path = tmp_path / f"{name}{kind}.dcm"
            path.write_bytes(encode_part10(document))
            found[name + kind] = _complaints(dciodvfy_output(path))
    for kind in ("regions", "regions verified"):
        assert not any(line.startswith("Error") for line in found[kind]), found[kind]
    assert found["regions"] <= found["plain"], found["regions"] - found["plain"]
    assert found["regions verified"] <= found["plain verified"]


def test_dcmtk_reads_the_sr_with_regions_and_its_verified_successor(tmp_path: Path) -> None:
    require_dcmtk_tool("dsrdump")  # before building anything: skipped without DCMTK
    sources, analysis = _study()
    sr = build_sr(sources, analysis, region_fraction=FRACTION)
    verified = build_verified_sr(_reread(sr), sources, _verdict(sources))
    for name, document in (("sr", sr), ("verified", verified)):
        path = tmp_path / f"{name}.dcm"
        path.write_bytes(encode_part10(document))
        printed = dsrdump_clean(path)
        assert "AI region 1: effusion" in printed and "SCOORD" in printed


def _brute_force(heat: np.ndarray, fraction: float) -> tuple[tuple[int, int, int, int], int]:
    """The region by a flood fill from the peak, pixel by pixel (4-connected)."""
    py, px = np.unravel_index(int(np.argmax(heat)), heat.shape)
    hot = heat >= np.float32(fraction * heat[py, px])
    seen = np.zeros_like(hot)
    seen[py, px] = True
    queue = collections.deque([(int(py), int(px))])
    while queue:
        y, x = queue.popleft()
        for a, b in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
            if 0 <= a < heat.shape[0] and 0 <= b < heat.shape[1] and hot[a, b] and not seen[a, b]:
                seen[a, b] = True
                queue.append((a, b))
    ys, xs = np.nonzero(seen)
    return (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())), int(seen.sum())


def test_heatmap_region_is_the_connected_hot_region_of_the_peak() -> None:
    rng = np.random.default_rng(3)
    for _ in range(150):
        if rng.random() < 0.3:
            shape = (int(rng.integers(1, 30)), int(rng.integers(1, 30)))
            heat = rng.random(shape).astype(np.float32)
        else:
            cam = rng.normal(size=(int(rng.integers(2, 9)), int(rng.integers(2, 9))))
            size = (int(rng.integers(5, 60)), int(rng.integers(5, 60)))
            heat = upsample_cam(cam.astype(np.float32), size)
        if float(heat.max()) <= 0.0:
            continue
        fraction = float(rng.choice([0.2, 0.5, 0.8, 1.0]))
        region = heatmap_region(heat, fraction)
        assert region is not None
        box, pixels = _brute_force(heat, fraction)
        assert (region.box, region.pixels) == (box, pixels)
        x0, y0, x1, y1 = region.box
        assert x0 <= region.peak[0] <= x1 and y0 <= region.peak[1] <= y1


def test_heatmap_region_of_nothing() -> None:
    assert heatmap_region(np.zeros((8, 8), dtype=np.float32), 0.5) is None
    assert heatmap_region(np.full((4, 4), np.nan, dtype=np.float32), 0.5) is None
    with pytest.raises(ValueError, match="fraction"):
        heatmap_region(np.ones((4, 4), dtype=np.float32), 0.0)


def test_image_result_fixture_is_unchanged() -> None:
    """make_study's images are the ones described above (the tests rely on it)."""
    _, analysis = make_study()
    image: ImageResult = analysis.images[0]
    heat = np.asarray(image.heatmap)
    assert heat[10:30, 20:40].min() == 1.0 and heat.sum() == 400
    assert analysis.model == MODEL


def test_a_later_studys_regions_are_rendered_from_the_kept_template(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """highdicom builds one stand-in region per template key; every region of the next
    study (the same model, label and SOP Class) is rendered from it, the bytes highdicom's."""
    from acwi_node.results import sr as sr_module

    forget_templates()
    built: list[str] = []
    original = sr_module._ai_region_group

    def counting(spec: Any, *args: Any) -> Any:
        built.append(spec.image.sop_instance_uid)
        return original(spec, *args)

    monkeypatch.setattr(sr_module, "_ai_region_group", counting)
    sources, analysis = _study()
    build_sr(sources, analysis, region_fraction=FRACTION)
    assert len(built) == 1  # the stand-in's, for the template both regions are rendered from
    built.clear()
    sources, analysis = _study()
    document = build_sr(sources, analysis, region_fraction=FRACTION)
    assert built == []
    reference = build_sr(sources, analysis, region_fraction=FRACTION, check_all=True)
    assert len(built) == 2
    _same_times(document, reference)
    assert _saved(document) == _saved(reference)
    # another threshold is another template
    built.clear()
    build_sr(sources, analysis, region_fraction=0.6)
    assert len(built) == 1
