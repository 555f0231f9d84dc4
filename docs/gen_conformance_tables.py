"""Generate the tables of docs/conformance.md that come from the code.

The storage SCP's presentation contexts are read from the application entity the node really
builds (``acwi_node.ingest.scp.StorageSCP``): pynetdicom's ``AllStoragePresentationContexts``,
each with ``TRANSFER_SYNTAXES``, plus Verification. The DIMSE statuses are the ``STATUS_*``
constants of ``acwi_node/ingest/scp.py``; the warnings the SCU accepts as delivered are
``acwi_node.export.scu.DELIVERED_WARNING_STATUSES``. The Query/Retrieve SCU's presentation
contexts are those ``acwi_node.ingest.qr_scu`` really proposes (caught before it connects), and
its C-MOVE failure statuses are ``acwi_node.ingest.qr_scu.MOVE_FAILURES``.

    python docs/gen_conformance_tables.py            # print every generated block
    python docs/gen_conformance_tables.py --check    # exit 1 if docs/conformance.md is stale
    python docs/gen_conformance_tables.py --write    # rewrite the blocks in docs/conformance.md

In the document each block sits between ``<!-- generated:NAME -->`` and
``<!-- end generated:NAME -->``; the text outside the markers is written by hand.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pynetdicom.sop_class  # noqa: E402
from pydicom.uid import UID  # noqa: E402
from pynetdicom import AE  # noqa: E402
from pynetdicom.presentation import PresentationContext  # noqa: E402

from acwi_node.config import Settings  # noqa: E402
from acwi_node.export import commitment  # noqa: E402
from acwi_node.export.scu import (  # noqa: E402
    DELIVERED_WARNING_STATUSES,
    STORAGE_COMMITMENT_PUSH_MODEL,
)
from acwi_node.ingest import mpps, qr_scu, scp  # noqa: E402
from acwi_node.ingest.spool import Spool  # noqa: E402
from acwi_node.ledger import Ledger  # noqa: E402

DOCUMENT = ROOT / "docs" / "conformance.md"
VERIFICATION = "1.2.840.10008.1.1"
MPPS = mpps.MPPS_SOP_CLASS
COMMITMENT = str(STORAGE_COMMITMENT_PUSH_MODEL)

#: When the storage SCP answers a storage commitment report with each status (PS3.7 C).
COMMITMENT_STATUS_MEANINGS: dict[str, str] = {
    "STATUS_SUCCESS": "The report is applied to the outbox, or names a transaction the node no"
    " longer waits for (logged and ignored).",
    "STATUS_PROCESSING_FAILURE": "The ledger could not record the report (the destination may"
    " send it again), or the message is not of the Storage Commitment Push Model.",
    "STATUS_NO_SUCH_EVENT_TYPE": "An Event Type ID other than 1 or 2.",
    "STATUS_INVALID_ARGUMENT": "The Event Information cannot be decoded, or its Transaction UID"
    " is not digits and dots of at most 64 characters.",
    "STATUS_MISSING_ATTRIBUTE": "No Transaction UID, or Event Type 2 without a Failed SOP"
    " Sequence.",
}

#: What each DIMSE status of the storage SCP means (PS3.4 Annex B.2.3 class, then when).
STATUS_MEANINGS: dict[str, tuple[str, str, str]] = {
    "STATUS_SUCCESS": (
        "Success",
        "Success",
        "The instance is on disk (in the ingest journal, or its spool file flushed). Its"
        " ledger row is written right after the answer, before the association's next message"
        " is read (by the journal's next checkpoint if the ledger fails just then). Also the"
        " answer to one of the node's own results sent back (Manufacturer `ACWI Node`), which"
        " is discarded.",
    ),
    "STATUS_OUT_OF_RESOURCES": (
        "Failure",
        "Refused: Out of Resources",
        "The spool could not write the instance (disk full, quota, I/O error); no partial "
        "file is left.",
    ),
    "STATUS_LEDGER_UNAVAILABLE": (
        "Failure",
        "Refused: Out of Resources",
        "The ledger could not record the instance (database unavailable; once a row has"
        " failed, rows are written before the answer until one succeeds); a file written for it"
        " is removed again. The SCU may retry later.",
    ),
    "STATUS_CANNOT_UNDERSTAND": (
        "Failure",
        "Error: Cannot understand",
        "The data set could not be encoded or its header could not be read: a corrupt or"
        " truncated deflate stream, a little endian data set that ends inside an element"
        " before its Study and SOP Instance UIDs, a deflated data set whose header attributes"
        " (up to Series"
        " Instance UID) are not within its first 4 MiB inflated (it is never inflated further),"
        " sequences nested deeper than pydicom reads (where the node's own reader does not"
        " apply: big endian, code extensions), anything else pydicom cannot read; or the"
        " C-STORE-RQ lacks a required command element (Affected SOP Class UID, Affected SOP"
        " Instance UID, Priority), its data set then neither read nor stored.",
    ),
    "STATUS_DOES_NOT_MATCH": (
        "Failure",
        "Error: Data Set does not match SOP Class",
        "The data set's SOP Class UID is not the command's Affected SOP Class UID, or that is"
        " not the presentation context's abstract syntax (nor a specialization of it that SOP"
        " Class Common Extended Negotiation related to it). Nothing is stored.",
    ),
    "STATUS_BAD_UID": (
        "Failure",
        "Error: Cannot understand",
        "The Study or SOP Instance UID is not a UID that may name a file: only digits and "
        "dots, no empty component, at most 64 characters.",
    ),
    "STATUS_MISSING_UID": (
        "Failure",
        "Error: Cannot understand",
        "The data set has no Study Instance UID, or neither a SOP Instance UID nor an "
        "Affected SOP Instance UID.",
    ),
    "STATUS_INSTANCE_MISMATCH": (
        "Failure",
        "Error: Cannot understand",
        "The data set's SOP Instance UID is not the command's Affected SOP Instance UID"
        " (the stored file, its ledger row and the response would name different instances)."
        " Nothing is stored.",
    ),
    "STATUS_HANDLER_FAILED": (
        "Failure",
        "Error: Cannot understand",
        "The instance could not be stored for a reason the node did not foresee (logged in one"
        ' line; counted in `acwi_scp_instances_rejected{reason="handler_error"}` and audited'
        " as a refusal like any other). Nothing is stored.",
    ),
}


def commitment_acceptor_ae() -> AE:
    """The storage SCP's application entity where a destination is asked for storage
    commitment (``destinations.storage_commitment``)."""
    settings = Settings(
        destinations=[
            {
                "name": "pacs",
                "ae_title": "PACS",
                "host": "pacs",
                "port": 104,
                "storage_commitment": True,
            }
        ]
    )
    return scp.StorageSCP(settings, cast(Ledger, None), cast(Spool, None)).ae


def acceptor_ae() -> AE:
    """The application entity of the storage SCP, built exactly as the ``scp`` process does."""
    node = scp.StorageSCP(Settings(), cast(Ledger, None), cast(Spool, None))
    return node.ae


def _words(keyword: str) -> str:
    """``LabelMapSegmentationStorage`` -> ``Label Map Segmentation Storage``."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", keyword)


