"""Storage retention: which studies lose their files, when, in what order, and what stays."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from acwi_node.audit import audit_file, close_audit
from acwi_node.cli import main
from acwi_node.config import ConfigError, Settings, load_settings
from acwi_node.ingest.journal import JOURNAL_DIR, IngestJournal
from acwi_node.ingest.spool import Spool
from acwi_node.ledger import Ledger
from acwi_node.ledger.models import (
    Instance,
    Purge,
    ReviewItem,
    ReviewState,
    Study,
    User,
    Verdict,
    utcnow,
)
from acwi_node.observability import metrics
from acwi_node.retention import DiskSpace, Retention
from acwi_node.retention import sweep as sweep_module
from acwi_node.retention.store import RetentionStore
from acwi_node.review.store import ReviewStore
from acwi_node.web.api import create_app
from tests.support.review_case import add_user, sign_in
from tests.support.study_flow import (
    analyse,
    deliver,
    delivered_study,
    dx_record,
    receive,
    route_all,
    study_id,
)

HOUR = dt.timedelta(hours=1)


def files_of(settings: Settings, study: str) -> list[str]:
    found = []
    for root in (settings.spool_dir, settings.results_dir):
        folder = root / study
        if folder.is_dir():
            found += sorted(p.name for p in folder.iterdir())
    return found


def later(hours: float) -> Callable[[], dt.datetime]:
    return lambda: utcnow() + hours * HOUR


def plenty() -> DiskSpace:
    return DiskSpace(free_bytes=900, total_bytes=1000)


def test_a_finished_study_loses_its_files_after_keep_hours_and_the_ledger_keeps_it(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    settings, ledger = ledger_node
    delivered_study(settings, ledger, "1.2.3")
    assert files_of(settings, "1.2.3") == ["1.2.3.1.dcm", "1.2.3.2.dcm", "1.2.3.1.77.dcm"]

    young = Retention(settings, ledger, space=plenty, clock=later(167)).sweep()
    assert young.studies == 0 and len(files_of(settings, "1.2.3")) == 3

    report = Retention(settings, ledger, space=plenty, clock=later(169)).sweep()
    assert (report.studies, report.files, report.bytes) == (1, 3, 2 * 1000 + 500)
    assert dict(report.by_reason) == {"age": 1}
    assert not (settings.spool_dir / "1.2.3").exists()
    assert not (settings.results_dir / "1.2.3").exists()
    st = ledger.get_study("1.2.3")
    assert st is not None and st["state"] == "delivered" and st["images_deleted_at"]
    assert [j["state"] for j in st["jobs"]] == ["delivered"]
    (listed,) = ledger.list_studies()
    assert listed["images_deleted_at"] == st["images_deleted_at"]
    assert [j["id"] for j in listed["jobs"]] == [j["id"] for j in st["jobs"]]
    with ledger.session() as s:
        purge = s.scalars(select(Purge)).one()
        assert (purge.reason, purge.instances, purge.files, purge.bytes) == ("age", 2, 3, 2500)
        assert purge.finished_at is not None
    assert ledger.instance_file("1.2.3.1") == ("", 1000, "1.2.840.10008.1.2.1")
    assert ReviewStore(ledger).dashboard()["files_deleted"] == 1
    # Done once: the next sweep finds nothing.
    assert Retention(settings, ledger, space=plenty, clock=later(169)).sweep().studies == 0


def test_studies_in_use_are_never_deleted_even_when_space_runs_short(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    settings, ledger = ledger_node
    receive(settings, ledger, "1.2.1", "1.2.1.1")  # still receiving
    receive(settings, ledger, "1.2.2", "1.2.2.1")
    ledger.complete_study(study_id(ledger, "1.2.2"), 1, route_all)  # queued
    receive(settings, ledger, "1.2.3", "1.2.3.1")
    analyse(settings, ledger, "1.2.3")  # analysed, delivery pending
    receive(settings, ledger, "1.2.4", "1.2.4.1")
    analyse(settings, ledger, "1.2.4", needs_review=True)
    deliver(ledger)  # 1.2.3 and 1.2.4 delivered; 1.2.4 is open on the worklist
    assert ledger.get_study("1.2.3")["state"] == "delivered"  # type: ignore[index]

    def full() -> DiskSpace:
        return DiskSpace(free_bytes=10, total_bytes=1000)

    deleted = Retention(settings, ledger, space=full, clock=later(100_000)).sweep()
    assert deleted.by_reason == {"age": 1}  # 1.2.3, delivered and not on the worklist
    assert deleted.short_of_space
    for study in ("1.2.1", "1.2.2", "1.2.4"):
        assert files_of(settings, study), study

    # Once the radiologist closes the item, the study is kept for reviewed_keep_hours.
    with ledger.session() as s:
        s.execute(
            update(ReviewItem).values(state=ReviewState.CLOSED, closed_at=utcnow() + 10 * HOUR)
        )
    assert Retention(settings, ledger, space=plenty, clock=later(2000)).sweep().studies == 0
    report = Retention(settings, ledger, space=plenty, clock=later(2171)).sweep()
    assert report.studies == 1 and not files_of(settings, "1.2.4")
    # The closed case's page says where its images went.
    with ledger.session() as s:
        item_id = s.scalars(select(ReviewItem.id)).one()
    assert ReviewStore(ledger).case(item_id)["images_deleted_at"]  # type: ignore[index]
    add_user(ledger, "jane.doe")
    with ledger.session() as s:  # the verdict that closed it
        item = s.get_one(ReviewItem, item_id)
        user_id = s.scalars(select(User.id)).one()
        s.add(
            Verdict(
                review_item_id=item_id, study_id=item.study_id, job_id=item.job_id,
                user_id=user_id, user_name="jane.doe", action="confirm", label="abnormal",
                model_label="abnormal", sr_sop_instance_uid="2.25.7",
            )
        )  # fmt: skip
        verdict_id = s.scalars(select(Verdict.id)).one()
    with TestClient(create_app(settings, ledger), base_url="https://testserver") as client:
        csrf = sign_in(client, "jane.doe")
        page = client.get(f"/review/cases/{item_id}")
        assert page.status_code == 200
        assert "Storage retention deleted this case's images" in page.text
        # its verdict cannot be amended (the verified SR is built from the images): said so
        assert "can no longer be amended" in page.text and "amend-link" not in page.text
        refused = client.post(
            f"/review/cases/{item_id}/amend",
            data={"csrf_token": csrf, "amends": str(verdict_id), "action": "override",
                  "label": "normal", "reason": "x"},
        )  # fmt: skip
        assert refused.status_code == 400
        assert "its verdict can no longer be amended</p>" in refused.text


def test_a_study_whose_association_a_killed_scp_left_open_goes_an_hour_after_its_last_image(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    """The SCP was killed with the study's association open: the count of open associations
    it left is never released (the study completed after completion.max_wait_s and was
    delivered); it keeps the files only while an association could still be sending it."""
    settings, ledger = ledger_node
    for k in (1, 2):
        Spool(settings.spool_dir, fsync=False).store("1.2.5", f"1.2.5.{k}", b"\0" * 1000)
        ledger.record_instance(dx_record("1.2.5", f"1.2.5.{k}"), first_in_association=k == 1)
    analyse(settings, ledger, "1.2.5")
    deliver(ledger)
    with ledger.session() as s:
        st = s.scalars(select(Study).where(Study.study_uid == "1.2.5")).one()
        assert (st.state, st.open_associations) == ("delivered", 1)

    def full() -> DiskSpace:
        return DiskSpace(free_bytes=10, total_bytes=1000)

    # Within the hour a live association may still send it more: kept, whatever the space.
    assert Retention(settings, ledger, space=full, clock=later(169)).sweep().studies == 0
    assert len(files_of(settings, "1.2.5")) == 3
    then = utcnow() - 2 * HOUR  # its last image came two hours ago
    with ledger.session() as s:
        s.execute(update(Study).values(last_received_at=then))
        s.execute(update(Instance).values(received_at=then))
    stamp = then.replace(tzinfo=dt.UTC).timestamp()
    for path in (settings.spool_dir / "1.2.5").iterdir():
        os.utime(path, (stamp, stamp))
    report = Retention(settings, ledger, space=plenty, clock=later(169)).sweep()
    assert report.by_reason == {"age": 1}
    assert files_of(settings, "1.2.5") == []


def test_short_of_space_deletes_oldest_first_reviewed_last_until_enough_is_free(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    settings, ledger = ledger_node
    for study in ("1.2.1", "1.2.2", "1.2.3"):
        delivered_study(settings, ledger, study, n=1)
    receive(settings, ledger, "1.2.9", "1.2.9.1")
    analyse(settings, ledger, "1.2.9", needs_review=True)
    deliver(ledger)
    now = utcnow()
    with ledger.session() as s:
        s.execute(update(ReviewItem).values(state=ReviewState.CLOSED, closed_at=now - 50 * HOUR))
        for age, study in ((30, "1.2.1"), (10, "1.2.2"), (20, "1.2.3"), (40, "1.2.9")):
            s.execute(
                update(Study).where(Study.study_uid == study).values(updated_at=now - age * HOUR)
            )

    def used() -> int:
        return sum(p.stat().st_size for p in settings.data_dir.rglob("*.dcm"))

    # 1,500 bytes per study: 60 bytes free of 6,060 (1 %); one study gone gives 26 %.
    capacity, other = used() + 60, 0

    def space() -> DiskSpace:
        return DiskSpace(free_bytes=capacity - other - used(), total_bytes=capacity)

    # A dry run lists the study that would go, and deletes nothing; once more with every
    # unreviewed study old enough to go by age, it lists each once, and no study for space
    # (the age deletions free enough).
    dry = Retention(settings, ledger, space=space, clock=utcnow).sweep(dry_run=True)
    assert dry.planned == [("1.2.1", "space")] and dry.bytes == 1500
    dry = Retention(settings, ledger, space=space, clock=later(200)).sweep(dry_run=True)
    assert sorted(dry.planned) == [("1.2.1", "age"), ("1.2.2", "age"), ("1.2.3", "age")]
    assert all(files_of(settings, s) for s in ("1.2.1", "1.2.2", "1.2.3", "1.2.9"))
    report = Retention(settings, ledger, space=space, clock=utcnow).sweep()
    assert dict(report.by_reason) == {"space": 1}
    assert not files_of(settings, "1.2.1")  # the oldest never-reviewed study
    assert files_of(settings, "1.2.2") and files_of(settings, "1.2.3")
    assert files_of(settings, "1.2.9")  # older, but reviewed: last
    assert report.free_percent is not None and report.free_percent >= 10
    assert not report.short_of_space

    other = 100_000  # something else fills the disk: deleting all three is not enough
    capacity = used() + other + 10
    report = Retention(settings, ledger, space=space, clock=utcnow).sweep()
    assert report.studies == 3 and report.short_of_space
    assert not any(files_of(settings, s) for s in ("1.2.2", "1.2.3", "1.2.9"))


def test_a_dry_run_short_of_space_lists_every_study_past_the_first_batch(
    ledger_node: tuple[Settings, Ledger], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dry run claims nothing, so each read of the candidates must reach past the studies
    it already listed: all five go, and the disk is not said to be beyond help."""
    settings, ledger = ledger_node
    monkeypatch.setattr(sweep_module, "_SPACE_BATCH", 2)
    studies = [f"1.2.{i}" for i in range(1, 6)]
    for study in studies:
        delivered_study(settings, ledger, study, n=1)  # 1,500 bytes each

    def space() -> DiskSpace:  # all five must go: 7,500 bytes short of 10 %
        return DiskSpace(free_bytes=0, total_bytes=75_000)

    dry = Retention(settings, ledger, space=space, clock=utcnow).sweep(dry_run=True)
    assert sorted(dry.planned) == [(s, "space") for s in studies]
    assert dry.bytes == 7500 and not dry.short_of_space
    assert all(files_of(settings, s) for s in studies)
    # The sweep itself deletes the same five.
    report = Retention(settings, ledger, space=space, clock=utcnow).sweep()
    assert report.by_reason == {"space": 5}


