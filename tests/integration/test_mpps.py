"""MPPS SCP and release-complete senders over real associations (pynetdicom as the modality).

The quiet period and the upper bound are set to an hour, so only the stronger signals can
complete a study; completion is driven by calling the completion pass directly and checked by
the study's state in the ledger, never by timing.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.association import Association

from acwi_node.config import Settings, load_settings
from acwi_node.ingest.completion import CompletionService
from acwi_node.ingest.mpps import (
    MPPS_DUPLICATE,
    MPPS_INVALID_VALUE,
    MPPS_NO_LONGER_UPDATABLE,
    MPPS_NO_SUCH_INSTANCE,
    MPPS_SOP_CLASS,
    CompletionSignals,
)
from acwi_node.ingest.scp import StorageSCP
from acwi_node.ingest.spool import Spool
from acwi_node.ledger import Ledger
from tests.integration.test_scp import SC, make_sc
from tests.support.ports import free_port

HOUR = 3600.0


class Node:
    """SCP + completion pass in this process; no routes, so nothing is ever enqueued."""

    def __init__(
        self,
        tmp_path: Path,
        ingest: dict[str, Any] | None = None,
        completion: dict[str, Any] | None = None,
    ) -> None:
        self.settings: Settings = load_settings(
            None,
            node={
                "data_dir": tmp_path / "data",
                "dicom_host": "127.0.0.1",
                "dicom_port": free_port(),
            },
            ingest={"fsync": False, "network_timeout_s": 5, "acse_timeout_s": 5, **(ingest or {})},
            completion={
                "quiet_period_s": HOUR,
                "max_wait_s": HOUR,
                "poll_interval_s": HOUR,
                **(completion or {}),
            },
        )
        self.ledger = Ledger(self.settings.database_url)
        self.signals = CompletionSignals(self.ledger)
        celery = Celery("acwi-test-mpps", broker="redis://127.0.0.1:6379/9")
        self.completion = CompletionService(
            self.settings, self.ledger, celery, signals=self.signals
        )
        self.scp = StorageSCP(
            self.settings,
            self.ledger,
            Spool(self.settings.spool_dir, fsync=False),
            signals=self.signals,
        )
        self.scp.start(block=False)

    def state(self, study_uid: str) -> str:
        study = self.ledger.get_study(study_uid)
        assert study is not None
        return str(study["state"])

    def close(self) -> None:
        self.scp.stop()
        self.ledger.dispose()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node(tmp_path)
    yield n
    n.close()


def associate(node: Node, calling: str = "MODALITY") -> Association:
    ae = AE(ae_title=calling)
    ae.add_requested_context(MPPS_SOP_CLASS, ExplicitVRLittleEndian)
    ae.add_requested_context(SC, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.settings.node.dicom_port, ae_title="ACWI")
    assert assoc.is_established
    return assoc


def release(node: Node, assoc: Association) -> None:
    """Release, then wait until the node has recorded the association's end.

    The sender's release returns when the A-RELEASE-RP arrives; the node records the end
    (ledger, release-complete signal) when the connection closes, a moment later.
    """
    assoc.release()
    deadline = time.monotonic() + 10
    while node.scp.open_associations:
        assert time.monotonic() < deadline, "the node never recorded the association's end"
        time.sleep(0.01)


def store(node: Node, datasets: list[Dataset], calling: str = "MODALITY") -> None:
    assoc = associate(node, calling)
    try:
        assert [int(assoc.send_c_store(ds).Status) for ds in datasets] == [0] * len(datasets)
    finally:
        release(node, assoc)


def step_created(study_uid: str) -> Dataset:
    ds = Dataset()
    item = Dataset()
    item.StudyInstanceUID = study_uid
    item.AccessionNumber = "A1"
    ds.ScheduledStepAttributesSequence = [item]
    ds.PatientName = "MPPS^TEST"
    ds.Modality = "OT"
    ds.PerformedProcedureStepID = "PPS1"
    ds.PerformedProcedureStepStatus = "IN PROGRESS"
    ds.PerformedSeriesSequence = []
    return ds


def step_completed(series_uid: str, sop_uids: list[str]) -> Dataset:
    ds = Dataset()
    series = Dataset()
    series.SeriesInstanceUID = series_uid
    refs = []
    for uid in sop_uids:
        ref = Dataset()
        ref.ReferencedSOPClassUID = SC
        ref.ReferencedSOPInstanceUID = uid
        refs.append(ref)
    series.ReferencedImageSequence = refs
    ds.PerformedSeriesSequence = [series]
    ds.PerformedProcedureStepStatus = "COMPLETED"
    return ds


def n_create(assoc: Association, attrs: Dataset, uid: str | None) -> int:
    status, _ = assoc.send_n_create(attrs, MPPS_SOP_CLASS, uid)
    return int(status.Status)


def n_set(assoc: Association, mods: Dataset, uid: str) -> int:
    status, _ = assoc.send_n_set(mods, MPPS_SOP_CLASS, uid)
    return int(status.Status)


def test_mpps_completed_completes_the_study_without_the_quiet_period(node: Node) -> None:
    study = generate_uid()
    datasets = [make_sc(study) for _ in range(3)]
    sops = [str(ds.SOPInstanceUID) for ds in datasets]
    step = generate_uid()

    assoc = associate(node)
    assert n_create(assoc, step_created(study), step) == 0
    release(node, assoc)
    store(node, datasets)
    node.completion.tick()
    assert node.state(study) == "receiving"  # released, but the quiet period is an hour

    assoc = associate(node)
    assert n_set(assoc, step_completed(generate_uid(), sops), step) == 0
    release(node, assoc)
    assert node.scp.mpps is not None and node.scp.mpps.status_of(step) == "COMPLETED"
    node.completion.tick()
    assert node.state(study) == "not_routed"
    assert node.signals.pending == 0


def test_mpps_completed_before_the_last_instance_waits_for_it(node: Node) -> None:
    study = generate_uid()
    datasets = [make_sc(study) for _ in range(3)]
    sops = [str(ds.SOPInstanceUID) for ds in datasets]
    step = generate_uid()

    assoc = associate(node)
    assert n_create(assoc, step_created(study), step) == 0
    assert [int(assoc.send_c_store(ds).Status) for ds in datasets[:2]] == [0, 0]
    assert n_set(assoc, step_completed(generate_uid(), sops), step) == 0
    node.completion.tick()
    assert node.state(study) == "receiving"  # one listed instance is missing
    assert int(assoc.send_c_store(datasets[2]).Status) == 0
    # The association is still open: only MPPS can complete it, once the instance's row is
    # written (at the latest when the association has been quiet for reactor.IDLE_S).
    deadline = time.monotonic() + 5
    while node.state(study) == "receiving" and time.monotonic() < deadline:
        node.completion.tick()
        time.sleep(0.01)
    assert node.state(study) == "not_routed"
    assoc.release()


def test_discontinued_step_leaves_the_study_to_the_quiet_period(node: Node) -> None:
    study = generate_uid()
    ds = make_sc(study)
    step = generate_uid()
    assoc = associate(node)
    assert n_create(assoc, step_created(study), step) == 0
    assert int(assoc.send_c_store(ds).Status) == 0
    mods = step_completed(generate_uid(), [str(ds.SOPInstanceUID)])
    mods.PerformedProcedureStepStatus = "DISCONTINUED"
    assert n_set(assoc, mods, step) == 0
    assoc.release()
    node.completion.tick()
    assert node.state(study) == "receiving"


def test_mpps_statuses(node: Node) -> None:
    study = generate_uid()
    step = generate_uid()
    assoc = associate(node)
    try:
        assert n_set(assoc, step_completed(study, [generate_uid()]), step) == MPPS_NO_SUCH_INSTANCE
        bad = step_created(study)
        bad.PerformedProcedureStepStatus = "COMPLETED"
        assert n_create(assoc, bad, step) == MPPS_INVALID_VALUE
        assert n_create(assoc, step_created(study), step) == 0
        assert n_create(assoc, step_created(study), step) == MPPS_DUPLICATE
        odd = Dataset()
        odd.PerformedProcedureStepStatus = "PAUSED"
        assert n_set(assoc, odd, step) == MPPS_INVALID_VALUE
        assert n_set(assoc, step_completed(study, [generate_uid()]), step) == 0
        again = step_completed(study, [generate_uid()])
        assert n_set(assoc, again, step) == MPPS_NO_LONGER_UPDATABLE
        # No Affected SOP Instance UID: the node assigns one.
        assert n_create(assoc, step_created(study), None) == 0
    finally:
        assoc.release()
    node.completion.tick()
    assert node.ledger.get_study(study) is None  # no instance ever arrived
    assert node.signals.pending == 1  # the completed step still waits for its instance


def test_release_complete_sender(tmp_path: Path) -> None:
    node = Node(tmp_path, completion={"release_complete_aes": ["PACS"]})
    try:
        trusted, other = generate_uid(), generate_uid()
        store(node, [make_sc(trusted), make_sc(trusted)], calling="PACS")
        store(node, [make_sc(other)], calling="MODALITY")
        node.completion.tick()
        assert node.state(trusted) == "not_routed"
        assert node.state(other) == "receiving"
    finally:
        node.close()


def test_release_is_recorded_before_the_sender_is_answered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sender closes the connection as soon as it has the A-RELEASE-RP; the node must have
    marked the association as released by then, or the close looks like an abort and the
    release-complete signal is lost. A slow release handler makes the old race certain."""
    on_released = StorageSCP._on_released

    def slow_on_released(self: StorageSCP, event: Any) -> None:
        time.sleep(0.3)
        on_released(self, event)

    monkeypatch.setattr(StorageSCP, "_on_released", slow_on_released)
    node = Node(tmp_path, completion={"release_complete_aes": ["PACS"]})
    try:
        study = generate_uid()
        store(node, [make_sc(study)], calling="PACS")
        node.completion.tick()
        assert node.state(study) == "not_routed"
    finally:
        node.close()


