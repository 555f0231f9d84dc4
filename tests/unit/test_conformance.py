"""docs/conformance.md states exactly what the code negotiates and answers.

The SOP classes must be exactly pynetdicom's ``AllStoragePresentationContexts``, the transfer
syntaxes exactly ``acwi_node.ingest.scp.TRANSFER_SYNTAXES``, the C-STORE statuses exactly the
``STATUS_*`` constants of ``acwi_node/ingest/scp.py``, the Query/Retrieve SCU's contexts and
C-MOVE failures exactly what ``acwi_node.ingest.qr_scu`` proposes and knows, and the generated
tables must be what ``docs/gen_conformance_tables.py`` prints today.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import cast

import pytest
from pynetdicom import AllStoragePresentationContexts

from acwi_node.export.commitment import FAILURE_REASONS
from acwi_node.export.scu import (
    DELIVERED_WARNING_STATUSES,
    STORAGE_COMMITMENT_INSTANCE,
    STORAGE_COMMITMENT_PUSH_MODEL,
)
from acwi_node.ingest import scp
from acwi_node.ingest.mpps import MPPS_SOP_CLASS
from acwi_node.ingest.qr_scu import (
    GET_STORAGE_CLASSES,
    GET_TRANSFER_SYNTAXES,
    MAX_CONTEXTS,
    MOVE_FAILURES,
    STUDY_ROOT_FIND,
    STUDY_ROOT_GET,
    STUDY_ROOT_MOVE,
)
from acwi_node.ingest.scp import TRANSFER_SYNTAXES, StorageSCP
from acwi_node.ingest.spool import Spool
from acwi_node.ledger import Ledger

ROOT = Path(__file__).resolve().parents[2]
DOCUMENT = ROOT / "docs" / "conformance.md"
GENERATOR = ROOT / "docs" / "gen_conformance_tables.py"
VERIFICATION = "1.2.840.10008.1.1"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"

DICOM_UID = re.compile(r"(?<![\d.])1\.2\.840\.10008(?:\.\d+)+")
STATUS_CELL = re.compile(r"\|\s*([0-9A-F]{4})\s*\|")


@pytest.fixture(scope="module")
def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_conformance_tables", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def document() -> str:
    return DOCUMENT.read_text(encoding="utf-8")


def block(generator: ModuleType, document: str, name: str) -> str:
    return cast(str, generator.extract(document, name))


def storage_sop_classes() -> list[str]:
    return [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts]


def scp_status_constants() -> dict[str, int]:
    """``STATUS_* = 0x....`` assignments, read from the source of acwi_node/ingest/scp.py."""
    tree = ast.parse(Path(scp.__file__).read_text(encoding="utf-8"))
    found: dict[str, int] = {}
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)):
            continue
        value = node.value.value
        for target in node.targets:
            if isinstance(target, ast.Name) and target.id.startswith("STATUS_"):
                assert isinstance(value, int), target.id
                found[target.id] = value
    return found


def test_status_constants_are_the_ones_documented_by_the_brief() -> None:
    assert set(scp_status_constants().values()) >= {
        0x0000,
        0xA700,
        0xA701,
        0xC000,
        0xC001,
        0xC002,
    }


def test_sop_class_table_is_exactly_all_storage_sop_classes(
    generator: ModuleType, document: str
) -> None:
    listed = DICOM_UID.findall(block(generator, document, "sop-classes"))
    assert len(listed) == len(set(listed)), "a SOP Class is listed twice"
    assert set(listed) == set(storage_sop_classes())
    assert COMPREHENSIVE_3D_SR in listed and SECONDARY_CAPTURE in listed


def test_transfer_syntax_table_is_exactly_the_accepted_list(
    generator: ModuleType, document: str
) -> None:
    listed = DICOM_UID.findall(block(generator, document, "transfer-syntaxes"))
    assert listed == list(TRANSFER_SYNTAXES)


def test_the_document_claims_nothing_the_code_does_not_do(document: str) -> None:
    known = (
        set(storage_sop_classes())
        | set(TRANSFER_SYNTAXES)
        | {VERIFICATION, APPLICATION_CONTEXT, MPPS_SOP_CLASS}
        | {STORAGE_COMMITMENT_PUSH_MODEL, STORAGE_COMMITMENT_INSTANCE}
        | {STUDY_ROOT_FIND, STUDY_ROOT_MOVE, STUDY_ROOT_GET}
    )
    unknown = sorted(set(DICOM_UID.findall(document)) - known)
    assert not unknown, f"UIDs the node neither accepts nor uses: {unknown}"


def test_the_real_acceptor_negotiates_what_the_document_says(
    generator: ModuleType, document: str
) -> None:
    from acwi_node.config import Settings

    ae = StorageSCP(Settings(), cast(Ledger, None), cast(Spool, None)).ae
    contexts = {str(cx.abstract_syntax): list(cx.transfer_syntax) for cx in ae.supported_contexts}
    assert VERIFICATION in contexts
    storage = {
        uid: syntaxes
        for uid, syntaxes in contexts.items()
        if uid not in (VERIFICATION, MPPS_SOP_CLASS)
    }
    assert set(storage) == set(DICOM_UID.findall(block(generator, document, "sop-classes")))
    for uid, syntaxes in storage.items():
        assert syntaxes == list(TRANSFER_SYNTAXES), uid
    verification = block(generator, document, "verification")
    listed = set(DICOM_UID.findall(verification)) - {VERIFICATION}
    assert listed == {str(ts) for ts in contexts[VERIFICATION]}
    mpps = block(generator, document, "mpps")
    assert MPPS_SOP_CLASS in mpps
    listed = set(DICOM_UID.findall(mpps)) - {MPPS_SOP_CLASS}
    assert listed == {str(ts) for ts in contexts[MPPS_SOP_CLASS]}
    assert STORAGE_COMMITMENT_PUSH_MODEL not in contexts  # no destination asks for it


def test_storage_commitment_reports_are_negotiated_as_the_document_says(
    generator: ModuleType, document: str
) -> None:
    from acwi_node.config import Settings

    settings = Settings(
        destinations=[
            {"name": "pacs", "ae_title": "PACS", "host": "pacs", "port": 104,
             "storage_commitment": True},
        ]
    )  # fmt: skip
    ae = StorageSCP(settings, cast(Ledger, None), cast(Spool, None)).ae
    (context,) = [
        cx for cx in ae.supported_contexts if cx.abstract_syntax == STORAGE_COMMITMENT_PUSH_MODEL
    ]
    # The destination (the association requestor) may take the SCP role, not the SCU role.
    assert (context.scu_role, context.scp_role) == (False, True)
    table = block(generator, document, "storage-commitment")
    listed = set(DICOM_UID.findall(table)) - {STORAGE_COMMITMENT_PUSH_MODEL}
    assert listed == {str(ts) for ts in context.transfer_syntax}
    reasons = STATUS_CELL.findall(block(generator, document, "commitment-failure-reasons"))
    assert {int(code, 16) for code in reasons} == set(FAILURE_REASONS)


def test_scp_status_table_is_exactly_the_statuses_in_scp_py(
    generator: ModuleType, document: str
) -> None:
    listed = STATUS_CELL.findall(block(generator, document, "scp-status"))
    assert len(listed) == len(set(listed))
    assert {int(code, 16) for code in listed} == set(scp_status_constants().values())


def test_scu_section_lists_what_the_exporter_sends_and_accepts(
    generator: ModuleType, document: str
) -> None:
    scu = document[document.index("#### 4.2.2 STORAGE-SCU AE") :]
    assert COMPREHENSIVE_3D_SR in scu and SECONDARY_CAPTURE in scu
    listed = STATUS_CELL.findall(block(generator, document, "scu-status"))
    assert {int(code, 16) for code in listed} == {0x0000, *DELIVERED_WARNING_STATUSES}


def test_qr_scu_section_lists_what_the_retrieval_proposes_and_handles(
    generator: ModuleType, document: str
) -> None:
    proposed = generator.qr_proposed_contexts()
    models = [STUDY_ROOT_FIND, STUDY_ROOT_MOVE, STUDY_ROOT_GET]
    assert [str(cx.abstract_syntax) for cx in proposed[:3]] == models
    # The C-GET association: its storage contexts, the classes the storage SCP accepts,
    # within the limit of one association.
    get_storage = proposed[3:]
    assert [str(cx.abstract_syntax) for cx in get_storage] == GET_STORAGE_CLASSES
    assert len(get_storage) + 1 == MAX_CONTEXTS
    assert set(GET_STORAGE_CLASSES) <= set(storage_sop_classes())
    assert set(GET_TRANSFER_SYNTAXES) <= set(TRANSFER_SYNTAXES)
    listed_classes = DICOM_UID.findall(block(generator, document, "get-storage"))
    assert listed_classes == GET_STORAGE_CLASSES + GET_TRANSFER_SYNTAXES
    table = block(generator, document, "qr-scu")
    for cx in proposed[:3]:
        rows = [line for line in table.splitlines() if str(cx.abstract_syntax) in line]
        listed = [uid for row in rows for uid in DICOM_UID.findall(row)[1:]]
        assert listed == [str(ts) for ts in cx.transfer_syntax]
        assert all("| SCU |" in row for row in rows)
    listed = STATUS_CELL.findall(block(generator, document, "move-status"))
    assert {int(code, 16) for code in listed} == {0x0000, 0xB000, 0xFF00, *MOVE_FAILURES}
    qr = document[document.index("#### 4.2.4 QUERY-RETRIEVE-SCU AE") :]
    for keyword in ("max_studies", "max_attempts", "backoff_s", "timeout_s", "move_destination"):
        assert keyword in qr, keyword


def test_the_statement_has_the_ps3_2_structure(document: str) -> None:
    for heading in (
        "## 1 Conformance Statement Overview",
        "### 4.1 Implementation Model",
        "#### 4.2.1 STORAGE-SCP AE",
        "##### 4.2.1.2 Association policies",
        "##### 4.2.1.4 Association acceptance policy",
        "#### 4.2.2 STORAGE-SCU AE",
        "#### 4.2.4 QUERY-RETRIEVE-SCU AE",
        "### 4.4 Configuration",
        "## 6 Support of Character Sets",
        "## 7 Security",
        "#### 8.1.1 Comprehensive 3D SR",
    ):
        assert heading in document, heading
    assert "TID 1500" in document
    assert "allowed_calling_aes" in document
    assert "TLS" in document


def test_generated_tables_are_current(generator: ModuleType, document: str) -> None:
    for name, content in generator.blocks().items():
        assert block(generator, document, name) == content, (
            f"the {name} table is stale: python docs/gen_conformance_tables.py --write"
        )


def test_generator_check_and_write(generator: ModuleType, tmp_path: Path) -> None:
    stale = tmp_path / "conformance.md"
    stale.write_text(
        DOCUMENT.read_text(encoding="utf-8").replace(TRANSFER_SYNTAXES[-1], "1.2.3"),
        encoding="utf-8",
    )
    assert generator.main(["--check", "--document", str(stale)]) == 1
    assert generator.main(["--write", "--document", str(stale)]) == 0
    assert stale.read_text(encoding="utf-8") == DOCUMENT.read_text(encoding="utf-8")
    assert generator.main(["--check", "--document", str(stale)]) == 0


def test_generator_prints_the_tables(
    generator: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    assert generator.main([]) == 0
    printed = capsys.readouterr().out
    assert all(ts in printed for ts in TRANSFER_SYNTAXES)
    assert all(uid in printed for uid in storage_sop_classes())


def test_generator_refuses_an_undescribed_status(
    generator: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(scp, "STATUS_SOMETHING_NEW", 0xA7FF, raising=False)
    with pytest.raises(ValueError, match="STATUS_SOMETHING_NEW"):
        generator.scp_status_block()
