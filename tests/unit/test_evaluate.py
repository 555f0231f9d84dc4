"""Evaluation metrics and the ``acwi-models evaluate --out`` report."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from acwi_node.config import WorkerSettings
from acwi_node.results import heatmap_region as node_region
from models.cli import main as cli_main
from models.data.dicom_dataset import LabelledImage, box_mask, boxes_mask
from models.data.synth import write_dataset
from models.evaluate import (
    HEADLINE_KEYS,
    SR_REGION_FRACTION,
    EvalImage,
    auc,
    auto_accept_accuracy,
    bootstrap_ci,
    centre_value,
    curve_area,
    deletion_images,
    evaluate_model,
    f1_macro,
    half_cell,
    heatmap_iou,
    localisation_scores,
    macro_auc,
    pointing_hit,
    reliability,
    roc_auc,
    roc_curve,
    salience_order,
    select_costly,
    shift_array,
    sr_box_scores,
    sr_box_summary,
    ssim,
    training_sites,
    triage_curve,
    uncertainty_error_auroc,
    with_pixels,
)
from models.train import config_from_dict, train

TINY = {
    "data": {"train_images": 24, "val_images": 12, "workers": 1},
    "preprocessing": {"input_size": 64},
    "model": {
        "widths": [8, 8, 16, 16, 32],
        "fpn_channels": 16,
        "feature_channels": 16,
        "latent_dim": 8,
    },
    "train": {"epochs": 1, "batch_size": 8, "threads": 1},
    "calibration": {"mc_samples": 4},
    "continual": {"fisher_images": 0},
}


def test_roc_auc_matches_the_rank_statistic() -> None:
    assert roc_auc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])) == 1.0
    assert roc_auc(np.array([0.9, 0.8, 0.2, 0.1]), np.array([0, 0, 1, 1])) == 0.0
    assert roc_auc(np.array([0.5, 0.5, 0.5, 0.5]), np.array([0, 1, 0, 1])) == 0.5
    assert roc_auc(np.array([0.1, 0.2]), np.array([1, 1])) is None
    rng = np.random.default_rng(0)
    scores = np.round(rng.normal(size=300), 1)  # with ties
    positive = rng.random(300) < 0.3 + 0.4 * (scores > 0)
    pos, neg = scores[positive], scores[~positive]
    greater = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    fpr, tpr = roc_curve(scores, positive)
    assert fpr[0] == tpr[0] == 0.0 and fpr[-1] == tpr[-1] == 1.0
    assert auc(fpr, tpr) == pytest.approx(greater, abs=1e-12)


def test_reliability_and_ece() -> None:
    truth = np.array([0, 1, 2, 0])
    perfect = np.eye(3)[truth]
    assert reliability(perfect, truth).ece == pytest.approx(0.0)
    overconfident = np.array([[0.9, 0.05, 0.05]] * 4)  # 90 % confident, 50 % right
    rel = reliability(overconfident, truth)
    assert rel.ece == pytest.approx(0.4)
    assert sum(rel.bin_count) == 4


def test_triage_curve_rises_when_uncertain_cases_are_wrong() -> None:
    score = np.array([0.1, 0.2, 0.3, 0.9])
    correct = np.array([True, True, True, False])
    rates, accuracy = triage_curve(score, correct, points=5)
    assert rates.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert accuracy[0] == pytest.approx(0.75) and accuracy[1] == pytest.approx(1.0)


def test_pointing_game() -> None:
    heatmap = np.zeros((32, 32), dtype=np.float32)
    heatmap[10, 20] = 1.0  # row 10, column 20
    assert pointing_hit(heatmap, (18, 8, 22, 12))
    assert not pointing_hit(heatmap, (8, 18, 12, 22))  # x and y swapped
    assert not pointing_hit(heatmap, (23, 8, 25, 12))
    assert pointing_hit(heatmap, (23, 8, 25, 12), tolerance=3)
    assert not pointing_hit(np.zeros((8, 8)), (0, 0, 7, 7))
    assert centre_value(heatmap, (18, 8, 22, 12)) == 1.0


def test_tolerant_pointing_is_half_a_cell_along_each_axis() -> None:
    """A 200 x 100 image from a 16 x 16 map: its cells are 12.5 px tall and 6.25 px wide, so
    the tolerant hit grows a box by 6.25 px along the rows but only 3.125 px along the
    columns; a peak 4 px beside the box is no hit, one 4 px below it is."""
    assert half_cell((200, 100), 16) == (6.25, 3.125)
    box = (40, 80, 50, 90)
    beside = np.zeros((200, 100), dtype=np.float32)
    beside[85, 54] = 1.0
    below = np.zeros((200, 100), dtype=np.float32)
    below[94, 45] = 1.0
    tolerance = half_cell(beside.shape, 16)
    assert localisation_scores(beside, (box,), tolerance)["hit_tolerant"] is False
    assert localisation_scores(below, (box,), tolerance)["hit_tolerant"] is True
    assert pointing_hit(beside, box, (0.0, 4.0)) and not pointing_hit(beside, box, (4.0, 0.0))


def test_localisation_scores_of_an_image_with_two_boxes() -> None:
    """A peak in either box is a hit; the centre value is the best box's; the IoU is against
    the union of the boxes."""
    heatmap = np.zeros((32, 32), dtype=np.float32)
    heatmap[0:4, 0:4] = 0.8  # the first lesion: warm
    heatmap[8:12, 16:20] = 1.0  # the second: the peak (argmax at row 8, column 16)
    first, second = (0, 0, 3, 3), (16, 8, 19, 11)
    both = localisation_scores(heatmap, (first, second), tolerance=2)
    assert both == {"hit": True, "hit_tolerant": True, "centre_value": 1.0, "iou": 1.0}
    assert localisation_scores(heatmap, (second, first), tolerance=2) == both
    alone = localisation_scores(heatmap, (first,), tolerance=2)
    assert alone["hit"] is False and alone["hit_tolerant"] is False
    assert alone["centre_value"] == pytest.approx(0.8)
    assert alone["iou"] == pytest.approx(0.5)  # the hot region is both squares
    assert heatmap_iou(heatmap, boxes_mask((32, 32), (first, second))) == 1.0
    # a box two columns right of the peak: only the tolerant game counts it
    near = localisation_scores(heatmap, (first, (18, 8, 20, 11)), tolerance=2)
    assert near["hit"] is False and near["hit_tolerant"] is True
    with pytest.raises(ValueError, match="at least one"):
        localisation_scores(heatmap, ())


def test_sr_box_scores_against_the_lesion_boxes() -> None:
    """The SR's box is the node's region around the peak (not every hot pixel), scored against
    the best-matching lesion box, in the image's pixels."""
    heatmap = np.zeros((32, 32), dtype=np.float32)
    heatmap[6:14, 6:14] = 0.6  # the region holding the peak: columns and rows 6-13
    heatmap[8, 8] = 1.0  # the peak
    heatmap[22:26, 22:26] = 0.9  # hot, but not connected to the peak: not in the box
    heatmap[14, 6:14] = 0.4  # below half the peak: not in the box
    lesion, other = (4, 4, 11, 11), (20, 20, 27, 27)
    scores = sr_box_scores(heatmap, (other, lesion))
    assert scores == {
        "sr_box": [6, 6, 13, 13],
        "sr_box_iou": pytest.approx(36 / 92),  # 6 x 6 shared of 8 x 8 + 8 x 8 - 36
        "sr_box_covered": pytest.approx(36 / 64),
        "sr_box_peak_in_lesion": True,
        "sr_box_share": pytest.approx(64 / 1024),
    }
    assert sr_box_scores(heatmap, (lesion, other)) == scores
    alone = sr_box_scores(heatmap, (other,))
    assert alone["sr_box_iou"] == 0.0 and alone["sr_box_covered"] == 0.0
    assert alone["sr_box_peak_in_lesion"] is False
    # at 0.7 of the peak the region is the peak alone
    tight = sr_box_scores(heatmap, (lesion,), 0.7)
    assert tight["sr_box"] == [8, 8, 8, 8]
    assert tight["sr_box_iou"] == pytest.approx(1 / 64) and tight["sr_box_covered"] == 1 / 64
    # the same box as the node's for the SR, at its default fraction
    assert WorkerSettings.model_fields["sr_region_fraction"].default == SR_REGION_FRACTION
    region = node_region.heatmap_region(heatmap, SR_REGION_FRACTION)
    assert region is not None and scores["sr_box"] == list(region.box)
    with pytest.raises(ValueError, match="at least one"):
        sr_box_scores(heatmap, ())


