"""Where the ledger and the data directory disagree (``acwi-node check``): read-only.

After a restore (the ledger from one night, the data directory from another), a disk replaced
or files deleted by hand, three things can be out of step:

* **folders without a study**: ``spool/<uid>/`` or ``results/<uid>/`` of a study the ledger
  has no row of (an older ledger restored): no analysis, delivery or retention ever reads them;
* **rows without files**: instances not yet purged, and results of analyses not yet purged,
  whose files are gone (a data directory restored older, files deleted): an analysis of those
  instances leaves them out, a delivery of those results fails after its attempts;
* **files of purged studies**: a study whose files storage retention deleted in its current
  generation, with files still in its folders (left by a restore after the purge).

Nothing is changed; the report says what is where, with counts, for IT staff to settle.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import and_, exists, select

from acwi_node.config import Settings
from acwi_node.ingest.spool import is_safe_uid
from acwi_node.ledger import Ledger
from acwi_node.ledger.models import (
    UNSETTLED_DELIVERY_STATES,
    Delivery,
    Instance,
    Job,
    Purge,
    Result,
    Study,
)

#: Studies listed per kind of disagreement (the counts cover them all).
LISTED = 50


@dataclass
class Finding:
    """One kind of disagreement: how many studies, files (rows) and bytes, some studies."""

    studies: int = 0
    files: int = 0
    bytes: int = 0
    study_uids: list[str] = field(default_factory=list)

    def add(self, study_uid: str, files: int, size: int = 0) -> None:
        self.studies += 1
        self.files += files
        self.bytes += size
        if len(self.study_uids) < LISTED:
            self.study_uids.append(study_uid)

    def as_dict(self) -> dict[str, Any]:
        return {
            "studies": self.studies,
            "files": self.files,
            "bytes": self.bytes,
            "study_uids": self.study_uids,
        }


@dataclass
class CheckReport:
    spool_without_study: Finding = field(default_factory=Finding)
    results_without_study: Finding = field(default_factory=Finding)
    instances_without_file: Finding = field(default_factory=Finding)
    results_without_file: Finding = field(default_factory=Finding)
    #: Of ``results_without_file``: those still owed to a destination.
    owed_results_without_file: int = 0
    files_of_purged_studies: Finding = field(default_factory=Finding)

    @property
    def agrees(self) -> bool:
        return not any(
            f.studies
            for f in (
                self.spool_without_study,
                self.results_without_study,
                self.instances_without_file,
                self.results_without_file,
                self.files_of_purged_studies,
            )
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "agrees": self.agrees,
            "spool_without_study": self.spool_without_study.as_dict(),
            "results_without_study": self.results_without_study.as_dict(),
            "instances_without_file": self.instances_without_file.as_dict(),
            "results_without_file": {
                **self.results_without_file.as_dict(),
                "owed": self.owed_results_without_file,
            },
            "files_of_purged_studies": self.files_of_purged_studies.as_dict(),
        }


def _folders(root: Path) -> dict[str, tuple[int, int]]:
    """Each study folder under ``root`` (dot-named working folders left out): its files and
    bytes."""
    found: dict[str, tuple[int, int]] = {}
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return found
    for entry in entries:
        if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
            continue
        files = size = 0
        try:
            with os.scandir(entry.path) as inside:
                for f in inside:
                    if f.is_file(follow_symlinks=False) and not f.name.startswith("."):
                        files += 1
                        size += f.stat(follow_symlinks=False).st_size
        except OSError:
            continue
        found[entry.name] = (files, size)
    return found


def _missing(root: Path, paths: list[str]) -> int:
    return sum(not os.path.isfile(os.path.join(root, p)) for p in paths)


def check(settings: Settings, ledger: Ledger) -> CheckReport:
    """Compare the ledger with the spool and results folders."""
    report = CheckReport()
    spool, results = _folders(settings.spool_dir), _folders(settings.results_dir)
    # purged in its current generation, and nothing arrived since
    purged = exists().where(
        Purge.study_id == Study.id,
        Purge.generation == Study.generation,
        Purge.finished_at.is_not(None),
        Purge.received_before >= Study.last_received_at,
    )
    with ledger.session() as s:
        studies = {uid: bool(p) for uid, p in s.execute(select(Study.study_uid, purged))}
        instances: dict[str, list[str]] = {}
        for uid, path in s.execute(
            select(Study.study_uid, Instance.path)
            .join(Study, Instance.study_id == Study.id)
            .where(Instance.path != "")
        ):
            instances.setdefault(uid, []).append(path)
        # results of analyses no purge has taken the files of yet
        result_rows: dict[str, list[tuple[str, bool]]] = {}
        owed = exists().where(
            Delivery.result_id == Result.id, Delivery.state.in_(UNSETTLED_DELIVERY_STATES)
        )
        later_purge = exists().where(
            and_(Purge.study_id == Job.study_id, Purge.generation >= Job.generation)
        )
        for uid, path, is_owed in s.execute(
            select(Study.study_uid, Result.path, owed)
            .join(Job, Result.job_id == Job.id)
            .join(Study, Job.study_id == Study.id)
            .where(~later_purge)
        ):
            result_rows.setdefault(uid, []).append((path, bool(is_owed)))
    for folders, finding in (
        (spool, report.spool_without_study),
        (results, report.results_without_study),
    ):
        for uid, (files, size) in sorted(folders.items()):
            if uid not in studies and is_safe_uid(uid):
                finding.add(uid, files, size)
    for uid, paths in sorted(instances.items()):
        if n := _missing(settings.spool_dir, paths):
            report.instances_without_file.add(uid, n)
    for uid, rows in sorted(result_rows.items()):
        gone = [o for p, o in rows if not os.path.isfile(os.path.join(settings.results_dir, p))]
        if gone:
            report.results_without_file.add(uid, len(gone))
            report.owed_results_without_file += sum(gone)
    for uid in sorted(u for u, p in studies.items() if p):
        files = size = 0
        for folders in (spool, results):
            n, b = folders.get(uid, (0, 0))
            files, size = files + n, size + b
        if files:
            report.files_of_purged_studies.add(uid, files, size)
    return report
