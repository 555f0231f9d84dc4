"""Model monitoring on real analyses: the bundled model analyses phantom radiographs from a
site it was trained on, then from one it never saw (site 4: another manufacturer, detector
and contrast), and the monitor tells the change from the summaries the analyse task wrote."""

from __future__ import annotations

from pathlib import Path

import pytest

from acwi_node.config import Settings
from acwi_node.inference.manifest import default_model_dir
from acwi_node.ledger import Ledger
from acwi_node.monitoring.drift import Status
from acwi_node.monitoring.report import ModelMonitor
from acwi_node.tasks.analyse import run_job
from models.data.synth import SITES, write_study
from tests.support.review_case import review_settings, store_and_route

pytestmark = pytest.mark.integration

#: Studies per site: the baseline (the version's first ones), then as many recent ones.
N = 12
LABELS = ("normal", "nodule", "effusion")


def _analyse(settings: Settings, ledger: Ledger, work: Path, site: int, first_seed: int) -> None:
    for i in range(N):
        seed = first_seed + i
        files = write_study(
            work / f"site{site}-{seed}", n_images=1, label=LABELS[seed % 3], site=site,
            seed=seed, size=128, accession_number=f"A{seed}",
        )  # fmt: skip
        job_id, _ = store_and_route(settings, ledger, files, calling_ae="PACS")
        assert run_job(settings, ledger, job_id) == "analysed"


def test_an_unseen_site_reads_shifted(tmp_path: Path) -> None:
    settings = review_settings(
        tmp_path,
        model_manifest=default_model_dir() / "manifest.json",
        monitoring={"baseline_studies": N, "min_studies": N},
    )
    ledger = Ledger(settings.database_url)
    try:
        _analyse(settings, ledger, tmp_path / "src", site=0, first_seed=100)
        monitor = ModelMonitor(ledger, settings.monitoring)
        (forming,) = monitor.report()
        assert forming.baseline.studies == N and forming.studies == 0
        _analyse(settings, ledger, tmp_path / "src", site=4, first_seed=200)
        (report,) = monitor.report()
    finally:
        ledger.dispose()
    signals = {s.signal: s for s in report.signals}
    assert report.studies == N
    seen = f"{SITES[0].manufacturer} {SITES[0].model_name}"
    unseen = f"{SITES[4].manufacturer} {SITES[4].model_name}"
    assert signals["equipment"].baseline_text == f"{seen} 100%"
    assert signals["equipment"].recent_text == f"{unseen} 100%"
    assert signals["equipment"].status is Status.SHIFTED
    assert signals["site"].status is Status.STABLE  # one PACS sends both
    assert report.status is Status.SHIFTED
    # the summaries carry the model's OOD threshold: every study says whether it was out
    assert signals["ood_rate"].baseline_n == N and signals["ood_rate"].recent_n == N
    # every signal was compared (the bundled model generalises to site 4: its scores and
    # rates hardly move, and with 12 studies a side only the new scanner is beyond chance)
    assert all(s.statistic is not None for s in report.signals)