def sop_class_name(uid: str) -> str:
    """The SOP Class name from pydicom's dictionary, else from pynetdicom's keyword."""
    name = UID(uid).name
    if name != uid:
        return name
    for keyword, value in vars(pynetdicom.sop_class).items():
        if isinstance(value, str) and value == uid and keyword[:1].isupper():
            return _words(keyword)
    raise ValueError(f"no name known for SOP Class {uid}")


def storage_contexts(ae: AE) -> list[PresentationContext]:
    """The accepted storage contexts, in the order the AE lists them; each must be complete."""
    contexts = [
        cx
        for cx in ae.supported_contexts
        if cx.abstract_syntax not in (VERIFICATION, MPPS, COMMITMENT)
    ]
    for cx in contexts:
        if list(cx.transfer_syntax) != list(scp.TRANSFER_SYNTAXES):
            raise ValueError(
                f"{cx.abstract_syntax} is accepted with transfer syntaxes that differ from "
                "TRANSFER_SYNTAXES; the conformance statement's tables assume one list"
            )
    return contexts


def status_codes() -> dict[str, int]:
    """The ``STATUS_*`` constants of ``acwi_node.ingest.scp``, by name."""
    return {
        name: value
        for name, value in vars(scp).items()
        if name.startswith("STATUS_") and isinstance(value, int)
    }


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def sop_classes_block(ae: AE) -> str:
    rows = [
        (sop_class_name(str(cx.abstract_syntax)), str(cx.abstract_syntax))
        for cx in storage_contexts(ae)
    ]
    return _table(("SOP Class Name", "SOP Class UID"), rows)


