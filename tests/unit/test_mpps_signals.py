"""CompletionSignals and the MPPS attribute readers against a real (SQLite) ledger."""

from __future__ import annotations

import datetime as dt
import logging
from types import SimpleNamespace
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom.dimse_primitives import N_CREATE, N_SET
from sqlalchemy import select, update

from acwi_node.ingest.mpps import (
    MPPS_INVALID_VALUE,
    MPPS_SOP_CLASS,
    RETENTION,
    CompletionSignals,
    MppsSCP,
    referenced_instances,
    step_studies,
)
from acwi_node.ledger import InstanceRecord, Ledger
from acwi_node.ledger.models import CompletionSignal, MppsStep, utcnow


def record(ledger: Ledger, study: str, sop: str, *, first: bool = True) -> int:
    rec = InstanceRecord(
        study_uid=study,
        sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.7",
        series_uid="",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        modality="OT",
        body_part="",
        path=f"{study}/{sop}.dcm",
        size=1,
        calling_ae="MODALITY",
    )
    return ledger.record_instance(rec, first_in_association=first).study_id


def test_referenced_instances_and_studies() -> None:
    ds = Dataset()
    series = Dataset()
    img, other = Dataset(), Dataset()
    img.ReferencedSOPInstanceUID = "1.2.3"
    other.ReferencedSOPInstanceUID = "1.2.4"
    series.ReferencedImageSequence = [img]
    series.ReferencedNonImageCompositeSOPInstanceSequence = [other]
    ds.PerformedSeriesSequence = [series]
    step = Dataset()
    step.StudyInstanceUID = "1.9"
    ds.ScheduledStepAttributesSequence = [step]
    assert referenced_instances(ds) == {"1.2.3", "1.2.4"}
    assert step_studies(ds) == {"1.9"}
    assert referenced_instances(Dataset()) == set()


def test_expectation_is_due_only_once_every_instance_arrived(ledger: Ledger) -> None:
    woken: list[int] = []
    signals = CompletionSignals(ledger, wake=lambda: woken.append(1))
    study, sops = generate_uid(), [generate_uid() for _ in range(3)]
    study_id = record(ledger, study, sops[0])
    signals.expect("1.2.99", [study], sops)
    assert woken and signals.due() == []
    record(ledger, study, sops[1], first=False)
    signals.instance_arrived(study)
    assert signals.due() == []
    record(ledger, study, sops[2], first=False)
    assert signals.due() == [(study_id, 1)]
    assert signals.pending == 0 and signals.due() == []


def test_step_listing_nothing_is_ignored(ledger: Ledger) -> None:
    signals = CompletionSignals(ledger)
    signals.expect("1.2.98", ["1.2.3"], [])
    assert signals.pending == 0


def test_released_study_waits_for_other_open_associations(ledger: Ledger) -> None:
    signals = CompletionSignals(ledger)
    study = generate_uid()
    study_id = record(ledger, study, generate_uid())  # association 1 open
    record(ledger, study, generate_uid(), first=True)  # association 2 open
    ledger.association_released([study_id])
    signals.released([study_id])
    assert signals.due() == []  # association 2 still sends
    ledger.association_released([study_id])
    assert signals.due() == [(study_id, 1)]
    assert signals.pending == 0


def test_signals_recorded_by_one_process_are_due_in_another(ledger: Ledger, settings: Any) -> None:
    """Several SCP processes record signals; the completion loop's process spends them once."""
    scp_side = CompletionSignals(ledger)
    completion_side = CompletionSignals(Ledger(settings.database_url))  # its own connections
    study = generate_uid()
    sop = generate_uid()
    study_id = record(ledger, study, sop)
    ledger.association_released([study_id])
    scp_side.expect("1.2.97", [study], [sop])
    scp_side.released([study_id])
    assert completion_side.pending == 2
    assert completion_side.due() == [(study_id, 1)]
    assert scp_side.pending == 0 and scp_side.due() == []


def test_old_signals_and_steps_are_forgotten(ledger: Ledger) -> None:
    signals = CompletionSignals(ledger)
    signals.expect("1.2.96", [generate_uid()], [generate_uid()])  # its instance never comes
    with ledger.session() as s:
        s.add(MppsStep(step_uid="1.2.96", status="COMPLETED"))
        s.add(MppsStep(step_uid="1.2.95", status="IN PROGRESS"))
    assert signals.due() == [] and signals.pending == 1
    old = utcnow() - RETENTION - dt.timedelta(minutes=1)
    with ledger.session() as s:
        s.execute(update(CompletionSignal).values(created_at=old))
        s.execute(update(MppsStep).where(MppsStep.step_uid == "1.2.96").values(updated_at=old))
    assert CompletionSignals(ledger).due() == []  # a fresh loop cleans up on its first pass
    assert signals.pending == 0
    with ledger.session() as s:
        assert s.scalars(select(MppsStep.step_uid)).all() == ["1.2.95"]


def mpps_event(attrs: Dataset, *, create: bool = True) -> Any:
    """An EVT_N_CREATE (or EVT_N_SET) event as the MPPS handlers read it."""
    if create:
        request = N_CREATE()
        request.AffectedSOPClassUID = MPPS_SOP_CLASS
        request.AffectedSOPInstanceUID = generate_uid()
        return SimpleNamespace(request=request, attribute_list=attrs)
    modification = N_SET()
    modification.RequestedSOPClassUID = MPPS_SOP_CLASS
    modification.RequestedSOPInstanceUID = generate_uid()
    return SimpleNamespace(request=modification, modification_list=attrs)


def test_mpps_values_never_reach_the_log(
    ledger: Ledger, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refused status is not quoted (a modality may put anything there), and the patient of
    an N-CREATE or N-SET is noted for the log filter, as a C-STORE's is."""
    import acwi_node.observability.logging as node_logging

    identifiers = node_logging._Identifiers()
    monkeypatch.setattr(node_logging, "_IDENTIFIERS", identifiers)
    scp = MppsSCP(ledger, None)
    attrs = Dataset()
    attrs.PatientName = "Mppsleak^Herbert"
    attrs.PatientID = "MPPSPID4711"
    attrs.PerformedProcedureStepStatus = "Mppsleak^Herbert"
    with caplog.at_level(logging.INFO, logger="acwi_node.mpps"):
        assert scp.handle_n_create(mpps_event(attrs)) == (MPPS_INVALID_VALUE, None)
    (refused,) = [r.getMessage() for r in caplog.records if r.name == "acwi_node.mpps"]
    assert "Mppsleak" not in refused and "refused with 0x0106" in refused
    redacted = "[redacted] [redacted] [redacted]"
    assert identifiers.redact("Herbert MPPSPID4711 mppsleak") == redacted

    modifications = Dataset()
    modifications.PatientName = "Setonly^Gertrude"
    modifications.PerformedProcedureStepStatus = "PAUSED"
    assert scp.handle_n_set(mpps_event(modifications, create=False))[0] == MPPS_INVALID_VALUE
    assert identifiers.redact("Gertrude Setonly") == "[redacted]"
