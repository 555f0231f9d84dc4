"""STOW-RS to a real DICOMweb service: Orthanc's DICOMweb plugin (Debian's
``orthanc-dicomweb``), with HTTP Basic authentication on."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from acwi_node.config import Destination, load_settings
from acwi_node.export.dicomweb import check, stow_files
from acwi_node.export.outbox import verify_destination
from tests.support import write_secondary_capture
from tests.support.orthanc import OrthancServer, require_orthanc

pytestmark = pytest.mark.integration

USER = ("acwi", "stow-s3cret")


@pytest.fixture(scope="module")
def orthanc() -> Iterator[OrthancServer]:
    require_orthanc()
    with OrthancServer(http_user=USER) as server:
        server.require_dicomweb()
        yield server


def destination(orthanc: OrthancServer, tmp_path: Path, password: str = USER[1]) -> Destination:
    secret = tmp_path / "password"
    secret.write_text(password + "\n")
    return Destination(
        name="orthanc-web",
        url=f"{orthanc.url}/dicom-web/",
        username=USER[0],
        password_file=secret,
    )


def results(tmp_path: Path, study_uid: str, n: int) -> list[Path]:
    paths = []
    for i in range(n):
        path = tmp_path / f"result{i}.dcm"
        write_secondary_capture(path, study_uid=study_uid, instance_number=i + 1, rows=64)
        paths.append(path)
    return paths


def test_results_are_stored_by_stow_rs(orthanc: OrthancServer, tmp_path: Path) -> None:
    study_uid = generate_uid()
    paths = results(tmp_path, study_uid, 3)
    report = stow_files(paths, destination(orthanc, tmp_path), timeout_s=30)
    assert report.error is None, report.error
    assert [o.delivered for o in report.outcomes.values()] == [True, True, True]
    assert orthanc.find_study(study_uid)
    assert len(orthanc.study_instances(study_uid)) == 3
    # Sent again (a re-run's results): stored again, nothing refused.
    again = stow_files(paths, destination(orthanc, tmp_path), timeout_s=30)
    assert all(o.delivered for o in again.outcomes.values())
    assert len(orthanc.study_instances(study_uid)) == 3


def test_a_wrong_password_stores_nothing_and_says_why(
    orthanc: OrthancServer, tmp_path: Path
) -> None:
    study_uid = generate_uid()
    paths = results(tmp_path, study_uid, 2)
    report = stow_files(paths, destination(orthanc, tmp_path, "wrong"), timeout_s=30)
    assert report.error is not None and report.error.startswith("HTTP 401")
    assert not any(o.delivered for o in report.outcomes.values())
    assert not orthanc.find_study(study_uid)


def test_the_destination_check_queries_the_service(orthanc: OrthancServer, tmp_path: Path) -> None:
    settings = load_settings(None, node={"data_dir": tmp_path / "data"})
    assert verify_destination(settings, destination(orthanc, tmp_path)).ok
    wrong = check(destination(orthanc, tmp_path, "wrong"), timeout_s=10)
    assert not wrong.ok and wrong.error.startswith("HTTP 401")
    right = destination(orthanc, tmp_path)  # the right password again
    assert right.password_file is not None
    elsewhere = Destination(
        name="nowhere",
        url=f"{orthanc.url}/no-such-service",
        username=USER[0],
        password_file=right.password_file,
    )
    missing = check(elsewhere, timeout_s=10)
    assert not missing.ok and missing.error.startswith("HTTP 404")
