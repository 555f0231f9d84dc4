"""A worker that has queued a study's results wakes the exporter of its data directory."""

from __future__ import annotations

from pathlib import Path

from acwi_node.export.wakeup import WakeUpListener
from acwi_node.ledger import Ledger
from tests.support.review_case import make_review_case, review_settings


def test_analysed_results_wake_the_exporter(tmp_path: Path) -> None:
    settings = review_settings(tmp_path, pacs_ae="PACS", pacs_port=1)
    ledger = Ledger(settings.database_url)
    listener = WakeUpListener(settings.data_dir)
    try:
        assert listener.listening
        assert listener.wait(0.01) is False
        make_review_case(settings, ledger, tmp_path)  # analysed: results queued for "pacs"
        assert listener.wait(30) is True
    finally:
        listener.close()
        ledger.dispose()