def test_sr_box_scores_on_a_non_square_image_and_a_box_over_its_edge() -> None:
    """Columns are x and rows y on a non-square map; a lesion box over the image's edge is
    clipped to it (as the hot-region IoU's mask is)."""
    heatmap = np.zeros((20, 40), dtype=np.float32)
    heatmap[2:6, 30:36] = 1.0
    scores = sr_box_scores(heatmap, ((30, 2, 35, 5),))
    assert scores["sr_box"] == [30, 2, 35, 5]
    assert scores["sr_box_iou"] == 1.0 and scores["sr_box_covered"] == 1.0
    assert scores["sr_box_share"] == pytest.approx(24 / 800)
    edge = np.zeros((20, 40), dtype=np.float32)
    edge[16:20, 36:40] = 1.0
    over = sr_box_scores(edge, ((36, 16, 50, 30),))  # clipped: columns 36-39, rows 16-19
    assert over["sr_box_iou"] == 1.0 and over["sr_box_covered"] == 1.0


def test_an_sr_box_of_a_map_with_no_region_is_a_miss() -> None:
    """An empty, flat or not finite heatmap has no region: the node writes no box, and it
    counts as IoU 0, nothing covered and a miss."""
    miss = {
        "sr_box": None,
        "sr_box_iou": 0.0,
        "sr_box_covered": 0.0,
        "sr_box_peak_in_lesion": False,
        "sr_box_share": 0.0,
    }
    nan = np.zeros((8, 8), dtype=np.float32)
    nan[3, 3] = np.nan
    for heatmap in (np.zeros((8, 8)), np.full((8, 8), -1.0), nan):
        assert sr_box_scores(heatmap, ((2, 2, 5, 5),)) == miss