def _encoding(uid: UID) -> str:
    if uid.is_deflated:
        kind = "native, deflated"
    elif uid.is_encapsulated:
        kind = "encapsulated (compressed)"
    else:
        kind = "native"
    return kind + (", retired" if uid.is_retired else "")


def transfer_syntaxes_block() -> str:
    rows = [(UID(ts).name, ts, _encoding(UID(ts))) for ts in scp.TRANSFER_SYNTAXES]
    return _table(("Transfer Syntax Name", "Transfer Syntax UID", "Encoding"), rows)


def verification_block(ae: AE) -> str:
    contexts = [cx for cx in ae.supported_contexts if cx.abstract_syntax == VERIFICATION]
    rows = [
        (UID(VERIFICATION).name, VERIFICATION, UID(str(ts)).name, str(ts), "SCP", "None")
        for cx in contexts
        for ts in cx.transfer_syntax
    ]
    header = ("Abstract Syntax", "SOP Class UID", "Transfer Syntax", "UID", "Role", "Ext. Neg.")
    return _table(header, rows)


def mpps_block(ae: AE) -> str:
    contexts = [cx for cx in ae.supported_contexts if cx.abstract_syntax == MPPS]
    rows = [
        (UID(MPPS).name, MPPS, UID(str(ts)).name, str(ts), "SCP", "None")
        for cx in contexts
        for ts in cx.transfer_syntax
    ]
    header = ("Abstract Syntax", "SOP Class UID", "Transfer Syntax", "UID", "Role", "Ext. Neg.")
    return _table(header, rows)


def storage_commitment_block(ae: AE) -> str:
    contexts = [cx for cx in ae.supported_contexts if cx.abstract_syntax == COMMITMENT]
    rows = [
        (
            UID(COMMITMENT).name,
            COMMITMENT,
            UID(str(ts)).name,
            str(ts),
            "SCU (the destination may take the SCP role)",
            "SCP/SCU Role Selection",
        )
        for cx in contexts
        for ts in cx.transfer_syntax
    ]
    header = ("Abstract Syntax", "SOP Class UID", "Transfer Syntax", "UID", "Role", "Ext. Neg.")
    return _table(header, rows)


def commitment_status_block() -> str:
    codes = {
        name: value
        for name, value in vars(commitment).items()
        if name.startswith("STATUS_") and isinstance(value, int)
    }
    rows = []
    for name, code in sorted(codes.items(), key=lambda item: item[1]):
        try:
            when = COMMITMENT_STATUS_MEANINGS[name]
        except KeyError:
            raise ValueError(
                f"acwi_node/export/commitment.py defines {name} = 0x{code:04X}, which "
                "docs/gen_conformance_tables.py does not describe (COMMITMENT_STATUS_MEANINGS)"
            ) from None
        rows.append(("Success" if code == 0 else "Failure", f"{code:04X}", when))
    return _table(("Service Status", "Status Code", "When"), rows)


def failure_reasons_block() -> str:
    rows = [
        (f"{code:04X}", meaning[:1].upper() + meaning[1:])
        for code, meaning in sorted(commitment.FAILURE_REASONS.items())
    ]
    rows.append(("other", "Named as `failure` with its code"))
    return _table(("Failure Reason", "Logged and recorded as"), rows)


def implementation_block(ae: AE) -> str:
    rows = [
        ("Implementation Class UID", str(ae.implementation_class_uid)),
        ("Implementation Version Name", str(ae.implementation_version_name or "")),
    ]
    return _table(("Item", "Value"), rows)


def scp_status_block() -> str:
    rows = []
    for name, code in sorted(status_codes().items(), key=lambda item: item[1]):
        try:
            service_status, meaning, when = STATUS_MEANINGS[name]
        except KeyError:
            raise ValueError(
                f"acwi_node/ingest/scp.py defines {name} = 0x{code:04X}, which "
                "docs/gen_conformance_tables.py does not describe (STATUS_MEANINGS)"
            ) from None
        rows.append((service_status, meaning, f"{code:04X}", when))
    return _table(("Service Status", "Further Meaning", "Status Code", "Behaviour"), rows)