def test_a_file_written_after_the_claim_belongs_to_a_later_generation_and_stays(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    settings, ledger = ledger_node
    delivered_study(settings, ledger, "1.2.3")
    # The instance sent again: its new version is in the spool, its row not yet written.
    resent = settings.spool_dir / "1.2.3" / "1.2.3.2.dcm"
    resent.write_bytes(b"\2" * 1000)
    later_ns = int((dt.datetime.now(dt.timezone.utc).timestamp() + 1) * 1e9)
    os.utime(resent, ns=(later_ns, later_ns))
    report = Retention(settings, ledger, space=plenty, clock=later(200)).sweep()
    assert report.studies == 1 and report.files == 2  # one source image and the SR
    assert files_of(settings, "1.2.3") == ["1.2.3.2.dcm"]
    # Its row arrives: the study re-opens, and its next job analyses what arrived since.
    receive(settings, ledger, "1.2.3", "1.2.3.2")
    receive(settings, ledger, "1.2.3", "1.2.3.3")
    st = ledger.get_study("1.2.3")
    assert st is not None and st["generation"] == 2 and st["images_deleted_at"] is None
    assert [v["images_deleted_at"] for v in ledger.list_studies()] == [None]
    job_id = analyse(settings, ledger, "1.2.3")
    assert ledger.job_inputs(job_id) == ("1.2.3", ["1.2.3/1.2.3.2.dcm", "1.2.3/1.2.3.3.dcm"])
    deliver(ledger)
    # The new generation is purged in its turn.
    assert Retention(settings, ledger, space=plenty, clock=later(400)).sweep().studies == 1
    assert files_of(settings, "1.2.3") == []
    with ledger.session() as s:
        assert sorted(s.scalars(select(Purge.generation))) == [1, 2]


def test_spool_files_restored_without_their_times_go_with_the_study(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    """A data directory restored (or copied) without its files' times leaves them newer than
    the study's last arrival: those older than an hour before the purge go all the same; the
    purge deleting none of them would keep them for ever while the study says its files are
    gone."""
    settings, ledger = ledger_node
    delivered_study(settings, ledger, "1.2.3")
    long_ago = utcnow() - dt.timedelta(days=10)
    with ledger.session() as s:
        s.execute(update(Instance).values(received_at=long_ago))
        s.execute(update(Study).values(last_received_at=long_ago, updated_at=long_ago))
    restored = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=2)).timestamp()
    for root in (settings.spool_dir, settings.results_dir):
        for f in (root / "1.2.3").iterdir():
            os.utime(f, (restored, restored))
    report = Retention(settings, ledger, space=plenty, clock=utcnow).sweep()
    assert (report.studies, report.files) == (1, 3)
    assert files_of(settings, "1.2.3") == []


