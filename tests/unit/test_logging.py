"""Log format (text and JSON lines), study/job context, and no patient identifiers in logs."""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt

from acwi_node.config import Settings, load_settings
from acwi_node.export.scu import verify
from acwi_node.ingest.scp import StorageSCP
from acwi_node.ingest.spool import Spool
from acwi_node.ledger import Ledger
from acwi_node.observability.logging import (
    LOOP_FAILURE_RETRY_S,
    LoopFailures,
    bind_study,
    log_context,
    note_identifiers,
    redact_text,
    setup_logging,
)
from tests.integration.test_scp import running_scp
from tests.support.ports import free_port

CANARY_NAME = "Canarybird^Zelda"
CANARY_ID = "CANARY-7731"
SC = "1.2.840.10008.5.1.4.1.1.7"


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    pynetdicom_level = logging.getLogger("pynetdicom").level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)
    logging.getLogger("pynetdicom").setLevel(pynetdicom_level)


def configured(tmp_path: Path, **node: object) -> tuple[Settings, io.StringIO]:
    settings = load_settings(
        None,
        node={"data_dir": str(tmp_path / "data"), "log_level": "DEBUG", **node},
        observability={"log_format": "json"},
    )
    stream = io.StringIO()
    setup_logging(settings, "worker", stream)
    return settings, stream


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def sc_dataset(study_uid: str, sop_uid: str | None = None) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(SC)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid or generate_uid())
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SC
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[study_uid, "series"])
    ds.PatientName = CANARY_NAME
    ds.PatientID = CANARY_ID
    ds.Modality = "OT"
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.arange(64, dtype=np.uint8).tobytes()
    return ds


@pytest.mark.usefixtures("restore_logging")
def test_json_lines_carry_kind_study_and_job(tmp_path: Path) -> None:
    _, stream = configured(tmp_path)
    log = logging.getLogger("acwi_node.worker")
    log.info("outside")
    with log_context(job_id=7):
        with log_context(study_uid="1.2.826.0.1.3"):
            log.info("job %d: analysed", 7)
        log.warning("after the study")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("failed")
    out = lines(stream)
    assert [r["message"] for r in out] == [
        "outside",
        "job 7: analysed",
        "after the study",
        "failed",
    ]
    assert set(out[0]) == {"time", "level", "logger", "message", "kind", "pid"}
    assert out[0]["kind"] == "worker" and out[0]["logger"] == "acwi_node.worker"
    assert str(out[0]["time"]).endswith("Z") and out[0]["level"] == "INFO"
    assert out[1]["study_uid"] == "1.2.826.0.1.3" and out[1]["job_id"] == 7
    assert out[2]["job_id"] == 7 and "study_uid" not in out[2]
    assert "job_id" not in out[3]
    assert "RuntimeError: boom" in str(out[3]["exception"])


@pytest.mark.usefixtures("restore_logging")
def test_text_format_stays_available(tmp_path: Path) -> None:
    settings = load_settings(None, node={"data_dir": str(tmp_path)})
    assert settings.observability.log_format == "text"
    stream = io.StringIO()
    setup_logging(settings, "scp", stream)
    with log_context(study_uid="1.2.3", job_id=4):
        logging.getLogger("acwi_node.ingest").info("hello")
    line = stream.getvalue().strip()
    assert line.endswith(
        "INFO acwi_node.ingest [scp "
        + line.split("[scp ")[1].split("]")[0]
        + "] hello (study=1.2.3 job=4)"
    )
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)


def test_redact_text_removes_patient_values() -> None:
    dump = str(sc_dataset("1.2.3"))
    assert CANARY_NAME in dump  # pydicom's dump shows it ...
    redacted = redact_text(dump)
    assert CANARY_NAME not in redacted and CANARY_ID not in redacted  # ... the filter does not
    assert "(0008,0060) Modality" in redacted  # other attributes stay readable
    for text in (
        f"PatientName={CANARY_NAME} and more",
        f"patient's name: '{CANARY_NAME}'",
        f"PatientID {CANARY_ID}",
    ):
        assert CANARY_NAME not in redact_text(text) and CANARY_ID not in redact_text(text)