def scu_status_block() -> str:
    rows = [
        ("Success", "Success", "0000", "Delivered: recorded in the ledger as delivered."),
    ]
    rows += [
        (
            "Warning",
            meaning[:1].upper() + meaning[1:],
            f"{code:04X}",
            "Delivered: the destination stored the object; the warning is logged.",
        )
        for code, meaning in sorted(DELIVERED_WARNING_STATUSES.items())
    ]
    rows.append(
        (
            "Failure",
            "Any other status, or no response",
            "other",
            "Not delivered: retried with exponential back-off; after `exporter.max_attempts` "
            "the delivery and its study become `failed` with the status (a destination that "
            "could not be reached at all: after `exporter.outage_patience_s`, the attempts not "
            "counted).",
        )
    )
    return _table(("Service Status", "Further Meaning", "Status Code", "Behaviour"), rows)


def qr_proposed_contexts() -> list[PresentationContext]:
    """The presentation contexts the Query/Retrieve SCU proposes: what ``find_studies``,
    ``move_study`` and ``get_study`` hand to ``open_association``, caught there, before any
    connection."""
    proposed: list[PresentationContext] = []

    def record(*args: Any, **kwargs: Any) -> tuple[None, str]:
        proposed.extend(kwargs.get("contexts") or [])
        return None, "not connected"

    peer: dict[str, Any] = {"called_ae": "PACS", "host": "pacs", "port": 104, "calling_ae": "ACWI"}
    with mock.patch.object(qr_scu, "open_association", record):
        qr_scu.find_studies({"study_uid": "1.2.3"}, **peer)
        qr_scu.move_study("1.2.3", move_destination="ACWI", **peer)
        qr_scu.get_study("1.2.3", store=lambda _event: 0, **peer)
    if not proposed:
        raise ValueError("acwi_node.ingest.qr_scu proposed no presentation context")
    return proposed


_QR_MODELS = {str(qr_scu.STUDY_ROOT_FIND), str(qr_scu.STUDY_ROOT_MOVE), str(qr_scu.STUDY_ROOT_GET)}


def qr_scu_block() -> str:
    """The Query/Retrieve contexts (the storage contexts of a C-GET: ``get-storage``)."""
    rows = [
        (sop_class_name(str(cx.abstract_syntax)), str(cx.abstract_syntax), UID(str(ts)).name,
         str(ts), "SCU", "None")
        for cx in qr_proposed_contexts()
        if str(cx.abstract_syntax) in _QR_MODELS
        for ts in cx.transfer_syntax
    ]  # fmt: skip
    header = ("Abstract Syntax", "SOP Class UID", "Transfer Syntax", "UID", "Role", "Ext. Neg.")
    return _table(header, rows)


def get_storage_block() -> str:
    """The storage contexts a C-GET association proposes, in the SCP role: one row per SOP
    class, then the transfer syntaxes proposed for each (the same for all)."""
    storage = [cx for cx in qr_proposed_contexts() if str(cx.abstract_syntax) not in _QR_MODELS]
    syntaxes = {tuple(str(ts) for ts in cx.transfer_syntax) for cx in storage}
    if len(syntaxes) != 1:
        raise ValueError("the C-GET storage contexts propose different transfer syntaxes")
    rows = [(sop_class_name(str(cx.abstract_syntax)), str(cx.abstract_syntax)) for cx in storage]
    listed = ", ".join(f"{UID(ts).name} ({ts})" for ts in next(iter(syntaxes)))
    return (
        _table(("SOP Class Name", "SOP Class UID"), rows)
        + f"\n\nTransfer syntaxes proposed for each, in this order: {listed}."
    )


#: What a failed attempt of a retrieval leads to (the C-MOVE status table's last column).
_MOVE_FAILED = "The attempt fails, with the status in the error; tried again (4.2.4.3)."