def test_sr_box_summary() -> None:
    def row(iou: float, covered: float, hit: bool, written: bool) -> dict[str, object]:
        return {
            "sr_box": [0, 0, 1, 1] if written or iou else None,
            "sr_box_iou": iou,
            "sr_box_covered": covered,
            "sr_box_peak_in_lesion": hit,
            "sr_box_share": 0.25 if iou else 0.0,
            "sr_box_written": written,
        }

    rows = [row(0.8, 1.0, True, True), row(0.5, 0.5, True, False), row(0.0, 0.0, False, False)]
    assert sr_box_summary(rows) == {
        "cases": 3,
        "iou": pytest.approx(1.3 / 3),
        "iou_median": 0.5,
        "iou_at_least_half": pytest.approx(2 / 3),
        "covered": 0.5,
        "peak_in_lesion": pytest.approx(2 / 3),
        "share_of_image": pytest.approx(0.5 / 3),
        "no_region": 1,
        "written": 1,
    }


def test_select_costly_draws_only_images_with_a_box() -> None:
    def image(n: int, boxes: tuple[tuple[int, int, int, int], ...]) -> EvalImage:
        return EvalImage(LabelledImage(Path(f"{n}.dcm"), "1", f"1.{n}", "nodule", 0), boxes)

    images = [
        image(0, ()),
        image(1, ((0, 0, 3, 3),)),
        image(2, ((0, 0, 3, 3), (8, 8, 9, 9))),
        image(3, ()),
    ]
    assert select_costly(images, 10, seed=0) == [1, 2]