@pytest.mark.usefixtures("restore_logging")
def test_datasets_and_person_names_are_never_emitted(tmp_path: Path) -> None:
    _, stream = configured(tmp_path)
    ds = sc_dataset("1.2.3")
    log = logging.getLogger("acwi_node.test")
    log.info("received %s", ds)
    log.info("name %s", ds.PatientName)
    log.info(ds)
    log.info("dict %(who)s", {"who": ds.PatientName})
    try:
        raise ValueError(f"bad PatientID={CANARY_ID}")
    except ValueError:
        log.exception("decode failed")
    text = stream.getvalue()
    assert len(lines(stream)) == 5
    assert CANARY_NAME not in text and "Canarybird" not in text and CANARY_ID not in text
    assert "[redacted]" in text


@pytest.mark.usefixtures("restore_logging")
def test_log_phi_on_lets_identifiers_through(tmp_path: Path) -> None:
    _, stream = configured(tmp_path, log_phi=True)
    logging.getLogger("acwi_node.test").info("name %s", sc_dataset("1.2.3").PatientName)
    assert CANARY_NAME in stream.getvalue()  # the filter is what keeps them out


class CarelessSCP(StorageSCP):
    """The node's SCP plus the kind of debug lines a developer might add after the store."""

    def handle_store(self, event: evt.Event) -> int | tuple[int, Dataset]:
        status = super().handle_store(event)
        ds = event.dataset
        log = logging.getLogger("acwi_node.ingest")
        log.debug("C-STORE dataset: %s", ds)
        log.debug("C-STORE patient %s / %s", ds.PatientName, str(ds.PatientID))
        log.debug("patient " + str(ds.PatientName).replace("^", " ") + " ID " + ds.PatientID)
        family, given = str(ds.PatientName).split("^")
        log.warning(f"{given} {family} could not be matched to an order")
        return status


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("log_phi", [False, True])
def test_canary_patient_name_through_the_ingest_path(tmp_path: Path, log_phi: bool) -> None:
    settings, stream = configured(
        tmp_path, dicom_host="127.0.0.1", dicom_port=free_port(), log_phi=log_phi
    )
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG)  # its most talkative level
    ledger = Ledger(settings.database_url)
    scp = CarelessSCP(settings, ledger, Spool(settings.spool_dir, fsync=False))
    scp.start(block=False)
    try:
        ae = AE(ae_title="CANARYSENDER")
        ae.add_requested_context(SC, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", settings.node.dicom_port, ae_title="ACWI")
        assert assoc.is_established
        good = sc_dataset("1.2.826.0.1.3680043.9.7")
        bad = sc_dataset("1.2.826.0.1.3680043.9.7/../x")  # refused: unsafe UID, logged
        assert assoc.send_c_store(good).Status == 0x0000
        assert assoc.send_c_store(bad).Status == 0xC001
        assoc.release()
    finally:
        scp.stop()
        ledger.dispose()
    text = stream.getvalue()
    records = lines(stream)
    assert any("invalid UID" in str(r["message"]) for r in records)  # the ingest path logged
    assert any(str(r["logger"]).startswith("pynetdicom") for r in records)
    assert sum("C-STORE dataset" in str(r["message"]) for r in records) == 2
    if log_phi:  # control: the careless lines do carry the identifiers when allowed
        assert "Canarybird" in text and CANARY_ID in text
    else:
        assert "Canarybird" not in text and CANARY_ID not in text


@pytest.mark.usefixtures("restore_logging")
def test_bind_study_is_scoped_to_its_log_context(tmp_path: Path) -> None:
    _, stream = configured(tmp_path)
    log = logging.getLogger("acwi_node.worker")
    bind_study("1.2.9")  # outside any context: ignored
    log.info("a")
    with log_context(job_id=3):
        bind_study("1.2.10")
        log.info("b")
    log.info("c")
    out = lines(stream)
    assert "study_uid" not in out[0] and "study_uid" not in out[2] and "job_id" not in out[2]
    assert out[1]["study_uid"] == "1.2.10" and out[1]["job_id"] == 3


@pytest.fixture
def identifiers() -> Iterator[Any]:
    """The process's remembered patient identifiers, emptied for the test; other tests'
    identifiers are restored after it."""
    from acwi_node.observability.logging import _IDENTIFIERS

    remembered = list(_IDENTIFIERS._values)
    _IDENTIFIERS.clear()
    yield _IDENTIFIERS
    _IDENTIFIERS.clear()
    _IDENTIFIERS.add(remembered)


def test_identifiers_are_redacted_as_whole_words_only(identifiers: Any) -> None:
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.PatientName = "PHANTOM^ONE"
    ds.PatientID = "PH0001"
    note_identifiers(ds)
    assert identifiers.redact("ConnectionError: the task is gone") == (
        "ConnectionError: the task is gone"
    )
    assert identifiers.redact("patient one, id PH0001.") == "patient [redacted], id [redacted]."
    assert identifiers.redact("file PH0001_scan.dcm; Phantom One") == (
        "file [redacted]_scan.dcm; [redacted]"
    )


def test_a_patient_noted_again_at_once_is_not_added_again(
    identifiers: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The instances of a study come one after another: each would add the same values."""
    added: list[list[str]] = []
    add = identifiers.add

    def counting_add(values: Any, **kwargs: Any) -> None:
        added.append(list(values))
        add(values, **kwargs)

    monkeypatch.setattr(identifiers, "add", counting_add)
    one = {"PatientName": "PHANTOM^ONE", "PatientID": "PH0001"}
    two = {"PatientName": "PHANTOM^TWO", "PatientID": "PH0002"}
    for header in (one, one, two, one, one):
        note_identifiers(header)
    assert [values[0] for values in added] == ["PHANTOM^ONE", "PHANTOM^TWO", "PHANTOM^ONE"]
    assert identifiers.redact("PH0001 PH0002 Phantom One") == "[redacted] [redacted] [redacted]"
    identifiers.clear()  # forgets everything, the last patient too
    note_identifiers(one)
    assert len(added) == 4
    assert identifiers.redact("id PH0001") == "id [redacted]"


def test_a_remembered_common_word_does_not_hide_a_keyword() -> None:
    """A patient called "Test^Patient" must not stop "Patient's name: X" being redacted."""
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.PatientName = "Test^Patient"
    note_identifiers(ds)
    redacted = redact_text(f"patient's name: '{CANARY_NAME}'")
    assert CANARY_NAME not in redacted


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("level", ["INFO", "DEBUG"])
def test_pynetdicom_does_not_repeat_what_the_node_says_of_a_destination(
    tmp_path: Path, level: str
) -> None:
    """A destination that refuses connections or rejects the association: pynetdicom's own
    error lines (two or three each time) repeat the reason the node gives; they are kept only
    at DEBUG."""
    settings = load_settings(
        None, node={"data_dir": str(tmp_path), "log_level": level}, ingest={"fsync": False}
    )
    stream = io.StringIO()
    setup_logging(settings, "exporter", stream)
    refused = verify("PACS", "127.0.0.1", free_port(), "ACWI", timeout_s=5)
    assert not refused.ok and "connection refused" in refused.error

    with running_scp(tmp_path / "pacs", allowed_calling_aes=["SOMEONE"]) as (scp_settings, *_):
        rejected = verify("ACWI", "127.0.0.1", scp_settings.node.dicom_port, "STRANGER")
    assert not rejected.ok and "Calling AE title not recognised" in rejected.error
    logging.getLogger("pynetdicom.association").error("DIMSE timeout reached")  # another error
    out = stream.getvalue()
    assert "DIMSE timeout reached" in out
    for repeated in (
        "Association request failed",
        "TCP Initialisation Error",
        "Association Rejected",
        "Reason: Calling AE title not recognised",
    ):
        assert (repeated in out) is (level == "DEBUG"), repeated


def text_lines(tmp_path: Path, *, log_phi: bool) -> tuple[io.StringIO, Settings]:
    settings = load_settings(None, node={"data_dir": str(tmp_path), "log_phi": log_phi})
    stream = io.StringIO()
    setup_logging(settings, "scp", stream)
    return stream, settings


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("log_phi", [False, True])
def test_control_characters_in_logged_values_are_escaped(tmp_path: Path, log_phi: bool) -> None:
    """A value a peer sent (a calling AE title) cannot forge a log line or reach a terminal
    raw, whichever logger writes it and however: as an argument, in an f-string (pynetdicom's
    way), in an exception's message."""
    stream, _ = text_lines(tmp_path, log_phi=log_phi)
    forged = "A'\nERROR forged!\r\x1b[31m\u202e"
    logging.getLogger("acwi_node.ingest").warning("from %s: refused", forged)
    logging.getLogger("pynetdicom.utils").error(f"Invalid 'Calling AE Title' value '{forged}'")
    try:
        raise ValueError(f"cannot decode {forged}")
    except ValueError:
        logging.getLogger("acwi_node.ingest").exception("unable to decode a received PDU")
    text = stream.getvalue()
    assert "\x1b" not in text and "\r" not in text and "\u202e" not in text
    lines_out = text.splitlines()
    assert not any(line.startswith("ERROR forged!") for line in lines_out)
    assert sum("ERROR forged!" in line for line in lines_out) == 3
    assert "from A'\\nERROR forged!\\r\\x1b[31m\\u202e: refused" in text
    assert "ValueError: cannot decode A'\\nERROR forged!" in text
    assert "Traceback (most recent call last):" in text  # a traceback keeps its lines
    from acwi_node.observability.logging import escape_text

    assert escape_text("Klinik München") == "Klinik München"  # printable letters stay


@pytest.mark.usefixtures("restore_logging")
def test_json_lines_escape_control_characters_too(tmp_path: Path) -> None:
    _, stream = configured(tmp_path)
    logging.getLogger("acwi_node.ingest").warning("AE %s", "X\x1b[2J\u2028Y")
    (record,) = lines(stream)
    assert record["message"] == "AE X\\x1b[2J\\u2028Y"


@pytest.mark.usefixtures("restore_logging")
def test_an_exception_no_thread_handles_goes_through_the_filters(
    tmp_path: Path, identifiers: Any
) -> None:
    """threading's own hook printed such tracebacks to standard error, past the filter."""
    stream, _ = text_lines(tmp_path, log_phi=False)
    note_identifiers({"PatientName": CANARY_NAME, "PatientID": CANARY_ID})

    def fail() -> None:
        raise RuntimeError(f"no order for {CANARY_ID}\nERROR forged!")

    thread = threading.Thread(target=fail, name="reactor-test")
    thread.start()
    thread.join()
    text = stream.getvalue()
    assert "ERROR acwi_node [scp " in text and "unhandled exception in reactor-test" in text
    assert "RuntimeError: no order for [redacted]\\nERROR forged!" in text
    assert CANARY_ID not in text


@pytest.mark.usefixtures("restore_logging")
def test_a_name_part_that_is_a_common_word_leaves_installed_code_readable(
    tmp_path: Path, identifiers: Any
) -> None:
    """The frames of installed code (here the standard library's json) hold code, not data: a
    patient called "Value^Frederica" no longer blanks every "value" in them. The exception's
    message, the log message and the frames of other files (this test, whose source names the
    patient) are redacted as before, in any case."""
    stream, _ = text_lines(tmp_path, log_phi=False)
    note_identifiers({"PatientName": "Value^Frederica", "PatientID": "VF-1"})
    try:
        json.loads("VALUE^FREDERICA")
    except ValueError:
        logging.getLogger("acwi_node.worker").exception("the value of %s", "Frederica")
    text = stream.getvalue()
    assert 'raise JSONDecodeError("Expecting value", s, err.value) from None' in text
    assert "JSONDecodeError: Expecting [redacted]: line 1" in text
    assert "the [redacted] of [redacted]" in text
    assert "frederica" not in text.lower()


def test_a_loop_failing_for_long_logs_a_traceback_then_a_line_a_minute(
    caplog: pytest.LogCaptureFixture, identifiers: Any
) -> None:
    # ``identifiers``: no patient another test remembered ("Test^...") blanks "test" here
    now = [0.0]
    failures = LoopFailures(logging.getLogger("acwi_node.test"), "test pass", clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="acwi_node.test"):
        for second in range(181):  # three minutes of a pass a second, all failing
            now[0] = float(second)
            try:
                raise ConnectionError(f"refused\n[parameters: ('DOE^JANE', {second})]")
            except ConnectionError:
                failures.failed()
        assert failures.wait_s(0.1) == LOOP_FAILURE_RETRY_S
        failures.worked()
        failures.worked()
    assert failures.wait_s(0.1) == 0.1
    assert [(r.levelno, r.exc_info is not None, r.getMessage()) for r in caplog.records] == [
        (logging.ERROR, True, "test pass failed; retrying"),
        *[
            (
                logging.ERROR,
                False,
                f"test pass still failing after {n} tries (ConnectionError: refused); retrying",
            )
            for n in (61, 121, 181)
        ],
        (
            logging.WARNING,
            False,
            "test pass works again after 181 failed tries (ConnectionError: refused)",
        ),
    ]
