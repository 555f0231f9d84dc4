"""What training refuses, and what a failed run leaves behind.

Fine-tuning onto other labels, a configuration that cannot give a valid model, a label
without training images, an --out that already holds a model, a diverging loss, and a failure
after training: none of them may write a model, and none may touch the model already in --out.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import re
import shutil
from pathlib import Path
from typing import Any, cast

import pytest
import torch

from acwi_node.inference.manifest import load_manifest
from models.continual import FISHER_NAME
from models.data.synth import write_dataset
from models.train import CHECKPOINT_NAME, config_from_dict, load_initial, train
from tests.unit.test_train_small import TINY

#: TINY at 64-pixel phantoms, with a small Fisher (the files a fine-tune would read).
BASE: dict[str, Any] = {
    **TINY,
    "data": {**cast(dict[str, Any], TINY["data"]), "sizes": [64]},
    "continual": {"fisher_images": 8},
}


def _config(**sections: dict[str, Any]) -> Any:
    merged = copy.deepcopy(BASE)
    for key, values in sections.items():
        if isinstance(values, dict):
            merged[key] = {**merged.get(key, {}), **values}
        else:
            merged[key] = values
    return config_from_dict(merged)


def _quiet(_: str) -> None:
    pass


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with its SHA-256."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny trained model (labels normal, nodule, effusion) with its fisher.pt."""
    out = tmp_path_factory.mktemp("guards") / "model"
    train(_config(), out, log=_quiet)
    return out


@pytest.fixture
def model(trained: Path, tmp_path: Path) -> Path:
    """A copy of the trained model to train over."""
    return Path(shutil.copytree(trained, tmp_path / "existing"))


def _no_leftovers(folder: Path) -> None:
    """No staging folder of a run beside ``folder``."""
    assert not [p for p in folder.parent.iterdir() if p.name.endswith(".partial")]


# --------------------------------------------------------------------------- fine-tuning labels


@pytest.mark.parametrize(
    "labels",
    [
        ["normal", "effusion", "nodule"],  # reordered: row 1 would change meaning
        ["normal", "pneumothorax", "fracture"],  # renamed, same count
    ],
)
def test_fine_tuning_refuses_other_labels_than_the_models(
    trained: Path, tmp_path: Path, labels: list[str]
) -> None:
    config = _config(data={"labels": labels}, continual={"ewc_lambda": 1000.0})
    with pytest.raises(ValueError, match="--init-from") as refused:
        train(config, tmp_path / "ft", init_from=trained, log=_quiet)
    message = str(refused.value)
    assert "['normal', 'nodule', 'effusion']" in message and str(labels) in message
    assert "without --init-from" in message  # the way to a model with other labels
    assert not (tmp_path / "ft").exists()


def test_a_checkpoint_carries_its_labels_for_fine_tuning(tmp_path: Path) -> None:
    """checkpoint.pt records the labels, so --init-from a checkpoint is checked as well: the
    run below fails after training (its log raises), which leaves the checkpoint behind."""

    def fail_after_training(line: str) -> None:
        if line.startswith("calibration:"):
            raise RuntimeError("stop")

    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="stop"):
        train(_config(), out, log=fail_after_training)
    assert sorted(p.name for p in out.iterdir()) == [CHECKPOINT_NAME]  # no model files
    _no_leftovers(out)
    initial = load_initial(out / CHECKPOINT_NAME)
    assert initial.labels == ["normal", "nodule", "effusion"]
    assert initial.normal_label == "normal"
    config = _config(data={"labels": ["normal", "effusion", "nodule"]})
    with pytest.raises(ValueError, match="has the labels"):
        train(config, tmp_path / "ft", init_from=out / CHECKPOINT_NAME, log=_quiet)


# --------------------------------------------------------------------------- refused up front


