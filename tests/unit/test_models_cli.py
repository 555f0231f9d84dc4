"""``acwi-models``: a user's mistake ends in one line and an exit status, never a traceback.

Exit status 2 is a command line argparse refuses (a number out of range, an unknown preset or
site); 1 is a command that ran and failed (``<command> failed: ...`` on stderr).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from acwi_node.inference.manifest import MANIFEST_NAME, default_model_dir
from models.cli import main

#: A training run that gets to its first epoch within a second or two.
TINY_TOML = """
[data]
train_images = 6
val_images = 6
workers = 0
[preprocessing]
input_size = 64
[model]
widths = [8, 8, 16, 16, 32]
fpn_channels = 16
feature_channels = 16
latent_dim = 8
[train]
epochs = 1
batch_size = 6
threads = 1
[calibration]
mc_samples = 2
[continual]
fisher_images = 0
"""


def _one_line_failure(capsys: pytest.CaptureFixture[str], command: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{command} failed: "), err
    return lines[0]


def _usage_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sites", "9"], "unknown site 9: sites are 0 to 4"),
        (["--sites", "0,5"], "unknown site 5"),
        (["--size", "0"], "--size: must be at least 64, not 0"),
        (["--size", "10000"], "--size: must be at most 4096"),
        (["--studies", "0"], "--studies: must be at least 1, not 0"),
        (["--images-per-study", "0"], "--images-per-study: must be at least 1, not 0"),
        (["--slices", "0", "--modality", "CT"], "--slices: must be at least 1"),
    ],
    ids=["site-9", "site-5", "size-0", "size-10000", "studies-0", "images-0", "slices-0"],
)
def test_synth_refuses_arguments_out_of_range(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    out = tmp_path / "out"
    err = _usage_error(capsys, ["synth", "--out", str(out), "--studies", "2", *args])
    assert message in err
    assert not out.exists()


def test_synth_out_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a_file = tmp_path / "afile"
    a_file.write_text("keep me")
    assert main(["synth", "--out", str(a_file), "--studies", "2", "--size", "64"]) == 1
    assert "exists and is not a folder" in _one_line_failure(capsys, "synth")
    assert a_file.read_text() == "keep me"


def test_train_unknown_preset_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _usage_error(capsys, ["train", "--preset", "foo", "--out", str(tmp_path / "o")])
    assert "unknown preset 'foo'; available: amrinet, default, domain" in err
    _usage_error(capsys, ["train", "--preset", "../presets/default", "--out", str(tmp_path)])
    assert not (tmp_path / "o").exists()


def test_train_user_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.toml").write_text("x = [\n")
    (tmp_path / "unknown.toml").write_text("[train]\nepochz = 1\n")
    out = tmp_path / "out"
    cases = [
        (["--data", str(tmp_path / "nonexistent")], "nonexistent is not a folder"),
        (["--data", str(tmp_path / "empty")], "empty has no labels.csv"),
        (["--config", str(tmp_path / "nope.toml")], "nope.toml: No such file or directory"),
        (["--config", str(tmp_path / "bad.toml")], "bad.toml is not valid TOML: "),
        (["--config", str(tmp_path / "unknown.toml")], "unknown keys in [train]: ['epochz']"),
        (["--init-from", str(tmp_path / "nomodel")], "nomodel does not exist"),
    ]
    for args, message in cases:
        assert main(["train", "--out", str(out), *args]) == 1, args
        assert message in _one_line_failure(capsys, "training"), args
        assert not out.exists(), args  # no empty --out folder left behind


def test_resume_from_a_checkpoint_of_another_architecture(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "tiny.toml"
    config.write_text(TINY_TOML)
    out = tmp_path / "model"
    out.mkdir()
    state = {f"other.block{i}.weight": torch.zeros(2) for i in range(3)}
    torch.save({"model": state, "epoch": 1}, out / "checkpoint.pt")
    code = main(["train", "--config", str(config), "--out", str(out), "--resume"])
    assert code == 1
    line = _one_line_failure(capsys, "training")
    assert f"checkpoint {out / 'checkpoint.pt'} does not fit the architecture: " in line
    assert ", 3 unexpected keys" in line and "missing" in line and "other.block" not in line
    assert (out / "checkpoint.pt").is_file()


def test_export_weights_that_do_not_fit_the_architecture(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "model"
    shutil.copytree(default_model_dir(), model)
    raw = json.loads((model / MANIFEST_NAME).read_text())
    raw["architecture_config"]["fpn_channels"] = 32  # the weights were trained with 48
    (model / MANIFEST_NAME).write_text(json.dumps(raw))
    assert main(["export", "--model", str(model)]) == 1
    line = _one_line_failure(capsys, "export")
    assert "do not fit the manifest's architecture_config: 0 missing, 0 unexpected keys" in line
    assert "of another shape" in line


def test_export_out_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a_file = tmp_path / "afile"
    a_file.write_text("keep me")
    assert main(["export", "--model", str(default_model_dir()), "--out", str(a_file)]) == 1
    assert "exists and is not a folder" in _one_line_failure(capsys, "export")
    assert a_file.read_text() == "keep me"
