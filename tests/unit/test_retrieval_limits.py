"""Retrievals from a PACS that never ends its answer (pending C-MOVE, C-GET or C-FIND
responses without end), and the retrieval commands' arguments. The PACS is simulated at the
level of its DIMSE responses; over real associations: ``tests/integration/test_retrieval.py``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset

from acwi_node.cli import main
from acwi_node.ingest import qr_scu
from acwi_node.ingest.qr_scu import _follow, find_studies, find_study_header

STUDY = "1.2.826.0.1.3680043.8.498.1"


class Clock:
    """``time.monotonic`` for qr_scu: each response of the simulated PACS takes ``step`` s."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def pending(
    clock: Clock, count: int, *, progress: bool, step: float = 1.0
) -> Iterator[tuple[Dataset, None]]:
    """``count`` pending C-MOVE responses ``step`` s apart, then success (0000)."""
    for i in range(count):
        clock.now += step
        status = Dataset()
        status.Status = 0xFF00
        done = i + 1 if progress else 1
        status.NumberOfRemainingSuboperations = count + 1 - done
        status.NumberOfCompletedSuboperations = done
        status.NumberOfFailedSuboperations = 0
        status.NumberOfWarningSuboperations = 0
        yield status, None
    final = Dataset()
    final.Status = 0x0000
    final.NumberOfCompletedSuboperations = count + 1
    yield final, None


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(qr_scu.time, "monotonic", fake)
    return fake


def test_a_move_pending_without_progress_for_the_timeout_fails(clock: Clock) -> None:
    renewed: list[int] = []
    moved = _follow(
        pending(clock, 1000, progress=False),
        "C-MOVE",
        "PACS@pacs:104",
        30.0,
        lambda: renewed.append(1),
        lambda code, completed: "",
    )
    assert not moved.ok and moved.status is None
    assert moved.error == (
        "PACS@pacs:104 kept answering the C-MOVE pending with no sub-operation ending for 30 s"
    )
    assert len(renewed) < 40  # it gave up after the timeout, not at the PACS's end


def test_a_long_move_that_progresses_is_followed_to_its_end(clock: Clock) -> None:
    moved = _follow(
        pending(clock, 1000, progress=True),
        "C-MOVE",
        "PACS@pacs:104",
        30.0,
        None,
        lambda code, completed: "",
    )
    assert moved.ok and moved.status == 0x0000 and moved.completed == 1001


class FakeAssoc:
    """An association whose PACS answers every C-FIND with ``answers`` pending responses."""

    def __init__(self, answers: list[Dataset | None]) -> None:
        self.answers = answers
        self.accepted_contexts = [object()]
        self.is_established = True
        self.aborted = False

    def send_c_find(self, identifier: Dataset, model: Any) -> Iterator[tuple[Dataset, Any]]:
        for answer in self.answers:
            if self.aborted:
                return
            status = Dataset()
            status.Status = 0xFF00
            yield status, answer
        final = Dataset()
        final.Status = 0x0000
        yield final, None

    def abort(self) -> None:
        self.aborted = True
        self.is_established = False

    def is_alive(self) -> bool:
        return not self.aborted


def match(uid: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = uid
    return ds


def connect(monkeypatch: pytest.MonkeyPatch, assoc: FakeAssoc) -> None:
    monkeypatch.setattr(qr_scu, "open_association", lambda *a, **k: (assoc, ""))


PEER: dict[str, Any] = {"called_ae": "PACS", "host": "pacs", "port": 104, "calling_ae": "ACWI"}


def test_a_find_answering_the_same_study_again_and_again_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assoc = FakeAssoc([match(STUDY)] * 5000)
    connect(monkeypatch, assoc)
    found = find_studies({"study_uid": STUDY}, **PEER, limit=200)
    assert not found.ok and found.final and assoc.aborted
    assert found.error == (
        "PACS@pacs:104 answered more than 200 matches (retrieve.max_studies) for 1 distinct"
        " study(ies)"
    )


def test_a_find_answering_unusable_matches_without_end_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assoc = FakeAssoc([match("")] * 5000)
    connect(monkeypatch, assoc)
    found = find_studies({"accession_number": "A1"}, **PEER, limit=10)
    assert not found.ok and found.final
    assert found.error.endswith("for 0 distinct study(ies), 11 without a usable Study Instance UID")


def test_a_find_of_as_many_studies_as_allowed_is_read_to_its_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assoc = FakeAssoc([match(f"{STUDY}.{i}") for i in range(10)])
    connect(monkeypatch, assoc)
    found = find_studies({"study_date": "20260101"}, **PEER, limit=10)
    assert found.ok and len(found.studies) == 10 and not assoc.aborted


def test_a_find_pending_without_end_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qr_scu, "MAX_FIND_RESPONSES", 50)
    assoc = FakeAssoc([None] * 5000)  # pending responses that carry no match at all
    connect(monkeypatch, assoc)
    header = find_study_header(STUDY, **PEER)
    assert not header.ok and assoc.aborted
    assert header.error == "PACS@pacs:104 answered more than 50 C-FIND responses"


def test_the_sop_classes_of_a_study_are_not_asked_without_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(qr_scu, "MAX_FIND_RESPONSES", 50)
    assoc = FakeAssoc([match(STUDY)] * 5000)  # never SOP Classes in Study, never an end
    connect(monkeypatch, assoc)
    assert qr_scu.study_sop_classes(STUDY, **PEER) == []
    assert assoc.aborted


# ------------------------------------------------------------------ command line
@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "acwi-node.toml"
    path.write_text(
        f'[node]\ndata_dir = "{tmp_path / "data"}"\n\n[[sources]]\nname = "pacs"\n'
        'ae_title = "PACS"\nhost = "127.0.0.1"\nport = 104\n'
    )
    return path


@pytest.mark.parametrize("wait", ["-5", "nan"])
def test_a_retrieval_with_a_wrong_wait_is_refused_before_it_is_queued(
    config: Path, wait: str, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--config", str(config), "studies"]
    assert main([*base, "retrieve", "pacs", "--study-uid", STUDY, "--wait", wait]) == 2
    assert f"--wait {wait}: give a number of seconds, 0 or more" in capsys.readouterr().err
    assert main([*base, "retrievals"]) == 0
    assert capsys.readouterr().out == "no retrievals\n"


@pytest.mark.parametrize("limit", ["0", "-1"])
def test_listing_retrievals_with_a_wrong_limit_is_refused(
    config: Path, limit: str, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--config", str(config), "studies"]
    assert main([*base, "retrieve", "pacs", "--study-uid", STUDY]) == 0
    capsys.readouterr()
    assert main([*base, "retrievals", "--limit", limit]) == 2
    assert f"--limit {limit}: give a number above 0" in capsys.readouterr().err