def test_files_a_restore_brings_back_after_the_purge_go_at_the_next_sweep(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    """The data directory restored from before a study's purge: its files are back, the
    ledger says they are gone, and no purge would look at them again. The next sweep deletes
    them, except a file younger than an hour (an arrival whose row is still to come)."""
    settings, ledger = ledger_node
    delivered_study(settings, ledger, "1.2.3")
    backup = settings.data_dir.parent / "backup"
    for root in (settings.spool_dir, settings.results_dir):
        shutil.copytree(root / "1.2.3", backup / root.name)
    assert Retention(settings, ledger, space=plenty, clock=later(200)).sweep().studies == 1
    assert files_of(settings, "1.2.3") == []
    last_night = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=2)).timestamp()
    for root in (settings.spool_dir, settings.results_dir):
        shutil.copytree(backup / root.name, root / "1.2.3")
        for f in (root / "1.2.3").iterdir():
            os.utime(f, (last_night, last_night))
    (settings.spool_dir / "1.2.3" / "1.2.3.9.dcm").write_bytes(b"\0" * 10)  # just written

    report = Retention(settings, ledger, space=plenty, clock=later(200)).sweep()
    assert (report.studies, report.files, report.bytes) == (0, 3, 2 * 1000 + 500)
    assert files_of(settings, "1.2.3") == ["1.2.3.9.dcm"]
    with ledger.session() as s:
        purge = s.scalars(select(Purge)).one()
        assert (purge.files, purge.bytes) == (6, 5000)
    assert Retention(settings, ledger, space=plenty, clock=later(200)).sweep().files == 0


