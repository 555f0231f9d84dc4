"""The CAM localisation loss and training with it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from acwi_node.inference.analyser import Analyser
from acwi_node.inference.manifest import load_manifest
from acwi_node.inference.preprocess import PreprocessSpec, resize
from models.data.dicom_dataset import (
    LabelledImage,
    boxes_mask,
    lesion_masks,
    parse_boxes,
    read_boxes,
    scan_folder,
)
from models.data.synth import read_mask, write_dataset
from models.networks.dianet import DIANet
from models.networks.localisation import cam_localisation_loss, peak_in_lesion
from models.train import config_from_dict, train
from tests.unit.test_train_heads import TINY

NORMAL = 0


def _one_hot_features(cells: list[tuple[int, int]], size: int = 4) -> torch.Tensor:
    """Features ``(B, 2, size, size)``: channel 0 is 5 at the image's cell, channel 1 is 1."""
    features = torch.zeros(len(cells), 2, size, size)
    features[:, 1] = 1.0
    for i, (y, x) in enumerate(cells):
        features[i, 0, y, x] = 5.0
    return features


def _mask(y: int, x: int, size: int = 16, cell: int = 4) -> torch.Tensor:
    """A lesion filling cell ``(y, x)`` of a ``size // cell`` grid, ``(1, 1, size, size)``."""
    mask = torch.zeros(1, 1, size, size)
    mask[..., y * cell : (y + 1) * cell, x * cell : (x + 1) * cell] = 1.0
    return mask


#: Class 1 reads channel 0 (the peak), the normal class channel 1 (flat).
WEIGHTS = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.5, 0.0]])


def test_the_loss_is_low_when_the_shown_map_peaks_in_the_lesion() -> None:
    targets = torch.tensor([1])
    on = cam_localisation_loss(WEIGHTS, _one_hot_features([(2, 1)]), targets, _mask(2, 1), NORMAL)
    off = cam_localisation_loss(WEIGHTS, _one_hot_features([(0, 3)]), targets, _mask(2, 1), NORMAL)
    assert float(on) < float(off)
    # a map peaking in the lesion's cell: the cross-entropy of a softmax of (5, 0, ..., 0)
    expected = -torch.log_softmax(torch.tensor([5.0] + [0.0] * 15), 0)[0]
    assert float(on) == pytest.approx(float(expected))
    # a sharper softmax (lower temperature) rewards the right peak more
    sharp = cam_localisation_loss(
        WEIGHTS, _one_hot_features([(2, 1)]), targets, _mask(2, 1), NORMAL, temperature=0.5
    )
    assert float(sharp) < float(on)
    with pytest.raises(ValueError, match="temperature"):
        cam_localisation_loss(
            WEIGHTS, _one_hot_features([(2, 1)]), targets, _mask(2, 1), NORMAL, temperature=0
        )


def test_the_outside_term_is_the_share_of_the_map_outside_the_lesion() -> None:
    """A map highest on the lesion but warm everywhere reads, divided by its peak, as hot
    everywhere: the outside term is the share of its positive part outside the lesion."""
    broad = _one_hot_features([(2, 1)])
    broad[:, 0] += 4.0
    broad[:, 0, 2, 1] -= 4.0  # shown map (channel 0 - channel 1): 4 on the lesion, 3 elsewhere
    targets = torch.tensor([1])
    plain = cam_localisation_loss(WEIGHTS, broad, targets, _mask(2, 1), NORMAL)
    both = cam_localisation_loss(WEIGHTS, broad, targets, _mask(2, 1), NORMAL, outside_weight=2)
    assert float(both - plain) == pytest.approx(2 * 45 / 49)
    sharp = _one_hot_features([(2, 1)])
    assert float(
        cam_localisation_loss(WEIGHTS, sharp, targets, _mask(2, 1), NORMAL, outside_weight=2)
        - cam_localisation_loss(WEIGHTS, sharp, targets, _mask(2, 1), NORMAL)
    ) == pytest.approx(0.0)


def test_the_map_is_the_finding_class_against_the_normal_class() -> None:
    """The supervised map is cam_k - cam_ref, what the node draws: a feature both classes
    read alike does not move it."""
    features = _one_hot_features([(2, 1)])
    shared = WEIGHTS.clone()
    shared[NORMAL, 0] = 1.0  # the normal class reads the peak too: the shown map is flat
    flat = cam_localisation_loss(shared, features, torch.tensor([1]), _mask(2, 1), NORMAL)
    assert float(flat) == pytest.approx(float(torch.log(torch.tensor(16.0))), rel=1e-5)


