from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest

from acwi_node.ingest import spool as spool_module
from acwi_node.ingest.spool import Spool, SpoolError, is_safe_uid
from tests.support.descriptors import REAL_CLOSE, CloseReportingAnError


@pytest.mark.parametrize(
    "uid", ["1.2.840.10008.5.1.4.1.1.1.1", "2.25.1234", "1", "1.2.03", "9" * 64]
)
def test_safe_uids(uid: str) -> None:
    assert is_safe_uid(uid)


@pytest.mark.parametrize(
    "uid", ["", "../../x", "/etc/x", "1.2.3a", "1..2", ".1.2", "1.2.", "9" * 65, "1.2/3", "1 .2"]
)
def test_unsafe_uids(uid: str) -> None:
    assert not is_safe_uid(uid)


def test_store_is_atomic_and_named_by_uids(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", fsync=True)
    path = spool.store("1.2.3", "1.2.3.4", b"DICM-data")
    assert path == tmp_path / "spool" / "1.2.3" / "1.2.3.4.dcm"
    assert path.read_bytes() == b"DICM-data"
    assert list(spool.tmp_dir.iterdir()) == []
    assert spool.relative(path) == "1.2.3/1.2.3.4.dcm"
    assert spool.resolve("1.2.3/1.2.3.4.dcm") == path.resolve()


def test_store_replaces_an_earlier_copy(tmp_path: Path) -> None:
    spool = Spool(tmp_path, fsync=False)
    spool.store("1.2", "1.2.1", b"old")
    assert spool.store("1.2", "1.2.1", b"new").read_bytes() == b"new"


def test_unsafe_uid_never_names_a_path(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    with pytest.raises(ValueError):
        spool.store("../../etc", "1.2", b"x")
    with pytest.raises(ValueError):
        spool.resolve("../outside.dcm")
    assert not (tmp_path / "etc").exists()


def test_disk_full_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(tmp_path / "spool", fsync=False)
    real_writev = os.writev

    def full(fd: int, buffers: list[memoryview]) -> int:
        real_writev(fd, [bytes(buffers[0])[:3]])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "writev", full)
    with pytest.raises(SpoolError) as err:
        spool.store("1.2", "1.2.9", b"0123456789")
    assert err.value.out_of_space
    assert list(spool.tmp_dir.iterdir()) == []
    assert not (tmp_path / "spool" / "1.2" / "1.2.9.dcm").exists()


def test_buffers_are_written_whole_across_short_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An instance's file meta and data set go to the file one after the other, whatever
    number of bytes each write takes."""
    real_writev = os.writev
    calls: list[int] = []

    def short(fd: int, buffers: list[memoryview]) -> int:
        calls.append(len(buffers))
        return real_writev(fd, [bytes(buffers[0])[:3]])  # at most 3 bytes a time

    monkeypatch.setattr(os, "writev", short)
    spool = Spool(tmp_path / "spool", fsync=False)
    parts = (b"DICM-meta", memoryview(bytearray(b"0123456789")), b"", b"end")
    path = spool.store("1.2", "1.2.9", parts)
    assert path.read_bytes() == b"DICM-meta0123456789end"
    assert len(calls) == 8 and calls[0] == 3  # the empty buffer is skipped


def test_clean_tmp_removes_crash_leftovers(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    (spool.tmp_dir / "abc.part").write_bytes(b"half")
    assert spool.clean_tmp() == 1
    assert list(spool.tmp_dir.iterdir()) == []


def test_a_study_directory_removed_meanwhile_is_made_again(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", fsync=False)
    first = spool.store("1.2.3", "1.2.3.1", b"one")
    shutil.rmtree(first.parent)  # an administrator cleaned up while the node ran
    second = spool.store("1.2.3", "1.2.3.2", b"two")
    assert second.read_bytes() == b"two" and not first.exists()
    assert list(spool.tmp_dir.iterdir()) == []


def test_the_study_directories_it_remembers_stay_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A listener's spool lives for months and sees each study once: what it remembers of the
    directories it made must not grow with every study received."""
    monkeypatch.setattr(spool_module, "REMEMBERED_STUDY_DIRS", 16, raising=False)
    spool = Spool(tmp_path / "spool", fsync=False)
    for n in range(200):
        spool.store(f"1.2.{n}", f"1.2.{n}.1", b"x")
        assert len(spool._dirs) <= 16
    # Forgotten or not, a study's directory is made again once removed.
    shutil.rmtree(tmp_path / "spool" / "1.2.199")
    assert spool.store("1.2.199", "1.2.199.2", b"y").read_bytes() == b"y"
    assert spool.store("1.2.0", "1.2.0.2", b"z").read_bytes() == b"z"


def test_a_written_file_knows_whether_a_later_write_replaced_it(tmp_path: Path) -> None:
    """Two associations writing one instance at the same moment: each file's row must learn
    whether its file is still the one there (the ledger asks before writing the row)."""
    spool = Spool(tmp_path)
    first = spool.write("1.2", "1.2.3", b"first version")
    assert first.size == len(b"first version")
    relative = spool.relative_for("1.2", "1.2.3")
    assert spool.is_current(relative, first)
    second = spool.write("1.2", "1.2.3", b"second")
    assert not spool.is_current(relative, first)
    assert spool.is_current(relative, second)
    Path(second.path).unlink()  # retention: no evidence of a replacement
    assert spool.is_current(relative, first)


def test_a_close_that_reports_an_error_is_not_repeated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() may report a write error (NFS reports ENOSPC, EDQUOT or EIO there), having
    released the descriptor all the same (Linux). The spool closed the number a second time:
    whatever file another thread had opened meanwhile (the ledger's database, another
    association's spool file) lost its descriptor."""
    spool = Spool(tmp_path / "spool", fsync=False)
    failing = CloseReportingAnError(tmp_path / "ledger.sqlite", errno.EDQUOT)
    monkeypatch.setattr(os, "close", failing)
    with pytest.raises(SpoolError) as err:
        spool.store("1.2", "1.2.9", b"0123456789")
    monkeypatch.setattr(os, "close", REAL_CLOSE)
    try:
        assert err.value.out_of_space
        os.fstat(failing.others[0])  # still open
        assert list(spool.tmp_dir.iterdir()) == []
    finally:
        failing.close_others()