def test_mpps_can_be_turned_off(tmp_path: Path) -> None:
    node = Node(tmp_path, ingest={"mpps": False})
    try:
        assert node.scp.mpps is None
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(MPPS_SOP_CLASS, ExplicitVRLittleEndian)
        ae.add_requested_context(SC, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", node.settings.node.dicom_port, ae_title="ACWI")
        assert assoc.is_established
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        assoc.release()
        assert accepted == {SC}
    finally:
        node.close()


def test_a_step_spans_scp_processes_that_share_the_ledger(tmp_path: Path) -> None:
    """With ``ingest.processes`` > 1 a step's N-CREATE and N-SET may reach different processes.

    Two SCPs (each with its own signals, as separate processes have) share one ledger.
    """
    first, second = Node(tmp_path), Node(tmp_path)
    try:
        study = generate_uid()
        ds = make_sc(study)
        step = generate_uid()
        assoc = associate(first)
        assert n_create(assoc, step_created(study), step) == 0
        release(first, assoc)
        assoc = associate(second)
        assert n_create(assoc, step_created(study), step) == MPPS_DUPLICATE
        assert int(assoc.send_c_store(ds).Status) == 0
        assert n_set(assoc, step_completed(study, [str(ds.SOPInstanceUID)]), step) == 0
        # Still open: only the step can complete the study, and only the first process's
        # completion loop runs.
        first.completion.tick()
        assert first.state(study) == "not_routed"
        assert first.scp.mpps is not None and first.scp.mpps.status_of(step) == "COMPLETED"
        release(second, assoc)
    finally:
        second.close()
        first.close()