@pytest.mark.parametrize(
    ("sections", "says"),
    [
        ({"name": ""}, "name"),
        ({"version": ""}, "version"),
        ({"version": "latest"}, "version 'latest' is refused: .*moving name"),
        ({"train": {"epochs": 0}}, "at least 1"),
        ({"train": {"epochs": -2}}, "at least 1"),
        ({"calibration": {"ood_quantile": 1.5}}, "calibration.ood_quantile"),
        ({"data": {"normal_label": "healthy"}}, "data.normal_label"),
    ],
)
def test_a_configuration_that_cannot_give_a_valid_model_is_refused_before_training(
    tmp_path: Path, sections: dict[str, Any], says: str
) -> None:
    lines: list[str] = []
    with pytest.raises(ValueError, match=says):
        train(_config(**sections), tmp_path / "new", log=lines.append)
    assert lines == []  # refused before loading data or training
    assert not (tmp_path / "new").exists()


def test_an_out_holding_a_model_is_refused_without_overwrite(model: Path) -> None:
    before = _snapshot(model)
    with pytest.raises(ValueError, match="already holds a model.*--overwrite"):
        train(_config(), model, log=_quiet)
    assert _snapshot(model) == before


# --------------------------------------------------------------------------- failing late


@pytest.mark.parametrize("existing", [False, True])
def test_a_diverging_loss_stops_with_an_error_and_leaves_out_as_it_was(
    model: Path, tmp_path: Path, existing: bool
) -> None:
    out = model if existing else tmp_path / "new"
    before = _snapshot(out) if existing else {}
    lines: list[str] = []
    extra: dict[str, Any] = {"overwrite": True} if existing else {}
    with pytest.raises(ValueError, match="training diverged: the loss is nan in epoch 1"):
        train(_config(train={"lr": 1e30}), out, log=lines.append, **extra)
    assert not any(line.startswith("epoch 1/") for line in lines)  # stopped within the epoch
    if existing:
        assert _snapshot(out) == before
        load_manifest(out)
    else:
        assert not out.exists()
    _no_leftovers(out)