def test_normal_images_and_empty_masks_add_nothing_and_gradients_reach_the_map() -> None:
    features = _one_hot_features([(2, 1), (0, 0), (1, 1)]).requires_grad_()
    weights = WEIGHTS.clone().requires_grad_()
    masks = torch.cat([_mask(2, 1), _mask(0, 0), torch.zeros(1, 1, 16, 16)])
    targets = torch.tensor([1, NORMAL, 2])  # a lesion; a normal image; a lesion shifted out
    alone = cam_localisation_loss(WEIGHTS, features[:1].detach(), targets[:1], masks[:1], NORMAL)
    loss = cam_localisation_loss(weights, features, targets, masks, NORMAL)
    assert float(loss.detach()) == pytest.approx(float(alone))
    loss.backward()
    assert features.grad is not None and weights.grad is not None
    assert features.grad[1:].abs().sum() == 0 and features.grad[0].abs().sum() > 0
    none = cam_localisation_loss(weights, features[1:], targets[1:], masks[1:], NORMAL)
    assert float(none.detach()) == 0.0 and none.requires_grad
    found = peak_in_lesion(
        WEIGHTS, _one_hot_features([(2, 1), (0, 3)]), torch.tensor([1, 2]),
        torch.cat([_mask(2, 1), _mask(2, 1)]), NORMAL,
    )  # fmt: skip
    assert found.tolist() == [True, False]


def test_a_tiny_run_with_the_loss_records_it_and_keeps_the_network_as_it_is(
    tmp_path: Path,
) -> None:
    config = config_from_dict({**TINY, "localisation": {"cam_weight": 1.0}})
    lines: list[str] = []
    result = train(config, tmp_path / "m", log=lines.append)
    assert all(r["loc"] > 0 for r in result.history)
    assert any(" loc " in line for line in lines)
    pointing = load_manifest(result.manifest_path).training.val_cam_pointing
    assert pointing is not None and 0.0 <= pointing <= 1.0
    weights = torch.load(result.weights_path, weights_only=True)
    assert set(weights) == set(DIANet(config.architecture()).state_dict())
    Analyser.load(result.manifest_path, mc_samples=2)
    # Off by default: no term, and no figure in the manifest.
    plain = train(config_from_dict(TINY), tmp_path / "plain", log=lambda _: None)
    assert all(r["loc"] == 0 for r in plain.history)
    manifest = json.loads(plain.manifest_path.read_text())
    assert manifest["training"].get("val_cam_pointing") is None


def _folder(root: Path, *, boxes: bool) -> Path:
    """A small labelled synthetic folder; without ``boxes`` its labels.csv has no box column
    and the side-cars are gone, as in a folder of real images labelled per study."""
    write_dataset(root, 12, seed=5, sites=[0, 1], size=64)
    if not boxes:
        with (root / "labels.csv").open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        with (root / "labels.csv").open("w", newline="") as fh:
            fields = [f for f in rows[0] if f != "box"]
            writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        for side_car in root.rglob("*.truth.json"):
            side_car.unlink()
    return root


@pytest.mark.parametrize("boxes", [True, False])
def test_a_dicom_folder_trains_the_heatmap_on_its_lesion_boxes(tmp_path: Path, boxes: bool) -> None:
    data = _folder(tmp_path / "data", boxes=boxes)
    config = config_from_dict(
        {**TINY, "train": {**TINY["train"], "epochs": 1}, "localisation": {"cam_weight": 1.0}}
    )
    lines: list[str] = []
    result = train(config, tmp_path / "m", data_dir=data, log=lines.append)
    if boxes:
        assert any("lesion boxes for" in line for line in lines), lines
        assert all(r["loc"] > 0 for r in result.history)
        assert load_manifest(result.manifest_path).training.val_cam_pointing is not None
    else:
        assert any("no lesion boxes" in line for line in lines), lines
        assert all(r["loc"] == 0 for r in result.history)


def test_lesion_masks_follow_the_box_through_the_preprocessing(tmp_path: Path) -> None:
    data = _folder(tmp_path / "data", boxes=True)
    items = scan_folder(data)
    boxes = read_boxes(data, items)
    spec = PreprocessSpec(64, 0.5, 99.5)
    masks = lesion_masks(items, boxes, spec)
    assert masks.shape == (len(items), 64, 64) and set(np.unique(masks)) <= {0.0, 1.0}
    checked = 0
    for item, mask in zip(items, masks, strict=True):
        truth = read_mask(item.path.with_suffix(".truth.json"))
        if item.name not in boxes:
            assert item.label == "normal" and not mask.any()
            continue
        # the phantom's own lesion pixels, resized as the image is, lie in the box's mask
        assert truth is not None
        lesion = resize(truth.astype(np.float32), 64) > 0.5
        assert lesion.any() and (mask[lesion] == 1).mean() >= 0.9
        checked += 1
    assert checked > 0
    # A non-square image: the box in its right half stays in the input's right half.
    wide = tmp_path / "wide.dcm"
    ds = pydicom.dcmread(items[0].path)
    ds.Rows, ds.Columns = 100, 200
    ds.save_as(wide)
    item = LabelledImage(wide, "1.2.3", "1.2.3.4", "nodule", None)
    (right,) = lesion_masks([item], {item.name: ((100, 0, 199, 99),)}, spec)
    assert right[:, 33:].all() and not right[:, :31].any()


