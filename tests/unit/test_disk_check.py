"""``acwi-node check``: where the ledger and the data directory disagree, after a restore."""

from __future__ import annotations

import datetime as dt
import json
import shutil

import pytest
from sqlalchemy import update

from acwi_node.cli import main
from acwi_node.config import Settings
from acwi_node.ledger import Ledger
from acwi_node.ledger.models import Study, utcnow
from acwi_node.retention import DiskSpace, Retention
from acwi_node.retention.check import check
from tests.support.study_flow import analyse, delivered_study, receive

LONG_AGO = utcnow() - dt.timedelta(days=30)


def _config(settings: Settings) -> str:
    config = settings.data_dir.parent / "acwi.toml"
    config.write_text(
        f'[node]\ndata_dir = "{settings.data_dir}"\ndatabase_url = "{settings.database_url}"\n'
        "[retention]\nkeep_hours = 0.0001\nmin_free_percent = 0\n"
    )
    return str(config)


def test_a_data_directory_that_matches_its_ledger_agrees(
    ledger_node: tuple[Settings, Ledger], capsys: pytest.CaptureFixture[str]
) -> None:
    settings, ledger = ledger_node
    delivered_study(settings, ledger, "1.2.3")
    assert check(settings, ledger).agrees
    assert main(["--config", _config(settings), "check"]) == 0
    assert "the ledger and the data directory agree" in capsys.readouterr().out


def test_each_disagreement_is_counted_and_named_and_nothing_is_changed(
    ledger_node: tuple[Settings, Ledger], capsys: pytest.CaptureFixture[str]
) -> None:
    settings, ledger = ledger_node
    # A study received after the ledger's backup: its folders, no row.
    for root, name in ((settings.spool_dir, "9.9.1.dcm"), (settings.results_dir, "9.9.77.dcm")):
        (root / "9.9").mkdir(parents=True)
        (root / "9.9" / name).write_bytes(b"\0" * 300)
    # Rows whose files went: a study's instances, another's results still owed to the PACS.
    delivered_study(settings, ledger, "1.2.3")
    shutil.rmtree(settings.spool_dir / "1.2.3")
    # A purged study whose files a restore brought back.
    delivered_study(settings, ledger, "7.8.9")
    with ledger.session() as s:
        s.execute(update(Study).where(Study.study_uid == "7.8.9").values(updated_at=LONG_AGO))
    saved = settings.data_dir.parent / "saved"
    shutil.copytree(settings.spool_dir / "7.8.9", saved)
    assert Retention(settings, ledger, space=lambda: DiskSpace(900, 1000)).sweep().studies == 1
    shutil.copytree(saved, settings.spool_dir / "7.8.9")
    receive(settings, ledger, "4.5.6", "4.5.6.1")
    analyse(settings, ledger, "4.5.6")
    shutil.rmtree(settings.results_dir / "4.5.6")

    report = check(settings, ledger)
    assert not report.agrees
    found = report.as_dict()
    assert found["spool_without_study"] == {
        "studies": 1, "files": 1, "bytes": 300, "study_uids": ["9.9"]
    }  # fmt: skip
    assert found["results_without_study"]["study_uids"] == ["9.9"]
    assert found["instances_without_file"] == {
        "studies": 1, "files": 2, "bytes": 0, "study_uids": ["1.2.3"]
    }  # fmt: skip
    assert found["results_without_file"]["study_uids"] == ["4.5.6"]
    assert (found["results_without_file"]["files"], found["results_without_file"]["owed"]) == (
        1,
        1,
    )
    assert found["files_of_purged_studies"]["study_uids"] == ["7.8.9"]
    assert found["files_of_purged_studies"]["files"] == 2

    assert main(["--config", _config(settings), "check", "--json"]) == 1
    assert json.loads(capsys.readouterr().out) == found
    assert main(["--config", _config(settings), "check"]) == 1
    out = capsys.readouterr().out
    assert "spool folders of studies the ledger has no row of: 1 studies, 1 files" in out
    assert "result rows whose file is gone: 1 studies, 1 files, 1 still owed" in out
    assert out.rstrip().endswith("they disagree")
    # Read-only: everything is where it was.
    assert (settings.spool_dir / "9.9" / "9.9.1.dcm").exists()
    assert len(list((settings.spool_dir / "7.8.9").iterdir())) == 2
    assert check(settings, ledger).as_dict() == found