def move_status_block() -> str:
    rows = [
        (
            "Success",
            "Sub-operations complete, no failures",
            "0000",
            "The study is moved: it completes once the source's association that stored it is"
            " released, without the quiet period.",
        ),
        (
            "Warning",
            "Sub-operations complete, one or more failures or warnings",
            "B000",
            "As 0000 when a sub-operation completed; the failed and warning ones are counted"
            " with the retrieval. With none completed and some failed, as a failure: none of"
            " the study reached the node, and the error says what to check.",
        ),
    ]
    for code, meaning in sorted(qr_scu.MOVE_FAILURES.items()):
        behaviour = _MOVE_FAILED
        if code == 0xA801:
            behaviour += " The error says that the source does not know the move destination."
        if code == 0xA702:
            behaviour += (
                " With none completed and some failed, the error adds what to check: the"
                " source's host and port for the move destination, the node's"
                " `ingest.allowed_calling_aes`, the node's log."
            )
        rows.append(("Failure", meaning[:1].upper() + meaning[1:], f"{code:04X}", behaviour))
    rows += [
        (
            "Failure",
            "Unable to process",
            "Cxxx",
            _MOVE_FAILED + " With no sub-operation completed, the error adds that the source may"
            " not know the move destination with the node's host and port, or that the node"
            " refused its association (Orthanc answers C000 for either).",
        ),
        ("Failure", "Any other status", "other", _MOVE_FAILED),
        (
            "Pending",
            "Sub-operations are continuing",
            "FF00",
            "The sub-operation counts are read; the retrieval's lease is renewed.",
        ),
        (
            "-",
            "No response within `retrieve.timeout_s`, or the association lost",
            "-",
            "The attempt fails (`no C-MOVE response within ... s`, `association lost: ...`);"
            " tried again (4.2.4.3).",
        ),
    ]
    return _table(("Service Status", "Further Meaning", "Status Code", "Behaviour"), rows)


def blocks() -> dict[str, str]:
    """Every generated block by name, as it appears between its markers."""
    ae = acceptor_ae()
    makers: dict[str, Callable[[], str]] = {
        "verification": lambda: verification_block(ae),
        "mpps": lambda: mpps_block(ae),
        "storage-commitment": lambda: storage_commitment_block(commitment_acceptor_ae()),
        "commitment-status": commitment_status_block,
        "commitment-failure-reasons": failure_reasons_block,
        "sop-classes": lambda: sop_classes_block(ae),
        "transfer-syntaxes": transfer_syntaxes_block,
        "implementation": lambda: implementation_block(ae),
        "scp-status": scp_status_block,
        "scu-status": scu_status_block,
        "qr-scu": qr_scu_block,
        "get-storage": get_storage_block,
        "move-status": move_status_block,
    }
    return {name: make() for name, make in makers.items()}


def _begin(name: str) -> str:
    return f"<!-- generated:{name} -->"


def _end(name: str) -> str:
    return f"<!-- end generated:{name} -->"


def _pattern(name: str) -> re.Pattern[str]:
    return re.compile(
        re.escape(_begin(name)) + r"\n(.*?)" + re.escape(_end(name)),
        re.DOTALL,
    )


def _block(name: str, content: str) -> str:
    return f"{_begin(name)}\n{content}\n{_end(name)}"


def extract(text: str, name: str) -> str:
    """The content of block ``name`` in ``text``; ``KeyError`` if its markers are missing."""
    match = _pattern(name).search(text)
    if match is None:
        raise KeyError(f"no {_begin(name)} ... {_end(name)} block")
    return match.group(1).removesuffix("\n")


def update(text: str, generated: dict[str, str]) -> str:
    """``text`` with every block replaced by its generated content."""
    for name, content in generated.items():
        match = _pattern(name).search(text)
        if match is None:
            raise KeyError(f"no {_begin(name)} ... {_end(name)} block")
        text = text[: match.start()] + _block(name, content) + text[match.end() :]
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 if the document is stale")
    mode.add_argument("--write", action="store_true", help="rewrite the document's blocks")
    parser.add_argument("--document", type=Path, default=DOCUMENT, help="conformance statement")
    args = parser.parse_args(argv)
    try:
        generated = blocks()
        if not (args.check or args.write):
            for name, content in generated.items():
                print(_block(name, content) + "\n")
            return 0
        text = args.document.read_text(encoding="utf-8")
        new = update(text, generated)
    except (KeyError, ValueError, OSError) as exc:
        print(f"{Path(__file__).name}: {exc}", file=sys.stderr)
        return 2
    if args.check:
        if new != text:
            print(f"{args.document} is stale: run {Path(__file__).name} --write", file=sys.stderr)
            return 1
        return 0
    if new != text:
        args.document.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