def test_parse_boxes_reads_one_or_several_boxes() -> None:
    assert parse_boxes("32 64 63 95") == ((32, 64, 63, 95),)
    assert parse_boxes("32 64 63 95; 10 10 20 20") == ((32, 64, 63, 95), (10, 10, 20, 20))
    assert parse_boxes(" 32 64 63 95 ;10 10 20 20;") == ((32, 64, 63, 95), (10, 10, 20, 20))
    assert parse_boxes("32 64 63 95;10 10 20 20 ; ") == ((32, 64, 63, 95), (10, 10, 20, 20))
    assert parse_boxes("32.0 64.7 63 95.0") == ((32, 64, 63, 95),)
    assert parse_boxes("5 5 5 5") == ((5, 5, 5, 5),)  # one pixel
    assert parse_boxes("") == parse_boxes("   ") == parse_boxes(None) == ()


@pytest.mark.parametrize(
    "text",
    [
        "32 64 63",
        "32 64 63 95 7",
        "32 64 63 95, 10 10 20 20",
        "32 64 x 95",
        "32 64 nan 95",
        "63 64 32 95",
        "32 95 63 64",
        "32 64 63 95;; 10 10 20 20",
        "; 32 64 63 95",
        ";",
    ],
)
def test_parse_boxes_refuses_a_malformed_box(text: str) -> None:
    with pytest.raises(ValueError, match="box") as refused:
        parse_boxes(text)
    assert repr(text) in str(refused.value)


def _set_box(root: Path, row: int, text: str) -> str:
    """Write ``text`` into ``labels.csv``'s ``box`` cell of data row ``row`` (0-based; CSV line
    ``row + 2``); the row's SOP Instance UID."""
    with (root / "labels.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    rows[row]["box"] = text
    with (root / "labels.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows[row]["sop_instance_uid"]


def test_read_boxes_reads_several_boxes_of_a_labels_csv_row(tmp_path: Path) -> None:
    data = _folder(tmp_path / "data", boxes=True)
    sop = _set_box(data, 0, "0 0 15 15; 48 48 63 63")
    items = scan_folder(data)
    boxes = read_boxes(data, items)
    assert boxes[sop] == ((0, 0, 15, 15), (48, 48, 63, 63))
    # the other rows keep their single box; normal images have none
    assert all(len(found) == 1 for name, found in boxes.items() if name != sop)
    labelled = {item.name: item.label for item in items}
    assert {name for name in labelled if labelled[name] != "normal"} | {sop} == set(boxes)


def test_read_boxes_names_the_row_of_a_malformed_box(tmp_path: Path) -> None:
    data = _folder(tmp_path / "data", boxes=True)
    sop = _set_box(data, 3, "0 0 15 15; 48 48 40 63")
    items = scan_folder(data)
    with pytest.raises(ValueError, match="line 5") as refused:
        read_boxes(data, items)
    assert sop in str(refused.value) and "48 48 40 63" in str(refused.value)


def test_read_boxes_reads_side_cars_with_one_or_several_boxes(tmp_path: Path) -> None:
    data = _folder(tmp_path / "data", boxes=False)
    items = scan_folder(data)
    first, second, third = items[:3]
    first.path.with_suffix(".truth.json").write_text(
        json.dumps({"box": None, "boxes": [[0, 0, 15, 15], [48, 48, 63, 63]]})
    )
    second.path.with_suffix(".truth.json").write_text(json.dumps({"box": [1, 2, 3, 4]}))
    assert read_boxes(data, items) == {
        first.name: ((0, 0, 15, 15), (48, 48, 63, 63)),
        second.name: ((1, 2, 3, 4),),
    }
    third.path.with_suffix(".truth.json").write_text(json.dumps({"boxes": [[0, 0, 15]]}))
    with pytest.raises(ValueError, match="4 numbers") as refused:
        read_boxes(data, items)
    assert third.path.with_suffix(".truth.json").name in str(refused.value)


def test_lesion_masks_fill_every_box_of_an_image(tmp_path: Path) -> None:
    """Two lesions in opposite corners: the mask covers both, and not the image between."""
    data = _folder(tmp_path / "data", boxes=True)
    sop = _set_box(data, 0, "0 0 15 15; 48 48 63 63")
    items = scan_folder(data)
    boxes = read_boxes(data, items)
    (item,) = [item for item in items if item.name == sop]
    spec = PreprocessSpec(32, 0.5, 99.5)
    (mask,) = lesion_masks([item], boxes, spec)
    assert mask[:8, :8].all() and mask[24:, 24:].all()
    assert mask.sum() == 2 * 8 * 8
    assert not mask[8:24, :].any() and not mask[:8, 8:].any() and not mask[24:, :24].any()
    assert np.array_equal(
        mask, resize(boxes_mask((64, 64), boxes[sop]).astype(np.float32), 32) > 0.5
    )
    # each box alone covers only its own corner
    (top_left,) = lesion_masks([item], {item.name: boxes[sop][:1]}, spec)
    assert top_left[:8, :8].all() and not top_left[24:, 24:].any()