def test_a_version_renamed_into_place_while_files_are_deleted_is_put_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "1.2.3"
    folder.mkdir()
    old = folder / "1.2.3.1.dcm"
    old.write_bytes(b"old")
    cutoff = utcnow() + dt.timedelta(seconds=1)
    real_rename = os.rename

    def rename_after_a_new_version(src: str, dst: str) -> None:
        if src == str(old):  # the sender's new version lands between the look and the rename
            new = folder / "incoming"
            new.write_bytes(b"new version")
            stamp = int((cutoff.replace(tzinfo=dt.timezone.utc).timestamp() + 5) * 1e9)
            os.utime(new, ns=(stamp, stamp))
            real_rename(new, src)
        real_rename(src, dst)

    monkeypatch.setattr(sweep_module.os, "rename", rename_after_a_new_version)
    assert sweep_module.delete_study_files(tmp_path, "1.2.3", cutoff) == (0, 0)
    assert old.read_bytes() == b"new version"
    assert sorted(p.name for p in folder.iterdir()) == ["1.2.3.1.dcm"]


def test_an_interrupted_purge_is_finished_by_the_next_sweep(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    settings, ledger = ledger_node
    delivered_study(settings, ledger, "1.2.3")
    store = RetentionStore(ledger)
    (candidate,) = store.candidates(unreviewed_before=utcnow() + HOUR, reviewed_before=None)
    claim = store.claim(candidate, "age")
    assert claim is not None and claim.instances == 2
    assert store.claim(candidate, "age") is None  # claimed once
    assert len(files_of(settings, "1.2.3")) == 3  # the process stopped here
    # A sweep right away leaves it (another process may be deleting them); later, it finishes.
    assert Retention(settings, ledger, space=plenty, clock=utcnow).sweep().files == 0
    report = Retention(settings, ledger, space=plenty, clock=later(0.1)).sweep()
    assert (report.studies, report.files) == (0, 3)
    assert files_of(settings, "1.2.3") == []
    with ledger.session() as s:
        assert s.scalars(select(Purge.finished_at)).one() is not None


def test_a_dry_run_lists_and_deletes_nothing_and_the_deletion_is_audited(
    ledger_node: tuple[Settings, Ledger], capsys: pytest.CaptureFixture[str]
) -> None:
    settings, ledger = ledger_node
    delivered_study(settings, ledger, "1.2.3")
    config = settings.data_dir.parent / "acwi.toml"
    config.write_text(
        f'[node]\ndata_dir = "{settings.data_dir}"\ndatabase_url = "{settings.database_url}"\n'
        "[retention]\nkeep_hours = 0.0001\nmin_free_percent = 0\n"
    )
    with ledger.session() as s:
        s.execute(update(Study).values(updated_at=utcnow() - HOUR))
    assert main(["--config", str(config), "retention", "--dry-run", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["planned"] == [{"study_uid": "1.2.3", "reason": "age"}]
    assert len(files_of(settings, "1.2.3")) == 3
    assert main(["--config", str(config), "retention"]) == 0
    close_audit()
    assert "deleted the files of 1 studies (1 by age): 3 files" in capsys.readouterr().out
    assert files_of(settings, "1.2.3") == []
    records = [json.loads(line) for line in audit_file(settings).read_text().splitlines()]
    deleted = [r for r in records if r["event"] == "study_deleted"]
    assert len(deleted) == 1 and deleted[0]["study_uids"] == ["1.2.3"]
    assert deleted[0]["event_id"]["code"] == "110105"
    assert main(["--config", str(config), "status"]) == 0
    assert "(files deleted 20" in capsys.readouterr().out


def test_retention_settings_are_validated() -> None:
    assert load_settings(None).retention.keep_hours == 168
    for bad in (
        {"keep_hours": -1},
        {"keep_hours": 1e9},
        {"min_free_percent": 100},
        {"interval_s": 0},
    ):
        with pytest.raises(ConfigError):
            load_settings(None, retention=bad)


def test_sweeps_failing_one_after_another_make_the_exporter_not_ready_until_one_finishes(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    """A retention sweep that always fails (a spool the process may not write, a ledger
    statement that always errs) leaves the data disk to fill: after three in a row the
    exporter's /readyz says so, and the failures are counted for the alert."""
    from prometheus_client import REGISTRY

    from acwi_node.observability.health import retention_check

    settings, ledger = ledger_node
    settings = settings.model_copy(
        update={"retention": settings.retention.model_copy(update={"interval_s": 0.01})}
    )
    retention = Retention(settings, ledger, space=plenty)
    check = retention_check(retention)
    assert check() == (True, "no sweep finished yet")
    outcomes = iter([RuntimeError("disk"), RuntimeError("disk"), None, *[PermissionError()] * 3])
    passes: list[tuple[int, bool]] = []  # failed in a row, and ready, as each sweep starts

    def sweep(*, dry_run: bool = False) -> sweep_module.SweepReport:
        passes.append((retention.failed_in_a_row, check()[0]))
        outcome = next(outcomes, None)
        if outcome is not None:
            raise outcome
        if len(passes) > 6:
            retention.stop()
        return sweep_module.SweepReport()

    retention.sweep = sweep  # type: ignore[method-assign]
    before = REGISTRY.get_sample_value("acwi_retention_sweep_failures_total") or 0.0
    retention.run()
    # Two failures, one success (the count starts again), three failures (not ready), a success.
    assert passes == [(0, True), (1, True), (2, True), (0, True), (1, True), (2, True), (3, False)]
    assert REGISTRY.get_sample_value("acwi_retention_sweep_failures_total") == before + 5
    assert retention.failed_in_a_row == 0 and retention.last_sweep is not None
    assert check()[0]
    retention.failed_in_a_row, retention.last_error = 3, "PermissionError"
    ok, detail = check()
    assert not ok and detail.startswith("3 sweeps in a row failed (PermissionError")


def test_the_free_space_of_a_data_directory_not_made_yet_is_its_file_systems(
    tmp_path: Path,
) -> None:
    """A node whose ledger is elsewhere (PostgreSQL) and which stored nothing yet has no data
    directory: ``acwi-node retention`` and the exporter's sweeps failed on it
    (FileNotFoundError); the space is that of the file system it will be made on."""
    from acwi_node.retention import disk_space

    space = disk_space(tmp_path / "not" / "made")
    assert space == disk_space(tmp_path) and space.total_bytes > 0
    assert not (tmp_path / "not").exists()


def age_files(folder: Path, hours: float) -> None:
    """Give ``folder`` and every file in it a modification time ``hours`` ago."""
    then = (dt.datetime.now(dt.timezone.utc) - hours * HOUR).timestamp()
    for f in folder.iterdir():
        os.utime(f, (then, then))
    os.utime(folder, (then, then))


def orphan_folder(root: Path, study: str, names: list[str], hours_old: float) -> Path:
    folder = root / study
    folder.mkdir(parents=True)
    for name in names:
        (folder / name).write_bytes(b"\0" * 100)
    age_files(folder, hours_old)
    return folder


def _held_journal(spool: Path) -> IngestJournal:
    """An ingest journal whose records no checkpoint retires while the test runs (its ledger
    is a stand-in: a checkpoint half a second after the last record, on a slow machine before
    the sweep looked, retired the record the test needs)."""
    return IngestJournal(
        spool / JOURNAL_DIR,
        spool,
        lambda: None,
        fsync=False,
        checkpoint_s=3600,
        checkpoint_idle_s=3600,
    )


def test_study_folders_the_ledger_has_no_row_of_go_once_older_than_orphan_keep_hours(
    ledger_node: tuple[Settings, Ledger], capsys: pytest.CaptureFixture[str]
) -> None:
    """A crash between a file and its row, a ledger restored older than the data directory,
    rows deleted by hand: folders of studies the ledger has no row of were never deleted.
    They go once their files are ``orphan_keep_hours`` old (720 by default); a young one, one
    whose study has a row, one the ingest journal still holds a record of (its row is still to
    come) stay, and so does a file younger than that in an old folder."""
    settings, ledger = ledger_node
    spool, results = settings.spool_dir, settings.results_dir
    orphan_folder(spool, "1.9.1", ["1.9.1.1.dcm", "1.9.1.2.dcm"], hours_old=721)
    orphan_folder(results, "1.9.1", ["sr.dcm"], hours_old=721)
    orphan_folder(results, "1.9.5", ["sr.dcm"], hours_old=800)  # results only
    orphan_folder(spool, "1.9.2", ["1.9.2.1.dcm"], hours_old=719)  # young
    young_files = orphan_folder(spool, "1.9.8", ["1.9.8.1.dcm"], hours_old=0)
    os.utime(young_files, (young_files.stat().st_mtime - 800 * 3600,) * 2)  # an old folder
    mixed = orphan_folder(spool, "1.9.4", ["1.9.4.1.dcm"], hours_old=721)
    old = mixed.stat().st_mtime
    (mixed / "1.9.4.2.dcm").write_bytes(b"\0" * 100)  # just written
    os.utime(mixed, (old, old))  # a folder restored with its time
    # a study the ledger knows, whose files are as old
    delivered_study(settings, ledger, "1.2.3")
    for root in (spool, results):
        age_files(root / "1.2.3", 800)
    # a study the running SCP journaled, its row not written yet
    journal = _held_journal(spool)
    journal.open()
    try:
        journal.done(
            journal.append({"study_uid": "1.9.3", "path": "1.9.3/1.9.3.1.dcm"}, b"\0" * 100)
        )
        orphan_folder(spool, "1.9.3", ["1.9.3.1.dcm"], hours_old=800)
        before = metrics.RETENTION_STUDIES_DELETED.labels("orphan")._value.get()

        config = settings.data_dir.parent / "acwi.toml"
        config.write_text(
            f'[node]\ndata_dir = "{settings.data_dir}"\ndatabase_url = "{settings.database_url}"\n'
            "[retention]\nmin_free_percent = 0\n"
        )
        assert main(["--config", str(config), "retention", "--dry-run", "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["planned"] == [
            {"study_uid": u, "reason": "orphan"} for u in ("1.9.1", "1.9.4", "1.9.5")
        ]
        assert (out["by_reason"], out["bytes"]) == ({"orphan": 3}, 500)
        assert files_of(settings, "1.9.1") == ["1.9.1.1.dcm", "1.9.1.2.dcm", "sr.dcm"]

        report = Retention(settings, ledger, space=plenty, clock=utcnow).sweep()
        assert (report.studies, report.files, report.bytes) == (3, 5, 500)
        assert dict(report.by_reason) == {"orphan": 3}
        assert metrics.RETENTION_STUDIES_DELETED.labels("orphan")._value.get() == before + 3
        assert not (spool / "1.9.1").exists() and not (results / "1.9.1").exists()
        assert not (results / "1.9.5").exists()
        assert files_of(settings, "1.9.4") == ["1.9.4.2.dcm"]
        assert files_of(settings, "1.9.2") == ["1.9.2.1.dcm"]
        assert files_of(settings, "1.9.8") == ["1.9.8.1.dcm"]
        assert files_of(settings, "1.9.3") == ["1.9.3.1.dcm"]
        assert len(files_of(settings, "1.2.3")) == 3
        assert Retention(settings, ledger, space=plenty, clock=utcnow).sweep().studies == 0
    finally:
        journal.close()


def test_a_journal_left_by_a_stopped_scp_keeps_its_studies_folders(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    """A journal the next start of the SCP replays (its process gone): a spooled record's file
    is the instance's only copy, and its row is still to come."""
    settings, ledger = ledger_node
    spool = settings.spool_dir
    journal = _held_journal(spool)
    journal.open()
    ticket = journal.write_spooled({"study_uid": "1.9.6", "path": "1.9.6/1.9.6.1.dcm"}, b"\0" * 100)
    journal.done(ticket)
    journal.wait_durable(ticket)
    left = journal.directory
    shutil.copytree(left, spool / JOURNAL_DIR / "4242-deadbeef")  # as a crash leaves it
    journal.close()
    assert any((spool / JOURNAL_DIR / "4242-deadbeef").glob("*.wal"))
    orphan_folder(spool, "1.9.6", ["1.9.6.1.dcm"], hours_old=800)
    orphan_folder(spool, "1.9.7", ["1.9.7.1.dcm"], hours_old=800)

    report = Retention(settings, ledger, space=plenty, clock=utcnow).sweep()
    assert dict(report.by_reason) == {"orphan": 1}
    assert files_of(settings, "1.9.6") == ["1.9.6.1.dcm"]
    assert files_of(settings, "1.9.7") == []


def test_orphan_keep_hours_zero_keeps_folders_without_rows_and_one_hour_is_the_least(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    settings, ledger = ledger_node
    orphan_folder(settings.spool_dir, "1.9.1", ["1.9.1.1.dcm"], hours_old=5000)
    orphan_folder(settings.spool_dir, "1.9.2", ["1.9.2.1.dcm"], hours_old=0.5)
    off = settings.model_copy(
        update={"retention": settings.retention.model_copy(update={"orphan_keep_hours": 0})}
    )
    assert Retention(off, ledger, space=plenty, clock=utcnow).sweep().studies == 0
    assert files_of(settings, "1.9.1") == ["1.9.1.1.dcm"]
    tiny = settings.model_copy(
        update={"retention": settings.retention.model_copy(update={"orphan_keep_hours": 0.01})}
    )
    report = Retention(tiny, ledger, space=plenty, clock=utcnow).sweep()
    assert dict(report.by_reason) == {"orphan": 1}
    assert files_of(settings, "1.9.1") == [] and files_of(settings, "1.9.2") == ["1.9.2.1.dcm"]