@pytest.mark.parametrize("existing", [False, True])
def test_a_failure_while_writing_the_model_leaves_out_as_it_was(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, existing: bool
) -> None:
    """The weights are written before the Fisher file: both go to a folder beside --out, and
    only a finished model's files reach --out."""

    def broken(*_: object, **__: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("models.train.save_fisher", broken)
    out = model if existing else tmp_path / "new"
    before = _snapshot(out) if existing else {}
    extra: dict[str, Any] = {"overwrite": True} if existing else {}
    with pytest.raises(OSError, match="disk full"):
        train(_config(train={"seed": 1}), out, log=_quiet, **extra)
    after = _snapshot(out)
    after.pop(CHECKPOINT_NAME)  # kept for --resume
    assert after == before
    if existing:
        load_manifest(out)
    _no_leftovers(out)


def test_overwrite_replaces_the_model_and_drops_its_files_the_new_one_lacks(model: Path) -> None:
    assert (model / FISHER_NAME).is_file()
    old = load_manifest(model)
    lines: list[str] = []
    config = _config(train={"seed": 1}, continual={"fisher_images": 0})
    result = train(config, model, overwrite=True, log=lines.append)
    new = load_manifest(model)
    assert new.weights_sha256 == result.manifest.weights_sha256 != old.weights_sha256
    assert not (model / FISHER_NAME).exists()  # the old model's Fisher would mislead EWC
    assert any("removed" in line and FISHER_NAME in line for line in lines)
    assert sorted(p.name for p in model.iterdir()) == ["manifest.json", "weights.pt"]
    _no_leftovers(model)


# --------------------------------------------------------------------------- labels without images


def _only_normal(root: Path) -> Path:
    write_dataset(root, 5, seed=8, size=64)
    with (root / "labels.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    with (root / "labels.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({**row, "label": "normal", "box": ""} for row in rows)
    return root


def test_a_label_without_training_images_is_refused(tmp_path: Path) -> None:
    data = _only_normal(tmp_path / "data")
    with pytest.raises(ValueError, match="no training images of") as refused:
        train(_config(), tmp_path / "m", data_dir=data, log=_quiet)
    message = str(refused.value)
    assert "['nodule', 'effusion']" in message
    assert "normal 4, nodule 0, effusion 0" in message  # 5 studies, one held out
    assert not (tmp_path / "m").exists()
    synthetic = _config(data={"train_class_fractions": {"normal": 0.5, "nodule": 0.5}})
    with pytest.raises(ValueError, match=r"no training images of \['effusion'\]"):
        train(synthetic, tmp_path / "s", log=_quiet)


def test_fine_tuning_on_some_labels_only_warns(trained: Path, tmp_path: Path) -> None:
    """Feedback from a new site is often normal cases only: fine-tuning on them is allowed
    (the model keeps its other rows), with a warning."""
    data = _only_normal(tmp_path / "data")
    lines: list[str] = []
    config = _config(continual={"fisher_images": 0})
    train(config, tmp_path / "ft", data_dir=data, init_from=trained, log=lines.append)
    assert any(
        line.startswith("warning: no training images of ['nodule', 'effusion']") for line in lines
    )
    load_manifest(tmp_path / "ft")
    old = torch.load(trained / "weights.pt", weights_only=True)
    assert old.keys() == torch.load(tmp_path / "ft" / "weights.pt", weights_only=True).keys()


class _Interrupted(Exception):
    pass


def _interrupted_after_epoch_1(out: Path, **sections: dict[str, Any]) -> None:
    """Train 2 epochs into ``out``, stopped as epoch 2 ends (its checkpoint not yet written)."""

    def log(message: str) -> None:
        if message.startswith("epoch 2/"):
            raise _Interrupted

    with pytest.raises(_Interrupted):
        train(_config(train={"epochs": 2}, **sections), out, log=log)
    assert torch.load(out / CHECKPOINT_NAME, weights_only=False)["epoch"] == 1


def test_resume_continues_an_interrupted_run_to_the_same_weights(tmp_path: Path) -> None:
    whole = train(_config(train={"epochs": 2}), tmp_path / "whole", log=_quiet)
    _interrupted_after_epoch_1(tmp_path / "resumed")
    heard: list[str] = []
    resumed = train(
        _config(train={"epochs": 2}), tmp_path / "resumed", resume=True, log=heard.append
    )
    assert any(line.startswith("resumed from") for line in heard)
    a, b = torch.load(whole.weights_path), torch.load(resumed.weights_path)
    assert all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"train": {"epochs": 3}}, "other settings (train.epochs 2, now 3)"),
        ({"train": {"epochs": 2, "lr": 0.01}}, "other settings (train.lr 0.003, now 0.01)"),
        ({"train": {"epochs": 2}, "data": {"seed": 5}}, "other settings (data.seed"),
    ],
)
def test_resume_refuses_a_checkpoint_of_other_settings(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    """A resumed run with other settings would be neither run (more epochs crashed the
    learning-rate schedule after the old run's last step; another lr was silently ignored)."""
    out = tmp_path / "model"
    _interrupted_after_epoch_1(out)
    checkpoint = _snapshot(out)
    with pytest.raises(ValueError, match=rf"checkpoint.pt was trained with {re.escape(message)}"):
        train(_config(**change), out, resume=True, log=_quiet)
    assert _snapshot(out) == checkpoint


def test_resume_refuses_a_checkpoint_trained_on_other_data(tmp_path: Path) -> None:
    for name, seed in (("a", 1), ("b", 2)):
        write_dataset(tmp_path / name, 8, seed=seed, size=64)
    out = tmp_path / "model"

    def log(message: str) -> None:
        if message.startswith("epoch 2/"):
            raise _Interrupted

    config = _config(train={"epochs": 2}, data={"allow_missing_labels": True})
    with pytest.raises(_Interrupted):
        train(config, out, data_dir=tmp_path / "a", log=log)
    with pytest.raises(ValueError, match="was trained on other data"):
        train(config, out, data_dir=tmp_path / "b", resume=True, log=_quiet)
    train(config, out, data_dir=tmp_path / "a", resume=True, log=_quiet)
    assert (out / "manifest.json").is_file() and not (out / CHECKPOINT_NAME).exists()