def test_training_sites_from_the_manifest_summary() -> None:
    assert training_sites("synthetic phantoms, sites [0, 1, 2, 3], seed 1") == [0, 1, 2, 3]
    assert training_sites("DICOM folder x") is None


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("model")
    return train(config_from_dict(TINY), out, log=lambda _: None).manifest_path


def test_evaluate_writes_metrics_report_and_plots(tiny_model: Path, tmp_path: Path) -> None:
    write_dataset(tmp_path / "data", 14, seed=4, sites=[0, 1, 4], size=96)
    metrics = evaluate_model(
        tiny_model, tmp_path / "data", tmp_path / "report", mc_samples=3, log=lambda _: None
    )
    assert metrics["images"] == 14 and metrics["studies"] == 14
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert set(metrics["per_class"]) == {"normal", "nodule", "effusion"}
    assert sum(sum(row) for row in metrics["confusion_matrix"]) == 14
    assert metrics["ood"]["train_sites"] == [0, 1, 2, 3]
    assert metrics["ood"]["unseen_sites"] == [4]
    assert metrics["ood"]["auroc_unseen_site"] is not None
    assert metrics["per_site"]["4"]["unseen"] and not metrics["per_site"]["0"]["unseen"]
    curve = metrics["triage"]["curve"]
    assert curve["review_rate"][0] == 0.0 and curve["review_rate"][-1] == 1.0
    with (tmp_path / "data/labels.csv").open(newline="") as fh:
        labels = [row["label"] for row in csv.DictReader(fh)]
    findings = sum(label != "normal" for label in labels)
    assert findings > 0  # every finding has a box, so each one is a pointing-game case
    assert sum(v["cases"] for v in metrics["pointing_game"].values()) == findings
    report = tmp_path / "report"
    saved = json.loads((report / "metrics.json").read_text())
    assert saved["accuracy"] == metrics["accuracy"]
    text = (report / "report.md").read_text()
    for name in ("roc.png", "reliability.png", "triage.png", "per_site.png", "ood.png"):
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({name})" in text
    assert "## Per site" in text and "4 (unseen)" in text
    # the SR's AI region box, at the node's default fraction, on every lesion image
    box = saved["sr_box"]
    assert box["fraction"] == 0.5 == saved["settings"]["sr_region_fraction"]
    assert box["all"]["cases"] == findings
    assert set(box["labels"]) == set(metrics["pointing_game"])
    for label, v in box["labels"].items():
        assert v["cases"] == metrics["pointing_game"][label]["cases"]
        # the region's peak is the heatmap's: in a lesion as often as the pointing game's
        assert v["peak_in_lesion"] == metrics["pointing_game"][label]["hit_rate"]
        assert 0.0 <= v["iou"] <= 1.0 and 0.0 <= v["covered"] <= 1.0
        assert 0 <= v["written"] <= v["cases"]
    test = saved["test"]
    for key in ("sr_box_iou", "sr_box_covered", "sr_box_peak_in_lesion"):
        assert key in HEADLINE_KEYS and 0.0 <= test[key] <= 1.0
    assert test["sr_box_iou"] == pytest.approx(box["all"]["iou"])
    assert test["n"]["sr_box_written"] == box["all"]["written"]
    assert "## The SR's AI region box" in text and "| **all** | " in text
    assert "| sr_box_iou | " in text


def test_evaluate_cli_takes_the_deployment_s_region_fraction(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_dataset(tmp_path / "data", 6, seed=5, sites=[0, 1], size=96)
    args = ["evaluate", "--model", str(tiny_model), "--data", str(tmp_path / "data")]
    args += ["--mc-samples", "2", "--costly-images", "0", "--out", str(tmp_path / "report")]
    assert cli_main([*args, "--region-fraction", "0.8"]) == 0
    saved = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert saved["sr_box"]["fraction"] == 0.8 == saved["settings"]["sr_region_fraction"]
    assert "(fraction 0.8)" in capsys.readouterr().out
    assert "at or above 0.80 of its peak" in (tmp_path / "report" / "report.md").read_text()
    for bad in ("0", "1.5", "half"):
        with pytest.raises(SystemExit) as exc:
            cli_main([*args, "--region-fraction", bad])
        assert exc.value.code == 2


def test_the_auc_interval_draws_whole_patients_where_the_labels_name_them(
    tiny_model: Path, tmp_path: Path
) -> None:
    """The interval drew whole studies only: a patient's studies, which are not independent
    of each other either, counted as separate evidence. With a ``patient`` column it draws
    whole patients (here two studies each), else whole studies."""
    write_dataset(tmp_path / "data", 8, seed=4, sites=[0, 1], size=96)
    labels = tmp_path / "data" / "labels.csv"
    with labels.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    studies = list(dict.fromkeys(row["study_instance_uid"] for row in rows))
    assert len(studies) == 8
    runs = {}
    for named in (False, True):
        if named:
            for row in rows:
                row["patient"] = f"p{studies.index(row['study_instance_uid']) // 2}"
            with labels.open("w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
        metrics = evaluate_model(
            tiny_model,
            tmp_path / "data",
            tmp_path / f"report{named}",
            mc_samples=2,
            costly_images=0,
            log=lambda _: None,
        )
        runs[named] = metrics["test"]["n"]["bootstrap_clusters"]
    assert runs == {False: 8, True: 4}


def test_evaluate_cli_reports_bad_input(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty").mkdir()
    code = cli_main(["evaluate", "--model", str(tiny_model), "--data", str(tmp_path / "empty")])
    assert code == 1
    assert "no labels.csv" in capsys.readouterr().err


# --------------------------------------------------------------------------- headline metrics


def test_macro_auc_and_bootstrap_interval() -> None:
    truth = np.array([0, 0, 1, 1, 2, 2])
    perfect = np.eye(3)[truth] * 0.8 + 0.1
    assert macro_auc(perfect, truth) == 1.0
    assert macro_auc(perfect[::-1], truth) is not None
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 3, 200)
    noisy = np.eye(3)[truth] + rng.normal(0, 0.8, (200, 3))
    value = macro_auc(noisy, truth)
    ci = bootstrap_ci(lambda idx: macro_auc(noisy[idx], truth[idx]), 200, resamples=100)
    assert value is not None and ci is not None
    assert ci[0] < value < ci[1] and ci[0] > 0.5 and ci[1] <= 1.0
    again = bootstrap_ci(lambda idx: macro_auc(noisy[idx], truth[idx]), 200, resamples=100)
    assert again == ci  # seeded
    assert bootstrap_ci(lambda idx: 1.0, 1) is None


def test_bootstrap_draws_whole_studies() -> None:
    """Forty studies of fifty identical slices each hold forty cases' worth of evidence, not
    two thousand: drawn by study, the interval is the one of the forty de-duplicated cases
    (the same draws), and wider than the one that takes every slice as independent. One image
    per study draws exactly what the plain bootstrap draws."""
    rng = np.random.default_rng(2)
    truth = rng.integers(0, 3, 40)
    probs = np.eye(3)[truth] + rng.normal(0, 0.8, (40, 3))
    study = np.repeat(np.arange(40), 50)
    slices_truth, slices_probs = truth[study], probs[study]

    def per_case(idx: np.ndarray) -> float | None:
        return macro_auc(probs[idx], truth[idx])

    def per_slice(idx: np.ndarray) -> float | None:
        return macro_auc(slices_probs[idx], slices_truth[idx])

    by_study = bootstrap_ci(per_slice, 2000, resamples=100, groups=study.tolist())
    cases = bootstrap_ci(per_case, 40, resamples=100)
    naive = bootstrap_ci(per_slice, 2000, resamples=100)
    assert by_study is not None and cases is not None and naive is not None
    assert by_study == pytest.approx(cases, abs=1e-12)
    assert by_study[1] - by_study[0] > 3 * (naive[1] - naive[0])
    single = bootstrap_ci(per_case, 40, resamples=100, groups=[f"s{i}" for i in range(40)])
    assert single == cases
    assert bootstrap_ci(per_slice, 100, groups=[0] * 100) is None  # one study: no interval


def test_f1_macro() -> None:
    truth = np.array([0, 0, 1, 1])
    assert f1_macro(truth, truth, 3) == 1.0
    # class 0: tp 1, fn 1 -> 2/3; class 1: tp 2, fp 1 -> 0.8
    assert f1_macro(np.array([0, 1, 1, 1]), truth, 3) == pytest.approx((2 / 3 + 0.8) / 2)


def test_uncertainty_error_auroc_and_auto_accept() -> None:
    score = np.array([0.1, 0.2, 0.3, 0.4, 0.9])
    correct = np.array([True, True, True, True, False])
    assert uncertainty_error_auroc(score, correct) == 1.0
    assert uncertainty_error_auroc(-score, correct) == 0.0
    assert uncertainty_error_auroc(score, np.ones(5, bool)) is None
    assert auto_accept_accuracy(score, correct) == 1.0  # the worst 20 % (one case) reviewed
    assert auto_accept_accuracy(-score, correct) == pytest.approx(0.75)
    assert auto_accept_accuracy(score, correct, review_fraction=1.0) is None


def test_heatmap_iou_against_a_box() -> None:
    heatmap = np.zeros((16, 16), dtype=np.float32)
    heatmap[4:8, 4:8] = 1.0
    assert heatmap_iou(heatmap, box_mask((16, 16), (4, 4, 7, 7))) == 1.0
    assert heatmap_iou(heatmap, box_mask((16, 16), (4, 4, 11, 7))) == pytest.approx(0.5)
    assert heatmap_iou(heatmap, box_mask((16, 16), (10, 10, 12, 12))) == 0.0
    assert heatmap_iou(np.zeros((16, 16)), box_mask((16, 16), (0, 0, 3, 3))) == 0.0
    heatmap[0, 0] = 0.4  # under half the peak: not "hot"
    assert heatmap_iou(heatmap, box_mask((16, 16), (4, 4, 7, 7))) == 1.0


def test_ssim_and_shift() -> None:
    rng = np.random.default_rng(0)
    a = rng.random((32, 32))
    assert ssim(a, a) == pytest.approx(1.0)
    assert ssim(a, 1.0 - a) < 0.0  # anti-correlated structure
    assert 0.0 < ssim(a, np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1)) < 0.95
    with pytest.raises(ValueError):
        ssim(a, a[:16])
    moved = shift_array(a, 2, -3)
    assert np.array_equal(moved[2:, :-3], a[:-2, 3:])
    assert np.array_equal(shift_array(moved, -2, 3)[4:-4, 4:-4], a[4:-4, 4:-4])


def test_deletion_images_and_curve_area() -> None:
    pixels = np.arange(16, dtype=float).reshape(4, 4)
    heatmap = np.zeros((4, 4))
    heatmap[3, 3], heatmap[3, 2] = 1.0, 0.5
    order = salience_order(heatmap, np.random.default_rng(0))
    assert order[:2].tolist() == [15, 14]
    steps = deletion_images(pixels, order, steps=4)
    assert len(steps) == 5
    assert np.array_equal(steps[0], pixels)
    assert np.all(steps[-1] == pixels.mean())
    assert steps[1].ravel()[15] == pixels.mean() and steps[1].ravel()[0] == 0.0
    assert curve_area([1.0, 1.0, 1.0]) == 1.0
    assert curve_area([1.0, 0.0, 0.0]) == pytest.approx(0.25)


def test_a_perturbed_copy_keeps_its_source_s_uids(tmp_path: Path) -> None:
    write_dataset(tmp_path / "data", 1, seed=3, sites=[0], size=64)
    (path,) = sorted((tmp_path / "data").rglob("*.dcm"))
    ds = pydicom.dcmread(path)
    copy = with_pixels(ds, np.zeros(ds.pixel_array.shape))
    assert copy.SOPInstanceUID == ds.SOPInstanceUID
    assert copy.file_meta.MediaStorageSOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
    assert not copy.pixel_array.any() and ds.pixel_array.any()


BUNDLED = Path(__file__).resolve().parents[2] / "models" / "registry" / "default"


def test_evaluate_bundled_model_headline_metrics(tmp_path: Path) -> None:
    write_dataset(tmp_path / "data", 24, seed=11, sites=[0, 2, 4], size=128)
    metrics = evaluate_model(
        BUNDLED,
        tmp_path / "data",
        tmp_path / "report",
        mc_samples=4,
        costly_images=6,
        compare=BUNDLED,
        log=lambda _: None,
    )
    loso = metrics["leave_one_site_out"]
    assert loso["held_out_sites"] == [4]
    assert set(loso["sites"]) == {"0", "2", "4"} and loso["sites"]["4"]["held_out"]
    blocks = [metrics["test"], *loso["sites"].values()]
    for block in blocks:
        for key in HEADLINE_KEYS:
            assert key in block
        for key in ("accuracy", "f1_macro", "auto_accept_accuracy_at_20pct_review"):
            assert 0.0 <= block[key] <= 1.0
        for key in ("ece", "pointing_game", "heatmap_iou"):
            assert block[key] is None or 0.0 <= block[key] <= 1.0
        if block["auc_macro"] is not None:
            assert 0.0 <= block["auc_macro"] <= 1.0
    test = metrics["test"]
    assert test["n"]["images"] == 24 and test["n"]["stability_deletion_images"] == 6
    low, high = test["auc_macro_ci95"]
    assert low <= test["auc_macro"] <= high
    assert -1.0 <= test["explanation_stability_ssim"] <= 1.0
    assert 0.0 <= test["deletion_auc"] <= 1.0 and 0.0 <= test["deletion_auc_random"] <= 1.0
    assert test["domain_gap_auc"] is not None
    assert sum(b["n"]["stability_deletion_images"] for b in loso["sites"].values()) == 6
    # The same model on the same images gives the same figures, deletion curves included (the
    # perturbed copies keep their source's UID, which seeds the dropout masks).
    assert metrics["comparison"]["test"] == test
    assert metrics["comparison"]["leave_one_site_out"] == loso
    theirs = metrics["comparison"]["test"]  # the same model on the same data
    for key in HEADLINE_KEYS:
        if key.startswith("deletion_auc"):  # heavily deleted images vary slightly per run
            assert theirs[key] == pytest.approx(test[key], abs=0.05)
        else:
            assert theirs[key] == test[key]
    report = tmp_path / "report"
    assert (report / "example_heatmaps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (report / "report.md").read_text()
    assert "## Headline metrics" in text and "(example_heatmaps.png)" in text
    saved = json.loads((report / "metrics.json").read_text())
    assert saved["test"]["auc_macro"] == test["auc_macro"]


def test_an_auc_of_scores_that_are_not_finite_is_an_error() -> None:
    """A model whose outputs went NaN scored 0.5, a plausible figure, instead of failing."""
    positive = np.array([True, False, True, False])
    for bad in (np.nan, np.inf):
        with pytest.raises(ValueError, match="1 of 4 scores are not finite"):
            roc_auc(np.array([0.9, 0.1, bad, 0.2]), positive)
    with pytest.raises(ValueError, match="4 of 4"):
        roc_auc(np.full(4, np.nan), positive)
